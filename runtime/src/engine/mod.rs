//! Running sequences: the paged KV cache's bookkeeping, sampling, and the generation loop.

pub mod generate;
pub mod kv_cache;
pub mod sampler;
