//! The default model (SmolLM2-135M-Instruct Q4_1) against independent references: HF
//! transformers' logits on the same weights dequantized, HF's tokenizer and chat template, and
//! the known greedy outputs in MODEL.md.

use std::sync::OnceLock;

use openlora::engine::sampler::SamplingParams;
use openlora::engine::{EngineConfig, EngineHandle, Event, FinishReason, Request};
use openlora::model::chat_template::ChatMessage;
use openlora_kernels::CpuBackend;
use openlora_tests::{default_model, json_fixture};

/// Logits at every position of `tokens` on the f32 default model.
fn all_logits(tokens: &[u32]) -> Vec<Vec<f32>> {
    openlora_tests::all_logits(default_model(), tokens)
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
            Event::PromptLogprobs(_) => {}
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

/// vLLM's `prompt_logprobs` through the engine: every prompt token scored, against HF
/// transformers' logits at each position (the fixture's top 20), computed in chunks over
/// several steps, beside a request that does not ask, and with the prefix cache on (a cached
/// prompt still gets every score: scoring requests take no cache hit).
#[test]
fn prompt_logprobs_match_transformers_in_chunks_and_past_the_prefix_cache() {
    let fx = json_fixture("smollm2-logits.json");
    let cfg = EngineConfig {
        prefix_cache: true,
        block_size: 4,
        max_batch_tokens: 5,
        max_running: 4,
        ..EngineConfig::default()
    }
    .with_kv_bytes(&default_model().model.config, 32 << 20);
    let engine = EngineHandle::spawn(default_model().clone(), cfg).expect("engine");
    let scored = |tokens: &[u32]| {
        let mut req = Request::greedy(tokens.to_vec(), 2);
        req.prompt_logprobs = Some(5);
        // Submitted together, so that they share steps.
        let plain = engine.submit(Request::greedy(tokens.to_vec(), 2)).expect("submit");
        let got = engine.submit(req).expect("submit").collect_blocking().expect("scored request");
        let plain = plain.collect_blocking().expect("plain request");
        assert_eq!(plain.prompt_logprobs, None, "a request that did not ask gets no prompt scores");
        (got.prompt_logprobs.expect("prompt logprobs"), got.tokens, plain.tokens)
    };
    for p in fx["prompts"].as_array().expect("prompts") {
        let tokens: Vec<u32> = serde_json::from_value(p["tokens"].clone()).expect("tokens");
        let top: Vec<Vec<(u32, f32)>> = serde_json::from_value(p["top"].clone()).expect("top");
        for round in 0..2 {
            // Round 1 finds the prompt's blocks cached by round 0.
            let (lps, ours, plain) = scored(&tokens);
            assert_eq!(ours, plain, "scoring the prompt does not change what is generated");
            assert_eq!(lps.len(), tokens.len() - 1, "round {round}: one score per prompt token after the first");
            for (j, lp) in lps.iter().enumerate() {
                let want = &top[j];
                assert_eq!(lp.token, tokens[j + 1], "position {j} scores the next prompt token");
                assert!(lp.logprob <= 0.0 && lp.rank >= 1, "{lp:?}");
                assert_eq!(lp.top.len(), 5);
                assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "alternatives most likely first: {lp:?}");
                // Differences of log-probabilities are differences of logits: the reference's.
                let best = want[0];
                if want[0].1 - want[1].1 > 4e-2 {
                    assert_eq!(lp.top[0].0, best.0, "round {round} position {j}: the most likely token");
                }
                if let Some(r) = want.iter().position(|&(t, _)| t == lp.token) {
                    let d = (lp.logprob - lp.top[0].1) - (want[r].1 - best.1);
                    assert!(d.abs() < 4e-2, "round {round} position {j}: {lp:?} vs the reference {want:?}");
                    let tied = want.iter().filter(|&&(_, l)| (l - want[r].1).abs() < 4e-2).count();
                    if tied == 1 {
                        assert_eq!(lp.rank, r + 1, "round {round} position {j}: rank of the prompt token");
                    }
                } else {
                    // Not in the reference's top 20: no likelier than its 20th.
                    let last = want[want.len() - 1].1 - best.1;
                    assert!(lp.logprob - lp.top[0].1 < last + 4e-2, "round {round} position {j}: {lp:?} vs {want:?}");
                }
                if lp.rank == 1 {
                    assert_eq!(lp.logprob, lp.top[0].1, "the most likely token is its own first alternative");
                }
            }
        }
    }
}

/// The path a GPU takes: greedy and top-k rows come back reduced (argmax, top k) instead of
/// whole, everything else whole. Forced on the CPU, it generates exactly the tokens the whole
/// rows do, for a batch mixing every kind of request, and is counted.
#[test]
fn reduced_logits_rows_sample_the_tokens_whole_rows_do() {
    let lm = default_model();
    let prompt = |q: &str| {
        let m = [ChatMessage::new("user", q)];
        lm.tokenizer.encode(&lm.chat_template.render(&m, true).expect("render"), false).expect("encode")
    };
    let requests = || {
        let seeded = |top_k, temperature, seed| SamplingParams {
            temperature,
            top_k,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        let mut v = Vec::new();
        for (i, q) in ["What is the capital of France?", "Name a colour.", "Count to five."].iter().enumerate() {
            let p = prompt(q);
            v.push(Request::greedy(p.clone(), 12)); // argmax
            let mut r = Request::greedy(p.clone(), 12);
            r.sampling = seeded(5, 0.9, 40 + i as u64); // top-5
            v.push(r);
            let mut r = Request::greedy(p.clone(), 12);
            r.sampling = seeded(0, 0.9, 50 + i as u64); // every logit
            v.push(r);
            let mut r = Request::greedy(p.clone(), 12);
            r.logprobs = Some(2); // reads every logit
            v.push(r);
            let mut r = Request::greedy(p.clone(), 12);
            r.sampling.presence_penalty = 0.5; // edits logits
            v.push(r);
            let mut r = Request::greedy(p, 12);
            r.min_tokens = 6; // bans end-of-sequence for 6 tokens, then reduced
            v.push(r);
        }
        v
    };
    let run_all = |force_reduced_rows: bool| {
        let cfg = EngineConfig { prefix_cache: false, force_reduced_rows, ..EngineConfig::default() }
            .with_kv_bytes(&lm.model.config, 32 << 20);
        let engine = EngineHandle::spawn(lm.clone(), cfg).expect("engine");
        // Submitted together, so that reduced and whole rows share steps.
        let streams: Vec<_> = requests().into_iter().map(|r| engine.submit(r).expect("submit")).collect();
        let out: Vec<Vec<u32>> = streams.into_iter().map(|s| s.collect_blocking().expect("generate").tokens).collect();
        (out, engine.stats().reduced_rows)
    };
    let (whole, none) = run_all(false);
    let (reduced, counted) = run_all(true);
    assert_eq!(none, 0, "the CPU backend keeps every row whole");
    // 3 prompts x (12 greedy + 12 top-5 + 6 after min_tokens) rows at most; each ends early
    // only at end-of-sequence.
    assert!(counted >= 3 * (2 + 2), "reduced rows were used: {counted}");
    for (i, (w, r)) in whole.iter().zip(&reduced).enumerate() {
        assert_eq!(w, r, "request {i}: reduced rows change what is generated");
    }
}

/// A chat template that renders tools (tests/fixtures/tool-template) renders tools, calls and
/// results byte for byte as HF transformers' `apply_chat_template(messages, tools=...)` does; the
/// default model's template does not read `tools` (so `tool_format = "auto"` picks Hermes text).
#[test]
fn a_tool_template_renders_tools_calls_and_results_as_transformers() {
    use openlora::model::chat_template::ChatTemplate;
    let src = std::fs::read_to_string(openlora_tests::fixture("tool-template/template.jinja")).expect("template");
    let t = ChatTemplate::new(&src, "", "<|im_end|>").expect("compiles");
    assert!(t.renders_tools());
    assert!(!default_model().chat_template.renders_tools(), "SmolLM2's template has no tools");
    let fx = json_fixture("tool-template/rendered.json");
    for case in fx["cases"].as_array().expect("cases") {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["template_messages"].clone()).expect("messages");
        let tools = Some(&case["tools"]).filter(|v| !v.is_null());
        let got = t.render_with_tools(&messages, tools, true).expect("render");
        assert_eq!(got, case["rendered"].as_str().expect("rendered"), "case {}", case["name"]);
    }
}
