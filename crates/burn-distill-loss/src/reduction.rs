//! How per-position losses become one number.

use burn::tensor::{Bool, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{LossError, Result};

/// How [`forward`](crate::DivergenceLoss::forward) reduces per-position losses.
///
/// A *position* is a row of `[batch, classes]` input, or a token of `[batch, seq, vocab]` input.
/// The per-position loss is already summed over classes: it is the true divergence between two
/// distributions. Masked positions (padding, `ignore_index` labels) count as zero and are left
/// out of every count.
///
/// | Reduction | Value | Notes |
/// |---|---|---|
/// | `BatchMean` (default) | sum / valid positions | the mean per-sample divergence; PyTorch `kl_div(reduction="batchmean")` for rank 2 |
/// | `Sum` | sum | |
/// | `ElementMean` | sum / (valid positions × classes) | PyTorch `reduction="mean"`; rarely what you want: it shrinks with the vocabulary |
/// | `SumOver(n)` | sum / n | `n` given by the caller: pass the token count of the whole batch to every micro-batch so accumulated gradients equal the big-batch gradient |
///
/// No reduction at all is `forward_no_reduction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Reduction {
    /// Sum over positions divided by the number of valid positions.
    #[default]
    BatchMean,
    /// Sum over valid positions.
    Sum,
    /// Sum divided by the number of valid positions times the number of classes.
    ElementMean,
    /// Sum divided by a caller-given number of positions.
    SumOver(usize),
}

/// Reduces per-position losses `[positions]`; `valid` marks the positions that count.
pub(crate) fn reduce(
    per_position: Tensor<1>,
    valid: Option<Tensor<1, Bool>>,
    classes: usize,
    reduction: Reduction,
    check: bool,
) -> Result<Tensor<1>> {
    let positions = per_position.dims()[0];
    let (total, valid_count) = match valid {
        None => (per_position.sum(), None),
        Some(valid) => {
            let count = valid.clone().float().sum();
            let total = per_position.mask_fill(valid.bool_not(), 0.0).sum();
            (total, Some(count))
        }
    };
    let normalise = |total: Tensor<1>, scale: f64| -> Result<Tensor<1>> {
        match &valid_count {
            None => {
                if positions == 0 {
                    return Err(LossError::NoValidPositions);
                }
                Ok(total.div_scalar(positions as f64 * scale))
            }
            Some(count) => {
                if check && count.clone().into_data().iter::<f64>().next().unwrap_or(0.0) <= 0.0 {
                    return Err(LossError::NoValidPositions);
                }
                Ok(total.div(count.clone().mul_scalar(scale)))
            }
        }
    };
    match reduction {
        Reduction::Sum => Ok(total),
        Reduction::BatchMean => normalise(total, 1.0),
        Reduction::ElementMean => normalise(total, classes as f64),
        Reduction::SumOver(0) => Err(LossError::InvalidParameter {
            name: "SumOver count",
            value: 0.0,
            expected: "a positive number of positions",
        }),
        Reduction::SumOver(count) => Ok(total.div_scalar(count as f64)),
    }
}

/// Per-position weights that fold a mask and a reduction into one weighted sum, for the fused
/// kernel: `Σ_i w_i loss_i` equals [`reduce`]'s value.
pub(crate) fn reduction_weights(
    valid: Option<&[bool]>,
    positions: usize,
    classes: usize,
    reduction: Reduction,
) -> Result<Vec<f32>> {
    let count = valid.map_or(positions, |valid| valid.iter().filter(|&&valid| valid).count());
    let denominator = match reduction {
        Reduction::Sum => 1.0,
        Reduction::BatchMean | Reduction::ElementMean if count == 0 => return Err(LossError::NoValidPositions),
        Reduction::BatchMean => count as f64,
        Reduction::ElementMean => count as f64 * classes as f64,
        Reduction::SumOver(0) => {
            return Err(LossError::InvalidParameter {
                name: "SumOver count",
                value: 0.0,
                expected: "a positive number of positions",
            });
        }
        Reduction::SumOver(count) => count as f64,
    };
    let weight = (1.0 / denominator) as f32;
    Ok(match valid {
        None => vec![weight; positions],
        Some(valid) => valid.iter().map(|&valid| if valid { weight } else { 0.0 }).collect(),
    })
}

/// The indices of the positions `mask` keeps (`true`), in order: for `select` on tensors of
/// positions. One read of the mask from the device.
pub fn kept_positions(mask: Tensor<1, Bool>) -> Tensor<1, Int> {
    let device = mask.device();
    let kept: Vec<i64> = crate::input::read_bools(mask)
        .iter()
        .enumerate()
        .filter_map(|(index, &keep)| keep.then_some(index as i64))
        .collect();
    let count = kept.len();
    Tensor::from_data(burn::tensor::TensorData::new(kept, [count]), &device)
}

/// Positions whose label is not `ignore_index`: the mask for
/// [`DivergenceLoss::forward_masked`](crate::DivergenceLoss::forward_masked).
pub fn valid_mask<const L: usize>(labels: Tensor<L, Int>, ignore_index: i64) -> Tensor<L, Bool> {
    labels.not_equal_elem(ignore_index)
}
