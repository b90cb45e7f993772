//! [`Backbone`]: any architecture of the registry, behind one type the training and serving
//! code can hold.

use burn::module::Module;
use burn::store::ModuleSnapshot;
use burn::tensor::Tensor;

use crate::batch_norm::is_running_statistic;
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
