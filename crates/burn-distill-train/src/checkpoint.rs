//! The [`Checkpointer`]: a run directory's epoch checkpoints, the best one, pruning and resume.

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleDisplay};
use burn::optim::ModuleOptimizer;
use burn::optim::lr_scheduler::LrSchedulerRecord;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn_distill_model::{Fingerprint, load_weights, save_weights};

use crate::config::DistillConfig;
use crate::distiller::Trainee;
use crate::error::{Result, TrainError};
use crate::run::{CheckpointState, EpochRecord, RunDir, read_json, write_json};

/// What a run trains, steps and schedules: the part of a run a checkpoint holds.
pub(crate) struct Session<M> {
    pub trainee: Trainee<M>,
    pub optimizer: ModuleOptimizer,
    pub scheduler: ModuleLrScheduler,
    pub state: CheckpointState,
    /// Every epoch's record so far (read back on resume).
    pub records: Vec<EpochRecord>,
}

/// Owns `checkpoints/` of a run directory: `epoch-NNNN/` (weights `model.bpk`, `optimizer.bpk`,
/// `scheduler.bpk`, `state.json`), written under a temporary name and renamed; the last `keep`
/// of them, plus `best/`.
pub(crate) struct Checkpointer<'r> {
    dir: &'r RunDir,
    keep: usize,
}

impl<'r> Checkpointer<'r> {
    pub fn new(dir: &'r RunDir, keep: usize) -> Self {
        Self { dir, keep }
    }

    /// Makes the run directory and writes `config.json`; refuses a directory that holds a run.
    pub fn create(&self, config: &DistillConfig) -> Result<()> {
        if self.dir.metrics().exists() || self.dir.checkpoints().exists() {
            return Err(TrainError::RunExists {
                dir: self.dir.root.clone(),
            });
        }
        fs::create_dir_all(self.dir.checkpoints()).map_err(|error| TrainError::io(&self.dir.root, error))?;
        write_json(&self.dir.config(), config)
    }

    /// Continues `session` from the newest checkpoint (or, with none, from the start with the
    /// records already written), after checking the checkpoint was trained on the same data and
    /// teacher.
    pub fn resume<M: Module + ModuleDisplay>(&self, mut session: Session<M>) -> Result<Session<M>> {
        let Some((epoch, path)) = self.dir.epoch_checkpoints().pop() else {
            session.records = self.dir.metrics_up_to(0)?;
            return Ok(session);
        };
        let saved: CheckpointState = read_json(&path.join("state.json"))?;
        self.check_same_sources(&saved, session.state.train_data, session.state.teacher)?;
        session.trainee = load_weights(session.trainee, path.join("model.bpk"))?;
        let optimizer_path = path.join("optimizer.bpk");
        session.optimizer = session
            .optimizer
            .load(&optimizer_path)
            .map_err(|error| TrainError::file(&optimizer_path, format!("{error:?}")))?;
        let scheduler_path = path.join("scheduler.bpk");
        let record = LrSchedulerRecord::load(&scheduler_path)
            .map_err(|error| TrainError::file(&scheduler_path, format!("{error:?}")))?;
        session.scheduler = session.scheduler.load_record(record);
        session.records = self.dir.metrics_up_to(epoch)?;
        session.state = saved;
        Ok(session)
    }

    fn check_same_sources(
        &self,
        saved: &CheckpointState,
        train: Fingerprint,
        teacher: Option<Fingerprint>,
    ) -> Result<()> {
        let refuse = |reason: String| TrainError::Resume {
            dir: self.dir.root.clone(),
            reason,
        };
        if saved.train_data != train {
            return Err(refuse(format!(
                "it was trained on data {}, this training set is {train}",
                saved.train_data
            )));
        }
        if saved.teacher != teacher {
            return Err(refuse(format!(
                "it was trained with teacher {:?}, this teacher is {teacher:?}",
                saved.teacher.map(|f| f.to_string())
            )));
        }
        Ok(())
    }

    /// Writes the epoch's checkpoint, copies it to `best/` when `best`, and prunes the oldest.
    pub fn save<M: Module + ModuleDisplay>(&self, session: &Session<M>, best: bool) -> Result<()> {
        let checkpoint = self.write(session)?;
        if best {
            copy_dir(&checkpoint, &self.dir.best())?;
        }
        self.prune()
    }

    fn write<M: Module + ModuleDisplay>(&self, session: &Session<M>) -> Result<PathBuf> {
        let epoch = session.state.epoch;
        let target = self.dir.checkpoint(epoch);
        let partial = self.dir.checkpoints().join(format!(".epoch-{epoch:04}.partial"));
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir_all(&partial).map_err(|error| TrainError::io(&partial, error))?;
        save_weights(&session.trainee, partial.join("model.bpk"))?;
        let optimizer_path = partial.join("optimizer.bpk");
        session
            .optimizer
            .save(&optimizer_path)
            .map_err(|error| TrainError::file(&optimizer_path, format!("{error:?}")))?;
        let scheduler_path = partial.join("scheduler.bpk");
        session
            .scheduler
            .to_record()
            .save(&scheduler_path)
            .map_err(|error| TrainError::file(&scheduler_path, format!("{error:?}")))?;
        write_json(&partial.join("state.json"), &session.state)?;
        if target.exists() {
            fs::remove_dir_all(&target).map_err(|error| TrainError::io(&target, error))?;
        }
        fs::rename(&partial, &target).map_err(|error| TrainError::io(&target, error))?;
        Ok(target)
    }

    fn prune(&self) -> Result<()> {
        let checkpoints = self.dir.epoch_checkpoints();
        let excess = checkpoints.len().saturating_sub(self.keep);
        for (_, path) in checkpoints.into_iter().take(excess) {
            fs::remove_dir_all(&path).map_err(|error| TrainError::io(&path, error))?;
        }
        Ok(())
    }
}

/// Copies a checkpoint directory to `target` (replacing it) through a temporary directory.
fn copy_dir(source: &Path, target: &Path) -> Result<()> {
    let partial = target.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).map_err(|error| TrainError::io(&partial, error))?;
    for entry in fs::read_dir(source).map_err(|error| TrainError::io(source, error))? {
        let entry = entry.map_err(|error| TrainError::io(source, error))?;
        fs::copy(entry.path(), partial.join(entry.file_name()))
            .map_err(|error| TrainError::io(&entry.path(), error))?;
    }
    if target.exists() {
        fs::remove_dir_all(target).map_err(|error| TrainError::io(target, error))?;
    }
    fs::rename(&partial, target).map_err(|error| TrainError::io(target, error))
}
