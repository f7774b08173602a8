//! The service's vocabulary: what a caller asks for ([`GenerateRequest`]), what it gets back
//! ([`ServiceEvent`]s, [`ModelCard`]s) and how a refusal is described ([`ServiceError`]).
//! Transports (the HTTP server, the CLI) speak only these types.
//!
//! The engine's plain data types that a caller needs to fill a request or read an event
//! (sampling settings, finish reasons, logprobs) are re-exported here rather than copied; the
//! engine's handle, streams, events and errors never cross this boundary.

use crate::engine::EngineError;
pub use crate::engine::grammar::{Constraint, ConstraintSpec};
pub use crate::engine::sampler::SamplingParams;
pub use crate::engine::{FinishReason, PromptLogprob, TokenLogprob};
use crate::model::chat_template::ChatMessage;

/// What kind of failure a [`ServiceError`] is (the HTTP layer maps it to a status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or out of range (400).
    BadRequest,
    /// No or a wrong API key (401).
    Unauthorized,
    /// The key is valid but may not do this (403).
    Forbidden,
    /// No such model or adapter, or not visible to this tenant (404).
    NotFound,
    /// The body is too large (413).
    TooLarge,
    /// This tenant has too many requests in flight (429).
    RateLimited,
    /// The engine's queue is full or it is shutting down (503).
    Overloaded,
    /// Something failed on our side (500).
    Internal,
}

impl ErrorKind {
    /// A short label (metrics).
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Internal => "internal",
        }
    }
}

/// A refused or failed request, with what the client needs to fix it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    /// The kind.
    pub kind: ErrorKind,
    /// A human-readable message naming the problem.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
}

impl ServiceError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), param: None }
    }

    /// A 400 naming `param`.
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::BadRequest, message: message.into(), param: Some(param.to_owned()) }
    }

    /// A 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl From<EngineError> for ServiceError {
    fn from(e: EngineError) -> Self {
        let kind = match &e {
            EngineError::Overloaded { .. } | EngineError::ShutDown => ErrorKind::Overloaded,
            EngineError::Invalid(_) => ErrorKind::BadRequest,
            EngineError::Failed(_) => ErrorKind::Internal,
        };
        Self::new(kind, e.to_string())
    }
}

/// The prompt, in one of the forms clients send.
#[derive(Clone, Debug)]
pub enum PromptInput {
    /// Text, tokenized as is.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

impl PromptInput {
    /// Whether it is a conversation (its response is a chat completion).
    pub fn is_chat(&self) -> bool {
        matches!(self, PromptInput::Chat(_))
    }
}

/// One adapter of a composition.
#[derive(Clone, Debug)]
pub struct AdapterChoice {
    /// Its name.
    pub name: String,
    /// Its weight.
    pub weight: f32,
}

/// How to merge several adapters into one (PEFT's `add_weighted_adapter`).
#[derive(Clone, Debug, Default)]
pub struct MergeSpec {
    /// The method (`linear`, `cat`, `ties`, `dare_linear`, ...).
    pub method: String,
    /// Fraction kept by pruning methods.
    pub density: Option<f64>,
    /// `total` or `frequency`.
    pub majority_sign_method: Option<String>,
    /// Rank of SVD results.
    pub svd_rank: Option<usize>,
    /// DARE's seed.
    pub seed: Option<u64>,
}

/// One generation request, as any transport hands it to [`Service::generate`]. Several
/// prompts (a completions list) share one request, one concurrency permit and one receipt;
/// their choices are numbered prompt by prompt (`prompt * n + j`), as OpenAI does.
///
/// [`Service::generate`]: super::Service::generate
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The base model's id or an adapter's name.
    pub model: String,
    /// Extension: adapters to compose (their terms add, each scaled by its weight).
    pub adapters: Vec<AdapterChoice>,
    /// Extension: merge the adapters into one instead of adding their terms.
    pub merge: Option<MergeSpec>,
    /// The prompts (at least one).
    pub prompts: Vec<PromptInput>,
    /// Most new tokens (None: the deployment's default).
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Choices per prompt.
    pub n: usize,
    /// Logprobs with this many alternatives.
    pub logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs`: score every prompt token, with this many alternatives (the
    /// first choice of each prompt computes them; its other choices share them).
    pub prompt_logprobs: Option<usize>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Request metadata (OpenAI `metadata`), handed to plugins.
    pub metadata: Vec<(String, String)>,
    /// vLLM's `cache_salt`: only requests with the same salt share prefix-cache blocks (on top
    /// of the deployment's tenant isolation).
    pub cache_salt: Option<String>,
    /// OpenAI's `logit_bias`: added to these tokens' logits before sampling (-100 bans).
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's `min_tokens`: no end-of-sequence token, stop token or stop string ends a
    /// choice before it has this many tokens.
    pub min_tokens: usize,
    /// vLLM's `stop_token_ids`: more token ids that end a choice (also with `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// OpenAI's `user`: the caller's end-user id, recorded in the receipt.
    pub user: Option<String>,
    /// Structured output: grammar-constrained decoding of every choice.
    pub constraint: Option<StructuredOutput>,
    /// The tools handed to the chat template with a conversation (when the deployment's
    /// template renders them; transformers' `tools` argument).
    pub tools: Option<serde_json::Value>,
}

/// What a request's output must match, and the request field that asked for it (its errors
/// name that field).
#[derive(Clone, Debug, PartialEq)]
pub struct StructuredOutput {
    /// The field as the client spelled it (`response_format`, `guided_json`, ...).
    pub field: String,
    /// The constraint.
    pub spec: ConstraintSpec,
}

/// Most `logit_bias` entries one request may send.
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most `stop_token_ids` one request may send.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// Longest `user` in bytes.
pub const MAX_USER_BYTES: usize = 256;

impl GenerateRequest {
    /// Checks the token-level fields against the model's vocabulary and `max_tokens` (the
    /// request's effective one), naming the field at fault.
    pub fn check_token_fields(&self, vocab_size: usize, max_tokens: usize) -> Result<(), ServiceError> {
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(ServiceError::bad(
                "logit_bias",
                format!("`logit_bias` has {} entries; the limit is {MAX_LOGIT_BIAS}", self.logit_bias.len()),
            ));
        }
        if let Some((t, _)) = self.logit_bias.iter().find(|(t, _)| *t as usize >= vocab_size) {
            return Err(ServiceError::bad(
                "logit_bias",
                format!("`logit_bias`: token id {t} is outside the vocabulary (size {vocab_size})"),
            ));
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return Err(ServiceError::bad(
                "logit_bias",
                format!("`logit_bias`: the bias of token {t} is {b}; it must be in [-100, 100]"),
            ));
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(ServiceError::bad(
                "stop_token_ids",
                format!("`stop_token_ids` has {} ids; the limit is {MAX_STOP_TOKEN_IDS}", self.stop_token_ids.len()),
            ));
        }
        if let Some(t) = self.stop_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(ServiceError::bad(
                "stop_token_ids",
                format!("`stop_token_ids`: token id {t} is outside the vocabulary (size {vocab_size})"),
            ));
        }
        if self.min_tokens > max_tokens {
            return Err(ServiceError::bad(
                "min_tokens",
                format!("`min_tokens` ({}) must not exceed max_tokens ({max_tokens})", self.min_tokens),
            ));
        }
        if self.user.as_ref().is_some_and(|u| u.len() > MAX_USER_BYTES) {
            return Err(ServiceError::bad("user", format!("`user` must be at most {MAX_USER_BYTES} bytes")));
        }
        Ok(())
    }
}

impl GenerateRequest {
    /// A request for `model` with one prompt and the defaults (greedy, one choice).
    pub fn new(model: impl Into<String>, prompt: PromptInput) -> Self {
        Self {
            model: model.into(),
            adapters: Vec::new(),
            merge: None,
            prompts: vec![prompt],
            max_tokens: None,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            n: 1,
            logprobs: None,
            prompt_logprobs: None,
            ignore_eos: false,
            metadata: Vec::new(),
            cache_salt: None,
            logit_bias: Vec::new(),
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            user: None,
            constraint: None,
            tools: None,
        }
    }
}

/// Token counts of one choice or of a whole request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Prompt tokens (for a request: over all its prompts).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache (for a request: the most of any choice).
    pub cached_tokens: usize,
}

/// What a request's [`Journey`](super::Journey) yields, in order: tokens and choice ends as
/// they happen, then exactly one `Done` (or one `Failed`), then nothing.
#[derive(Clone, Debug)]
pub enum ServiceEvent {
    /// A generated token of choice `choice` and the text it completed (empty while text is
    /// held back: an incomplete character, or a possible start of a stop string).
    Token {
        /// The choice.
        choice: usize,
        /// The token id.
        id: u32,
        /// Newly safe text.
        text: String,
        /// Present when the request asked for logprobs.
        logprob: Option<TokenLogprob>,
    },
    /// The prompt's scores, for the first choice of each prompt when the request asked for
    /// them (before that choice's first token).
    PromptLogprobs {
        /// The choice (`prompt * n`).
        choice: usize,
        /// Prompt tokens 1.. with their log-probabilities, ranks and alternatives.
        logprobs: Vec<PromptLogprob>,
    },
    /// Choice `choice` ended; `text` is what was still held back (emit it last).
    ChoiceFinished {
        /// The choice.
        choice: usize,
        /// Remaining text.
        text: String,
        /// Why it ended.
        reason: FinishReason,
        /// Its token counts.
        usage: TokenUsage,
    },
    /// Every choice ended and the receipt is durable.
    Done {
        /// The receipt's id (None when attribution is off).
        receipt: Option<String>,
        /// The request's token counts.
        usage: TokenUsage,
        /// The first choice's finish reason.
        finish_reason: FinishReason,
    },
    /// The request failed; its receipt (finish reason `error`) names the tokens produced.
    Failed(ServiceError),
}

/// A model as `/v1/models` lists it.
#[derive(Clone, Debug)]
pub struct ModelCard {
    /// Its id.
    pub id: String,
    /// Where it came from.
    pub root: String,
    /// The base model's id, for adapters.
    pub parent: Option<String>,
}

/// An adapter as `GET /v1/adapters` lists it: where the pager holds it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterStatus {
    /// Its name.
    pub id: String,
    /// The generation (content hash, hex) its name is bound to, once loaded.
    pub generation: Option<String>,
    /// Its host copy is resident.
    pub host_resident: bool,
    /// Its prepared form is resident in the device tier.
    pub device_resident: bool,
    /// A request is using it (it cannot be evicted).
    pub pinned: bool,
    /// A load is in flight.
    pub loading: bool,
    /// Its folder on the server: admins only (the server's paths are not other tenants' to know).
    pub path: Option<String>,
}

/// Request limits from the deployment.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest body.
    pub max_body_bytes: usize,
    /// Longest prompt.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens`.
    pub max_tokens_limit: usize,
    /// Default `max_tokens`.
    pub default_max_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Most adapters per request.
    pub max_adapters: usize,
    /// Largest rank a merge may produce.
    pub max_merged_rank: usize,
    /// Longest stop string in bytes.
    pub max_stop_bytes: usize,
    /// Most sequences (prompts × `n`) one request may start.
    pub max_choices: usize,
}

/// A fresh response id.
pub fn new_request_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().r#gen();
    format!("{prefix}-{n:032x}")
}
