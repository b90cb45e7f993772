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
