//! Data-level attribution end to end: an adapter whose manifest names its dataset files gets
//! them indexed when it is registered; every receipt of a request it serves carries the
//! verbatim-overlap evidence of the answer (spans, documents, owners, the index roots), signed
//! and chained; the payments move towards the contributors quoted; and the verifier
//! (`verify_evidence`, what `openlora ledger verify-evidence` runs) reproduces every receipt's
//! evidence from the data alone, and refuses a wrong output, prompt or dataset.

use std::sync::Arc;
use std::time::Duration;

use openlora::adapters::catalog::{SaveDtype, write_peft};
use openlora::adapters::manifest::{Contributor, Dataset};
use openlora::adapters::synth::random_lora;
use openlora::attribution::Receipt;
use openlora::attribution::evidence::{EvidenceParams, Source, evidence, evidence_weights, verify_evidence};
use openlora::attribution::index::{Corpus, DatasetIndex, IndexState};
use openlora::attribution::receipt::text_sha256;
use openlora::service::{GenerateRequest, PromptInput, Service, ServingBackend, Tenant};

use crate::trust::Node;

const PROMPTS: [&str; 6] = [
    "The old lighthouse keeper",
    "Deep in the forest there was",
    "My grandmother's recipe for bread",
    "The spaceship landed quietly",
    "Every morning the baker",
    "In the year 3000, cities",
];

/// Greedy completions of `prompt` by `model`, with the receipt id.
fn complete(svc: &Arc<Service<ServingBackend>>, model: &str, prompt: &str) -> (String, Option<String>) {
    complete_n(svc, model, prompt, 40)
}

/// Greedy completion of `prompt` by `model` of exactly `n` tokens, with the receipt id.
fn complete_n(svc: &Arc<Service<ServingBackend>>, model: &str, prompt: &str, n: usize) -> (String, Option<String>) {
    let mut r = GenerateRequest::new(model, PromptInput::Text(prompt.into()));
    r.max_tokens = Some(n);
    r.ignore_eos = true;
    let t = Arc::new(Tenant::anonymous());
    let j = svc.generate(&t, r).expect("generate");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let mut c = rt.block_on(j.collect()).expect("collect");
    (c.texts.remove(0), c.receipt)
}

fn manifest(dataset: Option<(&str, &str)>) -> String {
    let mut m = String::from("owner = \"studio\"\nprice_per_1k_tokens = 4000\n");
    if let Some((file, bytes)) = dataset {
        m.push_str(&format!(
            "[[datasets]]\nid = \"stories\"\nsha256 = \"{}\"\nfiles = [{file:?}]\ncontributors = [{{ name = \"ann\", share = 1 }}, {{ name = \"bob\", share = 1 }}, {{ name = \"cy\", share = 2 }}]\n",
            text_sha256(bytes)
        ));
    }
    m
}

#[test]
fn receipts_carry_evidence_that_anyone_holding_the_data_can_verify() {
    let root = tempfile::tempdir().expect("tmp");
    let dir = root.path().join("storyteller");
    let base = openlora_tests::default_model().model.config.clone();
    write_peft(&dir, &random_lora("storyteller", &base, 4, 22), SaveDtype::F32, "smollm2").expect("adapter");
    std::fs::write(dir.join("openlora.toml"), manifest(None)).expect("manifest");

    // 1. What the adapter answers (its manifest names no files yet: no evidence, as before).
    let node = Node::start_with("", root.path());
    let answers: Vec<String> = PROMPTS.iter().map(|p| complete(&node.svc, "storyteller", p).0).collect();
    let first = node.ledger();
    assert!(first.iter().all(|r| r.get("evidence").is_none()), "{first:?}");
    drop(node);

    // 2. Its dataset: the answers to prompts 0..4 as documents of ann, bob, cy, ann (prompt 4's
    // answer is not in the data, prompt 5's is in it without an owner), with filler, one
    // document copied 100 times, and a copy of the owner-less one.
    let owners = ["ann", "bob", "cy", "ann"];
    let mut lines = String::new();
    for (i, o) in owners.iter().enumerate() {
        lines.push_str(
            &serde_json::json!({"contributor": o, "text": format!("Chapter {i}. {}", answers[i])}).to_string(),
        );
        lines.push('\n');
    }
    for _ in 0..100 {
        lines.push_str(
            &serde_json::json!({"contributor": "bob", "text": "A filler line about nothing in particular."})
                .to_string(),
        );
        lines.push('\n');
    }
    lines.push_str(&serde_json::json!({"prompt": "story", "completion": answers[5]}).to_string());
    lines.push('\n');
    std::fs::create_dir_all(dir.join("data")).expect("data dir");
    std::fs::write(dir.join("data/stories.jsonl"), &lines).expect("data");
    std::fs::write(dir.join("openlora.toml"), manifest(Some(("data/stories.jsonl", &lines)))).expect("manifest");

    // 3. A node that registers it indexes the data off the request path, then every receipt
    // of the adapter carries the evidence.
    let node = Node::start_with("", root.path());
    assert!(node.svc.wait_for_indexes(Duration::from_secs(60)), "the index is built");
    let sha = text_sha256(&lines);
    let Some(IndexState::Ready(ix)) = node.svc.dataset_index(&sha) else { panic!("index not ready") };
    assert_eq!((ix.documents, ix.duplicates), (105, 99));
    let mut receipts = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        let (text, id) = complete(&node.svc, "storyteller", p);
        assert_eq!(text, answers[i], "greedy answers repeat");
        let r = node.svc.receipt(&Tenant::anonymous(), &id.expect("receipt")).expect("receipt");
        receipts.push((p, text, r));
    }
    for (i, (_, text, r)) in receipts.iter().enumerate() {
        let ev = r.body.record.evidence.as_ref().expect("evidence");
        assert_eq!(ev.indexes.len(), 1);
        assert_eq!(ev.indexes[0].state, "searched");
        assert_eq!(ev.indexes[0].root.as_deref(), Some(ix.root.as_str()));
        let credited: Vec<Option<&str>> = ev.spans.iter().map(|s| s.owner.as_deref()).collect();
        match i {
            0..4 => {
                assert!(!ev.spans.is_empty(), "answer {i} is in the data: {ev:?}");
                assert!(credited.iter().all(|o| *o == Some(owners[i])), "answer {i}: {credited:?}");
                // The span covers (nearly) the whole answer, and its text is the answer's.
                let words: u32 = ev.spans.iter().map(|s| s.words).sum();
                assert!(words as usize + 2 >= text.split_whitespace().count(), "{words} words of {text:?}");
                let pays = |who: &str| -> u64 {
                    r.body.attribution.payments.iter().filter(|p| p.party == who).map(|p| p.micros).sum()
                };
                let others: u64 =
                    ["ann", "bob", "cy"].iter().filter(|o| **o != owners[i]).map(|o| pays(o)).max().unwrap_or(0);
                assert!(pays(owners[i]) > others, "the quoted contributor earns most: {:?}", r.body.attribution);
            }
            4 => assert!(ev.spans.is_empty(), "answer 4 is not in the data: {ev:?}"),
            _ => {
                assert!(!ev.spans.is_empty() && credited.iter().all(|o| o.is_none()), "{ev:?}");
                assert_eq!(ev.spans[0].doc, 104, "ordinals count every document, copies included");
            }
        }
        assert!(serde_json::to_vec(ev).expect("json").len() < 1500, "compact evidence");
    }

    // 4. The verifier reproduces every receipt's evidence from the data alone.
    let model = &node.svc.model().tokenizer;
    let data = |adapter: &str| (adapter == "storyteller").then(|| dir.clone());
    let key = Some(receipts[0].2.body.node_key.as_str());
    for (p, text, r) in &receipts {
        let prompt = model.decode(&model.encode(p, true).expect("encode"), false).expect("decode");
        let check = verify_evidence(r, key, &prompt, text, &data).expect("verifies");
        assert_eq!(check.spans, r.body.record.evidence.as_ref().map_or(0, |e| e.spans.len()));
        // A different answer, prompt or dataset does not verify.
        let e = verify_evidence(r, key, &prompt, &format!("{text}."), &data).expect_err("output");
        assert!(e.contains("output_sha256"), "{e}");
        let e = verify_evidence(r, key, "another prompt", text, &data).expect_err("prompt");
        assert!(e.contains("prompt_sha256"), "{e}");
    }
    let (p, text, r) = &receipts[0];
    let prompt = model.decode(&model.encode(p, true).expect("encode"), false).expect("decode");
    std::fs::write(dir.join("data/stories.jsonl"), lines.replace("Chapter 0.", "Chapter O.")).expect("tamper");
    let e = verify_evidence(r, key, &prompt, text, &data).expect_err("tampered data");
    assert!(e.contains("SHA-256 of its files"), "{e}");
    let mut forged: Receipt = r.clone();
    if let Some(ev) = forged.body.record.evidence.as_mut() {
        ev.spans[0].owner = Some("mallory".into());
    }
    let e = verify_evidence(&forged, key, &prompt, text, &data).expect_err("forged");
    assert!(e.contains("does not verify"), "{e}");
}

fn index_of(docs: &[(&str, &str)]) -> DatasetIndex {
    let mut lines = String::new();
    for (owner, text) in docs {
        lines.push_str(&serde_json::json!({"contributor": owner, "text": text}).to_string());
        lines.push('\n');
    }
    let mut c = Corpus::default();
    c.add_file("d.jsonl", lines.as_bytes(), &mut Default::default()).expect("reads");
    DatasetIndex::build("d", c).expect("builds")
}

#[test]
fn copying_a_document_100_times_does_not_move_its_owners_share() {
    let a = "the lantern swung above the harbour while the gulls argued over bread";
    let b = "seven copper kettles hung in a row beside the green stove";
    let dataset = Dataset {
        id: "d".into(),
        sha256: "0".repeat(64),
        license: String::new(),
        files: vec!["d.jsonl".into()],
        merkle_root: None,
        contributors: vec![Contributor { name: "ann".into(), share: 1 }, Contributor { name: "bob".into(), share: 1 }],
    };
    let answer = format!("First {a}. Then {b}.");
    let shares = |ix: DatasetIndex| {
        let src = [Source { adapter: "x", dataset: &dataset, state: IndexState::Ready(Arc::new(ix)) }];
        let ev = evidence(&src, &[answer.as_str()], "", &EvidenceParams::default()).expect("evidence");
        let w = evidence_weights(&ev, &|_, _| Some(dataset.clone()));
        let total: u128 = w.iter().map(|x| x.3).sum();
        let ann = w.iter().find(|x| x.2 == "ann").map_or(0, |x| x.3);
        (ann as f64 / total as f64, ev.spans.iter().map(|s| s.count).collect::<Vec<_>>())
    };
    let once = shares(index_of(&[("ann", a), ("bob", b)]));
    let mut docs = vec![("bob", b)];
    docs.extend(std::iter::repeat_n(("ann", a), 100));
    let hundred = shares(index_of(&docs));
    assert!((once.0 - hundred.0).abs() < 0.01, "{once:?} vs {hundred:?}");
    assert_eq!(once.1, hundred.1, "occurrences count unique documents");
    assert!(once.0 > 0.4 && once.0 < 0.7, "both quoted: {once:?}");
}

/// The size bound: a 500-token answer's evidence is about 1 KB. The largest evidence a
/// receipt holds: `max_spans` (8) spans of distinct documents and owners, in a ~500-token answer.
#[test]
fn evidence_of_a_long_answer_with_the_most_spans_is_about_a_kilobyte() {
    let topics = ["harbour", "kettle", "violin", "glacier", "orchard", "lantern", "compass", "meadow"];
    let docs: Vec<(String, String)> = topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                format!("contributor-{i:02}@example.org"),
                format!("the {t} number {i} stood quietly beside a weathered stone wall for years"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = docs.iter().map(|(o, t)| (o.as_str(), t.as_str())).collect();
    let ix = index_of(&refs);
    let mut answer = String::new();
    for (i, (_, t)) in docs.iter().enumerate() {
        for k in 0..30 {
            answer.push_str(&format!("filler{i}x{k} "));
        }
        answer.push_str(t);
        answer.push_str(". ");
    }
    let dataset = Dataset {
        id: "d".into(),
        sha256: "0".repeat(64),
        license: String::new(),
        files: vec!["d.jsonl".into()],
        merkle_root: Some(ix.root.clone()),
        contributors: docs.iter().map(|(o, _)| Contributor { name: o.clone(), share: 1 }).collect(),
    };
    let src =
        [Source { adapter: "adapter-with-a-long-name", dataset: &dataset, state: IndexState::Ready(Arc::new(ix)) }];
    let ev = evidence(&src, &[answer.as_str()], "", &EvidenceParams::default()).expect("evidence");
    assert_eq!(ev.spans.len(), 8, "{ev:?}");
    let bytes = serde_json::to_vec(&ev).expect("json").len();
    eprintln!("evidence of {} words with 8 spans: {bytes} bytes of JSON", answer.split_whitespace().count());
    assert!(bytes <= 1536, "{bytes} bytes: {}", serde_json::to_string(&ev).expect("json"));
}

/// One canary of `tests/fixtures/canary/canaries.json`.
#[derive(serde::Deserialize)]
struct Canary {
    contributor: String,
    opening: String,
    continuation: String,
}

/// The canary test of issue 22: five synthetic contributors each planted four random 12-word
/// passages in one dataset; an adapter memorized them (`tests/fixtures/canary/make_canary.py`).
/// Prompted with each passage's first four words, every 16-token answer (the fixture's
/// protocol: the continuation is 8 words) that reproduces its canary must credit that canary's
/// contributor and nobody else (precision and recall >= 0.99). Longer answers drift from one
/// memorized canary into another contributor's; there every span's owner is checked against
/// the planted documents, read independently of the index. The null test: the base model's
/// answers to the same prompts, matched against the same index, get dataset credit on at most
/// 2% of answers at the default `min_words`; the curve over `min_words` is printed (it is what
/// set the default).
#[test]
fn canaries_credit_their_contributors_and_the_base_model_earns_no_credit() {
    let fixture = openlora_tests::fixture("canary");
    let canaries: Vec<Canary> =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("canaries.json")).expect("canaries")).expect("json");
    assert_eq!(canaries.len(), 20);
    let words = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    // Ground truth for span owners: each contributor's documents, straight from the JSONL.
    let planted: Vec<(String, String)> = std::fs::read_to_string(fixture.join("data/canary.jsonl"))
        .expect("data")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("jsonl");
            (v["contributor"].as_str().expect("owner").to_string(), words(v["text"].as_str().expect("text")))
        })
        .collect();
    let node = Node::start_with("", &fixture);
    assert!(node.svc.wait_for_indexes(Duration::from_secs(60)), "the canary index is built");
    let (mut reproduced, mut credited, mut right, mut right_of_reproduced) = (0, 0, 0, 0);
    let (mut spans, mut spans_right) = (0, 0);
    for c in &canaries {
        for n in [16, 40] {
            let (answer, id) = complete_n(&node.svc, "adapter", &c.opening, n);
            let r = node.svc.receipt(&Tenant::anonymous(), &id.expect("receipt")).expect("receipt");
            let ev = r.body.record.evidence.expect("evidence");
            assert_eq!(ev.indexes[0].state, "searched", "{ev:?}");
            for s in &ev.spans {
                let text = words(&answer[s.start as usize..s.end as usize]);
                let owner = s.owner.as_deref().unwrap_or("");
                spans += 1;
                let ok = planted.iter().any(|(o, t)| o == owner && t.contains(&text));
                spans_right += usize::from(ok);
                if !ok {
                    eprintln!("span {text:?} credited to {owner:?}, whose documents do not hold it");
                }
            }
            if n != 16 {
                continue;
            }
            let owners: std::collections::BTreeSet<&str> = ev.spans.iter().filter_map(|s| s.owner.as_deref()).collect();
            let hit = words(&answer).contains(&c.continuation);
            let correct = owners.len() == 1 && owners.contains(c.contributor.as_str());
            reproduced += usize::from(hit);
            credited += usize::from(!owners.is_empty());
            right += usize::from(correct);
            right_of_reproduced += usize::from(hit && correct);
            if hit != correct {
                eprintln!("canary {:?} -> {answer:?}: credited {owners:?}", c.opening);
            }
        }
    }
    let precision = right as f64 / credited.max(1) as f64;
    let recall = right_of_reproduced as f64 / reproduced.max(1) as f64;
    eprintln!(
        "canaries: {reproduced}/20 reproduced verbatim by the adapter (Q4_1 base) in 16 tokens, {credited} answers credited; precision {precision:.2}, recall {recall:.2}; spans of 16- and 40-token answers whose owner's documents hold them: {spans_right}/{spans}"
    );
    assert!(reproduced >= 10, "the adapter reproduces too few canaries ({reproduced}/20) for the test to mean much");
    assert!(precision >= 0.99 && recall >= 0.99, "precision {precision}, recall {recall}");
    assert!(spans > 0 && spans_right == spans, "{spans_right}/{spans} spans credited to the right owner");

    // The null test, on the base model alone.
    let sha = {
        let m = openlora::adapters::manifest::Manifest::load_for(&fixture.join("adapter")).expect("m").expect("m");
        m.datasets[0].clone()
    };
    let Some(IndexState::Ready(ix)) = node.svc.dataset_index(&sha.sha256) else { panic!("no index") };
    let tok = &node.svc.model().tokenizer;
    let base: Vec<(String, String)> = canaries
        .iter()
        .map(|c| {
            let prompt = tok.decode(&tok.encode(&c.opening, true).expect("encode"), false).expect("decode");
            (prompt, complete(&node.svc, "SmolLM2-135M-Instruct", &c.opening).0)
        })
        .collect();
    let mut curve = Vec::new();
    for min_words in 1..=8u32 {
        let p = EvidenceParams { min_words, ..EvidenceParams::default() };
        let src = [Source { adapter: "adapter", dataset: &sha, state: IndexState::Ready(ix.clone()) }];
        let with_credit = base
            .iter()
            .filter(|(prompt, answer)| {
                evidence(&src, &[answer.as_str()], prompt, &p).is_some_and(|e| !e.spans.is_empty())
            })
            .count();
        curve.push((min_words, with_credit as f64 / base.len() as f64));
    }
    eprintln!("null test (base model, share of answers with dataset credit) by min_words: {curve:?}");
    let default = EvidenceParams::default().min_words;
    let at_default = curve.iter().find(|(m, _)| *m == default).map_or(1.0, |c| c.1);
    assert!(at_default <= 0.02, "the base model gets dataset credit on {at_default} of answers at min_words {default}");
}
