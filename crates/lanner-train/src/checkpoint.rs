//! Checkpoints: everything a stopped run needs to end exactly as an uninterrupted one —
//! the model, the best model so far, the optimizer state, where the run was (phase, epoch,
//! batch, the epoch's metrics so far), early stopping and the history.
//!
//! A checkpoint folder holds `checkpoint.json` and the tensor files it names. New tensor
//! files get new names; `checkpoint.json` is replaced atomically last and the files it no
//! longer names are removed after, so a crash at any moment leaves a complete checkpoint.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::artifact::BestEpoch;
use crate::early_stopping::EarlyStoppingState;
use crate::hyperparameters::Hyperparameters;
use crate::metrics::MetricsAccumulator;
use crate::report::EpochRecord;
use crate::tensor_file::{self, TensorFileError};
use burn::tensor::TensorData;

/// The file that describes a checkpoint.
pub const CHECKPOINT_FILE: &str = "checkpoint.json";

/// Where a run is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Index of the current phase.
    pub phase: usize,
    /// Epochs finished in the current phase.
    pub epoch_in_phase: usize,
    /// Epochs finished in all.
    pub epochs_done: usize,
    /// Batches finished in the current epoch (0 between epochs).
    pub batch: usize,
}

/// The state of a run apart from its tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Where the run is.
    pub position: Position,
    /// The current epoch's training metrics so far (mid-epoch only).
    pub epoch_metrics: Option<MetricsAccumulator>,
    /// Training seconds already spent in the current epoch (mid-epoch only).
    pub epoch_train_seconds: f64,
    /// Seconds the current epoch's steps waited for the loader so far (mid-epoch only).
    #[serde(default)]
    pub epoch_data_wait_seconds: f64,
    /// Early stopping in the current phase.
    pub early_stopping: EarlyStoppingState,
    /// Every finished epoch.
    pub history: Vec<EpochRecord>,
    /// The epoch whose weights the run will keep.
    pub best: Option<BestEpoch>,
    /// Optimizer steps in the current phase.
    pub optimizer_iterations: u64,
}

/// `checkpoint.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CheckpointCard {
    hyperparameters: Hyperparameters,
    class_names: Vec<String>,
    state: RunState,
    model_file: String,
    best_file: Option<String>,
    optimizer_file: String,
}

/// The tensors of a checkpoint, by artifact name.
pub struct CheckpointTensors<'a> {
    /// The model now.
    pub model: &'a [(String, TensorData)],
    /// The best model so far.
    pub best: Option<&'a [(String, TensorData)]>,
    /// Optimizer slots.
    pub optimizer: &'a [(String, TensorData)],
}

/// A checkpoint read back.
pub struct LoadedCheckpoint {
    /// Where the run was.
    pub state: RunState,
    /// The model now.
    pub model: BTreeMap<String, TensorData>,
    /// The best model, when it differs.
    pub best: Option<BTreeMap<String, TensorData>>,
    /// Optimizer slots.
    pub optimizer: BTreeMap<String, TensorData>,
}

/// A checkpoint that cannot be written, read or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file system refused.
    #[error("cannot write the checkpoint in '{path}': {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `checkpoint.json` does not parse.
    #[error("'{path}' is not a valid checkpoint ({reason}); remove the folder to start afresh")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint belongs to another run.
    #[error(
        "the checkpoint in '{path}' was written by a run with other {what}; pass the same \
         settings to resume it, or use another --checkpoint-dir (or remove it) to start afresh"
    )]
    OtherRun {
        /// The folder.
        path: PathBuf,
        /// What differs (`hyperparameters (batch_size 16, not 32)`).
        what: String,
    },
    /// A tensor file is unreadable.
    #[error(transparent)]
    Tensors(#[from] TensorFileError),
}

/// Write a checkpoint into `dir`.
pub fn save(
    dir: &Path,
    hyperparameters: &Hyperparameters,
    class_names: &[String],
    state: &RunState,
    tensors: CheckpointTensors<'_>,
) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    let tag = format!(
        "{}-{}-{}",
        state.position.epochs_done,
        state.position.batch,
        std::process::id()
    );
    let model_file = format!("model-{tag}.safetensors");
    let optimizer_file = format!("optimizer-{tag}.safetensors");
    tensor_file::write(&dir.join(&model_file), tensors.model, BTreeMap::new())?;
    tensor_file::write(
        &dir.join(&optimizer_file),
        tensors.optimizer,
        BTreeMap::new(),
    )?;
    let best_file = match tensors.best {
        Some(best) => {
            let name = format!("best-{tag}.safetensors");
            tensor_file::write(&dir.join(&name), best, BTreeMap::new())?;
            Some(name)
        }
        None => None,
    };
    let card = CheckpointCard {
        hyperparameters: hyperparameters.clone(),
        class_names: class_names.to_vec(),
        state: state.clone(),
        model_file,
        best_file,
        optimizer_file,
    };
    let json = serde_json::to_vec_pretty(&card).expect("a checkpoint serialises");
    tensor_file::write_atomically(&dir.join(CHECKPOINT_FILE), &json).map_err(io)?;
    // Files of earlier checkpoints are no longer named: remove them.
    let keep = [
        Some(card.model_file.as_str()),
        Some(card.optimizer_file.as_str()),
        card.best_file.as_deref(),
    ];
    for entry in fs::read_dir(dir).map_err(io)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = ["model-", "optimizer-", "best-"]
            .iter()
            .any(|p| name.starts_with(p))
            && name.ends_with(".safetensors");
        if ours && !keep.contains(&Some(name.as_str())) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Read the checkpoint in `dir`, if there is one, checking that it belongs to a run with
/// these hyperparameters and classes.
pub fn load(
    dir: &Path,
    hyperparameters: &Hyperparameters,
    class_names: &[String],
) -> Result<Option<LoadedCheckpoint>, CheckpointError> {
    let path = dir.join(CHECKPOINT_FILE);
    let Ok(text) = fs::read(&path) else {
        return Ok(None);
    };
    let card: CheckpointCard =
        serde_json::from_slice(&text).map_err(|e| CheckpointError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let other_run = |what: String| CheckpointError::OtherRun {
        path: dir.to_path_buf(),
        what,
    };
    if card.class_names != class_names {
        return Err(other_run(format!(
            "classes ({}, not {})",
            card.class_names.join(", "),
            class_names.join(", ")
        )));
    }
    if &card.hyperparameters != hyperparameters {
        let theirs = serde_json::to_value(&card.hyperparameters).unwrap_or_default();
        let ours = serde_json::to_value(hyperparameters).unwrap_or_default();
        let differences: Vec<String> = ours
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(key, value)| theirs.get(key.as_str()) != Some(value))
            .map(|(key, value)| {
                let old = theirs.get(key.as_str()).cloned().unwrap_or_default();
                format!("{key} {old}, not {value}")
            })
            .collect();
        return Err(other_run(format!(
            "hyperparameters ({})",
            differences.join("; ")
        )));
    }
    Ok(Some(LoadedCheckpoint {
        model: tensor_file::read(&dir.join(&card.model_file))?,
        best: card
            .best_file
            .map(|f| tensor_file::read(&dir.join(f)))
            .transpose()?,
        optimizer: tensor_file::read(&dir.join(&card.optimizer_file))?,
        state: card.state,
    }))
}
