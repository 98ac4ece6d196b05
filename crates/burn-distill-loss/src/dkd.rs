//! Decoupled knowledge distillation (Zhao et al., CVPR 2022).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Int, Tensor};

use crate::error::{LossError, check_range, check_temperature};
use crate::input::{Labelled, flatten_labelled, unflatten};
use crate::math::{kl_rows, log_sum_exp_rows};
use crate::reduction::{Reduction, reduce};
use crate::temperature::scaled_log_softmax;
use crate::vocab::VocabPolicy;

/// Configuration of [`DkdLoss`]: `T² · (α · TCKD + β · NCKD)`.
///
/// TCKD is the binary KL between teacher and student on "target class" versus "any other
/// class"; NCKD is the KL between their distributions over the non-target classes,
/// renormalised. Unlike the reference code, which subtracts 1000 from the target logit,
/// the target class is removed exactly, so NCKD stays right for logits of any size.
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `alpha` | 1.0 | weight of TCKD | `≥ 0` |
/// | `beta` | 8.0 | weight of NCKD (the paper uses 8 on CIFAR-100) | `≥ 0` |
/// | `temperature` | 4.0 | softens both distributions | `T > 0` |
/// | `scale_by_temperature_squared` | true | the paper's `T²` factor | |
/// | `ignore_index` | [`IGNORE_INDEX`](crate::IGNORE_INDEX) (-100) | labels equal to it mask their position | |
/// | `check_inputs` | true | refuse NaN/+inf logits and out-of-range labels | |
#[derive(Config, Debug)]
pub struct DkdLossConfig {
    /// Weight of the target-class term.
    #[config(default = 1.0)]
    pub alpha: f64,
    /// Weight of the non-target-class term.
    #[config(default = 8.0)]
    pub beta: f64,
    /// Temperature of both terms.
    #[config(default = 4.0)]
    pub temperature: f64,
    /// Multiply by `T²`.
    #[config(default = true)]
    pub scale_by_temperature_squared: bool,
    /// Label value that marks a position to ignore.
    #[config(default = "crate::IGNORE_INDEX")]
    pub ignore_index: i64,
    /// Check inputs for NaN, +inf and out-of-range labels.
    #[config(default = true)]
    pub check_inputs: bool,
}

impl DkdLossConfig {
    /// Builds the loss, or says which hyper-parameter is out of range.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`] for a negative or non-finite `alpha`/`beta`, or a
    /// temperature that is not positive.
    pub fn try_init(&self) -> crate::Result<DkdLoss> {
        check_range("alpha", self.alpha, 0.0, f64::MAX, "a finite value >= 0")?;
        check_range("beta", self.beta, 0.0, f64::MAX, "a finite value >= 0")?;
        check_temperature(self.temperature)?;
        Ok(DkdLoss {
            alpha: self.alpha,
            beta: self.beta,
            temperature: self.temperature,
            scale_by_temperature_squared: self.scale_by_temperature_squared,
            ignore_index: self.ignore_index,
            check_inputs: self.check_inputs,
        })
    }

    /// Builds the loss.
    ///
    /// # Panics
    /// When a hyper-parameter is out of range; the message names it and its range.
    pub fn init(&self) -> DkdLoss {
        self.try_init()
            .unwrap_or_else(|error| panic!("invalid DkdLossConfig: {error}"))
    }
}

/// Decoupled KD loss; built by [`DkdLossConfig`].
#[derive(Module, Debug)]
pub struct DkdLoss {
    /// Weight of TCKD.
    #[module(skip)]
    pub alpha: f64,
    /// Weight of NCKD.
    #[module(skip)]
    pub beta: f64,
    /// Temperature.
    #[module(skip)]
    pub temperature: f64,
    /// Whether the loss is multiplied by `T²`.
    pub scale_by_temperature_squared: bool,
    /// Label value that is ignored.
    #[module(skip)]
    pub ignore_index: i64,
    /// Whether inputs are checked.
    pub check_inputs: bool,
}

impl DkdLoss {
    /// The reduced loss.
    ///
    /// # Shapes
    /// - student_logits: `[batch, classes]` or `[batch, seq, vocab]`, at least 2 classes
    /// - teacher_logits: same shape
    /// - labels: `[batch]` or `[batch, seq]`
    /// - output: `[1]`
    ///
    /// # Errors
    /// As [`HintonKdLoss::forward`](crate::HintonKdLoss::forward), plus fewer than 2 classes.
    pub fn forward<const D: usize, const L: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
        labels: Tensor<L, Int>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        let (per_position, valid, classes, _) = self.per_position(student_logits, teacher_logits, labels)?;
        reduce(per_position, Some(valid), classes, reduction, self.check_inputs)
    }

    /// The loss at every position (0 where the label is ignored).
    ///
    /// # Shapes
    /// - output: `[batch, 1]` or `[batch, seq, 1]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_no_reduction<const D: usize, const L: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
        labels: Tensor<L, Int>,
    ) -> crate::Result<Tensor<D>> {
        let (per_position, valid, _, lead) = self.per_position(student_logits, teacher_logits, labels)?;
        Ok(unflatten(per_position.mask_fill(valid.bool_not(), 0.0), &lead))
    }

    fn per_position<const D: usize, const L: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
        labels: Tensor<L, Int>,
    ) -> crate::Result<(Tensor<1>, Tensor<1, Bool>, usize, Vec<usize>)> {
        let Labelled {
            student,
            teacher,
            labels,
            valid,
            lead,
        } = flatten_labelled(
            student_logits,
            teacher_logits,
            labels,
            VocabPolicy::Strict,
            self.check_inputs,
            self.ignore_index,
        )?;
        let [positions, classes] = student.dims();
        if classes < 2 {
            return Err(LossError::TooFewClasses {
                loss: "DKD",
                min: 2,
                classes,
            });
        }
        let labels = labels.reshape([positions, 1]);
        let device = student.device();
        let target = Tensor::<1, Int>::arange(0..classes as i64, &device)
            .reshape([1, classes])
            .expand([positions, classes])
            .equal(labels.clone().expand([positions, classes]));

        let split = |logits: Tensor<2>| {
            let scaled = if self.temperature == 1.0 {
                logits
            } else {
                logits.div_scalar(self.temperature)
            };
            let log_probs = scaled_log_softmax(scaled.clone(), 1.0);
            let others = scaled.clone().mask_fill(target.clone(), f32::NEG_INFINITY);
            let log_target = log_probs.gather(1, labels.clone());
            let log_other = log_sum_exp_rows(others.clone()) - log_sum_exp_rows(scaled);
            let binary = Tensor::cat(vec![log_target, log_other], 1);
            let non_target = scaled_log_softmax(others, 1.0);
            (binary, non_target)
        };
        let (student_binary, student_non_target) = split(student);
        let (teacher_binary, teacher_non_target) = split(teacher.detach());
        let target_term = kl_rows(teacher_binary, student_binary);
        let non_target_term = kl_rows(teacher_non_target, student_non_target);
        let mut per_position = target_term.mul_scalar(self.alpha) + non_target_term.mul_scalar(self.beta);
        if self.scale_by_temperature_squared {
            per_position = per_position.mul_scalar(self.temperature * self.temperature);
        }
        Ok((per_position, valid, classes, lead))
    }
}

/// DKD in one call: `T² · (α · TCKD + β · NCKD)`, `ignore_index` -100.
///
/// # Shapes
/// As [`DkdLoss::forward`].
///
/// # Errors
/// As [`DkdLoss::forward`], plus invalid `alpha`, `beta` or `temperature`.
pub fn decoupled_kd<const D: usize, const L: usize>(
    student_logits: Tensor<D>,
    teacher_logits: Tensor<D>,
    labels: Tensor<L, Int>,
    alpha: f64,
    beta: f64,
    temperature: f64,
    reduction: Reduction,
) -> crate::Result<Tensor<1>> {
    DkdLossConfig::new()
        .with_alpha(alpha)
        .with_beta(beta)
        .with_temperature(temperature)
        .try_init()?
        .forward(student_logits, teacher_logits, labels, reduction)
}
