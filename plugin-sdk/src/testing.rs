//! A mock host for native tests of plugin logic (every target but wasm32).
//!
//! In a plugin crate's ordinary `cargo test`, install a [`MockHost`] on the test's thread,
//! then call your trait's function directly; [`config`](crate::config),
//! [`catalog`](crate::catalog) and [`logging`](crate::logging) answer from the mock:
//!
//! ```
//! use openlora_plugin_sdk::router::{RouteDecision, RouteRequest, Router};
//! use openlora_plugin_sdk::testing::{MockHost, adapter};
//! use openlora_plugin_sdk::{Message, catalog, config, logging};
//!
//! struct ByConfig;
//! impl Router for ByConfig {
//!     fn route(_: RouteRequest) -> RouteDecision {
//!         let name = config::get("adapter").unwrap_or_default();
//!         logging::info(&format!("routing to {name}"));
//!         match catalog::adapter(&name) {
//!             Some(a) => RouteDecision::Adapters(vec![openlora_plugin_sdk::AdapterChoice { name: a.name, weight: 1.0 }]),
//!             None => RouteDecision::DefaultRoute,
//!         }
//!     }
//! }
//!
//! let host = MockHost::new().config("adapter", "pirate").adapter(adapter("pirate").tag("fun")).install();
//! let request = RouteRequest {
//!     model: "base".into(),
//!     messages: vec![Message { role: "user".into(), content: "hi".into() }],
//!     metadata: vec![],
//!     tenant: "acme".into(),
//! };
//! assert!(matches!(ByConfig::route(request), RouteDecision::Adapters(a) if a[0].name == "pirate"));
//! assert!(host.logged("routing to pirate"));
//! ```
//!
//! The mock belongs to the thread that installed it (tests run in parallel threads, each with
//! its own) and is removed when the returned [`Installed`] guard drops. It checks none of the
//! sandbox's rules: time and memory limits, fuel, and which host interfaces your kind may
//! import are the host's to enforce (`openlora plugin check FILE.wasm --kind KIND` loads a
//! built component exactly as the server does).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::logging::Level;
use crate::{AdapterFacts, Dataset};

/// One line a plugin logged (or a panic it reported, at [`Level::Error`], as `panic: ...`).
#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    /// Its severity.
    pub level: Level,
    /// Its text.
    pub message: String,
}

/// What the host answers while a test runs: the plugin's config, the adapter catalog, and
/// where log lines go. Build it, then [`install`](Self::install) it.
#[derive(Clone, Debug, Default)]
pub struct MockHost {
    config: BTreeMap<String, String>,
    config_json: Option<String>,
    adapters: Vec<AdapterFacts>,
}

impl MockHost {
    /// An empty host: no config, no adapters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the config key `key` (flattened with dots, as the host presents nested tables:
    /// `keywords.arr`) to `value`, spelled as the host would (strings as-is, numbers and
    /// booleans in TOML spelling, arrays as JSON).
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.config.insert(key.to_owned(), value.to_owned());
        self
    }

    /// What [`config::json`](crate::config::json) returns. Without it, a JSON object of the
    /// flattened keys with string values.
    pub fn config_json(mut self, json: &str) -> Self {
        self.config_json = Some(json.to_owned());
        self
    }

    /// Adds an adapter to the catalog (see [`adapter`] for a builder).
    pub fn adapter(mut self, facts: impl Into<AdapterFacts>) -> Self {
        let facts = facts.into();
        self.adapters.retain(|a| a.name != facts.name);
        self.adapters.push(facts);
        self.adapters.sort_by(|a, b| a.name.cmp(&b.name));
        self
    }

    /// Makes this the host of the current thread until the guard drops (replacing any other).
    pub fn install(self) -> Installed {
        let logs = Rc::new(RefCell::new(Vec::new()));
        let previous = CURRENT.with(|c| c.replace(Some(Current { host: self, logs: logs.clone() })));
        Installed { logs, previous: RefCell::new(previous) }
    }
}

/// The installed mock host of a thread; dropping it uninstalls it.
pub struct Installed {
    logs: Rc<RefCell<Vec<LogLine>>>,
    previous: RefCell<Option<Current>>,
}

impl Installed {
    /// Every line logged since the host was installed, in order.
    pub fn logs(&self) -> Vec<LogLine> {
        self.logs.borrow().clone()
    }

    /// Whether some logged line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.logs.borrow().iter().any(|l| l.message.contains(needle))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let previous = self.previous.borrow_mut().take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

struct Current {
    host: MockHost,
    logs: Rc<RefCell<Vec<LogLine>>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

fn with<T>(f: impl FnOnce(&Current) -> T) -> T {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some(current) => f(current),
        None => panic!(
            "openlora-plugin-sdk: a host function was called outside the openlora host with no mock installed; \
             in a native test, install one first: \
             `let _host = openlora_plugin_sdk::testing::MockHost::new().install();`"
        ),
    })
}

/// An adapter for the mock catalog, with `unknown` owner, no price, no tags, no datasets.
pub fn adapter(name: &str) -> AdapterBuilder {
    AdapterBuilder(AdapterFacts {
        name: name.to_owned(),
        generation: "0".repeat(64),
        tags: Vec::new(),
        owner: "unknown".to_owned(),
        license: String::new(),
        description: String::new(),
        price_per_1k_tokens: 0,
        datasets: Vec::new(),
    })
}

/// Builds [`AdapterFacts`] for the mock catalog; see [`adapter`].
#[derive(Clone, Debug)]
pub struct AdapterBuilder(AdapterFacts);

impl AdapterBuilder {
    /// Adds a tag.
    pub fn tag(mut self, tag: &str) -> Self {
        self.0.tags.push(tag.to_owned());
        self
    }

    /// Sets the owner (payee id).
    pub fn owner(mut self, owner: &str) -> Self {
        self.0.owner = owner.to_owned();
        self
    }

    /// Sets the price per 1,000 tokens, in micro-units.
    pub fn price_per_1k_tokens(mut self, micros: u64) -> Self {
        self.0.price_per_1k_tokens = micros;
        self
    }

    /// Adds a dataset.
    pub fn dataset(mut self, dataset: Dataset) -> Self {
        self.0.datasets.push(dataset);
        self
    }

    /// The facts.
    pub fn build(self) -> AdapterFacts {
        self.0
    }
}

impl From<AdapterBuilder> for AdapterFacts {
    fn from(b: AdapterBuilder) -> Self {
        b.0
    }
}

/// The host functions the SDK's modules call when not compiled for wasm32.
pub(crate) mod host {
    pub(crate) mod logging {
        use super::super::{LogLine, with};
        use crate::logging::Level;

        pub(crate) fn log(level: Level, message: &str) {
            with(|c| c.logs.borrow_mut().push(LogLine { level, message: message.to_owned() }));
        }

        pub(crate) fn report_panic(message: &str, location: &str) {
            log(Level::Error, &format!("panic: {message} at {location}"));
        }
    }

    pub(crate) mod config {
        use super::super::with;

        pub(crate) fn get(key: &str) -> Option<String> {
            with(|c| c.host.config.get(key).cloned())
        }

        pub(crate) fn entries() -> Vec<(String, String)> {
            with(|c| c.host.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        }

        pub(crate) fn json() -> String {
            with(|c| {
                c.host.config_json.clone().unwrap_or_else(|| {
                    let fields: Vec<String> =
                        c.host.config.iter().map(|(k, v)| format!("{}:{}", quote(k), quote(v))).collect();
                    format!("{{{}}}", fields.join(","))
                })
            })
        }

        fn quote(text: &str) -> String {
            let mut out = String::from("\"");
            for ch in text.chars() {
                match ch {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
    }

    pub(crate) mod catalog {
        use super::super::with;
        use crate::AdapterFacts;

        pub(crate) fn adapter(name: &str) -> Option<AdapterFacts> {
            with(|c| c.host.adapters.iter().find(|a| a.name == name).cloned())
        }

        pub(crate) fn adapters() -> Vec<AdapterFacts> {
            with(|c| c.host.adapters.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{catalog, config, logging};

    #[test]
    fn the_mock_answers_config_catalog_and_captures_logs() {
        let host = MockHost::new()
            .config("keywords.arr", "pirate")
            .config("otherwise", "default")
            .adapter(adapter("pirate").tag("fun").owner("ahoy").price_per_1k_tokens(7))
            .adapter(adapter("caps"))
            .install();
        assert_eq!(config::get("keywords.arr").as_deref(), Some("pirate"));
        assert_eq!(config::get("missing"), None);
        assert_eq!(config::section("keywords"), vec![("arr".to_owned(), "pirate".to_owned())]);
        assert_eq!(config::json(), r#"{"keywords.arr":"pirate","otherwise":"default"}"#);
        let names: Vec<String> = catalog::adapters().into_iter().map(|a| a.name).collect();
        assert_eq!(names, ["caps", "pirate"], "sorted by name, as the host's catalog is");
        assert_eq!(catalog::adapter("pirate").map(|a| (a.owner, a.price_per_1k_tokens)), Some(("ahoy".into(), 7)));
        logging::warn("careful");
        assert_eq!(host.logs(), vec![LogLine { level: Level::Warn, message: "careful".into() }]);
    }

    #[test]
    fn a_host_call_without_a_mock_panics_naming_the_fix() {
        let outcome = std::panic::catch_unwind(|| config::get("x"));
        let payload = outcome.expect_err("no host");
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        assert!(message.contains("MockHost::new().install()"), "{message}");
        // And the mock is the thread's only while its guard lives.
        drop(MockHost::new().config("x", "1").install());
        assert!(std::panic::catch_unwind(|| config::get("x")).is_err());
    }
}
