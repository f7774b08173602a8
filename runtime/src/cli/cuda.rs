//! `openlora cuda`: probe for a GPU, precompile the kernels, plan a model's device memory (the
//! last two need no GPU).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum CudaCommand {
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
    /// What serving a GGUF model takes in GPU memory (weights, scratch, activations, KV cache,
    /// adapter pool), from the file alone: no GPU needed. Settings come from a deployment file
    /// (`--deployment`), else the defaults, and the flags below override them.
    Plan {
        /// The GGUF file, or "default" (the default model, fetched if missing).
        model: String,
        /// Take `[engine]` and `[adapters]` settings from this deployment file.
        #[arg(long, value_name = "FILE.toml")]
        deployment: Option<PathBuf>,
        /// Dense weight precision: bf16 or f32 (engine.gpu_precision).
        #[arg(long)]
        precision: Option<String>,
        /// KV cache elements: f32 or bf16 (engine.gpu_kv_dtype).
        #[arg(long)]
        kv_dtype: Option<String>,
        /// KV cache budget in MiB (engine.kv_cache_mib).
        #[arg(long)]
        kv_cache_mib: Option<usize>,
        /// Most tokens per forward pass (engine.max_batch_tokens).
        #[arg(long)]
        max_batch_tokens: Option<usize>,
        /// Adapter pool in MiB (adapters.device_mib).
        #[arg(long)]
        adapter_mib: Option<usize>,
        /// GPU memory in MiB: also say whether the plan fits, and how much is left.
        #[arg(long)]
        gpu_mib: Option<usize>,
    },
}

pub fn run(c: CudaCommand) -> Result<()> {
    use openlora_kernels::cuda::{self, nvrtc};
    match c {
        CudaCommand::Plan {
            model,
            deployment,
            precision,
            kv_dtype,
            kv_cache_mib,
            max_batch_tokens,
            adapter_mib,
            gpu_mib,
        } => {
            let d = match &deployment {
                Some(p) => openlora::config::Deployment::load(p)?,
                None => openlora::config::Deployment::default(),
            };
            let parse = |v: &str, what: &str| {
                openlora::config::parse_precision(v).map_err(|r| anyhow::anyhow!("--{what}: {r}"))
            };
            let mut settings = openlora::model::device_plan::PlanSettings::of(&d);
            if let Some(p) = &precision {
                settings.precision = parse(p, "precision")?;
            }
            if let Some(p) = &kv_dtype {
                settings.kv = parse(p, "kv-dtype")?;
            }
            settings.kv_bytes = kv_cache_mib.map_or(settings.kv_bytes, |m| m << 20);
            settings.max_batch_tokens = max_batch_tokens.unwrap_or(settings.max_batch_tokens);
            settings.adapter_bytes = adapter_mib.map_or(settings.adapter_bytes, |m| m << 20);
            let path = if model == "default" {
                openlora::model::default_model::ensure_default_model()?
            } else {
                PathBuf::from(&model)
            };
            let plan = openlora::model::device_plan::DevicePlan::for_gguf(&path, settings)
                .with_context(|| format!("planning {}", path.display()))?;
            println!("{}", path.display());
            println!("{plan}");
            if let Some(g) = gpu_mib {
                let have = g << 20;
                let need = plan.total();
                if need <= have {
                    println!(
                        "fits in {g} MiB: {:.1} MiB left for the CUDA context and more",
                        (have - need) as f64 / 1048576.0
                    );
                } else {
                    bail!("does not fit in {g} MiB: {:.1} MiB short", (need - have) as f64 / 1048576.0);
                }
            }
            Ok(())
        }
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
