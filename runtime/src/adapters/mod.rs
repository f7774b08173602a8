//! LoRA adapters: the PEFT format, content-hash identity, backend-ready weights, per-request
//! composition and materialized merges.
//!
//! An adapter is loaded into host memory ([`LoraHost`], f32, validated against the base
//! model) and then prepared for a backend ([`LoraAdapter`]) in the precision of its file
//! (f16/bf16 values go back to 16 bits without loss): on the CPU that prepared form is the only
//! copy, its kernels convert 16-bit values as they compute. Its identity is its *generation*,
//! a SHA-256 over its config and weights; names are aliases that point at a generation
//! ([`AdapterRegistry`]), so reloading a name with new content never changes what a running
//! request uses.

pub mod catalog;
pub mod manifest;
pub mod merge;
pub mod pager;
pub mod peft;
pub mod registry;
pub mod synth;

use openlora_kernels::{Backend, HostWeight, quant::quantize_row};

pub use peft::{AdapterError, LoraHost, LoraModuleHost};
pub use registry::AdapterRegistry;

pub use crate::lora::{Generation, LoraAdapter, LoraModule, Proj, WeightedAdapter};

impl<B: Backend> LoraAdapter<B> {
    /// Sets `bytes` to what the backend holds for the prepared weights.
    fn counted(mut self, backend: &B) -> Self {
        let modules = self.layers.iter().flatten().flatten().chain(self.lm_head.as_ref());
        self.bytes = modules.map(|m| backend.weight_bytes(&m.a) + backend.weight_bytes(&m.b)).sum();
        self
    }

    /// Prepares host weights for `backend`.
    pub fn prepare(host: &LoraHost, backend: &B) -> Result<Self, AdapterError> {
        let prep = |m: &LoraModuleHost| -> Result<LoraModule<B>, AdapterError> {
            let kerr = |e: openlora_kernels::KernelError| AdapterError::Invalid {
                adapter: host.name.clone(),
                tensor: String::new(),
                reason: e.to_string(),
            };
            let a = HostWeight::from_bytes(m.dtype, m.rank, m.in_dim, quantize_row(m.dtype, &m.a)).map_err(kerr)?;
            // The backend takes B transposed ([r, out]) so the expand step streams rows.
            let mut bt = vec![0f32; m.rank * m.out_dim];
            for o in 0..m.out_dim {
                for r in 0..m.rank {
                    bt[r * m.out_dim + o] = m.b[o * m.rank + r];
                }
            }
            let b = HostWeight::from_bytes(m.dtype, m.rank, m.out_dim, quantize_row(m.dtype, &bt)).map_err(kerr)?;
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
            bytes: 0,
        }
        .counted(backend))
    }
}
