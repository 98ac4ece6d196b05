//! Fused forward + backward of the logit losses.
//!
//! A KD loss is memory-bound: composed from tensor ops it sweeps the `[positions, classes]`
//! logits 5–10 times and holds several temporaries of that size. The fused path reads the
//! student and teacher logits once and writes the gradient once, in the forward pass; the
//! backward pass only scales it. It runs for f32 tensors on the ndarray and flex devices (a
//! host kernel: rows in parallel, vectorised exponentials) and on the wgpu and cuda devices (a
//! CubeCL kernel, one cube per row); the losses pick it by themselves
//! ([`Implementation::Auto`]) and fall back to the composed tensor-op path elsewhere.

mod attention;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube;
mod kernel;
mod op;
mod relation;
mod rows;
mod swiglu;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::Dispatch;
use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{LossError, Result};
use crate::input::{check_logits, widen_f32};
pub use attention::{CausalMask, causal_attention};
pub use kernel::{KernelBounds, kernel_bounds};
pub use op::{FusedGradStores, fused_grad_stores};
pub(crate) use op::{FusedLossBackend, HeadJob, SparseTeacher};
pub(crate) use relation::{RelationJob, gathered_dot, relation_loss, use_host_relation};
pub use rows::{FEW_ROWS, WeightLayout, weight_matmul};
pub use swiglu::swiglu;

pub(crate) use crate::spec::RowSpec;
use op::FusedJob;

/// Which implementation a loss runs.
///
/// | Value | Runs |
/// |---|---|
/// | `Auto` (default) | the fused kernel where it exists (an ndarray, flex, wgpu or cuda device, with or without autodiff; f16 and bf16 logits read as they are on flex, widened to f32 first on the GPU devices), the composed tensor ops elsewhere (half-precision logits widened to f32 first) |
/// | `Fused` | the fused kernel, or an error naming the device and dtype where it does not exist |
/// | `Composed` | burn tensor ops, on every device (the reference the fused kernel is tested against) |
///
/// Both give the same values and gradients to about 1e-6 relative; the fused kernels sum in a
/// different order (and on the CPU compute `exp` with their own polynomial).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Implementation {
    /// Fused where available, composed elsewhere.
    #[default]
    Auto,
    /// Always fused; an error where the fused kernel does not exist.
    Fused,
    /// Always composed from burn tensor operations.
    Composed,
}

/// Whether the fused losses run on `device` (with or without autodiff) for f32 tensors.
pub fn fused_available(device: &Device) -> bool {
    use burn::backend::DispatchDevice;
    #[allow(unreachable_patterns)] // with no such backend compiled in, nothing matches
    match device.as_dispatch().clone().inner() {
        #[cfg(feature = "ndarray")]
        DispatchDevice::NdArray(_) => true,
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => true,
        // The CubeCL kernel runs on every cubecl runtime; it is tested on wgpu (and written
        // for cuda), so the others (cubecl's CPU runtime, ROCm, Metal) keep the composed path.
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        DispatchDevice::Cube(device) => {
            use burn::backend::RuntimeId;
            matches!(device.runtime(), RuntimeId::Wgpu | RuntimeId::Cuda)
        }
        _ => false,
    }
}

/// Decides whether a call of [`fused_loss`] runs fused; `Err` when `Fused` is forced where it
/// cannot run. Half-precision logits run fused on every device with a kernel: read as they
/// are where it reads them ([`fused_available_for`]), widened to f32 first elsewhere (the
/// GPU devices, whose CubeCL kernel is f32).
pub(crate) fn use_fused<const D: usize>(
    implementation: Implementation,
    student: &Tensor<D>,
    teacher: &Tensor<D>,
) -> Result<bool> {
    let widened = |dtype: DType| match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    };
    decide(
        implementation,
        &student.device(),
        &[teacher.device()],
        &[widened(student.dtype()), widened(teacher.dtype())],
    )
}

/// Whether the fused losses run on `device` for logits of `dtype`: f32 wherever
/// [`fused_available`]; f16 and bf16 on flex (ndarray holds no half-precision tensors), read
/// as they are and summed in f32, the gradient written in the student's precision.
pub fn fused_available_for(device: &Device, dtype: DType) -> bool {
    match dtype {
        DType::F32 => fused_available(device),
        DType::F16 | DType::BF16 => on_flex(device),
        _ => false,
    }
}

/// Whether `device` is a flex device.
fn on_flex(device: &Device) -> bool {
    use burn::backend::DispatchDevice;
    #[allow(unreachable_patterns)] // without flex compiled in, nothing matches
    match device.as_dispatch().clone().inner() {
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => true,
        _ => false,
    }
}

/// [`use_fused`] for any set of inputs: all on `device` (`others` are their devices), every
/// dtype one the kernel reads there ([`fused_available_for`]).
pub(crate) fn decide(
    implementation: Implementation,
    device: &Device,
    others: &[Device],
    dtypes: &[DType],
) -> Result<bool> {
    let possible = fused_available(device)
        && others.iter().all(|other| other == device)
        && dtypes.iter().all(|&dtype| fused_available_for(device, dtype));
    match implementation {
        Implementation::Composed => Ok(false),
        Implementation::Auto => Ok(possible),
        Implementation::Fused if possible => Ok(true),
        Implementation::Fused => Err(LossError::FusedUnavailable {
            device: format!("{device:?}"),
            dtype: format!("{dtypes:?}"),
        }),
    }
}

/// The fused loss over `[positions, classes]` rows: `[1]` (`Σ w_i loss_i`) when `reduced`, else
/// `[positions]` (`w_i loss_i`). With `check`, a NaN result (a bad input row) becomes the
/// error naming the input and what is wrong with it, as the composed path's checks name it:
/// reported by the host kernel itself (so the inputs need not be kept, and the student's
/// buffer can take the gradient), found by those checks on the inputs elsewhere.
pub(crate) fn fused_loss(
    student: Tensor<2>,
    teacher: Tensor<2>,
    spec: RowSpec,
    labels: Option<Vec<i64>>,
    weights: Option<Vec<f32>>,
    reduced: bool,
    check: bool,
) -> Result<Tensor<1>> {
    // Half precision where the kernel reads only f32: widened first (differentiable: the
    // gradient comes back in the student's precision).
    let device = student.device();
    let widen = |tensor: Tensor<2>| {
        if fused_available_for(&device, tensor.dtype()) {
            tensor
        } else {
            widen_f32(tensor)
        }
    };
    let (student, teacher) = (widen(student), widen(teacher));
    let report = Arc::new(AtomicU8::new(0));
    let inputs = (check && !host_kernel(&device)).then(|| (student.clone(), teacher.clone()));
    let job = FusedJob {
        spec,
        labels: labels.map(Arc::new),
        weights: weights.map(Arc::new),
        reduced,
        report: Some(report.clone()),
    };
    let output = <Dispatch as FusedLossBackend>::fused_loss(student.into_dispatch(), teacher.into_dispatch(), job);
    let output = Tensor::from_dispatch(output);
    if check && has_nan(&output) {
        if let Some(error) = reported_error(report.load(Ordering::Relaxed)) {
            return Err(error);
        }
        if let Some((student, teacher)) = inputs {
            check_logits(&student, "student logits")?;
            check_logits(&teacher, "teacher logits")?;
        }
    }
    Ok(output)
}

/// The error for a kernel's report, in the order the composed checks find them: the student
/// before the teacher; NaN, then `+inf`, then a row of `-inf`.
fn reported_error(bits: u8) -> Option<LossError> {
    use kernel::bad;
    let checks = [
        (bad::STUDENT_NAN, "student logits", Some("NaN")),
        (bad::STUDENT_POS_INF, "student logits", Some("+inf")),
        (bad::STUDENT_EMPTY, "student logits", None),
        (bad::TEACHER_NAN, "teacher logits", Some("NaN")),
        (bad::TEACHER_POS_INF, "teacher logits", Some("+inf")),
        (bad::TEACHER_EMPTY, "teacher logits", None),
    ];
    checks
        .into_iter()
        .find(|(bit, _, _)| bits & bit != 0)
        .map(|(_, tensor, kind)| match kind {
            Some(kind) => LossError::NonFinite { tensor, kind },
            None => LossError::EmptyDistribution { tensor },
        })
}

/// Whether the fused losses run the host kernel on `device` (ndarray or flex).
fn host_kernel(device: &Device) -> bool {
    use burn::backend::DispatchDevice;
    #[allow(unreachable_patterns)] // with no host backend compiled in, nothing matches
    match device.as_dispatch().clone().inner() {
        #[cfg(feature = "ndarray")]
        DispatchDevice::NdArray(_) => true,
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => true,
        _ => false,
    }
}

/// Host labels for the kernel: checks each is in `0..classes` or `ignore_index`, and returns
/// them with ignored ones replaced by 0, and which positions count.
pub(crate) fn kernel_labels(mut labels: Vec<i64>, ignore_index: i64, classes: usize) -> Result<(Vec<i64>, Vec<bool>)> {
    let valid: Vec<bool> = labels.iter().map(|&label| label != ignore_index).collect();
    if let Some(&index) = labels
        .iter()
        .find(|&&label| label != ignore_index && (label < 0 || label >= classes as i64))
    {
        return Err(LossError::IndexOutOfRange {
            tensor: "labels",
            index,
            classes,
        });
    }
    for label in labels.iter_mut().filter(|label| **label == ignore_index) {
        *label = 0;
    }
    Ok((labels, valid))
}

/// Whether two f32 tensors of one device can go to a host kernel (ndarray or flex): what the
/// CPU-only extension ops ([`swiglu`], [`weight_matmul`]) check before dispatching.
pub(crate) fn host_f32_pair(a: (&Device, DType), b: (&Device, DType)) -> bool {
    use burn::backend::DispatchDevice;
    let host = match a.0.as_dispatch().clone().inner() {
        #[cfg(feature = "ndarray")]
        DispatchDevice::NdArray(_) => true,
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => true,
        #[allow(unreachable_patterns)] // with no host backend compiled in, nothing above matches
        _ => false,
    };
    host && a.0 == b.0 && a.1 == DType::F32 && b.1 == DType::F32
}

/// Whether any value of a fused result is NaN (a bad input row): one host read of `[1]` or
/// `[positions]` values.
pub(crate) fn has_nan(values: &Tensor<1>) -> bool {
    values.to_data().iter::<f32>().any(f32::is_nan)
}
