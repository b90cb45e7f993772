//! Pretrained-weight import: a timm checkpoint in safetensors format, timm's tensor names,
//! loaded through burn-store.
//!
//! Before anything is applied, the checkpoint's names and shapes are compared with the
//! module's (in PyTorch's layout), so that a wrong file fails with every problem named —
//! which tensor, the shape the model expects and the shape found — and the module is left
//! untouched.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{
    BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, ModuleStore,
    PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::DType;

/// Why a checkpoint did not load.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// No file at the path.
    #[error(
        "weights file `{}` does not exist; pass the path of a .safetensors file saved from timm",
        path.display()
    )]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The file is not a readable safetensors file.
    #[error(
        "cannot read weights file `{}` as safetensors ({message}); pass a file written by \
         `safetensors.torch.save_file(model.state_dict(), path)`",
        path.display()
    )]
    Unreadable {
        /// The path given.
        path: PathBuf,
        /// What the reader said.
        message: String,
    },
    /// The checkpoint's tensors do not match the model's.
    #[error("{0}")]
    Mismatch(Box<WeightsMismatch>),
    /// burn-store could not apply a tensor that passed the checks (e.g. an unsupported dtype).
    #[error("cannot load weights file `{}`: {message}", path.display())]
    Apply {
        /// The path given.
        path: PathBuf,
        /// What burn-store said.
        message: String,
    },
}

/// A tensor the model needs and the checkpoint has with another shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// timm's tensor name.
    pub name: String,
    /// The shape the model needs (PyTorch layout).
    pub expected: Vec<usize>,
    /// The shape in the checkpoint.
    pub found: Vec<usize>,
}

/// Every difference between a checkpoint and the model it was loaded into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsMismatch {
    /// The checkpoint.
    pub path: PathBuf,
    /// The timm model the checkpoint should come from.
    pub model: String,
    /// Tensors the model needs that the checkpoint lacks, with the expected shapes.
    pub missing: Vec<(String, Vec<usize>)>,
    /// Tensors in the checkpoint the model has no place for (outside the ignored head).
    pub unexpected: Vec<(String, Vec<usize>)>,
    /// Tensors present in both with different shapes.
    pub mis_shaped: Vec<ShapeMismatch>,
}

/// At most this many problems are spelled out; the rest are counted.
const LISTED: usize = 8;

impl fmt::Display for WeightsMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let problems: Vec<String> = self
            .missing
            .iter()
            .map(|(name, shape)| format!("missing tensor `{name}` (expected shape {shape:?})"))
            .chain(self.mis_shaped.iter().map(|m| {
                format!(
                    "tensor `{}` has shape {:?}, expected {:?}",
                    m.name, m.found, m.expected
                )
            }))
            .chain(
                self.unexpected
                    .iter()
                    .map(|(name, shape)| format!("unexpected tensor `{name}` (shape {shape:?})")),
            )
            .collect();
        write!(
            f,
            "weights file `{}` does not fit {}: ",
            self.path.display(),
            self.model
        )?;
        write!(f, "{}", problems[..problems.len().min(LISTED)].join("; "))?;
        if problems.len() > LISTED {
            write!(f, "; and {} more", problems.len() - LISTED)?;
        }
        write!(
            f,
            "; pass a checkpoint of timm's `{}` saved as safetensors",
            self.model
        )
    }
}

fn is_ignored(name: &str, head: &[&str]) -> bool {
    // BatchNorm's batch counter is training bookkeeping PyTorch saves and burn does not keep.
    name.ends_with(".num_batches_tracked") || head.iter().any(|prefix| name.starts_with(prefix))
}

/// Load the safetensors checkpoint at `path`, with timm's tensor names, into `module`.
///
/// `model` names the timm model the checkpoint should come from (for messages); tensors
/// whose names start with one of `head` (the checkpoint's classifier) are ignored, as is every
/// `num_batches_tracked`. Floating-point tensors are cast to the module's dtype.
pub fn load_timm_safetensors<M: Module>(
    mut module: M,
    path: &Path,
    model: &str,
    head: &[&str],
) -> Result<M, WeightsError> {
    if !path.is_file() {
        return Err(WeightsError::NotFound {
            path: path.to_path_buf(),
        });
    }
    let expected = module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true);
    let dtype = expected
        .iter()
        .map(|t| t.dtype)
        .find(|d| d.is_float())
        .unwrap_or(DType::F32);
    let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(dtype));
    let mut store = SafetensorsStore::from_file(path)
        .skip_enum_variants(true)
        .allow_partial(true)
        .with_from_adapter(adapter);

    let found: BTreeMap<String, Vec<usize>> = store
        .get_all_tensors()
        .map_err(|e| WeightsError::Unreadable {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .iter()
        .filter(|(name, _)| !is_ignored(name, head))
        .map(|(name, t)| (name.clone(), t.shape.iter().copied().collect()))
        .collect();
    let expected: BTreeMap<String, Vec<usize>> = expected
        .into_iter()
        .map(|t| (t.name, t.shape.iter().copied().collect()))
        .collect();

    let mismatch = WeightsMismatch {
        path: path.to_path_buf(),
        model: model.to_string(),
        missing: expected
            .iter()
            .filter(|(name, _)| !found.contains_key(*name))
            .map(|(name, shape)| (name.clone(), shape.clone()))
            .collect(),
        unexpected: found
            .iter()
            .filter(|(name, _)| !expected.contains_key(*name))
            .map(|(name, shape)| (name.clone(), shape.clone()))
            .collect(),
        mis_shaped: expected
            .iter()
            .filter_map(|(name, shape)| {
                let found = found.get(name)?;
                (found != shape).then(|| ShapeMismatch {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: found.clone(),
                })
            })
            .collect(),
    };
    if !(mismatch.missing.is_empty()
        && mismatch.unexpected.is_empty()
        && mismatch.mis_shaped.is_empty())
    {
        return Err(WeightsError::Mismatch(Box::new(mismatch)));
    }

    let result = module
        .load_from(&mut store)
        .map_err(|e| WeightsError::Apply {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        let message = result
            .errors
            .iter()
            .map(|e| e.to_string())
            .chain(
                result
                    .missing
                    .iter()
                    .map(|(name, _)| format!("`{name}` not applied")),
            )
            .collect::<Vec<_>>()
            .join("; ");
        return Err(WeightsError::Apply {
            path: path.to_path_buf(),
            message,
        });
    }
    Ok(module)
}
