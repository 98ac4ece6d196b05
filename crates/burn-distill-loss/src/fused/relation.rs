//! Host kernels of the feature and relational losses: the loss and its gradient w.r.t. the
//! student in one call, as the fused logit losses have.
//!
//! Composed from burn's operations, SP, PKT, CKA, DIST, AT and the hidden-state distances are
//! each a few matrix products and a dozen or more element-wise operations on tensors of at most
//! a few million elements; at the sizes they are used (a batch of 128, 512-wide features) the
//! fixed cost of every operation and of the autodiff graph is most of the time. Here each loss
//! is one backend operation: its forward pass computes the value and the gradient on the host
//! (matrix products by the `gemm` crate, as burn-flex calls it; sums in f64), its backward pass
//! only scales that gradient. The teacher gets no gradient (the losses detach it).

// burn 0.22 deprecates ndarray in favour of flex; the extension macro names it in generated code.
#![allow(deprecated)]

use std::sync::Arc;

#[cfg(any(feature = "ndarray", feature = "flex"))]
use burn::backend::TensorMetadata;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::Implementation;
use super::kernel::{Simd, fast_exp, fast_ln};
#[cfg(any(feature = "ndarray", feature = "flex"))]
use super::op::HostTensor;
use super::rows::GEMM_PARALLEL_THRESHOLD;
use crate::error::{LossError, Result};

/// The widest copy of a [`multiversion!`] function this CPU runs, found once.
fn simd() -> Simd {
    static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *SIMD.get_or_init(Simd::detect)
}

/// A function compiled three times (baseline x86-64, AVX2 + FMA, AVX-512), the widest the CPU
/// has chosen at run time: the crate is built for baseline x86-64, where LLVM vectorises the
/// element-wise loops 4 lanes wide at most. Its helpers are `#[inline(always)]`, so they are
/// compiled into each copy.
macro_rules! multiversion {
    ($(#[doc = $doc:literal])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[doc = $doc])*
        #[allow(clippy::too_many_arguments, unsafe_code)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            match simd() {
                // SAFETY: `simd()` found these features on this CPU.
                #[cfg(target_arch = "x86_64")]
                Simd::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 => unsafe { avx2($($arg),*) },
                Simd::Baseline => body($($arg),*),
            }
        }
    };
}

/// A norm is never taken below `1e-12` (PyTorch's `F.normalize`): compared as squares.
const NORM_FLOOR_SQUARED: f64 = 1e-24;

/// Which loss a relation kernel computes, over a student `[rows, student_width]` and a teacher
/// `[rows, teacher_width]`.
#[derive(Debug, Clone)]
pub(crate) enum RelationJob {
    /// Similarity-preserving: `‖N(T Tᵀ) − N(S Sᵀ)‖²_F / rows²`, `N` scaling rows to unit norm.
    Sp,
    /// Probabilistic knowledge transfer with its `eps` (see [`PktLoss`](crate::PktLoss)).
    Pkt { eps: f32 },
    /// `1 − CKA` from the `[rows, rows]` Gram matrices.
    Cka { debiased: bool },
    /// DIST on `[rows, classes]` logits.
    Dist { beta: f64, gamma: f64, temperature: f64 },
    /// Attention transfer: each row is an example's `[channels, positions]` map; its loss
    /// `mean_k (q_s − q_t)²` of the normalised `mean_c |x|^p`, weighted by `weights[row]`.
    At {
        p: f64,
        positions: usize,
        weights: Arc<Vec<f32>>,
    },
    /// `Σ_i w_i · mean_k (s_ik − t_ik)²`.
    HiddenMse { weights: Arc<Vec<f32>> },
    /// `Σ_i w_i · (1 − cos(s_i, t_i))`, norms floored at `1e-8` as PyTorch's.
    HiddenCosine { weights: Arc<Vec<f32>> },
}

/// Whether the host kernel takes `student` and `teacher` (f32, both on one ndarray or flex
/// device), as `implementation` asks; `Err` when `Fused` is forced where it cannot run.
pub(crate) fn use_host_relation<const D: usize>(
    implementation: Implementation,
    student: &Tensor<D>,
    teacher: &Tensor<D>,
) -> Result<bool> {
    let possible = super::host_f32_pair(
        (&student.device(), student.dtype()),
        (&teacher.device(), teacher.dtype()),
    );
    match implementation {
        Implementation::Composed => Ok(false),
        Implementation::Auto => Ok(possible),
        Implementation::Fused if possible => Ok(true),
        Implementation::Fused => Err(LossError::FusedUnavailable {
            device: format!("{:?}", student.device()),
            dtype: format!("{:?}", [student.dtype(), teacher.dtype()]),
        }),
    }
}

/// The loss `[1]` of `job`, differentiable w.r.t. `student` (the teacher gets no gradient).
/// Both are f32 on one host device ([`use_host_relation`]).
pub(crate) fn relation_loss(student: Tensor<2>, teacher: Tensor<2>, job: RelationJob) -> Tensor<1> {
    debug_assert!(student.dtype() == DType::F32 && teacher.dtype() == DType::F32);
    let output = <Dispatch as RelationBackend>::relation_loss(student.into_dispatch(), teacher.into_dispatch(), job);
    Tensor::from_dispatch(output)
}

/// The relation losses as backend operations (host kernels on ndarray and flex).
#[backend_extension(Autodiff, NdArray: cfg(feature = "ndarray"), Flex: cfg(feature = "flex"))]
pub(crate) trait RelationBackend: Backend {
    /// The loss `[1]` of `job`.
    fn relation_loss(student: FloatTensor<Self>, teacher: FloatTensor<Self>, job: RelationJob) -> FloatTensor<Self>;

    /// The loss `[1]` and its gradient w.r.t. `student`, from one call. Not differentiable
    /// itself.
    fn relation_loss_grad(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        job: RelationJob,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The saved gradient times the upstream gradient `[1]`.
    fn relation_scale_grad(grad: FloatTensor<Self>, upstream: FloatTensor<Self>) -> FloatTensor<Self>;
}

#[cfg(any(feature = "ndarray", feature = "flex"))]
fn host_relation<B: HostTensor>(
    student: &FloatTensor<B>,
    teacher: &FloatTensor<B>,
    job: &RelationJob,
    want_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let shape = student.shape().to_vec();
    let (rows, student_width, teacher_width) = (shape[0], shape[1], teacher.shape()[1]);
    let (loss, grad) = B::with_values(student, |s| {
        B::with_values(teacher, |t| {
            let sizes = Sizes {
                rows,
                student: student_width,
                teacher: teacher_width,
            };
            job.run(s, t, sizes, want_grad)
        })
    });
    (
        B::from_values(vec![loss as f32], vec![1]),
        grad.map(|grad| B::from_values(grad, shape)),
    )
}

#[cfg(any(feature = "ndarray", feature = "flex"))]
fn host_relation_scale_grad<B: HostTensor>(grad: FloatTensor<B>, upstream: FloatTensor<B>) -> FloatTensor<B> {
    let scale = B::with_values(&upstream, |values| values[0]);
    if scale == 1.0 {
        grad
    } else {
        B::float_mul_scalar(grad, scale.into())
    }
}

macro_rules! host_impl {
    ($backend:ty, $feature:literal) => {
        #[cfg(feature = $feature)]
        impl RelationBackend for $backend {
            fn relation_loss(
                student: FloatTensor<Self>,
                teacher: FloatTensor<Self>,
                job: RelationJob,
            ) -> FloatTensor<Self> {
                host_relation::<Self>(&student, &teacher, &job, false).0
            }

            fn relation_loss_grad(
                student: FloatTensor<Self>,
                teacher: FloatTensor<Self>,
                job: RelationJob,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                let (loss, grad) = host_relation::<Self>(&student, &teacher, &job, true);
                (loss, grad.expect("the gradient was asked for"))
            }

            fn relation_scale_grad(grad: FloatTensor<Self>, upstream: FloatTensor<Self>) -> FloatTensor<Self> {
                host_relation_scale_grad::<Self>(grad, upstream)
            }
        }
    };
}

host_impl!(burn::backend::NdArray, "ndarray");
host_impl!(burn::backend::Flex, "flex");

/// Saved by the forward pass: the gradient of the loss w.r.t. the student.
#[derive(Debug)]
struct RelationBackward;

impl<B: RelationBackend> Backward<B, 1> for RelationBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let Some(parent) = parent else { return };
        grads.register::<B>(parent.id, B::relation_scale_grad(ops.state, upstream));
    }
}

impl<B: RelationBackend, C: CheckpointStrategy> RelationBackend for Autodiff<B, C> {
    fn relation_loss(student: FloatTensor<Self>, teacher: FloatTensor<Self>, job: RelationJob) -> FloatTensor<Self> {
        match RelationBackward
            .prepare::<C>([student.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (output, grad) = B::relation_loss_grad(student.into_primitive(), teacher.into_primitive(), job);
                prep.finish(grad, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::relation_loss(
                student.into_primitive(),
                teacher.into_primitive(),
                job,
            )),
        }
    }

    fn relation_loss_grad(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        job: RelationJob,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (output, grad) = B::relation_loss_grad(student.into_primitive(), teacher.into_primitive(), job);
        (FloatTensor::<Self>::new(output), FloatTensor::<Self>::new(grad))
    }

    fn relation_scale_grad(grad: FloatTensor<Self>, upstream: FloatTensor<Self>) -> FloatTensor<Self> {
        let scaled = B::relation_scale_grad(grad.into_primitive(), upstream.into_primitive());
        FloatTensor::<Self>::new(scaled)
    }
}

/// The widths of one call: `rows` examples (or positions), the student's and the teacher's
/// width.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    rows: usize,
    student: usize,
    teacher: usize,
}

impl RelationJob {
    fn run(&self, s: &[f32], t: &[f32], sizes: Sizes, want_grad: bool) -> (f64, Option<Vec<f32>>) {
        match self {
            RelationJob::Sp => sp(s, t, sizes, want_grad),
            RelationJob::Pkt { eps } => pkt(s, t, sizes, *eps, want_grad),
            RelationJob::Cka { debiased } => cka(s, t, sizes, *debiased, want_grad),
            RelationJob::Dist {
                beta,
                gamma,
                temperature,
            } => dist(
                s,
                t,
                sizes.rows,
                sizes.student,
                [*beta, *gamma],
                *temperature,
                want_grad,
            ),
            RelationJob::At { p, positions, weights } => at(s, t, sizes, *p, *positions, weights, want_grad),
            RelationJob::HiddenMse { weights } => hidden_mse(s, t, sizes.student, weights, want_grad),
            RelationJob::HiddenCosine { weights } => hidden_cosine(s, t, sizes.student, weights, want_grad),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Matrix products

/// `a · b` for `a` `[m, k]` and `b` `[k, n]`; `b_transposed`: `b` is stored as `[n, k]` (so the
/// product is `a · bᵀ` of the stored matrix). Split over the rayon pool when large.
fn product(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, b_transposed: bool) -> Vec<f32> {
    let parallel = m.saturating_mul(n).saturating_mul(k) >= GEMM_PARALLEL_THRESHOLD;
    product_on(a, b, [m, k, n], b_transposed, parallel)
}

/// [`product`] on one thread, or split over the rayon pool.
fn product_on(a: &[f32], b: &[f32], [m, k, n]: [usize; 3], b_transposed: bool, parallel: bool) -> Vec<f32> {
    #[cfg(feature = "fast-cpu")]
    {
        super::rows::gemm_product(a, b, [m, k, n], b_transposed, parallel)
    }
    #[cfg(not(feature = "fast-cpu"))]
    {
        let _ = parallel;
        let mut out = vec![0.0f32; m * n];
        super::rows::rows_matmul(a, b, m, k, n, b_transposed, &mut out);
        out
    }
}

/// `X Xᵀ` of `[rows, width]` features.
fn gram(x: &[f32], rows: usize, width: usize) -> Vec<f32> {
    product(x, x, rows, width, rows, true)
}

/// The student's and the teacher's Gram matrices. Below 4 × the parallel threshold each
/// is one task and the two run side by side (at 128 × 512 that is 1.8 × faster than each split
/// over the pool in turn); larger ones are split.
fn gram_pair(s: &[f32], t: &[f32], sizes: Sizes) -> (Vec<f32>, Vec<f32>) {
    let n = sizes.rows;
    let work = n * n * sizes.student.max(sizes.teacher);
    if work >= 4 * GEMM_PARALLEL_THRESHOLD {
        return (gram(s, n, sizes.student), gram(t, n, sizes.teacher));
    }
    rayon::join(
        || product_on(s, s, [n, sizes.student, n], true, false),
        || product_on(t, t, [n, sizes.teacher, n], true, false),
    )
}

/// The gradient w.r.t. `X` of a function of `K = X Xᵀ` whose gradient w.r.t. `K` is `g`
/// (`[rows, rows]`, not necessarily symmetric): `(g + gᵀ) X`.
fn gram_backward(g: &[f32], x: &[f32], rows: usize, width: usize) -> Vec<f32> {
    let symmetric: Vec<f32> = (0..rows * rows)
        .map(|index| g[index] + g[(index % rows) * rows + index / rows])
        .collect();
    product(&symmetric, x, rows, rows, width, false)
}

/// `Σ_i f(i)` for `i < len` in f64, over 8 independent partial sums (no chain of dependent
/// additions, so the loop runs at the adder's throughput rather than its latency).
#[inline(always)]
fn lane_sum(len: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let full = len / 8 * 8;
    for start in (0..full).step_by(8) {
        for (lane, sum) in lanes.iter_mut().enumerate() {
            *sum += f(start + lane);
        }
    }
    lanes.iter().sum::<f64>() + (full..len).map(f).sum::<f64>()
}

multiversion! {
    /// `Σ a_i b_i`, summed in f64.
    fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
        let len = a.len().min(b.len());
        lane_sum(len, |i| a[i] as f64 * b[i] as f64)
    }
}

/// `max(‖v‖, 1e-12)` and whether the floor was hit (then the norm is a constant).
fn floored_norm(squares: f64) -> (f64, bool) {
    if squares > NORM_FLOOR_SQUARED {
        (squares.sqrt(), false)
    } else {
        (NORM_FLOOR_SQUARED.sqrt(), true)
    }
}

// ---------------------------------------------------------------------------------------------
// SP

/// The Gram matrix `g` with each row scaled to unit norm, and each row's norm (and whether
/// floored).
fn normalised_gram(mut g: Vec<f32>, rows: usize) -> (Vec<f32>, Vec<(f64, bool)>) {
    let norms = g
        .chunks_mut(rows.max(1))
        .map(|row| {
            let norm = floored_norm(dot_f64(row, row));
            let inverse = 1.0 / norm.0;
            for value in row.iter_mut() {
                *value = (*value as f64 * inverse) as f32;
            }
            norm
        })
        .collect();
    (g, norms)
}

fn sp(s: &[f32], t: &[f32], sizes: Sizes, want_grad: bool) -> (f64, Option<Vec<f32>>) {
    let n = sizes.rows;
    let (student, teacher) = gram_pair(s, t, sizes);
    let (student, norms) = normalised_gram(student, n);
    let (teacher, _) = normalised_gram(teacher, n);
    let scale = 1.0 / (n * n) as f64;
    let loss = student
        .iter()
        .zip(&teacher)
        .map(|(&a, &b)| (b as f64 - a as f64).powi(2))
        .sum::<f64>()
        * scale;
    if !want_grad {
        return (loss, None);
    }
    // d loss / d N_s = −2 (N_t − N_s) / n²; through the row scaling,
    // d / d G_ij = (P_ij − N_ij Σ_k P_ik N_ik) / ‖G_i‖.
    let mut g = vec![0.0f32; n * n];
    for (i, ((out, ns), nt)) in g
        .chunks_mut(n)
        .zip(student.chunks(n))
        .zip(teacher.chunks(n))
        .enumerate()
    {
        let (norm, floored) = norms[i];
        let factor = (-2.0 * scale) as f32;
        for ((value, &a), &b) in out.iter_mut().zip(ns).zip(nt) {
            *value = factor * (b - a);
        }
        let along = if floored { 0.0 } else { dot_f64(out, ns) };
        axpby(out, (1.0 / norm) as f32, ns, (-along / norm) as f32);
    }
    (loss, Some(gram_backward(&g, s, n, sizes.student)))
}

multiversion! {
    /// `out = factor · p_t / (p_s + eps)`: the gradient of PKT's sum w.r.t. `p_s`, `factor`
    /// the negated scale.
    fn pkt_upstream(out: &mut [f32], ps: &[f32], pt: &[f32], eps: f32, factor: f32) {
        for ((value, &ps), &pt) in out.iter_mut().zip(ps).zip(pt) {
            *value = factor * pt / (ps + eps);
        }
    }
}

multiversion! {
    /// `values *= factor`.
    fn scale_values(values: &mut [f32], factor: f32) {
        for value in values.iter_mut() {
            *value *= factor;
        }
    }
}

multiversion! {
    /// `out = a · out + b · x`.
    fn axpby(out: &mut [f32], a: f32, x: &[f32], b: f32) {
        for (value, &x) in out.iter_mut().zip(x) {
            *value = a * *value + b * x;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PKT

/// Rows scaled by `1 / (max(‖x‖, 1e-12) + eps)`; per row the norm, whether floored, and the
/// divisor.
fn pkt_unit(x: &[f32], rows: usize, width: usize, eps: f32) -> (Vec<f32>, Vec<(f64, bool, f64)>) {
    let mut unit = x.to_vec();
    let norms = unit
        .chunks_mut(width.max(1))
        .take(rows)
        .map(|row| {
            let (norm, floored) = floored_norm(dot_f64(row, row));
            let divisor = norm as f32 + eps;
            scale_values(row, divisor.recip());
            (norm, floored, divisor as f64)
        })
        .collect();
    (unit, norms)
}

/// The conditional probabilities `P_ij = Q_ij / Σ_k Q_ik`, `Q = (U Uᵀ + 1) / 2`, from the Gram
/// matrix `p` of the unit rows, and each row's `Σ_k Q_ik`.
fn pkt_conditional(mut p: Vec<f32>, rows: usize) -> (Vec<f32>, Vec<f64>) {
    let sums = p
        .chunks_mut(rows.max(1))
        .map(|row| {
            for value in row.iter_mut() {
                *value = (*value + 1.0) * 0.5;
            }
            let sum = lanes_f32::<1>(row, row, |q, _| [q])[0];
            scale_values(row, (1.0 / sum) as f32);
            sum
        })
        .collect();
    (p, sums)
}

fn pkt(s: &[f32], t: &[f32], sizes: Sizes, eps: f32, want_grad: bool) -> (f64, Option<Vec<f32>>) {
    let n = sizes.rows;
    let (student_unit, norms) = pkt_unit(s, n, sizes.student, eps);
    let (teacher_unit, _) = pkt_unit(t, n, sizes.teacher, eps);
    let (student, teacher) = gram_pair(&student_unit, &teacher_unit, sizes);
    let (student, sums) = pkt_conditional(student, n);
    let (teacher, _) = pkt_conditional(teacher, n);
    let scale = 1.0 / (n * n) as f64;
    let loss = pkt_sum(&student, &teacher, eps) * scale;
    let eps = eps as f64;
    if !want_grad {
        return (loss, None);
    }
    // d / d P_s = −P_t / (P_s + eps) / n²; through the row normalisation,
    // d / d Q_ij = (g_ij − Σ_k g_ik P_ik) / Σ_k Q_ik; d Q / d sim = ½.
    let mut g = vec![0.0f32; n * n];
    for (i, ((out, ps), pt)) in g
        .chunks_mut(n)
        .zip(student.chunks(n))
        .zip(teacher.chunks(n))
        .enumerate()
    {
        pkt_upstream(out, ps, pt, eps as f32, -scale as f32);
        let along = dot_f64(out, ps);
        let factor = 0.5 / sums[i];
        for value in out.iter_mut() {
            *value = ((*value as f64 - along) * factor) as f32;
        }
    }
    let width = sizes.student;
    let mut grad = gram_backward(&g, &student_unit, n, width);
    // u = x / c with c = ‖x‖ + eps: d x = d u / c − x (d u · x) / (c² ‖x‖).
    for (i, (row, x)) in grad.chunks_mut(width.max(1)).zip(s.chunks(width.max(1))).enumerate() {
        let (norm, floored, divisor) = norms[i];
        let along = if floored {
            0.0
        } else {
            dot_f64(row, x) / (divisor * divisor * norm)
        };
        axpby(row, (1.0 / divisor) as f32, x, -along as f32);
    }
    (loss, Some(grad))
}

multiversion! {
    /// `Σ p_t ln((p_t + ε) / (p_s + ε))` in f32 arithmetic (as the composed path), summed in f64.
    fn pkt_sum(student: &[f32], teacher: &[f32], eps: f32) -> f64 {
        lanes_f32::<1>(student, teacher, |ps, pt| {
            // `fast_ln` reads NaN's bits as a number: keep NaN (a NaN feature) NaN.
            let ratio = (pt + eps) / (ps + eps);
            let ln = fast_ln(ratio);
            [pt * if ratio.is_nan() { ratio } else { ln }]
        })[0]
    }
}

// ---------------------------------------------------------------------------------------------
// CKA

/// Centred columns divided by the root mean square per example (zero for constant features, as
/// [`CkaLoss`](crate::CkaLoss) defines them), and the factor the centred values were multiplied
/// by.
fn centred_unit(x: &[f32], rows: usize, width: usize) -> (Vec<f32>, f64) {
    let means: Vec<f32> = column_totals(x, width)
        .iter()
        .map(|&sum| (sum / rows as f64) as f32)
        .collect();
    let size = (dot_f64(x, x) / rows as f64).sqrt();
    let mut centred = x.to_vec();
    subtract_rows(&mut centred, &means);
    let scale = (dot_f64(&centred, &centred) / rows as f64).sqrt();
    let factor = if scale > size * 1e-6 {
        1.0 / scale.max(1e-30)
    } else {
        0.0
    };
    scale_values(&mut centred, factor as f32);
    (centred, factor)
}

multiversion! {
    /// The sum of each column of `[rows, width]` values, in f64.
    fn column_totals(x: &[f32], width: usize) -> Vec<f64> {
        let mut sums = vec![0.0f64; width];
        for row in x.chunks(width.max(1)) {
            for (sum, &value) in sums.iter_mut().zip(row) {
                *sum += value as f64;
            }
        }
        sums
    }
}

multiversion! {
    /// Subtracts `row` from every row of `[rows, row.len()]` values.
    fn subtract_rows(x: &mut [f32], row: &[f32]) {
        for values in x.chunks_mut(row.len().max(1)) {
            for (value, &subtracted) in values.iter_mut().zip(row) {
                *value -= subtracted;
            }
        }
    }
}

/// What the unbiased and the biased HSIC need of one Gram matrix: the off-diagonal row sums and
/// their total.
struct GramSums {
    rows: Vec<f64>,
    total: f64,
}

fn gram_sums(k: &[f32], n: usize) -> GramSums {
    let rows: Vec<f64> = k
        .chunks(n.max(1))
        .enumerate()
        .map(|(i, row)| row.iter().map(|&v| v as f64).sum::<f64>() - row[i] as f64)
        .collect();
    let total = rows.iter().sum();
    GramSums { rows, total }
}

/// `HSIC(K, L)`: unbiased (diagonals left out) or `tr(K L) / (n − 1)²` of centred features.
fn hsic(k: &[f32], l: &[f32], sums: (&GramSums, &GramSums), n: usize, debiased: bool) -> f64 {
    let nf = n as f64;
    if !debiased {
        return dot_f64(k, l) / ((nf - 1.0) * (nf - 1.0));
    }
    let diagonal: f64 = (0..n).map(|i| k[i * n + i] as f64 * l[i * n + i] as f64).sum();
    let trace = dot_f64(k, l) - diagonal;
    let cross: f64 = sums.0.rows.iter().zip(&sums.1.rows).map(|(a, b)| a * b).sum();
    (trace + sums.0.total * sums.1.total / ((nf - 1.0) * (nf - 2.0)) - 2.0 * cross / (nf - 2.0)) / (nf * (nf - 3.0))
}

/// `∂ HSIC(K, L) / ∂ K_ij = c (L_ij + r_i)` off the diagonal (and on it when biased), for `K`'s
/// entries taken as independent: the factor `c` and each row's `r_i`.
fn hsic_partial_terms(l_sums: &GramSums, n: usize, debiased: bool) -> (f64, Vec<f64>) {
    let nf = n as f64;
    if !debiased {
        return (1.0 / ((nf - 1.0) * (nf - 1.0)), vec![0.0; n]);
    }
    let shift = l_sums.total / ((nf - 1.0) * (nf - 2.0));
    let rows = l_sums.rows.iter().map(|&row| shift - 2.0 * row / (nf - 2.0)).collect();
    (1.0 / (nf * (nf - 3.0)), rows)
}

multiversion! {
    /// One row of `a (L + r_l) + b (K + r_k)`: `out_j = a l_j + b k_j + offset`.
    fn combine_row(out: &mut [f32], l: &[f32], k: &[f32], a: f32, b: f32, offset: f32) {
        for ((value, &l), &k) in out.iter_mut().zip(l).zip(k) {
            *value = a * l + b * k + offset;
        }
    }
}

fn cka(s: &[f32], t: &[f32], sizes: Sizes, debiased: bool, want_grad: bool) -> (f64, Option<Vec<f32>>) {
    let n = sizes.rows;
    let (x, factor) = centred_unit(s, n, sizes.student);
    let (y, _) = centred_unit(t, n, sizes.teacher);
    let (k, l) = gram_pair(&x, &y, sizes);
    let (k_sums, l_sums) = (gram_sums(&k, n), gram_sums(&l, n));
    let cross = hsic(&k, &l, (&k_sums, &l_sums), n, debiased);
    let student = hsic(&k, &k, (&k_sums, &k_sums), n, debiased);
    let teacher = hsic(&l, &l, (&l_sums, &l_sums), n, debiased);
    // As the composed path: the product floored at 1e-30 (f32), so no division by zero.
    let product = student * teacher;
    // (NaN counts as floored: no gradient through the denominator.)
    let floored = product.partial_cmp(&1e-30) != Some(std::cmp::Ordering::Greater);
    let denominator = product.max(1e-30).sqrt();
    let cka = cross / denominator;
    let loss = 1.0 - cka;
    if !want_grad || factor == 0.0 {
        return (loss, want_grad.then(|| vec![0.0; s.len()]));
    }
    // d loss / d K = −(∂ cross / den − cka · HSIC(L, L) / (2 den²) · ∂ HSIC(K, K)).
    // With ∂ cross / ∂ K = c (L + r_l) and ∂ HSIC(K, K) / ∂ K = 2 c (K + r_k):
    // d loss / d K = −c / den (L + r_l) + 2 c w (K + r_k), zero on the diagonal when debiased.
    let self_weight = if floored { 0.0 } else { cka * teacher / (2.0 * product) };
    let (c, l_rows) = hsic_partial_terms(&l_sums, n, debiased);
    let (_, k_rows) = hsic_partial_terms(&k_sums, n, debiased);
    let (a, b) = (-c / denominator, 2.0 * c * self_weight);
    let mut g = vec![0.0f32; n * n];
    for (i, ((out, l), k)) in g.chunks_mut(n).zip(l.chunks(n)).zip(k.chunks(n)).enumerate() {
        let offset = a * l_rows[i] + b * k_rows[i];
        combine_row(out, l, k, a as f32, b as f32, offset as f32);
        if debiased {
            out[i] = 0.0;
        }
    }
    let width = sizes.student;
    let mut grad = gram_backward(&g, &x, n, width);
    // X = (S − mean) · factor: d S = factor · (d X − its column means).
    let means: Vec<f32> = column_totals(&grad, width)
        .iter()
        .map(|&sum| (sum / n as f64) as f32)
        .collect();
    subtract_rows(&mut grad, &means);
    scale_values(&mut grad, factor as f32);
    (loss, Some(grad))
}

// ---------------------------------------------------------------------------------------------
// DIST

/// Added to the product of norms in the Pearson correlation, as in the authors' code.
const PEARSON_EPS: f64 = 1e-8;

multiversion! {
    /// `out = softmax(row · inverse)`; all NaN when the row holds a NaN (the maximum and the
    /// exponential below pass NaN over).
    fn softmax_row(out: &mut [f32], row: &[f32], inverse: f32) {
        let total = lanes_f32::<1>(row, row, |z, _| [z])[0];
        if total.is_nan() {
            out.fill(f32::NAN);
            return;
        }
        let max = lanes_max(row) * inverse;
        for (value, &logit) in out.iter_mut().zip(row) {
            *value = fast_exp(logit * inverse - max);
        }
        let scale = (1.0 / lanes_f32::<1>(out, out, |x, _| [x])[0]) as f32;
        for value in out.iter_mut() {
            *value *= scale;
        }
    }
}

/// The largest value (16 lanes; `-inf` for none).
#[inline(always)]
fn lanes_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = values.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(value);
        }
    }
    rest.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Pearson correlation of `a` and `b` (already centred) from their sums, and the coefficients
/// `(α, β)` of its gradient w.r.t. `a`: `α b + β a`.
fn pearson(ab: f64, aa: f64, bb: f64) -> (f64, f64, f64) {
    let (na, a_floored) = floored_norm(aa);
    let (nb, _) = floored_norm(bb);
    let denominator = na * nb + PEARSON_EPS;
    let rho = ab / denominator;
    let alpha = 1.0 / denominator;
    let beta = if a_floored {
        0.0
    } else {
        -ab * nb / (denominator * denominator * na)
    };
    (rho, alpha, beta)
}

/// One side's Pearson terms: the correlation, the gradient's `(α, β)` and both means.
#[derive(Debug, Clone, Copy, Default)]
struct PearsonTerms {
    rho: f64,
    alpha: f64,
    beta: f64,
    mean_a: f64,
    mean_b: f64,
}

multiversion! {
    /// The Pearson terms of row `a` against row `b`.
    fn row_pearson(a: &[f32], b: &[f32]) -> PearsonTerms {
        let classes = a.len().max(1) as f64;
        let [sum_a, sum_b] = lanes_f32::<2>(a, b, |x, y| [x, y]);
        let (mean_a, mean_b) = (sum_a / classes, sum_b / classes);
        let (ma, mb) = (mean_a as f32, mean_b as f32);
        let [ab, aa, bb] = lanes_f32::<3>(a, b, |x, y| {
            let (x, y) = (x - ma, y - mb);
            [x * y, x * x, y * y]
        });
        let (rho, alpha, beta) = pearson(ab, aa, bb);
        PearsonTerms { rho, alpha, beta, mean_a, mean_b }
    }
}

multiversion! {
    /// Adds each column of `a` and `b` (`[rows, classes]`) to `sums_a`, `sums_b`; with
    /// `means`, the centred products and squares to `sums_a` (`a b`), `sums_b` (`a²`) and
    /// `sums_c` (`b²`) instead.
    fn column_sums(
        a: &[f32],
        b: &[f32],
        means: Option<(&[f64], &[f64])>,
        sums_a: &mut [f64],
        sums_b: &mut [f64],
        sums_c: &mut [f64],
    ) {
        let classes = sums_a.len().max(1);
        for (x, y) in a.chunks(classes).zip(b.chunks(classes)) {
            match means {
                None => {
                    for ((sa, sb), (&x, &y)) in sums_a.iter_mut().zip(sums_b.iter_mut()).zip(x.iter().zip(y)) {
                        *sa += x as f64;
                        *sb += y as f64;
                    }
                }
                Some((mean_a, mean_b)) => {
                    for (j, (&x, &y)) in x.iter().zip(y).enumerate() {
                        let (x, y) = (x as f64 - mean_a[j], y as f64 - mean_b[j]);
                        sums_a[j] += x * y;
                        sums_b[j] += x * x;
                        sums_c[j] += y * y;
                    }
                }
            }
        }
    }
}

/// The per-class (column) terms of the gradient, weights folded in, as f32 arrays for the
/// vectorised row pass.
struct ColumnTerms {
    alpha: Vec<f32>,
    beta: Vec<f32>,
    mean_a: Vec<f32>,
    mean_b: Vec<f32>,
}

multiversion! {
    /// One row's gradient w.r.t. its logits: `g = −(row terms) − (column terms)` w.r.t. the
    /// probabilities `a`, then through the softmax `a (g − Σ a g) / τ`.
    fn dist_grad_row(out: &mut [f32], a: &[f32], b: &[f32], row: [f32; 4], columns: &ColumnTerms, inverse: f32) {
        let [alpha, beta, mean_a, mean_b] = row;
        let terms = columns
            .alpha
            .iter()
            .zip(&columns.beta)
            .zip(columns.mean_a.iter().zip(&columns.mean_b));
        for (((value, &x), &y), ((&col_alpha, &col_beta), (&col_mean_a, &col_mean_b))) in
            out.iter_mut().zip(a).zip(b).zip(terms)
        {
            *value = -(alpha * (y - mean_b) + beta * (x - mean_a))
                - (col_alpha * (y - col_mean_b) + col_beta * (x - col_mean_a));
        }
        let along = lanes_f32::<1>(a, out, |x, g| [x * g])[0] as f32;
        for (value, &x) in out.iter_mut().zip(a) {
            *value = x * (*value - along) * inverse;
        }
    }
}

fn dist(
    s: &[f32],
    t: &[f32],
    rows: usize,
    classes: usize,
    [beta_weight, gamma_weight]: [f64; 2],
    temperature: f64,
    want_grad: bool,
) -> (f64, Option<Vec<f32>>) {
    let width = classes.max(1);
    let inverse = (1.0 / temperature) as f32;
    let softmax = |z: &[f32]| {
        let mut y = vec![0.0f32; z.len()];
        y.par_chunks_mut(width)
            .zip(z.par_chunks(width))
            .for_each(|(out, row)| softmax_row(out, row, inverse));
        y
    };
    let (ys, yt) = rayon::join(|| softmax(s), || softmax(t));
    let scale = temperature * temperature;
    // Inter-class: each row against its mean over the classes.
    let inter: Vec<PearsonTerms> = ys
        .par_chunks(width)
        .zip(yt.par_chunks(width))
        .map(|(a, b)| row_pearson(a, b))
        .collect();
    // Intra-class: each column against its mean over the rows.
    let (mut mean_a, mut mean_b, mut unused) = (vec![0.0f64; classes], vec![0.0f64; classes], vec![0.0f64; classes]);
    column_sums(&ys, &yt, None, &mut mean_a, &mut mean_b, &mut unused);
    for mean in mean_a.iter_mut().chain(mean_b.iter_mut()) {
        *mean /= rows as f64;
    }
    let (mut ab, mut aa, mut bb) = (vec![0.0f64; classes], vec![0.0f64; classes], vec![0.0f64; classes]);
    column_sums(&ys, &yt, Some((&mean_a, &mean_b)), &mut ab, &mut aa, &mut bb);
    let intra: Vec<(f64, f64, f64)> = (0..classes).map(|j| pearson(ab[j], aa[j], bb[j])).collect();
    let inter_mean = inter.iter().map(|terms| terms.rho).sum::<f64>() / rows as f64;
    let intra_mean = intra.iter().map(|terms| terms.0).sum::<f64>() / classes as f64;
    let loss = scale * (beta_weight * (1.0 - inter_mean) + gamma_weight * (1.0 - intra_mean));
    if !want_grad {
        return (loss, None);
    }
    // d loss / d y_s = −τ² (β/n (α_i b + β_i a)_row + γ/c (α_j b + β_j a)_column); the centring
    // of a and b passes it through unchanged (it already sums to zero). Then through the
    // softmax: d z = y (g − Σ y g) / τ.
    let row_weight = scale * beta_weight / rows as f64;
    let column_weight = scale * gamma_weight / classes as f64;
    let columns = ColumnTerms {
        alpha: intra.iter().map(|terms| (terms.1 * column_weight) as f32).collect(),
        beta: intra.iter().map(|terms| (terms.2 * column_weight) as f32).collect(),
        mean_a: mean_a.iter().map(|&mean| mean as f32).collect(),
        mean_b: mean_b.iter().map(|&mean| mean as f32).collect(),
    };
    let mut grad = vec![0.0f32; s.len()];
    grad.par_chunks_mut(width)
        .zip(ys.par_chunks(width).zip(yt.par_chunks(width)))
        .zip(inter.par_iter())
        .for_each(|((out, (a, b)), terms)| {
            let row = [
                (terms.alpha * row_weight) as f32,
                (terms.beta * row_weight) as f32,
                terms.mean_a as f32,
                terms.mean_b as f32,
            ];
            dist_grad_row(out, a, b, row, &columns, inverse);
        });
    (loss, Some(grad))
}

// ---------------------------------------------------------------------------------------------
// AT

/// An example's attention map: `mean_c |x_ck|^p` over its `[channels, positions]` values,
/// scaled to unit norm; and the norm (whether floored).
#[inline(always)]
fn attention_map(x: &[f32], positions: usize, p: f64) -> (Vec<f32>, (f64, bool)) {
    let channels = x.len() / positions.max(1);
    let mut map = vec![0.0f64; positions];
    for channel in x.chunks(positions.max(1)) {
        for (sum, &value) in map.iter_mut().zip(channel) {
            *sum += if p == 2.0 {
                (value * value) as f64
            } else {
                (value.abs() as f64).powf(p)
            };
        }
    }
    let squares: f64 = map
        .iter()
        .map(|&sum| {
            let mean = sum / channels as f64;
            mean * mean
        })
        .sum();
    let norm = floored_norm(squares);
    let map = map.iter().map(|&sum| (sum / channels as f64 / norm.0) as f32).collect();
    (map, norm)
}

#[allow(clippy::too_many_arguments)]
fn at(
    s: &[f32],
    t: &[f32],
    sizes: Sizes,
    p: f64,
    positions: usize,
    weights: &[f32],
    want_grad: bool,
) -> (f64, Option<Vec<f32>>) {
    let (student_width, teacher_width) = (sizes.student.max(1), sizes.teacher.max(1));
    let channels = (sizes.student / positions.max(1)).max(1) as f64;
    let mut grad = if want_grad { vec![0.0f32; s.len()] } else { Vec::new() };
    let losses: Vec<f64> = if want_grad {
        grad.par_chunks_mut(student_width)
            .zip(s.par_chunks(student_width).zip(t.par_chunks(teacher_width)))
            .zip(weights.par_iter())
            .map(|((out, (x, y)), &weight)| at_example(x, y, positions, p, channels, weight as f64, Some(out)))
            .collect()
    } else {
        s.par_chunks(student_width)
            .zip(t.par_chunks(teacher_width))
            .zip(weights.par_iter())
            .map(|((x, y), &weight)| at_example(x, y, positions, p, channels, weight as f64, None))
            .collect()
    };
    (losses.iter().sum(), want_grad.then_some(grad))
}

multiversion! {
/// One example's weighted AT loss, its gradient written to `grad`.
fn at_example(
    x: &[f32],
    y: &[f32],
    positions: usize,
    p: f64,
    channels: f64,
    weight: f64,
    grad: Option<&mut [f32]>,
) -> f64 {
    if weight == 0.0 {
        return 0.0;
    }
    let (student, (norm, floored)) = attention_map(x, positions, p);
    let (teacher, _) = attention_map(y, positions, p);
    let loss = student
        .iter()
        .zip(&teacher)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum::<f64>()
        / positions as f64;
    let Some(grad) = grad else {
        return weight * loss;
    };
    // d / d q = 2 w (q_s − q_t) / positions; through the unit scaling,
    // d / d a = (d q − q (d q · q)) / ‖a‖; d a_k / d x_ck = p |x|^(p−1) sign(x) / channels.
    let upstream: Vec<f64> = student
        .iter()
        .zip(&teacher)
        .map(|(&a, &b)| 2.0 * weight * (a as f64 - b as f64) / positions as f64)
        .collect();
    let along: f64 = if floored {
        0.0
    } else {
        upstream.iter().zip(&student).map(|(&g, &q)| g * q as f64).sum()
    };
    let d_map: Vec<f64> = upstream
        .iter()
        .zip(&student)
        .map(|(&g, &q)| (g - along * q as f64) / norm / channels)
        .collect();
    for (out, channel) in grad.chunks_mut(positions.max(1)).zip(x.chunks(positions.max(1))) {
        for ((value, &x), &d) in out.iter_mut().zip(channel).zip(&d_map) {
            let x = x as f64;
            let slope = if p == 2.0 {
                2.0 * x
            } else if x == 0.0 {
                0.0
            } else {
                p * x.abs().powf(p - 1.0) * x.signum()
            };
            *value = (d * slope) as f32;
        }
    }
    weight * loss
}
}

// ---------------------------------------------------------------------------------------------
// Hidden states

/// `Σ_k f(x_k, y_k)` for `N` sums at once, in f32 over 16 independent lanes each (vectorised;
/// a position's 576–2 048 values), returned in f64.
#[inline(always)]
fn lanes_f32<const N: usize>(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> [f32; N]) -> [f64; N] {
    let mut lanes = [[0.0f32; 16]; N];
    let (xs, ys) = (x.chunks_exact(16), y.chunks_exact(16));
    let (x_rest, y_rest) = (xs.remainder(), ys.remainder());
    for (a, b) in xs.zip(ys) {
        for lane in 0..16 {
            let values = f(a[lane], b[lane]);
            for (sums, value) in lanes.iter_mut().zip(values) {
                sums[lane] += value;
            }
        }
    }
    let mut totals = [0.0f64; N];
    for (total, sums) in totals.iter_mut().zip(&lanes) {
        *total = sums.iter().map(|&v| v as f64).sum();
    }
    for (&a, &b) in x_rest.iter().zip(y_rest) {
        for (total, value) in totals.iter_mut().zip(f(a, b)) {
            *total += value as f64;
        }
    }
    totals
}

/// Rows per parallel task of the hidden-state kernels.
const HIDDEN_ROWS: usize = 16;

/// One block of rows of a hidden-state kernel: `(student, teacher, row weights, width, grad)`
/// to the block's weighted loss.
type HiddenBlock = fn(&[f32], &[f32], &[f32], usize, Option<&mut [f32]>) -> f64;

/// Runs `block` over [`HIDDEN_ROWS`] rows at a time in parallel and sums what it returns.
fn hidden_rows(
    s: &[f32],
    t: &[f32],
    width: usize,
    weights: &[f32],
    want_grad: bool,
    block: HiddenBlock,
) -> (f64, Option<Vec<f32>>) {
    let width = width.max(1);
    let size = HIDDEN_ROWS * width;
    let weights_of = |index: usize| {
        let start = (index * HIDDEN_ROWS).min(weights.len());
        &weights[start..(start + HIDDEN_ROWS).min(weights.len())]
    };
    if !want_grad {
        let loss = s
            .par_chunks(size)
            .zip(t.par_chunks(size))
            .enumerate()
            .map(|(index, (x, y))| block(x, y, weights_of(index), width, None))
            .sum();
        return (loss, None);
    }
    let mut grad = vec![0.0f32; s.len()];
    let loss = grad
        .par_chunks_mut(size)
        .zip(s.par_chunks(size).zip(t.par_chunks(size)))
        .enumerate()
        .map(|(index, (out, (x, y)))| block(x, y, weights_of(index), width, Some(out)))
        .sum();
    (loss, Some(grad))
}

fn hidden_mse(s: &[f32], t: &[f32], width: usize, weights: &[f32], want_grad: bool) -> (f64, Option<Vec<f32>>) {
    hidden_rows(s, t, width, weights, want_grad, mse_block)
}

multiversion! {
    /// `Σ_i w_i mean_k (x_ik − y_ik)²` over a block of rows; `grad = 2 w_i (x − y) / width`
    /// (rows of weight 0 add nothing and keep a zero gradient).
    fn mse_block(x: &[f32], y: &[f32], weights: &[f32], width: usize, grad: Option<&mut [f32]>) -> f64 {
        let mut grad = grad;
        let inverse = 1.0 / width as f64;
        let mut total = 0.0;
        for (row, &weight) in weights.iter().enumerate() {
            if weight == 0.0 {
                continue;
            }
            let span = row * width..(row + 1) * width;
            let (a, b) = (&x[span.clone()], &y[span.clone()]);
            if let Some(grad) = grad.as_deref_mut() {
                let scale = (2.0 * weight as f64 * inverse) as f32;
                for ((value, &a), &b) in grad[span].iter_mut().zip(a).zip(b) {
                    *value = scale * (a - b);
                }
            }
            let squares = lanes_f32::<1>(a, b, |a, b| [(a - b) * (a - b)])[0];
            total += weight as f64 * squares * inverse;
        }
        total
    }
}

/// `max(‖v‖, ε)` of the hidden cosine, compared as squares.
const COSINE_EPS_SQUARED: f64 = 1e-16;

fn hidden_cosine(s: &[f32], t: &[f32], width: usize, weights: &[f32], want_grad: bool) -> (f64, Option<Vec<f32>>) {
    hidden_rows(s, t, width, weights, want_grad, cosine_block)
}

multiversion! {
    /// `Σ_i w_i (1 − cos(x_i, y_i))` over a block of rows, norms floored at `1e-8`; its
    /// gradient `−w_i (y / (‖x‖ ‖y‖) − cos · x / ‖x‖²)`, the second term only above the floor.
    fn cosine_block(x: &[f32], y: &[f32], weights: &[f32], width: usize, grad: Option<&mut [f32]>) -> f64 {
        let mut grad = grad;
        let mut total = 0.0;
        for (row, &weight) in weights.iter().enumerate() {
            if weight == 0.0 {
                continue;
            }
            let span = row * width..(row + 1) * width;
            let (a, b) = (&x[span.clone()], &y[span.clone()]);
            let [ab, aa, bb] = lanes_f32::<3>(a, b, |a, b| [a * b, a * a, b * b]);
            let weight = weight as f64;
            let na = aa.max(COSINE_EPS_SQUARED).sqrt();
            let nb = bb.max(COSINE_EPS_SQUARED).sqrt();
            let cosine = ab / (na * nb);
            if let Some(grad) = grad.as_deref_mut() {
                let along = (if aa > COSINE_EPS_SQUARED { cosine / aa } else { 0.0 } * weight) as f32;
                let across = (weight / (na * nb)) as f32;
                for ((value, &a), &b) in grad[span].iter_mut().zip(a).zip(b) {
                    *value = along * a - across * b;
                }
            }
            total += weight * (1.0 - cosine);
        }
        total
    }
}

// ---------------------------------------------------------------------------------------------
// CRD: scores against memory-bank rows, gathered and multiplied in one pass

/// `out[i, k] = ⟨bank[indices[i · per_row + k]], embedding[i]⟩`, `[rows, per_row]`,
/// differentiable w.r.t. `embedding` only (the bank is a gradient-free memory). The gathered
/// `[rows · per_row, width]` rows are never materialised: at CRD's 128 × 4 097 that is 268 MB
/// per bank, written, read by the product and held for its backward pass by the composed form.
/// Both tensors f32 on one host device ([`use_host_relation`]); every index in `0..bank rows`.
pub(crate) fn gathered_dot(bank: Tensor<2>, embedding: Tensor<2>, indices: Arc<Vec<i64>>, per_row: usize) -> Tensor<2> {
    debug_assert!(bank.dtype() == DType::F32 && embedding.dtype() == DType::F32);
    let output =
        <Dispatch as GatherBackend>::gathered_dot(bank.into_dispatch(), embedding.into_dispatch(), indices, per_row);
    Tensor::from_dispatch(output)
}

/// [`gathered_dot`] as backend operations (host kernels on ndarray and flex).
#[backend_extension(Autodiff, NdArray: cfg(feature = "ndarray"), Flex: cfg(feature = "flex"))]
pub(crate) trait GatherBackend: Backend {
    /// `[rows, per_row]` scores.
    fn gathered_dot(
        bank: FloatTensor<Self>,
        embedding: FloatTensor<Self>,
        indices: Arc<Vec<i64>>,
        per_row: usize,
    ) -> FloatTensor<Self>;

    /// The gradient w.r.t. the embedding, `[rows, width]`: `Σ_k upstream[i, k] bank[idx_ik]`.
    fn gathered_dot_backward(
        bank: FloatTensor<Self>,
        indices: Arc<Vec<i64>>,
        per_row: usize,
        upstream: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

#[cfg(any(feature = "ndarray", feature = "flex"))]
fn host_gathered_dot<B: HostTensor>(
    bank: &FloatTensor<B>,
    embedding: &FloatTensor<B>,
    indices: &[i64],
    per_row: usize,
) -> FloatTensor<B> {
    let (rows, width) = (embedding.shape()[0], embedding.shape()[1]);
    let mut out = vec![0.0f32; rows * per_row];
    B::with_values(bank, |bank| {
        B::with_values(embedding, |embedding| {
            out.par_chunks_mut(per_row.max(1))
                .zip(embedding.par_chunks(width.max(1)))
                .zip(indices.par_chunks(per_row.max(1)))
                .for_each(|((out, v), indices)| gather_dots(out, bank, indices, v, width));
        })
    });
    B::from_values(out, vec![rows, per_row])
}

#[cfg(any(feature = "ndarray", feature = "flex"))]
fn host_gathered_dot_backward<B: HostTensor>(
    bank: &FloatTensor<B>,
    indices: &[i64],
    per_row: usize,
    upstream: &FloatTensor<B>,
) -> FloatTensor<B> {
    let rows = upstream.shape()[0];
    let width = bank.shape()[1];
    let mut grad = vec![0.0f32; rows * width];
    B::with_values(bank, |bank| {
        B::with_values(upstream, |upstream| {
            grad.par_chunks_mut(width.max(1))
                .zip(upstream.par_chunks(per_row.max(1)))
                .zip(indices.par_chunks(per_row.max(1)))
                .for_each(|((out, g), indices)| gather_axpy(out, bank, indices, g, width));
        })
    });
    B::from_values(grad, vec![rows, width])
}

/// Bank row `index` (`width` values); panics with the index when it is outside the bank.
#[inline(always)]
fn bank_row(bank: &[f32], index: i64, width: usize) -> &[f32] {
    let start = usize::try_from(index).ok().and_then(|row| row.checked_mul(width));
    match start.and_then(|start| bank.get(start..start + width)) {
        Some(row) => row,
        None => panic!(
            "CRD: bank index {index} is outside the bank's {} rows",
            bank.len() / width.max(1)
        ),
    }
}

multiversion! {
    /// `out_k = ⟨bank[indices_k], v⟩`.
    fn gather_dots(out: &mut [f32], bank: &[f32], indices: &[i64], v: &[f32], width: usize) {
        for (value, &index) in out.iter_mut().zip(indices) {
            *value = lanes_f32::<1>(bank_row(bank, index, width), v, |a, b| [a * b])[0] as f32;
        }
    }
}

multiversion! {
    /// `out = Σ_k g_k bank[indices_k]`.
    fn gather_axpy(out: &mut [f32], bank: &[f32], indices: &[i64], g: &[f32], width: usize) {
        for (&index, &g) in indices.iter().zip(g) {
            for (value, &b) in out.iter_mut().zip(bank_row(bank, index, width)) {
                *value += g * b;
            }
        }
    }
}

macro_rules! host_gather_impl {
    ($backend:ty, $feature:literal) => {
        #[cfg(feature = $feature)]
        impl GatherBackend for $backend {
            fn gathered_dot(
                bank: FloatTensor<Self>,
                embedding: FloatTensor<Self>,
                indices: Arc<Vec<i64>>,
                per_row: usize,
            ) -> FloatTensor<Self> {
                host_gathered_dot::<Self>(&bank, &embedding, &indices, per_row)
            }

            fn gathered_dot_backward(
                bank: FloatTensor<Self>,
                indices: Arc<Vec<i64>>,
                per_row: usize,
                upstream: FloatTensor<Self>,
            ) -> FloatTensor<Self> {
                host_gathered_dot_backward::<Self>(&bank, &indices, per_row, &upstream)
            }
        }
    };
}

host_gather_impl!(burn::backend::NdArray, "ndarray");
host_gather_impl!(burn::backend::Flex, "flex");

/// Saved by the forward pass: the bank and the indices.
#[derive(Debug)]
struct GatherBackward {
    per_row: usize,
}

impl<B: GatherBackend> Backward<B, 1> for GatherBackward {
    type State = (FloatTensor<B>, Arc<Vec<i64>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let Some(parent) = parent else { return };
        let (bank, indices) = ops.state;
        grads.register::<B>(
            parent.id,
            B::gathered_dot_backward(bank, indices, self.per_row, upstream),
        );
    }
}

impl<B: GatherBackend, C: CheckpointStrategy> GatherBackend for Autodiff<B, C> {
    fn gathered_dot(
        bank: FloatTensor<Self>,
        embedding: FloatTensor<Self>,
        indices: Arc<Vec<i64>>,
        per_row: usize,
    ) -> FloatTensor<Self> {
        let step = GatherBackward { per_row };
        match step.prepare::<C>([embedding.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let bank = bank.into_primitive();
                let output = B::gathered_dot(bank.clone(), embedding.into_primitive(), indices.clone(), per_row);
                prep.finish((bank, indices), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gathered_dot(
                bank.into_primitive(),
                embedding.into_primitive(),
                indices,
                per_row,
            )),
        }
    }

    fn gathered_dot_backward(
        bank: FloatTensor<Self>,
        indices: Arc<Vec<i64>>,
        per_row: usize,
        upstream: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let grad = B::gathered_dot_backward(bank.into_primitive(), indices, per_row, upstream.into_primitive());
        FloatTensor::<Self>::new(grad)
    }
}
