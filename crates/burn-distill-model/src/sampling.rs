//! Sampling the next token from logits: temperature, top-k, top-p, seeded.

use burn::config::Config;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// How to pick the next token.
///
/// | Name | Default | Purpose | Range |
/// |---|---|---|---|
/// | `temperature` | 1.0 | divide the logits; 0 means greedy (arg max) | `≥ 0` |
/// | `top_k` | none | keep only the k most likely tokens | `≥ 1` |
/// | `top_p` | none | keep the smallest set of most likely tokens whose probability reaches p (nucleus) | `(0, 1]` |
/// | `seed` | 0 | the random stream; the same seed gives the same text | |
#[derive(Config, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Temperature; 0 is greedy decoding.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Keep the `k` most likely tokens.
    #[config(default = "None")]
    pub top_k: Option<usize>,
    /// Keep the most likely tokens up to cumulative probability `p`.
    #[config(default = "None")]
    pub top_p: Option<f64>,
    /// Seed of the random stream.
    #[config(default = 0)]
    pub seed: u64,
}

impl SamplingConfig {
    /// Checks the ranges.
    ///
    /// # Panics
    /// For a negative or non-finite temperature, `top_k = 0`, or `top_p` outside `(0, 1]`.
    pub fn validate(&self) {
        if let Err(reason) = self.check() {
            panic!("SamplingConfig: {reason}");
        }
    }

    /// Checks the ranges, naming the first field out of range.
    ///
    /// # Errors
    /// A sentence naming the field: a negative or non-finite temperature, `top_k = 0`, or
    /// `top_p` outside `(0, 1]`.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("temperature = {} must be finite and >= 0", self.temperature));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be >= 1".into());
        }
        match self.top_p {
            Some(p) if !(p > 0.0 && p <= 1.0) => Err(format!("top_p = {p} must be in (0, 1]")),
            _ => Ok(()),
        }
    }
}

/// A small, seeded random stream (SplitMix64): reproducible on every platform.
#[derive(Debug, Clone)]
pub struct TokenRng {
    state: u64,
}

impl TokenRng {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A uniform draw in `[0, 1)`.
    pub fn next_unit(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The probabilities `sample_token` draws from: temperature, then top-k, then top-p, then
/// renormalised. Index `i` is token `i`; removed tokens have probability 0.
pub fn sampling_distribution(logits: &[f32], config: &SamplingConfig) -> Vec<f64> {
    config.validate();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let mut probabilities = vec![0.0; logits.len()];
    if config.temperature == 0.0 || order.is_empty() {
        if let Some(&best) = order.first() {
            probabilities[best] = 1.0;
        }
        return probabilities;
    }
    let best = f64::from(logits[order[0]]);
    let keep = config.top_k.unwrap_or(order.len()).min(order.len());
    let weights: Vec<f64> = order[..keep]
        .iter()
        .map(|&i| ((f64::from(logits[i]) - best) / config.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut kept = keep;
    if let Some(p) = config.top_p {
        let mut cumulative = 0.0;
        for (rank, weight) in weights.iter().enumerate() {
            cumulative += weight / total;
            if cumulative >= p {
                kept = rank + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..kept].iter().sum();
    for (&token, weight) in order[..kept].iter().zip(&weights) {
        probabilities[token] = weight / kept_total;
    }
    probabilities
}

/// Draws a token from `logits` with `config`, advancing `rng` by one draw.
pub fn sample_token(logits: &[f32], config: &SamplingConfig, rng: &mut TokenRng) -> usize {
    if config.temperature == 0.0 {
        // Greedy: the arg max, the lowest index among equals (the token `sampling_distribution`
        // gives probability 1), without sorting the vocabulary; the draw is taken all the same,
        // so the stream stays where the sorting path leaves it.
        config.validate();
        rng.next_unit();
        return (0..logits.len())
            .reduce(|best, i| {
                if logits[i].total_cmp(&logits[best]).is_gt() {
                    i
                } else {
                    best
                }
            })
            .unwrap_or(0);
    }
    let probabilities = sampling_distribution(logits, config);
    let draw = rng.next_unit();
    let mut cumulative = 0.0;
    let mut last = 0;
    for (token, p) in probabilities.iter().enumerate() {
        if *p > 0.0 {
            cumulative += p;
            last = token;
            if draw < cumulative {
                return token;
            }
        }
    }
    last
}

/// A model that continues token sequences: what sequence-level distillation (a teacher writing a
/// transfer set) and on-policy distillation (the student writing the sequences it is scored on)
/// need. [`TransformerLm`](crate::TransformerLm) is one.
pub trait Generator {
    /// Continues each prompt row by `new_tokens` tokens sampled per `sampling`, in inference mode
    /// (no dropout, no autodiff). The same weights, prompt and config (seed included) give the
    /// same tokens.
    ///
    /// # Shapes
    /// - prompt: `[batch, prompt_len]`, at least one token per row
    /// - output: `[batch, prompt_len + new_tokens]`, on the prompt's device
    fn generate(&self, prompt: Tensor<2, Int>, new_tokens: usize, sampling: &SamplingConfig) -> Tensor<2, Int>;

    /// Continues prompts of different lengths, each by at most `max_new_tokens`, a row ending
    /// at its first token in `stop_tokens` (kept); returns each row's new tokens. The default
    /// runs [`generate`](Self::generate) on the rows of each prompt length (each group with its
    /// own stream) and cuts at the stop tokens; a model with a KV cache over left-padded
    /// batches (the `Llama`) answers them all at once.
    ///
    /// # Panics
    /// As [`generate`](Self::generate), and for an empty prompt.
    fn generate_rows(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        sampling: &SamplingConfig,
        stop_tokens: &[u32],
        device: &Device,
    ) -> Vec<Vec<u32>> {
        let mut out = vec![Vec::new(); prompts.len()];
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&row| (prompts[row].len(), row));
        for group in order.chunk_by(|&a, &b| prompts[a].len() == prompts[b].len()) {
            let length = prompts[group[0]].len();
            assert!(length > 0, "generate_rows: prompt {} is empty", group[0]);
            let flat: Vec<i64> = group
                .iter()
                .flat_map(|&row| prompts[row].iter().map(|&token| i64::from(token)))
                .collect();
            let prompt = Tensor::<2, Int>::from_data(TensorData::new(flat, [group.len(), length]), device);
            let group_sampling = SamplingConfig {
                seed: sampling
                    .seed
                    .wrapping_add((group[0] as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                ..sampling.clone()
            };
            let generated: Vec<i64> = self
                .generate(prompt, max_new_tokens, &group_sampling)
                .into_data()
                .iter::<i64>()
                .collect();
            for (&row, tokens) in group.iter().zip(generated.chunks(length + max_new_tokens)) {
                let new = &tokens[length..];
                let end = new
                    .iter()
                    .position(|&token| stop_tokens.contains(&(token as u32)))
                    .map_or(new.len(), |stop| stop + 1);
                out[row] = new[..end].iter().map(|&token| token as u32).collect();
            }
        }
        out
    }

    /// The vocabulary size.
    fn vocab(&self) -> usize;

    /// The longest input the model attends to at once.
    fn context(&self) -> usize;
}
