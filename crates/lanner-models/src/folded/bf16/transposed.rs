//! `g += aᵀ · b` on the tiles: a convolution's weight gradient, summed over the pixels (the
//! rows of `a`, its inputs, and of `b`, the gradients of its outputs).
//!
//! The sum runs along the rows, so both operands are laid out anew: `b` packed as weights
//! are ([`PackedWeights`], its rows as k), and 32 columns of `a` at a time turned into the
//! 32 rows of a panel (a 32 × 32 block of values at a time, so that both the reads and the
//! writes stay in a few cache lines). The products then run as [`super::matmul`]'s do, the
//! finished sums added to `g`.

use std::cell::Cell;

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
    columns: std::ops::Range<usize>,
    steps: usize,
) {
    if panel.len() < BLOCK * steps {
        panel.resize(BLOCK * steps, Line([0; DEPTH]));
    }
    let rows = a.len() / a_cols;
    let width = columns.len();
    for step in 0..steps {
        let first = step * DEPTH;
        let count = DEPTH.min(rows - first);
        // A 32 × 32 block: rows `first..` of `a`, `columns` of each.
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
