//! Synthetic LoRA adapters for scale and speed work: random weights of a given rank on every
//! projection, shaped for a base model. Deterministic per seed.

use rand::{Rng, SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};

use super::peft::{LoraHost, LoraModuleHost, proj_dims};
use super::{Generation, Proj};
use crate::model::config::LlamaConfig;

/// Random rank-`rank` modules on `targets` of every layer of `base` (the distributions of
/// [`random_lora`]); deterministic per seed, and with all seven targets exactly the modules of
/// [`random_lora`].
pub fn random_modules(
    base: &LlamaConfig,
    targets: &[Proj],
    rank: usize,
    seed: u64,
) -> Vec<[Option<LoraModuleHost>; 7]> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..base.num_layers)
        .map(|_| {
            let mut mods: [Option<LoraModuleHost>; 7] = Default::default();
            for &p in targets {
                let (in_dim, out_dim) = proj_dims(base, p);
                let ra = 1.0 / (in_dim as f32).sqrt();
                mods[p.index()] = Some(LoraModuleHost {
                    rank,
                    in_dim,
                    out_dim,
                    alpha: 2.0 * rank as f32,
                    scale: 2.0,
                    a: (0..rank * in_dim).map(|_| rng.gen_range(-ra..ra)).collect(),
                    b: (0..out_dim * rank).map(|_| rng.gen_range(-0.01..0.01)).collect(),
                    dtype: openlora_kernels::DType::F32,
                });
            }
            mods
        })
        .collect()
}

/// A random rank-`rank` adapter on all seven projections of every layer of `base`. Weights are
/// uniform in ±`1/sqrt(in)` for A and ±0.01 for B, so outputs move but stay coherent.
pub fn random_lora(name: &str, base: &LlamaConfig, rank: usize, seed: u64) -> LoraHost {
    let layers = random_modules(base, &Proj::ALL, rank, seed);
    let mut h = Sha256::new();
    h.update(b"openlora-synthetic-lora-v1\0");
    h.update((rank as u64).to_le_bytes());
    h.update(seed.to_le_bytes());
    h.update((base.hidden_size as u64).to_le_bytes());
    h.update((base.num_layers as u64).to_le_bytes());
    LoraHost {
        name: name.to_owned(),
        generation: Generation(h.finalize().into()),
        layers,
        lm_head: None,
        use_rslora: false,
        config_rank: rank,
    }
}
