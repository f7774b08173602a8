//! `openlora generate`: one prompt, printed as it streams. It runs in process on the same
//! service and engine as `openlora serve`, so a deployment's plugins, visibility rules and
//! receipts apply exactly as they do to an HTTP request; without `--deployment` it serves the
//! model alone (no plugins, no receipts) with the adapters under `--adapters-dir`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use openlora::config::Deployment;
use openlora::model::chat_template::ChatMessage;
use openlora::service::{AdapterChoice, GenerateRequest, MergeSpec, PromptInput, SamplingParams, ServiceEvent, Tenant};
use openlora_kernels::DeviceRequest;

#[derive(clap::Args)]
pub struct GenerateArgs {
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
    /// Walk exactly the path an HTTP request takes with this deployment: its model, engine
    /// settings, adapters and their visibility, plugins and receipts (appended to its ledger),
    /// acting as the deployment's operator (an admin identity named `cli`).
    #[arg(long, value_name = "FILE.toml", conflicts_with_all = ["model", "threads", "device", "gpu_precision", "gpu_kv_dtype", "cpu_activations", "adapters_dir"])]
    deployment: Option<PathBuf>,
    /// A GGUF file or an HF folder; the default model when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to run: "cpu", "cuda:N", or "auto" (a CUDA GPU if usable, else the CPU).
    #[arg(long)]
    device: Option<DeviceRequest>,
    /// Dense weight copies on a GPU: bf16 or f32.
    #[arg(long, value_parser = ["bf16", "f32"])]
    gpu_precision: Option<String>,
    /// KV cache elements on a GPU: f32 or bf16.
    #[arg(long, value_parser = ["bf16", "f32"])]
    gpu_kv_dtype: Option<String>,
    /// Activations of the CPU's block-quantized matmuls: f32 (the reference) or int8.
    #[arg(long, value_parser = ["f32", "int8"])]
    cpu_activations: Option<String>,
    /// Apply a LoRA adapter, optionally weighted (`NAME` or `NAME=WEIGHT`, default weight 1).
    /// Repeat to combine several: their terms add, each scaled by its weight. NAME is a folder
    /// under --adapters-dir or a path to a PEFT adapter folder.
    #[arg(long, value_name = "NAME[=WEIGHT]")]
    adapter: Vec<String>,
    /// Where adapter names are looked up (default: examples/adapters; with --deployment, its
    /// `adapters.dirs`).
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

/// The deployment the command runs: the file, or one made from the flags.
fn deployment(a: &GenerateArgs) -> Result<Deployment> {
    if let Some(path) = &a.deployment {
        return Ok(Deployment::load(path)?);
    }
    let mut d = Deployment::default();
    d.attribution.enabled = false;
    d.model.path = a.model.as_ref().map_or_else(|| "default".to_owned(), |p| p.display().to_string());
    d.model.threads = a.threads;
    d.engine.device = a.device.as_ref().map_or_else(|| "cpu".to_owned(), ToString::to_string);
    d.engine.gpu_precision = a.gpu_precision.clone().unwrap_or_else(|| "bf16".to_owned());
    d.engine.gpu_kv_dtype = a.gpu_kv_dtype.clone().unwrap_or_else(|| "f32".to_owned());
    d.engine.cpu_activations = a.cpu_activations.clone().unwrap_or_else(|| "f32".to_owned());
    let dir = a.adapters_dir.clone().unwrap_or_else(|| PathBuf::from("examples/adapters"));
    d.adapters.dirs = if dir.is_dir() { vec![dir] } else { Vec::new() };
    Ok(d)
}

/// `NAME[=WEIGHT]`.
fn adapter_spec(spec: &str) -> Result<(String, f32)> {
    let (name, weight) = match spec.rsplit_once('=') {
        Some((n, w)) => {
            (n, w.parse::<f32>().with_context(|| format!("--adapter {spec}: weight `{w}` is not a number"))?)
        }
        None => (spec, 1.0),
    };
    if !weight.is_finite() {
        bail!("--adapter {spec}: weight must be finite");
    }
    Ok((name.to_owned(), weight))
}

pub fn run(a: GenerateArgs) -> Result<()> {
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
    let majority_sign = match a.merge_majority_sign.as_str() {
        m @ ("total" | "frequency") => m.to_owned(),
        other => bail!("--merge-majority-sign `{other}`: expected total or frequency"),
    };
    if a.merge.is_some() && a.adapter.is_empty() {
        bail!("--merge needs at least one --adapter");
    }
    let d = deployment(&a)?;
    let svc = super::start_service(&d)?;
    let operator = Arc::new(Tenant::local_admin("cli"));
    let mut choices = Vec::new();
    for spec in &a.adapter {
        let (name, weight) = adapter_spec(spec)?;
        // A path to a PEFT folder that is not a registered name: register it under its folder name.
        let as_path = Path::new(&name);
        let registered = svc.pager().catalog().get(&name).is_some();
        let name = if !registered && as_path.join("adapter_config.json").exists() {
            let folder = as_path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .with_context(|| format!("--adapter {name}: not a folder name"))?;
            svc.load_adapter(&operator, &folder, as_path).with_context(|| format!("--adapter {name}"))?;
            folder
        } else if !registered {
            let dirs: Vec<String> = d.adapters.dirs.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "--adapter {name}: no PEFT adapter (adapter_config.json) named {name} in [{}] or at that path",
                dirs.join(", ")
            );
        } else {
            name
        };
        choices.push(AdapterChoice { name, weight });
    }
    let prompt = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", &a.prompt));
        PromptInput::Chat(messages)
    } else {
        PromptInput::Text(a.prompt.clone())
    };
    let mut req = GenerateRequest::new(svc.model_id(), prompt);
    if let [only] = choices.as_slice()
        && only.weight == 1.0
        && a.merge.is_none()
    {
        // What a client sends as `"model": "NAME"`.
        req.model = only.name.clone();
    } else {
        req.adapters = choices;
    }
    req.merge = a.merge.as_ref().map(|method| MergeSpec {
        method: method.clone(),
        density: Some(a.merge_density),
        majority_sign_method: Some(majority_sign.clone()),
        svd_rank: a.merge_svd_rank,
        seed: Some(a.merge_seed),
    });
    req.max_tokens = Some(a.max_tokens);
    req.sampling = sampling;
    req.stop = a.stop.clone();
    let started = Instant::now();
    let mut journey = svc.generate(&operator, req)?;
    let rt = tokio::runtime::Builder::new_current_thread().build().context("starting the runtime")?;
    let mut stdout = std::io::stdout().lock();
    let (mut first, mut tokens, mut finish, mut receipt) = (None, 0usize, "stop", None);
    rt.block_on(async {
        while let Some(e) = journey.next().await {
            match e {
                ServiceEvent::Token { text, .. } => {
                    first.get_or_insert_with(|| started.elapsed().as_secs_f64());
                    tokens += 1;
                    let _ = stdout.write_all(text.as_bytes());
                    let _ = stdout.flush();
                }
                ServiceEvent::ChoiceFinished { text, reason, .. } => {
                    let _ = stdout.write_all(text.as_bytes());
                    finish = reason.as_str();
                }
                ServiceEvent::Done { receipt: r, .. } => receipt = r,
                ServiceEvent::PromptLogprobs { .. } => {}
                ServiceEvent::Failed(e) => return Err(anyhow::Error::new(e)),
            }
        }
        Ok(())
    })?;
    let _ = writeln!(stdout);
    if let Some(id) = &receipt {
        eprintln!("openlora: receipt {id} in {}", d.attribution.state_dir.join("ledger.jsonl").display());
    }
    if a.verbose {
        let prefill = first.unwrap_or(0.0);
        let decode = started.elapsed().as_secs_f64() - prefill;
        let prompt_tokens = journey.prompt_tokens();
        eprintln!(
            "[{}] prompt {prompt_tokens} tokens, prefill {:.1} tok/s; generated {tokens} tokens, decode {:.1} tok/s; finish_reason={finish}",
            svc.backend_name(),
            prompt_tokens as f64 / prefill.max(1e-9),
            tokens.saturating_sub(1) as f64 / decode.max(1e-9),
        );
    }
    Ok(())
}
