//! Hinton, Vinyals & Dean (2015), section 3, on the bundled MNIST, with one command:
//!
//! ```text
//! cargo run --release --features flex --example mnist -- --quick
//! cargo run --release --features flex --example mnist                  # the full run
//! cargo run --release --features flex --example mnist -- --omit-digit 3 # no 3s in the transfer set
//! ```
//!
//! Trains (or loads, or resumes) a 784-1200-1200-10 teacher with dropout and ±2-pixel jitter, the
//! 784-800-800-10 student alone, and the same student distilled from the teacher; prints a table
//! next to the paper's 67 / 146 / 74 test errors and writes `summary.json`, a `metrics.jsonl` per
//! model and `test-errors.png` into the run directory (`runs/mnist/`, `runs/mnist-quick/`).
//! Stop it at any time: the next run resumes each model from its last finished epoch.
//!
//! Options: `--device ndarray|flex|wgpu|cuda`, `--quick`, `--run-dir DIR`, `--teacher-epochs N`,
//! `--epochs N` (students), `--temperature T`, `--alpha A` (hard-label weight), `--learning-rate LR`
//! (the students' initial one), `--teacher-learning-rate LR`, `--live-teacher` (run the teacher on
//! every batch instead of distilling from the offline cache of its outputs for the plain training
//! images, the default), `--cache` (insist on the cache), `--distill-jitter` (show the distilled
//! student ±2-pixel jittered images with the live teacher's outputs for them; the paper's saw plain
//! images), `--alone-jitter` (jitter for the student alone too, the control for
//! `--distill-jitter`), `--omit-digit D`, `--seed S`, `--train-examples N`, `--test-examples N`,
//! `--keep-denormals` (train without flushing subnormal floats to zero: slower, same weights),
//! `--quiet`.

mod pipeline;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut options = if args.iter().any(|arg| arg == "--quick") {
        pipeline::Options::quick()
    } else {
        pipeline::Options::full()
    };
    let mut iter = args.iter();
    let mut cache_asked = false;
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--quick" => {}
            "--quiet" => options.progress = false,
            "--keep-denormals" => options.flush_denormals = false,
            "--cache" => {
                options.use_cache = true;
                cache_asked = true;
            }
            "--live-teacher" => options.use_cache = false,
            "--distill-jitter" => options.distill_jitter = true,
            "--alone-jitter" => options.alone_jitter = true,
            "--device" => options.device = value()?.clone(),
            "--run-dir" => options.run_dir = value()?.into(),
            "--teacher-epochs" => options.teacher_epochs = value()?.parse()?,
            "--epochs" => options.student_epochs = value()?.parse()?,
            "--temperature" => options.temperature = value()?.parse()?,
            "--alpha" => options.alpha = value()?.parse()?,
            "--teacher-learning-rate" => options.teacher_learning_rate = value()?.parse()?,
            "--learning-rate" => options.student_learning_rate = value()?.parse()?,
            "--omit-digit" => options.omit_digit = Some(value()?.parse()?),
            "--seed" => options.seed = value()?.parse()?,
            "--train-examples" => options.train_examples = Some(value()?.parse()?),
            "--test-examples" => options.test_examples = Some(value()?.parse()?),
            other => return Err(format!("unknown option {other:?}; see the top of examples/mnist/main.rs").into()),
        }
    }
    // The cache holds the teacher's outputs for plain images: jittered ones need the live teacher.
    if options.distill_jitter && !cache_asked {
        options.use_cache = false;
    }
    if options.omit_digit.is_some_and(|digit| digit > 9) {
        return Err("--omit-digit takes a digit 0-9".into());
    }
    pipeline::run(&options)?;
    Ok(())
}
