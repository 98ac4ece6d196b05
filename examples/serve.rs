//! Serve a Llama-family model (the SmolLM2 teacher, a distilled student exported as a Hugging
//! Face directory) as an OpenAI-compatible endpoint: `/v1/chat/completions`, `/v1/completions`
//! and `/v1/models`, with log-probabilities, streaming, and concurrent requests batched into one
//! decode.
//!
//! ```sh
//! bash scripts/fetch_smollm2.sh
//! cargo run --release --features flex --example serve -- --port 8080
//! curl -s http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' \
//!   -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}'
//! ```
//!
//! With `--token-env NAME`, every request needs `Authorization: Bearer $NAME` (the token is read
//! from that environment variable, never from the command line). Stop it with Ctrl-C.

#[path = "common/report.rs"]
mod report;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use burn_distill::loss::device_by_name;
use burn_distill::model::llm::{SMOLLM2_FILE, load_model, smollm2_cache_path};
use burn_distill::serve::{ServeOptions, serve_until_signal};
use clap::Parser;

/// Serve a model over OpenAI's chat-completions API.
#[derive(Parser, Debug)]
struct Args {
    /// A GGUF file or a Hugging Face model directory [default: the SmolLM2 file that
    /// scripts/fetch_smollm2.sh caches].
    #[arg(long)]
    model: Option<PathBuf>,
    /// The port (0 picks a free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The address to listen on; 127.0.0.1 keeps it to this machine.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// The model's name in the API [default: the file or directory name, without .gguf and
    /// the quantisation suffix].
    #[arg(long)]
    model_id: Option<String>,
    /// The environment variable holding the bearer token requests must send.
    #[arg(long, value_name = "NAME")]
    token_env: Option<String>,
    /// The largest max_tokens a request may ask.
    #[arg(long, default_value_t = 1024)]
    max_tokens_limit: usize,
    /// The largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Rows decoded together at most.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Milliseconds the worker waits for more requests before decoding.
    #[arg(long, default_value_t = 5)]
    batch_window_ms: u64,
    /// Where to run: ndarray, flex or wgpu.
    #[arg(long, default_value = "flex")]
    device: String,
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let device = device_by_name(&args.device).ok_or_else(|| format!("--device {}: not in this build", args.device))?;
    let path = match args.model {
        Some(path) => path,
        None => smollm2_cache_path()
            .filter(|path| path.exists())
            .ok_or_else(|| format!("no --model and no {SMOLLM2_FILE}: run `bash scripts/fetch_smollm2.sh` first"))?,
    };
    let bearer_token = match &args.token_env {
        Some(name) => Some(
            std::env::var(name)
                .ok()
                .filter(|token| !token.is_empty())
                .ok_or_else(|| format!("--token-env {name}: that environment variable is unset or empty"))?,
        ),
        None => None,
    };
    let model_id = args.model_id.unwrap_or_else(|| {
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let name = name.strip_suffix(".gguf").unwrap_or(&name).to_string();
        // "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct"
        match name.rsplit_once('.') {
            Some((stem, quant)) if quant.starts_with('Q') || quant.starts_with('F') || quant.starts_with("BF") => {
                stem.to_string()
            }
            _ => name,
        }
    });
    let loaded = load_model(&path, &device).map_err(|e| format!("--model {}: {e}", path.display()))?;
    let mut options = ServeOptions::new(model_id.clone());
    options.bearer_token = bearer_token;
    options.max_tokens_limit = args.max_tokens_limit;
    options.default_max_tokens = options.default_max_tokens.min(args.max_tokens_limit);
    options.max_body_bytes = args.max_body_bytes;
    options.max_batch = args.max_batch;
    options.batch_window = Duration::from_millis(args.batch_window_ms);
    let token_note = if options.bearer_token.is_some() {
        ", bearer token required"
    } else {
        ""
    };
    serve_until_signal(
        SocketAddr::new(args.host, args.port),
        loaded.model,
        loaded.tokenizer,
        options,
        |addr| {
            // The first line is for scripts: the base URL.
            println!("http://{addr}/v1");
            eprintln!(
                "serving {model_id} from {} on http://{addr}/v1{token_note}; Ctrl-C stops",
                path.display()
            );
        },
    )?;
    Ok(())
}

fn main() -> ExitCode {
    report::exit(run(Args::parse()))
}
