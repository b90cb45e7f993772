//! The loops of the backward passes that are not matrix products: activation derivatives,
//! per-channel sums, and the depthwise convolution's weight and input gradients. Compiled like
//! the forward kernels, for the best instruction set the CPU has.

use super::{Act, DepthwiseShape, fma};

dispatch!(activation_backward(d: &mut [f32], pre: &[f32], act: Act) => activation_backward_generic);

/// `d ← d · act′(pre)`, element by element.
#[inline(always)]
fn activation_backward_generic<const FMA: bool>(d: &mut [f32], pre: &[f32], act: Act) {
    match act {
        Act::Identity => {}
        Act::Relu => d
            .iter_mut()
            .zip(pre)
            .for_each(|(d, p)| *d = if *p > 0.0 { *d } else { 0.0 }),
        Act::HardSwish => d.iter_mut().zip(pre).for_each(|(d, p)| {
            let slope = if *p <= -3.0 {
                0.0
            } else if *p >= 3.0 {
                1.0
            } else {
                (2.0 * p + 3.0) / 6.0
            };
            *d *= slope;
        }),
    }
}

dispatch!(add_column_sums(sum: &mut [f32], rows: &[f32]) => column_sums_generic);

/// `sum[j] += Σᵢ rows[i][j]`, with `rows` `[i][sum.len()]`.
#[inline(always)]
fn column_sums_generic<const FMA: bool>(sum: &mut [f32], rows: &[f32]) {
    for row in rows.chunks_exact(sum.len()) {
        sum.iter_mut().zip(row).for_each(|(s, v)| *s += *v);
    }
}

dispatch!(add_column_dots(out: &mut [f32], a: &[f32], b: &[f32]) => column_dots_generic);

/// `out[j] += Σᵢ a[i][j] · b[i][j]`, with `a` and `b` `[i][out.len()]`.
#[inline(always)]
fn column_dots_generic<const FMA: bool>(out: &mut [f32], a: &[f32], b: &[f32]) {
    let n = out.len();
    for (ra, rb) in a.chunks_exact(n).zip(b.chunks_exact(n)) {
        for ((o, x), y) in out.iter_mut().zip(ra).zip(rb) {
            *o = fma::<FMA>(*x, *y, *o);
        }
    }
}

dispatch!(add_to_rows(values: &mut [f32], row: &[f32]) => add_to_rows_generic);

/// Adds `row` to every row of `values` (`[i][row.len()]`).
#[inline(always)]
fn add_to_rows_generic<const FMA: bool>(values: &mut [f32], row: &[f32]) {
    for r in values.chunks_exact_mut(row.len()) {
        r.iter_mut().zip(row).for_each(|(v, x)| *v += *x);
    }
}

dispatch!(depthwise_weight_gradient(shape: &DepthwiseShape<'_>, input: &[f32], d_out: &[f32], g: &mut [f32]) => weight_gradient_generic);

/// Channels whose sums one pass keeps in registers.
const BLOCK: usize = 64;

/// The depthwise convolution's weight gradient: adds `Σ d_out · input` over the output
/// pixels, per tap and channel, to `g` (`[k·k][c]`), given the gradient of its
/// (pre-activation) output. With `input_relu` the input is read through its ReLU. Each tap's
/// sums for a block of channels stay in registers over all pixels. `shape.weights`,
/// `shape.bias` and `shape.act` are not used.
#[inline(always)]
fn weight_gradient_generic<const FMA: bool>(
    shape: &DepthwiseShape<'_>,
    input: &[f32],
    d_out: &[f32],
    g: &mut [f32],
) {
    let (h, w, c) = shape.input;
    let (k, stride, pad) = (shape.kernel, shape.stride, shape.pad);
    let (ho, wo) = shape.output_size();
    assert!(input.len() >= h * w * c && d_out.len() >= ho * wo * c);
    assert!(g.len() >= k * k * c);
    // The outputs whose tap `t` lands inside an input of `len` pixels.
    let inside = |t: usize, len: usize, outputs: usize| {
        let first = pad.saturating_sub(t).div_ceil(stride);
        let last = (len + pad).saturating_sub(t).div_ceil(stride).min(outputs);
        first..last.max(first)
    };
    let mut c0 = 0;
    while c0 < c {
        let width = BLOCK.min(c - c0);
        for ty in 0..k {
            let rows = inside(ty, h, ho);
            for tx in 0..k {
                let columns = inside(tx, w, wo);
                let mut acc = [0.0f32; BLOCK];
                for oy in rows.clone() {
                    let iy = oy * stride + ty - pad;
                    for ox in columns.clone() {
                        let ix = ox * stride + tx - pad;
                        let d = &d_out[(oy * wo + ox) * c + c0..][..width];
                        let x = &input[(iy * w + ix) * c + c0..][..width];
                        if width == BLOCK {
                            let (d, x): (&[f32; BLOCK], &[f32; BLOCK]) =
                                (d.try_into().unwrap(), x.try_into().unwrap());
                            for i in 0..BLOCK {
                                let xv = if shape.input_relu {
                                    x[i].max(0.0)
                                } else {
                                    x[i]
                                };
                                acc[i] = fma::<FMA>(d[i], xv, acc[i]);
                            }
                        } else {
                            for i in 0..width {
                                let xv = if shape.input_relu {
                                    x[i].max(0.0)
                                } else {
                                    x[i]
                                };
                                acc[i] = fma::<FMA>(d[i], xv, acc[i]);
                            }
                        }
                    }
                }
                let gt = &mut g[(ty * k + tx) * c + c0..][..width];
                gt.iter_mut().zip(&acc).for_each(|(g, a)| *g += *a);
            }
        }
        c0 += width;
    }
}

dispatch!(depthwise_input_gradient(shape: &DepthwiseShape<'_>, d_out: &[f32], d_input: &mut [f32]) => input_gradient_generic);

/// The gradient of a depthwise convolution's input, added to `d_input` (zeroed by the
/// caller): each output's gradient times each tap's weight, back to the input pixel it read.
/// (With stride 1 the same is a depthwise convolution with the kernel turned round, which
/// `ConvBn` runs on the forward kernel instead.)
#[inline(always)]
fn input_gradient_generic<const FMA: bool>(
    shape: &DepthwiseShape<'_>,
    d_out: &[f32],
    d_input: &mut [f32],
) {
    let (h, w, c) = shape.input;
    let (k, stride, pad) = (shape.kernel, shape.stride, shape.pad);
    let (ho, wo) = shape.output_size();
    assert!(d_input.len() >= h * w * c && d_out.len() >= ho * wo * c);
    assert!(shape.weights.len() >= k * k * c);
    for oy in 0..ho {
        let iy0 = (oy * stride) as isize - pad as isize;
        let ky = (-iy0).max(0) as usize..(h as isize - iy0).min(k as isize) as usize;
        for ox in 0..wo {
            let ix0 = (ox * stride) as isize - pad as isize;
            let kx = (-ix0).max(0) as usize..(w as isize - ix0).min(k as isize) as usize;
            let dp = &d_out[(oy * wo + ox) * c..][..c];
            for ty in ky.clone() {
                let row = (iy0 + ty as isize) as usize * w;
                for tx in kx.clone() {
                    let tap = ty * k + tx;
                    let at = (row + (ix0 + tx as isize) as usize) * c;
                    let wt = &shape.weights[tap * c..][..c];
                    for ((o, d), wv) in d_input[at..at + c].iter_mut().zip(dp).zip(wt) {
                        *o = fma::<FMA>(*d, *wv, *o);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::output_size;
    use super::super::tests::values;
    use super::*;

    /// The weight and input gradients of a depthwise convolution, one product at a time.
    fn reference(shape: &DepthwiseShape<'_>, input: &[f32], d_out: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let (h, w, c) = shape.input;
        let (k, s, p) = (shape.kernel, shape.stride, shape.pad);
        let (ho, wo) = (output_size(h, k, s, p), output_size(w, k, s, p));
        let (mut g, mut dx) = (vec![0.0; k * k * c], vec![0.0; h * w * c]);
        for oy in 0..ho {
            for ox in 0..wo {
                for ty in 0..k {
                    for tx in 0..k {
                        let (iy, ix) = (
                            (oy * s + ty) as isize - p as isize,
                            (ox * s + tx) as isize - p as isize,
                        );
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        for ch in 0..c {
                            let at = (iy as usize * w + ix as usize) * c + ch;
                            let d = d_out[(oy * wo + ox) * c + ch] as f64;
                            let x = if shape.input_relu {
                                input[at].max(0.0)
                            } else {
                                input[at]
                            };
                            g[(ty * k + tx) * c + ch] += d * x as f64;
                            dx[at] += d * shape.weights[(ty * k + tx) * c + ch] as f64;
                        }
                    }
                }
            }
        }
        (g, dx)
    }

    #[test]
    fn depthwise_gradients_match_a_direct_computation() {
        for (h, w, c, k, s, input_relu) in [
            (7, 9, 40, 3, 1, false),
            (8, 8, 72, 5, 2, true),
            (5, 6, 70, 3, 2, false),
            (3, 3, 3, 5, 1, true),
        ] {
            let pad = ((s - 1) + (k - 1)) / 2;
            let weights = values(k * k * c, 1);
            let input = values(h * w * c, 2);
            let (ho, wo) = (output_size(h, k, s, pad), output_size(w, k, s, pad));
            let d_out = values(ho * wo * c, 3);
            let shape = DepthwiseShape {
                input: (h, w, c),
                kernel: k,
                stride: s,
                pad,
                weights: &weights,
                bias: &[],
                act: Act::Identity,
                input_relu,
            };
            let (want_g, want_dx) = reference(&shape, &input, &d_out);
            let mut g = vec![1.0; k * k * c];
            depthwise_weight_gradient(&shape, &input, &d_out, &mut g);
            let mut dx = vec![0.0; h * w * c];
            depthwise_input_gradient(&shape, &d_out, &mut dx);
            for (got, want) in g.iter().zip(&want_g) {
                // `g` started at 1: the kernel adds to it.
                assert!(
                    (*got as f64 - 1.0 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
            for (got, want) in dx.iter().zip(&want_dx) {
                assert!(
                    (*got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }
}
