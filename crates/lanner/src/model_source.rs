//! `--model` of `lanner predict` and `lanner serve`: a local folder or archive, or an `s3://`
//! URI (a `model.tar.gz`, or a prefix holding a model folder), downloaded first into a
//! temporary folder that lives as long as the returned value.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use lanner_sagemaker::s3::{S3Client, S3Options, S3Uri};
use lanner_serve::ModelDir;

/// Where to reach S3 when `--model` is an `s3://` URI.
#[derive(Args, Debug, Clone, Default)]
pub struct S3Args {
    /// The S3 endpoint for an `s3://` --model (MinIO, moto, LocalStack); AWS_ENDPOINT_URL is
    /// read too.
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// The AWS region for an `s3://` --model (default: AWS_REGION, then the profile's).
    #[arg(long)]
    pub region: Option<String>,
}

/// A model ready to open, and the download it may live in.
pub struct LocalModel {
    /// The model folder or archive on this machine.
    pub path: PathBuf,
    _download: Option<tempfile::TempDir>,
}

/// Fetch `source` when it is on S3; a local path is used as it is.
pub fn fetch(source: &Path, s3: &S3Args) -> Result<LocalModel> {
    let text = source.to_string_lossy();
    if !S3Uri::is_s3(&text) {
        return Ok(LocalModel {
            path: source.to_path_buf(),
            _download: None,
        });
    }
    let uri = S3Uri::parse(&text)?;
    let client = S3Client::connect(&S3Options {
        endpoint_url: s3.endpoint_url.clone(),
        region: s3.region.clone(),
    })?;
    let download = tempfile::Builder::new()
        .prefix("lanner-model-download-")
        .tempdir()
        .context("cannot create a temporary folder for the model download")?;
    if !client.has_objects(&uri)? {
        bail!("'{uri}' holds no objects; pass the S3 URI of a model.tar.gz or of a model folder");
    }
    client.download(&uri, download.path())?;
    // One object named by the URI (model.tar.gz) lands under its file name.
    let name = uri.key.rsplit('/').next().unwrap_or_default();
    let single = download.path().join(name);
    let path = if !name.is_empty() && single.is_file() {
        single
    } else {
        download.path().to_path_buf()
    };
    Ok(LocalModel {
        path,
        _download: Some(download),
    })
}

/// Fetch and open `source` as [`ModelDir::open`] does; an error about a download names the
/// S3 URI it came from.
pub fn open(source: &Path, s3: &S3Args) -> Result<(ModelDir, LocalModel)> {
    let local = fetch(source, s3)?;
    let model = match &local._download {
        Some(_) => ModelDir::open(&local.path)
            .with_context(|| format!("the model downloaded from {}", source.display()))?,
        None => ModelDir::open(&local.path)?,
    };
    Ok((model, local))
}
