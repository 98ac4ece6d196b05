//! Training objectives: the open [`Objective`] trait, the built-ins behind [`ObjectiveConfig`],
//! (the feature terms are in `features.rs`).

use burn::tensor::{Bool, Int, Tensor, TensorData, activation};
use burn_distill_loss::{
    DistLoss, DivergenceLoss, DkdLoss, HeadTeacher, HintonKdLoss, Implementation, LinearHeadKdConfig, Reduction,
    SparseKlLoss, fused_available_for, kept_positions,
};

use crate::config::{IGNORE_INDEX, ObjectiveConfig};
use crate::error::{Result, TrainError};

/// What a training objective minimises, given the student's and the teacher's logits of one
/// micro-batch.
///
/// The built-ins ([`BuiltinObjective`], made from an [`ObjectiveConfig`]) implement it; so can a
/// type outside this crate. Give one to [`Distiller::with_objective`](crate::Distiller::with_objective)
/// with [`ObjectiveConfig::Custom`] naming it in the run's config, so that `config.json` says what
/// was trained and a resume can check it is given the same objective.
///
/// The loss must be a sum over the valid positions divided by [`ObjectiveInput::normaliser`] (the
/// valid positions of the whole optimizer step), so that accumulating micro-batches gives the
/// big batch's mean; [`ObjectiveInput::cross_entropy`] and [`ObjectiveInput::reduction`] do this.
///
/// ```
/// use burn_distill_train::{Objective, ObjectiveInput, ObjectiveLoss, Result};
///
/// /// Ba & Caruana (2014): regress the student's logits on the teacher's.
/// struct LogitMatching;
///
/// impl Objective for LogitMatching {
///     fn name(&self) -> &str {
///         "logit_matching"
///     }
///     fn needs_teacher(&self) -> bool {
///         true
///     }
///     fn loss(&self, input: ObjectiveInput) -> Result<ObjectiveLoss> {
///         let teacher = input.teacher()?.dense.clone();
///         let squared = (input.student.clone() - teacher).powi_scalar(2).sum_dim(1).squeeze_dim::<1>(1);
///         let soft = input.sum_over_valid(squared);
///         Ok(ObjectiveLoss::soft(soft))
///     }
/// }
/// ```
pub trait Objective {
    /// The name [`ObjectiveConfig::Custom`] records.
    fn name(&self) -> &str;

    /// Whether the objective reads the teacher (the distiller then requires one).
    fn needs_teacher(&self) -> bool;

    /// Whether the objective takes a student's hidden states and head weight
    /// ([`ObjectiveInput::head`]) in place of its logits. The distiller then asks students that
    /// can give them ([`Student::learn_hidden`](burn_distill_model::Student::learn_hidden): the
    /// language models) for those, and the loss runs through the chunked `LinearHeadKd`, with
    /// no `[positions, vocab]` logits. `false` (the default): [`ObjectiveInput::student`] is
    /// always the logits.
    fn takes_head(&self) -> bool {
        false
    }

    /// The loss of one micro-batch.
    ///
    /// # Errors
    /// Whatever the objective finds wrong with its inputs (the built-ins: the losses' own input
    /// checks on the first micro-batch, a teacher without the top-k outputs it needs).
    fn loss(&self, input: ObjectiveInput) -> Result<ObjectiveLoss>;
}

/// One micro-batch as an [`Objective`] sees it, flattened to positions.
#[derive(Debug, Clone)]
pub struct ObjectiveInput {
    /// The student's logits, `[n, classes]`, tracked by autodiff; when [`head`](Self::head) is
    /// set (only for objectives that [take it](Objective::takes_head)), its last hidden states
    /// `[n, width]` instead.
    pub student: Tensor<2>,
    /// The student's head weight `[classes, width]`: the logits are `student · headᵀ`, left to a
    /// chunked loss. `None`: `student` holds the logits.
    pub head: Option<Tensor<2>>,
    /// The teacher's side, when the run has a teacher.
    pub teacher: Option<TeacherLogits>,
    /// `[n]` targets, [`IGNORE_INDEX`] where a position does not count.
    pub targets: Tensor<1, Int>,
    /// `targets != IGNORE_INDEX`, or `None` when every position is valid.
    pub mask: Option<Tensor<1, Bool>>,
    /// Valid positions in the whole optimizer step: what sums are divided by.
    pub normaliser: usize,
    /// `true` for the run's first micro-batch: validate the inputs then (the built-ins turn the
    /// losses' shape and finiteness checks on for it and off after it).
    pub check_inputs: bool,
}

impl ObjectiveInput {
    /// The teacher's logits, or an error saying the objective needs a teacher.
    ///
    /// # Errors
    /// [`TrainError::Config`] when the run has no teacher.
    pub fn teacher(&self) -> Result<&TeacherLogits> {
        self.teacher.as_ref().ok_or_else(|| TrainError::MissingTeacher {
            objective: "an objective reading the teacher's logits".into(),
        })
    }

    /// The student's logits, `[n, classes]`: [`student`](Self::student), or its product with
    /// the head when the input holds hidden states (then formed whole).
    pub fn logits(&self) -> Tensor<2> {
        match &self.head {
            Some(head) => self.student.clone().matmul(head.clone().transpose()),
            None => self.student.clone(),
        }
    }

    /// The reduction that divides a loss's sum by [`normaliser`](Self::normaliser), for
    /// `burn-distill-loss` calls.
    pub fn reduction(&self) -> Reduction {
        Reduction::SumOver(self.normaliser.max(1))
    }

    /// `per_position` (`[n]`) summed over the valid positions, divided by the normaliser.
    pub fn sum_over_valid(&self, per_position: Tensor<1>) -> Tensor<1> {
        let total = match &self.mask {
            Some(mask) => per_position.mask_fill(mask.clone().bool_not(), 0.0).sum(),
            None => per_position.sum(),
        };
        total.div_scalar(self.normaliser.max(1) as f64)
    }

    /// Cross-entropy of the student with the targets, label smoothing `smoothing`, summed over
    /// the valid positions and divided by the normaliser.
    pub fn cross_entropy(&self, smoothing: f64) -> Tensor<1> {
        cross_entropy(
            self.logits(),
            self.targets.clone(),
            self.mask.clone(),
            smoothing,
            self.normaliser,
        )
    }
}

/// The loss of one micro-batch and its parts, each already divided by the step's count of
/// valid positions, so that summing micro-batches gives the big-batch mean.
#[derive(Debug, Clone)]
pub struct ObjectiveLoss {
    /// What is minimised.
    pub total: Tensor<1>,
    /// Cross-entropy with the labels (`None` when the objective has no such term).
    pub hard: Option<Tensor<1>>,
    /// The teacher term (`None` when supervised).
    pub soft: Option<Tensor<1>>,
}

impl ObjectiveLoss {
    /// A teacher term alone.
    pub fn soft(soft: Tensor<1>) -> Self {
        Self {
            total: soft.clone(),
            hard: None,
            soft: Some(soft),
        }
    }

    /// A teacher term plus `weight` × a cross-entropy term; `hard` is not called at weight 0.
    pub fn soft_and_hard(soft: Tensor<1>, weight: f64, hard: impl FnOnce() -> Tensor<1>) -> Self {
        if weight == 0.0 {
            return Self::soft(soft);
        }
        let hard = hard();
        Self {
            total: soft.clone() + hard.clone().mul_scalar(weight),
            hard: Some(hard),
            soft: Some(soft),
        }
    }
}

/// The teacher's side of one micro-batch, flattened to positions.
#[derive(Debug, Clone)]
pub struct TeacherLogits {
    /// `[n, classes]`.
    pub dense: Tensor<2>,
    /// `[n, k]` class ids and log-probabilities, when the teacher gives them (a top-k cache).
    pub top_k: Option<(Tensor<2, Int>, Tensor<2>)>,
}

/// The built-in objectives, made from an [`ObjectiveConfig`].
#[derive(Debug)]
pub struct BuiltinObjective {
    name: &'static str,
    config: ObjectiveConfig,
    /// With the losses' input checks (the first micro-batch) and without.
    checked: Builtin,
    fast: Builtin,
}

#[derive(Debug)]
enum Builtin {
    Supervised { label_smoothing: f64 },
    Hinton(HintonKdLoss),
    Dkd(DkdLoss),
    Dist { loss: DistLoss, hard_weight: f64 },
    Divergence { loss: DivergenceLoss, hard_weight: f64 },
    Sparse { loss: SparseKlLoss, hard_weight: f64 },
    SampledReverseKl,
}

impl BuiltinObjective {
    /// Builds the objective `config` describes.
    ///
    /// # Errors
    /// A loss error for bad loss settings (temperature, α, β, k, ...); [`TrainError::Config`] for
    /// [`ObjectiveConfig::Custom`], which only names an objective given elsewhere.
    pub fn new(config: &ObjectiveConfig) -> Result<Self> {
        let name = match config {
            ObjectiveConfig::Supervised { .. } => "supervised",
            ObjectiveConfig::Hinton(_) => "hinton",
            ObjectiveConfig::Dkd(_) => "dkd",
            ObjectiveConfig::Dist { .. } => "dist",
            ObjectiveConfig::Divergence { .. } => "divergence",
            ObjectiveConfig::Sparse { .. } => "sparse",
            ObjectiveConfig::SampledReverseKl => "sampled_reverse_kl",
            ObjectiveConfig::Custom { name } => {
                return Err(TrainError::Config(format!(
                    "the objective `{name}` is a custom one: give it with Distiller::with_objective"
                )));
            }
        };
        Ok(Self {
            name,
            config: config.clone(),
            checked: Builtin::new(config, true)?,
            fast: Builtin::new(config, false)?,
        })
    }
}

impl Objective for BuiltinObjective {
    fn name(&self) -> &str {
        self.name
    }

    fn needs_teacher(&self) -> bool {
        !matches!(self.fast, Builtin::Supervised { .. })
    }

    /// Every built-in but DKD and label smoothing (which need the whole logits).
    fn takes_head(&self) -> bool {
        match &self.config {
            ObjectiveConfig::Supervised { label_smoothing } => *label_smoothing == 0.0,
            ObjectiveConfig::Hinton(config) => config.label_smoothing == 0.0,
            ObjectiveConfig::Divergence { .. } | ObjectiveConfig::Sparse { .. } | ObjectiveConfig::SampledReverseKl => {
                true
            }
            ObjectiveConfig::Dkd(_) | ObjectiveConfig::Dist { .. } | ObjectiveConfig::Custom { .. } => false,
        }
    }

    fn loss(&self, input: ObjectiveInput) -> Result<ObjectiveLoss> {
        if let Some(head) = input.head.clone() {
            return head_loss(&self.config, input, head);
        }
        let objective = if input.check_inputs { &self.checked } else { &self.fast };
        objective.loss(input)
    }
}

impl Builtin {
    fn new(config: &ObjectiveConfig, check_inputs: bool) -> Result<Self> {
        Ok(match config {
            ObjectiveConfig::Supervised { label_smoothing } => Self::Supervised {
                label_smoothing: *label_smoothing,
            },
            ObjectiveConfig::Hinton(config) => Self::Hinton(config.clone().with_check_inputs(check_inputs).try_init()?),
            ObjectiveConfig::Dkd(config) => Self::Dkd(config.clone().with_check_inputs(check_inputs).try_init()?),
            ObjectiveConfig::Dist { loss, hard_weight } => Self::Dist {
                loss: loss.clone().with_check_inputs(check_inputs).try_init()?,
                hard_weight: *hard_weight,
            },
            ObjectiveConfig::Divergence { loss, hard_weight } => Self::Divergence {
                loss: loss.clone().with_check_inputs(check_inputs).try_init()?,
                hard_weight: *hard_weight,
            },
            ObjectiveConfig::Sparse { loss, hard_weight } => Self::Sparse {
                loss: loss.clone().with_check_inputs(check_inputs).try_init()?,
                hard_weight: *hard_weight,
            },
            ObjectiveConfig::SampledReverseKl => Self::SampledReverseKl,
            ObjectiveConfig::Custom { .. } => unreachable!("BuiltinObjective::new refuses custom objectives"),
        })
    }

    fn loss(&self, input: ObjectiveInput) -> Result<ObjectiveLoss> {
        let reduction = input.reduction();
        Ok(match self {
            Self::Supervised { label_smoothing } => {
                let hard = input.cross_entropy(*label_smoothing);
                ObjectiveLoss {
                    total: hard.clone(),
                    hard: Some(hard),
                    soft: None,
                }
            }
            Self::Hinton(loss) => {
                let teacher = input.teacher()?.dense.clone();
                if !runs_fused(loss, &input.student) {
                    let terms = loss.forward_terms(input.student, teacher, input.targets, reduction)?;
                    return Ok(ObjectiveLoss {
                        total: terms.loss,
                        hard: Some(terms.hard),
                        soft: Some(terms.soft),
                    });
                }
                // The fused kernel gives the loss and its gradient in one sweep, but not the
                // terms: for the record, the cross-entropy of the detached logits, and the
                // teacher term from the two (neither is differentiated).
                // The record's cross-entropy first: the logits then go to the loss with no
                // other handle on them, and the kernel can write their gradient over them.
                let hard = cross_entropy(
                    input.student.clone().detach(),
                    input.targets.clone(),
                    input.mask,
                    loss.label_smoothing,
                    input.normaliser,
                );
                let total = loss.forward(input.student, teacher, input.targets, reduction)?;
                let soft = (total.clone().detach() - hard.clone().mul_scalar(loss.alpha)).div_scalar(1.0 - loss.alpha);
                ObjectiveLoss {
                    total,
                    hard: Some(hard),
                    soft: Some(soft),
                }
            }
            Self::Dkd(loss) => {
                // Zhao et al. (2022) train with cross-entropy plus the decoupled terms.
                let teacher = input.teacher()?.dense.clone();
                let soft = loss.forward(input.student.clone(), teacher, input.targets.clone(), reduction)?;
                ObjectiveLoss::soft_and_hard(soft, 1.0, || input.cross_entropy(0.0))
            }
            Self::Dist { loss, hard_weight } => {
                // A relation over the batch: computed on the valid positions, weighted by their
                // share of the step's, so accumulated micro-batches add up to the step's mean.
                let teacher = input.teacher()?.dense.clone();
                let (student, teacher, kept) = match &input.mask {
                    Some(mask) => {
                        let kept = kept_positions(mask.clone());
                        let count = kept.dims()[0];
                        (
                            input.student.clone().select(0, kept.clone()),
                            teacher.select(0, kept),
                            count,
                        )
                    }
                    None => (input.student.clone(), teacher, input.student.dims()[0]),
                };
                if kept == 0 {
                    // Nothing valid in this micro-batch: no relation to match.
                    let soft = Tensor::zeros([1], &input.student.device());
                    return Ok(ObjectiveLoss::soft_and_hard(soft, *hard_weight, || {
                        input.cross_entropy(0.0)
                    }));
                }
                let soft = loss
                    .forward(student, teacher)?
                    .mul_scalar(kept as f64 / input.normaliser.max(1) as f64);
                ObjectiveLoss::soft_and_hard(soft, *hard_weight, || input.cross_entropy(0.0))
            }
            Self::Divergence { loss, hard_weight } => {
                let teacher = input.teacher()?.dense.clone();
                let soft = match &input.mask {
                    Some(mask) => loss.forward_masked(input.student.clone(), teacher, mask.clone(), reduction)?,
                    None => loss.forward(input.student.clone(), teacher, reduction)?,
                };
                ObjectiveLoss::soft_and_hard(soft, *hard_weight, || input.cross_entropy(0.0))
            }
            Self::SampledReverseKl => {
                let targets = input.targets.clone();
                let safe = match &input.mask {
                    Some(mask) => targets.mask_fill(mask.clone().bool_not(), 0),
                    None => targets,
                };
                let at = |logits: Tensor<2>| {
                    activation::log_softmax(logits, 1)
                        .gather(1, safe.clone().unsqueeze_dim::<2>(1))
                        .squeeze_dim::<1>(1)
                };
                let log_q = at(input.student.clone());
                let log_p = at(input.teacher()?.dense.clone());
                let advantage = (log_q.clone().detach() - log_p).detach();
                let surrogate = input.sum_over_valid(advantage.clone() * log_q);
                sampled_reverse_kl_loss(surrogate, input.sum_over_valid(advantage))
            }
            Self::Sparse { loss, hard_weight } => {
                let (indices, log_probs) = input.teacher()?.top_k.clone().ok_or_else(|| {
                    TrainError::UnsuitableTeacher {
                        needs: "the sparse objective needs a teacher that gives top-k outputs (a top-k CachedTeacher)",
                        has: "gives dense logits only",
                    }
                })?;
                let soft = match &input.mask {
                    Some(mask) => {
                        loss.forward_masked(input.student.clone(), indices, log_probs, mask.clone(), reduction)?
                    }
                    None => loss.forward(input.student.clone(), indices, log_probs, reduction)?,
                };
                ObjectiveLoss::soft_and_hard(soft, *hard_weight, || input.cross_entropy(0.0))
            }
        })
    }
}

/// Student logits the chunked head holds at a time: 2²⁵ (128 MiB of f32).
const HEAD_CHUNK_LOGITS: usize = 1 << 25;

/// Positions per chunk of the head for `classes` logits each: [`HEAD_CHUNK_LOGITS`] / classes,
/// at most `LinearHeadKd`'s 1 024. At SmolLM2's 49 152 classes that is 682 rows: the peak of a
/// top-32 step over 4 096 positions falls from 692 to 501 MiB at the same speed, while smaller
/// chunks cost time, each adding its part of the `[vocab, width]` weight gradient (170 rows:
/// 366 MiB, 1.5 × the time; BENCHMARKS.md, fused_memory part 4).
fn head_chunk_rows(classes: usize) -> usize {
    (HEAD_CHUNK_LOGITS / classes.max(1)).clamp(1, 1024)
}

/// A built-in objective through the chunked head: the student's logits `hidden · headᵀ` exist
/// [`head_chunk_rows`] positions at a time.
fn head_loss(config: &ObjectiveConfig, input: ObjectiveInput, head: Tensor<2>) -> Result<ObjectiveLoss> {
    let reduction = input.reduction();
    let hidden = input.student.clone();
    let labels = Some(input.targets.clone());
    let chunk_rows = head_chunk_rows(head.dims()[0]);
    let run = |loss: LinearHeadKdConfig, teacher: HeadTeacher| -> Result<Tensor<1>> {
        let loss = loss
            .with_ignore_index(IGNORE_INDEX)
            .with_chunk_rows(chunk_rows)
            .try_init()?;
        Ok(loss.forward(hidden.clone(), head.clone(), teacher, labels.clone(), reduction)?)
    };
    let cross_entropy = || run(LinearHeadKdConfig::new(), HeadTeacher::Labels);
    Ok(match config {
        ObjectiveConfig::Supervised { .. } => {
            let hard = cross_entropy()?;
            ObjectiveLoss {
                total: hard.clone(),
                hard: Some(hard),
                soft: None,
            }
        }
        ObjectiveConfig::Hinton(hinton) => {
            // One chunked sweep gives α · CE + (1 − α) · T² · KL; its parts are not recorded.
            let loss = LinearHeadKdConfig::new()
                .with_alpha(hinton.alpha)
                .with_temperature(hinton.temperature)
                .with_scale_by_temperature_squared(hinton.scale_by_temperature_squared);
            let total = run(loss, HeadTeacher::Logits(input.teacher()?.dense.clone()))?;
            ObjectiveLoss {
                total,
                hard: None,
                soft: None,
            }
        }
        ObjectiveConfig::Divergence { loss, hard_weight } => {
            let soft_config = LinearHeadKdConfig::new()
                .with_divergence(loss.divergence)
                .with_temperature(loss.temperature)
                .with_scale_by_temperature_squared(loss.scale_by_temperature_squared);
            let soft = run(soft_config, HeadTeacher::Logits(input.teacher()?.dense.clone()))?;
            soft_and_hard(soft, *hard_weight, cross_entropy)?
        }
        ObjectiveConfig::Sparse { loss, hard_weight } => {
            let (indices, log_probs) = input.teacher()?.top_k.clone().ok_or(TrainError::UnsuitableTeacher {
                needs: "the sparse objective needs a teacher that gives top-k outputs (a top-k CachedTeacher)",
                has: "gives dense logits only",
            })?;
            let soft_config = LinearHeadKdConfig::new()
                .with_temperature(loss.temperature)
                .with_scale_by_temperature_squared(loss.scale_by_temperature_squared);
            let teacher = HeadTeacher::TopK {
                indices,
                log_probs,
                tail: loss.tail,
            };
            let soft = run(soft_config, teacher)?;
            soft_and_hard(soft, *hard_weight, cross_entropy)?
        }
        ObjectiveConfig::SampledReverseKl => {
            // log q(y) at each position, then Σ w · CE with w = −sg(log q − log p) / N: the
            // gradient of Σ sg(log q − log p) · log q / N, chunk by chunk.
            let kd = LinearHeadKdConfig::new()
                .with_ignore_index(IGNORE_INDEX)
                .with_chunk_rows(chunk_rows)
                .try_init()?;
            let log_q = kd.label_log_probs(hidden.clone(), head.clone(), input.targets.clone())?;
            let targets = input.targets.clone();
            let safe = match &input.mask {
                Some(mask) => targets.mask_fill(mask.clone().bool_not(), 0),
                None => targets,
            };
            let log_p: Vec<f32> = activation::log_softmax(input.teacher()?.dense.clone(), 1)
                .gather(1, safe.unsqueeze_dim::<2>(1))
                .into_data()
                .iter::<f32>()
                .collect();
            let (valid, _) = valid_positions(&input.targets);
            let valid: Vec<bool> = match valid {
                Some(mask) => mask.into_data().iter::<bool>().collect(),
                None => vec![true; log_q.len()],
            };
            let normaliser = input.normaliser.max(1) as f32;
            let advantage: Vec<f32> = log_q
                .iter()
                .zip(&log_p)
                .zip(&valid)
                .map(|((q, p), &valid)| if valid { q - p } else { 0.0 })
                .collect();
            let weights: Vec<f32> = advantage.iter().map(|a| -a / normaliser).collect();
            let surrogate = kd.weighted_cross_entropy(hidden, head, input.targets.clone(), &weights)?;
            let estimate: f32 = advantage.iter().sum::<f32>() / normaliser;
            let device = surrogate.device();
            sampled_reverse_kl_loss(
                surrogate,
                Tensor::from_data(TensorData::new(vec![estimate], [1]), &device),
            )
        }
        ObjectiveConfig::Dkd(_) | ObjectiveConfig::Dist { .. } | ObjectiveConfig::Custom { .. } => {
            unreachable!("takes_head is false for DKD, DIST and custom objectives")
        }
    })
}

/// The policy-gradient surrogate with the value of the reverse-KL estimate: minimising it
/// follows the surrogate's gradient, and the logs read the estimate.
fn sampled_reverse_kl_loss(surrogate: Tensor<1>, estimate: Tensor<1>) -> ObjectiveLoss {
    let estimate = estimate.detach();
    let total = surrogate.clone() - surrogate.detach() + estimate.clone();
    ObjectiveLoss {
        total,
        hard: None,
        soft: Some(estimate),
    }
}

/// [`ObjectiveLoss::soft_and_hard`] with a fallible hard term.
fn soft_and_hard(soft: Tensor<1>, weight: f64, hard: impl FnOnce() -> Result<Tensor<1>>) -> Result<ObjectiveLoss> {
    if weight == 0.0 {
        return Ok(ObjectiveLoss::soft(soft));
    }
    let hard = hard()?;
    Ok(ObjectiveLoss::soft_and_hard(soft, weight, || hard))
}

/// Whether Hinton KD's loss runs the fused kernel here (and its terms can be recovered from the
/// loss and the cross-entropy: not at `α = 1`, where the teacher term has no weight).
fn runs_fused(loss: &HintonKdLoss, student: &Tensor<2>) -> bool {
    loss.alpha < 1.0
        && loss.implementation != Implementation::Composed
        && fused_available_for(&student.device(), student.dtype())
}

/// `Σ_valid positions [(1 − ε) · (−log q_label) + ε · mean_c(−log q_c)] / normaliser`; positions
/// outside `mask` (targets [`IGNORE_INDEX`]) count for nothing.
pub(crate) fn cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    mask: Option<Tensor<1, Bool>>,
    smoothing: f64,
    normaliser: usize,
) -> Tensor<1> {
    // Half-precision logits (mixed precision) are summed in f32.
    let logits = match logits.dtype() {
        burn::tensor::DType::F16 | burn::tensor::DType::BF16 => logits.cast(burn::tensor::FloatDType::F32),
        _ => logits,
    };
    let log_probs = activation::log_softmax(logits, 1);
    let targets = match &mask {
        Some(mask) => targets.mask_fill(mask.clone().bool_not(), 0),
        None => targets,
    };
    let mut per_position = log_probs.clone().gather(1, targets.unsqueeze_dim::<2>(1)).neg();
    if smoothing > 0.0 {
        let uniform = log_probs.mean_dim(1).neg();
        per_position = per_position.mul_scalar(1.0 - smoothing) + uniform.mul_scalar(smoothing);
    }
    let per_position = per_position.squeeze_dim::<1>(1);
    let total = match mask {
        Some(mask) => per_position.mask_fill(mask.bool_not(), 0.0).sum(),
        None => per_position.sum(),
    };
    total.div_scalar(normaliser.max(1) as f64)
}

/// `targets != IGNORE_INDEX`, or `None` when every target is valid; and the number of valid
/// targets. One read of the targets from the device.
pub(crate) fn valid_positions(targets: &Tensor<1, Int>) -> (Option<Tensor<1, Bool>>, usize) {
    let host: Vec<i64> = targets.clone().into_data().iter::<i64>().collect();
    let valid = host.iter().filter(|&&target| target != IGNORE_INDEX).count();
    if valid == host.len() {
        (None, valid)
    } else {
        (Some(targets.clone().not_equal_elem(IGNORE_INDEX)), valid)
    }
}

#[cfg(test)]
mod tests {
    use super::head_chunk_rows;

    #[test]
    fn head_chunks_shrink_as_the_vocabulary_grows() {
        assert_eq!(head_chunk_rows(320), 1024);
        assert_eq!(head_chunk_rows(32_768), 1024);
        assert_eq!(head_chunk_rows(49_152), 682);
        assert_eq!(head_chunk_rows(128_256), 261);
        assert_eq!(head_chunk_rows(1 << 26), 1);
        assert_eq!(head_chunk_rows(0), 1024);
    }
}
