//! Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;

use crate::error::check_range;
use crate::fused::{Implementation, RelationJob, relation_loss, use_host_relation};
use crate::relation::common::{NORM_FLOOR, check_examples, check_features, example_rows, norm_floor};

/// Configuration of [`PktLoss`].
///
/// Each side's examples are scaled to unit length; their cosine similarities, mapped to
/// `(cos + 1) / 2` and normalised to sum to one along each row, are a conditional distribution
/// over the batch for every example. The loss is the mean over the `[batch, batch]` entries of
/// `p_t · log((p_t + ε) / (p_s + ε))`, as the authors' code computes it. Widths may differ.
/// A batch of one gives 0 (each example's only neighbour is itself); a zero feature vector
/// stays zero after scaling and has a finite gradient (the reference code's is NaN).
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `eps` | 1e-7 | added to norms and probabilities, as in the authors' code | `> 0` |
/// | `check_inputs` | true | refuse NaN / infinite features | |
/// | `implementation` | `Auto` | one host kernel on the CPU devices (ndarray, flex), composed tensor ops elsewhere | see [`Implementation`] |
#[derive(Config, Debug)]
pub struct PktLossConfig {
    /// Added to the norms and inside the logarithm.
    #[config(default = 1e-7)]
    pub eps: f64,
    /// Check the features for NaN and infinities (one device read).
    #[config(default = true)]
    pub check_inputs: bool,
    /// One host kernel (loss and gradient together) or composed tensor operations.
    #[config(default = "Implementation::Auto")]
    pub implementation: Implementation,
}

impl PktLossConfig {
    /// Builds the loss, or says which hyper-parameter is out of range.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`](crate::LossError::InvalidParameter) for `eps ≤ 0`.
    pub fn try_init(&self) -> crate::Result<PktLoss> {
        check_range("eps", self.eps, f64::MIN_POSITIVE, 1.0, "a value in (0, 1]")?;
        Ok(PktLoss {
            eps: self.eps,
            check_inputs: self.check_inputs,
            implementation: self.implementation,
        })
    }

    /// Builds the loss.
    ///
    /// # Panics
    /// When `eps` is out of range; the message names it.
    pub fn init(&self) -> PktLoss {
        self.try_init()
            .unwrap_or_else(|error| panic!("invalid PktLossConfig: {error}"))
    }
}

/// Probabilistic knowledge-transfer loss; built by [`PktLossConfig`].
#[derive(Module, Debug)]
pub struct PktLoss {
    /// Added to norms and probabilities.
    #[module(skip)]
    pub eps: f64,
    /// Whether inputs are checked.
    pub check_inputs: bool,
    /// Host kernel or composed tensor operations.
    #[module(skip)]
    pub implementation: Implementation,
}

impl PktLoss {
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
        check_examples(&student, &teacher, "PKT", 1)?;
        if self.check_inputs {
            check_features(&student, &teacher)?;
        }
        if use_host_relation(self.implementation, &student, &teacher)? {
            let job = RelationJob::Pkt { eps: self.eps as f32 };
            return Ok(relation_loss(student, teacher, job));
        }
        let student = self.conditional(student);
        let teacher = self.conditional(teacher);
        let ratio = (teacher.clone().add_scalar(self.eps) / student.add_scalar(self.eps)).log();
        Ok((teacher * ratio).mean())
    }

    fn conditional(&self, rows: Tensor<2>) -> Tensor<2> {
        let unit = rows.clone() / norm_floor(rows, 1, NORM_FLOOR).add_scalar(self.eps);
        let similarity = unit.clone().matmul(unit.transpose()).add_scalar(1.0).mul_scalar(0.5);
        similarity.clone() / similarity.sum_dim(1)
    }
}
