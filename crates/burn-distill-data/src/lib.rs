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
//! # Supported Rust versions
//!
//! Rust 1.95 or newer.
#![warn(missing_docs)]

mod batch;
mod cache;
mod error;
mod idx;
mod image;
mod mnist;
mod text;
mod transcript;

pub use batch::{Batch, EpochAware, EpochSampler, Fingerprinted, IGNORE_INDEX, Indexed, Subset, split_validation};
pub use cache::{
    CacheBuildOptions, CacheHeader, CacheMode, CacheReport, CachedTeacher, ExpectedSource, FORMAT_VERSION,
    TeacherCache, build_cache, dense_from_top_k, partial_path,
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
