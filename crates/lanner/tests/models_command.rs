//! `lanner models` run as a user runs it: the real binary, its table and its JSON.

mod common;

use common::{lanner, text};
use std::process::Command;

/// The table's row for `name`, split on whitespace.
fn row<'a>(stdout: &'a str, name: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"))
}

#[test]
fn table_lists_timm_parameter_counts_input_sizes_and_keras_layers() {
    let out = lanner(&["models"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("as timm counts them, without BatchNorm running statistics"),
        "{stdout}"
    );
    assert_eq!(
        row(&stdout, "mobilenet_v3_large"),
        [
            "mobilenet_v3_large",
            "mobilenetv3_large_100",
            "224",
            "960",
            "2,971,952",
            "187",
            "timm/mobilenetv3_large_100.ra_in1k"
        ]
    );
    assert_eq!(
        row(&stdout, "mobilenet_v3_small"),
        [
            "mobilenet_v3_small",
            "mobilenetv3_small_100",
            "224",
            "576",
            "927,008",
            "157",
            "timm/mobilenetv3_small_100.lamb_in1k"
        ]
    );
    // timm publishes no weights for the 0.75-wide large model.
    assert_eq!(
        row(&stdout, "mobilenet_v3_large_075"),
        [
            "mobilenet_v3_large_075",
            "mobilenetv3_large_075",
            "224",
            "720",
            "1,789,648",
            "187",
            "none"
        ]
    );
    // Keras' Xception(include_top=False): 20,806,952 trainable parameters.
    assert_eq!(
        row(&stdout, "xception"),
        [
            "xception",
            "legacy_xception",
            "299",
            "2048",
            "20,806,952",
            "132",
            "timm/legacy_xception.tf_in1k"
        ]
    );
}

#[test]
fn json_lists_every_model_with_raw_numbers() {
    let out = lanner(&["models", "--json"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let models: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    let models = models.as_array().expect("an array");
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"mobilenet_v3_large") && names.contains(&"xception"),
        "{names:?}"
    );
    let large = models
        .iter()
        .find(|m| m["name"] == "mobilenet_v3_large")
        .unwrap();
    assert_eq!(
        *large,
        serde_json::json!({
            "name": "mobilenet_v3_large",
            "timm_name": "mobilenetv3_large_100",
            "input_size": 224,
            "feature_channels": 960,
            "parameters": 2971952,
            "keras_layers": 187,
            "hub_id": "timm/mobilenetv3_large_100.ra_in1k",
        })
    );
    let large_075 = models
        .iter()
        .find(|m| m["name"] == "mobilenet_v3_large_075")
        .unwrap();
    assert_eq!(large_075["hub_id"], serde_json::Value::Null);
    assert_eq!(large_075["parameters"], 1789648);
}

#[test]
fn one_model_with_weights_from_a_file_loads_them() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../lanner-models/tests/fixtures/mobilenetv3_small_050.weights.safetensors"
    );
    let out = lanner(&["models", "mobilenet_v3_small_050", "--weights", fixture]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("mobilenet_v3_small_050: weights loaded from"),
        "{stdout}"
    );
    assert_eq!(
        row(&stdout, "mobilenet_v3_small_050")[4],
        "272,288",
        "{stdout}"
    );
    assert!(
        !stdout.contains("mobilenet_v3_large "),
        "only the model asked for: {stdout}"
    );
}

#[test]
fn imagenet_weights_offline_and_not_cached_say_which_file_to_put_where() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lanner"))
        .args(["models", "mobilenet_v3_large", "--weights", "imagenet"])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let expected = cache
        .path()
        .join("models--timm--mobilenetv3_large_100.ra_in1k/snapshots/main/model.safetensors");
    assert!(stderr.contains("not in the Hugging Face cache"), "{stderr}");
    assert!(stderr.contains(&expected.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("https://huggingface.co/timm/mobilenetv3_large_100.ra_in1k/resolve/main/model.safetensors"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn bad_weights_and_unknown_models_fail_with_one_sentence() {
    let missing = lanner(&[
        "models",
        "xception",
        "--weights",
        "/nonexistent/x.safetensors",
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("/nonexistent/x.safetensors"),
        "{}",
        text(&missing.stderr)
    );

    let none = lanner(&["models", "mobilenet_v3_large_075", "--weights", "imagenet"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(
        text(&none.stderr).contains("mobilenet_v3_large_075"),
        "{}",
        text(&none.stderr)
    );

    let unknown = lanner(&["models", "resnet50"]);
    assert_eq!(unknown.status.code(), Some(1));
    let stderr = text(&unknown.stderr);
    assert!(
        stderr.contains("resnet50") && stderr.contains("mobilenet_v3_large"),
        "{stderr}"
    );
}
