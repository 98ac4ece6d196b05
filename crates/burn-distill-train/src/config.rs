//! The serializable description of a training run.

use burn::config::Config;
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, SgdConfig};
use burn_distill_loss::{
    CrdLossConfig, DistLossConfig, DivergenceLossConfig, DkdLossConfig, HintonKdLossConfig, SparseKlLossConfig,
};
use burn_distill_model::{ConnectorConfig, SamplingConfig};
use serde::{Deserialize, Serialize};

use crate::constraint::MaxNormConfig;
use crate::error::TrainError;
use crate::objective::{BuiltinObjective, Objective};

/// A whole run: data order, optimisation, objective, evaluation and checkpoints. Saved as
/// `config.json` in the run directory; [`Distiller::resume`](crate::Distiller::resume) reads it
/// back.
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `epochs` | | passes over the training set | ≥ 1 |
/// | `batch_size` | 128 | examples per micro-batch | ≥ 1 |
/// | `accumulation` | 1 | micro-batches per optimizer step; the step's gradient equals the gradient of one batch `accumulation` times larger | ≥ 1 |
/// | `seed` | 0 | data order, augmentation, dropout | |
/// | `optimizer` | | burn's SGD (momentum, weight decay, clipping), Adam or AdamW | |
/// | `schedule` | | burn's learning-rate schedule, stepped once per optimizer step (warm-up: `Sequential` of `Linear` and another) | |
/// | `objective` | | what the student learns from | |
/// | `features` | none | feature (hint) losses on named taps | |
/// | `early_stopping` | none | stop when a validation metric stops improving | |
/// | `eval_batch_size` | 500 | examples per evaluation batch | ≥ 1 |
/// | `keep_checkpoints` | 2 | epoch checkpoints kept (plus the best) | ≥ 1 |
/// | `max_norm` | none | after each step, scale each chosen `Linear` unit's incoming weights to an L2 norm ≤ `max_norm` ([`MaxNormConfig`](crate::MaxNormConfig); Srivastava et al. 2014) | |
/// | `on_policy` | none | GKD: the student writes some of the sequences it is scored on ([`Distiller::fit_on_policy`](crate::Distiller::fit_on_policy)) | |
/// | `precision` | `F32` | the student's forward and backward pass in f32, or mixed precision in bf16 or f16 (f32 master weights, f32 loss; [`Precision`]) | |
///
/// Targets equal to [`IGNORE_INDEX`] (padding, prompts) are left out of every term and of the
/// normalisation: losses are means over the valid positions of the step.
#[derive(Config, Debug)]
pub struct DistillConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// burn optimizer.
    pub optimizer: OptimizerConfig,
    /// burn learning-rate schedule.
    pub schedule: LrSchedulerConfig,
    /// The training objective.
    pub objective: ObjectiveConfig,
    /// Examples per micro-batch.
    #[config(default = 128)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[config(default = 1)]
    pub accumulation: usize,
    /// Seed of data order, augmentation and dropout.
    #[config(default = 0)]
    pub seed: u64,
    /// Feature (hint) losses.
    #[config(default = "Vec::new()")]
    pub features: Vec<FeatureTermConfig>,
    /// Early stopping.
    #[config(default = "None")]
    pub early_stopping: Option<EarlyStoppingConfig>,
    /// Examples per evaluation batch.
    #[config(default = 500)]
    pub eval_batch_size: usize,
    /// Epoch checkpoints kept on disk (the best one is kept as well).
    #[config(default = 2)]
    pub keep_checkpoints: usize,
    /// On-policy distillation (language models only).
    #[config(default = "None")]
    pub on_policy: Option<OnPolicyConfig>,
    /// Max-norm constraint: after every optimizer step, each column of the student's chosen
    /// rank-2 `weight` parameters (a `Linear` unit's incoming weights) is scaled to an L2 norm
    /// of at most `max_norm` ([`apply_max_norm`](crate::apply_max_norm)). Connectors are not
    /// constrained.
    #[config(default = "None")]
    pub max_norm: Option<MaxNormConfig>,
    /// The precision of the student's forward and backward pass ([`Precision`]).
    #[config(default = "Precision::F32")]
    pub precision: Precision,
}

pub use burn_distill_data::IGNORE_INDEX;

/// The precision a student trains in.
///
/// Mixed precision keeps the weights in f32 (the optimizer updates those) and casts them to
/// the half precision inside each step's graph: the forward and backward passes run in it, the
/// gradients reach the f32 weights through the casts as f32, and the loss is f32 (the fused
/// losses read half-precision logits and sum in f32). The batch's float inputs are cast too;
/// the teacher is untouched (give it a half-precision model for a half-precision teacher).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 forward and backward. bf16 has f32's range: no loss scaling.
    Bf16,
    /// f16 forward and backward, with dynamic loss scaling: gradients small enough to flush to
    /// zero in f16 are kept by scaling the loss before the backward pass and the gradients
    /// back after it.
    F16(LossScaleConfig),
}

/// Dynamic loss scaling for f16 (Micikevicius et al., 2018, "Mixed Precision Training"): the
/// loss is multiplied by the scale before the backward pass and the f32 gradients divided by
/// it. A step whose gradients overflow (inf or NaN) is skipped and the scale halved; after
/// `growth_interval` steps in a row without overflow it doubles. The scale is saved in every
/// checkpoint, so a resumed run goes on with it.
#[derive(Config, Debug, PartialEq)]
pub struct LossScaleConfig {
    /// The first scale (2^16).
    #[config(default = 65536.0)]
    pub initial: f64,
    /// Steps without overflow before the scale doubles.
    #[config(default = 2000)]
    pub growth_interval: usize,
}

impl Copy for LossScaleConfig {}

impl Precision {
    /// The half precision the student runs in, `None` for f32.
    pub fn forward_dtype(&self) -> Option<burn::tensor::FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(burn::tensor::FloatDType::BF16),
            Precision::F16(_) => Some(burn::tensor::FloatDType::F16),
        }
    }
}

/// Generalised knowledge distillation (Agarwal et al., 2024, "On-Policy Distillation of Language
/// Models"): for each micro-batch, with probability `lambda`, the batch's sequences are
/// replaced by the student's own continuations of their first `prompt_tokens` tokens, and the
/// teacher scores those token by token; otherwise the data sequences are used unchanged.
///
/// In a rolled-out batch only the generated positions count (the prompt's targets are
/// [`IGNORE_INDEX`]). The coin and the sampling seed are functions of `(seed, global step,
/// micro-batch)`, so a resumed run draws the same rollouts. The objective should be a divergence to the teacher
/// (`ObjectiveConfig::Divergence` with `hard_weight` 0: the rolled-out tokens are not labels).
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `lambda` | 0.5 | share of steps trained on student-generated sequences | `[0, 1]` |
/// | `prompt_tokens` | 16 | tokens of each data sequence kept as the prompt | ≥ 1, < sequence length |
/// | `sampling` | temperature 1 | how the student samples (its `seed` is mixed with the step) | |
/// | `chat_prompts` | false | each row's prompt is its tokens up to its first counted target (a chat transcript's conversation); `prompt_tokens` is then unused | |
/// | `stop_tokens` | none | tokens that end a student answer (EOS; kept as a target) | |
#[derive(Config, Debug)]
pub struct OnPolicyConfig {
    /// Probability that a step uses student-generated sequences.
    #[config(default = 0.5)]
    pub lambda: f64,
    /// Tokens of the data sequence kept as the prompt.
    #[config(default = 16)]
    pub prompt_tokens: usize,
    /// Student sampling.
    #[config(default = "SamplingConfig::new()")]
    pub sampling: SamplingConfig,
    /// Each row's prompt is its own: its tokens up to its first counted target.
    #[config(default = false)]
    pub chat_prompts: bool,
    /// Tokens that end a student's answer.
    #[config(default = "Vec::new()")]
    pub stop_tokens: Vec<u32>,
}

impl DistillConfig {
    /// Checks every field once, before any work.
    ///
    /// # Errors
    /// [`TrainError::Config`] naming the field and the accepted range.
    pub fn validate(&self) -> Result<(), TrainError> {
        let positive = [
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("accumulation", self.accumulation),
            ("eval_batch_size", self.eval_batch_size),
            ("keep_checkpoints", self.keep_checkpoints),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(TrainError::Config(format!("{name} must be at least 1")));
            }
        }
        for term in &self.features {
            term.validate()?;
        }
        for (index, term) in self.features.iter().enumerate() {
            if !(term.weight.is_finite() && term.weight >= 0.0) {
                return Err(TrainError::Config(format!(
                    "features[{index}].weight = {} must be finite and >= 0",
                    term.weight
                )));
            }
        }
        if let Some(max_norm) = self.max_norm.as_ref().map(|config| config.max_norm)
            && !(max_norm.is_finite() && max_norm > 0.0)
        {
            return Err(TrainError::Config(format!(
                "max_norm = {max_norm} must be finite and > 0"
            )));
        }
        if let ObjectiveConfig::Supervised { label_smoothing } = self.objective
            && !(0.0..1.0).contains(&label_smoothing)
        {
            return Err(TrainError::Config(format!(
                "label_smoothing = {label_smoothing} must be in [0, 1)"
            )));
        }
        if let ObjectiveConfig::Divergence { hard_weight, .. } = self.objective
            && !(hard_weight.is_finite() && hard_weight >= 0.0)
        {
            return Err(TrainError::Config(format!(
                "hard_weight = {hard_weight} must be finite and >= 0"
            )));
        }
        if let ObjectiveConfig::Sparse { hard_weight, .. } | ObjectiveConfig::Dist { hard_weight, .. } = self.objective
            && !(hard_weight.is_finite() && hard_weight >= 0.0)
        {
            return Err(TrainError::Config(format!(
                "hard_weight = {hard_weight} must be finite and >= 0"
            )));
        }
        let ignore = match &self.objective {
            ObjectiveConfig::Hinton(config) => Some(config.ignore_index),
            ObjectiveConfig::Dkd(config) => Some(config.ignore_index),
            _ => None,
        };
        if let Some(ignore) = ignore
            && ignore != IGNORE_INDEX
        {
            return Err(TrainError::Config(format!(
                "the objective's ignore_index is {ignore}; the training loop marks padding with IGNORE_INDEX = {IGNORE_INDEX}"
            )));
        }
        if let Some(on_policy) = &self.on_policy {
            if !(0.0..=1.0).contains(&on_policy.lambda) {
                return Err(TrainError::Config(format!(
                    "on_policy.lambda = {} must be in [0, 1]",
                    on_policy.lambda
                )));
            }
            if on_policy.prompt_tokens == 0 {
                return Err(TrainError::Config("on_policy.prompt_tokens must be at least 1".into()));
            }
            let t = on_policy.sampling.temperature;
            let k_ok = on_policy.sampling.top_k != Some(0);
            let p_ok = on_policy.sampling.top_p.is_none_or(|p| p > 0.0 && p <= 1.0);
            if !(t.is_finite() && t >= 0.0 && k_ok && p_ok) {
                return Err(TrainError::Config(format!(
                    "on_policy.sampling: temperature {t} must be finite and >= 0, top_k >= 1, top_p in (0, 1]"
                )));
            }
        }
        match &self.objective {
            ObjectiveConfig::Custom { name } => {
                if name.trim().is_empty() {
                    return Err(TrainError::Config("a custom objective needs a name".into()));
                }
                // Its teacher needs are checked when `fit` is given the objective.
                Ok(())
            }
            // The objective's own loss settings (temperature, α, β, k, ...), as `fit` will build
            // them: a pipeline that validates its configs up front hears of a bad one before any
            // training.
            builtin => self.check_objective(&BuiltinObjective::new(builtin)?),
        }
    }

    /// The checks that depend on the objective itself: what needs a teacher objective (feature
    /// terms need a teacher, not a teacher objective: CE plus a feature term is how the feature
    /// methods are trained), and that
    /// a custom objective is the one the config names.
    pub(crate) fn check_objective(&self, objective: &dyn Objective) -> Result<(), TrainError> {
        if let ObjectiveConfig::Custom { name } = &self.objective
            && name != objective.name()
        {
            return Err(TrainError::Config(format!(
                "the config names the custom objective `{name}`, the distiller was given `{}`",
                objective.name()
            )));
        }
        if self.on_policy.is_some() && !objective.needs_teacher() {
            return Err(TrainError::Config(
                "on-policy distillation needs a teacher objective".into(),
            ));
        }
        Ok(())
    }
}

/// One of burn's optimizers, with its own weight decay and gradient clipping settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OptimizerConfig {
    /// Stochastic gradient descent (momentum and Nesterov optional).
    Sgd(SgdConfig),
    /// Adam.
    Adam(AdamConfig),
    /// AdamW (decoupled weight decay).
    AdamW(AdamWConfig),
}

impl OptimizerConfig {
    /// The optimizer.
    pub fn init(&self) -> ModuleOptimizer {
        match self {
            Self::Sgd(config) => config.init(),
            Self::Adam(config) => config.init(),
            Self::AdamW(config) => config.init(),
        }
    }
}

/// What the student is trained to match.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ObjectiveConfig {
    /// Cross-entropy on the labels, no teacher: baselines, and teachers themselves.
    Supervised {
        /// Label smoothing ε: the target puts 1 − ε on the label and ε uniformly on all classes.
        label_smoothing: f64,
    },
    /// Hinton et al.'s loss: `α · CE(labels) + (1 − α) · T² · KL(p_T ‖ q_T)`.
    Hinton(HintonKdLossConfig),
    /// Decoupled KD (target-class and non-target-class terms) plus cross-entropy with weight 1,
    /// as Zhao et al. (2022) train.
    Dkd(DkdLossConfig),
    /// DIST (Huang et al., 2022): inter- and intra-class Pearson correlation of the
    /// predictions, plus `hard_weight` × cross-entropy (the paper: 1). Padding positions are
    /// left out; each micro-batch's value is weighted by its share of the step's positions.
    Dist {
        /// β, γ and τ.
        loss: DistLossConfig,
        /// Weight of the cross-entropy term.
        hard_weight: f64,
    },
    /// Any divergence to the teacher, plus `hard_weight` × cross-entropy on the labels.
    Divergence {
        /// The divergence, its temperature and scaling.
        loss: DivergenceLossConfig,
        /// Weight of the cross-entropy term (0: teacher only).
        hard_weight: f64,
    },
    /// Forward KL to a sparse (top-k) teacher, as stored in a top-k teacher-output cache
    /// (`CachedTeacher`), plus `hard_weight` × cross-entropy. The teacher must provide top-k
    /// outputs (`TeacherOutput::top_k`); a dense teacher is an error.
    Sparse {
        /// The sparse loss: temperature, tail policy, scaling.
        loss: SparseKlLossConfig,
        /// Weight of the cross-entropy term (0: teacher only).
        hard_weight: f64,
    },
    /// On-policy distillation from the teacher's log-probability of each token the student
    /// sampled (Agarwal et al., 2024; "on-policy distillation" as practised in 2025): the
    /// per-token reverse KL `log q(y) − log p(y)` is the (negative) reward of token `y`, and the
    /// loss is its policy gradient `Σ sg(log q(y) − log p(y)) · log q(y)`. Its logged value is
    /// the per-token reverse-KL estimate. Train with `fit_on_policy` and λ = 1, so that the
    /// targets are the student's own tokens.
    SampledReverseKl,
    /// An [`Objective`] defined outside this crate, given to
    /// [`Distiller::with_objective`](crate::Distiller::with_objective); the config records its
    /// [`name`](Objective::name), and `fit` refuses an objective of another name.
    Custom {
        /// The objective's name.
        name: String,
    },
}

impl ObjectiveConfig {
    /// Whether the objective uses a teacher (for [`Custom`](Self::Custom), assumed: the objective
    /// given to the distiller says).
    pub fn needs_teacher(&self) -> bool {
        !matches!(self, Self::Supervised { .. })
    }
}

/// A feature term: `weight ×` a loss between a student tap (through an optional trained
/// connector) and a teacher tap; which loss, [`FeatureKind`] says (the FitNets MSE hint by
/// default).
///
/// Terms that compare positions (MSE, cosine) leave out padding positions of `[batch, seq,
/// width]` features (the positions whose target is `IGNORE_INDEX`) and divide by the valid
/// positions of the whole optimizer step; CKA on such features takes the valid positions as
/// its examples. Relational terms are a function of a batch, so each micro-batch's value is
/// weighted by its share of the step's examples (positions, for sequence CKA).
#[derive(Config, Debug)]
pub struct FeatureTermConfig {
    /// The student's tap.
    pub student_tap: String,
    /// The teacher's tap.
    pub teacher_tap: String,
    /// Weight of the term.
    #[config(default = 1.0)]
    pub weight: f64,
    /// A connector trained with the student, mapping its feature to the teacher's width.
    #[config(default = "None")]
    pub connector: Option<ConnectorConfig>,
    /// The loss between the two features.
    #[config(default = "FeatureKind::Mse")]
    pub kind: FeatureKind,
}

impl FeatureTermConfig {
    /// Checks the weight and the kind's settings (before any training).
    ///
    /// # Errors
    /// [`TrainError::Config`] naming the term and the setting.
    pub fn validate(&self) -> Result<(), TrainError> {
        let name = format!("feature term {} → {}", self.student_tap, self.teacher_tap);
        let bad = |what: String| Err(TrainError::Config(format!("{name}: {what}")));
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return bad(format!("weight = {} must be finite and >= 0", self.weight));
        }
        match &self.kind {
            FeatureKind::AttentionTransfer { p } if !(p.is_finite() && *p >= 1.0) => {
                bad(format!("attention transfer's p = {p} must be finite and >= 1"))
            }
            FeatureKind::Rkd {
                distance_weight,
                angle_weight,
            } if !(distance_weight.is_finite()
                && *distance_weight >= 0.0
                && angle_weight.is_finite()
                && *angle_weight >= 0.0) =>
            {
                bad(format!(
                    "RKD's weights ({distance_weight}, {angle_weight}) must be finite and >= 0"
                ))
            }
            FeatureKind::Crd(config) => config.check().or_else(|error| bad(format!("CRD: {error}"))),
            _ => Ok(()),
        }
    }
}

/// The loss of a [`FeatureTermConfig`].
///
/// | Kind | Taps | Widths | Loss (burn-distill-loss) |
/// |---|---|---|---|
/// | `Mse` | any | equal (a connector maps them) | FitNets' hint; [`HiddenStateLoss`](burn_distill_loss::HiddenStateLoss) for vectors and sequences |
/// | `Cosine` | vectors, sequences | equal | `1 − cos` per example or position |
/// | `Cka` | any (sequences: positions are the examples) | any | [`CkaLoss`](burn_distill_loss::CkaLoss) |
/// | `AttentionTransfer` | maps, same spatial size | any channels | [`AttentionTransferLoss`](burn_distill_loss::AttentionTransferLoss) |
/// | `Rkd` | vectors, maps | any | [`RkdLoss`](burn_distill_loss::RkdLoss) |
/// | `Pkt` | vectors, maps | any | [`PktLoss`](burn_distill_loss::PktLoss) |
/// | `Sp` | vectors, maps | any | [`SpLoss`](burn_distill_loss::SpLoss) |
/// | `Crd` | vectors, maps | any | [`CrdLoss`](burn_distill_loss::CrdLoss): its embeddings train with the student, its memory banks are saved in every checkpoint; `examples` must be the training set's size (Distiller only) |
///
/// The example-relation kinds (RKD, PKT, SP, CRD) refuse `[batch, seq, width]` taps: their
/// examples would be whole padded sequences, whose length changes from batch to batch. A
/// micro-batch smaller than a relational loss needs (RKD and biased CKA 2 examples, debiased CKA
/// 4; for sequence CKA, kept positions) adds nothing to the term: a data set's last, short
/// batch does not stop a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub enum FeatureKind {
    /// Mean squared error (FitNets).
    #[default]
    Mse,
    /// One minus the cosine similarity.
    Cosine,
    /// One minus linear CKA.
    Cka {
        /// The unbiased HSIC estimator (needs 4 examples per micro-batch).
        debiased: bool,
    },
    /// Attention transfer with exponent `p`.
    AttentionTransfer {
        /// Exponent of the activations (2 in the paper).
        p: f64,
    },
    /// Relational KD: distance and angle terms.
    Rkd {
        /// Weight of the distance term.
        distance_weight: f64,
        /// Weight of the angle term.
        angle_weight: f64,
    },
    /// Probabilistic knowledge transfer.
    Pkt,
    /// Similarity-preserving KD.
    Sp,
    /// Contrastive representation distillation.
    Crd(CrdLossConfig),
}

/// A validation metric to watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Validation loss (cross-entropy on labels); lower is better.
    Loss,
    /// Validation accuracy; higher is better.
    Accuracy,
    /// Mean KL(teacher ‖ student); lower is better.
    TeacherKl,
}

/// Stop when `metric` has not improved by more than `min_delta` for `patience` epochs.
#[derive(Config, Debug)]
pub struct EarlyStoppingConfig {
    /// What to watch.
    pub metric: Metric,
    /// Epochs without improvement before stopping.
    pub patience: usize,
    /// Smallest change that counts as an improvement.
    #[config(default = 0.0)]
    pub min_delta: f64,
}
