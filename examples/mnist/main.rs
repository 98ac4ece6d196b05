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
//! Options: `--help` lists them (`USAGE` below).

mod pipeline;

const USAGE: &str = "\
usage: cargo run --release --features flex --example mnist -- [options]

  --device NAME              ndarray, flex (the default), wgpu or cuda (whichever this build has)
  --quick                    10 000 training images, 6 epochs each, run directory runs/mnist-quick
  --run-dir DIR              where the run goes (default runs/mnist); a rerun loads or resumes it
  --teacher-epochs N         the teacher's epochs (default 120)
  --epochs N                 each student's epochs (default 200)
  --temperature T            distillation temperature (default 20)
  --alpha A                  weight of the hard-label term (default 0.7)
  --learning-rate LR         the students' initial learning rate (default 0.05, cosine decay)
  --teacher-learning-rate LR the teacher's (default 0.05)
  --batch-size N             the students' batch size (default 128)
  --teacher-batch-size N     the teacher's (default 128)
  --student-dropout P        dropout P on both students' hidden layers (a diagnostic; the paper's
                             students had none)
  --teacher-max-norm C       keep each of the teacher's hidden units' incoming weights within an
                             L2 norm of C after every step (max-norm, as on the paper's teacher)
  --live-teacher             run the teacher on every batch instead of distilling from the offline
                             cache of its outputs for the plain training images (the default)
  --cache                    insist on the cache
  --distill-jitter           show the distilled student +-2-pixel jittered images, each with the
                             live teacher's outputs for it (the paper's student saw plain images)
  --alone-jitter             jitter for the student alone too (the control for --distill-jitter)
  --plain-teacher            train the teacher on plain images, dropout only (a diagnostic: how much
                             of what dropout, rather than jitter, taught it the soft targets carry)
  --hint W                   add W x the mean squared error between the distilled student's last
                             hidden layer (through a trained 800 -> 1200 linear connector) and
                             the teacher's (FitNets hints; needs the live teacher)
  --eval-train               also evaluate each epoch on as many transfer-set images as the test
                             set has (agreement and KL to the teacher on images the student saw)
  --omit-digit D             leave digit D out of the students' transfer set
  --seed S                   seed of everything (default 1)
  --student-seed S           another seed for both students only (initial weights, batch order,
                             jitter), to measure their spread against one teacher
  --train-examples N         use the first N training images
  --test-examples N          use the first N test images
  --keep-denormals           train without flushing subnormal floats to zero (slower, same weights)
  --quiet                    no progress output
  --help                     this text
";

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
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(());
            }
            "--quick" => {}
            "--quiet" => options.progress = false,
            "--keep-denormals" => options.flush_denormals = false,
            "--cache" => {
                options.use_cache = true;
                cache_asked = true;
            }
            "--live-teacher" => options.use_cache = false,
            "--distill-jitter" => options.distill_jitter = true,
            "--plain-teacher" => options.teacher_jitter = false,
            "--hint" => options.hint_weight = value()?.parse()?,
            "--alone-jitter" => options.alone_jitter = true,
            "--eval-train" => options.eval_train = true,
            "--device" => options.device = value()?.clone(),
            "--run-dir" => options.run_dir = value()?.into(),
            "--teacher-epochs" => options.teacher_epochs = value()?.parse()?,
            "--epochs" => options.student_epochs = value()?.parse()?,
            "--temperature" => options.temperature = value()?.parse()?,
            "--alpha" => options.alpha = value()?.parse()?,
            "--teacher-learning-rate" => options.teacher_learning_rate = value()?.parse()?,
            "--learning-rate" => options.student_learning_rate = value()?.parse()?,
            "--batch-size" => options.batch_size = value()?.parse()?,
            "--teacher-batch-size" => options.teacher_batch_size = value()?.parse()?,
            "--student-dropout" => options.student_dropout = value()?.parse()?,
            "--teacher-max-norm" => options.teacher_max_norm = Some(value()?.parse()?),
            "--omit-digit" => options.omit_digit = Some(value()?.parse()?),
            "--seed" => options.seed = value()?.parse()?,
            "--student-seed" => options.student_seed = Some(value()?.parse()?),
            "--train-examples" => options.train_examples = Some(value()?.parse()?),
            "--test-examples" => options.test_examples = Some(value()?.parse()?),
            other => return Err(format!("unknown option {other:?}; --help lists them").into()),
        }
    }
    // The cache holds the teacher's outputs for plain images: jittered ones, and its hidden
    // layers, need the live teacher.
    if (options.distill_jitter || options.hint_weight > 0.0) && !cache_asked {
        options.use_cache = false;
    }
    if options.omit_digit.is_some_and(|digit| digit > 9) {
        return Err("--omit-digit takes a digit 0-9".into());
    }
    pipeline::run(&options)?;
    Ok(())
}
