//! `lanner train`: the seed's training script — its argument names and defaults, its
//! SageMaker environment fallbacks — running Lanner's recipe on the CPU or a GPU.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use clap::Args;
use lanner_data::decode::DEFAULT_MAX_PIXELS;
use lanner_data::loader::default_workers;
use lanner_data::{Augmentation, ImageFolder, Loader, LoaderConfig, Subset, ValidationSplit};
use lanner_models::hub::{self, HubConfig, WeightsSpec};
use lanner_train::artifact::{self, ModelCard};
use lanner_train::classifier::Classifier;
use lanner_train::report::{KerasLog, Reporter};
use lanner_train::{Hyperparameters, Recipe, TrainingJob, train};

use crate::device::DeviceChoice;

/// The seed's hyperparameters keep its names (`--fine-tune-layer`, `--drop-out-percentage`,
/// …). Unknown `--name value` pairs are reported and ignored, as the seed's
/// `parse_known_args` does.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training images: one sub-folder per class.
    #[arg(long, env = "SM_CHANNEL_TRAIN", value_name = "DIR")]
    pub train: Option<PathBuf>,

    /// Validation images, with the same class folders as --train.
    #[arg(long, env = "SM_CHANNEL_VALIDATION", value_name = "DIR")]
    pub validation: Option<PathBuf>,

    /// Without --validation: hold out this fraction of --train (Keras' `validation_split`).
    #[arg(long, value_name = "FRACTION")]
    pub validation_split: Option<f64>,

    /// Where the model is written (lanner.json + weights.safetensors).
    #[arg(
        long = "sm-model-dir",
        alias = "model-dir",
        env = "SM_MODEL_DIR",
        value_name = "DIR"
    )]
    pub sm_model_dir: Option<PathBuf>,

    /// SageMaker's S3 model location, passed by the SDK; accepted and ignored.
    #[arg(long = "model_dir", hide = true, value_name = "URI")]
    pub model_dir_uri: Option<String>,

    /// Where metrics.jsonl is written.
    #[arg(long, env = "SM_OUTPUT_DATA_DIR", value_name = "DIR")]
    pub output_data_dir: Option<PathBuf>,

    /// Save a checkpoint after every epoch (and on SIGTERM) here, and resume from it.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,

    /// Replace the model already in the model folder.
    #[arg(long)]
    pub overwrite: bool,

    /// Backbone (see `lanner models`).
    #[arg(long, default_value = "mobilenet_v3_large")]
    pub arch: String,

    /// Backbone weights: `imagenet`, a checkpoint file, or `none`.
    #[arg(long, default_value = "imagenet")]
    pub weights: WeightsSpec,

    /// Input size in pixels, square (default: the backbone's, 224 or 299).
    #[arg(long)]
    pub image_size: Option<usize>,

    /// Images per training step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,

    /// Epochs of phase 1, the head alone (default: 3, or 5 for Xception).
    #[arg(long)]
    pub initial_epochs: Option<usize>,

    /// Adam's learning rate in phase 1.
    #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true)]
    pub learning_rate: f64,

    /// The most epochs of phase 2 (fine-tuning); early stopping may end it sooner.
    #[arg(long, default_value_t = 10)]
    pub fine_tune_epochs: usize,

    /// RMSprop's learning rate in phase 2.
    #[arg(long, default_value_t = 1e-5, allow_negative_numbers = true)]
    pub fine_tune_learning_rate: f64,

    /// Keras layer index from which the backbone trains in phase 2.
    #[arg(long, default_value_t = 100)]
    pub fine_tune_layer: usize,

    /// Dropout before the dense layer (default: 0.1, or 0.2 for Xception).
    #[arg(long, allow_negative_numbers = true)]
    pub drop_out_percentage: Option<f64>,

    /// Random rotation, a fraction of a full turn (0.2 = up to ±72°).
    #[arg(long, default_value_t = 0.2, allow_negative_numbers = true)]
    pub random_rotation: f64,

    /// Loss weight of class 0 (binary).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub negative_weight: f64,

    /// Loss weight of class 1 (binary).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub positive_weight: f64,

    /// Loss weight of every class, comma-separated in class-folder order (e.g. 1,2.5,1).
    #[arg(long, value_delimiter = ',', value_name = "W,W,…")]
    pub class_weights: Option<Vec<f64>>,

    /// Epochs without a better one before phase 2 stops.
    #[arg(long, default_value_t = 2)]
    pub patience: usize,

    /// Train the whole network from the first epoch, BatchNorm updating its statistics (for
    /// --weights none).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub from_scratch: Option<bool>,

    /// Seed of the shuffles, augmentations, dropout and initialisation.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,

    /// Image decoding threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,

    /// Keep decoded images in memory after the first epoch.
    #[arg(long)]
    pub cache: bool,

    /// Stop on an undecodable image instead of skipping it.
    #[arg(long)]
    pub strict: bool,

    /// Refuse images whose header claims more pixels than this.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
}

/// The arguments of `lanner train` with unknown `--name [value]` options removed, and a
/// warning for each. `args` starts after the subcommand name.
pub fn drop_unknown_options(args: Vec<OsString>) -> (Vec<OsString>, Vec<String>) {
    let command = TrainArgs::augment_args(clap::Command::new("train"));
    let known: Vec<String> = command
        .get_arguments()
        .flat_map(|a| {
            a.get_long()
                .into_iter()
                .chain(a.get_all_aliases().into_iter().flatten())
                .map(str::to_string)
        })
        .chain(["help".to_string()])
        .collect();
    let mut kept = Vec::new();
    let mut warnings = Vec::new();
    let mut iter = args.into_iter().peekable();
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy().into_owned();
        let Some(option) = text.strip_prefix("--") else {
            kept.push(arg);
            continue;
        };
        let (name, inline_value) = match option.split_once('=') {
            Some((name, _)) => (name, true),
            None => (option, false),
        };
        if name.is_empty() || known.iter().any(|k| k == name) {
            kept.push(arg);
            continue;
        }
        let mut dropped = text.clone();
        if !inline_value
            && let Some(next) = iter.peek()
            && !next.to_string_lossy().starts_with("--")
        {
            dropped.push(' ');
            dropped.push_str(&next.to_string_lossy());
            iter.next();
        }
        warnings.push(format!(
            "warning: ignoring unknown argument `{dropped}` (see `lanner train --help`)"
        ));
    }
    (kept, warnings)
}

impl TrainArgs {
    /// The run's hyperparameters: the backbone's defaults, overridden by the arguments.
    fn hyperparameters(&self, entry: &lanner_models::ModelEntry) -> Hyperparameters {
        let defaults = Hyperparameters::for_model(entry);
        Hyperparameters {
            arch: entry.name.to_string(),
            image_size: self.image_size.unwrap_or(defaults.image_size),
            batch_size: self.batch_size,
            initial_epochs: self.initial_epochs.unwrap_or(defaults.initial_epochs),
            learning_rate: self.learning_rate,
            fine_tune_epochs: self.fine_tune_epochs,
            fine_tune_learning_rate: self.fine_tune_learning_rate,
            fine_tune_layer: self.fine_tune_layer,
            drop_out_percentage: self
                .drop_out_percentage
                .unwrap_or(defaults.drop_out_percentage),
            random_rotation: self.random_rotation,
            negative_weight: self.negative_weight,
            positive_weight: self.positive_weight,
            class_weights: self.class_weights.clone(),
            patience: self.patience,
            from_scratch: self.from_scratch.unwrap_or(false),
            seed: self.seed,
        }
    }
}

/// The training and validation folders the arguments name.
fn open_data(args: &TrainArgs) -> Result<(ImageFolder, ImageFolder)> {
    let Some(train_dir) = &args.train else {
        bail!("no training data: pass --train DIR (or set SM_CHANNEL_TRAIN)");
    };
    let train = ImageFolder::open(train_dir)?;
    let (train, validation) = match (&args.validation, args.validation_split) {
        (Some(dir), None) => (train, ImageFolder::open(dir)?),
        (None, Some(fraction)) => {
            let split = |subset| ValidationSplit {
                fraction,
                subset,
                seed: args.seed as u32,
            };
            (
                train.clone().split(split(Subset::Training))?,
                train.split(split(Subset::Validation))?,
            )
        }
        (Some(_), Some(_)) => {
            bail!("pass either --validation or --validation-split, not both")
        }
        (None, None) => bail!(
            "no validation data: pass --validation DIR (or set SM_CHANNEL_VALIDATION), or \
             --validation-split 0.2 to hold out part of --train"
        ),
    };
    train.require_two_classes()?;
    if validation.class_names != train.class_names {
        bail!(
            "the validation classes ({}) differ from the training classes ({}); give both \
             folders the same class sub-folders",
            validation.class_names.join(", "),
            train.class_names.join(", ")
        );
    }
    Ok((train, validation))
}

/// `lanner train`.
pub fn run(args: TrainArgs) -> Result<ExitCode> {
    let entry = lanner_models::find(&args.arch)?;
    let hyperparameters = args.hyperparameters(entry);
    let Some(model_dir) = args.sm_model_dir.clone() else {
        bail!("no model folder: pass --model-dir DIR (or set SM_MODEL_DIR)");
    };
    if artifact::exists(&model_dir) && !args.overwrite {
        return Err(artifact::ArtifactError::Exists(model_dir).into());
    }
    let (train_folder, validation_folder) = open_data(&args)?;
    let classes = train_folder.class_names.len();
    hyperparameters.validate(classes, entry.keras_layer_map().layer_count())?;
    let recipe = Recipe::for_hyperparameters(&hyperparameters);
    let (device, device_name) = args.device.resolve()?;

    let mut log = KerasLog::new();
    if matches!(args.weights, WeightsSpec::None) && !hyperparameters.from_scratch {
        log.message(
            "warning: --weights none with the transfer-learning recipe trains the head on a \
             random, frozen backbone, which cannot learn much (validation accuracy stays near \
             the majority-class rate); pass --from-scratch to train the whole network, or use \
             pretrained --weights",
        );
    }
    let hub = HubConfig::from_env()?;
    let weights = hub::resolve(entry, &args.weights, &hub)?;
    device.seed(hyperparameters.seed);
    let autodiff = device.clone().autodiff();
    let mut model = Classifier::seeded(
        entry,
        classes,
        hyperparameters.drop_out_percentage,
        hyperparameters.seed,
        &autodiff,
    );
    if let hub::ResolvedWeights::File(path) = &weights {
        model.backbone = entry.load_weights(model.backbone, path)?;
    }

    let workers = args.workers.unwrap_or_else(default_workers).max(1);
    let size = hyperparameters.image_size;
    let loader_config = |augment: bool| LoaderConfig {
        shuffle: augment,
        seed: hyperparameters.seed,
        augmentation: augment
            .then(|| Augmentation::seed_recipe(hyperparameters.random_rotation as f32)),
        workers,
        cache: args.cache,
        strict: args.strict,
        max_pixels: args.max_image_pixels,
        ..LoaderConfig::new(hyperparameters.batch_size, (size, size))
    };
    let class_names = train_folder.class_names.clone();
    let train_loader = Loader::new(train_folder.samples, loader_config(true))?;
    let validation_loader = Loader::new(validation_folder.samples, loader_config(false))?;
    log.message(&format!(
        "Training {} ({}) on {} images of {} classes ({}), validating on {}; device {}",
        entry.name,
        weights_description(&weights),
        train_loader.samples().len(),
        classes,
        class_names.join(", "),
        validation_loader.samples().len(),
        device_name,
    ));

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install the SIGTERM handler")?;
    }
    let metrics_file = args
        .output_data_dir
        .as_ref()
        .map(|dir| dir.join("metrics.jsonl"));
    if let Some(dir) = &args.output_data_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output data folder '{}'", dir.display()))?;
    }
    let mut card = ModelCard::new(
        entry,
        class_names.clone(),
        hyperparameters.clone(),
        recipe.clone(),
    );
    let outcome = train(
        TrainingJob {
            entry,
            hyperparameters,
            recipe,
            class_names: class_names.clone(),
            normalization: card.preprocessing.normalization(),
            train: train_loader,
            validation: validation_loader,
            device,
            model,
            checkpoint_dir: args.checkpoint_dir.clone(),
            metrics_file,
            stop,
        },
        &mut log,
    )?;

    card.epochs_run = outcome.history.len();
    card.best_epoch = outcome.best.clone();
    artifact::save(
        &model_dir,
        &card,
        &outcome.model,
        args.overwrite || outcome.resumed,
    )?;
    if let Some(best) = &outcome.best {
        log.message(&format!(
            "Best epoch {} ({}): val_accuracy: {:.4}, kept.\n{}",
            best.epoch,
            best.phase.as_str(),
            best.validation.accuracy,
            best.validation.confusion.render(&class_names)
        ));
    }
    log.message(&format!("Saved the model to {}", model_dir.display()));
    Ok(ExitCode::SUCCESS)
}

fn weights_description(weights: &hub::ResolvedWeights) -> String {
    match weights {
        hub::ResolvedWeights::Random => "random initialisation".into(),
        hub::ResolvedWeights::File(path) => format!("weights {}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn unknown_options_are_dropped_with_their_value_and_reported() {
        let (kept, warnings) = drop_unknown_options(strings(&[
            "--batch-size",
            "16",
            "--foo",
            "bar",
            "--model_dir",
            "s3://b/m",
            "--flag",
            "--baz=1",
            "--fine-tune-layer",
            "90",
        ]));
        assert_eq!(
            kept,
            strings(&[
                "--batch-size",
                "16",
                "--model_dir",
                "s3://b/m",
                "--fine-tune-layer",
                "90"
            ])
        );
        assert_eq!(
            warnings,
            [
                "warning: ignoring unknown argument `--foo bar` (see `lanner train --help`)",
                "warning: ignoring unknown argument `--flag` (see `lanner train --help`)",
                "warning: ignoring unknown argument `--baz=1` (see `lanner train --help`)",
            ]
        );
    }
}
