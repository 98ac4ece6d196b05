//! Generation with the KV cache: batches of prompts of different lengths, greedy or sampled,
//! stopping at EOS, stop strings or a token limit, streaming token by token.

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};

use crate::llm::cache::LlamaCache;
use crate::llm::error::{LlmError, LlmResult};
use crate::llm::llama::Llama;
use crate::llm::tokenizer::ChatTokenizer;
use crate::sampling::{Generator, SamplingConfig, TokenRng, sample_token};

/// How to continue prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// The most new tokens per row.
    pub max_new_tokens: usize,
    /// Temperature (0 is greedy), top-k, top-p, seed.
    pub sampling: SamplingConfig,
    /// Tokens that end a row (EOS); the stop token is kept in the output.
    pub stop_tokens: Vec<u32>,
    /// `Some(k)`: record each chosen token's log-probability and the `k` most likely tokens at
    /// its position ([`Generation::logprobs`]), as OpenAI's `logprobs` / `top_logprobs` do.
    pub logprobs: Option<usize>,
}

impl GenerateOptions {
    /// Greedy decoding of at most `max_new_tokens`, no stop tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            sampling: SamplingConfig::new().with_temperature(0.0),
            stop_tokens: Vec::new(),
            logprobs: None,
        }
    }
}

/// A chosen token's log-probability and the most likely tokens at its position: log-softmax of
/// the raw logits (temperature 1, before top-k / top-p), whatever the sampling temperature, as
/// OpenAI's API and vLLM report them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// The log-probabilities of `token` and of the `k` most likely ids of one row of logits.
    pub fn of(logits: &[f32], token: u32, k: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
        let log_z = max + sum.ln() as f32;
        let k = k.min(logits.len());
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if k > 0 && k < ids.len() {
            ids.select_nth_unstable_by(k - 1, order);
        }
        ids.truncate(k);
        ids.sort_unstable_by(order);
        Self {
            token,
            logprob: logits[token as usize] - log_z,
            top: ids.into_iter().map(|id| (id, logits[id as usize] - log_z)).collect(),
        }
    }
}

/// Stop strings checked against a growing text: where the first one starts, and how much of the
/// text's end could still become one (to hold back while streaming).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStrings(Vec<String>);

impl StopStrings {
    /// The non-empty strings of `stops`.
    pub fn new(stops: &[String]) -> Self {
        Self(stops.iter().filter(|s| !s.is_empty()).cloned().collect())
    }

    /// Where the first stop string starts in `text`, if one occurs.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.0.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// How many bytes at the end of `text` could be the start of a stop string.
    pub fn held_back(&self, text: &str) -> usize {
        self.0
            .iter()
            .flat_map(|stop| {
                (1..stop.len())
                    .filter(|&k| stop.is_char_boundary(k))
                    .map(move |k| &stop[..k])
            })
            .filter(|prefix| text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced a stop token.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
    /// The caller's callback ended it (a stop string, say).
    Callback,
}

/// One row's continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new tokens (the stop token included when there was one).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// One entry per token when [`GenerateOptions::logprobs`] asked for them, else empty.
    pub logprobs: Vec<TokenLogprobs>,
}

/// Timings of one [`Llama::generate`] call, for tokens/s figures.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GenerationTimings {
    /// Prompt tokens run in the prefill (padding excluded).
    pub prompt_tokens: usize,
    /// Seconds the prefill took.
    pub prefill_seconds: f64,
    /// Tokens produced after the first (each one decoding step per row).
    pub decode_tokens: usize,
    /// Seconds the decoding steps took.
    pub decode_seconds: f64,
}

impl Llama {
    /// Continues each prompt: one prefill over the left-padded batch, then one cached step per
    /// new token. `on_token(row, token)` sees every token as it is chosen and returns `false` to
    /// end that row (how stop strings are checked); finished rows stop being reported.
    ///
    /// The same weights, prompts and options (seed included) give the same tokens; row `r`
    /// draws from its own stream, seeded from the seed and `r`.
    ///
    /// # Errors
    /// [`LlmError::Generation`] for an empty prompt list, an empty prompt, a token outside the
    /// vocabulary, or a prompt plus `max_new_tokens` longer than the context; checked before
    /// anything runs.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        mut on_token: impl FnMut(usize, u32) -> bool,
    ) -> LlmResult<(Vec<Generation>, GenerationTimings)> {
        self.generate_stream(prompts, options, |row, token, _| on_token(row, token))
    }

    /// [`Llama::generate`], with each token's log-probabilities (when
    /// [`GenerateOptions::logprobs`] asks for them) passed to `on_token` as it is chosen: what a
    /// server streams.
    ///
    /// # Errors
    /// As [`Llama::generate`].
    pub fn generate_stream(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        mut on_token: impl FnMut(usize, u32, Option<&TokenLogprobs>) -> bool,
    ) -> LlmResult<(Vec<Generation>, GenerationTimings)> {
        let config = self.config();
        let generation_error = |reason: String| Err(LlmError::Generation { reason });
        if prompts.is_empty() {
            return generation_error("no prompts".into());
        }
        if let Some(row) = prompts.iter().position(Vec::is_empty) {
            return generation_error(format!("prompt {row} is empty"));
        }
        let vocab = config.vocab_size;
        if let Some((row, token)) = prompts
            .iter()
            .enumerate()
            .find_map(|(row, p)| p.iter().find(|&&t| t as usize >= vocab).map(|&t| (row, t)))
        {
            return generation_error(format!("prompt {row} has token {token}, the vocabulary has {vocab}"));
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if longest + options.max_new_tokens > config.max_position_embeddings {
            return generation_error(format!(
                "a prompt of {longest} tokens plus {} new ones passes the context length {}",
                options.max_new_tokens, config.max_position_embeddings
            ));
        }
        if let Err(reason) = options.sampling.check() {
            return generation_error(format!("sampling: {reason}"));
        }
        let batch = prompts.len();
        let model = self.valid();
        let device = model.embed_tokens.weight.val().device();
        let padding: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
        let mut cache = LlamaCache::new(config.num_hidden_layers, padding.clone());
        let mut rngs: Vec<TokenRng> = (0..batch)
            .map(|row| {
                TokenRng::new(
                    options
                        .sampling
                        .seed
                        .wrapping_add(row as u64)
                        .wrapping_mul(0x2545_F491_4F6C_DD1D),
                )
            })
            .collect();
        let mut outputs: Vec<Generation> = (0..batch)
            .map(|_| Generation {
                tokens: Vec::new(),
                finish: FinishReason::Length,
                logprobs: Vec::new(),
            })
            .collect();
        let mut done = vec![options.max_new_tokens == 0; batch];
        let mut timings = GenerationTimings {
            prompt_tokens: prompts.iter().map(Vec::len).sum(),
            ..Default::default()
        };
        // Padding slots hold token 0; nothing attends to them.
        let mut input: Vec<i64> = prompts
            .iter()
            .zip(&padding)
            .flat_map(|(p, &pad)| std::iter::repeat_n(0, pad).chain(p.iter().map(|&t| i64::from(t))))
            .collect();
        let mut step_len = longest;
        let mut step = 0;
        while done.iter().any(|d| !d) {
            let started = std::time::Instant::now();
            let tokens = Tensor::<2, Int>::from_data(TensorData::new(input, [batch, step_len]), &device);
            let hidden = model.forward_cached(tokens, &mut cache)?;
            let width = hidden.dims()[2];
            let last = hidden.slice([0..batch, step_len - 1..step_len, 0..width]);
            let logits: Vec<f32> = model.head(last).into_data().iter::<f32>().collect();
            let seconds = started.elapsed().as_secs_f64();
            if step == 0 {
                timings.prefill_seconds = seconds;
            } else {
                timings.decode_seconds += seconds;
                timings.decode_tokens += done.iter().filter(|d| !**d).count();
            }
            let mut next = Vec::with_capacity(batch);
            for row in 0..batch {
                let previous = outputs[row].tokens.last().copied().unwrap_or(0);
                if done[row] {
                    next.push(i64::from(previous));
                    continue;
                }
                let row_logits = &logits[row * vocab..(row + 1) * vocab];
                let token = sample_token(row_logits, &options.sampling, &mut rngs[row]) as u32;
                let logprobs = options.logprobs.map(|k| TokenLogprobs::of(row_logits, token, k));
                outputs[row].tokens.push(token);
                next.push(i64::from(token));
                let go_on = on_token(row, token, logprobs.as_ref());
                outputs[row].logprobs.extend(logprobs);
                if options.stop_tokens.contains(&token) {
                    outputs[row].finish = FinishReason::Stop;
                    done[row] = true;
                } else if !go_on {
                    outputs[row].finish = FinishReason::Callback;
                    done[row] = true;
                } else if outputs[row].tokens.len() >= options.max_new_tokens {
                    done[row] = true;
                }
            }
            input = next;
            step_len = 1;
            step += 1;
        }
        Ok((outputs, timings))
    }

    /// Answers chat prompts: each conversation rendered with the model's chat template, then
    /// generated until an EOS id of `tokenizer`, one of `stop_strings` (cut from the text), or
    /// `max_new_tokens`. `on_text(row, piece)` streams each row's text as it completes.
    ///
    /// # Errors
    /// As [`ChatTokenizer::encode_chat`] and [`Llama::generate`].
    pub fn chat(
        &self,
        tokenizer: &ChatTokenizer,
        conversations: &[Vec<crate::llm::ChatMessage>],
        options: &GenerateOptions,
        stop_strings: &[String],
        mut on_text: impl FnMut(usize, &str),
    ) -> LlmResult<(Vec<ChatAnswer>, GenerationTimings)> {
        let prompts = conversations
            .iter()
            .map(|messages| tokenizer.encode_chat(messages, true))
            .collect::<LlmResult<Vec<_>>>()?;
        let mut options = options.clone();
        options.stop_tokens.extend_from_slice(tokenizer.eos_ids());
        let rows = prompts.len();
        let mut streams: Vec<_> = (0..rows).map(|_| tokenizer.decode_stream()).collect();
        // Per row: the text streamed so far, and how much of it `on_text` has seen. The tail
        // that could still become a stop string is held back until it cannot.
        let mut texts = vec![String::new(); rows];
        let mut shown = vec![0; rows];
        let mut failure = None;
        let stops = StopStrings::new(stop_strings);
        let (generations, timings) = self.generate(&prompts, &options, |row, token| {
            let piece = match streams[row].push(token) {
                Ok(piece) => piece,
                Err(error) => {
                    failure.get_or_insert(error);
                    return false;
                }
            };
            let text = &mut texts[row];
            text.push_str(&piece);
            let (visible, go_on) = match stops.find(text) {
                Some(cut) => {
                    text.truncate(cut);
                    (cut, false)
                }
                None => (text.len() - stops.held_back(text), true),
            };
            if visible > shown[row] {
                on_text(row, &text[shown[row]..visible]);
                shown[row] = visible;
            }
            go_on
        })?;
        if let Some(error) = failure {
            return Err(error);
        }
        let mut answers = Vec::with_capacity(rows);
        for (row, ((generation, mut text), prompt)) in generations.into_iter().zip(texts).zip(prompts).enumerate() {
            if generation.finish != FinishReason::Callback {
                // The whole answer, decoded at once (a character the stream still held is in it).
                let tokens: Vec<u32> = generation
                    .tokens
                    .iter()
                    .copied()
                    .filter(|t| !options.stop_tokens.contains(t))
                    .collect();
                text = tokenizer.decode(&tokens, true)?;
            }
            if let Some(rest) = text.get(shown[row]..).filter(|rest| !rest.is_empty()) {
                on_text(row, rest);
            }
            answers.push(ChatAnswer {
                prompt_tokens: prompt,
                text,
                generation,
            });
        }
        Ok((answers, timings))
    }
}

/// The answer to one conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatAnswer {
    /// The rendered prompt's tokens.
    pub prompt_tokens: Vec<u32>,
    /// The answer's text (stop strings and EOS removed).
    pub text: String,
    /// The answer's tokens and why it ended.
    pub generation: Generation,
}

impl Generator for Llama {
    /// Continues each row by exactly `new_tokens` tokens with the KV cache (no stop tokens);
    /// rows are full prompts of equal length.
    ///
    /// # Panics
    /// When a prompt plus `new_tokens` passes the context length, or a token is out of range.
    fn generate(&self, prompt: Tensor<2, Int>, new_tokens: usize, sampling: &SamplingConfig) -> Tensor<2, Int> {
        sampling.validate();
        let device = prompt.device();
        let [batch, len] = prompt.dims();
        let flat: Vec<i64> = prompt.into_data().iter::<i64>().collect();
        let prompts: Vec<Vec<u32>> = flat
            .chunks(len)
            .map(|r| r.iter().map(|&t| t as u32).collect())
            .collect();
        let options = GenerateOptions {
            max_new_tokens: new_tokens,
            sampling: sampling.clone(),
            stop_tokens: Vec::new(),
            logprobs: None,
        };
        let (generations, _) = Llama::generate(self, &prompts, &options, |_, _| true)
            .unwrap_or_else(|error| panic!("Llama::generate: {error}"));
        let rows: Vec<i64> = prompts
            .iter()
            .zip(&generations)
            .flat_map(|(p, g)| p.iter().chain(&g.tokens).map(|&t| i64::from(t)))
            .collect();
        Tensor::from_data(TensorData::new(rows, [batch, len + new_tokens]), &device)
    }

    /// All rows at once with the KV cache, left-padded, each stopping at its own stop token.
    fn generate_rows(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        sampling: &SamplingConfig,
        stop_tokens: &[u32],
        _device: &burn::tensor::Device,
    ) -> Vec<Vec<u32>> {
        sampling.validate();
        let options = GenerateOptions {
            max_new_tokens,
            sampling: sampling.clone(),
            stop_tokens: stop_tokens.to_vec(),
            logprobs: None,
        };
        let (generations, _) = Llama::generate(self, prompts, &options, |_, _| true)
            .unwrap_or_else(|error| panic!("Llama::generate: {error}"));
        generations.into_iter().map(|generation| generation.tokens).collect()
    }

    fn vocab(&self) -> usize {
        self.config().vocab_size
    }

    fn context(&self) -> usize {
        self.config().max_position_embeddings
    }
}
