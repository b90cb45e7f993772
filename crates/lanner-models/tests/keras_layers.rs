//! The Keras layer index map against the committed tables (`keras-layers/*.tsv`): every tensor
//! of ours has its Keras weight, of the same shape, and every Keras weight is ours exactly once.

use std::collections::BTreeMap;

use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot};
use burn::tensor::Device;
use lanner_models::find;
use lanner_models::keras_layers::{KerasLayerError, keras_layout};

/// For the registry entry `model`: every tensor maps to a Keras weight whose shape is the
/// tensor's in Keras' layout, and every Keras weight of the table is claimed exactly once.
fn assert_map_matches_table(model: &str) {
    let entry = find(model).unwrap();
    let map = entry.keras_layer_map();
    let backbone = entry.init_backbone(&Device::flex());
    let tensors = backbone.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true);
    assert!(!tensors.is_empty());
    let mut claimed: BTreeMap<(usize, String), Vec<String>> = BTreeMap::new();
    for tensor in &tensors {
        let location = map
            .locate(&tensor.name)
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        let depthwise =
            location.layer.kind == "DepthwiseConv2D" || location.weight.name == "depthwise_kernel";
        let shape: Vec<usize> = tensor.shape.iter().copied().collect();
        assert_eq!(
            keras_layout(&shape, depthwise),
            location.weight.shape,
            "{model}: `{}` {shape:?} vs Keras `{}` {}",
            tensor.name,
            location.layer.name,
            location.weight.name
        );
        claimed
            .entry((location.layer.index, location.weight.name.clone()))
            .or_default()
            .push(tensor.name.clone());
    }
    let table = map.backbone().table();
    let mut keras_weights = 0;
    for layer in table.layers() {
        for weight in &layer.weights {
            keras_weights += 1;
            let ours = claimed
                .get(&(layer.index, weight.name.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            assert_eq!(
                ours.len(),
                1,
                "{model}: Keras `{}`.{} is claimed by {ours:?}",
                layer.name,
                weight.name
            );
        }
    }
    assert_eq!(keras_weights, tensors.len(), "{model}");
}

#[test]
fn mobilenet_v3_large_matches_keras_weight_for_weight() {
    assert_map_matches_table("mobilenet_v3_large");
}

#[test]
fn mobilenet_v3_small_matches_keras_weight_for_weight() {
    assert_map_matches_table("mobilenet_v3_small");
}

#[test]
fn xception_matches_keras_weight_for_weight() {
    assert_map_matches_table("xception");
}

#[test]
fn narrow_variants_map_every_tensor() {
    for model in ["mobilenet_v3_large_075", "mobilenet_v3_small_050"] {
        let entry = find(model).unwrap();
        let backbone = entry.init_backbone(&Device::flex());
        let indices = entry.keras_layer_map().layer_indices(&backbone).unwrap();
        assert_eq!(indices.len(), backbone.collect(None, None, true).len());
    }
}

#[test]
fn layer_counts_are_keras_model_layers() {
    let count = |model: &str| find(model).unwrap().keras_layer_map().layer_count();
    assert_eq!(count("mobilenet_v3_large"), 187);
    assert_eq!(count("mobilenet_v3_large_075"), 187);
    assert_eq!(count("mobilenet_v3_small"), 157);
    assert_eq!(count("xception"), 132);
}

#[test]
fn fine_tune_layer_100_of_mobilenet_v3_large_trains_from_block_9() {
    let entry = find("mobilenet_v3_large").unwrap();
    let map = entry.keras_layer_map();
    let backbone = entry.init_backbone(&Device::flex());
    let split = map.split(&backbone, 100).unwrap();

    // Keras layer 99 is `expanded_conv_8_project_bn`, 100 `expanded_conv_8_add`, 101
    // `expanded_conv_9_expand`: Keras' block 9 (timm `blocks.3.3`) is the first that trains.
    let (last_frozen, last_frozen_index) = split.frozen.last().unwrap();
    let (first_trainable, first_trainable_index) = split.trainable.first().unwrap();
    assert_eq!(last_frozen, "blocks.3.2.bn3.bias");
    assert_eq!(*last_frozen_index, 99);
    assert_eq!(first_trainable, "blocks.3.3.conv_pw.weight");
    assert_eq!(*first_trainable_index, 101);
    assert!(split.frozen.iter().all(|(_, i)| *i < 100));
    assert!(split.trainable.iter().all(|(_, i)| *i >= 100));
    // Module order is Keras order: the boundary splits the list in two.
    let all = map.layer_indices(&backbone).unwrap();
    assert!(all.windows(2).all(|w| w[0].1 <= w[1].1), "{all:?}");
    // Running statistics are never trainable, whichever side they are on.
    assert!(
        split
            .frozen
            .iter()
            .chain(&split.trainable)
            .all(|(name, _)| !name.contains("running"))
    );
    let trainable: usize = split.trainable.len();
    let frozen: usize = split.frozen.len();
    // 262 tensors, of which 2 · 46 BatchNorm running statistics.
    assert_eq!(trainable + frozen, 262 - 92);
    // Blocks 9 to 14 (and conv_1) train.
    assert_eq!(
        split
            .trainable
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| name.ends_with("conv_pwl.weight"))
            .count(),
        6
    );

    assert_eq!(map.split(&backbone, 0).unwrap().frozen.len(), 0);
    assert_eq!(map.split(&backbone, 187).unwrap().trainable.len(), 0);
}

#[test]
fn out_of_range_fine_tune_layer_names_the_layer_count() {
    let entry = find("mobilenet_v3_large").unwrap();
    let map = entry.keras_layer_map();
    let backbone = entry.init_backbone(&Device::flex());
    let error = map.split(&backbone, 188).unwrap_err();
    assert!(matches!(
        error,
        KerasLayerError::FineTuneLayerOutOfRange { layers: 187, .. }
    ));
    assert_eq!(
        error.to_string(),
        "--fine-tune-layer 188 is out of range: Keras' MobileNetV3Large has 187 layers; pass 0 \
         (fine-tune every layer) to 187 (freeze the whole backbone)"
    );
    assert_eq!(
        find("xception")
            .unwrap()
            .keras_layer_map()
            .check_fine_tune_layer(500)
            .unwrap_err()
            .to_string(),
        "--fine-tune-layer 500 is out of range: Keras' Xception has 132 layers; pass 0 \
         (fine-tune every layer) to 132 (freeze the whole backbone)"
    );
}

#[test]
fn unknown_tensor_is_named() {
    let map = find("mobilenet_v3_small").unwrap().keras_layer_map();
    assert_eq!(
        map.locate("conv_head.weight").unwrap_err().to_string(),
        "tensor `conv_head.weight` has no counterpart in Keras' MobileNetV3Small"
    );
    assert_eq!(
        map.locate("blocks.1.0.bn1.num_batches_tracked")
            .unwrap_err()
            .to_string(),
        "tensor `blocks.1.0.bn1.num_batches_tracked` has no counterpart in Keras' MobileNetV3Small"
    );
}
