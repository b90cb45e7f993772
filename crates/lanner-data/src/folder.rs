//! A folder-per-class image dataset indexed exactly as Keras'
//! `image_dataset_from_directory` indexes it: sorted class folders give the label index, files
//! are walked in sorted order, and a seeded `validation_split` selects the same files.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::DataError;
use crate::numpy_rng::RandomState;

/// File extensions Keras accepts (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["bmp", "gif", "jpeg", "jpg", "png"];

/// One image of the dataset and its label (the index of its class in `class_names`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

/// Which part of a split dataset to keep (Keras' `subset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subset {
    Training,
    Validation,
}

/// Keras' `validation_split` + `subset` + `seed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValidationSplit {
    pub fraction: f64,
    pub subset: Subset,
    pub seed: u32,
}

/// The files of a dataset and their classes.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub class_names: Vec<String>,
    pub samples: Vec<Sample>,
}

impl ImageFolder {
    /// Indexes `root`: every non-hidden sub-folder is a class; every image file below it (at any
    /// depth, hidden files and folders excepted) is a sample. Files directly in `root` are ignored.
    pub fn open(root: &Path) -> Result<Self, DataError> {
        if !root.exists() {
            return Err(DataError::MissingFolder(root.to_path_buf()));
        }
        if !root.is_dir() {
            return Err(DataError::NotAFolder(root.to_path_buf()));
        }
        let mut class_names = Vec::new();
        for entry in read_dir_sorted(root)? {
            if entry.is_dir() && !is_hidden(&entry) {
                class_names.push(file_name(&entry));
            }
        }
        if class_names.is_empty() {
            return Err(DataError::NoClasses(root.to_path_buf()));
        }
        let mut samples = Vec::new();
        for (label, class) in class_names.iter().enumerate() {
            let class_dir = root.join(class);
            let before = samples.len();
            for path in image_files(&class_dir)? {
                samples.push(Sample { path, label });
            }
            if samples.len() == before {
                return Err(DataError::EmptyClass(class_dir));
            }
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            class_names,
            samples,
        })
    }

    /// Keras' global shuffle of the file list with `np.random.RandomState(seed)`, then the
    /// training subset (all but the last `int(fraction * n)` files) or the validation subset
    /// (those last files). The same seed gives disjoint subsets that cover the dataset.
    pub fn split(mut self, split: ValidationSplit) -> Result<Self, DataError> {
        if !(split.fraction > 0.0 && split.fraction < 1.0) {
            return Err(DataError::InvalidOption(format!(
                "--validation-split must be between 0 and 1 (exclusive), got {}; use e.g. 0.2 to hold out 20% of the images",
                split.fraction
            )));
        }
        let n = self.samples.len();
        let num_validation = (split.fraction * n as f64) as usize;
        if num_validation == 0 || num_validation == n {
            return Err(DataError::InvalidOption(format!(
                "--validation-split {} of {} images leaves one subset empty; choose a fraction that keeps images on both sides",
                split.fraction, n
            )));
        }
        RandomState::new(split.seed).shuffle(&mut self.samples);
        self.samples = match split.subset {
            Subset::Training => self.samples[..n - num_validation].to_vec(),
            Subset::Validation => self.samples[n - num_validation..].to_vec(),
        };
        Ok(self)
    }

    /// Number of images per class, in class order.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for sample in &self.samples {
            counts[sample.label] += 1;
        }
        counts
    }

    /// Fails unless the dataset has at least two classes (a classifier needs them).
    pub fn require_two_classes(&self) -> Result<(), DataError> {
        if self.class_names.len() < 2 {
            return Err(DataError::SingleClass {
                path: self.root.clone(),
                class: self.class_names[0].clone(),
            });
        }
        Ok(())
    }
}

/// Image files under `dir`, walked as Keras does: folders in sorted path order, files sorted
/// by name within each folder.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut folders = vec![dir.to_path_buf()];
    let mut index = 0;
    while index < folders.len() {
        let folder = folders[index].clone();
        for entry in read_dir_sorted(&folder)? {
            if entry.is_dir() && !is_hidden(&entry) {
                folders.push(entry);
            }
        }
        index += 1;
    }
    // Keras sorts the walk by the folder path as a string ("a b" before "a/x").
    folders.sort_by_key(|folder| folder.to_string_lossy().into_owned());
    let mut files = Vec::new();
    for folder in folders {
        for entry in read_dir_sorted(&folder)? {
            if entry.is_file() && !is_hidden(&entry) && has_image_extension(&entry) {
                files.push(entry);
            }
        }
    }
    Ok(files)
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let unreadable = |e: std::io::Error| DataError::Unreadable {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(unreadable)? {
        entries.push(entry.map_err(unreadable)?.path());
    }
    entries.sort();
    Ok(entries)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn is_hidden(path: &Path) -> bool {
    file_name(path).starts_with('.')
}

/// True when the file name ends with one of Keras' image extensions.
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .map(|ext| ext.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|ext| IMAGE_EXTENSIONS.contains(&ext.as_str()))
}
