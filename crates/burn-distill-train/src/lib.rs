//! The distillation training loop for [burn](https://burn.dev).
//!
//! # Overview
//!
//! A [`Distiller`] trains a [`Student`](burn_distill_model::Student) against a
//! [`Teacher`](burn_distill_model::Teacher) (a live model, an ensemble or a cache of outputs),
//! or without one, with an objective from `burn-distill-loss` ([`ObjectiveConfig`]) plus feature
//! terms on named taps ([`FeatureTermConfig`]). The optimizers (SGD with momentum, Adam, AdamW,
//! weight decay, gradient clipping) and learning-rate schedules are burn's own
//! ([`OptimizerConfig`], `burn::optim::lr_scheduler::LrSchedulerConfig`); gradient
//! accumulation gives the gradient of the big batch (every term is normalised by the step's
//! global count of positions).
//!
//! A run is described by one [`DistillConfig`] and leaves a directory with `config.json`,
//! `metrics.jsonl` ([`EpochRecord`]s: loss, throughput, teacher/student time, and per
//! evaluation set the loss, accuracy, errors, teacher agreement, KL to the teacher, expected
//! calibration error and, for language models, perplexity), atomic per-epoch checkpoints and
//! `summary.json`. [`Distiller::resume`] continues a stopped run; on a CPU device it ends
//! exactly as an uninterrupted one. A NaN or infinite loss stops the run with an error naming
//! the step. [`evaluate`] measures any model on any dataset.
//!
//! # Language models
//!
//! Rank-3 logits `[batch, seq, vocab]` go through the same loop. Targets equal to
//! [`IGNORE_INDEX`] (padding from `SequenceBatcher`, prompt tokens) are left out of every loss
//! term, metric and normaliser: losses are means over the step's valid tokens, for every
//! divergence. [`ObjectiveConfig::Sparse`] trains from a top-k teacher-output cache;
//! [`Distiller::fit_on_policy`] with an [`OnPolicyConfig`] runs GKD (the student writes a share
//! `λ` of the sequences it is scored on, [`roll_out`]); sequence-level distillation is
//! [`ObjectiveConfig::Supervised`] on a `TranscriptDataset` (or any divergence to a
//! `TranscriptTeacher`). A teacher with a larger vocabulary is handled by the loss's
//! `VocabPolicy`.
//!
//! # Two drivers, one loss
//!
//! The same loss (objective, feature terms, normalisation) runs under two drivers:
//!
//! - **burn-train's Learner**, through [`DistillModel`] (`TrainStep` + `InferenceStep`): for
//!   burn users who want what the Learner has: its metrics and TUI dashboard, its
//!   checkpointer, early stopping, gradient accumulation, and scale-out (`MultiDevice` over
//!   several local devices; DDP with collective all-reduce on CUDA).
//! - **Our [`Distiller`]**: for what the Learner does not do: on-policy rollouts
//!   ([`Distiller::fit_on_policy`]), bit-exact resume on CPU devices, data order fixed by
//!   `(seed, epoch)`, teacher-output caches checked against the dataset's fingerprint, the
//!   evaluation metrics of [`EvalMetrics`] (teacher agreement, KL, calibration) and a run
//!   directory the examples' reports read.
//!
//! A teacher on another device, or in another process or machine behind a burn-remote server,
//! is a [`TeacherOn`](burn_distill_model::TeacherOn) under either driver.
//!
//! # Supported Rust versions
//!
//! Rust 1.95 or newer.
#![warn(missing_docs)]

mod checkpoint;
mod chrf;
mod config;
mod constraint;
mod denormals;
mod distiller;
mod error;
mod features;
mod learner;
mod metrics;
mod objective;
mod on_policy;
mod run;
mod step;
mod stopping;

pub use chrf::{ChrfStats, chrf, corpus_chrf};
pub use config::{
    DistillConfig, EarlyStoppingConfig, FeatureKind, FeatureTermConfig, IGNORE_INDEX, LossScaleConfig, Metric,
    ObjectiveConfig, OnPolicyConfig, OptimizerConfig, Precision,
};
pub use constraint::{MaxNormConfig, apply_max_norm};
pub use denormals::FlushDenormals;
pub use distiller::{Distiller, EvalSet, FitData, RunOutcome, Trainee};
pub use error::{Result, TrainError};
pub use learner::{DistillMetric, DistillModel, DistillModelBuilder, DistillOutput, SharedObjective, SharedTeacher};
pub use metrics::{ECE_BINS, EvalMetrics, evaluate};
pub use objective::{BuiltinObjective, Objective, ObjectiveInput, ObjectiveLoss, TeacherLogits};
pub use on_policy::roll_out;
pub use run::{EpochRecord, RunStatus, RunSummary, TrainStats, read_metrics};
