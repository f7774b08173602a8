//! What clients and the ledger see when a plugin fails or refuses, through HTTP on the
//! quickstart deployment (in process, the default model on the CPU):
//! - a fail-closed plugin's failure is a 500 `internal_error` naming the plugin, never the
//!   503 `overloaded_error` that OpenAI clients retry, and never the guest's panic text
//!   (admins get it, and the log);
//! - a plugin's refusal is a 400 quoting its reason as the plugin's;
//! - a router whose choice cannot be served is blamed by name, not the client's `adapters`;
//! - a fail-closed attributor that fails refuses the request before generation when it fails
//!   on the request's worst case, and otherwise still leaves a receipt saying attribution
//!   failed, with no payments, in a ledger that verifies.

use serde_json::{Value, json};

use crate::trust::{JSON, Node, host, http};

const MODEL: &str = "SmolLM2-135M-Instruct";

fn fixture(name: &str) -> String {
    crate::plugins::components().1.get(name).unwrap_or_else(|| panic!("no fixture plugin {name}")).display().to_string()
}

/// The quickstart with the `[[plugins]]` entry `name` replaced by `entry`.
fn replace_plugin(text: &str, name: &str, entry: &str) -> String {
    let start = text.find(&format!("[[plugins]]\nname = \"{name}\"")).unwrap_or_else(|| panic!("no entry {name}"));
    let end = text[start + 1..].find("\n[[").map_or(text.len(), |i| start + 2 + i);
    format!("{}{entry}\n{}", &text[..start], &text[end..])
}

fn body(v: &str) -> Value {
    serde_json::from_str(v).unwrap_or_else(|e| panic!("not JSON ({e}): {v}"))
}

fn headers(node: &Node, key: &str) -> String {
    format!("{}Authorization: Bearer {key}\r\n{JSON}", host(node.addr))
}

#[test]
fn plugin_failures_are_5xx_without_guest_text_and_refusals_are_the_plugins_own() {
    let node = Node::quickstart(|t| {
        let chaos = format!(
            "[[plugins]]\nname = \"chaos\"\nkind = \"router\"\npath = {:?}\nfailure = \"closed\"\nquarantine_after = 0\n",
            fixture("chaos-router")
        );
        replace_plugin(&t, "keyword-router", &chaos)
    });
    let (user, admin) = (headers(&node, "sk-demo-user"), headers(&node, "sk-demo-admin"));
    let ask = |h: &str, mode: &str| {
        let req = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2, "metadata": {"chaos": mode}});
        let (st, text) = http(node.addr, "POST", "/v1/completions", h, &req.to_string());
        (st, body(&text)["error"].clone(), text)
    };

    // A panic: 500 naming the plugin and what happened, not its message.
    let (st, e, text) = ask(&user, "panic");
    assert_eq!(st, 500, "{text}");
    assert_eq!(e["type"], "internal_error", "not an overload: clients must not retry it: {text}");
    let message = e["message"].as_str().expect("message");
    assert!(message.contains("router plugin `chaos` panicked"), "{message}");
    assert!(!text.contains("chaos monkey"), "the guest's panic text reached the tenant: {text}");
    assert!(e["param"].is_null(), "{text}");
    // An admin is told the guest's message.
    let (st, _, text) = ask(&admin, "panic");
    assert_eq!(st, 500, "{text}");
    assert!(text.contains("chaos monkey says no"), "admins see the detail: {text}");

    // A refusal: 400 with the plugin's reason, marked as the plugin's.
    let (st, e, text) = ask(&user, "reject");
    assert_eq!(st, 400, "{text}");
    let message = e["message"].as_str().expect("message");
    assert!(message.contains("router plugin `chaos` refused"), "{message}");
    assert!(message.contains("written by the plugin") && message.contains("not today"), "{message}");
    assert!(e["param"].is_null(), "the client sent no wrong field: {text}");

    // A choice the deployment's limits refuse: the router's fault, not `adapters`.
    let (st, e, text) = ask(&user, "twice");
    assert_eq!(st, 500, "{text}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("router plugin `chaos` chose")), "{text}");
    assert!(e["param"].is_null(), "{text}");

    // The plugin is still in service, and nothing it failed on left a receipt.
    let (st, _, text) = ask(&user, "none");
    assert_eq!(st, 200, "{text}");
    assert_eq!(node.ledger().len(), 1, "only the served request has a receipt");
}

/// The ledger's receipts (whole lines: body and signature).
fn receipts(node: &Node) -> Vec<Value> {
    std::fs::read_to_string(node.dir.path().join("state/ledger.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("ledger line"))
        .collect()
}

fn verify(node: &Node) {
    let key = node.svc.ledger().expect("attribution on").public_key().to_owned();
    let v = openlora::attribution::verify_file(&node.dir.path().join("state/ledger.jsonl"), Some(&key))
        .expect("ledger readable");
    assert!(v.error.is_none(), "ledger verify fails: {:?}", v.error);
}

/// The quickstart with the chaos attributor in revenue-split's place (policy `failure`) and
/// tenants whose names pick its misbehaviour.
fn attributor_node(failure: &str) -> Node {
    let failure = failure.to_owned();
    Node::quickstart(move |t| {
        let chaos = format!(
            "[[plugins]]\nname = \"chaos\"\nkind = \"attributor\"\npath = {:?}\nfailure = \"{failure}\"\nquarantine_after = 0\n",
            fixture("chaos-attributor")
        );
        let mut t = replace_plugin(&t, "revenue-split", &chaos);
        for name in ["short", "late", "panic"] {
            let digest = openlora::attribution::receipt::text_sha256(&format!("sk-{name}"));
            t.push_str(&format!(
                "\n[[tenants]]\nname = \"{name}\"\nrole = \"user\"\nkey_sha256 = \"{digest}\"\nmax_concurrent = 4\n"
            ));
        }
        t
    })
}

#[test]
fn a_failing_fail_closed_attributor_refuses_before_generation_or_keeps_the_receipt() {
    let node = attributor_node("closed");
    let chat = |key: &str, extra: Value| {
        let mut req =
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16});
        for (k, v) in extra.as_object().expect("object") {
            req[k] = v.clone();
        }
        http(node.addr, "POST", "/v1/chat/completions", &headers(&node, key), &req.to_string())
    };

    // Wrong on every record: the dry run fails, so the request is refused before any token,
    // as a 500 naming the attributor. Nothing was generated, so there is no receipt.
    let (st, text) = chat("sk-short", json!({}));
    assert_eq!(st, 500, "{text}");
    let message = body(&text)["error"]["message"].as_str().expect("message").to_owned();
    assert!(message.contains("attributor plugin `chaos` gave an unusable answer"), "{message}");
    // A panicking attributor: the same, without its text.
    let (st, text) = chat("sk-panic", json!({}));
    assert_eq!(st, 500, "{text}");
    assert!(!text.contains("sk-attributor-secret"), "{text}");
    assert!(receipts(&node).is_empty(), "refused before generation: no inference, no receipt");

    // Right on the dry run (`length`), wrong on the real record (a stop string ends it with
    // `stop`): the answer is returned with a receipt that records the failure.
    let stops = json!({"stop": ["e", "a", "o", "i", " "], "temperature": 0});
    let (st, text) = chat("sk-late", stops.clone());
    assert_eq!(st, 200, "{text}");
    let v = body(&text);
    let id = v["receipt"].as_str().expect("the response names its receipt");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{text}");
    let (st, receipt) = http(node.addr, "GET", &format!("/v1/receipts/{id}"), &headers(&node, "sk-late"), "");
    assert_eq!(st, 200, "{receipt}");
    let att = &body(&receipt)["body"]["attribution"];
    let attributor = att["attributor"].as_str().expect("attributor");
    assert!(attributor.starts_with("attribution failed: plugin `chaos` gave an unusable answer"), "{att}");
    assert!(attributor.contains("fail-closed"), "{att}");
    assert_eq!(att["total_micros"], 0, "{att}");
    assert_eq!(att["payments"], json!([]), "{att}");
    // A tenant the attributor is happy with is charged as usual.
    let (st, text) = chat("sk-demo-user", stops);
    assert_eq!(st, 200, "{text}");
    let all = receipts(&node);
    assert_eq!(all.len(), 2, "one receipt per served request");
    assert!(all[1]["body"]["attribution"]["total_micros"].as_u64().is_some_and(|m| m > 0), "{}", all[1]);
    verify(&node);
}

#[test]
fn a_failing_fail_open_attributor_pays_the_fallback_and_its_receipt_keeps_no_guest_text() {
    let node = attributor_node("open");
    let req = json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4});
    let (st, text) = http(node.addr, "POST", "/v1/chat/completions", &headers(&node, "sk-panic"), &req.to_string());
    assert_eq!(st, 200, "fail-open serves: {text}");
    let all = receipts(&node);
    assert_eq!(all.len(), 1);
    let att = &all[0]["body"]["attribution"];
    let attributor = att["attributor"].as_str().expect("attributor");
    assert!(attributor.contains("fail-open fallback") && attributor.contains("panicked"), "{att}");
    assert!(!all[0].to_string().contains("sk-attributor-secret"), "the tenant reads its receipt: {att}");
    let sum: u64 = att["payments"].as_array().expect("payments").iter().filter_map(|p| p["micros"].as_u64()).sum();
    assert_eq!(Some(sum), att["total_micros"].as_u64(), "{att}");
    verify(&node);
}
