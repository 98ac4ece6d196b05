//! Causal grouped-query attention for Llama-family decoders, as one host kernel with its own
//! backward.
//!
//! Composed from burn's operations on the CPU devices, attention repeats every key/value head
//! for its query heads (a copy), fills the full `[seq, keys]` square of scores with a broadcast
//! mask, and transposes its output back to the positions' layout (another copy): 9 % of a
//! SmolLM2 teacher forward on flex and 23 % of a 512-token prefill (`perf record`, BENCHMARKS.md).
//! The kernel reads queries, keys and values where the projections wrote them
//! (`[batch, seq, heads, head_dim]`), scores each block of queries against the keys up to its
//! last allowed one only, with the query heads of one key/value head stacked into one product
//! (the `gemm` crate, one thread per task), and writes `[batch, seq, heads · head_dim]` directly.
//! Its backward recomputes the probabilities from the saved log-sum-exp of each row, as
//! FlashAttention does, so nothing of size `[seq, keys]` outlives a task.

// burn 0.22 deprecates ndarray in favour of flex; the extension macro names it in generated code.
#![allow(deprecated)]

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorData};

/// Which keys each query of a [`causal_attention`] call may see.
///
/// Query `i` of row `b` sits at key slot `past + i`. It sees key `j` when `j ≤ past + i` (the
/// causal rule) and `j` is not padding: row `b`'s first `left_padding[b]` slots are padding,
/// except that a padding query sees itself, so that every softmax stays defined. This is the
/// mask of a key/value cache filled with left-padded prompts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CausalMask {
    past: usize,
    left_padding: Vec<usize>,
}

impl CausalMask {
    /// Plain causal attention over whole sequences: no earlier slots, no padding.
    pub fn causal() -> Self {
        Self::default()
    }

    /// New slots after `past` cached ones, with `left_padding[b]` padding slots at the start of
    /// row `b` (one entry per row, or none for no padding).
    pub fn cached(past: usize, left_padding: Vec<usize>) -> Self {
        Self { past, left_padding }
    }

    /// Slots before the first query.
    pub fn past(&self) -> usize {
        self.past
    }

    fn pad(&self, row: usize) -> usize {
        self.left_padding.get(row).copied().unwrap_or(0)
    }

    /// Whether query `query` (a slot, past included) of row `row` sees key `key`.
    fn allows(&self, row: usize, query: usize, key: usize) -> bool {
        self.span(row, query).contains(&key)
    }

    /// The keys query `query` of row `row` sees, always one run: from the row's first real slot
    /// to the query itself, or the query alone when it is padding.
    fn span(&self, row: usize, query: usize) -> std::ops::Range<usize> {
        self.pad(row).min(query)..query + 1
    }

    /// `[batch, 1, seq, keys]`, `true` where a query must not attend (burn's convention).
    fn masked(&self, batch: usize, seq: usize, keys: usize) -> TensorData {
        let mut masked = Vec::with_capacity(batch * seq * keys);
        for row in 0..batch {
            for query in self.past..self.past + seq {
                masked.extend((0..keys).map(|key| !self.allows(row, query, key)));
            }
        }
        TensorData::new(masked, [batch, 1, seq, keys])
    }
}

/// Softmax attention of queries over keys and values, causal and grouped: `softmax(q kᵀ / √d +
/// mask) v` per query head, query head `h` reading key/value head `h / (heads / kv_heads)`, with
/// gradients to all three inputs.
///
/// On the ndarray and flex devices with f32 tensors (and the `fast-cpu` feature) it runs one host
/// kernel, forward and backward; elsewhere it is burn's `attention` on the repeated key/value
/// heads. The two agree to about 1e-6 relative (the kernel's exponential is a polynomial good to
/// 1 ulp, and it sums in another order); NaN inputs give NaN outputs.
///
/// # Shapes
/// - q: `[batch, seq, heads, head_dim]`
/// - k, v: `[batch, past + seq, kv_heads, head_dim]`, `kv_heads` dividing `heads`
/// - output: `[batch, seq, heads · head_dim]`
///
/// # Panics
/// When the shapes disagree or `mask` names padding for another number of rows (as burn's own
/// operations panic on shapes).
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &CausalMask) -> Tensor<3> {
    let [batch, seq, heads, head_dim] = q.dims();
    let [k_batch, keys, kv_heads, k_dim] = k.dims();
    assert_eq!(
        k.dims(),
        v.dims(),
        "causal_attention: keys and values must have the same shape"
    );
    assert!(
        k_batch == batch && k_dim == head_dim && kv_heads > 0 && heads % kv_heads == 0,
        "causal_attention: queries {:?} and keys {:?} disagree (batch, head width, or heads not a multiple of kv heads)",
        q.dims(),
        k.dims()
    );
    assert_eq!(
        keys,
        mask.past + seq,
        "causal_attention: {keys} keys for {} past slots and {seq} queries",
        mask.past
    );
    assert!(
        mask.left_padding.is_empty() || mask.left_padding.len() == batch,
        "causal_attention: left padding for {} rows, batch of {batch}",
        mask.left_padding.len()
    );
    let host = cfg!(feature = "fast-cpu")
        && super::host_f32_pair((&q.device(), q.dtype()), (&k.device(), k.dtype()))
        && super::host_f32_pair((&k.device(), k.dtype()), (&v.device(), v.dtype()));
    if host && batch * seq * heads * head_dim > 0 {
        let (output, _log_sum_exp) = <Dispatch as AttentionBackend>::causal_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            mask.clone(),
        );
        return Tensor::from_dispatch(output);
    }
    composed_attention(q, k, v, mask)
}

/// burn's `attention` on `[batch, heads, seq, head_dim]` views, key/value heads repeated.
fn composed_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &CausalMask) -> Tensor<3> {
    let [batch, seq, heads, head_dim] = q.dims();
    let [_, keys, kv_heads, _] = k.dims();
    let groups = heads / kv_heads;
    let repeat = |t: Tensor<4>| {
        let t = t.swap_dims(1, 2);
        if groups == 1 {
            t
        } else {
            t.unsqueeze_dim::<5>(2)
                .expand([batch, kv_heads, groups, keys, head_dim])
                .reshape([batch, heads, keys, head_dim])
        }
    };
    let plain = mask.past == 0 && mask.left_padding.iter().all(|&pad| pad == 0);
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: plain,
    };
    let masked = (!plain).then(|| {
        Tensor::<4, Bool>::from_data(mask.masked(batch, seq, keys), &q.device()).expand([batch, heads, seq, keys])
    });
    let out = attention(q.swap_dims(1, 2), repeat(k), repeat(v), masked, None, options);
    out.swap_dims(1, 2).reshape([batch, seq, heads * head_dim])
}

/// Causal grouped-query attention as backend operations (host kernels on ndarray and flex).
#[backend_extension(Autodiff, NdArray: cfg(feature = "ndarray"), Flex: cfg(feature = "flex"))]
pub(crate) trait AttentionBackend: Backend {
    /// The output `[batch, seq, heads · head_dim]` and the log-sum-exp of each row of scaled
    /// scores, `[batch, seq, heads]` (what the backward recomputes the probabilities from).
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: CausalMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients w.r.t. `q`, `k` and `v`, given the forward's output and log-sum-exp and
    /// the upstream `grad` (of the output's shape).
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        output: FloatTensor<Self>,
        log_sum_exp: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: CausalMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

#[cfg(all(feature = "fast-cpu", any(feature = "ndarray", feature = "flex")))]
mod host {
    use burn::backend::TensorMetadata;
    use burn::backend::tensor::FloatTensor;
    use std::ops::Range;

    use rayon::prelude::*;

    use super::CausalMask;
    use crate::fused::kernel::fast_exp;
    use crate::fused::op::HostTensor;

    /// Queries per block: the stacked product of one task is `QUERY_BLOCK · groups` rows.
    const QUERY_BLOCK: usize = 64;

    /// The sizes of one call, in the layout the projections write.
    #[derive(Debug, Clone, Copy)]
    struct Dims {
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        keys: usize,
    }

    impl Dims {
        fn of(q: &[usize], k: &[usize]) -> Self {
            Self {
                batch: q[0],
                seq: q[1],
                heads: q[2],
                head_dim: q[3],
                keys: k[1],
                kv_heads: k[2],
            }
        }

        fn groups(&self) -> usize {
            self.heads / self.kv_heads
        }

        /// Offset of query `i`, head `h` of row `b`.
        fn q_at(&self, b: usize, i: usize, h: usize) -> usize {
            ((b * self.seq + i) * self.heads + h) * self.head_dim
        }

        /// Offset of key `j`, key/value head `kv` of row `b`.
        fn k_at(&self, b: usize, j: usize, kv: usize) -> usize {
            ((b * self.keys + j) * self.kv_heads + kv) * self.head_dim
        }

        fn scale(&self) -> f32 {
            1.0 / (self.head_dim as f32).sqrt()
        }
    }

    /// A pointer shared by tasks that write disjoint elements of one buffer.
    #[derive(Clone, Copy)]
    struct Shared(*mut f32);
    // SAFETY: every task writes a set of elements no other task touches (see the callers).
    #[allow(unsafe_code)]
    unsafe impl Send for Shared {}
    #[allow(unsafe_code)]
    unsafe impl Sync for Shared {}

    /// `dst[m × n] = beta · lhs[m × k] · rhs[k × n] (+ dst when `accumulate`)`, each operand
    /// given by its row and column strides, on the calling thread.
    ///
    /// # Safety
    /// Every element the strides address must lie inside its operand's allocation, and no
    /// other thread may touch `dst`'s elements during the call.
    #[allow(unsafe_code, clippy::too_many_arguments)]
    unsafe fn product(
        [m, n, k]: [usize; 3],
        dst: (*mut f32, isize, isize),
        lhs: (*const f32, isize, isize),
        rhs: (*const f32, isize, isize),
        beta: f32,
        accumulate: bool,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.0,
                dst.2,
                dst.1,
                accumulate,
                lhs.0,
                lhs.2,
                lhs.1,
                rhs.0,
                rhs.2,
                rhs.1,
                if accumulate { 1.0 } else { 0.0 },
                beta,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }

    /// One task's stacked query block: queries `i0..i0 + rows` of row `b` for the `groups`
    /// query heads of key/value head `kv`, stacked query-major (`r = i · groups + g`).
    struct Block {
        b: usize,
        kv: usize,
        i0: usize,
        rows: usize,
        /// Keys `0..keys` cover every key the block's last query may see.
        keys: usize,
    }

    impl Block {
        fn stacked(&self, dims: &Dims) -> usize {
            self.rows * dims.groups()
        }

        /// Copies the block's query rows (or any `[batch, seq, heads, head_dim]` tensor's)
        /// into `[stacked, head_dim]`.
        fn gather(&self, dims: &Dims, source: &[f32], into: &mut Vec<f32>) {
            let (d, groups) = (dims.head_dim, dims.groups());
            into.clear();
            for i in self.i0..self.i0 + self.rows {
                let start = dims.q_at(self.b, i, self.kv * groups);
                into.extend_from_slice(&source[start..start + groups * d]);
            }
        }

        /// The query slot of stacked row `r`.
        fn slot(&self, dims: &Dims, mask: &CausalMask, r: usize) -> usize {
            mask.past + self.i0 + r / dims.groups()
        }
    }

    /// Every block of a call, in an order that keeps one row's key/value head together.
    fn blocks(dims: &Dims, mask: &CausalMask) -> Vec<Block> {
        let mut out = Vec::new();
        for b in 0..dims.batch {
            for kv in 0..dims.kv_heads {
                for i0 in (0..dims.seq).step_by(QUERY_BLOCK) {
                    let rows = QUERY_BLOCK.min(dims.seq - i0);
                    out.push(Block {
                        b,
                        kv,
                        i0,
                        rows,
                        keys: mask.past + i0 + rows,
                    });
                }
            }
        }
        out
    }

    /// `scores[stacked × keys] = scale · Q_block · K[0..keys]ᵀ` into `scores`.
    fn block_scores(dims: &Dims, block: &Block, q_block: &[f32], k: &[f32], scores: &mut Vec<f32>) {
        let (m, n, d) = (block.stacked(dims), block.keys, dims.head_dim);
        scores.clear();
        scores.reserve(m * n);
        let k_row = (dims.kv_heads * d) as isize;
        // SAFETY: `scores` has room for m·n values, written before `set_len`; `q_block` holds
        // m·d; key j, dimension e of head kv is at k_at(b, j, kv) + e < k.len() for j < keys.
        #[allow(unsafe_code)]
        unsafe {
            product(
                [m, n, d],
                (scores.as_mut_ptr(), n as isize, 1),
                (q_block.as_ptr(), d as isize, 1),
                (k.as_ptr().add(dims.k_at(block.b, 0, block.kv)), 1, k_row),
                dims.scale(),
                false,
            );
            scores.set_len(m * n);
        }
    }

    /// Turns one row of scaled scores into probabilities in place (0 outside the keys `span`)
    /// and returns their log-sum-exp; a NaN score makes the whole row NaN.
    fn softmax_row(scores: &mut [f32], span: Range<usize>) -> f32 {
        let seen = &scores[span.clone()];
        if seen.iter().any(|s| s.is_nan()) {
            scores.fill(f32::NAN);
            return f32::NAN;
        }
        let max = seen.iter().fold(f32::NEG_INFINITY, |a, &s| a.max(s));
        scores[..span.start].fill(0.0);
        scores[span.end..].fill(0.0);
        let seen = &mut scores[span];
        let mut sum = 0.0f32;
        for s in seen.iter_mut() {
            *s = fast_exp(*s - max);
            sum += *s;
        }
        let inverse = 1.0 / sum;
        seen.iter_mut().for_each(|s| *s *= inverse);
        max + sum.ln()
    }

    /// Scaled scores into probabilities recomputed from a saved log-sum-exp (0 where masked; NaN
    /// throughout when the forward's row was).
    fn probabilities_row(scores: &mut [f32], log_sum_exp: f32, span: Range<usize>) {
        if log_sum_exp.is_nan() {
            scores.fill(f32::NAN);
            return;
        }
        scores[..span.start].fill(0.0);
        scores[span.end..].fill(0.0);
        for s in &mut scores[span] {
            *s = fast_exp(*s - log_sum_exp);
        }
    }

    pub(super) fn forward<B: HostTensor>(
        q: &FloatTensor<B>,
        k: &FloatTensor<B>,
        v: &FloatTensor<B>,
        mask: &CausalMask,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let dims = Dims::of(&q.shape(), &k.shape());
        let len = dims.batch * dims.seq * dims.heads;
        let mut out = vec![0.0f32; len * dims.head_dim];
        let mut lse = vec![0.0f32; len];
        let (out_ptr, lse_ptr) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
        B::with_values(q, |q| {
            B::with_values(k, |k| {
                B::with_values(v, |v| {
                    blocks(&dims, mask).par_iter().for_each_init(
                        || (Vec::new(), Vec::new(), Vec::new()),
                        |(q_block, scores, o_block), block| {
                            forward_block(
                                &dims,
                                mask,
                                block,
                                (q, k, v),
                                (q_block, scores, o_block),
                                (out_ptr, lse_ptr),
                            )
                        },
                    )
                })
            })
        });
        let shape = q.shape().to_vec();
        (
            B::from_values(out, vec![dims.batch, dims.seq, dims.heads * dims.head_dim]),
            B::from_values(lse, shape[..3].to_vec()),
        )
    }

    #[allow(clippy::type_complexity)]
    fn forward_block(
        dims: &Dims,
        mask: &CausalMask,
        block: &Block,
        (q, k, v): (&[f32], &[f32], &[f32]),
        (q_block, scores, o_block): (&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>),
        (out, lse): (Shared, Shared),
    ) {
        let (m, n, d, groups) = (block.stacked(dims), block.keys, dims.head_dim, dims.groups());
        block.gather(dims, q, q_block);
        block_scores(dims, block, q_block, k, scores);
        let mut row_lse = Vec::with_capacity(m);
        for (r, row) in scores.chunks_mut(n).enumerate() {
            let slot = block.slot(dims, mask, r);
            row_lse.push(softmax_row(row, mask.span(block.b, slot)));
        }
        o_block.clear();
        o_block.reserve(m * d);
        let v_row = (dims.kv_heads * d) as isize;
        // SAFETY: `o_block` has room for m·d values, written before `set_len`; `scores` holds
        // m·n probabilities; value j < keys of head kv lies inside `v` (as the keys in `k`).
        #[allow(unsafe_code)]
        unsafe {
            product(
                [m, d, n],
                (o_block.as_mut_ptr(), d as isize, 1),
                (scores.as_ptr(), n as isize, 1),
                (v.as_ptr().add(dims.k_at(block.b, 0, block.kv)), v_row, 1),
                1.0,
                false,
            );
            o_block.set_len(m * d);
        }
        for (r, (values, &log_sum_exp)) in o_block.chunks(d).zip(&row_lse).enumerate() {
            let (i, h) = (block.i0 + r / groups, block.kv * groups + r % groups);
            let at = dims.q_at(block.b, i, h);
            // SAFETY: query i, head h belongs to this block alone (blocks split the rows, key/
            // value heads and query ranges), so no other task writes these elements.
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::copy_nonoverlapping(values.as_ptr(), out.0.add(at), d);
                *lse.0.add(at / d) = log_sum_exp;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward<B: HostTensor>(
        q: &FloatTensor<B>,
        k: &FloatTensor<B>,
        v: &FloatTensor<B>,
        output: &FloatTensor<B>,
        log_sum_exp: &FloatTensor<B>,
        grad: &FloatTensor<B>,
        mask: &CausalMask,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let dims = Dims::of(&q.shape(), &k.shape());
        let mut d_q = vec![0.0f32; dims.batch * dims.seq * dims.heads * dims.head_dim];
        let kv_len = dims.batch * dims.keys * dims.kv_heads * dims.head_dim;
        let (mut d_k, mut d_v) = (vec![0.0f32; kv_len], vec![0.0f32; kv_len]);
        let targets = (
            Shared(d_q.as_mut_ptr()),
            Shared(d_k.as_mut_ptr()),
            Shared(d_v.as_mut_ptr()),
        );
        let all = blocks(&dims, mask);
        // One task per (row, key/value head): its blocks all add into the same keys' gradients.
        let per_task = dims.seq.div_ceil(QUERY_BLOCK);
        B::with_values(q, |q| {
            B::with_values(k, |k| {
                B::with_values(v, |v| {
                    B::with_values(output, |o| {
                        B::with_values(log_sum_exp, |lse| {
                            B::with_values(grad, |g| {
                                all.par_chunks(per_task.max(1))
                                    .for_each(|task| backward_task(&dims, mask, task, [q, k, v, o, lse, g], targets))
                            })
                        })
                    })
                })
            })
        });
        let shape = |t: &FloatTensor<B>| t.shape().to_vec();
        (
            B::from_values(d_q, shape(q)),
            B::from_values(d_k, shape(k)),
            B::from_values(d_v, shape(v)),
        )
    }

    /// The gradients of one (row, key/value head): its query rows' `d q` and all of its keys'
    /// and values' `d k`, `d v`.
    fn backward_task(
        dims: &Dims,
        mask: &CausalMask,
        task: &[Block],
        [q, k, v, o, lse, g]: [&[f32]; 6],
        (d_q, d_k, d_v): (Shared, Shared, Shared),
    ) {
        let Some(first) = task.first() else { return };
        let (b, kv, d, groups) = (first.b, first.kv, dims.head_dim, dims.groups());
        let scale = dims.scale();
        let kv_row = (dims.kv_heads * d) as isize;
        let kv_start = dims.k_at(b, 0, kv);
        let (mut q_block, mut g_block, mut o_block) = (Vec::new(), Vec::new(), Vec::new());
        let (mut probs, mut d_scores, mut dq_block) = (Vec::new(), Vec::new(), Vec::new());
        for block in task {
            let (m, n) = (block.stacked(dims), block.keys);
            block.gather(dims, q, &mut q_block);
            block.gather(dims, g, &mut g_block);
            block.gather(dims, o, &mut o_block);
            block_scores(dims, block, &q_block, k, &mut probs);
            // D_r = Σ_e dO_re O_re, the softmax's correction term.
            let correction: Vec<f32> = g_block
                .chunks(d)
                .zip(o_block.chunks(d))
                .map(|(g, o)| g.iter().zip(o).map(|(g, o)| g * o).sum())
                .collect();
            for (r, row) in probs.chunks_mut(n).enumerate() {
                let (i, h) = (block.i0 + r / groups, kv * groups + r % groups);
                let slot = block.slot(dims, mask, r);
                let log_sum_exp = lse[dims.q_at(b, i, h) / d];
                probabilities_row(row, log_sum_exp, mask.span(b, slot));
            }
            d_scores.clear();
            d_scores.reserve(m * n);
            dq_block.clear();
            dq_block.reserve(m * d);
            // SAFETY: the buffers have room for what each product writes before its `set_len`;
            // keys and values j < n of head kv lie inside `k`, `v`; this task alone (one row and
            // key/value head) writes the keys' and values' gradients at kv_start + j·kv_row.
            #[allow(unsafe_code)]
            unsafe {
                // d V[0..n] += Pᵀ · dO
                product(
                    [n, d, m],
                    (d_v.0.add(kv_start), kv_row, 1),
                    (probs.as_ptr(), 1, n as isize),
                    (g_block.as_ptr(), d as isize, 1),
                    1.0,
                    true,
                );
                // dP = dO · V[0..n]ᵀ
                product(
                    [m, n, d],
                    (d_scores.as_mut_ptr(), n as isize, 1),
                    (g_block.as_ptr(), d as isize, 1),
                    (v.as_ptr().add(kv_start), 1, kv_row),
                    1.0,
                    false,
                );
                d_scores.set_len(m * n);
            }
            // dS = P ∘ (dP − D) · scale (scaled once here for both d Q and d K).
            for ((row, p), &c) in d_scores.chunks_mut(n).zip(probs.chunks(n)).zip(&correction) {
                for (ds, &p) in row.iter_mut().zip(p) {
                    *ds = p * (*ds - c) * scale;
                }
            }
            // SAFETY: as above; `dq_block` has room for m·d values.
            #[allow(unsafe_code)]
            unsafe {
                // d Q = dS · K[0..n]
                product(
                    [m, d, n],
                    (dq_block.as_mut_ptr(), d as isize, 1),
                    (d_scores.as_ptr(), n as isize, 1),
                    (k.as_ptr().add(kv_start), kv_row, 1),
                    1.0,
                    false,
                );
                dq_block.set_len(m * d);
                // d K[0..n] += dSᵀ · Q
                product(
                    [n, d, m],
                    (d_k.0.add(kv_start), kv_row, 1),
                    (d_scores.as_ptr(), 1, n as isize),
                    (q_block.as_ptr(), d as isize, 1),
                    1.0,
                    true,
                );
            }
            for (r, values) in dq_block.chunks(d).enumerate() {
                let (i, h) = (block.i0 + r / groups, kv * groups + r % groups);
                // SAFETY: query i, head h belongs to this block alone.
                #[allow(unsafe_code)]
                unsafe {
                    std::ptr::copy_nonoverlapping(values.as_ptr(), d_q.0.add(dims.q_at(b, i, h)), d);
                }
            }
        }
    }
}

macro_rules! host_impl {
    ($backend:ty, $feature:literal) => {
        #[cfg(feature = $feature)]
        impl AttentionBackend for $backend {
            fn causal_attention(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                mask: CausalMask,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                #[cfg(feature = "fast-cpu")]
                return host::forward::<Self>(&q, &k, &v, &mask);
                #[cfg(not(feature = "fast-cpu"))]
                {
                    let _ = (q, k, v, mask);
                    unreachable!("causal_attention dispatches to the host kernel only with fast-cpu")
                }
            }

            fn causal_attention_backward(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                output: FloatTensor<Self>,
                log_sum_exp: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                mask: CausalMask,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                #[cfg(feature = "fast-cpu")]
                return host::backward::<Self>(&q, &k, &v, &output, &log_sum_exp, &grad, &mask);
                #[cfg(not(feature = "fast-cpu"))]
                {
                    let _ = (q, k, v, output, log_sum_exp, grad, mask);
                    unreachable!("causal_attention dispatches to the host kernel only with fast-cpu")
                }
            }
        }
    };
}

host_impl!(burn::backend::NdArray, "ndarray");
host_impl!(burn::backend::Flex, "flex");

/// Saved by the forward pass: the mask; the state holds the inputs, the output and the
/// log-sum-exp of each row.
#[derive(Debug)]
struct AttentionBackward {
    mask: CausalMask,
}

impl<B: AttentionBackend> Backward<B, 3> for AttentionBackward {
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let (q, k, v, output, log_sum_exp) = ops.state;
        let (d_q, d_k, d_v) = B::causal_attention_backward(q, k, v, output, log_sum_exp, upstream, self.mask);
        for (node, grad) in [(q_node, d_q), (k_node, d_k), (v_node, d_v)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: CausalMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let step = AttentionBackward { mask: mask.clone() };
        match step
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (output, log_sum_exp) = B::causal_attention(q.clone(), k.clone(), v.clone(), mask);
                let state = (q, k, v, output.clone(), log_sum_exp.clone());
                (prep.finish(state, output), FloatTensor::<Self>::new(log_sum_exp))
            }
            OpsKind::UnTracked(prep) => {
                let (output, log_sum_exp) =
                    B::causal_attention(q.into_primitive(), k.into_primitive(), v.into_primitive(), mask);
                (prep.finish(output), FloatTensor::<Self>::new(log_sum_exp))
            }
        }
    }

    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        output: FloatTensor<Self>,
        log_sum_exp: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: CausalMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (d_q, d_k, d_v) = B::causal_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            output.into_primitive(),
            log_sum_exp.into_primitive(),
            grad.into_primitive(),
            mask,
        );
        (
            FloatTensor::<Self>::new(d_q),
            FloatTensor::<Self>::new(d_k),
            FloatTensor::<Self>::new(d_v),
        )
    }
}
