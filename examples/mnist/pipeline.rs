//! Hinton, Vinyals & Dean (2015), section 3, on the bundled MNIST: a teacher, the same student
//! trained alone, and the student distilled from the teacher, all trained by one `Distiller`.
//!
//! Shared by the `mnist` example (`main.rs`) and the root test harness, which runs it in a tiny
//! configuration.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::Module;
use burn::optim::SgdConfig;
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::momentum::MomentumConfig;
use burn::tensor::{Device, Tensor};
use burn_distill::data::{
    Batch, CacheBuildOptions, CacheMode, CachedTeacher, Fingerprinted, ImageBatcher, Jitter, MnistDataset, MnistItem,
    MnistSplit, Subset, build_cache,
};
use burn_distill::loss::{HintonKdLossConfig, device_by_name};
use burn_distill::model::{
    ConnectorConfig, Cost, FrozenTeacher, Mlp, MlpConfig, Teacher, init_seeded, load_weights, save_weights,
};
use burn_distill::train::{
    DistillConfig, Distiller, EpochRecord, EvalSet, FeatureTermConfig, FitData, MaxNormConfig, ObjectiveConfig,
    OptimizerConfig, RunSummary, read_metrics,
};
use serde::{Deserialize, Serialize};

use super::runs::SavedRun;

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    /// Device name (`ndarray`, `flex`, `wgpu`, `cuda`).
    pub device: String,
    /// Where the run goes.
    pub run_dir: PathBuf,
    /// Training examples used (the first ones of the training file); `None` for all 60 000.
    pub train_examples: Option<usize>,
    /// Test examples used; `None` for all 10 000.
    pub test_examples: Option<usize>,
    /// Teacher epochs.
    pub teacher_epochs: usize,
    /// Epochs of each student.
    pub student_epochs: usize,
    /// Distillation temperature.
    pub temperature: f64,
    /// Weight of the hard-label term (Hinton KD's α).
    pub alpha: f64,
    /// Teacher's initial learning rate (SGD, momentum 0.9, cosine decay).
    pub teacher_learning_rate: f64,
    /// Both students' initial learning rate (same optimizer and schedule).
    pub student_learning_rate: f64,
    /// The teacher's examples per batch.
    #[serde(default = "default_batch_size")]
    pub teacher_batch_size: usize,
    /// The students' examples per batch.
    pub batch_size: usize,
    /// Distil from an offline cache of the teacher's outputs instead of the live teacher.
    pub use_cache: bool,
    /// Show the distilled student ±2-pixel jittered training images, each with the live
    /// teacher's outputs for that very image ("function matching", Beyer et al. 2022); the
    /// paper's student saw plain images. Not with `use_cache` (a cache holds plain images only).
    pub distill_jitter: bool,
    /// Show the student trained alone jittered images too (a control; the paper's was trained
    /// without any regularisation).
    pub alone_jitter: bool,
    /// Train the teacher on jittered images (the paper's). `false` trains it on plain images with
    /// dropout only: a diagnostic of what the soft targets carry of what dropout, rather than
    /// jitter, taught it.
    #[serde(default = "yes")]
    pub teacher_jitter: bool,
    /// Dropout on both students' hidden layers (0: none, the paper's). A diagnostic: whether
    /// the distilled student's shortfall is its own overfitting of the transfer set. The students
    /// go to directories named with it.
    #[serde(default)]
    pub student_dropout: f64,
    /// A max-norm constraint on the teacher's hidden units (each unit's incoming weights kept
    /// within an L2 norm of this after every step; Srivastava et al. 2014), as on the paper's
    /// teacher. `None` for none (the default).
    #[serde(default)]
    pub teacher_max_norm: Option<f64>,
    /// Weight of a hint term for the distilled student (FitNets, Romero et al. 2015): the mean
    /// squared error between its last hidden layer, through a linear connector trained with it
    /// (800 → 1200), and the teacher's. 0 for none (the paper's). Needs the live teacher (a
    /// cache holds outputs only).
    #[serde(default)]
    pub hint_weight: f64,
    /// Also evaluate every model after each epoch on the first images of the students' transfer
    /// set (as many as the test set has): the distilled student's agreement and KL to the teacher
    /// on images it learnt from, next to the test set's. A diagnostic; `eval[0]` stays the test set.
    #[serde(default)]
    pub eval_train: bool,
    /// Leave this digit out of the students' training (transfer) set.
    pub omit_digit: Option<u8>,
    /// Seed of everything.
    pub seed: u64,
    /// Seed of both students (their initial weights, batch order and jitter) when it should
    /// differ from `seed`, e.g. to measure the run-to-run spread of the students against one
    /// teacher. `None`: `seed`.
    #[serde(default)]
    pub student_seed: Option<u64>,
    /// Progress bars.
    pub progress: bool,
    /// Flush subnormal floats to zero while training (`Distiller::with_flush_denormals`).
    pub flush_denormals: bool,
}

fn yes() -> bool {
    true
}

fn default_batch_size() -> usize {
    128
}

impl Options {
    /// The default, full run.
    pub fn full() -> Self {
        Self {
            device: "flex".into(),
            run_dir: PathBuf::from("runs/mnist"),
            train_examples: None,
            test_examples: None,
            teacher_epochs: 120,
            // T = 20 is the paper's. Its weight on the hard labels was "considerably lower" than
            // on the soft targets; α = 0.7 here (against 0.3 x T^2 = 120 on the soft term) and
            // 200 epochs are the best of the settings measured in the README (0.1 with 30
            // epochs: 107 errors; 0.7 with 200: 82).
            student_epochs: 200,
            temperature: 20.0,
            alpha: 0.7,
            teacher_learning_rate: 0.05,
            student_learning_rate: 0.05,
            teacher_batch_size: default_batch_size(),
            batch_size: default_batch_size(),
            use_cache: true,
            distill_jitter: false,
            alone_jitter: false,
            teacher_jitter: true,
            hint_weight: 0.0,
            teacher_max_norm: None,
            student_dropout: 0.0,
            eval_train: false,
            omit_digit: None,
            seed: 1,
            student_seed: None,
            progress: true,
            flush_denormals: true,
        }
    }

    /// `--quick`: 10 000 training examples, a few epochs; a few minutes on 2 CPU cores.
    pub fn quick() -> Self {
        Self {
            run_dir: PathBuf::from("runs/mnist-quick"),
            train_examples: Some(10_000),
            teacher_epochs: 6,
            student_epochs: 6,
            ..Self::full()
        }
    }
}

/// The three models side by side, as written to `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Teacher's test errors after its last epoch.
    pub teacher_test_errors: usize,
    /// The student trained alone.
    pub student_alone_test_errors: usize,
    /// The distilled student.
    pub student_distilled_test_errors: usize,
    /// Test examples.
    pub test_examples: usize,
    /// Training examples (of the students' transfer set).
    pub train_examples: usize,
    /// Teacher epochs.
    pub teacher_epochs: usize,
    /// Student epochs.
    pub epochs: usize,
    /// The device.
    pub device: String,
    /// Distillation temperature.
    pub temperature: f64,
    /// Hard-label weight.
    pub alpha: f64,
    /// The teacher's initial learning rate.
    #[serde(default)]
    pub teacher_learning_rate: f64,
    /// The students' initial learning rate.
    #[serde(default)]
    pub student_learning_rate: f64,
    /// Whether the distilled student learnt from the offline cache.
    pub used_cache: bool,
    /// Whether the distilled student saw jittered images (with the teacher's outputs for them).
    #[serde(default)]
    pub distill_jitter: bool,
    /// Whether the student alone saw jittered images.
    #[serde(default)]
    pub alone_jitter: bool,
    /// Whether the teacher learnt from jittered images.
    #[serde(default = "yes")]
    pub teacher_jitter: bool,
    /// Weight of the distilled student's hint term (0: none).
    #[serde(default)]
    pub hint_weight: f64,
    /// Dropout on the students' hidden layers (0: none).
    #[serde(default)]
    pub student_dropout: f64,
    /// The max-norm radius of the teacher's hidden units (`None`: unconstrained).
    #[serde(default)]
    pub teacher_max_norm: Option<f64>,
    /// The teacher's seed.
    #[serde(default)]
    pub seed: u64,
    /// The students' seed (the teacher's unless `--student-seed` gave another).
    #[serde(default)]
    pub student_seed: u64,
    /// Seconds each phase spent training and evaluating, summed over every epoch of its run (so
    /// also for a phase loaded from, or resumed after, an earlier process).
    pub seconds: PhaseSeconds,
    /// Training seconds per epoch per phase.
    pub seconds_per_epoch: PhaseSeconds,
    /// Parameters of teacher and student.
    pub teacher_parameters: usize,
    /// Parameters of the student.
    pub student_parameters: usize,
    /// Inference time per test example (batches of 1000, no autodiff).
    pub teacher_inference_seconds_per_example: f64,
    /// The student's.
    pub student_inference_seconds_per_example: f64,
    /// The paper's numbers: 67, 146, 74.
    pub paper_test_errors: [usize; 3],
    /// The omitted-digit experiment, when run.
    pub omitted_digit: Option<OmittedDigit>,
}

/// Seconds of the three phases.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct PhaseSeconds {
    /// The teacher.
    pub teacher: f64,
    /// The student alone.
    pub student_alone: f64,
    /// The distilled student.
    pub student_distilled: f64,
}

/// Hinton's experiment with a digit missing from the transfer set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OmittedDigit {
    /// The digit.
    pub digit: u8,
    /// Test examples of that digit.
    pub digit_test_examples: usize,
    /// Distilled student: test errors, and errors on the digit, before the bias adjustment.
    pub errors_before: usize,
    /// Of which on the digit.
    pub digit_errors_before: usize,
    /// The logit offset added to the digit's class (chosen on the training set, which has it).
    pub bias_offset: f64,
    /// Test errors after.
    pub errors_after: usize,
    /// Of which on the digit.
    pub digit_errors_after: usize,
    /// Share of the digit's test examples classified correctly after.
    pub digit_accuracy_after: f64,
}

/// Runs the whole pipeline and writes `summary.json`, each phase's `metrics.jsonl` and the plot.
pub fn run(options: &Options) -> Result<Summary, Box<dyn std::error::Error>> {
    let device =
        device_by_name(&options.device).ok_or_else(|| format!("no device {:?} in this build", options.device))?;
    let training = device.clone().autodiff();
    std::fs::create_dir_all(&options.run_dir)?;

    let full_train = MnistDataset::load_default(MnistSplit::Train)?;
    let full_test = MnistDataset::load_default(MnistSplit::Test)?;
    let train_count = options.train_examples.unwrap_or(full_train.len()).min(full_train.len());
    let test_count = options.test_examples.unwrap_or(full_test.len()).min(full_test.len());
    let train = Subset::new(full_train.clone(), (0..train_count).collect());
    let test = Subset::new(full_test, (0..test_count).collect());
    let transfer = match options.omit_digit {
        Some(digit) => {
            let kept = (0..train_count).filter(|&i| full_train.labels()[i] != digit).collect();
            Subset::new(full_train.clone(), kept)
        }
        None => train.clone(),
    };
    let seen = Subset::new(
        full_train.clone(),
        transfer.positions()[..test.len().min(transfer.len())].to_vec(),
    );
    let mut evals = vec![EvalSet {
        name: "test",
        dataset: &test,
    }];
    if options.eval_train {
        evals.push(EvalSet {
            name: "train",
            dataset: &seen,
        });
    }
    // Students trained on another transfer set, or from the cache, are other runs.
    let suffix = options
        .omit_digit
        .map_or(String::new(), |digit| format!("-without-{digit}"));
    if !(0.0..1.0).contains(&options.student_dropout) {
        return Err(format!(
            "the students' dropout must be in [0, 1), not {}",
            options.student_dropout
        )
        .into());
    }
    let dropout = if options.student_dropout > 0.0 {
        format!("-dropout{}", options.student_dropout)
    } else {
        String::new()
    };
    let alone_name = format!(
        "student-alone{suffix}{dropout}{}",
        if options.alone_jitter { "-jitter" } else { "" }
    );
    if options.use_cache && options.distill_jitter {
        return Err("the cache holds the teacher's outputs for plain images only: --distill-jitter needs the live teacher (drop --cache)".into());
    }
    if !(options.hint_weight.is_finite() && options.hint_weight >= 0.0) {
        return Err(format!("the hint weight must be finite and >= 0, not {}", options.hint_weight).into());
    }
    if options.use_cache && options.hint_weight > 0.0 {
        return Err("the cache holds the teacher's outputs only, not its hidden layers: --hint needs the live teacher (drop --cache)".into());
    }
    let teacher_name = if options.teacher_jitter {
        "teacher"
    } else {
        "teacher-plain"
    };
    let distilled_name = format!(
        "student-distilled{suffix}{dropout}{}{}{}{}",
        if options.teacher_jitter {
            ""
        } else {
            "-from-plain-teacher"
        },
        if options.use_cache { "-cached" } else { "" },
        if options.distill_jitter { "-jitter" } else { "" },
        if options.hint_weight > 0.0 { "-hint" } else { "" }
    );
    say(
        options,
        &format!(
            "MNIST: {} training examples ({} in the students' transfer set), {} test examples, on {}; run directory {}",
            train.len(),
            transfer.len(),
            test.len(),
            options.device,
            options.run_dir.display()
        ),
    );

    // 1. The teacher: dropout and ±2-pixel jitter (or dropout only).
    let teacher_config = config(
        train.len(),
        options.teacher_epochs,
        options.teacher_learning_rate,
        options.teacher_batch_size,
        ObjectiveConfig::Supervised { label_smoothing: 0.0 },
        options.seed,
    )
    .with_max_norm(
        options
            .teacher_max_norm
            .map(|c| MaxNormConfig::new(c).with_modules(vec!["hidden".into()])),
    );
    let student_seed = options.student_seed.unwrap_or(options.seed);
    let student_config = |objective| {
        config(
            transfer.len(),
            options.student_epochs,
            options.student_learning_rate,
            options.batch_size,
            objective,
            student_seed,
        )
    };
    let kd = ObjectiveConfig::Hinton(
        HintonKdLossConfig::new()
            .with_alpha(options.alpha)
            .with_temperature(options.temperature),
    );
    let mut distilled_config = student_config(kd);
    if options.hint_weight > 0.0 {
        let (student_width, teacher_width) = (
            MlpConfig::hinton_student().hidden[1],
            MlpConfig::hinton_teacher().hidden[1],
        );
        distilled_config = distilled_config.with_features(vec![
            FeatureTermConfig::new("hidden.1".into(), "hidden.1".into())
                .with_weight(options.hint_weight)
                .with_connector(Some(ConnectorConfig::new(student_width, teacher_width))),
        ]);
    }
    // Every phase's config, checked before the first one trains: a bad setting of the last phase
    // (a temperature of 0, say) must not wait for the teacher's hours.
    let alone_config = student_config(ObjectiveConfig::Supervised { label_smoothing: 0.0 });
    for config in [&teacher_config, &alone_config, &distilled_config] {
        config.validate()?;
    }
    let jitter = ImageBatcher::with_jitter(Jitter {
        max_shift: 2,
        seed: options.seed,
    });
    let student_jitter = ImageBatcher::with_jitter(Jitter {
        max_shift: 2,
        seed: student_seed,
    });
    let plain = ImageBatcher::new();
    let teacher_phase = train_or_load(
        options,
        teacher_name,
        teacher_config,
        || init_seeded(options.seed, &training, |d| MlpConfig::hinton_teacher().init(d)),
        None,
        None,
        &train,
        &evals,
        if options.teacher_jitter { &jitter } else { &plain },
        &plain,
        &training,
    )?;
    let teacher = FrozenTeacher::new(&teacher_phase.model);

    // Both students start from the same weights.
    let init_student = || {
        init_seeded(student_seed + 1, &training, |d| {
            MlpConfig::hinton_student()
                .with_dropout(options.student_dropout)
                .init(d)
        })
    };

    // 2. The same student alone: no dropout, no jitter.
    let alone = train_or_load(
        options,
        &alone_name,
        alone_config,
        init_student,
        None,
        None,
        &transfer,
        &evals,
        if options.alone_jitter { &student_jitter } else { &plain },
        &plain,
        &training,
    )?;

    // 3. The same student, distilled (from the live teacher or its cached outputs).
    let cached;
    let teacher_for_students: &dyn Teacher<Tensor<2>, 2> = if options.use_cache {
        let path = options.run_dir.join(format!("{teacher_name}-outputs{suffix}.bdkd"));
        let report = build_cache(
            &path,
            &teacher,
            &transfer,
            &plain,
            &device,
            &CacheBuildOptions::new(CacheMode::DenseF32).with_progress(options.progress),
        )?;
        if let Some(reason) = &report.replaced {
            // Said even with --quiet, and logged: the rebuild took the teacher's pass over the data.
            super::runs::warn(
                &options.run_dir,
                &format!("rebuilt the teacher cache {}: {reason}", path.display()),
            );
        }
        say(
            options,
            &format!(
                "teacher cache {}: {} examples, {} bytes{}",
                path.display(),
                report.examples,
                report.bytes,
                if report.reused { " (reused)" } else { "" }
            ),
        );
        let fingerprint = Teacher::<Tensor<2>, 2>::fingerprint(&teacher).expect("a module teacher has a fingerprint");
        cached = CachedTeacher::open(&path, &transfer, fingerprint, &training)?;
        &cached
    } else {
        &teacher
    };
    let distilled = train_or_load(
        options,
        &distilled_name,
        distilled_config,
        init_student,
        Some(teacher_for_students),
        // The live teacher speaks for the test set; a cache of the training set cannot.
        Some(&teacher),
        &transfer,
        &evals,
        if options.distill_jitter {
            &student_jitter
        } else {
            &plain
        },
        &plain,
        &training,
    )?;

    let omitted_digit = match options.omit_digit {
        Some(digit) => Some(omitted_digit_report(
            &distilled.model,
            digit,
            &train,
            &test,
            &plain,
            &device,
        )?),
        None => None,
    };

    let errors = |phase: &Phase| phase.summary.last.eval[0].1.errors;
    let phase_seconds = |phase: &Phase| phase.summary.train_seconds + phase.summary.eval_seconds;
    let per_epoch = |phase: &Phase| phase.summary.train_seconds / phase.summary.epochs.max(1) as f64;
    let summary = Summary {
        teacher_test_errors: errors(&teacher_phase),
        student_alone_test_errors: errors(&alone),
        student_distilled_test_errors: errors(&distilled),
        test_examples: test.len(),
        train_examples: transfer.len(),
        teacher_epochs: options.teacher_epochs,
        epochs: options.student_epochs,
        device: options.device.clone(),
        temperature: options.temperature,
        alpha: options.alpha,
        teacher_learning_rate: options.teacher_learning_rate,
        student_learning_rate: options.student_learning_rate,
        used_cache: options.use_cache,
        distill_jitter: options.distill_jitter,
        alone_jitter: options.alone_jitter,
        teacher_jitter: options.teacher_jitter,
        hint_weight: options.hint_weight,
        student_dropout: options.student_dropout,
        teacher_max_norm: options.teacher_max_norm,
        seed: options.seed,
        student_seed,
        seconds: PhaseSeconds {
            teacher: phase_seconds(&teacher_phase),
            student_alone: phase_seconds(&alone),
            student_distilled: phase_seconds(&distilled),
        },
        seconds_per_epoch: PhaseSeconds {
            teacher: per_epoch(&teacher_phase),
            student_alone: per_epoch(&alone),
            student_distilled: per_epoch(&distilled),
        },
        teacher_parameters: teacher_phase.model.parameter_count(),
        student_parameters: distilled.model.parameter_count(),
        teacher_inference_seconds_per_example: inference_seconds(&teacher_phase.model, &test, &plain, &device),
        student_inference_seconds_per_example: inference_seconds(&distilled.model, &test, &plain, &device),
        paper_test_errors: [67, 146, 74],
        omitted_digit,
    };
    let summary_path = options.run_dir.join(format!("summary{suffix}.json"));
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)?;
    let plot_path = options.run_dir.join(format!("test-errors{suffix}.png"));
    plot(
        &plot_path,
        &[
            ("teacher", &teacher_phase.records),
            ("student alone", &alone.records),
            ("student distilled", &distilled.records),
        ],
    )?;
    print_table(&summary);
    say(
        options,
        &format!(
            "wrote {}, {} and metrics.jsonl in {}/{{{teacher_name},{alone_name},{distilled_name}}}",
            summary_path.display(),
            plot_path.display(),
            options.run_dir.display()
        ),
    );
    Ok(summary)
}

fn say(options: &Options, line: &str) {
    if options.progress {
        println!("{line}");
    }
}

/// SGD with momentum 0.9 and a cosine decay to a hundredth over `epochs` of `examples`.
fn config(
    examples: usize,
    epochs: usize,
    learning_rate: f64,
    batch_size: usize,
    objective: ObjectiveConfig,
    seed: u64,
) -> DistillConfig {
    let steps_per_epoch = examples.div_ceil(batch_size);
    let optimizer = SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_momentum(0.9).with_dampening(0.0)));
    let schedule = LrSchedulerConfig::Cosine(
        CosineAnnealingLrSchedulerConfig::new(learning_rate, epochs * steps_per_epoch + 1)
            .with_min_lr(learning_rate / 100.0),
    );
    DistillConfig::new(epochs, OptimizerConfig::Sgd(optimizer), schedule, objective)
        .with_batch_size(batch_size)
        .with_eval_batch_size(1000)
        .with_seed(seed)
}

struct Phase {
    model: Mlp,
    summary: RunSummary,
    records: Vec<EpochRecord>,
}

/// Trains a phase in `run_dir/name`, or loads it when that directory holds a finished run with
/// the same config, or resumes it when it holds a stopped one.
#[allow(clippy::too_many_arguments)]
fn train_or_load(
    options: &Options,
    name: &str,
    config: DistillConfig,
    init: impl Fn() -> Mlp,
    teacher: Option<&dyn Teacher<Tensor<2>, 2>>,
    eval_teacher: Option<&dyn Teacher<Tensor<2>, 2>>,
    train: &Subset<MnistDataset>,
    evals: &[EvalSet<'_, Subset<MnistDataset>>],
    train_batcher: &ImageBatcher,
    eval_batcher: &ImageBatcher,
    device: &Device,
) -> Result<Phase, Box<dyn std::error::Error>> {
    let dir = options.run_dir.join(name);
    let weights = dir.join("final.bpk");
    let saved = SavedRun::read(&dir, &config)?;
    if let Some(summary) = saved.finished(&dir).cloned() {
        if summary.train_data != train.fingerprint() {
            return Err(format!(
                "{} holds a {name} run on other training data; remove it or choose another --run-dir",
                dir.display()
            )
            .into());
        }
        if summary.teacher != teacher.and_then(|teacher| teacher.fingerprint()) {
            return Err(format!(
                "{} holds a {name} run distilled from another teacher; remove it or choose another --run-dir",
                dir.display()
            )
            .into());
        }
        say(
            options,
            &format!("{name}: loading the finished run in {}", dir.display()),
        );
        let model = load_weights(init(), &weights)?;
        let records = read_metrics(&dir)?;
        return Ok(Phase {
            model,
            summary,
            records,
        });
    }
    let distiller = if saved.same_config {
        say(options, &format!("{name}: resuming the run in {}", dir.display()));
        Distiller::resume(&dir)?
    } else if saved.has_config {
        return Err(format!(
            "{} holds a {name} run with another config; remove it or choose another --run-dir",
            dir.display()
        )
        .into());
    } else {
        say(options, &format!("{name}: training, {} epochs", config.epochs));
        Distiller::new(config, &dir)
    };
    let distiller = match teacher {
        Some(teacher) => distiller.with_teacher(teacher),
        None => distiller,
    };
    let distiller = match eval_teacher {
        Some(teacher) => distiller.with_eval_teacher(teacher),
        None => distiller,
    };
    let outcome = distiller
        .with_progress(options.progress)
        .with_flush_denormals(options.flush_denormals)
        .fit(
            init(),
            FitData {
                train,
                evals,
                train_batcher,
                eval_batcher,
            },
            device,
        )?;
    save_weights(&outcome.student, &weights)?;
    Ok(Phase {
        model: outcome.student,
        summary: outcome.summary,
        records: outcome.records,
    })
}

/// Logits of every example of `dataset`, on the host, `[n × 10]`, with the labels.
fn logits_and_labels(
    model: &Mlp,
    dataset: &Subset<MnistDataset>,
    batcher: &ImageBatcher,
    device: &Device,
) -> (Vec<f32>, Vec<u8>) {
    let model = model.valid();
    let mut logits = Vec::with_capacity(dataset.len() * 10);
    let mut labels = Vec::with_capacity(dataset.len());
    let positions: Vec<usize> = (0..dataset.len()).collect();
    for chunk in positions.chunks(1000) {
        let items: Vec<MnistItem> = chunk.iter().map(|&i| dataset.get(i).expect("in range")).collect();
        labels.extend(items.iter().map(|item| item.label));
        let batch = batcher.batch(items, device);
        logits.extend(model.forward(batch.input()).into_data().iter::<f32>());
    }
    (logits, labels)
}

/// Errors and errors on `digit` when `offset` is added to the digit's logit.
fn count_errors(logits: &[f32], labels: &[u8], digit: u8, offset: f32) -> (usize, usize) {
    let mut errors = (0, 0);
    for (row, &label) in logits.chunks(10).zip(labels) {
        let predicted = (0..10)
            .map(|class| row[class] + if class == usize::from(digit) { offset } else { 0.0 })
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(class, _)| class as u8)
            .expect("10 classes");
        if predicted != label {
            errors.0 += 1;
            errors.1 += usize::from(label == digit);
        }
    }
    errors
}

fn omitted_digit_report(
    model: &Mlp,
    digit: u8,
    train: &Subset<MnistDataset>,
    test: &Subset<MnistDataset>,
    batcher: &ImageBatcher,
    device: &Device,
) -> Result<OmittedDigit, Box<dyn std::error::Error>> {
    // The offset is chosen on the training set, which has the digit (the student never saw it).
    let (train_logits, train_labels) = logits_and_labels(model, train, batcher, device);
    let bias_offset = (0..=80)
        .map(|step| step as f32 * 0.25)
        .min_by_key(|&offset| count_errors(&train_logits, &train_labels, digit, offset).0)
        .expect("a grid");
    let (logits, labels) = logits_and_labels(model, test, batcher, device);
    let (errors_before, digit_errors_before) = count_errors(&logits, &labels, digit, 0.0);
    let (errors_after, digit_errors_after) = count_errors(&logits, &labels, digit, bias_offset);
    let digit_test_examples = labels.iter().filter(|&&label| label == digit).count();
    Ok(OmittedDigit {
        digit,
        digit_test_examples,
        errors_before,
        digit_errors_before,
        bias_offset: f64::from(bias_offset),
        errors_after,
        digit_errors_after,
        digit_accuracy_after: 1.0 - digit_errors_after as f64 / digit_test_examples.max(1) as f64,
    })
}

/// Seconds per example of a forward pass over `dataset` in batches of 1000.
fn inference_seconds(model: &Mlp, dataset: &Subset<MnistDataset>, batcher: &ImageBatcher, device: &Device) -> f64 {
    let model = model.valid();
    let positions: Vec<usize> = (0..dataset.len()).collect();
    let batches: Vec<Tensor<2>> = positions
        .chunks(1000)
        .map(|chunk| {
            let items = chunk.iter().map(|&i| dataset.get(i).expect("in range")).collect();
            batcher.batch(items, device).input()
        })
        .collect();
    let start = Instant::now();
    for input in batches {
        let _: Vec<f32> = model.forward(input).into_data().iter::<f32>().collect();
    }
    start.elapsed().as_secs_f64() / dataset.len().max(1) as f64
}

fn print_table(summary: &Summary) {
    let row = |name: &str, errors: usize, paper: usize, parameters: usize, per_epoch: f64| {
        println!(
            "| {name} | {errors} | {:.2} % | {paper} | {parameters} | {per_epoch:.1} |",
            100.0 * (1.0 - errors as f64 / summary.test_examples as f64)
        );
    };
    println!();
    println!(
        "MNIST, {} test examples, {} device, T = {}, alpha = {}:",
        summary.test_examples, summary.device, summary.temperature, summary.alpha
    );
    println!("| model | test errors | accuracy | paper's errors | parameters | s / epoch |");
    println!("|---|---:|---:|---:|---:|---:|");
    row(
        if summary.teacher_jitter {
            "teacher 784-1200-1200-10 (dropout, jitter)"
        } else {
            "teacher 784-1200-1200-10 (dropout, no jitter)"
        },
        summary.teacher_test_errors,
        67,
        summary.teacher_parameters,
        summary.seconds_per_epoch.teacher,
    );
    row(
        if summary.alone_jitter {
            "student 784-800-800-10 alone (jittered images)"
        } else {
            "student 784-800-800-10 alone"
        },
        summary.student_alone_test_errors,
        146,
        summary.student_parameters,
        summary.seconds_per_epoch.student_alone,
    );
    row(
        match (summary.distill_jitter, summary.hint_weight > 0.0) {
            (false, false) => "student 784-800-800-10 distilled",
            (true, false) => "student 784-800-800-10 distilled (jittered images)",
            (false, true) => "student 784-800-800-10 distilled (+ hint)",
            (true, true) => "student 784-800-800-10 distilled (jittered images, + hint)",
        },
        summary.student_distilled_test_errors,
        74,
        summary.student_parameters,
        summary.seconds_per_epoch.student_distilled,
    );
    println!(
        "inference per example: teacher {:.2} µs, student {:.2} µs",
        summary.teacher_inference_seconds_per_example * 1e6,
        summary.student_inference_seconds_per_example * 1e6
    );
    if let Some(omitted) = &summary.omitted_digit {
        println!(
            "without {0}s in the transfer set: {1} errors ({2} on the {3} test {0}s); after adding {4:.2} to the {0} logit: {5} errors ({6} on {0}s, {7:.1} % of {0}s correct)",
            omitted.digit,
            omitted.errors_before,
            omitted.digit_errors_before,
            omitted.digit_test_examples,
            omitted.bias_offset,
            omitted.errors_after,
            omitted.digit_errors_after,
            100.0 * omitted.digit_accuracy_after
        );
    }
}

/// Test errors per epoch of each phase, as a PNG.
fn plot(path: &Path, phases: &[(&str, &Vec<EpochRecord>)]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    // Registering twice (a second run in one process) is harmless.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let series: Vec<(&str, Vec<(f64, f64)>)> = phases
        .iter()
        .map(|(name, records)| {
            let points = records
                .iter()
                .map(|record| (record.epoch as f64, record.eval[0].1.errors as f64))
                .collect();
            (*name, points)
        })
        .collect();
    let max_epoch = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let max_errors = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let min_errors = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold(max_errors, f64::min);
    burn_distill::model::files::save_atomically(
        path,
        |temporary| -> Result<(), Box<dyn std::error::Error>> {
            let root = BitMapBackend::new(temporary, (900, 600)).into_drawing_area();
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption("MNIST test errors per epoch", ("sans-serif", 26))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(60)
                .build_cartesian_2d(1.0..max_epoch.max(2.0), (min_errors * 0.8).max(1.0)..max_errors * 1.05)?;
            chart.configure_mesh().x_desc("epoch").y_desc("test errors").draw()?;
            let colors = [BLUE, RED, GREEN];
            for ((name, points), color) in series.into_iter().zip(colors) {
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            Ok(())
        },
        |error| error.into(),
    )
}
