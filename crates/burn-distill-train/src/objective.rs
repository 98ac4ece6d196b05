//! The training objective built from a config: logit loss plus feature terms.

use burn::tensor::{Bool, Int, Tensor, activation};
use burn_distill_loss::{DivergenceLoss, DkdLoss, HintonKdLoss, Reduction, SparseKlLoss};
use burn_distill_model::{Connector, Feature, Features, ModelError};

use crate::config::{FeatureTermConfig, IGNORE_INDEX, ObjectiveConfig};
use crate::error::{Result, TrainError};

/// The loss of one micro-batch and its parts, each already divided by the step's global count
/// of positions, so that summing micro-batches gives the big-batch mean.
pub(crate) struct StepLoss {
    pub total: Tensor<1>,
    /// Cross-entropy with the labels (`None` when the objective has no such term).
    pub hard: Option<Tensor<1>>,
    /// The teacher term (`None` when supervised).
    pub soft: Option<Tensor<1>>,
}

pub(crate) enum LogitObjective {
    Supervised { label_smoothing: f64 },
    Hinton(HintonKdLoss),
    Dkd(DkdLoss),
    Divergence { loss: DivergenceLoss, hard_weight: f64 },
    Sparse { loss: SparseKlLoss, hard_weight: f64 },
}

/// The teacher's side of one micro-batch, flattened to positions.
pub(crate) struct TeacherLogits {
    /// `[n, classes]`.
    pub dense: Tensor<2>,
    /// `[n, k]` class ids and log-probabilities, when the teacher gives them.
    pub top_k: Option<(Tensor<2, Int>, Tensor<2>)>,
}

impl LogitObjective {
    /// Builds the objective; `check_inputs` turns the losses' input validation on or off.
    pub fn new(config: &ObjectiveConfig, check_inputs: bool) -> Result<Self> {
        Ok(match config {
            ObjectiveConfig::Supervised { label_smoothing } => Self::Supervised {
                label_smoothing: *label_smoothing,
            },
            ObjectiveConfig::Hinton(config) => Self::Hinton(config.clone().with_check_inputs(check_inputs).try_init()?),
            ObjectiveConfig::Dkd(config) => Self::Dkd(config.clone().with_check_inputs(check_inputs).try_init()?),
            ObjectiveConfig::Divergence { loss, hard_weight } => Self::Divergence {
                loss: loss.clone().with_check_inputs(check_inputs).try_init()?,
                hard_weight: *hard_weight,
            },
            ObjectiveConfig::Sparse { loss, hard_weight } => Self::Sparse {
                loss: loss.clone().with_check_inputs(check_inputs).try_init()?,
                hard_weight: *hard_weight,
            },
        })
    }

    /// The loss of `student` (`[n, classes]`) against `targets` (`[n]`, [`IGNORE_INDEX`] where a
    /// position does not count) and, when the objective has one, `teacher`, summed over the
    /// valid positions and divided by `normaliser`. `mask` is `None` when every position is
    /// valid (the faster unmasked path), else `targets != IGNORE_INDEX`.
    pub fn loss(
        &self,
        student: Tensor<2>,
        teacher: Option<TeacherLogits>,
        targets: Tensor<1, Int>,
        mask: Option<Tensor<1, Bool>>,
        normaliser: usize,
    ) -> Result<StepLoss> {
        let reduction = Reduction::SumOver(normaliser.max(1));
        let no_teacher = || TrainError::Config("this objective needs a teacher; give the distiller one".into());
        let hard_term = |student: Tensor<2>, weight: f64, soft: Tensor<1>| {
            if weight > 0.0 {
                let hard = cross_entropy(student, targets.clone(), mask.clone(), 0.0, normaliser);
                StepLoss {
                    total: soft.clone() + hard.clone().mul_scalar(weight),
                    hard: Some(hard),
                    soft: Some(soft),
                }
            } else {
                StepLoss {
                    total: soft.clone(),
                    hard: None,
                    soft: Some(soft),
                }
            }
        };
        Ok(match self {
            Self::Supervised { label_smoothing } => {
                let hard = cross_entropy(student, targets, mask, *label_smoothing, normaliser);
                StepLoss {
                    total: hard.clone(),
                    hard: Some(hard),
                    soft: None,
                }
            }
            Self::Hinton(loss) => {
                let teacher = teacher.ok_or_else(no_teacher)?.dense;
                let terms = loss.forward_terms(student, teacher, targets, reduction)?;
                StepLoss {
                    total: terms.loss,
                    hard: Some(terms.hard),
                    soft: Some(terms.soft),
                }
            }
            Self::Dkd(loss) => {
                let teacher = teacher.ok_or_else(no_teacher)?.dense;
                let total = loss.forward(student, teacher, targets, reduction)?;
                StepLoss {
                    total: total.clone(),
                    hard: None,
                    soft: Some(total),
                }
            }
            Self::Divergence { loss, hard_weight } => {
                let teacher = teacher.ok_or_else(no_teacher)?.dense;
                let soft = match &mask {
                    Some(mask) => loss.forward_masked(student.clone(), teacher, mask.clone(), reduction)?,
                    None => loss.forward(student.clone(), teacher, reduction)?,
                };
                hard_term(student, *hard_weight, soft)
            }
            Self::Sparse { loss, hard_weight } => {
                let (indices, log_probs) = teacher.ok_or_else(no_teacher)?.top_k.ok_or_else(|| {
                    TrainError::Config(
                        "the sparse objective needs a teacher that gives top-k outputs (a top-k CachedTeacher); \
                         this teacher gives dense logits only"
                            .into(),
                    )
                })?;
                let soft = match &mask {
                    Some(mask) => loss.forward_masked(student.clone(), indices, log_probs, mask.clone(), reduction)?,
                    None => loss.forward(student.clone(), indices, log_probs, reduction)?,
                };
                hard_term(student, *hard_weight, soft)
            }
        })
    }
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

/// Feature terms: `weight × Σ (connector(student) − teacher)² / (normaliser × elements per
/// example)`: the mean squared error over the step's big batch.
pub(crate) fn feature_loss(
    terms: &[FeatureTermConfig],
    connectors: &[Connector],
    connector_of: &[Option<usize>],
    student: &Features,
    teacher: &Features,
    examples_normaliser: usize,
) -> Result<Option<Tensor<1>>> {
    let mut total: Option<Tensor<1>> = None;
    for (index, term) in terms.iter().enumerate() {
        let missing = |name: &str, side: &str| {
            TrainError::Model(ModelError::UnknownTap {
                name: format!("{side} tap {name}"),
                available: vec![],
            })
        };
        let mut student_feature = student
            .get(&term.student_tap)
            .cloned()
            .ok_or_else(|| missing(&term.student_tap, "student"))?;
        let teacher_feature = teacher
            .get(&term.teacher_tap)
            .cloned()
            .ok_or_else(|| missing(&term.teacher_tap, "teacher"))?;
        if let Some(slot) = connector_of[index] {
            student_feature = connectors[slot].forward(student_feature)?;
        }
        if student_feature.dims() != teacher_feature.dims() {
            return Err(TrainError::Model(ModelError::FeatureShape {
                what: format!("feature term {index} ({} → {})", term.student_tap, term.teacher_tap),
                expected: format!("the teacher's shape {:?}", teacher_feature.dims()),
                actual: student_feature.dims(),
            }));
        }
        let dims = teacher_feature.dims();
        let per_example: usize = dims[1..].iter().product();
        let squared = match (student_feature, teacher_feature) {
            (Feature::Vector(s), Feature::Vector(t)) => (s - t).powi_scalar(2).sum(),
            (Feature::Sequence(s), Feature::Sequence(t)) => (s - t).powi_scalar(2).sum(),
            (Feature::Map(s), Feature::Map(t)) => (s - t).powi_scalar(2).sum(),
            _ => {
                return Err(TrainError::Config(format!(
                    "feature term {index}: the student and teacher taps are different kinds"
                )));
            }
        };
        let term_loss = squared.mul_scalar(term.weight / (examples_normaliser * per_example) as f64);
        total = Some(match total {
            Some(sum) => sum + term_loss,
            None => term_loss,
        });
    }
    Ok(total)
}
