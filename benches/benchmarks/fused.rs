//! Fused vs composed losses, forward + backward, and the machine's copy bandwidth.
//!
//! Bench ids:
//! - `fused/<device>/<loss>/<fused|composed>/<rows>x<classes>`: one loss call, `backward()`,
//!   and the student gradient taken out and read back; criterion reports the time and, as throughput, the
//!   12 bytes per element a fused call must move (read student and teacher, write gradient).
//! - `bandwidth/copy/1GiB`: a STREAM-like copy of 1 GiB between two buffers on every core;
//!   its throughput (bytes read + written) is the limit the fused figures are compared with.
//!
//! Before timing a shape, the fused and composed results are compared (value and gradient,
//! 1e-5 relative): a bench of a wrong kernel fails instead of reporting a figure.
//!
//! On a wgpu device the shapes over 100 M elements run only with `BURN_DISTILL_BENCH_GPU=1`
//! (a real GPU): on lavapipe, Mesa's CPU Vulkan driver that CI uses, they would take minutes
//! per call and gigabytes per tensor. That flag also adds 8192 × 128256 on wgpu, timed as two
//! calls of 4096 rows (a single tensor of it is over 4 GB, and failed as one wgpu buffer).
//!
//! `cargo bench --bench bench_main --features flex -- '^fused/flex/forward_kl/'`
//! `scripts/compare_fused.py` runs these and PyTorch side by side.

use std::time::Duration;

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill::loss::{
    Divergence, DivergenceLossConfig, HintonKdLossConfig, Implementation, Reduction, fused_available, runnable_devices,
};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group};
use rayon::prelude::*;

/// The shapes of issue 8; 8192 × 32000 only for the fused kernel and composed forward KL /
/// Hinton (a composed call holds about 8 GB there).
const SHAPES: [(usize, usize); 4] = [(256, 10), (256, 1000), (2048, 32000), (8192, 32000)];
/// An LLM vocabulary, on a real GPU only (`BURN_DISTILL_BENCH_GPU=1`).
const GPU_SHAPES: [(usize, usize); 1] = [(8192, 128_256)];
/// The most bytes one logits tensor may hold; a larger shape runs as several calls on row
/// ranges (one wgpu buffer of an 8192 × 128256 f32 tensor failed on an H200).
const MAX_PART_BYTES: usize = 1 << 31;

/// The losses benched: name, and the call.
#[derive(Clone, Copy)]
enum Loss {
    Divergence(Divergence),
    Hinton,
}

const LOSSES: [(&str, Loss); 5] = [
    ("forward_kl", Loss::Divergence(Divergence::ForwardKl)),
    ("reverse_kl", Loss::Divergence(Divergence::ReverseKl)),
    (
        "generalized_jsd",
        Loss::Divergence(Divergence::GeneralizedJsd { beta: 0.5 }),
    ),
    ("total_variation", Loss::Divergence(Divergence::TotalVariation)),
    ("hinton", Loss::Hinton),
];

/// Rows `first..first + rows` of deterministic logits made on the host, identical on every
/// device: uniform in [-4, 4) from a 32-bit hash of (index in the whole `[_, classes]` tensor,
/// seed), so student and teacher are independent (seeds 1 and 2). `scripts/compare_fused.py`
/// draws the same numbers.
fn logits(first: usize, rows: usize, classes: usize, seed: u32, device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (first * classes..(first + rows) * classes)
        .into_par_iter()
        .map(|i| {
            let mut x = (i as u32)
                .wrapping_add(seed.wrapping_mul(1_000_003))
                .wrapping_mul(2_654_435_761);
            x ^= x >> 15;
            x = x.wrapping_mul(2_246_822_519);
            x ^= x >> 13;
            (x >> 8) as f32 / (1u32 << 24) as f32 * 8.0 - 4.0
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, classes]), device)
}

fn labels(first: usize, rows: usize, classes: usize, device: &Device) -> Tensor<1, Int> {
    let values: Vec<i64> = (first..first + rows).map(|i| ((i * 7919) % classes) as i64).collect();
    Tensor::from_data(TensorData::new(values, [rows]), device)
}

/// One call's inputs: the rows of a shape, or a range of them when the shape is split.
struct Part {
    student: Tensor<2>,
    teacher: Tensor<2>,
    labels: Tensor<1, Int>,
}

/// The inputs of `rows × classes`, in as few row ranges as keep each tensor within
/// [`MAX_PART_BYTES`].
fn parts(rows: usize, classes: usize, device: &Device) -> Vec<Part> {
    let count = (rows * classes * 4).div_ceil(MAX_PART_BYTES);
    let per_part = rows.div_ceil(count);
    (0..rows)
        .step_by(per_part)
        .map(|first| {
            let rows = per_part.min(rows - first);
            Part {
                student: logits(first, rows, classes, 1, device),
                teacher: logits(first, rows, classes, 2, device),
                labels: labels(first, rows, classes, device),
            }
        })
        .collect()
}

/// One forward + backward; returns the loss value and the gradient (read back to the host).
fn step(
    loss: Loss,
    implementation: Implementation,
    student: &Tensor<2>,
    teacher: &Tensor<2>,
    labels: &Tensor<1, Int>,
) -> (f32, TensorData) {
    let student = student.clone().require_grad();
    let value = match loss {
        Loss::Divergence(divergence) => DivergenceLossConfig::new(divergence)
            .with_temperature(2.0)
            .with_check_inputs(false)
            .with_implementation(implementation)
            .init()
            .forward(student.clone(), teacher.clone(), Reduction::BatchMean),
        Loss::Hinton => HintonKdLossConfig::new()
            .with_alpha(0.5)
            .with_temperature(4.0)
            .with_check_inputs(false)
            .with_implementation(implementation)
            .init()
            .forward(student.clone(), teacher.clone(), labels.clone(), Reduction::BatchMean),
    }
    .expect("valid inputs");
    let mut grads = value.clone().backward();
    // Taken out of the gradients, so reading it is not a copy of a shared buffer (on flex a
    // shared 262 MB gradient is copied element by element: 0.5 s, more than the fused loss).
    let grad = student.grad_remove(&mut grads).expect("gradient").into_data();
    (value.into_scalar(), grad)
}

/// Panics unless fused and composed agree at this shape: values to 1e-5 relative, gradients to
/// 3e-5 of the largest. For forward KL the first rows are also checked against an f64
/// reference: at 2048 × 32000 the composed f32 gradient is itself 1.3e-5 (of the largest) away
/// from it, the fused one 2e-7, so the fused one must be within 1e-6.
fn check_agreement(name: &str, loss: Loss, student: &Tensor<2>, teacher: &Tensor<2>, labels: &Tensor<1, Int>) {
    let (fused_value, fused_grad) = step(loss, Implementation::Fused, student, teacher, labels);
    let (composed_value, composed_grad) = step(loss, Implementation::Composed, student, teacher, labels);
    assert!(
        (fused_value - composed_value).abs() <= 1e-5 * composed_value.abs(),
        "{name}: fused loss {fused_value} vs composed {composed_value}"
    );
    let fused_grad = fused_grad.try_to_vec::<f32>().unwrap();
    let composed_grad = composed_grad.try_to_vec::<f32>().unwrap();
    let scale = composed_grad.iter().fold(0.0f32, |m, g| m.max(g.abs())) as f64;
    let worst = |grad: &[f32], reference: &[f64]| {
        grad.iter()
            .zip(reference)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0f64, f64::max)
    };
    let composed_as_f64: Vec<f64> = composed_grad.iter().map(|&g| g as f64).collect();
    if let Loss::Divergence(Divergence::TotalVariation) = loss {
        // TVD's gradient is q (½ sign(q − p) − c)/T with c = Σ q ½ sign(q − p): where q and p
        // agree to rounding (about one class in 30 000 here) the two f32 paths may pick
        // different signs, and through c that moves the whole row. So: few rows may differ from
        // the composed path, and the first rows must match an f64 reference.
        let classes = student.dims()[1];
        let rows_differing = fused_grad
            .chunks(classes)
            .zip(composed_as_f64.chunks(classes))
            .filter(|(a, b)| worst(a, b) > 3e-5 * scale)
            .count();
        let rows = fused_grad.len() / classes;
        assert!(
            rows_differing * 10 <= rows,
            "{name}: {rows_differing} of {rows} gradient rows differ"
        );
        let reference = total_variation_grad_f64(student, teacher, 4, 2.0, rows);
        let error = worst(&fused_grad[..4 * classes], &reference);
        assert!(
            error <= 3e-5 * scale,
            "{name}: fused gradient {error:e} from f64 (largest {scale:e})"
        );
        return;
    }
    let gap = worst(&fused_grad, &composed_as_f64);
    assert!(
        gap <= 3e-5 * scale,
        "{name}: gradients differ by {gap:e} (largest {scale:e})"
    );
    if let Loss::Divergence(Divergence::ForwardKl) = loss {
        let [rows, classes] = student.dims();
        let checked = 4 * classes;
        let reference = forward_kl_grad_f64(student, teacher, 4, 2.0, rows);
        let error = worst(&fused_grad[..checked], &reference);
        assert!(
            error <= 1e-6 * scale,
            "{name}: fused gradient {error:e} from f64 (largest {scale:e})"
        );
    }
}

/// Softmax of the first `count` rows of `tensor` at `temperature`, in f64.
fn softmax_rows_f64(tensor: &Tensor<2>, count: usize, temperature: f64) -> Vec<Vec<f64>> {
    let classes = tensor.dims()[1];
    let values = tensor
        .clone()
        .slice([0..count, 0..classes])
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    values
        .chunks(classes)
        .map(|row| {
            let max = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64 / temperature));
            let exps: Vec<f64> = row.iter().map(|&x| (x as f64 / temperature - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            exps.into_iter().map(|e| e / sum).collect()
        })
        .collect()
}

/// `q (½ sign(q − p) − Σ q ½ sign(q − p)) / (T · rows)` of the first `count` rows, in f64.
fn total_variation_grad_f64(
    student: &Tensor<2>,
    teacher: &Tensor<2>,
    count: usize,
    temperature: f64,
    rows: usize,
) -> Vec<f64> {
    let (student, teacher) = (
        softmax_rows_f64(student, count, temperature),
        softmax_rows_f64(teacher, count, temperature),
    );
    student
        .iter()
        .zip(&teacher)
        .flat_map(|(q, p)| {
            let half_sign: Vec<f64> = q
                .iter()
                .zip(p)
                .map(|(q, p)| 0.5 * (q - p).signum() * f64::from(q != p))
                .collect();
            let centre: f64 = q.iter().zip(&half_sign).map(|(q, g)| q * g).sum();
            q.iter()
                .zip(half_sign)
                .map(move |(q, g)| q * (g - centre) / (temperature * rows as f64))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `(softmax(s/T) − softmax(t/T)) / (T · rows)` of the first `count` rows, in f64.
fn forward_kl_grad_f64(
    student: &Tensor<2>,
    teacher: &Tensor<2>,
    count: usize,
    temperature: f64,
    rows: usize,
) -> Vec<f64> {
    let (student, teacher) = (
        softmax_rows_f64(student, count, temperature),
        softmax_rows_f64(teacher, count, temperature),
    );
    student
        .iter()
        .flatten()
        .zip(teacher.iter().flatten())
        .map(|(q, p)| (q - p) / (temperature * rows as f64))
        .collect()
}

fn bench_fused(c: &mut Criterion) {
    let gpu = std::env::var("BURN_DISTILL_BENCH_GPU").is_ok_and(|value| value == "1");
    for named in runnable_devices() {
        let has_fused = fused_available(&named.device);
        let device = named.device.clone().autodiff();
        let gpu_shapes = if gpu && named.name == "wgpu" {
            &GPU_SHAPES[..]
        } else {
            &[]
        };
        for &(rows, classes) in SHAPES.iter().chain(gpu_shapes) {
            let huge = rows * classes > 100_000_000;
            let on_wgpu = named.name == "wgpu";
            if huge && (!has_fused || (on_wgpu && !gpu)) {
                continue; // see the module docs
            }
            let mut group = c.benchmark_group(format!("fused/{}", named.name));
            group.throughput(Throughput::Bytes(12 * (rows * classes) as u64));
            if rows * classes > 1_000_000 {
                group
                    .sample_size(10)
                    .sampling_mode(SamplingMode::Flat)
                    .measurement_time(Duration::from_secs(if huge { 20 } else { 10 }));
            }
            let parts = parts(rows, classes, &device);
            for (name, loss) in LOSSES {
                let mut implementations = vec![];
                if has_fused {
                    implementations.push(("fused", Implementation::Fused));
                }
                let composed_too = !huge || matches!(loss, Loss::Hinton | Loss::Divergence(Divergence::ForwardKl));
                if composed_too {
                    implementations.push(("composed", Implementation::Composed));
                }
                // Checked inside the bench closure, which criterion calls only for ids its filter
                // keeps (the shapes checked are never split).
                let mut unchecked = has_fused && composed_too && !huge;
                for (label, implementation) in implementations {
                    let id = BenchmarkId::new(format!("{name}/{label}"), format!("{rows}x{classes}"));
                    group.bench_function(id, |bencher| {
                        if std::mem::take(&mut unchecked) {
                            let what = format!("{}/{name}/{rows}x{classes}", named.name);
                            let Part {
                                student,
                                teacher,
                                labels,
                            } = &parts[0];
                            check_agreement(&what, loss, student, teacher, labels);
                        }
                        bencher.iter(|| {
                            parts
                                .iter()
                                .map(|part| step(loss, implementation, &part.student, &part.teacher, &part.labels))
                                .collect::<Vec<_>>()
                        })
                    });
                }
            }
            group.finish();
        }
    }
}

/// STREAM-like copy: 1 GiB from one buffer to another, split across the cores.
fn bench_bandwidth(c: &mut Criterion) {
    const BYTES: usize = 1 << 30;
    let source = vec![1.0f32; BYTES / 4];
    let mut target = vec![0.0f32; BYTES / 4];
    let mut group = c.benchmark_group("bandwidth");
    // STREAM counts a copy as the bytes read plus the bytes written.
    group
        .throughput(Throughput::Bytes(2 * BYTES as u64))
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    let chunk = BYTES / 4 / rayon::current_num_threads().max(1) / 16;
    group.bench_function("copy/1GiB", |bencher| {
        bencher.iter(|| {
            target
                .par_chunks_mut(chunk)
                .zip(source.par_chunks(chunk))
                .for_each(|(to, from)| to.copy_from_slice(from));
        })
    });
    group.finish();
}

criterion_group!(benches, bench_bandwidth, bench_fused);
