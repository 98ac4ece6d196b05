//! Speed of a Llama-family model here: load time, prefill, KV-cache decoding at batch 1 and 8,
//! the cached step against re-running the window, the teacher forward a distillation step
//! needs (8 × 256 tokens, full logits), and a teacher answering chat prompts for a transfer set
//! (32 prompts in batches of 16, greedy, 64 new tokens each, prefill included); peak memory.
//! Prints one JSON object.
//!
//! ```sh
//! cargo run --release --features flex --example llama_bench -- --model "$(bash scripts/fetch_smollm2.sh)"
//! python3 scripts/bench_llama_peers.py "$(bash scripts/fetch_smollm2.sh)"   # transformers and llama.cpp, same shapes
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use burn_distill::loss::device_by_name;
use burn_distill::model::llm::{ChatMessage, GenerateOptions, LlamaCache, load_model};
use clap::Parser;

/// Measure a Llama-family model.
#[derive(Parser, Debug)]
struct Args {
    /// A GGUF file or a Hugging Face directory.
    #[arg(long)]
    model: PathBuf,
    /// ndarray, flex or wgpu.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Repetitions of each measurement (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Measure only these (for a profiler): prefill, decode, step, forward, answers.
    #[arg(long, value_delimiter = ',', value_parser = ["prefill", "decode", "step", "forward", "answers"])]
    only: Vec<String>,
}

/// The Jargon File terms of the answer benchmark (the same in `scripts/bench_llama_peers.py`).
const ANSWER_TERMS: [&str; 32] = [
    "cruft", "kluge", "hack", "foo", "bar", "frob", "grok", "nybble", "bogus", "crufty", "daemon", "deadlock",
    "elegant", "feature", "flame", "glitch", "guru", "hacker", "kludge", "lossage", "magic", "mung", "newbie", "nuke",
    "patch", "phase", "quux", "RTFM", "spam", "tweak", "wizard", "zen",
];

fn best(repeats: usize, mut run: impl FnMut() -> f64) -> f64 {
    (0..repeats).map(|_| run()).fold(f64::INFINITY, f64::min)
}

/// `measure()` when `name` is wanted, else `None` (reported as null).
fn when<T>(only: &[String], name: &str, measure: impl FnOnce() -> T) -> Option<T> {
    (only.is_empty() || only.iter().any(|o| o == name)).then(measure)
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let device = device_by_name(&args.device).ok_or_else(|| format!("--device {}: not in this build", args.device))?;
    let started = Instant::now();
    let loaded = load_model(&args.model, &device).map_err(|e| e.to_string())?;
    let load_seconds = started.elapsed().as_secs_f64();
    let model = &loaded.model;
    let layers = model.config().num_hidden_layers;
    let text = "The Jargon File is a comprehensive compendium of hacker slang illuminating many aspects of \
                hackish tradition, folklore, and humor. "
        .repeat(40);
    let corpus = loaded.tokenizer.encode(&text, false).map_err(|e| e.to_string())?;
    let tokens = |rows: usize, len: usize| {
        let values: Vec<i64> = (0..rows * len).map(|i| i64::from(corpus[i % corpus.len()])).collect();
        Tensor::<2, Int>::from_data(TensorData::new(values, [rows, len]), &device)
    };
    let sync = |t: Tensor<3>| {
        let _ = t.slice([0..1, 0..1, 0..1]).into_data();
    };

    // Prefill: 512 tokens through the cache, the head on the last position only.
    let only = &args.only;
    let prefill = when(only, "prefill", || {
        best(args.repeats, || {
            let mut cache = LlamaCache::new(layers, vec![0]);
            let t = Instant::now();
            let hidden = model.forward_cached(tokens(1, 512), &mut cache).unwrap();
            sync(model.head(hidden.slice([0..1, 511..512, 0..model.config().hidden_size])));
            t.elapsed().as_secs_f64()
        })
    });
    // Decoding: greedy, 64 new tokens after a 16-token prompt, batch 1 and 8.
    let decode = |batch: usize| {
        let prompts: Vec<Vec<u32>> = (0..batch).map(|r| corpus[r * 3..r * 3 + 16].to_vec()).collect();
        best(args.repeats, || {
            let (_, timings) = model
                .generate(&prompts, &GenerateOptions::greedy(64), |_, _| true)
                .unwrap();
            timings.decode_tokens as f64 / timings.decode_seconds
        })
    };
    let decode_1_8 = when(only, "decode", || (decode(1), decode(8)));
    // One cached step at position 256 against re-running the 256-token window for it.
    let step_window = when(only, "step", || {
        let mut cache = LlamaCache::new(layers, vec![0]);
        let _ = model.forward_cached(tokens(1, 256), &mut cache).unwrap();
        let step = best(args.repeats, || {
            let mut c = cache.clone();
            let t = Instant::now();
            let hidden = model.forward_cached(tokens(1, 1), &mut c).unwrap();
            sync(model.head(hidden));
            t.elapsed().as_secs_f64()
        });
        let window = best(args.repeats, || {
            let t = Instant::now();
            let hidden = model.forward_hidden(tokens(1, 256));
            sync(model.head(hidden.slice([0..1, 255..256, 0..model.config().hidden_size])));
            t.elapsed().as_secs_f64()
        });
        (step, window)
    });
    // The teacher forward of a distillation step: 8 × 256 tokens, full logits.
    let forward = when(only, "forward", || {
        best(args.repeats, || {
            let t = Instant::now();
            sync(model.forward(tokens(8, 256)));
            t.elapsed().as_secs_f64()
        })
    });
    // Answering chat prompts as `answer_prompts` does for a transfer set: the chat template,
    // left-padded batches of 16, the KV cache; exactly 64 new tokens per prompt (no EOS stop),
    // so every peer does the same work.
    let answers = when(only, "answers", || {
        let prompts: Vec<Vec<u32>> = ANSWER_TERMS
            .iter()
            .map(|term| {
                let messages = [ChatMessage::user(format!("Explain the jargon term \"{term}\"."))];
                loaded.tokenizer.encode_chat(&messages, true).unwrap()
            })
            .collect();
        best(args.repeats, || {
            let t = Instant::now();
            for chunk in prompts.chunks(16) {
                let _ = model
                    .generate(chunk, &GenerateOptions::greedy(64), |_, _| true)
                    .unwrap();
            }
            t.elapsed().as_secs_f64()
        })
    });
    let report = serde_json::json!({
        "model": args.model.display().to_string(),
        "device": args.device,
        "load_seconds": load_seconds,
        "prefill_512_tokens_per_s": prefill.map(|s| 512.0 / s),
        "decode_batch1_tokens_per_s": decode_1_8.map(|d| d.0),
        "decode_batch8_tokens_per_s": decode_1_8.map(|d| d.1),
        "cached_step_at_256_ms": step_window.map(|(step, _)| step * 1e3),
        "window_256_rerun_ms": step_window.map(|(_, window)| window * 1e3),
        "cache_speedup_at_256": step_window.map(|(step, window)| window / step),
        "forward_8x256_tokens_per_s": forward.map(|s| 2048.0 / s),
        "answers_32x64_tokens_per_s": answers.map(|s| (ANSWER_TERMS.len() * 64) as f64 / s),
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
    Ok(())
}
