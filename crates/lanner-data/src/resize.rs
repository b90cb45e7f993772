//! Bilinear resizing exactly as `tf.image.resize(method="bilinear", antialias=False)` (the
//! Keras default): half-pixel centres, no aspect-ratio preservation, computed in `f32`.

use image::RgbImage;

/// Floats per pixel in a resized image: red, green, blue and an always-zero fourth lane, so
/// that every pixel is one 4-lane vector for the augmentation kernels.
pub const PIXEL_STRIDE: usize = 4;

/// Where one output coordinate reads from: two source indices and the weight of the second.
#[derive(Clone, Copy)]
struct Tap {
    lower: usize,
    upper: usize,
    lerp: f32,
}

/// TF's `compute_interpolation_weights` with half-pixel centres.
fn taps(in_size: usize, out_size: usize) -> Vec<Tap> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|i| {
            let source = (i as f32 + 0.5) * scale - 0.5;
            let floor = source.floor();
            Tap {
                lower: (floor.max(0.0)) as usize,
                upper: (source.ceil() as i64).clamp(0, in_size as i64 - 1) as usize,
                lerp: source - floor,
            }
        })
        .collect()
}

/// Resizes an RGB8 image to `height × width`, writing interleaved RGBX `f32` (HWC with
/// [`PIXEL_STRIDE`] floats per pixel, the fourth one 0) into `out`.
pub fn resize_bilinear(image: &RgbImage, height: usize, width: usize, out: &mut [f32]) {
    assert_eq!(
        out.len(),
        height * width * PIXEL_STRIDE,
        "output buffer has the wrong size"
    );
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let src = image.as_raw();
    let x_taps = taps(in_w, width);
    let y_taps = taps(in_h, height);

    // TF computes top = tl + (tr - tl) * x_lerp per source row, then mixes two such rows, so
    // interpolating each needed source row once horizontally gives bit-identical results.
    let mut row_cache: [(usize, Vec<f32>); 2] = [
        (usize::MAX, vec![0.0; width * PIXEL_STRIDE]),
        (usize::MAX, vec![0.0; width * PIXEL_STRIDE]),
    ];
    let horizontal = |row: usize, dst: &mut [f32]| {
        horizontal_pass(&src[row * in_w * 3..(row + 1) * in_w * 3], &x_taps, dst);
    };
    for (y, tap) in y_taps.iter().enumerate() {
        for (needed, other) in [(tap.lower, tap.upper), (tap.upper, tap.lower)] {
            if row_cache.iter().any(|(row, _)| *row == needed) {
                continue;
            }
            let slot = if row_cache[0].0 == other { 1 } else { 0 };
            horizontal(needed, &mut row_cache[slot].1);
            row_cache[slot].0 = needed;
        }
        let find = |row: usize| {
            if row_cache[0].0 == row {
                &row_cache[0].1
            } else {
                &row_cache[1].1
            }
        };
        let (top, bottom) = (find(tap.lower), find(tap.upper));
        let dst = &mut out[y * width * PIXEL_STRIDE..(y + 1) * width * PIXEL_STRIDE];
        for ((d, &t), &b) in dst.iter_mut().zip(top).zip(bottom) {
            *d = t + (b - t) * tap.lerp;
        }
    }
}

/// `left + (right - left) * lerp` for every output pixel of one source row (RGB8 in, RGBX f32
/// out). On x86-64 each pixel is one SSE vector; the arithmetic is the same per lane.
fn horizontal_pass(line: &[u8], taps: &[Tap], dst: &mut [f32]) {
    for (px, tap) in dst.chunks_exact_mut(PIXEL_STRIDE).zip(taps) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            let px: &mut [f32; 4] = px.try_into().expect("RGBX pixels are 4 floats");
            // SAFETY: SSE2 is part of x86-64, and `px` is exactly the 4 floats stored.
            unsafe {
                let (left, right) = (rgbx_vector(line, tap.lower), rgbx_vector(line, tap.upper));
                let step = _mm_mul_ps(_mm_sub_ps(right, left), _mm_set1_ps(tap.lerp));
                _mm_storeu_ps(px.as_mut_ptr(), _mm_add_ps(left, step));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let pixel = |x: usize| {
                let p = &line[x * 3..x * 3 + 3];
                [f32::from(p[0]), f32::from(p[1]), f32::from(p[2]), 0.0]
            };
            let (left, right) = (pixel(tap.lower), pixel(tap.upper));
            for c in 0..PIXEL_STRIDE {
                px[c] = left[c] + (right[c] - left[c]) * tap.lerp;
            }
        }
    }
}

/// Pixel `x` of an RGB8 row as `[r, g, b, 0]` floats in one SSE register.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rgbx_vector(line: &[u8], x: usize) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    let p = &line[x * 3..x * 3 + 3];
    let word = u32::from_le_bytes([p[0], p[1], p[2], 0]);
    // SAFETY: SSE2 is part of x86-64; these are register-only operations.
    unsafe {
        let zero = _mm_setzero_si128();
        let bytes = _mm_cvtsi32_si128(word as i32);
        _mm_cvtepi32_ps(_mm_unpacklo_epi16(_mm_unpacklo_epi8(bytes, zero), zero))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_keeps_pixels() {
        let image = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let mut out = vec![0.0; 4 * 5 * PIXEL_STRIDE];
        resize_bilinear(&image, 4, 5, &mut out);
        let at = (2 * 5 + 3) * PIXEL_STRIDE;
        assert_eq!(&out[at..at + 4], &[30.0, 40.0, 7.0, 0.0]);
    }

    #[test]
    fn downscale_by_two_averages_neighbours() {
        // With half-pixel centres, output pixel i samples source 2i + 0.5: the mean of a pair.
        let image = RgbImage::from_fn(4, 1, |x, _| image::Rgb([x as u8 * 10, 0, 0]));
        let mut out = vec![0.0; 2 * PIXEL_STRIDE];
        resize_bilinear(&image, 1, 2, &mut out);
        assert_eq!(out[0], 5.0);
        assert_eq!(out[PIXEL_STRIDE], 25.0);
    }

    #[test]
    fn upscale_clamps_at_edges() {
        let image = RgbImage::from_fn(2, 1, |x, _| image::Rgb([x as u8 * 100, 0, 0]));
        let mut out = vec![0.0; 4 * PIXEL_STRIDE];
        resize_bilinear(&image, 1, 4, &mut out);
        let reds: Vec<f32> = out.chunks(PIXEL_STRIDE).map(|p| p[0]).collect();
        assert_eq!(reds, vec![0.0, 25.0, 75.0, 100.0]);
    }
}
