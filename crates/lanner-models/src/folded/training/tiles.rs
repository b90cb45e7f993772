//! A 1x1 or dense convolution's products on bf16 tiles, for a phase trained under
//! `--precision bf16` on a CPU with AMX (see [`crate::folded::bf16`]): the forward product and
//! the input gradient's, each with its weights packed once per step; the weight gradient's
//! runs in [`super::Sums`].

use std::sync::OnceLock;

use super::super::bf16::{self, Epilogue, PackedWeights, TileUnit};
use super::super::kernels::Act;

/// Products shorter than this (k) stay f32: the tiles would mostly multiply zeros.
const SHORTEST: usize = 32;

/// The weights `[rows][cols]` of one convolution, packed for the tiles.
pub(super) struct TiledWeights {
    pub(super) unit: TileUnit,
    /// `None` when `rows` is too few.
    forward: Option<PackedWeights>,
    /// The transpose, packed on the first input gradient; `None` when `cols` is too few.
    backward: OnceLock<Option<PackedWeights>>,
    rows: usize,
    cols: usize,
}

impl TiledWeights {
    pub(super) fn new(unit: TileUnit, folded: &[f32], rows: usize, cols: usize) -> Self {
        Self {
            unit,
            forward: (rows >= SHORTEST).then(|| PackedWeights::new(folded, rows, cols)),
            backward: OnceLock::new(),
            rows,
            cols,
        }
    }

    /// `out = input · folded + bias + residual` on the tiles (`input` is `m × rows`), or
    /// `false` (nothing done) when this product stays f32.
    pub(super) fn forward(
        &self,
        out: &mut [f32],
        input: &[f32],
        bias: &[f32],
        residual: Option<&[f32]>,
    ) -> bool {
        let Some(packed) = &self.forward else {
            return false;
        };
        let epilogue = Epilogue {
            bias,
            residual,
            act: Act::Identity,
        };
        bf16::matmul(out, input, None, packed, &epilogue, self.unit, false);
        true
    }

    /// `d_input = d_pre · foldedᵀ` on the tiles (`d_pre` is `m × cols`), or `false` (nothing
    /// done) when this product stays f32.
    pub(super) fn input_gradient(
        &self,
        d_input: &mut [f32],
        d_pre: &[f32],
        folded: &[f32],
    ) -> bool {
        let packed = self.backward.get_or_init(|| {
            (self.cols >= SHORTEST).then(|| PackedWeights::transposed(folded, self.rows, self.cols))
        });
        let Some(packed) = packed else {
            return false;
        };
        let zeros = vec![0.0; self.rows];
        bf16::matmul(
            d_input,
            d_pre,
            None,
            packed,
            &Epilogue::bias(&zeros),
            self.unit,
            false,
        );
        true
    }
}
