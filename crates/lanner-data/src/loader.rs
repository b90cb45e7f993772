//! The parallel prefetching loader: worker threads decode, resize and augment whole batches
//! ahead of the training step, a bounded number at a time, and hand them over in order.
//!
//! Memory stays bounded: a worker needs a *ticket* to start a batch and the consumer returns
//! it only after taking the batch, so at most `workers + prefetch` batches exist at once.
//! `cache` keeps each resized image (before augmentation, as `tf.data.Dataset.cache()` after
//! the resize) so later epochs skip decoding.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use burn::tensor::{Device, Int, Tensor, TensorData};
use crossbeam_channel::{Receiver, Sender};

use crate::augment::{Augmentation, SampleTransform, transform_into_uninit};
use crate::decode::{DEFAULT_MAX_PIXELS, decode_file};
use crate::error::DataError;
use crate::folder::Sample;
use crate::resize::{PIXEL_STRIDE, resize_bilinear};
use crate::rng::SplitMix64;

/// How batches are made.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Model input size, height × width.
    pub image_size: (usize, usize),
    /// Reshuffle the samples every epoch (Keras' `shuffle=True`).
    pub shuffle: bool,
    pub seed: u64,
    /// Training-time augmentation; `None` for validation and prediction.
    pub augmentation: Option<Augmentation>,
    /// Threads that decode and augment (default: all cores).
    pub workers: usize,
    /// Finished batches kept ready ahead of the consumer.
    pub prefetch: usize,
    /// Keep resized images in memory after their first decode.
    pub cache: bool,
    /// Fail on the first undecodable file instead of skipping it.
    pub strict: bool,
    /// Refuse images whose header claims more pixels than this.
    pub max_pixels: u64,
}

/// Finished batches a loader keeps ready ahead of the consumer unless told otherwise.
pub const DEFAULT_PREFETCH: usize = 2;

impl LoaderConfig {
    pub fn new(batch_size: usize, image_size: (usize, usize)) -> Self {
        LoaderConfig {
            batch_size,
            image_size,
            shuffle: true,
            seed: 0,
            augmentation: None,
            workers: default_workers(),
            prefetch: DEFAULT_PREFETCH,
            cache: false,
            strict: false,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// All cores this process may use.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A file that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedFile {
    pub path: PathBuf,
    pub reason: String,
}

impl SkippedFile {
    /// One message for the files a loader skipped among the `kind` images ("training",
    /// "validation", or "" for any): how many, and the first few by path with their reasons
    /// (and, with `strict_hint`, that `--strict` stops on them). `None` when there are none.
    pub fn report(files: &[SkippedFile], kind: &str, strict_hint: bool) -> Option<String> {
        const LISTED: usize = 10;
        if files.is_empty() {
            return None;
        }
        let mut files: Vec<&SkippedFile> = files.iter().collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let mut text = format!(
            "Skipped {} {kind}{}image{} that cannot be decoded{}:",
            files.len(),
            if kind.is_empty() { "" } else { " " },
            if files.len() == 1 { "" } else { "s" },
            if strict_hint {
                " (--strict stops on them instead)"
            } else {
                ""
            }
        );
        for file in files.iter().take(LISTED) {
            text.push_str(&format!("\n  {}: {}", file.path.display(), file.reason));
        }
        if files.len() > LISTED {
            text.push_str(&format!(
                "\n  and {} more (`lanner data FOLDER` lists them all)",
                files.len() - LISTED
            ));
        }
        Some(text)
    }
}

/// A batch of images in `[batch, 3, height, width]` layout, `f32` values 0..255.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<f32>,
    /// Class index of each image.
    pub labels: Vec<usize>,
    /// Index of each image in the loader's samples.
    pub samples: Vec<usize>,
    pub height: usize,
    pub width: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images as a `[B, 3, H, W]` tensor on `device` (a copy; see `into_images_tensor`).
    pub fn images_tensor(&self, device: &Device) -> Tensor<4> {
        self.clone().into_images_tensor(device)
    }

    /// The images as a `[B, 3, H, W]` tensor on `device`, handing over the buffer.
    pub fn into_images_tensor(self, device: &Device) -> Tensor<4> {
        let shape = [self.len(), 3, self.height, self.width];
        Tensor::from_data(TensorData::new(self.images, shape), device)
    }

    /// The class indices as a `[B]` integer tensor (Keras' `label_mode="int"`).
    pub fn labels_tensor(&self, device: &Device) -> Tensor<1, Int> {
        let labels: Vec<i64> = self.labels.iter().map(|&l| l as i64).collect();
        Tensor::from_data(TensorData::new(labels, [self.len()]), device)
    }

    /// The labels as a `[B, 1]` float tensor of 0s and 1s (Keras' `label_mode="binary"`: the
    /// first class folder is 0).
    pub fn binary_labels_tensor(&self, device: &Device) -> Tensor<2> {
        let labels: Vec<f32> = self.labels.iter().map(|&l| l as f32).collect();
        Tensor::from_data(TensorData::new(labels, [self.len(), 1]), device)
    }

    /// The labels one-hot over `classes` as a `[B, classes]` float tensor (Keras'
    /// `label_mode="categorical"`).
    pub fn one_hot_labels_tensor(&self, classes: usize, device: &Device) -> Tensor<2> {
        let mut one_hot = vec![0.0f32; self.len() * classes];
        for (row, &label) in self.labels.iter().enumerate() {
            one_hot[row * classes + label] = 1.0;
        }
        Tensor::from_data(TensorData::new(one_hot, [self.len(), classes]), device)
    }
}

/// Makes batches of a list of samples, epoch after epoch.
pub struct Loader {
    shared: Arc<Shared>,
}

struct Shared {
    samples: Vec<Sample>,
    config: LoaderConfig,
    cache: Vec<OnceLock<Arc<[f32]>>>,
    bad: Vec<AtomicBool>,
    skipped: Mutex<Vec<SkippedFile>>,
}

const AUGMENT_SALT: u64 = 0xa5a5_5a5a_0f0f_f0f0;

impl Loader {
    pub fn new(samples: Vec<Sample>, config: LoaderConfig) -> Result<Self, DataError> {
        if config.batch_size == 0 {
            return Err(DataError::InvalidOption(
                "--batch-size must be at least 1".into(),
            ));
        }
        if config.image_size.0 == 0 || config.image_size.1 == 0 {
            return Err(DataError::InvalidOption(
                "--image-size must be at least 1 pixel".into(),
            ));
        }
        if let Some(aug) = config.augmentation
            && !(aug.rotation_factor >= 0.0 && aug.rotation_factor.is_finite())
        {
            return Err(DataError::InvalidOption(format!(
                "--random-rotation must be 0 or more (a fraction of a full turn), got {}",
                aug.rotation_factor
            )));
        }
        let config = LoaderConfig {
            workers: config.workers.max(1),
            prefetch: config.prefetch.max(1),
            ..config
        };
        let cache = if config.cache {
            samples.iter().map(|_| OnceLock::new()).collect()
        } else {
            Vec::new()
        };
        let bad = samples.iter().map(|_| AtomicBool::new(false)).collect();
        Ok(Loader {
            shared: Arc::new(Shared {
                samples,
                config,
                cache,
                bad,
                skipped: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.shared.config
    }

    pub fn samples(&self) -> &[Sample] {
        &self.shared.samples
    }

    /// Batches per epoch (the last one may be smaller, as in Keras).
    pub fn num_batches(&self) -> usize {
        self.shared
            .samples
            .len()
            .div_ceil(self.shared.config.batch_size)
    }

    /// Images held in the `cache` so far.
    pub fn cached_images(&self) -> usize {
        self.shared
            .cache
            .iter()
            .filter(|slot| slot.get().is_some())
            .count()
    }

    /// Files skipped so far because they could not be decoded.
    pub fn skipped(&self) -> Vec<SkippedFile> {
        self.shared
            .skipped
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The first label whose every sample has been found undecodable, with that count: a class
    /// the model cannot learn. Samples not read yet count as usable.
    pub fn label_without_usable_images(&self) -> Option<(usize, usize)> {
        let samples = &self.shared.samples;
        let labels = samples.iter().map(|s| s.label + 1).max().unwrap_or(0);
        let (mut total, mut bad) = (vec![0; labels], vec![0; labels]);
        for (sample, flag) in samples.iter().zip(&self.shared.bad) {
            total[sample.label] += 1;
            bad[sample.label] += usize::from(flag.load(Ordering::Relaxed));
        }
        (0..labels)
            .find(|&l| total[l] > 0 && bad[l] == total[l])
            .map(|l| (l, bad[l]))
    }

    /// The order in which `epoch` visits the samples.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.shared.samples.len()).collect();
        if self.shared.config.shuffle {
            SplitMix64::for_stream(self.shared.config.seed, epoch, u64::MAX).shuffle(&mut order);
        }
        order
    }

    /// Starts the workers for one epoch; the returned iterator yields its batches in order.
    pub fn epoch(&self, epoch: u64) -> EpochBatches {
        self.epoch_from(epoch, 0)
    }

    /// Like [`Loader::epoch`], starting at batch `first_batch` (a run resumed mid-epoch): the
    /// batches are the ones an uninterrupted epoch yields from there on.
    pub fn epoch_from(&self, epoch: u64, first_batch: usize) -> EpochBatches {
        let order = Arc::new(self.epoch_order(epoch));
        let num_batches = self.num_batches();
        let config = &self.shared.config;
        let tickets = config.workers + config.prefetch;
        let (ticket_tx, ticket_rx) = crossbeam_channel::bounded(tickets);
        for _ in 0..tickets {
            let _ = ticket_tx.send(());
        }
        let (result_tx, result_rx) = crossbeam_channel::unbounded();
        let first_batch = first_batch.min(num_batches);
        let next_batch = Arc::new(AtomicUsize::new(first_batch));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..config.workers.min((num_batches - first_batch).max(1)))
            .map(|_| {
                let worker = Worker {
                    shared: Arc::clone(&self.shared),
                    order: Arc::clone(&order),
                    epoch,
                    next_batch: Arc::clone(&next_batch),
                    stop: Arc::clone(&stop),
                    tickets: ticket_rx.clone(),
                    results: result_tx.clone(),
                };
                std::thread::Builder::new()
                    .name("lanner-loader".into())
                    .spawn(move || worker.run())
                    .expect("the OS refused to start a loader thread")
            })
            .collect();
        EpochBatches {
            next: first_batch,
            num_batches,
            pending: BTreeMap::new(),
            results: result_rx,
            tickets: Some(ticket_tx),
            stop,
            workers,
            failed: false,
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    order: Arc<Vec<usize>>,
    epoch: u64,
    next_batch: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tickets: Receiver<()>,
    results: Sender<(usize, Result<Batch, DataError>)>,
}

impl Worker {
    fn run(self) {
        let (h, w) = self.shared.config.image_size;
        let mut scratch = vec![0.0f32; h * w * PIXEL_STRIDE];
        let num_batches = self.order.len().div_ceil(self.shared.config.batch_size);
        while self.tickets.recv().is_ok() && !self.stop.load(Ordering::Relaxed) {
            let index = self.next_batch.fetch_add(1, Ordering::Relaxed);
            if index >= num_batches {
                break;
            }
            let batch = self.build(index, &mut scratch);
            if self.results.send((index, batch)).is_err() {
                break;
            }
        }
    }

    fn build(&self, index: usize, scratch: &mut [f32]) -> Result<Batch, DataError> {
        let shared = &*self.shared;
        let config = &shared.config;
        let (h, w) = config.image_size;
        let image_len = h * w * 3;
        let start = index * config.batch_size;
        let members = &self.order[start..(start + config.batch_size).min(self.order.len())];
        let mut batch = Batch {
            images: Vec::with_capacity(members.len() * image_len),
            labels: Vec::with_capacity(members.len()),
            samples: Vec::with_capacity(members.len()),
            height: h,
            width: w,
        };
        for &sample in members {
            if shared.bad[sample].load(Ordering::Relaxed) {
                continue;
            }
            let stride = match shared.resized(sample, scratch) {
                Ok(stride) => stride,
                Err(error) if error.is_skippable() && !config.strict => {
                    shared.skip(sample, &error);
                    continue;
                }
                Err(error) => return Err(error),
            };
            let transform = match config.augmentation {
                Some(aug) => aug.draw(&mut SplitMix64::for_stream(
                    config.seed ^ AUGMENT_SALT,
                    self.epoch,
                    sample as u64,
                )),
                None => SampleTransform::default(),
            };
            let slot = &mut batch.images.spare_capacity_mut()[..image_len];
            transform_into_uninit(scratch, stride, h, w, transform, slot);
            // SAFETY: the capacity was reserved for the whole batch, and the transform wrote
            // every float of the slot.
            unsafe { batch.images.set_len(batch.images.len() + image_len) };
            batch.labels.push(shared.samples[sample].label);
            batch.samples.push(sample);
        }
        Ok(batch)
    }
}

impl Shared {
    /// Fills `scratch` with the resized image of `sample`, from the cache when it has it, and
    /// returns its floats per pixel: 4 (RGBX) when decoded, 3 (RGB) from the cache. The
    /// cache keeps RGB only (a quarter less memory), copied into `scratch` in one sequential
    /// pass: the rotation then samples a buffer that is hot in the CPU cache instead of one
    /// in main memory (rotating straight from the cache halved the loader's speed).
    fn resized(&self, sample: usize, scratch: &mut [f32]) -> Result<usize, DataError> {
        let Some(slot) = self.cache.get(sample) else {
            self.decode_resized(sample, scratch)?;
            return Ok(PIXEL_STRIDE);
        };
        if let Some(rgb) = slot.get() {
            scratch[..rgb.len()].copy_from_slice(rgb);
            return Ok(3);
        }
        self.decode_resized(sample, scratch)?;
        // One float of padding: the rotation reads four floats per pixel.
        let rgb: Arc<[f32]> = scratch
            .chunks_exact(PIXEL_STRIDE)
            .flat_map(|p| [p[0], p[1], p[2]])
            .chain([0.0])
            .collect();
        let _ = slot.set(rgb);
        Ok(PIXEL_STRIDE)
    }

    fn decode_resized(&self, sample: usize, out: &mut [f32]) -> Result<(), DataError> {
        let (h, w) = self.config.image_size;
        let decoded = decode_file(&self.samples[sample].path, self.config.max_pixels)?;
        resize_bilinear(&decoded.image, h, w, out);
        Ok(())
    }

    fn skip(&self, sample: usize, error: &DataError) {
        if !self.bad[sample].swap(true, Ordering::Relaxed)
            && let Ok(mut skipped) = self.skipped.lock()
        {
            skipped.push(SkippedFile {
                path: self.samples[sample].path.clone(),
                reason: error.reason(),
            });
        }
    }
}

/// The batches of one epoch, in order. Dropping it stops the workers.
pub struct EpochBatches {
    next: usize,
    num_batches: usize,
    pending: BTreeMap<usize, Result<Batch, DataError>>,
    results: Receiver<(usize, Result<Batch, DataError>)>,
    tickets: Option<Sender<()>>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    failed: bool,
}

impl Iterator for EpochBatches {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.failed && self.next < self.num_batches {
            let result = match self.pending.remove(&self.next) {
                Some(result) => result,
                None => match self.results.recv() {
                    Ok((index, result)) => {
                        self.pending.insert(index, result);
                        continue;
                    }
                    // Every worker is gone with batches still owed: one panicked.
                    Err(_) => {
                        self.failed = true;
                        return Some(Err(DataError::LoaderStopped));
                    }
                },
            };
            self.next += 1;
            if let Some(tickets) = &self.tickets {
                let _ = tickets.send(());
            }
            match result {
                Ok(batch) if batch.is_empty() => continue,
                Ok(batch) => return Some(Ok(batch)),
                Err(error) => {
                    self.failed = true;
                    return Some(Err(error));
                }
            }
        }
        None
    }
}

impl Drop for EpochBatches {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tickets.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skipped(n: usize) -> Vec<SkippedFile> {
        (0..n)
            .rev()
            .map(|i| SkippedFile {
                path: PathBuf::from(format!("data/cat/{i:02}.jpg")),
                reason: "the file is empty".into(),
            })
            .collect()
    }

    #[test]
    fn a_skip_report_lists_the_first_ten_files_by_path_and_counts_the_rest() {
        assert_eq!(SkippedFile::report(&[], "training", true), None);
        let one = SkippedFile::report(&skipped(1), "", false).unwrap();
        assert_eq!(
            one,
            "Skipped 1 image that cannot be decoded:\n  data/cat/00.jpg: the file is empty"
        );
        let many = SkippedFile::report(&skipped(12), "training", true).unwrap();
        let lines: Vec<&str> = many.lines().collect();
        assert_eq!(
            lines[0],
            "Skipped 12 training images that cannot be decoded (--strict stops on them instead):"
        );
        assert_eq!(lines.len(), 12);
        assert_eq!(lines[1], "  data/cat/00.jpg: the file is empty");
        assert_eq!(lines[10], "  data/cat/09.jpg: the file is empty");
        assert_eq!(
            lines[11],
            "  and 2 more (`lanner data FOLDER` lists them all)"
        );
    }
}
