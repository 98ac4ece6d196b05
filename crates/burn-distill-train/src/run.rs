//! The run directory: `config.json`, `metrics.jsonl`, `checkpoints/`, `summary.json`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn_distill_model::Fingerprint;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::metrics::EvalMetrics;

/// Training figures of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainStats {
    /// Mean objective per position.
    pub loss: f64,
    /// Mean cross-entropy term, when the objective has one.
    pub hard_loss: Option<f64>,
    /// Mean teacher term, when the objective has one.
    pub soft_loss: Option<f64>,
    /// Mean feature term, when there are feature terms.
    pub feature_loss: Option<f64>,
    /// Examples seen.
    pub examples: usize,
    /// Positions (tokens for sequences) seen.
    pub positions: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Learning rate at the last step.
    pub learning_rate: f64,
    /// Wall time of the training part of the epoch.
    pub seconds: f64,
    /// Of which in the teacher (forward, or cache reads).
    pub teacher_seconds: f64,
    /// Of which in the student (forward, backward, optimizer).
    pub student_seconds: f64,
    /// Of which making batches.
    pub data_seconds: f64,
    /// `examples / seconds`.
    pub examples_per_second: f64,
    /// `positions / seconds`.
    pub positions_per_second: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// The epoch, from 1.
    pub epoch: usize,
    /// Training figures.
    pub train: TrainStats,
    /// Evaluation sets by name, in the order given (the first drives early stopping).
    pub eval: Vec<(String, EvalMetrics)>,
    /// Wall time of evaluation.
    pub eval_seconds: f64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// All epochs ran.
    Completed,
    /// Early stopping ended it.
    EarlyStopped,
    /// Stopped on request before the last epoch; resumable.
    Stopped,
}

/// `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// How it ended.
    pub status: RunStatus,
    /// Epochs run (including those before a resume).
    pub epochs: usize,
    /// The epoch with the best watched metric (the last one without early stopping).
    pub best_epoch: usize,
    /// The last epoch's record.
    pub last: EpochRecord,
    /// Training seconds over all epochs.
    pub train_seconds: f64,
    /// Of which in the teacher.
    pub teacher_seconds: f64,
    /// Of which in the student.
    pub student_seconds: f64,
    /// Evaluation seconds over all epochs.
    pub eval_seconds: f64,
    /// Parameters of the student.
    pub student_parameters: usize,
    /// Fingerprint of the training set.
    pub train_data: Fingerprint,
    /// Fingerprint of the teacher, if any.
    pub teacher: Option<Fingerprint>,
}

/// What a checkpoint says beside the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CheckpointState {
    pub epoch: usize,
    pub global_step: usize,
    pub best_epoch: usize,
    pub best_value: Option<f64>,
    pub epochs_without_improvement: usize,
    pub train_data: Fingerprint,
    pub teacher: Option<Fingerprint>,
    /// f16 mixed precision: the loss scale, and the steps since it last changed.
    #[serde(default)]
    pub loss_scale: Option<LossScale>,
}

/// The dynamic loss scale's state (see [`LossScaleConfig`](crate::LossScaleConfig)).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct LossScale {
    pub scale: f64,
    pub good_steps: usize,
    /// Steps skipped so far because their gradients overflowed.
    pub skipped: usize,
}

/// Every epoch record in a run directory's `metrics.jsonl` (none when it has no such file; a
/// torn last line from a killed run is skipped). Reading writes nothing, and every number comes
/// back bit for bit as it was written.
///
/// # Errors
/// When the file cannot be read, or a line other than the last is not an [`EpochRecord`].
pub fn read_metrics(run_dir: &Path) -> Result<Vec<EpochRecord>> {
    RunDir {
        root: run_dir.to_path_buf(),
    }
    .read_metrics()
}

/// Paths inside a run directory.
#[derive(Debug, Clone)]
pub(crate) struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn config(&self) -> PathBuf {
        self.root.join("config.json")
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub fn summary(&self) -> PathBuf {
        self.root.join("summary.json")
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn checkpoint(&self, epoch: usize) -> PathBuf {
        self.checkpoints().join(format!("epoch-{epoch:04}"))
    }

    pub fn best(&self) -> PathBuf {
        self.checkpoints().join("best")
    }

    /// Complete epoch checkpoints, oldest first.
    pub fn epoch_checkpoints(&self) -> Vec<(usize, PathBuf)> {
        let mut found: Vec<(usize, PathBuf)> = fs::read_dir(self.checkpoints())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let epoch = name.strip_prefix("epoch-")?.parse().ok()?;
                entry.path().join("state.json").is_file().then(|| (epoch, entry.path()))
            })
            .collect();
        found.sort();
        found
    }

    /// Appends one line to `metrics.jsonl`.
    pub fn append_metrics(&self, record: &EpochRecord) -> Result<()> {
        let path = self.metrics();
        let line = serde_json::to_string(record).map_err(|error| TrainError::file(&path, error))?;
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|error| TrainError::io(&path, error))?;
        writeln!(file, "{line}")
            .and_then(|()| file.sync_data())
            .map_err(|error| TrainError::io(&path, error))
    }

    /// The records of `metrics.jsonl`, without changing the file.
    pub fn read_metrics(&self) -> Result<Vec<EpochRecord>> {
        let path = self.metrics();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(TrainError::io(&path, error)),
        };
        let mut records = Vec::new();
        let line_count = text.lines().count();
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(line) {
                Ok(record) => records.push(record),
                // A torn last line from a killed run.
                Err(_) if number + 1 == line_count => break,
                Err(error) => return Err(TrainError::file(&path, format!("line {}: {error}", number + 1))),
            }
        }
        Ok(records)
    }

    /// The records of `metrics.jsonl` up to `epoch`; the file is rewritten (atomically) without
    /// later ones (and without a torn last line), which a resumed run writes again.
    pub fn metrics_up_to(&self, epoch: usize) -> Result<Vec<EpochRecord>> {
        let path = self.metrics();
        let mut records = self.read_metrics()?;
        records.retain(|record| record.epoch <= epoch);
        let mut kept = String::new();
        for record in &records {
            kept.push_str(&serde_json::to_string(record).map_err(|error| TrainError::file(&path, error))?);
            kept.push('\n');
        }
        write_atomic(&path, kept.as_bytes())?;
        Ok(records)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    burn_distill_model::files::write_atomically(path, |file| file.write_all(bytes))
        .map_err(|error| TrainError::io(path, error))
}

/// Writes `value` as pretty JSON, atomically.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|error| TrainError::file(path, error))?;
    write_atomic(path, text.as_bytes())
}

/// Reads JSON.
pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|error| TrainError::io(path, error))?;
    serde_json::from_str(&text).map_err(|error| TrainError::file(path, error))
}
