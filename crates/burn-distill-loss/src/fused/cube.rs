//! The fused losses on the GPU devices: one CubeCL kernel, one cube per row.
//!
//! Each cube's units stride over the row's classes (vocabulary tiled in blocks of the cube's
//! width). The first sweep keeps a running maximum and sum per unit for both softmaxes (an
//! online softmax: the sum is rescaled when the maximum moves) and the cube merges them; the
//! second sweep sums the divergence and, for forward KL, soft cross-entropy and Hinton KD,
//! writes the gradient at once. The other divergences need the centre `Σ q ∂D/∂q` of their
//! gradient first, so they sweep a third time to write it. The arithmetic is f32 throughout
//! (WGSL has no f64); the tree reductions keep the sums accurate to a few ulp.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, TensorMetadata};
use burn::tensor::{DType, Shape, TensorData};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

use super::op::FusedJob;
use crate::spec::Divergence;
use crate::spec::RowSpec;

/// Most units per cube (one row per cube); a power of two for the tree reductions. Narrow
/// rows get a narrower cube (at least [`MIN_UNITS`]): its barriers are cheaper.
const UNITS: usize = 256;
const MIN_UNITS: usize = 32;
/// The most cubes along one launch axis that every runtime accepts.
const MAX_CUBES_X: usize = 65_535;

// Divergence codes of the kernel (comptime: each one compiles its own kernel).
const FORWARD_KL: u32 = 0;
const SOFT_CROSS_ENTROPY: u32 = 1;
const REVERSE_KL: u32 = 2;
const SYMMETRIC_KL: u32 = 3;
const TOTAL_VARIATION: u32 = 4;
const GENERALIZED_JSD: u32 = 5;
const SKEW_KL: u32 = 6;
const SKEW_REVERSE_KL: u32 = 7;

/// Below every finite f32 logit that matters: the starting maximum (WGSL has no `-inf`
/// literal; the kernel spells it out where a variable starts at it). A row whose maximum
/// stays here has no finite logit.
const LOWEST: f32 = f32::MIN;

/// `e^x − 1` without the cancellation of `exp(x) − 1` near 0.
#[cube]
fn exp_m1(x: f32) -> f32 {
    let mut out = x.exp() - 1.0f32;
    if x.abs() < 0.5f32 {
        let mut acc = 1.0f32 + x / 9.0f32;
        acc = 1.0f32 + x / 8.0f32 * acc;
        acc = 1.0f32 + x / 7.0f32 * acc;
        acc = 1.0f32 + x / 6.0f32 * acc;
        acc = 1.0f32 + x / 5.0f32 * acc;
        acc = 1.0f32 + x / 4.0f32 * acc;
        acc = 1.0f32 + x / 3.0f32 * acc;
        acc = 1.0f32 + x / 2.0f32 * acc;
        out = x * acc;
    }
    out
}

/// `ln(1 + x)` to a few ulp. Near `1 + x = 1` a GPU's `log` is only accurate to an absolute
/// 2⁻²¹ (Vulkan's bound on [0.5, 2]), far too coarse relative to a small result; there it is
/// `2 atanh(z)`, `z = x / (2 + x)` (`|z| ≤ 1/3`), summed as a series.
#[cube]
#[allow(clippy::manual_range_contains)] // cube code: no `RangeInclusive` on the device
fn ln_1p(x: f32) -> f32 {
    let mut out = (1.0f32 + x).ln();
    if x >= -0.5f32 && x <= 1.0f32 {
        let z = x / (2.0f32 + x);
        let z2 = z * z;
        // 2 z Σ_k z^{2k} / (2k + 1), k ≤ 8: the next term is below 1e-9 relative.
        let mut acc = 0.058_823_53f32; // 1/17
        acc = acc * z2 + 1.0f32 / 15.0f32;
        acc = acc * z2 + 1.0f32 / 13.0f32;
        acc = acc * z2 + 1.0f32 / 11.0f32;
        acc = acc * z2 + 1.0f32 / 9.0f32;
        acc = acc * z2 + 1.0f32 / 7.0f32;
        acc = acc * z2 + 1.0f32 / 5.0f32;
        acc = acc * z2 + 1.0f32 / 3.0f32;
        acc = acc * z2 + 1.0f32;
        out = 2.0f32 * z * acc;
    }
    out
}

/// `ln(rest + w e^r)`, `rest = 1 − w` (given, as `w` may be within rounding of 1): `ln(1 + x)`,
/// `x = w (e^r − 1)`. Where `x` nears −1 the sum of the two positive terms is exact where
/// `1 + x` would cancel.
#[cube]
fn ln_mix(w: f32, rest: f32, log_ratio: f32) -> f32 {
    let x = w * exp_m1(log_ratio);
    let mut out = ln_1p(x);
    if x < -0.5f32 {
        out = (rest + w * log_ratio.exp()).ln();
    }
    out
}

/// One element of `KL(a ‖ (1 − w) a + w b)`: `a · (x − ln(1 + x))`, `x = w (b/a − 1)`, or
/// `w b` where `a = 0`; `rest = 1 − w`. `log_ratio = ln b − ln a`. Near `x = 0`, where the difference
/// cancels, `x − ln(1 + x)` is its series.
#[cube]
fn mixture_element(a: f32, b: f32, w: f32, rest: f32, log_ratio: f32) -> f32 {
    let mut out = w * b;
    if a > 0.0f32 {
        let x = w * exp_m1(log_ratio);
        let mut g = x - ln_mix(w, rest, log_ratio);
        if x.abs() < 0.15f32 {
            // Σ_{k≥2} (−x)^k / k, Horner from k = 10.
            let mut acc = 0.1f32;
            acc = acc * x - 0.111_111_11f32;
            acc = acc * x + 0.125f32;
            acc = acc * x - 0.142_857_15f32;
            acc = acc * x + 0.166_666_67f32;
            acc = acc * x - 0.2f32;
            acc = acc * x + 0.25f32;
            acc = acc * x - 0.333_333_34f32;
            acc = acc * x + 0.5f32;
            g = acc * x * x;
        }
        out = a * g;
    }
    out
}

/// `exp(scaled − offset)` where `scaled ≤ offset` (both `x / T`), 0 for `x = −inf`.
#[cube]
fn shifted_exp(x: f32, temperature: f32, offset: f32) -> f32 {
    let mut out = 0.0f32;
    if x > LOWEST {
        out = (x / temperature - offset).exp();
    }
    out
}

/// `sum · exp(old/T − new/T)`: a running sum carried to a larger maximum (0 when nothing
/// was summed yet).
#[cube]
fn rescaled(sum: f32, old: f32, new: f32, temperature: f32) -> f32 {
    let mut out = 0.0f32;
    if old > LOWEST {
        out = sum * (old / temperature - new / temperature).exp();
    }
    out
}

/// One element's share of the divergence (the forward divergences are summed apart).
#[cube]
fn element_value(q: f32, p: f32, log_ratio: f32, mix: f32, rest: f32, #[comptime] divergence: u32) -> f32 {
    let mut value = 0.0f32;
    if comptime!(divergence == REVERSE_KL) {
        if q > 0.0f32 {
            value = -q * log_ratio;
        }
    } else if comptime!(divergence == SYMMETRIC_KL) {
        if q > 0.0f32 {
            value = -q * log_ratio;
        }
        if p > 0.0f32 {
            value += p * log_ratio;
        }
    } else if comptime!(divergence == TOTAL_VARIATION) {
        value = 0.5f32 * (p - q).abs();
    } else if comptime!(divergence == GENERALIZED_JSD) {
        // D = KL(p ‖ m)/(1 − β) + KL(q ‖ m)/β, m = β p + (1 − β) q.
        value = mixture_element(p, q, rest, mix, -log_ratio) / rest + mixture_element(q, p, mix, rest, log_ratio) / mix;
    } else if comptime!(divergence == SKEW_KL) {
        // D = KL(p ‖ m), m = α p + (1 − α) q.
        value = mixture_element(p, q, rest, mix, -log_ratio);
    } else if comptime!(divergence == SKEW_REVERSE_KL) {
        // D = KL(q ‖ m), m = (1 − α) p + α q.
        value = mixture_element(q, p, rest, mix, log_ratio);
    }
    value
}

/// One element's `q_j ∂D/∂q_j` (the gradient w.r.t. the logits is `(q g − q Σ q g) / T`).
#[cube]
fn element_term(q: f32, p: f32, log_ratio: f32, mix: f32, rest: f32, #[comptime] divergence: u32) -> f32 {
    let mut term = 0.0f32;
    if comptime!(divergence == REVERSE_KL) {
        // q (ln q − ln p) (+ q, which the centre cancels).
        if q > 0.0f32 {
            term = -q * log_ratio;
        }
    } else if comptime!(divergence == SYMMETRIC_KL) {
        if q > 0.0f32 {
            term = -q * log_ratio;
        }
        term += q - p;
    } else if comptime!(divergence == TOTAL_VARIATION) {
        if q > p {
            term = 0.5f32 * q;
        } else if q < p {
            term = -0.5f32 * q;
        }
    } else if comptime!(divergence == GENERALIZED_JSD) {
        // −q ln(m/q)/β.
        if q > 0.0f32 {
            term = -q * ln_mix(mix, rest, log_ratio) / mix;
        }
    } else if comptime!(divergence == SKEW_KL) {
        // −(1 − α) p q / m.
        let m = mix * p + rest * q;
        if m > 0.0f32 {
            term = -rest * p * q / m;
        }
    } else if comptime!(divergence == SKEW_REVERSE_KL) {
        // q (ln(q/m) − α q/m).
        if q > 0.0f32 {
            let m = rest * p + mix * q;
            term = q * (-ln_mix(rest, mix, log_ratio) - mix * q / m);
        }
    }
    term
}

/// One row per cube: the loss (weighted, NaN for a bad row) into `losses[row]` and, when
/// `write_grad`, `weight · ∂loss/∂student` into the row of `grad`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn fused_rows_kernel(
    student: &Tensor<f32>,
    teacher: &Tensor<f32>,
    labels: &Tensor<f32>,
    weights: &Tensor<f32>,
    losses: &mut Tensor<f32>,
    grad: &mut Tensor<f32>,
    rows: u32,
    classes: u32,
    temperature: f32,
    soft_weight: f32,
    hard_weight: f32,
    smoothing: f32,
    mix: f32,
    rest: f32,
    nan: f32,
    #[comptime] divergence: u32,
    #[comptime] hard: bool,
    #[comptime] write_grad: bool,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let units = CUBE_DIM_X as usize;
    let unit = UNIT_POS_X as usize;
    let n = classes as usize;
    let base = row * n;
    let mut shared = Shared::<[f32]>::new_slice(comptime!(7 * UNITS));

    // Sweep 1: running maxima and sums of exp(x/T − max/T) for both sides, exp(s − max s) for
    // the hard term, Σ s for label smoothing, and whether a value is NaN or +inf.
    let mut max_s = f32::min_value();
    let mut sum_s = 0.0f32;
    let mut max_t = f32::min_value();
    let mut sum_t = 0.0f32;
    let mut sum_hard = 0.0f32;
    let mut sum_raw = 0.0f32;
    let mut bad = 0.0f32;
    let mut j = unit;
    while j < n {
        let s = student[base + j];
        let t = teacher[base + j];
        if s.is_nan() || t.is_nan() || (s.is_inf() && s > 0.0f32) || (t.is_inf() && t > 0.0f32) {
            bad = 1.0f32;
        }
        if s > max_s {
            sum_s = rescaled(sum_s, max_s, s, temperature) + 1.0f32;
            if comptime!(hard) {
                sum_hard = rescaled(sum_hard, max_s, s, 1.0f32) + 1.0f32;
            }
            max_s = s;
        } else {
            sum_s += shifted_exp(s, temperature, max_s / temperature);
            if comptime!(hard) {
                sum_hard += shifted_exp(s, 1.0f32, max_s);
            }
        }
        if t > max_t {
            sum_t = rescaled(sum_t, max_t, t, temperature) + 1.0f32;
            max_t = t;
        } else {
            sum_t += shifted_exp(t, temperature, max_t / temperature);
        }
        if comptime!(hard) {
            sum_raw += s;
        }
        j += units;
    }
    shared[unit] = max_s;
    shared[units + unit] = sum_s;
    shared[2 * units + unit] = max_t;
    shared[3 * units + unit] = sum_t;
    shared[4 * units + unit] = sum_hard;
    shared[5 * units + unit] = sum_raw;
    shared[6 * units + unit] = bad;
    sync_cube();
    let mut stride = units / 2;
    while stride > 0 {
        if unit < stride {
            let other = unit + stride;
            let a = shared[unit];
            let b = shared[other];
            let top = a.max(b);
            shared[units + unit] = rescaled(shared[units + unit], a, top, temperature)
                + rescaled(shared[units + other], b, top, temperature);
            shared[4 * units + unit] = rescaled(shared[4 * units + unit], a, top, 1.0f32)
                + rescaled(shared[4 * units + other], b, top, 1.0f32);
            shared[unit] = top;
            let a = shared[2 * units + unit];
            let b = shared[2 * units + other];
            let top = a.max(b);
            shared[3 * units + unit] = rescaled(shared[3 * units + unit], a, top, temperature)
                + rescaled(shared[3 * units + other], b, top, temperature);
            shared[2 * units + unit] = top;
            shared[5 * units + unit] += shared[5 * units + other];
            shared[6 * units + unit] = shared[6 * units + unit].max(shared[6 * units + other]);
        }
        sync_cube();
        stride /= 2;
    }
    let max_s = shared[0];
    let sum_s = shared[units];
    let max_t = shared[2 * units];
    let sum_t = shared[3 * units];
    let sum_hard = shared[4 * units];
    let sum_raw = shared[5 * units];
    let bad_row = shared[6 * units] > 0.0f32 || max_s <= LOWEST || max_t <= LOWEST;
    // Everyone has read the row's constants before the slots are reused.
    sync_cube();

    let weight = weights[row];
    let offset_s = max_s / temperature;
    let offset_t = max_t / temperature;
    let log_sum_s = sum_s.ln();
    let log_sum_t = sum_t.ln();
    let inv_sum_s = 1.0f32 / sum_s;
    let inv_sum_t = 1.0f32 / sum_t;
    let soft_scale = weight * soft_weight / temperature;
    let hard_scale = weight * hard_weight;
    let inv_sum_hard = 1.0f32 / sum_hard;
    let count = f32::cast_from(classes);
    let smooth = smoothing / count;
    let mut label = 0usize;
    if comptime!(hard) {
        label = u32::cast_from(labels[row]) as usize;
    }
    // Gradient rows of bad or weight-0 rows are 0.
    let live = !bad_row && weight != 0.0f32;
    let forward = comptime!(divergence == FORWARD_KL || divergence == SOFT_CROSS_ENTROPY);

    // Sweep 2: the divergence (and, for the forward divergences, the gradient).
    let mut value = 0.0f32;
    let mut centre = 0.0f32;
    let mut mass = 0.0f32;
    let mut j = unit;
    while j < n {
        let s = student[base + j];
        let t = teacher[base + j];
        let q = shifted_exp(s, temperature, offset_s) * inv_sum_s;
        let p = shifted_exp(t, temperature, offset_t) * inv_sum_t;
        if comptime!(forward) {
            // Σ p d − c Σ p, d = (t − s)/T (or −s/T): the row constants stay out of the
            // per-element products.
            let mut d = (t - s) / temperature;
            if comptime!(divergence == SOFT_CROSS_ENTROPY) {
                d = -(s / temperature);
            }
            if p > 0.0f32 {
                value += p * d;
                mass += p;
            }
            if comptime!(write_grad) {
                let mut g = soft_scale * (q - p);
                if comptime!(hard) {
                    g += hard_scale * (shifted_exp(s, 1.0f32, max_s) * inv_sum_hard - smooth);
                    if j == label {
                        g -= hard_scale * (1.0f32 - smoothing);
                    }
                }
                if !live {
                    g = 0.0f32;
                }
                grad[base + j] = g;
            }
        } else {
            let log_ratio = (t / temperature - offset_t - log_sum_t) - (s / temperature - offset_s - log_sum_s);
            value += element_value(q, p, log_ratio, mix, rest, divergence);
            centre += element_term(q, p, log_ratio, mix, rest, divergence);
            mass += q;
        }
        j += units;
    }
    shared[unit] = value;
    shared[units + unit] = centre;
    shared[2 * units + unit] = mass;
    sync_cube();
    let mut stride = units / 2;
    while stride > 0 {
        if unit < stride {
            let other = unit + stride;
            shared[unit] += shared[other];
            shared[units + unit] += shared[units + other];
            shared[2 * units + unit] += shared[2 * units + other];
        }
        sync_cube();
        stride /= 2;
    }
    let mut divergence_value = shared[0];
    if comptime!(forward) {
        let norm_s = offset_s + log_sum_s;
        let norm_t = offset_t + log_sum_t;
        let mut constant = norm_t - norm_s;
        if comptime!(divergence == SOFT_CROSS_ENTROPY) {
            constant = -norm_s;
        }
        divergence_value = shared[0] - constant * shared[2 * units];
    }
    // The centre Σ q g over Σ q (1 only to rounding): each gradient row then sums to zero.
    let centre = shared[units] / shared[2 * units];

    if comptime!(!forward && write_grad) {
        // Sweep 3: the gradient, (q g − q Σ q g) / T per class.
        let mut j = unit;
        while j < n {
            let s = student[base + j];
            let t = teacher[base + j];
            let q = shifted_exp(s, temperature, offset_s) * inv_sum_s;
            let p = shifted_exp(t, temperature, offset_t) * inv_sum_t;
            let log_ratio = (t / temperature - offset_t - log_sum_t) - (s / temperature - offset_s - log_sum_s);
            let mut g = soft_scale * (element_term(q, p, log_ratio, mix, rest, divergence) - q * centre);
            if comptime!(hard) {
                g += hard_scale * (shifted_exp(s, 1.0f32, max_s) * inv_sum_hard - smooth);
                if j == label {
                    g -= hard_scale * (1.0f32 - smoothing);
                }
            }
            if !live {
                g = 0.0f32;
            }
            grad[base + j] = g;
            j += units;
        }
    }

    if unit == 0 {
        let mut loss = soft_weight * divergence_value;
        if comptime!(hard) {
            let log_sum = sum_hard.ln();
            let mut cross_entropy = -(1.0f32 - smoothing) * ((student[base + label] - max_s) - log_sum);
            if smoothing > 0.0f32 {
                cross_entropy -= smooth * (sum_raw - count * (max_s + log_sum));
            }
            loss += hard_weight * cross_entropy;
        }
        let mut out = weight * loss;
        if weight == 0.0f32 {
            out = 0.0f32;
        }
        if bad_row {
            out = nan;
        }
        losses[row] = out;
    }
}

/// The kernel's divergence code and mixture weight for `divergence` (in f64: the kernel takes
/// both the weight and `1 −` it, which rounds badly in f32 near 1).
fn code(divergence: Divergence) -> (u32, f64) {
    match divergence {
        Divergence::GeneralizedJsd { beta: 0.0 } => (FORWARD_KL, 0.0),
        Divergence::GeneralizedJsd { beta: 1.0 } => (REVERSE_KL, 0.0),
        Divergence::ForwardKl => (FORWARD_KL, 0.0),
        Divergence::SoftCrossEntropy => (SOFT_CROSS_ENTROPY, 0.0),
        Divergence::ReverseKl => (REVERSE_KL, 0.0),
        Divergence::SymmetricKl => (SYMMETRIC_KL, 0.0),
        Divergence::TotalVariation => (TOTAL_VARIATION, 0.0),
        Divergence::GeneralizedJsd { beta } => (GENERALIZED_JSD, beta),
        Divergence::SkewKl { alpha } => (SKEW_KL, alpha),
        Divergence::SkewReverseKl { alpha } => (SKEW_REVERSE_KL, alpha),
    }
}

fn sum<B: Backend>(tensor: FloatTensor<B>) -> FloatTensor<B> {
    B::float_sum(tensor)
}

fn upload<B: Backend>(values: Vec<f32>, device: &B::Device) -> FloatTensor<B> {
    let len = values.len();
    B::float_from_data(TensorData::new(values, [len]), device)
}

/// Runs the kernel on `[positions, classes]` f32 logits: the output (`[1]` or `[positions]`, see
/// [`FusedJob::reduced`]) and, when `want_grad`, the gradient w.r.t. the student logits.
pub(crate) fn fused_rows_cube(
    student: CubeTensor,
    teacher: CubeTensor,
    job: &FusedJob,
    want_grad: bool,
) -> (CubeTensor, Option<CubeTensor>) {
    assert!(
        student.dtype == DType::F32 && teacher.dtype == DType::F32,
        "the fused losses take f32 tensors, got {:?} and {:?}",
        student.dtype,
        teacher.dtype
    );
    student.assert_is_on_same_device(&teacher);
    let shape = student.shape();
    let (positions, classes) = (shape[0], shape[1]);
    let student = into_contiguous(student);
    let teacher = into_contiguous(teacher);
    let (client, device) = (student.client.clone(), student.device.clone());
    let RowSpec {
        divergence,
        temperature,
        soft_weight,
        hard_weight,
        label_smoothing,
    } = job.spec;
    let (divergence, mix) = code(divergence);
    let hard = hard_weight > 0.0;
    // Labels travel as f32, exact up to 2^24 classes.
    assert!(
        !hard || classes <= 1 << 24,
        "the GPU fused kernel takes at most 2^24 classes with a hard-label term, got {classes}"
    );
    let labels = match (&job.labels, hard) {
        (Some(labels), true) => labels.iter().map(|&label| label as f32).collect(),
        _ => vec![0.0],
    };
    let labels = upload::<CubeBackend>(labels, &device);
    let weights = match &job.weights {
        Some(weights) => weights.to_vec(),
        None => vec![1.0; positions],
    };
    let weights = upload::<CubeBackend>(weights, &device);
    let losses = empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new([positions]), DType::F32);
    let grad_shape = if want_grad {
        Shape::new([positions, classes])
    } else {
        Shape::new([1])
    };
    let grad = empty_device_contiguous_dtype(client.clone(), device, grad_shape, DType::F32);
    if positions > 0 {
        let cubes_x = positions.min(MAX_CUBES_X);
        let cubes_y = positions.div_ceil(cubes_x);
        fused_rows_kernel::launch(
            &client,
            CubeCount::Static(cubes_x as u32, cubes_y as u32, 1),
            CubeDim::new_1d(classes.next_power_of_two().clamp(MIN_UNITS, UNITS) as u32),
            student.into_tensor_arg(),
            teacher.into_tensor_arg(),
            labels.into_tensor_arg(),
            weights.into_tensor_arg(),
            losses.clone().into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            positions as u32,
            classes as u32,
            temperature,
            soft_weight,
            hard_weight,
            label_smoothing,
            mix as f32,
            (1.0 - mix) as f32,
            f32::NAN,
            divergence,
            hard,
            want_grad,
        );
    }
    let output = if job.reduced {
        sum::<CubeBackend>(losses)
    } else {
        losses
    };
    (output, want_grad.then_some(grad))
}
