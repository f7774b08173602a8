//! `openlora bench`: single-stream prefill and decode speed, or batched decode over many
//! adapters, measured through the engine (the same scheduler and decode loop as `serve`,
//! without HTTP, plugins or receipts). Prints one JSON line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use openlora::adapters::synth;
use openlora::engine::grammar::{Constraint, ConstraintSpec, Grammar, GrammarEnv};
use openlora::engine::{EngineConfig, EngineHandle, Event, Request};
use openlora::lora::{LoraAdapter, WeightedAdapter};
use openlora::model::{LoadedModel, default_model};
use openlora_kernels::CpuBackend;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Prompt length for the prefill measurement (synthetic token ids, the same formula as
    /// bench/single_stream.py uses for the peer).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode (greedy, EOS ignored).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Repetitions; the best run is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// A GGUF file or an HF folder; the default model when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Activations of the block-quantized matmuls: f32 (the reference) or int8
    /// (`engine.cpu_activations`).
    #[arg(long, default_value = "f32", value_parser = ["f32", "int8"])]
    cpu_activations: String,
    /// Instead of single-stream figures, measure batched decode of this many sequences: base
    /// model only, all rows on one LoRA adapter, and every row on a different one (synthetic
    /// rank-`--lora-rank` adapters on all projections).
    #[arg(long)]
    batch: Option<usize>,
    /// Rank of the synthetic adapters for --batch.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Decode steps timed for --batch.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// With --batch: every row on a different adapter, with none, half and all of the rows
    /// grammar-constrained (the regex `[a-z ,.]+`, which never completes), and the mean time
    /// of one mask. End-of-sequence tokens are banned by `logit_bias` in every row, so each
    /// row decodes all `--steps`.
    #[arg(long)]
    structured: bool,
}

/// The synthetic prompt shared with the peer benchmark: `100 + (i * 7919) % 40000`.
fn bench_prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| 100 + ((i * 7919) % 40000) as u32).collect()
}

/// A request that ignores end-of-sequence tokens (every run generates exactly `max_tokens`).
fn raw(prompt: Vec<u32>, max_tokens: usize, adapters: Vec<WeightedAdapter<CpuBackend>>) -> Request<CpuBackend> {
    let mut r = Request::greedy(prompt, max_tokens);
    r.stop_at_eos = false;
    r.adapters = adapters;
    r
}

/// The engine for `rows` concurrent sequences of up to `tokens` tokens with `waiting` more
/// queued, prefix cache off (a repeated run must compute again). Both benchmarks use it.
pub(super) fn engine(
    loaded: &Arc<LoadedModel<CpuBackend>>,
    rows: usize,
    waiting: usize,
    tokens: usize,
) -> Result<EngineHandle<CpuBackend>> {
    let block = EngineConfig::default().block_size;
    let cfg = EngineConfig {
        max_running: rows.max(1),
        max_waiting: waiting.max(1),
        max_batch_tokens: EngineConfig::default().max_batch_tokens.max(rows * 64),
        prefix_cache: false,
        num_blocks: rows * tokens.div_ceil(block) + rows + 1,
        ..EngineConfig::default()
    };
    Ok(EngineHandle::spawn(loaded.clone(), cfg)?)
}

pub fn run(a: BenchArgs) -> Result<()> {
    super::init_threads(a.threads)?;
    let path = match a.model.clone() {
        Some(p) => p,
        None => default_model::ensure_default_model()?,
    };
    let backend = CpuBackend::new().with_int8(super::cpu_int8_usable(a.cpu_activations == "int8"));
    let loaded = Arc::new(LoadedModel::open(&path, backend).with_context(|| format!("loading {}", path.display()))?);
    if let Some(n) = a.batch {
        if n == 0 {
            bail!("--batch must be at least 1");
        }
        return batch(&a, n, &path, &loaded);
    }
    let e = engine(&loaded, 1, 1, a.prompt_tokens.max(8 + a.gen_tokens) + 1)?;
    let (mut prefill, mut decode) = (0f64, 0f64);
    for _ in 0..a.repeat.max(1) {
        // Prefill: the whole prompt and the first token.
        let t = Instant::now();
        e.submit(raw(bench_prompt(a.prompt_tokens), 1, Vec::new()))?.collect_blocking()?;
        prefill = prefill.max(a.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        // Decode: from the first token to the last.
        let mut s = e.submit(raw(bench_prompt(8), a.gen_tokens, Vec::new()))?;
        let (mut first, mut n) = (None, 0usize);
        while let Some(ev) = s.blocking_next() {
            match ev {
                Event::Token { .. } => {
                    first.get_or_insert_with(Instant::now);
                    n += 1;
                }
                Event::Finished { .. } => break,
                Event::PromptLogprobs(_) => {}
                Event::Failed(err) => return Err(err.into()),
            }
        }
        if let Some(f) = first {
            decode = decode.max(n.saturating_sub(1) as f64 / f.elapsed().as_secs_f64());
        }
    }
    report(
        loaded.model.backend(),
        &path,
        serde_json::json!({
            "prompt_tokens": a.prompt_tokens,
            "prefill_tok_s": prefill,
            "gen_tokens": a.gen_tokens,
            "decode_tok_s": decode,
        }),
    );
    Ok(())
}

/// Prints one JSON line: what ran where (engine, backend, threads, model), then `figures`.
fn report(backend: &CpuBackend, path: &Path, figures: serde_json::Value) {
    let mut line = serde_json::json!({
        "engine": "openlora",
        "backend": openlora_kernels::Backend::name(backend),
        "threads": rayon::current_num_threads(),
        "model": path.display().to_string(),
    });
    if let (Some(l), serde_json::Value::Object(f)) = (line.as_object_mut(), figures) {
        l.extend(f);
    }
    println!("{line}");
}

/// `n` sequences with 32-token prompts through the engine, `steps` decode steps after each
/// one's first token, greedy. Returns generated tokens per second from the moment every
/// sequence has its first token (all prefills done) to the last token.
fn batched_decode(
    e: &EngineHandle<CpuBackend>,
    n: usize,
    steps: usize,
    adapters: &[Vec<WeightedAdapter<CpuBackend>>],
) -> Result<f64> {
    batched_decode_with(e, n, steps, adapters, |_, r| r)
}

/// [`batched_decode`], with `edit` applied to row `i`'s request before it is submitted.
fn batched_decode_with(
    e: &EngineHandle<CpuBackend>,
    n: usize,
    steps: usize,
    adapters: &[Vec<WeightedAdapter<CpuBackend>>],
    edit: impl Fn(usize, Request<CpuBackend>) -> Request<CpuBackend>,
) -> Result<f64> {
    let prompt_len = 32;
    let mut streams = (0..n)
        .map(|i| e.submit(edit(i, raw(bench_prompt(prompt_len + i)[i..].to_vec(), steps + 1, adapters[i].clone()))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = vec![0usize; n];
    let mut done = vec![false; n];
    let mut t0 = None;
    let mut decoded = 0usize;
    // The engine advances every row by one token per step, so reading round-robin keeps pace.
    while done.iter().any(|d| !d) {
        for (i, s) in streams.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match s.blocking_next() {
                Some(Event::Token { .. }) => {
                    seen[i] += 1;
                    if t0.is_some() {
                        decoded += 1;
                    }
                    if seen[i] == 1 && seen.iter().all(|&k| k >= 1) {
                        t0 = Some(Instant::now());
                    }
                }
                Some(Event::Finished { .. }) | None => done[i] = true,
                Some(Event::Failed(err)) => return Err(err.into()),
                Some(Event::PromptLogprobs(_)) => {}
            }
        }
    }
    let t0 = t0.context("no sequence produced a token")?;
    Ok(decoded as f64 / t0.elapsed().as_secs_f64())
}

fn batch(a: &BenchArgs, n: usize, path: &Path, loaded: &Arc<LoadedModel<CpuBackend>>) -> Result<()> {
    let model = &loaded.model;
    let synth: Vec<WeightedAdapter<CpuBackend>> = (0..n)
        .map(|i| {
            let h = synth::random_lora(&format!("synth-{i}"), &model.config, a.lora_rank, i as u64);
            LoraAdapter::prepare(&h, model.backend()).map(|a| WeightedAdapter { adapter: Arc::new(a), weight: 1.0 })
        })
        .collect::<Result<_, _>>()?;
    let base: Vec<Vec<WeightedAdapter<CpuBackend>>> = vec![vec![]; n];
    let same: Vec<Vec<WeightedAdapter<CpuBackend>>> = vec![vec![synth[0].clone()]; n];
    let distinct: Vec<Vec<WeightedAdapter<CpuBackend>>> = synth.iter().map(|w| vec![w.clone()]).collect();
    let e = engine(loaded, n, n, 32 + n + a.steps + 2)?;
    if a.structured {
        return structured(a, n, path, loaded, &e, &distinct);
    }
    let (mut b, mut s, mut d) = (0f64, 0f64, 0f64);
    for _ in 0..a.repeat.max(1) {
        b = b.max(batched_decode(&e, n, a.steps, &base)?);
        s = s.max(batched_decode(&e, n, a.steps, &same)?);
        d = d.max(batched_decode(&e, n, a.steps, &distinct)?);
    }
    report(
        model.backend(),
        path,
        serde_json::json!({
            "batch": n,
            "lora_rank": a.lora_rank,
            "steps": a.steps,
            "base_tok_s": b,
            "one_adapter_tok_s": s,
            "distinct_adapters_tok_s": d,
            "lora_overhead_distinct": 1.0 - d / b,
        }),
    );
    Ok(())
}

/// `--batch N --structured`: distinct adapters with 0%, 50% and 100% of the rows constrained.
fn structured(
    a: &BenchArgs,
    n: usize,
    path: &Path,
    loaded: &Arc<LoadedModel<CpuBackend>>,
    e: &EngineHandle<CpuBackend>,
    distinct: &[Vec<WeightedAdapter<CpuBackend>>],
) -> Result<()> {
    let tok = &loaded.tokenizer;
    let env = GrammarEnv::new(Arc::new(tok.clone()), loaded.model.config.vocab_size).map_err(anyhow::Error::msg)?;
    let no_eos: Vec<(u32, f32)> = tok.eos_ids().iter().map(|&t| (t, -100.0)).collect();
    let mut rows = Vec::new();
    for (name, constraint) in [
        ("regex [a-z ,.]+", Constraint::Regex("[a-z ,.]+".into())),
        // A JSON list of objects that never closes: JSON-schema masks, every step.
        (
            "lark: an unclosed JSON list of {name: string, n: integer}",
            Constraint::Lark(
                r#"start: "[" item (", " item)*
item: %json{"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}, "required": ["name", "n"], "additionalProperties": false}"#
                    .into(),
            ),
        ),
    ] {
        let grammar = env.compile(&ConstraintSpec { constraint, whitespace_pattern: None }).map_err(anyhow::Error::msg)?;
        let (best, mask_us) = structured_runs(a, n, e, distinct, &grammar, &no_eos)?;
        rows.push(serde_json::json!({
            "constraint": name,
            "distinct_free_tok_s": best[0],
            "distinct_half_constrained_tok_s": best[1],
            "distinct_all_constrained_tok_s": best[2],
            "constrained_cost_all": 1.0 - best[2] / best[0],
            "mean_mask_us": mask_us,
        }));
    }
    report(
        loaded.model.backend(),
        path,
        serde_json::json!({
            "batch": n,
            "lora_rank": a.lora_rank,
            "steps": a.steps,
            "structured": rows,
        }),
    );
    Ok(())
}

/// Best tokens/s with none, half and all rows under `grammar`, and the mean mask time (µs).
fn structured_runs(
    a: &BenchArgs,
    n: usize,
    e: &EngineHandle<CpuBackend>,
    distinct: &[Vec<WeightedAdapter<CpuBackend>>],
    grammar: &Grammar,
    no_eos: &[(u32, f32)],
) -> Result<([f64; 3], f64)> {
    let mut best = [0f64; 3];
    let mut mask_us = 0f64;
    for _ in 0..a.repeat.max(1) {
        for (k, every) in [0usize, 2, 1].into_iter().enumerate() {
            let before = e.stats();
            let tps = batched_decode_with(e, n, a.steps, distinct, |i, mut r| {
                r.stop_at_eos = true;
                r.logit_bias = no_eos.to_vec();
                if every > 0 && i % every == 0 {
                    r.grammar = Some(Box::new(grammar.clone()));
                }
                r
            })?;
            best[k] = best[k].max(tps);
            let after = e.stats();
            let masks = after.grammar_masks - before.grammar_masks;
            if k == 2 && masks > 0 {
                mask_us = (after.grammar_mask_ns - before.grammar_mask_ns) as f64 / masks as f64 / 1e3;
            }
        }
    }
    Ok((best, mask_us))
}
