//! The few-row weight product of a decoding step (`burn_distill::loss::weight_matmul`) against
//! burn's `matmul`, at SmolLM2-135M's projection shapes, on flex.
//!
//! Bench ids: `rows/<rows>x<in>x<out>/<layout>/<weight_matmul|matmul>`; throughput is the
//! weight's bytes (a decoding step streams every weight once). Before timing a shape the two
//! results are compared (1e-4 of the largest output): a wrong kernel fails the bench.
//!
//! `cargo bench --bench bench_main --features flex -- '^rows/'`

use std::time::Duration;

use burn::tensor::{Device, Tensor, TensorData};
use burn_distill::loss::{WeightLayout, weight_matmul};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};

/// SmolLM2-135M: q/o (576 → 576), k/v (576 → 192), gate/up (576 → 1536), down (1536 → 576),
/// and the tied head (576 → 49 152, stored `[out, in]`).
const SHAPES: [(usize, usize, WeightLayout); 5] = [
    (576, 576, WeightLayout::InOut),
    (576, 192, WeightLayout::InOut),
    (576, 1536, WeightLayout::InOut),
    (1536, 576, WeightLayout::InOut),
    (576, 49_152, WeightLayout::OutIn),
];

fn values(len: usize, seed: u32, device: &Device, shape: [usize; 2]) -> Tensor<2> {
    let values: Vec<f32> = (0..len as u32)
        .map(|i| {
            let x = i.wrapping_add(seed.wrapping_mul(1_000_003)).wrapping_mul(2_654_435_761);
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn plain(x: Tensor<2>, weight: Tensor<2>, layout: WeightLayout) -> Tensor<2> {
    match layout {
        WeightLayout::InOut => x.matmul(weight),
        WeightLayout::OutIn => x.matmul(weight.transpose()),
    }
}

fn bench_rows(c: &mut Criterion) {
    let Some(device) = burn_distill::loss::device_by_name("flex") else {
        return;
    };
    let mut group = c.benchmark_group("rows");
    group.sample_size(20).measurement_time(Duration::from_secs(3));
    for rows in [1, 8] {
        for (input, output, layout) in SHAPES {
            let shape = match layout {
                WeightLayout::InOut => [input, output],
                WeightLayout::OutIn => [output, input],
            };
            let weight = values(input * output, 1, &device, shape);
            let x = values(rows * input, 2, &device, [rows, input]);
            let ours: Vec<f32> = weight_matmul(x.clone(), weight.clone(), layout)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let theirs: Vec<f32> = plain(x.clone(), weight.clone(), layout)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let largest = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * largest,
                    "{rows}x{input}x{output}[{i}]: {a} vs {b}"
                );
            }
            group.throughput(Throughput::Bytes((input * output * 4) as u64));
            let id = format!("{rows}x{input}x{output}/{layout:?}");
            group.bench_function(BenchmarkId::new(id.clone(), "weight_matmul"), |b| {
                b.iter(|| weight_matmul(x.clone(), weight.clone(), layout).into_data())
            });
            group.bench_function(BenchmarkId::new(id, "matmul"), |b| {
                b.iter(|| plain(x.clone(), weight.clone(), layout).into_data())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_rows);
