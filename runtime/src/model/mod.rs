//! Models: weight formats (GGUF, safetensors), the Llama-family forward pass, the tokenizer and
//! the chat template, and the default model's fetcher.
//!
//! [`LoadedModel::open`] accepts a `.gguf` file or an HF folder (config.json, *.safetensors,
//! tokenizer.json, tokenizer_config.json) and returns everything needed to serve it.

pub mod chat_template;
pub mod config;
pub mod default_model;
pub mod device_plan;
pub mod error;
pub mod gguf;
pub mod llama;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use openlora_kernels::Backend;

use chat_template::ChatTemplate;
use config::LlamaConfig;
use error::{ModelError, Result};
use gguf::GgufFile;
use llama::LlamaModel;
use tokenizer::{GgufVocab, TextTokenizer};
use weights::SafetensorsFolder;

/// A model with its tokenizer and chat template.
pub struct LoadedModel<B: Backend> {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// The decoder.
    pub model: LlamaModel<B>,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// The model's chat template (ChatML when the model has none).
    pub chat_template: ChatTemplate,
}

impl<B: Backend> LoadedModel<B> {
    /// Opens a GGUF file or an HF folder.
    pub fn open(path: &Path, backend: B) -> Result<Self> {
        if path.is_dir() { Self::open_hf(path, backend) } else { Self::open_gguf(path, backend) }
    }

    fn open_gguf(path: &Path, backend: B) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&g)?;
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?.ok_or_else(|| ModelError::Config {
            path: path.to_path_buf(),
            key: "tokenizer.ggml.tokens".into(),
            reason: "missing (the GGUF has no tokenizer)".into(),
        })?;
        let merges = g.get_str_array("tokenizer.ggml.merges")?.unwrap_or_default();
        let token_types = g.get_i32_array("tokenizer.ggml.token_type")?;
        let id = |key: &str| g.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
        let vocab = GgufVocab {
            model: g.get_str("tokenizer.ggml.model")?,
            pre: g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()),
            tokens: &tokens,
            token_types: token_types.as_deref(),
            merges: &merges,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            add_bos: g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false),
        };
        let tokenizer = tokenizer::tokenizer_from_gguf(&vocab)?;
        let token_text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned().unwrap_or_default();
        let (bos, eos) = (token_text(vocab.bos_id), token_text(vocab.eos_id));
        let chat_template = match g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(src) => ChatTemplate::new(src, &bos, &eos)?,
            None => ChatTemplate::chatml(),
        };
        let model = LlamaModel::load(&g, config, backend)?;
        Ok(Self { path: path.to_path_buf(), model, tokenizer, chat_template })
    }

    fn open_hf(dir: &Path, backend: B) -> Result<Self> {
        let config = LlamaConfig::from_hf_config(&dir.join("config.json"))?;
        let mut tokenizer = tokenizer::tokenizer_from_file(&dir.join("tokenizer.json"))?;
        let chat_template = hf_chat_template(dir)?;
        tokenizer.set_eos_ids(hf_eos_ids(dir, &tokenizer, &chat_template));
        let src = SafetensorsFolder::open(dir)?;
        let model = LlamaModel::load(&src, config, backend)?;
        Ok(Self { path: dir.to_path_buf(), model, tokenizer, chat_template })
    }
}

/// End-of-sequence ids of an HF folder: `eos_token_id` from generation_config.json, else from
/// config.json (a number or a list), else the id of tokenizer_config.json's `eos_token`.
fn hf_eos_ids(dir: &Path, tokenizer: &TextTokenizer, template: &ChatTemplate) -> Vec<u32> {
    let ids_in = |file: &str| -> Option<Vec<u32>> {
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        match v.get("eos_token_id")? {
            serde_json::Value::Number(n) => Some(vec![u32::try_from(n.as_u64()?).ok()?]),
            serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok())).collect(),
            _ => None,
        }
    };
    ids_in("generation_config.json")
        .or_else(|| ids_in("config.json"))
        .or_else(|| tokenizer.token_to_id(template.eos_token()).map(|id| vec![id]))
        .unwrap_or_default()
}

/// The chat template of an HF folder: `chat_template.jinja` (transformers 5) or the
/// `chat_template` key of `tokenizer_config.json`; ChatML when neither exists.
fn hf_chat_template(dir: &Path) -> Result<ChatTemplate> {
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| ModelError::Malformed { path: cfg_path.clone(), reason: e.to_string() })?,
        Err(_) => serde_json::Value::Null,
    };
    let special = |key: &str| -> String {
        match cfg.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_owned(),
            None => String::new(),
        }
    };
    let jinja = dir.join("chat_template.jinja");
    let source = if jinja.exists() {
        Some(std::fs::read_to_string(&jinja).map_err(|source| ModelError::Io { path: jinja.clone(), source })?)
    } else {
        cfg.get("chat_template").and_then(|v| v.as_str()).map(str::to_owned)
    };
    match source {
        Some(src) => ChatTemplate::new(&src, &special("bos_token"), &special("eos_token")),
        None => Ok(ChatTemplate::chatml()),
    }
}
