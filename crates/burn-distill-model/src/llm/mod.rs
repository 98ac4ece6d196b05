//! Real language models: the Llama family (SmolLM, TinyLlama, Llama, Qwen2) from GGUF files and
//! Hugging Face directories, their tokenizers and chat templates, KV-cache generation, and
//! export back to the Hugging Face layout.
//!
//! ```no_run
//! use burn_distill_model::llm::{ChatMessage, GenerateOptions, load_model};
//!
//! # fn main() -> Result<(), burn_distill_model::llm::LlmError> {
//! let device = burn_distill_loss::available_devices().remove(0).device;
//! let loaded = load_model("SmolLM2-135M-Instruct.Q4_1.gguf", &device)?;
//! let question = vec![ChatMessage::user("What is the capital of France?")];
//! let (answers, _) = loaded.model.chat(&loaded.tokenizer, &[question], &GenerateOptions::greedy(32), &[], |_, _| {})?;
//! println!("{}", answers[0].text);
//! # Ok(())
//! # }
//! ```

mod cache;
mod error;
mod generate;
pub mod gguf;
mod llama;
mod load;
mod tokenizer;

use std::io::Write;
use std::path::Path;

use burn::tensor::Device;

pub use cache::LlamaCache;
pub use error::{LlmError, LlmResult};
pub use generate::{
    ChatAnswer, FinishReason, GenerateOptions, Generation, GenerationTimings, StopStrings, TokenLogprobs,
};
pub use gguf::{GgmlType, GgufFile, GgufTensorInfo, GgufValue};
pub use llama::{Llama, LlamaAttention, LlamaBlock, LlamaConfig, LlamaMlp};
pub use load::{SUPPORTED_ARCHITECTURES, export_hf, gguf_config, hf_config, load_gguf, load_gguf_file, load_hf};
pub use tokenizer::{ChatMessage, ChatTokenizer, ModelSource, TextStream, VocabularyMatch};

/// The file name `scripts/fetch_smollm2.sh` caches SmolLM2-135M-Instruct under.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/fetch_smollm2.sh` puts the SmolLM2 teacher: `$BURN_DISTILL_CACHE`, else
/// `$XDG_CACHE_HOME/burn-distill`, else `~/.cache/burn-distill`, then [`SMOLLM2_FILE`]. `None`
/// when none of those variables is set.
pub fn smollm2_cache_path() -> Option<std::path::PathBuf> {
    Some(crate::files::cache_dir()?.join(SMOLLM2_FILE))
}

/// A model with its tokenizer, as [`load_model`] returns them.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: Llama,
    /// Its tokenizer and chat template.
    pub tokenizer: ChatTokenizer,
}

/// Loads a GGUF file or a Hugging Face directory (see [`ModelSource::of`]) with its tokenizer.
///
/// # Errors
/// As [`load_gguf`] / [`load_hf`] and [`ChatTokenizer::from_gguf`] /
/// [`ChatTokenizer::from_hf_dir`]; a missing path is [`LlmError::Io`]. The tokenizer is built
/// before the weights are read, so a file without one fails at once.
pub fn load_model(path: impl AsRef<Path>, device: &Device) -> LlmResult<LoadedModel> {
    match ModelSource::of(path)? {
        ModelSource::Gguf(path) => {
            let gguf = std::sync::Arc::new(GgufFile::open(&path)?);
            let tokenizer = ChatTokenizer::from_gguf(&gguf)?;
            let model = load_gguf_file(gguf, device)?;
            Ok(LoadedModel { model, tokenizer })
        }
        ModelSource::HuggingFace(dir) => {
            let tokenizer = ChatTokenizer::from_hf_dir(&dir)?;
            let model = load_hf(&dir, device)?;
            Ok(LoadedModel { model, tokenizer })
        }
    }
}

/// Writes `bytes` to `path` atomically ([`crate::files::write_atomically`]).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> LlmResult<()> {
    crate::files::write_atomically(path, |file| file.write_all(bytes)).map_err(|e| LlmError::io(path, e))
}
