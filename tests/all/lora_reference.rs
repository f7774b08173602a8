//! LoRA against HF PEFT (fixtures from `tests/fixtures/lora/make_lora_fixtures.py`): single
//! adapters (ranks 2-8, rsLoRA, rank/alpha patterns, LM-head LoRA), mixed-adapter batches as
//! PEFT's `adapter_names=` runs them, every `add_weighted_adapter` combination type, and the
//! default model with a rank-4 adapter. Tolerance: max abs logit difference 1e-4 in f32 (2e-3
//! for SVD merges, whose factors come from a different SVD routine; 2e-2 on the default model's
//! 30 layers, as for its base logits).

use std::sync::Arc;

use openlora::adapters::merge::{MajoritySign, MergeMethod, MergeRecipe, merge};
use openlora::adapters::{LoraAdapter, LoraHost, WeightedAdapter};
use openlora::engine::kv_cache::{BlockAllocator, SequenceBlocks};
use openlora::model::config::LlamaConfig;
use openlora::model::llama::{ForwardBatch, LlamaModel};
use openlora::model::weights::SafetensorsFolder;
use openlora_kernels::{AttnSeq, CpuBackend};
use openlora_tests::{default_model, fixture, json_fixture};
use serde_json::Value;

type Logits = Vec<Vec<f32>>; // [position][vocab]

fn tiny() -> LlamaModel<CpuBackend> {
    let dir = fixture("tiny-llama");
    let cfg = LlamaConfig::from_hf_config(&dir.join("config.json")).expect("config");
    LlamaModel::load(&SafetensorsFolder::open(&dir).expect("weights"), cfg, CpuBackend::new()).expect("model")
}

fn host(model: &LlamaModel<CpuBackend>, rel: &str) -> LoraHost {
    LoraHost::load(rel, &fixture("lora").join(rel), &model.config).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn prepared(model: &LlamaModel<CpuBackend>, h: &LoraHost) -> Arc<LoraAdapter<CpuBackend>> {
    Arc::new(LoraAdapter::prepare(h, model.backend()).expect("prepare"))
}

/// One forward over all `prompts` as separate sequences in one batch, each with its adapters;
/// returns every position's logits per sequence.
fn run_batch(
    model: &LlamaModel<CpuBackend>,
    prompts: &[Vec<u32>],
    adapters: &[Vec<WeightedAdapter<CpuBackend>>],
) -> Vec<Logits> {
    let mut alloc = BlockAllocator::new(256, 4);
    let mut kv = model.alloc_kv(model.kv_layout(256, 4)).expect("kv");
    let mut seqs: Vec<SequenceBlocks> = prompts.iter().map(|_| SequenceBlocks::default()).collect();
    let (mut tokens, mut positions, mut slots, mut spans) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (p, s) in prompts.iter().zip(seqs.iter_mut()) {
        spans.push((tokens.len(), p.len()));
        slots.extend(s.append(&mut alloc, p.len()).expect("blocks"));
        tokens.extend_from_slice(p);
        positions.extend(0..p.len() as u32);
    }
    let attn: Vec<AttnSeq<'_>> = spans
        .iter()
        .zip(&seqs)
        .map(|(&(q_start, q_len), s)| AttnSeq { q_start, q_len, ctx_len: q_len, block_table: s.table() })
        .collect();
    let lists: Vec<&[WeightedAdapter<CpuBackend>]> = adapters.iter().map(Vec::as_slice).collect();
    let rows: Vec<u32> = (0..tokens.len() as u32).collect();
    let batch = ForwardBatch {
        tokens: &tokens,
        positions: &positions,
        slots: &slots,
        seqs: &attn,
        logits_rows: &rows,
        adapters: &lists,
    };
    let logits = model.forward(&mut kv, &batch).expect("forward");
    let v = model.config.vocab_size;
    spans
        .iter()
        .map(|&(start, len)| (start..start + len).map(|r| logits[r * v..(r + 1) * v].to_vec()).collect())
        .collect()
}

fn max_diff(a: &Logits, b: &Logits) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

fn logits_of(v: &Value) -> Logits {
    serde_json::from_value(v.clone()).expect("logits")
}

fn with(a: &Arc<LoraAdapter<CpuBackend>>, weight: f32) -> Vec<WeightedAdapter<CpuBackend>> {
    vec![WeightedAdapter { adapter: a.clone(), weight }]
}

#[test]
fn each_adapter_alone_matches_peft() {
    let model = tiny();
    let fx = json_fixture("lora/tiny-llama-reference.json");
    let prompts: Vec<Vec<u32>> = serde_json::from_value(fx["prompts"].clone()).expect("prompts");
    for name in fx["adapters"].as_object().expect("adapters").keys() {
        let a = prepared(&model, &host(&model, &format!("tiny-llama-adapters/{name}")));
        let got = run_batch(&model, &prompts, &vec![with(&a, 1.0); prompts.len()]);
        for (i, want) in fx["logits"][name].as_array().expect("per prompt").iter().enumerate() {
            let d = max_diff(&got[i], &logits_of(want));
            assert!(d < 1e-4, "{name} prompt {i}: max abs diff {d}");
        }
    }
}

#[test]
fn mixed_adapter_batches_match_peft_row_for_row() {
    let model = tiny();
    let fx = json_fixture("lora/tiny-llama-reference.json");
    let prompts: Vec<Vec<u32>> = serde_json::from_value(fx["prompts"].clone()).expect("prompts");
    for case in ["mixed", "mixed2"] {
        let m = &fx[case];
        let prompt = &prompts[m["prompt_index"].as_u64().expect("index") as usize];
        let names: Vec<String> = serde_json::from_value(m["adapter_names"].clone()).expect("names");
        let adapters: Vec<Vec<WeightedAdapter<CpuBackend>>> = names
            .iter()
            .map(|n| {
                if n == "__base__" {
                    vec![]
                } else {
                    with(&prepared(&model, &host(&model, &format!("tiny-llama-adapters/{n}"))), 1.0)
                }
            })
            .collect();
        let got = run_batch(&model, &vec![prompt.clone(); names.len()], &adapters);
        for (row, want) in m["logits"].as_array().expect("rows").iter().enumerate() {
            let d = max_diff(&got[row], &logits_of(want));
            assert!(d < 1e-4, "{case} row {row} ({}): max abs diff {d}", names[row]);
        }
    }
}

/// Several adapters applied side by side with weights equal the PEFT `cat` merge, which is
/// exactly `sum_i w_i * scale_i * B_i A_i`.
#[test]
fn weighted_composition_without_merging_equals_the_exact_cat_merge() {
    let model = tiny();
    let fx = json_fixture("lora/tiny-llama-reference.json");
    let prompts: Vec<Vec<u32>> = serde_json::from_value(fx["prompts"].clone()).expect("prompts");
    let case = fx["merges"].as_array().expect("merges").iter().find(|c| c["case"] == "cat_mixed").expect("cat_mixed");
    let a = prepared(&model, &host(&model, "tiny-llama-adapters/r2_qv"));
    let b = prepared(&model, &host(&model, "tiny-llama-adapters/r4_all"));
    let both = vec![WeightedAdapter { adapter: a, weight: 0.7 }, WeightedAdapter { adapter: b, weight: 0.5 }];
    let got = run_batch(&model, &prompts, &vec![both; prompts.len()]);
    for (i, want) in case["logits"].as_array().expect("per prompt").iter().enumerate() {
        let d = max_diff(&got[i], &logits_of(want));
        assert!(d < 1e-4, "prompt {i}: max abs diff {d}");
    }
}

#[test]
fn every_merge_method_matches_peft_add_weighted_adapter() {
    let model = tiny();
    let fx = json_fixture("lora/tiny-llama-reference.json");
    let prompts: Vec<Vec<u32>> = serde_json::from_value(fx["prompts"].clone()).expect("prompts");
    let mut checked = Vec::new();
    for case in fx["merges"].as_array().expect("merges") {
        let name = case["case"].as_str().expect("case");
        let call = &case["call"];
        let inputs: Vec<LoraHost> = call["adapters"]
            .as_array()
            .expect("adapters")
            .iter()
            .map(|n| host(&model, &format!("tiny-llama-adapters/{}", n.as_str().expect("name"))))
            .collect();
        let refs: Vec<&LoraHost> = inputs.iter().collect();
        let method = MergeMethod::parse(call["combination_type"].as_str().expect("type")).expect("method");
        let recipe = MergeRecipe {
            density: call["density"].as_f64().unwrap_or(1.0),
            svd_rank: call["svd_rank"].as_u64().map(|r| r as usize),
            majority_sign: if call["majority_sign_method"] == "frequency" {
                MajoritySign::Frequency
            } else {
                MajoritySign::Total
            },
            ..MergeRecipe::new(method, serde_json::from_value(call["weights"].clone()).expect("weights"))
        };
        let merged = merge(name, &refs, &recipe).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want_scale = case["scaling"].as_f64().expect("scaling") as f32;
        for (module, m) in merged.modules() {
            assert!((m.scale - want_scale).abs() < 1e-6, "{name} {module}: scale {} vs {want_scale}", m.scale);
        }
        let ours = prepared(&model, &merged);
        let got = run_batch(&model, &prompts, &vec![with(&ours, 1.0); prompts.len()]);
        // PEFT's own merged weights, loaded as an ordinary adapter, must give its logits too.
        let saved = prepared(&model, &host(&model, case["path"].as_str().expect("path")));
        let saved_logits = run_batch(&model, &prompts, &vec![with(&saved, 1.0); prompts.len()]);
        let tol = if method.name().ends_with("svd") { 2e-3 } else { 1e-4 };
        for (i, want) in case["logits"].as_array().expect("per prompt").iter().enumerate() {
            let want = logits_of(want);
            let d = max_diff(&saved_logits[i], &want);
            assert!(d < 1e-4, "{name}: PEFT's saved merge, prompt {i}: max abs diff {d}");
            if case["deterministic"] == true {
                let d = max_diff(&got[i], &want);
                assert!(d < tol, "{name}: our merge, prompt {i}: max abs diff {d}");
            }
        }
        if case["deterministic"] != true {
            // DARE's mask is ours (seeded), not torch's: compare how much it dropped instead.
            let zeros = |f: &dyn Fn(&openlora::adapters::LoraModuleHost) -> &Vec<f32>| {
                let (z, n) = merged.modules().fold((0usize, 0usize), |(z, n), (_, m)| {
                    (z + f(m).iter().filter(|v| **v == 0.0).count(), n + f(m).len())
                });
                z as f64 / n as f64
            };
            if !method.name().ends_with("svd") {
                let want = case["zero_fraction"]["lora_A"].as_f64().expect("zero fraction");
                let got = zeros(&|m| &m.a);
                assert!((got - want).abs() < 0.05, "{name}: zero fraction {got} vs PEFT's {want}");
            }
        }
        checked.push(name.to_owned());
    }
    assert!(checked.len() >= 11, "{checked:?}");
    for bad in fx["merge_errors"].as_array().expect("errors") {
        let call = &bad["call"];
        let inputs: Vec<LoraHost> = call["adapters"]
            .as_array()
            .expect("adapters")
            .iter()
            .map(|n| host(&model, &format!("tiny-llama-adapters/{}", n.as_str().expect("name"))))
            .collect();
        let refs: Vec<&LoraHost> = inputs.iter().collect();
        let method = MergeMethod::parse(call["combination_type"].as_str().expect("type")).expect("method");
        let recipe = MergeRecipe::new(method, serde_json::from_value(call["weights"].clone()).expect("weights"));
        let e = merge("bad", &refs, &recipe).expect_err("PEFT refuses this merge");
        assert!(e.to_string().contains("equal rank"), "{e}");
    }
}

#[test]
fn default_model_with_an_adapter_matches_peft() {
    let lm = default_model();
    let model = &lm.model;
    let fx = json_fixture("lora/smollm2-lora-logits.json");
    let tokens: Vec<u32> = serde_json::from_value(fx["tokens"].clone()).expect("tokens");
    let h = LoraHost::load("smollm2-r4-qv", &fixture("lora/smollm2-adapters/smollm2-r4-qv"), &model.config)
        .expect("adapter");
    let a = Arc::new(LoraAdapter::prepare(&h, model.backend()).expect("prepare"));
    let rows: Vec<Vec<WeightedAdapter<CpuBackend>>> = vec![vec![], with(&a, 1.0)];
    let got = run_default(model, &tokens, &rows);
    let top = |v: &Value| -> Vec<Vec<(u32, f32)>> { serde_json::from_value(v.clone()).expect("top") };
    let mut moved = 0f32;
    for (row, want) in [(0, top(&fx["base"]["top"])), (1, top(&fx["lora"]["top"]))] {
        for (pos, w) in want.iter().enumerate() {
            for &(id, logit) in w {
                let d = (got[row][pos][id as usize] - logit).abs();
                assert!(d < 2e-2, "row {row} position {pos} token {id}: {} vs {logit}", got[row][pos][id as usize]);
            }
        }
    }
    for (b, l) in got[0].iter().zip(&got[1]) {
        moved = moved.max(b.iter().zip(l).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max));
    }
    assert!(moved > 0.5, "the adapter must visibly move the logits (moved {moved})");
    // PEFT's own mixed batch of [base, adapter] agrees with ours.
    let mixed = top(&fx["mixed"]["top"][1]);
    for (pos, w) in mixed.iter().enumerate() {
        for &(id, logit) in w {
            assert!((got[1][pos][id as usize] - logit).abs() < 2e-2, "mixed row 1 position {pos} token {id}");
        }
    }
}

fn run_default(
    model: &LlamaModel<CpuBackend>,
    tokens: &[u32],
    rows: &[Vec<WeightedAdapter<CpuBackend>>],
) -> Vec<Logits> {
    run_batch(model, &vec![tokens.to_vec(); rows.len()], rows)
}

/// The base model and 8 different adapters (ranks 1 to 16, unpadded) in one batch give, row
/// for row, the logits each gets alone; prompts of different lengths take both the row-by-row
/// (BGMV) and the GEMM (SGMV) paths.
#[test]
fn a_batch_of_the_base_and_eight_adapters_equals_each_alone() {
    let model = tiny();
    let adapters: Vec<Arc<LoraAdapter<CpuBackend>>> = [1, 2, 3, 4, 5, 8, 12, 16]
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            prepared(&model, &openlora::adapters::synth::random_lora(&format!("s{i}"), &model.config, r, i as u64))
        })
        .collect();
    let prompts: Vec<Vec<u32>> =
        (0..9).map(|i| (0..(1 + i * 3) as u32).map(|t| (t * 37 + i as u32 * 11) % 256).collect()).collect();
    let mut lists: Vec<Vec<WeightedAdapter<CpuBackend>>> = vec![vec![]];
    lists.extend(adapters.iter().map(|a| with(a, 1.0)));
    let together = run_batch(&model, &prompts, &lists);
    for (i, (p, l)) in prompts.iter().zip(&lists).enumerate() {
        let alone = run_batch(&model, std::slice::from_ref(p), std::slice::from_ref(l));
        let d = max_diff(&together[i], &alone[0]);
        assert!(d < 1e-5, "row {i}: max abs diff {d}");
    }
    // And the adapters do change the output (the comparison above is not vacuous).
    let base_alone = run_batch(&model, &prompts[1..2], &[vec![]]);
    assert!(max_diff(&together[1], &base_alone[0]) > 1e-2);
}
