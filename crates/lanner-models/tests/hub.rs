//! `--weights imagenet|PATH|none`: the Hugging Face cache as `huggingface_hub` lays it out,
//! the message when it is empty and the hub is out of reach, local files and random
//! initialisation. No test touches the network: each uses its own cache, offline, or (for the
//! download failure) a closed port on this machine.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use common::{fixture, max_abs_diff, read_f32};
use lanner_models::hub::{
    HubConfig, HubError, ResolvedWeights, Unreachable, WeightsSpec, load_backbone, resolve,
};
use lanner_models::{ModelEntry, find};

const SMALL_050: &str = "mobilenet_v3_small_050";
const SMALL_050_HUB_ID: &str = "timm/mobilenetv3_small_050.lamb_in1k";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn entry(name: &str) -> &'static ModelEntry {
    find(name).unwrap()
}

/// `cache` laid out as `huggingface_hub` leaves it after downloading the small fixture
/// checkpoint as `hub_id`: the file in `blobs/`, `snapshots/<hash>/model.safetensors` and
/// `refs/main` holding the hash.
fn lay_out_cache(cache: &Path, hub_id: &str) -> PathBuf {
    let repo = cache.join(format!("models--{}", hub_id.replace('/', "--")));
    let blob = repo.join("blobs").join("5a1e5e7a");
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::copy(fixture("mobilenetv3_small_050.weights.safetensors"), &blob).unwrap();
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    let file = snapshot.join("model.safetensors");
    #[cfg(unix)]
    std::os::unix::fs::symlink(Path::new("../../blobs/5a1e5e7a"), &file).unwrap();
    #[cfg(not(unix))]
    std::fs::copy(&blob, &file).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), COMMIT).unwrap();
    file
}

#[test]
fn offline_with_an_empty_cache_says_which_file_to_place_where() {
    let cache = tempfile::tempdir().unwrap();
    let hub = HubConfig::offline(cache.path());
    let error = resolve(entry("mobilenet_v3_large"), &WeightsSpec::ImageNet, &hub).unwrap_err();
    let expected = cache
        .path()
        .join("models--timm--mobilenetv3_large_100.ra_in1k")
        .join("snapshots")
        .join("main")
        .join("model.safetensors");
    assert!(matches!(error, HubError::NotCached { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!(
            "the ImageNet weights of `mobilenet_v3_large` are not in the Hugging Face cache \
             and HF_HUB_OFFLINE is set; on a machine with internet, download \
             https://huggingface.co/timm/mobilenetv3_large_100.ra_in1k/resolve/main/model.safetensors \
             and place the file at `{}` (or pass its path instead of `imagenet`)",
            expected.display()
        )
    );
}

#[test]
fn a_cache_laid_out_like_huggingface_hub_resolves_and_loads() {
    let cache = tempfile::tempdir().unwrap();
    let file = lay_out_cache(cache.path(), SMALL_050_HUB_ID);
    let hub = HubConfig::offline(cache.path());
    let entry = entry(SMALL_050);
    assert_eq!(entry.pretrained.hub_id, Some(SMALL_050_HUB_ID));
    assert_eq!(
        resolve(entry, &WeightsSpec::ImageNet, &hub).unwrap(),
        ResolvedWeights::File(file)
    );

    // The weights reach the backbone: its features are timm's for the fixture input.
    let device = Device::flex();
    let backbone = load_backbone(entry, &WeightsSpec::ImageNet, &hub, &device).unwrap();
    let io = "mobilenetv3_small_050.io.safetensors";
    let input: Tensor<4> = read_f32(io, "input", &device);
    let expected: Tensor<4> = read_f32(io, "features", &device);
    let diff = max_abs_diff(backbone.forward(input), expected);
    assert!(diff < 1e-4, "max |Δ| = {diff}");
}

#[test]
fn a_file_placed_where_the_offline_message_says_is_found() {
    let cache = tempfile::tempdir().unwrap();
    let hub = HubConfig::offline(cache.path());
    let entry = entry(SMALL_050);
    let HubError::NotCached { expected, .. } =
        resolve(entry, &WeightsSpec::ImageNet, &hub).unwrap_err()
    else {
        panic!("expected NotCached");
    };
    std::fs::create_dir_all(expected.parent().unwrap()).unwrap();
    std::fs::copy(
        fixture("mobilenetv3_small_050.weights.safetensors"),
        &expected,
    )
    .unwrap();
    assert_eq!(
        resolve(entry, &WeightsSpec::ImageNet, &hub).unwrap(),
        ResolvedWeights::File(expected)
    );
    load_backbone(entry, &WeightsSpec::ImageNet, &hub, &Device::flex()).unwrap();
}

#[test]
fn hf_hub_cache_takes_precedence_over_hf_home() {
    let hf_home = tempfile::tempdir().unwrap();
    let hub_cache = tempfile::tempdir().unwrap();
    let in_home = lay_out_cache(&hf_home.path().join("hub"), SMALL_050_HUB_ID);
    let in_hub_cache = lay_out_cache(hub_cache.path(), SMALL_050_HUB_ID);
    let vars = |hub_cache: Option<&Path>| {
        let hf_home = hf_home.path().as_os_str().to_owned();
        let hub_cache = hub_cache.map(|p| p.as_os_str().to_owned());
        HubConfig::from_vars(
            move |name| match name {
                "HF_HOME" => Some(hf_home.clone()),
                "HF_HUB_CACHE" => hub_cache.clone(),
                "HF_HUB_OFFLINE" => Some("1".into()),
                _ => None,
            },
            Some(PathBuf::from("/nonexistent-home")),
        )
        .unwrap()
    };
    let entry = entry(SMALL_050);

    let hub = vars(None);
    assert!(hub.offline);
    assert_eq!(hub.cache_dir, hf_home.path().join("hub"));
    assert_eq!(
        resolve(entry, &WeightsSpec::ImageNet, &hub).unwrap(),
        ResolvedWeights::File(in_home)
    );

    let hub = vars(Some(hub_cache.path()));
    assert_eq!(hub.cache_dir, hub_cache.path());
    assert_eq!(
        resolve(entry, &WeightsSpec::ImageNet, &hub).unwrap(),
        ResolvedWeights::File(in_hub_cache)
    );
}

#[test]
fn a_path_that_does_not_exist_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubConfig::offline(dir.path());
    let missing = dir.path().join("nope.safetensors");
    let error = resolve(entry(SMALL_050), &WeightsSpec::Path(missing.clone()), &hub).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "weights file `{}` does not exist; pass the path of a checkpoint file, `imagenet` \
             for the ImageNet weights or `none` for random initialisation",
            missing.display()
        )
    );
    let error = resolve(
        entry(SMALL_050),
        &WeightsSpec::Path(dir.path().to_path_buf()),
        &hub,
    )
    .unwrap_err();
    assert!(matches!(error, HubError::NotAFile { .. }), "{error:?}");
}

#[test]
fn an_existing_path_and_none_resolve() {
    let hub = HubConfig::offline("/nonexistent-cache");
    let file = fixture("mobilenetv3_small_050.weights.safetensors");
    let entry = entry(SMALL_050);
    assert_eq!(
        resolve(entry, &WeightsSpec::Path(file.clone()), &hub).unwrap(),
        ResolvedWeights::File(file.clone())
    );
    assert_eq!(
        resolve(entry, &WeightsSpec::None, &hub).unwrap(),
        ResolvedWeights::Random
    );
    let device = Device::flex();
    load_backbone(entry, &WeightsSpec::Path(file), &hub, &device).unwrap();
    load_backbone(entry, &WeightsSpec::None, &hub, &device).unwrap();
}

#[test]
fn imagenet_for_a_model_without_weights_names_those_with_them() {
    let hub = HubConfig::offline("/nonexistent-cache");
    let error = resolve(
        entry("mobilenet_v3_large_075"),
        &WeightsSpec::ImageNet,
        &hub,
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "no ImageNet weights exist for `mobilenet_v3_large_075` (timm publishes none for \
         `mobilenetv3_large_075`); use `none` to start from random initialisation, pass a \
         checkpoint file, or choose a model that has them: mobilenet_v3_large, \
         mobilenet_v3_small, mobilenet_v3_small_075, mobilenet_v3_small_050, xception"
    );
}

#[test]
fn a_checkpoint_that_does_not_fit_is_a_weights_error() {
    // The small checkpoint laid out under the large model's hub id: found, but mis-shaped.
    let cache = tempfile::tempdir().unwrap();
    lay_out_cache(cache.path(), "timm/mobilenetv3_large_100.ra_in1k");
    let hub = HubConfig::offline(cache.path());
    let error = load_backbone(
        entry("mobilenet_v3_large"),
        &WeightsSpec::ImageNet,
        &hub,
        &Device::flex(),
    )
    .unwrap_err();
    assert!(matches!(error, HubError::Weights(_)), "{error:?}");
    assert!(error.to_string().contains("does not fit"), "{error}");
}

#[test]
fn an_unreachable_hub_with_nothing_cached_says_which_file_to_place_where() {
    // Online, but the endpoint is a closed port on this machine: the download fails at once
    // (nothing leaves the machine) and the message is the offline one with the client's reason.
    let cache = tempfile::tempdir().unwrap();
    let hub = HubConfig {
        offline: false,
        endpoint: "http://127.0.0.1:9".to_string(),
        ..HubConfig::offline(cache.path())
    };
    let error = resolve(entry(SMALL_050), &WeightsSpec::ImageNet, &hub).unwrap_err();
    let HubError::NotCached {
        expected, reason, ..
    } = &error
    else {
        panic!("expected NotCached, got {error:?}");
    };
    assert!(matches!(reason, Unreachable::Download(_)), "{reason:?}");
    let message = error.to_string();
    assert!(
        message.starts_with(
            "the ImageNet weights of `mobilenet_v3_small_050` are not in the Hugging Face \
             cache and downloading it from the Hugging Face hub failed: "
        ),
        "{message}"
    );
    assert!(
        message.ends_with(&format!(
            "; on a machine with internet, download \
             http://127.0.0.1:9/timm/mobilenetv3_small_050.lamb_in1k/resolve/main/model.safetensors \
             and place the file at `{}` (or pass its path instead of `imagenet`)",
            expected.display()
        )),
        "{message}"
    );
}
