//! Metrics of a model on a data set, as training reports them for validation (no dropout,
//! no augmentation, no class weights).

use burn::tensor::Device;
use lanner_data::{DataError, Loader};
use lanner_models::Normalization;

use crate::classifier::Classifier;
use crate::metrics::{EpochMetrics, MetricsAccumulator};

/// Run `model` (an inference copy) over every batch of `loader` and return its metrics,
/// ROC AUC included for binary models.
pub fn evaluate(
    model: &Classifier,
    loader: &Loader,
    normalization: &Normalization,
    classes: usize,
    device: &Device,
) -> Result<EpochMetrics, DataError> {
    let mut metrics = MetricsAccumulator::new(classes, true);
    let backbone = model.inference_backbone(device);
    for batch in loader.epoch(0) {
        let batch = batch?;
        let labels = batch.labels.clone();
        let logits = model.predict(&backbone, batch.into_images_tensor(device), normalization);
        let logits: Vec<f32> = logits.into_data().try_into_vec().expect("logits are f32");
        metrics.update(&logits, &labels, &vec![1.0; labels.len()]);
    }
    Ok(metrics.finish())
}
