//! Putting a channel's data where a training container finds it (`input/data/<channel>/`):
//! from a local folder by hard links (a copy where links cannot be made: another file
//! system), or from an S3 prefix by download. The user's data is only read.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::s3::{S3Client, S3Options, S3Uri};

/// Where a channel's data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// A folder (or one file) on this machine.
    Local(PathBuf),
    /// An S3 prefix (or one object).
    S3(S3Uri),
}

impl DataSource {
    /// `s3://bucket/prefix`, `file:///path`, or a path.
    pub fn parse(text: &str) -> Result<Self> {
        if S3Uri::is_s3(text) {
            Ok(Self::S3(S3Uri::parse(text)?))
        } else if let Some(path) = text.strip_prefix("file://") {
            Ok(Self::Local(PathBuf::from(path)))
        } else if text.contains("://") {
            bail!("`{text}` is neither a local path nor an s3:// URI")
        } else {
            Ok(Self::Local(PathBuf::from(text)))
        }
    }

    /// As SageMaker's local mode writes it in a job description (`file:///abs/path`).
    pub fn uri(&self) -> String {
        match self {
            Self::Local(path) => {
                let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
                format!("file://{}", absolute.display())
            }
            Self::S3(uri) => uri.to_string(),
        }
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(path) => write!(f, "{}", path.display()),
            Self::S3(uri) => write!(f, "{uri}"),
        }
    }
}

/// What staging did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Staged {
    /// Files hard-linked from a local folder.
    pub linked: usize,
    /// Files copied from a local folder.
    pub copied: usize,
    /// Objects downloaded from S3.
    pub downloaded: usize,
}

impl fmt::Display for Staged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (count, what) in [
            (self.linked, "hard-linked"),
            (self.copied, "copied"),
            (self.downloaded, "downloaded"),
        ] {
            if count > 0 {
                parts.push(format!("{count} files {what}"));
            }
        }
        if parts.is_empty() {
            f.write_str("no files")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Stages channels, connecting to S3 the first time a channel needs it.
pub struct Stager {
    options: S3Options,
    client: Option<S3Client>,
}

impl Stager {
    pub fn new(options: S3Options) -> Self {
        Self {
            options,
            client: None,
        }
    }

    /// The S3 client, connected on first use.
    pub fn s3(&mut self) -> Result<&S3Client> {
        if self.client.is_none() {
            self.client = Some(S3Client::connect(&self.options)?);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// Puts `channel`'s data from `source` into `dest`, which must not exist yet or be empty.
    pub fn stage(&mut self, channel: &str, source: &DataSource, dest: &Path) -> Result<Staged> {
        std::fs::create_dir_all(dest)
            .with_context(|| format!("cannot create the folder '{}'", dest.display()))?;
        match source {
            DataSource::Local(path) => stage_local(channel, path, dest),
            DataSource::S3(uri) => {
                let downloaded = self
                    .s3()?
                    .download(uri, dest)
                    .with_context(|| format!("cannot stage the {channel} channel"))?;
                Ok(Staged {
                    downloaded,
                    ..Staged::default()
                })
            }
        }
    }
}

/// Links (or copies) the files of `source` into `dest`, keeping sub-folders.
pub fn stage_local(channel: &str, source: &Path, dest: &Path) -> Result<Staged> {
    let metadata = std::fs::metadata(source).map_err(|error| {
        anyhow::anyhow!(
            "the {channel} channel's data '{}' cannot be read ({error}); pass an existing \
             folder or an s3:// URI",
            source.display()
        )
    })?;
    let mut staged = Staged::default();
    if metadata.is_file() {
        let name = source.file_name().context("a file has a name")?;
        link_or_copy(source, &dest.join(name), &mut staged)?;
        return Ok(staged);
    }
    stage_folder(source, dest, &mut staged)?;
    Ok(staged)
}

fn stage_folder(source: &Path, dest: &Path, staged: &mut Staged) -> Result<()> {
    let entries = std::fs::read_dir(source)
        .with_context(|| format!("cannot read the folder '{}'", source.display()))?;
    for entry in entries {
        let entry =
            entry.with_context(|| format!("cannot read the folder '{}'", source.display()))?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        // Follow links, as a copy of the folder would.
        let metadata = std::fs::metadata(&from)
            .with_context(|| format!("cannot read '{}'", from.display()))?;
        if metadata.is_dir() {
            std::fs::create_dir_all(&to)
                .with_context(|| format!("cannot create the folder '{}'", to.display()))?;
            stage_folder(&from, &to, staged)?;
        } else if metadata.is_file() {
            link_or_copy(&from, &to, staged)?;
        }
    }
    Ok(())
}

fn link_or_copy(from: &Path, to: &Path, staged: &mut Staged) -> Result<()> {
    let target = std::fs::canonicalize(from).unwrap_or_else(|_| from.to_path_buf());
    if std::fs::hard_link(&target, to).is_ok() {
        staged.linked += 1;
        return Ok(());
    }
    std::fs::copy(&target, to)
        .with_context(|| format!("cannot copy '{}' to '{}'", from.display(), to.display()))?;
    staged.copied += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn parses_sources() {
        assert_eq!(
            DataSource::parse("data/train").unwrap(),
            DataSource::Local("data/train".into())
        );
        assert_eq!(
            DataSource::parse("file:///data/train").unwrap(),
            DataSource::Local("/data/train".into())
        );
        assert!(matches!(
            DataSource::parse("s3://b/train").unwrap(),
            DataSource::S3(_)
        ));
        assert!(DataSource::parse("http://x/y").is_err());
        assert_eq!(
            DataSource::Local("/data/train".into()).uri(),
            "file:///data/train"
        );
    }

    #[test]
    fn links_a_folder_tree_and_leaves_it_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("data");
        fs::create_dir_all(source.join("cat")).unwrap();
        fs::write(source.join("cat/1.jpg"), b"one").unwrap();
        fs::write(source.join("top.txt"), b"top").unwrap();
        let dest = dir.path().join("staged");
        let staged = Stager::new(S3Options::default())
            .stage("train", &DataSource::Local(source.clone()), &dest)
            .unwrap();
        assert_eq!(staged.linked + staged.copied, 2);
        assert_eq!(fs::read(dest.join("cat/1.jpg")).unwrap(), b"one");
        assert_eq!(fs::read(source.join("cat/1.jpg")).unwrap(), b"one");
        assert_eq!(fs::read(dest.join("top.txt")).unwrap(), b"top");
    }

    #[test]
    fn a_missing_folder_is_one_sentence_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let error = stage_local("validation", &dir.path().join("nope"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("the validation channel's data '"),
            "{error}"
        );
        assert!(
            error.ends_with("; pass an existing folder or an s3:// URI"),
            "{error}"
        );
    }
}
