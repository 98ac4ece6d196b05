//! Row-wise divergences between log-probability tensors `[positions, classes]`.
//!
//! Every function returns one value per row (`[positions]`), treats `0 · log 0` as 0, and keeps
//! gradients finite where a probability is exactly zero (a `-inf` log-probability): the
//! offending factors are zeroed *before* they are multiplied, so no `0 · inf` reaches autodiff.

use burn::tensor::{Bool, Tensor};

/// Below this `|x|` the mixture term `x − log(1 + x)` is summed as a series.
const SERIES_LIMIT: f64 = 0.15;
/// Log-ratios below this are treated as `-inf` in the series branch (`e^-40 ≈ 4e-18`).
const LOG_RATIO_FLOOR: f64 = -40.0;

/// Sums each row: `[positions, classes] -> [positions]`.
pub(crate) fn row_sum(values: Tensor<2>) -> Tensor<1> {
    let positions = values.dims()[0];
    values.sum_dim(1).reshape([positions])
}

/// Where a log-probability is `-inf` (probability exactly zero).
pub(crate) fn zero_mass(log_probs: &Tensor<2>) -> Tensor<2, Bool> {
    log_probs.clone().equal_elem(f32::NEG_INFINITY)
}

/// `KL(a ‖ b) = Σ a (log a − log b)` per row.
pub(crate) fn kl_rows(log_a: Tensor<2>, log_b: Tensor<2>) -> Tensor<1> {
    let zero = zero_mass(&log_a);
    let log_ratio = (log_a.clone() - log_b).mask_fill(zero, 0.0);
    row_sum(log_a.exp() * log_ratio)
}

/// `−Σ a log b` per row.
pub(crate) fn cross_entropy_rows(log_a: Tensor<2>, log_b: Tensor<2>) -> Tensor<1> {
    let zero = zero_mass(&log_a);
    row_sum(log_a.exp() * log_b.mask_fill(zero, 0.0)).neg()
}

/// `½ Σ |a − b|` per row.
pub(crate) fn total_variation_rows(log_a: Tensor<2>, log_b: Tensor<2>) -> Tensor<1> {
    row_sum((log_a.exp() - log_b.exp()).abs()).mul_scalar(0.5)
}

/// `KL(a ‖ (1 − w) a + w b)` per row, for a mixing weight `w` in `[0, 1]`.
///
/// Near `w = 0` the divergence is of order `w²` and the textbook formula loses every digit to
/// cancellation (it subtracts two nearly equal logarithms), yet GJSD divides it by `w`. So each
/// element is written as `a · g(x)` with `x = w (b/a − 1)` and `g(x) = x − log(1 + x) ≥ 0`
/// (the added `Σ w (b − a)` is zero for normalised rows): a series for small `|x|`, and
/// `w (b − a) − a · log(1 − w + w e^{log b − log a})`, evaluated in log space, elsewhere.
pub(crate) fn mixture_kl_rows(log_a: Tensor<2>, log_b: Tensor<2>, weight: f64) -> Tensor<1> {
    if weight == 0.0 {
        let [positions, _] = log_a.dims();
        return Tensor::zeros([positions], &log_a.device());
    }
    if weight == 1.0 {
        return kl_rows(log_a, log_b);
    }
    let zero = zero_mass(&log_a);
    // Where a = 0 the element is w·b whatever the log-ratio; 0 keeps the arithmetic finite.
    let log_ratio = (log_b.clone() - log_a.clone()).mask_fill(zero.clone(), 0.0);
    let a = log_a.exp();
    let b = log_b.exp();

    // Series branch: x stays finite because the log-ratio is clamped first; the upper bound
    // keeps every element that truly has |x| < SERIES_LIMIT unclamped.
    let ratio_ceiling = (1.0 + SERIES_LIMIT / weight).ln() + 1.0;
    let x = log_ratio
        .clone()
        .clamp(LOG_RATIO_FLOOR, ratio_ceiling)
        .exp()
        .sub_scalar(1.0)
        .mul_scalar(weight);
    let use_series = x.clone().abs().lower_elem(SERIES_LIMIT).bool_and(zero.bool_not());
    let series = a.clone() * x_minus_log1p_series(x);

    // Log-space branch: log(1 − w + w e^r) = logaddexp(log(1 − w), log w + r).
    let log_keep = (1.0 - weight).ln();
    let shifted = log_ratio.add_scalar(weight.ln());
    let peak = shifted.clone().clamp_min(log_keep);
    let log_mix = peak.clone() + (peak.clone().neg().add_scalar(log_keep).exp() + (shifted - peak).exp()).log();
    let direct = (b - a.clone()).mul_scalar(weight) - a * log_mix;

    row_sum(direct.mask_where(use_series, series))
}

/// `x − log(1 + x)` by its series `Σ_{k≥2} (−1)^k x^k / k`, to `x⁸`; for `|x| < 0.15` the
/// truncation error is below 4e-7 relative.
fn x_minus_log1p_series(x: Tensor<2>) -> Tensor<2> {
    let mut acc = x.clone().mul_scalar(1.0 / 8.0).add_scalar(-1.0 / 7.0);
    for coefficient in [1.0 / 6.0, -1.0 / 5.0, 1.0 / 4.0, -1.0 / 3.0, 1.0 / 2.0] {
        acc = (acc * x.clone()).add_scalar(coefficient);
    }
    acc * x.clone() * x
}

/// `log Σ exp(x)` per row, kept as `[positions, 1]`. Rows may hold `-inf` but not only `-inf`.
pub(crate) fn log_sum_exp_rows(values: Tensor<2>) -> Tensor<2> {
    // The maximum's gradient cancels exactly, so it is taken as a constant.
    let peak = values.clone().max_dim(1).detach();
    (values - peak.clone()).exp().sum_dim(1).log() + peak
}

/// `e^x − 1` without the cancellation of `exp(x) − 1` near 0 (burn has no `expm1`).
pub(crate) fn exp_m1(values: Tensor<2>) -> Tensor<2> {
    let small = values.clone().abs().lower_elem(0.1);
    // x (1 + x/2 (1 + x/3 (1 + x/4 (1 + x/5 (1 + x/6))))): error below 3e-11 relative for |x| < 0.1.
    let mut acc = values.clone().div_scalar(6.0).add_scalar(1.0);
    for order in [5.0, 4.0, 3.0, 2.0] {
        acc = (acc * values.clone()).div_scalar(order).add_scalar(1.0);
    }
    let series = acc * values.clone();
    values.exp().sub_scalar(1.0).mask_where(small, series)
}
