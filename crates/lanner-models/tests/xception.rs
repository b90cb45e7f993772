//! Xception (timm's `legacy_xception`) without its weights, which are too large to commit:
//! the tensor names and shapes timm's checkpoints have, and the feature map's shape. Its
//! numerical parity with timm is `timm_parity.rs`' ignored full-size test.

mod common;

use std::collections::BTreeMap;

use burn::module::Module;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot};
use burn::tensor::{Device, Distribution, Tensor};
use common::fixture;
use lanner_models::{Backbone, find, global_average_pool};

fn xception(device: &Device) -> Backbone {
    find("xception").expect("registered").init_backbone(device)
}

/// Every tensor of timm's `legacy_xception` backbone (`fc.*` excluded), by the name and
/// PyTorch shape the weights loader matches, and nothing else.
#[test]
fn xception_has_timms_tensor_names_and_shapes() {
    let json = std::fs::read_to_string(fixture("legacy_xception.tensors.json"))
        .expect("legacy_xception.tensors.json");
    let expected: BTreeMap<String, Vec<usize>> = serde_json::from_str(&json).expect("valid JSON");
    let found: BTreeMap<String, Vec<usize>> = xception(&Device::flex())
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|t| (t.name, t.shape.iter().copied().collect()))
        .collect();
    let missing: Vec<_> = expected
        .keys()
        .filter(|n| !found.contains_key(*n))
        .collect();
    let unexpected: Vec<_> = found
        .keys()
        .filter(|n| !expected.contains_key(*n))
        .collect();
    assert!(missing.is_empty(), "missing: {missing:?}");
    assert!(unexpected.is_empty(), "unexpected: {unexpected:?}");
    assert_eq!(found, expected);
}

/// 71x71 → conv1 (unpadded, stride 2) 35 → conv2 (unpadded) 33 → four stride-2 max-pools
/// (padding 1) 17, 9, 5, 3: timm gives `[1, 2048, 3, 3]`; ReLU'd, so never negative.
#[test]
fn xception_features_of_a_71x71_input() {
    let device = Device::flex();
    let backbone = xception(&device);
    let input = Tensor::<4>::random([1, 3, 71, 71], Distribution::Normal(0.0, 1.0), &device);
    let features = backbone.forward(input);
    assert_eq!(features.dims(), [1, 2048, 3, 3]);
    let min = features.clone().min().into_scalar::<f32>();
    assert!(min >= 0.0, "features end with a ReLU, min {min}");
    assert!(features.clone().is_finite().all().into_scalar::<bool>());
    assert_eq!(global_average_pool(features).dims(), [1, 2048]);
}

/// With its BatchNorms frozen, Xception on an autodiff device (training) computes what it
/// computes in eval mode: every BatchNorm (`bn1`..`bn4`, `skipbn`, the `rep` ones) is frozen.
/// Unfrozen, the batch statistics of a fresh model differ from its running ones.
#[test]
fn frozen_xception_computes_its_eval_output_while_training() {
    let plain = Device::flex();
    let device = plain.clone().autodiff();
    let backbone = xception(&device);
    let input = Tensor::<4>::random([2, 3, 71, 71], Distribution::Normal(0.0, 1.0), &plain);
    let eval = backbone.valid().forward(input.clone());

    let frozen = backbone
        .clone()
        .with_frozen_batch_norm(true)
        .forward(input.clone().to_device(&device));
    let delta = (frozen.to_device(&plain) - eval.clone())
        .abs()
        .max()
        .into_scalar::<f32>();
    assert!(delta < 1e-5, "frozen differs from eval mode by {delta}");

    // Last: a training forward updates the running statistics, which clones share.
    let training = backbone.forward(input.to_device(&device));
    let delta = (training.to_device(&plain) - eval).abs().max();
    assert!(
        delta.into_scalar::<f32>() > 1e-3,
        "unfrozen uses batch statistics"
    );
}
