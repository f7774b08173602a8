//! The plugin section of the deployment TOML, as serde types.
//!
//! ```toml
//! [[plugins]]
//! name = "guard"
//! kind = "preprocessor"
//! path = "target/plugins/examples/prompt-guard.wasm"
//! failure = "open"          # "open": fall back (unedited prompt, default route, equal split)
//!                           # "closed": reject the request with the plugin's error
//! timeout_ms = 20           # wall-clock limit of one call (default per kind); also the
//!                           # longest a call waits for a free sandbox slot
//! memory_mib = 32           # linear memory cap (default 64)
//! fuel = 50000000           # attributors only (default 100 million instructions, roughly)
//! quarantine_after = 5      # consecutive failures the plugin caused before it is quarantined
//!                           # (0: never); host overload (busy, starved) does not count
//! config = { system_prompt = "Be brief.", redact_emails = true }
//! ```
//!
//! Unknown keys are errors, so a typo never silently falls back to a default. The lead's
//! deployment config embeds [`PluginSpec`] as its `plugins` array.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A plugin kind: the world its component exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// Chooses adapters for a request (`openlora:plugin/routing`).
    Router,
    /// Chooses merge recipes (`openlora:plugin/merging`).
    Merger,
    /// Edits prompts (`openlora:plugin/preprocessing`).
    Preprocessor,
    /// Splits a request's price (`openlora:plugin/attribution`).
    Attributor,
}

impl PluginKind {
    /// Every kind.
    pub const ALL: [PluginKind; 4] = [Self::Router, Self::Merger, Self::Preprocessor, Self::Attributor];

    /// The kind's name in the TOML.
    pub fn name(self) -> &'static str {
        match self {
            Self::Router => "router",
            Self::Merger => "merger",
            Self::Preprocessor => "preprocessor",
            Self::Attributor => "attributor",
        }
    }

    /// The WIT interface the kind's component exports (without package and version).
    pub fn interface(self) -> &'static str {
        match self {
            Self::Router => "routing",
            Self::Merger => "merging",
            Self::Preprocessor => "preprocessing",
            Self::Attributor => "attribution",
        }
    }

    /// The host interfaces the kind may import (without package and version).
    pub fn granted_imports(self) -> &'static [&'static str] {
        match self {
            Self::Preprocessor => &["types", "logging", "config"],
            Self::Router | Self::Merger | Self::Attributor => &["types", "logging", "config", "catalog"],
        }
    }

    /// The time limit of one call when the TOML gives none.
    pub fn default_timeout(self) -> Duration {
        match self {
            // On the request's critical path: preprocessing and routing must be quick.
            Self::Preprocessor | Self::Router => Duration::from_millis(20),
            Self::Merger => Duration::from_millis(50),
            // After the response; bounded by fuel as well.
            Self::Attributor => Duration::from_millis(100),
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a request when its plugin fails (traps, times out, is quarantined, or
/// answers something the host cannot use).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Carry on without the plugin: the unedited prompt, the default route, a linear merge
    /// with the router's weights, an equal split of the price.
    #[default]
    Open,
    /// Reject the request with the plugin's error.
    Closed,
}

/// One `[[plugins]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// Unique name, used in logs, metrics and errors.
    pub name: String,
    /// The plugin's kind; its component must export the kind's interface.
    pub kind: PluginKind,
    /// The component file (`.wasm`).
    pub path: PathBuf,
    /// Failure policy (default: open).
    #[serde(default)]
    pub failure: FailurePolicy,
    /// Wall-clock limit of one call in milliseconds (default: per kind, see
    /// [`PluginKind::default_timeout`]); also the longest a call waits for a sandbox slot.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Linear memory cap in MiB (default 64).
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Fuel (roughly, wasm instructions) per call; attributors only (default 100 million).
    #[serde(default)]
    pub fuel: Option<u64>,
    /// Consecutive failures the plugin caused ([`super::PluginError::is_guest_fault`]) after
    /// which it is quarantined (default 5; 0 = never).
    #[serde(default)]
    pub quarantine_after: Option<u32>,
    /// The plugin's own configuration, handed to it through the `config` interface.
    #[serde(default)]
    pub config: BTreeMap<String, serde_json::Value>,
}

/// Default memory cap.
pub const DEFAULT_MEMORY_MIB: u32 = 64;
/// Default fuel of one attributor call.
pub const DEFAULT_FUEL: u64 = 100_000_000;
/// Default number of consecutive failures before quarantine.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 5;

impl PluginSpec {
    /// A spec with the defaults for everything but name, kind and path.
    pub fn new(name: impl Into<String>, kind: PluginKind, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            kind,
            path: path.into(),
            failure: FailurePolicy::default(),
            timeout_ms: None,
            memory_mib: None,
            fuel: None,
            quarantine_after: None,
            config: BTreeMap::new(),
        }
    }

    /// The time limit of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout_ms.map(Duration::from_millis).unwrap_or_else(|| self.kind.default_timeout())
    }

    /// The memory cap in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB) as usize * 1024 * 1024
    }

    /// The fuel of one call: `Some` for attributors only.
    pub fn fuel(&self) -> Option<u64> {
        (self.kind == PluginKind::Attributor).then(|| self.fuel.unwrap_or(DEFAULT_FUEL))
    }

    /// Consecutive failures before quarantine (`None`: never).
    pub fn quarantine_after(&self) -> Option<u32> {
        match self.quarantine_after.unwrap_or(DEFAULT_QUARANTINE_AFTER) {
            0 => None,
            n => Some(n),
        }
    }
}

/// Flattens a plugin's config table into `key -> string` pairs, as the `config` interface
/// presents it: nested tables join keys with dots; strings as-is; numbers and booleans in
/// TOML spelling; arrays as JSON.
pub fn flatten_config(config: &BTreeMap<String, serde_json::Value>) -> BTreeMap<String, String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    walk(&format!("{prefix}.{key}"), value, out);
                }
            }
            serde_json::Value::String(text) => {
                out.insert(prefix.to_owned(), text.clone());
            }
            serde_json::Value::Null => {}
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    for (key, value) in config {
        walk(key, value, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Deployment {
        plugins: Vec<PluginSpec>,
    }

    #[test]
    fn parses_a_plugin_section_with_nested_config() {
        let text = r#"
            [[plugins]]
            name = "router"
            kind = "router"
            path = "target/plugins/examples/keyword-router.wasm"
            failure = "closed"
            timeout_ms = 15
            quarantine_after = 3
            [plugins.config]
            otherwise = "reject"
            [plugins.config.keywords]
            arr = "pirate"

            [[plugins]]
            name = "split"
            kind = "attributor"
            path = "split.wasm"
            config = { base_model_bps = 2500 }
        "#;
        let deployment: Deployment = toml::from_str(text).expect("valid");
        let router = &deployment.plugins[0];
        assert_eq!(router.kind, PluginKind::Router);
        assert_eq!(router.failure, FailurePolicy::Closed);
        assert_eq!(router.timeout(), Duration::from_millis(15));
        assert_eq!(router.quarantine_after(), Some(3));
        assert_eq!(router.fuel(), None, "only attributors run on fuel");
        let flat = flatten_config(&router.config);
        assert_eq!(flat.get("keywords.arr").map(String::as_str), Some("pirate"));
        assert_eq!(flat.get("otherwise").map(String::as_str), Some("reject"));

        let split = &deployment.plugins[1];
        assert_eq!(split.failure, FailurePolicy::Open);
        assert_eq!(split.fuel(), Some(DEFAULT_FUEL));
        assert_eq!(split.timeout(), PluginKind::Attributor.default_timeout());
        assert_eq!(flatten_config(&split.config).get("base_model_bps").map(String::as_str), Some("2500"));
    }

    #[test]
    fn unknown_keys_and_kinds_are_errors_naming_them() {
        let typo = "[[plugins]]\nname = \"a\"\nkind = \"router\"\npath = \"a.wasm\"\ntimeout = 5\n";
        let err = toml::from_str::<Deployment>(typo).err().expect("unknown field").to_string();
        assert!(err.contains("timeout"), "{err}");
        let kind = "[[plugins]]\nname = \"a\"\nkind = \"tokenizer\"\npath = \"a.wasm\"\n";
        let err = toml::from_str::<Deployment>(kind).err().expect("unknown kind").to_string();
        assert!(err.contains("tokenizer"), "{err}");
    }
}
