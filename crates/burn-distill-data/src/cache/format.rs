//! The on-disk layout of a teacher-output cache.
//!
//! ```text
//! magic "BDKDCACH"            8 bytes
//! format version              u32 little-endian
//! header length H             u32 little-endian
//! header                      H bytes of JSON (CacheHeader), space-padded so data starts
//!                             at a multiple of 64
//! records                     `examples` records of `record_bytes` each:
//!                               example index  u64 LE
//!                               dense:  positions × classes values (f32 or f16, LE)
//!                               top-k:  positions × k class indices (u32 LE), then
//!                                       positions × k log-probabilities (f32 LE)
//! trailer (complete files)    magic "BDKDDONE", examples u64 LE,
//!                             XXH3-128 of the records, XXH3-128 of the header bytes
//! ```
//!
//! A file being written has no trailer and a `.partial` suffix; it becomes the cache by an atomic
//! rename once complete.

use std::path::Path;

use burn_distill_model::Fingerprint;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

pub(crate) const MAGIC: &[u8; 8] = b"BDKDCACH";
pub(crate) const TRAILER_MAGIC: &[u8; 8] = b"BDKDDONE";
pub(crate) const TRAILER_BYTES: usize = 8 + 8 + 16 + 16;
/// The version of the file format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// What a cache stores per position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Every logit, as 32-bit floats (exact).
    DenseF32,
    /// Every logit, as 16-bit floats (half the size; about 3 significant digits).
    DenseF16,
    /// The `k` most likely classes and their log-probabilities at temperature 1.
    TopK {
        /// Classes kept per position.
        k: usize,
    },
}

impl CacheMode {
    /// Bytes per position.
    pub fn bytes_per_position(&self, classes: usize) -> usize {
        match *self {
            Self::DenseF32 => 4 * classes,
            Self::DenseF16 => 2 * classes,
            Self::TopK { k } => 8 * k,
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DenseF32 => write!(f, "dense f32"),
            Self::DenseF16 => write!(f, "dense f16"),
            Self::TopK { k } => write!(f, "top-{k}"),
        }
    }
}

/// The header of a cache file: what it holds and what it was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheHeader {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Dense or top-k.
    pub mode: CacheMode,
    /// Rank of the teacher's logits: 2 (`[batch, classes]`) or 3 (`[batch, seq, vocab]`).
    pub rank: usize,
    /// Positions per example: 1 for rank 2, the sequence length for rank 3.
    pub positions: usize,
    /// Classes (vocabulary size).
    pub classes: usize,
    /// Examples in the cache.
    pub examples: usize,
    /// Fingerprint of the dataset (content and order) the outputs are for.
    pub dataset: Fingerprint,
    /// Fingerprint of the teacher (its weights) that made them.
    pub teacher: Fingerprint,
    /// The crate and version that wrote the file.
    pub writer: String,
}

impl CacheHeader {
    /// Bytes of one record (index + payload).
    pub fn record_bytes(&self) -> usize {
        8 + self.positions * self.mode.bytes_per_position(self.classes)
    }

    /// The encoded prefix: magic, version, length, padded JSON.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a cache header serialises");
        let unpadded = 16 + json.len();
        let padded = unpadded.div_ceil(64) * 64;
        let mut bytes = Vec::with_capacity(padded);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&((padded - 16) as u32).to_le_bytes());
        bytes.extend_from_slice(&json);
        bytes.resize(padded, b' ');
        bytes
    }

    /// Decodes the prefix of a cache file; returns the header and where the records start.
    pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<(Self, usize)> {
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(DataError::corrupt(
                path,
                "not a burn-distill teacher cache (wrong magic bytes)",
            ));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(DataError::Stale {
                path: path.to_path_buf(),
                reason: format!("format version {version}, this build reads version {FORMAT_VERSION}"),
            });
        }
        let length = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        let end = 16 + length;
        if bytes.len() < end {
            return Err(DataError::corrupt(
                path,
                format!("header of {length} bytes, the file has {}", bytes.len()),
            ));
        }
        let header: Self = serde_json::from_slice(bytes[16..end].trim_ascii_end())
            .map_err(|error| DataError::corrupt(path, format!("unreadable header: {error}")))?;
        if header.format_version != version || !(header.rank == 2 || header.rank == 3) || header.classes == 0 {
            return Err(DataError::corrupt(path, format!("inconsistent header {header:?}")));
        }
        if let CacheMode::TopK { k } = header.mode
            && (k == 0 || k > header.classes)
        {
            return Err(DataError::corrupt(
                path,
                format!("top-k with k = {k} for {} classes", header.classes),
            ));
        }
        Ok((header, end))
    }
}

/// The trailer that marks a complete cache file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trailer {
    pub examples: u64,
    pub records_hash: u128,
    pub header_hash: u128,
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_BYTES] {
        let mut bytes = [0u8; TRAILER_BYTES];
        bytes[..8].copy_from_slice(TRAILER_MAGIC);
        bytes[8..16].copy_from_slice(&self.examples.to_le_bytes());
        bytes[16..32].copy_from_slice(&self.records_hash.to_le_bytes());
        bytes[32..48].copy_from_slice(&self.header_hash.to_le_bytes());
        bytes
    }

    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Self> {
        if bytes.len() != TRAILER_BYTES || &bytes[..8] != TRAILER_MAGIC {
            return Err(DataError::corrupt(
                path,
                "no end marker: the file is incomplete or truncated (an interrupted build leaves a .partial file)",
            ));
        }
        Ok(Self {
            examples: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
            records_hash: u128::from_le_bytes(bytes[16..32].try_into().expect("16 bytes")),
            header_hash: u128::from_le_bytes(bytes[32..48].try_into().expect("16 bytes")),
        })
    }
}
