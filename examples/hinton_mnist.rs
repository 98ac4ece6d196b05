//! Hinton, Vinyals & Dean (2015) on MNIST in one file of public API: a teacher, the same small
//! student trained alone and distilled from it, each watched on a validation split held out of
//! the training images and measured on the test set once, at the end.
//!
//! ```sh
//! cargo run --release --features flex --example hinton_mnist
//! cargo run --release --features flex --example hinton_mnist -- --epochs 20 --temperature 20 --run-dir runs/t20
//! cargo run --release --features flex --example hinton_mnist -- --precision bf16 --run-dir runs/bf16
//! ```
//!
//! With the defaults (2 cores, flex; about 3½ minutes a run) the last lines read, for student seed 2
//! (the default):
//!
//! | model | valid errors (last epoch) | test errors | test accuracy |
//! |---|---:|---:|---:|
//! | teacher | 177 | 175 | 98.25 % |
//! | student alone | 169 | 179 | 98.21 % |
//! | student distilled | 175 | 158 | 98.42 % |
//!
//! T and α were chosen on the validation split (the README has the grid and three seeds).
//!
//! The first 50 000 training images train, the last 10 000 validate (every epoch; the best
//! epoch's weights are in `<run-dir>/<phase>/checkpoints/best/`); the 10 000 test images are read
//! after training. `examples/mnist` is the full reproduction of the paper's section 3 (jitter,
//! max-norm, the offline teacher cache, 200 epochs).

use std::path::PathBuf;
use std::process::ExitCode;

use burn::data::dataset::Dataset;
use burn::optim::SgdConfig;
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::momentum::MomentumConfig;
use burn::tensor::{Device, Tensor};
use burn_distill::data::{ImageBatcher, MnistDataset, MnistSplit, Subset};
use burn_distill::loss::{HintonKdLossConfig, device_by_name};
use burn_distill::model::{FrozenTeacher, Mlp, MlpConfig, Teacher, init_seeded};
use burn_distill::train::{
    DistillConfig, Distiller, EvalSet, FitData, LossScaleConfig, ObjectiveConfig, OptimizerConfig, Precision,
    RunOutcome, evaluate,
};
use clap::Parser;

#[path = "common/report.rs"]
mod report;

/// Hinton knowledge distillation on MNIST: teacher, student alone, student distilled.
#[derive(Parser, Debug)]
#[command(name = "hinton_mnist")]
struct Args {
    /// ndarray, flex, wgpu or cuda (whichever this build has).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Where the three runs go (must not hold them already).
    #[arg(long, default_value = "runs/hinton-mnist")]
    run_dir: PathBuf,
    /// The teacher's epochs.
    #[arg(long, default_value_t = 10)]
    teacher_epochs: usize,
    /// Each student's epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Distillation temperature (4 and α = 0.7 were the best of T ∈ {4, 20} × α ∈ {0.3, 0.7}
    /// on the validation split).
    #[arg(long, default_value_t = 4.0)]
    temperature: f64,
    /// Weight of the hard-label term.
    #[arg(long, default_value_t = 0.7)]
    alpha: f64,
    /// Seed of the teacher's weights and batch order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seed of both students' weights and batch order (default: seed + 1).
    #[arg(long)]
    student_seed: Option<u64>,
    /// The precision every run trains in (f32 weights either way): f32, or mixed precision in
    /// bf16 or f16 (f16 with dynamic loss scaling). The distilling teacher then answers in it
    /// too.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    precision: String,
}

/// SGD with momentum 0.9 at a constant learning rate, batches of 128.
fn config(epochs: usize, objective: ObjectiveConfig, seed: u64, precision: Precision) -> DistillConfig {
    let momentum = MomentumConfig::new().with_momentum(0.9).with_dampening(0.0);
    let optimizer = OptimizerConfig::Sgd(SgdConfig::new().with_momentum(Some(momentum)));
    DistillConfig::new(epochs, optimizer, LrSchedulerConfig::Constant(0.05), objective)
        .with_batch_size(128)
        .with_seed(seed)
        .with_precision(precision)
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let device: Device =
        device_by_name(&args.device).ok_or_else(|| format!("no device {:?} in this build", args.device))?;
    let training = device.clone().autodiff();
    // Every setting is checked before anything trains.
    let distilled_objective = ObjectiveConfig::Hinton(
        HintonKdLossConfig::new()
            .with_temperature(args.temperature)
            .with_alpha(args.alpha),
    );
    let precision = match args.precision.as_str() {
        "bf16" => Precision::Bf16,
        "f16" => Precision::F16(LossScaleConfig::new()),
        _ => Precision::F32,
    };
    if let Some(dtype) = precision.forward_dtype()
        && !device.supports_dtype(dtype)
    {
        return Err(format!("{} does not hold {dtype:?} tensors: use --precision f32", args.device).into());
    }
    let supervised = ObjectiveConfig::Supervised { label_smoothing: 0.0 };
    let teacher_config = config(args.teacher_epochs, supervised.clone(), args.seed, precision);
    let student_seed = args.student_seed.unwrap_or(args.seed + 1);
    let alone_config = config(args.epochs, supervised, student_seed, precision);
    let distilled_config = config(args.epochs, distilled_objective, student_seed, precision);
    for config in [&teacher_config, &alone_config, &distilled_config] {
        config.validate()?;
    }
    // A finished phase is not overwritten, and a later one is not found taken after an earlier
    // one has trained.
    for phase in ["teacher", "student-alone", "student-distilled"] {
        let dir = args.run_dir.join(phase);
        if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(format!("{} already holds a run: pass another --run-dir", dir.display()).into());
        }
    }

    let train_images = MnistDataset::load_default(MnistSplit::Train)?;
    let test = MnistDataset::load_default(MnistSplit::Test)?;
    let split = train_images.len() - 10_000;
    let train = Subset::new(train_images.clone(), (0..split).collect());
    let valid = Subset::new(train_images.clone(), (split..train_images.len()).collect());
    let evals = [EvalSet {
        name: "valid",
        dataset: &valid,
    }];
    let batcher = ImageBatcher::new();
    let data = FitData::new(&train, &batcher).with_evals(&evals);

    // 1. The teacher: 784-1200-1200-10 with dropout, on the labels.
    eprintln!("teacher, {} epochs", args.teacher_epochs);
    let teacher = Distiller::<Tensor<2>, 2>::new(teacher_config, args.run_dir.join("teacher"))
        .with_progress(true)
        .fit(
            init_seeded(args.seed, &training, |d| MlpConfig::hinton_teacher().init(d)),
            data,
            &training,
        )?;
    let frozen = match precision.forward_dtype() {
        Some(dtype) => FrozenTeacher::in_precision(&teacher.student, dtype),
        None => FrozenTeacher::new(&teacher.student),
    };

    // 2. and 3. The same 784-800-800-10 student, from the same weights, alone and distilled.
    let student = || init_seeded(student_seed, &training, |d| MlpConfig::hinton_student().init(d));
    eprintln!("student alone, {} epochs", args.epochs);
    let alone = Distiller::new(alone_config, args.run_dir.join("student-alone"))
        .with_progress(true)
        .fit(student(), data, &training)?;
    eprintln!(
        "student distilled (T = {}, α = {}), {} epochs",
        args.temperature, args.alpha, args.epochs
    );
    let distilled = Distiller::new(distilled_config, args.run_dir.join("student-distilled"))
        .with_teacher(&frozen)
        .with_progress(true)
        .fit(student(), data, &training)?;

    // The test set, once.
    println!("| model | valid errors (last epoch) | test errors | test accuracy |");
    println!("|---|---:|---:|---:|");
    let phases: [(&str, &RunOutcome<Mlp>); 3] = [
        ("teacher", &teacher),
        ("student alone", &alone),
        ("student distilled", &distilled),
    ];
    for (name, outcome) in phases {
        let no_teacher: Option<&dyn Teacher<Tensor<2>, 2>> = None;
        let metrics = evaluate(&outcome.student, no_teacher, &test, &batcher, 1000, &training)?;
        let valid_errors = outcome.summary.last.eval[0].1.errors;
        println!(
            "| {name} | {valid_errors} | {} | {:.2} % |",
            metrics.errors,
            100.0 * metrics.accuracy
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    report::exit(run(&Args::parse()))
}
