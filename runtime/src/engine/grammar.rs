//! Grammar-constrained decoding (structured output): a per-sequence token mask from
//! [llguidance](https://github.com/guidance-ai/llguidance), the engine llama.cpp and vLLM use.
//!
//! [`GrammarEnv`] is built once per model from its tokenizer (the byte string of every token
//! id, special tokens marked so no grammar can spell them as text). It compiles a
//! [`Constraint`] into a [`Grammar`]: one matcher and the mask of the tokens allowed next. The
//! service compiles and computes the first mask before a request reaches the engine (a grammar
//! that does not compile, or allows nothing, is the client's 400); the engine then keeps one
//! `Grammar` per constrained row: it masks that row's logits before sampling, feeds the sampled
//! token back, and computes the next mask while the forward pass of the next step runs. Rows
//! without a grammar take the free path untouched, so constrained and free requests (and
//! different adapters) share one batch.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;

use crate::model::tokenizer::TextTokenizer;

/// What a request's output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A value valid for this JSON Schema (`json_schema`, vLLM's `guided_json`).
    JsonSchema(Value),
    /// The whole output matches this regular expression (vLLM's `guided_regex`).
    Regex(String),
    /// Exactly one of these strings (vLLM's `guided_choice`).
    Choice(Vec<String>),
    /// A Lark grammar, llguidance's dialect (vLLM's `guided_grammar`).
    Lark(String),
}

/// A [`Constraint`] and how JSON may be spaced.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstraintSpec {
    /// The constraint.
    pub constraint: Constraint,
    /// For JSON: a regex for the whitespace allowed between tokens (vLLM's
    /// `guided_whitespace_pattern`). None: none at all but one space after `,` and `:`, the
    /// spacing of Python's `json.dumps` (a small model given free whitespace can emit newlines
    /// until `max_tokens`).
    pub whitespace_pattern: Option<String>,
}

impl ConstraintSpec {
    /// The llguidance grammar for this spec.
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        let json = |mut schema: Value| -> Result<TopLevelGrammar, String> {
            let Value::Object(o) = &mut schema else {
                return Err(format!("the JSON schema must be an object, not {schema}"));
            };
            if o.contains_key("x-guidance") {
                return Err("`x-guidance` is set by the server; leave it out of the schema".into());
            }
            let opts = match &self.whitespace_pattern {
                None => JsonCompileOptions {
                    whitespace_flexible: false,
                    item_separator: ", ".into(),
                    key_separator: ": ".into(),
                    ..JsonCompileOptions::default()
                },
                Some(p) => JsonCompileOptions {
                    whitespace_flexible: true,
                    whitespace_pattern: Some(p.clone()),
                    ..JsonCompileOptions::default()
                },
            };
            opts.apply_to(&mut schema);
            Ok(TopLevelGrammar::from_json_schema(schema))
        };
        match &self.constraint {
            Constraint::JsonObject => json(serde_json::json!({"type": "object"})),
            Constraint::JsonSchema(s) => json(s.clone()),
            Constraint::Regex(rx) => Ok(TopLevelGrammar::from_regex(rx)),
            Constraint::Choice(choices) => {
                // Each alternative a quoted Lark literal: JSON string escapes are Lark's.
                let alts: Vec<String> = choices.iter().map(|c| serde_json::to_string(c).unwrap_or_default()).collect();
                Ok(TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | "))))
            }
            Constraint::Lark(g) => Ok(TopLevelGrammar::from_lark(g.clone())),
        }
    }
}

/// The tokenizer as llguidance sees it: every id's bytes, and the model's own encoder for the
/// bytes a grammar forces.
struct TokEnv {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for TokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| self.tokenizer.encode(s, false).unwrap_or_default())
    }
}

/// Per-model grammar state: compiles constraints for this model's vocabulary.
pub struct GrammarEnv {
    factory: ParserFactory,
    vocab: usize,
}

impl std::fmt::Debug for GrammarEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarEnv").field("vocab", &self.vocab).finish_non_exhaustive()
    }
}

impl GrammarEnv {
    /// Builds the token trie for `tokenizer`, padded to the model's `vocab_size` logits (ids
    /// past the tokenizer's vocabulary are never allowed).
    pub fn new(tokenizer: Arc<TextTokenizer>, vocab_size: usize) -> Result<Self, String> {
        let unavailable = || "structured output is unavailable for this model's tokenizer".to_owned();
        let json: Value = tokenizer
            .inner()
            .to_string(false)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .ok_or_else(unavailable)?;
        // The reader asserts on vocabularies it does not expect: a panic is an error here.
        let mut words = catch_unwind(AssertUnwindSafe(|| llguidance::token_bytes_from_tokenizer_json(&json)))
            .map_err(|_| unavailable())?
            .map_err(|e| format!("{}: {e}", unavailable()))?;
        if words.len() > vocab_size {
            // Tokens the model has no logits for can never be sampled.
            words.truncate(vocab_size);
        }
        words.resize(vocab_size, Vec::new());
        let eos = tokenizer.eos_ids();
        let first_eos = *eos.first().ok_or_else(|| format!("{}: it has no end-of-sequence token", unavailable()))?;
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = catch_unwind(AssertUnwindSafe(|| TokTrie::from(&info, &words).with_eos_tokens(eos)))
            .map_err(|_| unavailable())?;
        let env: llguidance::toktrie::TokEnv = Arc::new(TokEnv { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("{}: {e}", unavailable()))?;
        factory.quiet();
        // Errors name the problem, not the grammar and the tokens so far (they reach clients).
        factory.limits_mut().verbose_errors = false;
        Ok(Self { factory, vocab: vocab_size })
    }

    /// The bytes the grammar engine holds for token `id` (a special token: 0xFF and its name;
    /// an id past the tokenizer's vocabulary: empty).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.factory.tok_env().tok_trie().token(id).to_vec()
    }

    /// Compiles `spec` and computes its first mask: an error is the request's fault (a schema
    /// or grammar llguidance refuses, or one that allows no token at all).
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Grammar, String> {
        let parser = self.factory.create_parser(spec.grammar()?).map_err(|e| bounded(&e.to_string()))?;
        let mut g = Grammar { matcher: Matcher::new(Ok(parser)), mask: None, vocab: self.vocab };
        g.ensure_mask()?;
        if g.mask.as_ref().is_some_and(|m| m.is_zero()) {
            return Err("the grammar allows no output at all".into());
        }
        Ok(g)
    }
}

fn bounded(e: &str) -> String {
    const MOST: usize = 512;
    if e.len() <= MOST {
        return e.to_owned();
    }
    let mut end = MOST;
    while !e.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &e[..end])
}

/// One constrained sequence's parser and the mask for its next token.
#[derive(Clone)]
pub struct Grammar {
    matcher: Matcher,
    /// The tokens allowed next given every token consumed so far (None: not computed yet).
    mask: Option<SimpleVob>,
    vocab: usize,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("has_mask", &self.mask.is_some()).finish_non_exhaustive()
    }
}

impl Grammar {
    /// Computes the next mask unless it is known; returns the nanoseconds spent if it was not.
    pub fn ensure_mask(&mut self) -> Result<Option<u64>, String> {
        if self.mask.is_some() {
            return Ok(None);
        }
        let t = Instant::now();
        let m = self.matcher.compute_mask().map_err(|e| format!("structured output: {}", bounded(&e.to_string())))?;
        self.mask = Some(m);
        Ok(Some(t.elapsed().as_nanos() as u64))
    }

    /// Whether the next mask still has to be computed.
    pub fn needs_mask(&self) -> bool {
        self.mask.is_none()
    }

    /// Sets every logit the grammar forbids to -inf. `also` (the request's own stop ids, e.g. a
    /// chat template's end-of-turn token) is allowed whenever the grammar may end here. Errors
    /// when nothing is left to sample (the request's `logit_bias` banned every allowed token).
    pub fn apply(&mut self, logits: &mut [f32], eos: &[u32], also: &[u32]) -> Result<(), String> {
        self.ensure_mask()?;
        let Some(mask) = &self.mask else { return Ok(()) };
        let may_end = eos.iter().any(|&t| mask.is_allowed(t));
        let n = logits.len().min(self.vocab);
        let keep: Vec<(usize, f32)> = if may_end {
            also.iter().filter_map(|&t| Some((t as usize, *logits.get(t as usize)?))).collect()
        } else {
            Vec::new()
        };
        for (w, &bits) in mask.as_slice().iter().enumerate() {
            if bits == u32::MAX {
                continue;
            }
            let lo = w * 32;
            if lo >= n {
                break;
            }
            for (i, l) in logits[lo..(lo + 32).min(n)].iter_mut().enumerate() {
                if bits & (1 << i) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        for l in logits.iter_mut().skip(self.vocab) {
            *l = f32::NEG_INFINITY;
        }
        for (t, l) in keep {
            logits[t] = l;
        }
        if logits.iter().all(|l| *l == f32::NEG_INFINITY) {
            return Err("structured output: `logit_bias` bans every token the grammar allows here".into());
        }
        Ok(())
    }

    /// Feeds the sampled token to the parser. Returns whether the grammar is complete (nothing
    /// can follow: the output is done).
    pub fn consume(&mut self, t: u32) -> Result<bool, String> {
        self.mask = None;
        self.matcher.consume_token(t).map_err(|e| format!("structured output: {}", bounded(&e.to_string())))?;
        if !self.matcher.is_stopped() {
            return Ok(false);
        }
        match self.matcher.stop_reason() {
            StopReason::NoExtension | StopReason::EndOfSentence => Ok(true),
            other => Err(format!("structured output stopped: {other:?}")),
        }
    }

    /// Whether `tokens` (a finished output) is a complete match: a validator for tests and the
    /// benchmark.
    pub fn accepts(&self, tokens: &[u32]) -> bool {
        let mut m = self.matcher.deep_clone();
        m.consume_tokens(tokens).is_ok() && (m.is_stopped() || m.is_accepting().unwrap_or(false))
    }
}
