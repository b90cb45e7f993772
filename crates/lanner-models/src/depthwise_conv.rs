//! Depthwise convolutions (one filter per channel) on burn-flex, forward and backward, computed
//! directly on NCHW f32 data.
//!
//! burn-flex runs the forward pass row by row, over rows of a few dozen values (7 to 112 on
//! MobileNetV3), too short for its vector loops; on MobileNetV3-Large trained from scratch it
//! took a seventh of the step. It derives the gradients from general convolutions: the input's
//! as a transposed convolution, the filter's as a grouped convolution whose kernel is the output
//! gradient. Neither has a depthwise fast path: on MobileNetV3-Large's depthwise layers (batch
//! 32, 160x160) they took 2–17x as long as the forward pass.
//!
//! Here each of the three does the forward pass's multiply-adds once, one image's channel per
//! task (the filter's gradient: one channel per task, over the images), in loops compiled for
//! the best instruction set the CPU has, over whole planes: the input is split into its
//! `stride²` phases (even and odd rows and columns at stride 2; the padded plane itself at
//! stride 1), zero-padded to a common width, in which every filter tap is a shift, so each tap
//! becomes one long pass over a shifted plane. The passes go a block of the plane at a time,
//! over every tap, so the block being summed stays in the fastest cache.
//!
//! Output planes of up to [`SMALL_PLANE`] pixels (14x14 and smaller) run the three passes
//! channels-last instead ([`channels_last`]), where a task is a whole image and every tap a
//! multiply-add over all its channels: on the README's 64x64 job, whose planes are 2x2 to
//! 16x16, the phased passes spent their time setting planes up.
//!
//! Tested against burn-flex's own convolution and gradients (within 1e-4 of the largest), and
//! the two ways against each other.

mod channels_last;

use std::mem::MaybeUninit;

use rayon::prelude::*;

use burn::tensor::ops::ConvOptions;

use crate::folded::kernels::{dispatch, fma, padded_output_size};
use crate::written::{filled, written_by_chunks, written_by_planes};

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

    /// The input row of phase row `i` in the phases of row offset `a`: padded row `i · stride
    /// + a`; none in the padding or past the input.
    fn phase_row_source(&self, a: usize, i: usize) -> Option<usize> {
        (i * self.stride[0] + a)
            .checked_sub(self.padding[0])
            .filter(|&row| row < self.height)
    }

    /// The columns `j` of the phases of column offset `b` that lie in the input (padded column
    /// `j · stride + b`), and the input column of the first one.
    fn phase_columns(&self, b: usize) -> (std::ops::Range<usize>, usize) {
        let (stride, left) = (self.stride[1], self.padding[1]);
        let first = left.saturating_sub(b).div_ceil(stride);
        let end = (self.width + left)
            .saturating_sub(b)
            .div_ceil(stride)
            .min(self.phase_width());
        let first = first.min(end);
        (first..end, (first * stride + b).saturating_sub(left))
    }

    /// The runs of phase `(a, b)`'s values that lie in the input, one per phase row: the
    /// first value's index in the phase (rows `width_of_phase` apart) and in the input, and
    /// how many values the run has (`stride` apart in the input).
    #[inline(always)]
    fn phase_runs(
        &self,
        (a, b): (usize, usize),
        width_of_phase: usize,
    ) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let (columns, first_column) = self.phase_columns(b);
        let rows = if columns.is_empty() {
            0
        } else {
            self.phase_rows()
        };
        (0..rows).filter_map(move |i| {
            let row = self.phase_row_source(a, i)?;
            Some((
                i * width_of_phase + columns.start,
                row * self.width + first_column,
                columns.len(),
            ))
        })
    }

    /// Whether the passes run channels-last ([`channels_last`]): on output planes of at most
    /// [`SMALL_PLANE`] pixels.
    fn on_small_planes(&self) -> bool {
        self.out_height * self.out_width <= SMALL_PLANE
    }

    /// Values of one phase plane, with room past its end for the widest shift.
    fn phase_len(&self) -> usize {
        self.phase_rows() * self.phase_width() + self.kernel[1]
    }

    /// The output's rows at the phases' width: what one tap's pass covers.
    fn span(&self) -> usize {
        self.out_height * self.phase_width()
    }

    /// The convolution, `[batch, channels, out_height, out_width]`, of the input `x` by the
    /// filters `weight`, plus `bias` (one value per channel) when given.
    pub fn forward(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (plane, taps) = (self.height * self.width, self.kernel[0] * self.kernel[1]);
        assert_eq!(x.len(), self.batch * self.channels * plane);
        assert_eq!(weight.len(), self.channels * taps);
        match self.on_small_planes() {
            true => self.channels_last_forward(x, weight, bias),
            false => self.phased_forward(x, weight, bias),
        }
    }

    /// [`Self::forward`] over the phases of each image's channel.
    fn phased_forward(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (plane, out_plane) = (self.height * self.width, self.out_height * self.out_width);
        let taps = self.kernel[0] * self.kernel[1];
        let len = self.batch * self.channels * out_plane;
        let one_plane = |scratch: &mut Vec<f32>, image_channel, out: &mut [MaybeUninit<f32>]| {
            let channel = image_channel % self.channels;
            let x = &x[image_channel * plane..][..plane];
            let filter = &weight[channel * taps..][..taps];
            let bias = bias.map_or(0.0, |bias| bias[channel]);
            phased_forward_plane(out, scratch, x, filter, bias, self);
        };
        // SAFETY: `phased_forward_plane` sets every value of the plane it is given (it asserts
        // that the plane is `out_height × out_width` long and that it has as many rows).
        unsafe { written_by_chunks(len, out_plane, true, Vec::new, one_plane) }
    }

    /// The gradient of the input, `[batch, channels, height, width]`, for the output gradient
    /// `grad` (`[batch, channels, out_height, out_width]`) and the filters `weight`.
    pub fn input_gradient(&self, grad: &[f32], weight: &[f32]) -> Vec<f32> {
        let out_plane = self.out_height * self.out_width;
        let taps = self.kernel[0] * self.kernel[1];
        assert_eq!(grad.len(), self.batch * self.channels * out_plane);
        assert_eq!(weight.len(), self.channels * taps);
        match self.on_small_planes() {
            true => self.channels_last_input_gradient(grad, weight),
            false => self.phased_input_gradient(grad, weight),
        }
    }

    /// [`Self::input_gradient`] over the phases of each image's channel.
    fn phased_input_gradient(&self, grad: &[f32], weight: &[f32]) -> Vec<f32> {
        let (plane, out_plane) = (self.height * self.width, self.out_height * self.out_width);
        let taps = self.kernel[0] * self.kernel[1];
        let len = self.batch * self.channels * plane;
        let one_plane = |image_channel, x_grad: &mut [MaybeUninit<f32>]| {
            let channel = image_channel % self.channels;
            let grad = &grad[image_channel * out_plane..][..out_plane];
            let filter = &weight[channel * taps..][..taps];
            phased_input_gradient_plane(filled(x_grad, 0.0), grad, filter, self);
        };
        // SAFETY: `filled` sets every value of each plane.
        unsafe { written_by_planes(len, plane, one_plane) }
    }

    /// The gradient of the filters, `[channels, 1, kernel_height, kernel_width]`, for the
    /// input `x` and the output gradient `grad`.
    pub fn weight_gradient(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        let (plane, out_plane) = (self.height * self.width, self.out_height * self.out_width);
        assert_eq!(x.len(), self.batch * self.channels * plane);
        assert_eq!(grad.len(), self.batch * self.channels * out_plane);
        match self.on_small_planes() {
            true => self.channels_last_weight_gradient(x, grad),
            false => self.phased_weight_gradient(x, grad),
        }
    }

    /// [`Self::weight_gradient`] over the phases of each image's channel.
    fn phased_weight_gradient(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        let (plane, out_plane) = (self.height * self.width, self.out_height * self.out_width);
        let taps = self.kernel[0] * self.kernel[1];
        let mut weight_grad = vec![0.0f32; self.channels * taps];
        weight_grad
            .par_chunks_mut(taps)
            .enumerate()
            .for_each(|(channel, filter_grad)| {
                let mut sums = vec![0.0f64; taps];
                let mut scratch = Vec::new();
                for image in 0..self.batch {
                    let at = image * self.channels + channel;
                    let x = &x[at * plane..][..plane];
                    let grad = &grad[at * out_plane..][..out_plane];
                    phased_weight_gradient_plane(&mut sums, &mut scratch, x, grad, self);
                }
                for (filter_grad, sum) in filter_grad.iter_mut().zip(sums) {
                    *filter_grad = sum as f32;
                }
            });
        weight_grad
    }

    /// The phase of filter tap `(ky, kx)` and the shift within it of the value that output
    /// `(0, 0)` reads there: output `(oy, ox)` reads the phase at `oy · width + ox + shift`.
    fn tap_source(&self, ky: usize, kx: usize) -> (usize, usize) {
        let [stride_y, stride_x] = self.stride;
        let phase = (ky % stride_y) * stride_x + kx % stride_x;
        (phase, (ky / stride_y) * self.phase_width() + kx / stride_x)
    }

    /// `scratch` as the phases of the input plane `x` ([`Self::split_phases`]), then the
    /// output's rows at the phases' width ([`Self::span`] values), all `fill`.
    #[inline(always)]
    fn phases_and_rows<'a>(
        &self,
        scratch: &'a mut Vec<f32>,
        x: &[f32],
        fill: f32,
    ) -> (&'a [f32], &'a mut [f32]) {
        let phases = self.stride[0] * self.stride[1] * self.phase_len();
        scratch.clear();
        scratch.resize(phases, 0.0);
        scratch.resize(phases + self.span(), fill);
        let (phases, rows) = scratch.split_at_mut(phases);
        self.split_phases(phases, x);
        (phases, rows)
    }

    /// Splits one input plane `x` into its phases, each [`Self::phase_len`] values of
    /// `phases`, whose values outside the input it leaves as they are (zeros).
    #[inline(always)]
    fn split_phases(&self, phases: &mut [f32], x: &[f32]) {
        let [stride_y, stride_x] = self.stride;
        let wide = self.phase_width();
        for (index, phase) in phases.chunks_exact_mut(self.phase_len()).enumerate() {
            let (a, b) = (index / stride_x, index % stride_x);
            debug_assert!(a < stride_y);
            for (at, from, len) in self.phase_runs((a, b), wide) {
                gather(&mut phase[at..][..len], &x[from..], stride_x);
            }
        }
    }
}

/// The largest output plane, in pixels, whose passes run channels-last.
const SMALL_PLANE: usize = 256;

/// Values per block of the long passes: 8 KiB, which stay in the first-level cache while
/// every tap adds to them.
const BLOCK: usize = 2048;

/// Independent partial sums of the filter gradient's dot products: enough for the vector
/// units to run unhindered.
const LANES: usize = 16;

/// The blocks of `0..len`, [`BLOCK`] values each (the last one shorter).
fn blocks(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len)
        .step_by(BLOCK)
        .map(move |start| start..len.min(start + BLOCK))
}

dispatch!(phased_forward_plane(out: &mut [MaybeUninit<f32>], scratch: &mut Vec<f32>, x: &[f32], filter: &[f32], bias: f32, shape: &Depthwise) => phased_forward_plane_generic);

/// One image's channel of [`Depthwise::forward`]: the input split into its phases, the output
/// rows at the phases' width start at `bias` and gain, per tap, the tap times its phase shifted
/// to it; then the output's columns are copied out.
#[inline(always)]
fn phased_forward_plane_generic<const FMA: bool>(
    out: &mut [MaybeUninit<f32>],
    scratch: &mut Vec<f32>,
    x: &[f32],
    filter: &[f32],
    bias: f32,
    shape: &Depthwise,
) {
    let [kernel_h, kernel_w] = shape.kernel;
    let phase_len = shape.phase_len();
    let (phases, sums) = shape.phases_and_rows(scratch, x, bias);
    for block in blocks(sums.len()) {
        let sums = &mut sums[block.clone()];
        for ky in 0..kernel_h {
            for kx in 0..kernel_w {
                let tap = filter[ky * kernel_w + kx];
                let (phase, shift) = shape.tap_source(ky, kx);
                let shifted = &phases[phase * phase_len + shift + block.start..][..sums.len()];
                for (s, x) in sums.iter_mut().zip(shifted) {
                    *s = fma::<FMA>(tap, *x, *s);
                }
            }
        }
    }
    // Every output row is set: one row of sums per output row.
    assert_eq!(out.len(), shape.out_height * shape.out_width);
    assert!(sums.len() >= shape.out_height * shape.phase_width());
    for (row, wide_row) in out
        .chunks_exact_mut(shape.out_width)
        .zip(sums.chunks_exact(shape.phase_width()))
    {
        for (out, sum) in row.iter_mut().zip(&wide_row[..shape.out_width]) {
            out.write(*sum);
        }
    }
}

dispatch!(phased_input_gradient_plane(x_grad: &mut [f32], grad: &[f32], filter: &[f32], shape: &Depthwise) => phased_input_gradient_plane_generic);

/// One image's channel of [`Depthwise::input_gradient`], over whole planes. A filter tap
/// `(ky, kx)` reads only phase `(ky mod stride, kx mod stride)` of the padded input, shifted by
/// `(ky / stride, kx / stride)`. So each phase's gradient is, per tap of that phase, one long
/// pass adding the shifted output gradient (copied into a zero plane with room for the shifts)
/// times the tap; the phases are then written back to their input positions.
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
            for block in blocks(phase_grad.len()) {
                let sums = &mut phase_grad[block.clone()];
                for ky in (a..kernel_h).step_by(stride_y) {
                    for kx in (b..kernel_w).step_by(stride_x) {
                        let tap = filter[ky * kernel_w + kx];
                        let shift = (top - ky / stride_y) * wide + (left - kx / stride_x);
                        let shifted = &padded[shift + block.start..][..sums.len()];
                        for (g, shifted) in sums.iter_mut().zip(shifted) {
                            *g = fma::<FMA>(tap, *shifted, *g);
                        }
                    }
                }
            }
            for (at, to, len) in shape.phase_runs((a, b), wide) {
                scatter(&mut x_grad[to..], &phase_grad[at..][..len], stride_x);
            }
        }
    }
}

dispatch!(phased_weight_gradient_plane(sums: &mut [f64], scratch: &mut Vec<f32>, x: &[f32], grad: &[f32], shape: &Depthwise) => phased_weight_gradient_plane_generic);

/// One image's channel of [`Depthwise::weight_gradient`], over the input's phases: the output
/// gradient is copied into rows of the phases' width (zeros past the output's columns), and
/// each tap's sum gains its dot product with the tap's phase, shifted to the tap (in
/// [`LANES`] f32 partial sums per block, added up in f64).
#[inline(always)]
fn phased_weight_gradient_plane_generic<const FMA: bool>(
    sums: &mut [f64],
    scratch: &mut Vec<f32>,
    x: &[f32],
    grad: &[f32],
    shape: &Depthwise,
) {
    let [kernel_h, kernel_w] = shape.kernel;
    let phase_len = shape.phase_len();
    let (phases, wide_grad) = shape.phases_and_rows(scratch, x, 0.0);
    for (wide_row, row) in wide_grad
        .chunks_exact_mut(shape.phase_width())
        .zip(grad.chunks_exact(shape.out_width))
    {
        wide_row[..shape.out_width].copy_from_slice(row);
    }
    for block in blocks(wide_grad.len()) {
        let grad = &wide_grad[block.clone()];
        for ky in 0..kernel_h {
            for kx in 0..kernel_w {
                let (phase, shift) = shape.tap_source(ky, kx);
                let shifted = &phases[phase * phase_len + shift + block.start..][..grad.len()];
                sums[ky * kernel_w + kx] += dot::<FMA>(grad, shifted);
            }
        }
    }
}

/// `to[k] = from[k · stride]` for every `k` of `to`, in loops that vectorise at strides 1 and 2.
#[inline(always)]
fn gather(to: &mut [f32], from: &[f32], stride: usize) {
    match stride {
        1 => to.copy_from_slice(&from[..to.len()]),
        2 => {
            // `from` may end right after the last value taken, without its pair.
            let (pairs, last) = to.split_at_mut(to.len().saturating_sub(1));
            for (to, pair) in pairs.iter_mut().zip(from.chunks_exact(2)) {
                *to = pair[0];
            }
            if let Some(last) = last.first_mut() {
                *last = from[2 * pairs.len()];
            }
        }
        _ => {
            for (to, from) in to.iter_mut().zip(from.iter().step_by(stride)) {
                *to = *from;
            }
        }
    }
}

/// `to[k · stride] = from[k]` for every `k` of `from` ([`gather`]'s inverse).
#[inline(always)]
fn scatter(to: &mut [f32], from: &[f32], stride: usize) {
    match stride {
        1 => to[..from.len()].copy_from_slice(from),
        2 => {
            let (pairs, last) = from.split_at(from.len().saturating_sub(1));
            for (pair, from) in to.chunks_exact_mut(2).zip(pairs) {
                pair[0] = *from;
            }
            if let Some(last) = last.first() {
                to[2 * pairs.len()] = *last;
            }
        }
        _ => {
            for (to, from) in to.iter_mut().step_by(stride).zip(from) {
                *to = *from;
            }
        }
    }
}

/// `Σ a·b` over two slices of one length, in [`LANES`] f32 partial sums added up in f64.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f64 = (a_chunks.remainder().iter())
        .zip(b_chunks.remainder())
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        let a: &[f32; LANES] = a.try_into().expect("LANES values");
        let b: &[f32; LANES] = b.try_into().expect("LANES values");
        for lane in 0..LANES {
            lanes[lane] = fma::<FMA>(a[lane], b[lane], lanes[lane]);
        }
    }
    lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::{check_convolution_forward, check_convolution_gradients, values};

    /// The output and every gradient against burn-flex's own.
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
        check_convolution_forward(x_shape, weight_shape, output_shape, &options, &case);
        check_convolution_gradients(x_shape, weight_shape, output_shape, options, &case);
    }

    #[test]
    fn depthwise_convolutions_match_burn_flex_for_the_backbones_shapes() {
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
        // Planes of more than one block.
        matches_burn_flex([1, 2, 56, 50], [3, 3], 1, [(1, 1), (1, 1)]);
        matches_burn_flex([2, 2, 120, 97], [5, 5], 2, [(2, 2), (2, 2)]);
    }

    /// The channels-last passes within 1e-5 of the largest value of the phased ones, on planes
    /// of both sizes and channel counts that do and do not fill the vector registers.
    #[test]
    fn channels_last_passes_match_the_phased_ones() {
        let cases = [
            ([3, 40, 8, 8], [3, 3], 1, [(1, 1), (1, 1)]),
            ([2, 37, 9, 7], [5, 5], 2, [(2, 2), (2, 2)]),
            ([2, 19, 4, 4], [5, 5], 1, [(2, 2), (2, 2)]),
            ([4, 288, 2, 2], [5, 5], 1, [(2, 2), (2, 2)]),
            ([2, 24, 8, 8], [3, 3], 2, [(0, 1), (0, 1)]),
            ([1, 9, 9, 7], [3, 4], 2, [(1, 2), (0, 1)]),
            ([2, 3, 10, 11], [5, 5], 3, [(2, 2), (2, 2)]),
            ([1, 5, 40, 36], [3, 3], 1, [(1, 1), (1, 1)]),
        ];
        for (x_shape, kernel, stride, padding) in cases {
            let channels = x_shape[1];
            let options = ConvOptions {
                stride: [stride, stride],
                padding,
                dilation: [1, 1],
                groups: channels,
            };
            let d =
                Depthwise::of(&x_shape, &[channels, 1, kernel[0], kernel[1]], &options).unwrap();
            let case = format!("{x_shape:?} k{kernel:?} s{stride} p{padding:?}");
            let x = values(x_shape.iter().product(), 1);
            let weight = values(channels * kernel[0] * kernel[1], 2);
            let bias = values(channels, 3);
            let grad = values(d.output_shape().iter().product(), 4);
            let pairs = [
                (
                    "forward",
                    d.channels_last_forward(&x, &weight, Some(&bias)),
                    d.phased_forward(&x, &weight, Some(&bias)),
                ),
                (
                    "input gradient",
                    d.channels_last_input_gradient(&grad, &weight),
                    d.phased_input_gradient(&grad, &weight),
                ),
                (
                    "weight gradient",
                    d.channels_last_weight_gradient(&x, &grad),
                    d.phased_weight_gradient(&x, &grad),
                ),
            ];
            for (pass, got, want) in pairs {
                assert_eq!(got.len(), want.len(), "{pass}, {case}");
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(scale > 0.0, "{pass}, {case}");
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-5 * scale, "{pass}, {case}: {g} vs {w}");
                }
            }
        }
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
