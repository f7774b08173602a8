//! `openlora adapters ...`: synthetic PEFT adapters for scale work, and the pager benchmark.
//!
//! `synth` writes N valid PEFT adapters for a base model (the default model unless `--model`),
//! deterministic per seed, in parallel. `bench` measures what the pager issue asks for on such a
//! directory: registration time, cold-load latency, acquire throughput under a Zipf request
//! stream, and (with `--decode`) batched decode throughput through the pager with 1, 10, 100
//! and 1,000 distinct active adapters. Results go to one JSON file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use openlora::adapters::catalog::{Catalog, SaveDtype, write_peft};
use openlora::adapters::pager::{Pager, PagerConfig};
use openlora::adapters::{Generation, LoraHost, Proj, WeightedAdapter};
use openlora::engine::Request;
use openlora::model::LoadedModel;
use openlora::model::config::LlamaConfig;
use openlora::model::default_model;
use openlora::model::gguf::GgufFile;
use openlora_kernels::CpuBackend;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use rayon::prelude::*;

/// `openlora adapters ...`.
#[derive(Subcommand)]
pub enum AdaptersCommand {
    /// Write N synthetic PEFT LoRA adapters (random weights) for a base model.
    Synth(SynthArgs),
    /// Benchmark the adapter pager on a directory of adapters (see bench/README.md).
    Bench(BenchArgs),
}

/// `openlora adapters synth`.
#[derive(Args)]
pub struct SynthArgs {
    /// How many adapters.
    #[arg(long)]
    count: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Where to write them: OUT/<prefix><index>/ each.
    #[arg(long)]
    out: PathBuf,
    /// Target modules (PEFT short names), comma-separated.
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    targets: Vec<String>,
    /// Seed: the same seed and arguments give the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder name prefix.
    #[arg(long, default_value = "synth-")]
    prefix: String,
    /// Weight dtype on disk: f16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// A GGUF file or an HF folder whose shape the adapters fit; the default model when absent.
    #[arg(long)]
    model: Option<PathBuf>,
}

/// `openlora adapters bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// The directory of adapters (e.g. made by `openlora adapters synth`).
    #[arg(long)]
    dir: PathBuf,
    /// A GGUF file or an HF folder; the default model when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Catalog registrations timed (the first may read from a cold page cache).
    #[arg(long, default_value_t = 3)]
    register_repeat: usize,
    /// Distinct adapters loaded one at a time for the cold-load latency.
    #[arg(long, default_value_t = 300)]
    cold_loads: usize,
    /// Adapters the Zipf stream draws from.
    #[arg(long, default_value_t = 1000)]
    zipf_adapters: usize,
    /// Zipf exponent.
    #[arg(long, default_value_t = 1.0)]
    zipf_s: f64,
    /// Acquires in the Zipf stream.
    #[arg(long, default_value_t = 50_000)]
    zipf_requests: usize,
    /// Threads issuing acquires in the Zipf stream.
    #[arg(long, default_value_t = 4)]
    zipf_clients: usize,
    /// Host budget, in adapters of the directory's size.
    #[arg(long, default_value_t = 200)]
    host_adapters: usize,
    /// Device budget, in adapters of the directory's size.
    #[arg(long, default_value_t = 50)]
    device_adapters: usize,
    /// Also measure batched decode through the pager with this many distinct active adapters
    /// (repeatable, e.g. --decode 1 --decode 10 --decode 100 --decode 1000).
    #[arg(long)]
    decode: Vec<usize>,
    /// Concurrent sequences in the decode measurement.
    #[arg(long, default_value_t = 8)]
    decode_batch: usize,
    /// Requests per decode measurement.
    #[arg(long, default_value_t = 64)]
    decode_requests: usize,
    /// Tokens generated per request (greedy, EOS ignored).
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Seed of the request streams.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the JSON goes.
    #[arg(long, default_value = "bench/results/pager_zipf.json")]
    out: PathBuf,
}

/// Runs one `adapters` subcommand.
pub fn run(cmd: AdaptersCommand) -> Result<()> {
    match cmd {
        AdaptersCommand::Synth(a) => synth(a),
        AdaptersCommand::Bench(a) => bench(a),
    }
}

fn model_path(model: &Option<PathBuf>) -> Result<PathBuf> {
    Ok(match model {
        Some(p) => p.clone(),
        None => default_model::ensure_default_model()?,
    })
}

/// The base model's shape, without loading its weights.
fn base_config(path: &Path) -> Result<LlamaConfig> {
    Ok(if path.is_dir() {
        LlamaConfig::from_hf_config(&path.join("config.json"))?
    } else {
        LlamaConfig::from_gguf(&GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?)?
    })
}

/// A random adapter on `targets` only: A uniform in ±1/sqrt(in), B uniform in ±0.01, alpha
/// 2·rank (the distributions of `adapters::synth::random_lora`).
fn synthetic(name: &str, base: &LlamaConfig, targets: &[Proj], rank: usize, seed: u64) -> LoraHost {
    let layers = openlora::adapters::synth::random_modules(base, targets, rank, seed);
    LoraHost {
        name: name.to_owned(),
        // Not written; the generation of the saved files is their content hash.
        generation: Generation([0; 32]),
        layers,
        lm_head: None,
        use_rslora: false,
        config_rank: rank,
    }
}

fn synth(a: SynthArgs) -> Result<()> {
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    if a.rank == 0 || a.rank > openlora::adapters::peft::MAX_RANK {
        bail!("--rank must be in 1..={}", openlora::adapters::peft::MAX_RANK);
    }
    let dtype = match a.dtype.as_str() {
        "f16" => SaveDtype::F16,
        "f32" => SaveDtype::F32,
        other => bail!("--dtype {other}: expected f16 or f32"),
    };
    let mut targets = Vec::new();
    for t in &a.targets {
        let p = Proj::ALL.into_iter().find(|p| p.short() == t.trim()).with_context(|| {
            format!("--targets: `{t}` is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
        })?;
        if !targets.contains(&p) {
            targets.push(p);
        }
    }
    if targets.is_empty() {
        bail!("--targets must name at least one module");
    }
    let path = model_path(&a.model)?;
    let base = base_config(&path)?;
    let base_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let width = (a.count - 1).to_string().len();
    let started = Instant::now();
    (0..a.count).into_par_iter().try_for_each(|i| -> Result<()> {
        let name = format!("{}{i:0width$}", a.prefix);
        // Distinct, well-mixed streams per (seed, index).
        let seed = a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let host = synthetic(&name, &base, &targets, a.rank, seed);
        write_peft(&a.out.join(&name), &host, dtype, &base_name)?;
        Ok(())
    })?;
    let bytes: u64 = std::fs::read_dir(&a.out)?
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::metadata(e.path().join("adapter_model.safetensors")).ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "wrote {} rank-{} adapters ({}) to {} in {:.1} s ({:.1} MB of weights in the directory)",
        a.count,
        a.rank,
        a.targets.join(","),
        a.out.display(),
        started.elapsed().as_secs_f64(),
        bytes as f64 / 1e6
    );
    Ok(())
}

/// Zipf(s) over ranks 0..n.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let w: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        Self {
            cdf: w
                .iter()
                .map(|x| {
                    acc += x / total;
                    acc
                })
                .collect(),
        }
    }

    fn sample(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.r#gen();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * q).round() as usize]
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    serde_json::json!({
        "count": v.len(),
        "p50_ms": percentile(&v, 0.5) * 1e3,
        "p90_ms": percentile(&v, 0.9) * 1e3,
        "p99_ms": percentile(&v, 0.99) * 1e3,
        "max_ms": v.last().copied().unwrap_or(f64::NAN) * 1e3,
        "mean_ms": mean * 1e3,
    })
}

fn metrics_json(p: &Pager<CpuBackend>) -> serde_json::Value {
    let m = p.metrics();
    let tier = |t: &openlora::adapters::pager::TierMetrics| {
        serde_json::json!({"resident": t.resident, "bytes": t.bytes, "budget": t.budget, "hits": t.hits,
            "misses": t.misses, "evictions": t.evictions})
    };
    serde_json::json!({"device": tier(&m.device), "host": tier(&m.host), "loads": m.loads, "prepares": m.prepares,
        "joined": m.joined, "load_errors": m.load_errors, "deduplicated": m.deduplicated,
        "load_seconds_sum": m.load_seconds.1, "load_seconds_count": m.load_seconds.2})
}

fn bench(a: BenchArgs) -> Result<()> {
    let path = model_path(&a.model)?;
    let base = base_config(&path)?;
    let mut out = serde_json::Map::new();
    out.insert("dir".into(), a.dir.display().to_string().into());
    out.insert("model".into(), path.display().to_string().into());
    out.insert("nproc".into(), std::thread::available_parallelism().map_or(0, |n| n.get()).into());
    out.insert("command".into(), std::env::args().collect::<Vec<_>>().join(" ").into());

    // 1. Registration.
    let mut times = Vec::new();
    let mut catalog = None;
    for _ in 0..a.register_repeat.max(1) {
        let t = Instant::now();
        let (c, report) = Catalog::scan(base.clone(), vec![a.dir.clone()]);
        times.push(t.elapsed().as_secs_f64());
        if let Some(e) = report.errors.first() {
            bail!("{} adapters were refused; the first: {e}", report.errors.len());
        }
        catalog = Some(c);
    }
    let catalog = Arc::new(catalog.context("no scan ran")?);
    let t = Instant::now();
    let rescan = catalog.rescan();
    let rescan_s = t.elapsed().as_secs_f64();
    let names = catalog.names();
    if names.is_empty() {
        bail!("{} holds no adapters", a.dir.display());
    }
    let per_adapter = catalog.get(&names[0]).map_or(0, |e| e.loaded_bytes);
    eprintln!(
        "registered {} adapters: {:?} s (rescan, nothing changed: {rescan_s:.3} s, {} unchanged)",
        names.len(),
        times,
        rescan.unchanged
    );
    out.insert(
        "registration".into(),
        serde_json::json!({"adapters": names.len(), "seconds": times, "rescan_unchanged_seconds": rescan_s,
            "threads": rayon::current_num_threads()}),
    );
    out.insert("adapter_loaded_bytes".into(), per_adapter.into());

    // 2. Cold loads: distinct adapters, one at a time, host tier off so each reads the disk.
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut shuffled = names.clone();
    shuffled.shuffle(&mut rng);
    let big = per_adapter * (a.cold_loads + 8);
    {
        let pager = Pager::new(catalog.clone(), CpuBackend::new(), PagerConfig::new(0, big))?;
        let mut lat = Vec::new();
        for name in shuffled.iter().cycle().take(a.cold_loads) {
            let t = Instant::now();
            let adapter = pager.acquire_blocking(name)?;
            lat.push(t.elapsed().as_secs_f64());
            drop(adapter);
        }
        let m = pager.metrics();
        let loaded: Vec<f64> = lat.clone();
        let s = summary(loaded);
        eprintln!("cold load (acquire of a cold adapter, read + hash + decode + prepare): {s}");
        out.insert(
            "cold_load".into(),
            serde_json::json!({"acquire": s, "loads": m.loads, "pager_load_seconds_mean_ms":
                m.load_seconds.1 / m.load_seconds.2.max(1) as f64 * 1e3, "note":
                "files are in the page cache if the directory was just written or scanned"}),
        );
        // From the host tier: prepare only.
        let pager = Pager::new(catalog.clone(), CpuBackend::new(), PagerConfig::new(big, per_adapter))?;
        let mut lat = Vec::new();
        let few: Vec<&String> = shuffled.iter().take(a.cold_loads.min(100)).collect();
        for name in &few {
            drop(pager.acquire_blocking(name)?);
        }
        for name in &few {
            let t = Instant::now();
            drop(pager.acquire_blocking(name)?);
            lat.push(t.elapsed().as_secs_f64());
        }
        let s = summary(lat);
        eprintln!("host-tier hit (prepare only): {s}");
        out.insert("host_hit".into(), serde_json::json!({"acquire": s, "host_hits": pager.metrics().host.hits}));
    }

    // 3. Zipf acquire throughput.
    let k = a.zipf_adapters.min(names.len());
    let active: Vec<String> = shuffled[..k].to_vec();
    let cfg = PagerConfig::new(per_adapter * a.host_adapters, per_adapter * a.device_adapters.max(a.zipf_clients));
    let pager = Pager::new(catalog.clone(), CpuBackend::new(), cfg)?;
    let zipf = Zipf::new(k, a.zipf_s);
    let clients = a.zipf_clients.max(1);
    let per_client = a.zipf_requests / clients;
    let t = Instant::now();
    let lat: Vec<f64> = (0..clients)
        .into_par_iter()
        .map(|c| -> Result<Vec<f64>> {
            let mut rng = StdRng::seed_from_u64(a.seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut lat = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let name = &active[zipf.sample(&mut rng)];
                let t = Instant::now();
                let adapter = pager.acquire_blocking(name)?;
                lat.push(t.elapsed().as_secs_f64());
                drop(adapter);
            }
            Ok(lat)
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let secs = t.elapsed().as_secs_f64();
    let n = lat.len();
    let m = metrics_json(&pager);
    let s = summary(lat);
    eprintln!("zipf({}) over {k} adapters: {n} acquires in {secs:.2} s = {:.0}/s; {s}; {m}", a.zipf_s, n as f64 / secs);
    out.insert(
        "zipf_acquire".into(),
        serde_json::json!({"adapters": k, "s": a.zipf_s, "acquires": n, "clients": clients, "seconds": secs,
            "acquires_per_s": n as f64 / secs, "host_budget_adapters": a.host_adapters,
            "device_budget_adapters": a.device_adapters, "latency": s, "pager": m}),
    );
    drop(pager);

    // 4. Batched decode through the pager.
    if !a.decode.is_empty() {
        let loaded = Arc::new(
            LoadedModel::open(&path, CpuBackend::new()).with_context(|| format!("loading {}", path.display()))?,
        );
        let mut runs = Vec::new();
        // Warm-up (thread pool, page faults), not reported.
        let warm =
            Pager::new(catalog.clone(), CpuBackend::new(), PagerConfig::new(0, per_adapter * 2 * a.decode_batch))?;
        decode_run(&loaded, &warm, &shuffled[..1], &a)?;
        drop(warm);
        for &k in &a.decode {
            let k = k.clamp(1, names.len());
            let cfg = PagerConfig::new(
                per_adapter * a.host_adapters,
                per_adapter * a.device_adapters.max(2 * a.decode_batch),
            );
            let pager = Pager::new(catalog.clone(), CpuBackend::new(), cfg)?;
            let r = decode_run(&loaded, &pager, &shuffled[..k], &a)?;
            let m = metrics_json(&pager);
            eprintln!("decode with {k} active adapters: {r}; {m}");
            runs.push(serde_json::json!({"active_adapters": k, "result": r, "pager": m}));
        }
        out.insert(
            "decode".into(),
            serde_json::json!({"batch": a.decode_batch, "requests": a.decode_requests, "tokens": a.decode_tokens,
                "zipf_s": a.zipf_s, "runs": runs}),
        );
    }

    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&serde_json::Value::Object(out))? + "\n")
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// Batched decode through the pager and the engine (the scheduler `serve` uses): at most
/// `decode_batch` sequences run at once; each of `decode_requests` requests draws its adapter
/// from Zipf over `active`, acquires it from the pager (a cold one loads on a loader thread
/// while that request waits and the engine keeps decoding the others, as in the server),
/// prefills a 16-token prompt and decodes `decode_tokens` greedy tokens. Returns generated
/// tokens per second over the whole run, the engine's steps, and the seconds requests spent
/// waiting for adapters in all.
fn decode_run(
    loaded: &Arc<LoadedModel<CpuBackend>>,
    pager: &Pager<CpuBackend>,
    active: &[String],
    a: &BenchArgs,
) -> Result<serde_json::Value> {
    const PROMPT: usize = 16;
    let batch = a.decode_batch.max(1);
    let engine = super::bench::engine(loaded, batch, a.decode_requests, PROMPT + a.decode_tokens + 1)?;
    let zipf = Zipf::new(active.len(), a.zipf_s);
    let mut rng = StdRng::seed_from_u64(a.seed);
    let picks: Vec<usize> = (0..a.decode_requests).map(|_| zipf.sample(&mut rng)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    // Twice as many clients as rows, so the queue stays full while some wait for loads.
    let per_client: Vec<Result<(usize, f64)>> = std::thread::scope(|sc| {
        let clients: Vec<_> = (0..2 * batch)
            .map(|_| {
                sc.spawn(|| -> Result<(usize, f64)> {
                    let (mut tokens, mut waited) = (0usize, 0f64);
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&pick) = picks.get(i) else { return Ok((tokens, waited)) };
                        let w = Instant::now();
                        let adapter = pager.acquire_blocking(&active[pick])?;
                        waited += w.elapsed().as_secs_f64();
                        let prompt: Vec<u32> = (0..PROMPT).map(|j| 100 + (((i + j) * 7919) % 40000) as u32).collect();
                        let mut req = Request::greedy(prompt, a.decode_tokens);
                        req.stop_at_eos = false;
                        req.adapters = vec![WeightedAdapter { adapter, weight: 1.0 }];
                        tokens += engine.submit(req)?.collect_blocking()?.tokens.len();
                        // The engine dropped the sequence and with it the adapter's pin.
                        pager.notify_released();
                    }
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a client panicked")))).collect()
    });
    let secs = t.elapsed().as_secs_f64();
    let (mut tokens_out, mut waited) = (0usize, 0f64);
    for r in per_client {
        let (t, w) = r?;
        tokens_out += t;
        waited += w;
    }
    let steps = engine.stats().steps;
    Ok(serde_json::json!({"tokens": tokens_out, "seconds": secs, "tok_s": tokens_out as f64 / secs, "steps": steps,
        "adapter_wait_seconds": waited}))
}
