//! The engine's core: iteration-level (continuous) batching over the paged KV cache.
//!
//! Every [`EngineCore::step`] builds one batch and runs one forward pass:
//!
//! 1. **Decodes first.** Every running sequence whose prompt is computed contributes its one
//!    new token, so a long prompt never stalls the sequences already generating.
//! 2. **Prefill chunks** of running sequences fill what is left of the token budget
//!    (`max_batch_tokens`), oldest request first; a long prompt is spread over several steps.
//! 3. **Admission**: waiting sequences join while budget, `max_running` and free KV blocks
//!    allow. On admission the longest cached prefix (same adapter key, same tokens, whole
//!    blocks) is taken over instead of recomputed.
//!
//! Sequences with different adapters share every step: the forward pass takes each
//! sequence's adapter list and applies LoRA terms per row.
//!
//! **Preemption.** When a running sequence needs a block and none is free, the newest running
//! request is preempted: its blocks are released (registered ones stay in the prefix cache)
//! and it goes back to the queue with the tokens it has generated; when readmitted it
//! recomputes them (usually from the prefix cache) and continues, so its output is the same as
//! if it had never stopped. Requests are never failed for lack of KV space.
//!
//! **Fairness.** Admission picks, among waiting sequences, the tenant with the fewest running
//! sequences, then within that tenant the adapter key with the fewest running sequences, then
//! the oldest request. A tenant (or an adapter) with a thousand queued requests therefore gets
//! one slot in turn with everyone else instead of all of them first. Preempted requests keep
//! their arrival order, so they come back before newer requests of their class.
//!
//! **Isolation.** A forward pass that fails or panics is retried one sequence at a time, so only
//! the sequences whose own computation fails are failed; sampling and detokenizing are guarded
//! per sequence the same way.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use openlora_kernels::{AttnSeq, Backend, PickedRow, RowPick};
use tokio::sync::mpsc::UnboundedSender;

use super::grammar::Grammar;
use super::kv_cache::{BlockAllocator, SequenceBlocks};
use super::request::{
    EngineError, Event, FinishReason, PROMPT_LOGPROBS_CHUNK, PromptLogprob, Request, TokenLogprob, Usage,
};
use super::sampler::Sampler;
use super::stop::StopChecker;
use crate::model::LoadedModel;
use crate::model::error::ModelError;
use crate::model::llama::ForwardBatch;
use crate::model::tokenizer::{IncrementalDecoder, TextTokenizer};

/// Engine sizing and limits.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Blocks in the KV pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Most tokens (decode rows plus prefill chunk rows) in one forward pass.
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting for admission; more are refused as overloaded.
    pub max_waiting: usize,
    /// Reuse KV blocks of identical prefixes (same adapter key).
    pub prefix_cache: bool,
    /// Bytes of one KV element (4: f32 pools; 2: a GPU's bf16 pools); sizes blocks.
    pub kv_value_bytes: usize,
    /// Ask for reduced logits rows (argmax, top-k) even on a backend that keeps logits on the
    /// host, so tests on the CPU run the path a GPU takes. Not a deployment setting.
    #[doc(hidden)]
    pub force_reduced_rows: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            num_blocks: 1024,
            block_size: 16,
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 1024,
            prefix_cache: true,
            kv_value_bytes: 4,
            force_reduced_rows: false,
        }
    }
}

impl EngineConfig {
    /// Bytes one KV block takes for `model` (keys and values, every layer) with elements of
    /// `value_bytes` each.
    pub fn block_bytes(model: &crate::model::config::LlamaConfig, block_size: usize, value_bytes: usize) -> usize {
        2 * model.num_layers * model.num_kv_heads * model.head_dim * block_size * value_bytes
    }

    /// Sets `num_blocks` to what fits in `bytes` (with this config's `kv_value_bytes`).
    pub fn with_kv_bytes(mut self, model: &crate::model::config::LlamaConfig, bytes: usize) -> Self {
        self.num_blocks = bytes / Self::block_bytes(model, self.block_size, self.kv_value_bytes).max(1);
        self
    }

    /// Checks the settings are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.block_size == 0 || self.num_blocks == 0 {
            return Err(format!(
                "the KV cache needs at least one block of at least one token (blocks {}, block size {})",
                self.num_blocks, self.block_size
            ));
        }
        if self.max_running == 0 || self.max_batch_tokens < self.max_running {
            return Err(format!(
                "max_batch_tokens ({}) must be at least max_running ({}), which must be at least 1",
                self.max_batch_tokens, self.max_running
            ));
        }
        Ok(())
    }
}

/// A snapshot of what the engine is doing (for metrics and tests).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    /// Sequences admitted and not finished.
    pub running: usize,
    /// Sequences queued (new or preempted).
    pub waiting: usize,
    /// Blocks in the KV pool.
    pub kv_blocks_total: usize,
    /// Blocks held by sequences.
    pub kv_blocks_used: usize,
    /// Cached blocks no sequence holds (free, but reusable by a prefix match).
    pub kv_blocks_cached_idle: usize,
    /// Adapter names of running sequences (deduplicated, sorted).
    pub running_adapters: Vec<String>,
    /// Adapter names of waiting sequences (deduplicated, sorted).
    pub waiting_adapters: Vec<String>,
    /// Prompt tokens of admitted requests (counted once per request).
    pub prompt_tokens_total: u64,
    /// Tokens generated.
    pub generation_tokens_total: u64,
    /// Tokens run through the model (prefill and recompute; decode steps excluded).
    pub prefill_tokens_computed: u64,
    /// Prompt tokens served from the prefix cache.
    pub prefix_cache_hit_tokens: u64,
    /// Times a sequence was preempted.
    pub preemptions: u64,
    /// Requests that ended normally (stop or length).
    pub requests_finished: u64,
    /// Requests cancelled.
    pub requests_cancelled: u64,
    /// Requests failed.
    pub requests_failed: u64,
    /// Forward passes run.
    pub steps: u64,
    /// Steps that panicked outside the per-sequence guards (the engine recovered).
    pub step_panics: u64,
    /// Grammar masks computed for constrained rows (structured output).
    pub grammar_masks: u64,
    /// Nanoseconds spent computing them (on the mask thread, beside the forward pass, or
    /// inline when a mask was still missing at sampling time).
    pub grammar_mask_ns: u64,
    /// Tokens sampled from a reduced logits row (argmax or top-k, computed where the logits
    /// are: on a GPU only a few values per row are read back).
    pub reduced_rows: u64,
}

struct Sequence<B: Backend> {
    id: u64,
    arrival: u64,
    req: Request<B>,
    adapter_key: [u8; 32],
    /// The adapter key salted with the request's cache salt: what prefix blocks hash under.
    prefix_key: [u8; 32],
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    blocks: SequenceBlocks,
    sampler: Sampler,
    decoder: IncrementalDecoder<Arc<TextTokenizer>>,
    stops: StopChecker,
    events: UnboundedSender<Event>,
    /// Prefix-cache tokens found at first admission.
    cached_tokens: usize,
    /// Whether it still counts toward the queue limit (never admitted yet).
    queued_new: bool,
    /// Whether it came with a grammar (which must never go missing).
    constrained: bool,
    /// The prompt logprobs computed so far (positions 0.., each scoring the next prompt token),
    /// while the request wants them and they have not been sent.
    prompt_lp: Option<Vec<PromptLogprob>>,
}

impl<B: Backend> Sequence<B> {
    /// Tokens not yet in the KV cache.
    fn remaining(&self) -> usize {
        self.tokens.len() - self.blocks.len()
    }

    /// The positions of plan `p` whose logits score a prompt token not yet scored (each needs
    /// a logits row of its own, before the row that samples).
    fn prompt_rows(&self, p: &Planned) -> std::ops::Range<usize> {
        let Some(done) = &self.prompt_lp else { return 0..0 };
        // Never a gap: these sequences take no prefix-cache hit, and recompute from position 0
        // after a preemption.
        debug_assert!(done.len() >= p.start);
        let lo = p.start.max(done.len());
        let hi = (p.start + p.n).min(self.prompt_len - 1);
        lo..hi.max(lo)
    }

    /// Scores the prompt tokens of plan `p` from its prompt rows (taken from `rows`), and sends
    /// the prompt logprobs once every prompt token has its score.
    fn record_prompt_rows(&mut self, p: &Planned, rows: &mut impl Iterator<Item = PickedRow>) {
        let k = self.req.prompt_logprobs.unwrap_or(0);
        for j in self.prompt_rows(p) {
            let Some(row) = rows.next() else { break };
            // Prompt rows are always asked for whole.
            let PickedRow::Full(row) = row else { continue };
            let row = row.as_slice();
            let token = self.tokens[j + 1];
            let lp = log_softmax_top(row, token, k);
            let chosen = row.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
            let rank = 1 + row.iter().filter(|&&l| l > chosen).count();
            if let Some(v) = &mut self.prompt_lp {
                v.push(PromptLogprob { token, logprob: lp.logprob, rank, top: lp.top });
            }
        }
        if self.prompt_lp.as_ref().is_some_and(|v| v.len() + 1 >= self.prompt_len) {
            let v = self.prompt_lp.take().unwrap_or_default();
            let _ = self.events.send(Event::PromptLogprobs(v));
        }
    }
}

/// One sequence's part of the step being built.
struct Planned {
    id: u64,
    start: usize,
    n: usize,
    slots: Vec<u32>,
}

/// The batching engine, driven one step at a time (the engine thread calls it in a loop).
pub struct EngineCore<B: Backend> {
    model: Arc<LoadedModel<B>>,
    tokenizer: Arc<TextTokenizer>,
    cfg: EngineConfig,
    kv: Vec<B::KvCache>,
    alloc: BlockAllocator,
    waiting: Vec<Sequence<B>>,
    running: Vec<Sequence<B>>,
    /// Accepted requests never admitted (the queue limit counts these); shared with handles.
    queued: Arc<AtomicUsize>,
    next_arrival: u64,
    stats: EngineStats,
}

/// The effective context of `model` under `cfg`: the model's context, or the KV pool's
/// capacity if smaller.
pub fn context_limit(model: &crate::model::config::LlamaConfig, cfg: &EngineConfig) -> usize {
    model.max_position_embeddings.min(cfg.num_blocks * cfg.block_size)
}

/// Checks a request can run and returns its effective `max_tokens` (capped by the context).
pub fn validate_request<B: Backend>(
    model: &crate::model::config::LlamaConfig,
    cfg: &EngineConfig,
    req: &Request<B>,
) -> Result<usize, EngineError> {
    let ctx = context_limit(model, cfg);
    if req.prompt.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    if req.prompt.len() >= ctx {
        return Err(EngineError::Invalid(format!(
            "the prompt has {} tokens; this deployment's context length is {ctx} tokens",
            req.prompt.len()
        )));
    }
    if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= model.vocab_size) {
        return Err(EngineError::Invalid(format!(
            "token id {t} is outside the vocabulary (size {})",
            model.vocab_size
        )));
    }
    if req.max_tokens == 0 {
        return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
    }
    if req.min_tokens > req.max_tokens {
        return Err(EngineError::Invalid(format!(
            "min_tokens ({}) must not exceed max_tokens ({})",
            req.min_tokens, req.max_tokens
        )));
    }
    for (what, ids) in [
        ("logit_bias", req.logit_bias.iter().map(|b| b.0).collect::<Vec<_>>()),
        ("stop_token_ids", req.stop_token_ids.clone()),
    ] {
        if let Some(t) = ids.into_iter().find(|&t| t as usize >= model.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "{what}: token id {t} is outside the vocabulary (size {})",
                model.vocab_size
            )));
        }
    }
    if let Some(&(t, b)) = req.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
        return Err(EngineError::Invalid(format!("logit_bias: the bias of token {t} is {b}, not a finite number")));
    }
    req.sampling.validate().map_err(|e| EngineError::Invalid(e.to_string()))?;
    if req.grammar.is_some() {
        // Both would keep a finished grammar from ending: its mask then allows only EOS.
        if !req.stop_at_eos {
            return Err(EngineError::Invalid("a grammar-constrained request must stop at end-of-sequence".into()));
        }
        if req.min_tokens > 0 {
            return Err(EngineError::Invalid("min_tokens cannot be combined with a grammar constraint".into()));
        }
    }
    Ok(req.max_tokens.min(ctx - req.prompt.len()))
}

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}

fn log_softmax_top(logits: &[f32], chosen: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() < k || l > top[top.len() - 1].1 {
                let at = top.partition_point(|&(_, v)| v >= l);
                top.insert(at, (i as u32, l));
                top.truncate(k);
            }
        }
    }
    TokenLogprob {
        logprob: logits.get(chosen as usize).map_or(f32::NEG_INFINITY, |&l| l - lse),
        top: top.into_iter().map(|(i, l)| (i, l - lse)).collect(),
    }
}

impl<B: Backend> EngineCore<B> {
    /// An engine over `model` with a KV pool sized by `cfg`.
    pub fn new(model: Arc<LoadedModel<B>>, cfg: EngineConfig, queued: Arc<AtomicUsize>) -> Result<Self, ModelError> {
        cfg.validate().map_err(ModelError::InvalidRequest)?;
        let kv = model.model.alloc_kv(model.model.kv_layout(cfg.num_blocks, cfg.block_size))?;
        let alloc = BlockAllocator::new(cfg.num_blocks, cfg.block_size);
        let tokenizer = Arc::new(model.tokenizer.clone());
        let stats = EngineStats { kv_blocks_total: cfg.num_blocks, ..EngineStats::default() };
        Ok(Self {
            model,
            tokenizer,
            cfg,
            kv,
            alloc,
            waiting: Vec::new(),
            running: Vec::new(),
            queued,
            next_arrival: 0,
            stats,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Queues a request. Its events go to `events`.
    pub fn add(&mut self, id: u64, req: Request<B>, events: UnboundedSender<Event>) {
        let max_tokens = match validate_request(&self.model.model.config, &self.cfg, &req) {
            Ok(m) => m,
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                let _ = events.send(Event::Failed(e));
                return;
            }
        };
        let decoder =
            match IncrementalDecoder::new(self.tokenizer.clone()).skip_special_tokens(true).with_context(&req.prompt) {
                Ok(d) => d,
                Err(e) => {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    let _ = events.send(Event::Failed(EngineError::Invalid(e.to_string())));
                    return;
                }
            };
        let seq = Sequence {
            id,
            arrival: self.next_arrival,
            adapter_key: req.adapter_key(),
            prefix_key: req.prefix_key(),
            tokens: req.prompt.clone(),
            prompt_len: req.prompt.len(),
            max_tokens,
            blocks: SequenceBlocks::default(),
            sampler: Sampler::new(req.sampling.clone(), &req.prompt),
            decoder,
            stops: StopChecker::new(&req.stop),
            events,
            cached_tokens: 0,
            queued_new: true,
            constrained: req.grammar.is_some(),
            prompt_lp: req.prompt_logprobs.map(|_| Vec::new()),
            req,
        };
        self.next_arrival += 1;
        self.waiting.push(seq);
    }

    /// Cancels a request: its blocks are freed now and its stream ends with
    /// [`FinishReason::Cancelled`]. Unknown ids (already finished) are ignored.
    pub fn cancel(&mut self, id: u64) {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let s = self.waiting.remove(i);
            self.end(s, End::Cancelled);
        } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = self.running.remove(i);
            self.end(s, End::Cancelled);
        }
    }

    /// Recovers from a panic that interrupted a step (or a cancel) with `msg`: every running
    /// sequence fails (the step was theirs), and when none was running the waiting ones fail
    /// too (the panic came from admitting them), so each panic retires at least one request and
    /// a deterministic fault cannot loop. The block allocator may be half-updated, so it starts
    /// afresh: the prefix cache is dropped and waiting sequences recompute from their tokens.
    pub fn recover(&mut self, msg: &str) {
        self.stats.step_panics += 1;
        let failed = std::mem::take(&mut self.running);
        let failed = if failed.is_empty() { std::mem::take(&mut self.waiting) } else { failed };
        for s in failed {
            if s.queued_new {
                self.queued.fetch_sub(1, Ordering::SeqCst);
            }
            self.stats.requests_failed += 1;
            let _ = s.events.send(Event::Failed(EngineError::Failed(format!("internal error in the engine: {msg}"))));
        }
        self.alloc = BlockAllocator::new(self.cfg.num_blocks, self.cfg.block_size);
        for s in &mut self.waiting {
            s.blocks = SequenceBlocks::default();
        }
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// The current statistics.
    pub fn stats(&self) -> EngineStats {
        let names = |seqs: &[Sequence<B>]| {
            let mut v: Vec<String> =
                seqs.iter().flat_map(|s| s.req.adapters.iter().map(|a| a.adapter.name.clone())).collect();
            v.sort();
            v.dedup();
            v
        };
        EngineStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_total: self.alloc.num_blocks(),
            kv_blocks_used: self.alloc.used_blocks(),
            kv_blocks_cached_idle: self.alloc.cached_idle_blocks(),
            running_adapters: names(&self.running),
            waiting_adapters: names(&self.waiting),
            ..self.stats.clone()
        }
    }

    /// Cancels every request whose stream was dropped.
    fn reap_abandoned(&mut self) {
        let gone: Vec<u64> =
            self.waiting.iter().chain(self.running.iter()).filter(|s| s.events.is_closed()).map(|s| s.id).collect();
        for id in gone {
            self.cancel(id);
        }
    }

    fn end(&mut self, mut s: Sequence<B>, how: End) {
        s.blocks.free(&mut self.alloc);
        if s.queued_new {
            s.queued_new = false;
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        let usage = Usage {
            prompt_tokens: s.prompt_len,
            completion_tokens: s.tokens.len() - s.prompt_len,
            cached_tokens: s.cached_tokens,
        };
        let event = match how {
            End::Finished(reason, text) => {
                self.stats.requests_finished += 1;
                Event::Finished { text, reason, usage }
            }
            End::Cancelled => {
                self.stats.requests_cancelled += 1;
                Event::Finished { text: String::new(), reason: FinishReason::Cancelled, usage }
            }
            End::Failed(e) => {
                self.stats.requests_failed += 1;
                Event::Failed(e)
            }
        };
        let _ = s.events.send(event);
    }

    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        s.blocks.free(&mut self.alloc);
        self.stats.preemptions += 1;
        self.waiting.push(s);
    }

    /// Index of the newest running sequence not in `planned`.
    fn newest_unplanned(&self, planned: &[Planned]) -> Option<usize> {
        self.running
            .iter()
            .enumerate()
            .filter(|(_, s)| !planned.iter().any(|p| p.id == s.id))
            .max_by_key(|(_, s)| s.arrival)
            .map(|(i, _)| i)
    }

    /// The waiting sequence admission would pick next (see the module docs).
    fn pick_waiting(&self) -> Option<usize> {
        let mut by_tenant: HashMap<&str, usize> = HashMap::new();
        let mut by_adapter: HashMap<(&str, [u8; 32]), usize> = HashMap::new();
        for s in &self.running {
            *by_tenant.entry(s.req.tenant.as_str()).or_default() += 1;
            *by_adapter.entry((s.req.tenant.as_str(), s.adapter_key)).or_default() += 1;
        }
        self.waiting
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| {
                let t = s.req.tenant.as_str();
                (
                    by_tenant.get(t).copied().unwrap_or(0),
                    by_adapter.get(&(t, s.adapter_key)).copied().unwrap_or(0),
                    s.arrival,
                )
            })
            .map(|(i, _)| i)
    }

    /// Builds this step's plan, allocating KV slots, preempting and admitting as needed.
    fn schedule(&mut self) -> Vec<Planned> {
        let mut plan: Vec<Planned> = Vec::new();
        let mut budget = self.cfg.max_batch_tokens;
        // 1. Decodes, oldest first.
        let mut decoders: Vec<(u64, u64)> =
            self.running.iter().filter(|s| s.remaining() == 1).map(|s| (s.arrival, s.id)).collect();
        decoders.sort_unstable();
        for (_, id) in decoders {
            if budget == 0 {
                break;
            }
            while let Some(i) = self.running.iter().position(|s| s.id == id) {
                let s = &mut self.running[i];
                let start = s.blocks.len();
                match s.blocks.append(&mut self.alloc, 1) {
                    Ok(slots) => {
                        plan.push(Planned { id, start, n: 1, slots });
                        budget -= 1;
                        break;
                    }
                    Err(_) => match self.newest_unplanned(&plan) {
                        Some(v) if v != i => self.preempt(v),
                        _ => {
                            self.preempt(i);
                            break;
                        }
                    },
                }
            }
        }
        // 2. Prefill chunks of running sequences, oldest first.
        let mut prefills: Vec<(u64, u64)> =
            self.running.iter().filter(|s| s.remaining() > 1).map(|s| (s.arrival, s.id)).collect();
        prefills.sort_unstable();
        for (_, id) in prefills {
            if budget == 0 {
                break;
            }
            let Some(i) = self.running.iter().position(|s| s.id == id) else { continue };
            if let Some(p) = self.plan_chunk(i, budget) {
                budget -= p.n;
                plan.push(p);
            }
        }
        // 3. Admission.
        let watermark = (self.cfg.num_blocks / 100).max(1);
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(w) = self.pick_waiting() else { break };
            let s = &mut self.waiting[w];
            // A request scoring its prompt computes all of it: a cached block has no logits.
            if self.cfg.prefix_cache && s.blocks.is_empty() && s.prompt_lp.is_none() {
                let hit = s.blocks.match_prefix(&mut self.alloc, &s.prefix_key, &s.tokens);
                if s.queued_new {
                    s.cached_tokens = hit.min(s.prompt_len);
                }
            }
            let n = s.remaining().min(budget);
            let needed = s.blocks.blocks_needed(&self.alloc, n);
            let room = self.alloc.free_blocks().saturating_sub(if self.running.is_empty() { 0 } else { watermark });
            if needed > room {
                // Not now: give the shared blocks back (they stay cached) and stop admitting, so
                // the head of the fair order is not overtaken by smaller requests.
                s.blocks.free(&mut self.alloc);
                break;
            }
            let mut s = self.waiting.remove(w);
            if s.queued_new {
                s.queued_new = false;
                self.queued.fetch_sub(1, Ordering::SeqCst);
                self.stats.prompt_tokens_total += s.prompt_len as u64;
                self.stats.prefix_cache_hit_tokens += s.cached_tokens as u64;
            }
            self.running.push(s);
            let i = self.running.len() - 1;
            if let Some(p) = self.plan_chunk(i, budget) {
                budget -= p.n;
                plan.push(p);
            }
        }
        plan
    }

    /// Plans up to `budget` tokens of sequence `i`'s pending tokens, as many as free blocks
    /// allow.
    fn plan_chunk(&mut self, i: usize, budget: usize) -> Option<Planned> {
        let bs = self.alloc.block_size();
        let s = &mut self.running[i];
        let start = s.blocks.len();
        let room_in_last = s.blocks.table().len() * bs - start;
        let fit = room_in_last + self.alloc.free_blocks() * bs;
        let mut n = s.remaining().min(budget).min(fit);
        if s.prompt_lp.is_some() {
            n = n.min(PROMPT_LOGPROBS_CHUNK);
        }
        if n == 0 {
            return None;
        }
        let slots = s.blocks.append(&mut self.alloc, n).ok()?;
        Some(Planned { id: s.id, start, n, slots })
    }

    /// Runs a forward pass over `entries` (indices into `running` with their plans); returns,
    /// in entry order, the logits of each entry's prompt rows ([`Sequence::prompt_rows`]) and
    /// then of its row that ends its pending tokens, if it has one.
    fn forward(&mut self, entries: &[(usize, &Planned)]) -> Result<Vec<PickedRow>, String> {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut seqs = Vec::with_capacity(entries.len());
        let mut adapters = Vec::with_capacity(entries.len());
        let mut logits_rows = Vec::new();
        let mut picks = Vec::new();
        let reduce = self.cfg.force_reduced_rows || self.model.model.backend().picks_on_device();
        for &(i, p) in entries {
            let s = &self.running[i];
            let q_start = tokens.len();
            tokens.extend_from_slice(&s.tokens[p.start..p.start + p.n]);
            positions.extend((p.start..p.start + p.n).map(|x| x as u32));
            slots.extend_from_slice(&p.slots);
            seqs.push(AttnSeq { q_start, q_len: p.n, ctx_len: p.start + p.n, block_table: s.blocks.table() });
            adapters.push(s.req.adapters.as_slice());
            logits_rows.extend(s.prompt_rows(p).map(|j| (q_start + j - p.start) as u32));
            picks.resize(logits_rows.len(), RowPick::Full);
            if p.start + p.n == s.tokens.len() {
                logits_rows.push((q_start + p.n - 1) as u32);
                picks.push(if reduce { row_pick(s) } else { RowPick::Full });
            }
        }
        let batch = ForwardBatch {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
            seqs: &seqs,
            logits_rows: &logits_rows,
            adapters: &adapters,
        };
        let model = &self.model.model;
        let kv = &mut self.kv;
        match catch_unwind(AssertUnwindSafe(|| model.forward_picked(kv, &batch, &picks))) {
            Ok(Ok(l)) => Ok(l),
            Ok(Err(e)) => Err(e.to_string()),
            Err(p) => Err(format!("panic in the forward pass: {}", panic_message(p.as_ref()))),
        }
    }

    /// Runs one step: schedules, runs one batched forward pass, samples, streams and retires
    /// finished sequences. Returns the number of tokens processed (0 when idle).
    pub fn step(&mut self) -> usize {
        self.reap_abandoned();
        let mut plan = self.schedule();
        if plan.is_empty() && !self.running.is_empty() {
            // Every running sequence is stuck on a full pool: make room by preempting the newest.
            while plan.is_empty() && self.running.len() > 1 {
                if let Some(v) = self.newest_unplanned(&plan) {
                    self.preempt(v);
                }
                plan = self.schedule();
            }
        }
        if plan.is_empty() {
            return 0;
        }
        self.stats.steps += 1;
        let processed: usize = plan.iter().map(|p| p.n).sum();
        // Plans refer to sequences by id; `running` does not change until the step ends.
        let idx: Vec<usize> = plan
            .iter()
            .map(|p| self.running.iter().position(|s| s.id == p.id).expect("planned sequences are running"))
            .collect();
        let entries: Vec<(usize, &Planned)> = idx.iter().copied().zip(plan.iter()).collect();
        // Per entry: its logits row, if it produced one, or the error that failed it.
        let mut outcome: Vec<Result<Option<PickedRow>, String>> = Vec::with_capacity(entries.len());
        // Constrained rows that sample this step and still need their next mask: it depends
        // only on tokens already consumed, so it is computed on a thread of its own while the
        // forward pass runs, and is ready when the logits are.
        let mut pending: Vec<(usize, Box<Grammar>)> = Vec::new();
        for &(i, p) in &entries {
            let s = &mut self.running[i];
            if p.start + p.n == s.tokens.len() && s.req.grammar.as_ref().is_some_and(|g| g.needs_mask()) {
                pending.extend(s.req.grammar.take().map(|g| (i, g)));
            }
        }
        let (forward, pending) = std::thread::scope(|scope| {
            let masks = (!pending.is_empty()).then(|| {
                scope.spawn(move || {
                    let (mut n, mut ns) = (0u64, 0u64);
                    for (_, g) in &mut pending {
                        // An error (or a panic) leaves the mask unset: sampling computes it again
                        // and fails that row alone with the message.
                        if let Ok(Ok(Some(t))) = catch_unwind(AssertUnwindSafe(|| g.ensure_mask())) {
                            n += 1;
                            ns += t;
                        }
                    }
                    (pending, n, ns)
                })
            });
            let forward = self.forward(&entries);
            (forward, masks.map(|h| h.join()))
        });
        match pending {
            Some(Ok((pending, n, ns))) => {
                self.stats.grammar_masks += n;
                self.stats.grammar_mask_ns += ns;
                for (i, g) in pending {
                    self.running[i].req.grammar = Some(g);
                }
            }
            // Unreachable in practice (the thread catches its panics): the grammars are lost,
            // and `advance` fails those rows rather than let them go on unconstrained.
            Some(Err(_)) => {}
            None => {}
        }
        match forward {
            Ok(logits) => {
                let mut rows = logits.into_iter();
                for &(i, p) in &entries {
                    let s = &mut self.running[i];
                    s.record_prompt_rows(p, &mut rows);
                    let wants = p.start + p.n == s.tokens.len();
                    outcome.push(Ok(if wants { rows.next() } else { None }));
                }
            }
            Err(e) if entries.len() == 1 => outcome.push(Err(e)),
            Err(_) => {
                // Find out whose computation fails: run each sequence alone.
                for &(i, p) in &entries {
                    let out = self.forward(&[(i, p)]).map(|l| {
                        let mut rows = l.into_iter();
                        self.running[i].record_prompt_rows(p, &mut rows);
                        rows.next()
                    });
                    outcome.push(out);
                }
            }
        }
        for (&(i, p), out) in entries.iter().zip(outcome.iter_mut()) {
            let s = &mut self.running[i];
            if self.cfg.prefix_cache && out.is_ok() {
                s.blocks.register_full_blocks(&mut self.alloc, &s.prefix_key, &s.tokens);
            }
            if p.n > 1 || s.tokens.len() - s.prompt_len == 0 {
                self.stats.prefill_tokens_computed += p.n as u64;
            }
        }
        // Sample, stream, and decide who is done.
        let ctx = self.model.model.config.max_position_embeddings;
        let mut done: Vec<(u64, End)> = Vec::new();
        for ((&(i, _), p), out) in entries.iter().zip(plan.iter()).zip(outcome) {
            let s = &mut self.running[i];
            match out {
                Err(e) => done.push((p.id, End::Failed(EngineError::Failed(e)))),
                Ok(None) => {}
                Ok(Some(row)) => {
                    if matches!(row, PickedRow::Argmax(_) | PickedRow::TopK(_)) {
                        self.stats.reduced_rows += 1;
                    }
                    let mut mask_ns = None;
                    let r = catch_unwind(AssertUnwindSafe(|| advance(s, row, ctx, &mut mask_ns)));
                    if let Some(ns) = mask_ns {
                        self.stats.grammar_masks += 1;
                        self.stats.grammar_mask_ns += ns;
                    }
                    match r {
                        Ok(Ok(None)) => {}
                        Ok(Ok(Some(end))) => done.push((p.id, end)),
                        Ok(Err(e)) => done.push((p.id, End::Failed(EngineError::Failed(e)))),
                        Err(panic) => done.push((
                            p.id,
                            End::Failed(EngineError::Failed(format!("panic: {}", panic_message(panic.as_ref())))),
                        )),
                    }
                    self.stats.generation_tokens_total += 1;
                }
            }
        }
        for (id, end) in done {
            if let Some(i) = self.running.iter().position(|s| s.id == id) {
                let s = self.running.remove(i);
                self.end(s, end);
            }
        }
        processed
    }
}

enum End {
    Finished(FinishReason, String),
    Cancelled,
    Failed(EngineError),
}

/// Samples a sequence's next token from `logits`, streams it, and says whether it is done.
///
/// A constrained row's logits are masked by its grammar after the request's own edits, and the
/// chosen token advances the grammar; a grammar that is complete ends the row (`mask_ns`: the
/// time of a mask that had to be computed here, not beside the forward pass).
fn advance<B: Backend>(
    s: &mut Sequence<B>,
    row: PickedRow,
    ctx: usize,
    mask_ns: &mut Option<u64>,
) -> Result<Option<End>, String> {
    let generated = s.tokens.len() - s.prompt_len;
    let (t, logprob) = match row {
        PickedRow::Full(mut logits) => {
            // Finite but huge adapter weights pass every load check and overflow in the forward
            // pass; sampling NaN logits would silently pick token 0. Fail this request, naming
            // the adapters. A non-short-circuiting fold vectorizes (one cheap pass).
            if logits.iter().fold(false, |bad, v| bad | !v.is_finite()) {
                return Err(non_finite(s));
            }
            let raw = s.req.logprobs.map(|_| logits.clone());
            adjust_logits(s, &mut logits, generated);
            if s.constrained {
                let g = s.req.grammar.as_mut().ok_or("structured output: the grammar state was lost")?;
                *mask_ns = g.ensure_mask()?;
                g.apply(&mut logits, s.decoder.tokenizer().eos_ids(), &s.req.stop_token_ids)?;
            }
            let t = s.sampler.sample(&mut logits);
            (t, raw.map(|raw| log_softmax_top(&raw, t, s.req.logprobs.unwrap_or(0).min(20))))
        }
        // Rows reduced on the device ([`row_pick`] asks only for rows no edit touches).
        PickedRow::Argmax(t) => (s.sampler.take(t), None),
        PickedRow::TopK(candidates) => (s.sampler.sample_candidates(candidates), None),
        PickedRow::NonFinite => return Err(non_finite(s)),
    };
    s.tokens.push(t);
    let generated = generated + 1;
    if (s.req.stop_at_eos && s.decoder.tokenizer().is_eos(t)) || s.req.stop_token_ids.contains(&t) {
        let _ = s.events.send(Event::Token { id: t, text: String::new(), logprob });
        return Ok(Some(End::Finished(FinishReason::Stop, tail(s)?)));
    }
    let complete = match s.req.grammar.as_mut() {
        Some(g) => g.consume(t)?,
        None => false,
    };
    let piece = s.decoder.push(t).map_err(|e| e.to_string())?;
    let (text, hit) =
        if generated < s.req.min_tokens { (s.stops.push_unchecked(&piece), false) } else { s.stops.push(&piece) };
    let _ = s.events.send(Event::Token { id: t, text, logprob });
    if hit {
        return Ok(Some(End::Finished(FinishReason::Stop, String::new())));
    }
    if complete {
        // Nothing can follow (e.g. the closing brace of a JSON value): done without a step
        // spent on the end-of-sequence token.
        return Ok(Some(End::Finished(FinishReason::Stop, tail(s)?)));
    }
    if generated >= s.max_tokens || s.tokens.len() >= ctx {
        return Ok(Some(End::Finished(FinishReason::Length, tail(s)?)));
    }
    Ok(None)
}

/// What the sampling row of `s` needs of its logits this step: a reduced row (argmax, top-k)
/// only when nothing edits or reads every logit (logprobs, logit bias, a `min_tokens` ban, a
/// grammar, penalties) and the sampler can choose from it ([`Sampler::reduced_pick`]).
fn row_pick<B: Backend>(s: &Sequence<B>) -> RowPick {
    let generated = s.tokens.len() - s.prompt_len;
    if s.req.logprobs.is_some() || s.constrained || !s.req.logit_bias.is_empty() || generated < s.req.min_tokens {
        return RowPick::Full;
    }
    s.sampler.reduced_pick(openlora_kernels::cuda::TOPK_MAX).unwrap_or(RowPick::Full)
}

/// The error of a row whose logits are not finite, naming its adapters.
fn non_finite<B: Backend>(s: &Sequence<B>) -> String {
    let names: Vec<&str> = s.req.adapters.iter().map(|w| w.adapter.name.as_str()).collect();
    if names.is_empty() {
        "the model produced non-finite logits".to_owned()
    } else {
        format!(
            "the model produced non-finite logits with adapter(s) {}: their weights overflow in the forward pass",
            names.join(", ")
        )
    }
}

/// The request's own edits of this row's logits before sampling: its `logit_bias` (-100 or
/// less bans), and while fewer than `min_tokens` are generated, the tokens that would end it
/// masked. Costs O(entries), bounded by the service's limits, so one tenant's map does not
/// slow the step for the others.
fn adjust_logits<B: Backend>(s: &Sequence<B>, logits: &mut [f32], generated: usize) {
    for &(t, b) in &s.req.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if b <= -100.0 { f32::NEG_INFINITY } else { *l + b };
        }
    }
    if generated < s.req.min_tokens {
        let eos: &[u32] = if s.req.stop_at_eos { s.decoder.tokenizer().eos_ids() } else { &[] };
        for &t in eos.iter().chain(&s.req.stop_token_ids) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Text held back at the end of a generation that did not hit a stop string.
fn tail<B: Backend>(s: &mut Sequence<B>) -> Result<String, String> {
    let rest = s.decoder.finish().map_err(|e| e.to_string())?;
    let (mut out, _) = s.stops.push(&rest);
    out.push_str(&s.stops.flush());
    Ok(out)
}
