//! Metrics of a model on a data set, as training reports them for validation (no dropout,
//! no augmentation, no class weights).

use burn::tensor::Device;
use lanner_data::{DataError, Loader};
use lanner_models::Normalization;
use lanner_models::precision::Precision;

use crate::classifier::Classifier;
use crate::metrics::{EpochMetrics, MetricsAccumulator};
use crate::trainer::{StepLogits, default_readback_every};

/// Run `model` (an inference copy) in `precision` (see [`Classifier::for_inference`]) over
/// every batch of `loader` and return its metrics, ROC AUC included for binary models.
pub fn evaluate(
    model: Classifier,
    loader: &Loader,
    normalization: &Normalization,
    classes: usize,
    device: &Device,
    precision: Precision,
) -> Result<EpochMetrics, DataError> {
    let mut metrics = MetricsAccumulator::new(classes, true);
    let (model, backbone) = model.for_inference(device, precision);
    // Batches are read back in groups, as training steps are (see `default_readback_every`):
    // on a GPU the next batches are queued while the host waits for none of them.
    let every = default_readback_every(device);
    let mut unread: Vec<(StepLogits, Vec<usize>)> = Vec::with_capacity(every);
    let mut read = |unread: &mut Vec<(StepLogits, Vec<usize>)>| {
        for (logits, labels) in unread.drain(..) {
            metrics.update(&logits.read(), &labels, &vec![1.0; labels.len()]);
        }
    };
    for batch in loader.epoch(0) {
        let batch = batch?;
        let labels = batch.labels.clone();
        let logits = model.predict(&backbone, batch.into_images_tensor(device), normalization);
        unread.push((StepLogits::new(logits), labels));
        if unread.len() >= every {
            read(&mut unread);
        }
    }
    read(&mut unread);
    Ok(metrics.finish())
}
