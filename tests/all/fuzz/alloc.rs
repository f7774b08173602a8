//! The allocation guard: this test binary's global allocator, which lets a fuzz worker thread
//! cap the size of any one allocation it makes.
//!
//! A parser that believes a hostile length (a GGUF string of 2^40 bytes, a table of 2^30
//! positions) would ask for an absurd block; with the operating system's overcommit that either
//! "succeeds" and is then touched to death or aborts the process without a word. Under the guard
//! such a request prints the target, the seed, the input number and the input (hex) to stderr
//! and aborts at once, so the failure names its reproducer. Other threads are never limited.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;

/// What the guarded thread is doing, for the report.
#[derive(Clone, Copy)]
struct Context {
    limit: usize,
    target: &'static str,
    seed: u64,
    input_no: u64,
    input: *const u8,
    input_len: usize,
}

thread_local! {
    static CONTEXT: Cell<Option<Context>> = const { Cell::new(None) };
}

/// Limits the current thread's allocations to `limit` bytes each while it runs `input`;
/// the limit ends when the returned value is dropped.
pub struct Guarded<'a> {
    _input: &'a [u8],
}

impl<'a> Guarded<'a> {
    pub fn new(limit: usize, target: &'static str, seed: u64, input_no: u64, input: &'a [u8]) -> Self {
        let cx = Context { limit, target, seed, input_no, input: input.as_ptr(), input_len: input.len() };
        CONTEXT.with(|c| c.set(Some(cx)));
        Self { _input: input }
    }
}

impl Drop for Guarded<'_> {
    fn drop(&mut self) {
        CONTEXT.with(|c| c.set(None));
    }
}

struct GuardedSystem;

#[global_allocator]
static ALLOCATOR: GuardedSystem = GuardedSystem;

fn check(size: usize) {
    let Ok(Some(cx)) = CONTEXT.try_with(Cell::get) else { return };
    if size <= cx.limit {
        return;
    }
    // No allocation from here on: formatting into stderr and hex through a stack buffer.
    CONTEXT.with(|c| c.set(None));
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "\nfuzz target `{}`: input #{} (OPENLORA_FUZZ_SEED={}) asked for one allocation of {size} bytes \
         (the limit is {}); aborting. The input ({} bytes, hex):",
        cx.target, cx.input_no, cx.seed, cx.limit, cx.input_len
    );
    // SAFETY: `Guarded` borrows the input for as long as the context is set.
    let input = unsafe { std::slice::from_raw_parts(cx.input, cx.input_len) };
    let mut buf = [0u8; 2048];
    for chunk in input.chunks(buf.len() / 2) {
        for (i, b) in chunk.iter().enumerate() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            buf[2 * i] = HEX[usize::from(b >> 4)];
            buf[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        let _ = err.write_all(&buf[..2 * chunk.len()]);
    }
    let _ = err.write_all(b"\n");
    std::process::abort();
}

// SAFETY: every call is forwarded to `System` unchanged; `check` only reads a thread-local.
unsafe impl GlobalAlloc for GuardedSystem {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
