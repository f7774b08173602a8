//! Structured output on the default model, at the engine: the grammar engine's view of the
//! vocabulary matches the tokenizer, every constrained output matches its constraint (JSON
//! schema, JSON object, regex, choice, Lark) at high temperatures and beside free rows and
//! adapters in one batch, free rows are bit-identical with and without constrained neighbours,
//! preemption keeps a constrained row's output, and a row whose `logit_bias` bans everything its
//! grammar allows fails alone.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use openlora::adapters::{AdapterRegistry, WeightedAdapter, synth::random_lora};
use openlora::engine::grammar::{Constraint, ConstraintSpec, Grammar, GrammarEnv};
use openlora::engine::sampler::SamplingParams;
use openlora::engine::scheduler::EngineCore;
use openlora::engine::{EngineConfig, EngineStats, Event, FinishReason, Request};
use openlora_kernels::CpuBackend;
use openlora_tests::default_model;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

type B = CpuBackend;

fn env() -> &'static GrammarEnv {
    static ENV: std::sync::OnceLock<GrammarEnv> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let lm = default_model();
        GrammarEnv::new(Arc::new(lm.tokenizer.clone()), lm.model.config.vocab_size).expect("grammar env")
    })
}

fn spec(c: Constraint) -> ConstraintSpec {
    ConstraintSpec { constraint: c, whitespace_pattern: None }
}

fn compile(c: Constraint) -> Grammar {
    env().compile(&spec(c)).expect("compiles")
}

fn chat(q: &str) -> Vec<u32> {
    let text = format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    default_model().tokenizer.encode(&text, true).expect("encode")
}

fn im_end() -> u32 {
    default_model().tokenizer.token_to_id("<|im_end|>").expect("<|im_end|>")
}

/// A chat request, sampled at `temperature` with `seed`, constrained by `c` if given.
fn request(q: &str, c: Option<&Constraint>, temperature: f32, seed: u64, max_tokens: usize) -> Request<B> {
    let mut r = Request::greedy(chat(q), max_tokens);
    r.stop_token_ids.push(im_end());
    r.sampling = SamplingParams { temperature, seed: Some(seed), ..SamplingParams::default() };
    r.grammar = c.map(|c| Box::new(compile(c.clone())));
    r
}

/// What one request produced: its tokens and text, and how it ended (Err: it failed).
type Outcome = Result<(Vec<u32>, String, FinishReason), String>;

fn run(cfg: EngineConfig, reqs: Vec<Request<B>>) -> Vec<Outcome> {
    run_stats(cfg, reqs).0
}

fn run_stats(cfg: EngineConfig, reqs: Vec<Request<B>>) -> (Vec<Outcome>, EngineStats) {
    let mut core = EngineCore::new(default_model().clone(), cfg, Arc::new(AtomicUsize::new(0))).expect("engine");
    let mut rxs: Vec<UnboundedReceiver<Event>> = Vec::new();
    for (i, r) in reqs.into_iter().enumerate() {
        let (tx, rx) = unbounded_channel();
        core.add(i as u64 + 1, r, tx);
        rxs.push(rx);
    }
    let mut out: Vec<(Vec<u32>, String, Option<Outcome>)> = vec![(Vec::new(), String::new(), None); rxs.len()];
    let mut steps = 0;
    loop {
        for (o, rx) in out.iter_mut().zip(rxs.iter_mut()) {
            while let Ok(e) = rx.try_recv() {
                match e {
                    Event::Token { id, text, .. } => {
                        o.0.push(id);
                        o.1.push_str(&text);
                    }
                    Event::Finished { text, reason, .. } => {
                        o.1.push_str(&text);
                        o.2 = Some(Ok((o.0.clone(), o.1.clone(), reason)));
                    }
                    Event::Failed(e) => o.2 = Some(Err(e.to_string())),
                    Event::PromptLogprobs(_) => {}
                }
            }
        }
        if !core.has_work() {
            break;
        }
        core.step();
        steps += 1;
        assert!(steps < 20_000, "the engine made no progress");
    }
    let stats = core.stats();
    assert_eq!(stats.kv_blocks_used, 0);
    (out.into_iter().map(|(_, _, o)| o.expect("every request ended")).collect(), stats)
}

fn cfg() -> EngineConfig {
    EngineConfig { num_blocks: 512, prefix_cache: false, ..EngineConfig::default() }
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "city": {"enum": ["Paris", "London", "Tokyo"]},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}
        },
        "required": ["name", "age", "city"],
        "additionalProperties": false
    })
}

/// An independent check of [`person_schema`] (not the grammar engine's own).
fn is_person(v: &Value) -> bool {
    let Some(o) = v.as_object() else { return false };
    let known = ["name", "age", "city", "tags"];
    o.keys().all(|k| known.contains(&k.as_str()))
        && o.get("name").and_then(Value::as_str).is_some_and(|s| s.chars().count() <= 24)
        && o.get("age").and_then(Value::as_u64).is_some_and(|a| a <= 150)
        && o.get("city").and_then(Value::as_str).is_some_and(|c| ["Paris", "London", "Tokyo"].contains(&c))
        && o.get("tags").is_none_or(|t| t.as_array().is_some_and(|a| a.len() <= 3 && a.iter().all(Value::is_boolean)))
}

#[test]
fn the_grammar_engine_spells_every_token_as_the_tokenizer_decodes_it() {
    let lm = default_model();
    let tok = &lm.tokenizer;
    let e = env();
    let mut checked = 0;
    for id in 0..tok.vocab_size() as u32 {
        let bytes = e.token_bytes(id);
        if tok.is_eos(id) || Some(id) == tok.bos_id() || id == im_end() {
            assert_eq!(bytes.first(), Some(&0xFF), "special token {id} is not marked special");
            continue;
        }
        let text = tok.decode(&[id], false).expect("decode");
        if text.contains('\u{FFFD}') {
            continue; // a partial UTF-8 sequence: the decoder cannot show its bytes
        }
        if bytes.first() == Some(&0xFF) {
            continue; // another control token
        }
        assert_eq!(bytes, text.as_bytes(), "token {id} ({text:?})");
        checked += 1;
    }
    assert!(checked > 40_000, "only {checked} tokens compared");
    // Ids past the tokenizer (the logits row may be longer) are never allowed.
    for id in tok.vocab_size()..lm.model.config.vocab_size {
        assert!(e.token_bytes(id as u32).is_empty(), "padding id {id} has bytes");
    }
}

#[test]
fn bad_constraints_are_refused_before_the_engine() {
    let bad = [
        Constraint::Regex("(unclosed".into()),
        Constraint::Lark("start: missing_rule".into()),
        Constraint::JsonSchema(
            json!({"type": "object", "properties": {"d": {"type": "string", "format": "no-such-format"}}}),
        ),
        Constraint::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})),
        Constraint::JsonSchema(json!({"type": "object", "x-guidance": {"lenient": true}})),
    ];
    for c in bad {
        let e = env().compile(&spec(c.clone())).expect_err(&format!("{c:?} compiled"));
        assert!(!e.is_empty() && e.len() < 700, "{c:?}: {e}");
    }
}

#[test]
fn every_constrained_output_matches_its_constraint_beside_free_rows_and_adapters() {
    let lm = default_model();
    let reg = AdapterRegistry::new(lm.model.config.clone(), CpuBackend::new());
    let adapters: Vec<WeightedAdapter<B>> = (0..3)
        .map(|i| WeightedAdapter {
            adapter: reg
                .insert(&format!("s{i}"), &random_lora(&format!("s{i}"), &lm.model.config, 8, i))
                .expect("synth"),
            weight: 1.0,
        })
        .collect();
    let regex = r"[0-9]{3}-[0-9]{4}";
    let lark = r#"start: "The answer is " ANSWER "."
ANSWER: /(yes|no|[0-9]+)/"#;
    let cases: Vec<(&str, Constraint)> = vec![
        ("Describe a person as JSON with name, age and city.", Constraint::JsonSchema(person_schema())),
        ("Give me a JSON object about cats.", Constraint::JsonObject),
        ("What is a phone number?", Constraint::Regex(regex.into())),
        ("Is the sky blue?", Constraint::Choice(vec!["yes".into(), "no".into(), "maybe".into()])),
        ("How many legs does a spider have?", Constraint::Lark(lark.into())),
    ];
    let full_regex = regex::Regex::new(&format!("^(?:{regex})$")).expect("regex");
    let mut reqs = Vec::new();
    let mut expect = Vec::new();
    for (k, (q, c)) in cases.iter().enumerate() {
        for (j, temperature) in [1.0f32, 1.5].into_iter().enumerate() {
            for seed in 0..4u64 {
                let mut r = request(q, Some(c), temperature, seed * 7 + k as u64, 80);
                if seed % 2 == 1 {
                    r.adapters = vec![adapters[(seed as usize + j) % adapters.len()].clone()];
                }
                reqs.push(r);
                expect.push(Some(k));
            }
        }
        // A free row beside them, same prompt.
        reqs.push(request(q, None, 1.0, k as u64, 24));
        expect.push(None);
    }
    let out = run(cfg(), reqs);
    let mut stopped = vec![0usize; cases.len()];
    for (o, k) in out.iter().zip(&expect) {
        let (tokens, text, reason) = o.as_ref().expect("no request fails");
        let Some(k) = *k else { continue };
        // Every output is a prefix the grammar accepts; a finished one is a whole match.
        let g = compile(cases[k].1.clone());
        if *reason != FinishReason::Stop {
            assert_eq!(*reason, FinishReason::Length, "case {k}: {text:?}");
            continue;
        }
        stopped[k] += 1;
        assert!(!tokens.contains(&im_end()), "case {k}: the end-of-turn token is in {text:?}");
        assert!(g.accepts(tokens), "case {k}: the grammar does not accept its own output {text:?}");
        match &cases[k].1 {
            Constraint::JsonSchema(_) => {
                let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                assert!(is_person(&v), "not a person: {text}");
            }
            Constraint::JsonObject => {
                let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                assert!(v.is_object(), "{text}");
            }
            Constraint::Regex(_) => assert!(full_regex.is_match(text), "{text:?}"),
            Constraint::Choice(c) => assert!(c.contains(text), "{text:?}"),
            Constraint::Lark(_) => {
                let n = text.strip_prefix("The answer is ").and_then(|t| t.strip_suffix('.')).unwrap_or("?");
                assert!(n == "yes" || n == "no" || n.chars().all(|c| c.is_ascii_digit()), "{text:?}")
            }
        }
    }
    // The bounded constraints always finish; JSON at temperature 1.5 may run to max_tokens.
    assert_eq!(stopped[2], 8, "every regex output finished");
    assert_eq!(stopped[3], 8, "every choice output finished");
    // (Any JSON object at these temperatures often rambles on: fewer of those finish.)
    assert!(stopped[0] >= 4 && stopped[1] >= 2 && stopped[4] >= 4, "finished: {stopped:?}");
}

#[test]
fn a_finished_grammar_ends_the_row_at_once_and_greedy_choice_is_deterministic() {
    let c = Constraint::Choice(vec!["Paris".into(), "London".into(), "Berlin".into()]);
    let a = run(cfg(), vec![request("What is the capital of France?", Some(&c), 0.0, 0, 16)]);
    let (tokens, text, reason) = a[0].clone().expect("ok");
    assert_eq!(reason, FinishReason::Stop);
    assert!(["Paris", "London", "Berlin"].contains(&text.as_str()), "{text:?}");
    // No end-of-sequence step after the grammar completed: the tokens are exactly the text's.
    assert_eq!(default_model().tokenizer.decode(&tokens, false).expect("decode"), text);
    let again = run(cfg(), vec![request("What is the capital of France?", Some(&c), 0.0, 9, 16)]);
    assert_eq!(again[0].clone().expect("ok").1, text, "greedy is deterministic under a grammar");
}

#[test]
fn free_rows_are_bit_identical_with_and_without_constrained_neighbours() {
    // Greedy: batches of other shapes may round the logits differently (the kernels are not
    // batch-invariant), which a sampled row can feel; a mask applied to the wrong row cannot
    // hide from greedy decoding.
    let free = |i: u64| {
        request(["Name three colors.", "Why is the sky blue?", "Tell me a joke."][i as usize % 3], None, 0.0, i, 24)
    };
    let alone = run(cfg(), (0..6).map(free).collect());
    let mut mixed: Vec<Request<B>> = (0..6).map(free).collect();
    for i in 0..6 {
        let c = if i % 2 == 0 {
            Constraint::JsonSchema(person_schema())
        } else {
            Constraint::Regex("[a-z ]{1,40}\\.".into())
        };
        mixed.insert(i * 2, request("Describe someone.", Some(&c), 1.0, 100 + i as u64, 40));
    }
    let together = run(cfg(), mixed);
    let free_together: Vec<&Outcome> = together.iter().skip(1).step_by(2).collect();
    for (i, (a, b)) in alone.iter().zip(free_together).enumerate() {
        assert_eq!(a, b, "free request {i} changed beside constrained rows");
    }
}

#[test]
fn preemption_keeps_a_constrained_rows_output() {
    let c = Constraint::JsonSchema(person_schema());
    let reqs = || (0..8u64).map(|i| request("Describe a person as JSON.", Some(&c), 1.0, i, 48)).collect::<Vec<_>>();
    let roomy = run(cfg(), reqs());
    let tight_cfg =
        EngineConfig { num_blocks: 10, max_batch_tokens: 64, prefix_cache: false, ..EngineConfig::default() };
    let (tight, stats) = run_stats(tight_cfg, reqs());
    assert!(stats.preemptions > 0, "the pool was big enough; no preemption happened");
    assert_eq!(roomy, tight, "outputs changed under preemption");
}

#[test]
fn a_logit_bias_that_bans_everything_the_grammar_allows_fails_that_row_only() {
    let tok = &default_model().tokenizer;
    let digits: Vec<u32> = (0..10).map(|d| tok.encode(&d.to_string(), false).expect("encode")[0]).collect();
    let mut banned = request("Pick a digit.", Some(&Constraint::Regex("[0-9]".into())), 1.0, 1, 8);
    banned.logit_bias = digits.iter().map(|&t| (t, -100.0)).collect();
    let free = request("Pick a digit.", None, 1.0, 1, 8);
    let out = run(cfg(), vec![banned, free]);
    let e = out[0].clone().expect_err("the banned row fails");
    assert!(e.contains("logit_bias"), "{e}");
    assert!(out[1].is_ok(), "the free row beside it completes");
}
