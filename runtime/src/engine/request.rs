//! What goes into the engine (a [`Request`]) and what comes out ([`Event`]s on a stream).

use openlora_kernels::Backend;
use sha2::{Digest, Sha256};

use crate::lora::WeightedAdapter;

use super::sampler::SamplingParams;

/// One generation request, with its adapters already resolved.
pub struct Request<B: Backend> {
    /// Prompt token ids (the chat template already applied).
    pub prompt: Vec<u32>,
    /// LoRA adapters with weights (empty for the base model). Their terms add.
    pub adapters: Vec<WeightedAdapter<B>>,
    /// Who asked: the fairness policy shares the engine between tenants.
    pub tenant: String,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Most new tokens (the context length may end generation earlier).
    pub max_tokens: usize,
    /// Strings that end generation; the text returned stops before them.
    pub stop: Vec<String>,
    /// Whether end-of-sequence tokens end generation.
    pub stop_at_eos: bool,
    /// More token ids that end generation (e.g. a chat template's end-of-turn token).
    pub stop_token_ids: Vec<u32>,
    /// Added to the logits of these token ids before sampling, in this sequence only (OpenAI's
    /// `logit_bias`); a bias of -100 or less bans the token (its logit becomes -inf).
    pub logit_bias: Vec<(u32, f32)>,
    /// End-of-sequence tokens, `stop_token_ids` and stop strings cannot end the generation
    /// before it has this many tokens (vLLM's `min_tokens`; the ids are masked meanwhile).
    pub min_tokens: usize,
    /// Report each chosen token's log-probability and this many alternatives (None: off).
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-probability given the tokens before it, its rank, and
    /// this many alternatives (vLLM's `prompt_logprobs`; None: off). The prompt is then computed
    /// in full (no prefix-cache hit) and in chunks of at most [`PROMPT_LOGPROBS_CHUNK`] tokens.
    pub prompt_logprobs: Option<usize>,
    /// Salts the prefix-cache block hashes: only requests with the same salt (and adapters)
    /// share cached blocks. The service puts the tenant in it, so one tenant cannot probe
    /// another's prompts; empty means no salt.
    pub cache_salt: String,
    /// Grammar-constrained decoding: the parser and first mask the output must follow (None:
    /// free). The service compiles it (see [`super::grammar::GrammarEnv::compile`]).
    pub grammar: Option<Box<super::grammar::Grammar>>,
}

impl<B: Backend> Request<B> {
    /// A greedy request for `prompt` with default limits (tests and tools).
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            adapters: Vec::new(),
            tenant: String::new(),
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: Vec::new(),
            stop_at_eos: true,
            stop_token_ids: Vec::new(),
            logit_bias: Vec::new(),
            min_tokens: 0,
            logprobs: None,
            prompt_logprobs: None,
            cache_salt: String::new(),
            grammar: None,
        }
    }

    /// The key the prefix cache and the fairness policy use for this request's adapters: a
    /// hash of each adapter's generation and weight, in order. The base model is all zeros.
    pub fn adapter_key(&self) -> [u8; 32] {
        adapter_key(&self.adapters)
    }

    /// The key prefix-cache blocks are hashed under: the adapter key, salted with
    /// [`Request::cache_salt`] when it is set.
    pub fn prefix_key(&self) -> [u8; 32] {
        let key = self.adapter_key();
        if self.cache_salt.is_empty() {
            return key;
        }
        let mut h = Sha256::new();
        h.update(key);
        h.update(b"cache_salt\0");
        h.update(self.cache_salt.as_bytes());
        h.finalize().into()
    }
}

/// See [`Request::adapter_key`].
pub fn adapter_key<B: Backend>(adapters: &[WeightedAdapter<B>]) -> [u8; 32] {
    if adapters.is_empty() {
        return [0; 32];
    }
    let mut h = Sha256::new();
    for wa in adapters {
        h.update(wa.adapter.generation.0);
        h.update(wa.weight.to_le_bytes());
    }
    h.finalize().into()
}

/// A chosen token's log-probability and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// Log-probability of the chosen token under the model's distribution.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The most prompt tokens of one sequence a step computes when the request asked for
/// `prompt_logprobs`: each such token needs its own row of logits (vocabulary-sized), so this
/// bounds what one request adds to a step's memory (128 rows of 49,152 logits: 25 MB).
pub const PROMPT_LOGPROBS_CHUNK: usize = 128;

/// A prompt token's log-probability given the tokens before it (vLLM's `prompt_logprobs`).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprob {
    /// The prompt token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// Its rank by probability among the whole vocabulary (1 = most likely).
    pub rank: usize,
    /// The most likely tokens at this position and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache (not computed).
    pub cached_tokens: usize,
}

/// What a request's stream yields.
#[derive(Clone, Debug)]
pub enum Event {
    /// A generated token and the text it completed (empty while the text is held back: an
    /// incomplete character, or a possible start of a stop string).
    Token {
        /// The token id.
        id: u32,
        /// Newly safe text.
        text: String,
        /// Present when the request asked for logprobs.
        logprob: Option<TokenLogprob>,
    },
    /// The log-probabilities of prompt tokens 1.. (token 0 has none), when the request asked
    /// for them: sent once, before the first token.
    PromptLogprobs(Vec<PromptLogprob>),
    /// The request ended. `text` is what was still held back (emit it last).
    Finished {
        /// Remaining text.
        text: String,
        /// Why it ended.
        reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The request failed; the engine goes on serving others.
    Failed(EngineError),
}

/// Why the engine refused or failed a request.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    /// The queue is full; try again later (HTTP 429/503).
    #[error("the server is overloaded: {waiting} requests are waiting (limit {limit}); retry later")]
    Overloaded {
        /// Requests waiting.
        waiting: usize,
        /// The queue limit.
        limit: usize,
    },
    /// The request can never run (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// Processing this request failed (an error or a panic in its computation).
    #[error("generation failed: {0}")]
    Failed(String),
    /// The engine has stopped.
    #[error("the engine has shut down")]
    ShutDown,
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The client cancelled the request (or went away).
    Cancelled,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}
