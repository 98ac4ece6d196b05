//! One batch's loss: the teacher's outputs, the student's, the objective and the feature terms.
//! Both drivers call it: the [`Distiller`](crate::Distiller) and burn-train's Learner through
//! [`DistillModel`](crate::DistillModel), so the two cannot compute different losses.

use std::collections::HashMap;
use std::time::Instant;

use burn::tensor::{Bool, DType, FloatDType, Int, Tensor};
use burn_distill_data::Batch;
use burn_distill_model::{Features, Student, Teacher, TeacherInput};

use burn_distill_loss::CrdUpdate;

use crate::config::{DistillConfig, FeatureKind, FeatureTermConfig};
use crate::distiller::Trainee;
use crate::error::{Result, TrainError};
use crate::features::{FeatureContext, feature_loss};
use crate::metrics::{flatten_indices, flatten_logits};
use crate::objective::{Objective, ObjectiveInput, TeacherLogits};

/// The feature terms and the taps a run's steps read, fixed for the run.
#[derive(Debug, Clone)]
pub(crate) struct LossTerms {
    pub(crate) features: Vec<FeatureTermConfig>,
    teacher_taps: Vec<String>,
    student_taps: Vec<String>,
    /// For each feature term, the index of its connector (terms without one have `None`).
    connector_of: Vec<Option<usize>>,
    /// For each feature term, the index of its CRD module (CRD terms only).
    contrast_of: Vec<Option<usize>>,
}

impl LossTerms {
    pub(crate) fn new(config: &DistillConfig) -> Self {
        Self::from_features(&config.features)
    }

    pub(crate) fn from_features(features: &[FeatureTermConfig]) -> Self {
        let mut next = 0;
        let connector_of = features
            .iter()
            .map(|term| {
                term.connector.as_ref().map(|_| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        let mut next = 0;
        let contrast_of = features
            .iter()
            .map(|term| {
                matches!(term.kind, FeatureKind::Crd(_)).then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        Self {
            contrast_of,
            features: features.to_vec(),
            teacher_taps: features.iter().map(|term| term.teacher_tap.clone()).collect(),
            student_taps: features.iter().map(|term| term.student_tap.clone()).collect(),
            connector_of,
        }
    }
}

/// What a batch's terms are normalised by: the valid positions and examples of the whole
/// optimizer step (all its micro-batches), so accumulated gradients are the big batch's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepCounts {
    pub(crate) positions: usize,
    pub(crate) examples: usize,
}

/// One batch's loss and its parts.
pub(crate) struct BatchLoss {
    /// Objective plus feature terms: what is differentiated.
    pub(crate) total: Tensor<1>,
    pub(crate) hard: Option<Tensor<1>>,
    pub(crate) soft: Option<Tensor<1>>,
    pub(crate) features: Option<Tensor<1>>,
    /// The memory-bank updates of the CRD terms, in order: applied after the optimizer's step.
    pub(crate) contrast_updates: Vec<CrdUpdate>,
    /// How many valid positions the student's argmax gets right, when asked for and the
    /// student gave logits rather than hidden states.
    pub(crate) correct: Option<Tensor<1, Int>>,
    pub(crate) teacher_seconds: f64,
}

/// The loss of `batch` for `trainee`, against `teacher` when there is one; with
/// `count_correct`, the number of valid positions whose argmax is the target too. With
/// `forward_dtype` (mixed precision: `trainee`'s weights already cast to it), the student
/// gets the batch's float inputs in that precision; its logits go to the objective as they
/// are (the fused losses read them so), its features are widened to f32, and the total is f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_loss<M, B, const D: usize>(
    trainee: &Trainee<M>,
    forward_dtype: Option<FloatDType>,
    teacher: Option<&dyn Teacher<B::Input, D>>,
    objective: &dyn Objective,
    terms: &LossTerms,
    batch: &B,
    mask: Option<Tensor<1, Bool>>,
    counts: StepCounts,
    check_inputs: bool,
    count_correct: bool,
    seed: u64,
    contrast_rows: Option<&HashMap<usize, usize>>,
) -> Result<BatchLoss>
where
    M: Student<B::Input, D>,
    B: Batch,
    B::Input: TeacherInput,
{
    let input = batch.input();
    let teacher_taps: Vec<&str> = terms.teacher_taps.iter().map(String::as_str).collect();
    let student_taps: Vec<&str> = terms.student_taps.iter().map(String::as_str).collect();
    let mut teacher_seconds = 0.0;
    let teacher_output = match teacher {
        Some(teacher) => {
            let start = Instant::now();
            let output = teacher.teach_examples(input.clone(), batch.indices(), &teacher_taps)?;
            teacher_seconds = start.elapsed().as_secs_f64();
            Some(output)
        }
        None => None,
    };
    let student_input = match forward_dtype {
        Some(dtype) => input.clone().with_float_dtype(dtype),
        None => input,
    };
    // Objectives that take a head get the hidden states of students that give them: the
    // loss then runs chunk by chunk, without the [positions, vocab] logits.
    let hidden = if objective.takes_head() {
        trainee.student.learn_hidden(student_input.clone(), &student_taps)
    } else {
        None
    };
    let (student_rows, student_dims, head, student_features): (Tensor<2>, [usize; D], _, Features) = match hidden {
        Some(hidden) => {
            let hidden = hidden?;
            let dims = hidden.hidden.dims();
            (flatten_logits(hidden.hidden), dims, Some(hidden.head), hidden.features)
        }
        None => {
            let output = trainee.student.learn(student_input, &student_taps)?;
            let dims = output.logits.dims();
            (flatten_logits(output.logits), dims, None, output.features)
        }
    };
    // A cache of sequences holds them padded to its longest; a batch is padded to its own
    // longest, which may be shorter: the teacher's positions past the batch's are padding.
    let fit = |tensor_dims: [usize; D]| (D == 3 && tensor_dims[1] > student_dims[1]).then_some(student_dims[1]);
    let (teacher_logits, teacher_features) = match teacher_output {
        Some(output) => {
            let top_k = output.top_k().map(|(indices, values)| {
                let (indices, values) = match fit(values.dims()) {
                    Some(length) => (
                        indices.clone().narrow(1, 0, length),
                        values.clone().narrow(1, 0, length),
                    ),
                    None => (indices.clone(), values.clone()),
                };
                (flatten_indices(indices), widen_f32(flatten_logits(values)))
            });
            let (logits, features) = output.into_parts();
            let logits = match fit(logits.dims()) {
                Some(length) => logits.narrow(1, 0, length),
                None => logits,
            };
            let logits = TeacherLogits {
                dense: flatten_logits(logits),
                top_k,
            };
            // A half-precision teacher's features meet the student's in f32.
            let features: Features = features
                .into_iter()
                .map(|(name, feature)| (name, feature.cast(FloatDType::F32)))
                .collect();
            (Some(logits), features)
        }
        None => (None, Default::default()),
    };
    // Counted before the loss, so that no second handle on the logits is held while it runs
    // (one would stop the loss from reusing their buffer in place).
    let targets = batch.targets();
    let correct = (count_correct && head.is_none()).then(|| {
        let hits = student_rows.clone().argmax(1).reshape([-1]).equal(targets.clone());
        let hits = match &mask {
            Some(mask) => hits.bool_and(mask.clone()),
            None => hits,
        };
        hits.int().sum()
    });
    let feature_mask = (!terms.features.is_empty()).then(|| mask.clone()).flatten();
    let logit_loss = objective.loss(ObjectiveInput {
        student: student_rows,
        head,
        teacher: teacher_logits,
        targets,
        mask,
        normaliser: counts.positions,
        check_inputs,
    })?;
    let student_features = match forward_dtype {
        Some(_) => student_features
            .into_iter()
            .map(|(name, feature)| (name, feature.cast(FloatDType::F32)))
            .collect(),
        None => student_features,
    };
    let bank_rows: Vec<usize> = match contrast_rows {
        Some(rows) => batch
            .indices()
            .iter()
            .map(|index| {
                rows.get(index).copied().ok_or_else(|| {
                    TrainError::Config(format!(
                        "source index {index} is not in the training set CRD's banks were made for"
                    ))
                })
            })
            .collect::<Result<_>>()?,
        None => batch.indices().to_vec(),
    };
    let (features, contrast_updates) = feature_loss(
        &terms.features,
        &student_features,
        &teacher_features,
        &FeatureContext {
            connectors: &trainee.connectors,
            connector_of: &terms.connector_of,
            contrast: &trainee.contrast,
            contrast_of: &terms.contrast_of,
            mask: feature_mask.as_ref(),
            counts,
            indices: &bank_rows,
            seed,
            check_inputs,
        },
    )?;
    let logit_total = widen_f32(logit_loss.total.clone());
    let total = match &features {
        Some(features) => logit_total + features.clone(),
        None => logit_total,
    };
    Ok(BatchLoss {
        total,
        hard: logit_loss.hard.map(widen_f32),
        soft: logit_loss.soft.map(widen_f32),
        features,
        contrast_updates,
        correct,
        teacher_seconds,
    })
}

/// `tensor` in f32 (a loss term computed in half precision by a composed objective, a
/// half-precision teacher's top-k log-probabilities).
pub(crate) fn widen_f32<const N: usize>(tensor: Tensor<N>) -> Tensor<N> {
    match tensor.dtype() {
        DType::F32 => tensor,
        _ => tensor.cast(FloatDType::F32),
    }
}
