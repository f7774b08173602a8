//! Logits of tiny random Llama and Qwen2 models against HF transformers (fixtures made by
//! `tests/fixtures/make_fixtures.py`): whole-prompt prefill, token-by-token decode through the
//! paged KV cache, and several sequences in one batch must all agree with the reference.

use openlora::engine::kv_cache::{BlockAllocator, SequenceBlocks};
use openlora::model::config::LlamaConfig;
use openlora::model::llama::{ForwardBatch, LlamaModel};
use openlora::model::weights::SafetensorsFolder;
use openlora_kernels::{AttnSeq, CpuBackend};
use openlora_tests::{fixture, json_fixture};

struct Reference {
    prompts: Vec<Vec<u32>>,
    /// [prompt][position][vocab]
    logits: Vec<Vec<Vec<f32>>>,
}

fn reference(name: &str) -> Reference {
    let v = json_fixture(&format!("{name}/reference.json"));
    let prompts = serde_json::from_value(v["prompts"].clone()).expect("prompts");
    let logits = serde_json::from_value(v["logits"].clone()).expect("logits");
    Reference { prompts, logits }
}

fn load(name: &str) -> LlamaModel<CpuBackend> {
    let dir = fixture(name);
    let cfg = LlamaConfig::from_hf_config(&dir.join("config.json")).expect("config");
    let src = SafetensorsFolder::open(&dir).expect("safetensors");
    LlamaModel::load(&src, cfg, CpuBackend::new()).expect("model")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs each prompt as one sequence, in chunks of `chunk` tokens, returning all positions' logits.
fn run_chunked(model: &LlamaModel<CpuBackend>, prompt: &[u32], chunk: usize) -> Vec<Vec<f32>> {
    let mut alloc = BlockAllocator::new(64, 4);
    let mut kv = model.alloc_kv(model.kv_layout(64, 4)).expect("kv");
    let mut seq = SequenceBlocks::default();
    let mut out = Vec::new();
    for part in prompt.chunks(chunk) {
        let start = seq.len();
        let slots = seq.append(&mut alloc, part.len()).expect("blocks");
        let positions: Vec<u32> = (start..start + part.len()).map(|p| p as u32).collect();
        let seqs = [AttnSeq { q_start: 0, q_len: part.len(), ctx_len: seq.len(), block_table: seq.table() }];
        let rows: Vec<u32> = (0..part.len() as u32).collect();
        let logits = model
            .forward(
                &mut kv,
                &ForwardBatch {
                    tokens: part,
                    positions: &positions,
                    slots: &slots,
                    seqs: &seqs,
                    logits_rows: &rows,
                    adapters: &[],
                },
            )
            .expect("forward");
        out.extend(logits.chunks(model.config.vocab_size).map(<[f32]>::to_vec));
    }
    out
}

fn check_model(name: &str) {
    let model = load(name);
    let r = reference(name);
    for (prompt, want) in r.prompts.iter().zip(&r.logits) {
        for chunk in [prompt.len(), 1, 3] {
            let got = run_chunked(&model, prompt, chunk);
            assert_eq!(got.len(), want.len());
            for (pos, (g, w)) in got.iter().zip(want).enumerate() {
                let d = max_abs_diff(g, w);
                assert!(d < 1e-4, "{name}: prompt len {} chunk {chunk} position {pos}: max abs diff {d}", prompt.len());
            }
        }
    }
}

#[test]
fn tiny_llama_with_gqa_and_tied_embeddings_matches_transformers() {
    check_model("tiny-llama");
}

#[test]
fn tiny_qwen2_with_biases_and_sharded_safetensors_matches_transformers() {
    check_model("tiny-qwen2");
}

/// All reference prompts in one batch (interleaved blocks, different lengths) give the same
/// logits as each alone.
#[test]
fn several_sequences_in_one_batch_match_the_reference() {
    let model = load("tiny-llama");
    let r = reference("tiny-llama");
    let mut alloc = BlockAllocator::new(64, 4);
    let mut kv = model.alloc_kv(model.kv_layout(64, 4)).expect("kv");
    let mut seqs_blocks: Vec<SequenceBlocks> = r.prompts.iter().map(|_| SequenceBlocks::default()).collect();
    // Interleave block allocation: first half of every prompt, then the second half.
    let mut tokens = Vec::new();
    let mut positions = Vec::new();
    let mut slots = Vec::new();
    let mut spans = Vec::new();
    for round in 0..2 {
        tokens.clear();
        positions.clear();
        slots.clear();
        spans.clear();
        for (p, s) in r.prompts.iter().zip(seqs_blocks.iter_mut()) {
            let half = p.len().div_ceil(2);
            let part = if round == 0 { &p[..half] } else { &p[half..] };
            let start = s.len();
            spans.push((tokens.len(), part.len()));
            slots.extend(s.append(&mut alloc, part.len()).expect("blocks"));
            tokens.extend_from_slice(part);
            positions.extend((start..start + part.len()).map(|x| x as u32));
        }
        let seqs: Vec<AttnSeq<'_>> = spans
            .iter()
            .zip(&seqs_blocks)
            .map(|(&(q_start, q_len), s)| AttnSeq { q_start, q_len, ctx_len: s.len(), block_table: s.table() })
            .collect();
        let rows: Vec<u32> = (0..tokens.len() as u32).collect();
        let logits = model
            .forward(
                &mut kv,
                &ForwardBatch {
                    tokens: &tokens,
                    positions: &positions,
                    slots: &slots,
                    seqs: &seqs,
                    logits_rows: &rows,
                    adapters: &[],
                },
            )
            .expect("forward");
        let v = model.config.vocab_size;
        for (i, ((q_start, q_len), p)) in spans.iter().zip(&r.prompts).enumerate() {
            let offset = if round == 0 { 0 } else { p.len().div_ceil(2) };
            for j in 0..*q_len {
                let got = &logits[(q_start + j) * v..(q_start + j + 1) * v];
                let d = max_abs_diff(got, &r.logits[i][offset + j]);
                assert!(d < 1e-4, "prompt {i} position {}: max abs diff {d}", offset + j);
            }
        }
    }
}
