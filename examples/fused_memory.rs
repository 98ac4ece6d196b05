//! Peak memory of the fused and composed losses, forward + backward, measured by counting every
//! heap allocation of this process.
//!
//! ```sh
//! cargo run --release --features flex --example fused_memory            # flex device
//! cargo run --release --features flex --example fused_memory -- ndarray
//! ```
//!
//! Prints, per case, the peak bytes allocated during one loss call, `backward()` and reading
//! the gradient, above what was allocated before (the inputs). Two parts:
//! 1. Hinton KD (α 0.5, T 4) on `[rows, 32000]` logits: fused vs composed.
//! 2. The chunked linear head + forward KL against a teacher head, for a growing number of
//!    positions: its peak should stay flat, while one matmul + the composed loss grows with
//!    the positions.
//! 3. The chunked head against a top-32 teacher (a chat distillation step from a cache) at
//!    SmolLM2's width, the vocabulary growing to its 49 152, chunks of a fixed number of logits:
//!    the chunked peak grows only with the head's own gradient, the composed one with the whole
//!    `[positions, vocab]` logits.
//! 4. At SmolLM2's 49 152 classes, chunks of 1 024 rows against chunks of 2²⁵, 2²⁴ and 2²³
//!    logits (682, 341 and 170 rows): peak memory and seconds (best of 3) of the same forward +
//!    backward. Each chunk adds its part of the head weight's gradient, `[vocab, width]`, so
//!    smaller chunks cost time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill::loss::{
    HeadTeacher, HintonKdLossConfig, Implementation, LinearHeadKdConfig, Reduction, TailPolicy, device_by_name,
};

/// The system allocator, counting the bytes currently allocated and their peak.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; the wrapper only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes allocated while `work` runs, above the bytes allocated when it starts.
fn peak_during<R>(work: impl FnOnce() -> R) -> (usize, R) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = work();
    (PEAK.load(Ordering::Relaxed) - base, result)
}

fn uniform(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor(values: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Peak heap of the fused and composed losses.
#[derive(clap::Parser, Debug)]
#[command(name = "fused_memory")]
struct Args {
    /// ndarray or flex.
    #[arg(default_value = "flex")]
    device: String,
}

fn main() {
    let name = <Args as clap::Parser>::parse().device;
    let Some(device) = device_by_name(&name) else {
        eprintln!("error: no device called {name} in this build (ndarray, flex)");
        std::process::exit(2);
    };
    let device = device.autodiff();
    let classes = 32_000;
    println!("device: {name}; peak heap above the inputs during forward + backward + gradient read\n");

    println!("Hinton KD (alpha 0.5, T 4), [rows, {classes}] logits:");
    println!("| rows | one [rows, classes] f32 tensor | fused | composed | composed / fused |");
    println!("|---|---|---|---|---|");
    for rows in [256, 2048] {
        let teacher = tensor(uniform(rows * classes, 2, 4.0), [rows, classes], &device);
        let student_data = tensor(uniform(rows * classes, 1, 4.0), [rows, classes], &device);
        let labels: Tensor<1, Int> = Tensor::from_data(
            TensorData::new((0..rows as i64).map(|i| i % 1000).collect::<Vec<_>>(), [rows]),
            &device,
        );
        let mut peaks = Vec::new();
        for implementation in [Implementation::Fused, Implementation::Composed] {
            let loss = HintonKdLossConfig::new()
                .with_temperature(4.0)
                .with_implementation(implementation)
                .init();
            let (peak, _) = peak_during(|| {
                let student = student_data.clone().require_grad();
                let value = loss
                    .forward(student.clone(), teacher.clone(), labels.clone(), Reduction::BatchMean)
                    .expect("valid inputs");
                let grads = value.backward();
                student.grad(&grads).expect("gradient").into_data()
            });
            peaks.push(peak);
        }
        println!(
            "| {rows} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.1} |",
            mib(rows * classes * 4),
            mib(peaks[0]),
            mib(peaks[1]),
            peaks[1] as f64 / peaks[0] as f64
        );
    }

    let (width, teacher_width, chunk_rows) = (256, 512, 1024);
    println!(
        "\nLinear head + forward KL (width {width}, teacher head width {teacher_width}, {classes} classes, chunks of {chunk_rows} rows):"
    );
    println!(
        "| positions | student logits if materialised | chunked (fused) | matmul + composed | composed / chunked |"
    );
    println!("|---|---|---|---|---|");
    for positions in [1024, 2048, 4096, 8192] {
        let hidden_data = tensor(uniform(positions * width, 3, 1.0), [positions, width], &device);
        let weight_data = tensor(uniform(classes * width, 4, 0.1), [classes, width], &device);
        let teacher_hidden = tensor(
            uniform(positions * teacher_width, 5, 1.0),
            [positions, teacher_width],
            &device,
        );
        let teacher_weight = tensor(
            uniform(classes * teacher_width, 6, 0.1),
            [classes, teacher_width],
            &device,
        );
        let mut peaks = Vec::new();
        for implementation in [Implementation::Fused, Implementation::Composed] {
            let loss = LinearHeadKdConfig::new()
                .with_temperature(2.0)
                .with_chunk_rows(chunk_rows)
                .with_implementation(implementation)
                .init();
            let (peak, _) = peak_during(|| {
                let hidden = hidden_data.clone().require_grad();
                let weight = weight_data.clone().require_grad();
                let teacher = HeadTeacher::Head {
                    hidden: teacher_hidden.clone(),
                    weight: teacher_weight.clone(),
                };
                let value = loss
                    .forward(hidden.clone(), weight.clone(), teacher, None, Reduction::BatchMean)
                    .expect("valid inputs");
                let grads = value.backward();
                (
                    hidden.grad(&grads).expect("gradient").into_data(),
                    weight.grad(&grads).expect("gradient").into_data(),
                )
            });
            peaks.push(peak);
        }
        println!(
            "| {positions} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.1} |",
            mib(positions * classes * 4),
            mib(peaks[0]),
            mib(peaks[1]),
            peaks[1] as f64 / peaks[0] as f64
        );
    }

    // 3. What a chat distillation step from a top-k cache runs: SmolLM2's width, a top-32
    // teacher, the vocabulary growing to SmolLM2's 49 152.
    // Chunks of 2^23 logits (32 MiB of f32): fewer rows as the vocabulary grows.
    let (width, positions, k, chunk_elements) = (576, 4096, 32, 1usize << 23);
    println!(
        "\nLinear head + forward KL to a top-{k} teacher (width {width}, {positions} positions, chunks of {} MiB of logits):",
        (chunk_elements * 4) >> 20
    );
    println!(
        "| vocabulary | chunk rows | student logits if materialised | head weight | chunked (fused) | matmul + composed | composed / chunked |"
    );
    println!("|---|---|---|---|---|---|---|");
    for vocab in [8192, 16384, 32768, 49152] {
        let chunk_rows = (chunk_elements / vocab).max(1);
        let hidden_data = tensor(uniform(positions * width, 7, 1.0), [positions, width], &device);
        let weight_data = tensor(uniform(vocab * width, 8, 0.05), [vocab, width], &device);
        let indices: Vec<i64> = (0..positions * k)
            .map(|i| ((i / k) * 131 + (i % k) * 977) as i64 % vocab as i64)
            .collect();
        let indices = Tensor::<2, Int>::from_data(TensorData::new(indices, [positions, k]), &device);
        // log-probabilities of a teacher that puts 0.9 on its top k.
        let log_probs = tensor(vec![(0.9f32 / k as f32).ln(); positions * k], [positions, k], &device);
        let mut peaks = Vec::new();
        for implementation in [Implementation::Fused, Implementation::Composed] {
            let loss = LinearHeadKdConfig::new()
                .with_chunk_rows(chunk_rows)
                .with_implementation(implementation)
                .init();
            let (peak, _) = peak_during(|| {
                let hidden = hidden_data.clone().require_grad();
                let weight = weight_data.clone().require_grad();
                let teacher = HeadTeacher::TopK {
                    indices: indices.clone(),
                    log_probs: log_probs.clone(),
                    tail: TailPolicy::UniformTail,
                };
                let value = loss
                    .forward(hidden.clone(), weight.clone(), teacher, None, Reduction::BatchMean)
                    .expect("valid inputs");
                let grads = value.backward();
                (
                    hidden.grad(&grads).expect("gradient").into_data(),
                    weight.grad(&grads).expect("gradient").into_data(),
                )
            });
            peaks.push(peak);
        }
        println!(
            "| {vocab} | {chunk_rows} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.1} |",
            mib(positions * vocab * 4),
            mib(vocab * width * 4),
            mib(peaks[0]),
            mib(peaks[1]),
            peaks[1] as f64 / peaks[0] as f64
        );
    }

    // 4. Chunk sizes at SmolLM2's vocabulary: peak memory against time.
    let vocab = 49_152;
    let hidden_data = tensor(uniform(positions * width, 7, 1.0), [positions, width], &device);
    let weight_data = tensor(uniform(vocab * width, 8, 0.05), [vocab, width], &device);
    let indices: Vec<i64> = (0..positions * k)
        .map(|i| ((i / k) * 131 + (i % k) * 977) as i64 % vocab as i64)
        .collect();
    let indices = Tensor::<2, Int>::from_data(TensorData::new(indices, [positions, k]), &device);
    let log_probs = tensor(vec![(0.9f32 / k as f32).ln(); positions * k], [positions, k], &device);
    println!("\nThe chunk at {vocab} classes (width {width}, {positions} positions, top-{k} teacher, fused):");
    println!("| chunk rows | peak | seconds (best of 3) |");
    println!("|---|---|---|");
    for chunk_rows in [
        1024,
        4 * chunk_elements / vocab,
        2 * chunk_elements / vocab,
        chunk_elements / vocab,
    ] {
        let loss = LinearHeadKdConfig::new().with_chunk_rows(chunk_rows).init();
        let mut best = f64::INFINITY;
        let mut peak = 0;
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let (bytes, _) = peak_during(|| {
                let hidden = hidden_data.clone().require_grad();
                let weight = weight_data.clone().require_grad();
                let teacher = HeadTeacher::TopK {
                    indices: indices.clone(),
                    log_probs: log_probs.clone(),
                    tail: TailPolicy::UniformTail,
                };
                let value = loss
                    .forward(hidden.clone(), weight.clone(), teacher, None, Reduction::BatchMean)
                    .expect("valid inputs");
                let grads = value.backward();
                (
                    hidden.grad(&grads).expect("gradient").into_data(),
                    weight.grad(&grads).expect("gradient").into_data(),
                )
            });
            best = best.min(started.elapsed().as_secs_f64());
            peak = peak.max(bytes);
        }
        println!("| {chunk_rows} | {:.0} MiB | {best:.2} |", mib(peak));
    }
}
