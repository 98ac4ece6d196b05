//! Reading a teacher-output cache through a memory map.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill_loss::TailPolicy;
use burn_distill_model::Fingerprint;
use memmap2::Mmap;
use xxhash_rust::xxh3::xxh3_128;

use crate::cache::format::{CacheHeader, CacheMode, TRAILER_BYTES, Trailer};
use crate::error::{DataError, Result};

/// The teacher and dataset a cache must have been made from to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedSource {
    /// Fingerprint of the dataset in use.
    pub dataset: Fingerprint,
    /// Fingerprint of the teacher in use.
    pub teacher: Fingerprint,
}

/// A complete cache file, memory-mapped: examples are read on demand by their dataset index,
/// nothing is loaded up front.
#[derive(Debug)]
pub struct TeacherCache {
    path: PathBuf,
    map: Mmap,
    header: CacheHeader,
    data_start: usize,
    lookup: Lookup,
}

/// From dataset index to record position.
#[derive(Debug)]
enum Lookup {
    /// Records hold indices `first, first + 1, …` in order (a whole dataset or a contiguous part).
    Contiguous { first: usize },
    /// Any other set of indices.
    Map(HashMap<usize, usize>),
}

impl TeacherCache {
    /// Opens a cache file and verifies its structure and checksums (the whole file is read once;
    /// see [`TeacherCache::open_unverified`]). Does not check what it was made from: use
    /// [`TeacherCache::open_for`] to train with it.
    ///
    /// # Errors
    /// [`DataError::Missing`] for a missing file; [`DataError::Corrupt`] for a file that is
    /// incomplete, truncated, or fails its checksum; [`DataError::Stale`] for another format
    /// version.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    /// Opens a cache file, checking its structure but not its checksums: for very large caches
    /// already verified once.
    ///
    /// # Errors
    /// As [`TeacherCache::open`], less the checksum.
    pub fn open_unverified(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    /// Opens and verifies a cache, and refuses it unless it was made from `expected`'s dataset
    /// and teacher.
    ///
    /// # Errors
    /// As [`TeacherCache::open`]; [`DataError::Stale`] naming the fingerprint that differs, with
    /// both values.
    pub fn open_for(path: &Path, expected: &ExpectedSource) -> Result<Self> {
        let cache = Self::open(path)?;
        cache.check_source(expected)?;
        Ok(cache)
    }

    /// Refuses the cache unless it was made from `expected`'s dataset and teacher.
    ///
    /// # Errors
    /// [`DataError::Stale`] naming what differs.
    pub fn check_source(&self, expected: &ExpectedSource) -> Result<()> {
        let stale = |what: &str, found: Fingerprint, wanted: Fingerprint| DataError::Stale {
            path: self.path.clone(),
            reason: format!("it was made from {what} {found}, the {what} in use is {wanted}"),
        };
        if self.header.teacher != expected.teacher {
            return Err(stale("teacher", self.header.teacher, expected.teacher));
        }
        if self.header.dataset != expected.dataset {
            return Err(stale("dataset", self.header.dataset, expected.dataset));
        }
        Ok(())
    }

    #[allow(unsafe_code)]
    fn open_with(path: &Path, verify: bool) -> Result<Self> {
        let file = File::open(path).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => DataError::Missing {
                path: path.to_path_buf(),
                what: "teacher cache".into(),
                hint: "; build it with build_cache".into(),
            },
            _ => DataError::io(path, error),
        })?;
        // SAFETY: the map is read-only and private to this value. Modifying or truncating the
        // file while it is mapped is undefined behaviour; caches are written under a temporary
        // name and renamed, so a rebuild replaces the directory entry, never these bytes.
        let map = unsafe { Mmap::map(&file) }.map_err(|error| DataError::io(path, error))?;
        let (header, data_start) = CacheHeader::decode(path, &map)?;
        let records = header.examples * header.record_bytes();
        let expected_len = data_start + records + TRAILER_BYTES;
        if map.len() != expected_len {
            return Err(DataError::corrupt(
                path,
                format!(
                    "{} bytes, the header's {} examples of {} bytes need {expected_len}: truncated or incomplete",
                    map.len(),
                    header.examples,
                    header.record_bytes()
                ),
            ));
        }
        let trailer = Trailer::decode(path, &map[data_start + records..])?;
        if trailer.examples != header.examples as u64 {
            return Err(DataError::corrupt(
                path,
                format!(
                    "end marker counts {} examples, the header {}",
                    trailer.examples, header.examples
                ),
            ));
        }
        if verify {
            if xxh3_128(&header.encode()) != trailer.header_hash {
                return Err(DataError::corrupt(path, "header checksum mismatch"));
            }
            if xxh3_128(&map[data_start..data_start + records]) != trailer.records_hash {
                return Err(DataError::corrupt(path, "checksum mismatch: the records are damaged"));
            }
        }
        let record = header.record_bytes();
        let index_at = |position: usize| read_u64(&map[data_start + position * record..]) as usize;
        let first = index_at(0);
        let contiguous = (0..header.examples).all(|position| index_at(position) == first + position);
        let lookup = if contiguous {
            Lookup::Contiguous { first }
        } else {
            let mut map_of = HashMap::with_capacity(header.examples);
            for position in 0..header.examples {
                if map_of.insert(index_at(position), position).is_some() {
                    return Err(DataError::corrupt(
                        path,
                        format!("example index {} appears twice", index_at(position)),
                    ));
                }
            }
            Lookup::Map(map_of)
        };
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header,
            data_start,
            lookup,
        })
    }

    /// The file's header.
    pub fn header(&self) -> &CacheHeader {
        &self.header
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Examples in the cache.
    pub fn len(&self) -> usize {
        self.header.examples
    }

    /// Whether the cache is empty (never, for a cache built by this crate).
    pub fn is_empty(&self) -> bool {
        self.header.examples == 0
    }

    /// The record holding dataset example `index`.
    pub fn position_of(&self, index: usize) -> Option<usize> {
        match &self.lookup {
            Lookup::Contiguous { first } => {
                (index >= *first && index - first < self.header.examples).then(|| index - first)
            }
            Lookup::Map(map) => map.get(&index).copied(),
        }
    }

    fn payload(&self, index: usize) -> Result<&[u8]> {
        let position = self.position_of(index).ok_or_else(|| {
            DataError::invalid(
                "example index",
                format!("{index} is not in the cache {}", self.path.display()),
            )
        })?;
        let record = self.header.record_bytes();
        let start = self.data_start + position * record;
        Ok(&self.map[start + 8..start + record])
    }

    /// The dense logits of the examples `indices`, `positions × classes` values each, in order.
    /// For a top-k cache the logits are rebuilt from the top k log-probabilities, the other
    /// classes filled as `tail` says (see [`dense_from_top_k`]).
    ///
    /// # Errors
    /// [`DataError::Invalid`] for an index not in the cache.
    pub fn logits_values(&self, indices: &[usize], tail: TailPolicy) -> Result<Vec<f32>> {
        let per_example = self.header.positions * self.header.classes;
        let mut values = Vec::with_capacity(indices.len() * per_example);
        for &index in indices {
            let payload = self.payload(index)?;
            match self.header.mode {
                CacheMode::DenseF32 => values.extend(
                    payload
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                CacheMode::DenseF16 => values.extend(
                    payload
                        .chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
                CacheMode::TopK { k } => {
                    let (classes, log_probs) = split_top_k(payload, self.header.positions * k);
                    self.check_classes(index, &classes)?;
                    for position in 0..self.header.positions {
                        let span = position * k..(position + 1) * k;
                        values.extend(dense_from_top_k(
                            &classes[span.clone()],
                            &log_probs[span],
                            self.header.classes,
                            tail,
                        ));
                    }
                }
            }
        }
        Ok(values)
    }

    /// The top-k classes and log-probabilities of the examples `indices`, `positions × k` each.
    ///
    /// # Errors
    /// [`DataError::Invalid`] for a dense cache or an index not in the cache.
    pub fn top_k_values(&self, indices: &[usize]) -> Result<(Vec<u32>, Vec<f32>)> {
        let CacheMode::TopK { k } = self.header.mode else {
            return Err(self.not_top_k());
        };
        let per_example = self.header.positions * k;
        let mut all_classes = Vec::with_capacity(indices.len() * per_example);
        let mut all_log_probs = Vec::with_capacity(indices.len() * per_example);
        for &index in indices {
            let (classes, log_probs) = split_top_k(self.payload(index)?, per_example);
            self.check_classes(index, &classes)?;
            all_classes.extend(classes);
            all_log_probs.extend(log_probs);
        }
        Ok((all_classes, all_log_probs))
    }

    /// Refuses a top-k record naming a class the cache does not have: only checksums catch a
    /// damaged class id, and an unverified open reads none.
    fn check_classes(&self, index: usize, classes: &[u32]) -> Result<()> {
        match classes.iter().find(|&&class| class as usize >= self.header.classes) {
            Some(class) => Err(DataError::corrupt(
                &self.path,
                format!(
                    "example {index} names class {class}, the cache has {} (a damaged record)",
                    self.header.classes
                ),
            )),
            None => Ok(()),
        }
    }

    /// The logits of the examples `indices` as a `[batch, classes]` (`D = 2`) or
    /// `[batch, seq, vocab]` (`D = 3`) tensor on `device`.
    ///
    /// # Errors
    /// [`DataError::Invalid`] for a rank other than the cache's or an index not in the cache.
    pub fn logits<const D: usize>(&self, indices: &[usize], tail: TailPolicy, device: &Device) -> Result<Tensor<D>> {
        let shape = self.batch_shape::<D>(indices.len(), self.header.classes)?;
        let values = self.logits_values(indices, tail)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// The top-k classes and log-probabilities of the examples `indices`, each
    /// `[batch, k]` or `[batch, seq, k]`, on `device`.
    ///
    /// # Errors
    /// As [`TeacherCache::top_k_values`] and [`TeacherCache::logits`].
    pub fn top_k<const D: usize>(&self, indices: &[usize], device: &Device) -> Result<(Tensor<D, Int>, Tensor<D>)> {
        let CacheMode::TopK { k } = self.header.mode else {
            return Err(self.not_top_k());
        };
        let shape = self.batch_shape::<D>(indices.len(), k)?;
        let (classes, log_probs) = self.top_k_values(indices)?;
        let classes: Vec<i64> = classes.into_iter().map(i64::from).collect();
        Ok((
            Tensor::from_data(TensorData::new(classes, shape.clone()), device),
            Tensor::from_data(TensorData::new(log_probs, shape), device),
        ))
    }

    fn not_top_k(&self) -> DataError {
        DataError::invalid(
            "cache mode",
            format!("{} holds {} outputs, not top-k", self.path.display(), self.header.mode),
        )
    }

    fn batch_shape<const D: usize>(&self, batch: usize, last: usize) -> Result<Vec<usize>> {
        match (D, self.header.rank) {
            (2, 2) => Ok(vec![batch, last]),
            (3, 3) => Ok(vec![batch, self.header.positions, last]),
            _ => Err(DataError::invalid(
                "logit rank",
                format!(
                    "{} holds rank-{} outputs, rank {D} was asked for",
                    self.path.display(),
                    self.header.rank
                ),
            )),
        }
    }
}

fn read_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

fn split_top_k(payload: &[u8], count: usize) -> (Vec<u32>, Vec<f32>) {
    let (classes, log_probs) = payload.split_at(4 * count);
    (
        classes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        log_probs
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

/// Dense logits over `num_classes` from top-k `classes` and their `log_probs`: the kept classes
/// get their log-probabilities; the others get
/// - [`TailPolicy::UniformTail`]: `ln((1 − Σ top-k) / (V − k))`, the missing mass spread evenly
///   (as [`TailPolicy::Renormalize`] when nothing is missing);
/// - [`TailPolicy::Renormalize`]: the smallest kept log-probability minus 10⁴, so the tail has no
///   mass (`exp` underflows to 0 even at temperature 100) while every logit stays finite.
///
/// A softmax of these at temperature `T` is the teacher's rebuilt distribution at `T`.
pub fn dense_from_top_k(classes: &[u32], log_probs: &[f32], num_classes: usize, tail: TailPolicy) -> Vec<f32> {
    let smallest = log_probs.iter().copied().fold(f32::INFINITY, f32::min);
    let negligible = smallest - 1.0e4;
    let fill = match tail {
        TailPolicy::Renormalize => negligible,
        TailPolicy::UniformTail => {
            let kept: f64 = log_probs.iter().map(|&lp| f64::from(lp).exp()).sum();
            let missing = 1.0 - kept;
            let others = num_classes.saturating_sub(classes.len());
            if missing > 0.0 && others > 0 {
                (missing / others as f64).ln() as f32
            } else {
                negligible
            }
        }
    };
    let mut dense = vec![fill; num_classes];
    for (&class, &log_prob) in classes.iter().zip(log_probs) {
        // Classes outside `num_classes` are not there to fill (a cache refuses them first).
        if let Some(slot) = dense.get_mut(class as usize) {
            *slot = log_prob;
        }
    }
    dense
}
