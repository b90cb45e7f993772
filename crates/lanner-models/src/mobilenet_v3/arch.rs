//! The stage tables of timm's `_gen_mobilenet_v3` (the non-`minimal` variants), one row per
//! entry of its `arch_def` strings, e.g. `ir_r3_k5_s2_e3_c40_se0.25_nre`.

use crate::activation::Activation;

/// Which block a row builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockKind {
    /// `ds`: depthwise-separable convolution.
    DepthwiseSeparable,
    /// `ir`: inverted residual (expand, depthwise, project).
    InvertedResidual,
    /// `cn`: convolution, BatchNorm, activation.
    ConvBnAct,
}

/// One `arch_def` string: `repeats` identical blocks, of which only the first of a stage
/// strides.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockSpec {
    pub kind: BlockKind,
    pub repeats: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Expansion ratio of the inverted residual's 1x1 expansion (`e`).
    pub expansion: f64,
    /// Output channels before the width multiplier (`c`).
    pub out_channels: usize,
    /// Squeeze-excitation with ratio 0.25 of the expanded channels (`se0.25`).
    pub squeeze_excite: bool,
    /// ReLU where the row says `nre`, hard-swish (the model's default) elsewhere.
    pub activation: Activation,
}

use Activation::{HardSwish as HS, Relu as RE};
use BlockKind::{ConvBnAct, DepthwiseSeparable, InvertedResidual};

/// `ds_r1_k{kernel}_s{stride}_e1_c{out}[_se0.25][_nre]`.
const fn ds(
    kernel: usize,
    stride: usize,
    out_channels: usize,
    squeeze_excite: bool,
    activation: Activation,
) -> BlockSpec {
    BlockSpec {
        kind: DepthwiseSeparable,
        repeats: 1,
        kernel,
        stride,
        expansion: 1.0,
        out_channels,
        squeeze_excite,
        activation,
    }
}

/// `ir_r{repeats}_k{kernel}_s{stride}_e{expansion}_c{out}[_se0.25][_nre]`.
const fn ir(
    repeats: usize,
    kernel: usize,
    stride: usize,
    expansion: f64,
    out_channels: usize,
    squeeze_excite: bool,
    activation: Activation,
) -> BlockSpec {
    BlockSpec {
        kind: InvertedResidual,
        repeats,
        kernel,
        stride,
        expansion,
        out_channels,
        squeeze_excite,
        activation,
    }
}

/// `cn_r1_k1_s1_c{out}`, with the model's hard-swish.
const fn cn(out_channels: usize) -> BlockSpec {
    BlockSpec {
        kind: ConvBnAct,
        repeats: 1,
        kernel: 1,
        stride: 1,
        expansion: 1.0,
        out_channels,
        squeeze_excite: false,
        activation: HS,
    }
}

/// `mobilenetv3_large_*`: seven stages, the last the 1x1 conv to 960 channels.
pub(crate) const LARGE: &[&[BlockSpec]] = &[
    &[ds(3, 1, 16, false, RE)],
    &[
        ir(1, 3, 2, 4.0, 24, false, RE),
        ir(1, 3, 1, 3.0, 24, false, RE),
    ],
    &[ir(3, 5, 2, 3.0, 40, true, RE)],
    &[
        ir(1, 3, 2, 6.0, 80, false, HS),
        ir(1, 3, 1, 2.5, 80, false, HS),
        ir(2, 3, 1, 2.3, 80, false, HS),
    ],
    &[ir(2, 3, 1, 6.0, 112, true, HS)],
    &[ir(3, 5, 2, 6.0, 160, true, HS)],
    &[cn(960)],
];

/// `mobilenetv3_small_*`: six stages, the last the 1x1 conv to 576 channels.
pub(crate) const SMALL: &[&[BlockSpec]] = &[
    &[ds(3, 2, 16, true, RE)],
    &[
        ir(1, 3, 2, 4.5, 24, false, RE),
        ir(1, 3, 1, 3.67, 24, false, RE),
    ],
    &[
        ir(1, 5, 2, 4.0, 40, true, HS),
        ir(2, 5, 1, 6.0, 40, true, HS),
    ],
    &[ir(2, 5, 1, 3.0, 48, true, HS)],
    &[ir(3, 5, 2, 6.0, 96, true, HS)],
    &[cn(576)],
];
