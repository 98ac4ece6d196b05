//! A Llama-family decoder (RMSNorm, rotary positions, grouped-query attention, SwiGLU, tied or
//! untied head; Qwen2's attention biases as a switch), one type for teachers and students.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill_loss::{CausalMask, WeightLayout, causal_attention, swiglu, weight_matmul};
use serde::{Deserialize, Serialize};

use crate::base::TappedForward;
use crate::cost::Cost;
use crate::llm::cache::{BlockCache, LlamaCache};
use crate::llm::error::{LlmError, LlmResult};
use crate::output::{Feature, Features};

/// The architecture of a [`Llama`], with Hugging Face's `config.json` field names so that serde
/// reads and writes that file directly.
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `vocab_size` | (required) | tokens | `≥ 2` |
/// | `hidden_size` | (required) | model width | divisible by the heads |
/// | `intermediate_size` | (required) | SwiGLU width | `≥ 1` |
/// | `num_hidden_layers` | (required) | blocks | `≥ 1` |
/// | `num_attention_heads` | (required) | query heads | `≥ 1` |
/// | `num_key_value_heads` | query heads | key/value heads (grouped-query attention) | divides the query heads |
/// | `head_dim` | width / heads | per-head width | even |
/// | `max_position_embeddings` | 2048 | longest sequence | `≥ 1` |
/// | `rms_norm_eps` | 1e-6 | RMSNorm ε | `> 0` |
/// | `rope_theta` | 10 000 | rotary base | `> 0` |
/// | `tie_word_embeddings` | false | the head reuses the token embedding | |
/// | `attention_bias` | false | biases on q, k, v (and o for `llama`) projections | |
/// | `model_type` | `"llama"` | `"llama"` or `"qwen2"` (q, k, v biases, no o bias) | |
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads; `None` means as many as query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; `None` means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Longest sequence the positions are meant for.
    #[serde(default = "default_context")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Rotary embedding base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Whether the output head is the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Attention projection biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// `"llama"` or `"qwen2"`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Begin-of-sequence token, when the model has one.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// Rotary scaling (Llama 3.1 and others). Only `null` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5's home of the rotary settings (`rope_theta`, `rope_type`); read into
    /// `rope_theta` by [`LlamaConfig::from_json`]. Only the `"default"` type is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// Qwen2's sliding-window attention; only `false` is supported.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Biases in the feed-forward; only `false` is supported.
    #[serde(default)]
    pub mlp_bias: bool,
    /// The activation of the feed-forward; only `"silu"` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// The standard deviation of the normal distribution [`LlamaConfig::init`] draws the
    /// embedding and every projection from, as transformers does (a unit-variance tied
    /// embedding would start the logits at a standard deviation of about √width).
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

fn default_context() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_act() -> String {
    "silu".into()
}
fn default_initializer_range() -> f64 {
    0.02
}

impl LlamaConfig {
    /// A config with the given sizes and the defaults above (`tie_word_embeddings` true, as
    /// small models usually have it).
    pub fn new(vocab_size: usize, hidden_size: usize, intermediate_size: usize, layers: usize, heads: usize) -> Self {
        Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: None,
            head_dim: None,
            max_position_embeddings: default_context(),
            rms_norm_eps: default_eps(),
            rope_theta: default_theta(),
            tie_word_embeddings: true,
            attention_bias: false,
            model_type: default_model_type(),
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling: None,
            rope_parameters: None,
            use_sliding_window: false,
            mlp_bias: false,
            hidden_act: default_act(),
            initializer_range: default_initializer_range(),
        }
    }

    /// Reads a Hugging Face `config.json` text (transformers 4's `rope_theta` or 5's
    /// `rope_parameters`) and validates it.
    ///
    /// # Errors
    /// [`LlmError::Config`] for JSON that is not a Llama config or values out of range.
    pub fn from_json(text: &str) -> LlmResult<Self> {
        let mut config: LlamaConfig = serde_json::from_str(text).map_err(|e| LlmError::Config {
            field: "config.json",
            value: String::new(),
            reason: e.to_string(),
        })?;
        if let Some(parameters) = config.rope_parameters.take() {
            let kind = parameters
                .get("rope_type")
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(LlmError::Config {
                    field: "rope_parameters.rope_type",
                    value: kind.to_string(),
                    reason: "only the \"default\" rotary type is supported".into(),
                });
            }
            if let Some(theta) = parameters.get("rope_theta").and_then(|t| t.as_f64()) {
                config.rope_theta = theta;
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets the key/value heads.
    pub fn with_kv_heads(mut self, kv_heads: usize) -> Self {
        self.num_key_value_heads = Some(kv_heads);
        self
    }

    /// Sets the context length.
    pub fn with_context(mut self, context: usize) -> Self {
        self.max_position_embeddings = context;
        self
    }

    /// Sets the rotary base.
    pub fn with_rope_theta(mut self, theta: f64) -> Self {
        self.rope_theta = theta;
        self
    }

    /// Ties or unties the head.
    pub fn with_tied_head(mut self, tied: bool) -> Self {
        self.tie_word_embeddings = tied;
        self
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_width(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    fn o_bias(&self) -> bool {
        self.attention_bias && self.model_type != "qwen2"
    }

    /// Checks every field against the table.
    ///
    /// # Errors
    /// [`LlmError::Config`] naming the first field out of range.
    pub fn validate(&self) -> LlmResult<()> {
        let bad = |field: &'static str, value: String, reason: &str| {
            Err(LlmError::Config {
                field,
                value,
                reason: reason.to_string(),
            })
        };
        if self.vocab_size < 2 {
            return bad("vocab_size", self.vocab_size.to_string(), "must be >= 2");
        }
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return bad(field, "0".into(), "must be >= 1");
            }
        }
        if !(self.initializer_range.is_finite() && self.initializer_range > 0.0) {
            return bad(
                "initializer_range",
                self.initializer_range.to_string(),
                "must be finite and > 0",
            );
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(
                "num_key_value_heads",
                kv.to_string(),
                &format!("must divide num_attention_heads = {}", self.num_attention_heads),
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "hidden_size",
                self.hidden_size.to_string(),
                &format!(
                    "must be divisible by num_attention_heads = {}",
                    self.num_attention_heads
                ),
            );
        }
        if self.head_width() == 0 || !self.head_width().is_multiple_of(2) {
            return bad("head_dim", self.head_width().to_string(), "must be even and >= 2");
        }
        // Sizes read from a file are untrusted: every tensor's element count must be a number.
        let products = [
            self.num_attention_heads.checked_mul(self.head_width()),
            self.vocab_size.checked_mul(self.hidden_size),
            self.intermediate_size.checked_mul(self.hidden_size),
            self.num_attention_heads
                .checked_mul(self.head_width())
                .and_then(|q| q.checked_mul(self.hidden_size)),
        ];
        if products.iter().any(|p| p.is_none_or(|p| p > isize::MAX as usize / 4)) {
            return bad(
                "hidden_size",
                self.hidden_size.to_string(),
                "the tensors' sizes overflow together with the other fields",
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad("rms_norm_eps", self.rms_norm_eps.to_string(), "must be finite and > 0");
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad("rope_theta", self.rope_theta.to_string(), "must be finite and > 0");
        }
        if !matches!(self.model_type.as_str(), "llama" | "qwen2") {
            return bad(
                "model_type",
                self.model_type.clone(),
                "\"llama\" and \"qwen2\" are supported",
            );
        }
        if self.use_sliding_window {
            return bad(
                "use_sliding_window",
                "true".into(),
                "sliding-window attention is not supported",
            );
        }
        if self.mlp_bias {
            return bad("mlp_bias", "true".into(), "feed-forward biases are not supported");
        }
        if self.hidden_act != "silu" {
            return bad("hidden_act", self.hidden_act.clone(), "only \"silu\" is supported");
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return bad(
                "rope_scaling",
                format!("{}", self.rope_scaling.as_ref().unwrap()),
                "rotary scaling is not supported yet",
            );
        }
        Ok(())
    }

    /// Builds a randomly initialised model on `device`.
    ///
    /// # Errors
    /// As [`LlamaConfig::validate`].
    pub fn init(&self, device: &Device) -> LlmResult<Llama> {
        self.validate()?;
        let width = self.hidden_size;
        let head = self.head_width();
        let (heads, kv) = (self.num_attention_heads, self.kv_heads());
        let norm = || RmsNormConfig::new(width).with_epsilon(self.rms_norm_eps).init(device);
        let initializer = Initializer::Normal {
            mean: 0.0,
            std: self.initializer_range,
        };
        let linear = |i, o, bias| {
            LinearConfig::new(i, o)
                .with_bias(bias)
                .with_initializer(initializer.clone())
                .init(device)
        };
        let layers = (0..self.num_hidden_layers)
            .map(|_| LlamaBlock {
                input_layernorm: norm(),
                self_attn: LlamaAttention {
                    q_proj: linear(width, heads * head, self.qkv_bias()),
                    k_proj: linear(width, kv * head, self.qkv_bias()),
                    v_proj: linear(width, kv * head, self.qkv_bias()),
                    o_proj: linear(heads * head, width, self.o_bias()),
                    heads,
                    kv_heads: kv,
                    head_dim: head,
                },
                post_attention_layernorm: norm(),
                mlp: LlamaMlp {
                    gate_proj: linear(width, self.intermediate_size, false),
                    up_proj: linear(width, self.intermediate_size, false),
                    down_proj: linear(self.intermediate_size, width, false),
                },
            })
            .collect();
        Ok(Llama {
            embed_tokens: EmbeddingConfig::new(self.vocab_size, width)
                .with_initializer(initializer.clone())
                .init(device),
            layers,
            norm: norm(),
            lm_head: (!self.tie_word_embeddings).then(|| linear(width, self.vocab_size, false)),
            config: self.clone(),
        })
    }
}

/// A Llama-family decoder-only language model.
///
/// Parameter names follow Hugging Face's (`layers.0.self_attn.q_proj`, without the `model.`
/// prefix), so weights move between the two with a key mapping only.
///
/// Feature taps: `"block.{i}"`, the output of block `i` (`[batch, seq, width]`, before the final
/// norm), and `"hidden"`, the final normalised hidden states that the head reads.
#[derive(Module, Debug)]
pub struct Llama {
    pub(crate) embed_tokens: Embedding,
    pub(crate) layers: Vec<LlamaBlock>,
    pub(crate) norm: RmsNorm,
    pub(crate) lm_head: Option<Linear>,
    #[module(skip)]
    pub(crate) config: LlamaConfig,
}

/// One pre-norm block: attention, then SwiGLU, each with a residual.
#[derive(Module, Debug)]
pub struct LlamaBlock {
    input_layernorm: RmsNorm,
    self_attn: LlamaAttention,
    post_attention_layernorm: RmsNorm,
    mlp: LlamaMlp,
}

/// Grouped-query self-attention with rotary positions.
#[derive(Module, Debug)]
pub struct LlamaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
}

/// The SwiGLU feed-forward: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// Rotary tables for one forward call: `cos` and `sin` of shape `[batch, seq, 1, head_dim]`,
/// laid out as Hugging Face's `rotate_half` convention expects (the two halves repeat).
struct Rotary {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rotary {
    fn new(config: &LlamaConfig, positions: &[Vec<usize>], device: &Device) -> Self {
        let head = config.head_width();
        let half = head / 2;
        // As transformers computes them, in f32: 1 / θ^(2i / d), then position · frequency.
        let theta = config.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head as f32))
            .collect();
        let batch = positions.len();
        let seq = positions.first().map_or(0, Vec::len);
        let mut cos = Vec::with_capacity(batch * seq * head);
        let mut sin = Vec::with_capacity(batch * seq * head);
        for row in positions {
            for &position in row {
                for _ in 0..2 {
                    for &frequency in &inv_freq {
                        let angle = position as f32 * frequency;
                        cos.push(angle.cos());
                        sin.push(angle.sin());
                    }
                }
            }
        }
        let shape = [batch, seq, 1, head];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// `x · cos + rotate_half(x) · sin`, with `rotate_half([a, b]) = [-b, a]`, for `x` of shape
    /// `[batch, seq, heads, head_dim]`.
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, seq, heads, head] = x.dims();
        let half = head / 2;
        let first = x.clone().narrow(3, 0, half);
        let second = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        // The tables are f32; a half-precision model (mixed precision, a half teacher) gets
        // them in its own precision.
        let dtype = x.dtype();
        let table = |t: &Tensor<4>| {
            let t = t.clone();
            let t = if t.dtype() == dtype { t } else { t.cast(dtype) };
            t.expand([batch, seq, heads, head])
        };
        x * table(&self.cos) + rotated * table(&self.sin)
    }
}

/// `linear` applied to `[batch, seq, in]` as one 2-D product over the flattened positions.
/// The few positions of a decoding step take a host kernel on the CPU devices
/// ([`weight_matmul`]); larger products are burn's GEMM.
fn project(linear: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [batch, seq, width] = x.dims();
    let mut out = weight_matmul(
        x.reshape([batch * seq, width]),
        linear.weight.val(),
        WeightLayout::InOut,
    );
    if let Some(bias) = &linear.bias {
        out = out + bias.val().unsqueeze_dim(0);
    }
    let out_width = out.dims()[1];
    out.reshape([batch, seq, out_width])
}

impl LlamaAttention {
    fn forward(&self, x: Tensor<3>, rotary: &Rotary, mask: &CausalMask, cache: Option<&mut BlockCache>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        // Heads stay where the projections put them, `[batch, seq, heads, head_dim]`: the
        // attention reads that layout, so nothing is transposed.
        let split = |t: Tensor<3>, heads: usize| t.reshape([batch, seq, heads, self.head_dim]);
        let q = rotary.apply(split(project(&self.q_proj, x.clone()), self.heads));
        let mut k = rotary.apply(split(project(&self.k_proj, x.clone()), self.kv_heads));
        let mut v = split(project(&self.v_proj, x), self.kv_heads);
        if let Some(slot) = cache {
            if let Some((past_k, past_v)) = slot.take() {
                k = Tensor::cat(vec![past_k, k], 1);
                v = Tensor::cat(vec![past_v, v], 1);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        project(&self.o_proj, causal_attention(q, k, v, mask))
    }
}

impl LlamaBlock {
    fn forward(&self, x: Tensor<3>, rotary: &Rotary, mask: &CausalMask, cache: Option<&mut BlockCache>) -> Tensor<3> {
        let x = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rotary, mask, cache);
        let normed = self.post_attention_layernorm.forward(x.clone());
        let mlp = &self.mlp;
        // One fused pass on the CPU devices (burn_distill_loss::swiglu), composed elsewhere.
        x + project(
            &mlp.down_proj,
            swiglu(project(&mlp.gate_proj, normed.clone()), project(&mlp.up_proj, normed)),
        )
    }
}

impl Llama {
    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Next-token logits at every position of full sequences (causal attention, positions from
    /// 0; right padding is harmless to the positions before it).
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.head(self.forward_hidden(tokens))
    }

    /// The final normalised hidden states (what the head reads), for heads computed elsewhere,
    /// e.g. the chunked `LinearHeadKd` loss with [`Llama::head_weight`].
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`
    /// - output: `[batch, seq, width]`
    pub fn forward_hidden(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.run(tokens, None, None)
    }

    /// A smaller model of this one's blocks `blocks` (in that order), with its embedding, final
    /// norm, head and tokenizer: a student initialised from its teacher, DistilBERT-style (Sanh
    /// et al., 2019, took every other layer). The weights are copies; the two train apart.
    ///
    /// # Errors
    /// [`LlmError::Config`] for no block, a block index past the last, or one given twice (its
    /// parameters would be one parameter twice).
    pub fn with_blocks(&self, blocks: &[usize]) -> LlmResult<Self> {
        let layers = self.layers.len();
        let invalid = |value: String, reason: &str| LlmError::Config {
            field: "blocks",
            value,
            reason: reason.into(),
        };
        if blocks.is_empty() {
            return Err(invalid("[]".into(), "a model needs at least one block"));
        }
        if let Some(&index) = blocks.iter().find(|&&index| index >= layers) {
            return Err(invalid(
                format!("{blocks:?}"),
                &format!("block {index} does not exist: the model has blocks 0..{layers}"),
            ));
        }
        if let Some((i, _)) = blocks
            .iter()
            .enumerate()
            .find(|(i, index)| blocks[..*i].contains(index))
        {
            return Err(invalid(
                format!("{blocks:?}"),
                &format!("block {} is given twice", blocks[i]),
            ));
        }
        let mut config = self.config.clone();
        config.num_hidden_layers = blocks.len();
        // The student starts from the teacher's tensors; burn's tensors are immutable, so its
        // training replaces its own and leaves the teacher's as they are.
        Ok(Self {
            embed_tokens: self.embed_tokens.clone(),
            layers: blocks.iter().map(|&index| self.layers[index].clone()).collect(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            config,
        })
    }

    /// This model with `vocab` token ids, as transformers' `resize_token_embeddings`: rows past
    /// `vocab` of the token embedding (and of an untied head) are dropped, and each new row is
    /// the mean of the existing ones, so a new id starts as an average token (transformers'
    /// `mean_resizing`) rather than a random one that would dominate the softmax. For a student
    /// whose tokenizer is the teacher's with ids added or padded away.
    ///
    /// # Errors
    /// [`LlmError::Config`] for fewer than 2 ids.
    pub fn with_vocab_size(&self, vocab: usize) -> LlmResult<Self> {
        if vocab < 2 {
            return Err(LlmError::Config {
                field: "vocab_size",
                value: vocab.to_string(),
                reason: "a model needs at least 2 token ids".into(),
            });
        }
        let old = self.config.vocab_size;
        // `rows` is `[ids, width]`; the result has `vocab` rows.
        let resize = |rows: Tensor<2>| -> Tensor<2> {
            let [_, width] = rows.dims();
            if vocab <= old {
                rows.slice([0..vocab, 0..width])
            } else {
                let mean = rows.clone().mean_dim(0).repeat_dim(0, vocab - old);
                Tensor::cat(vec![rows, mean], 0)
            }
        };
        // New leaves: on an autodiff device, `resize`'s result is a node of the old parameters.
        let mut model = self.clone();
        model.embed_tokens.weight = Param::from_tensor(resize(self.embed_tokens.weight.val()).detach());
        if let Some(head) = &mut model.lm_head {
            // burn's Linear keeps `[width, vocab]`.
            head.weight = Param::from_tensor(resize(head.weight.val().transpose()).transpose().detach());
        }
        model.config.vocab_size = vocab;
        Ok(model)
    }

    /// The output head's weight as `[vocab, width]` (the token embedding when tied).
    pub fn head_weight(&self) -> Tensor<2> {
        match &self.lm_head {
            Some(head) => head.weight.val().transpose(),
            None => self.embed_tokens.weight.val(),
        }
    }

    /// Logits from final hidden states.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, width]`
    /// - output: `[batch, seq, vocab]`
    pub fn head(&self, hidden: Tensor<3>) -> Tensor<3> {
        // As one 2-D matmul: the batched 3-D product with a broadcast weight ran 30× slower
        // on flex (280 ms against 9 ms for SmolLM2's 576 × 49 152 head, one position).
        let [batch, seq, width] = hidden.dims();
        let flat = hidden.reshape([batch * seq, width]);
        let logits = match &self.lm_head {
            Some(head) => weight_matmul(flat, head.weight.val(), WeightLayout::InOut),
            None => weight_matmul(flat, self.embed_tokens.weight.val(), WeightLayout::OutIn),
        };
        logits.reshape([batch, seq, self.config.vocab_size])
    }

    /// One incremental step: runs `tokens` (the next `seq` slots of every row) against the
    /// keys and values in `cache`, appends theirs, and returns the final hidden states of the
    /// new slots. Prefill is the first call (the whole left-padded prompt), decoding one slot per
    /// call after it.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`, `batch` as the cache was made for
    /// - output: `[batch, seq, width]`
    ///
    /// # Errors
    /// [`LlmError::Generation`] when the batch differs from the cache's or the slots would
    /// pass the context length.
    pub fn forward_cached(&self, tokens: Tensor<2, Int>, cache: &mut LlamaCache) -> LlmResult<Tensor<3>> {
        let [batch, seq] = tokens.dims();
        if batch != cache.batch() || cache.layers.len() != self.layers.len() {
            return Err(LlmError::Generation {
                reason: format!(
                    "the cache was made for a batch of {} and {} blocks, given a batch of {batch} for {} blocks",
                    cache.batch(),
                    cache.layers.len(),
                    self.layers.len()
                ),
            });
        }
        let end = cache.len() + seq;
        if end > self.config.max_position_embeddings {
            return Err(LlmError::Generation {
                reason: format!(
                    "{end} slots would pass the context length {}",
                    self.config.max_position_embeddings
                ),
            });
        }
        Ok(self.run(tokens, Some(cache), None))
    }

    /// The shared forward pass: with a cache, the new slots' positions and mask come from it;
    /// without, positions start at 0 and attention is causal. Block outputs are kept when
    /// `taps` asks for them.
    fn run(
        &self,
        tokens: Tensor<2, Int>,
        mut cache: Option<&mut LlamaCache>,
        mut taps: Option<&mut Vec<Tensor<3>>>,
    ) -> Tensor<3> {
        let [batch, seq] = tokens.dims();
        let device = tokens.device();
        let (positions, mask) = match cache.as_deref() {
            Some(cache) => (cache.positions(seq), cache.mask()),
            None => (vec![(0..seq).collect::<Vec<_>>(); batch], CausalMask::causal()),
        };
        let rotary = Rotary::new(&self.config, &positions, &device);
        let mut x = self.embed_tokens.forward(tokens);
        for (index, block) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[index]);
            x = block.forward(x, &rotary, &mask, slot);
            if let Some(taps) = taps.as_deref_mut() {
                taps.push(x.clone());
            }
        }
        if let Some(cache) = cache {
            cache.advance(seq);
        }
        self.norm.forward(x)
    }
}

impl TappedForward<Tensor<2, Int>, 3> for Llama {
    fn forward_tapped(&self, tokens: Tensor<2, Int>) -> (Tensor<3>, Features) {
        let (hidden, _, features) = self.hidden_and_taps(tokens);
        (self.head(hidden), features)
    }

    fn num_classes(&self) -> usize {
        self.config.vocab_size
    }

    fn forward_hidden_tapped(&self, tokens: Tensor<2, Int>) -> Option<(Tensor<3>, Tensor<2>, Features)> {
        Some(self.hidden_and_taps(tokens))
    }
}

impl Llama {
    /// The final hidden states, the head weight and the taps (`block.{i}`, `hidden`).
    fn hidden_and_taps(&self, tokens: Tensor<2, Int>) -> (Tensor<3>, Tensor<2>, Features) {
        let mut blocks = Vec::with_capacity(self.layers.len());
        let hidden = self.run(tokens, None, Some(&mut blocks));
        let mut features = Features::new();
        for (index, block) in blocks.into_iter().enumerate() {
            features.insert(format!("block.{index}"), Feature::Sequence(block));
        }
        features.insert("hidden".to_string(), Feature::Sequence(hidden.clone()));
        (hidden, self.head_weight(), features)
    }
}

impl Cost for Llama {
    /// FLOPs for one sequence of `max_position_embeddings` tokens: per token and block the
    /// projections (`2 W (H + 2 K) d + 2 H d W`), the attention scores and weighted values over
    /// the full square (`4 · context · H d`), the SwiGLU (`6 W F`); then the head (`2 W V`).
    fn flops_per_example(&self) -> u64 {
        let c = &self.config;
        let (w, f, v, n) = (
            c.hidden_size as u64,
            c.intermediate_size as u64,
            c.vocab_size as u64,
            c.max_position_embeddings as u64,
        );
        let (h, k, d) = (c.num_attention_heads as u64, c.kv_heads() as u64, c.head_width() as u64);
        let per_token_block = 2 * w * (h + 2 * k) * d + 2 * h * d * w + 4 * n * h * d + 6 * w * f;
        n * (c.num_hidden_layers as u64 * per_token_block + 2 * w * v)
    }
}
