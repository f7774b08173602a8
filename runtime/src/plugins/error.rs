//! The typed failures of plugins: loading them and calling them.
//!
//! A trap inside a plugin becomes one of the call variants ([`PluginError::Timeout`],
//! [`PluginError::OutOfFuel`], [`PluginError::Memory`], [`PluginError::GuestPanic`]); a plugin
//! the host refuses to load fails with one of the load variants. Everything the host cannot
//! classify more precisely is [`PluginError::Other`], with wasmtime's message.
//!
//! Only failures the guest caused count towards quarantine ([`PluginError::is_guest_fault`]).
//! Failures of the host under load ([`PluginError::is_overload`]: no sandbox slot in time, a
//! timeout while the call got little CPU, a host-side instantiation failure) fail the call
//! with the plugin's policy but leave its health alone.

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
    /// Every sandbox slot stayed in use for as long as the call could wait (the plugin's time
    /// limit): the host is overloaded. Not counted against the plugin.
    #[error(
        "was not started: all {capacity} sandbox slots stayed busy for {waited:?} (the host is overloaded; not counted against the plugin)"
    )]
    Busy {
        /// The host's sandbox slots ([`super::SandboxOptions::max_concurrent_calls`]).
        capacity: u32,
        /// How long the call waited for one.
        waited: Duration,
    },
    /// The call ran past its wall-clock limit, but its thread was on the CPU for less than
    /// half of that (the host's CPUs were contended): not counted against the plugin.
    #[error(
        "timed out after {limit:?} having run only {cpu:?} on the CPU (the host is overloaded; not counted against the plugin)"
    )]
    Starved {
        /// The plugin's time limit.
        limit: Duration,
        /// The CPU time the calling thread got during the call.
        cpu: Duration,
    },
    /// The host could not set up the call (store or instance resources): not the plugin's
    /// fault, not counted against it.
    #[error("could not be started by the host: {message}")]
    Host {
        /// wasmtime's message.
        message: String,
    },
}

impl PluginError {
    /// Whether the guest caused this failure of a call: a trap, a timeout it spent on the CPU,
    /// fuel or memory exhaustion, a panic or an unusable answer. Only these count towards
    /// quarantine; load-time refusals, lookup errors and [overload](Self::is_overload) do not.
    pub fn is_guest_fault(&self) -> bool {
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

    /// Whether the host failed the call under load ([`PluginError::Busy`],
    /// [`PluginError::Starved`], [`PluginError::Host`]): the plugin is not to blame, and a
    /// retry may succeed (HTTP 503).
    pub fn is_overload(&self) -> bool {
        matches!(self, Self::Busy { .. } | Self::Starved { .. } | Self::Host { .. })
    }

    /// What went wrong, without any text the guest wrote (its panic message, its refusal
    /// reason, the numbers of its answer) or wasmtime's trap details: what a tenant may be told
    /// and a receipt may record. The full [`Display`](std::fmt::Display) form is for the
    /// server's log and admins.
    pub fn summary(&self) -> String {
        match self {
            Self::GuestPanic { .. } => "panicked (the server log has its message)".to_owned(),
            Self::BadAnswer { .. } => "gave an unusable answer (the server log says why)".to_owned(),
            Self::Other { .. } => "trapped (the server log has the details)".to_owned(),
            Self::Host { .. } => "could not be started by the host (the host is overloaded)".to_owned(),
            Self::Io { .. } => "could not be read".to_owned(),
            Self::Invalid { .. } => "is not a valid component".to_owned(),
            // Host-authored texts with nothing of the guest's in them.
            Self::Timeout { .. }
            | Self::OutOfFuel { .. }
            | Self::Memory { .. }
            | Self::ForbiddenImport { .. }
            | Self::UnsupportedAbi { .. }
            | Self::WrongKind { .. }
            | Self::Quarantined { .. }
            | Self::NotLoaded
            | Self::KindMismatch { .. }
            | Self::Busy { .. }
            | Self::Starved { .. } => self.to_string(),
        }
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

    /// `plugin NAME` and the [summary](PluginError::summary) of its error: no guest-written
    /// text, so it may reach a tenant or a receipt.
    pub fn summary(&self) -> String {
        format!("plugin `{}` {}", self.plugin, self.error.summary())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_never_carries_guest_text() {
        let secret = "tenant acme's key is sk-123";
        let guest_written = [
            PluginError::GuestPanic { message: secret.to_owned() },
            PluginError::BadAnswer { message: format!("refused: {secret}") },
            PluginError::Other { message: format!("wasm trap: {secret}") },
            PluginError::Host { message: secret.to_owned() },
        ];
        for error in guest_written {
            let failure = PluginFailure::new("p", error.clone());
            assert!(failure.to_string().contains(secret), "the full form keeps it for the log: {failure}");
            assert!(!failure.summary().contains(secret), "{}", failure.summary());
            assert!(failure.summary().starts_with("plugin `p` "), "{}", failure.summary());
        }
        let timeout = PluginError::Timeout { limit: Duration::from_millis(20) };
        assert_eq!(timeout.summary(), timeout.to_string(), "host-written texts are kept whole");
    }
}
