//! Hinton, Vinyals & Dean (2015) on MNIST through burn-train's Learner: the student
//! (784-800-800-10) distils from the teacher (784-1200-1200-10) with Hinton KD, under
//! burn-train's dashboard, checkpoints and execution strategies. The loss is our
//! `Distiller`'s (`DistillModel`); the loop, the metrics and the devices are burn-train's.
//!
//! ```text
//! # two flex devices (MultiDevice), the teacher trained here first:
//! cargo run --release --features flex --example learner_mnist -- --devices flex,flex
//! # the teacher of a finished `mnist` run, hosted by a device server in another process:
//! cargo run --release --features flex --bin burn-distill-device-server -- --listen 127.0.0.1:3000 &
//! cargo run --release --features flex --example learner_mnist -- \
//!     --teacher runs/mnist/teacher/final.bpk --teacher-device ws://127.0.0.1:3000
//! # several CUDA GPUs with collective all-reduce (burn-train's DDP):
//! cargo run --release --features cuda --example learner_mnist -- --devices cuda:0,cuda:1 --ddp
//! ```
//!
//! The first 50 000 training images train, the last 10 000 validate (the dashboard's "Valid"
//! and the checkpoints' choice); the test set is read once, at the end, by the last epoch's
//! student. A run leaves `RUN_DIR/{teacher,student}` (burn-train's checkpoints and logs),
//! `RUN_DIR/teacher.bpk`, `RUN_DIR/student.bpk` and `RUN_DIR/summary.json`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::Dataset;
use burn::module::Module;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{ModuleOptimizer, SgdConfig};
use burn::tensor::Device;
use burn::tensor::distributed::{DistributedConfig, ReduceOperation};
use burn::train::metric::LossMetric;
use burn::train::{ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining};
use burn_distill::data::{ImageBatch, ImageBatcher, MnistDataset, MnistSplit, Subset};
use burn_distill::loss::HintonKdLossConfig;
use burn_distill::model::{FrozenTeacher, Mlp, MlpConfig, TeacherOn, init_seeded, load_weights, save_weights};
use burn_distill::train::{DistillMetric, DistillModel, ObjectiveConfig, evaluate};
use clap::Parser;

type Model = DistillModel<Mlp, ImageBatch, 2>;
type Loader = Arc<dyn DataLoader<ImageBatch>>;

/// Hinton KD on MNIST through burn-train's Learner (its dashboard, checkpoints, devices).
#[derive(Parser, Debug)]
struct Args {
    /// Devices to train on, comma-separated (`flex`, `ndarray`, `wgpu`, `cuda`, `cuda:N`); two
    /// or more train with burn-train's MultiDevice strategy (or DDP with `--ddp`).
    #[arg(long, value_delimiter = ',', default_value = "flex")]
    devices: Vec<String>,
    /// burn-train's DDP (collective all-reduce of the gradients) instead of MultiDevice. burn
    /// 0.22 implements its collectives for CUDA only.
    #[arg(long)]
    ddp: bool,
    /// The teacher's weights (`final.bpk` of a `mnist` run's teacher); without it, the teacher
    /// is trained here first, through the same Learner.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Where the teacher runs: a device name, or `ws://HOST:PORT[/INDEX]` for a device of a
    /// `burn-distill-device-server`. Default: the first training device.
    #[arg(long)]
    teacher_device: Option<String>,
    /// Teacher epochs (when it is trained here).
    #[arg(long, default_value_t = 10)]
    teacher_epochs: usize,
    /// Student epochs.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Examples per batch on each device.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Distillation temperature.
    #[arg(long, default_value_t = 20.0)]
    temperature: f64,
    /// Weight of the hard-label term.
    #[arg(long, default_value_t = 0.7)]
    alpha: f64,
    /// Training images used (the first ones; at most 50 000, the rest of the 60 000 validate).
    #[arg(long)]
    train_examples: Option<usize>,
    /// Where the run goes.
    #[arg(long, default_value = "runs/learner_mnist")]
    run_dir: PathBuf,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() {
    if let Err(error) = run(Args::parse()) {
        eprintln!("learner_mnist: {error}");
        std::process::exit(1);
    }
}

/// A device by name (`cuda:1` picks a GPU), or a device of a burn-remote server.
fn open_device(spec: &str) -> Result<Device, String> {
    burn_distill::open_device(spec).map_err(|err| err.to_string())
}

fn sgd(lr: f64, epochs: usize, steps: usize) -> Result<(ModuleOptimizer, ModuleLrScheduler), String> {
    let optimizer = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9).with_dampening(0.0)))
        .init();
    let scheduler = CosineAnnealingLrSchedulerConfig::new(lr, (epochs * steps).max(1))
        .init()
        .map_err(|err| format!("schedule: {err}"))?;
    Ok((optimizer, scheduler))
}

fn loader(items: Subset<MnistDataset>, batch_size: usize, shuffle: Option<u64>) -> Loader {
    let builder = DataLoaderBuilder::new(ImageBatcher::new())
        .batch_size(batch_size)
        .num_workers(1);
    let builder = match shuffle {
        Some(seed) => builder.shuffle(seed),
        None => builder,
    };
    builder.build(items)
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Everything that can be refused is refused before any work.
    let devices = args
        .devices
        .iter()
        .map(|name| open_device(name))
        .collect::<Result<Vec<_>, _>>()?;
    if devices.is_empty() {
        return Err("--devices: name at least one".into());
    }
    if args.ddp && !args.devices.iter().all(|name| name.starts_with("cuda")) {
        return Err(
            "--ddp needs CUDA devices: burn 0.22 implements its collective all-reduce for CUDA (NCCL) only; \
             use MultiDevice (the default for several devices) elsewhere"
                .into(),
        );
    }
    if let Some(path) = &args.teacher
        && !path.is_file()
    {
        return Err(format!("--teacher {}: no such file", path.display()).into());
    }
    let teacher_device = match &args.teacher_device {
        Some(spec) => open_device(spec)?,
        None => devices[0].clone(),
    };
    let train_device = devices[0].clone().autodiff();
    let full = MnistDataset::load_default(MnistSplit::Train)?;
    let test = MnistDataset::load_default(MnistSplit::Test)?;
    let train_count = args.train_examples.unwrap_or(50_000).min(50_000);
    let train_items = Subset::new(full.clone(), (0..train_count).collect());
    let valid_items = Subset::new(full, (50_000..60_000).collect());
    std::fs::create_dir_all(&args.run_dir)?;
    let strategy = |devices: &[Device]| -> ExecutionStrategy {
        let devices: Vec<Device> = devices.iter().cloned().map(Device::autodiff).collect();
        match (devices.len(), args.ddp) {
            (1, false) => ExecutionStrategy::single(devices[0].clone()),
            (_, false) => ExecutionStrategy::multi(devices, MultiDeviceOptim::OptimMainDevice),
            (_, true) => ExecutionStrategy::ddp(
                devices,
                DistributedConfig {
                    all_reduce_op: ReduceOperation::Mean,
                },
            ),
        }
    };
    // MultiDevice sums the devices' gradients; DDP's all-reduce here takes their mean.
    let summed_batches = if args.ddp { 1 } else { devices.len() };
    let steps_per_epoch = train_count.div_ceil(args.batch_size * devices.len());

    // 1. The teacher: loaded, or trained here through the same Learner (cross-entropy).
    let teacher = match &args.teacher {
        Some(path) => load_weights(MlpConfig::hinton_teacher().init(&train_device), path)?,
        None => {
            let model: Model = DistillModel::builder(init_seeded(args.seed, &train_device, |d| {
                MlpConfig::hinton_teacher().init(d)
            }))
            .objective(&ObjectiveConfig::Supervised { label_smoothing: 0.0 })?
            .summed_batches(summed_batches)
            .build()?;
            let (optimizer, scheduler) = sgd(0.05, args.teacher_epochs, steps_per_epoch)?;
            let result = SupervisedTraining::new(
                args.run_dir.join("teacher"),
                loader(train_items.clone(), args.batch_size, Some(args.seed)),
                loader(valid_items.clone(), 500, None),
            )
            .num_epochs(args.teacher_epochs)
            .metric_train_numeric(LossMetric::new())
            .metric_valid_numeric(LossMetric::new())
            .metric_train_numeric(DistillMetric::accuracy())
            .metric_valid_numeric(DistillMetric::accuracy())
            .with_default_checkpointers()
            .summary()
            .with_training_strategy(strategy(&devices).into())
            .launch(Learner::new(model, optimizer, scheduler));
            if let Some(error) = result.error {
                return Err(format!("training the teacher: {error}").into());
            }
            result.model.into_student()
        }
    };
    save_weights(&teacher, args.run_dir.join("teacher.bpk"))?;

    // 2. The student, distilled from the teacher on its own device.
    let teacher = TeacherOn::new(
        FrozenTeacher::new(&teacher.valid().to_device(&teacher_device)),
        teacher_device.clone(),
    );
    let student = init_seeded(args.seed + 1, &train_device, |d| MlpConfig::hinton_student().init(d));
    let objective = ObjectiveConfig::Hinton(
        HintonKdLossConfig::new()
            .with_temperature(args.temperature)
            .with_alpha(args.alpha),
    );
    let model: Model = DistillModel::builder(student)
        .objective(&objective)?
        .teacher(teacher)
        .summed_batches(summed_batches)
        .build()?;
    let (optimizer, scheduler) = sgd(0.05, args.epochs, steps_per_epoch)?;
    let start = Instant::now();
    let result = SupervisedTraining::new(
        args.run_dir.join("student"),
        loader(train_items, args.batch_size, Some(args.seed + 1)),
        loader(valid_items, 500, None),
    )
    .num_epochs(args.epochs)
    .metric_train_numeric(LossMetric::new())
    .metric_valid_numeric(LossMetric::new())
    .metric_train_numeric(DistillMetric::soft())
    .metric_train_numeric(DistillMetric::hard())
    .metric_train_numeric(DistillMetric::accuracy())
    .metric_valid_numeric(DistillMetric::accuracy())
    .with_default_checkpointers()
    .summary()
    .with_training_strategy(strategy(&devices).into())
    .launch(Learner::new(model, optimizer, scheduler));
    let seconds = start.elapsed().as_secs_f64();
    if let Some(error) = result.error {
        return Err(format!("distilling the student: {error}").into());
    }
    let student = result.model.into_student();
    save_weights(&student, args.run_dir.join("student.bpk"))?;

    // 3. The test set, read once.
    let eval_device = devices[0].clone();
    let student = student.valid().to_device(&eval_device);
    let metrics = evaluate(&student, None, &test, &ImageBatcher::new(), 1000, &eval_device)?;
    let summary = serde_json::json!({
        "devices": args.devices,
        "ddp": args.ddp,
        "teacher_device": args.teacher_device.clone().unwrap_or_else(|| args.devices[0].clone()),
        "train_examples": train_count,
        "epochs": args.epochs,
        "batch_size_per_device": args.batch_size,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "student_seconds": seconds,
        "student_examples_per_second": (train_count * args.epochs) as f64 / seconds,
        "test_examples": test.len(),
        "student_test_errors": metrics.errors,
        "student_test_accuracy": metrics.accuracy,
    });
    std::fs::write(
        args.run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    println!(
        "student: {} test errors of {} ({:.2}%), {:.0} s for {} epochs ({:.0} examples/s) on {}",
        metrics.errors,
        test.len(),
        100.0 * (1.0 - metrics.accuracy),
        seconds,
        args.epochs,
        (train_count * args.epochs) as f64 / seconds,
        args.devices.join(","),
    );
    Ok(())
}
