//! Training a MobileNetV3's trainable units on the CPU without burn's autodiff: the same folded,
//! channels-last kernels forward (keeping what the backward pass needs), then hand-written
//! gradients, accumulated per thread and handed to the optimizer as burn gradients.
//!
//! It covers what the recipe's phase 2 trains: every BatchNorm with frozen statistics (the
//! seed's `training=False`), so a convolution and its BatchNorm are one affine map
//! `pre = s · (x ⊛ w − μ) + β` with `s = γ / √(σ² + ε)`. For its gradients:
//! `∂w = G · s`, `∂γ = (Σ G ∘ w − μ · Σ ∂pre) / √(σ² + ε)`, `∂β = Σ ∂pre`, where
//! `G = xᵀ · ∂pre` (1x1), the patch products (dense) or the per-tap correlation (depthwise) —
//! all linear in `∂pre`, so `G` and `Σ ∂pre` are what each image adds to its thread's sums.

use std::ops::Range;

use burn::module::{Param, ParamId};
use burn::nn::conv::Conv2d;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::FeatureMap;
use super::buffers::Buffer;
use super::from_burn::{act, values};
use super::kernels::{self, Act, Parallelism};
use super::units::Image;
use crate::backbone::Backbone;
use crate::batch_norm::BatchNorm2d;
use crate::mobilenet_v3::blocks::Block;
use crate::squeeze_excite::SqueezeExcite;

/// How an accumulator's values become a parameter's gradient in burn's layout.
#[derive(Clone, Copy)]
enum Layout {
    /// Already in burn's layout (vectors).
    Same,
    /// `[rows][cols]` here, `[cols][rows]` in burn (1x1 and squeeze-excitation weights,
    /// depthwise weights `[k·k][c]` → `[c][1][k][k]`).
    Transposed { rows: usize, cols: usize },
    /// `[(tap, in)][out]` here, `[out][in][tap]` in burn (dense kernels).
    Dense {
        taps: usize,
        cin: usize,
        cout: usize,
    },
}

/// A parameter that receives a gradient.
struct Slot {
    id: ParamId,
    shape: Vec<usize>,
    trainable: bool,
}

/// Sizes of the per-thread accumulators, and the parameters they feed.
#[derive(Default)]
struct Plan {
    sizes: Vec<usize>,
    slots: Vec<Slot>,
}

impl Plan {
    fn accumulator(&mut self, size: usize) -> usize {
        self.sizes.push(size);
        self.sizes.len() - 1
    }

    fn slot<const D: usize>(&mut self, param: &Param<Tensor<D>>) -> usize {
        let value = param.val();
        self.slots.push(Slot {
            id: param.id,
            shape: value.dims().to_vec(),
            trainable: value.is_require_grad(),
        });
        self.slots.len() - 1
    }
}

/// Per-thread sums of every image's contributions.
struct Sums(Vec<Vec<f32>>);

impl Sums {
    fn new(sizes: &[usize]) -> Self {
        Self(sizes.iter().map(|&n| vec![0.0; n]).collect())
    }

    fn add(mut self, other: Sums) -> Self {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        self
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Pointwise,
    Depthwise {
        kernel: usize,
        stride: usize,
        pad: usize,
    },
    Dense {
        kernel: usize,
        stride: usize,
        pad: usize,
        cin: usize,
    },
}

/// A convolution and the BatchNorm after it (frozen statistics), trainable.
struct ConvBn {
    kind: Kind,
    /// The weights `[rows][cols]`: 1x1 `[in][out]`, depthwise `[k·k][c]`, dense
    /// `[(tap, in)][out]`; `cols` is the output channels.
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    folded: Vec<f32>,
    bias: Vec<f32>,
    scale: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    act: Act,
    /// Accumulators: `G` (`rows × cols`) and `Σ ∂pre` (`cols`).
    g: usize,
    sum: usize,
    weight: usize,
    gamma: usize,
    beta: usize,
}

impl ConvBn {
    fn new(conv: &Conv2d, bn: &BatchNorm2d, act: Act, plan: &mut Plan) -> Self {
        assert!(conv.bias.is_none(), "MobileNetV3 convolutions have no bias");
        let [cout, in_per_group, k, _] = conv.weight.val().dims();
        let raw = values(conv.weight.val());
        let pad = match conv.padding {
            burn::nn::PaddingConfig2d::Explicit(p, ..) => p,
            _ => 0,
        };
        let stride = conv.stride[0];
        let taps = k * k;
        let (kind, rows, w) = if conv.groups > 1 {
            let mut w = vec![0.0; taps * cout];
            for c in 0..cout {
                for t in 0..taps {
                    w[t * cout + c] = raw[c * taps + t];
                }
            }
            (
                Kind::Depthwise {
                    kernel: k,
                    stride,
                    pad,
                },
                taps,
                w,
            )
        } else if k == 1 {
            let cin = in_per_group;
            let mut w = vec![0.0; cin * cout];
            for o in 0..cout {
                for i in 0..cin {
                    w[i * cout + o] = raw[o * cin + i];
                }
            }
            (Kind::Pointwise, cin, w)
        } else {
            let cin = in_per_group;
            let mut w = vec![0.0; taps * cin * cout];
            for o in 0..cout {
                for i in 0..cin {
                    for t in 0..taps {
                        w[(t * cin + i) * cout + o] = raw[(o * cin + i) * taps + t];
                    }
                }
            }
            (
                Kind::Dense {
                    kernel: k,
                    stride,
                    pad,
                    cin,
                },
                taps * cin,
                w,
            )
        };
        let gamma = values(bn.weight.val());
        let beta = values(bn.bias.val());
        let mean = values(bn.running_mean.value());
        let var = values(bn.running_var.value());
        let inv_std: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (*v as f64 + bn.epsilon).sqrt()) as f32)
            .collect();
        let scale: Vec<f32> = gamma.iter().zip(&inv_std).map(|(g, i)| g * i).collect();
        let bias: Vec<f32> = (0..cout).map(|c| beta[c] - mean[c] * scale[c]).collect();
        let mut folded = w.clone();
        for row in folded.chunks_exact_mut(cout) {
            row.iter_mut().zip(&scale).for_each(|(x, s)| *x *= s);
        }
        Self {
            kind,
            rows,
            cols: cout,
            w,
            folded,
            bias,
            scale,
            mean,
            inv_std,
            act,
            g: plan.accumulator(rows * cout),
            sum: plan.accumulator(cout),
            weight: plan.slot(&conv.weight),
            gamma: plan.slot(&bn.weight),
            beta: plan.slot(&bn.bias),
        }
    }

    fn output_shape(&self, x: &Image) -> (usize, usize) {
        match self.kind {
            Kind::Pointwise => (x.height, x.width),
            Kind::Depthwise {
                kernel,
                stride,
                pad,
            }
            | Kind::Dense {
                kernel,
                stride,
                pad,
                ..
            } => (
                kernels::output_size(x.height, kernel, stride, pad),
                kernels::output_size(x.width, kernel, stride, pad),
            ),
        }
    }

    /// The pre-activation output (BatchNorm applied), plus `residual` when given.
    fn forward(&self, x: &Image, residual: Option<&[f32]>) -> Image {
        let (h, w) = self.output_shape(x);
        let c = self.cols;
        let mut out = Buffer::new(h * w * c);
        match self.kind {
            Kind::Pointwise => {
                kernels::fill_rows(&mut out, &self.bias, residual);
                let m = h * w;
                kernels::matmul(
                    &mut out,
                    true,
                    &x.data,
                    &self.folded,
                    m,
                    self.rows,
                    c,
                    false,
                );
            }
            Kind::Dense {
                kernel,
                stride,
                pad,
                ..
            } => {
                let mut patches = Buffer::new(h * w * self.rows);
                kernels::im2col(&x.data, shape(x), kernel, stride, pad, &mut patches);
                kernels::fill_rows(&mut out, &self.bias, residual);
                kernels::matmul(
                    &mut out,
                    true,
                    &patches,
                    &self.folded,
                    h * w,
                    self.rows,
                    c,
                    false,
                );
            }
            Kind::Depthwise {
                kernel,
                stride,
                pad,
            } => {
                let dw = kernels::DepthwiseShape {
                    input: shape(x),
                    kernel,
                    stride,
                    pad,
                    weights: &self.folded,
                    bias: &self.bias,
                    act: Act::Identity,
                    input_relu: false,
                };
                kernels::depthwise(&dw, &x.data, &mut out);
                assert!(residual.is_none());
            }
        }
        Image {
            data: out,
            height: h,
            width: w,
            channels: c,
        }
    }

    /// Turns `d_out` (the gradient of the activation's output) into that of the
    /// pre-activation, adds this image's `G` and `Σ ∂pre` to `sums`, and returns the gradient
    /// of the input when `need_input`.
    fn backward(
        &self,
        x: &Image,
        pre: &Image,
        d_out: &mut [f32],
        sums: &mut Sums,
        need_input: bool,
    ) -> Option<Buffer> {
        activation_backward(d_out, &pre.data, self.act);
        let d_pre: &[f32] = d_out;
        let c = self.cols;
        let pixels = pre.height * pre.width;
        {
            let sum = &mut sums.0[self.sum];
            for row in d_pre.chunks_exact(c) {
                sum.iter_mut().zip(row).for_each(|(s, d)| *s += d);
            }
        }
        match self.kind {
            Kind::Pointwise => {
                let k = self.rows;
                // G[k × c] += xᵀ · ∂pre.
                kernels::matmul_strided(
                    &mut sums.0[self.g],
                    true,
                    (&x.data, 1, k),
                    (d_pre, c, 1),
                    (k, pixels, c),
                    Parallelism::None,
                );
                need_input.then(|| {
                    let mut dx = Buffer::new(pixels * k);
                    // ∂x[p × k] = ∂pre · foldedᵀ.
                    kernels::matmul_strided(
                        &mut dx,
                        false,
                        (d_pre, c, 1),
                        (&self.folded, 1, c),
                        (pixels, c, k),
                        Parallelism::None,
                    );
                    dx
                })
            }
            Kind::Dense {
                kernel,
                stride,
                pad,
                ..
            } => {
                assert!(!need_input, "a dense convolution is the first unit");
                let mut patches = Buffer::new(pixels * self.rows);
                kernels::im2col(&x.data, shape(x), kernel, stride, pad, &mut patches);
                kernels::matmul_strided(
                    &mut sums.0[self.g],
                    true,
                    (&patches, 1, self.rows),
                    (d_pre, c, 1),
                    (self.rows, pixels, c),
                    Parallelism::None,
                );
                None
            }
            Kind::Depthwise {
                kernel,
                stride,
                pad,
            } => {
                let mut dx = need_input.then(|| {
                    let mut b = Buffer::new(x.data.len());
                    b.fill(0.0);
                    b
                });
                let g = &mut sums.0[self.g];
                let (h, w) = (x.height, x.width);
                for oy in 0..pre.height {
                    let iy0 = (oy * stride) as isize - pad as isize;
                    for ox in 0..pre.width {
                        let ix0 = (ox * stride) as isize - pad as isize;
                        let dp = &d_pre[(oy * pre.width + ox) * c..][..c];
                        for ky in 0..kernel {
                            let iy = iy0 + ky as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kernel {
                                let ix = ix0 + kx as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let tap = ky * kernel + kx;
                                let at = (iy as usize * w + ix as usize) * c;
                                let xin = &x.data[at..at + c];
                                let gt = &mut g[tap * c..][..c];
                                for ((gv, d), xv) in gt.iter_mut().zip(dp).zip(xin) {
                                    *gv += d * xv;
                                }
                                if let Some(dx) = dx.as_mut() {
                                    let wt = &self.folded[tap * c..][..c];
                                    let dxs = &mut dx[at..at + c];
                                    for ((o, d), wv) in dxs.iter_mut().zip(dp).zip(wt) {
                                        *o += d * wv;
                                    }
                                }
                            }
                        }
                    }
                }
                dx
            }
        }
    }

    /// The three gradients from the summed `G` and `Σ ∂pre`.
    fn gradients(&self, sums: &Sums, out: &mut Vec<(usize, Vec<f32>, Layout)>) {
        let (g, sum) = (&sums.0[self.g], &sums.0[self.sum]);
        let c = self.cols;
        let dw: Vec<f32> = g
            .chunks_exact(c)
            .flat_map(|row| row.iter().zip(&self.scale).map(|(x, s)| x * s))
            .collect();
        let mut dgamma = vec![0.0f32; c];
        for (grow, wrow) in g.chunks_exact(c).zip(self.w.chunks_exact(c)) {
            for ((d, gv), wv) in dgamma.iter_mut().zip(grow).zip(wrow) {
                *d += gv * wv;
            }
        }
        for ch in 0..c {
            dgamma[ch] = (dgamma[ch] - self.mean[ch] * sum[ch]) * self.inv_std[ch];
        }
        let layout = match self.kind {
            Kind::Pointwise | Kind::Depthwise { .. } => Layout::Transposed {
                rows: self.rows,
                cols: c,
            },
            Kind::Dense { kernel, cin, .. } => Layout::Dense {
                taps: kernel * kernel,
                cin,
                cout: c,
            },
        };
        out.push((self.weight, dw, layout));
        out.push((self.gamma, dgamma, Layout::Same));
        out.push((self.beta, sum.clone(), Layout::Same));
    }
}

fn shape(x: &Image) -> (usize, usize, usize) {
    (x.height, x.width, x.channels)
}

fn activation_backward(d: &mut [f32], pre: &[f32], act: Act) {
    match act {
        Act::Identity => {}
        Act::Relu => d
            .iter_mut()
            .zip(pre)
            .for_each(|(d, p)| *d = if *p > 0.0 { *d } else { 0.0 }),
        Act::HardSwish => d.iter_mut().zip(pre).for_each(|(d, p)| {
            *d *= if *p <= -3.0 {
                0.0
            } else if *p >= 3.0 {
                1.0
            } else {
                (2.0 * p + 3.0) / 6.0
            }
        }),
    }
}

fn activated(pre: &Image, act: Act) -> Image {
    let mut data = Buffer::from_slice(&pre.data);
    kernels::activate(&mut data, act);
    Image {
        data,
        height: pre.height,
        width: pre.width,
        channels: pre.channels,
    }
}

/// Squeeze-excitation with its four parameters.
struct Gate {
    channels: usize,
    reduced: usize,
    /// `[c][r]`, `[r]`, `[r][c]`, `[c]`.
    reduce_w: Vec<f32>,
    reduce_b: Vec<f32>,
    expand_w: Vec<f32>,
    expand_b: Vec<f32>,
    /// Accumulators (also the gradients, in the same layouts) and slots.
    acc: [usize; 4],
    slots: [usize; 4],
}

struct GateTape {
    mean: Vec<f32>,
    reduced: Vec<f32>,
    pre: Vec<f32>,
    gate: Vec<f32>,
}

impl Gate {
    fn new(se: &SqueezeExcite, plan: &mut Plan) -> Self {
        let transpose = |conv: &Conv2d| {
            let [out, cin, _, _] = conv.weight.val().dims();
            let raw = values(conv.weight.val());
            let mut w = vec![0.0; out * cin];
            for o in 0..out {
                for i in 0..cin {
                    w[i * out + o] = raw[o * cin + i];
                }
            }
            w
        };
        let bias = |conv: &Conv2d| values(conv.bias.as_ref().expect("SE convs have a bias").val());
        let [reduced, channels, _, _] = se.conv_reduce.weight.val().dims();
        let (rb, eb) = (
            se.conv_reduce.bias.as_ref().expect("bias"),
            se.conv_expand.bias.as_ref().expect("bias"),
        );
        Self {
            channels,
            reduced,
            reduce_w: transpose(&se.conv_reduce),
            reduce_b: bias(&se.conv_reduce),
            expand_w: transpose(&se.conv_expand),
            expand_b: bias(&se.conv_expand),
            acc: [
                plan.accumulator(channels * reduced),
                plan.accumulator(reduced),
                plan.accumulator(reduced * channels),
                plan.accumulator(channels),
            ],
            slots: [
                plan.slot(&se.conv_reduce.weight),
                plan.slot(rb),
                plan.slot(&se.conv_expand.weight),
                plan.slot(eb),
            ],
        }
    }

    fn forward(&self, x: &Image) -> GateTape {
        let mut mean = vec![0.0; self.channels];
        kernels::mean_over_pixels(&x.data, x.height * x.width, &mut mean);
        let mut reduced = vec![0.0; self.reduced];
        kernels::vector_matmul(&mean, &self.reduce_w, &self.reduce_b, &mut reduced);
        reduced.iter_mut().for_each(|v| *v = v.max(0.0));
        let mut pre = vec![0.0; self.channels];
        kernels::vector_matmul(&reduced, &self.expand_w, &self.expand_b, &mut pre);
        let gate = pre
            .iter()
            .map(|g| (g + 3.0).clamp(0.0, 6.0) / 6.0)
            .collect();
        GateTape {
            mean,
            reduced,
            pre,
            gate,
        }
    }

    /// Given `∂gate` per channel, adds the parameters' gradients and returns `∂mean`.
    fn backward(&self, tape: &GateTape, d_gate: &[f32], sums: &mut Sums) -> Vec<f32> {
        let (c, r) = (self.channels, self.reduced);
        let d_pre: Vec<f32> = d_gate
            .iter()
            .zip(&tape.pre)
            .map(|(d, p)| if *p > -3.0 && *p < 3.0 { d / 6.0 } else { 0.0 })
            .collect();
        let mut d_reduced = vec![0.0f32; r];
        for (j, dr) in d_reduced.iter_mut().enumerate() {
            let row = &self.expand_w[j * c..][..c];
            let g = &mut sums.0[self.acc[2]][j * c..][..c];
            let mut acc = 0.0;
            for ((gv, w), d) in g.iter_mut().zip(row).zip(&d_pre) {
                *gv += tape.reduced[j] * d;
                acc += w * d;
            }
            *dr = if tape.reduced[j] > 0.0 { acc } else { 0.0 };
        }
        sums.0[self.acc[3]]
            .iter_mut()
            .zip(&d_pre)
            .for_each(|(s, d)| *s += d);
        sums.0[self.acc[1]]
            .iter_mut()
            .zip(&d_reduced)
            .for_each(|(s, d)| *s += d);
        let mut d_mean = vec![0.0f32; c];
        for (i, dm) in d_mean.iter_mut().enumerate() {
            let row = &self.reduce_w[i * r..][..r];
            let g = &mut sums.0[self.acc[0]][i * r..][..r];
            let mut acc = 0.0;
            for ((gv, w), d) in g.iter_mut().zip(row).zip(&d_reduced) {
                *gv += tape.mean[i] * d;
                acc += w * d;
            }
            *dm = acc;
        }
        d_mean
    }

    fn gradients(&self, sums: &Sums, out: &mut Vec<(usize, Vec<f32>, Layout)>) {
        let (c, r) = (self.channels, self.reduced);
        out.push((
            self.slots[0],
            sums.0[self.acc[0]].clone(),
            Layout::Transposed { rows: c, cols: r },
        ));
        out.push((self.slots[1], sums.0[self.acc[1]].clone(), Layout::Same));
        out.push((
            self.slots[2],
            sums.0[self.acc[2]].clone(),
            Layout::Transposed { rows: r, cols: c },
        ));
        out.push((self.slots[3], sums.0[self.acc[3]].clone(), Layout::Same));
    }
}

// One per unit of a model; the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum TrainUnit {
    Stem(ConvBn),
    Inverted {
        expand: Option<ConvBn>,
        depthwise: ConvBn,
        gate: Option<Gate>,
        project: ConvBn,
        skip: bool,
    },
    Last(ConvBn),
}

/// What one unit kept of one image for its backward pass.
struct Tape {
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
}

impl TrainUnit {
    fn forward(&self, x: Image) -> (Image, Tape) {
        match self {
            TrainUnit::Stem(conv) | TrainUnit::Last(conv) => {
                let pre = conv.forward(&x, None);
                let out = activated(&pre, conv.act);
                let tape = Tape {
                    input: x,
                    expand_pre: None,
                    expanded: None,
                    depthwise_pre: empty(),
                    depthwise: empty(),
                    gate: None,
                    gated: None,
                    pre: Some(pre),
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
                    let mut data = Buffer::from_slice(&dw.data);
                    kernels::scale_channels(&mut data, &t.gate);
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
                    input: x,
                    expand_pre,
                    expanded,
                    depthwise_pre,
                    depthwise: dw,
                    gate: gate_tape,
                    gated,
                    pre: None,
                };
                (out, tape)
            }
        }
    }

    /// Gradient of the unit's input (when `need_input`) from that of its output.
    fn backward(
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
            TrainUnit::Inverted {
                expand,
                depthwise,
                gate,
                project,
                skip,
            } => {
                // The projection has no activation: its pre-activation is its output.
                let projected_input = tape.gated.as_ref().unwrap_or(&tape.depthwise);
                let residual_grad = skip.then(|| Buffer::from_slice(&d_out));
                let mut d_mid = project
                    .backward(projected_input, projected_input, &mut d_out, sums, true)
                    .expect("asked for");
                if let (Some(gate), Some(gate_tape)) = (gate, &tape.gate) {
                    let c = tape.depthwise.channels;
                    let pixels = tape.depthwise.height * tape.depthwise.width;
                    let mut d_gate = vec![0.0f32; c];
                    for (dm, x) in d_mid
                        .chunks_exact(c)
                        .zip(tape.depthwise.data.chunks_exact(c))
                    {
                        d_gate
                            .iter_mut()
                            .zip(dm)
                            .zip(x)
                            .for_each(|((g, d), x)| *g += d * x);
                    }
                    kernels::scale_channels(&mut d_mid, &gate_tape.gate);
                    let d_mean = gate.backward(gate_tape, &d_gate, sums);
                    let share: Vec<f32> = d_mean.iter().map(|d| d / pixels as f32).collect();
                    for row in d_mid.chunks_exact_mut(c) {
                        row.iter_mut().zip(&share).for_each(|(d, s)| *d += s);
                    }
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

    fn gradients(&self, sums: &Sums, out: &mut Vec<(usize, Vec<f32>, Layout)>) {
        match self {
            TrainUnit::Stem(conv) | TrainUnit::Last(conv) => conv.gradients(sums, out),
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

/// The gradient of one parameter.
pub struct ParamGradient {
    /// The parameter.
    pub id: ParamId,
    /// Its gradient, shaped as the parameter.
    pub values: TensorData,
}

/// The trainable units of a MobileNetV3 whose BatchNorms use frozen statistics, with their
/// current weights: a forward pass that keeps what the backward pass needs, and gradients
/// for every parameter that requires one. Built again after every optimizer step.
pub struct TrainableUnits {
    units: Vec<TrainUnit>,
    first: usize,
    plan: Plan,
}

/// One image's pooled features, tapes and last feature-map size.
type ImageResult = (Vec<f32>, Vec<Tape>, (usize, usize));

/// What [`TrainableUnits::forward`] kept for [`TrainableUnits::backward`].
pub struct Activations {
    tapes: Vec<(Vec<Tape>, (usize, usize))>,
}

impl TrainableUnits {
    /// Whether `backbone` can be trained this way (MobileNetV3; Xception trains with burn).
    pub fn supports(backbone: &Backbone) -> bool {
        matches!(backbone, Backbone::MobileNetV3(_))
    }

    /// Units `units` of `backbone`. Panics unless [`TrainableUnits::supports`] says yes.
    pub fn new(backbone: &Backbone, units: Range<usize>) -> Self {
        let Backbone::MobileNetV3(model) = backbone else {
            panic!("only MobileNetV3 trains on the folded kernels")
        };
        let mut plan = Plan::default();
        let mut out = Vec::new();
        if units.contains(&0) {
            out.push(TrainUnit::Stem(ConvBn::new(
                &model.conv_stem,
                &model.bn1,
                Act::HardSwish,
                &mut plan,
            )));
        }
        let first_block = units.start.max(1) - 1;
        let count = units.end.saturating_sub(1).saturating_sub(first_block);
        for block in model.blocks.iter().flatten().skip(first_block).take(count) {
            out.push(match block {
                Block::DepthwiseSeparable(b) => TrainUnit::Inverted {
                    expand: None,
                    depthwise: ConvBn::new(&b.conv_dw, &b.bn1, act(b.activation), &mut plan),
                    gate: b.se.as_ref().map(|se| Gate::new(se, &mut plan)),
                    project: ConvBn::new(&b.conv_pw, &b.bn2, Act::Identity, &mut plan),
                    skip: b.has_skip,
                },
                Block::InvertedResidual(b) => TrainUnit::Inverted {
                    expand: Some(ConvBn::new(
                        &b.conv_pw,
                        &b.bn1,
                        act(b.activation),
                        &mut plan,
                    )),
                    depthwise: ConvBn::new(&b.conv_dw, &b.bn2, act(b.activation), &mut plan),
                    gate: b.se.as_ref().map(|se| Gate::new(se, &mut plan)),
                    project: ConvBn::new(&b.conv_pwl, &b.bn3, Act::Identity, &mut plan),
                    skip: b.has_skip,
                },
                Block::ConvBnAct(b) => {
                    TrainUnit::Last(ConvBn::new(&b.conv, &b.bn1, act(b.activation), &mut plan))
                }
            });
        }
        Self {
            units: out,
            first: units.start,
            plan,
        }
    }

    /// The pooled features `[batch][channels]` of `input` (the frozen prefix's output, or the
    /// normalised images when these units start at the stem), and what the backward pass needs.
    pub fn forward(&self, input: &FeatureMap) -> (Vec<f32>, Activations) {
        let per_image = input.height * input.width * input.channels;
        let results: Vec<ImageResult> = input
            .values
            .par_chunks(per_image)
            .map(|values| {
                let mut x = Image {
                    data: Buffer::from_slice(values),
                    height: input.height,
                    width: input.width,
                    channels: input.channels,
                };
                let mut tapes = Vec::with_capacity(self.units.len());
                for unit in &self.units {
                    let (out, tape) = unit.forward(x);
                    tapes.push(tape);
                    x = out;
                }
                let mut pooled = vec![0.0; x.channels];
                kernels::mean_over_pixels(&x.data, x.height * x.width, &mut pooled);
                (pooled, tapes, (x.height, x.width))
            })
            .collect();
        let mut pooled = Vec::new();
        let mut tapes = Vec::new();
        for (p, t, shape) in results {
            pooled.extend(p);
            tapes.push((t, shape));
        }
        (pooled, Activations { tapes })
    }

    /// The gradient of every trainable parameter of these units, in burn's layout, given the
    /// gradient of the loss with respect to the pooled features (`[batch][channels]`).
    pub fn backward(&self, activations: Activations, d_pooled: &[f32]) -> Vec<ParamGradient> {
        let images = activations.tapes.len().max(1);
        let channels = d_pooled.len() / images;
        // One accumulator per group of images (each is the size of the parameters), and fixed
        // groups added in order: the same sums, bit for bit, on every run with these threads.
        let per_group = images.div_ceil(rayon::current_num_threads());
        let mut work: Vec<_> = activations
            .tapes
            .into_iter()
            .zip(d_pooled.chunks(channels))
            .collect();
        let mut groups = Vec::new();
        while !work.is_empty() {
            let rest = work.split_off(work.len().min(per_group));
            groups.push(std::mem::replace(&mut work, rest));
        }
        let sums = groups
            .into_par_iter()
            .map(|group| {
                let mut sums = Sums::new(&self.plan.sizes);
                for ((tapes, (h, w)), dp) in group {
                    self.backward_image(&tapes, (h, w), dp, &mut sums);
                }
                sums
            })
            .collect::<Vec<_>>()
            .into_iter()
            .reduce(Sums::add)
            .unwrap_or_else(|| Sums::new(&self.plan.sizes));
        let mut gradients = Vec::new();
        for unit in &self.units {
            unit.gradients(&sums, &mut gradients);
        }
        let mut out = Vec::new();
        for (slot, values, layout) in gradients {
            let slot = &self.plan.slots[slot];
            if !slot.trainable {
                continue;
            }
            let values = match layout {
                Layout::Same => values,
                Layout::Transposed { rows, cols } => {
                    let mut t = vec![0.0; values.len()];
                    for r in 0..rows {
                        for c in 0..cols {
                            t[c * rows + r] = values[r * cols + c];
                        }
                    }
                    t
                }
                Layout::Dense { taps, cin, cout } => {
                    let mut t = vec![0.0; values.len()];
                    for tap in 0..taps {
                        for i in 0..cin {
                            for o in 0..cout {
                                t[(o * cin + i) * taps + tap] = values[(tap * cin + i) * cout + o];
                            }
                        }
                    }
                    t
                }
            };
            out.push(ParamGradient {
                id: slot.id,
                values: TensorData::new(values, slot.shape.clone()),
            });
        }
        out
    }

    /// Adds one image's contributions to `sums`, from the gradient of its pooled features.
    fn backward_image(&self, tapes: &[Tape], (h, w): (usize, usize), dp: &[f32], sums: &mut Sums) {
        let channels = dp.len();
        let mut d = Buffer::new(h * w * channels);
        let share: Vec<f32> = dp.iter().map(|v| v / (h * w) as f32).collect();
        for row in d.chunks_exact_mut(channels) {
            row.copy_from_slice(&share);
        }
        for (i, (unit, tape)) in self.units.iter().zip(tapes).enumerate().rev() {
            // The first unit's input gradient is not needed: nothing before it trains.
            match unit.backward(tape, d, sums, i > 0) {
                Some(next) => d = next,
                None => break,
            }
        }
    }

    /// The first unit these train.
    pub fn first_unit(&self) -> usize {
        self.first
    }
}
