//! Criterion benches: `cargo bench --bench bench_main [-- FILTER]`.

use criterion::criterion_main;

mod benchmarks;

criterion_main!(
    benchmarks::losses::benches,
    benchmarks::fused::benches,
    benchmarks::rows::benches,
    benchmarks::relations::benches
);
