//! The fuzz targets: one function per parser that takes outside bytes, each feeding the bytes to
//! the runtime's real entry point (through a scratch file when that entry point reads a path),
//! and the generators of the binary seed inputs (a tiny GGUF model, tiny safetensors files).
//!
//! A target returns `Ok(())` when the parser accepted the input and `Err(message)` when it
//! refused it; either is fine. What must never happen is a panic, a hang or an absurd
//! allocation: the in-suite runner (`tests/all/fuzz`) checks those, and a libFuzzer crate
//! (`fuzz/`, run by hand) calls the same functions.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openlora::adapters::catalog::Catalog;
use openlora::adapters::manifest::Manifest;
use openlora::adapters::{LoraAdapter, LoraHost};
use openlora::config::Deployment;
use openlora::model::LoadedModel;
use openlora::model::config::{Architecture, LlamaConfig};
use openlora::model::gguf::GgufFile;
use openlora_kernels::{CpuBackend, SharedBytes};

/// A fuzz target: the input bytes in, accepted (`Ok`) or refused with a message (`Err`) out.
pub type TargetFn = fn(&[u8]) -> Result<(), String>;

/// Every target by name (the name is also its corpus folder, `tests/fuzz/corpus/<name>`).
pub const TARGETS: &[(&str, TargetFn)] = &[
    ("gguf", gguf),
    ("adapter_weights", adapter_weights),
    ("peft_config", peft_config),
    ("manifest", manifest),
    ("deployment", deployment),
    ("request", request),
    ("hf_config", hf_config),
    ("model_safetensors", model_safetensors),
];

/// `tests/fuzz/corpus/<target>`.
pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus").join(target)
}

thread_local! {
    /// One scratch folder per thread, for the entry points that read files.
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// `<this thread's scratch folder>/<sub>`, created when missing.
fn scratch(sub: &str) -> PathBuf {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let dir = s.get_or_insert_with(|| tempfile::tempdir().expect("scratch folder"));
        let p = dir.path().join(sub);
        std::fs::create_dir_all(&p).expect("scratch subfolder");
        p
    })
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The base model the adapter targets check against: the shape of [`tiny_gguf`].
pub fn tiny_base() -> LlamaConfig {
    LlamaConfig {
        arch: Architecture::Llama,
        hidden_size: 8,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        intermediate_size: 16,
        vocab_size: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_freq_scale: None,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        attention_bias: false,
    }
}

/// GGUF: the in-memory parser (header, metadata, tensor directory, every tensor's bounds), then
/// the whole model load from a file (config, tokenizer, chat template, every weight).
pub fn gguf(data: &[u8]) -> Result<(), String> {
    let image: SharedBytes = Arc::new(data.to_vec());
    if let Ok(g) = GgufFile::parse(Path::new("fuzz.gguf"), image) {
        for (name, _) in &g.tensors {
            if let Ok(Some(w)) = g.tensor(name)
                && w.rows().saturating_mul(w.cols()) <= 1 << 16
            {
                // Decoding reads every byte the bounds check allowed (and dequantizes blocks).
                let _ = w.to_f32();
            }
        }
        let _ = g.get_str_array("tokenizer.ggml.tokens");
        let _ = g.get_i32_array("tokenizer.ggml.token_type");
    }
    let path = scratch("gguf").join("model.gguf");
    write(&path, data);
    let m = LoadedModel::open(&path, CpuBackend::new()).map_err(|e| e.to_string())?;
    m.tokenizer.encode("hello world", true).map_err(|e| e.to_string())?;
    Ok(())
}

/// Both ways an adapter is read: registration from its folder ([`Catalog::add`]: config,
/// safetensors header, manifest) and the full load ([`LoraHost::from_bytes`]) with the CPU
/// preparation. Registration must accept whatever the full load accepts, and predict its size
/// and rank.
fn adapter(config: &[u8], weights: &[u8]) -> Result<(), String> {
    let base = tiny_base();
    let dir = scratch("adapter").join("fuzz");
    std::fs::create_dir_all(&dir).expect("adapter folder");
    write(&dir.join("adapter_config.json"), config);
    write(&dir.join("adapter_model.safetensors"), weights);
    let catalog = Catalog::new(base.clone(), Vec::new());
    let registered = catalog.add("fuzz", &dir).map_err(|e| e.to_string());
    let loaded = LoraHost::from_bytes("fuzz", config, weights, &base).map_err(|e| e.to_string());
    match (registered, loaded) {
        (Ok(entry), Ok(host)) => {
            assert_eq!(entry.loaded_bytes, host.bytes(), "registration mispredicts the loaded size");
            assert_eq!(entry.max_rank, host.max_rank(), "registration mispredicts the rank");
            LoraAdapter::prepare(&host, &CpuBackend::new()).map_err(|e| e.to_string())?;
            Ok(())
        }
        (Err(e), Ok(_)) => panic!("registration refused an adapter the loader accepts: {e}"),
        (Ok(_), Err(e)) => Err(e),
        (Err(r), Err(l)) => Err(format!("registration: {r}; load: {l}")),
    }
}

/// `adapter_model.safetensors` (header and data), with a valid config.
pub fn adapter_weights(data: &[u8]) -> Result<(), String> {
    adapter(&tiny_adapter_config(), data)
}

/// `adapter_config.json`, with valid weights.
pub fn peft_config(data: &[u8]) -> Result<(), String> {
    adapter(data, &tiny_adapter_weights())
}

/// An adapter's `openlora.toml`.
pub fn manifest(data: &[u8]) -> Result<(), String> {
    let dir = scratch("manifest");
    write(&dir.join("openlora.toml"), data);
    match Manifest::load_for(&dir) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => panic!("the manifest exists but load_for found none"),
        Err(e) => Err(e.to_string()),
    }
}

/// A deployment file.
pub fn deployment(data: &[u8]) -> Result<(), String> {
    let path = scratch("deployment").join("deploy.toml");
    write(&path, data);
    Deployment::load(&path).map(|_| ()).map_err(|e| e.to_string())
}

/// A request body, read as `POST /v1/completions` and as `POST /v1/chat/completions` read it.
pub fn request(data: &[u8]) -> Result<(), String> {
    let completions = openlora::server::request_from_body(data, false).map_err(|e| e.to_string());
    let chat = openlora::server::request_from_body(data, true).map_err(|e| e.to_string());
    completions.or(chat).map(|_| ())
}

/// An HF model's `config.json`.
pub fn hf_config(data: &[u8]) -> Result<(), String> {
    let path = scratch("hf_config").join("config.json");
    write(&path, data);
    LlamaConfig::from_hf_config(&path).map(|_| ()).map_err(|e| e.to_string())
}

/// The `model.safetensors` of an HF model folder (with a valid config and tokenizer).
pub fn model_safetensors(data: &[u8]) -> Result<(), String> {
    let dir = scratch("model_safetensors");
    if !dir.join("tokenizer.json").exists() {
        write(&dir.join("config.json"), TINY_HF_CONFIG.as_bytes());
        write(&dir.join("tokenizer.json"), TINY_TOKENIZER_JSON.as_bytes());
    }
    write(&dir.join("model.safetensors"), data);
    LoadedModel::open(&dir, CpuBackend::new()).map(|_| ()).map_err(|e| e.to_string())
}

// ---- seed generators -------------------------------------------------------------------------

/// The HF `config.json` of the tiny model (the shape of [`tiny_base`]).
pub const TINY_HF_CONFIG: &str = r#"{"model_type":"llama","hidden_size":8,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"intermediate_size":16,"vocab_size":16,"rms_norm_eps":1e-5,"max_position_embeddings":64,"tie_word_embeddings":true}"#;

/// A minimal valid `tokenizer.json` (byte-level BPE, one token).
pub const TINY_TOKENIZER_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
"post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},
"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,
"fuse_unk":false,"byte_fallback":false,"vocab":{"a":0},"merges":[]}}"#;

/// A GGUF metadata value, with its wire type.
#[derive(Clone, Debug)]
pub enum Meta {
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    Str(String),
    /// Type 9: element type id and elements of that type.
    Array(u32, Vec<Meta>),
    /// Type 10.
    U64(u64),
    /// Type 0.
    U8(u8),
    /// Type 3.
    I16(i16),
    /// Type 12.
    F64(f64),
}

impl Meta {
    fn type_id(&self) -> u32 {
        match self {
            Meta::U8(_) => 0,
            Meta::I16(_) => 3,
            Meta::U32(_) => 4,
            Meta::I32(_) => 5,
            Meta::F32(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::Array(..) => 9,
            Meta::U64(_) => 10,
            Meta::F64(_) => 12,
        }
    }

    fn write_payload(&self, out: &mut Vec<u8>) {
        match self {
            Meta::U8(v) => out.push(*v),
            Meta::I16(v) => out.extend(v.to_le_bytes()),
            Meta::U32(v) => out.extend(v.to_le_bytes()),
            Meta::I32(v) => out.extend(v.to_le_bytes()),
            Meta::F32(v) => out.extend(v.to_le_bytes()),
            Meta::Bool(v) => out.push(u8::from(*v)),
            Meta::Str(s) => gguf_string(out, s),
            Meta::Array(ty, items) => {
                out.extend(ty.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for it in items {
                    it.write_payload(out);
                }
            }
            Meta::U64(v) => out.extend(v.to_le_bytes()),
            Meta::F64(v) => out.extend(v.to_le_bytes()),
        }
    }
}

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A GGUF tensor: name, GGML dims (innermost first), GGML type id, data.
pub type GgufTensor = (String, Vec<u64>, u32, Vec<u8>);

/// Writes a GGUF v3 image (alignment 32).
pub fn build_gguf(meta: &[(String, Meta)], tensors: &[GgufTensor]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        gguf_string(&mut out, k);
        out.extend(v.type_id().to_le_bytes());
        v.write_payload(&mut out);
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        gguf_string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    let pad = |out: &mut Vec<u8>| {
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
    };
    pad(&mut out);
    for (_, _, _, data) in tensors {
        out.extend(data);
        pad(&mut out);
    }
    out
}

/// Deterministic small weights (`n` values in -0.5..0.5).
fn values(n: usize, salt: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            ((i.wrapping_mul(2654435761).wrapping_add(salt.wrapping_mul(40503)) >> 16) % 1000) as f32 / 1000.0 - 0.5
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()
}

/// The tiny model's metadata (shape of [`tiny_base`], a 16-token byte-level BPE vocabulary and
/// a chat template), with `overrides` replacing or adding keys.
pub fn tiny_gguf_meta(overrides: &[(&str, Meta)]) -> Vec<(String, Meta)> {
    let tokens = ["<s>", "</s>", "a", "b", "c", "d", "e", "h", "l", "o", "Ġ", "ab", "he", "ll", "lo", "Ġa"];
    let merges = ["a b", "h e", "l l", "l o", "Ġ a"];
    let s = |v: &str| Meta::Str(v.to_owned());
    let mut meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), s("llama")),
        ("general.alignment".into(), Meta::U32(32)),
        ("llama.embedding_length".into(), Meta::U32(8)),
        ("llama.block_count".into(), Meta::U32(2)),
        ("llama.attention.head_count".into(), Meta::U32(2)),
        ("llama.attention.head_count_kv".into(), Meta::U32(1)),
        ("llama.feed_forward_length".into(), Meta::U32(16)),
        ("llama.context_length".into(), Meta::U32(64)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Meta::F32(1e-5)),
        ("llama.rope.freq_base".into(), Meta::F32(10000.0)),
        ("llama.vocab_size".into(), Meta::U32(16)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), Meta::Array(8, tokens.iter().map(|t| s(t)).collect())),
        (
            "tokenizer.ggml.token_type".into(),
            Meta::Array(5, (0..tokens.len()).map(|i| Meta::I32(if i < 2 { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Meta::Array(8, merges.iter().map(|m| s(m)).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Meta::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Meta::U32(1)),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            s("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}\
               {% if add_generation_prompt %}<|assistant|>{% endif %}"),
        ),
    ];
    for (k, v) in overrides {
        match meta.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.clone(),
            None => meta.push(((*k).to_owned(), v.clone())),
        }
    }
    meta
}

/// The tiny model's tensors in GGUF naming (f32 norms and most weights, one f16 and one bf16
/// projection per layer).
pub fn tiny_gguf_tensors() -> Vec<GgufTensor> {
    let c = tiny_base();
    let (h, qd, kvd, f, v) =
        (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size, c.vocab_size);
    let mut salt = 0;
    let mut t = |name: String, rows: usize, cols: usize, ty: u32| {
        salt += 1;
        let vals = values(rows * cols, salt);
        let data = match ty {
            1 => f16_bytes(&vals),
            30 => bf16_bytes(&vals),
            _ => f32_bytes(&vals),
        };
        let dims = if rows == 1 { vec![cols as u64] } else { vec![cols as u64, rows as u64] };
        (name, dims, ty, data)
    };
    let mut out = vec![t("token_embd.weight".into(), v, h, 0), t("output_norm.weight".into(), 1, h, 0)];
    for l in 0..c.num_layers {
        out.push(t(format!("blk.{l}.attn_norm.weight"), 1, h, 0));
        out.push(t(format!("blk.{l}.attn_q.weight"), qd, h, 1));
        out.push(t(format!("blk.{l}.attn_k.weight"), kvd, h, 0));
        out.push(t(format!("blk.{l}.attn_v.weight"), kvd, h, 0));
        out.push(t(format!("blk.{l}.attn_output.weight"), h, qd, 0));
        out.push(t(format!("blk.{l}.ffn_norm.weight"), 1, h, 0));
        out.push(t(format!("blk.{l}.ffn_gate.weight"), f, h, 0));
        out.push(t(format!("blk.{l}.ffn_up.weight"), f, h, 30));
        out.push(t(format!("blk.{l}.ffn_down.weight"), h, f, 0));
    }
    out
}

/// The tiny GGUF model, with metadata `overrides`.
pub fn tiny_gguf(overrides: &[(&str, Meta)]) -> Vec<u8> {
    build_gguf(&tiny_gguf_meta(overrides), &tiny_gguf_tensors())
}

/// A GGUF with no tensors and one metadata key of every value type (nested arrays included):
/// the parser accepts it, the model loader refuses it.
pub fn every_value_type_gguf() -> Vec<u8> {
    let meta = vec![
        ("t.u8".to_owned(), Meta::U8(7)),
        ("t.i16".to_owned(), Meta::I16(-3)),
        ("t.u32".to_owned(), Meta::U32(u32::MAX)),
        ("t.i32".to_owned(), Meta::I32(-1)),
        ("t.f32".to_owned(), Meta::F32(0.5)),
        ("t.bool".to_owned(), Meta::Bool(true)),
        ("t.str".to_owned(), Meta::Str("é".into())),
        ("t.u64".to_owned(), Meta::U64(1 << 40)),
        ("t.f64".to_owned(), Meta::F64(-2.5)),
        (
            "t.nested".to_owned(),
            Meta::Array(
                9,
                vec![Meta::Array(4, vec![Meta::U32(1), Meta::U32(2)]), Meta::Array(8, vec![Meta::Str("x".into())])],
            ),
        ),
    ];
    build_gguf(&meta, &[])
}

/// Writes a safetensors image from `(name, dtype, shape, bytes)` and optional `__metadata__`.
pub fn safetensors_bytes(
    tensors: &[(String, &str, Vec<usize>, Vec<u8>)],
    metadata: Option<serde_json::Value>,
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), m);
    }
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
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
    out
}

/// The tiny adapter's `adapter_config.json`: rank 2 on q/v projections and the LM head.
pub fn tiny_adapter_config() -> Vec<u8> {
    br#"{"peft_type":"LORA","r":2,"lora_alpha":4,"use_rslora":false,"bias":"none","modules_to_save":null,"target_modules":["q_proj","v_proj","lm_head"],"rank_pattern":{},"alpha_pattern":{"v_proj":8}}"#.to_vec()
}

/// The tiny adapter's `adapter_model.safetensors` (f32, one f16 and one bf16 pair).
pub fn tiny_adapter_weights() -> Vec<u8> {
    let c = tiny_base();
    let r = 2;
    let mut tensors = Vec::new();
    let mut salt = 100;
    let mut pair = |module: String, in_dim: usize, out_dim: usize, dtype: &'static str| {
        for (ab, shape) in [("lora_A", vec![r, in_dim]), ("lora_B", vec![out_dim, r])] {
            salt += 1;
            let vals = values(shape[0] * shape[1], salt);
            let bytes = match dtype {
                "F16" => f16_bytes(&vals),
                "BF16" => bf16_bytes(&vals),
                _ => f32_bytes(&vals),
            };
            tensors.push((format!("base_model.model.{module}.{ab}.weight"), dtype, shape, bytes));
        }
    };
    for l in 0..c.num_layers {
        pair(format!("model.layers.{l}.self_attn.q_proj"), c.hidden_size, c.num_heads * c.head_dim, "F32");
        pair(
            format!("model.layers.{l}.self_attn.v_proj"),
            c.hidden_size,
            c.num_kv_heads * c.head_dim,
            if l == 0 { "F16" } else { "F32" },
        );
    }
    pair("lm_head".into(), c.hidden_size, c.vocab_size, "BF16");
    safetensors_bytes(&tensors, Some(serde_json::json!({"format": "pt"})))
}

/// The tiny model's `model.safetensors` in HF naming and layout (`[rows, cols]`).
pub fn tiny_model_safetensors() -> Vec<u8> {
    let c = tiny_base();
    let (h, qd, kvd, f, v) =
        (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size, c.vocab_size);
    let mut salt = 200;
    let mut tensors = Vec::new();
    let mut t = |name: String, shape: Vec<usize>, dtype: &'static str| {
        salt += 1;
        let vals = values(shape.iter().product(), salt);
        let bytes = if dtype == "F16" { f16_bytes(&vals) } else { f32_bytes(&vals) };
        tensors.push((name, dtype, shape, bytes));
    };
    t("model.embed_tokens.weight".into(), vec![v, h], "F32");
    t("model.norm.weight".into(), vec![h], "F32");
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        t(format!("{p}.input_layernorm.weight"), vec![h], "F32");
        t(format!("{p}.self_attn.q_proj.weight"), vec![qd, h], "F16");
        t(format!("{p}.self_attn.k_proj.weight"), vec![kvd, h], "F32");
        t(format!("{p}.self_attn.v_proj.weight"), vec![kvd, h], "F32");
        t(format!("{p}.self_attn.o_proj.weight"), vec![h, qd], "F32");
        t(format!("{p}.post_attention_layernorm.weight"), vec![h], "F32");
        t(format!("{p}.mlp.gate_proj.weight"), vec![f, h], "F32");
        t(format!("{p}.mlp.up_proj.weight"), vec![f, h], "F32");
        t(format!("{p}.mlp.down_proj.weight"), vec![h, f], "F32");
    }
    safetensors_bytes(&tensors, None)
}

/// The generated binary seeds: `(target, file name, bytes)`. The text seeds (JSON, TOML) are
/// written by hand in the corpus folders.
pub fn generated_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        ("gguf", "tiny-llama.gguf", tiny_gguf(&[])),
        (
            "gguf",
            "tiny-qwen2-no-template.gguf",
            build_gguf(
                &tiny_gguf_meta(&[("general.architecture", Meta::Str("qwen2".into()))])
                    .into_iter()
                    .filter(|(k, _)| k != "tokenizer.chat_template" && k != "tokenizer.ggml.token_type")
                    .map(|(k, v)| (k.replacen("llama.", "qwen2.", 1), v))
                    .collect::<Vec<_>>(),
                &{
                    // qwen2 has q/k/v biases.
                    let c = tiny_base();
                    let mut t = tiny_gguf_tensors();
                    for l in 0..c.num_layers {
                        for (name, n) in
                            [("attn_q", c.num_heads * c.head_dim), ("attn_k", c.head_dim), ("attn_v", c.head_dim)]
                        {
                            t.push((format!("blk.{l}.{name}.bias"), vec![n as u64], 0, f32_bytes(&values(n, 7))));
                        }
                    }
                    t
                },
            ),
        ),
        ("gguf", "every-value-type.gguf", every_value_type_gguf()),
        ("adapter_weights", "tiny-adapter.safetensors", tiny_adapter_weights()),
        ("model_safetensors", "tiny-model.safetensors", tiny_model_safetensors()),
    ]
}
