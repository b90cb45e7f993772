//! Errors a user can cause with their data, each one sentence that names the thing and the fix.

use std::path::PathBuf;

/// Something about a data folder or an image that stops Lanner from using it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "data folder '{0}' does not exist; pass the folder that holds one sub-folder per class"
    )]
    MissingFolder(PathBuf),
    #[error("'{0}' is a file, not a folder; pass the folder that holds one sub-folder per class")]
    NotAFolder(PathBuf),
    #[error("cannot read '{path}': {reason}; check that it exists and that you may read it")]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "'{0}' has no class folders; put the images of each class in a sub-folder named after the class (e.g. '{0}/cat/1.jpg', '{0}/dog/2.jpg')"
    )]
    NoClasses(PathBuf),
    #[error(
        "class folder '{0}' holds no images (.jpg, .jpeg, .png, .bmp, .gif); add images to it or remove the folder"
    )]
    EmptyClass(PathBuf),
    #[error(
        "'{path}' has only one class ('{class}'); a classifier needs at least two class folders"
    )]
    SingleClass { path: PathBuf, class: String },
    #[error(
        "cannot decode '{path}': {reason}; replace or remove the file (or drop --strict to skip it)"
    )]
    BadImage { path: PathBuf, reason: String },
    #[error(
        "'{path}' claims {width}x{height} pixels, over the limit of {limit} pixels; remove it or raise --max-image-pixels if it is genuine"
    )]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        limit: u64,
    },
    #[error(
        "no training image of class '{class}' can be decoded ({skipped} skipped, listed above); replace them, or remove the class folder to train without it"
    )]
    NoUsableImages { class: String, skipped: usize },
    #[error("{0}")]
    InvalidOption(String),
    #[error(
        "the data loader stopped before the end of the epoch (a worker thread panicked); this is a bug in Lanner, please report it with the output above"
    )]
    LoaderStopped,
}

impl DataError {
    /// True for a file that cannot be decoded, which training skips unless `--strict`. An image
    /// over the pixel limit is not one of them: a decompression bomb stops the job.
    pub fn is_skippable(&self) -> bool {
        matches!(
            self,
            DataError::BadImage { .. } | DataError::Unreadable { .. }
        )
    }

    /// Why a file could not be used, without its path or the advice around it, for a list that
    /// already names the file ("train/cat/3.jpg: the file is empty").
    pub fn reason(&self) -> String {
        match self {
            DataError::BadImage { reason, .. } | DataError::Unreadable { reason, .. } => {
                reason.clone()
            }
            other => other.to_string(),
        }
    }
}
