//! From names to weights: the `model` field and the `adapters` extension become weighted
//! adapter generations the engine can apply, checked against what the tenant may see; a
//! `merge` becomes one derived adapter built by the pager (once per recipe and inputs); the
//! prompt becomes token ids through the chat template.

use std::sync::Arc;

use openlora_kernels::Backend;

use super::Service;
use super::api::{AdapterChoice, ErrorKind, GenerateRequest, MergeSpec, PromptInput, ServiceError};
use super::tenancy::Tenant;
use crate::adapters::manifest::Manifest;
use crate::adapters::merge::{MajoritySign, MergeMethod, MergeRecipe, merge};
use crate::adapters::pager::PagerError;
use crate::adapters::{AdapterError, LoraHost};
use crate::attribution::receipt::AdapterUse;
use crate::lora::{Generation, LoraAdapter, WeightedAdapter};

/// What resolution produced for one request.
pub(super) struct Resolved<B: Backend> {
    /// The adapters the engine applies (one merged adapter for a merge).
    pub adapters: Vec<WeightedAdapter<B>>,
    /// What the receipt says about each adapter the request named.
    pub uses: Vec<AdapterUse>,
    /// The merge recipe, described, if merged.
    pub merge: Option<String>,
}

fn pager_error(e: PagerError, missing: impl FnOnce() -> ServiceError) -> ServiceError {
    match e {
        PagerError::NotFound(_) => missing(),
        PagerError::TooLarge { .. }
        | PagerError::NoRoom { .. }
        | PagerError::ShutDown(_)
        | PagerError::TimedOut { .. }
        | PagerError::Busy { .. } => ServiceError::new(ErrorKind::Overloaded, e.to_string()),
        PagerError::Load(_) | PagerError::Panicked { .. } => {
            // The full error names files on the server; it goes to the log, not to the client.
            eprintln!("openlora: {e}");
            ServiceError::internal("an adapter could not be loaded (the server log has the reason)")
        }
        PagerError::Recipe(_) => ServiceError::bad("merge", e.to_string()),
    }
}

impl<B: Backend + Clone + 'static> Service<B> {
    pub(super) fn not_found(&self, name: &str) -> ServiceError {
        ServiceError {
            kind: ErrorKind::NotFound,
            message: format!("the model `{name}` does not exist"),
            param: Some("model".into()),
        }
    }

    /// Refuses an adapter list longer than the deployment allows, or naming an adapter twice
    /// (each entry is a LoRA term on the shared engine thread).
    pub(super) fn check_adapter_list(&self, list: &[AdapterChoice]) -> Result<(), ServiceError> {
        let max = self.limits.max_adapters;
        if list.len() > max {
            return Err(ServiceError::bad(
                "adapters",
                format!("{} adapters in one request; the limit is {max} (server.max_adapters_per_request)", list.len()),
            ));
        }
        for (i, c) in list.iter().enumerate() {
            if list[..i].iter().any(|d| d.name == c.name) {
                return Err(ServiceError::bad(
                    "adapters",
                    format!("the adapter `{}` is listed twice; give it one entry with the sum of the weights", c.name),
                ));
            }
        }
        Ok(())
    }

    /// Resolves the model field and the adapters extension to weighted adapters. Blocks while a
    /// cold adapter loads (other requests keep decoding) or a merge is built.
    pub(super) fn resolve(&self, tenant: &Tenant, p: &GenerateRequest) -> Result<Resolved<B>, ServiceError> {
        let catalog = self.pager.catalog();
        let mut choices = p.adapters.clone();
        if p.model != self.model_id {
            if !catalog.get(&p.model).is_some_and(|e| tenant.may_use(&e)) {
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
        self.check_adapter_list(&choices)?;
        let mut out = Vec::with_capacity(choices.len());
        let mut uses = Vec::with_capacity(choices.len());
        for c in &choices {
            if !c.weight.is_finite() {
                return Err(ServiceError::bad(
                    "adapters",
                    format!("adapter `{}`: weight must be a finite number", c.name),
                ));
            }
            let missing = || ServiceError {
                kind: ErrorKind::NotFound,
                message: format!("the adapter `{}` does not exist", c.name),
                param: Some("adapters".into()),
            };
            let entry = catalog.get(&c.name).filter(|e| tenant.may_use(e)).ok_or_else(missing)?;
            // Resident: at once. Cold: a loader thread reads and prepares it while this request
            // waits here (the engine keeps decoding everyone else); concurrent requests for the
            // same adapter share one load. The Arc pins it until the request ends.
            let adapter = self.pager.acquire_blocking(&c.name).map_err(|e| pager_error(e, missing))?;
            let manifest = entry.manifest.clone().unwrap_or_else(Manifest::unpriced);
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
                Ok(Resolved {
                    adapters: vec![WeightedAdapter { adapter: merged, weight: 1.0 }],
                    uses,
                    merge: Some(desc),
                })
            }
            Some(_) => Err(ServiceError::bad("merge", "`merge` needs adapters to merge")),
            None => Ok(Resolved { adapters: out, uses, merge: None }),
        }
    }

    /// The merged adapter for `spec` over `inputs`: a derived entry of the pager keyed by the
    /// hash of the recipe and the inputs' generations, so it is built once however many
    /// requests ask for it at the same time, counts against the device budget and is evicted
    /// by LRU like any adapter.
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
        // The rank the merge produces: `cat` concatenates, SVD methods truncate to `svd_rank`
        // (default: the largest input rank), the others keep the inputs' rank.
        let max_rank = self.limits.max_merged_rank;
        let ranks: Vec<usize> =
            choices.iter().map(|c| self.pager.catalog().get(&c.name).map_or(0, |e| e.max_rank)).collect();
        let produced = if spec.method == "cat" {
            ranks.iter().sum()
        } else if spec.method.contains("svd") {
            spec.svd_rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0))
        } else {
            ranks.iter().copied().max().unwrap_or(0)
        };
        if produced > max_rank {
            return Err(bad(format!(
                "this merge would produce rank {produced}; the limit is {max_rank} (server.max_merged_rank)"
            )));
        }
        if spec.method.contains("svd") {
            // The rank checked is the rank built (the merge's own default reads the configs).
            recipe.svd_rank = Some(produced);
        }
        let gens: Vec<Generation> = inputs.iter().map(|w| w.adapter.generation).collect();
        let key = recipe.generation_of(&gens);
        let label = format!("merge-{}", &key.to_string()[..12]);
        let catalog = self.pager.catalog();
        let base = &self.model.model.config;
        let build = || -> Result<LoraHost, PagerError> {
            let mut hosts = Vec::with_capacity(choices.len());
            for (c, w) in choices.iter().zip(inputs) {
                let entry = catalog.get(&c.name).ok_or_else(|| PagerError::NotFound(c.name.clone()))?;
                let host = LoraHost::load(&c.name, &entry.dir, base)?;
                if host.generation != w.adapter.generation {
                    return Err(PagerError::Load(Arc::new(AdapterError::Invalid {
                        adapter: c.name.clone(),
                        tensor: String::new(),
                        reason: "changed on disk since it was loaded; reload it first".into(),
                    })));
                }
                hosts.push(host);
            }
            let refs: Vec<&LoraHost> = hosts.iter().collect();
            merge(&label, &refs, &recipe).map_err(|e| PagerError::Recipe(Arc::new(e)))
        };
        self.pager.acquire_derived(key, &label, build).map_err(|e| {
            let missing = match &e {
                PagerError::NotFound(name) => Some(name.clone()),
                _ => None,
            };
            pager_error(e, || ServiceError {
                kind: ErrorKind::NotFound,
                message: format!("the adapter `{}` does not exist", missing.unwrap_or_default()),
                param: Some("adapters".into()),
            })
        })
    }

    /// Tokenizes a prompt (chat template for conversations, with the tools it renders).
    pub(super) fn tokenize(
        &self,
        prompt: &PromptInput,
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>, ServiceError> {
        let tok = &self.model.tokenizer;
        let enc = |t: &str| tok.encode(t, true).map_err(|e| ServiceError::bad("prompt", e.to_string()));
        match prompt {
            PromptInput::Text(t) => enc(t),
            PromptInput::Tokens(ids) => Ok(ids.clone()),
            PromptInput::Chat(messages) => {
                if messages.is_empty() {
                    return Err(ServiceError::bad("messages", "`messages` must not be empty"));
                }
                let text = self
                    .model
                    .chat_template
                    .render_with_tools(messages, tools, true)
                    .map_err(|e| ServiceError::bad("messages", e.to_string()))?;
                enc(&text)
            }
        }
    }
}
