//! [`Backbone`]: any architecture of the registry, behind one type the training and serving
//! code can hold.

use burn::module::Module;
use burn::tensor::Tensor;

use crate::mobilenet_v3::MobileNetV3;

/// A feature extractor: normalised images in, a feature map out.
#[derive(Module, Debug)]
pub enum Backbone {
    /// See [`MobileNetV3`].
    MobileNetV3(MobileNetV3),
}

impl Backbone {
    /// The feature map `[batch, channels, height / 32, width / 32]` of normalised images
    /// `[batch, 3, height, width]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        match self {
            Backbone::MobileNetV3(model) => model.forward(images),
        }
    }

    /// The same backbone with every BatchNorm's statistics frozen (or not): the seed's
    /// `training=False`.
    pub fn with_frozen_batch_norm(self, frozen: bool) -> Self {
        match self {
            Backbone::MobileNetV3(model) => {
                Backbone::MobileNetV3(model.with_frozen_batch_norm(frozen))
            }
        }
    }
}
