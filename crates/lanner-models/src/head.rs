//! The classifier the seed puts on its backbone: global average pooling, dropout, one dense
//! layer to 1 logit (binary) or K logits (multi-class).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

/// Configuration of a [`ClassifierHead`].
#[derive(Config, Debug)]
pub struct ClassifierHeadConfig {
    /// Channels of the backbone's feature map.
    pub in_features: usize,
    /// 1 for a binary classifier (one logit), K for K classes.
    pub outputs: usize,
    /// Dropout rate before the dense layer (the seed's `drop-out-percentage`).
    #[config(default = 0.1)]
    pub dropout: f64,
}

impl ClassifierHeadConfig {
    /// Initialise the head as Keras initialises a `Dense` layer: Glorot-uniform weights, zero
    /// bias.
    pub fn init(&self, device: &Device) -> ClassifierHead {
        let mut classifier = LinearConfig::new(self.in_features, self.outputs)
            .with_initializer(Initializer::XavierUniform { gain: 1.0 })
            .init(device);
        classifier.bias = Some(Initializer::Zeros.init([self.outputs], device));
        ClassifierHead {
            dropout: DropoutConfig::new(self.dropout).init(),
            classifier,
        }
    }
}

/// Global average pooling → dropout → linear.
#[derive(Module, Debug)]
pub struct ClassifierHead {
    /// Active only while training on an autodiff device.
    pub dropout: Dropout,
    /// The dense layer to the logits.
    pub classifier: Linear,
}

impl ClassifierHead {
    /// Logits `[batch, outputs]` of a feature map `[batch, channels, height, width]`.
    pub fn forward(&self, features: Tensor<4>) -> Tensor<2> {
        self.classifier
            .forward(self.dropout.forward(global_average_pool(features)))
    }
}

/// The mean over height and width: `[batch, channels, height, width]` → `[batch, channels]`
/// (Keras' `GlobalAveragePooling2D`).
pub fn global_average_pool(features: Tensor<4>) -> Tensor<2> {
    let [batch, channels, _, _] = features.dims();
    spatial_mean(features).reshape([batch, channels])
}

/// The mean over height and width, kept as size 1: one operation each way where the fused
/// layers run ([`crate::fused::global_average_pool`]).
pub(crate) fn spatial_mean(features: Tensor<4>) -> Tensor<4> {
    if crate::fused::available(&features.device()) {
        crate::fused::global_average_pool(features)
    } else {
        features.mean_dims(&[2, 3])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_then_maps_to_logits() {
        let device = Device::flex();
        let head = ClassifierHeadConfig::new(4, 1).init(&device);
        assert_eq!(head.classifier.weight.dims(), [4, 1]);
        let features = Tensor::<1>::from_floats([1.0, 3.0, 2.0, 4.0], &device)
            .reshape([1, 1, 2, 2])
            .repeat_dim(1, 4);
        let pooled: Vec<f32> = global_average_pool(features.clone())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(pooled, vec![2.5; 4]);
        // Off an autodiff device dropout is the identity, so the logit is w·pooled + b.
        let logit: Vec<f32> = head
            .forward(features)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let weight: Vec<f32> = head
            .classifier
            .weight
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let expected: f32 = weight.iter().map(|w| w * 2.5).sum();
        assert!((logit[0] - expected).abs() < 1e-5);
    }
}
