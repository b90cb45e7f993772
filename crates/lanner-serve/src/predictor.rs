//! A loaded model that turns pixel batches into predictions, and what its predictions mean.
//!
//! Predictions are what TF Serving returns for the seed's Keras model: the model's outputs
//! after its activation. A binary model ends in one sigmoid unit, so its prediction is `[p]`,
//! the probability of the second class (`class_names[1]`, the second class folder); a model
//! of K > 2 classes ends in a softmax, `[p0, …, pK-1]`. [`ModelInfo::class_probabilities`]
//! spells both out per class (`[1 - p, p]` for a binary model), as `lanner predict` prints them.

use burn::tensor::{Device, Tensor, TensorData};
use lanner_models::precision::Precision;
use lanner_models::{FrozenPrefix, Normalization};
use lanner_train::ModelCard;
use lanner_train::artifact::{self, ArtifactError};
use lanner_train::classifier::Classifier;

use crate::model_dir::ModelDir;

/// What the server and the CLI need to know about a model, without its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// Class names in label order.
    pub class_names: Vec<String>,
    /// Square input size.
    pub image_size: usize,
    /// Values per prediction: 1 (binary, sigmoid) or the number of classes (softmax).
    pub outputs: usize,
    /// The registry's model name.
    pub arch: String,
    /// TF Serving's version number: the model folder's name when it is a number (`1/`), else 1.
    pub version: u64,
}

impl ModelInfo {
    /// The facts of the model described by `card`, found in `dir`.
    pub fn new(card: &ModelCard, dir: &ModelDir) -> Self {
        Self {
            class_names: card.class_names.clone(),
            image_size: card.preprocessing.image_size,
            outputs: card.head.outputs,
            arch: card.arch.clone(),
            version: dir
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .unwrap_or(1),
        }
    }

    /// Whether the model has one sigmoid output for two classes.
    pub fn is_binary(&self) -> bool {
        self.outputs == 1
    }

    /// The probability of each class, from a prediction.
    pub fn class_probabilities(&self, prediction: &[f32]) -> Vec<f32> {
        if self.is_binary() {
            vec![1.0 - prediction[0], prediction[0]]
        } else {
            prediction.to_vec()
        }
    }

    /// The index of the predicted class: for a binary model the second class when its
    /// probability is at least `threshold`, else the most probable class.
    pub fn predicted_class(&self, prediction: &[f32], threshold: f32) -> usize {
        if self.is_binary() {
            return usize::from(prediction[0] >= threshold);
        }
        prediction
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &p)| {
                if p > best.1 { (i, p) } else { best }
            })
            .0
    }

    /// Floats in one image's `[3, H, W]` pixels.
    pub fn pixels_per_image(&self) -> usize {
        3 * self.image_size * self.image_size
    }
}

/// A model ready to predict: its card, its weights on a device, its normalisation.
pub struct Predictor {
    /// What the model is.
    pub info: ModelInfo,
    model: Classifier,
    /// The backbone folded for inference (on the CPU), once at load.
    backbone: FrozenPrefix,
    normalization: Normalization,
    device: Device,
}

impl Predictor {
    /// Loads the model in `dir` onto `device`, to compute in `precision` (below f32: the
    /// backbone as burn modules and the head cast to it, as on a GPU; the CPU's folded backbone
    /// runs f32 only).
    pub fn load(
        dir: &ModelDir,
        device: Device,
        precision: Precision,
    ) -> Result<Self, ArtifactError> {
        let (card, model) = artifact::load(&dir.path, &device)?;
        let (model, backbone) = model.for_inference(&device, precision);
        Ok(Self {
            info: ModelInfo::new(&card, dir),
            normalization: card.preprocessing.normalization(),
            backbone,
            model,
            device,
        })
    }

    /// Predictions for `count` images in `pixels` (`[count, 3, H, W]`, 0..=255), one row of
    /// [`ModelInfo::outputs`] values per image.
    pub fn predict(&self, pixels: Vec<f32>, count: usize) -> Vec<Vec<f32>> {
        let size = self.info.image_size;
        let input = Tensor::<4>::from_data(
            TensorData::new(pixels, [count, 3, size, size]),
            &self.device,
        );
        let logits: Vec<f32> = self
            .model
            .predict(&self.backbone, input, &self.normalization)
            .into_data()
            .try_into_vec()
            .expect("the model's logits are f32");
        logits
            .chunks_exact(self.info.outputs)
            .map(activation)
            .collect()
    }
}

/// Sigmoid of one logit, softmax of several: Keras' output activations.
pub fn activation(logits: &[f32]) -> Vec<f32> {
    if let [logit] = logits {
        return vec![sigmoid(*logit)];
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// `1 / (1 + e^-x)`, without overflow for large negative `x`.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanner_train::{Hyperparameters, Recipe};

    #[test]
    fn bf16_and_f16_predictions_are_close_to_f32() {
        let entry = lanner_models::find("mobilenet_v3_small_050").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut hyperparameters = Hyperparameters::for_model(entry);
        hyperparameters.image_size = 32;
        let classes = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let card = ModelCard::new(
            entry,
            classes.clone(),
            hyperparameters.clone(),
            Recipe::for_hyperparameters(&hyperparameters),
        );
        let model = Classifier::seeded(entry, 3, 0.2, 7, &Device::flex());
        artifact::save(dir.path(), &card, &model, false).unwrap();
        let model_dir = ModelDir::open(dir.path()).unwrap();
        let pixels: Vec<f32> = (0..2 * 3 * 32 * 32)
            .map(|i| (i * 37 % 256) as f32)
            .collect();
        let predict = |precision| {
            Predictor::load(&model_dir, Device::flex(), precision)
                .unwrap()
                .predict(pixels.clone(), 2)
        };
        let full = predict(Precision::F32);
        for precision in [Precision::Bf16, Precision::F16] {
            let low = predict(precision);
            assert_eq!(low.len(), 2);
            let worst = low
                .iter()
                .flatten()
                .zip(full.iter().flatten())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 0.02, "{precision}: probabilities off by {worst}");
            assert!(worst > 0.0, "{precision} computed in f32");
        }
    }

    fn info(outputs: usize, classes: &[&str]) -> ModelInfo {
        ModelInfo {
            class_names: classes.iter().map(|c| c.to_string()).collect(),
            image_size: 8,
            outputs,
            arch: "test".into(),
            version: 1,
        }
    }

    #[test]
    fn sigmoid_for_one_logit_softmax_for_more() {
        assert_eq!(activation(&[0.0]), vec![0.5]);
        assert!((activation(&[2.0])[0] - 0.880_797).abs() < 1e-6);
        assert!(activation(&[-200.0])[0] >= 0.0);
        let p = activation(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[2] - 0.665_240_9).abs() < 1e-6);
    }

    #[test]
    fn binary_predictions_use_the_threshold_on_the_second_class() {
        let binary = info(1, &["cat", "dog"]);
        assert_eq!(binary.class_probabilities(&[0.75]), vec![0.25, 0.75]);
        assert_eq!(binary.predicted_class(&[0.5], 0.5), 1);
        assert_eq!(binary.predicted_class(&[0.49], 0.5), 0);
        assert_eq!(binary.predicted_class(&[0.75], 0.8), 0);
        let three = info(3, &["a", "b", "c"]);
        assert_eq!(three.predicted_class(&[0.2, 0.5, 0.3], 0.9), 1);
        assert_eq!(
            three.class_probabilities(&[0.2, 0.5, 0.3]),
            vec![0.2, 0.5, 0.3]
        );
    }
}
