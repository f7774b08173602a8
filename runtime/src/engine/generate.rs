//! One sequence from prompt to finish: chunked prefill, decode, sampling, stop conditions and
//! streaming text. The CLI's `generate` uses it directly; the batching engine reuses its pieces
//! (stop detection, incremental text) per sequence.

use openlora_kernels::{AttnSeq, Backend};

use crate::adapters::WeightedAdapter;

use super::kv_cache::{BlockAllocator, SequenceBlocks};
use super::sampler::{Sampler, SamplingParams};
use crate::model::error::{ModelError, Result};
use crate::model::llama::{ForwardBatch, LlamaModel};
use crate::model::tokenizer::{IncrementalDecoder, TextTokenizer};

/// Tokens per KV block.
pub const BLOCK_SIZE: usize = 16;
/// Longest prefill chunk run in one forward call.
pub const PREFILL_CHUNK: usize = 512;

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

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Strings that end generation; the text returned stops before them.
    pub stop: Vec<String>,
    /// Whether end-of-sequence tokens end generation (true unless a caller wants raw output).
    pub stop_at_eos: bool,
}

/// The outcome of one generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated token ids (after the prompt, including a final EOS if one was produced).
    pub tokens: Vec<u32>,
    /// Generated text, stopped before any stop string, without special tokens.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Seconds spent in prefill (first token included).
    pub prefill_seconds: f64,
    /// Seconds spent decoding after the first token.
    pub decode_seconds: f64,
}

/// Finds stop strings in streamed text and decides how much text is safe to emit: anything that
/// could still be the start of a stop string is held back.
#[derive(Debug, Default)]
pub struct StopChecker {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopChecker {
    /// A checker for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), text: String::new(), emitted: 0 }
    }

    /// Adds `piece`; returns the newly safe text and whether a stop string was hit (in which
    /// case the text is cut before it).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let search_from = self.text.len().saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        self.text.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[floor_char(&self.text, search_from)..]
                    .find(s.as_str())
                    .map(|i| i + floor_char(&self.text, search_from))
            })
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            let out = self.text[self.emitted.min(at)..].to_owned();
            self.emitted = self.text.len();
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut safe = self.text.len();
        for s in &self.stops {
            for l in (1..s.len()).rev() {
                if self.text.len() >= l
                    && self.text.is_char_boundary(self.text.len() - l)
                    && s.as_bytes().starts_with(&self.text.as_bytes()[self.text.len() - l..])
                {
                    safe = safe.min(self.text.len() - l);
                    break;
                }
            }
        }
        let out = if safe > self.emitted { self.text[self.emitted..safe].to_owned() } else { String::new() };
        self.emitted = self.emitted.max(safe);
        (out, false)
    }

    /// Text held back at the end (emitted when generation ends without a stop string).
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_owned();
        self.emitted = self.text.len();
        out
    }

    /// All text so far (cut at a stop string if one was hit).
    pub fn text(&self) -> &str {
        &self.text
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Generates for one sequence with its own KV pool, applying `adapters` (LoRA terms with
/// weights; empty for the base model) and calling `on_text` with each newly completed piece of
/// text.
pub fn generate<B: Backend>(
    model: &LlamaModel<B>,
    tokenizer: &TextTokenizer,
    adapters: &[WeightedAdapter<B>],
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let cfg = &model.config;
    if req.prompt.is_empty() {
        return Err(ModelError::InvalidRequest("the prompt is empty".into()));
    }
    let ctx = cfg.max_position_embeddings;
    if req.prompt.len() >= ctx {
        return Err(ModelError::InvalidRequest(format!(
            "the prompt has {} tokens; the model's context is {ctx}",
            req.prompt.len()
        )));
    }
    let total = (req.prompt.len() + req.max_tokens).min(ctx);
    let mut alloc = BlockAllocator::new(total.div_ceil(BLOCK_SIZE), BLOCK_SIZE);
    let mut kv = model.alloc_kv(model.kv_layout(alloc.num_blocks(), BLOCK_SIZE))?;
    let mut seq = SequenceBlocks::default();
    let mut sampler = Sampler::new(req.sampling.clone(), &req.prompt);
    let mut decoder = IncrementalDecoder::new(tokenizer);
    let mut stops = StopChecker::new(&req.stop);
    let eos: Vec<u32> = tokenizer.eos_ids().to_vec();

    let start = std::time::Instant::now();
    let mut run = |tokens: &[u32], seq: &mut SequenceBlocks, alloc: &mut BlockAllocator| -> Result<Vec<f32>> {
        let first_pos = seq.len();
        let slots = seq.append(alloc, tokens.len()).map_err(|e| ModelError::InvalidRequest(e.to_string()))?;
        let positions: Vec<u32> = (first_pos..first_pos + tokens.len()).map(|p| p as u32).collect();
        let seqs = [AttnSeq { q_start: 0, q_len: tokens.len(), ctx_len: seq.len(), block_table: seq.table() }];
        let last = [tokens.len() as u32 - 1];
        model.forward(
            &mut kv,
            &ForwardBatch {
                tokens,
                positions: &positions,
                slots: &slots,
                seqs: &seqs,
                logits_rows: &last,
                adapters: &[adapters],
            },
        )
    };
    let mut logits = Vec::new();
    for chunk in req.prompt.chunks(PREFILL_CHUNK) {
        logits = run(chunk, &mut seq, &mut alloc)?;
    }
    let mut prefill_seconds = 0.0;
    let mut tokens = Vec::new();
    let mut finish = FinishReason::Length;
    let mut stop_string_hit = false;
    while tokens.len() < req.max_tokens && seq.len() < ctx {
        let t = sampler.sample(&mut logits);
        if tokens.is_empty() {
            prefill_seconds = start.elapsed().as_secs_f64();
        }
        tokens.push(t);
        if req.stop_at_eos && eos.contains(&t) {
            finish = FinishReason::Stop;
            break;
        }
        let piece = decoder.push(t)?;
        let (out, hit) = stops.push(&piece);
        if !out.is_empty() {
            on_text(&out);
        }
        if hit {
            finish = FinishReason::Stop;
            stop_string_hit = true;
            break;
        }
        if tokens.len() >= req.max_tokens || seq.len() >= ctx {
            break;
        }
        logits = run(&[t], &mut seq, &mut alloc)?;
    }
    if !stop_string_hit {
        // Bytes the decoder held back (an incomplete character at the very end), then text
        // the stop checker held back as a possible stop-string prefix.
        let tail = decoder.finish()?;
        let (mut rest, _) = stops.push(&tail);
        rest.push_str(&stops.flush());
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    seq.free(&mut alloc);
    Ok(Generation {
        text: stops.text().to_owned(),
        tokens,
        finish_reason: finish,
        prompt_tokens: req.prompt.len(),
        prefill_seconds,
        decode_seconds: start.elapsed().as_secs_f64() - prefill_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool, String) {
        let mut c = StopChecker::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = String::new();
        for p in pieces {
            let (o, hit) = c.push(p);
            out.push_str(&o);
            if hit {
                return (out, true, c.text().to_owned());
            }
        }
        out.push_str(&c.flush());
        (out, false, c.text().to_owned())
    }

    #[test]
    fn stop_string_split_across_pieces_is_cut_and_never_emitted() {
        let (out, hit, text) = run(&["STOP"], &["hello S", "TO", "P world"]);
        assert!(hit);
        assert_eq!(out, "hello ");
        assert_eq!(text, "hello ");
    }

    #[test]
    fn held_back_prefix_is_flushed_when_no_stop_follows() {
        let (out, hit, _) = run(&["STOP"], &["a ST", "x"]);
        assert!(!hit);
        assert_eq!(out, "a STx");
        let (out, _, _) = run(&["STOP"], &["end ST"]);
        assert_eq!(out, "end ST");
    }

    #[test]
    fn multibyte_text_before_a_stop_is_kept_whole() {
        let (out, hit, _) = run(&["\n\n"], &["héllo wörld", "\n", "\nmore"]);
        assert!(hit);
        assert_eq!(out, "héllo wörld");
    }
}
