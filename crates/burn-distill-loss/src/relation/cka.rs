//! Linear centred kernel alignment (Kornblith, Norouzi, Lee & Hinton, ICML 2019), with the
//! debiased minibatch estimator of Nguyen, Raghu & Kornblith (ICLR 2021), as a loss and as a
//! metric.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Tensor};

use crate::error::LossError;
use crate::fused::{Implementation, RelationJob, relation_loss, use_host_relation};
use crate::reduction::kept_positions;
use crate::relation::common::{check_examples, check_features, example_rows};

/// Configuration of [`CkaLoss`]: `1 − CKA(student, teacher)` with linear kernels.
///
/// `CKA = HSIC(K, L) / √(HSIC(K, K) · HSIC(L, L))` with `K = X Xᵀ`, `L = Y Yᵀ` over the
/// batch's examples. `debiased` uses the unbiased HSIC estimator (Song et al., 2012) that
/// Nguyen et al. average over minibatches; otherwise the plain (biased) estimator
/// `tr(K H L H)`. CKA is invariant to the scale of either side and to orthogonal maps, so the
/// widths may differ and no connector is needed.
///
/// The value is computed from `XᵀY`, `XᵀX` and `YᵀY` or from the `[batch, batch]` Gram
/// matrices, whichever is cheaper, on centred features scaled to unit mean square (the same
/// number, and no overflow in f32). Constant features (no variance) have CKA 0: the loss is 1
/// with zero gradient.
///
/// | Name | Default | Purpose |
/// |---|---|---|
/// | `debiased` | true | unbiased HSIC (needs 4 examples) instead of the biased one (2) |
/// | `check_inputs` | true | refuse NaN / infinite features |
/// | `implementation` | `Auto` | one host kernel on the CPU devices (ndarray, flex) for the Gram form (a batch no wider than the features), composed tensor ops elsewhere; see [`Implementation`] |
#[derive(Config, Debug)]
pub struct CkaLossConfig {
    /// Use the unbiased HSIC estimator.
    #[config(default = true)]
    pub debiased: bool,
    /// Check the features for NaN and infinities (one device read).
    #[config(default = true)]
    pub check_inputs: bool,
    /// One host kernel (loss and gradient together) or composed tensor operations.
    #[config(default = "Implementation::Auto")]
    pub implementation: Implementation,
}

impl CkaLossConfig {
    /// Builds the loss (it has no hyper-parameter to refuse).
    pub fn init(&self) -> CkaLoss {
        CkaLoss {
            debiased: self.debiased,
            check_inputs: self.check_inputs,
            implementation: self.implementation,
        }
    }
}

/// Linear-CKA loss; built by [`CkaLossConfig`].
#[derive(Module, Debug)]
pub struct CkaLoss {
    /// Whether the unbiased HSIC estimator is used.
    pub debiased: bool,
    /// Whether inputs are checked.
    pub check_inputs: bool,
    /// Host kernel or composed tensor operations.
    #[module(skip)]
    pub implementation: Implementation,
}

/// The three HSIC values of one batch, computed on features scaled by `student_scale` and
/// `teacher_scale` (so that the true values are these times `scale⁴` or `scale² · scale²`).
#[derive(Debug, Clone)]
pub struct HsicTerms {
    /// `HSIC(K, L)`.
    pub cross: Tensor<1>,
    /// `HSIC(K, K)`.
    pub student: Tensor<1>,
    /// `HSIC(L, L)`.
    pub teacher: Tensor<1>,
    /// The (detached) scale the student's centred features were divided by.
    pub student_scale: Tensor<1>,
    /// The (detached) scale the teacher's centred features were divided by.
    pub teacher_scale: Tensor<1>,
}

impl HsicTerms {
    /// `HSIC(K, L) / √(HSIC(K, K) · HSIC(L, L))`, 0 where either side has no variance.
    pub fn cka(&self) -> Tensor<1> {
        let denominator = (self.student.clone() * self.teacher.clone()).clamp_min(1e-30).sqrt();
        self.cross.clone() / denominator
    }
}

impl CkaLoss {
    /// `1 − CKA` over the batch's examples (every feature past the batch dimension flattened).
    ///
    /// # Shapes
    /// - student: `[batch, ..]`
    /// - teacher: `[batch, ..]`, its own width
    /// - output: `[1]`
    ///
    /// # Errors
    /// [`LossError::TooFewExamples`] below 4 examples (debiased) or 2 (biased),
    /// [`LossError::FeatureShape`] for different batch sizes, [`LossError::NonFinite`].
    pub fn forward<const D: usize>(&self, student: Tensor<D>, teacher: Tensor<D>) -> crate::Result<Tensor<1>> {
        let (student, teacher, examples) = self.rows(student, teacher)?;
        // The host kernel takes the Gram form (a batch no wider than the features); the
        // feature-space form is composed, `Fused` or not.
        if use_host_relation(self.implementation, &student, &teacher)?
            && use_gram(examples, student.dims()[1], teacher.dims()[1])
        {
            let job = RelationJob::Cka {
                debiased: self.debiased,
            };
            return Ok(relation_loss(student, teacher, job));
        }
        Ok(self.hsic_terms(student, teacher, examples).cka().neg().add_scalar(1.0))
    }

    /// `1 − CKA` with every position of `[batch, seq, width]` hidden states an example, those
    /// where `mask` is false (padding, prompts) left out.
    ///
    /// # Shapes
    /// - student: `[batch, seq, student_width]`
    /// - teacher: `[batch, seq, teacher_width]`
    /// - mask: `[batch, seq]`, `true` = counts
    /// - output: `[1]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward), counting the kept positions; a mask of another shape is a
    /// [`LossError::FeatureShape`].
    pub fn forward_positions(
        &self,
        student: Tensor<3>,
        teacher: Tensor<3>,
        mask: Option<Tensor<2, Bool>>,
    ) -> crate::Result<Tensor<1>> {
        let (student, teacher) = position_rows(student, teacher, mask)?;
        self.forward(student, teacher)
    }

    /// The batch's HSIC values, for [`CkaAccumulator`] or other estimators.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn terms<const D: usize>(&self, student: Tensor<D>, teacher: Tensor<D>) -> crate::Result<HsicTerms> {
        let (student, teacher, examples) = self.rows(student, teacher)?;
        Ok(self.hsic_terms(student, teacher, examples))
    }

    /// Both sides as `[examples, features]` f32 rows (the teacher detached), checked.
    fn rows<const D: usize>(
        &self,
        student: Tensor<D>,
        teacher: Tensor<D>,
    ) -> crate::Result<(Tensor<2>, Tensor<2>, usize)> {
        let student = example_rows(student, "student features")?;
        let teacher = example_rows(teacher, "teacher features")?.detach();
        let examples = check_examples(&student, &teacher, "CKA", if self.debiased { 4 } else { 2 })?;
        if self.check_inputs {
            check_features(&student, &teacher)?;
        }
        Ok((student, teacher, examples))
    }

    /// The HSIC values of checked rows, composed from tensor operations.
    fn hsic_terms(&self, student: Tensor<2>, teacher: Tensor<2>, examples: usize) -> HsicTerms {
        let (student, student_scale) = centred_unit(student);
        let (teacher, teacher_scale) = centred_unit(teacher);
        // tr(K L), tr(K K), tr(L L): from the two [n, n] Gram matrices, or from the three
        // cross products of the features, whichever is cheaper.
        let (cross, student_trace, teacher_trace) = if use_gram(examples, student.dims()[1], teacher.dims()[1]) {
            let k = student.clone().matmul(student.clone().transpose());
            let l = teacher.clone().matmul(teacher.clone().transpose());
            (
                (k.clone() * l.clone()).sum(),
                k.powi_scalar(2).sum(),
                l.powi_scalar(2).sum(),
            )
        } else {
            let squared = |a: &Tensor<2>, b: &Tensor<2>| a.clone().transpose().matmul(b.clone()).powi_scalar(2).sum();
            (
                squared(&student, &teacher),
                squared(&student, &student),
                squared(&teacher, &teacher),
            )
        };
        let hsic = |trace: Tensor<1>, a: &Tensor<2>, b: &Tensor<2>| -> Tensor<1> {
            if self.debiased {
                debiased_hsic(trace, a, b, examples)
            } else {
                trace.div_scalar(((examples - 1) * (examples - 1)) as f64)
            }
        };
        HsicTerms {
            cross: hsic(cross, &student, &teacher),
            student: hsic(student_trace, &student, &student),
            teacher: hsic(teacher_trace, &teacher, &teacher),
            student_scale,
            teacher_scale,
        }
    }
}

/// Linear CKA between two sets of features in one call (the similarity, not the loss), with
/// the debiased or the biased HSIC estimator.
///
/// # Errors
/// As [`CkaLoss::forward`].
pub fn linear_cka<const D: usize>(student: Tensor<D>, teacher: Tensor<D>, debiased: bool) -> crate::Result<Tensor<1>> {
    let loss = CkaLossConfig::new().with_debiased(debiased).init();
    Ok(loss.terms(student, teacher)?.cka())
}

/// Minibatch CKA as a metric (Nguyen et al., 2021): the HSIC values of every batch added up,
/// then `Σ HSIC(K, L) / √(Σ HSIC(K, K) · Σ HSIC(L, L))`. With the debiased estimator this
/// converges to the CKA of the whole data set as batches are added, whatever the batch size.
/// Sums are kept in f64 on the host (three numbers read per batch).
#[derive(Debug, Clone)]
pub struct CkaAccumulator {
    loss: CkaLoss,
    cross: f64,
    student: f64,
    teacher: f64,
    batches: usize,
}

impl CkaAccumulator {
    /// An empty accumulator; `debiased` as in [`CkaLossConfig`].
    pub fn new(debiased: bool) -> Self {
        Self {
            loss: CkaLossConfig::new().with_debiased(debiased).init(),
            cross: 0.0,
            student: 0.0,
            teacher: 0.0,
            batches: 0,
        }
    }

    /// Adds a batch (examples as in [`CkaLoss::forward`]).
    ///
    /// # Errors
    /// As [`CkaLoss::forward`].
    pub fn update<const D: usize>(&mut self, student: Tensor<D>, teacher: Tensor<D>) -> crate::Result<()> {
        let terms = self.loss.terms(student.detach(), teacher.detach())?;
        self.add(terms);
        Ok(())
    }

    /// Adds a batch of hidden states, positions as examples (as
    /// [`CkaLoss::forward_positions`]).
    ///
    /// # Errors
    /// As [`CkaLoss::forward_positions`].
    pub fn update_positions(
        &mut self,
        student: Tensor<3>,
        teacher: Tensor<3>,
        mask: Option<Tensor<2, Bool>>,
    ) -> crate::Result<()> {
        let (student, teacher) = position_rows(student.detach(), teacher.detach(), mask)?;
        self.update(student, teacher)
    }

    fn add(&mut self, terms: HsicTerms) {
        let values = Tensor::cat(
            vec![
                terms.cross,
                terms.student,
                terms.teacher,
                terms.student_scale,
                terms.teacher_scale,
            ],
            0,
        );
        let values: Vec<f64> = values.into_data().iter::<f64>().collect();
        let (student_scale, teacher_scale) = (values[3].powi(2), values[4].powi(2));
        self.cross += values[0] * student_scale * teacher_scale;
        self.student += values[1] * student_scale * student_scale;
        self.teacher += values[2] * teacher_scale * teacher_scale;
        self.batches += 1;
    }

    /// The batches added so far.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// The minibatch CKA so far, `None` before the first batch; 0 when either side had no
    /// variance in any batch.
    pub fn value(&self) -> Option<f64> {
        if self.batches == 0 {
            return None;
        }
        let denominator = (self.student * self.teacher).max(0.0).sqrt();
        Some(if denominator > 0.0 {
            self.cross / denominator
        } else {
            0.0
        })
    }
}

/// Hidden states `[batch, seq, width]` as `[kept positions, width]` rows on both sides.
fn position_rows(
    student: Tensor<3>,
    teacher: Tensor<3>,
    mask: Option<Tensor<2, Bool>>,
) -> crate::Result<(Tensor<2>, Tensor<2>)> {
    let [batch, seq, student_width] = student.dims();
    let [teacher_batch, teacher_seq, teacher_width] = teacher.dims();
    if (teacher_batch, teacher_seq) != (batch, seq) {
        return Err(LossError::FeatureShape {
            what: "teacher hidden states",
            expected: format!("[{batch}, {seq}, width], the student's batch and length"),
            actual: teacher.dims().to_vec(),
        });
    }
    let student = student.reshape([batch * seq, student_width]);
    let teacher = teacher.reshape([batch * seq, teacher_width]);
    match mask {
        None => Ok((student, teacher)),
        Some(mask) => {
            if mask.dims() != [batch, seq] {
                return Err(LossError::FeatureShape {
                    what: "position mask",
                    expected: format!("[{batch}, {seq}]"),
                    actual: mask.dims().to_vec(),
                });
            }
            // One read of the mask for both sides.
            let kept = kept_positions(mask.reshape([batch * seq]));
            if kept.dims()[0] == batch * seq {
                return Ok((student, teacher));
            }
            if kept.dims()[0] == 0 {
                let device = student.device();
                return Ok((
                    Tensor::zeros([0, student_width], &device),
                    Tensor::zeros([0, teacher_width], &device),
                ));
            }
            Ok((student.select(0, kept.clone()), teacher.select(0, kept)))
        }
    }
}

/// Centred columns divided by their root mean square norm per example (detached): CKA does not
/// change, and the fourth powers in HSIC stay in f32's range. Features whose centred size is
/// below 10⁻⁶ of their size (constant ones, up to rounding) are taken as constant: zero, not
/// rounding noise blown up to unit size.
fn centred_unit(rows: Tensor<2>) -> (Tensor<2>, Tensor<1>) {
    let [examples, _] = rows.dims();
    let root_mean_square = |values: Tensor<2>| values.detach().powi_scalar(2).sum().div_scalar(examples as f64).sqrt();
    let size = root_mean_square(rows.clone());
    let centred = rows.clone() - rows.mean_dim(0);
    let scale = root_mean_square(centred.clone());
    let varies = scale.clone().greater(size.mul_scalar(1e-6)).float();
    let scale = scale.clamp_min(1e-30);
    let centred = centred * varies.reshape([1, 1]);
    (centred / scale.clone().reshape([1, 1]), scale)
}

/// Whether the `[n, n]` Gram matrices are cheaper than the `[width, width]` cross products.
fn use_gram(examples: usize, student_width: usize, teacher_width: usize) -> bool {
    let gram = examples * examples * (student_width + teacher_width);
    let features =
        examples * (student_width * student_width + teacher_width * teacher_width + student_width * teacher_width);
    gram <= features
}

/// The unbiased HSIC estimator (Song et al., 2012) of linear kernels `K = A Aᵀ`, `L = B Bᵀ`
/// with zeroed diagonals, from `tr(K L)` and the features (never the Gram matrices):
/// `[tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2 · 1ᵀK̃L̃1 / (n−2)] / (n (n−3))`.
fn debiased_hsic(trace_kl: Tensor<1>, a: &Tensor<2>, b: &Tensor<2>, examples: usize) -> Tensor<1> {
    let n = examples as f64;
    let diagonal_a = a.clone().powi_scalar(2).sum_dim(1);
    let diagonal_b = b.clone().powi_scalar(2).sum_dim(1);
    let row_sums_a = a.clone().matmul(a.clone().sum_dim(0).transpose()) - diagonal_a.clone();
    let row_sums_b = b.clone().matmul(b.clone().sum_dim(0).transpose()) - diagonal_b.clone();
    let trace = trace_kl - (diagonal_a * diagonal_b).sum();
    let total_a = row_sums_a.clone().sum();
    let total_b = row_sums_b.clone().sum();
    let cross = (row_sums_a * row_sums_b).sum();
    (trace + (total_a * total_b).div_scalar((n - 1.0) * (n - 2.0)) - cross.mul_scalar(2.0 / (n - 2.0)))
        .div_scalar(n * (n - 3.0))
}

#[cfg(test)]
mod tests {
    use super::use_gram;

    #[test]
    fn gram_form_is_chosen_when_the_batch_is_narrower_than_the_features() {
        assert!(use_gram(128, 512, 512));
        assert!(!use_gram(4096, 576, 576));
        assert!(use_gram(128, 16384, 16384));
    }
}
