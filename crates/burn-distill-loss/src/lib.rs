//! Knowledge-distillation losses for [burn](https://burn.dev), with exact, documented
//! conventions and numbers checked against PyTorch.
//!
//! # Overview
//!
//! A distillation loss compares a *student*'s logits with a *teacher*'s. This crate gives the
//! divergences used for that (forward and reverse KL, generalised JSD, skew KL, total
//! variation, soft cross-entropy), Hinton's KD loss, decoupled KD, and a forward KL against a
//! sparse top-k teacher; and the feature and relational losses: attention transfer
//! ([`AttentionTransferLoss`]), relational KD ([`RkdLoss`]), probabilistic KT ([`PktLoss`]),
//! similarity-preserving KD ([`SpLoss`]), contrastive representation distillation
//! ([`CrdLoss`]), DIST ([`DistLoss`]), linear CKA as a loss and a metric ([`CkaLoss`],
//! [`CkaAccumulator`]) and hidden-state distances for language models ([`HiddenStateLoss`]).
//! Every loss runs on any burn device (ndarray, flex, wgpu, cuda) and
//! takes rank-2 `[batch, classes]` or rank-3 `[batch, seq, vocab]` logits.
//!
//! # Core concepts
//!
//! Each loss is a `…Config` (burn [`Config`](burn::config::Config), checked by `try_init` /
//! `init`) that builds a module with `forward(.., reduction)` and `forward_no_reduction(..)`.
//! Plain functions ([`forward_kl`], [`reverse_kl`], [`hinton_kd`], [`decoupled_kd`],
//! [`sparse_forward_kl`], …) serve users who want no module.
//! Mistakes in the data (shapes, class counts, NaN logits, labels out of range) come back as a
//! [`LossError`] naming the input.
//!
//! ## Conventions
//!
//! | Topic | Convention |
//! |---|---|
//! | Direction | `p` is the teacher, `q` the student. Forward KL is `KL(p ‖ q)`, reverse KL is `KL(q ‖ p)`. |
//! | Temperature | both sides are `softmax(logits / T)`; the teacher may be given as logits or log-probabilities (same result). The hard-label term of Hinton KD is at `T = 1`. |
//! | `T²` | off for plain divergences (`scale_by_temperature_squared` switches it on), on for Hinton KD and DKD; it keeps soft-term gradients the same size at every `T`. |
//! | Per position | the divergence is summed over classes, giving one value per row (rank 2) or token (rank 3): `forward_no_reduction` returns it as `[.., 1]`. |
//! | Reduction | [`Reduction::BatchMean`] (default) divides by the number of valid positions; `Sum`; `ElementMean` also divides by the class count (PyTorch's `"mean"`, rarely wanted); `SumOver(n)` divides by a count you give, for gradient accumulation. |
//! | Masking | `forward_masked` takes a `[batch]` / `[batch, seq]` boolean mask (`true` = counts); Hinton KD and DKD skip labels equal to `ignore_index` (default -100). Masked positions count as zero and are left out of the mean. |
//! | Zero probabilities | `-inf` logits mean probability 0; `0 · log 0 = 0`. NaN and `+inf` logits are an error. |
//! | Vocabulary | different class counts are an error unless a [`VocabPolicy`] pads or truncates. |
//! | Teacher gradients | the teacher side is detached: no gradient reaches it. |
//! | Implementation | f32 logits on an ndarray, flex, wgpu or cuda device run a fused kernel (loss and gradient in one visit of each row: a host kernel on the CPU devices, a CubeCL kernel on the GPU ones; see [`Implementation`]); other devices run the composed tensor ops. Both agree to 1e-5. The feature and relational losses (all but RKD) have host kernels on the CPU devices only, under the same option. |
//!
//! ## Fused kernel and chunked linear head
//!
//! [`DivergenceLoss`] and [`HintonKdLoss`] pick a fused forward + backward by themselves where
//! it exists ([`Implementation::Auto`]); `Fused` and `Composed` force either. For language
//! models, [`LinearHeadKd`] takes the student's hidden states and head weight and never holds
//! the whole `[positions, vocab]` logits: it computes them, the loss and the gradients chunk by
//! chunk.
//!
//! # Usage
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use burn_distill_loss::{Divergence, DivergenceLossConfig, Reduction};
//!
//! # fn main() -> Result<(), burn_distill_loss::LossError> {
//! # let device = burn_distill_loss::available_devices().remove(0).device;
//! let student = Tensor::<2>::from_floats([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], &device);
//! let teacher = Tensor::<2>::from_floats([[3.0, 0.0, -2.0], [0.5, 0.5, 2.0]], &device);
//!
//! let loss = DivergenceLossConfig::new(Divergence::ForwardKl)
//!     .with_temperature(2.0)
//!     .with_scale_by_temperature_squared(true)
//!     .init();
//! let value = loss.forward(student, teacher, Reduction::BatchMean)?;
//! let value: f32 = value.into_scalar();
//! assert!(value > 0.0);
//! # Ok(())
//! # }
//! ```
//!
//! # Supported Rust versions
//!
//! Rust 1.95 or newer (burn 0.22.1's own minimum).
#![warn(missing_docs)]

mod device;
mod divergence;
mod dkd;
mod error;
mod fused;
mod head;
mod hinton;
mod input;
mod math;
mod reduction;
mod relation;
mod sparse;
mod spec;
mod temperature;
mod vocab;

/// The label that marks a position out of every loss and metric (padding, prompts): PyTorch's
/// `ignore_index` default. The losses' `ignore_index` defaults to it; the data and training crates
/// re-export it.
pub const IGNORE_INDEX: i64 = -100;

pub use device::{NamedDevice, available_devices, device_by_name, device_works, runnable_devices};
pub use divergence::{
    Divergence, DivergenceLoss, DivergenceLossConfig, divergence, forward_kl, generalized_jsd, reverse_kl, skew_kl,
    skew_reverse_kl, soft_cross_entropy, symmetric_kl, total_variation,
};
pub use dkd::{DkdLoss, DkdLossConfig, decoupled_kd};
pub use error::{LossError, Result};
pub use fused::{
    CausalMask, FusedGradStores, Implementation, KernelBounds, causal_attention, fused_available, fused_available_for,
    fused_grad_stores, kernel_bounds, swiglu,
};
pub use fused::{FEW_ROWS, WeightLayout, weight_matmul};
pub use head::{HeadTeacher, LinearHeadKd, LinearHeadKdConfig};
pub use hinton::{HintonKdLoss, HintonKdLossConfig, HintonKdTerms, hinton_kd};
pub use reduction::{Reduction, kept_positions, valid_mask};
pub use relation::{
    AttentionTransferLoss, AttentionTransferLossConfig, CkaAccumulator, CkaLoss, CkaLossConfig, CrdLoss, CrdLossConfig,
    CrdOutput, CrdUpdate, DistLoss, DistLossConfig, HiddenDistance, HiddenStateLoss, HiddenStateLossConfig, HsicTerms,
    PktLoss, PktLossConfig, RkdLoss, RkdLossConfig, SpLoss, SpLossConfig, linear_cka,
};
pub use sparse::{SparseKlLoss, SparseKlLossConfig, TailPolicy, sparse_forward_kl};
pub use temperature::{temperature_log_softmax, temperature_softmax};
pub use vocab::VocabPolicy;
