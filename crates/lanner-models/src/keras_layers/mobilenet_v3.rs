//! Keras' names of MobileNetV3's weights (`tf.keras.applications.MobileNetV3Large/Small`).
//!
//! Keras numbers its blocks on across stages (`expanded_conv`, `expanded_conv_1`, …) where
//! timm counts per stage (`blocks.S.B`), so the running number comes from the stage tables.

use super::{KerasBackbone, KerasLayerMap, KerasWeightName};
use crate::mobilenet_v3::MobileNetV3Size;
use crate::mobilenet_v3::arch::{self, BlockKind, BlockSpec};

/// The Keras layer index map of a MobileNetV3 of `size` (any width: Keras' `alpha` changes
/// channels, not the layer order).
pub fn mobilenet_v3_layer_map(size: MobileNetV3Size) -> KerasLayerMap {
    match size {
        MobileNetV3Size::Large => KerasLayerMap::new(KerasBackbone::MobileNetV3Large, |tensor| {
            keras_weight(arch::LARGE, tensor)
        }),
        MobileNetV3Size::Small => KerasLayerMap::new(KerasBackbone::MobileNetV3Small, |tensor| {
            keras_weight(arch::SMALL, tensor)
        }),
    }
}

/// The Keras layer and weight holding timm's tensor `tensor` of the network `stages`.
fn keras_weight(stages: &[&[BlockSpec]], tensor: &str) -> Option<KerasWeightName> {
    let (module, attribute) = tensor.rsplit_once('.')?;
    let conv = |layer: String| KerasWeightName::conv(layer, attribute);
    let batch_norm = |layer: String| KerasWeightName::batch_norm(layer, attribute);
    match module {
        "conv_stem" => return conv("conv".into()),
        "bn1" => return batch_norm("conv_bn".into()),
        _ => {}
    }
    let mut path = module.strip_prefix("blocks.")?.splitn(3, '.');
    let stage: usize = path.next()?.parse().ok()?;
    let block: usize = path.next()?.parse().ok()?;
    let layer = path.next()?;
    let kind = block_kinds(stages.get(stage)?).nth(block)?;
    let number = stages[..stage]
        .iter()
        .map(|s| block_kinds(s).count())
        .sum::<usize>()
        + block;
    let prefix = if number == 0 {
        "expanded_conv".to_string()
    } else {
        format!("expanded_conv_{number}")
    };
    let named = |suffix: &str| format!("{prefix}_{suffix}");
    match (kind, layer) {
        (BlockKind::ConvBnAct, "conv") => conv("conv_1".into()),
        (BlockKind::ConvBnAct, "bn1") => batch_norm("conv_1_bn".into()),
        (BlockKind::DepthwiseSeparable | BlockKind::InvertedResidual, "se.conv_reduce") => {
            conv(named("squeeze_excite_conv"))
        }
        (BlockKind::DepthwiseSeparable | BlockKind::InvertedResidual, "se.conv_expand") => {
            conv(named("squeeze_excite_conv_1"))
        }
        (BlockKind::DepthwiseSeparable, "conv_dw") => conv(named("depthwise")),
        (BlockKind::DepthwiseSeparable, "bn1") => batch_norm(named("depthwise_bn")),
        (BlockKind::DepthwiseSeparable, "conv_pw") => conv(named("project")),
        (BlockKind::DepthwiseSeparable, "bn2") => batch_norm(named("project_bn")),
        (BlockKind::InvertedResidual, "conv_pw") => conv(named("expand")),
        (BlockKind::InvertedResidual, "bn1") => batch_norm(named("expand_bn")),
        (BlockKind::InvertedResidual, "conv_dw") => conv(named("depthwise")),
        (BlockKind::InvertedResidual, "bn2") => batch_norm(named("depthwise_bn")),
        (BlockKind::InvertedResidual, "conv_pwl") => conv(named("project")),
        (BlockKind::InvertedResidual, "bn3") => batch_norm(named("project_bn")),
        _ => None,
    }
}

/// The kind of each block of a stage, repeats expanded.
fn block_kinds(stage: &[BlockSpec]) -> impl Iterator<Item = BlockKind> + '_ {
    stage
        .iter()
        .flat_map(|spec| std::iter::repeat_n(spec.kind, spec.repeats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keras(size: MobileNetV3Size, tensor: &str) -> (String, &'static str) {
        let location = mobilenet_v3_layer_map(size).locate(tensor).unwrap();
        (location.layer.name.clone(), location.weight.name.as_str())
    }

    #[test]
    fn names_follow_keras_block_numbering() {
        use MobileNetV3Size::{Large, Small};
        let name = |layer: &str, weight: &'static str| (layer.to_string(), weight);
        assert_eq!(keras(Large, "conv_stem.weight"), name("conv", "kernel"));
        assert_eq!(
            keras(Large, "bn1.running_var"),
            name("conv_bn", "moving_variance")
        );
        assert_eq!(
            keras(Large, "blocks.0.0.conv_pw.weight"),
            name("expanded_conv_project", "kernel")
        );
        assert_eq!(
            keras(Large, "blocks.1.0.conv_pw.weight"),
            name("expanded_conv_1_expand", "kernel")
        );
        assert_eq!(
            keras(Large, "blocks.2.0.se.conv_reduce.bias"),
            name("expanded_conv_3_squeeze_excite_conv", "bias")
        );
        assert_eq!(
            keras(Large, "blocks.5.2.bn3.weight"),
            name("expanded_conv_14_project_bn", "gamma")
        );
        assert_eq!(
            keras(Large, "blocks.6.0.conv.weight"),
            name("conv_1", "kernel")
        );
        assert_eq!(
            keras(Small, "blocks.0.0.se.conv_expand.weight"),
            name("expanded_conv_squeeze_excite_conv_1", "kernel")
        );
        assert_eq!(
            keras(Small, "blocks.4.2.conv_dw.weight"),
            name("expanded_conv_10_depthwise", "kernel")
        );
        assert_eq!(
            keras(Small, "blocks.5.0.bn1.bias"),
            name("conv_1_bn", "beta")
        );
    }
}
