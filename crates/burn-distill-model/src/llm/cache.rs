//! The key/value cache of incremental decoding, kept outside the model.

use burn::tensor::Tensor;
use burn_distill_loss::CausalMask;

/// One block's cached keys and values, `[batch, slots, kv_heads, head_dim]` each; `None` before
/// the first call.
pub(crate) type BlockCache = Option<(Tensor<4>, Tensor<4>)>;

/// Keys and values of every block for a batch of left-padded rows, so that each decoding step
/// runs one new slot per row instead of the whole window.
///
/// Rows of different lengths are left-padded to a common length: row `r`'s first
/// `left_padding[r]` slots are padding, which no query attends to, and its positions count
/// from its first real token.
#[derive(Debug, Clone)]
pub struct LlamaCache {
    pub(crate) layers: Vec<BlockCache>,
    left_padding: Vec<usize>,
    len: usize,
}

impl LlamaCache {
    /// An empty cache for `blocks` blocks and one row per entry of `left_padding`.
    pub fn new(blocks: usize, left_padding: Vec<usize>) -> Self {
        Self {
            layers: vec![None; blocks],
            left_padding,
            len: 0,
        }
    }

    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.left_padding.len()
    }

    /// Slots filled so far (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rotary position of each of the next `seq` slots, per row.
    pub(crate) fn positions(&self, seq: usize) -> Vec<Vec<usize>> {
        self.left_padding
            .iter()
            .map(|&pad| {
                (self.len..self.len + seq)
                    .map(|slot| slot.saturating_sub(pad))
                    .collect()
            })
            .collect()
    }

    /// Which keys the next slots see: the causal rule over the filled slots, without the
    /// padding (a padding slot attends to itself alone, so its softmax stays defined).
    pub(crate) fn mask(&self) -> CausalMask {
        CausalMask::cached(self.len, self.left_padding.clone())
    }

    pub(crate) fn advance(&mut self, seq: usize) {
        self.len += seq;
    }
}
