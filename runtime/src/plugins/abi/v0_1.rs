//! ABI `openlora:plugin@0.1.x`: wasmtime bindings for the four worlds, the host side of the
//! granted interfaces, and conversions between the generated types and [`super::super::types`].
//!
//! This module is frozen with the 0.1 WIT: when 0.2 exists it gets a sibling module, and
//! plugins built against 0.1 keep loading through this one.

use wasmtime::component::{HasSelf, Linker};

use super::super::config::PluginKind;
use super::super::sandbox::{self, CallState};
use super::super::types as host;

#[allow(missing_docs, clippy::all)]
mod bindings {
    pub mod router {
        wasmtime::component::bindgen!({ path: "../plugin-sdk/wit", world: "router" });
    }
    pub mod merger {
        wasmtime::component::bindgen!({
            path: "../plugin-sdk/wit",
            world: "merger",
            with: {
                "openlora:plugin/types": super::router::openlora::plugin::types,
                "openlora:plugin/logging": super::router::openlora::plugin::logging,
                "openlora:plugin/config": super::router::openlora::plugin::config,
                "openlora:plugin/catalog": super::router::openlora::plugin::catalog,
            },
        });
    }
    pub mod preprocessor {
        wasmtime::component::bindgen!({
            path: "../plugin-sdk/wit",
            world: "preprocessor",
            with: {
                "openlora:plugin/types": super::router::openlora::plugin::types,
                "openlora:plugin/logging": super::router::openlora::plugin::logging,
                "openlora:plugin/config": super::router::openlora::plugin::config,
            },
        });
    }
    pub mod attributor {
        wasmtime::component::bindgen!({
            path: "../plugin-sdk/wit",
            world: "attributor",
            with: {
                "openlora:plugin/types": super::router::openlora::plugin::types,
                "openlora:plugin/logging": super::router::openlora::plugin::logging,
                "openlora:plugin/config": super::router::openlora::plugin::config,
                "openlora:plugin/catalog": super::router::openlora::plugin::catalog,
            },
        });
    }
    pub mod evidence_attributor {
        wasmtime::component::bindgen!({
            path: "../plugin-sdk/wit",
            world: "evidence-attributor",
            with: {
                "openlora:plugin/types": super::router::openlora::plugin::types,
                "openlora:plugin/logging": super::router::openlora::plugin::logging,
                "openlora:plugin/config": super::router::openlora::plugin::config,
                "openlora:plugin/catalog": super::router::openlora::plugin::catalog,
            },
        });
    }
}

use bindings::router::openlora::plugin::{catalog, config, logging, types};
use bindings::{attributor, evidence_attributor, merger, preprocessor, router};

pub(crate) use attributor::AttributorPre;
pub(crate) use evidence_attributor::EvidenceAttributorPre;
pub(crate) use merger::MergerPre;
pub(crate) use preprocessor::PreprocessorPre;
pub(crate) use router::RouterPre;

/// A linker for `kind` with exactly the interfaces the kind is granted.
pub(crate) fn linker(engine: &wasmtime::Engine, kind: PluginKind) -> wasmtime::Result<Linker<CallState>> {
    let mut linker = Linker::new(engine);
    match kind {
        PluginKind::Router => router::Router::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?,
        PluginKind::Merger => merger::Merger::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?,
        PluginKind::Preprocessor => preprocessor::Preprocessor::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?,
        PluginKind::Attributor => attributor::Attributor::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?,
    }
    Ok(linker)
}

// ---- host side of the granted interfaces -------------------------------------------------

impl types::Host for CallState {}

impl logging::Host for CallState {
    fn log(&mut self, level: logging::Level, message: String) {
        let level = match level {
            logging::Level::Trace => host_log::Trace,
            logging::Level::Debug => host_log::Debug,
            logging::Level::Info => host_log::Info,
            logging::Level::Warn => host_log::Warn,
            logging::Level::Error => host_log::Error,
        };
        self.guest_log(level, &message);
    }

    fn report_panic(&mut self, message: String, location: String) {
        self.guest_panicked(message, location);
    }
}

use super::super::sandbox::LogLevel as host_log;

impl config::Host for CallState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.flat.get(&key).cloned()
    }

    fn entries(&mut self) -> Vec<(String, String)> {
        self.config.flat.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn json(&mut self) -> String {
        self.config.json.clone()
    }
}

impl catalog::Host for CallState {
    fn adapter(&mut self, name: String) -> Option<types::AdapterFacts> {
        self.catalog.get(&name).map(facts)
    }

    fn adapters(&mut self) -> Vec<types::AdapterFacts> {
        self.catalog.iter().map(facts).collect()
    }
}

fn datasets(datasets: &[host::Dataset]) -> Vec<types::Dataset> {
    datasets
        .iter()
        .map(|d| types::Dataset {
            id: d.id.clone(),
            sha256: d.sha256.clone(),
            license: d.license.clone(),
            contributors: d
                .contributors
                .iter()
                .map(|c| types::Contributor { name: c.name.clone(), share: c.share })
                .collect(),
        })
        .collect()
}

fn facts(a: &host::AdapterFacts) -> types::AdapterFacts {
    types::AdapterFacts {
        name: a.name.clone(),
        generation: a.generation.clone(),
        tags: a.tags.clone(),
        owner: a.owner.clone(),
        license: a.license.clone(),
        description: a.description.clone(),
        price_per_1k_tokens: a.price_per_1k_tokens,
        datasets: datasets(&a.datasets),
    }
}

// ---- calls -------------------------------------------------------------------------------

fn messages(messages: &[host::Message]) -> Vec<types::Message> {
    messages.iter().map(|m| types::Message { role: m.role.clone(), content: m.content.clone() }).collect()
}

fn choices(adapters: &[host::AdapterChoice]) -> Vec<types::AdapterChoice> {
    adapters.iter().map(|a| types::AdapterChoice { name: a.name.clone(), weight: a.weight }).collect()
}

fn choices_back(adapters: Vec<types::AdapterChoice>) -> Vec<host::AdapterChoice> {
    adapters.into_iter().map(|a| host::AdapterChoice { name: a.name, weight: a.weight }).collect()
}

/// Instantiates a router and routes one request.
pub(crate) fn route(
    pre: &RouterPre<CallState>,
    store: &mut wasmtime::Store<CallState>,
    request: &host::RouteRequest,
) -> wasmtime::Result<host::RouteDecision> {
    use router::exports::openlora::plugin::routing as wit;
    let instance = pre.instantiate(&mut *store).map_err(sandbox::instantiating)?;
    let request = wit::RouteRequest {
        model: request.model.clone(),
        messages: messages(&request.messages),
        metadata: request.metadata.clone(),
        tenant: request.tenant.clone(),
    };
    Ok(match instance.openlora_plugin_routing().call_route(&mut *store, &request)? {
        wit::RouteDecision::DefaultRoute => host::RouteDecision::Default,
        wit::RouteDecision::Adapters(adapters) => host::RouteDecision::Adapters(choices_back(adapters)),
        wit::RouteDecision::Reject(reason) => host::RouteDecision::Reject(reason),
    })
}

/// Instantiates a preprocessor and preprocesses one request.
pub(crate) fn preprocess(
    pre: &PreprocessorPre<CallState>,
    store: &mut wasmtime::Store<CallState>,
    request: &host::PreprocessRequest,
) -> wasmtime::Result<host::PreprocessOutcome> {
    use preprocessor::exports::openlora::plugin::preprocessing as wit;
    let instance = pre.instantiate(&mut *store).map_err(sandbox::instantiating)?;
    let request = wit::PreprocessRequest {
        model: request.model.clone(),
        messages: messages(&request.messages),
        metadata: request.metadata.clone(),
        tenant: request.tenant.clone(),
    };
    Ok(match instance.openlora_plugin_preprocessing().call_preprocess(&mut *store, &request)? {
        wit::PreprocessOutcome::Unchanged => host::PreprocessOutcome::Unchanged,
        wit::PreprocessOutcome::Edited(messages) => host::PreprocessOutcome::Edited(
            messages.into_iter().map(|m| host::Message { role: m.role, content: m.content }).collect(),
        ),
        wit::PreprocessOutcome::Reject(reason) => host::PreprocessOutcome::Reject(reason),
    })
}

/// Instantiates a merger and asks it for a recipe.
pub(crate) fn merge(
    pre: &MergerPre<CallState>,
    store: &mut wasmtime::Store<CallState>,
    request: &host::MergeRequest,
) -> wasmtime::Result<host::MergeOutcome> {
    use merger::exports::openlora::plugin::merging as wit;
    let instance = pre.instantiate(&mut *store).map_err(sandbox::instantiating)?;
    let request = wit::MergeRequest { adapters: choices(&request.adapters), metadata: request.metadata.clone() };
    let recipe = match instance.openlora_plugin_merging().call_merge(&mut *store, &request)? {
        Ok(recipe) => recipe,
        Err(reason) => return Ok(host::MergeOutcome::Reject(reason)),
    };
    let method = match recipe.method {
        wit::MergeMethod::Linear => host::MergeMethod::Linear,
        wit::MergeMethod::Cat => host::MergeMethod::Cat,
        wit::MergeMethod::Svd => host::MergeMethod::Svd,
        wit::MergeMethod::Ties => host::MergeMethod::Ties,
        wit::MergeMethod::TiesSvd => host::MergeMethod::TiesSvd,
        wit::MergeMethod::DareLinear => host::MergeMethod::DareLinear,
        wit::MergeMethod::DareTies => host::MergeMethod::DareTies,
        wit::MergeMethod::DareLinearSvd => host::MergeMethod::DareLinearSvd,
        wit::MergeMethod::DareTiesSvd => host::MergeMethod::DareTiesSvd,
        wit::MergeMethod::MagnitudePrune => host::MergeMethod::MagnitudePrune,
        wit::MergeMethod::MagnitudePruneSvd => host::MergeMethod::MagnitudePruneSvd,
    };
    let majority_sign = match recipe.majority_sign {
        wit::MajoritySign::Total => host::MajoritySign::Total,
        wit::MajoritySign::Frequency => host::MajoritySign::Frequency,
    };
    Ok(host::MergeOutcome::Plan(host::MergePlan {
        method,
        weights: recipe.weights,
        density: recipe.density,
        majority_sign,
        layer_overrides: recipe
            .layer_overrides
            .into_iter()
            .map(|o| host::LayerOverride { pattern: o.pattern, weights: o.weights, density: o.density })
            .collect(),
    }))
}

/// Instantiates an attributor and attributes one inference. A refusal is returned as `Err`
/// Both ways an attributor can be linked: a 0.1.0 component (`attribution` only), or one that
/// also exports `evidence-attribution` (0.1.1), which is then called with the evidence.
pub(crate) enum Attributors {
    /// `attribution` only.
    Plain(AttributorPre<CallState>),
    /// `attribution` and `evidence-attribution`.
    Evidence(EvidenceAttributorPre<CallState>),
}

impl Attributors {
    /// Links `instance_pre` through the evidence world when the component exports it.
    pub(crate) fn new(
        instance_pre: wasmtime::component::InstancePre<CallState>,
        with_evidence: bool,
    ) -> wasmtime::Result<Self> {
        Ok(if with_evidence {
            Self::Evidence(EvidenceAttributorPre::new(instance_pre)?)
        } else {
            Self::Plain(AttributorPre::new(instance_pre)?)
        })
    }
}

/// The record in the generated types of module `$wit`.
macro_rules! wit_record {
    ($wit:path, $record:expr) => {{
        use $wit as wit;
        let record: &host::InferenceRecord = $record;
        wit::InferenceRecord {
            request_id: record.request_id.clone(),
            tenant: record.tenant.clone(),
            time_ms: record.time_ms,
            base_model: wit::ModelUse {
                id: record.base_model.id.clone(),
                sha256: record.base_model.sha256.clone(),
                owner: record.base_model.owner.clone(),
                price_per_1k_tokens: record.base_model.price_per_1k_tokens,
            },
            adapters: record
                .adapters
                .iter()
                .map(|a| wit::AdapterUse {
                    name: a.name.clone(),
                    generation: a.generation.clone(),
                    weight: a.weight,
                    owner: a.owner.clone(),
                    price_per_1k_tokens: a.price_per_1k_tokens,
                    datasets: datasets(&a.datasets),
                })
                .collect(),
            merge: record.merge.clone(),
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.completion_tokens,
            finish_reason: record.finish_reason.clone(),
            price_micros: record.price_micros,
        }
    }};
}

/// Payments back from the generated types of module `$wit`.
macro_rules! host_payments {
    ($wit:path, $payments:expr) => {{
        use $wit as wit;
        $payments
            .into_iter()
            .map(|p: wit::Payment| host::Payment {
                party: p.party,
                role: match p.role {
                    wit::PayeeRole::BaseOwner => host::PayeeRole::BaseOwner,
                    wit::PayeeRole::AdapterOwner => host::PayeeRole::AdapterOwner,
                    wit::PayeeRole::DatasetContributor => host::PayeeRole::DatasetContributor,
                    wit::PayeeRole::Platform => host::PayeeRole::Platform,
                },
                source: p.source,
                micros: p.micros,
            })
            .collect::<Vec<host::Payment>>()
    }};
}

/// Instantiates an attributor and attributes one inference (with its evidence, when the
/// plugin takes it). A refusal is returned as `Err(reason)`.
pub(crate) fn attribute(
    pre: &Attributors,
    store: &mut wasmtime::Store<CallState>,
    record: &host::InferenceRecord,
) -> wasmtime::Result<Result<Vec<host::Payment>, String>> {
    match pre {
        Attributors::Plain(pre) => {
            let instance = pre.instantiate(&mut *store).map_err(sandbox::instantiating)?;
            let wit_rec = wit_record!(attributor::exports::openlora::plugin::attribution, record);
            Ok(match instance.openlora_plugin_attribution().call_attribute(&mut *store, &wit_rec)? {
                Ok(payments) => Ok(host_payments!(attributor::exports::openlora::plugin::attribution, payments)),
                Err(reason) => Err(reason),
            })
        }
        Attributors::Evidence(pre) => {
            use evidence_attributor::exports::openlora::plugin::evidence_attribution as ev;
            let instance = pre.instantiate(&mut *store).map_err(sandbox::instantiating)?;
            let wit_rec = wit_record!(evidence_attributor::exports::openlora::plugin::attribution, record);
            let shares: Vec<ev::EvidenceShare> = record
                .evidence
                .iter()
                .map(|e| ev::EvidenceShare {
                    adapter: e.adapter.clone(),
                    dataset: e.dataset.clone(),
                    contributor: e.contributor.clone(),
                    weight: e.weight,
                })
                .collect();
            let answer = instance.openlora_plugin_evidence_attribution().call_attribute_with_evidence(
                &mut *store,
                &wit_rec,
                &shares,
            )?;
            Ok(match answer {
                Ok(payments) => {
                    Ok(host_payments!(evidence_attributor::exports::openlora::plugin::attribution, payments))
                }
                Err(reason) => Err(reason),
            })
        }
    }
}
