//! Running sequences: the paged KV cache, the continuous-batching scheduler, sampling, and the
//! engine thread that the async world talks to through channels. It is the only decode loop:
//! the server, `openlora generate` and `openlora bench` all submit [`Request`]s here.
//!
//! [`EngineHandle::spawn`] starts one engine thread that owns the KV cache and runs
//! [`scheduler::EngineCore::step`] in a loop. [`EngineHandle::submit`] validates a request,
//! applies the queue limit, and returns a [`RequestStream`] of [`Event`]s (one per token, then
//! the finish). Dropping the stream cancels the request and frees its KV blocks at the next
//! step. A failure in one request's computation fails that request only.

pub mod grammar;
pub mod kv_cache;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod stop;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};

use openlora_kernels::Backend;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

pub use request::{
    EngineError, Event, FinishReason, PROMPT_LOGPROBS_CHUNK, PromptLogprob, Request, TokenLogprob, Usage,
};
use scheduler::EngineCore;
pub use scheduler::{EngineConfig, EngineStats};

use crate::model::LoadedModel;
use crate::model::error::ModelError;

enum Command<B: Backend> {
    Add(u64, Box<Request<B>>, tokio::sync::mpsc::UnboundedSender<Event>),
    Cancel(u64),
}

struct Shared {
    stats: Mutex<EngineStats>,
    queued: Arc<AtomicUsize>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    /// False once the engine thread has exited (it should only on shutdown).
    alive: AtomicBool,
    /// A fault injected by tests ([`Fault`] as u8; 0: none).
    inject: AtomicU8,
}

/// A cloneable handle to the engine thread.
pub struct EngineHandle<B: Backend> {
    tx: Sender<Command<B>>,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    model: Arc<LoadedModel<B>>,
}

impl<B: Backend> Clone for EngineHandle<B> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), shared: self.shared.clone(), cfg: self.cfg.clone(), model: self.model.clone() }
    }
}

impl<B: Backend + 'static> EngineHandle<B> {
    /// Allocates the KV cache and starts the engine thread.
    pub fn spawn(model: Arc<LoadedModel<B>>, cfg: EngineConfig) -> Result<Self, ModelError> {
        let queued = Arc::new(AtomicUsize::new(0));
        let core = EngineCore::new(model.clone(), cfg.clone(), queued.clone())?;
        let shared = Arc::new(Shared {
            stats: Mutex::new(core.stats()),
            queued,
            next_id: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            inject: AtomicU8::new(0),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("openlora-engine".into())
            .spawn(move || run(core, rx, thread_shared))
            .map_err(|e| ModelError::InvalidRequest(format!("cannot start the engine thread: {e}")))?;
        Ok(Self { tx, shared, cfg, model })
    }

    /// Queues `req`. Fails at once if it can never run ([`EngineError::Invalid`]), the queue
    /// is full ([`EngineError::Overloaded`]) or the engine is stopping.
    pub fn submit(&self, req: Request<B>) -> Result<RequestStream, EngineError> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(EngineError::ShutDown);
        }
        scheduler::validate_request(&self.model.model.config, &self.cfg, &req)?;
        let limit = self.cfg.max_waiting;
        let prev = self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if prev >= limit {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Overloaded { waiting: prev, limit });
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (etx, erx) = unbounded_channel();
        if self.tx.send(Command::Add(id, Box::new(req), etx)).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::ShutDown);
        }
        let tx = self.tx.clone();
        Ok(RequestStream {
            id,
            rx: erx,
            cancel: Some(Box::new(move || {
                let _ = tx.send(Command::Cancel(id));
            })),
            done: false,
        })
    }

    /// The latest statistics (updated after every step).
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The model it serves.
    pub fn model(&self) -> &Arc<LoadedModel<B>> {
        &self.model
    }

    /// The longest sequence (prompt plus generated tokens) a request can have.
    pub fn context_limit(&self) -> usize {
        scheduler::context_limit(&self.model.model.config, &self.cfg)
    }

    /// Whether the engine thread is running (false after it exited; `/health` reports it).
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Injects `fault` into the engine's next step (for tests of its supervision).
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Fault) {
        self.shared.inject.store(fault as u8, Ordering::SeqCst);
    }

    /// Stops accepting requests; the engine thread finishes the ones it has and exits once
    /// every handle is dropped.
    pub fn stop_accepting(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
    }
}

/// A fault a test injects into the engine thread.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// The next step panics outside every per-sequence guard (the engine recovers).
    StepPanic = 1,
    /// The thread exits at its next step, as if supervision itself had failed.
    ThreadExit = 2,
}

/// Marks the engine down when its thread ends, however it ends.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

/// The engine thread. A panic in a step outside the per-sequence guards (scheduling, the KV
/// allocator, bookkeeping) is caught here: the requests of that step fail with the panic's
/// message, the KV pool is reset (its state may be half-updated), and the loop goes on.
fn run<B: Backend>(mut core: EngineCore<B>, rx: Receiver<Command<B>>, shared: Arc<Shared>) {
    let _alive = AliveGuard(shared.clone());
    let publish = |core: &EngineCore<B>| {
        *shared.stats.lock().unwrap_or_else(PoisonError::into_inner) = core.stats();
    };
    loop {
        // Block when idle; otherwise take whatever arrived and keep stepping.
        if !core.has_work() {
            publish(&core);
            match rx.recv() {
                Ok(cmd) => apply(&mut core, cmd, &shared),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => apply(&mut core, cmd, &shared),
                Err(TryRecvError::Empty) => break,
                // Every handle is gone; streams may still be open, so finish the work.
                Err(TryRecvError::Disconnected) => break,
            }
        }
        let fault = shared.inject.swap(0, Ordering::SeqCst);
        if fault == Fault::ThreadExit as u8 {
            return;
        }
        let stepped = catch_unwind(AssertUnwindSafe(|| {
            if fault == Fault::StepPanic as u8 {
                panic!("a fault injected by a test");
            }
            core.step()
        }));
        if let Err(p) = stepped {
            let msg = scheduler::panic_message(p.as_ref());
            eprintln!("openlora: the engine step panicked ({msg}); failing its requests and going on");
            core.recover(&msg);
        }
        publish(&core);
    }
}

fn apply<B: Backend>(core: &mut EngineCore<B>, cmd: Command<B>, shared: &Shared) {
    match cmd {
        Command::Add(id, req, events) => {
            // A panic while queueing drops the request's event sender (its stream ends with an
            // error) before it was counted out of the queue.
            if catch_unwind(AssertUnwindSafe(|| core.add(id, *req, events))).is_err() {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
        Command::Cancel(id) => {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| core.cancel(id))) {
                core.recover(&scheduler::panic_message(p.as_ref()));
            }
        }
    }
}

/// The events of one request. Dropping it before the request ends cancels the request.
pub struct RequestStream {
    id: u64,
    rx: UnboundedReceiver<Event>,
    cancel: Option<Box<dyn FnOnce() + Send + Sync>>,
    done: bool,
}

/// A whole generation, collected from a stream.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Per token, when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Prompt tokens 1.. scored, when prompt logprobs were asked for.
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
}

impl RequestStream {
    /// The engine's id for this request.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn seen(&mut self, e: Option<Event>) -> Option<Event> {
        match &e {
            Some(Event::Finished { .. } | Event::Failed(_)) => self.done = true,
            None if !self.done => {
                self.done = true;
                return Some(Event::Failed(EngineError::ShutDown));
            }
            _ => {}
        }
        e
    }

    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let e = self.rx.recv().await;
        self.seen(e)
    }

    /// Polls for the next event (for callers that wait on several streams at once).
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(e) => std::task::Poll::Ready(self.seen(e)),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    /// An event already produced, without waiting (None when there is none yet, or after the
    /// last).
    pub fn try_next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        match self.rx.try_recv() {
            Ok(e) => self.seen(Some(e)),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => None,
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => self.seen(None),
        }
    }

    /// The next event, blocking the thread (not for use inside an async runtime).
    pub fn blocking_next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let e = self.rx.blocking_recv();
        self.seen(e)
    }

    /// Cancels the request; the stream then ends with [`FinishReason::Cancelled`].
    pub fn cancel(&mut self) {
        if let Some(c) = self.cancel.take() {
            c();
        }
    }

    /// Waits for the whole generation (blocking).
    pub fn collect_blocking(mut self) -> Result<Completion, EngineError> {
        let mut c = Completion {
            tokens: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
            logprobs: Vec::new(),
            prompt_logprobs: None,
        };
        while let Some(e) = self.blocking_next() {
            match e {
                Event::Token { id, text, logprob } => {
                    c.tokens.push(id);
                    c.text.push_str(&text);
                    c.logprobs.extend(logprob);
                }
                Event::PromptLogprobs(p) => c.prompt_logprobs = Some(p),
                Event::Finished { text, reason, usage } => {
                    c.text.push_str(&text);
                    c.finish_reason = reason;
                    c.usage = usage;
                }
                Event::Failed(e) => return Err(e),
            }
        }
        Ok(c)
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            self.cancel();
        }
    }
}
