//! The CPU kernels of a folded network, on one image in channels-last layout (`[h][w][c]`):
//! matrix products through the `gemm` crate, and depthwise convolution, pooling and
//! activations written here so that they vectorise over channels.
//!
//! The loops are written once, generically, and compiled for AVX-512, AVX2+FMA and the
//! baseline; the fastest the CPU has is picked at run time.

use std::mem::MaybeUninit;

pub use gemm::Parallelism;

/// The non-linearity applied after a (folded) convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// None.
    Identity,
    /// `max(0, x)`.
    Relu,
    /// `x · relu6(x + 3) / 6`.
    HardSwish,
}

/// `a · b + c`, fused where the instruction set has it (`FMA`).
#[inline(always)]
pub(crate) fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
pub(crate) fn activate_impl(values: &mut [f32], act: Act) {
    match act {
        Act::Identity => {}
        Act::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
        Act::HardSwish => values
            .iter_mut()
            .for_each(|v| *v = *v * (*v + 3.0).clamp(0.0, 6.0) * (1.0 / 6.0)),
    }
}

/// Runs `$body` (a generic function call with a `const FMA: bool` parameter) compiled for
/// the best instruction set this CPU has.
macro_rules! dispatch {
    ($name:ident ( $($arg:ident : $ty:ty),* ) => $generic:ident) => {
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $generic::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $generic::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic::<false>($($arg),*)
        }
    };
}

// Also for the depthwise gradients on burn-flex (`crate::depthwise_conv`).
pub(crate) use dispatch;

pub mod backward;

dispatch!(activate(values: &mut [f32], act: Act) => activate_generic);

dispatch!(activate_into(dst: &mut [f32], src: &[f32], act: Act) => activate_into_generic);

/// `dst = act(src)`, in one pass.
#[inline(always)]
fn activate_into_generic<const FMA: bool>(dst: &mut [f32], src: &[f32], act: Act) {
    assert_eq!(dst.len(), src.len());
    match act {
        Act::Identity => dst.copy_from_slice(src),
        Act::Relu => dst.iter_mut().zip(src).for_each(|(d, v)| *d = v.max(0.0)),
        Act::HardSwish => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, v)| *d = *v * (*v + 3.0).clamp(0.0, 6.0) * (1.0 / 6.0)),
    }
}

#[inline(always)]
fn activate_generic<const FMA: bool>(values: &mut [f32], act: Act) {
    activate_impl(values, act)
}

/// Output size of a convolution or pooling along one axis.
pub fn output_size(input: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    (input + 2 * pad - kernel) / stride + 1
}

/// Output size of a convolution along one axis padded by `(before, after)`, or `None` when the
/// kernel is wider than the padded input.
pub fn padded_output_size(
    input: usize,
    kernel: usize,
    stride: usize,
    (before, after): (usize, usize),
) -> Option<usize> {
    let padded = input + before + after;
    (padded >= kernel).then(|| (padded - kernel) / stride + 1)
}

/// `dst[m × n] = a[m × k] · b[k × n]`, or `dst += a · b` when `accumulate`; all row-major.
/// `threads`: split the product over the rayon pool (for a single image), else run here.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    threads: bool,
) {
    let parallelism = if threads {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    matmul_strided(
        dst,
        accumulate,
        (a, k, 1),
        (b, n, 1),
        (m, k, n),
        parallelism,
    );
}

/// `dst[m × n] (+)= A · B` where `A` is `m × k` and `B` is `k × n`, each given as a slice
/// with (row, column) strides: transposed operands without copies. `accumulate` adds to `dst`
/// (row-major, contiguous).
pub fn matmul_strided(
    dst: &mut [f32],
    accumulate: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    (m, k, n): (usize, usize, usize),
    parallelism: Parallelism,
) {
    assert!(dst.len() >= m * n);
    // SAFETY: `dst` holds the `m × n` values the product writes (checked above), all set.
    unsafe { product(dst.as_mut_ptr(), accumulate, a, b, (m, k, n), parallelism) }
}

/// `dst = A · B` as [`matmul_strided`] computes it, into memory not yet set: the product
/// writes each of the `m × n` values of `dst` (its whole length) and reads none of them.
pub fn matmul_strided_into(
    dst: &mut [MaybeUninit<f32>],
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    (m, k, n): (usize, usize, usize),
    parallelism: Parallelism,
) {
    assert_eq!(dst.len(), m * n, "the product sets the whole destination");
    // SAFETY: `dst` holds the `m × n` values; without `accumulate` gemm only writes them
    // (`read_dst` false: the old values are never read, so they need not be set).
    unsafe { product(dst.as_mut_ptr().cast(), false, a, b, (m, k, n), parallelism) }
}

/// `gemm::gemm` on row-major `dst` and strided operands.
///
/// # Safety
/// `dst` points to `m × n` writable values, set when `accumulate`.
unsafe fn product(
    dst: *mut f32,
    accumulate: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    (m, k, n): (usize, usize, usize),
    parallelism: Parallelism,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(a.len() >= last(m, k, a_rs, a_cs) && b.len() >= last(k, n, b_rs, b_cs));
    // SAFETY: every element the strides address is inside the slices (checked above), and
    // `dst` is as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A depthwise convolution's shape and folded parameters.
#[derive(Clone, Copy)]
pub struct DepthwiseShape<'a> {
    /// Input height, width, channels.
    pub input: (usize, usize, usize),
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
    /// `[kernel · kernel][channels]`.
    pub weights: &'a [f32],
    /// `[channels]`.
    pub bias: &'a [f32],
    /// Activation of the output.
    pub act: Act,
    /// Apply ReLU to the input as it is read (Xception's ReLU before a separable convolution,
    /// whose un-activated input the shortcut still needs).
    pub input_relu: bool,
}

impl DepthwiseShape<'_> {
    /// The output's height and width.
    pub fn output_size(&self) -> (usize, usize) {
        let (h, w, _) = self.input;
        let size = |len| output_size(len, self.kernel, self.stride, self.pad);
        (size(h), size(w))
    }
}

/// The depthwise convolution of `input` into `out`, both channels-last.
pub fn depthwise(shape: &DepthwiseShape<'_>, input: &[f32], out: &mut [f32]) {
    let (ho, wo) = shape.output_size();
    depthwise_pixels(shape, input, 0..ho * wo, out);
}

/// Output pixels `pixels` (row-major) of the depthwise convolution of `input`, into `out`
/// (`pixels.len()` pixels, channels-last): a piece of the output, e.g. for the product that
/// takes it to be made as it goes.
pub fn depthwise_pixels(
    shape: &DepthwiseShape<'_>,
    input: &[f32],
    pixels: std::ops::Range<usize>,
    out: &mut [f32],
) {
    check_depthwise(shape, input, &pixels, out);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, AVX2 and FMA; the slices' lengths were checked.
            return unsafe { x86::depthwise_avx512(shape, input, pixels, out) };
        }
        // SAFETY: the CPU has AVX2 and FMA; the slices' lengths were checked.
        return unsafe { x86::depthwise(shape, input, pixels, out) };
    }
    depthwise_generic::<false>(shape, input, pixels, out)
}

fn check_depthwise(
    shape: &DepthwiseShape<'_>,
    input: &[f32],
    pixels: &std::ops::Range<usize>,
    out: &mut [f32],
) {
    let (h, w, c) = shape.input;
    let (ho, wo) = shape.output_size();
    let k = shape.kernel;
    assert!(
        pixels.start <= pixels.end && pixels.end <= ho * wo,
        "pixels of the output"
    );
    assert!(input.len() >= h * w * c && out.len() >= pixels.len() * c);
    assert!(shape.weights.len() == k * k * c && shape.bias.len() == c);
}

#[inline(always)]
fn depthwise_generic<const FMA: bool>(
    shape: &DepthwiseShape<'_>,
    input: &[f32],
    pixels: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let (h, w, c) = shape.input;
    let (k, stride, pad) = (shape.kernel, shape.stride, shape.pad);
    let (_, wo) = shape.output_size();
    let first = pixels.start;
    for pixel in pixels {
        let (oy, ox) = (pixel / wo, pixel % wo);
        let iy0 = (oy * stride) as isize - pad as isize;
        let ky = (-iy0).max(0) as usize..(h as isize - iy0).min(k as isize) as usize;
        let ix0 = (ox * stride) as isize - pad as isize;
        let kx = (-ix0).max(0) as usize..(w as isize - ix0).min(k as isize) as usize;
        let window = Window {
            origin: (iy0, ix0),
            ky,
            kx,
        };
        let dst = &mut out[(pixel - first) * c..][..c];
        let mut c0 = 0;
        while c0 + 32 <= c {
            depthwise_chunk::<FMA, 32>(shape, input, &window, c0, &mut dst[c0..c0 + 32]);
            c0 += 32;
        }
        while c0 + 8 <= c {
            depthwise_chunk::<FMA, 8>(shape, input, &window, c0, &mut dst[c0..c0 + 8]);
            c0 += 8;
        }
        while c0 < c {
            depthwise_chunk::<FMA, 1>(shape, input, &window, c0, &mut dst[c0..c0 + 1]);
            c0 += 1;
        }
    }
}

/// The input rows and columns of the kernel that fall inside the image, for one output pixel.
struct Window {
    origin: (isize, isize),
    ky: std::ops::Range<usize>,
    kx: std::ops::Range<usize>,
}

#[inline(always)]
fn depthwise_chunk<const FMA: bool, const W: usize>(
    shape: &DepthwiseShape<'_>,
    input: &[f32],
    window: &Window,
    c0: usize,
    dst: &mut [f32],
) {
    let (_, w, c) = shape.input;
    let k = shape.kernel;
    let mut acc = [0.0f32; W];
    acc.copy_from_slice(&shape.bias[c0..c0 + W]);
    for ky in window.ky.clone() {
        let row = (window.origin.0 + ky as isize) as usize * w;
        for kx in window.kx.clone() {
            let column = (window.origin.1 + kx as isize) as usize;
            let x: &[f32; W] = input[(row + column) * c + c0..][..W].try_into().unwrap();
            let weight: &[f32; W] = shape.weights[(ky * k + kx) * c + c0..][..W]
                .try_into()
                .unwrap();
            if shape.input_relu {
                for i in 0..W {
                    acc[i] = fma::<FMA>(x[i].max(0.0), weight[i], acc[i]);
                }
            } else {
                for i in 0..W {
                    acc[i] = fma::<FMA>(x[i], weight[i], acc[i]);
                }
            }
        }
    }
    activate_impl(&mut acc, shape.act);
    dst.copy_from_slice(&acc);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The depthwise convolution with SIMD intrinsics (the compiler did not vectorise the
    //! generic loop: it kept the accumulators in scalar registers), written once over
    //! [`Lanes`]: 8 channels a vector with AVX2 + FMA, 16 with AVX-512, whose last 8 (when
    //! the channels are not a multiple of 16) take the AVX2 vectors.

    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Act, DepthwiseShape};

    /// A vector of f32 lanes and what the kernel does with it.
    ///
    /// # Safety
    /// Every method needs the CPU features of its type (AVX2 + FMA, or AVX-512F).
    trait Lanes: Copy {
        /// f32 values a vector holds.
        const L: usize;
        unsafe fn load(at: *const f32) -> Self;
        unsafe fn store(self, at: *mut f32);
        unsafe fn splat(x: f32) -> Self;
        unsafe fn max(self, other: Self) -> Self;
        unsafe fn min(self, other: Self) -> Self;
        unsafe fn add(self, other: Self) -> Self;
        unsafe fn mul(self, other: Self) -> Self;
        /// `self · b + c`.
        unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    }

    impl Lanes for __m256 {
        const L: usize = 8;
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load(at: *const f32) -> Self {
            // SAFETY: the caller vouches for 8 readable values.
            unsafe { _mm256_loadu_ps(at) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store(self, at: *mut f32) {
            // SAFETY: the caller vouches for 8 writable values.
            unsafe { _mm256_storeu_ps(at, self) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn splat(x: f32) -> Self {
            _mm256_set1_ps(x)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn max(self, other: Self) -> Self {
            _mm256_max_ps(self, other)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn min(self, other: Self) -> Self {
            _mm256_min_ps(self, other)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn add(self, other: Self) -> Self {
            _mm256_add_ps(self, other)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn mul(self, other: Self) -> Self {
            _mm256_mul_ps(self, other)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            _mm256_fmadd_ps(self, b, c)
        }
    }

    impl Lanes for __m512 {
        const L: usize = 16;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(at: *const f32) -> Self {
            // SAFETY: the caller vouches for 16 readable values.
            unsafe { _mm512_loadu_ps(at) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store(self, at: *mut f32) {
            // SAFETY: the caller vouches for 16 writable values.
            unsafe { _mm512_storeu_ps(at, self) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn splat(x: f32) -> Self {
            _mm512_set1_ps(x)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn max(self, other: Self) -> Self {
            _mm512_max_ps(self, other)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn min(self, other: Self) -> Self {
            _mm512_min_ps(self, other)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn add(self, other: Self) -> Self {
            _mm512_add_ps(self, other)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn mul(self, other: Self) -> Self {
            _mm512_mul_ps(self, other)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            _mm512_fmadd_ps(self, b, c)
        }
    }

    #[inline(always)]
    unsafe fn activate<V: Lanes>(v: V, act: Act) -> V {
        // SAFETY: only called from functions compiled with `V`'s features.
        unsafe {
            match act {
                Act::Identity => v,
                Act::Relu => v.max(V::splat(0.0)),
                Act::HardSwish => {
                    let gate = v.add(V::splat(3.0)).max(V::splat(0.0)).min(V::splat(6.0));
                    v.mul(gate).mul(V::splat(1.0 / 6.0))
                }
            }
        }
    }

    /// `N` vectors of channels from `c0` for one output pixel whose kernel window is
    /// `rows × columns` (already clipped to the image), at input `origin`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pixel<V: Lanes, const N: usize>(
        shape: &DepthwiseShape<'_>,
        input: *const f32,
        origin: (isize, isize),
        rows: std::ops::Range<usize>,
        columns: std::ops::Range<usize>,
        c0: usize,
        dst: *mut f32,
    ) {
        unsafe {
            let (_, w, c) = shape.input;
            let k = shape.kernel;
            let zero = V::splat(0.0);
            let mut acc = [zero; N];
            for (j, a) in acc.iter_mut().enumerate() {
                *a = V::load(shape.bias.as_ptr().add(c0 + j * V::L));
            }
            for ky in rows {
                let row = (origin.0 + ky as isize) as usize * w;
                for kx in columns.clone() {
                    let column = (origin.1 + kx as isize) as usize;
                    let x = input.add((row + column) * c + c0);
                    let weight = shape.weights.as_ptr().add((ky * k + kx) * c + c0);
                    for (j, a) in acc.iter_mut().enumerate() {
                        let mut xv = V::load(x.add(j * V::L));
                        if shape.input_relu {
                            xv = xv.max(zero);
                        }
                        *a = xv.mul_add(V::load(weight.add(j * V::L)), *a);
                    }
                }
            }
            for (j, a) in acc.iter().enumerate() {
                activate(*a, shape.act).store(dst.add(c0 + j * V::L));
            }
        }
    }

    /// Output pixels one call of [`row_of_pixels`] computes.
    const P: usize = 4;

    /// `P` neighbouring output pixels of a stride-1, `K × K` convolution whose windows lie
    /// inside the image's columns, one vector of channels from `c0`: each input vector of a
    /// kernel row is loaded once and serves up to `K` outputs, each weight vector `P`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_of_pixels<V: Lanes, const K: usize>(
        shape: &DepthwiseShape<'_>,
        input: *const f32,
        iy0: isize,
        rows: std::ops::Range<usize>,
        ix0: isize,
        c0: usize,
        dst: *mut f32,
    ) {
        unsafe {
            let (_, w, c) = shape.input;
            let zero = V::splat(0.0);
            let bias = V::load(shape.bias.as_ptr().add(c0));
            let mut acc = [bias; P];
            // P + K - 1 ≤ 8 input columns (K ≤ 5).
            let mut xs = [zero; 8];
            for ky in rows {
                let row = input.add(((iy0 + ky as isize) as usize * w + ix0 as usize) * c + c0);
                for (j, x) in xs.iter_mut().enumerate().take(P + K - 1) {
                    *x = V::load(row.add(j * c));
                    if shape.input_relu {
                        *x = x.max(zero);
                    }
                }
                let weights = shape.weights.as_ptr().add(ky * K * c + c0);
                for kx in 0..K {
                    let wv = V::load(weights.add(kx * c));
                    for (p, a) in acc.iter_mut().enumerate() {
                        *a = xs[p + kx].mul_add(wv, *a);
                    }
                }
            }
            for (p, a) in acc.iter().enumerate() {
                activate(*a, shape.act).store(dst.add(p * c + c0));
            }
        }
    }

    /// See [`super::depthwise_pixels`], 8 channels a vector; the caller checked the slices'
    /// lengths.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn depthwise(
        shape: &DepthwiseShape<'_>,
        input: &[f32],
        pixels: Range<usize>,
        out: &mut [f32],
    ) {
        // SAFETY: as the caller promises; the CPU has AVX2 and FMA.
        unsafe { depthwise_in::<__m256>(shape, input, pixels, out) }
    }

    /// See [`super::depthwise_pixels`], 16 channels a vector; the caller checked the slices'
    /// lengths.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn depthwise_avx512(
        shape: &DepthwiseShape<'_>,
        input: &[f32],
        pixels: Range<usize>,
        out: &mut [f32],
    ) {
        // SAFETY: as the caller promises; the CPU has AVX-512F, AVX2 and FMA.
        unsafe { depthwise_in::<__m512>(shape, input, pixels, out) }
    }

    /// Output `pixels` of the depthwise convolution in vectors `V`, then (channels left over)
    /// vectors of 8, then one channel at a time.
    ///
    /// # Safety
    /// The CPU has `V`'s features and AVX2 + FMA; the slices' lengths were checked.
    #[inline(always)]
    unsafe fn depthwise_in<V: Lanes>(
        shape: &DepthwiseShape<'_>,
        input: &[f32],
        pixels: Range<usize>,
        out: &mut [f32],
    ) {
        let (h, w, c) = shape.input;
        let (k, stride, pad) = (shape.kernel, shape.stride, shape.pad);
        let (_, wo) = shape.output_size();
        let input_ptr = input.as_ptr();
        let wide = c / V::L * V::L;
        let vectors = c / 8 * 8;
        let first = pixels.start;
        let mut next = pixels.start;
        // One output row's run of pixels at a time.
        while next < pixels.end {
            let (oy, start) = (next / wo, next % wo);
            let end = wo.min(start + pixels.end - next);
            next += end - start;
            let iy0 = (oy * stride) as isize - pad as isize;
            let rows = (-iy0).max(0) as usize..(h as isize - iy0).min(k as isize) as usize;
            let at = |ox: usize| (oy * wo + ox - first) * c;
            let mut ox = start;
            while ox < end {
                let ix0 = (ox * stride) as isize - pad as isize;
                // P outputs at once where their windows lie inside the columns.
                let inside = ix0 >= 0 && ix0 as usize + P - 1 + k <= w && ox + P <= end;
                if stride == 1 && (k == 3 || k == 5) && inside {
                    let dst = out[at(ox)..][..P * c].as_mut_ptr();
                    // SAFETY: the P windows lie inside the image; writes stay inside these
                    // P pixels' outputs.
                    unsafe {
                        let at = |c0| (iy0, rows.clone(), ix0, c0, dst);
                        for c0 in (0..wide).step_by(V::L) {
                            let (a, b, c, d, e) = at(c0);
                            match k {
                                3 => row_of_pixels::<V, 3>(shape, input_ptr, a, b, c, d, e),
                                _ => row_of_pixels::<V, 5>(shape, input_ptr, a, b, c, d, e),
                            }
                        }
                        for c0 in (wide..vectors).step_by(8) {
                            let (a, b, c, d, e) = at(c0);
                            match k {
                                3 => row_of_pixels::<__m256, 3>(shape, input_ptr, a, b, c, d, e),
                                _ => row_of_pixels::<__m256, 5>(shape, input_ptr, a, b, c, d, e),
                            }
                        }
                    }
                    for p in 0..P {
                        let columns = 0..k;
                        channel_tail(
                            shape,
                            input,
                            (iy0, ix0 + p as isize),
                            (&rows, &columns),
                            vectors,
                            &mut out[at(ox + p)..][..c],
                        );
                    }
                    ox += P;
                    continue;
                }
                let columns = (-ix0).max(0) as usize..(w as isize - ix0).min(k as isize) as usize;
                let origin = (iy0, ix0);
                let dst = &mut out[at(ox)..][..c];
                let mut c0 = 0;
                // SAFETY: every read is inside `input` (the window is clipped to the image)
                // and every write inside this pixel's `c` outputs.
                unsafe {
                    let window = (rows.clone(), columns.clone());
                    let dst = dst.as_mut_ptr();
                    while c0 + 4 * V::L <= c {
                        let (r, k) = window.clone();
                        pixel::<V, 4>(shape, input_ptr, origin, r, k, c0, dst);
                        c0 += 4 * V::L;
                    }
                    while c0 + V::L <= c {
                        let (r, k) = window.clone();
                        pixel::<V, 1>(shape, input_ptr, origin, r, k, c0, dst);
                        c0 += V::L;
                    }
                    while c0 + 8 <= c {
                        let (r, k) = window.clone();
                        pixel::<__m256, 1>(shape, input_ptr, origin, r, k, c0, dst);
                        c0 += 8;
                    }
                }
                channel_tail(shape, input, origin, (&rows, &columns), c0, dst);
                ox += 1;
            }
        }
    }

    /// Channels from `c0` on of the output pixel whose window is at `(iy0, ix0)`, into `dst`
    /// (its `c` outputs), one at a time (fewer than a vector).
    #[inline(always)]
    fn channel_tail(
        shape: &DepthwiseShape<'_>,
        input: &[f32],
        (iy0, ix0): (isize, isize),
        (rows, columns): (&Range<usize>, &Range<usize>),
        c0: usize,
        dst: &mut [f32],
    ) {
        let (_, w, c) = shape.input;
        let k = shape.kernel;
        for (ch, out) in dst.iter_mut().enumerate().skip(c0) {
            let mut acc = shape.bias[ch];
            for ky in rows.clone() {
                for kx in columns.clone() {
                    let at =
                        ((iy0 + ky as isize) as usize * w + (ix0 + kx as isize) as usize) * c + ch;
                    let x = if shape.input_relu {
                        input[at].max(0.0)
                    } else {
                        input[at]
                    };
                    acc = x.mul_add(shape.weights[(ky * k + kx) * c + ch], acc);
                }
            }
            let mut v = [acc];
            super::activate_impl(&mut v, shape.act);
            *out = v[0];
        }
    }
}

/// Lays out the `kernel × kernel` patches of `input` (`[h][w][c]`) as rows
/// `[ho · wo][kernel · kernel · c]` (zeros where the patch overhangs), so that a dense
/// convolution is one matrix product. Returns `(ho, wo)`.
pub fn im2col(
    input: &[f32],
    shape: (usize, usize, usize),
    kernel: usize,
    stride: usize,
    pad: usize,
    out: &mut [f32],
) -> (usize, usize) {
    let patches = Patches {
        input,
        shape,
        kernel,
        stride,
        pad,
    };
    patches.write_all(out);
    patches.output_size()
}

/// The `kernel × kernel` patches of a channels-last image as the rows of a matrix, one per
/// output pixel: a dense convolution's input. [`im2col`] writes them all out; a product can
/// also make each row as it needs it.
#[derive(Clone, Copy)]
pub struct Patches<'a> {
    /// `[h][w][c]`.
    pub input: &'a [f32],
    /// `(h, w, c)`.
    pub shape: (usize, usize, usize),
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
}

impl Patches<'_> {
    /// The output's height and width: `ho · wo` rows.
    pub fn output_size(&self) -> (usize, usize) {
        let (h, w, _) = self.shape;
        let size = |len| output_size(len, self.kernel, self.stride, self.pad);
        (size(h), size(w))
    }

    /// Values per row: `kernel · kernel · c`.
    pub fn row_len(&self) -> usize {
        self.kernel * self.kernel * self.shape.2
    }

    /// Every row, one after the other, into `out` (`ho · wo · row_len` values).
    pub fn write_all(&self, out: &mut [f32]) {
        let (ho, wo) = self.output_size();
        let rows = out[..ho * wo * self.row_len()].chunks_exact_mut(self.row_len());
        for (index, row) in rows.enumerate() {
            self.row(index, row);
        }
    }

    /// Row `index` (output pixel `index`, row-major) into `row` (`row_len` values): tap by
    /// tap, each tap's `c` channels, zeros where the patch overhangs the image.
    pub fn row(&self, index: usize, row: &mut [f32]) {
        let (h, w, c) = self.shape;
        let (_, wo) = self.output_size();
        let (oy, ox) = (index / wo, index % wo);
        let kernel = self.kernel;
        for ky in 0..kernel {
            let iy = (oy * self.stride + ky) as isize - self.pad as isize;
            for kx in 0..kernel {
                let ix = (ox * self.stride + kx) as isize - self.pad as isize;
                let dst = &mut row[(ky * kernel + kx) * c..][..c];
                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                    dst.fill(0.0);
                } else {
                    let at = (iy as usize * w + ix as usize) * c;
                    dst.copy_from_slice(&self.input[at..at + c]);
                }
            }
        }
    }
}

/// Every `stride`-th pixel of `input` in both directions (a strided 1x1 convolution's input).
pub fn subsample(input: &[f32], (h, w, c): (usize, usize, usize), stride: usize, out: &mut [f32]) {
    let (ho, wo) = (h.div_ceil(stride), w.div_ceil(stride));
    for oy in 0..ho {
        for ox in 0..wo {
            let at = (oy * stride * w + ox * stride) * c;
            out[(oy * wo + ox) * c..][..c].copy_from_slice(&input[at..at + c]);
        }
    }
}

dispatch!(max_pool(input: &[f32], shape: (usize, usize, usize), kernel: usize, stride: usize, pad: usize, out: &mut [f32]) => max_pool_generic);

/// Max over `kernel × kernel` windows; taps in the padding are ignored (PyTorch's `-inf`).
#[inline(always)]
fn max_pool_generic<const FMA: bool>(
    input: &[f32],
    (h, w, c): (usize, usize, usize),
    kernel: usize,
    stride: usize,
    pad: usize,
    out: &mut [f32],
) {
    let ho = output_size(h, kernel, stride, pad);
    let wo = output_size(w, kernel, stride, pad);
    for oy in 0..ho {
        let iy0 = (oy * stride) as isize - pad as isize;
        for ox in 0..wo {
            let ix0 = (ox * stride) as isize - pad as isize;
            let dst = &mut out[(oy * wo + ox) * c..][..c];
            dst.fill(f32::NEG_INFINITY);
            for ky in 0..kernel as isize {
                let iy = iy0 + ky;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for kx in 0..kernel as isize {
                    let ix = ix0 + kx;
                    if ix < 0 || ix >= w as isize {
                        continue;
                    }
                    let at = (iy as usize * w + ix as usize) * c;
                    for (d, x) in dst.iter_mut().zip(&input[at..at + c]) {
                        *d = d.max(*x);
                    }
                }
            }
        }
    }
}

dispatch!(mean_over_pixels(input: &[f32], pixels: usize, out: &mut [f32]) => mean_generic);

/// The mean of each channel of `input` (`[pixels][c]`, `c = out.len()`).
#[inline(always)]
fn mean_generic<const FMA: bool>(input: &[f32], pixels: usize, out: &mut [f32]) {
    let c = out.len();
    out.fill(0.0);
    for pixel in input[..pixels * c].chunks_exact(c) {
        for (o, x) in out.iter_mut().zip(pixel) {
            *o += *x;
        }
    }
    let scale = 1.0 / pixels as f32;
    out.iter_mut().for_each(|o| *o *= scale);
}

dispatch!(scale_channels(values: &mut [f32], gate: &[f32]) => scale_generic);

dispatch!(scale_channels_into(dst: &mut [f32], src: &[f32], gate: &[f32]) => scale_into_generic);

/// `dst = src` scaled channel by channel (see [`scale_channels`]).
#[inline(always)]
fn scale_into_generic<const FMA: bool>(dst: &mut [f32], src: &[f32], gate: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let n = gate.len();
    for (d, s) in dst.chunks_exact_mut(n).zip(src.chunks_exact(n)) {
        for ((d, s), g) in d.iter_mut().zip(s).zip(gate) {
            *d = *s * *g;
        }
    }
}

/// Multiplies every pixel of `values` (`[pixels][c]`) by `gate` (`[c]`), channel by channel.
#[inline(always)]
fn scale_generic<const FMA: bool>(values: &mut [f32], gate: &[f32]) {
    for pixel in values.chunks_exact_mut(gate.len()) {
        for (v, g) in pixel.iter_mut().zip(gate) {
            *v *= *g;
        }
    }
}

dispatch!(fill_rows(dst: &mut [f32], bias: &[f32], residual: Option<&[f32]>) => fill_rows_generic);

/// Every row of `dst` (`[rows][n]`) set to `bias` (`[n]`), plus the same row of `residual`.
#[inline(always)]
fn fill_rows_generic<const FMA: bool>(dst: &mut [f32], bias: &[f32], residual: Option<&[f32]>) {
    let n = bias.len();
    match residual {
        Some(residual) => {
            for (row, r) in dst.chunks_exact_mut(n).zip(residual.chunks_exact(n)) {
                for ((d, b), r) in row.iter_mut().zip(bias).zip(r) {
                    *d = *b + *r;
                }
            }
        }
        None => dst
            .chunks_exact_mut(n)
            .for_each(|row| row.copy_from_slice(bias)),
    }
}

dispatch!(add_into(dst: &mut [f32], other: &[f32]) => add_generic);

#[inline(always)]
fn add_generic<const FMA: bool>(dst: &mut [f32], other: &[f32]) {
    for (d, o) in dst.iter_mut().zip(other) {
        *d += *o;
    }
}

dispatch!(vector_matmul(x: &[f32], w: &[f32], bias: &[f32], y: &mut [f32]) => vector_matmul_generic);

/// `y[n] = bias[n] + x[k] · w[k][n]`: a dense layer on one vector.
#[inline(always)]
fn vector_matmul_generic<const FMA: bool>(x: &[f32], w: &[f32], bias: &[f32], y: &mut [f32]) {
    let n = bias.len();
    y.copy_from_slice(bias);
    for (xi, row) in x.iter().zip(w.chunks_exact(n)) {
        for (yj, wj) in y.iter_mut().zip(row) {
            *yj = fma::<FMA>(*xi, *wj, *yj);
        }
    }
}

dispatch!(add_outer(g: &mut [f32], a: &[f32], b: &[f32]) => add_outer_generic);

/// `g[i][j] += a[i] · b[j]`.
#[inline(always)]
fn add_outer_generic<const FMA: bool>(g: &mut [f32], a: &[f32], b: &[f32]) {
    for (row, ai) in g.chunks_exact_mut(b.len()).zip(a) {
        for (gv, bj) in row.iter_mut().zip(b) {
            *gv = fma::<FMA>(*ai, *bj, *gv);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A direct, unoptimised depthwise convolution to check the kernel against.
    fn reference_depthwise(shape: &DepthwiseShape<'_>, input: &[f32]) -> Vec<f32> {
        let (h, w, c) = shape.input;
        let (k, s, p) = (shape.kernel, shape.stride, shape.pad);
        let (ho, wo) = (output_size(h, k, s, p), output_size(w, k, s, p));
        let mut out = vec![0.0; ho * wo * c];
        for oy in 0..ho {
            for ox in 0..wo {
                for ch in 0..c {
                    let mut acc = shape.bias[ch] as f64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s + ky) as isize - p as isize;
                            let ix = (ox * s + kx) as isize - p as isize;
                            if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                                let mut x = input[(iy as usize * w + ix as usize) * c + ch];
                                if shape.input_relu {
                                    x = x.max(0.0);
                                }
                                acc += (x * shape.weights[(ky * k + kx) * c + ch]) as f64;
                            }
                        }
                    }
                    let mut v = [acc as f32];
                    activate_impl(&mut v, shape.act);
                    out[(oy * wo + ox) * c + ch] = v[0];
                }
            }
        }
        out
    }

    pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// The depthwise kernels this CPU can run: the one [`depthwise_pixels`] picks, the
    /// portable one, and each vector width on its own.
    fn depthwise_kernels() -> Vec<(&'static str, Depthwise)> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut kernels: Vec<(&'static str, Depthwise)> = vec![
            ("dispatched", depthwise_pixels),
            ("portable", depthwise_generic::<false>),
        ];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA; the test's slices have the lengths it checks.
            kernels.push(("avx2", |s, i, p, o| unsafe { x86::depthwise(s, i, p, o) }));
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: as above, and the CPU has AVX-512F.
                kernels.push(("avx-512", |s, i, p, o| unsafe {
                    x86::depthwise_avx512(s, i, p, o)
                }));
            }
        }
        kernels
    }

    type Depthwise = fn(&DepthwiseShape<'_>, &[f32], std::ops::Range<usize>, &mut [f32]);

    #[test]
    fn depthwise_matches_a_direct_convolution() {
        for (h, w, c, k, s) in [
            // 89 channels: four vectors of 16, one of 16, one of 8, one alone.
            (6, 12, 89, 3, 1),
            (5, 7, 89, 5, 2),
            (7, 9, 40, 3, 1),
            (8, 8, 72, 5, 2),
            (5, 6, 3, 3, 2),
            (4, 4, 33, 3, 1),
            // Wide enough for the several-pixels path, with a channel tail.
            (9, 14, 36, 3, 1),
            (10, 13, 44, 5, 1),
        ] {
            for (act, input_relu) in [
                (Act::HardSwish, false),
                (Act::Identity, true),
                (Act::Relu, false),
            ] {
                let pad = ((s - 1) + (k - 1)) / 2;
                let weights = values(k * k * c, 1);
                let bias = values(c, 2);
                let input = values(h * w * c, 3);
                let shape = DepthwiseShape {
                    input: (h, w, c),
                    kernel: k,
                    stride: s,
                    pad,
                    weights: &weights,
                    bias: &bias,
                    act,
                    input_relu,
                };
                let want = reference_depthwise(&shape, &input);
                let (ho, wo) = shape.output_size();
                for (name, kernel) in depthwise_kernels() {
                    // All pixels at once, and in pieces that start and end mid-row.
                    for piece in [ho * wo, 5, 13] {
                        let mut got = vec![f32::NAN; want.len()];
                        for start in (0..ho * wo).step_by(piece) {
                            let pixels = start..(start + piece).min(ho * wo);
                            let out = &mut got[start * c..pixels.end * c];
                            kernel(&shape, &input, pixels, out);
                        }
                        for (g, w) in got.iter().zip(&want) {
                            let close = (g - w).abs() <= 1e-5 * (1.0 + w.abs());
                            assert!(close, "{name}, pieces of {piece}: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_accumulates_onto_the_destination() {
        let (m, k, n) = (5, 7, 3);
        let a = values(m * k, 4);
        let b = values(k * n, 5);
        let mut dst = vec![1.0; m * n];
        matmul(&mut dst, true, &a, &b, m, k, n, false);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum::<f32>();
                assert!((dst[i * n + j] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn max_pool_ignores_the_padding() {
        // 2x2 single channel, all negative: padded taps must not win with 0.
        let input = [-4.0, -3.0, -2.0, -1.0];
        let mut out = [0.0; 1];
        max_pool(&input, (2, 2, 1), 3, 2, 1, &mut out);
        assert_eq!(out, [-1.0]);
    }

    #[test]
    fn im2col_pads_with_zeros() {
        let input = [1.0, 2.0, 3.0, 4.0];
        let mut out = vec![9.0; 4 * 9];
        assert_eq!(im2col(&input, (2, 2, 1), 3, 1, 1, &mut out), (2, 2));
        assert_eq!(&out[..9], &[0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 4.0]);
    }
}
