//! The host kernel of the fused losses: every row of `[positions, classes]` student and
//! teacher logits is read from memory once, and its loss and its gradient w.r.t. the student
//! logits come out of the same visit.
//!
//! Per row: one sweep over memory finds both maxima (and NaN / +inf); the exponentials are
//! then written once into the gradient row (student) and a per-task scratch row (teacher), and
//! every later step reads them from cache. That is the memory traffic of an online softmax
//! (one read of each input, one write of the gradient) with one exponential per element
//! instead of two: an online softmax rescales its running sum, so it has to recompute the
//! exponentials after it. Each sum is taken block by block right after the block's
//! exponentials are written (still in L1), and forward KL's value is summed in the teacher's
//! exponential pass: a row is swept from L2 three times (exponentials of each side, the
//! gradient), not five. Rows run in parallel on rayon's pool; the inner loops are plain
//! arrays of [`LANES`] that LLVM vectorises, compiled three times (baseline, AVX2 + FMA and
//! AVX-512, picked at run time).
//!
//! Half-precision logits (f16, bf16) are read as they are: the maxima sweep widens each row
//! to f32 into a scratch row held in cache, all arithmetic is f32 (sums in f64), and the
//! gradient row is rounded to the student's precision as it is written. The memory traffic is
//! then 6 bytes per element instead of 12.

use std::sync::atomic::{AtomicU8, Ordering};

use burn::tensor::{DType, bf16, f16};
use rayon::prelude::*;

use crate::spec::{Divergence, RowSpec};

/// Lanes of every explicit reduction (8 × f32 = one AVX2 register).
const LANES: usize = 8;
/// Rows per rayon task: enough work per task to amortise scheduling at small vocabularies.
const MIN_ELEMENTS_PER_TASK: usize = 1 << 16;

/// Row-major `[positions, classes]` logits as the host kernel reads them, in their own
/// precision.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HostLogits<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> HostLogits<'a> {
    pub(crate) fn len(&self) -> usize {
        match self {
            HostLogits::F32(values) => values.len(),
            HostLogits::F16(values) => values.len(),
            HostLogits::Bf16(values) => values.len(),
        }
    }

    pub(crate) fn dtype(&self) -> DType {
        match self {
            HostLogits::F32(_) => DType::F32,
            HostLogits::F16(_) => DType::F16,
            HostLogits::Bf16(_) => DType::BF16,
        }
    }

    fn span(self, range: std::ops::Range<usize>) -> Self {
        match self {
            HostLogits::F32(values) => HostLogits::F32(&values[range]),
            HostLogits::F16(values) => HostLogits::F16(&values[range]),
            HostLogits::Bf16(values) => HostLogits::Bf16(&values[range]),
        }
    }

    /// Row `range` in f32: the slice itself, or widened into `scratch`.
    #[inline(always)]
    fn row<'b>(self, range: std::ops::Range<usize>, scratch: &'b mut [f32], simd: Simd) -> &'b [f32]
    where
        'a: 'b,
    {
        match self {
            HostLogits::F32(values) => &values[range],
            HostLogits::F16(values) => {
                simd.widen_f16(&values[range], scratch);
                scratch
            }
            HostLogits::Bf16(values) => {
                widen_bf16(&values[range], scratch);
                scratch
            }
        }
    }
}

/// The student's logits, read by the kernel or (when nothing else holds them) read and then
/// overwritten with the gradient, row by row.
#[derive(Debug)]
pub(crate) enum StudentRows<'a> {
    Read(HostLogits<'a>),
    /// Each row is copied (or widened) into cache before its gradient is written over it: no
    /// new `[positions, classes]` buffer, whose fresh pages the OS would zero first.
    InPlace(GradRows<'a>),
}

impl StudentRows<'_> {
    fn len(&self) -> usize {
        match self {
            StudentRows::Read(logits) => logits.len(),
            StudentRows::InPlace(GradRows::F32(values)) => values.len(),
            StudentRows::InPlace(GradRows::F16(values)) => values.len(),
            StudentRows::InPlace(GradRows::Bf16(values)) => values.len(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            StudentRows::Read(logits) => logits.dtype(),
            StudentRows::InPlace(GradRows::F32(_)) => DType::F32,
            StudentRows::InPlace(GradRows::F16(_)) => DType::F16,
            StudentRows::InPlace(GradRows::Bf16(_)) => DType::BF16,
        }
    }
}

/// What made a row's loss NaN, as bits of a report (several rows may set several).
pub(crate) mod bad {
    pub const STUDENT_NAN: u8 = 1;
    pub const STUDENT_POS_INF: u8 = 2;
    pub const STUDENT_EMPTY: u8 = 4;
    pub const TEACHER_NAN: u8 = 8;
    pub const TEACHER_POS_INF: u8 = 16;
    pub const TEACHER_EMPTY: u8 = 32;
}

/// The [`bad`] bits of one row: NaN, `+inf`, or no value above `-inf`, on each side.
fn classify(student: &[f32], teacher: &[f32]) -> u8 {
    let side = |values: &[f32], nan: u8, pos_inf: u8, empty: u8| {
        let mut bits = 0;
        if values.iter().any(|v| v.is_nan()) {
            bits |= nan;
        }
        if values.contains(&f32::INFINITY) {
            bits |= pos_inf;
        }
        if values.iter().all(|&v| v == f32::NEG_INFINITY) {
            bits |= empty;
        }
        bits
    };
    side(student, bad::STUDENT_NAN, bad::STUDENT_POS_INF, bad::STUDENT_EMPTY)
        | side(teacher, bad::TEACHER_NAN, bad::TEACHER_POS_INF, bad::TEACHER_EMPTY)
}

/// The gradient w.r.t. the student logits, in the student's precision.
#[derive(Debug)]
pub(crate) enum HostGrad {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

/// Rows of a gradient (a task's share of a [`HostGrad`], or the student's own buffer).
#[derive(Debug)]
pub(crate) enum GradRows<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    Bf16(&'a mut [bf16]),
}

/// The result of [`fused_rows`].
#[derive(Debug)]
pub(crate) struct RowsOut {
    /// `soft_weight · D + hard_weight · CE` per row; 0 for rows of weight 0, NaN for rows with
    /// NaN or +inf logits or no finite logit.
    pub losses: Vec<f32>,
    /// `weight_i · ∂loss_i/∂student_logits`, `[positions · classes]`, when asked for, in the
    /// student's precision.
    pub grad: Option<HostGrad>,
}

/// Runs the fused loss over `positions = student.len() / classes` rows.
///
/// `labels` (one per row, in `0..classes`) are needed when `spec.hard_weight > 0`. `weights`
/// scale each row's gradient; a row of weight 0 is only checked for bad values (its loss is 0,
/// its gradient 0). `None` means weight 1 everywhere. A student given
/// [`InPlace`](StudentRows::InPlace) holds the gradient afterwards (`RowsOut::grad` is then
/// `None`). `report` collects the [`bad`] bits of every row whose loss is NaN.
#[allow(clippy::too_many_arguments)] // the kernel's whole job, spelled out
pub(crate) fn fused_rows(
    spec: &RowSpec,
    student: StudentRows<'_>,
    teacher: HostLogits<'_>,
    classes: usize,
    labels: Option<&[i64]>,
    weights: Option<&[f32]>,
    want_grad: bool,
    report: Option<&AtomicU8>,
) -> RowsOut {
    assert!(classes > 0 && student.len() == teacher.len() && student.len().is_multiple_of(classes));
    let positions = student.len() / classes;
    let rows_per_task = (MIN_ELEMENTS_PER_TASK / classes).max(1);
    let mut losses = vec![0.0f32; positions];
    let simd = Simd::detect();
    let in_place = matches!(student, StudentRows::InPlace(_));
    let student_dtype = student.dtype();
    let layout = ScratchLayout {
        classes,
        // The student's exponentials go straight into an f32 gradient row; otherwise (no
        // gradient, or one in half precision) into a scratch row.
        own_student_row: !want_grad || student_dtype != DType::F32,
        widen_student: in_place || student_dtype != DType::F32,
        widen_teacher: teacher.dtype() != DType::F32,
    };
    let read = match &student {
        StudentRows::Read(logits) => Some(*logits),
        StudentRows::InPlace(_) => None,
    };
    let task = |index: usize, losses: &mut [f32], grad: Option<GradRows<'_>>, scratch: &mut Scratch| {
        let first = index * rows_per_task;
        let span = first * classes..(first + losses.len()) * classes;
        let block = Block {
            spec,
            student: read.map(|student| student.span(span.clone())),
            teacher: teacher.span(span),
            classes,
            labels: labels.map(|labels| &labels[first..first + losses.len()]),
            weights: weights.map(|weights| &weights[first..first + losses.len()]),
            report,
        };
        simd.run(&block, losses, grad, scratch);
    };
    // Scratch rows live in a thread-local buffer reused across tasks and calls: rayon calls a
    // `for_each_init` initialiser once per split, and fresh 128 KiB rows would each cost page
    // faults.
    let elements = classes * positions;
    let grad = match student {
        StudentRows::InPlace(GradRows::F32(grad)) => {
            sweep(
                &mut losses,
                rows_per_task,
                layout,
                grad,
                |grad: &mut [f32]| GradRows::F32(grad),
                &task,
            );
            None
        }
        StudentRows::InPlace(GradRows::F16(grad)) => {
            sweep(
                &mut losses,
                rows_per_task,
                layout,
                grad,
                |grad: &mut [f16]| GradRows::F16(grad),
                &task,
            );
            None
        }
        StudentRows::InPlace(GradRows::Bf16(grad)) => {
            sweep(
                &mut losses,
                rows_per_task,
                layout,
                grad,
                |grad: &mut [bf16]| GradRows::Bf16(grad),
                &task,
            );
            None
        }
        StudentRows::Read(_) if want_grad => Some(match student_dtype {
            DType::F16 => {
                let mut grad = zeroed_half(elements);
                sweep(
                    &mut losses,
                    rows_per_task,
                    layout,
                    &mut grad,
                    |grad: &mut [f16]| GradRows::F16(grad),
                    &task,
                );
                HostGrad::F16(grad)
            }
            DType::BF16 => {
                let mut grad = zeroed_half(elements);
                sweep(
                    &mut losses,
                    rows_per_task,
                    layout,
                    &mut grad,
                    |grad: &mut [bf16]| GradRows::Bf16(grad),
                    &task,
                );
                HostGrad::Bf16(grad)
            }
            _ => {
                let mut grad = vec![0.0; elements];
                advise_huge_pages(&mut grad);
                sweep(
                    &mut losses,
                    rows_per_task,
                    layout,
                    &mut grad,
                    |grad: &mut [f32]| GradRows::F32(grad),
                    &task,
                );
                HostGrad::F32(grad)
            }
        }),
        StudentRows::Read(_) => {
            losses
                .par_chunks_mut(rows_per_task)
                .enumerate()
                .for_each(|(index, losses)| with_scratch(layout, |scratch| task(index, losses, None, scratch)));
            None
        }
    };
    RowsOut { losses, grad }
}

/// A zeroed buffer of 16-bit floats from `calloc` (pages the OS zeroes as they are first
/// written, not a pass of its own).
fn zeroed_half<H: bytemuck::Pod>(elements: usize) -> Vec<H> {
    let mut buffer = bytemuck::allocation::cast_vec(vec![0u16; elements]);
    advise_huge_pages(&mut buffer);
    buffer
}

/// The parallel sweep that writes the gradient `grad`, `rows_per_task` rows per task.
fn sweep<G, Task>(
    losses: &mut [f32],
    rows_per_task: usize,
    layout: ScratchLayout,
    grad: &mut [G],
    wrap: fn(&mut [G]) -> GradRows<'_>,
    task: &Task,
) where
    G: Send,
    Task: Fn(usize, &mut [f32], Option<GradRows<'_>>, &mut Scratch) + Sync,
{
    let classes = grad.len() / losses.len().max(1);
    losses
        .par_chunks_mut(rows_per_task)
        .zip(grad.par_chunks_mut(rows_per_task * classes))
        .enumerate()
        .for_each(|(index, (losses, grad))| {
            with_scratch(layout, |scratch| task(index, losses, Some(wrap(grad)), scratch))
        });
}

/// Asks Linux to back `buffer` with transparent huge pages where it is allowed to (`madvise`
/// mode, the common default). A fresh gradient of hundreds of megabytes is otherwise faulted
/// in 4 KiB at a time by the sweep that writes it: 64 000 faults at 2048 × 32000, a quarter of
/// the call. Best effort: nothing changes where the kernel refuses.
fn advise_huge_pages<G>(buffer: &mut [G]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buffer);
        if bytes < 4 * HUGE_PAGE {
            return;
        }
        let start = buffer.as_mut_ptr() as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let length = (start + bytes - aligned) / HUGE_PAGE * HUGE_PAGE;
        // SAFETY: `[aligned, aligned + length)` lies inside `buffer`, which this function
        // borrows mutably; MADV_HUGEPAGE only changes how the pages are backed, never their
        // contents, and its failure is ignored.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, length, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buffer;
}

/// A contiguous block of rows handed to one task.
struct Block<'a> {
    spec: &'a RowSpec,
    /// `None`: the student's rows are the gradient rows (in place).
    student: Option<HostLogits<'a>>,
    teacher: HostLogits<'a>,
    classes: usize,
    labels: Option<&'a [i64]>,
    weights: Option<&'a [f32]>,
    report: Option<&'a AtomicU8>,
}

/// Which scratch rows a call needs.
#[derive(Debug, Clone, Copy)]
struct ScratchLayout {
    classes: usize,
    own_student_row: bool,
    widen_student: bool,
    widen_teacher: bool,
}

/// Per-task rows: teacher exponentials, and `q · ∂D/∂q` for the divergences that need it
/// (and the student exponentials when no f32 gradient row is written; the inputs widened to
/// f32 when they are in half precision).
struct Scratch {
    teacher_exp: Vec<f32>,
    student_term: Vec<f64>,
    student_exp: Vec<f32>,
    /// `exp(s − max s)` (the hard term's softmax at T = 1).
    hard_exp: Vec<f32>,
    student_row: Vec<f32>,
    teacher_row: Vec<f32>,
}

impl Scratch {
    fn fit(&mut self, layout: ScratchLayout) {
        let classes = layout.classes;
        let sized = |on: bool| if on { classes } else { 0 };
        self.teacher_exp.resize(classes, 0.0);
        self.student_term.resize(classes, 0.0);
        self.hard_exp.resize(classes, 0.0);
        self.student_exp.resize(sized(layout.own_student_row), 0.0);
        self.student_row.resize(sized(layout.widen_student), 0.0);
        self.teacher_row.resize(sized(layout.widen_teacher), 0.0);
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch {
            teacher_exp: Vec::new(),
            student_term: Vec::new(),
            student_exp: Vec::new(),
            hard_exp: Vec::new(),
            student_row: Vec::new(),
            teacher_row: Vec::new(),
        })
    };
}

/// Runs `f` with this thread's scratch rows, sized for `layout`.
fn with_scratch<R>(layout: ScratchLayout, f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.fit(layout);
        f(&mut scratch)
    })
}

/// Which compiled copy of the kernel runs (the relation kernels' too).
#[derive(Clone, Copy, Debug)]
pub(super) enum Simd {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    /// The widest copy this CPU runs: every feature a copy is compiled for must be there;
    /// `BURN_DISTILL_NO_AVX512` set keeps to AVX2.
    pub(super) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if std::env::var_os("BURN_DISTILL_NO_AVX512").is_none()
                && avx2
                && has!("avx512f")
                && has!("avx512bw")
                && has!("avx512vl")
            {
                return Simd::Avx512;
            }
            if avx2 {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    }

    fn run(self, block: &Block<'_>, losses: &mut [f32], grad: Option<GradRows<'_>>, scratch: &mut Scratch) {
        match self {
            Simd::Baseline => run_block(self, block, losses, grad, scratch),
            // SAFETY: `detect` returned `Avx2` / `Avx512` only after checking that this CPU has
            // the features `run_block_avx2` / `run_block_avx512` are compiled for.
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Simd::Avx2 => unsafe { run_block_avx2(self, block, losses, grad, scratch) },
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Simd::Avx512 => unsafe { run_block_avx512(self, block, losses, grad, scratch) },
        }
    }

    /// `out = values` widened to f32 (exact).
    fn widen_f16(self, values: &[f16], out: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` checked F16C and AVX2 for both of these.
            #[allow(unsafe_code)]
            Simd::Avx2 | Simd::Avx512 => unsafe { x86::widen_f16(values, out) },
            _ => {
                for (o, &v) in out.iter_mut().zip(values) {
                    *o = v.to_f32();
                }
            }
        }
    }

    /// `out = values` rounded to f16 (to nearest, ties to even; overflow to ±inf).
    fn narrow_f16(self, values: &[f32], out: &mut [f16]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `widen_f16`.
            #[allow(unsafe_code)]
            Simd::Avx2 | Simd::Avx512 => unsafe { x86::narrow_f16(values, out) },
            _ => {
                for (o, &v) in out.iter_mut().zip(values) {
                    *o = f16::from_f32(v);
                }
            }
        }
    }
}

/// bf16 → f32 is the top half of the f32 bits: exact, and a loop LLVM vectorises.
#[inline(always)]
fn widen_bf16(values: &[bf16], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = f32::from_bits((v.to_bits() as u32) << 16);
    }
}

/// f32 → bf16 rounded to nearest, ties to even (NaN stays NaN), in integer arithmetic that
/// vectorises.
#[inline(always)]
fn narrow_bf16(values: &[f32], out: &mut [bf16]) {
    for (o, &v) in out.iter_mut().zip(values) {
        let bits = v.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
        let nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
        *o = bf16::from_bits(if nan {
            ((bits >> 16) | 0x40) as u16
        } else {
            rounded as u16
        });
    }
}

/// The F16C conversions, eight values per instruction.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_storeu_si128, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps,
    };

    use burn::tensor::f16;

    /// # Safety
    /// The CPU must have AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen_f16(values: &[f16], out: &mut [f32]) {
        let n = values.len().min(out.len());
        let whole = n / 8 * 8;
        for start in (0..whole).step_by(8) {
            // SAFETY: `start + 8 ≤ n` for both slices; unaligned loads and stores.
            unsafe {
                let half = _mm_loadu_si128(values.as_ptr().add(start).cast::<__m128i>());
                _mm256_storeu_ps(out.as_mut_ptr().add(start), _mm256_cvtph_ps(half));
            }
        }
        for j in whole..n {
            out[j] = values[j].to_f32();
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn narrow_f16(values: &[f32], out: &mut [f16]) {
        let n = values.len().min(out.len());
        let whole = n / 8 * 8;
        for start in (0..whole).step_by(8) {
            // SAFETY: as in `widen_f16`; rounding mode 0 is to nearest, ties to even.
            unsafe {
                let single = _mm256_loadu_ps(values.as_ptr().add(start));
                _mm_storeu_si128(
                    out.as_mut_ptr().add(start).cast::<__m128i>(),
                    _mm256_cvtps_ph::<0>(single),
                );
            }
        }
        for j in whole..n {
            out[j] = f16::from_f32(values[j]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn run_block_avx2(
    simd: Simd,
    block: &Block<'_>,
    losses: &mut [f32],
    grad: Option<GradRows<'_>>,
    scratch: &mut Scratch,
) {
    run_block(simd, block, losses, grad, scratch);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn run_block_avx512(
    simd: Simd,
    block: &Block<'_>,
    losses: &mut [f32],
    grad: Option<GradRows<'_>>,
    scratch: &mut Scratch,
) {
    run_block(simd, block, losses, grad, scratch);
}

#[inline(always)]
fn run_block(simd: Simd, block: &Block<'_>, losses: &mut [f32], mut grad: Option<GradRows<'_>>, scratch: &mut Scratch) {
    let classes = block.classes;
    let write_grad = grad.is_some();
    for (row, loss) in losses.iter_mut().enumerate() {
        let span = row * classes..(row + 1) * classes;
        let weight = block.weights.map_or(1.0, |weights| weights[row]);
        let label = block.labels.map(|labels| labels[row]);
        let Scratch {
            teacher_exp,
            student_term,
            student_exp,
            hard_exp,
            student_row,
            teacher_row,
        } = scratch;
        let student: &[f32] = match (block.student, grad.as_ref()) {
            (Some(student), _) => student.row(span.clone(), student_row, simd),
            (None, Some(GradRows::F32(rows))) => {
                student_row.copy_from_slice(&rows[span.clone()]);
                student_row
            }
            (None, Some(GradRows::F16(rows))) => {
                simd.widen_f16(&rows[span.clone()], student_row);
                student_row
            }
            (None, Some(GradRows::Bf16(rows))) => {
                widen_bf16(&rows[span.clone()], student_row);
                student_row
            }
            (None, None) => unreachable!("an in-place student has its rows"),
        };
        let teacher = block.teacher.row(span.clone(), teacher_row, simd);
        // Not a closure: a closure is compiled on its own, without the SIMD features of the
        // `run_block_*` copy it is called from.
        macro_rules! row_loss {
            ($student_exp:expr) => {
                fused_row(
                    block.spec,
                    student,
                    teacher,
                    label,
                    weight,
                    RowBuffers {
                        student_exp: $student_exp,
                        teacher_exp: &mut *teacher_exp,
                        student_term: &mut *student_term,
                        hard_exp: &mut *hard_exp,
                    },
                    write_grad,
                )
            };
        }
        *loss = match grad.as_mut() {
            Some(GradRows::F32(grad)) => row_loss!(&mut grad[span]),
            Some(GradRows::F16(grad)) => {
                let loss = row_loss!(&mut *student_exp);
                simd.narrow_f16(student_exp, &mut grad[span]);
                loss
            }
            Some(GradRows::Bf16(grad)) => {
                let loss = row_loss!(&mut *student_exp);
                narrow_bf16(student_exp, &mut grad[span]);
                loss
            }
            None => row_loss!(&mut *student_exp),
        };
        if loss.is_nan()
            && let Some(report) = block.report
        {
            report.fetch_or(classify(student, teacher), Ordering::Relaxed);
        }
    }
}

struct RowBuffers<'a> {
    /// Receives `exp((s − max s)/T)`, then the gradient when it is written.
    student_exp: &'a mut [f32],
    teacher_exp: &'a mut [f32],
    student_term: &'a mut [f64],
    hard_exp: &'a mut [f32],
}

/// One row: returns its loss and, when `write_grad`, leaves `weight · ∂loss/∂s` in
/// `buffers.student_exp`.
#[inline(always)]
fn fused_row(
    spec: &RowSpec,
    student: &[f32],
    teacher: &[f32],
    label: Option<i64>,
    weight: f32,
    buffers: RowBuffers<'_>,
    write_grad: bool,
) -> f32 {
    let RowBuffers {
        student_exp,
        teacher_exp,
        student_term,
        hard_exp,
    } = buffers;
    let classes = student.len();
    // A masked row is still looked at for NaN and +inf, as the composed path's checks do.
    let (student_max, teacher_max, bad) = maxima(student, teacher);
    if bad || weight == 0.0 {
        if write_grad {
            student_exp.fill(0.0);
        }
        return if bad { f32::NAN } else { 0.0 };
    }
    // Logits are divided by T (not multiplied by 1/T) and the maximum is subtracted before the
    // log-sum, in the composed path's order: at logits of 1e4 a rounded `max/T + log Σ` would
    // swallow the log-sum.
    let temperature = spec.temperature;
    let divide = divides(temperature);
    let forward = matches!(spec.divergence, Divergence::ForwardKl | Divergence::SoftCrossEntropy);
    let cross_entropy = spec.divergence == Divergence::SoftCrossEntropy;
    // Forward KL's `Σ e_p d` is summed while the teacher's exponentials are written.
    let (student_sum, (teacher_sum, teacher_weighted)) = match (divide, forward, cross_entropy) {
        (true, true, false) => (
            exp_into::<true>(student, student_max, temperature, student_exp),
            teacher_exp_kl::<true, false>(student, teacher, teacher_max, temperature, teacher_exp),
        ),
        (true, true, true) => (
            exp_into::<true>(student, student_max, temperature, student_exp),
            teacher_exp_kl::<true, true>(student, teacher, teacher_max, temperature, teacher_exp),
        ),
        (false, true, false) => (
            exp_into::<false>(student, student_max, temperature, student_exp),
            teacher_exp_kl::<false, false>(student, teacher, teacher_max, temperature, teacher_exp),
        ),
        (false, true, true) => (
            exp_into::<false>(student, student_max, temperature, student_exp),
            teacher_exp_kl::<false, true>(student, teacher, teacher_max, temperature, teacher_exp),
        ),
        (true, false, _) => (
            exp_into::<true>(student, student_max, temperature, student_exp),
            (exp_into::<true>(teacher, teacher_max, temperature, teacher_exp), 0.0),
        ),
        (false, false, _) => (
            exp_into::<false>(student, student_max, temperature, student_exp),
            (exp_into::<false>(teacher, teacher_max, temperature, teacher_exp), 0.0),
        ),
    };
    let logs = LogShifts {
        temperature,
        student_offset: student_max / temperature,
        teacher_offset: teacher_max / temperature,
        student_log_sum: student_sum.ln(),
        teacher_log_sum: teacher_sum.ln(),
        inv_student_sum: (1.0 / student_sum) as f32,
        inv_teacher_sum: (1.0 / teacher_sum) as f32,
    };
    let inv_t = 1.0 / temperature;

    // The hard term needs softmax(s) at T = 1: the same exponentials when T = 1.
    let hard = if spec.hard_weight > 0.0 {
        let label = label.expect("a hard term needs labels") as usize;
        // exp(s − max s), kept for the gradient: the student's own exponentials at T = 1.
        let hard_sum = if spec.temperature == 1.0 {
            hard_exp.copy_from_slice(student_exp);
            student_sum
        } else if let Some(sum) = powers_into(student_exp, spec.temperature, hard_exp) {
            sum
        } else {
            exp_into::<false>(student, student_max, 1.0, hard_exp)
        };
        let log_sum = hard_sum.ln() as f32;
        let mut cross_entropy = -(1.0 - spec.label_smoothing) * ((student[label] - student_max) - log_sum);
        if spec.label_smoothing > 0.0 {
            let log_prob_sum = sum_f64(student) - classes as f64 * (student_max as f64 + log_sum as f64);
            cross_entropy -= (spec.label_smoothing as f64 / classes as f64 * log_prob_sum) as f32;
        }
        Some(Hard {
            label,
            inv_sum: (1.0 / hard_sum) as f32,
            cross_entropy,
        })
    } else {
        None
    };

    let soft_scale = weight * spec.soft_weight * inv_t;
    // The forward-KL gradient loop below also writes the hard term's gradient.
    let divergence = match spec.divergence {
        Divergence::ForwardKl | Divergence::SoftCrossEntropy => {
            let value = forward_kl_from_sums(teacher_sum, teacher_weighted, &logs, cross_entropy);
            if write_grad {
                // ∂/∂s_j = (q_j − p_j) / T, and the hard term's (q1_j − ε/V) in the same
                // loop when there is one.
                let (inv_q, inv_p) = (logs.inv_student_sum, logs.inv_teacher_sum);
                match &hard {
                    Some(hard) => {
                        let (scale, smooth, inv_hard) = hard_scale(spec, weight, classes, hard);
                        let rows = student_exp.iter_mut().zip(teacher_exp.iter().zip(hard_exp.iter()));
                        for (out, (&e_p, &e_hard)) in rows {
                            *out = soft_scale * (*out * inv_q - e_p * inv_p) + scale * (e_hard * inv_hard - smooth);
                        }
                    }
                    None => {
                        for (out, &e_p) in student_exp.iter_mut().zip(teacher_exp.iter()) {
                            *out = soft_scale * (*out * inv_q - e_p * inv_p);
                        }
                    }
                }
            }
            value
        }
        _ => {
            // Every other divergence: ∂/∂s_j = (q_j g_j − q_j Σ_k q_k g_k) / T, g = ∂D/∂q;
            // `student_term` holds q_j g_j.
            let value = term_pass(
                spec.divergence,
                student,
                teacher,
                student_exp,
                teacher_exp,
                student_term,
                &logs,
            );
            if write_grad {
                // The centre Σ q g is summed from the very terms it is subtracted from, and Σ q
                // (1 only to f32 rounding) divides it: each gradient row then sums to zero even
                // when one class holds all the mass.
                let mass = sum_f64(student_exp) * logs.inv_student_sum as f64;
                let centre = lane_sum_f64(student_term) / mass;
                // In f64: at β near 1 or small T the two sides nearly cancel.
                for (out, &term) in student_exp.iter_mut().zip(student_term.iter()) {
                    let q = (*out * logs.inv_student_sum) as f64;
                    *out = soft_scale * (term - q * centre) as f32;
                }
            }
            value
        }
    };

    let mut loss = spec.soft_weight as f64 * divergence;
    if let Some(hard) = hard {
        loss += spec.hard_weight as f64 * hard.cross_entropy as f64;
        if write_grad {
            let (scale, smooth, inv_hard) = hard_scale(spec, weight, classes, &hard);
            if !forward {
                for (out, &e) in student_exp.iter_mut().zip(hard_exp.iter()) {
                    *out += scale * (e * inv_hard - smooth);
                }
            }
            student_exp[hard.label] -= scale * (1.0 - spec.label_smoothing);
        }
    }
    loss as f32
}

/// The hard term's gradient factors: `(weight · α, ε / V, 1 / Σ exp(s − max))`.
#[inline(always)]
fn hard_scale(spec: &RowSpec, weight: f32, classes: usize, hard: &Hard) -> (f32, f32, f32) {
    (
        weight * spec.hard_weight,
        spec.label_smoothing / classes as f32,
        hard.inv_sum,
    )
}

struct Hard {
    label: usize,
    inv_sum: f32,
    cross_entropy: f32,
}

/// `log q_j = (s_j / T − student_offset) − student_log_sum`, likewise for `p`.
struct LogShifts {
    temperature: f32,
    student_offset: f32,
    teacher_offset: f32,
    student_log_sum: f64,
    teacher_log_sum: f64,
    inv_student_sum: f32,
    inv_teacher_sum: f32,
}

impl LogShifts {
    /// `log p − log q` in f64, from the same rounded arguments `x/T − max/T` the exponentials
    /// were taken of: the log-ratios then agree with the probabilities they come with (at
    /// T = 0.05 a rounding of `s/T` is 4e-6, far above what the gradient tolerates if `q` and
    /// `log q` disagree by it).
    #[inline(always)]
    fn log_ratio(&self, s: f32, t: f32) -> f64 {
        let log_q = (s / self.temperature - self.student_offset) as f64 - self.student_log_sum;
        let log_p = (t / self.temperature - self.teacher_offset) as f64 - self.teacher_log_sum;
        log_p - log_q
    }

    /// The same shifts in f32, for the element-wise loops that vectorise.
    #[inline(always)]
    fn f32_shifts(&self) -> F32Shifts {
        F32Shifts {
            temperature: self.temperature,
            student: self.student_offset + self.student_log_sum as f32,
            teacher: self.teacher_offset + self.teacher_log_sum as f32,
        }
    }
}

/// [`LogShifts`] in f32: `log q_j = s_j / T − student`, likewise for `p`.
struct F32Shifts {
    temperature: f32,
    student: f32,
    teacher: f32,
}

impl F32Shifts {
    /// `log p − log q`.
    #[inline(always)]
    fn log_ratio(&self, s: f32, t: f32) -> f32 {
        (t / self.temperature - self.teacher) - (s / self.temperature - self.student)
    }
}

/// `(e^x, e^x − 1)`: the second without the cancellation of `e^x − 1` near 0 (a series
/// there); `+inf` above 88.
#[inline(always)]
fn exp_and_m1_f32(x: f32) -> (f32, f32) {
    let exp = if x > 88.0 { f32::INFINITY } else { fast_exp(x) };
    let mut series = 1.0 + x * (1.0 / 9.0);
    series = 1.0 + x * (1.0 / 8.0) * series;
    series = 1.0 + x * (1.0 / 7.0) * series;
    series = 1.0 + x * (1.0 / 6.0) * series;
    series = 1.0 + x * (1.0 / 5.0) * series;
    series = 1.0 + x * (1.0 / 4.0) * series;
    series = 1.0 + x * (1.0 / 3.0) * series;
    series = 1.0 + x * (1.0 / 2.0) * series;
    (exp, if x.abs() < 0.5 { x * series } else { exp - 1.0 })
}

/// `ln(1 + x)` for `x > −1`: near 0 (`x` in `[−0.5, 1]`) `2 atanh(z)`, `z = x / (2 + x)`, as a
/// series, where `ln` of the rounded `1 + x` would lose the small result.
#[inline(always)]
fn ln_1p_f32(x: f32) -> f32 {
    let z = x / (2.0 + x);
    let z2 = z * z;
    let mut series = 1.0 / 17.0;
    series = series * z2 + 1.0 / 15.0;
    series = series * z2 + 1.0 / 13.0;
    series = series * z2 + 1.0 / 11.0;
    series = series * z2 + 1.0 / 9.0;
    series = series * z2 + 1.0 / 7.0;
    series = series * z2 + 1.0 / 5.0;
    series = series * z2 + 1.0 / 3.0;
    series = series * z2 + 1.0;
    let direct = fast_ln(1.0 + x);
    if (-0.5..=1.0).contains(&x) {
        2.0 * z * series
    } else {
        direct
    }
}

/// `(x, ln(rest + w e^r))`, `rest = 1 − w`, from `(e^r, e^r − 1)`: the log is `ln(1 + x)`,
/// `x = w (e^r − 1)`, or where `x` nears −1 the log of the sum of the two positive terms,
/// which does not cancel.
#[inline(always)]
fn ln_mix_f32(w: f32, rest: f32, (exp, exp_m1): (f32, f32)) -> (f32, f32) {
    let x = w * exp_m1;
    (
        x,
        if x < -0.5 {
            fast_ln(rest + w * exp)
        } else {
            ln_1p_f32(x)
        },
    )
}

/// [`mixture_element`] in f32 from [`ln_mix_f32`]'s `(x, ln(1 + x))`: `a (x − ln(1 + x))`, or
/// `w b` where `a = 0`.
#[inline(always)]
fn mixture_f32(a: f32, b: f32, w: f32, (x, ln): (f32, f32)) -> f32 {
    let mut series = 0.1;
    series = series * x - 1.0 / 9.0;
    series = series * x + 1.0 / 8.0;
    series = series * x - 1.0 / 7.0;
    series = series * x + 1.0 / 6.0;
    series = series * x - 1.0 / 5.0;
    series = series * x + 1.0 / 4.0;
    series = series * x - 1.0 / 3.0;
    series = series * x + 1.0 / 2.0;
    let g = if x.abs() < 0.15 { series * x * x } else { x - ln };
    if a > 0.0 { a * g } else { w * b }
}

/// `ln x` for positive normal `x` and `+inf` (Cephes `logf`: `e ln 2 + ln m`, `m` in
/// `[√½, √2)`, a polynomial in `m − 1`), in arithmetic LLVM vectorises; about 1 ulp.
#[inline(always)]
pub(crate) fn fast_ln(x: f32) -> f32 {
    let bits = x.to_bits();
    // x = m 2^e with m in [0.5, 1).
    let e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    let e = if small { e - 1 } else { e } as f32;
    let m = if small { m + m - 1.0 } else { m - 1.0 };
    let z = m * m;
    let mut y = 7.037_683_6e-2f32;
    y = y * m - 1.151_461e-1;
    y = y * m + 1.167_699_9e-1;
    y = y * m - 1.242_014_1e-1;
    y = y * m + 1.424_932_3e-1;
    y = y * m - 1.666_805_8e-1;
    y = y * m + 2.000_071_5e-1;
    y = y * m - 2.499_999_4e-1;
    y = y * m + 3.333_333e-1;
    y = y * m * z;
    y += -2.121_944_4e-4 * e;
    y += -0.5 * z;
    let ln = m + y + 0.693_359_4 * e;
    if x == f32::INFINITY { x } else { ln }
}

/// Row maxima of both inputs, and whether the row is unusable: NaN anywhere, a `+inf`, or no
/// finite value. NaN is found through a sum (NaN-propagating; `-inf` only makes it `-inf`),
/// which costs nothing in this memory-bound sweep.
#[inline(always)]
fn maxima(student: &[f32], teacher: &[f32]) -> (f32, f32, bool) {
    let (max_s, sum_s) = max_and_sum(student);
    let (max_t, sum_t) = max_and_sum(teacher);
    (
        max_s,
        max_t,
        (sum_s + sum_t).is_nan() || !max_s.is_finite() || !max_t.is_finite(),
    )
}

/// `(max, Σ)` of one row, in [`LANES`] independent lanes: one slice at a time, so that the
/// loop is plain vector loads, `max` and `add` (both rows in one loop were packed lane by
/// lane, two floats per load).
#[inline(always)]
fn max_and_sum(values: &[f32]) -> (f32, f32) {
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut sum = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        let chunk: &[f32; LANES] = chunk.try_into().unwrap();
        for lane in 0..LANES {
            max[lane] = if chunk[lane] > max[lane] {
                chunk[lane]
            } else {
                max[lane]
            };
            sum[lane] += chunk[lane];
        }
    }
    let (mut m, mut total) = (f32::NEG_INFINITY, 0.0f32);
    for &x in tail {
        m = if x > m { x } else { m };
        total += x;
    }
    for lane in 0..LANES {
        m = m.max(max[lane]);
        total += sum[lane];
    }
    (m, total)
}

/// Whether `x / T` is a division: 1/T is exact for a power of two (a zero mantissa), and a
/// multiplication by it then gives the same result.
#[inline(always)]
fn divides(temperature: f32) -> bool {
    temperature.to_bits() & 0x007f_ffff != 0
}

/// `x / T`, as a multiplication when `1/T` is exact (T a power of two: the same bits), as a
/// division otherwise (to match the composed path, which divides).
#[inline(always)]
fn scale<const DIVIDE: bool>(x: f32, temperature: f32, inverse: f32) -> f32 {
    if DIVIDE { x / temperature } else { x * inverse }
}

/// Elements per block of the f32 partial sums that are then added in f64: short enough that
/// the f32 sums do not drift (an f32 sum of 32k terms drifts by 1e-5), long enough to vectorise.
const BLOCK: usize = 512;

/// `Σ values` in f32 lanes per block, blocks added in f64.
#[inline(always)]
fn sum_f64(values: &[f32]) -> f64 {
    values.chunks(BLOCK).map(|block| lane_sum(block) as f64).sum()
}

/// Writes `exp(x / T − max / T)` into `out` and returns its sum.
#[inline(always)]
fn exp_into<const DIVIDE: bool>(values: &[f32], max: f32, temperature: f32, out: &mut [f32]) -> f64 {
    let inverse = 1.0 / temperature;
    let offset = max / temperature;
    let mut total = 0.0f64;
    // Each block is summed while it is still in L1.
    for (out, values) in out.chunks_mut(BLOCK).zip(values.chunks(BLOCK)) {
        for (o, &x) in out.iter_mut().zip(values) {
            *o = fast_exp(scale::<DIVIDE>(x, temperature, inverse) - offset);
        }
        total += lane_sum(out) as f64;
    }
    total
}

/// Writes the teacher's `e_j = exp(t_j / T − max / T)` into `out`; returns `(Σ e, Σ e d)`,
/// `d = (t − s)/T` (forward KL) or `−s/T` (soft cross-entropy), elements with `e = 0` counting
/// 0. Both sums are taken block by block while the block is in L1: forward KL costs no pass of
/// its own.
#[inline(always)]
fn teacher_exp_kl<const DIVIDE: bool, const CROSS_ENTROPY: bool>(
    student: &[f32],
    teacher: &[f32],
    max: f32,
    temperature: f32,
    out: &mut [f32],
) -> (f64, f64) {
    let inverse = 1.0 / temperature;
    let offset = max / temperature;
    let (mut total, mut weighted) = (0.0f64, 0.0f64);
    let mut products = [0.0f32; BLOCK];
    let blocks = out
        .chunks_mut(BLOCK)
        .zip(teacher.chunks(BLOCK).zip(student.chunks(BLOCK)));
    for (out, (teacher, student)) in blocks {
        let n = out.len();
        let rows = out.iter_mut().zip(products[..n].iter_mut());
        for ((o, pd), (&t, &s)) in rows.zip(teacher.iter().zip(student)) {
            let e = fast_exp(scale::<DIVIDE>(t, temperature, inverse) - offset);
            let d = if CROSS_ENTROPY {
                -scale::<DIVIDE>(s, temperature, inverse)
            } else {
                scale::<DIVIDE>(t - s, temperature, inverse)
            };
            *o = e;
            *pd = if e > 0.0 { e * d } else { 0.0 };
        }
        total += lane_sum(out) as f64;
        weighted += lane_sum(&products[..n]) as f64;
    }
    (total, weighted)
}

/// `out = e^T` for the small integer temperatures 2, 3 and 4 (`e = exp((s − max)/T)`, so
/// `out = exp(s − max)`, the hard term's exponentials, by multiplications instead of an `exp`
/// each); returns their sum, or `None` for any other `T`.
#[inline(always)]
fn powers_into(exps: &[f32], temperature: f32, out: &mut [f32]) -> Option<f64> {
    let power = match temperature {
        2.0 => 2,
        3.0 => 3,
        4.0 => 4,
        _ => return None,
    };
    let mut total = 0.0f64;
    for (out, exps) in out.chunks_mut(BLOCK).zip(exps.chunks(BLOCK)) {
        for (o, &e) in out.iter_mut().zip(exps) {
            let square = e * e;
            *o = match power {
                2 => square,
                3 => square * e,
                _ => square * square,
            };
        }
        total += lane_sum(out) as f64;
    }
    Some(total)
}

/// Forward KL (or soft cross-entropy) from the teacher's sums: `Σ p d − c Σ p` with `p = e /
/// Σ e` and the row constants gathered in `c` in f64. The per-element log-probabilities are
/// never rounded on their own, which keeps small divergences (high `T`) accurate.
#[inline(always)]
fn forward_kl_from_sums(teacher_sum: f64, teacher_weighted: f64, logs: &LogShifts, cross_entropy: bool) -> f64 {
    let student_norm = logs.student_offset as f64 + logs.student_log_sum;
    let teacher_norm = logs.teacher_offset as f64 + logs.teacher_log_sum;
    let constant = if cross_entropy {
        -student_norm
    } else {
        teacher_norm - student_norm
    };
    teacher_weighted / teacher_sum - constant
}

/// `(Σ e, Σ e d)` from the teacher's exponentials `e` already written, as
/// [`teacher_exp_kl`] sums them (block by block, the same operations): GJSD at β = 0 then
/// equals forward KL to the bit.
#[inline(always)]
fn exp_kl_sums<const DIVIDE: bool>(
    student: &[f32],
    teacher: &[f32],
    teacher_exp: &[f32],
    temperature: f32,
) -> (f64, f64) {
    let inverse = 1.0 / temperature;
    let (mut total, mut weighted) = (0.0f64, 0.0f64);
    let mut products = [0.0f32; BLOCK];
    let blocks = teacher_exp
        .chunks(BLOCK)
        .zip(teacher.chunks(BLOCK).zip(student.chunks(BLOCK)));
    for (exps, (teacher, student)) in blocks {
        let n = exps.len();
        for ((pd, &e), (&t, &s)) in products[..n].iter_mut().zip(exps).zip(teacher.iter().zip(student)) {
            let d = scale::<DIVIDE>(t - s, temperature, inverse);
            *pd = if e > 0.0 { e * d } else { 0.0 };
        }
        total += lane_sum(exps) as f64;
        weighted += lane_sum(&products[..n]) as f64;
    }
    (total, weighted)
}

/// `Σ values` in four f64 partial sums (one AVX2 register).
#[inline(always)]
fn lane_sum_f64(values: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = values.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().sum();
    for chunk in chunks {
        let chunk: &[f64; 4] = chunk.try_into().unwrap();
        for lane in 0..4 {
            acc[lane] += chunk[lane];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `Σ values` in f32, [`LANES`] partial sums (for at most a [`BLOCK`] of values).
#[inline(always)]
fn lane_sum(values: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        let chunk: &[f32; LANES] = chunk.try_into().unwrap();
        for lane in 0..LANES {
            acc[lane] += chunk[lane];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Fills `terms` with `q_j ∂D/∂q_j` and returns `D`, for the divergences other than forward KL.
// Four parallel rows (student, teacher, both exponentials) and `terms` share one index.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn term_pass(
    divergence: Divergence,
    student: &[f32],
    teacher: &[f32],
    student_exp: &[f32],
    teacher_exp: &[f32],
    terms: &mut [f64],
    logs: &LogShifts,
) -> f64 {
    // log p_j − log q_j in f64: at small T these log-ratios are large, and rounding them to
    // f32 would show in the gradient.
    let log_ratio = |j: usize| logs.log_ratio(student[j], teacher[j]);
    let q = |j: usize| student_exp[j] * logs.inv_student_sum;
    let p = |j: usize| teacher_exp[j] * logs.inv_teacher_sum;
    match divergence {
        Divergence::ReverseKl => {
            // q g = q (log q − log p) (+ q, which cancels), Σ q g = KL(q ‖ p). An element-wise
            // loop, then one sum: both vectorise.
            let rows = student.iter().zip(teacher).zip(student_exp.iter().zip(teacher_exp));
            for (term, ((&s, &t), (&e_q, _))) in terms.iter_mut().zip(rows) {
                let q = e_q * logs.inv_student_sum;
                *term = if q > 0.0 { q as f64 * -logs.log_ratio(s, t) } else { 0.0 };
            }
            lane_sum_f64(terms)
        }
        Divergence::SymmetricKl => {
            // Reverse KL's terms (as above) plus forward KL's gradient q − p, which has no
            // centre; the value adds forward KL.
            let mut reverse = [0.0f64; LANES];
            let mut forward = [0.0f64; LANES];
            for j in 0..student.len() {
                let (qj, pj) = (q(j), p(j));
                let ratio = -log_ratio(j);
                let rev = if qj > 0.0 { qj as f64 * ratio } else { 0.0 };
                let fwd = if pj > 0.0 { -pj as f64 * ratio } else { 0.0 };
                reverse[j % LANES] += rev;
                forward[j % LANES] += fwd;
                terms[j] = rev + (qj - pj) as f64;
            }
            reverse.iter().sum::<f64>() + forward.iter().sum::<f64>()
        }
        Divergence::TotalVariation => {
            // Element-wise into `terms` and a stack row of ½ |p − q| per block, then sums.
            let mut halves = [0.0f32; BLOCK];
            let mut value = 0.0f64;
            let blocks = terms
                .chunks_mut(BLOCK)
                .zip(student_exp.chunks(BLOCK).zip(teacher_exp.chunks(BLOCK)));
            for (terms, (e_q, e_p)) in blocks {
                let n = terms.len();
                for ((term, half), (&e_q, &e_p)) in terms.iter_mut().zip(&mut halves[..n]).zip(e_q.iter().zip(e_p)) {
                    let (q, p) = (e_q * logs.inv_student_sum, e_p * logs.inv_teacher_sum);
                    let half_sign = if q > p {
                        0.5
                    } else if q < p {
                        -0.5
                    } else {
                        0.0
                    };
                    *half = 0.5 * (p - q).abs();
                    *term = (half_sign * q) as f64;
                }
                value += lane_sum(&halves[..n]) as f64;
            }
            value
        }
        Divergence::GeneralizedJsd { beta } => {
            if beta == 0.0 || beta == 1.0 {
                let end = if beta == 0.0 {
                    Divergence::ForwardKl
                } else {
                    Divergence::ReverseKl
                };
                return end_point(end, student, teacher, student_exp, teacher_exp, terms, logs);
            }
            // D = KL(p ‖ m)/(1 − β) + KL(q ‖ m)/β, m = β p + (1 − β) q; q g = −q log(m/q)/β.
            // In f32 with vectorisable `exp` / `ln` (the GPU kernel's arithmetic): element-wise
            // into `terms` and a stack row of values per block, then sums.
            let (mix, rest) = (beta as f32, (1.0 - beta) as f32);
            let (inv_mix, inv_rest) = ((1.0 / beta) as f32, (1.0 / (1.0 - beta)) as f32);
            let shifts = logs.f32_shifts();
            let (inv_q, inv_p) = (logs.inv_student_sum, logs.inv_teacher_sum);
            let mut values = [0.0f32; BLOCK];
            let mut terms32 = [0.0f32; BLOCK];
            let mut value = 0.0f64;
            for (index, terms) in terms.chunks_mut(BLOCK).enumerate() {
                let n = terms.len();
                let span = index * BLOCK..index * BLOCK + n;
                let (s, t) = (&student[span.clone()], &teacher[span.clone()]);
                let (e_q, e_p) = (&student_exp[span.clone()], &teacher_exp[span]);
                let (values, terms32) = (&mut values[..n], &mut terms32[..n]);
                for j in 0..n {
                    let (q, p) = (e_q[j] * inv_q, e_p[j] * inv_p);
                    let ratio = shifts.log_ratio(s[j], t[j]);
                    // ln(m/p) and ln(m/q), each through the ratio of the other side.
                    let teacher_side = ln_mix_f32(rest, mix, exp_and_m1_f32(-ratio));
                    let student_side = ln_mix_f32(mix, rest, exp_and_m1_f32(ratio));
                    values[j] = mixture_f32(p, q, rest, teacher_side) * inv_rest
                        + mixture_f32(q, p, mix, student_side) * inv_mix;
                    terms32[j] = if q > 0.0 { -q * student_side.1 * inv_mix } else { 0.0 };
                }
                for (term, &term32) in terms.iter_mut().zip(terms32.iter()) {
                    *term = term32 as f64;
                }
                value += lane_sum(values) as f64;
            }
            value
        }
        Divergence::SkewKl { alpha } => {
            if alpha == 1.0 {
                terms.fill(0.0);
                return 0.0;
            }
            // D = KL(p ‖ m), m = α p + (1 − α) q; q g = −(1 − α) p q / m.
            let mut value = 0.0f64;
            for j in 0..student.len() {
                let (qj, pj) = (q(j) as f64, p(j) as f64);
                value += mixture_element(pj, qj, 1.0 - alpha, -log_ratio(j));
                let mix = alpha * pj + (1.0 - alpha) * qj;
                let term = if mix > 0.0 { -(1.0 - alpha) * pj * qj / mix } else { 0.0 };
                terms[j] = term;
            }
            value
        }
        Divergence::SkewReverseKl { alpha } => {
            if alpha == 1.0 {
                terms.fill(0.0);
                return 0.0;
            }
            // D = KL(q ‖ m), m = (1 − α) p + α q; q g = q (log(q/m) − α q/m) (+ q, cancels).
            let mut value = 0.0f64;
            for j in 0..student.len() {
                let (qj, pj) = (q(j) as f64, p(j) as f64);
                let ratio = log_ratio(j);
                value += mixture_element(qj, pj, 1.0 - alpha, ratio);
                let term = if qj > 0.0 {
                    let x = (1.0 - alpha) * ratio.exp_m1();
                    let mix = (1.0 - alpha) * pj + alpha * qj;
                    qj * (-x.ln_1p() - alpha * qj / mix)
                } else {
                    0.0
                };
                terms[j] = term;
            }
            value
        }
        Divergence::ForwardKl | Divergence::SoftCrossEntropy => {
            end_point(divergence, student, teacher, student_exp, teacher_exp, terms, logs)
        }
    }
}

/// An end of GJSD: forward KL written as terms (`q g = q − p`, whose centre is 0), or reverse KL.
#[inline(always)]
fn end_point(
    divergence: Divergence,
    student: &[f32],
    teacher: &[f32],
    student_exp: &[f32],
    teacher_exp: &[f32],
    terms: &mut [f64],
    logs: &LogShifts,
) -> f64 {
    if divergence == Divergence::ReverseKl {
        return term_pass(divergence, student, teacher, student_exp, teacher_exp, terms, logs);
    }
    for (j, term) in terms.iter_mut().enumerate() {
        *term = (student_exp[j] * logs.inv_student_sum - teacher_exp[j] * logs.inv_teacher_sum) as f64;
    }
    let (sum, weighted) = if divides(logs.temperature) {
        exp_kl_sums::<true>(student, teacher, teacher_exp, logs.temperature)
    } else {
        exp_kl_sums::<false>(student, teacher, teacher_exp, logs.temperature)
    };
    forward_kl_from_sums(sum, weighted, logs, false)
}

/// One element of `KL(a ‖ (1 − w) a + w b)`, written as `a · g(x)`, `x = w (b/a − 1)`,
/// `g(x) = x − log(1 + x) ≥ 0` (no cancellation; the `w Σ (b − a)` this adds is zero over a
/// row), or `w b` where `a = 0`. `log_ratio = log b − log a`.
#[inline(always)]
fn mixture_element(a: f64, b: f64, w: f64, log_ratio: f64) -> f64 {
    if a > 0.0 {
        a * x_minus_log1p(w * log_ratio.exp_m1())
    } else {
        w * b
    }
}

/// `x − log(1 + x) ≥ 0`, by its series near 0 where the difference cancels.
fn x_minus_log1p(x: f64) -> f64 {
    if x.abs() < 0.15 {
        let mut acc = 0.0;
        for k in (2..=14).rev() {
            acc = acc * x + if k % 2 == 0 { 1.0 } else { -1.0 } / k as f64;
        }
        acc * x * x
    } else {
        x - x.ln_1p()
    }
}

/// `e^x` for `x ≤ 88` to about 1 ulp, in arithmetic LLVM vectorises (Cephes `expf`:
/// `2^n · P(r)`); 0 below the normal range and for `-inf`. NaN is not propagated (it becomes
/// 0): callers find NaN inputs separately.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2^23 rounds to an integer n and leaves n in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: u32 = 0x4b40_0000;
    let clamped = if x > -87.0 { x } else { -87.0 };
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut poly = 1.987_569_1e-4f32;
    poly = poly * r + 1.398_199_9e-3;
    poly = poly * r + 8.333_452e-3;
    poly = poly * r + 4.166_579_6e-2;
    poly = poly * r + 0.166_666_65;
    poly = poly * r + 0.5;
    let mantissa = poly * r * r + r + 1.0;
    // 2^n from the bits of `shifted` (n + 127 ≥ 1 since n ≥ -126): no float-to-int conversion.
    let scale = f32::from_bits(shifted.to_bits().wrapping_sub(ROUND_BITS).wrapping_add(127) << 23);
    if x > -87.0 { mantissa * scale } else { 0.0 }
}

/// The two ceilings of the host kernel on this machine, for a call over `positions ×
/// classes` f32 logits: what its exponentials alone cost, and what its memory traffic alone
/// costs. Each is measured on every core, the way the kernel runs.
#[derive(Debug, Clone, Copy)]
pub struct KernelBounds {
    /// Seconds for the call's exponential passes alone (two per element: student and
    /// teacher), each row's input and output held in cache, as the kernel holds them.
    pub exp_seconds: f64,
    /// Exponentials per second on every core.
    pub exps_per_second: f64,
    /// Seconds to read two and write one `[positions, classes]` f32 buffers (12 bytes per
    /// element, the kernel's traffic), pages already mapped.
    pub stream_seconds: f64,
    /// Bytes read and written per second by that stream.
    pub stream_bytes_per_second: f64,
}

/// Measures [`KernelBounds`] for `positions × classes` (best of `repeats` runs each).
pub fn kernel_bounds(positions: usize, classes: usize, repeats: usize) -> KernelBounds {
    use std::time::Instant;
    let simd = Simd::detect();
    let rows_per_task = (MIN_ELEMENTS_PER_TASK / classes).max(1);
    let row: Vec<f32> = (0..classes)
        .map(|j| ((j * 7919) % 8000) as f32 / 1000.0 - 4.0)
        .collect();
    let best = |f: &dyn Fn()| {
        (0..repeats.max(1))
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let tasks = positions.div_ceil(rows_per_task);
    let exp_seconds = best(&|| {
        let sums: f64 = (0..tasks)
            .into_par_iter()
            .map(|task| {
                let rows = rows_per_task.min(positions - task * rows_per_task);
                let layout = ScratchLayout {
                    classes,
                    own_student_row: true,
                    widen_student: false,
                    widen_teacher: false,
                };
                with_scratch(layout, |scratch| simd.exp_rows(&row, rows, scratch))
            })
            .sum();
        std::hint::black_box(sums);
    });
    let elements = positions * classes;
    let mut out = vec![0.0f32; elements];
    let (a, b) = (vec![1.0f32; elements], vec![2.0f32; elements]);
    let stream = |out: &mut [f32]| {
        out.par_chunks_mut(rows_per_task * classes)
            .zip(
                a.par_chunks(rows_per_task * classes)
                    .zip(b.par_chunks(rows_per_task * classes)),
            )
            .for_each(|(out, (a, b))| {
                for (o, (&x, &y)) in out.iter_mut().zip(a.iter().zip(b)) {
                    *o = x - y;
                }
            });
    };
    stream(&mut out); // maps the pages
    let cell = std::sync::Mutex::new(out);
    let stream_seconds = best(&|| stream(&mut cell.lock().expect("not poisoned")));
    KernelBounds {
        exp_seconds,
        exps_per_second: 2.0 * elements as f64 / exp_seconds,
        stream_seconds,
        stream_bytes_per_second: 12.0 * elements as f64 / stream_seconds,
    }
}

impl Simd {
    /// `rows` times, the kernel's two exponential passes over `row` (student and teacher),
    /// into the scratch rows; returns the sums.
    fn exp_rows(self, row: &[f32], rows: usize, scratch: &mut Scratch) -> f64 {
        match self {
            Simd::Baseline => exp_rows(row, rows, scratch),
            // SAFETY: as in `run`.
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Simd::Avx2 => unsafe { exp_rows_avx2(row, rows, scratch) },
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Simd::Avx512 => unsafe { exp_rows_avx512(row, rows, scratch) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn exp_rows_avx2(row: &[f32], rows: usize, scratch: &mut Scratch) -> f64 {
    exp_rows(row, rows, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn exp_rows_avx512(row: &[f32], rows: usize, scratch: &mut Scratch) -> f64 {
    exp_rows(row, rows, scratch)
}

#[inline(always)]
fn exp_rows(row: &[f32], rows: usize, scratch: &mut Scratch) -> f64 {
    let mut total = 0.0;
    for _ in 0..rows {
        total += exp_into::<true>(row, 4.0, 2.0, &mut scratch.student_exp);
        total += exp_into::<true>(row, 4.0, 2.0, &mut scratch.teacher_exp);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_std_to_two_ulp() {
        let mut x = -86.9f32;
        while x < 80.0 {
            let (fast, exact) = (fast_exp(x), (x as f64).exp());
            assert!(
                ((fast as f64 - exact) / exact).abs() < 2.5e-7,
                "exp({x}) = {fast}, expected {exact}"
            );
            x += 0.0137;
        }
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
    }

    #[test]
    fn fast_ln_matches_std_to_two_ulp() {
        let mut x = 1e-30f32;
        while x < 1e30 {
            let (fast, exact) = (fast_ln(x) as f64, (x as f64).ln());
            // Relative where ln x is away from 0; near x = 1 an absolute 2 ulp of m − 1.
            let tolerance = 2.5e-7 * exact.abs().max(((x as f64) - 1.0).abs());
            assert!((fast - exact).abs() <= tolerance, "ln({x}) = {fast}, expected {exact}");
            x *= 1.0137;
        }
        assert_eq!(fast_ln(1.0), 0.0);
        assert_eq!(fast_ln(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn f32_mixture_helpers_match_f64() {
        for &ratio in &[-30.0f32, -3.0, -0.4, -1e-3, 0.0, 1e-4, 0.3, 2.0, 25.0] {
            for &w64 in &[0.5f64, 1e-3, 0.999] {
                // As the kernel gets them: each rounded from the f64 weight on its own.
                let (w, rest) = (w64 as f32, (1.0 - w64) as f32);
                let (rest64, r64) = (1.0 - w64, ratio as f64);
                let exact = (rest64 + w64 * r64.exp()).ln();
                let mix = ln_mix_f32(w, rest, exp_and_m1_f32(ratio));
                let got = mix.1 as f64;
                assert!(
                    (got - exact).abs() <= 1e-6 * exact.abs().max(1e-3),
                    "ln_mix({w}, {ratio}) = {got}, expected {exact}"
                );
                let (a, b) = (0.3f64, 0.3 * r64.exp());
                let exact = mixture_element(a, b, w64, r64);
                let got = mixture_f32(a as f32, b as f32, w, mix) as f64;
                assert!(
                    (got - exact).abs() <= 2e-6 * exact.abs() + 1e-12,
                    "mixture({w}, {ratio}) = {got}, expected {exact}"
                );
            }
        }
    }

    #[test]
    fn series_and_direct_forms_of_x_minus_log1p_meet() {
        for x in [-0.1499999, 0.1499999] {
            let direct = x - f64::ln_1p(x);
            assert!((x_minus_log1p(x) - direct).abs() < 1e-10 * direct.abs());
        }
    }
}
