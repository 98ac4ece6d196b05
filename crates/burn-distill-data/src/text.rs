//! Byte-level text: any UTF-8 file cut into fixed-length context windows for next-token
//! prediction (vocabulary: the 256 byte values).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill_model::{Fingerprint, Fingerprinter};

use crate::batch::{Batch, EpochAware, Fingerprinted, Indexed};
use crate::error::{DataError, Result};
use crate::idx::read_maybe_gzipped;

/// The vocabulary size of byte-level text.
pub const BYTE_VOCAB: usize = 256;

/// The environment variable that overrides the default text corpus file.
pub const TEXT_FILE_ENV: &str = "BURN_DISTILL_TEXT_FILE";

/// The default corpus: the file in `BURN_DISTILL_TEXT_FILE` if set, otherwise The Jargon File
/// 4.4.7 (public domain) as `jargon-4.4.7.txt.gz` in burn-distill's cache directory
/// ([`cache_dir`](burn_distill_model::files::cache_dir)). Inside this repository, `cargo run` and
/// `cargo test` set the variable to the bundled copy (`data/text/jargon-4.4.7.txt.gz`,
/// `.cargo/config.toml`).
pub fn default_text_file() -> PathBuf {
    match std::env::var_os(TEXT_FILE_ENV) {
        Some(file) => PathBuf::from(file),
        None => burn_distill_model::files::cache_dir()
            .unwrap_or_default()
            .join("jargon-4.4.7.txt.gz"),
    }
}

/// A UTF-8 text held as bytes.
#[derive(Debug, Clone)]
pub struct ByteCorpus {
    bytes: Arc<[u8]>,
    fingerprint: Fingerprint,
}

impl ByteCorpus {
    /// Reads a UTF-8 text file, gunzipping it if it is gzipped.
    ///
    /// # Errors
    /// [`DataError::Missing`] for a missing file; [`DataError::Corrupt`] for a damaged gzip stream
    /// or bytes that are not UTF-8 (naming the offset).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = read_maybe_gzipped(path).map_err(|error| match error {
            DataError::Missing { path, .. } => DataError::Missing {
                path,
                what: "text file".into(),
                hint: format!("; pass another file or set {TEXT_FILE_ENV}"),
            },
            other => other,
        })?;
        if let Err(error) = std::str::from_utf8(&bytes) {
            return Err(DataError::corrupt(
                path,
                format!("not UTF-8 text: invalid byte sequence at byte {}", error.valid_up_to()),
            ));
        }
        Ok(Self::from_bytes(bytes))
    }

    /// Reads [`default_text_file`].
    ///
    /// # Errors
    /// As [`ByteCorpus::from_file`].
    pub fn load_default() -> Result<Self> {
        Self::from_file(&default_text_file())
    }

    /// A corpus from a string.
    pub fn from_text(text: &str) -> Self {
        Self::from_bytes(text.as_bytes().to_vec())
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        let mut hasher = Fingerprinter::new("byte-corpus");
        hasher.update(&bytes);
        Self {
            bytes: bytes.into(),
            fingerprint: hasher.finish(),
        }
    }

    /// The text's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// All windows of `context` input tokens (plus the next token as the last target), starting
    /// every `stride` bytes.
    ///
    /// # Errors
    /// [`DataError::Invalid`] for a zero context or stride, or a text shorter than one window.
    pub fn windows(&self, context: usize, stride: usize) -> Result<TextWindows> {
        if context == 0 || stride == 0 {
            return Err(DataError::invalid(
                "text windows",
                format!("context ({context}) and stride ({stride}) must be at least 1"),
            ));
        }
        if self.bytes.len() < context + 1 {
            return Err(DataError::invalid(
                "text windows",
                format!(
                    "a window of {context} + 1 bytes needs a longer text than {} bytes",
                    self.bytes.len()
                ),
            ));
        }
        let count = (self.bytes.len() - context - 1) / stride + 1;
        Ok(TextWindows {
            corpus: self.clone(),
            context,
            stride,
            first: 0,
            count,
        })
    }
}

/// One context window: `context + 1` consecutive bytes; inputs are the first `context`, targets
/// the last `context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextItem {
    /// The window's bytes.
    pub tokens: Vec<u8>,
    /// The window's index among all windows of the corpus (its start is `index · stride`).
    pub index: usize,
}

impl Indexed for TextItem {
    fn index(&self) -> usize {
        self.index
    }
}

/// Fixed-length windows of a [`ByteCorpus`]; a `Dataset` of [`TextItem`]s.
#[derive(Debug, Clone)]
pub struct TextWindows {
    corpus: ByteCorpus,
    context: usize,
    stride: usize,
    first: usize,
    count: usize,
}

impl TextWindows {
    /// Input tokens per window.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Bytes between window starts.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Splits the windows into a training part (the start of the text) and a validation part
    /// (its last `validation_fraction`), with no byte in both: windows that would straddle the
    /// boundary are dropped.
    ///
    /// # Errors
    /// [`DataError::Invalid`] for a fraction outside `(0, 1)` or a part that would be empty.
    pub fn split(&self, validation_fraction: f64) -> Result<(TextWindows, TextWindows)> {
        if !(validation_fraction > 0.0 && validation_fraction < 1.0) {
            return Err(DataError::invalid(
                "validation fraction",
                format!("{validation_fraction} is not in (0, 1)"),
            ));
        }
        let train_count = ((self.count as f64) * (1.0 - validation_fraction)).floor() as usize;
        // The first validation window starts after the last training window's final byte.
        let train_end_byte = (self.first + train_count - 1) * self.stride + self.context + 1;
        let valid_first = train_end_byte.div_ceil(self.stride).max(self.first + train_count);
        let end = self.first + self.count;
        if train_count == 0 || valid_first >= end {
            return Err(DataError::invalid(
                "validation fraction",
                format!("{validation_fraction} of {} windows leaves a part empty", self.count),
            ));
        }
        let part = |first, count| TextWindows {
            corpus: self.corpus.clone(),
            first,
            count,
            ..*self
        };
        Ok((part(self.first, train_count), part(valid_first, end - valid_first)))
    }

    fn item(&self, position: usize) -> TextItem {
        let index = self.first + position;
        let start = index * self.stride;
        TextItem {
            tokens: self.corpus.bytes[start..start + self.context + 1].to_vec(),
            index,
        }
    }
}

impl Dataset<TextItem> for TextWindows {
    fn get(&self, index: usize) -> core::result::Result<TextItem, DatasetError> {
        assert!(
            index < self.count,
            "index out of bounds for text windows: {index} >= {}",
            self.count
        );
        Ok(self.item(index))
    }

    fn len(&self) -> usize {
        self.count
    }
}

impl Fingerprinted for TextWindows {
    fn fingerprint(&self) -> Fingerprint {
        let mut hasher = Fingerprinter::new("text-windows");
        hasher
            .update_fingerprint(self.corpus.fingerprint)
            .update_u64(self.context as u64)
            .update_u64(self.stride as u64)
            .update_u64(self.first as u64)
            .update_u64(self.count as u64);
        hasher.finish()
    }
}

/// `[batch, context]` input tokens and the `[batch, context]` next tokens.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Input tokens.
    pub inputs: Tensor<2, Int>,
    /// Next-token targets.
    pub targets: Tensor<2, Int>,
    /// Window index of each example.
    pub indices: Vec<usize>,
}

impl Batch for TokenBatch {
    type Input = Tensor<2, Int>;

    fn input(&self) -> Tensor<2, Int> {
        self.inputs.clone()
    }

    fn targets(&self) -> Tensor<1, Int> {
        self.targets.clone().flatten(0, 1)
    }

    fn indices(&self) -> &[usize] {
        &self.indices
    }
}

/// Makes [`TokenBatch`]es from [`TextItem`]s on any device.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenBatcher;

impl EpochAware for TokenBatcher {}

impl Batcher<TextItem, TokenBatch> for TokenBatcher {
    fn batch(&self, items: Vec<TextItem>, device: &Device) -> TokenBatch {
        assert!(!items.is_empty(), "cannot batch zero windows");
        let window = items[0].tokens.len();
        let context = window - 1;
        let mut inputs = Vec::with_capacity(items.len() * context);
        let mut targets = Vec::with_capacity(items.len() * context);
        for item in &items {
            assert_eq!(item.tokens.len(), window, "windows of one batch must have one length");
            inputs.extend(item.tokens[..context].iter().map(|&t| i64::from(t)));
            targets.extend(item.tokens[1..].iter().map(|&t| i64::from(t)));
        }
        let batch = items.len();
        TokenBatch {
            inputs: Tensor::from_data(TensorData::new(inputs, [batch, context]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, context]), device),
            indices: items.iter().map(|item| item.index).collect(),
        }
    }
}
