//! Training-time augmentation as the seed's Keras model applies it: `RandomFlip("horizontal")`
//! then `RandomRotation(factor)` with reflect fill and bilinear sampling, reproducing
//! TensorFlow's `ImageProjectiveTransformV3` (what Keras' TF backend runs) pixel for pixel.

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

/// Applies `transform` to an interleaved RGB image (`src`, HWC) and writes planar
/// channels (CHW) into `out`. With no transform this is a plain layout change.
pub fn transform_to_chw(
    src: &[f32],
    height: usize,
    width: usize,
    transform: SampleTransform,
    out: &mut [f32],
) {
    assert_eq!(src.len(), height * width * 3);
    assert_eq!(out.len(), height * width * 3);
    let plane = height * width;
    let column = |x: usize| if transform.flip { width - 1 - x } else { x };
    if transform.angle == 0.0 {
        for y in 0..height {
            for x in 0..width {
                let s = (y * width + column(x)) * 3;
                let d = y * width + x;
                out[d] = src[s];
                out[plane + d] = src[s + 1];
                out[2 * plane + d] = src[s + 2];
            }
        }
        return;
    }
    let m = RotationMatrix::new(transform.angle, height, width);
    let read = |y: i64, x: i64, c: usize| -> f32 {
        if y >= 0 && (y as usize) < height && x >= 0 && (x as usize) < width {
            src[(y as usize * width + column(x as usize)) * 3 + c]
        } else {
            0.0
        }
    };
    for y in 0..height {
        for x in 0..width {
            let (xf, yf) = (x as f32, y as f32);
            let in_x = reflect(m.a0 * xf + m.a1 * yf + m.a2, width);
            let in_y = reflect(m.b0 * xf + m.b1 * yf + m.b2, height);
            let (x0, y0) = (in_x.floor(), in_y.floor());
            let (x1, y1) = (x0 + 1.0, y0 + 1.0);
            let (xi0, yi0) = (x0 as i64, y0 as i64);
            let (xi1, yi1) = (xi0 + 1, yi0 + 1);
            let d = y * width + x;
            for c in 0..3 {
                let top = (x1 - in_x) * read(yi0, xi0, c) + (in_x - x0) * read(yi0, xi1, c);
                let bottom = (x1 - in_x) * read(yi1, xi0, c) + (in_x - x0) * read(yi1, xi1, c);
                out[c * plane + d] = top * (y1 - in_y) + bottom * (in_y - y0);
            }
        }
    }
}

/// The output→input affine map Keras builds for a rotation about the image centre
/// (`_compute_affine_matrix` with scale 1, no shear, no translation).
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
        (0..h * w * 3).map(|i| (i * 7 % 251) as f32).collect()
    }

    #[test]
    fn no_transform_is_a_layout_change() {
        let src = pattern(3, 4);
        let mut out = vec![0.0; 36];
        transform_to_chw(&src, 3, 4, SampleTransform::default(), &mut out);
        // pixel (y=1, x=2), channel 1
        assert_eq!(out[12 + 4 + 2], src[(4 + 2) * 3 + 1]);
    }

    #[test]
    fn flip_mirrors_columns() {
        let src = pattern(2, 5);
        let mut out = vec![0.0; 30];
        transform_to_chw(
            &src,
            2,
            5,
            SampleTransform {
                flip: true,
                angle: 0.0,
            },
            &mut out,
        );
        for x in 0..5 {
            assert_eq!(out[5 + x], src[(5 + 4 - x) * 3]);
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
        transform_to_chw(&src, n, n, SampleTransform { flip: false, angle }, &mut out);
        for y in 0..n {
            for x in 0..n {
                let expected = src[(x * n + (n - 1 - y)) * 3];
                assert!((out[y * n + x] - expected).abs() < 1e-3, "({x},{y})");
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
