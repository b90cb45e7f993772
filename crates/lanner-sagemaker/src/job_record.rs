//! `job.json`: a local job's record, shaped like SageMaker's `DescribeTrainingJob` answer
//! (`TrainingJobName`, `TrainingJobStatus`, `SecondaryStatus`, `HyperParameters`,
//! `InputDataConfig`, `OutputDataConfig`, `ModelArtifacts`, `FailureReason`,
//! `FinalMetricDataList`, the times and status transitions), rewritten atomically at every
//! step so a reader never sees half a file.
//!
//! Two fields are Lanner's own: `MetricData` (every value the metric definitions found, with
//! its time, which SageMaker keeps in CloudWatch) and `LocalJobDir`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::metrics::{MetricDefinitionRecord, MetricValue};
use crate::time::{Timestamp, iso};

/// `TrainingJobStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    InProgress,
    Completed,
    Failed,
    Stopping,
    Stopped,
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InProgress => "InProgress",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
            Self::Stopping => "Stopping",
            Self::Stopped => "Stopped",
        })
    }
}

/// A training job's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct JobRecord {
    pub training_job_name: String,
    pub training_job_status: JobStatus,
    /// `Starting`, `Downloading`, `Training`, `Uploading`, `Completed`, `Failed`, `Stopping`,
    /// `Stopped`.
    pub secondary_status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    pub hyper_parameters: BTreeMap<String, String>,
    pub algorithm_specification: AlgorithmSpecification,
    pub input_data_config: Vec<Channel>,
    pub output_data_config: OutputDataConfig,
    pub resource_config: JobResourceConfig,
    pub checkpoint_config: CheckpointConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_artifacts: Option<ModelArtifacts>,
    pub creation_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_end_time: Option<String>,
    pub last_modified_time: String,
    #[serde(default)]
    pub secondary_status_transitions: Vec<StatusTransition>,
    #[serde(default)]
    pub final_metric_data_list: Vec<MetricValue>,
    /// Lanner's: every metric value, in log order.
    #[serde(default)]
    pub metric_data: Vec<MetricValue>,
    /// Lanner's: the job folder on this machine.
    pub local_job_dir: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AlgorithmSpecification {
    pub training_image: String,
    pub training_input_mode: String,
    #[serde(default)]
    pub metric_definitions: Vec<MetricDefinitionRecord>,
}

/// One entry of `InputDataConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Channel {
    pub channel_name: String,
    pub data_source: DataSourceRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    pub compression_type: String,
    pub record_wrapper_type: String,
    pub input_mode: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DataSourceRecord {
    pub s3_data_source: S3DataSource,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct S3DataSource {
    pub s3_data_type: String,
    /// `s3://…`, or `file://…` for local data as SageMaker's local mode writes it.
    pub s3_uri: String,
    pub s3_data_distribution_type: String,
}

impl Channel {
    /// A File-mode channel read from `uri`.
    pub fn new(name: &str, uri: String, content_type: Option<String>) -> Self {
        Self {
            channel_name: name.to_string(),
            data_source: DataSourceRecord {
                s3_data_source: S3DataSource {
                    s3_data_type: "S3Prefix".into(),
                    s3_uri: uri,
                    s3_data_distribution_type: "FullyReplicated".into(),
                },
            },
            content_type,
            compression_type: "None".into(),
            record_wrapper_type: "None".into(),
            input_mode: "File".into(),
        }
    }

    pub fn uri(&self) -> &str {
        &self.data_source.s3_data_source.s3_uri
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct OutputDataConfig {
    pub s3_output_path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct JobResourceConfig {
    pub instance_type: String,
    pub instance_count: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckpointConfig {
    pub local_path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ModelArtifacts {
    pub s3_model_artifacts: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StatusTransition {
    pub status: String,
    pub start_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    pub status_message: String,
}

impl JobRecord {
    /// Moves the job to `secondary_status` at `at`, closing the previous step.
    pub fn transition(&mut self, secondary_status: &str, message: &str, at: &Timestamp) {
        let now = iso(at);
        if let Some(last) = self.secondary_status_transitions.last_mut()
            && last.end_time.is_none()
        {
            last.end_time = Some(now.clone());
        }
        let finished = matches!(secondary_status, "Completed" | "Failed" | "Stopped");
        self.secondary_status_transitions.push(StatusTransition {
            status: secondary_status.to_string(),
            start_time: now.clone(),
            end_time: finished.then(|| now.clone()),
            status_message: message.to_string(),
        });
        self.secondary_status = secondary_status.to_string();
        self.last_modified_time = now;
    }

    /// Ends the job with `status` at `at`.
    pub fn finish(&mut self, status: JobStatus, message: &str, at: &Timestamp) {
        self.training_job_status = status;
        self.transition(&status.to_string(), message, at);
        if self.training_start_time.is_some() && self.training_end_time.is_none() {
            self.training_end_time = Some(iso(at));
        }
    }

    /// Writes the record to `path` atomically (a sibling file renamed over it).
    pub fn save(&self, path: &Path) -> Result<()> {
        let partial = path.with_extension("json.partial");
        let text = serde_json::to_string_pretty(self)? + "\n";
        std::fs::write(&partial, text)
            .with_context(|| format!("cannot write '{}'", partial.display()))?;
        std::fs::rename(&partial, path)
            .with_context(|| format!("cannot write '{}'", path.display()))
    }

    /// Reads a record.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read '{}'", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("'{}' is not a lanner job record", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> JobRecord {
        let at = crate::time::now();
        JobRecord {
            training_job_name: "job-1".into(),
            training_job_status: JobStatus::InProgress,
            secondary_status: "Starting".into(),
            failure_reason: None,
            hyper_parameters: BTreeMap::from([("batch-size".to_string(), "16".to_string())]),
            algorithm_specification: AlgorithmSpecification {
                training_image: "lanner".into(),
                training_input_mode: "File".into(),
                metric_definitions: vec![],
            },
            input_data_config: vec![Channel::new("train", "s3://b/train".into(), None)],
            output_data_config: OutputDataConfig {
                s3_output_path: "s3://b/jobs".into(),
            },
            resource_config: JobResourceConfig {
                instance_type: "local".into(),
                instance_count: 1,
            },
            checkpoint_config: CheckpointConfig {
                local_path: "/jobs/job-1/checkpoints".into(),
            },
            model_artifacts: None,
            creation_time: iso(&at),
            training_start_time: None,
            training_end_time: None,
            last_modified_time: iso(&at),
            secondary_status_transitions: vec![],
            final_metric_data_list: vec![],
            metric_data: vec![],
            local_job_dir: "/jobs/job-1".into(),
        }
    }

    #[test]
    fn is_shaped_like_describe_training_job() {
        let value = serde_json::to_value(record()).unwrap();
        assert_eq!(value["TrainingJobStatus"], "InProgress");
        assert_eq!(value["HyperParameters"]["batch-size"], "16");
        assert_eq!(
            value["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"],
            "s3://b/train"
        );
        assert_eq!(
            value["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3DataDistributionType"],
            "FullyReplicated"
        );
        assert_eq!(value["OutputDataConfig"]["S3OutputPath"], "s3://b/jobs");
        assert!(value.get("FailureReason").is_none());
    }

    #[test]
    fn transitions_close_the_previous_step_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = record();
        let at = crate::time::now();
        record.transition("Starting", "Preparing the job", &at);
        record.transition("Training", "Training", &at);
        record.training_start_time = Some(iso(&at));
        record.failure_reason = Some("AlgorithmError: bad".into());
        record.finish(JobStatus::Failed, "bad", &at);
        assert_eq!(record.secondary_status, "Failed");
        assert!(
            record
                .secondary_status_transitions
                .iter()
                .all(|t| t.end_time.is_some())
        );
        assert!(record.training_end_time.is_some());
        let path = dir.path().join("job.json");
        record.save(&path).unwrap();
        assert_eq!(JobRecord::load(&path).unwrap(), record);
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(value["TrainingJobStatus"], "Failed");
        assert_eq!(value["FailureReason"], "AlgorithmError: bad");
    }
}
