//! A multilayer perceptron: Hinton et al.'s MNIST teacher and student, and any other widths.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use crate::base::TappedForward;
use crate::cost::Cost;
use crate::dense::{dense_flops, dense_forward};
use crate::output::Features;

/// Configuration of an [`Mlp`]: `input → hidden[0] → … → classes`, ReLU between layers.
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `input` | (required) | input width (784 for MNIST) | `≥ 1` |
/// | `hidden` | (required) | hidden widths, in order | each `≥ 1` |
/// | `classes` | (required) | output width | `≥ 1` |
/// | `dropout` | 0.0 | dropout after each hidden ReLU | `[0, 1)` |
/// | `input_dropout` | 0.0 | dropout on the input | `[0, 1)` |
///
/// Hinton, Vinyals & Dean (2015) use [`MlpConfig::hinton_teacher`] (784-1200-1200-10, with
/// dropout) and [`MlpConfig::hinton_student`] (784-800-800-10, none).
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Input width.
    pub input: usize,
    /// Hidden widths.
    pub hidden: Vec<usize>,
    /// Number of classes.
    pub classes: usize,
    /// Dropout probability after each hidden layer.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Dropout probability on the input.
    #[config(default = 0.0)]
    pub input_dropout: f64,
}

impl MlpConfig {
    /// Hinton et al.'s MNIST teacher: 784-1200-1200-10, dropout 0.5 on hidden units and 0.2 on
    /// inputs (Srivastava et al.'s setting).
    pub fn hinton_teacher() -> Self {
        Self::new(784, vec![1200, 1200], 10)
            .with_dropout(0.5)
            .with_input_dropout(0.2)
    }

    /// Hinton et al.'s MNIST student: 784-800-800-10, no regularisation.
    pub fn hinton_student() -> Self {
        Self::new(784, vec![800, 800], 10)
    }

    /// Builds the network on `device`.
    ///
    /// # Panics
    /// When a width is 0 or a dropout probability is outside `[0, 1)`; the message names it.
    pub fn init(&self, device: &Device) -> Mlp {
        assert!(
            self.input > 0 && self.classes > 0 && self.hidden.iter().all(|&w| w > 0),
            "MlpConfig: every width must be >= 1, got input {}, hidden {:?}, classes {}",
            self.input,
            self.hidden,
            self.classes
        );
        for (name, p) in [("dropout", self.dropout), ("input_dropout", self.input_dropout)] {
            assert!((0.0..1.0).contains(&p), "MlpConfig: {name} = {p} must be in [0, 1)");
        }
        let widths: Vec<usize> = std::iter::once(self.input).chain(self.hidden.iter().copied()).collect();
        let hidden = widths
            .windows(2)
            .map(|pair| LinearConfig::new(pair[0], pair[1]).init(device))
            .collect();
        Mlp {
            hidden,
            output: LinearConfig::new(*widths.last().expect("input width"), self.classes).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            input_dropout: DropoutConfig::new(self.input_dropout).init(),
        }
    }
}

/// A multilayer perceptron with ReLU; built by [`MlpConfig`].
///
/// Feature taps: `"hidden.0"`, `"hidden.1"`, … (each hidden layer after its ReLU, before
/// dropout).
#[derive(Module, Debug)]
pub struct Mlp {
    hidden: Vec<Linear>,
    output: Linear,
    dropout: Dropout,
    input_dropout: Dropout,
}

impl Mlp {
    /// The logits.
    ///
    /// # Shapes
    /// - input: `[batch, input]`
    /// - output: `[batch, classes]`
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        self.forward_tapped(input).0
    }

    /// The widths of every layer, input first, classes last.
    pub fn widths(&self) -> Vec<usize> {
        // burn's Linear stores its weight as [input, output].
        let first = self.hidden.first().unwrap_or(&self.output);
        std::iter::once(first.weight.val().dims()[0])
            .chain(
                self.hidden
                    .iter()
                    .chain([&self.output])
                    .map(|layer| layer.weight.val().dims()[1]),
            )
            .collect()
    }
}

impl TappedForward<Tensor<2>, 2> for Mlp {
    fn forward_tapped(&self, input: Tensor<2>) -> (Tensor<2>, Features) {
        let mut features = Features::new();
        let x = self.input_dropout.forward(input);
        let logits = dense_forward(&self.hidden, &self.output, &self.dropout, x, &mut features);
        (logits, features)
    }

    fn num_classes(&self) -> usize {
        self.output.weight.val().dims()[1]
    }
}

impl Cost for Mlp {
    fn flops_per_example(&self) -> u64 {
        dense_flops(self.hidden.iter().chain([&self.output]))
    }
}
