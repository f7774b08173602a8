//! HTTP: the OpenAI-compatible API, vLLM-compatible adapter admin and metrics, health.
//!
//! Handlers only translate: they read the body (bounded), authenticate, call
//! [`Service`](crate::service::Service), and write JSON or server-sent events. Every error uses
//! the OpenAI error shape `{"error": {"message", "type", "param", "code"}}`.

mod metrics;
mod parse;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use openlora_kernels::DeviceBackend;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::engine::{EngineError, Event, FinishReason, RequestStream, TokenLogprob, Usage};
use crate::service::{ErrorKind, RecordContext, Service, ServiceError, Slot, Started, Tenant};
use parse::OutputOptions;

/// The backend the server runs on.
pub type ServerBackend = DeviceBackend;

type Svc = Arc<Service<ServerBackend>>;

/// Writes an error in the OpenAI shape.
pub fn error_response(e: &ServiceError) -> Response {
    let (status, kind) = match e.kind {
        ErrorKind::BadRequest => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        ErrorKind::Unauthorized => (StatusCode::UNAUTHORIZED, "authentication_error"),
        ErrorKind::Forbidden => (StatusCode::FORBIDDEN, "permission_error"),
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found_error"),
        ErrorKind::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error"),
        ErrorKind::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        ErrorKind::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded_error"),
        ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    };
    let body = json!({"error": {"message": e.message, "type": kind, "param": e.param, "code": status.as_u16()}});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn json_response(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// The router over `svc`.
pub fn router(svc: Svc) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_one))
        .route("/v1/receipts/{id}", get(receipt))
        .route("/v1/attribution/key", get(attribution_key))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/admin/plugins/reload", post(reload_plugin))
        .route("/v1/admin/adapters/rescan", post(rescan_adapters))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .route("/metrics", get(metrics::render))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/version", get(|| async { json_response(&json!({"version": env!("CARGO_PKG_VERSION")})) }))
        .fallback(|req: Request<Body>| async move {
            error_response(&ServiceError::new(
                ErrorKind::NotFound,
                format!("no route for {} {}", req.method(), req.uri().path()),
            ))
        })
        .with_state(svc)
}

fn tenant(svc: &Svc, headers: &HeaderMap) -> Result<Arc<Tenant>, ServiceError> {
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    svc.authenticate(auth)
}

async fn read_body(svc: &Svc, body: Body) -> Result<Bytes, ServiceError> {
    let limit = svc.limits().max_body_bytes;
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ServiceError::new(ErrorKind::TooLarge, format!("the request body is larger than {limit} bytes")))
}

/// Authenticates and reads the body of a POST.
async fn prologue(svc: &Svc, headers: &HeaderMap, body: Body) -> Result<(Arc<Tenant>, Bytes), ServiceError> {
    let t = tenant(svc, headers)?;
    let b = read_body(svc, body).await?;
    Ok((t, b))
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(svc): State<Svc>, headers: HeaderMap) -> Response {
    match tenant(&svc, &headers) {
        Ok(t) => {
            let data: Vec<Value> = svc.list_models(&t).iter().map(|m| model_json(&svc, m)).collect();
            json_response(&json!({"object": "list", "data": data}))
        }
        Err(e) => error_response(&e),
    }
}

fn model_json(svc: &Svc, m: &crate::service::ModelCard) -> Value {
    json!({
        "id": m.id, "object": "model", "created": svc.created, "owned_by": "openlora",
        "root": m.root, "parent": m.parent, "max_model_len": svc.engine().context_limit(),
    })
}

async fn model_one(State(svc): State<Svc>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    match tenant(&svc, &headers) {
        Ok(t) => match svc.list_models(&t).iter().find(|m| m.id == id) {
            Some(m) => json_response(&model_json(&svc, m)),
            None => error_response(&ServiceError::new(ErrorKind::NotFound, format!("the model `{id}` does not exist"))),
        },
        Err(e) => error_response(&e),
    }
}

async fn receipt(State(svc): State<Svc>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    match tenant(&svc, &headers).and_then(|t| svc.receipt(&t, &id)) {
        Ok(r) => json_response(&serde_json::to_value(&r).unwrap_or(Value::Null)),
        Err(e) => error_response(&e),
    }
}

async fn attribution_key(State(svc): State<Svc>) -> Response {
    match svc.ledger() {
        Some(l) => json_response(&json!({"algorithm": "ed25519", "public_key": l.public_key(), "encoding": "hex"})),
        None => error_response(&ServiceError::new(ErrorKind::NotFound, "attribution is off in this deployment")),
    }
}

async fn load_lora(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        svc.require_admin(&t)?;
        let obj = parse::Fields::parse(&body)?;
        let f = parse::Fields(&obj);
        let name = f.str("lora_name")?.ok_or_else(|| ServiceError::bad("lora_name", "`lora_name` is required"))?;
        let path = f.str("lora_path")?.ok_or_else(|| ServiceError::bad("lora_path", "`lora_path` is required"))?;
        let (svc2, name2, path2) = (svc.clone(), name.to_owned(), std::path::PathBuf::from(path));
        tokio::task::spawn_blocking(move || svc2.load_adapter(&t, &name2, &path2))
            .await
            .map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))??;
        Ok::<_, ServiceError>(format!("Success: LoRA adapter '{name}' added successfully."))
    }
    .await;
    match r {
        Ok(msg) => msg.into_response(),
        Err(e) => error_response(&e),
    }
}

async fn reload_plugin(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        let obj = parse::Fields::parse(&body)?;
        let f = parse::Fields(&obj);
        let name = f.str("name")?.ok_or_else(|| ServiceError::bad("name", "`name` is required"))?.to_owned();
        let path = f.str("path")?.map(std::path::PathBuf::from);
        let svc2 = svc.clone();
        tokio::task::spawn_blocking(move || svc2.reload_plugin(&t, &name, path.as_deref()))
            .await
            .map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))?
    }
    .await;
    match r {
        Ok(sha) => json_response(&json!({"reloaded": true, "component_sha256": sha})),
        Err(e) => error_response(&e),
    }
}

async fn rescan_adapters(State(svc): State<Svc>, headers: HeaderMap) -> Response {
    let svc2 = svc.clone();
    let r = match tenant(&svc, &headers) {
        Ok(t) => tokio::task::spawn_blocking(move || svc2.rescan_adapters(&t))
            .await
            .map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))
            .and_then(|r| r),
        Err(e) => Err(e),
    };
    match r {
        Ok(rep) => json_response(&json!({
            "added": rep.added, "changed": rep.changed, "removed": rep.removed, "unchanged": rep.unchanged,
            "errors": rep.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })),
        Err(e) => error_response(&e),
    }
}

async fn unload_lora(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        svc.require_admin(&t)?;
        let obj = parse::Fields::parse(&body)?;
        let name = parse::Fields(&obj)
            .str("lora_name")?
            .ok_or_else(|| ServiceError::bad("lora_name", "`lora_name` is required"))?
            .to_owned();
        svc.unload_adapter(&t, &name)?;
        Ok::<_, ServiceError>(format!("Success: LoRA adapter '{name}' removed successfully."))
    }
    .await;
    match r {
        Ok(msg) => msg.into_response(),
        Err(e) => error_response(&e),
    }
}

/// Which API a response is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

async fn completions(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        let obj = parse::Fields::parse(&body)?;
        let (params, out) = parse::completions(&obj)?;
        let svc2 = svc.clone();
        let started = tokio::task::spawn_blocking(move || {
            params.into_iter().map(|p| svc2.start(&t, p)).collect::<Result<Vec<Started>, ServiceError>>()
        })
        .await
        .map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))??;
        Ok::<_, ServiceError>((started, out))
    }
    .await;
    match r {
        Ok((started, out)) => respond(svc, Api::Completions, started, out).await,
        Err(e) => error_response(&e),
    }
}

async fn chat_completions(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        let obj = parse::Fields::parse(&body)?;
        let (params, out) = parse::chat(&obj)?;
        let svc2 = svc.clone();
        let started = tokio::task::spawn_blocking(move || svc2.start(&t, params))
            .await
            .map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))??;
        Ok::<_, ServiceError>((vec![started], out))
    }
    .await;
    match r {
        Ok((started, out)) => respond(svc, Api::Chat, started, out).await,
        Err(e) => error_response(&e),
    }
}

/// The events of every choice of a request, tagged with the choice index, in one channel.
/// Forwarding tasks end (dropping, hence cancelling, their streams) when the receiver goes.
struct Merged {
    rx: UnboundedReceiver<(usize, Event)>,
    choices: usize,
    prompt_tokens: usize,
    model: String,
    started: std::time::Instant,
    recorder: Recorder,
    _slots: Vec<Slot>,
}

/// Writes the request's receipt once: when it finishes, or (on drop) as cancelled when the
/// client went away first.
struct Recorder {
    svc: Svc,
    request_id: String,
    ctx: Option<RecordContext>,
    texts: Vec<String>,
    completion: usize,
}

impl Recorder {
    #[allow(clippy::type_complexity)]
    fn finish(
        &mut self,
        reason: &str,
    ) -> Result<Option<tokio::sync::oneshot::Receiver<Result<String, String>>>, ServiceError> {
        let Some(ctx) = self.ctx.take() else { return Ok(None) };
        let outs: Vec<&str> = self.texts.iter().map(String::as_str).collect();
        self.svc.record(&ctx, self.completion, reason, &outs)
    }

    /// Waits for the receipt id (None when attribution is off).
    async fn finish_and_wait(&mut self, reason: &str) -> Result<Option<String>, ServiceError> {
        match self.finish(reason)? {
            None => Ok(None),
            Some(rx) => match rx.await {
                Ok(Ok(id)) => Ok(Some(id)),
                Ok(Err(e)) => {
                    Err(ServiceError::new(ErrorKind::Internal, format!("the receipt could not be written: {e}")))
                }
                Err(_) => Err(ServiceError::new(ErrorKind::Internal, "the ledger writer stopped")),
            },
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.finish("cancelled");
    }
}

fn merge_streams(svc: &Svc, started: Vec<Started>) -> Merged {
    let (tx, rx) = unbounded_channel();
    let mut index = 0;
    let mut slots = Vec::new();
    let prompt_tokens = started.iter().map(|s| s.prompt_tokens).sum();
    let model = started.first().map(|s| s.model.clone()).unwrap_or_default();
    let t0 = started.first().map_or_else(std::time::Instant::now, |s| s.started);
    let ctx = RecordContext::combine(started.iter().map(|s| s.record.clone()).collect());
    for s in started {
        slots.extend(s.slot);
        for stream in s.streams {
            let tx = tx.clone();
            let i = index;
            index += 1;
            tokio::spawn(forward(stream, i, tx));
        }
    }
    let request_id = ctx.as_ref().map_or_else(|| crate::service::new_request_id("cmpl"), |c| c.request_id.clone());
    let recorder = Recorder { svc: svc.clone(), request_id, ctx, texts: vec![String::new(); index], completion: 0 };
    Merged { rx, choices: index, prompt_tokens, model, started: t0, recorder, _slots: slots }
}

async fn forward(mut stream: RequestStream, i: usize, tx: tokio::sync::mpsc::UnboundedSender<(usize, Event)>) {
    while let Some(e) = stream.next().await {
        if tx.send((i, e)).is_err() {
            return; // the client is gone: dropping the stream cancels the request
        }
    }
}

#[derive(Default)]
struct Choice {
    text: String,
    finish: Option<FinishReason>,
    usage: Usage,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
}

fn usage_json(prompt_tokens: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens, "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn logprobs_json(svc: &Svc, api: Api, tokens: &[u32], lps: &[TokenLogprob], text_offset: usize) -> Value {
    if lps.is_empty() {
        return Value::Null;
    }
    match api {
        Api::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .zip(lps)
                .map(|(&t, lp)| {
                    let s = svc.token_text(t);
                    json!({
                        "token": s, "logprob": lp.logprob, "bytes": s.as_bytes(),
                        "top_logprobs": lp.top.iter().map(|&(id, l)| {
                            let s = svc.token_text(id);
                            json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
                        }).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({"content": content})
        }
        Api::Completions => {
            let mut offset = text_offset;
            let mut offsets = Vec::new();
            let mut strs = Vec::new();
            for &t in tokens {
                let s = svc.token_text(t);
                offsets.push(offset);
                offset += s.len();
                strs.push(s);
            }
            json!({
                "tokens": strs,
                "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|l| {
                    l.top.iter().map(|&(id, v)| (svc.token_text(id), json!(v))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

fn engine_error(e: EngineError) -> ServiceError {
    ServiceError::from(e)
}

async fn respond(svc: Svc, api: Api, started: Vec<Started>, out: OutputOptions) -> Response {
    let merged = merge_streams(&svc, started);
    if out.stream { stream_response(svc, api, merged, out) } else { whole_response(svc, api, merged).await }
}

async fn whole_response(svc: Svc, api: Api, mut m: Merged) -> Response {
    let mut choices: Vec<Choice> = (0..m.choices).map(|_| Choice::default()).collect();
    let mut done = 0;
    let mut first = true;
    while done < m.choices {
        let Some((i, e)) = m.rx.recv().await else { break };
        match e {
            Event::Token { id, text, logprob } => {
                if first {
                    svc.metrics.ttft.observe(m.started.elapsed().as_secs_f64());
                    first = false;
                }
                let c = &mut choices[i];
                c.text.push_str(&text);
                c.tokens.push(id);
                c.logprobs.extend(logprob);
            }
            Event::Finished { text, reason, usage } => {
                choices[i].text.push_str(&text);
                choices[i].finish = Some(reason);
                choices[i].usage = usage;
                svc.metrics.finished(reason.as_str());
                done += 1;
            }
            Event::Failed(e) => {
                let _ = m.recorder.finish_and_wait("error").await;
                return error_response(&engine_error(e));
            }
        }
    }
    svc.metrics.e2e.observe(m.started.elapsed().as_secs_f64());
    let completion: usize = choices.iter().map(|c| c.usage.completion_tokens).sum();
    m.recorder.texts = choices.iter().map(|c| c.text.clone()).collect();
    m.recorder.completion = completion;
    let reason = choices.first().and_then(|c| c.finish).map_or("stop", FinishReason::as_str);
    let receipt = match m.recorder.finish_and_wait(reason).await {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let cached: usize = choices.iter().map(|c| c.usage.cached_tokens).max().unwrap_or(0);
    let prompt_tokens = m.prompt_tokens;
    let items: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let finish = c.finish.map(FinishReason::as_str);
            let lp = logprobs_json(&svc, api, &c.tokens, &c.logprobs, 0);
            match api {
                Api::Chat => json!({
                    "index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": lp, "finish_reason": finish,
                }),
                Api::Completions => json!({"index": i, "text": c.text, "logprobs": lp, "finish_reason": finish}),
            }
        })
        .collect();
    let object = match api {
        Api::Chat => "chat.completion",
        Api::Completions => "text_completion",
    };
    let id = m.recorder.request_id.clone();
    let mut body = json!({
        "id": id, "object": object, "created": now(), "model": m.model,
        "choices": items, "usage": usage_json(prompt_tokens, completion, cached),
    });
    let mut resp = match &receipt {
        Some(r) => {
            body["receipt"] = json!(r);
            json_response(&body)
        }
        None => json_response(&body),
    };
    if let Some(r) = receipt.and_then(|r| HeaderValue::from_str(&r).ok()) {
        resp.headers_mut().insert("openlora-receipt", r);
    }
    resp
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

struct SseState {
    svc: Svc,
    api: Api,
    m: Merged,
    out: OutputOptions,
    id: String,
    created: u64,
    done: usize,
    completion: usize,
    cached: usize,
    first: bool,
    sent_role: bool,
    finished: bool,
    first_reason: Option<&'static str>,
    queue: std::collections::VecDeque<Bytes>,
}

impl SseState {
    fn chunk(&self, choice: Value) -> Bytes {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completions => "text_completion",
        };
        sse(
            &json!({"id": self.id, "object": object, "created": self.created, "model": self.m.model, "choices": [choice]}),
        )
    }

    fn piece(&self, i: usize, text: &str, tokens: &[u32], lps: &[TokenLogprob], finish: Option<&str>) -> Bytes {
        let lp = logprobs_json(&self.svc, self.api, tokens, lps, 0);
        match self.api {
            Api::Chat => self.chunk(json!({
                "index": i, "delta": if finish.is_some() && text.is_empty() { json!({}) } else { json!({"content": text}) },
                "logprobs": lp, "finish_reason": finish,
            })),
            Api::Completions => self.chunk(json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})),
        }
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.queue.pop_front() {
                return Some(b);
            }
            if self.finished {
                return None;
            }
            if !self.sent_role && self.api == Api::Chat {
                self.sent_role = true;
                for i in 0..self.m.choices {
                    let c = self.chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}));
                    self.queue.push_back(c);
                }
                continue;
            }
            if self.done == self.m.choices {
                self.finished = true;
                self.svc.metrics.e2e.observe(self.m.started.elapsed().as_secs_f64());
                self.m.recorder.completion = self.completion;
                let reason = self.first_reason.unwrap_or("stop");
                let object = if self.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
                match self.m.recorder.finish_and_wait(reason).await {
                    Ok(receipt) => {
                        if self.out.include_usage || receipt.is_some() {
                            let mut last = json!({
                                "id": self.id, "object": object, "created": self.created, "model": self.m.model,
                                "choices": [],
                            });
                            if self.out.include_usage {
                                last["usage"] = usage_json(self.m.prompt_tokens, self.completion, self.cached);
                            }
                            if let Some(r) = receipt {
                                last["receipt"] = json!(r);
                            }
                            self.queue.push_back(sse(&last));
                        }
                    }
                    Err(e) => self.queue.push_back(sse(
                        &json!({"error": {"message": e.message, "type": "internal_error", "param": null, "code": 500}}),
                    )),
                }
                self.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                continue;
            }
            let Some((i, e)) = self.m.rx.recv().await else {
                self.done = self.m.choices;
                continue;
            };
            match e {
                Event::Token { id, text, logprob } => {
                    if self.first {
                        self.svc.metrics.ttft.observe(self.m.started.elapsed().as_secs_f64());
                        self.first = false;
                    }
                    let lps: Vec<TokenLogprob> = logprob.into_iter().collect();
                    if let Some(t) = self.m.recorder.texts.get_mut(i) {
                        t.push_str(&text);
                    }
                    if !text.is_empty() || !lps.is_empty() {
                        let b = self.piece(i, &text, &[id], &lps, None);
                        self.queue.push_back(b);
                    }
                }
                Event::Finished { text, reason, usage } => {
                    self.done += 1;
                    if let Some(t) = self.m.recorder.texts.get_mut(i) {
                        t.push_str(&text);
                    }
                    if i == 0 {
                        self.first_reason = Some(reason.as_str());
                    }
                    self.completion += usage.completion_tokens;
                    self.cached = self.cached.max(usage.cached_tokens);
                    self.svc.metrics.finished(reason.as_str());
                    let b = self.piece(i, &text, &[], &[], Some(reason.as_str()));
                    self.queue.push_back(b);
                }
                Event::Failed(e) => {
                    let se = engine_error(e);
                    self.svc.metrics.refused(se.kind);
                    let _ = self.m.recorder.finish_and_wait("error").await;
                    self.queue.push_back(sse(&json!({"error": {"message": se.message, "type": "internal_error", "param": null, "code": 500}})));
                    self.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    self.finished = true;
                }
            }
        }
    }
}

fn stream_response(svc: Svc, api: Api, m: Merged, out: OutputOptions) -> Response {
    let id = m.recorder.request_id.clone();
    let state = SseState {
        svc,
        api,
        m,
        out,
        id,
        created: now(),
        done: 0,
        completion: 0,
        cached: 0,
        first: true,
        sent_role: false,
        finished: false,
        first_reason: None,
        queue: Default::default(),
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        let b = s.next().await?;
        Some((Ok::<Bytes, Infallible>(b), s))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Serves `svc` on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// for up to `grace`.
pub async fn serve(
    svc: Svc,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let app = router(svc.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signalled = async move {
        shutdown.await;
        let _ = stop_tx.send(());
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signalled);
    let engine = svc.engine().clone();
    tokio::select! {
        r = server => r,
        _ = async {
            let _ = stop_rx.await;
            engine.stop_accepting();
            tokio::time::sleep(grace).await;
        } => {
            eprintln!("openlora: shutdown grace period ({grace:?}) over; closing remaining connections");
            Ok(())
        }
    }
}

/// The local address a listener is bound to, for the start-up line.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}")
}
