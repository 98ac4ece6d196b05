//! The data crate's test harness: the real MNIST and text files, deliberately broken copies,
//! batches on every device, and the teacher-output cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::{Device, Int, Tensor, activation};
use burn_distill_data::*;
use burn_distill_loss::{NamedDevice, TailPolicy};
use burn_distill_model::{
    Fingerprint, FrozenTeacher, Mlp, MlpConfig, ModelError, Teacher, TeacherOutput, TransformerLm, TransformerLmConfig,
    init_seeded,
};
use burn_distill_testing::devices_for_tests;

fn devices() -> Vec<NamedDevice> {
    devices_for_tests()
}

fn cpu() -> Device {
    devices()[0].device.clone()
}

/// A fresh, empty scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    burn_distill_testing::scratch(&format!("data-{name}"))
}

fn mnist_train() -> MnistDataset {
    MnistDataset::load_default(MnistSplit::Train).unwrap()
}

fn floats<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().iter::<f32>().collect()
}

fn ints<const D: usize>(tensor: Tensor<D, Int>) -> Vec<i64> {
    tensor.into_data().iter::<i64>().collect()
}

// ---------------------------------------------------------------------------------------------
// MNIST reader

#[test]
fn mnist_reads_the_bundled_files() {
    let train = mnist_train();
    let test = MnistDataset::load_default(MnistSplit::Test).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!((train.rows(), train.cols()), (28, 28));
    // Class counts published with MNIST (see data/README.md).
    let count = |labels: &[u8], class: u8| labels.iter().filter(|&&label| label == class).count();
    assert_eq!((count(train.labels(), 0), count(train.labels(), 1)), (5923, 6742));
    assert_eq!((count(test.labels(), 0), count(test.labels(), 1)), (980, 1135));
    // The first training digit is a 5, the first test digit a 7.
    assert_eq!(train.get(0).unwrap().label, 5);
    assert_eq!(test.get(0).unwrap().label, 7);
    let item = train.get(59_999).unwrap();
    assert_eq!((item.index, item.pixels.len()), (59_999, 784));
    assert!(item.pixels.contains(&255) && item.pixels.contains(&0));
    assert_ne!(train.fingerprint(), test.fingerprint());
}

/// Writes an MNIST-format directory with `count` 4×4 images (and labels) to `dir`.
fn write_tiny_mnist(dir: &Path, count: usize, gzip: bool) -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..count * 16).map(|i| (i * 37 % 256) as u8).collect();
    let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
    let write = |name: &str, bytes: Vec<u8>| {
        if gzip {
            use std::io::Write;
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(&bytes).unwrap();
            std::fs::write(dir.join(format!("{name}.gz")), encoder.finish().unwrap()).unwrap();
        } else {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    };
    write("train-images-idx3-ubyte", encode_idx(&[count, 4, 4], &pixels));
    write("train-labels-idx1-ubyte", encode_idx(&[count], &labels));
    (pixels, labels)
}

#[test]
fn mnist_reads_raw_and_gzipped_copies_alike() {
    for gzip in [false, true] {
        let dir = scratch(&format!("tiny-{gzip}"));
        let (pixels, labels) = write_tiny_mnist(&dir, 12, gzip);
        let dataset = MnistDataset::load(&dir, MnistSplit::Train).unwrap();
        assert_eq!((dataset.len(), dataset.rows(), dataset.cols()), (12, 4, 4));
        assert_eq!(dataset.labels(), labels.as_slice());
        assert_eq!(dataset.get(3).unwrap().pixels, pixels[3 * 16..4 * 16].to_vec());
    }
}

fn expect_error(result: Result<MnistDataset>, file: &str, words: &str) {
    let error = result.expect_err("a broken dataset must be refused").to_string();
    assert!(
        error.contains(file) && error.contains(words),
        "error {error:?} should name {file:?} and say {words:?}"
    );
}

#[test]
fn mnist_refuses_missing_truncated_and_corrupt_files() {
    let load = |dir: &Path| MnistDataset::load(dir, MnistSplit::Train);

    let missing = scratch("missing").join("nowhere");
    expect_error(load(&missing), "nowhere", MNIST_DIR_ENV);

    let dir = scratch("no-labels");
    write_tiny_mnist(&dir, 5, false);
    std::fs::remove_file(dir.join("train-labels-idx1-ubyte")).unwrap();
    expect_error(load(&dir), "train-labels-idx1-ubyte", "not found");

    let dir = scratch("truncated");
    write_tiny_mnist(&dir, 5, false);
    let images = dir.join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..bytes.len() - 7]).unwrap();
    expect_error(load(&dir), "train-images-idx3-ubyte", "truncated");

    let dir = scratch("trailing");
    write_tiny_mnist(&dir, 5, false);
    let mut bytes = std::fs::read(images_path(&dir)).unwrap();
    bytes.push(0);
    std::fs::write(images_path(&dir), bytes).unwrap();
    expect_error(load(&dir), "train-images-idx3-ubyte", "too long");

    let dir = scratch("magic");
    write_tiny_mnist(&dir, 5, false);
    let mut bytes = std::fs::read(images_path(&dir)).unwrap();
    bytes[0] = 0x42;
    std::fs::write(images_path(&dir), bytes).unwrap();
    expect_error(load(&dir), "train-images-idx3-ubyte", "magic");

    let dir = scratch("dtype");
    write_tiny_mnist(&dir, 5, false);
    let mut bytes = std::fs::read(images_path(&dir)).unwrap();
    bytes[2] = 0x0d;
    std::fs::write(images_path(&dir), bytes).unwrap();
    expect_error(load(&dir), "train-images-idx3-ubyte", "data type 0x0d");

    let dir = scratch("count");
    write_tiny_mnist(&dir, 5, false);
    std::fs::write(dir.join("train-labels-idx1-ubyte"), encode_idx(&[4], &[1, 2, 3, 4])).unwrap();
    expect_error(load(&dir), "train-labels-idx1-ubyte", "4 labels for 5 images");

    let dir = scratch("label");
    write_tiny_mnist(&dir, 5, false);
    std::fs::write(dir.join("train-labels-idx1-ubyte"), encode_idx(&[5], &[1, 2, 3, 14, 4])).unwrap();
    expect_error(load(&dir), "train-labels-idx1-ubyte", "label 14 at example 3");

    let dir = scratch("gzip");
    write_tiny_mnist(&dir, 50, true);
    let gz = dir.join("train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&gz).unwrap();
    std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(load(&dir), "train-images-idx3-ubyte.gz", "truncated gzip");
}

fn images_path(dir: &Path) -> PathBuf {
    dir.join("train-images-idx3-ubyte")
}

// ---------------------------------------------------------------------------------------------
// Batches, splits, order, augmentation

#[test]
fn image_batches_are_the_same_on_every_device() {
    let train = mnist_train();
    let items: Vec<MnistItem> = [7, 0, 59_999].iter().map(|&i| train.get(i).unwrap()).collect();
    for named in devices() {
        let batch = ImageBatcher::new().batch(items.clone(), &named.device);
        assert_eq!(batch.images.dims(), [3, 784], "{}", named.name);
        assert_eq!(batch.images_nchw().dims(), [3, 1, 28, 28]);
        assert_eq!(batch.indices(), &[7, 0, 59_999]);
        let labels: Vec<i64> = items.iter().map(|item| i64::from(item.label)).collect();
        assert_eq!(ints(batch.targets()), labels);
        let expected: Vec<f32> = items
            .iter()
            .flat_map(|item| item.pixels.iter().map(|&p| f32::from(p) / 255.0))
            .collect();
        assert_eq!(floats(batch.input()), expected, "{}", named.name);
    }
}

#[test]
fn jitter_moves_images_by_at_most_two_pixels_reproducibly() {
    // One lit pixel at (10, 12) lands where the shift says.
    let mut pixels = vec![0u8; 28 * 28];
    pixels[10 * 28 + 12] = 200;
    let moved = Jitter::translate(&pixels, 28, 28, -2, 1);
    assert_eq!(moved.iter().filter(|&&p| p != 0).count(), 1);
    assert_eq!(moved[8 * 28 + 13], 200);
    // Pixels shifted past the border disappear.
    let mut corner = vec![0u8; 28 * 28];
    corner[0] = 9;
    assert!(Jitter::translate(&corner, 28, 28, -1, 0).iter().all(|&p| p == 0));

    let jitter = Jitter { max_shift: 2, seed: 7 };
    let mut seen = std::collections::HashSet::new();
    for index in 0..2000 {
        let (down, right) = jitter.shift(0, index);
        assert!(down.abs() <= 2 && right.abs() <= 2);
        seen.insert((down, right));
        assert_eq!(jitter.shift(0, index), (down, right), "same inputs, same shift");
    }
    assert_eq!(seen.len(), 25, "every shift in ±2 × ±2 occurs");
    let changed = (0..100).filter(|&i| jitter.shift(0, i) != jitter.shift(1, i)).count();
    assert!(changed > 80, "a new epoch draws new shifts ({changed} of 100 changed)");

    let train = mnist_train();
    let items: Vec<MnistItem> = (0..16).map(|i| train.get(i).unwrap()).collect();
    let batcher = ImageBatcher::with_jitter(jitter);
    let device = cpu();
    let epoch0 = floats(batcher.batch(items.clone(), &device).images);
    assert_eq!(epoch0, floats(batcher.batch(items.clone(), &device).images));
    batcher.set_epoch(1);
    assert_ne!(epoch0, floats(batcher.batch(items.clone(), &device).images));
    // Example 3 of epoch 1 is exactly its translated image.
    let (down, right) = jitter.shift(1, 3);
    let expected: Vec<f32> = Jitter::translate(&items[3].pixels, 28, 28, down, right)
        .iter()
        .map(|&p| f32::from(p) / 255.0)
        .collect();
    assert_eq!(floats(batcher.batch(vec![items[3].clone()], &device).images), expected);
}

#[test]
fn splits_and_epoch_orders_are_seeded() {
    let train = mnist_train();
    let (fit, held_out) = split_validation(train.clone(), 10_000, 42);
    assert_eq!((fit.len(), held_out.len()), (50_000, 10_000));
    let (fit_again, _) = split_validation(train.clone(), 10_000, 42);
    assert_eq!(fit.positions(), fit_again.positions());
    let (fit_other, _) = split_validation(train.clone(), 10_000, 43);
    assert_ne!(fit.positions(), fit_other.positions());
    let mut all: Vec<usize> = fit.positions().iter().chain(held_out.positions()).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..60_000).collect::<Vec<_>>(),
        "the parts are disjoint and cover everything"
    );
    // Items keep their index in the file.
    let position = held_out.positions()[17];
    assert_eq!(held_out.get(17).unwrap().index, position);
    assert_eq!(held_out.get(17).unwrap(), train.get(position).unwrap());
    assert_ne!(fit.fingerprint(), fit_other.fingerprint());

    let sampler = EpochSampler::new(1000, 64, 5);
    assert_eq!(sampler.batches(3), sampler.batches(3));
    assert_ne!(sampler.batches(3), sampler.batches(4));
    assert_eq!(sampler.batches(0).len(), sampler.num_batches());
    let mut seen: Vec<usize> = sampler.batches(2).concat();
    seen.sort_unstable();
    assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    let dropping = EpochSampler {
        drop_last: true,
        ..sampler
    };
    assert_eq!(dropping.batches(0).len(), 15);
    assert!(dropping.batches(0).iter().all(|batch| batch.len() == 64));
    let in_order = EpochSampler::sequential(10, 4);
    assert_eq!(
        in_order.batches(9),
        vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
    );
}

#[test]
fn text_windows_split_without_leaks_and_batch_on_every_device() {
    let corpus = ByteCorpus::load_default().unwrap();
    assert!(corpus.bytes().len() > 1_600_000, "the bundled Jargon File");
    assert!(std::str::from_utf8(corpus.bytes()).unwrap().contains("hacker"));

    let windows = corpus.windows(64, 32).unwrap();
    let (train, valid) = windows.split(0.1).unwrap();
    assert!(train.len() > 0 && valid.len() > 0);
    assert!((valid.len() as f64 / windows.len() as f64 - 0.1).abs() < 0.01);
    let last_train = train.get(train.len() - 1).unwrap();
    let first_valid = valid.get(0).unwrap();
    let train_end = last_train.index * 32 + 65;
    assert!(first_valid.index * 32 >= train_end, "no byte is in both parts");
    assert_eq!(
        first_valid.tokens,
        corpus.bytes()[first_valid.index * 32..][..65].to_vec()
    );
    assert_ne!(train.fingerprint(), valid.fingerprint());

    let items = vec![train.get(0).unwrap(), train.get(5).unwrap()];
    for named in devices() {
        let batch = TokenBatcher.batch(items.clone(), &named.device);
        assert_eq!(batch.inputs.dims(), [2, 64]);
        let inputs = ints(batch.inputs.clone());
        let targets = ints(batch.targets());
        assert_eq!(targets.len(), 128);
        assert_eq!(inputs[1..64], targets[..63], "targets are the inputs shifted by one");
        assert_eq!(inputs[0], i64::from(corpus.bytes()[0]));
        assert_eq!(batch.indices(), &[0, 5]);
    }

    let dir = scratch("text");
    let latin1 = dir.join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
    let error = ByteCorpus::from_file(&latin1).unwrap_err().to_string();
    assert!(
        error.contains("latin1.txt") && error.contains("not UTF-8") && error.contains("byte 3"),
        "{error}"
    );
    let error = ByteCorpus::from_file(&dir.join("absent.txt")).unwrap_err().to_string();
    assert!(error.contains("absent.txt") && error.contains(TEXT_FILE_ENV), "{error}");
    assert!(ByteCorpus::from_text("short").windows(8, 1).is_err());
    assert!(windows.split(1.0).is_err());
}

// ---------------------------------------------------------------------------------------------
// The teacher-output cache

fn small_mlp(seed: u64, device: &Device) -> Mlp {
    init_seeded(seed, device, |device| MlpConfig::new(784, vec![32], 10).init(device))
}

/// The first `count` MNIST training images.
fn mnist_subset(count: usize) -> Subset<MnistDataset> {
    Subset::new(mnist_train(), (0..count).collect())
}

/// What the teacher gives for `indices` of `dataset`, computed directly.
fn direct_logits(
    teacher: &FrozenTeacher<Mlp>,
    dataset: &Subset<MnistDataset>,
    positions: &[usize],
    device: &Device,
) -> Vec<f32> {
    let items = positions.iter().map(|&i| dataset.get(i).unwrap()).collect();
    let batch = ImageBatcher::new().batch(items, device);
    floats(
        Teacher::<Tensor<2>, 2>::teach(teacher, batch.input(), &[])
            .unwrap()
            .into_parts()
            .0,
    )
}

/// Bit-equality, reporting the first difference rather than both vectors.
fn assert_same(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths");
    if let Some(at) = (0..actual.len()).find(|&i| actual[i].to_bits() != expected[i].to_bits()) {
        panic!("{what}: value {at} is {} instead of {}", actual[at], expected[at]);
    }
}

fn build<T: Teacher<Tensor<2>, 2>>(
    path: &Path,
    teacher: &T,
    dataset: &Subset<MnistDataset>,
    device: &Device,
    options: &CacheBuildOptions,
) -> Result<CacheReport> {
    build_cache(path, teacher, dataset, &ImageBatcher::new(), device, options)
}

#[test]
fn cache_round_trips_dense_and_top_k_on_every_device() {
    let dataset = mnist_subset(300);
    for named in devices() {
        let device = &named.device;
        let teacher = FrozenTeacher::new(&small_mlp(1, device));
        let fingerprint = Teacher::<Tensor<2>, 2>::fingerprint(&teacher).unwrap();
        let dir = scratch(&format!("roundtrip-{}", named.name));
        let all: Vec<usize> = (0..300).collect();
        // In the build's batches of 64: some backends' matmul rounding depends on the batch size.
        let direct: Vec<f32> = all
            .chunks(64)
            .flat_map(|chunk| direct_logits(&teacher, &dataset, chunk, device))
            .collect();

        let f32_path = dir.join("dense-f32.bdkd");
        let options = CacheBuildOptions::new(CacheMode::DenseF32).with_batch_size(64);
        let report = build(&f32_path, &teacher, &dataset, device, &options).unwrap();
        assert_eq!((report.examples, report.resumed_from, report.reused), (300, 0, false));
        assert!(!partial_path(&f32_path).exists(), "the temporary file is renamed away");
        let cache = TeacherCache::open(&f32_path).unwrap();
        assert_eq!(
            (cache.header().classes, cache.header().positions, cache.len()),
            (10, 1, 300)
        );
        assert_eq!(
            report.bytes as usize,
            std::fs::metadata(&f32_path).unwrap().len() as usize
        );
        let cached = cache.logits_values(&all, TailPolicy::Renormalize).unwrap();
        assert_same(&cached, &direct, &format!("{}: dense f32 is exact", named.name));
        // A second build with the same teacher and data reuses the file.
        assert!(build(&f32_path, &teacher, &dataset, device, &options).unwrap().reused);

        let f16_path = dir.join("dense-f16.bdkd");
        let options = CacheBuildOptions::new(CacheMode::DenseF16).with_batch_size(64);
        build(&f16_path, &teacher, &dataset, device, &options).unwrap();
        let half = TeacherCache::open(&f16_path)
            .unwrap()
            .logits_values(&all, TailPolicy::Renormalize)
            .unwrap();
        for (h, f) in half.iter().zip(&direct) {
            assert!((h - f).abs() <= 1e-3 * f.abs().max(1e-2), "f16 {h} vs f32 {f}");
        }
        assert!(std::fs::metadata(&f16_path).unwrap().len() < std::fs::metadata(&f32_path).unwrap().len());

        let k = 3;
        let top_path = dir.join("top3.bdkd");
        let options = CacheBuildOptions::new(CacheMode::TopK { k }).with_batch_size(64);
        build(&top_path, &teacher, &dataset, device, &options).unwrap();
        let top = TeacherCache::open(&top_path).unwrap();
        let (classes, log_probs) = top.top_k_values(&all).unwrap();
        for example in 0..300 {
            let row = &direct[example * 10..(example + 1) * 10];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let log_z = max + row.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
            let mut order: Vec<usize> = (0..10).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            for rank in 0..k {
                let class = classes[example * k + rank] as usize;
                assert_eq!(class, order[rank], "{}: example {example} rank {rank}", named.name);
                assert!((log_probs[example * k + rank] - (row[class] - log_z)).abs() < 1e-5);
            }
        }

        // The cached teacher serves exactly the examples a shuffled batch asks for.
        let cached_teacher = CachedTeacher::open(&f32_path, &dataset, fingerprint, device).unwrap();
        let picks = [299usize, 3, 150, 3];
        let output: TeacherOutput<2> = cached_teacher
            .teach_examples(Tensor::<2>::zeros([4, 784], device), &picks, &[])
            .unwrap();
        let expected: Vec<f32> = picks
            .iter()
            .flat_map(|&i| cached[i * 10..(i + 1) * 10].to_vec())
            .collect();
        assert_same(&floats(output.into_parts().0), &expected, "cached teacher");
        assert!(
            Teacher::<Tensor<2>, 2>::needs_indices(&cached_teacher),
            "a cache answers by index only"
        );
        let no_indices = Teacher::<Tensor<2>, 2>::teach(&cached_teacher, Tensor::<2>::zeros([1, 784], device), &[]);
        assert!(matches!(no_indices, Err(ModelError::Unsupported { .. })));
        let outside =
            Teacher::<Tensor<2>, 2>::teach_examples(&cached_teacher, Tensor::<2>::zeros([1, 784], device), &[300], &[]);
        assert!(outside.unwrap_err().to_string().contains("300 is not in the cache"));
        let wrong_rank =
            Teacher::<Tensor<2>, 3>::teach_examples(&cached_teacher, Tensor::<2>::zeros([1, 784], device), &[0], &[]);
        assert!(wrong_rank.unwrap_err().to_string().contains("rank-2"));

        let top_teacher = CachedTeacher::open(&top_path, &dataset, fingerprint, device).unwrap();
        let output: TeacherOutput<2> = top_teacher
            .teach_examples(Tensor::<2>::zeros([2, 784], device), &[5, 6], &[])
            .unwrap();
        let (top_classes, top_log_probs) = output.top_k().cloned().unwrap();
        assert_eq!(top_classes.dims(), [2, k]);
        assert_eq!(
            ints(top_classes),
            classes[5 * k..7 * k].iter().map(|&c| i64::from(c)).collect::<Vec<_>>()
        );
        assert_eq!(floats(top_log_probs), log_probs[5 * k..7 * k].to_vec());
        // The rebuilt dense distribution is the renormalised top k.
        let probs = floats(activation::softmax(output.logits().clone(), 1));
        let kept: f32 = log_probs[5 * k..6 * k].iter().map(|lp| lp.exp()).sum();
        for rank in 0..k {
            let class = classes[5 * k + rank] as usize;
            assert!((probs[class] - log_probs[5 * k + rank].exp() / kept).abs() < 1e-5);
        }
    }
}

#[test]
fn cache_of_a_language_model_round_trips_rank_3() {
    let windows = ByteCorpus::load_default().unwrap().windows(16, 64).unwrap();
    let dataset = Subset::new(windows, (0..40).collect());
    let device = cpu();
    let config = TransformerLmConfig::new(BYTE_VOCAB, 16)
        .with_layers(1)
        .with_width(32)
        .with_heads(2);
    let model: TransformerLm = init_seeded(3, &device, |device| config.init(device));
    let teacher = FrozenTeacher::new(&model);
    let dir = scratch("lm");
    let items: Vec<TextItem> = (0..40).map(|i| dataset.get(i).unwrap()).collect();
    let direct = floats(
        Teacher::<Tensor<2, Int>, 3>::teach(&teacher, TokenBatcher.batch(items, &device).inputs, &[])
            .unwrap()
            .into_parts()
            .0,
    );
    for (mode, name) in [(CacheMode::DenseF32, "dense"), (CacheMode::TopK { k: 8 }, "top8")] {
        let path = dir.join(format!("{name}.bdkd"));
        let options = CacheBuildOptions::new(mode).with_batch_size(40);
        build_cache(&path, &teacher, &dataset, &TokenBatcher, &device, &options).unwrap();
        let cache = TeacherCache::open(&path).unwrap();
        assert_eq!(
            (cache.header().rank, cache.header().positions, cache.header().classes),
            (3, 16, 256)
        );
        let indices: Vec<usize> = (0..40).collect();
        if mode == CacheMode::DenseF32 {
            assert_same(
                &cache.logits_values(&indices, TailPolicy::Renormalize).unwrap(),
                &direct,
                "rank 3",
            );
            let logits: Tensor<3> = cache.logits(&[4, 2], TailPolicy::Renormalize, &device).unwrap();
            assert_eq!(logits.dims(), [2, 16, 256]);
        } else {
            let (classes, _) = cache.top_k_values(&[7]).unwrap();
            assert_eq!(classes.len(), 16 * 8);
            // Position 5 of example 7: the top class is the argmax of the direct logits.
            let row = &direct[(7 * 16 + 5) * 256..(7 * 16 + 6) * 256];
            let argmax = (0..256).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            assert_eq!(classes[5 * 8] as usize, argmax);
            let (top_classes, _): (Tensor<3, Int>, Tensor<3>) = cache.top_k(&[7, 8], &device).unwrap();
            assert_eq!(top_classes.dims(), [2, 16, 8]);
        }
    }
}

#[test]
fn stale_and_corrupt_caches_are_refused() {
    let device = cpu();
    let dataset = mnist_subset(100);
    let teacher = FrozenTeacher::new(&small_mlp(1, &device));
    let fingerprint = Teacher::<Tensor<2>, 2>::fingerprint(&teacher).unwrap();
    let dir = scratch("stale");
    let path = dir.join("cache.bdkd");
    let options = CacheBuildOptions::new(CacheMode::DenseF32).with_batch_size(32);
    build(&path, &teacher, &dataset, &device, &options).unwrap();

    // Another teacher (other weights), another dataset (other examples or order).
    let other_teacher = FrozenTeacher::new(&small_mlp(2, &device));
    let other_fingerprint = Teacher::<Tensor<2>, 2>::fingerprint(&other_teacher).unwrap();
    assert_ne!(fingerprint, other_fingerprint);
    let error = CachedTeacher::open(&path, &dataset, other_fingerprint, &device).unwrap_err();
    assert!(matches!(error, DataError::Stale { .. }));
    let message = error.to_string();
    assert!(
        message.contains("teacher") && message.contains(&fingerprint.to_string()),
        "{message}"
    );
    let reordered = Subset::new(mnist_train(), (0..100).rev().collect());
    let error = CachedTeacher::open(&path, &reordered, fingerprint, &device)
        .unwrap_err()
        .to_string();
    assert!(error.contains("stale") && error.contains("dataset"), "{error}");

    // A build for another teacher replaces the stale file and says why.
    let copy = dir.join("copy.bdkd");
    std::fs::copy(&path, &copy).unwrap();
    let report = build(&copy, &other_teacher, &dataset, &device, &options).unwrap();
    assert!(!report.reused && report.replaced.unwrap().contains("teacher"));
    CachedTeacher::open(&copy, &dataset, other_fingerprint, &device).unwrap();

    let original = std::fs::read(&path).unwrap();
    let damaged = |name: &str, bytes: Vec<u8>| {
        let file = dir.join(name);
        std::fs::write(&file, bytes).unwrap();
        TeacherCache::open(&file).unwrap_err()
    };
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    let error = damaged("flipped.bdkd", flipped);
    assert!(
        matches!(error, DataError::Corrupt { .. }) && error.to_string().contains("checksum"),
        "{error}"
    );
    let error = damaged("truncated.bdkd", original[..original.len() - 100].to_vec());
    assert!(error.to_string().contains("truncated"), "{error}");
    let mut wrong_magic = original.clone();
    wrong_magic[0] = b'X';
    assert!(damaged("magic.bdkd", wrong_magic).to_string().contains("magic"));
    let mut future = original.clone();
    future[8] = 99;
    assert!(matches!(damaged("future.bdkd", future), DataError::Stale { .. }));
    let missing = TeacherCache::open(&dir.join("absent.bdkd")).unwrap_err().to_string();
    assert!(missing.contains("absent.bdkd") && missing.contains("not found"));
}

/// A teacher that fails (or asks the build to stop) after a number of batches, as a crash or a
/// Ctrl-C would.
struct FlakyTeacher<'a> {
    inner: &'a FrozenTeacher<Mlp>,
    calls: AtomicUsize,
    fail_after: usize,
    stop: Option<Arc<AtomicBool>>,
}

impl Teacher<Tensor<2>, 2> for FlakyTeacher<'_> {
    fn teach(&self, input: Tensor<2>, taps: &[&str]) -> burn_distill_model::Result<TeacherOutput<2>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call + 1 == self.fail_after
            && let Some(stop) = &self.stop
        {
            stop.store(true, Ordering::SeqCst);
        }
        if call >= self.fail_after && self.stop.is_none() {
            return Err(ModelError::TeacherFailed {
                teacher: "flaky".into(),
                reason: "simulated crash".into(),
            });
        }
        self.inner.teach(input, taps)
    }

    fn num_classes(&self) -> usize {
        10
    }

    fn fingerprint(&self) -> Option<Fingerprint> {
        Teacher::<Tensor<2>, 2>::fingerprint(self.inner)
    }
}

#[test]
fn interrupted_builds_resume_to_the_same_file() {
    let device = cpu();
    let dataset = mnist_subset(200);
    let teacher = FrozenTeacher::new(&small_mlp(1, &device));
    let dir = scratch("resume");
    for mode in [CacheMode::DenseF16, CacheMode::TopK { k: 4 }] {
        let options = CacheBuildOptions::new(mode).with_batch_size(30);
        let reference = dir.join("reference.bdkd");
        let _ = std::fs::remove_file(&reference);
        build(&reference, &teacher, &dataset, &device, &options).unwrap();

        // A crash in the fourth batch: three batches are kept.
        let path = dir.join("crashed.bdkd");
        let _ = std::fs::remove_file(&path);
        let flaky = FlakyTeacher {
            inner: &teacher,
            calls: AtomicUsize::new(0),
            fail_after: 3,
            stop: None,
        };
        let error = build(&path, &flaky, &dataset, &device, &options).unwrap_err();
        assert!(
            matches!(
                error,
                DataError::Teacher {
                    first: 90,
                    end: 120,
                    ..
                }
            ),
            "{error}"
        );
        assert!(!path.exists() && partial_path(&path).exists());
        // A torn last record (a crash mid-write) is cut off on resume.
        let mut partial = std::fs::read(partial_path(&path)).unwrap();
        partial.extend_from_slice(&[7; 13]);
        std::fs::write(partial_path(&path), partial).unwrap();
        let report = build(&path, &teacher, &dataset, &device, &options).unwrap();
        assert_eq!(report.resumed_from, 90);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&reference).unwrap(),
            "{mode}"
        );

        // A stop request after the second batch.
        let stopped = dir.join("stopped.bdkd");
        let _ = std::fs::remove_file(&stopped);
        let stop = Arc::new(AtomicBool::new(false));
        let flaky = FlakyTeacher {
            inner: &teacher,
            calls: AtomicUsize::new(0),
            fail_after: 2,
            stop: Some(stop.clone()),
        };
        let error = build(&stopped, &flaky, &dataset, &device, &options.clone().with_stop(stop)).unwrap_err();
        assert!(
            matches!(
                error,
                DataError::Interrupted {
                    done: 60,
                    total: 200,
                    ..
                }
            ),
            "{error}"
        );
        let report = build(&stopped, &teacher, &dataset, &device, &options).unwrap();
        assert_eq!(report.resumed_from, 60);
        assert_eq!(std::fs::read(&stopped).unwrap(), std::fs::read(&reference).unwrap());

        // A partial from another teacher is not resumed.
        let other = FrozenTeacher::new(&small_mlp(9, &device));
        let crashed_other = FlakyTeacher {
            inner: &other,
            calls: AtomicUsize::new(0),
            fail_after: 2,
            stop: None,
        };
        let fresh = dir.join("fresh.bdkd");
        let _ = std::fs::remove_file(&fresh);
        build(&fresh, &crashed_other, &dataset, &device, &options).unwrap_err();
        let report = build(&fresh, &teacher, &dataset, &device, &options).unwrap();
        assert_eq!(report.resumed_from, 0);
        assert!(report.replaced.is_some());
        assert_eq!(std::fs::read(&fresh).unwrap(), std::fs::read(&reference).unwrap());
    }
}

#[test]
fn non_finite_teacher_logits_are_refused() {
    let device = cpu();
    let dataset = mnist_subset(10);
    let teacher = burn_distill_model::FnTeacher::new(&small_mlp(1, &device), 10, |model: &Mlp, input: Tensor<2>| {
        model.forward(input).log() // log of negative logits: NaN
    });
    let path = scratch("nan").join("nan.bdkd");
    let error = build(
        &path,
        &teacher,
        &dataset,
        &device,
        &CacheBuildOptions::new(CacheMode::DenseF32),
    )
    .unwrap_err();
    assert!(error.to_string().contains("non-finite logit"), "{error}");
    assert!(!path.exists());
}

#[test]
fn jargon_prompts_split_by_term_and_prompt_files_name_their_bad_lines() {
    let corpus = ByteCorpus::load_default().unwrap();
    let entries = jargon_entries(std::str::from_utf8(corpus.bytes()).unwrap());
    assert!(entries.len() > 2000, "{} entries", entries.len());
    let find = |term: &str| entries.iter().find(|entry| entry.term == term);
    let godwin = find("Godwin's Law").expect("Godwin's Law is an entry");
    assert!(
        godwin
            .definition
            .starts_with("prov. [Usenet] “As a Usenet discussion grows longer,"),
        "{:?}",
        godwin.definition
    );
    assert!(
        godwin.definition.ends_with("See also {Formosa's Law}."),
        "{:?}",
        godwin.definition
    );
    let goat = find("goat file").expect("goat file is an entry");
    assert!(
        goat.definition.starts_with("A sacrificial file"),
        "{:?}",
        goat.definition
    );

    let prompts = jargon_prompts(&entries);
    let splits = split_prompts(prompts.clone(), 0.1, 0.1).unwrap();
    let total = prompts.len() as f64;
    for (name, split) in [("valid", &splits.valid), ("test", &splits.test)] {
        let share = split.len() as f64 / total;
        assert!((0.07..0.13).contains(&share), "{name}: {share}");
    }
    assert_eq!(
        splits.train.len() + splits.valid.len() + splits.test.len(),
        prompts.len()
    );
    let ids = |split: &[ChatPrompt]| {
        split
            .iter()
            .map(|p| p.id.clone())
            .collect::<std::collections::HashSet<_>>()
    };
    assert!(ids(&splits.train).is_disjoint(&ids(&splits.test)));
    assert!(ids(&splits.train).is_disjoint(&ids(&splits.valid)));
    // A term keeps its split whatever else is in the set.
    let half = split_prompts(prompts[..prompts.len() / 2].to_vec(), 0.1, 0.1).unwrap();
    assert!(ids(&half.test).is_subset(&ids(&splits.test)));
    assert_eq!(
        splits.test[0].messages,
        vec![burn_distill_model::llm::ChatMessage::user(format!(
            "Explain the jargon term \"{}\".",
            splits.test[0].id
        ))]
    );
    assert!(split_prompts(prompts.clone(), 0.5, 0.5).is_err());

    // Written and read back; the short form reads too.
    let dir = scratch("chat-prompts");
    let path = dir.join("prompts.jsonl");
    write_chat_prompts(&path, &splits.test).unwrap();
    assert_eq!(read_chat_prompts(&path).unwrap(), splits.test);
    std::fs::write(&path, "{\"prompt\": \"Hi\"}\n\n{\"id\": \"x\", \"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Why?\"}]}\n").unwrap();
    let read = read_chat_prompts(&path).unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].id, "line-1");
    assert_eq!(read[1].messages.len(), 2);

    // Each bad line is named.
    for (text, line, says) in [
        ("{\"prompt\": \"a\"}\n{\"prompt\": 3}\n", 2, "not a chat prompt"),
        ("{\"messages\": []}\n", 1, "no message"),
        (
            "{\"prompt\": \"a\"}\n\n{\"messages\": [{\"role\": \"assistant\", \"content\": \"b\"}]}\n",
            3,
            "ends with the user's message",
        ),
        (
            "{\"id\": \"a\", \"prompt\": \"a\"}\n{\"id\": \"a\", \"prompt\": \"b\"}\n",
            2,
            "used twice",
        ),
        (
            "{\"messages\": [{\"role\": \"\", \"content\": \"b\"}]}\n",
            1,
            "empty role",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let error = read_chat_prompts(&path).unwrap_err().to_string();
        assert!(
            error.contains(&format!("line {line}")) && error.contains(says),
            "{text:?}: {error}"
        );
    }
    std::fs::write(&path, "\n\n").unwrap();
    assert!(read_chat_prompts(&path).unwrap_err().to_string().contains("no prompt"));
    let missing = read_chat_prompts(&dir.join("absent.jsonl")).unwrap_err();
    assert!(matches!(missing, DataError::Missing { .. }), "{missing}");
}

#[test]
fn a_transfer_set_of_chat_answers_resumes_and_refuses_another_teacher() {
    use burn_distill_model::SamplingConfig;
    use burn_distill_model::llm::{ChatTokenizer, load_gguf};
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let device = devices()[0].device.clone();
    let (teacher, gguf) = load_gguf(fixture.join("tiny-q8_0.gguf"), &device).unwrap();
    let tokenizer = ChatTokenizer::from_gguf(&gguf).unwrap();
    let prompts: Vec<ChatPrompt> = ["cruft", "kluge", "hack", "foo", "bar"]
        .iter()
        .map(|term| ChatPrompt {
            id: term.to_string(),
            messages: vec![burn_distill_model::llm::ChatMessage::user(format!("Explain {term}."))],
        })
        .collect();
    let options = AnswerOptions {
        max_new_tokens: 6,
        sampling: SamplingConfig::new().with_temperature(1.0).with_seed(7),
        batch_size: 2,
    };
    let dir = scratch("transfer-set");
    let path = dir.join("answers.jsonl");
    let _ = std::fs::remove_file(&path);
    let mut calls = Vec::new();
    let whole = answer_prompts(&teacher, &tokenizer, &prompts, &options, &path, |done, total| {
        calls.push((done, total))
    })
    .unwrap();
    assert_eq!(calls, vec![(0, 5), (2, 5), (4, 5), (5, 5)]);
    assert_eq!(
        whole.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["cruft", "kluge", "hack", "foo", "bar"]
    );
    for (transcript, prompt) in whole.iter().zip(&prompts) {
        assert_eq!(
            transcript.prompt_tokens,
            tokenizer.encode_chat(&prompt.messages, true).unwrap()
        );
        assert!(!transcript.answer_tokens.is_empty() && transcript.answer_tokens.len() <= 6);
        let ids = transcript.transcript();
        assert_eq!(ids.completion_ids(), transcript.answer_tokens);
    }
    // Killed after the first batch and in the middle of a line: the rerun keeps the first two
    // answers and samples the rest as the uninterrupted run did.
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "a header and five answers");
    std::fs::write(
        &path,
        format!("{}\n{}\n{}\n{}", lines[0], lines[1], lines[2], &lines[3][..10]),
    )
    .unwrap();
    let mut calls = Vec::new();
    let resumed = answer_prompts(&teacher, &tokenizer, &prompts, &options, &path, |done, total| {
        calls.push((done, total))
    })
    .unwrap();
    assert_eq!(calls[0], (2, 5), "the first two answers were kept");
    assert_eq!(resumed, whole);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

    // Another teacher, prompt set or decoding is refused, and the file is left as it was.
    let (other_teacher, _) = load_gguf(fixture.join("tiny-q4_0.gguf"), &device).unwrap();
    let refused = |result: Result<Vec<ChatTranscript>>, what: &str| match result {
        Err(DataError::OtherTransferSet { what: got, .. }) => assert_eq!(got, what),
        other => panic!("{what}: {other:?}"),
    };
    refused(
        answer_prompts(&other_teacher, &tokenizer, &prompts, &options, &path, |_, _| {}),
        "teacher",
    );
    refused(
        answer_prompts(&teacher, &tokenizer, &prompts[1..], &options, &path, |_, _| {}),
        "prompt set",
    );
    let greedy = AnswerOptions {
        sampling: SamplingConfig::new().with_temperature(0.0),
        ..options.clone()
    };
    refused(
        answer_prompts(&teacher, &tokenizer, &prompts, &greedy, &path, |_, _| {}),
        "decoding options",
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    let bad = AnswerOptions {
        batch_size: 0,
        ..options.clone()
    };
    assert!(matches!(
        answer_prompts(&teacher, &tokenizer, &prompts, &bad, &path, |_, _| {}),
        Err(DataError::Invalid { .. })
    ));
}

// --- Hostile input -------------------------------------------------------------------------

/// Every reader of the data crate against thousands of damaged versions of a valid file
/// (`burn_distill_testing::hostile`): an `Ok` or an error naming the file, never a panic or a
/// hang.
mod hostile {
    use std::io::Write;
    use std::time::Duration;

    use burn_distill_testing::hostile::check_reader;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn the_idx_reader_survives_hostile_raw_and_gzipped_files() {
        let pixels: Vec<u8> = (0..5 * 4 * 4).map(|i| (i * 7) as u8).collect();
        let raw = encode_idx(&[5, 4, 4], &pixels);
        let report = check_reader("images-idx3-ubyte", raw.clone(), 16, TIMEOUT, read_idx);
        assert!(report.refused > 0 && report.accepted > 0, "{report:?}");
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&raw).unwrap();
        let gzipped = gzip.finish().unwrap();
        let report = check_reader("images-idx3-ubyte.gz", gzipped, 32, TIMEOUT, read_idx);
        assert!(report.refused > 0, "{report:?}");
    }

    fn valid_cache(mode: CacheMode, name: &str) -> Vec<u8> {
        let device = cpu();
        let dataset = mnist_subset(12);
        let teacher = FrozenTeacher::new(&small_mlp(1, &device));
        let path = scratch(name).join("cache.bdkd");
        build(
            &path,
            &teacher,
            &dataset,
            &device,
            &CacheBuildOptions::new(mode).with_batch_size(4),
        )
        .unwrap();
        std::fs::read(path).unwrap()
    }

    /// Opens a cache and, when it opens, reads every value: a header that lies about sizes must
    /// be refused at open, not found out by an out-of-bounds read.
    fn read_cache(path: &Path, verify: bool) -> Result<usize> {
        let cache = if verify {
            TeacherCache::open(path)?
        } else {
            TeacherCache::open_unverified(path)?
        };
        let all: Vec<usize> = (0..cache.len()).collect();
        let values = match cache.top_k_values(&all) {
            Ok((classes, log_probs)) => classes.len() + log_probs.len(),
            Err(_) => cache.logits_values(&all, TailPolicy::Renormalize)?.len(),
        };
        Ok(values)
    }

    #[test]
    fn the_teacher_cache_survives_hostile_files_verified_or_not() {
        for (mode, name) in [(CacheMode::DenseF16, "dense"), (CacheMode::TopK { k: 3 }, "top3")] {
            let valid = valid_cache(mode, &format!("hostile-cache-{name}"));
            let report = check_reader(&format!("{name}.bdkd"), valid.clone(), 160, TIMEOUT, |path| {
                read_cache(path, true)
            });
            assert!(report.refused > 0, "{report:?}");
            check_reader(&format!("{name}-unverified.bdkd"), valid, 160, TIMEOUT, |path| {
                read_cache(path, false)
            });
        }
    }

    #[test]
    fn the_chat_prompt_reader_survives_hostile_jsonl() {
        let path = scratch("hostile-prompts").join("valid.jsonl");
        let lines = [
            r#"{"id": "a", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a hack?"}]}"#,
            r#"{"id": "b", "messages": [{"role": "user", "content": "Define \"kludge\" \u00e9."}]}"#,
            r#"{"id": "c", "messages": [{"role": "user", "content": "And a foo?"}]}"#,
        ];
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        assert_eq!(read_chat_prompts(&path).unwrap().len(), 3);
        let valid = std::fs::read(&path).unwrap();
        let report = check_reader("prompts.jsonl", valid, 128, TIMEOUT, read_chat_prompts);
        assert!(report.refused > 0, "{report:?}");
    }

    #[test]
    fn the_transcript_reader_survives_hostile_jsonl() {
        let path = scratch("hostile-transcripts").join("valid.jsonl");
        let transcripts: Vec<Transcript> = (0..6u32)
            .map(|i| Transcript::from_tokens(&[i, i + 1, 2], &[7, 8 + i, 9]))
            .collect();
        write_transcripts(&path, &transcripts).unwrap();
        let valid = std::fs::read(&path).unwrap();
        let report = check_reader("transcripts.jsonl", valid, 64, TIMEOUT, read_transcripts);
        assert!(report.refused > 0, "{report:?}");
    }
}
