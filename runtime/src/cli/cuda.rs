//! `openlora cuda`: probe for a GPU, precompile the kernels (no GPU needed).

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
}

pub fn run(c: CudaCommand) -> Result<()> {
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
