//! The error type of the data crate.

use std::path::{Path, PathBuf};

/// What can go wrong reading datasets and teacher-output caches.
///
/// Every variant names the file it is about, so a message is enough to find the problem.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A data directory or file does not exist.
    #[error("{path}: not found ({what}){hint}")]
    Missing {
        /// The path looked for.
        path: PathBuf,
        /// What it should have been.
        what: String,
        /// How to point the reader elsewhere, if there is a way.
        hint: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A file's contents are not what its format says (wrong magic number, truncated,
    /// inconsistent sizes, bad checksum, unparsable header).
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// A cache file was made from another teacher or dataset, or with other settings, than the
    /// ones in use. Never served: rebuild it.
    #[error("{path}: stale teacher cache: {reason}")]
    Stale {
        /// The cache file.
        path: PathBuf,
        /// Which fingerprint or setting differs, with both values.
        reason: String,
    },
    /// A setting or argument is out of range.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The setting.
        what: String,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// The teacher failed while a cache was being built.
    #[error("teacher failed on examples {first}..{end}: {source}")]
    Teacher {
        /// First example of the failing batch.
        first: usize,
        /// One past its last example.
        end: usize,
        /// The teacher's error.
        source: burn_distill_model::ModelError,
    },
    /// A transfer set was made by another teacher, tokenizer, prompt set or decoding: refused,
    /// not overwritten (it may have taken hours).
    #[error("{path}: this transfer set was made with another {what}; delete it or name another file")]
    OtherTransferSet {
        /// The transfer set.
        path: PathBuf,
        /// What differs (`teacher`, `tokenizer`, `prompt set`, `decoding options`).
        what: String,
    },
    /// The teacher failed while answering prompts.
    #[error("the teacher failed on prompts {first}..{end}: {source}")]
    Generation {
        /// First prompt of the failing batch.
        first: usize,
        /// One past its last prompt.
        end: usize,
        /// The model's error.
        #[source]
        source: burn_distill_model::llm::LlmError,
    },
    /// A cache build was stopped on request; the examples done so far are kept and a later
    /// build resumes from them.
    #[error("{path}: cache build stopped after {done} of {total} examples; run it again to resume")]
    Interrupted {
        /// The partial file kept for resuming.
        path: PathBuf,
        /// Examples written.
        done: usize,
        /// Examples in the dataset.
        total: usize,
    },
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// The result type of this crate.
pub type Result<T> = core::result::Result<T, DataError>;
