//! Xception's layers, as timm's `legacy_xception` (`timm/models/xception.py`) lays them out —
//! same field names, so the same tensor names: `SeparableConv2d` (`conv1` depthwise,
//! `pointwise`) and `Block` (`skip`, `skipbn`, `rep.N`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Initializer, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor};

use crate::activation::Activation;
use crate::batch_norm::{BatchNorm2d, BatchNorm2dConfig};
use crate::fused;

/// A square convolution without bias, with explicit symmetric `padding` (timm's Xception
/// passes PyTorch paddings, not timm's `create_conv2d`), initialised as timm's `Xception`
/// does: `kaiming_normal_(mode='fan_out', nonlinearity='relu')`, i.e. normal with std
/// `sqrt(2 / fan_out)` where PyTorch's `fan_out = out · k · k` is *not* divided by `groups`.
pub(crate) fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    groups: usize,
    device: &Device,
) -> Conv2d {
    Conv2dConfig::new([in_channels, out_channels], [kernel, kernel])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_bias(false)
        // burn's fan-out is `out · k · k / groups`; the gain sqrt(2 / groups) gives PyTorch's std.
        .with_initializer(Initializer::KaimingNormal {
            gain: (2.0 / groups as f64).sqrt(),
            fan_out_only: true,
        })
        .init(device)
}

pub(crate) fn batch_norm(channels: usize, frozen: bool, device: &Device) -> BatchNorm2d {
    // PyTorch's default epsilon 1e-5, as timm's port keeps it (Keras' Xception uses 1e-3).
    BatchNorm2dConfig::new(channels)
        .with_frozen_statistics(frozen)
        .init(device)
}

/// Configuration of a [`SeparableConv2d`].
#[derive(Config, Debug)]
pub struct SeparableConv2dConfig {
    /// Input channels (also the depthwise convolution's).
    pub in_channels: usize,
    /// Output channels of the pointwise convolution.
    pub out_channels: usize,
    /// Depthwise kernel size.
    #[config(default = 3)]
    pub kernel: usize,
    /// Depthwise padding on every side.
    #[config(default = 1)]
    pub padding: usize,
}

impl SeparableConv2dConfig {
    /// Initialise the layer.
    pub fn init(&self, device: &Device) -> SeparableConv2d {
        let (cin, cout) = (self.in_channels, self.out_channels);
        SeparableConv2d {
            conv1: conv2d(cin, cin, self.kernel, 1, self.padding, cin, device),
            pointwise: conv2d(cin, cout, 1, 1, 0, 1, device),
        }
    }
}

/// Depthwise convolution then 1x1 pointwise convolution, no bias and nothing in between
/// (Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", 2017; Keras'
/// `SeparableConv2D`, timm's `SeparableConv2d`).
#[derive(Module, Debug)]
pub struct SeparableConv2d {
    /// Depthwise convolution (`groups == in_channels`).
    pub conv1: Conv2d,
    /// 1x1 pointwise convolution.
    pub pointwise: Conv2d,
}

impl SeparableConv2d {
    /// Apply the layer.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        crate::conv::forward(&self.pointwise, crate::conv::forward(&self.conv1, x))
    }
}

/// One entry of a block's `rep` sequence. Its variant adds no tensor-name segment when weights
/// are loaded (burn-store's `skip_enum_variants`), so a block's separable convolutions and
/// BatchNorms keep timm's positions (`block2.rep.1.conv1.weight`, `block2.rep.2.running_mean`);
/// ReLU and max-pool hold no tensors but take their index, as in timm's `nn.Sequential`.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum RepLayer {
    /// `nn.ReLU`.
    Relu(Relu),
    /// See [`SeparableConv2d`].
    SeparableConv(SeparableConv2d),
    /// BatchNorm after a separable convolution.
    BatchNorm(BatchNorm2d),
    /// `nn.MaxPool2d(3, stride, 1)` closing a strided block.
    MaxPool(MaxPool2d),
}

/// `pool` on `x`: on burn-flex as [`fused::max_pool`] (no indices kept for the backward pass),
/// elsewhere as burn's.
fn max_pool(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    match pool.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right)
            if top == bottom
                && left == right
                && pool.dilation == [1, 1]
                && !pool.ceil_mode
                && fused::pools_directly(&x.device()) =>
        {
            fused::max_pool(x, pool.kernel_size, pool.stride, [top, left])
        }
        _ => pool.forward(x),
    }
}

impl RepLayer {
    /// Apply the layer.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            RepLayer::Relu(relu) => relu.forward(x),
            RepLayer::SeparableConv(conv) => conv.forward(x),
            RepLayer::BatchNorm(bn) => bn.forward(x),
            RepLayer::MaxPool(pool) => max_pool(pool, x),
        }
    }

    fn map_batch_norm(self, f: &impl Fn(BatchNorm2d) -> BatchNorm2d) -> Self {
        match self {
            RepLayer::BatchNorm(bn) => RepLayer::BatchNorm(f(bn)),
            other => other,
        }
    }
}

/// Configuration of an [`XceptionBlock`]: timm's `Block(in, out, reps, strides,
/// start_with_relu, grow_first)`.
#[derive(Config, Debug)]
pub struct XceptionBlockConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Number of ReLU → separable convolution → BN repetitions.
    pub reps: usize,
    /// Stride of the closing max-pool and of the skip convolution; 1: no pool.
    #[config(default = 1)]
    pub stride: usize,
    /// Begin `rep` with a ReLU (every block but the first).
    #[config(default = true)]
    pub start_with_relu: bool,
    /// Change the channel count in the first separable convolution (else in the last).
    #[config(default = true)]
    pub grow_first: bool,
    /// See [`BatchNorm2dConfig::frozen_statistics`].
    #[config(default = false)]
    pub frozen_batch_norm: bool,
}

impl XceptionBlockConfig {
    /// Initialise the block.
    pub fn init(&self, device: &Device) -> XceptionBlock {
        let (cin, cout, frozen) = (self.in_channels, self.out_channels, self.frozen_batch_norm);
        let projected = cout != cin || self.stride != 1;
        let mut rep = Vec::with_capacity(3 * self.reps + 1);
        for i in 0..self.reps {
            let (inc, outc) = if self.grow_first {
                (if i == 0 { cin } else { cout }, cout)
            } else {
                (cin, if i + 1 < self.reps { cin } else { cout })
            };
            if i > 0 || self.start_with_relu {
                rep.push(RepLayer::Relu(Relu::new()));
            }
            rep.push(RepLayer::SeparableConv(
                SeparableConv2dConfig::new(inc, outc).init(device),
            ));
            rep.push(RepLayer::BatchNorm(batch_norm(outc, frozen, device)));
        }
        if self.stride != 1 {
            rep.push(RepLayer::MaxPool(
                MaxPool2dConfig::new([3, 3])
                    .with_strides([self.stride, self.stride])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(),
            ));
        }
        XceptionBlock {
            skip: projected.then(|| conv2d(cin, cout, 1, self.stride, 0, 1, device)),
            skipbn: projected.then(|| batch_norm(cout, frozen, device)),
            rep,
        }
    }
}

/// Xception's residual module: `rep` — (ReLU → separable 3x3 → BN) × reps, then a 3x3
/// stride-2 max-pool when the block strides — plus a shortcut, a strided 1x1 convolution + BN
/// where the shape changes and the identity elsewhere.
///
/// The shortcut takes the block's input *before* `rep`'s leading ReLU (timm's first ReLU is
/// the one not in place), as Keras' Xception adds the un-activated residual.
#[derive(Module, Debug)]
pub struct XceptionBlock {
    /// 1x1 shortcut convolution where channels or resolution change.
    pub skip: Option<Conv2d>,
    /// BatchNorm after `skip`.
    pub skipbn: Option<BatchNorm2d>,
    /// The residual branch; `rep[i]` is timm's `rep.i`.
    pub rep: Vec<RepLayer>,
}

impl XceptionBlock {
    /// Apply the block.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        let mut layers = self.rep.iter().peekable();
        while let Some(layer) = layers.next() {
            x = match (layer, layers.peek()) {
                // BatchNorm and the ReLU after it (the next repetition's) as one operation.
                (RepLayer::BatchNorm(bn), Some(RepLayer::Relu(_))) => {
                    layers.next();
                    bn.forward_activated(x, Activation::Relu)
                }
                _ => layer.forward(x),
            };
        }
        let shortcut = match (&self.skip, &self.skipbn) {
            (Some(skip), Some(bn)) => bn.forward(crate::conv::forward(skip, input)),
            (Some(skip), None) => crate::conv::forward(skip, input),
            (None, _) => input,
        };
        x + shortcut
    }

    /// The same block with `f` applied to each of its BatchNorms.
    pub(crate) fn map_batch_norms(self, f: &impl Fn(BatchNorm2d) -> BatchNorm2d) -> Self {
        XceptionBlock {
            skip: self.skip,
            skipbn: self.skipbn.map(f),
            rep: self
                .rep
                .into_iter()
                .map(|layer| layer.map_batch_norm(f))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std(conv: &Conv2d) -> f64 {
        let w = conv.weight.val();
        let n = w.shape().num_elements() as f64;
        (w.powi_scalar(2).sum().into_scalar::<f32>() as f64 / n).sqrt()
    }

    /// PyTorch's `kaiming_normal_(mode='fan_out')` ignores groups: a depthwise 3x3 over 728
    /// channels has std sqrt(2 / (728 · 9)), not sqrt(2 / 9).
    #[test]
    fn initialises_like_timm_xception() {
        let device = Device::flex();
        let sep = SeparableConv2dConfig::new(728, 728).init(&device);
        let depthwise = (2.0 / (728.0 * 9.0f64)).sqrt();
        let pointwise = (2.0 / 728.0f64).sqrt();
        assert!(
            (std(&sep.conv1) / depthwise - 1.0).abs() < 0.05,
            "{}",
            std(&sep.conv1)
        );
        assert!((std(&sep.pointwise) / pointwise - 1.0).abs() < 0.02);
        assert!(sep.conv1.bias.is_none() && sep.pointwise.bias.is_none());
    }

    /// timm's `Block(728, 1024, 2, 2, grow_first=False)`: ReLU, sep 728→728, BN, ReLU,
    /// sep 728→1024, BN, max-pool — and a projecting shortcut.
    #[test]
    fn lays_out_rep_like_timm() {
        let device = Device::flex();
        let block = XceptionBlockConfig::new(728, 1024, 2)
            .with_stride(2)
            .with_grow_first(false)
            .init(&device);
        let kinds: Vec<&str> = block
            .rep
            .iter()
            .map(|layer| match layer {
                RepLayer::Relu(_) => "relu",
                RepLayer::SeparableConv(_) => "sep",
                RepLayer::BatchNorm(_) => "bn",
                RepLayer::MaxPool(_) => "pool",
            })
            .collect();
        assert_eq!(kinds, ["relu", "sep", "bn", "relu", "sep", "bn", "pool"]);
        assert!(block.skip.is_some() && block.skipbn.is_some());
        let first = XceptionBlockConfig::new(64, 128, 2)
            .with_stride(2)
            .with_start_with_relu(false)
            .init(&device);
        assert!(matches!(first.rep[0], RepLayer::SeparableConv(_)));
        let middle = XceptionBlockConfig::new(728, 728, 3).init(&device);
        assert_eq!(middle.rep.len(), 9);
        assert!(middle.skip.is_none());
    }
}
