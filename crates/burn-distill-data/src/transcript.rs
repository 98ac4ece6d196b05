//! Sequence-level distillation data: a teacher's generated text, stored as JSONL, and the
//! dataset, batcher and [`Teacher`] that train a student on it.
//!
//! One line per [`Transcript`]: `{"prompt": "...", "completion": "..."}`. Token ids are the bytes
//! of the text (the byte-level models of this workspace); when the exact ids are not the text's
//! bytes (bytes that are not valid UTF-8, ids ≥ 256 from a larger vocabulary) they are stored in
//! `prompt_tokens` / `completion_tokens` and the text is for reading only.

use std::fs;
use std::io::Write;
use std::path::Path;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill_model::{Fingerprint, Fingerprinter, Generator, ModelError, SamplingConfig, Teacher, TeacherOutput};
use serde::{Deserialize, Serialize};

use crate::batch::{EpochAware, Fingerprinted, IGNORE_INDEX, Indexed};
use crate::error::{DataError, Result};
use crate::text::TokenBatch;

/// A prompt and a teacher's completion of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transcript {
    /// The prompt, as text.
    pub prompt: String,
    /// The completion, as text.
    pub completion: String,
    /// The prompt's token ids, when they are not the bytes of `prompt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<Vec<u32>>,
    /// The completion's token ids, when they are not the bytes of `completion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<Vec<u32>>,
}

impl Transcript {
    /// A transcript of plain text (token ids are its bytes).
    pub fn new(prompt: impl Into<String>, completion: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            completion: completion.into(),
            prompt_tokens: None,
            completion_tokens: None,
        }
    }

    /// A transcript of token ids; the text is their bytes when that is valid UTF-8 of ids
    /// below 256, else a lossy rendering kept for reading, with the ids stored exactly.
    pub fn from_tokens(prompt: &[u32], completion: &[u32]) -> Self {
        let (prompt, prompt_tokens) = text_of(prompt);
        let (completion, completion_tokens) = text_of(completion);
        Self {
            prompt,
            completion,
            prompt_tokens,
            completion_tokens,
        }
    }

    /// The prompt's token ids.
    pub fn prompt_ids(&self) -> Vec<u32> {
        ids_of(&self.prompt, self.prompt_tokens.as_deref())
    }

    /// The completion's token ids.
    pub fn completion_ids(&self) -> Vec<u32> {
        ids_of(&self.completion, self.completion_tokens.as_deref())
    }
}

fn text_of(tokens: &[u32]) -> (String, Option<Vec<u32>>) {
    let bytes: Option<Vec<u8>> = tokens.iter().map(|&token| u8::try_from(token).ok()).collect();
    match bytes.map(String::from_utf8) {
        Some(Ok(text)) => (text, None),
        Some(Err(error)) => (
            String::from_utf8_lossy(error.as_bytes()).into_owned(),
            Some(tokens.to_vec()),
        ),
        None => (
            tokens
                .iter()
                .map(|&token| char::from_u32(token).filter(|_| token < 128).unwrap_or('\u{FFFD}'))
                .collect(),
            Some(tokens.to_vec()),
        ),
    }
}

fn ids_of(text: &str, tokens: Option<&[u32]>) -> Vec<u32> {
    match tokens {
        Some(tokens) => tokens.to_vec(),
        None => text.bytes().map(u32::from).collect(),
    }
}

/// Writes `transcripts` as JSONL to `path`, through a temporary file renamed into place: an
/// existing file is replaced whole or not at all.
///
/// # Errors
/// [`DataError::Io`] when the file cannot be written.
pub fn write_transcripts(path: &Path, transcripts: &[Transcript]) -> Result<()> {
    write_jsonl(path, transcripts)
}

/// `items` as JSONL at `path` (its directory made if missing), through a temporary file renamed
/// into place.
pub(crate) fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let write = || -> std::io::Result<()> {
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        burn_distill_model::files::write_atomically(path, |file| {
            for item in items {
                serde_json::to_writer(&mut *file, item)?;
                file.write_all(b"\n")?;
            }
            Ok(())
        })
    };
    write().map_err(|error| DataError::io(path, error))
}

/// Reads a JSONL file of [`Transcript`]s (blank lines are skipped).
///
/// # Errors
/// [`DataError::Missing`] for a missing file, [`DataError::Corrupt`] naming the line for a line
/// that is not a transcript, [`DataError::Invalid`] for a file with none.
pub fn read_transcripts(path: &Path) -> Result<Vec<Transcript>> {
    if !path.exists() {
        return Err(DataError::Missing {
            path: path.to_path_buf(),
            what: "a JSONL file of transcripts".into(),
            hint: String::new(),
        });
    }
    let text = fs::read_to_string(path).map_err(|error| DataError::io(path, error))?;
    let mut transcripts = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let transcript: Transcript = serde_json::from_str(line).map_err(|error| DataError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("line {}: not a transcript ({error})", number + 1),
        })?;
        transcripts.push(transcript);
    }
    if transcripts.is_empty() {
        return Err(DataError::Invalid {
            what: format!("transcript file {}", path.display()),
            reason: "it holds no transcript".into(),
        });
    }
    Ok(transcripts)
}

/// Continues every prompt with `new_tokens` tokens sampled from `teacher` (temperature, top-k,
/// top-p per `sampling`), `batch_size` prompts at a time: the transfer set of sequence-level
/// distillation. Prompts of one batch must have one length; prompts are grouped by length.
///
/// The output is a function of the teacher's weights, the prompts, `sampling` (seed included)
/// and `batch_size`.
///
/// # Errors
/// [`DataError::Invalid`] for an empty prompt, a zero batch size, or prompts longer than the
/// teacher's context.
pub fn generate_transcripts<G: Generator>(
    teacher: &G,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    sampling: &SamplingConfig,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Transcript>> {
    let invalid = |reason: String| DataError::Invalid {
        what: "generation".into(),
        reason,
    };
    if batch_size == 0 {
        return Err(invalid("batch_size must be at least 1".into()));
    }
    if let Some(index) = prompts.iter().position(Vec::is_empty) {
        return Err(invalid(format!("prompt {index} is empty")));
    }
    if let Some(index) = prompts.iter().position(|prompt| prompt.len() > teacher.context()) {
        return Err(invalid(format!(
            "prompt {index} has {} tokens, more than the teacher's context of {}",
            prompts[index].len(),
            teacher.context()
        )));
    }
    let mut out: Vec<Option<Transcript>> = vec![None; prompts.len()];
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&index| (prompts[index].len(), index));
    for group in order.chunk_by(|&a, &b| prompts[a].len() == prompts[b].len()) {
        for chunk in group.chunks(batch_size) {
            let length = prompts[chunk[0]].len();
            let flat: Vec<i64> = chunk
                .iter()
                .flat_map(|&index| prompts[index].iter().map(|&token| i64::from(token)))
                .collect();
            let prompt = Tensor::<2, Int>::from_data(TensorData::new(flat, [chunk.len(), length]), device);
            let batch_sampling = SamplingConfig {
                seed: sampling
                    .seed
                    .wrapping_add((chunk[0] as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                ..sampling.clone()
            };
            let generated = teacher.generate(prompt, new_tokens, &batch_sampling);
            let host: Vec<i64> = generated.into_data().iter::<i64>().collect();
            for (&index, row) in chunk.iter().zip(host.chunks(length + new_tokens)) {
                let completion: Vec<u32> = row[length..].iter().map(|&token| token as u32).collect();
                out[index] = Some(Transcript::from_tokens(&prompts[index], &completion));
            }
        }
    }
    Ok(out.into_iter().map(|t| t.expect("every prompt generated")).collect())
}

/// One transcript as training tokens: `tokens[j + 1]` is the target after `tokens[..=j]`;
/// targets before `loss_from` (the prompt) do not count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceItem {
    /// Prompt and completion tokens, at most `context + 1`.
    pub tokens: Vec<u32>,
    /// The first target position that counts (`prompt length − 1`, or 0 to train on prompts).
    pub loss_from: usize,
    /// The transcript's index in its file.
    pub index: usize,
}

impl Indexed for SequenceItem {
    fn index(&self) -> usize {
        self.index
    }
}

/// [`Transcript`]s as a burn `Dataset` of [`SequenceItem`]s of at most `context + 1` tokens
/// (longer ones are cut at the end).
#[derive(Debug, Clone)]
pub struct TranscriptDataset {
    items: Vec<SequenceItem>,
    vocab: usize,
    fingerprint: Fingerprint,
}

impl TranscriptDataset {
    /// The dataset of `transcripts` for a model of `context` tokens over `vocab` ids; with
    /// `train_on_prompt` false only completion tokens are targets.
    ///
    /// # Errors
    /// [`DataError::Invalid`] for a token id `≥ vocab`, a transcript with fewer than two tokens,
    /// or one whose prompt fills the whole context.
    pub fn new(transcripts: &[Transcript], context: usize, vocab: usize, train_on_prompt: bool) -> Result<Self> {
        let mut items = Vec::with_capacity(transcripts.len());
        let mut hasher = Fingerprinter::new("transcripts");
        hasher.update_u64(context as u64).update_u64(u64::from(train_on_prompt));
        for (index, transcript) in transcripts.iter().enumerate() {
            let invalid = |reason: String| DataError::Invalid {
                what: format!("transcript {index}"),
                reason,
            };
            let prompt = transcript.prompt_ids();
            let mut tokens = prompt.clone();
            tokens.extend(transcript.completion_ids());
            if let Some(&token) = tokens.iter().find(|&&token| token as usize >= vocab) {
                return Err(invalid(format!(
                    "token id {token} is outside the vocabulary of {vocab}"
                )));
            }
            tokens.truncate(context + 1);
            if tokens.len() < 2 {
                return Err(invalid("it has fewer than two tokens: nothing to predict".into()));
            }
            let loss_from = if train_on_prompt {
                0
            } else {
                prompt.len().saturating_sub(1)
            };
            if loss_from >= tokens.len() - 1 {
                return Err(invalid(format!(
                    "its prompt of {} tokens leaves no completion token within the context of {context}",
                    prompt.len()
                )));
            }
            hasher.update_u64(tokens.len() as u64).update_u64(loss_from as u64);
            for token in &tokens {
                hasher.update(&token.to_le_bytes());
            }
            items.push(SequenceItem {
                tokens,
                loss_from,
                index,
            });
        }
        Ok(Self {
            items,
            vocab,
            fingerprint: hasher.finish(),
        })
    }

    /// The vocabulary size the ids were checked against.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Target tokens the loss counts, over all items.
    pub fn target_tokens(&self) -> usize {
        self.items
            .iter()
            .map(|item| item.tokens.len() - 1 - item.loss_from)
            .sum()
    }
}

impl Dataset<SequenceItem> for TranscriptDataset {
    fn get(&self, index: usize) -> core::result::Result<SequenceItem, DatasetError> {
        assert!(
            index < self.items.len(),
            "index out of bounds for transcripts: {index} >= {}",
            self.items.len()
        );
        Ok(self.items[index].clone())
    }

    fn len(&self) -> usize {
        self.items.len()
    }
}

impl Fingerprinted for TranscriptDataset {
    fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

/// Batches [`SequenceItem`]s of different lengths into a [`TokenBatch`]: padded on the right to
/// the longest with `pad`, whose targets (and the prompts') are [`IGNORE_INDEX`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SequenceBatcher {
    /// The input id written into padding (never a target).
    pub pad: u32,
    /// Pads every batch to at least this many positions: a teacher-output cache needs one
    /// length for all its batches (give it the dataset's longest).
    pub length: Option<usize>,
}

impl EpochAware for SequenceBatcher {}

impl Batcher<SequenceItem, TokenBatch> for SequenceBatcher {
    fn batch(&self, items: Vec<SequenceItem>, device: &Device) -> TokenBatch {
        assert!(!items.is_empty(), "cannot batch zero sequences");
        let longest = items.iter().map(|item| item.tokens.len() - 1).max().unwrap_or(1);
        let length = longest.max(self.length.unwrap_or(0));
        let mut inputs = Vec::with_capacity(items.len() * length);
        let mut targets = Vec::with_capacity(items.len() * length);
        for item in &items {
            let steps = item.tokens.len() - 1;
            for position in 0..length {
                if position < steps {
                    inputs.push(i64::from(item.tokens[position]));
                    targets.push(if position < item.loss_from {
                        IGNORE_INDEX
                    } else {
                        i64::from(item.tokens[position + 1])
                    });
                } else {
                    inputs.push(i64::from(self.pad));
                    targets.push(IGNORE_INDEX);
                }
            }
        }
        let batch = items.len();
        TokenBatch {
            inputs: Tensor::from_data(TensorData::new(inputs, [batch, length]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, length]), device),
            indices: items.iter().map(|item| item.index).collect(),
        }
    }
}

/// A [`Teacher`] made of text a teacher already wrote, with no teacher model: at each position of
/// a transcript it puts probability `1 − ε` on the transcript's next token and `ε` spread
/// uniformly over the vocabulary (`ε = smoothing`). With `ε = 0`, forward KL to it is the
/// cross-entropy on the transcript; with `ε > 0` every divergence (reverse KL, JSD, TVD) is
/// finite.
///
/// It answers by transcript index ([`Teacher::needs_indices`]) and checks that each input row
/// is its transcript's tokens; padding positions get uniform logits (they are masked).
#[derive(Debug, Clone)]
pub struct TranscriptTeacher<'d> {
    dataset: &'d TranscriptDataset,
    smoothing: f64,
}

impl<'d> TranscriptTeacher<'d> {
    /// The teacher of `dataset`'s transcripts with label smoothing `smoothing`.
    ///
    /// # Panics
    /// For `smoothing` outside `[0, 1)`.
    pub fn new(dataset: &'d TranscriptDataset, smoothing: f64) -> Self {
        assert!(
            (0.0..1.0).contains(&smoothing),
            "TranscriptTeacher: smoothing = {smoothing} must be in [0, 1)"
        );
        Self { dataset, smoothing }
    }

    fn failed(reason: String) -> ModelError {
        ModelError::TeacherFailed {
            teacher: "TranscriptTeacher".into(),
            reason,
        }
    }
}

impl Teacher<Tensor<2, Int>, 3> for TranscriptTeacher<'_> {
    fn teach(&self, _input: Tensor<2, Int>, _taps: &[&str]) -> burn_distill_model::Result<TeacherOutput<3>> {
        Err(ModelError::Unsupported {
            teacher: "TranscriptTeacher".into(),
            reason: "it answers by transcript index: call teach_examples (training loops do)".into(),
        })
    }

    fn teach_examples(
        &self,
        input: Tensor<2, Int>,
        indices: &[usize],
        taps: &[&str],
    ) -> burn_distill_model::Result<TeacherOutput<3>> {
        if let Some(tap) = taps.first() {
            return Err(ModelError::UnknownTap {
                name: (*tap).to_string(),
                available: vec![],
            });
        }
        let [rows, length] = input.dims();
        if rows != indices.len() {
            return Err(Self::failed(format!("{rows} input rows but {} indices", indices.len())));
        }
        let device = input.device().without_autodiff();
        let host: Vec<i64> = input.into_data().iter::<i64>().collect();
        let vocab = self.dataset.vocab;
        let low = (self.smoothing / vocab as f64).ln() as f32;
        let high = (1.0 - self.smoothing + self.smoothing / vocab as f64).ln() as f32;
        let mut logits = vec![0.0f32; rows * length * vocab];
        for (row, &index) in indices.iter().enumerate() {
            let item = self.dataset.items.get(index).ok_or_else(|| {
                Self::failed(format!(
                    "index {index} is outside the {} transcripts",
                    self.dataset.len()
                ))
            })?;
            let steps = (item.tokens.len() - 1).min(length);
            let given = &host[row * length..row * length + steps];
            if given.iter().zip(&item.tokens).any(|(&a, &b)| a != i64::from(b)) {
                return Err(Self::failed(format!(
                    "input row {row} is not transcript {index}: the batch does not come from this teacher's dataset"
                )));
            }
            for position in 0..steps {
                let base = (row * length + position) * vocab;
                logits[base..base + vocab].fill(low);
                logits[base + item.tokens[position + 1] as usize] = high;
            }
        }
        let logits = Tensor::from_data(TensorData::new(logits, [rows, length, vocab]), &device);
        Ok(TeacherOutput::new(logits, Default::default()))
    }

    fn num_classes(&self) -> usize {
        self.dataset.vocab
    }

    fn needs_indices(&self) -> bool {
        true
    }

    fn fingerprint(&self) -> Option<Fingerprint> {
        let mut hasher = Fingerprinter::new("transcript-teacher");
        hasher
            .update_fingerprint(self.dataset.fingerprint)
            .update(&self.smoothing.to_le_bytes());
        Some(hasher.finish())
    }
}
