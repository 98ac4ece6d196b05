//! Language-model distillation on the bundled Jargon File, with one command:
//!
//! ```text
//! cargo run --release --features flex --example lm -- --quick
//! cargo run --release --features flex --example lm                  # the full run
//! ```
//!
//! Trains (or loads) a byte-level transformer teacher, then the same small student alone and
//! distilled with every objective: token-level forward KL, reverse KL, generalised JSD, skew KL,
//! skew reverse KL and TVD from the live teacher; sequence-level KD on a JSONL transfer set the
//! teacher wrote; on-policy GKD; and forward KL from offline top-8 and top-32 caches of the
//! teacher's outputs. Prints a table (validation perplexity, bits per byte, agreement with the
//! teacher, parameters, tokens per second, cache sizes) and writes `summary.json`, a
//! `metrics.jsonl` per model and `valid-loss.png` into the run directory (`runs/lm/`,
//! `runs/lm-quick/`). Finished models are loaded, not retrained, on the next run.
//!
//! Options: `--help` lists them.

mod pipeline;
#[path = "../common/report.rs"]
mod report;
#[path = "../common/runs.rs"]
mod runs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Byte-level language-model distillation on the Jargon File: a teacher, a student alone and
/// the student distilled with every objective.
#[derive(Parser, Debug)]
#[command(name = "lm")]
struct Args {
    /// ndarray, flex (the default), wgpu or cuda (whichever this build has).
    #[arg(long)]
    device: Option<String>,
    /// Smaller models and data (a few minutes), run directory runs/lm-quick.
    #[arg(long)]
    quick: bool,
    /// Where the run goes (default runs/lm); finished models are loaded, not retrained.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// The teacher's epochs.
    #[arg(long, value_name = "N")]
    teacher_epochs: Option<usize>,
    /// Each student's epochs.
    #[arg(long, value_name = "N")]
    epochs: Option<usize>,
    /// Training windows.
    #[arg(long, value_name = "N")]
    train_windows: Option<usize>,
    /// Validation windows.
    #[arg(long, value_name = "N")]
    valid_windows: Option<usize>,
    /// Transcripts the teacher writes for sequence-level KD.
    #[arg(long, value_name = "N")]
    transcripts: Option<usize>,
    /// GKD's λ: the share of on-policy (student-sampled) sequences, in [0, 1].
    #[arg(long, value_name = "L")]
    lambda: Option<f64>,
    /// Seed of everything.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut options = if args.quick {
        pipeline::Options::quick()
    } else {
        pipeline::Options::full()
    };
    macro_rules! set {
        ($($field:ident = $arg:ident),* $(,)?) => {
            $(if let Some(value) = args.$arg { options.$field = value; })*
        };
    }
    set!(
        device = device,
        run_dir = run_dir,
        teacher_epochs = teacher_epochs,
        student_epochs = epochs,
        train_windows = train_windows,
        valid_windows = valid_windows,
        transcripts = transcripts,
        lambda = lambda,
        seed = seed,
    );
    options.progress &= !args.quiet;
    report::exit(pipeline::run(&options))
}
