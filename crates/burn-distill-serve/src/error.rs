//! Errors of harvesting, reading transfer sets and mapping served tokens.

use std::path::PathBuf;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A bad option, named, before any request is sent.
    #[error("{option}: {reason}")]
    Option {
        /// The option.
        option: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The endpoint refused a request in a way retrying cannot mend (400, 401, 403, 404, ...).
    #[error("{url} answered {status}: {message}")]
    Refused {
        /// The request's URL (no key: keys travel in a header).
        url: String,
        /// The HTTP status.
        status: u16,
        /// The server's error message.
        message: String,
    },
    /// Every retry failed.
    #[error("{url}: {attempts} attempts failed; the last: {last}")]
    RetriesExhausted {
        /// The request's URL.
        url: String,
        /// Attempts made.
        attempts: usize,
        /// Why the last one failed.
        last: String,
    },
    /// A response that is not what the API promises (a body over the limit, no choices).
    #[error("{url}: {reason}")]
    Protocol {
        /// The request's URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The output directory holds a transfer set made with other settings.
    #[error(
        "{dir} holds a transfer set made with another {field} ({saved} there, {now} now): choose another --out, or delete it to start over"
    )]
    OtherTransferSet {
        /// The directory.
        dir: PathBuf,
        /// The setting that differs.
        field: String,
        /// Its value in the saved card.
        saved: String,
        /// Its value now.
        now: String,
    },
    /// A file that is not what it should be.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line where there is one.
        reason: String,
    },
    /// The served tokens cannot be the student's: the token-level path is refused (the
    /// sequence-level one still works from the answers' text).
    #[error("token-level distillation from this transfer set is refused: {reason}")]
    TokenizerMismatch {
        /// Which token, in which record, could not be mapped.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The data crate failed (writing the cache).
    #[error(transparent)]
    Data(#[from] burn_distill_data::DataError),
    /// The model crate failed (tokenizing).
    #[error(transparent)]
    Llm(#[from] burn_distill_model::llm::LlmError),
}

impl ServeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn option(option: &str, reason: impl Into<String>) -> Self {
        Self::Option {
            option: option.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Results of this crate.
pub type Result<T, E = ServeError> = std::result::Result<T, E>;
