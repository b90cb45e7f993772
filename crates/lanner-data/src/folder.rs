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
    /// Files in the class folders that are not read because their extension is not one of
    /// [`IMAGE_EXTENSIONS`] (a `.webp` or `.tiff` image, notes, metadata), hidden files aside.
    pub ignored: Vec<PathBuf>,
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
        let mut ignored = Vec::new();
        for (label, class) in class_names.iter().enumerate() {
            let class_dir = root.join(class);
            let (images, others) = walk(&class_dir)?;
            if images.is_empty() {
                return Err(DataError::EmptyClass(class_dir));
            }
            samples.extend(images.into_iter().map(|path| Sample { path, label }));
            ignored.extend(others);
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            class_names,
            samples,
            ignored,
        })
    }

    /// One line on the files [`ImageFolder::ignored`] holds (see [`ignored_files_message`]),
    /// or `None` when every file is read.
    pub fn ignored_message(&self) -> Option<String> {
        ignored_files_message(&format!("'{}'", self.root.display()), &self.ignored)
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

/// One line on `files` found in `place` and not read, counted by extension ("Ignored 5 files
/// in 'data' that are not .jpg, .jpeg, .png, .bmp or .gif images (txt 2, webp 3); …"), or `None`
/// when there are none.
pub fn ignored_files_message(place: &str, files: &[PathBuf]) -> Option<String> {
    if files.is_empty() {
        return None;
    }
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for path in files {
        let extension = path
            .extension()
            .map(|ext| ext.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_else(|| "no extension".into());
        *counts.entry(extension).or_default() += 1;
    }
    let counts: Vec<String> = counts
        .iter()
        .map(|(extension, n)| format!("{extension} {n}"))
        .collect();
    let (files, are_not, images, them) = match files.len() {
        1 => ("1 file".to_string(), "is not a", "image", "it"),
        n => (format!("{n} files"), "are not", "images", "them"),
    };
    Some(format!(
        "Ignored {files} in {place} that {are_not} .jpg, .jpeg, .png, .bmp or .gif {images} ({}); \
         convert {them} to read {them}",
        counts.join(", ")
    ))
}

/// The image files under `dir`, walked as Keras does (folders in sorted path order, files
/// sorted by name within each folder), and the other files, which are not read; hidden files
/// and folders are neither.
pub fn walk(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), DataError> {
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
    let (mut images, mut others) = (Vec::new(), Vec::new());
    for folder in folders {
        for entry in read_dir_sorted(&folder)? {
            if !entry.is_file() || is_hidden(&entry) {
                continue;
            }
            match has_image_extension(&entry) {
                true => images.push(entry),
                false => others.push(entry),
            }
        }
    }
    Ok((images, others))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_without_an_image_extension_are_ignored_and_counted_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        for (path, bytes) in [
            ("cat/1.jpg", &b"x"[..]),
            ("cat/2.webp", b"x"),
            ("cat/deep/3.WEBP", b"x"),
            ("cat/.DS_Store", b"x"),
            ("dog/1.PNG", b"x"),
            ("dog/notes", b"x"),
        ] {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
        }
        let folder = ImageFolder::open(dir.path()).unwrap();
        assert_eq!(folder.samples.len(), 2);
        let names: Vec<String> = folder.ignored.iter().map(|p| file_name(p)).collect();
        assert_eq!(names, ["2.webp", "3.WEBP", "notes"]);
        let message = folder.ignored_message().unwrap();
        assert!(
            message.starts_with("Ignored 3 files in '")
                && message.contains("are not .jpg, .jpeg, .png, .bmp or .gif images")
                && message.contains("(no extension 1, webp 2)"),
            "{message}"
        );

        fs::remove_file(dir.path().join("dog/notes")).unwrap();
        fs::remove_dir_all(dir.path().join("cat/deep")).unwrap();
        let one = ImageFolder::open(dir.path()).unwrap().ignored_message();
        assert!(one.unwrap().contains("Ignored 1 file in"));
        fs::remove_file(dir.path().join("cat/2.webp")).unwrap();
        assert_eq!(
            ImageFolder::open(dir.path()).unwrap().ignored_message(),
            None
        );
    }
}
