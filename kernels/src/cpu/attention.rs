//! Paged causal attention with grouped KV heads, on the CPU.
//!
//! The cache of one layer is two pools (K and V) of `num_blocks * block_size` token slots, each
//! slot holding `kv_heads * head_dim` values, the layout vLLM's `reshape_and_cache` writes and
//! its paged-attention kernel reads. A CUDA kernel reads the same layout.

use rayon::prelude::*;

use crate::backend::{AttnSeq, KvLayout};
use crate::error::{KernelError, Result, ensure_shape};

/// One layer's paged K/V pools in f32.
#[derive(Debug)]
pub struct CpuKvCache {
    /// Geometry.
    pub layout: KvLayout,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl CpuKvCache {
    /// A zeroed pool.
    pub fn new(layout: KvLayout) -> Self {
        let len = layout.num_blocks * layout.block_size * layout.token_width();
        Self { layout, k: vec![0.0; len], v: vec![0.0; len] }
    }

    /// Writes row `r` of `k`/`v` to slot `slots[r]`.
    pub fn write(&mut self, k: &[f32], v: &[f32], slots: &[u32]) -> Result<()> {
        let w = self.layout.token_width();
        ensure_shape(k.len() == slots.len() * w && v.len() == k.len(), "write_kv", || {
            format!("{} slots of width {w}, k has {}, v has {}", slots.len(), k.len(), v.len())
        })?;
        let capacity = self.layout.num_blocks * self.layout.block_size;
        for (r, &slot) in slots.iter().enumerate() {
            let s = slot as usize;
            if s >= capacity {
                return Err(KernelError::KvCache(format!("slot {s} is outside the {capacity}-slot pool")));
            }
            self.k[s * w..(s + 1) * w].copy_from_slice(&k[r * w..(r + 1) * w]);
            self.v[s * w..(s + 1) * w].copy_from_slice(&v[r * w..(r + 1) * w]);
        }
        Ok(())
    }

    /// Reads the values at slot `slot` (for tests and debugging).
    pub fn read_slot(&self, slot: usize) -> Option<(&[f32], &[f32])> {
        let w = self.layout.token_width();
        Some((self.k.get(slot * w..(slot + 1) * w)?, self.v.get(slot * w..(slot + 1) * w)?))
    }
}

/// f32 dot product with 16 lane accumulators (vectorises; shared with the LoRA kernels).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let full = a.len() / 16 * 16;
    for (ac, bc) in a[..full].chunks_exact(16).zip(b[..full].chunks_exact(16)) {
        for j in 0..16 {
            acc[j] += ac[j] * bc[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[full..].iter().zip(&b[full..]) {
        s += x * y;
    }
    s
}

/// Attention for a batch of sequences; see [`crate::Backend::paged_attention`].
pub fn paged_attention(
    q: &[f32],
    cache: &CpuKvCache,
    seqs: &[AttnSeq<'_>],
    heads: usize,
    out: &mut [f32],
) -> Result<()> {
    let l = cache.layout;
    let hd = l.head_dim;
    ensure_shape(heads > 0 && heads.is_multiple_of(l.kv_heads), "paged_attention", || {
        format!("{heads} query heads is not a multiple of {} kv heads", l.kv_heads)
    })?;
    let width = heads * hd;
    ensure_shape(q.len() == out.len() && q.len().is_multiple_of(width), "paged_attention", || {
        format!("q has {} values, out {}, row width {width}", q.len(), out.len())
    })?;
    let rows = q.len() / width;
    // Map every query row to (its sequence, its position) and check the block tables.
    let mut row_info = vec![None; rows];
    for (si, s) in seqs.iter().enumerate() {
        s.check(si, rows, l)?;
        for i in 0..s.q_len {
            row_info[s.q_start + i] = Some((si, s.ctx_len - s.q_len + i));
        }
    }
    let group = heads / l.kv_heads;
    let kvw = l.token_width();
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
        let (row, h) = (idx / heads, idx % heads);
        let Some((si, pos)) = row_info[row] else {
            o.fill(0.0);
            return;
        };
        let s = &seqs[si];
        let kvh = h / group;
        let qv = &q[row * width + h * hd..row * width + (h + 1) * hd];
        // Walk the block table block by block (no per-token division), positions 0..=pos.
        let n = pos + 1;
        let slots = s.block_table.iter().flat_map(|&b| {
            let first = b as usize * l.block_size;
            first..first + l.block_size
        });
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for slot in slots.clone().take(n) {
            let base = slot * kvw + kvh * hd;
            let sc = dot(qv, &cache.k[base..base + hd]) * scale;
            max = max.max(sc);
            scores.push(sc);
        }
        let mut sum = 0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        let inv = 1.0 / sum;
        o.fill(0.0);
        for (slot, &p) in slots.take(n).zip(scores.iter()) {
            let base = slot * kvw + kvh * hd;
            let p = p * inv;
            for (ov, vv) in o.iter_mut().zip(&cache.v[base..base + hd]) {
                *ov += p * vv;
            }
        }
    });
    Ok(())
}
