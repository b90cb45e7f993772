//! torchvision's MobileNetV3 tensor names, mapped to timm's (which the backbone uses).
//!
//! torchvision (`torchvision/models/mobilenetv3.py`) keeps the whole backbone in one
//! `features` sequence: `features.0` is the stem (`Conv2dNormActivation`: `.0` conv, `.1`
//! BatchNorm), `features.1 … features.N` the blocks in order, each an `InvertedResidual`
//! whose `block` sequence holds the expansion (only where the expanded channels differ from
//! the input's, which is timm's depthwise-separable first block otherwise), the depthwise
//! convolution, the squeeze-excitation (`fc1`, `fc2`) and the projection, and `features.N+1`
//! the last 1x1 convolution to 960 / 576 channels. Its `classifier.*` is the ImageNet head,
//! which is not loaded.
//!
//! At width 1.0 the two networks have the same layers and shapes up to the feature map; they
//! differ in BatchNorm's epsilon (torchvision 1e-3, timm 1e-5; see
//! [`TORCHVISION_BATCH_NORM_EPSILON`]) and in what follows the feature map (timm's
//! `conv_head`, torchvision's two-layer classifier), which the backbone leaves out anyway.

use super::MobileNetV3Size;
use super::arch::{self, BlockKind};

/// BatchNorm epsilon of torchvision's MobileNetV3 (`nn.BatchNorm2d(eps=0.001)`).
pub const TORCHVISION_BATCH_NORM_EPSILON: f64 = 1e-3;

/// The name prefix of every torchvision MobileNetV3 backbone tensor; a checkpoint whose
/// tensors carry it uses torchvision's names.
pub const TORCHVISION_PREFIX: &str = "features.";

/// torchvision's name of the width-1.0 network of this size.
pub fn torchvision_model_name(size: MobileNetV3Size) -> &'static str {
    match size {
        MobileNetV3Size::Large => "mobilenet_v3_large",
        MobileNetV3Size::Small => "mobilenet_v3_small",
    }
}

/// timm's name of the tensor torchvision calls `name` in a MobileNetV3 of this size, or
/// `None` where `name` is not one of torchvision's backbone tensors (its `classifier.*`, or
/// a name no torchvision MobileNetV3 of this size has).
///
/// The mapping depends on the size (which blocks have an expansion or squeeze-excitation),
/// not on the width.
pub fn torchvision_to_timm(size: MobileNetV3Size, name: &str) -> Option<String> {
    let rest = name.strip_prefix(TORCHVISION_PREFIX)?;
    let (index, rest) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    if index == 0 {
        return conv_bn(rest, "conv_stem", "bn1");
    }
    // (stage, index in stage, kind, squeeze-excitation) of every block, in order.
    let stages = match size {
        MobileNetV3Size::Large => arch::LARGE,
        MobileNetV3Size::Small => arch::SMALL,
    };
    let (stage, block, kind, se) = stages
        .iter()
        .enumerate()
        .flat_map(|(s, stage)| {
            stage
                .iter()
                .flat_map(|spec| std::iter::repeat_n(spec, spec.repeats))
                .enumerate()
                .map(move |(b, spec)| (s, b, spec.kind, spec.squeeze_excite))
        })
        .nth(index - 1)?;
    let prefix = format!("blocks.{stage}.{block}");
    if kind == BlockKind::ConvBnAct {
        return conv_bn(rest, &format!("{prefix}.conv"), &format!("{prefix}.bn1"));
    }
    // torchvision's `block.M` layers, in order: `Some((conv, bn))`, or `None` for the SE.
    let mut layers: Vec<Option<(&str, &str)>> = match kind {
        BlockKind::DepthwiseSeparable => vec![Some(("conv_dw", "bn1"))],
        _ => vec![Some(("conv_pw", "bn1")), Some(("conv_dw", "bn2"))],
    };
    if se {
        layers.push(None);
    }
    layers.push(Some(match kind {
        BlockKind::DepthwiseSeparable => ("conv_pw", "bn2"),
        _ => ("conv_pwl", "bn3"),
    }));
    let rest = rest.strip_prefix("block.")?;
    let (layer, rest) = rest.split_once('.')?;
    match *layers.get(layer.parse::<usize>().ok()?)? {
        Some((conv, bn)) => conv_bn(rest, &format!("{prefix}.{conv}"), &format!("{prefix}.{bn}")),
        None => {
            let (fc, tensor) = rest.split_once('.')?;
            let conv = match fc {
                "fc1" => "conv_reduce",
                "fc2" => "conv_expand",
                _ => return None,
            };
            matches!(tensor, "weight" | "bias").then(|| format!("{prefix}.se.{conv}.{tensor}"))
        }
    }
}

/// `0.weight` → `{conv}.weight`; `1.{weight,bias,running_mean,running_var,num_batches_tracked}`
/// → `{bn}.…` (torchvision's `Conv2dNormActivation`).
fn conv_bn(rest: &str, conv: &str, bn: &str) -> Option<String> {
    match rest.split_once('.')? {
        ("0", "weight") => Some(format!("{conv}.weight")),
        (
            "1",
            tensor @ ("weight" | "bias" | "running_mean" | "running_var" | "num_batches_tracked"),
        ) => Some(format!("{bn}.{tensor}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MobileNetV3Size::{Large, Small};

    fn timm(size: MobileNetV3Size, name: &str) -> String {
        torchvision_to_timm(size, name).unwrap_or_else(|| panic!("{name} maps"))
    }

    #[test]
    fn stem_and_last_convolution() {
        assert_eq!(timm(Large, "features.0.0.weight"), "conv_stem.weight");
        assert_eq!(timm(Large, "features.0.1.running_mean"), "bn1.running_mean");
        assert_eq!(
            timm(Large, "features.16.0.weight"),
            "blocks.6.0.conv.weight"
        );
        assert_eq!(timm(Large, "features.16.1.bias"), "blocks.6.0.bn1.bias");
        assert_eq!(
            timm(Small, "features.12.0.weight"),
            "blocks.5.0.conv.weight"
        );
        assert_eq!(
            timm(Small, "features.12.1.running_var"),
            "blocks.5.0.bn1.running_var"
        );
    }

    #[test]
    fn depthwise_separable_first_blocks() {
        // Large: no squeeze-excitation; small: with it.
        assert_eq!(
            timm(Large, "features.1.block.0.0.weight"),
            "blocks.0.0.conv_dw.weight"
        );
        assert_eq!(
            timm(Large, "features.1.block.0.1.weight"),
            "blocks.0.0.bn1.weight"
        );
        assert_eq!(
            timm(Large, "features.1.block.1.0.weight"),
            "blocks.0.0.conv_pw.weight"
        );
        assert_eq!(
            timm(Large, "features.1.block.1.1.bias"),
            "blocks.0.0.bn2.bias"
        );
        assert_eq!(
            torchvision_to_timm(Large, "features.1.block.2.0.weight"),
            None
        );
        assert_eq!(
            timm(Small, "features.1.block.1.fc1.weight"),
            "blocks.0.0.se.conv_reduce.weight"
        );
        assert_eq!(
            timm(Small, "features.1.block.1.fc2.bias"),
            "blocks.0.0.se.conv_expand.bias"
        );
        assert_eq!(
            timm(Small, "features.1.block.2.0.weight"),
            "blocks.0.0.conv_pw.weight"
        );
    }

    #[test]
    fn inverted_residuals_with_and_without_squeeze_excitation() {
        // Large features.2 = blocks.1.0 (no SE), features.4 = blocks.2.0 (SE).
        assert_eq!(
            timm(Large, "features.2.block.0.0.weight"),
            "blocks.1.0.conv_pw.weight"
        );
        assert_eq!(
            timm(Large, "features.2.block.1.1.running_mean"),
            "blocks.1.0.bn2.running_mean"
        );
        assert_eq!(
            timm(Large, "features.2.block.2.0.weight"),
            "blocks.1.0.conv_pwl.weight"
        );
        assert_eq!(
            timm(Large, "features.3.block.2.1.weight"),
            "blocks.1.1.bn3.weight"
        );
        assert_eq!(
            timm(Large, "features.4.block.2.fc1.bias"),
            "blocks.2.0.se.conv_reduce.bias"
        );
        assert_eq!(
            timm(Large, "features.4.block.3.0.weight"),
            "blocks.2.0.conv_pwl.weight"
        );
        assert_eq!(
            timm(Large, "features.15.block.3.1.weight"),
            "blocks.5.2.bn3.weight"
        );
        // Small features.11 = blocks.4.2.
        assert_eq!(
            timm(Small, "features.11.block.2.fc2.weight"),
            "blocks.4.2.se.conv_expand.weight"
        );
    }

    #[test]
    fn names_outside_the_backbone_do_not_map() {
        for name in [
            "classifier.0.weight",
            "features.17.0.weight",
            "features.0.2.weight",
            "features.2.block.3.0.weight",
            "features.4.block.2.fc3.weight",
            "conv_stem.weight",
        ] {
            assert_eq!(torchvision_to_timm(Large, name), None, "{name}");
        }
        assert_eq!(torchvision_to_timm(Small, "features.13.0.weight"), None);
    }
}
