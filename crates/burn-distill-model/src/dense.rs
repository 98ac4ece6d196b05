//! The fully connected head shared by the MLP and the CNN.

use burn::nn::{Dropout, Linear};
use burn::tensor::{Tensor, activation};

use crate::output::{Feature, Features};

/// `hidden` layers with ReLU (each tapped as `"hidden.{i}"`, before dropout), then `output`.
pub(crate) fn dense_forward(
    hidden: &[Linear],
    output: &Linear,
    dropout: &Dropout,
    input: Tensor<2>,
    features: &mut Features,
) -> Tensor<2> {
    let mut x = input;
    for (index, layer) in hidden.iter().enumerate() {
        let activated = activation::relu(layer.forward(x));
        features.insert(format!("hidden.{index}"), Feature::Vector(activated.clone()));
        x = dropout.forward(activated);
    }
    output.forward(x)
}

/// FLOPs of linear layers for one example: `2 · in · out` for the products, `out` for the bias.
pub(crate) fn dense_flops<'a>(layers: impl IntoIterator<Item = &'a Linear>) -> u64 {
    layers
        .into_iter()
        .map(|layer| {
            let [fan_in, fan_out] = layer.weight.val().dims();
            (2 * fan_in * fan_out + fan_out) as u64
        })
        .sum()
}
