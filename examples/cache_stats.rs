//! Measures the teacher-output cache: build (write) and read throughput and bytes on disk, for
//! dense f32, dense f16 and top-k (k = 8, 32), on MNIST (Hinton's 784-1200-1200-10 teacher) and
//! on the bundled text (a byte-level transformer teacher).
//!
//! ```text
//! cargo run --release --features flex --example cache_stats -- [--device flex] [--dir DIR] [--text-windows N]
//! ```
//!
//! Prints one table; the figures in README.md come from it. The files are written to `--dir`
//! (default: a temporary directory) and removed afterwards.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::{Device, Int, Tensor};
use burn_distill::data::{
    Batch, ByteCorpus, CacheBuildOptions, CacheMode, EpochSampler, Fingerprinted, ImageBatcher, Indexed, MnistDataset,
    MnistSplit, Subset, TeacherCache, TokenBatcher, build_cache,
};
use burn_distill::loss::{TailPolicy, device_by_name};
use burn_distill::model::{FrozenTeacher, MlpConfig, Teacher, TransformerLmConfig, init_seeded};
use clap::Parser;

struct Row {
    data: &'static str,
    mode: CacheMode,
    examples: usize,
    bytes: u64,
    build_seconds: f64,
    teacher_seconds: f64,
    read_seconds: f64,
    read_examples: usize,
}

/// Measure the teacher-output cache.
#[derive(Parser, Debug)]
#[command(name = "cache_stats")]
struct Args {
    /// ndarray, flex, wgpu or cuda (whichever this build has).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Where the cache files go (default: a temporary directory); removed afterwards.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Text windows cached.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    text_windows: usize,
}

fn main() {
    let args = Args::parse();
    let device_name = args.device;
    let Some(device) = device_by_name(&device_name) else {
        eprintln!("error: --device {device_name}: no such device in this build");
        std::process::exit(2);
    };
    let dir = args
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("burn-distill-cache-stats-{}", std::process::id())));
    if let Err(error) = std::fs::create_dir_all(&dir) {
        eprintln!("error: --dir {}: {error}", dir.display());
        std::process::exit(1);
    }
    let text_windows = args.text_windows;
    let modes = [
        CacheMode::DenseF32,
        CacheMode::DenseF16,
        CacheMode::TopK { k: 8 },
        CacheMode::TopK { k: 32 },
    ];
    let mut rows = Vec::new();

    println!("Building and reading caches on {device_name} into {}", dir.display());
    let mnist = MnistDataset::load_default(MnistSplit::Train).expect("bundled MNIST");
    let teacher = FrozenTeacher::new(&init_seeded(1, &device, |d| MlpConfig::hinton_teacher().init(d)));
    for mode in modes {
        // k = 32 is more than MNIST's 10 classes.
        if let CacheMode::TopK { k } = mode
            && k > 10
        {
            continue;
        }
        rows.push(measure(
            "MNIST train (60000)",
            mode,
            &dir,
            &teacher,
            &mnist,
            &ImageBatcher::new(),
            &device,
        ));
    }

    let corpus = ByteCorpus::load_default().expect("bundled text");
    let context = 128;
    let windows = corpus.windows(context, context).expect("windows");
    let count = text_windows.min(windows.len());
    let text = Subset::new(windows, (0..count).collect());
    let config = TransformerLmConfig::new(256, context)
        .with_layers(2)
        .with_width(128)
        .with_heads(4);
    let lm = FrozenTeacher::new(&init_seeded(2, &device, |d| config.init(d)));
    for mode in modes {
        rows.push(measure(
            "text windows (× 128 tokens)",
            mode,
            &dir,
            &lm,
            &text,
            &TokenBatcher,
            &device,
        ));
    }

    println!();
    println!(
        "| data | mode | examples | bytes on disk | bytes / example | build (s) | of which teacher (s) | write MB/s (excl. teacher) | read examples/s | read MB/s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let megabytes = row.bytes as f64 / 1e6;
        let write_seconds = (row.build_seconds - row.teacher_seconds).max(1e-9);
        let per_example = row.bytes as f64 / row.examples as f64;
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} |",
            row.data,
            row.mode,
            row.examples,
            row.bytes,
            per_example,
            row.build_seconds,
            row.teacher_seconds,
            megabytes / write_seconds,
            row.read_examples as f64 / row.read_seconds,
            per_example * row.read_examples as f64 / 1e6 / row.read_seconds,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn measure<T, S, It, Bt, B, const R: usize>(
    data: &'static str,
    mode: CacheMode,
    dir: &Path,
    teacher: &T,
    dataset: &S,
    batcher: &Bt,
    device: &Device,
) -> Row
where
    T: Teacher<B::Input, R>,
    S: Dataset<It> + Fingerprinted,
    It: Indexed,
    Bt: Batcher<It, B>,
    B: Batch,
{
    let path = dir.join(format!("{}-{}.bdkd", data.split(' ').next().unwrap_or("data"), mode).replace(' ', "-"));
    let _ = std::fs::remove_file(&path);
    let options = CacheBuildOptions::new(mode).with_batch_size(256).with_progress(true);
    let report = build_cache(&path, teacher, dataset, batcher, device, &options).expect("cache build");

    // Read: every example once, in shuffled batches of 256, as a training epoch would, through
    // to tensors on the device.
    let start = Instant::now();
    let cache = TeacherCache::open(&path).expect("a valid cache");
    let sampler = EpochSampler::new(dataset.len(), 256, 0);
    let mut read = 0;
    for batch in sampler.batches(0) {
        let indices: Vec<usize> = batch.iter().map(|&p| dataset.get(p).expect("item").index()).collect();
        let logits: Tensor<R> = cache
            .logits(&indices, TailPolicy::Renormalize, device)
            .expect("cached logits");
        assert_eq!(logits.dims()[0], indices.len());
        if let CacheMode::TopK { .. } = mode {
            let (classes, _): (Tensor<R, Int>, Tensor<R>) = cache.top_k(&indices, device).expect("top-k");
            let _ = classes.dims();
        }
        read += indices.len();
    }
    let read_seconds = start.elapsed().as_secs_f64();
    println!(
        "{data}, {mode}: {} bytes, built in {:.2} s ({:.2} s teacher), read in {read_seconds:.2} s",
        report.bytes, report.seconds, report.teacher_seconds
    );
    let _ = std::fs::remove_file(&path);
    Row {
        data,
        mode,
        examples: report.examples,
        bytes: report.bytes,
        build_seconds: report.seconds,
        teacher_seconds: report.teacher_seconds,
        read_seconds,
        read_examples: read,
    }
}
