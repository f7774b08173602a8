//! Broken model files give an error naming the file and the tensor or key, never a panic.

use std::path::Path;

use openlora::model::LoadedModel;
use openlora_kernels::CpuBackend;
use openlora_tests::{fixture, write_safetensors};

fn open_err(path: &Path) -> String {
    match LoadedModel::open(path, CpuBackend::new()) {
        Ok(_) => panic!("{} loaded but is broken", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Copies tiny-llama into a temp dir (plus a tokenizer so only the weights can be at fault).
fn tiny_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.path().join(f)).expect("copy");
    }
    // A minimal valid tokenizer.json (byte-level BPE with an empty vocabulary).
    std::fs::write(
        dir.path().join("tokenizer.json"),
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
            "post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},
            "model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,
            "fuse_unk":false,"byte_fallback":false,"vocab":{"a":0},"merges":[]}}"#,
    )
    .expect("tokenizer");
    dir
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = tiny_copy();
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).expect("read");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("truncate");
    let e = open_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_tensor_wrong_shape_and_unknown_dtype_name_the_tensor() {
    let dir = tiny_copy();
    let p = dir.path().join("model.safetensors");
    // Only the embedding, with the right shape: the first layer's norm is then missing.
    let embed = vec![0u8; 256 * 64 * 4];
    write_safetensors(&p, &[("model.embed_tokens.weight", "F32", vec![256, 64], embed.clone())]);
    let e = open_err(dir.path());
    assert!(e.contains("model.layers.0.input_layernorm.weight") && e.contains("missing"), "{e}");

    write_safetensors(&p, &[("model.embed_tokens.weight", "F32", vec![256, 32], vec![0u8; 256 * 32 * 4])]);
    let e = open_err(dir.path());
    assert!(e.contains("model.embed_tokens.weight") && e.contains("expected [256, 64]"), "{e}");

    write_safetensors(&p, &[("model.embed_tokens.weight", "I64", vec![256, 32], vec![0u8; 256 * 32 * 8])]);
    let e = open_err(dir.path());
    assert!(e.contains("model.embed_tokens.weight") && e.contains("not supported"), "{e}");
}

#[test]
fn bad_config_names_the_key() {
    let dir = tiny_copy();
    let p = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    cfg["num_key_value_heads"] = serde_json::json!(3);
    std::fs::write(&p, cfg.to_string()).expect("write");
    let e = open_err(dir.path());
    assert!(e.contains("config.json") && e.contains("num_key_value_heads"), "{e}");

    cfg["num_key_value_heads"] = serde_json::json!(2);
    cfg["model_type"] = serde_json::json!("gpt_neox");
    std::fs::write(&p, cfg.to_string()).expect("write");
    let e = open_err(dir.path());
    assert!(e.contains("model_type") && e.contains("gpt_neox"), "{e}");
}

/// The real default model cut short: the error names the file and the first tensor whose data
/// is gone.
#[test]
fn truncated_gguf_names_the_file_and_tensor() {
    let m = openlora::model::default_model::ensure_default_model().expect("default model");
    let bytes = std::fs::read(&m).expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("cut.gguf");
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).expect("write");
    let e = open_err(&p);
    assert!(e.contains("cut.gguf") && e.contains("tensor `") && e.contains("truncated"), "{e}");
    // Cut inside the header: still a clean error naming the file.
    std::fs::write(&p, &bytes[..5000]).expect("write");
    let e = open_err(&p);
    assert!(e.contains("cut.gguf"), "{e}");
}
