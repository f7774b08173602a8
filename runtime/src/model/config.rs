//! The hyper-parameters of a Llama-family model, read from a GGUF header or an HF config.json.

use std::path::Path;

use serde::Deserialize;

use super::error::{ModelError, Result};
use super::gguf::GgufFile;

/// Which member of the family; decides tensor naming quirks (biases, GGUF row permutation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM, Mistral (dense) and other `llama`-arch models.
    Llama,
    /// Qwen2-style: like Llama with biases on the q/k/v projections.
    Qwen2,
}

/// Hyper-parameters of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Family member.
    pub arch: Architecture,
    /// Model (residual stream) width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// MLP hidden width.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Per-frequency divisors from Llama-3 style rope scaling, if any.
    pub rope_freq_scale: Option<Vec<f32>>,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases.
    pub attention_bias: bool,
}

/// Upper bounds on the hyper-parameters, far above any published model and far below what
/// would overflow or exhaust memory when the tables and vectors sized from them are built
/// (a header is outside input: `context_length = 2^40` must be refused, not allocated).
const LIMITS: [(&str, usize); 8] = [
    ("hidden_size", 1 << 20),
    ("num_hidden_layers", 1 << 12),
    ("num_attention_heads", 1 << 14),
    ("num_key_value_heads", 1 << 14),
    ("head_dim", 1 << 14),
    ("intermediate_size", 1 << 22),
    ("vocab_size", 1 << 24),
    // The RoPE table holds max_position_embeddings * head_dim / 2 values (twice); 16M
    // positions covers the longest published context (10M).
    ("max_position_embeddings", 1 << 24),
];

impl LlamaConfig {
    fn check(self, path: &Path) -> Result<Self> {
        let bad = |key: &str, reason: String| ModelError::Config { path: path.to_path_buf(), key: key.into(), reason };
        let values = [
            self.hidden_size,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
            self.vocab_size,
            self.max_position_embeddings,
        ];
        for ((key, limit), v) in LIMITS.into_iter().zip(values) {
            if v == 0 {
                return Err(bad(key, "must be positive".into()));
            }
            if v > limit {
                return Err(bad(key, format!("{v} is larger than openlora accepts ({limit})")));
            }
        }
        // With the limits above no product below overflows; the RoPE table is bounded too.
        let rope_values = self.max_position_embeddings * (self.head_dim / 2);
        if rope_values > 1 << 31 {
            return Err(bad(
                "max_position_embeddings",
                format!(
                    "{} positions of head_dim {} make a RoPE table of {rope_values} values (at most {})",
                    self.max_position_embeddings,
                    self.head_dim,
                    1u64 << 31
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(bad("rms_norm_eps", format!("{} is not a non-negative number", self.rms_norm_eps)));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                format!("{} does not divide {} heads", self.num_kv_heads, self.num_heads),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad("head_dim", format!("{} is odd; RoPE needs an even head dimension", self.head_dim)));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad("rope_theta", format!("{} is not a positive number", self.rope_theta)));
        }
        Ok(self)
    }

    /// Reads the `{arch}.*` keys of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch_name = g.get_str("general.architecture")?;
        let arch = match arch_name {
            "llama" | "mistral" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(ModelError::Config {
                    path: g.path().to_path_buf(),
                    key: "general.architecture".into(),
                    reason: format!("`{other}` is not a supported architecture (llama, mistral, qwen2)"),
                });
            }
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let usize_of = |key: &str| -> Result<usize> { Ok(g.get_u64(key)? as usize) };
        let hidden = usize_of(&k("embedding_length"))?;
        let heads = usize_of(&k("attention.head_count"))?;
        let kv_heads = match g.get(&k("attention.head_count_kv")) {
            Some(_) => usize_of(&k("attention.head_count_kv"))?,
            None => heads,
        };
        let head_dim = match g.get(&k("attention.key_length")) {
            Some(_) => usize_of(&k("attention.key_length"))?,
            None => hidden / heads.max(1),
        };
        let vocab = match g.get(&k("vocab_size")) {
            Some(_) => usize_of(&k("vocab_size"))?,
            None => g.get_str_array("tokenizer.ggml.tokens")?.map(|t| t.len()).unwrap_or(0),
        };
        let tied = g.tensors.iter().all(|(n, _)| n != "output.weight");
        Self {
            arch,
            hidden_size: hidden,
            num_layers: usize_of(&k("block_count"))?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            intermediate_size: usize_of(&k("feed_forward_length"))?,
            vocab_size: vocab,
            rms_norm_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))? as f32,
            rope_theta: g.get(&k("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0) as f32,
            rope_freq_scale: None,
            max_position_embeddings: usize_of(&k("context_length"))?,
            tie_word_embeddings: tied,
            attention_bias: arch == Architecture::Qwen2,
        }
        .check(g.path())
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let c: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            key: "(json)".into(),
            reason: e.to_string(),
        })?;
        let arch = match c.model_type.as_str() {
            "llama" | "mistral" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(ModelError::Config {
                    path: path.to_path_buf(),
                    key: "model_type".into(),
                    reason: format!("`{other}` is not a supported architecture (llama, mistral, qwen2)"),
                });
            }
        };
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
        // transformers 5 writes `rope_parameters` (theta and scaling together); older configs
        // have top-level `rope_theta` and `rope_scaling`.
        let rope_theta = c.rope_parameters.as_ref().and_then(|p| p.rope_theta).or(c.rope_theta).unwrap_or(10000.0);
        let scaling = c.rope_parameters.as_ref().filter(|p| p.rope_type != "default").or(c.rope_scaling.as_ref());
        let mut config = Self {
            arch,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim,
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_freq_scale: None,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            attention_bias: arch == Architecture::Qwen2 || c.attention_bias.unwrap_or(false),
        }
        .check(path)?;
        // After the check: the scaling vector is sized by head_dim.
        if let Some(s) = scaling {
            config.rope_freq_scale = Some(s.freq_scale(head_dim, rope_theta, path)?);
        }
        Ok(config)
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<RopeScaling>,
    rope_parameters: Option<RopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
}

#[derive(Deserialize)]
struct RopeScaling {
    #[serde(alias = "type", default = "default_rope_type")]
    rope_type: String,
    rope_theta: Option<f32>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<f32>,
}

fn default_rope_type() -> String {
    "default".into()
}

impl RopeScaling {
    /// Per-frequency divisors, as HF's `_compute_llama3_parameters` applies them.
    fn freq_scale(&self, head_dim: usize, theta: f32, path: &Path) -> Result<Vec<f32>> {
        let bad = |reason: String| ModelError::Config { path: path.to_path_buf(), key: "rope_scaling".into(), reason };
        match self.rope_type.as_str() {
            "default" => Ok(vec![1.0; head_dim / 2]),
            "linear" => Ok(vec![self.factor.ok_or_else(|| bad("linear scaling needs `factor`".into()))?; head_dim / 2]),
            "llama3" => {
                let (Some(factor), Some(lo), Some(hi), Some(orig)) =
                    (self.factor, self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings)
                else {
                    return Err(bad("llama3 scaling needs factor, low_freq_factor, high_freq_factor, original_max_position_embeddings".into()));
                };
                let low_wavelen = orig / lo;
                let high_wavelen = orig / hi;
                Ok((0..head_dim / 2)
                    .map(|i| {
                        let inv = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
                        let wavelen = 2.0 * std::f32::consts::PI / inv;
                        if wavelen < high_wavelen {
                            1.0
                        } else if wavelen > low_wavelen {
                            factor
                        } else {
                            let smooth = (orig / wavelen - lo) / (hi - lo);
                            // inv_new = (1 - smooth) * inv / factor + smooth * inv
                            1.0 / ((1.0 - smooth) / factor + smooth)
                        }
                    })
                    .collect())
            }
            other => Err(bad(format!("rope scaling type `{other}` is not supported (default, linear, llama3)"))),
        }
    }
}
