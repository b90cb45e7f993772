//! `input/config/inputdataconfig.json`: one entry per channel,
//! `{"train": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
//! "RecordWrapperType": "None", "ContentType": "application/x-image"}}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The channels by name.
pub type InputDataConfig = BTreeMap<String, ChannelConfig>;

/// How one channel's data is delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ChannelConfig {
    /// The MIME type the job was told, when it was told one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// `File`, `FastFile` or `Pipe`.
    #[serde(default = "file_mode")]
    pub training_input_mode: String,
    /// `FullyReplicated` or `ShardedByS3Key`.
    #[serde(default = "fully_replicated", rename = "S3DistributionType")]
    pub s3_distribution_type: String,
    /// `None` or `RecordIO`.
    #[serde(default = "no_wrapper")]
    pub record_wrapper_type: String,
}

fn file_mode() -> String {
    "File".into()
}
fn fully_replicated() -> String {
    "FullyReplicated".into()
}
fn no_wrapper() -> String {
    "None".into()
}

impl ChannelConfig {
    /// A File-mode, fully replicated channel, as `lanner fit` stages every channel.
    pub fn file_mode(content_type: Option<String>) -> Self {
        Self {
            content_type,
            training_input_mode: file_mode(),
            s3_distribution_type: fully_replicated(),
            record_wrapper_type: no_wrapper(),
        }
    }

    /// Whether the data lies in the channel's folder as files (`File`, `FastFile`), rather
    /// than arriving through a named pipe.
    pub fn is_file_readable(&self) -> bool {
        matches!(self.training_input_mode.as_str(), "File" | "FastFile")
    }
}

/// The channels of `text`, or what is wrong with it.
pub fn parse(text: &str) -> Result<InputDataConfig, String> {
    serde_json::from_str(text).map_err(|error| {
        format!(
            "{error}; SageMaker writes an object of channels, e.g. {{\"train\": \
             {{\"TrainingInputMode\": \"File\"}}}}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_sagemakers_shape() {
        let config = parse(
            r#"{"train": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                "RecordWrapperType": "None", "ContentType": "image/jpeg"},
                "validation": {"TrainingInputMode": "File"}}"#,
        )
        .unwrap();
        assert_eq!(
            config["train"],
            ChannelConfig::file_mode(Some("image/jpeg".into()))
        );
        assert_eq!(config["validation"], ChannelConfig::file_mode(None));
        let written = serde_json::to_value(&config).unwrap();
        assert_eq!(
            written["validation"],
            serde_json::json!({"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"})
        );
        assert_eq!(written["train"]["ContentType"], "image/jpeg");
    }

    #[test]
    fn bad_json_says_what_is_expected() {
        let error = parse(r#"{"train": "File"}"#).unwrap_err();
        assert!(
            error.starts_with("invalid type: string \"File\""),
            "{error}"
        );
        assert!(error.contains("an object of channels"), "{error}");
    }
}
