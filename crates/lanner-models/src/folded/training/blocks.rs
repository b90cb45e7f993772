//! The trainable units: MobileNetV3's stem, inverted residuals and last convolution, Xception's
//! stem convolutions, blocks and exit convolutions — forward with what the backward pass needs,
//! and backward.

use super::super::buffers::Buffer;
use super::super::kernels::{self, Act, backward};
use super::super::units::Image;
use super::conv_bn::{ConvBn, activated, shape};
use super::gate::{Gate, GateTape};
use super::{Layout, Sums};

// One per unit of a model; the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum TrainUnit {
    Stem(ConvBn),
    Inverted {
        expand: Option<ConvBn>,
        depthwise: ConvBn,
        gate: Option<Gate>,
        project: ConvBn,
        skip: bool,
    },
    Last(ConvBn),
    /// Xception's block: separable convolutions (a depthwise half without BatchNorm, a 1x1
    /// half with one), an optional 3x3 max-pool, and the shortcut.
    XceptionBlock {
        reps: Vec<(ConvBn, ConvBn)>,
        pool_stride: usize,
        skip: Option<ConvBn>,
    },
    /// Xception's exit convolutions: separable + BatchNorm + ReLU.
    Separable(ConvBn, ConvBn),
}

/// What one separable convolution kept.
pub(super) struct RepTape {
    depthwise: Image,
    pre: Image,
    /// After the activation; `None` when there is none (then it is `pre`).
    output: Option<Image>,
}

impl RepTape {
    pub(super) fn output(&self) -> &Image {
        self.output.as_ref().unwrap_or(&self.pre)
    }
}

pub(super) fn separable_forward(depthwise: &ConvBn, pointwise: &ConvBn, x: &Image) -> RepTape {
    let dw = depthwise.forward(x, None);
    let pre = pointwise.forward(&dw, None);
    let output = (pointwise.act != Act::Identity).then(|| activated(&pre, pointwise.act));
    RepTape {
        depthwise: dw,
        pre,
        output,
    }
}

/// The gradient of a separable convolution's input from that of its output.
pub(super) fn separable_backward(
    (depthwise, pointwise): (&ConvBn, &ConvBn),
    x: &Image,
    tape: &RepTape,
    d_out: &mut [f32],
    sums: &mut Sums,
    need_input: bool,
) -> Option<Buffer> {
    let mut d_dw = pointwise
        .backward(&tape.depthwise, &tape.pre, d_out, sums, true)
        .expect("asked for");
    depthwise.backward(x, &tape.depthwise, &mut d_dw, sums, need_input)
}

/// The gradient of a 3x3 max-pool's input: each output's gradient goes to the first largest
/// input of its window (PyTorch's choice). The windows are searched a pixel's channels at a
/// time.
pub(super) fn max_pool_backward(
    x: &Image,
    stride: usize,
    d_out: &[f32],
    (ho, wo): (usize, usize),
) -> Buffer {
    let c = x.channels;
    let mut dx = Buffer::zeros(x.data.len());
    let (mut best, mut best_at) = (vec![0.0f32; c], vec![0usize; c]);
    for oy in 0..ho {
        let iy0 = (oy * stride) as isize - 1;
        for ox in 0..wo {
            let ix0 = (ox * stride) as isize - 1;
            let mut first = true;
            for ky in 0..3 {
                let iy = iy0 + ky;
                if iy < 0 || iy >= x.height as isize {
                    continue;
                }
                for kx in 0..3 {
                    let ix = ix0 + kx;
                    if ix < 0 || ix >= x.width as isize {
                        continue;
                    }
                    let at = (iy as usize * x.width + ix as usize) * c;
                    let values = &x.data[at..at + c];
                    if first {
                        best.copy_from_slice(values);
                        best_at
                            .iter_mut()
                            .enumerate()
                            .for_each(|(ch, b)| *b = at + ch);
                        first = false;
                        continue;
                    }
                    for (ch, v) in values.iter().enumerate() {
                        if *v > best[ch] {
                            best[ch] = *v;
                            best_at[ch] = at + ch;
                        }
                    }
                }
            }
            let d = &d_out[(oy * wo + ox) * c..][..c];
            for (at, g) in best_at.iter().zip(d) {
                dx[*at] += *g;
            }
        }
    }
    dx
}

/// What one unit kept of one image for its backward pass.
pub(super) struct Tape {
    input: Image,
    expand_pre: Option<Image>,
    expanded: Option<Image>,
    depthwise_pre: Image,
    depthwise: Image,
    gate: Option<GateTape>,
    /// The projection's input: `depthwise` scaled by the gate (when there is one).
    gated: Option<Image>,
    /// The unit's output before its activation (stem, last unit).
    pre: Option<Image>,
    /// Xception: each separable convolution's values, and the projecting shortcut's output.
    reps: Vec<RepTape>,
    shortcut: Option<Image>,
}

impl Tape {
    pub(super) fn of(input: Image) -> Self {
        Tape {
            input,
            expand_pre: None,
            expanded: None,
            depthwise_pre: empty(),
            depthwise: empty(),
            gate: None,
            gated: None,
            pre: None,
            reps: Vec::new(),
            shortcut: None,
        }
    }
}

impl TrainUnit {
    pub(super) fn forward(&self, x: Image) -> (Image, Tape) {
        match self {
            TrainUnit::Stem(conv) | TrainUnit::Last(conv) => {
                let pre = conv.forward(&x, None);
                let out = activated(&pre, conv.act);
                let tape = Tape {
                    pre: Some(pre),
                    ..Tape::of(x)
                };
                (out, tape)
            }
            TrainUnit::XceptionBlock {
                reps,
                pool_stride,
                skip,
            } => {
                let shortcut = skip.as_ref().map(|conv| conv.forward(&x, None));
                let mut tapes: Vec<RepTape> = Vec::with_capacity(reps.len());
                for (depthwise, pointwise) in reps {
                    let input = tapes.last().map_or(&x, RepTape::output);
                    let tape = separable_forward(depthwise, pointwise, input);
                    tapes.push(tape);
                }
                let last = tapes.last().expect("an Xception block has reps").output();
                let mut out = if *pool_stride > 1 {
                    let ho = kernels::output_size(last.height, 3, *pool_stride, 1);
                    let wo = kernels::output_size(last.width, 3, *pool_stride, 1);
                    let mut pooled = Buffer::new(ho * wo * last.channels);
                    kernels::max_pool(&last.data, shape(last), 3, *pool_stride, 1, &mut pooled);
                    Image {
                        data: pooled,
                        height: ho,
                        width: wo,
                        channels: last.channels,
                    }
                } else {
                    activated(last, Act::Identity)
                };
                kernels::add_into(&mut out.data, &shortcut.as_ref().unwrap_or(&x).data);
                let tape = Tape {
                    reps: tapes,
                    shortcut,
                    ..Tape::of(x)
                };
                (out, tape)
            }
            TrainUnit::Separable(depthwise, pointwise) => {
                let rep = separable_forward(depthwise, pointwise, &x);
                let out = activated(rep.output(), Act::Identity);
                let tape = Tape {
                    reps: vec![rep],
                    ..Tape::of(x)
                };
                (out, tape)
            }
            TrainUnit::Inverted {
                expand,
                depthwise,
                gate,
                project,
                skip,
            } => {
                let (expand_pre, expanded) = match expand {
                    Some(conv) => {
                        let pre = conv.forward(&x, None);
                        let out = activated(&pre, conv.act);
                        (Some(pre), Some(out))
                    }
                    None => (None, None),
                };
                let dw_input = expanded.as_ref().unwrap_or(&x);
                let depthwise_pre = depthwise.forward(dw_input, None);
                let dw = activated(&depthwise_pre, depthwise.act);
                let gate_tape = gate.as_ref().map(|g| g.forward(&dw));
                let gated = gate_tape.as_ref().map(|t| {
                    let mut data = Buffer::new(dw.data.len());
                    kernels::scale_channels_into(&mut data, &dw.data, &t.gate);
                    Image {
                        data,
                        height: dw.height,
                        width: dw.width,
                        channels: dw.channels,
                    }
                });
                let residual = skip.then_some(&x.data[..]);
                let out = project.forward(gated.as_ref().unwrap_or(&dw), residual);
                let tape = Tape {
                    expand_pre,
                    expanded,
                    depthwise_pre,
                    depthwise: dw,
                    gate: gate_tape,
                    gated,
                    ..Tape::of(x)
                };
                (out, tape)
            }
        }
    }

    /// Gradient of the unit's input (when `need_input`) from that of its output.
    pub(super) fn backward(
        &self,
        tape: &Tape,
        mut d_out: Buffer,
        sums: &mut Sums,
        need_input: bool,
    ) -> Option<Buffer> {
        match self {
            TrainUnit::Stem(conv) | TrainUnit::Last(conv) => {
                let pre = tape.pre.as_ref().expect("kept");
                conv.backward(&tape.input, pre, &mut d_out, sums, need_input)
            }
            TrainUnit::XceptionBlock {
                reps,
                pool_stride,
                skip,
            } => {
                let last = tape.reps.last().expect("kept").output();
                // The shortcut's gradient is `d_out`; the main path's is changed in place.
                let (mut d, mut d_shortcut) = if *pool_stride > 1 {
                    let ho = kernels::output_size(last.height, 3, *pool_stride, 1);
                    let wo = kernels::output_size(last.width, 3, *pool_stride, 1);
                    (
                        max_pool_backward(last, *pool_stride, &d_out, (ho, wo)),
                        d_out,
                    )
                } else {
                    (Buffer::from_slice(&d_out), d_out)
                };
                // Below the first trainable separable convolution only the input's gradient is
                // needed, and only when something before this block trains.
                let first = match need_input {
                    true => 0,
                    false => reps
                        .iter()
                        .position(|(d, p)| d.trainable || p.trainable)
                        .unwrap_or(reps.len()),
                };
                for (i, (convs, rep)) in reps.iter().zip(&tape.reps).enumerate().skip(first).rev() {
                    let input = if i == 0 {
                        &tape.input
                    } else {
                        tape.reps[i - 1].output()
                    };
                    let need = i > first || need_input;
                    match separable_backward((&convs.0, &convs.1), input, rep, &mut d, sums, need) {
                        Some(next) => d = next,
                        None => break,
                    }
                }
                let d_skip = match (skip, &tape.shortcut) {
                    (Some(conv), Some(pre)) => {
                        conv.backward(&tape.input, pre, &mut d_shortcut, sums, need_input)
                    }
                    _ => Some(d_shortcut),
                };
                if !need_input {
                    return None;
                }
                if let Some(d_skip) = d_skip {
                    kernels::add_into(&mut d, &d_skip);
                }
                Some(d)
            }
            TrainUnit::Separable(depthwise, pointwise) => separable_backward(
                (depthwise, pointwise),
                &tape.input,
                &tape.reps[0],
                &mut d_out,
                sums,
                need_input,
            ),
            TrainUnit::Inverted {
                expand,
                depthwise,
                gate,
                project,
                skip,
            } => {
                // The projection has no activation: its pre-activation is its output.
                let projected_input = tape.gated.as_ref().unwrap_or(&tape.depthwise);
                // With no activation the backward pass leaves `d_out` as it is: the residual's
                // gradient.
                debug_assert_eq!(project.act, Act::Identity);
                let mut d_mid = project
                    .backward(projected_input, projected_input, &mut d_out, sums, true)
                    .expect("asked for");
                let residual_grad = skip.then_some(d_out);
                if let (Some(gate), Some(gate_tape)) = (gate, &tape.gate) {
                    let c = tape.depthwise.channels;
                    let pixels = tape.depthwise.height * tape.depthwise.width;
                    let mut d_gate = vec![0.0f32; c];
                    backward::add_column_dots(&mut d_gate, &d_mid, &tape.depthwise.data);
                    kernels::scale_channels(&mut d_mid, &gate_tape.gate);
                    let d_mean = gate.backward(gate_tape, &d_gate, sums);
                    let share: Vec<f32> = d_mean.iter().map(|d| d / pixels as f32).collect();
                    backward::add_to_rows(&mut d_mid, &share);
                }
                let dw_input = tape.expanded.as_ref().unwrap_or(&tape.input);
                let need_dw_input = expand.is_some() || need_input;
                let d_dw_input = depthwise.backward(
                    dw_input,
                    &tape.depthwise_pre,
                    &mut d_mid,
                    sums,
                    need_dw_input,
                );
                let mut d_input = match (expand, d_dw_input) {
                    (Some(conv), Some(mut d)) => conv.backward(
                        &tape.input,
                        tape.expand_pre.as_ref().expect("kept"),
                        &mut d,
                        sums,
                        need_input,
                    ),
                    (None, d) => d,
                    (Some(_), None) => None,
                };
                if let (Some(d), Some(r)) = (d_input.as_mut(), residual_grad) {
                    kernels::add_into(d, &r);
                }
                d_input
            }
        }
    }

    pub(super) fn gradients(&self, sums: &Sums, out: &mut Vec<(usize, Vec<f32>, Layout)>) {
        match self {
            TrainUnit::Stem(conv) | TrainUnit::Last(conv) => conv.gradients(sums, out),
            TrainUnit::XceptionBlock { reps, skip, .. } => {
                for (depthwise, pointwise) in reps {
                    depthwise.gradients(sums, out);
                    pointwise.gradients(sums, out);
                }
                if let Some(conv) = skip {
                    conv.gradients(sums, out);
                }
            }
            TrainUnit::Separable(depthwise, pointwise) => {
                depthwise.gradients(sums, out);
                pointwise.gradients(sums, out);
            }
            TrainUnit::Inverted {
                expand,
                depthwise,
                gate,
                project,
                ..
            } => {
                if let Some(conv) = expand {
                    conv.gradients(sums, out);
                }
                depthwise.gradients(sums, out);
                if let Some(gate) = gate {
                    gate.gradients(sums, out);
                }
                project.gradients(sums, out);
            }
        }
    }
}

fn empty() -> Image {
    Image {
        data: Buffer::new(0),
        height: 0,
        width: 0,
        channels: 0,
    }
}
