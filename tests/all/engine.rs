//! The batching engine on the default model: batched output equals solo output, preemption
//! completes everything correctly, cancellation frees blocks, the prefix cache is reused only
//! for the same adapter, fairness between tenants, overload, and failure isolation.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use openlora::adapters::{AdapterRegistry, WeightedAdapter, synth::random_lora};
use openlora::engine::scheduler::EngineCore;
use openlora::engine::{EngineConfig, EngineError, EngineHandle, Event, FinishReason, Request};
use openlora_kernels::CpuBackend;
use openlora_tests::{default_model, example};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

type B = CpuBackend;

/// Eight adapters for the default model: the three examples and five synthetic rank-8 ones.
fn adapters() -> Vec<WeightedAdapter<B>> {
    let lm = default_model();
    let reg = AdapterRegistry::new(lm.model.config.clone(), CpuBackend::new());
    let mut out = Vec::new();
    for name in ["caps", "signature", "pirate"] {
        let a = reg.load_dir(name, &example("adapters").join(name)).expect("example adapter");
        out.push(WeightedAdapter { adapter: a, weight: 1.0 });
    }
    for i in 0..5 {
        let a = reg
            .insert(&format!("synth{i}"), &random_lora(&format!("synth{i}"), &lm.model.config, 8, i))
            .expect("synth");
        out.push(WeightedAdapter { adapter: a, weight: 1.0 });
    }
    out
}

fn chat(q: &str) -> Vec<u32> {
    let text = format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    default_model().tokenizer.encode(&text, true).expect("encode")
}

const QUESTIONS: [&str; 11] = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Name three colors.",
    "How do birds fly?",
    "Tell me a joke about cats.",
    "What is 12 times 7?",
    "Describe a sunset in one sentence.",
    "Why is the sky blue?",
    "Give me a tip for learning Rust.",
    "What do pandas eat?",
    "Summarize the plot of Cinderella.",
];

fn request(i: usize, adapters: &[WeightedAdapter<B>], max_tokens: usize) -> Request<B> {
    let mut r = Request::greedy(chat(QUESTIONS[i % QUESTIONS.len()]), max_tokens);
    if let Some(id) = default_model().tokenizer.token_to_id("<|im_end|>") {
        r.stop_token_ids.push(id);
    }
    if !i.is_multiple_of(9) {
        r.adapters = vec![adapters[i % adapters.len()].clone()];
    }
    r.tenant = format!("t{}", i % 3);
    r
}

fn core(cfg: EngineConfig) -> EngineCore<B> {
    EngineCore::new(default_model().clone(), cfg, Arc::new(AtomicUsize::new(0))).expect("engine")
}

/// Runs `reqs` to completion on a core (synchronously); returns each request's tokens, finish
/// reason and cached tokens, and the step at which each finished.
fn run_core(core: &mut EngineCore<B>, reqs: Vec<Request<B>>) -> Vec<(Vec<u32>, FinishReason, usize, usize)> {
    let mut rxs: Vec<UnboundedReceiver<Event>> = Vec::new();
    for (i, r) in reqs.into_iter().enumerate() {
        let (tx, rx) = unbounded_channel();
        core.add(i as u64 + 1000, r, tx);
        rxs.push(rx);
    }
    let mut out: Vec<(Vec<u32>, Option<FinishReason>, usize, usize)> = vec![(Vec::new(), None, 0, 0); rxs.len()];
    let mut step = 0;
    loop {
        for (o, rx) in out.iter_mut().zip(rxs.iter_mut()) {
            while let Ok(e) = rx.try_recv() {
                match e {
                    Event::Token { id, .. } => o.0.push(id),
                    Event::Finished { reason, usage, .. } => {
                        o.1 = Some(reason);
                        o.2 = usage.cached_tokens;
                        o.3 = step;
                    }
                    Event::Failed(e) => panic!("request failed: {e}"),
                    Event::PromptLogprobs(_) => {}
                }
            }
        }
        if !core.has_work() {
            break;
        }
        core.step();
        step += 1;
        assert!(step < 10_000, "the engine made no progress");
    }
    out.into_iter().map(|(t, r, c, s)| (t, r.expect("finished"), c, s)).collect()
}

fn solo(req: Request<B>) -> Vec<u32> {
    let mut c = core(EngineConfig { num_blocks: 64, prefix_cache: false, ..EngineConfig::default() });
    run_core(&mut c, vec![req]).remove(0).0
}

#[test]
fn greedy_output_is_the_same_alone_and_inside_a_busy_mixed_adapter_batch() {
    let ads = adapters();
    let n = 33;
    let max_tokens = 20;
    let alone: Vec<Vec<u32>> = (0..n).map(|i| solo(request(i, &ads, max_tokens))).collect();
    // All 33 at once (8 adapters and the base in every step), with the prefix cache on.
    let mut c = core(EngineConfig { num_blocks: 512, ..EngineConfig::default() });
    let batched = run_core(&mut c, (0..n).map(|i| request(i, &ads, max_tokens)).collect());
    for (i, (a, b)) in alone.iter().zip(batched.iter()).enumerate() {
        assert_eq!(
            a,
            &b.0,
            "request {i} (adapter {:?}) differs in the batch",
            request(i, &ads, 1).adapters.first().map(|a| a.adapter.name.clone())
        );
    }
    // The adapters do change the outputs (the batch is not trivially all-base).
    let distinct: std::collections::HashSet<&Vec<u32>> = alone[..9].iter().collect();
    assert!(distinct.len() >= 8, "adapters should change the output");
    let s = c.stats();
    assert!(s.steps < (n * max_tokens) as u64 / 4, "{} steps: requests were not batched", s.steps);
    assert_eq!(s.kv_blocks_used, 0);
}

#[test]
fn a_pool_too_small_for_everyone_preempts_and_still_completes_every_request_correctly() {
    let ads = adapters();
    let n = 10;
    let alone: Vec<Vec<u32>> = (0..n).map(|i| solo(request(i, &ads, 24))).collect();
    // Each request needs 3-4 blocks of 16; 10 of them cannot all fit in 12.
    let mut c = core(EngineConfig { num_blocks: 12, max_batch_tokens: 64, ..EngineConfig::default() });
    let got = run_core(&mut c, (0..n).map(|i| request(i, &ads, 24)).collect());
    for (i, (a, b)) in alone.iter().zip(got.iter()).enumerate() {
        assert_eq!(a, &b.0, "request {i} after preemption");
    }
    let s = c.stats();
    assert!(s.preemptions > 0, "the pool was big enough; no preemption happened");
    assert_eq!(s.requests_finished, n as u64);
    assert_eq!(s.kv_blocks_used, 0);
}

#[test]
fn the_prefix_cache_skips_a_repeated_system_prompt_but_never_crosses_adapters() {
    let ads = adapters();
    let tok = &default_model().tokenizer;
    let system = "You are a helpful assistant for a bakery. ".repeat(12);
    let prompt = |q: &str| {
        tok.encode(
            &format!(
                "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
            ),
            true,
        )
        .expect("encode")
    };
    let with = |q: &str, adapter: Option<usize>| {
        let mut r = Request::greedy(prompt(q), 12);
        r.adapters = adapter.map(|i| vec![ads[i].clone()]).unwrap_or_default();
        r
    };
    let mut c = core(EngineConfig { num_blocks: 256, ..EngineConfig::default() });
    let first = run_core(&mut c, vec![with("Do you sell rye bread?", Some(2))]).remove(0);
    assert_eq!(first.2, 0);
    let before = c.stats().prefill_tokens_computed;
    let second_req = with("When do you open?", Some(2));
    let second_len = second_req.prompt.len();
    let second = run_core(&mut c, vec![second_req]).remove(0);
    let computed = c.stats().prefill_tokens_computed - before;
    let system_tokens = prompt("").len();
    assert!(
        second.2 >= system_tokens - 16 && second.2.is_multiple_of(16),
        "cached {} of a {system_tokens}-token system prompt",
        second.2
    );
    assert_eq!(computed as usize, second_len - second.2, "only the new tokens are prefilled");
    // The reused keys and values give the same output as computing everything.
    assert_eq!(second.0, solo(with("When do you open?", Some(2))));
    // Another adapter, or the base model, never reuses the entry.
    let other = run_core(&mut c, vec![with("When do you open?", Some(3))]).remove(0);
    assert_eq!(other.2, 0, "another adapter reused the cache");
    let base = run_core(&mut c, vec![with("When do you open?", None)]).remove(0);
    assert_eq!(base.2, 0, "the base model reused an adapter's cache");
}

#[test]
fn a_flooding_tenant_does_not_starve_the_others() {
    let ads = adapters();
    let mut c = core(EngineConfig { num_blocks: 256, max_running: 2, ..EngineConfig::default() });
    let mut reqs = Vec::new();
    for i in 0..20 {
        let mut r = request(i, &ads, 8);
        r.tenant = "flood".into();
        reqs.push(r);
    }
    for i in 0..2 {
        let mut r = request(i, &ads, 8);
        r.tenant = "quiet".into();
        reqs.push(r);
    }
    let got = run_core(&mut c, reqs);
    let mut flood_done: Vec<usize> = got[..20].iter().map(|g| g.3).collect();
    flood_done.sort_unstable();
    for g in &got[20..] {
        // Submitted after all 20 flooding requests, yet done before the flood's fourth.
        assert!(g.3 <= flood_done[3], "quiet tenant finished at step {} (flood: {flood_done:?})", g.3);
    }
}

fn handle(cfg: EngineConfig) -> EngineHandle<B> {
    EngineHandle::spawn(default_model().clone(), cfg).expect("engine")
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn cancelling_half_the_streams_frees_their_blocks() {
    let ads = adapters();
    let h = handle(EngineConfig { num_blocks: 256, ..EngineConfig::default() });
    let baseline = h.stats().kv_blocks_used;
    let mut streams: Vec<_> = (0..12)
        .map(|i| {
            let mut r = request(i, &ads, 400);
            r.stop_token_ids.clear();
            r.stop_at_eos = false;
            h.submit(r).expect("submit")
        })
        .collect();
    // Every stream has produced a token: all are running and hold blocks.
    for s in streams.iter_mut() {
        assert!(matches!(s.blocking_next(), Some(Event::Token { .. })));
    }
    // Stats are published after each step: wait until they show all twelve admitted and
    // holding three blocks each on average, so cancelling six frees far more than the other six
    // can grow (one block per 16 steps each) while the cancellations are processed.
    wait_until("twelve running", || {
        let s = h.stats();
        s.running == 12 && s.kv_blocks_used >= 36
    });
    let busy = h.stats().kv_blocks_used;
    assert!(busy > baseline);
    // Cancel half explicitly (their streams end with `cancelled`) and drop the others' streams.
    let keep = streams.split_off(6);
    for mut s in streams {
        s.cancel();
        let mut last = None;
        while let Some(e) = s.blocking_next() {
            last = Some(e);
        }
        assert!(matches!(last, Some(Event::Finished { reason: FinishReason::Cancelled, .. })), "{last:?}");
    }
    wait_until("six cancellations", || h.stats().requests_cancelled == 6);
    let half = h.stats().kv_blocks_used;
    assert!(half < busy, "cancelling freed nothing ({half} of {busy} blocks in use)");
    drop(keep);
    wait_until("all blocks back", || {
        let s = h.stats();
        s.requests_cancelled == 12 && s.running == 0
    });
    assert_eq!(h.stats().kv_blocks_used, baseline);
}

#[test]
fn a_full_queue_is_refused_as_overloaded_and_accepted_requests_complete() {
    let ads = adapters();
    let h = handle(EngineConfig { num_blocks: 64, max_running: 1, max_waiting: 2, ..EngineConfig::default() });
    let mut accepted = Vec::new();
    let mut overloaded = 0;
    for i in 0..6 {
        match h.submit(request(i, &ads, 32)) {
            Ok(s) => accepted.push(s),
            Err(EngineError::Overloaded { limit, .. }) => {
                assert_eq!(limit, 2);
                overloaded += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(overloaded >= 3, "{overloaded} refused of 6 with 1 running and 2 waiting allowed");
    for s in accepted {
        let c = s.collect_blocking().expect("completes");
        assert!(!c.tokens.is_empty());
    }
    // Bad requests are refused at once with the reason.
    let mut r = request(0, &ads, 4);
    r.prompt = vec![];
    assert!(matches!(h.submit(r), Err(EngineError::Invalid(m)) if m.contains("empty")));
    let mut r = request(0, &ads, 4);
    r.prompt.push(10_000_000);
    assert!(matches!(h.submit(r), Err(EngineError::Invalid(m)) if m.contains("vocabulary")));
}

#[test]
fn a_request_whose_computation_fails_fails_alone() {
    let ads = adapters();
    // An adapter for another model (the tiny fixture's shapes) makes this request's LoRA step fail.
    let tiny = openlora::model::config::LlamaConfig::from_hf_config(
        &openlora_tests::fixture("tiny-llama").join("config.json"),
    )
    .expect("config");
    let wrong = AdapterRegistry::new(tiny, CpuBackend::new())
        .load_dir("wrong", &openlora_tests::fixture("lora/tiny-llama-adapters/r4_all"))
        .expect("tiny adapter");
    let h = handle(EngineConfig { num_blocks: 128, ..EngineConfig::default() });
    let good: Vec<_> = (0..4).map(|i| h.submit(request(i + 1, &ads, 8)).expect("submit")).collect();
    let mut bad = request(0, &ads, 8);
    bad.adapters = vec![WeightedAdapter { adapter: wrong, weight: 1.0 }];
    let bad = h.submit(bad).expect("submit");
    match bad.collect_blocking() {
        Err(EngineError::Failed(m)) => assert!(!m.is_empty()),
        other => panic!("the broken request should fail: {other:?}"),
    }
    for (i, s) in good.into_iter().enumerate() {
        let c = s.collect_blocking().expect("others complete");
        assert_eq!(c.tokens, solo(request(i + 1, &ads, 8)), "request {i}");
    }
    // The engine keeps serving.
    assert!(h.submit(request(5, &ads, 2)).expect("submit").collect_blocking().is_ok());
}

/// Regression (multi-tenant trust, hole 9): finite but huge adapter weights (|w| ~ 1e30 passes
/// the NaN check) gave NaN logits, and the sampler silently picked token 0. Such a request now
/// fails with an error naming the adapter; the others in its batch are unaffected.
#[test]
fn huge_adapter_weights_fail_the_request_naming_the_adapter() {
    let ads = adapters();
    let mut host = random_lora("overflow", &default_model().model.config, 8, 99);
    for m in host.layers.iter_mut().flat_map(|l| l.iter_mut().flatten()) {
        m.a.iter_mut().chain(m.b.iter_mut()).for_each(|w| *w *= 1e30);
    }
    assert!(host.layers[0][0].as_ref().expect("q").a.iter().all(|w| w.is_finite()));
    let huge = AdapterRegistry::new(default_model().model.config.clone(), CpuBackend::new())
        .insert("overflow", &host)
        .expect("finite weights load");
    let h = handle(EngineConfig { num_blocks: 128, ..EngineConfig::default() });
    let good: Vec<_> = (0..3).map(|i| h.submit(request(i + 1, &ads, 6)).expect("submit")).collect();
    let mut bad = request(0, &ads, 6);
    bad.adapters = vec![WeightedAdapter { adapter: huge, weight: 1.0 }];
    match h.submit(bad).expect("submit").collect_blocking() {
        Err(EngineError::Failed(m)) => assert!(m.contains("overflow") && m.contains("non-finite"), "{m}"),
        other => panic!("the overflowing request should fail: {other:?}"),
    }
    for (i, s) in good.into_iter().enumerate() {
        assert_eq!(s.collect_blocking().expect("others complete").tokens, solo(request(i + 1, &ads, 6)));
    }
}

/// `logit_bias` is per row: in one batch, a request that bans every token of the greedy answer
/// (and samples hot) never produces one of them, while its neighbours, which ban nothing,
/// still decode exactly their solo output.
#[test]
fn a_banned_token_never_appears_and_bias_stays_in_its_own_row() {
    let ads = adapters();
    let greedy = solo(request(0, &ads, 12));
    let mut banned: Vec<u32> = greedy.clone();
    banned.sort_unstable();
    banned.dedup();
    let hot = |seed: u64| {
        let mut r = request(0, &ads, 12);
        r.logit_bias = banned.iter().map(|&t| (t, -100.0)).collect();
        r.sampling =
            openlora::engine::sampler::SamplingParams { temperature: 1.5, seed: Some(seed), ..Default::default() };
        r
    };
    let mut c = core(EngineConfig { num_blocks: 256, ..EngineConfig::default() });
    let mut reqs: Vec<Request<B>> = (0..6).map(hot).collect();
    reqs.push(request(0, &ads, 12));
    reqs.push(request(3, &ads, 12));
    let out = run_core(&mut c, reqs);
    for (i, o) in out[..6].iter().enumerate() {
        assert!(!o.0.is_empty(), "request {i} produced nothing");
        let hit: Vec<u32> = o.0.iter().copied().filter(|t| banned.contains(t)).collect();
        assert!(hit.is_empty(), "request {i} produced banned tokens {hit:?}");
    }
    assert_eq!(out[6].0, greedy, "an unbiased neighbour decodes its solo output");
    assert_eq!(out[7].0, solo(request(3, &ads, 12)));
    // A positive bias is added too: +100 on one token makes greedy decoding repeat it.
    let forced = default_model().tokenizer.encode(" Hello", false).expect("encode")[0];
    let mut r = request(0, &ads, 5);
    r.logit_bias = vec![(forced, 100.0)];
    assert_eq!(solo(r), vec![forced; 5]);
}

/// `min_tokens`: the end-of-turn token that ends a short answer is masked until the choice
/// has that many tokens; a request without it ends where the model does.
#[test]
fn min_tokens_holds_off_the_end_of_turn_and_stop_strings() {
    let ads = adapters();
    let mut short = request(0, &ads, 64);
    short.adapters.clear();
    let plain = run_core(&mut core(EngineConfig { num_blocks: 64, ..EngineConfig::default() }), vec![short]).remove(0);
    assert_eq!(plain.1, FinishReason::Stop);
    let n = plain.0.len();
    assert!(n < 40, "the greedy answer ends early ({n} tokens)");
    let end = default_model().tokenizer.token_to_id("<|im_end|>").expect("end-of-turn");
    let mut long = request(0, &ads, 64);
    long.adapters.clear();
    long.min_tokens = n + 8;
    // A stop string the answer contains ("Paris") does not end it before min_tokens either.
    long.stop = vec!["Paris".into()];
    let held = run_core(&mut core(EngineConfig { num_blocks: 64, ..EngineConfig::default() }), vec![long]).remove(0);
    assert!(held.0.len() >= n + 8, "{} tokens, asked for at least {}", held.0.len(), n + 8);
    assert!(!held.0[..n + 7].contains(&end), "the end-of-turn token came before min_tokens");
    assert!(default_model().tokenizer.eos_ids().iter().all(|e| !held.0[..n + 7].contains(e)));
}
