//! How fast the recipe's steps run on a device: what `lanner bench` times.
//!
//! Each timed step is the trainer's own [`training_step`] (or the inference forward pass) on a
//! synthetic batch of random pixels that is copied from the host every step, as the loader's
//! batches are. No images are decoded: this measures the model on the device, not the data
//! pipeline (`lanner data --benchmark` times that). The first step is timed on its own: on a GPU
//! it includes compiling and autotuning every kernel the step uses (the cold start).

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use lanner_data::rng::SplitMix64;
use lanner_models::ModelEntry;
use lanner_models::precision::Precision;

use crate::classifier::Classifier;
use crate::freeze::{parameter_counts, prepare};
use crate::optimizer::OptimizerConfig;
use crate::recipe::{BatchNormMode, Phase, PhaseName, Trainable};
use crate::trainer::{BackbonePlan, DropoutDraw, StepInput, StepLogits, training_step};

/// Which step to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// The forward pass of the trained model (no autodiff), as `predict` and `serve` run it.
    Inference,
    /// The recipe's phase 1: the head on a frozen backbone (Adam).
    Head,
    /// The recipe's phase 2: parameters from this Keras layer on, BatchNorm frozen (RMSprop).
    FineTune(usize),
    /// Everything trains, BatchNorm in training mode (`--from-scratch`, Adam).
    Full,
}

impl StepKind {
    /// The name `lanner bench` prints.
    pub fn label(self) -> String {
        match self {
            Self::Inference => "inference".into(),
            Self::Head => "frozen".into(),
            Self::FineTune(layer) => format!("fine-tune-layer-{layer}"),
            Self::Full => "full".into(),
        }
    }

    /// The recipe phase this step belongs to (`None` for inference).
    fn phase(self) -> Option<Phase> {
        let (name, trainable, optimizer, batch_norm) = match self {
            Self::Inference => return None,
            Self::Head => (
                PhaseName::Head,
                Trainable::Head,
                OptimizerConfig::adam(1e-4),
                BatchNormMode::Frozen,
            ),
            Self::FineTune(layer) => (
                PhaseName::FineTune,
                Trainable::FromKerasLayer(layer),
                OptimizerConfig::rmsprop(1e-5),
                BatchNormMode::Frozen,
            ),
            Self::Full => (
                PhaseName::FromScratch,
                Trainable::Everything,
                OptimizerConfig::adam(1e-3),
                BatchNormMode::Training,
            ),
        };
        Some(Phase {
            name,
            epochs: 1,
            optimizer,
            trainable,
            batch_norm,
            early_stopping: None,
        })
    }
}

/// What to time.
pub struct ThroughputConfig {
    /// The backbone.
    pub entry: &'static ModelEntry,
    /// Number of classes (2: the seed's binary head).
    pub classes: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Input height and width.
    pub image_size: usize,
    /// Untimed steps after the first, before the timed ones.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// The float type of the passes (the CPU's folded kernels run only f32).
    pub precision: Precision,
    /// Timed steps between two readbacks of their logits, as in training
    /// ([`crate::trainer::TrainingJob::readback_every`]).
    pub readback_every: usize,
}

/// The measurement.
#[derive(Clone, Debug)]
pub struct Throughput {
    /// Seconds from building the model to the end of the first step (kernel compilation and
    /// autotuning included on a GPU).
    pub first_step_seconds: f64,
    /// Seconds of each timed step.
    pub step_seconds: Vec<f64>,
    /// Timed images over the timed steps' total time.
    pub images_per_second: f64,
    /// Parameters that receive gradients, and all parameters.
    pub trainable_parameters: usize,
    /// All parameters.
    pub total_parameters: usize,
}

/// Time `kind` steps of `config`'s model on `device` (without autodiff; training adds it).
pub fn measure(
    config: &ThroughputConfig,
    kind: StepKind,
    device: &Device,
) -> Result<Throughput, lanner_models::keras_layers::KerasLayerError> {
    let started = Instant::now();
    let autodiff = device.clone().autodiff();
    let normalization = config.entry.pretrained.normalization;
    let size = config.image_size;
    // The batch is on the device before the first step and every step reuses it, as in
    // bench/gpu_torch.py: this times the steps, not the host-to-device copy (an epoch's wait
    // for the data loader is what `train` reports).
    let pixels = Tensor::<4>::from_data(
        TensorData::new(
            random_pixels(config.batch_size, size),
            [config.batch_size, 3, size, size],
        ),
        device,
    );
    let labels: Vec<usize> = (0..config.batch_size).map(|i| i % config.classes).collect();
    let class_weights = vec![1.0; config.classes];

    let (trainable_parameters, total_parameters, (first_step_seconds, seconds)) = match kind.phase()
    {
        None => {
            let model = Classifier::new(config.entry, config.classes, 0.2, device);
            let total = parameter_counts(&model).1;
            let (model, backbone) = model.for_inference(device, config.precision);
            let timing = time_steps(config, started, |_| {
                StepLogits::new(model.predict(&backbone, pixels.clone(), &normalization))
            });
            (0, total, timing)
        }
        Some(phase) => {
            let model = Classifier::new(config.entry, config.classes, 0.2, &autodiff);
            let model = prepare(model, config.entry, &phase)?;
            let (trainable, total) = parameter_counts(&model);
            let plan =
                BackbonePlan::for_phase(&model, config.entry, &phase, device, config.precision)?;
            let mut optimizer = phase.optimizer.init();
            let mut model = Some(model);
            let timing = time_steps(config, started, |step| {
                let (updated, logits) = training_step(
                    model
                        .take()
                        .expect("the model is put back after every step"),
                    &plan,
                    &mut optimizer,
                    StepInput {
                        pixels: pixels.clone(),
                        labels: &labels,
                        class_weights: &class_weights,
                        normalization: &normalization,
                        dropout: DropoutDraw {
                            rate: 0.2,
                            seed: 0,
                            epoch: 0,
                            step: step as u64,
                        },
                    },
                    &autodiff,
                );
                model = Some(updated);
                logits
            });
            (trainable, total, timing)
        }
    };
    let total: f64 = seconds.iter().sum();
    Ok(Throughput {
        first_step_seconds,
        images_per_second: (config.batch_size * seconds.len()) as f64 / total.max(1e-12),
        step_seconds: seconds,
        trainable_parameters,
        total_parameters,
    })
}

/// Run `step` once, then `config.warmup` untimed times, then `config.steps` timed times,
/// reading the steps' logits back as the trainer does: after the first step, at the end of the
/// warm-up, and every `config.readback_every` timed steps (on a GPU the steps run ahead of the
/// host in between, as in `bench/gpu_torch.py`, which synchronises at both ends only).
/// Returns the seconds from `started` to the end of the first step, and each timed step's: a
/// group of steps read back together shares its time evenly.
fn time_steps(
    config: &ThroughputConfig,
    started: Instant,
    mut step: impl FnMut(usize) -> StepLogits,
) -> (f64, Vec<f64>) {
    // Run the steps of `indices`, then read the last one's logits (which waits for them all).
    let mut run = |indices: std::ops::Range<usize>| {
        if let Some(logits) = indices.map(&mut step).last() {
            std::hint::black_box(logits.read());
        }
    };
    run(0..1);
    let first = started.elapsed().as_secs_f64();
    run(1..1 + config.warmup);
    let every = config.readback_every.max(1);
    let mut seconds = Vec::with_capacity(config.steps);
    let end = 1 + config.warmup + config.steps;
    let mut index = 1 + config.warmup;
    while index < end {
        let group = every.min(end - index);
        let group_started = Instant::now();
        run(index..index + group);
        index += group;
        let each = group_started.elapsed().as_secs_f64() / group as f64;
        seconds.extend(std::iter::repeat_n(each, group));
    }
    (first, seconds)
}

/// Random pixel values in 0..255, `[batch, 3, size, size]`, the same every run.
fn random_pixels(batch: usize, size: usize) -> Vec<f32> {
    let mut rng = SplitMix64::for_stream(0x0062_656e_6368, 0, 0);
    (0..batch * 3 * size * size)
        .map(|_| (rng.next_f32() * 255.0).floor())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanner_models::find;

    #[test]
    fn times_every_step_kind_on_a_tiny_model() {
        let config = ThroughputConfig {
            entry: find("mobilenet_v3_small_050").unwrap(),
            classes: 2,
            batch_size: 2,
            image_size: 32,
            warmup: 1,
            steps: 3,
            precision: Precision::F32,
            readback_every: 2,
        };
        let device = Device::flex();
        for kind in [
            StepKind::Inference,
            StepKind::Head,
            StepKind::FineTune(100),
            StepKind::Full,
        ] {
            let result = measure(&config, kind, &device).unwrap();
            assert_eq!(result.step_seconds.len(), 3, "{kind:?}");
            assert!(result.images_per_second > 0.0);
            assert!(result.first_step_seconds > 0.0);
            match kind {
                StepKind::Inference => assert_eq!(result.trainable_parameters, 0),
                StepKind::Head => assert!(result.trainable_parameters < 2_000),
                StepKind::FineTune(_) => assert!(
                    result.trainable_parameters > 2_000
                        && result.trainable_parameters < result.total_parameters
                ),
                StepKind::Full => assert!(result.trainable_parameters > 100_000),
            }
        }
    }
}
