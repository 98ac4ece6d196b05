//! MNIST and Fashion-MNIST from their IDX files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataset::{Dataset, DatasetError};
use burn_distill_model::{Fingerprint, Fingerprinter};

use crate::batch::{Fingerprinted, Indexed};
use crate::error::{DataError, Result};
use crate::idx::read_idx;

/// The environment variable that overrides where MNIST-format files are looked for.
pub const MNIST_DIR_ENV: &str = "BURN_DISTILL_MNIST_DIR";

/// The training or test part of an MNIST-format dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MnistSplit {
    /// 60 000 examples (`train-*-ubyte`).
    Train,
    /// 10 000 examples (`t10k-*-ubyte`).
    Test,
}

impl MnistSplit {
    fn stem(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "t10k",
        }
    }
}

/// Where MNIST is read from when no directory is given: the directory in
/// `BURN_DISTILL_MNIST_DIR` if set, otherwise `mnist/` in burn-distill's cache directory
/// ([`cache_dir`](burn_distill_model::files::cache_dir)). Inside this repository, `cargo run` and
/// `cargo test` set the variable to the bundled copy (`data/mnist/`, `.cargo/config.toml`).
pub fn default_mnist_dir() -> PathBuf {
    match std::env::var_os(MNIST_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => burn_distill_model::files::cache_dir().unwrap_or_default().join("mnist"),
    }
}

/// One MNIST example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MnistItem {
    /// Pixel intensities, row-major, 0 (background) to 255.
    pub pixels: Vec<u8>,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// The class, 0–9.
    pub label: u8,
    /// The example's position in its file, kept through splits and shuffles.
    pub index: usize,
}

impl Indexed for MnistItem {
    fn index(&self) -> usize {
        self.index
    }
}

/// An MNIST-format dataset (MNIST, Fashion-MNIST) held in memory: 47 MB for the 60 000 training
/// images, shared between clones.
#[derive(Debug, Clone)]
pub struct MnistDataset {
    images: Arc<[u8]>,
    labels: Arc<[u8]>,
    rows: usize,
    cols: usize,
    split: MnistSplit,
    fingerprint: Fingerprint,
}

impl MnistDataset {
    /// Reads `split` from `dir`, which holds the standard file names
    /// (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-…`), each gzipped (`.gz`) or
    /// not.
    ///
    /// # Errors
    /// [`DataError::Missing`] for a missing directory or file (naming it and
    /// [`MNIST_DIR_ENV`]); [`DataError::Corrupt`] for a file that is not a valid IDX file, images
    /// and labels of different counts, or a label above 9.
    pub fn load(dir: &Path, split: MnistSplit) -> Result<Self> {
        if !dir.is_dir() {
            return Err(DataError::Missing {
                path: dir.to_path_buf(),
                what: "MNIST directory".into(),
                hint: format!("; pass another directory or set {MNIST_DIR_ENV}"),
            });
        }
        let images_path = find_file(dir, &format!("{}-images-idx3-ubyte", split.stem()))?;
        let labels_path = find_file(dir, &format!("{}-labels-idx1-ubyte", split.stem()))?;
        let images = read_idx(&images_path)?;
        let labels = read_idx(&labels_path)?;
        if images.dims.len() != 3 {
            return Err(DataError::corrupt(
                &images_path,
                format!("an image file has 3 dimensions, this one {:?}", images.dims),
            ));
        }
        if labels.dims.len() != 1 {
            return Err(DataError::corrupt(
                &labels_path,
                format!("a label file has 1 dimension, this one {:?}", labels.dims),
            ));
        }
        if images.dims[0] != labels.dims[0] {
            return Err(DataError::corrupt(
                &labels_path,
                format!(
                    "{} labels for {} images in {}",
                    labels.dims[0],
                    images.dims[0],
                    images_path.display()
                ),
            ));
        }
        if let Some(position) = labels.data.iter().position(|&label| label > 9) {
            return Err(DataError::corrupt(
                &labels_path,
                format!(
                    "label {} at example {position} is not a class 0-9",
                    labels.data[position]
                ),
            ));
        }
        Ok(Self::from_parts(
            images.data,
            labels.data,
            images.dims[1],
            images.dims[2],
            split,
        ))
    }

    /// Reads `split` from [`default_mnist_dir`].
    ///
    /// # Errors
    /// As [`MnistDataset::load`].
    pub fn load_default(split: MnistSplit) -> Result<Self> {
        Self::load(&default_mnist_dir(), split)
    }

    fn from_parts(images: Vec<u8>, labels: Vec<u8>, rows: usize, cols: usize, split: MnistSplit) -> Self {
        let mut hasher = Fingerprinter::new("mnist");
        hasher
            .update_u64(rows as u64)
            .update_u64(cols as u64)
            .update(&images)
            .update(&labels);
        Self {
            images: images.into(),
            labels: labels.into(),
            rows,
            cols,
            split,
            fingerprint: hasher.finish(),
        }
    }

    /// Image height in pixels.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Image width in pixels.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Which part of the dataset this is.
    pub fn split(&self) -> MnistSplit {
        self.split
    }

    /// Every label, in file order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// The example at `index`, or `None` past the end.
    pub fn item(&self, index: usize) -> Option<MnistItem> {
        let size = self.rows * self.cols;
        let label = *self.labels.get(index)?;
        Some(MnistItem {
            pixels: self.images[index * size..(index + 1) * size].to_vec(),
            rows: self.rows,
            cols: self.cols,
            label,
            index,
        })
    }
}

fn find_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    let raw = dir.join(stem);
    let gzipped = dir.join(format!("{stem}.gz"));
    if gzipped.is_file() {
        Ok(gzipped)
    } else if raw.is_file() {
        Ok(raw)
    } else {
        Err(DataError::Missing {
            path: gzipped,
            what: format!("MNIST file, gzipped or not ({stem})"),
            hint: format!("; pass another directory or set {MNIST_DIR_ENV}"),
        })
    }
}

impl Dataset<MnistItem> for MnistDataset {
    fn get(&self, index: usize) -> core::result::Result<MnistItem, DatasetError> {
        let len = self.len();
        Ok(self
            .item(index)
            .unwrap_or_else(|| panic!("index out of bounds for MNIST: {index} >= {len}")))
    }

    fn len(&self) -> usize {
        self.labels.len()
    }
}

impl Fingerprinted for MnistDataset {
    fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}
