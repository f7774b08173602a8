//! Fuzzing every parser that takes outside bytes, in the suite, on stable.
//!
//! This is a coverage-blind mutation fuzzer: no instrumentation, no feedback. Each target (see
//! `openlora_tests::fuzz_targets`) starts from its committed seed corpus
//! (`tests/fuzz/corpus/<target>/`: valid minimal instances and a few edge cases) and feeds the
//! real entry point inputs made from them by a seeded RNG: bit flips, bytes and little/big-endian
//! integers replaced by boundary values (0, -1, u32::MAX, u64::MAX, 2^60, ...), decimal numbers
//! in text replaced by boundary values, format tokens inserted, truncation, deletion,
//! duplication of chunks, splices of two seeds. The checked property: no panic (caught and
//! reported with the input), no input slower than [`SLOW`], no single allocation above
//! [`ALLOC_LIMIT`] (the [`alloc`] guard).
//!
//! Every target runs the corpus, then [`DEFAULT_ITERATIONS`] mutated inputs or [`DEFAULT_SECONDS`],
//! whichever ends first. The inputs depend only on the seed and the corpus (never on time), so a
//! failure reproduces with the seed it prints. By hand:
//!
//! ```text
//! OPENLORA_FUZZ_SECONDS=600 OPENLORA_FUZZ_ITERATIONS=100000000 OPENLORA_FUZZ_SEED=7 \
//!   cargo test -p openlora-tests --test all fuzz::fuzz_gguf -- --nocapture
//! ```
//!
//! A failing input is also written to `target/tmp/fuzz-failures/`. Once fixed, it becomes a
//! named regression test in [`regressions`].

mod alloc;
mod regressions;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use openlora_tests::fuzz_targets::{self, TargetFn};

/// Time budget per target (`OPENLORA_FUZZ_SECONDS` overrides).
const DEFAULT_SECONDS: f64 = 3.0;
/// Mutated inputs per target (`OPENLORA_FUZZ_ITERATIONS` overrides).
const DEFAULT_ITERATIONS: u64 = 50_000;
/// Fewest mutated inputs a run must reach, so a target that became very slow fails loudly
/// instead of fuzzing nothing.
const MIN_ITERATIONS: u64 = 100;
/// One input taking longer than this is a failure (a near-hang).
const SLOW: Duration = Duration::from_secs(2);
/// Waiting this long for one input is a hang.
const HANG: Duration = Duration::from_secs(20);
/// Largest single allocation while parsing one input (inputs are at most [`MAX_LEN`]).
const ALLOC_LIMIT: usize = 256 << 20;
/// Longest input generated.
const MAX_LEN: usize = 1 << 20;

/// splitmix64: small, fast, and the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const INTERESTING_INTS: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    9,
    12,
    16,
    31,
    32,
    33,
    64,
    127,
    128,
    255,
    256,
    1023,
    1024,
    4096,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 48,
    1 << 56,
    1 << 60,
    i64::MAX as u64,
    1 << 63,
    u64::MAX - 7,
    u64::MAX - 1,
    u64::MAX,
];

const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "7",
    "255",
    "256",
    "65536",
    "2147483647",
    "2147483648",
    "-2147483649",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "1152921504606846976",
    "340282366920938463463374607431768211456",
    "1e38",
    "3.5e38",
    "1e308",
    "1e309",
    "-1e309",
    "1.5",
    "1e-45",
    "0.000000000000000000000000000000000000000000001",
    "nan",
    "inf",
    "-inf",
];

/// Tokens of the formats the targets read, inserted whole.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"[[",
    b"]]",
    b":",
    b",",
    b"=",
    b"\"",
    b"'",
    b"'''",
    b"\"\"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"\n",
    b"#",
    b".",
    b"null",
    b"true",
    b"false",
    b"{}",
    b"[]",
    b"\"\"",
    b"1e999",
    b"-",
    b"\xff",
    b"\xc3\x28",
    b"\x00",
    b"GGUF",
    b"__metadata__",
    b"dtype",
    b"shape",
    b"data_offsets",
    b"\"F16\"",
    b"\"BF16\"",
    b"\"I64\"",
    b"lora_A",
    b"lora_B",
    b"base_model.model.",
    b"model.layers.",
    b"rank_pattern",
    b"alpha_pattern",
    b"{{",
    b"}}",
    b"{%",
    b"%}",
];

/// One mutation of `data` (which may grow or shrink), using `corpus` for splices.
fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(14) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        // A random byte.
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next() as u8;
        }
        // A boundary integer, 1/2/4/8 bytes, little- or big-endian.
        2 | 3 if len > 0 => {
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let i = rng.below(len);
            let mut v = *rng.pick(INTERESTING_INTS);
            if rng.below(4) == 0 {
                v = v.wrapping_add(rng.below(5) as u64).wrapping_sub(2);
            }
            let (le, be) = (v.to_le_bytes(), v.to_be_bytes());
            let bytes = if rng.below(4) == 0 { &be[8 - width..] } else { &le[..width] };
            let end = (i + width).min(len);
            data[i..end].copy_from_slice(&bytes[..end - i]);
        }
        // A small step on an integer in place (lengths and counts off by a little).
        4 if len > 0 => {
            let i = rng.below(len);
            let delta = rng.below(33) as u8;
            data[i] = if rng.below(2) == 0 { data[i].wrapping_add(delta) } else { data[i].wrapping_sub(delta) };
        }
        // A decimal number in text replaced by a boundary value.
        5 => {
            let starts: Vec<usize> =
                (0..len).filter(|&i| data[i].is_ascii_digit() && (i == 0 || !data[i - 1].is_ascii_digit())).collect();
            if let Some(&s) = (!starts.is_empty()).then(|| rng.pick(&starts)) {
                let e = (s..len).find(|&j| !data[j].is_ascii_digit() && data[j] != b'.').unwrap_or(len);
                let n = rng.pick(INTERESTING_NUMBERS).as_bytes();
                data.splice(s..e, n.iter().copied());
            }
        }
        // Truncate.
        6 if len > 0 => data.truncate(rng.below(len)),
        // Delete a chunk.
        7 if len > 0 => {
            let a = rng.below(len);
            let b = a + rng.below((len - a).min(64) + 1);
            data.drain(a..b);
        }
        // Duplicate a chunk, up to many times (counts and repeated keys).
        8 if len > 0 => {
            let a = rng.below(len);
            let b = a + 1 + rng.below((len - a).min(256));
            let chunk = data[a..b].to_vec();
            let times = if rng.below(8) == 0 { 1 + rng.below(256) } else { 1 };
            let at = rng.below(len + 1);
            let insert: Vec<u8> = chunk.iter().copied().cycle().take(chunk.len() * times).collect();
            data.splice(at..at, insert);
        }
        // Splice: a prefix of this input and a suffix of another seed.
        9 if !corpus.is_empty() => {
            let other = rng.pick(corpus);
            let a = rng.below(len + 1);
            let b = rng.below(other.len() + 1);
            data.truncate(a);
            data.extend_from_slice(&other[b..]);
        }
        // A format token inserted or written over.
        10 | 11 => {
            let t = rng.pick(TOKENS);
            let at = rng.below(len + 1);
            if rng.below(2) == 0 {
                data.splice(at..at, t.iter().copied());
            } else {
                let end = (at + t.len()).min(len);
                data.splice(at..end, t.iter().copied());
            }
        }
        // Random bytes inserted.
        12 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(at..at, bytes);
        }
        // Swap two bytes.
        _ if len > 1 => {
            let (a, b) = (rng.below(len), rng.below(len));
            data.swap(a, b);
        }
        _ => data.push(rng.next() as u8),
    }
    data.truncate(MAX_LEN);
}

/// A mutated input: one to eight stacked mutations of a corpus entry.
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = rng.pick(corpus).clone();
    let n = if rng.below(4) == 0 { 1 + rng.below(8) } else { 1 + rng.below(2) };
    for _ in 0..n {
        mutate_once(rng, &mut data, corpus);
    }
    data
}

fn env<T: std::str::FromStr>(key: &str) -> Option<T> {
    let v = std::env::var(key).ok()?;
    Some(v.parse().unwrap_or_else(|_| panic!("{key}={v:?} is not a valid value")))
}

/// The committed corpus of `target`, sorted by file name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_targets::corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let out: Vec<(String, Vec<u8>)> = files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().expect("name").to_string_lossy().into_owned(), bytes)
        })
        .collect();
    assert!(!out.is_empty(), "{}: the corpus is empty", dir.display());
    out
}

/// What one input did.
enum Outcome {
    Accepted,
    Refused,
    Panicked(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fails the test naming the input: where it came from, the seed, the bytes (hex when short),
/// and the file they were saved to.
fn fail(target: &str, seed: u64, label: &str, input: &[u8], what: &str) -> ! {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{target}-seed{seed}-{}.bin", label.replace(['/', ' ', '#'], "_")));
    let _ = std::fs::write(&file, input);
    let shown = if input.len() <= 16 << 10 { hex(input) } else { format!("({} bytes; see the file)", input.len()) };
    panic!(
        "fuzz target `{target}`, {label} (OPENLORA_FUZZ_SEED={seed}): {what}\n\
         input saved to {}\ninput ({} bytes, hex): {shown}",
        file.display(),
        input.len()
    );
}

/// Runs `target` over its corpus and then mutated inputs, within the iteration and time bounds.
fn fuzz(target: &'static str) {
    let run: TargetFn = fuzz_targets::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no fuzz target named {target}"));
    let seeds = corpus(target);
    let default_seed =
        target.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let seed: u64 = env("OPENLORA_FUZZ_SEED").unwrap_or(default_seed);
    let budget = Duration::from_secs_f64(env("OPENLORA_FUZZ_SECONDS").unwrap_or(DEFAULT_SECONDS));
    let iterations: u64 = env("OPENLORA_FUZZ_ITERATIONS").unwrap_or(DEFAULT_ITERATIONS);

    // One worker thread runs the inputs (under the allocation guard); this thread watches the
    // clock, so a hang is reported rather than waited on forever.
    let (to_worker, inputs) = mpsc::channel::<(u64, Vec<u8>)>();
    let (to_main, outcomes) = mpsc::channel::<(Vec<u8>, Outcome, Duration)>();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{target}"))
        .spawn(move || {
            for (no, input) in inputs {
                let started = Instant::now();
                let outcome = {
                    let _guard = alloc::Guarded::new(ALLOC_LIMIT, target, seed, no, &input);
                    match std::panic::catch_unwind(|| run(&input)) {
                        Ok(Ok(())) => Outcome::Accepted,
                        Ok(Err(_)) => Outcome::Refused,
                        Err(p) => Outcome::Panicked(
                            p.downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                .unwrap_or_else(|| "(a non-string panic)".into()),
                        ),
                    }
                };
                if to_main.send((input, outcome, started.elapsed())).is_err() {
                    break;
                }
            }
        })
        .expect("fuzz worker");

    let corpus_bytes: Vec<Vec<u8>> = seeds.iter().map(|(_, b)| b.clone()).collect();
    let mut rng = Rng(seed);
    let started = Instant::now();
    let (mut accepted, mut mutated) = (0u64, 0u64);
    let total = seeds.len() as u64 + iterations;
    for no in 0..total {
        let is_seed = (no as usize) < seeds.len();
        if !is_seed && started.elapsed() >= budget {
            break;
        }
        let (label, input) = match seeds.get(no as usize) {
            Some((name, bytes)) => (format!("seed file {name}"), bytes.clone()),
            None => (format!("input #{no}"), mutate(&mut rng, &corpus_bytes)),
        };
        to_worker.send((no, input.clone())).expect("worker alive");
        let (input, outcome, took) = match outcomes.recv_timeout(HANG) {
            Ok(r) => r,
            Err(_) => fail(target, seed, &label, &input, &format!("no answer after {HANG:?} (a hang)")),
        };
        match outcome {
            Outcome::Panicked(msg) => fail(target, seed, &label, &input, &format!("panicked: {msg}")),
            _ if took > SLOW => fail(target, seed, &label, &input, &format!("took {took:?} (limit {SLOW:?})")),
            Outcome::Accepted => accepted += 1,
            Outcome::Refused => {}
        }
        mutated += u64::from(!is_seed);
    }
    drop(to_worker);
    worker.join().expect("fuzz worker exits");
    eprintln!(
        "fuzz {target}: {} seeds and {mutated} mutated inputs in {:.1?} (OPENLORA_FUZZ_SEED={seed}), {accepted} accepted",
        seeds.len(),
        started.elapsed()
    );
    assert!(
        mutated >= MIN_ITERATIONS.min(iterations),
        "fuzz target `{target}` ran only {mutated} mutated inputs in {budget:?}: it became too slow to fuzz"
    );
}

#[test]
fn fuzz_gguf() {
    fuzz("gguf");
}

#[test]
fn fuzz_adapter_weights() {
    fuzz("adapter_weights");
}

#[test]
fn fuzz_peft_config() {
    fuzz("peft_config");
}

#[test]
fn fuzz_manifest() {
    fuzz("manifest");
}

#[test]
fn fuzz_deployment() {
    fuzz("deployment");
}

#[test]
fn fuzz_request() {
    fuzz("request");
}

#[test]
fn fuzz_hf_config() {
    fuzz("hf_config");
}

#[test]
fn fuzz_model_safetensors() {
    fuzz("model_safetensors");
}

/// Every target has a committed corpus holding at least one input its parser accepts (so the
/// mutations start from the format, not from noise), the generated binary seeds are the ones
/// committed (`OPENLORA_FUZZ_WRITE_SEEDS=1` rewrites them first), and every target has a test
/// above.
#[test]
fn fuzz_corpus_is_committed_and_valid() {
    for (target, name, bytes) in fuzz_targets::generated_seeds() {
        let path = fuzz_targets::corpus_dir(target).join(name);
        if std::env::var_os("OPENLORA_FUZZ_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(path.parent().expect("corpus folder")).expect("corpus folder");
            std::fs::write(&path, &bytes).expect("seed");
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (regenerate: OPENLORA_FUZZ_WRITE_SEEDS=1 cargo test -p openlora-tests --test all fuzz_corpus)",
                path.display()
            )
        });
        assert!(
            committed == bytes,
            "{} differs from what fuzz_targets::generated_seeds makes (regenerate: OPENLORA_FUZZ_WRITE_SEEDS=1 cargo test -p openlora-tests --test all fuzz_corpus)",
            path.display()
        );
    }
    let source = include_str!("mod.rs");
    let mut total = 0;
    for (target, run) in fuzz_targets::TARGETS {
        let seeds = corpus(target);
        total += seeds.iter().map(|(_, b)| b.len()).sum::<usize>();
        let accepted: Vec<&str> = seeds.iter().filter(|(_, b)| run(b).is_ok()).map(|(n, _)| n.as_str()).collect();
        assert!(
            !accepted.is_empty(),
            "no seed of `{target}` is accepted by its parser: {:?}",
            seeds.iter().map(|(n, b)| (n, run(b))).collect::<Vec<_>>()
        );
        assert!(source.contains(&format!("fuzz(\"{target}\")")), "target `{target}` has no test");
    }
    assert!(total < 1 << 20, "the fuzz corpus is {total} bytes; keep it under 1 MiB");
}
