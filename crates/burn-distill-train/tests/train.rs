//! The training crate's test harness: distillation beats training alone, resume equality,
//! accumulation equality, the NaN guard, early stopping, and every compiled device.

use std::path::PathBuf;

use burn::data::dataset::{Dataset, DatasetError};
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use burn_distill_data::{
    BYTE_VOCAB, ByteCorpus, CacheBuildOptions, CacheMode, CachedTeacher, Fingerprinted, ImageBatcher, MnistItem,
    SequenceBatcher, Subset, TextWindows, TokenBatcher, Transcript, TranscriptDataset, TranscriptTeacher, build_cache,
    generate_transcripts, read_transcripts, write_transcripts,
};
use burn_distill_loss::{
    Divergence, DivergenceLossConfig, DkdLossConfig, HintonKdLossConfig, Implementation, NamedDevice, Reduction,
    SparseKlLossConfig, TailPolicy, VocabPolicy, fused_available,
};
use burn_distill_model::{
    ConnectorConfig, Fingerprint, Fingerprinter, FnTeacher, FrozenTeacher, Mlp, MlpConfig, Teacher, TransformerLm,
    TransformerLmConfig, init_seeded,
};
use burn_distill_testing::{devices_for_tests, serial};
use burn_distill_train::*;

/// Inputs in [0, 1]^16 (stored as bytes, as images are) labelled by a fixed random network:
/// the teacher *is* the labelling function, so its soft outputs carry everything there is to
/// learn, while a few hard labels carry little.
#[derive(Debug, Clone)]
struct Synthetic {
    items: Vec<MnistItem>,
}

const WIDTH: usize = 16;
const CLASSES: usize = 4;

impl Synthetic {
    fn new(count: usize, seed: u64, oracle: &Oracle, device: &Device) -> Self {
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let mut pixels = Vec::with_capacity(count * WIDTH);
        for _ in 0..count * WIDTH {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            pixels.push((state >> 56) as u8);
        }
        let inputs: Vec<f32> = pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
        let logits = Teacher::<Tensor<2>, 2>::teach(
            oracle,
            Tensor::from_data(TensorData::new(inputs, [count, WIDTH]), device),
            &[],
        )
        .unwrap()
        .into_parts()
        .0;
        let labels: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
        let items = (0..count)
            .map(|index| MnistItem {
                pixels: pixels[index * WIDTH..(index + 1) * WIDTH].to_vec(),
                rows: 1,
                cols: WIDTH,
                label: labels[index] as u8,
                index,
            })
            .collect();
        Self { items }
    }
}

impl Dataset<MnistItem> for Synthetic {
    fn get(&self, index: usize) -> std::result::Result<MnistItem, DatasetError> {
        Ok(self.items[index].clone())
    }

    fn len(&self) -> usize {
        self.items.len()
    }
}

impl Fingerprinted for Synthetic {
    fn fingerprint(&self) -> Fingerprint {
        let mut hasher = Fingerprinter::new("synthetic");
        for item in &self.items {
            hasher.update(&item.pixels).update_u64(u64::from(item.label));
        }
        hasher.finish()
    }
}

fn devices() -> Vec<NamedDevice> {
    devices_for_tests()
}

/// A new, empty directory for one run.
fn scratch(name: &str) -> PathBuf {
    burn_distill_testing::scratch(&format!("train-{name}"))
}

type Oracle = FnTeacher<Mlp, fn(&Mlp, Tensor<2>) -> Tensor<2>>;

fn oracle_module(device: &Device) -> Mlp {
    init_seeded(11, device, |d| MlpConfig::new(WIDTH, vec![32], CLASSES).init(d))
}

/// A random network with its logits scaled up, so that its classes are clear-cut but its soft
/// outputs still say how close each example is to the other classes.
fn oracle(device: &Device) -> Oracle {
    fn sharpened(model: &Mlp, input: Tensor<2>) -> Tensor<2> {
        model.forward(input).mul_scalar(8.0)
    }
    FnTeacher::new(
        &oracle_module(device),
        CLASSES,
        sharpened as fn(&Mlp, Tensor<2>) -> Tensor<2>,
    )
}

fn student(seed: u64, dropout: f64, device: &Device) -> Mlp {
    init_seeded(seed, device, |d| {
        MlpConfig::new(WIDTH, vec![32], CLASSES).with_dropout(dropout).init(d)
    })
}

fn sgd(lr: f64, momentum: bool) -> (OptimizerConfig, LrSchedulerConfig) {
    let mut config = SgdConfig::new();
    if momentum {
        config = config.with_momentum(Some(MomentumConfig::new().with_momentum(0.9).with_dampening(0.0)));
    }
    (OptimizerConfig::Sgd(config), LrSchedulerConfig::Constant(lr))
}

fn hinton() -> ObjectiveConfig {
    ObjectiveConfig::Hinton(HintonKdLossConfig::new().with_alpha(0.1).with_temperature(2.0))
}

fn config(epochs: usize, objective: ObjectiveConfig, lr: f64) -> DistillConfig {
    let (optimizer, schedule) = sgd(lr, true);
    DistillConfig::new(epochs, optimizer, schedule, objective)
        .with_batch_size(16)
        .with_seed(3)
}

#[test]
fn a_distilled_student_beats_the_same_student_trained_alone() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let oracle = oracle(&device);
    let train = Synthetic::new(64, 1, &oracle, &device);
    let valid = Synthetic::new(2000, 2, &oracle, &device);
    let evals = [EvalSet {
        name: "valid",
        dataset: &valid,
    }];
    let batcher = ImageBatcher::new();

    let alone = Distiller::<Tensor<2>, 2>::new(
        config(40, ObjectiveConfig::Supervised { label_smoothing: 0.0 }, 0.05),
        scratch("alone"),
    )
    .fit(
        student(5, 0.0, &device),
        FitData::new(&train, &batcher).with_evals(&evals),
        &device,
    )
    .unwrap();
    let distilled = Distiller::new(config(40, hinton(), 0.05), scratch("distilled"))
        .with_teacher(&oracle)
        .fit(
            student(5, 0.0, &device),
            FitData::new(&train, &batcher).with_evals(&evals),
            &device,
        )
        .unwrap();

    let accuracy = |outcome: &RunOutcome<Mlp>| outcome.summary.last.eval[0].1.accuracy;
    let (alone_accuracy, distilled_accuracy) = (accuracy(&alone), accuracy(&distilled));
    assert!(
        distilled_accuracy > alone_accuracy + 0.04,
        "distilled {distilled_accuracy:.3} vs alone {alone_accuracy:.3} on 2000 held-out examples"
    );
    let distilled_metrics = &distilled.summary.last.eval[0].1;
    assert!(distilled_metrics.teacher_agreement.unwrap() > 0.8);
    assert!(
        alone.summary.last.eval[0].1.teacher_agreement.is_none(),
        "no teacher, no agreement"
    );
    // The run directory.
    for outcome in [&alone, &distilled] {
        assert_eq!(outcome.records.len(), 40);
        assert_eq!(outcome.summary.status, RunStatus::Completed);
    }
}

#[test]
fn a_resumed_run_ends_exactly_as_an_uninterrupted_one() {
    let _serial = serial();
    for named in devices().into_iter().filter(|named| named.name != "wgpu") {
        let device = named.device.autodiff();
        let oracle = oracle(&device);
        let train = Synthetic::new(100, 1, &oracle, &device);
        let valid = Synthetic::new(50, 2, &oracle, &device);
        let evals = [EvalSet {
            name: "valid",
            dataset: &valid,
        }];
        let jitter = ImageBatcher::new();
        let (optimizer, _) = sgd(0.1, true);
        // A schedule with state (a step decay), momentum state, dropout: all must be restored.
        let schedule = LrSchedulerConfig::Sequential(SequentialLrSchedulerConfig::new(
            vec![LrSchedulerConfig::Constant(0.1), LrSchedulerConfig::Constant(0.03)],
            vec![10],
        ));
        let config = DistillConfig::new(4, optimizer, schedule, hinton())
            .with_batch_size(16)
            .with_seed(9);

        let whole_dir = scratch(&format!("whole-{}", named.name));
        let whole = Distiller::new(config.clone(), &whole_dir)
            .with_teacher(&oracle)
            .fit(
                student(5, 0.2, &device),
                FitData::new(&train, &jitter).with_evals(&evals),
                &device,
            )
            .unwrap();

        let split_dir = scratch(&format!("split-{}", named.name));
        let first = Distiller::new(config.clone(), &split_dir)
            .with_teacher(&oracle)
            .with_stop_after(2)
            .fit(
                student(5, 0.2, &device),
                FitData::new(&train, &jitter).with_evals(&evals),
                &device,
            )
            .unwrap();
        assert_eq!(first.summary.status, RunStatus::Stopped);
        assert_eq!(first.records.len(), 2);
        let resumed = Distiller::resume(&split_dir)
            .unwrap()
            .with_teacher(&oracle)
            .fit(
                student(77, 0.2, &device),
                FitData::new(&train, &jitter).with_evals(&evals),
                &device,
            )
            .unwrap();
        assert_eq!(resumed.records.len(), 4);
        for (a, b) in whole.records.iter().zip(&resumed.records) {
            assert_eq!(a.epoch, b.epoch);
            assert_eq!(
                a.train.loss, b.train.loss,
                "{}: epoch {} training loss",
                named.name, a.epoch
            );
            // Bit for bit: the first two epochs' records come back from metrics.jsonl, which
            // keeps every number exactly (the weights below are bit-exact too).
            let (ma, mb) = (&a.eval[0].1, &b.eval[0].1);
            assert_eq!((ma.errors, ma.examples), (mb.errors, mb.examples));
            for (x, y) in [
                (ma.loss, mb.loss),
                (ma.ece, mb.ece),
                (ma.teacher_kl.unwrap(), mb.teacher_kl.unwrap()),
                (ma.teacher_agreement.unwrap(), mb.teacher_agreement.unwrap()),
            ] {
                assert_eq!(
                    x.to_bits(),
                    y.to_bits(),
                    "{}: epoch {} metrics {x} vs {y}",
                    named.name,
                    a.epoch
                );
            }
        }
        assert_eq!(
            Fingerprint::of_module(&whole.student),
            Fingerprint::of_module(&resumed.student),
            "{}: final weights",
            named.name
        );
        let lines = std::fs::read_to_string(split_dir.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 4);
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(split_dir.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["status"], "completed");
        assert_eq!(summary["epochs"], 4);

        // Resuming with other data is refused.
        let other = Synthetic::new(100, 7, &oracle, &device);
        let error = Distiller::resume(&split_dir)
            .unwrap()
            .with_teacher(&oracle)
            .fit(
                student(5, 0.2, &device),
                FitData::new(&other, &jitter).with_evals(&evals),
                &device,
            )
            .unwrap_err();
        assert!(error.to_string().contains("trained on data"), "{error}");
    }
}

/// Eight fixed inputs.
fn probe_inputs(device: &Device) -> Tensor<2> {
    let inputs: Vec<f32> = (0..8 * WIDTH).map(|i| (i % 13) as f32 / 13.0).collect();
    Tensor::from_data(TensorData::new(inputs, [8, WIDTH]), device)
}

/// Student logits on fixed inputs, to compare trained weights.
fn probe(model: &Mlp, device: &Device) -> Vec<f32> {
    model.forward(probe_inputs(device)).into_data().iter::<f32>().collect()
}

#[test]
fn accumulated_micro_batches_give_the_big_batch_step() {
    let _serial = serial();
    for named in devices() {
        let device = named.device.autodiff();
        let oracle = oracle(&device);
        // 30 examples: one step of 30, or micro-batches of 8, 8, 8 and 6.
        let train = Synthetic::new(30, 1, &oracle, &device);
        let batcher = ImageBatcher::new();
        let (optimizer, schedule) = sgd(0.5, false);
        let base = DistillConfig::new(1, optimizer, schedule, hinton()).with_seed(4);
        let run = |config: DistillConfig, name: &str| {
            Distiller::new(config, scratch(&format!("{name}-{}", named.name)))
                .with_teacher(&oracle)
                .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
                .unwrap()
        };
        let big = run(base.clone().with_batch_size(30), "big");
        let accumulated = run(base.clone().with_batch_size(8).with_accumulation(4), "accumulated");
        let small = run(base.with_batch_size(8), "small");
        assert_eq!((big.records[0].train.steps, accumulated.records[0].train.steps), (1, 1));
        let (big, accumulated, small) = (
            probe(&big.student, &device),
            probe(&accumulated.student, &device),
            probe(&small.student, &device),
        );
        let largest_gap = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(
            largest_gap(&big, &accumulated) < 1e-5,
            "{}: {}",
            named.name,
            largest_gap(&big, &accumulated)
        );
        assert!(largest_gap(&big, &small) > 1e-3, "four steps differ from one");
    }
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let oracle = oracle(&device);
    let train = Synthetic::new(64, 1, &oracle, &device);
    let (optimizer, _) = sgd(0.1, false);
    // Four good steps (epoch 1), then a learning rate that overflows the weights.
    let schedule = LrSchedulerConfig::Sequential(SequentialLrSchedulerConfig::new(
        vec![LrSchedulerConfig::Constant(0.1), LrSchedulerConfig::Constant(1e38)],
        vec![4],
    ));
    let config = DistillConfig::new(3, optimizer, schedule, hinton()).with_batch_size(16);
    let dir = scratch("nan");
    let batcher = ImageBatcher::new();
    let error = Distiller::new(config, &dir)
        .with_teacher(&oracle)
        .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
        .unwrap_err();
    let TrainError::NonFiniteLoss { epoch, checkpoint, .. } = &error else {
        panic!("expected a non-finite loss, got {error}");
    };
    assert_eq!(*epoch, 2, "{error}");
    let checkpoint = checkpoint.clone().expect("epoch 1 was checkpointed");
    assert!(checkpoint.ends_with("epoch-0001") && checkpoint.join("model.bpk").is_file());
    assert!(error.to_string().contains("epoch 2"));
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        1
    );
}

#[test]
fn early_stopping_ends_a_run_that_stopped_improving() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let oracle = oracle(&device);
    let train = Synthetic::new(32, 1, &oracle, &device);
    let valid = Synthetic::new(32, 2, &oracle, &device);
    let batcher = ImageBatcher::new();
    // A zero learning rate: nothing improves after the first epoch.
    let config = config(10, hinton(), 0.0).with_early_stopping(Some(EarlyStoppingConfig::new(Metric::Accuracy, 2)));
    let dir = scratch("early");
    let outcome = Distiller::new(config, &dir)
        .with_teacher(&oracle)
        .fit(
            student(5, 0.0, &device),
            FitData {
                train: &train,
                evals: &[EvalSet {
                    name: "valid",
                    dataset: &valid,
                }],
                train_batcher: &batcher,
                eval_batcher: &batcher,
            },
            &device,
        )
        .unwrap();
    assert_eq!(outcome.summary.status, RunStatus::EarlyStopped);
    assert_eq!((outcome.summary.epochs, outcome.summary.best_epoch), (3, 1));
    assert!(dir.join("checkpoints/best/model.bpk").is_file());
    // The directory now holds a run: a new run there is refused, nothing is overwritten.
    let again = Distiller::new(config_for_reuse(), &dir)
        .with_teacher(&oracle)
        .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
        .unwrap_err();
    assert!(
        matches!(&again, TrainError::RunExists { dir: d } if d == &dir),
        "{again:?}"
    );
    assert!(again.to_string().contains("already holds a run"), "{again}");
    // Nor does a device that records no gradients, or an empty training set, start anything.
    let empty = Subset::new(train.clone(), Vec::new());
    let (plain_dir, empty_dir) = (scratch("plain-device"), scratch("empty-set"));
    for (what, result) in [
        (
            "not autodiff",
            Distiller::new(config_for_reuse(), &plain_dir)
                .with_teacher(&oracle)
                .fit(
                    student(5, 0.0, &device),
                    FitData::new(&train, &batcher),
                    &devices().remove(0).device,
                ),
        ),
        (
            "empty",
            Distiller::new(config_for_reuse(), &empty_dir)
                .with_teacher(&oracle)
                .fit(student(5, 0.0, &device), FitData::new(&empty, &batcher), &device),
        ),
    ] {
        match (what, result.unwrap_err()) {
            ("not autodiff", TrainError::NotAutodiff) | ("empty", TrainError::EmptyTrainingSet) => {}
            (what, other) => panic!("{what}: {other:?}"),
        }
    }
    let empty_dir_left = |dir: &PathBuf| std::fs::read_dir(dir).unwrap().next().is_none();
    assert!(
        empty_dir_left(&plain_dir) && empty_dir_left(&empty_dir),
        "nothing written"
    );
}

fn config_for_reuse() -> DistillConfig {
    config(1, hinton(), 0.1)
}

#[test]
fn every_compiled_device_trains_and_evaluates() {
    let _serial = serial();
    for named in devices() {
        let device = named.device.autodiff();
        let oracle = oracle(&device);
        let train = Synthetic::new(48, 1, &oracle, &device);
        let valid = Synthetic::new(40, 2, &oracle, &device);
        let batcher = ImageBatcher::new();
        let dir = scratch(&format!("device-{}", named.name));
        let outcome = Distiller::new(config(2, hinton(), 0.1), &dir)
            .with_teacher(&oracle)
            .fit(
                student(5, 0.1, &device),
                FitData {
                    train: &train,
                    evals: &[EvalSet {
                        name: "valid",
                        dataset: &valid,
                    }],
                    train_batcher: &batcher,
                    eval_batcher: &batcher,
                },
                &device,
            )
            .unwrap();
        let record = &outcome.records[1];
        assert!(record.train.loss.is_finite() && record.train.hard_loss.is_some() && record.train.soft_loss.is_some());
        assert_eq!((record.train.examples, record.train.steps), (48, 3));
        let metrics = &record.eval[0].1;
        assert_eq!(
            (metrics.examples, metrics.errors),
            (40, 40 - (metrics.accuracy * 40.0).round() as usize)
        );
        assert!((0.0..=1.0).contains(&metrics.ece));
        for file in [
            "config.json",
            "metrics.jsonl",
            "summary.json",
            "checkpoints/epoch-0002/model.bpk",
        ] {
            assert!(dir.join(file).is_file(), "{}: {file}", named.name);
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["epochs"], 2);

        // The teacher agrees with itself and has no KL to itself.
        let module = oracle_module(&device);
        let frozen = FrozenTeacher::new(&module);
        let own = evaluate(&module, Some(&frozen), &valid, &batcher, 16, &device).unwrap();
        assert_eq!(
            (own.accuracy, own.teacher_agreement),
            (1.0, Some(1.0)),
            "{}",
            named.name
        );
        assert!(own.teacher_kl.unwrap().abs() < 1e-5);
    }
}

#[test]
fn feature_terms_train_their_connectors_with_adamw_and_warm_up() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let teacher_module = oracle_module(&device);
    let teacher = FrozenTeacher::new(&teacher_module);
    let train = Synthetic::new(64, 1, &oracle(&device), &device);
    let batcher = ImageBatcher::new();
    // A student half as wide: its hidden layer reaches the teacher's through a linear connector.
    let narrow = init_seeded(5, &device, |d| MlpConfig::new(WIDTH, vec![16], CLASSES).init(d));
    let schedule = LrSchedulerConfig::Sequential(SequentialLrSchedulerConfig::new(
        vec![
            LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(1e-4, 1e-2, 8)),
            LrSchedulerConfig::Cosine(CosineAnnealingLrSchedulerConfig::new(1e-2, 40)),
        ],
        vec![8],
    ));
    let config = DistillConfig::new(
        10,
        OptimizerConfig::AdamW(AdamWConfig::new().with_weight_decay(1e-4)),
        schedule,
        hinton(),
    )
    .with_batch_size(16)
    .with_features(vec![
        FeatureTermConfig::new("hidden.0".into(), "hidden.0".into())
            .with_weight(2.0)
            .with_connector(Some(ConnectorConfig::new(16, 32))),
    ]);
    let dir = scratch("features");
    let outcome = Distiller::new(config, &dir)
        .with_teacher(&teacher)
        .fit(narrow, FitData::new(&train, &batcher), &device)
        .unwrap();
    let feature_losses: Vec<f64> = outcome.records.iter().map(|r| r.train.feature_loss.unwrap()).collect();
    assert!(
        feature_losses[9] < 0.5 * feature_losses[0],
        "the connector and student learn the teacher's features: {feature_losses:?}"
    );
    // The learning rate warmed up, then decayed.
    let rates: Vec<f64> = outcome.records.iter().map(|r| r.train.learning_rate).collect();
    assert!(rates[0] < rates[1] && rates[9] < rates[3], "{rates:?}");

    // A tap the teacher lacks is an error naming it.
    let bad = DistillConfig::new(1, sgd(0.1, false).0, sgd(0.1, false).1, hinton())
        .with_features(vec![FeatureTermConfig::new("hidden.0".into(), "hidden.7".into())]);
    let error = Distiller::new(bad, scratch("bad-tap"))
        .with_teacher(&teacher)
        .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
        .unwrap_err();
    assert!(error.to_string().contains("hidden.7"), "{error}");
}

#[test]
fn a_language_model_distils_on_text_windows_with_perplexity() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let windows = ByteCorpus::load_default().unwrap().windows(16, 16).unwrap();
    let (train, valid) = windows.split(0.5).unwrap();
    let train = Subset::new(train, (0..64).collect());
    let valid = Subset::new(valid, (0..16).collect());
    let config = TransformerLmConfig::new(BYTE_VOCAB, 16)
        .with_layers(1)
        .with_width(32)
        .with_heads(2);
    let teacher_module: TransformerLm = init_seeded(1, &device, |d| config.init(d));
    let teacher = FrozenTeacher::new(&teacher_module);
    let student: TransformerLm = init_seeded(2, &device, |d| config.init(d));
    let (optimizer, schedule) = sgd(0.05, true);
    let objective = ObjectiveConfig::Divergence {
        loss: DivergenceLossConfig::new(Divergence::ForwardKl),
        hard_weight: 0.5,
    };
    let run = DistillConfig::new(2, optimizer, schedule, objective).with_batch_size(16);
    let outcome = Distiller::new(run, scratch("lm"))
        .with_teacher(&teacher)
        .fit(
            student,
            FitData {
                train: &train,
                evals: &[EvalSet {
                    name: "valid",
                    dataset: &valid,
                }],
                train_batcher: &TokenBatcher,
                eval_batcher: &TokenBatcher,
            },
            &device,
        )
        .unwrap();
    let record = &outcome.records[1];
    assert_eq!((record.train.examples, record.train.positions), (64, 64 * 16));
    let metrics = &record.eval[0].1;
    assert_eq!(metrics.positions, 16 * 16);
    let perplexity = metrics.perplexity.expect("a language model has a perplexity");
    assert!(
        (perplexity - metrics.loss.exp()).abs() < 1e-9 * perplexity && perplexity > 1.0,
        "perplexity {perplexity}, loss {}",
        metrics.loss
    );
    assert!(metrics.teacher_kl.unwrap().is_finite());
}

#[test]
fn every_objective_trains_with_adam() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let oracle = oracle(&device);
    let train = Synthetic::new(64, 1, &oracle, &device);
    let batcher = ImageBatcher::new();
    let objectives = [
        ObjectiveConfig::Supervised { label_smoothing: 0.1 },
        hinton(),
        ObjectiveConfig::Dkd(DkdLossConfig::new().with_temperature(2.0)),
        ObjectiveConfig::Divergence {
            loss: DivergenceLossConfig::new(Divergence::ReverseKl),
            hard_weight: 0.0,
        },
    ];
    for (index, objective) in objectives.into_iter().enumerate() {
        let config = DistillConfig::new(
            4,
            OptimizerConfig::Adam(AdamConfig::new()),
            LrSchedulerConfig::Constant(5e-3),
            objective,
        )
        .with_batch_size(16);
        let distiller = Distiller::new(config, scratch(&format!("objective-{index}")));
        let distiller = if index == 0 {
            distiller
        } else {
            distiller.with_teacher(&oracle)
        };
        let outcome = distiller
            .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
            .unwrap();
        let losses: Vec<f64> = outcome.records.iter().map(|r| r.train.loss).collect();
        assert!(losses[3] < losses[0], "objective {index}: {losses:?}");
    }
    // An objective that needs a teacher refuses to run without one.
    let config = DistillConfig::new(1, sgd(0.1, false).0, sgd(0.1, false).1, hinton());
    let error = Distiller::<Tensor<2>, 2>::new(config, scratch("no-teacher"))
        .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
        .unwrap_err();
    assert!(
        matches!(&error, TrainError::MissingTeacher { objective } if objective.contains("hinton")),
        "{error:?}"
    );

    // A bad loss setting is refused by `validate`, so a pipeline that checks its configs before
    // training hears of it first (it used to surface only when that phase's `fit` built the loss).
    for (objective, named) in [
        (
            ObjectiveConfig::Hinton(HintonKdLossConfig::new().with_temperature(0.0)),
            "temperature",
        ),
        (
            ObjectiveConfig::Hinton(HintonKdLossConfig::new().with_alpha(1.5)),
            "alpha",
        ),
    ] {
        let config = DistillConfig::new(1, sgd(0.1, false).0, sgd(0.1, false).1, objective);
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(named), "{named}: {error}");
    }
    assert!(
        DistillConfig::new(1, sgd(0.1, false).0, sgd(0.1, false).1, hinton())
            .validate()
            .is_ok()
    );
}

// ---------------------------------------------------------------------------------------------
// Language-model distillation: padding masks, sequence-level, on-policy, top-k caches, vocabularies.

fn tiny_lm(seed: u64, vocab: usize, width: usize, device: &Device) -> TransformerLm {
    let config = TransformerLmConfig::new(vocab, 16)
        .with_layers(1)
        .with_width(width)
        .with_heads(2);
    init_seeded(seed, device, |d| config.init(d))
}

fn adam_config(epochs: usize, objective: ObjectiveConfig, batch_size: usize) -> DistillConfig {
    DistillConfig::new(
        epochs,
        OptimizerConfig::Adam(AdamConfig::new()),
        LrSchedulerConfig::Constant(3e-3),
        objective,
    )
    .with_batch_size(batch_size)
    .with_seed(4)
}

fn divergence_objective(divergence: Divergence) -> ObjectiveConfig {
    ObjectiveConfig::Divergence {
        loss: DivergenceLossConfig::new(divergence).with_temperature(2.0),
        hard_weight: 0.0,
    }
}

/// Transcripts of different lengths (2 to 15 completion bytes after a 3-byte prompt).
fn ragged_transcripts() -> Vec<Transcript> {
    let text = "the quick brown fox jumps over the lazy dog while the cat sleeps";
    (0..6)
        .map(|i| {
            let start = i * 7;
            let length = 2 + (i * 5) % 14;
            Transcript::new(&text[start..start + 3], &text[start + 3..start + 3 + length])
        })
        .collect()
}

#[test]
fn token_level_kd_is_a_mean_over_valid_tokens_for_every_divergence() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let transcripts = ragged_transcripts();
    let teacher_module = tiny_lm(1, BYTE_VOCAB, 32, &device);
    let teacher = FrozenTeacher::new(&teacher_module);
    let divergences = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::GeneralizedJsd { beta: 0.3 },
        Divergence::SkewKl { alpha: 0.1 },
        Divergence::SkewReverseKl { alpha: 0.1 },
        Divergence::TotalVariation,
    ];
    for train_on_prompt in [false, true] {
        let dataset = TranscriptDataset::new(&transcripts, 16, BYTE_VOCAB, train_on_prompt).unwrap();
        let valid_tokens = dataset.target_tokens();
        for divergence in divergences {
            // One step per epoch: the first epoch's loss is the loss at the initial weights.
            let mut losses = Vec::new();
            // Padding to the batch's longest, with another id, and to a fixed longer length.
            for (pad, length) in [(0, None), (200, None), (7, Some(16))] {
                let batcher = SequenceBatcher { pad, length };
                let items: Vec<_> = (0..dataset.len()).map(|i| dataset.get(i).unwrap()).collect();
                let longest = items.iter().map(|item| item.tokens.len() - 1).max().unwrap();
                let inputs = burn::data::dataloader::batcher::Batcher::batch(&batcher, items, &device).inputs;
                assert_eq!(inputs.dims(), [dataset.len(), length.unwrap_or(longest)]);
                let student = tiny_lm(2, BYTE_VOCAB, 16, &device);
                let outcome = Distiller::new(
                    adam_config(1, divergence_objective(divergence), 6),
                    scratch(&format!("masked-{pad}")),
                )
                .with_teacher(&teacher)
                .with_progress(false)
                .fit(student, FitData::new(&dataset, &batcher), &device)
                .unwrap();
                assert_eq!(outcome.records[0].train.positions, valid_tokens, "{divergence:?}");
                losses.push(outcome.records[0].train.loss);
            }
            // The reference: each sequence alone, unpadded, summed over its counted positions.
            let student = tiny_lm(2, BYTE_VOCAB, 16, &device);
            let loss = DivergenceLossConfig::new(divergence).with_temperature(2.0).init();
            let mut total = 0.0;
            for index in 0..dataset.len() {
                let item = dataset.get(index).unwrap();
                let steps = item.tokens.len() - 1;
                let tokens: Vec<i64> = item.tokens[..steps].iter().map(|&t| i64::from(t)).collect();
                let input = Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(tokens, [1, steps]), &device);
                let s = student.forward(input.clone()).slice([0..1, item.loss_from..steps]);
                let t = teacher_module.forward(input).slice([0..1, item.loss_from..steps]);
                total += f64::from(
                    loss.forward(s, t, burn_distill_loss::Reduction::Sum)
                        .unwrap()
                        .into_scalar::<f32>(),
                );
            }
            let expected = total / valid_tokens as f64;
            for value in &losses {
                assert!(
                    (value - expected).abs() <= 1e-4 * expected.abs().max(1e-3),
                    "{divergence:?} (train_on_prompt {train_on_prompt}): {value} vs {expected} (pads give {losses:?})"
                );
            }
        }
    }
}

#[test]
fn sequence_level_kd_generates_round_trips_and_trains_on_jsonl() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let teacher = tiny_lm(7, BYTE_VOCAB, 32, &device);
    let prompts: Vec<Vec<u32>> = ["the ", "a ", "hacker ", "the ", "foo"]
        .iter()
        .map(|p| p.bytes().map(u32::from).collect())
        .collect();
    let sampling = burn_distill_model::SamplingConfig::new()
        .with_temperature(3.0)
        .with_top_k(Some(200))
        .with_top_p(Some(0.99))
        .with_seed(9);
    let first = generate_transcripts(&teacher, &prompts, 10, &sampling, 2, &device).unwrap();
    let again = generate_transcripts(&teacher, &prompts, 10, &sampling, 2, &device).unwrap();
    assert_eq!(first, again, "the same seed must give the same transfer set");
    let other = generate_transcripts(&teacher, &prompts, 10, &sampling.clone().with_seed(10), 2, &device).unwrap();
    assert_ne!(first, other, "another seed must give another transfer set");
    for (transcript, prompt) in first.iter().zip(&prompts) {
        assert_eq!(&transcript.prompt_ids(), prompt);
        assert_eq!(transcript.completion_ids().len(), 10);
    }
    // Same-length prompts in different batches (indices 0 and 3) are sampled independently.
    assert_ne!(first[0].completion_ids(), first[3].completion_ids());

    let dir = scratch("transcripts");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("transfer.jsonl");
    // Token ids that are not UTF-8 text survive the round trip exactly.
    let mut written = first.clone();
    written.push(Transcript::from_tokens(&[0xC3, 0x28], &[0xFF, 10, 65]));
    write_transcripts(&path, &written).unwrap();
    let read = read_transcripts(&path).unwrap();
    assert_eq!(read, written);
    assert_eq!(read[5].completion_ids(), vec![0xFF, 10, 65]);

    // Bad files and ids are refused with a reason.
    std::fs::write(
        dir.join("bad.jsonl"),
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 3}\n",
    )
    .unwrap();
    let error = read_transcripts(&dir.join("bad.jsonl")).unwrap_err().to_string();
    assert!(error.contains("line 2"), "{error}");
    let error = read_transcripts(&dir.join("missing.jsonl")).unwrap_err().to_string();
    assert!(error.contains("not found"), "{error}");
    let error = TranscriptDataset::new(&[Transcript::from_tokens(&[1, 2], &[300])], 16, BYTE_VOCAB, false)
        .unwrap_err()
        .to_string();
    assert!(error.contains("300") && error.contains("256"), "{error}");

    // Training on the text: forward KL to a TranscriptTeacher without smoothing is cross-entropy
    // on the transcript's completions.
    let dataset = TranscriptDataset::new(&read, 16, BYTE_VOCAB, false).unwrap();
    let text_teacher = TranscriptTeacher::new(&dataset, 0.0);
    let supervised = Distiller::<_, 3>::new(
        adam_config(3, ObjectiveConfig::Supervised { label_smoothing: 0.0 }, 3),
        scratch("seq-ce"),
    )
    .with_progress(false)
    .fit(
        tiny_lm(3, BYTE_VOCAB, 16, &device),
        FitData::new(&dataset, &SequenceBatcher::default()),
        &device,
    )
    .unwrap();
    let distilled = Distiller::new(
        adam_config(
            3,
            ObjectiveConfig::Divergence {
                loss: DivergenceLossConfig::new(Divergence::ForwardKl),
                hard_weight: 0.0,
            },
            3,
        ),
        scratch("seq-kl"),
    )
    .with_teacher(&text_teacher)
    .with_progress(false)
    .fit(
        tiny_lm(3, BYTE_VOCAB, 16, &device),
        FitData::new(&dataset, &SequenceBatcher::default()),
        &device,
    )
    .unwrap();
    for (a, b) in supervised.records.iter().zip(&distilled.records) {
        assert!(
            (a.train.loss - b.train.loss).abs() < 1e-4 * a.train.loss,
            "CE {} vs forward KL to the transcripts {}",
            a.train.loss,
            b.train.loss
        );
    }
    assert!(supervised.records[2].train.loss < supervised.records[0].train.loss);
    // A smoothed transcript teacher keeps reverse KL finite.
    let smoothed = TranscriptTeacher::new(&dataset, 0.1);
    let outcome = Distiller::new(
        adam_config(1, divergence_objective(Divergence::ReverseKl), 3),
        scratch("seq-rkl"),
    )
    .with_teacher(&smoothed)
    .with_progress(false)
    .fit(
        tiny_lm(3, BYTE_VOCAB, 16, &device),
        FitData::new(&dataset, &SequenceBatcher::default()),
        &device,
    )
    .unwrap();
    assert!(outcome.records[0].train.loss.is_finite());
}

fn text_data() -> (Subset<TextWindows>, Subset<TextWindows>) {
    let windows = ByteCorpus::load_default().unwrap().windows(16, 16).unwrap();
    let (train, valid) = windows.split(0.5).unwrap();
    (
        Subset::new(train, (0..24).collect()),
        Subset::new(valid, (0..8).collect()),
    )
}

#[test]
fn on_policy_rollouts_follow_lambda_and_score_only_generated_tokens() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let (train, valid) = text_data();
    let teacher_module = tiny_lm(1, BYTE_VOCAB, 32, &device);
    let teacher = FrozenTeacher::new(&teacher_module);
    let gkd = |lambda: f64| {
        adam_config(2, divergence_objective(Divergence::GeneralizedJsd { beta: 0.5 }), 8)
            .with_on_policy(Some(OnPolicyConfig::new().with_lambda(lambda).with_prompt_tokens(4)))
    };
    let evals = [EvalSet {
        name: "valid",
        dataset: &valid,
    }];
    let run = |config: DistillConfig, name: &str, on_policy: bool| {
        let distiller = Distiller::new(config, scratch(name))
            .with_teacher(&teacher)
            .with_progress(false);
        let student = tiny_lm(2, BYTE_VOCAB, 16, &device);
        if on_policy {
            distiller.fit_on_policy(student, FitData::new(&train, &TokenBatcher).with_evals(&evals), &device)
        } else {
            distiller.fit(student, FitData::new(&train, &TokenBatcher).with_evals(&evals), &device)
        }
        .unwrap()
    };
    // λ = 0: every step is the data step.
    let data = run(gkd(0.0).with_on_policy(None), "gkd-data", false);
    let zero = run(gkd(0.0), "gkd-zero", true);
    assert_eq!(data.records.len(), zero.records.len());
    for (a, b) in data.records.iter().zip(&zero.records) {
        assert_eq!(a.train.loss, b.train.loss);
        assert_eq!(a.train.positions, b.train.positions);
        assert_eq!(a.eval[0].1.loss, b.eval[0].1.loss);
    }
    // fit refuses an on-policy config rather than ignoring it.
    let error = Distiller::new(gkd(0.5), scratch("gkd-refused"))
        .with_teacher(&teacher)
        .fit(
            tiny_lm(2, BYTE_VOCAB, 16, &device),
            FitData::new(&train, &TokenBatcher).with_evals(&evals),
            &device,
        )
        .unwrap_err();
    assert!(error.to_string().contains("fit_on_policy"), "{error}");

    // λ = 1: every step is scored on the student's own continuations, prompts left out.
    let full = run(gkd(1.0), "gkd-one", true);
    let per_sequence = 16 - (4 - 1);
    assert_eq!(full.records[0].train.positions, 24 * per_sequence);
    assert!(full.records.iter().all(|r| r.train.loss.is_finite()));
    assert_ne!(full.records[1].eval[0].1.loss, data.records[1].eval[0].1.loss);

    // The rollout itself: prompt kept, targets are the next inputs, deterministic per step.
    let student = tiny_lm(2, BYTE_VOCAB, 16, &device);
    let items: Vec<_> = (0..3).map(|i| train.get(i).unwrap()).collect();
    let batch = burn::data::dataloader::batcher::Batcher::batch(&TokenBatcher, items, &device);
    let config = OnPolicyConfig::new().with_lambda(1.0).with_prompt_tokens(4);
    let host = |t: Tensor<2, burn::tensor::Int>| t.into_data().iter::<i64>().collect::<Vec<_>>();
    let a = roll_out(&student, batch.clone(), &config, 1, 5, 0).unwrap();
    let b = roll_out(&student, batch.clone(), &config, 1, 5, 0).unwrap();
    let c = roll_out(&student, batch.clone(), &config, 1, 6, 0).unwrap();
    let (inputs, targets, original) = (
        host(a.inputs.clone()),
        host(a.targets.clone()),
        host(batch.inputs.clone()),
    );
    assert_eq!(inputs, host(b.inputs.clone()));
    assert_ne!(inputs, host(c.inputs));
    for row in 0..3 {
        let (i, t, o) = (
            &inputs[row * 16..][..16],
            &targets[row * 16..][..16],
            &original[row * 16..][..16],
        );
        assert_eq!(i[..4], o[..4], "the prompt is the data's");
        assert!(
            t[..3].iter().all(|&x| x == IGNORE_INDEX),
            "prompt targets are ignored: {t:?}"
        );
        assert_eq!(t[3..15], i[4..16], "targets are the generated tokens");
    }
    let never = OnPolicyConfig::new().with_lambda(0.0).with_prompt_tokens(4);
    let kept = roll_out(&student, batch.clone(), &never, 1, 5, 0).unwrap();
    assert_eq!(host(kept.inputs), original);
    let too_long = OnPolicyConfig::new().with_lambda(1.0).with_prompt_tokens(16);
    assert!(roll_out(&student, batch, &too_long, 1, 5, 0).is_err());
}

#[test]
fn a_top_k_cache_trains_a_language_model_with_the_sparse_loss() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let (train, valid) = text_data();
    let teacher_module = tiny_lm(1, BYTE_VOCAB, 32, &device);
    let teacher = FrozenTeacher::new(&teacher_module);
    let dir = scratch("sparse");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("top8.bdkd");
    let options = CacheBuildOptions::new(CacheMode::TopK { k: 8 })
        .with_batch_size(8)
        .with_progress(false);
    build_cache(&path, &teacher, &train, &TokenBatcher, &device, &options).unwrap();
    let fingerprint = Teacher::<Tensor<2, burn::tensor::Int>, 3>::fingerprint(&teacher).unwrap();
    let cached = CachedTeacher::open(&path, &train, fingerprint, &device).unwrap();
    let sparse = ObjectiveConfig::Sparse {
        loss: SparseKlLossConfig::new().with_tail(TailPolicy::UniformTail),
        hard_weight: 0.0,
    };
    let evals = [EvalSet {
        name: "valid",
        dataset: &valid,
    }];
    let outcome = Distiller::new(adam_config(3, sparse.clone(), 8), dir.join("run"))
        .with_teacher(&cached)
        .with_eval_teacher(&teacher)
        .with_progress(false)
        .fit(
            tiny_lm(2, BYTE_VOCAB, 16, &device),
            FitData::new(&train, &TokenBatcher).with_evals(&evals),
            &device,
        )
        .unwrap();
    let kl: Vec<f64> = outcome
        .records
        .iter()
        .map(|r| r.eval[0].1.teacher_kl.unwrap())
        .collect();
    assert!(kl[2] < kl[0], "KL to the teacher must fall: {kl:?}");
    // A dense teacher cannot feed the sparse objective; a cache cannot score rollouts.
    let error = Distiller::new(adam_config(1, sparse, 8), dir.join("dense"))
        .with_teacher(&teacher)
        .fit(
            tiny_lm(2, BYTE_VOCAB, 16, &device),
            FitData::new(&train, &TokenBatcher).with_evals(&evals),
            &device,
        )
        .unwrap_err();
    assert!(error.to_string().contains("top-k"), "{error}");
    let error = Distiller::new(
        adam_config(1, divergence_objective(Divergence::ForwardKl), 8)
            .with_on_policy(Some(OnPolicyConfig::new().with_prompt_tokens(4))),
        dir.join("rollout"),
    )
    .with_teacher(&cached)
    .fit_on_policy(
        tiny_lm(2, BYTE_VOCAB, 16, &device),
        FitData::new(&train, &TokenBatcher).with_evals(&evals),
        &device,
    )
    .unwrap_err();
    assert!(matches!(error, TrainError::UnsuitableTeacher { .. }), "{error:?}");
    assert!(error.to_string().contains("live teacher"), "{error}");
}

#[test]
fn a_teacher_with_a_larger_vocabulary_distils_under_a_vocabulary_policy() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let (train, valid) = text_data();
    // The teacher has 4 extra ids (special tokens) the student lacks.
    let teacher_module = tiny_lm(1, BYTE_VOCAB + 4, 32, &device);
    let teacher = FrozenTeacher::new(&teacher_module);
    let evals = [EvalSet {
        name: "valid",
        dataset: &valid,
    }];
    let objective = |policy: VocabPolicy| ObjectiveConfig::Divergence {
        // Padding the student with -inf logits puts a log(0) under forward KL (documented):
        // pair it with reverse KL, which only weighs the student's own classes.
        loss: DivergenceLossConfig::new(if policy == VocabPolicy::PadWithNegInf {
            Divergence::ReverseKl
        } else {
            Divergence::ForwardKl
        })
        .with_vocab_policy(policy),
        hard_weight: 0.0,
    };
    let error = Distiller::new(
        adam_config(1, objective(VocabPolicy::Strict), 8),
        scratch("vocab-strict"),
    )
    .with_teacher(&teacher)
    .fit(
        tiny_lm(2, BYTE_VOCAB, 16, &device),
        FitData::new(&train, &TokenBatcher).with_evals(&evals),
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("256") && error.contains("260"), "{error}");
    for policy in [VocabPolicy::Truncate, VocabPolicy::PadWithNegInf] {
        let outcome = Distiller::new(adam_config(3, objective(policy), 8), scratch("vocab-policy"))
            .with_teacher(&teacher)
            .with_progress(false)
            .fit(
                tiny_lm(2, BYTE_VOCAB, 16, &device),
                FitData::new(&train, &TokenBatcher).with_evals(&evals),
                &device,
            )
            .unwrap();
        let kl: Vec<f64> = outcome
            .records
            .iter()
            .map(|r| r.eval[0].1.teacher_kl.unwrap())
            .collect();
        assert!(kl.iter().all(|k| k.is_finite()) && kl[2] < kl[0], "{policy:?}: {kl:?}");
    }
}

#[test]
fn flush_denormals_guards_the_thread_and_leaves_training_unchanged() {
    use std::hint::black_box;
    // First: a fit in a parallel test flushes the shared rayon pool while it runs.
    let _serial = serial();
    let halve_smallest_normal = || black_box(black_box(f32::MIN_POSITIVE) * black_box(0.5));
    assert!(halve_smallest_normal() > 0.0);
    {
        let _outer = FlushDenormals::enable();
        assert_eq!(halve_smallest_normal() == 0.0, FlushDenormals::SUPPORTED);
        {
            let _inner = FlushDenormals::enable();
            // A subnormal input reads as zero too (DAZ on x86).
            let subnormal = black_box(f32::from_bits(4));
            assert_eq!(black_box(subnormal * black_box(0.9)) == 0.0, FlushDenormals::SUPPORTED);
        }
        assert_eq!(
            halve_smallest_normal() == 0.0,
            FlushDenormals::SUPPORTED,
            "the inner guard restored the outer mode"
        );
    }
    assert!(halve_smallest_normal() > 0.0, "the mode is restored");

    // The pool form covers every rayon worker (where the CPU backends' matrix products run), nests,
    // and gives each thread its own mode back.
    let on_pool = || rayon::broadcast(|_| halve_smallest_normal() == 0.0);
    assert!(rayon::current_num_threads() >= 1 && on_pool().iter().all(|flushed| !flushed));
    {
        let _outer = FlushDenormals::enable_with_pool();
        assert!(on_pool().iter().all(|&flushed| flushed == FlushDenormals::SUPPORTED));
        assert_eq!(halve_smallest_normal() == 0.0, FlushDenormals::SUPPORTED);
        {
            let _inner = FlushDenormals::enable_with_pool();
        }
        assert!(
            on_pool().iter().all(|&flushed| flushed == FlushDenormals::SUPPORTED),
            "the inner guard restored the outer mode on the pool"
        );
    }
    assert!(on_pool().iter().all(|flushed| !flushed), "the pool's mode is restored");
    assert!(halve_smallest_normal() > 0.0, "the mode is restored");
    #[cfg(target_arch = "x86_64")]
    const {
        assert!(FlushDenormals::SUPPORTED)
    };

    // The mode touches nothing but subnormals: a run with it (the Distiller's default) and one
    // without end on the same weights, and the mode is off again after fitting.
    let device = devices().remove(0).device.autodiff();
    let oracle = oracle(&device);
    let train = Synthetic::new(64, 1, &oracle, &device);
    let batcher = ImageBatcher::new();
    let probes: Vec<Vec<f32>> = [true, false]
        .into_iter()
        .map(|flush| {
            let outcome = Distiller::new(config(4, hinton(), 0.05), scratch(&format!("flush-{flush}")))
                .with_teacher(&oracle)
                .with_flush_denormals(flush)
                .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
                .unwrap();
            assert!(halve_smallest_normal() > 0.0, "fit restores the mode");
            assert!(on_pool().iter().all(|flushed| !flushed), "fit restores the pool's mode");
            probe(&outcome.student, &device)
        })
        .collect();
    assert_eq!(probes[0], probes[1]);
}

/// Every float parameter of a module, in visiting order: its shape and values.
struct Parameters(Vec<(Vec<usize>, Vec<f32>)>);

impl burn::module::ModuleVisitor for Parameters {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        let value = param.val();
        self.0
            .push((value.dims().to_vec(), value.into_data().iter::<f32>().collect()));
    }
}

fn parameters(model: &Mlp) -> Vec<(Vec<usize>, Vec<f32>)> {
    use burn::module::Module;
    let mut visitor = Parameters(Vec::new());
    model.visit(&mut visitor);
    visitor.0
}

/// L2 norms of the columns of a row-major `[rows, columns]` matrix.
fn column_norms(shape: &[usize], values: &[f32]) -> Vec<f64> {
    let columns = shape[1];
    (0..columns)
        .map(|c| {
            values
                .iter()
                .skip(c)
                .step_by(columns)
                .map(|&v| f64::from(v).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

#[test]
fn max_norm_scales_long_columns_onto_the_ball_and_leaves_the_rest() {
    let _serial = serial();
    for named in devices() {
        let device = named.device.autodiff();
        let model = student(5, 0.0, &device);
        let before = parameters(&model);
        // The median column norm: about half the columns are outside the ball.
        let mut all: Vec<f64> = before
            .iter()
            .filter(|(shape, _)| shape.len() == 2)
            .flat_map(|(shape, values)| column_norms(shape, values))
            .collect();
        all.sort_by(f64::total_cmp);
        let c = all[all.len() / 2];
        // The student's weights, in visiting order: hidden.0, then output.
        for (modules, constrained) in [
            (vec![], [true, true]),
            (vec!["output".to_string()], [false, true]),
            (vec!["hidden".to_string()], [true, false]),
            (vec!["hidden.0".to_string()], [true, false]),
            (vec!["hidden.1".to_string(), "hid".to_string()], [false, false]),
        ] {
            let config = MaxNormConfig::new(c).with_modules(modules.clone());
            let after = parameters(&apply_max_norm(model.clone(), &config));
            let (mut scaled, mut kept, mut matrix) = (0, 0, 0);
            for ((shape, old), (new_shape, new)) in before.iter().zip(&after) {
                assert_eq!(shape, new_shape);
                if shape.len() != 2 {
                    assert_eq!(old, new, "{}: a bias changed", named.name);
                    continue;
                }
                let selected = constrained[matrix];
                matrix += 1;
                let columns = shape[1];
                for (column, norm) in column_norms(shape, old).into_iter().enumerate() {
                    let outside = selected && norm > c;
                    for row in 0..shape[0] {
                        let (o, n) = (old[row * columns + column], new[row * columns + column]);
                        if outside {
                            let expected = f64::from(o) * c / norm;
                            assert!(
                                (f64::from(n) - expected).abs() <= 1e-6 + 1e-5 * expected.abs(),
                                "{} {modules:?}: {n} vs {expected}",
                                named.name
                            );
                        } else {
                            assert_eq!(o.to_bits(), n.to_bits(), "{} {modules:?}: a column changed", named.name);
                        }
                    }
                    if outside {
                        scaled += 1;
                        let now = column_norms(shape, new)[column];
                        assert!((now - c).abs() < 1e-5 * c, "{}: {now} vs {c}", named.name);
                    } else if selected {
                        kept += 1;
                    }
                }
            }
            assert_eq!(matrix, 2);
            if constrained == [true, true] {
                assert!(scaled > 0 && kept > 0, "{}: {scaled} scaled, {kept} kept", named.name);
            }
        }
    }
}

#[test]
fn a_max_norm_run_keeps_every_column_on_the_ball_and_still_learns() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let oracle = oracle(&device);
    let train = Synthetic::new(64, 1, &oracle, &device);
    let batcher = ImageBatcher::new();
    let run = |config: DistillConfig, name: &str| {
        Distiller::new(config, scratch(name))
            .with_teacher(&oracle)
            .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
            .unwrap()
    };
    let widest = |model: &Mlp| {
        parameters(model)
            .iter()
            .filter(|(shape, _)| shape.len() == 2)
            .flat_map(|(shape, values)| column_norms(shape, values))
            .fold(0.0, f64::max)
    };
    let free = run(config(6, hinton(), 0.5), "max-norm-free");
    let c = 0.9;
    assert!(
        widest(&free.student) > 1.2 * c,
        "unconstrained: {}",
        widest(&free.student)
    );
    let capped = run(
        config(6, hinton(), 0.5).with_max_norm(Some(MaxNormConfig::new(c))),
        "max-norm-capped",
    );
    assert!(
        widest(&capped.student) <= c * (1.0 + 1e-5),
        "{}",
        widest(&capped.student)
    );
    let (first, last) = (&capped.records[0].train, &capped.records[5].train);
    assert!(
        last.loss < 0.8 * first.loss,
        "still learns: {} then {}",
        first.loss,
        last.loss
    );
    // A ball no column reaches changes nothing: the parameters keep their optimizer state.
    let loose = run(
        config(6, hinton(), 0.5).with_max_norm(Some(MaxNormConfig::new(1e6))),
        "max-norm-loose",
    );
    assert_eq!(probe(&loose.student, &device), probe(&free.student, &device));
    // A bad radius is refused before any work.
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let error = Distiller::new(
            config(1, hinton(), 0.5).with_max_norm(Some(MaxNormConfig::new(bad))),
            scratch("max-norm-bad"),
        )
        .with_teacher(&oracle)
        .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
        .unwrap_err();
        assert!(error.to_string().contains("max_norm"), "{error}");
    }
}

/// Each float parameter's gradient in `grads`, in visiting order (as [`parameters`]).
struct GradientValues<'a>(&'a burn::optim::GradientsParams, Vec<Vec<f32>>);

impl burn::module::ModuleVisitor for GradientValues<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        let grad = self.0.get::<D>(param.id).expect("every parameter has a gradient");
        self.1.push(grad.into_data().iter::<f32>().collect());
    }
}

#[test]
fn momentum_carries_over_a_max_norm_rescaling() {
    use burn::module::Module;
    use burn::optim::GradientsParams;
    let _serial = serial();
    for named in devices() {
        let device = named.device.autodiff();
        let inputs = probe_inputs(&device);
        let gradients = |model: &Mlp| {
            let loss = model.forward(inputs.clone()).powi_scalar(2).mean();
            let grads = GradientsParams::from_grads(loss.backward(), model);
            let mut values = GradientValues(&grads, Vec::new());
            model.visit(&mut values);
            let values = values.1;
            (grads, values)
        };
        let lr = 0.1;
        let mut optimizer = sgd(lr, true).0.init();
        let model = student(5, 0.0, &device);
        let (first, g1) = gradients(&model);
        let model = optimizer.step(lr, model, first);
        // A radius below every column's norm: both weight matrices are rescaled.
        let model = apply_max_norm(model, &MaxNormConfig::new(1e-3));
        let constrained = parameters(&model);
        let (second, g2) = gradients(&model);
        let model = optimizer.step(lr, model, second);
        // SGD, momentum 0.9, no dampening: the velocity is 0.9 g1 + g2 (g2 alone had the
        // rescaled parameters lost their state) and w2 = w1 - lr (0.9 g1 + g2).
        let mut momentum_term = 0.0f64;
        for (((shape, w1), (_, w2)), (g1, g2)) in constrained.iter().zip(&parameters(&model)).zip(g1.iter().zip(&g2)) {
            for i in 0..w1.len() {
                let velocity = 0.9 * f64::from(g1[i]) + f64::from(g2[i]);
                let expected = f64::from(w1[i]) - lr * velocity;
                assert!(
                    (f64::from(w2[i]) - expected).abs() <= 1e-6 + 1e-4 * expected.abs(),
                    "{} {shape:?}[{i}]: {} vs {expected}",
                    named.name,
                    w2[i]
                );
                momentum_term = momentum_term.max((lr * 0.9 * f64::from(g1[i])).abs());
            }
        }
        assert!(
            momentum_term > 1e-3,
            "{}: the test needs a momentum term: {momentum_term}",
            named.name
        );
    }
}

#[test]
fn metrics_are_read_back_bit_for_bit_and_reading_writes_nothing() {
    let dir = scratch("metrics-exact");
    std::fs::create_dir_all(&dir).unwrap();
    // Shortest representations that serde_json's default float parser reads one ulp off
    // (serde-rs/json#937, #1336); the workspace enables its `float_roundtrip`.
    let values = [
        0.09144338512092887f64,
        0.9146155235219107,
        1.5777777777770001,
        117.63331139400017,
    ];
    let line = |epoch: usize, value: f64| {
        format!(
            concat!(
                r#"{{"epoch":{},"train":{{"loss":{},"hard_loss":{},"soft_loss":null,"feature_loss":null,"#,
                r#""examples":60000,"positions":60000,"steps":469,"learning_rate":0.05,"seconds":{},"#,
                r#""teacher_seconds":0.0,"student_seconds":1.0,"data_seconds":0.1,"examples_per_second":1.0,"#,
                r#""positions_per_second":1.0}},"eval":[["test",{{"examples":10000,"positions":10000,"loss":{},"#,
                r#""accuracy":0.9605,"errors":395,"perplexity":null,"ece":{},"teacher_agreement":null,"#,
                r#""teacher_kl":null}}]],"eval_seconds":{}}}"#
            ),
            epoch, value, value, value, value, value, value
        )
    };
    let mut text: String = values
        .iter()
        .enumerate()
        .map(|(i, &value)| line(i + 1, value) + "\n")
        .collect();
    // A torn last line, as a killed run leaves: skipped, and left where it is.
    text.push_str(r#"{"epoch":5,"train":{"loss":0.1"#);
    let path = dir.join("metrics.jsonl");
    std::fs::write(&path, &text).unwrap();
    let records = read_metrics(&dir).unwrap();
    assert_eq!(records.len(), values.len());
    for (record, &value) in records.iter().zip(&values) {
        let eval = &record.eval[0].1;
        for (what, read) in [
            ("loss", record.train.loss),
            ("hard loss", record.train.hard_loss.unwrap()),
            ("seconds", record.train.seconds),
            ("eval loss", eval.loss),
            ("ece", eval.ece),
            ("eval seconds", record.eval_seconds),
        ] {
            assert_eq!(read.to_bits(), value.to_bits(), "{what}: {read} read back for {value}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "reading rewrote the file"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A training set whose example `bad` cannot be read.
struct Failing {
    inner: Synthetic,
    bad: usize,
}

impl Dataset<MnistItem> for Failing {
    fn get(&self, index: usize) -> std::result::Result<MnistItem, DatasetError> {
        if index == self.bad {
            return Err(DatasetError::new(std::io::Error::other("the disk went away")));
        }
        self.inner.get(index)
    }

    fn len(&self) -> usize {
        self.inner.len()
    }
}

impl Fingerprinted for Failing {
    fn fingerprint(&self) -> Fingerprint {
        self.inner.fingerprint()
    }
}

#[test]
fn run_time_failures_are_structured_errors_with_their_sources() {
    use std::error::Error as _;
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let oracle = oracle(&device);
    let batcher = ImageBatcher::new();

    // A dataset that fails mid-epoch: which set, which example, and the dataset's own error.
    let train = Failing {
        inner: Synthetic::new(32, 1, &oracle, &device),
        bad: 17,
    };
    let error = Distiller::<Tensor<2>, 2>::new(
        config(1, ObjectiveConfig::Supervised { label_smoothing: 0.0 }, 0.05),
        scratch("failing-data"),
    )
    .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
    .unwrap_err();
    match &error {
        TrainError::Dataset { set, index, .. } => assert_eq!((*set, *index), ("training data", 17)),
        other => panic!("expected a dataset error, got {other:?}"),
    }
    assert!(error.to_string().contains("the disk went away"), "{error}");
    assert!(error.source().is_some());

    // A run directory that cannot be made (its parent is a file): the path and the OS error.
    let blocker = scratch("blocker").join("a-file");
    std::fs::write(&blocker, b"a file").unwrap();
    let train = Synthetic::new(32, 1, &oracle, &device);
    let error = Distiller::<Tensor<2>, 2>::new(
        config(1, ObjectiveConfig::Supervised { label_smoothing: 0.0 }, 0.05),
        blocker.join("run"),
    )
    .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
    .unwrap_err();
    match &error {
        TrainError::Io { path, source } => {
            assert!(path.starts_with(&blocker), "{path:?}");
            assert!(error.source().is_some() && !source.to_string().is_empty());
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    let _ = std::fs::remove_file(&blocker);
}

/// An objective defined here, outside the crate: Ba & Caruana's (2014) regression of the
/// student's logits on the teacher's, the mean squared difference over classes.
struct LogitMatching;

impl Objective for LogitMatching {
    fn name(&self) -> &str {
        "logit_matching"
    }

    fn needs_teacher(&self) -> bool {
        true
    }

    fn loss(&self, input: ObjectiveInput) -> burn_distill_train::Result<ObjectiveLoss> {
        let teacher = input.teacher()?.dense.clone();
        let squared = (input.student.clone() - teacher).powi_scalar(2).mean_dim(1);
        Ok(ObjectiveLoss::soft(input.sum_over_valid(squared.squeeze_dim::<1>(1))))
    }
}

#[test]
fn an_objective_defined_outside_the_crate_trains_and_is_recorded_by_name() {
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let oracle = oracle(&device);
    let train = Synthetic::new(64, 1, &oracle, &device);
    let valid = Synthetic::new(2000, 2, &oracle, &device);
    let evals = [EvalSet {
        name: "valid",
        dataset: &valid,
    }];
    let batcher = ImageBatcher::new();
    let custom = ObjectiveConfig::Custom {
        name: "logit_matching".into(),
    };
    let dir = scratch("custom-objective");
    let outcome = Distiller::new(config(40, custom.clone(), 0.03), &dir)
        .with_teacher(&oracle)
        .with_objective(&LogitMatching)
        .fit(
            student(5, 0.0, &device),
            FitData::new(&train, &batcher).with_evals(&evals),
            &device,
        )
        .unwrap();
    let soft = |epoch: usize| {
        outcome.records[epoch]
            .train
            .soft_loss
            .expect("the objective's soft term")
    };
    assert!(
        soft(39) < 0.2 * soft(0),
        "the squared logit gap fell from {} to {}",
        soft(0),
        soft(39)
    );
    let agreement = outcome.summary.last.eval[0].1.teacher_agreement.unwrap();
    assert!(
        agreement > 0.8,
        "agreement with the teacher {agreement:.3}; soft {} -> {}",
        soft(0),
        soft(39)
    );
    let saved = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(
        saved.contains("logit_matching"),
        "config.json names the objective: {saved}"
    );

    // A config naming another objective, or none given for a custom config: refused up front.
    let other = ObjectiveConfig::Custom { name: "other".into() };
    let error = Distiller::new(config(1, other, 0.01), scratch("custom-other"))
        .with_teacher(&oracle)
        .with_objective(&LogitMatching)
        .fit(
            student(5, 0.0, &device),
            FitData::new(&train, &batcher).with_evals(&evals),
            &device,
        )
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`other`") && error.contains("`logit_matching`"),
        "{error}"
    );
    let error = Distiller::new(config(1, custom, 0.01), scratch("custom-missing"))
        .with_teacher(&oracle)
        .fit(
            student(5, 0.0, &device),
            FitData::new(&train, &batcher).with_evals(&evals),
            &device,
        )
        .unwrap_err()
        .to_string();
    assert!(error.contains("with_objective"), "{error}");
}

#[test]
fn the_hinton_objective_runs_fused_with_the_composed_terms_and_gradient() {
    // 37 positions × 10 classes, three ignored, label smoothing on: the fused path's loss and
    // gradient and the terms it reports against Hinton KD composed from tensor operations.
    let (positions, classes) = (37, 10);
    let value = |i: usize, seed: usize| ((i * 7919 + seed * 104_729) % 1000) as f32 / 125.0 - 4.0;
    for named in devices().into_iter().filter(|named| fused_available(&named.device)) {
        let device = named.device.autodiff();
        let logits = |seed| {
            let values: Vec<f32> = (0..positions * classes).map(|i| value(i, seed)).collect();
            Tensor::<2>::from_data(TensorData::new(values, [positions, classes]), &device)
        };
        let labels: Vec<i64> = (0..positions)
            .map(|i| {
                if i % 12 == 5 {
                    IGNORE_INDEX
                } else {
                    (i % classes) as i64
                }
            })
            .collect();
        let targets = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(labels, [positions]), &device);
        let normaliser = positions - 3;
        let config = HintonKdLossConfig::new()
            .with_alpha(0.3)
            .with_temperature(3.0)
            .with_label_smoothing(0.1);
        let objective = BuiltinObjective::new(&ObjectiveConfig::Hinton(config.clone())).unwrap();
        let fused_student = logits(1).require_grad();
        let mask = targets.clone().not_equal_elem(IGNORE_INDEX);
        let fused = objective
            .loss(ObjectiveInput {
                student: fused_student.clone(),
                head: None,
                teacher: Some(TeacherLogits {
                    dense: logits(2),
                    top_k: None,
                }),
                targets: targets.clone(),
                mask: Some(mask),
                normaliser,
                check_inputs: true,
            })
            .unwrap();
        let composed_student = logits(1).require_grad();
        let composed = config
            .with_implementation(Implementation::Composed)
            .init()
            .forward_terms(
                composed_student.clone(),
                logits(2),
                targets,
                Reduction::SumOver(normaliser),
            )
            .unwrap();
        let scalar = |t: &Tensor<1>| f64::from(t.clone().into_scalar::<f32>());
        let close = |what: &str, a: f64, b: f64| {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{}: {what} {a} vs composed {b}",
                named.name
            )
        };
        close("loss", scalar(&fused.total), scalar(&composed.loss));
        close("hard", scalar(fused.hard.as_ref().unwrap()), scalar(&composed.hard));
        close("soft", scalar(fused.soft.as_ref().unwrap()), scalar(&composed.soft));
        let grad = |loss: Tensor<1>, student: &Tensor<2>| -> Vec<f32> {
            let grads = loss.backward();
            student.grad(&grads).unwrap().into_data().iter::<f32>().collect()
        };
        let (a, b) = (
            grad(fused.total, &fused_student),
            grad(composed.loss, &composed_student),
        );
        let largest = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * largest,
                "{}: gradient[{i}] {a} vs {b}",
                named.name
            );
        }
    }
}

#[test]
fn every_headed_builtin_objective_equals_its_dense_form() {
    // 29 positions, width 6, 37 classes, four positions ignored: each built-in that takes a
    // head gives, from hidden states and a head weight, the loss and the gradients (w.r.t. both)
    // that it gives from their product.
    let (positions, width, classes, k) = (29, 6, 37, 5);
    let value = |i: usize, seed: usize| ((i * 7919 + seed * 104_729) % 1000) as f32 / 250.0 - 2.0;
    let objectives = [
        ObjectiveConfig::Supervised { label_smoothing: 0.0 },
        ObjectiveConfig::Hinton(HintonKdLossConfig::new().with_alpha(0.3).with_temperature(2.0)),
        ObjectiveConfig::Divergence {
            loss: DivergenceLossConfig::new(Divergence::ReverseKl).with_temperature(1.5),
            hard_weight: 0.5,
        },
        ObjectiveConfig::Divergence {
            loss: DivergenceLossConfig::new(Divergence::GeneralizedJsd { beta: 0.5 }),
            hard_weight: 0.0,
        },
        ObjectiveConfig::Sparse {
            loss: SparseKlLossConfig::new().with_tail(TailPolicy::UniformTail),
            hard_weight: 0.2,
        },
        ObjectiveConfig::Sparse {
            loss: SparseKlLossConfig::new().with_temperature(2.0),
            hard_weight: 0.0,
        },
        ObjectiveConfig::SampledReverseKl,
    ];
    for named in devices() {
        let device = named.device.autodiff();
        let matrix = |rows: usize, cols: usize, seed| {
            let values: Vec<f32> = (0..rows * cols).map(|i| value(i, seed)).collect();
            Tensor::<2>::from_data(TensorData::new(values, [rows, cols]), &device)
        };
        let labels: Vec<i64> = (0..positions)
            .map(|i| {
                if i % 7 == 3 {
                    IGNORE_INDEX
                } else {
                    ((i * 5) % classes) as i64
                }
            })
            .collect();
        let targets = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(labels, [positions]), &device);
        let teacher = matrix(positions, classes, 3).mul_scalar(2.0);
        let (log_probs, indices) = burn::tensor::activation::log_softmax(teacher.clone(), 1).topk_with_indices(k, 1);
        let mask = targets.clone().not_equal_elem(IGNORE_INDEX);
        for config in &objectives {
            let objective = BuiltinObjective::new(config).unwrap();
            assert!(objective.takes_head(), "{config:?}");
            let run = |headed: bool| {
                let hidden = matrix(positions, width, 1).require_grad();
                let head = matrix(classes, width, 2).require_grad();
                let (student, head_input) = if headed {
                    (hidden.clone(), Some(head.clone()))
                } else {
                    (hidden.clone().matmul(head.clone().transpose()), None)
                };
                let loss = objective
                    .loss(ObjectiveInput {
                        student,
                        head: head_input,
                        teacher: Some(TeacherLogits {
                            dense: teacher.clone(),
                            top_k: Some((indices.clone(), log_probs.clone())),
                        }),
                        targets: targets.clone(),
                        mask: Some(mask.clone()),
                        normaliser: positions - 4,
                        check_inputs: true,
                    })
                    .unwrap();
                let total: f32 = loss.total.clone().into_scalar();
                let grads = loss.total.backward();
                let read = |tensor: &Tensor<2>| -> Vec<f32> {
                    tensor.grad(&grads).unwrap().into_data().iter::<f32>().collect()
                };
                (total, read(&hidden), read(&head))
            };
            let (headed, dense) = (run(true), run(false));
            assert!(
                (headed.0 - dense.0).abs() <= 1e-5 * dense.0.abs().max(1.0),
                "{} {config:?}: loss {} vs dense {}",
                named.name,
                headed.0,
                dense.0
            );
            for (what, a, b) in [("d hidden", &headed.1, &dense.1), ("d head", &headed.2, &dense.2)] {
                let largest = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (a, b)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-5 * largest,
                        "{} {config:?}: {what}[{i}] {a} vs dense {b}",
                        named.name
                    );
                }
            }
        }
    }
    for config in [
        ObjectiveConfig::Supervised { label_smoothing: 0.1 },
        ObjectiveConfig::Dkd(DkdLossConfig::new()),
    ] {
        assert!(!BuiltinObjective::new(&config).unwrap().takes_head(), "{config:?}");
    }
}

/// A built-in objective that never takes a head: the distiller then asks for the logits.
struct Dense(BuiltinObjective);

/// A built-in objective that checks it is given a head.
struct Headed(BuiltinObjective);

impl Objective for Headed {
    fn name(&self) -> &str {
        "headed"
    }
    fn needs_teacher(&self) -> bool {
        self.0.needs_teacher()
    }
    fn takes_head(&self) -> bool {
        self.0.takes_head()
    }
    fn loss(&self, input: ObjectiveInput) -> Result<ObjectiveLoss> {
        assert!(input.head.is_some(), "a Llama student gave its logits, not its head");
        self.0.loss(input)
    }
}

impl Objective for Dense {
    fn name(&self) -> &str {
        "dense"
    }
    fn needs_teacher(&self) -> bool {
        self.0.needs_teacher()
    }
    fn loss(&self, input: ObjectiveInput) -> Result<ObjectiveLoss> {
        assert!(input.head.is_none(), "a dense objective was given a head");
        self.0.loss(input)
    }
}

#[test]
fn a_llama_student_trains_through_the_chunked_head_as_through_its_logits() {
    // The distiller gives a Llama's hidden states and head to objectives that take them; two
    // epochs of KD from a Llama teacher end at the weights that the logits path reaches.
    let _serial = serial();
    let device = devices().remove(0).device.autodiff();
    let windows = ByteCorpus::load_default().unwrap().windows(12, 12).unwrap();
    let (train, _) = windows.split(0.5).unwrap();
    let train = Subset::new(train, (0..24).collect());
    let llama = |layers: usize, width: usize, seed: u64| {
        let config = burn_distill_model::llm::LlamaConfig::new(BYTE_VOCAB, width, 2 * width, layers, 2);
        init_seeded(seed, &device, |d| config.init(d).unwrap())
    };
    let teacher_module = llama(2, 32, 1);
    let teacher = FrozenTeacher::new(&teacher_module);
    let objective = ObjectiveConfig::Divergence {
        loss: DivergenceLossConfig::new(Divergence::ForwardKl).with_temperature(2.0),
        hard_weight: 0.3,
    };
    let dense = Dense(BuiltinObjective::new(&objective).unwrap());
    let headed = Headed(BuiltinObjective::new(&objective).unwrap());
    let (optimizer, schedule) = sgd(0.05, true);
    let run = |name: &str, objective_config: ObjectiveConfig, custom: Option<&dyn Objective>| {
        let config = DistillConfig::new(2, optimizer.clone(), schedule.clone(), objective_config).with_batch_size(8);
        let distiller = Distiller::new(config, scratch(name)).with_teacher(&teacher);
        let distiller = match custom {
            Some(objective) => distiller.with_objective(objective),
            None => distiller,
        };
        let outcome = distiller
            .fit(llama(1, 16, 2), FitData::new(&train, &TokenBatcher), &device)
            .unwrap();
        let loss = outcome.records[1].train.loss;
        (loss, probe_llama(&outcome.student))
    };
    let (head_loss, head_weights) = run(
        "llama-head",
        ObjectiveConfig::Custom { name: "headed".into() },
        Some(&headed as &dyn Objective),
    );
    let (dense_loss, dense_weights) = run(
        "llama-dense",
        ObjectiveConfig::Custom { name: "dense".into() },
        Some(&dense as &dyn Objective),
    );
    assert!(
        (head_loss - dense_loss).abs() <= 1e-4 * dense_loss,
        "loss {head_loss} vs {dense_loss}"
    );
    let largest = dense_weights.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = head_weights
        .iter()
        .zip(&dense_weights)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-4 * largest, "weights differ by {worst} (largest {largest})");
    assert!(
        head_weights
            != llama(1, 16, 2)
                .head_weight()
                .into_data()
                .iter::<f32>()
                .collect::<Vec<_>>(),
        "the student trained"
    );
}

fn probe_llama(model: &burn_distill_model::llm::Llama) -> Vec<f32> {
    model.head_weight().into_data().iter::<f32>().collect()
}

#[test]
fn a_llama_distils_from_a_top_k_cache_of_a_real_tokenizers_chat_answers() {
    // The white-box chain of chat distillation: a Llama teacher (the tiny GGUF fixture, its
    // own BPE tokenizer and chat template) answers prompts into a transfer set; a top-k cache
    // of its log-probabilities on those answers; a smaller Llama student learns from the cache
    // through the chunked head, loss on answer tokens only, and comes closer to the teacher.
    use burn_distill_data::{AnswerOptions, ChatPrompt, answer_prompts};
    use burn_distill_model::SamplingConfig;
    use burn_distill_model::llm::{ChatMessage, ChatTokenizer, LlamaConfig, load_gguf};
    let _serial = serial();
    let device = devices().remove(0).device;
    let training = device.clone().autodiff();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let (teacher_module, gguf) = load_gguf(fixture.join("tiny-q8_0.gguf"), &device).unwrap();
    let tokenizer = ChatTokenizer::from_gguf(&gguf).unwrap();
    let vocab = teacher_module.config().vocab_size;
    let prompts: Vec<ChatPrompt> = ["cruft", "kluge", "hack", "foo", "bar", "frob", "grok", "nybble"]
        .iter()
        .map(|term| ChatPrompt {
            id: term.to_string(),
            messages: vec![ChatMessage::user(format!("Explain the jargon term \"{term}\"."))],
        })
        .collect();
    let dir = scratch("chat-white-box");
    std::fs::create_dir_all(&dir).unwrap();
    let answers = answer_prompts(
        &teacher_module,
        &tokenizer,
        &prompts,
        &AnswerOptions {
            max_new_tokens: 12,
            sampling: SamplingConfig::new().with_temperature(1.0).with_seed(5),
            batch_size: 4,
        },
        &dir.join("answers.jsonl"),
        |_, _| {},
    )
    .unwrap();
    let transcripts: Vec<Transcript> = answers.iter().map(|answer| answer.transcript()).collect();
    let context = transcripts
        .iter()
        .map(|t| t.prompt_ids().len() + t.completion_ids().len() - 1)
        .max()
        .unwrap();
    let dataset = TranscriptDataset::new(&transcripts, context, vocab, false).unwrap();
    let teacher = FrozenTeacher::new(&teacher_module);
    let fingerprint = Teacher::<Tensor<2, burn::tensor::Int>, 3>::fingerprint(&teacher).unwrap();
    let path = dir.join("top16.bdkd");
    let _ = std::fs::remove_file(&path);
    let options = CacheBuildOptions::new(CacheMode::TopK { k: 16 })
        .with_batch_size(4)
        .with_progress(false)
        .with_teacher_fingerprint(fingerprint);
    build_cache(
        &path,
        &teacher,
        &dataset,
        &SequenceBatcher::default(),
        &device,
        &options,
    )
    .unwrap();
    let cached = CachedTeacher::open(&path, &dataset, fingerprint, &device).unwrap();

    let student = || {
        let config = LlamaConfig::new(vocab, 32, 64, 1, 2);
        init_seeded(9, &training, |d| config.init(d).unwrap())
    };
    let sparse = ObjectiveConfig::Sparse {
        loss: SparseKlLossConfig::new().with_tail(TailPolicy::UniformTail),
        hard_weight: 0.0,
    };
    let headed = Headed(BuiltinObjective::new(&sparse).unwrap());
    let kl_before = evaluate(
        &student(),
        Some(&teacher as &dyn Teacher<Tensor<2, burn::tensor::Int>, 3>),
        &dataset,
        &SequenceBatcher::default(),
        8,
        &training,
    )
    .unwrap()
    .teacher_kl
    .unwrap();
    let config = adam_config(6, ObjectiveConfig::Custom { name: "headed".into() }, 4);
    let outcome = Distiller::new(config, dir.join("run"))
        .with_teacher(&cached)
        .with_objective(&headed)
        .with_eval_teacher(&teacher)
        .fit(
            student(),
            FitData::new(&dataset, &SequenceBatcher::default()).with_evals(&[EvalSet {
                name: "answers",
                dataset: &dataset,
            }]),
            &training,
        )
        .unwrap();
    let record = outcome.records.last().unwrap();
    let answer_tokens: usize = answers.iter().map(|a| a.answer_tokens.len()).sum();
    assert_eq!(
        record.train.positions, answer_tokens,
        "the loss counts answer tokens only"
    );
    let kl_after = record.eval[0].1.teacher_kl.unwrap();
    assert!(
        kl_after < 0.8 * kl_before,
        "KL to the teacher on its answers: {kl_before} before, {kl_after} after"
    );
}

#[test]
fn chrf_equals_sacrebleu_sentence_by_sentence_and_for_the_corpus() {
    // tests/fixtures/chrf.json: scripts/make_chrf_fixtures.py (sacrebleu 2.6.0, CHRF defaults).
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chrf.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let pairs: Vec<(String, String, f64)> = fixture["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair["hypothesis"].as_str().unwrap().to_string(),
                pair["reference"].as_str().unwrap().to_string(),
                pair["chrf"].as_f64().unwrap(),
            )
        })
        .collect();
    assert!(pairs.len() >= 10);
    for (hypothesis, reference, expected) in &pairs {
        let got = chrf(hypothesis, reference);
        assert!(
            (got - expected).abs() < 1e-9,
            "{hypothesis:?} vs {reference:?}: {got}, sacrebleu {expected}"
        );
    }
    let corpus = corpus_chrf(pairs.iter().map(|(h, r, _)| (h.as_str(), r.as_str())));
    let expected = fixture["corpus"].as_f64().unwrap();
    assert!(
        (corpus - expected).abs() < 1e-9,
        "corpus {corpus}, sacrebleu {expected}"
    );
}

#[test]
fn on_policy_rollouts_of_chat_transcripts_keep_each_prompt_and_stop_at_eos() {
    use burn_distill_model::llm::{ChatMessage, ChatTokenizer, load_gguf};
    use burn_distill_model::{Generator, SamplingConfig};
    let _serial = serial();
    let device = devices().remove(0).device;
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let (student, gguf) = load_gguf(fixture.join("tiny-q8_0.gguf"), &device).unwrap();
    let tokenizer = ChatTokenizer::from_gguf(&gguf).unwrap();
    let eos = tokenizer.eos_ids().to_vec();
    // Prompts of different lengths, with made-up answers of different lengths.
    let transcripts: Vec<Transcript> = ["a", "a longer question", "mid one"]
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let prompt = tokenizer.encode_chat(&[ChatMessage::user(*text)], true).unwrap();
            let answer: Vec<u32> = (0..3 + 2 * i as u32).map(|t| 40 + t).collect();
            Transcript::from_tokens(&prompt, &answer)
        })
        .collect();
    let context = transcripts
        .iter()
        .map(|t| t.prompt_ids().len() + t.completion_ids().len() - 1)
        .max()
        .unwrap();
    let dataset = TranscriptDataset::new(&transcripts, context, 320, false).unwrap();
    let items: Vec<_> = (0..dataset.len()).map(|i| dataset.get(i).unwrap()).collect();
    let batch = burn::data::dataloader::batcher::Batcher::batch(&SequenceBatcher::default(), items, &device);
    let [rows, length] = batch.inputs.dims();
    let host = |t: &Tensor<2, burn::tensor::Int>| t.clone().into_data().iter::<i64>().collect::<Vec<_>>();
    let (before_inputs, before_targets) = (host(&batch.inputs), host(&batch.targets));
    for stops in [vec![], eos.clone(), (0..320).collect::<Vec<u32>>()] {
        let config = OnPolicyConfig::new()
            .with_lambda(1.0)
            .with_chat_prompts(true)
            .with_stop_tokens(stops.clone())
            .with_sampling(SamplingConfig::new().with_temperature(1.0));
        let rolled = roll_out(&student, batch.clone(), &config, 3, 0, 0).unwrap();
        assert_eq!(rolled.inputs.dims(), [rows, length]);
        let (inputs, targets) = (host(&rolled.inputs), host(&rolled.targets));
        for r in 0..rows {
            let row = |v: &[i64]| v[r * length..(r + 1) * length].to_vec();
            let (input, target, old_target) = (row(&inputs), row(&targets), row(&before_targets));
            let prompt = old_target.iter().position(|&t| t != IGNORE_INDEX).unwrap() + 1;
            assert_eq!(
                input[..prompt],
                row(&before_inputs)[..prompt],
                "row {r}: the prompt is kept"
            );
            assert!(
                target[..prompt - 1].iter().all(|&t| t == IGNORE_INDEX),
                "row {r}: no loss on the prompt"
            );
            let counted: Vec<usize> = (0..length).filter(|&j| target[j] != IGNORE_INDEX).collect();
            assert!(
                !counted.is_empty() && counted[0] == prompt - 1,
                "row {r}: the answer starts after the prompt"
            );
            assert_eq!(
                counted,
                (counted[0]..counted[0] + counted.len()).collect::<Vec<_>>(),
                "row {r}: one run"
            );
            for &j in &counted {
                if j + 1 < length {
                    assert_eq!(target[j], input[j + 1], "row {r}: targets are the next inputs");
                }
                let is_stop = stops.contains(&(target[j] as u32));
                assert!(
                    !is_stop || j == *counted.last().unwrap(),
                    "row {r}: nothing is counted after a stop"
                );
            }
            if stops.len() == 320 {
                assert_eq!(counted.len(), 1, "row {r}: every token stops");
            }
        }
    }
    // The generic form (each prompt length on its own) cuts at the stop tokens too.
    let prompts = vec![vec![1u32, 2, 3], vec![4], vec![5, 6, 7]];
    let sampling = SamplingConfig::new().with_temperature(1.0);
    let byte_lm: TransformerLm = init_seeded(3, &device, |d| {
        TransformerLmConfig::new(BYTE_VOCAB, 16)
            .with_layers(1)
            .with_width(16)
            .with_heads(2)
            .init(d)
    });
    let free = byte_lm.generate_rows(&prompts, 5, &sampling, &[], &device);
    assert!(free.iter().all(|answer| answer.len() == 5), "{free:?}");
    let all: Vec<u32> = (0..BYTE_VOCAB as u32).collect();
    let cut = byte_lm.generate_rows(&prompts, 5, &sampling, &all, &device);
    assert!(cut.iter().all(|answer| answer.len() == 1), "{cut:?}");
    assert_eq!(
        cut.iter().map(|a| a[0]).collect::<Vec<_>>(),
        free.iter().map(|a| a[0]).collect::<Vec<_>>()
    );
}

#[test]
fn the_sampled_reverse_kl_is_the_per_token_estimate_with_its_policy_gradient() {
    // Value: mean over counted positions of log q(y) − log p(y). Gradient w.r.t. the student's
    // logits: sg(log q(y) − log p(y)) · (onehot(y) − q) / N, from its analytic form in f64.
    let (positions, classes) = (11, 7);
    let value = |i: usize, seed: usize| ((i * 7919 + seed * 104_729) % 1000) as f64 / 250.0 - 2.0;
    let device = devices().remove(0).device.autodiff();
    let student: Vec<f64> = (0..positions * classes).map(|i| value(i, 1)).collect();
    let teacher: Vec<f64> = (0..positions * classes).map(|i| value(i, 2)).collect();
    let labels: Vec<i64> = (0..positions)
        .map(|i| {
            if i == 4 {
                IGNORE_INDEX
            } else {
                ((i * 3) % classes) as i64
            }
        })
        .collect();
    let tensor = |values: &[f64]| {
        let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        Tensor::<2>::from_data(TensorData::new(values, [positions, classes]), &device)
    };
    let student_tensor = tensor(&student).require_grad();
    let targets = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(labels.clone(), [positions]), &device);
    let objective = BuiltinObjective::new(&ObjectiveConfig::SampledReverseKl).unwrap();
    let loss = objective
        .loss(ObjectiveInput {
            student: student_tensor.clone(),
            head: None,
            teacher: Some(TeacherLogits {
                dense: tensor(&teacher),
                top_k: None,
            }),
            targets: targets.clone(),
            mask: Some(targets.not_equal_elem(IGNORE_INDEX)),
            normaliser: positions - 1,
            check_inputs: true,
        })
        .unwrap();
    let got: f32 = loss.total.clone().into_scalar();
    let grads = loss.total.backward();
    let grad: Vec<f32> = student_tensor.grad(&grads).unwrap().into_data().iter::<f32>().collect();
    let log_softmax = |row: &[f64]| {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        row.iter().map(|v| v - lse).collect::<Vec<f64>>()
    };
    let n = (positions - 1) as f64;
    let (mut estimate, mut expected_grad) = (0.0, vec![0.0; positions * classes]);
    for i in (0..positions).filter(|&i| labels[i] != IGNORE_INDEX) {
        let y = labels[i] as usize;
        let q = log_softmax(&student[i * classes..(i + 1) * classes]);
        let p = log_softmax(&teacher[i * classes..(i + 1) * classes]);
        let advantage = q[y] - p[y];
        estimate += advantage / n;
        for c in 0..classes {
            let onehot = if c == y { 1.0 } else { 0.0 };
            expected_grad[i * classes + c] = advantage * (onehot - q[c].exp()) / n;
        }
    }
    assert!(
        (f64::from(got) - estimate).abs() < 1e-5,
        "value {got}, estimate {estimate}"
    );
    for (i, (a, b)) in grad.iter().zip(&expected_grad).enumerate() {
        assert!((f64::from(*a) - b).abs() < 1e-5, "gradient[{i}] {a} vs {b}");
    }
}

// --- burn-train's Learner -------------------------------------------------------------------

mod learner {
    use std::sync::Arc;

    use burn::data::dataloader::batcher::Batcher;
    use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
    use burn::data::dataset::InMemDataset;
    use burn::module::Module;
    use burn::optim::lr_scheduler::constant::ConstantLr;
    use burn::train::metric::LossMetric;
    use burn::train::{ExecutionStrategy, InferenceStep, Learner, MultiDeviceOptim, SupervisedTraining, TrainStep};
    use burn_distill_data::ImageBatch;

    use super::*;

    type Model = DistillModel<Mlp, ImageBatch, 2>;

    fn model(device: &Device, summed_batches: usize) -> Model {
        DistillModel::builder(student(5, 0.0, device))
            .objective(&hinton())
            .unwrap()
            .teacher(oracle(device))
            .summed_batches(summed_batches)
            .build()
            .unwrap()
    }

    fn loader(items: Vec<MnistItem>, batch_size: usize) -> Arc<dyn DataLoader<ImageBatch>> {
        DataLoaderBuilder::new(ImageBatcher::new())
            .batch_size(batch_size)
            .build(InMemDataset::new(items))
    }

    fn learner(model: Model) -> Learner<Model> {
        let (optimizer, _) = sgd(0.5, false);
        Learner::new(model, optimizer.init(), ConstantLr::new(0.5))
    }

    #[test]
    fn a_learner_step_computes_the_distillers_loss_and_grads_reach_only_the_student() {
        let _serial = serial();
        let device = Device::flex().autodiff();
        let oracle = oracle(&device);
        let train = Synthetic::new(32, 1, &oracle, &device);
        // The Distiller's first epoch with one batch of all 32 examples: its loss is the loss at
        // the initial weights.
        let (optimizer, schedule) = sgd(0.5, false);
        let config = DistillConfig::new(1, optimizer, schedule, hinton()).with_batch_size(32);
        let batcher = ImageBatcher::new();
        let run = Distiller::new(config, scratch("learner-step"))
            .with_teacher(&oracle)
            .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
            .unwrap();
        let ordered: Vec<MnistItem> = (0..32).map(|index| train.get(index).unwrap()).collect();
        let batch = batcher.batch(ordered, &device);
        let output = TrainStep::step(&model(&device, 1), batch.clone());
        let loss = output.item.loss.clone().into_scalar::<f64>();
        let recorded = run.records[0].train.loss;
        assert!((loss - recorded).abs() < 1e-6, "Learner {loss} vs Distiller {recorded}");
        let soft = output.item.soft.clone().unwrap().into_scalar::<f64>();
        assert!((soft - run.records[0].train.soft_loss.unwrap()).abs() < 1e-6);
        // Two weights and two biases: the student's, and nothing of the teacher's.
        assert_eq!(output.grads.len(), 4);
        // Validation compares with the same live teacher: the same loss, without gradients.
        let valid = InferenceStep::step(&model(&device, 1).valid(), batch.clone());
        assert!((valid.loss.into_scalar::<f64>() - loss).abs() < 1e-5);
        // Twice as many summed batches halve the gradient, not the reported loss.
        let halved = TrainStep::step(&model(&device, 2), batch);
        assert!((halved.item.loss.into_scalar::<f64>() - loss).abs() < 1e-6);
    }

    #[test]
    fn a_bf16_learner_step_gives_f32_gradients_near_the_f32_step() {
        let _serial = serial();
        let device = Device::flex().autodiff();
        let oracle = oracle(&device);
        let train = Synthetic::new(32, 1, &oracle, &device);
        let batcher = ImageBatcher::new();
        let ordered: Vec<MnistItem> = (0..32).map(|index| train.get(index).unwrap()).collect();
        let batch = batcher.batch(ordered, &device);
        // One student module for both (the same parameter ids).
        let weights = student(5, 0.0, &device);
        let build = |precision: Precision| {
            DistillModel::builder(weights.clone())
                .objective(&hinton())
                .unwrap()
                .teacher(oracle.clone())
                .precision(precision)
                .build()
                .unwrap()
        };
        let bf16: Model = build(Precision::Bf16);
        let full = TrainStep::step(&build(Precision::F32), batch.clone());
        let mut half = TrainStep::step(&bf16, batch.clone());
        let (full_loss, half_loss) = (
            full.item.loss.clone().into_scalar::<f64>(),
            half.item.loss.clone().into_scalar::<f64>(),
        );
        assert!(
            (half_loss / full_loss - 1.0).abs() < 2e-2 && half_loss != full_loss,
            "bf16 step loss {half_loss} vs f32 {full_loss}"
        );
        // The gradients are the f32 weights' own, in f32, and point the same way.
        let mut full = full;
        assert_eq!(half.grads.len(), 4);
        let mut cosines = Vec::new();
        struct Pairs<'g> {
            full: &'g mut burn::optim::GradientsParams,
            half: &'g mut burn::optim::GradientsParams,
            cosines: &'g mut Vec<f64>,
        }
        impl burn::module::ModuleVisitor for Pairs<'_> {
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                let (Some(a), Some(b)) = (self.full.remove::<D>(param.id), self.half.remove::<D>(param.id)) else {
                    return;
                };
                assert_eq!(
                    b.dtype(),
                    burn::tensor::DType::F32,
                    "a bf16 step's gradient reaches the f32 weight as f32"
                );
                let dot = (a.clone() * b.clone()).sum().into_scalar::<f64>();
                let norms = (a.clone() * a).sum().into_scalar::<f64>().sqrt()
                    * (b.clone() * b).sum().into_scalar::<f64>().sqrt();
                self.cosines.push(dot / norms);
            }
        }
        bf16.visit(&mut Pairs {
            full: &mut full.grads,
            half: &mut half.grads,
            cosines: &mut cosines,
        });
        assert_eq!(cosines.len(), 4, "every student parameter has both gradients");
        assert!(cosines.iter().all(|&c| c > 0.99), "cosines {cosines:?}");
    }

    #[test]
    fn the_learner_distils_checkpoints_only_the_student_and_two_devices_match_one() {
        let _serial = serial();
        let device = Device::flex().autodiff();
        let oracle = oracle(&device);
        let train = Synthetic::new(64, 1, &oracle, &device);
        let valid = Synthetic::new(32, 2, &oracle, &device);
        let items = |data: &Synthetic| (0..data.len()).map(|i| data.get(i).unwrap()).collect::<Vec<_>>();

        let train_run =
            |strategy: ExecutionStrategy, model: Model, batch_size: usize, order: Vec<MnistItem>, name: &str| {
                let dir = scratch(name);
                let result = SupervisedTraining::new(&dir, loader(order, batch_size), loader(items(&valid), 16))
                    .num_epochs(2)
                    .with_default_checkpointers()
                    .metric_train_numeric(LossMetric::new())
                    .metric_valid_numeric(LossMetric::new())
                    .metric_train_numeric(DistillMetric::soft())
                    .metric_valid_numeric(DistillMetric::accuracy())
                    .with_application_logger(None)
                    .with_training_strategy(strategy.into())
                    .launch(learner(model));
                assert!(result.error.is_none(), "{name}: {:?}", result.error);
                (dir, result.model)
            };

        // One device, batches of 16: examples 0-7 and 32-39, then 8-15 and 40-47, … which is
        // what two devices with batches of 8 see together (burn-train gives each device one
        // contiguous half of the data).
        let all = items(&train);
        let interleaved: Vec<MnistItem> = (0..4)
            .flat_map(|step| {
                all[8 * step..8 * step + 8]
                    .iter()
                    .chain(&all[32 + 8 * step..32 + 8 * step + 8])
            })
            .cloned()
            .collect();
        let (one_dir, one) = train_run(
            ExecutionStrategy::single(device.clone()),
            model(&device, 1),
            16,
            interleaved,
            "learner-one",
        );
        let two_devices = vec![device.clone(), device.clone()];
        let multi = || ExecutionStrategy::multi(two_devices.clone(), MultiDeviceOptim::OptimMainDevice);
        let (_, two) = train_run(multi(), model(&device, 2), 8, all.clone(), "learner-two");
        let (_, unscaled) = train_run(multi(), model(&device, 1), 8, all, "learner-two-unscaled");

        let probe_of = |model: &Model| probe(model.student(), &Device::flex());
        let gap = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        let (one_probe, two_probe) = (probe_of(&one), probe_of(&two));
        assert!(
            gap(&one_probe, &two_probe) < 1e-5,
            "two devices drift: {}",
            gap(&one_probe, &two_probe)
        );
        // Without `summed_batches`, burn-train's sum of the two devices' gradients doubles the
        // step: the correction is what makes them equal.
        assert!(gap(&one_probe, &probe_of(&unscaled)) > 1e-3);
        // Same weights, same validation loss.
        let batch = ImageBatcher::new().batch(items(&valid), &Device::flex());
        let valid_loss = |model: &Model| InferenceStep::step(model, batch.clone()).loss.into_scalar::<f64>();
        assert!((valid_loss(&one) - valid_loss(&two)).abs() < 1e-5);
        // It learned: the trained student is closer to its teacher than the initial one.
        assert!(valid_loss(&one) < valid_loss(&model(&Device::flex(), 1)));

        // Checkpoints hold the student alone: 676 parameters, not the teacher's as well.
        let checkpoint = one_dir.join("checkpoint").join("model-2.bpk");
        let bytes = std::fs::metadata(&checkpoint).unwrap().len();
        let student_bytes = (one.student().num_params() * 4) as u64;
        assert!(
            bytes >= student_bytes && bytes < 2 * student_bytes,
            "{} bytes for {} of weights",
            bytes,
            student_bytes
        );
    }

    #[test]
    fn a_distill_model_refuses_a_missing_objective_or_teacher_before_training() {
        let device = Device::flex().autodiff();
        let error = Model::builder(student(5, 0.0, &device)).build().unwrap_err();
        assert!(error.to_string().contains("objective"), "{error}");
        let error = Model::builder(student(5, 0.0, &device))
            .objective(&hinton())
            .unwrap()
            .build()
            .unwrap_err();
        assert!(matches!(error, TrainError::MissingTeacher { .. }), "{error}");
        let error = model_with_zero_batches(&device);
        assert!(error.to_string().contains("summed_batches"), "{error}");
        // f16 needs loss scaling, which the Learner's optimizer step cannot do.
        let error = Model::builder(student(5, 0.0, &device))
            .objective(&hinton())
            .unwrap()
            .teacher(oracle(&device))
            .precision(Precision::F16(LossScaleConfig::new()))
            .build()
            .unwrap_err();
        assert!(
            error.to_string().contains("f16 precision needs loss scaling"),
            "{error}"
        );
    }

    fn model_with_zero_batches(device: &Device) -> TrainError {
        Model::builder(student(5, 0.0, device))
            .objective(&hinton())
            .unwrap()
            .teacher(oracle(device))
            .summed_batches(0)
            .build()
            .unwrap_err()
    }
}

/// A run directory's `config.json`, damaged thousands of ways
/// (`burn_distill_testing::hostile`): resuming from it and checking the config gives `Ok` or an
/// error naming the file, never a panic.
#[test]
fn a_hostile_config_json_is_refused_by_resume_naming_the_file() {
    let (optimizer, schedule) = sgd(0.1, true);
    let config = DistillConfig::new(3, optimizer, schedule, hinton())
        .with_batch_size(16)
        .with_early_stopping(Some(EarlyStoppingConfig::new(Metric::Loss, 2)));
    let valid = serde_json::to_vec_pretty(&config).unwrap();
    let report = burn_distill_testing::hostile::check_reader(
        "config.json",
        valid,
        512,
        std::time::Duration::from_secs(10),
        |path| {
            Distiller::<Tensor<2>, 2>::resume(path.parent().unwrap())
                .and_then(|distiller| distiller.config().validate())
                .map(|_| ())
        },
    );
    assert!(report.refused > 0, "{report:?}");
}

/// Mixed precision: the student's steps in bf16 or f16 on f32 weights.
mod mixed_precision {
    use burn::data::dataloader::batcher::Batcher;
    use burn::module::Module;
    use burn::tensor::DType;
    use burn_distill_data::Batch;

    use super::*;

    /// The device that trains in half precision (flex), under autodiff.
    fn half_device() -> Device {
        devices()
            .into_iter()
            .map(|named| named.device)
            .find(|device| device.supports_dtype(DType::BF16) && device.supports_dtype(DType::F16))
            .expect("flex is compiled into the tests and holds bf16 and f16")
            .autodiff()
    }

    /// The loss scale's state saved with the run's last checkpoint.
    fn saved_loss_scale(run: &std::path::Path) -> serde_json::Value {
        let checkpoints = run.join("checkpoints");
        let mut epochs: Vec<_> = std::fs::read_dir(&checkpoints)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.join("state.json").is_file())
            .collect();
        epochs.sort();
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(epochs.last().unwrap().join("state.json")).unwrap()).unwrap();
        state["loss_scale"].clone()
    }

    /// Whether every float parameter of `model` is f32.
    fn all_f32(model: &Mlp) -> bool {
        struct Dtypes(Vec<DType>);
        impl burn::module::ModuleVisitor for Dtypes {
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                self.0.push(param.val().dtype());
            }
        }
        let mut dtypes = Dtypes(Vec::new());
        model.visit(&mut dtypes);
        !dtypes.0.is_empty() && dtypes.0.iter().all(|&dtype| dtype == DType::F32)
    }

    #[test]
    fn bf16_and_f16_steps_train_f32_weights_to_the_f32_runs_accuracy() {
        let _serial = serial();
        let device = half_device();
        let oracle = oracle(&device);
        let train = Synthetic::new(64, 1, &oracle, &device);
        let valid = Synthetic::new(2000, 2, &oracle, &device);
        let evals = [EvalSet {
            name: "valid",
            dataset: &valid,
        }];
        let batcher = ImageBatcher::new();
        let run = |precision: Precision, name: &str| {
            let dir = scratch(name);
            let outcome = Distiller::new(config(30, hinton(), 0.05).with_precision(precision), &dir)
                .with_teacher(&oracle)
                .fit(
                    student(5, 0.0, &device),
                    FitData::new(&train, &batcher).with_evals(&evals),
                    &device,
                )
                .unwrap();
            (outcome, dir)
        };
        let (f32_run, _) = run(Precision::F32, "precision-f32");
        let (bf16_run, _) = run(Precision::Bf16, "precision-bf16");
        let (f16_run, f16_dir) = run(Precision::F16(LossScaleConfig::new()), "precision-f16");
        let accuracy = |outcome: &RunOutcome<Mlp>| outcome.summary.last.eval[0].1.accuracy;
        let loss = |outcome: &RunOutcome<Mlp>| outcome.records.last().unwrap().train.loss;
        let first_loss = |outcome: &RunOutcome<Mlp>| outcome.records[0].train.loss;
        for (name, outcome) in [("bf16", &bf16_run), ("f16", &f16_run)] {
            assert!(all_f32(&outcome.student), "{name}: the trained weights stay f32");
            assert!(
                (accuracy(outcome) - accuracy(&f32_run)).abs() <= 0.03,
                "{name}: accuracy {:.3} vs f32 {:.3} on 2000 held-out examples",
                accuracy(outcome),
                accuracy(&f32_run)
            );
            assert!(
                loss(outcome) < 0.5 * first_loss(outcome),
                "{name}: the loss went from {} to {}",
                first_loss(outcome),
                loss(outcome)
            );
            assert!(
                (loss(outcome) / loss(&f32_run) - 1.0).abs() < 0.1,
                "{name}: final training loss {} vs f32 {}",
                loss(outcome),
                loss(&f32_run)
            );
            assert_ne!(
                loss(outcome),
                loss(&f32_run),
                "{name}: the steps did run in half precision"
            );
        }
        // 120 steps at a scale of 2^16 (none reaching the 2000 steps of growth): the first
        // may overflow (here it does, once), the steps that ran are counted in the records.
        let scale = saved_loss_scale(&f16_dir);
        let skipped = scale["skipped"].as_u64().unwrap() as usize;
        assert!(skipped <= 2, "{scale}");
        assert_eq!(
            scale["scale"].as_f64().unwrap(),
            65536.0 / 2f64.powi(skipped as i32),
            "{scale}"
        );
        let applied: usize = f16_run.records.iter().map(|record| record.train.steps).sum();
        assert_eq!(applied + skipped, 120, "{scale}");
    }

    #[test]
    fn f16_loss_scaling_skips_overflowing_steps_halves_and_grows_again() {
        let _serial = serial();
        let device = half_device();
        let oracle = oracle(&device);
        let train = Synthetic::new(64, 1, &oracle, &device);
        let valid = Synthetic::new(500, 2, &oracle, &device);
        let evals = [EvalSet {
            name: "valid",
            dataset: &valid,
        }];
        let batcher = ImageBatcher::new();
        let dir = scratch("precision-f16-overflow");
        // 2^40 overflows f16's range (65504) in the backward pass: steps are skipped and the
        // scale halved until the gradients fit, then it grows back every 4 good steps.
        let scaling = LossScaleConfig::new()
            .with_initial(2f64.powi(40))
            .with_growth_interval(4);
        let outcome = Distiller::new(config(12, hinton(), 0.05).with_precision(Precision::F16(scaling)), &dir)
            .with_teacher(&oracle)
            .fit(
                student(5, 0.0, &device),
                FitData::new(&train, &batcher).with_evals(&evals),
                &device,
            )
            .unwrap();
        let scale = saved_loss_scale(&dir);
        let skipped = scale["skipped"].as_u64().unwrap();
        assert!(skipped >= 10, "the first steps overflow: {scale}");
        assert!(skipped < 48, "some steps ran: {scale}");
        assert!(scale["scale"].as_f64().unwrap() < 2f64.powi(40), "{scale}");
        assert!(all_f32(&outcome.student));
        assert!(
            outcome.records.last().unwrap().train.loss < outcome.records[0].train.loss,
            "the steps that ran trained the student"
        );
    }

    #[test]
    fn a_bf16_teacher_answers_in_bf16_and_teaches_a_bf16_student() {
        let _serial = serial();
        let device = half_device();
        let module = oracle_module(&device);
        let full = FrozenTeacher::new(&module);
        let half = FrozenTeacher::in_precision(&module, burn::tensor::FloatDType::BF16);
        let input = Synthetic::new(64, 7, &oracle(&device), &device);
        let batch = ImageBatcher::new().batch((0..64).map(|i| input.get(i).unwrap()).collect(), &device);
        let exact = Teacher::<Tensor<2>, 2>::teach(&full, batch.input(), &[])
            .unwrap()
            .into_parts()
            .0;
        let rounded = Teacher::<Tensor<2>, 2>::teach(&half, batch.input(), &[])
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(rounded.dtype(), DType::BF16, "the half teacher's logits stay in bf16");
        let exact: Vec<f32> = exact.into_data().iter::<f32>().collect();
        let rounded: Vec<f32> = rounded.into_data().iter::<f32>().collect();
        let scale = exact.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (e, r) in exact.iter().zip(&rounded) {
            assert!((e - r).abs() <= 0.03 * scale, "bf16 teacher {r} vs f32 teacher {e}");
        }
        assert_ne!(exact, rounded, "the weights were cast");

        // A bf16 student learns from it as well as from the f32 teacher.
        let teacher_of = |teacher: &dyn Teacher<Tensor<2>, 2>, name: &str| {
            let train = Synthetic::new(64, 1, &oracle(&device), &device);
            let valid = Synthetic::new(1000, 2, &oracle(&device), &device);
            let evals = [EvalSet {
                name: "valid",
                dataset: &valid,
            }];
            let objective = ObjectiveConfig::Hinton(HintonKdLossConfig::new().with_alpha(0.0).with_temperature(2.0));
            Distiller::new(
                config(20, objective, 0.05).with_precision(Precision::Bf16),
                scratch(name),
            )
            .with_teacher(teacher)
            .fit(
                student(5, 0.0, &device),
                FitData::new(&train, &ImageBatcher::new()).with_evals(&evals),
                &device,
            )
            .unwrap()
            .summary
            .last
            .eval[0]
                .1
                .accuracy
        };
        let from_full = teacher_of(&full, "teacher-f32");
        let from_half = teacher_of(&half, "teacher-bf16");
        assert!(
            (from_full - from_half).abs() <= 0.03,
            "bf16 teacher {from_half:.3} vs f32 teacher {from_full:.3}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Feature and relational terms: every kind through the Distiller, CRD's banks in checkpoints.

mod feature_kinds {
    use super::*;
    use burn_distill_loss::{CrdLossConfig, DistLossConfig};

    fn narrow(seed: u64, device: &Device) -> Mlp {
        init_seeded(seed, device, |d| MlpConfig::new(WIDTH, vec![16], CLASSES).init(d))
    }

    fn config_with(kind: FeatureKind, connector: bool, epochs: usize) -> DistillConfig {
        let term = FeatureTermConfig::new("hidden.0".into(), "hidden.0".into())
            .with_kind(kind)
            .with_connector(connector.then(|| ConnectorConfig::new(16, 32)));
        DistillConfig::new(
            epochs,
            OptimizerConfig::Adam(AdamConfig::new()),
            LrSchedulerConfig::Constant(5e-3),
            hinton(),
        )
        .with_batch_size(16)
        .with_seed(4)
        .with_features(vec![term])
    }

    #[test]
    fn every_feature_kind_trains_and_brings_the_student_closer_to_the_teacher() {
        let _serial = serial();
        let device = devices().remove(0).device.autodiff();
        let oracle = oracle(&device);
        let train = Synthetic::new(64, 1, &oracle, &device);
        // The labelling network itself, with its taps.
        let teacher_module = oracle_module(&device);
        let teacher = FrozenTeacher::new(&teacher_module);
        let batcher = ImageBatcher::new();
        let kinds = [
            ("mse", FeatureKind::Mse, true),
            ("cosine", FeatureKind::Cosine, true),
            ("cka", FeatureKind::Cka { debiased: true }, false),
            (
                "rkd",
                FeatureKind::Rkd {
                    distance_weight: 25.0,
                    angle_weight: 50.0,
                },
                false,
            ),
            ("pkt", FeatureKind::Pkt, false),
            ("sp", FeatureKind::Sp, false),
            (
                "crd",
                FeatureKind::Crd(
                    CrdLossConfig::new(16, 32, 64)
                        .with_negatives(16)
                        .with_embedding_width(8),
                ),
                false,
            ),
        ];
        for (name, kind, connector) in kinds {
            let outcome = Distiller::new(config_with(kind, connector, 8), scratch(&format!("kind-{name}")))
                .with_teacher(&teacher)
                .fit(narrow(5, &device), FitData::new(&train, &batcher), &device)
                .unwrap();
            let losses: Vec<f64> = outcome.records.iter().map(|r| r.train.feature_loss.unwrap()).collect();
            assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
            assert!(
                losses[7] < losses[0],
                "{name}: the feature term falls while training: {losses:?}"
            );
        }
        // DIST as the objective.
        let dist = ObjectiveConfig::Dist {
            loss: DistLossConfig::new(),
            hard_weight: 1.0,
        };
        let config = DistillConfig::new(
            6,
            OptimizerConfig::Adam(AdamConfig::new()),
            LrSchedulerConfig::Constant(5e-3),
            dist,
        )
        .with_batch_size(16);
        let outcome = Distiller::new(config, scratch("objective-dist"))
            .with_teacher(&teacher)
            .fit(student(5, 0.0, &device), FitData::new(&train, &batcher), &device)
            .unwrap();
        let soft: Vec<f64> = outcome.records.iter().map(|r| r.train.soft_loss.unwrap()).collect();
        assert!(soft[5] < soft[0], "DIST: {soft:?}");
    }

    #[test]
    fn feature_kinds_refuse_what_they_cannot_take_before_training() {
        let _serial = serial();
        let device = devices().remove(0).device.autodiff();
        let oracle = oracle(&device);
        let train = Synthetic::new(64, 1, &oracle, &device);
        // The labelling network itself, with its taps.
        let teacher_module = oracle_module(&device);
        let teacher = FrozenTeacher::new(&teacher_module);
        let batcher = ImageBatcher::new();
        let fit = |config: DistillConfig, name: &str| {
            Distiller::new(config, scratch(name))
                .with_teacher(&teacher)
                .fit(narrow(5, &device), FitData::new(&train, &batcher), &device)
                .unwrap_err()
                .to_string()
        };
        // Widths differ and no connector maps them.
        let error = fit(config_with(FeatureKind::Cosine, false, 1), "refuse-width");
        assert!(error.contains("add a connector"), "{error}");
        // Attention transfer needs maps.
        let error = fit(
            config_with(FeatureKind::AttentionTransfer { p: 2.0 }, false, 1),
            "refuse-at",
        );
        assert!(error.contains("attention transfer takes"), "{error}");
        // CRD's bank must have a row per training example.
        let crd = FeatureKind::Crd(CrdLossConfig::new(16, 32, 50).with_negatives(8));
        let error = fit(config_with(crd, false, 1), "refuse-crd");
        assert!(error.contains("training set has 64 examples"), "{error}");
        // The Learner cannot move CRD's banks after its steps.
        let crd = FeatureKind::Crd(CrdLossConfig::new(16, 32, 64).with_negatives(8));
        let error = DistillModel::<Mlp, burn_distill_data::ImageBatch, 2>::builder(narrow(5, &device))
            .objective(&hinton())
            .unwrap()
            .teacher(FrozenTeacher::new(&teacher_module))
            .features(
                vec![FeatureTermConfig::new("hidden.0".into(), "hidden.0".into()).with_kind(crd)],
                &device,
            )
            .build()
            .unwrap_err();
        assert!(error.to_string().contains("Distiller"), "{error}");
    }

    /// bf16 mixed precision with a connector and a CRD term: the student computes in bf16, its
    /// widened features meet the f32 connector and CRD embeddings (they were cast with the
    /// student and failed a dtype check in the matrix product before).
    #[test]
    fn feature_terms_with_connectors_and_crd_train_in_mixed_precision() {
        let _serial = serial();
        let device = devices()
            .into_iter()
            .map(|named| named.device)
            .find(|device| device.supports_dtype(burn::tensor::DType::BF16))
            .expect("flex holds bf16")
            .autodiff();
        let oracle = oracle(&device);
        let train = Synthetic::new(64, 1, &oracle, &device);
        let batcher = ImageBatcher::new();
        let teacher_module = oracle_module(&device);
        let teacher = FrozenTeacher::new(&teacher_module);
        let crd = FeatureKind::Crd(
            CrdLossConfig::new(16, 32, 64)
                .with_negatives(16)
                .with_embedding_width(8),
        );
        let mut config = config_with(FeatureKind::Cosine, true, 3).with_precision(Precision::Bf16);
        config
            .features
            .push(FeatureTermConfig::new("hidden.0".into(), "hidden.0".into()).with_kind(crd));
        let outcome = Distiller::new(config, scratch("kind-bf16"))
            .with_teacher(&teacher)
            .fit(narrow(5, &device), FitData::new(&train, &batcher), &device)
            .unwrap();
        let losses: Vec<f64> = outcome.records.iter().map(|r| r.train.feature_loss.unwrap()).collect();
        assert!(
            losses.iter().all(|l| l.is_finite()) && losses[2] < losses[0],
            "{losses:?}"
        );
    }

    /// A data set whose last batch is smaller than a relational loss needs (65 examples in
    /// batches of 16: a last batch of one) trains: that micro-batch adds nothing to the term.
    /// Relations between whole padded sequences are refused, naming the alternatives.
    #[test]
    fn a_last_batch_too_small_for_a_relation_adds_nothing_and_sequences_are_refused() {
        let _serial = serial();
        let device = devices().remove(0).device.autodiff();
        let oracle = oracle(&device);
        let train = Synthetic::new(65, 1, &oracle, &device);
        let batcher = ImageBatcher::new();
        let teacher_module = oracle_module(&device);
        let teacher = FrozenTeacher::new(&teacher_module);
        for (name, kind) in [
            (
                "rkd",
                FeatureKind::Rkd {
                    distance_weight: 25.0,
                    angle_weight: 50.0,
                },
            ),
            ("cka", FeatureKind::Cka { debiased: true }),
        ] {
            let outcome = Distiller::new(config_with(kind, false, 1), scratch(&format!("small-last-{name}")))
                .with_teacher(&teacher)
                .fit(narrow(5, &device), FitData::new(&train, &batcher), &device)
                .unwrap();
            assert!(outcome.records[0].train.feature_loss.unwrap().is_finite(), "{name}");
        }
        // A bad setting is refused by validate, before anything trains.
        let error = config_with(FeatureKind::AttentionTransfer { p: 0.5 }, false, 1)
            .validate()
            .unwrap_err();
        assert!(error.to_string().contains("p = 0.5"), "{error}");
        let error = config_with(FeatureKind::Crd(CrdLossConfig::new(16, 32, 64)), false, 1)
            .validate()
            .unwrap_err();
        assert!(
            error.to_string().contains("more training examples than negatives"),
            "{error}"
        );

        // Sequences: RKD between whole padded windows is refused; CKA over positions trains.
        let windows = ByteCorpus::load_default().unwrap().windows(16, 16).unwrap();
        let windows = Subset::new(windows, (0..32).collect());
        let lm = TransformerLmConfig::new(BYTE_VOCAB, 16)
            .with_layers(1)
            .with_width(32)
            .with_heads(2);
        let lm_teacher_module: TransformerLm = init_seeded(1, &device, |d| lm.init(d));
        let lm_teacher = FrozenTeacher::new(&lm_teacher_module);
        let objective = ObjectiveConfig::Divergence {
            loss: DivergenceLossConfig::new(Divergence::ForwardKl),
            hard_weight: 0.0,
        };
        for (name, kind, refused) in [
            (
                "rkd",
                FeatureKind::Rkd {
                    distance_weight: 25.0,
                    angle_weight: 50.0,
                },
                true,
            ),
            ("cka", FeatureKind::Cka { debiased: true }, false),
        ] {
            let run = DistillConfig::new(1, sgd(0.05, false).0, sgd(0.05, false).1, objective.clone())
                .with_batch_size(16)
                .with_features(vec![
                    FeatureTermConfig::new("hidden".into(), "hidden".into()).with_kind(kind),
                ]);
            let result = Distiller::new(run, scratch(&format!("lm-{name}")))
                .with_teacher(&lm_teacher)
                .fit(
                    init_seeded(2, &device, |d| lm.init(d)),
                    FitData::new(&windows, &TokenBatcher),
                    &device,
                );
            match (refused, result) {
                (true, Err(error)) => assert!(error.to_string().contains("use MSE, cosine or CKA"), "{error}"),
                (false, Ok(outcome)) => assert!(outcome.records[0].train.feature_loss.unwrap().is_finite()),
                (_, other) => panic!("{name}: {:?}", other.map(|outcome| outcome.records)),
            }
        }
    }

    /// The memory banks and Z are in the checkpoint: a run stopped and resumed draws the same
    /// negatives against the same banks and ends with the same weights, bit for bit.
    #[test]
    fn a_crd_run_resumes_exactly_with_its_memory_banks() {
        let _serial = serial();
        let device = devices().remove(0).device.autodiff();
        let oracle = oracle(&device);
        let train = Synthetic::new(64, 1, &oracle, &device);
        // The labelling network itself, with its taps.
        let teacher_module = oracle_module(&device);
        let teacher = FrozenTeacher::new(&teacher_module);
        let batcher = ImageBatcher::new();
        let crd = FeatureKind::Crd(
            CrdLossConfig::new(16, 32, 64)
                .with_negatives(16)
                .with_embedding_width(8),
        );
        let config = config_with(crd, false, 4);
        let whole = Distiller::new(config.clone(), scratch("crd-whole"))
            .with_teacher(&teacher)
            .fit(narrow(5, &device), FitData::new(&train, &batcher), &device)
            .unwrap();
        let split_dir = scratch("crd-split");
        Distiller::new(config, &split_dir)
            .with_teacher(&teacher)
            .with_stop_after(2)
            .fit(narrow(5, &device), FitData::new(&train, &batcher), &device)
            .unwrap();
        let resumed = Distiller::resume(&split_dir)
            .unwrap()
            .with_teacher(&teacher)
            .fit(narrow(77, &device), FitData::new(&train, &batcher), &device)
            .unwrap();
        for (a, b) in whole.records.iter().zip(&resumed.records) {
            assert_eq!(
                a.train.feature_loss.unwrap().to_bits(),
                b.train.feature_loss.unwrap().to_bits(),
                "epoch {}",
                a.epoch
            );
        }
        assert_eq!(
            Fingerprint::of_module(&whole.student),
            Fingerprint::of_module(&resumed.student)
        );
    }
}
