//! MobileNetV3's blocks, as timm's `_efficientnet_blocks` lays them out (same field names,
//! so the same tensor names): `DepthwiseSeparableConv`, `InvertedResidual`, `ConvBnAct`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};

use crate::activation::Activation;
use crate::batch_norm::{BatchNorm2d, BatchNorm2dConfig};
use crate::channels::make_divisible;
use crate::conv::conv2d;
use crate::squeeze_excite::{SqueezeExcite, SqueezeExciteConfig};

fn batch_norm(channels: usize, frozen: bool, device: &Device) -> BatchNorm2d {
    BatchNorm2dConfig::new(channels)
        .with_frozen_statistics(frozen)
        .init(device)
}

/// Configuration of a [`DepthwiseSeparable`] block.
#[derive(Config, Debug)]
pub struct DepthwiseSeparableConfig {
    /// Input channels (also the depthwise convolution's).
    pub in_channels: usize,
    /// Output channels of the pointwise convolution.
    pub out_channels: usize,
    /// Depthwise kernel size.
    #[config(default = 3)]
    pub kernel: usize,
    /// Depthwise stride.
    #[config(default = 1)]
    pub stride: usize,
    /// Squeeze-excitation after the depthwise convolution.
    #[config(default = false)]
    pub squeeze_excite: bool,
    /// Activation after the depthwise convolution.
    #[config(default = "Activation::Relu")]
    pub activation: Activation,
    /// See [`BatchNorm2dConfig::frozen_statistics`].
    #[config(default = false)]
    pub frozen_batch_norm: bool,
}

/// Depthwise 3x3 → BN → activation → squeeze-excitation → pointwise 1x1 → BN, with a residual
/// connection when the shape allows (Howard et al., "MobileNets", 2017; timm's
/// `DepthwiseSeparableConv` without a pointwise activation).
#[derive(Module, Debug)]
pub struct DepthwiseSeparable {
    /// Depthwise convolution.
    pub conv_dw: Conv2d,
    /// BatchNorm after `conv_dw`.
    pub bn1: BatchNorm2d,
    /// Optional squeeze-excitation.
    pub se: Option<SqueezeExcite>,
    /// Pointwise convolution.
    pub conv_pw: Conv2d,
    /// BatchNorm after `conv_pw` (no activation).
    pub bn2: BatchNorm2d,
    /// Activation after `bn1`.
    #[module(skip)]
    pub activation: Activation,
    /// Add the input to the output (stride 1 and same channels).
    pub has_skip: bool,
}

impl DepthwiseSeparableConfig {
    /// Initialise the block.
    pub fn init(&self, device: &Device) -> DepthwiseSeparable {
        let (cin, cout) = (self.in_channels, self.out_channels);
        DepthwiseSeparable {
            conv_dw: conv2d(cin, cin, self.kernel, self.stride, cin, device),
            bn1: batch_norm(cin, self.frozen_batch_norm, device),
            se: self
                .squeeze_excite
                .then(|| SqueezeExciteConfig::new(cin).init(device)),
            conv_pw: conv2d(cin, cout, 1, 1, 1, device),
            bn2: batch_norm(cout, self.frozen_batch_norm, device),
            activation: self.activation,
            has_skip: self.stride == 1 && cin == cout,
        }
    }
}

impl DepthwiseSeparable {
    /// Apply the block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = self.has_skip.then(|| x.clone());
        let x = self
            .bn1
            .forward_activated(crate::conv::forward(&self.conv_dw, x), self.activation);
        let x = match &self.se {
            Some(se) => se.forward(x),
            None => x,
        };
        let x = self.bn2.forward(crate::conv::forward(&self.conv_pw, x));
        match shortcut {
            Some(shortcut) => x + shortcut,
            None => x,
        }
    }

    fn map_batch_norms(mut self, f: &impl Fn(BatchNorm2d) -> BatchNorm2d) -> Self {
        self.bn1 = f(self.bn1);
        self.bn2 = f(self.bn2);
        self
    }
}

/// Configuration of an [`InvertedResidual`] block.
#[derive(Config, Debug)]
pub struct InvertedResidualConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Depthwise kernel size.
    #[config(default = 3)]
    pub kernel: usize,
    /// Depthwise stride.
    #[config(default = 1)]
    pub stride: usize,
    /// Expanded channels are `make_divisible(in_channels · expansion, 8)`.
    #[config(default = 1.0)]
    pub expansion: f64,
    /// Squeeze-excitation on the expanded channels.
    #[config(default = false)]
    pub squeeze_excite: bool,
    /// Activation after the expansion and the depthwise convolution.
    #[config(default = "Activation::Relu")]
    pub activation: Activation,
    /// See [`BatchNorm2dConfig::frozen_statistics`].
    #[config(default = false)]
    pub frozen_batch_norm: bool,
}

impl InvertedResidualConfig {
    /// Channels between the expansion and the projection.
    pub fn expanded_channels(&self) -> usize {
        make_divisible(self.in_channels as f64 * self.expansion, 8)
    }

    /// Initialise the block.
    pub fn init(&self, device: &Device) -> InvertedResidual {
        let (cin, cout, mid) = (
            self.in_channels,
            self.out_channels,
            self.expanded_channels(),
        );
        InvertedResidual {
            conv_pw: conv2d(cin, mid, 1, 1, 1, device),
            bn1: batch_norm(mid, self.frozen_batch_norm, device),
            conv_dw: conv2d(mid, mid, self.kernel, self.stride, mid, device),
            bn2: batch_norm(mid, self.frozen_batch_norm, device),
            se: self
                .squeeze_excite
                .then(|| SqueezeExciteConfig::new(mid).init(device)),
            conv_pwl: conv2d(mid, cout, 1, 1, 1, device),
            bn3: batch_norm(cout, self.frozen_batch_norm, device),
            activation: self.activation,
            has_skip: self.stride == 1 && cin == cout,
        }
    }
}

/// Expand 1x1 → BN → act → depthwise → BN → act → squeeze-excitation → project 1x1 → BN, with
/// a residual connection when the shape allows (Sandler et al., "MobileNetV2", 2018; with
/// squeeze-excitation and hard-swish from Howard et al., "Searching for MobileNetV3", 2019).
#[derive(Module, Debug)]
pub struct InvertedResidual {
    /// 1x1 expansion.
    pub conv_pw: Conv2d,
    /// BatchNorm after `conv_pw`.
    pub bn1: BatchNorm2d,
    /// Depthwise convolution.
    pub conv_dw: Conv2d,
    /// BatchNorm after `conv_dw`.
    pub bn2: BatchNorm2d,
    /// Optional squeeze-excitation.
    pub se: Option<SqueezeExcite>,
    /// 1x1 linear projection.
    pub conv_pwl: Conv2d,
    /// BatchNorm after `conv_pwl` (no activation).
    pub bn3: BatchNorm2d,
    /// Activation after `bn1` and `bn2`.
    #[module(skip)]
    pub activation: Activation,
    /// Add the input to the output (stride 1 and same channels).
    pub has_skip: bool,
}

impl InvertedResidual {
    /// Apply the block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = self.has_skip.then(|| x.clone());
        let x = self
            .bn1
            .forward_activated(crate::conv::forward(&self.conv_pw, x), self.activation);
        let x = self
            .bn2
            .forward_activated(crate::conv::forward(&self.conv_dw, x), self.activation);
        let x = match &self.se {
            Some(se) => se.forward(x),
            None => x,
        };
        let x = self.bn3.forward(crate::conv::forward(&self.conv_pwl, x));
        match shortcut {
            Some(shortcut) => x + shortcut,
            None => x,
        }
    }

    fn map_batch_norms(mut self, f: &impl Fn(BatchNorm2d) -> BatchNorm2d) -> Self {
        self.bn1 = f(self.bn1);
        self.bn2 = f(self.bn2);
        self.bn3 = f(self.bn3);
        self
    }
}

/// Configuration of a [`ConvBnAct`] block.
#[derive(Config, Debug)]
pub struct ConvBnActConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel size.
    #[config(default = 1)]
    pub kernel: usize,
    /// Activation after the BatchNorm.
    #[config(default = "Activation::HardSwish")]
    pub activation: Activation,
    /// See [`BatchNorm2dConfig::frozen_statistics`].
    #[config(default = false)]
    pub frozen_batch_norm: bool,
}

impl ConvBnActConfig {
    /// Initialise the block.
    pub fn init(&self, device: &Device) -> ConvBnAct {
        ConvBnAct {
            conv: conv2d(
                self.in_channels,
                self.out_channels,
                self.kernel,
                1,
                1,
                device,
            ),
            bn1: batch_norm(self.out_channels, self.frozen_batch_norm, device),
            activation: self.activation,
        }
    }
}

/// Convolution → BN → activation: MobileNetV3's last stage, the 1x1 convolution to 960
/// (large) or 576 (small) channels whose output Keras' `include_top=False` returns.
#[derive(Module, Debug)]
pub struct ConvBnAct {
    /// The convolution.
    pub conv: Conv2d,
    /// BatchNorm after `conv`.
    pub bn1: BatchNorm2d,
    /// Activation after `bn1`.
    #[module(skip)]
    pub activation: Activation,
}

impl ConvBnAct {
    /// Apply the block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn1
            .forward_activated(crate::conv::forward(&self.conv, x), self.activation)
    }

    fn map_batch_norms(mut self, f: &impl Fn(BatchNorm2d) -> BatchNorm2d) -> Self {
        self.bn1 = f(self.bn1);
        self
    }
}

/// Any block of a MobileNetV3 stage. Its variant adds no tensor-name segment when weights are
/// loaded or saved (burn-store's `skip_enum_variants`), so names stay timm's.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Block {
    /// See [`DepthwiseSeparable`].
    DepthwiseSeparable(DepthwiseSeparable),
    /// See [`InvertedResidual`].
    InvertedResidual(InvertedResidual),
    /// See [`ConvBnAct`].
    ConvBnAct(ConvBnAct),
}

impl Block {
    /// Apply the block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Block::DepthwiseSeparable(block) => block.forward(x),
            Block::InvertedResidual(block) => block.forward(x),
            Block::ConvBnAct(block) => block.forward(x),
        }
    }

    /// The same block with `f` applied to each of its BatchNorms.
    pub(crate) fn map_batch_norms(self, f: &impl Fn(BatchNorm2d) -> BatchNorm2d) -> Self {
        match self {
            Block::DepthwiseSeparable(b) => Block::DepthwiseSeparable(b.map_batch_norms(f)),
            Block::InvertedResidual(b) => Block::InvertedResidual(b.map_batch_norms(f)),
            Block::ConvBnAct(b) => Block::ConvBnAct(b.map_batch_norms(f)),
        }
    }
}
