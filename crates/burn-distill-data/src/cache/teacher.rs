//! A cache of teacher outputs used as the teacher.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Device;
use burn_distill_loss::TailPolicy;
use burn_distill_model::{Features, Fingerprint, ModelError, Teacher, TeacherOutput, select_taps};

use crate::batch::Fingerprinted;
use crate::cache::format::CacheMode;
use crate::cache::read::{ExpectedSource, TeacherCache};
use crate::error::Result;

/// A [`Teacher`] that serves outputs from a [`TeacherCache`] instead of running a model, so
/// training code does not change when the teacher is cached.
///
/// It answers [`Teacher::teach_examples`] (the batch's dataset indices select the records; they
/// must be indices of the dataset the cache was built for, which [`CachedTeacher::open`] checked);
/// [`Teacher::teach`] without indices is an error. Dense caches give their logits; top-k caches
/// give dense logits rebuilt per [`TailPolicy`] plus the exact top-k
/// ([`TeacherOutput::top_k`]). It has no feature taps.
#[derive(Debug, Clone)]
pub struct CachedTeacher {
    cache: Arc<TeacherCache>,
    device: Device,
    tail: TailPolicy,
}

impl CachedTeacher {
    /// Opens the cache at `path`, verifies it, and checks it was made from `dataset` and the
    /// teacher with fingerprint `teacher` (see [`Teacher::fingerprint`]); outputs are put on
    /// `device`.
    ///
    /// # Errors
    /// As [`TeacherCache::open_for`]: a stale cache is refused, naming what differs.
    pub fn open<S: Fingerprinted>(path: &Path, dataset: &S, teacher: Fingerprint, device: &Device) -> Result<Self> {
        let expected = ExpectedSource {
            dataset: dataset.fingerprint(),
            teacher,
        };
        Ok(Self::new(TeacherCache::open_for(path, &expected)?, device))
    }

    /// Serves an opened cache (whose source the caller has checked) on `device`.
    pub fn new(cache: TeacherCache, device: &Device) -> Self {
        Self {
            cache: Arc::new(cache),
            device: device.clone(),
            tail: TailPolicy::Renormalize,
        }
    }

    /// How a top-k cache fills the classes it did not keep (default: renormalise the top k).
    pub fn with_tail(mut self, tail: TailPolicy) -> Self {
        self.tail = tail;
        self
    }

    /// The cache.
    pub fn cache(&self) -> &TeacherCache {
        &self.cache
    }

    fn name(&self) -> String {
        format!("cached teacher {}", self.cache.path().display())
    }
}

impl<I, const D: usize> Teacher<I, D> for CachedTeacher {
    fn teach(&self, _input: I, _taps: &[&str]) -> burn_distill_model::Result<TeacherOutput<D>> {
        Err(ModelError::Unsupported {
            teacher: self.name(),
            reason: "a cache serves examples by dataset index; call teach_examples".into(),
        })
    }

    fn teach_examples(
        &self,
        _input: I,
        indices: &[usize],
        taps: &[&str],
    ) -> burn_distill_model::Result<TeacherOutput<D>> {
        let features = select_taps(Features::new(), taps)?;
        let failed = |error: crate::DataError| ModelError::TeacherFailed {
            teacher: self.name(),
            reason: error.to_string(),
        };
        let logits = self
            .cache
            .logits::<D>(indices, self.tail, &self.device)
            .map_err(failed)?;
        let output = TeacherOutput::new(logits, features);
        Ok(match self.cache.header().mode {
            CacheMode::TopK { .. } => {
                let (classes, log_probs) = self.cache.top_k::<D>(indices, &self.device).map_err(failed)?;
                output.with_top_k(classes, log_probs)
            }
            CacheMode::DenseF32 | CacheMode::DenseF16 => output,
        })
    }

    fn num_classes(&self) -> usize {
        self.cache.header().classes
    }

    fn needs_indices(&self) -> bool {
        true
    }

    /// The fingerprint of the teacher the cache was made from: a cache stands in for it.
    fn fingerprint(&self) -> Option<Fingerprint> {
        Some(self.cache.header().teacher)
    }
}
