//! The typed failures of plugins: loading them and calling them.
//!
//! A trap inside a plugin becomes one of the call variants ([`PluginError::Timeout`],
//! [`PluginError::OutOfFuel`], [`PluginError::Memory`], [`PluginError::GuestPanic`]); a plugin
//! the host refuses to load fails with one of the load variants. Everything the host cannot
//! classify more precisely is [`PluginError::Other`], with wasmtime's message.

use std::path::PathBuf;
use std::time::Duration;

use super::config::PluginKind;

/// A plugin failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    /// The call ran past its wall-clock limit (epoch deadline).
    #[error("timed out after {limit:?}")]
    Timeout {
        /// The plugin's time limit.
        limit: Duration,
    },
    /// The call used up its fuel (attributors).
    #[error("ran out of fuel ({fuel} units)")]
    OutOfFuel {
        /// The fuel the call was given.
        fuel: u64,
    },
    /// The plugin tried to grow its memory past its cap.
    #[error("exceeded its memory cap of {limit_bytes} bytes")]
    Memory {
        /// The cap.
        limit_bytes: usize,
    },
    /// The plugin panicked; the SDK's panic hook reported the message.
    #[error("panicked: {message}")]
    GuestPanic {
        /// The panic message.
        message: String,
    },
    /// The component imports something its kind is not granted (WASI, an ungranted
    /// openlora interface, anything else). Refused at load.
    #[error("imports `{name}`, which a {kind} is not granted")]
    ForbiddenImport {
        /// The import's full name, e.g. `openlora:plugin/catalog@0.1.0`.
        name: String,
        /// The plugin's kind.
        kind: PluginKind,
    },
    /// The component was built against an ABI version this host does not support. Refused
    /// at load.
    #[error("was built for ABI openlora:plugin@{version}; this host supports {supported}")]
    UnsupportedAbi {
        /// The version the component exports.
        version: String,
        /// The versions this host loads.
        supported: String,
    },
    /// The component does not export its declared kind's interface.
    #[error("does not export openlora:plugin/{expected} (is it a {kind}? it exports: {found})")]
    WrongKind {
        /// The declared kind.
        kind: PluginKind,
        /// The interface the kind must export.
        expected: &'static str,
        /// What the component exports.
        found: String,
    },
    /// The plugin file could not be read.
    #[error("reading {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// The file is not a valid component, or it failed to compile or link.
    #[error("invalid component: {message}")]
    Invalid {
        /// wasmtime's explanation.
        message: String,
    },
    /// The plugin answered, but the answer breaks the ABI's contract (e.g. payments that do
    /// not sum to the price).
    #[error("gave an unusable answer: {message}")]
    BadAnswer {
        /// What is wrong with it.
        message: String,
    },
    /// The plugin has failed too many times in a row and is not called until reloaded.
    #[error("is quarantined after {failures} consecutive failures")]
    Quarantined {
        /// The consecutive failures that caused the quarantine.
        failures: u32,
    },
    /// No plugin of that name is loaded.
    #[error("is not loaded")]
    NotLoaded,
    /// A plugin of that name is loaded with another kind.
    #[error("is a {actual}, not a {requested}")]
    KindMismatch {
        /// The kind the caller asked for.
        requested: PluginKind,
        /// The plugin's kind.
        actual: PluginKind,
    },
    /// Any other trap or host error.
    #[error("failed: {message}")]
    Other {
        /// wasmtime's message.
        message: String,
    },
}

impl PluginError {
    /// Whether this is a trap during a call (counts towards quarantine), as opposed to a
    /// load-time refusal or a lookup error.
    pub fn is_call_failure(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. }
                | Self::OutOfFuel { .. }
                | Self::Memory { .. }
                | Self::GuestPanic { .. }
                | Self::BadAnswer { .. }
                | Self::Other { .. }
        )
    }
}

/// A plugin failure with the plugin's name: what a fail-closed request is rejected with, and
/// what loading returns.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("plugin `{plugin}` {error}")]
pub struct PluginFailure {
    /// The plugin's name.
    pub plugin: String,
    /// What went wrong.
    pub error: PluginError,
}

impl PluginFailure {
    pub(crate) fn new(plugin: &str, error: PluginError) -> Self {
        Self { plugin: plugin.to_owned(), error }
    }
}
