//! # Plugins
//!
//! The wasmtime host for policy plugins: preprocessors, routers, mergers and attributors,
//! written against the WIT package `openlora:plugin` (`plugin-sdk/wit`) and loaded as
//! components.
//!
//! Plugins are untrusted. Design decisions, in the order a call meets them:
//! - **One engine** ([`PluginHost`]) with the component model, the pooling allocator (instance
//!   slots are reused, so instantiation is a few microseconds), epoch interruption (a ticker
//!   thread advances the epoch every millisecond) and fuel.
//! - **A linker per kind** holding exactly the interfaces the kind is granted (logging and
//!   config for all; the adapter catalog for routers, mergers and attributors). No WASI. A
//!   component importing anything else is refused at load with
//!   [`PluginError::ForbiddenImport`] naming the import.
//! - **Versioned ABI** ([`abi`]): the component's exported interface version picks the host
//!   module that speaks it; an unknown line is refused with [`PluginError::UnsupportedAbi`].
//! - **Load** compiles once (cached on disk by content hash, [`HostOptions::cache_dir`]),
//!   pre-instantiates, then runs a self-test call on a canned input under the plugin's limits.
//!   A plugin that fails any step is not installed; on reload the old version stays.
//! - **A fresh store per call** from the pre-instantiated component, with an epoch deadline,
//!   a memory cap ([`wasmtime::StoreLimits`], growth past it traps) and, for attributors, fuel
//!   (deterministic replay: the same record gives the same answer or the same failure).
//! - **Bounded concurrency**: a call first takes one of the host's sandbox slots (as many as
//!   the pooling allocator has instances, [`SandboxOptions::max_concurrent_calls`]), waiting
//!   up to its plugin's time limit; with none free it fails with [`PluginError::Busy`].
//! - **Failure policy** per plugin ([`FailurePolicy`]): fail-open answers with the fallback
//!   (unedited prompt, default route, linear merge, equal split) and reports the failure
//!   beside it ([`Handled::fallback`]); fail-closed returns the [`PluginFailure`]. After
//!   `quarantine_after` consecutive failures *the guest caused* ([`PluginError::is_guest_fault`])
//!   a plugin is quarantined: it is not called (its policy applies at once) until it is
//!   reloaded. Failures of an overloaded host ([`PluginError::is_overload`]: no slot in time,
//!   a timeout while the call was starved of CPU, a host-side instantiation failure) apply the
//!   policy to that call only and neither count nor reset the streak.
//!   [`PluginHost::metrics`] shows it all.
//! - **Hot reload** swaps an `Arc` atomically (`ArcSwap`): a call holds the version it
//!   started with until it ends.

pub mod abi;
mod cache;
pub mod config;
pub mod error;
pub mod metrics;
pub mod sandbox;
pub mod types;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

pub use config::{FailurePolicy, PluginKind, PluginSpec};
pub use error::{PluginError, PluginFailure};
pub use metrics::{LatencySnapshot, PluginMetrics};
use sandbox::{CallLimits, CallSlots, CallState, ConfigView, EpochTicker};
pub use sandbox::{LogLevel, LogRecord, LogSink, SandboxOptions, StderrLog};
pub use types::*;

/// Options of a [`PluginHost`].
#[derive(Clone)]
pub struct HostOptions {
    /// Where compiled components are cached (`None`: compile on every load).
    pub cache_dir: Option<PathBuf>,
    /// Engine-wide sandbox settings.
    pub sandbox: SandboxOptions,
    /// Where plugin log lines go.
    pub log: Arc<dyn LogSink>,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            cache_dir: None,
            sandbox: SandboxOptions::default(),
            log: Arc::new(StderrLog { min_level: LogLevel::Info }),
        }
    }
}

impl std::fmt::Debug for HostOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostOptions").field("cache_dir", &self.cache_dir).field("sandbox", &self.sandbox).finish()
    }
}

/// A plugin's answer, or the fallback its fail-open policy chose.
#[derive(Clone, Debug, PartialEq)]
pub struct Handled<T> {
    /// The answer to use.
    pub value: T,
    /// `Some` when the plugin failed and `value` is the fallback.
    pub fallback: Option<PluginFailure>,
}

/// The pre-instantiated component of one plugin, for its kind and ABI line.
enum Pre {
    Router(abi::v0_1::RouterPre<CallState>),
    Merger(abi::v0_1::MergerPre<CallState>),
    Preprocessor(abi::v0_1::PreprocessorPre<CallState>),
    Attributor(abi::v0_1::Attributors),
}

/// One loaded version of a plugin.
struct Loaded {
    spec: PluginSpec,
    name: Arc<str>,
    pre: Pre,
    config: Arc<ConfigView>,
    abi_version: String,
    component_sha256: String,
}

/// A named plugin: its current version, health and counters (which survive reloads).
struct PluginEntry {
    current: ArcSwap<Loaded>,
    consecutive_failures: AtomicU32,
    quarantined: AtomicBool,
    calls: AtomicU64,
    failures: AtomicU64,
    fallbacks: AtomicU64,
    busy: AtomicU64,
    starved: AtomicU64,
    reloads: AtomicU64,
    latency: metrics::LatencyHistogram,
}

/// The plugin host: loads, reloads and calls plugins. Cheap to share (`Arc<PluginHost>`);
/// every method takes `&self` and may be called from any thread.
pub struct PluginHost {
    engine: Engine,
    linkers: HashMap<PluginKind, Linker<CallState>>,
    slots: RwLock<HashMap<String, Arc<PluginEntry>>>,
    catalog: ArcSwap<CatalogView>,
    /// The pool's instance slots, shared by every plugin's calls (self-tests included).
    call_slots: CallSlots,
    options: HostOptions,
    _ticker: EpochTicker,
}

/// How a load went, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// The ABI version the component exports.
    pub abi_version: String,
    /// SHA-256 of the component file.
    pub component_sha256: String,
    /// Whether the compiled code came from the disk cache.
    pub cache_hit: bool,
    /// Whether it replaced a loaded version.
    pub replaced: bool,
}

fn invalid(error: wasmtime::Error) -> PluginError {
    PluginError::Invalid { message: format!("{error:#}") }
}

impl PluginHost {
    /// A host with no plugins and an empty catalog.
    pub fn new(options: HostOptions) -> Result<Self, PluginError> {
        let engine = sandbox::engine(&options.sandbox).map_err(invalid)?;
        let mut linkers = HashMap::new();
        for kind in PluginKind::ALL {
            linkers.insert(kind, abi::v0_1::linker(&engine, kind).map_err(invalid)?);
        }
        let ticker = EpochTicker::start(&engine);
        Ok(Self {
            engine,
            linkers,
            slots: RwLock::new(HashMap::new()),
            catalog: ArcSwap::from_pointee(CatalogView::default()),
            call_slots: CallSlots::new(&options.sandbox),
            options,
            _ticker: ticker,
        })
    }

    /// Replaces the catalog snapshot plugins see (calls in flight keep the old one).
    pub fn set_catalog(&self, catalog: CatalogView) {
        self.catalog.store(Arc::new(catalog));
    }

    fn slots(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<PluginEntry>>> {
        // The map is only ever replaced entry by entry, so a poisoned lock is still consistent.
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, name: &str) -> Option<Arc<PluginEntry>> {
        self.slots().get(name).cloned()
    }

    /// Loads `spec` (or replaces the plugin of that name): read, compile (or take from the
    /// cache), check kind, ABI and imports, pre-instantiate, self-test. On any failure
    /// nothing changes and the error says why.
    pub fn load(&self, spec: PluginSpec) -> Result<LoadReport, PluginFailure> {
        let name = spec.name.clone();
        let fail = |error| PluginFailure::new(&name, error);
        let (loaded, cache_hit) = self.prepare(spec).map_err(fail)?;
        let report = LoadReport {
            abi_version: loaded.abi_version.clone(),
            component_sha256: loaded.component_sha256.clone(),
            cache_hit,
            replaced: false,
        };
        let loaded = Arc::new(loaded);
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(&name) {
            slot.current.store(loaded);
            slot.consecutive_failures.store(0, Ordering::Relaxed);
            slot.quarantined.store(false, Ordering::Relaxed);
            slot.reloads.fetch_add(1, Ordering::Relaxed);
            return Ok(LoadReport { replaced: true, ..report });
        }
        slots.insert(
            name,
            Arc::new(PluginEntry {
                current: ArcSwap::new(loaded),
                consecutive_failures: AtomicU32::new(0),
                quarantined: AtomicBool::new(false),
                calls: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                fallbacks: AtomicU64::new(0),
                busy: AtomicU64::new(0),
                starved: AtomicU64::new(0),
                reloads: AtomicU64::new(0),
                latency: metrics::LatencyHistogram::new(),
            }),
        );
        Ok(report)
    }

    /// Reloads the plugin `name` from `path`, keeping its spec (kind, limits, config). Calls
    /// in flight finish on the old version; if the new one fails to load or self-test, the
    /// old one stays and the error says why.
    pub fn reload(&self, name: &str, path: impl AsRef<Path>) -> Result<LoadReport, PluginFailure> {
        let slot = self.slot(name).ok_or_else(|| PluginFailure::new(name, PluginError::NotLoaded))?;
        let mut spec = slot.current.load().spec.clone();
        spec.path = path.as_ref().to_owned();
        self.load(spec)
    }

    /// Removes a plugin; calls in flight finish. Returns whether it was loaded.
    pub fn unload(&self, name: &str) -> bool {
        self.slots.write().unwrap_or_else(|e| e.into_inner()).remove(name).is_some()
    }

    /// The spec of a loaded plugin.
    pub fn spec(&self, name: &str) -> Option<PluginSpec> {
        self.slot(name).map(|slot| slot.current.load().spec.clone())
    }

    /// Counters of every plugin, sorted by name.
    pub fn metrics(&self) -> Vec<PluginMetrics> {
        let mut all: Vec<PluginMetrics> = self
            .slots()
            .iter()
            .map(|(name, slot)| {
                let current = slot.current.load();
                PluginMetrics {
                    name: name.clone(),
                    kind: current.spec.kind,
                    abi_version: current.abi_version.clone(),
                    component_sha256: current.component_sha256.clone(),
                    calls: slot.calls.load(Ordering::Relaxed),
                    failures: slot.failures.load(Ordering::Relaxed),
                    fallbacks: slot.fallbacks.load(Ordering::Relaxed),
                    busy: slot.busy.load(Ordering::Relaxed),
                    starved: slot.starved.load(Ordering::Relaxed),
                    consecutive_failures: slot.consecutive_failures.load(Ordering::Relaxed),
                    quarantined: slot.quarantined.load(Ordering::Relaxed),
                    reloads: slot.reloads.load(Ordering::Relaxed),
                    latency: slot.latency.snapshot(),
                }
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    fn prepare(&self, spec: PluginSpec) -> Result<(Loaded, bool), PluginError> {
        let max = self.options.sandbox.max_memory_mib;
        if spec.memory_mib.is_some_and(|m| m > max) {
            return Err(PluginError::Invalid {
                message: format!("memory_mib {} exceeds the host's maximum of {max}", spec.memory_mib.unwrap_or(0)),
            });
        }
        let bytes = std::fs::read(&spec.path)
            .map_err(|e| PluginError::Io { path: spec.path.clone(), message: e.to_string() })?;
        let component_sha256 = cache::sha256_hex(&bytes);
        let (component, cache_hit) =
            cache::compile(&self.engine, &bytes, &component_sha256, self.options.cache_dir.as_deref())?;

        let ty = component.component_type();
        let line = abi::dispatch(spec.kind, ty.exports(&self.engine).map(|(name, _)| name))?;
        abi::check_imports(spec.kind, line, ty.imports(&self.engine).map(|(name, _)| name))?;
        let wanted = format!("openlora:plugin/{}@", spec.kind.interface());
        let abi_version = ty
            .exports(&self.engine)
            .find_map(|(name, _)| name.strip_prefix(&wanted).map(str::to_owned))
            .unwrap_or_default();

        let pre = self.pre_instantiate(spec.kind, line, &component)?;
        let config = Arc::new(ConfigView {
            flat: config::flatten_config(&spec.config),
            json: serde_json::to_string(&spec.config).unwrap_or_else(|_| "{}".to_owned()),
        });
        let loaded = Loaded { name: Arc::from(spec.name.as_str()), spec, pre, config, abi_version, component_sha256 };
        self.self_test(&loaded)?;
        Ok((loaded, cache_hit))
    }

    /// Links the component against its kind's grant, through the module of its ABI line.
    fn pre_instantiate(&self, kind: PluginKind, line: abi::AbiLine, component: &Component) -> Result<Pre, PluginError> {
        // One arm per ABI line: a 0.2 line adds its own linkers and `Pre` variants here.
        let linkers = match line {
            abi::AbiLine::V0_1 => &self.linkers,
        };
        let linker = linkers.get(&kind).ok_or_else(|| PluginError::Other { message: "no linker".to_owned() })?;
        let instance_pre = linker.instantiate_pre(component).map_err(invalid)?;
        Ok(match kind {
            PluginKind::Router => Pre::Router(abi::v0_1::RouterPre::new(instance_pre).map_err(invalid)?),
            PluginKind::Merger => Pre::Merger(abi::v0_1::MergerPre::new(instance_pre).map_err(invalid)?),
            PluginKind::Preprocessor => {
                Pre::Preprocessor(abi::v0_1::PreprocessorPre::new(instance_pre).map_err(invalid)?)
            }
            PluginKind::Attributor => {
                let evidence = component
                    .component_type()
                    .exports(&self.engine)
                    .any(|(name, _)| name.starts_with("openlora:plugin/evidence-attribution@"));
                Pre::Attributor(abi::v0_1::Attributors::new(instance_pre, evidence).map_err(invalid)?)
            }
        })
    }

    /// Runs the kind's canned input once; a trap or a contract violation refuses the load.
    fn self_test(&self, loaded: &Loaded) -> Result<(), PluginError> {
        let messages = vec![Message::new("user", "Hello! This is the openlora plugin self-test.")];
        let metadata = vec![("openlora-self-test".to_owned(), "1".to_owned())];
        match &loaded.pre {
            Pre::Router(_) => {
                let request =
                    RouteRequest { model: "base".to_owned(), messages, metadata, tenant: "self-test".to_owned() };
                self.run(loaded, |pre, store| match pre {
                    Pre::Router(pre) => abi::v0_1::route(pre, store, &request).map(Ok),
                    _ => unreachable_kind(),
                })
                .map(drop)
            }
            Pre::Preprocessor(_) => {
                let request =
                    PreprocessRequest { model: "base".to_owned(), messages, metadata, tenant: "self-test".to_owned() };
                self.run(loaded, |pre, store| match pre {
                    Pre::Preprocessor(pre) => abi::v0_1::preprocess(pre, store, &request).map(Ok),
                    _ => unreachable_kind(),
                })
                .map(drop)
            }
            Pre::Merger(_) => {
                let request = MergeRequest {
                    adapters: vec![AdapterChoice::new("self-test-a", 1.0), AdapterChoice::new("self-test-b", 1.0)],
                    metadata,
                };
                self.run(loaded, |pre, store| match pre {
                    Pre::Merger(pre) => abi::v0_1::merge(pre, store, &request).map(|o| check_merge(&request, o)),
                    _ => unreachable_kind(),
                })
                .map(drop)
            }
            Pre::Attributor(_) => {
                let record = InferenceRecord {
                    request_id: "self-test".to_owned(),
                    tenant: "self-test".to_owned(),
                    base_model: ModelUse {
                        id: "base".to_owned(),
                        owner: "self-test".to_owned(),
                        price_per_1k_tokens: 1000,
                        ..ModelUse::default()
                    },
                    prompt_tokens: 500,
                    completion_tokens: 500,
                    finish_reason: "stop".to_owned(),
                    price_micros: 1000,
                    ..InferenceRecord::default()
                };
                self.run(loaded, |pre, store| match pre {
                    Pre::Attributor(pre) => {
                        abi::v0_1::attribute(pre, store, &record).map(|answer| match answer {
                            // Declining the canned record is allowed; wrong sums are not.
                            Err(_) => Ok(Vec::new()),
                            Ok(payments) => check_payments(&record, payments),
                        })
                    }
                    _ => unreachable_kind(),
                })
                .map(drop)
            }
        }
    }

    /// One call on a fresh store: take a sandbox slot (waiting up to the plugin's time limit),
    /// instantiate, call, classify the failure (with the CPU time the call got).
    fn run<T>(
        &self,
        loaded: &Loaded,
        call: impl FnOnce(&Pre, &mut wasmtime::Store<CallState>) -> wasmtime::Result<Result<T, PluginError>>,
    ) -> Result<T, PluginError> {
        let limits = CallLimits::of(&loaded.spec);
        let waiting = Instant::now();
        // Declared before the store, so it is released after the store (and its pooled
        // instance) is dropped.
        let Some(_slot) = self.call_slots.acquire(limits.timeout) else {
            return Err(PluginError::Busy { capacity: self.call_slots.capacity(), waited: waiting.elapsed() });
        };
        let cpu_before = sandbox::thread_cpu_time();
        let mut store = sandbox::store(
            &self.engine,
            limits,
            loaded.name.clone(),
            loaded.config.clone(),
            self.catalog.load_full(),
            self.options.log.clone(),
        )
        .map_err(|e| PluginError::Host { message: format!("{e:#}") })?;
        match call(&loaded.pre, &mut store) {
            Ok(answer) => answer,
            Err(error) => {
                let cpu =
                    cpu_before.zip(sandbox::thread_cpu_time()).map(|(before, after)| after.saturating_sub(before));
                Err(sandbox::classify(&error, store.data(), limits, cpu))
            }
        }
    }

    /// Calls plugin `name` of `kind` with the policy applied: health check, the call,
    /// counters, quarantine, and the fallback or the failure.
    fn call<T>(
        &self,
        name: &str,
        kind: PluginKind,
        fallback: impl FnOnce() -> T,
        call: impl FnOnce(&Pre, &mut wasmtime::Store<CallState>) -> wasmtime::Result<Result<T, PluginError>>,
    ) -> Result<Handled<T>, PluginFailure> {
        let slot = self.slot(name).ok_or_else(|| PluginFailure::new(name, PluginError::NotLoaded))?;
        let loaded = slot.current.load_full();
        if loaded.spec.kind != kind {
            return Err(PluginFailure::new(
                name,
                PluginError::KindMismatch { requested: kind, actual: loaded.spec.kind },
            ));
        }
        slot.calls.fetch_add(1, Ordering::Relaxed);
        let outcome = if slot.quarantined.load(Ordering::Relaxed) {
            Err(PluginError::Quarantined { failures: slot.consecutive_failures.load(Ordering::Relaxed) })
        } else {
            let start = Instant::now();
            let outcome = self.run(&loaded, call);
            // A call that never got a sandbox slot did not run.
            if !matches!(outcome, Err(PluginError::Busy { .. })) {
                slot.latency.record(start.elapsed());
            }
            outcome
        };
        match outcome {
            Ok(value) => {
                slot.consecutive_failures.store(0, Ordering::Relaxed);
                Ok(Handled { value, fallback: None })
            }
            Err(error) => {
                slot.failures.fetch_add(1, Ordering::Relaxed);
                self.note_failure(&slot, &loaded, &error);
                let failure = PluginFailure::new(name, error);
                match loaded.spec.failure {
                    FailurePolicy::Closed => Err(failure),
                    FailurePolicy::Open => {
                        slot.fallbacks.fetch_add(1, Ordering::Relaxed);
                        Ok(Handled { value: fallback(), fallback: Some(failure) })
                    }
                }
            }
        }
    }

    fn note_failure(&self, slot: &PluginEntry, loaded: &Loaded, error: &PluginError) {
        let log = |level, message: &str| self.options.log.log(&LogRecord { plugin: &loaded.name, level, message });
        if error.is_overload() {
            let counter = if matches!(error, PluginError::Starved { .. }) { &slot.starved } else { &slot.busy };
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            // Logged at 1, 2, 4, 8, ... so an overloaded host is seen without a line per call.
            if n.is_power_of_two() {
                log(
                    LogLevel::Warn,
                    &format!("call failed under load, not counted against the plugin ({n} so far): {error}"),
                );
            }
            return;
        }
        if !error.is_guest_fault() {
            return;
        }
        log(LogLevel::Warn, &format!("call failed: {error}"));
        let failures = slot.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(limit) = loaded.spec.quarantine_after()
            && failures >= limit
            && !slot.quarantined.swap(true, Ordering::Relaxed)
        {
            log(LogLevel::Error, &format!("quarantined after {failures} consecutive failures; reload it to resume"));
        }
    }

    /// Runs preprocessor `name`. Fail-open fallback: the conversation unchanged.
    pub fn preprocess(
        &self,
        name: &str,
        request: &PreprocessRequest,
    ) -> Result<Handled<PreprocessOutcome>, PluginFailure> {
        self.call(
            name,
            PluginKind::Preprocessor,
            || PreprocessOutcome::Unchanged,
            |pre, store| match pre {
                Pre::Preprocessor(pre) => abi::v0_1::preprocess(pre, store, request).map(Ok),
                _ => unreachable_kind(),
            },
        )
    }

    /// Runs router `name`. Fail-open fallback: the default route.
    pub fn route(&self, name: &str, request: &RouteRequest) -> Result<Handled<RouteDecision>, PluginFailure> {
        self.call(
            name,
            PluginKind::Router,
            || RouteDecision::Default,
            |pre, store| match pre {
                Pre::Router(pre) => abi::v0_1::route(pre, store, request).map(Ok),
                _ => unreachable_kind(),
            },
        )
    }

    /// Runs merger `name`. Fail-open fallback: a linear merge with the request's weights.
    /// A plan whose weights do not match the adapters is a failure ([`PluginError::BadAnswer`]).
    pub fn merge(&self, name: &str, request: &MergeRequest) -> Result<Handled<MergeOutcome>, PluginFailure> {
        self.call(
            name,
            PluginKind::Merger,
            || {
                MergeOutcome::Plan(MergePlan {
                    method: MergeMethod::Linear,
                    weights: request.adapters.iter().map(|a| a.weight).collect(),
                    density: None,
                    majority_sign: MajoritySign::Total,
                    layer_overrides: Vec::new(),
                })
            },
            |pre, store| match pre {
                Pre::Merger(pre) => abi::v0_1::merge(pre, store, request).map(|o| check_merge(request, o)),
                _ => unreachable_kind(),
            },
        )
    }

    /// Runs attributor `name` (with fuel). Payments that do not sum to the price, or a
    /// refusal, are failures. Fail-open fallback: [`equal_split`].
    pub fn attribute(&self, name: &str, record: &InferenceRecord) -> Result<Handled<Vec<Payment>>, PluginFailure> {
        self.call(
            name,
            PluginKind::Attributor,
            || equal_split(record),
            |pre, store| match pre {
                Pre::Attributor(pre) => abi::v0_1::attribute(pre, store, record).map(|answer| match answer {
                    Ok(payments) => check_payments(record, payments),
                    Err(reason) => Err(PluginError::BadAnswer { message: format!("refused: {reason}") }),
                }),
                _ => unreachable_kind(),
            },
        )
    }
}

fn unreachable_kind<T>() -> wasmtime::Result<Result<T, PluginError>> {
    // A slot's `Pre` always matches its spec's kind, which `call` checked.
    Ok(Err(PluginError::Other { message: "internal: plugin kind and bindings disagree".to_owned() }))
}

fn check_merge(request: &MergeRequest, outcome: MergeOutcome) -> Result<MergeOutcome, PluginError> {
    if let MergeOutcome::Plan(plan) = &outcome {
        let n = request.adapters.len();
        let bad = plan.weights.len() != n
            || plan.layer_overrides.iter().any(|o| o.weights.len() != n)
            || plan.weights.iter().any(|w| !w.is_finite())
            || plan.density.is_some_and(|d| !(d > 0.0 && d <= 1.0));
        if bad {
            return Err(PluginError::BadAnswer {
                message: format!("merge plan needs {n} finite weights and a density in (0, 1]: {plan:?}"),
            });
        }
    }
    Ok(outcome)
}

fn check_payments(record: &InferenceRecord, payments: Vec<Payment>) -> Result<Vec<Payment>, PluginError> {
    let sum = payments.iter().try_fold(0u64, |acc, p| acc.checked_add(p.micros));
    if sum != Some(record.price_micros) {
        return Err(PluginError::BadAnswer {
            message: format!(
                "payments sum to {} micros, the price is {}",
                sum.map_or_else(|| "more than u64::MAX".to_owned(), |s| s.to_string()),
                record.price_micros
            ),
        });
    }
    Ok(payments)
}

/// The attributor's fail-open fallback: equal parts for the base model's owner and each
/// adapter's owner; the first parts get the remainder's extra micro, so the parts sum to the
/// price exactly.
pub fn equal_split(record: &InferenceRecord) -> Vec<Payment> {
    let mut parties = vec![(record.base_model.owner.clone(), PayeeRole::BaseOwner, String::new())];
    for adapter in &record.adapters {
        parties.push((adapter.owner.clone(), PayeeRole::AdapterOwner, adapter.name.clone()));
    }
    let n = parties.len() as u64;
    let (each, extra) = (record.price_micros / n, record.price_micros % n);
    parties
        .into_iter()
        .enumerate()
        .map(|(i, (party, role, source))| Payment { party, role, source, micros: each + u64::from((i as u64) < extra) })
        .collect()
}
