//! The plugin platform end to end: example plugins and adversarial fixtures, built from
//! source into components by the same code path as `cargo xtask plugins`, loaded by the
//! host and called through its API.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use openlora::plugins::{
    AdapterChoice, AdapterFacts, AdapterUse, CatalogView, Contributor, Dataset, EvidenceShare, FailurePolicy,
    HostOptions, InferenceRecord, LogLevel, LogRecord, LogSink, MajoritySign, MergeMethod, MergeOutcome, MergeRequest,
    Message, ModelUse, PayeeRole, PluginError, PluginHost, PluginKind, PluginSpec, PreprocessOutcome,
    PreprocessRequest, RouteDecision, RouteRequest, SandboxOptions,
};

/// Built components: (examples, fixtures). Built once per test binary; the build itself is
/// skipped when the sources are unchanged (content-hash stamp).
pub(crate) fn components() -> &'static (xtask::BuiltPlugins, xtask::BuiltPlugins) {
    static BUILT: OnceLock<(xtask::BuiltPlugins, xtask::BuiltPlugins)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let examples = xtask::build_workspace(&xtask::examples_workspace(), &xtask::output_dir("examples"))
            .unwrap_or_else(|e| panic!("building example plugins: {e}"));
        let fixtures = xtask::build_workspace(&xtask::fixtures_workspace(), &xtask::output_dir("fixtures"))
            .unwrap_or_else(|e| panic!("building fixture plugins: {e}"));
        (examples, fixtures)
    })
}

fn example(name: &str) -> PathBuf {
    components().0.get(name).unwrap_or_else(|| panic!("no example plugin {name}")).to_owned()
}

fn fixture(name: &str) -> PathBuf {
    components().1.get(name).unwrap_or_else(|| panic!("no fixture plugin {name}")).to_owned()
}

/// Keeps every log line for assertions.
#[derive(Default)]
struct CapturedLog(Mutex<Vec<(String, LogLevel, String)>>);

impl LogSink for CapturedLog {
    fn log(&self, record: &LogRecord<'_>) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.push((record.plugin.to_owned(), record.level, record.message.to_owned()));
    }
}

impl CapturedLog {
    fn contains(&self, plugin: &str, needle: &str) -> bool {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().any(|(p, _, m)| p == plugin && m.contains(needle))
    }
}

fn dataset(id: &str, contributors: &[(&str, u64)]) -> Dataset {
    Dataset {
        id: id.to_owned(),
        sha256: format!("{:0>64}", id.len()),
        license: "cc-by-4.0".to_owned(),
        contributors: contributors
            .iter()
            .map(|(name, share)| Contributor { name: (*name).to_owned(), share: *share })
            .collect(),
    }
}

fn facts(name: &str, owner: &str, price: u64, tags: &[&str], datasets: Vec<Dataset>) -> AdapterFacts {
    AdapterFacts {
        name: name.to_owned(),
        generation: format!("{:0>64}", name.len()),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        owner: owner.to_owned(),
        price_per_1k_tokens: price,
        datasets,
        ..AdapterFacts::default()
    }
}

fn catalog() -> CatalogView {
    CatalogView::new([
        facts(
            "pirate",
            "alice",
            2000,
            &["fun", "style"],
            vec![dataset("sea-shanties", &[("bob", 3), ("carol", 1)]), dataset("parrot-talk", &[("dave", 1)])],
        ),
        facts("caps", "erin", 1000, &["style"], Vec::new()),
        facts("contracts-en", "frank", 0, &["legal"], Vec::new()),
        facts("contracts-fr", "grace", 0, &["legal", "french"], Vec::new()),
    ])
}

/// An inference record using catalog adapters, as the service would build it.
fn record(request_id: &str, adapters: &[&str], price_micros: u64) -> InferenceRecord {
    let catalog = catalog();
    InferenceRecord {
        request_id: request_id.to_owned(),
        tenant: "acme".to_owned(),
        time_ms: 1_700_000_000_000,
        base_model: ModelUse {
            id: "smollm2".to_owned(),
            sha256: "0".repeat(64),
            owner: "meta".to_owned(),
            price_per_1k_tokens: 1000,
        },
        adapters: adapters
            .iter()
            .map(|name| {
                let f = catalog.get(name).cloned().unwrap_or_else(|| facts(name, "nobody", 0, &[], Vec::new()));
                AdapterUse {
                    name: f.name,
                    generation: f.generation,
                    weight: 1.0,
                    owner: f.owner,
                    price_per_1k_tokens: f.price_per_1k_tokens,
                    datasets: f.datasets,
                }
            })
            .collect(),
        merge: None,
        prompt_tokens: 12,
        completion_tokens: 34,
        finish_reason: "stop".to_owned(),
        price_micros,
        evidence: Vec::new(),
    }
}

fn host_with(log: Arc<dyn LogSink>) -> PluginHost {
    let host = PluginHost::new(HostOptions { log, ..HostOptions::default() }).expect("host");
    host.set_catalog(catalog());
    host
}

fn host() -> (PluginHost, Arc<CapturedLog>) {
    let log = Arc::new(CapturedLog::default());
    (host_with(log.clone()), log)
}

fn spec(name: &str, kind: PluginKind, path: &Path, config: serde_json::Value) -> PluginSpec {
    let mut spec = PluginSpec::new(name, kind, path);
    // Generous: the tests run in parallel with CPU-heavy ones on small machines, and a
    // healthy call that misses a wall-clock deadline would make them flaky. Tests of the
    // time limit set their own.
    spec.timeout_ms = Some(5_000);
    spec.config = serde_json::from_value(config).expect("config table");
    spec
}

fn closed(mut spec: PluginSpec) -> PluginSpec {
    spec.failure = FailurePolicy::Closed;
    spec
}

fn user(text: &str) -> Vec<Message> {
    vec![Message::new("user", text)]
}

fn route_request(text: &str, metadata: &[(&str, &str)]) -> RouteRequest {
    RouteRequest {
        model: "base".to_owned(),
        messages: user(text),
        metadata: metadata.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        tenant: "acme".to_owned(),
    }
}

// ---- the build --------------------------------------------------------------------------

#[test]
fn plugin_builds_are_cached_by_content_hash() {
    let _ = components();
    let again = xtask::build_workspace(&xtask::examples_workspace(), &xtask::output_dir("examples")).expect("build");
    assert!(again.cached, "unchanged sources must not rebuild");
    let names: Vec<&str> = again.components.keys().map(String::as_str).collect();
    assert_eq!(names, ["keyword-router", "prompt-guard", "recipe-merger", "revenue-split"]);
    for path in again.components.values() {
        let bytes = std::fs::read(path).expect("component");
        // A component's preamble: magic, then layer 1 (components), not a core module.
        assert_eq!(&bytes[..4], b"\0asm");
        assert_eq!(&bytes[6..8], &[1, 0], "{} is not a component", path.display());
    }
}

// ---- example plugins --------------------------------------------------------------------

#[test]
fn prompt_guard_redacts_contacts_and_injects_the_system_prompt() {
    let (host, _) = host();
    let config = serde_json::json!({ "system_prompt": "Never reveal personal data." });
    host.load(spec("guard", PluginKind::Preprocessor, &example("prompt-guard"), config)).expect("load");
    let request = PreprocessRequest {
        model: "base".to_owned(),
        messages: user(
            "Mail ada.lovelace+notes@example.co.uk or call +44 20 7946 0958 / (555) 123-4567. \
             Meeting on 2024-05-01 at 10.30, room 42, ticket 1234567.",
        ),
        metadata: Vec::new(),
        tenant: "acme".to_owned(),
    };
    let handled = host.preprocess("guard", &request).expect("call");
    assert_eq!(handled.fallback, None);
    let PreprocessOutcome::Edited(messages) = handled.value else { panic!("expected an edit: {handled:?}") };
    assert_eq!(messages[0], Message::new("system", "Never reveal personal data."));
    assert_eq!(
        messages[1].content,
        "Mail [email] or call [phone] / [phone]. Meeting on 2024-05-01 at 10.30, room 42, ticket 1234567."
    );
    assert!(!messages.iter().any(|m| m.content.contains('@')), "an e-mail address reached the model");

    // Nothing to redact and the system prompt already there: unchanged.
    let clean = PreprocessRequest { messages: messages.clone(), ..request };
    assert_eq!(host.preprocess("guard", &clean).expect("call").value, PreprocessOutcome::Unchanged);
}

#[test]
fn keyword_router_routes_by_keyword_and_tag() {
    let (host, log) = host();
    let config = serde_json::json!({
        "keywords": { "arr": "pirate", "SHOUT": "caps", "contract": "tag:legal", "ghost": "no-such-adapter" },
        "otherwise": "default",
    });
    host.load(spec("router", PluginKind::Router, &example("keyword-router"), config)).expect("load");
    let route = |text: &str| host.route("router", &route_request(text, &[])).expect("call").value;

    assert_eq!(route("Arr, where be the treasure?"), RouteDecision::Adapters(vec![AdapterChoice::new("pirate", 1.0)]));
    // Order of first appearance; whole words only ("arrow" is not "arr").
    assert_eq!(
        route("shout it: the arrow hit, arr!"),
        RouteDecision::Adapters(vec![AdapterChoice::new("caps", 1.0), AdapterChoice::new("pirate", 1.0)])
    );
    assert_eq!(
        route("Review this contract please"),
        RouteDecision::Adapters(vec![AdapterChoice::new("contracts-en", 1.0), AdapterChoice::new("contracts-fr", 1.0)])
    );
    assert_eq!(route("What is the capital of France?"), RouteDecision::Default);
    // A keyword pointing at an unknown adapter is skipped, with a warning in the host log.
    assert_eq!(route("a ghost story"), RouteDecision::Default);
    assert!(log.contains("router", "no-such-adapter"));

    let strict = serde_json::json!({ "keywords": { "arr": "pirate" }, "otherwise": "reject" });
    host.load(spec("strict", PluginKind::Router, &example("keyword-router"), strict)).expect("load");
    let decision = host.route("strict", &route_request("hello", &[])).expect("call").value;
    assert_eq!(decision, RouteDecision::Reject("no route matches this request".to_owned()));
}

#[test]
fn recipe_merger_picks_ties_or_linear_from_metadata() {
    let (host, _) = host();
    let config = serde_json::json!({ "density": 0.7, "majority_sign": "frequency" });
    host.load(spec("merger", PluginKind::Merger, &example("recipe-merger"), config)).expect("load");
    let request = |metadata: &[(&str, &str)], n: usize| MergeRequest {
        adapters: (0..n).map(|i| AdapterChoice::new(format!("a{i}"), 0.5 + i as f32)).collect(),
        metadata: metadata.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    };
    let plan = |outcome: MergeOutcome| match outcome {
        MergeOutcome::Plan(plan) => plan,
        other => panic!("expected a plan: {other:?}"),
    };

    let ties = plan(host.merge("merger", &request(&[("merge", "ties")], 2)).expect("call").value);
    assert_eq!(ties.method, MergeMethod::Ties);
    assert_eq!(ties.weights, [0.5, 1.5]);
    assert_eq!(ties.density, Some(0.7));
    assert_eq!(ties.majority_sign, MajoritySign::Frequency);

    let linear = plan(host.merge("merger", &request(&[("merge", "linear")], 3)).expect("call").value);
    assert_eq!((linear.method, linear.density), (MergeMethod::Linear, None));

    // No metadata: two adapters merge linearly, three with TIES; metadata density wins.
    assert_eq!(plan(host.merge("merger", &request(&[], 2)).expect("call").value).method, MergeMethod::Linear);
    let many = plan(host.merge("merger", &request(&[("merge-density", "0.25")], 3)).expect("call").value);
    assert_eq!((many.method, many.density), (MergeMethod::Ties, Some(0.25)));

    let refused = host.merge("merger", &request(&[("merge", "slerp")], 2)).expect("call").value;
    assert_eq!(refused, MergeOutcome::Reject("unknown merge `slerp` (ties, linear)".to_owned()));
}

#[test]
fn revenue_split_pays_manifest_shares_exactly() {
    let (host, _) = host();
    host.load(closed(spec("split", PluginKind::Attributor, &example("revenue-split"), serde_json::json!({}))))
        .expect("load");
    let record = record("r1", &["pirate", "caps"], 1_000_003);
    let payments = host.attribute("split", &record).expect("call").value;
    let got: Vec<(&str, PayeeRole, &str, u64)> =
        payments.iter().map(|p| (p.party.as_str(), p.role, p.source.as_str(), p.micros)).collect();
    // Prices 1000 : 2000 : 1000 -> 250000.75, 500001.5, 250000.75: the 2 left-over micros go
    // to the .75 remainders (base, then caps), not to pirate's .5. Pirate's 500001: half to
    // alice (the odd micro to the earlier party), 250000 to its two datasets equally, then
    // 3:1 between bob and carol.
    assert_eq!(
        got,
        [
            ("meta", PayeeRole::BaseOwner, "", 250_001),
            ("alice", PayeeRole::AdapterOwner, "pirate", 250_001),
            ("bob", PayeeRole::DatasetContributor, "pirate/sea-shanties", 93_750),
            ("carol", PayeeRole::DatasetContributor, "pirate/sea-shanties", 31_250),
            ("dave", PayeeRole::DatasetContributor, "pirate/parrot-talk", 125_000),
            ("erin", PayeeRole::AdapterOwner, "caps", 250_001),
        ]
    );
    assert_eq!(payments.iter().map(|p| p.micros).sum::<u64>(), record.price_micros);

    // Deterministic: the same record, the same answer.
    assert_eq!(host.attribute("split", &record).expect("call").value, payments);

    // Prices that do not divide evenly still sum exactly, with a platform cut and a fixed
    // base share too.
    let config = serde_json::json!({ "platform_bps": 700, "base_model_bps": 3333, "dataset_bps": 2500 });
    host.load(closed(spec("split2", PluginKind::Attributor, &example("revenue-split"), config))).expect("load");
    for price in [0u64, 1, 7, 999_999_937, u64::MAX / 3] {
        for name in ["split", "split2"] {
            let record = InferenceRecord { price_micros: price, ..record.clone() };
            let payments = host.attribute(name, &record).expect("call").value;
            assert_eq!(
                payments.iter().map(|p| u128::from(p.micros)).sum::<u128>(),
                u128::from(price),
                "{name} {price}"
            );
        }
    }

    // Evidence (ABI 0.1.1): half of pirate's datasets' 250000 goes by evidence, here all to
    // carol, whose documents the answer quoted; the other half by declaration as above.
    let quoted = InferenceRecord {
        evidence: vec![EvidenceShare {
            adapter: "pirate".into(),
            dataset: "sea-shanties".into(),
            contributor: "carol".into(),
            weight: 12,
        }],
        ..record.clone()
    };
    let with = host.attribute("split", &quoted).expect("call").value;
    let paid = |who: &str| -> u64 { with.iter().filter(|p| p.party == who).map(|p| p.micros).sum() };
    assert_eq!((paid("bob"), paid("carol"), paid("dave")), (46_875, 125_000 + 15_625, 62_500));
    assert_eq!(with.iter().map(|p| p.micros).sum::<u64>(), record.price_micros);

    // A bad configuration is a refusal -> a failure under fail-closed, naming the key.
    let bad = serde_json::json!({ "dataset_bps": 12000 });
    host.load(closed(spec("bad", PluginKind::Attributor, &example("revenue-split"), bad))).expect("load");
    let failure = host.attribute("bad", &record).expect_err("fail-closed");
    assert!(
        matches!(&failure.error, PluginError::BadAnswer { message } if message.contains("dataset_bps")),
        "{failure}"
    );
}

// ---- adversarial fixtures -----------------------------------------------------------------

fn chaos_router(host: &PluginHost, name: &str, failure: FailurePolicy) {
    chaos_router_with_timeout(host, name, failure, 5_000);
}

fn chaos_router_with_timeout(host: &PluginHost, name: &str, failure: FailurePolicy, timeout_ms: u64) {
    let mut spec = spec(name, PluginKind::Router, &fixture("chaos-router"), serde_json::json!({}));
    spec.failure = failure;
    spec.timeout_ms = Some(timeout_ms);
    spec.memory_mib = Some(16);
    spec.quarantine_after = Some(0);
    host.load(spec).expect("load chaos-router");
}

/// A timeout of `limit`: the guest's (`Timeout`), or `Starved` when this test machine's CPUs
/// were so contended that the call's thread got less than half of it (not the point here).
fn timed_out(error: &PluginError, limit: Duration) -> bool {
    matches!(error, PluginError::Timeout { limit: l } | PluginError::Starved { limit: l, .. } if *l == limit)
}

#[test]
fn an_infinite_loop_times_out() {
    let (host, _) = host();
    chaos_router_with_timeout(&host, "chaos", FailurePolicy::Closed, 50);
    let start = Instant::now();
    let failure = host.route("chaos", &route_request("hi", &[("chaos", "loop")])).expect_err("must fail");
    assert!(timed_out(&failure.error, Duration::from_millis(50)), "{failure}");
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    if let PluginError::Timeout { .. } = failure.error {
        assert_eq!(failure.to_string(), "plugin `chaos` timed out after 50ms");
    }
    // A guest cannot disguise its timeout as a panic.
    let liar = host.route("chaos", &route_request("hi", &[("chaos", "liar")])).expect_err("must fail");
    assert!(timed_out(&liar.error, Duration::from_millis(50)), "{liar}");
    // The host keeps serving.
    assert_eq!(host.route("chaos", &route_request("hi", &[])).expect("call").value, RouteDecision::Default);
}

#[test]
fn a_memory_hog_hits_the_memory_cap() {
    let (host, _) = host();
    chaos_router(&host, "chaos", FailurePolicy::Closed);
    let failure = host.route("chaos", &route_request("hi", &[("chaos", "hog")])).expect_err("must fail");
    assert_eq!(failure.error, PluginError::Memory { limit_bytes: 16 * 1024 * 1024 });
    assert_eq!(host.route("chaos", &route_request("hi", &[])).expect("call").value, RouteDecision::Default);
}

#[test]
fn a_panic_is_reported_with_its_message() {
    let (host, log) = host();
    chaos_router(&host, "chaos", FailurePolicy::Closed);
    let failure = host.route("chaos", &route_request("hi", &[("chaos", "panic")])).expect_err("must fail");
    assert_eq!(failure.error, PluginError::GuestPanic { message: "chaos monkey says no to acme".to_owned() });
    // The SDK's panic hook wrote the message and its location to the host log.
    assert!(log.contains("chaos", "panicked at chaos-router/src/lib.rs"), "{:?}", log.0.lock().map(|l| l.clone()));
}

#[test]
fn an_attributor_out_of_fuel_fails_deterministically() {
    let (host, _) = host();
    let mut spec = closed(spec("chaos", PluginKind::Attributor, &fixture("chaos-attributor"), serde_json::json!({})));
    spec.fuel = Some(2_000_000);
    spec.timeout_ms = Some(10_000);
    host.load(spec).expect("load");
    let record = |id: &str| record(id, &[], 1000);
    for _ in 0..2 {
        let failure = host.attribute("chaos", &record("burn")).expect_err("must fail");
        assert_eq!(failure.error, PluginError::OutOfFuel { fuel: 2_000_000 });
    }
    let short = host.attribute("chaos", &record("short")).expect_err("must fail");
    assert!(
        matches!(&short.error, PluginError::BadAnswer { message } if message == "payments sum to 999 micros, the price is 1000"),
        "{short}"
    );
    assert_eq!(host.attribute("chaos", &record("ok")).expect("call").value[0].micros, 1000);
}

#[test]
fn a_forbidden_import_is_refused_naming_it() {
    let (host, _) = host();
    let path = fixture("sneaky-preprocessor");
    let failure =
        host.load(spec("sneaky", PluginKind::Preprocessor, &path, serde_json::json!({}))).expect_err("refused");
    assert_eq!(
        failure.error,
        PluginError::ForbiddenImport {
            name: "openlora:plugin/catalog@0.1.1".to_owned(),
            kind: PluginKind::Preprocessor
        }
    );
    assert_eq!(
        failure.to_string(),
        "plugin `sneaky` imports `openlora:plugin/catalog@0.1.1`, which a preprocessor is not granted"
    );
    assert!(host.metrics().is_empty(), "a refused plugin must not be installed");
    // No kind is granted WASI.
    let wasi = host
        .load(spec("wasi", PluginKind::Router, &fixture("wasi-router"), serde_json::json!({})))
        .expect_err("refused");
    assert_eq!(
        wasi.error,
        PluginError::ForbiddenImport { name: "wasi:random/random@0.2.0".to_owned(), kind: PluginKind::Router }
    );
    // Declared as the wrong kind, it is refused for that instead.
    let wrong = host.load(spec("sneaky", PluginKind::Router, &path, serde_json::json!({}))).expect_err("refused");
    assert!(matches!(wrong.error, PluginError::WrongKind { kind: PluginKind::Router, .. }), "{wrong}");
}

#[test]
fn an_unknown_abi_major_is_refused() {
    let (host, _) = host();
    let failure = host
        .load(spec("future", PluginKind::Router, &fixture("future-abi"), serde_json::json!({})))
        .expect_err("refused");
    assert_eq!(
        failure.error,
        PluginError::UnsupportedAbi { version: "9.0.0".to_owned(), supported: "openlora:plugin@0.1.x".to_owned() }
    );
    // The example plugins report the version they were built against.
    let report =
        host.load(spec("router", PluginKind::Router, &example("keyword-router"), serde_json::json!({}))).expect("load");
    assert_eq!(report.abi_version, "0.1.1");
}

// ---- policy, quarantine, reload, cache ----------------------------------------------------

#[test]
fn fail_open_falls_back_and_fail_closed_rejects() {
    let (host, _) = host();
    chaos_router(&host, "open", FailurePolicy::Open);
    chaos_router(&host, "closed", FailurePolicy::Closed);
    let panicking = route_request("hi", &[("chaos", "panic")]);

    let open = host.route("open", &panicking).expect("fail-open never rejects");
    assert_eq!(open.value, RouteDecision::Default);
    let reported = open.fallback.expect("the failure is reported beside the fallback");
    assert!(matches!(reported.error, PluginError::GuestPanic { .. }));

    let closed = host.route("closed", &panicking).expect_err("fail-closed rejects");
    assert!(matches!(closed.error, PluginError::GuestPanic { .. }));

    let metrics = host.metrics();
    let open_metrics = metrics.iter().find(|m| m.name == "open").expect("metrics");
    assert_eq!((open_metrics.calls, open_metrics.failures, open_metrics.fallbacks), (1, 1, 1));
    let closed_metrics = metrics.iter().find(|m| m.name == "closed").expect("metrics");
    assert_eq!((closed_metrics.calls, closed_metrics.failures, closed_metrics.fallbacks), (1, 1, 0));
}

#[test]
fn a_plugin_is_quarantined_after_consecutive_failures() {
    let (host, log) = host();
    let mut spec = closed(spec("flaky", PluginKind::Router, &fixture("chaos-router"), serde_json::json!({})));
    spec.quarantine_after = Some(3);
    host.load(spec).expect("load");
    let panicking = route_request("hi", &[("chaos", "panic")]);
    let healthy = route_request("hi", &[]);

    // A success in between resets the count.
    for _ in 0..2 {
        host.route("flaky", &panicking).expect_err("panics");
    }
    host.route("flaky", &healthy).expect("healthy call");
    for _ in 0..3 {
        host.route("flaky", &panicking).expect_err("panics");
    }
    let metrics = host.metrics().remove(0);
    assert!(metrics.quarantined, "{metrics:?}");
    assert_eq!((metrics.calls, metrics.failures, metrics.consecutive_failures), (6, 5, 3));
    assert!(log.contains("flaky", "quarantined after 3 consecutive failures"));

    // Quarantined: not even a healthy request runs it.
    let refused = host.route("flaky", &healthy).expect_err("quarantined");
    assert_eq!(refused.error, PluginError::Quarantined { failures: 3 });
    assert_eq!(host.metrics()[0].latency.count, 6, "a quarantined plugin is not instantiated");

    // Reloading clears the quarantine.
    host.reload("flaky", fixture("chaos-router")).expect("reload");
    assert_eq!(host.route("flaky", &healthy).expect("call").value, RouteDecision::Default);
    assert!(!host.metrics()[0].quarantined);
}

/// Blocks the first call that logs `chaos-router: routing` until released.
struct GateLog {
    entered: Mutex<mpsc::Sender<()>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl LogSink for GateLog {
    fn log(&self, record: &LogRecord<'_>) {
        if record.message == "chaos-router: routing" {
            let _ = self.entered.lock().map(|tx| tx.send(()));
            let _ = self.release.lock().map(|rx| rx.recv_timeout(Duration::from_secs(20)));
        }
    }
}

#[test]
fn hot_reload_keeps_in_flight_calls_on_the_old_version() {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let gate = Arc::new(GateLog { entered: Mutex::new(entered_tx), release: Mutex::new(release_rx) });
    let host = Arc::new(host_with(gate));
    // v1: chaos-router (default route); v2: keyword-router (routes "arr" to pirate). Same
    // spec, so the config is already there for v2.
    let mut v1 =
        spec("r", PluginKind::Router, &fixture("chaos-router"), serde_json::json!({ "keywords": { "arr": "pirate" } }));
    v1.timeout_ms = Some(30_000);
    let first = host.load(v1).expect("load v1");

    let request = route_request("arr", &[("chaos", "log")]);
    let in_flight = {
        let (host, request) = (host.clone(), request.clone());
        std::thread::spawn(move || host.route("r", &request).map(|h| h.value))
    };
    entered_rx.recv_timeout(Duration::from_secs(20)).expect("v1 call started");

    let second = host.reload("r", example("keyword-router")).expect("reload to v2");
    assert!(second.replaced);
    assert_ne!(second.component_sha256, first.component_sha256);
    // New calls see v2 while the v1 call is still inside the plugin.
    assert_eq!(
        host.route("r", &request).expect("v2").value,
        RouteDecision::Adapters(vec![AdapterChoice::new("pirate", 1.0)])
    );

    release_tx.send(()).expect("release");
    let old = in_flight.join().expect("thread").expect("v1 call");
    assert_eq!(old, RouteDecision::Default, "the in-flight call finished on v1");
    assert_eq!(host.metrics()[0].component_sha256, second.component_sha256);
}

/// While switched on, sleeps inside the host for `hold` whenever a plugin logs `line`: the
/// calling thread is off the CPU while the wall clock runs, as under CPU contention, and the
/// call keeps its sandbox slot meanwhile.
struct SlowLog {
    line: &'static str,
    hold: Duration,
    on: AtomicBool,
}

impl SlowLog {
    fn new(line: &'static str, hold: Duration) -> Arc<Self> {
        Arc::new(Self { line, hold, on: AtomicBool::new(false) })
    }
}

impl LogSink for SlowLog {
    fn log(&self, record: &LogRecord<'_>) {
        if self.on.load(Ordering::SeqCst) && record.message == self.line {
            std::thread::sleep(self.hold);
        }
    }
}

/// Regression (multi-tenant trust, hole 5): more concurrent calls than the sandbox pool holds
/// failed at instantiation and counted as plugin failures, so load alone quarantined a
/// fail-closed plugin. Now the excess calls wait for a slot (up to the plugin's time limit),
/// then fail with `Busy`; none counts, and the plugin keeps serving.
#[test]
fn plugin_pool_full_is_not_quarantine() {
    let log = SlowLog::new("chaos-router: routing", Duration::from_millis(60));
    let sandbox = SandboxOptions { max_concurrent_calls: 2, ..SandboxOptions::default() };
    let host =
        Arc::new(PluginHost::new(HostOptions { log: log.clone(), sandbox, ..HostOptions::default() }).expect("host"));
    let mut spec = closed(spec("r", PluginKind::Router, &fixture("chaos-router"), serde_json::json!({})));
    spec.timeout_ms = Some(200);
    spec.quarantine_after = Some(3);
    host.load(spec).expect("load");
    log.on.store(true, Ordering::SeqCst);

    // 12 calls at once, each holding one of the 2 slots for at least 60 ms: at least 6 rounds
    // (360 ms), so the calls of the first rounds get a slot by waiting and the last ones cannot
    // get one within the 200 ms they may wait.
    let calls = 12;
    let start = Arc::new(Barrier::new(calls));
    let threads: Vec<_> = (0..calls)
        .map(|_| {
            let (host, start) = (host.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                host.route("r", &route_request("hi", &[("chaos", "log")]))
            })
        })
        .collect();
    let (mut served, mut busy) = (0u64, 0u64);
    for thread in threads {
        match thread.join().expect("thread") {
            Ok(handled) => {
                assert_eq!(handled.value, RouteDecision::Default);
                served += 1;
            }
            Err(failure) => match failure.error {
                PluginError::Busy { capacity: 2, waited } => {
                    assert!(waited >= Duration::from_millis(200), "gave up after {waited:?}: {failure}");
                    assert!(failure.to_string().contains("not counted against the plugin"), "{failure}");
                    busy += 1;
                }
                _ => panic!("only a busy pool may fail these calls: {failure}"),
            },
        }
    }
    assert!(served >= 4, "calls beyond the pool wait for a slot: {served} served, {busy} busy");
    assert!(busy >= 1, "12 calls of 60 ms on 2 slots cannot all start within 200 ms: {served} served");

    let metrics = host.metrics().remove(0);
    assert!(!metrics.quarantined, "{metrics:?}");
    assert_eq!((metrics.consecutive_failures, metrics.busy, metrics.failures), (0, busy, busy), "{metrics:?}");
    // Fail-closed and not quarantined: the next request is served.
    log.on.store(false, Ordering::SeqCst);
    assert_eq!(host.route("r", &route_request("hi", &[])).expect("serves").value, RouteDecision::Default);
}

/// Regression (hole 5): a wall-clock timeout counted against the plugin even when the calling
/// thread hardly ran (CPU contention). Now a timeout with less than half its limit on the CPU
/// is `Starved` and does not count; a guest that really spends its time looping is still
/// quarantined.
#[test]
fn plugin_timeout_under_contention_is_not_quarantine() {
    // `stall` logs, then loops: the log line keeps the thread asleep in the host past the
    // deadline, so the guest times out having had almost no CPU.
    let log = SlowLog::new("chaos-router: stalling", Duration::from_millis(150));
    let host = host_with(log.clone());
    let mut spec = closed(spec("r", PluginKind::Router, &fixture("chaos-router"), serde_json::json!({})));
    spec.timeout_ms = Some(40);
    spec.quarantine_after = Some(3);
    host.load(spec).expect("load");
    log.on.store(true, Ordering::SeqCst);
    let stalled = route_request("hi", &[("chaos", "stall")]);
    for _ in 0..6 {
        let failure = host.route("r", &stalled).expect_err("times out");
        match failure.error {
            PluginError::Starved { limit, cpu } => {
                assert_eq!(limit, Duration::from_millis(40));
                assert!(cpu < Duration::from_millis(20), "{failure}");
            }
            _ => panic!("a starved call is not the plugin's timeout: {failure}"),
        }
        assert!(failure.to_string().contains("not counted against the plugin"), "{failure}");
    }
    let metrics = host.metrics().remove(0);
    assert!(!metrics.quarantined, "{metrics:?}");
    assert_eq!((metrics.starved, metrics.consecutive_failures, metrics.failures), (6, 0, 6), "{metrics:?}");
    assert_eq!(host.route("r", &route_request("hi", &[])).expect("serves").value, RouteDecision::Default);

    // A guest that loops on the CPU is quarantined after 3 timeouts. The test machine may be
    // contended too, which makes some of these calls `Starved` (not counted): keep calling,
    // boundedly, until the quarantine.
    let looping = route_request("hi", &[("chaos", "loop")]);
    let (mut timeouts, mut starved) = (0, 0);
    for _ in 0..100 {
        let failure = host.route("r", &looping).expect_err("loops");
        match failure.error {
            PluginError::Timeout { .. } => timeouts += 1,
            PluginError::Starved { .. } => starved += 1,
            PluginError::Quarantined { failures: 3 } => break,
            _ => panic!("{failure}"),
        }
    }
    assert_eq!(timeouts, 3, "quarantined after its third timeout ({starved} starved calls not counted)");
    let metrics = host.metrics().remove(0);
    assert!(metrics.quarantined, "{metrics:?}");
    assert_eq!(metrics.starved, 6 + starved);
}

#[test]
fn a_reload_that_fails_keeps_the_old_version() {
    let (host, _) = host();
    let v1 = spec(
        "r",
        PluginKind::Router,
        &example("keyword-router"),
        serde_json::json!({ "keywords": { "arr": "pirate" } }),
    );
    let loaded = host.load(v1.clone()).expect("load");
    let pirate = RouteDecision::Adapters(vec![AdapterChoice::new("pirate", 1.0)]);

    // Wrong ABI, forbidden import, missing file: refused before the self-test.
    let future = host.reload("r", fixture("future-abi")).expect_err("refused");
    assert!(matches!(future.error, PluginError::UnsupportedAbi { .. }));
    let missing = host.reload("r", "/nonexistent/plugin.wasm").expect_err("refused");
    assert!(matches!(missing.error, PluginError::Io { .. }), "{missing}");

    // Loads, but its self-test call never returns: refused with the trap.
    let mut looping = v1.clone();
    looping.path = fixture("chaos-router");
    looping.config = serde_json::from_value(serde_json::json!({ "always": "loop" })).expect("table");
    looping.timeout_ms = Some(30);
    let failure = host.load(looping).expect_err("self-test fails");
    assert!(timed_out(&failure.error, Duration::from_millis(30)), "{failure}");

    assert_eq!(host.route("r", &route_request("arr", &[])).expect("still v1").value, pirate);
    let metrics = host.metrics().remove(0);
    assert_eq!((metrics.reloads, metrics.component_sha256), (0, loaded.component_sha256));
}

#[test]
fn compiled_components_are_cached_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = || HostOptions { cache_dir: Some(dir.path().to_owned()), ..HostOptions::default() };
    let path = example("prompt-guard");
    let first = PluginHost::new(options()).expect("host");
    let cold = first.load(spec("g", PluginKind::Preprocessor, &path, serde_json::json!({}))).expect("load");
    assert!(!cold.cache_hit);
    let files: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").filter_map(Result::ok).collect();
    assert_eq!(files.len(), 1);
    assert!(files[0].path().extension().is_some_and(|e| e == "cwasm"));

    let second = PluginHost::new(options()).expect("host");
    let warm = second.load(spec("g", PluginKind::Preprocessor, &path, serde_json::json!({}))).expect("load");
    assert!(warm.cache_hit);
    let request = PreprocessRequest { messages: user("mail me: a@b.io"), ..PreprocessRequest::default() };
    let PreprocessOutcome::Edited(messages) = second.preprocess("g", &request).expect("call").value else {
        panic!("expected an edit")
    };
    assert_eq!(messages[0].content, "mail me: [email]");

    // A corrupt cache file is recompiled, not trusted. (Replaced by rename, as the cache
    // itself writes: loaded components map their file, so it is never rewritten in place.)
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"garbage").expect("write");
    std::fs::rename(&garbage, files[0].path()).expect("corrupt");
    let third = PluginHost::new(options()).expect("host");
    let recompiled = third.load(spec("g", PluginKind::Preprocessor, &path, serde_json::json!({}))).expect("load");
    assert!(!recompiled.cache_hit);
}

#[test]
fn calls_name_unknown_plugins_and_wrong_kinds() {
    let (host, _) = host();
    let missing = host.route("nobody", &route_request("hi", &[])).expect_err("not loaded");
    assert_eq!(missing.error, PluginError::NotLoaded);
    host.load(spec("guard", PluginKind::Preprocessor, &example("prompt-guard"), serde_json::json!({}))).expect("load");
    let wrong = host.route("guard", &route_request("hi", &[])).expect_err("kind");
    assert_eq!(
        wrong.error,
        PluginError::KindMismatch { requested: PluginKind::Router, actual: PluginKind::Preprocessor }
    );
}

#[test]
fn the_sdk_readme_example_is_the_keyword_router_source() {
    let root = xtask::repo_root();
    let readme = std::fs::read_to_string(root.join("plugin-sdk/README.md")).expect("README");
    let source = std::fs::read_to_string(root.join("plugins/keyword-router/src/lib.rs")).expect("source");
    let block = readme.split("````rust\n").nth(1).and_then(|rest| rest.split("````").next()).expect("a rust block");
    assert_eq!(block, source, "plugin-sdk/README.md's example drifted from plugins/keyword-router/src/lib.rs");
}

// ---- benchmark -----------------------------------------------------------------------------

/// Per-request overhead of the plugin chain (preprocess + route + attribute) and the cost of
/// loading (compile, and from the disk cache). A benchmark, not a test: run it with
/// `cargo test --release -p openlora-tests --test all plugins::plugin_chain_overhead -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; prints figures"]
fn plugin_chain_overhead() {
    let (host, _) = host();
    let guard = serde_json::json!({ "system_prompt": "Be brief." });
    host.load(spec("guard", PluginKind::Preprocessor, &example("prompt-guard"), guard)).expect("load");
    let router = serde_json::json!({ "keywords": { "arr": "pirate", "shout": "caps", "contract": "tag:legal" } });
    host.load(spec("router", PluginKind::Router, &example("keyword-router"), router)).expect("load");
    host.load(spec("split", PluginKind::Attributor, &example("revenue-split"), serde_json::json!({}))).expect("load");

    let preprocess = PreprocessRequest {
        model: "base".to_owned(),
        messages: vec![
            Message::new("system", "You are a pirate."),
            Message::new("user", "Arr! Write to ada@example.com about the treasure, or call +1 555 123 4567."),
        ],
        metadata: Vec::new(),
        tenant: "acme".to_owned(),
    };
    let catalog = catalog();
    let chain = || {
        let messages = match host.preprocess("guard", &preprocess).expect("preprocess").value {
            PreprocessOutcome::Edited(messages) => messages,
            _ => preprocess.messages.clone(),
        };
        let route = RouteRequest { messages, ..route_request("", &[]) };
        let adapters = match host.route("router", &route).expect("route").value {
            RouteDecision::Adapters(adapters) => adapters,
            _ => Vec::new(),
        };
        let mut record = record("bench", &[], 1234);
        record.adapters = adapters
            .iter()
            .filter_map(|a| catalog.get(&a.name))
            .map(|f| AdapterUse {
                name: f.name.clone(),
                generation: f.generation.clone(),
                weight: 1.0,
                owner: f.owner.clone(),
                price_per_1k_tokens: f.price_per_1k_tokens,
                datasets: f.datasets.clone(),
            })
            .collect();
        host.attribute("split", &record).expect("attribute");
    };
    for _ in 0..200 {
        chain();
    }
    let mut samples: Vec<f64> = (0..5000)
        .map(|_| {
            let start = Instant::now();
            chain();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    let pct = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!("plugin chain (preprocess + route + attribute), {} requests:", samples.len());
    println!("  p50 {:.1} us   p99 {:.1} us   max {:.1} us", pct(0.5), pct(0.99), pct(1.0));
    for m in host.metrics() {
        println!(
            "  {:<7} p50 {:>4} us  p99 {:>4} us  (histogram bucket bounds)",
            m.name, m.latency.p50_us, m.latency.p99_us
        );
    }

    // Instantiation cost: a plugin that does nothing (fresh store + instance + one call).
    chaos_router(&host, "noop", FailurePolicy::Open);
    let noop = route_request("hi", &[]);
    let mut samples: Vec<f64> = (0..5000)
        .map(|_| {
            let start = Instant::now();
            host.route("noop", &noop).expect("noop");
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    let pct = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!("  no-op router (store + instantiate + call): p50 {:.1} us   p99 {:.1} us", pct(0.5), pct(0.99));

    let dir = tempfile::tempdir().expect("tempdir");
    for (label, cache) in
        [("compile (no cache)", None), ("cold disk cache", Some(dir.path())), ("warm disk cache", Some(dir.path()))]
    {
        let host = PluginHost::new(HostOptions { cache_dir: cache.map(Path::to_owned), ..HostOptions::default() })
            .expect("host");
        let start = Instant::now();
        host.load(spec("router", PluginKind::Router, &example("keyword-router"), serde_json::json!({}))).expect("load");
        println!(
            "  load keyword-router, {label}: {:.2} ms (includes the self-test call)",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
}

#[test]
fn an_attributor_built_against_abi_0_1_0_still_loads_and_runs() {
    // Frozen copy of the 0.1.0 WIT, no SDK: the host (0.1.1, which added
    // evidence-attribution) must link it by semver and call its plain `attribute`.
    let (host, _) = host();
    let info = host
        .load(closed(spec("old", PluginKind::Attributor, &fixture("abi-0-1-0"), serde_json::json!({}))))
        .expect("a 0.1.0 attributor loads");
    assert_eq!(info.abi_version, "0.1.0");
    let mut record = record("r1", &["pirate"], 4321);
    record.evidence =
        vec![EvidenceShare { adapter: "pirate".into(), dataset: "d".into(), contributor: "x".into(), weight: 1 }];
    let payments = host.attribute("old", &record).expect("call").value;
    assert_eq!(payments.len(), 1);
    assert_eq!((payments[0].party.as_str(), payments[0].micros), ("meta", 4321));
    // The SDK's plugins are built against 0.1.1.
    let new = host
        .load(closed(spec("new", PluginKind::Attributor, &example("revenue-split"), serde_json::json!({}))))
        .expect("load");
    assert_eq!(new.abi_version, "0.1.1");
}
