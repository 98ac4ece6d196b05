//! Distil a real chat model, SmolLM2-135M-Instruct, into a student five times smaller, with one
//! command:
//!
//! ```text
//! bash scripts/fetch_smollm2.sh                                          # the teacher, once
//! cargo run --release --features flex --example distill_chat -- --quick  # under 15 minutes on 2 cores
//! cargo run --release --features flex --example distill_chat             # the full run: 1 h 17 min
//! ```
//!
//! The teacher answers chat prompts (by default "Explain the jargon term X." for the Jargon
//! File's head words, split into train / validation / test by term) into a JSONL transfer set;
//! an offline top-k cache keeps its log-probabilities on the training answers. A student made of
//! 6 of its 30 blocks (and the same shape, randomly initialised) then learns alone from the
//! corpus text, from the answers (black-box), from the cache (white-box), on-policy with GKD, and
//! on-policy from the sampled tokens' log-probabilities. The table, `summary.json`, a
//! `metrics.jsonl` per method, `valid-kl.png` and `samples.md` go into the run directory. Stop it
//! at any time: the rerun resumes.
//!
//! Options: `--help` lists them.

mod pipeline;
#[path = "../common/report.rs"]
mod report;
#[path = "../common/runs.rs"]
mod runs;

use burn_distill::train::{LossScaleConfig, Precision};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Distil a Llama-family chat model into a smaller student with every method.
#[derive(Parser, Debug)]
#[command(name = "distill_chat")]
struct Args {
    /// ndarray, flex (the default), wgpu or cuda (whichever this build has).
    #[arg(long)]
    device: Option<String>,
    /// Fewer prompts and shorter answers, random initialisation for two methods only; run
    /// directory runs/distill_chat-quick.
    #[arg(long)]
    quick: bool,
    /// The teacher: a GGUF file or a Hugging Face directory [default: the SmolLM2 file that
    /// scripts/fetch_smollm2.sh caches].
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// The student to start from: a GGUF file or a Hugging Face directory [default: --depth of
    /// the teacher's blocks]. Its tokenizer must be the teacher's, unless --vocab-policy is named.
    #[arg(long, value_name = "PATH")]
    student: Option<PathBuf>,
    /// For a --student whose vocabulary is the teacher's extended or padded (the same token at
    /// every id both have): "resize" its embedding and head to the teacher's ids and train it
    /// with the teacher's tokenizer and chat template. A vocabulary that differs at an id is
    /// refused whatever the policy.
    #[arg(long, value_name = "POLICY")]
    vocab_policy: Option<String>,
    /// A transfer set harvested from a served teacher (the harvest example's --out): its
    /// answers and top log-probabilities replace the local teacher's training answers and
    /// cache; the lineage goes into the run directory.
    #[arg(long, value_name = "DIR")]
    transfer_set: Option<PathBuf>,
    /// Where the teacher runs: a device name, or ws://HOST:PORT[/INDEX] for a device of a
    /// burn-distill-device-server (another process or machine) [default: --device].
    #[arg(long, value_name = "DEVICE")]
    teacher_device: Option<String>,
    /// A JSONL file of chat prompts, one {"id": ..., "messages": [{"role": ..., "content": ...}]}
    /// per line [default: one per head word of the Jargon File].
    #[arg(long, value_name = "PATH")]
    prompts: Option<PathBuf>,
    /// Where the run goes (default runs/distill_chat); a rerun reuses what is finished.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Training prompts.
    #[arg(long, value_name = "N")]
    train_prompts: Option<usize>,
    /// Validation prompts.
    #[arg(long, value_name = "N")]
    valid_prompts: Option<usize>,
    /// Test prompts.
    #[arg(long, value_name = "N")]
    test_prompts: Option<usize>,
    /// The most tokens per answer.
    #[arg(long, value_name = "N")]
    answer_tokens: Option<usize>,
    /// The teacher's sampling temperature for the training answers.
    #[arg(long, value_name = "T")]
    answer_temperature: Option<f64>,
    /// The teacher's blocks the student keeps, e.g. 0,6,12,18,24,29 [default: of a few
    /// subsets of --depth blocks, the closest to the teacher on validation at initialisation].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    blocks: Option<Vec<usize>>,
    /// The student's blocks when --blocks is not given.
    #[arg(long, value_name = "N")]
    depth: Option<usize>,
    /// Methods from the teacher's blocks: alone, sft, top-k-kl, gkd, sampled-rkl; also kl and
    /// kl+hidden (the live teacher's dense KL, without and with a hidden-state term).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// Methods from a random initialisation ("none" for none).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    random_methods: Option<Vec<String>>,
    /// Methods continued from the finished sft student ("none" for none).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    after_sft: Option<Vec<String>>,
    /// Peak learning rate of the methods continued from sft [default: --learning-rate].
    #[arg(long, value_name = "LR")]
    after_sft_learning_rate: Option<f64>,
    /// Epochs of every method.
    #[arg(long, value_name = "N")]
    epochs: Option<usize>,
    /// Sequences per optimizer step.
    #[arg(long, value_name = "N")]
    batch_size: Option<usize>,
    /// Peak learning rate from the teacher's blocks.
    #[arg(long, value_name = "LR")]
    learning_rate: Option<f64>,
    /// Peak learning rate from a random initialisation.
    #[arg(long, value_name = "LR")]
    random_learning_rate: Option<f64>,
    /// Teacher log-probabilities per token in the cache.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Weight of the answer-token cross-entropy beside the top-k KL, in [0, 1].
    #[arg(long, value_name = "W")]
    hard_weight: Option<f64>,
    /// GKD's share of steps on student answers, in [0, 1].
    #[arg(long, value_name = "L")]
    lambda: Option<f64>,
    /// GKD's generalised-JSD beta, in [0, 1].
    #[arg(long, value_name = "B")]
    beta: Option<f64>,
    /// kl+hidden: weight of the hidden-state term beside the KL.
    #[arg(long, value_name = "W")]
    hidden_weight: Option<f64>,
    /// kl+hidden: mse, cosine or cka.
    #[arg(long, value_name = "KIND", value_parser = ["mse", "cosine", "cka"])]
    hidden_kind: Option<String>,
    /// kl+hidden: the student's and the teacher's taps, STUDENT:TEACHER (e.g. block.5:block.29)
    /// [default: the last block of each].
    #[arg(long, value_name = "TAPS")]
    hidden_taps: Option<String>,
    /// kl+hidden: start the projection at random even where the widths are equal (by default it
    /// then starts as the identity).
    #[arg(long)]
    hidden_random_projection: bool,
    /// Seed of everything.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// The precision the students train in (f32 weights either way): f32, or mixed precision
    /// in bf16 or f16 (f16 with dynamic loss scaling).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    precision: String,
    /// Leave the test prompts unread (test figures NaN, no samples.md): for hyper-parameter
    /// sweeps, which choose on validation.
    #[arg(long)]
    no_test: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

fn methods(names: &[String]) -> Result<Vec<pipeline::Method>, String> {
    if names == ["none"] {
        return Ok(Vec::new());
    }
    names.iter().map(|name| pipeline::Method::parse(name)).collect()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut options = if args.quick {
        pipeline::Options::quick()
    } else {
        pipeline::Options::full()
    };
    macro_rules! set {
        ($($field:ident),* $(,)?) => {
            $(if let Some(value) = args.$field.clone() { options.$field = value; })*
        };
    }
    set!(
        device,
        run_dir,
        train_prompts,
        valid_prompts,
        test_prompts,
        answer_tokens,
        answer_temperature,
        depth,
        epochs,
        batch_size,
        learning_rate,
        random_learning_rate,
        top_k,
        hard_weight,
        lambda,
        beta,
        seed,
    );
    options.model = args.model.clone();
    options.blocks = args.blocks.clone();
    options.after_sft_learning_rate = args.after_sft_learning_rate.or(options.after_sft_learning_rate);
    options.prompts = args.prompts.clone();
    options.student = args.student.clone();
    options.transfer_set = args.transfer_set.clone();
    options.teacher_device = args.teacher_device.clone();
    options.precision = match args.precision.as_str() {
        "bf16" => Precision::Bf16,
        "f16" => Precision::F16(LossScaleConfig::new()),
        _ => Precision::F32,
    };
    if let Some(name) = &args.vocab_policy {
        match pipeline::VocabPolicy::parse(name) {
            Ok(policy) => options.vocab_policy = Some(policy),
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::FAILURE;
            }
        }
    }
    for (names, field) in [
        (&args.methods, &mut options.methods),
        (&args.random_methods, &mut options.random_methods),
        (&args.after_sft, &mut options.after_sft),
    ] {
        if let Some(names) = names {
            match methods(names) {
                Ok(list) => *field = list,
                Err(message) => {
                    eprintln!("error: {message}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    if let Some(weight) = args.hidden_weight {
        options.hidden.weight = weight;
    }
    options.hidden.random_projection |= args.hidden_random_projection;
    if let Some(kind) = &args.hidden_kind {
        options.hidden.kind = kind.clone();
    }
    if let Some(taps) = &args.hidden_taps {
        match taps.split_once(':') {
            Some((student, teacher)) if !student.is_empty() && !teacher.is_empty() => {
                options.hidden.taps = Some((student.to_string(), teacher.to_string()));
            }
            _ => {
                eprintln!("error: --hidden-taps {taps:?}: expected STUDENT:TEACHER, e.g. block.5:block.29");
                return ExitCode::FAILURE;
            }
        }
    }
    if !(options.hidden.weight.is_finite() && options.hidden.weight >= 0.0) {
        eprintln!(
            "error: --hidden-weight {} must be finite and >= 0",
            options.hidden.weight
        );
        return ExitCode::FAILURE;
    }
    options.progress &= !args.quiet;
    options.test &= !args.no_test;
    report::exit(pipeline::run(&options))
}
