//! Similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;

use crate::fused::{Implementation, RelationJob, relation_loss, use_host_relation};
use crate::relation::common::{check_examples, check_features, example_rows, normalize};

/// Configuration of [`SpLoss`].
///
/// Each side's batch similarity matrix `G = F Fᵀ` (`F` the features flattened to
/// `[batch, features]`) is scaled row by row to unit L2 norm; the loss is
/// `‖G_t − G_s‖²_F / batch²`. Widths may differ.
///
/// | Name | Default | Purpose |
/// |---|---|---|
/// | `check_inputs` | true | refuse NaN / infinite features |
/// | `implementation` | `Auto` | one host kernel on the CPU devices (ndarray, flex), composed tensor ops elsewhere; see [`Implementation`] |
#[derive(Config, Debug)]
pub struct SpLossConfig {
    /// Check the features for NaN and infinities (one device read).
    #[config(default = true)]
    pub check_inputs: bool,
    /// One host kernel (loss and gradient together) or composed tensor operations.
    #[config(default = "Implementation::Auto")]
    pub implementation: Implementation,
}

impl SpLossConfig {
    /// Builds the loss (it has no hyper-parameter to refuse).
    pub fn init(&self) -> SpLoss {
        SpLoss {
            check_inputs: self.check_inputs,
            implementation: self.implementation,
        }
    }
}

/// Similarity-preserving loss; built by [`SpLossConfig`].
#[derive(Module, Debug)]
pub struct SpLoss {
    /// Whether inputs are checked.
    pub check_inputs: bool,
    /// Host kernel or composed tensor operations.
    #[module(skip)]
    pub implementation: Implementation,
}

impl SpLoss {
    /// The loss of the batch (a relation between its examples: no reduction to choose).
    ///
    /// # Shapes
    /// - student: `[batch, ..]` (flattened to `[batch, features]`)
    /// - teacher: `[batch, ..]`, its own width
    /// - output: `[1]`
    ///
    /// # Errors
    /// [`LossError::TooFewExamples`](crate::LossError::TooFewExamples) for an empty batch,
    /// [`LossError::FeatureShape`](crate::LossError::FeatureShape) for different batch sizes,
    /// [`LossError::NonFinite`](crate::LossError::NonFinite).
    pub fn forward<const D: usize>(&self, student: Tensor<D>, teacher: Tensor<D>) -> crate::Result<Tensor<1>> {
        let student = example_rows(student, "student features")?;
        let teacher = example_rows(teacher, "teacher features")?.detach();
        let examples = check_examples(&student, &teacher, "SP", 1)?;
        if self.check_inputs {
            check_features(&student, &teacher)?;
        }
        if use_host_relation(self.implementation, &student, &teacher)? {
            return Ok(relation_loss(student, teacher, RelationJob::Sp));
        }
        let gram = |rows: Tensor<2>| normalize(rows.clone().matmul(rows.transpose()), 1);
        let difference = gram(teacher) - gram(student);
        Ok(difference.powi_scalar(2).sum().div_scalar((examples * examples) as f64))
    }
}
