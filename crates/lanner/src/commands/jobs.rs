//! `lanner jobs list|describe|logs`: the training jobs `lanner fit` ran, read from the
//! records their folders keep (`job.json`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lanner_sagemaker::fit::OutputLocation;
use lanner_sagemaker::job_record::JobRecord;
use lanner_sagemaker::jobs;
use lanner_sagemaker::time::parse_iso;

#[derive(Args, Debug)]
pub struct JobsArgs {
    #[command(subcommand)]
    command: JobsCommand,
}

#[derive(Subcommand, Debug)]
enum JobsCommand {
    /// The jobs, newest first: name, status, creation time, duration, final metrics.
    List(ListArgs),
    /// One job: status, times, hyperparameters, channels, final metrics, artifacts and
    /// failure reason.
    Describe(DescribeArgs),
    /// One job's training log.
    Logs(LogsArgs),
}

/// Where the jobs are: the `--output` the jobs were run with.
#[derive(Args, Debug)]
struct Location {
    /// The --output of `lanner fit`: a folder, or the s3:// URI (its jobs are in the local
    /// cache).
    #[arg(long, default_value = "./lanner-jobs", value_name = "DIR|S3_URI")]
    output: String,
}

impl Location {
    fn jobs_dir(&self) -> Result<PathBuf> {
        Ok(OutputLocation::parse(&self.output)?.jobs_dir())
    }
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    location: Location,
    /// Print the records as a JSON list.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DescribeArgs {
    /// The job's name.
    name: String,
    #[command(flatten)]
    location: Location,
    /// Print the record (job.json) as it is.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct LogsArgs {
    /// The job's name.
    name: String,
    #[command(flatten)]
    location: Location,
}

/// `lanner jobs`.
pub fn run(args: JobsArgs) -> Result<ExitCode> {
    match args.command {
        JobsCommand::List(args) => list(args),
        JobsCommand::Describe(args) => describe(args),
        JobsCommand::Logs(args) => logs(args),
    }
}

fn list(args: ListArgs) -> Result<ExitCode> {
    let dir = args.location.jobs_dir()?;
    let records = jobs::list(&dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(ExitCode::SUCCESS);
    }
    if records.is_empty() {
        println!("No training jobs in {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let width = records
        .iter()
        .map(|r| r.training_job_name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<10}  {:<24}  {:>9}  final metrics",
        "name", "status", "created", "duration"
    );
    for record in &records {
        println!(
            "{:<width$}  {:<10}  {:<24}  {:>9}  {}",
            record.training_job_name,
            record.training_job_status.to_string(),
            record.creation_time,
            duration(record).unwrap_or_else(|| "-".into()),
            final_metrics(record)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(args: DescribeArgs) -> Result<ExitCode> {
    let (folder, record) = jobs::find(&args.location.jobs_dir()?, &args.name)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
        return Ok(ExitCode::SUCCESS);
    }
    let field = |name: &str, value: &str| println!("{:<18} {value}", format!("{name}:"));
    field("Training job", &record.training_job_name);
    field(
        "Status",
        &format!(
            "{} ({})",
            record.training_job_status, record.secondary_status
        ),
    );
    if let Some(reason) = &record.failure_reason {
        field("Failure reason", reason);
    }
    field("Created", &record.creation_time);
    if let Some(start) = &record.training_start_time {
        field("Training start", start);
    }
    if let Some(end) = &record.training_end_time {
        field("Training end", end);
    }
    if let Some(duration) = duration(&record) {
        field("Duration", &duration);
    }
    let hyperparameters: Vec<String> = record
        .hyper_parameters
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    field("Hyperparameters", &hyperparameters.join(" "));
    for channel in &record.input_data_config {
        field(&format!("Channel {}", channel.channel_name), channel.uri());
    }
    field("Output", &record.output_data_config.s3_output_path);
    if let Some(artifacts) = &record.model_artifacts {
        field("Model artifacts", &artifacts.s3_model_artifacts);
    }
    for metric in &record.final_metric_data_list {
        field(
            &metric.metric_name,
            &format!("{} (at {})", metric.value, metric.timestamp),
        );
    }
    field("Checkpoints", &record.checkpoint_config.local_path);
    field("Job folder", &record.local_job_dir);
    field("Log", &folder.log_file().display().to_string());
    Ok(ExitCode::SUCCESS)
}

fn logs(args: LogsArgs) -> Result<ExitCode> {
    let (folder, _) = jobs::find(&args.location.jobs_dir()?, &args.name)?;
    let path = folder.log_file();
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "job {} has no log yet ('{}'); its training program has not started",
            args.name,
            path.display()
        )
    })?;
    super::reader_left(std::io::stdout().lock().write_all(text.as_bytes()))?;
    Ok(ExitCode::SUCCESS)
}

/// From the start of training to its end (or to the last update, while it runs).
fn duration(record: &JobRecord) -> Option<String> {
    let start = parse_iso(record.training_start_time.as_deref()?)?;
    let end = record
        .training_end_time
        .as_deref()
        .or(Some(record.last_modified_time.as_str()))
        .and_then(parse_iso)?;
    let seconds = (end - start).num_milliseconds() as f64 / 1000.0;
    Some(format!("{seconds:.1} s"))
}

fn final_metrics(record: &JobRecord) -> String {
    record
        .final_metric_data_list
        .iter()
        .map(|m| format!("{}={}", m.metric_name, m.value))
        .collect::<Vec<_>>()
        .join(", ")
}
