//! Calls one fused loss (forward + backward, gradient read back) in a loop on flex (2048 ×
//! 32000 unless `--rows` / `--classes` say otherwise) and prints the time per call: a steady workload to profile the host kernel.
//!
//! ```sh
//! cargo run --release --features flex --example fused_profile -- forward_kl 20
//! cargo run --release --features flex --example fused_profile -- forward_kl 20 --dtype bf16
//! perf record -g ./target/release/examples/fused_profile hinton 30
//! ```
//!
//! Losses: `forward_kl`, `reverse_kl`, `total_variation`, `hinton` (the bench's settings:
//! `T = 2`; Hinton KD `α = 0.5`, `T = 4`).

use std::time::{Duration, Instant};

use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use burn_distill::loss::{Divergence, DivergenceLossConfig, HintonKdLossConfig, Implementation, Reduction};

/// Uniform logits in [-4, 4) from a hash of the index.
fn logits(seed: u32, [rows, classes]: [usize; 2], device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (0..rows * classes)
        .map(|i| {
            let x = (i as u32)
                .wrapping_add(seed.wrapping_mul(1_000_003))
                .wrapping_mul(2_654_435_761);
            (x >> 8) as f32 / (1u32 << 24) as f32 * 8.0 - 4.0
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, classes]), device)
}

/// One fused loss in a loop, for a profiler.
#[derive(clap::Parser, Debug)]
#[command(name = "fused_profile")]
struct Args {
    /// The loss.
    #[arg(default_value = "forward_kl", value_parser = ["forward_kl", "reverse_kl", "total_variation", "hinton"])]
    loss: String,
    /// Calls.
    #[arg(default_value_t = 20)]
    calls: usize,
    /// Positions (rows of logits).
    #[arg(long, default_value_t = 2048)]
    rows: usize,
    /// Classes (vocabulary).
    #[arg(long, default_value_t = 32000)]
    classes: usize,
    /// The logits' precision (both inputs; the gradient comes back in it).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
    /// Fresh student logits for each call, held by nothing else (as a model's output is),
    /// made before the clock starts; what is timed is the loss and `backward()` (the gradient
    /// is not read back: no handle on the logits is kept). The kernel may then write the
    /// gradient over the logits (`BURN_DISTILL_FUSED_IN_PLACE=0` stops it).
    #[arg(long)]
    fresh: bool,
    /// Also measure the kernel's two ceilings at this shape (`kernel_bounds`): its
    /// exponentials alone, and its 12 bytes per element of memory traffic alone.
    #[arg(long)]
    bounds: bool,
}

fn main() {
    let Args {
        loss,
        calls,
        rows,
        classes,
        dtype,
        fresh,
        bounds,
    } = <Args as clap::Parser>::parse();
    if bounds {
        let b = burn_distill::loss::kernel_bounds(rows, classes, 5);
        println!(
            "bounds at {rows} x {classes}: exponentials {:.1} ms ({:.2} G exp/s), memory {:.1} ms ({:.1} GB/s for 12 B/element)",
            b.exp_seconds * 1e3,
            b.exps_per_second / 1e9,
            b.stream_seconds * 1e3,
            b.stream_bytes_per_second / 1e9
        );
    }
    let divergence = match loss.as_str() {
        "forward_kl" => Some(Divergence::ForwardKl),
        "reverse_kl" => Some(Divergence::ReverseKl),
        "total_variation" => Some(Divergence::TotalVariation),
        _ => None,
    };
    let device = Device::flex().autodiff();
    let precision = match dtype.as_str() {
        "f16" => FloatDType::F16,
        "bf16" => FloatDType::BF16,
        _ => FloatDType::F32,
    };
    let (student, teacher) = (
        logits(1, [rows, classes], &device).cast(precision),
        logits(2, [rows, classes], &device).cast(precision),
    );
    let labels: Vec<i64> = (0..rows).map(|i| ((i * 7919) % classes) as i64).collect();
    let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [rows]), &device);
    let loss_of = |student: Tensor<2>| {
        match divergence {
            Some(divergence) => DivergenceLossConfig::new(divergence)
                .with_temperature(2.0)
                .with_check_inputs(false)
                .with_implementation(Implementation::Fused)
                .init()
                .forward(student, teacher.clone(), Reduction::BatchMean),
            None => HintonKdLossConfig::new()
                .with_alpha(0.5)
                .with_temperature(4.0)
                .with_check_inputs(false)
                .with_implementation(Implementation::Fused)
                .init()
                .forward(student, teacher.clone(), labels.clone(), Reduction::BatchMean),
        }
        .expect("valid inputs")
    };
    let mut timed = Duration::ZERO;
    for _ in 0..calls {
        if fresh {
            let x = Tensor::<2>::from_data(student.to_data(), &device)
                .cast(precision)
                .require_grad();
            let start = Instant::now();
            let value = loss_of(x);
            let grads = value.clone().backward();
            std::hint::black_box((value.into_scalar::<f32>(), grads));
            timed += start.elapsed();
        } else {
            let start = Instant::now();
            let student = student.clone().require_grad();
            let value = loss_of(student.clone());
            let mut grads = value.clone().backward();
            let grad = student.grad_remove(&mut grads).expect("a gradient").into_data();
            std::hint::black_box((value.into_scalar::<f32>(), grad));
            timed += start.elapsed();
        }
    }
    let per_call = timed.as_secs_f64() * 1e3 / calls as f64;
    let mode = if fresh { "fresh logits" } else { "shared logits" };
    println!("{loss} at {rows} x {classes} on flex, {dtype}, {mode}, fused: {per_call:.1} ms per call ({calls} calls)");
}
