//! # openlora-kernels
//!
//! The compute layer of openlora, behind one trait, [`Backend`].
//!
//! Design decisions:
//! - **One trait, associated buffer types.** The Llama forward pass in the runtime is written
//!   once against [`Backend`]; a backend chooses where activations, weights and the KV cache
//!   live (`Vec<f32>` on the CPU, device memory on a GPU). Nothing in the model code assumes
//!   host memory except reading logits back with [`Backend::download`].
//! - **Paged KV from day one.** Attention reads keys and values through per-sequence block
//!   tables and new entries are written to explicit slots, so continuous batching of sequences
//!   at different positions is a property of the interface, not a later rewrite.
//! - **Quantized weights stay quantized.** GGUF block formats ([`quant`]) are multiplied in
//!   place; activations stay f32 so the CPU results equal dequantize-then-f32 up to summation
//!   order. This makes the CPU backend the numerical reference for other backends.
//! - **Runtime SIMD dispatch.** Hot loops are compiled for AVX2 and AVX-512 and chosen by
//!   feature detection, so one binary runs on any x86-64 machine.
//!
//! Non-guarantees: results are not bit-identical across SIMD levels or thread counts.

#![deny(missing_docs)]

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod device;
mod error;
pub mod quant;
pub mod weight;

pub use backend::{AttnSeq, Backend, KvLayout, LoraSegment, PickedRow, RopeTable, RowPick};
pub use cpu::{CpuBackend, CpuWeight};
pub use cuda::{CudaBackend, CudaOptions, Precision};
pub use device::{DeviceBackend, DeviceBuf, DeviceKvCache, DeviceRequest, DeviceWeight};
pub use error::{KernelError, Result};
pub use quant::DType;
pub use weight::{HostWeight, SharedBytes};
