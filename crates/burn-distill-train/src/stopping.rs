//! Which epoch is the best, and when to stop: the early-stopping strategy.

use crate::config::{DistillConfig, Metric};
use crate::run::{CheckpointState, EpochRecord};

/// Watches one metric of the first evaluation set: an epoch is the best when it improves on the
/// best so far by more than `min_delta`; the run stops after `patience` epochs without one.
/// Without an [`EarlyStoppingConfig`](crate::EarlyStoppingConfig) it watches the validation loss
/// (for `checkpoints/best/`) and never stops. Its state lives in the checkpoint, so a resumed run
/// stops where an uninterrupted one would.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EarlyStopping {
    metric: Metric,
    min_delta: f64,
    patience: Option<usize>,
}

impl EarlyStopping {
    pub fn new(config: &DistillConfig) -> Self {
        match &config.early_stopping {
            Some(early) => Self {
                metric: early.metric,
                min_delta: early.min_delta,
                patience: Some(early.patience),
            },
            None => Self {
                metric: Metric::Loss,
                min_delta: 0.0,
                patience: None,
            },
        }
    }

    /// Takes in an epoch's record; says whether it is the best so far.
    pub fn observe(&self, state: &mut CheckpointState, record: &EpochRecord) -> bool {
        let Some((_, metrics)) = record.eval.first() else {
            // Without an evaluation set the latest epoch counts as the best.
            state.best_epoch = record.epoch;
            return true;
        };
        let (value, higher_is_better) = match self.metric {
            Metric::Loss => (metrics.loss, false),
            Metric::Accuracy => (metrics.accuracy, true),
            Metric::TeacherKl => (metrics.teacher_kl.unwrap_or(f64::INFINITY), false),
        };
        let improved = match state.best_value {
            None => true,
            Some(best) if higher_is_better => value > best + self.min_delta,
            Some(best) => value < best - self.min_delta,
        };
        if improved {
            state.best_value = Some(value);
            state.best_epoch = record.epoch;
            state.epochs_without_improvement = 0;
        } else {
            state.epochs_without_improvement += 1;
        }
        improved
    }

    /// Whether the run should end now.
    pub fn should_stop(&self, state: &CheckpointState) -> bool {
        self.patience
            .is_some_and(|patience| state.epochs_without_improvement >= patience)
    }
}
