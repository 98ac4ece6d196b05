//! What the losses compute, shared by the composed path (`divergence.rs`, `hinton.rs`) and the
//! fused kernels (`fused/`): the divergences and the per-row specification the kernels run.
//! Both sides depend on this module; neither on the other's internals.

use serde::{Deserialize, Serialize};

use crate::error::check_range;

/// A divergence between the teacher distribution `p` and the student distribution `q`, both
/// taken at the loss's temperature.
///
/// | Divergence | Per position | At the ends |
/// |---|---|---|
/// | `ForwardKl` | `KL(p ‖ q) = Σ p (log p − log q)` | mean-seeking; Hinton's soft term |
/// | `ReverseKl` | `KL(q ‖ p)` | mode-seeking |
/// | `SymmetricKl` | `KL(p ‖ q) + KL(q ‖ p)` | |
/// | `GeneralizedJsd { beta }` | `[β KL(p ‖ m) + (1 − β) KL(q ‖ m)] / (β (1 − β))`, `m = β p + (1 − β) q` | `β → 0`: `KL(p ‖ q)`; `β → 1`: `KL(q ‖ p)`, continuously |
/// | `SkewKl { alpha }` | `KL(p ‖ α p + (1 − α) q)` | `α = 0`: forward KL |
/// | `SkewReverseKl { alpha }` | `KL(q ‖ (1 − α) p + α q)` | `α = 0`: reverse KL |
/// | `TotalVariation` | `½ Σ |p − q|` | bounded by 1 |
/// | `SoftCrossEntropy` | `−Σ p log q = KL(p ‖ q) + H(p)` | same gradient as forward KL |
///
/// GJSD is divided by `β (1 − β)` so that it tends to the two KLs at the ends instead of
/// jumping to them from 0. So `GeneralizedJsd { beta: 0.5 }` is 4 × the textbook JSD, and the
/// unnormalised GJSD of GKD-style code is `β (1 − β)` × this one. It is computed without
/// cancellation, so `β = 1e-6` is as accurate as `β = 0.5`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Divergence {
    /// `KL(teacher ‖ student)`.
    ForwardKl,
    /// `KL(student ‖ teacher)`.
    ReverseKl,
    /// `KL(teacher ‖ student) + KL(student ‖ teacher)`.
    SymmetricKl,
    /// Generalised Jensen–Shannon divergence, normalised; `beta` in `[0, 1]`.
    GeneralizedJsd {
        /// Weight of the teacher in the mixture.
        beta: f64,
    },
    /// Skew KL `KL(p ‖ α p + (1 − α) q)`; `alpha` in `[0, 1]`.
    SkewKl {
        /// Weight of the teacher in the mixture.
        alpha: f64,
    },
    /// Skew reverse KL `KL(q ‖ (1 − α) p + α q)`; `alpha` in `[0, 1]`.
    SkewReverseKl {
        /// Weight of the student in the mixture.
        alpha: f64,
    },
    /// Total variation distance `½ Σ |p − q|`.
    TotalVariation,
    /// Soft-target cross-entropy `−Σ p log q`.
    SoftCrossEntropy,
}

impl Divergence {
    /// One of each divergence, with the parameters common in the literature: GJSD with
    /// `β = 0.5`, skew KL and skew reverse KL with `α = 0.1` (DistiLLM).
    pub const ALL: [Divergence; 8] = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::SymmetricKl,
        Divergence::GeneralizedJsd { beta: 0.5 },
        Divergence::SkewKl { alpha: 0.1 },
        Divergence::SkewReverseKl { alpha: 0.1 },
        Divergence::TotalVariation,
        Divergence::SoftCrossEntropy,
    ];

    /// A short, stable name without the parameter (`"forward_kl"`, `"generalized_jsd"`, …),
    /// for logs, bench ids and file names.
    pub fn name(&self) -> &'static str {
        match self {
            Divergence::ForwardKl => "forward_kl",
            Divergence::ReverseKl => "reverse_kl",
            Divergence::SymmetricKl => "symmetric_kl",
            Divergence::GeneralizedJsd { .. } => "generalized_jsd",
            Divergence::SkewKl { .. } => "skew_kl",
            Divergence::SkewReverseKl { .. } => "skew_reverse_kl",
            Divergence::TotalVariation => "total_variation",
            Divergence::SoftCrossEntropy => "soft_cross_entropy",
        }
    }

    /// Checks the divergence's own parameter.
    ///
    /// # Errors
    /// [`LossError::InvalidParameter`](crate::LossError::InvalidParameter) when `beta` or
    /// `alpha` is outside `[0, 1]`.
    pub fn validate(&self) -> crate::Result<()> {
        match *self {
            Divergence::GeneralizedJsd { beta } => check_range("beta", beta, 0.0, 1.0, "a value in [0, 1]"),
            Divergence::SkewKl { alpha } | Divergence::SkewReverseKl { alpha } => {
                check_range("alpha", alpha, 0.0, 1.0, "a value in [0, 1]")
            }
            _ => Ok(()),
        }
    }
}

/// What to compute for every row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowSpec {
    /// The divergence between the softened distributions (teacher `p`, student `q`).
    pub divergence: Divergence,
    /// Softening temperature of both sides.
    pub temperature: f32,
    /// Factor on the divergence (`T²`, Hinton's `1 − α`).
    pub soft_weight: f32,
    /// Factor on the cross-entropy with the label at `T = 1` (Hinton's `α`); 0 = no hard term.
    pub hard_weight: f32,
    /// Label smoothing of the hard term.
    pub label_smoothing: f32,
}

impl RowSpec {
    /// `(1 − α) · [T²] · D + α · CE`: Hinton's weighting (α = 0 for a plain divergence).
    pub(crate) fn weighted(
        divergence: Divergence,
        temperature: f64,
        scale_by_temperature_squared: bool,
        alpha: f64,
        label_smoothing: f64,
    ) -> Self {
        let temperature = temperature as f32;
        let squared = if scale_by_temperature_squared {
            temperature * temperature
        } else {
            1.0
        };
        Self {
            divergence,
            temperature,
            soft_weight: (1.0 - alpha as f32) * squared,
            hard_weight: alpha as f32,
            label_smoothing: label_smoothing as f32,
        }
    }
}
