//! The 8-bit-activation path (`engine.cpu_activations = "int8"`) against the f32 reference on
//! the default model: how far its logits move, and whether the greedy texts of the reference
//! prompts change. The tolerances here are the ones ARCHITECTURE.md and BENCHMARKS.md state.

use std::sync::Arc;

use openlora::engine::{EngineConfig, EngineHandle, Event, Request};
use openlora::model::LoadedModel;
use openlora_kernels::CpuBackend;
use openlora_tests::{all_logits, default_model, default_model_int8, json_fixture};

/// The int8 backend really runs the packed kernels (its name says so), so the comparisons
/// below compare two different paths.
#[test]
fn the_int8_model_runs_the_packed_kernels() {
    assert!(default_model_int8().model.backend().int8(), "the int8 model's backend runs f32");
    assert!(!default_model().model.backend().int8());
}

/// `KL(p || q)` of the softmaxes of two logit rows.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let lse = |v: &[f32]| {
        let mx = v.iter().fold(f32::MIN, |a, &b| a.max(b));
        f64::from(mx) + v.iter().map(|x| f64::from(x - mx).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter().zip(q).map(|(&a, &b)| (f64::from(a) - lp).exp() * ((f64::from(a) - lp) - (f64::from(b) - lq))).sum()
}

/// Logits of the reference prompts at every position (2026-12-03, 50 positions: logits worst
/// 1.85 and mean 0.23 apart; KL(f32 || int8) worst 0.017, mean 0.004; the same best token at
/// 48 of 50). Asserted: KL under 0.05 everywhere and 0.01 on average, no logit more than 2.5
/// apart, the best token kept at 90% of positions and wherever the f32 path's top two are more
/// than 0.5 apart. The f32 path itself is within 2e-2 of transformers (`default_model.rs`).
#[test]
fn int8_logits_stay_near_the_f32_reference() {
    let fx = json_fixture("smollm2-logits.json");
    let (mut worst, mut mean, mut count, mut same_top) = (0f32, 0f64, 0usize, 0usize);
    let (mut worst_kl, mut mean_kl) = (0f64, 0f64);
    let mut positions = 0usize;
    for p in fx["prompts"].as_array().expect("prompts") {
        let tokens: Vec<u32> = serde_json::from_value(p["tokens"].clone()).expect("tokens");
        let want = all_logits(default_model(), &tokens);
        let got = all_logits(default_model_int8(), &tokens);
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            let mut diff = 0f32;
            for (a, b) in g.iter().zip(w) {
                assert!(a.is_finite(), "{:?} position {pos}: non-finite logit", p["text"]);
                diff = diff.max((a - b).abs());
                mean += f64::from((a - b).abs());
            }
            count += g.len();
            worst = worst.max(diff);
            let ours = openlora_kernels::cpu::ops::argmax(g).expect("argmax");
            let theirs = openlora_kernels::cpu::ops::argmax(w).expect("argmax");
            let mut sorted = w.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 0.5 {
                assert_eq!(ours, theirs, "{:?} position {pos}: best token moved", p["text"]);
            }
            same_top += usize::from(ours == theirs);
            let k = kl(w, g);
            assert!(k < 0.05, "{:?} position {pos}: KL(f32 || int8) = {k}", p["text"]);
            worst_kl = worst_kl.max(k);
            mean_kl += k;
            positions += 1;
        }
    }
    let mean_kl = mean_kl / positions as f64;
    eprintln!(
        "int8 vs f32: logits worst {worst:.3}, mean {:.4}; KL worst {worst_kl:.4}, mean {mean_kl:.4}; same best token at \
         {same_top}/{positions} positions",
        mean / count as f64
    );
    assert!(mean_kl < 0.01, "mean KL(f32 || int8) = {mean_kl}");
    assert!(worst < 2.5, "worst logit difference {worst}");
    assert!(same_top * 10 >= positions * 9, "best token kept at only {same_top}/{positions} positions");
}

/// Where the f32 path's greedy choice is decided by less than this many logits, the int8
/// path may pick the runner-up (its logits move by up to ~2: see above).
const NEAR_TIE: f32 = 0.5;

/// The greedy texts of the reference prompts (MODEL.md's known outputs), through the engine,
/// batched together: the int8 path generates the f32 path's tokens at every step the f32 path
/// decides by at least [`NEAR_TIE`] logits, and at the first step it does not (if any) picks
/// one of the f32 path's two best tokens; after that the texts may part. Measured 2026-12-03:
/// the France and dog texts are identical; the haiku's f32 path ends with `<|im_end|>` by a
/// margin under 0.5 over "\n\n", and int8 sometimes continues there.
#[test]
fn int8_greedy_texts_of_the_reference_prompts_keep_every_decided_token() {
    let lm: Arc<LoadedModel<CpuBackend>> = default_model_int8().clone();
    let cfg = EngineConfig { prefix_cache: false, ..EngineConfig::default() }.with_kv_bytes(&lm.model.config, 32 << 20);
    let engine = EngineHandle::spawn(lm.clone(), cfg).expect("engine");
    let chat = |q: &str| format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    let cases = [
        (chat("What is the capital of France?"), 32, "The capital of France is Paris.", true),
        (chat("Write a haiku about the ocean."), 32, "The ocean's a mirror that reflects the soul's journey.", true),
        (
            "Once upon a time, there was a little dog named".to_owned(),
            16,
            " Max who loved to play with his toy car. One day, he decided to",
            false,
        ),
    ];
    let tok = &lm.tokenizer;
    let im_end = tok.token_to_id("<|im_end|>").expect("<|im_end|>");
    let streams: Vec<_> = cases
        .iter()
        .map(|(prompt, max, _, _)| {
            let mut req = Request::greedy(tok.encode(prompt, true).expect("encode"), *max);
            req.stop_token_ids = vec![im_end];
            engine.submit(req).expect("submit")
        })
        .collect();
    for (mut s, (prompt, _, want, stops)) in streams.into_iter().zip(&cases) {
        let mut got = Vec::new();
        loop {
            match s.blocking_next().expect("the stream ends with Finished") {
                Event::Token { id, .. } => got.push(id),
                Event::Finished { .. } => break,
                Event::Failed(e) => panic!("generation failed: {e}"),
                Event::PromptLogprobs(_) => {}
            }
        }
        // The f32 path's tokens (MODEL.md's text, which default_model.rs checks the f32 engine
        // generates) and, teacher-forced, its margin at every step.
        let prompt_ids = tok.encode(prompt, true).expect("encode");
        let mut want_ids = tok.encode(want, false).expect("encode");
        if *stops {
            want_ids.push(im_end);
        }
        let all: Vec<u32> = prompt_ids.iter().chain(&want_ids).copied().collect();
        let logits = all_logits(default_model(), &all);
        let mut tie = None;
        for (i, &w) in want_ids.iter().enumerate() {
            let row = &logits[prompt_ids.len() - 1 + i];
            let best = openlora_kernels::cpu::ops::argmax(row).expect("argmax") as u32;
            assert_eq!(best, w, "{prompt:?} step {i}: the teacher-forced f32 path is MODEL.md's text");
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] < NEAR_TIE {
                let second = row.iter().position(|&v| v == sorted[1]).expect("runner-up") as u32;
                tie = Some((i, second, sorted[0] - sorted[1]));
                break;
            }
        }
        let decided = tie.map_or(want_ids.len(), |(i, _, _)| i);
        eprintln!(
            "{prompt:?}: int8 {:?}; f32 decides {decided} of {} steps (near tie: {tie:?})",
            tok.decode(&got, false),
            want_ids.len()
        );
        assert!(
            got.len() >= decided && got[..decided] == want_ids[..decided],
            "{prompt:?}: int8 {got:?} vs f32 {want_ids:?}"
        );
        if let Some((i, second, _)) = tie {
            assert!(
                got.len() > i && (got[i] == want_ids[i] || got[i] == second),
                "{prompt:?} step {i}: int8 picked {:?}",
                got.get(i)
            );
        } else {
            assert_eq!(got, want_ids, "{prompt:?}");
        }
    }
}
