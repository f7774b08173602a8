//! The plugin chain of a request: preprocessors (in order) edit or refuse the prompt, the
//! router picks adapters for requests that name the base model and no adapters, the merger
//! picks a recipe for requests that ask for a merge. Plugins see names, indices and manifests,
//! never weights. The attributor, the last plugin of the journey, runs in `receipts`.
//!
//! What a client is told when a plugin acts against its request:
//! - A plugin that *decides* to refuse (`Reject(reason)`) gets a 400 whose message quotes the
//!   plugin's reason and says the plugin wrote it (it is the plugin's policy, not a field the
//!   client got wrong, so no `param`).
//! - A plugin that *fails* under `failure = "closed"` (trap, panic, timeout, fuel, memory, an
//!   unusable answer, quarantine) gets a 500 that names the plugin and what happened, never the
//!   guest's own text (a panic message may quote another tenant's prompt or a secret from its
//!   config): that goes to the server log, and to admins in the response. Only a call the
//!   host could not run for load (`Busy`, `Starved`, `Host`) is a 503 `overloaded_error`, the
//!   status OpenAI clients retry, because a retry may then succeed.
//! - A router whose choice cannot be served (an adapter the tenant may not use, or a list
//!   beyond the deployment's limits) is reported as the router's doing, without naming the
//!   adapter and without pointing at a request field the client never sent.

use openlora_kernels::Backend;

use super::Service;
use super::api::{AdapterChoice, ErrorKind, GenerateRequest, MergeSpec, PromptInput, ServiceError};
use super::plugin_admin::was_unloaded;
use super::tenancy::Tenant;
use crate::adapters::manifest::{Dataset, Manifest};
use crate::adapters::merge::MajoritySign;
use crate::attribution::receipt::PluginUse;
use crate::model::chat_template::ChatMessage;
use crate::plugins::{self as pl, PluginKind};

/// The longest plugin-written refusal reason a client is shown (bytes); longer ones are cut.
const MAX_REASON_BYTES: usize = 1024;

/// What the plugin chain did to one request.
pub(super) struct ChainOutcome {
    /// The plugins that acted, for the receipt.
    pub used: Vec<PluginUse>,
    /// The router whose choice `adapters` now holds, if one chose adapters.
    pub routed_by: Option<String>,
}

/// The 400 of a plugin's decision to refuse: its reason, quoted and marked as the plugin's.
fn plugin_refusal(kind: PluginKind, name: &str, reason: &str) -> ServiceError {
    let mut cut = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let more = if cut < reason.len() { " (cut)" } else { "" };
    ServiceError {
        kind: ErrorKind::BadRequest,
        message: format!(
            "the {kind} plugin `{name}` refused this request; its reason, written by the plugin: {:?}{more}",
            &reason[..cut]
        ),
        param: None,
    }
}

/// The 404 of a router that chose an adapter this tenant may not use (or that does not
/// exist): the same words either way, naming the router and not the adapter.
fn router_chose_unknown(name: &str) -> ServiceError {
    ServiceError {
        kind: ErrorKind::NotFound,
        message: format!(
            "the router plugin `{name}` chose an adapter that does not exist for this tenant (the router's choice, not a field of the request)"
        ),
        param: None,
    }
}

/// Re-attributes an error about the `adapters` list to the router that wrote it, for a
/// request whose adapters the router chose (`routed_by`); other errors pass unchanged.
pub(super) fn blame_router(routed_by: Option<&str>, e: ServiceError) -> ServiceError {
    match routed_by {
        Some(name) if e.param.as_deref() == Some("adapters") => {
            if e.kind == ErrorKind::NotFound {
                router_chose_unknown(name)
            } else {
                ServiceError {
                    kind: ErrorKind::Internal,
                    message: format!("the router plugin `{name}` chose adapters that cannot be served: {}", e.message),
                    param: None,
                }
            }
        }
        _ => e,
    }
}

/// A manifest dataset as plugins see it.
pub(super) fn plugin_dataset(d: &Dataset) -> pl::Dataset {
    pl::Dataset {
        id: d.id.clone(),
        sha256: d.sha256.clone(),
        license: d.license.clone(),
        contributors: d.contributors.iter().map(|c| pl::Contributor { name: c.name.clone(), share: c.share }).collect(),
    }
}

impl<B: Backend + Clone + 'static> Service<B> {
    /// Hands plugins a fresh snapshot of the adapter catalog (names, generations, manifests).
    pub(super) fn refresh_plugin_catalog(&self) {
        let Some(host) = self.plugins.get() else { return };
        let catalog = self.pager.catalog();
        let entries: Vec<_> = catalog.names().into_iter().filter_map(|n| catalog.get(&n)).collect();
        let unpriced = Manifest::unpriced();
        let facts = entries.iter().map(|e| {
            let m = e.manifest.as_ref().unwrap_or(&unpriced);
            pl::AdapterFacts {
                name: e.name.clone(),
                generation: self.pager.generation(&e.name).map(|g| g.to_string()).unwrap_or_default(),
                tags: m.tags.clone(),
                owner: m.owner.clone(),
                license: m.license.clone(),
                description: m.description.clone(),
                price_per_1k_tokens: m.price_per_1k_tokens,
                datasets: m.datasets.iter().map(plugin_dataset).collect(),
            }
        });
        host.set_catalog(pl::CatalogView::new(facts.collect::<Vec<_>>()));
    }

    /// The plugin host, once a plugin has been loaded (at start or through the admin API).
    pub fn plugins(&self) -> Option<&std::sync::Arc<pl::PluginHost>> {
        self.plugins.get()
    }

    pub(super) fn plugin_use(&self, name: &str, kind: PluginKind) -> PluginUse {
        let version = self
            .plugins
            .get()
            .and_then(|h| h.metrics().into_iter().find(|m| m.name == name))
            .map(|m| m.component_sha256)
            .unwrap_or_default();
        PluginUse { name: name.to_owned(), kind: kind.name().to_owned(), version }
    }

    /// Runs the preprocessors, the router and the merger on `p` (the plugin part of the
    /// journey); returns the plugins that acted.
    pub(super) fn run_plugins(&self, tenant: &Tenant, p: &mut GenerateRequest) -> Result<ChainOutcome, ServiceError> {
        let failed = |kind: PluginKind| move |e: pl::PluginFailure| plugin_failed(tenant, kind, &e);
        let Some(host) = self.plugins.get().cloned() else {
            return Ok(ChainOutcome { used: Vec::new(), routed_by: None });
        };
        let mut used = Vec::new();
        let mut routed_by = None;
        let warn = |name: &str, f: &Option<pl::PluginFailure>| {
            if let Some(f) = f {
                eprintln!("openlora: plugin {name} failed, continuing without it (fail-open): {f}");
            }
        };
        // 1. Preprocessors, in order, on the conversation (a text prompt is one user message).
        // Token-id prompts are shown to plugins as their text, so a preprocessor sees (and may
        // redact) exactly what the model would read; an edit replaces the ids with the edited
        // text, tokenized like any text prompt.
        let tokenizer = &self.model.tokenizer;
        let to_messages = |prompt: &PromptInput| -> Result<Vec<pl::Message>, ServiceError> {
            Ok(match prompt {
                PromptInput::Chat(m) => m.iter().map(|m| pl::Message::new(&m.role, &m.content)).collect(),
                PromptInput::Text(t) => vec![pl::Message::new("user", t)],
                PromptInput::Tokens(ids) => {
                    let text = tokenizer.decode(ids, false).map_err(|e| ServiceError::bad("prompt", e.to_string()))?;
                    vec![pl::Message::new("user", &text)]
                }
            })
        };
        // A plugin unloaded after the chain was read (`was_unloaded`) is skipped: the request
        // runs as it would have a moment later, without it.
        for name in self.plugins_of(PluginKind::Preprocessor) {
            let messages = to_messages(&p.prompts[0])?;
            let req = pl::PreprocessRequest {
                model: p.model.clone(),
                messages,
                metadata: p.metadata.clone(),
                tenant: tenant.name.clone(),
            };
            let h = match host.preprocess(&name, &req) {
                Err(f) if was_unloaded(&f) => continue,
                h => h.map_err(failed(PluginKind::Preprocessor))?,
            };
            warn(&name, &h.fallback);
            used.push(self.plugin_use(&name, PluginKind::Preprocessor));
            match h.value {
                pl::PreprocessOutcome::Unchanged => {}
                pl::PreprocessOutcome::Edited(ms) => {
                    p.prompts[0] = match &p.prompts[0] {
                        PromptInput::Text(_) | PromptInput::Tokens(_) => {
                            PromptInput::Text(ms.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"))
                        }
                        // Plugins see and edit roles and text; a message that keeps its place
                        // and role keeps its tool calls (or call id).
                        PromptInput::Chat(old) => PromptInput::Chat(
                            ms.into_iter()
                                .enumerate()
                                .map(|(i, m)| match old.get(i).filter(|o| o.role == m.role) {
                                    Some(o) => ChatMessage { content: m.content, ..o.clone() },
                                    None => ChatMessage::new(m.role, m.content),
                                })
                                .collect(),
                        ),
                    }
                }
                pl::PreprocessOutcome::Reject(reason) => {
                    return Err(plugin_refusal(PluginKind::Preprocessor, &name, &reason));
                }
            }
        }
        // 2. The router, for requests that name the base model and choose no adapters.
        if let Some(name) = self.plugins_of(PluginKind::Router).into_iter().next()
            && p.model == self.model_id
            && p.adapters.is_empty()
        {
            let req = pl::RouteRequest {
                model: p.model.clone(),
                messages: to_messages(&p.prompts[0])?,
                metadata: p.metadata.clone(),
                tenant: tenant.name.clone(),
            };
            let h = match host.route(&name, &req) {
                Err(f) if was_unloaded(&f) => None,
                h => Some(h.map_err(failed(PluginKind::Router))?),
            };
            if let Some(h) = &h {
                warn(&name, &h.fallback);
                used.push(self.plugin_use(&name, PluginKind::Router));
            }
            match h.map_or(pl::RouteDecision::Default, |h| h.value) {
                pl::RouteDecision::Default => {}
                pl::RouteDecision::Adapters(list) => {
                    // The router sees every adapter; the tenant may not. Refuse without naming
                    // what it chose, so a router cannot reveal an adapter the caller may not see.
                    let catalog = self.pager.catalog();
                    if list.iter().any(|a| !catalog.get(&a.name).is_some_and(|e| tenant.may_use(&e))) {
                        return Err(router_chose_unknown(&name));
                    }
                    let list: Vec<AdapterChoice> =
                        list.into_iter().map(|a| AdapterChoice { name: a.name, weight: a.weight }).collect();
                    // The deployment's limits bind the router as they bind clients; what breaks
                    // them is the router's fault, reported as such.
                    self.check_adapter_list(&list).map_err(|e| blame_router(Some(&name), e))?;
                    if let Some(a) = list.iter().find(|a| !a.weight.is_finite()) {
                        return Err(blame_router(
                            Some(&name),
                            ServiceError::bad(
                                "adapters",
                                format!("adapter `{}`: the weight {} is not finite", a.name, a.weight),
                            ),
                        ));
                    }
                    if !list.is_empty() {
                        routed_by = Some(name.clone());
                    }
                    p.adapters = list;
                }
                pl::RouteDecision::Reject(reason) => {
                    return Err(plugin_refusal(PluginKind::Router, &name, &reason));
                }
            }
        }
        // 3. The merger picks the recipe when the request asks for a merge.
        if let Some(name) = self.plugins_of(PluginKind::Merger).into_iter().next()
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
                let h = match host.merge(&name, &req) {
                    Err(f) if was_unloaded(&f) => None,
                    h => Some(h.map_err(failed(PluginKind::Merger))?),
                };
                if let Some(h) = &h {
                    warn(&name, &h.fallback);
                    used.push(self.plugin_use(&name, PluginKind::Merger));
                }
                match h.map(|h| h.value) {
                    None => {}
                    Some(pl::MergeOutcome::Plan(plan)) => {
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
                    Some(pl::MergeOutcome::Reject(reason)) => {
                        return Err(plugin_refusal(PluginKind::Merger, &name, &reason));
                    }
                }
            }
        }
        Ok(ChainOutcome { used, routed_by })
    }
}

/// The error of a fail-closed plugin's failure, as the client sees it: a 500 naming the
/// plugin and what happened (a 503 only when the host was overloaded), without the guest's
/// own text unless the caller is an admin. The whole failure goes to the server's log.
pub(super) fn plugin_failed(tenant: &Tenant, kind: PluginKind, f: &pl::PluginFailure) -> ServiceError {
    eprintln!("openlora: the {kind} {f}; its failure policy is `closed`, so the request is refused");
    let overload = f.error.is_overload();
    let mut message = format!(
        "the {kind} {}; its failure policy is `closed`, so the request is refused{}",
        f.summary(),
        if overload { " (a retry may succeed)" } else { "" }
    );
    if tenant.is_admin() {
        message.push_str(&format!(" [admin detail: {f}]"));
    }
    ServiceError { kind: if overload { ErrorKind::Overloaded } else { ErrorKind::Internal }, message, param: None }
}
