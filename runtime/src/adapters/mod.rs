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

use std::sync::Arc;

use openlora_kernels::{Backend, DType, HostWeight, SharedBytes, quant::quantize_row_into};

pub use peft::{AdapterError, LoraHost, LoraModuleHost};
pub use registry::AdapterRegistry;

pub use crate::lora::{Generation, LoraAdapter, LoraModule, Proj, WeightedAdapter};

impl<B: Backend> LoraAdapter<B> {
    /// Sets `bytes` to what the backend holds for the prepared weights.
    fn counted(mut self, backend: &B) -> Self {
        let modules = self.layers.iter().flatten().flatten().chain(self.lm_head.as_ref()).map(|m| &**m);
        self.bytes = modules.map(|m| backend.weight_bytes(&m.a) + backend.weight_bytes(&m.b)).sum();
        self
    }

    /// Prepares host weights for `backend`.
    ///
    /// Every A and Bᵀ of the adapter is written into one buffer (each tensor starting on a
    /// 64-byte boundary) and the backend's weights are views of it: one allocation per adapter
    /// instead of two per module, so that loading and evicting thousands of adapters does not
    /// leave the heap full of holes (measured by `bench/adapter_memory.py`).
    pub fn prepare(host: &LoraHost, backend: &B) -> Result<Self, AdapterError> {
        let kerr = |e: openlora_kernels::KernelError| AdapterError::Invalid {
            adapter: host.name.clone(),
            tensor: String::new(),
            reason: e.to_string(),
        };
        // In the order `prep` below takes them: the layers' modules, then the LM head's.
        let modules = || host.layers.iter().flatten().flatten().chain(host.lm_head.as_ref());
        let padded = |dtype: DType, rows: usize, cols: usize| {
            dtype.row_bytes(cols).map_or(0, |b| (b * rows).next_multiple_of(ALIGN))
        };
        let total: usize =
            modules().map(|m| padded(m.dtype, m.rank, m.in_dim) + padded(m.dtype, m.rank, m.out_dim)).sum();
        let mut buf = Vec::with_capacity(total);
        let mut ranges = Vec::new();
        let mut bt = Vec::new();
        let mut push = |dtype: DType, values: &[f32], buf: &mut Vec<u8>| {
            let start = buf.len();
            quantize_row_into(dtype, values, buf);
            ranges.push(start..buf.len());
            buf.resize(buf.len().next_multiple_of(ALIGN), 0);
        };
        for m in modules() {
            push(m.dtype, &m.a, &mut buf);
            // The backend takes B transposed ([r, out]) so the expand step streams rows.
            bt.clear();
            bt.resize(m.rank * m.out_dim, 0f32);
            for o in 0..m.out_dim {
                for r in 0..m.rank {
                    bt[r * m.out_dim + o] = m.b[o * m.rank + r];
                }
            }
            push(m.dtype, &bt, &mut buf);
        }
        debug_assert_eq!(buf.len(), total);
        let buf: SharedBytes = Arc::new(buf);
        let mut ranges = ranges.into_iter();
        let mut prep = |m: &LoraModuleHost| -> Result<Box<LoraModule<B>>, AdapterError> {
            let mut view = |cols: usize| {
                let range = ranges.next().expect("a range per tensor");
                HostWeight::new(m.dtype, m.rank, cols, buf.clone(), range).and_then(|w| backend.prepare_weight(w))
            };
            let a = view(m.in_dim).map_err(kerr)?;
            let b = view(m.out_dim).map_err(kerr)?;
            Ok(Box::new(LoraModule { a, b, scale: m.scale, rank: m.rank }))
        };
        let mut layers = Vec::with_capacity(host.layers.len());
        for l in &host.layers {
            let mut out: [Option<Box<LoraModule<B>>>; 7] = Default::default();
            for (o, m) in out.iter_mut().zip(l.iter()) {
                *o = m.as_ref().map(&mut prep).transpose()?;
            }
            layers.push(out);
        }
        let lm_head = host.lm_head.as_ref().map(&mut prep).transpose()?;
        Ok(Self { name: host.name.clone(), generation: host.generation, lm_head, layers, bytes: 0 }.counted(backend))
    }
}

/// Where each tensor of a prepared adapter starts in its buffer (a multiple of this).
const ALIGN: usize = 64;
