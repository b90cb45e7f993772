//! `lanner`: one binary that trains, tunes and serves custom image classifiers.
//!
//! The binary only wires things together: each subcommand lives in [`commands`] and calls
//! into the crate that owns the concern (`lanner-data` for datasets, `lanner-models` for
//! backbones, …).

mod commands;
mod device;

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
    /// Run a training job as SageMaker runs one, here (local mode): channels staged from
    /// folders or S3 into a job folder with the /opt/ml layout, `lanner train` run with the
    /// training toolkit's arguments and SM_* variables, metrics read from its log, and
    /// model.tar.gz / output.tar.gz packed (and uploaded to an S3 --output).
    Fit(Box<commands::fit::FitArgs>),
    /// List, describe and read the logs of the training jobs `lanner fit` ran.
    Jobs(commands::jobs::JobsArgs),
}

fn main() -> ExitCode {
    // In a SageMaker container, a failed `train` also leaves its reason in output/failure.
    let training = std::env::args_os().nth(1).is_some_and(|a| a == "train");
    let result = arguments().and_then(|args| {
        let cli = Cli::try_parse_from(args).unwrap_or_else(|error| {
            if training && error.use_stderr() && commands::train::record_parse_failure(&error) {
                std::process::exit(2);
            }
            error.exit()
        });
        match cli.command {
            Command::Data(args) => commands::data::run(args),
            Command::Models(args) => commands::models::run(args),
            Command::Train(args) => commands::train::run(*args),
            Command::Evaluate(args) => commands::evaluate::run(args),
            Command::Fit(args) => commands::fit::run(*args),
            Command::Jobs(args) => commands::jobs::run(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            let message = format!("{error:#}");
            eprintln!("error: {message}");
            if training {
                commands::train::record_failure(&message);
            }
            ExitCode::FAILURE
        }
    }
}

/// The command line; for `lanner train`, completed from a SageMaker layout and with unknown
/// options dropped (and warned about) as the seed's `parse_known_args` drops them.
fn arguments() -> anyhow::Result<Vec<std::ffi::OsString>> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "train") {
        let rest = args.split_off(2);
        let (kept, messages) = commands::train::prepare_arguments(rest)?;
        for message in messages {
            eprintln!("{message}");
        }
        args.extend(kept);
    }
    Ok(args)
}
