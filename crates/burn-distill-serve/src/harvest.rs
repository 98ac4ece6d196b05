//! The harvest client: asks an OpenAI-compatible endpoint to answer a prompt set and writes the
//! answers (with their top log-probabilities, where asked) to a transfer set, with its
//! provenance card.
//!
//! Requests run `concurrency` at a time on tokio with `reqwest`. A request that fails with 429,
//! a 5xx status, a dropped connection, a timeout or a cut JSON body is retried after
//! exponential backoff with jitter, or after the server's `Retry-After`; other statuses (400,
//! 401, 404, ...) stop the harvest with the server's message. Each response's records are
//! appended to `records.jsonl` as soon as it arrives, so a killed harvest loses at most the
//! requests in flight: run again with the same settings, it skips the keys (prompt fingerprint
//! and sample) the file holds. The API key is read from an environment variable and only ever
//! sent in the `Authorization` header.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use burn_distill_data::ChatPrompt;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::StatusCode;
use serde_json::json;

use crate::api::{ChatResponse, CompletionResponse, ModelList, TokenLogprob, TopLogprob};
use crate::error::{Result, ServeError};
use crate::transfer::{
    Api, Counts, PromptSource, ProvenanceCard, RECORDS_FILE, Record, RequestParams, TRANSFER_SET_VERSION,
    prompts_fingerprint, read_card, read_records, record_key, write_card,
};

/// How to harvest.
#[derive(Debug, Clone, PartialEq)]
pub struct HarvestOptions {
    /// The API's base URL, e.g. `http://127.0.0.1:8080/v1`.
    pub endpoint: String,
    /// The model to ask [default: the first `/models` lists].
    pub model: Option<String>,
    /// Chat or completions.
    pub api: Api,
    /// The environment variable holding the API key (none sent when it is unset).
    pub api_key_env: String,
    /// Answers per prompt.
    pub samples: usize,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// The most tokens per answer.
    pub max_tokens: usize,
    /// Top log-probabilities per answer token (the token-level path needs them).
    pub top_logprobs: Option<usize>,
    /// A seed; sample `s` is asked with `seed + s`, one request per sample.
    pub seed: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// The whole-request timeout.
    pub timeout: Duration,
    /// The connect timeout.
    pub connect_timeout: Duration,
    /// Retries per request after its first attempt.
    pub max_retries: usize,
    /// The first backoff; each retry doubles it, up to `max_backoff`, then jitter takes up to
    /// half off.
    pub backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// The longest `Retry-After` honoured (longer ones are cut to this).
    pub max_retry_after: Duration,
    /// Stop starting requests once this run's responses hold this many tokens (prompt and
    /// answer, as the server counts them); a later run with a larger budget resumes.
    pub token_budget: Option<u64>,
    /// The largest response body accepted.
    pub max_response_bytes: usize,
    /// The terms under which the teacher's outputs may be used: required.
    pub terms: String,
    /// A progress bar on standard error.
    pub progress: bool,
}

impl HarvestOptions {
    /// Options for `endpoint` and `terms`: chat API, key from `OPENAI_API_KEY`, one greedy
    /// sample of up to 256 tokens, 4 requests at once, 120 s timeout, 6 retries from 0.5 s
    /// to 30 s, `Retry-After` up to 5 minutes, 32 MiB bodies.
    pub fn new(endpoint: impl Into<String>, terms: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            model: None,
            api: Api::Chat,
            api_key_env: "OPENAI_API_KEY".into(),
            samples: 1,
            temperature: 0.0,
            top_p: None,
            max_tokens: 256,
            top_logprobs: None,
            seed: None,
            concurrency: 4,
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            max_retries: 6,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
            token_budget: None,
            max_response_bytes: 32 << 20,
            terms: terms.into(),
            progress: false,
        }
    }

    fn check(&self) -> Result<()> {
        if self.terms.trim().is_empty() {
            return Err(ServeError::option(
                "--terms",
                "state the terms under which the teacher's outputs may be used, e.g. --terms \"Apache-2.0, SmolLM2-135M-Instruct\"; the harvest does not start without them",
            ));
        }
        if self.samples == 0 {
            return Err(ServeError::option("--samples", "must be at least 1"));
        }
        if self.concurrency == 0 {
            return Err(ServeError::option("--concurrency", "must be at least 1"));
        }
        if self.max_tokens == 0 {
            return Err(ServeError::option("--max-tokens", "must be at least 1"));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(ServeError::option(
                "--temperature",
                format!("{} is outside [0, 2]", self.temperature),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ServeError::option("--top-p", format!("{p} is outside (0, 1]")));
        }
        if let Some(k) = self.top_logprobs
            && k > crate::server::MAX_TOP_LOGPROBS
        {
            return Err(ServeError::option(
                "--top-logprobs",
                format!("{k}; the API allows at most {}", crate::server::MAX_TOP_LOGPROBS),
            ));
        }
        if self.api == Api::Completions && self.top_logprobs.is_some_and(|k| k > 5) {
            return Err(ServeError::option(
                "--top-logprobs",
                "the completions API allows at most 5; use the chat API for more",
            ));
        }
        Ok(())
    }
}

/// What a harvest did.
#[derive(Debug, Clone, PartialEq)]
pub struct HarvestReport {
    /// The model that answered.
    pub model: String,
    /// Records in the set now.
    pub records: usize,
    /// Records an earlier run had written.
    pub resumed: usize,
    /// Requests sent (first attempts).
    pub requests: usize,
    /// Retries after failed attempts.
    pub retries: usize,
    /// Tokens this run's responses held (prompt and answer).
    pub tokens: u64,
    /// Answer tokens this run.
    pub completion_tokens: u64,
    /// Seconds.
    pub seconds: f64,
    /// Every prompt has all its samples.
    pub complete: bool,
}

/// The endpoint as the card records it: scheme, host, port and path; credentials, query and
/// fragment are refused or dropped.
///
/// # Errors
/// [`ServeError::Option`] for a URL that does not parse, is not http(s), or holds credentials.
pub fn endpoint_for_card(endpoint: &str) -> Result<reqwest::Url> {
    let mut url = reqwest::Url::parse(endpoint)
        .map_err(|e| ServeError::option("--endpoint", format!("{endpoint:?} is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ServeError::option(
            "--endpoint",
            format!("{endpoint:?}: only http and https"),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ServeError::option(
            "--endpoint",
            "the URL holds credentials; put the key in the environment variable --api-key-env names",
        ));
    }
    url.set_query(None);
    url.set_fragment(None);
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// A failed attempt: retry it, or give up.
enum Attempt {
    Retry { reason: String, after: Option<Duration> },
    Fatal(ServeError),
}

struct Client {
    http: reqwest::Client,
    key: Option<String>,
    options: HarvestOptions,
    retries: AtomicUsize,
    requests: AtomicUsize,
}

impl Client {
    /// One request with retries; the parsed JSON body of the first success.
    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        url: &reqwest::Url,
        body: Option<&serde_json::Value>,
    ) -> Result<T> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut last = String::new();
        for attempt in 0..=self.options.max_retries {
            if attempt > 0 {
                self.retries.fetch_add(1, Ordering::Relaxed);
            }
            match self.attempt(url, body).await {
                Ok(value) => return Ok(value),
                Err(Attempt::Fatal(error)) => return Err(error),
                Err(Attempt::Retry { reason, after }) => {
                    last = reason;
                    if attempt == self.options.max_retries {
                        break;
                    }
                    let delay = match after {
                        Some(after) => after.min(self.options.max_retry_after),
                        None => self.backoff(attempt),
                    };
                    tokio::time::sleep(delay).await;
                }
            }
        }
        Err(ServeError::RetriesExhausted {
            url: url.to_string(),
            attempts: self.options.max_retries + 1,
            last,
        })
    }

    /// Exponential backoff with jitter: `base × 2^attempt`, at most `max_backoff`, then a
    /// random share of up to half taken off.
    fn backoff(&self, attempt: usize) -> Duration {
        let base = self.options.backoff.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
        let capped = base.min(self.options.max_backoff.as_secs_f64());
        // Jitter from the clock: clients that failed together do not retry together.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        let noise = xxhash_rust::xxh3::xxh3_64(&[nanos.to_le_bytes(), (attempt as u32).to_le_bytes()].concat());
        let jitter = 0.5 + 0.5 * (noise >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(capped * jitter)
    }

    async fn attempt<T: serde::de::DeserializeOwned>(
        &self,
        url: &reqwest::Url,
        body: Option<&serde_json::Value>,
    ) -> std::result::Result<T, Attempt> {
        let mut request = match body {
            Some(body) => self.http.post(url.clone()).json(body),
            None => self.http.get(url.clone()),
        };
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| Attempt::Retry {
            reason: describe(&e),
            after: None,
        })?;
        let status = response.status();
        let after = retry_after(response.headers());
        let bytes = self.read_body(url, response).await?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| Attempt::Retry {
                reason: format!("the {status} response is not the JSON expected ({e}); a cut or garbled body"),
                after: None,
            });
        }
        let message = serde_json::from_slice::<crate::api::ErrorBody>(&bytes)
            .map(|body| body.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).into_owned());
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            Err(Attempt::Retry {
                reason: format!("{status}: {message}"),
                after,
            })
        } else {
            Err(Attempt::Fatal(ServeError::Refused {
                url: url.to_string(),
                status: status.as_u16(),
                message,
            }))
        }
    }

    /// The body, refused past `max_response_bytes` (checked as it arrives, not after).
    async fn read_body(
        &self,
        url: &reqwest::Url,
        response: reqwest::Response,
    ) -> std::result::Result<Vec<u8>, Attempt> {
        let limit = self.options.max_response_bytes;
        let too_large = || {
            Attempt::Fatal(ServeError::Protocol {
                url: url.to_string(),
                reason: format!("the response body is over {limit} bytes (HarvestOptions::max_response_bytes)"),
            })
        };
        if response.content_length().is_some_and(|length| length > limit as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        let mut chunks = response.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| Attempt::Retry {
                reason: format!("the body was cut: {}", describe(&e)),
                after: None,
            })?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// A reqwest error without the URL's query (keys never travel in URLs here, but be sure).
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "the body failed"
    } else {
        "the request failed"
    };
    let mut source = std::error::Error::source(error);
    let mut detail = String::new();
    while let Some(cause) = source {
        detail = cause.to_string();
        source = cause.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} ({detail})")
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Asks `options.endpoint` to answer `prompts` and writes the transfer set into `out`
/// (`card.json`, `records.jsonl`); resumes a set that `out` holds from the same settings.
/// `prompt_file` is recorded on the card.
///
/// # Errors
/// [`ServeError::Option`] for bad options (no terms, above all) before anything is sent or
/// written; [`ServeError::OtherTransferSet`] when `out` holds a set made otherwise;
/// [`ServeError::Refused`], [`ServeError::RetriesExhausted`] or [`ServeError::Protocol`] when
/// the endpoint fails (what was answered is kept); [`ServeError::Io`].
pub async fn harvest(
    prompts: &[ChatPrompt],
    prompt_file: Option<&Path>,
    out: &Path,
    options: &HarvestOptions,
) -> Result<HarvestReport> {
    let started = Instant::now();
    options.check()?;
    if prompts.is_empty() {
        return Err(ServeError::option("--prompts", "the prompt set is empty"));
    }
    if options.api == Api::Completions
        && let Some(prompt) = prompts.iter().find(|p| p.messages.len() != 1)
    {
        return Err(ServeError::option(
            "--api completions",
            format!(
                "prompt {:?} has {} messages; the completions API takes one text (use the chat API)",
                prompt.id,
                prompt.messages.len()
            ),
        ));
    }
    let base = endpoint_for_card(&options.endpoint)?;
    let key = std::env::var(&options.api_key_env).ok().filter(|key| !key.is_empty());
    let http = reqwest::Client::builder()
        .timeout(options.timeout)
        .connect_timeout(options.connect_timeout)
        .user_agent(concat!("burn-distill-serve/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ServeError::option("--endpoint", format!("no HTTP client: {e}")))?;
    let client = Arc::new(Client {
        http,
        key,
        options: options.clone(),
        retries: AtomicUsize::new(0),
        requests: AtomicUsize::new(0),
    });
    let join = |path: &str| {
        base.join(path)
            .map_err(|e| ServeError::option("--endpoint", format!("{base}{path}: {e}")))
    };
    let model = match &options.model {
        Some(model) => model.clone(),
        None => {
            let list: ModelList = client.send(&join("models")?, None).await?;
            list.data
                .first()
                .map(|card| card.id.clone())
                .ok_or_else(|| ServeError::Protocol {
                    url: join("models").map(|u| u.to_string()).unwrap_or_default(),
                    reason: "it lists no model; name one with --model".into(),
                })?
        }
    };

    // The card: new, or the saved one when its settings are these.
    let now = now_rfc3339();
    let mut card = ProvenanceCard {
        format_version: TRANSFER_SET_VERSION,
        teacher_model: model.clone(),
        endpoint: base.to_string(),
        api: options.api,
        request: RequestParams {
            samples: options.samples,
            temperature: options.temperature,
            top_p: options.top_p,
            max_tokens: options.max_tokens,
            top_logprobs: options.top_logprobs,
            seed: options.seed,
        },
        prompts: PromptSource {
            file: prompt_file.map(|p| p.display().to_string()),
            fingerprint: prompts_fingerprint(prompts),
            count: prompts.len(),
        },
        terms: options.terms.trim().to_string(),
        started: now.clone(),
        updated: now,
        counts: Counts::default(),
        complete: false,
        tool: concat!("burn-distill-serve ", env!("CARGO_PKG_VERSION")).into(),
    };
    fs::create_dir_all(out).map_err(|e| ServeError::io(out, e))?;
    let records_path = out.join(RECORDS_FILE);
    if out.join(crate::transfer::CARD_FILE).exists() {
        let saved = read_card(out)?;
        if let Some((field, saved_value, now_value)) = saved.differs_from(&card) {
            return Err(ServeError::OtherTransferSet {
                dir: out.to_path_buf(),
                field,
                saved: saved_value,
                now: now_value,
            });
        }
        card.started = saved.started;
        card.prompts.file = saved.prompts.file.or(card.prompts.file);
    } else if records_path.exists() {
        return Err(ServeError::corrupt(
            &records_path,
            "records without a card: not a transfer set this tool wrote",
        ));
    }
    let (saved, _) = read_records(&records_path, true)?;
    let keys: HashMap<&str, usize> = prompts
        .iter()
        .enumerate()
        .map(|(index, prompt)| (prompt.id.as_str(), index))
        .collect();
    let done: HashSet<String> = saved.iter().map(|r| r.key.clone()).collect();
    for record in &saved {
        let known = keys
            .get(record.id.as_str())
            .is_some_and(|&index| record.key == record_key(&prompts[index], record.sample));
        if !known || record.sample >= options.samples {
            return Err(ServeError::corrupt(
                &records_path,
                format!("record {} is not an answer to this prompt set", record.key),
            ));
        }
    }
    card.counts = totals(&saved);
    write_card(out, &card)?;

    // Work: per prompt, the samples not yet answered.
    let work: Vec<(usize, Vec<usize>)> = prompts
        .iter()
        .enumerate()
        .map(|(index, prompt)| {
            let missing: Vec<usize> = (0..options.samples)
                .filter(|&s| !done.contains(&record_key(prompt, s)))
                .collect();
            (index, missing)
        })
        .filter(|(_, missing)| !missing.is_empty())
        .collect();
    let total = prompts.len() * options.samples;
    let bar = if options.progress {
        ProgressBar::new(total as u64).with_style(
            ProgressStyle::with_template("harvest {bar:30} {pos}/{len} answers [{elapsed} < {eta}] {msg}")
                .expect("a valid template"),
        )
    } else {
        ProgressBar::hidden()
    };
    bar.set_position(saved.len() as u64);
    let url = join(match options.api {
        Api::Chat => "chat/completions",
        Api::Completions => "completions",
    })?;
    let used = Arc::new(AtomicU64::new(0));
    let budget_hit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&records_path)
        .map_err(|e| ServeError::io(&records_path, e))?;
    let mut written = saved.len();
    let mut completion_tokens = 0u64;
    let mut run_tokens = 0u64;
    let answer_started = Instant::now();
    let mut results = futures_util::stream::iter(work)
        .map(|(index, missing)| {
            let client = Arc::clone(&client);
            let url = url.clone();
            let model = model.clone();
            let used = Arc::clone(&used);
            let budget_hit = Arc::clone(&budget_hit);
            async move {
                if let Some(budget) = client.options.token_budget
                    && used.load(Ordering::Relaxed) >= budget
                {
                    budget_hit.store(true, Ordering::Relaxed);
                    return Ok(Vec::new());
                }
                let records = answer(&client, &url, &model, &prompts[index], index, &missing).await?;
                let tokens: u64 = records.iter().map(|r| r.prompt_tokens + r.completion_tokens).sum();
                used.fetch_add(tokens, Ordering::Relaxed);
                Ok::<_, ServeError>(records)
            }
        })
        .buffer_unordered(options.concurrency);
    let mut failure = None;
    while let Some(result) = results.next().await {
        match result {
            Ok(records) if records.is_empty() => {}
            Ok(records) => {
                let mut lines = String::new();
                for record in &records {
                    lines.push_str(&serde_json::to_string(record).expect("records serialise"));
                    lines.push('\n');
                    completion_tokens += record.completion_tokens;
                    run_tokens += record.prompt_tokens + record.completion_tokens;
                }
                // One write per response: a kill cuts at most its last line, which the next
                // run drops.
                file.write_all(lines.as_bytes())
                    .and_then(|()| file.sync_data())
                    .map_err(|e| ServeError::io(&records_path, e))?;
                written += records.len();
                card.counts.records += records.len();
                card.counts.prompt_tokens += records.iter().map(|r| r.prompt_tokens).sum::<u64>();
                card.counts.completion_tokens += records.iter().map(|r| r.completion_tokens).sum::<u64>();
                bar.set_position(written as u64);
                let seconds = answer_started.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "{completion_tokens} answer tokens, {:.1} tokens/s",
                    completion_tokens as f64 / seconds
                ));
            }
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    drop(results);
    bar.finish_and_clear();
    card.complete = written == total;
    card.updated = now_rfc3339();
    write_card(out, &card)?;
    if let Some(error) = failure {
        return Err(error);
    }
    Ok(HarvestReport {
        model,
        records: written,
        resumed: saved.len(),
        requests: client.requests.load(Ordering::Relaxed),
        retries: client.retries.load(Ordering::Relaxed),
        tokens: run_tokens,
        completion_tokens,
        seconds: started.elapsed().as_secs_f64(),
        complete: card.complete,
    })
}

/// [`harvest`] on a tokio runtime of its own, for callers without one.
///
/// # Errors
/// As [`harvest`]; [`ServeError::Io`] when no runtime can be started.
pub fn harvest_blocking(
    prompts: &[ChatPrompt],
    prompt_file: Option<&Path>,
    out: &Path,
    options: &HarvestOptions,
) -> Result<HarvestReport> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ServeError::io(out, e))?
        .block_on(harvest(prompts, prompt_file, out, options))
}

fn totals(records: &[Record]) -> Counts {
    Counts {
        records: records.len(),
        prompt_tokens: records.iter().map(|r| r.prompt_tokens).sum(),
        completion_tokens: records.iter().map(|r| r.completion_tokens).sum(),
    }
}

/// Every missing sample of one prompt: one request for all of them (`n`), or one per sample
/// when a seed is set; samples a server leaves out (some ignore `n`) are asked again.
async fn answer(
    client: &Client,
    url: &reqwest::Url,
    model: &str,
    prompt: &ChatPrompt,
    index: usize,
    missing: &[usize],
) -> Result<Vec<Record>> {
    let options = &client.options;
    let mut records = Vec::new();
    let mut left: Vec<usize> = missing.to_vec();
    while !left.is_empty() {
        let n = if options.seed.is_some() { 1 } else { left.len() };
        let mut body = json!({
            "model": model,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
        });
        let fields = body.as_object_mut().expect("an object");
        if n > 1 {
            fields.insert("n".into(), json!(n));
        }
        if let Some(p) = options.top_p {
            fields.insert("top_p".into(), json!(p));
        }
        if let Some(seed) = options.seed {
            fields.insert("seed".into(), json!(seed.wrapping_add(left[0] as u64)));
        }
        let answers: Vec<(String, Option<String>, Option<Vec<TokenLogprob>>)>;
        let (usage, served_model);
        match options.api {
            Api::Chat => {
                fields.insert("messages".into(), json!(prompt.messages));
                if let Some(k) = options.top_logprobs {
                    fields.insert("logprobs".into(), json!(true));
                    fields.insert("top_logprobs".into(), json!(k));
                }
                let response: ChatResponse = client.send(url, Some(&body)).await?;
                served_model = response.model;
                usage = response.usage;
                answers = response
                    .choices
                    .into_iter()
                    .map(|c| {
                        let tokens = c.logprobs.and_then(|l| l.content);
                        (c.message.content.unwrap_or_default(), c.finish_reason, tokens)
                    })
                    .collect();
            }
            Api::Completions => {
                fields.insert("prompt".into(), json!(prompt.messages[0].content));
                if let Some(k) = options.top_logprobs {
                    fields.insert("logprobs".into(), json!(k));
                }
                let response: CompletionResponse = client.send(url, Some(&body)).await?;
                served_model = response.model;
                usage = response.usage;
                answers = response
                    .choices
                    .into_iter()
                    .map(|c| {
                        let tokens = c.logprobs.map(|l| from_legacy(&l));
                        (c.text, c.finish_reason, tokens)
                    })
                    .collect();
            }
        }
        if answers.is_empty() {
            return Err(ServeError::Protocol {
                url: url.to_string(),
                reason: format!("the response to prompt {:?} has no choices", prompt.id),
            });
        }
        if options.top_logprobs.is_some() && answers.iter().any(|(_, _, tokens)| tokens.is_none()) {
            return Err(ServeError::Protocol {
                url: url.to_string(),
                reason: "log-probabilities were asked for and the response has none: this endpoint does not give them (drop --top-logprobs for the sequence-level path only)".into(),
            });
        }
        let usage = usage.unwrap_or_default();
        let count = answers.len().min(left.len());
        let per_answer = usage.completion_tokens / count as u64;
        for (i, (answer, finish_reason, tokens)) in answers.into_iter().take(count).enumerate() {
            let sample = left[i];
            let completion_tokens = match &tokens {
                Some(tokens) => tokens.len() as u64,
                None if i == 0 => usage.completion_tokens - per_answer * (count as u64 - 1),
                None => per_answer,
            };
            records.push(Record {
                key: record_key(prompt, sample),
                id: prompt.id.clone(),
                index,
                sample,
                messages: prompt.messages.clone(),
                answer,
                finish_reason,
                tokens,
                model: if served_model.is_empty() {
                    model.to_string()
                } else {
                    served_model.clone()
                },
                prompt_tokens: if i == 0 { usage.prompt_tokens } else { 0 },
                completion_tokens,
            });
        }
        left.drain(..count);
    }
    Ok(records)
}

/// The legacy completions log-probabilities as chat-style token entries (no bytes).
fn from_legacy(logprobs: &crate::api::CompletionLogprobs) -> Vec<TokenLogprob> {
    logprobs
        .tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let mut top: Vec<TopLogprob> = logprobs
                .top_logprobs
                .get(i)
                .and_then(Option::as_ref)
                .map(|map| {
                    map.iter()
                        .filter_map(|(token, value)| {
                            value.as_f64().map(|logprob| TopLogprob {
                                token: token.clone(),
                                logprob,
                                bytes: None,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
            TokenLogprob {
                token: token.clone(),
                logprob: logprobs.token_logprobs.get(i).copied().flatten().unwrap_or(f64::NAN),
                bytes: None,
                top_logprobs: top,
            }
        })
        .collect()
}
