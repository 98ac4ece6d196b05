//! Chat with a Llama-family model (a GGUF file or a Hugging Face directory): the answer streams
//! as it is generated with the KV cache, then prefill and decode speeds are printed.
//!
//! ```sh
//! bash scripts/fetch_smollm2.sh        # SmolLM2-135M-Instruct into ~/.cache/burn-distill
//! cargo run --release --features flex --example chat -- --prompt "What is the capital of France?" --max-tokens 32 --temperature 0
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use burn_distill::loss::device_by_name;
use burn_distill::model::SamplingConfig;
use burn_distill::model::llm::{ChatMessage, GenerateOptions, SMOLLM2_FILE, load_model, smollm2_cache_path};
use clap::Parser;

/// Chat with a Llama-family model.
#[derive(Parser, Debug)]
struct Args {
    /// A GGUF file or a Hugging Face model directory [default: the SmolLM2 file that
    /// scripts/fetch_smollm2.sh caches]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The user's message.
    #[arg(long)]
    prompt: String,
    /// A system message (the model's template supplies its default without one).
    #[arg(long)]
    system: Option<String>,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7, value_parser = non_negative)]
    temperature: f64,
    /// Keep only the k most likely tokens.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    top_k: Option<u64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability.
    #[arg(long, value_parser = probability)]
    top_p: Option<f64>,
    /// The random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Text that ends the answer (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Where to run: ndarray, flex or wgpu.
    #[arg(long, default_value = "flex")]
    device: String,
}

fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a finite number >= 0")),
    }
}

fn probability(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{text:?} is not in (0, 1]")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let device = device_by_name(&args.device)
        .ok_or_else(|| format!("--device {}: not in this build (ndarray, flex, wgpu)", args.device))?;
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| smollm2_cache_path().unwrap_or_else(|| PathBuf::from(SMOLLM2_FILE)));
    if args.model.is_none() && !path.exists() {
        return Err(format!(
            "no --model given and no SmolLM2 file at {}: run `bash scripts/fetch_smollm2.sh` first",
            path.display()
        ));
    }
    let started = std::time::Instant::now();
    let loaded = load_model(&path, &device).map_err(|e| format!("--model: {e}"))?;
    let config = loaded.model.config();
    eprintln!(
        "loaded {} ({} blocks, width {}, vocabulary {}) in {:.2} s",
        path.display(),
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size,
        started.elapsed().as_secs_f64()
    );
    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(ChatMessage::system(system));
    }
    messages.push(ChatMessage::user(args.prompt));
    let options = GenerateOptions {
        max_new_tokens: args.max_tokens,
        sampling: SamplingConfig::new()
            .with_temperature(args.temperature)
            .with_top_k(args.top_k.map(|k| k as usize))
            .with_top_p(args.top_p)
            .with_seed(args.seed),
        stop_tokens: Vec::new(),
        logprobs: None,
    };
    let mut stdout = std::io::stdout();
    let (answers, timings) = loaded
        .model
        .chat(&loaded.tokenizer, &[messages], &options, &args.stop, |_, piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        })
        .map_err(|e| e.to_string())?;
    println!();
    let answer = &answers[0];
    eprintln!(
        "{} prompt tokens, {} answer tokens ({:?}); prefill {:.1} tokens/s, decode {:.1} tokens/s",
        answer.prompt_tokens.len(),
        answer.generation.tokens.len(),
        answer.generation.finish,
        timings.prompt_tokens as f64 / timings.prefill_seconds,
        timings.decode_tokens as f64 / timings.decode_seconds.max(f64::MIN_POSITIVE),
    );
    Ok(())
}
