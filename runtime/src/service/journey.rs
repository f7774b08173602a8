//! The entry point of a generation and the stream it returns.
//!
//! [`Service::generate`] walks the front half of the journey on the caller's thread (it may
//! block: plugins run, cold adapters load, merges build): permit, plugin chain, resolution,
//! tokenization, limits, and one engine sequence per choice. The [`Journey`] it returns yields
//! [`ServiceEvent`]s and owns the back half: metrics, and the receipt. The receipt is written
//! exactly once, from the tokens the engine produced:
//! - when every choice has finished, before `Done` is yielded (which carries its id);
//! - when a choice fails, before `Failed` is yielded (finish reason `error`);
//! - when the journey is dropped early (the client went away, a consumer stopped reading):
//!   finish reason `cancelled`, counting every token produced so far, including those still
//!   queued and never read. Dropping also cancels the engine sequences and frees their KV
//!   blocks at the engine's next step.

use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use openlora_kernels::Backend;

use super::Service;
use super::api::{ErrorKind, FinishReason, GenerateRequest, ServiceError, ServiceEvent, TokenUsage, new_request_id};
use super::plugin_chain::blame_router;
use super::receipts::RecordContext;
use super::tenancy::{ConcurrencyPermit, Tenant};
use crate::attribution::receipt::tokens_sha256;
use crate::engine::grammar::Grammar;
use crate::engine::{Event, Request, RequestStream};

type ReceiptWait = tokio::sync::oneshot::Receiver<Result<String, String>>;

/// One choice's progress.
#[derive(Default)]
struct ChoiceState {
    text: String,
    /// Token events received (the engine sends one per generated token).
    tokens: usize,
    finished: Option<(FinishReason, usize, usize)>,
}

impl ChoiceState {
    /// Accounts a token or a finish (what the receipt will count), whether or not anyone reads it.
    fn absorb(&mut self, e: &Event) {
        match e {
            Event::Token { text, .. } => {
                self.tokens += 1;
                self.text.push_str(text);
            }
            Event::Finished { text, reason, usage } => {
                self.text.push_str(text);
                self.finished = Some((*reason, usage.completion_tokens, usage.cached_tokens));
            }
            Event::Failed(_) | Event::PromptLogprobs(_) => {}
        }
    }
}

enum Phase {
    Running,
    /// Every choice finished; waiting for the receipt to be durable.
    Recording(Option<ReceiptWait>),
    Ended,
}

/// A request in flight: its engine sequences and what the receipt will say. Read it with
/// [`Journey::next`]; drop it to cancel.
pub struct Journey<B: Backend + Clone + 'static> {
    svc: Arc<Service<B>>,
    id: String,
    model: String,
    prompt_tokens: usize,
    started: Instant,
    streams: Vec<RequestStream>,
    choices: Vec<ChoiceState>,
    record: Option<RecordContext>,
    phase: Phase,
    first_token: bool,
    _permit: Option<ConcurrencyPermit>,
}

impl<B: Backend + Clone + 'static> Service<B> {
    /// Starts `req` for `tenant` and returns its journey. Blocks while plugins run, cold
    /// adapters load or a merge builds (call it from a blocking thread). Refusals come back as
    /// errors naming the problem; nothing is queued and no receipt is written for them.
    pub fn generate(self: &Arc<Self>, tenant: &Arc<Tenant>, req: GenerateRequest) -> Result<Journey<B>, ServiceError> {
        let r = self.generate_inner(tenant, req);
        if let Err(e) = &r {
            self.metrics.refused.add(e.kind.label());
        }
        r
    }

    /// Compiles the request's structured-output constraint (if any) and computes its first
    /// mask, here on the caller's thread: a schema or grammar that does not compile, or that
    /// allows nothing, is refused with a 400 naming the field, and never reaches the engine.
    fn compile_constraint(&self, req: &GenerateRequest) -> Result<Option<Grammar>, ServiceError> {
        let Some(c) = &req.constraint else { return Ok(None) };
        let f = c.field.as_str();
        // A finished grammar allows only end-of-sequence: these would keep it from ending.
        if req.ignore_eos {
            return Err(ServiceError::bad("ignore_eos", format!("`ignore_eos` cannot be combined with `{f}`")));
        }
        if req.min_tokens > 0 {
            return Err(ServiceError::bad("min_tokens", format!("`min_tokens` cannot be combined with `{f}`")));
        }
        let env = self.grammar_env().map_err(|e| ServiceError::bad(f, format!("`{f}`: {e}")))?;
        let g = env.compile(&c.spec).map_err(|e| ServiceError::bad(f, format!("`{f}`: {e}")))?;
        Ok(Some(g))
    }

    fn generate_inner(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        req: GenerateRequest,
    ) -> Result<Journey<B>, ServiceError> {
        let started = Instant::now();
        let permit = self.permit(tenant)?;
        let l = &self.limits;
        if req.prompts.is_empty() {
            return Err(ServiceError::bad("prompt", "the request has no prompt"));
        }
        if req.n == 0 || req.n > l.max_n {
            return Err(ServiceError::bad("n", format!("n must be between 1 and {}", l.max_n)));
        }
        let choices = req.prompts.len().saturating_mul(req.n);
        if choices > l.max_choices {
            return Err(ServiceError::bad(
                if req.prompts.len() > 1 { "prompt" } else { "n" },
                format!(
                    "{} prompts × n = {} asks for {choices} sequences; the limit is {} (server.max_choices_per_request)",
                    req.prompts.len(),
                    req.n,
                    l.max_choices
                ),
            ));
        }
        let max_tokens = req.max_tokens.unwrap_or(l.default_max_tokens);
        if max_tokens == 0 || max_tokens > l.max_tokens_limit {
            return Err(ServiceError::bad(
                "max_tokens",
                format!("max_tokens must be between 1 and {} (got {max_tokens})", l.max_tokens_limit),
            ));
        }
        req.sampling.validate().map_err(|e| ServiceError::bad(e.name, e.to_string()))?;
        req.check_token_fields(self.model.model.config.vocab_size, max_tokens)?;
        if let Some(k) = req.logprobs
            && k > 20
        {
            return Err(ServiceError::bad("logprobs", "at most 20 alternatives per token"));
        }
        if let Some(k) = req.prompt_logprobs
            && k > 20
        {
            return Err(ServiceError::bad("prompt_logprobs", "`prompt_logprobs` must be between 0 and 20"));
        }
        if let Some(s) = req.stop.iter().find(|s| s.len() > l.max_stop_bytes) {
            return Err(ServiceError::bad(
                "stop",
                format!("a stop string has {} bytes; the limit is {}", s.len(), l.max_stop_bytes),
            ));
        }
        // Before any plugin runs: the list the client sent (the router's is checked again).
        self.check_adapter_list(&req.adapters)?;
        // Prefix-cache isolation: a tenant's blocks are salted with its name unless the
        // deployment shares them; a request's own salt narrows it further.
        let cache_salt = match (&req.cache_salt, self.shared_prefix_cache) {
            (Some(s), _) if s.is_empty() || s.len() > 256 => {
                return Err(ServiceError::bad("cache_salt", "`cache_salt` must be 1 to 256 bytes"));
            }
            (salt, true) => salt.clone().unwrap_or_default(),
            // Length-prefixed, so no tenant name and salt pair can spell another tenant's.
            (salt, false) => {
                format!("tenant:{}:{}\0{}", tenant.name.len(), tenant.name, salt.as_deref().unwrap_or_default())
            }
        };
        let grammar = self.compile_constraint(&req)?;
        let chat = req.prompts[0].is_chat();
        let id = new_request_id(if chat { "chatcmpl" } else { "cmpl" });
        // Each prompt is one leg: its own plugin chain, resolution and tokens.
        let mut legs = Vec::with_capacity(req.prompts.len());
        for prompt in &req.prompts {
            let mut leg = req.clone();
            leg.prompts = vec![prompt.clone()];
            let chain = self.run_plugins(tenant, &mut leg)?;
            let resolved = self.resolve(tenant, &leg).map_err(|e| blame_router(chain.routed_by.as_deref(), e))?;
            let tokens = self.tokenize(&leg.prompts[0], leg.tools.as_ref())?;
            if tokens.is_empty() {
                return Err(ServiceError::bad("prompt", "the prompt is empty"));
            }
            if tokens.len() > l.max_prompt_tokens {
                return Err(ServiceError::bad(
                    "prompt",
                    format!("the prompt has {} tokens; the limit is {}", tokens.len(), l.max_prompt_tokens),
                ));
            }
            let ctx = RecordContext {
                request_id: id.clone(),
                tenant: tenant.name.clone(),
                adapters: resolved.uses.clone(),
                merge: resolved.merge.clone(),
                prompt_sha256: tokens_sha256(&tokens),
                prompt_tokens: tokens.len(),
                plugins: chain.used,
                user: req.user.clone(),
                prompt_text: self.evidence_prompt(&resolved.uses, &tokens),
            };
            legs.push((tokens, resolved, ctx));
        }
        let prompt_tokens = legs.iter().map(|(t, _, _)| t.len()).sum();
        // A fail-closed attributor decides before any token is generated: it splits the most
        // this request can cost, and a failure refuses the request now, not after the work.
        if self.closed_attributor().is_some()
            && let Some(ctx) = RecordContext::combine(legs.iter().map(|(_, _, c)| c.clone()).collect())
        {
            let worst_case = max_tokens.saturating_mul(req.n).saturating_mul(legs.len());
            self.attribution_dry_run(tenant, &ctx, worst_case)?;
        }
        let mut streams = Vec::with_capacity(legs.len() * req.n);
        let mut contexts = Vec::with_capacity(legs.len());
        for (tokens, resolved, ctx) in legs {
            for i in 0..req.n {
                let mut sampling = req.sampling.clone();
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
                let er = Request {
                    prompt: tokens.clone(),
                    adapters: resolved.adapters.clone(),
                    tenant: tenant.name.clone(),
                    sampling,
                    max_tokens,
                    stop: req.stop.clone(),
                    stop_at_eos: !req.ignore_eos,
                    stop_token_ids: if chat && !req.ignore_eos { self.chat_stop_ids.clone() } else { Vec::new() }
                        .into_iter()
                        .chain(req.stop_token_ids.iter().copied())
                        .collect(),
                    logit_bias: req.logit_bias.clone(),
                    min_tokens: req.min_tokens,
                    logprobs: req.logprobs,
                    // The prompt is the same for every choice: the first one scores it.
                    prompt_logprobs: if i == 0 { req.prompt_logprobs } else { None },
                    cache_salt: cache_salt.clone(),
                    // Each choice its own parser (clones share the compiled grammar's caches).
                    grammar: grammar.as_ref().map(|g| Box::new(g.clone())),
                };
                // On error the streams already queued are dropped, which cancels them.
                streams.push(self.engine.submit(er)?);
            }
            contexts.push(ctx);
        }
        let choices = (0..streams.len()).map(|_| ChoiceState::default()).collect();
        Ok(Journey {
            svc: self.clone(),
            id,
            model: req.model,
            prompt_tokens,
            started,
            streams,
            choices,
            record: RecordContext::combine(contexts),
            phase: Phase::Running,
            first_token: true,
            _permit: permit,
        })
    }
}

impl<B: Backend + Clone + 'static> Journey<B> {
    /// The response id (`chatcmpl-...` or `cmpl-...`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The model the request named (echoed in responses).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Choices in all.
    pub fn choices(&self) -> usize {
        self.streams.len()
    }

    /// Prompt tokens over all prompts.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    fn usage(&self) -> TokenUsage {
        let mut u = TokenUsage { prompt_tokens: self.prompt_tokens, ..TokenUsage::default() };
        for c in &self.choices {
            match c.finished {
                Some((_, completion, cached)) => {
                    u.completion_tokens += completion;
                    u.cached_tokens = u.cached_tokens.max(cached);
                }
                None => u.completion_tokens += c.tokens,
            }
        }
        u
    }

    fn first_reason(&self) -> FinishReason {
        self.choices.first().and_then(|c| c.finished).map_or(FinishReason::Stop, |f| f.0)
    }

    /// Writes the receipt (once). `None` when attribution is off or it was already written.
    fn write_receipt(&mut self, reason: &str) -> Option<ReceiptWait> {
        let ctx = self.record.take()?;
        let usage = self.usage();
        let outputs: Vec<&str> = self.choices.iter().map(|c| c.text.as_str()).collect();
        self.svc.record(&ctx, usage.completion_tokens, reason, &outputs)
    }

    /// The next event; `None` after `Done` or `Failed`.
    pub async fn next(&mut self) -> Option<ServiceEvent> {
        loop {
            match &mut self.phase {
                Phase::Ended => return None,
                Phase::Recording(wait) => {
                    let wait = wait.take();
                    self.phase = Phase::Ended;
                    self.svc.metrics.e2e.observe(self.started.elapsed().as_secs_f64());
                    let receipt = match wait {
                        None => None,
                        Some(rx) => match rx.await {
                            Ok(Ok(id)) => Some(id),
                            Ok(Err(e)) => {
                                return Some(ServiceEvent::Failed(ServiceError::internal(format!(
                                    "the receipt could not be written: {e}"
                                ))));
                            }
                            Err(_) => {
                                return Some(ServiceEvent::Failed(ServiceError::internal("the ledger writer stopped")));
                            }
                        },
                    };
                    return Some(ServiceEvent::Done {
                        receipt,
                        usage: self.usage(),
                        finish_reason: self.first_reason(),
                    });
                }
                Phase::Running => {}
            }
            if self.choices.iter().all(|c| c.finished.is_some()) {
                let reason = self.first_reason().as_str();
                self.phase = Phase::Recording(self.write_receipt(reason));
                continue;
            }
            let (i, event) = std::future::poll_fn(|cx| {
                for (i, s) in self.streams.iter_mut().enumerate() {
                    if self.choices[i].finished.is_some() {
                        continue;
                    }
                    if let Poll::Ready(e) = s.poll_next(cx) {
                        return Poll::Ready((i, e));
                    }
                }
                Poll::Pending
            })
            .await;
            if let Some(e) = &event {
                self.choices[i].absorb(e);
            }
            match event {
                Some(Event::Token { id, text, logprob }) => {
                    if self.first_token {
                        self.first_token = false;
                        self.svc.metrics.ttft.observe(self.started.elapsed().as_secs_f64());
                    }
                    return Some(ServiceEvent::Token { choice: i, id, text, logprob });
                }
                Some(Event::Finished { text, reason, usage }) => {
                    self.svc.metrics.finished.add(reason.as_str());
                    let usage = TokenUsage {
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                        cached_tokens: usage.cached_tokens,
                    };
                    return Some(ServiceEvent::ChoiceFinished { choice: i, text, reason, usage });
                }
                Some(Event::PromptLogprobs(logprobs)) => {
                    return Some(ServiceEvent::PromptLogprobs { choice: i, logprobs });
                }
                Some(Event::Failed(e)) => return Some(self.fail(ServiceError::from(e)).await),
                None => {
                    let e = ServiceError::new(ErrorKind::Overloaded, "the engine has shut down");
                    return Some(self.fail(e).await);
                }
            }
        }
    }

    /// Ends the journey with `e`: cancels the other choices, writes the receipt (finish reason
    /// `error`, the tokens produced so far) and waits until it is durable.
    async fn fail(&mut self, e: ServiceError) -> ServiceEvent {
        self.phase = Phase::Ended;
        self.svc.metrics.refused.add(e.kind.label());
        self.drain();
        // Cancel the other choices now, not after the ledger's fsync.
        self.streams.clear();
        self.svc.metrics.e2e.observe(self.started.elapsed().as_secs_f64());
        if let Some(rx) = self.write_receipt("error") {
            let _ = rx.await;
        }
        ServiceEvent::Failed(e)
    }

    /// Counts events the engine already produced but nobody read.
    fn drain(&mut self) {
        for (s, c) in self.streams.iter_mut().zip(&mut self.choices) {
            if c.finished.is_some() {
                continue;
            }
            while let Some(e) = s.try_next() {
                c.absorb(&e);
                if matches!(e, Event::Failed(_)) {
                    break;
                }
            }
        }
    }

    /// Runs the journey to its end and collects every choice (for callers that do not stream).
    pub async fn collect(mut self) -> Result<Collected, ServiceError> {
        let mut out = Collected {
            texts: vec![String::new(); self.choices()],
            tokens: vec![Vec::new(); self.choices()],
            logprobs: vec![Vec::new(); self.choices()],
            prompt_logprobs: vec![None; self.choices()],
            finish: vec![FinishReason::Stop; self.choices()],
            usage: TokenUsage::default(),
            receipt: None,
        };
        while let Some(e) = self.next().await {
            match e {
                ServiceEvent::Token { choice, id, text, logprob } => {
                    out.texts[choice].push_str(&text);
                    out.tokens[choice].push(id);
                    out.logprobs[choice].extend(logprob);
                }
                ServiceEvent::PromptLogprobs { choice, logprobs } => out.prompt_logprobs[choice] = Some(logprobs),
                ServiceEvent::ChoiceFinished { choice, text, reason, .. } => {
                    out.texts[choice].push_str(&text);
                    out.finish[choice] = reason;
                }
                ServiceEvent::Done { receipt, usage, .. } => {
                    out.receipt = receipt;
                    out.usage = usage;
                }
                ServiceEvent::Failed(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// A whole request's output, choice by choice.
#[derive(Clone, Debug)]
pub struct Collected {
    /// Each choice's text.
    pub texts: Vec<String>,
    /// Each choice's token ids.
    pub tokens: Vec<Vec<u32>>,
    /// Each choice's logprobs (when asked for).
    pub logprobs: Vec<Vec<super::api::TokenLogprob>>,
    /// The prompt's scores, on the first choice of each prompt (when asked for).
    pub prompt_logprobs: Vec<Option<Vec<super::api::PromptLogprob>>>,
    /// Each choice's finish reason.
    pub finish: Vec<FinishReason>,
    /// The request's token counts.
    pub usage: TokenUsage,
    /// The receipt's id (None when attribution is off).
    pub receipt: Option<String>,
}

impl<B: Backend + Clone + 'static> Drop for Journey<B> {
    fn drop(&mut self) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        self.drain();
        let finished = self.choices.iter().all(|c| c.finished.is_some());
        let reason = if finished { self.first_reason().as_str() } else { FinishReason::Cancelled.as_str() };
        if !finished {
            self.svc.metrics.finished.add(FinishReason::Cancelled.as_str());
        }
        self.svc.metrics.e2e.observe(self.started.elapsed().as_secs_f64());
        // The ledger's writer makes it durable on its own; nobody is left to tell.
        let _ = self.write_receipt(reason);
    }
}
