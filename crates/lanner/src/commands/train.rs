//! `lanner train`: the seed's training script — its argument names and defaults, its
//! SageMaker environment fallbacks — running Lanner's recipe on the CPU or a GPU.
//!
//! In a SageMaker training container (`/opt/ml`, or `$SAGEMAKER_BASE_DIR`, holds
//! `input/config/`) it also honours the container contract (`lanner_sagemaker::contract`):
//! run with no data arguments, it takes its hyperparameters, channels and folders from the
//! layout; in either style a `checkpoints/` folder turns on checkpoints, `SM_NUM_GPUS` and
//! `SM_NUM_CPUS` guide the device and the loader, and any error is also written to
//! `output/failure`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use clap::Args;
use lanner_data::decode::DEFAULT_MAX_PIXELS;
use lanner_data::loader::default_workers;
use lanner_data::memory::{self, CacheRequest};
use lanner_data::{Augmentation, ImageFolder, Loader, LoaderConfig, Subset, ValidationSplit};
use lanner_models::hub::{self, HubConfig, WeightsSpec};
use lanner_models::precision::Precision;
use lanner_models::worker_threads::run_on_worker;
use lanner_sagemaker::contract::{Layout, ResourceHints, failure, hyperparameters_file};
use lanner_train::artifact::{self, ModelCard};
use lanner_train::classifier::Classifier;
use lanner_train::initialisation::Initialisation;
use lanner_train::report::{KerasLog, Reporter};
use lanner_train::step_memory::{self, StepShape, Verdict};
use lanner_train::{Hyperparameters, Recipe, TrainingJob, train};

use crate::device::{DeviceChoice, GPU_BUILD, TrainingDevices, check_precision};

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

    /// How the backbone starts with --weights none: keras (Glorot-uniform kernels and
    /// BatchNorm epsilon 1e-3, as Keras' applications) or timm (normal kernels of variance
    /// 2 / fan-out, epsilon 1e-5).
    #[arg(long, default_value = "keras", value_name = "keras|timm")]
    pub init: Initialisation,

    /// Seed of the shuffles, augmentations, dropout and initialisation.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,

    /// GPUs to train on, data-parallel, from the chosen one on (default: every GPU the driver
    /// shows with --device auto, one with --device cuda:N).
    #[arg(long)]
    pub gpus: Option<usize>,

    /// The float type of the training passes: f32 (the default), or bf16 / f16 on a GPU
    /// (master weights, optimizer state and loss stay f32). On a CPU with Intel AMX, bf16 runs
    /// the dense and 1x1 convolutions' products on its tiles (not with --from-scratch).
    #[arg(long)]
    pub precision: Option<Precision>,

    /// Image decoding threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,

    /// Keep the resized images in memory after the first epoch, up to half the memory
    /// available (default: when they take at most 1 GB and a quarter of it).
    #[arg(long, overrides_with = "no_cache")]
    pub cache: bool,

    /// Decode every image every epoch, even when the cache would fit.
    #[arg(long, overrides_with = "cache")]
    pub no_cache: bool,

    /// Stop on an undecodable image instead of skipping it.
    #[arg(long)]
    pub strict: bool,

    /// Refuse images whose header claims more pixels than this.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
}

/// A long option of `lanner train`, as clap knows it.
struct KnownOption {
    long: String,
    aliases: Vec<String>,
    /// `false` for plain flags (`--cache`, `--overwrite`).
    takes_value: bool,
}

fn known_options() -> Vec<KnownOption> {
    let command = TrainArgs::augment_args(clap::Command::new("train"));
    let mut options: Vec<KnownOption> = command
        .get_arguments()
        .filter_map(|a| {
            Some(KnownOption {
                long: a.get_long()?.to_string(),
                aliases: a
                    .get_all_aliases()
                    .into_iter()
                    .flatten()
                    .map(str::to_string)
                    .collect(),
                takes_value: a.get_action().takes_values(),
            })
        })
        .collect();
    options.push(KnownOption {
        long: "help".into(),
        aliases: Vec::new(),
        takes_value: false,
    });
    options
}

/// The option `name` (a long name or an alias; `fine_tune_layer` for `fine-tune-layer`).
fn find_option<'a>(options: &'a [KnownOption], name: &str) -> Option<&'a KnownOption> {
    let matches = |name: &str| {
        options
            .iter()
            .find(|o| o.long == name || o.aliases.iter().any(|a| a == name))
    };
    matches(name).or_else(|| matches(&name.replace('_', "-")))
}

/// `--name` or `--name=value` split into the name and the inline value; `None` for anything
/// that is not a long option.
fn split_long_option(text: &str) -> Option<(&str, Option<&str>)> {
    let option = text.strip_prefix("--")?;
    Some(match option.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (option, None),
    })
}

/// The arguments as clap takes them: `--name_with_underscores` (the SageMaker SDK's usual
/// spelling) becomes `--name-with-underscores`, and a plain flag followed by `true`/`false`
/// (`--cache True`, as the training toolkit passes a boolean) becomes the flag, or for `false`
/// its `--no-` form where there is one (`--no-cache`), else nothing.
fn normalize(args: Vec<OsString>, options: &[KnownOption]) -> Vec<OsString> {
    let mut normalized = Vec::new();
    let mut iter = args.into_iter().peekable();
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy().into_owned();
        let Some((name, inline_value)) = split_long_option(&text) else {
            normalized.push(arg);
            continue;
        };
        let inline_value = inline_value.map(str::to_string);
        let Some(known) = find_option(options, name) else {
            normalized.push(arg);
            continue;
        };
        let name = if known.long == name || known.aliases.iter().any(|a| a == name) {
            name.to_string()
        } else {
            known.long.clone()
        };
        let boolean = |value: &str| match value.to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        };
        if known.takes_value {
            match inline_value {
                Some(value) => {
                    let value = boolean(&value).map_or(value, |b| b.to_string());
                    normalized.push(format!("--{name}={value}").into());
                }
                None => {
                    normalized.push(format!("--{name}").into());
                    if let Some(value) = iter
                        .peek()
                        .and_then(|next| boolean(&next.to_string_lossy()))
                    {
                        iter.next();
                        normalized.push(value.to_string().into());
                    }
                }
            }
            continue;
        }
        let value = match inline_value {
            Some(value) => boolean(&value),
            None => match iter
                .peek()
                .and_then(|next| boolean(&next.to_string_lossy()))
            {
                Some(value) => {
                    iter.next();
                    Some(value)
                }
                None => None,
            },
        };
        match value {
            Some(false) => {
                // `--cache False` asks for the opposite flag where there is one (`--no-cache`).
                let negated = format!("no-{}", known.long);
                if find_option(options, &negated).is_some() {
                    normalized.push(format!("--{negated}").into());
                }
            }
            _ => normalized.push(format!("--{name}").into()),
        }
    }
    normalized
}

/// The long names (not aliases) of the options `args` gives.
fn given_options(args: &[OsString], options: &[KnownOption]) -> Vec<String> {
    args.iter()
        .filter_map(|arg| {
            let text = arg.to_string_lossy();
            let name = text.strip_prefix("--")?.split('=').next()?.to_string();
            find_option(options, &name).map(|o| o.long.clone())
        })
        .collect()
}

/// The arguments of `lanner train` as it runs them: normalized (see [`normalize`]), completed
/// from the SageMaker layout when it runs in one (see [`container_arguments`]), and with
/// unknown options dropped. Returns them with the notes and warnings to print. `args` starts
/// after the subcommand name.
pub fn prepare_arguments(args: Vec<OsString>) -> Result<(Vec<OsString>, Vec<String>)> {
    let options = known_options();
    let mut args = normalize(args, &options);
    let mut messages = Vec::new();
    if let Some(layout) = Layout::detect() {
        let (filled, notes) = container_arguments(&layout, &args, &options)?;
        messages.extend(notes);
        args = filled.into_iter().chain(args).collect();
    }
    let (kept, warnings) = drop_unknown_options(args, &options);
    messages.extend(warnings);
    Ok((kept, messages))
}

/// In a SageMaker layout, the arguments the command line and the `SM_*` variables leave out
/// (precedence: command line, then `SM_*`, then the layout's files). With no `--train` and
/// no `SM_CHANNEL_TRAIN` (a bring-your-own container run as `train`), the hyperparameters
/// come from `hyperparameters.json` (overridden by `SM_HPS`) and the channels and folders
/// from the layout; in either style a `checkpoints/` folder becomes `--checkpoint-dir`.
fn container_arguments(
    layout: &Layout,
    args: &[OsString],
    options: &[KnownOption],
) -> Result<(Vec<OsString>, Vec<String>)> {
    let config = layout.read()?;
    config.check(layout)?;
    let mut notes = vec![format!(
        "SageMaker training container in {}: {}",
        layout.base().display(),
        config.resource_config.describe()
    )];
    let given = given_options(args, options);
    let is_given = |long: &str| given.iter().any(|g| g == long);
    let env_set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let mut filled: Vec<OsString> = Vec::new();
    let mut fill = |long: &str, env: &str, value: PathBuf| {
        if !is_given(long) && !env_set(env) {
            filled.push(format!("--{long}={}", value.display()).into());
        }
    };
    let files_style = !is_given("train") && !env_set("SM_CHANNEL_TRAIN");
    if files_style {
        if !config.input_data_config.contains_key("train") {
            let channels: Vec<&str> = config
                .input_data_config
                .keys()
                .map(String::as_str)
                .collect();
            bail!(
                "the SageMaker job has no `train` channel (its channels: {}); name the \
                 training data's channel `train`",
                if channels.is_empty() {
                    "none".to_string()
                } else {
                    channels.join(", ")
                }
            );
        }
        fill("train", "SM_CHANNEL_TRAIN", layout.channel_dir("train"));
        if config.input_data_config.contains_key("validation") {
            fill(
                "validation",
                "SM_CHANNEL_VALIDATION",
                layout.channel_dir("validation"),
            );
        }
        fill("sm-model-dir", "SM_MODEL_DIR", layout.model_dir());
        fill(
            "output-data-dir",
            "SM_OUTPUT_DATA_DIR",
            layout.output_data_dir(),
        );
        let mut hyperparameters: BTreeMap<String, String> = config.hyperparameters.clone();
        if let Ok(text) = std::env::var("SM_HPS") {
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("SM_HPS is not JSON ({e}); unset it or fix it"))?;
            let overrides = hyperparameters_file::parse_value(&value)
                .map_err(|problem| anyhow::anyhow!("SM_HPS: {problem}"))?;
            hyperparameters.extend(overrides);
        }
        for (name, value) in &hyperparameters {
            match find_option(options, name) {
                Some(known) if is_given(&known.long) => {}
                Some(known) if !known.takes_value => match value.to_ascii_lowercase().as_str() {
                    "true" => filled.push(format!("--{}", known.long).into()),
                    "false" => {}
                    _ => bail!(
                        "hyperparameter `{name}` is a switch: set it to \"true\" or \"false\", \
                         not \"{value}\""
                    ),
                },
                Some(known) => filled.push(format!("--{}={value}", known.long).into()),
                // Dropped with a warning below, as on the command line.
                None => filled.push(format!("--{name}={value}").into()),
            }
        }
        notes.push(format!(
            "Hyperparameters from {}, channels from {}",
            layout.hyperparameters_file().display(),
            layout.data_dir().display()
        ));
    }
    if !is_given("checkpoint-dir") && layout.checkpoints_dir().is_dir() {
        filled.push(format!("--checkpoint-dir={}", layout.checkpoints_dir().display()).into());
    }
    Ok((filled, notes))
}

/// In a SageMaker layout, writes `message` to `output/failure` (SageMaker shows it as the
/// job's failure reason).
pub fn record_failure(message: &str) {
    let Some(layout) = Layout::detect() else {
        return;
    };
    if let Err(error) = failure::write(&layout, message) {
        eprintln!(
            "warning: cannot write the failure reason to {}: {error}",
            layout.failure_file().display()
        );
    }
}

/// In a SageMaker layout, an argument clap refused is reported as one sentence (clap's first
/// line) on stderr and in `output/failure`; returns whether it was (else clap reports it).
pub fn record_parse_failure(error: &clap::Error) -> bool {
    if Layout::detect().is_none() {
        return false;
    }
    let rendered = error.render().to_string();
    let first = rendered.lines().next().unwrap_or_default();
    let sentence = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("error: {sentence}");
    record_failure(sentence);
    true
}

/// The arguments of `lanner train` with unknown `--name [value]` options removed, and a
/// warning for each. `args` starts after the subcommand name.
fn drop_unknown_options(
    args: Vec<OsString>,
    options: &[KnownOption],
) -> (Vec<OsString>, Vec<String>) {
    let mut kept = Vec::new();
    let mut warnings = Vec::new();
    let mut iter = args.into_iter().peekable();
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy().into_owned();
        let Some((name, inline_value)) = split_long_option(&text) else {
            kept.push(arg);
            continue;
        };
        let known = options
            .iter()
            .any(|o| o.long == name || o.aliases.iter().any(|a| a == name));
        if name.is_empty() || known {
            kept.push(arg);
            continue;
        }
        let mut dropped = text.clone();
        if inline_value.is_none()
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
            init: self.init,
            seed: self.seed,
            precision: self.precision.unwrap_or_default(),
        }
    }
}

/// Fails before training, not after it, when `dir` cannot be written: creates it (with any
/// missing parents), writes and removes a probe file, then removes the folders it created.
fn check_writable(dir: &Path, what: &str, option: &str) -> Result<()> {
    let mut created = Vec::new();
    let mut missing = Some(dir);
    while let Some(folder) = missing.filter(|f| !f.as_os_str().is_empty() && !f.exists()) {
        created.push(folder.to_path_buf());
        missing = folder.parent();
    }
    let probe = dir.join(".lanner-write-check");
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b""))
        .and_then(|()| std::fs::remove_file(&probe));
    // Deepest first, so each is empty when its turn comes.
    for folder in &created {
        let _ = std::fs::remove_dir(folder);
    }
    written.map_err(|e| {
        anyhow::anyhow!(
            "cannot write {what} to '{}': {e}; pass a {option} in a folder you may write to",
            dir.display()
        )
    })
}

/// What each data folder holds that is not read (once per folder: a validation split shares
/// the training folder).
fn ignored_files_messages(train: &ImageFolder, validation: &ImageFolder) -> Vec<String> {
    let mut messages: Vec<String> = train.ignored_message().into_iter().collect();
    if validation.root != train.root {
        messages.extend(validation.ignored_message());
    }
    messages
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
    // SageMaker says how many GPUs and cores the instance has.
    let hints = ResourceHints::from_env();
    let device_choice = match (args.device, hints.num_gpus) {
        (DeviceChoice::Auto, Some(0)) => DeviceChoice::Cpu,
        (DeviceChoice::Auto, Some(_)) if GPU_BUILD => DeviceChoice::Cuda(0),
        (choice, _) => choice,
    };
    // On SageMaker, `auto` means the instance's GPUs: all of them.
    let gpus = args.gpus.or(match (args.device, hints.num_gpus) {
        (DeviceChoice::Auto, Some(n)) if n > 0 && GPU_BUILD => Some(n),
        _ => None,
    });
    let TrainingDevices {
        mut devices,
        name: device_name,
    } = device_choice.resolve_for_training(gpus)?;
    let device = devices.remove(0);
    let precision = hyperparameters.precision;
    check_precision(precision, &device, &device_name)?;
    if hyperparameters.from_scratch
        && precision == Precision::Bf16
        && lanner_models::frozen::is_cpu(&device)
    {
        bail!(
            "--precision bf16 on the {device_name} runs the folded kernels, which keep BatchNorm's \
             statistics frozen, and --from-scratch updates them: leave --precision out, or train \
             on a GPU"
        );
    }
    crate::device::choose_fused_layers()?;
    crate::device::choose_copy_stream()?;
    let readback_every = crate::device::readback_every(&device)?;
    let device_name = match crate::device::choose_memory_format(&device, precision)? {
        Some(format) => format!("{device_name}, {format}"),
        None => device_name,
    };

    let mut log = KerasLog::new();
    if matches!(args.weights, WeightsSpec::None) && !hyperparameters.from_scratch {
        log.message(
            "warning: --weights none with the transfer-learning recipe trains the head on a \
             random, frozen backbone, which cannot learn much (validation accuracy stays near \
             the majority-class rate); pass --from-scratch to train the whole network, or use \
             pretrained --weights",
        );
    }
    let amx = lanner_models::frozen::is_cpu(&device) && lanner_models::frozen::cpu_bf16().is_some();
    if args.precision.is_none() && amx && !hyperparameters.from_scratch {
        log.message(
            "note: this CPU has Intel AMX; --precision bf16 would run the convolutions' products \
             on its tiles (bf16 operands, f32 sums and master weights), typically 1.3-2.5x the \
             images/s of f32",
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
    model.backbone = match &weights {
        hub::ResolvedWeights::File(path) => {
            let backbone = entry.load_weights(model.backbone, path)?;
            // A Lanner model's backbone normalises with the epsilon it was trained with
            // (Keras' 1e-3 after `--init keras`), which its weights alone do not say.
            match artifact::card_beside(path)? {
                Some(card) if card.batch_norm_epsilon != backbone.batch_norm_epsilon() => {
                    log.message(&format!(
                        "BatchNorm epsilon {} as in {} (the model these weights come from)",
                        card.batch_norm_epsilon,
                        path.with_file_name(artifact::CARD_FILE).display()
                    ));
                    backbone.with_batch_norm_epsilon(card.batch_norm_epsilon)
                }
                _ => backbone,
            }
        }
        hub::ResolvedWeights::Random => hyperparameters
            .init
            .apply(model.backbone, hyperparameters.seed),
    };

    let workers = args
        .workers
        .or(hints.num_cpus)
        .unwrap_or_else(default_workers)
        .max(1);
    let size = hyperparameters.image_size;
    if lanner_models::frozen::is_cpu(&device) {
        let shape = StepShape {
            entry,
            batch_size: hyperparameters.batch_size,
            image_size: size,
            parameters: burn::module::Module::num_params(&model),
            loader_batches: workers + lanner_data::loader::DEFAULT_PREFETCH,
        };
        match step_memory::check(&shape, &recipe, memory::available_bytes()) {
            Verdict::Fits => {}
            Verdict::Warn(warning) => log.message(&warning),
            Verdict::Refuse(sentence) => bail!(sentence),
        }
    }
    let images = train_folder.samples.len() + validation_folder.samples.len();
    let request = match (args.cache, args.no_cache) {
        (true, _) => CacheRequest::Always,
        (_, true) => CacheRequest::Never,
        _ => CacheRequest::Auto,
    };
    let memory::CacheDecision {
        cache,
        message: cache_message,
    } = memory::decide_cache(request, images, (size, size), memory::available_bytes());
    let loader_config = |augment: bool| LoaderConfig {
        shuffle: augment,
        seed: hyperparameters.seed,
        augmentation: augment
            .then(|| Augmentation::seed_recipe(hyperparameters.random_rotation as f32)),
        workers,
        cache,
        strict: args.strict,
        max_pixels: args.max_image_pixels,
        ..LoaderConfig::new(hyperparameters.batch_size, (size, size))
    };
    let class_names = train_folder.class_names.clone();
    let ignored = ignored_files_messages(&train_folder, &validation_folder);
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
    if let Some(message) = &cache_message {
        log.message(message);
    }
    for message in &ignored {
        log.message(message);
    }

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
    check_writable(&model_dir, "the model", "--model-dir")?;
    if let Some(dir) = &args.checkpoint_dir {
        check_writable(dir, "checkpoints", "--checkpoint-dir")?;
    }
    let mut card = ModelCard::new(
        entry,
        class_names.clone(),
        hyperparameters.clone(),
        recipe.clone(),
    );
    let job = TrainingJob {
        entry,
        hyperparameters,
        recipe,
        class_names: class_names.clone(),
        normalization: card.preprocessing.normalization(),
        train: train_loader,
        validation: validation_loader,
        device,
        replica_devices: devices,
        precision,
        model,
        checkpoint_dir: args.checkpoint_dir.clone(),
        metrics_file,
        stop,
        readback_every,
    };
    // One device: the steps' operations split on rayon's workers without a hand-off each.
    // Data-parallel replica threads queue their operations on those workers, so the trainer,
    // which waits for them, must not hold one.
    let outcome = if job.replica_devices.is_empty() {
        run_on_worker(|| train(job, &mut log))
    } else {
        train(job, &mut log)
    }?;

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
    fn sagemaker_spellings_become_the_options_clap_knows() {
        let options = known_options();
        let normalized = normalize(
            strings(&[
                "--batch_size",
                "16",
                "--cache",
                "True",
                "--strict=false",
                "--from_scratch",
                "False",
                "--model_dir",
                "s3://b/m",
                "--model-dir",
                "out",
                "--unknown_name",
                "1",
            ]),
            &options,
        );
        assert_eq!(
            normalized,
            strings(&[
                "--batch-size",
                "16",
                "--cache",
                "--from-scratch",
                "false",
                "--model_dir",
                "s3://b/m",
                "--model-dir",
                "out",
                "--unknown_name",
                "1",
            ])
        );
        assert_eq!(
            given_options(&normalized, &options),
            [
                "batch-size",
                "cache",
                "from-scratch",
                "model_dir",
                "sm-model-dir",
            ]
        );
    }

    #[test]
    fn a_false_flag_becomes_its_no_form_where_there_is_one() {
        let options = known_options();
        let normalized = normalize(
            strings(&[
                "--cache",
                "False",
                "--overwrite=false",
                "--no_cache",
                "true",
            ]),
            &options,
        );
        assert_eq!(normalized, strings(&["--no-cache", "--no-cache"]));
        let normalized = normalize(strings(&["--cache=false", "--cache", "true"]), &options);
        assert_eq!(normalized, strings(&["--no-cache", "--cache"]));
    }

    #[test]
    fn unknown_options_are_dropped_with_their_value_and_reported() {
        let (kept, warnings) = drop_unknown_options(
            strings(&[
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
            ]),
            &known_options(),
        );
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
