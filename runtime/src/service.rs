//! One request's journey, independent of the transport: authenticate the tenant, resolve the
//! model and adapters (checking the tenant may use each), merge when asked, apply the chat
//! template, check limits, and queue the sequences on the engine. The HTTP server translates
//! HTTP to calls here and events back to HTTP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use openlora_kernels::Backend;
use sha2::{Digest, Sha256};

use crate::adapters::catalog::Catalog;
use crate::adapters::merge::{MajoritySign, MergeMethod, MergeRecipe, merge};
use crate::adapters::pager::{Pager, PagerConfig, PagerError};
use crate::adapters::{Generation, LoraAdapter, LoraHost, WeightedAdapter};
use crate::attribution::receipt::{AdapterUse, InferenceRecord, ModelUse, text_sha256, tokens_sha256};
use crate::attribution::receipt::{Attribution, Payment, PluginUse};
use crate::attribution::{Ledger, Manifest, builtin_attribution};
use crate::config::{Deployment, Role};
use crate::engine::sampler::SamplingParams;
use crate::engine::{EngineError, EngineHandle, Request, RequestStream};
use crate::model::LoadedModel;
use crate::model::chat_template::ChatMessage;
use crate::plugins::{self as pl, PluginHost, PluginKind};

/// What kind of failure a [`ServiceError`] is (the HTTP layer maps it to a status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or out of range (400).
    BadRequest,
    /// No or a wrong API key (401).
    Unauthorized,
    /// The key is valid but may not do this (403).
    Forbidden,
    /// No such model or adapter, or not visible to this tenant (404).
    NotFound,
    /// The body is too large (413).
    TooLarge,
    /// This tenant has too many requests in flight (429).
    RateLimited,
    /// The engine's queue is full or it is shutting down (503).
    Overloaded,
    /// Something failed on our side (500).
    Internal,
}

/// A refused or failed request, with what the client needs to fix it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    /// The kind.
    pub kind: ErrorKind,
    /// A human-readable message naming the problem.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
}

impl ServiceError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), param: None }
    }

    /// A 400 naming `param`.
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::BadRequest, message: message.into(), param: Some(param.to_owned()) }
    }
}

impl From<EngineError> for ServiceError {
    fn from(e: EngineError) -> Self {
        let kind = match &e {
            EngineError::Overloaded { .. } | EngineError::ShutDown => ErrorKind::Overloaded,
            EngineError::Invalid(_) => ErrorKind::BadRequest,
            EngineError::Failed(_) => ErrorKind::Internal,
        };
        Self::new(kind, e.to_string())
    }
}

/// An API key's holder.
#[derive(Debug)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    digest: [u8; 32],
    max_concurrent: usize,
    active: AtomicUsize,
}

impl Tenant {
    /// An admin identity that sees everything (for internal listings such as metrics).
    pub fn admin_view() -> Self {
        Self { name: String::new(), role: Role::Admin, digest: [0; 32], max_concurrent: 0, active: AtomicUsize::new(0) }
    }

    /// Whether it may use admin endpoints.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Holds one of a tenant's concurrent-request slots until dropped.
pub struct Slot(Arc<Tenant>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The prompt, in one of the forms clients send.
#[derive(Clone, Debug)]
pub enum PromptInput {
    /// Text, tokenized as is.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// One adapter of a composition.
#[derive(Clone, Debug)]
pub struct AdapterChoice {
    /// Its name.
    pub name: String,
    /// Its weight.
    pub weight: f32,
}

/// How to merge several adapters into one (PEFT's `add_weighted_adapter`).
#[derive(Clone, Debug, Default)]
pub struct MergeSpec {
    /// The method (`linear`, `cat`, `ties`, `dare_linear`, ...).
    pub method: String,
    /// Fraction kept by pruning methods.
    pub density: Option<f64>,
    /// `total` or `frequency`.
    pub majority_sign_method: Option<String>,
    /// Rank of SVD results.
    pub svd_rank: Option<usize>,
    /// DARE's seed.
    pub seed: Option<u64>,
}

/// What a client asked for.
#[derive(Clone, Debug)]
pub struct GenerationParams {
    /// The base model's id or an adapter's name.
    pub model: String,
    /// Extension: adapters to compose (their terms add, each scaled by its weight).
    pub adapters: Vec<AdapterChoice>,
    /// Extension: merge the adapters into one instead of adding their terms.
    pub merge: Option<MergeSpec>,
    /// The prompt.
    pub prompt: PromptInput,
    /// Most new tokens (None: the deployment's default).
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Choices.
    pub n: usize,
    /// Logprobs with this many alternatives.
    pub logprobs: Option<usize>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Request metadata (OpenAI `metadata`), handed to plugins.
    pub metadata: Vec<(String, String)>,
}

/// A request queued on the engine: one stream per choice.
pub struct Started {
    /// The streams, choice by choice.
    pub streams: Vec<RequestStream>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// The model id to echo back.
    pub model: String,
    /// The tenant's concurrency slot (hold it until the response is done).
    pub slot: Option<Slot>,
    /// When the request was accepted.
    pub started: Instant,
    /// What the receipt will say about the request.
    pub record: RecordContext,
}

/// The parts of an inference record known when a request starts.
#[derive(Clone, Debug)]
pub struct RecordContext {
    /// The response id.
    pub request_id: String,
    /// The tenant.
    pub tenant: String,
    /// Adapters with their manifests, in request order.
    pub adapters: Vec<AdapterUse>,
    /// The merge recipe, if merged.
    pub merge: Option<String>,
    /// SHA-256 of the prompt token ids.
    pub prompt_sha256: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Plugins that acted on the request so far.
    pub plugins: Vec<PluginUse>,
}

impl RecordContext {
    /// Combines the contexts of several prompts of one request (a completions list).
    pub fn combine(mut parts: Vec<RecordContext>) -> Option<RecordContext> {
        if parts.len() <= 1 {
            return parts.pop();
        }
        let joined: String = parts.iter().map(|p| p.prompt_sha256.as_str()).collect();
        let mut first = parts[0].clone();
        first.prompt_tokens = parts.iter().map(|p| p.prompt_tokens).sum();
        first.prompt_sha256 = text_sha256(&joined);
        Some(first)
    }
}

/// A model as `/v1/models` lists it.
#[derive(Clone, Debug)]
pub struct ModelCard {
    /// Its id.
    pub id: String,
    /// Where it came from.
    pub root: String,
    /// The base model's id, for adapters.
    pub parent: Option<String>,
}

/// Cumulative latency buckets (Prometheus histogram).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram with upper bounds `bounds` (seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation in seconds.
    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// `(upper bound, cumulative count)` pairs, the sum in seconds and the count.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let buckets = self.bounds.iter().zip(&self.counts).map(|(b, c)| (*b, c.load(Ordering::Relaxed))).collect();
        (buckets, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6, self.count.load(Ordering::Relaxed))
    }
}

/// Latency buckets in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Counters the service keeps (the engine keeps its own).
#[derive(Debug)]
pub struct ServiceMetrics {
    /// Requests finished, by finish reason.
    pub finished: Mutex<HashMap<&'static str, u64>>,
    /// Requests refused, by error kind.
    pub refused: Mutex<HashMap<&'static str, u64>>,
    /// Time to first token.
    pub ttft: Histogram,
    /// Whole-request latency.
    pub e2e: Histogram,
    /// Adapter loads through the admin API or at start.
    pub adapter_loads: AtomicU64,
    /// Adapter unloads.
    pub adapter_unloads: AtomicU64,
    /// Time to read and prepare an adapter.
    pub adapter_load_seconds: Histogram,
    /// Merged adapters built.
    pub merges: AtomicU64,
}

impl Default for ServiceMetrics {
    fn default() -> Self {
        Self {
            finished: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            ttft: Histogram::new(LATENCY_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            adapter_loads: AtomicU64::new(0),
            adapter_unloads: AtomicU64::new(0),
            adapter_load_seconds: Histogram::new(LATENCY_BUCKETS),
            merges: AtomicU64::new(0),
        }
    }
}

impl ServiceMetrics {
    /// Counts a finished request.
    pub fn finished(&self, reason: &'static str) {
        *self.finished.lock().unwrap_or_else(PoisonError::into_inner).entry(reason).or_default() += 1;
    }

    /// Counts a refused request.
    pub fn refused(&self, kind: ErrorKind) {
        let k = match kind {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Internal => "internal",
        };
        *self.refused.lock().unwrap_or_else(PoisonError::into_inner).entry(k).or_default() += 1;
    }
}

/// Request limits from the deployment.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest body.
    pub max_body_bytes: usize,
    /// Longest prompt.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens`.
    pub max_tokens_limit: usize,
    /// Default `max_tokens`.
    pub default_max_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
}

struct AdapterInfo {
    dir: PathBuf,
    visible_to: Option<Vec<String>>,
    manifest: Manifest,
}

/// Most merged adapters kept prepared.
const MERGED_CACHE: usize = 32;

/// The service: everything a request needs, shared by every connection.
pub struct Service<B: Backend + 'static> {
    engine: EngineHandle<B>,
    model: Arc<LoadedModel<B>>,
    model_id: String,
    model_root: String,
    pager: Pager<B>,
    adapters: RwLock<HashMap<String, AdapterInfo>>,
    merged: Mutex<Vec<(Generation, Arc<LoraAdapter<B>>)>>,
    tenants: Vec<Arc<Tenant>>,
    anonymous: Arc<Tenant>,
    limits: Limits,
    chat_stop_ids: Vec<u32>,
    ledger: Option<Ledger>,
    base_use: ModelUse,
    plugins: Option<Arc<PluginHost>>,
    plugin_specs: Vec<(String, PluginKind)>,
    visibility: std::collections::BTreeMap<String, Vec<String>>,
    /// When the service started (Unix seconds).
    pub created: u64,
    /// Counters.
    pub metrics: ServiceMetrics,
}

/// A manifest dataset as plugins see it.
fn plugin_dataset(d: &crate::attribution::manifest::Dataset) -> pl::Dataset {
    pl::Dataset {
        id: d.id.clone(),
        sha256: d.sha256.clone(),
        license: d.license.clone(),
        contributors: d.contributors.iter().map(|c| pl::Contributor { name: c.name.clone(), share: c.share }).collect(),
    }
}

/// A fresh response id.
pub fn new_request_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().r#gen();
    format!("{prefix}-{n:032x}")
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

/// SHA-256 of an API key.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl<B: Backend + Clone + 'static> Service<B> {
    /// Builds the service: loads every adapter under the deployment's adapter folders.
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
        let s = &deployment.server;
        let limits = Limits {
            max_body_bytes: s.max_body_bytes,
            max_prompt_tokens: s.max_prompt_tokens.unwrap_or(ctx).min(ctx.saturating_sub(1)),
            max_tokens_limit: s.max_tokens_limit.unwrap_or(ctx),
            default_max_tokens: s.default_max_tokens,
            max_n: s.max_n,
        };
        let tenants = deployment
            .tenants
            .iter()
            .map(|t| {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(&t.key_sha256, &mut digest).map_err(|e| {
                    ServiceError::new(ErrorKind::Internal, format!("tenant {}: key_sha256: {e}", t.name))
                })?;
                Ok(Arc::new(Tenant {
                    name: t.name.clone(),
                    role: t.role,
                    digest,
                    max_concurrent: t.max_concurrent,
                    active: AtomicUsize::new(0),
                }))
            })
            .collect::<Result<Vec<_>, ServiceError>>()?;
        let anonymous = Arc::new(Tenant {
            name: "anonymous".into(),
            role: Role::Admin,
            digest: [0; 32],
            max_concurrent: usize::MAX,
            active: AtomicUsize::new(0),
        });
        let tok = &model.tokenizer;
        let chat_stop_ids = ["<|im_end|>", "<|eot_id|>", "<|end|>"].iter().filter_map(|t| tok.token_to_id(t)).collect();
        let base_manifest = deployment.model.manifest.clone().unwrap_or_else(Manifest::unpriced);
        let base_use = ModelUse {
            id: model_id.clone(),
            sha256: model_sha256,
            owner: base_manifest.owner.clone(),
            price_per_1k_tokens: base_manifest.price_per_1k_tokens,
        };
        let plugin_specs: Vec<(String, PluginKind)> =
            deployment.plugins.iter().map(|p| (p.name.clone(), p.kind)).collect();
        let plugins = if deployment.plugins.is_empty() {
            None
        } else {
            let cache = std::env::var_os("OPENLORA_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/openlora")));
            let host = PluginHost::new(pl::HostOptions {
                cache_dir: cache.map(|c| c.join("plugins")),
                ..pl::HostOptions::default()
            })
            .map_err(|e| ServiceError::new(ErrorKind::Internal, format!("plugins: {e}")))?;
            for spec in &deployment.plugins {
                host.load(spec.clone()).map_err(|e| {
                    ServiceError::new(
                        ErrorKind::Internal,
                        format!("plugins: {} ({}): {e}", spec.name, spec.path.display()),
                    )
                })?;
            }
            Some(Arc::new(host))
        };
        let (catalog, report) = Catalog::scan(model.model.config.clone(), deployment.adapters.dirs.clone());
        for e in &report.errors {
            eprintln!("openlora: skipping an adapter: {e}");
        }
        let mib = |m: usize| m.saturating_mul(1 << 20);
        let pager = Pager::new(
            Arc::new(catalog),
            backend,
            PagerConfig::new(mib(deployment.adapters.host_mib), mib(deployment.adapters.device_mib)),
        )
        .map_err(|e| ServiceError::new(ErrorKind::Internal, format!("starting the adapter loader: {e}")))?;
        let svc = Self {
            ledger,
            base_use,
            plugins,
            plugin_specs,
            visibility: deployment.adapters.visibility.clone(),
            pager,
            model_root: model.path.display().to_string(),
            engine,
            model,
            model_id,
            adapters: RwLock::new(HashMap::new()),
            merged: Mutex::new(Vec::new()),
            tenants,
            anonymous,
            limits,
            chat_stop_ids,
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            metrics: ServiceMetrics::default(),
        };
        {
            let mut infos = svc.adapters.write().unwrap_or_else(PoisonError::into_inner);
            for name in svc.pager.catalog().names() {
                if let Some(e) = svc.pager.catalog().get(&name) {
                    let visible_to = deployment.adapters.visibility.get(&name).cloned();
                    let manifest = e.manifest.clone().unwrap_or_else(Manifest::unpriced);
                    infos.insert(name, AdapterInfo { dir: e.dir.clone(), visible_to, manifest });
                }
            }
        }
        svc.refresh_catalog();
        for name in deployment.adapters.visibility.keys() {
            if !svc.adapters_read().contains_key(name) {
                return Err(ServiceError::new(
                    ErrorKind::Internal,
                    format!("adapters.visibility.{name}: no adapter named {name:?} was found in adapters.dirs"),
                ));
            }
        }
        Ok(svc)
    }
}

impl<B: Backend + Clone + 'static> Service<B> {
    fn adapters_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, AdapterInfo>> {
        self.adapters.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The engine.
    pub fn engine(&self) -> &EngineHandle<B> {
        &self.engine
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

    /// Whether requests must carry an API key (true when any tenant is configured).
    pub fn auth_required(&self) -> bool {
        !self.tenants.is_empty()
    }

    /// The tenant an `Authorization` header value (`Bearer KEY`) belongs to. Keys are compared
    /// as SHA-256 digests in constant time; every tenant is checked, so timing does not reveal
    /// which one matched.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, ServiceError> {
        if !self.auth_required() {
            return Ok(self.anonymous.clone());
        }
        let Some(value) = authorization else {
            return Err(ServiceError::new(
                ErrorKind::Unauthorized,
                "missing API key: send the header `Authorization: Bearer YOUR_KEY`",
            ));
        };
        let key = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).unwrap_or("").trim();
        let digest = key_digest(key);
        let mut found = None;
        for t in &self.tenants {
            #[allow(deprecated)]
            let same = ring::constant_time::verify_slices_are_equal(&t.digest, &digest).is_ok();
            if same && found.is_none() {
                found = Some(t.clone());
            }
        }
        found.ok_or_else(|| ServiceError::new(ErrorKind::Unauthorized, "invalid API key"))
    }

    /// Refuses non-admins.
    pub fn require_admin(&self, tenant: &Tenant) -> Result<(), ServiceError> {
        if tenant.is_admin() {
            Ok(())
        } else {
            Err(ServiceError::new(ErrorKind::Forbidden, format!("tenant {:?} is not an admin", tenant.name)))
        }
    }

    fn visible(&self, tenant: &Tenant, info: &AdapterInfo) -> bool {
        tenant.is_admin() || info.visible_to.as_ref().is_none_or(|v| v.contains(&tenant.name))
    }

    /// The models `tenant` may see: the base and every visible adapter.
    pub fn list_models(&self, tenant: &Tenant) -> Vec<ModelCard> {
        let mut out = vec![ModelCard { id: self.model_id.clone(), root: self.model_root.clone(), parent: None }];
        let adapters = self.adapters_read();
        let mut names: Vec<&String> =
            adapters.iter().filter(|(_, i)| self.visible(tenant, i)).map(|(n, _)| n).collect();
        names.sort();
        for n in names {
            out.push(ModelCard {
                id: n.clone(),
                root: adapters[n].dir.display().to_string(),
                parent: Some(self.model_id.clone()),
            });
        }
        out
    }

    fn load_adapter_inner(&self, name: &str, dir: &Path, visible_to: Option<Vec<String>>) -> Result<(), ServiceError> {
        if name.is_empty() || name == self.model_id || name.contains('/') {
            return Err(ServiceError::bad("lora_name", format!("{name:?} cannot name an adapter")));
        }
        let manifest = Manifest::load_for(dir)
            .map_err(|e| ServiceError::bad("lora_path", format!("adapter `{name}`: {e}")))?
            .unwrap_or_else(Manifest::unpriced);
        let previous = self.pager.catalog().get(name);
        self.pager.catalog().add(name, dir).map_err(|e| ServiceError::bad("lora_path", e.to_string()))?;
        // Read and prepare it now, so a broken adapter is refused here and the first request
        // finds it resident.
        let start = Instant::now();
        if let Err(e) = self.pager.acquire_blocking(name) {
            match previous {
                Some(p) => {
                    let _ = self.pager.catalog().add(name, &p.dir);
                }
                None => {
                    let _ = self.pager.remove(name);
                }
            }
            return Err(ServiceError::bad("lora_path", e.to_string()));
        }
        self.metrics.adapter_load_seconds.observe(start.elapsed().as_secs_f64());
        self.metrics.adapter_loads.fetch_add(1, Ordering::Relaxed);
        self.adapters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), AdapterInfo { dir: dir.to_path_buf(), visible_to, manifest });
        Ok(())
    }

    /// Rescans the adapter folders (admin): new folders become servable, removed ones 404,
    /// changed ones serve their new content from the next request on.
    pub fn rescan_adapters(&self, tenant: &Tenant) -> Result<crate::adapters::catalog::ScanReport, ServiceError> {
        self.require_admin(tenant)?;
        let report = self.pager.rescan();
        {
            let mut infos = self.adapters.write().unwrap_or_else(PoisonError::into_inner);
            for name in &report.removed {
                infos.remove(name);
            }
            for name in report.added.iter().chain(&report.changed) {
                if let Some(e) = self.pager.catalog().get(name) {
                    let manifest = e.manifest.clone().unwrap_or_else(Manifest::unpriced);
                    let visible_to = self.visibility.get(name).cloned();
                    infos.insert(name.clone(), AdapterInfo { dir: e.dir.clone(), visible_to, manifest });
                }
            }
        }
        self.refresh_catalog();
        Ok(report)
    }

    /// The adapter pager (catalog, tiers, metrics).
    pub fn pager(&self) -> &Pager<B> {
        &self.pager
    }

    /// Hands plugins a fresh snapshot of the adapter catalog (names, generations, manifests).
    fn refresh_catalog(&self) {
        let Some(host) = &self.plugins else { return };
        let adapters = self.adapters_read();
        let facts = adapters.iter().map(|(name, info)| {
            let m = &info.manifest;
            pl::AdapterFacts {
                name: name.clone(),
                generation: self.pager.generation(name).map(|g| g.to_string()).unwrap_or_default(),
                tags: m.tags.clone(),
                owner: m.owner.clone(),
                license: m.license.clone(),
                description: m.description.clone(),
                price_per_1k_tokens: m.price_per_1k_tokens,
                datasets: m.datasets.iter().map(plugin_dataset).collect(),
            }
        });
        host.set_catalog(pl::Catalog::new(facts.collect::<Vec<_>>()));
    }

    /// The plugin host, when plugins are configured.
    pub fn plugins(&self) -> Option<&Arc<PluginHost>> {
        self.plugins.as_ref()
    }

    fn plugins_of(&self, kind: PluginKind) -> impl Iterator<Item = &str> {
        self.plugin_specs.iter().filter(move |(_, k)| *k == kind).map(|(n, _)| n.as_str())
    }

    fn plugin_use(&self, name: &str, kind: PluginKind) -> PluginUse {
        let version = self
            .plugins
            .as_ref()
            .and_then(|h| h.metrics().into_iter().find(|m| m.name == name))
            .map(|m| m.component_sha256)
            .unwrap_or_default();
        PluginUse { name: name.to_owned(), kind: kind.name().to_owned(), version }
    }

    /// Reloads plugin `name` from `path` (admin); the old version keeps serving calls in
    /// flight, and a version that fails to load or self-test is not swapped in.
    pub fn reload_plugin(&self, tenant: &Tenant, name: &str, path: Option<&Path>) -> Result<String, ServiceError> {
        self.require_admin(tenant)?;
        let host =
            self.plugins.as_ref().ok_or_else(|| ServiceError::new(ErrorKind::NotFound, "no plugins are configured"))?;
        let spec = host
            .spec(name)
            .ok_or_else(|| ServiceError::new(ErrorKind::NotFound, format!("no plugin named {name:?}")))?;
        let path = path.map_or(spec.path.clone(), Path::to_path_buf);
        let report = host.reload(name, &path).map_err(|e| ServiceError::bad("path", e.to_string()))?;
        Ok(report.component_sha256)
    }

    /// Loads (or replaces) adapter `name` from `dir` (admin). A replaced name points at the new
    /// generation at once; requests already running keep the old one.
    pub fn load_adapter(&self, tenant: &Tenant, name: &str, dir: &Path) -> Result<(), ServiceError> {
        self.require_admin(tenant)?;
        self.load_adapter_inner(name, dir, None)?;
        self.refresh_catalog();
        Ok(())
    }

    /// Unloads adapter `name` (admin); requests already running finish with it.
    pub fn unload_adapter(&self, tenant: &Tenant, name: &str) -> Result<(), ServiceError> {
        self.require_admin(tenant)?;
        let removed = self.adapters.write().unwrap_or_else(PoisonError::into_inner).remove(name);
        if removed.is_none() {
            return Err(ServiceError::new(ErrorKind::NotFound, format!("the adapter {name:?} is not loaded")));
        }
        let _ = self.pager.remove(name);
        self.metrics.adapter_unloads.fetch_add(1, Ordering::Relaxed);
        self.refresh_catalog();
        Ok(())
    }

    fn not_found(&self, name: &str) -> ServiceError {
        ServiceError {
            kind: ErrorKind::NotFound,
            message: format!("the model `{name}` does not exist"),
            param: Some("model".into()),
        }
    }

    /// Resolves the model field and the adapters extension to weighted adapters.
    #[allow(clippy::type_complexity)]
    fn resolve(
        &self,
        tenant: &Tenant,
        p: &GenerationParams,
    ) -> Result<(Vec<WeightedAdapter<B>>, Vec<AdapterUse>, Option<String>), ServiceError> {
        let mut choices = p.adapters.clone();
        if p.model != self.model_id {
            let known = self.adapters_read().get(&p.model).is_some_and(|i| self.visible(tenant, i));
            if !known {
                return Err(self.not_found(&p.model));
            }
            if choices.is_empty() {
                choices.push(AdapterChoice { name: p.model.clone(), weight: 1.0 });
            } else if !choices.iter().any(|c| c.name == p.model) {
                return Err(ServiceError::bad(
                    "adapters",
                    format!(
                        "`model` is the adapter `{}` but `adapters` does not list it; name the base model `{}` in `model` when composing",
                        p.model, self.model_id
                    ),
                ));
            }
        }
        let mut out = Vec::with_capacity(choices.len());
        let mut uses = Vec::with_capacity(choices.len());
        for c in &choices {
            if !c.weight.is_finite() {
                return Err(ServiceError::bad(
                    "adapters",
                    format!("adapter `{}`: weight must be a finite number", c.name),
                ));
            }
            let (visible, manifest) = match self.adapters_read().get(&c.name) {
                Some(i) => (self.visible(tenant, i), i.manifest.clone()),
                None => (false, Manifest::unpriced()),
            };
            let missing = || ServiceError {
                kind: ErrorKind::NotFound,
                message: format!("the adapter `{}` does not exist", c.name),
                param: Some("adapters".into()),
            };
            if !visible {
                return Err(missing());
            }
            // Resident: at once. Cold: a loader thread reads and prepares it while this request
            // waits here (the engine keeps decoding everyone else); concurrent requests for the
            // same adapter share one load. The Arc pins it until the request ends.
            let adapter = self.pager.acquire_blocking(&c.name).map_err(|e| match e {
                PagerError::NotFound(_) => missing(),
                PagerError::TooLarge { .. } | PagerError::NoRoom { .. } | PagerError::ShutDown(_) => {
                    ServiceError::new(ErrorKind::Overloaded, e.to_string())
                }
                PagerError::Load(_) => ServiceError::new(ErrorKind::Internal, e.to_string()),
            })?;
            uses.push(AdapterUse::new(&c.name, adapter.generation.to_string(), c.weight, &manifest));
            out.push(WeightedAdapter { adapter, weight: c.weight });
        }
        match &p.merge {
            Some(m) if !out.is_empty() => {
                let merged = self.merged(&choices, &out, m)?;
                let desc = format!(
                    "{} density={} majority_sign={} svd_rank={} seed={} -> {}",
                    m.method,
                    m.density.unwrap_or(1.0),
                    m.majority_sign_method.as_deref().unwrap_or("total"),
                    m.svd_rank.map_or_else(|| "auto".to_owned(), |r| r.to_string()),
                    m.seed.unwrap_or(0),
                    merged.generation
                );
                Ok((vec![WeightedAdapter { adapter: merged, weight: 1.0 }], uses, Some(desc)))
            }
            Some(_) => Err(ServiceError::bad("merge", "`merge` needs adapters to merge")),
            None => Ok((out, uses, None)),
        }
    }

    /// The merged adapter for `spec` over `inputs`, built once per recipe and inputs.
    fn merged(
        &self,
        choices: &[AdapterChoice],
        inputs: &[WeightedAdapter<B>],
        spec: &MergeSpec,
    ) -> Result<Arc<LoraAdapter<B>>, ServiceError> {
        let bad = |m: String| ServiceError::bad("merge", m);
        if spec.method.is_empty() {
            return Err(bad("`merge.method` is required (no merger plugin chose one)".into()));
        }
        let method = MergeMethod::parse(&spec.method).map_err(|e| bad(e.to_string()))?;
        let mut recipe = MergeRecipe::new(method, inputs.iter().map(|w| w.weight).collect());
        if let Some(d) = spec.density {
            recipe.density = d;
        }
        recipe.majority_sign = match spec.majority_sign_method.as_deref() {
            None | Some("total") => MajoritySign::Total,
            Some("frequency") => MajoritySign::Frequency,
            Some(other) => return Err(bad(format!("majority_sign_method `{other}` is not `total` or `frequency`"))),
        };
        recipe.svd_rank = spec.svd_rank;
        recipe.seed = spec.seed.unwrap_or(0);
        let gens: Vec<Generation> = inputs.iter().map(|w| w.adapter.generation).collect();
        let key = recipe.generation_of(&gens);
        if let Some((_, a)) = self.merged.lock().unwrap_or_else(PoisonError::into_inner).iter().find(|(g, _)| *g == key)
        {
            return Ok(a.clone());
        }
        let mut hosts = Vec::with_capacity(choices.len());
        for (c, w) in choices.iter().zip(inputs) {
            let dir =
                self.adapters_read().get(&c.name).map(|i| i.dir.clone()).ok_or_else(|| self.not_found(&c.name))?;
            let host = LoraHost::load(&c.name, &dir, &self.model.model.config)
                .map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))?;
            if host.generation != w.adapter.generation {
                return Err(ServiceError::new(
                    ErrorKind::Internal,
                    format!("adapter `{}` changed on disk since it was loaded; reload it first", c.name),
                ));
            }
            hosts.push(host);
        }
        let refs: Vec<&LoraHost> = hosts.iter().collect();
        let name = format!("merge-{}", &key.to_string()[..12]);
        let host = merge(&name, &refs, &recipe).map_err(|e| bad(e.to_string()))?;
        let prepared = Arc::new(
            LoraAdapter::prepare(&host, self.model.model.backend())
                .map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))?,
        );
        self.metrics.merges.fetch_add(1, Ordering::Relaxed);
        let mut cache = self.merged.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MERGED_CACHE {
            cache.remove(0);
        }
        cache.push((key, prepared.clone()));
        Ok(prepared)
    }

    /// Tokenizes the prompt (chat template for conversations).
    fn tokenize(&self, prompt: &PromptInput) -> Result<(Vec<u32>, bool), ServiceError> {
        let tok = &self.model.tokenizer;
        let enc = |t: &str| tok.encode(t, true).map_err(|e| ServiceError::bad("prompt", e.to_string()));
        Ok(match prompt {
            PromptInput::Text(t) => (enc(t)?, false),
            PromptInput::Tokens(ids) => (ids.clone(), false),
            PromptInput::Chat(messages) => {
                if messages.is_empty() {
                    return Err(ServiceError::bad("messages", "`messages` must not be empty"));
                }
                let text = self
                    .model
                    .chat_template
                    .render(messages, true)
                    .map_err(|e| ServiceError::bad("messages", e.to_string()))?;
                (enc(&text)?, true)
            }
        })
    }

    /// Starts a generation for `tenant`: checks, resolves, tokenizes and queues `n` sequences.
    pub fn start(&self, tenant: &Arc<Tenant>, p: GenerationParams) -> Result<Started, ServiceError> {
        let r = self.start_inner(tenant, p);
        if let Err(e) = &r {
            self.metrics.refused(e.kind);
        }
        r
    }

    /// Runs the preprocessors, the router and the merger on `p` (the plugin part of the
    /// journey); returns the plugins that acted.
    fn run_plugins(&self, tenant: &Tenant, p: &mut GenerationParams) -> Result<Vec<PluginUse>, ServiceError> {
        let Some(host) = self.plugins.clone() else { return Ok(Vec::new()) };
        let mut used = Vec::new();
        let failed = |e: pl::PluginFailure| {
            ServiceError::new(ErrorKind::Overloaded, format!("{e} (the plugin's failure policy is `closed`)"))
        };
        let warn = |name: &str, f: &Option<pl::PluginFailure>| {
            if let Some(f) = f {
                eprintln!("openlora: plugin {name} failed, continuing without it (fail-open): {f}");
            }
        };
        // 1. Preprocessors, in order, on the conversation (a text prompt is one user message).
        let to_messages = |prompt: &PromptInput| -> Option<Vec<pl::Message>> {
            match prompt {
                PromptInput::Chat(m) => Some(m.iter().map(|m| pl::Message::new(&m.role, &m.content)).collect()),
                PromptInput::Text(t) => Some(vec![pl::Message::new("user", t)]),
                PromptInput::Tokens(_) => None,
            }
        };
        for name in self.plugins_of(PluginKind::Preprocessor).map(str::to_owned).collect::<Vec<_>>() {
            let Some(messages) = to_messages(&p.prompt) else { break };
            let req = pl::PreprocessRequest {
                model: p.model.clone(),
                messages,
                metadata: p.metadata.clone(),
                tenant: tenant.name.clone(),
            };
            let h = host.preprocess(&name, &req).map_err(failed)?;
            warn(&name, &h.fallback);
            used.push(self.plugin_use(&name, PluginKind::Preprocessor));
            match h.value {
                pl::PreprocessOutcome::Unchanged => {}
                pl::PreprocessOutcome::Edited(ms) => {
                    p.prompt = match &p.prompt {
                        PromptInput::Text(_) => {
                            PromptInput::Text(ms.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"))
                        }
                        _ => PromptInput::Chat(ms.into_iter().map(|m| ChatMessage::new(m.role, m.content)).collect()),
                    }
                }
                pl::PreprocessOutcome::Reject(reason) => {
                    return Err(ServiceError::bad("messages", format!("rejected by plugin {name}: {reason}")));
                }
            }
        }
        // 2. The router, for requests that name the base model and choose no adapters.
        if let Some(name) = self.plugins_of(PluginKind::Router).next().map(str::to_owned)
            && p.model == self.model_id
            && p.adapters.is_empty()
        {
            let req = pl::RouteRequest {
                model: p.model.clone(),
                messages: to_messages(&p.prompt).unwrap_or_default(),
                metadata: p.metadata.clone(),
                tenant: tenant.name.clone(),
            };
            let h = host.route(&name, &req).map_err(failed)?;
            warn(&name, &h.fallback);
            used.push(self.plugin_use(&name, PluginKind::Router));
            match h.value {
                pl::RouteDecision::Default => {}
                pl::RouteDecision::Adapters(list) => {
                    p.adapters = list.into_iter().map(|a| AdapterChoice { name: a.name, weight: a.weight }).collect();
                }
                pl::RouteDecision::Reject(reason) => {
                    return Err(ServiceError::bad("model", format!("rejected by plugin {name}: {reason}")));
                }
            }
        }
        // 3. The merger picks the recipe when the request asks for a merge.
        if let Some(name) = self.plugins_of(PluginKind::Merger).next().map(str::to_owned)
            && p.merge.is_some()
        {
            let mut choices = p.adapters.clone();
            if choices.is_empty() && p.model != self.model_id {
                choices.push(AdapterChoice { name: p.model.clone(), weight: 1.0 });
            }
            if !choices.is_empty() {
                let req = pl::MergeRequest {
                    adapters: choices.iter().map(|c| pl::AdapterChoice::new(&c.name, c.weight)).collect(),
                    metadata: p.metadata.clone(),
                };
                let h = host.merge(&name, &req).map_err(failed)?;
                warn(&name, &h.fallback);
                used.push(self.plugin_use(&name, PluginKind::Merger));
                match h.value {
                    pl::MergeOutcome::Plan(plan) => {
                        for (c, w) in choices.iter_mut().zip(&plan.weights) {
                            c.weight = *w;
                        }
                        p.adapters = choices;
                        p.merge = Some(MergeSpec {
                            method: plan.method.name().to_owned(),
                            density: plan.density.map(f64::from),
                            majority_sign_method: Some(
                                if plan.majority_sign == MajoritySign::Frequency { "frequency" } else { "total" }
                                    .to_owned(),
                            ),
                            svd_rank: p.merge.as_ref().and_then(|m| m.svd_rank),
                            seed: p.merge.as_ref().and_then(|m| m.seed),
                        });
                    }
                    pl::MergeOutcome::Reject(reason) => {
                        return Err(ServiceError::bad("merge", format!("rejected by plugin {name}: {reason}")));
                    }
                }
            }
        }
        Ok(used)
    }

    fn start_inner(&self, tenant: &Arc<Tenant>, mut p: GenerationParams) -> Result<Started, ServiceError> {
        let started = Instant::now();
        let plugins_used = self.run_plugins(tenant, &mut p)?;
        let l = &self.limits;
        if p.n == 0 || p.n > l.max_n {
            return Err(ServiceError::bad("n", format!("n must be between 1 and {}", l.max_n)));
        }
        let max_tokens = p.max_tokens.unwrap_or(l.default_max_tokens);
        if max_tokens == 0 || max_tokens > l.max_tokens_limit {
            return Err(ServiceError::bad(
                "max_tokens",
                format!("max_tokens must be between 1 and {} (got {max_tokens})", l.max_tokens_limit),
            ));
        }
        p.sampling.validate().map_err(|e| ServiceError::bad(e.name, e.to_string()))?;
        if let Some(k) = p.logprobs
            && k > 20
        {
            return Err(ServiceError::bad("logprobs", "at most 20 alternatives per token"));
        }
        let (adapters, uses, merge_desc) = self.resolve(tenant, &p)?;
        let (prompt, chat) = self.tokenize(&p.prompt)?;
        if prompt.is_empty() {
            return Err(ServiceError::bad("prompt", "the prompt is empty"));
        }
        if prompt.len() > l.max_prompt_tokens {
            return Err(ServiceError::bad(
                "prompt",
                format!("the prompt has {} tokens; the limit is {}", prompt.len(), l.max_prompt_tokens),
            ));
        }
        let slot = if self.auth_required() {
            let prev = tenant.active.fetch_add(1, Ordering::SeqCst);
            let slot = Slot(tenant.clone());
            if prev >= tenant.max_concurrent {
                return Err(ServiceError::new(
                    ErrorKind::RateLimited,
                    format!(
                        "tenant {:?} already has {} requests in flight (limit {})",
                        tenant.name, prev, tenant.max_concurrent
                    ),
                ));
            }
            Some(slot)
        } else {
            None
        };
        let mut streams = Vec::with_capacity(p.n);
        for i in 0..p.n {
            let mut sampling = p.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            let req = Request {
                prompt: prompt.clone(),
                adapters: adapters.clone(),
                tenant: tenant.name.clone(),
                sampling,
                max_tokens,
                stop: p.stop.clone(),
                stop_at_eos: !p.ignore_eos,
                stop_token_ids: if chat && !p.ignore_eos { self.chat_stop_ids.clone() } else { Vec::new() },
                logprobs: p.logprobs,
            };
            // Dropping already-queued streams on error cancels them.
            streams.push(self.engine.submit(req)?);
        }
        let record = RecordContext {
            request_id: new_request_id(if chat { "chatcmpl" } else { "cmpl" }),
            tenant: tenant.name.clone(),
            adapters: uses,
            merge: merge_desc,
            prompt_sha256: tokens_sha256(&prompt),
            prompt_tokens: prompt.len(),
            plugins: plugins_used,
        };
        Ok(Started { streams, prompt_tokens: prompt.len(), model: p.model, slot, started, record })
    }

    /// The ledger, when attribution is on.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    /// Writes the receipt of a finished (or cancelled) request; the channel yields its id once
    /// it is durable. `None` when attribution is off.
    pub fn record(
        &self,
        ctx: &RecordContext,
        completion_tokens: usize,
        finish_reason: &str,
        outputs: &[&str],
    ) -> Result<Option<tokio::sync::oneshot::Receiver<Result<String, String>>>, ServiceError> {
        let Some(ledger) = self.ledger.as_ref() else { return Ok(None) };
        let mut record = InferenceRecord {
            request_id: ctx.request_id.clone(),
            tenant: ctx.tenant.clone(),
            time_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            base_model: self.base_use.clone(),
            adapters: ctx.adapters.clone(),
            merge: ctx.merge.clone(),
            prompt_tokens: ctx.prompt_tokens as u64,
            completion_tokens: completion_tokens as u64,
            finish_reason: finish_reason.to_owned(),
            plugins: ctx.plugins.clone(),
            prompt_sha256: ctx.prompt_sha256.clone(),
            output_sha256: text_sha256(&outputs.join("\0")),
        };
        let (attribution, refused) = self.attribute(&mut record);
        let rx = ledger.append(record, attribution);
        match refused {
            Some(e) => Err(e),
            None => Ok(Some(rx)),
        }
    }

    /// Splits the record's price: the attributor plugin when one is configured (its
    /// fail-open fallback is an equal split between the owners), else the built-in split. A
    /// fail-closed attributor failure charges nothing and fails the request.
    fn attribute(&self, record: &mut InferenceRecord) -> (Attribution, Option<ServiceError>) {
        let name = self.plugins_of(PluginKind::Attributor).next().map(str::to_owned);
        let (Some(host), Some(name)) = (self.plugins.as_ref(), name) else {
            return (builtin_attribution(record), None);
        };
        record.plugins.push(self.plugin_use(&name, PluginKind::Attributor));
        let total = record.total_price();
        let input = pl::InferenceRecord {
            request_id: record.request_id.clone(),
            tenant: record.tenant.clone(),
            time_ms: record.time_ms,
            base_model: pl::ModelUse {
                id: record.base_model.id.clone(),
                sha256: record.base_model.sha256.clone(),
                owner: record.base_model.owner.clone(),
                price_per_1k_tokens: record.base_model.price_per_1k_tokens,
            },
            adapters: record
                .adapters
                .iter()
                .map(|a| pl::AdapterUse {
                    name: a.name.clone(),
                    generation: a.generation.clone(),
                    weight: a.weight,
                    owner: a.owner.clone(),
                    price_per_1k_tokens: a.price_per_1k_tokens,
                    datasets: a.datasets.iter().map(plugin_dataset).collect(),
                })
                .collect(),
            merge: record.merge.clone(),
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.completion_tokens,
            finish_reason: record.finish_reason.clone(),
            price_micros: total,
        };
        match host.attribute(&name, &input) {
            Ok(h) => {
                let version = record.plugins.last().map(|u| u.version.clone()).unwrap_or_default();
                let attributor = match &h.fallback {
                    None => format!("plugin {name}@{}", &version[..version.len().min(12)]),
                    Some(f) => format!("equal split (fail-open fallback: {f})"),
                };
                let payments = h
                    .value
                    .into_iter()
                    .map(|p| Payment {
                        party: p.party,
                        role: p.role.name().to_owned(),
                        source: p.source,
                        micros: p.micros,
                    })
                    .collect();
                (Attribution { attributor, total_micros: total, payments }, None)
            }
            Err(e) => (
                Attribution { attributor: format!("none: {e}"), total_micros: 0, payments: Vec::new() },
                Some(ServiceError::new(ErrorKind::Internal, format!("attribution failed: {e}"))),
            ),
        }
    }

    /// A receipt by id, if `tenant` may read it (its own; admins any).
    pub fn receipt(&self, tenant: &Tenant, id: &str) -> Result<crate::attribution::Receipt, ServiceError> {
        let nf = || ServiceError::new(ErrorKind::NotFound, format!("no receipt {id}"));
        let ledger =
            self.ledger.as_ref().ok_or_else(|| ServiceError::new(ErrorKind::NotFound, "attribution is off"))?;
        match ledger.get(id).map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))? {
            Some((r, owner)) if tenant.is_admin() || owner == tenant.name => Ok(r),
            _ => Err(nf()),
        }
    }

    /// The text of one token (for logprobs).
    pub fn token_text(&self, id: u32) -> String {
        self.model.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}
