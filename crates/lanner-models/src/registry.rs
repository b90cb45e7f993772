//! The model registry: one table from a model name to its architecture and the pretrained
//! configuration that travels with its ImageNet weights (timm's `pretrained_cfg`).

use std::path::Path;

use burn::tensor::{Device, Tensor};

use crate::backbone::Backbone;
use crate::keras_layers::{KerasLayerMap, mobilenet_v3_layer_map, xception_layer_map};
use crate::mobilenet_v3::{MobileNetV3Config, MobileNetV3Size};
use crate::weights::{WeightsError, load_pretrained};
use crate::xception::XceptionConfig;

/// How images are resized to the model's input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    /// Bilinear.
    Bilinear,
    /// Bicubic.
    Bicubic,
}

/// Per-channel normalisation of RGB pixels scaled to `[0, 1]`: `(x - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalization {
    /// Channel means (R, G, B).
    pub mean: [f32; 3],
    /// Channel standard deviations (R, G, B).
    pub std: [f32; 3],
}

/// timm's `IMAGENET_DEFAULT_MEAN` / `IMAGENET_DEFAULT_STD`.
pub const IMAGENET: Normalization = Normalization {
    mean: [0.485, 0.456, 0.406],
    std: [0.229, 0.224, 0.225],
};

/// timm's `IMAGENET_INCEPTION_MEAN` / `IMAGENET_INCEPTION_STD` (0.5, 0.5, 0.5): pixels to
/// `[-1, 1]`, as Keras' `xception.preprocess_input` does.
pub const INCEPTION: Normalization = Normalization {
    mean: [0.5, 0.5, 0.5],
    std: [0.5, 0.5, 0.5],
};

impl Normalization {
    /// Normalise `[batch, 3, height, width]` pixels in `0..=255` (what the data loader
    /// yields, as Keras' `image_dataset_from_directory` does).
    pub fn apply(&self, pixels: Tensor<4>) -> Tensor<4> {
        let device = pixels.device();
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * self.std[c]));
        let shift: [f32; 3] = std::array::from_fn(|c| -self.mean[c] / self.std[c]);
        let scale = Tensor::<1>::from_floats(scale, &device).reshape([1, 3, 1, 1]);
        let shift = Tensor::<1>::from_floats(shift, &device).reshape([1, 3, 1, 1]);
        pixels * scale + shift
    }
}

/// What timm's pretrained configuration says about the model's ImageNet weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PretrainedConfig {
    /// Height and width the weights were trained and evaluated at.
    pub input_size: usize,
    /// Resize interpolation of timm's evaluation transform.
    pub interpolation: Interpolation,
    /// Centre-crop fraction of timm's evaluation transform.
    pub crop_pct: f64,
    /// Input normalisation the weights expect.
    pub normalization: Normalization,
    /// The Hugging Face hub repository and tag of the weights (`timm/<name>.<tag>`), `None`
    /// where timm publishes no weights for the model.
    pub hub_id: Option<&'static str>,
}

/// The network a registry entry builds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Architecture {
    /// MobileNetV3 of a size and width multiplier.
    MobileNetV3 {
        /// Large or small.
        size: MobileNetV3Size,
        /// timm's channel multiplier.
        width_multiplier: f64,
    },
    /// Xception (timm's `legacy_xception`).
    Xception,
}

/// The memory a CPU training step takes per input pixel of each image in the batch, in bytes
/// (activations kept for the backward pass, their gradients, the batch itself), for the three
/// kinds of step the recipes run. Measured by `bench/step_memory.py`: the slope of `lanner
/// bench`'s peak resident memory (`/usr/bin/time -f %M`, one step) between batch 4 and batch 20
/// at 224x224 (160x160 for Xception), f32, on the development machine (2026-11-29), the lower
/// of two runs (`train` refuses a step on this estimate, so it must not be high); other sizes
/// scale with the pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepMemory {
    /// The head on a frozen backbone (the seed's first phase).
    pub frozen: u32,
    /// Every layer trainable with BatchNorm in training mode (`--from-scratch`).
    pub from_scratch: u32,
    /// Every layer trainable with BatchNorm frozen (`--fine-tune-layer 0`): the most a
    /// fine-tuning phase can take; later fine-tune layers take less.
    pub fine_tune_all: u32,
}

/// One model Lanner can build and load weights for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelEntry {
    /// Lanner's name (`mobilenet_v3_large`).
    pub name: &'static str,
    /// timm's name of the same network (`mobilenetv3_large_100`); its checkpoints load as is.
    pub timm_name: &'static str,
    /// What to build.
    pub architecture: Architecture,
    /// Input size, interpolation, normalisation and hub id of the pretrained weights.
    pub pretrained: PretrainedConfig,
    /// What a training step needs in memory on the CPU.
    pub step_memory: StepMemory,
}

const fn mobilenet_v3(
    name: &'static str,
    timm_name: &'static str,
    size: MobileNetV3Size,
    width_multiplier: f64,
    hub_id: Option<&'static str>,
    step_memory: StepMemory,
) -> ModelEntry {
    ModelEntry {
        name,
        timm_name,
        architecture: Architecture::MobileNetV3 {
            size,
            width_multiplier,
        },
        pretrained: PretrainedConfig {
            input_size: 224,
            // timm's trained MobileNetV3 weights are evaluated bicubic; its default config
            // (for `mobilenetv3_large_075`, which has none) says bilinear.
            interpolation: if hub_id.is_some() {
                Interpolation::Bicubic
            } else {
                Interpolation::Bilinear
            },
            crop_pct: 0.875,
            normalization: IMAGENET,
            hub_id,
        },
        step_memory,
    }
}

const fn step_memory(frozen: u32, from_scratch: u32, fine_tune_all: u32) -> StepMemory {
    StepMemory {
        frozen,
        from_scratch,
        fine_tune_all,
    }
}

/// Every model in the registry.
pub const MODELS: &[ModelEntry] = &[
    mobilenet_v3(
        "mobilenet_v3_large",
        "mobilenetv3_large_100",
        MobileNetV3Size::Large,
        1.0,
        Some("timm/mobilenetv3_large_100.ra_in1k"),
        step_memory(30, 790, 456),
    ),
    mobilenet_v3(
        "mobilenet_v3_large_075",
        "mobilenetv3_large_075",
        MobileNetV3Size::Large,
        0.75,
        None,
        step_memory(28, 817, 439),
    ),
    mobilenet_v3(
        "mobilenet_v3_small",
        "mobilenetv3_small_100",
        MobileNetV3Size::Small,
        1.0,
        Some("timm/mobilenetv3_small_100.lamb_in1k"),
        step_memory(45, 289, 186),
    ),
    mobilenet_v3(
        "mobilenet_v3_small_075",
        "mobilenetv3_small_075",
        MobileNetV3Size::Small,
        0.75,
        Some("timm/mobilenetv3_small_075.lamb_in1k"),
        step_memory(28, 266, 191),
    ),
    mobilenet_v3(
        "mobilenet_v3_small_050",
        "mobilenetv3_small_050",
        MobileNetV3Size::Small,
        0.5,
        Some("timm/mobilenetv3_small_050.lamb_in1k"),
        step_memory(32, 211, 152),
    ),
    ModelEntry {
        name: "xception",
        timm_name: "legacy_xception",
        architecture: Architecture::Xception,
        // timm's `legacy_xception.tf_in1k` pretrained_cfg.
        pretrained: PretrainedConfig {
            input_size: 299,
            interpolation: Interpolation::Bicubic,
            crop_pct: 0.8975,
            normalization: INCEPTION,
            hub_id: Some("timm/legacy_xception.tf_in1k"),
        },
        step_memory: step_memory(70, 2400, 2011),
    },
];

/// A model name the registry does not have.
#[derive(Debug, thiserror::Error)]
#[error("unknown model `{name}`; choose one of: {}", known_names())]
pub struct UnknownModel {
    /// The name asked for.
    pub name: String,
}

fn known_names() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The entry named `name`, by Lanner's name or timm's.
pub fn find(name: &str) -> Result<&'static ModelEntry, UnknownModel> {
    MODELS
        .iter()
        .find(|m| m.name == name || m.timm_name == name)
        .ok_or_else(|| UnknownModel {
            name: name.to_string(),
        })
}

impl ModelEntry {
    /// Channels of the backbone's feature map, which the classifier head pools.
    pub fn feature_channels(&self) -> usize {
        match self.architecture {
            Architecture::MobileNetV3 { .. } => self.mobilenet_v3_config().feature_channels(),
            Architecture::Xception => XceptionConfig::new().feature_channels(),
        }
    }

    /// Build the backbone with random initialisation (timm's scheme).
    pub fn init_backbone(&self, device: &Device) -> Backbone {
        match self.architecture {
            Architecture::MobileNetV3 { .. } => {
                Backbone::MobileNetV3(self.mobilenet_v3_config().init(device))
            }
            Architecture::Xception => Backbone::Xception(XceptionConfig::new().init(device)),
        }
    }

    /// Load a timm checkpoint (or, for MobileNetV3, a torchvision one), as safetensors or a
    /// PyTorch `.pth` / `.bin` file, into `backbone`, ignoring the checkpoint's own head; any
    /// other missing, unexpected or mis-shaped tensor is an error that names it. See
    /// [`load_pretrained`].
    pub fn load_weights(&self, backbone: Backbone, path: &Path) -> Result<Backbone, WeightsError> {
        load_pretrained(self, backbone, path)
    }

    /// Name prefixes of a checkpoint's layers after the backbone, which loading a backbone
    /// ignores: MobileNetV3's post-pooling `conv_head` and ImageNet `classifier`, Xception's
    /// `fc`, and the `head.` of a Lanner model (so a trained model's weights can start
    /// another run).
    pub fn checkpoint_head(&self) -> &'static [&'static str] {
        match self.architecture {
            Architecture::MobileNetV3 { .. } => &["conv_head.", "classifier.", "head."],
            Architecture::Xception => &["fc.", "head."],
        }
    }

    /// Where each of the backbone's tensors sits in the Keras layer order that
    /// `--fine-tune-layer` counts in (Keras' `alpha` changes channels, not layers, so every
    /// width shares its size's table).
    pub fn keras_layer_map(&self) -> KerasLayerMap {
        match self.architecture {
            Architecture::MobileNetV3 { size, .. } => mobilenet_v3_layer_map(size),
            Architecture::Xception => xception_layer_map(),
        }
    }

    fn mobilenet_v3_config(&self) -> MobileNetV3Config {
        let Architecture::MobileNetV3 {
            size,
            width_multiplier,
        } = self.architecture
        else {
            unreachable!("{} is not a MobileNetV3", self.name)
        };
        MobileNetV3Config::new(size).with_width_multiplier(width_multiplier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_models_by_lanner_and_timm_name() {
        let large = find("mobilenet_v3_large").unwrap();
        assert_eq!(large.timm_name, "mobilenetv3_large_100");
        assert_eq!(find("mobilenetv3_large_100").unwrap(), large);
        assert_eq!(large.feature_channels(), 960);
        assert_eq!(find("mobilenet_v3_small").unwrap().feature_channels(), 576);
        assert_eq!(
            large.pretrained.hub_id,
            Some("timm/mobilenetv3_large_100.ra_in1k")
        );
        assert_eq!(large.pretrained.input_size, 224);
        assert_eq!(large.pretrained.interpolation, Interpolation::Bicubic);
        assert_eq!(
            find("mobilenet_v3_large_075").unwrap().pretrained.hub_id,
            None
        );
    }

    #[test]
    fn xception_is_timms_legacy_xception() {
        let xception = find("xception").unwrap();
        assert_eq!(find("legacy_xception").unwrap(), xception);
        assert_eq!(xception.feature_channels(), 2048);
        assert_eq!(xception.pretrained.input_size, 299);
        assert_eq!(xception.pretrained.interpolation, Interpolation::Bicubic);
        assert_eq!(xception.pretrained.crop_pct, 0.8975);
        assert_eq!(xception.pretrained.normalization, INCEPTION);
        assert_eq!(
            xception.pretrained.hub_id,
            Some("timm/legacy_xception.tf_in1k")
        );
        assert_eq!(xception.checkpoint_head(), &["fc.", "head."]);
    }

    #[test]
    fn unknown_model_lists_the_known_ones() {
        let message = find("resnet50").unwrap_err().to_string();
        assert_eq!(
            message,
            "unknown model `resnet50`; choose one of: mobilenet_v3_large, \
             mobilenet_v3_large_075, mobilenet_v3_small, mobilenet_v3_small_075, \
             mobilenet_v3_small_050, xception"
        );
    }

    #[test]
    fn normalization_maps_pixels_like_timm() {
        let device = Device::flex();
        let pixels = Tensor::<1>::from_floats([0.0, 255.0, 127.5], &device).reshape([1, 3, 1, 1]);
        let normalized: Vec<f32> = IMAGENET
            .apply(pixels)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let expected = [-0.485 / 0.229, (1.0 - 0.456) / 0.224, (0.5 - 0.406) / 0.225];
        for (got, want) in normalized.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }
}
