//! Pretrained-weight import: timm (and, for MobileNetV3, torchvision) checkpoints in
//! safetensors or PyTorch (`torch.save`, `.pth` / `.bin`) format, loaded through burn-store.
//!
//! The format is read from the file's first bytes, not its extension. A PyTorch checkpoint
//! may nest its state dict under `state_dict`, `model_state_dict` or `model` (training
//! checkpoints do) and prefix it with `module.` (`nn.DataParallel`). Before anything is
//! applied, the checkpoint's names and shapes are compared with the module's (in PyTorch's
//! layout), so that a wrong file fails with every problem named — which tensor, the shape the
//! model expects and the shape found — and the module is left untouched.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, ModuleStore,
    PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};
use burn::tensor::DType;

use crate::backbone::Backbone;
use crate::mobilenet_v3::torchvision::{
    TORCHVISION_BATCH_NORM_EPSILON, TORCHVISION_PREFIX, torchvision_model_name, torchvision_to_timm,
};
use crate::registry::{Architecture, ModelEntry};

/// The checkpoint formats [`load_checkpoint`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// A `.safetensors` file.
    Safetensors,
    /// A file written by `torch.save` (`.pth`, `.pt`, `.bin`): zip (PyTorch 1.6+), legacy
    /// pickle or tar.
    PyTorch,
}

impl fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointFormat::Safetensors => "safetensors",
            CheckpointFormat::PyTorch => "a PyTorch checkpoint",
        })
    }
}

impl CheckpointFormat {
    /// The format of the file at `path`, from its first bytes.
    pub fn detect(path: &Path) -> Result<Self, WeightsError> {
        if !path.is_file() {
            return Err(WeightsError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let unreadable = |e: std::io::Error| WeightsError::Unreadable {
            path: path.to_path_buf(),
            format: None,
            message: e.to_string(),
        };
        let mut file = std::fs::File::open(path).map_err(unreadable)?;
        let length = file.metadata().map_err(unreadable)?.len();
        let mut head = Vec::with_capacity(512);
        file.by_ref()
            .take(512)
            .read_to_end(&mut head)
            .map_err(unreadable)?;
        Self::sniff(&head, length).ok_or_else(|| WeightsError::UnknownFormat {
            path: path.to_path_buf(),
        })
    }

    fn sniff(head: &[u8], length: u64) -> Option<Self> {
        if head.starts_with(b"PK\x03\x04") {
            // torch.save's zip archive (PyTorch 1.6+).
            return Some(CheckpointFormat::PyTorch);
        }
        if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
            // A pickle: torch.save's legacy format.
            return Some(CheckpointFormat::PyTorch);
        }
        if head.get(257..262) == Some(b"ustar") {
            // torch.save's tar format (before PyTorch 0.1.10).
            return Some(CheckpointFormat::PyTorch);
        }
        // safetensors: an 8-byte little-endian header length, then the JSON header.
        let header = u64::from_le_bytes(head.get(..8)?.try_into().ok()?);
        (head.get(8) == Some(&b'{') && header.checked_add(8)? <= length)
            .then_some(CheckpointFormat::Safetensors)
    }
}

/// What a user is told to pass, in every message about an unusable file.
const ACCEPTED: &str = "a .safetensors file, or a .pth / .bin file written by \
                        `torch.save(model.state_dict(), path)`";

/// Why a checkpoint did not load.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// No file at the path.
    #[error("weights file `{}` does not exist; pass {ACCEPTED}", path.display())]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The file is neither safetensors nor a PyTorch checkpoint.
    #[error(
        "weights file `{}` is neither safetensors nor a PyTorch checkpoint; pass {ACCEPTED}",
        path.display()
    )]
    UnknownFormat {
        /// The path given.
        path: PathBuf,
    },
    /// The file looks like `format` but cannot be read as such.
    #[error(
        "cannot read weights file `{}`{} ({message}); pass {ACCEPTED}",
        path.display(),
        format.map(|f| format!(" as {f}")).unwrap_or_default()
    )]
    Unreadable {
        /// The path given.
        path: PathBuf,
        /// The format its first bytes announce (`None`: they could not be read).
        format: Option<CheckpointFormat>,
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
    /// Where the checkpoint's names were mapped to timm's: the other library, its model of
    /// this architecture if it has one, and each mapped tensor's name in the checkpoint (by
    /// timm's name).
    pub mapped_from: Option<MappedNames>,
}

/// A checkpoint's tensor names that were not timm's, and how they were mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedNames {
    /// The library whose names the checkpoint uses (`torchvision`).
    pub library: String,
    /// Its model of the same architecture and width, if it has one.
    pub model: Option<String>,
    /// The checkpoint's name of each mapped tensor, by timm's name.
    pub original: BTreeMap<String, String>,
}

/// At most this many problems are spelled out; the rest are counted.
const LISTED: usize = 8;

impl fmt::Display for WeightsMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `name`, followed by the checkpoint's own name where it was mapped.
        let named = |name: &str| match &self.mapped_from {
            Some(m) => match m.original.get(name) {
                Some(original) => format!("`{name}` ({} `{original}`)", m.library),
                None => format!("`{name}`"),
            },
            None => format!("`{name}`"),
        };
        let problems: Vec<String> = self
            .missing
            .iter()
            .map(|(name, shape)| format!("missing tensor `{name}` (expected shape {shape:?})"))
            .chain(self.mis_shaped.iter().map(|m| {
                format!(
                    "tensor {} has shape {:?}, expected {:?}",
                    named(&m.name),
                    m.found,
                    m.expected
                )
            }))
            .chain(self.unexpected.iter().map(|(name, shape)| {
                format!("unexpected tensor {} (shape {shape:?})", named(name))
            }))
            .collect();
        write!(f, "weights file `{}` ", self.path.display())?;
        if let Some(m) = &self.mapped_from {
            write!(f, "(with {}'s tensor names, mapped to timm's) ", m.library)?;
        }
        write!(f, "does not fit {}: ", self.model)?;
        write!(f, "{}", problems[..problems.len().min(LISTED)].join("; "))?;
        if problems.len() > LISTED {
            write!(f, "; and {} more", problems.len() - LISTED)?;
        }
        write!(f, "; pass a checkpoint of timm's `{}`", self.model)?;
        match &self.mapped_from {
            Some(MappedNames {
                library,
                model: Some(model),
                ..
            }) => write!(f, " or {library}'s `{model}`"),
            Some(MappedNames {
                library,
                model: None,
                ..
            }) => write!(
                f,
                " ({library} has no model of this architecture and width)"
            ),
            None => Ok(()),
        }
    }
}

/// Tensor names a checkpoint may use instead of timm's.
pub struct OtherNames<'a> {
    /// The library they come from (`torchvision`), for messages.
    pub library: &'a str,
    /// Its model of the architecture and width loaded, if it has one, for messages.
    pub model: Option<&'a str>,
    /// A checkpoint with a tensor name that starts with this uses these names.
    pub prefix: &'a str,
    /// The library's name → timm's; `None` leaves the name as it is (then it is ignored as
    /// part of the head, or reported as unexpected).
    pub to_timm: &'a dyn Fn(&str) -> Option<String>,
}

/// What a checkpoint for one model looks like.
pub struct CheckpointSpec<'a> {
    /// The timm model the checkpoint should come from (for messages).
    pub model: &'a str,
    /// Name prefixes (after mapping to timm's names) of the checkpoint's layers after the
    /// backbone, which are not loaded.
    pub head: &'a [&'a str],
    /// Other tensor names the checkpoint may use.
    pub other_names: Option<OtherNames<'a>>,
}

/// A module with a checkpoint's weights, and what the checkpoint was.
#[derive(Debug)]
pub struct Loaded<M> {
    /// The module.
    pub module: M,
    /// The checkpoint's format.
    pub format: CheckpointFormat,
    /// Whether the checkpoint used [`CheckpointSpec::other_names`].
    pub other_names: bool,
}

fn is_ignored(name: &str, head: &[&str]) -> bool {
    // BatchNorm's batch counter is training bookkeeping PyTorch saves and burn does not keep.
    name.ends_with(".num_batches_tracked") || head.iter().any(|prefix| name.starts_with(prefix))
}

/// Where training checkpoints nest the state dict (timm's `state_dict`, the PyTorch
/// tutorials' `model_state_dict`, torchvision's reference scripts' `model`).
const NESTING_KEYS: &[&str] = &["state_dict", "model_state_dict", "model"];

/// The state dict inside a checkpoint whose nested dictionaries burn-store flattened into
/// dotted names: the tensors under the first of [`NESTING_KEYS`] present (the rest, e.g. an
/// optimizer's state, dropped), without a `module.` prefix that `nn.DataParallel` adds.
fn unnest(tensors: Vec<PackTensor>) -> Vec<PackTensor> {
    let strip = |tensors: Vec<PackTensor>, prefix: &str| -> Vec<PackTensor> {
        tensors
            .into_iter()
            .filter_map(|mut t| {
                t.name = t.name.strip_prefix(prefix)?.to_string();
                Some(t)
            })
            .collect()
    };
    let tensors = match NESTING_KEYS
        .iter()
        .map(|key| format!("{key}."))
        .find(|prefix| tensors.iter().any(|t| t.name.starts_with(prefix)))
    {
        Some(prefix) => strip(tensors, &prefix),
        None => tensors,
    };
    if !tensors.is_empty() && tensors.iter().all(|t| t.name.starts_with("module.")) {
        strip(tensors, "module.")
    } else {
        tensors
    }
}

fn read_tensors(path: &Path, format: CheckpointFormat) -> Result<Vec<PackTensor>, WeightsError> {
    let unreadable = |message: String| WeightsError::Unreadable {
        path: path.to_path_buf(),
        format: Some(format),
        message,
    };
    let tensors = match format {
        CheckpointFormat::Safetensors => SafetensorsStore::from_file(path)
            .get_all_tensors()
            .map_err(|e| unreadable(e.to_string()))?
            .values()
            .cloned()
            .collect(),
        CheckpointFormat::PyTorch => PytorchStore::from_file(path)
            .map_indices_contiguous(false)
            .get_all_tensors()
            .map_err(|e| unreadable(e.to_string()))?
            .values()
            .cloned()
            .collect(),
    };
    Ok(unnest(tensors))
}

/// Load the checkpoint at `path` (safetensors or PyTorch, told apart by content) into
/// `module`, whose tensor names are timm's.
///
/// Tensors whose names start with one of `spec.head` (the checkpoint's classifier) are
/// ignored, as is every `num_batches_tracked`; a checkpoint with [`CheckpointSpec::other_names`]
/// is mapped to timm's names first. Floating-point tensors are cast to the module's dtype.
/// Any missing, unexpected or mis-shaped tensor is a [`WeightsError::Mismatch`] naming all of
/// them, and nothing is loaded.
pub fn load_checkpoint<M: Module>(
    mut module: M,
    path: &Path,
    spec: &CheckpointSpec<'_>,
) -> Result<Loaded<M>, WeightsError> {
    let format = CheckpointFormat::detect(path)?;
    let mut tensors = read_tensors(path, format)?;

    let other = spec
        .other_names
        .as_ref()
        .filter(|other| tensors.iter().any(|t| t.name.starts_with(other.prefix)));
    let mapped_from = other.map(|other| {
        let mut original = BTreeMap::new();
        for tensor in &mut tensors {
            if let Some(timm) = (other.to_timm)(&tensor.name) {
                original.insert(timm.clone(), std::mem::replace(&mut tensor.name, timm));
            }
        }
        MappedNames {
            library: other.library.to_string(),
            model: other.model.map(str::to_string),
            original,
        }
    });
    tensors.retain(|t| !is_ignored(&t.name, spec.head));

    let expected = module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true);
    let dtype = expected
        .iter()
        .map(|t| t.dtype)
        .find(|d| d.is_float())
        .unwrap_or(DType::F32);
    let found: BTreeMap<String, Vec<usize>> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.iter().copied().collect()))
        .collect();
    let expected: BTreeMap<String, Vec<usize>> = expected
        .into_iter()
        .map(|t| (t.name, t.shape.iter().copied().collect()))
        .collect();

    let mismatch = WeightsMismatch {
        path: path.to_path_buf(),
        model: spec.model.to_string(),
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
        mapped_from,
    };
    if !(mismatch.missing.is_empty()
        && mismatch.unexpected.is_empty()
        && mismatch.mis_shaped.is_empty())
    {
        return Err(WeightsError::Mismatch(Box::new(mismatch)));
    }

    let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(dtype));
    let result = module.apply(tensors, None, Some(Box::new(adapter)), true);
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
    Ok(Loaded {
        module,
        format,
        other_names: mismatch.mapped_from.is_some(),
    })
}

/// Load a checkpoint with timm's tensor names into `module`: [`load_checkpoint`] without
/// other names. Despite the name, PyTorch checkpoints load too.
///
/// `model` names the timm model the checkpoint should come from (for messages); tensors
/// whose names start with one of `head` (the checkpoint's classifier) are ignored.
pub fn load_timm_safetensors<M: Module>(
    module: M,
    path: &Path,
    model: &str,
    head: &[&str],
) -> Result<M, WeightsError> {
    let spec = CheckpointSpec {
        model,
        head,
        other_names: None,
    };
    load_checkpoint(module, path, &spec).map(|loaded| loaded.module)
}

/// Load pretrained weights for the registry's `entry` into `backbone`: a timm checkpoint, or
/// for MobileNetV3 a torchvision one (`features.N…` names), as safetensors or a PyTorch
/// `.pth` / `.bin` file. The checkpoint's classifier is ignored. torchvision's weights also
/// set every BatchNorm's epsilon to torchvision's 1e-3, without which they do not reproduce
/// torchvision's outputs.
pub fn load_pretrained(
    entry: &ModelEntry,
    backbone: Backbone,
    path: &Path,
) -> Result<Backbone, WeightsError> {
    let to_timm;
    let other_names = match entry.architecture {
        Architecture::MobileNetV3 {
            size,
            width_multiplier,
        } => {
            to_timm = move |name: &str| torchvision_to_timm(size, name);
            Some(OtherNames {
                library: "torchvision",
                model: (width_multiplier == 1.0).then(|| torchvision_model_name(size)),
                prefix: TORCHVISION_PREFIX,
                to_timm: &to_timm,
            })
        }
        Architecture::Xception => None,
    };
    let spec = CheckpointSpec {
        model: entry.timm_name,
        head: entry.checkpoint_head(),
        other_names,
    };
    let loaded = load_checkpoint(backbone, path, &spec)?;
    Ok(if loaded.other_names {
        // torchvision's names: a torchvision MobileNetV3, trained with its epsilon.
        loaded
            .module
            .with_batch_norm_epsilon(TORCHVISION_BATCH_NORM_EPSILON)
    } else {
        loaded.module
    })
}
