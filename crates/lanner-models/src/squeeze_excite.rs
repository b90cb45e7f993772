//! Squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation Networks", 2018) as
//! MobileNetV3 uses it: ReLU inside, a hard-sigmoid gate (timm's `SqueezeExcite` with
//! `gate_layer='hard_sigmoid'`, `force_act_layer=nn.ReLU`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::activation::hard_sigmoid;
use crate::channels::make_divisible;
use crate::conv::conv1x1_with_bias;

/// Configuration of a [`SqueezeExcite`] block.
#[derive(Config, Debug)]
pub struct SqueezeExciteConfig {
    /// Channels of the gated feature map (the block's expanded channels: timm's
    /// `se_from_exp=True` for MobileNetV3).
    pub channels: usize,
    /// Reduced channels are `make_divisible(channels · ratio, 8)`.
    #[config(default = 0.25)]
    pub ratio: f64,
}

impl SqueezeExciteConfig {
    /// Channels of the bottleneck between `conv_reduce` and `conv_expand`.
    pub fn reduced_channels(&self) -> usize {
        make_divisible(self.channels as f64 * self.ratio, 8)
    }

    /// Initialise the block.
    pub fn init(&self, device: &Device) -> SqueezeExcite {
        let reduced = self.reduced_channels();
        SqueezeExcite {
            conv_reduce: conv1x1_with_bias(self.channels, reduced, device),
            conv_expand: conv1x1_with_bias(reduced, self.channels, device),
        }
    }
}

/// Global average pool → 1x1 conv down → ReLU → 1x1 conv up → hard sigmoid, which scales
/// each channel of the input.
#[derive(Module, Debug)]
pub struct SqueezeExcite {
    /// 1x1 convolution to the reduced channels.
    pub conv_reduce: Conv2d,
    /// 1x1 convolution back to the input channels.
    pub conv_expand: Conv2d,
}

impl SqueezeExcite {
    /// Gate the channels of `x`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let squeezed = crate::head::spatial_mean(x.clone());
        let reduced = relu(crate::conv::forward(&self.conv_reduce, squeezed));
        let gate = crate::conv::forward(&self.conv_expand, reduced);
        x * hard_sigmoid(gate)
    }
}
