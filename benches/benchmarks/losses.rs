//! Forward + backward of each divergence on every device this build has, at the shapes later
//! speed work is measured on: 256×10, 256×1000 and 2048×32000, through the composed tensor-op
//! path (`Implementation::Composed`; `benchmarks/fused.rs` compares it with the fused kernel).
//!
//! Bench ids are `loss/<device>/<divergence>/<rows>x<classes>`, e.g.
//! `cargo bench --bench bench_main -- loss/flex/forward_kl/256x1000`.

use std::time::Duration;

use burn::tensor::{Device, Tensor, TensorData};
use burn_distill::loss::{Divergence, DivergenceLossConfig, Implementation, Reduction, runnable_devices};
use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group};

const SHAPES: [(usize, usize); 3] = [(256, 10), (256, 1000), (2048, 32000)];

/// Deterministic logits made on the host, identical on every device.
fn logits(rows: usize, classes: usize, seed: u32, device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (0..rows * classes)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (x >> 8) as f32 / (1u32 << 24) as f32 * 8.0 - 4.0
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, classes]), device)
}

fn bench_losses(c: &mut Criterion) {
    for named in runnable_devices() {
        let device = named.device.clone().autodiff();
        for (rows, classes) in SHAPES {
            let mut group = c.benchmark_group(format!("loss/{}", named.name));
            if rows * classes > 1_000_000 {
                // Seconds per iteration: ten single-iteration samples, not criterion's ramp.
                group
                    .sample_size(10)
                    .sampling_mode(SamplingMode::Flat)
                    .measurement_time(Duration::from_secs(10));
            }
            let teacher = logits(rows, classes, 2, &device);
            let student_data = logits(rows, classes, 1, &device);
            for divergence in Divergence::ALL {
                let loss = DivergenceLossConfig::new(divergence)
                    .with_temperature(2.0)
                    .with_check_inputs(false)
                    .with_implementation(Implementation::Composed)
                    .init();
                let id = BenchmarkId::new(divergence.name(), format!("{rows}x{classes}"));
                group.bench_function(id, |bencher| {
                    bencher.iter(|| {
                        let student = student_data.clone().require_grad();
                        let value = loss
                            .forward(student.clone(), teacher.clone(), Reduction::BatchMean)
                            .expect("valid inputs");
                        let grads = value.backward();
                        // Reading the gradient back waits for the device to finish.
                        student.grad(&grads).expect("gradient").into_data()
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench_losses);
