//! What the SageMaker training toolkit gives a framework container's entry point: the
//! hyperparameters as `--name value` arguments and the `SM_*` variables.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::contract::{InputDataConfig, Layout, ResourceConfig};

/// Hyperparameters the SDK sets for the toolkit itself (`sagemaker_program`,
/// `sagemaker_region`, …); they are not the user's, and the toolkit does not pass them on.
pub fn is_framework_parameter(name: &str) -> bool {
    name.starts_with("sagemaker_")
}

/// The entry point's arguments: `--name value` for every user hyperparameter, in name order.
pub fn user_args(hyperparameters: &BTreeMap<String, String>) -> Vec<String> {
    hyperparameters
        .iter()
        .filter(|(name, _)| !is_framework_parameter(name))
        .flat_map(|(name, value)| [format!("--{name}"), value.clone()])
        .collect()
}

/// A hyperparameter as the toolkit decodes it: JSON when it reads as JSON (`"32"` → 32,
/// `"true"` → true), else the string.
fn decoded(value: &str) -> Value {
    serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()))
}

/// `SM_HP_BATCH_SIZE` for `batch-size`.
pub fn hyperparameter_variable(name: &str) -> String {
    format!("SM_HP_{}", name.to_uppercase().replace('-', "_"))
}

/// `SM_CHANNEL_TRAIN` for `train`.
pub fn channel_variable(name: &str) -> String {
    format!("SM_CHANNEL_{}", name.to_uppercase().replace('-', "_"))
}

/// The machine a job runs on, as the toolkit reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    pub num_cpus: usize,
    pub num_gpus: usize,
}

impl Machine {
    /// This machine: its usable cores, and its NVIDIA GPUs (`/dev/nvidiaN`).
    pub fn this() -> Self {
        let num_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let num_gpus = std::fs::read_dir("/dev")
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|entry| {
                        let name = entry.file_name();
                        let name = name.to_string_lossy();
                        name.strip_prefix("nvidia")
                            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .count()
            })
            .unwrap_or(0);
        Self { num_cpus, num_gpus }
    }
}

/// Everything the toolkit would know about a job.
pub struct TrainingEnv<'a> {
    pub job_name: &'a str,
    pub layout: &'a Layout,
    pub hyperparameters: &'a BTreeMap<String, String>,
    pub input_data_config: &'a InputDataConfig,
    pub resource_config: &'a ResourceConfig,
    pub machine: Machine,
    /// How the log names the entry point (`lanner train`).
    pub entry_point: &'a str,
}

impl TrainingEnv<'_> {
    /// The variables, as `(name, value)` pairs.
    pub fn variables(&self) -> Vec<(String, String)> {
        let layout = self.layout;
        let path = |p: std::path::PathBuf| p.display().to_string();
        let user_hyperparameters: BTreeMap<&String, Value> = self
            .hyperparameters
            .iter()
            .filter(|(name, _)| !is_framework_parameter(name))
            .map(|(name, value)| (name, decoded(value)))
            .collect();
        let framework_parameters: BTreeMap<&String, Value> = self
            .hyperparameters
            .iter()
            .filter(|(name, _)| is_framework_parameter(name))
            .map(|(name, value)| (name, decoded(value)))
            .collect();
        let channels: Vec<&String> = self.input_data_config.keys().collect();
        let channel_dirs: BTreeMap<&String, String> = channels
            .iter()
            .map(|name| (*name, path(layout.channel_dir(name))))
            .collect();
        let user_args = user_args(self.hyperparameters);
        let resource_config = json!(self.resource_config);
        let training_env = json!({
            "job_name": self.job_name,
            "current_host": self.resource_config.current_host,
            "hosts": self.resource_config.hosts,
            "network_interface_name": self.resource_config.network_interface_name,
            "current_instance_type": self.resource_config.current_instance_type,
            "num_cpus": self.machine.num_cpus,
            "num_gpus": self.machine.num_gpus,
            "hyperparameters": user_hyperparameters,
            "additional_framework_parameters": framework_parameters,
            "channel_input_dirs": channel_dirs,
            "input_data_config": self.input_data_config,
            "resource_config": resource_config,
            "input_dir": path(layout.input_dir()),
            "input_config_dir": path(layout.input_config_dir()),
            "model_dir": path(layout.model_dir()),
            "output_dir": path(layout.output_dir()),
            "output_data_dir": path(layout.output_data_dir()),
            "log_level": 20,
            "user_entry_point": self.entry_point,
        });
        let mut variables = vec![
            (
                "SAGEMAKER_BASE_DIR".to_string(),
                path(layout.base().to_path_buf()),
            ),
            ("TRAINING_JOB_NAME".into(), self.job_name.to_string()),
            ("SM_MODEL_DIR".into(), path(layout.model_dir())),
            ("SM_INPUT_DIR".into(), path(layout.input_dir())),
            (
                "SM_INPUT_CONFIG_DIR".into(),
                path(layout.input_config_dir()),
            ),
            ("SM_OUTPUT_DIR".into(), path(layout.output_dir())),
            ("SM_OUTPUT_DATA_DIR".into(), path(layout.output_data_dir())),
            ("SM_CHANNELS".into(), json!(channels).to_string()),
            ("SM_HPS".into(), json!(user_hyperparameters).to_string()),
            (
                "SM_HOSTS".into(),
                json!(self.resource_config.hosts).to_string(),
            ),
            (
                "SM_CURRENT_HOST".into(),
                self.resource_config.current_host.clone(),
            ),
            (
                "SM_CURRENT_INSTANCE_TYPE".into(),
                self.resource_config
                    .current_instance_type
                    .clone()
                    .unwrap_or_default(),
            ),
            (
                "SM_NETWORK_INTERFACE_NAME".into(),
                self.resource_config
                    .network_interface_name
                    .clone()
                    .unwrap_or_default(),
            ),
            ("SM_NUM_CPUS".into(), self.machine.num_cpus.to_string()),
            ("SM_NUM_GPUS".into(), self.machine.num_gpus.to_string()),
            ("SM_RESOURCE_CONFIG".into(), resource_config.to_string()),
            (
                "SM_INPUT_DATA_CONFIG".into(),
                json!(self.input_data_config).to_string(),
            ),
            (
                "SM_FRAMEWORK_PARAMS".into(),
                json!(framework_parameters).to_string(),
            ),
            ("SM_USER_ARGS".into(), json!(user_args).to_string()),
            ("SM_USER_ENTRY_POINT".into(), self.entry_point.to_string()),
            ("SM_LOG_LEVEL".into(), "20".into()),
            ("SM_TRAINING_ENV".into(), training_env.to_string()),
        ];
        for (name, dir) in &channel_dirs {
            variables.push((channel_variable(name), dir.clone()));
        }
        for (name, value) in self
            .hyperparameters
            .iter()
            .filter(|(name, _)| !is_framework_parameter(name))
        {
            variables.push((hyperparameter_variable(name), value.clone()));
        }
        variables
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ChannelConfig;

    #[test]
    fn gives_what_the_toolkit_gives() {
        let layout = Layout::new("/jobs/job-1");
        let mut hyperparameters = BTreeMap::new();
        hyperparameters.insert("batch-size".to_string(), "16".to_string());
        hyperparameters.insert("weights".to_string(), "none".to_string());
        hyperparameters.insert("sagemaker_program".to_string(), "train.py".to_string());
        let mut channels = InputDataConfig::new();
        channels.insert("train".into(), ChannelConfig::file_mode(None));
        channels.insert("validation".into(), ChannelConfig::file_mode(None));
        let resources = ResourceConfig::single_host("algo-1", "local");
        let env = TrainingEnv {
            job_name: "job-1",
            layout: &layout,
            hyperparameters: &hyperparameters,
            input_data_config: &channels,
            resource_config: &resources,
            machine: Machine {
                num_cpus: 2,
                num_gpus: 0,
            },
            entry_point: "lanner train",
        };
        let variables: BTreeMap<String, String> = env.variables().into_iter().collect();
        assert_eq!(
            variables["SM_CHANNEL_TRAIN"],
            "/jobs/job-1/input/data/train"
        );
        assert_eq!(variables["SM_MODEL_DIR"], "/jobs/job-1/model");
        assert_eq!(variables["SM_OUTPUT_DATA_DIR"], "/jobs/job-1/output/data");
        assert_eq!(variables["SM_CHANNELS"], r#"["train","validation"]"#);
        assert_eq!(variables["SM_HPS"], r#"{"batch-size":16,"weights":"none"}"#);
        assert_eq!(variables["SM_HP_BATCH_SIZE"], "16");
        assert!(!variables.contains_key("SM_HP_SAGEMAKER_PROGRAM"));
        assert_eq!(variables["SM_HOSTS"], r#"["algo-1"]"#);
        assert_eq!(variables["SM_NUM_GPUS"], "0");
        assert_eq!(
            variables["SM_USER_ARGS"],
            r#"["--batch-size","16","--weights","none"]"#
        );
        let training_env: Value = serde_json::from_str(&variables["SM_TRAINING_ENV"]).unwrap();
        assert_eq!(
            training_env["channel_input_dirs"]["validation"],
            "/jobs/job-1/input/data/validation"
        );
        assert_eq!(
            training_env["additional_framework_parameters"]["sagemaker_program"],
            "train.py"
        );
        assert_eq!(
            user_args(&hyperparameters),
            ["--batch-size", "16", "--weights", "none"]
        );
    }
}
