//! Numerical parity with timm: the same weights and input give the same feature map and
//! pooled features as timm's `forward_features` (fixtures from `make_timm_fixtures.py`).

mod common;

use burn::tensor::{Device, Tensor};
use std::path::Path;

use common::{fixtures_dir, max_abs_diff, read_f32, read_f32_at};
use lanner_models::{Backbone, find, global_average_pool};

const TOLERANCE: f32 = 1e-4;

fn loaded_backbone(timm_name: &str, device: &Device) -> Backbone {
    load_from(&fixtures_dir(), timm_name, device)
}

fn load_from(dir: &Path, timm_name: &str, device: &Device) -> Backbone {
    let entry = find(timm_name).expect("registered");
    let backbone = entry.init_backbone(device);
    entry
        .load_weights(
            backbone,
            &dir.join(format!("{timm_name}.weights.safetensors")),
        )
        .expect("fixture weights load")
}

fn check_parity(timm_name: &str) {
    check_parity_in(&fixtures_dir(), timm_name);
}

fn check_parity_in(dir: &Path, timm_name: &str) {
    let device = Device::flex();
    let io = dir.join(format!("{timm_name}.io.safetensors"));
    let backbone = load_from(dir, timm_name, &device);
    let input: Tensor<4> = read_f32_at(&io, "input", &device);
    let expected_features: Tensor<4> = read_f32_at(&io, "features", &device);
    let expected_pooled: Tensor<2> = read_f32_at(&io, "pooled", &device);

    let features = backbone.forward(input);
    let pooled = global_average_pool(features.clone());
    let features_delta = max_abs_diff(features, expected_features);
    let pooled_delta = max_abs_diff(pooled, expected_pooled);
    println!("{timm_name}: max |Δ| features {features_delta:e}, pooled {pooled_delta:e}");
    assert!(
        features_delta < TOLERANCE,
        "features differ by {features_delta}"
    );
    assert!(
        pooled_delta < TOLERANCE,
        "pooled features differ by {pooled_delta}"
    );
}

#[test]
fn mobilenetv3_large_075_matches_timm() {
    check_parity("mobilenetv3_large_075");
}

#[test]
fn mobilenetv3_small_050_matches_timm() {
    check_parity("mobilenetv3_small_050");
}

/// Full-size variants, from fixtures too large to commit: see `make_timm_fixtures.py --out`.
#[test]
#[ignore = "needs LANNER_TIMM_FIXTURES, written by make_timm_fixtures.py --out"]
fn full_size_variants_match_timm() {
    let dir = std::env::var("LANNER_TIMM_FIXTURES").expect("LANNER_TIMM_FIXTURES is set");
    let dir = Path::new(&dir);
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("LANNER_TIMM_FIXTURES is a folder") {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(timm_name) = file.strip_suffix(".io.safetensors") {
            check_parity_in(dir, timm_name);
            checked += 1;
        }
    }
    assert!(checked > 0, "no *.io.safetensors in {}", dir.display());
}

/// The seed's `backbone(x, training=False)` while training: on an autodiff device with
/// frozen BatchNorm, the backbone computes timm's eval-mode output, leaves the running
/// statistics alone, and still gives BatchNorm weights a gradient.
#[test]
fn frozen_batch_norm_uses_running_statistics_while_training() {
    let name = "mobilenetv3_small_050";
    let io = format!("{name}.io.safetensors");
    let device = Device::flex().autodiff();
    let backbone = loaded_backbone(name, &device).with_frozen_batch_norm(true);
    let Backbone::MobileNetV3(model) = &backbone else {
        unreachable!("a MobileNetV3")
    };
    let mean_before: Tensor<1> = model.bn1.running_mean.value();

    let input: Tensor<4> = read_f32(&io, "input", &device);
    let features = backbone.forward(input);
    let expected: Tensor<4> = read_f32(&io, "features", &device);
    let delta = max_abs_diff(features.clone(), expected);
    assert!(
        delta < TOLERANCE,
        "frozen BatchNorm differs from eval mode by {delta}"
    );

    let Backbone::MobileNetV3(model) = &backbone else {
        unreachable!("a MobileNetV3")
    };
    let mean_after: Tensor<1> = model.bn1.running_mean.value_sync();
    assert_eq!(max_abs_diff(mean_before, mean_after), 0.0);

    let gradients = features.sum().backward();
    let grad = model.bn1.weight.val().grad(&gradients);
    assert!(grad.is_some(), "BatchNorm weight must stay trainable");
}

/// Without freezing, training BatchNorm normalises with batch statistics and updates its
/// running statistics as PyTorch does (momentum 0.1, unbiased variance).
#[test]
fn unfrozen_batch_norm_updates_running_statistics_like_pytorch() {
    let name = "mobilenetv3_small_050";
    let io = format!("{name}.io.safetensors");
    let device = Device::flex().autodiff();
    let backbone = loaded_backbone(name, &device);

    let input: Tensor<4> = read_f32(&io, "input", &device);
    let features = backbone.forward(input);
    let eval_features: Tensor<4> = read_f32(&io, "features", &device);
    assert!(max_abs_diff(features, eval_features) > 1e-2);

    let Backbone::MobileNetV3(model) = &backbone else {
        unreachable!("a MobileNetV3")
    };
    let mean: Tensor<1> = read_f32(&io, "bn1.running_mean_after_training_step", &device);
    let var: Tensor<1> = read_f32(&io, "bn1.running_var_after_training_step", &device);
    let mean_delta = max_abs_diff(model.bn1.running_mean.value_sync(), mean);
    let var_delta = max_abs_diff(model.bn1.running_var.value_sync(), var);
    assert!(
        mean_delta < TOLERANCE,
        "running mean differs by {mean_delta}"
    );
    assert!(
        var_delta < TOLERANCE,
        "running variance differs by {var_delta}"
    );
}
