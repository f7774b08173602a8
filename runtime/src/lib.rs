//! # openlora
//!
//! A multi-LoRA inference runtime: one base model stays resident, many fine-tuned adapters are
//! paged in and out, and requests for different adapters share each batched forward pass.
//!
//! This crate is the host. Its rooms, following `ARCHITECTURE.md` at the repository root:
//! - [`service`]: one request's journey from tenant to receipt; every transport calls
//!   [`service::Service::generate`];
//! - [`server`]: HTTP only (OpenAI-compatible routes, adapter admin, metrics, SSE);
//! - [`model`]: weight formats (GGUF, safetensors), the Llama-family forward pass written once
//!   against `openlora_kernels::Backend`, the tokenizer and chat templates, and the default
//!   model's fetcher;
//! - [`lora`]: the LoRA vocabulary `model` and `adapters` share (a leaf);
//! - [`adapters`]: PEFT LoRA adapters, manifests, the catalog and the pager (the one registry),
//!   merges;
//! - [`engine`]: the paged KV cache, the scheduler and the one decode loop, sampling;
//! - [`plugins`]: the sandboxed wasm plugin host (preprocess, route, merge, attribute);
//! - [`attribution`]: inference records, receipts, the ledger;
//! - [`metrics`]: counters and histograms (a leaf); [`config`]: the deployment file.
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
