//! The host kernel of the fused losses: every row of `[positions, classes]` student and
//! teacher logits is read from memory once, and its loss and its gradient w.r.t. the student
//! logits come out of the same visit.
//!
//! Per row: one sweep over memory finds both maxima (and NaN / +inf); the exponentials are
//! then written once into the gradient row (student) and a per-task scratch row (teacher), and
//! every later step reads them from cache. That is the memory traffic of an online softmax
//! (one read of each input, one write of the gradient) with one exponential per element
//! instead of two: an online softmax rescales its running sum, so it has to recompute the
//! exponentials after it. Rows run in parallel on rayon's pool; the inner loops are plain
//! arrays of [`LANES`] that LLVM vectorises, compiled twice (baseline and AVX2 + FMA, picked
//! at run time).

use rayon::prelude::*;

use crate::spec::{Divergence, RowSpec};

/// Lanes of every explicit reduction (8 × f32 = one AVX2 register).
const LANES: usize = 8;
/// Rows per rayon task: enough work per task to amortise scheduling at small vocabularies.
const MIN_ELEMENTS_PER_TASK: usize = 1 << 16;

/// The result of [`fused_rows`].
#[derive(Debug)]
pub(crate) struct RowsOut {
    /// `soft_weight · D + hard_weight · CE` per row; 0 for rows of weight 0, NaN for rows with
    /// NaN or +inf logits or no finite logit.
    pub losses: Vec<f32>,
    /// `weight_i · ∂loss_i/∂student_logits`, `[positions · classes]`, when asked for.
    pub grad: Option<Vec<f32>>,
}

/// Runs the fused loss over `positions = student.len() / classes` rows.
///
/// `labels` (one per row, in `0..classes`) are needed when `spec.hard_weight > 0`. `weights`
/// scale each row's gradient; a row of weight 0 is only checked for bad values (its loss is 0,
/// its gradient 0). `None` means weight 1 everywhere.
pub(crate) fn fused_rows(
    spec: &RowSpec,
    student: &[f32],
    teacher: &[f32],
    classes: usize,
    labels: Option<&[i64]>,
    weights: Option<&[f32]>,
    want_grad: bool,
) -> RowsOut {
    assert!(classes > 0 && student.len() == teacher.len() && student.len().is_multiple_of(classes));
    let positions = student.len() / classes;
    let rows_per_task = (MIN_ELEMENTS_PER_TASK / classes).max(1);
    let mut losses = vec![0.0f32; positions];
    let simd = Simd::detect();
    let task = |index: usize, losses: &mut [f32], grad: Option<&mut [f32]>, scratch: &mut Scratch| {
        let first = index * rows_per_task;
        let block = Block {
            spec,
            student: &student[first * classes..(first + losses.len()) * classes],
            teacher: &teacher[first * classes..(first + losses.len()) * classes],
            classes,
            labels: labels.map(|labels| &labels[first..first + losses.len()]),
            weights: weights.map(|weights| &weights[first..first + losses.len()]),
        };
        simd.run(&block, losses, grad, scratch);
    };
    // Scratch rows live in a thread-local buffer reused across tasks and calls: rayon calls a
    // `for_each_init` initialiser once per split, and fresh 128 KiB rows would each cost page
    // faults.
    let grad = if want_grad {
        let mut grad = vec![0.0f32; student.len()];
        advise_huge_pages(&mut grad);
        losses
            .par_chunks_mut(rows_per_task)
            .zip(grad.par_chunks_mut(rows_per_task * classes))
            .enumerate()
            .for_each(|(index, (losses, grad))| {
                with_scratch(classes, false, |scratch| task(index, losses, Some(grad), scratch))
            });
        Some(grad)
    } else {
        losses
            .par_chunks_mut(rows_per_task)
            .enumerate()
            .for_each(|(index, losses)| with_scratch(classes, true, |scratch| task(index, losses, None, scratch)));
        None
    };
    RowsOut { losses, grad }
}

/// Asks Linux to back `buffer` with transparent huge pages where it is allowed to (`madvise`
/// mode, the common default). A fresh gradient of hundreds of megabytes is otherwise faulted
/// in 4 KiB at a time by the sweep that writes it: 64 000 faults at 2048 × 32000, a quarter of
/// the call. Best effort: nothing changes where the kernel refuses.
fn advise_huge_pages(buffer: &mut [f32]) {
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
    student: &'a [f32],
    teacher: &'a [f32],
    classes: usize,
    labels: Option<&'a [i64]>,
    weights: Option<&'a [f32]>,
}

/// Per-task rows: teacher exponentials, and `q · ∂D/∂q` for the divergences that need it
/// (and the student exponentials when no gradient row is written).
struct Scratch {
    teacher_exp: Vec<f32>,
    student_term: Vec<f64>,
    student_exp: Vec<f32>,
    /// `exp(s − max s)` (the hard term's softmax at T = 1).
    hard_exp: Vec<f32>,
}

impl Scratch {
    fn fit(&mut self, classes: usize, own_student_row: bool) {
        self.teacher_exp.resize(classes, 0.0);
        self.student_term.resize(classes, 0.0);
        self.hard_exp.resize(classes, 0.0);
        self.student_exp.resize(if own_student_row { classes } else { 0 }, 0.0);
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch {
            teacher_exp: Vec::new(),
            student_term: Vec::new(),
            student_exp: Vec::new(),
            hard_exp: Vec::new(),
        })
    };
}

/// Runs `f` with this thread's scratch rows, sized for `classes`.
fn with_scratch<R>(classes: usize, own_student_row: bool, f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.fit(classes, own_student_row);
        f(&mut scratch)
    })
}

/// Which compiled copy of the kernel runs.
#[derive(Clone, Copy)]
enum Simd {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Simd::Avx2;
        }
        Simd::Baseline
    }

    fn run(self, block: &Block<'_>, losses: &mut [f32], grad: Option<&mut [f32]>, scratch: &mut Scratch) {
        match self {
            Simd::Baseline => run_block(block, losses, grad, scratch),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` returned `Avx2` only after checking that this CPU has AVX2 and
            // FMA, the features `run_block_avx2` is compiled for.
            #[allow(unsafe_code)]
            Simd::Avx2 => unsafe { run_block_avx2(block, losses, grad, scratch) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_block_avx2(block: &Block<'_>, losses: &mut [f32], grad: Option<&mut [f32]>, scratch: &mut Scratch) {
    run_block(block, losses, grad, scratch);
}

#[inline(always)]
fn run_block(block: &Block<'_>, losses: &mut [f32], mut grad: Option<&mut [f32]>, scratch: &mut Scratch) {
    let classes = block.classes;
    for (row, loss) in losses.iter_mut().enumerate() {
        let span = row * classes..(row + 1) * classes;
        let weight = block.weights.map_or(1.0, |weights| weights[row]);
        let label = block.labels.map(|labels| labels[row]);
        let Scratch {
            teacher_exp,
            student_term,
            student_exp,
            hard_exp,
        } = scratch;
        let (student_exp, write_grad) = match grad.as_deref_mut() {
            Some(grad) => (&mut grad[span.clone()], true),
            None => (&mut student_exp[..], false),
        };
        *loss = fused_row(
            block.spec,
            &block.student[span.clone()],
            &block.teacher[span],
            label,
            weight,
            RowBuffers {
                student_exp,
                teacher_exp,
                student_term,
                hard_exp,
            },
            write_grad,
        );
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
    // 1/T is exact for a power of two (a zero mantissa): multiply instead of divide.
    let divide = temperature.to_bits() & 0x007f_ffff != 0;
    let (student_sum, teacher_sum) = if divide {
        (
            exp_into::<true>(student, student_max, temperature, student_exp),
            exp_into::<true>(teacher, teacher_max, temperature, teacher_exp),
        )
    } else {
        (
            exp_into::<false>(student, student_max, temperature, student_exp),
            exp_into::<false>(teacher, teacher_max, temperature, teacher_exp),
        )
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
    let forward = matches!(spec.divergence, Divergence::ForwardKl | Divergence::SoftCrossEntropy);
    let divergence = match spec.divergence {
        Divergence::ForwardKl | Divergence::SoftCrossEntropy => {
            let value = if divide {
                forward_kl_value::<true>(student, teacher, teacher_exp, &logs, spec.divergence)
            } else {
                forward_kl_value::<false>(student, teacher, teacher_exp, &logs, spec.divergence)
            };
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
    for (o, &x) in out.iter_mut().zip(values) {
        *o = fast_exp(scale::<DIVIDE>(x, temperature, inverse) - offset);
    }
    sum_f64(out)
}

/// `Σ p (log p − log q)` (forward KL) or `−Σ p log q` (soft cross-entropy); elements with
/// `p = 0` count 0. Written as `Σ p d − c Σ p` with `d = (t − s)/T` (or `−s/T`) and the row
/// constants gathered in `c` in f64: the per-element log-probabilities are never rounded on
/// their own, which keeps small divergences (high `T`) accurate.
#[inline(always)]
fn forward_kl_value<const DIVIDE: bool>(
    student: &[f32],
    teacher: &[f32],
    teacher_exp: &[f32],
    logs: &LogShifts,
    divergence: Divergence,
) -> f64 {
    // One loop per case, with no branch in its body: the lanes below then vectorise.
    if divergence == Divergence::SoftCrossEntropy {
        forward_kl_sums::<DIVIDE, true>(student, teacher, teacher_exp, logs)
    } else {
        forward_kl_sums::<DIVIDE, false>(student, teacher, teacher_exp, logs)
    }
}

#[inline(always)]
fn forward_kl_sums<const DIVIDE: bool, const CROSS_ENTROPY: bool>(
    student: &[f32],
    teacher: &[f32],
    teacher_exp: &[f32],
    logs: &LogShifts,
) -> f64 {
    let (temperature, inverse, inv_sum) = (logs.temperature, 1.0 / logs.temperature, logs.inv_teacher_sum);
    let (mut weighted, mut mass) = (0.0f64, 0.0f64);
    // Per block: the products and probabilities are written to two stack rows by a plain
    // element-wise loop, then summed lane by lane. (One loop doing both, with its lane
    // accumulators, was left scalar by the vectoriser.)
    let mut products = [0.0f32; BLOCK];
    let mut probabilities = [0.0f32; BLOCK];
    let blocks = student
        .chunks(BLOCK)
        .zip(teacher.chunks(BLOCK))
        .zip(teacher_exp.chunks(BLOCK));
    for ((s, t), e) in blocks {
        let n = s.len();
        let rows = products[..n].iter_mut().zip(probabilities[..n].iter_mut());
        for ((pd, pp), ((&s, &t), &e)) in rows.zip(s.iter().zip(t).zip(e)) {
            let p = e * inv_sum;
            let d = if CROSS_ENTROPY {
                -scale::<DIVIDE>(s, temperature, inverse)
            } else {
                scale::<DIVIDE>(t - s, temperature, inverse)
            };
            *pd = if p > 0.0 { p * d } else { 0.0 };
            *pp = p;
        }
        weighted += lane_sum(&products[..n]) as f64;
        mass += lane_sum(&probabilities[..n]) as f64;
    }
    let student_norm = logs.student_offset as f64 + logs.student_log_sum;
    let teacher_norm = logs.teacher_offset as f64 + logs.teacher_log_sum;
    let constant = if CROSS_ENTROPY {
        -student_norm
    } else {
        teacher_norm - student_norm
    };
    weighted - constant * mass
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
    forward_kl_value::<true>(student, teacher, teacher_exp, logs, Divergence::ForwardKl)
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
