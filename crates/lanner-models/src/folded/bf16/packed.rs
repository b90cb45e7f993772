//! [`PackedWeights`]: a matrix rounded to bf16 in the order AMX's `tdpbf16ps` reads its second
//! operand.

use super::{BLOCK, COLS, DEPTH, Line, ROWS, bf16};

/// A convolution's weights `[k][n]`, rounded to bf16 and packed in AMX's tile order: for each
/// 16-column tile (an even number of them), for each 32-row step of k, 16 lines of 16
/// columns × 2 rows. Rows past `k` and columns past `n` are zeros.
pub struct PackedWeights {
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) steps: usize,
    lines: Vec<Line>,
}

impl PackedWeights {
    /// Packs row-major `weights` (`k × n`).
    pub fn new(weights: &[f32], k: usize, n: usize) -> Self {
        Self::reusing(weights, k, n, Vec::new())
    }

    /// Packs row-major `weights` (`k × n`) into the memory of `lines` (see
    /// [`Self::into_lines`]): products that pack an operand per call keep it warm.
    pub(super) fn reusing(weights: &[f32], k: usize, n: usize, mut lines: Vec<Line>) -> Self {
        assert_eq!(weights.len(), k * n, "weights are k × n");
        let steps = k.div_ceil(DEPTH);
        let tiles = n.div_ceil(BLOCK) * 2;
        lines.clear();
        lines.resize(tiles * steps * ROWS, Line([0; DEPTH]));
        for step in 0..steps {
            for pair in 0..DEPTH / 2 {
                let row = |r: usize| (r < k).then(|| &weights[r * n..][..n]);
                let first = step * DEPTH + 2 * pair;
                let (even, odd) = (row(first), row(first + 1));
                if even.is_none() {
                    break;
                }
                for tile in 0..n.div_ceil(COLS) {
                    let columns = tile * COLS..n.min(tile * COLS + COLS);
                    let line = &mut lines[(tile * steps + step) * ROWS + pair];
                    interleave(
                        line,
                        even.map_or(&[][..], |r| &r[columns.clone()]),
                        odd.map_or(&[][..], |r| &r[columns]),
                    );
                }
            }
        }
        Self { k, n, steps, lines }
    }

    /// The memory of the packed lines, for [`Self::reusing`].
    pub(super) fn into_lines(self) -> Vec<Line> {
        self.lines
    }

    /// Packs the transpose of row-major `weights` (`rows × cols`): a `cols × rows` matrix,
    /// as the gradient of a product's input multiplies by.
    pub fn transposed(weights: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(weights.len(), rows * cols, "weights are rows × cols");
        let mut turned = vec![0.0; rows * cols];
        for (r, row) in weights.chunks_exact(cols).enumerate() {
            for (c, value) in row.iter().enumerate() {
                turned[c * rows + r] = *value;
            }
        }
        Self::new(&turned, cols, rows)
    }

    /// The lines of column tile `tile`, over all its k steps.
    pub(super) fn tile(&self, tile: usize) -> &[Line] {
        &self.lines[tile * self.steps * ROWS..][..self.steps * ROWS]
    }
}

/// One line: up to 16 columns of two rows, rounded to bf16, each column's pair side by side
/// (`even[0], odd[0], even[1], …`); missing values are zeros.
fn interleave(line: &mut Line, even: &[f32], odd: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512_bf16() {
        // SAFETY: the CPU has AVX-512 with its bf16 conversions (checked).
        return unsafe { interleave_avx512(line, even, odd) };
    }
    interleave_scalar(line, even, odd);
}

/// [`interleave`] one value at a time.
fn interleave_scalar(line: &mut Line, even: &[f32], odd: &[f32]) {
    for (i, out) in line.0.iter_mut().enumerate() {
        let row = if i % 2 == 0 { even } else { odd };
        *out = row.get(i / 2).map_or(0, |v| bf16(*v));
    }
}

/// [`interleave`] with AVX-512: both rows converted in one instruction, then each pair put
/// side by side by one permutation.
///
/// # Safety
/// The CPU has `avx512f`, `avx512bw` and `avx512bf16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_avx512(line: &mut Line, even: &[f32], odd: &[f32]) {
    use std::arch::x86_64::*;
    let load = |row: &[f32]| {
        let mask: __mmask16 = ((1u32 << row.len().min(COLS)) - 1) as u16;
        // SAFETY: the mask covers only the row's values.
        unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr()) }
    };
    // Lanes 0–15 the even row, 16–31 the odd one.
    let both = _mm512_cvtne2ps_pbh(load(odd), load(even));
    let order: [u16; DEPTH] = std::array::from_fn(|i| (i / 2 + (i % 2) * COLS) as u16);
    // SAFETY: 64 bytes each.
    unsafe {
        let order = _mm512_loadu_si512(order.as_ptr().cast());
        let paired =
            _mm512_permutexvar_epi16(order, std::mem::transmute::<__m512bh, __m512i>(both));
        _mm512_storeu_si512(line.0.as_mut_ptr().cast(), paired);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packed value at (row, column), read back from the lines.
    fn at(packed: &PackedWeights, row: usize, column: usize) -> u16 {
        let line = &packed.tile(column / COLS)[(row / DEPTH) * ROWS + (row % DEPTH) / 2];
        line.0[2 * (column % COLS) + row % 2]
    }

    #[test]
    fn interleaving_with_avx512_or_one_value_at_a_time_agrees() {
        let values = crate::folded::kernels::tests::values(32, 8);
        for (even, odd) in [(16, 16), (16, 0), (5, 5), (3, 0), (1, 1)] {
            let (mut fast, mut slow) = (Line([1; DEPTH]), Line([1; DEPTH]));
            interleave(&mut fast, &values[..even], &values[16..16 + odd]);
            interleave_scalar(&mut slow, &values[..even], &values[16..16 + odd]);
            assert_eq!(fast.0, slow.0, "{even} and {odd} values");
        }
    }

    #[test]
    fn packs_every_value_where_the_tiles_read_it_and_zeros_around() {
        for (k, n) in [(1, 1), (33, 17), (64, 48), (5, 70)] {
            let weights = crate::folded::kernels::tests::values(k * n, 7);
            let packed = PackedWeights::new(&weights, k, n);
            let turned = PackedWeights::transposed(&weights, k, n);
            for row in 0..packed.steps * DEPTH {
                for column in 0..n.div_ceil(BLOCK) * BLOCK {
                    let want = if row < k && column < n {
                        bf16(weights[row * n + column])
                    } else {
                        0
                    };
                    assert_eq!(at(&packed, row, column), want, "{k}×{n} at {row}, {column}");
                    if row < k && column < n {
                        assert_eq!(at(&turned, column, row), want, "transposed");
                    }
                }
            }
        }
    }
}
