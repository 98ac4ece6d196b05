//! Products of rows with a weight matrix (`[m, k] · W`) on the host devices: for `m ≤`
//! [`FEW_ROWS`] (the projections of one decoding step) one host kernel on every core, for more
//! rows the `gemm` crate into the result's own buffer (`gemm_matmul`).
//!
//! burn's CPU matmul runs products below 192³ on one thread, so a decoding step of SmolLM2
//! streamed its 540 MB of weights through one of two cores. Here the product is split into tasks
//! that each stream long contiguous runs of the weight (whole rows of up to 1024 columns, the
//! inner dimension divided between tasks, their partial sums added at the end) with the partial
//! sums of every row in L1. Decoding SmolLM2 on flex went from 20.3 to 25.8 tokens/s at batch 1
//! and from 78 to 103 at batch 8 (`llama_bench`, BENCHMARKS.md). On weights already in cache a
//! lone call is no faster than burn's (`cargo bench --bench bench_main --features flex --
//! '^rows/'`): the gain is memory bandwidth from both cores.

// burn 0.22 deprecates ndarray in favour of flex; the extension macro names it in generated code.
#![allow(deprecated)]

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use rayon::prelude::*;

#[cfg(any(feature = "ndarray", feature = "flex"))]
use super::op::HostTensor;

/// The most rows [`weight_matmul`] sends to its few-row host kernel; larger products are GEMMs.
pub const FEW_ROWS: usize = 16;

/// How a weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`, as `burn::nn::Linear` keeps its weight: the product is `x · W`.
    InOut,
    /// `[out, in]`, as an embedding table used as a tied output head: the product is `x · Wᵀ`.
    OutIn,
}

/// `x · W` (or `x · Wᵀ` for [`WeightLayout::OutIn`]), differentiable in both.
///
/// On the ndarray and flex devices, with f32 tensors and at most [`FEW_ROWS`] rows in `x`, one
/// host kernel streams the weight on every core; with more rows and the `fast-cpu` feature it is
/// the `gemm` crate's product written straight into the result (burn-flex's own matmul copies its
/// output once more). Otherwise, and for the gradients, it is burn's `matmul`. They agree to f32
/// rounding (the kernels sum in other orders).
///
/// # Shapes
/// - x: `[m, in]`
/// - weight: `[in, out]` or `[out, in]` as `layout` says
/// - output: `[m, out]`
///
/// # Panics
/// When the inner widths differ (as burn's `matmul` does).
pub fn weight_matmul(x: Tensor<2>, weight: Tensor<2>, layout: WeightLayout) -> Tensor<2> {
    let [rows, width] = x.dims();
    let inner = match layout {
        WeightLayout::InOut => weight.dims()[0],
        WeightLayout::OutIn => weight.dims()[1],
    };
    assert_eq!(
        width, inner,
        "weight_matmul: x has {width} columns, the weight's input width is {inner}"
    );
    let host = (rows <= FEW_ROWS || cfg!(feature = "fast-cpu"))
        && super::host_f32_pair((&x.device(), x.dtype()), (&weight.device(), weight.dtype()));
    if !host {
        return match layout {
            WeightLayout::InOut => x.matmul(weight),
            WeightLayout::OutIn => x.matmul(weight.transpose()),
        };
    }
    let output = <Dispatch as RowsBackend>::weight_matmul(
        x.into_dispatch(),
        weight.into_dispatch(),
        layout == WeightLayout::OutIn,
    );
    Tensor::from_dispatch(output)
}

/// The few-row product as a backend operation (a host kernel on ndarray and flex).
#[backend_extension(Autodiff, NdArray: cfg(feature = "ndarray"), Flex: cfg(feature = "flex"))]
pub(crate) trait RowsBackend: Backend {
    /// `x · W`, or `x · Wᵀ` when `transposed` (the weight stored `[out, in]`).
    fn weight_matmul(x: FloatTensor<Self>, weight: FloatTensor<Self>, transposed: bool) -> FloatTensor<Self>;
}

/// Which compiled copy of the kernel runs.
#[derive(Clone, Copy)]
enum Simd {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    }
}

/// How [`rows_matmul`] splits a product into parallel tasks: column blocks, and for the `[k, n]`
/// layout also ranges of the inner dimension, so that each task streams long contiguous runs of
/// the weight (a task's rows of a few hundred bytes each left the prefetchers idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Split {
    /// Columns per block (the last may be narrower).
    columns: usize,
    /// Inner indices per task (the last may be fewer); a multiple of 4.
    inner: usize,
}

impl Split {
    fn new(k: usize, n: usize, transposed: bool, threads: usize) -> Self {
        let tasks = 2 * threads.max(1);
        if transposed {
            // Each output column is one contiguous weight row: blocks of columns stream.
            let columns = n.div_ceil(4 * tasks).clamp(1, 1024);
            return Self {
                columns,
                inner: k.max(1),
            };
        }
        // Whole weight rows up to 1024 columns (4 KiB runs), the inner dimension split so that
        // every thread gets work.
        let blocks = n.div_ceil(1024).max(1);
        let columns = n.div_ceil(blocks).next_multiple_of(16).max(16);
        let splits = tasks.div_ceil(blocks).max(1);
        let inner = k.div_ceil(splits).next_multiple_of(4).max(4);
        Self { columns, inner }
    }
}

/// `out[r, j] = Σ_i x[r, i] · w[i, j]` for `w` stored `[k, n]`, or `Σ_i x[r, i] · w[j, i]` when
/// `transposed` (stored `[n, k]`). `out` is `[m, n]`, overwritten.
pub(crate) fn rows_matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, transposed: bool, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == k * n && out.len() == m * n);
    let simd = Simd::detect();
    let split = Split::new(k, n, transposed, rayon::current_num_threads());
    let (blocks, splits) = (n.div_ceil(split.columns), k.div_ceil(split.inner).max(1));
    let parts: Vec<(usize, Vec<f32>)> = (0..blocks * splits)
        .into_par_iter()
        .map(|task| {
            let (block, part) = (task / splits, task % splits);
            let start = block * split.columns;
            let width = split.columns.min(n - start);
            let first = part * split.inner;
            let task = Task {
                x,
                w,
                m,
                k,
                n,
                start,
                width,
                inner: first..(first + split.inner).min(k),
            };
            let mut sums = vec![0.0f32; m * width];
            run(simd, &task, transposed, &mut sums);
            (start, sums)
        })
        .collect();
    out.fill(0.0);
    for (start, sums) in parts {
        let width = sums.len() / m.max(1);
        for (r, row) in sums.chunks_exact(width.max(1)).enumerate().take(m) {
            for (o, s) in out[r * n + start..r * n + start + width].iter_mut().zip(row) {
                *o += s;
            }
        }
    }
}

/// One parallel task: the columns `start..start + width` of every row.
struct Task<'a> {
    x: &'a [f32],
    w: &'a [f32],
    m: usize,
    k: usize,
    n: usize,
    start: usize,
    width: usize,
    /// The inner indices this task sums over.
    inner: std::ops::Range<usize>,
}

fn run(simd: Simd, task: &Task<'_>, transposed: bool, sums: &mut [f32]) {
    match (simd, transposed) {
        (Simd::Baseline, false) => in_out::<false>(task, sums),
        (Simd::Baseline, true) => out_in::<false>(task, sums),
        // SAFETY: `detect` returned these only after checking that this CPU has the features
        // the functions are compiled for.
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        (Simd::Avx2, false) => unsafe { in_out_avx2(task, sums) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        (Simd::Avx2, true) => unsafe { out_in_avx2(task, sums) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        (Simd::Avx512, false) => unsafe { in_out_avx512(task, sums) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        (Simd::Avx512, true) => unsafe { out_in_avx512(task, sums) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn in_out_avx2(task: &Task<'_>, sums: &mut [f32]) {
    in_out::<true>(task, sums);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn out_in_avx2(task: &Task<'_>, sums: &mut [f32]) {
    out_in::<true>(task, sums);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn in_out_avx512(task: &Task<'_>, sums: &mut [f32]) {
    in_out::<true>(task, sums);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn out_in_avx512(task: &Task<'_>, sums: &mut [f32]) {
    out_in::<true>(task, sums);
}

/// `a · b + c`, as one instruction where the caller is compiled with FMA (`mul_add` is a libm
/// call without it).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Weight `[k, n]`: each weight row's slice of columns is added, scaled, into every output row;
/// four weight rows per pass, so the partial sums are read and written a quarter as often.
#[inline(always)]
fn in_out<const FMA: bool>(task: &Task<'_>, sums: &mut [f32]) {
    let Task {
        x,
        w,
        m,
        k,
        n,
        start,
        width,
        ..
    } = *task;
    let column = |i: usize| &w[i * n + start..i * n + start + width];
    let end = task.inner.end;
    let mut i = task.inner.start;
    while i + 4 <= end {
        let (w0, w1, w2, w3) = (column(i), column(i + 1), column(i + 2), column(i + 3));
        for r in 0..m {
            let xr = &x[r * k + i..r * k + i + 4];
            let (a, b, c, d) = (xr[0], xr[1], xr[2], xr[3]);
            let row = &mut sums[r * width..(r + 1) * width];
            for j in 0..width {
                let partial = madd::<FMA>(a, w0[j], madd::<FMA>(b, w1[j], 0.0));
                let partial = madd::<FMA>(c, w2[j], madd::<FMA>(d, w3[j], partial));
                row[j] += partial;
            }
        }
        i += 4;
    }
    for i in i..end {
        let wi = column(i);
        for r in 0..m {
            let a = x[r * k + i];
            let row = &mut sums[r * width..(r + 1) * width];
            for j in 0..width {
                row[j] = madd::<FMA>(a, wi[j], row[j]);
            }
        }
    }
}

/// Lanes of one vector of partial sums (an AVX-512 register).
const LANES: usize = 16;

/// Weight `[n, k]`: one dot product of length `k` per output, four weight rows at a time (four
/// independent chains of multiply-adds, each `x` vector loaded once for four), each weight row
/// read once from memory and then from L1 for every output row.
#[inline(always)]
fn out_in<const FMA: bool>(task: &Task<'_>, sums: &mut [f32]) {
    let Task {
        x,
        w,
        m,
        k,
        start,
        width,
        ..
    } = *task;
    let row = |j: usize| &w[(start + j) * k..(start + j + 1) * k];
    let mut j = 0;
    while j + 4 <= width {
        let rows = [row(j), row(j + 1), row(j + 2), row(j + 3)];
        for r in 0..m {
            let dots = dot4::<FMA>(&x[r * k..(r + 1) * k], rows);
            sums[r * width + j..r * width + j + 4].copy_from_slice(&dots);
        }
        j += 4;
    }
    for j in j..width {
        let wj = row(j);
        for r in 0..m {
            sums[r * width + j] = dot4::<FMA>(&x[r * k..(r + 1) * k], [wj; 4])[0];
        }
    }
}

/// The dot products of `a` with each of four rows of its length.
#[inline(always)]
fn dot4<const FMA: bool>(a: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    let len = a.len();
    let body = len - len % LANES;
    let mut lanes = [[0.0f32; LANES]; 4];
    let mut c = 0;
    while c < body {
        let av = &a[c..c + LANES];
        for (lane, row) in lanes.iter_mut().zip(rows) {
            let wv = &row[c..c + LANES];
            for l in 0..LANES {
                lane[l] = madd::<FMA>(av[l], wv[l], lane[l]);
            }
        }
        c += LANES;
    }
    let mut totals = [0.0f32; 4];
    for ((total, lane), row) in totals.iter_mut().zip(&mut lanes).zip(rows) {
        // Pairwise, as the lanes would be folded in registers, then the tail.
        let mut half = LANES;
        while half > 1 {
            half /= 2;
            for l in 0..half {
                lane[l] += lane[l + half];
            }
        }
        *total = lane[0];
        for i in body..len {
            *total = madd::<FMA>(a[i], row[i], *total);
        }
    }
    totals
}

#[cfg(any(feature = "ndarray", feature = "flex"))]
fn host_weight_matmul<B: HostTensor>(x: &FloatTensor<B>, weight: &FloatTensor<B>, transposed: bool) -> FloatTensor<B> {
    let (m, k) = (x.shape()[0], x.shape()[1]);
    let n = if transposed {
        weight.shape()[0]
    } else {
        weight.shape()[1]
    };
    #[cfg(feature = "fast-cpu")]
    if m > FEW_ROWS {
        let out = B::with_values(x, |x| {
            B::with_values(weight, |w| gemm_matmul(x, w, m, k, n, transposed))
        });
        return B::from_values(out, vec![m, n]);
    }
    let mut out = vec![0.0f32; m * n];
    B::with_values(x, |x| {
        B::with_values(weight, |w| rows_matmul(x, w, m, k, n, transposed, &mut out))
    });
    B::from_values(out, vec![m, n])
}

/// `x · W` (or `x · Wᵀ`) for many rows: the `gemm` crate's kernels, as burn-flex calls them, but
/// into a buffer the result tensor then owns. burn-flex's own output buffer is allocated and then
/// copied once more to meet its alignment (`FlexTensor::empty`), a pass over the whole product
/// that was 6 % of SmolLM2's 8 × 256 forward (its logits alone are 403 MB).
/// Multiply-adds from which `gemm_matmul` splits a product over the rayon pool: burn-flex's
/// own threshold (below it one thread is faster).
pub(super) const GEMM_PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

#[cfg(all(feature = "fast-cpu", any(feature = "ndarray", feature = "flex")))]
fn gemm_matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, transposed: bool) -> Vec<f32> {
    let parallel = m.saturating_mul(n).saturating_mul(k) >= GEMM_PARALLEL_THRESHOLD;
    gemm_product(x, w, [m, k, n], transposed, parallel)
}

/// [`gemm_matmul`] on one thread, or split over the rayon pool when `parallel` (the relation
/// kernels run two small products side by side, one per thread).
#[cfg(feature = "fast-cpu")]
pub(super) fn gemm_product(x: &[f32], w: &[f32], [m, k, n]: [usize; 3], transposed: bool, parallel: bool) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == k * n);
    if k == 0 {
        return vec![0.0; m * n];
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // Element (i, j) of the right operand: w[i·n + j] for [k, n], w[j·k + i] for [n, k].
    let (rhs_cs, rhs_rs) = if transposed { (k as isize, 1) } else { (1, n as isize) };
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: the slices hold m·k and k·n values (asserted) and `out` has room for m·n, with the
    // strides above addressing only inside them; with `read_dst` false gemm writes every output
    // element before anything reads it, so the length may then cover them all.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(m * n);
    }
    out
}

macro_rules! host_impl {
    ($backend:ty, $feature:literal) => {
        #[cfg(feature = $feature)]
        impl RowsBackend for $backend {
            fn weight_matmul(x: FloatTensor<Self>, weight: FloatTensor<Self>, transposed: bool) -> FloatTensor<Self> {
                host_weight_matmul::<Self>(&x, &weight, transposed)
            }
        }
    };
}

host_impl!(burn::backend::NdArray, "ndarray");
host_impl!(burn::backend::Flex, "flex");

/// Saved by the forward pass: both inputs and the layout; the gradients are burn's matmuls.
#[derive(Debug)]
struct RowsBackward {
    transposed: bool,
}

impl<B: RowsBackend> Backward<B, 2> for RowsBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node, weight_node] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        if let Some(node) = x_node {
            // dx = dy · Wᵀ for W [in, out]; dy · W for W stored [out, in].
            let w = if self.transposed {
                weight
            } else {
                B::float_transpose(weight)
            };
            grads.register::<B>(node.id, B::float_matmul(upstream.clone(), w));
        }
        if let Some(node) = weight_node {
            // dW = xᵀ · dy, stored [in, out]; its transpose dyᵀ · x for [out, in].
            let grad = if self.transposed {
                B::float_matmul(B::float_transpose(upstream), x)
            } else {
                B::float_matmul(B::float_transpose(x), upstream)
            };
            grads.register::<B>(node.id, grad);
        }
    }
}

impl<B: RowsBackend, C: CheckpointStrategy> RowsBackend for Autodiff<B, C> {
    fn weight_matmul(x: FloatTensor<Self>, weight: FloatTensor<Self>, transposed: bool) -> FloatTensor<Self> {
        let step = RowsBackward { transposed };
        match step.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let output = B::weight_matmul(x.clone(), weight.clone(), transposed);
                prep.finish((x, weight), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::weight_matmul(
                x.into_primitive(),
                weight.into_primitive(),
                transposed,
            )),
        }
    }
}
