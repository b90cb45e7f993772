//! A small learnable image-classification dataset drawn from scratch: smooth colour gradients
//! with a circle or a square on them. The README's first command, the tests and the
//! benchmarks use it, so nothing has to be downloaded.

use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};

use crate::rng::SplitMix64;

/// What to generate.
#[derive(Debug, Clone)]
pub struct ShapesSpec {
    /// Images per class.
    pub per_class: usize,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub format: ImageFormat,
}

/// The class folders, in label order.
pub const SHAPE_CLASSES: [&str; 2] = ["circle", "square"];

/// Draws one image of `class` (0: circle, 1: square).
pub fn draw_shape(class: usize, width: u32, height: u32, rng: &mut SplitMix64) -> RgbImage {
    let mut colour = || {
        [
            rng.next_f32() * 255.0,
            rng.next_f32() * 255.0,
            rng.next_f32() * 255.0,
        ]
    };
    let (from, to, fill) = (colour(), colour(), colour());
    let short = width.min(height) as f32;
    let radius = short * (0.15 + 0.2 * rng.next_f32());
    let cx = radius + rng.next_f32() * (width as f32 - 2.0 * radius);
    let cy = radius + rng.next_f32() * (height as f32 - 2.0 * radius);
    RgbImage::from_fn(width, height, |x, y| {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let inside = match class {
            0 => dx * dx + dy * dy <= radius * radius,
            _ => dx.abs() <= radius * 0.9 && dy.abs() <= radius * 0.9,
        };
        if inside {
            return Rgb(fill.map(|c| c as u8));
        }
        let t = (x + y) as f32 / (width + height) as f32;
        Rgb([0, 1, 2].map(|c| (from[c] + (to[c] - from[c]) * t) as u8))
    })
}

/// Writes `root/circle/*.ext` and `root/square/*.ext`.
pub fn write_shapes(root: &Path, spec: &ShapesSpec) -> std::io::Result<()> {
    let extension = spec.format.extensions_str()[0];
    for (class, name) in SHAPE_CLASSES.iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        for i in 0..spec.per_class {
            let mut rng = SplitMix64::for_stream(spec.seed, class as u64, i as u64);
            let image = draw_shape(class, spec.width, spec.height, &mut rng);
            let path = dir.join(format!("{name}_{i:05}.{extension}"));
            image
                .save_with_format(&path, spec.format)
                .map_err(std::io::Error::other)?;
        }
    }
    Ok(())
}
