//! A convolution and the BatchNorm after it, trained with frozen statistics: forward, backward
//! and the gradients of its weight, γ and β.

use std::sync::OnceLock;

use burn::nn::conv::Conv2d;

use super::super::bf16;
use super::super::buffers::Buffer;
use super::super::from_burn::{channels_last, values};
use super::super::kernels::backward::{self, activation_backward};
use super::super::kernels::{self, Act, Parallelism};
use super::super::units::Image;
use super::tiles::TiledWeights;
use super::{Layout, Plan, Sums};
use crate::batch_norm::BatchNorm2d;

#[derive(Clone, Copy)]
pub(super) enum Kind {
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
pub(super) struct ConvBn {
    kind: Kind,
    /// The weights `[rows][cols]`: 1x1 `[in][out]`, depthwise `[k·k][c]`, dense
    /// `[(tap, in)][out]`; `cols` is the output channels.
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    folded: Vec<f32>,
    /// Depthwise: `folded` with its taps in reverse order (the kernel turned round).
    turned: Vec<f32>,
    /// 1x1 and dense: `folded` transposed (`[cols][rows]`), made on the first input gradient.
    /// The gradient's product reads the weights column by column; the matrix library packs
    /// a transposed copy far faster than it transposes a row-major one itself.
    transposed: OnceLock<Vec<f32>>,
    /// 1x1 and dense, in a phase trained in bf16: the weights packed for the tiles.
    tiles: Option<TiledWeights>,
    bias: Vec<f32>,
    scale: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    pub(super) act: Act,
    /// ReLU on the input as it is read (depthwise only; Xception).
    input_relu: bool,
    /// Accumulators: `G` (`rows × cols`) and `Σ ∂pre` (`cols`).
    g: usize,
    sum: usize,
    weight: usize,
    /// The BatchNorm's γ and β, if there is one.
    gamma: Option<usize>,
    beta: Option<usize>,
    /// Whether any of its parameters trains (else the backward pass only carries the
    /// gradient through to its input).
    pub(super) trainable: bool,
}

impl ConvBn {
    pub(super) fn new(conv: &Conv2d, bn: Option<&BatchNorm2d>, act: Act, plan: &mut Plan) -> Self {
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
        let w = channels_last(&raw, [cout, in_per_group, k, k]);
        let (kind, rows) = if conv.groups > 1 {
            let kind = Kind::Depthwise {
                kernel: k,
                stride,
                pad,
            };
            (kind, taps)
        } else if k == 1 {
            (Kind::Pointwise { stride }, in_per_group)
        } else {
            let cin = in_per_group;
            let kind = Kind::Dense {
                kernel: k,
                stride,
                pad,
                cin,
            };
            (kind, taps * cin)
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
        let turned = match kind {
            Kind::Depthwise { .. } => folded.chunks_exact(cout).rev().flatten().copied().collect(),
            _ => Vec::new(),
        };
        let tiles = match (kind, plan.tiles) {
            (Kind::Depthwise { .. }, _) | (_, None) => None,
            (_, Some(unit)) => Some(TiledWeights::new(unit, &folded, rows, cout)),
        };
        let weight = plan.slot(&conv.weight);
        let gamma = bn.map(|bn| plan.slot(&bn.weight));
        let beta = bn.map(|bn| plan.slot(&bn.bias));
        let trainable = [Some(weight), gamma, beta]
            .into_iter()
            .flatten()
            .any(|slot| plan.slots[slot].trainable);
        Self {
            kind,
            rows,
            cols: cout,
            w,
            folded,
            turned,
            transposed: OnceLock::new(),
            tiles,
            bias,
            scale,
            mean,
            inv_std,
            act,
            input_relu: false,
            g: plan.accumulator(rows * cout),
            sum: plan.accumulator(cout),
            weight,
            gamma,
            beta,
            trainable,
        }
    }

    /// The depthwise kernels' view of this convolution on `x` (pre-activation output).
    fn depthwise_shape<'a>(
        &'a self,
        x: &Image,
        (kernel, stride, pad): (usize, usize, usize),
    ) -> kernels::DepthwiseShape<'a> {
        kernels::DepthwiseShape {
            input: shape(x),
            kernel,
            stride,
            pad,
            weights: &self.folded,
            bias: &self.bias,
            act: Act::Identity,
            input_relu: self.input_relu,
        }
    }

    pub(super) fn with_input_relu(mut self, input_relu: bool) -> Self {
        self.input_relu = input_relu;
        self
    }

    pub(super) fn output_shape(&self, x: &Image) -> (usize, usize) {
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

    /// Calls `f` with the input rows of a 1x1 convolution: `x` itself, or every `stride`-th
    /// pixel of it.
    fn with_pointwise_input<R>(&self, x: &Image, stride: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        if stride == 1 {
            return f(&x.data);
        }
        let (h, w) = self.output_shape(x);
        let mut subsampled = Buffer::new(h * w * x.channels);
        kernels::subsample(&x.data, shape(x), stride, &mut subsampled);
        f(&subsampled)
    }

    /// The pre-activation output (BatchNorm applied), plus `residual` when given.
    pub(super) fn forward(&self, x: &Image, residual: Option<&[f32]>) -> Image {
        let (h, w) = self.output_shape(x);
        let c = self.cols;
        let mut out = Buffer::new(h * w * c);
        match self.kind {
            Kind::Pointwise { stride } => {
                self.with_pointwise_input(x, stride, |input| {
                    self.product(&mut out, input, residual)
                });
            }
            Kind::Dense {
                kernel,
                stride,
                pad,
                ..
            } => {
                let mut patches = Buffer::new(h * w * self.rows);
                kernels::im2col(&x.data, shape(x), kernel, stride, pad, &mut patches);
                self.product(&mut out, &patches, residual);
            }
            Kind::Depthwise {
                kernel,
                stride,
                pad,
            } => {
                let dw = self.depthwise_shape(x, (kernel, stride, pad));
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

    /// `out = input · folded + bias + residual` for a 1x1 or dense convolution (`input` is
    /// `m × rows`): on the tiles in a phase trained in bf16, else in f32.
    fn product(&self, out: &mut [f32], input: &[f32], residual: Option<&[f32]>) {
        if let Some(tiles) = &self.tiles
            && tiles.forward(out, input, &self.bias, residual)
        {
            return;
        }
        kernels::fill_rows(out, &self.bias, residual);
        let (m, k, c) = (input.len() / self.rows, self.rows, self.cols);
        kernels::matmul(out, true, input, &self.folded, m, k, c, false);
    }

    /// `d_input = d_pre · foldedᵀ` for a 1x1 or dense convolution (`d_pre` is `m × cols`): on
    /// the tiles in a phase trained in bf16, else in f32.
    fn input_product(&self, d_input: &mut [f32], d_pre: &[f32]) {
        if let Some(tiles) = &self.tiles
            && tiles.input_gradient(d_input, d_pre, &self.folded)
        {
            return;
        }
        let (m, c, k) = (d_pre.len() / self.cols, self.cols, self.rows);
        kernels::matmul_strided(
            d_input,
            false,
            (d_pre, c, 1),
            (self.transposed(), k, 1),
            (m, c, k),
            Parallelism::None,
        );
    }

    /// `folded` as `[cols][rows]`.
    fn transposed(&self) -> &[f32] {
        self.transposed.get_or_init(|| {
            let (rows, cols) = (self.rows, self.cols);
            let mut t = vec![0.0; rows * cols];
            for (r, row) in self.folded.chunks_exact(cols).enumerate() {
                for (c, &value) in row.iter().enumerate() {
                    t[c * rows + r] = value;
                }
            }
            t
        })
    }

    /// The forward pass and its activation, keeping what the backward pass needs: ReLU's
    /// output, computed in place (its slope is read from it), else the pre-activation.
    pub(super) fn forward_kept(&self, x: &Image) -> Kept {
        let mut pre = self.forward(x, None);
        match self.act {
            Act::Relu => {
                pre.data.iter_mut().for_each(|v| *v = v.max(0.0));
                Kept::Output(pre)
            }
            Act::Identity | Act::HardSwish => Kept::Pre(pre),
        }
    }

    /// Turns `d_out` (the gradient of the activation's output) into that of the
    /// pre-activation, adds this image's `G` and `Σ ∂pre` to `sums`, and returns the gradient
    /// of the input when `need_input`. `kept` is what [`ConvBn::forward_kept`] kept; `None`
    /// when there is no activation (its output need not have been kept).
    pub(super) fn backward(
        &self,
        x: &Image,
        kept: Option<&Kept>,
        d_out: &mut [f32],
        sums: &mut Sums,
        need_input: bool,
    ) -> Option<Buffer> {
        match kept {
            Some(kept) => kept.slope(d_out, self.act),
            None => assert_eq!(self.act, Act::Identity, "the activation's input was kept"),
        }
        let d_pre: &[f32] = d_out;
        let c = self.cols;
        let (ho, wo) = self.output_shape(x);
        let pixels = ho * wo;
        if self.trainable {
            backward::add_column_sums(&mut sums.values[self.sum], d_pre);
        }
        match self.kind {
            Kind::Pointwise { stride } => {
                let k = self.rows;
                // G[k × c] += inputᵀ · ∂pre.
                if self.trainable {
                    self.with_pointwise_input(x, stride, |input| {
                        sums.add_product(self.g, (input, k), (d_pre, c), self.tile_unit())
                    });
                }
                need_input.then(|| {
                    // ∂input[p × k] = ∂pre · foldedᵀ, then back to the strided positions.
                    let mut d_input = Buffer::new(pixels * k);
                    self.input_product(&mut d_input, d_pre);
                    if stride == 1 {
                        return d_input;
                    }
                    let mut dx = Buffer::zeros(x.data.len());
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
                if self.trainable {
                    sums.add_product(self.g, (&patches, self.rows), (d_pre, c), self.tile_unit());
                }
                need_input.then(|| {
                    // ∂patches = ∂pre · foldedᵀ, each patch element added back to its pixel.
                    self.input_product(&mut patches, d_pre);
                    let mut dx = Buffer::zeros(x.data.len());
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
                let dw = self.depthwise_shape(x, (kernel, stride, pad));
                if self.trainable {
                    backward::depthwise_weight_gradient(
                        &dw,
                        &x.data,
                        d_pre,
                        &mut sums.values[self.g],
                    );
                }
                let mut dx = need_input.then(|| {
                    if stride > 1 {
                        let mut dx = Buffer::zeros(x.data.len());
                        backward::depthwise_input_gradient(&dw, d_pre, &mut dx);
                        return dx;
                    }
                    // With stride 1 the input's gradient is ∂pre convolved with the kernel
                    // turned round, padded so that it comes out at the input's size.
                    let mut dx = Buffer::new(x.data.len());
                    let zeros = vec![0.0; c];
                    let turned = kernels::DepthwiseShape {
                        input: (ho, wo, c),
                        kernel,
                        stride: 1,
                        pad: kernel - 1 - pad,
                        weights: &self.turned,
                        bias: &zeros,
                        act: Act::Identity,
                        input_relu: false,
                    };
                    kernels::depthwise(&turned, d_pre, &mut dx);
                    dx
                });
                if self.input_relu
                    && let Some(dx) = dx.as_mut()
                {
                    activation_backward(dx, &x.data, Act::Relu);
                }
                dx
            }
        }
    }

    /// The tiles this convolution's weight-gradient products run on, if any.
    fn tile_unit(&self) -> Option<bf16::TileUnit> {
        self.tiles.as_ref().map(|t| t.unit)
    }

    /// The gradients from the summed `G` and `Σ ∂pre`.
    pub(super) fn gradients(&self, sums: &Sums, out: &mut Vec<(usize, Vec<f32>, Layout)>) {
        let (g, sum) = (&sums.values[self.g], &sums.values[self.sum]);
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

pub(super) fn shape(x: &Image) -> (usize, usize, usize) {
    (x.height, x.width, x.channels)
}

/// What a convolution's backward pass keeps of its forward values.
pub(super) enum Kept {
    /// The pre-activation: hard swish's slope needs it, and without an activation it is the
    /// output. Hard swish's output is computed again when the backward pass needs it.
    Pre(Image),
    /// ReLU's output: its slope is 1 exactly where the output is positive, as where the input
    /// is, so the input need not be kept too.
    Output(Image),
}

impl Kept {
    /// The floats kept.
    pub(super) fn floats(&self) -> usize {
        match self {
            Kept::Pre(image) | Kept::Output(image) => image.data.len(),
        }
    }

    /// The activation's output: the kept values, or hard swish computed again.
    pub(super) fn output(&self, act: Act) -> Output<'_> {
        match (self, act) {
            (Kept::Output(out), _) | (Kept::Pre(out), Act::Identity) => Output::Kept(out),
            (Kept::Pre(pre), act) => Output::Computed(activated(pre, act)),
        }
    }

    /// `d ← d · act′`, from what was kept.
    fn slope(&self, d: &mut [f32], act: Act) {
        match self {
            Kept::Pre(pre) => activation_backward(d, &pre.data, act),
            Kept::Output(out) => {
                assert_eq!(act, Act::Relu, "only ReLU keeps its output");
                activation_backward(d, &out.data, Act::Relu)
            }
        }
    }
}

/// An activation's output in the backward pass (see [`Kept::output`]).
pub(super) enum Output<'a> {
    Kept(&'a Image),
    Computed(Image),
}

impl std::ops::Deref for Output<'_> {
    type Target = Image;
    fn deref(&self) -> &Image {
        match self {
            Output::Kept(image) => image,
            Output::Computed(image) => image,
        }
    }
}

pub(super) fn activated(pre: &Image, act: Act) -> Image {
    pre.mapped(|out, values| kernels::activate_into(out, values, act))
}
