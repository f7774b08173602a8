//! What the host hands plugins and gets back, independent of the ABI version.
//!
//! The service speaks these types; each ABI module (`abi::v0_1`, later `abi::v0_2`) converts
//! them to and from its generated bindings. A plugin built against an older ABI thus keeps
//! working when a newer one exists, and the service never sees a version.

use std::collections::BTreeMap;

pub use crate::adapters::merge::{MajoritySign, MergeMethod};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// An adapter and its scale.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterChoice {
    /// The adapter's name.
    pub name: String,
    /// Its scale (1.0 = as trained).
    pub weight: f32,
}

impl AdapterChoice {
    /// `name` at `weight`.
    pub fn new(name: impl Into<String>, weight: f32) -> Self {
        Self { name: name.into(), weight }
    }
}

/// Request metadata: key/value pairs in the client's order.
pub type Metadata = Vec<(String, String)>;

/// What a preprocessor sees.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PreprocessRequest {
    /// The OpenAI `model` field.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Request metadata.
    pub metadata: Metadata,
    /// The authenticated tenant.
    pub tenant: String,
}

/// A preprocessor's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum PreprocessOutcome {
    /// Use the conversation as it is.
    Unchanged,
    /// Use this conversation instead.
    Edited(Vec<Message>),
    /// Refuse the request with this reason.
    Reject(String),
}

/// What a router sees.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteRequest {
    /// The OpenAI `model` field.
    pub model: String,
    /// The conversation (after preprocessing).
    pub messages: Vec<Message>,
    /// Request metadata.
    pub metadata: Metadata,
    /// The authenticated tenant.
    pub tenant: String,
}

/// A router's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum RouteDecision {
    /// Serve the request as the client's `model` field says.
    Default,
    /// Serve it with these adapters (empty: the base model alone).
    Adapters(Vec<AdapterChoice>),
    /// Refuse it with this reason.
    Reject(String),
}

/// What a merger sees.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeRequest {
    /// The adapters to merge, with the router's weights.
    pub adapters: Vec<AdapterChoice>,
    /// Request metadata.
    pub metadata: Metadata,
}

/// Weights and density for modules whose name contains `pattern`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerOverride {
    /// Substring of the module name, e.g. `mlp` or `layers.3.`.
    pub pattern: String,
    /// One weight per input adapter.
    pub weights: Vec<f32>,
    /// Density for pruning methods.
    pub density: Option<f32>,
}

/// A merge plan chosen by a merger.
#[derive(Clone, Debug, PartialEq)]
pub struct MergePlan {
    /// The method.
    pub method: MergeMethod,
    /// One weight per input adapter.
    pub weights: Vec<f32>,
    /// Fraction kept by pruning methods (`None`: keep all).
    pub density: Option<f32>,
    /// TIES sign election.
    pub majority_sign: MajoritySign,
    /// Per-module overrides.
    pub layer_overrides: Vec<LayerOverride>,
}

/// A merger's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum MergeOutcome {
    /// Merge with this plan.
    Plan(MergePlan),
    /// Refuse the request with this reason.
    Reject(String),
}

/// A finished inference, as the attributor sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InferenceRecord {
    /// The request's id.
    pub request_id: String,
    /// The tenant charged.
    pub tenant: String,
    /// The base model's name.
    pub base_model: String,
    /// The adapters used, with their weights.
    pub adapters: Vec<AdapterChoice>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// The price charged, in micro-units.
    pub price_micros: u64,
}

/// Why a payee is paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PayeeRole {
    /// The base model's owner.
    BaseModel,
    /// An adapter's owner.
    AdapterOwner,
    /// A contributor of an adapter's training data.
    DatasetContributor,
    /// The platform's cut.
    Platform,
}

/// One payment line of an attribution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    /// Who is paid.
    pub payee: String,
    /// Why.
    pub role: PayeeRole,
    /// The adapter or `adapter/dataset` paid for; empty for the base model and platform.
    pub source: String,
    /// How much, in micro-units.
    pub micros: u64,
}

/// A dataset credit in an adapter's manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetCredit {
    /// The dataset's name.
    pub name: String,
    /// Who is paid for it.
    pub contributor: String,
    /// Their part of the adapter's revenue in basis points.
    pub share_bps: u32,
}

/// Catalog facts about one adapter (what plugins may know; never weights).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterFacts {
    /// The name requests use.
    pub name: String,
    /// Manifest labels.
    pub tags: Vec<String>,
    /// The owner (payee).
    pub owner: String,
    /// Training data credits.
    pub datasets: Vec<DatasetCredit>,
    /// The content hash of the current generation (hex).
    pub generation: String,
}

/// A read-only snapshot of the adapter catalog, as plugins see it. The host swaps the whole
/// snapshot when adapters change; a call sees one snapshot throughout.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    adapters: BTreeMap<String, AdapterFacts>,
}

impl Catalog {
    /// A catalog of `adapters` (a later duplicate name replaces an earlier one).
    pub fn new(adapters: impl IntoIterator<Item = AdapterFacts>) -> Self {
        Self { adapters: adapters.into_iter().map(|a| (a.name.clone(), a)).collect() }
    }

    /// Facts about `name`.
    pub fn get(&self, name: &str) -> Option<&AdapterFacts> {
        self.adapters.get(name)
    }

    /// Every adapter, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &AdapterFacts> {
        self.adapters.values()
    }
}
