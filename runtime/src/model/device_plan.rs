//! What a model costs in GPU memory, computed from its file alone (no GPU, no weights read):
//! `openlora cuda plan MODEL.gguf`, and the line the server prints at start on a GPU.
//!
//! Every figure comes from the same rules the CUDA backend allocates by
//! ([`openlora_kernels::cuda::weight_device_bytes`], [`gemm_scratch_bytes`], the KV block
//! size the engine sizes its pool with), so a user can see before buying a GPU whether a model
//! fits. Not counted: the CUDA context and cuBLAS's workspace (driver- and version-dependent),
//! and the memory pool's rounding.

use std::fmt;
use std::path::Path;

use openlora_kernels::DType;
use openlora_kernels::cuda::{Precision, gemm_scratch_bytes, weight_device_bytes};

use super::config::LlamaConfig;
use super::error::{ModelError, Result};
use super::gguf::GgufFile;
use crate::engine::{EngineConfig, PROMPT_LOGPROBS_CHUNK};

/// The settings a plan depends on (a deployment's `[engine]` and `[adapters]`).
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSettings {
    /// Dense weight precision (`engine.gpu_precision`).
    pub precision: Precision,
    /// KV cache elements (`engine.gpu_kv_dtype`).
    pub kv: Precision,
    /// KV cache budget in bytes (`engine.kv_cache_mib`).
    pub kv_bytes: usize,
    /// Tokens per KV block (`engine.block_size`).
    pub block_size: usize,
    /// Most tokens per forward pass (`engine.max_batch_tokens`).
    pub max_batch_tokens: usize,
    /// Most sequences at once (`engine.max_running`).
    pub max_running: usize,
    /// Adapter pool in device memory (`adapters.device_mib`).
    pub adapter_bytes: usize,
}

impl PlanSettings {
    /// The settings of deployment `d`.
    pub fn of(d: &crate::config::Deployment) -> Self {
        let e = &d.engine;
        Self {
            precision: e.precision(),
            kv: e.kv_precision(),
            kv_bytes: e.kv_cache_mib << 20,
            block_size: e.block_size,
            max_batch_tokens: e.max_batch_tokens,
            max_running: e.max_running,
            adapter_bytes: d.adapters.device_mib << 20,
        }
    }
}

/// A model's device memory, by part.
#[derive(Clone, Debug, PartialEq)]
pub struct DevicePlan {
    /// The model's hyper-parameters.
    pub config: LlamaConfig,
    /// The settings used.
    pub settings: PlanSettings,
    /// Tensors, and their bytes on the device (one copy each).
    pub tensors: usize,
    /// Bytes of the weights on the device.
    pub weights: usize,
    /// Bytes of the weights in the file.
    pub file_weights: usize,
    /// Dequantization scratch of many-row products with quantized weights.
    pub gemm_scratch: usize,
    /// Activations of the largest forward pass (plus the bf16 copy of GEMM inputs).
    pub activations: usize,
    /// Bytes of one KV block (every layer, keys and values).
    pub kv_block: usize,
    /// KV blocks in the budget.
    pub kv_blocks: usize,
    /// Adapter pool.
    pub adapters: usize,
}

impl DevicePlan {
    /// The plan for the GGUF file at `path`.
    pub fn for_gguf(path: &Path, settings: PlanSettings) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&g)?;
        let (mut weights, mut file_weights, mut gemm_scratch) = (0usize, 0usize, 0usize);
        for (name, t) in &g.tensors {
            let bad = |reason: String| ModelError::Tensor { path: path.to_path_buf(), tensor: name.clone(), reason };
            let dtype = DType::from_ggml_id(t.ggml_type)
                .ok_or_else(|| bad(format!("GGML type {} is not supported", t.ggml_type)))?;
            let cols = *t.dims.first().ok_or_else(|| bad("no dimensions".into()))? as usize;
            let rows = t.dims.iter().skip(1).product::<u64>() as usize;
            weights += weight_device_bytes(dtype, rows, cols, settings.precision);
            file_weights += dtype.row_bytes(cols).ok_or_else(|| bad(format!("rows of {cols}")))? * rows;
            if dtype.is_quantized() && rows > 1 {
                gemm_scratch = gemm_scratch.max(gemm_scratch_bytes(rows, cols, settings.precision));
            }
        }
        let c = &config;
        let (h, qd, kvd, ffn) =
            (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        let n = settings.max_batch_tokens;
        // The forward pass's buffers (llama.rs): x, normed, proj (h); q, attn (qd); k, v (kvd);
        // gate, up, act (ffn); the logits of at most every running sequence plus one prompt
        // chunk scored; the split-decode partials of every running row.
        let per_row = 3 * h + 2 * qd + 2 * kvd + 3 * ffn;
        let logits_rows = (settings.max_running + PROMPT_LOGPROBS_CHUNK).min(n);
        let partials = settings.max_running * c.num_heads * 32 * (c.head_dim + 2);
        let x_bf16 = if settings.precision == Precision::Bf16 { n * h.max(qd).max(ffn) * 2 } else { 0 };
        let activations = (n * per_row + logits_rows * (2 * h + c.vocab_size) + partials) * 4 + x_bf16;
        let value_bytes = if settings.kv == Precision::Bf16 { 2 } else { 4 };
        let kv_block = EngineConfig::block_bytes(c, settings.block_size, value_bytes);
        Ok(Self {
            tensors: g.tensors.len(),
            kv_blocks: settings.kv_bytes / kv_block.max(1),
            adapters: settings.adapter_bytes,
            config,
            settings,
            weights,
            file_weights,
            gemm_scratch,
            activations,
            kv_block,
        })
    }

    /// Bytes of the KV pools.
    pub fn kv(&self) -> usize {
        self.kv_blocks * self.kv_block
    }

    /// Every counted part together.
    pub fn total(&self) -> usize {
        self.weights + self.gemm_scratch + self.activations + self.kv() + self.adapters
    }

    /// Tokens the KV pools hold.
    pub fn kv_tokens(&self) -> usize {
        self.kv_blocks * self.settings.block_size
    }
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

impl fmt::Display for DevicePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        let c = &self.config;
        writeln!(
            f,
            "weights       {:>12}  {} tensors, one copy each ({} in the file; dense copies in {})",
            mib(self.weights),
            self.tensors,
            mib(self.file_weights),
            s.precision.name()
        )?;
        writeln!(f, "gemm scratch  {:>12}  quantized rows dequantized per slice for prefill", mib(self.gemm_scratch))?;
        writeln!(
            f,
            "activations   {:>12}  a forward pass of {} tokens, {} sequences",
            mib(self.activations),
            s.max_batch_tokens,
            s.max_running
        )?;
        writeln!(
            f,
            "kv cache      {:>12}  {} blocks of {} tokens ({} tokens, {} per block, {} keys and values, {} layers)",
            mib(self.kv()),
            self.kv_blocks,
            s.block_size,
            self.kv_tokens(),
            mib(self.kv_block),
            s.kv.name(),
            c.num_layers
        )?;
        writeln!(f, "adapter pool  {:>12}  adapters.device_mib", mib(self.adapters))?;
        write!(f, "total         {:>12}  plus the CUDA context and cuBLAS workspace (not counted)", mib(self.total()))
    }
}
