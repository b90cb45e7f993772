//! `lanner data PATH`: the summary of a dataset, and a timing of the training loader on it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use burn::tensor::Device;
use clap::{Args, ValueEnum};
use lanner_data::decode::DEFAULT_MAX_PIXELS;
use lanner_data::loader::default_workers;
use lanner_data::memory::{self, CacheRequest};
use lanner_data::summary::Undecodable;
use lanner_data::{
    Augmentation, DatasetSummary, ImageFolder, Loader, LoaderConfig, Subset, ValidationSplit,
    summarize,
};

#[derive(Args)]
pub struct DataArgs {
    /// Folder with one sub-folder of images per class (e.g. data/train/cat/1.jpg).
    pub path: PathBuf,

    /// Hold out this fraction of the images (Keras' `validation_split`); use with --subset.
    #[arg(long, value_name = "FRACTION")]
    pub validation_split: Option<f64>,

    /// Which side of --validation-split to use.
    #[arg(long, value_enum, default_value_t = SubsetArg::Training)]
    pub subset: SubsetArg,

    /// Seed of the shuffles and augmentations (the same seed gives the same split as Keras).
    #[arg(long, default_value_t = 1337)]
    pub seed: u32,

    /// Decoding threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,

    /// Refuse images whose header claims more pixels than this (decompression bombs).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,

    /// Treat any undecodable file as an error (exit status 1).
    #[arg(long)]
    pub strict: bool,

    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,

    /// Time the training loader for this many epochs instead of decoding everything once.
    #[arg(long, value_name = "EPOCHS")]
    pub benchmark: Option<u64>,

    /// Images per batch (with --benchmark).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,

    /// Model input size in pixels, square (with --benchmark).
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,

    /// Keras `RandomRotation` factor, 0 to disable (with --benchmark).
    #[arg(long, default_value_t = 0.2)]
    pub random_rotation: f32,

    /// Do not flip images left-right (with --benchmark).
    #[arg(long)]
    pub no_flip: bool,

    /// Keep resized images in memory after the first epoch (with --benchmark; left off, with
    /// a warning, when they would take more than half the memory available).
    #[arg(long)]
    pub cache: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SubsetArg {
    Training,
    Validation,
}

pub fn run(args: DataArgs) -> Result<ExitCode> {
    let mut folder = ImageFolder::open(&args.path)?;
    if let Some(fraction) = args.validation_split {
        let subset = match args.subset {
            SubsetArg::Training => Subset::Training,
            SubsetArg::Validation => Subset::Validation,
        };
        folder = folder.split(ValidationSplit {
            fraction,
            subset,
            seed: args.seed,
        })?;
    }
    let workers = args.workers.unwrap_or_else(default_workers).max(1);
    match args.benchmark {
        Some(epochs) => benchmark(&args, folder, workers, epochs),
        None => {
            let summary = summarize(&folder, workers, args.max_image_pixels);
            report(&args, &folder, &summary)
        }
    }
}

fn report(args: &DataArgs, folder: &ImageFolder, summary: &DatasetSummary) -> Result<ExitCode> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(summary)?);
    } else {
        print_summary(summary);
        if let Some(message) = folder.ignored_message() {
            println!("{message}");
        }
    }
    if let Some(problem) = summary.problem() {
        eprintln!("error: {problem}");
        return Ok(ExitCode::FAILURE);
    }
    if args.strict && !summary.undecodable.is_empty() {
        eprintln!(
            "error: {} file(s) cannot be decoded (--strict); replace or remove them",
            summary.undecodable.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(summary: &DatasetSummary) {
    println!(
        "Dataset {}: {} classes, {} images",
        summary.root,
        summary.classes.len(),
        summary.images
    );
    let width = summary
        .classes
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "  {:>5}  {:<width$}  {:>7}  {:>7}",
        "label", "class", "images", "usable"
    );
    for class in &summary.classes {
        println!(
            "  {:>5}  {:<width$}  {:>7}  {:>7}",
            class.label, class.name, class.images, class.usable
        );
    }
    let formats: Vec<String> = summary
        .formats
        .iter()
        .map(|(f, n)| format!("{f} {n}"))
        .collect();
    println!(
        "Formats: {}",
        if formats.is_empty() {
            "none".into()
        } else {
            formats.join(", ")
        }
    );
    if let (Some(w), Some(h)) = (summary.width, summary.height) {
        println!("Width:  min {}, median {}, max {}", w.min, w.median, w.max);
        println!("Height: min {}, median {}, max {}", h.min, h.median, h.max);
    }
    print_undecodable(&summary.undecodable);
    if !summary.over_limit.is_empty() {
        println!(
            "Over the pixel limit ({}), refused:",
            summary.over_limit.len()
        );
        for file in &summary.over_limit {
            println!("  {}", file.path);
        }
    }
}

fn print_undecodable(files: &[Undecodable]) {
    if files.is_empty() {
        return;
    }
    println!(
        "Undecodable files ({}), skipped in training unless --strict:",
        files.len()
    );
    for file in files {
        println!("  {}: {}", file.path, file.reason);
    }
}

fn benchmark(
    args: &DataArgs,
    folder: ImageFolder,
    workers: usize,
    epochs: u64,
) -> Result<ExitCode> {
    let images = folder.samples.len();
    let mut config = LoaderConfig::new(args.batch_size, (args.image_size, args.image_size));
    config.seed = u64::from(args.seed);
    config.workers = workers;
    // A benchmark caches only when asked, to time the loader either way.
    let request = match args.cache {
        true => CacheRequest::Always,
        false => CacheRequest::Never,
    };
    let cache = memory::decide_cache(
        request,
        images,
        (args.image_size, args.image_size),
        memory::available_bytes(),
    );
    if let Some(message) = cache.message.filter(|_| !cache.cache) {
        eprintln!("{message}");
    }
    config.cache = cache.cache;
    config.strict = args.strict;
    config.max_pixels = args.max_image_pixels;
    config.augmentation = Some(Augmentation {
        horizontal_flip: !args.no_flip,
        rotation_factor: args.random_rotation,
    });
    let loader = Loader::new(folder.samples, config)?;
    let device = Device::flex();
    println!(
        "Loader: {images} images, batch {}, {}x{}, {workers} workers, flip {}, rotation {}, cache {}",
        args.batch_size,
        args.image_size,
        args.image_size,
        !args.no_flip,
        args.random_rotation,
        loader.config().cache
    );
    let mut rates = Vec::new();
    for epoch in 0..epochs {
        let start = Instant::now();
        let mut seen = 0;
        for batch in loader.epoch(epoch) {
            let batch = batch?;
            seen += batch.len();
            // Hand the batch over as the training step would receive it.
            let tensor = batch.into_images_tensor(&device);
            std::hint::black_box(tensor);
        }
        let seconds = start.elapsed().as_secs_f64();
        let rate = seen as f64 / seconds;
        rates.push(rate);
        println!(
            "epoch {}: {seen} images in {seconds:.2} s, {rate:.0} images/s",
            epoch + 1
        );
    }
    let skipped: Vec<Undecodable> = loader
        .skipped()
        .into_iter()
        .map(Undecodable::from)
        .collect();
    print_undecodable(&skipped);
    if args.json {
        let json =
            serde_json::json!({ "images": images, "workers": workers, "images_per_second": rates });
        println!("{json}");
    }
    Ok(ExitCode::SUCCESS)
}
