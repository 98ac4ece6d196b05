//! The fused loss as a burn backend extension with its own backward.
//!
//! The forward pass computes the loss and the gradient w.r.t. the student logits together;
//! the backward pass only scales that gradient by the upstream one (and returns it untouched
//! when the upstream gradient is exactly 1, the usual `loss.backward()`).

// burn 0.22 deprecates ndarray in favour of flex; our users still ask for it, and the
// extension macro names its backend in generated code.
#![allow(deprecated)]

use std::sync::Arc;
use std::sync::atomic::AtomicU8;

use burn::backend::TensorMetadata;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};
use burn::tensor::{FloatDType, Shape, Slice, TensorData};

use super::kernel::{GradRows, HostGrad, HostLogits, RowsOut, StudentRows, fused_rows};
use crate::spec::RowSpec;

/// One call of the fused loss: what to compute, on which rows, reduced how.
#[derive(Debug, Clone)]
pub(crate) struct FusedJob {
    pub spec: RowSpec,
    /// One label per row (`0..classes`) when the loss has a hard term.
    pub labels: Option<Arc<Vec<i64>>>,
    /// A weight per row (mask and reduction folded in); `None` is 1 everywhere. A row of
    /// weight 0 has loss 0 and gradient 0.
    pub weights: Option<Arc<Vec<f32>>>,
    /// `true`: the output is `[1]`, `Σ_i w_i loss_i`. `false`: the output is `[positions]`,
    /// `w_i loss_i` per row.
    pub reduced: bool,
    /// Where the host kernel reports what made rows bad ([`bad`](super::kernel::bad) bits):
    /// the inputs need not be kept to name the problem. The CubeCL kernel leaves it at 0.
    pub report: Option<Arc<AtomicU8>>,
}

/// Backends whose float tensors the host kernel can read in place.
#[cfg(any(feature = "ndarray", feature = "flex"))]
pub(crate) trait HostTensor: Backend {
    /// Calls `f` with the tensor's values in row-major order (copied only when the tensor is
    /// not a contiguous f32 buffer).
    fn with_values<R>(tensor: &FloatTensor<Self>, f: impl FnOnce(&[f32]) -> R) -> R;
    /// A tensor of `shape` holding `values`, without copying them.
    fn from_values(values: Vec<f32>, shape: Vec<usize>) -> FloatTensor<Self>;
    /// Calls `f` with the tensor's logits in their own precision (f32, f16 or bf16), in
    /// row-major order (copied only when the tensor is not contiguous).
    fn with_logits<R>(tensor: &FloatTensor<Self>, f: impl FnOnce(HostLogits<'_>) -> R) -> R {
        Self::with_values(tensor, |values| f(HostLogits::F32(values)))
    }
    /// A tensor of `shape` holding a gradient in its own precision.
    fn from_grad(grad: HostGrad, shape: Vec<usize>) -> FloatTensor<Self> {
        match grad {
            HostGrad::F32(values) => Self::from_values(values, shape),
            HostGrad::F16(values) => Self::from_data_host(TensorData::new(values, shape)),
            HostGrad::Bf16(values) => Self::from_data_host(TensorData::new(values, shape)),
        }
    }
    /// A tensor holding `data` in its own dtype.
    fn from_data_host(data: TensorData) -> FloatTensor<Self>;
    /// Calls `f` with the tensor's logits as a mutable buffer when nothing else holds them and
    /// they are one contiguous block; `None` (and `f` not called) otherwise.
    fn with_logits_mut<R>(tensor: &mut FloatTensor<Self>, f: impl FnOnce(GradRows<'_>) -> R) -> Option<R> {
        let _ = (tensor, f);
        None
    }
}

#[cfg(feature = "ndarray")]
#[allow(deprecated)]
impl HostTensor for burn::backend::NdArray {
    fn with_values<R>(tensor: &FloatTensor<Self>, f: impl FnOnce(&[f32]) -> R) -> R {
        use burn::backend::ndarray::NdArrayTensor;
        if let NdArrayTensor::F32(storage) = tensor {
            let view = storage.view();
            if let Some(values) = view.as_slice() {
                return f(values);
            }
            let values: Vec<f32> = view.iter().copied().collect();
            return f(&values);
        }
        panic!("the fused losses take f32 tensors, got {:?}", tensor.dtype())
    }

    fn from_values(values: Vec<f32>, shape: Vec<usize>) -> FloatTensor<Self> {
        burn::backend::ndarray::NdArrayTensor::from_data(burn::tensor::TensorData::new(values, shape))
    }

    fn from_data_host(data: TensorData) -> FloatTensor<Self> {
        burn::backend::ndarray::NdArrayTensor::from_data(data)
    }
}

#[cfg(feature = "flex")]
impl HostTensor for burn::backend::Flex {
    fn with_values<R>(tensor: &FloatTensor<Self>, f: impl FnOnce(&[f32]) -> R) -> R {
        if let Some(values) = tensor.as_slice::<f32>() {
            return f(values);
        }
        let contiguous = tensor.to_contiguous();
        match contiguous.as_slice::<f32>() {
            Some(values) => f(values),
            None => panic!("the fused losses take f32 tensors, got {:?}", tensor.dtype()),
        }
    }

    fn from_values(values: Vec<f32>, shape: Vec<usize>) -> FloatTensor<Self> {
        burn::backend::flex::FlexTensor::from_data(burn::tensor::TensorData::new(values, shape))
    }

    fn from_data_host(data: TensorData) -> FloatTensor<Self> {
        burn::backend::flex::FlexTensor::from_data(data)
    }

    fn with_logits_mut<R>(tensor: &mut FloatTensor<Self>, f: impl FnOnce(GradRows<'_>) -> R) -> Option<R> {
        use burn::tensor::{DType, bf16, f16};
        let elements = tensor.layout().num_elements();
        if !tensor.is_unique() || tensor.layout().contiguous_offsets() != Some((0, elements)) {
            return None;
        }
        match tensor.dtype() {
            DType::F32 => tensor
                .try_storage_mut::<f32>()
                .map(|values| f(GradRows::F32(&mut values[..elements]))),
            DType::F16 => tensor
                .try_storage_mut::<f16>()
                .map(|values| f(GradRows::F16(&mut values[..elements]))),
            DType::BF16 => tensor
                .try_storage_mut::<bf16>()
                .map(|values| f(GradRows::Bf16(&mut values[..elements]))),
            _ => None,
        }
    }

    fn with_logits<R>(tensor: &FloatTensor<Self>, f: impl FnOnce(HostLogits<'_>) -> R) -> R {
        use burn::tensor::{DType, bf16, f16};
        fn typed<'a>(tensor: &'a burn::backend::flex::FlexTensor) -> Option<HostLogits<'a>> {
            match tensor.dtype() {
                DType::F32 => tensor.as_slice::<f32>().map(HostLogits::F32),
                DType::F16 => tensor.as_slice::<f16>().map(HostLogits::F16),
                DType::BF16 => tensor.as_slice::<bf16>().map(HostLogits::Bf16),
                _ => None,
            }
        }
        if let Some(logits) = typed(tensor) {
            return f(logits);
        }
        let contiguous = tensor.to_contiguous();
        match typed(&contiguous) {
            Some(logits) => f(logits),
            None => panic!(
                "the fused losses take f32, f16 or bf16 tensors, got {:?}",
                tensor.dtype()
            ),
        }
    }
}

/// One call of the chunked linear-head loss.
#[derive(Debug, Clone)]
pub(crate) struct HeadJob {
    pub spec: RowSpec,
    /// Rows per chunk: the student logits exist `chunk_rows × classes` at a time.
    pub chunk_rows: usize,
    pub labels: Option<Arc<Vec<i64>>>,
    /// A weight per row (mask and reduction folded in); the output is `Σ_i w_i loss_i`.
    pub weights: Arc<Vec<f32>>,
}

/// A top-k teacher of the chunked head, on the host: each chunk's dense teacher rows are
/// written from it just before that chunk runs, so no `[positions, classes]` tensor exists.
#[derive(Debug)]
pub(crate) struct SparseTeacher {
    /// Classes given per position.
    pub k: usize,
    /// `[positions · k]` class ids, each in `0..classes`.
    pub indices: Vec<i64>,
    /// `[positions · k]` log-probabilities.
    pub log_probs: Vec<f32>,
    /// Per position, the log-probability of every class outside its top k (`-inf`: none; the
    /// kernel's softmax then renormalises the top k).
    pub tails: Vec<f32>,
}

impl SparseTeacher {
    /// The dense log-probability rows `start..end`, `[rows, classes]`.
    fn rows<B: Backend>(&self, start: usize, end: usize, classes: usize, device: &B::Device) -> FloatTensor<B> {
        let k = self.k;
        let mut dense = Vec::with_capacity((end - start) * classes);
        for row in start..end {
            let offset = dense.len();
            dense.resize(offset + classes, self.tails[row]);
            let span = row * k..(row + 1) * k;
            for (&class, &log_prob) in self.indices[span.clone()].iter().zip(&self.log_probs[span]) {
                dense[offset + class as usize] = log_prob;
            }
        }
        B::float_from_data(TensorData::new(dense, [end - start, classes]), device)
    }
}

/// The fused losses as backend operations: the host kernel on ndarray and flex, the CubeCL
/// kernel on the GPU devices (burn's fusion backend wraps it there).
#[backend_extension(
    Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Flex: cfg(feature = "flex"),
    Cube: cfg(any(feature = "wgpu", feature = "cuda")),
    Fusion: cfg(any(feature = "wgpu", feature = "cuda"))
)]
pub(crate) trait FusedLossBackend: Backend {
    /// `student`, `teacher`: `[positions, classes]` logits. Output: `[1]` or `[positions]`
    /// (see [`FusedJob::reduced`]).
    #[fusion(meta = fusion_meta::loss)]
    fn fused_loss(student: FloatTensor<Self>, teacher: FloatTensor<Self>, job: FusedJob) -> FloatTensor<Self>;

    /// [`fused_loss`](Self::fused_loss) and the gradient of its (weighted) output w.r.t. the
    /// student logits, from the same sweep. Not differentiable itself.
    #[fusion(meta = fusion_meta::loss_and_grad)]
    fn fused_loss_grad(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        job: FusedJob,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradient saved by [`fused_loss_grad`](Self::fused_loss_grad) times the upstream
    /// gradient (`[1]`, or `[positions]` when `per_row`).
    #[fusion(default)]
    fn fused_scale_grad(grad: FloatTensor<Self>, upstream: FloatTensor<Self>, per_row: bool) -> FloatTensor<Self> {
        let shape = if per_row {
            Shape::new([upstream.shape()[0], 1])
        } else {
            Shape::new([1, 1])
        };
        let upstream = same_dtype::<Self>(upstream, &grad);
        Self::float_mul(grad, Self::float_reshape(upstream, shape))
    }

    /// The loss of the student logits `hidden · weightᵀ` against `teacher_hidden ·
    /// teacher_weightᵀ`, chunk by chunk. `hidden`: `[positions, width]`, `weight`:
    /// `[classes, width]`; the teacher likewise, with its own width. Output: `[1]`.
    #[fusion(default)]
    fn fused_head_loss(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        teacher_hidden: FloatTensor<Self>,
        teacher_weight: FloatTensor<Self>,
        job: HeadJob,
    ) -> FloatTensor<Self> {
        let teacher = TeacherRows::Head {
            hidden: &teacher_hidden,
            weight: &teacher_weight,
        };
        run_head::<Self>(&hidden, &weight, teacher, &job, false).0
    }

    /// As [`fused_head_loss`](Self::fused_head_loss), with the teacher's logits given
    /// (`[positions, classes]`).
    #[fusion(default)]
    fn fused_head_loss_logits(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        teacher_logits: FloatTensor<Self>,
        job: HeadJob,
    ) -> FloatTensor<Self> {
        run_head::<Self>(&hidden, &weight, TeacherRows::Logits(&teacher_logits), &job, false).0
    }

    /// As [`fused_head_loss`](Self::fused_head_loss), with a top-k teacher whose dense rows are
    /// written chunk by chunk.
    #[fusion(default)]
    fn fused_head_loss_sparse(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        teacher: Arc<SparseTeacher>,
        job: HeadJob,
    ) -> FloatTensor<Self> {
        run_head::<Self>(&hidden, &weight, TeacherRows::Sparse(&teacher), &job, false).0
    }
}

/// `upstream` (the f32 loss's gradient) in `grad`'s dtype: a half-precision student's
/// gradient stays in its precision.
fn same_dtype<B: Backend>(upstream: FloatTensor<B>, grad: &FloatTensor<B>) -> FloatTensor<B> {
    if upstream.dtype() == grad.dtype() {
        upstream
    } else {
        B::float_cast(upstream, grad.dtype().into())
    }
}

/// What burn's fusion backend records for the fused operations before they run.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod fusion_meta {
    use burn::backend::fusion::custom::TensorSpec;
    use burn::tensor::{DType, Shape};

    use super::FusedJob;

    pub(super) fn loss(student: &TensorSpec, _teacher: &TensorSpec, job: &FusedJob) -> TensorSpec {
        let shape = if job.reduced {
            Shape::new([1])
        } else {
            Shape::new([student.shape[0]])
        };
        TensorSpec::new(shape, DType::F32)
    }

    pub(super) fn loss_and_grad(
        student: &TensorSpec,
        teacher: &TensorSpec,
        job: &FusedJob,
    ) -> (TensorSpec, TensorSpec) {
        (
            loss(student, teacher, job),
            TensorSpec::new(student.shape.clone(), student.dtype),
        )
    }
}

/// Where the teacher's logits of a chunk come from.
enum TeacherRows<'a, B: Backend> {
    Logits(&'a FloatTensor<B>),
    Head {
        hidden: &'a FloatTensor<B>,
        weight: &'a FloatTensor<B>,
    },
    Sparse(&'a SparseTeacher),
}

fn rows<B: Backend>(tensor: FloatTensor<B>, start: usize, end: usize) -> FloatTensor<B> {
    let all = Slice {
        start: 0,
        end: None,
        step: 1,
    };
    let span = Slice {
        start: start as isize,
        end: Some(end as isize),
        step: 1,
    };
    B::float_slice(tensor, &[span, all])
}

/// Output of [`run_head`]: `[1]`, and the gradients w.r.t. `hidden` and `weight` when asked for.
type HeadOut<B> = (FloatTensor<B>, Option<(FloatTensor<B>, FloatTensor<B>)>);

/// The chunked linear-head loss: per chunk of rows, the student logits (and the teacher's when
/// it is a head) are computed, run through the fused kernel, and their gradient is folded into
/// the gradients of `hidden` and `weight` before the next chunk.
fn run_head<B: FusedLossBackend>(
    hidden: &FloatTensor<B>,
    weight: &FloatTensor<B>,
    teacher: TeacherRows<'_, B>,
    job: &HeadJob,
    want_grad: bool,
) -> HeadOut<B> {
    let positions = hidden.shape()[0];
    let weight_t = B::float_transpose(weight.clone());
    let teacher_weight_t = match &teacher {
        TeacherRows::Head { weight, .. } => Some(B::float_transpose((*weight).clone())),
        TeacherRows::Logits(_) | TeacherRows::Sparse(_) => None,
    };
    let classes = weight.shape()[0];
    let mut total: Option<FloatTensor<B>> = None;
    let mut hidden_grads = Vec::new();
    let mut weight_grad: Option<FloatTensor<B>> = None;
    let chunk_rows = job.chunk_rows.max(1);
    for start in (0..positions).step_by(chunk_rows) {
        let end = (start + chunk_rows).min(positions);
        let hidden_rows = rows::<B>(hidden.clone(), start, end);
        let student = B::float_matmul(hidden_rows.clone(), weight_t.clone());
        let teacher_logits = match (&teacher, &teacher_weight_t) {
            (TeacherRows::Logits(logits), _) => rows::<B>((*logits).clone(), start, end),
            (TeacherRows::Head { hidden, .. }, Some(weight_t)) => {
                B::float_matmul(rows::<B>((*hidden).clone(), start, end), weight_t.clone())
            }
            (TeacherRows::Head { .. }, None) => unreachable!("a teacher head has its weight"),
            (TeacherRows::Sparse(sparse), _) => sparse.rows::<B>(start, end, classes, &hidden.device()),
        };
        let chunk = FusedJob {
            spec: job.spec,
            labels: job.labels.as_ref().map(|labels| Arc::new(labels[start..end].to_vec())),
            weights: Some(Arc::new(job.weights[start..end].to_vec())),
            reduced: true,
            report: None,
        };
        let loss = if want_grad {
            let (loss, grad) = B::fused_loss_grad(student, teacher_logits, chunk);
            hidden_grads.push(B::float_matmul(grad.clone(), weight.clone()));
            let chunk_weight_grad = B::float_matmul(B::float_transpose(grad), hidden_rows);
            weight_grad = Some(match weight_grad {
                None => chunk_weight_grad,
                Some(sum) => B::float_add(sum, chunk_weight_grad),
            });
            loss
        } else {
            B::fused_loss(student, teacher_logits, chunk)
        };
        total = Some(match total {
            None => loss,
            Some(sum) => B::float_add(sum, loss),
        });
    }
    let output = total.unwrap_or_else(|| B::float_zeros(Shape::new([1]), &hidden.device(), FloatDType::F32));
    let grads = weight_grad.map(|weight_grad| (B::float_cat(hidden_grads, 0), weight_grad));
    (output, grads)
}

/// Runs the host kernel on two primitives; returns the output and, when asked, the gradient:
/// written over the student's own buffer when nothing else holds it, in a new one otherwise.
#[cfg(any(feature = "ndarray", feature = "flex"))]
fn run<B: HostTensor>(
    mut student: FloatTensor<B>,
    teacher: &FloatTensor<B>,
    job: &FusedJob,
    want_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let shape = student.shape();
    let classes = shape[1];
    let labels = job.labels.as_deref().map(Vec::as_slice);
    let weights = job.weights.as_deref().map(Vec::as_slice);
    let report = job.report.as_deref();
    let in_place = if want_grad && in_place_allowed() {
        B::with_logits_mut(&mut student, |rows| {
            B::with_logits(teacher, |teacher| {
                fused_rows(
                    &job.spec,
                    StudentRows::InPlace(rows),
                    teacher,
                    classes,
                    labels,
                    weights,
                    true,
                    report,
                )
            })
        })
    } else {
        None
    };
    if want_grad {
        let counter = if in_place.is_some() { &IN_PLACE } else { &NEW_BUFFER };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let (RowsOut { losses, grad }, student) = match in_place {
        Some(out) => (out, Some(student)),
        None => (
            B::with_logits(&student, |student| {
                B::with_logits(teacher, |teacher| {
                    fused_rows(
                        &job.spec,
                        StudentRows::Read(student),
                        teacher,
                        classes,
                        labels,
                        weights,
                        want_grad,
                        report,
                    )
                })
            }),
            None,
        ),
    };
    let weight = |row: usize| job.weights.as_ref().map_or(1.0, |weights| weights[row]);
    // A bad row (NaN) keeps its NaN even at weight 0, so that checks see it.
    let weighted = |row: usize, loss: f32| if loss.is_nan() { loss } else { loss * weight(row) };
    let output = if job.reduced {
        let total: f64 = losses
            .iter()
            .enumerate()
            .map(|(row, &loss)| weighted(row, loss) as f64)
            .sum();
        B::from_values(vec![total as f32], vec![1])
    } else {
        let positions = losses.len();
        let losses = losses
            .iter()
            .enumerate()
            .map(|(row, &loss)| weighted(row, loss))
            .collect();
        B::from_values(losses, vec![positions])
    };
    // In place, the student's buffer now holds the gradient.
    let grad = student.or_else(|| grad.map(|grad| B::from_grad(grad, shape.to_vec())));
    (output, grad)
}

/// Host-kernel gradients written over the student's logits, and into a new buffer.
static IN_PLACE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static NEW_BUFFER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How the host kernel's gradients were stored since the process started (all threads).
///
/// The fused losses write the gradient w.r.t. the student logits over the logits themselves
/// when nothing else holds them (a model's output passed straight to the loss): no second
/// `[positions, classes]` buffer, and no fresh pages for the OS to zero. Any other handle on
/// the logits (a clone kept for a metric, `check_inputs` on a GPU device) makes the kernel
/// write a new buffer instead. The counts tell which happened, for memory tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FusedGradStores {
    /// Gradients written over the student logits.
    pub in_place: u64,
    /// Gradients written into a new buffer.
    pub new_buffer: u64,
}

/// The counts of [`FusedGradStores`] so far.
pub fn fused_grad_stores() -> FusedGradStores {
    use std::sync::atomic::Ordering::Relaxed;
    FusedGradStores {
        in_place: IN_PLACE.load(Relaxed),
        new_buffer: NEW_BUFFER.load(Relaxed),
    }
}

/// Whether the host kernel may write the gradient over a student buffer nothing else holds:
/// yes, unless `BURN_DISTILL_FUSED_IN_PLACE=0` (read once; for side-by-side measurements).
#[cfg(any(feature = "ndarray", feature = "flex"))]
fn in_place_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("BURN_DISTILL_FUSED_IN_PLACE").map_or(true, |value| value != "0"))
}

macro_rules! host_impl {
    ($backend:ty, $feature:literal) => {
        #[cfg(feature = $feature)]
        #[allow(deprecated)]
        impl FusedLossBackend for $backend {
            fn fused_loss(student: FloatTensor<Self>, teacher: FloatTensor<Self>, job: FusedJob) -> FloatTensor<Self> {
                run::<Self>(student, &teacher, &job, false).0
            }

            fn fused_loss_grad(
                student: FloatTensor<Self>,
                teacher: FloatTensor<Self>,
                job: FusedJob,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                let (output, grad) = run::<Self>(student, &teacher, &job, true);
                (output, grad.expect("the gradient was asked for"))
            }

            fn fused_scale_grad(
                grad: FloatTensor<Self>,
                upstream: FloatTensor<Self>,
                per_row: bool,
            ) -> FloatTensor<Self> {
                host_scale_grad::<Self>(grad, upstream, per_row)
            }
        }
    };
}

host_impl!(burn::backend::NdArray, "ndarray");
host_impl!(burn::backend::Flex, "flex");

/// The host form of [`FusedLossBackend::fused_scale_grad`]: the gradient untouched when the
/// upstream gradient is exactly 1 (the usual `loss.backward()`), no pass over it.
#[cfg(any(feature = "ndarray", feature = "flex"))]
fn host_scale_grad<B: HostTensor>(grad: FloatTensor<B>, upstream: FloatTensor<B>, per_row: bool) -> FloatTensor<B> {
    if per_row {
        let positions = upstream.shape()[0];
        let upstream = same_dtype::<B>(upstream, &grad);
        return B::float_mul(grad, B::float_reshape(upstream, Shape::new([positions, 1])));
    }
    let scale = B::with_values(&upstream, |values| values[0]);
    if scale == 1.0 {
        grad
    } else {
        B::float_mul_scalar(grad, scale.into())
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl FusedLossBackend for burn_cubecl::CubeBackend {
    fn fused_loss(student: FloatTensor<Self>, teacher: FloatTensor<Self>, job: FusedJob) -> FloatTensor<Self> {
        super::cube::fused_rows_cube(student, teacher, &job, false).0
    }

    fn fused_loss_grad(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        job: FusedJob,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (output, grad) = super::cube::fused_rows_cube(student, teacher, &job, true);
        (output, grad.expect("the gradient was asked for"))
    }
}

/// Saved by the forward pass: the gradient of the output w.r.t. the student logits (already
/// weighted per row for a reduced output), and whether the output was per row.
#[derive(Debug)]
struct FusedBackward;

impl<B: FusedLossBackend> Backward<B, 1> for FusedBackward {
    type State = (FloatTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let (grad, per_row) = ops.state;
        let Some(parent) = parent else { return };
        grads.register::<B>(parent.id, B::fused_scale_grad(grad, upstream, per_row));
    }
}

/// Saved by the chunked head's forward pass: the gradients w.r.t. `hidden` and `weight`.
#[derive(Debug)]
struct HeadBackward;

impl<B: FusedLossBackend> Backward<B, 2> for HeadBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [hidden_node, weight_node] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let (hidden_grad, weight_grad) = ops.state;
        if let Some(node) = hidden_node {
            grads.register::<B>(node.id, B::fused_scale_grad(hidden_grad, upstream.clone(), false));
        }
        if let Some(node) = weight_node {
            grads.register::<B>(node.id, B::fused_scale_grad(weight_grad, upstream, false));
        }
    }
}

/// The autodiff form of the chunked head: both gradients come out of the forward pass.
fn head_autodiff<B: FusedLossBackend, C: CheckpointStrategy>(
    hidden: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    teacher: TeacherRows<'_, B>,
    job: HeadJob,
) -> FloatTensor<Autodiff<B, C>> {
    match HeadBackward
        .prepare::<C>([hidden.node(), weight.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (output, grads) = run_head::<B>(hidden.primitive(), weight.primitive(), teacher, &job, true);
            prep.finish(grads.expect("the gradients were asked for"), output)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(run_head::<B>(hidden.primitive(), weight.primitive(), teacher, &job, false).0)
        }
    }
}

impl<B: FusedLossBackend, C: CheckpointStrategy> FusedLossBackend for Autodiff<B, C> {
    fn fused_head_loss(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        teacher_hidden: FloatTensor<Self>,
        teacher_weight: FloatTensor<Self>,
        job: HeadJob,
    ) -> FloatTensor<Self> {
        let teacher = TeacherRows::Head {
            hidden: teacher_hidden.primitive(),
            weight: teacher_weight.primitive(),
        };
        head_autodiff::<B, C>(hidden, weight, teacher, job)
    }

    fn fused_head_loss_logits(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        teacher_logits: FloatTensor<Self>,
        job: HeadJob,
    ) -> FloatTensor<Self> {
        head_autodiff::<B, C>(hidden, weight, TeacherRows::Logits(teacher_logits.primitive()), job)
    }

    fn fused_head_loss_sparse(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        teacher: Arc<SparseTeacher>,
        job: HeadJob,
    ) -> FloatTensor<Self> {
        head_autodiff::<B, C>(hidden, weight, TeacherRows::Sparse(&teacher), job)
    }

    fn fused_loss(student: FloatTensor<Self>, teacher: FloatTensor<Self>, job: FusedJob) -> FloatTensor<Self> {
        match FusedBackward.prepare::<C>([student.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let per_row = !job.reduced;
                let (output, grad) = B::fused_loss_grad(student.into_primitive(), teacher.into_primitive(), job);
                prep.finish((grad, per_row), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::fused_loss(student.into_primitive(), teacher.into_primitive(), job))
            }
        }
    }

    fn fused_loss_grad(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        job: FusedJob,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (output, grad) = B::fused_loss_grad(student.into_primitive(), teacher.into_primitive(), job);
        (FloatTensor::<Self>::new(output), FloatTensor::<Self>::new(grad))
    }
}
