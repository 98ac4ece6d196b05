//! What the feature and relational losses share: flattening features to one row per example,
//! checks, and norms whose gradient stays finite at zero.

use burn::tensor::Tensor;

use crate::error::{LossError, Result};
use crate::input::{read_ints, widen_f32};

/// A norm is never taken below this: `max(‖v‖, 1e-12)`, PyTorch's `F.normalize` default.
pub(crate) const NORM_FLOOR: f64 = 1e-12;

/// `[batch, ..]` as `[batch, features]` (PyTorch's `x.view(batch, -1)`), in f32.
pub(crate) fn example_rows<const D: usize>(tensor: Tensor<D>, name: &'static str) -> Result<Tensor<2>> {
    if D < 2 {
        return Err(LossError::FeatureRank {
            tensor: name,
            rank: D,
            expected: "a feature is [batch, ..] with at least one dimension past the batch",
        });
    }
    let dims = tensor.dims();
    let width: usize = dims[1..].iter().product();
    Ok(widen_f32(tensor.reshape([dims[0], width])))
}

/// Refuses a student and teacher with different batch sizes, or fewer than `min` examples.
pub(crate) fn check_examples(
    student: &Tensor<2>,
    teacher: &Tensor<2>,
    loss: &'static str,
    min: usize,
) -> Result<usize> {
    let examples = student.dims()[0];
    if teacher.dims()[0] != examples {
        return Err(LossError::FeatureShape {
            what: "teacher features",
            expected: format!("{examples} examples, as the student's"),
            actual: teacher.dims().to_vec(),
        });
    }
    if examples < min {
        return Err(LossError::TooFewExamples { loss, min, examples });
    }
    Ok(examples)
}

/// Refuses NaN and infinite features (either sign), student and teacher in one device read.
pub(crate) fn check_features(student: &Tensor<2>, teacher: &Tensor<2>) -> Result<()> {
    let flag = |values: &Tensor<2>| {
        let nan = values.clone().is_nan().any().int().reshape([1]);
        let inf = values.clone().abs().equal_elem(f32::INFINITY).any().int().reshape([1]);
        vec![nan, inf]
    };
    let mut flags = flag(student);
    flags.extend(flag(teacher));
    let flags = read_ints(Tensor::cat(flags, 0).into_data());
    for (index, (tensor, kind)) in [
        ("student features", "NaN"),
        ("student features", "infinite"),
        ("teacher features", "NaN"),
        ("teacher features", "infinite"),
    ]
    .into_iter()
    .enumerate()
    {
        if flags[index] != 0 {
            return Err(LossError::NonFinite { tensor, kind });
        }
    }
    Ok(())
}

/// `max(‖v‖₂, floor)` along `dim`, kept: computed as `sqrt(max(Σ v², floor²))`, so that a zero
/// vector has a finite gradient (a `sqrt` at 0 would give ∞ · 0 = NaN).
pub(crate) fn norm_floor<const D: usize>(values: Tensor<D>, dim: usize, floor: f64) -> Tensor<D> {
    values.powi_scalar(2).sum_dim(dim).clamp_min(floor * floor).sqrt()
}

/// `v / max(‖v‖₂, 1e-12)` along `dim`: PyTorch's `F.normalize(v, dim=dim)`.
pub(crate) fn normalize<const D: usize>(values: Tensor<D>, dim: usize) -> Tensor<D> {
    let norm = norm_floor(values.clone(), dim, NORM_FLOOR);
    values / norm
}

/// PyTorch's `F.smooth_l1_loss(a, b, beta=1)` before its mean: `½ d²` where `|d| < 1`, else
/// `|d| − ½`.
pub(crate) fn smooth_l1<const D: usize>(difference: Tensor<D>) -> Tensor<D> {
    let absolute = difference.clone().abs();
    let small = absolute.clone().lower_elem(1.0);
    let quadratic = difference.powi_scalar(2).mul_scalar(0.5);
    absolute.sub_scalar(0.5).mask_where(small, quadratic)
}
