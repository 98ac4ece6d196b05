//! Hinton et al.'s knowledge-distillation loss.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Int, Tensor, activation};

use crate::error::{check_range, check_temperature};
use crate::fused::{Implementation, RowSpec, fused_loss, kernel_labels, use_fused};
use crate::input::{Labelled, flatten_labelled, flatten_pair, flatten_positions, read_ints, unflatten};
use crate::math::{kl_rows, row_sum};
use crate::reduction::{Reduction, reduce, reduction_weights};
use crate::temperature::scaled_log_softmax;
use crate::vocab::VocabPolicy;

/// Configuration of [`HintonKdLoss`]:
/// `α · CE(student, labels) + (1 − α) · T² · KL(softmax(t/T) ‖ softmax(s/T))`.
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `alpha` | 0.5 | weight of the hard-label cross-entropy | `[0, 1]` |
/// | `temperature` | 4.0 | softens both distributions in the KL term only | `T > 0` |
/// | `scale_by_temperature_squared` | true | the `T²` factor that keeps soft-term gradients the same size at any `T` | |
/// | `label_smoothing` | 0.0 | hard target `(1 − ε) onehot + ε / C`, as PyTorch's `label_smoothing` | `[0, 1]` |
/// | `ignore_index` | [`IGNORE_INDEX`](crate::IGNORE_INDEX) (-100) | labels equal to it mask their position out of both terms | |
/// | `vocab_policy` | `Strict` | different class counts | see [`VocabPolicy`] |
/// | `check_inputs` | true | refuse NaN/+inf logits and out-of-range labels | |
/// | `implementation` | `Auto` | fused kernel or composed tensor ops ([`forward_terms`](HintonKdLoss::forward_terms) is always composed) | see [`Implementation`] |
#[derive(Config, Debug)]
pub struct HintonKdLossConfig {
    /// Weight of the cross-entropy on the labels.
    #[config(default = 0.5)]
    pub alpha: f64,
    /// Temperature of the soft term.
    #[config(default = 4.0)]
    pub temperature: f64,
    /// Multiply the soft term by `T²`.
    #[config(default = true)]
    pub scale_by_temperature_squared: bool,
    /// Label smoothing of the hard term.
    #[config(default = 0.0)]
    pub label_smoothing: f64,
    /// Label value that marks a position to ignore.
    #[config(default = "crate::IGNORE_INDEX")]
    pub ignore_index: i64,
    /// What to do when the class counts differ.
    #[config(default = "VocabPolicy::Strict")]
    pub vocab_policy: VocabPolicy,
    /// Check inputs for NaN, +inf and out-of-range labels.
    #[config(default = true)]
    pub check_inputs: bool,
    /// Fused kernel or composed tensor operations.
    #[config(default = "Implementation::Auto")]
    pub implementation: Implementation,
}

impl HintonKdLossConfig {
    /// Builds the loss, or says which hyper-parameter is out of range.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`](crate::LossError::InvalidParameter) for `alpha` or
    /// `label_smoothing` outside `[0, 1]`, or a temperature that is not positive.
    pub fn try_init(&self) -> crate::Result<HintonKdLoss> {
        check_range("alpha", self.alpha, 0.0, 1.0, "a value in [0, 1]")?;
        check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, "a value in [0, 1]")?;
        check_temperature(self.temperature)?;
        Ok(HintonKdLoss {
            alpha: self.alpha,
            temperature: self.temperature,
            scale_by_temperature_squared: self.scale_by_temperature_squared,
            label_smoothing: self.label_smoothing,
            ignore_index: self.ignore_index,
            vocab_policy: self.vocab_policy,
            check_inputs: self.check_inputs,
            implementation: self.implementation,
        })
    }

    /// Builds the loss.
    ///
    /// # Panics
    /// When a hyper-parameter is out of range; the message names it and its range.
    pub fn init(&self) -> HintonKdLoss {
        self.try_init()
            .unwrap_or_else(|error| panic!("invalid HintonKdLossConfig: {error}"))
    }
}

/// The two terms of a Hinton KD loss, each reduced, and their weighted sum.
#[derive(Debug, Clone)]
pub struct HintonKdTerms {
    /// `α · hard + (1 − α) · soft`.
    pub loss: Tensor<1>,
    /// Cross-entropy with the (smoothed) labels.
    pub hard: Tensor<1>,
    /// `T² · KL(teacher_T ‖ student_T)` (without `T²` when switched off).
    pub soft: Tensor<1>,
}

/// Hinton, Vinyals & Dean (2015) distillation loss; built by [`HintonKdLossConfig`].
#[derive(Module, Debug)]
pub struct HintonKdLoss {
    /// Weight of the hard term.
    #[module(skip)]
    pub alpha: f64,
    /// Temperature of the soft term.
    #[module(skip)]
    pub temperature: f64,
    /// Whether the soft term is multiplied by `T²`.
    pub scale_by_temperature_squared: bool,
    /// Label smoothing of the hard term.
    #[module(skip)]
    pub label_smoothing: f64,
    /// Label value that is ignored.
    #[module(skip)]
    pub ignore_index: i64,
    /// What to do when the class counts differ.
    #[module(skip)]
    pub vocab_policy: VocabPolicy,
    /// Whether inputs are checked.
    pub check_inputs: bool,
    /// Fused kernel or composed tensor operations.
    #[module(skip)]
    pub implementation: Implementation,
}

struct PerPosition {
    hard: Tensor<1>,
    soft: Tensor<1>,
    valid: burn::tensor::Tensor<1, burn::tensor::Bool>,
    classes: usize,
    lead: Vec<usize>,
}

impl HintonKdLoss {
    /// The reduced loss; positions whose label is `ignore_index` are left out of both terms
    /// and of the mean.
    ///
    /// # Shapes
    /// - student_logits: `[batch, classes]` or `[batch, seq, vocab]`
    /// - teacher_logits: same leading dimensions
    /// - labels: `[batch]` or `[batch, seq]`
    /// - output: `[1]`
    ///
    /// # Errors
    /// As [`DivergenceLoss::forward`](crate::DivergenceLoss::forward), plus labels of the
    /// wrong shape or out of range, and no valid position for the mean reductions.
    pub fn forward<const D: usize, const L: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
        labels: Tensor<L, Int>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        if use_fused(self.implementation, &student_logits, &teacher_logits)? {
            return self.run_fused(student_logits, teacher_logits, labels, Some(reduction));
        }
        Ok(self
            .forward_terms(student_logits, teacher_logits, labels, reduction)?
            .loss)
    }

    /// The reduced loss and both of its terms, for logging.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward).
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_terms<const D: usize, const L: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
        labels: Tensor<L, Int>,
        reduction: Reduction,
    ) -> crate::Result<HintonKdTerms> {
        let terms = self.per_position(student_logits, teacher_logits, labels)?;
        let reduce_term = |values: Tensor<1>| {
            reduce(
                values,
                Some(terms.valid.clone()),
                terms.classes,
                reduction,
                self.check_inputs,
            )
        };
        let hard = reduce_term(terms.hard)?;
        let soft = reduce_term(terms.soft)?;
        let loss = hard.clone().mul_scalar(self.alpha) + soft.clone().mul_scalar(1.0 - self.alpha);
        Ok(HintonKdTerms { loss, hard, soft })
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
        if use_fused(self.implementation, &student_logits, &teacher_logits)? {
            let lead = student_logits.dims()[..D - 1].to_vec();
            let per_position = self.run_fused(student_logits, teacher_logits, labels, None)?;
            return Ok(unflatten(per_position, &lead));
        }
        let terms = self.per_position(student_logits, teacher_logits, labels)?;
        let combined = terms.hard.mul_scalar(self.alpha) + terms.soft.mul_scalar(1.0 - self.alpha);
        Ok(unflatten(combined.mask_fill(terms.valid.bool_not(), 0.0), &terms.lead))
    }

    /// The fused kernel: reduced to `[1]` with `reduction`, or per position (`None`).
    fn run_fused<const D: usize, const L: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
        labels: Tensor<L, Int>,
        reduction: Option<Reduction>,
    ) -> crate::Result<Tensor<1>> {
        let (student, teacher, lead) = flatten_pair(student_logits, teacher_logits, self.vocab_policy, false, false)?;
        let [positions, classes] = student.dims();
        // The labels are read in any case: the kernel indexes the row with them.
        let labels = read_ints(flatten_positions(labels, &lead, "labels")?.into_data());
        let (labels, valid) = kernel_labels(labels, self.ignore_index, classes)?;
        let weights = match reduction {
            Some(reduction) => reduction_weights(Some(&valid), positions, classes, reduction)?,
            None => valid.iter().map(|&valid| if valid { 1.0 } else { 0.0 }).collect(),
        };
        let spec = RowSpec::weighted(
            crate::Divergence::ForwardKl,
            self.temperature,
            self.scale_by_temperature_squared,
            self.alpha,
            self.label_smoothing,
        );
        fused_loss(
            student,
            teacher,
            spec,
            Some(labels),
            Some(weights),
            reduction.is_some(),
            self.check_inputs,
        )
    }

    fn per_position<const D: usize, const L: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
        labels: Tensor<L, Int>,
    ) -> crate::Result<PerPosition> {
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
            self.vocab_policy,
            self.check_inputs,
            self.ignore_index,
        )?;
        let [positions, classes] = student.dims();
        let student_log_probs = activation::log_softmax(student.clone(), 1);
        let label_log_probs = student_log_probs
            .clone()
            .gather(1, labels.reshape([positions, 1]))
            .reshape([positions]);
        let mut hard = label_log_probs.mul_scalar(-(1.0 - self.label_smoothing));
        if self.label_smoothing > 0.0 {
            let uniform = row_sum(student_log_probs).mul_scalar(-self.label_smoothing / classes as f64);
            hard = hard + uniform;
        }

        let soft_student = scaled_log_softmax(student, self.temperature);
        let soft_teacher = scaled_log_softmax(teacher.detach(), self.temperature);
        let mut soft = kl_rows(soft_teacher, soft_student);
        if self.scale_by_temperature_squared {
            soft = soft.mul_scalar(self.temperature * self.temperature);
        }
        Ok(PerPosition {
            hard,
            soft,
            valid,
            classes,
            lead,
        })
    }
}

/// Hinton KD in one call: `α · CE(student, labels) + (1 − α) · T² · KL(teacher_T ‖ student_T)`,
/// with the defaults of [`HintonKdLossConfig`] otherwise (`T²` on, no label smoothing,
/// `ignore_index` -100, strict vocabulary).
///
/// # Shapes
/// As [`HintonKdLoss::forward`].
///
/// # Errors
/// As [`HintonKdLoss::forward`], plus invalid `alpha` or `temperature`.
pub fn hinton_kd<const D: usize, const L: usize>(
    student_logits: Tensor<D>,
    teacher_logits: Tensor<D>,
    labels: Tensor<L, Int>,
    alpha: f64,
    temperature: f64,
    reduction: Reduction,
) -> crate::Result<Tensor<1>> {
    HintonKdLossConfig::new()
        .with_alpha(alpha)
        .with_temperature(temperature)
        .try_init()?
        .forward(student_logits, teacher_logits, labels, reduction)
}
