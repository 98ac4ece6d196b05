//! The served-teacher suite: our server (answers equal to in-process generation, streaming,
//! log-probabilities, bad requests), the harvest client (resumption, a fault server: 429 with
//! Retry-After, 500s, cut JSON, timeouts, bodies over the limit, refusals), the sparse teacher
//! from served log-probabilities, and, where CI provides them, the real peers: the official
//! `openai` Python client against our server, and our client against llama.cpp's server on the
//! SmolLM2 file. Everything listens on 127.0.0.1 and every loop is bounded.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use burn_distill_data::{ChatPrompt, TeacherCache, Transcript, TranscriptDataset};
use burn_distill_model::llm::{ChatMessage, ChatTokenizer, GenerateOptions, Llama, TokenLogprobs, load_model};
use burn_distill_serve::api::ChatResponse;
use burn_distill_serve::{
    HarvestOptions, Lineage, ServeError, ServeOptions, ServerHandle, SparseTeacher, TransferSet, chat_transcripts,
    harvest, spawn,
};
use burn_distill_testing::scratch;
use serde_json::{Value, json};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama/tiny-q8_0.gguf")
}

fn device() -> Device {
    let devices = burn_distill_testing::devices_for_tests();
    devices
        .iter()
        .find(|d| d.name == "flex")
        .unwrap_or(&devices[0])
        .device
        .clone()
}

fn tiny() -> (Llama, ChatTokenizer) {
    let loaded = load_model(fixture(), &device()).expect("the tiny GGUF fixture loads");
    (loaded.model, loaded.tokenizer)
}

const MODEL_ID: &str = "tiny";

fn server(options: ServeOptions) -> ServerHandle {
    let (model, tokenizer) = tiny();
    spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), model, tokenizer, options).expect("the server starts")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn prompts(count: usize) -> Vec<ChatPrompt> {
    (0..count)
        .map(|i| ChatPrompt {
            id: format!("p{i}"),
            messages: vec![ChatMessage::user(format!("Tell me about the number {i}."))],
        })
        .collect()
}

async fn post(url: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[test]
fn our_server_answers_what_in_process_generation_gives_with_logprobs_and_streaming() {
    let handle = server(ServeOptions::new(MODEL_ID));
    let base = handle.base_url();
    let (model, tokenizer) = tiny();
    let question = vec![ChatMessage::user("Tell me about the number 7.")];
    let (local, _) = model
        .chat(
            &tokenizer,
            std::slice::from_ref(&question),
            &GenerateOptions::greedy(20),
            &[],
            |_, _| {},
        )
        .unwrap();
    let rt = runtime();
    rt.block_on(async {
        let body = json!({"model": MODEL_ID, "messages": question, "temperature": 0, "max_tokens": 20});
        let (status, answer) = post(&format!("{base}/chat/completions"), None, &body).await;
        assert_eq!(status, 200, "{answer}");
        let response: ChatResponse = serde_json::from_value(answer).unwrap();
        assert_eq!(response.model, MODEL_ID);
        assert_eq!(response.choices[0].message.content.as_deref(), Some(local[0].text.as_str()));
        let usage = response.usage.unwrap();
        assert_eq!(usage.prompt_tokens as usize, local[0].prompt_tokens.len());

        // Log-probabilities: the chosen token is the most likely (greedy), the values are the
        // model's own log-softmax, and the bytes spell the answer.
        let mut scored = body.clone();
        scored["logprobs"] = json!(true);
        scored["top_logprobs"] = json!(4);
        let (status, answer) = post(&format!("{base}/chat/completions"), None, &scored).await;
        assert_eq!(status, 200, "{answer}");
        let response: ChatResponse = serde_json::from_value(answer).unwrap();
        let content = response.choices[0].logprobs.as_ref().unwrap().content.clone().unwrap();
        let tokens: Vec<u32> = local[0]
            .generation
            .tokens
            .iter()
            .copied()
            .filter(|t| !tokenizer.eos_ids().contains(t))
            .collect();
        assert_eq!(content.len(), tokens.len());
        let bytes: Vec<u8> = content.iter().flat_map(|t| t.bytes.clone().unwrap()).collect();
        // (The tiny model writes arbitrary bytes: compared as the tokenizer decodes them.)
        assert_eq!(String::from_utf8_lossy(&bytes), local[0].text);
        // The same prompt scored in process: the logits of each step, by a full forward.
        let mut sequence = local[0].prompt_tokens.clone();
        for (entry, &token) in content.iter().zip(&tokens) {
            assert_eq!(entry.top_logprobs.len(), 4);
            assert_eq!(entry.top_logprobs[0].logprob, entry.logprob, "greedy picks the most likely");
            assert!(entry.top_logprobs.windows(2).all(|w| w[0].logprob >= w[1].logprob));
            let logits = last_logits(&model, &sequence);
            let expected = TokenLogprobs::of(&logits, token, 4);
            assert!(
                (entry.logprob - f64::from(expected.logprob)).abs() < 1e-3,
                "{} against {}",
                entry.logprob,
                expected.logprob
            );
            sequence.push(token);
        }

        // Streaming: the deltas make the same text, then [DONE].
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let text = reqwest::Client::new()
            .post(format!("{base}/chat/completions"))
            .json(&streamed)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(events.last(), Some(&"[DONE]"));
        let mut joined = String::new();
        let mut finish = None;
        for event in &events[..events.len() - 1] {
            let chunk: Value = serde_json::from_str(event).unwrap();
            assert_eq!(chunk["object"], "chat.completion.chunk");
            if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
                joined.push_str(piece);
            }
            if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
                finish = Some(reason.to_string());
            }
        }
        assert_eq!(joined, local[0].text);
        assert!(finish.is_some());

        // The legacy completions API and n samples.
        let body = json!({"model": MODEL_ID, "prompt": ["one two", "three"], "n": 2, "temperature": 0.8, "max_tokens": 5, "logprobs": 2});
        let (status, answer) = post(&format!("{base}/completions"), None, &body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["choices"].as_array().unwrap().len(), 4);
        let mut completion_tokens = 0;
        for choice in answer["choices"].as_array().unwrap() {
            // The legacy lists: one entry per new token (special tokens included, which the
            // text leaves out), each with at most 2 alternatives, all log-probabilities ≤ 0.
            let logprobs = &choice["logprobs"];
            let tokens = logprobs["tokens"].as_array().unwrap();
            completion_tokens += tokens.len();
            assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), tokens.len());
            for (value, top) in logprobs["token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .zip(logprobs["top_logprobs"].as_array().unwrap())
            {
                assert!(value.as_f64().unwrap() <= 0.0);
                assert!(top.as_object().unwrap().len() <= 2, "{top}");
            }
        }
        assert_eq!(answer["usage"]["completion_tokens"], completion_tokens);
        let models: Value = reqwest::get(format!("{base}/models")).await.unwrap().json().await.unwrap();
        assert_eq!(models["data"][0]["id"], MODEL_ID);
    });
}

#[test]
fn concurrent_requests_are_decoded_in_one_batch_with_the_answers_of_each_alone() {
    let mut options = ServeOptions::new(MODEL_ID);
    options.batch_window = Duration::from_secs(1);
    let handle = server(options);
    let (model, tokenizer) = tiny();
    // Prompts of one length: no padding, so batched greedy answers are exactly those alone.
    let questions: Vec<Vec<ChatMessage>> = (1..=4)
        .map(|i| vec![ChatMessage::user(format!("Tell me about the number {i}."))])
        .collect();
    let lengths: Vec<usize> = questions
        .iter()
        .map(|q| tokenizer.encode_chat(q, true).unwrap().len())
        .collect();
    assert!(lengths.windows(2).all(|w| w[0] == w[1]), "{lengths:?}");
    let url = format!("{}/chat/completions", handle.base_url());
    let answers = runtime().block_on(async {
        let requests = questions.iter().map(|question| {
            let body = json!({"model": MODEL_ID, "messages": question, "temperature": 0, "max_tokens": 8});
            let url = url.clone();
            async move { post(&url, None, &body).await }
        });
        futures_util::future::join_all(requests).await
    });
    assert_eq!(
        (handle.stats().decodes(), handle.stats().rows()),
        (1, 4),
        "one decode of 4 rows"
    );
    for (question, (status, answer)) in questions.iter().zip(answers) {
        assert_eq!(status, 200, "{answer}");
        let (alone, _) = model
            .chat(
                &tokenizer,
                std::slice::from_ref(question),
                &GenerateOptions::greedy(8),
                &[],
                |_, _| {},
            )
            .unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], alone[0].text.as_str());
    }
}

#[test]
fn the_completions_api_harvests_text_prompts_and_refuses_conversations() {
    let handle = server(ServeOptions::new(MODEL_ID));
    let rt = runtime();
    let mut options = options_for(&handle.base_url());
    options.api = burn_distill_serve::Api::Completions;
    options.top_logprobs = Some(2);
    options.samples = 2;
    let out = scratch("harvest-completions").join("set");
    let report = rt.block_on(harvest(&prompts(3), None, &out, &options)).unwrap();
    assert_eq!((report.records, report.complete), (6, true));
    let set = TransferSet::open(&out).unwrap();
    for record in &set.records {
        let tokens = record.tokens.as_ref().unwrap();
        assert!(!tokens.is_empty() && tokens.iter().all(|t| t.top_logprobs.len() <= 2 && t.logprob <= 0.0));
    }
    let mut conversation = prompts(1);
    conversation[0].messages.insert(0, ChatMessage::system("Be brief."));
    let error = rt
        .block_on(harvest(
            &conversation,
            None,
            &scratch("harvest-conversation").join("set"),
            &options,
        ))
        .unwrap_err();
    assert!(
        matches!(&error, ServeError::Option { option, .. } if option == "--api completions"),
        "{error}"
    );
}

/// The last position's logits of a full forward over `tokens`.
fn last_logits(model: &Llama, tokens: &[u32]) -> Vec<f32> {
    use burn::tensor::{Int, Tensor, TensorData};
    let device = device();
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), &device);
    let logits = model.forward(input);
    let [_, len, vocab] = logits.dims();
    logits
        .slice([0..1, len - 1..len, 0..vocab])
        .into_data()
        .iter::<f32>()
        .collect()
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_stays_up() {
    let mut options = ServeOptions::new(MODEL_ID);
    options.bearer_token = Some("sesame".into());
    options.max_tokens_limit = 16;
    options.max_body_bytes = 4096;
    let handle = server(options);
    let url = format!("{}/chat/completions", handle.base_url());
    let good = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    runtime().block_on(async {
        let check = |status: u16, body: &Value, expected: u16, code: Option<&str>| {
            assert_eq!(status, expected, "{body}");
            assert!(
                body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{body}"
            );
            assert!(body["error"]["type"].is_string(), "{body}");
            if let Some(code) = code {
                assert_eq!(body["error"]["code"], code, "{body}");
            }
        };
        let (status, body) = post(&url, None, &good).await;
        check(status, &body, 401, Some("invalid_api_key"));
        let (status, body) = post(&url, Some("open"), &good).await;
        check(status, &body, 401, Some("invalid_api_key"));
        let raw = reqwest::Client::new()
            .post(&url)
            .bearer_auth("sesame")
            .header("content-type", "application/json")
            .body("{\"model\": \"tiny\", \"messages\": [")
            .send()
            .await
            .unwrap();
        let status = raw.status().as_u16();
        check(status, &raw.json().await.unwrap(), 400, None);
        let mut unknown = good.clone();
        unknown["model"] = json!("gpt-9");
        let (status, body) = post(&url, Some("sesame"), &unknown).await;
        check(status, &body, 404, Some("model_not_found"));
        let mut long = good.clone();
        long["max_tokens"] = json!(17);
        let (status, body) = post(&url, Some("sesame"), &long).await;
        check(status, &body, 400, None);
        assert_eq!(body["error"]["param"], "max_tokens");
        let mut many = good.clone();
        many["logprobs"] = json!(true);
        many["top_logprobs"] = json!(21);
        let (status, body) = post(&url, Some("sesame"), &many).await;
        check(status, &body, 400, None);
        let mut huge = good.clone();
        huge["messages"][0]["content"] = json!("x".repeat(5000));
        let (status, body) = post(&url, Some("sesame"), &huge).await;
        check(status, &body, 413, Some("request_too_large"));
        let mut none = good.clone();
        none["n"] = json!(0);
        let (status, body) = post(&url, Some("sesame"), &none).await;
        check(status, &body, 400, None);
        let (status, body) = post(&format!("{}/nothing", handle.base_url()), Some("sesame"), &good).await;
        check(status, &body, 404, None);
        // Still up, and still right.
        let (status, body) = post(&url, Some("sesame"), &good).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["choices"][0]["message"]["content"].is_string());
    });
}

fn options_for(base: &str) -> HarvestOptions {
    let mut options = HarvestOptions::new(base, "Apache-2.0, test fixture");
    options.model = Some(MODEL_ID.into());
    options.max_tokens = 8;
    options.backoff = Duration::from_millis(20);
    options.max_backoff = Duration::from_millis(200);
    options.api_key_env = "BURN_DISTILL_TEST_NO_KEY".into();
    options
}

fn keys(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["key"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn a_harvest_resumes_after_a_kill_with_no_record_lost_or_repeated_and_records_its_provenance() {
    let handle = server(ServeOptions::new(MODEL_ID));
    let prompts = prompts(6);
    let rt = runtime();
    let mut options = options_for(&handle.base_url());
    options.samples = 2;
    options.temperature = 0.0;
    options.top_logprobs = Some(3);
    options.concurrency = 3;

    // No terms, no harvest: refused before anything is sent or written.
    let out = scratch("harvest-resume").join("set");
    let mut no_terms = options.clone();
    no_terms.terms = "  ".into();
    let error = rt.block_on(harvest(&prompts, None, &out, &no_terms)).unwrap_err();
    assert!(
        matches!(&error, ServeError::Option { option, .. } if option == "--terms"),
        "{error}"
    );
    assert!(!out.exists());

    // A whole harvest in one go, for reference.
    let whole = scratch("harvest-whole").join("set");
    let report = rt.block_on(harvest(&prompts, None, &whole, &options)).unwrap();
    assert_eq!((report.records, report.resumed, report.complete), (12, 0, true));

    // A budget stops it early; a kill cuts the last line in two; the rerun finishes.
    let mut budgeted = options.clone();
    budgeted.token_budget = Some(1);
    budgeted.concurrency = 1;
    let first = rt.block_on(harvest(&prompts, None, &out, &budgeted)).unwrap();
    assert!(!first.complete && first.records < 12, "{first:?}");
    let records = out.join("records.jsonl");
    let mut text = std::fs::read_to_string(&records).unwrap();
    let torn = text.lines().next().unwrap()[..20].to_string();
    text.push_str(&torn);
    std::fs::write(&records, text).unwrap();
    let second = rt.block_on(harvest(&prompts, None, &out, &options)).unwrap();
    assert_eq!(
        (second.records, second.resumed, second.complete),
        (12, first.records, true)
    );
    let mut got = keys(&out);
    let count = got.len();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), count, "a record is repeated");
    let mut expected = keys(&whole);
    expected.sort();
    assert_eq!(got, expected);
    // Greedy answers: the resumed set says what the whole one says.
    let a = TransferSet::open(&out).unwrap();
    let b = TransferSet::open(&whole).unwrap();
    for (x, y) in a.records.iter().zip(&b.records) {
        assert_eq!((&x.key, &x.answer), (&y.key, &y.answer));
    }

    // The card: the model as served, the endpoint, no key, the terms, the counts.
    let card = &a.card;
    assert_eq!(card.teacher_model, MODEL_ID);
    assert_eq!(card.endpoint, format!("{}/", handle.base_url()));
    assert_eq!(card.terms, "Apache-2.0, test fixture");
    assert_eq!(card.counts.records, 12);
    assert!(card.complete);
    assert_eq!(
        card.counts.completion_tokens,
        a.records.iter().map(|r| r.completion_tokens).sum::<u64>()
    );
    // Other settings, another set: refused, the directory left as it is.
    let mut other = options.clone();
    other.temperature = 0.5;
    let error = rt.block_on(harvest(&prompts, None, &out, &other)).unwrap_err();
    assert!(
        matches!(&error, ServeError::OtherTransferSet { field, .. } if field.starts_with("request")),
        "{error}"
    );
    assert_eq!(keys(&out).len(), 12);

    // The lineage a student records, and its check.
    let run = scratch("harvest-lineage");
    Lineage::of(&a).write(&run).unwrap();
    let lineage = Lineage::read(&run).unwrap();
    assert_eq!(lineage.fingerprint, a.fingerprint());
    assert_eq!(lineage.verify(), Some(true));
    let printed = lineage.to_string();
    assert!(
        printed.contains("Apache-2.0, test fixture") && printed.contains(MODEL_ID),
        "{printed}"
    );
    let mut text = std::fs::read_to_string(&records).unwrap();
    text = text.replacen("\"answer\":\"", "\"answer\":\"X", 1);
    std::fs::write(&records, text).unwrap();
    assert_eq!(lineage.verify(), Some(false));
}

#[test]
fn served_top_logprobs_become_a_sparse_teacher_when_the_tokenizers_match_and_are_refused_otherwise() {
    let handle = server(ServeOptions::new(MODEL_ID));
    let (model, tokenizer) = tiny();
    let prompts = prompts(3);
    let out = scratch("harvest-sparse").join("set");
    let mut options = options_for(&handle.base_url());
    options.temperature = 0.0;
    options.top_logprobs = Some(5);
    runtime().block_on(harvest(&prompts, None, &out, &options)).unwrap();
    let set = TransferSet::open(&out).unwrap();
    let sparse = SparseTeacher::new(&set, &tokenizer).unwrap();
    assert_eq!(sparse.ambiguous, 0, "our server sends bytes");
    for (record, transcript) in set.records.iter().zip(&sparse.transcripts) {
        let prompt = &prompts[record.index];
        let (local, _) = model
            .chat(
                &tokenizer,
                std::slice::from_ref(&prompt.messages),
                &GenerateOptions::greedy(8),
                &[],
                |_, _| {},
            )
            .unwrap();
        assert_eq!(transcript.prompt_tokens, local[0].prompt_tokens);
        assert_eq!(
            transcript.answer_tokens, local[0].generation.tokens,
            "served ids are the generated ids"
        );
    }
    // The cache: each answer position holds the served top-5 (and the sampled token).
    let transcripts: Vec<Transcript> = sparse.transcripts.iter().map(|t| t.transcript()).collect();
    let context = transcripts
        .iter()
        .map(|t| t.prompt_ids().len() + t.completion_ids().len() - 1)
        .max()
        .unwrap();
    let dataset = TranscriptDataset::new(&transcripts, context, tokenizer.vocab_size(), false).unwrap();
    let path = out.join("served.bdkd");
    sparse
        .write_cache(&path, &dataset, set.fingerprint(), tokenizer.vocab_size(), context)
        .unwrap();
    let cache = TeacherCache::open(&path).unwrap();
    let k = cache.header().mode;
    assert_eq!(k, burn_distill_data::CacheMode::TopK { k: sparse.k });
    let (ids, log_probs) = cache.top_k_values(&[0]).unwrap();
    let first = sparse.transcripts[0].prompt_tokens.len() - 1;
    let served = &set.records[0].tokens.as_ref().unwrap()[0];
    let at = first * sparse.k;
    assert_eq!(ids[at], sparse.top[0][0][0].0);
    assert!((f64::from(log_probs[at]) - served.top_logprobs[0].logprob).abs() < 1e-6);

    // A token the student's vocabulary does not have: the token-level path is refused, naming
    // the record; the sequence-level one still works.
    let mut foreign = set.clone();
    let tokens = foreign.records[1].tokens.as_mut().unwrap();
    tokens[0].token = "\u{1F980}crab".into();
    tokens[0].bytes = Some("\u{1F980}crab".as_bytes().to_vec());
    let error = SparseTeacher::new(&foreign, &tokenizer).unwrap_err();
    assert!(
        matches!(&error, ServeError::TokenizerMismatch { reason } if reason.contains(&foreign.records[1].key)),
        "{error}"
    );
    let sequence = chat_transcripts(&foreign, &tokenizer).unwrap();
    assert_eq!(sequence.len(), set.records.len());
    assert_eq!(sequence[1].answer, set.records[1].answer);
}

#[test]
fn the_api_key_goes_in_the_header_only_and_never_into_the_transfer_set() {
    // The key is read from the environment variable the options name; HOME stands in for a
    // key variable (setting one would need `unsafe` in a threaded test).
    let Ok(key) = std::env::var("HOME") else { return };
    let mut options = ServeOptions::new(MODEL_ID);
    options.bearer_token = Some(key.clone());
    let handle = server(options);
    let rt = runtime();
    let mut harvest_options = options_for(&handle.base_url());
    let out = scratch("harvest-key").join("set");
    // Without it: 401, refused at once, the key nowhere in the message.
    let error = rt
        .block_on(harvest(&prompts(2), None, &out, &harvest_options))
        .unwrap_err();
    assert!(matches!(&error, ServeError::Refused { status: 401, .. }), "{error}");
    harvest_options.api_key_env = "HOME".into();
    let report = rt.block_on(harvest(&prompts(2), None, &out, &harvest_options)).unwrap();
    assert_eq!(report.records, 2);
    for name in ["card.json", "records.jsonl"] {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        assert!(!text.contains(&key), "{name} holds the key");
    }
}

/// A server that misbehaves on cue: the first requests get 429 with Retry-After, a 500, a cut
/// JSON body and a response past the client's timeout; then it answers "answer to <prompt>".
/// `mode` "oversize" sends bodies over the client's limit, "refuse" a 400, "down" 503 always.
fn fault_server(mode: &'static str) -> (SocketAddr, Arc<std::sync::Mutex<Vec<Instant>>>, tokio::runtime::Runtime) {
    use axum::http::{HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    let rt = runtime();
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::clone(&arrivals);
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: axum::Json<Value>| {
            let n = count.fetch_add(1, Ordering::SeqCst);
            seen.lock().unwrap().push(Instant::now());
            async move {
                let answer = json!({
                    "id": "x", "object": "chat.completion", "created": 0, "model": "fault",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer to {}", body["messages"][0]["content"].as_str().unwrap_or(""))}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
                });
                match (mode, n) {
                    ("down", _) => (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
                    ("refuse", _) => (
                        StatusCode::BAD_REQUEST,
                        axum::Json(json!({"error": {"message": "you asked wrong", "type": "invalid_request_error"}})),
                    )
                        .into_response(),
                    ("oversize", n) if n >= 2 => (StatusCode::OK, "x".repeat(300_000)).into_response(),
                    ("faults", 0) => {
                        let mut response = (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response();
                        response.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
                        response
                    }
                    ("faults", 1) => (StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response(),
                    ("faults", 2) => {
                        let text = answer.to_string();
                        (StatusCode::OK, text[..text.len() / 2].to_string()).into_response()
                    }
                    ("faults", 3) => {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        axum::Json(answer).into_response()
                    }
                    _ => axum::Json(answer).into_response(),
                }
            }
        }),
    );
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, arrivals, rt)
}

#[test]
fn the_client_retries_429_500_cut_bodies_and_timeouts_and_refuses_what_retrying_cannot_mend() {
    let prompts = prompts(5);
    let rt = runtime();
    // Faults on the first four attempts; one request at a time so they hit one prompt.
    let (addr, arrivals, _server) = fault_server("faults");
    let mut options = options_for(&format!("http://{addr}/v1"));
    options.model = Some("fault".into());
    options.concurrency = 1;
    options.timeout = Duration::from_millis(700);
    let out = scratch("harvest-faults").join("set");
    let report = rt.block_on(harvest(&prompts, None, &out, &options)).unwrap();
    assert_eq!(
        (report.records, report.retries, report.requests),
        (5, 4, 5),
        "{report:?}"
    );
    let set = TransferSet::open(&out).unwrap();
    for (record, prompt) in set.records.iter().zip(&prompts) {
        assert_eq!(record.answer, format!("answer to {}", prompt.messages[0].content));
    }
    // Retry-After: 1 was honoured (the retry came at least a second after the 429).
    let times = arrivals.lock().unwrap().clone();
    assert!(
        times[1] - times[0] >= Duration::from_millis(950),
        "{:?}",
        times[1] - times[0]
    );

    // Bodies over the limit: refused with a clear error; the records before are kept.
    let (addr, _, _server) = fault_server("oversize");
    let mut oversize = options.clone();
    oversize.endpoint = format!("http://{addr}/v1");
    oversize.max_response_bytes = 100_000;
    let out = scratch("harvest-oversize").join("set");
    let error = rt.block_on(harvest(&prompts, None, &out, &oversize)).unwrap_err();
    assert!(error.to_string().contains("over 100000 bytes"), "{error}");
    assert_eq!(keys(&out).len(), 2);

    // A 400 is not retried; a server that stays down exhausts the retries.
    let (addr, arrivals, _server) = fault_server("refuse");
    let mut refused = options.clone();
    refused.endpoint = format!("http://{addr}/v1");
    let error = rt
        .block_on(harvest(
            &prompts,
            None,
            &scratch("harvest-refused").join("set"),
            &refused,
        ))
        .unwrap_err();
    assert!(
        matches!(&error, ServeError::Refused { status: 400, message, .. } if message == "you asked wrong"),
        "{error}"
    );
    assert_eq!(arrivals.lock().unwrap().len(), 1);
    let (addr, arrivals, _server) = fault_server("down");
    let mut down = options.clone();
    down.endpoint = format!("http://{addr}/v1");
    down.max_retries = 3;
    let error = rt
        .block_on(harvest(&prompts, None, &scratch("harvest-down").join("set"), &down))
        .unwrap_err();
    assert!(
        matches!(&error, ServeError::RetriesExhausted { attempts: 4, .. }),
        "{error}"
    );
    assert_eq!(arrivals.lock().unwrap().len(), 4);

    // Nothing listening: connection refused, retried, then a clear error.
    let mut nowhere = options.clone();
    nowhere.endpoint = "http://127.0.0.1:9/v1".into();
    nowhere.max_retries = 1;
    let error = rt
        .block_on(harvest(
            &prompts,
            None,
            &scratch("harvest-nowhere").join("set"),
            &nowhere,
        ))
        .unwrap_err();
    assert!(error.to_string().contains("could not connect"), "{error}");
    // Credentials in the URL are refused: keys go in the environment.
    let mut leaky = options.clone();
    leaky.endpoint = "http://user:sk-secret@127.0.0.1:9/v1".into();
    let error = rt
        .block_on(harvest(&prompts, None, &scratch("harvest-leaky").join("set"), &leaky))
        .unwrap_err();
    assert!(!error.to_string().contains("sk-secret"), "{error}");
}

/// The venv `scripts/python_peers.sh` makes (openai, llama-cpp-python[server]); under CI it
/// must be there.
fn python_peers() -> Option<PathBuf> {
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    match std::env::var_os("BURN_DISTILL_PYTHON_PEERS").map(PathBuf::from) {
        Some(venv) if venv.join("bin/python").exists() => Some(venv),
        _ => {
            assert!(
                !in_ci,
                "CI expects BURN_DISTILL_PYTHON_PEERS (bash scripts/python_peers.sh)"
            );
            eprintln!("BURN_DISTILL_PYTHON_PEERS is not set: skipping the test against the Python peers");
            None
        }
    }
}

fn smollm2() -> Option<PathBuf> {
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    match std::env::var_os("BURN_DISTILL_SMOLLM2").map(PathBuf::from) {
        Some(path) if path.exists() => Some(path),
        _ => {
            assert!(
                !in_ci,
                "CI expects BURN_DISTILL_SMOLLM2 (bash scripts/fetch_smollm2.sh)"
            );
            eprintln!("BURN_DISTILL_SMOLLM2 is not set: skipping");
            None
        }
    }
}

#[test]
fn the_official_openai_client_reads_our_server_and_gets_in_process_answers() {
    let Some(venv) = python_peers() else { return };
    let Some(path) = smollm2() else { return };
    let loaded = load_model(&path, &device()).unwrap();
    let (model, tokenizer) = (loaded.model, loaded.tokenizer);
    let prompt = "What is the capital of France?";
    let (local, _) = model
        .chat(
            &tokenizer,
            &[vec![ChatMessage::user(prompt)]],
            &GenerateOptions::greedy(24),
            &[],
            |_, _| {},
        )
        .unwrap();
    let mut options = ServeOptions::new("SmolLM2-135M-Instruct");
    options.bearer_token = Some("test-token".into());
    options.max_tokens_limit = 64;
    let handle = spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), model, tokenizer, options).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai_client_check.py");
    let output = std::process::Command::new(venv.join("bin/python"))
        .arg(script)
        .args([&handle.base_url(), "SmolLM2-135M-Instruct", "test-token", prompt])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let got: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(got["models"], json!(["SmolLM2-135M-Instruct"]));
    assert_eq!(got["greedy"], local[0].text.as_str());
    assert!(local[0].text.contains("Paris"), "{}", local[0].text);
    assert_eq!(got["streamed"], local[0].text.as_str());
    assert_eq!(got["usage"][0], local[0].prompt_tokens.len());
    let tokens: String = got["logprob_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, local[0].text);
    assert!(
        got["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|lp| lp.as_f64().unwrap() <= 0.0)
    );
    assert_eq!(
        got["errors"],
        json!({"wrong_token": 401, "unknown_model": 404, "max_tokens": 400})
    );
}

/// llama.cpp's OpenAI-compatible server on the SmolLM2 file, on a free port.
struct LlamaCpp {
    child: std::process::Child,
}

impl LlamaCpp {
    fn start(venv: &Path, model: &Path, port: u16) -> Self {
        let child = std::process::Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "llama_cpp.server",
                "--host",
                "127.0.0.1",
                "--n_ctx",
                "2048",
                "--n_threads",
                "2",
                // Log-probabilities need every position's logits kept (the server's default).
                "--logits_all",
                "true",
            ])
            .arg("--port")
            .arg(port.to_string())
            .arg("--model")
            .arg(model)
            .arg("--model_alias")
            .arg("SmolLM2-135M-Instruct")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = Self { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "llama.cpp's server did not start in 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_harvest_from_llama_cpp_survives_its_server_killed_and_maps_its_tokens_to_ours() {
    let Some(venv) = python_peers() else { return };
    let Some(path) = smollm2() else { return };
    let port = free_port();
    let prompts = prompts(12);
    let out = scratch("harvest-llama-cpp").join("set");
    let mut options = HarvestOptions::new(
        format!("http://127.0.0.1:{port}/v1"),
        "Apache-2.0, SmolLM2-135M-Instruct",
    );
    options.api_key_env = "BURN_DISTILL_TEST_NO_KEY".into();
    options.max_tokens = 16;
    options.temperature = 0.0;
    options.top_logprobs = Some(5);
    options.concurrency = 1;
    options.max_retries = 2;
    options.backoff = Duration::from_millis(100);
    let rt = runtime();
    let server = LlamaCpp::start(&venv, &path, port);
    // Kill the server once a few records are written, while the harvest runs.
    let watched = out.join("records.jsonl");
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let pid = server.child.id();
        let finished = Arc::clone(&finished);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline && !finished.load(Ordering::SeqCst) {
                let lines = std::fs::read_to_string(&watched)
                    .map(|t| t.lines().count())
                    .unwrap_or(0);
                if lines >= 3 {
                    let _ = std::process::Command::new("kill")
                        .arg("-9")
                        .arg(pid.to_string())
                        .status();
                    return lines;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            0
        })
    };
    let result = rt.block_on(harvest(&prompts, None, &out, &options));
    finished.store(true, Ordering::SeqCst);
    let at_kill = killer.join().unwrap();
    let error = result.expect_err("the harvest fails when its server is killed");
    assert!(at_kill >= 3, "the server was not killed mid-harvest");
    assert!(
        matches!(error, ServeError::RetriesExhausted { .. }),
        "a dead server: retries, then a clear error ({error})"
    );
    drop(server);
    let partial = keys(&out).len();
    assert!((3..12).contains(&partial), "{partial}");
    let _server = LlamaCpp::start(&venv, &path, port);
    let report = rt.block_on(harvest(&prompts, None, &out, &options)).unwrap();
    assert_eq!((report.records, report.resumed, report.complete), (12, partial, true));
    let mut got = keys(&out);
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 12, "no record repeated");
    let set = TransferSet::open(&out).unwrap();
    assert_eq!(set.card.teacher_model, "SmolLM2-135M-Instruct");
    // llama.cpp names tokens by text only: mapped to SmolLM2's ids, checked against the answer.
    let loaded = load_model(&path, &device()).unwrap();
    let sparse = SparseTeacher::new(&set, &loaded.tokenizer).unwrap();
    assert_eq!(sparse.transcripts.len(), 12);
    for (record, transcript) in set.records.iter().zip(&sparse.transcripts) {
        let ids = &transcript.answer_tokens;
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|t| !loaded.tokenizer.eos_ids().contains(t))
            .collect();
        assert_eq!(loaded.tokenizer.decode(&ids, true).unwrap(), record.answer);
    }
    // The top log-probabilities are a distribution's: at most 1 in all.
    for positions in &sparse.top {
        for entries in positions {
            let mass: f64 = entries.iter().map(|&(_, lp)| f64::from(lp).exp()).sum();
            assert!(mass <= 1.0 + 1e-3, "{mass}");
        }
    }
}

/// Thousands of damaged chat-completion bodies (`burn_distill_testing::hostile`): every one is
/// answered (no dropped connection) with a 200 or an OpenAI-style 4xx error, never a 5xx, and
/// the server still answers a good request afterwards.
#[test]
fn hostile_request_bodies_get_answers_or_openai_errors_and_never_a_server_error() {
    let mut options = ServeOptions::new(MODEL_ID);
    options.max_tokens_limit = 4;
    options.default_max_tokens = 2;
    options.max_n = 2;
    options.max_body_bytes = 2048;
    let handle = server(options);
    let url = format!("{}/chat/completions", handle.base_url());
    let good = json!({
        "model": MODEL_ID,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "n": 2, "seed": 3,
        "logprobs": true, "top_logprobs": 2, "stop": ["\n"]
    });
    let valid = serde_json::to_vec(&good).unwrap();
    let runtime = runtime();
    let client = reqwest::Client::new();
    let tried = burn_distill_testing::hostile::check_bytes("chat request body", valid, 256, |body| {
        runtime.block_on(async {
            let response = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_vec())
                .timeout(Duration::from_secs(20))
                .send()
                .await
                .map_err(|e| format!("no answer: {e}"))?;
            let status = response.status().as_u16();
            let text = response.text().await.map_err(|e| format!("cut answer: {e}"))?;
            match status {
                200 => Ok(()),
                400..=499 => {
                    let value: Value =
                        serde_json::from_str(&text).map_err(|_| format!("{status} without JSON: {text}"))?;
                    match value["error"]["message"].as_str() {
                        Some(message) if !message.is_empty() => Ok(()),
                        _ => Err(format!("{status} without an OpenAI error: {text}")),
                    }
                }
                _ => Err(format!("status {status}: {text}")),
            }
        })
    });
    assert!(tried > 0);

    // Well-formed JSON with hostile values: one to three fields of the good request replaced by
    // any JSON value (wrong types, extreme numbers, long strings, nesting).
    use burn_distill_testing::hostile::proptest::prelude::*;
    use burn_distill_testing::hostile::proptest::test_runner::{
        Config, RngAlgorithm, TestCaseError, TestRng, TestRunner,
    };
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop::sample::select(vec![i64::MIN, -1, 0, 1, 2, 3, 5, 17, 4096, i64::MAX]).prop_map(Value::from),
        prop::sample::select(vec![-1e308, -1.0, 0.0, 0.5, 1.0, 2.0, 1e-300, 1e308]).prop_map(Value::from),
        "[a-z \\n\"\u{1F600}]{0,40}".prop_map(Value::from),
        (0usize..3000).prop_map(|n| Value::from("x".repeat(n))),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    });
    let fields = vec![
        "model",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "seed",
        "logprobs",
        "top_logprobs",
        "stop",
        "stream",
        "user",
    ];
    let edits = prop::collection::vec((prop::sample::select(fields), value), 1..4);
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: burn_distill_testing::hostile::cases() / 4,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(
            RngAlgorithm::ChaCha,
            &[burn_distill_testing::hostile::seed() as u8 + 1; 32],
        ),
    );
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u32>::new());
    runner
        .run(&edits, |edits| {
            let mut body = good.clone();
            for (field, value) in edits {
                body[field] = value;
            }
            runtime.block_on(async {
                let response = client
                    .post(&url)
                    .json(&body)
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("no answer to {body}: {e}")))?;
                let status = response.status().as_u16();
                *statuses.borrow_mut().entry(status).or_default() += 1;
                let text = response.text().await.unwrap_or_default();
                if !(status == 200 || (400..500).contains(&status)) {
                    return Err(TestCaseError::fail(format!("status {status} for {body}: {text}")));
                }
                Ok(())
            })
        })
        .unwrap_or_else(|failure| panic!("{failure}"));
    let statuses = statuses.into_inner();
    eprintln!("hostile chat request values: statuses {statuses:?}");
    assert!(
        statuses.contains_key(&200) && statuses.keys().any(|s| (400..500).contains(s)),
        "{statuses:?}"
    );
    runtime.block_on(async {
        let (status, body) = post(&url, None, &good).await;
        assert_eq!(status, 200, "{body}");
    });
}

/// A harvested transfer set with its card or its records damaged thousands of ways
/// (`burn_distill_testing::hostile`): opening it is `Ok` or an error naming the file, never a
/// panic.
#[test]
fn a_hostile_transfer_set_card_or_records_file_is_refused_naming_the_file() {
    use burn_distill_serve::{CARD_FILE, RECORDS_FILE};
    let handle = server(ServeOptions::new(MODEL_ID));
    let mut options = options_for(&handle.base_url());
    options.top_logprobs = Some(2);
    let valid_dir = scratch("hostile-set").join("set");
    runtime()
        .block_on(harvest(&prompts(3), None, &valid_dir, &options))
        .unwrap();
    drop(handle);
    for (file, other) in [(CARD_FILE, RECORDS_FILE), (RECORDS_FILE, CARD_FILE)] {
        let valid = std::fs::read(valid_dir.join(file)).unwrap();
        let sibling = valid_dir.join(other);
        let report =
            burn_distill_testing::hostile::check_reader(file, valid, 256, Duration::from_secs(10), move |path| {
                let dir = path.parent().unwrap();
                if !dir.join(other).exists() {
                    std::fs::copy(&sibling, dir.join(other)).unwrap();
                }
                TransferSet::open(dir).map(|set| set.records.len())
            });
        assert!(report.refused > 0, "{file}: {report:?}");
    }
}
