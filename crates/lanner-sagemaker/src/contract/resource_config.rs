//! `input/config/resourceconfig.json`: the hosts of the job and this container's place among
//! them (`{"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0",
//! "current_group_name": "homogeneousCluster", "current_instance_type": "ml.m5.xlarge",
//! "instance_groups": [...]}`).

use serde::{Deserialize, Serialize};

use super::ContractError;

/// The hosts of a training job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceConfig {
    pub current_host: String,
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_interface_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_group_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_groups: Vec<InstanceGroup>,
}

/// One instance group of a (heterogeneous) cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceGroup {
    pub instance_group_name: String,
    pub instance_type: String,
    pub hosts: Vec<String>,
}

impl ResourceConfig {
    /// One host, `host`, in a homogeneous cluster of `instance_type`, as SageMaker writes it.
    pub fn single_host(host: &str, instance_type: &str) -> Self {
        let group = "homogeneousCluster".to_string();
        Self {
            current_host: host.into(),
            hosts: vec![host.into()],
            network_interface_name: Some("eth0".into()),
            current_group_name: Some(group.clone()),
            current_instance_type: Some(instance_type.into()),
            instance_groups: vec![InstanceGroup {
                instance_group_name: group,
                instance_type: instance_type.into(),
                hosts: vec![host.into()],
            }],
        }
    }

    /// A sentence for the log: where this job runs.
    pub fn describe(&self) -> String {
        format!(
            "host {} of {} ({}), instance type {}",
            self.current_host,
            self.hosts.len(),
            self.hosts.join(", "),
            self.current_instance_type.as_deref().unwrap_or("unknown")
        )
    }

    /// Lanner trains on one host: several are an error, not a silent single-host run.
    pub fn require_single_host(&self) -> Result<(), ContractError> {
        if self.hosts.len() > 1 {
            return Err(ContractError::MultipleHosts {
                hosts: self.hosts.clone(),
                current: self.current_host.clone(),
            });
        }
        Ok(())
    }
}

/// The resource config of `text`, or what is wrong with it.
pub fn parse(text: &str) -> Result<ResourceConfig, String> {
    serde_json::from_str(text).map_err(|error| {
        format!(
            "{error}; SageMaker writes e.g. {{\"current_host\": \"algo-1\", \"hosts\": \
             [\"algo-1\"]}}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_sagemaker_writes() {
        let config = parse(
            r#"{"current_host": "algo-1", "hosts": ["algo-1", "algo-2"],
                "network_interface_name": "eth0", "current_group_name": "homogeneousCluster",
                "current_instance_type": "ml.m5.xlarge",
                "instance_groups": [{"instance_group_name": "homogeneousCluster",
                  "instance_type": "ml.m5.xlarge", "hosts": ["algo-2", "algo-1"]}]}"#,
        )
        .unwrap();
        assert_eq!(config.hosts, ["algo-1", "algo-2"]);
        assert_eq!(config.instance_groups[0].hosts, ["algo-2", "algo-1"]);
        assert_eq!(
            config.describe(),
            "host algo-1 of 2 (algo-1, algo-2), instance type ml.m5.xlarge"
        );
        assert!(config.require_single_host().is_err());
    }

    #[test]
    fn writes_a_single_host_as_sagemaker_does() {
        let written = serde_json::to_value(ResourceConfig::single_host("algo-1", "local")).unwrap();
        assert_eq!(
            written,
            serde_json::json!({
                "current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0",
                "current_group_name": "homogeneousCluster", "current_instance_type": "local",
                "instance_groups": [{"instance_group_name": "homogeneousCluster",
                    "instance_type": "local", "hosts": ["algo-1"]}]
            })
        );
    }

    #[test]
    fn missing_fields_are_named() {
        let error = parse(r#"{"hosts": ["algo-1"]}"#).unwrap_err();
        assert!(error.starts_with("missing field `current_host`"), "{error}");
    }
}
