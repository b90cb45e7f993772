//! Convolutions as timm's `create_conv2d` builds them for MobileNetV3: symmetric padding
//! `((stride - 1) + (kernel - 1)) / 2`, no bias, and timm's TensorFlow-style initialisation.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor};

/// `conv.forward(x)`. When training on a device where the fused layers run
/// ([`crate::fused`]), its gradients come from one backward operation, as in PyTorch, where
/// burn's autodiff makes one call per gradient.
pub fn forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let device = x.device();
    match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right)
            if device.is_autodiff() && crate::fused::available(&device) =>
        {
            let padding = [(top, bottom), (left, right)];
            let options =
                ConvOptions::new_with_padding(conv.stride, padding, conv.dilation, conv.groups);
            let bias = conv.bias.as_ref().map(|bias| bias.val());
            crate::fused::conv2d(x, conv.weight.val(), bias, options)
        }
        _ => conv.forward(x),
    }
}

/// A square convolution without bias; `groups == in_channels == out_channels` makes it
/// depthwise.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    device: &Device,
) -> Conv2d {
    config(in_channels, out_channels, kernel, stride, groups)
        .with_bias(false)
        .init(device)
}

/// A 1x1 convolution with a bias initialised to zero (squeeze-excitation's layers).
pub fn conv1x1_with_bias(in_channels: usize, out_channels: usize, device: &Device) -> Conv2d {
    let mut conv = config(in_channels, out_channels, 1, 1, 1).init(device);
    conv.bias = Some(Initializer::Zeros.init([out_channels], device));
    conv
}

fn config(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
) -> Conv2dConfig {
    let pad = ((stride - 1) + (kernel - 1)) / 2;
    Conv2dConfig::new([in_channels, out_channels], [kernel, kernel])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        // timm's `_init_weight_goog`: normal(0, sqrt(2 / fan_out)), fan_out = k·k·out / groups,
        // which is burn's Kaiming normal on fan-out with gain sqrt(2).
        .with_initializer(Initializer::KaimingNormal {
            gain: std::f64::consts::SQRT_2,
            fan_out_only: true,
        })
}
