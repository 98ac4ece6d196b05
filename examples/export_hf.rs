//! Converts a Llama-family model (a GGUF file, or a Hugging Face directory) into the Hugging
//! Face layout (`config.json`, `model.safetensors` in f32, `tokenizer.json`,
//! `tokenizer_config.json`), which transformers loads with `from_pretrained(dir)`.
//!
//! ```sh
//! cargo run --release --features flex --example export_hf -- --model "$(bash scripts/fetch_smollm2.sh)" --out smollm2-hf
//! python3 scripts/check_hf_export.py smollm2-hf "$(bash scripts/fetch_smollm2.sh)"   # transformers: same logits
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use burn_distill::loss::device_by_name;
use burn_distill::model::llm::{export_hf, load_model};
use clap::Parser;

/// Convert a model to the Hugging Face layout.
#[derive(Parser, Debug)]
struct Args {
    /// A GGUF file or a Hugging Face directory.
    #[arg(long)]
    model: PathBuf,
    /// The directory to write (created; existing files of the same names are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Where to load it: ndarray, flex or wgpu.
    #[arg(long, default_value = "flex")]
    device: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let Some(device) = device_by_name(&args.device) else {
        eprintln!(
            "error: --device {}: not in this build (ndarray, flex, wgpu)",
            args.device
        );
        return ExitCode::FAILURE;
    };
    let result = load_model(&args.model, &device)
        .map_err(|e| format!("--model: {e}"))
        .and_then(|loaded| {
            export_hf(&loaded.model, &args.out).map_err(|e| format!("--out: {e}"))?;
            loaded.tokenizer.save(&args.out).map_err(|e| format!("--out: {e}"))
        });
    match result {
        Ok(()) => {
            println!("wrote {} in the Hugging Face layout", args.out.display());
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
