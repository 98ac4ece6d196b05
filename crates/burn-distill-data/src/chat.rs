//! Chat prompts for distilling a chat model: a JSONL reader and writer, and a prompt set built
//! from the bundled Jargon File's head words, split into train / validation / test by term.

use std::fs;
use std::io::Write;
use std::path::Path;

use burn_distill_model::llm::{ChatMessage, ChatTokenizer, GenerateOptions, Llama};
use burn_distill_model::{Fingerprint, Fingerprinter, SamplingConfig};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// One prompt: the messages a chat model answers (a system message, if any, then the user's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatPrompt {
    /// A name that stays with the prompt through splits and transfer sets (the term for the
    /// Jargon File's prompts).
    pub id: String,
    /// The conversation so far; the model writes the next assistant message.
    pub messages: Vec<ChatMessage>,
}

/// A line of a prompt file: `{"id": .., "messages": [..]}`, or the short form `{"prompt": ".."}`
/// (one user message, its line number as id).
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptLine {
    Messages {
        id: Option<String>,
        messages: Vec<ChatMessage>,
    },
    Prompt {
        id: Option<String>,
        prompt: String,
    },
}

/// Reads a JSONL file of chat prompts (blank lines are skipped). Each line is
/// `{"id": "...", "messages": [{"role": "user", "content": "..."}]}` (id optional) or
/// `{"prompt": "..."}`.
///
/// # Errors
/// [`DataError::Missing`] for a missing file; [`DataError::Corrupt`] naming the line for a line
/// that is not a prompt, has no message, an empty role, or does not end with a user message;
/// [`DataError::Invalid`] for a file with no prompt or two prompts with one id.
pub fn read_chat_prompts(path: &Path) -> Result<Vec<ChatPrompt>> {
    if !path.exists() {
        return Err(DataError::Missing {
            path: path.to_path_buf(),
            what: "a JSONL file of chat prompts".into(),
            hint: String::new(),
        });
    }
    let text = fs::read_to_string(path).map_err(|error| DataError::io(path, error))?;
    let mut prompts: Vec<ChatPrompt> = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let corrupt = |reason: String| DataError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("line {number}: {reason}"),
        };
        let parsed: PromptLine = serde_json::from_str(line).map_err(|error| {
            corrupt(format!(
                "not a chat prompt ({error}); expected {{\"messages\": [{{\"role\": \"user\", \"content\": \"...\"}}]}} or {{\"prompt\": \"...\"}}"
            ))
        })?;
        let (id, messages) = match parsed {
            PromptLine::Messages { id, messages } => (id, messages),
            PromptLine::Prompt { id, prompt } => (id, vec![ChatMessage::user(prompt)]),
        };
        let Some(last) = messages.last() else {
            return Err(corrupt("the prompt has no message".into()));
        };
        if messages.iter().any(|message| message.role.trim().is_empty()) {
            return Err(corrupt("a message has an empty role".into()));
        }
        if last.role != "user" {
            return Err(corrupt(format!(
                "the last message is from {:?}; a prompt ends with the user's message",
                last.role
            )));
        }
        let id = id.unwrap_or_else(|| format!("line-{number}"));
        if !ids.insert(id.clone()) {
            return Err(DataError::Invalid {
                what: format!("prompt file {}", path.display()),
                reason: format!("line {number}: the id {id:?} is used twice"),
            });
        }
        prompts.push(ChatPrompt { id, messages });
    }
    if prompts.is_empty() {
        return Err(DataError::Invalid {
            what: format!("prompt file {}", path.display()),
            reason: "it holds no prompt".into(),
        });
    }
    Ok(prompts)
}

/// Writes `prompts` as JSONL (the long form), replacing `path` whole or not at all.
///
/// # Errors
/// [`DataError::Io`] when the file cannot be written.
pub fn write_chat_prompts(path: &Path, prompts: &[ChatPrompt]) -> Result<()> {
    crate::transcript::write_jsonl(path, prompts)
}

/// One entry of the Jargon File: its head word and the text of its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JargonEntry {
    /// The head word, as written (`"cruft"`, `"Godwin's Law"`).
    pub term: String,
    /// The definition's text, its lines joined by single spaces.
    pub definition: String,
}

/// The entries of The Jargon File 4.4.7 in its plain-text form: each starts with a line
/// `   :term: ...` and runs to the next. Entries whose definition is empty are left out.
pub fn jargon_entries(text: &str) -> Vec<JargonEntry> {
    let mut entries = Vec::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    let finish = |current: Option<(String, Vec<&str>)>, entries: &mut Vec<JargonEntry>| {
        if let Some((term, lines)) = current {
            let definition = lines.join(" ").split_whitespace().collect::<Vec<_>>().join(" ");
            if !definition.is_empty() {
                entries.push(JargonEntry { term, definition });
            }
        }
    };
    for line in text.lines() {
        let trimmed = line.trim_start();
        let head = trimmed
            .strip_prefix(':')
            .and_then(|rest| rest.split_once(':'))
            .filter(|(term, _)| !term.is_empty() && !term.contains("  ") && line.starts_with("   :"));
        match head {
            Some((term, rest)) => {
                finish(current.take(), &mut entries);
                current = Some((term.trim().to_string(), vec![rest.trim()]));
            }
            None => {
                if let Some((_, lines)) = current.as_mut() {
                    lines.push(line.trim());
                }
            }
        }
    }
    finish(current, &mut entries);
    entries
}

/// Prompts split three ways by term, so that no validation or test term is seen in training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptSplits {
    /// Training prompts.
    pub train: Vec<ChatPrompt>,
    /// Validation prompts: hyper-parameters are chosen on these.
    pub valid: Vec<ChatPrompt>,
    /// Test prompts: read once, for the final table.
    pub test: Vec<ChatPrompt>,
}

/// Which split a prompt id falls in: a fixed hash of the id, so a term keeps its split whatever
/// else is in the set. `valid` and `test` are fractions in `[0, 1)`.
pub fn split_of(id: &str, valid: f64, test: f64) -> usize {
    let mut hasher = Fingerprinter::new("prompt split");
    hasher.update(id.as_bytes());
    let unit = (hasher.finish().0 >> 75) as f64 / (1u64 << 53) as f64;
    if unit < test {
        2
    } else if unit < test + valid {
        1
    } else {
        0
    }
}

/// Splits `prompts` by id with [`split_of`].
///
/// # Errors
/// [`DataError::Invalid`] for fractions outside `[0, 1)` or summing to 1 or more.
pub fn split_prompts(prompts: Vec<ChatPrompt>, valid: f64, test: f64) -> Result<PromptSplits> {
    let in_range = |x: f64| (0.0..1.0).contains(&x);
    if !in_range(valid) || !in_range(test) || valid + test >= 1.0 {
        return Err(DataError::Invalid {
            what: "prompt split".into(),
            reason: format!("validation {valid} and test {test} fractions must be in [0, 1) and sum to less than 1"),
        });
    }
    let mut splits = PromptSplits {
        train: Vec::new(),
        valid: Vec::new(),
        test: Vec::new(),
    };
    for prompt in prompts {
        match split_of(&prompt.id, valid, test) {
            2 => splits.test.push(prompt),
            1 => splits.valid.push(prompt),
            _ => splits.train.push(prompt),
        }
    }
    Ok(splits)
}

/// `"Explain the jargon term \"X\"."` for each of `entries`, one user message with the term as
/// id (the first entry of a term that appears twice).
pub fn jargon_prompts(entries: &[JargonEntry]) -> Vec<ChatPrompt> {
    let mut seen = std::collections::HashSet::new();
    entries
        .iter()
        .filter(|entry| seen.insert(entry.term.clone()))
        .map(|entry| ChatPrompt {
            id: entry.term.clone(),
            messages: vec![ChatMessage::user(format!(
                "Explain the jargon term \"{}\".",
                entry.term
            ))],
        })
        .collect()
}

/// How a teacher answers the prompts of a transfer set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerOptions {
    /// The most tokens per answer (an answer cut there has no EOS).
    pub max_new_tokens: usize,
    /// Temperature (0: greedy), top-k, top-p and seed.
    pub sampling: SamplingConfig,
    /// Prompts answered together (one KV-cached batch, left-padded).
    pub batch_size: usize,
}

/// The first line of a transfer-set file: what its answers were made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferSetHeader {
    /// The teacher's weights.
    pub teacher: Fingerprint,
    /// The tokenizer: its vocabulary, merges, special tokens and chat template.
    pub tokenizer: Fingerprint,
    /// The prompts, in order.
    pub prompts: Fingerprint,
    /// Decoding.
    pub options: AnswerOptions,
}

/// One teacher answer of a transfer set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTranscript {
    /// The prompt's id.
    pub id: String,
    /// The prompt rendered with the chat template, as token ids (generation prompt included).
    pub prompt_tokens: Vec<u32>,
    /// The answer's token ids, its EOS included when it ended with one.
    pub answer_tokens: Vec<u32>,
    /// The answer as text (without EOS).
    pub answer: String,
}

impl ChatTranscript {
    /// As a [`Transcript`](crate::Transcript) of token ids, for a
    /// [`TranscriptDataset`](crate::TranscriptDataset): loss on the answer tokens only.
    pub fn transcript(&self) -> crate::Transcript {
        crate::Transcript::from_tokens(&self.prompt_tokens, &self.answer_tokens)
    }
}

/// The fingerprint of a tokenizer: its whole `tokenizer.json` form and its chat template.
///
/// # Errors
/// [`DataError::Invalid`] when the tokenizer cannot be serialised.
pub fn tokenizer_fingerprint(tokenizer: &ChatTokenizer) -> Result<Fingerprint> {
    let json = tokenizer.inner().to_string(false).map_err(|error| DataError::Invalid {
        what: "tokenizer".into(),
        reason: format!("it cannot be serialised for its fingerprint: {error}"),
    })?;
    let mut hasher = Fingerprinter::new("tokenizer");
    hasher
        .update_str(&json)
        .update_str(tokenizer.chat_template().unwrap_or(""));
    Ok(hasher.finish())
}

/// The teacher's answers to `prompts`, in a JSONL transfer set at `path` (a header line, then
/// one [`ChatTranscript`] per line), made with the KV cache `options.batch_size` prompts at a
/// time. Each batch is appended as soon as it is answered, so a killed run loses at most one
/// batch: called again with the same teacher, tokenizer, prompts and options, it keeps what
/// the file holds and answers the rest. `progress(done, total)` is called after each batch.
///
/// # Errors
/// [`DataError::OtherTransferSet`] for a file made from anything else (it is left as it is);
/// [`DataError::Invalid`] for no prompts or a batch size of 0; [`DataError::Corrupt`] for a
/// damaged file; [`DataError::Generation`] when the teacher fails; [`DataError::Io`].
pub fn answer_prompts(
    teacher: &Llama,
    tokenizer: &ChatTokenizer,
    prompts: &[ChatPrompt],
    options: &AnswerOptions,
    path: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<ChatTranscript>> {
    if prompts.is_empty() || options.batch_size == 0 || options.max_new_tokens == 0 {
        return Err(DataError::Invalid {
            what: "transfer set".into(),
            reason: "it needs at least one prompt, a batch size of at least 1 and max_new_tokens of at least 1".into(),
        });
    }
    let mut prompt_hasher = Fingerprinter::new("chat prompts");
    for prompt in prompts {
        prompt_hasher.update_str(&serde_json::to_string(prompt).expect("prompts serialise"));
    }
    let header = TransferSetHeader {
        teacher: Fingerprint::of_module(teacher),
        tokenizer: tokenizer_fingerprint(tokenizer)?,
        prompts: prompt_hasher.finish(),
        options: options.clone(),
    };
    let mut done = read_transfer_set(path, &header, prompts)?;
    let mut file = if done.is_empty() {
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|error| DataError::io(path, error))?;
        }
        let mut file = fs::File::create(path).map_err(|error| DataError::io(path, error))?;
        let line = serde_json::json!({ "transfer_set": header }).to_string();
        writeln!(file, "{line}").map_err(|error| DataError::io(path, error))?;
        file
    } else {
        // Rewritten whole: a line cut by a kill is dropped.
        let write = |file: &mut fs::File| -> std::io::Result<()> {
            writeln!(file, "{}", serde_json::json!({ "transfer_set": header }))?;
            for answer in &done {
                writeln!(file, "{}", serde_json::to_string(answer)?)?;
            }
            Ok(())
        };
        let mut file = fs::File::create(path).map_err(|error| DataError::io(path, error))?;
        write(&mut file).map_err(|error| DataError::io(path, error))?;
        file
    };
    progress(done.len(), prompts.len());
    let generate = GenerateOptions {
        max_new_tokens: options.max_new_tokens,
        sampling: options.sampling.clone(),
        stop_tokens: Vec::new(),
        logprobs: None,
    };
    while done.len() < prompts.len() {
        let (first, end) = (done.len(), (done.len() + options.batch_size).min(prompts.len()));
        let conversations: Vec<Vec<ChatMessage>> = prompts[first..end].iter().map(|p| p.messages.clone()).collect();
        // Each batch its own stream: a resumed run samples what an uninterrupted one would.
        let mut batch_options = generate.clone();
        batch_options.sampling.seed = options
            .sampling
            .seed
            .wrapping_add((first as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (answers, _) = teacher
            .chat(tokenizer, &conversations, &batch_options, &[], |_, _| {})
            .map_err(|source| DataError::Generation { first, end, source })?;
        let mut lines = String::new();
        for (prompt, answer) in prompts[first..end].iter().zip(answers) {
            let transcript = ChatTranscript {
                id: prompt.id.clone(),
                prompt_tokens: answer.prompt_tokens,
                answer_tokens: answer.generation.tokens,
                answer: answer.text,
            };
            lines.push_str(&serde_json::to_string(&transcript).expect("transcripts serialise"));
            lines.push('\n');
            done.push(transcript);
        }
        file.write_all(lines.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|error| DataError::io(path, error))?;
        progress(done.len(), prompts.len());
    }
    Ok(done)
}

/// The answers a transfer set at `path` already holds for `prompts` (none when there is no
/// file); an error when it was made from anything else.
fn read_transfer_set(path: &Path, header: &TransferSetHeader, prompts: &[ChatPrompt]) -> Result<Vec<ChatTranscript>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(DataError::io(path, error)),
    };
    let mut lines = text.split_inclusive('\n');
    let Some(first) = lines.next() else {
        return Ok(Vec::new());
    };
    #[derive(Deserialize)]
    struct HeaderLine {
        transfer_set: TransferSetHeader,
    }
    let saved = serde_json::from_str::<HeaderLine>(first.trim_end())
        .map_err(|error| DataError::corrupt(path, format!("line 1: not a transfer-set header ({error})")))?
        .transfer_set;
    let other = |what: &str| DataError::OtherTransferSet {
        path: path.to_path_buf(),
        what: what.into(),
    };
    if saved.teacher != header.teacher {
        return Err(other("teacher"));
    }
    if saved.tokenizer != header.tokenizer {
        return Err(other("tokenizer"));
    }
    if saved.prompts != header.prompts {
        return Err(other("prompt set"));
    }
    if saved.options != header.options {
        return Err(other("decoding options"));
    }
    let mut done = Vec::new();
    for (index, line) in lines.enumerate() {
        if !line.ends_with('\n') {
            break; // cut by a kill: answered again
        }
        let transcript: ChatTranscript = serde_json::from_str(line.trim_end()).map_err(|error| {
            DataError::corrupt(path, format!("line {}: not a transfer-set answer ({error})", index + 2))
        })?;
        if prompts.get(done.len()).map(|p| &p.id) != Some(&transcript.id) {
            return Err(DataError::corrupt(
                path,
                format!("line {}: answers prompt {:?} out of order", index + 2, transcript.id),
            ));
        }
        done.push(transcript);
    }
    Ok(done)
}
