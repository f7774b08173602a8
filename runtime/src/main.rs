//! The `openlora` command line.

mod adapters_cli;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use openlora::adapters::merge::{self, MajoritySign, MergeMethod, MergeRecipe};
use openlora::adapters::{AdapterRegistry, LoraHost, WeightedAdapter, synth};
use openlora::engine::generate::BLOCK_SIZE;
use openlora::engine::generate::{GenerateRequest, generate};
use openlora::engine::kv_cache::{BlockAllocator, SequenceBlocks};
use openlora::engine::sampler::SamplingParams;
use openlora::model::LoadedModel;
use openlora::model::chat_template::ChatMessage;
use openlora::model::default_model;
use openlora::model::llama::{ForwardBatch, LlamaModel};
use openlora_kernels::AttnSeq;
use openlora_kernels::{Backend, CpuBackend, DeviceBackend, DeviceRequest, Precision};

#[derive(Parser)]
#[command(name = "openlora", version, about = "Multi-LoRA inference runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download and verify the default model (SmolLM2-135M-Instruct Q4_1) into the cache.
    Fetch {
        /// Download again even if a verified copy exists.
        #[arg(long)]
        force: bool,
    },
    /// Generate a completion for one prompt and print it.
    Generate(GenerateArgs),
    /// Measure single-stream prefill and decode speed; prints one JSON line.
    Bench(BenchArgs),
    /// Serve a deployment over HTTP (OpenAI-compatible API, adapter admin, metrics).
    Serve(ServeArgs),
    /// Check or export a receipt ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Synthetic adapters and the adapter pager benchmark.
    #[command(subcommand)]
    Adapters(adapters_cli::AdaptersCommand),
    /// The CUDA backend: probe for a GPU, precompile the kernels.
    #[command(subcommand)]
    Cuda(CudaCommand),
}

#[derive(Subcommand)]
enum CudaCommand {
    /// Say whether a CUDA driver and device are usable, and which.
    Probe {
        /// Device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Compile every kernel with NVRTC into the cubin cache (no GPU needed) and print the
    /// per-kernel register/spill report.
    Compile {
        /// Architectures, comma-separated (sm_80, sm_90, ...).
        #[arg(long, default_value = "sm_80,sm_90", value_delimiter = ',')]
        arch: Vec<String>,
        /// Cache folder (default: $OPENLORA_CACHE/kernels or ~/.cache/openlora/kernels).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
}

fn run_cuda(c: CudaCommand) -> Result<()> {
    use openlora_kernels::cuda::{self, nvrtc};
    match c {
        CudaCommand::Probe { device } => match cuda::probe(device) {
            Ok(i) => {
                println!("cuda:{} {} ({}, {} MiB)", i.ordinal, i.name, i.arch(), i.total_mem >> 20);
                Ok(())
            }
            Err(e) => bail!("no usable CUDA device cuda:{device}: {e}"),
        },
        CudaCommand::Compile { arch, cache } => {
            let dir = cache.or_else(nvrtc::default_cache_dir).context("no cache folder: set --cache")?;
            for a in &arch {
                for (name, src) in nvrtc::MODULES {
                    // Compile even when cached, to print the report; then store.
                    let m = nvrtc::compile(name, src, a)?;
                    let path = dir.join(format!("{}.cubin", nvrtc::cache_key(name, src, a)));
                    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                    std::fs::write(&path, &m.cubin).with_context(|| format!("writing {}", path.display()))?;
                    for r in m.resources() {
                        println!(
                            "{a} {name:<12} {:<22} {:>4} registers, {:>3} B spill stores, {:>3} B spill loads, {:>6} B shared",
                            r.kernel, r.registers, r.spill_stores, r.spill_loads, r.shared_bytes
                        );
                    }
                }
            }
            println!("cubins in {}", dir.display());
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Check every receipt's signature, hash and chain link; names the first bad entry.
    Verify {
        /// The ledger file (STATE_DIR/ledger.jsonl).
        path: PathBuf,
        /// Require this signer (hex Ed25519 public key, as GET /v1/attribution/key serves it).
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Write the receipts as JSON lines and print per-party totals (JSON) on stdout.
    Export {
        /// The ledger file.
        path: PathBuf,
        /// Where to write the receipts (JSON lines).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The deployment file (TOML), e.g. examples/quickstart.toml.
    config: PathBuf,
    /// Listen on this address instead of the file's `server.listen` (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Prompt length for the prefill measurement (synthetic token ids, the same formula as
    /// bench/single_stream.py uses for the peer).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode (greedy, EOS ignored).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Repetitions; the best run is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// A GGUF file or an HF folder; the default model when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Instead of single-stream figures, measure batched decode of this many sequences: base
    /// model only, all rows on one LoRA adapter, and every row on a different one (synthetic
    /// rank-`--lora-rank` adapters on all projections).
    #[arg(long)]
    batch: Option<usize>,
    /// Rank of the synthetic adapters for --batch.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Decode steps timed for --batch.
    #[arg(long, default_value_t = 32)]
    steps: usize,
}

/// Batched decode: `n` sequences with 32-token prompts, then `steps` steps of one token each,
/// greedy. Returns generated tokens per second.
fn batched_decode(
    model: &LlamaModel<CpuBackend>,
    n: usize,
    steps: usize,
    adapters: &[Vec<WeightedAdapter<CpuBackend>>],
) -> Result<f64> {
    let prompt_len = 32;
    let blocks_per_seq = (prompt_len + steps + 1).div_ceil(BLOCK_SIZE);
    let mut alloc = BlockAllocator::new(n * blocks_per_seq, BLOCK_SIZE);
    let mut kv = model.alloc_kv(model.kv_layout(n * blocks_per_seq, BLOCK_SIZE))?;
    let mut seqs: Vec<SequenceBlocks> = (0..n).map(|_| SequenceBlocks::default()).collect();
    let lists: Vec<&[WeightedAdapter<CpuBackend>]> = adapters.iter().map(Vec::as_slice).collect();
    let mut step = |tokens_per_seq: &[Vec<u32>], seqs: &mut [SequenceBlocks]| -> Result<Vec<u32>> {
        let (mut tokens, mut positions, mut slots, mut spans) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (t, s) in tokens_per_seq.iter().zip(seqs.iter_mut()) {
            let start = s.len();
            spans.push((tokens.len(), t.len()));
            slots.extend(s.append(&mut alloc, t.len())?);
            tokens.extend_from_slice(t);
            positions.extend((start..start + t.len()).map(|p| p as u32));
        }
        let attn: Vec<AttnSeq<'_>> = spans
            .iter()
            .zip(seqs.iter())
            .map(|(&(q_start, q_len), s)| AttnSeq { q_start, q_len, ctx_len: s.len(), block_table: s.table() })
            .collect();
        let last: Vec<u32> = spans.iter().map(|&(s, l)| (s + l - 1) as u32).collect();
        let batch = ForwardBatch {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
            seqs: &attn,
            logits_rows: &last,
            adapters: &lists,
        };
        let logits = model.forward(&mut kv, &batch)?;
        let v = model.config.vocab_size;
        Ok(logits.chunks(v).map(|l| openlora_kernels::cpu::ops::argmax(l).unwrap_or(0) as u32).collect())
    };
    let prompts: Vec<Vec<u32>> = (0..n).map(|i| bench_prompt(prompt_len + i)[i..].to_vec()).collect();
    let mut next = step(&prompts, &mut seqs)?;
    let t = std::time::Instant::now();
    for _ in 0..steps {
        let feed: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        next = step(&feed, &mut seqs)?;
    }
    Ok((n * steps) as f64 / t.elapsed().as_secs_f64())
}

fn run_batch_bench(a: &BenchArgs, n: usize, path: &std::path::Path, loaded: &LoadedModel<CpuBackend>) -> Result<()> {
    let model = &loaded.model;
    let registry = AdapterRegistry::new(model.config.clone(), model.backend().clone());
    let synth: Vec<_> = (0..n)
        .map(|i| {
            let h = synth::random_lora(&format!("synth-{i}"), &model.config, a.lora_rank, i as u64);
            registry.insert(&h.name, &h).map(|adapter| WeightedAdapter { adapter, weight: 1.0 })
        })
        .collect::<Result<_, _>>()?;
    let base: Vec<Vec<WeightedAdapter<CpuBackend>>> = vec![vec![]; n];
    let same: Vec<Vec<WeightedAdapter<CpuBackend>>> = vec![vec![synth[0].clone()]; n];
    let distinct: Vec<Vec<WeightedAdapter<CpuBackend>>> = synth.iter().map(|w| vec![w.clone()]).collect();
    let (mut b, mut s, mut d) = (0f64, 0f64, 0f64);
    for _ in 0..a.repeat.max(1) {
        b = b.max(batched_decode(model, n, a.steps, &base)?);
        s = s.max(batched_decode(model, n, a.steps, &same)?);
        d = d.max(batched_decode(model, n, a.steps, &distinct)?);
    }
    println!(
        "{}",
        serde_json::json!({
            "engine": "openlora",
            "backend": model.backend().name(),
            "threads": rayon::current_num_threads(),
            "model": path.display().to_string(),
            "batch": n,
            "lora_rank": a.lora_rank,
            "steps": a.steps,
            "base_tok_s": b,
            "one_adapter_tok_s": s,
            "distinct_adapters_tok_s": d,
            "lora_overhead_distinct": 1.0 - d / b,
        })
    );
    Ok(())
}

/// The synthetic prompt shared with the peer benchmark: `100 + (i * 7919) % 40000`.
fn bench_prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| 100 + ((i * 7919) % 40000) as u32).collect()
}

fn run_bench(a: BenchArgs) -> Result<()> {
    init_threads(a.threads)?;
    let path = match a.model.clone() {
        Some(p) => p,
        None => default_model::ensure_default_model()?,
    };
    let loaded = LoadedModel::open(&path, CpuBackend::new()).with_context(|| format!("loading {}", path.display()))?;
    if let Some(n) = a.batch {
        if n == 0 {
            bail!("--batch must be at least 1");
        }
        return run_batch_bench(&a, n, &path, &loaded);
    }
    let run = |prompt: Vec<u32>, max_tokens: usize| {
        let req = GenerateRequest {
            prompt,
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: vec![],
            stop_at_eos: false,
        };
        generate(&loaded.model, &loaded.tokenizer, &[], &req, |_| {})
    };
    let (mut prefill, mut decode) = (0f64, 0f64);
    for _ in 0..a.repeat.max(1) {
        let g = run(bench_prompt(a.prompt_tokens), 1)?;
        prefill = prefill.max(a.prompt_tokens as f64 / g.prefill_seconds);
        let g = run(bench_prompt(8), a.gen_tokens)?;
        decode = decode.max((g.tokens.len() - 1) as f64 / g.decode_seconds);
    }
    println!(
        "{}",
        serde_json::json!({
            "engine": "openlora",
            "backend": loaded.model.backend().name(),
            "threads": rayon::current_num_threads(),
            "model": path.display().to_string(),
            "prompt_tokens": a.prompt_tokens,
            "prefill_tok_s": prefill,
            "gen_tokens": a.gen_tokens,
            "decode_tok_s": decode,
        })
    );
    Ok(())
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The prompt (raw text, or the user message with --chat).
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Frequency penalty.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Presence penalty.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Seed for sampling (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// A GGUF file or an HF folder; the default model when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to run: "cpu", "cuda:N", or "auto" (a CUDA GPU if usable, else the CPU).
    #[arg(long, default_value = "cpu")]
    device: DeviceRequest,
    /// Dense weight copies on a GPU: bf16 or f32.
    #[arg(long, default_value = "bf16", value_parser = openlora::config::parse_precision)]
    gpu_precision: Precision,
    /// Apply a LoRA adapter, optionally weighted (`NAME` or `NAME=WEIGHT`, default weight 1).
    /// Repeat to combine several: their terms add, each scaled by its weight. NAME is a folder
    /// under --adapters-dir or a path to a PEFT adapter folder.
    #[arg(long, value_name = "NAME[=WEIGHT]")]
    adapter: Vec<String>,
    /// Where adapter names are looked up (default: examples/adapters).
    #[arg(long, value_name = "DIR")]
    adapters_dir: Option<PathBuf>,
    /// Materialize one merged adapter from the --adapter list with PEFT's combination type
    /// (linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd,
    /// dare_ties_svd, magnitude_prune, magnitude_prune_svd) instead of applying them side by side.
    #[arg(long, value_name = "METHOD")]
    merge: Option<String>,
    /// Fraction of entries kept by pruning merges.
    #[arg(long, default_value_t = 1.0, requires = "merge")]
    merge_density: f64,
    /// TIES sign election: total or frequency.
    #[arg(long, default_value = "total", requires = "merge")]
    merge_majority_sign: String,
    /// Rank of *svd merges (default: the largest input rank).
    #[arg(long, requires = "merge")]
    merge_svd_rank: Option<usize>,
    /// Seed of DARE's random mask.
    #[arg(long, default_value_t = 0, requires = "merge")]
    merge_seed: u64,
    /// Print timing to stderr.
    #[arg(long)]
    verbose: bool,
}

fn init_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up the thread pool")?;
    }
    Ok(())
}

/// Loads each `NAME[=WEIGHT]` adapter for the model, merging them into one when `--merge` asks.
fn resolve_adapters(
    loaded: &LoadedModel<DeviceBackend>,
    a: &GenerateArgs,
) -> Result<Vec<WeightedAdapter<DeviceBackend>>> {
    let registry = AdapterRegistry::new(loaded.model.config.clone(), loaded.model.backend().clone());
    let dir = a.adapters_dir.clone().unwrap_or_else(|| PathBuf::from("examples/adapters"));
    let specs = &a.adapter;
    let mut hosts = Vec::new();
    let mut weights = Vec::new();
    for spec in specs {
        let (name, weight) = match spec.rsplit_once('=') {
            Some((n, w)) => {
                (n, w.parse::<f32>().with_context(|| format!("--adapter {spec}: weight `{w}` is not a number"))?)
            }
            None => (spec.as_str(), 1.0),
        };
        if !weight.is_finite() {
            bail!("--adapter {spec}: weight must be finite");
        }
        let as_path = PathBuf::from(name);
        let path = if as_path.join("adapter_config.json").exists() { as_path } else { dir.join(name) };
        if !path.join("adapter_config.json").exists() {
            bail!("--adapter {name}: no PEFT adapter (adapter_config.json) at {} or {}", name, path.display());
        }
        hosts.push(LoraHost::load(name, &path, &loaded.model.config)?);
        weights.push(weight);
    }
    if let Some(method) = &a.merge {
        if hosts.is_empty() {
            bail!("--merge needs at least one --adapter");
        }
        let majority_sign = match a.merge_majority_sign.as_str() {
            "total" => MajoritySign::Total,
            "frequency" => MajoritySign::Frequency,
            other => bail!("--merge-majority-sign `{other}`: expected total or frequency"),
        };
        let recipe = MergeRecipe {
            method: MergeMethod::parse(method)?,
            weights,
            density: a.merge_density,
            majority_sign,
            svd_rank: a.merge_svd_rank,
            seed: a.merge_seed,
        };
        let inputs: Vec<&LoraHost> = hosts.iter().collect();
        let merged = merge::merge("merged", &inputs, &recipe)?;
        return Ok(vec![WeightedAdapter { adapter: registry.insert("merged", &merged)?, weight: 1.0 }]);
    }
    hosts
        .iter()
        .zip(weights)
        .map(|(h, weight)| Ok(WeightedAdapter { adapter: registry.insert(&h.name, h)?, weight }))
        .collect()
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    init_threads(a.threads)?;
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        frequency_penalty: a.frequency_penalty,
        presence_penalty: a.presence_penalty,
        seed: a.seed,
    };
    sampling.validate()?;
    let path = match a.model.clone() {
        Some(p) => p,
        None => default_model::ensure_default_model()?,
    };
    let backend = start_device(&a.device, a.gpu_precision)?;
    let loaded = LoadedModel::open(&path, backend).with_context(|| format!("loading {}", path.display()))?;
    let adapters = resolve_adapters(&loaded, &a)?;
    let mut tokenizer = loaded.tokenizer.clone();
    let prompt_text = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = a.system {
            messages.push(ChatMessage { role: "system".into(), content: s });
        }
        messages.push(ChatMessage { role: "user".into(), content: a.prompt });
        // Chat turns end with the template's end-of-turn token as well as EOS.
        loaded.chat_template.render(&messages, true)?
    } else {
        a.prompt
    };
    if a.chat
        && let Some(id) = tokenizer.token_to_id("<|im_end|>").or_else(|| tokenizer.token_to_id("<|eot_id|>"))
    {
        tokenizer.add_eos_id(id);
    }
    let prompt = tokenizer.encode(&prompt_text, true)?;
    let req = GenerateRequest { prompt, sampling, max_tokens: a.max_tokens, stop: a.stop, stop_at_eos: true };
    let mut stdout = std::io::stdout().lock();
    let g = generate(&loaded.model, &tokenizer, &adapters, &req, |piece: &str| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    if a.verbose {
        let decoded = g.tokens.len().saturating_sub(1);
        eprintln!(
            "[{}] prompt {} tokens, prefill {:.1} tok/s; generated {} tokens, decode {:.1} tok/s; finish_reason={}",
            loaded.model.backend().name(),
            g.prompt_tokens,
            g.prompt_tokens as f64 / g.prefill_seconds.max(1e-9),
            g.tokens.len(),
            decoded as f64 / g.decode_seconds.max(1e-9),
            g.finish_reason.as_str()
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Fetch { force } => {
            let p = default_model::fetch(force)?;
            println!("{}", p.display());
            Ok(())
        }
        Command::Generate(a) => run_generate(a),
        Command::Bench(a) => run_bench(a),
        Command::Serve(a) => run_serve(a),
        Command::Ledger(c) => run_ledger(c),
        Command::Adapters(c) => adapters_cli::run(c),
        Command::Cuda(c) => run_cuda(c),
    }
}

fn run_serve(a: ServeArgs) -> Result<()> {
    use openlora::config::Deployment;
    use openlora::engine::{EngineConfig, EngineHandle};
    use openlora::service::Service;
    use std::sync::Arc;

    let mut d = Deployment::load(&a.config)?;
    if let Some(l) = a.listen {
        l.parse::<std::net::SocketAddr>()
            .with_context(|| format!("--listen {l:?} is not an address like 127.0.0.1:8000"))?;
        d.server.listen = l;
    }
    init_threads(d.model.threads)?;
    let path =
        if d.model.path == "default" { default_model::ensure_default_model()? } else { PathBuf::from(&d.model.path) };
    let model_id = d.model.name.clone().unwrap_or_else(|| {
        path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let backend = start_device(&d.engine.device_request(), d.engine.precision())?;
    let loaded =
        Arc::new(LoadedModel::open(&path, backend.clone()).with_context(|| format!("loading {}", path.display()))?);
    let e = &d.engine;
    let cfg = EngineConfig {
        block_size: e.block_size,
        max_batch_tokens: e.max_batch_tokens,
        max_running: e.max_running,
        max_waiting: e.max_waiting,
        prefix_cache: e.prefix_cache,
        ..EngineConfig::default()
    }
    .with_kv_bytes(&loaded.model.config, e.kv_cache_mib << 20);
    let engine = EngineHandle::spawn(loaded.clone(), cfg.clone())?;
    let ledger = if d.attribution.enabled {
        let dir = &d.attribution.state_dir;
        let key = openlora::attribution::load_or_create_key(&dir.join("node.key"))?;
        Some(openlora::attribution::Ledger::open(&dir.join("ledger.jsonl"), key)?)
    } else {
        None
    };
    let sha = openlora::service::weights_sha256(&path).with_context(|| format!("hashing {}", path.display()))?;
    let svc = Arc::new(Service::new(&d, loaded, model_id.clone(), engine, backend, ledger, sha)?);
    let adapters = svc.list_models(&openlora::service::Tenant::admin_view()).len() - 1;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let grace = std::time::Duration::from_secs(d.server.shutdown_grace_seconds);
    rt.block_on(async move {
        let addr = d.listen_addr();
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "openlora: serving {model_id} with {adapters} adapters on {} ({}; KV cache {} blocks of {} tokens, {} context; auth {})",
            openlora::server::describe(local),
            svc.model().model.backend().name(),
            cfg.num_blocks,
            cfg.block_size,
            svc.engine().context_limit(),
            if svc.auth_required() { "on" } else { "OFF: no [[tenants]] configured" },
        );
        openlora::server::serve(svc, listener, shutdown_signal(), grace).await?;
        eprintln!("openlora: stopped");
        Ok(())
    })
}

/// Starts the requested device; with "auto" and no usable GPU, says so in one line and uses
/// the CPU.
fn start_device(req: &DeviceRequest, precision: Precision) -> Result<DeviceBackend> {
    let (backend, fallback) =
        DeviceBackend::start(req, precision).map_err(|e| anyhow::anyhow!("device \"{req}\" could not start: {e}"))?;
    if let Some(why) = fallback {
        eprintln!("openlora: device \"auto\": no usable CUDA GPU ({why}); running on the CPU");
    }
    Ok(backend)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("openlora: shutting down; letting in-flight requests finish");
}

fn run_ledger(c: LedgerCommand) -> Result<()> {
    use openlora::attribution::{totals, verify_file};
    match c {
        LedgerCommand::Verify { path, public_key } => {
            let v = verify_file(&path, public_key.as_deref())?;
            if let Some(e) = v.error {
                bail!("{}: {e} ({} entries before it verified)", path.display(), v.receipts.len());
            }
            let key = v.receipts.first().map_or("-", |r| r.body.node_key.as_str());
            println!("ok: {} receipts, one unbroken chain, all signed by {key}", v.receipts.len());
            Ok(())
        }
        LedgerCommand::Export { path, out } => {
            let v = verify_file(&path, None)?;
            if let Some(e) = v.error {
                bail!("{}: {e}; not exporting an unverified ledger", path.display());
            }
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?,
            );
            for r in &v.receipts {
                serde_json::to_writer(&mut w, r)?;
                w.write_all(b"\n")?;
            }
            w.flush()?;
            let t: Vec<serde_json::Value> = totals(&v.receipts)
                .into_iter()
                .map(|(party, role, micros)| serde_json::json!({"party": party, "role": role, "micros": micros}))
                .collect();
            let charged: u64 = v.receipts.iter().map(|r| r.body.attribution.total_micros).sum();
            println!("{}", serde_json::json!({"receipts": v.receipts.len(), "total_micros": charged, "totals": t}));
            Ok(())
        }
    }
}
