//! Inputs the fuzzer (or reading the code it runs) found mishandled, one test each, named after
//! what must happen now. Each runs its target under the allocation guard, as the fuzzer does.

use openlora_tests::fuzz_targets::{self, Meta, tiny_gguf};

use super::{ALLOC_LIMIT, alloc};

/// Runs `target` on `input` guarded and returns its refusal; fails if it panicked or accepted.
fn refused(target: &'static str, input: &[u8]) -> String {
    let run = fuzz_targets::TARGETS.iter().find(|(n, _)| *n == target).map(|(_, f)| *f).expect("target");
    let _guard = alloc::Guarded::new(ALLOC_LIMIT, target, 0, 0, input);
    match std::panic::catch_unwind(|| run(input)) {
        Ok(Err(e)) => e,
        Ok(Ok(())) => panic!("`{target}` accepted the input"),
        Err(_) => panic!("`{target}` panicked"),
    }
}

fn accepted(target: &'static str, input: &[u8]) {
    let run = fuzz_targets::TARGETS.iter().find(|(n, _)| *n == target).map(|(_, f)| *f).expect("target");
    if let Err(e) = run(input) {
        panic!("`{target}` refused the input: {e}");
    }
}

/// `llama.context_length = 2^40` sized the RoPE table (positions x head_dim / 2 values, twice)
/// from the header: a multi-terabyte allocation before the first token.
#[test]
fn gguf_huge_context_length_is_refused() {
    accepted("gguf", &tiny_gguf(&[]));
    for v in [1u64 << 40, u64::MAX] {
        let e = refused("gguf", &tiny_gguf(&[("llama.context_length", Meta::U64(v))]));
        assert!(e.contains("max_position_embeddings") && e.contains("model.gguf"), "{e}");
    }
    let e = refused("gguf", &tiny_gguf(&[("llama.context_length", Meta::U32(0))]));
    assert!(e.contains("max_position_embeddings") && e.contains("positive"), "{e}");
}

/// `llama.block_count = u64::MAX` reserved a vector of that many layers (capacity overflow) before
/// looking for the second layer's tensors.
#[test]
fn gguf_huge_block_count_is_refused() {
    for v in [1u64 << 40, u64::MAX] {
        let e = refused("gguf", &tiny_gguf(&[("llama.block_count", Meta::U64(v))]));
        assert!(e.contains("num_hidden_layers"), "{e}");
    }
}

/// Dimensions whose products overflow (`head_count * key_length`) are refused by name before
/// anything is sized from them.
#[test]
fn gguf_overflowing_dimensions_are_refused() {
    let e = refused(
        "gguf",
        &tiny_gguf(&[
            ("llama.attention.head_count", Meta::U64(1 << 33)),
            ("llama.attention.head_count_kv", Meta::U64(1 << 33)),
            ("llama.attention.key_length", Meta::U64(1 << 33)),
        ]),
    );
    assert!(e.contains("num_attention_heads") || e.contains("head_dim"), "{e}");
    let e = refused("gguf", &tiny_gguf(&[("llama.attention.layer_norm_rms_epsilon", Meta::F32(f32::NAN))]));
    assert!(e.contains("rms_norm_eps"), "{e}");
}

/// A `config.json` with `head_dim` 2^60 and rope scaling built a scaling vector of 2^59 floats
/// before the dimensions were checked.
#[test]
fn hf_config_huge_head_dim_is_refused_before_rope_scaling() {
    let config = r#"{"model_type":"llama","hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,
        "head_dim":1152921504606846976,"intermediate_size":16,"vocab_size":16,
        "rope_scaling":{"rope_type":"linear","factor":2.0}}"#;
    let e = refused("hf_config", config.as_bytes());
    assert!(e.contains("head_dim"), "{e}");
}

/// An adapter header whose shape has `rows * cols * 4` past u64 (`[4611686018427387904, 1]` in
/// f32) overflowed the catalog's size check (a panic in debug builds, a wrong size in release).
#[test]
fn adapter_header_shape_overflow_is_refused() {
    let t = |shape: Vec<usize>| {
        fuzz_targets::safetensors_bytes(
            &[("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(), "F32", shape, vec![0; 64])],
            None,
        )
    };
    for shape in [vec![1 << 62, 1], vec![1 << 61, 2], vec![usize::MAX, 1]] {
        let e = refused("adapter_weights", &t(shape));
        assert!(e.contains("q_proj.lora_A.weight"), "{e}");
    }
}

/// The full load read `adapter_config.json` into its struct, skipping unknown keys without
/// checking them, while registration reads the whole document: a number out of range
/// (`"x": 1e309`) or invalid UTF-8 in a skipped key was refused at registration and accepted by
/// the load. Both now read the same JSON and refuse it alike.
#[test]
fn peft_config_invalid_json_in_skipped_keys_is_refused_by_registration_and_load() {
    let valid = fuzz_targets::tiny_adapter_config();
    accepted("peft_config", &valid);
    let with = |extra: &[u8]| {
        let mut c = valid.clone();
        let close = c.iter().rposition(|&b| b == b'}').expect("object");
        c.splice(close..close, extra.iter().copied());
        c
    };
    for extra in [&b",\"x\":1e309"[..], b",\"target_modules\":[\"q_\xf0roj\"]"] {
        let e = refused("peft_config", &with(extra));
        assert!(e.contains("registration: ") && e.contains("load: ") && e.contains("(json)"), "{e}");
    }
}
