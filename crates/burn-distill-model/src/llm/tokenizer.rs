//! Tokenizers (Hugging Face's `tokenizers` crate) and chat templates (`minijinja`), from a
//! `tokenizer.json` or from a GGUF file's metadata.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::llm::error::{LlmError, LlmResult};
use crate::llm::gguf::GgufFile;

/// One message of a chat: `role` is `"system"`, `"user"` or `"assistant"` (or whatever the
/// model's template knows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: String,
    /// What they say.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
}

/// How one tokenizer's vocabulary relates to another's ([`ChatTokenizer::vocabulary_match`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VocabularyMatch {
    /// Every id is the same token in both, and both have as many ids.
    Same,
    /// Every id both have is the same token, but one has more ids: a vocabulary extended with
    /// tokens or padded to a round size. Logits compare over the shared ids once one model is
    /// resized ([`crate::llm::Llama::with_vocab_size`]).
    Extended {
        /// Ids of the tokenizer asked.
        ours: usize,
        /// Ids of the other.
        theirs: usize,
    },
    /// Id `id` is a different token in each (empty where one has none): the two split text
    /// differently, and their logits do not compare.
    Different {
        /// The first id that differs.
        id: u32,
        /// Its token in the tokenizer asked.
        ours: String,
        /// Its token in the other.
        theirs: String,
    },
}

impl std::fmt::Display for VocabularyMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Same => write!(f, "the same vocabulary"),
            Self::Extended { ours, theirs } => {
                write!(
                    f,
                    "the same tokens for the ids both have, but {ours} ids against {theirs}"
                )
            }
            Self::Different { id, ours, theirs } => write!(f, "id {id} is {ours:?} in one and {theirs:?} in the other"),
        }
    }
}

/// A model's tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    add_bos_token: bool,
    source: String,
}

/// The pre-tokenizer splits llama.cpp names in `tokenizer.ggml.pre`, as Hugging Face's own
/// `tokenizer.json` files spell them.
fn gguf_pre_tokenizer(pre: &str) -> Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        // Digits one by one, then GPT-2's split: SmolLM's and StarCoder's tokenizer.json.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" => split(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2),
        _ => byte_level(true),
    }
}

/// GPT-2's map from bytes to printable characters (the alphabet of byte-level BPE vocabularies).
fn byte_alphabet() -> std::collections::HashSet<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut alphabet: std::collections::HashSet<char> = printable.iter().filter_map(|&c| char::from_u32(c)).collect();
    let mut next = 256;
    for byte in 0..256u32 {
        if !printable.contains(&byte) {
            alphabet.insert(char::from_u32(next).expect("valid code point"));
            next += 1;
        }
    }
    alphabet
}

impl ChatTokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.*`: a `gpt2` byte-level BPE
    /// vocabulary, its merges, token types, special tokens, and `tokenizer.chat_template`), as
    /// a `tokenizer.json` for Hugging Face's `tokenizers`: control tokens become special added
    /// tokens, user-defined ones plain added tokens.
    ///
    /// # Errors
    /// [`LlmError::Unsupported`] for a tokenizer model other than `gpt2` (sentencepiece GGUF
    /// files: use the model's `tokenizer.json`), [`LlmError::MissingKey`] for missing metadata.
    pub fn from_gguf(gguf: &GgufFile) -> LlmResult<Self> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(LlmError::Unsupported {
                path: gguf.path().to_path_buf(),
                what: format!("tokenizer.ggml.model = {model:?}"),
                reason: "only byte-level BPE (\"gpt2\") tokenizers are built from GGUF metadata; \
                         pass the model's tokenizer.json instead"
                    .into(),
            });
        }
        let tokens = gguf.get_strings("tokenizer.ggml.tokens")?;
        let merges = gguf.get_strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match gguf.metadata().get("tokenizer.ggml.token_type") {
            Some(value) => value
                .as_array()
                .unwrap_or_default()
                .iter()
                .map(|t| t.as_u64().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let pre = gguf
            .metadata()
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let alphabet = byte_alphabet();
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, &token) in tokens.iter().enumerate() {
            let spelled = token.chars().all(|c| alphabet.contains(&c));
            let kind = types.get(id).copied().unwrap_or(1);
            // 3 is CONTROL, 4 USER_DEFINED; a control token outside the byte alphabet is a
            // converter's mislabel (transformers skips those too).
            if (kind == 3 && spelled) || kind == 4 {
                added.push(
                    json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": kind == 3}),
                );
            }
            vocab.insert(token.to_string(), json!(id));
        }
        let merges: Vec<Value> = merges.iter().map(|m| json!(m)).collect();
        let document = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": gguf_pre_tokenizer(pre),
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        });
        let source = format!("{} (GGUF metadata)", gguf.path().display());
        let tokenizer: Tokenizer =
            unpanicked(|| serde_json::from_value(document).map_err(|e| e.to_string())).map_err(|reason| {
                LlmError::Tokenizer {
                    source_name: source.clone(),
                    reason,
                }
            })?;
        let special = |key: &str| {
            gguf.metadata()
                .get(key)
                .and_then(|v| v.as_u64())
                .and_then(|id| tokens.get(id as usize).map(|t| (id as u32, t.to_string())))
        };
        let eos = special("tokenizer.ggml.eos_token_id");
        // End-of-turn and end-of-message tokens end a generation too (Llama 3's <|eot_id|>).
        let mut eos_ids: Vec<u32> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|key| special(key).map(|(id, _)| id))
        .collect();
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let chat_template = gguf
            .metadata()
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let add_bos_token = matches!(
            gguf.metadata().get("tokenizer.ggml.add_bos_token"),
            Some(crate::llm::gguf::GgufValue::Bool(true))
        );
        Ok(Self {
            tokenizer,
            chat_template,
            bos_token: special("tokenizer.ggml.bos_token_id").map(|(_, t)| t),
            eos_ids,
            eos_token: eos.map(|(_, t)| t),
            add_bos_token,
            source,
        })
    }

    /// Loads a Hugging Face directory's `tokenizer.json`, with `tokenizer_config.json` (special
    /// tokens, `chat_template`) and `chat_template.jinja` when present.
    ///
    /// # Errors
    /// [`LlmError::Io`] for a missing `tokenizer.json`, [`LlmError::Tokenizer`] for one that does
    /// not parse.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> LlmResult<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| LlmError::io(&path, e))?;
        let source = path.display().to_string();
        // `tokenizers` 0.22 panics ("Helper") on some malformed decoder sections instead of
        // returning its error: the panic stops here and is reported as the file's error.
        let tokenizer: Tokenizer =
            unpanicked(|| text.parse::<Tokenizer>().map_err(|e| e.to_string())).map_err(|reason| {
                LlmError::Tokenizer {
                    source_name: source.clone(),
                    reason,
                }
            })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| LlmError::invalid(&config_path, "tokenizer_config.json", e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({}),
            Err(e) => return Err(LlmError::io(&config_path, e)),
        };
        let token = |key: &str| match config.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
            _ => None,
        };
        let template_file = dir.join("chat_template.jinja");
        let chat_template = match std::fs::read_to_string(&template_file) {
            Ok(text) => Some(text),
            Err(_) => config.get("chat_template").and_then(|t| t.as_str()).map(str::to_string),
        };
        let eos_token = token("eos_token");
        let mut eos_ids: Vec<u32> = eos_token.iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json"))
            && let Ok(generation) = serde_json::from_str::<Value>(&text)
        {
            match generation.get("eos_token_id") {
                Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|n| n as u32)),
                Some(Value::Array(ids)) => eos_ids.extend(ids.iter().filter_map(|n| n.as_u64()).map(|n| n as u32)),
                _ => {}
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Self {
            tokenizer,
            chat_template,
            bos_token: token("bos_token"),
            eos_token,
            eos_ids,
            add_bos_token: config.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false),
            source,
        })
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// How this tokenizer's vocabulary relates to `other`'s, id by id (added tokens included):
    /// whether token-level distillation between models of the two can compare logits position
    /// by position. Only the vocabularies are compared: two tokenizers with one vocabulary may
    /// still differ in merges, normalisation or chat template (compare their fingerprints).
    pub fn vocabulary_match(&self, other: &ChatTokenizer) -> VocabularyMatch {
        let (ours, theirs) = (self.vocab_size(), other.vocab_size());
        for id in 0..ours.min(theirs) as u32 {
            let (a, b) = (self.tokenizer.id_to_token(id), other.tokenizer.id_to_token(id));
            if a != b {
                return VocabularyMatch::Different {
                    id,
                    ours: a.unwrap_or_default(),
                    theirs: b.unwrap_or_default(),
                };
            }
        }
        if ours == theirs {
            VocabularyMatch::Same
        } else {
            VocabularyMatch::Extended { ours, theirs }
        }
    }

    /// Token ids of `text`. With `add_special_tokens`, the model's BOS is prepended where its
    /// config says so (`add_bos_token`).
    ///
    /// # Errors
    /// [`LlmError::Tokenizer`] when the tokenizer fails.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> LlmResult<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(e))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens
            && self.add_bos_token
            && let Some(bos) = self.bos_id()
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// The text of `ids`, special tokens left out when `skip_special_tokens`.
    ///
    /// # Errors
    /// [`LlmError::Tokenizer`] for ids outside the vocabulary.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> LlmResult<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(e))
    }

    /// The begin-of-sequence token id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.tokenizer.token_to_id(t))
    }

    /// The ids that end a generation (EOS and any the generation config adds).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The chat template's source, when the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` with the model's own chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does (Jinja
    /// with `trim_blocks` and `lstrip_blocks`, `bos_token` / `eos_token` and `raise_exception`
    /// in scope, Python string methods available).
    ///
    /// # Errors
    /// [`LlmError::Template`] when the model has no template, or it fails to parse or render.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> LlmResult<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| LlmError::Template {
            source_name: self.source.clone(),
            reason: "the model has no chat template".into(),
        })?;
        let error = |e: minijinja::Error| LlmError::Template {
            source_name: self.source.clone(),
            reason: format!("{e:#}"),
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template("chat", template).map_err(error)?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat").and_then(|t| t.render(context)).map_err(error)
    }

    /// The token ids of a chat prompt: the template rendered, then encoded without adding
    /// special tokens again (the template writes them).
    ///
    /// # Errors
    /// As [`ChatTokenizer::apply_chat_template`] and [`ChatTokenizer::encode`].
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> LlmResult<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (special tokens and chat template)
    /// into `dir`, as transformers' `AutoTokenizer.from_pretrained(dir)` reads them.
    ///
    /// # Errors
    /// [`LlmError::Io`] when a file cannot be written.
    pub fn save(&self, dir: impl AsRef<Path>) -> LlmResult<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| LlmError::io(dir, e))?;
        let text = self.tokenizer.to_string(false).map_err(|e| self.error(e))?;
        crate::llm::write_atomically(&dir.join("tokenizer.json"), text.as_bytes())?;
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "clean_up_tokenization_spaces": false,
        });
        let object = config.as_object_mut().expect("an object");
        for (key, value) in [("bos_token", &self.bos_token), ("eos_token", &self.eos_token)] {
            if let Some(value) = value {
                object.insert(key.into(), json!(value));
            }
        }
        if let Some(template) = &self.chat_template {
            object.insert("chat_template".into(), json!(template));
        }
        let text = serde_json::to_string_pretty(&config).expect("JSON serialises");
        crate::llm::write_atomically(&dir.join("tokenizer_config.json"), text.as_bytes())
    }

    fn error(&self, e: impl std::fmt::Display) -> LlmError {
        LlmError::Tokenizer {
            source_name: self.source.clone(),
            reason: e.to_string(),
        }
    }

    /// A streaming decoder: feed it ids one at a time, get the text they complete.
    pub fn decode_stream(&self) -> TextStream<'_> {
        TextStream {
            stream: self.tokenizer.decode_stream(true),
            source: &self.source,
        }
    }

    /// The bytes one token stands for, exactly (a token may hold part of a UTF-8 character,
    /// which no string can): what OpenAI's API reports as a token's `bytes`. Byte-level BPE
    /// vocabularies (GPT-2, Llama 3, SmolLM, Qwen) map each character back to its byte;
    /// SentencePiece ones (Llama 2) turn `▁` into a space and `<0xHH>` into the byte `HH`; added
    /// tokens (`<|im_end|>`) are their text. `None` for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.tokenizer.id_to_token(id)?;
        let added = self.tokenizer.get_added_tokens_decoder().contains_key(&id);
        Some(spelled_bytes(token, added, self.is_byte_level()))
    }

    /// [`ChatTokenizer::token_bytes`] of every id, in order (an id without a token is empty):
    /// the table a server or a token map builds once.
    pub fn vocabulary_bytes(&self) -> Vec<Vec<u8>> {
        let added = self.tokenizer.get_added_tokens_decoder();
        let byte_level = self.is_byte_level();
        (0..self.vocab_size() as u32)
            .map(|id| {
                self.tokenizer.id_to_token(id).map_or_else(Vec::new, |token| {
                    spelled_bytes(token, added.contains_key(&id), byte_level)
                })
            })
            .collect()
    }

    /// Whether the decoder maps characters back to bytes (GPT-2's byte-level BPE).
    fn is_byte_level(&self) -> bool {
        self.tokenizer
            .get_decoder()
            .and_then(|decoder| serde_json::to_string(decoder).ok())
            .is_some_and(|json| json.contains("\"ByteLevel\""))
    }
}

/// The bytes a vocabulary entry stands for (see [`ChatTokenizer::token_bytes`]).
fn spelled_bytes(token: String, added: bool, byte_level: bool) -> Vec<u8> {
    if added {
        return token.into_bytes();
    }
    if byte_level {
        let table = byte_level_table();
        if let Some(bytes) = token
            .chars()
            .map(|c| table.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
        {
            return bytes;
        }
    }
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
        && hex.len() == 2
        && let Ok(byte) = u8::from_str_radix(hex, 16)
    {
        return vec![byte];
    }
    token.replace('\u{2581}', " ").into_bytes()
}

/// GPT-2's byte-level alphabet backwards: the character each byte is written as, to the byte.
fn byte_level_table() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        // Printable bytes stand for themselves; the others, in order, for U+0100 onwards.
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut next = 0x100u32;
        (0..=255u8)
            .map(|b| {
                if printable(b) {
                    (char::from(b), b)
                } else {
                    let c = char::from_u32(next).expect("below U+0200");
                    next += 1;
                    (c, b)
                }
            })
            .collect()
    })
}

/// Incremental decoding for streaming (the `tokenizers` crate's `DecodeStream`): text is
/// released once it is complete, so a character split over several byte tokens comes out whole.
pub struct TextStream<'a> {
    stream: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
    source: &'a str,
}

impl std::fmt::Debug for TextStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextStream")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl TextStream<'_> {
    /// Adds one token; returns the new text it completes (possibly empty).
    ///
    /// # Errors
    /// [`LlmError::Tokenizer`] for an id outside the vocabulary.
    pub fn push(&mut self, id: u32) -> LlmResult<String> {
        match self.stream.step(id) {
            Ok(piece) => Ok(piece.unwrap_or_default()),
            Err(e) => Err(LlmError::Tokenizer {
                source_name: self.source.to_string(),
                reason: e.to_string(),
            }),
        }
    }
}

/// Where a model's files are: a GGUF file, or a Hugging Face directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A `.gguf` file.
    Gguf(PathBuf),
    /// A directory with `config.json`, safetensors and `tokenizer.json`.
    HuggingFace(PathBuf),
}

impl ModelSource {
    /// Recognises `path`: a directory is a Hugging Face model, a file must be GGUF.
    ///
    /// # Errors
    /// [`LlmError::Io`] when `path` does not exist.
    pub fn of(path: impl AsRef<Path>) -> LlmResult<Self> {
        let path = path.as_ref();
        let metadata = std::fs::metadata(path).map_err(|e| LlmError::io(path, e))?;
        Ok(if metadata.is_dir() {
            ModelSource::HuggingFace(path.to_path_buf())
        } else {
            ModelSource::Gguf(path.to_path_buf())
        })
    }
}

/// Runs a `tokenizers` deserialisation, turning a panic into an error: `tokenizers` 0.22 panics
/// ("Helper") on some malformed sections of a `tokenizer.json` instead of returning its error.
fn unpanicked<T>(parse: impl FnOnce() -> std::result::Result<T, String>) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!(
            "the tokenizers library could not read it (it panicked: {message})"
        ))
    })
}
