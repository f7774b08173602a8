//! Where a model's tensors come from: one trait over GGUF files and HF safetensors folders.
//!
//! The forward pass asks for tensors by their HF names (`model.layers.3.self_attn.q_proj.weight`);
//! each source maps those to its own naming. Both keep the file memory-mapped and hand out
//! zero-copy [`HostWeight`]s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openlora_kernels::{DType, HostWeight, SharedBytes};

use super::config::{Architecture, LlamaConfig};
use super::error::{ModelError, Result};
use super::gguf::GgufFile;

/// A source of named tensors.
pub trait TensorSource {
    /// The file or folder, for error messages.
    fn path(&self) -> &Path;
    /// The tensor with HF name `name`, or `None` if absent.
    fn tensor(&self, name: &str) -> Result<Option<HostWeight>>;
    /// Whether GGUF's llama row permutation of q/k must be undone for `cfg`.
    fn needs_qk_unpermute(&self, cfg: &LlamaConfig) -> bool;
}

/// Maps an HF tensor name to llama.cpp's GGUF name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

impl TensorSource for GgufFile {
    fn path(&self) -> &Path {
        GgufFile::path(self)
    }

    fn tensor(&self, name: &str) -> Result<Option<HostWeight>> {
        match gguf_name(name) {
            Some(g) => GgufFile::tensor(self, &g),
            None => Ok(None),
        }
    }

    fn needs_qk_unpermute(&self, cfg: &LlamaConfig) -> bool {
        // llama.cpp's converter permutes q/k rows for its interleaved RoPE only for `llama`.
        cfg.arch == Architecture::Llama
    }
}

/// An HF model folder with one or more `*.safetensors` files, memory-mapped.
pub struct SafetensorsFolder {
    dir: PathBuf,
    /// Tensor name -> (file index, dtype, shape, absolute byte range).
    index: HashMap<String, (usize, safetensors::Dtype, Vec<usize>, std::ops::Range<usize>)>,
    files: Vec<(PathBuf, SharedBytes)>,
}

impl SafetensorsFolder {
    /// Opens every `*.safetensors` file in `dir` (the shards named by
    /// `model.safetensors.index.json` when it exists).
    pub fn open(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let index_path = dir.join("model.safetensors.index.json");
        let mut names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io(&index_path))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Malformed { path: index_path.clone(), reason: e.to_string() })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Malformed {
                path: index_path.clone(),
                reason: "no `weight_map` object".into(),
            })?;
            let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(str::to_owned)).collect();
            shards.sort();
            shards.dedup();
            shards
        } else {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(io(dir))? {
                let entry = entry.map_err(io(dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") {
                    found.push(name);
                }
            }
            found.sort();
            found
        };
        if names.is_empty() {
            return Err(ModelError::Malformed { path: dir.to_path_buf(), reason: "no *.safetensors files".into() });
        }
        names.retain(|n| !n.contains('/') && !n.contains(".."));
        let mut index = HashMap::new();
        let mut files = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let file = std::fs::File::open(&path).map_err(io(&path))?;
            // SAFETY: read-only map; see GgufFile::open.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&path))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| ModelError::Malformed { path: path.clone(), reason: format!("{e:?}") })?;
            let base = 8 + header_len;
            for (tname, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                index.insert(tname, (files.len(), info.dtype, info.shape.clone(), base + s..base + e));
            }
            files.push((path, Arc::new(map) as SharedBytes));
        }
        Ok(Self { dir: dir.to_path_buf(), index, files })
    }
}

impl TensorSource for SafetensorsFolder {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn tensor(&self, name: &str) -> Result<Option<HostWeight>> {
        let Some((fi, dtype, shape, range)) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, bytes) = &self.files[*fi];
        let terr = |reason: String| ModelError::Tensor { path: path.clone(), tensor: name.to_owned(), reason };
        let dt = match dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => return Err(terr(format!("dtype {other:?} is not supported (f32, f16, bf16)"))),
        };
        let (rows, cols) = match shape.as_slice() {
            [c] => (1, *c),
            [r, c] => (*r, *c),
            other => return Err(terr(format!("shape {other:?} is not 1-D or 2-D"))),
        };
        HostWeight::new(dt, rows, cols, bytes.clone(), range.clone()).map(Some).map_err(|e| terr(e.to_string()))
    }

    fn needs_qk_unpermute(&self, _cfg: &LlamaConfig) -> bool {
        false
    }
}
