//! `lanner`: one binary that trains, tunes and serves custom image classifiers.
//!
//! The binary only wires things together: each subcommand lives in [`commands`] and calls
//! into the crate that owns the concern (`lanner-data` for datasets, `lanner-models` for
//! backbones, …).

mod commands;
mod device;
#[cfg(feature = "cuda")]
mod gpu_runtime;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Train, tune and serve custom image classifiers — on a laptop, or on Amazon SageMaker.
#[derive(Parser)]
#[command(name = "lanner", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect a folder of images before training on it: classes, counts, formats, sizes,
    /// and every file that cannot be decoded. `--benchmark` times the training data loader.
    Data(commands::data::DataArgs),
    /// List the backbones Lanner can train: input size, feature channels, parameters, the
    /// Keras layers `--fine-tune-layer` counts in, and the ImageNet weights' hub id.
    Models(commands::models::ModelsArgs),
    /// Train a classifier with the seed's recipe: the head on a frozen pretrained backbone,
    /// then fine-tuning from --fine-tune-layer with early stopping. Takes the seed's
    /// arguments (and SageMaker's SM_* variables); unknown `--name value` pairs are ignored.
    Train(Box<commands::train::TrainArgs>),
    /// Reload a trained model and report its loss, accuracy (and for two classes precision,
    /// recall, ROC AUC) and confusion matrix on a data folder.
    Evaluate(commands::evaluate::EvaluateArgs),
    /// Predict image files and folders with a trained model (a folder or its model.tar.gz):
    /// one row per image with its class and the probability of each class.
    Predict(commands::predict::PredictArgs),
    /// Serve a trained model over HTTP: SageMaker hosting (/ping, /invocations) and TF
    /// Serving's REST API, with dynamic batching. The SageMaker container's `serve` command.
    Serve(Box<commands::serve::ServeArgs>),
    /// Time the recipe's training steps (frozen backbone, fine-tune from a Keras layer, fully
    /// trainable) and inference on this machine's CPU or GPU, with random weights and pixels.
    Bench(commands::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(arguments());
    let result = match cli.command {
        Command::Data(args) => commands::data::run(args),
        Command::Models(args) => commands::models::run(args),
        Command::Train(args) => commands::train::run(*args),
        Command::Evaluate(args) => commands::evaluate::run(args),
        Command::Predict(args) => commands::predict::run(args),
        Command::Serve(args) => commands::serve::run(*args),
        Command::Bench(args) => commands::bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line, with `lanner train`'s unknown options dropped (and warned about) as the
/// seed's `parse_known_args` drops them. Run under the name `train` or `serve` (links on the
/// PATH of a SageMaker container, which runs `IMAGE train` or `IMAGE serve`), the binary is
/// `lanner train` or `lanner serve`.
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = args
        .first()
        .and_then(|program| std::path::Path::new(program).file_name())
        .and_then(|name| name.to_str())
        .filter(|name| matches!(*name, "train" | "serve"))
        .map(std::ffi::OsString::from);
    if let Some(command) = invoked_as {
        args[0] = "lanner".into();
        args.insert(1, command);
    }
    if args.get(1).is_some_and(|a| a == "train") {
        let rest = args.split_off(2);
        let (kept, warnings) = commands::train::drop_unknown_options(rest);
        for warning in warnings {
            eprintln!("{warning}");
        }
        args.extend(kept);
    }
    args
}
