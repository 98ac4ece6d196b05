//! Datasets, batching and the offline teacher-output cache for knowledge distillation with
//! [burn](https://burn.dev).
//!
//! # Overview
//!
//! Distillation needs data twice: inputs for teacher and student, and the teacher's outputs.
//!
//! - [`MnistDataset`] reads MNIST or Fashion-MNIST from IDX files ([`read_idx`], gzipped or
//!   raw), checking every magic number, dimension and length. The repository bundles the full
//!   MNIST (`data/mnist/`, what `cargo run` and `cargo test` read there); [`MNIST_DIR_ENV`] or an
//!   argument points elsewhere.
//! - [`ByteCorpus`] / [`TextWindows`]: byte-level language-model data from any UTF-8 file, cut
//!   into context windows with a leak-free train/validation split. The repository bundles The
//!   Jargon File ([`TEXT_FILE_ENV`] points elsewhere).
//! - [`ImageBatcher`] (with Hinton's ±2-pixel [`Jitter`]) and [`TokenBatcher`] are burn
//!   `Batcher`s; their batches implement [`Batch`], which carries each example's dataset index.
//! - [`split_validation`] holds out a seeded validation [`Subset`]; [`EpochSampler`] gives each
//!   epoch's seeded batch order, a pure function of `(seed, epoch)`.
//! - Sequence-level distillation: [`generate_transcripts`] samples a transfer set from a teacher
//!   [`Generator`](burn_distill_model::Generator), [`write_transcripts`] / [`read_transcripts`]
//!   keep it as JSONL; [`TranscriptDataset`] + [`SequenceBatcher`] (padding and prompt
//!   positions get [`IGNORE_INDEX`] targets) train on it, and [`TranscriptTeacher`] serves text
//!   someone already has as a `Teacher`, with no teacher model.
//!
//! # The teacher-output cache
//!
//! [`build_cache`] runs any [`Teacher`](burn_distill_model::Teacher) once over a dataset and
//! writes its outputs, dense ([`CacheMode::DenseF32`], [`CacheMode::DenseF16`]) or top-k
//! ([`CacheMode::TopK`]), with the fingerprints of the dataset and teacher and checksums. The
//! write is atomic and resumable. [`CachedTeacher`] serves the file through a memory map as a
//! `Teacher`, after refusing a cache made from another teacher or dataset.
//!
//! ```rust
//! use burn::tensor::Tensor;
//! use burn_distill_data::{
//!     CacheBuildOptions, CacheMode, CachedTeacher, ImageBatcher, MnistDataset, MnistSplit, Subset, build_cache,
//! };
//! use burn_distill_model::{FrozenTeacher, MlpConfig, Teacher, init_seeded};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let device = burn_distill_loss::available_devices().remove(0).device;
//!     // The bundled MNIST (data/mnist/, or BURN_DISTILL_MNIST_DIR); its first 512 examples.
//!     let train = Subset::new(MnistDataset::load_default(MnistSplit::Train)?, (0..512).collect());
//!     let teacher = FrozenTeacher::new(&init_seeded(1, &device, |d| MlpConfig::hinton_teacher().init(d)));
//!
//!     // Run the teacher once; store its top-4 classes per example (or DenseF32 / DenseF16).
//!     let path = std::env::temp_dir().join("data-docs-teacher-cache.bdkd");
//!     let options = CacheBuildOptions::new(CacheMode::TopK { k: 4 });
//!     let report = build_cache(&path, &teacher, &train, &ImageBatcher::new(), &device, &options)?;
//!     println!("{} examples, {} bytes (reused: {})", report.examples, report.bytes, report.reused);
//!
//!     // A cached teacher is a Teacher: training code does not change. It refuses a cache made
//!     // from other weights or other data.
//!     let fingerprint = Teacher::<Tensor<2>, 2>::fingerprint(&teacher).expect("a module teacher has one");
//!     let cached = CachedTeacher::open(&path, &train, fingerprint, &device)?;
//!     let soft = Teacher::<Tensor<2>, 2>::teach_examples(&cached, Tensor::zeros([2, 784], &device), &[7, 3], &[])?;
//!     assert_eq!(soft.logits().dims(), [2, 10]);
//!     Ok(())
//! }
//! ```
//!
//! # Supported Rust versions
//!
//! Rust 1.95 or newer.
#![warn(missing_docs)]

mod batch;
mod cache;
mod chat;
mod error;
mod idx;
mod image;
mod mnist;
mod text;
mod transcript;

pub use batch::{Batch, EpochAware, EpochSampler, Fingerprinted, IGNORE_INDEX, Indexed, Subset, split_validation};
pub use cache::{
    CacheBuildOptions, CacheHeader, CacheMode, CacheReport, CachedTeacher, ExpectedSource, FORMAT_VERSION,
    TeacherCache, build_cache, dense_from_top_k, partial_path, write_top_k_cache,
};
pub use chat::{
    AnswerOptions, ChatPrompt, ChatTranscript, JargonEntry, PromptSplits, TransferSetHeader, answer_prompts,
    jargon_entries, jargon_prompts, read_chat_prompts, split_of, split_prompts, tokenizer_fingerprint,
    write_chat_prompts,
};
pub use error::{DataError, Result};
pub use idx::{IdxArray, encode_idx, read_idx};
pub use image::{ImageBatch, ImageBatcher, Jitter};
pub use mnist::{MNIST_DIR_ENV, MnistDataset, MnistItem, MnistSplit, default_mnist_dir};
pub use text::{
    BYTE_VOCAB, ByteCorpus, TEXT_FILE_ENV, TextItem, TextWindows, TokenBatch, TokenBatcher, default_text_file,
};
pub use transcript::{
    SequenceBatcher, SequenceItem, Transcript, TranscriptDataset, TranscriptTeacher, generate_transcripts,
    read_transcripts, write_transcripts,
};
