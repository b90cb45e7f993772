//! The three passes of a depthwise convolution over small planes, one image at a time in
//! channels-last order.
//!
//! On planes of a few pixels (MobileNetV3's last stages: 7x7 at 224x224, 2x2 to 8x8 at
//! 64x64) the phased passes spend their time setting up planes, not in multiply-adds: every
//! image's channel is a task of its own whose padded phases are mostly padding. Here each
//! image is transposed to `[pixel][channel]`, and every filter tap of every output pixel is
//! one multiply-add over all channels at once, a loop the compiler vectorises (the filters as
//! `[tap][channel]`). The results are transposed back to NCHW.

use rayon::prelude::*;

use super::Depthwise;
use crate::folded::kernels::{dispatch, fma};
use crate::written::{filled, written_by_chunks};

/// `to[j · rows + i] = from[i · columns + j]`: `from` as `rows x columns`, transposed.
fn transpose(from: &[f32], rows: usize, columns: usize, to: &mut [f32]) {
    debug_assert!(from.len() == rows * columns && to.len() == rows * columns);
    for (j, to_row) in to.chunks_exact_mut(rows).enumerate() {
        for (i, to) in to_row.iter_mut().enumerate() {
            *to = from[i * columns + j];
        }
    }
}

impl Depthwise {
    /// The filters `[channels][taps]` as `[taps][channels]`.
    fn filters_by_tap(&self, weight: &[f32]) -> Vec<f32> {
        let taps = self.kernel[0] * self.kernel[1];
        let mut by_tap = vec![0.0; weight.len()];
        transpose(weight, self.channels, taps, &mut by_tap);
        by_tap
    }

    /// The taps of output pixel `(oy, ox)` that read inside the input: the filter rows and
    /// columns, and the input pixel of tap `(0, 0)` (which may lie in the padding).
    #[inline(always)]
    fn window(&self, oy: usize, ox: usize) -> Window {
        let top = (oy * self.stride[0]) as isize - self.padding[0] as isize;
        let left = (ox * self.stride[1]) as isize - self.padding[1] as isize;
        let inside = |origin: isize, kernel: usize, len: usize| {
            let first = (-origin).max(0) as usize;
            first..((len as isize - origin).clamp(0, kernel as isize) as usize).max(first)
        };
        Window {
            rows: inside(top, self.kernel[0], self.height),
            columns: inside(left, self.kernel[1], self.width),
            origin: (top, left),
        }
    }

    /// The input pixel that tap `(ky, kx)` of `window` reads.
    #[inline(always)]
    fn pixel(&self, window: &Window, ky: usize, kx: usize) -> usize {
        let row = (window.origin.0 + ky as isize) as usize;
        let column = (window.origin.1 + kx as isize) as usize;
        row * self.width + column
    }

    /// [`Depthwise::forward`] one image at a time, channels-last.
    pub(super) fn channels_last_forward(
        &self,
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let (plane, out_plane) = (self.height * self.width, self.out_height * self.out_width);
        let c = self.channels;
        let by_tap = self.filters_by_tap(weight);
        let zeros = vec![0.0; c];
        let bias = bias.unwrap_or(&zeros);
        let scratch = || (vec![0.0; plane * c], vec![0.0; out_plane * c]);
        let one_image = |(x_last, out_last): &mut (Vec<f32>, Vec<f32>), image, out: &mut _| {
            transpose(&x[image * c * plane..][..c * plane], c, plane, x_last);
            forward_image(self, x_last, &by_tap, bias, out_last);
            transpose(out_last, out_plane, c, filled(out, 0.0));
        };
        let len = self.batch * c * out_plane;
        // SAFETY: `filled` sets every value of each image.
        unsafe { written_by_chunks(len, c * out_plane, true, scratch, one_image) }
    }

    /// [`Depthwise::input_gradient`] one image at a time, channels-last.
    pub(super) fn channels_last_input_gradient(&self, grad: &[f32], weight: &[f32]) -> Vec<f32> {
        let (plane, out_plane) = (self.height * self.width, self.out_height * self.out_width);
        let c = self.channels;
        let by_tap = self.filters_by_tap(weight);
        let scratch = || (vec![0.0; out_plane * c], vec![0.0; plane * c]);
        let one_image =
            |(grad_last, x_grad_last): &mut (Vec<f32>, Vec<f32>), image, x_grad: &mut _| {
                transpose(
                    &grad[image * c * out_plane..][..c * out_plane],
                    c,
                    out_plane,
                    grad_last,
                );
                x_grad_last.fill(0.0);
                input_gradient_image(self, grad_last, &by_tap, x_grad_last);
                transpose(x_grad_last, plane, c, filled(x_grad, 0.0));
            };
        let len = self.batch * c * plane;
        // SAFETY: `filled` sets every value of each image.
        unsafe { written_by_chunks(len, c * plane, true, scratch, one_image) }
    }

    /// [`Depthwise::weight_gradient`] one image at a time, channels-last: each image's sums in
    /// f32, added up over the images in f64.
    pub(super) fn channels_last_weight_gradient(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        let (plane, out_plane) = (self.height * self.width, self.out_height * self.out_width);
        let c = self.channels;
        let taps = self.kernel[0] * self.kernel[1];
        let by_tap: Vec<f64> = x
            .par_chunks(c * plane)
            .zip(grad.par_chunks(c * out_plane))
            .fold(
                || Scratch::new(plane * c, out_plane * c, taps * c),
                |mut scratch, (x, grad)| {
                    transpose(x, c, plane, &mut scratch.x);
                    transpose(grad, c, out_plane, &mut scratch.grad);
                    scratch.image_sums.fill(0.0);
                    weight_gradient_image(self, &scratch.x, &scratch.grad, &mut scratch.image_sums);
                    for (sum, image) in scratch.sums.iter_mut().zip(&scratch.image_sums) {
                        *sum += f64::from(*image);
                    }
                    scratch
                },
            )
            .map(|scratch| scratch.sums)
            .reduce(
                || vec![0.0; taps * c],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        let by_tap: Vec<f32> = by_tap.into_iter().map(|sum| sum as f32).collect();
        let mut weight_grad = vec![0.0; taps * c];
        transpose(&by_tap, taps, c, &mut weight_grad);
        weight_grad
    }
}

/// The taps of one output pixel that read inside the input ([`Depthwise::window`]).
struct Window {
    rows: std::ops::Range<usize>,
    columns: std::ops::Range<usize>,
    origin: (isize, isize),
}

/// One thread's buffers for [`Depthwise::channels_last_weight_gradient`].
struct Scratch {
    x: Vec<f32>,
    grad: Vec<f32>,
    image_sums: Vec<f32>,
    sums: Vec<f64>,
}

impl Scratch {
    fn new(x: usize, grad: usize, sums: usize) -> Self {
        Self {
            x: vec![0.0; x],
            grad: vec![0.0; grad],
            image_sums: vec![0.0; sums],
            sums: vec![0.0; sums],
        }
    }
}

dispatch!(forward_image(shape: &Depthwise, x: &[f32], by_tap: &[f32], bias: &[f32], out: &mut [f32]) => forward_image_generic);

/// One image's output, `[pixel][channel]`: the bias, plus per tap inside the input the tap's
/// filters times the input pixel it reads.
#[inline(always)]
fn forward_image_generic<const FMA: bool>(
    shape: &Depthwise,
    x: &[f32],
    by_tap: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    let (c, kernel_w) = (shape.channels, shape.kernel[1]);
    for (at, out) in out.chunks_exact_mut(c).enumerate() {
        let window = shape.window(at / shape.out_width, at % shape.out_width);
        out.copy_from_slice(bias);
        for ky in window.rows.clone() {
            for kx in window.columns.clone() {
                let x = &x[shape.pixel(&window, ky, kx) * c..][..c];
                let filters = &by_tap[(ky * kernel_w + kx) * c..][..c];
                for ((out, x), w) in out.iter_mut().zip(x).zip(filters) {
                    *out = fma::<FMA>(*w, *x, *out);
                }
            }
        }
    }
}

dispatch!(input_gradient_image(shape: &Depthwise, grad: &[f32], by_tap: &[f32], x_grad: &mut [f32]) => input_gradient_image_generic);

/// One image's input gradient, `[pixel][channel]` (zeros on entry): each output pixel's
/// gradient times each tap's filters, added to the input pixel the tap read.
#[inline(always)]
fn input_gradient_image_generic<const FMA: bool>(
    shape: &Depthwise,
    grad: &[f32],
    by_tap: &[f32],
    x_grad: &mut [f32],
) {
    let (c, kernel_w) = (shape.channels, shape.kernel[1]);
    for (at, grad) in grad.chunks_exact(c).enumerate() {
        let window = shape.window(at / shape.out_width, at % shape.out_width);
        for ky in window.rows.clone() {
            for kx in window.columns.clone() {
                let x_grad = &mut x_grad[shape.pixel(&window, ky, kx) * c..][..c];
                let filters = &by_tap[(ky * kernel_w + kx) * c..][..c];
                for ((x_grad, g), w) in x_grad.iter_mut().zip(grad).zip(filters) {
                    *x_grad = fma::<FMA>(*w, *g, *x_grad);
                }
            }
        }
    }
}

dispatch!(weight_gradient_image(shape: &Depthwise, x: &[f32], grad: &[f32], sums: &mut [f32]) => weight_gradient_image_generic);

/// Adds one image's filter gradient, `[tap][channel]`, to `sums`: per output pixel and tap
/// inside the input, the pixel's gradient times the input pixel the tap read.
#[inline(always)]
fn weight_gradient_image_generic<const FMA: bool>(
    shape: &Depthwise,
    x: &[f32],
    grad: &[f32],
    sums: &mut [f32],
) {
    let (c, kernel_w) = (shape.channels, shape.kernel[1]);
    for (at, grad) in grad.chunks_exact(c).enumerate() {
        let window = shape.window(at / shape.out_width, at % shape.out_width);
        for ky in window.rows.clone() {
            for kx in window.columns.clone() {
                let x = &x[shape.pixel(&window, ky, kx) * c..][..c];
                let sums = &mut sums[(ky * kernel_w + kx) * c..][..c];
                for ((sum, g), x) in sums.iter_mut().zip(grad).zip(x) {
                    *sum = fma::<FMA>(*g, *x, *sum);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_every_value() {
        for (rows, columns) in [(1, 1), (16, 16), (37, 5), (3, 40), (960, 49), (33, 17)] {
            let from: Vec<f32> = (0..rows * columns).map(|v| v as f32).collect();
            let mut to = vec![f32::NAN; rows * columns];
            transpose(&from, rows, columns, &mut to);
            for i in 0..rows {
                for j in 0..columns {
                    assert_eq!(to[j * rows + i], from[i * columns + j], "{rows}x{columns}");
                }
            }
        }
    }
}
