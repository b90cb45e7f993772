//! Keras' names of Xception's weights (`tf.keras.applications.Xception`) for timm's
//! `legacy_xception` tensors.
//!
//! timm's `block1`..`block12` are Keras' `block2`..`block13`; timm's `conv3`/`conv4` are
//! `block14_sepconv1/2`. Keras leaves the four shortcut convolutions unnamed, so they are
//! `conv2d`, `conv2d_1`, … (and `batch_normalization`, …) in the order they are built, which
//! is timm's order of the blocks that have a `skip`.

use super::{KerasBackbone, KerasLayerMap, KerasWeightName};

/// timm's blocks with a 1x1 shortcut convolution, in order.
const BLOCKS_WITH_SKIP: [usize; 4] = [1, 2, 3, 12];

/// The Keras layer index map of Xception.
pub fn xception_layer_map() -> KerasLayerMap {
    KerasLayerMap::new(KerasBackbone::Xception, keras_weight)
}

/// The Keras layer and weight holding timm's tensor `tensor`.
fn keras_weight(tensor: &str) -> Option<KerasWeightName> {
    let (module, attribute) = tensor.rsplit_once('.')?;
    let conv = |layer: String| KerasWeightName::conv(layer, attribute);
    let batch_norm = |layer: String| KerasWeightName::batch_norm(layer, attribute);
    // timm's separable convolution: `conv1` depthwise, `pointwise` 1x1; one Keras layer.
    let separable = |layer: String, part: &str| {
        let weight = match (part, attribute) {
            ("conv1", "weight") => "depthwise_kernel",
            ("pointwise", "weight") => "pointwise_kernel",
            _ => return None,
        };
        Some(KerasWeightName { layer, weight })
    };
    match module {
        "conv1" => return conv("block1_conv1".into()),
        "bn1" => return batch_norm("block1_conv1_bn".into()),
        "conv2" => return conv("block1_conv2".into()),
        "bn2" => return batch_norm("block1_conv2_bn".into()),
        "bn3" => return batch_norm("block14_sepconv1_bn".into()),
        "bn4" => return batch_norm("block14_sepconv2_bn".into()),
        _ => {}
    }
    if let Some(part) = module.strip_prefix("conv3.") {
        return separable("block14_sepconv1".into(), part);
    }
    if let Some(part) = module.strip_prefix("conv4.") {
        return separable("block14_sepconv2".into(), part);
    }
    let (block, layer) = module.strip_prefix("block")?.split_once('.')?;
    let block: usize = block.parse().ok()?;
    let keras_block = block + 1;
    let numbered = |base: &str| {
        let n = BLOCKS_WITH_SKIP.iter().position(|&b| b == block)?;
        Some(if n == 0 {
            base.to_string()
        } else {
            format!("{base}_{n}")
        })
    };
    match layer {
        "skip" => return conv(numbered("conv2d")?),
        "skipbn" => return batch_norm(numbered("batch_normalization")?),
        _ => {}
    }
    let mut rep = layer.strip_prefix("rep.")?.splitn(2, '.');
    let position: usize = rep.next()?.parse().ok()?;
    // Each repeat is ReLU, separable conv, BN; timm's block1 drops its leading ReLU.
    let position = if block == 1 { position + 1 } else { position };
    let sepconv = format!("block{keras_block}_sepconv{}", position / 3 + 1);
    match (position % 3, rep.next()) {
        (1, Some(part)) => separable(sepconv, part),
        (2, None) => batch_norm(format!("{sepconv}_bn")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keras(tensor: &str) -> (String, &'static str) {
        let location = xception_layer_map().locate(tensor).unwrap();
        (location.layer.name.clone(), location.weight.name.as_str())
    }

    #[test]
    fn names_follow_keras_blocks() {
        let name = |layer: &str, weight: &'static str| (layer.to_string(), weight);
        assert_eq!(keras("conv1.weight"), name("block1_conv1", "kernel"));
        assert_eq!(
            keras("bn2.running_mean"),
            name("block1_conv2_bn", "moving_mean")
        );
        assert_eq!(
            keras("block1.rep.0.conv1.weight"),
            name("block2_sepconv1", "depthwise_kernel")
        );
        assert_eq!(
            keras("block1.rep.1.bias"),
            name("block2_sepconv1_bn", "beta")
        );
        assert_eq!(
            keras("block1.rep.3.pointwise.weight"),
            name("block2_sepconv2", "pointwise_kernel")
        );
        assert_eq!(keras("block2.skip.weight"), name("conv2d_1", "kernel"));
        assert_eq!(
            keras("block4.rep.8.running_var"),
            name("block5_sepconv3_bn", "moving_variance")
        );
        assert_eq!(
            keras("block12.skipbn.weight"),
            name("batch_normalization_3", "gamma")
        );
        assert_eq!(
            keras("conv4.conv1.weight"),
            name("block14_sepconv2", "depthwise_kernel")
        );
        assert_eq!(keras("bn3.bias"), name("block14_sepconv1_bn", "beta"));
    }
}
