//! The sandbox: one wasmtime engine, the per-call store and its limits, the epoch ticker, and
//! the mapping from traps to [`PluginError`].
//!
//! Guarantees: a call cannot run past its time limit by more than one epoch tick plus the
//! time to reach the next loop back-edge or function entry (wasmtime checks the epoch there);
//! it cannot grow its linear memory past its cap (growth traps instead of returning -1); an
//! attributor cannot execute more than its fuel; no state survives a call (fresh store and
//! instance). Non-guarantees: time spent inside a host function (logging, catalog reads) is
//! not interrupted, only counted when the guest resumes; the memory cap covers linear memory,
//! not the host's own allocations for the call (strings copied out are bounded by the cap).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, StoreLimits,
    StoreLimitsBuilder, Trap,
};

use super::config::PluginSpec;
use super::error::PluginError;
use super::types::CatalogView;

/// How often the epoch ticks: the granularity of time limits.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Bytes of each pooled memory (and table) reset by memset rather than returned to the OS.
const KEEP_RESIDENT_BYTES: usize = 256 * 1024;

/// Engine-wide sandbox settings.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// The most instances alive at once across all plugins (pooling allocator slots).
    pub max_concurrent_calls: u32,
    /// The largest memory cap any plugin may ask for, in MiB (the pool's slot size).
    pub max_memory_mib: u32,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self { max_concurrent_calls: 64, max_memory_mib: 256 }
    }
}

/// Builds the engine: component model, pooling allocator, epoch interruption, fuel.
///
/// Fuel is on for every store (wasmtime sets it per engine); plugins other than attributors
/// get an unlimited budget, so for them it costs a counter update and nothing else.
pub(crate) fn engine(options: &SandboxOptions) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.consume_fuel(true);
    let slots = options.max_concurrent_calls.max(1);
    let mut pool = PoolingAllocationConfig::default();
    // A component made by wit-component has up to three core instances (the plugin, a shim
    // and a fix-up module) and tables in each; one linear memory.
    pool.total_component_instances(slots)
        .total_core_instances(slots * 4)
        .total_memories(slots)
        .total_tables(slots * 4)
        .max_memory_size(options.max_memory_mib as usize * 1024 * 1024)
        // Reset the first pages of a slot's memory with memset instead of madvise: a plugin's
        // stack, data and small heap live there (the repository builds plugins with a 64 KiB
        // stack, see .cargo/config.toml), so the next call does not page-fault them back in.
        // Measured on the example chain: p50 110 us -> 58 us.
        .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
        .table_keep_resident(KEEP_RESIDENT_BYTES);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// Increments the engine's epoch every [`EPOCH_TICK`] until dropped.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("openlora-plugin-epoch".to_owned())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Severity of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Very detailed.
    Trace,
    /// Detailed.
    Debug,
    /// Normal.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something failed.
    Error,
}

/// One log line from (or about) a plugin.
#[derive(Clone, Debug)]
pub struct LogRecord<'a> {
    /// The plugin's name.
    pub plugin: &'a str,
    /// Severity.
    pub level: LogLevel,
    /// The text (guest lines are truncated to [`MAX_LOG_LINE`] bytes).
    pub message: &'a str,
}

/// Where plugin log lines go. The default writes `Info` and above to stderr.
pub trait LogSink: Send + Sync {
    /// Records one line. Called on the calling thread, inside the plugin call.
    fn log(&self, record: &LogRecord<'_>);
}

/// Writes lines at or above a level to stderr.
#[derive(Clone, Copy, Debug)]
pub struct StderrLog {
    /// The lowest level written.
    pub min_level: LogLevel,
}

impl LogSink for StderrLog {
    fn log(&self, record: &LogRecord<'_>) {
        if record.level >= self.min_level {
            eprintln!("[plugin {}] {:?}: {}", record.plugin, record.level, record.message);
        }
    }
}

/// Longest guest log line kept, in bytes.
pub const MAX_LOG_LINE: usize = 4096;
/// Most log lines one call may write; later lines are dropped.
pub const MAX_LOG_LINES_PER_CALL: u32 = 64;

/// A plugin's configuration as the `config` interface serves it.
#[derive(Debug, Default)]
pub(crate) struct ConfigView {
    pub(crate) flat: BTreeMap<String, String>,
    pub(crate) json: String,
}

/// The memory cap: wasmtime's [`StoreLimits`], remembering whether it refused a growth so the
/// trap can be reported as [`PluginError::Memory`].
pub(crate) struct MemoryCap {
    limits: StoreLimits,
    pub(crate) refused: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let verdict = self.limits.memory_growing(current, desired, maximum);
        if !matches!(verdict, Ok(true)) {
            self.refused = true;
        }
        verdict
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// Everything one call's store holds.
pub(crate) struct CallState {
    pub(crate) plugin: Arc<str>,
    pub(crate) config: Arc<ConfigView>,
    pub(crate) catalog: Arc<CatalogView>,
    pub(crate) log: Arc<dyn LogSink>,
    pub(crate) memory: MemoryCap,
    log_lines: u32,
    /// Set by the SDK's panic hook just before the guest traps.
    pub(crate) panic: Option<String>,
}

impl CallState {
    pub(crate) fn guest_log(&mut self, level: LogLevel, message: &str) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES_PER_CALL {
            return;
        }
        let message = truncate(message, MAX_LOG_LINE);
        self.log.log(&LogRecord { plugin: &self.plugin, level, message });
    }

    pub(crate) fn guest_panicked(&mut self, message: String, location: String) {
        let message = truncate(&message, MAX_LOG_LINE).to_owned();
        let line = format!("panicked at {location}: {message}");
        self.log.log(&LogRecord { plugin: &self.plugin, level: LogLevel::Error, message: &line });
        self.panic = Some(message);
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Limits of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallLimits {
    pub(crate) timeout: Duration,
    pub(crate) memory_bytes: usize,
    pub(crate) fuel: Option<u64>,
}

impl CallLimits {
    pub(crate) fn of(spec: &PluginSpec) -> Self {
        Self { timeout: spec.timeout(), memory_bytes: spec.memory_bytes(), fuel: spec.fuel() }
    }
}

/// A fresh store for one call.
pub(crate) fn store(
    engine: &Engine,
    limits: CallLimits,
    plugin: Arc<str>,
    config: Arc<ConfigView>,
    catalog: Arc<CatalogView>,
    log: Arc<dyn LogSink>,
) -> wasmtime::Result<Store<CallState>> {
    let memory = MemoryCap {
        limits: StoreLimitsBuilder::new()
            .memory_size(limits.memory_bytes)
            .instances(8)
            .memories(2)
            .tables(16)
            .trap_on_grow_failure(true)
            .build(),
        refused: false,
    };
    let state = CallState { plugin, config, catalog, log, memory, log_lines: 0, panic: None };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.memory);
    store.set_fuel(limits.fuel.unwrap_or(u64::MAX))?;
    let ticks = limits.timeout.as_micros().div_ceil(EPOCH_TICK.as_micros()).max(1) as u64;
    // +1: the current tick is already partly over when the call starts.
    store.set_epoch_deadline(ticks + 1);
    store.epoch_deadline_trap();
    Ok(store)
}

/// Turns a failed call into a typed error, using what the store saw.
///
/// The deadline and fuel traps come first: they are raised by the host, so a guest cannot
/// disguise them (a guest that reports a "panic" and then loops still times out).
pub(crate) fn classify(error: &wasmtime::Error, state: &CallState, limits: CallLimits) -> PluginError {
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => return PluginError::Timeout { limit: limits.timeout },
        Some(Trap::OutOfFuel) => return PluginError::OutOfFuel { fuel: limits.fuel.unwrap_or(u64::MAX) },
        _ => {}
    }
    if state.memory.refused {
        return PluginError::Memory { limit_bytes: limits.memory_bytes };
    }
    if let Some(message) = &state.panic {
        return PluginError::GuestPanic { message: message.clone() };
    }
    PluginError::Other { message: format!("{error:#}") }
}
