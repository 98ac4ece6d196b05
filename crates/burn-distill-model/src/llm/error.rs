//! The error type of the language-model stack: files, configs, tokenizers.

use std::path::{Path, PathBuf};

/// What can go wrong loading, running or exporting a language model. Every variant names the
/// file (where there is one) and what in it is wrong.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic bytes.
    #[error("{path}: not a GGUF file (the first four bytes are {found:?}, expected \"GGUF\")")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// A GGUF version this reader does not know.
    #[error("{path}: GGUF version {version} is not supported (versions 2 and 3 are)")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the header.
        version: u32,
    },
    /// The file ends (or a length field points) before a field is complete.
    #[error("{path}: truncated: {what} needs bytes {start}..{end}, the file has {len}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The field being read.
        what: String,
        /// Where the field starts.
        start: u64,
        /// Where it would end.
        end: u64,
        /// The file's length.
        len: u64,
    },
    /// A field holds a value the format does not allow.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field (a metadata key, a tensor name, a header field).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor stored in a type this crate cannot dequantise.
    #[error("{path}: tensor {tensor:?} is stored as {dtype}, which is not supported (supported: {supported})")]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its storage type.
        dtype: String,
        /// The types that are supported.
        supported: &'static str,
    },
    /// A metadata key or config field the model needs is absent.
    #[error("{path}: missing {key:?}")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A tensor the model needs is absent from the weights.
    #[error("{path}: no tensor {tensor:?}, which {} implies", config_source(.path))]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor's shape disagrees with the model's config.
    /// The message names where the config came from (the GGUF file's metadata, or the
    /// `config.json` beside a Hugging Face weight file), since either file can be the damaged one.
    #[error("{path}: tensor {tensor:?} has shape {found:?}, {} implies {expected:?}", config_source(.path))]
    TensorShape {
        /// The weight file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A model architecture or option this crate does not implement.
    #[error("{path}: {what} is not supported: {reason}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The architecture or option.
        what: String,
        /// Why, and what is.
        reason: String,
    },
    /// A model config out of range.
    #[error("invalid model config: {field} = {value}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// The accepted range.
        reason: String,
    },
    /// The tokenizer could not be built, or failed on an input.
    #[error("tokenizer ({source_name}): {reason}")]
    Tokenizer {
        /// Where the tokenizer came from (a file, or GGUF metadata).
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// The chat template could not be parsed or rendered.
    #[error("chat template ({source_name}): {reason}")]
    Template {
        /// Where the template came from.
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// A generation request out of range (empty prompt, prompt longer than the context, ...).
    #[error("generation: {reason}")]
    Generation {
        /// What is wrong.
        reason: String,
    },
    /// Weights could not be applied to the model.
    #[error(transparent)]
    Weights(#[from] crate::ModelError),
}

impl LlmError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        LlmError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> Self {
        LlmError::Invalid {
            path: path.to_path_buf(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The result type of the language-model stack.
pub type LlmResult<T> = core::result::Result<T, LlmError>;

/// Where the config of the weights in `path` came from, in words.
fn config_source(path: &std::path::Path) -> String {
    if path.extension().is_some_and(|ext| ext == "gguf") {
        "its metadata".to_string()
    } else {
        match path.parent() {
            Some(dir) => format!("{}", dir.join("config.json").display()),
            None => "config.json".to_string(),
        }
    }
}
