//! Harvest a transfer set from a served teacher: any OpenAI-compatible endpoint (this
//! workspace's `serve` example, llama.cpp's server, vLLM, a hosted provider) answers a prompt
//! set, with its top log-probabilities where asked; the answers and a provenance card go into
//! `--out`. Kill it at any time: the rerun resumes, no answer lost or repeated.
//!
//! ```sh
//! cargo run --release --features flex --example serve -- --port 8080 &      # the teacher
//! cargo run --release --features flex --example harvest -- --endpoint http://127.0.0.1:8080/v1 \
//!     --terms "Apache-2.0, SmolLM2-135M-Instruct" --out runs/harvest --top-logprobs 8
//! cargo run --release --features flex --example distill_chat -- --quick --transfer-set runs/harvest
//! cargo run --release --features flex --example lineage -- runs/distill_chat-quick
//! ```
//!
//! Without `--prompts`, the prompts are `--train-prompts` of the Jargon File's training split
//! (the split `distill_chat` trains on). The API key, if the endpoint wants one, is read from
//! the variable `--api-key-env` names (OPENAI_API_KEY by default) and never written anywhere.

#[path = "common/report.rs"]
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use burn_distill::data::{
    ByteCorpus, default_text_file, jargon_entries, jargon_prompts, read_chat_prompts, split_prompts,
};
use burn_distill::serve::{Api, HarvestOptions, harvest_blocking};
use clap::Parser;

/// Harvest a transfer set from an OpenAI-compatible endpoint.
#[derive(Parser, Debug)]
struct Args {
    /// The API's base URL, e.g. http://127.0.0.1:8080/v1.
    #[arg(long)]
    endpoint: String,
    /// The terms under which the teacher's outputs may be used, e.g. "Apache-2.0,
    /// SmolLM2-135M-Instruct"; recorded on the card. Required.
    #[arg(long)]
    terms: String,
    /// Where the transfer set goes (card.json, records.jsonl); a rerun resumes it.
    #[arg(long)]
    out: PathBuf,
    /// A JSONL file of chat prompts [default: --train-prompts of the Jargon File's training
    /// split].
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Prompts taken from the Jargon File's training split when --prompts is not given.
    #[arg(long, default_value_t = 64)]
    train_prompts: usize,
    /// The model to ask [default: the first the endpoint lists].
    #[arg(long)]
    model: Option<String>,
    /// chat (/v1/chat/completions) or completions (/v1/completions).
    #[arg(long, default_value = "chat")]
    api: String,
    /// Answers per prompt.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Nucleus sampling.
    #[arg(long)]
    top_p: Option<f64>,
    /// The most tokens per answer.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Top log-probabilities per answer token (token-level distillation needs them; at most 20).
    #[arg(long)]
    top_logprobs: Option<usize>,
    /// A seed (sample s sends seed + s, one request per sample).
    #[arg(long)]
    seed: Option<u64>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Seconds before a request is abandoned (and retried).
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Retries per request.
    #[arg(long, default_value_t = 6)]
    retries: usize,
    /// Stop starting requests after this many tokens (prompt and answer); rerun to go on.
    #[arg(long)]
    token_budget: Option<u64>,
    /// The environment variable that holds the API key.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    api_key_env: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let api = match args.api.as_str() {
        "chat" => Api::Chat,
        "completions" => Api::Completions,
        other => return Err(format!("--api {other}: chat or completions").into()),
    };
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(format!("--timeout {}: a positive number of seconds", args.timeout).into());
    }
    let mut options = HarvestOptions::new(args.endpoint, args.terms);
    options.model = args.model;
    options.api = api;
    options.api_key_env = args.api_key_env;
    options.samples = args.samples;
    options.temperature = args.temperature;
    options.top_p = args.top_p;
    options.max_tokens = args.max_tokens;
    options.top_logprobs = args.top_logprobs;
    options.seed = args.seed;
    options.concurrency = args.concurrency;
    options.timeout = Duration::from_secs_f64(args.timeout);
    options.max_retries = args.retries;
    options.token_budget = args.token_budget;
    options.progress = !args.quiet;
    let prompts = match &args.prompts {
        Some(path) => read_chat_prompts(path)?,
        None => {
            let corpus = ByteCorpus::from_file(&default_text_file())?;
            let entries = jargon_entries(std::str::from_utf8(corpus.bytes())?);
            let train = split_prompts(jargon_prompts(&entries), 0.1, 0.1)?.train;
            let count = args.train_prompts.min(train.len());
            // Spread over the split, as distill_chat takes its training prompts.
            (0..count).map(|i| train[i * train.len() / count].clone()).collect()
        }
    };
    let report = harvest_blocking(&prompts, args.prompts.as_deref(), &args.out, &options)?;
    println!(
        "{} answers from {} in {} ({} resumed); {} requests, {} retries; {} answer tokens in {:.1} s ({:.1} tokens/s){}",
        report.records,
        report.model,
        args.out.display(),
        report.resumed,
        report.requests,
        report.retries,
        report.completion_tokens,
        report.seconds,
        report.completion_tokens as f64 / report.seconds.max(1e-9),
        if report.complete {
            ""
        } else {
            "; not complete (token budget): run again to go on"
        }
    );
    Ok(())
}

fn main() -> ExitCode {
    report::exit(run(Args::parse()))
}
