//! Divergences between the teacher's and the student's temperature-softened distributions.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Tensor};

use crate::error::check_temperature;
use crate::fused::{Implementation, RowSpec, fused_loss, use_fused};
use crate::input::{flatten_pair, flatten_positions, read_bools, unflatten};
use crate::math::{cross_entropy_rows, kl_rows, mixture_kl_rows, total_variation_rows};
use crate::reduction::{Reduction, reduce, reduction_weights};
use crate::temperature::scaled_log_softmax;
use crate::vocab::VocabPolicy;

pub use crate::spec::Divergence;

/// The composed path of each divergence.
impl Divergence {
    /// One value per row of `[positions, classes]` log-probabilities.
    pub(crate) fn rows(&self, student_log_probs: Tensor<2>, teacher_log_probs: Tensor<2>) -> Tensor<1> {
        let (q, p) = (student_log_probs, teacher_log_probs);
        match *self {
            Divergence::ForwardKl => kl_rows(p, q),
            Divergence::ReverseKl => kl_rows(q, p),
            Divergence::SymmetricKl => kl_rows(p.clone(), q.clone()) + kl_rows(q, p),
            Divergence::GeneralizedJsd { beta } => {
                let teacher_side = scaled_mixture(p.clone(), q.clone(), 1.0 - beta);
                let student_side = scaled_mixture(q, p, beta);
                teacher_side + student_side
            }
            Divergence::SkewKl { alpha } => mixture_kl_rows(p, q, 1.0 - alpha),
            Divergence::SkewReverseKl { alpha } => mixture_kl_rows(q, p, 1.0 - alpha),
            Divergence::TotalVariation => total_variation_rows(p, q),
            Divergence::SoftCrossEntropy => cross_entropy_rows(p, q),
        }
    }
}

/// `KL(a ‖ (1 − w) a + w b) / w`, which tends to 0 as `w → 0`.
fn scaled_mixture(log_a: Tensor<2>, log_b: Tensor<2>, weight: f64) -> Tensor<1> {
    if weight == 0.0 {
        let positions = log_a.dims()[0];
        return Tensor::zeros([positions], &log_a.device());
    }
    mixture_kl_rows(log_a, log_b, weight).div_scalar(weight)
}

/// Configuration of a [`DivergenceLoss`].
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `divergence` | (required) | which divergence | see [`Divergence`] |
/// | `temperature` | 1.0 | both sides are `softmax(logits / T)` | `T > 0` |
/// | `scale_by_temperature_squared` | false | multiply by `T²` (Hinton's gradient scale) | |
/// | `vocab_policy` | `Strict` | different class counts | see [`VocabPolicy`] |
/// | `check_inputs` | true | refuse NaN/+inf logits and bad masks (one device read per call) | |
/// | `implementation` | `Auto` | fused kernel or composed tensor ops | see [`Implementation`] |
#[derive(Config, Debug)]
pub struct DivergenceLossConfig {
    /// Which divergence.
    pub divergence: Divergence,
    /// Temperature applied to both student and teacher logits.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Multiply the divergence by `T²`.
    #[config(default = false)]
    pub scale_by_temperature_squared: bool,
    /// What to do when the class counts differ.
    #[config(default = "VocabPolicy::Strict")]
    pub vocab_policy: VocabPolicy,
    /// Check inputs for NaN, +inf and empty masks.
    #[config(default = true)]
    pub check_inputs: bool,
    /// Fused kernel or composed tensor operations.
    #[config(default = "Implementation::Auto")]
    pub implementation: Implementation,
}

impl DivergenceLossConfig {
    /// Builds the loss, or says which hyper-parameter is out of range.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`](crate::LossError::InvalidParameter) for a temperature
    /// that is not positive, or a `beta`/`alpha` outside `[0, 1]`.
    pub fn try_init(&self) -> crate::Result<DivergenceLoss> {
        check_temperature(self.temperature)?;
        self.divergence.validate()?;
        Ok(DivergenceLoss {
            divergence: self.divergence,
            temperature: self.temperature,
            scale_by_temperature_squared: self.scale_by_temperature_squared,
            vocab_policy: self.vocab_policy,
            check_inputs: self.check_inputs,
            implementation: self.implementation,
        })
    }

    /// Builds the loss.
    ///
    /// # Panics
    /// When a hyper-parameter is out of range; the message names it and its range.
    pub fn init(&self) -> DivergenceLoss {
        self.try_init()
            .unwrap_or_else(|error| panic!("invalid DivergenceLossConfig: {error}"))
    }
}

/// A divergence between teacher and student logits; built by [`DivergenceLossConfig`].
///
/// The teacher may be given as logits or as log-probabilities: log-probabilities are logits
/// whose log-sum-exp is zero, so both give the same result.
#[derive(Module, Debug)]
pub struct DivergenceLoss {
    /// Which divergence.
    #[module(skip)]
    pub divergence: Divergence,
    /// Temperature applied to both sides.
    #[module(skip)]
    pub temperature: f64,
    /// Whether the result is multiplied by `T²`.
    pub scale_by_temperature_squared: bool,
    /// What to do when the class counts differ.
    #[module(skip)]
    pub vocab_policy: VocabPolicy,
    /// Whether inputs are checked.
    pub check_inputs: bool,
    /// Fused kernel or composed tensor operations.
    #[module(skip)]
    pub implementation: Implementation,
}

impl DivergenceLoss {
    /// The reduced loss.
    ///
    /// # Shapes
    /// - student_logits: `[batch, classes]` or `[batch, seq, vocab]`
    /// - teacher_logits: same leading dimensions; last dimension per the vocabulary policy
    /// - output: `[1]`
    ///
    /// # Errors
    /// A [`LossError`](crate::LossError) naming the input for a rank other than 2 or 3,
    /// leading dimensions that differ, a vocabulary mismatch under `Strict`, NaN or +inf
    /// logits, or a row of all `-inf`.
    pub fn forward<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        if self.fused(&student_logits, &teacher_logits)? {
            let (student, teacher, _) = flatten_pair(student_logits, teacher_logits, self.vocab_policy, false, false)?;
            let [positions, classes] = student.dims();
            let weights = reduction_weights(None, positions, classes, reduction)?;
            return self.run_fused(student, teacher, weights, true);
        }
        let (per_position, classes, _) = self.per_position(student_logits, teacher_logits)?;
        reduce(per_position, None, classes, reduction, self.check_inputs)
    }

    /// The reduced loss over the positions where `mask` is true (padding masked out).
    ///
    /// Use [`valid_mask`](crate::valid_mask) to build the mask from `ignore_index` labels.
    ///
    /// # Shapes
    /// - student_logits: `[batch, classes]` or `[batch, seq, vocab]`
    /// - teacher_logits: as for [`forward`](Self::forward)
    /// - mask: `[batch]` or `[batch, seq]`, `true` where the position counts
    /// - output: `[1]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward), plus a mask of the wrong shape and, for the mean
    /// reductions, a mask with no valid position.
    pub fn forward_masked<const D: usize, const L: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
        mask: Tensor<L, Bool>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        if self.fused(&student_logits, &teacher_logits)? {
            let (student, teacher, lead) =
                flatten_pair(student_logits, teacher_logits, self.vocab_policy, false, false)?;
            let [positions, classes] = student.dims();
            let valid = read_bools(flatten_positions(mask, &lead, "mask")?);
            let weights = reduction_weights(Some(&valid), positions, classes, reduction)?;
            return self.run_fused(student, teacher, weights, true);
        }
        let (per_position, classes, lead) = self.per_position(student_logits, teacher_logits)?;
        let mask = flatten_positions(mask, &lead, "mask")?;
        reduce(per_position, Some(mask), classes, reduction, self.check_inputs)
    }

    /// The divergence at every position, summed over classes only.
    ///
    /// # Shapes
    /// - student_logits: `[batch, classes]` or `[batch, seq, vocab]`
    /// - teacher_logits: as for [`forward`](Self::forward)
    /// - output: `[batch, 1]` or `[batch, seq, 1]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_no_reduction<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
    ) -> crate::Result<Tensor<D>> {
        if self.fused(&student_logits, &teacher_logits)? {
            let (student, teacher, lead) =
                flatten_pair(student_logits, teacher_logits, self.vocab_policy, false, false)?;
            let positions = student.dims()[0];
            let per_position = self.run_fused(student, teacher, vec![1.0; positions], false)?;
            return Ok(unflatten(per_position, &lead));
        }
        let (per_position, _, lead) = self.per_position(student_logits, teacher_logits)?;
        Ok(unflatten(per_position, &lead))
    }

    /// Whether this call runs the fused kernel.
    fn fused<const D: usize>(&self, student_logits: &Tensor<D>, teacher_logits: &Tensor<D>) -> crate::Result<bool> {
        use_fused(self.implementation, student_logits, teacher_logits)
    }

    /// The fused kernel on aligned `[positions, classes]` rows; bad values found by the kernel
    /// are named by the same checks as the composed path.
    fn run_fused(
        &self,
        student: Tensor<2>,
        teacher: Tensor<2>,
        weights: Vec<f32>,
        reduced: bool,
    ) -> crate::Result<Tensor<1>> {
        let spec = RowSpec::weighted(
            self.divergence,
            self.temperature,
            self.scale_by_temperature_squared,
            0.0,
            0.0,
        );
        fused_loss(student, teacher, spec, None, Some(weights), reduced, self.check_inputs)
    }

    fn per_position<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
    ) -> crate::Result<(Tensor<1>, usize, Vec<usize>)> {
        let (student, teacher, lead) = flatten_pair(
            student_logits,
            teacher_logits,
            self.vocab_policy,
            self.check_inputs,
            true,
        )?;
        let classes = student.dims()[1];
        let student_log_probs = scaled_log_softmax(student, self.temperature);
        let teacher_log_probs = scaled_log_softmax(teacher.detach(), self.temperature);
        let mut per_position = self.divergence.rows(student_log_probs, teacher_log_probs);
        if self.scale_by_temperature_squared {
            per_position = per_position.mul_scalar(self.temperature * self.temperature);
        }
        Ok((per_position, classes, lead))
    }
}

/// Computes `divergence` at `temperature` (no `T²` factor, strict vocabulary).
///
/// # Errors
/// As [`DivergenceLoss::forward`], plus invalid hyper-parameters.
pub fn divergence<const D: usize>(
    divergence: Divergence,
    student_logits: Tensor<D>,
    teacher_logits: Tensor<D>,
    temperature: f64,
    reduction: Reduction,
) -> crate::Result<Tensor<1>> {
    DivergenceLossConfig::new(divergence)
        .with_temperature(temperature)
        .try_init()?
        .forward(student_logits, teacher_logits, reduction)
}

macro_rules! divergence_fn {
    ($(#[$doc:meta])* $name:ident => $variant:expr $(, $param:ident)?) => {
        $(#[$doc])*
        ///
        /// Plain-function form of [`DivergenceLoss`]: no `T²` factor, strict vocabulary, inputs
        /// checked.
        ///
        /// # Errors
        /// As [`DivergenceLoss::forward`], plus invalid hyper-parameters.
        pub fn $name<const D: usize>(
            student_logits: Tensor<D>,
            teacher_logits: Tensor<D>,
            $($param: f64,)?
            temperature: f64,
            reduction: Reduction,
        ) -> crate::Result<Tensor<1>> {
            divergence($variant, student_logits, teacher_logits, temperature, reduction)
        }
    };
}

divergence_fn!(/// Forward KL, `KL(teacher ‖ student)`.
    forward_kl => Divergence::ForwardKl);
divergence_fn!(/// Reverse KL, `KL(student ‖ teacher)`.
    reverse_kl => Divergence::ReverseKl);
divergence_fn!(/// Symmetric KL, forward plus reverse.
    symmetric_kl => Divergence::SymmetricKl);
divergence_fn!(/// Normalised generalised JSD with teacher weight `beta`.
    generalized_jsd => Divergence::GeneralizedJsd { beta }, beta);
divergence_fn!(/// Skew KL with teacher weight `alpha` in the mixture.
    skew_kl => Divergence::SkewKl { alpha }, alpha);
divergence_fn!(/// Skew reverse KL with student weight `alpha` in the mixture.
    skew_reverse_kl => Divergence::SkewReverseKl { alpha }, alpha);
divergence_fn!(/// Total variation distance.
    total_variation => Divergence::TotalVariation);
divergence_fn!(/// Soft-target cross-entropy.
    soft_cross_entropy => Divergence::SoftCrossEntropy);
