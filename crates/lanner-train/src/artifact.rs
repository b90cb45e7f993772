//! The model artifact: a folder with `lanner.json` (what the model is and how it was
//! trained) and `weights.safetensors` (timm tensor names for the backbone, `head.*` for the
//! classifier), written so that a crash never leaves a half-written model.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter};
use burn::tensor::{DType, Device, TensorData};
use lanner_models::{ModelEntry, Normalization};
use serde::{Deserialize, Serialize};

use crate::classifier::{Classifier, outputs_for};
use crate::hyperparameters::Hyperparameters;
use crate::metrics::EpochMetrics;
use crate::recipe::{PhaseName, Recipe};
use crate::tensor_file::{self, TensorFileError};

/// The file that describes a model.
pub const CARD_FILE: &str = "lanner.json";
/// The file with its weights.
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// The version of the `lanner.json` layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// How images are turned into the model's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Square input size.
    pub image_size: usize,
    /// `bilinear`, without antialiasing, not keeping the aspect ratio (Keras' default).
    pub resize: String,
    /// Pixels are RGB in 0..=255, then `(x / 255 - mean) / std`.
    pub mean: [f32; 3],
    /// See `mean`.
    pub std: [f32; 3],
}

impl Preprocessing {
    /// The normalisation to apply to 0..=255 pixels.
    pub fn normalization(&self) -> Normalization {
        Normalization {
            mean: self.mean,
            std: self.std,
        }
    }
}

/// The classifier on the backbone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadCard {
    /// `global_average`.
    pub pooling: String,
    /// Dropout rate while training.
    pub dropout: f64,
    /// Logits per image: 1 (binary, sigmoid) or the number of classes (softmax).
    pub outputs: usize,
    /// `sigmoid` or `softmax`: how logits become probabilities.
    pub activation: String,
}

/// The epoch whose weights the artifact holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BestEpoch {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Its phase.
    pub phase: PhaseName,
    /// Training metrics of the epoch.
    pub train: EpochMetrics,
    /// Validation metrics of the epoch.
    pub validation: EpochMetrics,
}

/// `lanner.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The Lanner version that wrote it.
    pub lanner_version: String,
    /// The registry's model name.
    pub arch: String,
    /// timm's name of the backbone, whose checkpoints share its tensor names.
    pub timm_name: String,
    /// Class names in label order.
    pub class_names: Vec<String>,
    /// Input preparation.
    pub preprocessing: Preprocessing,
    /// The head.
    pub head: HeadCard,
    /// The epsilon the backbone's BatchNorms add to the variance: timm's 1e-5, or 1e-3 for
    /// Keras' start (`--init keras`) and torchvision's weights. A reloaded model normalises
    /// with it; [`save`] writes the saved model's. Cards written before it was recorded read
    /// as 1e-5, which is what reloading used then.
    #[serde(default = "timm_batch_norm_epsilon")]
    pub batch_norm_epsilon: f64,
    /// The run's hyperparameters.
    pub hyperparameters: Hyperparameters,
    /// The phases it ran.
    pub recipe: Recipe,
    /// Epochs run in all.
    pub epochs_run: usize,
    /// The epoch kept.
    pub best_epoch: Option<BestEpoch>,
}

/// The BatchNorm epsilon of timm's models, and of every backbone before the card recorded it.
fn timm_batch_norm_epsilon() -> f64 {
    1e-5
}

/// A model folder that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Writing would replace a model.
    #[error(
        "'{0}' already holds a model (lanner.json); pass --overwrite to replace it or choose another --model-dir"
    )]
    Exists(PathBuf),
    /// No `lanner.json`.
    #[error(
        "'{0}' holds no Lanner model (no lanner.json); pass the --model-dir of a `lanner train` run"
    )]
    Missing(PathBuf),
    /// `lanner.json` is not what this build reads.
    #[error("'{path}' is not a valid lanner.json: {reason}")]
    BadCard {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The weights do not fit the card.
    #[error("the weights in '{path}' do not match lanner.json: {reason}")]
    BadWeights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file system refused.
    #[error("cannot write the model to '{path}': {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A tensor file error.
    #[error(transparent)]
    Tensors(#[from] TensorFileError),
}

impl ModelCard {
    /// The card of a model of `entry` for `class_names`, trained with `hyperparameters`.
    pub fn new(
        entry: &ModelEntry,
        class_names: Vec<String>,
        hyperparameters: Hyperparameters,
        recipe: Recipe,
    ) -> Self {
        let outputs = outputs_for(class_names.len());
        let normalization = entry.pretrained.normalization;
        Self {
            format_version: FORMAT_VERSION,
            lanner_version: env!("CARGO_PKG_VERSION").to_string(),
            arch: entry.name.to_string(),
            timm_name: entry.timm_name.to_string(),
            preprocessing: Preprocessing {
                image_size: hyperparameters.image_size,
                resize: "bilinear".into(),
                mean: normalization.mean,
                std: normalization.std,
            },
            head: HeadCard {
                pooling: "global_average".into(),
                dropout: hyperparameters.drop_out_percentage,
                outputs,
                activation: if outputs == 1 { "sigmoid" } else { "softmax" }.into(),
            },
            class_names,
            batch_norm_epsilon: timm_batch_norm_epsilon(),
            hyperparameters,
            recipe,
            epochs_run: 0,
            best_epoch: None,
        }
    }

    /// The registry entry of its backbone.
    pub fn model_entry(&self) -> Result<&'static ModelEntry, String> {
        lanner_models::find(&self.arch).map_err(|e| e.to_string())
    }
}

/// Whether `dir` holds a model.
pub fn exists(dir: &Path) -> bool {
    dir.join(CARD_FILE).exists()
}

/// The classifier's tensors as the artifact names them: the backbone's with timm's names,
/// the head's under `head.` (PyTorch layouts).
pub fn named_tensors(model: &Classifier) -> Vec<(String, TensorData)> {
    model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|tensor| {
            let name = tensor
                .name
                .strip_prefix("backbone.")
                .map(str::to_string)
                .unwrap_or_else(|| tensor.name.clone());
            let shape: Vec<usize> = tensor.shape.iter().copied().collect();
            // The tensors live in memory; reading one back cannot fail. The master weights are
            // f32; anything else is widened, so an artifact always holds f32.
            let bytes = tensor.to_bytes().expect("a model tensor reads back");
            let data = TensorData::from_bytes(bytes, shape, tensor.dtype).convert::<f32>();
            (name, data)
        })
        .collect()
}

/// Load tensors named as [`named_tensors`] names them into `model`; every tensor of the model
/// must be there, with its shape.
pub fn apply_named_tensors(
    mut model: Classifier,
    tensors: impl IntoIterator<Item = (String, TensorData)>,
    path: &Path,
) -> Result<Classifier, ArtifactError> {
    let bad = |reason: String| ArtifactError::BadWeights {
        path: path.to_path_buf(),
        reason,
    };
    let pack: Vec<burn::store::burn_pack::Tensor> = tensors
        .into_iter()
        .map(|(name, data)| {
            let name = if name.starts_with("head.") {
                name
            } else {
                format!("backbone.{name}")
            };
            let shape: Vec<usize> = data.shape().iter().copied().collect();
            burn::store::burn_pack::Tensor::new(name, DType::F32, shape, None, data.into_bytes())
        })
        .collect();
    let result = model.apply(pack, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    if !result.errors.is_empty() {
        return Err(bad(result
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")));
    }
    if let Some((name, _)) = result.missing.first() {
        return Err(bad(format!(
            "tensor `{name}` is missing ({} missing in all)",
            result.missing.len()
        )));
    }
    if let Some(name) = result.unused.first() {
        return Err(bad(format!("unexpected tensor `{name}`")));
    }
    Ok(model)
}

/// Write `card` and `model` into `dir`, the card with the model's BatchNorm epsilon. Without
/// `overwrite`, a folder that holds a model is refused. Files are written under temporary
/// names and renamed into place, the card last (and an old card removed first), so the folder
/// never pairs a card with other weights.
pub fn save(
    dir: &Path,
    card: &ModelCard,
    model: &Classifier,
    overwrite: bool,
) -> Result<(), ArtifactError> {
    if exists(dir) && !overwrite {
        return Err(ArtifactError::Exists(dir.to_path_buf()));
    }
    let io = |source| ArtifactError::Io {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    let weights_tmp = dir.join(format!(".{WEIGHTS_FILE}.partial"));
    // One key: safetensors writes its metadata in hash order, and files should not differ
    // from run to run.
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    tensor_file::write(&weights_tmp, &named_tensors(model), metadata)?;
    let card = ModelCard {
        batch_norm_epsilon: model.backbone.batch_norm_epsilon(),
        ..card.clone()
    };
    let json = serde_json::to_vec_pretty(&card).expect("a model card serialises");
    let card_tmp = dir.join(format!(".{CARD_FILE}.partial"));
    tensor_file::write_atomically(&card_tmp, &json).map_err(io)?;
    match fs::remove_file(dir.join(CARD_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    fs::rename(&weights_tmp, dir.join(WEIGHTS_FILE)).map_err(io)?;
    fs::rename(&card_tmp, dir.join(CARD_FILE)).map_err(io)
}

/// Read the card of the model in `dir`.
pub fn load_card(dir: &Path) -> Result<ModelCard, ArtifactError> {
    let path = dir.join(CARD_FILE);
    let text = fs::read(&path).map_err(|_| ArtifactError::Missing(dir.to_path_buf()))?;
    let card: ModelCard = serde_json::from_slice(&text).map_err(|e| ArtifactError::BadCard {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if card.format_version != FORMAT_VERSION {
        return Err(ArtifactError::BadCard {
            path,
            reason: format!(
                "format version {} (this Lanner reads version {FORMAT_VERSION}); use the Lanner \
                 version that wrote it ({})",
                card.format_version, card.lanner_version
            ),
        });
    }
    Ok(card)
}

/// The card of the Lanner model that a weights file comes from, when `weights` is the
/// [`WEIGHTS_FILE`] of a model folder (one with a [`CARD_FILE`]); `None` for any other
/// checkpoint (timm's, torchvision's).
pub fn card_beside(weights: &Path) -> Result<Option<ModelCard>, ArtifactError> {
    match weights.parent() {
        Some(dir) if weights.file_name() == Some(WEIGHTS_FILE.as_ref()) && exists(dir) => {
            load_card(dir).map(Some)
        }
        _ => Ok(None),
    }
}

/// Load the model in `dir` onto `device`: its card and the classifier with its weights.
pub fn load(dir: &Path, device: &Device) -> Result<(ModelCard, Classifier), ArtifactError> {
    let card = load_card(dir)?;
    let entry = card
        .model_entry()
        .map_err(|reason| ArtifactError::BadCard {
            path: dir.join(CARD_FILE),
            reason,
        })?;
    let mut model = Classifier::new(entry, card.class_names.len(), card.head.dropout, device);
    model.backbone = model
        .backbone
        .with_batch_norm_epsilon(card.batch_norm_epsilon);
    let path = dir.join(WEIGHTS_FILE);
    let tensors = tensor_file::read(&path)?;
    let model = apply_named_tensors(model, tensors, &path)?;
    Ok((card, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(entry: &ModelEntry) -> ModelCard {
        let hyperparameters = Hyperparameters::for_model(entry);
        let recipe = Recipe::for_hyperparameters(&hyperparameters);
        ModelCard::new(entry, vec!["a".into(), "b".into()], hyperparameters, recipe)
    }

    #[test]
    fn the_batch_norm_epsilon_is_saved_and_reloaded() {
        let entry = lanner_models::find("mobilenet_v3_small_050").unwrap();
        let device = Device::flex();
        let dir = tempfile::tempdir().unwrap();
        let mut model = Classifier::seeded(entry, 2, 0.2, 3, &device);
        model.backbone = model.backbone.with_batch_norm_epsilon(1e-3);
        let card = card(entry);
        assert_eq!(card.batch_norm_epsilon, 1e-5);
        save(dir.path(), &card, &model, false).unwrap();
        let (loaded_card, loaded) = load(dir.path(), &device).unwrap();
        assert_eq!(
            loaded_card.batch_norm_epsilon, 1e-3,
            "the model's, not the card's"
        );
        assert_eq!(loaded.backbone.batch_norm_epsilon(), 1e-3);
    }

    #[test]
    fn a_card_without_the_epsilon_reads_as_timms() {
        let entry = lanner_models::find("mobilenet_v3_small_050").unwrap();
        let mut json = serde_json::to_value(card(entry)).unwrap();
        json.as_object_mut().unwrap().remove("batch_norm_epsilon");
        let read: ModelCard = serde_json::from_value(json).unwrap();
        assert_eq!(read.batch_norm_epsilon, 1e-5);
    }
}
