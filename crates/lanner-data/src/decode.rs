//! Reading an image file into 8-bit RGB, as `tf.io.decode_image(channels=3,
//! expand_animations=False)` does: the format is sniffed from the bytes (not the extension),
//! grey is replicated, alpha dropped, palettes expanded, 16-bit scaled to 8-bit, GIFs give their
//! first frame. The header is checked against a pixel limit before any pixel is decoded.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::error::DataError;

/// Default limit on width × height read from an image header (a decompression-bomb guard):
/// 178 million pixels, Pillow's `MAX_IMAGE_PIXELS` × 2, where Pillow refuses outright.
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// A decoded image and the container format it came in.
pub struct Decoded {
    pub image: RgbImage,
    pub format: ImageFormat,
}

/// The short lower-case name of a format we decode (`jpeg`, `png`, `bmp`, `gif`).
pub fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::Png => "png",
        ImageFormat::Bmp => "bmp",
        ImageFormat::Gif => "gif",
        _ => "other",
    }
}

/// What a header says, without decoding pixels.
pub struct Header {
    pub width: u32,
    pub height: u32,
    pub format: ImageFormat,
}

/// Reads the header only: format and dimensions.
pub fn read_header(path: &Path, max_pixels: u64) -> Result<Header, DataError> {
    let bytes = read_file(path)?;
    let (decoder, format) = open_decoder(path, &bytes, max_pixels)?;
    let (width, height) = decoder.dimensions();
    Ok(Header {
        width,
        height,
        format,
    })
}

/// Decodes a whole image file to RGB8.
pub fn decode_file(path: &Path, max_pixels: u64) -> Result<Decoded, DataError> {
    let bytes = read_file(path)?;
    decode_bytes(path, &bytes, max_pixels)
}

/// Decodes an in-memory image (`path` only names it in errors).
pub fn decode_bytes(path: &Path, bytes: &[u8], max_pixels: u64) -> Result<Decoded, DataError> {
    let (decoder, format) = open_decoder(path, bytes, max_pixels)?;
    let image = DynamicImage::from_decoder(decoder).map_err(|e| bad(path, e))?;
    Ok(Decoded {
        image: into_rgb8(image),
        format,
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if bytes.is_empty() {
        return Err(DataError::BadImage {
            path: path.to_path_buf(),
            reason: "the file is empty".into(),
        });
    }
    Ok(bytes)
}

fn open_decoder<'a>(
    path: &Path,
    bytes: &'a [u8],
    max_pixels: u64,
) -> Result<(Box<dyn ImageDecoder + 'a>, ImageFormat), DataError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(path, e.into()))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Bmp | ImageFormat::Gif)) => f,
        _ => {
            return Err(DataError::BadImage {
                path: path.to_path_buf(),
                reason: "the content is not a JPEG, PNG, BMP or GIF image".into(),
            });
        }
    };
    let mut reader = reader;
    reader.no_limits(); // our own pixel limit below says which file and what to do
    let decoder = reader.into_decoder().map_err(|e| bad(path, e))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DataError::BadImage {
            path: path.to_path_buf(),
            reason: "the image has no pixels".into(),
        });
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            limit: max_pixels,
        });
    }
    Ok((Box::new(decoder), format))
}

fn bad(path: &Path, error: image::ImageError) -> DataError {
    DataError::BadImage {
        path: path.to_path_buf(),
        // Some decoder messages end in a line break, which would split the sentence around it.
        reason: error.to_string().trim_end().to_string(),
    }
}

/// Converts any colour type to 8-bit RGB without copying when it already is.
fn into_rgb8(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.into_rgb8(),
    }
}
