//! The adapter pager: thousands of adapters in the [catalog](super::catalog), only the ones in
//! use in memory, loaded just in time off the caller's thread.
//!
//! # Tiers
//!
//! An adapter lives in up to two memory tiers, each with a byte budget:
//! - **device**: the prepared [`LoraAdapter<B>`] the forward pass uses (on the CPU backend, the
//!   compute-ready layout in RAM; on a GPU, device memory). Every adapter a request uses must be
//!   here, so an adapter larger than the device budget is refused ([`PagerError::TooLarge`]).
//!   The prepared form holds A and B in the precision of the adapter's file (a 16-bit adapter
//!   takes 2 bytes per value), and its bytes are what the backend reports for it.
//! - **host**: the f32 [`LoraHost`] weights as read from disk, kept so that an adapter evicted
//!   from the device tier is prepared again without touching the disk or re-hashing. The host
//!   tier is a cache: an adapter that does not fit it is simply not kept there, and a host
//!   budget of 0 turns the tier off. The service turns it off where the backend's weights are
//!   host memory (the CPU): a host copy would hold the same adapter a second time, in f32, in
//!   the same RAM.
//!
//! Below both is storage (the catalog's folders). The tiers are inclusive: a load keeps the host
//! copy when the host budget allows, so evicting the device form (the least recently used
//! unpinned one) leaves the adapter one cheap `prepare` away; evicting the host copy as well
//! leaves it on disk only.
//!
//! # Pinning
//!
//! [`Pager::acquire`] hands out an `Arc<LoraAdapter<B>>`; while any clone of it lives outside
//! the pager (a queued or running request's `WeightedAdapter`), the adapter is *pinned*: it is
//! never evicted and its bytes stay counted. The pager sees that through `Arc::strong_count`, so
//! callers need no release call; dropping the `Arc` is the release. A pinned adapter that is
//! unloaded stays counted ("draining") until its last holder drops it.
//!
//! # Loading
//!
//! A cold adapter is read (and content-hashed: the generation), validated and prepared by a
//! small pool of loader threads, never on the caller's thread. Concurrent requests for the same
//! cold adapter share one load (single flight). Before reading, a load *reserves* the adapter's
//! size (from the catalog's header) in the device tier, evicting least-recently-used unpinned
//! adapters; so the device budget bounds resident, pinned, draining and in-flight bytes
//! together, exactly. When everything resident is pinned, the loader waits for a release
//! (re-checking every few milliseconds, or at once on [`Pager::notify_released`]) up to
//! [`PagerConfig::wait_for_room`], then fails the load with [`PagerError::NoRoom`]; callers
//! waiting on it get that error and nothing else is disturbed.
//!
//! # Derived adapters
//!
//! A merge of several adapters is a *derived* entry ([`Pager::acquire_derived`]), keyed by the
//! hash of its recipe and its inputs' generations rather than by a name. It lives in the device
//! tier under the same rules: its bytes are counted, it is pinned while a request holds it and
//! evicted by LRU when not, and concurrent acquires of one key share a single build, run on the
//! first caller's thread. An evicted one is built again on its next acquire (it keeps no host
//! copy: its inputs are the host-tier entries).
//!
//! # Identity
//!
//! Every cache entry is keyed by [`Generation`]; names are bound to the generation read under a
//! catalog *revision*. When [`Pager::rescan`] (or [`Catalog::rescan`] followed by
//! [`Pager::acquire`]) sees a folder change, its revision changes and the next acquire reads the
//! new content; requests holding the old generation keep it. Identical content under two names
//! is held once.
//!
//! Non-guarantees: [`Pager::unload`] does not cancel a load already in flight for the name (it
//! completes and is resident again); [`Pager::try_acquire`] may see a just-loaded adapter
//! evicted again under heavy pressure before it polls (it then loads again).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use openlora_kernels::Backend;

use super::catalog::{Catalog, CatalogEntry, CatalogError, ScanReport};
use super::peft::{AdapterError, LoraHost};
use super::{Generation, LoraAdapter};
use crate::metrics::Histogram;

/// Load-latency histogram buckets (seconds): finer than request latencies, since the goal for a
/// rank-8 adapter is a few milliseconds.
pub const LOAD_LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// How often a loader waiting for room re-checks whether a pinned adapter was released.
const ROOM_POLL: Duration = Duration::from_millis(2);

/// A memory tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Prepared, compute-ready adapters.
    Device,
    /// f32 host weights.
    Host,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Device => "device",
            Tier::Host => "host",
        })
    }
}

/// Budgets and loader settings.
#[derive(Clone, Debug)]
pub struct PagerConfig {
    /// Bytes of host weights kept (0 turns the host tier off).
    pub host_bytes: usize,
    /// Bytes of prepared adapters: resident, pinned, draining and being loaded.
    pub device_bytes: usize,
    /// Loader threads (reads, hashes and prepares run there).
    pub loader_threads: usize,
    /// How long a load waits for pinned adapters to be released before failing.
    pub wait_for_room: Duration,
    /// How long a caller waits for a load (queued, waiting for room, reading, preparing) before
    /// it gives up with [`PagerError::TimedOut`]; the load itself goes on for later callers.
    /// Also how long a merge waits for a build slot before [`PagerError::Busy`].
    pub load_timeout: Duration,
    /// Derived adapters (merges) built at once; more wait for a slot. Merges are CPU work on
    /// the caller's (blocking) thread, so this bounds how many cores requests' merges take.
    pub max_concurrent_builds: usize,
}

impl PagerConfig {
    /// Budgets with two loader threads, a 30 s wait for room and a 120 s load timeout.
    pub fn new(host_bytes: usize, device_bytes: usize) -> Self {
        Self {
            host_bytes,
            device_bytes,
            loader_threads: 2,
            wait_for_room: Duration::from_secs(30),
            load_timeout: Duration::from_secs(120),
            max_concurrent_builds: 1,
        }
    }
}

/// A pager operation failed. Cheap to clone: every caller waiting on one load gets the error.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PagerError {
    /// The name is not in the catalog.
    #[error("adapter `{0}` is not in the catalog")]
    NotFound(String),
    /// Reading or preparing the adapter failed (the error names the adapter and the problem).
    #[error(transparent)]
    Load(Arc<AdapterError>),
    /// The adapter can never fit.
    #[error(
        "adapter `{name}` needs {bytes} bytes in the {tier} tier, more than the tier's whole budget of {budget} bytes"
    )]
    TooLarge {
        /// The adapter.
        name: String,
        /// The tier.
        tier: Tier,
        /// Its size.
        bytes: usize,
        /// The tier's budget.
        budget: usize,
    },
    /// Everything resident stayed pinned for [`PagerConfig::wait_for_room`].
    #[error(
        "adapter `{name}`: no room for {bytes} bytes in the device tier after waiting {waited:?}: {pinned_bytes} of its {budget} bytes are held by {pinned} adapters in use"
    )]
    NoRoom {
        /// The adapter.
        name: String,
        /// Its size.
        bytes: usize,
        /// The device budget.
        budget: usize,
        /// Bytes pinned by adapters in use (and other loads' reservations).
        pinned_bytes: usize,
        /// Adapters in use.
        pinned: usize,
        /// How long the load waited.
        waited: Duration,
    },
    /// A derived adapter's recipe cannot be applied to its inputs (the caller's mistake, not a
    /// failure of the pager: e.g. an unsupported combination of ranks).
    #[error("{0}")]
    Recipe(Arc<AdapterError>),
    /// Loading the adapter panicked (a bug, or a file that trips one); the loader went on.
    #[error("adapter `{name}`: its load panicked ({message}); it is not served until it loads cleanly")]
    Panicked {
        /// The adapter.
        name: String,
        /// The panic's message.
        message: String,
    },
    /// The caller waited [`PagerConfig::load_timeout`] for the load.
    #[error("adapter `{name}`: its load did not finish within {waited:?}")]
    TimedOut {
        /// The adapter.
        name: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// Every build slot stayed taken for [`PagerConfig::load_timeout`].
    #[error(
        "merge `{label}`: every merge slot ({slots}) stayed busy for {waited:?}; the server is building other merges"
    )]
    Busy {
        /// The derived adapter's label.
        label: String,
        /// Build slots in all.
        slots: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// The pager was dropped while the load was pending.
    #[error("adapter `{0}`: the pager shut down before the load finished")]
    ShutDown(String),
}

impl From<AdapterError> for PagerError {
    fn from(e: AdapterError) -> Self {
        PagerError::Load(Arc::new(e))
    }
}

/// One tier's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TierMetrics {
    /// Adapters resident in the tier.
    pub resident: usize,
    /// Bytes counted against the budget.
    pub bytes: usize,
    /// The budget.
    pub budget: usize,
    /// Lookups answered by this tier.
    pub hits: u64,
    /// Lookups this tier could not answer (for the host tier: device misses that had to read
    /// the disk).
    pub misses: u64,
    /// Adapters evicted from this tier.
    pub evictions: u64,
}

/// A snapshot of the pager's state and counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PagerMetrics {
    /// The device tier (`bytes` includes pinned, draining and reserved bytes).
    pub device: TierMetrics,
    /// The host tier.
    pub host: TierMetrics,
    /// Device-resident adapters in use (an `Arc` held outside the pager).
    pub pinned: usize,
    /// Their bytes.
    pub pinned_bytes: usize,
    /// Unloaded adapters still held by a request (counted until released).
    pub draining: usize,
    /// Bytes reserved by loads in flight.
    pub reserved_bytes: usize,
    /// Loads queued or running.
    pub loading: usize,
    /// Adapters read from disk.
    pub loads: u64,
    /// Loads that failed.
    pub load_errors: u64,
    /// Adapters prepared for the device (from disk or from the host tier).
    pub prepares: u64,
    /// Acquires that joined a load already in flight instead of starting one.
    pub joined: u64,
    /// Loads whose content was already resident under another name or revision.
    pub deduplicated: u64,
    /// Derived adapters (merges) built.
    pub derived_built: u64,
    /// Derived acquires that joined a build in flight instead of starting one.
    pub derived_joined: u64,
    /// Derived acquires answered by a resident build.
    pub derived_hits: u64,
    /// Derived builds that failed.
    pub derived_errors: u64,
    /// Times the loaders handed the heap's free pages back after a burst of loads (glibc's
    /// `malloc_trim`; elsewhere the count still moves and nothing is done).
    pub heap_trims: u64,
    /// Derived adapters resident in the device tier, and their bytes (included in `device`).
    pub derived_resident: (usize, usize),
    /// Read + prepare time of each load: `(upper bound s, cumulative count)`, sum s, count.
    pub load_seconds: (Vec<(f64, u64)>, f64, u64),
}

/// One resident adapter, for listings (`/metrics`, admin).
#[derive(Clone, Debug)]
pub struct ResidentAdapter {
    /// Content hash.
    pub generation: Generation,
    /// Names bound to it (sorted; empty once unloaded or renamed).
    pub names: Vec<String>,
    /// Bytes of the prepared form (what the backend holds, in the file's precision on the CPU).
    pub bytes: usize,
    /// Bytes of the host copy (f32), when there is one; never on the CPU.
    pub host_bytes: usize,
    /// Prepared form resident.
    pub on_device: bool,
    /// Host copy resident.
    pub on_host: bool,
    /// In use by a request.
    pub pinned: bool,
    /// Built from other adapters (a merge), not read from a folder.
    pub derived: bool,
}

/// What the pager holds for one adapter name, for listings (`GET /v1/adapters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameStatus {
    /// The generation the name is bound to under the catalog's current revision (`None` until
    /// it is first loaded, and again after its folder changed).
    pub generation: Option<Generation>,
    /// That generation's host copy is resident.
    pub host_resident: bool,
    /// Its prepared form is resident in the device tier.
    pub device_resident: bool,
    /// Its prepared form is in use by a request (never evicted while so).
    pub pinned: bool,
    /// A load of the name's current revision is in flight.
    pub loading: bool,
}

/// What [`Pager::unload`] released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unloaded {
    /// Bytes freed now (both tiers).
    pub freed_bytes: usize,
    /// Device bytes still held by requests; freed when they finish.
    pub draining_bytes: usize,
}

/// Waiters on one load.
struct PendingLoad<B: Backend> {
    done: Mutex<Option<Result<Arc<LoraAdapter<B>>, PagerError>>>,
    cv: Condvar,
    notify: tokio::sync::Notify,
}

impl<B: Backend> PendingLoad<B> {
    fn new() -> Self {
        Self { done: Mutex::new(None), cv: Condvar::new(), notify: tokio::sync::Notify::new() }
    }

    fn finish(&self, r: Result<Arc<LoraAdapter<B>>, PagerError>) {
        *self.done.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
        self.cv.notify_all();
        self.notify.notify_waiters();
    }

    fn wait_blocking(&self, name: &str, timeout: Duration) -> Result<Arc<LoraAdapter<B>>, PagerError> {
        let guard = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) =
            self.cv.wait_timeout_while(guard, timeout, |d| d.is_none()).unwrap_or_else(PoisonError::into_inner);
        match &*guard {
            Some(r) => r.clone(),
            None => Err(PagerError::TimedOut { name: name.to_owned(), waited: timeout }),
        }
    }

    /// Waits for the load (no timeout: this works on any executor, so callers that need one
    /// wrap it in their executor's timer).
    async fn wait(&self) -> Result<Arc<LoraAdapter<B>>, PagerError> {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a finish between the check and the await wakes us.
            notified.as_mut().enable();
            if let Some(r) = self.done.lock().unwrap_or_else(PoisonError::into_inner).clone() {
                return r;
            }
            notified.await;
        }
    }
}

/// One adapter generation in memory.
struct Resident<B: Backend> {
    host: Option<Arc<LoraHost>>,
    device: Option<Arc<LoraAdapter<B>>>,
    /// What the backend holds for the prepared form.
    bytes: usize,
    /// What the host copy holds (f32 values), when there is one.
    host_bytes: usize,
    last_used: u64,
    /// Built from other adapters ([`Pager::acquire_derived`]) rather than read from a folder.
    derived: bool,
}

/// An unloaded adapter some request still holds.
struct Draining<B: Backend> {
    adapter: Weak<LoraAdapter<B>>,
    generation: Generation,
    bytes: usize,
}

/// The generation a name was read as, under which catalog revision.
#[derive(Clone, Copy)]
struct Binding {
    revision: u64,
    generation: Generation,
}

#[derive(Default)]
struct Counters {
    device_hits: u64,
    device_misses: u64,
    host_hits: u64,
    host_misses: u64,
    device_evictions: u64,
    host_evictions: u64,
    loads: u64,
    load_errors: u64,
    prepares: u64,
    joined: u64,
    deduplicated: u64,
    derived_built: u64,
    derived_joined: u64,
    derived_hits: u64,
    derived_errors: u64,
    heap_trims: u64,
}

struct State<B: Backend> {
    tick: u64,
    names: HashMap<String, Binding>,
    resident: HashMap<Generation, Resident<B>>,
    /// Prepared forms no longer resident but still held by requests. Weak, so the last
    /// holder's drop frees the memory at once; the bytes are un-counted at the next sweep.
    draining: Vec<Draining<B>>,
    loading: HashMap<(String, u64), Arc<PendingLoad<B>>>,
    /// Derived adapters being built, by their key.
    building: HashMap<Generation, Arc<PendingLoad<B>>>,
    host_used: usize,
    /// Resident + draining + reserved device bytes.
    device_used: usize,
    reserved: usize,
    counters: Counters,
}

fn in_use<T>(a: &Arc<T>) -> bool {
    Arc::strong_count(a) > 1
}

impl<B: Backend> State<B> {
    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Un-counts draining adapters whose holders are gone.
    fn sweep(&mut self) {
        let mut freed = 0;
        self.draining.retain(|d| {
            let keep = d.adapter.strong_count() > 0;
            if !keep {
                freed += d.bytes;
            }
            keep
        });
        self.device_used -= freed;
    }

    /// Evicts least-recently-used unpinned device forms until `need` more bytes fit `budget`.
    fn make_device_room(&mut self, need: usize, budget: usize) -> bool {
        self.sweep();
        while self.device_used + need > budget {
            let victim = self
                .resident
                .iter()
                .filter(|(_, r)| r.device.as_ref().is_some_and(|d| !in_use(d)))
                .min_by_key(|(_, r)| r.last_used)
                .map(|(g, _)| *g);
            let Some(g) = victim else { return false };
            self.counters.device_evictions += 1;
            if let Some(r) = self.resident.get_mut(&g) {
                r.device = None;
                self.device_used -= r.bytes;
                if r.host.is_none() {
                    self.resident.remove(&g);
                }
            }
        }
        true
    }

    /// Evicts least-recently-used host copies until `need` more bytes fit `budget`.
    fn make_host_room(&mut self, need: usize, budget: usize) -> bool {
        if need > budget {
            return false;
        }
        while self.host_used + need > budget {
            let victim = self
                .resident
                .iter()
                .filter(|(_, r)| r.host.as_ref().is_some_and(|h| !in_use(h)))
                .min_by_key(|(_, r)| r.last_used)
                .map(|(g, _)| *g);
            let Some(g) = victim else { return false };
            self.counters.host_evictions += 1;
            if let Some(r) = self.resident.get_mut(&g) {
                r.host = None;
                self.host_used -= r.host_bytes;
                if r.device.is_none() {
                    self.resident.remove(&g);
                }
            }
        }
        true
    }

    fn pinned(&self) -> (usize, usize) {
        let mut n = 0;
        let mut bytes = self.reserved;
        for r in self.resident.values() {
            if r.device.as_ref().is_some_and(in_use) {
                n += 1;
                bytes += r.bytes;
            }
        }
        for d in &self.draining {
            n += 1;
            bytes += d.bytes;
        }
        (n, bytes)
    }
}

/// What the pager shares with its loader threads.
struct Shared<B: Backend> {
    catalog: Arc<Catalog>,
    backend: B,
    config: PagerConfig,
    state: Mutex<State<B>>,
    /// Signalled when device room may have appeared.
    room: Condvar,
    load_seconds: Histogram,
    shutdown: AtomicBool,
    /// Loads finished since the heap was last trimmed.
    heap_dirty: AtomicBool,
    /// A fault injected by tests: the next load panics.
    inject_panic: AtomicBool,
    /// Derived builds running now (at most `config.max_concurrent_builds`).
    builds: Mutex<usize>,
    build_done: Condvar,
}

struct Job<B: Backend> {
    name: String,
    entry: Arc<CatalogEntry>,
    /// The host copy to prepare from, when the host tier has it.
    host: Option<Arc<LoraHost>>,
    slot: Arc<PendingLoad<B>>,
}

impl<B: Backend> Drop for Job<B> {
    /// A job dropped unfinished (its loader thread died) still answers its waiters.
    fn drop(&mut self) {
        let mut done = self.slot.done.lock().unwrap_or_else(PoisonError::into_inner);
        if done.is_none() {
            *done = Some(Err(PagerError::ShutDown(self.name.clone())));
            drop(done);
            self.slot.cv.notify_all();
            self.slot.notify.notify_waiters();
        }
    }
}

/// A device reservation held by a load; released on drop unless committed.
struct Reservation<'a, B: Backend> {
    shared: &'a Shared<B>,
    bytes: usize,
}

impl<B: Backend> Drop for Reservation<'_, B> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut st = self.shared.lock();
            st.reserved -= self.bytes;
            st.device_used -= self.bytes;
            drop(st);
            self.shared.room.notify_all();
        }
    }
}

impl<B: Backend> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        // Every update keeps the counters consistent before any call that could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits (on the loader thread) until `bytes` fit the device tier, then counts them.
    fn reserve(&self, name: &str, bytes: usize) -> Result<Reservation<'_, B>, PagerError> {
        let budget = self.config.device_bytes;
        if bytes > budget {
            return Err(PagerError::TooLarge { name: name.to_owned(), tier: Tier::Device, bytes, budget });
        }
        let started = Instant::now();
        let mut st = self.lock();
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                return Err(PagerError::ShutDown(name.to_owned()));
            }
            if st.make_device_room(bytes, budget) {
                st.device_used += bytes;
                st.reserved += bytes;
                return Ok(Reservation { shared: self, bytes });
            }
            let waited = started.elapsed();
            if waited >= self.config.wait_for_room {
                let (pinned, pinned_bytes) = st.pinned();
                return Err(PagerError::NoRoom { name: name.to_owned(), bytes, budget, pinned_bytes, pinned, waited });
            }
            // Holders release by dropping an Arc, which nobody is told about: poll.
            st = self.room.wait_timeout(st, ROOM_POLL).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    fn run(&self, job: &Job<B>) -> Result<Arc<LoraAdapter<B>>, PagerError> {
        if self.shutdown.load(Ordering::Relaxed) {
            return Err(PagerError::ShutDown(job.name.clone()));
        }
        if self.inject_panic.swap(false, Ordering::SeqCst) {
            panic!("a fault injected by a test");
        }
        let started = Instant::now();
        let expected = job.host.as_ref().map_or(job.entry.loaded_bytes, |h| h.bytes());
        let mut reservation = self.reserve(&job.name, expected)?;
        let (host, from_disk) = match &job.host {
            Some(h) => (h.clone(), false),
            None => {
                let h = LoraHost::load(&job.name, &job.entry.dir, self.catalog.base());
                let mut st = self.lock();
                st.counters.loads += 1;
                drop(st);
                (Arc::new(h?), true)
            }
        };
        let generation = host.generation;
        if from_disk {
            // The same content may already be prepared (another name, a touched file).
            let mut st = self.lock();
            let existing = st.resident.get(&generation).and_then(|r| r.device.clone()).or_else(|| {
                st.draining.iter().filter(|d| d.generation == generation).find_map(|d| d.adapter.upgrade())
            });
            if let Some(a) = existing {
                st.counters.deduplicated += 1;
                self.load_seconds.observe(started.elapsed().as_secs_f64());
                // Its bytes are already counted; the reservation is released on return.
                return Ok(self.commit(&mut st, job, &host, a, false));
            }
        }
        let prepared = Arc::new(LoraAdapter::prepare(&host, &self.backend)?);
        let actual = prepared.bytes;
        let mut st = self.lock();
        st.counters.prepares += 1;
        // The reservation becomes the resident adapter's bytes. More room is needed only if the
        // files grew since the catalog read their header.
        st.reserved -= reservation.bytes;
        if actual <= reservation.bytes {
            st.device_used -= reservation.bytes - actual;
            reservation.bytes = 0;
        } else {
            st.device_used -= reservation.bytes;
            reservation.bytes = 0;
            drop(st);
            let mut again = self.reserve(&job.name, actual)?;
            st = self.lock();
            st.reserved -= again.bytes;
            again.bytes = 0;
        }
        let out = self.commit(&mut st, job, &host, prepared, true);
        drop(st);
        if from_disk {
            self.load_seconds.observe(started.elapsed().as_secs_f64());
        }
        Ok(out)
    }

    /// Makes `prepared` the resident form of its generation (or returns the form already
    /// resident, un-counting `prepared` when `counted` says its bytes were added), keeps the
    /// host copy if it fits, and binds the name.
    fn commit(
        &self,
        st: &mut State<B>,
        job: &Job<B>,
        host: &Arc<LoraHost>,
        prepared: Arc<LoraAdapter<B>>,
        counted: bool,
    ) -> Arc<LoraAdapter<B>> {
        let g = prepared.generation;
        let bytes = prepared.bytes;
        let tick = st.touch();
        // A draining copy of this generation becomes resident again (its bytes are counted).
        if let Some(i) = st.draining.iter().position(|d| std::ptr::eq(d.adapter.as_ptr(), Arc::as_ptr(&prepared))) {
            st.draining.swap_remove(i);
        }
        let host_bytes = host.bytes();
        let keep_host = st.resident.get(&g).is_none_or(|r| r.host.is_none())
            && st.make_host_room(host_bytes, self.config.host_bytes);
        if keep_host {
            st.host_used += host_bytes;
        }
        let r = st.resident.entry(g).or_insert_with(|| Resident {
            host: None,
            device: None,
            bytes,
            host_bytes: 0,
            last_used: tick,
            derived: false,
        });
        r.last_used = tick;
        if keep_host {
            r.host = Some(host.clone());
            r.host_bytes = host_bytes;
        }
        let (out, duplicate) = match &r.device {
            Some(d) if !Arc::ptr_eq(d, &prepared) => (d.clone(), true),
            _ => {
                r.device = Some(prepared.clone());
                (prepared, false)
            }
        };
        if duplicate && counted {
            st.device_used -= bytes;
        }
        st.names.insert(job.name.clone(), Binding { revision: job.entry.revision, generation: g });
        out
    }
}

fn loader_loop<B: Backend>(shared: Arc<Shared<B>>, jobs: Arc<Mutex<Receiver<Job<B>>>>) {
    loop {
        // After a burst of loads, once the queue has been quiet for `QUIET`, one loader hands
        // the allocator's free pages back (see `release_free_heap`).
        let job = if shared.heap_dirty.load(Ordering::Relaxed) {
            match jobs.lock().unwrap_or_else(PoisonError::into_inner).recv_timeout(QUIET) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout) => {
                    if shared.heap_dirty.swap(false, Ordering::Relaxed) {
                        release_free_heap();
                        shared.lock().counters.heap_trims += 1;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match jobs.lock().unwrap_or_else(PoisonError::into_inner).recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        // A panic while loading fails this load only: its waiters get the message, and the
        // loader goes on with the next job.
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shared.run(&job))) {
            Ok(r) => r,
            Err(p) => {
                let message = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".to_owned());
                eprintln!("openlora: loading adapter `{}` panicked: {message}", job.name);
                Err(PagerError::Panicked { name: job.name.clone(), message })
            }
        };
        {
            let mut st = shared.lock();
            st.loading.remove(&(job.name.clone(), job.entry.revision));
            if result.is_err() {
                st.counters.load_errors += 1;
            }
        }
        shared.room.notify_all();
        job.slot.finish(result);
        drop(job);
        shared.heap_dirty.store(true, Ordering::Relaxed);
    }
}

/// How long the loaders' queue stays empty before they trim the heap.
const QUIET: Duration = Duration::from_millis(200);

/// Returns the heap's wholly free pages to the system (glibc's `malloc_trim`).
///
/// A load reads the file and widens every tensor to f32 on the heap (a few MB for a rank-8
/// adapter), keeps a few KB of descriptors and frees the rest; the allocator keeps what was
/// freed, so without this a server that has loaded thousands of adapters holds the holes
/// between their descriptors as resident memory (~4 KB an adapter of 1,000 in a `/proc` smaps
/// diff of the server). It walks every arena (~0.6-0.7 ms here), so it runs once a burst of
/// loads is over, not after each. The prepared weights are not on the heap: they are mappings
/// of their own, unmapped on eviction. Elsewhere than Linux with glibc, nothing.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free memory to the system; it takes the arenas'
        // locks itself and changes no allocated block.
        unsafe { libc::malloc_trim(0) };
    }
}

/// One derived build's slot (see [`PagerConfig::max_concurrent_builds`]).
struct BuildSlot<'a, B: Backend>(&'a Shared<B>);

impl<B: Backend> Drop for BuildSlot<'_, B> {
    fn drop(&mut self) {
        *self.0.builds.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
        self.0.build_done.notify_one();
    }
}

enum Start<B: Backend> {
    Ready(Arc<LoraAdapter<B>>),
    Wait(Arc<PendingLoad<B>>),
}

/// Pages adapters from a [`Catalog`] into host and device memory under byte budgets. Share it
/// behind an `Arc`; every method takes `&self`. Dropping it stops its loader threads (pending
/// loads fail with [`PagerError::ShutDown`]).
pub struct Pager<B: Backend + 'static> {
    shared: Arc<Shared<B>>,
    jobs: Option<Sender<Job<B>>>,
    loaders: Vec<JoinHandle<()>>,
}

impl<B: Backend + 'static> Pager<B> {
    /// A pager for the adapters of `catalog` (checked against the catalog's base model),
    /// preparing them for `backend`. Starts `config.loader_threads` loader threads.
    pub fn new(catalog: Arc<Catalog>, backend: B, config: PagerConfig) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            catalog,
            backend,
            config: config.clone(),
            state: Mutex::new(State {
                tick: 0,
                names: HashMap::new(),
                resident: HashMap::new(),
                draining: Vec::new(),
                loading: HashMap::new(),
                building: HashMap::new(),
                host_used: 0,
                device_used: 0,
                reserved: 0,
                counters: Counters::default(),
            }),
            room: Condvar::new(),
            load_seconds: Histogram::new(LOAD_LATENCY_BUCKETS),
            shutdown: AtomicBool::new(false),
            heap_dirty: AtomicBool::new(false),
            inject_panic: AtomicBool::new(false),
            builds: Mutex::new(0),
            build_done: Condvar::new(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let loaders = (0..config.loader_threads.max(1))
            .map(|i| {
                let (shared, rx) = (shared.clone(), rx.clone());
                std::thread::Builder::new().name(format!("adapter-loader-{i}")).spawn(move || loader_loop(shared, rx))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { shared, jobs: Some(tx), loaders })
    }

    /// Makes the next load panic, to test that the loader survives it.
    #[doc(hidden)]
    pub fn inject_load_panic(&self) {
        self.shared.inject_panic.store(true, Ordering::SeqCst);
    }

    /// Whether every loader thread is running (false if one has exited; `/health` reports it).
    pub fn loaders_alive(&self) -> bool {
        self.loaders.iter().all(|h| !h.is_finished())
    }

    /// The catalog adapters are paged from.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.shared.catalog
    }

    /// The budgets and settings.
    pub fn config(&self) -> &PagerConfig {
        &self.shared.config
    }

    /// Hit, join a load in flight, or start one. `count_join` says whether joining counts as a
    /// miss (a poll that finds its own load still running does not).
    fn start(&self, name: &str, count_join: bool) -> Result<Start<B>, PagerError> {
        let entry = self.shared.catalog.get(name).ok_or_else(|| PagerError::NotFound(name.to_owned()))?;
        let budget = self.shared.config.device_bytes;
        if entry.loaded_bytes > budget {
            return Err(PagerError::TooLarge {
                name: name.to_owned(),
                tier: Tier::Device,
                bytes: entry.loaded_bytes,
                budget,
            });
        }
        let mut st = self.shared.lock();
        let bound = st.names.get(name).filter(|b| b.revision == entry.revision).map(|b| b.generation);
        let mut host = None;
        if let Some(g) = bound {
            let tick = st.touch();
            if let Some(r) = st.resident.get_mut(&g) {
                r.last_used = tick;
                if let Some(d) = &r.device {
                    let d = d.clone();
                    st.counters.device_hits += 1;
                    return Ok(Start::Ready(d));
                }
                host = r.host.clone();
            }
        }
        let key = (name.to_owned(), entry.revision);
        if let Some(slot) = st.loading.get(&key) {
            let slot = slot.clone();
            if count_join {
                st.counters.device_misses += 1;
                st.counters.joined += 1;
            }
            return Ok(Start::Wait(slot));
        }
        st.counters.device_misses += 1;
        if host.is_some() {
            st.counters.host_hits += 1;
        } else {
            st.counters.host_misses += 1;
        }
        let slot = Arc::new(PendingLoad::new());
        st.loading.insert(key.clone(), slot.clone());
        drop(st);
        let job = Job { name: name.to_owned(), entry, host, slot: slot.clone() };
        let sent = self.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            self.shared.lock().loading.remove(&key);
            return Err(PagerError::ShutDown(name.to_owned()));
        }
        Ok(Start::Wait(slot))
    }

    /// The prepared adapter `name` points at, loading it if needed. A resident adapter returns
    /// at once; a cold one is read and prepared on a loader thread while this future waits
    /// (concurrent acquires of one cold adapter share the load). The returned `Arc` pins the
    /// adapter until dropped. Works on any executor (no tokio runtime needed).
    pub async fn acquire(&self, name: &str) -> Result<Arc<LoraAdapter<B>>, PagerError> {
        match self.start(name, true)? {
            Start::Ready(a) => Ok(a),
            Start::Wait(slot) => slot.wait().await,
        }
    }

    /// [`Pager::acquire`] for threads that may block.
    pub fn acquire_blocking(&self, name: &str) -> Result<Arc<LoraAdapter<B>>, PagerError> {
        match self.start(name, true)? {
            Start::Ready(a) => Ok(a),
            Start::Wait(slot) => slot.wait_blocking(name, self.shared.config.load_timeout),
        }
    }

    /// The adapter if it is device-resident now; otherwise starts (or keeps waiting on) its
    /// load and returns `None`. For a scheduler that polls queued requests every step: a
    /// request waits in the queue while its adapter loads, and nothing blocks.
    pub fn try_acquire(&self, name: &str) -> Result<Option<Arc<LoraAdapter<B>>>, PagerError> {
        match self.start(name, false)? {
            Start::Ready(a) => Ok(Some(a)),
            Start::Wait(slot) => match slot.done.lock().unwrap_or_else(PoisonError::into_inner).clone() {
                Some(Err(e)) => Err(e),
                // Finished but not yet taken off the loading map: the next poll hits.
                Some(Ok(a)) => Ok(Some(a)),
                None => Ok(None),
            },
        }
    }

    /// Starts loading `name` if it is not resident, without waiting (for adapters of queued
    /// requests). Errors that are known at once (unknown name, too large) are returned; load
    /// errors reach whoever acquires it next.
    pub fn prefetch(&self, name: &str) -> Result<(), PagerError> {
        self.start(name, false).map(|_| ())
    }

    /// Wakes loads waiting for room to re-check at once (call it when a request finishes and
    /// drops its adapters; without it they notice within a few milliseconds).
    pub fn notify_released(&self) {
        self.shared.room.notify_all();
    }

    /// Frees the memory `name`'s adapter holds in both tiers (unless another name points at the
    /// same content). A prepared form still held by requests stays counted until they drop it.
    /// The name stays in the catalog; the next acquire loads it again.
    pub fn unload(&self, name: &str) -> Unloaded {
        let mut st = self.shared.lock();
        let mut out = Unloaded::default();
        let Some(b) = st.names.remove(name) else { return out };
        if st.names.values().any(|o| o.generation == b.generation) {
            return out;
        }
        if let Some(r) = st.resident.remove(&b.generation) {
            if r.host.is_some() {
                st.host_used -= r.host_bytes;
                out.freed_bytes += r.host_bytes;
            }
            if let Some(d) = r.device {
                if in_use(&d) {
                    out.draining_bytes += r.bytes;
                    st.draining.push(Draining {
                        adapter: Arc::downgrade(&d),
                        generation: d.generation,
                        bytes: r.bytes,
                    });
                } else {
                    st.device_used -= r.bytes;
                    out.freed_bytes += r.bytes;
                }
            }
        }
        drop(st);
        self.shared.room.notify_all();
        out
    }

    /// Removes `name` from the catalog and unloads it.
    pub fn remove(&self, name: &str) -> Result<Unloaded, CatalogError> {
        self.shared.catalog.remove(name)?;
        Ok(self.unload(name))
    }

    /// Rescans the catalog's directories and unloads adapters whose folders were removed or
    /// changed (a changed one is read afresh on its next acquire).
    pub fn rescan(&self) -> ScanReport {
        let report = self.shared.catalog.rescan();
        for name in report.removed.iter().chain(&report.changed) {
            self.unload(name);
        }
        report
    }

    /// The generation `name` is currently bound to in memory, if it has been loaded under the
    /// catalog's current revision.
    pub fn generation(&self, name: &str) -> Option<Generation> {
        let rev = self.shared.catalog.get(name)?.revision;
        self.shared.lock().names.get(name).filter(|b| b.revision == rev).map(|b| b.generation)
    }

    /// What the pager holds for each of `names` (in order): bound generation, tiers, pinned,
    /// loading. Read-only: touches no LRU clock and starts no load.
    pub fn name_status(&self, names: &[String]) -> Vec<NameStatus> {
        // The catalog's lock is taken before the pager's, as `start` does.
        let revisions: Vec<Option<u64>> =
            names.iter().map(|n| self.shared.catalog.get(n).map(|e| e.revision)).collect();
        let st = self.shared.lock();
        names
            .iter()
            .zip(revisions)
            .map(|(name, rev)| {
                let Some(rev) = rev else { return NameStatus::default() };
                let generation = st.names.get(name).filter(|b| b.revision == rev).map(|b| b.generation);
                let resident = generation.and_then(|g| st.resident.get(&g));
                NameStatus {
                    generation,
                    host_resident: resident.is_some_and(|r| r.host.is_some()),
                    device_resident: resident.is_some_and(|r| r.device.is_some()),
                    pinned: resident.is_some_and(|r| r.device.as_ref().is_some_and(in_use)),
                    loading: st.loading.contains_key(&(name.clone(), rev)),
                }
            })
            .collect()
    }

    /// Every adapter in memory.
    pub fn resident(&self) -> Vec<ResidentAdapter> {
        let mut st = self.shared.lock();
        st.sweep();
        let mut names: HashMap<Generation, Vec<String>> = HashMap::new();
        for (n, b) in &st.names {
            names.entry(b.generation).or_default().push(n.clone());
        }
        let mut out: Vec<ResidentAdapter> = st
            .resident
            .iter()
            .map(|(g, r)| {
                let mut n = names.remove(g).unwrap_or_default();
                n.sort();
                ResidentAdapter {
                    generation: *g,
                    names: n,
                    bytes: r.bytes,
                    host_bytes: if r.host.is_some() { r.host_bytes } else { 0 },
                    on_device: r.device.is_some(),
                    on_host: r.host.is_some(),
                    pinned: r.device.as_ref().is_some_and(in_use),
                    derived: r.derived,
                }
            })
            .collect();
        out.extend(st.draining.iter().map(|d| ResidentAdapter {
            generation: d.generation,
            names: Vec::new(),
            bytes: d.bytes,
            host_bytes: 0,
            on_device: true,
            on_host: false,
            pinned: true,
            derived: false,
        }));
        out.sort_by(|a, b| a.names.cmp(&b.names).then(a.generation.cmp(&b.generation)));
        out
    }

    /// A snapshot of residency, bytes and counters.
    pub fn metrics(&self) -> PagerMetrics {
        let mut st = self.shared.lock();
        st.sweep();
        let (pinned, pinned_with_reserved) = st.pinned();
        let c = &st.counters;
        PagerMetrics {
            device: TierMetrics {
                resident: st.resident.values().filter(|r| r.device.is_some()).count() + st.draining.len(),
                bytes: st.device_used,
                budget: self.shared.config.device_bytes,
                hits: c.device_hits,
                misses: c.device_misses,
                evictions: c.device_evictions,
            },
            host: TierMetrics {
                resident: st.resident.values().filter(|r| r.host.is_some()).count(),
                bytes: st.host_used,
                budget: self.shared.config.host_bytes,
                hits: c.host_hits,
                misses: c.host_misses,
                evictions: c.host_evictions,
            },
            pinned,
            pinned_bytes: pinned_with_reserved - st.reserved,
            draining: st.draining.len(),
            reserved_bytes: st.reserved,
            loading: st.loading.len(),
            loads: c.loads,
            load_errors: c.load_errors,
            prepares: c.prepares,
            joined: c.joined,
            deduplicated: c.deduplicated,
            derived_built: c.derived_built,
            derived_joined: c.derived_joined,
            derived_hits: c.derived_hits,
            derived_errors: c.derived_errors,
            heap_trims: c.heap_trims,
            derived_resident: st
                .resident
                .values()
                .filter(|r| r.derived && r.device.is_some())
                .fold((0, 0), |(n, b), r| (n + 1, b + r.bytes)),
            load_seconds: self.shared.load_seconds.snapshot(),
        }
    }

    /// A *derived* adapter: one built from others (a merge), identified by `key`, the hash of
    /// its recipe and its inputs' generations. It lives in the device tier like any loaded
    /// adapter: its bytes count against the budget, it is pinned while a request holds it and
    /// evicted by LRU when not; an evicted one is built again on its next acquire. Concurrent
    /// acquires of one key share a single build (single flight): the first caller runs `build`
    /// on its own thread (a blocking thread: merges are CPU work) while the others wait.
    /// A failed or panicking build fails every waiter of that build and is not cached.
    pub fn acquire_derived(
        &self,
        key: Generation,
        label: &str,
        build: impl FnOnce() -> Result<LoraHost, PagerError>,
    ) -> Result<Arc<LoraAdapter<B>>, PagerError> {
        let slot = {
            let mut st = self.shared.lock();
            let tick = st.touch();
            if let Some(d) = st.resident.get_mut(&key).and_then(|r| {
                r.last_used = tick;
                r.device.clone()
            }) {
                st.counters.derived_hits += 1;
                return Ok(d);
            }
            if let Some(slot) = st.building.get(&key) {
                let slot = slot.clone();
                st.counters.derived_joined += 1;
                drop(st);
                return slot.wait_blocking(label, self.shared.config.load_timeout);
            }
            let slot = Arc::new(PendingLoad::new());
            st.building.insert(key, slot.clone());
            slot
        };
        let built = match self.build_slot(label) {
            Err(e) => Err(e),
            Ok(_slot) => {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.build_derived(key, label, build)))
                    .unwrap_or_else(|_| {
                        Err(PagerError::Load(Arc::new(AdapterError::Invalid {
                            adapter: label.to_owned(),
                            tensor: String::new(),
                            reason: "building the derived adapter panicked".into(),
                        })))
                    })
            }
        };
        {
            let mut st = self.shared.lock();
            st.building.remove(&key);
            if built.is_err() {
                st.counters.derived_errors += 1;
            }
        }
        self.shared.room.notify_all();
        slot.finish(built.clone());
        built
    }

    /// Waits (bounded) for one of the build slots; released when the guard drops.
    fn build_slot(&self, label: &str) -> Result<BuildSlot<'_, B>, PagerError> {
        let cfg = &self.shared.config;
        let slots = cfg.max_concurrent_builds.max(1);
        let n = self.shared.builds.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut n, _) = self
            .shared
            .build_done
            .wait_timeout_while(n, cfg.load_timeout, |n| *n >= slots)
            .unwrap_or_else(PoisonError::into_inner);
        if *n >= slots {
            return Err(PagerError::Busy { label: label.to_owned(), slots, waited: cfg.load_timeout });
        }
        *n += 1;
        Ok(BuildSlot(&self.shared))
    }

    fn build_derived(
        &self,
        key: Generation,
        label: &str,
        build: impl FnOnce() -> Result<LoraHost, PagerError>,
    ) -> Result<Arc<LoraAdapter<B>>, PagerError> {
        let host = build()?;
        let bytes = host.bytes();
        let mut reservation = self.shared.reserve(label, bytes)?;
        let prepared = Arc::new(LoraAdapter::prepare(&host, &self.shared.backend)?);
        let mut st = self.shared.lock();
        // The reservation becomes the resident entry's bytes (prepare reports host.bytes()).
        st.reserved -= reservation.bytes;
        st.device_used -= reservation.bytes;
        reservation.bytes = 0;
        st.device_used += prepared.bytes;
        st.counters.derived_built += 1;
        let tick = st.touch();
        st.resident.insert(
            key,
            Resident {
                host: None,
                device: Some(prepared.clone()),
                bytes: prepared.bytes,
                host_bytes: 0,
                last_used: tick,
                derived: true,
            },
        );
        Ok(prepared)
    }

    /// The folder `name` is read from (from the catalog).
    pub fn dir(&self, name: &str) -> Option<PathBuf> {
        self.shared.catalog.get(name).map(|e| e.dir.clone())
    }
}

impl<B: Backend + 'static> Drop for Pager<B> {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        self.shared.room.notify_all();
        // Closing the channel ends each loader after its current job; queued jobs fail fast.
        self.jobs = None;
        for h in self.loaders.drain(..) {
            let _ = h.join();
        }
        let mut st = self.shared.lock();
        for (key, slot) in st.loading.drain() {
            slot.finish(Err(PagerError::ShutDown(key.0)));
        }
    }
}
