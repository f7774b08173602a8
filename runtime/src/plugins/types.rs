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

/// The base model as an inference record names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelUse {
    /// The id clients use.
    pub id: String,
    /// SHA-256 of the weights.
    pub sha256: String,
    /// Owner (payee).
    pub owner: String,
    /// Price per 1,000 tokens in micro-units.
    pub price_per_1k_tokens: u64,
}

/// One adapter that acted on a request, with its manifest facts at the time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdapterUse {
    /// Its name.
    pub name: String,
    /// Its generation (content hash, hex).
    pub generation: String,
    /// The weight it was applied (or merged) with.
    pub weight: f32,
    /// Owner (payee).
    pub owner: String,
    /// Price per 1,000 tokens in micro-units.
    pub price_per_1k_tokens: u64,
    /// Training datasets and their contributors.
    pub datasets: Vec<Dataset>,
}

/// A finished inference, as the attributor sees it (never the text).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InferenceRecord {
    /// The request's id.
    pub request_id: String,
    /// The tenant charged.
    pub tenant: String,
    /// When it finished (Unix milliseconds).
    pub time_ms: u64,
    /// The base model.
    pub base_model: ModelUse,
    /// The adapters, in request order.
    pub adapters: Vec<AdapterUse>,
    /// The merge recipe when the adapters were merged.
    pub merge: Option<String>,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// `stop`, `length`, `cancelled` or `error`.
    pub finish_reason: String,
    /// The price charged, in micro-units.
    pub price_micros: u64,
    /// The answer's verbatim-overlap evidence per contributor (empty without any); only
    /// attributors of ABI 0.1.1 and later see it.
    pub evidence: Vec<EvidenceShare>,
}

/// One contributor's evidence weight in one answer (see `openlora:plugin/evidence-attribution`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvidenceShare {
    /// The adapter.
    pub adapter: String,
    /// Its dataset.
    pub dataset: String,
    /// The contributor.
    pub contributor: String,
    /// Relative weight (see the WIT for how it is computed).
    pub weight: u64,
}

/// Why a party is paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PayeeRole {
    /// The base model's owner.
    BaseOwner,
    /// An adapter's owner.
    AdapterOwner,
    /// A contributor of an adapter's training data.
    DatasetContributor,
    /// The platform's cut.
    Platform,
}

impl PayeeRole {
    /// The role's spelling in receipts (`base-owner`, `adapter-owner`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::BaseOwner => "base-owner",
            Self::AdapterOwner => "adapter-owner",
            Self::DatasetContributor => "dataset-contributor",
            Self::Platform => "platform",
        }
    }
}

/// One payment line of an attribution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    /// Who is paid.
    pub party: String,
    /// Why.
    pub role: PayeeRole,
    /// The adapter or `adapter/dataset` paid for; empty for the base model and platform.
    pub source: String,
    /// How much, in micro-units.
    pub micros: u64,
}

/// A contributor of a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contributor {
    /// Who (payee).
    pub name: String,
    /// Relative share among the dataset's contributors.
    pub share: u64,
}

/// A dataset from an adapter's manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// Its identifier.
    pub id: String,
    /// SHA-256 of its content, hex.
    pub sha256: String,
    /// Its license.
    pub license: String,
    /// Who contributed it.
    pub contributors: Vec<Contributor>,
}

/// CatalogView facts about one adapter: its manifest and identity (never weights).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdapterFacts {
    /// The name requests use.
    pub name: String,
    /// The content hash of the current generation (hex).
    pub generation: String,
    /// Manifest labels.
    pub tags: Vec<String>,
    /// The owner (payee).
    pub owner: String,
    /// License.
    pub license: String,
    /// What it does.
    pub description: String,
    /// Price per 1,000 tokens in micro-units.
    pub price_per_1k_tokens: u64,
    /// Training data.
    pub datasets: Vec<Dataset>,
}

/// A read-only snapshot of the adapter catalog, as plugins see it. The host swaps the whole
/// snapshot when adapters change; a call sees one snapshot throughout.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CatalogView {
    adapters: BTreeMap<String, AdapterFacts>,
}

impl CatalogView {
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
