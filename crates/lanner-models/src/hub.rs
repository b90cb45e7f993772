//! Where a backbone's starting weights come from: `--weights imagenet|PATH|none`.
//!
//! - `none`: random initialisation, timm's scheme (what the constructors do).
//! - a path: that checkpoint file, which must exist.
//! - `imagenet`: the registry entry's timm hub repository (`timm/<name>.<tag>`), file
//!   `model.safetensors`, looked up in the Hugging Face cache laid out as `huggingface_hub`
//!   lays it out, and downloaded into it (with the `hf-hub` crate) when not there and the hub
//!   may be reached.
//!
//! The cache directory is `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE` (its older name),
//! else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` forbids network access; `HF_ENDPOINT`
//! replaces `https://huggingface.co`. Inside it, a repository `timm/x.y` lives in
//! `models--timm--x.y/`: `refs/main` holds the commit hash of the `main` branch and
//! `snapshots/<hash>/model.safetensors` is the file (a link into `blobs/`). A snapshot folder
//! named `main` itself is accepted too, as `huggingface_hub.try_to_load_from_cache` does; that
//! is where a user without internet is told to place a file fetched elsewhere.
//!
//! The environment is read in one place, [`HubConfig::from_env`]; everything else takes a
//! [`HubConfig`], so tests choose their cache and never touch the network.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::tensor::Device;

use crate::backbone::Backbone;
use crate::registry::{MODELS, ModelEntry};
use crate::weights::WeightsError;

/// The file timm's hub repositories hold the weights in.
pub const HUB_FILENAME: &str = "model.safetensors";

/// The Hugging Face hub, where `HF_ENDPOINT` does not point elsewhere.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The branch whose weights `imagenet` means.
const REVISION: &str = "main";

/// What the user asked the backbone to start from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightsSpec {
    /// The ImageNet weights timm publishes for the model, from the Hugging Face hub.
    ImageNet,
    /// A checkpoint file.
    Path(PathBuf),
    /// Random initialisation (timm's scheme).
    None,
}

impl FromStr for WeightsSpec {
    type Err = String;

    /// `imagenet` and `none` (any case) are the keywords; anything else is a path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            Err("expected `imagenet`, `none` or the path of a checkpoint file".to_string())
        } else if s.eq_ignore_ascii_case("imagenet") {
            Ok(Self::ImageNet)
        } else if s.eq_ignore_ascii_case("none") {
            Ok(Self::None)
        } else {
            Ok(Self::Path(PathBuf::from(s)))
        }
    }
}

impl fmt::Display for WeightsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ImageNet => f.write_str("imagenet"),
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::None => f.write_str("none"),
        }
    }
}

/// Where the Hugging Face cache is and whether the hub may be contacted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubConfig {
    /// The hub cache directory (the folder holding `models--<org>--<name>/`).
    pub cache_dir: PathBuf,
    /// Never contact the hub (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// The hub's URL (`HF_ENDPOINT`), without a trailing slash.
    pub endpoint: String,
    /// Show a progress bar while downloading.
    pub progress: bool,
}

impl HubConfig {
    /// An offline configuration over `cache_dir` (what tests use).
    pub fn offline(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            offline: true,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            progress: false,
        }
    }

    /// The configuration `huggingface_hub` would use, from the process environment.
    pub fn from_env() -> Result<Self, HubError> {
        Self::from_vars(|name| std::env::var_os(name), std::env::home_dir())
    }

    /// The configuration from environment variables looked up by `var` and the home
    /// directory `home`; empty variables count as unset.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<OsString>,
        home: Option<PathBuf>,
    ) -> Result<Self, HubError> {
        let var = |name: &str| var(name).filter(|value| !value.is_empty());
        let expand = |value: OsString| expand_home(PathBuf::from(value), home.as_deref());
        let cache_dir =
            if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
                expand(dir)
            } else if let Some(hf_home) = var("HF_HOME") {
                expand(hf_home).join("hub")
            } else if let Some(xdg) = var("XDG_CACHE_HOME") {
                expand(xdg).join("huggingface").join("hub")
            } else if let Some(home) = &home {
                home.join(".cache").join("huggingface").join("hub")
            } else {
                return Err(HubError::NoCacheDir);
            };
        let offline = var("HF_HUB_OFFLINE")
            .or_else(|| var("TRANSFORMERS_OFFLINE"))
            .is_some_and(|value| is_true(&value));
        let endpoint = var("HF_ENDPOINT")
            .map(|value| value.to_string_lossy().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Ok(Self {
            cache_dir,
            offline,
            endpoint,
            progress: true,
        })
    }

    /// The folder of the model repository `hub_id` in the cache.
    pub fn repo_dir(&self, hub_id: &str) -> PathBuf {
        self.cache_dir
            .join(format!("models--{}", hub_id.replace('/', "--")))
    }

    /// Where a user without internet should place the weights of `hub_id`.
    pub fn placement_path(&self, hub_id: &str) -> PathBuf {
        self.repo_dir(hub_id)
            .join("snapshots")
            .join(REVISION)
            .join(HUB_FILENAME)
    }

    /// The URL of the weights of `hub_id` on the hub.
    pub fn download_url(&self, hub_id: &str) -> String {
        format!(
            "{}/{hub_id}/resolve/{REVISION}/{HUB_FILENAME}",
            self.endpoint
        )
    }

    /// The cached weights of `hub_id`, if the cache has them: the snapshot `refs/main` names,
    /// else a snapshot folder named `main`.
    pub fn cached_file(&self, hub_id: &str) -> Option<PathBuf> {
        let repo = self.repo_dir(hub_id);
        let by_ref = std::fs::read_to_string(repo.join("refs").join(REVISION))
            .ok()
            .map(|hash| hash.trim().to_string())
            .filter(|hash| !hash.is_empty() && !hash.contains(['/', '\\']) && hash != "..")
            .map(|hash| repo.join("snapshots").join(hash).join(HUB_FILENAME));
        by_ref
            .into_iter()
            .chain([self.placement_path(hub_id)])
            .find(|path| path.is_file())
    }
}

/// `huggingface_hub`'s truthy environment values.
fn is_true(value: &std::ffi::OsStr) -> bool {
    let value = value.to_string_lossy();
    ["1", "on", "yes", "true"]
        .iter()
        .any(|t| value.trim().eq_ignore_ascii_case(t))
}

/// `~` and `~/…` as the home directory, as Python's `os.path.expanduser` does.
fn expand_home(path: PathBuf, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path,
    }
}

/// What the backbone starts from, once the request is resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolvedWeights {
    /// Random initialisation.
    Random,
    /// The checkpoint at this path.
    File(PathBuf),
}

/// Why the hub could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// `HF_HUB_OFFLINE` is set.
    Offline,
    /// The download failed; what the client said.
    Download(String),
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Offline => f.write_str("HF_HUB_OFFLINE is set"),
            Self::Download(message) => {
                write!(
                    f,
                    "downloading it from the Hugging Face hub failed: {message}"
                )
            }
        }
    }
}

/// Why the requested weights could not be found or loaded.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// `--weights PATH` names no file.
    #[error(
        "weights file `{}` does not exist; pass the path of a checkpoint file, `imagenet` for \
         the ImageNet weights or `none` for random initialisation",
        path.display()
    )]
    PathNotFound {
        /// The path given.
        path: PathBuf,
    },
    /// `--weights PATH` names a directory or other non-file.
    #[error(
        "weights path `{}` is not a file; pass the path of a checkpoint file, `imagenet` for \
         the ImageNet weights or `none` for random initialisation",
        path.display()
    )]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// `imagenet` for a model timm publishes no weights for.
    #[error(
        "no ImageNet weights exist for `{model}` (timm publishes none for `{timm_name}`); \
         use `none` to start from random initialisation, pass a checkpoint file, or choose a \
         model that has them: {}",
        with_weights.join(", ")
    )]
    NoPretrained {
        /// Lanner's name of the model.
        model: String,
        /// timm's name of the model.
        timm_name: String,
        /// The models that have ImageNet weights.
        with_weights: Vec<&'static str>,
    },
    /// `imagenet`, not in the cache, and the hub cannot be used.
    #[error(
        "the ImageNet weights of `{model}` are not in the Hugging Face cache and {reason}; on \
         a machine with internet, download {url} and place the file at `{}` (or pass its path \
         instead of `imagenet`)",
        expected.display()
    )]
    NotCached {
        /// Lanner's name of the model.
        model: String,
        /// The hub repository.
        hub_id: String,
        /// Where to place the file.
        expected: PathBuf,
        /// Where to fetch it from.
        url: String,
        /// Why it was not downloaded.
        reason: Unreachable,
    },
    /// No home directory and no variable that names the cache.
    #[error(
        "cannot locate the Hugging Face cache: there is no home directory; set HF_HOME or \
         HF_HUB_CACHE"
    )]
    NoCacheDir,
    /// The file was found but does not load.
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Resolve `spec` for `entry`: the file to load, or random initialisation. `imagenet` reads
/// the cache in `hub` and, unless `hub.offline`, downloads into it when the file is missing.
pub fn resolve(
    entry: &ModelEntry,
    spec: &WeightsSpec,
    hub: &HubConfig,
) -> Result<ResolvedWeights, HubError> {
    match spec {
        WeightsSpec::None => Ok(ResolvedWeights::Random),
        WeightsSpec::Path(path) => {
            if path.is_file() {
                Ok(ResolvedWeights::File(path.clone()))
            } else if path.exists() {
                Err(HubError::NotAFile { path: path.clone() })
            } else {
                Err(HubError::PathNotFound { path: path.clone() })
            }
        }
        WeightsSpec::ImageNet => imagenet_file(entry, hub).map(ResolvedWeights::File),
    }
}

/// Build `entry`'s backbone on `device` and load the weights `spec` asks for.
pub fn load_backbone(
    entry: &ModelEntry,
    spec: &WeightsSpec,
    hub: &HubConfig,
    device: &Device,
) -> Result<Backbone, HubError> {
    let resolved = resolve(entry, spec, hub)?;
    let backbone = entry.init_backbone(device);
    match resolved {
        ResolvedWeights::Random => Ok(backbone),
        ResolvedWeights::File(path) => Ok(entry.load_weights(backbone, &path)?),
    }
}

fn imagenet_file(entry: &ModelEntry, hub: &HubConfig) -> Result<PathBuf, HubError> {
    let Some(hub_id) = entry.pretrained.hub_id else {
        return Err(HubError::NoPretrained {
            model: entry.name.to_string(),
            timm_name: entry.timm_name.to_string(),
            with_weights: MODELS
                .iter()
                .filter(|m| m.pretrained.hub_id.is_some())
                .map(|m| m.name)
                .collect(),
        });
    };
    if let Some(path) = hub.cached_file(hub_id) {
        return Ok(path);
    }
    let not_cached = |reason| HubError::NotCached {
        model: entry.name.to_string(),
        hub_id: hub_id.to_string(),
        expected: hub.placement_path(hub_id),
        url: hub.download_url(hub_id),
        reason,
    };
    if hub.offline {
        return Err(not_cached(Unreachable::Offline));
    }
    download(hub, hub_id).map_err(|message| not_cached(Unreachable::Download(message)))
}

/// Download the weights of `hub_id` into the cache (blob, snapshot link and `refs/main`, as
/// `huggingface_hub` writes them). Not exercised by the tests: they have no network.
fn download(hub: &HubConfig, hub_id: &str) -> Result<PathBuf, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(hub.cache_dir.clone()))
        .with_endpoint(hub.endpoint.clone())
        .with_progress(hub.progress)
        .build()
        .map_err(|e| e.to_string())?;
    api.model(hub_id.to_string())
        .download(HUB_FILENAME)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)], home: Option<&str>) -> HubConfig {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        HubConfig::from_vars(|name| vars.get(name).cloned(), home.map(PathBuf::from)).unwrap()
    }

    #[test]
    fn parses_keywords_and_paths() {
        assert_eq!("imagenet".parse(), Ok(WeightsSpec::ImageNet));
        assert_eq!("ImageNet".parse(), Ok(WeightsSpec::ImageNet));
        assert_eq!("none".parse(), Ok(WeightsSpec::None));
        assert_eq!(
            "w/model.safetensors".parse(),
            Ok(WeightsSpec::Path(PathBuf::from("w/model.safetensors")))
        );
        assert!("".parse::<WeightsSpec>().is_err());
        assert_eq!(WeightsSpec::ImageNet.to_string(), "imagenet");
    }

    #[test]
    fn hf_hub_cache_beats_hf_home_beats_xdg_beats_home() {
        let all = [
            ("HF_HUB_CACHE", "/hub-cache"),
            ("HF_HOME", "/hf-home"),
            ("XDG_CACHE_HOME", "/xdg"),
        ];
        let home = Some("/home/u");
        assert_eq!(config(&all, home).cache_dir, PathBuf::from("/hub-cache"));
        assert_eq!(
            config(&all[1..], home).cache_dir,
            PathBuf::from("/hf-home/hub")
        );
        assert_eq!(
            config(&all[2..], home).cache_dir,
            PathBuf::from("/xdg/huggingface/hub")
        );
        assert_eq!(
            config(&[], home).cache_dir,
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
        // The older name of HF_HUB_CACHE still counts, below the newer one.
        assert_eq!(
            config(
                &[("HUGGINGFACE_HUB_CACHE", "/old"), ("HF_HOME", "/h")],
                home
            )
            .cache_dir,
            PathBuf::from("/old")
        );
        // Empty variables are unset; `~` is the home directory.
        assert_eq!(
            config(&[("HF_HUB_CACHE", ""), ("HF_HOME", "~/hf")], home).cache_dir,
            PathBuf::from("/home/u/hf/hub")
        );
        assert!(matches!(
            HubConfig::from_vars(|_| None, None),
            Err(HubError::NoCacheDir)
        ));
    }

    #[test]
    fn offline_and_endpoint_follow_huggingface_hub() {
        assert!(!config(&[], Some("/h")).offline);
        for value in ["1", "ON", "yes", "True"] {
            assert!(config(&[("HF_HUB_OFFLINE", value)], Some("/h")).offline);
        }
        for value in ["0", "off", "no", ""] {
            assert!(!config(&[("HF_HUB_OFFLINE", value)], Some("/h")).offline);
        }
        assert!(config(&[("TRANSFORMERS_OFFLINE", "1")], Some("/h")).offline);
        let hub = config(&[("HF_ENDPOINT", "https://mirror.example/")], Some("/h"));
        assert_eq!(
            hub.download_url("timm/x.y"),
            "https://mirror.example/timm/x.y/resolve/main/model.safetensors"
        );
        assert_eq!(
            config(&[], Some("/h")).download_url("timm/x.y"),
            "https://huggingface.co/timm/x.y/resolve/main/model.safetensors"
        );
    }

    #[test]
    fn lays_out_repositories_like_huggingface_hub() {
        let hub = HubConfig::offline("/c");
        assert_eq!(
            hub.repo_dir("timm/mobilenetv3_large_100.ra_in1k"),
            PathBuf::from("/c/models--timm--mobilenetv3_large_100.ra_in1k")
        );
        assert_eq!(
            hub.placement_path("timm/mobilenetv3_large_100.ra_in1k"),
            PathBuf::from(
                "/c/models--timm--mobilenetv3_large_100.ra_in1k/snapshots/main/model.safetensors"
            )
        );
    }
}
