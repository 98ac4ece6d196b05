//! The method zoo on MNIST with few transfer images: a wide LeNet teacher trained on 50 000
//! images, and a small LeNet student that sees only `--transfer` of them (2 000), distilled by
//! each method: KD, DKD, DIST, FitNets, AT, RKD, PKT, SP, CRD, CKA, and KD plus the best
//! feature term. Each method's weight is chosen on a validation split (2 000 held-out training
//! images) from a small grid, with one seed; then three seeds train at the chosen weight and
//! the test set (10 000 images) is read once per student, at the end.
//!
//! ```sh
//! cargo run --release --features flex --example zoo_mnist
//! cargo run --release --features flex --example zoo_mnist -- --methods kd,at,crd --seeds 1
//! ```
//!
//! The README's table ("Feature and relational distillation on MNIST with 2 000 transfer
//! images") comes from the first command (about 50 minutes on 2 cores, flex). It prints a markdown table and writes
//! `<run-dir>/results.json`. The teacher is saved to `<run-dir>/teacher.bpk` and reused by a
//! later run in the same directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::data::dataset::Dataset;
use burn::optim::AdamConfig;
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::tensor::{Device, Tensor};
use burn_distill::data::{ImageBatcher, MnistDataset, MnistSplit, Subset};
use burn_distill::loss::{CrdLossConfig, DistLossConfig, DkdLossConfig, HintonKdLossConfig, device_by_name};
use burn_distill::model::{
    ConnectorConfig, ConnectorKind, FrozenTeacher, LeNet, LeNetConfig, Teacher, init_seeded, load_weights, save_weights,
};
use burn_distill::train::{
    DistillConfig, Distiller, EvalSet, FeatureKind, FeatureTermConfig, FitData, ObjectiveConfig, OptimizerConfig,
    RunOutcome, evaluate,
};
use clap::Parser;
use serde_json::json;

#[path = "common/report.rs"]
mod report;

/// Feature and relational distillation compared on MNIST with few transfer images.
#[derive(Parser, Debug)]
#[command(name = "zoo_mnist")]
struct Args {
    /// ndarray, flex, wgpu or cuda (whichever this build has).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Where the runs, the teacher and results.json go.
    #[arg(long, default_value = "runs/zoo-mnist")]
    run_dir: PathBuf,
    /// Training images the students see.
    #[arg(long, default_value_t = 2000)]
    transfer: usize,
    /// Held-out training images that choose each method's weight.
    #[arg(long, default_value_t = 2000)]
    valid: usize,
    /// Each student's epochs.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// The teacher's epochs (on 50 000 images).
    #[arg(long, default_value_t = 3)]
    teacher_epochs: usize,
    /// Seeds per method at its chosen weight (1, 2, …).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Methods to run (comma-separated); default every one.
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
}

const TEACHER_CHANNELS: [usize; 2] = [32, 64];
const TEACHER_HIDDEN: usize = 256;
const STUDENT_CHANNELS: [usize; 2] = [4, 8];
const STUDENT_HIDDEN: usize = 32;
/// The seed of the grid runs (the test seeds are 1, 2, 3).
const GRID_SEED: u64 = 100;

/// A method: its name, the grid of its weight, and what it trains with at a weight.
struct Method {
    name: &'static str,
    grid: &'static [f64],
    build: fn(f64, usize) -> (ObjectiveConfig, Vec<FeatureTermConfig>),
}

fn ce() -> ObjectiveConfig {
    ObjectiveConfig::Supervised { label_smoothing: 0.0 }
}

/// A feature term between the penultimate layers (32 and 256 wide) or the last convolutions'
/// maps (8 and 64 channels, 10 × 10).
fn term(kind: FeatureKind, weight: f64, on_maps: bool) -> Vec<FeatureTermConfig> {
    let tap = if on_maps { "conv.1" } else { "hidden.0" };
    vec![
        FeatureTermConfig::new(tap.into(), tap.into())
            .with_kind(kind)
            .with_weight(weight),
    ]
}

fn methods() -> Vec<Method> {
    vec![
        Method {
            name: "alone",
            grid: &[0.0],
            build: |_, _| (ce(), vec![]),
        },
        Method {
            name: "kd",
            // The weight is α, the hard-label share (T = 4).
            grid: &[0.1, 0.5, 0.9],
            build: |alpha, _| {
                let loss = HintonKdLossConfig::new().with_temperature(4.0).with_alpha(alpha);
                (ObjectiveConfig::Hinton(loss), vec![])
            },
        },
        Method {
            name: "dkd",
            grid: &[0.5, 2.0, 8.0],
            build: |beta, _| (ObjectiveConfig::Dkd(DkdLossConfig::new().with_beta(beta)), vec![]),
        },
        Method {
            name: "dist",
            grid: &[0.5, 1.0, 2.0],
            build: |weight, _| {
                let loss = DistLossConfig::new()
                    .with_beta(weight)
                    .with_gamma(weight)
                    .with_temperature(4.0);
                (ObjectiveConfig::Dist { loss, hard_weight: 1.0 }, vec![])
            },
        },
        Method {
            name: "fitnets",
            grid: &[0.1, 1.0, 10.0],
            build: |weight, _| {
                let connector =
                    ConnectorConfig::new(STUDENT_CHANNELS[1], TEACHER_CHANNELS[1]).with_kind(ConnectorKind::Conv1x1);
                let mut terms = term(FeatureKind::Mse, weight, true);
                terms[0].connector = Some(connector);
                (ce(), terms)
            },
        },
        Method {
            name: "at",
            grid: &[10.0, 100.0, 1000.0],
            build: |weight, _| (ce(), term(FeatureKind::AttentionTransfer { p: 2.0 }, weight, true)),
        },
        Method {
            name: "rkd",
            grid: &[0.01, 0.1, 1.0],
            build: |weight, _| {
                let kind = FeatureKind::Rkd {
                    distance_weight: 25.0,
                    angle_weight: 50.0,
                };
                (ce(), term(kind, weight, false))
            },
        },
        Method {
            name: "pkt",
            grid: &[300.0, 3000.0, 30000.0],
            build: |weight, _| (ce(), term(FeatureKind::Pkt, weight, false)),
        },
        Method {
            name: "sp",
            grid: &[30.0, 300.0, 3000.0],
            build: |weight, _| (ce(), term(FeatureKind::Sp, weight, true)),
        },
        Method {
            name: "crd",
            grid: &[0.05, 0.2, 0.8],
            build: |weight, examples| {
                let crd = CrdLossConfig::new(STUDENT_HIDDEN, TEACHER_HIDDEN, examples).with_negatives(1024);
                (ce(), term(FeatureKind::Crd(crd), weight, false))
            },
        },
        Method {
            name: "cka",
            grid: &[0.1, 1.0, 10.0],
            build: |weight, _| (ce(), term(FeatureKind::Cka { debiased: true }, weight, false)),
        },
    ]
}

fn config(epochs: usize, seed: u64, objective: ObjectiveConfig, features: Vec<FeatureTermConfig>) -> DistillConfig {
    DistillConfig::new(
        epochs,
        OptimizerConfig::Adam(AdamConfig::new()),
        LrSchedulerConfig::Constant(2e-3),
        objective,
    )
    .with_batch_size(64)
    .with_seed(seed)
    .with_features(features)
}

/// One trained student, its last-epoch validation accuracy and mean training seconds per epoch.
struct Trained {
    outcome: RunOutcome<LeNet>,
    valid_accuracy: f64,
    epoch_seconds: f64,
}

fn main() -> ExitCode {
    report::exit(run(&Args::parse()))
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let device: Device =
        device_by_name(&args.device).ok_or_else(|| format!("no device {:?} in this build", args.device))?;
    let training = device.clone().autodiff();
    let all = methods();
    let chosen: Vec<&Method> = match &args.methods {
        None => all.iter().collect(),
        Some(names) => names
            .iter()
            .map(|name| {
                all.iter().find(|method| method.name == name).ok_or_else(|| {
                    format!(
                        "unknown method {name:?}; known: {:?}",
                        all.iter().map(|m| m.name).collect::<Vec<_>>()
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    if args.transfer < 64 || args.valid == 0 || args.seeds == 0 || args.epochs == 0 {
        return Err("--transfer must be at least 64 and --valid, --seeds, --epochs at least 1".into());
    }
    // Every config is checked before anything trains.
    for method in &chosen {
        for &weight in method.grid {
            let (objective, features) = (method.build)(weight, args.transfer);
            config(args.epochs, GRID_SEED, objective, features).validate()?;
        }
    }
    std::fs::create_dir_all(&args.run_dir)?;
    let results_path = args.run_dir.join("results.json");
    if results_path.exists() {
        return Err(format!("{} exists: pass another --run-dir", results_path.display()).into());
    }

    let images = MnistDataset::load_default(MnistSplit::Train)?;
    let test = MnistDataset::load_default(MnistSplit::Test)?;
    let split = images.len() - 10_000;
    if args.transfer > split || args.valid > 10_000 {
        return Err(format!("--transfer is at most {split} and --valid at most 10000").into());
    }
    let teacher_train = Subset::new(images.clone(), (0..split).collect());
    // Fixed random subsets: the transfer images spread over the training part, the validation
    // images over the held-out part.
    let transfer = Subset::new(images.clone(), spread(0, split, args.transfer));
    let valid = Subset::new(images.clone(), spread(split, images.len(), args.valid));
    let batcher = ImageBatcher::new();
    let evals = [EvalSet {
        name: "valid",
        dataset: &valid,
    }];

    let teacher_config = LeNetConfig::new()
        .with_channels(TEACHER_CHANNELS.to_vec())
        .with_hidden(vec![TEACHER_HIDDEN]);
    let teacher_path = args.run_dir.join("teacher.bpk");
    let teacher_module = if teacher_path.exists() {
        eprintln!("teacher: {}", teacher_path.display());
        load_weights(teacher_config.init(&training), &teacher_path)?
    } else {
        eprintln!("teacher: {} epochs on {split} images", args.teacher_epochs);
        let outcome = Distiller::<Tensor<2>, 2>::new(
            config(args.teacher_epochs, 1, ce(), vec![]).with_batch_size(128),
            args.run_dir.join("teacher"),
        )
        .with_progress(true)
        .fit(
            init_seeded(1, &training, |d| teacher_config.init(d)),
            FitData::new(&teacher_train, &batcher).with_evals(&evals),
            &training,
        )?;
        save_weights(&outcome.student, &teacher_path)?;
        outcome.student
    };
    let teacher = FrozenTeacher::new(&teacher_module);
    let no_teacher: Option<&dyn Teacher<Tensor<2>, 2>> = None;
    let teacher_test = evaluate(&teacher_module, no_teacher, &test, &batcher, 1000, &training)?;
    eprintln!("teacher test accuracy {:.2} %", 100.0 * teacher_test.accuracy);

    let train_one = |objective: ObjectiveConfig,
                     features: Vec<FeatureTermConfig>,
                     seed: u64,
                     dir: &Path|
     -> Result<Trained, Box<dyn std::error::Error>> {
        let with_teacher = objective.needs_teacher() || !features.is_empty();
        let student = init_seeded(seed, &training, |d| {
            LeNetConfig::new()
                .with_channels(STUDENT_CHANNELS.to_vec())
                .with_hidden(vec![STUDENT_HIDDEN])
                .init(d)
        });
        let distiller = Distiller::new(config(args.epochs, seed, objective, features), dir);
        let distiller = if with_teacher {
            distiller.with_teacher(&teacher)
        } else {
            distiller
        };
        let outcome = distiller.fit(student, FitData::new(&transfer, &batcher).with_evals(&evals), &training)?;
        let valid_accuracy = outcome.summary.last.eval[0].1.accuracy;
        let epoch_seconds = outcome.records.iter().map(|r| r.train.seconds).sum::<f64>() / outcome.records.len() as f64;
        Ok(Trained {
            outcome,
            valid_accuracy,
            epoch_seconds,
        })
    };

    // 1. Each method's weight, on the validation split (one seed).
    let mut finals: Vec<(String, String, ObjectiveConfig, Vec<FeatureTermConfig>, f64)> = Vec::new();
    for method in &chosen {
        let mut best: Option<(f64, f64)> = None;
        for &weight in method.grid {
            let (objective, features) = (method.build)(weight, args.transfer);
            let dir = args.run_dir.join(method.name).join(format!("grid-{weight}"));
            let trained = train_one(objective, features, GRID_SEED, &dir)?;
            eprintln!(
                "{} weight {weight}: valid accuracy {:.2} % ({:.1} s/epoch)",
                method.name,
                100.0 * trained.valid_accuracy,
                trained.epoch_seconds
            );
            if best.is_none_or(|(accuracy, _)| trained.valid_accuracy > accuracy) {
                best = Some((trained.valid_accuracy, weight));
            }
        }
        let (accuracy, weight) = best.expect("a grid has a weight");
        let (objective, features) = (method.build)(weight, args.transfer);
        finals.push((
            method.name.to_string(),
            format!("{weight}"),
            objective,
            features,
            accuracy,
        ));
    }
    // KD plus the feature term whose method validated best, each at its own weight.
    let kd = finals.iter().find(|row| row.0 == "kd").cloned();
    let best_feature = finals
        .iter()
        .filter(|row| !row.3.is_empty())
        .max_by(|a, b| a.4.total_cmp(&b.4))
        .cloned();
    if let (Some(kd), Some(feature)) = (kd, best_feature) {
        finals.push((
            format!("kd+{}", feature.0),
            format!("{} + {}", kd.1, feature.1),
            kd.2,
            feature.3,
            f64::NAN,
        ));
    }

    // 2. Every method at its weight, with each seed; the test set once per student.
    let mut rows = Vec::new();
    for (name, weight, objective, features, _) in finals {
        let mut accuracies = Vec::new();
        let mut seconds = Vec::new();
        for seed in 1..=args.seeds {
            let dir = args.run_dir.join(name.replace('+', "-")).join(format!("seed-{seed}"));
            let trained = train_one(objective.clone(), features.clone(), seed, &dir)?;
            let metrics = evaluate(
                &trained.outcome.student,
                Some(&teacher),
                &test,
                &batcher,
                1000,
                &training,
            )?;
            eprintln!(
                "{name} seed {seed}: test accuracy {:.2} %, agreement with the teacher {:.2} %",
                100.0 * metrics.accuracy,
                100.0 * metrics.teacher_agreement.unwrap_or(f64::NAN)
            );
            accuracies.push(100.0 * metrics.accuracy);
            seconds.push(trained.epoch_seconds);
        }
        rows.push(json!({
            "method": name,
            "weight": weight,
            "test_accuracy": accuracies,
            "mean": mean(&accuracies),
            "std": std(&accuracies),
            "seconds_per_epoch": mean(&seconds),
        }));
    }

    println!(
        "teacher: LeNet {TEACHER_CHANNELS:?}/{TEACHER_HIDDEN}, test accuracy {:.2} %; student: LeNet {STUDENT_CHANNELS:?}/{STUDENT_HIDDEN} on {} images, {} epochs, {} seed(s)",
        100.0 * teacher_test.accuracy,
        args.transfer,
        args.epochs,
        args.seeds
    );
    println!("| method | weight (chosen on valid) | test accuracy, mean ± std (%) | s / epoch |");
    println!("|---|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {:.2} ± {:.2} | {:.2} |",
            row["method"].as_str().unwrap_or_default(),
            row["weight"].as_str().unwrap_or_default(),
            row["mean"].as_f64().unwrap_or(f64::NAN),
            row["std"].as_f64().unwrap_or(f64::NAN),
            row["seconds_per_epoch"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let results = json!({
        "teacher_test_accuracy": 100.0 * teacher_test.accuracy,
        "transfer": args.transfer,
        "valid": args.valid,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "rows": rows,
    });
    std::fs::write(&results_path, serde_json::to_string_pretty(&results)?)?;
    Ok(())
}

/// `count` positions spread evenly over `start..end` with a fixed stride (every digit class is
/// represented; no randomness to seed).
fn spread(start: usize, end: usize, count: usize) -> Vec<usize> {
    let span = end - start;
    (0..count).map(|i| start + i * span / count).collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The sample standard deviation (n − 1); 0 for one value.
fn std(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let m = mean(values);
    (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (values.len() - 1) as f64).sqrt()
}
