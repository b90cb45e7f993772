//! Building a folded network from a burn backbone: read each convolution's weights, fold the
//! BatchNorm that follows it (running statistics: `w · γ/√(σ² + ε)`, bias
//! `β − μ · γ/√(σ² + ε)`), and lay the weights out for channels-last products.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

use super::kernels::Act;
use super::units::{DenseConv, Depthwise, Pointwise, Separable, SqueezeExcite, Unit};
use crate::activation::Activation;
use crate::batch_norm::BatchNorm2d;
use crate::mobilenet_v3::MobileNetV3;
use crate::mobilenet_v3::blocks::Block;
use crate::xception::Xception;
use crate::xception::blocks::{RepLayer, XceptionBlock};

pub(super) fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32")
}

/// A convolution's weights (burn's `[out][in / groups][k][k]`) and bias with `bn` folded in.
struct Folded {
    weights: Vec<f32>,
    bias: Vec<f32>,
    out_channels: usize,
    /// `in / groups`.
    in_per_group: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
}

fn fold(conv: &Conv2d, bn: Option<&BatchNorm2d>) -> Folded {
    let [out_channels, in_per_group, kernel, kernel_w] = conv.weight.val().dims();
    assert_eq!(kernel, kernel_w, "square kernels");
    assert_eq!(conv.stride[0], conv.stride[1], "equal strides");
    assert_eq!(conv.dilation, [1, 1], "no dilation");
    let pad = match conv.padding {
        PaddingConfig2d::Valid => 0,
        PaddingConfig2d::Explicit(top, left, bottom, right)
            if top == left && top == bottom && top == right =>
        {
            top
        }
        ref other => panic!("the folded network takes symmetric padding, not {other:?}"),
    };
    let mut weights = values(conv.weight.val());
    let mut bias = match &conv.bias {
        Some(bias) => values(bias.val()),
        None => vec![0.0; out_channels],
    };
    if let Some(bn) = bn {
        let gamma = values(bn.weight.val());
        let beta = values(bn.bias.val());
        let mean = values(bn.running_mean.value());
        let var = values(bn.running_var.value());
        let per_out = in_per_group * kernel * kernel;
        for o in 0..out_channels {
            let scale = gamma[o] as f64 / (var[o] as f64 + bn.epsilon).sqrt();
            weights[o * per_out..(o + 1) * per_out]
                .iter_mut()
                .for_each(|w| *w = (*w as f64 * scale) as f32);
            bias[o] = (beta[o] as f64 + (bias[o] as f64 - mean[o] as f64) * scale) as f32;
        }
    }
    Folded {
        weights,
        bias,
        out_channels,
        in_per_group,
        kernel,
        stride: conv.stride[0],
        pad,
    }
}

pub(super) fn act(activation: Activation) -> Act {
    match activation {
        Activation::Relu => Act::Relu,
        Activation::HardSwish => Act::HardSwish,
    }
}

/// Burn's convolution weights `[out][in / groups][k][k]` laid out channels-last, as
/// `[(tap, in)][out]`: a 1x1 convolution's `[in][out]`, a depthwise one's `[k·k][c]` (one input
/// per group), a dense one's patch rows.
pub(super) fn channels_last(raw: &[f32], [out, in_per_group, k, _]: [usize; 4]) -> Vec<f32> {
    let taps = k * k;
    let mut weights = vec![0.0; raw.len()];
    for o in 0..out {
        for i in 0..in_per_group {
            for t in 0..taps {
                weights[(t * in_per_group + i) * out + o] = raw[(o * in_per_group + i) * taps + t];
            }
        }
    }
    weights
}

fn pointwise(conv: &Conv2d, bn: Option<&BatchNorm2d>, act: Act) -> Pointwise {
    let f = fold(conv, bn);
    assert_eq!(f.kernel, 1);
    let (cin, cout) = (f.in_per_group, f.out_channels);
    let weights = channels_last(&f.weights, [cout, cin, 1, 1]);
    Pointwise {
        in_channels: cin,
        out_channels: cout,
        stride: f.stride,
        weights,
        bias: f.bias,
        act,
        bf16: None,
    }
}

fn depthwise(conv: &Conv2d, bn: Option<&BatchNorm2d>, act: Act, input_relu: bool) -> Depthwise {
    let f = fold(conv, bn);
    assert_eq!(f.in_per_group, 1, "a depthwise convolution");
    let c = f.out_channels;
    let weights = channels_last(&f.weights, [c, 1, f.kernel, f.kernel]);
    Depthwise {
        channels: c,
        kernel: f.kernel,
        stride: f.stride,
        pad: f.pad,
        weights,
        bias: f.bias,
        act,
        input_relu,
    }
}

fn dense(conv: &Conv2d, bn: Option<&BatchNorm2d>, act: Act) -> DenseConv {
    let f = fold(conv, bn);
    let (cin, cout, k) = (f.in_per_group, f.out_channels, f.kernel);
    assert_eq!(conv.groups, 1, "a dense convolution");
    let weights = channels_last(&f.weights, [cout, cin, k, k]);
    DenseConv {
        in_channels: cin,
        out_channels: cout,
        kernel: k,
        stride: f.stride,
        pad: f.pad,
        weights,
        bias: f.bias,
        act,
        bf16: None,
    }
}

/// The first `units` units of a MobileNetV3 (the stem, then one per block).
pub(crate) fn mobilenet_v3(model: &MobileNetV3, units: usize) -> Vec<Unit> {
    let mut out = Vec::with_capacity(units);
    if units == 0 {
        return out;
    }
    out.push(Unit::Conv(dense(
        &model.conv_stem,
        Some(&model.bn1),
        Act::HardSwish,
    )));
    for block in model.blocks.iter().flatten().take(units - 1) {
        out.push(match block {
            Block::DepthwiseSeparable(b) => Unit::InvertedResidual {
                expand: None,
                depthwise: depthwise(&b.conv_dw, Some(&b.bn1), act(b.activation), false),
                squeeze_excite: b.se.as_ref().map(squeeze_excite),
                project: pointwise(&b.conv_pw, Some(&b.bn2), Act::Identity),
                skip: b.has_skip,
            },
            Block::InvertedResidual(b) => Unit::InvertedResidual {
                expand: Some(pointwise(&b.conv_pw, Some(&b.bn1), act(b.activation))),
                depthwise: depthwise(&b.conv_dw, Some(&b.bn2), act(b.activation), false),
                squeeze_excite: b.se.as_ref().map(squeeze_excite),
                project: pointwise(&b.conv_pwl, Some(&b.bn3), Act::Identity),
                skip: b.has_skip,
            },
            Block::ConvBnAct(b) => {
                Unit::Pointwise(pointwise(&b.conv, Some(&b.bn1), act(b.activation)))
            }
        });
    }
    out
}

fn squeeze_excite(se: &crate::squeeze_excite::SqueezeExcite) -> SqueezeExcite {
    let reduce = pointwise(&se.conv_reduce, None, Act::Identity);
    let expand = pointwise(&se.conv_expand, None, Act::Identity);
    SqueezeExcite {
        reduce_weights: reduce.weights,
        reduce_bias: reduce.bias,
        expand_weights: expand.weights,
        expand_bias: expand.bias,
    }
}

/// The first `units` units of an Xception: `conv1`, `conv2`, `block1`..`block12`, `conv3`,
/// `conv4`, each with its BatchNorm and ReLU.
pub(crate) fn xception(model: &Xception, units: usize) -> Vec<Unit> {
    let mut out = Vec::new();
    out.push(Unit::Conv(dense(&model.conv1, Some(&model.bn1), Act::Relu)));
    out.push(Unit::Conv(dense(&model.conv2, Some(&model.bn2), Act::Relu)));
    out.extend(model.blocks().into_iter().map(xception_block));
    for (conv, bn) in [(&model.conv3, &model.bn3), (&model.conv4, &model.bn4)] {
        out.push(Unit::Separable(Separable {
            depthwise: depthwise(&conv.conv1, None, Act::Identity, false),
            pointwise: pointwise(&conv.pointwise, Some(bn), Act::Relu),
        }));
    }
    out.truncate(units);
    out
}

/// One separable convolution of an Xception block's `rep`, with the ReLUs around it placed.
pub(super) struct SeparableLayers<'a> {
    pub(super) depthwise: &'a Conv2d,
    pub(super) pointwise: &'a Conv2d,
    /// The BatchNorm after the pointwise half.
    pub(super) batch_norm: Option<&'a BatchNorm2d>,
    /// The block's leading ReLU, applied as the depthwise half reads its input (the shortcut
    /// takes the input before it).
    pub(super) input_relu: bool,
    /// A ReLU right after the BatchNorm (the next separable convolution's leading one).
    pub(super) output_relu: bool,
}

/// The separable convolutions of `block`'s `rep` (`[ReLU] sep BN (ReLU sep BN)* [MaxPool]`) and
/// the stride of its closing max-pool (1: none).
pub(super) fn xception_rep(block: &XceptionBlock) -> (Vec<SeparableLayers<'_>>, usize) {
    let mut reps: Vec<SeparableLayers<'_>> = Vec::new();
    let mut pending_relu = false;
    let mut pool_stride = 1;
    let mut layers = block.rep.iter().peekable();
    while let Some(layer) = layers.next() {
        match layer {
            RepLayer::Relu(_) => match reps.last_mut() {
                Some(previous) => previous.output_relu = true,
                None => pending_relu = true,
            },
            RepLayer::SeparableConv(sep) => {
                let batch_norm = match layers.peek() {
                    Some(RepLayer::BatchNorm(bn)) => {
                        layers.next();
                        Some(bn)
                    }
                    _ => None,
                };
                reps.push(SeparableLayers {
                    depthwise: &sep.conv1,
                    pointwise: &sep.pointwise,
                    batch_norm,
                    input_relu: pending_relu,
                    output_relu: false,
                });
                pending_relu = false;
            }
            RepLayer::BatchNorm(_) => panic!("an Xception BatchNorm follows a separable conv"),
            RepLayer::MaxPool(pool) => {
                assert_eq!(pool.kernel_size, [3, 3]);
                assert!(matches!(
                    pool.padding,
                    PaddingConfig2d::Explicit(1, 1, 1, 1)
                ));
                pool_stride = pool.stride[0];
            }
        }
    }
    (reps, pool_stride)
}

/// The ReLU after a separable convolution, as its pointwise half's activation.
pub(super) fn relu_if(relu: bool) -> Act {
    if relu { Act::Relu } else { Act::Identity }
}

fn xception_block(block: &XceptionBlock) -> Unit {
    let (layers, pool_stride) = xception_rep(block);
    let reps = layers
        .iter()
        .map(|l| Separable {
            depthwise: depthwise(l.depthwise, None, Act::Identity, l.input_relu),
            pointwise: pointwise(l.pointwise, l.batch_norm, relu_if(l.output_relu)),
        })
        .collect();
    let skip = block
        .skip
        .as_ref()
        .map(|conv| pointwise(conv, block.skipbn.as_ref(), Act::Identity));
    Unit::XceptionBlock {
        reps,
        pool_stride,
        skip,
    }
}
