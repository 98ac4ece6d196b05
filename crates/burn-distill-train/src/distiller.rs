//! The training loop.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::{Module, ModuleDisplay};
use burn::optim::lr_scheduler::LrSchedulerRecord;
use burn::optim::lr_scheduler::module_lr_scheduler::{ModuleLrScheduler, ModuleLrSchedulerConfig};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use burn_distill_data::{Batch, EpochAware, EpochSampler, Fingerprinted, Indexed};
use burn_distill_model::{Connector, Fingerprint, Student, Teacher, TeacherInput, load_weights, save_weights};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{DistillConfig, Metric};
use crate::constraint::apply_max_norm;
use crate::error::{Result, TrainError};
use crate::metrics::{EvalMetrics, evaluate, flatten_indices, flatten_logits};
use crate::objective::{BuiltinObjective, Objective, ObjectiveInput, TeacherLogits, feature_loss, valid_positions};
use crate::run::{CheckpointState, EpochRecord, RunDir, RunStatus, RunSummary, TrainStats, read_json, write_json};

/// The student with the connectors of its feature terms: what the optimizer trains and a
/// checkpoint holds.
#[derive(Module, Debug)]
pub struct Trainee<M> {
    /// The student.
    pub student: M,
    /// One connector per feature term that has one, in config order.
    pub connectors: Vec<Connector>,
}

/// Replaces a training batch before its step (on-policy rollouts): called with the student at
/// the step's weights, the batch, the global step and the micro-batch's place in the step.
pub(crate) type Rollout<'r, M, B> = dyn Fn(&M, B, usize, usize) -> Result<B> + 'r;

/// A named evaluation set.
#[derive(Debug, Clone, Copy)]
pub struct EvalSet<'a, S> {
    /// Its name in `metrics.jsonl` (`"valid"`, `"test"`).
    pub name: &'a str,
    /// The examples.
    pub dataset: &'a S,
}

/// What [`Distiller::fit`] returns.
#[derive(Debug)]
pub struct RunOutcome<M> {
    /// The student after the last epoch.
    pub student: M,
    /// What was written to `summary.json`.
    pub summary: RunSummary,
    /// Every epoch's record (as in `metrics.jsonl`).
    pub records: Vec<EpochRecord>,
}

/// Trains a [`Student`] against an optional [`Teacher`] with a [`DistillConfig`], writing a run
/// directory:
///
/// - `config.json`: the config;
/// - `metrics.jsonl`: one [`EpochRecord`] per epoch (training loss and its parts, throughput,
///   time split into teacher / student / data; metrics of every evaluation set);
/// - `checkpoints/epoch-NNNN/`: weights (`model.bpk`), optimizer and scheduler state and
///   `state.json`, written under a temporary name and renamed; the last
///   `keep_checkpoints` are kept, plus `checkpoints/best/`;
/// - `summary.json`: a [`RunSummary`].
///
/// The same call trains a teacher or a baseline (no teacher, [`ObjectiveConfig::Supervised`](
/// crate::ObjectiveConfig::Supervised)) and a distilled student, so comparisons are fair.
/// Data order and augmentation depend only on `(seed, epoch)` and the device RNG is reseeded
/// every epoch, so on a CPU device a resumed run ends exactly as an uninterrupted one.
pub struct Distiller<'a, I, const D: usize> {
    config: DistillConfig,
    dir: RunDir,
    teacher: Option<&'a dyn Teacher<I, D>>,
    eval_teacher: Option<&'a dyn Teacher<I, D>>,
    objective: Option<&'a dyn Objective>,
    progress: bool,
    flush_denormals: bool,
    resume: bool,
    stop_after: Option<usize>,
}

impl<'a, I, const D: usize> Distiller<'a, I, D>
where
    I: TeacherInput + Clone,
{
    /// A new run in `run_dir` (created; it must not hold a run already).
    pub fn new(config: DistillConfig, run_dir: impl Into<PathBuf>) -> Self {
        Self {
            config,
            dir: RunDir { root: run_dir.into() },
            teacher: None,
            eval_teacher: None,
            objective: None,
            progress: false,
            flush_denormals: true,
            resume: false,
            stop_after: None,
        }
    }

    /// Continues the run in `run_dir` from its last checkpoint, with its saved config. Call
    /// [`Distiller::fit`] with the same data, teacher and a freshly built student.
    ///
    /// # Errors
    /// [`TrainError::Resume`] when the directory has no readable `config.json`.
    pub fn resume(run_dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = RunDir { root: run_dir.into() };
        let config: DistillConfig = read_json(&dir.config()).map_err(|error| TrainError::Resume {
            dir: dir.root.clone(),
            reason: error.to_string(),
        })?;
        Ok(Self {
            config,
            dir,
            teacher: None,
            eval_teacher: None,
            objective: None,
            progress: false,
            flush_denormals: true,
            resume: true,
            stop_after: None,
        })
    }

    /// Sets the teacher.
    pub fn with_teacher(mut self, teacher: &'a dyn Teacher<I, D>) -> Self {
        self.teacher = Some(teacher);
        self
    }

    /// The teacher that evaluation compares the student with (agreement, KL). By default the
    /// training teacher, unless it answers by dataset index only (a cache of outputs for the
    /// training set cannot speak for evaluation examples): then no teacher metrics are reported
    /// unless one is given here, e.g. the live model the cache was made from.
    pub fn with_eval_teacher(mut self, teacher: &'a dyn Teacher<I, D>) -> Self {
        self.eval_teacher = Some(teacher);
        self
    }

    /// Trains with `objective` instead of a built-in one; the config's objective must be
    /// [`ObjectiveConfig::Custom`](crate::ObjectiveConfig::Custom) with its name (so that
    /// `config.json` records it, and a resume is refused another objective).
    pub fn with_objective(mut self, objective: &'a dyn Objective) -> Self {
        self.objective = Some(objective);
        self
    }

    /// Shows a progress bar (loss, throughput) on standard error; off by default, for tests
    /// and CI.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// Whether the training thread and the rayon pool flush subnormal floats to zero while fitting (on by
    /// default; see [`FlushDenormals`](crate::FlushDenormals) for why and what it changes: the
    /// weights, in practice nothing; the speed of SGD with momentum on x86, up to several-fold).
    /// Not part of the config: a run trained with it and one without are the same run.
    pub fn with_flush_denormals(mut self, flush: bool) -> Self {
        self.flush_denormals = flush;
        self
    }

    /// Stops this session after epoch `epoch` (its checkpoint written) without ending the run:
    /// [`Distiller::resume`] continues it. For time-sliced training, and for testing resumes.
    pub fn with_stop_after(mut self, epoch: usize) -> Self {
        self.stop_after = Some(epoch);
        self
    }

    /// The teacher, if any.
    pub(crate) fn teacher(&self) -> Option<&'a dyn Teacher<I, D>> {
        self.teacher
    }

    /// The run's config.
    pub fn config(&self) -> &DistillConfig {
        &self.config
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.dir.root
    }

    /// Trains `student` (built on `device`, an autodiff device) on `train`, batched by
    /// `train_batcher`, evaluating every epoch on `evals` (batched by `eval_batcher`; the first
    /// set drives early stopping and the best checkpoint).
    ///
    /// # Errors
    /// [`TrainError::Config`] for a bad config, a missing teacher, a non-autodiff device or a
    /// run directory that already holds a run; [`TrainError::NonFiniteLoss`] when the loss
    /// becomes NaN or infinite (the last good checkpoint is kept); loss, model, data and file
    /// errors as they come.
    #[allow(clippy::too_many_arguments)]
    pub fn fit<M, S, V, It, Bt, B>(
        &self,
        student: M,
        train: &S,
        evals: &[EvalSet<'_, V>],
        train_batcher: &Bt,
        eval_batcher: &Bt,
        device: &Device,
    ) -> Result<RunOutcome<M>>
    where
        M: Module + ModuleDisplay + Student<I, D>,
        S: Dataset<It> + Fingerprinted,
        V: Dataset<It>,
        It: Indexed,
        Bt: Batcher<It, B> + EpochAware,
        B: Batch<Input = I>,
    {
        if self.config.on_policy.is_some() {
            return Err(TrainError::Config(
                "the config asks for on-policy distillation: call fit_on_policy (language models)".into(),
            ));
        }
        self.fit_inner(student, train, evals, train_batcher, eval_batcher, device, None)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fit_inner<M, S, V, It, Bt, B>(
        &self,
        student: M,
        train: &S,
        evals: &[EvalSet<'_, V>],
        train_batcher: &Bt,
        eval_batcher: &Bt,
        device: &Device,
        rollout: Option<&Rollout<'_, M, B>>,
    ) -> Result<RunOutcome<M>>
    where
        M: Module + ModuleDisplay + Student<I, D>,
        S: Dataset<It> + Fingerprinted,
        V: Dataset<It>,
        It: Indexed,
        Bt: Batcher<It, B> + EpochAware,
        B: Batch<Input = I>,
    {
        let config = &self.config;
        config.validate()?;
        let builtin;
        let objective: &dyn Objective = match (self.objective, &config.objective) {
            (Some(objective), _) => objective,
            (None, builtin_config) => {
                builtin = BuiltinObjective::new(builtin_config)?;
                &builtin
            }
        };
        config.check_objective(objective)?;
        if objective.needs_teacher() && self.teacher.is_none() {
            return Err(TrainError::Config(
                "the objective needs a teacher: call with_teacher".into(),
            ));
        }
        if !device.is_autodiff() {
            return Err(TrainError::Config(
                "train on an autodiff device (device.autodiff()) with the student built on it".into(),
            ));
        }
        if train.is_empty() {
            return Err(TrainError::Config("the training set is empty".into()));
        }
        let train_fingerprint = train.fingerprint();
        let teacher_fingerprint = self.teacher.and_then(|teacher| teacher.fingerprint());

        device.seed(config.seed);
        let _flush_denormals = self.flush_denormals.then(crate::FlushDenormals::enable_with_pool);
        let connectors = config
            .features
            .iter()
            .filter_map(|term| term.connector.as_ref().map(|connector| connector.init(device)))
            .collect();
        let mut trainee = Trainee { student, connectors };
        let mut optimizer = config.optimizer.init();
        let mut scheduler = ModuleLrSchedulerConfig::new(config.schedule.clone())
            .init()
            .map_err(|reason| TrainError::Config(format!("schedule: {reason}")))?;

        let mut state = CheckpointState {
            epoch: 0,
            global_step: 0,
            best_epoch: 0,
            best_value: None,
            epochs_without_improvement: 0,
            train_data: train_fingerprint,
            teacher: teacher_fingerprint,
        };
        let mut records = Vec::new();
        if self.resume {
            if let Some((epoch, path)) = self.dir.epoch_checkpoints().pop() {
                let saved: CheckpointState = read_json(&path.join("state.json"))?;
                self.check_same_sources(&saved, train_fingerprint, teacher_fingerprint)?;
                trainee = load_weights(trainee, path.join("model.bpk"))?;
                optimizer = optimizer
                    .load(path.join("optimizer.bpk"))
                    .map_err(|error| TrainError::file(&path.join("optimizer.bpk"), format!("{error:?}")))?;
                let record = LrSchedulerRecord::load(path.join("scheduler.bpk"))
                    .map_err(|error| TrainError::file(&path.join("scheduler.bpk"), format!("{error:?}")))?;
                scheduler = scheduler.load_record(record);
                records = self.dir.metrics_up_to(epoch)?;
                state = saved;
            } else {
                records = self.dir.metrics_up_to(0)?;
            }
        } else {
            self.create_run_dir()?;
        }

        let teacher_taps: Vec<&str> = config.features.iter().map(|term| term.teacher_tap.as_str()).collect();
        let student_taps: Vec<&str> = config.features.iter().map(|term| term.student_tap.as_str()).collect();
        let connector_of: Vec<Option<usize>> = {
            let mut next = 0;
            config
                .features
                .iter()
                .map(|term| {
                    term.connector.as_ref().map(|_| {
                        next += 1;
                        next - 1
                    })
                })
                .collect()
        };

        let sampler = EpochSampler::new(train.len(), config.batch_size, config.seed);
        let mut status = RunStatus::Completed;
        for epoch in state.epoch + 1..=config.epochs {
            device.seed(burn_seed(config.seed, epoch));
            train_batcher.set_epoch(epoch);
            let batches = sampler.batches(epoch - 1);
            let bar = self.progress_bar(epoch, batches.len());
            let mut totals = EpochTotals::default();
            let epoch_start = Instant::now();
            let mut micro_step = 0;
            for step in batches.chunks(config.accumulation) {
                let data_start = Instant::now();
                let mut micro_batches = Vec::with_capacity(step.len());
                for (micro, positions) in step.iter().enumerate() {
                    let items = crate::metrics::read_items(train, positions, "training data")?;
                    let mut batch = train_batcher.batch(items, device);
                    if let Some(rollout) = rollout {
                        batch = rollout(&trainee.student, batch, state.global_step, micro)?;
                    }
                    let (mask, valid) = valid_positions(&batch.targets());
                    micro_batches.push((batch, mask, valid));
                }
                let normaliser: usize = micro_batches.iter().map(|(_, _, valid)| valid).sum();
                let examples_in_step: usize = micro_batches.iter().map(|(batch, _, _)| batch.size()).sum();
                totals.data_seconds += data_start.elapsed().as_secs_f64();

                let mut accumulator = GradientsAccumulator::<Trainee<M>>::new();
                for (batch, mask, valid) in micro_batches {
                    let input = batch.input();
                    let teacher_output = match self.teacher {
                        Some(teacher) => {
                            let start = Instant::now();
                            let output = teacher.teach_examples(input.clone(), batch.indices(), &teacher_taps)?;
                            totals.teacher_seconds += start.elapsed().as_secs_f64();
                            Some(output)
                        }
                        None => None,
                    };
                    let student_output = trainee.student.learn(input, &student_taps)?;
                    let (teacher_logits, teacher_features) = match teacher_output {
                        Some(output) => {
                            let top_k = output.top_k().map(|(indices, values)| {
                                (flatten_indices(indices.clone()), flatten_logits(values.clone()))
                            });
                            let (logits, features) = output.into_parts();
                            let logits = TeacherLogits {
                                dense: flatten_logits(logits),
                                top_k,
                            };
                            (Some(logits), features)
                        }
                        None => (None, Default::default()),
                    };
                    let logit_loss = objective.loss(ObjectiveInput {
                        student: flatten_logits(student_output.logits),
                        teacher: teacher_logits,
                        targets: batch.targets(),
                        mask,
                        normaliser,
                        check_inputs: state.global_step == 0 && micro_step == 0,
                    })?;
                    let features = feature_loss(
                        &config.features,
                        &trainee.connectors,
                        &connector_of,
                        &student_output.features,
                        &teacher_features,
                        examples_in_step,
                    )?;
                    let total = match &features {
                        Some(features) => logit_loss.total.clone() + features.clone(),
                        None => logit_loss.total.clone(),
                    };
                    let value = scalar(&total);
                    if !value.is_finite() {
                        bar.abandon();
                        return Err(TrainError::NonFiniteLoss {
                            value,
                            epoch,
                            step: micro_step,
                            global_step: state.global_step,
                            checkpoint: self.dir.epoch_checkpoints().pop().map(|(_, path)| path),
                        });
                    }
                    totals.loss += value * normaliser as f64;
                    totals.hard += logit_loss.hard.as_ref().map(|t| scalar(t) * normaliser as f64);
                    totals.soft += logit_loss.soft.as_ref().map(|t| scalar(t) * normaliser as f64);
                    totals.features += features.as_ref().map(|t| scalar(t) * normaliser as f64);
                    totals.positions += valid;
                    totals.examples += batch.size();
                    let gradients = GradientsParams::from_grads(total.backward(), &trainee);
                    accumulator.accumulate(&trainee, gradients);
                    micro_step += 1;
                    bar.inc(1);
                }
                let learning_rate = scheduler.step();
                totals.learning_rate = learning_rate.base();
                trainee = optimizer.step(learning_rate, trainee, accumulator.grads());
                if let Some(max_norm) = &config.max_norm {
                    trainee.student = apply_max_norm(trainee.student, max_norm);
                }
                state.global_step += 1;
                totals.steps += 1;
                if self.progress {
                    let seconds = epoch_start.elapsed().as_secs_f64();
                    bar.set_message(format!(
                        "loss {:.4}  {:.0} ex/s",
                        totals.loss / totals.positions.max(1) as f64,
                        totals.examples as f64 / seconds
                    ));
                }
            }
            let train_seconds = epoch_start.elapsed().as_secs_f64();
            bar.finish_and_clear();

            let eval_teacher = self
                .eval_teacher
                .or(self.teacher.filter(|teacher| !teacher.needs_indices()));
            let eval_start = Instant::now();
            let mut eval = Vec::with_capacity(evals.len());
            for set in evals {
                let metrics = evaluate(
                    &trainee.student,
                    eval_teacher,
                    set.dataset,
                    eval_batcher,
                    config.eval_batch_size,
                    device,
                )?;
                eval.push((set.name.to_string(), metrics));
            }
            let record = EpochRecord {
                epoch,
                train: totals.stats(train_seconds),
                eval,
                eval_seconds: eval_start.elapsed().as_secs_f64(),
            };
            if self.progress {
                eprintln!("{}", describe(&record));
            }

            let improved = self.update_best(&mut state, &record);
            state.epoch = epoch;
            self.dir.append_metrics(&record)?;
            records.push(record);
            let checkpoint = self.save_checkpoint(&trainee, &optimizer, &scheduler, &state)?;
            if improved {
                copy_checkpoint(&checkpoint, &self.dir.best())?;
            }
            self.prune_checkpoints()?;
            if let Some(early) = &config.early_stopping
                && state.epochs_without_improvement >= early.patience
            {
                status = RunStatus::EarlyStopped;
                break;
            }
            if self.stop_after.is_some_and(|last| epoch >= last) && epoch < config.epochs {
                status = RunStatus::Stopped;
                break;
            }
        }

        let last = records
            .last()
            .cloned()
            .ok_or_else(|| TrainError::Config("no epoch was run (the run had already ended)".into()))?;
        let summary = RunSummary {
            status,
            epochs: last.epoch,
            best_epoch: if state.best_epoch == 0 {
                last.epoch
            } else {
                state.best_epoch
            },
            train_seconds: records.iter().map(|r| r.train.seconds).sum(),
            teacher_seconds: records.iter().map(|r| r.train.teacher_seconds).sum(),
            student_seconds: records.iter().map(|r| r.train.student_seconds).sum(),
            eval_seconds: records.iter().map(|r| r.eval_seconds).sum(),
            student_parameters: Module::num_params(&trainee.student),
            train_data: train_fingerprint,
            teacher: teacher_fingerprint,
            last,
        };
        write_json(&self.dir.summary(), &summary)?;
        Ok(RunOutcome {
            student: trainee.student,
            summary,
            records,
        })
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

    fn create_run_dir(&self) -> Result<()> {
        if self.dir.metrics().exists() || self.dir.checkpoints().exists() {
            return Err(TrainError::Config(format!(
                "{} already holds a run; resume it (Distiller::resume) or choose another directory",
                self.dir.root.display()
            )));
        }
        fs::create_dir_all(self.dir.checkpoints()).map_err(|error| TrainError::io(&self.dir.root, error))?;
        write_json(&self.dir.config(), &self.config)
    }

    /// Updates the early-stopping state with an epoch's record; says whether it is the best.
    fn update_best(&self, state: &mut CheckpointState, record: &EpochRecord) -> bool {
        let Some((metric, min_delta)) = self
            .config
            .early_stopping
            .as_ref()
            .map(|early| (early.metric, early.min_delta))
            .or(Some((Metric::Loss, 0.0)))
        else {
            return false;
        };
        let Some((_, metrics)) = record.eval.first() else {
            // Without an evaluation set the latest epoch counts as the best.
            state.best_epoch = record.epoch;
            return true;
        };
        let (value, higher_is_better) = match metric {
            Metric::Loss => (metrics.loss, false),
            Metric::Accuracy => (metrics.accuracy, true),
            Metric::TeacherKl => (metrics.teacher_kl.unwrap_or(f64::INFINITY), false),
        };
        let improved = match state.best_value {
            None => true,
            Some(best) if higher_is_better => value > best + min_delta,
            Some(best) => value < best - min_delta,
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

    fn save_checkpoint<M: Module + ModuleDisplay>(
        &self,
        trainee: &Trainee<M>,
        optimizer: &burn::optim::ModuleOptimizer,
        scheduler: &ModuleLrScheduler,
        state: &CheckpointState,
    ) -> Result<PathBuf> {
        let target = self.dir.checkpoint(state.epoch);
        let partial = self
            .dir
            .checkpoints()
            .join(format!(".epoch-{:04}.partial", state.epoch));
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir_all(&partial).map_err(|error| TrainError::io(&partial, error))?;
        save_weights(trainee, partial.join("model.bpk"))?;
        let optimizer_path = partial.join("optimizer.bpk");
        optimizer
            .save(&optimizer_path)
            .map_err(|error| TrainError::file(&optimizer_path, format!("{error:?}")))?;
        let scheduler_path = partial.join("scheduler.bpk");
        scheduler
            .to_record()
            .save(&scheduler_path)
            .map_err(|error| TrainError::file(&scheduler_path, format!("{error:?}")))?;
        write_json(&partial.join("state.json"), state)?;
        if target.exists() {
            fs::remove_dir_all(&target).map_err(|error| TrainError::io(&target, error))?;
        }
        fs::rename(&partial, &target).map_err(|error| TrainError::io(&target, error))?;
        Ok(target)
    }

    fn prune_checkpoints(&self) -> Result<()> {
        let checkpoints = self.dir.epoch_checkpoints();
        let excess = checkpoints.len().saturating_sub(self.config.keep_checkpoints);
        for (_, path) in checkpoints.into_iter().take(excess) {
            fs::remove_dir_all(&path).map_err(|error| TrainError::io(&path, error))?;
        }
        Ok(())
    }

    fn progress_bar(&self, epoch: usize, batches: usize) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(batches as u64).with_style(
            ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} [{elapsed} < {eta}] {msg}")
                .expect("a valid template"),
        );
        bar.set_prefix(format!("{epoch}/{}", self.config.epochs));
        bar
    }
}

/// Copies a checkpoint directory to `target` (replacing it) through a temporary directory.
fn copy_checkpoint(source: &Path, target: &Path) -> Result<()> {
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

fn scalar(tensor: &Tensor<1>) -> f64 {
    f64::from(tensor.clone().into_scalar::<f32>())
}

/// The device seed of an epoch: a function of `(seed, epoch)` only, so resuming reproduces it.
fn burn_seed(seed: u64, epoch: usize) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (epoch as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

#[derive(Default)]
struct EpochTotals {
    loss: f64,
    hard: OptionalSum,
    soft: OptionalSum,
    features: OptionalSum,
    examples: usize,
    positions: usize,
    steps: usize,
    learning_rate: f64,
    teacher_seconds: f64,
    data_seconds: f64,
}

/// A sum that stays `None` until something is added.
#[derive(Default, Clone, Copy)]
struct OptionalSum(Option<f64>);

impl std::ops::AddAssign<Option<f64>> for OptionalSum {
    fn add_assign(&mut self, value: Option<f64>) {
        if let Some(value) = value {
            self.0 = Some(self.0.unwrap_or(0.0) + value);
        }
    }
}

impl EpochTotals {
    fn stats(&self, seconds: f64) -> TrainStats {
        let per_position = |sum: OptionalSum| sum.0.map(|sum| sum / self.positions.max(1) as f64);
        TrainStats {
            loss: self.loss / self.positions.max(1) as f64,
            hard_loss: per_position(self.hard),
            soft_loss: per_position(self.soft),
            feature_loss: per_position(self.features),
            examples: self.examples,
            positions: self.positions,
            steps: self.steps,
            learning_rate: self.learning_rate,
            seconds,
            teacher_seconds: self.teacher_seconds,
            student_seconds: (seconds - self.teacher_seconds - self.data_seconds).max(0.0),
            data_seconds: self.data_seconds,
            examples_per_second: self.examples as f64 / seconds,
            positions_per_second: self.positions as f64 / seconds,
        }
    }
}

/// One line for people: the epoch's loss and the first evaluation set's figures.
fn describe(record: &EpochRecord) -> String {
    let mut line = format!(
        "epoch {}: train loss {:.4}, {:.0} examples/s ({:.1} s, teacher {:.1} s)",
        record.epoch,
        record.train.loss,
        record.train.examples_per_second,
        record.train.seconds,
        record.train.teacher_seconds
    );
    for (name, metrics) in &record.eval {
        line.push_str(&format!("; {name}: {}", describe_metrics(metrics)));
    }
    line
}

fn describe_metrics(metrics: &EvalMetrics) -> String {
    let mut text = format!(
        "loss {:.4}, accuracy {:.2} %, {} errors",
        metrics.loss,
        100.0 * metrics.accuracy,
        metrics.errors
    );
    if let Some(perplexity) = metrics.perplexity {
        text.push_str(&format!(", perplexity {perplexity:.2}"));
    }
    if let Some(kl) = metrics.teacher_kl {
        text.push_str(&format!(", KL to teacher {kl:.4}"));
    }
    text
}
