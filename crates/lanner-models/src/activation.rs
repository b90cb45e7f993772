//! The activations MobileNetV3 uses, with PyTorch's constants (timm's weights were trained
//! with them; burn's `nn::HardSigmoid` defaults to ONNX's slope 0.2 instead).

use burn::config::Config;
use burn::tensor::Tensor;
use burn::tensor::activation;

/// A block's non-linearity.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// `x · relu6(x + 3) / 6` (Howard et al., "Searching for MobileNetV3", 2019).
    HardSwish,
}

impl Activation {
    /// Apply the activation element-wise.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Relu => activation::relu(x),
            Activation::HardSwish if crate::fused::available(&x.device()) => {
                crate::fused::hard_swish(x)
            }
            Activation::HardSwish => activation::hard_swish(x),
        }
    }
}

/// PyTorch's `hardsigmoid`: `relu6(x + 3) / 6`, the squeeze-excitation gate of MobileNetV3.
pub fn hard_sigmoid<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if crate::fused::available(&x.device()) {
        return crate::fused::hard_sigmoid(x);
    }
    activation::hard_sigmoid(x, 1.0 / 6.0, 0.5)
}
