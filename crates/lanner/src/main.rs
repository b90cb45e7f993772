//! `lanner`: one binary that trains, tunes and serves custom image classifiers.
//!
//! The binary only wires things together: each subcommand lives in [`commands`] and calls
//! into the crate that owns the concern (`lanner-data` for datasets, `lanner-models` for
//! backbones, …).

mod allocator;
mod commands;
mod device;
#[cfg(feature = "cuda-base")]
mod gpu_runtime;
mod model_source;
#[cfg(feature = "torch")]
mod torch_runtime;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lanner_models::worker_threads::run_on_worker;

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
    /// Run a training job as SageMaker runs one, here (local mode): channels staged from
    /// folders or S3 into a job folder with the /opt/ml layout, `lanner train` run with the
    /// training toolkit's arguments and SM_* variables, metrics read from its log, and
    /// model.tar.gz / output.tar.gz packed (and uploaded to an S3 --output).
    Fit(Box<commands::fit::FitArgs>),
    /// List, describe and read the logs of the training jobs `lanner fit` ran.
    Jobs(commands::jobs::JobsArgs),
}

fn main() -> ExitCode {
    allocator::keep_freed_memory();
    let args = invoked_command(std::env::args_os().collect());
    // In a SageMaker container, a failed `train` also leaves its reason in output/failure.
    let training = args.get(1).is_some_and(|a| a == "train");
    let result = arguments(args).and_then(|args| {
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
            Command::Evaluate(args) => run_on_worker(|| commands::evaluate::run(args)),
            Command::Predict(args) => run_on_worker(|| commands::predict::run(args)),
            Command::Serve(args) => commands::serve::run(*args),
            Command::Fit(args) => commands::fit::run(*args),
            Command::Jobs(args) => commands::jobs::run(args),
            Command::Bench(args) => run_on_worker(|| commands::bench::run(args)),
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            let message = one_sentence(&error);
            eprintln!("error: {message}");
            if training {
                commands::train::record_failure(&message);
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, joined with ": " as `{error:#}` does, leaving out a cause that
/// the text before it already says (an error whose message quotes its own source).
fn one_sentence(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// Run under the name `train` or `serve` (links on the PATH of a SageMaker container, which
/// runs `IMAGE train` or `IMAGE serve`), the binary is `lanner train` or `lanner serve`.
fn invoked_command(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
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
    args
}

/// The command line; for `lanner train`, completed from a SageMaker layout and with unknown
/// options dropped (and warned about) as the seed's `parse_known_args` drops them.
fn arguments(mut args: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
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

#[cfg(test)]
mod tests {
    use super::one_sentence;

    /// An error that says its source in its own message, as `thiserror`'s `{source}` does.
    #[derive(Debug)]
    struct QuotesItsSource {
        source: std::io::Error,
    }

    impl std::fmt::Display for QuotesItsSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot write '/m': {}", self.source)
        }
    }

    impl std::error::Error for QuotesItsSource {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_the_message_already_quotes_is_not_repeated() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let quoted = anyhow::Error::new(QuotesItsSource { source: io() });
        assert_eq!(
            format!("{quoted:#}"),
            "cannot write '/m': no such file: no such file"
        );
        assert_eq!(one_sentence(&quoted), "cannot write '/m': no such file");
        let context = anyhow::Error::new(io()).context("cannot create the folder '/m'");
        assert_eq!(
            one_sentence(&context),
            "cannot create the folder '/m': no such file"
        );
    }
}
