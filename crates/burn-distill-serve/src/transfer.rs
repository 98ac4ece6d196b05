//! A harvested transfer set on disk: a directory with the provenance card (`card.json`) and the
//! answers (`records.jsonl`, appended one response at a time), and the lineage a student
//! trained on it records (`lineage.json` in its run directory).

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn_distill_data::ChatPrompt;
use burn_distill_model::llm::ChatMessage;
use burn_distill_model::{Fingerprint, Fingerprinter};
use serde::{Deserialize, Serialize};

use crate::api::TokenLogprob;
use crate::error::{Result, ServeError};

/// The card's file name.
pub const CARD_FILE: &str = "card.json";
/// The records' file name.
pub const RECORDS_FILE: &str = "records.jsonl";
/// The lineage file a student's run directory holds.
pub const LINEAGE_FILE: &str = "lineage.json";
/// The version of this layout.
pub const TRANSFER_SET_VERSION: u32 = 1;

/// Which API the answers came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `/v1/chat/completions`: the prompt's messages through the server's chat template.
    Chat,
    /// `/v1/completions`: the prompt's one user message as raw text.
    Completions,
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Chat => "chat",
            Self::Completions => "completions",
        })
    }
}

/// How the teacher was asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestParams {
    /// Answers per prompt.
    pub samples: usize,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus sampling, if any.
    pub top_p: Option<f64>,
    /// The most tokens per answer.
    pub max_tokens: usize,
    /// Top log-probabilities per token (None: no log-probabilities asked).
    pub top_logprobs: Option<usize>,
    /// The seed sent, if any (sample `s` sends `seed + s`).
    pub seed: Option<u64>,
}

/// The prompts a set answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptSource {
    /// The prompt file, as given.
    pub file: Option<String>,
    /// The prompts' fingerprint (ids and messages, in order).
    pub fingerprint: Fingerprint,
    /// How many.
    pub count: usize,
}

/// Totals over the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Answers.
    pub records: usize,
    /// Prompt tokens, as the server counted them.
    pub prompt_tokens: u64,
    /// Answer tokens, as the server counted them.
    pub completion_tokens: u64,
}

/// Where a transfer set came from and under which terms its answers may be used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvenanceCard {
    /// [`TRANSFER_SET_VERSION`].
    pub format_version: u32,
    /// The teacher's model id, as the server reports it.
    pub teacher_model: String,
    /// The endpoint: scheme, host, port and path; never credentials, a query or a key.
    pub endpoint: String,
    /// Chat or completions.
    pub api: Api,
    /// How the teacher was asked.
    pub request: RequestParams,
    /// The prompts.
    pub prompts: PromptSource,
    /// The terms under which the teacher's outputs may be used, as the user stated them.
    pub terms: String,
    /// When the harvest started (RFC 3339, UTC).
    pub started: String,
    /// When the card was last written.
    pub updated: String,
    /// Totals over the records.
    pub counts: Counts,
    /// Every prompt has all its samples.
    pub complete: bool,
    /// The tool and version that wrote it.
    pub tool: String,
}

impl ProvenanceCard {
    /// The first setting in which `self` (saved) and `now` differ, as (name, saved, now):
    /// answers made otherwise are not the same set.
    pub fn differs_from(&self, now: &Self) -> Option<(String, String, String)> {
        let pairs = [
            ("teacher model", self.teacher_model.clone(), now.teacher_model.clone()),
            ("endpoint", self.endpoint.clone(), now.endpoint.clone()),
            ("api", self.api.to_string(), now.api.to_string()),
            (
                "request (samples, temperature, top_p, max_tokens, top_logprobs, seed)",
                format!("{:?}", self.request),
                format!("{:?}", now.request),
            ),
            (
                "prompt set",
                format!("{} ({} prompts)", self.prompts.fingerprint, self.prompts.count),
                format!("{} ({} prompts)", now.prompts.fingerprint, now.prompts.count),
            ),
            ("terms", self.terms.clone(), now.terms.clone()),
        ];
        pairs
            .into_iter()
            .find(|(_, a, b)| a != b)
            .map(|(name, a, b)| (name.to_string(), a, b))
    }
}

/// One answer of the teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `PROMPT-FINGERPRINT/SAMPLE`: what makes a record unique; resuming skips the keys present.
    pub key: String,
    /// The prompt's id.
    pub id: String,
    /// The prompt's position in the prompt file.
    pub index: usize,
    /// Which sample of the prompt.
    pub sample: usize,
    /// The prompt.
    pub messages: Vec<ChatMessage>,
    /// The answer's text.
    pub answer: String,
    /// `stop`, `length`, or whatever the server said.
    pub finish_reason: Option<String>,
    /// The answer's tokens with their log-probabilities, when they were asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<TokenLogprob>>,
    /// The model that answered, as the response named it.
    pub model: String,
    /// Prompt tokens the server counted for this record (the request's, on its first choice).
    pub prompt_tokens: u64,
    /// Answer tokens the server counted for this record.
    pub completion_tokens: u64,
}

/// The fingerprint of one prompt (its id and messages): the first half of a record's key.
pub fn prompt_fingerprint(prompt: &ChatPrompt) -> Fingerprint {
    let mut hasher = Fingerprinter::new("served prompt");
    hasher.update_str(&serde_json::to_string(prompt).expect("prompts serialise"));
    hasher.finish()
}

/// The fingerprint of a prompt set, in order.
pub fn prompts_fingerprint(prompts: &[ChatPrompt]) -> Fingerprint {
    let mut hasher = Fingerprinter::new("served prompt set");
    for prompt in prompts {
        hasher.update_str(&serde_json::to_string(prompt).expect("prompts serialise"));
    }
    hasher.finish()
}

/// A record's key.
pub fn record_key(prompt: &ChatPrompt, sample: usize) -> String {
    format!("{}/{sample}", prompt_fingerprint(prompt))
}

/// A transfer set read from its directory.
#[derive(Debug, Clone)]
pub struct TransferSet {
    /// Its directory.
    pub dir: PathBuf,
    /// Its card.
    pub card: ProvenanceCard,
    /// Its records, by prompt index then sample.
    pub records: Vec<Record>,
}

impl TransferSet {
    /// Reads the set in `dir`.
    ///
    /// # Errors
    /// [`ServeError::Io`] for a missing directory or card; [`ServeError::Corrupt`] for a card
    /// or record that does not parse (naming the line), a repeated key, or a set its card calls
    /// complete with missing records.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let card = read_card(&dir)?;
        let (records, _) = read_records(&dir.join(RECORDS_FILE), false)?;
        let mut records = records;
        records.sort_by_key(|r| (r.index, r.sample));
        if card.complete && records.len() != card.prompts.count * card.request.samples {
            return Err(ServeError::corrupt(
                dir.join(RECORDS_FILE),
                format!(
                    "the card ({}) says complete with {} prompts × {} samples, the file has {} records",
                    dir.join(CARD_FILE).display(),
                    card.prompts.count,
                    card.request.samples,
                    records.len()
                ),
            ));
        }
        Ok(Self { dir, card, records })
    }

    /// The set's fingerprint: its card's settings and every record, in order. A student trained
    /// on the set records it.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut hasher = Fingerprinter::new("transfer set");
        let mut card = self.card.clone();
        card.updated.clear();
        hasher.update_str(&serde_json::to_string(&card).expect("cards serialise"));
        for record in &self.records {
            hasher.update_str(&serde_json::to_string(record).expect("records serialise"));
        }
        hasher.finish()
    }
}

/// Reads `dir/card.json`.
pub(crate) fn read_card(dir: &Path) -> Result<ProvenanceCard> {
    let path = dir.join(CARD_FILE);
    let text = fs::read_to_string(&path).map_err(|e| ServeError::io(&path, e))?;
    let card: ProvenanceCard =
        serde_json::from_str(&text).map_err(|e| ServeError::corrupt(&path, format!("not a provenance card: {e}")))?;
    if card.format_version != TRANSFER_SET_VERSION {
        return Err(ServeError::corrupt(
            &path,
            format!(
                "format version {}, this build reads {TRANSFER_SET_VERSION}",
                card.format_version
            ),
        ));
    }
    Ok(card)
}

/// Writes `dir/card.json` atomically.
pub(crate) fn write_card(dir: &Path, card: &ProvenanceCard) -> Result<()> {
    let path = dir.join(CARD_FILE);
    let text = serde_json::to_string_pretty(card).expect("cards serialise");
    burn_distill_model::files::write_atomically(&path, |file| file.write_all(text.as_bytes()))
        .map_err(|e| ServeError::io(&path, e))
}

/// The records of `path` (none when it does not exist). A last line without its newline is a
/// record cut by a kill: with `repair` the file is truncated before it, else it is ignored.
/// Returns the records and the length of the file's whole lines.
pub(crate) fn read_records(path: &Path, repair: bool) -> Result<(Vec<Record>, u64)> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(ServeError::io(path, e)),
    };
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if repair && whole < bytes.len() {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| ServeError::io(path, e))?;
        file.set_len(whole as u64).map_err(|e| ServeError::io(path, e))?;
    }
    let mut records = Vec::new();
    let mut keys = HashSet::new();
    for (number, line) in bytes[..whole].split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record: Record = serde_json::from_slice(line)
            .map_err(|e| ServeError::corrupt(path, format!("line {}: not a record ({e})", number + 1)))?;
        if !keys.insert(record.key.clone()) {
            return Err(ServeError::corrupt(
                path,
                format!("line {}: the key {} is there twice", number + 1, record.key),
            ));
        }
        records.push(record);
    }
    Ok((records, whole as u64))
}

/// What a student's run directory records of the transfer set it was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// The set's directory, as given.
    pub transfer_set: String,
    /// [`TransferSet::fingerprint`].
    pub fingerprint: Fingerprint,
    /// The set's card.
    pub card: ProvenanceCard,
}

impl Lineage {
    /// The lineage of a student trained on `set`.
    pub fn of(set: &TransferSet) -> Self {
        Self {
            transfer_set: set.dir.display().to_string(),
            fingerprint: set.fingerprint(),
            card: set.card.clone(),
        }
    }

    /// Writes it to `run_dir/lineage.json`.
    ///
    /// # Errors
    /// [`ServeError::Io`].
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let path = run_dir.join(LINEAGE_FILE);
        let text = serde_json::to_string_pretty(self).expect("lineage serialises");
        burn_distill_model::files::write_atomically(&path, |file| file.write_all(text.as_bytes()))
            .map_err(|e| ServeError::io(&path, e))
    }

    /// Reads `run_dir/lineage.json`.
    ///
    /// # Errors
    /// [`ServeError::Io`] when there is none (the student was not trained on a harvested set),
    /// [`ServeError::Corrupt`] when it does not parse.
    pub fn read(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(LINEAGE_FILE);
        let text = fs::read_to_string(&path).map_err(|e| ServeError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| ServeError::corrupt(&path, format!("not a lineage file: {e}")))
    }

    /// Whether the set it names is still the one the student was trained on: `Some(true)` when
    /// its fingerprint matches, `Some(false)` when it changed, `None` when it cannot be read.
    pub fn verify(&self) -> Option<bool> {
        TransferSet::open(&self.transfer_set)
            .ok()
            .map(|set| set.fingerprint() == self.fingerprint)
    }
}

impl std::fmt::Display for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let card = &self.card;
        let request = &card.request;
        writeln!(
            f,
            "teacher:      {} at {} ({} API)",
            card.teacher_model, card.endpoint, card.api
        )?;
        writeln!(f, "terms:        {}", card.terms)?;
        writeln!(
            f,
            "data:         {} answers to {} prompts (prompt set {}{}), {} answer tokens",
            card.counts.records,
            card.prompts.count,
            card.prompts.fingerprint,
            card.prompts
                .file
                .as_ref()
                .map_or(String::new(), |file| format!(", {file}")),
            card.counts.completion_tokens
        )?;
        writeln!(
            f,
            "sampling:     {} per prompt, temperature {}, top_p {}, max_tokens {}, top_logprobs {}, seed {}",
            request.samples,
            request.temperature,
            request.top_p.map_or("none".into(), |p| p.to_string()),
            request.max_tokens,
            request.top_logprobs.map_or("none".into(), |k| k.to_string()),
            request.seed.map_or("none".into(), |s| s.to_string()),
        )?;
        writeln!(f, "harvested:    {} to {}", card.started, card.updated)?;
        write!(
            f,
            "transfer set: {} (fingerprint {})",
            self.transfer_set, self.fingerprint
        )
    }
}
