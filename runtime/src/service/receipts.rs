//! Receipts: the inference record of every request, written by the service from the tokens
//! actually produced, whatever the outcome (finished, stopped, cancelled, failed); the
//! attributor plugin (or the built-in split) divides its price; the ledger signs, chains and
//! makes it durable.

use std::time::{SystemTime, UNIX_EPOCH};

use openlora_kernels::Backend;

use super::Service;
use super::api::{ErrorKind, ServiceError};
use super::plugin_admin::was_unloaded;
use super::plugin_chain::{plugin_dataset, plugin_failed};
use super::tenancy::Tenant;
use crate::attribution::evidence::{Evidence, Source, evidence};
use crate::attribution::index::IndexState;
use crate::attribution::receipt::{AdapterUse, Attribution, InferenceRecord, Payment, PluginUse, text_sha256};
use crate::attribution::{Receipt, builtin_attribution};
use crate::plugins::{self as pl, FailurePolicy, PluginKind};

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
    /// The request's `user` (the caller's end-user id), if it sent one.
    pub user: Option<String>,
    /// The prompt as the model read it (its tokens decoded), kept only when an adapter's
    /// datasets are indexed: the evidence matcher excludes spans the prompt contains.
    pub prompt_text: Option<String>,
}

impl RecordContext {
    /// Combines the contexts of several prompts of one request (a completions list).
    /// The adapters and plugins of every part appear once each (a router may pick different
    /// adapters for different prompts).
    pub fn combine(mut parts: Vec<RecordContext>) -> Option<RecordContext> {
        if parts.len() <= 1 {
            return parts.pop();
        }
        let joined: String = parts.iter().map(|p| p.prompt_sha256.as_str()).collect();
        let mut first = parts[0].clone();
        first.prompt_tokens = parts.iter().map(|p| p.prompt_tokens).sum();
        first.prompt_sha256 = text_sha256(&joined);
        if parts.iter().any(|p| p.prompt_text.is_some()) {
            let texts: Vec<&str> = parts.iter().map(|p| p.prompt_text.as_deref().unwrap_or("")).collect();
            first.prompt_text = Some(texts.join("\0"));
        }
        for p in &parts[1..] {
            for a in &p.adapters {
                if !first
                    .adapters
                    .iter()
                    .any(|b| b.name == a.name && b.generation == a.generation && b.weight == a.weight)
                {
                    first.adapters.push(a.clone());
                }
            }
            for u in &p.plugins {
                if !first.plugins.contains(u) {
                    first.plugins.push(u.clone());
                }
            }
            if first.merge.is_none() {
                first.merge = p.merge.clone();
            }
        }
        Some(first)
    }
}

impl<B: Backend + Clone + 'static> Service<B> {
    /// The record of `ctx` with `completion_tokens` generated (attribution not yet run).
    fn inference_record(
        &self,
        ctx: &RecordContext,
        completion_tokens: usize,
        finish_reason: &str,
        outputs: &[&str],
    ) -> InferenceRecord {
        InferenceRecord {
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
            user: ctx.user.clone(),
            evidence: self.find_evidence(ctx, outputs),
        }
    }

    /// The verbatim-overlap evidence of `outputs` (None when off, when nothing was generated,
    /// or when no adapter of the request names dataset files).
    fn find_evidence(&self, ctx: &RecordContext, outputs: &[&str]) -> Option<Evidence> {
        let params = self.evidence.as_ref()?;
        let prompt = ctx.prompt_text.as_deref()?;
        if outputs.iter().all(|o| o.is_empty()) {
            return None;
        }
        let mut sources = Vec::new();
        for a in &ctx.adapters {
            for d in a.datasets.iter().filter(|d| !d.files.is_empty()) {
                let state = self.indexes.state(&d.sha256).unwrap_or(IndexState::Building);
                sources.push(Source { adapter: &a.name, dataset: d, state });
            }
        }
        let started = std::time::Instant::now();
        let ev = evidence(&sources, outputs, prompt, params);
        self.metrics.evidence_seconds.observe(started.elapsed().as_secs_f64());
        ev
    }

    /// Starts indexing (off the request path) every dataset with files that a registered
    /// adapter's manifest names and that is not indexed yet. Called whenever the catalog
    /// changes; idempotent.
    pub(super) fn index_datasets(&self) {
        if self.evidence.is_none() {
            return;
        }
        let catalog = self.pager.catalog();
        for name in catalog.names() {
            let Some(e) = catalog.get(&name) else { continue };
            for d in e.manifest.iter().flat_map(|m| &m.datasets) {
                self.indexes.ensure(&e.dir, d);
            }
        }
    }

    /// The prompt text a receipt's evidence needs: the decoded tokens, when one of the
    /// adapters names indexed dataset files (else nothing is kept).
    pub(super) fn evidence_prompt(&self, adapters: &[AdapterUse], tokens: &[u32]) -> Option<String> {
        self.evidence.as_ref()?;
        if !adapters.iter().any(|a| a.datasets.iter().any(|d| !d.files.is_empty())) {
            return None;
        }
        self.model.tokenizer.decode(tokens, false).ok()
    }

    /// The state of the index of the dataset with content hash `sha256`.
    pub fn dataset_index(&self, sha256: &str) -> Option<IndexState> {
        self.indexes.state(sha256)
    }

    /// Waits up to `timeout` for every dataset index being built; whether all are done.
    pub fn wait_for_indexes(&self, timeout: std::time::Duration) -> bool {
        self.indexes.wait_idle(timeout)
    }

    /// Writes the receipt of a finished, failed or cancelled request; the channel yields its
    /// id once it is durable. `None` when attribution is off. The receipt is written whatever
    /// the attributor does: a failing attributor is recorded in it (see [`Self::attribute`]).
    pub(super) fn record(
        &self,
        ctx: &RecordContext,
        completion_tokens: usize,
        finish_reason: &str,
        outputs: &[&str],
    ) -> Option<tokio::sync::oneshot::Receiver<Result<String, String>>> {
        let ledger = self.ledger.as_ref()?;
        let mut record = self.inference_record(ctx, completion_tokens, finish_reason, outputs);
        let attribution = self.attribute(&mut record);
        Some(ledger.append(record, attribution))
    }

    /// The attributor plugin, if the deployment has one and its failure policy is `closed`.
    pub(super) fn closed_attributor(&self) -> Option<String> {
        let host = self.plugins.get()?;
        let name = self.plugins_of(PluginKind::Attributor).into_iter().next()?;
        (host.spec(&name)?.failure == FailurePolicy::Closed).then_some(name)
    }

    /// Before generation, for a fail-closed attributor: runs it on the record this request
    /// would have if it generated `completion_tokens` (its most) and finished with `length`,
    /// and refuses the request if it fails. An attributor that cannot split this request's
    /// price is found before the model spends anything on it. (It is called again on the
    /// real record when the request ends; see [`Self::attribute`] for a failure then.)
    pub(super) fn attribution_dry_run(
        &self,
        tenant: &Tenant,
        ctx: &RecordContext,
        completion_tokens: usize,
    ) -> Result<(), ServiceError> {
        let (Some(host), Some(name)) = (self.plugins.get(), self.closed_attributor()) else { return Ok(()) };
        if self.ledger.is_none() {
            return Ok(());
        }
        let record = self.inference_record(ctx, completion_tokens, "length", &[]);
        match host.attribute(&name, &plugin_record(&record, record.total_price())) {
            Err(f) if !was_unloaded(&f) => Err(plugin_failed(tenant, PluginKind::Attributor, &f)),
            _ => Ok(()),
        }
    }

    /// Splits the record's price: the attributor plugin when one is configured, else the
    /// built-in split. When the plugin fails (after the dry run passed, or fail-open), the
    /// receipt says so, with no guest-written text (tenants read their receipts):
    /// - fail-open: the fallback, an equal split between the owners, is paid;
    /// - fail-closed: nothing is split and nothing is charged (`total_micros` 0, no payments;
    ///   the record's token counts and prices still say what was used, so it can be billed
    ///   once the attributor is fixed).
    ///
    /// Either way the answer is returned: a stream has already delivered it, and a whole
    /// answer is treated alike. The request was refused before generation if the attributor
    /// could not split its worst case ([`Self::attribution_dry_run`]).
    fn attribute(&self, record: &mut InferenceRecord) -> Attribution {
        let name = self.plugins_of(PluginKind::Attributor).into_iter().next();
        let (Some(host), Some(name)) = (self.plugins.get(), name) else {
            return builtin_attribution(record);
        };
        let plugin = self.plugin_use(&name, PluginKind::Attributor);
        let version = plugin.version[..plugin.version.len().min(12)].to_owned();
        record.plugins.push(plugin);
        let total = record.total_price();
        let answer = host.attribute(&name, &plugin_record(record, total));
        // Unloaded since the request read the chain: split as a deployment without it would.
        if answer.as_ref().is_err_and(was_unloaded) {
            record.plugins.pop();
            return builtin_attribution(record);
        }
        match answer {
            Ok(h) => {
                let attributor = match &h.fallback {
                    None => format!("plugin {name}@{version}"),
                    Some(f) => format!("equal split (fail-open fallback: attribution failed: {})", f.summary()),
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
                Attribution { attributor, total_micros: total, payments }
            }
            Err(f) => {
                eprintln!(
                    "openlora: request {}: attribution failed, recorded with no payments (fail-closed): {f}",
                    record.request_id
                );
                Attribution {
                    attributor: format!(
                        "attribution failed: {} (plugin {name}@{version}, fail-closed: nothing split, nothing charged; price was {total} micros)",
                        f.summary()
                    ),
                    total_micros: 0,
                    payments: Vec::new(),
                }
            }
        }
    }

    /// A receipt by id, if `tenant` may read it (its own; admins any).
    pub fn receipt(&self, tenant: &Tenant, id: &str) -> Result<Receipt, ServiceError> {
        let nf = || ServiceError::new(ErrorKind::NotFound, format!("no receipt {id}"));
        let ledger =
            self.ledger.as_ref().ok_or_else(|| ServiceError::new(ErrorKind::NotFound, "attribution is off"))?;
        match ledger.get(id).map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))? {
            Some((r, owner)) if tenant.is_admin() || owner == tenant.name => Ok(r),
            _ => Err(nf()),
        }
    }
}

/// The record as the attributor sees it, priced at `total` micros.
fn plugin_record(record: &InferenceRecord, total: u64) -> pl::InferenceRecord {
    pl::InferenceRecord {
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
        evidence: crate::attribution::receipt::record_evidence_weights(record)
            .into_iter()
            .map(|(adapter, dataset, contributor, weight)| pl::EvidenceShare {
                adapter,
                dataset,
                contributor,
                weight: u64::try_from(weight).unwrap_or(u64::MAX),
            })
            .collect(),
    }
}
