//! The training loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::Precision;
use crate::run::LossScale;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::{Module, ModuleDisplay};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrSchedulerConfig;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Bool, Device, Tensor};
use burn_distill_data::{Batch, EpochAware, EpochSampler, Fingerprinted, Indexed};
use burn_distill_loss::{CrdLoss, CrdUpdate};
use burn_distill_model::{Connector, Fingerprint, Student, Teacher, TeacherInput, cast_params};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::{Checkpointer, Session};
use crate::config::{DistillConfig, FeatureKind, FeatureTermConfig};
use crate::constraint::apply_max_norm;
use crate::error::{Result, TrainError};
use crate::metrics::{EvalMetrics, evaluate};
use crate::objective::{BuiltinObjective, Objective, valid_positions};
use crate::run::{CheckpointState, EpochRecord, RunDir, RunStatus, RunSummary, TrainStats, read_json, write_json};
use crate::step::{LossTerms, StepCounts, batch_loss};
use crate::stopping::EarlyStopping;

/// The student with the connectors of its feature terms: what the optimizer trains and a
/// checkpoint holds.
#[derive(Module, Debug)]
pub struct Trainee<M> {
    /// The student.
    pub student: M,
    /// One connector per feature term that has one, in config order.
    pub connectors: Vec<Connector>,
    /// One CRD module (embeddings, memory banks) per CRD feature term, in config order.
    pub contrast: Vec<CrdLoss>,
}

/// The CRD modules of `terms`, refusing one whose bank size is not the training set's.
fn contrast_modules(terms: &[FeatureTermConfig], train_examples: usize, device: &Device) -> Result<Vec<CrdLoss>> {
    terms
        .iter()
        .enumerate()
        .filter_map(|(index, term)| match &term.kind {
            FeatureKind::Crd(config) => Some((index, config)),
            _ => None,
        })
        .map(|(index, config)| {
            if config.examples != train_examples {
                return Err(TrainError::Config(format!(
                    "feature term {index} (CRD): examples = {} but the training set has {train_examples} examples; \
                     its memory banks hold one row per training example",
                    config.examples
                )));
            }
            Ok(config.try_init(device)?)
        })
        .collect()
}

/// With CRD terms, the bank row of every training example by its source index: its place in
/// the training set (a subset's examples keep their source indices). One pass over the set.
fn contrast_rows<S, It>(terms: &[FeatureTermConfig], train: &S) -> Result<Option<HashMap<usize, usize>>>
where
    S: Dataset<It>,
    It: Indexed,
{
    if !terms.iter().any(|term| matches!(term.kind, FeatureKind::Crd(_))) {
        return Ok(None);
    }
    let mut rows = HashMap::with_capacity(train.len());
    for position in 0..train.len() {
        let item = train
            .get(position)
            .map_err(|error| TrainError::Config(format!("training example {position}: {error}")))?;
        if rows.insert(item.index(), position).is_some() {
            return Err(TrainError::Config(format!(
                "training example {position} repeats source index {}: CRD keeps one memory-bank row per example",
                item.index()
            )));
        }
    }
    Ok(Some(rows))
}

/// The seed of a micro-batch's CRD negatives: a function of the run's seed, the step and the
/// micro-batch's place in the epoch, so a resumed run draws what an uninterrupted one would.
fn contrast_seed(seed: u64, global_step: usize, micro_batch: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((global_step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(micro_batch as u64)
}

impl<M: Module> Trainee<M> {
    /// The same trainee with the student's weights cast to `dtype` inside the graph (mixed
    /// precision); the connectors and CRD modules stay in f32, where the widened features meet
    /// them.
    pub(crate) fn with_student_in(self, dtype: burn::tensor::FloatDType) -> Self {
        Self {
            student: cast_params(self.student, dtype),
            ..self
        }
    }
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

/// What [`Distiller::fit`] trains on and evaluates with.
///
/// ```ignore
/// let data = FitData::new(&train, &batcher).with_evals(&[EvalSet { name: "valid", dataset: &valid }]);
/// distiller.fit(student, data, &device)?;
/// ```
#[derive(Debug)]
pub struct FitData<'d, S, V, Bt> {
    /// The training set.
    pub train: &'d S,
    /// Sets evaluated after every epoch; the first drives early stopping and `best/`.
    pub evals: &'d [EvalSet<'d, V>],
    /// Batches the training set.
    pub train_batcher: &'d Bt,
    /// Batches the evaluation sets.
    pub eval_batcher: &'d Bt,
}

impl<S, V, Bt> Clone for FitData<'_, S, V, Bt> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S, V, Bt> Copy for FitData<'_, S, V, Bt> {}

impl<'d, S, Bt> FitData<'d, S, S, Bt> {
    /// Training on `train` batched by `batcher`, which also batches evaluation; no evaluation
    /// sets.
    pub fn new(train: &'d S, batcher: &'d Bt) -> Self {
        Self {
            train,
            evals: &[],
            train_batcher: batcher,
            eval_batcher: batcher,
        }
    }
}

impl<'d, S, V, Bt> FitData<'d, S, V, Bt> {
    /// Evaluates on `evals` after every epoch.
    pub fn with_evals<W>(self, evals: &'d [EvalSet<'d, W>]) -> FitData<'d, S, W, Bt> {
        FitData {
            train: self.train,
            evals,
            train_batcher: self.train_batcher,
            eval_batcher: self.eval_batcher,
        }
    }

    /// Batches evaluation with `batcher` (e.g. without augmentation).
    pub fn with_eval_batcher(mut self, batcher: &'d Bt) -> Self {
        self.eval_batcher = batcher;
        self
    }
}

/// The objective and the feature terms, fixed for the run.
struct Terms<'o> {
    objective: &'o dyn Objective,
    loss: LossTerms,
    /// With CRD terms: each training example's bank row (its place in the training set), by
    /// its source index.
    contrast_rows: Option<HashMap<usize, usize>>,
}

/// One micro-batch, its mask of valid targets and their count.
struct MicroBatch<B> {
    batch: B,
    mask: Option<Tensor<1, Bool>>,
    valid: usize,
}

/// The running epoch: its number, micro-steps so far, totals and progress bar.
struct EpochState {
    epoch: usize,
    micro_step: usize,
    totals: EpochTotals,
    bar: ProgressBar,
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
        // A config that reads but holds values no run takes (a damaged or hand-edited file) is
        // refused here, naming the file, rather than when the run starts.
        config.validate().map_err(|error| TrainError::Resume {
            dir: dir.root.clone(),
            reason: format!("{}: {error}", dir.config().display()),
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

    /// Trains `student` (built on `device`, an autodiff device) on `data`: its training set,
    /// evaluation sets (evaluated every epoch; the first drives early stopping and the best
    /// checkpoint) and batchers.
    ///
    /// # Errors
    /// [`TrainError::Config`] for a bad config, a missing teacher or objective, a non-autodiff
    /// device or a run directory that already holds a run; [`TrainError::NonFiniteLoss`] when the
    /// loss becomes NaN or infinite (the last good checkpoint is kept); loss, model, data and
    /// file errors as they come.
    pub fn fit<M, S, V, It, Bt, B>(
        &self,
        student: M,
        data: FitData<'_, S, V, Bt>,
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
        self.fit_inner(student, data, device, None)
    }

    /// The loop: check, start or resume, then per epoch train, evaluate, checkpoint and ask the
    /// early-stopping strategy.
    pub(crate) fn fit_inner<M, S, V, It, Bt, B>(
        &self,
        student: M,
        data: FitData<'_, S, V, Bt>,
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
        let objective: &dyn Objective = match self.objective {
            Some(objective) => objective,
            None => {
                builtin = BuiltinObjective::new(&config.objective)?;
                &builtin
            }
        };
        self.check_run(objective, data.train.is_empty(), device)?;
        let _flush_denormals = self.flush_denormals.then(crate::FlushDenormals::enable_with_pool);
        let checkpointer = Checkpointer::new(&self.dir, config.keep_checkpoints);
        let mut session = self.start(
            student,
            data.train.fingerprint(),
            data.train.len(),
            &checkpointer,
            device,
        )?;
        let terms = Terms {
            objective,
            loss: LossTerms::new(config),
            contrast_rows: contrast_rows(&config.features, data.train)?,
        };
        let stopping = EarlyStopping::new(config);
        let mut status = RunStatus::Completed;
        for epoch in session.state.epoch + 1..=config.epochs {
            let record;
            (session, record) = self.run_epoch(session, epoch, &data, &terms, device, rollout)?;
            let best = stopping.observe(&mut session.state, &record);
            session.state.epoch = epoch;
            self.dir.append_metrics(&record)?;
            session.records.push(record);
            checkpointer.save(&session, best)?;
            if stopping.should_stop(&session.state) {
                status = RunStatus::EarlyStopped;
                break;
            }
            if self.stop_after.is_some_and(|last| epoch >= last) && epoch < config.epochs {
                status = RunStatus::Stopped;
                break;
            }
        }
        self.finish(session, status)
    }

    /// What can be refused before any work: the teacher the objective needs, the device, the data.
    fn check_run(&self, objective: &dyn Objective, no_training_data: bool, device: &Device) -> Result<()> {
        self.config.check_objective(objective)?;
        if objective.needs_teacher() && self.teacher.is_none() {
            return Err(TrainError::MissingTeacher {
                objective: format!("the objective `{}`", objective.name()),
            });
        }
        if !self.config.features.is_empty() && self.teacher.is_none() {
            return Err(TrainError::MissingTeacher {
                objective: "the feature terms".into(),
            });
        }
        if !device.is_autodiff() {
            return Err(TrainError::NotAutodiff);
        }
        if no_training_data {
            return Err(TrainError::EmptyTrainingSet);
        }
        Ok(())
    }

    /// The student, its connectors, optimizer and schedule at epoch 0, or as the last
    /// checkpoint left them when resuming.
    fn start<M: Module + ModuleDisplay>(
        &self,
        student: M,
        train_data: Fingerprint,
        train_examples: usize,
        checkpointer: &Checkpointer<'_>,
        device: &Device,
    ) -> Result<Session<M>> {
        let config = &self.config;
        device.seed(config.seed);
        let connectors = config
            .features
            .iter()
            .filter_map(|term| term.connector.as_ref().map(|connector| connector.init(device)))
            .collect();
        let contrast = contrast_modules(&config.features, train_examples, device)?;
        let session = Session {
            trainee: Trainee {
                student,
                connectors,
                contrast,
            },
            optimizer: config.optimizer.init(),
            scheduler: ModuleLrSchedulerConfig::new(config.schedule.clone())
                .init()
                .map_err(|reason| TrainError::Config(format!("schedule: {reason}")))?,
            state: CheckpointState {
                epoch: 0,
                global_step: 0,
                best_epoch: 0,
                best_value: None,
                epochs_without_improvement: 0,
                train_data,
                teacher: self.teacher.and_then(|teacher| teacher.fingerprint()),
                loss_scale: match self.config.precision {
                    Precision::F16(scaling) => Some(LossScale {
                        scale: scaling.initial,
                        good_steps: 0,
                        skipped: 0,
                    }),
                    _ => None,
                },
            },
            records: Vec::new(),
        };
        if self.resume {
            checkpointer.resume(session)
        } else {
            checkpointer.create(config)?;
            Ok(session)
        }
    }

    /// One epoch: its optimizer steps, then every evaluation set.
    fn run_epoch<M, S, V, It, Bt, B>(
        &self,
        mut session: Session<M>,
        epoch: usize,
        data: &FitData<'_, S, V, Bt>,
        terms: &Terms<'_>,
        device: &Device,
        rollout: Option<&Rollout<'_, M, B>>,
    ) -> Result<(Session<M>, EpochRecord)>
    where
        M: Module + ModuleDisplay + Student<I, D>,
        S: Dataset<It>,
        V: Dataset<It>,
        It: Indexed,
        Bt: Batcher<It, B> + EpochAware,
        B: Batch<Input = I>,
    {
        let config = &self.config;
        device.seed(burn_seed(config.seed, epoch));
        data.train_batcher.set_epoch(epoch);
        let sampler = EpochSampler::new(data.train.len(), config.batch_size, config.seed);
        let batches = sampler.batches(epoch - 1);
        let bar = self.progress_bar(epoch, batches.len());
        let mut epoch_state = EpochState {
            epoch,
            micro_step: 0,
            totals: EpochTotals::default(),
            bar,
        };
        let start = Instant::now();
        for step in batches.chunks(config.accumulation) {
            let micro_batches = self.load_step(&session, step, data, device, rollout, &mut epoch_state)?;
            session = self.train_step(session, micro_batches, terms, &mut epoch_state)?;
            if self.progress {
                let totals = &epoch_state.totals;
                epoch_state.bar.set_message(format!(
                    "loss {:.4}  {:.0} ex/s",
                    totals.loss / totals.positions.max(1) as f64,
                    totals.examples as f64 / start.elapsed().as_secs_f64()
                ));
            }
        }
        let train = epoch_state.totals.stats(start.elapsed().as_secs_f64());
        epoch_state.bar.finish_and_clear();

        let eval_start = Instant::now();
        let eval = self.evaluate_sets(&session.trainee.student, data, device)?;
        let record = EpochRecord {
            epoch,
            train,
            eval,
            eval_seconds: eval_start.elapsed().as_secs_f64(),
        };
        if self.progress {
            eprintln!("{}", describe(&record));
        }
        Ok((session, record))
    }

    /// The micro-batches of one optimizer step (rolled out when on-policy), with their valid
    /// positions.
    fn load_step<M, S, V, It, Bt, B>(
        &self,
        session: &Session<M>,
        step: &[Vec<usize>],
        data: &FitData<'_, S, V, Bt>,
        device: &Device,
        rollout: Option<&Rollout<'_, M, B>>,
        epoch: &mut EpochState,
    ) -> Result<Vec<MicroBatch<B>>>
    where
        S: Dataset<It>,
        It: Indexed,
        Bt: Batcher<It, B>,
        B: Batch<Input = I>,
    {
        let start = Instant::now();
        let mut micro_batches = Vec::with_capacity(step.len());
        for (micro, positions) in step.iter().enumerate() {
            let items = crate::metrics::read_items(data.train, positions, "training data")?;
            let mut batch = data.train_batcher.batch(items, device);
            if let Some(rollout) = rollout {
                batch = rollout(&session.trainee.student, batch, session.state.global_step, micro)?;
            }
            let (mask, valid) = valid_positions(&batch.targets());
            micro_batches.push(MicroBatch { batch, mask, valid });
        }
        epoch.totals.data_seconds += start.elapsed().as_secs_f64();
        Ok(micro_batches)
    }

    /// One optimizer step: every micro-batch's gradients accumulated, the step, the max-norm
    /// constraint.
    fn train_step<M, B>(
        &self,
        mut session: Session<M>,
        micro_batches: Vec<MicroBatch<B>>,
        terms: &Terms<'_>,
        epoch: &mut EpochState,
    ) -> Result<Session<M>>
    where
        M: Module + ModuleDisplay + Student<I, D>,
        B: Batch<Input = I>,
    {
        let step = StepCounts {
            positions: micro_batches.iter().map(|micro| micro.valid).sum(),
            examples: micro_batches.iter().map(|micro| micro.batch.size()).sum(),
        };
        let forward_dtype = self.config.precision.forward_dtype();
        let scale = session.state.loss_scale.map(|loss_scale| loss_scale.scale);
        let mut accumulator = GradientsAccumulator::<Trainee<M>>::new();
        let mut contrast_updates = Vec::new();
        for micro in micro_batches {
            // Mixed precision: the weights cast inside this micro-batch's graph, so the
            // backward pass carries the gradients through the casts to the f32 weights.
            let cast = forward_dtype.map(|dtype| session.trainee.clone().with_student_in(dtype));
            let (total, updates) = self.micro_batch_loss(&session, cast.as_ref(), micro, step, terms, epoch)?;
            contrast_updates.push(updates);
            let total = match scale {
                Some(scale) => total.mul_scalar(scale),
                None => total,
            };
            let gradients = GradientsParams::from_grads(total.backward(), &session.trainee);
            accumulator.accumulate(&session.trainee, gradients);
            epoch.micro_step += 1;
            epoch.bar.inc(1);
        }
        let mut grads = accumulator.grads();
        if let (Some(loss_scale), Precision::F16(scaling)) = (&mut session.state.loss_scale, self.config.precision) {
            if !unscale_gradients(&session.trainee, &mut grads, 1.0 / loss_scale.scale) {
                // Overflow: this step is skipped and the scale halved.
                loss_scale.scale /= 2.0;
                loss_scale.good_steps = 0;
                loss_scale.skipped += 1;
                return Ok(session);
            }
            loss_scale.good_steps += 1;
            if loss_scale.good_steps >= scaling.growth_interval {
                loss_scale.scale *= 2.0;
                loss_scale.good_steps = 0;
            }
        }
        let learning_rate = session.scheduler.step();
        epoch.totals.learning_rate = learning_rate.base();
        session.trainee = session.optimizer.step(learning_rate, session.trainee, grads);
        // CRD's memory banks move after the step, with the embeddings each micro-batch computed.
        for updates in contrast_updates {
            let modules = std::mem::take(&mut session.trainee.contrast);
            session.trainee.contrast = modules
                .into_iter()
                .zip(updates)
                .map(|(module, update)| module.update(update))
                .collect();
        }
        if let Some(max_norm) = &self.config.max_norm {
            session.trainee.student = apply_max_norm(session.trainee.student, max_norm);
        }
        session.state.global_step += 1;
        epoch.totals.steps += 1;
        Ok(session)
    }

    /// One micro-batch's loss (the objective and the feature terms), its parts added to the
    /// epoch's totals; a NaN or infinite loss ends the run here.
    fn micro_batch_loss<M, B>(
        &self,
        session: &Session<M>,
        cast: Option<&Trainee<M>>,
        micro: MicroBatch<B>,
        step: StepCounts,
        terms: &Terms<'_>,
        epoch: &mut EpochState,
    ) -> Result<(Tensor<1>, Vec<CrdUpdate>)>
    where
        M: Module + ModuleDisplay + Student<I, D>,
        B: Batch<Input = I>,
    {
        let MicroBatch { batch, mask, valid } = micro;
        // The epoch's micro-batch counter starts at 0 in a resumed epoch too.
        let seed = contrast_seed(self.config.seed, session.state.global_step, epoch.micro_step);
        let loss = batch_loss(
            cast.unwrap_or(&session.trainee),
            self.config.precision.forward_dtype(),
            self.teacher,
            terms.objective,
            &terms.loss,
            &batch,
            mask,
            step,
            session.state.global_step == 0 && epoch.micro_step == 0,
            false,
            seed,
            terms.contrast_rows.as_ref(),
        )?;
        epoch.totals.teacher_seconds += loss.teacher_seconds;
        let total = loss.total;
        let value = scalar(&total);
        if !value.is_finite() {
            epoch.bar.abandon();
            return Err(TrainError::NonFiniteLoss {
                value,
                epoch: epoch.epoch,
                step: epoch.micro_step,
                global_step: session.state.global_step,
                checkpoint: self.dir.epoch_checkpoints().pop().map(|(_, path)| path),
            });
        }
        let weighted = |term: &Option<Tensor<1>>| term.as_ref().map(|t| scalar(t) * step.positions as f64);
        let totals = &mut epoch.totals;
        totals.loss += value * step.positions as f64;
        totals.hard += weighted(&loss.hard);
        totals.soft += weighted(&loss.soft);
        totals.features += weighted(&loss.features);
        totals.positions += valid;
        totals.examples += batch.size();
        Ok((total, loss.contrast_updates))
    }

    /// Every evaluation set's metrics, against the evaluation teacher.
    fn evaluate_sets<M, S, V, It, Bt, B>(
        &self,
        student: &M,
        data: &FitData<'_, S, V, Bt>,
        device: &Device,
    ) -> Result<Vec<(String, EvalMetrics)>>
    where
        M: Module + ModuleDisplay + Student<I, D>,
        V: Dataset<It>,
        It: Indexed,
        Bt: Batcher<It, B>,
        B: Batch<Input = I>,
    {
        let eval_teacher = self
            .eval_teacher
            .or(self.teacher.filter(|teacher| !teacher.needs_indices()));
        data.evals
            .iter()
            .map(|set| {
                let metrics = evaluate(
                    student,
                    eval_teacher,
                    set.dataset,
                    data.eval_batcher,
                    self.config.eval_batch_size,
                    device,
                )?;
                Ok((set.name.to_string(), metrics))
            })
            .collect()
    }

    /// `summary.json` and the outcome.
    fn finish<M: Module + ModuleDisplay>(&self, session: Session<M>, status: RunStatus) -> Result<RunOutcome<M>> {
        let Session {
            trainee,
            state,
            records,
            ..
        } = session;
        let last = records.last().cloned().ok_or_else(|| TrainError::AlreadyEnded {
            dir: self.dir.root.clone(),
        })?;
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
            train_data: state.train_data,
            teacher: state.teacher,
            last,
        };
        write_json(&self.dir.summary(), &summary)?;
        Ok(RunOutcome {
            student: trainee.student,
            summary,
            records,
        })
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

/// Multiplies every gradient of `trainee` by `factor` (the loss scale's inverse); `false`
/// when one holds an inf or NaN (the scaled backward pass overflowed).
fn unscale_gradients<M: Module + ModuleDisplay>(
    trainee: &Trainee<M>,
    grads: &mut GradientsParams,
    factor: f64,
) -> bool {
    struct Unscale<'g> {
        grads: &'g mut GradientsParams,
        factor: f64,
        flags: Vec<Tensor<1, burn::tensor::Int>>,
    }
    impl burn::module::ModuleVisitor for Unscale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if let Some(grad) = self.grads.remove::<D>(param.id) {
                let grad = grad.mul_scalar(self.factor);
                let bad = grad.clone().is_nan().bool_or(grad.clone().is_inf()).any();
                self.flags.push(bad.int().reshape([1]));
                self.grads.register::<D>(param.id, grad);
            }
        }
    }
    let mut visitor = Unscale {
        grads,
        factor,
        flags: Vec::new(),
    };
    trainee.visit(&mut visitor);
    if visitor.flags.is_empty() {
        return true;
    }
    // One host read for all of them.
    Tensor::cat(visitor.flags, 0).sum().into_scalar::<i64>() == 0
}
