//! Served teachers: black-box distillation over OpenAI's chat-completions API.
//!
//! - [`server`]: serve one of our models (the SmolLM2 teacher, a distilled student) as an
//!   OpenAI-compatible endpoint (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//!   log-probabilities, streaming, batching, a bearer token, limits).
//! - [`harvest()`]: ask any OpenAI-compatible endpoint (ours, llama.cpp's, vLLM, a hosted
//!   provider) to answer a prompt set, with retries, resumption and a token budget, into a
//!   transfer set with its [`ProvenanceCard`]: the teacher, the endpoint, the sampling, the
//!   prompts and the terms under which its outputs may be used, which the user must state.
//! - [`sparse`]: the set as a student's training data: answers as its token ids, and the top
//!   log-probabilities as a sparse teacher when the tokenizers match (checked).
//! - [`Lineage`]: what a student trained on a set records, and prints.
//!
//! ```no_run
//! use burn_distill_serve::{HarvestOptions, harvest};
//! # async fn run(prompts: Vec<burn_distill_data::ChatPrompt>) -> Result<(), burn_distill_serve::ServeError> {
//! let mut options = HarvestOptions::new("http://127.0.0.1:8080/v1", "Apache-2.0, SmolLM2-135M-Instruct");
//! options.top_logprobs = Some(8);
//! let report = harvest(&prompts, None, "runs/harvest".as_ref(), &options).await?;
//! println!("{} answers from {}", report.records, report.model);
//! # Ok(())
//! # }
//! ```

pub mod api;
mod error;
mod harvest;
pub mod server;
pub mod sparse;
mod transfer;

pub use error::{Result, ServeError};
pub use harvest::{HarvestOptions, HarvestReport, endpoint_for_card, harvest, harvest_blocking};
pub use server::{ServeOptions, ServerHandle, ServerStats, serve_until_signal, spawn};
pub use sparse::{SparseTeacher, TokenMap, chat_transcripts};
pub use transfer::{
    Api, CARD_FILE, Counts, LINEAGE_FILE, Lineage, PromptSource, ProvenanceCard, RECORDS_FILE, Record, RequestParams,
    TRANSFER_SET_VERSION, TransferSet, prompt_fingerprint, prompts_fingerprint, record_key,
};
