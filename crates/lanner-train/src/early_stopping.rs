//! The seed's early stopping: an epoch is the best so far when its validation accuracy beats
//! every earlier one *and* does not trail the training accuracy by 0.005 or more (a guard
//! against keeping an overfitted epoch); after `patience` epochs without a new best, stop.
//! The trainer always restores the best epoch's weights at the end.

use serde::{Deserialize, Serialize};

/// When to stop a phase.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// Epochs without a new best before stopping.
    pub patience: usize,
    /// A best epoch needs `val_accuracy + generalization_margin > accuracy`.
    pub generalization_margin: f64,
}

/// What early stopping has seen so far (saved in checkpoints).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EarlyStoppingState {
    /// The best epoch (1-based) and its validation accuracy.
    pub best: Option<(usize, f64)>,
    /// Epochs since the best one.
    pub epochs_without_best: usize,
}

/// The outcome of one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A new best epoch: keep its weights.
    Best,
    /// Not a new best; go on.
    Continue,
    /// `patience` epochs without a best: stop the phase.
    Stop,
}

impl EarlyStopping {
    /// The seed's rule with `patience` (2 in the seed).
    pub fn seed(patience: usize) -> Self {
        Self {
            patience,
            generalization_margin: 0.005,
        }
    }

    /// Record epoch `epoch`'s accuracies in `state` and say what to do.
    pub fn observe(
        &self,
        state: &mut EarlyStoppingState,
        epoch: usize,
        accuracy: f64,
        val_accuracy: f64,
    ) -> Verdict {
        let beats_best = state.best.is_none_or(|(_, best)| val_accuracy > best);
        if beats_best && val_accuracy + self.generalization_margin > accuracy {
            state.best = Some((epoch, val_accuracy));
            state.epochs_without_best = 0;
            return Verdict::Best;
        }
        state.epochs_without_best += 1;
        if state.epochs_without_best >= self.patience {
            Verdict::Stop
        } else {
            Verdict::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience_epochs_without_a_best() {
        let rule = EarlyStopping::seed(2);
        let mut state = EarlyStoppingState::default();
        assert_eq!(rule.observe(&mut state, 4, 0.80, 0.82), Verdict::Best);
        // Higher, but trails training accuracy by more than 0.005: not a best.
        assert_eq!(rule.observe(&mut state, 5, 0.95, 0.90), Verdict::Continue);
        assert_eq!(rule.observe(&mut state, 6, 0.86, 0.88), Verdict::Best);
        assert_eq!(rule.observe(&mut state, 7, 0.86, 0.88), Verdict::Continue);
        assert_eq!(rule.observe(&mut state, 8, 0.86, 0.87), Verdict::Stop);
        assert_eq!(state.best, Some((6, 0.88)));
    }
}
