//! An OpenAI-compatible server for a [`Llama`] and its tokenizer: `/v1/chat/completions`,
//! `/v1/completions` and `/v1/models`, with `logprobs` / `top_logprobs`, streaming over
//! server-sent events, an optional bearer token and limits on body size and `max_tokens`.
//!
//! One worker thread owns the model. Requests that arrive while it decodes wait in a bounded
//! queue; when it is free it takes every waiting row (up to [`ServeOptions::max_batch`], after
//! waiting [`ServeOptions::batch_window`] for more) and decodes those that sample alike in one
//! KV-cached batch. A full queue answers 503 with `Retry-After`. Batches are formed between
//! decodes, not within one (no continuous batching).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use burn_distill_model::SamplingConfig;
use burn_distill_model::llm::{ChatTokenizer, FinishReason, GenerateOptions, Llama, StopStrings, TokenLogprobs};
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::api::{
    AssistantMessage, ChatChoice, ChatLogprobs, ChatRequest, CompletionChoice, CompletionLogprobs, CompletionRequest,
    ErrorBody, ErrorDetail, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage,
};

/// Limits and batching of a server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeOptions {
    /// The name `/v1/models` reports and requests must give.
    pub model_id: String,
    /// When set, every `/v1` request needs `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// The largest request body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// The largest `max_tokens` a request may ask (400 above).
    pub max_tokens_limit: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// The most `n` (samples per prompt) a request may ask.
    pub max_n: usize,
    /// Rows decoded together at most.
    pub max_batch: usize,
    /// How long the worker waits for more rows before decoding a batch.
    pub batch_window: Duration,
    /// Rows that may wait; more are refused with 503 and `Retry-After`.
    pub queue: usize,
}

impl ServeOptions {
    /// Defaults for a model named `model_id`: no token, 1 MiB bodies, `max_tokens` up to
    /// 1 024 (256 when not given), `n` up to 16, batches of up to 16 rows gathered for 5 ms,
    /// 256 waiting rows.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self {
            model_id: model_id.into(),
            bearer_token: None,
            max_body_bytes: 1 << 20,
            max_tokens_limit: 1024,
            default_max_tokens: 256,
            max_n: 16,
            max_batch: 16,
            batch_window: Duration::from_millis(5),
            queue: 256,
        }
    }
}

/// The most `top_logprobs` OpenAI's API allows.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What the worker reports for one row.
#[derive(Debug)]
enum RowEvent {
    /// New text (possibly empty) and the token's log-probabilities.
    Token {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The row is finished.
    Done {
        finish: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The model failed.
    Failed(String),
}

/// One row to decode.
struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingConfig,
    top_logprobs: Option<usize>,
    stops: StopStrings,
    choice: usize,
    events: UnboundedSender<(usize, RowEvent)>,
}

impl Job {
    /// Rows with one key sample alike and can share a decode.
    fn key(&self) -> String {
        format!("{:?}", self.sampling)
    }
}

struct Shared {
    options: ServeOptions,
    tokenizer: Arc<ChatTokenizer>,
    context: usize,
    jobs: SyncSender<Job>,
    next_id: AtomicU64,
    created: u64,
}

/// What the worker has done: decodes run and rows decoded (their ratio is the mean batch).
#[derive(Debug, Default)]
pub struct ServerStats {
    decodes: AtomicU64,
    rows: AtomicU64,
}

impl ServerStats {
    /// Batches decoded.
    pub fn decodes(&self) -> u64 {
        self.decodes.load(Ordering::Relaxed)
    }

    /// Rows (prompt × sample) decoded, over all batches.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }
}

/// The router of a server for `model` (the worker thread starts now and ends when the router
/// and every clone of it are dropped).
pub fn router(model: Llama, tokenizer: ChatTokenizer, options: ServeOptions) -> Router {
    router_with_stats(model, tokenizer, options).0
}

/// [`router`], with the worker's [`ServerStats`].
pub fn router_with_stats(model: Llama, tokenizer: ChatTokenizer, options: ServeOptions) -> (Router, Arc<ServerStats>) {
    let stats = Arc::new(ServerStats::default());
    let worker_stats = Arc::clone(&stats);
    let tokenizer = Arc::new(tokenizer);
    let (jobs, queue) = std::sync::mpsc::sync_channel(options.queue.max(1));
    let context = model.config().max_position_embeddings;
    let worker_tokenizer = Arc::clone(&tokenizer);
    let (max_batch, window) = (options.max_batch.max(1), options.batch_window);
    std::thread::Builder::new()
        .name("burn-distill-serve worker".into())
        .spawn(move || worker(&model, &worker_tokenizer, &queue, max_batch, window, &worker_stats))
        .expect("the worker thread starts");
    let body_limit = options.max_body_bytes;
    let shared = Arc::new(Shared {
        options,
        tokenizer,
        context,
        jobs,
        next_id: AtomicU64::new(0),
        created: unix_seconds(),
    });
    let router = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found_error", None, None, "no such route") })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(shared);
    (router, stats)
}

/// Serves `model` on `listener` until `shutdown` completes.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Llama,
    tokenizer: ChatTokenizer,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(model, tokenizer, options))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` and serves there until Ctrl-C or SIGTERM, on a tokio runtime of its own;
/// `ready(addr)` is called once it listens.
///
/// # Errors
/// When the address cannot be bound or the listener fails.
pub fn serve_until_signal(
    addr: SocketAddr,
    model: Llama,
    tokenizer: ChatTokenizer,
    options: ServeOptions,
    ready: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        ready(listener.local_addr()?);
        serve(listener, model, tokenizer, options, async {
            #[cfg(unix)]
            {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM can be caught");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}

/// Binds `addr` and serves there on a runtime of its own in a background thread; returns the
/// bound address (port 0 picks a free one) and a handle whose drop stops the server.
///
/// # Errors
/// When the address cannot be bound.
pub fn spawn(
    addr: SocketAddr,
    model: Llama,
    tokenizer: ChatTokenizer,
    options: ServeOptions,
) -> std::io::Result<ServerHandle> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (app, stats) = router_with_stats(model, tokenizer, options);
    runtime.spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok(ServerHandle {
        addr,
        stop: Some(stop),
        runtime: Some(runtime),
        stats,
    })
}

/// A server started by [`spawn`]; dropping it stops the server.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    stats: Arc<ServerStats>,
}

impl ServerHandle {
    /// What its worker has done.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A refused request: an OpenAI-style error body with its status (and `Retry-After`).
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    message: String,
    retry_after: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: self.kind.into(),
                param: self.param.map(Into::into),
                code: self.code.map(Into::into),
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        response
    }
}

fn error(
    status: StatusCode,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    message: impl Into<String>,
) -> ApiError {
    ApiError {
        status,
        kind,
        param,
        code,
        message: message.into(),
        retry_after: None,
    }
}

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some(param),
        None,
        message,
    )
}

/// Checks the bearer token, then reads the body as JSON of `T`.
fn admit<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    authorize(shared, headers)?;
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            error(
                status,
                "invalid_request_error",
                None,
                Some("request_too_large"),
                format!("the request body is over {} bytes", shared.options.max_body_bytes),
            )
        } else {
            error(status, "invalid_request_error", None, None, rejection.body_text())
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            None,
            format!("the body is not a valid request: {e}"),
        )
    })
}

fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &shared.options.bearer_token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let unauthorized = |message: &str| {
        error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
            message,
        )
    };
    match given {
        None => Err(unauthorized("no bearer token: send `Authorization: Bearer <token>`")),
        // Every byte compared, whatever the first difference: no timing hint.
        Some(token)
            if token.len() == expected.len()
                && token
                    .bytes()
                    .zip(expected.bytes())
                    .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                    == 0 =>
        {
            Ok(())
        }
        Some(_) => Err(unauthorized("the bearer token is wrong")),
    }
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(error) = authorize(&shared, &headers) {
        return error.into_response();
    }
    axum::Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: shared.options.model_id.clone(),
            object: "model".into(),
            created: shared.created,
            owned_by: "burn-distill".into(),
        }],
    })
    .into_response()
}

/// What every request shares: checked sampling and limits.
struct Common {
    n: usize,
    max_tokens: usize,
    sampling: SamplingConfig,
    top_logprobs: Option<usize>,
    stops: StopStrings,
    stream: bool,
}

#[allow(clippy::too_many_arguments)]
fn common(
    shared: &Shared,
    model: &str,
    n: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<usize>,
    top_logprobs: Option<usize>,
    stop: Option<&crate::api::Stop>,
    seed: Option<u64>,
    stream: Option<bool>,
) -> Result<Common, ApiError> {
    let options = &shared.options;
    if model != options.model_id {
        return Err(error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
            format!(
                "the model `{model}` does not exist; this server has `{}`",
                options.model_id
            ),
        ));
    }
    let n = n.unwrap_or(1);
    if n == 0 || n > options.max_n {
        return Err(invalid("n", format!("n is {n}; it must be in 1..={}", options.max_n)));
    }
    let temperature = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(
            "temperature",
            format!("temperature {temperature} is outside [0, 2]"),
        ));
    }
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(invalid("top_p", format!("top_p {p} is outside (0, 1]")));
    }
    let max_tokens = max_tokens.unwrap_or(options.default_max_tokens.min(options.max_tokens_limit));
    if max_tokens == 0 || max_tokens > options.max_tokens_limit {
        return Err(invalid(
            "max_tokens",
            format!(
                "max_tokens is {max_tokens}; this server allows 1..={}",
                options.max_tokens_limit
            ),
        ));
    }
    if let Some(k) = top_logprobs
        && k > MAX_TOP_LOGPROBS
    {
        return Err(invalid(
            "top_logprobs",
            format!("top_logprobs is {k}; at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    let stops = stop.map(crate::api::Stop::strings).unwrap_or_default();
    if stops.len() > 4 {
        return Err(invalid("stop", format!("{} stop strings; at most 4", stops.len())));
    }
    // p = 1 keeps every token: the same as no top-p.
    let top_p = top_p.filter(|&p| p < 1.0);
    Ok(Common {
        n,
        max_tokens,
        sampling: SamplingConfig::new()
            .with_temperature(temperature)
            .with_top_p(top_p)
            .with_seed(seed.unwrap_or(0)),
        top_logprobs,
        stops: StopStrings::new(&stops),
        stream: stream.unwrap_or(false),
    })
}

/// Queues one row per prompt and sample; `choice = prompt × n + sample`.
fn submit(
    shared: &Shared,
    prompts: Vec<Vec<u32>>,
    common: &Common,
) -> Result<UnboundedReceiver<(usize, RowEvent)>, ApiError> {
    for (index, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return Err(invalid("prompt", format!("prompt {index} has no tokens")));
        }
        if prompt.len() + common.max_tokens > shared.context {
            return Err(invalid(
                "max_tokens",
                format!(
                    "the prompt has {} tokens; with max_tokens {} that passes the model's context of {}",
                    prompt.len(),
                    common.max_tokens,
                    shared.context
                ),
            ));
        }
    }
    let (events, receiver) = unbounded_channel();
    let mut choice = 0;
    for prompt in prompts {
        for _ in 0..common.n {
            let job = Job {
                prompt: prompt.clone(),
                max_tokens: common.max_tokens,
                sampling: common.sampling.clone(),
                top_logprobs: common.top_logprobs,
                stops: common.stops.clone(),
                choice,
                events: events.clone(),
            };
            choice += 1;
            match shared.jobs.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    return Err(ApiError {
                        retry_after: Some("1"),
                        ..error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "server_error",
                            None,
                            Some("overloaded"),
                            "the server is busy: too many waiting requests; retry later",
                        )
                    });
                }
                Err(TrySendError::Disconnected(_)) => {
                    return Err(error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        None,
                        None,
                        "the model's worker has stopped",
                    ));
                }
            }
        }
    }
    Ok(receiver)
}

/// One choice's text, log-probabilities and end, gathered from the worker.
#[derive(Default)]
struct Gathered {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn gather(mut receiver: UnboundedReceiver<(usize, RowEvent)>, choices: usize) -> Result<Vec<Gathered>, ApiError> {
    let mut gathered: Vec<Gathered> = (0..choices).map(|_| Gathered::default()).collect();
    let mut open = choices;
    while open > 0 {
        let Some((choice, event)) = receiver.recv().await else {
            return Err(worker_gone());
        };
        let row = &mut gathered[choice];
        match event {
            RowEvent::Token { text, logprob } => {
                row.text.push_str(&text);
                row.logprobs.extend(logprob);
            }
            RowEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                row.finish = Some(finish);
                row.prompt_tokens = prompt_tokens;
                row.completion_tokens = completion_tokens;
                open -= 1;
            }
            RowEvent::Failed(message) => {
                return Err(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    None,
                    None,
                    message,
                ));
            }
        }
    }
    Ok(gathered)
}

fn worker_gone() -> ApiError {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        None,
        None,
        "the model's worker stopped before answering",
    )
}

fn usage(gathered: &[Gathered], prompt_tokens: usize) -> Usage {
    let prompt_tokens = prompt_tokens as u64;
    let completion_tokens: u64 = gathered.iter().map(|g| g.completion_tokens as u64).sum();
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let request: ChatRequest = match admit(&shared, &headers, body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    let top_logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        (true, k) => Some(k.unwrap_or(0)),
        (false, Some(_)) => return invalid("top_logprobs", "top_logprobs needs logprobs: true").into_response(),
        (false, None) => None,
    };
    let common = match common(
        &shared,
        &request.model,
        request.n,
        request.temperature,
        request.top_p,
        request.max_tokens,
        top_logprobs,
        request.stop.as_ref(),
        request.seed,
        request.stream,
    ) {
        Ok(common) => common,
        Err(error) => return error.into_response(),
    };
    if request.messages.is_empty() {
        return invalid("messages", "messages is empty").into_response();
    }
    let prompt = match shared.tokenizer.encode_chat(&request.messages, true) {
        Ok(prompt) => prompt,
        Err(e) => return invalid("messages", format!("the chat template cannot render them: {e}")).into_response(),
    };
    let prompt_len = prompt.len();
    let receiver = match submit(&shared, vec![prompt], &common) {
        Ok(receiver) => receiver,
        Err(error) => return error.into_response(),
    };
    let id = format!("chatcmpl-{}", shared.next_id.fetch_add(1, Ordering::Relaxed));
    let created = unix_seconds();
    let model = shared.options.model_id.clone();
    if common.stream {
        let with_logprobs = common.top_logprobs.is_some();
        let chunk = move |choice: usize,
                          delta: serde_json::Value,
                          logprobs: Option<TokenLogprob>,
                          finish: Option<&str>| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{
                    "index": choice,
                    "delta": delta,
                    "logprobs": if with_logprobs { json!({"content": logprobs.into_iter().collect::<Vec<_>>()}) } else { json!(null) },
                    "finish_reason": finish,
                }],
            })
        };
        return sse(receiver, common.n, move |choice, event, first| match event {
            RowEvent::Token { text, logprob } => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                Some(chunk(choice, delta, logprob, None))
            }
            RowEvent::Done { finish, .. } => Some(chunk(choice, json!({}), None, Some(finish))),
            RowEvent::Failed(_) => None,
        });
    }
    let gathered = match gather(receiver, common.n).await {
        Ok(gathered) => gathered,
        Err(error) => return error.into_response(),
    };
    let usage = usage(&gathered, prompt_len);
    let choices = gathered
        .into_iter()
        .enumerate()
        .map(|(index, row)| ChatChoice {
            index,
            message: AssistantMessage {
                role: "assistant".into(),
                content: Some(row.text),
            },
            finish_reason: row.finish.map(Into::into),
            logprobs: common.top_logprobs.map(|_| ChatLogprobs {
                content: Some(row.logprobs),
            }),
        })
        .collect();
    axum::Json(crate::api::ChatResponse {
        id,
        object: "chat.completion".into(),
        created,
        model,
        choices,
        usage: Some(usage),
    })
    .into_response()
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: CompletionRequest = match admit(&shared, &headers, body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    if request.echo.unwrap_or(false) {
        return invalid("echo", "echo is not supported").into_response();
    }
    let common = match common(
        &shared,
        &request.model,
        request.n,
        request.temperature,
        request.top_p,
        request.max_tokens,
        request.logprobs,
        request.stop.as_ref(),
        request.seed,
        request.stream,
    ) {
        Ok(common) => common,
        Err(error) => return error.into_response(),
    };
    let texts = request.prompt.texts();
    if texts.is_empty() {
        return invalid("prompt", "prompt is an empty list").into_response();
    }
    let mut prompts = Vec::with_capacity(texts.len());
    for text in texts {
        match shared.tokenizer.encode(text, true) {
            Ok(prompt) => prompts.push(prompt),
            Err(e) => return invalid("prompt", format!("it cannot be tokenized: {e}")).into_response(),
        }
    }
    let prompt_lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let choices = prompts.len() * common.n;
    let receiver = match submit(&shared, prompts, &common) {
        Ok(receiver) => receiver,
        Err(error) => return error.into_response(),
    };
    let id = format!("cmpl-{}", shared.next_id.fetch_add(1, Ordering::Relaxed));
    let created = unix_seconds();
    let model = shared.options.model_id.clone();
    let with_logprobs = common.top_logprobs.is_some();
    if common.stream {
        let chunk = move |choice: usize, text: String, logprobs: Option<CompletionLogprobs>, finish: Option<&str>| {
            json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": choice, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            })
        };
        return sse(receiver, choices, move |choice, event, _| match event {
            RowEvent::Token { text, logprob } => {
                let logprobs = with_logprobs.then(|| legacy_logprobs(logprob.as_slice(), 0));
                Some(chunk(choice, text, logprobs, None))
            }
            RowEvent::Done { finish, .. } => Some(chunk(choice, String::new(), None, Some(finish))),
            RowEvent::Failed(_) => None,
        });
    }
    let gathered = match gather(receiver, choices).await {
        Ok(gathered) => gathered,
        Err(error) => return error.into_response(),
    };
    let usage = usage(&gathered, prompt_lens.iter().sum());
    let choices = gathered
        .into_iter()
        .enumerate()
        .map(|(index, row)| CompletionChoice {
            index,
            logprobs: with_logprobs.then(|| legacy_logprobs(&row.logprobs, 0)),
            text: row.text,
            finish_reason: row.finish.map(Into::into),
        })
        .collect();
    axum::Json(crate::api::CompletionResponse {
        id,
        object: "text_completion".into(),
        created,
        model,
        choices,
        usage: Some(usage),
    })
    .into_response()
}

/// The legacy API's parallel lists; offsets count from `offset`.
fn legacy_logprobs(tokens: &[TokenLogprob], offset: usize) -> CompletionLogprobs {
    let mut at = offset;
    let mut logprobs = CompletionLogprobs {
        tokens: Vec::new(),
        token_logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        text_offset: Vec::new(),
    };
    for token in tokens {
        logprobs.tokens.push(token.token.clone());
        logprobs.token_logprobs.push(Some(token.logprob));
        logprobs.top_logprobs.push(Some(
            token
                .top_logprobs
                .iter()
                .map(|top| (top.token.clone(), json!(top.logprob)))
                .collect(),
        ));
        logprobs.text_offset.push(at);
        at += token.token.len();
    }
    logprobs
}

/// Server-sent events: one `data:` chunk per event `render` turns into JSON, then
/// `data: [DONE]` once every choice is finished (or an error event if the model fails).
fn sse(
    receiver: UnboundedReceiver<(usize, RowEvent)>,
    choices: usize,
    render: impl FnMut(usize, RowEvent, bool) -> Option<serde_json::Value> + Send + 'static,
) -> Response {
    struct StreamState<F> {
        receiver: UnboundedReceiver<(usize, RowEvent)>,
        open: usize,
        started: Vec<bool>,
        render: F,
        finished: bool,
    }
    let state = StreamState {
        receiver,
        open: choices,
        started: vec![false; choices],
        render,
        finished: false,
    };
    let events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, std::convert::Infallible>> + Send>> =
        Box::pin(stream::unfold(state, |mut state| async move {
            if state.finished {
                return None;
            }
            if state.open == 0 {
                state.finished = true;
                return Some((Ok(Event::default().data("[DONE]")), state));
            }
            loop {
                let Some((choice, event)) = state.receiver.recv().await else {
                    state.finished = true;
                    let body = json!({"error": {"message": "the model's worker stopped", "type": "server_error"}});
                    return Some((Ok(Event::default().data(body.to_string())), state));
                };
                if let RowEvent::Failed(message) = &event {
                    state.finished = true;
                    let body = json!({"error": {"message": message, "type": "server_error"}});
                    return Some((Ok(Event::default().data(body.to_string())), state));
                }
                if matches!(event, RowEvent::Done { .. }) {
                    state.open -= 1;
                }
                let first = !std::mem::replace(&mut state.started[choice], true);
                if let Some(chunk) = (state.render)(choice, event, first) {
                    return Some((Ok(Event::default().data(chunk.to_string())), state));
                }
            }
        }));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// The worker: waits for rows, gathers a batch, decodes it, repeats until every sender is gone.
fn worker(
    model: &Llama,
    tokenizer: &ChatTokenizer,
    queue: &Receiver<Job>,
    max_batch: usize,
    window: Duration,
    stats: &ServerStats,
) {
    // Ids past the tokenizer's (a padded head) have no bytes: empty.
    let bytes = tokenizer.vocabulary_bytes();
    let mut waiting: Vec<Job> = Vec::new();
    loop {
        if waiting.is_empty() {
            match queue.recv() {
                Ok(job) => waiting.push(job),
                Err(_) => return,
            }
        }
        let deadline = Instant::now() + window;
        while waiting.len() < max_batch {
            match queue.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => waiting.push(job),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // The first row's kind goes first; rows of other kinds wait for the next decode.
        let key = waiting[0].key();
        let (batch, rest): (Vec<Job>, Vec<Job>) = waiting.into_iter().partition(|job| job.key() == key);
        let (batch, mut overflow): (Vec<Job>, Vec<Job>) = {
            let mut batch = batch;
            let overflow = batch.split_off(batch.len().min(max_batch));
            (batch, overflow)
        };
        overflow.extend(rest);
        waiting = overflow;
        // Rows whose client has gone are dropped before any work.
        let batch: Vec<Job> = batch.into_iter().filter(|job| !job.events.is_closed()).collect();
        if !batch.is_empty() {
            stats.decodes.fetch_add(1, Ordering::Relaxed);
            stats.rows.fetch_add(batch.len() as u64, Ordering::Relaxed);
            decode(model, tokenizer, &bytes, batch);
        }
    }
}

fn token_logprob(bytes: &[Vec<u8>], logprobs: &TokenLogprobs, k: usize) -> TokenLogprob {
    let entry = |id: u32| {
        let raw = bytes.get(id as usize).cloned().unwrap_or_default();
        (String::from_utf8_lossy(&raw).into_owned(), raw)
    };
    let (token, raw) = entry(logprobs.token);
    TokenLogprob {
        token,
        logprob: f64::from(logprobs.logprob),
        bytes: Some(raw),
        top_logprobs: logprobs
            .top
            .iter()
            .take(k)
            .map(|&(id, logprob)| {
                let (token, raw) = entry(id);
                TopLogprob {
                    token,
                    logprob: f64::from(logprob),
                    bytes: Some(raw),
                }
            })
            .collect(),
    }
}

/// Decodes rows that sample alike in one KV-cached batch, streaming each row's text as it
/// completes: the text [`Llama::chat`] gives for the same prompt, stop strings cut.
fn decode(model: &Llama, tokenizer: &ChatTokenizer, bytes: &[Vec<u8>], batch: Vec<Job>) {
    #[derive(Clone, Copy, PartialEq)]
    enum End {
        Open,
        StopString,
        Length,
        Gone,
    }
    let eos = tokenizer.eos_ids().to_vec();
    let options = GenerateOptions {
        max_new_tokens: batch.iter().map(|job| job.max_tokens).max().unwrap_or(1),
        sampling: batch[0].sampling.clone(),
        stop_tokens: eos.clone(),
        logprobs: batch.iter().filter_map(|job| job.top_logprobs).max(),
    };
    let prompts: Vec<Vec<u32>> = batch.iter().map(|job| job.prompt.clone()).collect();
    let mut streams: Vec<_> = batch.iter().map(|_| tokenizer.decode_stream()).collect();
    let mut texts = vec![String::new(); batch.len()];
    let mut shown = vec![0usize; batch.len()];
    let mut ends = vec![End::Open; batch.len()];
    let mut counts = vec![0usize; batch.len()];
    let mut failure = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.generate_stream(&prompts, &options, |row, token, logprobs| {
            let job = &batch[row];
            if eos.contains(&token) {
                return true; // the row ends here; EOS is not part of the answer
            }
            counts[row] += 1;
            let piece = match streams[row].push(token) {
                Ok(piece) => piece,
                Err(e) => {
                    failure.get_or_insert_with(|| e.to_string());
                    return false;
                }
            };
            let text = &mut texts[row];
            text.push_str(&piece);
            let visible = match job.stops.find(text) {
                Some(cut) => {
                    text.truncate(cut);
                    ends[row] = End::StopString;
                    cut
                }
                None => text.len() - job.stops.held_back(text),
            };
            let new_text = text.get(shown[row]..visible.max(shown[row])).unwrap_or("").to_string();
            shown[row] = shown[row].max(visible);
            let logprob = job
                .top_logprobs
                .zip(logprobs)
                .map(|(k, logprobs)| token_logprob(bytes, logprobs, k));
            if job
                .events
                .send((
                    job.choice,
                    RowEvent::Token {
                        text: new_text,
                        logprob,
                    },
                ))
                .is_err()
            {
                ends[row] = End::Gone;
            }
            if ends[row] == End::Open && counts[row] >= job.max_tokens {
                ends[row] = End::Length;
            }
            ends[row] == End::Open
        })
    }));
    let generations = match result {
        Ok(Ok((generations, _))) if failure.is_none() => generations,
        Ok(Ok(_)) => return fail(&batch, failure.unwrap_or_default()),
        Ok(Err(e)) => return fail(&batch, e.to_string()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "the model panicked".into());
            return fail(&batch, message);
        }
    };
    for (row, (job, generation)) in batch.iter().zip(generations).enumerate() {
        if ends[row] == End::Gone {
            continue;
        }
        let finish = match (ends[row], generation.finish) {
            (End::StopString, _) | (_, FinishReason::Stop) => "stop",
            _ => "length",
        };
        if ends[row] != End::StopString {
            // The whole answer decoded at once: a character the stream still held is in it.
            let tokens: Vec<u32> = generation.tokens.iter().copied().filter(|t| !eos.contains(t)).collect();
            if let Ok(text) = tokenizer.decode(&tokens, true)
                && let Some(rest) = text.get(shown[row]..).filter(|rest| !rest.is_empty())
            {
                let _ = job.events.send((
                    job.choice,
                    RowEvent::Token {
                        text: rest.to_string(),
                        logprob: None,
                    },
                ));
            }
        }
        let _ = job.events.send((
            job.choice,
            RowEvent::Done {
                finish,
                prompt_tokens: job.prompt.len(),
                completion_tokens: counts[row],
            },
        ));
    }
}

fn fail(batch: &[Job], message: String) {
    for job in batch {
        let _ = job
            .events
            .send((job.choice, RowEvent::Failed(format!("the model failed: {message}"))));
    }
}
