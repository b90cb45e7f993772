//! `lanner fit`: a SageMaker training job, run here (local mode). The job itself is
//! `lanner_sagemaker::fit`; this module turns the command line into its configuration and
//! its outcome into an exit status.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use lanner_sagemaker::fit::{self, FitConfig, OutputLocation};
use lanner_sagemaker::job_name::DEFAULT_BASE;
use lanner_sagemaker::job_record::JobStatus;
use lanner_sagemaker::metrics::MetricDefinition;
use lanner_sagemaker::s3::S3Options;
use lanner_sagemaker::staging::DataSource;
use lanner_sagemaker::toolkit_env::Machine;

#[derive(Args, Debug)]
pub struct FitArgs {
    /// The `train` channel: a folder, or s3://bucket/prefix.
    #[arg(long, value_name = "DIR|S3_URI")]
    pub train: Option<String>,

    /// The `validation` channel: a folder, or s3://bucket/prefix.
    #[arg(long, value_name = "DIR|S3_URI")]
    pub validation: Option<String>,

    /// Another channel, NAME=DIR|S3_URI (repeatable); it is staged under
    /// input/data/NAME and named by SM_CHANNEL_NAME.
    #[arg(long = "channel", value_name = "NAME=URI")]
    pub channels: Vec<String>,

    /// A hyperparameter, NAME=VALUE (repeatable): written to hyperparameters.json and passed
    /// to `lanner train` as --NAME VALUE (see `lanner train --help` for the names).
    #[arg(long = "hyperparameter", short = 'p', value_name = "NAME=VALUE")]
    pub hyperparameters: Vec<String>,

    /// Where jobs go: a folder (the job folder is OUTPUT/JOB-NAME), or s3://bucket/prefix
    /// (model.tar.gz and output.tar.gz are uploaded to s3://bucket/prefix/JOB-NAME/output/;
    /// the job folder is kept under $LANNER_CACHE_DIR/jobs, else
    /// $XDG_CACHE_HOME/lanner/jobs, else ~/.cache/lanner/jobs).
    #[arg(long, default_value = "./lanner-jobs", value_name = "DIR|S3_URI")]
    pub output: String,

    /// The job's exact name (letters, digits, hyphens; at most 63).
    #[arg(long, conflicts_with = "base_job_name")]
    pub job_name: Option<String>,

    /// The job's name is BASE-YYYY-MM-DD-HH-MM-SS-mmm, unique as the SageMaker SDK makes it.
    #[arg(long, default_value = DEFAULT_BASE, value_name = "BASE")]
    pub base_job_name: String,

    /// A metric read from the log, NAME=REGEX with the number in the first group
    /// (repeatable; default: the seed's 'validation accuracy=val_accuracy: ([0-9\.]+)' and
    /// 'train accuracy= accuracy: ([0-9\.]+)').
    #[arg(long = "metric-definition", value_name = "NAME=REGEX")]
    pub metric_definitions: Vec<String>,

    /// The S3 endpoint (MinIO, moto, LocalStack); AWS_ENDPOINT_URL is read too.
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// The AWS region (default: AWS_REGION, then the profile's).
    #[arg(long)]
    pub region: Option<String>,

    /// Keep the job's checkpoints in this folder (the job's checkpoints/ links to it), like
    /// SageMaker's checkpoint_s3_uri: a job that was stopped resumes when the next `fit` is
    /// given the same folder.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
}

/// `NAME=VALUE` split at the first `=`.
fn pair<'a>(option: &str, text: &'a str, example: &str) -> Result<(&'a str, &'a str)> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => Ok((name.trim(), value)),
        _ => bail!("{option} `{text}` is not NAME=VALUE; write e.g. {option} {example}"),
    }
}

/// SageMaker's channel names: `[A-Za-z0-9.\-_]+`.
fn check_channel_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        bail!("`{name}` is not a channel name; use letters, digits, `.`, `-` and `_`");
    }
    Ok(())
}

impl FitArgs {
    fn channels(&self) -> Result<Vec<(String, DataSource)>> {
        let mut channels: Vec<(String, String)> = Vec::new();
        for (name, uri) in [("train", &self.train), ("validation", &self.validation)] {
            if let Some(uri) = uri {
                channels.push((name.to_string(), uri.clone()));
            }
        }
        for text in &self.channels {
            let (name, uri) = pair("--channel", text, "test=data/test")?;
            check_channel_name(name)?;
            if channels.iter().any(|(n, _)| n == name) {
                bail!("the channel `{name}` is given twice; give each channel once");
            }
            channels.push((name.to_string(), uri.to_string()));
        }
        if !channels.iter().any(|(n, _)| n == "train") {
            bail!("no training data: pass --train DIR or --train s3://bucket/prefix");
        }
        channels
            .into_iter()
            .map(|(name, uri)| {
                let source =
                    DataSource::parse(&uri).with_context(|| format!("the {name} channel"))?;
                Ok((name, source))
            })
            .collect()
    }

    fn hyperparameters(&self) -> Result<BTreeMap<String, String>> {
        let mut hyperparameters = BTreeMap::new();
        for text in &self.hyperparameters {
            let (name, value) = pair("--hyperparameter", text, "batch-size=16")?;
            hyperparameters.insert(name.to_string(), value.to_string());
        }
        Ok(hyperparameters)
    }

    fn metric_definitions(&self) -> Result<Vec<MetricDefinition>> {
        if self.metric_definitions.is_empty() {
            return Ok(MetricDefinition::seed_defaults());
        }
        Ok(self
            .metric_definitions
            .iter()
            .map(|text| MetricDefinition::parse(text))
            .collect::<Result<_, _>>()?)
    }
}

/// `lanner fit`.
pub fn run(args: FitArgs) -> Result<ExitCode> {
    let channels = args.channels()?;
    let hyperparameters = args.hyperparameters()?;
    let metric_definitions = args.metric_definitions()?;
    let output = OutputLocation::parse(&args.output)?;
    let program: PathBuf =
        std::env::current_exe().context("cannot find the lanner executable to run")?;
    let stop = fit::stop_on_signals()?;
    let record = fit::run(FitConfig {
        job_name: args.job_name.clone(),
        base_job_name: args.base_job_name.clone(),
        output,
        channels,
        hyperparameters,
        metric_definitions,
        s3: S3Options {
            endpoint_url: args.endpoint_url.clone(),
            region: args.region.clone(),
        },
        program,
        program_args: vec!["train".into()],
        entry_point: "lanner train".into(),
        machine: Machine::this(),
        stop,
        checkpoint_dir: args.checkpoint_dir.clone(),
    })?;
    let name = &record.training_job_name;
    match record.training_job_status {
        JobStatus::Completed => {
            let artifact = record
                .model_artifacts
                .as_ref()
                .map_or("", |a| a.s3_model_artifacts.as_str());
            let mut summary =
                format!("Training job {name} completed.\nModel artifacts: {artifact}\n");
            for metric in &record.final_metric_data_list {
                summary += &format!("{}: {}\n", metric.metric_name, metric.value);
            }
            summary += &format!("Job folder: {}\n", record.local_job_dir);
            // `lanner fit … | head`: the job is done and recorded whether or not anyone reads
            // the summary.
            let _ = std::io::stdout().lock().write_all(summary.as_bytes());
            Ok(ExitCode::SUCCESS)
        }
        JobStatus::Stopped => bail!(
            "training job {name} was stopped; its checkpoint is kept in {} (`lanner jobs \
             describe {name}` shows it)",
            record.checkpoint_config.local_path
        ),
        _ => bail!(
            "training job {name} failed: {}",
            record
                .failure_reason
                .as_deref()
                .unwrap_or("no reason was recorded")
        ),
    }
}
