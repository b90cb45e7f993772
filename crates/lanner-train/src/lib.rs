//! `lanner-train`: the seed's fine-tuning recipe, exact, on any burn device.
//!
//! - [`hyperparameters`]: the seed's names and defaults, and the checks that refuse bad values.
//! - [`recipe`]: the phases as a value ([`recipe::Recipe::seed`], [`recipe::Recipe::from_scratch`]).
//! - [`classifier`]: backbone + head, the class-weighted losses, reproducible dropout masks.
//! - [`initialisation`]: how a backbone without pretrained weights starts (Keras' or timm's).
//! - [`optimizer`]: Adam and RMSprop as Keras 3 computes them, with a state that survives a
//!   checkpoint.
//! - [`freeze`]: what trains in a phase, by Keras layer index.
//! - [`metrics`]: loss, accuracy, precision, recall, ROC AUC and the confusion matrix.
//! - [`early_stopping`]: the seed's rule.
//! - [`trainer`]: the loop; [`evaluate`]: metrics of a model on a data set.
//! - [`data_parallel`]: one step shared by several devices (the seed's `MirroredStrategy`).
//! - [`report`]: Keras-style log lines, a progress bar, `metrics.jsonl`.
//! - [`artifact`]: `lanner.json` + `weights.safetensors`; [`checkpoint`]: resumable state;
//!   [`tensor_file`]: atomic safetensors files.
//! - [`throughput`]: how fast the recipe's steps run on a device (`lanner bench`).

pub mod artifact;
pub mod checkpoint;
pub mod classifier;
pub mod data_parallel;
pub mod early_stopping;
pub mod evaluate;
pub mod freeze;
pub mod hyperparameters;
pub mod initialisation;
pub mod metrics;
pub mod optimizer;
pub mod recipe;
pub mod report;
pub mod step_memory;
pub mod tensor_file;
pub mod throughput;
pub mod trainer;

pub use artifact::ModelCard;
pub use hyperparameters::Hyperparameters;
pub use recipe::Recipe;
pub use trainer::{TrainError, TrainingJob, TrainingOutcome, train};
