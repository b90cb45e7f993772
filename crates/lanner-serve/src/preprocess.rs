//! An image as the model takes it, exactly as training and evaluation prepare it: decoded to
//! RGB, resized bilinearly (Keras' default, aspect ratio not kept) to the model's size, kept as
//! `f32` 0..=255 in planar `[3, H, W]` order; the model normalises it itself.

use std::path::Path;

use image::ImageFormat;
use lanner_data::DataError;
use lanner_data::augment::{SampleTransform, transform_to_chw};
use lanner_data::decode::decode_bytes;
use lanner_data::resize::{PIXEL_STRIDE, resize_bilinear};

/// Why an image cannot be used, in words for the person who sent it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ImageError {
    /// No bytes.
    #[error("the image is empty (0 bytes)")]
    Empty,
    /// Not one of the four formats.
    #[error("the content is not a JPEG, PNG, BMP or GIF image")]
    NotAnImage,
    /// A known format that does not decode.
    #[error("the {format} image is corrupt and cannot be decoded ({reason})")]
    Corrupt {
        /// `JPEG`, `PNG`, …
        format: &'static str,
        /// The decoder's words.
        reason: String,
    },
    /// Over the pixel limit.
    #[error("the image is {width}x{height} pixels, over the limit of {limit} pixels")]
    TooLarge {
        /// Width in the header.
        width: u32,
        /// Height in the header.
        height: u32,
        /// The limit.
        limit: u64,
    },
    /// An array of pixels with the wrong shape or values.
    #[error("{0}")]
    BadPixels(String),
}

/// Decodes `bytes` (any of JPEG, PNG, BMP, GIF) and returns the `[3, size, size]` pixels.
pub fn image_bytes_to_pixels(
    bytes: &[u8],
    size: usize,
    max_pixels: u64,
) -> Result<Vec<f32>, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => "JPEG",
        Ok(ImageFormat::Png) => "PNG",
        Ok(ImageFormat::Bmp) => "BMP",
        Ok(ImageFormat::Gif) => "GIF",
        _ => return Err(ImageError::NotAnImage),
    };
    let decoded = decode_bytes(Path::new("image"), bytes, max_pixels).map_err(|e| match e {
        DataError::TooLarge {
            width,
            height,
            limit,
            ..
        } => ImageError::TooLarge {
            width,
            height,
            limit,
        },
        DataError::BadImage { reason, .. } => ImageError::Corrupt {
            format,
            reason: reason.trim().to_string(),
        },
        other => ImageError::Corrupt {
            format,
            reason: other.to_string(),
        },
    })?;
    let mut rgbx = vec![0.0f32; size * size * PIXEL_STRIDE];
    resize_bilinear(&decoded.image, size, size, &mut rgbx);
    let mut chw = vec![0.0f32; 3 * size * size];
    transform_to_chw(
        &rgbx,
        PIXEL_STRIDE,
        size,
        size,
        SampleTransform::default(),
        &mut chw,
    );
    Ok(chw)
}

/// Planar `[3, H, W]` pixels from interleaved `[H][W][3]` ones (what a NumPy image batch in a
/// TF Serving request holds).
pub fn hwc_to_chw(hwc: &[f32], height: usize, width: usize) -> Vec<f32> {
    let plane = height * width;
    let mut chw = vec![0.0f32; 3 * plane];
    for (i, pixel) in hwc.chunks_exact(3).enumerate() {
        chw[i] = pixel[0];
        chw[plane + i] = pixel[1];
        chw[2 * plane + i] = pixel[2];
    }
    chw
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 10) as u8, (y * 10) as u8, 200])
        });
        let mut bytes = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        bytes
    }

    #[test]
    fn same_size_keeps_pixels_in_planar_order() {
        // Any shape is resized to the model's square, without keeping the aspect ratio.
        assert_eq!(
            image_bytes_to_pixels(&png(4, 3), 4, 1_000).unwrap().len(),
            3 * 16
        );
        let pixels = image_bytes_to_pixels(&png(4, 4), 4, 1_000).unwrap();
        assert_eq!(pixels.len(), 3 * 16);
        // Red plane, pixel (x=2, y=1); green plane; blue plane.
        assert_eq!(pixels[4 + 2], 20.0);
        assert_eq!(pixels[16 + 4 + 2], 10.0);
        assert_eq!(pixels[32 + 4 + 2], 200.0);
    }

    #[test]
    fn bad_bytes_say_what_is_wrong() {
        assert_eq!(image_bytes_to_pixels(b"", 4, 1_000), Err(ImageError::Empty));
        assert_eq!(
            image_bytes_to_pixels(b"hello, world", 4, 1_000),
            Err(ImageError::NotAnImage)
        );
        let mut cut = png(8, 8);
        cut.truncate(40);
        let error = image_bytes_to_pixels(&cut, 4, 1_000).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the PNG image is corrupt and cannot be decoded"),
            "{error}"
        );
        assert_eq!(
            image_bytes_to_pixels(&png(40, 30), 4, 1_000),
            Err(ImageError::TooLarge {
                width: 40,
                height: 30,
                limit: 1_000
            })
        );
    }

    #[test]
    fn interleaved_to_planar() {
        let hwc = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(hwc_to_chw(&hwc, 1, 2), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
