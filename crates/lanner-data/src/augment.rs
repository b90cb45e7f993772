//! Training-time augmentation as the seed's Keras model applies it: `RandomFlip("horizontal")`
//! then `RandomRotation(factor)` with reflect fill and bilinear sampling, reproducing
//! TensorFlow's `ImageProjectiveTransformV3` (what Keras' TF backend runs) pixel for pixel.

use std::mem::MaybeUninit;

use crate::resize::PIXEL_STRIDE;
use crate::rng::SplitMix64;

/// Which augmentations run during training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    /// Flip left-right with probability 0.5.
    pub horizontal_flip: bool,
    /// Keras' `RandomRotation(factor)`: an angle uniform in `±factor·2π`; 0 disables it.
    pub rotation_factor: f32,
}

impl Augmentation {
    /// The seed's augmentation: flip + rotation by `factor`.
    pub fn seed_recipe(rotation_factor: f32) -> Self {
        Augmentation {
            horizontal_flip: true,
            rotation_factor,
        }
    }

    /// Draws the transform for one sample.
    pub fn draw(&self, rng: &mut SplitMix64) -> SampleTransform {
        let flip = self.horizontal_flip && rng.next_f32() < 0.5;
        let angle = if self.rotation_factor > 0.0 {
            let limit = self.rotation_factor * std::f32::consts::TAU;
            (rng.next_f32() * 2.0 - 1.0) * limit
        } else {
            0.0
        };
        SampleTransform { flip, angle }
    }
}

/// The concrete transform of one image.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SampleTransform {
    /// Mirror left-right (applied before the rotation, as in the seed's `Sequential`).
    pub flip: bool,
    /// Counter-clockwise rotation in radians about the image centre.
    pub angle: f32,
}

/// Applies `transform` to a resized image and writes planar RGB (CHW) into `out`. With no
/// transform this is a plain layout change.
///
/// `src` holds `height × width` interleaved pixels of `stride` floats: 4 (RGBX, as
/// [`resize_bilinear`](crate::resize::resize_bilinear) writes it) or 3 (RGB, as the loader's
/// cache keeps it), followed by at least `4 - stride` more floats (the vector code reads four
/// floats per pixel).
pub fn transform_to_chw(
    src: &[f32],
    stride: usize,
    height: usize,
    width: usize,
    transform: SampleTransform,
    out: &mut [f32],
) {
    // SAFETY: the function only writes initialised floats into `out`.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
    transform_into_uninit(src, stride, height, width, transform, out);
}

/// [`transform_to_chw`] into memory that need not be initialised (a batch's spare capacity):
/// every float of `out` is written.
pub fn transform_into_uninit(
    src: &[f32],
    stride: usize,
    height: usize,
    width: usize,
    transform: SampleTransform,
    out: &mut [MaybeUninit<f32>],
) {
    assert!(
        stride == 3 || stride == PIXEL_STRIDE,
        "3 or 4 floats per pixel"
    );
    assert!(src.len() >= height * width * stride + (PIXEL_STRIDE - stride));
    assert_eq!(out.len(), height * width * 3);
    let plane = height * width;
    let column = |x: usize| if transform.flip { width - 1 - x } else { x };
    if transform.angle == 0.0 {
        for y in 0..height {
            for x in 0..width {
                let s = (y * width + column(x)) * stride;
                let d = y * width + x;
                out[d].write(src[s]);
                out[plane + d].write(src[s + 1]);
                out[2 * plane + d].write(src[s + 2]);
            }
        }
        return;
    }
    let m = RotationMatrix::new(transform.angle, height, width);
    let rotation = Rotation {
        src,
        stride,
        m,
        height,
        width,
        flip: transform.flip,
    };
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    let (planes_rg, plane_b) = out.split_at_mut(2 * plane);
    let (plane_r, plane_g) = planes_rg.split_at_mut(plane);
    for y in 0..height {
        let row = y * width..(y + 1) * width;
        let (r, g, b) = (
            &mut plane_r[row.clone()],
            &mut plane_g[row.clone()],
            &mut plane_b[row],
        );
        let out = RowOut {
            red: r,
            green: g,
            blue: b,
        };
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 was detected above.
            unsafe { avx2::rotate_row(&rotation, y, out) };
            continue;
        }
        rotate_row(&rotation, y, out);
    }
}

/// One output row of the rotation, a pixel at a time: TF's output→input map, reflect fill and
/// `bilinear_interpolation`, term for term (bit-identical to TensorFlow). The portable version
/// of `avx2::rotate_row`, and its reference in the tests.
fn rotate_row(rotation: &Rotation, y: usize, out: RowOut) {
    let Rotation {
        src,
        stride,
        m,
        height,
        width,
        flip,
    } = *rotation;
    let RowOut { red, green, blue } = out;
    let yf = y as f32;
    let (row_x, row_y) = (m.a1 * yf, m.b1 * yf);
    let (last_x, last_y) = (width - 1, height - 1);
    for x in 0..width {
        let xf = x as f32;
        let ix = reflect(m.a0 * xf + row_x + m.a2, width);
        let iy = reflect(m.b0 * xf + row_y + m.b2, height);
        // After reflect both lie in [0, len - 1], where truncation is the floor.
        let (x0, y0) = ((ix as usize).min(last_x), (iy as usize).min(last_y));
        let (x0f, y0f) = (x0 as f32, y0 as f32);
        let (wx0, wx1, wy0, wy1) = ((x0f + 1.0) - ix, ix - x0f, (y0f + 1.0) - iy, iy - y0f);
        // A neighbour past the last row or column has weight exactly 0: TF reads it as 0, we
        // read the edge pixel, which gives the same (finite) sum.
        let (x1, y1) = ((x0 + 1).min(last_x), (y0 + 1).min(last_y));
        let (c0, c1) = if flip {
            (last_x - x0, last_x - x1)
        } else {
            (x0, x1)
        };
        let at = |row: usize, col: usize| &src[(row * width + col) * stride..][..3];
        let (tl, tr, bl, br) = (at(y0, c0), at(y0, c1), at(y1, c0), at(y1, c1));
        let mix = |c: usize| {
            let top = wx0 * tl[c] + wx1 * tr[c];
            let bottom = wx0 * bl[c] + wx1 * br[c];
            top * wy0 + bottom * wy1
        };
        red[x].write(mix(0));
        green[x].write(mix(1));
        blue[x].write(mix(2));
    }
}

/// The rotation eight output pixels at a time with AVX2 (x86-64 CPUs since 2013): coordinates,
/// reflect fill, weights and source offsets in 8-lane vectors; then two pixels per register,
/// each 128-bit half one pixel's four floats (RGBX or RGB plus the next float), so that each
/// corner of the bilinear mix is one load per pixel. (Gathering each plane instead was
/// slower: eight-lane gathers are slow on AMD Zen 4.) Same IEEE operations in the same order
/// as [`rotate_row`] (no fused multiply-adds), so the output is identical, bit for bit.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Rotation, RowOut};
    use crate::resize::PIXEL_STRIDE;

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rotate_row(rotation: &Rotation, y: usize, out: RowOut) {
        let Rotation {
            src,
            stride: pixel_stride,
            m,
            height,
            width,
            flip,
        } = *rotation;
        // Offsets are computed exactly in f32, which holds integers up to 2^24; reflecting
        // into a single row or column is rare enough for the scalar code.
        if height * width * pixel_stride >= 1 << 24 || height < 2 || width < 2 {
            return super::rotate_row(rotation, y, out);
        }
        let RowOut { red, green, blue } = out;
        assert!(src.len() >= height * width * pixel_stride + (PIXEL_STRIDE - pixel_stride));
        let yf = y as f32;
        let (max_x, max_y) = (
            _mm256_set1_ps(width as f32 - 1.0),
            _mm256_set1_ps(height as f32 - 1.0),
        );
        let (zero, one) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0));
        let (row_x, row_y) = (_mm256_set1_ps(m.a1 * yf), _mm256_set1_ps(m.b1 * yf));
        let (a0, a2, b0, b2) = (
            _mm256_set1_ps(m.a0),
            _mm256_set1_ps(m.a2),
            _mm256_set1_ps(m.b0),
            _mm256_set1_ps(m.b2),
        );
        let stride = _mm256_set1_ps(pixel_stride as f32);
        let row_len = _mm256_set1_ps(width as f32);
        let (last_x0, last_y0) = (
            _mm256_set1_ps(width as f32 - 2.0),
            _mm256_set1_ps(height as f32 - 2.0),
        );
        // From the top-left corner to the right-hand one (left-hand in the source when
        // flipped) and to the one below, in floats.
        let next_column = if flip {
            -(pixel_stride as isize)
        } else {
            pixel_stride as isize
        };
        let next_row = (width * pixel_stride) as isize;
        let lane_x = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
        let mut x = 0;
        while x < width {
            let xf = _mm256_add_ps(_mm256_set1_ps(x as f32), lane_x);
            let mut ix = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(a0, xf), row_x), a2);
            let mut iy = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(b0, xf), row_y), b2);
            ix = reflect(ix, width, max_x);
            iy = reflect(iy, height, max_y);
            // Clamping changes nothing for reflected values; it maps NaN to 0.
            ix = _mm256_min_ps(_mm256_max_ps(ix, zero), max_x);
            iy = _mm256_min_ps(_mm256_max_ps(iy, zero), max_y);
            // The top-left corner, kept one pixel inside the last row and column so that all
            // four corners are in the image. Where that moves it (a coordinate exactly on the
            // last row or column) the weights become (0, 1) instead of (1, 0) and pick the
            // same pixel: 0·a + 1·b equals 1·b + 0·c for finite pixels, bit for bit.
            let x0 = _mm256_min_ps(_mm256_cvtepi32_ps(_mm256_cvttps_epi32(ix)), last_x0);
            let y0 = _mm256_min_ps(_mm256_cvtepi32_ps(_mm256_cvttps_epi32(iy)), last_y0);
            let wx0 = _mm256_sub_ps(_mm256_add_ps(x0, one), ix);
            let wx1 = _mm256_sub_ps(ix, x0);
            let wy0 = _mm256_sub_ps(_mm256_add_ps(y0, one), iy);
            let wy1 = _mm256_sub_ps(iy, y0);
            let c0 = if flip { _mm256_sub_ps(max_x, x0) } else { x0 };
            let mut corner = [0i32; 8];
            let offsets = _mm256_cvttps_epi32(_mm256_mul_ps(
                _mm256_add_ps(_mm256_mul_ps(y0, row_len), c0),
                stride,
            ));
            // SAFETY: `corner` holds eight i32.
            unsafe { _mm256_storeu_si256(corner.as_mut_ptr().cast(), offsets) };
            // Pixels k and k + 4 share a register, one RGBX pixel per 128-bit half: then each
            // half transposes to four pixels of a plane with no lane crossing.
            let mut mixed = [_mm256_setzero_ps(); 4];
            for (k, mixed) in mixed.iter_mut().enumerate() {
                let (lo, hi) = (k as i32, k as i32 + 4);
                let spread = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
                let (wx0, wx1) = (
                    _mm256_permutevar8x32_ps(wx0, spread),
                    _mm256_permutevar8x32_ps(wx1, spread),
                );
                let (wy0, wy1) = (
                    _mm256_permutevar8x32_ps(wy0, spread),
                    _mm256_permutevar8x32_ps(wy1, spread),
                );
                // SAFETY: the top-left corner lies in [0, width − 2] × [0, height − 2] (NaN
                // clamps to 0), so the four corners are pixels of the image and each 4-float
                // load ends by (height × width − 1) × stride + 4, inside `src` (asserted).
                let [tl, tr, bl, br] =
                    [0, next_column, next_row, next_row + next_column].map(|delta| unsafe {
                        _mm256_loadu2_m128(
                            src.as_ptr().offset(corner[k + 4] as isize + delta),
                            src.as_ptr().offset(corner[k] as isize + delta),
                        )
                    });
                let top = _mm256_add_ps(_mm256_mul_ps(wx0, tl), _mm256_mul_ps(wx1, tr));
                let bottom = _mm256_add_ps(_mm256_mul_ps(wx0, bl), _mm256_mul_ps(wx1, br));
                *mixed = _mm256_add_ps(_mm256_mul_ps(top, wy0), _mm256_mul_ps(bottom, wy1));
            }
            // Eight RGBX pixels → the R, G and B of eight pixels (two 4×4 transposes).
            let rg01 = _mm256_unpacklo_ps(mixed[0], mixed[1]);
            let rg23 = _mm256_unpacklo_ps(mixed[2], mixed[3]);
            let bx01 = _mm256_unpackhi_ps(mixed[0], mixed[1]);
            let bx23 = _mm256_unpackhi_ps(mixed[2], mixed[3]);
            let planes = [
                _mm256_shuffle_ps::<0x44>(rg01, rg23),
                _mm256_shuffle_ps::<0xEE>(rg01, rg23),
                _mm256_shuffle_ps::<0x44>(bx01, bx23),
            ];
            for (plane, values) in [&mut *red, &mut *green, &mut *blue].into_iter().zip(planes) {
                match plane.get_mut(x..x + 8) {
                    // SAFETY: the slice holds eight floats.
                    Some(eight) => unsafe { _mm256_storeu_ps(eight.as_mut_ptr().cast(), values) },
                    None => {
                        let mut lanes = [0.0f32; 8];
                        // SAFETY: `lanes` holds eight floats.
                        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), values) };
                        for (out, value) in plane[x..].iter_mut().zip(lanes) {
                            out.write(value);
                        }
                    }
                }
            }
            x += 8;
        }
    }

    /// TF's reflect fill ([`super::reflect`] before its clamp) on eight coordinates, for
    /// `len` ≥ 2: the same operations, lane by lane, selected with blends.
    #[target_feature(enable = "avx2")]
    fn reflect(c: __m256, len: usize, max: __m256) -> __m256 {
        let zero = _mm256_setzero_ps();
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(c, zero);
        let above = _mm256_cmp_ps::<_CMP_GT_OQ>(c, max);
        if _mm256_movemask_ps(_mm256_or_ps(below, above)) == 0 {
            return c;
        }
        let len_f = _mm256_set1_ps(len as f32);
        let size2 = _mm256_set1_ps((2 * len) as f32);
        let one = _mm256_set1_ps(1.0);
        let negate = |v: __m256| _mm256_xor_ps(v, _mm256_set1_ps(-0.0));
        let trunc = |v: __m256| _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        // c < 0: c += size2·trunc(−c / size2); then c + size2 if c < −len, else −c − 1.
        let low = _mm256_add_ps(
            c,
            _mm256_mul_ps(size2, trunc(_mm256_div_ps(negate(c), size2))),
        );
        let low = _mm256_blendv_ps(
            _mm256_sub_ps(negate(low), one),
            _mm256_add_ps(low, size2),
            _mm256_cmp_ps::<_CMP_LT_OQ>(low, negate(len_f)),
        );
        // c > len − 1: c −= size2·trunc(c / size2); then size2 − c − 1 if c ≥ len.
        let high = _mm256_sub_ps(c, _mm256_mul_ps(size2, trunc(_mm256_div_ps(c, size2))));
        let high = _mm256_blendv_ps(
            high,
            _mm256_sub_ps(_mm256_sub_ps(size2, high), one),
            _mm256_cmp_ps::<_CMP_GE_OQ>(high, len_f),
        );
        _mm256_blendv_ps(_mm256_blendv_ps(c, high, above), low, below)
    }
}

/// One image being rotated: the source (`stride` floats per pixel), its size, the
/// output→input map and the flip.
#[derive(Clone, Copy)]
struct Rotation<'a> {
    src: &'a [f32],
    stride: usize,
    m: RotationMatrix,
    height: usize,
    width: usize,
    flip: bool,
}

/// The three output planes of one row.
struct RowOut<'a> {
    red: &'a mut [MaybeUninit<f32>],
    green: &'a mut [MaybeUninit<f32>],
    blue: &'a mut [MaybeUninit<f32>],
}

/// The output→input affine map Keras builds for a rotation about the image centre
/// (`_compute_affine_matrix` with scale 1, no shear, no translation).
#[derive(Clone, Copy)]
struct RotationMatrix {
    a0: f32,
    a1: f32,
    a2: f32,
    b0: f32,
    b1: f32,
    b2: f32,
}

impl RotationMatrix {
    fn new(angle: f32, height: usize, width: usize) -> Self {
        let cx = 0.5 * (width as f32 - 1.0);
        let cy = 0.5 * (height as f32 - 1.0);
        let (sin, cos) = angle.sin_cos();
        let (a0, a1) = (cos, -sin);
        let (b0, b1) = (sin, cos);
        RotationMatrix {
            a0,
            a1,
            a2: cx - cx * a0 - cy * a1,
            b0,
            b1,
            b2: cy - cx * b0 - cy * b1,
        }
    }
}

/// TF's reflect fill mode (`dcba|abcd|dcba`) for a continuous coordinate, then clamped.
fn reflect(coord: f32, len: usize) -> f32 {
    let len_i = len as i64;
    let len_f = len as f32;
    let mut c = coord;
    if c < 0.0 {
        if len <= 1 {
            c = 0.0;
        } else {
            let size2 = (2 * len_i) as f32;
            if c < size2 {
                c += size2 * ((-c / size2) as i64) as f32;
            }
            c = if c < -len_f { c + size2 } else { -c - 1.0 };
        }
    } else if c > len_f - 1.0 {
        if len <= 1 {
            c = 0.0;
        } else {
            let size2 = (2 * len_i) as f32;
            c -= size2 * ((c / size2) as i64) as f32;
            if c >= len_f {
                c = size2 - c - 1.0;
            }
        }
    }
    c.clamp(0.0, len_f - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(h: usize, w: usize) -> Vec<f32> {
        (0..h * w * PIXEL_STRIDE)
            .map(|i| {
                if i % 4 == 3 {
                    0.0
                } else {
                    (i * 7 % 251) as f32
                }
            })
            .collect()
    }

    #[test]
    fn no_transform_is_a_layout_change() {
        let src = pattern(3, 4);
        let mut out = vec![0.0; 36];
        transform_to_chw(
            &src,
            PIXEL_STRIDE,
            3,
            4,
            SampleTransform::default(),
            &mut out,
        );
        // pixel (y=1, x=2), channel 1
        assert_eq!(out[12 + 4 + 2], src[(4 + 2) * PIXEL_STRIDE + 1]);
    }

    #[test]
    fn flip_mirrors_columns() {
        let src = pattern(2, 5);
        let mut out = vec![0.0; 30];
        transform_to_chw(
            &src,
            PIXEL_STRIDE,
            2,
            5,
            SampleTransform {
                flip: true,
                angle: 0.0,
            },
            &mut out,
        );
        for x in 0..5 {
            assert_eq!(out[5 + x], src[(5 + 4 - x) * PIXEL_STRIDE]);
        }
    }

    #[test]
    fn quarter_turn_moves_pixels_counter_clockwise() {
        // A square image turned by +90°: output (x, y) reads input (y, n-1-x)... as TF's map
        // x_in = cos·x − sin·y + a2 = −y + (n−1), y_in = sin·x + cos·y + b2 = x.
        let n = 5;
        let src = pattern(n, n);
        let mut out = vec![0.0; n * n * 3];
        let angle = std::f32::consts::FRAC_PI_2;
        transform_to_chw(
            &src,
            PIXEL_STRIDE,
            n,
            n,
            SampleTransform { flip: false, angle },
            &mut out,
        );
        for y in 0..n {
            for x in 0..n {
                let expected = src[(x * n + (n - 1 - y)) * PIXEL_STRIDE];
                assert!((out[y * n + x] - expected).abs() < 1e-3, "({x},{y})");
            }
        }
    }

    /// Rotates `src` row by row with one of the row functions.
    fn rotate_rows(
        src: &[f32],
        stride: usize,
        (h, w): (usize, usize),
        transform: SampleTransform,
        row_fn: &dyn Fn(&Rotation, usize, RowOut),
    ) -> Vec<f32> {
        let rotation = Rotation {
            stride,
            src,
            m: RotationMatrix::new(transform.angle, h, w),
            height: h,
            width: w,
            flip: transform.flip,
        };
        // NaN marks floats never written (and fails the comparisons).
        let mut out = vec![MaybeUninit::new(f32::NAN); h * w * 3];
        let (rg, b) = out.split_at_mut(2 * h * w);
        let (r, g) = rg.split_at_mut(h * w);
        for y in 0..h {
            let row = y * w..(y + 1) * w;
            let out = RowOut {
                red: &mut r[row.clone()],
                green: &mut g[row.clone()],
                blue: &mut b[row],
            };
            row_fn(&rotation, y, out);
        }
        // SAFETY: every element was initialised above.
        out.into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect()
    }

    #[test]
    fn vector_and_portable_rotations_agree_bit_for_bit() {
        let mut cases = vec![
            (7, 9, 0.4, false),
            (13, 6, -2.5, true),
            (5, 5, 3.0, false),
            (1, 3, 0.7, true),
            (2, 2, 1.1, false),
            (224, 224, -1.25, true),
            (31, 17, 7.0, false),
            (17, 31, -9.5, true),
            // Quarter and half turns of oblong images land exactly on reflect boundaries.
            (6, 10, std::f32::consts::FRAC_PI_2, false),
            (10, 6, -std::f32::consts::FRAC_PI_2, true),
            (9, 20, std::f32::consts::PI, false),
            // Narrow images reflect coordinates more than one image length away.
            (40, 3, 1.3, false),
            (3, 40, -1.4, true),
        ];
        // The seed's RandomRotation(0.2) draws angles in ±0.4π; sweep them.
        let mut rng = SplitMix64::for_stream(7, 0, 0);
        for _ in 0..12 {
            let angle = (rng.next_f32() * 2.0 - 1.0) * 0.4 * std::f32::consts::PI;
            cases.push((40, 27, angle, rng.next_f32() < 0.5));
        }
        for (h, w, angle, flip) in cases {
            let transform = SampleTransform { flip, angle };
            let src = pattern(h, w);
            let mut fast = vec![f32::NAN; h * w * 3];
            transform_to_chw(&src, PIXEL_STRIDE, h, w, transform, &mut fast);
            // The same image as RGB (the cache's layout) gives the same pixels.
            let mut rgb: Vec<f32> = src
                .chunks_exact(PIXEL_STRIDE)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect();
            rgb.push(0.0);
            let mut from_rgb = vec![f32::NAN; h * w * 3];
            transform_to_chw(&rgb, 3, h, w, transform, &mut from_rgb);
            let case = format!("{h}x{w} angle {angle} flip {flip}");
            assert_eq!(fast, from_rgb, "RGB source, {case}");
            let slow = rotate_rows(&src, PIXEL_STRIDE, (h, w), transform, &rotate_row);
            assert_eq!(fast, slow, "{case}");
            #[cfg(target_arch = "x86_64")]
            for (stride, source) in [(PIXEL_STRIDE, &src), (3, &rgb)] {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 is available.
                    let avx2_row =
                        |r: &Rotation, y, o: RowOut| unsafe { avx2::rotate_row(r, y, o) };
                    let avx2 = rotate_rows(source, stride, (h, w), transform, &avx2_row);
                    assert_eq!(avx2, slow, "AVX2, stride {stride}, {case}");
                }
            }
        }
    }

    #[test]
    fn reflect_matches_tensorflow() {
        assert_eq!(reflect(-0.5, 4), 0.0);
        assert_eq!(reflect(-1.0, 4), 0.0);
        assert_eq!(reflect(-2.0, 4), 1.0);
        assert_eq!(reflect(4.0, 4), 3.0);
        assert_eq!(reflect(5.0, 4), 2.0);
        assert_eq!(reflect(2.5, 4), 2.5);
        assert_eq!(reflect(3.5, 4), 3.0);
    }
}
