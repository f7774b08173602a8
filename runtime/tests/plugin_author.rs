//! The plugin author's guide (plugin-sdk/README.md), followed literally with the real binary:
//! `openlora plugin new` in a temp dir, `cargo test`, `openlora plugin build`, `openlora plugin
//! check`, then a server whose deployment lists the plugin routes a request as the scaffold
//! says, and a changed build is reloaded without a restart. Also: every kind's scaffold passes
//! its own tests and the check, the example plugins' native tests pass, and `check` names what
//! is wrong with a bad component.
//!
//! Builds share `target/wasm-plugins` with `cargo xtask plugins` (and the scaffolds reuse the
//! example workspace's Cargo.lock), so the SDK and its dependencies compile once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Serving as Server, repo, serve};

/// The target directory the plugin builds share (not the host's: `cargo test` holds its lock).
fn shared_target() -> PathBuf {
    repo().join("target").join("wasm-plugins")
}

fn openlora(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_openlora"))
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", shared_target())
        .output()
        .expect("run openlora")
}

fn cargo(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO"))
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", shared_target())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("run cargo")
}

fn ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// `openlora plugin new NAME --kind KIND` in `dir`, with the example workspace's lock file so
/// nothing is resolved or rebuilt anew.
fn scaffold(dir: &Path, name: &str, kind: &str) -> PathBuf {
    ok("plugin new", openlora(dir, &["plugin", "new", name, "--kind", kind]));
    let crate_dir = dir.join(name);
    std::fs::copy(repo().join("plugins/Cargo.lock"), crate_dir.join("Cargo.lock")).expect("lock file");
    crate_dir
}

fn build(crate_dir: &Path) -> PathBuf {
    let printed = ok("plugin build", openlora(crate_dir, &["plugin", "build"]));
    let wasm = PathBuf::from(printed.trim());
    assert!(wasm.is_file(), "plugin build printed {printed:?}");
    wasm
}

#[test]
fn every_kind_scaffolds_tests_builds_and_checks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for kind in ["preprocessor", "merger", "attributor"] {
        let name = format!("my-{kind}");
        let crate_dir = scaffold(tmp.path(), &name, kind);
        let tests = ok("cargo test", cargo(&crate_dir, &["test", "--offline"]));
        assert!(tests.contains("test result: ok"), "{tests}");
        let wasm = build(&crate_dir);
        let checked = ok(
            "plugin check",
            openlora(&crate_dir, &["plugin", "check", wasm.to_str().expect("path"), "--kind", kind]),
        );
        assert!(checked.starts_with("ok: "), "{checked}");
        // Checked as another kind, it is refused with what to do.
        let other = if kind == "merger" { "router" } else { "merger" };
        let wrong = openlora(&crate_dir, &["plugin", "check", wasm.to_str().expect("path"), "--kind", other]);
        let err = String::from_utf8_lossy(&wrong.stderr);
        assert!(!wrong.status.success() && err.contains("does not export") && err.contains("what to do"), "{err}");
    }
    // An existing folder is not overwritten.
    let again = openlora(tmp.path(), &["plugin", "new", "my-merger", "--kind", "merger"]);
    assert!(!again.status.success(), "overwrote a crate");
}

#[test]
fn the_example_plugins_pass_their_native_tests() {
    let out = ok("cargo test (plugins/)", cargo(&repo().join("plugins"), &["test", "--offline", "--workspace"]));
    assert!(out.matches("test result: ok").count() >= 4, "{out}");
}

#[test]
fn check_names_what_is_wrong_with_a_core_module_and_a_failing_self_test() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let core = tmp.path().join("core.wasm");
    // The smallest core module: magic and version, no sections.
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let out = openlora(tmp.path(), &["plugin", "check", "core.wasm", "--kind", "router"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("encoded first"), "{err}");
    // A revenue split configured out of range refuses the self-test's record: a refusal is
    // allowed, so it loads; the chaos router panicking on every call is not.
    let fixtures = repo().join("target/plugins/fixtures");
    let chaos = fixtures.join("chaos-router.wasm");
    if !chaos.is_file() {
        ok(
            "cargo xtask plugins",
            Command::new(env!("CARGO")).args(["xtask", "plugins"]).current_dir(repo()).output().expect("xtask"),
        );
    }
    let out = openlora(
        tmp.path(),
        &["plugin", "check", chaos.to_str().expect("path"), "--kind", "router", "--config", "always=panic"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("panicked") && err.contains("self-test"), "{err}");
}

/// One request; the body parsed as JSON.
fn http(addr: std::net::SocketAddr, method: &str, path: &str, key: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, body) = common::http(addr, method, path, Some(key), body.as_bytes());
    (status, common::json(&body))
}

/// The adapters of the receipt of a chat request for the base model saying `text`.
fn routed(server: &Server, text: &str) -> Vec<String> {
    let req = serde_json::json!({
        "model": "SmolLM2-135M-Instruct", "max_tokens": 2,
        "messages": [{"role": "user", "content": text}],
    });
    let (st, v) = http(server.addr, "POST", "/v1/chat/completions", "sk-demo-user", &req.to_string());
    assert_eq!(st, 200, "{v}");
    let id = v["receipt"].as_str().expect("receipt");
    let (st, r) = http(server.addr, "GET", &format!("/v1/receipts/{id}"), "sk-demo-user", "");
    assert_eq!(st, 200, "{r}");
    let record = &r["body"]["record"];
    assert!(record["plugins"].as_array().is_some_and(|p| p.iter().any(|u| u["name"] == "my-router")), "{record}");
    record["adapters"]
        .as_array()
        .expect("adapters")
        .iter()
        .map(|a| a["name"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn the_authors_guide_end_to_end_scaffold_test_build_check_serve_reload() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // openlora plugin new my-router --kind router && cd my-router && cargo test
    let crate_dir = scaffold(tmp.path(), "my-router", "router");
    let tests = ok("cargo test", cargo(&crate_dir, &["test", "--offline"]));
    assert!(tests.contains("test result: ok. 2 passed"), "{tests}");
    // openlora plugin build && openlora plugin check target/plugin/my-router.wasm --kind router
    let wasm = build(&crate_dir);
    let checked = ok(
        "plugin check",
        openlora(&crate_dir, &["plugin", "check", wasm.to_str().expect("path"), "--kind", "router"]),
    );
    assert!(checked.starts_with("ok: "), "{checked}");

    // The quickstart with the scaffold in the keyword router's place, configured as its
    // README says.
    let quickstart = std::fs::read_to_string(repo().join("examples/quickstart.toml")).expect("quickstart");
    let start = quickstart.find("[[plugins]]\nname = \"keyword-router\"").expect("router entry");
    let end = start + quickstart[start..].find("[[plugins]]\nname = \"recipe-merger\"").expect("next entry");
    let entry = |keyword: &str| {
        format!(
            "[[plugins]]\nname = \"my-router\"\nkind = \"router\"\npath = {:?}\nfailure = \"open\"\n[plugins.config.keywords]\n{keyword} = \"caps\"\n\n",
            wasm.display().to_string()
        )
    };
    let plugins = repo().join("target/plugins");
    if !plugins.join("examples/prompt-guard.wasm").is_file() {
        ok(
            "cargo xtask plugins",
            Command::new(env!("CARGO")).args(["xtask", "plugins"]).current_dir(repo()).output().expect("xtask"),
        );
    }
    let deployment = |keyword: &str| {
        format!("{}{}{}", &quickstart[..start], entry(keyword), &quickstart[end..])
            .replace(
                "dirs = [\"adapters\"]",
                &format!("dirs = [{:?}]", repo().join("examples/adapters").display().to_string()),
            )
            .replace("state_dir = \"../.openlora-state\"", "state_dir = \"state\"")
            .replace("\"../target/plugins/", &format!("\"{}/", plugins.display()))
    };
    let config = tmp.path().join("deploy.toml");
    std::fs::write(&config, deployment("shout")).expect("write");
    let server = serve(&config);
    assert_eq!(routed(&server, "Please shout: hello"), ["caps"], "the keyword routes to its adapter");
    assert!(routed(&server, "hello").is_empty(), "no keyword: the default route");

    // Change the code (no keyword: route to `signature`) and the config (`yell`), rebuild,
    // reload: the entry is re-read from the deployment file, the new build swapped in.
    let src = crate_dir.join("src/lib.rs");
    let code = std::fs::read_to_string(&src).expect("source");
    let code = code.replacen(
        "        RouteDecision::DefaultRoute\n    }",
        "        RouteDecision::Adapters(vec![AdapterChoice { name: \"signature\".into(), weight: 1.0 }])\n    }",
        1,
    );
    assert!(code.contains("\"signature\""), "the scaffold's fallback line changed");
    std::fs::write(&src, code).expect("write source");
    assert_eq!(build(&crate_dir), wasm);
    std::fs::write(&config, deployment("yell")).expect("write");
    let (st, v) = http(server.addr, "POST", "/v1/admin/plugins/reload", "sk-demo-admin", r#"{"name": "my-router"}"#);
    assert_eq!(st, 200, "{v}");
    assert_eq!(routed(&server, "Please yell: hello"), ["caps"], "the new config");
    assert_eq!(routed(&server, "Please shout: hello"), ["signature"], "the new code");
}
