//! The training recipe as a value: named phases, each with its epochs, optimizer, what
//! trains, how BatchNorm behaves and whether early stopping watches it.
//!
//! [`Recipe::seed`] is the seed's transfer learning (fastai's `fine_tune`): the head alone
//! with Adam, then the backbone from a Keras layer on with RMSprop under early stopping.
//! [`Recipe::from_scratch`] trains everything from the first epoch, for backbones without
//! pretrained weights.

use serde::{Deserialize, Serialize};

use crate::early_stopping::EarlyStopping;
use crate::hyperparameters::Hyperparameters;
use crate::optimizer::OptimizerConfig;

/// Which phase of a recipe an epoch belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseName {
    /// Phase 1: the backbone frozen, the head trains.
    Head,
    /// Phase 2: the backbone trains from `fine-tune-layer` on.
    FineTune,
    /// `--from-scratch`: everything trains, BatchNorm updates its statistics.
    FromScratch,
}

impl PhaseName {
    /// The name used in logs and `metrics.jsonl`.
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Head => "head",
            PhaseName::FineTune => "fine_tune",
            PhaseName::FromScratch => "from_scratch",
        }
    }
}

/// What a phase trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trainable {
    /// The head only; the backbone is frozen.
    Head,
    /// The head and the backbone's parameters in Keras layers at or after this index.
    FromKerasLayer(usize),
    /// Every parameter.
    Everything,
}

/// How the backbone's BatchNorm layers normalise while a phase trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchNormMode {
    /// Running statistics, never updated: the seed's `backbone(x, training=False)`.
    Frozen,
    /// Batch statistics, updating the running ones (ordinary training).
    Training,
}

/// One phase of a recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    /// Which phase this is.
    pub name: PhaseName,
    /// The most epochs it runs.
    pub epochs: usize,
    /// Its optimizer, created fresh when the phase starts (the seed recompiles).
    pub optimizer: OptimizerConfig,
    /// What trains.
    pub trainable: Trainable,
    /// BatchNorm behaviour in the backbone.
    pub batch_norm: BatchNormMode,
    /// Early stopping, when it watches this phase.
    pub early_stopping: Option<EarlyStopping>,
}

/// The phases of a training run, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Run one after the other; epoch numbers continue across them.
    pub phases: Vec<Phase>,
}

impl Recipe {
    /// The recipe `hyperparameters` ask for: [`Recipe::from_scratch`] when they say so,
    /// [`Recipe::seed`] otherwise.
    pub fn for_hyperparameters(hyperparameters: &Hyperparameters) -> Self {
        if hyperparameters.from_scratch {
            Self::from_scratch(hyperparameters)
        } else {
            Self::seed(hyperparameters)
        }
    }

    /// The seed's two phases. Phase 2 runs exactly `fine-tune-epochs` epochs, numbered on from
    /// phase 1 (the seed's `initial_epoch=history.epoch[-1]` repeats the last phase-1 number
    /// and so runs one more). A phase with 0 epochs is left out.
    pub fn seed(hyperparameters: &Hyperparameters) -> Self {
        let phases = vec![
            Phase {
                name: PhaseName::Head,
                epochs: hyperparameters.initial_epochs,
                optimizer: OptimizerConfig::adam(hyperparameters.learning_rate),
                trainable: Trainable::Head,
                batch_norm: BatchNormMode::Frozen,
                early_stopping: None,
            },
            Phase {
                name: PhaseName::FineTune,
                epochs: hyperparameters.fine_tune_epochs,
                optimizer: OptimizerConfig::rmsprop(hyperparameters.fine_tune_learning_rate),
                trainable: Trainable::FromKerasLayer(hyperparameters.fine_tune_layer),
                batch_norm: BatchNormMode::Frozen,
                early_stopping: Some(EarlyStopping::seed(hyperparameters.patience)),
            },
        ];
        Self {
            phases: phases.into_iter().filter(|p| p.epochs > 0).collect(),
        }
    }

    /// One phase: everything trains from the first epoch with Adam at `learning-rate`,
    /// BatchNorm in training mode, for `initial-epochs + fine-tune-epochs` epochs under the
    /// seed's early stopping.
    pub fn from_scratch(hyperparameters: &Hyperparameters) -> Self {
        Self {
            phases: vec![Phase {
                name: PhaseName::FromScratch,
                epochs: hyperparameters.initial_epochs + hyperparameters.fine_tune_epochs,
                optimizer: OptimizerConfig::adam(hyperparameters.learning_rate),
                trainable: Trainable::Everything,
                batch_norm: BatchNormMode::Training,
                early_stopping: Some(EarlyStopping::seed(hyperparameters.patience)),
            }],
        }
    }

    /// The most epochs the whole recipe runs.
    pub fn total_epochs(&self) -> usize {
        self.phases.iter().map(|p| p.epochs).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_recipe_is_head_then_fine_tune() {
        let hp = Hyperparameters::for_model(lanner_models::find("mobilenet_v3_large").unwrap());
        let recipe = Recipe::seed(&hp);
        let names: Vec<PhaseName> = recipe.phases.iter().map(|p| p.name).collect();
        assert_eq!(names, [PhaseName::Head, PhaseName::FineTune]);
        let [head, fine_tune] = &recipe.phases[..] else {
            unreachable!()
        };
        assert_eq!(head.epochs, 3);
        assert_eq!(head.optimizer, OptimizerConfig::adam(1e-4));
        assert_eq!(head.trainable, Trainable::Head);
        assert!(head.early_stopping.is_none());
        assert_eq!(fine_tune.epochs, 10);
        assert_eq!(fine_tune.optimizer, OptimizerConfig::rmsprop(1e-5));
        assert_eq!(fine_tune.trainable, Trainable::FromKerasLayer(100));
        assert_eq!(fine_tune.batch_norm, BatchNormMode::Frozen);
        assert_eq!(fine_tune.early_stopping, Some(EarlyStopping::seed(2)));
        assert_eq!(recipe.total_epochs(), 13);

        let head_only = Recipe::seed(&Hyperparameters {
            fine_tune_epochs: 0,
            ..hp.clone()
        });
        assert_eq!(head_only.phases.len(), 1);
        let scratch = Recipe::for_hyperparameters(&Hyperparameters {
            from_scratch: true,
            ..hp
        });
        assert_eq!(scratch.phases[0].trainable, Trainable::Everything);
        assert_eq!(scratch.phases[0].batch_norm, BatchNormMode::Training);
        assert_eq!(scratch.total_epochs(), 13);
    }
}
