//! The hyperparameters of a training run, by the seed's names, with its defaults and the
//! checks that refuse a bad value before any training starts.

use crate::initialisation::Initialisation;
use lanner_models::precision::Precision;
use lanner_models::{Architecture, ModelEntry};
use serde::{Deserialize, Serialize};

/// Every value that shapes a training run. The names are the seed's (`batch-size`,
/// `fine-tune-layer`, …) with `_` for `-`; they travel into `lanner.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    /// The registry's model name (`mobilenet_v3_large`, `xception`, …).
    pub arch: String,
    /// Height and width images are resized to.
    pub image_size: usize,
    /// Images per training step.
    pub batch_size: usize,
    /// Epochs of phase 1 (the head alone): 3 for MobileNetV3, 5 for Xception.
    pub initial_epochs: usize,
    /// Adam's learning rate in phase 1 (and for `--from-scratch`).
    pub learning_rate: f64,
    /// The most epochs phase 2 runs (early stopping may end it sooner).
    pub fine_tune_epochs: usize,
    /// RMSprop's learning rate in phase 2.
    pub fine_tune_learning_rate: f64,
    /// Keras layer index from which the backbone trains in phase 2.
    pub fine_tune_layer: usize,
    /// Dropout rate before the dense layer: 0.1 for MobileNetV3, 0.2 for Xception.
    pub drop_out_percentage: f64,
    /// `RandomRotation` factor: angles uniform in ±factor·2π.
    pub random_rotation: f64,
    /// Class weight of label 0 (binary).
    pub negative_weight: f64,
    /// Class weight of label 1 (binary).
    pub positive_weight: f64,
    /// One weight per class, in class order; replaces the two above when set.
    pub class_weights: Option<Vec<f64>>,
    /// Epochs without a new best before phase 2 stops.
    pub patience: usize,
    /// Train the whole network from the first epoch with BatchNorm updating its statistics.
    pub from_scratch: bool,
    /// How the backbone's convolution kernels start when no weights are loaded (cards
    /// written before the option: timm's).
    #[serde(default = "Initialisation::before_the_option")]
    pub init: Initialisation,
    /// Seed of the shuffles, augmentations, dropout and initialisation.
    pub seed: u64,
    /// The float type the training passes computed in (cards written before it was recorded:
    /// f32, the only one then on the CPU). `lanner evaluate` validates in it by default.
    #[serde(default)]
    pub precision: Precision,
}

impl Hyperparameters {
    /// The seed's defaults for the model `entry`.
    pub fn for_model(entry: &ModelEntry) -> Self {
        let xception = matches!(entry.architecture, Architecture::Xception);
        Self {
            arch: entry.name.to_string(),
            image_size: entry.pretrained.input_size,
            batch_size: 32,
            initial_epochs: if xception { 5 } else { 3 },
            learning_rate: 1e-4,
            fine_tune_epochs: 10,
            fine_tune_learning_rate: 1e-5,
            fine_tune_layer: 100,
            drop_out_percentage: if xception { 0.2 } else { 0.1 },
            random_rotation: 0.2,
            negative_weight: 1.0,
            positive_weight: 1.0,
            class_weights: None,
            patience: 2,
            from_scratch: false,
            init: Initialisation::Keras,
            seed: 1,
            precision: Precision::F32,
        }
    }

    /// Refuse values no run can use, each with one sentence naming the option and its range.
    /// `classes` is the number of classes of the training data; `keras_layers` the number of
    /// layers of the Keras backbone `fine-tune-layer` counts in.
    pub fn validate(&self, classes: usize, keras_layers: usize) -> Result<(), HyperparameterError> {
        let fail = |message: String| Err(HyperparameterError(message));
        if self.batch_size == 0 {
            return fail("--batch-size must be at least 1".into());
        }
        if self.image_size < 32 {
            return fail(format!(
                "--image-size {} is too small; the backbones downsample by 32, pass at least 32",
                self.image_size
            ));
        }
        for (name, value) in [
            ("--learning-rate", self.learning_rate),
            ("--fine-tune-learning-rate", self.fine_tune_learning_rate),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return fail(format!("{name} must be a positive number, got {value}"));
            }
        }
        if !(0.0..1.0).contains(&self.drop_out_percentage) {
            return fail(format!(
                "--drop-out-percentage must be at least 0 and below 1, got {}",
                self.drop_out_percentage
            ));
        }
        if !(self.random_rotation.is_finite() && self.random_rotation >= 0.0) {
            return fail(format!(
                "--random-rotation must be 0 or more (a fraction of a full turn), got {}",
                self.random_rotation
            ));
        }
        for (name, value) in [
            ("--negative-weight", self.negative_weight),
            ("--positive-weight", self.positive_weight),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return fail(format!("{name} must be 0 or more, got {value}"));
            }
        }
        if let Some(weights) = &self.class_weights {
            if weights.len() != classes {
                return fail(format!(
                    "--class-weights has {} values but the data has {classes} classes; give one \
                     weight per class, in class-folder order",
                    weights.len()
                ));
            }
            if let Some(bad) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
                return fail(format!("--class-weights must all be 0 or more, got {bad}"));
            }
        }
        if self.fine_tune_layer > keras_layers {
            return fail(format!(
                "--fine-tune-layer {} is past the last layer: the Keras backbone of {} has \
                 {keras_layers} layers; pass 0 (fine-tune every layer) to {keras_layers} \
                 (freeze the whole backbone)",
                self.fine_tune_layer, self.arch
            ));
        }
        if self.initial_epochs + self.fine_tune_epochs == 0 {
            return fail(
                "--initial-epochs and --fine-tune-epochs are both 0; nothing would train".into(),
            );
        }
        Ok(())
    }

    /// The loss weight of each class, in class order (Keras' `class_weight`).
    pub fn class_weight_vector(&self, classes: usize) -> Vec<f64> {
        match &self.class_weights {
            Some(weights) => weights.clone(),
            None if classes == 2 => vec![self.negative_weight, self.positive_weight],
            None => vec![1.0; classes],
        }
    }
}

/// A hyperparameter no run can use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct HyperparameterError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    fn large() -> Hyperparameters {
        Hyperparameters::for_model(lanner_models::find("mobilenet_v3_large").unwrap())
    }

    #[test]
    fn defaults_follow_the_seed() {
        let hp = large();
        assert_eq!(
            (hp.batch_size, hp.initial_epochs, hp.image_size),
            (32, 3, 224)
        );
        assert_eq!((hp.fine_tune_epochs, hp.fine_tune_layer), (10, 100));
        assert_eq!(hp.fine_tune_learning_rate, 1e-5);
        assert_eq!(hp.drop_out_percentage, 0.1);
        let xception = Hyperparameters::for_model(lanner_models::find("xception").unwrap());
        assert_eq!((xception.initial_epochs, xception.image_size), (5, 299));
        assert_eq!(xception.drop_out_percentage, 0.2);
        assert_eq!(hp.class_weight_vector(2), vec![1.0, 1.0]);
        assert_eq!(hp.init, Initialisation::Keras);
    }

    #[test]
    fn a_card_from_before_the_init_option_reads_as_timms() {
        let mut json = serde_json::to_value(large()).unwrap();
        assert_eq!(json["init"], "keras");
        json.as_object_mut().unwrap().remove("init");
        let read: Hyperparameters = serde_json::from_value(json).unwrap();
        assert_eq!(read.init, Initialisation::Timm);
    }

    #[test]
    fn bad_values_are_refused_with_the_option_name() {
        let check = |change: fn(&mut Hyperparameters)| {
            let mut hp = large();
            change(&mut hp);
            hp.validate(2, 187).unwrap_err().to_string()
        };
        assert_eq!(
            check(|h| h.batch_size = 0),
            "--batch-size must be at least 1"
        );
        assert_eq!(
            check(|h| h.fine_tune_learning_rate = -1e-5),
            "--fine-tune-learning-rate must be a positive number, got -0.00001"
        );
        assert_eq!(
            check(|h| h.drop_out_percentage = 1.0),
            "--drop-out-percentage must be at least 0 and below 1, got 1"
        );
        assert_eq!(
            check(|h| h.random_rotation = -0.1),
            "--random-rotation must be 0 or more (a fraction of a full turn), got -0.1"
        );
        assert!(check(|h| h.fine_tune_layer = 188).starts_with(
            "--fine-tune-layer 188 is past the last layer: the Keras backbone of \
             mobilenet_v3_large has 187 layers"
        ));
        assert!(
            check(|h| h.class_weights = Some(vec![1.0]))
                .starts_with("--class-weights has 1 values but the data has 2 classes")
        );
        assert!(large().validate(2, 187).is_ok());
    }
}
