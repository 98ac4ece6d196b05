//! What teachers and students return: logits plus named intermediate features.

use std::collections::BTreeMap;

use burn::tensor::{Device, Int, Tensor};

use crate::error::{ModelError, Result};

/// An intermediate output of a model, tapped by name for feature (hint) losses.
#[derive(Debug, Clone)]
pub enum Feature {
    /// `[batch, width]`, e.g. an MLP hidden layer.
    Vector(Tensor<2>),
    /// `[batch, seq, width]`, e.g. a transformer block's output.
    Sequence(Tensor<3>),
    /// `[batch, channels, height, width]`, e.g. a convolution's output.
    Map(Tensor<4>),
}

impl Feature {
    /// The feature's shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Feature::Vector(t) => t.dims().to_vec(),
            Feature::Sequence(t) => t.dims().to_vec(),
            Feature::Map(t) => t.dims().to_vec(),
        }
    }

    /// The width a connector maps: the last dimension, or the channels of a map.
    pub fn width(&self) -> usize {
        match self {
            Feature::Vector(t) => t.dims()[1],
            Feature::Sequence(t) => t.dims()[2],
            Feature::Map(t) => t.dims()[1],
        }
    }

    fn without_autodiff(self) -> Self {
        match self {
            Feature::Vector(t) => Feature::Vector(t.without_autodiff()),
            Feature::Sequence(t) => Feature::Sequence(t.without_autodiff()),
            Feature::Map(t) => Feature::Map(t.without_autodiff()),
        }
    }

    /// The same feature in `dtype` (differentiable: a gradient comes back in the feature's own
    /// precision); as it is when it already is in `dtype`.
    pub fn cast(self, dtype: burn::tensor::FloatDType) -> Self {
        fn cast<const D: usize>(tensor: Tensor<D>, dtype: burn::tensor::FloatDType) -> Tensor<D> {
            if tensor.dtype() == dtype.into() {
                tensor
            } else {
                tensor.cast(dtype)
            }
        }
        match self {
            Feature::Vector(t) => Feature::Vector(cast(t, dtype)),
            Feature::Sequence(t) => Feature::Sequence(cast(t, dtype)),
            Feature::Map(t) => Feature::Map(cast(t, dtype)),
        }
    }

    /// The same feature on `device`.
    pub fn to_device(self, device: &Device) -> Self {
        match self {
            Feature::Vector(t) => Feature::Vector(t.to_device(device)),
            Feature::Sequence(t) => Feature::Sequence(t.to_device(device)),
            Feature::Map(t) => Feature::Map(t.to_device(device)),
        }
    }
}

/// Named features, in name order.
pub type Features = BTreeMap<String, Feature>;

/// Picks the requested taps out of everything a model computed; unknown names are an error.
///
/// Models call this with all their taps; the forward pass costs the same either way, and only
/// the requested ones are kept (and so kept alive) for the loss.
pub fn select_taps(mut all: Features, taps: &[&str]) -> Result<Features> {
    let mut selected = Features::new();
    for &name in taps {
        match all.remove(name) {
            Some(feature) => {
                selected.insert(name.to_string(), feature);
            }
            None if selected.contains_key(name) => {}
            None => {
                let mut available: Vec<String> = all.keys().cloned().collect();
                available.extend(selected.keys().cloned());
                available.sort();
                return Err(ModelError::UnknownTap {
                    name: name.to_string(),
                    available,
                });
            }
        }
    }
    Ok(selected)
}

/// A teacher's output. It never carries autodiff: [`TeacherOutput::new`] strips it, so no
/// gradient can flow into a teacher through its outputs, whatever the teacher is.
#[derive(Debug, Clone)]
pub struct TeacherOutput<const D: usize> {
    logits: Tensor<D>,
    features: Features,
    top_k: Option<(Tensor<D, Int>, Tensor<D>)>,
}

impl<const D: usize> TeacherOutput<D> {
    /// Wraps logits and features, dropping any autodiff association they have.
    pub fn new(logits: Tensor<D>, features: Features) -> Self {
        Self {
            logits: logits.without_autodiff(),
            features: features
                .into_iter()
                .map(|(name, feature)| (name, feature.without_autodiff()))
                .collect(),
            top_k: None,
        }
    }

    /// Adds the teacher's top-k classes per position: `indices` and their log-probabilities
    /// (at temperature 1), both `[.., k]`. A top-k cache gives these beside the dense logits it
    /// rebuilds from them, for [`SparseKlLoss`](burn_distill_loss::SparseKlLoss).
    pub fn with_top_k(mut self, indices: Tensor<D, Int>, log_probs: Tensor<D>) -> Self {
        self.top_k = Some((indices.without_autodiff(), log_probs.without_autodiff()));
        self
    }

    /// The top-k indices and log-probabilities, when the teacher gave them.
    pub fn top_k(&self) -> Option<&(Tensor<D, Int>, Tensor<D>)> {
        self.top_k.as_ref()
    }

    /// The logits, `[batch, classes]` or `[batch, seq, vocab]`.
    pub fn logits(&self) -> &Tensor<D> {
        &self.logits
    }

    /// The requested features.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// The same output on `device`.
    pub fn to_device(self, device: &Device) -> Self {
        Self {
            logits: self.logits.to_device(device),
            features: self
                .features
                .into_iter()
                .map(|(name, feature)| (name, feature.to_device(device)))
                .collect(),
            top_k: self
                .top_k
                .map(|(indices, values)| (indices.to_device(device), values.to_device(device))),
        }
    }

    /// Logits and features, by value.
    pub fn into_parts(self) -> (Tensor<D>, Features) {
        (self.logits, self.features)
    }
}

/// A student's output: logits and features that keep their autodiff graph for the backward
/// pass.
#[derive(Debug, Clone)]
pub struct StudentOutput<const D: usize> {
    /// The logits, `[batch, classes]` or `[batch, seq, vocab]`.
    pub logits: Tensor<D>,
    /// The requested features.
    pub features: Features,
}

/// A student's last hidden states and head weight ([`Student::learn_hidden`](crate::Student::learn_hidden)):
/// its logits are `hidden · headᵀ`, left for a chunked loss to compute.
#[derive(Debug, Clone)]
pub struct StudentHidden<const D: usize> {
    /// `[batch, seq, width]` (or `[batch, width]`), with their autodiff graph.
    pub hidden: Tensor<D>,
    /// `[classes, width]`, with its autodiff graph.
    pub head: Tensor<2>,
    /// The requested features.
    pub features: Features,
}
