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
    /// Prepares host weights for `backend`.
    ///
    /// Every A and Bᵀ of the adapter is written into one buffer (each tensor starting on a
    /// 64-byte boundary) and the backend's weights are views of it: one allocation per adapter
    /// instead of two per module. The buffer is its own anonymous memory mapping, not a heap
    /// block: evicting the adapter unmaps it, so its pages go back to the system at once, and
    /// loading and evicting thousands of adapters leaves no holes in the allocator's arenas
    /// (measured by `bench/adapter_memory.py`).
    pub fn prepare(host: &LoraHost, backend: &B) -> Result<Self, AdapterError> {
        let err = |reason: String| AdapterError::Invalid { adapter: host.name.clone(), tensor: String::new(), reason };
        let kerr = |e: openlora_kernels::KernelError| err(e.to_string());
        // In the order `prep` below takes them: the layers' modules, then the LM head's.
        let modules = || host.layers.iter().flatten().flatten().chain(host.lm_head.as_ref());
        let padded = |dtype: DType, rows: usize, cols: usize| {
            dtype.row_bytes(cols).map_or(0, |b| (b * rows).next_multiple_of(ALIGN))
        };
        let total: usize =
            modules().map(|m| padded(m.dtype, m.rank, m.in_dim) + padded(m.dtype, m.rank, m.out_dim)).sum();
        let mut map = memmap2::MmapMut::map_anon(total.max(1))
            .map_err(|e| err(format!("cannot map {total} bytes for the prepared weights: {e}")))?;
        let mut ranges = Vec::new();
        let (mut bt, mut tmp) = (Vec::new(), Vec::new());
        let mut at = 0;
        let mut push = |dtype: DType, values: &[f32]| {
            tmp.clear();
            quantize_row_into(dtype, values, &mut tmp);
            map[at..at + tmp.len()].copy_from_slice(&tmp);
            ranges.push(at..at + tmp.len());
            at = (at + tmp.len()).next_multiple_of(ALIGN);
        };
        for m in modules() {
            push(m.dtype, &m.a);
            // The backend takes B transposed ([r, out]) so the expand step streams rows.
            bt.clear();
            bt.resize(m.rank * m.out_dim, 0f32);
            for o in 0..m.out_dim {
                for r in 0..m.rank {
                    bt[r * m.out_dim + o] = m.b[o * m.rank + r];
                }
            }
            push(m.dtype, &bt);
        }
        debug_assert_eq!(at, total);
        let map = map.make_read_only().map_err(|e| err(format!("cannot seal the prepared weights: {e}")))?;
        let buf: SharedBytes = Arc::new(map);
        let mut ranges = ranges.into_iter();
        let mut bytes = 0;
        let mut prep = |m: &LoraModuleHost| -> Result<LoraModule<B>, AdapterError> {
            let mut view = |cols: usize| {
                let range = ranges.next().expect("a range per tensor");
                HostWeight::new(m.dtype, m.rank, cols, buf.clone(), range).and_then(|w| backend.prepare_weight(w))
            };
            let a = view(m.in_dim).map_err(kerr)?;
            let b = view(m.out_dim).map_err(kerr)?;
            bytes += backend.weight_bytes(&a) + backend.weight_bytes(&b);
            Ok(LoraModule { a, b, scale: m.scale, rank: m.rank })
        };
        let mut layers = Vec::with_capacity(host.layers.len());
        for l in &host.layers {
            let mut out: [Option<LoraModule<B>>; 7] = Default::default();
            for (o, m) in out.iter_mut().zip(l.iter()) {
                *o = m.as_ref().map(&mut prep).transpose()?;
            }
            layers.push(out);
        }
        let lm_head = host.lm_head.as_ref().map(&mut prep).transpose()?;
        Self::new(host.name.clone(), host.generation, layers, lm_head, bytes).map_err(err)
    }
}

/// Where each tensor of a prepared adapter starts in its buffer (a multiple of this).
const ALIGN: usize = 64;
