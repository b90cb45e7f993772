//! Named `f32` tensors in a safetensors file, written atomically: the model weights of an
//! artifact and the optimizer state of a checkpoint.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// A tensor file that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    /// The file system refused.
    #[error("cannot {action} '{path}': {source}")]
    Io {
        /// What was being done (`write`, `read`).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bytes are not a safetensors file of `f32` tensors.
    #[error(
        "'{path}' is not a valid tensor file ({reason}); it may be truncated or from another program"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Write `tensors` (all `f32`) to `path` through a temporary file in the same folder, renamed
/// into place once complete, so a crash leaves either the old file or the new one.
pub fn write(
    path: &Path,
    tensors: &[(String, TensorData)],
    metadata: BTreeMap<String, String>,
) -> Result<(), TensorFileError> {
    let io = |source| TensorFileError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    };
    let views = tensors
        .iter()
        .map(|(name, data)| {
            let shape: Vec<usize> = data.shape().iter().copied().collect();
            TensorView::new(Dtype::F32, shape, data.as_bytes())
                .map(|view| (name.clone(), view))
                .map_err(|e| TensorFileError::Invalid {
                    path: path.to_path_buf(),
                    reason: format!("tensor `{name}`: {e}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = (!metadata.is_empty()).then(|| metadata.into_iter().collect());
    let bytes = safetensors::serialize(views, metadata).map_err(|e| TensorFileError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_atomically(path, &bytes).map_err(io)
}

/// Read every tensor of a file written by [`write()`] (or any safetensors file of `f32`
/// tensors), by name.
pub fn read(path: &Path) -> Result<BTreeMap<String, TensorData>, TensorFileError> {
    let bytes = fs::read(path).map_err(|source| TensorFileError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| TensorFileError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let file = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            if view.dtype() != Dtype::F32 {
                return Err(invalid(format!(
                    "tensor `{name}` is {:?}, expected F32",
                    view.dtype()
                )));
            }
            let data = TensorData::from_bytes_vec(view.data().to_vec(), view.shape(), DType::F32);
            Ok((name, data))
        })
        .collect()
}

/// Write `bytes` to `path` via `path.tmp-<pid>` and a rename, syncing the data first.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let result = (|| {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]);
        let b = TensorData::new(vec![-0.5f32], [1]);
        write(
            &path,
            &[("a".into(), a.clone()), ("b.x".into(), b.clone())],
            BTreeMap::from([("format".to_string(), "pt".to_string())]),
        )
        .unwrap();
        let read = read(&path).unwrap();
        assert_eq!(read["a"], a);
        assert_eq!(read["b.x"], b);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        fs::write(&path, b"not a tensor file").unwrap();
        let error = super::read(&path).unwrap_err().to_string();
        assert!(error.contains("is not a valid tensor file"), "{error}");
    }
}
