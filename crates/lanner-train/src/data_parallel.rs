//! Data-parallel training steps, the seed's `MirroredStrategy`: one replica of the model per
//! device, each computing the gradients of its share of the batch; their sum is the whole
//! batch's gradient, and one optimizer step updates the model every replica is forked from at
//! the next step.
//!
//! The shares are contiguous rows of the batch, their sizes differing by at most one. Each
//! replica's loss is its rows' Keras loss (`sum_over_batch_size` of its rows) weighted by its
//! share of the batch, and its dropout mask is its rows of the whole batch's mask, so the sum of
//! the replicas' gradients is the gradient one device computes on the whole batch, up to float
//! rounding. Replicas run on their own threads; their gradients are moved to the first device,
//! summed with burn's [`GradientsAccumulator`], and applied there.
//!
//! In phases whose BatchNorm layers train on batch statistics (`--from-scratch`), the replicas
//! of a step form a [`ReplicaGroup`]: every BatchNorm gathers the replicas' statistics, so each
//! normalises with the whole batch's statistics, not its rows' (PyTorch's `SyncBatchNorm`;
//! `MirroredStrategy` needs `synchronized=True` for this), and the gradients still add up to
//! one device's. See [`lanner_models::sync_batch_norm`].

use std::ops::Range;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use lanner_data::loader::Batch;
use lanner_models::ModelEntry;
use lanner_models::Normalization;
use lanner_models::keras_layers::KerasLayerError;
use lanner_models::precision::Precision;
use lanner_models::sync_batch_norm::{self, ReplicaGroup};

use crate::classifier::Classifier;
use crate::optimizer::Optimizer;
use crate::recipe::Phase;
use crate::trainer::{BackbonePlan, DropoutDraw, Shard, StepInput, StepLogits, step_gradients};

/// The devices a phase trains on, each with its plan for the backbone's frozen part.
pub struct Replicas {
    /// `(device without autodiff, its plan)`; the first holds the model and the optimizer.
    replicas: Vec<(Device, BackbonePlan)>,
}

/// What a step needs besides the model and the batch.
pub struct StepSettings<'a> {
    /// Keras' `class_weight`, by label.
    pub class_weights: &'a [f64],
    /// Input normalisation.
    pub normalization: &'a Normalization,
    /// The head's dropout.
    pub dropout: DropoutDraw,
}

impl Replicas {
    /// Replicas of `model` for `phase` on `devices` (the model's own device first).
    pub fn for_phase(
        model: &Classifier,
        entry: &ModelEntry,
        phase: &Phase,
        devices: &[Device],
        precision: Precision,
    ) -> Result<Self, KerasLayerError> {
        let replicas = devices
            .iter()
            .enumerate()
            .map(|(index, device)| {
                let plan = if index == 0 {
                    BackbonePlan::for_phase(model, entry, phase, device, precision)?
                } else {
                    let replica = model.clone().fork(&device.clone().autodiff());
                    BackbonePlan::for_phase(&replica, entry, phase, device, precision)?
                };
                Ok((device.clone(), plan))
            })
            .collect::<Result<_, KerasLayerError>>()?;
        Ok(Self { replicas })
    }

    /// Replicas with plans made elsewhere (e.g. [`BackbonePlan::with_burn_modules`]), the
    /// model's own device first.
    pub fn with_plans(replicas: Vec<(Device, BackbonePlan)>) -> Self {
        assert!(!replicas.is_empty(), "a step needs at least one device");
        Self { replicas }
    }

    /// How many devices share each step.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Never: there is always the model's own device.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// One optimizer step on `batch`: returns the updated model (on the first device) and the
    /// batch's logits, in batch order, left on the replicas' devices.
    pub fn step(
        &self,
        model: Classifier,
        optimizer: &mut Optimizer,
        batch: Batch,
        settings: StepSettings<'_>,
    ) -> (Classifier, StepLogits) {
        let (gradients, logits) = self.gradients(&model, batch, settings);
        (optimizer.step(model, gradients), logits)
    }

    /// The gradients of the whole batch's loss with respect to `model`'s parameters, on the
    /// first device, and the batch's logits in batch order, left on the replicas' devices.
    pub fn gradients(
        &self,
        model: &Classifier,
        batch: Batch,
        settings: StepSettings<'_>,
    ) -> (GradientsParams, StepLogits) {
        let (main_device, main_plan) = &self.replicas[0];
        let shards = shards(batch.len(), self.replicas.len());
        if shards.len() <= 1 {
            let labels = batch.labels.clone();
            let input = StepInput {
                pixels: batch.into_images_tensor(main_device),
                labels: &labels,
                class_weights: settings.class_weights,
                normalization: settings.normalization,
                dropout: settings.dropout,
            };
            let autodiff = main_device.clone().autodiff();
            let shard = Shard::whole(labels.len());
            let (gradients, logits) = step_gradients(model, main_plan, input, &shard, &autodiff);
            return (gradients, StepLogits::new(logits));
        }

        let size = batch.len();
        let per_image = 3 * batch.height * batch.width;
        let group = ReplicaGroup::new(shards.len(), size);
        let results: Vec<(GradientsParams, Tensor<2>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = self
                .replicas
                .iter()
                .zip(&shards)
                .enumerate()
                .map(|(rank, ((device, plan), rows))| {
                    let replica_autodiff = device.clone().autodiff();
                    let replica = model.clone().fork(&replica_autodiff);
                    let pixels = Tensor::<4>::from_data(
                        TensorData::new(
                            batch.images[rows.start * per_image..rows.end * per_image].to_vec(),
                            [rows.len(), 3, batch.height, batch.width],
                        ),
                        device,
                    );
                    let labels = &batch.labels[rows.clone()];
                    let dropout = settings.dropout.clone();
                    let shard = Shard {
                        rows: rows.clone(),
                        batch: size,
                    };
                    let settings = &settings;
                    let main_device = main_device.clone();
                    let group = &group;
                    scope.spawn(move || {
                        let input = StepInput {
                            pixels,
                            labels,
                            class_weights: settings.class_weights,
                            normalization: settings.normalization,
                            dropout,
                        };
                        let (gradients, logits) = sync_batch_norm::join(group, rank, || {
                            step_gradients(&replica, plan, input, &shard, &replica_autodiff)
                        });
                        (gradients.to_device(&main_device, &replica), logits)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().expect("a replica's step panicked"))
                .collect()
        });

        let mut sum = GradientsAccumulator::<Classifier>::new();
        let mut logits = Vec::with_capacity(results.len());
        for (gradients, shard_logits) in results {
            sum.accumulate(model, gradients);
            logits.push(shard_logits);
        }
        (sum.grads(), StepLogits::of_replicas(logits))
    }
}

/// `batch` rows split into at most `parts` contiguous, non-empty shards whose sizes differ by
/// at most one (the first ones take the remainder).
pub fn shards(batch: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, batch.max(1));
    let (base, extra) = (batch / parts, batch % parts);
    let mut start = 0;
    (0..parts)
        .map(|part| {
            let len = base + usize::from(part < extra);
            let rows = start..start + len;
            start += len;
            rows
        })
        .filter(|rows| !rows.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{apply_named_tensors, named_tensors};
    use crate::freeze::prepare;
    use crate::optimizer::{OptimizerConfig, parameter_names};
    use crate::recipe::{BatchNormMode, PhaseName, Trainable};
    use burn::module::{ModuleVisitor, Param, ParamId};
    use lanner_data::rng::SplitMix64;
    use lanner_models::batch_norm::is_running_statistic;
    use lanner_models::find;
    use std::collections::HashMap;
    use std::path::Path;

    const SIZE: usize = 32;

    fn batch(step: u64, images: usize) -> Batch {
        let mut rng = SplitMix64::for_stream(11, 0, step);
        Batch {
            images: (0..images * 3 * SIZE * SIZE)
                .map(|_| (rng.next_f32() * 255.0).floor())
                .collect(),
            labels: (0..images).map(|i| (i + step as usize) % 2).collect(),
            samples: (0..images).collect(),
            height: SIZE,
            width: SIZE,
        }
    }

    /// Step `step` of epoch 0: class weights 1 and 2, dropout 0.2.
    fn settings(entry: &'static ModelEntry, step: u64) -> StepSettings<'static> {
        StepSettings {
            class_weights: &[1.0, 2.0],
            normalization: &entry.pretrained.normalization,
            dropout: DropoutDraw {
                rate: 0.2,
                seed: 5,
                epoch: 0,
                step,
            },
        }
    }

    /// Two steps of `phase` on one device and on three replicas of it (shards of 2, 2 and 1
    /// images): the same weights and logits, up to float rounding.
    fn compare(phase: Phase, burn_modules: bool) {
        let entry = find("mobilenet_v3_small_050").unwrap();
        let device = Device::flex();
        let model = Classifier::seeded(entry, 2, 0.2, 5, &device.clone().autodiff());
        let run = |replicas: usize| {
            let mut model = prepare(model.clone(), entry, &phase).unwrap();
            let devices = vec![device.clone(); replicas];
            let replicas = if burn_modules {
                let plans = devices
                    .iter()
                    .map(|d| {
                        let plan =
                            BackbonePlan::with_burn_modules(&model, entry, &phase, Precision::F32)
                                .unwrap();
                        (d.clone(), plan)
                    })
                    .collect();
                Replicas::with_plans(plans)
            } else {
                Replicas::for_phase(&model, entry, &phase, &devices, Precision::F32).unwrap()
            };
            let mut optimizer = phase.optimizer.init();
            let mut logits = Vec::new();
            for step in 0..2 {
                let (updated, step_logits) =
                    replicas.step(model, &mut optimizer, batch(step, 5), settings(entry, step));
                model = updated;
                logits.extend(step_logits.read());
            }
            (named_tensors(&model), logits)
        };
        let (one_weights, one_logits) = run(1);
        let (three_weights, three_logits) = run(3);
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 + 1e-4 * a.abs().max(b.abs());
        assert_eq!(one_logits.len(), 10);
        for (a, b) in one_logits.iter().zip(&three_logits) {
            assert!(close(*a, *b), "logits {a} vs {b}");
        }
        let mut changed = 0;
        let initial = named_tensors(&model);
        for (((name, one), (_, three)), (_, start)) in
            one_weights.iter().zip(&three_weights).zip(&initial)
        {
            let one = one.clone().try_into_vec::<f32>().unwrap();
            let three = three.clone().try_into_vec::<f32>().unwrap();
            for (a, b) in one.iter().zip(&three) {
                assert!(close(*a, *b), "{name}: {a} vs {b}");
            }
            if one != start.clone().try_into_vec::<f32>().unwrap() {
                changed += 1;
            }
        }
        // The head trains in every phase; phase 2 also moves backbone tensors.
        let expected = if phase.name == PhaseName::Head { 2 } else { 10 };
        assert!(changed >= expected, "only {changed} tensors trained");
    }

    fn phase(name: PhaseName) -> Phase {
        let (trainable, optimizer) = match name {
            PhaseName::Head => (Trainable::Head, OptimizerConfig::adam(1e-3)),
            _ => (
                Trainable::FromKerasLayer(100),
                OptimizerConfig::rmsprop(1e-4),
            ),
        };
        Phase {
            name,
            epochs: 1,
            optimizer,
            trainable,
            batch_norm: BatchNormMode::Frozen,
            early_stopping: None,
        }
    }

    #[test]
    fn three_replicas_train_as_one_device_on_the_whole_batch() {
        compare(phase(PhaseName::Head), false);
        compare(phase(PhaseName::FineTune), false);
    }

    #[test]
    fn three_replicas_train_as_one_device_with_burn_modules_as_on_a_gpu() {
        compare(phase(PhaseName::Head), true);
        compare(phase(PhaseName::FineTune), true);
    }

    /// Every parameter's gradient, by name.
    fn named_gradients(model: &Classifier, gradients: &GradientsParams) -> Vec<(String, Vec<f32>)> {
        struct Named<'a> {
            gradients: &'a GradientsParams,
            names: HashMap<ParamId, String>,
            found: Vec<(String, Vec<f32>)>,
        }
        impl ModuleVisitor for Named<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(gradient) = self.gradients.get::<D>(param.id) {
                    let values = gradient.into_data().try_into_vec::<f32>().unwrap();
                    self.found.push((self.names[&param.id].clone(), values));
                }
            }
        }
        let mut named = Named {
            gradients,
            names: parameter_names(model),
            found: Vec::new(),
        };
        model.visit(&mut named);
        named.found
    }

    /// One from-scratch step (BatchNorm on batch statistics) on one device and on three
    /// replicas (shards of 3, 3 and 2 images): the same gradients, logits and running
    /// statistics, because the replicas normalise with the whole batch's statistics.
    #[test]
    fn three_replicas_normalise_with_the_whole_batch_statistics_as_one_device() {
        let entry = find("mobilenet_v3_small_050").unwrap();
        let device = Device::flex();
        let mut phase = phase(PhaseName::FromScratch);
        phase.trainable = Trainable::Everything;
        phase.batch_norm = BatchNormMode::Training;
        let autodiff = device.clone().autodiff();
        let start = named_tensors(&Classifier::seeded(entry, 2, 0.2, 5, &autodiff));
        let run = |replicas: usize| {
            // A fresh copy each time: clones share their running statistics.
            let model = Classifier::new(entry, 2, 0.2, &autodiff);
            let model = apply_named_tensors(model, start.clone(), Path::new("<start>")).unwrap();
            let model = prepare(model, entry, &phase).unwrap();
            let devices = vec![device.clone(); replicas];
            let replicas =
                Replicas::for_phase(&model, entry, &phase, &devices, Precision::F32).unwrap();
            let (gradients, logits) = replicas.gradients(&model, batch(0, 8), settings(entry, 0));
            let statistics: Vec<_> = named_tensors(&model)
                .into_iter()
                .filter(|(name, _)| is_running_statistic(name))
                .collect();
            (
                replicas.len(),
                named_gradients(&model, &gradients),
                logits.read(),
                statistics,
            )
        };
        let (one_device, one_gradients, one_logits, one_statistics) = run(1);
        let (three_devices, three_gradients, three_logits, three_statistics) = run(3);
        assert_eq!((one_device, three_devices), (1, 3));

        // Differences relative to the largest value of each tensor. BatchNorm over a few rows
        // (layers at 1x1 spatial size see 8 values per channel) amplifies rounding, and
        // burn-flex's parallel reductions add in an order that depends on the threads' load.
        let largest = |values: &[f32]| values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = |one: &[f32], three: &[f32], scale: f32| {
            assert_eq!(one.len(), three.len());
            let scale = scale.max(f32::MIN_POSITIVE);
            one.iter()
                .zip(three)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale))
        };
        let logits = worst(&one_logits, &three_logits, largest(&one_logits));
        assert!(logits < 1e-4, "logits differ by {logits} of the largest");

        assert_eq!(one_gradients.len(), three_gradients.len());
        assert!(one_gradients.len() > 100, "every tensor trains");
        let overall = one_gradients
            .iter()
            .fold(0f32, |m, (_, g)| m.max(largest(g)));
        for ((name, one), (other, three)) in one_gradients.iter().zip(&three_gradients) {
            assert_eq!(name, other);
            // Some gradients are zero in theory (a BatchNorm's shift feeding another
            // BatchNorm); theirs are rounding noise, judged against the model's gradients.
            let difference = worst(one, three, largest(one).max(1e-3 * overall));
            assert!(
                difference < 1e-3,
                "gradient of {name}: {difference} of its largest"
            );
        }
        assert!(one_statistics.len() > 50);
        let values = |statistics: &[(String, TensorData)]| -> HashMap<String, Vec<f32>> {
            statistics
                .iter()
                .map(|(name, data)| (name.clone(), data.clone().try_into_vec().unwrap()))
                .collect()
        };
        let (one, three) = (values(&one_statistics), values(&three_statistics));
        let mut moved = 0;
        for (name, one_values) in &one {
            let three_values = &three[name];
            // A running mean is judged against its layer's largest running standard deviation.
            let scale = match name.strip_suffix("mean") {
                Some(layer) => largest(&one[&format!("{layer}var")]).sqrt(),
                None => largest(one_values),
            };
            let difference = worst(one_values, three_values, scale);
            assert!(difference < 1e-4, "{name}: {difference}");
            moved += usize::from(one_values.iter().any(|v| *v != 0.0 && *v != 1.0));
        }
        assert_eq!(
            moved,
            one_statistics.len(),
            "every statistic took the batch's"
        );
    }

    #[test]
    fn shards_cover_the_batch_in_order_and_differ_by_at_most_one() {
        assert_eq!(shards(8, 3), vec![0..3, 3..6, 6..8]);
        assert_eq!(shards(32, 4), vec![0..8, 8..16, 16..24, 24..32]);
        assert_eq!(shards(2, 4), vec![0..1, 1..2]);
        assert_eq!(shards(5, 1), vec![0..5]);
        assert!(shards(0, 2).is_empty());
    }
}
