//! Attention transfer (Zagoruyko & Komodakis, ICLR 2017).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;

use std::sync::Arc;

use crate::error::{LossError, check_range};
use crate::fused::{Implementation, RelationJob, relation_loss, use_host_relation};
use crate::input::widen_f32;
use crate::reduction::{Reduction, reduce, reduction_weights};
use crate::relation::common::{check_features, example_rows, normalize};

/// Configuration of [`AttentionTransferLoss`].
///
/// A feature map's *attention map* is the mean over channels of `|A|^p`, flattened over space
/// and scaled to unit L2 norm. The loss of an example is the mean over the `H × W` positions of
/// the squared difference between the student's and the teacher's maps; channel counts may
/// differ, spatial sizes may not (pool the larger map first). With `BatchMean` it is the
/// reference code's `(at(s) − at(t)).pow(2).mean()`; the paper's `β/2` weight is the caller's.
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `p` | 2.0 | exponent of the activations | `p ≥ 1` |
/// | `check_inputs` | true | refuse NaN / infinite features | |
/// | `implementation` | `Auto` | one host kernel on the CPU devices (ndarray, flex), composed tensor ops elsewhere | see [`Implementation`] |
#[derive(Config, Debug)]
pub struct AttentionTransferLossConfig {
    /// Exponent applied to `|activation|` before the mean over channels.
    #[config(default = 2.0)]
    pub p: f64,
    /// Check the features for NaN and infinities (one device read).
    #[config(default = true)]
    pub check_inputs: bool,
    /// One host kernel (loss and gradient together) or composed tensor operations.
    #[config(default = "Implementation::Auto")]
    pub implementation: Implementation,
}

impl AttentionTransferLossConfig {
    /// Builds the loss, or says which hyper-parameter is out of range.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`] for `p < 1` or a non-finite `p`.
    pub fn try_init(&self) -> crate::Result<AttentionTransferLoss> {
        check_range("p", self.p, 1.0, f64::MAX, "a finite value >= 1")?;
        Ok(AttentionTransferLoss {
            p: self.p,
            check_inputs: self.check_inputs,
            implementation: self.implementation,
        })
    }

    /// Builds the loss.
    ///
    /// # Panics
    /// When `p` is out of range; the message names it.
    pub fn init(&self) -> AttentionTransferLoss {
        self.try_init()
            .unwrap_or_else(|error| panic!("invalid AttentionTransferLossConfig: {error}"))
    }
}

/// Attention-transfer loss; built by [`AttentionTransferLossConfig`].
#[derive(Module, Debug)]
pub struct AttentionTransferLoss {
    /// Exponent of the activations.
    #[module(skip)]
    pub p: f64,
    /// Whether inputs are checked.
    pub check_inputs: bool,
    /// Host kernel or composed tensor operations.
    #[module(skip)]
    pub implementation: Implementation,
}

impl AttentionTransferLoss {
    /// The reduced loss.
    ///
    /// # Shapes
    /// - student_map: `[batch, student_channels, height, width]`
    /// - teacher_map: `[batch, teacher_channels, height, width]`
    /// - output: `[1]`
    ///
    /// # Errors
    /// [`LossError::FeatureShape`] for different batch or spatial sizes,
    /// [`LossError::NonFinite`] for NaN or infinite features, and the reduction's errors
    /// (an empty batch under a mean).
    pub fn forward(
        &self,
        student_map: Tensor<4>,
        teacher_map: Tensor<4>,
        reduction: Reduction,
    ) -> crate::Result<Tensor<1>> {
        self.check(&student_map, &teacher_map)?;
        let [batch, channels, height, width] = student_map.dims();
        let student = widen_f32(student_map.clone()).reshape([batch, channels * height * width]);
        let teacher_width: usize = teacher_map.dims()[1..].iter().product();
        let teacher = widen_f32(teacher_map.clone()).detach().reshape([batch, teacher_width]);
        if use_host_relation(self.implementation, &student, &teacher)? {
            let job = RelationJob::At {
                p: self.p,
                positions: height * width,
                weights: Arc::new(reduction_weights(None, batch, 1, reduction)?),
            };
            return Ok(relation_loss(student, teacher, job));
        }
        let per_example = self.composed(student_map, teacher_map);
        reduce(per_example, None, 1, reduction, self.check_inputs)
    }

    /// The loss of every example.
    ///
    /// # Shapes
    /// - output: `[batch, 1]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_no_reduction(&self, student_map: Tensor<4>, teacher_map: Tensor<4>) -> crate::Result<Tensor<2>> {
        self.check(&student_map, &teacher_map)?;
        let per_example = self.composed(student_map, teacher_map);
        let examples = per_example.dims()[0];
        Ok(per_example.reshape([examples, 1]))
    }

    /// The attention map of `feature_map`: `normalize(mean_c |A|^p)`, `[batch, height × width]`.
    pub fn attention_map(&self, feature_map: Tensor<4>) -> Tensor<2> {
        let [batch, _, height, width] = feature_map.dims();
        let feature_map = widen_f32(feature_map);
        let powered = if self.p == 2.0 {
            feature_map.powi_scalar(2)
        } else {
            feature_map.abs().powf_scalar(self.p)
        };
        normalize(powered.mean_dim(1).reshape([batch, height * width]), 1)
    }

    /// Refuses maps of different batch or spatial sizes, and (when checking) non-finite values.
    fn check(&self, student_map: &Tensor<4>, teacher_map: &Tensor<4>) -> crate::Result<()> {
        let [batch, _, height, width] = student_map.dims();
        let teacher_dims = teacher_map.dims();
        if teacher_dims[0] != batch || teacher_dims[2] != height || teacher_dims[3] != width {
            return Err(LossError::FeatureShape {
                what: "teacher feature map",
                expected: format!(
                    "[{batch}, channels, {height}, {width}] (the student's batch and spatial size; pool the larger map first)"
                ),
                actual: teacher_dims.to_vec(),
            });
        }
        if self.check_inputs {
            check_features(
                &example_rows(student_map.clone(), "student feature map")?,
                &example_rows(teacher_map.clone(), "teacher feature map")?,
            )?;
        }
        Ok(())
    }

    /// The loss of every example, composed from tensor operations (inputs checked).
    fn composed(&self, student_map: Tensor<4>, teacher_map: Tensor<4>) -> Tensor<1> {
        let batch = student_map.dims()[0];
        let student = self.attention_map(student_map);
        let teacher = self.attention_map(teacher_map.detach());
        (student - teacher).powi_scalar(2).mean_dim(1).reshape([batch])
    }
}
