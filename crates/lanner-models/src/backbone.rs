//! [`Backbone`]: any architecture of the registry, behind one type the training and serving
//! code can hold.

use burn::module::Module;
use burn::store::ModuleSnapshot;
use burn::tensor::Tensor;

use crate::batch_norm::{BatchNorm2d, is_running_statistic};
use crate::mobilenet_v3::MobileNetV3;
use crate::xception::Xception;

/// A feature extractor: normalised images in, a feature map out.
#[derive(Module, Debug)]
// One backbone per model; the size difference of its variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Backbone {
    /// See [`MobileNetV3`].
    MobileNetV3(MobileNetV3),
    /// See [`Xception`].
    Xception(Xception),
}

impl Backbone {
    /// The feature map `[batch, channels, height / 32, width / 32]` of normalised images
    /// `[batch, 3, height, width]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        match self {
            Backbone::MobileNetV3(model) => model.forward(images),
            Backbone::Xception(model) => model.forward(images),
        }
    }

    /// How many units the backbone splits into: the pieces [`Backbone::forward_units`] runs and
    /// [`crate::folded::FoldedBackbone`] folds. MobileNetV3: the stem, then each block;
    /// Xception: `conv1`, `conv2`, `block1`..`block12`, `conv3`, `conv4`.
    pub fn unit_count(&self) -> usize {
        match self {
            Backbone::MobileNetV3(model) => 1 + model.blocks.iter().map(Vec::len).sum::<usize>(),
            Backbone::Xception(_) => crate::xception::UNITS,
        }
    }

    /// The unit that holds the tensor named `name` (timm's name), if it is this backbone's.
    pub fn unit_of(&self, name: &str) -> Option<usize> {
        let mut parts = name.split('.');
        let first = parts.next()?;
        match self {
            Backbone::MobileNetV3(model) => match first {
                "conv_stem" | "bn1" => Some(0),
                "blocks" => {
                    let stage: usize = parts.next()?.parse().ok()?;
                    let block: usize = parts.next()?.parse().ok()?;
                    let before: usize = model.blocks.get(..stage)?.iter().map(Vec::len).sum();
                    (block < model.blocks.get(stage)?.len()).then_some(1 + before + block)
                }
                _ => None,
            },
            Backbone::Xception(_) => crate::xception::unit_of(first),
        }
    }

    /// Apply units `units` (a range of unit indices) to `x`, the output of the unit before
    /// (normalised images for unit 0).
    pub fn forward_units(&self, x: Tensor<4>, units: std::ops::Range<usize>) -> Tensor<4> {
        match self {
            Backbone::MobileNetV3(model) => model.forward_units(x, units),
            Backbone::Xception(model) => model.forward_units(x, units),
        }
    }

    /// The same backbone with every BatchNorm's statistics frozen (or not): the seed's
    /// `training=False`.
    pub fn with_frozen_batch_norm(self, frozen: bool) -> Self {
        match self {
            Backbone::MobileNetV3(model) => {
                Backbone::MobileNetV3(model.with_frozen_batch_norm(frozen))
            }
            Backbone::Xception(model) => Backbone::Xception(model.with_frozen_batch_norm(frozen)),
        }
    }

    /// The same backbone with every BatchNorm's epsilon set to `epsilon`. timm's models (and
    /// PyTorch's layer) use 1e-5; Keras' applications and torchvision's MobileNetV3 use 1e-3.
    /// Weights reproduce their outputs only with the epsilon they were trained with.
    pub fn with_batch_norm_epsilon(self, epsilon: f64) -> Self {
        self.map_batch_norms(&|mut bn: BatchNorm2d| {
            bn.epsilon = epsilon;
            bn
        })
    }

    /// The same backbone with `f` applied to each of its BatchNorms.
    pub(crate) fn map_batch_norms(self, f: &impl Fn(BatchNorm2d) -> BatchNorm2d) -> Self {
        match self {
            Backbone::MobileNetV3(model) => Backbone::MobileNetV3(model.map_batch_norms(f)),
            Backbone::Xception(model) => Backbone::Xception(model.map_batch_norms(f)),
        }
    }

    /// The epsilon its BatchNorms add to the variance (all share it).
    pub fn batch_norm_epsilon(&self) -> f64 {
        match self {
            Backbone::MobileNetV3(model) => model.bn1.epsilon,
            Backbone::Xception(model) => model.bn1.epsilon,
        }
    }

    /// Trainable parameters, counted as timm counts them: BatchNorm running statistics are
    /// left out (burn's `num_params` includes them).
    pub fn parameter_count(&self) -> usize {
        self.collect(None, None, true)
            .iter()
            .filter(|t| !is_running_statistic(&t.name))
            .map(|t| t.shape.num_elements())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use burn::tensor::Device;

    use super::*;

    #[test]
    fn the_batch_norm_epsilon_reaches_every_batch_norm() {
        for name in ["mobilenet_v3_small_050", "xception"] {
            let backbone = crate::find(name)
                .unwrap()
                .init_backbone(&Device::flex())
                .with_batch_norm_epsilon(1e-3);
            assert_eq!(backbone.batch_norm_epsilon(), 1e-3, "{name}");
            let layers = backbone
                .collect(None, None, true)
                .iter()
                .filter(|t| t.name.ends_with(".running_var"))
                .count();
            let seen = RefCell::new(Vec::new());
            let record = |bn: BatchNorm2d| {
                seen.borrow_mut().push(bn.epsilon);
                bn
            };
            drop(backbone.map_batch_norms(&record));
            let seen = seen.into_inner();
            assert_eq!(seen.len(), layers, "{name}: one epsilon per BatchNorm");
            assert!(seen.iter().all(|&e| e == 1e-3), "{name}: {seen:?}");
        }
    }
}
