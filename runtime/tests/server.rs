//! `openlora serve` end to end: the real binary on 127.0.0.1, driven by the official `openai`
//! Python package, curl, and a raw HTTP client for malformed input.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Serving, http, json, repo, title_case};

const MODEL: &str = "SmolLM2-135M-Instruct";

/// A running quickstart server and the folder of its deployment.
struct Server {
    serving: Serving,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl std::ops::Deref for Server {
    type Target = Serving;
    fn deref(&self) -> &Serving {
        &self.serving
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Serving {
        &mut self.serving
    }
}

/// Starts `openlora serve` on the quickstart deployment (copied, with its adapters folder
/// pointing at the examples) plus `extra` TOML appended, on a free port.
fn start(edit: impl Fn(String) -> String) -> Server {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut s = start_in(tmp.path(), edit);
    s._tmp = Some(tmp);
    s
}

/// Builds the example and fixture plugins (`cargo xtask plugins`; a no-op when up to date).
fn plugins_built() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let st =
                Command::new(env!("CARGO")).args(["xtask", "plugins"]).current_dir(repo()).status().expect("xtask");
            assert!(st.success(), "cargo xtask plugins failed");
            repo().join("target/plugins")
        })
        .clone()
}

/// Like [`start`], with the deployment and its state (key, ledger) in `dir`.
fn start_in(dir: &std::path::Path, edit: impl Fn(String) -> String) -> Server {
    let plugins = plugins_built();
    let quickstart = std::fs::read_to_string(repo().join("examples/quickstart.toml")).expect("quickstart");
    let adapters = repo().join("examples/adapters");
    let toml = edit(
        quickstart
            .replace("dirs = [\"adapters\"]", &format!("dirs = [{:?}]", adapters.display().to_string()))
            .replace("state_dir = \"../.openlora-state\"", "state_dir = \"state\"")
            .replace("\"../target/plugins/", &format!("\"{}/", plugins.display())),
    );
    let cfg = dir.join("deploy.toml");
    std::fs::write(&cfg, toml).expect("write");
    Server { serving: common::serve(&cfg), dir: dir.to_path_buf(), _tmp: None }
}

/// Asserts an OpenAI-shaped error with `status`.
fn assert_error(got: (u16, String), status: u16, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    let v = json(&got.1);
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {}", got.1);
    assert!(v["error"]["type"].is_string(), "{what}: {}", got.1);
}

fn chat_body(model: &str, q: &str, max_tokens: i64) -> Vec<u8> {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0})
        .to_string()
        .into_bytes()
}

/// What the client venv holds: the `openai` package, `prometheus-client`, and `selenium` (for
/// the console in headless Chromium).
const CLIENT_PACKAGES: [&str; 3] = ["openai==1.109.1", "prometheus-client==0.23.1", "selenium==4.51.0"];

/// A venv with [`CLIENT_PACKAGES`], created in the cache on first use (and completed when the
/// list changes: the stamp records what was installed).
fn client_python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let cache = std::env::var_os("OPENLORA_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/openlora"));
        let venv = cache.join("venv-client");
        let py = venv.join("bin/python");
        let ready = venv.join(".ready");
        let want = CLIENT_PACKAGES.join("\n");
        if std::fs::read_to_string(&ready).ok().as_deref() != Some(want.as_str()) {
            let run = |cmd: &mut Command| {
                let st = cmd.status().expect("run");
                assert!(st.success(), "{cmd:?} failed");
            };
            if !py.exists() {
                run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
            }
            run(Command::new(venv.join("bin/pip")).args(["install", "-q"]).args(CLIENT_PACKAGES));
            std::fs::write(&ready, want).expect("stamp");
        }
        py
    })
    .clone()
}

/// Issue 17, structured output and tool calls: `parse(response_format=PydanticModel)` on 20
/// prompts, `json_object`, vLLM's `guided_*` fields, streaming, `logit_bias` under a grammar, and
/// `tool_choice` required/named/streamed/`pydantic_function_tool`, through the official `openai`
/// package (tests/e2e/structured.py).
#[test]
fn structured_output_works_through_the_openai_client() {
    let server = start(|t| t);
    python_check(&client_python(), "tests/e2e/structured.py", &server, "all structured-output checks passed");
    let m = http(server.addr, "GET", "/metrics", Some("sk-demo-admin"), b"").1;
    let (masks, secs) = (metric(&m, "openlora_grammar_masks_total"), metric(&m, "openlora_grammar_mask_seconds_total"));
    assert!(masks > 100.0 && secs > 0.0, "grammar masks {masks}, {secs} s");
}

/// Runs a Python check script against `server` (`SCRIPT BASE_URL MODEL`) and asserts it exits
/// 0 and prints `done` (so a script that stops early cannot pass).
fn python_check(python: &std::path::Path, script: &str, server: &Server, done: &str) {
    let out = Command::new(python)
        .arg(repo().join(script))
        .arg(format!("http://{}", server.addr))
        .arg(MODEL)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(done), "{stdout}");
}

#[test]
fn the_openai_python_client_works_end_to_end() {
    let server = start(|t| t);
    python_check(&client_python(), "tests/e2e/openai_client.py", &server, "all openai-client checks passed");
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS", "--max-time", "120"]).args(args).output().expect("curl");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn curl_auth_visibility_admin_and_malformed_input() {
    let server = start(|t| t.replace("max_body_bytes = 1048576", "max_body_bytes = 65536"));
    // The quickstart says device = "auto": with no GPU the server runs on the CPU and says why
    // in one line; with one, the start line names the CUDA device.
    let all = server.startup.join("\n");
    let serving = server.startup.last().expect("start line");
    if std::path::Path::new("/dev/nvidia0").exists() {
        assert!(serving.contains("(cuda:0 "), "a GPU is present but the server did not use it: {all}");
    } else {
        assert!(
            all.contains("device \"auto\": no usable CUDA GPU") && all.contains("running on the CPU"),
            "no fallback line: {all}"
        );
        assert!(serving.contains("(cpu ("), "the start line should name the CPU backend: {serving}");
    }
    let a = server.addr;
    let base = format!("http://{a}");
    // curl, as the quickstart comments show it: chat, and SSE streaming.
    let body = String::from_utf8(chat_body("signature", "What is the capital of France?", 48)).expect("utf-8");
    let out = curl(&[
        &format!("{base}/v1/chat/completions"),
        "-H",
        "Authorization: Bearer sk-demo-user",
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
    ]);
    let v = json(&out);
    let text = v["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(text.ends_with("-- sent by openlora"), "signature adapter through curl: {text:?}");
    let sse = curl(&[
        "-N",
        &format!("{base}/v1/completions"),
        "-H",
        "Authorization: Bearer sk-demo-user",
        "-H",
        "Content-Type: application/json",
        "-d",
        &format!(r#"{{"model": "{MODEL}", "prompt": "Once upon a time", "max_tokens": 4, "stream": true}}"#),
    ]);
    let events: Vec<&str> = sse.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{sse}");
    assert!(events.len() >= 5, "one event per token, a finish and [DONE]: {sse}");

    // Auth.
    assert_error(http(a, "GET", "/v1/models", None, b""), 401, "missing key");
    assert_error(http(a, "GET", "/v1/models", Some("sk-nope"), b""), 401, "wrong key");
    let load =
        serde_json::json!({"lora_name": "caps2", "lora_path": repo().join("examples/adapters/caps")}).to_string();
    assert_error(http(a, "POST", "/v1/load_lora_adapter", Some("sk-demo-user"), load.as_bytes()), 403, "user loads");
    assert_error(
        http(a, "POST", "/v1/unload_lora_adapter", Some("sk-demo-user"), br#"{"lora_name": "caps"}"#),
        403,
        "user unloads",
    );
    // A private adapter is invisible and unusable to other tenants.
    let models = http(a, "GET", "/v1/models", Some("sk-demo-user"), b"").1;
    assert!(!models.contains("\"pirate\""), "{models}");
    assert_error(
        http(a, "POST", "/v1/chat/completions", Some("sk-demo-user"), &chat_body("pirate", "hi", 4)),
        404,
        "private adapter",
    );
    let composed = serde_json::json!({"model": MODEL, "adapters": [{"name": "pirate", "weight": 1.0}], "prompt": "x", "max_tokens": 2});
    assert_error(
        http(a, "POST", "/v1/completions", Some("sk-demo-user"), composed.to_string().as_bytes()),
        404,
        "private adapter through `adapters`",
    );

    // Runtime load makes an adapter usable without restart; unload makes it 404.
    assert_error(
        http(a, "POST", "/v1/chat/completions", Some("sk-demo-user"), &chat_body("caps2", "hi", 4)),
        404,
        "before load",
    );
    let (st, msg) = http(a, "POST", "/v1/load_lora_adapter", Some("sk-demo-admin"), load.as_bytes());
    assert_eq!(st, 200, "{msg}");
    let (st, body) = http(
        a,
        "POST",
        "/v1/chat/completions",
        Some("sk-demo-user"),
        &chat_body("caps2", "What is the capital of France?", 24),
    );
    assert_eq!(st, 200, "{body}");
    let t = json(&body)["choices"][0]["message"]["content"].as_str().expect("content").to_owned();
    assert!(title_case(&t), "the loaded caps adapter capitalises every word: {t:?}");
    let (st, msg) = http(a, "POST", "/v1/unload_lora_adapter", Some("sk-demo-admin"), br#"{"lora_name": "caps2"}"#);
    assert_eq!(st, 200, "{msg}");
    assert_error(
        http(a, "POST", "/v1/chat/completions", Some("sk-demo-user"), &chat_body("caps2", "hi", 4)),
        404,
        "after unload",
    );
    assert_error(
        http(a, "POST", "/v1/unload_lora_adapter", Some("sk-demo-admin"), br#"{"lora_name": "caps2"}"#),
        404,
        "unload twice",
    );
    let bad_load = serde_json::json!({"lora_name": "broken", "lora_path": "/nonexistent/adapter"}).to_string();
    assert_error(http(a, "POST", "/v1/load_lora_adapter", Some("sk-demo-admin"), bad_load.as_bytes()), 400, "bad path");

    // Bad input, each with the OpenAI error shape.
    let k = Some("sk-demo-user");
    assert_error(http(a, "POST", "/v1/chat/completions", k, b"{\"model\": "), 400, "malformed JSON");
    assert_error(http(a, "POST", "/v1/chat/completions", k, &chat_body("nope", "hi", 4)), 404, "unknown model");
    assert_error(http(a, "POST", "/v1/chat/completions", k, &chat_body(MODEL, "hi", -5)), 400, "negative max_tokens");
    assert_error(http(a, "POST", "/v1/chat/completions", k, &vec![b' '; 70_000]), 413, "oversized body");
    assert_error(
        http(a, "POST", "/v1/completions", k, b"{\"model\": \"x\", \"prompt\": \"\xff\xfe\"}"),
        400,
        "invalid UTF-8",
    );
    assert_error(http(a, "POST", "/v1/completions", k, br#"{"model": "SmolLM2-135M-Instruct"}"#), 400, "no prompt");
    assert_error(http(a, "GET", "/v1/nothing", k, b""), 404, "unknown route");

    // 1,000 random malformed requests, then a valid one succeeds.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let valid = br#"{"model": "SmolLM2-135M-Instruct", "prompt": "hello", "max_tokens": 1}"#.to_vec();
    for i in 0..1000 {
        let mut body = valid.clone();
        match i % 4 {
            0 => body.truncate((rnd() as usize) % body.len()),
            1 => {
                for _ in 0..3 {
                    let at = (rnd() as usize) % body.len();
                    body[at] = (rnd() % 256) as u8;
                }
            }
            2 => body = (0..(rnd() % 200)).map(|_| (rnd() % 256) as u8).collect(),
            _ => {
                let fields = ["max_tokens", "prompt", "model", "temperature", "n", "stop", "logprobs", "top_p"];
                let f = fields[(rnd() as usize) % fields.len()];
                let vals = ["-1", "\"x\"", "[]", "{}", "null", "1e309", "[1,[2]]", "99999999999", "true"];
                let v = vals[(rnd() as usize) % vals.len()];
                body = format!(r#"{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 1, "{f}": {v}}}"#).into_bytes();
            }
        }
        let path = if i % 2 == 0 { "/v1/completions" } else { "/v1/chat/completions" };
        let (st, resp) = http(a, "POST", path, k, &body);
        assert!(st != 0 && st != 500, "request {i} ({:?}) got {st}: {resp}", String::from_utf8_lossy(&body));
        if st != 200 {
            assert!(json(&resp)["error"]["message"].is_string(), "request {i}: {resp}");
        }
    }
    let (st, body) = http(a, "POST", "/v1/completions", k, &valid);
    assert_eq!(st, 200, "{body}");
    assert_eq!(http(a, "GET", "/health", None, b"").0, 200);
}

#[test]
fn a_tenant_over_its_concurrency_limit_gets_429_and_shutdown_drains_in_flight_requests() {
    let server = start(|t| t.replacen("max_concurrent = 32", "max_concurrent = 1", 1));
    let a = server.addr;
    let long = serde_json::json!({"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 200, "ignore_eos": true, "stream": true});
    let first = std::thread::spawn(move || {
        http(a, "POST", "/v1/completions", Some("sk-demo-user"), long.to_string().as_bytes())
    });
    // Wait until it runs, then a second request of the same tenant is refused.
    let start = Instant::now();
    loop {
        let m = http(a, "GET", "/metrics", Some("sk-demo-admin"), b"").1;
        if m.contains("vllm:num_requests_running{model_name=\"SmolLM2-135M-Instruct\"} 1") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the first request never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_error(
        http(a, "POST", "/v1/chat/completions", Some("sk-demo-user"), &chat_body(MODEL, "hi", 2)),
        429,
        "second request",
    );
    // SIGTERM while it streams: it still completes.
    let st = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().expect("kill");
    assert!(st.success());
    let (status, body) = first.join().expect("join");
    assert_eq!(status, 200);
    assert!(body.contains("\"finish_reason\":\"length\"") && body.trim_end().ends_with("data: [DONE]"), "{body}");
    let mut server = server;
    let code = server.child.wait().expect("wait");
    assert!(code.success(), "the server exits cleanly after draining: {code:?}");
}

#[test]
fn a_composed_request_gets_a_receipt_naming_both_adapters_datasets_and_shares() {
    let server = start(|t| t);
    let a = server.addr;
    let body = serde_json::json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 24,
        "temperature": 0, "adapters": [{"name": "pirate", "weight": 1.0}, {"name": "signature", "weight": 0.5}],
    });
    let (st, resp) = http(a, "POST", "/v1/chat/completions", Some("sk-demo-partner"), body.to_string().as_bytes());
    assert_eq!(st, 200, "{resp}");
    let v = json(&resp);
    let id = v["receipt"].as_str().expect("receipt id in the body").to_owned();
    let (st, receipt) = http(a, "GET", &format!("/v1/receipts/{id}"), Some("sk-demo-partner"), b"");
    assert_eq!(st, 200, "{receipt}");
    let r = json(&receipt);
    let rec = &r["body"]["record"];
    assert_eq!(rec["tenant"], "partner");
    assert_eq!(rec["request_id"], v["id"]);
    let adapters = rec["adapters"].as_array().expect("adapters");
    assert_eq!(adapters.len(), 2);
    assert_eq!(adapters[0]["name"], "pirate");
    assert_eq!(adapters[1]["name"], "signature");
    assert_eq!(adapters[1]["weight"], 0.5);
    for ad in adapters {
        assert_eq!(ad["generation"].as_str().map(str::len), Some(64), "generation hash: {ad}");
        let ds = ad["datasets"].as_array().expect("datasets");
        assert_eq!(ds.len(), 2, "{ad}");
        assert!(ds[0]["contributors"].as_array().is_some_and(|c| c.len() == 2));
    }
    assert_eq!(rec["completion_tokens"], v["usage"]["completion_tokens"]);
    let att = &r["body"]["attribution"];
    let total = att["total_micros"].as_u64().expect("total");
    let tokens = rec["prompt_tokens"].as_u64().expect("p") + rec["completion_tokens"].as_u64().expect("c");
    assert_eq!(total, tokens * (1000 + 2500 + 500) / 1000, "price = tokens x (base + pirate + signature) / 1000");
    let payments = att["payments"].as_array().expect("payments");
    assert_eq!(payments.iter().map(|p| p["micros"].as_u64().expect("micros")).sum::<u64>(), total);
    for party in ["huggingface-smollm", "blackbeard-labs", "anne", "mary", "openlora-examples"] {
        assert!(payments.iter().any(|p| p["party"] == party), "{party} is paid: {payments:?}");
    }
    // Only the tenant (or an admin) reads it.
    assert_error(
        http(a, "GET", &format!("/v1/receipts/{id}"), Some("sk-demo-user"), b""),
        404,
        "other tenant's receipt",
    );
    assert_eq!(http(a, "GET", &format!("/v1/receipts/{id}"), Some("sk-demo-admin"), b"").0, 200);
    let key = json(&http(a, "GET", "/v1/attribution/key", None, b"").1);
    assert_eq!(key["public_key"], r["body"]["node_key"]);
    // The ledger verifies against the served key.
    let ledger = server.dir.join("state/ledger.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_openlora"))
        .args([
            "ledger",
            "verify",
            ledger.to_str().expect("path"),
            "--public-key",
            key["public_key"].as_str().expect("key"),
        ])
        .output()
        .expect("verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: 1 receipts"));
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_receipt() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_in(tmp.path(), |t| t);
    let a = server.addr;
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let acked = acknowledged.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let body = serde_json::json!({"model": if (w + i) % 2 == 0 { "caps" } else { MODEL }, "prompt": format!("Item {w}-{i}:"), "max_tokens": 3});
                    let mut s = match TcpStream::connect(a) {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    let b = body.to_string();
                    let req = format!(
                        "POST /v1/completions HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer sk-demo-user\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                        b.len()
                    );
                    if s.write_all(req.as_bytes()).is_err() {
                        return;
                    }
                    let mut raw = String::new();
                    if s.read_to_string(&mut raw).is_err() {
                        return;
                    }
                    let Some((_, body)) = raw.split_once("\r\n\r\n") else { return };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else { return };
                    if let Some(id) = v["receipt"].as_str() {
                        acked.lock().expect("lock").push(id.to_owned());
                    }
                }
            })
        })
        .collect();
    // Kill it hard once some receipts are out.
    let start = Instant::now();
    while acknowledged.lock().expect("lock").len() < 40 {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut server = server;
    server.child.kill().expect("SIGKILL");
    let _ = server.child.wait();
    for w in workers {
        let _ = w.join();
    }
    let acked = acknowledged.lock().expect("lock").clone();
    drop(server);
    // The killed server's lock file stays behind, but its OS lock died with it; its key stays.
    let lock = tmp.path().join("state/ledger.jsonl.lock");
    assert!(lock.exists(), "the lock file of the killed server");
    let key = std::fs::read(tmp.path().join("state/node.key")).expect("node key");
    // Restart on the same state (recovery cuts a torn tail, the stale lock is taken, the key is
    // checked against the receipts it signed), then verify.
    let again = start_in(tmp.path(), |t| t);
    assert_eq!(std::fs::read(tmp.path().join("state/node.key")).expect("node key"), key, "the same key signs on");
    assert!(
        std::fs::read_to_string(&lock).expect("lock").contains(&again.child.id().to_string()),
        "the restarted server holds the lock"
    );
    let ledger = tmp.path().join("state/ledger.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_openlora"))
        .args(["ledger", "verify", ledger.to_str().expect("path")])
        .output()
        .expect("verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&ledger).expect("ledger");
    for id in &acked {
        assert!(text.contains(&format!("\"hash\":\"{id}\"")), "acknowledged receipt {id} was lost");
    }
    // The restarted server keeps appending to the same chain.
    let (st, body) = http(
        again.addr,
        "POST",
        "/v1/completions",
        Some("sk-demo-user"),
        format!(r#"{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 1}}"#).as_bytes(),
    );
    assert_eq!(st, 200, "{body}");
    drop(again);
    let out = Command::new(env!("CARGO_BIN_EXE_openlora"))
        .args(["ledger", "verify", ledger.to_str().expect("path")])
        .output()
        .expect("verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn receipt_of(a: SocketAddr, key: &str, resp: &str) -> serde_json::Value {
    let id = json(resp)["receipt"].as_str().expect("receipt").to_owned();
    let (st, body) = http(a, "GET", &format!("/v1/receipts/{id}"), Some(key), b"");
    assert_eq!(st, 200, "{body}");
    json(&body)
}

#[test]
fn the_quickstart_plugins_redact_route_merge_and_split_through_http() {
    let server = start(|t| t);
    let a = server.addr;
    let k = Some("sk-demo-user");
    let chat = |content: &str| {
        serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0})
            .to_string()
    };
    // The e-mail and phone number never reach the model: the prompt the model saw (its hash in
    // the receipt) is the one with the placeholders.
    let (st, with_pii) = http(
        a,
        "POST",
        "/v1/chat/completions",
        k,
        chat("Mail ada@example.com or call +1 555 123 4567 today.").as_bytes(),
    );
    assert_eq!(st, 200, "{with_pii}");
    let (st, redacted) =
        http(a, "POST", "/v1/chat/completions", k, chat("Mail [email] or call [phone] today.").as_bytes());
    assert_eq!(st, 200, "{redacted}");
    let r1 = receipt_of(a, "sk-demo-user", &with_pii);
    let r2 = receipt_of(a, "sk-demo-user", &redacted);
    assert_eq!(
        r1["body"]["record"]["prompt_sha256"], r2["body"]["record"]["prompt_sha256"],
        "the model saw the redacted prompt"
    );
    let (_, plain) = http(a, "POST", "/v1/chat/completions", k, chat("Mail ada@example.com today.").as_bytes());
    let r3 = receipt_of(a, "sk-demo-user", &plain);
    assert_ne!(r3["body"]["record"]["prompt_sha256"], r1["body"]["record"]["prompt_sha256"]);
    let names: Vec<&str> = r1["body"]["record"]["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["prompt-guard", "keyword-router", "revenue-split"]);
    assert!(r1["body"]["record"]["adapters"].as_array().is_some_and(Vec::is_empty), "no keyword: the base model");

    // A keyword routes to its adapter.
    let (st, shout) =
        http(a, "POST", "/v1/chat/completions", k, chat("Please shout: what is the capital of France?").as_bytes());
    assert_eq!(st, 200, "{shout}");
    let text = json(&shout)["choices"][0]["message"]["content"].as_str().expect("text").to_owned();
    assert!(title_case(&text), "routed to caps: {text:?}");
    let r = receipt_of(a, "sk-demo-user", &shout);
    assert_eq!(r["body"]["record"]["adapters"][0]["name"], "caps");
    // The attributor's split: the platform's 5% first, all parts summing to the price.
    let att = &r["body"]["attribution"];
    assert!(att["attributor"].as_str().is_some_and(|s| s.starts_with("plugin revenue-split@")), "{att}");
    let total = att["total_micros"].as_u64().expect("total");
    let payments = att["payments"].as_array().expect("payments");
    assert_eq!(payments.iter().map(|p| p["micros"].as_u64().expect("micros")).sum::<u64>(), total);
    let platform = payments.iter().find(|p| p["party"] == "openlora").expect("platform cut");
    assert_eq!(platform["micros"].as_u64(), Some(total * 500 / 10_000));

    // The merger picks the recipe from the request's metadata.
    let merge = serde_json::json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0,
        "adapters": [{"name": "caps", "weight": 1.0}, {"name": "signature", "weight": 1.0}],
        "merge": {}, "metadata": {"merge": "ties"},
    });
    let (st, merged) = http(a, "POST", "/v1/chat/completions", k, merge.to_string().as_bytes());
    assert_eq!(st, 200, "{merged}");
    let r = receipt_of(a, "sk-demo-user", &merged);
    assert!(r["body"]["record"]["merge"].as_str().is_some_and(|m| m.starts_with("ties ")), "{}", r["body"]["record"]);
    let metrics = http(a, "GET", "/metrics", Some("sk-demo-admin"), b"").1;
    assert!(metrics.contains("openlora_plugin_calls_total{model_name=\"SmolLM2-135M-Instruct\",plugin=\"prompt-guard\",kind=\"preprocessor\"}"), "{metrics}");
}

#[test]
fn a_failing_fail_closed_plugin_refuses_requests_is_quarantined_and_the_server_keeps_serving() {
    let fixtures = plugins_built().join("fixtures");
    let server = start(move |t| {
        // Swap the keyword router for the chaos router, fail-closed, quarantined after 2 failures.
        let start = t.find("[[plugins]]\nname = \"keyword-router\"").expect("router entry");
        let end = start + t[start..].find("[[plugins]]\nname = \"recipe-merger\"").expect("next entry");
        let chaos = format!(
            "[[plugins]]\nname = \"chaos\"\nkind = \"router\"\npath = \"{}\"\nfailure = \"closed\"\nquarantine_after = 2\ntimeout_ms = 200\n\n",
            fixtures.join("chaos-router.wasm").display()
        );
        format!("{}{chaos}{}", &t[..start], &t[end..])
    });
    let a = server.addr;
    let k = Some("sk-demo-user");
    let body = |mode: &str| {
        serde_json::json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2, "metadata": {"chaos": mode}}).to_string()
    };
    let (st, resp) = http(a, "POST", "/v1/completions", k, body("panic").as_bytes());
    // A plugin failure is a 500 (not the 503 `overloaded_error` OpenAI clients retry), and
    // the guest's panic text stays in the server's log.
    assert_eq!(st, 500, "{resp}");
    assert!(resp.contains("router plugin `chaos` panicked"), "{resp}");
    assert!(!resp.contains("chaos monkey says no"), "the guest panic message reaches the client: {resp}");
    // An endless loop is cut by the deadline and counts, unless this machine's CPUs were so
    // busy that the call got under half its time on the CPU (`Starved`, not counted): then the
    // next loop request runs it again, until one counts (boundedly).
    let mut starved = 0;
    for _ in 0..20 {
        let (st, resp) = http(a, "POST", "/v1/completions", k, body("loop").as_bytes());
        // 503 only for a starved call (the host's overload, which a retry may cure).
        assert!(st == 500 || (st == 503 && resp.contains("overloaded")), "{st} {resp}");
        if resp.contains("quarantine") {
            break;
        }
        starved += usize::from(st == 503);
        assert!(resp.to_lowercase().contains("time"), "an endless loop is cut by the deadline: {resp}");
    }
    assert!(starved < 20, "all 20 loop calls were starved of CPU (an overloaded machine): none could count");
    // Now quarantined: refused at once, and reported in /metrics.
    let (st, resp) = http(a, "POST", "/v1/completions", k, body("none").as_bytes());
    assert_eq!(st, 500, "{resp}");
    assert!(resp.contains("quarantine"), "{resp}");
    let metrics = http(a, "GET", "/metrics", Some("sk-demo-admin"), b"").1;
    assert!(
        metrics.contains(
            "openlora_plugin_quarantined{model_name=\"SmolLM2-135M-Instruct\",plugin=\"chaos\",kind=\"router\"} 1"
        ),
        "{metrics}"
    );
    // Requests the router does not see (an adapter named directly) still work.
    let direct = serde_json::json!({"model": "caps", "prompt": "Hi", "max_tokens": 2}).to_string();
    let (st, resp) = http(a, "POST", "/v1/completions", k, direct.as_bytes());
    assert_eq!(st, 200, "{resp}");
    // An admin reload brings it back.
    let (st, resp) = http(a, "POST", "/v1/admin/plugins/reload", Some("sk-demo-admin"), br#"{"name": "chaos"}"#);
    assert_eq!(st, 200, "{resp}");
    let (st, resp) = http(a, "POST", "/v1/completions", k, body("none").as_bytes());
    assert_eq!(st, 200, "{resp}");
}

/// Plugins at run time: the admin API lists the chain, unloads a plugin (requests go on
/// without it), loads one (a `[[plugins]]` entry as JSON, self-tested before it joins),
/// reloads it with a new config, and refuses what the deployment file would refuse.
#[test]
fn plugins_load_unload_and_reload_at_run_time_through_the_admin_api() {
    let server = start(|t| t);
    let a = server.addr;
    let admin = Some("sk-demo-admin");
    let k = Some("sk-demo-user");
    let chain = || -> Vec<(String, String, String)> {
        let (st, body) = http(a, "GET", "/v1/admin/plugins", admin, b"");
        assert_eq!(st, 200, "{body}");
        json(&body)["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|p| {
                let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
                (s("name"), s("kind"), s("origin"))
            })
            .collect()
    };
    let owned = |v: &[(&str, &str, &str)]| -> Vec<(String, String, String)> {
        v.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect()
    };
    assert_eq!(
        chain(),
        owned(&[
            ("prompt-guard", "preprocessor", "deployment"),
            ("keyword-router", "router", "deployment"),
            ("recipe-merger", "merger", "deployment"),
            ("revenue-split", "attributor", "deployment"),
        ])
    );
    let (st, body) = http(a, "GET", "/v1/admin/plugins", k, b"");
    assert_eq!(st, 403, "a tenant may not list plugins (their config may hold secrets): {body}");
    let (st, body) = http(a, "POST", "/v1/admin/plugins/unload", k, br#"{"name": "keyword-router"}"#);
    assert_eq!(st, 403, "{body}");

    let shout = || {
        let body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Please shout: name a colour."}],
            "max_tokens": 4, "temperature": 0, "metadata": {"chaos": "none"}})
        .to_string();
        let (st, resp) = http(a, "POST", "/v1/chat/completions", k, body.as_bytes());
        assert_eq!(st, 200, "{resp}");
        let r = receipt_of(a, "sk-demo-user", &resp);
        let adapters: Vec<String> = r["body"]["record"]["adapters"]
            .as_array()
            .expect("adapters")
            .iter()
            .filter_map(|x| x["name"].as_str().map(str::to_owned))
            .collect();
        let plugins: Vec<String> = r["body"]["record"]["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .filter_map(|x| x["name"].as_str().map(str::to_owned))
            .collect();
        (adapters, plugins)
    };
    assert_eq!(shout().0, ["caps"], "the keyword router routes `shout` to caps");

    // A second router is refused while one is loaded, as the deployment file refuses it.
    let fixtures = plugins_built().join("fixtures");
    let chaos = serde_json::json!({"name": "chaos", "kind": "router", "path": fixtures.join("chaos-router.wasm"),
        "failure": "closed", "timeout_ms": 200})
    .to_string();
    let (st, body) = http(a, "POST", "/v1/admin/plugins/load", admin, chaos.as_bytes());
    assert_eq!(st, 400, "{body}");
    assert_eq!(json(&body)["error"]["param"], "kind", "{body}");
    assert!(body.contains("keyword-router"), "names the router that is loaded: {body}");

    // Unloaded: it leaves the chain, and requests go on without it.
    let (st, body) = http(a, "POST", "/v1/admin/plugins/unload", admin, br#"{"name": "keyword-router"}"#);
    assert_eq!(st, 200, "{body}");
    assert_eq!(json(&body)["unloaded"], "keyword-router");
    let (adapters, plugins) = shout();
    assert!(adapters.is_empty(), "no router, no route: {adapters:?}");
    assert!(!plugins.iter().any(|p| p == "keyword-router"), "{plugins:?}");
    let (st, body) = http(a, "POST", "/v1/admin/plugins/unload", admin, br#"{"name": "keyword-router"}"#);
    assert_eq!(st, 404, "{body}");

    // Bad entries are refused by name, and nothing changes.
    for (entry, param) in [
        (r#"{"name": "x", "kind": "router"}"#.to_owned(), "path"),
        (r#"{"name": "x", "kind": "router", "path": "a.wasm", "timeout": 5}"#.to_owned(), "timeout"),
        (r#"{"name": "x y", "kind": "router", "path": "a.wasm"}"#.to_owned(), "name"),
        (r#"{"name": "prompt-guard", "kind": "preprocessor", "path": "a.wasm"}"#.to_owned(), "name"),
        (r#"{"name": "x", "kind": "router", "path": "/no/such/plugin.wasm"}"#.to_owned(), "path"),
    ] {
        let (st, body) = http(a, "POST", "/v1/admin/plugins/load", admin, entry.as_bytes());
        assert_eq!(st, 400, "{entry}: {body}");
        assert_eq!(json(&body)["error"]["param"], param, "{entry}: {body}");
    }
    // A component of the wrong kind fails the load, naming what is wrong.
    let wrong = serde_json::json!({"name": "x", "kind": "preprocessor", "path": fixtures.join("chaos-router.wasm")})
        .to_string();
    let (st, body) = http(a, "POST", "/v1/admin/plugins/load", admin, wrong.as_bytes());
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("preprocessing"), "names the interface it lacks: {body}");
    assert_eq!(chain().len(), 3, "{:?}", chain());

    // Loaded at run time: it joins the end of the chain and routes the next request.
    let (st, body) = http(a, "POST", "/v1/admin/plugins/load", admin, chaos.as_bytes());
    assert_eq!(st, 200, "{body}");
    assert_eq!(json(&body)["loaded"], "chaos");
    assert_eq!(chain().last().cloned(), Some(("chaos".to_owned(), "router".to_owned(), "admin_api".to_owned())));
    let (_, plugins) = shout();
    assert!(plugins.iter().any(|p| p == "chaos"), "the loaded router ran: {plugins:?}");
    let panic = serde_json::json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2, "metadata": {"chaos": "panic"}})
        .to_string();
    let (st, body) = http(a, "POST", "/v1/completions", k, panic.as_bytes());
    assert_eq!(st, 500, "its failure policy (closed) applies: {body}");
    assert!(body.contains("router plugin `chaos` panicked"), "{body}");

    // Reload: an unknown field is refused by name; a plugin loaded at run time reloads its own
    // entry; a new config replaces the old one.
    let (st, body) = http(a, "POST", "/v1/admin/plugins/reload", admin, br#"{"name": "chaos", "failure": "open"}"#);
    assert_eq!(st, 400, "{body}");
    assert_eq!(json(&body)["error"]["param"], "failure", "{body}");
    let (st, body) = http(a, "POST", "/v1/admin/plugins/reload", admin, br#"{"name": "chaos", "config": {"mode": 1}}"#);
    assert_eq!(st, 200, "{body}");
    // A config that makes it panic fails the self-test: the reload is refused, the old stays.
    let (st, body) =
        http(a, "POST", "/v1/admin/plugins/reload", admin, br#"{"name": "chaos", "config": {"always": "panic"}}"#);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("self-test") || body.contains("panicked"), "{body}");
    let (st, body) = http(a, "GET", "/v1/admin/plugins", admin, b"");
    assert_eq!(st, 200, "{body}");
    let listed = json(&body)["data"].as_array().expect("data").last().cloned().expect("chaos");
    assert_eq!(listed["config"]["mode"], 1, "{listed}");
    assert_eq!(listed["reloads"], 1, "{listed}");
    assert_eq!(listed["origin"], "admin_api", "{listed}");

    // Back to the deployment's router, loaded by the same entry the file has (a relative path
    // is taken from the deployment file's folder, as in the file).
    let (st, body) = http(a, "POST", "/v1/admin/plugins/unload", admin, br#"{"name": "chaos"}"#);
    assert_eq!(st, 200, "{body}");
    let router = serde_json::json!({"name": "keyword-router", "kind": "router",
        "path": plugins_built().join("examples/keyword-router.wasm"),
        "config": {"otherwise": "default", "keywords": {"shout": "caps", "signed": "signature"}}})
    .to_string();
    let (st, body) = http(a, "POST", "/v1/admin/plugins/load", admin, router.as_bytes());
    assert_eq!(st, 200, "{body}");
    assert_eq!(shout().0, ["caps"], "routed again");
    // A plugin of the file whose entry is still there reloads from the file.
    let (st, body) = http(a, "POST", "/v1/admin/plugins/reload", admin, br#"{"name": "prompt-guard"}"#);
    assert_eq!(st, 200, "{body}");
}

#[test]
fn adapters_page_in_and_out_under_a_small_device_budget_with_unchanged_outputs() {
    // Each example adapter is held in its file's f16, ~4.9 MB: an 11 MiB device tier holds two of
    // three. The quickstart's 2 GiB host tier is off on the CPU (a host copy would be the same
    // adapter again, in f32), so cycling through all three evicts and re-reads from disk.
    let server = start(|t| {
        assert!(t.contains("host_mib = 2048") && t.contains("device_mib = 1024"), "the quickstart's budgets changed");
        t.replace("device_mib = 1024", "device_mib = 11")
    });
    let a = server.addr;
    let ask = |model: &str, key: &str| {
        let (st, body) = http(a, "POST", "/v1/chat/completions", Some(key), &chat_body(model, "Name a fruit.", 12));
        assert_eq!(st, 200, "{model}: {body}");
        json(&body)["choices"][0]["message"]["content"].as_str().expect("text").to_owned()
    };
    let first: Vec<String> = [("caps", "sk-demo-user"), ("signature", "sk-demo-user"), ("pirate", "sk-demo-partner")]
        .iter()
        .map(|(m, k)| ask(m, k))
        .collect();
    for round in 0..2 {
        for (i, (m, k)) in
            [("caps", "sk-demo-user"), ("signature", "sk-demo-user"), ("pirate", "sk-demo-partner")].iter().enumerate()
        {
            assert_eq!(ask(m, k), first[i], "round {round}: {m} after being paged out and back in");
        }
    }
    let metrics = http(a, "GET", "/metrics", Some("sk-demo-admin"), b"").1;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert!(
        value("openlora_adapter_evictions_total{model_name=\"SmolLM2-135M-Instruct\",tier=\"device\"}") >= 3.0,
        "{metrics}"
    );
    assert!(value("openlora_adapter_disk_loads_total") >= 6.0, "{metrics}");
    assert!(value("openlora_adapters_resident{model_name=\"SmolLM2-135M-Instruct\",tier=\"device\"}") <= 2.0);
    let device_bytes = value("openlora_adapter_tier_bytes{model_name=\"SmolLM2-135M-Instruct\",tier=\"device\"}");
    assert!((4.0e6..=11.0 * 1048576.0).contains(&device_bytes), "{device_bytes}");
    assert_eq!(value("openlora_adapter_tier_bytes{model_name=\"SmolLM2-135M-Instruct\",tier=\"host\"}"), 0.0);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn a_rescan_serves_new_adapter_folders_and_drops_removed_ones() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("adapters");
    copy_dir(&repo().join("examples/adapters/caps"), &dir.join("caps"));
    let d = dir.display().to_string();
    let server = start(move |t| {
        t.replace(
            &format!("dirs = [{:?}]", repo().join("examples/adapters").display().to_string()),
            &format!("dirs = [{d:?}]"),
        )
        .replace("pirate = [\"partner\"]", "")
    });
    let a = server.addr;
    assert_error(
        http(a, "POST", "/v1/chat/completions", Some("sk-demo-user"), &chat_body("fresh", "hi", 2)),
        404,
        "before",
    );
    copy_dir(&repo().join("examples/adapters/signature"), &dir.join("fresh"));
    assert_error(http(a, "POST", "/v1/admin/adapters/rescan", Some("sk-demo-user"), b""), 403, "user rescans");
    let (st, body) = http(a, "POST", "/v1/admin/adapters/rescan", Some("sk-demo-admin"), b"");
    assert_eq!(st, 200, "{body}");
    assert_eq!(json(&body)["added"], serde_json::json!(["fresh"]));
    let (st, body) = http(
        a,
        "POST",
        "/v1/chat/completions",
        Some("sk-demo-user"),
        &chat_body("fresh", "What is the capital of France?", 40),
    );
    assert_eq!(st, 200, "{body}");
    let text = json(&body)["choices"][0]["message"]["content"].as_str().expect("text").to_owned();
    assert!(text.ends_with("-- sent by openlora"), "the new folder's adapter answers: {text:?}");
    assert!(http(a, "GET", "/v1/models", Some("sk-demo-user"), b"").1.contains("\"fresh\""));
    std::fs::remove_dir_all(dir.join("fresh")).expect("rm");
    let (st, body) = http(a, "POST", "/v1/admin/adapters/rescan", Some("sk-demo-admin"), b"");
    assert_eq!(st, 200, "{body}");
    assert_eq!(json(&body)["removed"], serde_json::json!(["fresh"]));
    assert_error(
        http(a, "POST", "/v1/chat/completions", Some("sk-demo-user"), &chat_body("fresh", "hi", 2)),
        404,
        "after removal",
    );
}

/// Every receipt in `ledger`, parsed, in order.
fn ledger_entries(ledger: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(ledger)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("ledger line ({e}): {l}")))
        .collect()
}

/// `openlora ledger verify` on `ledger`; returns its stdout.
fn verify_ledger(ledger: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_openlora"))
        .args(["ledger", "verify", ledger.to_str().expect("path")])
        .output()
        .expect("verify");
    assert!(out.status.success(), "ledger verify: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Regression: the HTTP layer used to learn the token count only when every choice finished,
/// so a stream the client closed early was recorded with `completion_tokens: 0` and billed
/// for the prompt alone.
#[test]
fn a_cancelled_stream_is_billed_for_every_token_it_received() {
    let server = start(|t| t);
    let body = serde_json::json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 200, "temperature": 0, "ignore_eos": true, "stream": true,
    })
    .to_string();
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer sk-demo-user\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        server.addr,
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    // Read until N content chunks have arrived, then hang up.
    const N: usize = 40;
    let mut reader = BufReader::new(s);
    let (mut chunks, mut id) = (0usize, String::new());
    let mut line = String::new();
    while chunks < N {
        line.clear();
        assert!(reader.read_line(&mut line).expect("read") > 0, "the stream ended after {chunks} chunks");
        if let Some(data) = line.trim().strip_prefix("data: ")
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(data)
        {
            id = v["id"].as_str().unwrap_or_default().to_owned();
            if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                chunks += 1;
            }
        }
    }
    drop(reader);
    let ledger = server.dir.join("state/ledger.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    let rec = loop {
        if let Some(r) = ledger_entries(&ledger).into_iter().find(|r| r["body"]["record"]["request_id"] == id.as_str())
        {
            break r["body"]["record"].clone();
        }
        assert!(Instant::now() < deadline, "no receipt for the cancelled request {id}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(rec["finish_reason"], "cancelled", "{rec}");
    let billed = rec["completion_tokens"].as_u64().expect("completion_tokens");
    assert!(billed >= N as u64, "billed {billed} completion tokens for a stream that delivered {N} chunks: {rec}");
    assert!(billed < 200, "the request was cancelled, not run to the end: {rec}");
    assert!(verify_ledger(&ledger).starts_with("ok: 1 receipts"));
}

/// Regression: reloading a private adapter through `POST /v1/load_lora_adapter` used to drop
/// its visibility rule, so every tenant saw and could use it.
#[test]
fn a_reloaded_private_adapter_stays_private() {
    let server = start(|t| t);
    let a = server.addr;
    let sees_pirate = |key: &str| {
        let (st, body) = http(a, "GET", "/v1/models", Some(key), b"");
        assert_eq!(st, 200, "{body}");
        json(&body)["data"].as_array().expect("data").iter().any(|m| m["id"] == "pirate")
    };
    let ask = |key: &str| http(a, "POST", "/v1/chat/completions", Some(key), &chat_body("pirate", "Hello?", 4));
    for round in ["before the reload", "after the reload"] {
        assert!(!sees_pirate("sk-demo-user"), "{round}: demo must not see pirate");
        assert!(sees_pirate("sk-demo-partner"), "{round}: partner sees pirate");
        assert_error(ask("sk-demo-user"), 404, round);
        assert_eq!(ask("sk-demo-partner").0, 200, "{round}");
        if round == "before the reload" {
            let path = repo().join("examples/adapters/pirate");
            let body = serde_json::json!({"lora_name": "pirate", "lora_path": path}).to_string();
            let (st, msg) = http(a, "POST", "/v1/load_lora_adapter", Some("sk-demo-admin"), body.as_bytes());
            assert_eq!(st, 200, "{msg}");
        }
    }
    // Loaded under a name the deployment does not restrict, the same files are public.
    let path = repo().join("examples/adapters/pirate");
    let body = serde_json::json!({"lora_name": "pirate-public", "lora_path": path}).to_string();
    assert_eq!(http(a, "POST", "/v1/load_lora_adapter", Some("sk-demo-admin"), body.as_bytes()).0, 200);
    let (st, models) = http(a, "GET", "/v1/models", Some("sk-demo-user"), b"");
    assert_eq!(st, 200);
    assert!(json(&models)["data"].as_array().expect("data").iter().any(|m| m["id"] == "pirate-public"));
}

/// `openlora generate --deployment` walks the HTTP path: same plugins, same greedy text, and a
/// receipt appended to the deployment's ledger that verifies with the server's.
#[test]
fn generate_with_a_deployment_matches_the_http_api_and_appends_a_verified_receipt() {
    let tmp = tempfile::tempdir().expect("tmp");
    let prompt = "The best thing about the sea is";
    let http_text = {
        let server = start_in(tmp.path(), |t| t);
        let body =
            serde_json::json!({"model": "signature", "prompt": prompt, "max_tokens": 24, "temperature": 0}).to_string();
        let (st, resp) = http(server.addr, "POST", "/v1/completions", Some("sk-demo-user"), body.as_bytes());
        assert_eq!(st, 200, "{resp}");
        json(&resp)["choices"][0]["text"].as_str().expect("text").to_owned()
    }; // the server stops here: one writer per ledger at a time
    let cfg = tmp.path().join("deploy.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_openlora"))
        .args(["generate", "--deployment", cfg.to_str().expect("path"), "--prompt", prompt])
        .args(["--adapter", "signature", "--max-tokens", "24", "--temperature", "0"])
        .output()
        .expect("generate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{http_text}\n"), "CLI and HTTP agree");
    assert!(stderr.contains("openlora: receipt "), "{stderr}");
    let ledger = tmp.path().join("state/ledger.jsonl");
    let entries = ledger_entries(&ledger);
    assert_eq!(entries.len(), 2, "one receipt from the server, one from the CLI");
    let cli = &entries[1]["body"]["record"];
    assert_eq!(cli["tenant"], "cli");
    assert_eq!(cli["adapters"][0]["name"], "signature");
    assert_eq!(cli["adapters"][0]["generation"], entries[0]["body"]["record"]["adapters"][0]["generation"]);
    assert!(cli["plugins"].as_array().expect("plugins").iter().any(|p| p["name"] == "revenue-split"), "{cli}");
    assert!(verify_ledger(&ledger).starts_with("ok: 2 receipts"));
}

/// The value of an unlabelled sample (or the sum over its labelled samples) in `/metrics`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Eight requests for one merge recipe at the same time build it once; the merged adapter is
/// resident in the device tier and counted in its bytes.
#[test]
fn concurrent_requests_for_one_merge_build_it_once_inside_the_device_budget() {
    let server = start(|t| t);
    let a = server.addr;
    let body = serde_json::json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 4,
        "temperature": 0, "adapters": [{"name": "caps", "weight": 1.0}, {"name": "signature", "weight": 0.7}],
        "merge": {"method": "linear"},
    })
    .to_string();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || http(a, "POST", "/v1/chat/completions", Some("sk-demo-user"), body.as_bytes()))
        })
        .collect();
    for t in threads {
        let (st, resp) = t.join().expect("thread");
        assert_eq!(st, 200, "{resp}");
    }
    let (_, m) = http(a, "GET", "/metrics", Some("sk-demo-admin"), b"");
    assert_eq!(metric(&m, "openlora_adapter_merges_total"), 1.0, "built once:\n{m}");
    assert_eq!(
        metric(&m, "openlora_adapter_merge_joins_total") + metric(&m, "openlora_adapter_merge_hits_total"),
        7.0,
        "the other seven shared it"
    );
    assert_eq!(metric(&m, "openlora_adapters_merged_resident"), 1.0);
    let merged = metric(&m, "openlora_adapters_merged_bytes");
    assert!(merged > 0.0);
    let device = m
        .lines()
        .find(|l| l.starts_with("openlora_adapter_tier_bytes{") && l.contains("tier=\"device\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("device tier bytes");
    assert!(device >= merged, "the device tier counts the merged adapter: {device} < {merged}");
}

/// Regression (multi-tenant trust, hole 1): tenant `demo` sending the prompt tenant `partner`
/// sent used to get `cached_tokens > 0`, so anyone could probe, a block at a time, what another
/// tenant had sent. Cached blocks are now salted with the tenant (and a request's `cache_salt`)
/// unless the deployment shares them.
#[test]
fn the_prefix_cache_does_not_leak_prompts_across_tenants() {
    let secret = "Confidential memo for the partner team only: the quarterly figures for the northern \
                  region are attached below, together with the plan for the coming year and the list of \
                  suppliers we intend to renegotiate with before the end of the month. Summary:";
    let cached = |a: SocketAddr, key: &str, salt: Option<&str>| {
        let mut body = serde_json::json!({"model": MODEL, "prompt": secret, "max_tokens": 1, "temperature": 0});
        if let Some(s) = salt {
            body["cache_salt"] = serde_json::json!(s);
        }
        let (st, resp) = http(a, "POST", "/v1/completions", Some(key), body.to_string().as_bytes());
        assert_eq!(st, 200, "{resp}");
        json(&resp)["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens")
    };
    let server = start(|t| t);
    let a = server.addr;
    assert_eq!(cached(a, "sk-demo-partner", None), 0, "first time: nothing cached");
    assert!(cached(a, "sk-demo-partner", None) >= 32, "the same tenant reuses its own prefix");
    assert_eq!(cached(a, "sk-demo-user", None), 0, "another tenant learns nothing from the cache");
    assert_eq!(cached(a, "sk-demo-partner", Some("session-2")), 0, "a different cache_salt does not share");
    assert!(cached(a, "sk-demo-partner", Some("session-2")) >= 32, "the same salt does");
    let (st, resp) = http(
        a,
        "POST",
        "/v1/completions",
        Some("sk-demo-user"),
        serde_json::json!({"model": MODEL, "prompt": "hi", "max_tokens": 1, "cache_salt": ""}).to_string().as_bytes(),
    );
    assert_eq!(st, 400, "{resp}");
    assert_eq!(json(&resp)["error"]["param"], "cache_salt");
    drop(server);
    // A deployment whose tenants trust each other may share.
    let shared = start(|t| t.replace("prefix_cache_scope = \"tenant\"", "prefix_cache_scope = \"shared\""));
    assert_eq!(cached(shared.addr, "sk-demo-partner", None), 0);
    assert!(cached(shared.addr, "sk-demo-user", None) >= 32, "shared scope: tenants share prefixes");
}

/// Regression (multi-tenant trust, hole 10): `/v1/models` showed every user the server's
/// absolute paths, and a router choosing an adapter the caller may not see got a 404 naming it.
#[test]
fn what_a_tenant_may_not_see_does_not_leak_by_name_or_path() {
    let server = start(|t| t.replace("signed = \"signature\"", "signed = \"signature\"\nparrot = \"pirate\""));
    let a = server.addr;
    let roots = |key: &str| -> Vec<String> {
        let (st, body) = http(a, "GET", "/v1/models", Some(key), b"");
        assert_eq!(st, 200, "{body}");
        json(&body)["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|m| m["root"].as_str().expect("root").to_owned())
            .collect()
    };
    let user = roots("sk-demo-user");
    assert!(user.len() >= 3, "{user:?}");
    assert!(user.iter().all(|r| !r.contains('/')), "a user sees no server paths: {user:?}");
    let admin = roots("sk-demo-admin");
    assert!(admin.iter().any(|r| r.contains("examples/adapters")), "admins see where adapters live: {admin:?}");
    // The router picks `pirate` (visible to `partner` only) for prompts mentioning a parrot.
    let (st, body) =
        http(a, "POST", "/v1/chat/completions", Some("sk-demo-user"), &chat_body(MODEL, "Tell me about a parrot.", 4));
    assert_eq!(st, 404, "{body}");
    assert!(!body.contains("pirate"), "the error must not name the invisible adapter: {body}");
    let (st, body) = http(
        a,
        "POST",
        "/v1/chat/completions",
        Some("sk-demo-partner"),
        &chat_body(MODEL, "Tell me about a parrot.", 4),
    );
    assert_eq!(st, 200, "the tenant that may use it is routed to it: {body}");
}

/// Regression (hole 7): a second server started on the same state directory appended to the
/// same ledger. It now exits at start, naming the process that holds the ledger; so does
/// `openlora generate --deployment` while the server runs.
#[test]
fn a_second_writer_on_the_same_ledger_exits_naming_the_holder() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_in(tmp.path(), |t| t);
    let cfg = tmp.path().join("deploy.toml");
    let holder = format!("pid {}", server.child.id());
    let run = |args: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_openlora"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(120);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?} did not exit while another process holds the ledger");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output().expect("output");
        assert!(!out.status.success(), "{args:?} must refuse to start");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["serve", cfg.to_str().expect("path"), "--listen", "127.0.0.1:0"]);
    assert!(err.contains("in use by") && err.contains(&holder), "{err}");
    let err = run(&["generate", "--deployment", cfg.to_str().expect("path"), "--prompt", "hi", "--max-tokens", "2"]);
    assert!(err.contains("in use by") && err.contains(&holder), "{err}");
    // The first server is unaffected.
    assert_eq!(http(server.addr, "GET", "/health", None, b"").0, 200);
}

/// Regression (hole 3): 2,000 duplicate `adapters` entries were accepted (200 OK, seconds of
/// engine time for 8 tokens), stop strings had no length cap and `cat` merges no rank cap.
/// Each is refused with a 400 naming the limit, before any work is done.
#[test]
fn oversized_requests_are_refused_naming_the_limit() {
    // Without the recipe-merger plugin, so the request's own merge method applies.
    let server = start(|t| {
        let t = t.replace("max_merged_rank = 128", "max_merged_rank = 12");
        let start = t.find("[[plugins]]\nname = \"recipe-merger\"").expect("the merger plugin block");
        let end = start + 1 + t[start + 1..].find("[[plugins]]").expect("the next plugin");
        format!("{}{}", &t[..start], &t[end..])
    });
    let a = server.addr;
    let post = |extra: serde_json::Value| {
        let mut body =
            serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        http(a, "POST", "/v1/chat/completions", Some("sk-demo-user"), body.to_string().as_bytes())
    };
    let dupes: Vec<_> = (0..2000).map(|_| serde_json::json!({"name": "caps", "weight": 0.001})).collect();
    let (st, body) = post(serde_json::json!({"adapters": dupes}));
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("limit is 8") && body.contains("max_adapters_per_request"), "{body}");
    let (st, body) = post(serde_json::json!({"adapters": [{"name": "caps"}, {"name": "signature"}, {"name": "caps"}]}));
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("listed twice"), "{body}");
    let (st, body) = post(serde_json::json!({"stop": ["x".repeat(300)]}));
    assert_eq!(st, 400, "{body}");
    assert_eq!(json(&body)["error"]["param"], "stop");
    // Two rank-8 adapters concatenated are rank 16 > 12; an SVD merge to rank 64 likewise.
    let two = serde_json::json!([{"name": "caps"}, {"name": "signature"}]);
    for (merge, rank) in
        [(serde_json::json!({"method": "cat"}), 16), (serde_json::json!({"method": "svd", "svd_rank": 64}), 64)]
    {
        let (st, body) = post(serde_json::json!({"adapters": two, "merge": merge}));
        assert_eq!(st, 400, "{body}");
        assert!(body.contains(&format!("rank {rank}")) && body.contains("max_merged_rank"), "{body}");
    }
    let (st, body) = post(serde_json::json!({"adapters": two, "merge": {"method": "linear"}}));
    assert_eq!(st, 200, "a merge within the limit is served: {body}");
    // Within the limits, the same request shape is served.
    let (st, body) = post(serde_json::json!({"adapters": [{"name": "caps"}, {"name": "signature", "weight": 0.5}]}));
    assert_eq!(st, 200, "{body}");
}

/// Regression (hole 2): a prompt sent as token ids skipped every preprocessor, including the
/// quickstart's fail-closed `prompt-guard`, so the model read the e-mail address that the same
/// prompt sent as text had redacted. Token prompts are now shown to preprocessors as their text
/// and an edit replaces them, so both forms reach the model identically.
#[test]
fn token_id_prompts_pass_through_the_preprocessors() {
    let text = "Please forward this to alice.smith@example.com before noon. Reply:";
    let model_path = openlora::model::default_model::ensure_default_model().expect("default model");
    let tok = openlora::model::LoadedModel::open(&model_path, openlora_kernels::CpuBackend::new())
        .expect("model")
        .tokenizer
        .clone();
    let ids = tok.encode(text, true).expect("encode");
    let server = start(|t| t);
    let complete = |prompt: serde_json::Value| {
        let body = serde_json::json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0});
        let (st, resp) =
            http(server.addr, "POST", "/v1/completions", Some("sk-demo-user"), body.to_string().as_bytes());
        assert_eq!(st, 200, "{resp}");
        let v = json(&resp);
        (
            v["usage"]["prompt_tokens"].as_u64().expect("prompt_tokens"),
            v["choices"][0]["text"].as_str().expect("text").to_owned(),
        )
    };
    let (as_text, out_text) = complete(serde_json::json!(text));
    assert_ne!(as_text, ids.len() as u64, "the guard redacted the text prompt");
    let (as_ids, out_ids) = complete(serde_json::json!(ids));
    assert_eq!(as_ids, as_text, "the token-id prompt was redacted too");
    assert_eq!(out_ids, out_text, "so the model read the same prompt");
}

/// Runs `cmd`, killing it after `limit`; returns its status and output, or says it timed out.
fn output_within(cmd: &mut Command, limit: Duration) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("out.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut child = cmd
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("{cmd:?} ran longer than {limit:?}; killed. Output:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn console_is_served_at_the_root_as_html() {
    let server = start(|t| t);
    let a = server.addr;
    let out = curl(&["-w", "\n%{http_code} %{content_type}", &format!("http://{a}/")]);
    let (page, tail) = out.rsplit_once('\n').expect("curl's trailer");
    assert_eq!(tail, "200 text/html; charset=utf-8", "status and type of GET /");
    assert!(page.starts_with("<!doctype html>") && page.contains("<title>openlora console</title>"), "{page:.200}");
    for id in ["api-key", "model", "compose-list", "merge-method", "transcript", "adapters", "receipt", "verify-status"]
    {
        assert!(page.contains(&format!("id=\"{id}\"")), "the console has no element #{id}");
    }
    assert!(!page.contains("http://") && !page.contains("https://"), "the console loads nothing from elsewhere");
    // The page needs no key; the API behind it does.
    assert_error(http(a, "GET", "/v1/adapters", None, b""), 401, "/v1/adapters without a key");
}

/// `GET /v1/adapters`: what each tenant may see, where the pager holds it, paths for admins only.
#[test]
fn console_adapters_endpoint_lists_residency_by_visibility() {
    let server = start(|t| t);
    let a = server.addr;
    let list = |key: &str| {
        let (st, body) = http(a, "GET", "/v1/adapters", Some(key), b"");
        assert_eq!(st, 200, "{body}");
        json(&body)["data"].as_array().expect("data").clone()
    };
    let ids = |l: &[serde_json::Value]| l.iter().map(|e| e["id"].as_str().expect("id").to_owned()).collect::<Vec<_>>();
    assert_eq!(ids(&list("sk-demo-user")), ["caps", "signature"], "pirate is the partner's");
    let partner = list("sk-demo-partner");
    assert_eq!(ids(&partner), ["caps", "pirate", "signature"]);
    for e in &partner {
        assert!(e.get("path").is_none(), "a user sees no server path: {e}");
        assert_eq!(e["loading"], false, "{e}");
    }
    let admin = list("sk-demo-admin");
    assert!(
        admin.iter().all(|e| e["path"].as_str().is_some_and(|p| p.ends_with(e["id"].as_str().unwrap_or("?")))),
        "{admin:?}"
    );

    let (st, resp) = http(a, "POST", "/v1/chat/completions", Some("sk-demo-partner"), &chat_body("pirate", "Hi", 4));
    assert_eq!(st, 200, "{resp}");
    let receipt = receipt_of(a, "sk-demo-partner", &resp);
    let pirate = list("sk-demo-partner").into_iter().find(|e| e["id"] == "pirate").expect("pirate");
    assert_eq!(pirate["generation"], receipt["body"]["record"]["adapters"][0]["generation"], "{pirate}");
    // On the CPU the prepared adapter is the only copy: the service runs without a host tier.
    assert_eq!(
        (&pirate["host_resident"], &pirate["device_resident"], &pirate["pinned"]),
        (&serde_json::json!(false), &serde_json::json!(true), &serde_json::json!(false)),
        "{pirate}"
    );
    let caps = list("sk-demo-partner").into_iter().find(|e| e["id"] == "caps").expect("caps");
    assert_eq!(caps["generation"], serde_json::Value::Null, "caps was never loaded: {caps}");
}

/// The receipt endpoint's text is `{"body":CANONICAL,"hash":..,"sig":..}` with the body's bytes
/// exactly [`ReceiptBody::canonical`], so a browser can hash the bytes it received.
#[test]
fn console_receipt_text_is_the_canonical_body_byte_for_byte() {
    use openlora::attribution::Receipt;
    let server = start(|t| t);
    let a = server.addr;
    let body = serde_json::json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0,
        "adapters": [{"name": "pirate", "weight": 1.0}, {"name": "signature", "weight": 0.35}],
        "merge": {"method": "linear"},
    });
    let (st, resp) = http(a, "POST", "/v1/chat/completions", Some("sk-demo-partner"), body.to_string().as_bytes());
    assert_eq!(st, 200, "{resp}");
    let id = json(&resp)["receipt"].as_str().expect("receipt id").to_owned();
    let (st, raw) = http(a, "GET", &format!("/v1/receipts/{id}"), Some("sk-demo-partner"), b"");
    assert_eq!(st, 200, "{raw}");
    let r: Receipt = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("not a receipt ({e}): {raw}"));
    let canonical = String::from_utf8(r.body.canonical()).expect("utf-8");
    assert_eq!(raw, format!("{{\"body\":{canonical},\"hash\":\"{}\",\"sig\":\"{}\"}}", r.hash, r.sig));
    assert_eq!(hex::encode(r.body.hash()), r.hash);
    assert_eq!(r.hash, id);
    assert!(canonical.contains("\"weight\":0.35"), "{canonical}");
}

/// Whether `name` runs (`name --version`).
fn installed(name: &str) -> bool {
    Command::new(name).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// The console in a real browser: headless Chromium, driven by selenium (tests/e2e/console.py).
#[test]
fn console_in_headless_chromium_chats_composes_and_verifies_receipts() {
    let chromium = std::env::var("OPENLORA_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let driver = std::env::var("OPENLORA_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    for bin in [&chromium, &driver] {
        assert!(
            installed(bin),
            "`{bin}` is not installed: the console test needs headless Chromium and its driver \
             (Debian: `apt-get install -y chromium chromium-driver`; or set OPENLORA_CHROMIUM and \
             OPENLORA_CHROMEDRIVER to their paths)"
        );
    }
    let which = |bin: &str| {
        let out = Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().expect("sh");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let py = client_python();
    let server = start(|t| t);
    // The screenshots go to a temporary folder, or to OPENLORA_CONSOLE_SCREENSHOTS to keep them.
    let tmp = tempfile::tempdir().expect("tempdir");
    let shots =
        std::env::var_os("OPENLORA_CONSOLE_SCREENSHOTS").map_or_else(|| tmp.path().to_path_buf(), PathBuf::from);
    std::fs::create_dir_all(&shots).expect("the screenshot folder");
    for old in ["1-adapters", "2-chat-receipt", "3-composed-receipt", "4-admin"] {
        let _ = std::fs::remove_file(shots.join(format!("{old}.png")));
    }
    let (status, out) = output_within(
        Command::new(py)
            .arg(repo().join("tests/e2e/console.py"))
            .arg(format!("http://{}", server.addr))
            .arg(&shots)
            .arg(repo().join("examples/adapters"))
            .env("OPENLORA_CHROMIUM", which(&chromium))
            .env("OPENLORA_CHROMEDRIVER", which(&driver)),
        Duration::from_secs(600),
    );
    assert!(status.success(), "the console check failed ({status}):\n{out}");
    assert!(out.contains("all console checks passed"), "{out}");
    for png in ["1-adapters", "2-chat-receipt", "3-composed-receipt", "4-admin"] {
        assert!(shots.join(format!("{png}.png")).is_file(), "no screenshot {png}.png:\n{out}");
    }
    eprintln!("{out}");
}

/// POSTs `body` as JSON with `key`; returns (status, parsed body).
fn post_json(a: SocketAddr, path: &str, key: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (st, text) = http(a, "POST", path, Some(key), body.to_string().as_bytes());
    (st, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")))
}

/// Asserts a 400 whose `param` is `field` and whose message names it.
fn assert_refused(got: (u16, serde_json::Value), field: &str, what: &str) {
    assert_eq!(got.0, 400, "{what}: {}", got.1);
    assert_eq!(got.1["error"]["param"], field, "{what}: {}", got.1);
    let msg = got.1["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(field), "{what}: the message does not name `{field}`: {msg}");
}

/// Issue 17: a field this server does not implement is refused by name (never accepted and
/// ignored), a few fields common clients always send are accepted and ignored on purpose, and
/// hostile sizes are refused naming their bound before any work.
#[test]
fn every_request_field_is_honoured_or_refused_by_name() {
    let server = start(|t| t);
    let a = server.addr;
    let k = "sk-demo-user";
    let chat = || {
        serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, "temperature": 0})
    };
    let refused: [(&str, serde_json::Value); 20] = [
        ("tools", serde_json::json!([{"type": "function", "function": {"name": "not a name!"}}])),
        ("tool_choice", serde_json::json!("required")),
        ("functions", serde_json::json!([{"name": "f"}])),
        // Structured output that cannot be honoured: refused by name, before any work.
        ("response_format", serde_json::json!({"type": "json_schema", "json_schema": {"schema": {}}})),
        (
            "response_format",
            serde_json::json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true,
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}}}),
        ),
        (
            "response_format",
            serde_json::json!({"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}),
        ),
        ("response_format", serde_json::json!({"type": "yaml"})),
        ("guided_json", serde_json::json!("{not json")),
        ("guided_regex", serde_json::json!("(unclosed")),
        ("guided_choice", serde_json::json!([])),
        ("guided_grammar", serde_json::json!("root ::= \"a\" | \"b\"")),
        ("guided_decoding_backend", serde_json::json!("xgrammar")),
        ("structured_outputs", serde_json::json!({"structural_tag": "x"})),
        ("guided_whitespace_pattern", serde_json::json!(" *")),
        ("prompt_logprobs", serde_json::json!(21)),
        ("prompt_logprobs", serde_json::json!("1")),
        ("audio", serde_json::json!({"voice": "alloy", "format": "wav"})),
        ("modalities", serde_json::json!(["text", "audio"])),
        ("min_p", serde_json::json!(0.1)),
        ("an_invented_field", serde_json::json!(true)),
    ];
    for (field, value) in refused {
        let mut b = chat();
        b[field] = value;
        assert_refused(post_json(a, "/v1/chat/completions", k, &b), field, field);
    }
    let complete =
        || serde_json::json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0});
    for (field, value) in [
        ("prompt_logprobs", serde_json::json!(-1)),
        ("response_format", serde_json::json!({"type": "json_object"})),
        ("messages", serde_json::json!([])),
        ("an_invented_field", serde_json::json!(1)),
    ] {
        let mut b = complete();
        b[field] = value;
        assert_refused(post_json(a, "/v1/completions", k, &b), field, field);
    }
    // Prompt logprobs come with a whole response only (as vLLM).
    let mut b = complete();
    b["prompt_logprobs"] = serde_json::json!(1);
    b["stream"] = serde_json::json!(true);
    assert_refused(post_json(a, "/v1/completions", k, &b), "prompt_logprobs", "prompt_logprobs with stream");
    // Inside a message and in stream_options, too.
    let mut b = chat();
    b["messages"][0]["name"] = serde_json::json!("alice");
    assert_refused(post_json(a, "/v1/chat/completions", k, &b), "messages", "messages[0].name");
    let mut b = chat();
    b["messages"] = serde_json::json!([{"role": "tool", "content": "42"}]);
    assert_refused(post_json(a, "/v1/chat/completions", k, &b), "messages", "a tool message without tool_call_id");
    let mut b = chat();
    b["tools"] = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
    b["logprobs"] = serde_json::json!(true);
    assert_refused(post_json(a, "/v1/chat/completions", k, &b), "logprobs", "logprobs with tools");
    let mut b = chat();
    b["tools"] = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
    b["tool_choice"] = serde_json::json!("required");
    b["guided_regex"] = serde_json::json!("a+");
    assert_refused(post_json(a, "/v1/chat/completions", k, &b), "tool_choice", "tool_choice required with a regex");
    let mut b = chat();
    b["stream_options"] = serde_json::json!({"continuous_usage_stats": true});
    assert_refused(post_json(a, "/v1/chat/completions", k, &b), "stream_options", "stream_options");
    // Two constraints at once, or a constraint with what would keep it from ending.
    for (extra, field) in [
        (serde_json::json!({"guided_regex": "a+", "guided_choice": ["a"]}), "guided_choice"),
        (serde_json::json!({"response_format": {"type": "json_object"}, "guided_regex": "a+"}), "guided_regex"),
        (serde_json::json!({"guided_regex": "a+", "ignore_eos": true}), "ignore_eos"),
        (serde_json::json!({"guided_regex": "a+", "min_tokens": 2}), "min_tokens"),
    ] {
        let mut b = chat();
        for (f, v) in extra.as_object().expect("object") {
            b[f] = v.clone();
        }
        assert_refused(post_json(a, "/v1/chat/completions", k, &b), field, &extra.to_string());
    }

    // The greedy answer, and the same with every field that is accepted and ignored on
    // purpose, or that asks for what is done anyway.
    let (st, plain) = post_json(a, "/v1/chat/completions", k, &chat());
    assert_eq!(st, 200, "{plain}");
    let answer = plain["choices"][0]["message"]["content"].as_str().expect("content").to_owned();
    assert!(answer.contains(" Paris"), "{answer}");
    let mut b = chat();
    for (f, v) in [
        ("store", serde_json::json!(false)),
        ("service_tier", serde_json::json!("auto")),
        ("parallel_tool_calls", serde_json::json!(true)),
        ("response_format", serde_json::json!({"type": "text"})),
        ("modalities", serde_json::json!(["text"])),
        ("tool_choice", serde_json::json!("none")),
        ("tools", serde_json::Value::Null),
    ] {
        b[f] = v;
    }
    let (st, same) = post_json(a, "/v1/chat/completions", k, &b);
    assert_eq!(st, 200, "{same}");
    assert_eq!(same["choices"][0]["message"]["content"], answer.as_str());

    // Hostile sizes: refused naming the bound, at once.
    let huge: serde_json::Map<String, serde_json::Value> =
        (0..60_000).map(|i| (i.to_string(), serde_json::json!(-100))).collect();
    let mut b = chat();
    b["logit_bias"] = serde_json::Value::Object(huge);
    let t0 = Instant::now();
    let got = post_json(a, "/v1/chat/completions", k, &b);
    assert!(t0.elapsed() < Duration::from_secs(5), "a 60,000-entry logit_bias took {:?}", t0.elapsed());
    assert_refused(got.clone(), "logit_bias", "60,000 entries");
    assert!(got.1["error"]["message"].as_str().unwrap_or_default().contains("300"), "{}", got.1);
    for (field, value, what) in [
        ("logit_bias", serde_json::json!({"4000000": -100}), "a token outside the vocabulary"),
        ("logit_bias", serde_json::json!({"42": 250}), "a bias beyond 100"),
        ("logit_bias", serde_json::json!({"fourty-two": 1}), "a key that is no token id"),
        ("min_tokens", serde_json::json!(1_000_000_000_000u64), "min_tokens beyond max_tokens"),
        ("min_tokens", serde_json::json!(13), "min_tokens beyond this request's max_tokens"),
        ("stop_token_ids", serde_json::json!((0..65).collect::<Vec<u32>>()), "65 stop token ids"),
        ("stop_token_ids", serde_json::json!([4_000_000]), "a stop token outside the vocabulary"),
        ("user", serde_json::json!("u".repeat(300)), "a 300-byte user"),
        // Ignored, but still typed as OpenAI types them.
        ("service_tier", serde_json::json!(false), "a service_tier that is no string"),
        ("service_tier", serde_json::json!("gold"), "a service tier OpenAI does not have"),
        ("store", serde_json::json!("yes"), "a store that is no boolean"),
        ("parallel_tool_calls", serde_json::json!(1), "a parallel_tool_calls that is no boolean"),
    ] {
        let mut b = chat();
        b[field] = value;
        assert_refused(post_json(a, "/v1/chat/completions", k, &b), field, what);
    }

    // logit_bias: the answer's " Paris" token banned, it never appears.
    let paris = post_json(a, "/tokenize", k, &serde_json::json!({"prompt": " Paris", "add_special_tokens": false})).1;
    let paris = paris["tokens"].as_array().expect("tokens").clone();
    assert_eq!(paris.len(), 1, "{paris:?}");
    let mut b = chat();
    b["logit_bias"] = serde_json::json!({paris[0].to_string(): -100});
    let (st, banned) = post_json(a, "/v1/chat/completions", k, &b);
    assert_eq!(st, 200, "{banned}");
    let text = banned["choices"][0]["message"]["content"].as_str().expect("content");
    let ids = post_json(a, "/tokenize", k, &serde_json::json!({"prompt": text, "add_special_tokens": false})).1;
    assert!(!ids["tokens"].as_array().expect("tokens").contains(&paris[0]), "banned token in {text:?}");
    assert_ne!(text, answer);

    // stop_token_ids: the same token ends the choice before it.
    let mut b = chat();
    b["stop_token_ids"] = serde_json::json!([paris[0]]);
    let (st, stopped) = post_json(a, "/v1/chat/completions", k, &b);
    assert_eq!(st, 200, "{stopped}");
    let text = stopped["choices"][0]["message"]["content"].as_str().expect("content");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(text, &answer[..answer.find(" Paris").expect("Paris")], "{stopped}");

    // min_tokens: the short answer goes on past its end-of-turn.
    let n = plain["usage"]["completion_tokens"].as_u64().expect("tokens");
    assert!(n < 12, "the plain answer ends before max_tokens: {plain}");
    let mut b = chat();
    b["min_tokens"] = serde_json::json!(12);
    let (st, longer) = post_json(a, "/v1/chat/completions", k, &b);
    assert_eq!(st, 200, "{longer}");
    assert_eq!(longer["usage"]["completion_tokens"], 12, "{longer}");
    assert_eq!(longer["choices"][0]["finish_reason"], "length");

    // seed: the same seed samples the same text, n choices differ from each other.
    let mut b = chat();
    b["temperature"] = serde_json::json!(1.3);
    b["seed"] = serde_json::json!(-7);
    b["n"] = serde_json::json!(2);
    let one = post_json(a, "/v1/chat/completions", k, &b).1;
    let two = post_json(a, "/v1/chat/completions", k, &b).1;
    assert_eq!(one["choices"], two["choices"], "the same seed gives the same choices");

    // echo (completions): each choice starts with its prompt, whole and streamed.
    let mut b = complete();
    b["echo"] = serde_json::json!(true);
    b["prompt"] = serde_json::json!(["The capital of France is", "Two plus two is"]);
    let (st, echoed) = post_json(a, "/v1/completions", k, &b);
    assert_eq!(st, 200, "{echoed}");
    let plain_text =
        post_json(a, "/v1/completions", k, &complete()).1["choices"][0]["text"].as_str().expect("text").to_owned();
    assert_eq!(echoed["choices"][0]["text"], format!("The capital of France is{plain_text}"));
    assert!(echoed["choices"][1]["text"].as_str().expect("text").starts_with("Two plus two is"));
    b["stream"] = serde_json::json!(true);
    b["prompt"] = serde_json::json!("The capital of France is");
    let (st, sse) = http(a, "POST", "/v1/completions", Some(k), b.to_string().as_bytes());
    assert_eq!(st, 200, "{sse}");
    let streamed: String = sse_chunks(&sse).iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, format!("The capital of France is{plain_text}"));
    let mut b = complete();
    b["echo"] = serde_json::json!(true);
    b["logprobs"] = serde_json::json!(1);
    assert_refused(post_json(a, "/v1/completions", k, &b), "echo", "echo with logprobs");
    for best_of in [0, 2] {
        let mut b = complete();
        b["best_of"] = serde_json::json!(best_of);
        assert_refused(post_json(a, "/v1/completions", k, &b), "best_of", &format!("best_of {best_of}"));
    }
    let mut b = complete();
    b["best_of"] = serde_json::json!(1);
    assert_eq!(post_json(a, "/v1/completions", k, &b).0, 200, "best_of 1 is what is done anyway");

    // user: recorded in the receipt (and absent from receipts of requests without it).
    let mut b = chat();
    b["user"] = serde_json::json!("end-user-7");
    let (st, with_user) = http(a, "POST", "/v1/chat/completions", Some(k), b.to_string().as_bytes());
    assert_eq!(st, 200, "{with_user}");
    assert_eq!(receipt_of(a, k, &with_user)["body"]["record"]["user"], "end-user-7");
    let without = receipt_of(a, k, &plain.to_string());
    assert!(without["body"]["record"].get("user").is_none(), "{without}");
    verify_ledger(&server.dir.join("state/ledger.jsonl"));
}

/// The `data:` payloads of an SSE body, parsed, up to `[DONE]` (which must end it).
fn sse_chunks(body: &str) -> Vec<serde_json::Value> {
    let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    data[..data.len() - 1].iter().map(|d| json(d)).collect()
}

/// Issue 17: responses carry every field OpenAI's schema requires (`message.refusal`,
/// `logprobs`, `system_fingerprint`), a stream with `include_usage` ends with a chunk of
/// `choices: []` and the usage (every other chunk says `usage: null`), and vLLM's
/// `/tokenize` and `/detokenize` answer in vLLM's shapes.
#[test]
fn responses_have_openais_shape_and_tokenize_round_trips() {
    let server = start(|t| t);
    let a = server.addr;
    let k = "sk-demo-user";
    let chat = serde_json::json!({"model": "caps", "messages": [{"role": "user", "content": "Name a color."}],
        "max_tokens": 6, "temperature": 0});
    let (st, r) = post_json(a, "/v1/chat/completions", k, &chat);
    assert_eq!(st, 200, "{r}");
    let c = &r["choices"][0];
    assert!(c["message"].get("refusal").is_some_and(serde_json::Value::is_null), "{r}");
    assert!(c.get("logprobs").is_some_and(serde_json::Value::is_null), "{r}");
    assert_eq!(c["message"]["role"], "assistant");
    let fp = r["system_fingerprint"].as_str().expect("system_fingerprint").to_owned();
    assert!(fp.starts_with("fp_") && fp.len() > 3, "{fp}");
    let (_, again) =
        post_json(a, "/v1/completions", k, &serde_json::json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}));
    assert_eq!(again["system_fingerprint"], fp.as_str(), "one fingerprint for one server");
    assert_eq!(again["choices"][0]["logprobs"], serde_json::Value::Null);

    let mut streamed = chat.clone();
    streamed["stream"] = serde_json::json!(true);
    streamed["stream_options"] = serde_json::json!({"include_usage": true});
    let (st, body) = http(a, "POST", "/v1/chat/completions", Some(k), streamed.to_string().as_bytes());
    assert_eq!(st, 200, "{body}");
    let chunks = sse_chunks(&body);
    let (last, rest) = chunks.split_last().expect("chunks");
    assert_eq!(last["choices"], serde_json::json!([]), "{last}");
    assert_eq!(last["usage"]["completion_tokens"], r["usage"]["completion_tokens"], "{last}");
    assert_eq!(last["usage"]["total_tokens"], r["usage"]["total_tokens"], "{last}");
    for c in rest {
        assert!(c.get("usage").is_some_and(serde_json::Value::is_null), "{c}");
        assert_eq!(c["system_fingerprint"], fp.as_str(), "{c}");
        assert_eq!(c["object"], "chat.completion.chunk");
    }
    let text: String = rest.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, r["choices"][0]["message"]["content"].as_str().expect("content"));
    // Without include_usage no chunk has a usage key at all (as OpenAI); the last one, with
    // `choices: []`, only names the receipt.
    streamed["stream_options"] = serde_json::Value::Null;
    let (_, body) = http(a, "POST", "/v1/chat/completions", Some(k), streamed.to_string().as_bytes());
    let chunks = sse_chunks(&body);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "{body}");
    let (last, rest) = chunks.split_last().expect("chunks");
    assert!(last["choices"].as_array().is_some_and(Vec::is_empty) && last["receipt"].is_string(), "{last}");
    assert!(rest.iter().all(|c| !c["choices"].as_array().expect("choices").is_empty()), "{body}");

    // /tokenize: a prompt, with token strings.
    let (st, t) = post_json(
        a,
        "/tokenize",
        k,
        &serde_json::json!({"model": MODEL, "prompt": "Hello world", "return_token_strs": true}),
    );
    assert_eq!(st, 200, "{t}");
    let ids: Vec<u64> = t["tokens"].as_array().expect("tokens").iter().map(|v| v.as_u64().expect("id")).collect();
    assert_eq!(t["count"], ids.len());
    assert!(t["max_model_len"].as_u64().is_some_and(|m| m > 1000), "{t}");
    assert_eq!(t["token_strs"].as_array().expect("token_strs").len(), ids.len());
    assert_eq!(t["token_strs"][1], "Ġworld", "{t}");
    let (st, d) = post_json(a, "/detokenize", k, &serde_json::json!({"model": MODEL, "tokens": ids}));
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["prompt"], "Hello world");
    // Messages are rendered with the chat template: the count is the prompt_tokens of a chat
    // request with the same messages.
    let (_, t) = post_json(a, "/tokenize", k, &serde_json::json!({"model": "caps", "messages": chat["messages"]}));
    assert_eq!(t["count"], r["usage"]["prompt_tokens"], "{t}");
    assert!(t.get("token_strs").is_some_and(serde_json::Value::is_null), "{t}");
    // An adapter the caller may not see answers as an absent one; bad input is named.
    let hidden = post_json(a, "/tokenize", k, &serde_json::json!({"model": "pirate", "prompt": "x"}));
    let absent = post_json(a, "/tokenize", k, &serde_json::json!({"model": "no-such-adapter", "prompt": "x"}));
    assert_eq!(hidden.0, 404);
    assert_eq!(
        hidden.1["error"]["message"].as_str().map(|m| m.replace("pirate", "X")),
        absent.1["error"]["message"].as_str().map(|m| m.replace("no-such-adapter", "X"))
    );
    assert_eq!(
        post_json(a, "/tokenize", "sk-demo-partner", &serde_json::json!({"model": "pirate", "prompt": "x"})).0,
        200
    );
    assert_refused(
        post_json(a, "/tokenize", k, &serde_json::json!({"prompt": "x", "chat_template": "{{x}}"})),
        "chat_template",
        "tokenize",
    );
    assert_refused(post_json(a, "/detokenize", k, &serde_json::json!({"tokens": [4_000_000]})), "tokens", "detokenize");
    assert_refused(post_json(a, "/detokenize", k, &serde_json::json!({"tokens": "1 2"})), "tokens", "detokenize");
    assert_eq!(http(a, "POST", "/tokenize", None, br#"{"prompt": "x"}"#).0, 401);
}

/// A cached venv under `~/.cache/openlora` holding `packages` (stamped, like the client venv).
fn tool_venv(name: &str, packages: &[&str]) -> PathBuf {
    let cache = std::env::var_os("OPENLORA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/openlora"));
    let venv = cache.join(name);
    let ready = venv.join(".ready");
    let want = packages.join("\n");
    if std::fs::read_to_string(&ready).ok().as_deref() != Some(want.as_str()) {
        let run = |cmd: &mut Command| {
            let st = cmd.status().expect("run");
            assert!(st.success(), "{cmd:?} failed");
        };
        if !venv.join("bin/python").exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        }
        run(Command::new(venv.join("bin/pip")).args(["install", "-q"]).args(packages));
        std::fs::write(&ready, want).expect("stamp");
    }
    venv
}

/// Issue 17: the frameworks applications use, against a live server: langchain-openai
/// (`ChatOpenAI`, `OpenAI`, streaming with usage, an adapter by `model`, `with_structured_output`
/// both ways, `bind_tools`, the deprecated `functions` refused by name), litellm (`openai/` and
/// `hosted_vllm/` models, streaming, errors mapped to its exception types) and llama-index's
/// `OpenAILike` (completions by default, chat when told). Pinned versions, in a cached venv
/// (`tests/e2e/frameworks.py`).
#[test]
fn langchain_litellm_and_llama_index_work_end_to_end() {
    let venv = tool_venv(
        "venv-frameworks",
        &["langchain-openai==1.8.1", "litellm==1.110.2", "llama-index-llms-openai-like==0.8.1"],
    );
    let server = start(|t| t);
    python_check(&venv.join("bin/python"), "tests/e2e/frameworks.py", &server, "all framework checks passed");
}

/// Issue 17: schemathesis on OpenAI's own OpenAPI description (trimmed to our four
/// operations, tests/openapi/) against a live server. Positive mode: no 5xx, no response that
/// violates the schema. Negative mode: no 5xx, no invalid request accepted. Seeded and
/// bounded in time (about a minute a mode).
#[test]
fn schemathesis_finds_no_server_error_no_schema_violation_and_no_invalid_request_accepted() {
    let st = tool_venv("venv-schemathesis", &["schemathesis==4.32.5"]).join("bin/st");
    // The trimmed description allows max_tokens 1..16 and n 1..2: the deployment's limits say
    // the same, so what the description calls invalid is invalid here too.
    let server = start(|t| {
        t.replace("max_tokens_limit = 2048", "max_tokens_limit = 16\nmax_n = 2")
            .replace("default_max_tokens = 256", "default_max_tokens = 16")
    });
    let spec = repo().join("tests/openapi/openai-openapi-trimmed.json");
    for (mode, checks) in [
        ("positive", "not_a_server_error,response_schema_conformance"),
        ("negative", "not_a_server_error,negative_data_rejection"),
    ] {
        let reports = tempfile::tempdir().expect("tempdir");
        let (status, out) = output_within(
            Command::new(&st)
                .arg("run")
                .arg(&spec)
                .args(["--url", &format!("http://{}/v1", server.addr)])
                .args(["-H", "Authorization: Bearer sk-demo-user"])
                .args(["--mode", mode, "--checks", checks])
                .args(["--seed", "17", "--max-examples", "40", "--max-time", "75", "--workers", "2"])
                .args(["--request-timeout", "60", "--suppress-health-check", "all", "--no-color"])
                .arg("--report-dir")
                .arg(reports.path())
                .current_dir(reports.path()),
            Duration::from_secs(240),
        );
        assert!(status.success(), "schemathesis ({mode}) found problems ({status}):\n{out}");
    }
}

/// Issue 17: `/metrics` passes `promtool check metrics` with no lint but the `:` naming one
/// that vLLM's exposition also gets, and holds the router ecosystem's contract.
#[test]
fn metrics_pass_promtool_and_keep_the_router_contract() {
    assert!(
        installed("promtool"),
        "`promtool` is not installed: this test needs it (Debian: `apt-get install -y prometheus`)"
    );
    let server = start(|t| t);
    let a = server.addr;
    let (st, r) = http(a, "POST", "/v1/chat/completions", Some("sk-demo-user"), &chat_body("caps", "Hi", 4));
    assert_eq!(st, 200, "{r}");
    let (st, text) = http(a, "GET", "/metrics", Some("sk-demo-admin"), b"");
    assert_eq!(st, 200, "{text}");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let other: Vec<&str> =
        report.lines().filter(|l| !l.trim().is_empty() && !l.contains("metric names should not contain ':'")).collect();
    assert!(other.is_empty(), "promtool check metrics:\n{report}\n--- exposition:\n{text}");
    // The contract: the KV gauge under both names, one lora_requests_info series in the
    // Gateway API Inference Extension's shape, the cache config, model_name on vllm:* series.
    let model = format!("model_name=\"{MODEL}\"");
    let kv = metric(&text, "vllm:kv_cache_usage_perc");
    assert!((0.0..=1.0).contains(&kv), "{kv}");
    assert_eq!(kv, metric(&text, "vllm:gpu_cache_usage_perc"));
    let lora: Vec<&str> = text.lines().filter(|l| l.starts_with("vllm:lora_requests_info{")).collect();
    assert_eq!(lora.len(), 1, "{text}");
    assert!(
        lora[0].contains("running_lora_adapters=\"") && lora[0].contains("waiting_lora_adapters=\""),
        "{}",
        lora[0]
    );
    let max_lora = lora[0].split("max_lora=\"").nth(1).and_then(|r| r.split('"').next()).expect("max_lora");
    assert!(max_lora.parse::<u32>().is_ok_and(|m| m > 0), "{max_lora}");
    let cache: Vec<&str> = text.lines().filter(|l| l.starts_with("vllm:cache_config_info{")).collect();
    assert_eq!(cache.len(), 1, "{text}");
    assert!(cache[0].contains("block_size=\"16\"") && cache[0].contains("num_gpu_blocks=\""), "{}", cache[0]);
    for l in text.lines().filter(|l| l.starts_with("vllm:") && !l.contains("_info{")) {
        assert!(l.contains(&model), "no model_name label: {l}");
    }
    for family in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total"] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
    }
    assert!(text.contains("# TYPE openlora_kv_blocks_capacity gauge"), "{text}");
    assert!(!text.contains("openlora_kv_blocks_total"), "a gauge named like a counter");
}

/// vLLM's `prompt_logprobs` through HTTP: every prompt token after the first scored, in vLLM's
/// shape (`null`, then objects keyed by token id with `logprob`, `rank`, `decoded_token`),
/// shared by the choices of one prompt, on completions (per choice) and chat (top level). The
/// score of a prompt's last token equals the `logprobs` of the same token when it was generated.
#[test]
fn prompt_logprobs_score_the_prompt_in_vllms_shape() {
    let server = start(|t| t);
    let a = server.addr;
    let k = "sk-demo-user";
    // Generate one greedy token with its logprob ...
    let (st, first) = post_json(
        a,
        "/v1/completions",
        k,
        &serde_json::json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 1,
            "temperature": 0, "logprobs": 1}),
    );
    assert_eq!(st, 200, "{first}");
    let word = first["choices"][0]["text"].as_str().expect("text").to_owned();
    let generated = first["choices"][0]["logprobs"]["token_logprobs"][0].as_f64().expect("logprob");
    // ... then score the prompt that ends with it, twice over (n = 2) and for two prompts.
    let prompt = format!("The capital of France is{word}");
    let (st, scored) = post_json(
        a,
        "/v1/completions",
        k,
        &serde_json::json!({"model": MODEL, "prompt": [prompt, "Hello there"], "max_tokens": 2, "n": 2,
            "temperature": 0, "prompt_logprobs": 2}),
    );
    assert_eq!(st, 200, "{scored}");
    let choices = scored["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 4);
    let (_, toks) = post_json(a, "/tokenize", k, &serde_json::json!({"model": MODEL, "prompt": prompt}));
    let ids: Vec<u64> = toks["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().expect("id")).collect();
    let lps = choices[0]["prompt_logprobs"].as_array().expect("prompt_logprobs");
    assert_eq!(lps.len(), ids.len(), "one entry per prompt token: {scored}");
    assert!(lps[0].is_null(), "the first token has no score");
    for (j, lp) in lps.iter().enumerate().skip(1) {
        let m = lp.as_object().expect("an object per token");
        let (key, own) = m.iter().next().expect("the prompt token first");
        assert_eq!(key, &ids[j].to_string(), "position {j} is keyed by the prompt token's id");
        assert!(own["logprob"].as_f64().expect("logprob") <= 0.0);
        assert!(own["rank"].as_u64().expect("rank") >= 1);
        assert!(own["decoded_token"].is_string());
        let ranks: Vec<u64> = m.values().map(|v| v["rank"].as_u64().expect("rank")).collect();
        assert!(ranks.contains(&1) && ranks.contains(&2), "the two most likely tokens are named: {lp}");
        assert!(m.len() <= 3, "the prompt token and two alternatives at most: {lp}");
    }
    let last = lps[ids.len() - 1].as_object().expect("last");
    let own = &last[&ids[ids.len() - 1].to_string()];
    assert_eq!(own["rank"], 1, "the greedy token is the most likely: {own}");
    let scored_lp = own["logprob"].as_f64().expect("logprob");
    assert!((scored_lp - generated).abs() < 1e-3, "scored {scored_lp} vs generated {generated}");
    assert_eq!(choices[1]["prompt_logprobs"], choices[0]["prompt_logprobs"], "the prompt's choices share its scores");
    assert_eq!(choices[3]["prompt_logprobs"], choices[2]["prompt_logprobs"]);
    assert_ne!(choices[2]["prompt_logprobs"], choices[0]["prompt_logprobs"], "each prompt its own scores");
    assert_eq!(choices[0]["text"], choices[1]["text"], "greedy choices agree");

    // Chat: one list at the top level, for the rendered conversation.
    let (st, chat) = post_json(
        a,
        "/v1/chat/completions",
        k,
        &serde_json::json!({"model": "caps", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "prompt_logprobs": 0}),
    );
    assert_eq!(st, 200, "{chat}");
    let lps = chat["prompt_logprobs"].as_array().expect("prompt_logprobs at the top level");
    assert!(lps.len() > 5 && lps[0].is_null(), "{chat}");
    assert!(lps[1..].iter().all(|lp| lp.as_object().is_some_and(|m| (1..=2).contains(&m.len()))), "{chat}");
    assert!(chat["choices"][0].get("prompt_logprobs").is_none(), "chat choices do not repeat it");
    // A request that does not ask gets no such key.
    let (_, plain) =
        post_json(a, "/v1/completions", k, &serde_json::json!({"model": MODEL, "prompt": "Hello", "max_tokens": 1}));
    assert!(plain["choices"][0].get("prompt_logprobs").is_none(), "{plain}");
}

/// `[model] chat_template` (vLLM's `--chat-template`) with a template that renders tools:
/// `tool_format = "auto"` hands the request's tools, the assistant's calls and the tool results
/// to the template, and the prompt is HF transformers' rendering of the same conversation
/// (tests/fixtures/tool-template, checked through `/tokenize`, which builds the prompt as chat
/// does); calls still come back as `tool_calls`, valid for the schema under `required`.
#[test]
fn a_chat_template_that_renders_tools_gets_them_from_the_request() {
    let template = repo().join("tests/fixtures/tool-template/template.jinja");
    let server = start(|t| {
        t.replace(
            "name = \"SmolLM2-135M-Instruct\"\n",
            &format!("name = \"SmolLM2-135M-Instruct\"\nchat_template = {:?}\n", template.display().to_string()),
        )
    });
    let a = server.addr;
    let k = "sk-demo-user";
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/tool-template/rendered.json")).expect("fixture"),
    )
    .expect("json");
    for case in fx["cases"].as_array().expect("cases") {
        let mut body = serde_json::json!({"model": MODEL, "messages": case["request_messages"]});
        if !case["tools"].is_null() {
            body["tools"] = case["tools"].clone();
        }
        let (st, ours) = post_json(a, "/tokenize", k, &body);
        assert_eq!(st, 200, "{ours}");
        let (st, theirs) = post_json(
            a,
            "/tokenize",
            k,
            &serde_json::json!({"model": MODEL, "prompt": case["rendered"], "add_special_tokens": false}),
        );
        assert_eq!(st, 200, "{theirs}");
        assert_eq!(ours["tokens"], theirs["tokens"], "case {}: the prompt is transformers' rendering", case["name"]);
    }
    // A required call, and a conversation that goes on after a call and its result.
    let tools = fx["cases"][0]["tools"].clone();
    let (st, r) = post_json(
        a,
        "/v1/chat/completions",
        k,
        &serde_json::json!({"model": MODEL, "messages": fx["cases"][0]["request_messages"], "tools": tools,
            "tool_choice": "required", "parallel_tool_calls": false, "max_tokens": 64, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
    let call = &r["choices"][0]["message"]["tool_calls"][0]["function"];
    let args: serde_json::Value = serde_json::from_str(call["arguments"].as_str().expect("arguments")).expect("JSON");
    match call["name"].as_str() {
        Some("get_weather") => assert!(args["city"].is_string(), "{args}"),
        Some("get_time") => assert!(args.is_object(), "{args}"),
        other => panic!("not a listed tool: {other:?}"),
    }
    let (st, r) = post_json(
        a,
        "/v1/chat/completions",
        k,
        &serde_json::json!({"model": MODEL, "messages": fx["cases"][1]["request_messages"], "tools": tools,
            "max_tokens": 16, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert!(r["choices"][0]["message"]["content"].is_string() || r["choices"][0]["message"]["tool_calls"].is_array());
}

/// `engine.cpu_activations = "int8"` reaches the CPU backend from the deployment file (the
/// serving line names the path; on a CPU without VNNI it says the f32 path runs instead), and
/// its greedy answer keeps every token the f32 path (the default) chooses by 0.5 logits or
/// more: where the two first part, the f32 margin is under 0.5 and int8 took f32's runner-up
/// (as tests/all/int8_numerics.rs checks in process). Measured 2026-12-03: the quickstart's
/// "What is the capital of France?" (with SmolLM2's default system prompt) parts at the first
/// token, where f32 prefers "The" (logprob -1.883) to "L" (-1.965) and int8 says "L'Étoile, la
/// Marseillaise...". A bad value is refused at start naming the key.
#[test]
fn a_deployment_with_int8_activations_keeps_every_token_f32_decides() {
    let answer = |server: &Server| {
        let body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0, "logprobs": true, "top_logprobs": 2});
        let (st, resp) =
            http(server.addr, "POST", "/v1/chat/completions", Some("sk-demo-user"), body.to_string().as_bytes());
        assert_eq!(st, 200, "{resp}");
        let v = json(&resp);
        let steps: Vec<(String, Vec<(String, f64)>)> = v["choices"][0]["logprobs"]["content"]
            .as_array()
            .expect("logprobs")
            .iter()
            .map(|t| {
                let top = t["top_logprobs"].as_array().expect("top").iter();
                let top =
                    top.map(|c| (c["token"].as_str().expect("token").to_owned(), c["logprob"].as_f64().expect("lp")));
                (t["token"].as_str().expect("token").to_owned(), top.collect())
            })
            .collect();
        steps
    };
    let f32_steps = answer(&start(|t| t));
    let server = start(|t| t.replace("cpu_activations = \"f32\"", "cpu_activations = \"int8\""));
    let startup = server.startup.join("\n");
    let vnni = openlora_kernels::cpu::int8::has_vnni();
    assert!(startup.contains(if vnni { "int8 activations" } else { "needs AVX-512 VNNI" }), "{startup}");
    let int8_steps = answer(&server);
    drop(server);
    let part = f32_steps.iter().zip(&int8_steps).position(|(a, b)| a.0 != b.0);
    eprintln!(
        "f32 {:?}\nint8 {:?}\nparted at {part:?}",
        f32_steps.iter().map(|s| s.0.as_str()).collect::<String>(),
        int8_steps.iter().map(|s| s.0.as_str()).collect::<String>()
    );
    if let Some(i) = part {
        let top = &f32_steps[i].1;
        eprintln!("f32 top two at step {i}: {top:?}");
        assert!(top.len() == 2 && top[0].1 - top[1].1 < 0.5, "step {i}: f32 decided by more than 0.5: {top:?}");
        assert_eq!(int8_steps[i].0, top[1].0, "step {i}: int8 took a token outside f32's two best");
    } else {
        assert_eq!(f32_steps.len(), int8_steps.len());
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("bad.toml");
    let quickstart = std::fs::read_to_string(repo().join("examples/quickstart.toml")).expect("quickstart");
    std::fs::write(&cfg, quickstart.replace("cpu_activations = \"f32\"", "cpu_activations = \"int4\"")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_openlora"))
        .args(["serve", cfg.to_str().expect("path")])
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("engine.cpu_activations") && err.contains("int4"), "{err}");
}
