//! Batching of MNIST-style images, with Hinton's ±2-pixel jitter as augmentation.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::batch::{Batch, EpochAware, mix};
use crate::mnist::MnistItem;

/// Random translation of an image by up to `max_shift` pixels in each direction, the vacated
/// pixels set to 0. Hinton et al. trained their MNIST teacher with `max_shift = 2`.
///
/// The shift of an example depends only on `(seed, epoch, index)`, so augmentation is the same
/// run to run, whatever the batch order or thread. A teacher-output cache holds the outputs for
/// *un*-jittered inputs: distilling from a cache with jitter on pairs a jittered student input
/// with the teacher's view of the original image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Jitter {
    /// The largest shift, in pixels, along each axis.
    pub max_shift: usize,
    /// Seed of the shifts.
    pub seed: u64,
}

impl Jitter {
    /// The `(down, right)` shift of example `index` in epoch `epoch`, each in
    /// `-max_shift..=max_shift`.
    pub fn shift(&self, epoch: usize, index: usize) -> (isize, isize) {
        let span = 2 * self.max_shift as u64 + 1;
        let bits = mix(mix(self.seed, epoch as u64), index as u64);
        let down = (bits % span) as isize - self.max_shift as isize;
        let right = ((bits >> 32) % span) as isize - self.max_shift as isize;
        (down, right)
    }

    /// `pixels` (`rows × cols`, row-major) moved down by `down` and right by `right`.
    pub fn translate(pixels: &[u8], rows: usize, cols: usize, down: isize, right: isize) -> Vec<u8> {
        let mut out = vec![0u8; rows * cols];
        for row in 0..rows {
            let source_row = row as isize - down;
            if source_row < 0 || source_row >= rows as isize {
                continue;
            }
            for col in 0..cols {
                let source_col = col as isize - right;
                if source_col >= 0 && source_col < cols as isize {
                    out[row * cols + col] = pixels[source_row as usize * cols + source_col as usize];
                }
            }
        }
        out
    }
}

/// Images as `[batch, rows · cols]` floats in `[0, 1]`, labels and source indices.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// `[batch, rows · cols]`, pixel / 255.
    pub images: Tensor<2>,
    /// `[batch]` class labels.
    pub labels: Tensor<1, Int>,
    /// Source-dataset index of each example.
    pub indices: Vec<usize>,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
}

impl ImageBatch {
    /// The images as `[batch, 1, rows, cols]`, for convolutional models.
    pub fn images_nchw(&self) -> Tensor<4> {
        let [batch, _] = self.images.dims();
        self.images.clone().reshape([batch, 1, self.rows, self.cols])
    }
}

impl Batch for ImageBatch {
    type Input = Tensor<2>;

    fn input(&self) -> Tensor<2> {
        self.images.clone()
    }

    fn targets(&self) -> Tensor<1, Int> {
        self.labels.clone()
    }

    fn indices(&self) -> &[usize] {
        &self.indices
    }
}

/// Makes [`ImageBatch`]es from [`MnistItem`]s on any device, with optional [`Jitter`].
///
/// With jitter, call [`EpochAware::set_epoch`] at the start of each epoch so each epoch sees
/// new shifts.
#[derive(Debug, Default)]
pub struct ImageBatcher {
    jitter: Option<Jitter>,
    epoch: AtomicUsize,
}

impl Clone for ImageBatcher {
    fn clone(&self) -> Self {
        Self {
            jitter: self.jitter,
            epoch: AtomicUsize::new(self.epoch.load(Ordering::Relaxed)),
        }
    }
}

impl ImageBatcher {
    /// A batcher without augmentation.
    pub fn new() -> Self {
        Self::default()
    }

    /// A batcher that jitters every image.
    pub fn with_jitter(jitter: Jitter) -> Self {
        Self {
            jitter: Some(jitter),
            epoch: AtomicUsize::new(0),
        }
    }

    /// The jitter, if any.
    pub fn jitter(&self) -> Option<Jitter> {
        self.jitter
    }
}

impl EpochAware for ImageBatcher {
    /// Sets the epoch that selects the jitter shifts.
    fn set_epoch(&self, epoch: usize) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }
}

impl Batcher<MnistItem, ImageBatch> for ImageBatcher {
    fn batch(&self, items: Vec<MnistItem>, device: &Device) -> ImageBatch {
        assert!(!items.is_empty(), "cannot batch zero images");
        let (rows, cols) = (items[0].rows, items[0].cols);
        let size = rows * cols;
        let epoch = self.epoch.load(Ordering::Relaxed);
        let mut pixels = Vec::with_capacity(items.len() * size);
        let mut labels = Vec::with_capacity(items.len());
        let mut indices = Vec::with_capacity(items.len());
        for item in &items {
            assert!(
                item.rows == rows && item.cols == cols && item.pixels.len() == size,
                "example {} is {}x{} with {} pixels, the batch is {rows}x{cols}",
                item.index,
                item.rows,
                item.cols,
                item.pixels.len()
            );
            match self.jitter {
                Some(jitter) => {
                    let (down, right) = jitter.shift(epoch, item.index);
                    let moved = Jitter::translate(&item.pixels, rows, cols, down, right);
                    pixels.extend(moved.iter().map(|&p| f32::from(p) / 255.0));
                }
                None => pixels.extend(item.pixels.iter().map(|&p| f32::from(p) / 255.0)),
            }
            labels.push(i64::from(item.label));
            indices.push(item.index);
        }
        let batch = items.len();
        ImageBatch {
            images: Tensor::from_data(TensorData::new(pixels, [batch, size]), device),
            labels: Tensor::from_data(TensorData::new(labels, [batch]), device),
            indices,
            rows,
            cols,
        }
    }
}
