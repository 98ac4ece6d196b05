//! Hidden-state distillation for language models: MSE or cosine distance between a student's
//! (projected) hidden states and a teacher's, position by position.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::LossError;
use crate::input::{flatten, widen_f32};
use crate::reduction::{Reduction, reduce};
use crate::relation::common::{check_features, norm_floor};

/// The cosine divides by `max(‖a‖, ε) · max(‖b‖, ε)`, as PyTorch's `F.cosine_similarity` does
/// (ε = 1e-8, its default).
const COSINE_EPS: f64 = 1e-8;

/// How two hidden states are compared at one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HiddenDistance {
    /// The mean over the width of `(s − t)²`.
    #[default]
    Mse,
    /// `1 − cos(s, t)`: the direction only, whatever the scale of either side.
    Cosine,
}

/// Configuration of [`HiddenStateLoss`].
///
/// The student's hidden states must already have the teacher's width: map them with a learned
/// projection first (the training crate's connectors do). Positions where the mask is false
/// (padding, prompt tokens) count as zero and are left out of the mean, as in the logit losses.
///
/// | Name | Default | Purpose |
/// |---|---|---|
/// | `distance` | `Mse` | see [`HiddenDistance`] |
/// | `check_inputs` | true | refuse NaN / infinite hidden states |
#[derive(Config, Debug)]
pub struct HiddenStateLossConfig {
    /// The distance at each position.
    #[config(default = "HiddenDistance::Mse")]
    pub distance: HiddenDistance,
    /// Check the hidden states for NaN and infinities (one device read).
    #[config(default = true)]
    pub check_inputs: bool,
}

impl HiddenStateLossConfig {
    /// Builds the loss (it has no hyper-parameter to refuse).
    pub fn init(&self) -> HiddenStateLoss {
        HiddenStateLoss {
            distance: self.distance,
            check_inputs: self.check_inputs,
        }
    }
}

/// Hidden-state loss; built by [`HiddenStateLossConfig`].
#[derive(Module, Debug)]
pub struct HiddenStateLoss {
    /// The distance at each position.
    #[module(skip)]
    pub distance: HiddenDistance,
    /// Whether inputs are checked.
    pub check_inputs: bool,
}

impl HiddenStateLoss {
    /// The reduced loss (`BatchMean`: the mean over positions; `ElementMean` is the same).
    ///
    /// # Shapes
    /// - student: `[batch, width]` or `[batch, seq, width]`, the teacher's width
    /// - teacher: same shape
    /// - output: `[1]`
    ///
    /// # Errors
    /// [`LossError::FeatureShape`] for different shapes, [`LossError::UnsupportedRank`],
    /// [`LossError::NonFinite`], and the reduction's ([`LossError::NoValidPositions`]).
    pub fn forward<const D: usize>(
        &self,
        student: Tensor<D>,
        teacher: Tensor<D>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        let per_position = self.per_position(student, teacher)?;
        reduce(per_position, None, 1, reduction, self.check_inputs)
    }

    /// The reduced loss over the positions where `mask` is true.
    ///
    /// # Shapes
    /// - mask: `[batch]` or `[batch, seq]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward); a mask of another shape is a [`LossError::FeatureShape`].
    pub fn forward_masked<const D: usize, const L: usize>(
        &self,
        student: Tensor<D>,
        teacher: Tensor<D>,
        mask: Tensor<L, Bool>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        let lead = student.dims()[..D - 1].to_vec();
        if L + 1 != D || mask.dims()[..] != lead[..] {
            return Err(LossError::FeatureShape {
                what: "position mask",
                expected: format!("{lead:?}, the hidden states' leading dimensions"),
                actual: mask.dims().to_vec(),
            });
        }
        let per_position = self.per_position(student, teacher)?;
        let positions = per_position.dims()[0];
        reduce(
            per_position,
            Some(mask.reshape([positions])),
            1,
            reduction,
            self.check_inputs,
        )
    }

    /// The loss at every position (masked positions are the caller's to ignore).
    ///
    /// # Shapes
    /// - output: `[batch, 1]` or `[batch, seq, 1]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_no_reduction<const D: usize>(
        &self,
        student: Tensor<D>,
        teacher: Tensor<D>,
    ) -> crate::Result<Tensor<D>> {
        let mut lead = student.dims()[..D - 1].to_vec();
        let per_position = self.per_position(student, teacher)?;
        lead.push(1);
        let shape: [usize; D] = lead.try_into().expect("rank D");
        Ok(per_position.reshape(shape))
    }

    fn per_position<const D: usize>(&self, student: Tensor<D>, teacher: Tensor<D>) -> crate::Result<Tensor<1>> {
        if student.dims() != teacher.dims() {
            return Err(LossError::FeatureShape {
                what: "teacher hidden states",
                expected: format!("{:?}, the (projected) student's shape", student.dims()),
                actual: teacher.dims().to_vec(),
            });
        }
        let student = widen_f32(flatten(student, "student hidden states")?.rows);
        let teacher = widen_f32(flatten(teacher, "teacher hidden states")?.rows).detach();
        if self.check_inputs {
            check_features(&student, &teacher)?;
        }
        let [positions, _] = student.dims();
        let per_position = match self.distance {
            HiddenDistance::Mse => (student - teacher).powi_scalar(2).mean_dim(1),
            HiddenDistance::Cosine => {
                let dot = (student.clone() * teacher.clone()).sum_dim(1);
                let norms = norm_floor(student, 1, COSINE_EPS) * norm_floor(teacher, 1, COSINE_EPS);
                (dot / norms).neg().add_scalar(1.0)
            }
        };
        Ok(per_position.reshape([positions]))
    }
}
