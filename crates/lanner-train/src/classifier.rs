//! The network the recipe trains: a registry backbone and the seed's head, with the
//! class-weighted losses of the seed and the dropout masks that make a resumed run exact.

use burn::module::Module;
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{DType, Device, Tensor, TensorData};
use lanner_data::rng::SplitMix64;
use lanner_models::precision::{Precision, cast_floats, in_dtype};
use lanner_models::{
    Backbone, ClassifierHead, ClassifierHeadConfig, FrozenPrefix, ModelEntry, Normalization,
};

/// Backbone, then global average pooling, dropout and one dense layer.
#[derive(Module, Debug)]
pub struct Classifier {
    /// The feature extractor (timm tensor names).
    pub backbone: Backbone,
    /// Pooling, dropout and the dense layer to the logits.
    pub head: ClassifierHead,
}

/// Logits per sample: 1 for two classes (a binary classifier, as the seed's), K otherwise.
pub fn outputs_for(classes: usize) -> usize {
    if classes == 2 { 1 } else { classes }
}

/// burn draws initial weights from one random stream per process: classifiers built at once
/// on several threads (tests, replicas) would interleave their draws, and a seeded one would
/// not get the weights its seed names. Classifiers are built one at a time.
fn lock_random_draws() -> std::sync::MutexGuard<'static, ()> {
    static DRAWING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    DRAWING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Classifier {
    /// A randomly initialised classifier for `classes` classes on `device`.
    pub fn new(entry: &ModelEntry, classes: usize, dropout: f64, device: &Device) -> Self {
        let _drawing = lock_random_draws();
        Self::drawn(entry, classes, dropout, device)
    }

    /// [`Self::new`], while holding [`lock_random_draws`].
    fn drawn(entry: &ModelEntry, classes: usize, dropout: f64, device: &Device) -> Self {
        Self {
            backbone: entry.init_backbone(device),
            head: ClassifierHeadConfig::new(entry.feature_channels(), outputs_for(classes))
                .with_dropout(dropout)
                .init(device),
        }
    }

    /// A classifier initialised from `seed` on the CPU and copied to `device`: the same seed
    /// gives the same starting weights on every device (a GPU's random generator draws other
    /// numbers than the CPU's).
    pub fn seeded(
        entry: &ModelEntry,
        classes: usize,
        dropout: f64,
        seed: u64,
        device: &Device,
    ) -> Self {
        let host = Device::flex();
        let (initial, model) = {
            // The seed and the draws it governs, with no other classifier drawing in between.
            let _drawing = lock_random_draws();
            host.seed(seed);
            let initial =
                crate::artifact::named_tensors(&Self::drawn(entry, classes, dropout, &host));
            (initial, Self::drawn(entry, classes, dropout, device))
        };
        crate::artifact::apply_named_tensors(model, initial, std::path::Path::new("<seeded>"))
            .expect("two classifiers of one entry have the same tensors")
    }

    /// Pooled features `[batch, channels]` of pixel batches `[batch, 3, h, w]` in 0..=255.
    pub fn pooled_features(&self, pixels: Tensor<4>, normalization: &Normalization) -> Tensor<2> {
        lanner_models::global_average_pool(self.backbone.forward(normalization.apply(pixels)))
    }

    /// Logits of pooled features, with an optional dropout mask (training).
    pub fn logits(&self, pooled: Tensor<2>, dropout_mask: Option<Tensor<2>>) -> Tensor<2> {
        let pooled = match dropout_mask {
            Some(mask) => pooled * mask,
            None => pooled,
        };
        self.head.classifier.forward(pooled)
    }

    /// The backbone prepared for repeated inference on `device` (folded once on the CPU);
    /// pass it to [`Classifier::predict`].
    pub fn inference_backbone(&self, device: &Device) -> FrozenPrefix {
        FrozenPrefix::whole(&self.backbone, device)
    }

    /// This model and its backbone prepared for inference in `precision`: in f32 as
    /// [`Classifier::inference_backbone`]; bf16 on a CPU with AMX tiles
    /// ([`lanner_models::frozen::cpu_bf16`]), the folded backbone's convolutions on them and
    /// the head in f32; below f32 elsewhere (a CPU without AMX too, slowly), the backbone as
    /// burn modules and the model (the head) cast to it, as a GPU runs them.
    pub fn for_inference(self, device: &Device, precision: Precision) -> (Self, FrozenPrefix) {
        if precision.is_f32() {
            let backbone = self.inference_backbone(device);
            return (self, backbone);
        }
        let amx = lanner_models::frozen::cpu_bf16();
        if let (Precision::Bf16, Some(unit)) = (precision, amx)
            && lanner_models::frozen::is_cpu(device)
        {
            let backbone = FrozenPrefix::whole_in_bf16(&self.backbone, unit);
            return (self, backbone);
        }
        let units = self.backbone.unit_count();
        let backbone = FrozenPrefix::with_modules(&self.backbone, units, precision);
        (cast_floats(self, precision.dtype()), backbone)
    }

    /// Inference: the f32 logits of pixel batches, through `backbone` (this model's
    /// [`Classifier::inference_backbone`] or [`Classifier::for_inference`]).
    pub fn predict(
        &self,
        backbone: &FrozenPrefix,
        pixels: Tensor<4>,
        normalization: &Normalization,
    ) -> Tensor<2> {
        in_dtype(
            self.logits(backbone.pooled(pixels, normalization), None),
            DType::F32,
        )
    }
}

/// Keras' `Dropout(rate)` mask for one training step: each unit kept with probability
/// `1 - rate` and scaled by `1 / (1 - rate)`. Drawn from (seed, epoch, step) so a run resumed
/// mid-epoch draws the same masks as an uninterrupted one.
pub fn dropout_mask(
    rate: f64,
    shape: [usize; 2],
    seed: u64,
    epoch: u64,
    step: u64,
    device: &Device,
) -> Option<Tensor<2>> {
    dropout_mask_rows(rate, shape, 0..shape[0], (seed, epoch, step), device)
}

/// Rows `rows` of [`dropout_mask`]'s mask of `shape`: one replica's share of a data-parallel
/// step draws the same mask rows as one device drawing the whole batch's.
pub fn dropout_mask_rows(
    rate: f64,
    shape: [usize; 2],
    rows: std::ops::Range<usize>,
    (seed, epoch, step): (u64, u64, u64),
    device: &Device,
) -> Option<Tensor<2>> {
    if rate <= 0.0 {
        return None;
    }
    // A stream of its own, apart from the loader's shuffles and augmentations.
    let mut rng = SplitMix64::for_stream(seed ^ 0x6472_6f70_6f75_7400, epoch, step);
    let keep = (1.0 - rate) as f32;
    let scale = 1.0 / keep;
    let values: Vec<f32> = (0..rows.end * shape[1])
        .map(|_| if rng.next_f32() < keep { scale } else { 0.0 })
        .skip(rows.start * shape[1])
        .collect();
    Some(Tensor::from_data(
        TensorData::new(values, [rows.len(), shape[1]]),
        device,
    ))
}

/// The seed's loss with Keras' `class_weight`: per-sample cross-entropy from logits (binary
/// for one logit, softmax for K), times its class's weight, summed and divided by the batch
/// size (Keras' `sum_over_batch_size`).
pub fn weighted_loss(
    logits: Tensor<2>,
    labels: &[usize],
    class_weights: &[f64],
    device: &Device,
) -> Tensor<1> {
    let [batch, outputs] = logits.dims();
    let weights: Vec<f32> = labels.iter().map(|&l| class_weights[l] as f32).collect();
    let weights = Tensor::<2>::from_data(TensorData::new(weights, [batch, 1]), device);
    let per_sample = if outputs == 1 {
        let targets: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
        let targets = Tensor::<2>::from_data(TensorData::new(targets, [batch, 1]), device);
        // max(x, 0) - x·y + ln(1 + e^-|x|): stable for any logit.
        relu(logits.clone()) - logits.clone() * targets + logits.abs().neg().exp().log1p()
    } else {
        let mut one_hot = vec![0.0f32; batch * outputs];
        for (row, &label) in labels.iter().enumerate() {
            one_hot[row * outputs + label] = 1.0;
        }
        let one_hot = Tensor::<2>::from_data(TensorData::new(one_hot, [batch, outputs]), device);
        (log_softmax(logits, 1) * one_hot).sum_dim(1).neg()
    };
    (per_sample * weights).sum().div_scalar(batch as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_loss_is_class_weighted_cross_entropy() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_floats([[2.0], [-1.0], [0.0]], &device);
        let loss: f32 = weighted_loss(logits, &[1, 1, 0], &[0.5, 3.0], &device).into_scalar();
        let bce = |x: f64, y: f64| x.max(0.0) - x * y + (-x.abs()).exp().ln_1p();
        let want = (3.0 * bce(2.0, 1.0) + 3.0 * bce(-1.0, 1.0) + 0.5 * bce(0.0, 0.0)) / 3.0;
        assert!((loss as f64 - want).abs() < 1e-6, "{loss} vs {want}");
    }

    #[test]
    fn softmax_loss_for_more_classes() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_floats([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]], &device);
        let loss: f32 = weighted_loss(logits, &[1, 0], &[1.0, 2.0, 1.0], &device).into_scalar();
        let ce = |row: [f64; 3], label: usize| {
            row.iter().map(|x| x.exp()).sum::<f64>().ln() - row[label]
        };
        // Class 1 weighs 2.
        let want = (2.0 * ce([1.0, 2.0, 0.5], 1) + ce([0.0, 0.0, 3.0], 0)) / 2.0;
        assert!((loss as f64 - want).abs() < 1e-6, "{loss} vs {want}");
    }

    #[test]
    fn dropout_masks_keep_the_expected_share_and_repeat() {
        let device = Device::flex();
        let mask = |step| {
            dropout_mask(0.25, [64, 50], 7, 3, step, &device)
                .unwrap()
                .into_data()
                .try_into_vec::<f32>()
                .unwrap()
        };
        let first = mask(0);
        assert_eq!(first, mask(0));
        assert_ne!(first, mask(1));
        let kept = first.iter().filter(|v| **v > 0.0).count() as f64 / first.len() as f64;
        assert!((kept - 0.75).abs() < 0.03, "{kept}");
        assert!(
            first
                .iter()
                .all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6)
        );
        assert!(dropout_mask(0.0, [2, 2], 7, 3, 0, &device).is_none());
    }
}
