//! What every dataset item and batch in burn-distill can tell: where an example came from, what
//! the dataset is, and what a model takes.

use std::sync::Arc;

use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Device, Int, Tensor};
use burn_distill_model::{Fingerprint, Fingerprinter};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// An item that knows its position in the dataset it was read from. The position survives
/// splits, subsets and shuffles, so a cache of teacher outputs can serve exactly this example.
pub trait Indexed {
    /// The example's index in its source dataset.
    fn index(&self) -> usize;
}

/// A dataset with a fingerprint of its content and order: a teacher-output cache records it and
/// is refused for any other dataset.
pub trait Fingerprinted {
    /// A hash of every example, in order.
    fn fingerprint(&self) -> Fingerprint;
}

pub use burn_distill_loss::IGNORE_INDEX;

/// A batch ready for a model: inputs, flattened targets and the dataset index of each example.
pub trait Batch {
    /// What the models take (for example `Tensor<2>` images, `Tensor<2, Int>` tokens).
    type Input: Clone;

    /// The models' input.
    fn input(&self) -> Self::Input;

    /// The targets, flattened in the order of the flattened logits: `[batch]` class labels, or
    /// `[batch · seq]` next tokens.
    fn targets(&self) -> Tensor<1, Int>;

    /// The source-dataset index of each example, in batch order.
    fn indices(&self) -> &[usize];

    /// The number of examples.
    fn size(&self) -> usize {
        self.indices().len()
    }

    /// The device the batch lives on.
    fn device(&self) -> Device {
        self.targets().device()
    }
}

/// A batcher whose output depends on the epoch (augmentation). Training loops call
/// [`EpochAware::set_epoch`] before each epoch; batchers without augmentation keep the default,
/// which does nothing.
pub trait EpochAware {
    /// Sets the epoch the next batches belong to.
    fn set_epoch(&self, epoch: usize) {
        let _ = epoch;
    }
}

/// Some examples of a dataset, in a given order; items keep their source index.
#[derive(Debug, Clone)]
pub struct Subset<D> {
    dataset: D,
    positions: Arc<[usize]>,
}

impl<D> Subset<D> {
    /// The examples of `dataset` at `positions`, in that order.
    ///
    /// # Panics
    /// If a position is out of range (checked once here, not on every access).
    pub fn new<I>(dataset: D, positions: Vec<usize>) -> Self
    where
        D: Dataset<I>,
    {
        let len = dataset.len();
        if let Some(bad) = positions.iter().find(|&&position| position >= len) {
            panic!("subset position {bad} is out of range for a dataset of {len} examples");
        }
        Self {
            dataset,
            positions: positions.into(),
        }
    }

    /// The underlying dataset.
    pub fn inner(&self) -> &D {
        &self.dataset
    }

    /// The positions taken from it.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }
}

impl<D: Dataset<I>, I> Dataset<I> for Subset<D> {
    fn get(&self, index: usize) -> Result<I, DatasetError> {
        self.dataset.get(self.positions[index])
    }

    fn len(&self) -> usize {
        self.positions.len()
    }
}

impl<D: Fingerprinted> Fingerprinted for Subset<D> {
    fn fingerprint(&self) -> Fingerprint {
        let mut hasher = Fingerprinter::new("subset");
        hasher.update_fingerprint(self.dataset.fingerprint());
        hasher.update_u64(self.positions.len() as u64);
        for &position in self.positions.iter() {
            hasher.update_u64(position as u64);
        }
        hasher.finish()
    }
}

/// Splits `dataset` into a training part and a held-out validation part of `validation`
/// examples, drawn at random with `seed` (the same seed gives the same split on every machine).
/// Both parts keep their examples in dataset order.
///
/// # Panics
/// If `validation` exceeds the dataset's size.
pub fn split_validation<D, I>(dataset: D, validation: usize, seed: u64) -> (Subset<D>, Subset<D>)
where
    D: Dataset<I> + Clone,
{
    let len = dataset.len();
    assert!(
        validation <= len,
        "a validation split of {validation} examples needs at least as many, the dataset has {len}"
    );
    let mut positions: Vec<usize> = (0..len).collect();
    positions.shuffle(&mut StdRng::seed_from_u64(mix(seed, 0x5eed_5917)));
    let mut held_out = positions.split_off(len - validation);
    positions.sort_unstable();
    held_out.sort_unstable();
    (Subset::new(dataset.clone(), positions), Subset::new(dataset, held_out))
}

/// The order in which a training loop visits a dataset: a fresh seeded permutation per epoch
/// (or dataset order), cut into batches.
///
/// The order of epoch `e` depends only on `(seed, e)`, so a resumed run visits exactly the
/// batches an uninterrupted one would, without saving any random-number state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EpochSampler {
    /// Examples in the dataset.
    pub len: usize,
    /// Examples per batch.
    pub batch_size: usize,
    /// Seed of the permutations.
    pub seed: u64,
    /// Permute each epoch (`false`: dataset order, for evaluation).
    pub shuffle: bool,
    /// Drop a last batch smaller than `batch_size`.
    pub drop_last: bool,
}

impl EpochSampler {
    /// A shuffling sampler that keeps the last, smaller batch.
    pub fn new(len: usize, batch_size: usize, seed: u64) -> Self {
        assert!(batch_size > 0, "batch_size must be at least 1");
        Self {
            len,
            batch_size,
            seed,
            shuffle: true,
            drop_last: false,
        }
    }

    /// A sampler in dataset order, for evaluation.
    pub fn sequential(len: usize, batch_size: usize) -> Self {
        Self {
            shuffle: false,
            ..Self::new(len, batch_size, 0)
        }
    }

    /// The batches of epoch `epoch`, as dataset positions.
    pub fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(mix(self.seed, epoch as u64)));
        }
        let mut batches: Vec<Vec<usize>> = order.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        if self.drop_last && batches.last().is_some_and(|batch| batch.len() < self.batch_size) {
            batches.pop();
        }
        batches
    }

    /// The number of batches per epoch.
    pub fn num_batches(&self) -> usize {
        if self.drop_last {
            self.len / self.batch_size
        } else {
            self.len.div_ceil(self.batch_size)
        }
    }
}

/// SplitMix64 of a pair: well-spread seeds from `(seed, stream)`.
pub(crate) fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
