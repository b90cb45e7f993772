//! bf16 matrix products on Intel AMX tiles: the folded network's convolutions under
//! `--precision bf16` on a CPU that has AMX (Xeon Sapphire Rapids and later, SageMaker's
//! `ml.c7i`/`ml.m7i`/`ml.r7i`), at inference and in training (the trained units' forward and
//! input-gradient products through [`matmul`], their weight gradients through
//! [`add_transposed_product`]).
//!
//! A folded convolution is `dst[m × n] = act(a[m × k] · w[k × n] + bias + residual)`. Here
//! both operands of the product are rounded to bf16 (to nearest, ties to even) and the
//! products summed in f32, as oneDNN and PyTorch's CPU autocast compute it:
//!
//! - the weights are packed once, when the network is folded ([`PackedWeights`]), into the
//!   layout AMX's `tdpbf16ps` reads: tiles of 32 rows (k) by 16 columns, each row pair of a
//!   column side by side (Intel's "VNNI" order);
//! - the activations are rounded 32 rows at a time into a panel the thread keeps, padded to
//!   whole tiles, a squeeze-excitation gate scaling each column on the way; where they exist
//!   only for the product (a dense convolution's patches, a depthwise convolution's outputs
//!   in the frozen layers), [`matmul_made`] makes those 32 rows just before it rounds them;
//! - each block of 32 × 32 outputs is four tiles that accumulate over k in steps of 32, on
//!   AMX (`tdpbf16ps`), or on [`TileUnit::Emulated`], the same tiling computed in scalar code,
//!   which the tests run on CPUs without AMX; k goes by in passes of 256 so that the panel
//!   stays in the core's L1 cache;
//! - after the last pass over a block, its sums get the bias, residual and activation
//!   ([`Epilogue`]) on their way to `dst`, which is written once and never read (a weight
//!   gradient's sums are added to it instead).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::kernels::{self, Act, Patches};

mod packed;
mod transposed;
pub use packed::PackedWeights;
pub use transposed::add_transposed_product;

/// Rows of an `a` (and output) tile.
const ROWS: usize = 16;
/// bf16 values along k in one tile row: 64 bytes.
const DEPTH: usize = 32;
/// f32 columns of an output tile: 64 bytes.
const COLS: usize = 16;
/// Output rows and columns of one block: 2 × 2 tiles.
const BLOCK: usize = 2 * ROWS;

/// One tile row: 32 bf16 values, 64 bytes, aligned as AMX loads like them.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line([u16; DEPTH]);

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits; NaN stays NaN.
#[inline(always)]
pub fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn f32_of(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// What computes a tile product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileUnit {
    /// Intel AMX (`tdpbf16ps`).
    Amx,
    /// The same products in scalar code: for tests on CPUs without AMX, far too slow to serve.
    Emulated,
}

impl TileUnit {
    /// AMX, when this CPU has it and the kernel lets this process use it.
    pub fn detect() -> Option<Self> {
        amx::usable().then_some(Self::Amx)
    }
}

thread_local! {
    /// The rows of `a` a thread's current block row rounded to bf16: kept between products.
    static PANEL: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    /// The rows of `a` [`matmul_made`] makes for a block row, before they are rounded.
    static MADE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `a`'s rows (at most 32, of `k` columns), column `c` scaled by `gate[c]` when given,
/// rounded to bf16 into `panel`: 32 rows of `k.div_ceil(32)` lines, zeros past `k`. Rows past `a`'s keep
/// whatever they held (finite or not, they only reach output rows that are never written).
fn round_panel(panel: &mut Vec<Line>, a: &[f32], k: usize, gate: Option<&[f32]>) {
    let lines_per_row = k.div_ceil(DEPTH);
    if panel.len() < BLOCK * lines_per_row {
        panel.resize(BLOCK * lines_per_row, Line([0; DEPTH]));
    }
    for (row, lines) in a.chunks_exact(k).zip(panel.chunks_exact_mut(lines_per_row)) {
        round_row(lines, row, gate);
    }
}

/// `values` (times `gate`) rounded to bf16 into `lines`, 32 per line, the last line's tail
/// set to zeros.
fn round_row(lines: &mut [Line], values: &[f32], gate: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16() {
        // SAFETY: the CPU has AVX-512 with its bf16 conversions (checked).
        return unsafe { round_row_avx512(lines, values, gate) };
    }
    for (index, line) in lines.iter_mut().enumerate() {
        for (i, out) in line.0.iter_mut().enumerate() {
            let column = index * DEPTH + i;
            *out = match values.get(column) {
                Some(v) => bf16(v * gate.map_or(1.0, |g| g[column])),
                None => 0,
            };
        }
    }
}

/// Whether the CPU converts f32 to bf16 in one instruction (`vcvtne2ps2bf16`: Intel from
/// Cooper Lake, AMD from Zen 4).
#[cfg(target_arch = "x86_64")]
fn avx512_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// [`round_row`] with AVX-512: 32 values a line, a masked load for the last.
///
/// # Safety
/// The CPU has `avx512f`, `avx512bw` and `avx512bf16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_row_avx512(lines: &mut [Line], values: &[f32], gate: Option<&[f32]>) {
    use std::arch::x86_64::*;
    let len = values.len();
    for (index, line) in lines.iter_mut().enumerate() {
        let first = index * DEPTH;
        let half = |offset: usize| {
            let start = first + offset;
            let count = len.saturating_sub(start).min(16);
            let mask: __mmask16 = ((1u32 << count) - 1) as u16;
            // SAFETY: the mask covers only the `count` values left in the slice(s).
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, values.as_ptr().wrapping_add(start));
                match gate {
                    Some(g) => _mm512_mul_ps(
                        v,
                        _mm512_maskz_loadu_ps(mask, g.as_ptr().wrapping_add(start)),
                    ),
                    None => v,
                }
            }
        };
        let (low, high) = (half(0), half(16));
        let rounded = _mm512_cvtne2ps_pbh(high, low);
        // SAFETY: a line is 64 bytes, the size of the vector.
        unsafe {
            _mm512_storeu_si512(
                line.0.as_mut_ptr().cast(),
                std::mem::transmute::<__m512bh, __m512i>(rounded),
            )
        };
    }
}

/// What a product adds to its sums before it writes them: a bias per column, optionally a
/// residual (`m × n`, as the output), then an activation.
pub struct Epilogue<'a> {
    /// `[n]`.
    pub bias: &'a [f32],
    /// `[m × n]`, added after the bias.
    pub residual: Option<&'a [f32]>,
    /// Applied last.
    pub act: Act,
}

impl<'a> Epilogue<'a> {
    /// The product plus `bias`, nothing else.
    pub fn bias(bias: &'a [f32]) -> Self {
        Self {
            bias,
            residual: None,
            act: Act::Identity,
        }
    }
}

/// Where a block's finished sums go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Store {
    /// Written over the output.
    Set,
    /// Added to what the output holds (its epilogue only a bias).
    Add,
}

/// `dst[m × n] = act(a · w + bias + residual)` with the product in bf16 and f32 sums (see the
/// module docs): `a` is `m × k` (row-major), column `c` scaled by `gate[c]` first when given;
/// `dst` is row-major with `n` columns (`w`'s `k × n`); the rest is `epilogue`'s. Every value
/// of `dst` is written, none read. `threads`: split the rows over the rayon pool.
pub fn matmul(
    dst: &mut [f32],
    a: &[f32],
    gate: Option<&[f32]>,
    w: &PackedWeights,
    epilogue: &Epilogue<'_>,
    unit: TileUnit,
    threads: bool,
) {
    let (k, n) = (w.k, w.n);
    if n == 0 {
        return;
    }
    // The epilogue runs after the last pass over k: there must be one.
    assert!(k > 0, "a product over at least one input");
    let m = dst.len() / n;
    assert_eq!(dst.len(), m * n, "dst has n columns");
    assert_eq!(a.len(), m * k, "a is m × k");
    assert!(
        gate.is_none_or(|g| g.len() == k),
        "a gate value per column of a"
    );
    assert_eq!(epilogue.bias.len(), n, "a bias per column");
    assert!(
        epilogue.residual.is_none_or(|r| r.len() == m * n),
        "the residual is m × n"
    );
    let round = |index: usize, rows: usize, panel: &mut Vec<Line>| {
        round_panel(panel, &a[index * BLOCK * k..][..rows * k], k, gate);
    };
    products(dst, w, epilogue, unit, threads, round);
}

/// [`matmul`] with `patches`' rows as `a` (a dense convolution), each row made as it is
/// rounded instead of all of them written out first.
pub fn matmul_patches(
    dst: &mut [f32],
    patches: &Patches<'_>,
    w: &PackedWeights,
    epilogue: &Epilogue<'_>,
    unit: TileUnit,
    threads: bool,
) {
    let k = patches.row_len();
    assert_eq!(k, w.k, "a patch per row of weights");
    let (ho, wo) = patches.output_size();
    let make = |pixels: Range<usize>, rows: &mut [f32]| {
        for (pixel, row) in pixels.zip(rows.chunks_exact_mut(k)) {
            patches.row(pixel, row);
        }
    };
    matmul_made(dst, ho * wo, make, w, epilogue, unit, threads);
}

/// [`matmul`] with the `m` rows of `a` made 32 at a time as they are rounded:
/// `make(rows, values)` writes rows `rows` of `a` (`w.k` values each) into `values`. A
/// product whose `a` is made for it alone (a dense convolution's patches, a depthwise
/// convolution's output) never writes all of it out in f32.
pub fn matmul_made(
    dst: &mut [f32],
    m: usize,
    make: impl Fn(Range<usize>, &mut [f32]) + Sync,
    w: &PackedWeights,
    epilogue: &Epilogue<'_>,
    unit: TileUnit,
    threads: bool,
) {
    let (k, n) = (w.k, w.n);
    assert_eq!(dst.len(), m * n, "dst has a row per row of a");
    assert_eq!(epilogue.bias.len(), n, "a bias per column");
    assert!(
        epilogue.residual.is_none_or(|r| r.len() == dst.len()),
        "the residual is as dst"
    );
    if n == 0 {
        return;
    }
    assert!(k > 0, "a product over at least one input");
    let lines_per_row = k.div_ceil(DEPTH);
    let round = |index: usize, rows: usize, panel: &mut Vec<Line>| {
        if panel.len() < BLOCK * lines_per_row {
            panel.resize(BLOCK * lines_per_row, Line([0; DEPTH]));
        }
        MADE.with_borrow_mut(|values| {
            values.resize(BLOCK * k, 0.0);
            let first = index * BLOCK;
            make(first..first + rows, &mut values[..rows * k]);
            let lines = panel.chunks_exact_mut(lines_per_row);
            for (row, lines) in values.chunks_exact(k).take(rows).zip(lines) {
                round_row(lines, row, None);
            }
        });
    };
    products(dst, w, epilogue, unit, threads, round);
}

/// The products of [`matmul`] and [`matmul_made`]: `round(index, rows, panel)` puts the
/// `rows` rows of `a` of block row `index` into `panel`, rounded.
fn products(
    dst: &mut [f32],
    w: &PackedWeights,
    epilogue: &Epilogue<'_>,
    unit: TileUnit,
    threads: bool,
    round: impl Fn(usize, usize, &mut Vec<Line>) + Sync,
) {
    let n = w.n;
    let row_block = |(index, block): (usize, &mut [f32])| {
        let residual = epilogue
            .residual
            .map(|r| &r[index * BLOCK * n..][..block.len()]);
        PANEL.with_borrow_mut(|panel| {
            round(index, block.len() / n, panel);
            block_row(block, panel, w, (epilogue, residual, Store::Set), unit);
        });
    };
    if threads {
        // A configuration per piece of work a thread takes (nothing in a piece waits on
        // rayon, so no other product runs on the thread meanwhile).
        dst.par_chunks_mut(BLOCK * n)
            .enumerate()
            .for_each_init(|| amx::TileConfig::load(unit), |_, item| row_block(item));
    } else {
        let _config = amx::TileConfig::load(unit);
        dst.chunks_mut(BLOCK * n).enumerate().for_each(row_block);
    }
}

/// 16 f32 sums: one tile row, aligned for tile loads and stores.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Sums([f32; COLS]);

thread_local! {
    /// A thread's sums for its current block row: kept between products.
    static SUMS: RefCell<Vec<Sums>> = const { RefCell::new(Vec::new()) };
}

/// Steps of k (32 each) that one pass over a block row's columns takes: 32 rows of `a` over
/// them (16 KiB) stay in the core's L1 cache while the weights stream past; the sums wait in
/// memory between passes.
const STEPS_PER_PASS: usize = 8;

/// Up to 32 output rows (`dst`, `n` columns) from their 32 rows of `a` (`w.steps` lines
/// each), the epilogue with `residual` being these rows' own, stored in `dst` as `store` says.
fn block_row(
    dst: &mut [f32],
    a: &[Line],
    w: &PackedWeights,
    (epilogue, residual, store): (&Epilogue<'_>, Option<&[f32]>, Store),
    unit: TileUnit,
) {
    let n = w.n;
    let tiles = n.div_ceil(BLOCK) * 2;
    SUMS.with_borrow_mut(|sums| {
        // Not cleared: the first pass sets every sum.
        if sums.len() < BLOCK * tiles {
            sums.resize(BLOCK * tiles, Sums([0.0; COLS]));
        }
        let ldc = tiles * COLS;
        for pass in (0..w.steps).step_by(STEPS_PER_PASS) {
            let steps = STEPS_PER_PASS.min(w.steps - pass);
            let last = pass + steps == w.steps;
            for pair in 0..tiles / 2 {
                let b0 = &w.tile(2 * pair)[pass * ROWS..];
                let b1 = &w.tile(2 * pair + 1)[pass * ROWS..];
                // SAFETY: the 32 × 32 sums of this pair of tiles lie in `sums` (row stride
                // `ldc`); `a` holds 32 rows of `w.steps` lines, from step `pass` on; each
                // weight tile `steps` × 16 lines from there; `steps` ≥ 1.
                unsafe {
                    block(
                        unit,
                        (sums[2 * pair..].as_mut_ptr().cast(), ldc),
                        (a[pass..].as_ptr(), w.steps),
                        (b0.as_ptr(), b1.as_ptr()),
                        (steps, pass == 0),
                    )
                };
                if last {
                    // While these sums are in the core's L1 cache.
                    let columns = BLOCK * pair..n.min(BLOCK * (pair + 1));
                    let sums = floats(sums);
                    finish(
                        dst,
                        n,
                        columns,
                        (sums, ldc),
                        epilogue.bias,
                        residual,
                        (epilogue.act, store == Store::Add),
                    );
                }
            }
        }
    });
}

/// The f32 values of `sums`, in order.
fn floats(sums: &[Sums]) -> &[f32] {
    // SAFETY: `Sums` is 16 f32 with no padding (64 bytes, aligned to 64).
    unsafe { std::slice::from_raw_parts(sums.as_ptr().cast(), sums.len() * COLS) }
}

kernels::dispatch!(
    finish(
        dst: &mut [f32],
        n: usize,
        columns: Range<usize>,
        sums: (&[f32], usize),
        bias: &[f32],
        residual: Option<&[f32]>,
        act: (Act, bool)
    ) => finish_generic
);

/// `columns` of `dst`'s rows (`n` columns each) set to `act(sums + bias + residual)`, or with
/// `add`, `sums + bias` added to them; `sums`' rows `ldc` apart.
#[inline(always)]
fn finish_generic<const FMA: bool>(
    dst: &mut [f32],
    n: usize,
    columns: Range<usize>,
    (sums, ldc): (&[f32], usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    (act, add): (Act, bool),
) {
    let bias = &bias[columns.clone()];
    for (r, out) in dst.chunks_exact_mut(n).enumerate() {
        let out = &mut out[columns.clone()];
        let sums = &sums[r * ldc + columns.start..][..out.len()];
        match residual {
            _ if add => {
                for ((o, s), b) in out.iter_mut().zip(sums).zip(bias) {
                    *o += s + b;
                }
                continue;
            }
            Some(residual) => {
                let residual = &residual[r * n..][columns.clone()];
                for (((o, s), b), x) in out.iter_mut().zip(sums).zip(bias).zip(residual) {
                    *o = s + b + x;
                }
            }
            None => {
                for ((o, s), b) in out.iter_mut().zip(sums).zip(bias) {
                    *o = s + b;
                }
            }
        }
        kernels::activate_impl(out, act);
    }
}

/// Adds to the 32 × 32 f32 sums at `c` (row stride `ldc` values; set to the products alone
/// when `first`) the products of `a`'s 32 rows (`lines_per_row` lines apart) and two column
/// tiles of weights, over `steps` steps of k.
///
/// # Safety
/// `c` addresses 32 rows of 32 writable values `ldc` apart (set unless `first`); `a` 32 rows
/// of `steps` lines `lines_per_row` lines apart; `b0` and `b1` `16 · steps` lines each;
/// `steps` ≥ 1. With [`TileUnit::Amx`], the thread has loaded [`amx::TileConfig`].
unsafe fn block(
    unit: TileUnit,
    c: (*mut f32, usize),
    a: (*const Line, usize),
    b: (*const Line, *const Line),
    (steps, first): (usize, bool),
) {
    match unit {
        // SAFETY: as the caller promises.
        TileUnit::Amx => unsafe { amx::block(c, a, b, (steps, first)) },
        // SAFETY: as the caller promises.
        TileUnit::Emulated => unsafe { emulated_block(c, a, b, (steps, first)) },
    }
}

/// [`block`] in scalar code: each tile product as `tdpbf16ps` defines it (f32 products of
/// bf16 pairs, summed into the f32 tile).
///
/// # Safety
/// As [`block`].
unsafe fn emulated_block(
    (c, ldc): (*mut f32, usize),
    (a, lines_per_row): (*const Line, usize),
    (b0, b1): (*const Line, *const Line),
    (steps, first): (usize, bool),
) {
    for (tile_row, tile_col) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let b = if tile_col == 0 { b0 } else { b1 };
        for i in 0..ROWS {
            let row = tile_row * ROWS + i;
            for j in 0..COLS {
                // SAFETY: inside the 32 × 32 sums at `c`.
                let out = unsafe { &mut *c.add(row * ldc + tile_col * COLS + j) };
                let mut sum = if first { 0.0 } else { *out };
                for step in 0..steps {
                    // SAFETY: row < 32 and step < steps, inside `a` as the caller promises.
                    let a_line = unsafe { &*a.add(row * lines_per_row + step) };
                    for pair in 0..DEPTH / 2 {
                        // SAFETY: line `step · 16 + pair` of the tile's `16 · steps`.
                        let b_line = unsafe { &*b.add(step * ROWS + pair) };
                        sum += f32_of(a_line.0[2 * pair]) * f32_of(b_line.0[2 * j])
                            + f32_of(a_line.0[2 * pair + 1]) * f32_of(b_line.0[2 * j + 1]);
                    }
                }
                *out = sum;
            }
        }
    }
}

mod amx {
    //! The AMX instructions: whether the process may use them, the tile configuration, and
    //! one 32 × 32 block of products.

    use super::{Line, OnceLock, TileUnit};

    /// Whether this CPU has AMX tiles with bf16 products and Linux lets this process use them
    /// (asked once: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16+).
    pub fn usable() -> bool {
        static USABLE: OnceLock<bool> = OnceLock::new();
        *USABLE.get_or_init(check)
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn check() -> bool {
        use std::arch::x86_64::{__cpuid_count, __get_cpuid_max};
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        let (max_leaf, _) = __get_cpuid_max(0);
        if max_leaf < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        let (bf16, tile) = (edx >> 22 & 1 == 1, edx >> 24 & 1 == 1);
        // SAFETY: a plain system call; it only asks for the permission.
        bf16 && tile
            && unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            } == 0
    }

    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    fn check() -> bool {
        false
    }

    /// The thread's tile configuration while it lives: eight tiles of 16 rows of 64 bytes
    /// (palette 1). Released on drop, so an idle thread keeps no tile state; it stays on the
    /// thread that loaded it (not `Send`).
    pub struct TileConfig(bool, std::marker::PhantomData<*const ()>);

    impl TileConfig {
        /// Loads the configuration when `unit` is AMX (nothing otherwise).
        pub fn load(unit: TileUnit) -> Self {
            #[cfg(target_arch = "x86_64")]
            if unit == TileUnit::Amx {
                assert!(usable(), "AMX was chosen on a CPU without it");
                #[repr(C, align(64))]
                struct Config([u8; 64]);
                let mut config = Config([0; 64]);
                config.0[0] = 1;
                for tile in 0..8 {
                    config.0[16 + 2 * tile] = 64;
                    config.0[48 + tile] = 16;
                }
                // SAFETY: AMX is usable (checked above); the configuration is 64 valid bytes.
                unsafe {
                    std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack));
                }
                return Self(true, std::marker::PhantomData);
            }
            let _ = unit;
            Self(false, std::marker::PhantomData)
        }
    }

    impl Drop for TileConfig {
        fn drop(&mut self) {
            let loaded = self.0;
            #[cfg(target_arch = "x86_64")]
            if loaded {
                // SAFETY: the configuration was loaded on this thread (the value is not `Send`).
                unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
            }
            let _ = loaded;
        }
    }

    /// `super::block` on AMX: tiles 0–3 hold the 2 × 2 output tiles, 4–5 the two row tiles of
    /// `a`, 6–7 the two column tiles of weights.
    ///
    /// # Safety
    /// As `super::block`, with the tile configuration loaded on this thread.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn block(
        (c, ldc): (*mut f32, usize),
        (a, lines_per_row): (*const Line, usize),
        (b0, b1): (*const Line, *const Line),
        (steps, first): (usize, bool),
    ) {
        macro_rules! tiles {
            ($($start:literal),*) => {
                std::arch::asm!(
                    $($start,)*
                    "2:",
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {line}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {line}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "add {a0}, 64",
                    "add {a1}, 64",
                    "add {b0}, 1024",
                    "add {b1}, 1024",
                    "dec {steps}",
                    "jnz 2b",
                    "tilestored [{c0} + {ldc}*1], tmm0",
                    "tilestored [{c0} + {ldc}*1 + 64], tmm1",
                    "tilestored [{c1} + {ldc}*1], tmm2",
                    "tilestored [{c1} + {ldc}*1 + 64], tmm3",
                    c0 = in(reg) c,
                    c1 = in(reg) c.wrapping_add(16 * ldc),
                    ldc = in(reg) ldc * 4,
                    a0 = inout(reg) a => _,
                    a1 = inout(reg) a.wrapping_add(16 * lines_per_row) => _,
                    lda = in(reg) lines_per_row * 64,
                    b0 = inout(reg) b0 => _,
                    b1 = inout(reg) b1 => _,
                    line = in(reg) 64usize,
                    steps = inout(reg) steps => _,
                    options(nostack),
                )
            };
        }
        // SAFETY: every load and store stays inside the blocks the caller vouches for; the
        // configuration (16 rows of 64 bytes per tile) is loaded.
        unsafe {
            if first {
                tiles!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3"
                );
            } else {
                tiles!(
                    "tileloadd tmm0, [{c0} + {ldc}*1]",
                    "tileloadd tmm1, [{c0} + {ldc}*1 + 64]",
                    "tileloadd tmm2, [{c1} + {ldc}*1]",
                    "tileloadd tmm3, [{c1} + {ldc}*1 + 64]"
                );
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn block(
        _: (*mut f32, usize),
        _: (*const Line, usize),
        _: (*const Line, *const Line),
        _: (usize, bool),
    ) {
        unreachable!("AMX exists on x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        crate::folded::kernels::tests::values(len, seed)
    }

    /// `relu(a · w + bias + residual)` in f64 from the bf16-rounded operands (the gate
    /// applied before rounding).
    fn reference(
        a: &[f32],
        w: &[f32],
        (m, k, n): (usize, usize, usize),
        gate: Option<&[f32]>,
        (bias, residual): (&[f32], Option<&[f32]>),
    ) -> Vec<f32> {
        let round = |x: f32| f64::from(f32_of(bf16(x)));
        (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                let sum: f64 = (0..k)
                    .map(|j| {
                        let g = gate.map_or(1.0, |g| g[j]);
                        round(a[r * k + j] * g) * round(w[j * n + c])
                    })
                    .sum();
                let x = residual.map_or(0.0, |x| f64::from(x[i]));
                ((sum + f64::from(bias[c]) + x) as f32).max(0.0)
            })
            .collect()
    }

    fn check(unit: TileUnit, (m, k, n): (usize, usize, usize), more: bool, threads: bool) {
        let a = values(m * k, 1);
        let w = values(k * n, 2);
        let bias = values(n, 5);
        let gate: Option<Vec<f32>> = more.then(|| values(k, 3));
        let residual: Option<Vec<f32>> = more.then(|| values(m * n, 4));
        let expected = reference(
            &a,
            &w,
            (m, k, n),
            gate.as_deref(),
            (&bias, residual.as_deref()),
        );
        let packed = PackedWeights::new(&w, k, n);
        let epilogue = Epilogue {
            bias: &bias,
            residual: residual.as_deref(),
            act: Act::Relu,
        };
        // Stale values where the output goes: all must be overwritten.
        let mut dst = vec![f32::NAN; m * n];
        matmul(
            &mut dst,
            &a,
            gate.as_deref(),
            &packed,
            &epilogue,
            unit,
            threads,
        );
        for (i, (got, want)) in dst.iter().zip(&expected).enumerate() {
            // f32 sums in another order than the f64 reference: a few ulps per term.
            let tolerance = 1e-5 * (k as f32).sqrt() * want.abs().max(1.0);
            assert!(
                (got - want).abs() <= tolerance,
                "{unit:?} {m}×{k}×{n}, gate and residual {more}: [{i}] {got} vs {want}"
            );
        }
    }

    const SHAPES: [(usize, usize, usize); 6] = [
        (1, 1, 1),
        (32, 32, 32),
        (33, 31, 17),
        (70, 100, 48),
        (361, 64, 40),
        (5, 27, 16),
    ];

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even (1).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 · 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even, upwards.
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16(-2.5), 0xc020);
        assert!(f32_of(bf16(f32::NAN)).is_nan());
        assert_eq!(f32_of(bf16(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn emulated_tiles_compute_the_rounded_product() {
        for shape in SHAPES {
            check(TileUnit::Emulated, shape, false, false);
            check(TileUnit::Emulated, shape, true, true);
        }
    }

    #[test]
    fn amx_tiles_compute_the_rounded_product() {
        let Some(unit) = TileUnit::detect() else {
            eprintln!("skipped: this CPU has no AMX (the emulated tiles are tested instead)");
            return;
        };
        for shape in SHAPES.into_iter().chain([(1000, 728, 728)]) {
            check(unit, shape, false, false);
            check(unit, shape, true, true);
        }
    }

    /// A dense convolution's patches, made and rounded row by row, give the very values of
    /// the product of all of them written out (`im2col`) first.
    #[test]
    fn patches_made_row_by_row_give_the_product_of_all_of_them() {
        let units = [Some(TileUnit::Emulated), TileUnit::detect()];
        // Xception's first convolution (3 channels, stride 2, no padding), and one with a
        // patch of 9 × 32 values (whole lines per tap) and padding.
        for ((h, w, c), kernel, stride, pad, n) in
            [((17, 15, 3), 3, 2, 0, 32), ((9, 7, 32), 3, 1, 1, 40)]
        {
            let input = values(h * w * c, 6);
            let patches = Patches {
                input: &input,
                shape: (h, w, c),
                kernel,
                stride,
                pad,
            };
            let (ho, wo) = patches.output_size();
            let (m, k) = (ho * wo, patches.row_len());
            let mut rows = vec![0.0; m * k];
            crate::folded::kernels::im2col(&input, (h, w, c), kernel, stride, pad, &mut rows);
            let weights = values(k * n, 7);
            let packed = PackedWeights::new(&weights, k, n);
            let bias = values(n, 8);
            let residual = values(m * n, 9);
            let epilogue = Epilogue {
                bias: &bias,
                residual: Some(&residual),
                act: Act::Relu,
            };
            for unit in units.into_iter().flatten() {
                for threads in [false, true] {
                    let mut want = vec![f32::NAN; m * n];
                    matmul(&mut want, &rows, None, &packed, &epilogue, unit, threads);
                    let mut got = vec![f32::NAN; m * n];
                    matmul_patches(&mut got, &patches, &packed, &epilogue, unit, threads);
                    assert_eq!(got, want, "{unit:?}, {h}×{w}×{c}, threads {threads}");
                    assert!(m > BLOCK && got.iter().any(|v| *v > 0.0));
                }
            }
        }
    }
}
