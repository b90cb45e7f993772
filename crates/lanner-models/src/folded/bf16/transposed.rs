//! `g += aᵀ · b` on the tiles: a convolution's weight gradient, summed over the pixels (the
//! rows of `a`, its inputs, and of `b`, the gradients of its outputs).
//!
//! The sum runs along the rows, so both operands are laid out anew: `b` packed as weights
//! are ([`PackedWeights`], its rows as k), and 32 columns of `a` at a time turned into the
//! 32 rows of a panel (with AVX-512, each line gathered down its column; otherwise a 32 × 32
//! block of values at a time). The products then run as [`super::matmul`]'s do, the finished
//! sums added to `g`.

use std::cell::Cell;
use std::ops::Range;

use super::{
    BLOCK, DEPTH, Epilogue, Line, PANEL, PackedWeights, Store, TileUnit, amx, bf16, block_row,
};

/// `g[a_cols × b_cols] += aᵀ · b` with both operands rounded to bf16 and f32 sums, where `a` is
/// `rows × a_cols` and `b` `rows × b_cols` (row-major), on one thread.
pub fn add_transposed_product(
    g: &mut [f32],
    (a, a_cols): (&[f32], usize),
    (b, b_cols): (&[f32], usize),
    unit: TileUnit,
) {
    if a_cols == 0 || b_cols == 0 {
        return;
    }
    let rows = a.len() / a_cols;
    assert_eq!(a.len(), rows * a_cols, "a is rows × a_cols");
    assert_eq!(b.len(), rows * b_cols, "b has a's rows");
    assert_eq!(g.len(), a_cols * b_cols, "g is a_cols × b_cols");
    if rows == 0 {
        return;
    }
    let packed = PackedWeights::reusing(b, rows, b_cols, PACKED.take());
    let zeros = vec![0.0; b_cols];
    let epilogue = Epilogue::bias(&zeros);
    let _config = amx::TileConfig::load(unit);
    PANEL.with_borrow_mut(|panel| {
        for (index, block) in g.chunks_mut(BLOCK * b_cols).enumerate() {
            let columns = index * BLOCK..(index * BLOCK + BLOCK).min(a_cols);
            turn_columns(panel, (a, a_cols), columns, packed.steps);
            block_row(block, panel, &packed, (&epilogue, None, Store::Add), unit);
        }
    });
    PACKED.set(packed.into_lines());
}

thread_local! {
    /// The memory a thread's last packed `b` took, for its next.
    static PACKED: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// `a`'s `columns` (at most 32) rounded to bf16 as the rows of `panel`: row `r` holds column
/// `columns.start + r` down all of `a`'s rows, `steps` lines, zeros past the last row. Rows
/// past the columns keep whatever they held (they only reach sums that are never stored).
fn turn_columns(
    panel: &mut Vec<Line>,
    (a, a_cols): (&[f32], usize),
    columns: Range<usize>,
    steps: usize,
) {
    if panel.len() < BLOCK * steps {
        panel.resize(BLOCK * steps, Line([0; DEPTH]));
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx512_bf16() {
        // SAFETY: the CPU has AVX-512 with its bf16 conversions (checked).
        return unsafe { turn_columns_avx512(panel, (a, a_cols), columns, steps) };
    }
    turn_columns_scalar(panel, (a, a_cols), columns, steps);
}

/// [`turn_columns`] a 32 × 32 block at a time, so that both the reads and the writes stay in
/// a few cache lines.
fn turn_columns_scalar(
    panel: &mut [Line],
    (a, a_cols): (&[f32], usize),
    columns: Range<usize>,
    steps: usize,
) {
    let rows = a.len() / a_cols;
    let width = columns.len();
    for step in 0..steps {
        let first = step * DEPTH;
        let count = DEPTH.min(rows - first);
        // Rows `first..` of `a`, `columns` of each.
        let mut block = [[0u16; DEPTH]; BLOCK];
        for (i, row) in a[first * a_cols..].chunks(a_cols).take(count).enumerate() {
            for (r, value) in row[columns.clone()].iter().enumerate() {
                block[r][i] = bf16(*value);
            }
        }
        for (r, values) in block.iter().enumerate().take(width) {
            panel[r * steps + step] = Line(*values);
        }
    }
}

/// [`turn_columns`] with AVX-512: each line gathers its column's 32 values down the rows (two
/// gathers of 16) and rounds them in one instruction.
///
/// # Safety
/// The CPU has `avx512f`, `avx512bw` and `avx512bf16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn turn_columns_avx512(
    panel: &mut [Line],
    (a, a_cols): (&[f32], usize),
    columns: Range<usize>,
    steps: usize,
) {
    use std::arch::x86_64::*;
    let rows = a.len() / a_cols;
    assert!(
        16 * a_cols < i32::MAX as usize,
        "row offsets fit the gathers' indices"
    );
    let offsets: [i32; 16] = std::array::from_fn(|i| (i * a_cols) as i32);
    // SAFETY: 16 i32, 64 bytes.
    let offsets = unsafe { _mm512_loadu_si512(offsets.as_ptr().cast()) };
    for step in 0..steps {
        let first = step * DEPTH;
        let count = DEPTH.min(rows - first);
        let mask = |half: usize| -> __mmask16 {
            let n = count.saturating_sub(16 * half).min(16);
            ((1u32 << n) - 1) as u16
        };
        let (low_mask, high_mask) = (mask(0), mask(1));
        for (r, column) in columns.clone().enumerate() {
            let base = a.as_ptr().wrapping_add(first * a_cols + column);
            // SAFETY: each lane gathered is row `first + lane` (< rows, by the mask) of column
            // `column` (< a_cols), inside `a`.
            let line = unsafe {
                let low = _mm512_mask_i32gather_ps::<4>(
                    _mm512_setzero_ps(),
                    low_mask,
                    offsets,
                    base.cast(),
                );
                let high = _mm512_mask_i32gather_ps::<4>(
                    _mm512_setzero_ps(),
                    high_mask,
                    offsets,
                    base.wrapping_add(16 * a_cols).cast(),
                );
                _mm512_cvtne2ps_pbh(high, low)
            };
            // SAFETY: a line is 64 bytes, the size of the vector.
            unsafe {
                _mm512_storeu_si512(
                    panel[r * steps + step].0.as_mut_ptr().cast(),
                    std::mem::transmute::<__m512bh, __m512i>(line),
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{TileUnit, f32_of};
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        crate::folded::kernels::tests::values(len, seed)
    }

    fn check(unit: TileUnit, (rows, a_cols, b_cols): (usize, usize, usize)) {
        let a = values(rows * a_cols, 1);
        let b = values(rows * b_cols, 2);
        let start = values(a_cols * b_cols, 3);
        let round = |x: f32| f64::from(f32_of(bf16(x)));
        let mut g = start.clone();
        add_transposed_product(&mut g, (&a, a_cols), (&b, b_cols), unit);
        for (i, got) in g.iter().enumerate() {
            let (r, c) = (i / b_cols, i % b_cols);
            let sum: f64 = (0..rows)
                .map(|p| round(a[p * a_cols + r]) * round(b[p * b_cols + c]))
                .sum();
            let want = (f64::from(start[i]) + sum) as f32;
            let tolerance = 1e-5 * (rows as f32).sqrt() * want.abs().max(1.0);
            assert!(
                (got - want).abs() <= tolerance,
                "{unit:?} {rows}×{a_cols}×{b_cols}: [{i}] {got} vs {want}"
            );
        }
    }

    const SHAPES: [(usize, usize, usize); 5] = [
        (1, 1, 1),
        (32, 32, 32),
        (33, 31, 17),
        (100, 70, 48),
        (361, 40, 64),
    ];

    #[test]
    fn turning_columns_with_avx512_or_one_value_at_a_time_agrees() {
        for (rows, a_cols, columns) in [(70, 40, 3..35), (5, 3, 0..3), (64, 33, 32..33)] {
            let a = values(rows * a_cols, 4);
            let steps = rows.div_ceil(DEPTH);
            let mut fast = vec![Line([1; DEPTH]); BLOCK * steps];
            let mut slow = fast.clone();
            turn_columns(&mut fast, (&a, a_cols), columns.clone(), steps);
            turn_columns_scalar(&mut slow, (&a, a_cols), columns.clone(), steps);
            let lines = columns.len() * steps;
            assert!(fast[..lines].iter().zip(&slow).all(|(f, s)| f.0 == s.0));
        }
    }

    #[test]
    fn emulated_tiles_add_the_rounded_transposed_product() {
        for shape in SHAPES {
            check(TileUnit::Emulated, shape);
        }
    }

    #[test]
    fn amx_tiles_add_the_rounded_transposed_product() {
        let Some(unit) = TileUnit::detect() else {
            eprintln!("skipped: this CPU has no AMX (the emulated tiles are tested instead)");
            return;
        };
        for shape in SHAPES.into_iter().chain([(364, 728, 728)]) {
            check(unit, shape);
        }
    }
}
