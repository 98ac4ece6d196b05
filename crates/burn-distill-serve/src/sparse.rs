//! From a harvested transfer set to a student's training data: the answers as token ids of the
//! student's tokenizer (sequence-level distillation), and the served top log-probabilities as
//! a sparse teacher (a top-k cache, token-level distillation).
//!
//! An API names tokens by their text (and, where it can, their bytes), not by id. They are
//! mapped to the student's ids through its vocabulary: by exact bytes when the server sends
//! them, else by text. The mapping is checked, not assumed: a served token the student's
//! vocabulary does not have, or answer tokens whose ids do not spell the answer's text, refuse
//! the token-level path ([`ServeError::TokenizerMismatch`]); the sequence-level path, which
//! re-tokenizes the text, still works.

use std::collections::HashMap;
use std::path::Path;

use burn_distill_data::{CacheReport, ChatTranscript, TranscriptDataset, write_top_k_cache};
use burn_distill_model::Fingerprint;
use burn_distill_model::llm::ChatTokenizer;

use crate::api::TokenLogprob;
use crate::error::{Result, ServeError};
use crate::transfer::{Api, Record, TransferSet};

/// What a served token maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Exactly one id.
    Id(u32),
    /// Several ids stand for the same text (byte tokens that are part of a character, when the
    /// server sends no bytes).
    Ambiguous,
    /// No id: the served tokenizer is not the student's.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
enum Candidates {
    One(u32),
    Many,
}

/// The student's vocabulary by bytes and by text.
#[derive(Debug, Clone)]
pub struct TokenMap {
    by_bytes: HashMap<Vec<u8>, Candidates>,
    by_text: HashMap<String, Candidates>,
}

/// Text as a server that cannot send bytes writes a token: invalid UTF-8 replaced by U+FFFD
/// (Rust, vLLM) or dropped (llama.cpp's `errors="ignore"`). Both forms are looked up.
fn text_forms(bytes: &[u8]) -> Vec<String> {
    let lossy = String::from_utf8_lossy(bytes).into_owned();
    let mut dropped = String::new();
    for chunk in bytes.utf8_chunks() {
        dropped.push_str(chunk.valid());
    }
    if dropped == lossy {
        vec![lossy]
    } else {
        vec![lossy, dropped]
    }
}

impl TokenMap {
    /// The map of `tokenizer`'s whole vocabulary.
    pub fn new(tokenizer: &ChatTokenizer) -> Self {
        fn insert<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Candidates>, key: K, id: u32) {
            map.entry(key)
                .and_modify(|c| *c = Candidates::Many)
                .or_insert(Candidates::One(id));
        }
        let mut by_bytes = HashMap::new();
        let mut by_text = HashMap::new();
        for (id, bytes) in tokenizer.vocabulary_bytes().into_iter().enumerate() {
            let id = id as u32;
            for text in text_forms(&bytes) {
                insert(&mut by_text, text, id);
            }
            insert(&mut by_bytes, bytes, id);
        }
        Self { by_bytes, by_text }
    }

    /// The id of a served token: by `bytes` when given, else by its text.
    pub fn lookup(&self, token: &str, bytes: Option<&[u8]>) -> Lookup {
        let found = match bytes {
            Some(bytes) => self.by_bytes.get(bytes),
            None => self.by_text.get(token),
        };
        match found {
            Some(Candidates::One(id)) => Lookup::Id(*id),
            Some(Candidates::Many) => Lookup::Ambiguous,
            None => Lookup::Unknown,
        }
    }
}

/// The prompt's ids as the student reads it: the chat template rendered (chat API), or the
/// text with the tokenizer's own special tokens (completions API).
fn prompt_ids(record: &Record, api: Api, tokenizer: &ChatTokenizer) -> Result<Vec<u32>> {
    Ok(match api {
        Api::Chat => tokenizer.encode_chat(&record.messages, true)?,
        Api::Completions => tokenizer.encode(&record.messages[0].content, true)?,
    })
}

/// The answer ends with the student's EOS when the teacher stopped by itself.
fn with_eos(mut ids: Vec<u32>, record: &Record, tokenizer: &ChatTokenizer) -> Vec<u32> {
    if record.finish_reason.as_deref() == Some("stop")
        && let Some(&eos) = tokenizer.eos_ids().first()
    {
        ids.push(eos);
    }
    ids
}

/// The served answer tokens as ids, when each maps and together they spell the answer.
fn answer_ids(
    record: &Record,
    tokens: &[TokenLogprob],
    map: &TokenMap,
    tokenizer: &ChatTokenizer,
) -> Result<Vec<u32>, String> {
    let mut ids = Vec::with_capacity(tokens.len());
    let mut ambiguous = false;
    for (position, token) in tokens.iter().enumerate() {
        match map.lookup(&token.token, token.bytes.as_deref()) {
            Lookup::Id(id) => ids.push(id),
            Lookup::Ambiguous => {
                ambiguous = true;
                ids.push(u32::MAX);
            }
            Lookup::Unknown => {
                return Err(format!(
                    "record {} (prompt {:?}), answer token {position} {:?}: the student's vocabulary has no such token; the served model's tokenizer is not the student's",
                    record.key, record.id, token.token
                ));
            }
        }
    }
    if ambiguous {
        // Several ids share the text (no bytes were sent): the student's own tokenization of
        // the answer decides, if it has the same tokens.
        let encoded = tokenizer.encode(&record.answer, false).map_err(|e| e.to_string())?;
        let agrees = encoded.len() == tokens.len()
            && encoded.iter().zip(tokens).zip(&ids).all(|((&id, token), &mapped)| {
                (mapped == u32::MAX || mapped == id)
                    && tokenizer
                        .token_bytes(id)
                        .is_some_and(|bytes| text_forms(&bytes).contains(&token.token))
            });
        if !agrees {
            return Err(format!(
                "record {} (prompt {:?}): answer tokens stand for several of the student's ids and its own tokenization differs",
                record.key, record.id
            ));
        }
        ids = encoded;
    }
    let text = tokenizer.decode(&ids, true).map_err(|e| e.to_string())?;
    if text != record.answer {
        return Err(format!(
            "record {} (prompt {:?}): the served tokens, as the student's ids, spell {:?}, not the answer {:?}",
            record.key,
            record.id,
            shorten(&text),
            shorten(&record.answer)
        ));
    }
    Ok(ids)
}

fn shorten(text: &str) -> String {
    let mut short: String = text.chars().take(60).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// Every record as a [`ChatTranscript`] of the student's ids: the sequence-level transfer set.
/// Answer ids are the served tokens where they map and spell the answer, else the answer's
/// text tokenized; the student's EOS ends each answer the teacher stopped by itself.
///
/// # Errors
/// [`ServeError::Llm`] when the tokenizer cannot render a prompt.
pub fn chat_transcripts(set: &TransferSet, tokenizer: &ChatTokenizer) -> Result<Vec<ChatTranscript>> {
    let map = TokenMap::new(tokenizer);
    set.records
        .iter()
        .map(|record| {
            let ids = match record
                .tokens
                .as_deref()
                .and_then(|tokens| answer_ids(record, tokens, &map, tokenizer).ok())
            {
                Some(ids) => ids,
                None => tokenizer.encode(&record.answer, false)?,
            };
            Ok(ChatTranscript {
                id: record.id.clone(),
                prompt_tokens: prompt_ids(record, set.card.api, tokenizer)?,
                answer_tokens: with_eos(ids, record, tokenizer),
                answer: record.answer.clone(),
            })
        })
        .collect()
}

/// The token-level transfer set: the answers as the served token ids and, per answer token,
/// the served top log-probabilities as the student's ids.
#[derive(Debug, Clone)]
pub struct SparseTeacher {
    /// The answers (prompt and answer ids; EOS added where the teacher stopped).
    pub transcripts: Vec<ChatTranscript>,
    /// Per record, per answer token: ids and log-probabilities, most likely first.
    pub top: Vec<Vec<Vec<(u32, f32)>>>,
    /// The most entries at one position (the cache's `k`).
    pub k: usize,
    /// Served top entries in all.
    pub entries: usize,
    /// Entries left out because their text stands for several ids (their mass joins the tail).
    pub ambiguous: usize,
}

impl SparseTeacher {
    /// Maps every record's tokens and top log-probabilities to `tokenizer`'s ids.
    ///
    /// # Errors
    /// [`ServeError::TokenizerMismatch`] when the set has no log-probabilities, or a served
    /// token is not in the student's vocabulary, or answer tokens do not spell the answer:
    /// naming the record and the token. [`ServeError::Llm`] when a prompt cannot be rendered.
    pub fn new(set: &TransferSet, tokenizer: &ChatTokenizer) -> Result<Self> {
        let mismatch = |reason: String| ServeError::TokenizerMismatch { reason };
        if set.card.request.top_logprobs.is_none() {
            return Err(mismatch(format!(
                "{} was harvested without --top-logprobs: it holds answers only",
                set.dir.display()
            )));
        }
        let map = TokenMap::new(tokenizer);
        let (mut transcripts, mut top) = (Vec::new(), Vec::new());
        let (mut k, mut entries, mut ambiguous) = (1, 0, 0);
        for record in &set.records {
            let tokens = record
                .tokens
                .as_deref()
                .ok_or_else(|| mismatch(format!("record {} has no log-probabilities", record.key)))?;
            let ids = answer_ids(record, tokens, &map, tokenizer).map_err(mismatch)?;
            let mut positions = Vec::with_capacity(tokens.len());
            for (position, (token, &id)) in tokens.iter().zip(&ids).enumerate() {
                let mut kept: Vec<(u32, f32)> = Vec::with_capacity(token.top_logprobs.len() + 1);
                for entry in &token.top_logprobs {
                    entries += 1;
                    match map.lookup(&entry.token, entry.bytes.as_deref()) {
                        Lookup::Id(id) => kept.push((id, entry.logprob as f32)),
                        Lookup::Ambiguous => ambiguous += 1,
                        Lookup::Unknown => {
                            return Err(mismatch(format!(
                                "record {}, answer token {position}: the top token {:?} is not in the student's vocabulary",
                                record.key, entry.token
                            )));
                        }
                    }
                }
                // The sampled token is kept even when it is not among the top ones.
                if token.logprob.is_finite() && !kept.iter().any(|&(kept_id, _)| kept_id == id) {
                    kept.push((id, token.logprob as f32));
                }
                kept.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                kept.dedup_by_key(|entry| entry.0);
                k = k.max(kept.len());
                positions.push(kept);
            }
            transcripts.push(ChatTranscript {
                id: record.id.clone(),
                prompt_tokens: prompt_ids(record, set.card.api, tokenizer)?,
                answer_tokens: with_eos(ids, record, tokenizer),
                answer: record.answer.clone(),
            });
            top.push(positions);
        }
        Ok(Self {
            transcripts,
            top,
            k,
            entries,
            ambiguous,
        })
    }

    /// Writes the top-k cache a [`CachedTeacher`](burn_distill_data::CachedTeacher) reads for
    /// `dataset`, which must be these transcripts in order (as
    /// [`ChatTranscript::transcript`] makes them), padded to `positions`. Each answer token's
    /// position holds the served log-probabilities (short ones padded with unused ids at the
    /// missing mass spread evenly, which is what the uniform tail rebuilds anyway); the
    /// position of an EOS the teacher stopped with holds EOS with probability 1; prompt and
    /// padding positions, which no loss reads, hold a uniform distribution.
    ///
    /// # Errors
    /// [`ServeError::Option`] when `dataset` has another length; as
    /// [`write_top_k_cache`].
    pub fn write_cache(
        &self,
        path: &Path,
        dataset: &TranscriptDataset,
        teacher: Fingerprint,
        classes: usize,
        positions: usize,
    ) -> Result<CacheReport> {
        if burn::data::dataset::Dataset::len(dataset) != self.transcripts.len() {
            return Err(ServeError::option(
                "dataset",
                format!(
                    "{} examples for {} transcripts",
                    burn::data::dataset::Dataset::len(dataset),
                    self.transcripts.len()
                ),
            ));
        }
        let k = self.k.min(classes);
        let uniform = -(classes as f32).ln();
        let report = write_top_k_cache(path, dataset, teacher, classes, positions, k, |example| {
            let transcript = &self.transcripts[example];
            let served = &self.top[example];
            let first = transcript.prompt_tokens.len().saturating_sub(1);
            let mut ids = Vec::with_capacity(positions * k);
            let mut log_probs = Vec::with_capacity(positions * k);
            for position in 0..positions {
                let answer = position.checked_sub(first);
                let entries: Vec<(u32, f32)> = match answer {
                    Some(i) if i < served.len() => served[i].clone(),
                    Some(i) if i < transcript.answer_tokens.len() => vec![(transcript.answer_tokens[i], 0.0)],
                    _ => (0..k as u32).map(|id| (id, uniform)).collect(),
                };
                pad(&entries, k, classes, &mut ids, &mut log_probs);
            }
            Ok((ids, log_probs))
        })?;
        Ok(report)
    }
}

/// `entries` padded to `k` with the smallest unused ids, each at the missing mass spread over
/// the ids not listed: the distribution the uniform tail rebuilds is the same.
fn pad(entries: &[(u32, f32)], k: usize, classes: usize, ids: &mut Vec<u32>, log_probs: &mut Vec<f32>) {
    let entries = &entries[..entries.len().min(k)];
    for &(id, lp) in entries {
        ids.push(id);
        log_probs.push(lp.min(0.0));
    }
    let short = k - entries.len();
    if short == 0 {
        return;
    }
    let kept: f64 = entries.iter().map(|&(_, lp)| f64::from(lp).exp()).sum();
    let others = (classes - entries.len()) as f64;
    let tail = ((1.0 - kept).max(1e-30) / others).ln() as f32;
    let mut next = 0u32;
    for _ in 0..short {
        while entries.iter().any(|&(id, _)| id == next) {
            next += 1;
        }
        ids.push(next);
        log_probs.push(tail);
        next += 1;
    }
}
