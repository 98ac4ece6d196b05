//! The error type of the training crate.

use std::path::{Path, PathBuf};

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration is out of range; nothing was run.
    #[error("invalid config: {0}")]
    Config(String),
    /// The objective reads a teacher and the distiller was given none; nothing was run.
    #[error("{objective} needs a teacher: call Distiller::with_teacher")]
    MissingTeacher {
        /// What needs it (the objective, by name).
        objective: String,
    },
    /// The teacher cannot give what the objective or the training mode needs; nothing was run,
    /// or (top-k outputs, found at the first step) the run stops there.
    #[error("{needs}, and this teacher {has}")]
    UnsuitableTeacher {
        /// What is needed, and by whom.
        needs: &'static str,
        /// What the teacher gives instead.
        has: &'static str,
    },
    /// The device cannot train: it records no gradients; nothing was run.
    #[error("train on an autodiff device (device.autodiff()) with the student built on it")]
    NotAutodiff,
    /// The training set has no examples; nothing was run.
    #[error("the training set is empty")]
    EmptyTrainingSet,
    /// A new run was asked for in a directory that holds one; nothing was written.
    #[error("{} already holds a run; resume it (Distiller::resume) or choose another directory", dir.display())]
    RunExists {
        /// The run directory.
        dir: PathBuf,
    },
    /// A resumed run had already run all its epochs.
    #[error("the run in {} had already ended: no epoch was left to run", dir.display())]
    AlreadyEnded {
        /// The run directory.
        dir: PathBuf,
    },
    /// A batch is too short for what the config asks of it (on-policy prompts).
    #[error("on_policy.prompt_tokens = {prompt_tokens} leaves nothing to generate in sequences of {length} tokens")]
    ShortSequences {
        /// The configured prompt length.
        prompt_tokens: usize,
        /// The batch's sequence length.
        length: usize,
    },
    /// A loss refused its inputs (shapes, vocabularies, NaN inputs).
    #[error("loss: {0}")]
    Loss(#[from] burn_distill_loss::LossError),
    /// The teacher or student failed (unknown tap, stale cache, ...).
    #[error("model: {0}")]
    Model(#[from] burn_distill_model::ModelError),
    /// Reading data failed.
    #[error("data: {0}")]
    Data(#[from] burn_distill_data::DataError),
    /// The loss became NaN or infinite. The run stops; the last good checkpoint is kept.
    #[error(
        "non-finite loss {value} at epoch {epoch}, step {step} (global step {global_step}); last good checkpoint: {}",
        checkpoint.as_ref().map_or("none".to_string(), |path| path.display().to_string())
    )]
    NonFiniteLoss {
        /// The loss value.
        value: f64,
        /// Epoch (1-based).
        epoch: usize,
        /// Micro-batch within the epoch (0-based).
        step: usize,
        /// Optimizer steps taken before it.
        global_step: usize,
        /// The checkpoint to resume from, if one was written.
        checkpoint: Option<PathBuf>,
    },
    /// A dataset failed to give an example while the run was going (the run stops; the last
    /// checkpoint is kept).
    #[error("{set}: reading example {index}: {source}")]
    Dataset {
        /// Which set: "training data" or "evaluation data".
        set: &'static str,
        /// The example's position in the set.
        index: usize,
        /// The dataset's own error.
        #[source]
        source: burn::data::dataset::DatasetError,
    },
    /// A run directory file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A run directory file could not be encoded or decoded (JSON, burn records).
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A run cannot be resumed as asked.
    #[error("cannot resume {dir}: {reason}")]
    Resume {
        /// The run directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
}

impl TrainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn file(path: &Path, reason: impl ToString) -> Self {
        Self::File {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// The result type of this crate.
pub type Result<T> = core::result::Result<T, TrainError>;
