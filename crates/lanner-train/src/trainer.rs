//! The training loop: runs a [`Recipe`]'s phases over a training and a validation loader,
//! reports every epoch, applies early stopping, checkpoints, and ends with the best epoch's
//! weights.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::{Device, TensorData};
use lanner_data::{DataError, Loader, SkippedFile};
use lanner_models::folded::{TileUnit, TrainableUnits};
use lanner_models::frozen::{cpu_bf16, is_cpu};
use lanner_models::precision::{Precision, cast_floats, in_dtype};
use lanner_models::{FrozenPrefix, ModelEntry, Normalization, global_average_pool};

use crate::artifact::{BestEpoch, apply_named_tensors, named_tensors};
use crate::checkpoint::{self, CheckpointError, CheckpointTensors, Position, RunState};
use crate::classifier::{Classifier, dropout_mask_rows, weighted_loss};
use crate::data_parallel::{Replicas, StepSettings};
use crate::early_stopping::{EarlyStoppingState, Verdict};
use crate::evaluate::evaluate;
use crate::freeze::{frozen_units, parameter_counts, prepare};
use crate::hyperparameters::Hyperparameters;
use crate::metrics::MetricsAccumulator;
use crate::optimizer::{Optimizer, parameter_ids, parameter_names};
use crate::recipe::{BatchNormMode, Phase, Recipe};
use crate::report::{EpochRecord, Reporter, write_metrics_jsonl};

/// Everything a training run needs.
pub struct TrainingJob {
    /// The backbone's registry entry.
    pub entry: &'static ModelEntry,
    /// The run's hyperparameters.
    pub hyperparameters: Hyperparameters,
    /// Its phases.
    pub recipe: Recipe,
    /// Class names in label order.
    pub class_names: Vec<String>,
    /// Input normalisation.
    pub normalization: Normalization,
    /// Training batches (augmented, shuffled).
    pub train: Loader,
    /// Validation batches.
    pub validation: Loader,
    /// The device computations run on (without autodiff; the trainer adds it).
    pub device: Device,
    /// Further devices that each train a share of every batch next to `device` (data
    /// parallelism, see [`crate::data_parallel`]); empty for one device.
    pub replica_devices: Vec<Device>,
    /// The float type of the training passes (master weights stay f32).
    pub precision: Precision,
    /// The starting model, on `device.autodiff()`.
    pub model: Classifier,
    /// Where to checkpoint after every epoch and on a stop request, and resume from.
    pub checkpoint_dir: Option<PathBuf>,
    /// Where `metrics.jsonl` goes.
    pub metrics_file: Option<PathBuf>,
    /// Set (e.g. by a SIGTERM handler) to stop after the current batch.
    pub stop: Arc<AtomicBool>,
    /// How many steps run before the trainer reads their logits back (for the epoch's
    /// metrics and the progress line). Reading waits for the device to finish every step
    /// queued so far; on a GPU, reading each step's logits right away leaves the GPU idle
    /// while the host prepares the next step. [`default_readback_every`] is 1 on the CPU and
    /// [`GPU_READBACK_EVERY`] elsewhere; the weights do not depend on it.
    pub readback_every: usize,
}

/// Steps a GPU runs between two readbacks of their logits (see
/// [`TrainingJob::readback_every`]): a progress line about every 16 steps, the GPU idle for
/// one drain of its queue per 16 steps instead of after every step.
pub const GPU_READBACK_EVERY: usize = 16;

/// [`TrainingJob::readback_every`] for `device`: 1 on the CPU (burn-flex computes as it is
/// asked, so nothing is gained by reading late), [`GPU_READBACK_EVERY`] on other devices.
pub fn default_readback_every(device: &Device) -> usize {
    if is_cpu(device) {
        1
    } else {
        GPU_READBACK_EVERY
    }
}

/// A step's logits, still on the device: one tensor per replica, in batch order. Reading
/// them ([`StepLogits::read`]) waits for the device to finish the step.
pub struct StepLogits(Vec<Tensor<2>>);

impl StepLogits {
    /// Logits of one device.
    pub fn new(logits: Tensor<2>) -> Self {
        Self(vec![logits])
    }

    /// Logits of several replicas, in batch order.
    pub fn of_replicas(logits: Vec<Tensor<2>>) -> Self {
        Self(logits)
    }

    /// The logits on the host, row-major `[batch, outputs]`, f32.
    pub fn read(self) -> Vec<f32> {
        let mut values = Vec::new();
        for logits in self.0 {
            let shard: Vec<f32> = in_dtype(logits, burn::tensor::DType::F32)
                .into_data()
                .try_into_vec()
                .expect("logits are f32");
            values.extend(shard);
        }
        values
    }
}

/// A step whose logits the trainer has not read yet.
struct UnreadStep {
    step: usize,
    logits: StepLogits,
    labels: Vec<usize>,
}

/// How a run ended.
pub struct TrainingOutcome {
    /// The best epoch's model, for inference (no autodiff).
    pub model: Classifier,
    /// Every epoch.
    pub history: Vec<EpochRecord>,
    /// The epoch whose weights `model` holds.
    pub best: Option<BestEpoch>,
    /// Whether the run continued from a checkpoint.
    pub resumed: bool,
}

/// Why a run did not finish.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The data loader failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A checkpoint could not be written or used.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// `--fine-tune-layer` or the layer map failed.
    #[error(transparent)]
    Layers(#[from] lanner_models::keras_layers::KerasLayerError),
    /// Stopped on request.
    #[error("{0}")]
    Stopped(String),
    /// A saved state does not fit the model.
    #[error("{0}")]
    Incompatible(String),
    /// The loss became NaN or infinite.
    #[error(
        "the training loss became {value} at epoch {epoch}; lower the learning rate (now {learning_rate})"
    )]
    Diverged {
        /// The loss value.
        value: f64,
        /// The epoch.
        epoch: usize,
        /// The phase's learning rate.
        learning_rate: f64,
    },
    /// `metrics.jsonl` could not be written.
    #[error("cannot write '{path}': {source}")]
    Metrics {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Run `job`'s recipe, resuming from its checkpoint if one is there.
pub fn train(job: TrainingJob, reporter: &mut dyn Reporter) -> Result<TrainingOutcome, TrainError> {
    let TrainingJob {
        entry,
        hyperparameters,
        recipe,
        class_names,
        normalization,
        train,
        validation,
        device,
        replica_devices,
        precision,
        mut model,
        checkpoint_dir,
        metrics_file,
        stop,
        readback_every,
    } = job;
    let readback_every = readback_every.max(1);
    let classes = class_names.len();
    let class_weights = hyperparameters.class_weight_vector(classes);
    let total_epochs = recipe.total_epochs();
    let seed = hyperparameters.seed;

    let mut state = RunState {
        position: Position::default(),
        epoch_metrics: None,
        epoch_train_seconds: 0.0,
        epoch_data_wait_seconds: 0.0,
        early_stopping: EarlyStoppingState::default(),
        history: Vec::new(),
        best: None,
        optimizer_iterations: 0,
    };
    // The best epoch's tensors, copied out: a cloned module would share its BatchNorm
    // running statistics with the model that goes on training.
    let mut best_model: Option<Vec<(String, TensorData)>> = None;
    let mut optimizer_state = None;
    let mut resumed = false;
    let mut skipped_reported = (0, 0);
    if let Some(dir) = &checkpoint_dir
        && let Some(saved) = checkpoint::load(dir, &hyperparameters, &class_names)?
    {
        let incompatible =
            |e: crate::artifact::ArtifactError| TrainError::Incompatible(e.to_string());
        model = apply_named_tensors(model, saved.model, dir).map_err(incompatible)?;
        best_model = saved.best.map(|best| best.into_iter().collect());
        optimizer_state = Some(saved.optimizer);
        state = saved.state;
        resumed = true;
        let p = &state.position;
        reporter.message(&format!(
            "Resuming from the checkpoint in {}: {} epochs done{}",
            dir.display(),
            p.epochs_done,
            if p.batch > 0 {
                format!(", epoch {} at batch {}", p.epochs_done + 1, p.batch)
            } else {
                String::new()
            }
        ));
    }

    while state.position.phase < recipe.phases.len() {
        let phase_index = state.position.phase;
        let phase = &recipe.phases[phase_index];
        model = prepare(model, entry, phase)?;
        let (trainable, total) = parameter_counts(&model);
        reporter.phase_start(phase_index, recipe.phases.len(), phase, trainable, total);
        let mut optimizer: Optimizer = phase.optimizer.init();
        if let Some(tensors) = optimizer_state.take() {
            optimizer
                .load_state(
                    state.optimizer_iterations,
                    &tensors,
                    &parameter_ids(&model),
                    &device,
                )
                .map_err(TrainError::Incompatible)?;
        }
        let devices: Vec<Device> = std::iter::once(device.clone())
            .chain(replica_devices.iter().cloned())
            .collect();
        let replicas = Replicas::for_phase(&model, entry, phase, &devices, precision)?;

        let mut stop_phase = false;
        while state.position.epoch_in_phase < phase.epochs && !stop_phase {
            let epoch = state.position.epochs_done + 1;
            let loader_epoch = (epoch - 1) as u64;
            let first_batch = state.position.batch;
            let batches = train.num_batches();
            reporter.epoch_start(epoch, total_epochs, batches, first_batch);
            let started = Instant::now();
            let mut metrics = state
                .epoch_metrics
                .take()
                .unwrap_or_else(|| MetricsAccumulator::new(classes, false));
            let mut train_seconds = state.epoch_train_seconds;
            let mut images_seen = 0usize;

            let mut data_wait_seconds = state.epoch_data_wait_seconds;
            let mut unread: Vec<UnreadStep> = Vec::with_capacity(readback_every);
            let mut batches_of_epoch = train.epoch_from(loader_epoch, first_batch).enumerate();
            loop {
                let waiting = Instant::now();
                let Some((offset, batch)) = batches_of_epoch.next() else {
                    break;
                };
                data_wait_seconds += waiting.elapsed().as_secs_f64();
                let batch = batch?;
                let step = first_batch + offset;
                let step_started = Instant::now();
                let labels = batch.labels.clone();
                let size = labels.len();
                let (updated, logits) = replicas.step(
                    model,
                    &mut optimizer,
                    batch,
                    StepSettings {
                        class_weights: &class_weights,
                        normalization: &normalization,
                        dropout: DropoutDraw {
                            rate: hyperparameters.drop_out_percentage,
                            seed,
                            epoch: loader_epoch,
                            step: step as u64,
                        },
                    },
                );
                model = updated;
                unread.push(UnreadStep {
                    step,
                    logits,
                    labels,
                });
                images_seen += size;
                let stopping = stop.load(Ordering::SeqCst) && step + 1 < batches;
                if unread.len() >= readback_every || step + 1 == batches || stopping {
                    for done in unread.drain(..) {
                        let logits = done.logits.read();
                        let weights: Vec<f32> = done
                            .labels
                            .iter()
                            .map(|&l| class_weights[l] as f32)
                            .collect();
                        metrics.update(&logits, &done.labels, &weights);
                        let running = metrics.finish().loss;
                        if !running.is_finite() {
                            return Err(TrainError::Diverged {
                                value: running,
                                epoch,
                                learning_rate: phase.optimizer.learning_rate(),
                            });
                        }
                        reporter.batch_end(done.step, batches, running);
                    }
                }
                // A step's time includes the wait for its logits when they are read with it.
                train_seconds += step_started.elapsed().as_secs_f64();

                if stopping {
                    state.position.batch = step + 1;
                    state.epoch_metrics = Some(metrics);
                    state.epoch_train_seconds = train_seconds;
                    state.epoch_data_wait_seconds = data_wait_seconds;
                    state.optimizer_iterations = optimizer.iterations();
                    return Err(stopped(
                        &checkpoint_dir,
                        &hyperparameters,
                        &class_names,
                        &state,
                        &model,
                        &best_model,
                        &optimizer,
                    ));
                }
            }

            let validation_metrics = evaluate(
                model.valid(),
                &validation,
                &normalization,
                classes,
                &device,
                precision,
            )?;
            let train_metrics = metrics.finish();
            let record = EpochRecord {
                epoch,
                phase: phase.name,
                train: train_metrics.clone(),
                validation: validation_metrics.clone(),
                seconds: started.elapsed().as_secs_f64(),
                train_seconds,
                data_wait_seconds,
                train_images_per_second: images_seen as f64
                    / (train_seconds - state.epoch_train_seconds).max(1e-9),
                learning_rate: phase.optimizer.learning_rate(),
            };
            reporter.epoch_end(&record);
            // Files found undecodable this epoch (each is reported once, then left out).
            for (loader, kind, reported) in [
                (&train, "training", &mut skipped_reported.0),
                (&validation, "validation", &mut skipped_reported.1),
            ] {
                let skipped = loader.skipped();
                if let Some(text) = SkippedFile::report(&skipped[*reported..], kind, true) {
                    reporter.message(&text);
                }
                *reported = skipped.len();
            }
            if let Some((label, skipped)) = train.label_without_usable_images() {
                return Err(DataError::NoUsableImages {
                    class: class_names[label].clone(),
                    skipped,
                }
                .into());
            }

            // Without early stopping every epoch is the latest best; with it, the rule decides
            // (a phase without any qualifying epoch keeps the previous phase's best weights).
            let verdict = match &phase.early_stopping {
                Some(rule) => rule.observe(
                    &mut state.early_stopping,
                    epoch,
                    train_metrics.accuracy,
                    validation_metrics.accuracy,
                ),
                None => Verdict::Best,
            };
            if verdict == Verdict::Best {
                state.best = Some(BestEpoch {
                    epoch,
                    phase: phase.name,
                    train: train_metrics,
                    validation: validation_metrics,
                });
                best_model = Some(named_tensors(&model));
            }
            if verdict == Verdict::Stop {
                reporter.message(&format!(
                    "Early stopping: no better epoch in the last {} epochs",
                    state.early_stopping.epochs_without_best
                ));
                stop_phase = true;
            }

            state.history.push(record);
            state.position.epoch_in_phase += 1;
            state.position.epochs_done += 1;
            state.position.batch = 0;
            state.epoch_metrics = None;
            state.epoch_train_seconds = 0.0;
            state.epoch_data_wait_seconds = 0.0;
            state.optimizer_iterations = optimizer.iterations();
            if let Some(path) = &metrics_file {
                write_metrics_jsonl(path, &state.history).map_err(|source| {
                    TrainError::Metrics {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            let phase_over = stop_phase || state.position.epoch_in_phase == phase.epochs;
            if phase_over {
                stop_phase = true;
                state.position.phase += 1;
                state.position.epoch_in_phase = 0;
                state.early_stopping = EarlyStoppingState::default();
                state.optimizer_iterations = 0;
            }
            if let Some(dir) = &checkpoint_dir {
                let optimizer_tensors = if phase_over {
                    Vec::new()
                } else {
                    optimizer.state(&parameter_names(&model)).1
                };
                save_checkpoint(
                    dir,
                    &hyperparameters,
                    &class_names,
                    &state,
                    &model,
                    &best_model,
                    optimizer_tensors,
                )?;
            }
            if stop.load(Ordering::SeqCst) && state.position.phase < recipe.phases.len() {
                return Err(TrainError::Stopped(stop_message(&checkpoint_dir, &state)));
            }
        }
    }

    // No epoch met the early-stopping rule (training accuracy always ahead of validation):
    // keep the last epoch, as the seed does.
    let best = match (state.best, state.history.last()) {
        (Some(best), _) => Some(best),
        (None, Some(last)) => {
            reporter.message(
                "No epoch met the early-stopping rule (validation accuracy within 0.005 of \
                 training accuracy); keeping the last epoch's weights",
            );
            Some(BestEpoch {
                epoch: last.epoch,
                phase: last.phase,
                train: last.train.clone(),
                validation: last.validation.clone(),
            })
        }
        (None, None) => None,
    };
    let final_model = match best_model {
        Some(best) => apply_named_tensors(model, best, Path::new("best"))
            .map_err(|e| TrainError::Incompatible(e.to_string()))?,
        None => model,
    };
    Ok(TrainingOutcome {
        model: final_model.valid(),
        history: state.history,
        best,
        resumed,
    })
}

/// The dropout draw of one step: the rate and the (seed, epoch, step) the mask comes from.
#[derive(Clone, Debug)]
pub struct DropoutDraw {
    /// Keras' `Dropout` rate.
    pub rate: f64,
    /// The run's seed.
    pub seed: u64,
    /// The epoch (0-based, as the loader counts).
    pub epoch: u64,
    /// The batch within the epoch.
    pub step: u64,
}

/// One batch for [`training_step`].
pub struct StepInput<'a> {
    /// Pixels `[batch, 3, h, w]` in 0..=255, on the device without autodiff.
    pub pixels: Tensor<4>,
    /// The label of each image.
    pub labels: &'a [usize],
    /// Keras' `class_weight`, by label.
    pub class_weights: &'a [f64],
    /// Input normalisation.
    pub normalization: &'a Normalization,
    /// The head's dropout.
    pub dropout: DropoutDraw,
}

/// How a phase runs the backbone: the units it does not train (all of them in phase 1, those
/// below the fine-tune layer in phase 2) without autodiff, folded on the CPU; the rest with
/// burn's autodiff, or on the CPU with the folded kernels' own gradients where they cover the
/// model (BatchNorm statistics frozen, as in the seed's phase 2).
pub struct BackbonePlan {
    frozen: FrozenPrefix,
    folded_training: bool,
    /// The tiles the folded units' products run on in bf16, if any.
    tiles: Option<TileUnit>,
    /// The float type of the trained units and the head (the frozen prefix has its own).
    precision: Precision,
}

impl BackbonePlan {
    /// The plan for `phase` of `model` (its current weights) on `device`, computing in
    /// `precision`. On a CPU with AMX tiles, bf16 applies to the folded units' dense and 1x1
    /// convolutions, frozen and trained (forward, input and weight gradients); the rest of
    /// them and the head stay f32. On a CPU without AMX it runs burn's bf16 modules.
    pub fn for_phase(
        model: &Classifier,
        entry: &ModelEntry,
        phase: &Phase,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, lanner_models::keras_layers::KerasLayerError> {
        match precision {
            Precision::F32 => Self::folded(model, entry, phase, device, None),
            Precision::Bf16 if is_cpu(device) && cpu_bf16().is_some() => {
                Self::folded(model, entry, phase, device, cpu_bf16())
            }
            _ => Self::with_burn_modules(model, entry, phase, precision),
        }
    }

    /// The frozen units folded on the CPU, the rest folded too where BatchNorm is frozen (their
    /// products in bf16 on `tiles` when given); on other devices the frozen units as modules.
    fn folded(
        model: &Classifier,
        entry: &ModelEntry,
        phase: &Phase,
        device: &Device,
        tiles: Option<TileUnit>,
    ) -> Result<Self, lanner_models::keras_layers::KerasLayerError> {
        let units = frozen_units(model, entry, phase.trainable)?;
        let frozen = match tiles {
            Some(unit) => FrozenPrefix::in_bf16(&model.backbone, units, unit),
            None => FrozenPrefix::new(&model.backbone, units, device),
        };
        let folded_training = !frozen.is_whole()
            && is_cpu(device)
            && phase.batch_norm == BatchNormMode::Frozen
            && TrainableUnits::supports(&model.backbone);
        Ok(Self {
            frozen,
            folded_training,
            tiles,
            precision: Precision::F32,
        })
    }

    /// The plan a GPU runs, on any device: the frozen units as burn modules, the rest with
    /// burn's autodiff, computing in `precision` (tests use it to check the CPU's folded plan
    /// and the GPU path alike).
    pub fn with_burn_modules(
        model: &Classifier,
        entry: &ModelEntry,
        phase: &Phase,
        precision: Precision,
    ) -> Result<Self, lanner_models::keras_layers::KerasLayerError> {
        let units = frozen_units(model, entry, phase.trainable)?;
        Ok(Self {
            frozen: FrozenPrefix::with_modules(&model.backbone, units, precision),
            folded_training: false,
            tiles: None,
            precision,
        })
    }
}

/// Which rows of a step's batch a call of [`step_gradients`] computes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// The rows.
    pub rows: Range<usize>,
    /// The whole batch's size.
    pub batch: usize,
}

impl Shard {
    /// All of a batch of `batch` rows.
    pub fn whole(batch: usize) -> Self {
        Self {
            rows: 0..batch,
            batch,
        }
    }
}

/// One optimizer step of the recipe on one batch: forward (see [`BackbonePlan`]), the
/// class-weighted loss, backward and the optimizer's update. Returns the updated model and the
/// batch's logits, left on the device: on a GPU the step may still be running.
pub fn training_step(
    model: Classifier,
    plan: &BackbonePlan,
    optimizer: &mut Optimizer,
    input: StepInput<'_>,
    autodiff: &Device,
) -> (Classifier, StepLogits) {
    let shard = Shard::whole(input.labels.len());
    let (gradients, logits) = step_gradients(&model, plan, input, &shard, autodiff);
    (optimizer.step(model, gradients), StepLogits::new(logits))
}

/// The gradients of one batch's loss, or of rows `shard.rows` of it (`input` holds only those
/// rows): their Keras loss weighted by their share of the batch, with their rows of the
/// batch's dropout mask, so the shards' gradients sum to the whole batch's. Also returns the
/// rows' logits (f32, on the device, without autodiff).
pub fn step_gradients(
    model: &Classifier,
    plan: &BackbonePlan,
    input: StepInput<'_>,
    shard: &Shard,
    autodiff: &Device,
) -> (GradientsParams, Tensor<2>) {
    let StepInput {
        pixels,
        labels,
        class_weights,
        normalization,
        dropout,
    } = input;
    let size = labels.len();
    debug_assert_eq!(size, shard.rows.len());
    // Below f32, the pass runs on a cast copy whose gradients reach `model`'s f32 parameters.
    let dtype = plan.precision.dtype();
    let cast_model = (!plan.precision.is_f32()).then(|| cast_floats(model.clone(), dtype));
    let compute = cast_model.as_ref().unwrap_or(model);
    let frozen = &plan.frozen;
    let mut folded = None;
    let pooled = if frozen.is_whole() {
        frozen.pooled(pixels, normalization).autodiff()
    } else if plan.folded_training {
        let input = frozen
            .feature_map(pixels, normalization)
            .expect("folded training runs on the CPU");
        let units = match plan.tiles {
            Some(unit) => TrainableUnits::in_bf16(&model.backbone, frozen.rest(), unit),
            None => TrainableUnits::new(&model.backbone, frozen.rest()),
        };
        let (pooled, activations) = units.forward(&input);
        let channels = pooled.len() / size;
        let pooled = Tensor::<2>::from_data(TensorData::new(pooled, [size, channels]), autodiff)
            .require_grad();
        folded = Some((units, activations, pooled.clone()));
        pooled
    } else {
        let features = frozen.features(pixels, normalization).autodiff();
        global_average_pool(compute.backbone.forward_units(features, frozen.rest()))
    };
    let [_, channels] = pooled.dims();
    let mask = dropout_mask_rows(
        dropout.rate,
        [shard.batch, channels],
        shard.rows.clone(),
        (dropout.seed, dropout.epoch, dropout.step),
        autodiff,
    );
    let mask = mask.map(|mask| in_dtype(mask, pooled.dtype()));
    let logits = in_dtype(compute.logits(pooled, mask), burn::tensor::DType::F32);
    let mut loss = weighted_loss(logits.clone(), labels, class_weights, autodiff);
    if size != shard.batch {
        loss = loss.mul_scalar(size as f64 / shard.batch as f64);
    }
    let gradients = loss.backward();
    let d_pooled = folded.as_ref().map(|(_, _, pooled)| {
        pooled
            .grad(&gradients)
            .expect("the pooled features require a gradient")
            .into_data()
            .try_into_vec::<f32>()
            .expect("f32 gradients")
    });
    let mut grads = GradientsParams::from_grads(gradients, model);
    if let (Some((units, activations, _)), Some(d_pooled)) = (folded, d_pooled) {
        let device = autodiff.clone().inner();
        for gradient in units.backward(activations, &d_pooled) {
            match gradient.values.shape().len() {
                1 => grads.register::<1>(gradient.id, Tensor::from_data(gradient.values, &device)),
                4 => grads.register::<4>(gradient.id, Tensor::from_data(gradient.values, &device)),
                n => unreachable!("a {n}-dimensional backbone parameter"),
            }
        }
    }
    (grads, logits.inner())
}

fn save_checkpoint(
    dir: &std::path::Path,
    hyperparameters: &Hyperparameters,
    class_names: &[String],
    state: &RunState,
    model: &Classifier,
    best_model: &Option<Vec<(String, TensorData)>>,
    optimizer: Vec<(String, burn::tensor::TensorData)>,
) -> Result<(), CheckpointError> {
    checkpoint::save(
        dir,
        hyperparameters,
        class_names,
        state,
        CheckpointTensors {
            model: &named_tensors(model),
            best: best_model.as_deref(),
            optimizer: &optimizer,
        },
    )
}

fn stop_message(checkpoint_dir: &Option<PathBuf>, state: &RunState) -> String {
    let p = &state.position;
    let at = if p.batch > 0 {
        format!("in epoch {} after batch {}", p.epochs_done + 1, p.batch)
    } else {
        format!("after epoch {}", p.epochs_done)
    };
    match checkpoint_dir {
        Some(dir) => format!(
            "training was stopped {at}; the checkpoint in {} resumes it (run the same command again)",
            dir.display()
        ),
        None => format!(
            "training was stopped {at}; pass --checkpoint-dir to be able to resume a stopped run"
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn stopped(
    checkpoint_dir: &Option<PathBuf>,
    hyperparameters: &Hyperparameters,
    class_names: &[String],
    state: &RunState,
    model: &Classifier,
    best_model: &Option<Vec<(String, TensorData)>>,
    optimizer: &Optimizer,
) -> TrainError {
    if let Some(dir) = checkpoint_dir {
        let tensors = optimizer.state(&parameter_names(model)).1;
        if let Err(e) = save_checkpoint(
            dir,
            hyperparameters,
            class_names,
            state,
            model,
            best_model,
            tensors,
        ) {
            return e.into();
        }
    }
    TrainError::Stopped(stop_message(checkpoint_dir, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freeze::prepare;
    use crate::optimizer::OptimizerConfig;
    use crate::recipe::{PhaseName, Trainable};
    use lanner_data::rng::SplitMix64;
    use lanner_models::find;

    /// The plans a test compares, each in low precision and in f32.
    #[derive(Clone, Copy, Debug)]
    enum Plans {
        /// The burn modules GPUs run, in this precision.
        Modules(Precision),
        /// The CPU's folded plan, its units' products on emulated bf16 tiles.
        FoldedTiles,
    }

    impl Plans {
        fn plan(
            self,
            model: &Classifier,
            entry: &ModelEntry,
            phase: &Phase,
            low: bool,
        ) -> BackbonePlan {
            match (self, low) {
                (Self::Modules(precision), true) => {
                    BackbonePlan::with_burn_modules(model, entry, phase, precision)
                }
                (Self::Modules(_), false) => {
                    BackbonePlan::with_burn_modules(model, entry, phase, Precision::F32)
                }
                (Self::FoldedTiles, low) => {
                    let tiles = low.then_some(TileUnit::Emulated);
                    BackbonePlan::folded(model, entry, phase, &Device::flex(), tiles)
                }
            }
            .unwrap()
        }
    }

    /// The gradients of one step in low precision and in f32 by `plans`, by parameter (every
    /// label the same: a batch whose per-sample gradients cancel would measure cancellation,
    /// not the pass).
    fn gradients_in(plans: Plans, trainable: Trainable) -> Vec<(Vec<f32>, Vec<f32>)> {
        let entry = find("mobilenet_v3_small_050").unwrap();
        let device = Device::flex();
        let autodiff = device.clone().autodiff();
        let phase = Phase {
            name: PhaseName::FineTune,
            epochs: 1,
            optimizer: OptimizerConfig::rmsprop(1e-4),
            trainable,
            batch_norm: BatchNormMode::Frozen,
            early_stopping: None,
        };
        let model = prepare(
            Classifier::seeded(entry, 2, 0.2, 3, &autodiff),
            entry,
            &phase,
        )
        .unwrap();
        let mut rng = SplitMix64::for_stream(3, 0, 0);
        let pixels: Vec<f32> = (0..4 * 3 * 64 * 64)
            .map(|_| (rng.next_f32() * 255.0).floor())
            .collect();
        let step = |low: bool| {
            let plan = plans.plan(&model, entry, &phase, low);
            let input = StepInput {
                pixels: Tensor::from_data(TensorData::new(pixels.clone(), [4, 3, 64, 64]), &device),
                labels: &[1, 1, 1, 1],
                class_weights: &[1.0, 1.0],
                normalization: &entry.pretrained.normalization,
                dropout: DropoutDraw {
                    rate: 0.2,
                    seed: 3,
                    epoch: 0,
                    step: 0,
                },
            };
            let (mut gradients, logits) =
                step_gradients(&model, &plan, input, &Shard::whole(4), &autodiff);
            assert_eq!(logits.dims()[0], 4);
            let mut pull = PullGradients {
                gradients: &mut gradients,
                values: Vec::new(),
            };
            model.visit(&mut pull);
            pull.values
        };
        let low = step(true);
        let full = step(false);
        assert_eq!(low.len(), full.len());
        low.into_iter().zip(full).collect()
    }

    /// The f32 gradient of every parameter that has one, in module order.
    struct PullGradients<'a> {
        gradients: &'a mut GradientsParams,
        values: Vec<Vec<f32>>,
    }

    impl burn::module::ModuleVisitor for PullGradients<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if let Some(gradient) = self.gradients.remove::<D>(param.id) {
                let data = gradient.into_data();
                assert_eq!(data.dtype(), burn::tensor::DType::F32, "f32 gradients");
                self.values.push(data.try_into_vec::<f32>().unwrap());
            }
        }
    }

    #[test]
    fn bf16_and_f16_passes_give_f32_gradients_close_to_f32_ones() {
        for precision in [Precision::Bf16, Precision::F16] {
            for trainable in [Trainable::Head, Trainable::FromKerasLayer(100)] {
                // Rounding grows through the layers; f16 keeps 3 more mantissa bits than bf16.
                let tolerance = match (trainable, precision) {
                    (Trainable::Head, _) => 0.02,
                    (_, Precision::F16) => 0.05,
                    _ => 0.1,
                };
                compare_gradients(Plans::Modules(precision), trainable, tolerance);
            }
        }
    }

    #[test]
    fn folded_units_on_bf16_tiles_give_gradients_close_to_f32_ones() {
        // The folded units' dense and 1x1 products round to bf16; the head is f32. From layer 0
        // every unit trains (the products of the trained units alone differ from f32's), and
        // the rounding grows through all of them (measured: 8% of a tensor's largest).
        for (trainable, tolerance) in [
            (Trainable::Head, 0.02),
            (Trainable::FromKerasLayer(100), 0.03),
            (Trainable::FromKerasLayer(0), 0.15),
        ] {
            compare_gradients(Plans::FoldedTiles, trainable, tolerance);
        }
    }

    /// Every gradient that `plans` computes in low precision is within `tolerance` of its f32
    /// one (relative to the tensor's largest), and some differ.
    fn compare_gradients(plans: Plans, trainable: Trainable, tolerance: f32) {
        let pairs = gradients_in(plans, trainable);
        assert!(pairs.len() >= 2, "{trainable:?}");
        let largest = |values: &[f32]| values.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Tensors whose gradients are a thousandth of the step's largest sit below
        // bf16's resolution of the activations they come from: their rounding noise
        // (which varies with the summation order of the run) is all they carry.
        let step_scale = pairs
            .iter()
            .map(|(_, full)| largest(full))
            .fold(0f32, f32::max);
        let (mut compared, mut differ) = (0, false);
        for (low, full) in pairs {
            let scale = largest(&full);
            if scale < 1e-3 * step_scale {
                continue;
            }
            let worst = low
                .iter()
                .zip(&full)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= tolerance * scale,
                "{plans:?} {trainable:?}: off by {worst} of {scale}"
            );
            differ |= worst > 0.0;
            compared += 1;
        }
        assert!(compared >= 2, "{plans:?} {trainable:?}");
        assert!(differ, "{plans:?} {trainable:?} computed in f32");
    }
}
