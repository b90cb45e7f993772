//! `model.tar.gz` and `output.tar.gz`: a folder's contents, gzipped, with paths relative to
//! the folder (`lanner.json`, `weights.safetensors`), as SageMaker packs `/opt/ml/model`.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

/// Packs the files under `folder` into `archive` (written beside it, then renamed into
/// place). Returns the number of files.
pub fn pack(folder: &Path, archive: &Path) -> Result<usize> {
    let partial = archive.with_extension("partial");
    let file =
        File::create(&partial).with_context(|| format!("cannot create '{}'", partial.display()))?;
    let mut builder = tar::Builder::new(GzEncoder::new(file, Compression::default()));
    builder.follow_symlinks(true);
    let mut files = 0;
    append_folder(&mut builder, folder, Path::new(""), &mut files)?;
    builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .with_context(|| format!("cannot write '{}'", partial.display()))?;
    std::fs::rename(&partial, archive)
        .with_context(|| format!("cannot write '{}'", archive.display()))?;
    Ok(files)
}

fn append_folder<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    folder: &Path,
    relative: &Path,
    files: &mut usize,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(folder)
        .with_context(|| format!("cannot read '{}'", folder.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read '{}'", folder.display()))?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let name = relative.join(entry.file_name());
        if path.is_dir() {
            builder
                .append_dir(&name, &path)
                .with_context(|| format!("cannot pack '{}'", path.display()))?;
            append_folder(builder, &path, &name, files)?;
        } else {
            builder
                .append_path_with_name(&path, &name)
                .with_context(|| format!("cannot pack '{}'", path.display()))?;
            *files += 1;
        }
    }
    Ok(())
}

/// The file names inside `archive`.
pub fn list(archive: &Path) -> Result<Vec<String>> {
    let file =
        File::open(archive).with_context(|| format!("cannot open '{}'", archive.display()))?;
    let mut reader = tar::Archive::new(GzDecoder::new(file));
    let mut names = Vec::new();
    for entry in reader
        .entries()
        .with_context(|| format!("cannot read '{}'", archive.display()))?
    {
        let entry = entry.with_context(|| format!("cannot read '{}'", archive.display()))?;
        if entry.header().entry_type().is_file() {
            names.push(entry.path()?.display().to_string());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir_all(model.join("1")).unwrap();
        std::fs::write(model.join("lanner.json"), b"{}").unwrap();
        std::fs::write(model.join("1/weights.safetensors"), b"w").unwrap();
        let archive = dir.path().join("model.tar.gz");
        assert_eq!(pack(&model, &archive).unwrap(), 2);
        assert_eq!(
            list(&archive).unwrap(),
            ["1/weights.safetensors", "lanner.json"]
        );
        assert!(!archive.with_extension("partial").exists());
    }
}
