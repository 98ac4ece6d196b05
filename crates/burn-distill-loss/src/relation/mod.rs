//! Feature and relational distillation: what the networks compute inside, rather than their
//! logits. Attention maps (AT), relations between examples (RKD, PKT, SP), contrastive
//! representation distillation (CRD), correlation of predictions (DIST), representation
//! similarity (linear CKA), and hidden-state distances for language models.

mod at;
mod cka;
pub(crate) mod common;
mod crd;
mod dist;
mod hidden;
mod pkt;
mod rkd;
mod sp;

pub use at::{AttentionTransferLoss, AttentionTransferLossConfig};
pub use cka::{CkaAccumulator, CkaLoss, CkaLossConfig, HsicTerms, linear_cka};
pub use crd::{CrdLoss, CrdLossConfig, CrdOutput, CrdUpdate};
pub use dist::{DistLoss, DistLossConfig};
pub use hidden::{HiddenDistance, HiddenStateLoss, HiddenStateLossConfig};
pub use pkt::{PktLoss, PktLossConfig};
pub use rkd::{RkdLoss, RkdLossConfig};
pub use sp::{SpLoss, SpLossConfig};
