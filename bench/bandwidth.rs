//! Memory read bandwidth of this machine, for the decode roofline in bench/run_all.py.
//!
//! Standalone (std only, not part of the cargo workspace); bench/run_all.py compiles it with
//!
//!     rustc -O -C target-cpu=native --edition 2021 bench/bandwidth.rs -o target/bench-tools/bandwidth
//!
//! and runs `bandwidth [--mib 1024] [--threads 2] [--reps 7]`. It fills a buffer of `--mib` MiB
//! (so every page is resident), then, `--reps` times, lets `--threads` threads each sum their
//! contiguous share of it (a u64 sum that the compiler vectorises into several wide accumulators,
//! so the loop is bound by memory, not by the adds), and reports the best pass as GB/s (10^9 bytes/s).
//! It also measures one thread alone. Prints one JSON line.

use std::hint::black_box;
use std::thread;
use std::time::Instant;

/// Integer addition is associative, so LLVM turns this plain reduction into several independent
/// wide vector accumulators (AVX2/AVX-512 `vpaddq` with target-cpu=native): memory-bound.
fn sum_chunk(xs: &[u64]) -> u64 {
    xs.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// Best GB/s over `reps` passes of `threads` threads over `buf`.
fn measure(buf: &[u64], threads: usize, reps: usize) -> (f64, Vec<f64>) {
    let per = buf.len().div_ceil(threads);
    let mut all = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        let total = thread::scope(|s| {
            let hs: Vec<_> = buf.chunks(per).map(|c| s.spawn(move || sum_chunk(black_box(c)))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).fold(0u64, |a, b| a.wrapping_add(b))
        });
        let dt = t0.elapsed().as_secs_f64();
        black_box(total);
        all.push(std::mem::size_of_val(buf) as f64 / dt / 1e9);
    }
    let best = all.iter().cloned().fold(0.0, f64::max);
    (best, all)
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    match args.iter().position(|a| a == name) {
        Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} needs a number")),
        None => default,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bandwidth [--mib 1024] [--threads 2] [--reps 7]: best read GB/s over a buffer, as one JSON line");
        return;
    }
    let mib = arg(&args, "--mib", 1024);
    let threads = arg(&args, "--threads", 2).max(1);
    let reps = arg(&args, "--reps", 7).max(1);
    let n = mib * (1 << 20) / 8;
    // Distinct values so nothing can be folded away; written once so every page is resident.
    let buf: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let (one, one_all) = measure(&buf, 1, reps.min(3));
    let (best, all) = measure(&buf, threads, reps);
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(",");
    println!(
        "{{\"bytes\":{},\"threads\":{threads},\"reps\":{reps},\"gb_s\":{best:.2},\"gb_s_1_thread\":{one:.2},\"passes_gb_s\":[{}],\"passes_1_thread_gb_s\":[{}]}}",
        std::mem::size_of_val(&buf[..]),
        fmt(&all),
        fmt(&one_all)
    );
}
