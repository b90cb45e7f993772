//! What a user wants to know about a data folder before training on it: classes, counts,
//! formats, image sizes, and every file that cannot be decoded (with the reason).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

use crate::decode::{decode_file, format_name};
use crate::error::DataError;
use crate::folder::ImageFolder;
use crate::loader::SkippedFile;

/// Minimum, median and maximum of one measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Spread {
    pub min: u32,
    pub median: u32,
    pub max: u32,
}

impl Spread {
    fn of(mut values: Vec<u32>) -> Option<Self> {
        values.sort_unstable();
        Some(Spread {
            min: *values.first()?,
            median: values[values.len() / 2],
            max: *values.last()?,
        })
    }
}

/// One class and its images.
#[derive(Debug, Clone, Serialize)]
pub struct ClassSummary {
    pub name: String,
    pub label: usize,
    pub images: usize,
    /// Images of this class that decode.
    pub usable: usize,
}

/// The result of `lanner data PATH`.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetSummary {
    pub root: String,
    pub classes: Vec<ClassSummary>,
    pub images: usize,
    /// Decodable images per format (`jpeg`, `png`, …).
    pub formats: BTreeMap<String, usize>,
    pub width: Option<Spread>,
    pub height: Option<Spread>,
    pub undecodable: Vec<Undecodable>,
    /// Images whose header claims more pixels than the limit (possible decompression bombs).
    pub over_limit: Vec<Undecodable>,
    /// Files in the class folders that are not read (not a Keras image extension).
    pub ignored: Vec<String>,
}

/// A file that cannot be used.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Undecodable {
    pub path: String,
    pub reason: String,
}

impl From<SkippedFile> for Undecodable {
    fn from(file: SkippedFile) -> Self {
        Undecodable {
            path: file.path.display().to_string(),
            reason: file.reason,
        }
    }
}

impl DatasetSummary {
    /// Why this folder cannot be used for training, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if let Some(file) = self.over_limit.first() {
            return Some(file.reason.clone());
        }
        if self.classes.len() < 2 {
            return Some(format!(
                "'{}' has only one class; a classifier needs at least two class folders",
                self.root
            ));
        }
        self.classes.iter().find(|c| c.usable == 0).map(|c| {
            format!(
                "no image of class '{}' can be decoded; replace the files listed above",
                c.name
            )
        })
    }
}

/// Decodes every image of `folder` on `workers` threads and summarises what it found.
pub fn summarize(folder: &ImageFolder, workers: usize, max_pixels: u64) -> DatasetSummary {
    struct Found {
        format: &'static str,
        width: u32,
        height: u32,
    }
    let results: Vec<Mutex<Option<Result<Found, DataError>>>> =
        folder.samples.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(sample) = folder.samples.get(i) else {
                        break;
                    };
                    let found = decode_file(&sample.path, max_pixels).map(|d| Found {
                        format: format_name(d.format),
                        width: d.image.width(),
                        height: d.image.height(),
                    });
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(found);
                    }
                }
            });
        }
    });

    let mut classes: Vec<ClassSummary> = folder
        .class_names
        .iter()
        .enumerate()
        .map(|(label, name)| ClassSummary {
            name: name.clone(),
            label,
            images: 0,
            usable: 0,
        })
        .collect();
    let (mut formats, mut widths, mut heights) = (BTreeMap::new(), vec![], vec![]);
    let (mut undecodable, mut over_limit) = (vec![], vec![]);
    for (sample, result) in folder.samples.iter().zip(results) {
        classes[sample.label].images += 1;
        match result.into_inner().ok().flatten() {
            Some(Ok(found)) => {
                classes[sample.label].usable += 1;
                *formats.entry(found.format.to_string()).or_insert(0) += 1;
                widths.push(found.width);
                heights.push(found.height);
            }
            Some(Err(error)) => {
                let path = sample.path.display().to_string();
                match error {
                    DataError::TooLarge { .. } => over_limit.push(Undecodable {
                        path,
                        reason: error.to_string(),
                    }),
                    _ => undecodable.push(Undecodable {
                        path,
                        reason: error.reason(),
                    }),
                }
            }
            None => {}
        }
    }
    DatasetSummary {
        root: folder.root.display().to_string(),
        classes,
        images: folder.samples.len(),
        formats,
        width: Spread::of(widths),
        height: Spread::of(heights),
        undecodable,
        over_limit,
        ignored: folder
            .ignored
            .iter()
            .map(|path| path.display().to_string())
            .collect(),
    }
}
