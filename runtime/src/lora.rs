//! The LoRA vocabulary that the model and the adapter rooms share: projection names, the
//! content hash that identifies an adapter (its *generation*), an adapter's weights prepared for
//! a backend, and an adapter applied with a weight.
//!
//! It is a leaf: it depends on the kernels' `Backend` trait and nothing else in the crate, so
//! `model/` (which applies LoRA terms in the forward pass) and `adapters/` (which reads, pages
//! and merges adapters) both depend on it and not on each other. `adapters/` still reads the
//! base model's shape from `model::config`; that is the only arrow between the two rooms.

use std::fmt;
use std::sync::Arc;

use openlora_kernels::Backend;

/// The seven projections of a Llama decoder layer that LoRA may target, in a fixed order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl Proj {
    /// All projections, in index order.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// Position in [`Proj::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module path inside a decoder layer (`self_attn.q_proj`).
    pub fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// The short name PEFT configs use in `target_modules` (`q_proj`).
    pub fn short(self) -> &'static str {
        self.path().rsplit('.').next().unwrap_or_default()
    }
}

/// A content hash identifying one adapter's exact weights and config.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub [u8; 32]);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Generation({self})")
    }
}

/// One target module's LoRA weights, ready for a backend.
pub struct LoraModule<B: Backend> {
    /// `[r, in]`.
    pub a: B::Weight,
    /// `Bᵀ`, `[r, out]`.
    pub b: B::Weight,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f32,
    /// The rank.
    pub rank: usize,
}

/// An adapter prepared for a backend: per decoder layer, per projection, optional weights.
pub struct LoraAdapter<B: Backend> {
    /// The name it was loaded under (informational; identity is `generation`).
    pub name: String,
    /// Content hash.
    pub generation: Generation,
    /// `layers[l][proj.index()]` (boxed: most adapters target a few of the seven, and an
    /// empty slot then costs a pointer, not a module).
    pub layers: Vec<[Option<Box<LoraModule<B>>>; 7]>,
    /// LoRA on the LM head, if the adapter has one.
    pub lm_head: Option<Box<LoraModule<B>>>,
    /// Bytes the backend holds for the weights (the file's precision on the CPU).
    pub bytes: usize,
}

impl<B: Backend> LoraAdapter<B> {
    /// The module at (`layer`, `proj`), if targeted.
    pub fn module(&self, layer: usize, proj: Proj) -> Option<&LoraModule<B>> {
        self.layers.get(layer).and_then(|l| l[proj.index()].as_deref())
    }
}

/// An adapter applied to a request with a weight (several may apply at once; their terms add).
pub struct WeightedAdapter<B: Backend> {
    /// The adapter.
    pub adapter: Arc<LoraAdapter<B>>,
    /// Multiplies the adapter's own scale.
    pub weight: f32,
}

impl<B: Backend> Clone for WeightedAdapter<B> {
    fn clone(&self) -> Self {
        Self { adapter: self.adapter.clone(), weight: self.weight }
    }
}
