//! Forward KL against a sparse (top-k) teacher, without building the dense teacher.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{LossError, check_temperature};
use crate::input::{
    check_finite_or_neg_inf, check_indices, check_logits, flatten, flatten_positions, unflatten, widen_f32,
};
use crate::math::{exp_m1, kl_rows, log_sum_exp_rows, row_sum, zero_mass};
use crate::reduction::{Reduction, reduce};
use crate::temperature::scaled_log_softmax;

/// What the teacher's probability outside its top k becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TailPolicy {
    /// Drop the tail and renormalise the top k to sum to 1.
    #[default]
    Renormalize,
    /// Spread the missing mass `1 − Σ top-k` uniformly over the other `V − k` classes.
    UniformTail,
}

/// Configuration of [`SparseKlLoss`]: `KL(p ‖ q)` where `p` is the teacher rebuilt from its
/// top-k log-probabilities by the tail policy and softened by `T` (`p_T ∝ p^{1/T}`).
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `temperature` | 1.0 | softens teacher and student | `T > 0` |
/// | `scale_by_temperature_squared` | false | multiply by `T²` | |
/// | `tail` | `Renormalize` | see [`TailPolicy`] | |
/// | `check_inputs` | true | refuse NaN logits and out-of-range indices | |
///
/// The top-k log-probabilities are those of the teacher's full softmax at temperature 1 (as the
/// data crate's cache stores them); indices within a position must be distinct. With `k = V`
/// both policies give the dense forward KL.
#[derive(Config, Debug)]
pub struct SparseKlLossConfig {
    /// Temperature.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Multiply by `T²`.
    #[config(default = false)]
    pub scale_by_temperature_squared: bool,
    /// Tail policy.
    #[config(default = "TailPolicy::Renormalize")]
    pub tail: TailPolicy,
    /// Check inputs.
    #[config(default = true)]
    pub check_inputs: bool,
}

impl SparseKlLossConfig {
    /// Builds the loss, or says which hyper-parameter is out of range.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`] for a temperature that is not positive.
    pub fn try_init(&self) -> crate::Result<SparseKlLoss> {
        check_temperature(self.temperature)?;
        Ok(SparseKlLoss {
            temperature: self.temperature,
            scale_by_temperature_squared: self.scale_by_temperature_squared,
            tail: self.tail,
            check_inputs: self.check_inputs,
        })
    }

    /// Builds the loss.
    ///
    /// # Panics
    /// When a hyper-parameter is out of range; the message names it and its range.
    pub fn init(&self) -> SparseKlLoss {
        self.try_init()
            .unwrap_or_else(|error| panic!("invalid SparseKlLossConfig: {error}"))
    }
}

/// Forward KL to a top-k teacher; built by [`SparseKlLossConfig`].
#[derive(Module, Debug)]
pub struct SparseKlLoss {
    /// Temperature.
    #[module(skip)]
    pub temperature: f64,
    /// Whether the loss is multiplied by `T²`.
    pub scale_by_temperature_squared: bool,
    /// Tail policy.
    #[module(skip)]
    pub tail: TailPolicy,
    /// Whether inputs are checked.
    pub check_inputs: bool,
}

impl SparseKlLoss {
    /// The reduced loss.
    ///
    /// # Shapes
    /// - student_logits: `[batch, classes]` or `[batch, seq, vocab]`
    /// - teacher_indices: `[.., k]`, same leading dimensions, `k ≤ classes`
    /// - teacher_log_probs: `[.., k]`
    /// - output: `[1]`
    ///
    /// # Errors
    /// Shapes that disagree, `k > classes`, indices out of range, NaN inputs.
    pub fn forward<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_indices: Tensor<D, Int>,
        teacher_log_probs: Tensor<D>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        let (per_position, classes, _) = self.per_position(student_logits, teacher_indices, teacher_log_probs)?;
        reduce(per_position, None, classes, reduction, self.check_inputs)
    }

    /// The reduced loss over the positions where `mask` is true.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward); mask: `[batch]` or `[batch, seq]`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), plus a mask of the wrong shape or with no valid position.
    pub fn forward_masked<const D: usize, const L: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_indices: Tensor<D, Int>,
        teacher_log_probs: Tensor<D>,
        mask: Tensor<L, Bool>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        let (per_position, classes, lead) = self.per_position(student_logits, teacher_indices, teacher_log_probs)?;
        let mask = flatten_positions(mask, &lead, "mask")?;
        reduce(per_position, Some(mask), classes, reduction, self.check_inputs)
    }

    /// The divergence at every position.
    ///
    /// # Shapes
    /// - output: `[batch, 1]` or `[batch, seq, 1]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_no_reduction<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_indices: Tensor<D, Int>,
        teacher_log_probs: Tensor<D>,
    ) -> crate::Result<Tensor<D>> {
        let (per_position, _, lead) = self.per_position(student_logits, teacher_indices, teacher_log_probs)?;
        Ok(unflatten(per_position, &lead))
    }

    fn per_position<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_indices: Tensor<D, Int>,
        teacher_log_probs: Tensor<D>,
    ) -> crate::Result<(Tensor<1>, usize, Vec<usize>)> {
        let mut student = flatten(student_logits, "student logits")?;
        // Composed: half-precision logits are widened to f32 first.
        student.rows = widen_f32(student.rows);
        let index_dims = teacher_indices.dims();
        let value_dims = teacher_log_probs.dims();
        let [positions, classes] = student.rows.dims();
        let k = index_dims[D - 1];
        let mut expected = student.lead.clone();
        expected.push(k);
        if index_dims[..D - 1] != student.lead[..] {
            return Err(LossError::ShapeMismatch {
                tensor: "teacher top-k indices",
                expected: student.lead,
                actual: index_dims.to_vec(),
            });
        }
        if value_dims[..] != expected[..] {
            return Err(LossError::ShapeMismatch {
                tensor: "teacher top-k log-probs",
                expected,
                actual: value_dims.to_vec(),
            });
        }
        if k == 0 || k > classes {
            return Err(LossError::InvalidParameter {
                name: "k",
                value: k as f64,
                expected: "1 <= k <= number of student classes",
            });
        }
        let indices = teacher_indices.reshape([positions, k]);
        let teacher = teacher_log_probs.reshape([positions, k]).detach();
        if self.check_inputs {
            check_logits(&student.rows, "student logits")?;
            check_finite_or_neg_inf(&teacher, "teacher top-k log-probs")?;
            check_indices(
                &indices.clone().reshape([positions * k]),
                classes,
                None,
                "teacher top-k indices",
            )?;
        }

        let student_log_probs = scaled_log_softmax(student.rows, self.temperature);
        let student_at_top = student_log_probs.clone().gather(1, indices);
        let mut per_position = if self.tail == TailPolicy::Renormalize || k == classes {
            kl_rows(scaled_log_softmax(teacher, self.temperature), student_at_top)
        } else {
            self.uniform_tail(teacher, student_log_probs, student_at_top, classes)
        };
        if self.scale_by_temperature_squared {
            per_position = per_position.mul_scalar(self.temperature * self.temperature);
        }
        Ok((per_position, classes, student.lead))
    }

    /// KL with the tail mass spread over the `V − k` classes outside the top k: the tail's
    /// student log-probabilities enter only through their sum, `Σ_all − Σ_top`.
    fn uniform_tail(
        &self,
        teacher: Tensor<2>,
        student_log_probs: Tensor<2>,
        student_at_top: Tensor<2>,
        classes: usize,
    ) -> Tensor<1> {
        let [positions, k] = teacher.dims();
        let tail_classes = (classes - k) as f64;
        // 1 − Σ p_top loses every digit when the teacher is nearly one-hot, and at high T the
        // tail's weight (mass)^(1/T) depends strongly on those digits. So the largest term is
        // taken out exactly: 1 − Σ p = −expm1(log p_max) − Σ_{others} p.
        let device = teacher.device();
        let largest = teacher.clone().argmax(1);
        let is_largest = Tensor::<1, Int>::arange(0..k as i64, &device)
            .reshape([1, k])
            .expand([positions, k])
            .equal(largest.expand([positions, k]));
        let others = teacher.clone().exp().mask_fill(is_largest, 0.0).sum_dim(1);
        let tail_mass = (exp_m1(teacher.clone().max_dim(1)).neg() - others).clamp_min(0.0);
        let top_weights = teacher.div_scalar(self.temperature);
        let tail_weight = (tail_mass.log().sub_scalar(tail_classes.ln())).div_scalar(self.temperature);
        let normaliser = log_sum_exp_rows(Tensor::cat(
            vec![top_weights.clone(), tail_weight.clone().add_scalar(tail_classes.ln())],
            1,
        ));
        let top = top_weights - normaliser.clone();
        let tail = tail_weight - normaliser;

        let top_term = kl_rows(top, student_at_top.clone());
        let tail_student_sum = row_sum(student_log_probs) - row_sum(student_at_top);
        let empty_tail = zero_mass(&tail);
        let tail_log = tail.clone().mask_fill(empty_tail, 0.0).reshape([positions]);
        let tail_prob = tail.exp().reshape([positions]);
        let tail_term = tail_prob * (tail_log.mul_scalar(tail_classes) - tail_student_sum);
        top_term + tail_term
    }
}

/// Forward KL to a top-k teacher in one call (no `T²` factor).
///
/// # Shapes
/// As [`SparseKlLoss::forward`].
///
/// # Errors
/// As [`SparseKlLoss::forward`], plus an invalid `temperature`.
pub fn sparse_forward_kl<const D: usize>(
    student_logits: Tensor<D>,
    teacher_indices: Tensor<D, Int>,
    teacher_log_probs: Tensor<D>,
    tail: TailPolicy,
    temperature: f64,
    reduction: Reduction,
) -> crate::Result<Tensor<1>> {
    SparseKlLossConfig::new()
        .with_tail(tail)
        .with_temperature(temperature)
        .try_init()?
        .forward(student_logits, teacher_indices, teacher_log_probs, reduction)
}
