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
use crate::xception::Xception;
use crate::xception::blocks::{RepLayer, XceptionBlock};

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
    Pointwise {
        stride: usize,
    },
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

/// A convolution and the BatchNorm after it (frozen statistics), trainable; without a
/// BatchNorm (Xception's depthwise half of a separable convolution) the scale is 1.
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
    /// ReLU on the input as it is read (depthwise only; Xception).
    input_relu: bool,
    /// Accumulators: `G` (`rows × cols`) and `Σ ∂pre` (`cols`).
    g: usize,
    sum: usize,
    weight: usize,
    /// The BatchNorm's γ and β, if there is one.
    gamma: Option<usize>,
    beta: Option<usize>,
}

impl ConvBn {
    fn new(conv: &Conv2d, bn: Option<&BatchNorm2d>, act: Act, plan: &mut Plan) -> Self {
        assert!(
            conv.bias.is_none(),
            "the backbones' convolutions have no bias"
        );
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
            let kind = Kind::Depthwise {
                kernel: k,
                stride,
                pad,
            };
            (kind, taps, w)
        } else if k == 1 {
            let cin = in_per_group;
            let mut w = vec![0.0; cin * cout];
            for o in 0..cout {
                for i in 0..cin {
                    w[i * cout + o] = raw[o * cin + i];
                }
            }
            (Kind::Pointwise { stride }, cin, w)
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
            let kind = Kind::Dense {
                kernel: k,
                stride,
                pad,
                cin,
            };
            (kind, taps * cin, w)
        };
        let (scale, mean, inv_std, bias) = match bn {
            Some(bn) => {
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
                (scale, mean, inv_std, bias)
            }
            None => (
                vec![1.0; cout],
                vec![0.0; cout],
                vec![1.0; cout],
                vec![0.0; cout],
            ),
        };
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
            input_relu: false,
            g: plan.accumulator(rows * cout),
            sum: plan.accumulator(cout),
            weight: plan.slot(&conv.weight),
            gamma: bn.map(|bn| plan.slot(&bn.weight)),
            beta: bn.map(|bn| plan.slot(&bn.bias)),
        }
    }

    fn with_input_relu(mut self, input_relu: bool) -> Self {
        self.input_relu = input_relu;
        self
    }

    fn output_shape(&self, x: &Image) -> (usize, usize) {
        match self.kind {
            Kind::Pointwise { stride } => (x.height.div_ceil(stride), x.width.div_ceil(stride)),
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

    /// The input of a strided 1x1 convolution: every `stride`-th pixel.
    fn subsampled(&self, x: &Image, stride: usize) -> Buffer {
        let (h, w) = self.output_shape(x);
        let mut buffer = Buffer::new(h * w * x.channels);
        kernels::subsample(&x.data, shape(x), stride, &mut buffer);
        buffer
    }

    /// The pre-activation output (BatchNorm applied), plus `residual` when given.
    fn forward(&self, x: &Image, residual: Option<&[f32]>) -> Image {
        let (h, w) = self.output_shape(x);
        let c = self.cols;
        let mut out = Buffer::new(h * w * c);
        match self.kind {
            Kind::Pointwise { stride } => {
                kernels::fill_rows(&mut out, &self.bias, residual);
                let subsampled;
                let input: &[f32] = if stride > 1 {
                    subsampled = self.subsampled(x, stride);
                    &subsampled
                } else {
                    &x.data
                };
                let m = h * w;
                kernels::matmul(&mut out, true, input, &self.folded, m, self.rows, c, false);
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
                let (m, k) = (h * w, self.rows);
                kernels::matmul(&mut out, true, &patches, &self.folded, m, k, c, false);
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
                    input_relu: self.input_relu,
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
        let (ho, wo) = self.output_shape(x);
        let pixels = ho * wo;
        {
            let sum = &mut sums.0[self.sum];
            for row in d_pre.chunks_exact(c) {
                sum.iter_mut().zip(row).for_each(|(s, d)| *s += d);
            }
        }
        match self.kind {
            Kind::Pointwise { stride } => {
                let k = self.rows;
                let subsampled;
                let input: &[f32] = if stride > 1 {
                    subsampled = self.subsampled(x, stride);
                    &subsampled
                } else {
                    &x.data
                };
                // G[k × c] += inputᵀ · ∂pre.
                kernels::matmul_strided(
                    &mut sums.0[self.g],
                    true,
                    (input, 1, k),
                    (d_pre, c, 1),
                    (k, pixels, c),
                    Parallelism::None,
                );
                need_input.then(|| {
                    // ∂input[p × k] = ∂pre · foldedᵀ, then back to the strided positions.
                    let mut d_input = Buffer::new(pixels * k);
                    kernels::matmul_strided(
                        &mut d_input,
                        false,
                        (d_pre, c, 1),
                        (&self.folded, 1, c),
                        (pixels, c, k),
                        Parallelism::None,
                    );
                    if stride == 1 {
                        return d_input;
                    }
                    let mut dx = Buffer::new(x.data.len());
                    dx.fill(0.0);
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let at = (oy * stride * x.width + ox * stride) * k;
                            dx[at..at + k].copy_from_slice(&d_input[(oy * wo + ox) * k..][..k]);
                        }
                    }
                    dx
                })
            }
            Kind::Dense {
                kernel,
                stride,
                pad,
                cin,
            } => {
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
                need_input.then(|| {
                    // ∂patches = ∂pre · foldedᵀ, each patch element added back to its pixel.
                    kernels::matmul_strided(
                        &mut patches,
                        false,
                        (d_pre, c, 1),
                        (&self.folded, 1, c),
                        (pixels, c, self.rows),
                        Parallelism::None,
                    );
                    let mut dx = Buffer::new(x.data.len());
                    dx.fill(0.0);
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let row = &patches[(oy * wo + ox) * self.rows..][..self.rows];
                            for ky in 0..kernel {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                for kx in 0..kernel {
                                    let ix = (ox * stride + kx) as isize - pad as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= x.height as isize
                                        || ix >= x.width as isize
                                    {
                                        continue;
                                    }
                                    let at = (iy as usize * x.width + ix as usize) * cin;
                                    let src = &row[(ky * kernel + kx) * cin..][..cin];
                                    dx[at..at + cin]
                                        .iter_mut()
                                        .zip(src)
                                        .for_each(|(d, s)| *d += s);
                                }
                            }
                        }
                    }
                    dx
                })
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
                for oy in 0..ho {
                    let iy0 = (oy * stride) as isize - pad as isize;
                    for ox in 0..wo {
                        let ix0 = (ox * stride) as isize - pad as isize;
                        let dp = &d_pre[(oy * wo + ox) * c..][..c];
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
                                if self.input_relu {
                                    for ((gv, d), xv) in gt.iter_mut().zip(dp).zip(xin) {
                                        *gv += d * xv.max(0.0);
                                    }
                                } else {
                                    for ((gv, d), xv) in gt.iter_mut().zip(dp).zip(xin) {
                                        *gv += d * xv;
                                    }
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
                if self.input_relu
                    && let Some(dx) = dx.as_mut()
                {
                    activation_backward(dx, &x.data, Act::Relu);
                }
                dx
            }
        }
    }

    /// The gradients from the summed `G` and `Σ ∂pre`.
    fn gradients(&self, sums: &Sums, out: &mut Vec<(usize, Vec<f32>, Layout)>) {
        let (g, sum) = (&sums.0[self.g], &sums.0[self.sum]);
        let c = self.cols;
        let dw: Vec<f32> = g
            .chunks_exact(c)
            .flat_map(|row| row.iter().zip(&self.scale).map(|(x, s)| x * s))
            .collect();
        let layout = match self.kind {
            Kind::Pointwise { .. } | Kind::Depthwise { .. } => Layout::Transposed {
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
        if let (Some(gamma), Some(beta)) = (self.gamma, self.beta) {
            let mut dgamma = vec![0.0f32; c];
            for (grow, wrow) in g.chunks_exact(c).zip(self.w.chunks_exact(c)) {
                for ((d, gv), wv) in dgamma.iter_mut().zip(grow).zip(wrow) {
                    *d += gv * wv;
                }
            }
            for ch in 0..c {
                dgamma[ch] = (dgamma[ch] - self.mean[ch] * sum[ch]) * self.inv_std[ch];
            }
            out.push((gamma, dgamma, Layout::Same));
            out.push((beta, sum.clone(), Layout::Same));
        }
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
struct RepTape {
    depthwise: Image,
    pre: Image,
    /// After the activation; `None` when there is none (then it is `pre`).
    output: Option<Image>,
}

impl RepTape {
    fn output(&self) -> &Image {
        self.output.as_ref().unwrap_or(&self.pre)
    }
}

fn separable_forward(depthwise: &ConvBn, pointwise: &ConvBn, x: &Image) -> RepTape {
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
fn separable_backward(
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
/// input of its window (PyTorch's choice).
fn max_pool_backward(x: &Image, stride: usize, d_out: &[f32], (ho, wo): (usize, usize)) -> Buffer {
    let c = x.channels;
    let mut dx = Buffer::new(x.data.len());
    dx.fill(0.0);
    for oy in 0..ho {
        let iy0 = (oy * stride) as isize - 1;
        for ox in 0..wo {
            let ix0 = (ox * stride) as isize - 1;
            for ch in 0..c {
                let mut best = (f32::NEG_INFINITY, usize::MAX);
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
                        let at = (iy as usize * x.width + ix as usize) * c + ch;
                        if x.data[at] > best.0 || best.1 == usize::MAX {
                            best = (x.data[at], at);
                        }
                    }
                }
                dx[best.1] += d_out[(oy * wo + ox) * c + ch];
            }
        }
    }
    dx
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
    /// Xception: each separable convolution's values, and the projecting shortcut's output.
    reps: Vec<RepTape>,
    shortcut: Option<Image>,
}

impl Tape {
    fn of(input: Image) -> Self {
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
    fn forward(&self, x: Image) -> (Image, Tape) {
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
            TrainUnit::XceptionBlock {
                reps,
                pool_stride,
                skip,
            } => {
                let mut d_shortcut = Buffer::from_slice(&d_out);
                let last = tape.reps.last().expect("kept").output();
                let mut d = if *pool_stride > 1 {
                    let ho = kernels::output_size(last.height, 3, *pool_stride, 1);
                    let wo = kernels::output_size(last.width, 3, *pool_stride, 1);
                    max_pool_backward(last, *pool_stride, &d_out, (ho, wo))
                } else {
                    d_out
                };
                for (i, (convs, rep)) in reps.iter().zip(&tape.reps).enumerate().rev() {
                    let input = if i == 0 {
                        &tape.input
                    } else {
                        tape.reps[i - 1].output()
                    };
                    let need = i > 0 || need_input;
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
    /// Whether `backbone` can be trained this way (both architectures of the registry).
    pub fn supports(backbone: &Backbone) -> bool {
        matches!(backbone, Backbone::MobileNetV3(_) | Backbone::Xception(_))
    }

    /// Units `units` of `backbone` (see [`Backbone::unit_count`]).
    pub fn new(backbone: &Backbone, units: Range<usize>) -> Self {
        let model = match backbone {
            Backbone::MobileNetV3(model) => model,
            Backbone::Xception(model) => return Self::xception(model, units),
        };
        let mut plan = Plan::default();
        let mut out = Vec::new();
        if units.contains(&0) {
            out.push(TrainUnit::Stem(ConvBn::new(
                &model.conv_stem,
                Some(&model.bn1),
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
                    depthwise: ConvBn::new(&b.conv_dw, Some(&b.bn1), act(b.activation), &mut plan),
                    gate: b.se.as_ref().map(|se| Gate::new(se, &mut plan)),
                    project: ConvBn::new(&b.conv_pw, Some(&b.bn2), Act::Identity, &mut plan),
                    skip: b.has_skip,
                },
                Block::InvertedResidual(b) => TrainUnit::Inverted {
                    expand: Some(ConvBn::new(
                        &b.conv_pw,
                        Some(&b.bn1),
                        act(b.activation),
                        &mut plan,
                    )),
                    depthwise: ConvBn::new(&b.conv_dw, Some(&b.bn2), act(b.activation), &mut plan),
                    gate: b.se.as_ref().map(|se| Gate::new(se, &mut plan)),
                    project: ConvBn::new(&b.conv_pwl, Some(&b.bn3), Act::Identity, &mut plan),
                    skip: b.has_skip,
                },
                Block::ConvBnAct(b) => TrainUnit::Last(ConvBn::new(
                    &b.conv,
                    Some(&b.bn1),
                    act(b.activation),
                    &mut plan,
                )),
            });
        }
        Self {
            units: out,
            first: units.start,
            plan,
        }
    }

    fn xception(model: &Xception, units: Range<usize>) -> Self {
        let mut plan = Plan::default();
        let mut out = Vec::new();
        let start = units.start;
        for unit in units {
            out.push(match unit {
                0 => TrainUnit::Stem(ConvBn::new(
                    &model.conv1,
                    Some(&model.bn1),
                    Act::Relu,
                    &mut plan,
                )),
                1 => TrainUnit::Stem(ConvBn::new(
                    &model.conv2,
                    Some(&model.bn2),
                    Act::Relu,
                    &mut plan,
                )),
                2..=13 => xception_block(model.blocks()[unit - 2], &mut plan),
                14 | 15 => {
                    let (conv, bn) = if unit == 14 {
                        (&model.conv3, &model.bn3)
                    } else {
                        (&model.conv4, &model.bn4)
                    };
                    TrainUnit::Separable(
                        ConvBn::new(&conv.conv1, None, Act::Identity, &mut plan),
                        ConvBn::new(&conv.pointwise, Some(bn), Act::Relu, &mut plan),
                    )
                }
                _ => panic!("Xception has {} units", crate::xception::UNITS),
            });
        }
        Self {
            units: out,
            first: start,
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

/// An Xception block's trainable form: ReLUs after a BatchNorm become that 1x1 half's
/// activation; the block's leading ReLU is applied as the first depthwise reads its input
/// (the shortcut takes the input before it).
fn xception_block(block: &XceptionBlock, plan: &mut Plan) -> TrainUnit {
    let mut reps: Vec<(ConvBn, ConvBn)> = Vec::new();
    let mut pending_relu = false;
    let mut pool_stride = 1;
    let mut layers = block.rep.iter().peekable();
    while let Some(layer) = layers.next() {
        match layer {
            RepLayer::Relu(_) => match reps.last_mut() {
                Some(previous) => previous.1.act = Act::Relu,
                None => pending_relu = true,
            },
            RepLayer::SeparableConv(sep) => {
                let bn = match layers.peek() {
                    Some(RepLayer::BatchNorm(bn)) => {
                        layers.next();
                        Some(bn)
                    }
                    _ => None,
                };
                let depthwise = ConvBn::new(&sep.conv1, None, Act::Identity, plan)
                    .with_input_relu(pending_relu);
                let pointwise = ConvBn::new(&sep.pointwise, bn, Act::Identity, plan);
                reps.push((depthwise, pointwise));
                pending_relu = false;
            }
            RepLayer::BatchNorm(_) => panic!("an Xception BatchNorm follows a separable conv"),
            RepLayer::MaxPool(pool) => pool_stride = pool.stride[0],
        }
    }
    let skip = block
        .skip
        .as_ref()
        .map(|conv| ConvBn::new(conv, block.skipbn.as_ref(), Act::Identity, plan));
    TrainUnit::XceptionBlock {
        reps,
        pool_stride,
        skip,
    }
}
