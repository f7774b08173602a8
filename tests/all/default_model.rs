//! The default model (SmolLM2-135M-Instruct Q4_1) against independent references: HF
//! transformers' logits on the same weights dequantized, HF's tokenizer and chat template, and
//! the known greedy outputs in MODEL.md.

use std::sync::OnceLock;

use openlora::engine::kv_cache::{BlockAllocator, SequenceBlocks};
use openlora::engine::sampler::SamplingParams;
use openlora::engine::{EngineConfig, EngineHandle, Event, FinishReason, Request};
use openlora::model::chat_template::ChatMessage;
use openlora::model::llama::ForwardBatch;
use openlora_kernels::{AttnSeq, CpuBackend};
use openlora_tests::{default_model, json_fixture};

/// Logits at every position of `tokens`, prefilled in one forward call.
fn all_logits(tokens: &[u32]) -> Vec<Vec<f32>> {
    let m = &default_model().model;
    let mut alloc = BlockAllocator::new(16, 16);
    let mut kv = m.alloc_kv(m.kv_layout(16, 16)).expect("kv");
    let mut seq = SequenceBlocks::default();
    let slots = seq.append(&mut alloc, tokens.len()).expect("blocks");
    let positions: Vec<u32> = (0..tokens.len() as u32).collect();
    let seqs = [AttnSeq { q_start: 0, q_len: tokens.len(), ctx_len: tokens.len(), block_table: seq.table() }];
    let logits = m
        .forward(
            &mut kv,
            &ForwardBatch {
                tokens,
                positions: &positions,
                slots: &slots,
                seqs: &seqs,
                logits_rows: &positions,
                adapters: &[],
            },
        )
        .expect("forward");
    logits.chunks(m.config.vocab_size).map(<[f32]>::to_vec).collect()
}

#[test]
fn logits_match_transformers_on_the_dequantized_weights() {
    let fx = json_fixture("smollm2-logits.json");
    let prompts = fx["prompts"].as_array().expect("prompts");
    let mut worst = 0f32;
    for p in prompts {
        let tokens: Vec<u32> = serde_json::from_value(p["tokens"].clone()).expect("tokens");
        let top: Vec<Vec<(u32, f32)>> = serde_json::from_value(p["top"].clone()).expect("top");
        let got = all_logits(&tokens);
        for (pos, (g, want)) in got.iter().zip(&top).enumerate() {
            for &(id, logit) in want {
                let d = (g[id as usize] - logit).abs();
                worst = worst.max(d);
                assert!(d < 2e-2, "{:?} position {pos} token {id}: {} vs {logit}", p["text"], g[id as usize]);
            }
            // The reference's best token is ours too, unless the top two are within tolerance.
            let ours = openlora_kernels::cpu::ops::argmax(g).expect("argmax") as u32;
            if want[0].1 - want[1].1 > 4e-2 {
                assert_eq!(ours, want[0].0, "{:?} position {pos}", p["text"]);
            }
        }
    }
    eprintln!("worst logit difference against transformers: {worst}");
}

#[test]
fn tokenizer_matches_hf_on_tricky_texts() {
    let tok = &default_model().tokenizer;
    let fx = json_fixture("smollm2-tokenizer.json");
    for case in fx.as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
        let got = tok.encode(text, false).expect("encode");
        assert_eq!(got, want, "encoding {text:?}");
        assert_eq!(tok.decode(&got, false).expect("decode"), text, "decoding {text:?}");
    }
}

#[test]
fn chat_template_renders_byte_for_byte_as_transformers() {
    let t = &default_model().chat_template;
    let fx = json_fixture("smollm2-chat.json");
    for case in fx["cases"].as_array().expect("cases") {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).expect("messages");
        let agp = case["add_generation_prompt"].as_bool().expect("bool");
        let got = t.render(&messages, agp).expect("render");
        assert_eq!(got, case["rendered"].as_str().expect("rendered"), "messages {messages:?}");
    }
}

/// One request through the engine (the only decode loop): its text as streamed, its tokens
/// and why it ended.
fn run(req: Request<CpuBackend>) -> (String, Vec<u32>, FinishReason) {
    static ENGINE: OnceLock<EngineHandle<CpuBackend>> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| {
        let cfg = EngineConfig { prefix_cache: false, ..EngineConfig::default() }
            .with_kv_bytes(&default_model().model.config, 32 << 20);
        EngineHandle::spawn(default_model().clone(), cfg).expect("engine")
    });
    let mut s = engine.submit(req).expect("submit");
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(e) = s.blocking_next() {
        match e {
            Event::Token { id, text: piece, .. } => {
                tokens.push(id);
                text.push_str(&piece);
            }
            Event::Finished { text: rest, reason, .. } => {
                text.push_str(&rest);
                return (text, tokens, reason);
            }
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("the stream ended without finishing")
}

fn greedy(prompt: &str, max_tokens: usize) -> (String, FinishReason) {
    let lm = default_model();
    let tok = &lm.tokenizer;
    let mut req = Request::greedy(tok.encode(prompt, true).expect("encode"), max_tokens);
    req.stop_token_ids = tok.token_to_id("<|im_end|>").into_iter().collect();
    let (text, tokens, finish) = run(req);
    // The streamed pieces add up to the decoded tokens (without the final stop token).
    let shown: Vec<u32> =
        tokens.iter().copied().filter(|t| !tok.is_eos(*t) && tok.token_to_id("<|im_end|>") != Some(*t)).collect();
    assert_eq!(text, tok.decode(&shown, true).expect("decode"), "streamed text equals the decoded tokens");
    (text, finish)
}

fn chat(q: &str) -> String {
    format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
}

#[test]
fn greedy_outputs_match_the_known_completions() {
    let (text, finish) = greedy(&chat("What is the capital of France?"), 32);
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(finish, FinishReason::Stop);
    let (text, _) = greedy(&chat("Write a haiku about the ocean."), 32);
    assert_eq!(text, "The ocean's a mirror that reflects the soul's journey.");
    let (text, finish) = greedy("Once upon a time, there was a little dog named", 16);
    assert_eq!(text, " Max who loved to play with his toy car. One day, he decided to");
    assert_eq!(finish, FinishReason::Length);
}

#[test]
fn stop_strings_cut_the_text_and_seeds_repeat() {
    let lm = default_model();
    let tok = &lm.tokenizer;
    let prompt = tok.encode("Once upon a time, there was a little dog named", true).expect("encode");
    let mut req = Request::greedy(prompt.clone(), 16);
    req.stop = vec![" toy".into()];
    let (text, _, finish) = run(req);
    assert_eq!(text, " Max who loved to play with his");
    assert_eq!(finish, FinishReason::Stop);

    let sampled = |seed: u64| {
        let mut req = Request::greedy(prompt.clone(), 16);
        req.sampling = SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(seed), ..Default::default() };
        run(req).1
    };
    let (a, b) = (sampled(1234), sampled(1234));
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, sampled(99), "another seed gives another sample");
}
