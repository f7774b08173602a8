//! LoRA adapters: the PEFT format, content-hash identity, backend-ready weights, per-request
//! composition and materialized merges.
//!
//! An adapter is loaded once into host memory ([`LoraHost`], f32, validated against the base
//! model) and then prepared for a backend ([`LoraAdapter`]). Its identity is its *generation*,
//! a SHA-256 over its config and weights; names are aliases that point at a generation
//! ([`AdapterRegistry`]), so reloading a name with new content never changes what a running
//! request uses.

pub mod catalog;
pub mod merge;
pub mod pager;
pub mod peft;
pub mod registry;
pub mod synth;

use std::fmt;
use std::sync::Arc;

use openlora_kernels::{Backend, HostWeight};

pub use peft::{AdapterError, LoraHost, LoraModuleHost};
pub use registry::AdapterRegistry;

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
    /// `layers[l][proj.index()]`.
    pub layers: Vec<[Option<LoraModule<B>>; 7]>,
    /// LoRA on the LM head, if the adapter has one.
    pub lm_head: Option<LoraModule<B>>,
    /// Bytes of f32 weights held.
    pub bytes: usize,
}

impl<B: Backend> LoraAdapter<B> {
    /// Prepares host weights for `backend`.
    pub fn prepare(host: &LoraHost, backend: &B) -> Result<Self, AdapterError> {
        let prep = |m: &LoraModuleHost| -> Result<LoraModule<B>, AdapterError> {
            let kerr = |e: openlora_kernels::KernelError| AdapterError::Invalid {
                adapter: host.name.clone(),
                tensor: String::new(),
                reason: e.to_string(),
            };
            let a = HostWeight::from_f32(m.rank, m.in_dim, &m.a).map_err(kerr)?;
            // The backend takes B transposed ([r, out]) so the expand step streams rows.
            let mut bt = vec![0f32; m.rank * m.out_dim];
            for o in 0..m.out_dim {
                for r in 0..m.rank {
                    bt[r * m.out_dim + o] = m.b[o * m.rank + r];
                }
            }
            let b = HostWeight::from_f32(m.rank, m.out_dim, &bt).map_err(kerr)?;
            Ok(LoraModule {
                a: backend.prepare_weight(a).map_err(kerr)?,
                b: backend.prepare_weight(b).map_err(kerr)?,
                scale: m.scale,
                rank: m.rank,
            })
        };
        let mut layers = Vec::with_capacity(host.layers.len());
        for l in &host.layers {
            let mut out: [Option<LoraModule<B>>; 7] = Default::default();
            for (o, m) in out.iter_mut().zip(l.iter()) {
                *o = m.as_ref().map(prep).transpose()?;
            }
            layers.push(out);
        }
        Ok(Self {
            name: host.name.clone(),
            generation: host.generation,
            lm_head: host.lm_head.as_ref().map(prep).transpose()?,
            layers,
            bytes: host.bytes(),
        })
    }

    /// The module at (`layer`, `proj`), if targeted.
    pub fn module(&self, layer: usize, proj: Proj) -> Option<&LoraModule<B>> {
        self.layers.get(layer).and_then(|l| l[proj.index()].as_ref())
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
