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
//! Options: `--device ndarray|flex|wgpu|cuda`, `--quick`, `--run-dir DIR`, `--teacher-epochs N`,
//! `--epochs N` (students), `--train-windows N`, `--valid-windows N`, `--transcripts N`,
//! `--lambda L` (GKD), `--seed S`, `--quiet`.

mod pipeline;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut options = if args.iter().any(|arg| arg == "--quick") {
        pipeline::Options::quick()
    } else {
        pipeline::Options::full()
    };
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--quick" => {}
            "--quiet" => options.progress = false,
            "--device" => options.device = value()?.clone(),
            "--run-dir" => options.run_dir = value()?.into(),
            "--teacher-epochs" => options.teacher_epochs = value()?.parse()?,
            "--epochs" => options.student_epochs = value()?.parse()?,
            "--train-windows" => options.train_windows = value()?.parse()?,
            "--valid-windows" => options.valid_windows = value()?.parse()?,
            "--transcripts" => options.transcripts = value()?.parse()?,
            "--lambda" => options.lambda = value()?.parse()?,
            "--seed" => options.seed = value()?.parse()?,
            other => return Err(format!("unknown option {other:?}; see the top of examples/lm/main.rs").into()),
        }
    }
    pipeline::run(&options)?;
    Ok(())
}
