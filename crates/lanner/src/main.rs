//! `lanner`: one binary that trains, tunes and serves custom image classifiers.
//!
//! The binary only wires things together: each subcommand lives in [`commands`] and calls
//! into the crate that owns the concern (`lanner-data` for datasets, `lanner-models` for
//! backbones, …).

mod commands;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(args) => commands::data::run(args),
        Command::Models(args) => commands::models::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
