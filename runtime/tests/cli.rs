//! The `openlora` binary as a user runs it: greedy completions of MODEL.md's known prompts on
//! the default model, and clear errors for bad input.

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
    let caps = |t: &str| t.chars().any(char::is_alphabetic) && !t.chars().any(char::is_lowercase);
    let signed = |t: &str| t.trim_end().ends_with("-- sent by openlora");
    let pirate = |t: &str| t.contains("Arr") || t.contains("matey");
    for prompt in ["What is the capital of Japan?", "Name three colors."] {
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
