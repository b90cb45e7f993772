//! A dense convolution (one group: every filter reads every input channel) on burn-flex,
//! forward and backward, computed directly on NCHW f32 data as matrix products.
//!
//! burn-flex takes the gradients from burn's generic definitions: the input's gradient as a
//! transposed convolution, the filter's as a convolution of the input by the output gradient
//! with the batch and channel axes swapped, whose "kernel" is as large as the image. For a 1x1
//! convolution, which holds most of MobileNetV3's and Xception's multiply-adds, that second
//! convolution unrolls every image into columns first, and both swaps copy the tensors. Its
//! forward pass runs a convolution of at most 4 input and 16 output channels (MobileNetV3's
//! stem, 3x3 at stride 2 on RGB) as one small loop per output plane and input channel, which
//! at stride 2 reads every other value and does not vectorise: 12% of the README's main job.
//!
//! Here, per image, with `columns` the image's column matrix (`[in_channels · kh · kw]` rows
//! of `out_height · out_width` values, the input each filter tap reads; for a 1x1 filter at
//! stride 1 without padding, the image itself):
//! - the output is `weight · columns` (plus the bias), already in NCHW order;
//! - the filter's gradient is the sum over the images of `grad · columnsᵀ`;
//! - the input's gradient is `weightᵀ · grad`, whose rows are added back where each tap read.
//!
//! Images run in parallel when there are at least as many as threads (each product on one
//! thread), else one after the other with each product split over the threads. The filter's
//! gradient adds its per-thread partial sums in a fixed order, so it does not depend on
//! thread timing. Tested against burn-flex's own convolution and gradients (within 1e-5 and
//! 1e-4 of the largest value).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use burn::tensor::ops::ConvOptions;

use crate::folded::kernels::{
    Parallelism, matmul_strided, matmul_strided_into, padded_output_size,
};
use crate::written::{filled, filled_by_rows, written_by_chunks};

/// The shape of one dense convolution: `[batch, in_channels, height, width]` in,
/// `[out_channels, in_channels, kernel_height, kernel_width]` filters, no dilation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dense {
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    /// Rows and columns of padding before the input (top, left).
    padding: [usize; 2],
}

impl Dense {
    /// The convolution of an `x_shape` input with `weight_shape` filters under `options`, when
    /// it is dense: one group, no dilation.
    pub fn of(x_shape: &[usize], weight_shape: &[usize], options: &ConvOptions<2>) -> Option<Self> {
        let (&[batch, in_channels, height, width], &[out_channels, per_filter, kernel_h, kernel_w]) =
            (x_shape, weight_shape)
        else {
            return None;
        };
        let dense = options.groups == 1
            && per_filter == in_channels
            && options.dilation == [1, 1]
            && options.stride.iter().all(|&s| s > 0);
        if !dense {
            return None;
        }
        let out = |size: usize, axis: usize, kernel: usize| {
            padded_output_size(size, kernel, options.stride[axis], options.padding[axis])
        };
        let (out_height, out_width) = (out(height, 0, kernel_h)?, out(width, 1, kernel_w)?);
        Some(Self {
            batch,
            in_channels,
            out_channels,
            height,
            width,
            out_height,
            out_width,
            kernel: [kernel_h, kernel_w],
            stride: options.stride,
            padding: [options.padding[0].0, options.padding[1].0],
        })
    }

    /// The output's shape, `[batch, out_channels, out_height, out_width]`.
    pub fn output_shape(&self) -> [usize; 4] {
        [
            self.batch,
            self.out_channels,
            self.out_height,
            self.out_width,
        ]
    }

    /// Values of one input image.
    fn image_len(&self) -> usize {
        self.in_channels * self.height * self.width
    }

    /// Values of one output image.
    fn out_image_len(&self) -> usize {
        self.out_channels * self.out_pixels()
    }

    fn out_pixels(&self) -> usize {
        self.out_height * self.out_width
    }

    /// Rows of the column matrix: one per input channel and filter tap.
    fn taps(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }

    /// A 1x1 filter at stride 1 without padding: an image is its own column matrix.
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1]
            && self.stride == [1, 1]
            && self.padding == [0, 0]
            && (self.out_height, self.out_width) == (self.height, self.width)
    }

    /// Whether images run in parallel, each on one thread (else one after the other, each
    /// product over every thread).
    fn images_in_parallel(&self) -> bool {
        self.batch >= rayon::current_num_threads()
    }

    /// How one image's product runs: on its own thread when images run in parallel, else
    /// over every thread.
    fn product_parallelism(images_in_parallel: bool) -> Parallelism {
        match images_in_parallel {
            true => Parallelism::None,
            false => Parallelism::Rayon(0),
        }
    }

    /// The input row of output row `oy` and filter row `ky`, if inside the input.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride[0] + ky)
            .checked_sub(self.padding[0])
            .filter(|&row| row < self.height)
    }

    /// For filter column `kx`: the output columns whose input column
    /// `ox · stride + kx − padding` lies inside the input, and the input column of the first.
    fn column_span(&self, kx: usize) -> (std::ops::Range<usize>, usize) {
        let (stride, pad) = (self.stride[1], self.padding[1]);
        let first = pad.saturating_sub(kx).div_ceil(stride).min(self.out_width);
        let end = (self.width + pad)
            .saturating_sub(kx)
            .div_ceil(stride)
            .min(self.out_width)
            .max(first);
        let first_input = (first * stride + kx).saturating_sub(pad);
        (first..end, first_input)
    }

    /// Fills `columns` (`taps × out_pixels`) with the values each filter tap reads from
    /// `image` (one input image), zero where it reads the padding.
    fn unroll(&self, image: &[f32], columns: &mut [f32]) {
        let [kernel_h, kernel_w] = self.kernel;
        let (plane, out_width) = (self.height * self.width, self.out_width);
        let mut rows = columns.chunks_exact_mut(self.out_pixels());
        for channel in image.chunks_exact(plane) {
            for ky in 0..kernel_h {
                for kx in 0..kernel_w {
                    let row = rows.next().expect("one row per tap");
                    let (span, first_input) = self.column_span(kx);
                    for (oy, out_row) in row.chunks_exact_mut(out_width).enumerate() {
                        let Some(iy) = self.input_row(oy, ky) else {
                            out_row.fill(0.0);
                            continue;
                        };
                        let x_row = &channel[iy * self.width..][..self.width];
                        out_row[..span.start].fill(0.0);
                        out_row[span.end..].fill(0.0);
                        let out = &mut out_row[span.clone()];
                        if self.stride[1] == 1 {
                            // A plain copy, which the compiler turns into vector moves.
                            out.copy_from_slice(&x_row[first_input..][..out.len()]);
                        } else {
                            let read = x_row[first_input..].iter().step_by(self.stride[1]);
                            for (v, x) in out.iter_mut().zip(read) {
                                *v = *x;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The reverse of [`Self::unroll`]: adds each value of `columns` into the input position
    /// its tap read (`image_grad`: one image's input gradient).
    fn fold_back(&self, columns: &[f32], image_grad: &mut [f32]) {
        let [kernel_h, kernel_w] = self.kernel;
        let (plane, out_width) = (self.height * self.width, self.out_width);
        let mut rows = columns.chunks_exact(self.out_pixels());
        for channel in image_grad.chunks_exact_mut(plane) {
            for ky in 0..kernel_h {
                for kx in 0..kernel_w {
                    let row = rows.next().expect("one row per tap");
                    let (span, first_input) = self.column_span(kx);
                    for (oy, out_row) in row.chunks_exact(out_width).enumerate() {
                        let Some(iy) = self.input_row(oy, ky) else {
                            continue;
                        };
                        let x_row = &mut channel[iy * self.width..][..self.width];
                        let values = &out_row[span.clone()];
                        if self.stride[1] == 1 {
                            let x_row = &mut x_row[first_input..][..values.len()];
                            for (x, v) in x_row.iter_mut().zip(values) {
                                *x += *v;
                            }
                        } else {
                            let write = x_row[first_input..].iter_mut().step_by(self.stride[1]);
                            for (x, v) in write.zip(values) {
                                *x += *v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The convolution of the input `x` by the filters `weight`, plus `bias` when given:
    /// `[batch, out_channels, out_height, out_width]`. Per image, the filters
    /// (`out_channels × taps`) times the image's column matrix, written straight into the
    /// image's output (rows of output channels, as NCHW lays them out), starting from the bias.
    pub fn forward(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (taps, out_pixels) = (self.taps(), self.out_pixels());
        assert_eq!(x.len(), self.batch * self.image_len());
        assert_eq!(weight.len(), self.out_channels * taps);
        assert!(bias.is_none_or(|bias| bias.len() == self.out_channels));
        let product = (self.out_channels, taps, out_pixels);
        let (image_len, out_image_len) = (self.image_len(), self.out_image_len());
        let parallel = self.images_in_parallel();
        let parallelism = Self::product_parallelism(parallel);
        let one_image = |columns: &mut Vec<f32>, index: usize, out: &mut [MaybeUninit<f32>]| {
            let image = &x[index * image_len..][..image_len];
            let columns: &[f32] = if self.pointwise() {
                image
            } else {
                columns.resize(taps * out_pixels, 0.0);
                self.unroll(image, columns);
                columns
            };
            let filters = (weight, taps, 1);
            let columns = (columns, out_pixels, 1);
            match bias {
                Some(bias) => {
                    let out = filled_by_rows(out, bias);
                    matmul_strided(out, true, filters, columns, product, parallelism);
                }
                None => matmul_strided_into(out, filters, columns, product, parallelism),
            }
        };
        let len = self.batch * out_image_len;
        // SAFETY: each image's output is wholly set: by the product alone (which asserts that
        // it is `out_channels × out_pixels` long), or first filled with the bias.
        unsafe { written_by_chunks(len, out_image_len, parallel, Vec::new, one_image) }
    }

    /// The gradient of the input, `[batch, in_channels, height, width]`, for the output
    /// gradient `grad` (`[batch, out_channels, out_height, out_width]`) and the filters
    /// `weight`.
    pub fn input_gradient(&self, grad: &[f32], weight: &[f32]) -> Vec<f32> {
        let (taps, out_pixels) = (self.taps(), self.out_pixels());
        assert_eq!(grad.len(), self.batch * self.out_image_len());
        assert_eq!(weight.len(), self.out_channels * taps);
        // weightᵀ (taps × out_channels): `weight` is out_channels rows of `taps` values.
        let weight_t = (weight, 1, taps);
        let product = (taps, self.out_channels, out_pixels);
        let (image_len, out_image_len) = (self.image_len(), self.out_image_len());
        let parallel = self.images_in_parallel();
        let parallelism = Self::product_parallelism(parallel);
        let one_image = |columns: &mut Vec<f32>, index, image_grad: &mut [MaybeUninit<f32>]| {
            let grad = (
                &grad[index * out_image_len..][..out_image_len],
                out_pixels,
                1,
            );
            if self.pointwise() {
                matmul_strided_into(image_grad, weight_t, grad, product, parallelism);
            } else {
                columns.resize(taps * out_pixels, 0.0);
                matmul_strided(columns, false, weight_t, grad, product, parallelism);
                self.fold_back(columns, filled(image_grad, 0.0));
            }
        };
        let len = self.batch * image_len;
        // SAFETY: each image's gradient is wholly set: by the product alone (which asserts
        // that it is `in_channels × pixels` long, a 1x1 filter at stride 1 reading every pixel
        // once), or filled with zeros before the columns are added back.
        unsafe { written_by_chunks(len, image_len, parallel, Vec::new, one_image) }
    }

    /// The gradient of the filters, `[out_channels, in_channels, kernel_height, kernel_width]`,
    /// for the input `x` and the output gradient `grad`.
    pub fn weight_gradient(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        let (taps, out_pixels) = (self.taps(), self.out_pixels());
        assert_eq!(x.len(), self.batch * self.image_len());
        assert_eq!(grad.len(), self.batch * self.out_image_len());
        let (parts, parallelism) = if self.images_in_parallel() {
            (
                rayon::current_num_threads().min(self.batch),
                Parallelism::None,
            )
        } else {
            (1, Parallelism::Rayon(0))
        };
        let per_part = self.batch.div_ceil(parts.max(1));
        // Each part: the sum over its images of grad (out_channels × out_pixels) times
        // columnsᵀ (out_pixels × taps; `columns` is taps rows of `out_pixels` values).
        let partial_sum = |part: usize| {
            let mut sum = vec![0.0f32; self.out_channels * taps];
            let mut columns = Vec::new();
            let first = part * per_part;
            for image in first..(first + per_part).min(self.batch) {
                let x = &x[image * self.image_len()..][..self.image_len()];
                let grad = &grad[image * self.out_image_len()..][..self.out_image_len()];
                let columns: &[f32] = if self.pointwise() {
                    x
                } else {
                    columns.resize(taps * out_pixels, 0.0);
                    self.unroll(x, &mut columns);
                    &columns
                };
                matmul_strided(
                    &mut sum,
                    image > first,
                    (grad, out_pixels, 1),
                    (columns, 1, out_pixels),
                    (self.out_channels, out_pixels, taps),
                    parallelism,
                );
            }
            sum
        };
        let partial_sums: Vec<Vec<f32>> = (0..parts).into_par_iter().map(partial_sum).collect();
        let mut parts = partial_sums.into_iter();
        let mut total = parts.next().unwrap_or_default();
        for part in parts {
            total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::{check_convolution_forward, check_convolution_gradients};

    /// Every output within 1e-5 of the largest and every gradient within 1e-4 of the largest of
    /// its tensor, against burn-flex's own.
    fn matches_burn_flex(
        x_shape: [usize; 4],
        out_channels: usize,
        kernel: [usize; 2],
        stride: usize,
        padding: [(usize, usize); 2],
    ) {
        let options = ConvOptions {
            stride: [stride, stride],
            padding,
            dilation: [1, 1],
            groups: 1,
        };
        let weight_shape = [out_channels, x_shape[1], kernel[0], kernel[1]];
        let dense = Dense::of(&x_shape, &weight_shape, &options).unwrap();
        let case = format!("{x_shape:?} → {out_channels} k{kernel:?} s{stride} p{padding:?}");
        let output_shape = dense.output_shape();
        check_convolution_forward(x_shape, weight_shape, output_shape, &options, &case);
        check_convolution_gradients(x_shape, weight_shape, output_shape, options, &case);
    }

    #[test]
    fn dense_convolutions_match_burn_flex_for_the_backbones_shapes() {
        // Pointwise, with more and with fewer images than threads, and on 1x1 planes (the
        // squeeze-and-excite layers).
        matches_burn_flex([3, 5, 6, 7], 4, [1, 1], 1, [(0, 0), (0, 0)]);
        matches_burn_flex([1, 8, 5, 5], 6, [1, 1], 1, [(0, 0), (0, 0)]);
        matches_burn_flex([4, 6, 1, 1], 3, [1, 1], 1, [(0, 0), (0, 0)]);
        // MobileNetV3's stem (3x3, stride 2, "same"), Keras' stride-2 padding (one row and
        // column after), Xception's unpadded entry convolutions and its 1x1 stride-2
        // shortcuts.
        matches_burn_flex([2, 3, 9, 8], 4, [3, 3], 2, [(1, 1), (1, 1)]);
        matches_burn_flex([2, 3, 8, 8], 4, [3, 3], 2, [(0, 1), (0, 1)]);
        matches_burn_flex([3, 2, 9, 11], 5, [3, 3], 1, [(0, 0), (0, 0)]);
        matches_burn_flex([2, 4, 7, 7], 3, [1, 1], 2, [(0, 0), (0, 0)]);
        // More than 16 filters, which burn-flex runs through its column matrices rather than
        // its small-channel loops (Xception's 32-filter stem).
        matches_burn_flex([2, 3, 9, 9], 20, [3, 3], 2, [(0, 0), (0, 0)]);
        // A non-square filter with padding at stride 1.
        matches_burn_flex([1, 3, 6, 5], 2, [3, 5], 1, [(1, 1), (2, 2)]);
    }

    #[test]
    fn only_one_group_without_dilation_is_dense() {
        let options = |groups, dilation| ConvOptions {
            stride: [1, 1],
            padding: [(1, 1), (1, 1)],
            dilation: [dilation, dilation],
            groups,
        };
        assert!(Dense::of(&[2, 8, 5, 5], &[4, 8, 3, 3], &options(1, 1)).is_some());
        assert!(Dense::of(&[2, 8, 5, 5], &[8, 1, 3, 3], &options(8, 1)).is_none());
        assert!(Dense::of(&[2, 8, 5, 5], &[4, 8, 3, 3], &options(1, 2)).is_none());
        assert!(Dense::of(&[2, 8, 5, 5], &[4, 4, 3, 3], &options(2, 1)).is_none());
        assert!(Dense::of(&[2, 8, 2, 2], &[4, 8, 5, 5], &options(1, 1)).is_none());
    }
}
