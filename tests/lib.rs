//! Shared helpers for openlora's end-to-end tests: fixture paths and the default model.

#![deny(missing_docs)]

pub mod fuzz_targets;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use openlora::model::LoadedModel;
use openlora::model::default_model;
use openlora_kernels::CpuBackend;

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// Reads and parses a JSON fixture.
pub fn json_fixture(name: &str) -> serde_json::Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The default model, fetched into the cache on first use and loaded once per test binary.
pub fn default_model() -> &'static Arc<LoadedModel<CpuBackend>> {
    static MODEL: OnceLock<Arc<LoadedModel<CpuBackend>>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = default_model::ensure_default_model().unwrap_or_else(|e| panic!("fetching the default model: {e}"));
        Arc::new(
            LoadedModel::open(&path, CpuBackend::new()).unwrap_or_else(|e| panic!("loading the default model: {e}")),
        )
    })
}

/// The default model on a backend whose block-quantized matmuls use 8-bit activations
/// (`engine.cpu_activations = "int8"`), loaded once per test binary.
pub fn default_model_int8() -> &'static Arc<LoadedModel<CpuBackend>> {
    static MODEL: OnceLock<Arc<LoadedModel<CpuBackend>>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = default_model::ensure_default_model().unwrap_or_else(|e| panic!("fetching the default model: {e}"));
        Arc::new(
            LoadedModel::open(&path, CpuBackend::new().with_int8(true))
                .unwrap_or_else(|e| panic!("loading the default model: {e}")),
        )
    })
}

/// Logits at every position of `tokens` on `lm`, prefilled in one forward call into a fresh
/// 16-block KV cache (no engine, no sampler).
pub fn all_logits(lm: &LoadedModel<CpuBackend>, tokens: &[u32]) -> Vec<Vec<f32>> {
    use openlora::engine::kv_cache::{BlockAllocator, SequenceBlocks};
    let m = &lm.model;
    let mut alloc = BlockAllocator::new(16, 16);
    let mut kv = m.alloc_kv(m.kv_layout(16, 16)).expect("kv");
    let mut seq = SequenceBlocks::default();
    let slots = seq.append(&mut alloc, tokens.len()).expect("blocks");
    let positions: Vec<u32> = (0..tokens.len() as u32).collect();
    let seqs = [openlora_kernels::AttnSeq {
        q_start: 0,
        q_len: tokens.len(),
        ctx_len: tokens.len(),
        block_table: seq.table(),
    }];
    let batch = openlora::model::llama::ForwardBatch {
        tokens,
        positions: &positions,
        slots: &slots,
        seqs: &seqs,
        logits_rows: &positions,
        adapters: &[],
    };
    let logits = m.forward(&mut kv, &batch).expect("forward");
    logits.chunks(m.config.vocab_size).map(<[f32]>::to_vec).collect()
}

/// `examples/<name>` at the repository root.
pub fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("examples").join(name)
}

/// Writes a safetensors file from `(name, dtype, shape, bytes)` entries.
pub fn write_safetensors(path: &std::path::Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).expect("write");
}

/// Writes a PEFT LoRA adapter folder: `adapter_config.json` and f32 `adapter_model.safetensors`
/// from `(tensor name, shape, values)`.
pub fn write_peft_adapter(
    dir: &std::path::Path,
    config: &serde_json::Value,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).expect("config");
    let entries: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, shape, v)| (n.as_str(), "F32", shape.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    write_safetensors(&dir.join("adapter_model.safetensors"), &entries);
}
