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
//! Options: `--help` lists them. Every setting is checked before the first model trains.

mod pipeline;
#[path = "../common/report.rs"]
mod report;
#[path = "../common/runs.rs"]
mod runs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Hinton et al. (2015), section 3: a teacher, a student alone and the student distilled, on MNIST.
#[derive(Parser, Debug)]
#[command(name = "mnist")]
struct Args {
    /// ndarray, flex (the default), wgpu or cuda (whichever this build has).
    #[arg(long)]
    device: Option<String>,
    /// 10 000 training images, 6 epochs each, run directory runs/mnist-quick.
    #[arg(long)]
    quick: bool,
    /// Where the run goes (default runs/mnist); a rerun loads or resumes it.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// The teacher's epochs (default 120).
    #[arg(long, value_name = "N")]
    teacher_epochs: Option<usize>,
    /// Each student's epochs (default 200).
    #[arg(long, value_name = "N")]
    epochs: Option<usize>,
    /// Distillation temperature (default 20).
    #[arg(long, value_name = "T")]
    temperature: Option<f64>,
    /// Weight of the hard-label term (default 0.7).
    #[arg(long, value_name = "A")]
    alpha: Option<f64>,
    /// The students' initial learning rate (default 0.05, cosine decay).
    #[arg(long, value_name = "LR")]
    learning_rate: Option<f64>,
    /// The teacher's initial learning rate (default 0.05).
    #[arg(long, value_name = "LR")]
    teacher_learning_rate: Option<f64>,
    /// The students' batch size (default 128).
    #[arg(long, value_name = "N")]
    batch_size: Option<usize>,
    /// The teacher's batch size (default 128).
    #[arg(long, value_name = "N")]
    teacher_batch_size: Option<usize>,
    /// Dropout P on both students' hidden layers (a diagnostic; the paper's students had none).
    #[arg(long, value_name = "P")]
    student_dropout: Option<f64>,
    /// Keep each of the teacher's hidden units' incoming weights within an L2 norm of C after
    /// every step (max-norm, as on the paper's teacher).
    #[arg(long, value_name = "C")]
    teacher_max_norm: Option<f64>,
    /// Run the teacher on every batch instead of distilling from the offline cache of its
    /// outputs for the plain training images (the default).
    #[arg(long, conflicts_with = "cache")]
    live_teacher: bool,
    /// Insist on the cache.
    #[arg(long)]
    cache: bool,
    /// Show the distilled student ±2-pixel jittered images, each with the live teacher's outputs
    /// for it (the paper's student saw plain images).
    #[arg(long)]
    distill_jitter: bool,
    /// Jitter for the student alone too (the control for --distill-jitter).
    #[arg(long)]
    alone_jitter: bool,
    /// Train the teacher on plain images, dropout only (a diagnostic: how much of what dropout,
    /// rather than jitter, taught it the soft targets carry).
    #[arg(long)]
    plain_teacher: bool,
    /// Add W × the mean squared error between the distilled student's last hidden layer
    /// (through a trained 800 → 1200 linear connector) and the teacher's (FitNets hints; needs
    /// the live teacher).
    #[arg(long, value_name = "W")]
    hint: Option<f64>,
    /// Also evaluate each epoch on as many transfer-set images as the test set has.
    #[arg(long)]
    eval_train: bool,
    /// Leave digit D out of the students' transfer set.
    #[arg(long, value_name = "D", value_parser = clap::value_parser!(u8).range(0..=9))]
    omit_digit: Option<u8>,
    /// Seed of everything (default 1).
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Another seed for both students only (initial weights, batch order, jitter).
    #[arg(long, value_name = "S")]
    student_seed: Option<u64>,
    /// Use the first N training images.
    #[arg(long, value_name = "N")]
    train_examples: Option<usize>,
    /// Use the first N test images.
    #[arg(long, value_name = "N")]
    test_examples: Option<usize>,
    /// Train without flushing subnormal floats to zero (slower, same weights).
    #[arg(long)]
    keep_denormals: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

impl Args {
    fn options(self) -> pipeline::Options {
        let mut options = if self.quick {
            pipeline::Options::quick()
        } else {
            pipeline::Options::full()
        };
        macro_rules! set {
            ($($field:ident = $arg:ident),* $(,)?) => {
                $(if let Some(value) = self.$arg { options.$field = value; })*
            };
        }
        set!(
            device = device,
            run_dir = run_dir,
            teacher_epochs = teacher_epochs,
            student_epochs = epochs,
            temperature = temperature,
            alpha = alpha,
            student_learning_rate = learning_rate,
            teacher_learning_rate = teacher_learning_rate,
            batch_size = batch_size,
            teacher_batch_size = teacher_batch_size,
            student_dropout = student_dropout,
            hint_weight = hint,
            seed = seed,
        );
        options.teacher_max_norm = self.teacher_max_norm.or(options.teacher_max_norm);
        options.omit_digit = self.omit_digit.or(options.omit_digit);
        options.student_seed = self.student_seed.or(options.student_seed);
        options.train_examples = self.train_examples.or(options.train_examples);
        options.test_examples = self.test_examples.or(options.test_examples);
        options.progress &= !self.quiet;
        options.flush_denormals &= !self.keep_denormals;
        options.distill_jitter |= self.distill_jitter;
        options.alone_jitter |= self.alone_jitter;
        options.eval_train |= self.eval_train;
        options.teacher_jitter &= !self.plain_teacher;
        if self.cache {
            options.use_cache = true;
        } else if self.live_teacher || options.distill_jitter || options.hint_weight > 0.0 {
            // The cache holds the teacher's outputs for plain images: jittered ones, and its
            // hidden layers, need the live teacher.
            options.use_cache = false;
        }
        options
    }
}

fn main() -> ExitCode {
    let options = Args::parse().options();
    report::exit(pipeline::run(&options))
}
