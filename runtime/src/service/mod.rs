//! The service owns one request's journey, whatever transport it came by: it authenticates the
//! tenant and takes a concurrency permit, runs the plugin chain, resolves adapters (loading cold
//! ones, building merges), applies the chat template, queues the sequences on the engine,
//! streams their events back, and writes the receipt from the tokens actually produced, for
//! every outcome. The HTTP server and `openlora generate` both call [`Service::generate`] and
//! read the [`Journey`] it returns; neither touches the engine.
//!
//! Rooms:
//! - [`api`]: the request, event and error types transports speak;
//! - [`tenancy`]: keys, roles, permits, visibility and the admin operations;
//! - [`resolve`]: names to adapter generations, merges, tokenization;
//! - [`plugin_chain`]: preprocessors, router, merger;
//! - [`plugin_admin`]: the chain at run time: list, load, unload, reload (admin);
//! - [`receipts`]: inference records, attribution, the ledger;
//! - [`journey`]: the entry point and the stream of service events;
//! - [`exposition`]: the Prometheus text of the engine's, pager's, plugins' and service's figures.

pub mod api;
pub mod exposition;
pub mod journey;
pub mod plugin_admin;
mod plugin_chain;
pub mod receipts;
mod resolve;
pub mod tenancy;
mod tokens;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use openlora_kernels::Backend;
use sha2::{Digest, Sha256};

pub use api::{
    AdapterChoice, AdapterStatus, Constraint, ConstraintSpec, ErrorKind, FinishReason, GenerateRequest, Limits,
    MergeSpec, ModelCard, PromptInput, PromptLogprob, SamplingParams, ServiceError, ServiceEvent, StructuredOutput,
    TokenLogprob, TokenUsage, new_request_id,
};
pub use journey::Journey;
pub use receipts::RecordContext;
pub use tenancy::{ConcurrencyPermit, Tenant, key_digest};
pub use tokens::MAX_DETOKENIZE_IDS;

use crate::adapters::catalog::Catalog;
use crate::adapters::manifest::Manifest;
use crate::adapters::pager::{Pager, PagerConfig};
use crate::attribution::Ledger;
use crate::attribution::evidence::EvidenceParams;
use crate::attribution::index::IndexStore;
use crate::attribution::receipt::ModelUse;
use crate::config::Deployment;
use crate::engine::grammar::GrammarEnv;
use crate::engine::{EngineConfig, EngineHandle};
use crate::metrics::ServiceMetrics;
use crate::model::LoadedModel;
use crate::plugins::PluginHost;

/// The backend a served deployment runs on (the CPU, or a CUDA device chosen at start).
pub type ServingBackend = openlora_kernels::DeviceBackend;

/// The service: everything a request needs, shared by every connection.
pub struct Service<B: Backend + 'static> {
    engine: EngineHandle<B>,
    model: Arc<LoadedModel<B>>,
    model_id: String,
    model_root: String,
    /// The one registry of adapters: the catalog (what exists, its visibility) and the tiers.
    pager: Pager<B>,
    tenants: Vec<Arc<Tenant>>,
    anonymous: Arc<Tenant>,
    limits: Limits,
    chat_stop_ids: Vec<u32>,
    /// Grammar-constrained decoding for this model's vocabulary, built on the first request
    /// that asks for structured output (or the reason it cannot be).
    grammar: OnceLock<Result<Arc<GrammarEnv>, String>>,
    ledger: Option<Ledger>,
    base_use: ModelUse,
    /// The indexes of the adapters' datasets (verbatim-overlap evidence), by content hash.
    indexes: Arc<IndexStore>,
    /// The matcher's parameters; `None` when evidence is off (or attribution is).
    evidence: Option<EvidenceParams>,
    /// The plugin host, started with the first plugin (at start, or the first admin load).
    plugins: OnceLock<Arc<PluginHost>>,
    /// The plugin chain in order ([`plugin_admin`]): what each request runs.
    chain: RwLock<Vec<plugin_admin::ChainLink>>,
    /// Held by each admin change of the chain, so they happen one at a time.
    plugin_admin: Mutex<()>,
    /// Whether tenants share prefix-cache blocks (`[engine] prefix_cache_scope = "shared"`).
    shared_prefix_cache: bool,
    /// Whether `/metrics` is served without an admin key when tenants are configured.
    metrics_public: bool,
    /// Whether chat requests' tools go to the chat template (`[model] tool_format` resolved).
    template_tools: bool,
    /// The deployment file this service was started from, when it came from one: a plugin
    /// reload re-reads its entry there ([`Service::reload_plugin`]).
    deployment_file: OnceLock<PathBuf>,
    /// When the service started (Unix seconds).
    pub created: u64,
    /// Counters.
    pub metrics: ServiceMetrics,
}

/// SHA-256 of a model's weights: the file, or a folder's `*.safetensors` in name order.
pub fn weights_sha256(path: &Path) -> std::io::Result<String> {
    let mut files = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut h = Sha256::new();
    for f in files.drain(..) {
        let mut file = std::fs::File::open(f)?;
        std::io::copy(&mut file, &mut h)?;
    }
    Ok(hex::encode(h.finalize()))
}

/// The engine settings of a deployment, with the KV pool sized for `model` with KV elements
/// of `kv_value_bytes` ([`Backend::kv_value_bytes`]).
pub fn engine_config(
    deployment: &Deployment,
    model: &crate::model::config::LlamaConfig,
    kv_value_bytes: usize,
) -> EngineConfig {
    let e = &deployment.engine;
    EngineConfig {
        kv_value_bytes,
        block_size: e.block_size,
        max_batch_tokens: e.max_batch_tokens,
        max_running: e.max_running,
        max_waiting: e.max_waiting,
        prefix_cache: e.prefix_cache,
        ..EngineConfig::default()
    }
    .with_kv_bytes(model, e.kv_cache_mib << 20)
}

impl<B: Backend + Clone + 'static> Service<B> {
    /// Builds the service for `deployment` around a loaded model: starts the engine thread,
    /// opens the ledger when attribution is on, loads the plugins and scans the adapter
    /// folders (headers only) into the catalog.
    pub fn start(
        deployment: &Deployment,
        model: Arc<LoadedModel<B>>,
        model_id: String,
        backend: B,
        model_sha256: String,
    ) -> Result<Arc<Self>, ServiceError> {
        let ledger = if deployment.attribution.enabled {
            let dir = &deployment.attribution.state_dir;
            let key = crate::attribution::load_or_create_key(&dir.join("node.key"))
                .map_err(|e| ServiceError::internal(format!("the node key in {}: {e}", dir.display())))?;
            Some(
                Ledger::open(&dir.join("ledger.jsonl"), key)
                    .map_err(|e| ServiceError::internal(format!("the ledger in {}: {e}", dir.display())))?,
            )
        } else {
            None
        };
        // The ledger first: a second writer is refused before it allocates the KV pool.
        let cfg = engine_config(deployment, &model.model.config, model.model.backend().kv_value_bytes());
        let engine = EngineHandle::spawn(model.clone(), cfg)
            .map_err(|e| ServiceError::internal(format!("starting the engine: {e}")))?;
        Self::new(deployment, model, model_id, engine, backend, ledger, model_sha256).map(Arc::new)
    }

    /// Builds the service around a running engine and an opened ledger.
    pub fn new(
        deployment: &Deployment,
        model: Arc<LoadedModel<B>>,
        model_id: String,
        engine: EngineHandle<B>,
        backend: B,
        ledger: Option<Ledger>,
        model_sha256: String,
    ) -> Result<Self, ServiceError> {
        let ctx = engine.context_limit();
        let renders = model.chat_template.renders_tools();
        let template_tools = match deployment.model.tool_format {
            crate::config::ToolFormat::Auto => renders,
            crate::config::ToolFormat::Hermes => false,
            crate::config::ToolFormat::Template if renders => true,
            crate::config::ToolFormat::Template => {
                return Err(ServiceError::internal(
                    "model.tool_format = \"template\", but the chat template never reads `tools`: \
                     use \"hermes\" (or \"auto\"), or give a template that renders tools (model.chat_template)",
                ));
            }
        };
        let s = &deployment.server;
        let limits = Limits {
            max_body_bytes: s.max_body_bytes,
            max_prompt_tokens: s.max_prompt_tokens.unwrap_or(ctx).min(ctx.saturating_sub(1)),
            max_tokens_limit: s.max_tokens_limit.unwrap_or(ctx),
            default_max_tokens: s.default_max_tokens,
            max_n: s.max_n,
            max_adapters: s.max_adapters_per_request,
            max_merged_rank: s.max_merged_rank,
            max_stop_bytes: s.max_stop_bytes,
            max_choices: s.max_choices_per_request,
        };
        let tenants = deployment
            .tenants
            .iter()
            .map(|t| {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(&t.key_sha256, &mut digest)
                    .map_err(|e| ServiceError::internal(format!("tenant {}: key_sha256: {e}", t.name)))?;
                Ok(Arc::new(Tenant {
                    name: t.name.clone(),
                    role: t.role,
                    digest,
                    max_concurrent: t.max_concurrent,
                    active: AtomicUsize::new(0),
                }))
            })
            .collect::<Result<Vec<_>, ServiceError>>()?;
        // Open mode (no tenants): the anonymous caller is a user; admin endpoints need a key.
        let anonymous = Tenant::anonymous();
        let tok = &model.tokenizer;
        let chat_stop_ids = ["<|im_end|>", "<|eot_id|>", "<|end|>"].iter().filter_map(|t| tok.token_to_id(t)).collect();
        let base_manifest = deployment.model.manifest.clone().unwrap_or_else(Manifest::unpriced);
        let base_use = ModelUse {
            id: model_id.clone(),
            sha256: model_sha256,
            owner: base_manifest.owner.clone(),
            price_per_1k_tokens: base_manifest.price_per_1k_tokens,
        };
        let chain: Vec<plugin_admin::ChainLink> = deployment
            .plugins
            .iter()
            .map(|p| plugin_admin::ChainLink {
                name: p.name.clone(),
                kind: p.kind,
                origin: plugin_admin::PluginOrigin::Deployment,
            })
            .collect();
        let plugins = OnceLock::new();
        if !deployment.plugins.is_empty() {
            let host = plugin_admin::new_host()?;
            for spec in &deployment.plugins {
                host.load(spec.clone()).map_err(|e| {
                    ServiceError::internal(format!("plugins: {} ({}): {e}", spec.name, spec.path.display()))
                })?;
            }
            let _ = plugins.set(Arc::new(host));
        }
        let (catalog, report) = Catalog::scan_with_visibility(
            model.model.config.clone(),
            deployment.adapters.dirs.clone(),
            deployment.adapters.visibility.clone(),
        );
        for e in &report.errors {
            eprintln!("openlora: skipping an adapter: {e}");
        }
        for name in deployment.adapters.visibility.keys() {
            if catalog.get(name).is_none() {
                return Err(ServiceError::internal(format!(
                    "adapters.visibility.{name}: no adapter named {name:?} was found in adapters.dirs"
                )));
            }
        }
        let mib = |m: usize| m.saturating_mul(1 << 20);
        // Where the backend computes from host memory (the CPU), the prepared adapter is already
        // in RAM, in its file's precision: a host-tier copy would hold it again, in f32.
        let host_bytes = if backend.weights_in_host_memory() { 0 } else { mib(deployment.adapters.host_mib) };
        let pager =
            Pager::new(Arc::new(catalog), backend, PagerConfig::new(host_bytes, mib(deployment.adapters.device_mib)))
                .map_err(|e| ServiceError::internal(format!("starting the adapter loader: {e}")))?;
        let evidence = deployment.attribution.evidence.params().filter(|_| ledger.is_some());
        let svc = Self {
            ledger,
            base_use,
            indexes: Arc::new(IndexStore::with_default_cache()),
            evidence,
            plugins,
            chain: RwLock::new(chain),
            plugin_admin: Mutex::new(()),
            shared_prefix_cache: deployment.engine.prefix_cache_scope == "shared",
            metrics_public: deployment.server.metrics_public,
            template_tools,
            deployment_file: OnceLock::new(),
            pager,
            model_root: model.path.display().to_string(),
            engine,
            model,
            model_id,
            tenants,
            anonymous: Arc::new(anonymous),
            limits,
            chat_stop_ids,
            grammar: OnceLock::new(),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            metrics: ServiceMetrics::default(),
        };
        svc.refresh_plugin_catalog();
        svc.index_datasets();
        Ok(svc)
    }

    /// The grammar compiler for this model, built on first use (the token trie of the whole
    /// vocabulary: once per process).
    pub(crate) fn grammar_env(&self) -> Result<Arc<GrammarEnv>, String> {
        self.grammar
            .get_or_init(|| {
                GrammarEnv::new(Arc::new(self.model.tokenizer.clone()), self.model.model.config.vocab_size)
                    .map(Arc::new)
            })
            .clone()
    }

    /// Whether chat requests' tools are handed to the chat template (`[model] tool_format`:
    /// `template`, or `auto` with a template that reads `tools`) rather than written as
    /// Hermes-style text.
    pub fn template_tools(&self) -> bool {
        self.template_tools
    }

    /// The base model's id.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The loaded model.
    pub fn model(&self) -> &Arc<LoadedModel<B>> {
        &self.model
    }

    /// The name of the backend the model runs on (`cpu (...)`, `cuda:0 (...)`).
    pub fn backend_name(&self) -> String {
        self.model.model.backend().name()
    }

    /// The longest sequence (prompt plus generated tokens) a request can have.
    pub fn context_limit(&self) -> usize {
        self.engine.context_limit()
    }

    /// KV blocks in the pool, and tokens per block.
    pub fn kv_blocks(&self) -> (usize, usize) {
        let c = self.engine.config();
        (c.num_blocks, c.block_size)
    }

    /// Stops accepting requests (shutdown); running ones finish.
    pub fn stop_accepting(&self) {
        self.engine.stop_accepting();
    }

    /// What is down, if anything: the engine thread or an adapter loader thread that exited.
    /// `/health` answers 503 with it.
    pub fn health(&self) -> Result<(), String> {
        if !self.engine.is_alive() {
            return Err("the engine thread has stopped".into());
        }
        if !self.pager.loaders_alive() {
            return Err("an adapter loader thread has stopped".into());
        }
        Ok(())
    }

    /// Whether `tenant` may read `/metrics`: they name adapters and count every tenant's
    /// requests, so with tenants configured only admins may, unless `[server] metrics_public`.
    pub fn may_read_metrics(&self, tenant: &Tenant) -> Result<(), ServiceError> {
        if self.metrics_public || !self.auth_required() {
            return Ok(());
        }
        self.require_admin(tenant)
    }

    /// The engine (for tests that inject faults into it).
    #[doc(hidden)]
    pub fn engine(&self) -> &EngineHandle<B> {
        &self.engine
    }

    /// The adapter registry: catalog, tiers and their figures.
    pub fn pager(&self) -> &Pager<B> {
        &self.pager
    }

    /// The ledger, when attribution is on.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    /// The text of one token (for logprobs).
    pub fn token_text(&self, id: u32) -> String {
        self.model.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}
