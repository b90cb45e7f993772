//! The trainable units: MobileNetV3's stem, inverted residuals and last convolution, Xception's
//! stem convolutions, blocks and exit convolutions — forward with what the backward pass needs,
//! and backward.

use super::super::buffers::Buffer;
use super::super::kernels::{self, Act, backward};
use super::super::units::Image;
use super::conv_bn::{ConvBn, Kept, activated, shape};
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

/// What one separable convolution kept: its depthwise half's output (the pointwise half's
/// input) and the pointwise half's output. Xception's pointwise halves end in a ReLU or in
/// nothing, so what [`ConvBn::forward_kept`] keeps of them is their output.
pub(super) struct RepTape {
    depthwise: Image,
    /// `None` once the block took it as its own output (see [`RepTape::take_output`]).
    pointwise: Option<Kept>,
}

impl RepTape {
    pub(super) fn output(&self) -> &Image {
        match &self.pointwise {
            Some(Kept::Output(out) | Kept::Pre(out)) => out,
            None => panic!("the block's output was taken"),
        }
    }

    /// The output, no longer kept: a last separable convolution without an activation whose
    /// output no pooling reads needs none of it for its backward pass.
    fn take_output(&mut self) -> Image {
        match self.pointwise.take() {
            Some(Kept::Pre(out)) => out,
            _ => panic!("only an output without an activation can be given away"),
        }
    }
}

pub(super) fn separable_forward(depthwise: &ConvBn, pointwise: &ConvBn, x: &Image) -> RepTape {
    let dw = depthwise.forward(x, None);
    let kept = pointwise.forward_kept(&dw);
    RepTape {
        depthwise: dw,
        pointwise: Some(kept),
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
        .backward(&tape.depthwise, tape.pointwise.as_ref(), d_out, sums, true)
        .expect("asked for");
    depthwise.backward(x, None, &mut d_dw, sums, need_input)
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

/// What one unit kept of one image for its backward pass. Values the backward pass can
/// compute again in one elementwise pass are not kept: hard swish's outputs, the gated
/// depthwise output, outputs without an activation that only go on to the next unit.
pub(super) struct Tape {
    input: Image,
    /// Inverted residuals: the expanding and the depthwise convolution's.
    expand: Option<Kept>,
    depthwise: Option<Kept>,
    gate: Option<GateTape>,
    /// Stem, last unit: the convolution's.
    kept: Option<Kept>,
    /// Xception: each separable convolution's values.
    reps: Vec<RepTape>,
}

impl Tape {
    /// The floats of the feature maps this tape keeps (the gate's few values aside). Every
    /// field is named, so that one added is counted.
    pub(super) fn floats(&self) -> usize {
        let Tape {
            input,
            expand,
            depthwise,
            gate: _,
            kept,
            reps,
        } = self;
        let kept: usize = [expand, depthwise, kept]
            .into_iter()
            .flatten()
            .map(Kept::floats)
            .sum();
        let reps = reps.iter().map(
            |RepTape {
                 depthwise,
                 pointwise,
             }| { depthwise.data.len() + pointwise.as_ref().map_or(0, Kept::floats) },
        );
        input.data.len() + kept + reps.sum::<usize>()
    }

    pub(super) fn of(input: Image) -> Self {
        Tape {
            input,
            expand: None,
            depthwise: None,
            gate: None,
            kept: None,
            reps: Vec::new(),
        }
    }
}

/// `depthwise` scaled channel by channel by the squeeze-excitation gate.
fn gated(depthwise: &Image, gate: &[f32]) -> Image {
    depthwise.mapped(|out, values| kernels::scale_channels_into(out, values, gate))
}

impl TrainUnit {
    pub(super) fn forward(&self, x: Image) -> (Image, Tape) {
        match self {
            TrainUnit::Stem(conv) | TrainUnit::Last(conv) => {
                // The output goes on to the next unit, which keeps it as its input: keeping
                // the pre-activation here (not ReLU's output) keeps nothing twice.
                let pre = conv.forward(&x, None);
                let out = activated(&pre, conv.act);
                let tape = Tape {
                    kept: Some(Kept::Pre(pre)),
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
                let mut out = if *pool_stride > 1 {
                    let last = tapes.last().expect("an Xception block has reps").output();
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
                    tapes
                        .last_mut()
                        .expect("an Xception block has reps")
                        .take_output()
                };
                // The shortcut's convolution has no activation: its backward pass needs only
                // the block's input, kept anyway.
                kernels::add_into(&mut out.data, &shortcut.as_ref().unwrap_or(&x).data);
                let tape = Tape {
                    reps: tapes,
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
                let expand_kept = expand.as_ref().map(|conv| conv.forward_kept(&x));
                let depthwise_kept = {
                    let expanded = expand.as_ref().zip(expand_kept.as_ref());
                    let expanded = expanded.map(|(conv, kept)| kept.output(conv.act));
                    depthwise.forward_kept(expanded.as_deref().unwrap_or(&x))
                };
                let dw = depthwise_kept.output(depthwise.act);
                let gate_tape = gate.as_ref().map(|g| g.forward(&dw));
                let gated = gate_tape.as_ref().map(|t| gated(&dw, &t.gate));
                let residual = skip.then_some(&x.data[..]);
                let out = project.forward(gated.as_ref().unwrap_or(&dw), residual);
                drop((gated, dw));
                let tape = Tape {
                    expand: expand_kept,
                    depthwise: Some(depthwise_kept),
                    gate: gate_tape,
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
            TrainUnit::Stem(conv) | TrainUnit::Last(conv) => conv.backward(
                &tape.input,
                tape.kept.as_ref(),
                &mut d_out,
                sums,
                need_input,
            ),
            TrainUnit::XceptionBlock {
                reps,
                pool_stride,
                skip,
            } => {
                // The shortcut's gradient is `d_out`; the main path's is changed in place.
                let (mut d, mut d_shortcut) = if *pool_stride > 1 {
                    let last = tape.reps.last().expect("kept").output();
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
                let d_skip = match skip {
                    Some(conv) => {
                        conv.backward(&tape.input, None, &mut d_shortcut, sums, need_input)
                    }
                    None => Some(d_shortcut),
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
                let depthwise_kept = tape.depthwise.as_ref().expect("kept");
                let dw = depthwise_kept.output(depthwise.act);
                let gated = tape.gate.as_ref().map(|t| gated(&dw, &t.gate));
                // With no activation the backward pass leaves `d_out` as it is: the residual's
                // gradient.
                let mut d_mid = project
                    .backward(gated.as_ref().unwrap_or(&dw), None, &mut d_out, sums, true)
                    .expect("asked for");
                drop(gated);
                let residual_grad = skip.then_some(d_out);
                if let (Some(gate), Some(gate_tape)) = (gate, &tape.gate) {
                    let c = dw.channels;
                    let pixels = dw.height * dw.width;
                    let mut d_gate = vec![0.0f32; c];
                    backward::add_column_dots(&mut d_gate, &d_mid, &dw.data);
                    kernels::scale_channels(&mut d_mid, &gate_tape.gate);
                    let d_mean = gate.backward(gate_tape, &d_gate, sums);
                    let share: Vec<f32> = d_mean.iter().map(|d| d / pixels as f32).collect();
                    backward::add_to_rows(&mut d_mid, &share);
                }
                drop(dw);
                let need_dw_input = expand.is_some() || need_input;
                let d_dw_input = {
                    let expanded = expand.as_ref().zip(tape.expand.as_ref());
                    let expanded = expanded.map(|(conv, kept)| kept.output(conv.act));
                    depthwise.backward(
                        expanded.as_deref().unwrap_or(&tape.input),
                        Some(depthwise_kept),
                        &mut d_mid,
                        sums,
                        need_dw_input,
                    )
                };
                let mut d_input = match (expand, d_dw_input) {
                    (Some(conv), Some(mut d)) => {
                        conv.backward(&tape.input, tape.expand.as_ref(), &mut d, sums, need_input)
                    }
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
