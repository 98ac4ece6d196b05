//! A small LeNet-5-like convolutional network for image inputs.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, activation};

use crate::base::TappedForward;
use crate::cost::Cost;
use crate::dense::{dense_flops, dense_forward};
use crate::output::{Feature, Features};

/// Configuration of a [`LeNet`]: `[conv 5×5 → ReLU → max-pool 2×2] × len(channels)`, then
/// fully connected layers with ReLU.
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `input_channels` | 1 | image channels | `≥ 1` |
/// | `image_size` | 28 | height = width of the input | big enough for every pool |
/// | `channels` | `[6, 16]` | output channels of each convolution | each `≥ 1` |
/// | `hidden` | `[120, 84]` | fully connected widths | each `≥ 1` |
/// | `classes` | 10 | output width | `≥ 1` |
/// | `first_padding` | 2 | padding of the first convolution (LeNet-5 took 32×32 inputs; 2 makes 28×28 MNIST fit) | |
/// | `dropout` | 0.0 | dropout after each hidden fully connected layer | `[0, 1)` |
#[derive(Config, Debug)]
pub struct LeNetConfig {
    /// Image channels.
    #[config(default = 1)]
    pub input_channels: usize,
    /// Image height and width.
    #[config(default = 28)]
    pub image_size: usize,
    /// Channels of each convolution.
    #[config(default = "vec![6, 16]")]
    pub channels: Vec<usize>,
    /// Widths of the fully connected hidden layers.
    #[config(default = "vec![120, 84]")]
    pub hidden: Vec<usize>,
    /// Number of classes.
    #[config(default = 10)]
    pub classes: usize,
    /// Padding of the first convolution.
    #[config(default = 2)]
    pub first_padding: usize,
    /// Dropout after each hidden fully connected layer.
    #[config(default = 0.0)]
    pub dropout: f64,
}

const KERNEL: usize = 5;

impl LeNetConfig {
    /// The side of the feature map after each convolution (before its pooling).
    fn conv_sides(&self) -> Vec<usize> {
        let mut side = self.image_size;
        let mut sides = Vec::new();
        for index in 0..self.channels.len() {
            let padding = if index == 0 { self.first_padding } else { 0 };
            let padded = side + 2 * padding;
            assert!(
                padded >= KERNEL && (padded - KERNEL + 1) >= 2,
                "LeNetConfig: image_size {} is too small for {} convolution(s)",
                self.image_size,
                self.channels.len()
            );
            let out = padded - KERNEL + 1;
            sides.push(out);
            side = out / 2;
        }
        sides
    }

    /// Builds the network on `device`.
    ///
    /// # Panics
    /// When a width is 0, the dropout is outside `[0, 1)`, or the image is too small for the
    /// convolutions; the message names the value.
    pub fn init(&self, device: &Device) -> LeNet {
        assert!(
            self.input_channels > 0 && self.classes > 0 && self.channels.iter().chain(&self.hidden).all(|&w| w > 0),
            "LeNetConfig: every width must be >= 1, got {self:?}"
        );
        assert!(
            (0.0..1.0).contains(&self.dropout),
            "LeNetConfig: dropout = {} must be in [0, 1)",
            self.dropout
        );
        let sides = self.conv_sides();
        let mut in_channels = self.input_channels;
        let convs = self
            .channels
            .iter()
            .enumerate()
            .map(|(index, &out_channels)| {
                let padding = if index == 0 { self.first_padding } else { 0 };
                let conv = Conv2dConfig::new([in_channels, out_channels], [KERNEL, KERNEL])
                    .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
                    .init(device);
                in_channels = out_channels;
                conv
            })
            .collect();
        let flat = in_channels * (sides.last().expect("one convolution") / 2).pow(2);
        let widths: Vec<usize> = std::iter::once(flat).chain(self.hidden.iter().copied()).collect();
        let hidden = widths
            .windows(2)
            .map(|pair| LinearConfig::new(pair[0], pair[1]).init(device))
            .collect();
        LeNet {
            convs,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            hidden,
            output: LinearConfig::new(*widths.last().expect("flat width"), self.classes).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            conv_sides: sides,
        }
    }
}

/// A LeNet-5-like network; built by [`LeNetConfig`].
///
/// Feature taps: `"conv.0"`, `"conv.1"`, … (maps after ReLU, before pooling) and
/// `"hidden.0"`, … (fully connected layers after ReLU).
#[derive(Module, Debug)]
pub struct LeNet {
    convs: Vec<Conv2d>,
    pool: MaxPool2d,
    hidden: Vec<Linear>,
    output: Linear,
    dropout: Dropout,
    conv_sides: Vec<usize>,
}

impl LeNet {
    /// The logits.
    ///
    /// # Shapes
    /// - input: `[batch, channels, height, width]`
    /// - output: `[batch, classes]`
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward_tapped(images).0
    }
}

impl TappedForward<Tensor<4>, 2> for LeNet {
    fn forward_tapped(&self, images: Tensor<4>) -> (Tensor<2>, Features) {
        let mut features = Features::new();
        let mut x = images;
        for (index, conv) in self.convs.iter().enumerate() {
            let activated = activation::relu(conv.forward(x));
            features.insert(format!("conv.{index}"), Feature::Map(activated.clone()));
            x = self.pool.forward(activated);
        }
        let [batch, channels, height, width] = x.dims();
        let flat: Tensor<2> = x.reshape([batch, channels * height * width]);
        let logits = dense_forward(&self.hidden, &self.output, &self.dropout, flat, &mut features);
        (logits, features)
    }

    fn num_classes(&self) -> usize {
        self.output.weight.val().dims()[1]
    }
}

/// Flat images `[batch, channels · side · side]` (as [`ImageBatch`] holds them) are reshaped to
/// square maps: so a LeNet trains and teaches on the same batches as the MLPs.
///
/// [`ImageBatch`]: https://docs.rs/burn-distill-data/latest/burn_distill_data/struct.ImageBatch.html
///
/// # Panics
/// When the width is not `channels × side²` for some side.
impl TappedForward<Tensor<2>, 2> for LeNet {
    fn forward_tapped(&self, images: Tensor<2>) -> (Tensor<2>, Features) {
        let [batch, width] = images.dims();
        let channels = self.convs[0].weight.val().dims()[1];
        let side = ((width / channels) as f64).sqrt().round() as usize;
        assert_eq!(
            channels * side * side,
            width,
            "LeNet: flat images of width {width} are not {channels} square channel(s)"
        );
        TappedForward::<Tensor<4>, 2>::forward_tapped(self, images.reshape([batch, channels, side, side]))
    }

    fn num_classes(&self) -> usize {
        TappedForward::<Tensor<4>, 2>::num_classes(self)
    }
}

impl Cost for LeNet {
    fn flops_per_example(&self) -> u64 {
        let convs: u64 = self
            .convs
            .iter()
            .zip(&self.conv_sides)
            .map(|(conv, &side)| {
                let [out_channels, in_channels, kh, kw] = conv.weight.val().dims();
                let positions = (side * side * out_channels) as u64;
                positions * (2 * (in_channels * kh * kw) as u64 + 1)
            })
            .sum();
        convs + dense_flops(self.hidden.iter().chain([&self.output]))
    }
}
