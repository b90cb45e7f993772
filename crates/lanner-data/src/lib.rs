//! `lanner-data`: images from a folder-per-class dataset into training batches, fast and
//! exactly as Keras' `image_dataset_from_directory` and the seed's augmentation layers do.
//!
//! - [`folder`]: indexing (sorted class folders give the labels) and Keras' seeded
//!   `validation_split`, reproduced with NumPy's own shuffle ([`numpy_rng`]).
//! - [`decode`]: JPEG/PNG/BMP/GIF to 8-bit RGB, with a decompression-bomb guard.
//! - [`resize`]: TensorFlow's bilinear resize (half-pixel centres, no antialias).
//! - [`augment`]: random horizontal flip and Keras' `RandomRotation` (reflect, bilinear).
//! - [`loader`]: worker threads that build `[B, 3, H, W]` batches ahead of the training step,
//!   with bounded memory and an optional cache of resized images.
//! - [`memory`]: whether the loader caches its resized images: by default when they are small
//!   next to the memory the process has (containers included), up to half of it when asked.
//! - [`summary`]: what `lanner data PATH` reports.
//! - [`synthetic`]: a generated two-class shapes dataset for demos, tests and benchmarks.

pub mod augment;
pub mod decode;
pub mod error;
pub mod folder;
pub mod loader;
pub mod memory;
pub mod numpy_rng;
pub mod resize;
pub mod rng;
pub mod summary;
pub mod synthetic;

pub use augment::{Augmentation, SampleTransform};
pub use error::DataError;
pub use folder::{ImageFolder, Sample, Subset, ValidationSplit};
pub use loader::{Batch, Loader, LoaderConfig, SkippedFile};
pub use summary::{DatasetSummary, summarize};
