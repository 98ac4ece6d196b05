//! Hidden-state distillation for language models: MSE or cosine distance between a student's
//! (projected) hidden states and a teacher's, position by position.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Tensor};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::error::LossError;
use crate::fused::{Implementation, RelationJob, relation_loss, use_host_relation};
use crate::input::{flatten, read_bools, widen_f32};
use crate::reduction::{Reduction, reduce, reduction_weights};
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
/// | `implementation` | `Auto` | one host kernel on the CPU devices (ndarray, flex), composed tensor ops elsewhere; see [`Implementation`] |
#[derive(Config, Debug)]
pub struct HiddenStateLossConfig {
    /// The distance at each position.
    #[config(default = "HiddenDistance::Mse")]
    pub distance: HiddenDistance,
    /// Check the hidden states for NaN and infinities (one device read).
    #[config(default = true)]
    pub check_inputs: bool,
    /// One host kernel (loss and gradient together) or composed tensor operations.
    #[config(default = "Implementation::Auto")]
    pub implementation: Implementation,
}

impl HiddenStateLossConfig {
    /// Builds the loss (it has no hyper-parameter to refuse).
    pub fn init(&self) -> HiddenStateLoss {
        HiddenStateLoss {
            distance: self.distance,
            check_inputs: self.check_inputs,
            implementation: self.implementation,
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
    /// Host kernel or composed tensor operations.
    #[module(skip)]
    pub implementation: Implementation,
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
        self.reduced(student, teacher, None, reduction)
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
        let positions: usize = lead.iter().product();
        self.reduced(student, teacher, Some(mask.reshape([positions])), reduction)
    }

    /// The reduced loss over the positions `mask` keeps (all without one): the host kernel
    /// where it runs, the composed per-position losses and [`reduce`] elsewhere.
    fn reduced<const D: usize>(
        &self,
        student: Tensor<D>,
        teacher: Tensor<D>,
        mask: Option<Tensor<1, Bool>>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        let (student, teacher) = self.rows(student, teacher)?;
        if use_host_relation(self.implementation, &student, &teacher)? {
            let positions = student.dims()[0];
            let valid = mask.map(read_bools);
            let weights = Arc::new(reduction_weights(valid.as_deref(), positions, 1, reduction)?);
            let job = match self.distance {
                HiddenDistance::Mse => RelationJob::HiddenMse { weights },
                HiddenDistance::Cosine => RelationJob::HiddenCosine { weights },
            };
            return Ok(relation_loss(student, teacher, job));
        }
        reduce(self.composed(student, teacher), mask, 1, reduction, self.check_inputs)
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
        let (student, teacher) = self.rows(student, teacher)?;
        Ok(self.composed(student, teacher))
    }

    /// Both sides as `[positions, width]` f32 rows (the teacher detached), checked.
    fn rows<const D: usize>(&self, student: Tensor<D>, teacher: Tensor<D>) -> crate::Result<(Tensor<2>, Tensor<2>)> {
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
        Ok((student, teacher))
    }

    /// The loss at every position of checked rows, composed from tensor operations.
    fn composed(&self, student: Tensor<2>, teacher: Tensor<2>) -> Tensor<1> {
        let [positions, _] = student.dims();
        let per_position = match self.distance {
            HiddenDistance::Mse => (student - teacher).powi_scalar(2).mean_dim(1),
            HiddenDistance::Cosine => {
                let dot = (student.clone() * teacher.clone()).sum_dim(1);
                let norms = norm_floor(student, 1, COSINE_EPS) * norm_floor(teacher, 1, COSINE_EPS);
                (dot / norms).neg().add_scalar(1.0)
            }
        };
        per_position.reshape([positions])
    }
}
