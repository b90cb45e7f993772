//! One local training job's folder: the `/opt/ml` layout the training program runs in
//! (`SAGEMAKER_BASE_DIR` points here), plus what SageMaker keeps outside the container: the
//! job record, the log and the two archives.
//!
//! ```text
//! <output>/<job-name>/
//!   job.json  training.log  model.tar.gz  output.tar.gz
//!   input/config/{hyperparameters,inputdataconfig,resourceconfig}.json
//!   input/data/<channel>/   model/   output/data/   output/failure   checkpoints/
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::contract::{InputDataConfig, Layout, ResourceConfig, hyperparameters_file};

/// A job's folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFolder {
    root: PathBuf,
}

impl JobFolder {
    /// The folder of job `name` under `parent`, which may not exist.
    pub fn at(parent: &Path, name: &str) -> Self {
        Self {
            root: parent.join(name),
        }
    }

    /// Creates the folder of a new job and its layout; an existing job of that name is an
    /// error.
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the jobs folder '{}'", parent.display()))?;
        let folder = Self::at(parent, name);
        if let Err(error) = std::fs::create_dir(&folder.root) {
            if error.kind() == std::io::ErrorKind::AlreadyExists {
                bail!(
                    "a training job named {name} already exists in '{}'; choose another \
                     --job-name (or --base-job-name for a unique one), or remove '{}'",
                    parent.display(),
                    folder.root.display()
                );
            }
            return Err(error).with_context(|| {
                format!("cannot create the job folder '{}'", folder.root.display())
            });
        }
        let layout = folder.layout();
        for dir in [
            layout.input_config_dir(),
            layout.data_dir(),
            layout.model_dir(),
            layout.output_data_dir(),
            layout.checkpoints_dir(),
        ] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create '{}'", dir.display()))?;
        }
        Ok(folder)
    }

    /// Make the job's `checkpoints/` the folder `dir` (created if missing), so checkpoints
    /// outlive the job and the next job given `dir` resumes from them.
    pub fn link_checkpoints(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the checkpoint folder '{}'", dir.display()))?;
        let target = std::fs::canonicalize(dir)
            .with_context(|| format!("cannot read the checkpoint folder '{}'", dir.display()))?;
        let link = self.layout().checkpoints_dir();
        std::fs::remove_dir(&link)
            .and_then(|()| std::os::unix::fs::symlink(&target, &link))
            .with_context(|| format!("cannot link '{}' to '{}'", link.display(), target.display()))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The container layout, rooted at the job folder.
    pub fn layout(&self) -> Layout {
        Layout::new(&self.root)
    }

    pub fn record_file(&self) -> PathBuf {
        self.root.join("job.json")
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("training.log")
    }
    pub fn model_archive(&self) -> PathBuf {
        self.root.join("model.tar.gz")
    }
    pub fn output_archive(&self) -> PathBuf {
        self.root.join("output.tar.gz")
    }

    /// Writes the three configuration files exactly as SageMaker writes them.
    pub fn write_config(
        &self,
        hyperparameters: &BTreeMap<String, String>,
        input_data_config: &InputDataConfig,
        resource_config: &ResourceConfig,
    ) -> Result<()> {
        let layout = self.layout();
        let files = [
            (
                layout.hyperparameters_file(),
                hyperparameters_file::to_json(hyperparameters),
            ),
            (
                layout.input_data_config_file(),
                serde_json::to_string_pretty(input_data_config)?,
            ),
            (
                layout.resource_config_file(),
                serde_json::to_string_pretty(resource_config)?,
            ),
        ];
        for (path, text) in files {
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write '{}'", path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ChannelConfig;

    #[test]
    fn creates_the_layout_and_the_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let folder = JobFolder::create(dir.path(), "job-1").unwrap();
        let layout = folder.layout();
        assert!(layout.model_dir().is_dir() && layout.output_data_dir().is_dir());
        assert!(layout.checkpoints_dir().is_dir());
        let mut hyperparameters = BTreeMap::new();
        hyperparameters.insert("batch-size".into(), "16".into());
        let mut channels = InputDataConfig::new();
        channels.insert("train".into(), ChannelConfig::file_mode(None));
        std::fs::create_dir_all(layout.channel_dir("train")).unwrap();
        folder
            .write_config(
                &hyperparameters,
                &channels,
                &ResourceConfig::single_host("algo-1", "local"),
            )
            .unwrap();
        let config = layout.read().unwrap();
        assert_eq!(config.hyperparameters, hyperparameters);
        assert_eq!(config.input_data_config, channels);
        config.check(&layout).unwrap();

        let error = JobFolder::create(dir.path(), "job-1")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("a training job named job-1 already exists in '"),
            "{error}"
        );
    }
}
