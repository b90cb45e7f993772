//! S3 through the AWS SDK for Rust: `s3://bucket/prefix` URIs, a client built from the
//! standard credential chain (with `--endpoint-url`/`AWS_ENDPOINT_URL` and
//! `--region`/`AWS_REGION`), downloading a prefix into a folder and uploading a file.
//!
//! The rest of Lanner is synchronous: the client owns a small tokio runtime and blocks on
//! each call.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use tokio::runtime::Runtime;

/// `s3://bucket/key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Uri {
    pub bucket: String,
    /// The key or key prefix, without a leading `/`; may be empty.
    pub key: String,
}

impl S3Uri {
    /// Whether `text` names an S3 location.
    pub fn is_s3(text: &str) -> bool {
        text.starts_with("s3://")
    }

    /// Parses `s3://bucket[/key]`.
    pub fn parse(text: &str) -> Result<Self> {
        let Some(rest) = text.strip_prefix("s3://") else {
            bail!("`{text}` is not an S3 URI; write s3://bucket/prefix");
        };
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("`{text}` names no bucket; write s3://bucket/prefix");
        }
        Ok(Self {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// This location with `part` appended as a path segment.
    pub fn join(&self, part: &str) -> Self {
        let key = match self.key.trim_end_matches('/') {
            "" => part.to_string(),
            prefix => format!("{prefix}/{part}"),
        };
        Self {
            bucket: self.bucket.clone(),
            key,
        }
    }
}

impl fmt::Display for S3Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// Where and how to reach S3, beyond the standard chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Another endpoint (MinIO, moto, LocalStack); `AWS_ENDPOINT_URL` is read too.
    pub endpoint_url: Option<String>,
    /// The region, over `AWS_REGION` and the profile's.
    pub region: Option<String>,
}

/// A connected S3 client.
pub struct S3Client {
    runtime: Runtime,
    client: Client,
}

impl S3Client {
    /// Loads the configuration (credentials, region, endpoint) as the AWS CLI would.
    pub fn connect(options: &S3Options) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime for S3 requests")?;
        // rustls with ring: no aws-lc build (see the workspace Cargo.toml).
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http_client);
        if let Some(url) = &options.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some(region) = &options.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = runtime.block_on(loader.load());
        if shared.region().is_none() {
            bail!("no AWS region is configured for S3: pass --region or set AWS_REGION");
        }
        // A custom endpoint rarely resolves bucket.host names: address buckets by path.
        let custom_endpoint = options.endpoint_url.is_some()
            || ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]
                .iter()
                .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(custom_endpoint)
            .build();
        Ok(Self {
            runtime,
            client: Client::from_conf(config),
        })
    }

    /// Downloads every object under `uri` into `dest`, keeping the key below the prefix as
    /// the relative path (`s3://b/train/cat/1.jpg` → `dest/cat/1.jpg`). A URI naming one
    /// object downloads that object. Returns the number of files.
    pub fn download(&self, uri: &S3Uri, dest: &Path) -> Result<usize> {
        let objects = self.list(uri)?;
        let prefix = uri.key.as_str();
        let mut files = 0;
        for key in objects {
            let relative = if key == prefix {
                key.rsplit('/').next().unwrap_or(&key).to_string()
            } else if prefix.is_empty() || prefix.ends_with('/') {
                key[prefix.len()..].to_string()
            } else if let Some(rest) = key.strip_prefix(&format!("{prefix}/")) {
                rest.to_string()
            } else {
                // `train-extra/…` under the prefix `train`: another folder.
                continue;
            };
            if key.ends_with('/') {
                continue;
            }
            let path = dest.join(safe_relative_path(&relative, uri)?);
            self.download_object(&uri.bucket, &key, &path)?;
            files += 1;
        }
        if files == 0 {
            bail!(
                "{uri} holds no objects; check the URI (a channel names a prefix, e.g. \
                 s3://bucket/train/) and that the data was uploaded"
            );
        }
        Ok(files)
    }

    /// The keys under `uri`'s prefix.
    fn list(&self, uri: &S3Uri) -> Result<Vec<String>> {
        self.runtime.block_on(async {
            let mut keys = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&uri.bucket)
                .prefix(&uri.key)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|error| {
                    anyhow!(
                        "cannot list {uri}: {}; check the URI, the region and your AWS \
                         credentials",
                        describe(&error)
                    )
                })?;
                keys.extend(
                    page.contents()
                        .iter()
                        .filter_map(|object| object.key().map(str::to_string)),
                );
            }
            Ok(keys)
        })
    }

    fn download_object(&self, bucket: &str, key: &str, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create the folder '{}'", parent.display()))?;
        }
        self.runtime.block_on(async {
            let object = self
                .client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|error| {
                    anyhow!("cannot download s3://{bucket}/{key}: {}", describe(&error))
                })?;
            let mut body = object.body;
            let mut file = std::fs::File::create(path)
                .with_context(|| format!("cannot create '{}'", path.display()))?;
            while let Some(chunk) = body.next().await {
                let chunk = chunk
                    .with_context(|| format!("the download of s3://{bucket}/{key} broke off"))?;
                std::io::Write::write_all(&mut file, &chunk)
                    .with_context(|| format!("cannot write '{}'", path.display()))?;
            }
            Ok(())
        })
    }

    /// Uploads the file at `path` to `uri` (one PUT: up to 5 GB).
    pub fn upload(&self, path: &Path, uri: &S3Uri) -> Result<()> {
        self.runtime.block_on(async {
            let body = ByteStream::from_path(path)
                .await
                .with_context(|| format!("cannot read '{}'", path.display()))?;
            self.client
                .put_object()
                .bucket(&uri.bucket)
                .key(&uri.key)
                .body(body)
                .send()
                .await
                .map_err(|error| anyhow!("cannot upload to {uri}: {}", describe(&error)))?;
            Ok(())
        })
    }

    /// Whether any object lies under `uri`'s prefix.
    pub fn has_objects(&self, uri: &S3Uri) -> Result<bool> {
        self.runtime.block_on(async {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&uri.bucket)
                .prefix(&uri.key)
                .max_keys(1)
                .send()
                .await
                .map_err(|error| {
                    anyhow!(
                        "cannot list {uri}: {}; check the URI, the region and your AWS \
                         credentials",
                        describe(&error)
                    )
                })?;
            Ok(page.key_count().unwrap_or(0) > 0 || !page.contents().is_empty())
        })
    }
}

/// A key's relative path, refused when it would leave the channel folder.
fn safe_relative_path(relative: &str, uri: &S3Uri) -> Result<PathBuf> {
    let path = PathBuf::from(relative.trim_start_matches('/'));
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        bail!(
            "{uri} holds the key `{relative}`, which would be written outside the channel folder"
        );
    }
    Ok(path)
}

/// An SDK error as a short phrase: the service's code and message, or why no answer came.
fn describe<E, R>(error: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    match error {
        SdkError::ServiceError(service) => {
            let error = service.err();
            match (error.code(), error.message()) {
                (Some(code), Some(message)) => format!("{code} ({message})"),
                (Some(code), None) => code.to_string(),
                _ => DisplayErrorContext(error).to_string(),
            }
        }
        other => DisplayErrorContext(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_joins_uris() {
        let uri = S3Uri::parse("s3://bucket/jobs").unwrap();
        assert_eq!(uri.bucket, "bucket");
        assert_eq!(uri.key, "jobs");
        assert_eq!(
            uri.join("job-1")
                .join("output")
                .join("model.tar.gz")
                .to_string(),
            "s3://bucket/jobs/job-1/output/model.tar.gz"
        );
        assert_eq!(
            S3Uri::parse("s3://bucket").unwrap().join("a").to_string(),
            "s3://bucket/a"
        );
        assert_eq!(S3Uri::parse("s3://bucket/p/").unwrap().join("a").key, "p/a");
        assert!(S3Uri::parse("s3:///key").is_err());
        assert!(S3Uri::parse("/data").is_err());
    }

    #[test]
    fn keys_cannot_escape_the_channel_folder() {
        let uri = S3Uri::parse("s3://b/p").unwrap();
        assert_eq!(
            safe_relative_path("a/b.jpg", &uri).unwrap(),
            PathBuf::from("a/b.jpg")
        );
        assert!(safe_relative_path("../x", &uri).is_err());
    }
}
