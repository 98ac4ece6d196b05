//! DIST: knowledge distillation from a stronger teacher (Huang, You, Wang, Qian & Xu,
//! NeurIPS 2022): inter- and intra-class Pearson correlation of the predictions.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;

use crate::error::{check_range, check_temperature};
use crate::fused::{Implementation, RelationJob, relation_loss, use_host_relation};
use crate::input::{check_logits, flatten, widen_f32};
use crate::relation::common::{NORM_FLOOR, check_examples, norm_floor};
use crate::temperature::temperature_softmax;

/// Added to the product of norms in the Pearson correlation, as in the authors' code.
const PEARSON_EPS: f64 = 1e-8;

/// Configuration of [`DistLoss`]: `τ² · (β · inter + γ · intra)`.
///
/// With `y = softmax(z / τ)` for both sides, `inter = 1 − mean over examples of
/// pearson(y_s[i, :], y_t[i, :])` (does the student rank the classes as the teacher does?) and
/// `intra = 1 − mean over classes of pearson(y_s[:, c], y_t[:, c])` (does it rank the examples
/// as the teacher does, class by class?). Rank-3 logits are flattened to positions, which then
/// play the examples. A batch of one has no intra-class variation: its intra term is 1, with
/// zero gradient.
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `beta` | 1.0 | weight of the inter-class term | `≥ 0` |
/// | `gamma` | 1.0 | weight of the intra-class term | `≥ 0` |
/// | `temperature` | 1.0 | τ (the paper: 1 on ImageNet, 4 on CIFAR-100) | `> 0` |
/// | `check_inputs` | true | refuse NaN / +inf logits | |
/// | `implementation` | `Auto` | one host kernel on the CPU devices (ndarray, flex), composed tensor ops elsewhere | see [`Implementation`] |
#[derive(Config, Debug)]
pub struct DistLossConfig {
    /// Weight of the inter-class relation.
    #[config(default = 1.0)]
    pub beta: f64,
    /// Weight of the intra-class relation.
    #[config(default = 1.0)]
    pub gamma: f64,
    /// Temperature of both softmaxes.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Check the logits for NaN, +inf and all -inf rows (one device read each).
    #[config(default = true)]
    pub check_inputs: bool,
    /// One host kernel (loss and gradient together) or composed tensor operations.
    #[config(default = "Implementation::Auto")]
    pub implementation: Implementation,
}

impl DistLossConfig {
    /// Builds the loss, or says which hyper-parameter is out of range.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`](crate::LossError::InvalidParameter) for a negative
    /// weight or a temperature that is not positive.
    pub fn try_init(&self) -> crate::Result<DistLoss> {
        check_range("beta", self.beta, 0.0, f64::MAX, "a finite value >= 0")?;
        check_range("gamma", self.gamma, 0.0, f64::MAX, "a finite value >= 0")?;
        check_temperature(self.temperature)?;
        Ok(DistLoss {
            beta: self.beta,
            gamma: self.gamma,
            temperature: self.temperature,
            check_inputs: self.check_inputs,
            implementation: self.implementation,
        })
    }

    /// Builds the loss.
    ///
    /// # Panics
    /// When a hyper-parameter is out of range; the message names it.
    pub fn init(&self) -> DistLoss {
        self.try_init()
            .unwrap_or_else(|error| panic!("invalid DistLossConfig: {error}"))
    }
}

/// DIST loss; built by [`DistLossConfig`].
#[derive(Module, Debug)]
pub struct DistLoss {
    /// Weight of the inter-class term.
    #[module(skip)]
    pub beta: f64,
    /// Weight of the intra-class term.
    #[module(skip)]
    pub gamma: f64,
    /// Temperature.
    #[module(skip)]
    pub temperature: f64,
    /// Whether inputs are checked.
    pub check_inputs: bool,
    /// Host kernel or composed tensor operations.
    #[module(skip)]
    pub implementation: Implementation,
}

impl DistLoss {
    /// The loss of the batch (the intra-class term relates its examples: no reduction to
    /// choose).
    ///
    /// # Shapes
    /// - student_logits: `[batch, classes]` or `[batch, seq, vocab]`
    /// - teacher_logits: same shape
    /// - output: `[1]`
    ///
    /// # Errors
    /// [`LossError::ShapeMismatch`](crate::LossError::ShapeMismatch) for different shapes,
    /// [`LossError::TooFewExamples`](crate::LossError::TooFewExamples) for an empty batch,
    /// [`LossError::NonFinite`](crate::LossError::NonFinite) /
    /// [`LossError::EmptyDistribution`](crate::LossError::EmptyDistribution) for bad logits.
    pub fn forward<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
    ) -> crate::Result<Tensor<1>> {
        let (student, teacher) = self.rows(student_logits, teacher_logits)?;
        if use_host_relation(self.implementation, &student, &teacher)? {
            let job = RelationJob::Dist {
                beta: self.beta,
                gamma: self.gamma,
                temperature: self.temperature,
            };
            return Ok(relation_loss(student, teacher, job));
        }
        let (inter, intra) = self.composed_terms(student, teacher)?;
        let scale = self.temperature * self.temperature;
        Ok(inter.mul_scalar(self.beta * scale) + intra.mul_scalar(self.gamma * scale))
    }

    /// The inter- and intra-class terms, unweighted and without `τ²`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn terms<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
    ) -> crate::Result<(Tensor<1>, Tensor<1>)> {
        let (student, teacher) = self.rows(student_logits, teacher_logits)?;
        self.composed_terms(student, teacher)
    }

    /// Both sides as `[positions, classes]` f32 rows (the teacher detached), checked.
    fn rows<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
    ) -> crate::Result<(Tensor<2>, Tensor<2>)> {
        let student = flatten(student_logits, "student logits")?.rows;
        let teacher = flatten(teacher_logits, "teacher logits")?.rows;
        if student.dims() != teacher.dims() {
            return Err(crate::LossError::ShapeMismatch {
                tensor: "teacher logits",
                expected: student.dims().to_vec(),
                actual: teacher.dims().to_vec(),
            });
        }
        check_examples(&student, &teacher, "DIST", 1)?;
        // (`temperature` is a public field: checked here for the host kernel too.)
        check_temperature(self.temperature)?;
        if self.check_inputs {
            check_logits(&student, "student logits")?;
            check_logits(&teacher, "teacher logits")?;
        }
        Ok((widen_f32(student), widen_f32(teacher).detach()))
    }

    fn composed_terms(&self, student: Tensor<2>, teacher: Tensor<2>) -> crate::Result<(Tensor<1>, Tensor<1>)> {
        let student = temperature_softmax(student, self.temperature)?;
        let teacher = temperature_softmax(teacher, self.temperature)?;
        let inter = pearson(student.clone(), teacher.clone(), 1)
            .mean()
            .neg()
            .add_scalar(1.0);
        let intra = pearson(student, teacher, 0).mean().neg().add_scalar(1.0);
        Ok((inter, intra))
    }
}

/// Pearson correlation between `a` and `b` along `dim` (the other dimension indexes the pairs).
fn pearson(a: Tensor<2>, b: Tensor<2>, dim: usize) -> Tensor<2> {
    let a = a.clone() - a.mean_dim(dim);
    let b = b.clone() - b.mean_dim(dim);
    let dot = (a.clone() * b.clone()).sum_dim(dim);
    let norms = norm_floor(a, dim, NORM_FLOOR) * norm_floor(b, dim, NORM_FLOOR);
    dot / norms.add_scalar(PEARSON_EPS)
}
