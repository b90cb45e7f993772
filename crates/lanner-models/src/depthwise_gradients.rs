//! The gradients of a depthwise convolution (one filter per channel) on burn-flex, computed
//! directly on NCHW f32 data.
//!
//! burn-flex derives them from general convolutions: the input's gradient as a transposed
//! convolution, the filter's as a grouped convolution whose kernel is the output gradient.
//! Neither has a depthwise fast path. On MobileNetV3-Large's depthwise layers (batch 32,
//! 160x160) they took 2–17x as long as the forward pass, and training every layer
//! (`--from-scratch`) spent much of its step there.
//!
//! Here each gradient does the forward pass's multiply-adds once, one image's channel per
//! task (the filter's: one channel per task, over the images), in loops compiled for the
//! best instruction set the CPU has. With stride 1 (all but the downsampling layers) they run
//! over whole planes: the rows of a plane are a few dozen values, too short for the vector
//! loops, so the planes are copied into zero-padded ones of a common width and every filter
//! tap becomes one long pass over a shifted plane. With stride 2 the input is first split into
//! its four phases (even and odd rows and columns), in which every tap is a stride-1 shift.
//!
//! Tested against burn-flex's own gradients (within 1e-4 of the largest).

use rayon::prelude::*;

use burn::tensor::ops::ConvOptions;

use crate::folded::kernels::{dispatch, fma, padded_output_size};

/// The shape of one depthwise convolution: `[batch, channels, height, width]` in,
/// `[channels, 1, kernel_height, kernel_width]` filters, no dilation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Depthwise {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    /// Rows and columns of padding before the input (top, left).
    padding: [usize; 2],
}

impl Depthwise {
    /// The convolution of an `x_shape` input with `weight_shape` filters under `options`, when
    /// it is depthwise: as many groups as input channels, one filter per channel, no dilation.
    pub fn of(x_shape: &[usize], weight_shape: &[usize], options: &ConvOptions<2>) -> Option<Self> {
        let (&[batch, channels, height, width], &[filters, per_group, kernel_h, kernel_w]) =
            (x_shape, weight_shape)
        else {
            return None;
        };
        let depthwise = options.groups == channels
            && filters == channels
            && per_group == 1
            && options.dilation == [1, 1]
            && channels > 1;
        let out = |size: usize, axis: usize, kernel: usize| {
            padded_output_size(size, kernel, options.stride[axis], options.padding[axis])
        };
        let (out_height, out_width) = (out(height, 0, kernel_h)?, out(width, 1, kernel_w)?);
        depthwise.then_some(Self {
            batch,
            channels,
            height,
            width,
            out_height,
            out_width,
            kernel: [kernel_h, kernel_w],
            stride: options.stride,
            padding: [options.padding[0].0, options.padding[1].0],
        })
    }

    /// The output's shape, `[batch, channels, out_height, out_width]`.
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.channels, self.out_height, self.out_width]
    }

    /// Rows of the phase planes: every output row's taps read phase
    /// rows `oy ..= oy + (kernel_height − 1) / stride`.
    fn phase_rows(&self) -> usize {
        self.out_height + (self.kernel[0] - 1) / self.stride[0]
    }

    /// Columns of the phase planes (as [`Self::phase_rows`]).
    fn phase_width(&self) -> usize {
        self.out_width + (self.kernel[1] - 1) / self.stride[1]
    }

    /// The input position of phase `(a, b)`'s row `i` and column `j`: padded row `i · stride +
    /// a`, column `j · stride + b`; none in the padding or past the input.
    fn phase_source(&self, (a, b): (usize, usize), (i, j): (usize, usize)) -> Option<usize> {
        let row = (i * self.stride[0] + a)
            .checked_sub(self.padding[0])
            .filter(|&row| row < self.height)?;
        let column = (j * self.stride[1] + b)
            .checked_sub(self.padding[1])
            .filter(|&column| column < self.width)?;
        Some(row * self.width + column)
    }

    /// The gradient of the input, `[batch, channels, height, width]`, for the output gradient
    /// `grad` (`[batch, channels, out_height, out_width]`) and the filters `weight`.
    pub fn input_gradient(&self, grad: &[f32], weight: &[f32]) -> Vec<f32> {
        let (plane, out_plane) = (self.height * self.width, self.out_height * self.out_width);
        let taps = self.kernel[0] * self.kernel[1];
        assert_eq!(grad.len(), self.batch * self.channels * out_plane);
        assert_eq!(weight.len(), self.channels * taps);
        let mut x_grad = vec![0.0f32; self.batch * self.channels * plane];
        x_grad
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(image_channel, x_grad)| {
                let channel = image_channel % self.channels;
                let grad = &grad[image_channel * out_plane..][..out_plane];
                let filter = &weight[channel * taps..][..taps];
                phased_input_gradient_plane(x_grad, grad, filter, self);
            });
        x_grad
    }

    /// The gradient of the filters, `[channels, 1, kernel_height, kernel_width]`, for the
    /// input `x` and the output gradient `grad`.
    pub fn weight_gradient(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        let (plane, out_plane) = (self.height * self.width, self.out_height * self.out_width);
        let taps = self.kernel[0] * self.kernel[1];
        assert_eq!(x.len(), self.batch * self.channels * plane);
        assert_eq!(grad.len(), self.batch * self.channels * out_plane);
        let mut weight_grad = vec![0.0f32; self.channels * taps];
        weight_grad
            .par_chunks_mut(taps)
            .enumerate()
            .for_each(|(channel, filter_grad)| {
                // One row of partial sums per tap, added up at the end: the inner loops stay
                // element-wise, so they vectorise.
                let row = self.out_height * self.phase_width();
                let mut sums = vec![0.0f32; taps * row];
                let mut scratch = Vec::new();
                for image in 0..self.batch {
                    let at = image * self.channels + channel;
                    let x = &x[at * plane..][..plane];
                    let grad = &grad[at * out_plane..][..out_plane];
                    phased_weight_gradient_plane(&mut sums, &mut scratch, x, grad, self);
                }
                for (tap, filter_grad) in filter_grad.iter_mut().enumerate() {
                    *filter_grad = sums[tap * row..][..row]
                        .iter()
                        .map(|&s| f64::from(s))
                        .sum::<f64>() as f32;
                }
            });
        weight_grad
    }
}

dispatch!(phased_input_gradient_plane(x_grad: &mut [f32], grad: &[f32], filter: &[f32], shape: &Depthwise) => phased_input_gradient_plane_generic);

/// One image's channel of [`Depthwise::input_gradient`], over whole planes. The padded input
/// splits into `stride²` phases (one at stride 1), phase `(a, b)` holding padded rows
/// `i · stride + a` and columns `j · stride + b`; a filter tap `(ky, kx)` reads only phase
/// `(ky mod stride, kx mod stride)`, shifted by `(ky / stride, kx / stride)`. So each phase's
/// gradient is, per tap of that phase, one long pass adding the shifted output gradient
/// (copied into a zero plane with room for the shifts) times the tap; the phases are then
/// written back to their input positions. Rows of a few dozen values are too short for the
/// vector loops, which the long passes fill.
#[inline(always)]
fn phased_input_gradient_plane_generic<const FMA: bool>(
    x_grad: &mut [f32],
    grad: &[f32],
    filter: &[f32],
    shape: &Depthwise,
) {
    let [kernel_h, kernel_w] = shape.kernel;
    let [stride_y, stride_x] = shape.stride;
    let (rows, width) = (shape.phase_rows(), shape.phase_width());
    // Phase (i, j) takes output (i − ky / stride, j − kx / stride), which sits in the zero
    // plane at row i + top − ky / stride, column j + left − kx / stride.
    let (top, left) = ((kernel_h - 1) / stride_y, (kernel_w - 1) / stride_x);
    let wide = width + left;
    let mut padded = vec![0.0f32; (rows + top) * wide + kernel_w];
    for (oy, row) in grad.chunks_exact(shape.out_width).enumerate() {
        padded[(top + oy) * wide + left..][..shape.out_width].copy_from_slice(row);
    }
    let mut phase_grad = vec![0.0f32; rows * wide];
    for a in 0..stride_y {
        for b in 0..stride_x {
            phase_grad.fill(0.0);
            for ky in (a..kernel_h).step_by(stride_y) {
                for kx in (b..kernel_w).step_by(stride_x) {
                    let tap = filter[ky * kernel_w + kx];
                    let shift = (top - ky / stride_y) * wide + (left - kx / stride_x);
                    for (g, shifted) in phase_grad.iter_mut().zip(&padded[shift..]) {
                        *g = fma::<FMA>(tap, *shifted, *g);
                    }
                }
            }
            for i in 0..rows {
                for j in 0..width {
                    if let Some(at) = shape.phase_source((a, b), (i, j)) {
                        x_grad[at] = phase_grad[i * wide + j];
                    }
                }
            }
        }
    }
}

dispatch!(phased_weight_gradient_plane(sums: &mut [f32], scratch: &mut Vec<f32>, x: &[f32], grad: &[f32], shape: &Depthwise) => phased_weight_gradient_plane_generic);

/// One image's channel of [`Depthwise::weight_gradient`], over the input's phases (see
/// [`phased_input_gradient_plane_generic`]): the input is split into its phases, the output
/// gradient copied into rows of the phases' width (zeros past the output's columns), and each
/// tap's row of partial sums (`out_height` rows of that width) gains the gradient times its
/// phase, shifted to the tap, in one long pass.
#[inline(always)]
fn phased_weight_gradient_plane_generic<const FMA: bool>(
    sums: &mut [f32],
    scratch: &mut Vec<f32>,
    x: &[f32],
    grad: &[f32],
    shape: &Depthwise,
) {
    let [kernel_h, kernel_w] = shape.kernel;
    let [stride_y, stride_x] = shape.stride;
    let (rows, wide) = (shape.phase_rows(), shape.phase_width());
    let phase_len = rows * wide + kernel_w;
    let span = shape.out_height * wide;
    scratch.clear();
    scratch.resize(stride_y * stride_x * phase_len + span, 0.0);
    let (phases, wide_grad) = scratch.split_at_mut(stride_y * stride_x * phase_len);
    for (index, phase) in phases.chunks_exact_mut(phase_len).enumerate() {
        let (a, b) = (index / stride_x, index % stride_x);
        for i in 0..rows {
            for j in 0..wide {
                if let Some(at) = shape.phase_source((a, b), (i, j)) {
                    phase[i * wide + j] = x[at];
                }
            }
        }
    }
    for (wide_row, row) in wide_grad
        .chunks_exact_mut(wide)
        .zip(grad.chunks_exact(shape.out_width))
    {
        wide_row[..shape.out_width].copy_from_slice(row);
    }
    for ky in 0..kernel_h {
        for kx in 0..kernel_w {
            let phase = (ky % stride_y) * stride_x + kx % stride_x;
            let shift = (ky / stride_y) * wide + kx / stride_x;
            let shifted = &phases[phase * phase_len + shift..];
            let sum = &mut sums[(ky * kernel_w + kx) * span..][..span];
            for ((s, g), x) in sum.iter_mut().zip(&*wide_grad).zip(shifted) {
                *s = fma::<FMA>(*g, *x, *s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::check_convolution_gradients;

    /// Every gradient within 1e-4 of the largest of its tensor, against burn-flex's own.
    fn matches_burn_flex(
        x_shape: [usize; 4],
        kernel: [usize; 2],
        stride: usize,
        padding: [(usize, usize); 2],
    ) {
        let [_, channels, height, _] = x_shape;
        let options = ConvOptions {
            stride: [stride, stride],
            padding,
            dilation: [1, 1],
            groups: channels,
        };
        let weight_shape = [channels, 1, kernel[0], kernel[1]];
        let depthwise = Depthwise::of(&x_shape, &weight_shape, &options).unwrap();
        let output_shape = depthwise.output_shape();
        assert!(output_shape[2] <= height + padding[0].0 + padding[0].1);
        let case = format!("{x_shape:?} k{kernel:?} s{stride} p{padding:?}");
        check_convolution_gradients(x_shape, weight_shape, output_shape, options, &case);
    }

    #[test]
    fn depthwise_gradients_match_burn_flex_for_the_backbones_shapes() {
        // MobileNetV3's 3x3 and 5x5, stride 1 and 2, "same" padding, odd and even sizes.
        matches_burn_flex([2, 3, 8, 8], [3, 3], 1, [(1, 1), (1, 1)]);
        matches_burn_flex([2, 4, 9, 7], [5, 5], 1, [(2, 2), (2, 2)]);
        matches_burn_flex([2, 3, 8, 8], [3, 3], 2, [(1, 1), (1, 1)]);
        matches_burn_flex([3, 2, 9, 11], [5, 5], 2, [(2, 2), (2, 2)]);
        // Keras' stride-2 padding: one row and column after, none before; and none at all.
        matches_burn_flex([2, 3, 8, 8], [3, 3], 2, [(0, 1), (0, 1)]);
        matches_burn_flex([1, 5, 6, 9], [3, 3], 1, [(0, 0), (0, 0)]);
        // The phased kernels' other cases: stride 3, a non-square filter with unequal padding,
        // and padding as wide as the filter at stride 1.
        matches_burn_flex([2, 2, 10, 11], [5, 5], 3, [(2, 2), (2, 2)]);
        matches_burn_flex([1, 3, 9, 7], [3, 4], 2, [(1, 2), (0, 1)]);
        matches_burn_flex([1, 2, 5, 5], [3, 3], 1, [(3, 3), (3, 3)]);
    }

    #[test]
    fn only_one_filter_per_channel_without_dilation_is_depthwise() {
        let options = |groups, dilation| ConvOptions {
            stride: [1, 1],
            padding: [(1, 1), (1, 1)],
            dilation: [dilation, dilation],
            groups,
        };
        assert!(Depthwise::of(&[2, 8, 5, 5], &[8, 1, 3, 3], &options(8, 1)).is_some());
        assert!(Depthwise::of(&[2, 8, 5, 5], &[16, 1, 3, 3], &options(8, 1)).is_none());
        assert!(Depthwise::of(&[2, 8, 5, 5], &[8, 8, 3, 3], &options(1, 1)).is_none());
        assert!(Depthwise::of(&[2, 8, 5, 5], &[8, 1, 3, 3], &options(8, 2)).is_none());
        assert!(Depthwise::of(&[2, 8, 5, 5], &[4, 2, 3, 3], &options(4, 1)).is_none());
    }
}
