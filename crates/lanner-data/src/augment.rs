//! Training-time augmentation as the seed's Keras model applies it: `RandomFlip("horizontal")`
//! then `RandomRotation(factor)` with reflect fill and bilinear sampling, reproducing
//! TensorFlow's `ImageProjectiveTransformV3` (what Keras' TF backend runs) pixel for pixel.

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
                out[d] = src[s];
                out[plane + d] = src[s + 1];
                out[2 * plane + d] = src[s + 2];
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
        sse2::rotate_row(&rotation, y, out);
        #[cfg(not(target_arch = "x86_64"))]
        rotate_row(&rotation, y, out);
    }
}

/// One output row of the rotation, a pixel at a time: TF's output→input map, reflect fill and
/// `bilinear_interpolation`, term for term (bit-identical to TensorFlow). The portable version
/// of [`sse2::rotate_row`], and its reference in the tests.
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
        (red[x], green[x], blue[x]) = (mix(0), mix(1), mix(2));
    }
}

/// The rotation four output pixels at a time with SSE2 (part of every x86-64 CPU). Every lane
/// performs the same IEEE operations in the same order as [`rotate_row`], so the results are
/// identical; only the instruction count changes (about a quarter).
#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::*;

    use super::{Rotation, RowOut, reflect};
    use crate::resize::PIXEL_STRIDE;

    pub(super) fn rotate_row(rotation: &Rotation, y: usize, out: RowOut) {
        let Rotation {
            src,
            stride: pixel_stride,
            m,
            height,
            width,
            flip,
        } = *rotation;
        // Offsets are computed exactly in f32, which holds integers up to 2^24.
        if height * width * pixel_stride >= 1 << 24 {
            return super::rotate_row(rotation, y, out);
        }
        let RowOut { red, green, blue } = out;
        assert!(src.len() >= height * width * pixel_stride + (PIXEL_STRIDE - pixel_stride));
        let yf = y as f32;
        // SAFETY: SSE2 is always available on x86-64. Loads from `src` use offsets built from
        // coordinates clamped to [0, width - 1] × [0, height - 1] (NaN clamps to 0), so each
        // 4-float load starts at most at `(height × width − 1) × stride` and lies inside the
        // slice, whose length was asserted above.
        unsafe {
            let (max_x, max_y) = (
                _mm_set1_ps(width as f32 - 1.0),
                _mm_set1_ps(height as f32 - 1.0),
            );
            let (zero, one) = (_mm_setzero_ps(), _mm_set1_ps(1.0));
            let (row_x, row_y) = (_mm_set1_ps(m.a1 * yf), _mm_set1_ps(m.b1 * yf));
            let (stride, row_len) = (_mm_set1_ps(pixel_stride as f32), _mm_set1_ps(width as f32));
            let mut x = 0;
            while x < width {
                let xf = _mm_setr_ps(x as f32, (x + 1) as f32, (x + 2) as f32, (x + 3) as f32);
                let mut ix = _mm_add_ps(
                    _mm_add_ps(_mm_mul_ps(_mm_set1_ps(m.a0), xf), row_x),
                    _mm_set1_ps(m.a2),
                );
                let mut iy = _mm_add_ps(
                    _mm_add_ps(_mm_mul_ps(_mm_set1_ps(m.b0), xf), row_y),
                    _mm_set1_ps(m.b2),
                );
                let outside = |v: __m128, max: __m128| {
                    _mm_movemask_ps(_mm_or_ps(_mm_cmplt_ps(v, zero), _mm_cmpgt_ps(v, max)))
                };
                if outside(ix, max_x) | outside(iy, max_y) != 0 {
                    let (mut lx, mut ly) = ([0.0f32; 4], [0.0f32; 4]);
                    _mm_storeu_ps(lx.as_mut_ptr(), ix);
                    _mm_storeu_ps(ly.as_mut_ptr(), iy);
                    let fold = |v: f32, len: usize| {
                        if v < 0.0 || v > (len - 1) as f32 {
                            reflect(v, len)
                        } else {
                            v
                        }
                    };
                    lx = lx.map(|v| fold(v, width));
                    ly = ly.map(|v| fold(v, height));
                    ix = _mm_loadu_ps(lx.as_ptr());
                    iy = _mm_loadu_ps(ly.as_ptr());
                }
                // Clamping changes nothing for reflected values; it maps NaN to 0.
                ix = _mm_min_ps(_mm_max_ps(ix, zero), max_x);
                iy = _mm_min_ps(_mm_max_ps(iy, zero), max_y);
                let x0 = _mm_cvtepi32_ps(_mm_cvttps_epi32(ix));
                let y0 = _mm_cvtepi32_ps(_mm_cvttps_epi32(iy));
                let mut weights = [[0.0f32; 4]; 4];
                _mm_storeu_ps(weights[0].as_mut_ptr(), _mm_sub_ps(_mm_add_ps(x0, one), ix));
                _mm_storeu_ps(weights[1].as_mut_ptr(), _mm_sub_ps(ix, x0));
                _mm_storeu_ps(weights[2].as_mut_ptr(), _mm_sub_ps(_mm_add_ps(y0, one), iy));
                _mm_storeu_ps(weights[3].as_mut_ptr(), _mm_sub_ps(iy, y0));
                let x1 = _mm_min_ps(_mm_add_ps(x0, one), max_x);
                let y1 = _mm_min_ps(_mm_add_ps(y0, one), max_y);
                let (c0, c1) = if flip {
                    (_mm_sub_ps(max_x, x0), _mm_sub_ps(max_x, x1))
                } else {
                    (x0, x1)
                };
                let offset = |row: __m128, col: __m128| {
                    let mut lanes = [0i32; 4];
                    let at = _mm_mul_ps(_mm_add_ps(_mm_mul_ps(row, row_len), col), stride);
                    _mm_storeu_si128(lanes.as_mut_ptr().cast(), _mm_cvttps_epi32(at));
                    lanes
                };
                let taps = [
                    offset(y0, c0),
                    offset(y0, c1),
                    offset(y1, c0),
                    offset(y1, c1),
                ];
                // Every lane is computed (offsets past the row are clamped, so loads stay in
                // bounds); only lanes inside the row are stored.
                let weight = |k: usize, lane: usize| _mm_set1_ps(weights[k][lane]);
                let mixed: [__m128; 4] = std::array::from_fn(|lane| {
                    let load =
                        |tap: usize| _mm_loadu_ps(src.as_ptr().add(taps[tap][lane] as usize));
                    let (wx0, wx1) = (weight(0, lane), weight(1, lane));
                    let top = _mm_add_ps(_mm_mul_ps(wx0, load(0)), _mm_mul_ps(wx1, load(1)));
                    let bottom = _mm_add_ps(_mm_mul_ps(wx0, load(2)), _mm_mul_ps(wx1, load(3)));
                    _mm_add_ps(
                        _mm_mul_ps(top, weight(2, lane)),
                        _mm_mul_ps(bottom, weight(3, lane)),
                    )
                });
                // Four RGBX pixels → the R, G and B of four pixels (a 4×4 transpose).
                let rg01 = _mm_unpacklo_ps(mixed[0], mixed[1]);
                let rg23 = _mm_unpacklo_ps(mixed[2], mixed[3]);
                let bx01 = _mm_unpackhi_ps(mixed[0], mixed[1]);
                let bx23 = _mm_unpackhi_ps(mixed[2], mixed[3]);
                let planes = [
                    _mm_movelh_ps(rg01, rg23),
                    _mm_movehl_ps(rg23, rg01),
                    _mm_movelh_ps(bx01, bx23),
                ];
                for (plane, values) in [&mut *red, &mut *green, &mut *blue].into_iter().zip(planes)
                {
                    match plane.get_mut(x..x + 4) {
                        Some(four) => _mm_storeu_ps(four.as_mut_ptr(), values),
                        None => {
                            let mut lanes = [0.0f32; 4];
                            _mm_storeu_ps(lanes.as_mut_ptr(), values);
                            let tail = &mut plane[x..];
                            let n = tail.len();
                            tail.copy_from_slice(&lanes[..n]);
                        }
                    }
                }
                x += 4;
            }
        }
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
    red: &'a mut [f32],
    green: &'a mut [f32],
    blue: &'a mut [f32],
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

    #[test]
    fn vector_and_portable_rotations_agree_bit_for_bit() {
        for (h, w, angle, flip) in [
            (7, 9, 0.4, false),
            (13, 6, -2.5, true),
            (5, 5, 3.0, false),
            (1, 3, 0.7, true),
        ] {
            let src = pattern(h, w);
            let mut fast = vec![0.0; h * w * 3];
            transform_to_chw(
                &src,
                PIXEL_STRIDE,
                h,
                w,
                SampleTransform { flip, angle },
                &mut fast,
            );
            // The same image as RGB (the cache's layout) gives the same pixels.
            let mut rgb: Vec<f32> = src
                .chunks_exact(PIXEL_STRIDE)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect();
            rgb.push(0.0);
            let mut from_rgb = vec![0.0; h * w * 3];
            transform_to_chw(
                &rgb,
                3,
                h,
                w,
                SampleTransform { flip, angle },
                &mut from_rgb,
            );
            assert_eq!(
                fast, from_rgb,
                "RGB source, {h}x{w} angle {angle} flip {flip}"
            );
            let m = RotationMatrix::new(angle, h, w);
            let rotation = Rotation {
                stride: PIXEL_STRIDE,
                src: &src,
                m,
                height: h,
                width: w,
                flip,
            };
            let mut slow = vec![0.0; h * w * 3];
            let (rg, b) = slow.split_at_mut(2 * h * w);
            let (r, g) = rg.split_at_mut(h * w);
            for y in 0..h {
                let row = y * w..(y + 1) * w;
                let out = RowOut {
                    red: &mut r[row.clone()],
                    green: &mut g[row.clone()],
                    blue: &mut b[row],
                };
                rotate_row(&rotation, y, out);
            }
            assert_eq!(fast, slow, "{h}x{w} angle {angle} flip {flip}");
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
