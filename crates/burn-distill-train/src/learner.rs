//! Distillation inside burn-train's Learner: a [`DistillModel`] is a burn-train model
//! ([`TrainStep`] and [`InferenceStep`]) whose loss is the [`Distiller`](crate::Distiller)'s,
//! computed by the same function. A burn user's `SupervisedTraining` then distils with what it
//! already has: metrics and the dashboard, checkpoints, early stopping, gradient accumulation,
//! `MultiDevice` and DDP.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use burn::module::{Module, ModuleDisplay};
use burn::tensor::{Device, Int, Tensor, TensorReadError};
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, ItemLazy, LossInput, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use burn_distill_data::Batch;
use burn_distill_model::{Student, Teacher, TeacherInput};

use crate::config::Precision;
use crate::config::{FeatureKind, FeatureTermConfig, ObjectiveConfig};
use crate::distiller::Trainee;
use crate::error::{Result, TrainError};
use crate::objective::{BuiltinObjective, Objective, valid_positions};
use crate::step::{BatchLoss, LossTerms, StepCounts, batch_loss};

/// A teacher shared by every replica of a [`DistillModel`].
pub type SharedTeacher<I, const D: usize> = Arc<dyn Teacher<I, D> + Send + Sync>;

/// An objective shared by every replica of a [`DistillModel`].
pub type SharedObjective = Arc<dyn Objective + Send + Sync>;

/// A student, its connectors and a frozen teacher with an objective, as one burn-train model.
///
/// Only the [`Trainee`] (the student and its connectors) is a module: checkpoints hold it
/// alone, the optimizer updates it alone, and `MultiDevice` copies it alone to each device. The
/// teacher and the objective are shared by reference; the teacher is asked for its outputs
/// without autodiff and never receives gradients. Its weights stay where they were loaded:
/// wrap it in [`TeacherOn`](burn_distill_model::TeacherOn) to run it on a device of its own (a
/// second GPU, or a burn-remote server on another machine).
///
/// A training step's loss is [`Distiller`](crate::Distiller)'s: the objective plus the
/// feature terms, a mean over the batch's valid positions (targets equal to
/// [`IGNORE_INDEX`](crate::IGNORE_INDEX) are left out). burn-train adds the gradients of the
/// batches that make one optimizer step (those of `MultiDevice`'s devices, and of
/// `grads_accumulation`): give their number to
/// [`DistillModelBuilder::summed_batches`] and the step's gradient is the mean over all of
/// them, as one device with the whole batch gives it. Validation computes the same objective
/// against the evaluation teacher (the teacher itself unless it is a cache of training-set
/// outputs), or cross-entropy where there is none.
///
/// The [`DistillOutput`] items hold the loss and its parts and, for accuracy, the number of
/// correct positions, never the `[batch, seq, vocab]` logits.
///
/// ```ignore
/// let model = DistillModel::builder(student)
///     .objective(&ObjectiveConfig::Hinton(HintonKdLossConfig::new()))?
///     .teacher(FrozenTeacher::new(&teacher))
///     .summed_batches(devices.len())
///     .build()?;
/// let learner = Learner::new(model, optimizer, lr_scheduler);
/// let result = SupervisedTraining::new(dir, train_loader, valid_loader)
///     .metric_train_numeric(LossMetric::new())
///     .metric_valid_numeric(DistillMetric::accuracy())
///     .with_training_strategy(ExecutionStrategy::multi(devices, MultiDeviceOptim::OptimMainDevice).into())
///     .launch(learner);
/// let student = result.model.into_student();
/// ```
#[derive(Module, Debug)]
pub struct DistillModel<M, B: Batch, const D: usize> {
    /// The student and its connectors: what is trained and checkpointed.
    pub trainee: Trainee<M>,
    #[module(skip)]
    plan: Plan<B, D>,
}

/// What a [`DistillModel`] shares between its replicas: the teachers, the objectives, the
/// feature terms.
struct PlanInner<I, const D: usize> {
    teacher: Option<SharedTeacher<I, D>>,
    eval_teacher: Option<SharedTeacher<I, D>>,
    objective: SharedObjective,
    eval_objective: SharedObjective,
    terms: LossTerms,
    summed_batches: usize,
    precision: Precision,
}

struct Plan<B: Batch, const D: usize> {
    inner: Arc<PlanInner<B::Input, D>>,
    batch: PhantomData<fn() -> B>,
}

impl<B: Batch, const D: usize> Clone for Plan<B, D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            batch: PhantomData,
        }
    }
}

impl<B: Batch, const D: usize> fmt::Debug for Plan<B, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("Plan")
            .field("objective", &inner.objective.name())
            .field("teacher", &inner.teacher.is_some())
            .field("eval_teacher", &inner.eval_teacher.is_some())
            .field("feature_terms", &inner.terms.features.len())
            .field("summed_batches", &inner.summed_batches)
            .finish()
    }
}

impl<M, B: Batch, const D: usize> DistillModel<M, B, D> {
    /// Starts a model around `student`.
    pub fn builder(student: M) -> DistillModelBuilder<M, B, D> {
        DistillModelBuilder {
            student,
            objective: None,
            teacher: None,
            eval_teacher: None,
            features: Vec::new(),
            device: None,
            summed_batches: 1,
            precision: Precision::F32,
        }
    }

    /// The student.
    pub fn student(&self) -> &M {
        &self.trainee.student
    }

    /// The student, by value (after training: `result.model.into_student()`).
    pub fn into_student(self) -> M {
        self.trainee.student
    }

    /// The same model around another student, with the same teacher and objective: a
    /// checkpoint's student, or one moved to another device.
    pub fn with_trainee(self, trainee: Trainee<M>) -> Self {
        Self {
            trainee,
            plan: self.plan,
        }
    }

    /// How many batches' gradients burn-train adds into one optimizer step.
    pub fn summed_batches(&self) -> usize {
        self.plan.inner.summed_batches
    }
}

/// Builds a [`DistillModel`]; [`build`](Self::build) checks the parts fit together.
pub struct DistillModelBuilder<M, B: Batch, const D: usize> {
    student: M,
    objective: Option<SharedObjective>,
    teacher: Option<SharedTeacher<B::Input, D>>,
    eval_teacher: Option<SharedTeacher<B::Input, D>>,
    features: Vec<FeatureTermConfig>,
    device: Option<Device>,
    summed_batches: usize,
    precision: Precision,
}

impl<M, B: Batch, const D: usize> DistillModelBuilder<M, B, D> {
    /// One of the built-in objectives.
    ///
    /// # Errors
    /// [`TrainError::Config`] for an objective that cannot be built (a bad temperature, …).
    pub fn objective(mut self, config: &ObjectiveConfig) -> Result<Self> {
        self.objective = Some(Arc::new(BuiltinObjective::new(config)?));
        Ok(self)
    }

    /// An objective of your own.
    pub fn custom_objective(mut self, objective: impl Objective + Send + Sync + 'static) -> Self {
        self.objective = Some(Arc::new(objective));
        self
    }

    /// The teacher (a frozen model, an ensemble, a cache of outputs, one on another device).
    pub fn teacher(mut self, teacher: impl Teacher<B::Input, D> + Send + Sync + 'static) -> Self {
        self.teacher = Some(Arc::new(teacher));
        self
    }

    /// A teacher already shared (with another model, or a [`Distiller`](crate::Distiller) run).
    pub fn shared_teacher(mut self, teacher: SharedTeacher<B::Input, D>) -> Self {
        self.teacher = Some(teacher);
        self
    }

    /// The teacher validation compares with, when the training teacher is a cache that only
    /// knows the training set.
    pub fn eval_teacher(mut self, teacher: impl Teacher<B::Input, D> + Send + Sync + 'static) -> Self {
        self.eval_teacher = Some(Arc::new(teacher));
        self
    }

    /// Feature (hint) terms; their connectors are created on `device` and trained with the
    /// student.
    pub fn features(mut self, terms: Vec<FeatureTermConfig>, device: &Device) -> Self {
        self.features = terms;
        self.device = Some(device.clone());
        self
    }

    /// How many batches' gradients burn-train adds into one optimizer step: the number of
    /// devices of a `MultiDevice` strategy times `grads_accumulation` (1 for one device, and
    /// for DDP with a mean all-reduce). Each batch's loss (a mean over its valid positions) is
    /// divided by it, so the step's gradient is the mean of the batches' means: the global
    /// batch's mean when the batches have equal numbers of valid positions (classification with
    /// full batches). Language-model batches with different numbers of target tokens weigh
    /// equally rather than by their tokens; the [`Distiller`](crate::Distiller)'s
    /// accumulation normalises by the step's global token count.
    pub fn summed_batches(mut self, batches: usize) -> Self {
        self.summed_batches = batches;
        self
    }

    /// The precision of the student's training steps ([`Precision`]): `Bf16` runs each
    /// training step's forward and backward pass in bf16 on f32 weights (burn-train's
    /// optimizer updates those). `F16` is refused here: its loss scaling needs the optimizer
    /// step, which burn-train's Learner owns (the [`Distiller`](crate::Distiller) has it).
    /// Validation runs in f32.
    pub fn precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The model.
    ///
    /// # Errors
    /// [`TrainError::Config`] without an objective, with `summed_batches` 0, with f16
    /// precision, or with feature
    /// terms but no device for their connectors; [`TrainError::MissingTeacher`] for an objective
    /// that needs a teacher and has none.
    pub fn build(self) -> Result<DistillModel<M, B, D>> {
        let objective = self
            .objective
            .ok_or_else(|| TrainError::Config("a DistillModel needs an objective".into()))?;
        if objective.needs_teacher() && self.teacher.is_none() {
            return Err(TrainError::MissingTeacher {
                objective: format!("the objective `{}`", objective.name()),
            });
        }
        if self.summed_batches == 0 {
            return Err(TrainError::Config("summed_batches must be at least 1".into()));
        }
        if matches!(self.precision, Precision::F16(_)) {
            return Err(TrainError::Config(
                "f16 precision needs loss scaling, which the Learner's optimizer step cannot do; \
                 use Precision::Bf16 here, or the Distiller for f16"
                    .into(),
            ));
        }
        let eval_teacher = self
            .eval_teacher
            .or_else(|| self.teacher.clone().filter(|teacher| !teacher.needs_indices()));
        let eval_objective: SharedObjective = if objective.needs_teacher() && eval_teacher.is_none() {
            Arc::new(BuiltinObjective::new(&ObjectiveConfig::Supervised {
                label_smoothing: 0.0,
            })?)
        } else {
            objective.clone()
        };
        // Its evaluation runs the objective's teacher only: feature terms need a teacher objective.
        if !self.features.is_empty() && !objective.needs_teacher() {
            return Err(TrainError::Config("feature losses need a teacher objective".into()));
        }
        if !self.features.is_empty() && self.teacher.is_none() {
            return Err(TrainError::MissingTeacher {
                objective: "the feature terms".into(),
            });
        }
        for term in &self.features {
            term.validate()?;
        }
        if self
            .features
            .iter()
            .any(|term| matches!(term.kind, FeatureKind::Crd(_)))
        {
            return Err(TrainError::Config(
                "a CRD feature term moves its memory banks after each optimizer step, which burn-train's \
                 Learner does not let a model do; train it with the Distiller"
                    .into(),
            ));
        }
        let connectors = match (&self.device, self.features.is_empty()) {
            (_, true) => Vec::new(),
            (Some(device), false) => self
                .features
                .iter()
                .filter_map(|term| term.connector.as_ref().map(|connector| connector.init(device)))
                .collect(),
            (None, false) => {
                return Err(TrainError::Config(
                    "feature terms need a device for their connectors".into(),
                ));
            }
        };
        Ok(DistillModel {
            trainee: Trainee {
                student: self.student,
                connectors,
                contrast: Vec::new(),
            },
            plan: Plan {
                inner: Arc::new(PlanInner {
                    teacher: self.teacher,
                    eval_teacher,
                    objective,
                    eval_objective,
                    terms: LossTerms::from_features(&self.features),
                    summed_batches: self.summed_batches,
                    precision: self.precision,
                }),
                batch: PhantomData,
            },
        })
    }
}

impl<M, B, const D: usize> DistillModel<M, B, D>
where
    M: Student<B::Input, D>,
    B: Batch,
    B::Input: TeacherInput,
{
    /// The batch's loss; `cast` is the trainee with its weights cast for a mixed-precision
    /// training step.
    fn loss(&self, batch: &B, training: bool, cast: Option<&Trainee<M>>) -> (BatchLoss, DistillOutput) {
        let plan = &self.plan.inner;
        let targets = batch.targets();
        let (mask, valid) = valid_positions(&targets);
        let summed = if training { plan.summed_batches } else { 1 };
        let counts = StepCounts {
            positions: (valid * summed).max(1),
            examples: (batch.size() * summed).max(1),
        };
        let (teacher, objective) = if training {
            (plan.teacher.as_ref(), &plan.objective)
        } else {
            let teacher = plan
                .eval_teacher
                .as_ref()
                .filter(|_| plan.eval_objective.needs_teacher());
            (teacher, &plan.eval_objective)
        };
        let teacher = teacher.map(|teacher| teacher.as_ref() as &dyn Teacher<B::Input, D>);
        // burn-train's steps cannot return an error: a failure (a teacher whose server went
        // away, a loss refusing its inputs) panics with the error's message, which MultiDevice
        // and DDP report as the worker's failure.
        let forward_dtype = if cast.is_some() {
            plan.precision.forward_dtype()
        } else {
            None
        };
        let loss = batch_loss(
            cast.unwrap_or(&self.trainee),
            forward_dtype,
            teacher,
            objective.as_ref(),
            &plan.terms,
            batch,
            mask,
            counts,
            false,
            true,
            0,
            None,
        )
        .unwrap_or_else(|err| panic!("distillation step failed: {err}"));
        let scale = summed as f64;
        let unscale = |term: &Option<Tensor<1>>| term.as_ref().map(|t| t.clone().mul_scalar(scale));
        let output = DistillOutput {
            loss: loss.total.clone().mul_scalar(scale),
            hard: unscale(&loss.hard),
            soft: unscale(&loss.soft),
            features: unscale(&loss.features),
            correct: loss.correct.clone(),
            positions: valid,
        };
        (loss, output)
    }
}

impl<M, B, const D: usize> TrainStep for DistillModel<M, B, D>
where
    M: Student<B::Input, D> + Module + ModuleDisplay,
    B: Batch + Clone + fmt::Debug + Send + 'static,
    B::Input: TeacherInput,
{
    type Input = B;
    type Output = DistillOutput;

    fn step(&self, batch: B) -> TrainOutput<DistillOutput> {
        // Mixed precision: the weights cast inside this step's graph; the gradients reach
        // the f32 weights, which burn-train's optimizer updates.
        let cast = self
            .plan
            .inner
            .precision
            .forward_dtype()
            .map(|dtype| self.trainee.clone().with_student_in(dtype));
        let (loss, output) = self.loss(&batch, true, cast.as_ref());
        TrainOutput::new(self, loss.total.backward(), output)
    }
}

impl<M, B, const D: usize> InferenceStep for DistillModel<M, B, D>
where
    M: Student<B::Input, D>,
    B: Batch + Clone + fmt::Debug + Send + 'static,
    B::Input: TeacherInput,
{
    type Input = B;
    type Output = DistillOutput;

    fn step(&self, batch: B) -> DistillOutput {
        self.loss(&batch, false, None).1
    }
}

/// One batch's results, as burn-train's metrics read them: the loss and its parts (each a
/// mean over the batch's valid positions) and the number of positions the student predicts
/// right. No logits: a language model's `[batch, seq, vocab]` never leaves the step.
#[derive(Debug, Clone)]
pub struct DistillOutput {
    /// The loss (objective plus feature terms).
    pub loss: Tensor<1>,
    /// The objective's hard-label (cross-entropy) part, when it has one.
    pub hard: Option<Tensor<1>>,
    /// The objective's teacher (soft) part, when it has one.
    pub soft: Option<Tensor<1>>,
    /// The feature terms, when there are some.
    pub features: Option<Tensor<1>>,
    /// How many valid positions the student's argmax gets right (`None` when the loss ran
    /// from hidden states and the logits never existed).
    pub correct: Option<Tensor<1, Int>>,
    /// The batch's valid positions (examples, or target tokens).
    pub positions: usize,
}

impl ItemLazy for DistillOutput {
    fn sync(self) -> std::result::Result<Self, burn::tensor::ExecutionError> {
        self.loss.device().flush()?;
        let strip = |t: Option<Tensor<1>>| t.map(Tensor::without_autodiff);
        Ok(Self {
            loss: self.loss.without_autodiff(),
            hard: strip(self.hard),
            soft: strip(self.soft),
            features: strip(self.features),
            correct: self.correct.map(Tensor::without_autodiff),
            positions: self.positions,
        })
    }
}

impl Adaptor<LossInput> for DistillOutput {
    fn adapt(&self) -> LossInput {
        LossInput::new(self.loss.clone())
    }
}

impl Adaptor<DistillOutput> for DistillOutput {
    fn adapt(&self) -> DistillOutput {
        self.clone()
    }
}

/// What a [`DistillMetric`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Soft,
    Hard,
    Features,
    Accuracy,
}

/// The parts of a distillation loss and the student's accuracy as burn-train metrics, for its
/// dashboard and logs: `DistillMetric::soft()`, `hard()`, `features()`, `accuracy()`.
/// burn-train's own `LossMetric` reads the total. Each is weighted by the batches' valid
/// positions, so a language model's epoch value is a mean over tokens.
#[derive(Clone)]
pub struct DistillMetric {
    part: Part,
    name: MetricName,
    state: NumericMetricState,
}

impl DistillMetric {
    fn new(part: Part, name: &str) -> Self {
        Self {
            part,
            name: Arc::new(name.to_string()),
            state: NumericMetricState::default(),
        }
    }

    /// The objective's teacher term ("Soft loss").
    pub fn soft() -> Self {
        Self::new(Part::Soft, "Soft loss")
    }

    /// The objective's label term ("Hard loss").
    pub fn hard() -> Self {
        Self::new(Part::Hard, "Hard loss")
    }

    /// The feature terms ("Feature loss").
    pub fn features() -> Self {
        Self::new(Part::Features, "Feature loss")
    }

    /// The share of valid positions whose argmax is the label, in percent ("Accuracy").
    pub fn accuracy() -> Self {
        Self::new(Part::Accuracy, "Accuracy")
    }
}

impl Metric for DistillMetric {
    type Input = DistillOutput;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(
        &mut self,
        item: &DistillOutput,
        _metadata: &MetricMetadata,
    ) -> std::result::Result<SerializedEntry, TensorReadError> {
        let value = match self.part {
            Part::Soft => item.soft.clone(),
            Part::Hard => item.hard.clone(),
            Part::Features => item.features.clone(),
            Part::Accuracy => None,
        };
        let value = match (self.part, value) {
            (Part::Accuracy, _) => match &item.correct {
                Some(correct) => {
                    let correct = correct.clone().try_into_scalar::<i64>()? as f64;
                    Some(100.0 * correct / item.positions.max(1) as f64)
                }
                None => None,
            },
            (_, Some(value)) => Some(value.try_into_scalar::<f64>()?),
            (_, None) => None,
        };
        if let Some(value) = value {
            self.state.update(value, item.positions.max(1));
        }
        Ok(self.state.compute_update(self.format()))
    }

    fn compute(&mut self) -> std::result::Result<SerializedEntry, TensorReadError> {
        Ok(self.state.compute_final(self.format()))
    }

    fn clear(&mut self) {
        self.state.reset();
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: (self.part == Part::Accuracy).then(|| "%".to_string()),
            higher_is_better: self.part == Part::Accuracy,
        }
        .into()
    }
}

impl DistillMetric {
    fn format(&self) -> FormatOptions {
        let options = FormatOptions::new(self.name.clone()).precision(if self.part == Part::Accuracy { 2 } else { 4 });
        if self.part == Part::Accuracy {
            options.unit("%")
        } else {
            options
        }
    }
}

impl Numeric for DistillMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(self.state.current_value())
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(self.state.running_value())
    }

    fn final_value(&self) -> NumericEntry {
        self.state.final_value()
    }
}
