//! The layers of a folded network and how each runs on one channels-last image. A *unit* is
//! the granularity at which a backbone can be split between its frozen start and its
//! trainable rest: MobileNetV3's stem and each of its blocks, Xception's stem convolutions,
//! blocks and exit convolutions.

use super::bf16::{self, PackedWeights, TileUnit};
use super::buffers::Buffer;
use super::kernels::{self, Act, DepthwiseShape};

/// A convolution's weights rounded to bf16 and packed for AMX tiles (`--precision bf16`),
/// and what computes with them.
pub struct Bf16Weights {
    pub(crate) packed: PackedWeights,
    pub(crate) unit: TileUnit,
}

impl Bf16Weights {
    /// Products with fewer inputs than one tile row (32) waste most of each tile: they stay
    /// in f32.
    const MIN_INPUTS: usize = 32;

    /// `weights` (`k × n`) packed, or `None` for a product too small to gain.
    fn new(weights: &[f32], (k, n): (usize, usize), unit: TileUnit) -> Option<Box<Self>> {
        (k >= Self::MIN_INPUTS).then(|| {
            Box::new(Self {
                packed: PackedWeights::new(weights, k, n),
                unit,
            })
        })
    }
}

/// One image's activations, `[height][width][channels]`.
pub struct Image {
    /// The values.
    pub data: Buffer,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Channels.
    pub channels: usize,
}

impl Image {
    fn shape(&self) -> (usize, usize, usize) {
        (self.height, self.width, self.channels)
    }

    /// A new image of this one's shape, whose values `write` writes from this one's.
    pub(super) fn mapped(&self, write: impl FnOnce(&mut [f32], &[f32])) -> Image {
        let mut data = Buffer::new(self.data.len());
        write(&mut data, &self.data);
        Image {
            data,
            height: self.height,
            width: self.width,
            channels: self.channels,
        }
    }
}

/// A dense `k × k` convolution with its BatchNorm folded in, as one matrix product over
/// the image's patches.
pub struct DenseConv {
    pub(crate) in_channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) pad: usize,
    /// `[(ky, kx, in)][out]`.
    pub(crate) weights: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) act: Act,
    /// The weights for bf16 products, when the network computes in bf16.
    pub(crate) bf16: Option<Box<Bf16Weights>>,
}

impl DenseConv {
    /// Compute the product in bf16 on `unit` from now on (where it is large enough to gain).
    pub(crate) fn use_bf16(&mut self, unit: TileUnit) {
        let k = self.kernel * self.kernel * self.in_channels;
        self.bf16 = Bf16Weights::new(&self.weights, (k, self.out_channels), unit);
    }

    fn output_shape(&self, (h, w): (usize, usize)) -> (usize, usize, usize) {
        let size = |x| kernels::output_size(x, self.kernel, self.stride, self.pad);
        (size(h), size(w), self.out_channels)
    }

    fn forward(&self, x: &Image, threads: bool) -> Image {
        let (ho, wo, cout) = self.output_shape((x.height, x.width));
        let patches = kernels::Patches {
            input: &x.data,
            shape: x.shape(),
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad,
        };
        let mut out = Buffer::new(ho * wo * cout);
        match &self.bf16 {
            Some(w) => {
                let epilogue = bf16::Epilogue {
                    bias: &self.bias,
                    residual: None,
                    act: self.act,
                };
                // Each patch rounded as it is made: no f32 copy of them all.
                bf16::matmul_patches(&mut out, &patches, &w.packed, &epilogue, w.unit, threads);
            }
            None => {
                let patch = patches.row_len();
                let mut rows = Buffer::new(ho * wo * patch);
                patches.write_all(&mut rows);
                kernels::fill_rows(&mut out, &self.bias, None);
                kernels::matmul(
                    &mut out,
                    true,
                    &rows,
                    &self.weights,
                    ho * wo,
                    patch,
                    cout,
                    threads,
                );
                kernels::activate(&mut out, self.act);
            }
        }
        Image {
            data: out,
            height: ho,
            width: wo,
            channels: cout,
        }
    }
}

/// A 1x1 convolution (optionally strided) with its BatchNorm folded in: one matrix product.
pub struct Pointwise {
    pub(crate) in_channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) stride: usize,
    /// `[in][out]`.
    pub(crate) weights: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) act: Act,
    /// The weights for bf16 products, when the network computes in bf16.
    pub(crate) bf16: Option<Box<Bf16Weights>>,
}

impl Pointwise {
    /// Compute the product in bf16 on `unit` from now on (where it is large enough to gain).
    pub(crate) fn use_bf16(&mut self, unit: TileUnit) {
        let shape = (self.in_channels, self.out_channels);
        self.bf16 = Bf16Weights::new(&self.weights, shape, unit);
    }

    fn output_shape(&self, (h, w): (usize, usize)) -> (usize, usize, usize) {
        (
            h.div_ceil(self.stride),
            w.div_ceil(self.stride),
            self.out_channels,
        )
    }

    /// The convolution of `x`, plus `residual` (same shape as the output) when given; `gate`
    /// scales the input channels (squeeze-excitation), applied to the weights here.
    fn forward(
        &self,
        x: &Image,
        residual: Option<&[f32]>,
        gate: Option<&[f32]>,
        threads: bool,
    ) -> Image {
        let (ho, wo, cout) = self.output_shape((x.height, x.width));
        let (m, k) = (ho * wo, self.in_channels);
        let subsampled;
        let input: &[f32] = if self.stride > 1 {
            let mut buffer = Buffer::new(m * k);
            kernels::subsample(&x.data, x.shape(), self.stride, &mut buffer);
            subsampled = buffer;
            &subsampled
        } else {
            &x.data
        };
        let mut out = Buffer::new(m * cout);
        match &self.bf16 {
            Some(w) => {
                let epilogue = bf16::Epilogue {
                    bias: &self.bias,
                    residual,
                    act: self.act,
                };
                // The gate scales the activations' columns as they are rounded.
                bf16::matmul(&mut out, input, gate, &w.packed, &epilogue, w.unit, threads);
            }
            None => {
                let gated;
                let weights: &[f32] = match gate {
                    Some(gate) => {
                        let mut buffer = Buffer::from_slice(&self.weights);
                        for (row, g) in buffer.chunks_exact_mut(cout).zip(gate) {
                            row.iter_mut().for_each(|w| *w *= *g);
                        }
                        gated = buffer;
                        &gated
                    }
                    None => &self.weights,
                };
                kernels::fill_rows(&mut out, &self.bias, residual);
                kernels::matmul(&mut out, true, input, weights, m, k, cout, threads);
                kernels::activate(&mut out, self.act);
            }
        }
        Image {
            data: out,
            height: ho,
            width: wo,
            channels: cout,
        }
    }
}

/// A depthwise convolution with its BatchNorm (if any) folded in.
pub struct Depthwise {
    pub(crate) channels: usize,
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) pad: usize,
    /// `[kernel · kernel][channels]`.
    pub(crate) weights: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) act: Act,
    pub(crate) input_relu: bool,
}

impl Depthwise {
    fn output_shape(&self, (h, w): (usize, usize)) -> (usize, usize, usize) {
        let size = |x| kernels::output_size(x, self.kernel, self.stride, self.pad);
        (size(h), size(w), self.channels)
    }

    fn shape(&self, x: &Image) -> DepthwiseShape<'_> {
        DepthwiseShape {
            input: x.shape(),
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad,
            weights: &self.weights,
            bias: &self.bias,
            act: self.act,
            input_relu: self.input_relu,
        }
    }

    fn forward(&self, x: &Image) -> Image {
        let (ho, wo, c) = self.output_shape((x.height, x.width));
        let mut out = Buffer::new(ho * wo * c);
        kernels::depthwise(&self.shape(x), &x.data, &mut out);
        Image {
            data: out,
            height: ho,
            width: wo,
            channels: c,
        }
    }

    /// `pointwise` applied to this convolution of `x`, plus `residual` when given. With the
    /// product in bf16, the depthwise outputs are made 32 pixels at a time as the product
    /// rounds them, never all written out in f32.
    fn then_pointwise(
        &self,
        pointwise: &Pointwise,
        x: &Image,
        residual: Option<&[f32]>,
        threads: bool,
    ) -> Image {
        let Some(w) = pointwise.bf16.as_ref().filter(|_| pointwise.stride == 1) else {
            return pointwise.forward(&self.forward(x), residual, None, threads);
        };
        let (ho, wo, _) = self.output_shape((x.height, x.width));
        let cout = pointwise.out_channels;
        let mut out = Buffer::new(ho * wo * cout);
        let epilogue = bf16::Epilogue {
            bias: &pointwise.bias,
            residual,
            act: pointwise.act,
        };
        let shape = self.shape(x);
        let make =
            |pixels, rows: &mut [f32]| kernels::depthwise_pixels(&shape, &x.data, pixels, rows);
        bf16::matmul_made(
            &mut out,
            ho * wo,
            make,
            &w.packed,
            &epilogue,
            w.unit,
            threads,
        );
        Image {
            data: out,
            height: ho,
            width: wo,
            channels: cout,
        }
    }
}

/// Squeeze-excitation: mean → dense → ReLU → dense → hard sigmoid, a gate per channel.
pub struct SqueezeExcite {
    /// `[channels][reduced]`.
    pub(crate) reduce_weights: Vec<f32>,
    pub(crate) reduce_bias: Vec<f32>,
    /// `[reduced][channels]`.
    pub(crate) expand_weights: Vec<f32>,
    pub(crate) expand_bias: Vec<f32>,
}

impl SqueezeExcite {
    fn gate(&self, x: &Image) -> Vec<f32> {
        let mut mean = vec![0.0; x.channels];
        kernels::mean_over_pixels(&x.data, x.height * x.width, &mut mean);
        let mut reduced = vec![0.0; self.reduce_bias.len()];
        kernels::vector_matmul(&mean, &self.reduce_weights, &self.reduce_bias, &mut reduced);
        reduced.iter_mut().for_each(|v| *v = v.max(0.0));
        let mut gate = vec![0.0; x.channels];
        kernels::vector_matmul(&reduced, &self.expand_weights, &self.expand_bias, &mut gate);
        // PyTorch's hardsigmoid: relu6(x + 3) / 6.
        gate.iter_mut()
            .for_each(|g| *g = (*g + 3.0).clamp(0.0, 6.0) / 6.0);
        gate
    }
}

/// One separable convolution of Xception: depthwise (no bias, optional ReLU on its input),
/// then pointwise with the following BatchNorm folded in.
pub struct Separable {
    pub(crate) depthwise: Depthwise,
    pub(crate) pointwise: Pointwise,
}

/// A splittable piece of a backbone.
pub enum Unit {
    /// A dense convolution + BN + activation (MobileNetV3's stem, Xception's `conv1`/`conv2`).
    Conv(DenseConv),
    /// A 1x1 convolution + BN + activation (MobileNetV3's last block).
    Pointwise(Pointwise),
    /// MobileNetV3's inverted residual (and, without `expand`, its depthwise-separable block).
    InvertedResidual {
        /// 1x1 expansion + BN + activation.
        expand: Option<Pointwise>,
        /// Depthwise + BN + activation.
        depthwise: Depthwise,
        /// Squeeze-excitation on the depthwise output.
        squeeze_excite: Option<SqueezeExcite>,
        /// 1x1 projection + BN.
        project: Pointwise,
        /// Add the block's input.
        skip: bool,
    },
    /// Xception's block: separable convolutions, an optional max-pool, and a shortcut.
    XceptionBlock {
        /// The separable convolutions in order; ReLUs are folded into their neighbours.
        reps: Vec<Separable>,
        /// Stride of the closing 3x3 max-pool (1: none).
        pool_stride: usize,
        /// The projecting shortcut (1x1 strided + BN); `None`: the identity.
        skip: Option<Pointwise>,
    },
    /// Xception's exit convolutions: separable + BN + ReLU.
    Separable(Separable),
}

impl Unit {
    /// Compute this unit's convolutions (dense and 1x1) in bf16 on `unit` from now on.
    pub(crate) fn use_bf16(&mut self, unit: TileUnit) {
        match self {
            Unit::Conv(conv) => conv.use_bf16(unit),
            Unit::Pointwise(pw) => pw.use_bf16(unit),
            Unit::InvertedResidual {
                expand, project, ..
            } => {
                if let Some(expand) = expand {
                    expand.use_bf16(unit);
                }
                project.use_bf16(unit);
            }
            Unit::XceptionBlock { reps, skip, .. } => {
                reps.iter_mut().for_each(|rep| rep.pointwise.use_bf16(unit));
                if let Some(skip) = skip {
                    skip.use_bf16(unit);
                }
            }
            Unit::Separable(sep) => sep.pointwise.use_bf16(unit),
        }
    }

    /// Output height, width and channels for an input of `(h, w)`.
    pub fn output_shape(&self, (h, w): (usize, usize)) -> (usize, usize, usize) {
        match self {
            Unit::Conv(conv) => conv.output_shape((h, w)),
            Unit::Pointwise(pw) => pw.output_shape((h, w)),
            Unit::InvertedResidual {
                depthwise, project, ..
            } => {
                let (h, w, _) = depthwise.output_shape((h, w));
                project.output_shape((h, w))
            }
            Unit::XceptionBlock {
                reps, pool_stride, ..
            } => {
                let channels = reps.last().map_or(0, |r| r.pointwise.out_channels);
                if *pool_stride > 1 {
                    let size = |x| kernels::output_size(x, 3, *pool_stride, 1);
                    (size(h), size(w), channels)
                } else {
                    (h, w, channels)
                }
            }
            Unit::Separable(sep) => sep.pointwise.output_shape((h, w)),
        }
    }

    /// Run the unit on one image. `threads`: let the matrix products use the thread pool
    /// (when there are fewer images than threads).
    pub fn forward(&self, x: Image, threads: bool) -> Image {
        match self {
            Unit::Conv(conv) => conv.forward(&x, threads),
            Unit::Pointwise(pw) => pw.forward(&x, None, None, threads),
            Unit::InvertedResidual {
                expand,
                depthwise,
                squeeze_excite,
                project,
                skip,
            } => {
                let expanded = expand
                    .as_ref()
                    .map(|pw| pw.forward(&x, None, None, threads));
                let residual = skip.then_some(&x.data[..]);
                let input = expanded.as_ref().unwrap_or(&x);
                if squeeze_excite.is_none() {
                    return depthwise.then_pointwise(project, input, residual, threads);
                }
                let mut mid = depthwise.forward(input);
                drop(expanded);
                let gate = squeeze_excite.as_ref().map(|se| se.gate(&mid));
                match gate {
                    // Scale whichever is smaller: the activations (pixels × channels) or the
                    // projection weights (channels × outputs).
                    Some(gate) if mid.height * mid.width > project.out_channels => {
                        project.forward(&mid, residual, Some(&gate), threads)
                    }
                    Some(gate) => {
                        kernels::scale_channels(&mut mid.data, &gate);
                        project.forward(&mid, residual, None, threads)
                    }
                    None => project.forward(&mid, residual, None, threads),
                }
            }
            Unit::XceptionBlock {
                reps,
                pool_stride,
                skip,
            } => {
                let shortcut = skip.as_ref().map(|pw| pw.forward(&x, None, None, threads));
                let last = reps.len() - 1;
                let mut y: Option<Image> = None;
                for (i, rep) in reps.iter().enumerate() {
                    let input = y.as_ref().unwrap_or(&x);
                    // Without a pool, the identity shortcut is added by the last product.
                    let residual = (i == last && *pool_stride == 1 && shortcut.is_none())
                        .then_some(&x.data[..]);
                    let pointwise = &rep.pointwise;
                    y = Some(
                        rep.depthwise
                            .then_pointwise(pointwise, input, residual, threads),
                    );
                }
                let mut y = y.expect("an Xception block has separable convolutions");
                if *pool_stride > 1 {
                    let (ho, wo, c) = self.output_shape((x.height, x.width));
                    let mut pooled = Buffer::new(ho * wo * c);
                    kernels::max_pool(&y.data, y.shape(), 3, *pool_stride, 1, &mut pooled);
                    y = Image {
                        data: pooled,
                        height: ho,
                        width: wo,
                        channels: c,
                    };
                }
                match shortcut {
                    Some(shortcut) => kernels::add_into(&mut y.data, &shortcut.data),
                    None if *pool_stride > 1 => kernels::add_into(&mut y.data, &x.data),
                    None => {}
                }
                y
            }
            Unit::Separable(sep) => sep
                .depthwise
                .then_pointwise(&sep.pointwise, &x, None, threads),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::folded::kernels::tests::values;

    /// The depthwise outputs made as the bf16 product rounds them give the very values of the
    /// depthwise convolution written out first, then multiplied: residual, activations and
    /// pieces that cross image rows included, on one thread and on the pool.
    #[test]
    fn a_separable_convolution_made_as_it_is_rounded_equals_the_two_steps() {
        let units = [Some(TileUnit::Emulated), TileUnit::detect()];
        let (h, w, c, n) = (9, 11, 40, 48);
        let x = Image {
            data: Buffer::from_slice(&values(h * w * c, 1)),
            height: h,
            width: w,
            channels: c,
        };
        let residual = values(h * w * n, 2);
        for (kernel, input_relu, act) in [(3, true, Act::Relu), (5, false, Act::HardSwish)] {
            let depthwise = Depthwise {
                channels: c,
                kernel,
                stride: 1,
                pad: kernel / 2,
                weights: values(kernel * kernel * c, 3),
                bias: values(c, 4),
                act,
                input_relu,
            };
            for unit in units.into_iter().flatten() {
                let mut pointwise = Pointwise {
                    in_channels: c,
                    out_channels: n,
                    stride: 1,
                    weights: values(c * n, 5),
                    bias: values(n, 6),
                    act: Act::Relu,
                    bf16: None,
                };
                pointwise.use_bf16(unit);
                assert!(pointwise.bf16.is_some());
                for threads in [false, true] {
                    let mid = depthwise.forward(&x);
                    let want = pointwise.forward(&mid, Some(&residual), None, threads);
                    let got = depthwise.then_pointwise(&pointwise, &x, Some(&residual), threads);
                    assert_eq!(got.data[..], want.data[..], "{unit:?}, kernel {kernel}");
                    assert!(got.data.iter().any(|v| *v > 0.0));
                }
            }
        }
    }
}
