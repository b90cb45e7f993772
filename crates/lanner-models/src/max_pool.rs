//! Max pooling of f32 `[batch, channels, height, width]` data on burn-flex, forward and
//! backward, for training Xception from scratch (its four `MaxPool2d(3, 2, 1)`).
//!
//! burn-flex pools through its general 3-D loop: for every output value it works out the
//! window's valid rows and columns with divisions, and writes an `i64` index of the maximum,
//! which its backward pass reads to scatter the gradient. Here the forward pass takes the
//! maximum of each input row's windows first and then of the rows of each window (both passes
//! over contiguous runs), and keeps no indices: the backward pass finds each window's maximum
//! again in the input, as TensorFlow's `MaxPoolGrad` does, which costs less than writing and
//! reading the indices.
//!
//! The maximum is PyTorch's and burn-flex's: the first largest value of the window in row-major
//! order, and NaN wins over any number (the last NaN of the window).

use rayon::prelude::*;

/// One max-pooling layer's geometry: dilation 1, output sizes rounded down, as PyTorch's
/// `max_pool2d` without `ceil_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MaxPool {
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    /// `[batch, channels, height, width]` of the input.
    input: [usize; 4],
    /// Output height and width.
    output: [usize; 2],
}

impl MaxPool {
    /// The pooling of a tensor of `shape`, or `None` where these loops do not apply: not 4-D,
    /// an empty kernel or stride, padding of half the kernel or more (PyTorch refuses it), or
    /// no output.
    pub(crate) fn of(
        shape: &[usize],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> Option<Self> {
        let &[batch, channels, height, width] = shape else {
            return None;
        };
        let output = |axis: usize, size: usize| {
            let (k, s, p) = (kernel[axis], stride[axis], padding[axis]);
            if k == 0 || s == 0 || 2 * p > k || size + 2 * p < k {
                return None;
            }
            Some((size + 2 * p - k) / s + 1)
        };
        let output = [output(0, height)?, output(1, width)?];
        (batch * channels > 0 && height * width > 0).then_some(Self {
            kernel,
            stride,
            padding,
            input: [batch, channels, height, width],
            output,
        })
    }

    /// `[batch, channels, height, width]` of the output.
    pub(crate) fn output_shape(&self) -> [usize; 4] {
        let [batch, channels, ..] = self.input;
        [batch, channels, self.output[0], self.output[1]]
    }

    fn input_plane(&self) -> usize {
        self.input[2] * self.input[3]
    }

    fn output_plane(&self) -> usize {
        self.output[0] * self.output[1]
    }

    /// The input positions along `axis` (0: rows, 1: columns) of output position `out`'s
    /// window: the window clipped to the input.
    fn window(&self, axis: usize, out: usize) -> std::ops::Range<usize> {
        let start = out * self.stride[axis];
        let end = (start + self.kernel[axis]).min(self.input[2 + axis] + self.padding[axis]);
        start.saturating_sub(self.padding[axis])..end - self.padding[axis]
    }

    /// Every output column's window ([`Self::window`] along the columns), the same for every
    /// row and plane.
    fn column_windows(&self) -> Vec<std::ops::Range<usize>> {
        (0..self.output[1]).map(|o| self.window(1, o)).collect()
    }

    /// The pooled values of contiguous input `x`.
    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        let (in_plane, out_plane) = (self.input_plane(), self.output_plane());
        let mut out = vec![0.0f32; self.input[0] * self.input[1] * out_plane];
        let columns = self.column_windows();
        out.par_chunks_mut(out_plane)
            .zip(x.par_chunks(in_plane))
            .for_each_init(
                || vec![0.0f32; self.input[2] * self.output[1]],
                |row_maxima, (out, x)| self.forward_plane(x, out, &columns, row_maxima),
            );
        out
    }

    /// One plane: each input row's window maxima into `row_maxima` (`height × output
    /// width`), then each output row as the maximum of its window's rows there.
    fn forward_plane(
        &self,
        x: &[f32],
        out: &mut [f32],
        columns: &[std::ops::Range<usize>],
        row_maxima: &mut [f32],
    ) {
        let (width, out_width) = (self.input[3], self.output[1]);
        for (row, maxima) in x
            .chunks_exact(width)
            .zip(row_maxima.chunks_exact_mut(out_width))
        {
            for (maximum, window) in maxima.iter_mut().zip(columns) {
                *maximum = row[window.clone()]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &v| larger(m, v));
            }
        }
        for (oh, out_row) in out.chunks_exact_mut(out_width).enumerate() {
            out_row.fill(f32::NEG_INFINITY);
            for ih in self.window(0, oh) {
                let maxima = &row_maxima[ih * out_width..(ih + 1) * out_width];
                for (o, &m) in out_row.iter_mut().zip(maxima) {
                    *o = larger(*o, m);
                }
            }
        }
    }

    /// The gradient with respect to the input `x` for the output gradient `grad`: each
    /// output's gradient goes to its window's maximum (see the module's note).
    pub(crate) fn backward(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        let (in_plane, out_plane) = (self.input_plane(), self.output_plane());
        let width = self.input[3];
        let columns = self.column_windows();
        let mut x_grad = vec![0.0f32; x.len()];
        x_grad
            .par_chunks_mut(in_plane)
            .zip(x.par_chunks(in_plane).zip(grad.par_chunks(out_plane)))
            .for_each(|(x_grad, (x, grad))| {
                for (oh, grad_row) in grad.chunks_exact(self.output[1]).enumerate() {
                    let rows = self.window(0, oh);
                    let window_rows = &x[rows.start * width..rows.end * width];
                    for (&g, window) in grad_row.iter().zip(&columns) {
                        // The window's first value, then each later one that is larger or NaN.
                        let mut best = window.start;
                        let mut maximum = window_rows[best];
                        for row_start in (0..window_rows.len()).step_by(width) {
                            let row = &window_rows[row_start..row_start + width];
                            for iw in window.clone() {
                                // Selects rather than a branch: which value wins is data.
                                let v = row[iw];
                                let wins = v > maximum || v.is_nan();
                                best = if wins { row_start + iw } else { best };
                                maximum = if wins { v } else { maximum };
                            }
                        }
                        x_grad[rows.start * width + best] += g;
                    }
                }
            });
        x_grad
    }
}

/// The larger of `maximum` (so far) and `v`, NaN winning.
#[inline(always)]
fn larger(maximum: f32, v: f32) -> f32 {
    if v > maximum || v.is_nan() {
        v
    } else {
        maximum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one output at a time, with the index of each maximum.
    fn reference(pool: &MaxPool, x: &[f32]) -> (Vec<f32>, Vec<usize>) {
        let [batch, channels, height, width] = pool.input;
        let [out_h, out_w] = pool.output;
        let (mut values, mut indices) = (vec![], vec![]);
        for plane in 0..batch * channels {
            for oh in 0..out_h {
                for ow in 0..out_w {
                    let mut best: Option<(usize, f32)> = None;
                    for kh in 0..pool.kernel[0] {
                        for kw in 0..pool.kernel[1] {
                            let ih = (oh * pool.stride[0] + kh).checked_sub(pool.padding[0]);
                            let iw = (ow * pool.stride[1] + kw).checked_sub(pool.padding[1]);
                            let (Some(ih), Some(iw)) = (ih, iw) else {
                                continue;
                            };
                            if ih >= height || iw >= width {
                                continue;
                            }
                            let at = plane * height * width + ih * width + iw;
                            let v = x[at];
                            if best.is_none_or(|(_, m)| v > m || v.is_nan()) {
                                best = Some((at, v));
                            }
                        }
                    }
                    let (at, v) = best.expect("every window holds an input value");
                    values.push(v);
                    indices.push(at);
                }
            }
        }
        (values, indices)
    }

    /// Pseudo-random values with many ties (a coarse grid), and a NaN.
    fn input(len: usize) -> Vec<f32> {
        let mut state = 0x2545_f491_u32;
        let mut x: Vec<f32> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 7) as f32 - 3.0
            })
            .collect();
        x[len / 3] = f32::NAN;
        x
    }

    #[test]
    fn max_pooling_matches_its_definition_forward_and_backward() {
        // Xception's pools (3, 2, 1) at odd and even sizes, a stride larger than the kernel,
        // no padding, a rectangular kernel and padding on one axis only.
        let cases = [
            ([2, 3, 147, 147], [3, 3], [2, 2], [1, 1]),
            ([1, 2, 10, 9], [3, 3], [2, 2], [1, 1]),
            ([1, 1, 11, 8], [2, 2], [3, 3], [0, 0]),
            ([2, 2, 7, 12], [2, 3], [1, 2], [1, 0]),
            ([1, 1, 1, 1], [1, 1], [1, 1], [0, 0]),
        ];
        for (shape, kernel, stride, padding) in cases {
            let pool = MaxPool::of(&shape, kernel, stride, padding).unwrap();
            let x = input(shape.iter().product());
            let (want, indices) = reference(&pool, &x);
            let got = pool.forward(&x);
            assert_eq!(got.len(), want.len(), "{shape:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g == w || (g.is_nan() && w.is_nan()),
                    "{shape:?}: {g} vs {w}"
                );
            }
            let grad: Vec<f32> = (0..want.len()).map(|i| (i % 13) as f32 + 0.5).collect();
            let mut want_grad = vec![0.0f32; x.len()];
            for (&at, &g) in indices.iter().zip(&grad) {
                want_grad[at] += g;
            }
            assert_eq!(pool.backward(&x, &grad), want_grad, "{shape:?}");
        }
    }

    #[test]
    fn output_sizes_are_pytorchs() {
        let pool = MaxPool::of(&[1, 1, 147, 147], [3, 3], [2, 2], [1, 1]).unwrap();
        assert_eq!(pool.output_shape(), [1, 1, 74, 74]);
        let pool = MaxPool::of(&[1, 1, 19, 19], [3, 3], [2, 2], [1, 1]).unwrap();
        assert_eq!(pool.output_shape(), [1, 1, 10, 10]);
        // Padding of half the kernel or more is refused, as PyTorch refuses it.
        assert_eq!(MaxPool::of(&[1, 1, 8, 8], [3, 3], [2, 2], [2, 2]), None);
        assert_eq!(MaxPool::of(&[1, 1, 2, 2], [3, 3], [1, 1], [0, 0]), None);
    }
}
