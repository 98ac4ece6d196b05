//! What to do when student and teacher disagree on the number of classes.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{LossError, Result};

/// How a loss treats a student and teacher whose last dimensions differ.
///
/// LLM families often pad their embedding tables differently (Qwen2: 151936 vs 152064), so the
/// extra ids exist in one model only. Mismatches are an error unless a policy is chosen.
///
/// | Policy | Effect | Use it when |
/// |---|---|---|
/// | `Strict` (default) | error naming both sizes | always, unless you know why they differ |
/// | `PadWithNegInf` | the smaller side gets `-inf` logits (probability 0) for the missing classes | the extra classes are real but absent from one model |
/// | `Truncate` | the larger side is cut to the first `min(V_s, V_t)` classes, then renormalised | the extra ids are padding, never produced |
///
/// With `PadWithNegInf`, a divergence that puts the padded side under a log (forward KL with a
/// padded student, reverse KL with a padded teacher) is infinite wherever the other side has mass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum VocabPolicy {
    /// Different class counts are an error.
    #[default]
    Strict,
    /// Pad the smaller side with `-inf` logits.
    PadWithNegInf,
    /// Truncate the larger side to the smaller class count.
    Truncate,
}

impl VocabPolicy {
    /// Brings `[rows, classes]` student and teacher logits to one class count.
    pub(crate) fn align(self, student: Tensor<2>, teacher: Tensor<2>) -> Result<(Tensor<2>, Tensor<2>)> {
        let [rows, student_classes] = student.dims();
        let teacher_classes = teacher.dims()[1];
        if student_classes == teacher_classes {
            return Ok((student, teacher));
        }
        match self {
            VocabPolicy::Strict => Err(LossError::VocabMismatch {
                student: student_classes,
                teacher: teacher_classes,
            }),
            VocabPolicy::Truncate => {
                let classes = student_classes.min(teacher_classes);
                Ok((
                    student.slice([0..rows, 0..classes]),
                    teacher.slice([0..rows, 0..classes]),
                ))
            }
            VocabPolicy::PadWithNegInf => {
                let pad = |logits: Tensor<2>, to: usize| {
                    let [rows, classes] = logits.dims();
                    let device = logits.device();
                    let filler = Tensor::<2>::full([rows, to - classes], f32::NEG_INFINITY, &device);
                    Tensor::cat(vec![logits, filler], 1)
                };
                if student_classes < teacher_classes {
                    Ok((pad(student, teacher_classes), teacher))
                } else {
                    Ok((student, pad(teacher, student_classes)))
                }
            }
        }
    }
}
