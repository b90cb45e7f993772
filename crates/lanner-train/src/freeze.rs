//! What trains in a phase: gradients on for the head and the backbone parameters the phase
//! unfreezes (by Keras layer index), off for the rest, and BatchNorm's mode.

use std::collections::HashSet;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot};
use burn::tensor::Tensor;
use lanner_models::ModelEntry;
use lanner_models::batch_norm::is_running_statistic;
use lanner_models::keras_layers::KerasLayerError;

use crate::classifier::Classifier;
use crate::recipe::{BatchNormMode, Phase, Trainable};

/// `model` set up for `phase`: only its trainable parameters require gradients, and the
/// backbone's BatchNorm layers follow the phase's mode.
pub fn prepare(
    model: Classifier,
    entry: &ModelEntry,
    phase: &Phase,
) -> Result<Classifier, KerasLayerError> {
    let trainable = trainable_ids(&model, entry, phase.trainable)?;
    let Classifier { backbone, head } = model.map(&mut RequireGrad(trainable));
    Ok(Classifier {
        backbone: backbone.with_frozen_batch_norm(phase.batch_norm == BatchNormMode::Frozen),
        head,
    })
}

/// How many of the backbone's first units (see [`lanner_models::Backbone::unit_count`]) hold no
/// parameter that trains under `trainable`: the prefix that can run without autodiff.
pub fn frozen_units(
    model: &Classifier,
    entry: &ModelEntry,
    trainable: Trainable,
) -> Result<usize, KerasLayerError> {
    let backbone = &model.backbone;
    let all = backbone.unit_count();
    Ok(match trainable {
        Trainable::Head => all,
        Trainable::Everything => 0,
        Trainable::FromKerasLayer(layer) => {
            let split = entry.keras_layer_map().split(backbone, layer)?;
            split
                .trainable
                .iter()
                .map(|(name, _)| backbone.unit_of(name).unwrap_or(0))
                .min()
                .unwrap_or(all)
        }
    })
}

/// The parameters that train under `trainable`.
fn trainable_ids(
    model: &Classifier,
    entry: &ModelEntry,
    trainable: Trainable,
) -> Result<HashSet<ParamId>, KerasLayerError> {
    let head = parameter_ids(&model.head);
    let backbone = parameter_ids(&model.backbone);
    let mut ids: HashSet<ParamId> = head.into_iter().map(|(_, id)| id).collect();
    match trainable {
        Trainable::Head => {}
        Trainable::Everything => ids.extend(backbone.into_iter().map(|(_, id)| id)),
        Trainable::FromKerasLayer(layer) => {
            let split = entry.keras_layer_map().split(&model.backbone, layer)?;
            let names: HashSet<&str> = split.trainable.iter().map(|(n, _)| n.as_str()).collect();
            ids.extend(
                backbone
                    .into_iter()
                    .filter(|(name, _)| names.contains(name.as_str()))
                    .map(|(_, id)| id),
            );
        }
    }
    Ok(ids)
}

/// Every parameter of `module` by PyTorch name (timm's, for a backbone), with its id.
fn parameter_ids<M: Module>(module: &M) -> Vec<(String, ParamId)> {
    module
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .filter_map(|t| Some((t.name, ParamId::from(t.param_id?))))
        .collect()
}

struct RequireGrad(HashSet<ParamId>);

impl ModuleMapper for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let train = self.0.contains(&param.id);
        param.set_require_grad(train)
    }
}

/// Elements of the parameters of `module` that require gradients, and of all of them
/// (BatchNorm running statistics, which never train, are left out as timm leaves them out).
pub fn parameter_counts<M: Module>(module: &M) -> (usize, usize) {
    let mut counter = Counter::default();
    module.visit(&mut counter);
    let running_statistics: usize = module
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .iter()
        .filter(|t| is_running_statistic(&t.name))
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    (counter.trainable, counter.total - running_statistics)
}

#[derive(Default)]
struct Counter {
    trainable: usize,
    total: usize,
}

impl ModuleVisitor for Counter {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let count = value.shape().num_elements();
        self.total += count;
        if value.is_require_grad() {
            self.trainable += count;
        }
    }
}
