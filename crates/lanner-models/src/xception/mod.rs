//! Xception (Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", 2017)
//! as timm's `legacy_xception` builds it — the PyTorch port of the Keras/TensorFlow ImageNet
//! weights, input 299 — up to the feature map that Keras' `include_top=False` returns.
//!
//! Entry flow: `conv1` (3x3 stride 2, no padding) → `bn1` → ReLU → `conv2` (3x3, no padding)
//! → `bn2` → ReLU → `block1`..`block3` (128, 256, 728 channels, each halving the resolution);
//! middle flow: `block4`..`block11` (728 channels, three separable convolutions each); exit
//! flow: `block12` (728 → 1024, stride 2) → `conv3` (separable, 1536) → `bn3` → ReLU →
//! `conv4` (separable, 2048) → `bn4` → ReLU. timm's `forward_features` ends there; its pooling
//! and `fc` classifier are not part of the backbone, and the checkpoint's `fc.*` is not loaded.
//!
//! timm keeps PyTorch's BatchNorm epsilon 1e-5 and pads its stride-2 max-pools by one on every
//! side; Keras' own Xception uses epsilon 1e-3 and `padding="same"` (which pads even-sized
//! inputs on the bottom/right only). The numbers here are timm's.

pub mod blocks;

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};

use crate::activation::Activation::Relu;
use crate::batch_norm::BatchNorm2d;
use blocks::{SeparableConv2d, SeparableConv2dConfig, XceptionBlock, XceptionBlockConfig};

/// Channels of Xception's feature map (timm's `num_features`).
pub const XCEPTION_FEATURE_CHANNELS: usize = 2048;

/// Units of Xception (see [`crate::Backbone::unit_count`]): `conv1`, `conv2`, `block1`..`block12`,
/// `conv3`, `conv4`, each with its BatchNorm and ReLU.
pub const UNITS: usize = 16;

/// The unit a timm tensor name's first segment (`conv1`, `bn2`, `block7`, …) belongs to.
pub fn unit_of(first_segment: &str) -> Option<usize> {
    match first_segment {
        "conv1" | "bn1" => Some(0),
        "conv2" | "bn2" => Some(1),
        "conv3" | "bn3" => Some(14),
        "conv4" | "bn4" => Some(15),
        _ => {
            let n: usize = first_segment.strip_prefix("block")?.parse().ok()?;
            (1..=12).contains(&n).then_some(1 + n)
        }
    }
}

/// Configuration of an [`Xception`] backbone (timm's `legacy_xception`; it has no width
/// multiplier).
#[derive(Config, Debug)]
pub struct XceptionConfig {
    /// Every BatchNorm uses its running statistics and never updates them, as the seed's
    /// `backbone(x, training=False)`; their weight and bias stay trainable.
    #[config(default = false)]
    pub frozen_batch_norm: bool,
}

impl XceptionConfig {
    /// Channels of the feature map [`Xception::forward`] returns: 2048.
    pub fn feature_channels(&self) -> usize {
        XCEPTION_FEATURE_CHANNELS
    }

    /// Initialise the backbone with timm's initialisation scheme (convolutions normal with
    /// std `sqrt(2 / (out · k · k))`, BatchNorm weight 1 and bias 0).
    pub fn init(&self, device: &Device) -> Xception {
        let frozen = self.frozen_batch_norm;
        let block = |cin: usize, cout: usize, reps: usize, stride: usize| {
            XceptionBlockConfig::new(cin, cout, reps)
                .with_stride(stride)
                .with_frozen_batch_norm(frozen)
        };
        let middle = || block(728, 728, 3, 1).init(device);
        Xception {
            conv1: blocks::conv2d(3, 32, 3, 2, 0, 1, device),
            bn1: blocks::batch_norm(32, frozen, device),
            conv2: blocks::conv2d(32, 64, 3, 1, 0, 1, device),
            bn2: blocks::batch_norm(64, frozen, device),
            block1: block(64, 128, 2, 2)
                .with_start_with_relu(false)
                .init(device),
            block2: block(128, 256, 2, 2).init(device),
            block3: block(256, 728, 2, 2).init(device),
            block4: middle(),
            block5: middle(),
            block6: middle(),
            block7: middle(),
            block8: middle(),
            block9: middle(),
            block10: middle(),
            block11: middle(),
            block12: block(728, 1024, 2, 2).with_grow_first(false).init(device),
            conv3: SeparableConv2dConfig::new(1024, 1536).init(device),
            bn3: blocks::batch_norm(1536, frozen, device),
            conv4: SeparableConv2dConfig::new(1536, XCEPTION_FEATURE_CHANNELS).init(device),
            bn4: blocks::batch_norm(XCEPTION_FEATURE_CHANNELS, frozen, device),
        }
    }
}

/// The Xception backbone, with timm's tensor names (`conv1.weight`, `bn1.*`,
/// `block1.skip.weight`, `block4.rep.1.conv1.weight`, `conv4.pointwise.weight`, …).
#[derive(Module, Debug)]
pub struct Xception {
    /// 3x3 stride-2 convolution from RGB, unpadded.
    pub conv1: Conv2d,
    /// BatchNorm after `conv1`.
    pub bn1: BatchNorm2d,
    /// 3x3 convolution, unpadded.
    pub conv2: Conv2d,
    /// BatchNorm after `conv2`.
    pub bn2: BatchNorm2d,
    /// Entry flow, 64 → 128, stride 2, no leading ReLU.
    pub block1: XceptionBlock,
    /// Entry flow, 128 → 256, stride 2.
    pub block2: XceptionBlock,
    /// Entry flow, 256 → 728, stride 2.
    pub block3: XceptionBlock,
    /// Middle flow, 728 → 728.
    pub block4: XceptionBlock,
    /// Middle flow, 728 → 728.
    pub block5: XceptionBlock,
    /// Middle flow, 728 → 728.
    pub block6: XceptionBlock,
    /// Middle flow, 728 → 728.
    pub block7: XceptionBlock,
    /// Middle flow, 728 → 728.
    pub block8: XceptionBlock,
    /// Middle flow, 728 → 728.
    pub block9: XceptionBlock,
    /// Middle flow, 728 → 728.
    pub block10: XceptionBlock,
    /// Middle flow, 728 → 728.
    pub block11: XceptionBlock,
    /// Exit flow, 728 → 1024 (grown in its last separable convolution), stride 2.
    pub block12: XceptionBlock,
    /// Separable 3x3, 1024 → 1536.
    pub conv3: SeparableConv2d,
    /// BatchNorm after `conv3`.
    pub bn3: BatchNorm2d,
    /// Separable 3x3, 1536 → 2048.
    pub conv4: SeparableConv2d,
    /// BatchNorm after `conv4`; its ReLU'd output is the feature map.
    pub bn4: BatchNorm2d,
}

impl Xception {
    /// The twelve blocks in order.
    pub fn blocks(&self) -> [&XceptionBlock; 12] {
        [
            &self.block1,
            &self.block2,
            &self.block3,
            &self.block4,
            &self.block5,
            &self.block6,
            &self.block7,
            &self.block8,
            &self.block9,
            &self.block10,
            &self.block11,
            &self.block12,
        ]
    }

    /// The feature map `[batch, 2048, h, w]` of normalised images `[batch, 3, height, width]`
    /// (`h = w = 10` at 299, 3 at 71, timm's `forward_features`).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        self.forward_units(images, 0..UNITS)
    }

    /// Units `units` of the network (see [`unit_of`]): each takes the previous one's output.
    pub fn forward_units(&self, x: Tensor<4>, units: std::ops::Range<usize>) -> Tensor<4> {
        units.fold(x, |x, unit| match unit {
            0 => (self.bn1).forward_activated(crate::conv::forward(&self.conv1, x), Relu),
            1 => (self.bn2).forward_activated(crate::conv::forward(&self.conv2, x), Relu),
            2..=13 => self.blocks()[unit - 2].forward(x),
            14 => self.bn3.forward_activated(self.conv3.forward(x), Relu),
            15 => self.bn4.forward_activated(self.conv4.forward(x), Relu),
            _ => panic!("Xception has {UNITS} units, not {}", unit + 1),
        })
    }

    /// The same backbone with every BatchNorm's statistics frozen (or not); see
    /// [`XceptionConfig::frozen_batch_norm`].
    pub fn with_frozen_batch_norm(self, frozen: bool) -> Self {
        self.map_batch_norms(&|bn| bn.with_frozen_statistics(frozen))
    }

    /// The same backbone with `f` applied to each of its BatchNorms.
    pub(crate) fn map_batch_norms(self, f: &impl Fn(BatchNorm2d) -> BatchNorm2d) -> Self {
        let block = |block: XceptionBlock| block.map_batch_norms(f);
        Xception {
            conv1: self.conv1,
            bn1: f(self.bn1),
            conv2: self.conv2,
            bn2: f(self.bn2),
            block1: block(self.block1),
            block2: block(self.block2),
            block3: block(self.block3),
            block4: block(self.block4),
            block5: block(self.block5),
            block6: block(self.block6),
            block7: block(self.block7),
            block8: block(self.block8),
            block9: block(self.block9),
            block10: block(self.block10),
            block11: block(self.block11),
            block12: block(self.block12),
            conv3: self.conv3,
            bn3: f(self.bn3),
            conv4: self.conv4,
            bn4: f(self.bn4),
        }
    }
}
