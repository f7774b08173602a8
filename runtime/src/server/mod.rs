//! HTTP: the OpenAI-compatible API, vLLM-compatible adapter admin and metrics, health.
//!
//! Handlers only translate: they read the body (bounded), authenticate, call
//! [`Service`](crate::service::Service) (for generations, [`Service::generate`] and the
//! [`Journey`] it returns), and write JSON or server-sent events. Every error uses the OpenAI
//! error shape `{"error": {"message", "type", "param", "code"}}`. Nothing here knows the engine:
//! receipts, metrics and cancellation belong to the journey, which a dropped response drops.

mod parse;
mod plugin_admin;
mod tools;

#[doc(hidden)]
pub use parse::request_from_body;

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
use serde_json::{Value, json};

use crate::service::{
    ErrorKind, Journey, PromptLogprob, Service, ServiceError, ServiceEvent, ServingBackend, Tenant, TokenLogprob,
};
use parse::OutputOptions;
use tools::ToolRequest;

type Svc = Arc<Service<ServingBackend>>;

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

/// Where a server listens, which decides what the request guard checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// A loopback address: the `Host` header must name loopback too, so a web page whose name
    /// was re-bound to 127.0.0.1 (DNS rebinding) cannot reach the API from the operator's
    /// browser.
    Loopback,
    /// Any other address: the operator's network decides who reaches it.
    Network,
}

impl Exposure {
    /// The exposure of a listener bound to `addr`.
    pub fn of(addr: SocketAddr) -> Self {
        if addr.ip().is_loopback() { Self::Loopback } else { Self::Network }
    }
}

fn refuse(status: StatusCode, kind: &str, message: String) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Whether `host` (a `Host` header value, port optional) names the loopback interface.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(h, _)| h),
        None => host
            .rsplit_once(':')
            .map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host }),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks every request before its handler: a loopback listener answers only requests whose
/// `Host` names loopback (403), and a POST must say its body is JSON (415), so an HTML form
/// or a `text/plain` fetch from another site cannot act on the API.
async fn guard(State(exposure): State<Exposure>, req: Request<Body>, next: axum::middleware::Next) -> Response {
    if exposure == Exposure::Loopback
        && let Some(host) = req.headers().get(header::HOST)
    {
        let host = host.to_str().unwrap_or("");
        if !is_loopback_host(host) {
            return refuse(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "the Host header {host:?} does not name this machine; a server listening on loopback \
                     answers only localhost, 127.0.0.1 and [::1]"
                ),
            );
        }
    }
    if req.method() == axum::http::Method::POST {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            let got = if ct.is_empty() { "no Content-Type".to_owned() } else { format!("Content-Type {ct:?}") };
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                format!("a POST body must be JSON, sent with `Content-Type: application/json` (got {got})"),
            );
        }
    }
    next.run(req).await
}

/// The router over `svc`, guarded for a listener of `exposure`.
pub fn router(svc: Svc, exposure: Exposure) -> Router {
    Router::new()
        .route("/", get(console))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/models/{id}", get(model_one))
        .route("/v1/adapters", get(adapters))
        .route("/v1/receipts/{id}", get(receipt))
        .route("/v1/attribution/key", get(attribution_key))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/admin/plugins", get(plugin_admin::list))
        .route("/v1/admin/plugins/load", post(plugin_admin::load))
        .route("/v1/admin/plugins/unload", post(plugin_admin::unload))
        .route("/v1/admin/plugins/reload", post(plugin_admin::reload))
        .route("/v1/admin/adapters/rescan", post(rescan_adapters))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/version", get(|| async { json_response(&json!({"version": env!("CARGO_PKG_VERSION")})) }))
        .fallback(|req: Request<Body>| async move {
            error_response(&ServiceError::new(
                ErrorKind::NotFound,
                format!("no route for {} {}", req.method(), req.uri().path()),
            ))
        })
        .with_state(svc)
        .layer(axum::middleware::from_fn_with_state(exposure, guard))
}

/// The web console: one page, its CSS and JS inline, embedded in the binary. It holds no
/// secrets and asks for an API key like any other client, so serving it needs no key.
const CONSOLE: &str = include_str!("console.html");

async fn console() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // The page talks to this origin only; nothing may frame it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        CONSOLE,
    )
        .into_response()
}

/// 200 while the engine and the adapter loaders run; 503 naming what stopped otherwise (so a
/// load balancer stops sending to a node whose threads died).
async fn health(State(svc): State<Svc>) -> Response {
    match svc.health() {
        Ok(()) => StatusCode::OK.into_response(),
        Err(why) => refuse(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", why),
    }
}

async fn metrics(State(svc): State<Svc>, headers: HeaderMap) -> Response {
    if let Err(e) = tenant(&svc, &headers).and_then(|t| svc.may_read_metrics(&t)) {
        return error_response(&e);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], svc.prometheus_text()).into_response()
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
        "root": m.root, "parent": m.parent, "max_model_len": svc.context_limit(),
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

/// The adapters the caller may see and where the pager holds each (openlora extension).
async fn adapters(State(svc): State<Svc>, headers: HeaderMap) -> Response {
    match tenant(&svc, &headers) {
        Ok(t) => {
            let data: Vec<Value> = svc
                .list_adapters(&t)
                .into_iter()
                .map(|a| {
                    let mut v = json!({
                        "id": a.id, "object": "adapter", "generation": a.generation,
                        "host_resident": a.host_resident, "device_resident": a.device_resident,
                        "pinned": a.pinned, "loading": a.loading,
                    });
                    if let Some(p) = a.path {
                        v["path"] = json!(p);
                    }
                    v
                })
                .collect();
            json_response(&json!({"object": "list", "data": data}))
        }
        Err(e) => error_response(&e),
    }
}

/// The receipt, serialized from its struct (not through `Value`, whose map may reorder keys),
/// so the text is `{"body":CANONICAL,"hash":..,"sig":..}`: a client can hash the body's exact
/// bytes and check the signature without re-encoding anything.
async fn receipt(State(svc): State<Svc>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    match tenant(&svc, &headers).and_then(|t| svc.receipt(&t, &id)) {
        Ok(r) => match serde_json::to_string(&r) {
            Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
            Err(e) => error_response(&ServiceError::new(ErrorKind::Internal, format!("encoding the receipt: {e}"))),
        },
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
        f.only(&["lora_name", "lora_path"], "/v1/load_lora_adapter")?;
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
        let f = parse::Fields(&obj);
        f.only(&["lora_name"], "/v1/unload_lora_adapter")?;
        let name =
            f.str("lora_name")?.ok_or_else(|| ServiceError::bad("lora_name", "`lora_name` is required"))?.to_owned();
        svc.unload_adapter(&t, &name)?;
        Ok::<_, ServiceError>(format!("Success: LoRA adapter '{name}' removed successfully."))
    }
    .await;
    match r {
        Ok(msg) => msg.into_response(),
        Err(e) => error_response(&e),
    }
}

/// How this deployment hands chat tools to the model.
fn tool_rendering(svc: &Svc) -> tools::ToolRendering {
    if svc.template_tools() { tools::ToolRendering::Template } else { tools::ToolRendering::Hermes }
}

/// vLLM's `POST /tokenize`: `{"count", "max_model_len", "tokens", "token_strs"}`.
async fn tokenize(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        let req = parse::tokenize(&parse::Fields::parse(&body)?, tool_rendering(&svc))?;
        let ids = svc.tokenize_for(
            &t,
            req.model.as_deref(),
            &req.prompt,
            req.tools.as_ref(),
            req.add_special_tokens,
            req.add_generation_prompt,
        )?;
        let strs = if req.return_token_strs { json!(svc.token_strs(&ids)) } else { Value::Null };
        Ok::<_, ServiceError>(json!({
            "count": ids.len(), "max_model_len": svc.context_limit(), "tokens": ids, "token_strs": strs,
        }))
    }
    .await;
    match r {
        Ok(v) => json_response(&v),
        Err(e) => error_response(&e),
    }
}

/// vLLM's `POST /detokenize`: `{"prompt": TEXT}`.
async fn detokenize(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        let (model, ids) = parse::detokenize(&parse::Fields::parse(&body)?)?;
        svc.detokenize_for(&t, model.as_deref(), &ids)
    }
    .await;
    match r {
        Ok(text) => json_response(&json!({"prompt": text})),
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
        let (req, out) = parse::completions(&obj)?;
        // `echo`: choice `prompt * n + j` starts with its prompt's text.
        let echo: Vec<String> = if out.echo {
            req.prompts.iter().flat_map(|p| std::iter::repeat_n(svc.prompt_text(p), req.n)).collect()
        } else {
            Vec::new()
        };
        Ok::<_, ServiceError>((start(&svc, t, req).await?, out, echo))
    }
    .await;
    match r {
        Ok((journey, out, echo)) => respond(svc, Api::Completions, journey, out, echo).await,
        Err(e) => error_response(&e),
    }
}

async fn chat_completions(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        let obj = parse::Fields::parse(&body)?;
        let (req, out) = parse::chat(&obj, tool_rendering(&svc))?;
        Ok::<_, ServiceError>((start(&svc, t, req).await?, out))
    }
    .await;
    match r {
        Ok((journey, out)) => respond(svc, Api::Chat, journey, out, Vec::new()).await,
        Err(e) => error_response(&e),
    }
}

/// Starts the journey on a blocking thread (plugins run, adapters may load, merges build).
async fn start(
    svc: &Svc,
    t: Arc<Tenant>,
    req: crate::service::GenerateRequest,
) -> Result<Journey<ServingBackend>, ServiceError> {
    let svc = svc.clone();
    tokio::task::spawn_blocking(move || svc.generate(&t, req))
        .await
        .map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))?
}

fn usage_json(u: &crate::service::TokenUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
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

/// vLLM's `prompt_logprobs`: `null` for the first prompt token (nothing comes before it), then
/// per token an object keyed by token id: the prompt token first, then the alternatives not
/// already named, each with its `logprob`, `rank` (1 = most likely) and `decoded_token`.
fn prompt_logprobs_json(svc: &Svc, lps: &[PromptLogprob]) -> Value {
    let entry = |t: u32, logprob: f32, rank: usize| json!({"logprob": logprob, "rank": rank, "decoded_token": svc.token_text(t)});
    let mut out = vec![Value::Null];
    for lp in lps {
        let mut m = serde_json::Map::new();
        m.insert(lp.token.to_string(), entry(lp.token, lp.logprob, lp.rank));
        for (r, &(t, l)) in lp.top.iter().enumerate() {
            m.entry(t.to_string()).or_insert_with(|| entry(t, l, r + 1));
        }
        out.push(Value::Object(m));
    }
    Value::Array(out)
}

/// `echo` holds each choice's prompt text when the request asked for it (else it is empty).
async fn respond(
    svc: Svc,
    api: Api,
    journey: Journey<ServingBackend>,
    out: OutputOptions,
    echo: Vec<String>,
) -> Response {
    if out.stream {
        stream_response(svc, api, journey, out, echo)
    } else {
        whole_response(svc, api, journey, echo, out.tools).await
    }
}

/// OpenAI's `tool_calls` entries (`index` for stream deltas), each with a fresh id.
fn tool_calls_json(calls: &[tools::ToolCall], indexed: bool) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let id = crate::service::new_request_id("call").replacen('-', "_", 1);
            let mut v = json!({"id": id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}});
            if indexed {
                v["index"] = json!(k);
            }
            v
        })
        .collect()
}

async fn whole_response(
    svc: Svc,
    api: Api,
    journey: Journey<ServingBackend>,
    echo: Vec<String>,
    tools: Option<Arc<ToolRequest>>,
) -> Response {
    let id = journey.id().to_owned();
    let model = journey.model().to_owned();
    let c = match journey.collect().await {
        Ok(c) => c,
        Err(e) => return error_response(&e),
    };
    // The first choice of each prompt carries its prompt's scores; the prompt's other choices
    // (`prompt * n + j`) follow it, so each choice takes the nearest at or before it.
    let prompt_lps: Vec<Value> = {
        let mut last = Value::Null;
        c.prompt_logprobs
            .iter()
            .map(|p| {
                if let Some(p) = p {
                    last = prompt_logprobs_json(&svc, p);
                }
                last.clone()
            })
            .collect()
    };
    let asked_prompt_lps = c.prompt_logprobs.iter().any(Option::is_some);
    let items: Vec<Value> = (0..c.texts.len())
        .map(|i| {
            let finish = c.finish[i].as_str();
            let lp = logprobs_json(&svc, api, &c.tokens[i], &c.logprobs[i], 0);
            let calls = tools.as_ref().and_then(|t| tools::parse_calls(&c.texts[i], &t.tools, t.parallel));
            match (api, calls) {
                (Api::Chat, Some((content, calls))) => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": content, "refusal": null,
                                "tool_calls": tool_calls_json(&calls, false)},
                    "logprobs": lp, "finish_reason": if finish == "stop" { "tool_calls" } else { finish },
                }),
                (Api::Chat, None) => json!({
                    "index": i, "message": {"role": "assistant", "content": c.texts[i], "refusal": null},
                    "logprobs": lp, "finish_reason": finish,
                }),
                (Api::Completions, _) => {
                    let text = match echo.get(i) {
                        Some(prompt) => format!("{prompt}{}", c.texts[i]),
                        None => c.texts[i].clone(),
                    };
                    let mut v = json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish});
                    if asked_prompt_lps {
                        v["prompt_logprobs"] = prompt_lps[i].clone();
                    }
                    v
                }
            }
        })
        .collect();
    let object = match api {
        Api::Chat => "chat.completion",
        Api::Completions => "text_completion",
    };
    let mut body = json!({
        "id": id, "object": object, "created": now(), "model": model,
        "system_fingerprint": svc.system_fingerprint(),
        "choices": items, "usage": usage_json(&c.usage),
    });
    // vLLM's chat response carries its one prompt's scores at the top level.
    if api == Api::Chat && asked_prompt_lps {
        body["prompt_logprobs"] = prompt_lps.first().cloned().unwrap_or(Value::Null);
    }
    if let Some(r) = &c.receipt {
        body["receipt"] = json!(r);
    }
    let mut resp = json_response(&body);
    if let Some(r) = c.receipt.and_then(|r| HeaderValue::from_str(&r).ok()) {
        resp.headers_mut().insert("openlora-receipt", r);
    }
    resp
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// A streamed response's state. Dropping it (the client went away) drops the journey, which
/// cancels the sequences and writes the receipt for the tokens produced.
struct SseState {
    svc: Svc,
    api: Api,
    journey: Journey<ServingBackend>,
    out: OutputOptions,
    id: String,
    model: String,
    created: u64,
    fingerprint: String,
    /// Each choice's prompt text, sent first (completions' `echo`); empty when not asked.
    echo: Vec<String>,
    sent_role: bool,
    finished: bool,
    queue: std::collections::VecDeque<Bytes>,
    /// With tools: each choice's text, held from where a call may open.
    tool_streams: Vec<tools::ToolStream>,
}

impl SseState {
    fn chunk(&self, choice: Value) -> Bytes {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completions => "text_completion",
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": self.fingerprint, "choices": [choice],
        });
        // OpenAI: with `include_usage`, every chunk carries `usage: null` but the last.
        if self.out.include_usage {
            v["usage"] = Value::Null;
        }
        sse(&v)
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

    fn error_chunk(e: &ServiceError) -> Bytes {
        sse(&json!({"error": {"message": e.message, "type": "internal_error", "param": null, "code": 500}}))
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.queue.pop_front() {
                return Some(b);
            }
            if self.finished {
                return None;
            }
            if !self.sent_role {
                self.sent_role = true;
                for i in 0..self.journey.choices() {
                    let c = match (self.api, self.echo.get(i)) {
                        (Api::Chat, _) => self.chunk(
                            json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
                        ),
                        (Api::Completions, Some(prompt)) => self.chunk(
                            json!({"index": i, "text": prompt, "logprobs": null, "finish_reason": null}),
                        ),
                        (Api::Completions, None) => continue,
                    };
                    self.queue.push_back(c);
                }
                continue;
            }
            let Some(event) = self.journey.next().await else {
                self.finished = true;
                continue;
            };
            match event {
                ServiceEvent::Token { choice, id, text, logprob } => {
                    let text = match self.tool_streams.get_mut(choice) {
                        Some(t) => t.push(&text),
                        None => text,
                    };
                    let lps: Vec<TokenLogprob> = logprob.into_iter().collect();
                    if !text.is_empty() || !lps.is_empty() {
                        let b = self.piece(choice, &text, &[id], &lps, None);
                        self.queue.push_back(b);
                    }
                }
                // Refused with `stream` (parse.rs): a stream has no place for them.
                ServiceEvent::PromptLogprobs { .. } => {}
                ServiceEvent::ChoiceFinished { choice, text, reason, .. } => {
                    let (tools, held) = (self.out.tools.clone(), self.tool_streams.get_mut(choice));
                    match (tools, held) {
                        (Some(t), Some(held)) => {
                            let (rest, calls) = held.finish(&text, &t.tools, t.parallel);
                            if calls.is_empty() {
                                let b = self.piece(choice, &rest, &[], &[], Some(reason.as_str()));
                                self.queue.push_back(b);
                            } else {
                                // OpenAI's deltas: any text left, the calls (name and whole
                                // arguments each), then the finish.
                                if !rest.is_empty() {
                                    let b = self.piece(choice, &rest, &[], &[], None);
                                    self.queue.push_back(b);
                                }
                                let delta = json!({"tool_calls": tool_calls_json(&calls, true)});
                                let c = self.chunk(
                                    json!({"index": choice, "delta": delta, "logprobs": null, "finish_reason": null}),
                                );
                                self.queue.push_back(c);
                                let finish = if reason.as_str() == "stop" { "tool_calls" } else { reason.as_str() };
                                let b = self.piece(choice, "", &[], &[], Some(finish));
                                self.queue.push_back(b);
                            }
                        }
                        _ => {
                            let b = self.piece(choice, &text, &[], &[], Some(reason.as_str()));
                            self.queue.push_back(b);
                        }
                    }
                }
                ServiceEvent::Done { receipt, usage, .. } => {
                    if self.out.include_usage || receipt.is_some() {
                        let object = if self.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
                        let mut last = json!({
                            "id": self.id, "object": object, "created": self.created, "model": self.model,
                            "system_fingerprint": self.fingerprint, "choices": [],
                        });
                        if self.out.include_usage {
                            last["usage"] = usage_json(&usage);
                        }
                        if let Some(r) = receipt {
                            last["receipt"] = json!(r);
                        }
                        self.queue.push_back(sse(&last));
                    }
                    self.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    self.finished = true;
                }
                ServiceEvent::Failed(e) => {
                    self.queue.push_back(Self::error_chunk(&e));
                    self.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    self.finished = true;
                }
            }
        }
    }
}

fn stream_response(
    svc: Svc,
    api: Api,
    journey: Journey<ServingBackend>,
    out: OutputOptions,
    echo: Vec<String>,
) -> Response {
    let tool_streams = match (&out.tools, api) {
        (Some(_), Api::Chat) => (0..journey.choices()).map(|_| tools::ToolStream::default()).collect(),
        _ => Vec::new(),
    };
    let state = SseState {
        tool_streams,
        fingerprint: svc.system_fingerprint(),
        echo,
        svc,
        api,
        id: journey.id().to_owned(),
        model: journey.model().to_owned(),
        journey,
        out,
        created: now(),
        sent_role: false,
        finished: false,
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
    let app = router(svc.clone(), Exposure::of(listener.local_addr()?));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signalled = async move {
        shutdown.await;
        let _ = stop_tx.send(());
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signalled);
    tokio::select! {
        r = server => r,
        _ = async {
            let _ = stop_rx.await;
            svc.stop_accepting();
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
