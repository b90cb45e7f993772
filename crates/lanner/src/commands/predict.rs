//! `lanner predict`: a trained model's predictions for image files, as a table, CSV or JSON
//! Lines.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use lanner_data::decode::DEFAULT_MAX_PIXELS;
use lanner_data::folder::ignored_files_message;
use lanner_data::loader::default_workers;
use lanner_serve::files::{collect_images, predict_files};
use lanner_serve::{ModelInfo, Predictor};
use serde::Serialize;

use crate::device::{DeviceChoice, check_precision};
use lanner_models::precision::Precision;

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// The model: the --model-dir of `lanner train`, a folder holding it in a sub-folder
    /// (SageMaker's `1/`), or its model.tar.gz; local, or an `s3://` URI.
    #[arg(long)]
    pub model: PathBuf,

    #[command(flatten)]
    pub s3: crate::model_source::S3Args,

    /// Image files, and folders searched recursively for .jpg, .jpeg, .png, .bmp and .gif
    /// files (sorted; hidden files skipped).
    #[arg(required = true, value_name = "FILES|FOLDERS")]
    pub inputs: Vec<PathBuf>,

    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,

    /// `table` (aligned, 4 decimals), `csv` or `jsonl` (full precision). Default: a table on a
    /// terminal, CSV otherwise.
    #[arg(long, value_enum)]
    pub format: Option<OutputFormat>,

    /// Binary models: predict the second class when its probability is at least this.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f32,

    /// Report unreadable images on stderr but still exit 0.
    #[arg(long)]
    pub skip_errors: bool,

    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,

    /// Compute in f32, or in bf16 / f16 on a GPU, or in bf16 on a CPU with Intel AMX (the
    /// weights stay f32; logits are read in f32).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,

    /// Image decoding threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,

    /// Refuse images whose header claims more pixels than this.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
}

/// How rows are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Csv,
    Jsonl,
}

pub fn run(args: PredictArgs) -> Result<ExitCode> {
    if !(0.0..=1.0).contains(&args.threshold) {
        bail!(
            "--threshold must be between 0 and 1 (a probability), got {}",
            args.threshold
        );
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (model_dir, _download) = crate::model_source::open(&args.model, &args.s3)?;
    model_dir.card()?;
    let inputs = collect_images(&args.inputs)?;
    let folders: Vec<String> = args
        .inputs
        .iter()
        .filter(|input| input.is_dir())
        .map(|input| format!("'{}'", input.display()))
        .collect();
    if let Some(message) = ignored_files_message(&folders.join(", "), &inputs.ignored) {
        eprintln!("{message}");
    }
    let images = inputs.images;
    let (device, device_name) = args.device.resolve()?;
    check_precision(args.precision, &device, &device_name)?;
    crate::device::choose_fused_layers()?;
    crate::device::choose_copy_stream()?;
    crate::device::choose_memory_format(&device, args.precision)?;
    let predictor = Predictor::load(&model_dir, device, args.precision)?;
    drop(model_dir);
    let info = predictor.info.clone();
    let format = args.format.unwrap_or(if std::io::stdout().is_terminal() {
        OutputFormat::Table
    } else {
        OutputFormat::Csv
    });
    let paths: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
    let rows = Rows::new(format, &info, &paths, args.threshold);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = 0;
    let mut write_error = rows.header(&mut out).err();
    predict_files(
        &predictor,
        &images,
        args.batch_size,
        args.workers.unwrap_or_else(default_workers),
        args.max_image_pixels,
        |path, result| match result {
            Ok(prediction) => {
                if write_error.is_none()
                    && let Err(e) = rows.row(&mut out, &path.display().to_string(), prediction)
                {
                    write_error = Some(e);
                }
            }
            Err(error) => {
                failed += 1;
                let _ = out.flush();
                let label = if args.skip_errors { "skipped" } else { "error" };
                eprintln!("{label}: {error}");
            }
        },
    );
    if super::reader_left(write_error.map_or_else(|| out.flush(), Err))? {
        return Ok(ExitCode::SUCCESS);
    }
    if failed > 0 && !args.skip_errors {
        bail!(
            "{failed} of {} images could not be predicted (listed above); fix or remove them, or pass --skip-errors",
            images.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes one line per prediction in the chosen format.
struct Rows<'a> {
    format: OutputFormat,
    info: &'a ModelInfo,
    threshold: f32,
    path_width: usize,
    class_width: usize,
}

impl<'a> Rows<'a> {
    fn new(format: OutputFormat, info: &'a ModelInfo, paths: &[String], threshold: f32) -> Self {
        let widest = |items: &mut dyn Iterator<Item = usize>| items.max().unwrap_or(0);
        Self {
            format,
            info,
            threshold,
            path_width: widest(&mut paths.iter().map(|p| p.chars().count())).max(4),
            class_width: widest(&mut info.class_names.iter().map(|c| c.chars().count())).max(5),
        }
    }

    fn header(&self, out: &mut impl Write) -> std::io::Result<()> {
        let names = &self.info.class_names;
        match self.format {
            OutputFormat::Table => {
                write!(
                    out,
                    "{:<pw$}  {:<cw$}",
                    "path",
                    "class",
                    pw = self.path_width,
                    cw = self.class_width
                )?;
                for name in names {
                    write!(out, "  {name:>w$}", w = name.chars().count().max(6))?;
                }
                writeln!(out)
            }
            OutputFormat::Csv => {
                let mut fields = vec!["path".to_string(), "class".to_string()];
                fields.extend(names.iter().map(|n| csv_field(n)));
                writeln!(out, "{}", fields.join(","))
            }
            OutputFormat::Jsonl => Ok(()),
        }
    }

    fn row(&self, out: &mut impl Write, path: &str, prediction: &[f32]) -> std::io::Result<()> {
        let class = &self.info.class_names[self.info.predicted_class(prediction, self.threshold)];
        let probabilities = self.info.class_probabilities(prediction);
        match self.format {
            OutputFormat::Table => {
                write!(
                    out,
                    "{path:<pw$}  {class:<cw$}",
                    pw = self.path_width,
                    cw = self.class_width
                )?;
                for (name, p) in self.info.class_names.iter().zip(&probabilities) {
                    write!(out, "  {p:>w$.4}", w = name.chars().count().max(6))?;
                }
                writeln!(out)
            }
            OutputFormat::Csv => {
                let mut fields = vec![csv_field(path), csv_field(class)];
                fields.extend(probabilities.iter().map(f32::to_string));
                writeln!(out, "{}", fields.join(","))
            }
            OutputFormat::Jsonl => {
                let line = JsonRow {
                    path,
                    class,
                    probabilities: ByClass(&self.info.class_names, &probabilities),
                };
                let line = serde_json::to_string(&line).map_err(std::io::Error::other)?;
                writeln!(out, "{line}")
            }
        }
    }
}

/// One JSON Lines row. Probabilities stay `f32` so they print as CSV prints them (and as
/// `lanner serve` answers), not widened to `f64` digits.
#[derive(Serialize)]
struct JsonRow<'a> {
    path: &'a str,
    class: &'a str,
    probabilities: ByClass<'a>,
}

/// `{"class name": probability, …}` in label order.
struct ByClass<'a>(&'a [String], &'a [f32]);

impl Serialize for ByClass<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().zip(self.1))
    }
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a.jpg"), "a.jpg");
        assert_eq!(csv_field("a,b.jpg"), "\"a,b.jpg\"");
        assert_eq!(csv_field("say \"hi\".png"), "\"say \"\"hi\"\".png\"");
    }
}
