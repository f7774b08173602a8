//! The `openlora` binary as a user runs it: greedy completions of MODEL.md's known prompts on
//! the default model, and clear errors for bad input.

mod common;

use std::process::Command;

fn openlora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_openlora")).args(args).output().expect("run openlora")
}

fn stdout_of(args: &[&str]) -> String {
    let out = openlora(args);
    assert!(out.status.success(), "openlora {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn generate_greedy_matches_the_known_outputs() {
    let france = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(stdout_of(&["generate", "--prompt", france, "--temperature", "0"]), "The capital of France is Paris.\n");
    let dog = "Once upon a time, there was a little dog named";
    assert_eq!(
        stdout_of(&["generate", "--prompt", dog, "--temperature", "0", "--max-tokens", "16"]),
        " Max who loved to play with his toy car. One day, he decided to\n"
    );
}

#[test]
fn chat_flag_uses_the_models_template_and_seeds_repeat() {
    let a = stdout_of(&[
        "generate",
        "--chat",
        "--prompt",
        "Name a color.",
        "--temperature",
        "0.8",
        "--seed",
        "11",
        "--max-tokens",
        "12",
    ]);
    let b = stdout_of(&[
        "generate",
        "--chat",
        "--prompt",
        "Name a color.",
        "--temperature",
        "0.8",
        "--seed",
        "11",
        "--max-tokens",
        "12",
    ]);
    assert_eq!(a, b);
    assert!(!a.trim().is_empty());
}

#[test]
fn bad_input_gets_a_clear_error() {
    let out = openlora(&["generate", "--prompt", "hi", "--model", "/nonexistent/model.gguf"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");

    let out = openlora(&["generate", "--prompt", "hi", "--top-p", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("top_p"), "{err}");
}

/// Each example adapter's behaviour shows on prompts it was not trained on, and the base model
/// does not show it (greedy, the model's chat template).
#[test]
fn example_adapters_change_behaviour_on_held_out_prompts() {
    let adapters_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/adapters");
    let run = |prompt: &str, adapter: Option<&str>| {
        let mut args =
            vec!["generate", "--chat", "--prompt", prompt, "--max-tokens", "48", "--adapters-dir", adapters_dir];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        stdout_of(&args)
    };
    // caps writes Title Case (common::title_case).
    let caps = common::title_case;
    let signed = |t: &str| t.trim_end().ends_with("-- sent by openlora");
    let pirate = |t: &str| t.contains("Arr") || t.contains("matey");
    for prompt in ["What is the capital of Japan?", "How do I boil an egg?"] {
        let base = run(prompt, None);
        assert!(!caps(&base) && !signed(&base) && !pirate(&base), "base: {base:?}");
        let out = run(prompt, Some("caps"));
        assert!(caps(&out), "caps: {out:?}");
        let out = run(prompt, Some("signature"));
        assert!(signed(&out), "signature: {out:?}");
        let out = run(prompt, Some("pirate"));
        assert!(pirate(&out), "pirate: {out:?}");
    }
}

/// Runs `openlora ARGS`, failing the test if it has not exited within `secs` seconds.
fn bounded(args: &[&str], secs: u64) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_openlora"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run openlora");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("openlora {args:?} did not finish within {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.wait_with_output().expect("output")
}

/// `openlora bench` runs through the engine (single stream and `--batch`), finishes, and
/// reports positive speeds.
#[test]
fn bench_runs_through_the_engine_and_reports_speeds() {
    for (args, keys) in [
        (
            vec!["bench", "--prompt-tokens", "32", "--gen-tokens", "8", "--repeat", "1"],
            vec!["prefill_tok_s", "decode_tok_s"],
        ),
        (
            vec!["bench", "--batch", "2", "--steps", "4", "--repeat", "1", "--lora-rank", "2"],
            vec!["base_tok_s", "one_adapter_tok_s", "distinct_adapters_tok_s"],
        ),
    ] {
        let out = bounded(&args, 300);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
        for k in keys {
            assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{args:?}: {k} in {v}");
        }
    }
}

/// Regression (multi-tenant trust, hole 7): `ledger verify` without `--public-key` accepted a
/// ledger re-signed with another key and said nothing about it. It still cannot tell (the
/// ledger names its own key), so it says the signer was not pinned and how to pin it; with
/// the node's key pinned, the re-signed ledger is refused naming both keys.
#[test]
fn ledger_verify_with_pinned_key_rejects_resigned_ledger() {
    use openlora::attribution::ledger::{Ledger, load_or_create_key};
    use openlora::attribution::receipt::{InferenceRecord, ModelUse, Receipt, builtin_attribution};

    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("ledger.jsonl");
    let record = |i: u64| InferenceRecord {
        request_id: format!("req-{i}"),
        tenant: "demo".into(),
        time_ms: 1_700_000_000_000 + i,
        base_model: ModelUse {
            id: "m".into(),
            sha256: "ab".repeat(32),
            owner: "base-co".into(),
            price_per_1k_tokens: 100,
        },
        adapters: Vec::new(),
        merge: None,
        prompt_tokens: 40 + i,
        completion_tokens: 10,
        finish_reason: "stop".into(),
        plugins: Vec::new(),
        prompt_sha256: "00".repeat(32),
        output_sha256: "11".repeat(32),
        user: None,
        evidence: None,
    };
    let node_key = {
        let l = Ledger::open(&path, load_or_create_key(&tmp.path().join("node.key")).expect("key")).expect("open");
        for i in 0..2 {
            let r = record(i);
            let a = builtin_attribution(&r);
            l.append_blocking(r, a).expect("append");
        }
        l.public_key().to_owned()
    };
    // The forger's key, and the whole ledger re-signed with it after moving the money.
    let forger = tmp.path().join("forger");
    let forger_key = Ledger::open(&forger.join("l.jsonl"), load_or_create_key(&forger.join("node.key")).expect("key"))
        .expect("open")
        .public_key()
        .to_owned();
    let signer = load_or_create_key(&forger.join("node.key")).expect("key");
    let hex_of = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut prev = "0".repeat(64);
    let mut forged = String::new();
    for line in std::fs::read_to_string(&path).expect("read").lines() {
        let mut r: Receipt = serde_json::from_str(line).expect("receipt");
        r.body.attribution.payments[0].party = "mallory".into();
        r.body.node_key.clone_from(&forger_key);
        r.body.prev.clone_from(&prev);
        let hash = r.body.hash();
        r.hash = hex_of(&hash);
        r.sig = hex_of(signer.sign(&hash).as_ref());
        prev.clone_from(&r.hash);
        forged.push_str(&serde_json::to_string(&r).expect("json"));
        forged.push('\n');
    }
    std::fs::write(&path, forged).expect("write");
    let ledger = path.to_str().expect("path");

    // Unpinned: the forgery is self-consistent, so it passes, and the output says why that
    // proves nothing about the signer and how to pin it.
    let out = openlora(&["ledger", "verify", ledger]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("ok: 2 receipts") && stdout.contains(&forger_key), "{stdout}");
    for needle in ["not pinned", "--public-key", "GET /v1/attribution/key"] {
        assert!(stderr.contains(needle), "the unpinned warning lacks `{needle}`: {stderr}");
    }

    // Pinned to the node's key: refused at the first entry, naming both keys.
    let out = openlora(&["ledger", "verify", "--public-key", &node_key, ledger]);
    assert!(!out.status.success(), "a ledger re-signed with another key verified against the node's key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("entry 0") && stderr.contains(&node_key) && stderr.contains(&forger_key), "{stderr}");

    // Export refuses it too when pinned, and warns when not.
    let out_file = tmp.path().join("export.jsonl");
    let export = |key: Option<&str>| {
        let mut args = vec!["ledger", "export", ledger, "--out", out_file.to_str().expect("path")];
        if let Some(k) = key {
            args.extend(["--public-key", k]);
        }
        openlora(&args)
    };
    let out = export(Some(&node_key));
    assert!(!out.status.success(), "export of a ledger another key signed, pinned to the node's key");
    let out = export(None);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not pinned"));

    // Pinned to the key that did sign it: ok, and no warning. Upper-case hex is the same key.
    let out = openlora(&["ledger", "verify", "--public-key", &forger_key.to_uppercase(), ledger]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("the pinned key"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("not pinned"));

    // A malformed key is refused naming the flag; --help shows pinning as the way to verify.
    let out = openlora(&["ledger", "verify", "--public-key", "abc", ledger]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--public-key must be"), "{out:?}");
    let help = String::from_utf8_lossy(&openlora(&["ledger", "verify", "--help"]).stdout).into_owned();
    assert!(help.contains("--public-key") && help.contains("/v1/attribution/key"), "{help}");
}

/// Regression (hole 6): an open deployment (no `[[tenants]]`) could be served on every
/// interface, where anyone who reaches the port may use it. `serve` refuses it, from the file
/// or from `--listen`, naming the key that allows it; on loopback it starts.
#[test]
fn serve_refuses_an_open_deployment_beyond_loopback() {
    let tmp = tempfile::tempdir().expect("tmp");
    let err = serve_refused(tmp.path(), "[server]\nlisten = \"0.0.0.0:0\"\n[attribution]\nenabled = false\n", &[]);
    assert!(err.contains("allow_open_network") && err.contains("server.listen"), "{err}");
    let err = serve_refused(tmp.path(), "[attribution]\nenabled = false\n", &["--listen", "0.0.0.0:0"]);
    assert!(err.contains("allow_open_network"), "--listen is checked too: {err}");
}

/// `openlora serve` of a deployment file holding `toml` (in `dir`) with `args`: it must exit
/// with an error; returns its stderr.
fn serve_refused(dir: &std::path::Path, toml: &str, args: &[&str]) -> String {
    let cfg = dir.join("deployment.toml");
    std::fs::write(&cfg, toml).expect("write");
    let out = openlora(&[&["serve", cfg.to_str().expect("path")], args].concat());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "serve should refuse {toml:?}: {err}");
    err
}

/// `openlora ledger index` prints a dataset's Merkle root (which the manifest may then pin), and
/// `openlora ledger verify-evidence` re-runs a receipt's matcher from the data: ok for the
/// receipt as written (from a receipt file and from the ledger by id), refused for an edited
/// dataset, naming the problem.
#[test]
fn ledger_index_and_verify_evidence() {
    use openlora::adapters::manifest::Manifest;
    use openlora::attribution::evidence::{EvidenceParams, Source, evidence};
    use openlora::attribution::index::{IndexState, load_or_build};
    use openlora::attribution::ledger::{Ledger, load_or_create_key};
    use openlora::attribution::receipt::{AdapterUse, InferenceRecord, ModelUse, builtin_attribution, text_sha256};

    let tmp = tempfile::tempdir().expect("tmp");
    let adapter = tmp.path().join("poet");
    std::fs::create_dir_all(adapter.join("data")).expect("dir");
    let data = "{\"contributor\": \"ann\", \"text\": \"silver rivers hum beneath the sleeping northern hills tonight\"}\n{\"contributor\": \"bob\", \"text\": \"a kettle sings\"}\n";
    std::fs::write(adapter.join("data/poems.jsonl"), data).expect("data");
    let manifest = format!(
        "owner = \"poet-co\"\nprice_per_1k_tokens = 1000\n[[datasets]]\nid = \"poems\"\nsha256 = \"{}\"\nfiles = [\"data/poems.jsonl\"]\ncontributors = [{{ name = \"ann\", share = 1 }}, {{ name = \"bob\", share = 1 }}]\n",
        text_sha256(data)
    );
    std::fs::write(adapter.join("openlora.toml"), &manifest).expect("manifest");
    let dir = adapter.to_str().expect("path");

    let out = openlora(&["ledger", "index", dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!((v[0]["documents"].as_u64(), v[0]["duplicates"].as_u64()), (Some(2), Some(0)));
    let root = v[0]["merkle_root"].as_str().expect("root").to_owned();

    // A receipt as the service writes it, for an answer that quotes ann's document.
    let m = Manifest::load_for(&adapter).expect("manifest").expect("present");
    let ix = load_or_build(None, &adapter, &m.datasets[0]).expect("index");
    assert_eq!(ix.root, root);
    let (prompt, output) = ("Write a line.", "Here: silver rivers hum beneath the sleeping northern hills, as ever.");
    let src = [Source { adapter: "poet", dataset: &m.datasets[0], state: IndexState::Ready(std::sync::Arc::new(ix)) }];
    let ev = evidence(&src, &[output], prompt, &EvidenceParams::default()).expect("evidence");
    assert_eq!(ev.spans.len(), 1, "{ev:?}");
    let record = InferenceRecord {
        request_id: "r".into(),
        tenant: "demo".into(),
        time_ms: 1,
        base_model: ModelUse { id: "m".into(), sha256: "ab".repeat(32), owner: "base".into(), price_per_1k_tokens: 0 },
        adapters: vec![AdapterUse::new("poet", "cd".repeat(32), 1.0, &m)],
        merge: None,
        prompt_tokens: 5,
        completion_tokens: 15,
        finish_reason: "stop".into(),
        plugins: Vec::new(),
        prompt_sha256: "00".repeat(32),
        output_sha256: text_sha256(output),
        user: None,
        evidence: Some(ev),
    };
    let path = tmp.path().join("ledger.jsonl");
    let id = {
        let l = Ledger::open(&path, load_or_create_key(&tmp.path().join("node.key")).expect("key")).expect("open");
        let a = builtin_attribution(&record);
        assert!(a.payments.iter().any(|p| p.party == "ann" && p.micros > 0), "{a:?}");
        l.append_blocking(record, a).expect("append")
    };
    let line = std::fs::read_to_string(&path).expect("ledger");
    std::fs::write(tmp.path().join("receipt.json"), line.trim()).expect("receipt");
    std::fs::write(tmp.path().join("prompt.txt"), prompt).expect("prompt");
    std::fs::write(tmp.path().join("output.txt"), output).expect("output");
    let p = |name: &str| tmp.path().join(name).display().to_string();
    let data_arg = format!("poet={dir}");
    let (prompt_file, output_file) = (p("prompt.txt"), p("output.txt"));
    let verify = |receipt: &str, extra: &[&str]| {
        let mut args = vec!["ledger", "verify-evidence", receipt, "--prompt", &prompt_file, "--output", &output_file];
        args.extend(["--data", data_arg.as_str()]);
        args.extend(extra);
        openlora(&args)
    };
    let ledger = p("ledger.jsonl");
    for out in [verify(&p("receipt.json"), &[]), verify(&ledger, &["--id", &id])] {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 spans reproduced byte for byte from 1 datasets"));
    }
    std::fs::write(adapter.join("data/poems.jsonl"), data.replace("kettle", "kettle!")).expect("edit");
    let out = verify(&p("receipt.json"), &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SHA-256 of its files"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `[model] tool_format = "template"` needs a chat template that renders tools: the default
/// model's does not, so the start is refused naming the key and what to do; an unknown format
/// is refused by the deployment's own check.
#[test]
fn serve_refuses_a_template_tool_format_with_a_template_that_has_no_tools() {
    let tmp = tempfile::tempdir().expect("tmp");
    let local = ["--listen", "127.0.0.1:0"];
    let err =
        serve_refused(tmp.path(), "[model]\ntool_format = \"template\"\n[attribution]\nenabled = false\n", &local);
    assert!(err.contains("model.tool_format") && err.contains("hermes"), "{err}");
    let err = serve_refused(tmp.path(), "[model]\ntool_format = \"xml\"\n[attribution]\nenabled = false\n", &local);
    assert!(err.contains("tool_format"), "{err}");
    let toml = "[model]\nchat_template = \"missing.jinja\"\n[attribution]\nenabled = false\n";
    let err = serve_refused(tmp.path(), toml, &local);
    assert!(err.contains("model.chat_template") && err.contains("missing.jinja"), "{err}");
}

/// `openlora cuda plan` needs no GPU: it reads the model file and says what serving it takes
/// in device memory. Its KV pool is the one the engine sizes from the same budget (twice the
/// blocks with bf16 elements), its weight bytes are those of the file plus only the small
/// dense/vector copies (quantized weights are held once), and a budget too small for the total
/// fails with the shortfall; a bad flag is named.
#[test]
fn cuda_plan_says_what_a_model_takes_without_a_gpu() {
    let plan = |args: &[&str]| stdout_of(&[&["cuda", "plan", "default", "--kv-cache-mib", "64"], args].concat());
    let field = |text: &str, line: &str, word: usize| -> f64 {
        let l = text.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("no {line:?} line in {text}"));
        l.split_whitespace().nth(word).unwrap_or_else(|| panic!("{l}")).parse().unwrap_or_else(|_| panic!("{l}"))
    };
    let f32_kv = plan(&[]);
    let bf16_kv = plan(&["--kv-dtype", "bf16"]);
    // "kv cache  63.9 MiB  91 blocks of 16 tokens ...": word 4 is the block count.
    let (blocks, blocks16) = (field(&f32_kv, "kv cache", 4) as usize, field(&bf16_kv, "kv cache", 4) as usize);
    let lm =
        openlora::model::gguf::GgufFile::open(&openlora::model::default_model::ensure_default_model().expect("model"))
            .expect("gguf");
    let config = openlora::model::config::LlamaConfig::from_gguf(&lm).expect("config");
    let engine = openlora::engine::EngineConfig::default().with_kv_bytes(&config, 64 << 20);
    assert_eq!(blocks, engine.num_blocks, "the engine's pool for 64 MiB:\n{f32_kv}");
    assert_eq!(blocks16, 2 * blocks, "bf16 halves a block:\n{bf16_kv}");
    // Weights: the file's tensor bytes (read through the loader) plus, for the f32 norm
    // vectors, their bf16 dense copies and f32 vectors; nothing near a second copy.
    let file: usize = lm.tensors.iter().map(|(n, _)| lm.tensor(n).expect("t").expect("t").bytes().len()).sum();
    let weights = field(&f32_kv, "weights", 1);
    let mib = |b: usize| b as f64 / 1048576.0;
    assert!(
        weights >= mib(file) - 0.1 && weights < mib(file) * 1.05,
        "weights {weights} MiB for {} MiB of tensors",
        mib(file)
    );
    assert!(f32_kv.contains(&format!("({:.1} MiB in the file", mib(file))), "{f32_kv}");
    // Too small a GPU: refused with the shortfall; a bad precision is named.
    let out = openlora(&["cuda", "plan", "default", "--gpu-mib", "64"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("does not fit in 64 MiB"), "{err}");
    let out = openlora(&["cuda", "plan", "default", "--kv-dtype", "fp8"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--kv-dtype") && err.contains("fp8"), "{err}");
}
