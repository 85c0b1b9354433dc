//! `lmforge serve`: an OpenAI-compatible completions API over the batching engine,
//! or, for a sequence classifier, `POST /v1/classify`.
//!
//! `POST /v1/completions` (plain or Server-Sent Events) or `POST /v1/classify`,
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text). Errors use
//! OpenAI's body: `{"error": {"message", "type", "param", "code"}}`.

pub mod api;
pub mod batch;
pub mod engine;

use crate::classify::{Classifier, Input};
use crate::data::TextTokenizer;
use crate::embed::Embedder;
use crate::generate::TokenLogprob;
use crate::model::Gpt;
use api::{ApiError, ClassifyRequest, CompletionRequest, EmbeddingRequest};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use batch::BatchEngine;
use engine::{Engine, Event, Finish, Job};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tracing::info;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    pub model_name: String,
    pub max_batch: usize,
    pub max_queue: usize,
    pub max_tokens_limit: usize,
    pub max_body_bytes: usize,
}

/// Latency buckets (seconds) of the request histogram.
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
struct Metrics {
    requests: BTreeMap<(String, u16), u64>,
    latency_counts: [u64; BUCKETS.len() + 1],
    latency_sum: f64,
}

/// What a server runs: a causal LM's generation or a classifier, and (for a model
/// directory) embeddings from the same model.
pub struct Served {
    pub generator: Option<(Gpt, TextTokenizer)>,
    pub classifier: Option<Classifier>,
    pub embedder: Option<Embedder>,
}

/// A causal LM's decoding engine and tokenizer.
struct Generation {
    engine: Engine,
    tokenizer: TextTokenizer,
    context: usize,
    vocab: usize,
}

struct AppState {
    /// At most one of the two is served.
    generation: Option<Generation>,
    classification: Option<(Arc<Classifier>, BatchEngine<Vec<f64>>)>,
    embedding: Option<(Arc<Embedder>, BatchEngine<Vec<f32>>)>,
    opts: ServeOptions,
    metrics: Mutex<Metrics>,
}

impl AppState {
    fn generation(&self) -> Result<&Generation, ApiError> {
        self.generation.as_ref().ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "'{}' is a sequence classifier: POST /v1/classify",
                    self.opts.model_name
                ),
                "model",
            )
        })
    }

    fn embedding(&self) -> Result<&(Arc<Embedder>, BatchEngine<Vec<f32>>), ApiError> {
        self.embedding.as_ref().ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "'{}' has no encoder to pool into embeddings (a quantised GGUF serves completions only)",
                    self.opts.model_name
                ),
                "model",
            )
        })
    }

    fn classification(&self) -> Result<&(Arc<Classifier>, BatchEngine<Vec<f64>>), ApiError> {
        self.classification.as_ref().ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "'{}' is a language model, not a sequence classifier: POST /v1/completions",
                    self.opts.model_name
                ),
                "model",
            )
        })
    }

    /// A 404 unless `model` is the name this server serves.
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.opts.model_name {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the model '{model}' does not exist; this server serves '{}'",
                self.opts.model_name
            ),
            "invalid_request_error",
        )
        .param("model")
        .code("model_not_found"))
    }

    /// The request body as JSON, within the size limit.
    async fn json_body(&self, body: Body) -> Result<Value, ApiError> {
        let bytes = axum::body::to_bytes(body, self.opts.max_body_bytes)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds {} bytes", self.opts.max_body_bytes),
                    "invalid_request_error",
                )
                .code("request_too_large")
            })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid JSON body: {e}"),
                "invalid_request_error",
            )
        })
    }
}

pub(crate) fn queue_full() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests are queued; retry later",
        "rate_limit_error",
    )
    .code("rate_limit_exceeded")
}

/// How many tokens a response generated, for the request log.
#[derive(Clone, Copy)]
struct GeneratedTokens(usize);

/// Builds the router over a loaded model (used by `serve` and by tests).
fn router(served: Served, opts: ServeOptions) -> Router {
    let generation = served.generator.map(|(model, tokenizer)| {
        let (context, vocab) = (model.config.n_positions, model.config.vocab_size);
        Generation {
            engine: Engine::start(model, opts.max_batch, opts.max_queue),
            tokenizer,
            context,
            vocab,
        }
    });
    let classification = served.classifier.map(|c| {
        let c = Arc::new(c);
        let model = Arc::clone(&c);
        let engine = BatchEngine::start(
            "classify",
            opts.max_batch,
            opts.max_queue,
            move |seqs, batch| model.probabilities(seqs, batch),
        );
        (c, engine)
    });
    let embedding = served.embedder.map(|e| {
        let e = Arc::new(e);
        let model = Arc::clone(&e);
        let engine = BatchEngine::start(
            "embed",
            opts.max_batch,
            opts.max_queue,
            move |seqs, batch| model.embed(seqs, batch),
        );
        (e, engine)
    });
    let state = Arc::new(AppState {
        generation,
        classification,
        embedding,
        opts,
        metrics: Mutex::new(Metrics::default()),
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/classify", post(classify))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route",
                "invalid_request_error",
            )
        })
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            log_request,
        ))
        .with_state(state)
}

/// Serves until SIGINT/SIGTERM, then finishes the requests in flight.
pub async fn serve(served: Served, opts: ServeOptions) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|e| anyhow::anyhow!("{}: cannot bind: {e}", opts.addr))?;
    let addr = listener.local_addr()?;
    let name = opts.model_name.clone();
    let app = router(served, opts);
    println!("serving {name} on http://{addr}");
    use std::io::Write;
    std::io::stdout().flush()?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    info!("shut down");
    Ok(())
}

pub(crate) async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down: finishing requests in flight");
}

async fn log_request(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t0 = Instant::now();
    let response = next.run(req).await;
    let latency = t0.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    let tokens = response
        .extensions()
        .get::<GeneratedTokens>()
        .map_or("-".to_string(), |t| t.0.to_string());
    info!(
        "{method} {path} {status} tokens={tokens} latency={:.1}ms",
        latency * 1e3
    );
    let mut m = state.metrics.lock().unwrap_or_else(|p| p.into_inner());
    *m.requests.entry((path, status)).or_default() += 1;
    let bucket = BUCKETS
        .iter()
        .position(|&b| latency <= b)
        .unwrap_or(BUCKETS.len());
    m.latency_counts[bucket] += 1;
    m.latency_sum += latency;
    response
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": state.opts.model_name, "object": "model", "created": now(), "owned_by": "lmforge"}]}),
    )
}

async fn metrics(State(state): State<Arc<AppState>>) -> String {
    let m = state.metrics.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::from("# TYPE lmforge_requests_total counter\n");
    for ((path, status), n) in &m.requests {
        out += &format!("lmforge_requests_total{{path=\"{path}\",status=\"{status}\"}} {n}\n");
    }
    if let Some(g) = &state.generation {
        let s = &g.engine.stats;
        out += "# TYPE lmforge_tokens_generated_total counter\n";
        out += &format!(
            "lmforge_tokens_generated_total {}\n",
            s.tokens_generated.load(Ordering::Relaxed)
        );
        out += "# TYPE lmforge_queue_depth gauge\n";
        out += &format!("lmforge_queue_depth {}\n", s.queued.load(Ordering::Relaxed));
        out += "# TYPE lmforge_active_sequences gauge\n";
        out += &format!(
            "lmforge_active_sequences {}\n",
            s.active.load(Ordering::Relaxed)
        );
    }
    if let Some((_, c)) = &state.classification {
        out += "# TYPE lmforge_queue_depth gauge\n";
        out += &format!("lmforge_queue_depth {}\n", c.queued.load(Ordering::Relaxed));
    }
    out += "# TYPE lmforge_request_latency_seconds histogram\n";
    let mut cumulative = 0;
    for (i, n) in m.latency_counts.iter().enumerate() {
        cumulative += n;
        let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
        out += &format!("lmforge_request_latency_seconds_bucket{{le=\"{le}\"}} {cumulative}\n");
    }
    out += &format!("lmforge_request_latency_seconds_sum {}\nlmforge_request_latency_seconds_count {cumulative}\n", m.latency_sum);
    out
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Each input as the model takes it; a bad one is a 400 naming `param` and its index.
fn encode_all(
    inputs: &[Input],
    param: &'static str,
    encode: impl Fn(&Input) -> anyhow::Result<Vec<u32>>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            encode(input).map_err(|e| ApiError::invalid(format!("{param} {i}: {e:#}"), param))
        })
        .collect()
}

/// `POST /v1/classify`: each input's label and every label's probability.
async fn classify(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let value = state.json_body(body).await?;
    let req = ClassifyRequest::parse(&value)?;
    state.check_model(&req.model)?;
    let (classifier, engine) = state.classification()?;
    let sequences = encode_all(&req.inputs, "input", |i| classifier.encode(i))?;
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    let probabilities = engine.answer(sequences).await?;
    let data: Vec<Value> = probabilities
        .into_iter()
        .enumerate()
        .map(|(i, p)| classifier.prediction(p).to_json(i))
        .collect();
    Ok(Json(json!({
        "object": "list", "model": state.opts.model_name, "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// `POST /v1/embeddings`, OpenAI's shape: one vector per input, as floats or as the
/// base64 of their little-endian f32 bytes.
async fn embeddings(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    use base64::Engine as _;
    let value = state.json_body(body).await?;
    let req = EmbeddingRequest::parse(&value)?;
    state.check_model(&req.model)?;
    let (embedder, engine) = state.embedding()?;
    let sequences = encode_all(&req.inputs, "input", |i| embedder.encode(i))?;
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    let vectors = engine.answer(sequences).await?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if req.base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list", "data": data, "model": state.opts.model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// A prompt as tokenised: its text (decoded, for a token prompt) and ids.
struct Prompt {
    text: String,
    ids: Vec<u32>,
}

/// A submitted request: its choices' events and cancel flags.
struct Running {
    events: mpsc::UnboundedReceiver<Event>,
    cancels: Vec<Arc<AtomicBool>>,
    prompts: Vec<Prompt>,
}

async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let value = state.json_body(body).await?;
    let req = CompletionRequest::parse(&value, state.opts.max_tokens_limit)?;
    state.check_model(&req.model)?;
    state.generation()?;
    let running = submit(&state, &req)?;
    let id = format!("cmpl-{:x}{:x}", now(), rand::random::<u64>());
    if req.stream {
        Ok(stream_response(state, req, running, id).into_response())
    } else {
        collect_response(&state, &req, running, id).await
    }
}

/// Tokenises the prompts (or checks token prompts against the vocabulary), checks them
/// against the context, queues every choice.
fn submit(state: &AppState, req: &CompletionRequest) -> Result<Running, ApiError> {
    let gen = state.generation()?;
    let tok = &gen.tokenizer;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut jobs = Vec::new();
    let mut cancels = Vec::new();
    let mut prompts = Vec::new();
    for (p, prompt) in req.prompts.iter().enumerate() {
        let (text, mut ids) = match prompt {
            Input::Text(text) => {
                let ids = tok
                    .encode(text)
                    .map_err(|e| ApiError::invalid(format!("prompt {p}: {e:#}"), "prompt"))?;
                (text.clone(), ids)
            }
            Input::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= gen.vocab) {
                    return Err(ApiError::invalid(
                        format!(
                            "prompt {p}: token id {bad} is not below the vocabulary size {}",
                            gen.vocab
                        ),
                        "prompt",
                    ));
                }
                let text = tok
                    .decode(ids)
                    .map_err(|e| ApiError::invalid(format!("prompt {p}: {e:#}"), "prompt"))?;
                (text, ids.clone())
            }
        };
        if ids.is_empty() {
            ids.push(tok.eot_id());
        }
        if ids.len() + req.max_tokens > gen.context {
            return Err(ApiError::invalid(
                format!(
                    "this model's maximum context length is {} tokens; the prompt has {} and max_tokens asks for {}",
                    gen.context,
                    ids.len(),
                    req.max_tokens
                ),
                "prompt",
            )
            .code("context_length_exceeded"));
        }
        for j in 0..req.n {
            let choice = p * req.n + j;
            let cancel = Arc::new(AtomicBool::new(false));
            cancels.push(Arc::clone(&cancel));
            jobs.push(Job {
                choice,
                prompt: ids.clone(),
                max_tokens: req.max_tokens,
                sampling: req.sampling(tok.eot_id()),
                logprobs: req.logprobs,
                score_prompt: req.echo && req.logprobs.is_some(),
                // Choices of one seeded request differ, yet each is reproducible.
                seed: req
                    .seed
                    .map_or_else(rand::random, |s| s.wrapping_add(choice as u64)),
                events: tx.clone(),
                cancel,
            });
        }
        prompts.push(Prompt { text, ids });
    }
    gen.engine.submit(jobs).map_err(|_| queue_full())?;
    Ok(Running {
        events: rx,
        cancels,
        prompts,
    })
}

/// Text of one choice as it grows, with stop sequences applied.
struct ChoiceText {
    ids: Vec<u32>,
    text: String,
    sent: usize,
    finish: Option<Finish>,
    /// The prompt's scores (echo with logprobs) and each kept token's.
    prompt_logprobs: Vec<TokenLogprob>,
    logprobs: Vec<TokenLogprob>,
}

impl ChoiceText {
    fn new() -> Self {
        ChoiceText {
            ids: Vec::new(),
            text: String::new(),
            sent: 0,
            finish: None,
            prompt_logprobs: Vec::new(),
            logprobs: Vec::new(),
        }
    }

    /// Adds a token; returns true when a stop sequence ended the text (the token that
    /// completed it is not reported among the logprobs).
    fn push(
        &mut self,
        token: u32,
        logprob: Option<&TokenLogprob>,
        tok: &TextTokenizer,
        stops: &[String],
    ) -> bool {
        self.ids.push(token);
        self.logprobs.extend(logprob.cloned());
        self.text = tok.decode(&self.ids).unwrap_or_default();
        if let Some(at) = stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            self.logprobs.pop();
            self.finish = Some(Finish::Stop);
            return true;
        }
        false
    }

    /// The new text that can be sent now: a possible stop-sequence prefix and an
    /// unfinished UTF-8 sequence (decoded as U+FFFD) are held back until settled.
    fn delta(&mut self, stops: &[String]) -> String {
        let mut end = self.text.len();
        if self.finish.is_none() {
            let hold = stops
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .max()
                .unwrap_or(0);
            end = end.saturating_sub(hold);
            while end > self.sent && !self.text.is_char_boundary(end) {
                end -= 1;
            }
            if self.text[..end].ends_with('\u{fffd}') {
                end -= '\u{fffd}'.len_utf8();
            }
        }
        if end <= self.sent {
            return String::new();
        }
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }
}

/// OpenAI's legacy `logprobs` object: `tokens`, `token_logprobs`, `top_logprobs` and
/// `text_offset` (characters into the returned text), the prompt's tokens first with
/// `echo` (the very first one has no log-probability: null).
fn logprobs_json(c: &ChoiceText, prompt: &Prompt, echo: bool, tok: &TextTokenizer) -> Value {
    let piece = |id: u32| tok.decode(&[id]).unwrap_or_default();
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let top = |lp: &TokenLogprob| {
        let mut m = serde_json::Map::new();
        // Best first: where two ids decode to the same text, the likelier one stays.
        for &(id, v) in &lp.top {
            m.entry(piece(id)).or_insert(json!(v));
        }
        Value::Object(m)
    };
    if echo {
        tokens.push(piece(prompt.ids[0]));
        token_logprobs.push(Value::Null);
        top_logprobs.push(Value::Null);
        for lp in &c.prompt_logprobs {
            tokens.push(piece(lp.token));
            token_logprobs.push(json!(lp.logprob));
            top_logprobs.push(top(lp));
        }
    }
    for lp in &c.logprobs {
        tokens.push(piece(lp.token));
        token_logprobs.push(json!(lp.logprob));
        top_logprobs.push(top(lp));
    }
    let mut offset = if echo { 0 } else { prompt.text.chars().count() };
    let text_offset: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let at = offset;
            offset += t.chars().count();
            at
        })
        .collect();
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
}

fn finish_name(f: Option<Finish>) -> Value {
    match f {
        Some(Finish::Stop) => json!("stop"),
        Some(Finish::Length) => json!("length"),
        None => Value::Null,
    }
}

async fn collect_response(
    state: &AppState,
    req: &CompletionRequest,
    mut run: Running,
    id: String,
) -> Result<Response, ApiError> {
    let tokenizer = &state.generation()?.tokenizer;
    let mut choices: Vec<ChoiceText> = (0..run.cancels.len()).map(|_| ChoiceText::new()).collect();
    let mut open = choices.len();
    while open > 0 {
        let Some(event) = run.events.recv().await else {
            break;
        };
        match event {
            Event::Token(i, t, lp)
                if choices[i].finish.is_none()
                    && choices[i].push(t, lp.as_ref(), tokenizer, &req.stop) =>
            {
                run.cancels[i].store(true, Ordering::SeqCst);
                open -= 1;
            }
            Event::Prompt(i, scored) => choices[i].prompt_logprobs = scored,
            Event::Done(i, f) if choices[i].finish.is_none() => {
                choices[i].finish = Some(f);
                open -= 1;
            }
            Event::Failed(_, message) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    message,
                    "server_error",
                ));
            }
            _ => {}
        }
    }
    let completion_tokens: usize = choices.iter().map(|c| c.ids.len()).sum();
    let prompt_tokens: usize = run.prompts.iter().map(|p| p.ids.len()).sum();
    let body = json!({
        "id": id, "object": "text_completion", "created": now(), "model": state.opts.model_name,
        "choices": choices.iter().enumerate().map(|(i, c)| {
            let prompt = &run.prompts[i / req.n];
            let prefix = if req.echo { prompt.text.as_str() } else { "" };
            let logprobs = req.logprobs.map_or(Value::Null, |_| logprobs_json(c, prompt, req.echo, tokenizer));
            json!({"text": format!("{prefix}{}", c.text), "index": i, "logprobs": logprobs, "finish_reason": finish_name(c.finish)})
        }).collect::<Vec<_>>(),
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    });
    let mut response = Json(body).into_response();
    response
        .extensions_mut()
        .insert(GeneratedTokens(completion_tokens));
    Ok(response)
}

fn stream_response(
    state: Arc<AppState>,
    req: CompletionRequest,
    mut run: Running,
    id: String,
) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let Some(tokenizer) = state.generation.as_ref().map(|g| &g.tokenizer) else {
            return;
        };
        let created = now();
        let chunk = |i: usize, text: String, finish: Option<Finish>| {
            let body = json!({
                "id": id, "object": "text_completion", "created": created, "model": state.opts.model_name,
                "choices": [{"text": text, "index": i, "logprobs": null, "finish_reason": finish_name(finish)}],
            });
            Ok(SseEvent::default().data(body.to_string()))
        };
        let mut choices: Vec<ChoiceText> =
            (0..run.cancels.len()).map(|_| ChoiceText::new()).collect();
        if req.echo {
            for i in 0..choices.len() {
                if tx
                    .send(chunk(i, run.prompts[i / req.n].text.clone(), None))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        let mut open = choices.len();
        while open > 0 {
            let Some(event) = run.events.recv().await else {
                break;
            };
            let (i, finished) = match event {
                Event::Token(i, t, lp) if choices[i].finish.is_none() => {
                    (i, choices[i].push(t, lp.as_ref(), tokenizer, &req.stop))
                }
                Event::Done(i, f) if choices[i].finish.is_none() => {
                    choices[i].finish = Some(f);
                    (i, true)
                }
                Event::Failed(i, _) => {
                    choices[i].finish = Some(Finish::Stop);
                    (i, true)
                }
                _ => continue,
            };
            let delta = choices[i].delta(&req.stop);
            let mut sent = true;
            if !delta.is_empty() {
                sent = tx.send(chunk(i, delta, None)).await.is_ok();
            }
            if finished {
                run.cancels[i].store(true, Ordering::SeqCst);
                open -= 1;
                sent = sent
                    && tx
                        .send(chunk(i, String::new(), choices[i].finish))
                        .await
                        .is_ok();
            }
            if !sent {
                // The client went away: end every choice so the engine frees the slots.
                run.cancels
                    .iter()
                    .for_each(|c| c.store(true, Ordering::SeqCst));
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}
