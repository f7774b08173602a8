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
