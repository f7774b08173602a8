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
///
/// Thousands of these can be resident at once, so the layout is compact: the modules lie in one
/// slice (layers in order, then the LM head's), and a table of 16-bit indices maps each
/// (layer, projection) slot to its module, an empty slot costing two bytes. On the CPU the
/// modules' weights are views of one page-aligned buffer ([`crate::adapters`]'s `prepare`).
pub struct LoraAdapter<B: Backend> {
    /// The name it was loaded under (informational; identity is `generation`).
    pub name: String,
    /// Content hash.
    pub generation: Generation,
    /// Bytes the backend holds for the weights (the file's precision on the CPU).
    pub bytes: usize,
    modules: Box<[LoraModule<B>]>,
    /// `layers * 7` slots, then one for the LM head: an index into `modules`, or [`EMPTY`].
    slots: Box<[u16]>,
}

/// An untargeted slot of [`LoraAdapter`]'s table.
const EMPTY: u16 = u16::MAX;

impl<B: Backend> LoraAdapter<B> {
    /// Lays out `layers[l][proj.index()]` and the LM head's module compactly. Fails (with the
    /// count) when there are more modules than a 16-bit index addresses.
    pub fn new(
        name: String,
        generation: Generation,
        layers: Vec<[Option<LoraModule<B>>; 7]>,
        lm_head: Option<LoraModule<B>>,
        bytes: usize,
    ) -> Result<Self, String> {
        let nslots = layers.len() * 7 + 1;
        let mut slots = vec![EMPTY; nslots];
        let count = layers.iter().flatten().flatten().count() + usize::from(lm_head.is_some());
        let mut modules = Vec::with_capacity(count);
        let all = layers.into_iter().flatten().chain(std::iter::once(lm_head));
        for (slot, m) in slots.iter_mut().zip(all) {
            if let Some(m) = m {
                *slot = u16::try_from(modules.len())
                    .ok()
                    .filter(|&i| i != EMPTY)
                    .ok_or_else(|| format!("more than {} LoRA modules in one adapter", EMPTY))?;
                modules.push(m);
            }
        }
        Ok(Self { name, generation, bytes, modules: modules.into_boxed_slice(), slots: slots.into_boxed_slice() })
    }

    fn slot(&self, i: usize) -> Option<&LoraModule<B>> {
        let m = *self.slots.get(i)?;
        if m == EMPTY { None } else { self.modules.get(usize::from(m)) }
    }

    /// The module at (`layer`, `proj`), if targeted.
    pub fn module(&self, layer: usize, proj: Proj) -> Option<&LoraModule<B>> {
        if layer >= self.num_layers() {
            return None;
        }
        self.slot(layer * 7 + proj.index())
    }

    /// LoRA on the LM head, if the adapter has one.
    pub fn lm_head(&self) -> Option<&LoraModule<B>> {
        self.slot(self.slots.len() - 1)
    }

    /// Decoder layers the table covers (the base model's).
    pub fn num_layers(&self) -> usize {
        self.slots.len() / 7
    }

    /// Every module: the layers' in order, then the LM head's.
    pub fn modules(&self) -> impl Iterator<Item = &LoraModule<B>> {
        self.modules.iter()
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
