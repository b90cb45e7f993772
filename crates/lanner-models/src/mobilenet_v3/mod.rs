//! MobileNetV3 (Howard et al., "Searching for MobileNetV3", 2019) as timm builds it
//! (`_gen_mobilenet_v3`), up to the feature map that Keras' `include_top=False` returns.
//!
//! timm's model goes on with global pooling, `conv_head` (1x1 to 1280/1024) and its
//! classifier; the seed pools the last stage's output directly, so the backbone here ends
//! after `blocks`, and the checkpoint's `conv_head.*` and `classifier.*` are not loaded.

pub(crate) mod arch;
pub mod blocks;
pub mod torchvision;

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};

use crate::activation::Activation;
use crate::batch_norm::{BatchNorm2d, BatchNorm2dConfig};
use crate::channels::round_channels;
use crate::conv::conv2d;
use arch::{BlockKind, BlockSpec};
use blocks::{Block, ConvBnActConfig, DepthwiseSeparableConfig, InvertedResidualConfig};

/// Which of the two published MobileNetV3 networks.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum MobileNetV3Size {
    /// MobileNetV3-Large: 960 feature channels at width 1.0.
    Large,
    /// MobileNetV3-Small: 576 feature channels at width 1.0.
    Small,
}

/// Configuration of a [`MobileNetV3`] backbone: timm's `mobilenetv3_{large,small}_NNN` is
/// size and width multiplier NNN / 100.
#[derive(Config, Debug)]
pub struct MobileNetV3Config {
    /// Large or small.
    pub size: MobileNetV3Size,
    /// Scales every layer's channels (timm's `channel_multiplier`), rounded to multiples of 8.
    #[config(default = 1.0)]
    pub width_multiplier: f64,
    /// Every BatchNorm uses its running statistics and never updates them, as the seed's
    /// `backbone(x, training=False)`; their weight and bias stay trainable.
    #[config(default = false)]
    pub frozen_batch_norm: bool,
}

impl MobileNetV3Config {
    fn stages(&self) -> &'static [&'static [BlockSpec]] {
        match self.size {
            MobileNetV3Size::Large => arch::LARGE,
            MobileNetV3Size::Small => arch::SMALL,
        }
    }

    fn channels(&self, reference: usize) -> usize {
        round_channels(reference as f64, self.width_multiplier)
    }

    /// Output channels of the stem convolution (timm keeps 16 below width 0.75).
    pub fn stem_channels(&self) -> usize {
        if self.width_multiplier < 0.75 {
            16
        } else {
            self.channels(16)
        }
    }

    /// Channels of the feature map [`MobileNetV3::forward`] returns (960 / 576 at width 1).
    pub fn feature_channels(&self) -> usize {
        let last_stage = self.stages()[self.stages().len() - 1];
        self.channels(last_stage[last_stage.len() - 1].out_channels)
    }

    /// Initialise the backbone with timm's initialisation scheme (convolutions normal with
    /// std `sqrt(2 / fan_out)`, BatchNorm weight 1 and bias 0).
    pub fn init(&self, device: &Device) -> MobileNetV3 {
        let stem = self.stem_channels();
        let frozen = self.frozen_batch_norm;
        let mut in_channels = stem;
        let blocks = self
            .stages()
            .iter()
            .map(|stage| {
                let mut blocks = Vec::new();
                for spec in stage.iter() {
                    for _ in 0..spec.repeats {
                        // Only the first block of a stage strides.
                        let stride = if blocks.is_empty() { spec.stride } else { 1 };
                        let out_channels = self.channels(spec.out_channels);
                        blocks.push(block(
                            spec,
                            in_channels,
                            out_channels,
                            stride,
                            frozen,
                            device,
                        ));
                        in_channels = out_channels;
                    }
                }
                blocks
            })
            .collect();
        MobileNetV3 {
            conv_stem: conv2d(3, stem, 3, 2, 1, device),
            bn1: BatchNorm2dConfig::new(stem)
                .with_frozen_statistics(frozen)
                .init(device),
            blocks,
        }
    }
}

fn block(
    spec: &BlockSpec,
    in_channels: usize,
    out_channels: usize,
    stride: usize,
    frozen_batch_norm: bool,
    device: &Device,
) -> Block {
    match spec.kind {
        BlockKind::DepthwiseSeparable => Block::DepthwiseSeparable(
            DepthwiseSeparableConfig::new(in_channels, out_channels)
                .with_kernel(spec.kernel)
                .with_stride(stride)
                .with_squeeze_excite(spec.squeeze_excite)
                .with_activation(spec.activation)
                .with_frozen_batch_norm(frozen_batch_norm)
                .init(device),
        ),
        BlockKind::InvertedResidual => Block::InvertedResidual(
            InvertedResidualConfig::new(in_channels, out_channels)
                .with_kernel(spec.kernel)
                .with_stride(stride)
                .with_expansion(spec.expansion)
                .with_squeeze_excite(spec.squeeze_excite)
                .with_activation(spec.activation)
                .with_frozen_batch_norm(frozen_batch_norm)
                .init(device),
        ),
        BlockKind::ConvBnAct => Block::ConvBnAct(
            ConvBnActConfig::new(in_channels, out_channels)
                .with_kernel(spec.kernel)
                .with_activation(spec.activation)
                .with_frozen_batch_norm(frozen_batch_norm)
                .init(device),
        ),
    }
}

/// The MobileNetV3 backbone: stem convolution (3x3, stride 2) → BN → hard-swish → stages of
/// blocks, the last a 1x1 convolution + BN + hard-swish. Tensor names are timm's
/// (`conv_stem.weight`, `bn1.*`, `blocks.S.B.…`).
#[derive(Module, Debug)]
pub struct MobileNetV3 {
    /// 3x3 stride-2 convolution from RGB.
    pub conv_stem: Conv2d,
    /// BatchNorm after the stem.
    pub bn1: BatchNorm2d,
    /// Stages of blocks; `blocks[s][b]` is timm's `blocks.s.b`.
    pub blocks: Vec<Vec<Block>>,
}

impl MobileNetV3 {
    /// The feature map `[batch, feature_channels, height / 32, width / 32]` of normalised
    /// images `[batch, 3, height, width]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        let units = 1 + self.blocks.iter().map(Vec::len).sum::<usize>();
        self.forward_units(images, 0..units)
    }

    /// Units `units` of the network: 0 is the stem, unit `i > 0` the `i`-th block counted
    /// across stages. See [`crate::Backbone::unit_count`].
    pub fn forward_units(&self, x: Tensor<4>, units: std::ops::Range<usize>) -> Tensor<4> {
        let x = if units.contains(&0) {
            let x = crate::conv::forward(&self.conv_stem, x);
            self.bn1.forward_activated(x, Activation::HardSwish)
        } else {
            x
        };
        let first_block = units.start.max(1) - 1;
        let blocks = units.end.saturating_sub(1).saturating_sub(first_block);
        self.blocks
            .iter()
            .flatten()
            .skip(first_block)
            .take(blocks)
            .fold(x, |x, block| block.forward(x))
    }

    /// The same backbone with every BatchNorm's statistics frozen (or not); see
    /// [`MobileNetV3Config::frozen_batch_norm`].
    pub fn with_frozen_batch_norm(self, frozen: bool) -> Self {
        self.map_batch_norms(&|bn| bn.with_frozen_statistics(frozen))
    }

    /// The same backbone with `f` applied to each of its BatchNorms.
    pub(crate) fn map_batch_norms(self, f: &impl Fn(BatchNorm2d) -> BatchNorm2d) -> Self {
        MobileNetV3 {
            conv_stem: self.conv_stem,
            bn1: f(self.bn1),
            blocks: self
                .blocks
                .into_iter()
                .map(|stage| {
                    stage
                        .into_iter()
                        .map(|block| block.map_batch_norms(f))
                        .collect()
                })
                .collect(),
        }
    }
}
