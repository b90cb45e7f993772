//! `lanner bench`: how fast the recipe's training steps and inference run on this machine's
//! CPU or GPU, with random weights and random pixels (no data set, no downloads).

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use lanner_models::find;
use lanner_models::precision::Precision;
use lanner_train::throughput::{StepKind, Throughput, ThroughputConfig, measure};

use crate::device::DeviceChoice;

/// The steps `--step` can time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StepChoice {
    /// The forward pass, as `predict` and `serve` run it.
    Inference,
    /// Phase 1: the head on a frozen backbone.
    Frozen,
    /// Phase 2: from `--fine-tune-layer` on, BatchNorm frozen.
    FineTune,
    /// Everything trains, BatchNorm in training mode (`--from-scratch`).
    Full,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The backbone (`lanner models` lists them).
    #[arg(long, default_value = "mobilenet_v3_large")]
    pub arch: String,

    /// Input height and width (default: the backbone's pretrained size, 224 or 299).
    #[arg(long)]
    pub image_size: Option<usize>,

    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,

    /// What to time, in this order, in one process (the first one pays the cold start).
    #[arg(long = "step", value_enum, num_args = 1.., default_values_t = [StepChoice::Frozen, StepChoice::FineTune, StepChoice::Full, StepChoice::Inference])]
    pub steps_to_time: Vec<StepChoice>,

    /// The first trainable Keras layer of `--step fine-tune` (the seed's default is 100).
    #[arg(long, default_value_t = 100)]
    pub fine_tune_layer: usize,

    /// Timed steps per kind.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,

    /// Untimed steps after the first one, before timing.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,

    /// Classes of the head (2: the seed's one sigmoid logit).
    #[arg(long, default_value_t = 2)]
    pub classes: usize,

    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,

    /// The float type of the passes: f32, bf16 or f16 (master weights stay f32; on the CPU
    /// only f32 runs the fast folded kernels).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,

    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let entry = find(&args.arch)?;
    if args.batch_size == 0 || args.steps == 0 {
        bail!("--batch-size and --steps must be at least 1");
    }
    if args.classes < 2 {
        bail!("--classes must be at least 2");
    }
    let image_size = args.image_size.unwrap_or(entry.pretrained.input_size);
    if image_size < 32 {
        bail!("--image-size {image_size} is too small; use at least 32");
    }
    let (device, label) = args.device.resolve()?;
    crate::device::choose_fused_layers()?;
    crate::device::choose_copy_stream()?;
    let label = match crate::device::choose_memory_format(&device, args.precision)? {
        Some(format) => format!("{label}, {format}"),
        None => label,
    };
    let config = ThroughputConfig {
        entry,
        classes: args.classes,
        batch_size: args.batch_size,
        image_size,
        warmup: args.warmup,
        steps: args.steps,
        precision: args.precision,
        readback_every: crate::device::readback_every(&device)?,
    };
    if !args.json {
        println!(
            "{} at {image_size}x{image_size}, batch {}, {}, on {label}: {} timed steps after {} warm-up",
            entry.name, args.batch_size, args.precision, args.steps, args.warmup
        );
        println!(
            "{:<22} {:>12} {:>14} {:>12} {:>16}",
            "step", "images/s", "ms/step", "first step", "trainable params"
        );
    }
    for choice in &args.steps_to_time {
        let kind = match choice {
            StepChoice::Inference => StepKind::Inference,
            StepChoice::Frozen => StepKind::Head,
            StepChoice::FineTune => StepKind::FineTune(args.fine_tune_layer),
            StepChoice::Full => StepKind::Full,
        };
        let result = measure(&config, kind, &device)?;
        if args.json {
            println!(
                "{}",
                json_line(&args, entry.name, image_size, &label, kind, &result)
            );
        } else {
            println!(
                "{:<22} {:>12.1} {:>14.1} {:>11.1}s {:>16}",
                kind.label(),
                result.images_per_second,
                1000.0 * median(&result.step_seconds),
                result.first_step_seconds,
                result.trainable_parameters
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn json_line(
    args: &BenchArgs,
    arch: &str,
    image_size: usize,
    device: &str,
    kind: StepKind,
    result: &Throughput,
) -> String {
    serde_json::json!({
        "arch": arch,
        "image_size": image_size,
        "batch_size": args.batch_size,
        "device": device,
        "step": kind.label(),
        "images_per_second": result.images_per_second,
        "median_step_seconds": median(&result.step_seconds),
        "step_seconds": result.step_seconds,
        "first_step_seconds": result.first_step_seconds,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
    })
    .to_string()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}
