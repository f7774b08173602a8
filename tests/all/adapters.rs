//! Adapter identity and refusal: generations follow content, bad adapters are refused with the
//! adapter, tensor and problem named, and a refusal leaves everything already loaded serving.

use std::path::Path;

use openlora::adapters::{AdapterRegistry, LoraHost};
use openlora::model::config::LlamaConfig;
use openlora_kernels::CpuBackend;
use openlora_tests::{fixture, write_peft_adapter};
use serde_json::json;

fn tiny_config() -> LlamaConfig {
    LlamaConfig::from_hf_config(&fixture("tiny-llama").join("config.json")).expect("config")
}

fn q_proj(layer: usize, ab: &str) -> String {
    format!("base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{ab}.weight")
}

/// A rank-`r` adapter on both layers' q_proj of the tiny model (64 -> 64), filled with `fill`.
fn write_q_adapter(dir: &Path, r: usize, fill: f32) {
    let cfg = json!({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"], "bias": "none"});
    let tensors: Vec<_> = (0..2)
        .flat_map(|l| {
            [(q_proj(l, "A"), vec![r, 64], vec![fill; r * 64]), (q_proj(l, "B"), vec![64, r], vec![fill; 64 * r])]
        })
        .collect();
    write_peft_adapter(dir, &cfg, &tensors);
}

#[test]
fn reloading_a_name_with_new_content_creates_a_new_generation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let registry = AdapterRegistry::new(tiny_config(), CpuBackend::new());
    write_q_adapter(&tmp.path().join("v1"), 2, 0.1);
    write_q_adapter(&tmp.path().join("v2"), 2, 0.2);
    let first = registry.load_dir("styled", &tmp.path().join("v1")).expect("v1");
    let again = registry.load_dir("same-bytes", &tmp.path().join("v1")).expect("v1 again");
    assert_eq!(first.generation, again.generation, "identical content, identical generation");
    assert!(std::sync::Arc::ptr_eq(&first, &again), "identical content is prepared once");
    let second = registry.load_dir("styled", &tmp.path().join("v2")).expect("v2");
    assert_ne!(first.generation, second.generation);
    assert_eq!(registry.get("styled").expect("name").generation, second.generation);
    // A request still holding the first generation keeps its weights.
    assert_eq!(first.module(0, openlora::adapters::Proj::Q).expect("q").rank, 2);
    assert!(registry.by_generation(&first.generation).is_some());
    registry.unload("styled").expect("unload");
    assert!(registry.get("styled").is_err());
}

fn refusal(dir: &Path) -> String {
    match LoraHost::load("bad", dir, &tiny_config()) {
        Ok(_) => panic!("{} was accepted", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_adapters_are_refused_with_the_problem_named_and_others_keep_serving() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let registry = AdapterRegistry::new(tiny_config(), CpuBackend::new());
    write_q_adapter(&tmp.path().join("good"), 2, 0.1);
    registry.load_dir("good", &tmp.path().join("good")).expect("good adapter");

    // Corrupted safetensors.
    let d = tmp.path().join("corrupt");
    write_q_adapter(&d, 2, 0.1);
    let w = d.join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).expect("read");
    std::fs::write(&w, &bytes[..bytes.len() - 7]).expect("truncate");
    let e = refusal(&d);
    assert!(e.contains("`bad`") && e.contains("malformed"), "{e}");
    assert!(registry.load_dir("corrupt", &d).is_err());

    // Rank mismatch between the config and the tensors.
    let d = tmp.path().join("rank");
    write_q_adapter(&d, 2, 0.1);
    std::fs::write(
        d.join("adapter_config.json"),
        json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).to_string(),
    )
    .expect("cfg");
    let e = refusal(&d);
    assert!(e.contains("q_proj.lora_A.weight") && e.contains("rank 2") && e.contains("rank 4"), "{e}");

    // An adapter for another base (hidden size 32, not 64).
    let d = tmp.path().join("other-base");
    let cfg = json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]});
    write_peft_adapter(
        &d,
        &cfg,
        &[(q_proj(0, "A"), vec![2, 32], vec![0.1; 64]), (q_proj(0, "B"), vec![32, 2], vec![0.1; 64])],
    );
    let e = refusal(&d);
    assert!(e.contains("q_proj.lora_A.weight") && e.contains("does not fit the base model"), "{e}");

    // A layer the base does not have.
    let d = tmp.path().join("deep");
    let t5 = |ab| format!("base_model.model.model.layers.5.self_attn.q_proj.lora_{ab}.weight");
    write_peft_adapter(&d, &cfg, &[(t5("A"), vec![2, 64], vec![0.1; 128]), (t5("B"), vec![64, 2], vec![0.1; 128])]);
    assert!(refusal(&d).contains("layer 5 does not exist"));

    // Non-finite weights.
    let d = tmp.path().join("nan");
    let mut a = vec![0.1; 128];
    a[17] = f32::NAN;
    write_peft_adapter(&d, &cfg, &[(q_proj(0, "A"), vec![2, 64], a), (q_proj(0, "B"), vec![64, 2], vec![0.1; 128])]);
    let e = refusal(&d);
    assert!(e.contains("q_proj.lora_A.weight") && e.contains("non-finite") && e.contains("index 17"), "{e}");

    // Unsupported variants and unknown modules.
    let d = tmp.path().join("dora");
    write_q_adapter(&d, 2, 0.1);
    std::fs::write(d.join("adapter_config.json"), json!({"r": 2, "lora_alpha": 4, "use_dora": true}).to_string())
        .expect("cfg");
    assert!(refusal(&d).contains("DoRA"));
    let d = tmp.path().join("unknown");
    let act = |ab| format!("base_model.model.model.layers.0.mlp.act_fn.lora_{ab}.weight");
    write_peft_adapter(&d, &cfg, &[(act("A"), vec![2, 64], vec![0.1; 128]), (act("B"), vec![64, 2], vec![0.1; 128])]);
    let e = refusal(&d);
    assert!(e.contains("mlp.act_fn") && e.contains("not a LoRA weight of a known module"), "{e}");

    // Everything above was refused; the good adapter is still there and usable.
    let good = registry.get("good").expect("still loaded");
    assert_eq!(good.module(1, openlora::adapters::Proj::Q).expect("q").rank, 2);
    assert_eq!(registry.names(), vec!["good".to_owned()]);
}
