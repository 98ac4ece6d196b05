//! Connectors: map a student feature to the teacher's width for hint (feature) losses.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::output::Feature;

/// The shape of a connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ConnectorKind {
    /// A linear layer over the last dimension, for `[batch, width]` and `[batch, seq, width]`.
    #[default]
    Linear,
    /// A 1×1 convolution over channels, for `[batch, channels, height, width]` maps.
    Conv1x1,
}

/// Configuration of a [`Connector`].
///
/// | Name | Default | Purpose |
/// |---|---|---|
/// | `student_width` | (required) | width (or channels) of the student feature |
/// | `teacher_width` | (required) | width (or channels) of the teacher feature |
/// | `kind` | `Linear` | see [`ConnectorKind`] |
/// | `bias` | true | learn a bias |
/// | `identity` | false | start as the identity on the first `min(student, teacher)` channels (and zero bias) instead of at random: where the two widths are the same space (a student made of the teacher's blocks), the term then starts from the features as they are |
#[derive(Config, Debug)]
pub struct ConnectorConfig {
    /// Width of the student feature.
    pub student_width: usize,
    /// Width of the teacher feature.
    pub teacher_width: usize,
    /// Linear or 1×1 convolution.
    #[config(default = "ConnectorKind::Linear")]
    pub kind: ConnectorKind,
    /// Learn a bias.
    #[config(default = true)]
    pub bias: bool,
    /// Start as a (truncated) identity with zero bias.
    #[config(default = false)]
    pub identity: bool,
}

impl ConnectorConfig {
    /// Builds the connector on `device` (an autodiff device, to train it with the student).
    pub fn init(&self, device: &Device) -> Connector {
        let (linear, conv) = match self.kind {
            ConnectorKind::Linear => (
                Some(
                    LinearConfig::new(self.student_width, self.teacher_width)
                        .with_bias(self.bias)
                        .init(device),
                ),
                None,
            ),
            ConnectorKind::Conv1x1 => (
                None,
                Some(
                    Conv2dConfig::new([self.student_width, self.teacher_width], [1, 1])
                        .with_bias(self.bias)
                        .init(device),
                ),
            ),
        };
        let connector = Connector {
            linear,
            conv,
            student_width: self.student_width,
        };
        if self.identity {
            connector.into_identity(device)
        } else {
            connector
        }
    }
}

/// A learned map from a student feature to the teacher's width, trained with the student and
/// saved with it (it is a burn module: put it in the student's module tree).
#[derive(Module, Debug)]
pub struct Connector {
    linear: Option<Linear>,
    conv: Option<Conv2d>,
    student_width: usize,
}

impl Connector {
    /// The same connector set to the identity on the first `min(student, teacher)` channels,
    /// zero elsewhere and a zero bias.
    fn into_identity(mut self, device: &Device) -> Self {
        let eye = |rows: usize, columns: usize| {
            let mut values = vec![0.0f32; rows * columns];
            for index in 0..rows.min(columns) {
                values[index * columns + index] = 1.0;
            }
            values
        };
        let zero_bias =
            |bias: Param<Tensor<1>>| bias.map(|old| old.zeros_like().set_require_grad(old.is_require_grad()));
        if let Some(linear) = self.linear.as_mut() {
            let [inputs, outputs] = linear.weight.dims();
            let weight = Tensor::<2>::from_data(TensorData::new(eye(inputs, outputs), [inputs, outputs]), device);
            linear.weight = linear
                .weight
                .clone()
                .map(|old| weight.set_require_grad(old.is_require_grad()));
            linear.bias = linear.bias.take().map(zero_bias);
        }
        if let Some(conv) = self.conv.as_mut() {
            let [outputs, inputs, _, _] = conv.weight.dims();
            let weight = Tensor::<2>::from_data(TensorData::new(eye(outputs, inputs), [outputs, inputs]), device)
                .reshape([outputs, inputs, 1, 1]);
            conv.weight = conv
                .weight
                .clone()
                .map(|old| weight.set_require_grad(old.is_require_grad()));
            conv.bias = conv.bias.take().map(zero_bias);
        }
        self
    }

    /// Maps `feature` to the teacher's width.
    ///
    /// # Errors
    /// [`ModelError::FeatureShape`] when the feature's kind does not fit the connector (a map
    /// into a linear connector, a vector into a 1×1 convolution) or its width is not the
    /// configured student width.
    pub fn forward(&self, feature: Feature) -> crate::Result<Feature> {
        if feature.width() != self.student_width {
            return Err(ModelError::FeatureShape {
                what: "connector input".to_string(),
                expected: format!("width {}", self.student_width),
                actual: feature.dims(),
            });
        }
        match (&self.linear, &self.conv, feature) {
            (Some(linear), _, Feature::Vector(t)) => Ok(Feature::Vector(linear.forward(t))),
            (Some(linear), _, Feature::Sequence(t)) => Ok(Feature::Sequence(linear.forward(t))),
            (_, Some(conv), Feature::Map(t)) => Ok(Feature::Map(conv.forward(t))),
            (linear, _, feature) => Err(ModelError::FeatureShape {
                what: "connector input".to_string(),
                expected: if linear.is_some() {
                    "[batch, width] or [batch, seq, width] for a linear connector".to_string()
                } else {
                    "[batch, channels, height, width] for a 1x1 convolution".to_string()
                },
                actual: feature.dims(),
            }),
        }
    }
}
