//! The SageMaker training-container contract: where a training program finds its
//! configuration, its data and its outputs.
//!
//! The base folder is `/opt/ml`, or `$SAGEMAKER_BASE_DIR` when set (the training toolkit
//! honours it, and so do `lanner fit` and the tests):
//!
//! ```text
//! input/config/hyperparameters.json   every value a JSON string
//! input/config/inputdataconfig.json   channel -> TrainingInputMode, ContentType, …
//! input/config/resourceconfig.json    current_host, hosts, instance groups
//! input/data/<channel>/               File-mode data of each channel
//! model/                              uploaded as model.tar.gz
//! output/data/                        uploaded as output.tar.gz
//! output/failure                      on error: one sentence, and a non-zero exit
//! checkpoints/                        synced with the checkpoint S3 URI when one is set
//! ```

pub mod failure;
pub mod hyperparameters_file;
pub mod input_config;
pub mod resource_config;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use input_config::{ChannelConfig, InputDataConfig};
pub use resource_config::{InstanceGroup, ResourceConfig};

/// The variable that moves the base folder away from `/opt/ml`.
pub const BASE_DIR_ENV: &str = "SAGEMAKER_BASE_DIR";
/// SageMaker's base folder inside a training container.
pub const DEFAULT_BASE_DIR: &str = "/opt/ml";

/// A problem with the container's configuration, as one sentence for `output/failure`.
#[derive(Debug, Error)]
pub enum ContractError {
    /// A configuration file exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A configuration file is not what SageMaker writes.
    #[error("{} is not a valid SageMaker {what}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        what: &'static str,
        problem: String,
    },
    /// The job asks for more than one host.
    #[error(
        "training on more than one host is not supported yet: set instance_count=1 (this job \
         has {} hosts: {}; current host {current})",
        hosts.len(),
        hosts.join(", ")
    )]
    MultipleHosts { hosts: Vec<String>, current: String },
    /// A channel is configured in a mode lanner cannot read.
    #[error(
        "the {channel} channel uses TrainingInputMode {mode}, which lanner cannot read; use \
         File (or FastFile) input mode"
    )]
    UnsupportedInputMode { channel: String, mode: String },
    /// A configured channel has no folder.
    #[error(
        "the {channel} channel's folder {} is missing; SageMaker puts File-mode data there",
        path.display()
    )]
    MissingChannel { channel: String, path: PathBuf },
}

/// The folders and files of the contract under one base folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    base: PathBuf,
}

impl Layout {
    /// The layout under `base`.
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Self { base: base.into() }
    }

    /// `$SAGEMAKER_BASE_DIR`, or `/opt/ml`.
    pub fn from_env() -> Self {
        match std::env::var_os(BASE_DIR_ENV) {
            Some(base) if !base.is_empty() => Self::new(base),
            _ => Self::new(DEFAULT_BASE_DIR),
        }
    }

    /// The layout this process runs in, if it runs in one: `input/config/` exists under the
    /// base folder.
    pub fn detect() -> Option<Self> {
        let layout = Self::from_env();
        layout.input_config_dir().is_dir().then_some(layout)
    }

    pub fn base(&self) -> &Path {
        &self.base
    }
    pub fn input_dir(&self) -> PathBuf {
        self.base.join("input")
    }
    pub fn input_config_dir(&self) -> PathBuf {
        self.base.join("input/config")
    }
    pub fn hyperparameters_file(&self) -> PathBuf {
        self.input_config_dir().join("hyperparameters.json")
    }
    pub fn input_data_config_file(&self) -> PathBuf {
        self.input_config_dir().join("inputdataconfig.json")
    }
    pub fn resource_config_file(&self) -> PathBuf {
        self.input_config_dir().join("resourceconfig.json")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.base.join("input/data")
    }
    pub fn channel_dir(&self, channel: &str) -> PathBuf {
        self.data_dir().join(channel)
    }
    pub fn model_dir(&self) -> PathBuf {
        self.base.join("model")
    }
    pub fn output_dir(&self) -> PathBuf {
        self.base.join("output")
    }
    pub fn output_data_dir(&self) -> PathBuf {
        self.base.join("output/data")
    }
    pub fn failure_file(&self) -> PathBuf {
        self.base.join("output/failure")
    }
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.base.join("checkpoints")
    }

    /// Reads the three configuration files. A missing `hyperparameters.json` means no
    /// hyperparameters, a missing `inputdataconfig.json` means the folders under
    /// `input/data/` are the channels, a missing `resourceconfig.json` means one host.
    pub fn read(&self) -> Result<TrainingConfig, ContractError> {
        let hyperparameters = match read_optional(&self.hyperparameters_file())? {
            Some(text) => {
                hyperparameters_file::parse(&text).map_err(|problem| ContractError::Invalid {
                    path: self.hyperparameters_file(),
                    what: "hyperparameters file",
                    problem,
                })?
            }
            None => BTreeMap::new(),
        };
        let input_data_config = match read_optional(&self.input_data_config_file())? {
            Some(text) => input_config::parse(&text).map_err(|problem| ContractError::Invalid {
                path: self.input_data_config_file(),
                what: "input data config",
                problem,
            })?,
            None => self.discovered_channels(),
        };
        let resource_config = match read_optional(&self.resource_config_file())? {
            Some(text) => {
                resource_config::parse(&text).map_err(|problem| ContractError::Invalid {
                    path: self.resource_config_file(),
                    what: "resource config",
                    problem,
                })?
            }
            None => ResourceConfig::single_host("algo-1", "local"),
        };
        Ok(TrainingConfig {
            hyperparameters,
            input_data_config,
            resource_config,
        })
    }

    /// Every folder under `input/data/`, as a File-mode channel.
    fn discovered_channels(&self) -> InputDataConfig {
        let mut config = InputDataConfig::new();
        if let Ok(entries) = std::fs::read_dir(self.data_dir()) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    config.insert(name, ChannelConfig::file_mode(None));
                }
            }
        }
        config
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, ContractError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ContractError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// What the three configuration files say.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingConfig {
    /// Hyperparameters by name, each a plain string (`"32"`, `"mobilenet"`).
    pub hyperparameters: BTreeMap<String, String>,
    /// The channels.
    pub input_data_config: InputDataConfig,
    /// The hosts of the job.
    pub resource_config: ResourceConfig,
}

impl TrainingConfig {
    /// Refuses what lanner cannot do: several hosts, channels in Pipe mode, and configured
    /// channels without a folder under `layout`.
    pub fn check(&self, layout: &Layout) -> Result<(), ContractError> {
        self.resource_config.require_single_host()?;
        for (channel, config) in &self.input_data_config {
            if !config.is_file_readable() {
                return Err(ContractError::UnsupportedInputMode {
                    channel: channel.clone(),
                    mode: config.training_input_mode.clone(),
                });
            }
            let path = layout.channel_dir(channel);
            if !path.exists() {
                return Err(ContractError::MissingChannel {
                    channel: channel.clone(),
                    path,
                });
            }
        }
        Ok(())
    }
}

/// What `SM_NUM_GPUS` and `SM_NUM_CPUS` say about this machine, when set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourceHints {
    pub num_gpus: Option<usize>,
    pub num_cpus: Option<usize>,
}

impl ResourceHints {
    /// Reads `SM_NUM_GPUS` and `SM_NUM_CPUS`; unset or unreadable values give `None`.
    pub fn from_env() -> Self {
        let number = |name: &str| std::env::var(name).ok()?.trim().parse().ok();
        Self {
            num_gpus: number("SM_NUM_GPUS"),
            num_cpus: number("SM_NUM_CPUS"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn layout_with(files: &[(&str, &str)]) -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        fs::create_dir_all(layout.input_config_dir()).unwrap();
        for (name, text) in files {
            fs::write(layout.input_config_dir().join(name), text).unwrap();
        }
        (dir, layout)
    }

    #[test]
    fn reads_the_three_files() {
        let (_dir, layout) = layout_with(&[
            (
                "hyperparameters.json",
                r#"{"batch-size": "32", "model_name": "\"mobilenet\""}"#,
            ),
            (
                "inputdataconfig.json",
                r#"{"train": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None", "ContentType": "application/x-image"}}"#,
            ),
            (
                "resourceconfig.json",
                r#"{"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}"#,
            ),
        ]);
        let config = layout.read().unwrap();
        assert_eq!(config.hyperparameters["batch-size"], "32");
        assert_eq!(config.hyperparameters["model_name"], "mobilenet");
        assert_eq!(
            config.input_data_config["train"].content_type.as_deref(),
            Some("application/x-image")
        );
        assert_eq!(config.resource_config.current_host, "algo-1");
        let error = config.check(&layout).unwrap_err().to_string();
        assert!(
            error.starts_with("the train channel's folder ")
                && error.ends_with("is missing; SageMaker puts File-mode data there"),
            "{error}"
        );
        fs::create_dir_all(layout.channel_dir("train")).unwrap();
        config.check(&layout).unwrap();
    }

    #[test]
    fn missing_files_mean_no_hyperparameters_the_data_folders_and_one_host() {
        let (_dir, layout) = layout_with(&[]);
        fs::create_dir_all(layout.channel_dir("train")).unwrap();
        fs::create_dir_all(layout.channel_dir("validation")).unwrap();
        let config = layout.read().unwrap();
        assert!(config.hyperparameters.is_empty());
        assert_eq!(
            config.input_data_config.keys().collect::<Vec<_>>(),
            ["train", "validation"]
        );
        assert_eq!(config.resource_config.hosts, ["algo-1"]);
    }

    #[test]
    fn bad_json_names_the_file_in_one_sentence() {
        let (_dir, layout) = layout_with(&[("hyperparameters.json", "{\"batch-size\": 32,")]);
        let error = layout.read().unwrap_err().to_string();
        assert!(
            error.contains("hyperparameters.json is not a valid SageMaker hyperparameters file: "),
            "{error}"
        );
        assert_eq!(error.lines().count(), 1);
    }

    #[test]
    fn several_hosts_are_refused() {
        let (_dir, layout) = layout_with(&[(
            "resourceconfig.json",
            r#"{"current_host": "algo-2", "hosts": ["algo-1", "algo-2"]}"#,
        )]);
        let config = layout.read().unwrap();
        assert_eq!(
            config.check(&layout).unwrap_err().to_string(),
            "training on more than one host is not supported yet: set instance_count=1 (this \
             job has 2 hosts: algo-1, algo-2; current host algo-2)"
        );
    }

    #[test]
    fn pipe_mode_is_refused() {
        let (_dir, layout) = layout_with(&[(
            "inputdataconfig.json",
            r#"{"train": {"TrainingInputMode": "Pipe"}}"#,
        )]);
        let config = layout.read().unwrap();
        assert!(
            config
                .check(&layout)
                .unwrap_err()
                .to_string()
                .starts_with("the train channel uses TrainingInputMode Pipe")
        );
    }
}
