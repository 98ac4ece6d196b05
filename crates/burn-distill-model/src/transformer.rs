//! A small decoder-only transformer language model, with sampling.

use burn::config::Config;
use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::base::TappedForward;
use crate::cost::Cost;
use crate::output::{Feature, Features};
use crate::sampling::{Generator, SamplingConfig, TokenRng, sample_token};

/// Configuration of a [`TransformerLm`].
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `vocab` | (required) | vocabulary size (256 for bytes) | `≥ 2` |
/// | `context` | (required) | longest sequence (learned positions) | `≥ 1` |
/// | `layers` | 2 | transformer blocks | `≥ 1` |
/// | `heads` | 4 | attention heads | divides `width` |
/// | `width` | 128 | model width | `≥ 1` |
/// | `mlp_ratio` | 4 | feed-forward width / model width | `≥ 1` |
/// | `dropout` | 0.0 | dropout in the blocks | `[0, 1)` |
/// | `tied_head` | true | the output head reuses the token embedding (no extra `V × W` matrix) | |
#[derive(Config, Debug)]
pub struct TransformerLmConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length.
    pub context: usize,
    /// Number of blocks.
    #[config(default = 2)]
    pub layers: usize,
    /// Attention heads.
    #[config(default = 4)]
    pub heads: usize,
    /// Model width.
    #[config(default = 128)]
    pub width: usize,
    /// Feed-forward expansion.
    #[config(default = 4)]
    pub mlp_ratio: usize,
    /// Dropout.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Tie the output head to the token embedding.
    #[config(default = true)]
    pub tied_head: bool,
}

impl TransformerLmConfig {
    /// Builds the model on `device`.
    ///
    /// # Panics
    /// For sizes out of range (see the table); the message names the value.
    pub fn init(&self, device: &Device) -> TransformerLm {
        assert!(
            self.vocab >= 2,
            "TransformerLmConfig: vocab = {} must be >= 2",
            self.vocab
        );
        assert!(
            self.context >= 1 && self.layers >= 1 && self.width >= 1 && self.mlp_ratio >= 1,
            "TransformerLmConfig: context, layers, width and mlp_ratio must be >= 1, got {self:?}"
        );
        assert!(
            self.heads >= 1 && self.width.is_multiple_of(self.heads),
            "TransformerLmConfig: heads = {} must divide width = {}",
            self.heads,
            self.width
        );
        assert!(
            (0.0..1.0).contains(&self.dropout),
            "TransformerLmConfig: dropout = {} must be in [0, 1)",
            self.dropout
        );
        TransformerLm {
            token_embedding: EmbeddingConfig::new(self.vocab, self.width).init(device),
            position_embedding: EmbeddingConfig::new(self.context, self.width).init(device),
            blocks: TransformerEncoderConfig::new(self.width, self.width * self.mlp_ratio, self.heads, self.layers)
                .with_dropout(self.dropout)
                .with_norm_first(true)
                .init(device),
            norm: LayerNormConfig::new(self.width).init(device),
            head: (!self.tied_head).then(|| LinearConfig::new(self.width, self.vocab).with_bias(false).init(device)),
            vocab: self.vocab,
            context: self.context,
            layers: self.layers,
            width: self.width,
            mlp_ratio: self.mlp_ratio,
        }
    }
}

/// A GPT-style language model (pre-norm blocks, learned positions, causal attention); built by
/// [`TransformerLmConfig`].
///
/// Feature tap: `"hidden"`, the final normalised hidden states `[batch, seq, width]`.
#[derive(Module, Debug)]
pub struct TransformerLm {
    token_embedding: Embedding,
    position_embedding: Embedding,
    blocks: TransformerEncoder,
    norm: LayerNorm,
    head: Option<Linear>,
    vocab: usize,
    context: usize,
    layers: usize,
    width: usize,
    mlp_ratio: usize,
}

impl TransformerLm {
    /// Next-token logits at every position.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]` with `seq ≤ context`
    /// - output: `[batch, seq, vocab]`
    ///
    /// # Panics
    /// When `seq` exceeds the context length.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_tapped(tokens).0
    }

    /// The context length.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Continues each prompt by `new_tokens` tokens, feeding back the last `context` tokens.
    ///
    /// The same model, prompt and [`SamplingConfig`] (seed included) give the same tokens.
    ///
    /// # Shapes
    /// - prompt: `[batch, prompt_len]`, at least one token per row
    /// - output: `[batch, prompt_len + new_tokens]`
    pub fn generate(&self, prompt: Tensor<2, Int>, new_tokens: usize, sampling: &SamplingConfig) -> Tensor<2, Int> {
        sampling.validate();
        // The output lives where the prompt did; the forward passes run without autodiff.
        let output_device = prompt.device();
        let device = output_device.clone().without_autodiff();
        let [batch, prompt_len] = prompt.dims();
        assert!(prompt_len >= 1, "generate: the prompt needs at least one token");
        let mut rows: Vec<Vec<i64>> = {
            let flat: Vec<i64> = prompt.into_data().iter::<i64>().collect();
            flat.chunks(prompt_len).map(|row| row.to_vec()).collect()
        };
        let mut rngs: Vec<TokenRng> = (0..batch)
            .map(|row| {
                TokenRng::new(
                    sampling
                        .seed
                        .wrapping_add(row as u64)
                        .wrapping_mul(0x2545_F491_4F6C_DD1D),
                )
            })
            .collect();
        let model = self.valid();
        for _ in 0..new_tokens {
            let length = rows[0].len();
            let start = length.saturating_sub(self.context);
            let window: Vec<i64> = rows.iter().flat_map(|row| row[start..].iter().copied()).collect();
            let window = Tensor::<2, Int>::from_data(TensorData::new(window, [batch, length - start]), &device);
            let logits = model.forward(window);
            let [_, seq, vocab] = logits.dims();
            let last: Vec<f32> = logits
                .slice([0..batch, seq - 1..seq, 0..vocab])
                .into_data()
                .iter::<f32>()
                .collect();
            for ((row, rng), row_logits) in rows.iter_mut().zip(&mut rngs).zip(last.chunks(vocab)) {
                row.push(sample_token(row_logits, sampling, rng) as i64);
            }
        }
        let total = rows[0].len();
        Tensor::from_data(TensorData::new(rows.concat(), [batch, total]), &output_device)
    }
}

impl Generator for TransformerLm {
    fn generate(&self, prompt: Tensor<2, Int>, new_tokens: usize, sampling: &SamplingConfig) -> Tensor<2, Int> {
        TransformerLm::generate(self, prompt, new_tokens, sampling)
    }

    fn vocab(&self) -> usize {
        self.vocab
    }

    fn context(&self) -> usize {
        self.context
    }
}

impl TappedForward<Tensor<2, Int>, 3> for TransformerLm {
    fn forward_tapped(&self, tokens: Tensor<2, Int>) -> (Tensor<3>, Features) {
        let [batch, seq] = tokens.dims();
        assert!(
            seq <= self.context,
            "TransformerLm: sequence of {seq} tokens exceeds the context of {}",
            self.context
        );
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .expand([batch, seq]);
        let x = self.token_embedding.forward(tokens) + self.position_embedding.forward(positions);
        let mask = generate_autoregressive_mask(batch, seq, &device);
        let x = self.blocks.forward(TransformerEncoderInput::new(x).mask_attn(mask));
        let hidden = self.norm.forward(x);
        let logits = match &self.head {
            Some(head) => head.forward(hidden.clone()),
            None => {
                let embedding = self.token_embedding.weight.val().transpose().unsqueeze::<3>();
                hidden.clone().matmul(embedding)
            }
        };
        let mut features = Features::new();
        features.insert("hidden".to_string(), Feature::Sequence(hidden));
        (logits, features)
    }

    fn num_classes(&self) -> usize {
        self.vocab
    }
}

impl Cost for TransformerLm {
    /// FLOPs for one sequence of `context` tokens: per token and block, the four attention
    /// projections (`8 W²`), attention scores and weighted values (`4 · context · W`, the full
    /// square, as computed) and the feed-forward (`4 · ratio · W²`); then the head (`2 W V`).
    fn flops_per_example(&self) -> u64 {
        let (w, v, n, r) = (
            self.width as u64,
            self.vocab as u64,
            self.context as u64,
            self.mlp_ratio as u64,
        );
        let per_token_block = 8 * w * w + 4 * n * w + 4 * r * w * w;
        n * (self.layers as u64 * per_token_block + 2 * w * v)
    }
}
