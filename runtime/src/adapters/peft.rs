//! Reading PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) and checking
//! them against the base model.
//!
//! Everything a serving process should refuse is refused here, with the adapter, the tensor and
//! the problem named: another base (shapes that do not fit), unknown modules, ranks that
//! disagree with the config, non-finite weights, and PEFT variants we do not run (DoRA,
//! fan-in-fan-out layouts, LoRA biases, `modules_to_save`, embedding LoRA).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use openlora_kernels::DType;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Generation, Proj};
use crate::model::config::LlamaConfig;

/// A tensor's shape and f32 values.
/// Shape, values, and the precision they were stored in.
type ShapedTensor = (Vec<usize>, Vec<f32>, DType);

/// Largest rank accepted.
pub const MAX_RANK: usize = 256;

/// An adapter was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A file could not be read.
    #[error("adapter `{adapter}`: {path}: {source}")]
    Io {
        /// The adapter's name.
        adapter: String,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config is invalid or asks for an unsupported variant.
    #[error("adapter `{adapter}`: adapter_config.json: `{key}`: {reason}")]
    Config {
        /// The adapter's name.
        adapter: String,
        /// The config key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor is malformed or does not fit the base model.
    #[error("adapter `{adapter}`: tensor `{tensor}`: {reason}")]
    Invalid {
        /// The adapter's name.
        adapter: String,
        /// The tensor (empty when the problem is not one tensor's).
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A merge request is invalid.
    #[error("merge: {0}")]
    Merge(String),
    /// No adapter is registered under this name.
    #[error("adapter `{0}` is not loaded")]
    NotFound(String),
}

/// One target module's weights in host memory (f32, row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModuleHost {
    /// Rank.
    pub rank: usize,
    /// Input features.
    pub in_dim: usize,
    /// Output features.
    pub out_dim: usize,
    /// `lora_alpha` after `alpha_pattern`.
    pub alpha: f32,
    /// The scale applied to `B·A`: `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
    pub scale: f32,
    /// `[rank, in_dim]`.
    pub a: Vec<f32>,
    /// `[out_dim, rank]`.
    pub b: Vec<f32>,
    /// The precision A and B are stored in (f32, f16 or bf16: the file's, the wider of the two
    /// when they differ; f32 for computed adapters). Backends hold them in it: f16/bf16 values
    /// read into f32 convert back without loss.
    pub dtype: DType,
}

impl LoraModuleHost {
    /// The dense update `scale * B·A`, `[out_dim, in_dim]`.
    pub fn delta(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.out_dim * self.in_dim];
        for o in 0..self.out_dim {
            let row = &mut d[o * self.in_dim..(o + 1) * self.in_dim];
            for r in 0..self.rank {
                let bv = self.b[o * self.rank + r] * self.scale;
                if bv != 0.0 {
                    for (x, av) in row.iter_mut().zip(&self.a[r * self.in_dim..(r + 1) * self.in_dim]) {
                        *x += bv * av;
                    }
                }
            }
        }
        d
    }
}

/// An adapter in host memory.
#[derive(Clone, Debug)]
pub struct LoraHost {
    /// The name it was loaded under.
    pub name: String,
    /// Content hash of config and weights (or, for a merge, of its recipe and inputs).
    pub generation: Generation,
    /// `layers[l][proj.index()]`.
    pub layers: Vec<[Option<LoraModuleHost>; 7]>,
    /// LoRA on the LM head.
    pub lm_head: Option<LoraModuleHost>,
    /// Whether the config scales by `alpha / sqrt(r)` (rsLoRA); PEFT carries it into merges.
    pub use_rslora: bool,
    /// The config-level rank PEFT's merges use (`r`, or the largest `rank_pattern` value).
    pub config_rank: usize,
}

impl LoraHost {
    /// Bytes of f32 weights.
    pub fn bytes(&self) -> usize {
        self.modules().map(|(_, m)| (m.a.len() + m.b.len()) * 4).sum()
    }

    /// Every module with its PEFT-style name (`model.layers.3.self_attn.q_proj`, `lm_head`).
    pub fn modules(&self) -> impl Iterator<Item = (String, &LoraModuleHost)> {
        let layers = self.layers.iter().enumerate().flat_map(|(l, mods)| {
            Proj::ALL
                .iter()
                .filter_map(move |p| mods[p.index()].as_ref().map(|m| (format!("model.layers.{l}.{}", p.path()), m)))
        });
        layers.chain(self.lm_head.iter().map(|m| ("lm_head".to_owned(), m)))
    }

    /// The largest rank of any module.
    pub fn max_rank(&self) -> usize {
        self.modules().map(|(_, m)| m.rank).max().unwrap_or(0)
    }
}

#[derive(Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f32>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    bias: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    alpha_pattern: HashMap<String, f32>,
}

/// PEFT's pattern rule: `key` applies to module `name` when `name` matches `(.*\.)?(key)$`.
fn pattern_value<T: Copy>(patterns: &HashMap<String, T>, name: &str) -> Option<T> {
    // PEFT takes the first matching key in dict order, and saves configs with sorted keys.
    let mut keys: Vec<&String> = patterns.keys().collect();
    keys.sort();
    for k in keys {
        let matched = match regex::Regex::new(&format!(r"^(.*\.)?({k})$")) {
            Ok(re) => re.is_match(name),
            Err(_) => name == k.as_str() || name.ends_with(&format!(".{k}")),
        };
        if matched {
            return patterns.get(k).copied();
        }
    }
    None
}

/// Where a tensor name points.
enum Target {
    Layer(usize, Proj),
    LmHead,
}

fn parse_tensor_name(name: &str) -> Option<(Target, bool)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let (module, ab) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, true)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, false)
    };
    if module == "lm_head" {
        return Some((Target::LmHead, ab));
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, path) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let proj = Proj::ALL.into_iter().find(|p| p.path() == path)?;
    Some((Target::Layer(layer, proj), ab))
}

impl LoraHost {
    /// Loads the PEFT adapter in `dir` under `name`, checking it against `base`.
    pub fn load(name: &str, dir: &Path, base: &LlamaConfig) -> Result<Self, AdapterError> {
        let io = |path: PathBuf| move |source| AdapterError::Io { adapter: name.to_owned(), path, source };
        let cfg_path = dir.join("adapter_config.json");
        let cfg_bytes = std::fs::read(&cfg_path).map_err(io(cfg_path.clone()))?;
        let w_path = dir.join("adapter_model.safetensors");
        let w_bytes = std::fs::read(&w_path).map_err(io(w_path.clone()))?;
        Self::from_bytes(name, &cfg_bytes, &w_bytes, base)
    }

    /// Parses an adapter from its two files' contents.
    pub fn from_bytes(name: &str, config: &[u8], weights: &[u8], base: &LlamaConfig) -> Result<Self, AdapterError> {
        let cerr =
            |key: &str, reason: String| AdapterError::Config { adapter: name.to_owned(), key: key.to_owned(), reason };
        let terr = |tensor: &str, reason: String| AdapterError::Invalid {
            adapter: name.to_owned(),
            tensor: tensor.to_owned(),
            reason,
        };
        // The whole document is read as the catalog reads it when it registers the adapter (valid
        // UTF-8 and numbers in range in the keys skipped too; the last of duplicate keys wins),
        // so the two never disagree on what is JSON.
        let json: serde_json::Value = serde_json::from_slice(config).map_err(|e| cerr("(json)", e.to_string()))?;
        let cfg: PeftConfig = serde_json::from_value(json).map_err(|e| cerr("(json)", e.to_string()))?;
        if let Some(t) = &cfg.peft_type
            && t != "LORA"
        {
            return Err(cerr("peft_type", format!("`{t}` is not supported (only LORA)")));
        }
        if cfg.use_dora {
            return Err(cerr("use_dora", "DoRA adapters are not supported".into()));
        }
        if cfg.fan_in_fan_out {
            return Err(cerr("fan_in_fan_out", "transposed (Conv1D-style) weights are not supported".into()));
        }
        if cfg.bias.as_deref().is_some_and(|b| b != "none") || cfg.lora_bias {
            return Err(cerr("bias", "LoRA bias terms are not supported".into()));
        }
        if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(cerr("modules_to_save", "full-module replacements are not supported".into()));
        }
        let r = cfg.r.ok_or_else(|| cerr("r", "missing".into()))?;
        let alpha = cfg.lora_alpha.unwrap_or(8.0);
        if !alpha.is_finite() {
            return Err(cerr("lora_alpha", format!("{alpha} is not finite")));
        }

        let st = safetensors::SafeTensors::deserialize(weights)
            .map_err(|e| terr("", format!("adapter_model.safetensors is malformed: {e:?}")))?;

        // Collect A and B per module.
        let mut pending: HashMap<String, (Option<ShapedTensor>, Option<ShapedTensor>)> = HashMap::new();
        let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
        names.sort();
        for tname in &names {
            let view = st.tensor(tname).map_err(|e| terr(tname, format!("{e:?}")))?;
            if tname.contains("lora_embedding") {
                return Err(terr(tname, "embedding LoRA is not supported".into()));
            }
            if tname.ends_with(".base_layer.weight") {
                // PEFT saves a copy of a targeted tied LM head's base weight; the base model
                // already has it.
                continue;
            }
            if tname.contains("lora_magnitude_vector") {
                return Err(terr(tname, "DoRA magnitude vectors are not supported".into()));
            }
            let Some((_, is_a)) = parse_tensor_name(tname) else {
                return Err(terr(
                    tname,
                    "not a LoRA weight of a known module (q/k/v/o/gate/up/down projections, lm_head)".into(),
                ));
            };
            let stored = match view.dtype() {
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                _ => DType::F32,
            };
            let values = to_f32(view.dtype(), view.data())
                .ok_or_else(|| terr(tname, format!("dtype {:?} is not supported (f32, f16, bf16)", view.dtype())))?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(terr(tname, format!("non-finite value {} at index {i}", values[i])));
            }
            let module = tname
                .strip_prefix("base_model.model.")
                .unwrap_or(tname)
                .trim_end_matches(".weight")
                .trim_end_matches(".lora_A")
                .trim_end_matches(".lora_B")
                .to_owned();
            let entry = pending.entry(module).or_default();
            let slot = if is_a { &mut entry.0 } else { &mut entry.1 };
            *slot = Some((view.shape().to_vec(), values, stored));
        }
        if pending.is_empty() {
            return Err(terr("", "the adapter has no LoRA weights".into()));
        }

        let mut layers: Vec<[Option<LoraModuleHost>; 7]> = (0..base.num_layers).map(|_| Default::default()).collect();
        let mut lm_head = None;
        let mut modules: Vec<_> = pending.into_iter().collect();
        modules.sort_by(|a, b| a.0.cmp(&b.0));
        for (module, (a, b)) in modules {
            let a_name = format!("{module}.lora_A.weight");
            let b_name = format!("{module}.lora_B.weight");
            let (a_shape, a, a_dtype) =
                a.ok_or_else(|| terr(&a_name, "missing (lora_B present without lora_A)".into()))?;
            let (b_shape, b, b_dtype) =
                b.ok_or_else(|| terr(&b_name, "missing (lora_A present without lora_B)".into()))?;
            let dtype = if a_dtype == b_dtype { a_dtype } else { DType::F32 };
            let Some((target, _)) = parse_tensor_name(&a_name) else {
                return Err(terr(&a_name, "unknown module".into()));
            };
            let (in_dim, out_dim) = match target {
                Target::Layer(l, p) => {
                    if l >= base.num_layers {
                        return Err(terr(
                            &a_name,
                            format!("layer {l} does not exist; the base model has {} layers", base.num_layers),
                        ));
                    }
                    proj_dims(base, p)
                }
                Target::LmHead => (base.hidden_size, base.vocab_size),
            };
            let [ar, ac] = a_shape[..] else {
                return Err(terr(&a_name, format!("shape {a_shape:?} is not 2-D")));
            };
            let [br, bc] = b_shape[..] else {
                return Err(terr(&b_name, format!("shape {b_shape:?} is not 2-D")));
            };
            if ac != in_dim {
                return Err(terr(
                    &a_name,
                    format!(
                        "shape [{ar}, {ac}] does not fit the base model: input features are {in_dim} (an adapter for another base?)"
                    ),
                ));
            }
            if br != out_dim {
                return Err(terr(
                    &b_name,
                    format!(
                        "shape [{br}, {bc}] does not fit the base model: output features are {out_dim} (an adapter for another base?)"
                    ),
                ));
            }
            if bc != ar {
                return Err(terr(&b_name, format!("rank {bc} differs from lora_A's rank {ar}")));
            }
            let rank = ar;
            let want_rank = pattern_value(&cfg.rank_pattern, &module).unwrap_or(r);
            if rank != want_rank {
                return Err(terr(
                    &a_name,
                    format!("rank {rank} does not match the config's rank {want_rank} for this module"),
                ));
            }
            if rank == 0 || rank > MAX_RANK {
                return Err(terr(&a_name, format!("rank {rank} is outside 1..={MAX_RANK}")));
            }
            let m_alpha = pattern_value(&cfg.alpha_pattern, &module).unwrap_or(alpha);
            let scale = if cfg.use_rslora { m_alpha / (rank as f32).sqrt() } else { m_alpha / rank as f32 };
            let host = LoraModuleHost { rank, in_dim, out_dim, alpha: m_alpha, scale, a, b, dtype };
            match target {
                Target::Layer(l, p) => layers[l][p.index()] = Some(host),
                Target::LmHead => lm_head = Some(host),
            }
        }

        let mut h = Sha256::new();
        h.update(b"openlora-peft-lora-v1\0");
        h.update((config.len() as u64).to_le_bytes());
        h.update(config);
        h.update(weights);
        let config_rank = cfg.rank_pattern.values().copied().chain([r]).max().unwrap_or(r);
        Ok(Self {
            name: name.to_owned(),
            generation: Generation(h.finalize().into()),
            layers,
            lm_head,
            use_rslora: cfg.use_rslora,
            config_rank,
        })
    }
}

/// `(in_features, out_features)` of a projection in `base`.
pub fn proj_dims(base: &LlamaConfig, p: Proj) -> (usize, usize) {
    let (h, qd, kvd, f) =
        (base.hidden_size, base.num_heads * base.head_dim, base.num_kv_heads * base.head_dim, base.intermediate_size);
    match p {
        Proj::Q => (h, qd),
        Proj::K | Proj::V => (h, kvd),
        Proj::O => (qd, h),
        Proj::Gate | Proj::Up => (h, f),
        Proj::Down => (f, h),
    }
}

fn to_f32(dtype: safetensors::Dtype, data: &[u8]) -> Option<Vec<f32>> {
    use half::{bf16, f16};
    Some(match dtype {
        safetensors::Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        safetensors::Dtype::F16 => data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        safetensors::Dtype::BF16 => data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_peft() {
        let mut p = HashMap::new();
        p.insert("v_proj".to_owned(), 2);
        p.insert("model.layers.1.mlp.down_proj".to_owned(), 6);
        assert_eq!(pattern_value(&p, "model.layers.0.self_attn.v_proj"), Some(2));
        assert_eq!(pattern_value(&p, "model.layers.1.mlp.down_proj"), Some(6));
        assert_eq!(pattern_value(&p, "model.layers.0.mlp.down_proj"), None);
        assert_eq!(pattern_value(&p, "model.layers.0.self_attn.q_proj"), None);
    }

    #[test]
    fn tensor_names_map_to_modules() {
        assert!(matches!(
            parse_tensor_name("base_model.model.model.layers.3.mlp.up_proj.lora_A.weight"),
            Some((Target::Layer(3, Proj::Up), true))
        ));
        assert!(matches!(parse_tensor_name("base_model.model.lm_head.lora_B.weight"), Some((Target::LmHead, false))));
        assert!(parse_tensor_name("base_model.model.model.layers.3.mlp.act.lora_A.weight").is_none());
    }
}
