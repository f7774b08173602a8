//! Paged causal attention with grouped KV heads, on the CPU.
//!
//! The cache of one layer is two pools (K and V) of `num_blocks * block_size` token slots. V
//! keeps vLLM's layout (each slot `kv_heads * head_dim` values, what the CUDA kernels read too).
//! K is stored transposed within each block: per block and KV head, `head_dim` rows of
//! `block_size` values (dimension-major), so a query's scores against a whole block are
//! `head_dim` vector multiply-adds across the block's keys, with no horizontal sums.

use rayon::prelude::*;

use crate::backend::{AttnSeq, KvLayout};
use crate::cpu::simd::{SimdLevel, multiversion};
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

    /// Index of dimension 0 of KV head `h` at `slot` in the transposed K pool (dimension `d`
    /// is `block_size * d` further).
    fn k_index(&self, slot: usize, h: usize) -> usize {
        let l = self.layout;
        ((slot / l.block_size * l.kv_heads + h) * l.head_dim) * l.block_size + slot % l.block_size
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
            let (hd, bs) = (self.layout.head_dim, self.layout.block_size);
            for h in 0..self.layout.kv_heads {
                let at = self.k_index(s, h);
                for (d, &kv) in k[r * w + h * hd..r * w + (h + 1) * hd].iter().enumerate() {
                    self.k[at + d * bs] = kv;
                }
            }
            self.v[s * w..(s + 1) * w].copy_from_slice(&v[r * w..(r + 1) * w]);
        }
        Ok(())
    }

    /// The K and V values at slot `slot`, each in slot order (`kv_heads * head_dim`), for
    /// tests and debugging.
    pub fn read_slot(&self, slot: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        let l = self.layout;
        let w = l.token_width();
        if slot >= l.num_blocks * l.block_size {
            return None;
        }
        let k = (0..l.kv_heads)
            .flat_map(|h| (0..l.head_dim).map(move |d| (h, d)))
            .map(|(h, d)| self.k[self.k_index(slot, h) + d * l.block_size])
            .collect();
        Some((k, self.v[slot * w..(slot + 1) * w].to_vec()))
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

/// Lanes of the attention kernels' accumulators (one AVX-512 register of f32).
const LANES: usize = 16;

/// Where one query head's keys and values sit, and its score scale.
#[derive(Clone, Copy)]
struct HeadGeometry {
    block_size: usize,
    kv_heads: usize,
    /// The query's KV head.
    kv_head: usize,
    scale: f32,
}

/// One query head `qv` attending to positions `0..n` of its sequence (`block_table`), softmax
/// in f32, into `o`. `scores` is scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_one_generic(
    qv: &[f32],
    k: &[f32],
    v: &[f32],
    block_table: &[u32],
    n: usize,
    g: HeadGeometry,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    let hd = qv.len();
    let bs = g.block_size;
    let kv_width = g.kv_heads * hd;
    let blocks = n.div_ceil(bs);
    // Scores block by block: `head_dim` multiply-adds of a query value times the block's keys'
    // values of that dimension (the transposed K layout), over all `block_size` keys at once.
    scores.clear();
    scores.resize(blocks * bs, 0.0);
    for (&b, sc) in block_table[..blocks].iter().zip(scores.chunks_exact_mut(bs)) {
        let kb = &k[(b as usize * g.kv_heads + g.kv_head) * hd * bs..][..hd * bs];
        // 16 keys at a time in a register-sized accumulator; a block size that is not a
        // multiple of 16 takes the plain loop for its remainder.
        let lanes = bs / LANES * LANES;
        for c in (0..lanes).step_by(LANES) {
            // Two accumulators (even and odd dimensions), so the additions do not wait on
            // each other.
            let (mut a0, mut a1) = ([0f32; LANES], [0f32; LANES]);
            let key = |d: usize| -> &[f32; LANES] { kb[d * bs + c..d * bs + c + LANES].try_into().expect("LANES") };
            let pairs = hd / 2 * 2;
            for d in (0..pairs).step_by(2) {
                let (q0, q1) = (qv[d] * g.scale, qv[d + 1] * g.scale);
                let (k0, k1) = (key(d), key(d + 1));
                for l in 0..LANES {
                    a0[l] += q0 * k0[l];
                    a1[l] += q1 * k1[l];
                }
            }
            if pairs < hd {
                let (q0, k0) = (qv[pairs] * g.scale, key(pairs));
                for l in 0..LANES {
                    a0[l] += q0 * k0[l];
                }
            }
            for l in 0..LANES {
                sc[c + l] = a0[l] + a1[l];
            }
        }
        for (&qd, kd) in qv.iter().zip(kb.chunks_exact(bs)) {
            let qd = qd * g.scale;
            for (s, &kv) in sc[lanes..].iter_mut().zip(&kd[lanes..]) {
                *s += qd * kv;
            }
        }
    }
    scores.truncate(n);
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let slots = block_table.iter().flat_map(|&b| {
        let first = b as usize * bs;
        first..first + bs
    });
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    let inv = 1.0 / sum;
    // The weighted sum of values, 16 dimensions at a time in a register-sized accumulator.
    let vh = g.kv_head * hd;
    let wide = hd / (4 * LANES) * (4 * LANES);
    for c in (0..wide).step_by(4 * LANES) {
        weighted_sum::<{ 4 * LANES }>(
            v,
            block_table,
            bs,
            kv_width,
            vh + c,
            &scores[..n],
            inv,
            &mut o[c..c + 4 * LANES],
        );
    }
    let full = hd / LANES * LANES;
    for c in (wide..full).step_by(LANES) {
        weighted_sum::<LANES>(v, block_table, bs, kv_width, vh + c, &scores[..n], inv, &mut o[c..c + LANES]);
    }
    if full < hd {
        o[full..].fill(0.0);
        for (slot, &p) in slots.take(n).zip(scores.iter()) {
            let base = slot * kv_width + vh;
            for (ov, vv) in o[full..].iter_mut().zip(&v[base + full..base + hd]) {
                *ov += p * vv;
            }
        }
        for ov in &mut o[full..] {
            *ov *= inv;
        }
    }
}

/// `o = inv · Σ_j p_j v_j[at..at + W]` over the positions of `ps`, `W` values in a fixed-size
/// accumulator (several independent registers for `W` > 16).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weighted_sum<const W: usize>(
    v: &[f32],
    block_table: &[u32],
    bs: usize,
    kv_width: usize,
    at: usize,
    ps: &[f32],
    inv: f32,
    o: &mut [f32],
) {
    let mut acc = [0f32; W];
    for (&b, pb) in block_table.iter().zip(ps.chunks(bs)) {
        let first = b as usize * bs;
        for (j, &p) in pb.iter().enumerate() {
            let i = (first + j) * kv_width + at;
            let vv: &[f32; W] = v[i..i + W].try_into().expect("W values");
            for l in 0..W {
                acc[l] += p * vv[l];
            }
        }
    }
    for (ov, a) in o.iter_mut().zip(&acc) {
        *ov = a * inv;
    }
}

multiversion! {
    fn attend_one(qv: &[f32], k: &[f32], v: &[f32], block_table: &[u32], n: usize, g: HeadGeometry, scores: &mut Vec<f32>, o: &mut [f32]) => attend_one_generic
}

/// Attention for a batch of sequences; see [`crate::Backend::paged_attention`].
pub fn paged_attention(
    level: SimdLevel,
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
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
        let (row, h) = (idx / heads, idx % heads);
        let Some((si, pos)) = row_info[row] else {
            o.fill(0.0);
            return;
        };
        let s = &seqs[si];
        let qv = &q[row * width + h * hd..row * width + (h + 1) * hd];
        let geo = HeadGeometry { block_size: l.block_size, kv_heads: l.kv_heads, kv_head: h / group, scale };
        attend_one(level, qv, &cache.k, &cache.v, s.block_table, pos + 1, geo, scores, o);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Causal attention of every query row over its sequence's positions, in f64 from the
    /// rows as written (no cache, no blocks).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        row: usize,
        pos: usize,
        h: usize,
        l: KvLayout,
        heads: usize,
    ) -> Vec<f32> {
        let (hd, kvw) = (l.head_dim, l.token_width());
        let kvh = h / (heads / l.kv_heads);
        let qv = &q[row * heads * hd + h * hd..][..hd];
        let scale = 1.0 / (hd as f64).sqrt();
        let s: Vec<f64> = (0..=pos)
            .map(|t| (0..hd).map(|d| f64::from(qv[d]) * f64::from(k[t * kvw + kvh * hd + d])).sum::<f64>() * scale)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..hd)
            .map(|d| (0..=pos).map(|t| e[t] * f64::from(v[t * kvw + kvh * hd + d])).sum::<f64>() / z)
            .map(|x| x as f32)
            .collect()
    }

    /// The transposed-K cache and the block kernels against plain causal attention: block
    /// sizes with and without a 16-key remainder, head sizes with a 64-wide part, a 16-wide
    /// part and a tail, grouped KV heads, a shuffled block table, every SIMD level.
    #[test]
    fn paged_attention_matches_plain_causal_attention() {
        let mut rng = StdRng::seed_from_u64(11);
        for (block_size, head_dim) in [(16usize, 64usize), (5, 20), (32, 128), (16, 8)] {
            let (kv_heads, heads, len) = (2usize, 6usize, 37usize);
            let blocks = len.div_ceil(block_size);
            let l = KvLayout { num_blocks: blocks + 3, block_size, kv_heads, head_dim };
            let kvw = l.token_width();
            let k: Vec<f32> = (0..len * kvw).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..len * kvw).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let q: Vec<f32> = (0..len * heads * head_dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
            // Blocks of the pool in a scrambled order, as a real block table has them.
            let table: Vec<u32> = (0..blocks as u32).rev().map(|b| b + 2).collect();
            let slots: Vec<u32> =
                (0..len).map(|t| table[t / block_size] * block_size as u32 + (t % block_size) as u32).collect();
            let mut cache = CpuKvCache::new(l);
            cache.write(&k, &v, &slots).expect("write");
            for (t, &slot) in slots.iter().enumerate() {
                let (ks, vs) = cache.read_slot(slot as usize).expect("slot");
                assert_eq!(ks, k[t * kvw..(t + 1) * kvw], "K of position {t} reads back");
                assert_eq!(vs, v[t * kvw..(t + 1) * kvw], "V of position {t} reads back");
            }
            let seqs = [AttnSeq { q_start: 0, q_len: len, ctx_len: len, block_table: &table }];
            for level in [SimdLevel::Generic, SimdLevel::Avx2, SimdLevel::Avx512] {
                if level > crate::cpu::simd::detected() {
                    continue;
                }
                let mut out = vec![0f32; q.len()];
                paged_attention(level, &q, &cache, &seqs, heads, &mut out).expect("attention");
                for row in 0..len {
                    for h in 0..heads {
                        let want = reference(&q, &k, &v, row, row, h, l, heads);
                        let got = &out[row * heads * head_dim + h * head_dim..][..head_dim];
                        for (a, b) in got.iter().zip(&want) {
                            assert!(
                                (a - b).abs() < 1e-5,
                                "bs {block_size} hd {head_dim} {level:?} row {row} head {h}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
