//! Predicting image files, as `lanner predict` does: the files and folders named on the
//! command line become a list of images (folders walked recursively in Keras' sorted order,
//! hidden entries skipped), which are decoded on worker threads and predicted in batches.

use std::path::{Path, PathBuf};

use lanner_data::folder::walk;

use crate::predictor::Predictor;
use crate::preprocess::{ImageError, image_bytes_to_pixels};

/// A file or folder on the command line that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Nothing there.
    #[error("'{0}' does not exist; pass image files or folders of images")]
    Missing(PathBuf),
    /// A folder that cannot be listed.
    #[error("{0}")]
    Unreadable(String),
    /// No image anywhere.
    #[error(
        "no images (.jpg, .jpeg, .png, .bmp, .gif) in {0}; pass image files or folders that hold them"
    )]
    NoImages(String),
}

/// What the command line names: the images to predict, and the files in its folders that are
/// not read (their extension is not an image's).
#[derive(Debug, Default)]
pub struct Inputs {
    /// Files as given, then each folder's image files.
    pub images: Vec<PathBuf>,
    /// Files inside the folders that are not images by their extension.
    pub ignored: Vec<PathBuf>,
}

/// The images named by `inputs`: files as given (whatever their extension: the format is read
/// from the bytes), folders expanded to the image files below them, sorted.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Inputs, InputError> {
    let mut found = Inputs::default();
    for input in inputs {
        if input.is_dir() {
            let (images, others) =
                walk(input).map_err(|e| InputError::Unreadable(e.to_string()))?;
            found.images.extend(images);
            found.ignored.extend(others);
        } else if input.exists() {
            found.images.push(input.clone());
        } else {
            return Err(InputError::Missing(input.clone()));
        }
    }
    if found.images.is_empty() {
        let names: Vec<String> = inputs
            .iter()
            .map(|p| format!("'{}'", p.display()))
            .collect();
        return Err(InputError::NoImages(names.join(", ")));
    }
    // A file named on the command line is read, whatever its extension.
    let named: std::collections::HashSet<&PathBuf> = inputs.iter().collect();
    found.ignored.retain(|path| !named.contains(path));
    Ok(found)
}

/// Why one file got no prediction.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It cannot be read.
    #[error("cannot read '{path}': {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Its bytes are not a usable image.
    #[error("cannot use '{path}': {error}")]
    Image {
        /// The file.
        path: PathBuf,
        /// Why.
        error: ImageError,
    },
}

/// Predicts `paths` in batches of `batch_size`, decoding each batch on `workers` threads, and
/// calls `on_result` once per file, in order, with its prediction or why there is none.
pub fn predict_files(
    predictor: &Predictor,
    paths: &[PathBuf],
    batch_size: usize,
    workers: usize,
    max_pixels: u64,
    mut on_result: impl FnMut(&Path, Result<&[f32], FileError>),
) {
    let size = predictor.info.image_size;
    for chunk in paths.chunks(batch_size.max(1)) {
        let decoded = decode_in_parallel(chunk, size, max_pixels, workers.max(1));
        let mut pixels = Vec::with_capacity(chunk.len() * predictor.info.pixels_per_image());
        let mut count = 0;
        for image in decoded.iter().flatten() {
            pixels.extend_from_slice(image);
            count += 1;
        }
        let rows = if count > 0 {
            predictor.predict(pixels, count)
        } else {
            Vec::new()
        };
        let mut rows = rows.iter();
        for (path, image) in chunk.iter().zip(decoded) {
            match image {
                Ok(_) => on_result(path, Ok(rows.next().expect("one row per image"))),
                Err(error) => on_result(path, Err(error)),
            }
        }
    }
}

fn decode_in_parallel(
    paths: &[PathBuf],
    size: usize,
    max_pixels: u64,
    workers: usize,
) -> Vec<Result<Vec<f32>, FileError>> {
    let per_worker = paths.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = paths
            .chunks(per_worker)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|path| decode_one(path, size, max_pixels))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("an image decoding thread panicked"))
            .collect()
    })
}

fn decode_one(path: &Path, size: usize, max_pixels: u64) -> Result<Vec<f32>, FileError> {
    let bytes = std::fs::read(path).map_err(|e| FileError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    image_bytes_to_pixels(&bytes, size, max_pixels).map_err(|error| FileError::Image {
        path: path.to_path_buf(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_walked_sorted_and_files_kept_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in [
            "b/2.png",
            "b/1.JPG",
            "a/x/3.gif",
            "b/notes.txt",
            "b/.hidden.png",
        ] {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"").unwrap();
        }
        let extra = root.join("b/notes.txt");
        let found = collect_images(&[root.to_path_buf(), extra.clone()]).unwrap();
        assert!(found.ignored.is_empty(), "named on the command line");
        let names: Vec<String> = found
            .images
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            vec!["a/x/3.gif", "b/1.JPG", "b/2.png", "b/notes.txt"]
        );
        let error = collect_images(&[root.join("missing.png")]).unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("missing.png' does not exist; pass image files or folders of images")
        );
        let ignored = collect_images(&[root.join("b")]).unwrap().ignored;
        assert_eq!(ignored, [root.join("b/notes.txt")]);
        let empty = root.join("empty");
        std::fs::create_dir(&empty).unwrap();
        let error = collect_images(&[empty]).unwrap_err();
        assert!(error.to_string().starts_with("no images (.jpg"), "{error}");
    }
}
