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
//!
//! Load is not the guest's fault. At most [`SandboxOptions::max_concurrent_calls`] calls hold
//! an instance at once ([`CallSlots`]); a call beyond that waits for a slot for up to its
//! plugin's time limit, then fails with [`PluginError::Busy`]. A call that reaches its
//! wall-clock limit while its thread was on the CPU for less than half of it (the host's CPUs
//! were contended: [`thread_cpu_time`]) fails with [`PluginError::Starved`], not
//! [`PluginError::Timeout`]. Neither counts towards quarantine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError, PoolingAllocationConfig, ResourceLimiter,
    Store, StoreLimits, StoreLimitsBuilder, Trap,
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

/// The pool's instance slots as a counting semaphore: a call holds one from before its store
/// is made until the store is dropped, so the pooling allocator is never asked for more
/// instances than it has (which would fail the call at instantiation).
pub(crate) struct CallSlots {
    free: Mutex<u32>,
    freed: Condvar,
    capacity: u32,
}

/// One held slot; dropping it frees the slot.
pub(crate) struct CallSlot<'a> {
    slots: &'a CallSlots,
}

impl CallSlots {
    pub(crate) fn new(options: &SandboxOptions) -> Self {
        let capacity = options.max_concurrent_calls.max(1);
        Self { free: Mutex::new(capacity), freed: Condvar::new(), capacity }
    }

    /// The number of slots.
    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Takes a slot, waiting up to `wait` for one; `None` when none came free in time.
    pub(crate) fn acquire(&self, wait: Duration) -> Option<CallSlot<'_>> {
        let deadline = Instant::now() + wait;
        // The count is consistent at every unlock, so a poisoned lock is still usable.
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            free = self.freed.wait_timeout(free, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        *free -= 1;
        Some(CallSlot { slots: self })
    }
}

impl Drop for CallSlot<'_> {
    fn drop(&mut self) {
        let mut free = self.slots.free.lock().unwrap_or_else(PoisonError::into_inner);
        *free += 1;
        drop(free);
        self.slots.freed.notify_one();
    }
}

/// The CPU time the calling thread has used so far (`None` where there is no per-thread CPU
/// clock; timeouts then always count as the guest's).
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec that outlives the call, which only writes it.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        if rc != 0 {
            return None;
        }
        Some(Duration::new(u64::try_from(ts.tv_sec).ok()?, u32::try_from(ts.tv_nsec).ok()?))
    }
    #[cfg(not(unix))]
    {
        None
    }
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

/// Marks an error raised while instantiating (see [`instantiating`]).
#[derive(Debug)]
pub(crate) struct Instantiating;

impl std::fmt::Display for Instantiating {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("instantiating the plugin")
    }
}

/// Wraps an instantiation error so [`classify`] can tell the host's failure to set up a call
/// (not the guest's fault) from a trap in the guest's start code (its fault).
pub(crate) fn instantiating(error: wasmtime::Error) -> wasmtime::Error {
    error.context(Instantiating)
}

/// Turns a failed call into a typed error, using what the store saw and `cpu`, the CPU time
/// the calling thread got during the call (`None`: unknown).
///
/// The deadline and fuel traps come first: they are raised by the host, so a guest cannot
/// disguise them (a guest that reports a "panic" and then loops still times out). A deadline
/// reached with less than half the limit spent on the CPU is [`PluginError::Starved`]: the
/// guest did not get the time it was promised. An instantiation that fails without a trap
/// (the pool or the OS out of resources) is [`PluginError::Host`].
pub(crate) fn classify(
    error: &wasmtime::Error,
    state: &CallState,
    limits: CallLimits,
    cpu: Option<Duration>,
) -> PluginError {
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => {
            return match cpu {
                Some(cpu) if cpu * 2 < limits.timeout => PluginError::Starved { limit: limits.timeout, cpu },
                _ => PluginError::Timeout { limit: limits.timeout },
            };
        }
        Some(Trap::OutOfFuel) => return PluginError::OutOfFuel { fuel: limits.fuel.unwrap_or(u64::MAX) },
        _ => {}
    }
    if state.memory.refused {
        return PluginError::Memory { limit_bytes: limits.memory_bytes };
    }
    if let Some(message) = &state.panic {
        return PluginError::GuestPanic { message: message.clone() };
    }
    let trapped = error.downcast_ref::<Trap>().is_some();
    if error.downcast_ref::<PoolConcurrencyLimitError>().is_some()
        || (!trapped && error.downcast_ref::<Instantiating>().is_some())
    {
        return PluginError::Host { message: format!("{error:#}") };
    }
    PluginError::Other { message: format!("{error:#}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_slots_wait_for_a_free_slot_then_give_up() {
        let slots = CallSlots::new(&SandboxOptions { max_concurrent_calls: 1, ..SandboxOptions::default() });
        let held = slots.acquire(Duration::ZERO).expect("a free slot");
        let start = Instant::now();
        assert!(slots.acquire(Duration::from_millis(20)).is_none(), "the only slot is held");
        assert!(start.elapsed() >= Duration::from_millis(20), "gave up after {:?}", start.elapsed());
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                drop(held);
            });
            assert!(slots.acquire(Duration::from_secs(10)).is_some(), "a freed slot goes to the waiter");
        });
    }

    #[cfg(unix)]
    #[test]
    fn the_thread_cpu_clock_counts_work_not_sleep() {
        let before = thread_cpu_time().expect("a thread CPU clock on Unix");
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_cpu_time().expect("clock").saturating_sub(before);
        assert!(slept < Duration::from_millis(15), "sleeping used {slept:?} of CPU");
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_millis(30) {
            n = std::hint::black_box(n.wrapping_add(1));
        }
        assert!(thread_cpu_time().expect("clock") > before + slept, "spinning used no CPU");
    }
}
