//! Where a model to serve comes from: `--model` names a model folder, a folder that holds the
//! model in a sub-folder (SageMaker's TF Serving layout: `1/`), or a `model.tar.gz` of either.
//! Archives are unpacked safely ([`crate::archive`]) into a temporary folder that lives as
//! long as the [`ModelDir`].

use std::fs;
use std::path::{Path, PathBuf};

use lanner_train::artifact::{self, ArtifactError, CARD_FILE};
use tempfile::TempDir;

use crate::archive::{self, ArchiveError, ArchiveLimits};

/// How deep below the given folder `lanner.json` is looked for (`model/1/lanner.json` is two).
const MAX_DEPTH: usize = 3;

/// A model folder ready to load, and the unpacked archive it may live in.
#[derive(Debug)]
pub struct ModelDir {
    /// The folder that holds `lanner.json` and `weights.safetensors`.
    pub path: PathBuf,
    /// What the user passed.
    pub source: PathBuf,
    /// The unpacked archive, removed on drop.
    _unpacked: Option<TempDir>,
}

/// Why `--model` does not lead to a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    /// An S3 URI.
    #[error(
        "'{0}' is an S3 URI and a model folder must be local: download it first (`lanner predict` and `lanner serve` do that for an s3:// --model)"
    )]
    S3(String),
    /// Nothing at the path.
    #[error(
        "the model '{0}' does not exist; pass the --model-dir of a `lanner train` run or its model.tar.gz"
    )]
    Missing(PathBuf),
    /// A file that is not an archive.
    #[error(
        "'{0}' is neither a model folder nor a model.tar.gz; pass the --model-dir of a `lanner train` run or its model.tar.gz"
    )]
    NotAModel(PathBuf),
    /// A folder without `lanner.json` where it is looked for.
    #[error(
        "'{0}' holds no Lanner model (no lanner.json at its top or in a single sub-folder); pass the --model-dir of a `lanner train` run or its model.tar.gz"
    )]
    NoCard(PathBuf),
    /// Several sub-folders hold a model and none is clearly the one.
    #[error(
        "'{path}' holds several models ({}); pass the folder of the one to serve",
        .candidates.join(", ")
    )]
    Ambiguous {
        /// The folder.
        path: PathBuf,
        /// The sub-folders with a `lanner.json`.
        candidates: Vec<String>,
    },
    /// A model found through a link that leads out of the unpacked archive.
    #[error(
        "the model in '{0}' is reached through a link that leads outside the archive; refusing to load it"
    )]
    Escapes(PathBuf),
    /// The archive was refused.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// No temporary folder for the archive.
    #[error(
        "cannot create a temporary folder to unpack '{path}': {source}; set TMPDIR to a writable folder"
    )]
    TempDir {
        /// The archive.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The card is unreadable.
    #[error(transparent)]
    Card(#[from] ArtifactError),
}

impl ModelDir {
    /// Resolves `source` (a folder, an archive, or an `s3://` URI, which is refused) to the
    /// folder that holds the model.
    pub fn open(source: &Path) -> Result<Self, ModelDirError> {
        Self::open_with_limits(source, ArchiveLimits::default())
    }

    /// [`ModelDir::open`] with other archive limits.
    pub fn open_with_limits(source: &Path, limits: ArchiveLimits) -> Result<Self, ModelDirError> {
        let text = source.to_string_lossy();
        if text.starts_with("s3://") || text.starts_with("S3://") {
            return Err(ModelDirError::S3(text.into_owned()));
        }
        if !source.exists() {
            return Err(ModelDirError::Missing(source.to_path_buf()));
        }
        if source.is_dir() {
            let path = find_model(source)?;
            return Ok(Self {
                path,
                source: source.to_path_buf(),
                _unpacked: None,
            });
        }
        if !archive::is_archive(source) {
            return Err(ModelDirError::NotAModel(source.to_path_buf()));
        }
        let unpacked = tempfile::Builder::new()
            .prefix("lanner-model-")
            .tempdir()
            .map_err(|e| ModelDirError::TempDir {
                path: source.to_path_buf(),
                source: e,
            })?;
        archive::extract(source, unpacked.path(), limits)?;
        let path = find_model(unpacked.path()).map_err(|e| match e {
            ModelDirError::NoCard(_) => ModelDirError::NoCard(source.to_path_buf()),
            other => other,
        })?;
        // Links inside the archive were checked when unpacking; this makes sure of it.
        let inside = fs::canonicalize(&path)
            .ok()
            .zip(fs::canonicalize(unpacked.path()).ok())
            .is_some_and(|(model, root)| model.starts_with(root));
        if !inside {
            return Err(ModelDirError::Escapes(source.to_path_buf()));
        }
        Ok(Self {
            path,
            source: source.to_path_buf(),
            _unpacked: Some(unpacked),
        })
    }

    /// Reads the model's `lanner.json`.
    pub fn card(&self) -> Result<artifact::ModelCard, ArtifactError> {
        artifact::load_card(&self.path)
    }
}

/// The folder under `root` that holds `lanner.json`: `root` itself, or the one sub-folder that
/// holds it, looking down through single sub-folders. Several numbered sub-folders with a model
/// are versions (TF Serving's layout); the highest is served, as TF Serving does.
fn find_model(root: &Path) -> Result<PathBuf, ModelDirError> {
    let mut folder = root.to_path_buf();
    for _ in 0..=MAX_DEPTH {
        if folder.join(CARD_FILE).is_file() {
            return Ok(folder);
        }
        let subfolders = visible_subfolders(&folder);
        let with_model: Vec<&PathBuf> = subfolders
            .iter()
            .filter(|f| f.join(CARD_FILE).is_file())
            .collect();
        match with_model.as_slice() {
            [one] => return Ok((*one).clone()),
            [] if subfolders.len() == 1 => folder = subfolders[0].clone(),
            [] => break,
            several => {
                let versions: Option<Vec<(u64, &PathBuf)>> = several
                    .iter()
                    .map(|f| name_of(f).parse().ok().map(|v| (v, *f)))
                    .collect();
                if let Some(latest) = versions.and_then(|v| v.into_iter().max()) {
                    return Ok(latest.1.clone());
                }
                return Err(ModelDirError::Ambiguous {
                    path: root.to_path_buf(),
                    candidates: several.iter().map(|f| name_of(f)).collect(),
                });
            }
        }
    }
    Err(ModelDirError::NoCard(root.to_path_buf()))
}

fn visible_subfolders(folder: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !name_of(p).starts_with('.'))
        .collect();
    found.sort();
    found
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"{}").unwrap();
    }

    #[test]
    fn finds_the_card_at_the_top_or_in_a_single_sub_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("a/lanner.json"));
        assert_eq!(find_model(&root.join("a")).unwrap(), root.join("a"));
        touch(&root.join("b/model/1/lanner.json"));
        fs::write(root.join("b/README"), b"").unwrap();
        fs::create_dir_all(root.join("b/.hidden")).unwrap();
        assert_eq!(find_model(&root.join("b")).unwrap(), root.join("b/model/1"));
    }

    #[test]
    fn serves_the_highest_version_and_refuses_other_choices() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for version in ["1", "2", "10"] {
            touch(&root.join("v").join(version).join("lanner.json"));
        }
        assert_eq!(find_model(&root.join("v")).unwrap(), root.join("v/10"));
        touch(&root.join("n/cats/lanner.json"));
        touch(&root.join("n/dogs/lanner.json"));
        let error = find_model(&root.join("n")).unwrap_err().to_string();
        assert!(
            error.contains("holds several models (cats, dogs)"),
            "{error}"
        );
        fs::create_dir_all(root.join("e/x")).unwrap();
        fs::create_dir_all(root.join("e/y")).unwrap();
        let error = find_model(&root.join("e")).unwrap_err().to_string();
        assert!(
            error.contains("holds no Lanner model (no lanner.json"),
            "{error}"
        );
    }

    #[test]
    fn s3_and_missing_paths_are_named() {
        let error = ModelDir::open(Path::new("s3://bucket/model.tar.gz")).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("is an S3 URI and a model folder must be local: download it first")
        );
        let error = ModelDir::open(Path::new("/no/such/model")).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the model '/no/such/model' does not exist")
        );
    }
}
