//! The deployment file (TOML) as typed, validated configuration.
//!
//! Every table rejects unknown keys, and every error names the key and the reason, so a typo
//! fails at start instead of being silently ignored. Relative paths are resolved against the
//! directory of the deployment file. See `examples/quickstart.toml` for a documented example.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A deployment file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML does not parse or does not match the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names the key and the line).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// The whole deployment.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// The base model.
    #[serde(default)]
    pub model: ModelSection,
    /// HTTP settings and request limits.
    #[serde(default)]
    pub server: ServerSection,
    /// Scheduler and KV cache.
    #[serde(default)]
    pub engine: EngineSection,
    /// Where adapters come from and who may use them.
    #[serde(default)]
    pub adapters: AdaptersSection,
    /// API keys.
    #[serde(default)]
    pub tenants: Vec<TenantSection>,
    /// Receipts and the ledger.
    #[serde(default)]
    pub attribution: AttributionSection,
    /// Wasm plugins (preprocessors run in order; at most one router, merger and attributor).
    #[serde(default)]
    pub plugins: Vec<crate::plugins::PluginSpec>,
}

/// `[attribution]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributionSection {
    /// Write a signed receipt for every request.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Folder for the node key (`node.key`, created with mode 0600) and the ledger
    /// (`ledger.jsonl`); relative to the deployment file.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Verbatim-overlap evidence from the adapters' datasets (`[attribution.evidence]`).
    #[serde(default)]
    pub evidence: EvidenceSection,
}

/// `[attribution.evidence]`: the matcher of `attribution::evidence`, for adapters whose
/// manifests name dataset files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceSection {
    /// Index the datasets and record evidence in receipts.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The fewest words a span has.
    #[serde(default = "default_min_words")]
    pub min_words: u32,
    /// The most times a span may occur in one dataset.
    #[serde(default = "default_max_occurrences")]
    pub max_occurrences: u32,
    /// The most spans one receipt records.
    #[serde(default = "default_max_spans")]
    pub max_spans: u32,
}

fn default_min_words() -> u32 {
    crate::attribution::evidence::EvidenceParams::default().min_words
}

fn default_max_occurrences() -> u32 {
    crate::attribution::evidence::EvidenceParams::default().max_occurrences
}

fn default_max_spans() -> u32 {
    crate::attribution::evidence::EvidenceParams::default().max_spans
}

impl Default for EvidenceSection {
    fn default() -> Self {
        let p = crate::attribution::evidence::EvidenceParams::default();
        Self { enabled: true, min_words: p.min_words, max_occurrences: p.max_occurrences, max_spans: p.max_spans }
    }
}

impl EvidenceSection {
    /// The matcher's parameters, `None` when evidence is off.
    pub fn params(&self) -> Option<crate::attribution::evidence::EvidenceParams> {
        self.enabled.then_some(crate::attribution::evidence::EvidenceParams {
            min_words: self.min_words,
            max_occurrences: self.max_occurrences,
            max_spans: self.max_spans,
        })
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("openlora-state")
}

impl Default for AttributionSection {
    fn default() -> Self {
        Self { enabled: true, state_dir: default_state_dir(), evidence: EvidenceSection::default() }
    }
}

/// `[model]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `"default"` (the embedded default model, fetched into the cache when absent), a `.gguf`
    /// file, or a Hugging Face folder.
    #[serde(default = "default_model_path")]
    pub path: String,
    /// The id clients use in `model` (default: the file or folder name without extension).
    pub name: Option<String>,
    /// Compute threads (default: all cores).
    pub threads: Option<usize>,
    /// Owner, license and price of the base model (receipts credit it); unpriced when absent.
    pub manifest: Option<crate::adapters::manifest::Manifest>,
    /// A Jinja chat template file that replaces the model's own (vLLM's `--chat-template`);
    /// relative to the deployment file.
    pub chat_template: Option<String>,
    /// How chat requests' tools reach the model.
    #[serde(default)]
    pub tool_format: ToolFormat,
}

/// `[model] tool_format`: how a chat request's `tools`, assistant `tool_calls` and `tool`
/// messages reach the model. Either way calls are read back as Hermes-style `<tool_call>` JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolFormat {
    /// `template` when the chat template reads `tools`, else `hermes`.
    #[default]
    Auto,
    /// Handed to the chat template, which renders them (Qwen 2.5, Hermes, SmolLM3 templates).
    Template,
    /// Written as text before the template: the tools in the system message, calls as
    /// `<tool_call>` blocks, results as `<tool_response>` user turns.
    Hermes,
}

fn default_model_path() -> String {
    "default".into()
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: default_model_path(),
            name: None,
            threads: None,
            manifest: None,
            chat_template: None,
            tool_format: ToolFormat::Auto,
        }
    }
}

/// `[server]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Largest request body accepted (HTTP 413 above).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Longest prompt in tokens (default: the context length).
    pub max_prompt_tokens: Option<usize>,
    /// Largest `max_tokens` a request may ask for (default: the context length).
    pub max_tokens_limit: Option<usize>,
    /// `max_tokens` when a request gives none.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: usize,
    /// Largest `n` (choices per request).
    #[serde(default = "default_max_n")]
    pub max_n: usize,
    /// Seconds to let in-flight requests finish on shutdown.
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    /// Most adapters one request may compose (the `adapters` list, or a router's choice).
    #[serde(default = "default_max_adapters")]
    pub max_adapters_per_request: usize,
    /// Largest rank a merge may produce (`cat` adds its inputs' ranks; SVD methods take
    /// `svd_rank`): bounds the work and memory one request's merge costs.
    #[serde(default = "default_max_merged_rank")]
    pub max_merged_rank: usize,
    /// Longest stop string, in bytes.
    #[serde(default = "default_max_stop_bytes")]
    pub max_stop_bytes: usize,
    /// Most sequences one request may start: its prompts (a completions list) times `n`.
    /// Each is a queue place and a decode row, all under one concurrency permit.
    #[serde(default = "default_max_choices")]
    pub max_choices_per_request: usize,
    /// Listen beyond loopback with no `[[tenants]]` (anyone who reaches the port may generate).
    /// Off by default: such a deployment is refused at start.
    #[serde(default)]
    pub allow_open_network: bool,
    /// Serve `/metrics` to anyone (default: with `[[tenants]]`, admins only: the metrics name
    /// adapters and count every tenant's requests). For a scraper that cannot send a key.
    #[serde(default)]
    pub metrics_public: bool,
}

fn default_max_adapters() -> usize {
    8
}

fn default_max_merged_rank() -> usize {
    128
}

fn default_max_choices() -> usize {
    16
}

fn default_max_stop_bytes() -> usize {
    256
}

fn default_listen() -> String {
    "127.0.0.1:8000".into()
}
fn default_max_body() -> usize {
    1 << 20
}
fn default_max_tokens() -> usize {
    256
}
fn default_max_n() -> usize {
    8
}
fn default_grace() -> u64 {
    30
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            max_prompt_tokens: None,
            max_tokens_limit: None,
            default_max_tokens: default_max_tokens(),
            max_n: default_max_n(),
            shutdown_grace_seconds: default_grace(),
            max_adapters_per_request: default_max_adapters(),
            max_merged_rank: default_max_merged_rank(),
            max_stop_bytes: default_max_stop_bytes(),
            max_choices_per_request: default_max_choices(),
            allow_open_network: false,
            metrics_public: false,
        }
    }
}

/// `[engine]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// Bytes for the KV cache, in MiB.
    #[serde(default = "default_kv_mib")]
    pub kv_cache_mib: usize,
    /// Tokens per KV block.
    #[serde(default = "default_block")]
    pub block_size: usize,
    /// Most tokens per forward pass.
    #[serde(default = "default_batch_tokens")]
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    #[serde(default = "default_running")]
    pub max_running: usize,
    /// Most requests waiting; more are refused with 503.
    #[serde(default = "default_waiting")]
    pub max_waiting: usize,
    /// Reuse KV blocks of repeated prefixes.
    #[serde(default = "default_true")]
    pub prefix_cache: bool,
    /// Who shares cached prefixes: `"tenant"` (the default: each tenant's blocks are salted
    /// with its name, so no tenant can learn from cache hits what another sent) or `"shared"`
    /// (all tenants share, for deployments whose tenants trust each other).
    #[serde(default = "default_prefix_scope")]
    pub prefix_cache_scope: String,
    /// Where the model runs: "auto" (a GPU if one is usable, else the CPU, said in one log
    /// line), "cpu", or "cuda:N".
    #[serde(default = "default_device")]
    pub device: String,
    /// Dense weight copies on a GPU: "bf16" (default) or "f32" (closest to the CPU reference).
    #[serde(default = "default_precision")]
    pub gpu_precision: String,
    /// KV cache elements on a GPU: "f32" (default, as the CPU) or "bf16" (half the bytes, so
    /// twice the blocks in `kv_cache_mib`). The CPU backend always keeps f32.
    #[serde(default = "default_kv_dtype")]
    pub gpu_kv_dtype: String,
    /// Activations of the block-quantized matmuls on the CPU: "f32" (default: the numerical
    /// reference, within 2e-2 of transformers) or "int8" (quantized per 32-value block, as
    /// llama.cpp does; several times faster with many rows in flight, logits within the stated
    /// tolerance of f32: ARCHITECTURE.md). It needs AVX-512 VNNI: on a CPU without it the f32
    /// path runs, said in one log line. A GPU ignores it.
    #[serde(default = "default_cpu_activations")]
    pub cpu_activations: String,
}

fn default_cpu_activations() -> String {
    "f32".into()
}

fn default_kv_dtype() -> String {
    "f32".into()
}

fn default_device() -> String {
    "auto".into()
}
fn default_precision() -> String {
    "bf16".into()
}

impl EngineSection {
    /// The parsed `device` (validated at load).
    pub fn device_request(&self) -> openlora_kernels::DeviceRequest {
        self.device.parse().unwrap_or_default()
    }

    /// The parsed `gpu_precision` (validated at load).
    pub fn precision(&self) -> openlora_kernels::Precision {
        parse_precision(&self.gpu_precision).unwrap_or_default()
    }

    /// Whether `cpu_activations` is "int8" (validated at load).
    pub fn cpu_int8(&self) -> bool {
        self.cpu_activations == "int8"
    }

    /// The parsed `gpu_kv_dtype` (validated at load).
    pub fn kv_precision(&self) -> openlora_kernels::Precision {
        parse_precision(&self.gpu_kv_dtype).unwrap_or(openlora_kernels::Precision::F32)
    }
}

/// "bf16" or "f32".
pub fn parse_precision(s: &str) -> Result<openlora_kernels::Precision, String> {
    match s {
        "bf16" => Ok(openlora_kernels::Precision::Bf16),
        "f32" => Ok(openlora_kernels::Precision::F32),
        _ => Err(format!("{s:?} is not a precision: expected \"bf16\" or \"f32\"")),
    }
}

fn default_kv_mib() -> usize {
    256
}
fn default_block() -> usize {
    16
}
fn default_batch_tokens() -> usize {
    512
}
fn default_running() -> usize {
    64
}
fn default_waiting() -> usize {
    1024
}
fn default_prefix_scope() -> String {
    "tenant".into()
}

fn default_true() -> bool {
    true
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            kv_cache_mib: default_kv_mib(),
            block_size: default_block(),
            max_batch_tokens: default_batch_tokens(),
            max_running: default_running(),
            max_waiting: default_waiting(),
            prefix_cache: true,
            prefix_cache_scope: default_prefix_scope(),
            device: default_device(),
            gpu_precision: default_precision(),
            gpu_kv_dtype: default_kv_dtype(),
            cpu_activations: default_cpu_activations(),
        }
    }
}

/// `[adapters]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptersSection {
    /// Folders whose subfolders are PEFT adapters, each served under its folder name.
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    /// Adapters only some tenants may see and use: adapter name -> tenant names. Adapters not
    /// listed are public.
    #[serde(default)]
    pub visibility: BTreeMap<String, Vec<String>>,
    /// Host-memory tier budget in MiB (adapter weights kept in host memory after reading, for a
    /// device backend; 0 = off). On the CPU the device tier is host memory and this tier is off.
    #[serde(default = "default_host_mib")]
    pub host_mib: usize,
    /// Device tier budget in MiB (compute-ready adapters, including those in use).
    #[serde(default = "default_device_mib")]
    pub device_mib: usize,
}

fn default_host_mib() -> usize {
    2048
}
fn default_device_mib() -> usize {
    1024
}

impl Default for AdaptersSection {
    fn default() -> Self {
        Self {
            dirs: Vec::new(),
            visibility: BTreeMap::new(),
            host_mib: default_host_mib(),
            device_mib: default_device_mib(),
        }
    }
}

/// A role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May generate with the models it can see.
    User,
    /// May also load and unload adapters and read every receipt.
    Admin,
}

/// `[[tenants]]`: one API key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSection {
    /// The tenant's name (what visibility lists refer to).
    pub name: String,
    /// `user` or `admin`.
    #[serde(default = "default_role")]
    pub role: Role,
    /// SHA-256 of the API key, hex (the key itself is never stored). Make one with
    /// `printf %s "$KEY" | sha256sum`.
    pub key_sha256: String,
    /// Most requests this tenant may have in flight (HTTP 429 above).
    #[serde(default = "default_concurrency")]
    pub max_concurrent: usize,
}

fn default_role() -> Role {
    Role::User
}
fn default_concurrency() -> usize {
    64
}

impl Deployment {
    /// Reads and validates `path`; relative paths inside are resolved against its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        let mut d = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if d.model.path != "default" {
            d.model.path = base.join(&d.model.path).to_string_lossy().into_owned();
        }
        if let Some(t) = d.model.chat_template.as_mut() {
            *t = base.join(&*t).to_string_lossy().into_owned();
        }
        for dir in d.adapters.dirs.iter_mut() {
            *dir = base.join(&*dir);
        }
        d.attribution.state_dir = base.join(&d.attribution.state_dir);
        for p in d.plugins.iter_mut() {
            p.path = base.join(&p.path);
        }
        Ok(d)
    }

    /// Parses and validates TOML text (`path` names the source in errors; paths stay as given).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let d: Deployment = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        d.validate(path)?;
        Ok(d)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad =
            |key: &str, reason: String| ConfigError::Invalid { path: path.to_path_buf(), key: key.into(), reason };
        self.server.listen.parse::<SocketAddr>().map_err(|e| {
            bad("server.listen", format!("{:?} is not an address like 127.0.0.1:8000 ({e})", self.server.listen))
        })?;
        let positive = [
            ("server.max_body_bytes", self.server.max_body_bytes),
            ("server.default_max_tokens", self.server.default_max_tokens),
            ("server.max_n", self.server.max_n),
            ("server.max_adapters_per_request", self.server.max_adapters_per_request),
            ("server.max_merged_rank", self.server.max_merged_rank),
            ("server.max_stop_bytes", self.server.max_stop_bytes),
            ("server.max_choices_per_request", self.server.max_choices_per_request),
            ("engine.kv_cache_mib", self.engine.kv_cache_mib),
            ("engine.block_size", self.engine.block_size),
            ("engine.max_batch_tokens", self.engine.max_batch_tokens),
            ("engine.max_running", self.engine.max_running),
            ("engine.max_waiting", self.engine.max_waiting),
            ("adapters.device_mib", self.adapters.device_mib),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        let ev = &self.attribution.evidence;
        for (key, v) in [
            ("attribution.evidence.min_words", ev.min_words),
            ("attribution.evidence.max_occurrences", ev.max_occurrences),
            ("attribution.evidence.max_spans", ev.max_spans),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        self.engine.device.parse::<openlora_kernels::DeviceRequest>().map_err(|r| bad("engine.device", r))?;
        parse_precision(&self.engine.gpu_precision).map_err(|r| bad("engine.gpu_precision", r))?;
        parse_precision(&self.engine.gpu_kv_dtype).map_err(|r| bad("engine.gpu_kv_dtype", r))?;
        if !matches!(self.engine.cpu_activations.as_str(), "f32" | "int8") {
            return Err(bad(
                "engine.cpu_activations",
                format!(
                    "{:?} is not an activation precision: expected \"f32\" or \"int8\"",
                    self.engine.cpu_activations
                ),
            ));
        }
        if !matches!(self.engine.prefix_cache_scope.as_str(), "tenant" | "shared") {
            return Err(bad(
                "engine.prefix_cache_scope",
                format!("{:?} is not \"tenant\" or \"shared\"", self.engine.prefix_cache_scope),
            ));
        }
        if self.engine.max_batch_tokens < self.engine.max_running {
            return Err(bad(
                "engine.max_batch_tokens",
                format!(
                    "{} is less than engine.max_running ({}); every running sequence needs a row per step",
                    self.engine.max_batch_tokens, self.engine.max_running
                ),
            ));
        }
        if let Some(m) = &self.model.manifest {
            m.validate().map_err(|r| bad("model.manifest", r))?;
        }
        if let Some(0) = self.model.threads {
            return Err(bad("model.threads", "must be at least 1".into()));
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let key = |k: &str| format!("tenants[{i}].{k}");
            if t.name.is_empty() {
                return Err(bad(&key("name"), "must not be empty".into()));
            }
            if !names.insert(t.name.as_str()) {
                return Err(bad(&key("name"), format!("tenant {:?} is defined twice", t.name)));
            }
            let ok = t.key_sha256.len() == 64 && t.key_sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return Err(bad(&key("key_sha256"), "must be 64 hex digits (the SHA-256 of the key)".into()));
            }
            if t.max_concurrent == 0 {
                return Err(bad(&key("max_concurrent"), "must be at least 1".into()));
            }
        }
        let mut plugin_names = std::collections::HashSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            if p.name.is_empty() || !plugin_names.insert(p.name.as_str()) {
                return Err(bad(&format!("plugins[{i}].name"), format!("{:?} is empty or used twice", p.name)));
            }
            use crate::plugins::PluginKind;
            if p.kind != PluginKind::Preprocessor && self.plugins[..i].iter().any(|q| q.kind == p.kind) {
                return Err(bad(
                    &format!("plugins[{i}].kind"),
                    format!("only one {} plugin may be configured ({:?} is the second)", p.kind.name(), p.name),
                ));
            }
        }
        for (adapter, tenants) in &self.adapters.visibility {
            for t in tenants {
                if !names.contains(t.as_str()) {
                    return Err(bad(&format!("adapters.visibility.{adapter}"), format!("no tenant is named {t:?}")));
                }
            }
        }
        self.check_exposure(path)?;
        Ok(())
    }

    /// Refuses to serve a non-loopback address with no API keys unless
    /// `server.allow_open_network` says so (call it again after overriding `server.listen`).
    pub fn check_exposure(&self, path: &Path) -> Result<(), ConfigError> {
        let addr = self.server.listen.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: "server.listen".into(),
            reason: format!("{:?} is not an address like 127.0.0.1:8000 ({e})", self.server.listen),
        })?;
        if !addr.ip().is_loopback() && self.tenants.is_empty() && !self.server.allow_open_network {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "server.listen".into(),
                reason: format!(
                    "{addr} is reachable beyond this machine and no [[tenants]] are configured, so anyone who \
                     reaches the port could use the server; add [[tenants]] with API keys, listen on 127.0.0.1, \
                     or set server.allow_open_network = true"
                ),
            });
        }
        Ok(())
    }

    /// The listen address (validated).
    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8000)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Deployment::parse(text, Path::new("d.toml")).expect_err("should be refused").to_string()
    }

    #[test]
    fn open_mode_beyond_loopback_is_refused_unless_allowed() {
        let e = err("[server]\nlisten = \"0.0.0.0:8000\"");
        assert!(e.contains("server.listen") && e.contains("allow_open_network"), "{e}");
        let ok = |t: &str| Deployment::parse(t, Path::new("d.toml")).is_ok();
        assert!(ok("[server]\nlisten = \"0.0.0.0:8000\"\nallow_open_network = true"));
        assert!(ok("[server]\nlisten = \"[::1]:8000\""));
        let hex = "0".repeat(64);
        assert!(ok(&format!("[server]\nlisten = \"0.0.0.0:8000\"\n[[tenants]]\nname = \"a\"\nkey_sha256 = \"{hex}\"")));
    }

    #[test]
    fn defaults_apply_and_errors_name_the_key() {
        let d = Deployment::parse("", Path::new("d.toml")).expect("empty is valid");
        assert_eq!(d.model.path, "default");
        assert_eq!(d.server.listen, "127.0.0.1:8000");
        assert!(err("[server]\nlisten = \"nowhere\"").contains("server.listen"));
        assert!(err("[engine]\nkv_cache_mb = 3").contains("kv_cache_mb"));
        assert!(err("[engine]\nmax_running = 0").contains("engine.max_running"));
        assert!(err("[engine]\ndevice = \"gpu\"").contains("engine.device"));
        assert!(err("[engine]\ndevice = \"cuda:x\"").contains("engine.device"));
        assert!(err("[engine]\ngpu_precision = \"fp8\"").contains("engine.gpu_precision"));
        assert!(err("[engine]\ngpu_kv_dtype = \"fp8\"").contains("engine.gpu_kv_dtype"));
        assert!(err("[engine]\ncpu_activations = \"int4\"").contains("engine.cpu_activations"));
        assert!(err("[engine]\nprefix_cache_scope = \"global\"").contains("engine.prefix_cache_scope"));
        assert!(err("[server]\nmax_adapters_per_request = 0").contains("server.max_adapters_per_request"));
        assert!(err("[server]\nmax_merged_rank = 0").contains("server.max_merged_rank"));
        assert!(err("[[tenants]]\nname = \"a\"\nkey_sha256 = \"xyz\"").contains("tenants[0].key_sha256"));
        let hex = "0".repeat(64);
        assert!(err(&format!("[[tenants]]\nname = \"a\"\nkey_sha256 = \"{hex}\"\nrole = \"root\"")).contains("role"));
        assert!(
            err(&format!(
                "[adapters.visibility]\npirate = [\"nobody\"]\n[[tenants]]\nname = \"a\"\nkey_sha256 = \"{hex}\""
            ))
            .contains("adapters.visibility.pirate")
        );
    }
}
