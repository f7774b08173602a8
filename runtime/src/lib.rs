//! # openlora
//!
//! A multi-LoRA inference runtime: one base model stays resident, many fine-tuned adapters are
//! paged in and out, and requests for different adapters share each batched forward pass.
//!
//! This crate is the host. Its rooms, following `ARCHITECTURE.md`:
//! - [`model`]: weight formats (GGUF, safetensors), the Llama-family forward pass written once
//!   against `openlora_kernels::Backend`, the tokenizer and chat templates, and the default
//!   model's fetcher;
//! - [`adapters`]: PEFT LoRA adapters, their content-hash identity, per-request composition;
//! - [`engine`]: the paged KV cache's bookkeeping, sampling and the generation loop;
//! - [`plugins`]: the sandboxed wasm plugin host (preprocess, route, merge, attribute).
//!
//! Library code returns typed errors ([`model::error::ModelError`]); the `openlora` binary
//! reports them with their context (file, tensor, key).

#![deny(missing_docs)]

pub mod adapters;
pub mod attribution;
pub mod config;
pub mod engine;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod plugins;
pub mod server;
pub mod service;
