//! `lanner evaluate`: reload a trained model and report the metrics training reported for
//! validation, on any data folder.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::Device;
use clap::Args;
use lanner_data::loader::default_workers;
use lanner_data::{ImageFolder, Loader, LoaderConfig, SkippedFile};
use lanner_train::artifact::{self, ModelCard};
use lanner_train::evaluate::evaluate;

use crate::device::{DeviceChoice, check_precision};
use lanner_models::precision::Precision;

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// The model folder `lanner train` wrote (lanner.json + weights.safetensors).
    #[arg(long)]
    pub model: PathBuf,

    /// Images in one sub-folder per class, with the model's class names.
    #[arg(long)]
    pub data: PathBuf,

    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,

    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,

    /// The float type of the pass: f32, or bf16 (on a GPU, or a CPU with Intel AMX). Default:
    /// the one the model was trained and validated in, where this device computes in it.
    #[arg(long)]
    pub precision: Option<Precision>,

    /// Image decoding threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,

    /// Print the metrics as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvaluateArgs) -> Result<ExitCode> {
    let (device, device_name) = args.device.resolve()?;
    if let Some(precision) = args.precision {
        check_precision(precision, &device, &device_name)?;
    }
    let (card, model) = artifact::load(&args.model, &device)?;
    let precision = match args.precision {
        Some(precision) => precision,
        None => training_precision(&card, &device, &device_name),
    };
    let folder = ImageFolder::open(&args.data)?;
    if folder.class_names != card.class_names {
        anyhow::bail!(
            "'{}' has the classes {}, but the model was trained on {}; evaluate on a folder \
             with the model's class folders",
            args.data.display(),
            folder.class_names.join(", "),
            card.class_names.join(", ")
        );
    }
    let size = card.preprocessing.image_size;
    let config = LoaderConfig {
        shuffle: false,
        workers: args.workers.unwrap_or_else(default_workers).max(1),
        ..LoaderConfig::new(args.batch_size.max(1), (size, size))
    };
    if let Some(message) = folder.ignored_message() {
        eprintln!("{message}");
    }
    let loader = Loader::new(folder.samples, config)?;
    let metrics = evaluate(
        model,
        &loader,
        &card.preprocessing.normalization(),
        card.class_names.len(),
        &device,
        precision,
    )?;
    if let Some(message) = SkippedFile::report(&loader.skipped(), "", false) {
        eprintln!("{message}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&metrics)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut line = format!(
        "{} images - loss: {:.4} - accuracy: {:.4}",
        metrics.samples, metrics.loss, metrics.accuracy
    );
    for (name, value) in [
        ("precision", metrics.precision),
        ("recall", metrics.recall),
        ("auc", metrics.auc),
    ] {
        if let Some(value) = value {
            line.push_str(&format!(" - {name}: {value:.4}"));
        }
    }
    println!("{line}");
    println!("{}", metrics.confusion.render(&card.class_names));
    Ok(ExitCode::SUCCESS)
}

/// The precision `card`'s model was trained (and validated) in, where `device` computes in it;
/// f32 otherwise, saying so, as the metrics may then differ from training's in the last digits.
fn training_precision(card: &ModelCard, device: &Device, device_name: &str) -> Precision {
    let trained = card.hyperparameters.precision;
    if check_precision(trained, device, device_name).is_ok() {
        return trained;
    }
    eprintln!(
        "note: the model was trained in {trained}, which the {device_name} does not compute in; \
         evaluating in f32, so the metrics may differ from training's in the last digits"
    );
    Precision::F32
}
