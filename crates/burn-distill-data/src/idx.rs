//! The IDX file format of MNIST and Fashion-MNIST, gzipped or raw.
//!
//! An IDX file is a magic number (two zero bytes, a data-type byte, the number of dimensions), the
//! dimensions as big-endian `u32`s, then the values in row-major order. MNIST uses unsigned bytes
//! (type `0x08`): 3 dimensions for images (`count × rows × cols`), 1 for labels.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::error::{DataError, Result};

/// The contents of an IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first (`[count, rows, cols]` for images).
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

const UNSIGNED_BYTE: u8 = 0x08;

/// Reads an IDX file of unsigned bytes, decompressing it first if it is gzipped (detected from
/// its first two bytes, not its name).
///
/// # Errors
/// [`DataError::Missing`] when the file does not exist; [`DataError::Corrupt`] for a bad magic
/// number, an unsupported data type, a truncated or damaged gzip stream, or a length that does
/// not match the dimensions (truncated or with trailing bytes); [`DataError::Io`] otherwise.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let bytes = read_maybe_gzipped(path)?;
    parse_idx(path, &bytes)
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic bytes.
pub(crate) fn read_maybe_gzipped(path: &Path) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut raw))
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => DataError::Missing {
                path: path.to_path_buf(),
                what: "file".into(),
                hint: String::new(),
            },
            _ => DataError::io(path, error),
        })?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut bytes = Vec::with_capacity(raw.len() * 4);
    MultiGzDecoder::new(raw.as_slice())
        .read_to_end(&mut bytes)
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                DataError::corrupt(path, "truncated gzip stream (the download or copy was cut short)")
            }
            _ => DataError::corrupt(path, format!("damaged gzip stream: {error}")),
        })?;
    Ok(bytes)
}

fn parse_idx(path: &Path, bytes: &[u8]) -> Result<IdxArray> {
    if bytes.len() < 4 {
        return Err(DataError::corrupt(
            path,
            format!("{} bytes is too short for an IDX header", bytes.len()),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::corrupt(
            path,
            format!(
                "wrong magic number {:02x}{:02x}{:02x}{:02x}: an IDX file starts with two zero bytes",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != UNSIGNED_BYTE {
        return Err(DataError::corrupt(
            path,
            format!(
                "IDX data type 0x{:02x} is not supported (MNIST uses unsigned bytes, 0x08)",
                bytes[2]
            ),
        ));
    }
    let rank = usize::from(bytes[3]);
    let header = 4 + 4 * rank;
    if rank == 0 || bytes.len() < header {
        return Err(DataError::corrupt(
            path,
            format!(
                "IDX header of rank {rank} needs {header} bytes, the file has {}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|word| u32::from_be_bytes([word[0], word[1], word[2], word[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))
        .ok_or_else(|| DataError::corrupt(path, format!("dimensions {dims:?} overflow")))?;
    let actual = bytes.len() - header;
    if actual != expected {
        let what = if actual < expected { "truncated" } else { "too long" };
        return Err(DataError::corrupt(
            path,
            format!("{what}: dimensions {dims:?} need {expected} bytes of data, the file has {actual}"),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Encodes `data` with `dims` as an uncompressed IDX file of unsigned bytes (for tests and for
/// writing MNIST-format subsets).
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, UNSIGNED_BYTE, dims.len() as u8];
    for &dim in dims {
        bytes.extend_from_slice(&(dim as u32).to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}
