//! `lanner fit` in local mode: one SageMaker training job on this machine.
//!
//! The steps and the job record's `SecondaryStatus` at each: **Starting** (the job folder,
//! the three configuration files), **Downloading** (each channel staged into
//! `input/data/<channel>/`), **Training** (the training program with the toolkit's
//! arguments and `SM_*` variables; its log streamed and read for metrics), **Uploading**
//! (`model.tar.gz`, `output.tar.gz`, and to S3 when the output is an S3 URI), then
//! **Completed**, **Failed** (with the reason the program left in `output/failure`) or
//! **Stopped** (SIGINT/SIGTERM: the program is asked to stop and keeps its checkpoint).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};

use crate::archive;
use crate::child::{self, ChildSpec};
use crate::contract::{ChannelConfig, InputDataConfig, ResourceConfig, failure};
use crate::job_folder::JobFolder;
use crate::job_name;
use crate::job_record::{
    AlgorithmSpecification, Channel, CheckpointConfig, JobRecord, JobResourceConfig, JobStatus,
    ModelArtifacts, OutputDataConfig,
};
use crate::metrics::{MetricDefinition, MetricLog};
use crate::s3::{S3Options, S3Uri};
use crate::staging::{DataSource, Stager};
use crate::time::{iso, now};
use crate::toolkit_env::{Machine, TrainingEnv, user_args};

/// Where a job's artifacts go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputLocation {
    /// A local folder: the job folder is `<folder>/<job-name>/`.
    Local(PathBuf),
    /// An S3 prefix: artifacts go to `<prefix>/<job-name>/output/`; the job folder lives in
    /// the local cache ([`cache_jobs_dir`]).
    S3(S3Uri),
}

impl OutputLocation {
    /// `s3://bucket/prefix` or a folder.
    pub fn parse(text: &str) -> Result<Self> {
        if S3Uri::is_s3(text) {
            Ok(Self::S3(S3Uri::parse(text)?))
        } else {
            Ok(Self::Local(PathBuf::from(text)))
        }
    }

    /// The folder holding this location's job folders on this machine.
    pub fn jobs_dir(&self) -> PathBuf {
        match self {
            Self::Local(dir) => dir.clone(),
            Self::S3(_) => cache_jobs_dir(),
        }
    }

    /// `OutputDataConfig.S3OutputPath`.
    fn uri(&self) -> String {
        match self {
            Self::Local(dir) => DataSource::Local(dir.clone()).uri(),
            Self::S3(uri) => uri.to_string(),
        }
    }
}

/// Where jobs with an S3 output keep their local folder: `$LANNER_CACHE_DIR/jobs`, else
/// `$XDG_CACHE_HOME/lanner/jobs`, else `~/.cache/lanner/jobs`.
pub fn cache_jobs_dir() -> PathBuf {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let cache = if let Some(dir) = non_empty("LANNER_CACHE_DIR") {
        PathBuf::from(dir)
    } else if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        PathBuf::from(dir).join("lanner")
    } else if let Some(home) = non_empty("HOME") {
        PathBuf::from(home).join(".cache/lanner")
    } else {
        PathBuf::from(".lanner-cache")
    };
    cache.join("jobs")
}

/// Everything a local training job needs.
pub struct FitConfig {
    /// The exact name, or `None` for `<base_job_name>-<timestamp>`.
    pub job_name: Option<String>,
    pub base_job_name: String,
    pub output: OutputLocation,
    /// Channels in the order given.
    pub channels: Vec<(String, DataSource)>,
    pub hyperparameters: BTreeMap<String, String>,
    pub metric_definitions: Vec<MetricDefinition>,
    pub s3: S3Options,
    /// The training program and the arguments before the hyperparameters (`lanner`,
    /// `["train"]`).
    pub program: PathBuf,
    pub program_args: Vec<String>,
    /// How logs and the record name the program.
    pub entry_point: String,
    pub machine: Machine,
    /// Set by a signal handler to stop the job.
    pub stop: Arc<AtomicBool>,
    /// A folder outside the job that holds its checkpoints (SageMaker's `checkpoint_s3_uri`,
    /// here on this machine): a job stopped with it is resumed by the next job given it.
    pub checkpoint_dir: Option<PathBuf>,
}

/// Runs the job to its end and returns its final record. An error means the job could not
/// be created (a bad name, a name in use, an unwritable folder); anything that goes wrong
/// later ends the job as Failed in its record.
pub fn run(config: FitConfig) -> Result<JobRecord> {
    let created = now();
    let name = match &config.job_name {
        Some(name) => {
            job_name::validate(name)?;
            name.clone()
        }
        None => job_name::unique(&config.base_job_name, &created)?,
    };
    // A mistyped local folder needs no job to find out.
    for (channel, source) in &config.channels {
        if let DataSource::Local(path) = source
            && !path.exists()
        {
            bail!(
                "the {channel} channel's data '{}' does not exist; pass an existing folder or \
                 an s3:// URI",
                path.display()
            );
        }
    }
    let mut stager = Stager::new(config.s3.clone());
    if let OutputLocation::S3(output) = &config.output {
        let prefix = output.join(&name).join("");
        if stager.s3()?.has_objects(&prefix)? {
            bail!(
                "a training job named {name} already has artifacts under {prefix}; choose \
                 another --job-name (or --base-job-name for a unique one)"
            );
        }
    }
    let folder = JobFolder::create(&config.output.jobs_dir(), &name)?;
    if let Some(dir) = &config.checkpoint_dir {
        folder.link_checkpoints(dir)?;
    }
    let input_data_config: InputDataConfig = config
        .channels
        .iter()
        .map(|(channel, _)| (channel.clone(), ChannelConfig::file_mode(None)))
        .collect();
    let resource_config = ResourceConfig::single_host("algo-1", "local");
    let mut record = JobRecord {
        training_job_name: name.clone(),
        training_job_status: JobStatus::InProgress,
        secondary_status: "Starting".into(),
        failure_reason: None,
        hyper_parameters: config.hyperparameters.clone(),
        algorithm_specification: AlgorithmSpecification {
            training_image: config.entry_point.clone(),
            training_input_mode: "File".into(),
            metric_definitions: config
                .metric_definitions
                .iter()
                .map(MetricDefinition::to_record)
                .collect(),
        },
        input_data_config: config
            .channels
            .iter()
            .map(|(channel, source)| Channel::new(channel, source.uri(), None))
            .collect(),
        output_data_config: OutputDataConfig {
            s3_output_path: config.output.uri(),
        },
        resource_config: JobResourceConfig {
            instance_type: "local".into(),
            instance_count: 1,
        },
        checkpoint_config: CheckpointConfig {
            local_path: folder.layout().checkpoints_dir().display().to_string(),
        },
        model_artifacts: None,
        creation_time: iso(&created),
        training_start_time: None,
        training_end_time: None,
        last_modified_time: iso(&created),
        secondary_status_transitions: Vec::new(),
        final_metric_data_list: Vec::new(),
        metric_data: Vec::new(),
        local_job_dir: std::path::absolute(folder.root())
            .unwrap_or_else(|_| folder.root().to_path_buf())
            .display()
            .to_string(),
    };
    let mut job = Job {
        prefix: format!("[{name}] "),
        folder,
        record_file: PathBuf::new(),
    };
    job.record_file = job.folder.record_file();
    record.transition("Starting", "Preparing the instances for training", &created);
    job.save(&record)?;
    job.say(&format!(
        "Created training job {name} in {}",
        job.folder.root().display()
    ));

    let result = job.prepare(
        &config,
        &mut stager,
        &mut record,
        &input_data_config,
        &resource_config,
    );
    let result =
        result.and_then(|()| job.train(&config, &mut record, &input_data_config, &resource_config));
    let result = result.and_then(|trained| {
        if trained {
            job.upload(&config, &mut stager, &mut record)
        } else {
            Ok(())
        }
    });
    if let Err(error) = result {
        // A failure of the runner itself (staging, packing, uploading).
        let reason = format!("{error:#}");
        record.failure_reason = Some(reason.clone());
        record.finish(JobStatus::Failed, &reason, &now());
    }
    job.save(&record)?;
    Ok(record)
}

struct Job {
    prefix: String,
    folder: JobFolder,
    record_file: PathBuf,
}

impl Job {
    fn say(&self, message: &str) {
        eprintln!("{}{message}", self.prefix);
    }

    fn save(&self, record: &JobRecord) -> Result<()> {
        record.save(&self.record_file)
    }

    /// The configuration files and the channels.
    fn prepare(
        &self,
        config: &FitConfig,
        stager: &mut Stager,
        record: &mut JobRecord,
        input_data_config: &InputDataConfig,
        resource_config: &ResourceConfig,
    ) -> Result<()> {
        self.folder
            .write_config(&config.hyperparameters, input_data_config, resource_config)?;
        record.transition("Downloading", "Downloading input data", &now());
        self.save(record)?;
        let layout = self.folder.layout();
        for (channel, source) in &config.channels {
            let staged = stager.stage(channel, source, &layout.channel_dir(channel))?;
            self.say(&format!("Channel {channel}: {source} ({staged})"));
        }
        Ok(())
    }

    /// Runs the training program; `Ok(true)` when it succeeded.
    fn train(
        &self,
        config: &FitConfig,
        record: &mut JobRecord,
        input_data_config: &InputDataConfig,
        resource_config: &ResourceConfig,
    ) -> Result<bool> {
        let layout = self.folder.layout();
        let env = TrainingEnv {
            job_name: &record.training_job_name,
            layout: &layout,
            hyperparameters: &config.hyperparameters,
            input_data_config,
            resource_config,
            machine: config.machine,
            entry_point: &config.entry_point,
        }
        .variables();
        let mut args = config.program_args.clone();
        args.extend(user_args(&config.hyperparameters));
        let started = now();
        record.training_start_time = Some(iso(&started));
        record.transition(
            "Training",
            "Training image download completed. Training in progress.",
            &started,
        );
        self.save(record)?;
        self.say(&format!(
            "Running {} {}",
            config.entry_point,
            args[config.program_args.len()..].join(" ")
        ));
        let spec = ChildSpec {
            program: config.program.clone(),
            args,
            env,
            prefix: self.prefix.clone(),
            log_file: self.folder.log_file(),
        };
        let mut metrics = MetricLog::new(config.metric_definitions.clone());
        let outcome = child::run(
            &spec,
            &mut metrics,
            |metrics| {
                record.metric_data = metrics.values().to_vec();
                record.final_metric_data_list = metrics.final_values();
                record.last_modified_time = iso(&now());
                // The record is informational while the job runs: a failed write is retried
                // at the next metric.
                let _ = record.save(&self.record_file);
            },
            &config.stop,
        )?;
        record.metric_data = metrics.values().to_vec();
        record.final_metric_data_list = metrics.final_values();
        let ended = now();
        if outcome.stopped {
            let message = format!(
                "Training job stopped; the checkpoint in {} is kept",
                layout.checkpoints_dir().display()
            );
            record.finish(JobStatus::Stopped, &message, &ended);
            self.pack_output(record)?;
            return Ok(false);
        }
        if !outcome.status.success() {
            let exit = match outcome.status.code() {
                Some(code) => format!("exit code {code}"),
                None => "killed by a signal".to_string(),
            };
            let reason = match failure::read(&layout) {
                Some(reason) => format!("AlgorithmError: {reason} ({exit})"),
                None => format!(
                    "AlgorithmError: the training program ended with {exit} and left no \
                     output/failure; see {}",
                    self.folder.log_file().display()
                ),
            };
            record.failure_reason = Some(reason.clone());
            record.finish(JobStatus::Failed, &reason, &ended);
            self.pack_output(record)?;
            return Ok(false);
        }
        record.training_end_time = Some(iso(&ended));
        Ok(true)
    }

    /// `output.tar.gz` of a job that did not complete (SageMaker keeps it too).
    fn pack_output(&self, record: &JobRecord) -> Result<()> {
        archive::pack(
            &self.folder.layout().output_data_dir(),
            &self.folder.output_archive(),
        )?;
        self.save(record)
    }

    /// Packs the artifacts and, for an S3 output, uploads them.
    fn upload(
        &self,
        config: &FitConfig,
        stager: &mut Stager,
        record: &mut JobRecord,
    ) -> Result<()> {
        record.transition("Uploading", "Uploading generated training model", &now());
        self.save(record)?;
        let layout = self.folder.layout();
        let model = self.folder.model_archive();
        let output = self.folder.output_archive();
        let files = archive::pack(&layout.model_dir(), &model)?;
        if files == 0 {
            bail!(
                "the training program wrote nothing to {}; a model is expected there",
                layout.model_dir().display()
            );
        }
        archive::pack(&layout.output_data_dir(), &output)?;
        let artifact = match &config.output {
            OutputLocation::Local(_) => DataSource::Local(model.clone()).uri(),
            OutputLocation::S3(prefix) => {
                let job_output = prefix.join(&record.training_job_name).join("output");
                let s3 = stager.s3()?;
                for (file, name) in [(&model, "model.tar.gz"), (&output, "output.tar.gz")] {
                    let uri = job_output.join(name);
                    s3.upload(file, &uri)?;
                    self.say(&format!("Uploaded {} to {uri}", file.display()));
                }
                job_output.join("model.tar.gz").to_string()
            }
        };
        record.model_artifacts = Some(ModelArtifacts {
            s3_model_artifacts: artifact,
        });
        record.finish(JobStatus::Completed, "Training job completed", &now());
        Ok(())
    }
}

/// Registers SIGINT and SIGTERM to set the returned flag (and not end this process), so a
/// job stops cleanly.
pub fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install the signal handlers")?;
    }
    Ok(stop)
}
