//! Temperature-scaled softmax and log-softmax.

use burn::tensor::{Tensor, activation};

use crate::error::{Result, check_temperature};

/// `log_softmax(logits / temperature)` over the last dimension.
///
/// Stable for logits of ±1e4 at temperatures from 0.05 to 100: the maximum is subtracted before
/// exponentiating, so nothing overflows; probabilities far below the maximum underflow to 0 and
/// their log-probabilities stay finite.
///
/// # Errors
/// [`LossError::InvalidParameter`](crate::LossError::InvalidParameter) when `temperature` is not
/// finite and positive.
///
/// # Shapes
/// - logits: `[..., classes]`
/// - output: same as `logits`
pub fn temperature_log_softmax<const D: usize>(logits: Tensor<D>, temperature: f64) -> Result<Tensor<D>> {
    check_temperature(temperature)?;
    Ok(scaled_log_softmax(logits, temperature))
}

/// `softmax(logits / temperature)` over the last dimension; see [`temperature_log_softmax`].
///
/// # Errors
/// As [`temperature_log_softmax`].
///
/// # Shapes
/// - logits: `[..., classes]`
/// - output: same as `logits`
pub fn temperature_softmax<const D: usize>(logits: Tensor<D>, temperature: f64) -> Result<Tensor<D>> {
    check_temperature(temperature)?;
    let scaled = if temperature == 1.0 {
        logits
    } else {
        logits.div_scalar(temperature)
    };
    Ok(activation::softmax(scaled, D - 1))
}

/// `log_softmax(logits / temperature)` for a temperature already validated.
pub(crate) fn scaled_log_softmax<const D: usize>(logits: Tensor<D>, temperature: f64) -> Tensor<D> {
    let scaled = if temperature == 1.0 {
        logits
    } else {
        logits.div_scalar(temperature)
    };
    activation::log_softmax(scaled, D - 1)
}
