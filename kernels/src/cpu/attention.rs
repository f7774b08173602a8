//! Paged causal attention with grouped KV heads, on the CPU.
//!
//! The cache of one layer is two pools (K and V) of `num_blocks * block_size` token slots. V
//! keeps vLLM's layout (each slot `kv_heads * head_dim` values, what the CUDA kernels read too).
//! K is stored transposed within each block: per block and KV head, `head_dim` rows of
//! `block_size` values (dimension-major), so a query's scores against a whole block are
//! `head_dim` vector multiply-adds across the block's keys, with no horizontal sums.

use rayon::prelude::*;

use crate::backend::{AttnSeq, KvLayout};
use crate::cpu::matmul::SendPtr;
use crate::cpu::ops::exp;
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

/// Asks the CPU to bring `values` into its caches (one request per 64-byte line); a hint with
/// no effect on results.
#[inline(always)]
fn prefetch(values: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in values.chunks(16) {
        // SAFETY: a prefetch never faults and changes no state a program can observe; the
        // address is inside a live slice.
        #[allow(unused_unsafe)]
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// How many K blocks ahead of the one being scored are requested.
const PREFETCH_AHEAD: usize = 2;

/// Lanes of the attention kernels' accumulators (one AVX-512 register of f32).
const LANES: usize = 16;

/// Where one tile's keys and values sit.
#[derive(Clone, Copy)]
struct HeadGeometry {
    block_size: usize,
    kv_heads: usize,
    /// The tile's KV head.
    kv_head: usize,
}

/// Most queries one tile computes together. A tile is some query heads of one KV head for
/// some query rows of one sequence: every K and V block it reads is used for all its queries
/// while it is in cache, and each query's accumulators stay in registers.
const MAX_TILE: usize = 12;

/// Tile sizes with their own kernel; a tile is padded up to the next one.
const TILE_SIZES: [usize; 7] = [1, 2, 3, 4, 6, 8, 12];

/// `NQ` queries of one KV head attending causally: query `i` to positions `0..ns[i]` of the
/// sequence (`block_table`), softmax in f32, into `o` (`NQ × head_dim`). `qt` holds the queries
/// already scaled (`NQ × head_dim`). Queries are kept apart by a stride, not packed side by side,
/// so LLVM broadcasts each value from memory instead of loading a vector of them and shuffling.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_tile_n<const NQ: usize>(
    qt: &[f32],
    ns: &[usize],
    k: &[f32],
    v: &[f32],
    block_table: &[u32],
    g: HeadGeometry,
    scratch: &mut TileScratch,
    o: &mut [f32],
) {
    let hd = qt.len() / NQ;
    let bs = g.block_size;
    let kv_width = g.kv_heads * hd;
    let nmax = ns.iter().copied().max().unwrap_or(0);
    let blocks = nmax.div_ceil(bs);
    let stride = blocks * bs;
    let scores = &mut scratch.scores;
    // Scores block by block (query-major): per dimension, one load of the block's keys of that
    // dimension (the transposed K layout) and one multiply-add per query, across 16 keys.
    scores.clear();
    scores.resize(NQ * stride, 0.0);
    let lanes = bs / LANES * LANES;
    let k_at = |b: u32| (b as usize * g.kv_heads + g.kv_head) * hd * bs;
    let vh = g.kv_head * hd;
    // Only a tile whose queries all sit at one position (a decode row's heads) streams its
    // blocks once and waits on memory; a prefill tile's rows reuse blocks the tiles before it
    // just read, and the requests only cost it time (attention_shapes, 1x512 prefill: 167 ms
    // with them, 155-158 without).
    let prefetching = ns.iter().all(|&n| n == nmax);
    for (bi, &b) in block_table[..blocks].iter().enumerate() {
        let kb = &k[k_at(b)..][..hd * bs];
        // The blocks of a sequence lie anywhere in the pool, so the hardware prefetcher, which
        // stops at page boundaries, cannot see the next one coming: ask for the next block's keys
        // and this block's values (read after the softmax) while this block's scores compute.
        if prefetching {
            if bi == 0 {
                for &next in block_table[1..blocks.min(PREFETCH_AHEAD + 1)].iter() {
                    prefetch(&k[k_at(next)..][..hd * bs]);
                }
            }
            if let Some(&next) = block_table[..blocks].get(bi + PREFETCH_AHEAD + 1) {
                prefetch(&k[k_at(next)..][..hd * bs]);
            }
            for j in 0..bs.min(nmax - bi * bs) {
                prefetch(&v[(b as usize * bs + j) * kv_width + vh..][..hd]);
            }
        }
        for c in (0..lanes).step_by(LANES) {
            let mut acc = [[0f32; LANES]; NQ];
            for d in 0..hd {
                let key: &[f32; LANES] = kb[d * bs + c..d * bs + c + LANES].try_into().expect("LANES");
                for (qi, a) in acc.iter_mut().enumerate() {
                    let q = qt[qi * hd + d];
                    for l in 0..LANES {
                        a[l] = q.mul_add(key[l], a[l]);
                    }
                }
            }
            for (qi, a) in acc.iter().enumerate() {
                scores[qi * stride + bi * bs + c..][..LANES].copy_from_slice(a);
            }
        }
        if lanes < bs {
            for qi in 0..NQ {
                let sc = &mut scores[qi * stride + bi * bs..][..bs];
                for (d, kd) in kb.chunks_exact(bs).enumerate() {
                    let q = qt[qi * hd + d];
                    for (s, &kv) in sc[lanes..].iter_mut().zip(&kd[lanes..]) {
                        *s = q.mul_add(kv, *s);
                    }
                }
            }
        }
    }
    // Softmax per query over its own positions; later positions weigh 0.
    let mut inv = [0f32; NQ];
    for (qi, iv) in inv.iter_mut().enumerate() {
        let n = ns[qi];
        let s = &mut scores[qi * stride..qi * stride + n];
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sums = [0f32; LANES];
        for ch in s.chunks_mut(LANES) {
            for (x, sum) in ch.iter_mut().zip(&mut sums) {
                *x = exp(*x - max);
                *sum += *x;
            }
        }
        *iv = 1.0 / sums.iter().sum::<f32>();
        scores[qi * stride + n..(qi + 1) * stride].fill(0.0);
    }
    // The weighted sums of values, 16 dimensions at a time: each value row's 16 dimensions are
    // loaded once for all queries (one cache line per key and pass).
    let full = hd / LANES * LANES;
    for c in (0..full).step_by(LANES) {
        let mut acc = [[0f32; LANES]; NQ];
        for (bi, &b) in block_table[..blocks].iter().enumerate() {
            let first = b as usize * bs;
            for j in 0..bs.min(nmax - bi * bs) {
                let i = (first + j) * kv_width + vh + c;
                let vv: &[f32; LANES] = v[i..i + LANES].try_into().expect("LANES");
                let pos = bi * bs + j;
                for (qi, a) in acc.iter_mut().enumerate() {
                    let pq = scores[qi * stride + pos];
                    for l in 0..LANES {
                        a[l] = pq.mul_add(vv[l], a[l]);
                    }
                }
            }
        }
        for (qi, a) in acc.iter().enumerate() {
            for l in 0..LANES {
                o[qi * hd + c + l] = a[l] * inv[qi];
            }
        }
    }
    if full < hd {
        for (qi, iv) in inv.iter().enumerate() {
            let oq = &mut o[qi * hd + full..(qi + 1) * hd];
            oq.fill(0.0);
            for pos in 0..nmax {
                let slot = block_table[pos / bs] as usize * bs + pos % bs;
                let p = scores[qi * stride + pos];
                let base = slot * kv_width + vh;
                for (ov, vv) in oq.iter_mut().zip(&v[base + full..base + hd]) {
                    *ov = p.mul_add(*vv, *ov);
                }
            }
            for ov in oq.iter_mut() {
                *ov *= iv;
            }
        }
    }
}

/// Scratch of one tile kernel call.
#[derive(Default)]
struct TileScratch {
    scores: Vec<f32>,
}

/// [`attend_tile_n`] for `qs.len() / head_dim` queries, one of [`TILE_SIZES`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_tile_generic(
    qt: &[f32],
    ns: &[usize],
    k: &[f32],
    v: &[f32],
    block_table: &[u32],
    g: HeadGeometry,
    scratch: &mut TileScratch,
    o: &mut [f32],
) {
    match ns.len() {
        1 => attend_tile_n::<1>(qt, ns, k, v, block_table, g, scratch, o),
        2 => attend_tile_n::<2>(qt, ns, k, v, block_table, g, scratch, o),
        3 => attend_tile_n::<3>(qt, ns, k, v, block_table, g, scratch, o),
        4 => attend_tile_n::<4>(qt, ns, k, v, block_table, g, scratch, o),
        6 => attend_tile_n::<6>(qt, ns, k, v, block_table, g, scratch, o),
        8 => attend_tile_n::<8>(qt, ns, k, v, block_table, g, scratch, o),
        12 => attend_tile_n::<12>(qt, ns, k, v, block_table, g, scratch, o),
        n => unreachable!("tile of {n} queries is not one of {TILE_SIZES:?}"),
    }
}

multiversion! {
    fn attend_tile(qt: &[f32], ns: &[usize], k: &[f32], v: &[f32], block_table: &[u32], g: HeadGeometry, scratch: &mut TileScratch, o: &mut [f32]) => attend_tile_generic
}

/// One tile of work: query heads `head0..head0 + heads` of the group of KV head `kv_head`, for
/// query rows `row0..row0 + rows` of sequence `seq` (rows counted within the sequence).
#[derive(Clone, Copy)]
struct Tile {
    seq: usize,
    kv_head: usize,
    row0: usize,
    rows: usize,
    head0: usize,
    heads: usize,
}

/// Per-task scratch of [`paged_attention`].
#[derive(Default)]
struct Scratch {
    qt: Vec<f32>,
    ns: Vec<usize>,
    tile: TileScratch,
    o: Vec<f32>,
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
    // Rows no sequence claims get zeros.
    let mut claimed = vec![false; rows];
    for (si, s) in seqs.iter().enumerate() {
        s.check(si, rows, l)?;
        for (row, c) in claimed[s.q_start..s.q_start + s.q_len].iter_mut().enumerate() {
            if std::mem::replace(c, true) {
                return Err(KernelError::Shape {
                    op: "paged_attention",
                    detail: format!("sequence {si} claims row {} that an earlier sequence claims", s.q_start + row),
                });
            }
        }
    }
    for (row, _) in claimed.iter().enumerate().filter(|(_, c)| !**c) {
        out[row * width..(row + 1) * width].fill(0.0);
    }
    let group = heads / l.kv_heads;
    // A group that fits in a tile takes as many query rows as fit beside it; a larger group is
    // split into tiles of MAX_TILE heads, one row each.
    let (head_chunk, rows_per_tile) = if group <= MAX_TILE { (group, MAX_TILE / group) } else { (MAX_TILE, 1) };
    let mut tiles = Vec::new();
    for (seq, s) in seqs.iter().enumerate() {
        for kv_head in 0..l.kv_heads {
            for row0 in (0..s.q_len).step_by(rows_per_tile) {
                for head0 in (0..group).step_by(head_chunk) {
                    let (rows, heads) = (rows_per_tile.min(s.q_len - row0), head_chunk.min(group - head0));
                    tiles.push(Tile { seq, kv_head, row0, rows, head0, heads });
                }
            }
        }
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let dst = SendPtr(out.as_mut_ptr());
    tiles.par_iter().for_each_init(Scratch::default, |sc, t| {
        let s = &seqs[t.seq];
        let nq = t.rows * t.heads;
        let padded = *TILE_SIZES.iter().find(|&&n| n >= nq).expect("tiles hold at most MAX_TILE queries");
        let first_pos = s.ctx_len - s.q_len + t.row0;
        // Queries scaled; padding queries (zeros over the longest context)
        // are computed and dropped.
        sc.qt.clear();
        sc.qt.resize(padded * hd, 0.0);
        sc.ns.clear();
        for r in 0..t.rows {
            let row = s.q_start + t.row0 + r;
            for hh in 0..t.heads {
                let h = t.kv_head * group + t.head0 + hh;
                let qi = sc.ns.len();
                for (d, &x) in q[row * width + h * hd..row * width + (h + 1) * hd].iter().enumerate() {
                    sc.qt[qi * hd + d] = x * scale;
                }
                sc.ns.push(first_pos + r + 1);
            }
        }
        sc.ns.resize(padded, first_pos + t.rows);
        sc.o.resize(padded * hd, 0.0);
        let geo = HeadGeometry { block_size: l.block_size, kv_heads: l.kv_heads, kv_head: t.kv_head };
        attend_tile(level, &sc.qt, &sc.ns, &cache.k, &cache.v, s.block_table, geo, &mut sc.tile, &mut sc.o);
        for r in 0..t.rows {
            let row = s.q_start + t.row0 + r;
            for hh in 0..t.heads {
                let h = t.kv_head * group + t.head0 + hh;
                let src = &sc.o[(r * t.heads + hh) * hd..][..hd];
                // SAFETY: tiles cover disjoint (row, head) pairs of rows the sequences claim,
                // each inside `out` (shapes checked above), so no two tasks write one value.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr().add(row * width + h * hd), hd);
                }
            }
        }
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

    /// A batch as the scheduler builds it: decode rows (one query over a longer context),
    /// a partial prefill (queries over the tail of the context), a full prefill, a row no
    /// sequence claims (zeros), and query groups larger than one tile (split by heads);
    /// every SIMD level against plain causal attention. Two sequences claiming one row is
    /// refused by name.
    #[test]
    fn paged_attention_of_a_mixed_batch_matches_plain_causal_attention() {
        let mut rng = StdRng::seed_from_u64(12);
        // (kv heads, query heads): a group of 3, and groups of 14 and 28 (split over tiles).
        for (kv_heads, heads) in [(2usize, 6usize), (2, 28), (1, 28)] {
            let (block_size, head_dim) = (16usize, 24usize);
            // (q_len, ctx_len) per sequence: decode, decode at a block edge, partial prefill,
            // full prefill, decode over one key.
            let shapes = [(1usize, 40usize), (1, 32), (13, 50), (9, 9), (1, 1)];
            let per_seq: Vec<usize> = shapes.iter().map(|&(_, c)| c.div_ceil(block_size)).collect();
            let l = KvLayout { num_blocks: per_seq.iter().sum::<usize>() + 2, block_size, kv_heads, head_dim };
            let kvw = l.token_width();
            let width = heads * head_dim;
            // One unclaimed row between the second and third sequence.
            let rows = shapes.iter().map(|s| s.0).sum::<usize>() + 1;
            let q: Vec<f32> = (0..rows * width).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut cache = CpuKvCache::new(l);
            let mut next_block = l.num_blocks as u32;
            let mut data = Vec::new();
            let mut q_start = 0;
            for (si, (&(q_len, ctx), &nb)) in shapes.iter().zip(&per_seq).enumerate() {
                // Blocks handed out from the top of the pool down, so tables are scrambled
                // relative to each other.
                let table: Vec<u32> = (0..nb)
                    .map(|_| {
                        next_block -= 1;
                        next_block
                    })
                    .collect();
                let k: Vec<f32> = (0..ctx * kvw).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let v: Vec<f32> = (0..ctx * kvw).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let slots: Vec<u32> =
                    (0..ctx).map(|t| table[t / block_size] * block_size as u32 + (t % block_size) as u32).collect();
                cache.write(&k, &v, &slots).expect("write");
                if si == 2 {
                    q_start += 1;
                }
                data.push((q_start, q_len, ctx, table, k, v));
                q_start += q_len;
            }
            let seqs: Vec<AttnSeq<'_>> = data
                .iter()
                .map(|(q_start, q_len, ctx, table, _, _)| AttnSeq {
                    q_start: *q_start,
                    q_len: *q_len,
                    ctx_len: *ctx,
                    block_table: table,
                })
                .collect();
            let unclaimed = data[2].0 - 1;
            for level in [SimdLevel::Generic, SimdLevel::Avx2, SimdLevel::Avx512] {
                if level > crate::cpu::simd::detected() {
                    continue;
                }
                let mut out = vec![f32::NAN; q.len()];
                paged_attention(level, &q, &cache, &seqs, heads, &mut out).expect("attention");
                assert!(out[unclaimed * width..(unclaimed + 1) * width].iter().all(|&x| x == 0.0), "unclaimed row");
                for (si, (q_start, q_len, ctx, _, k, v)) in data.iter().enumerate() {
                    for r in 0..*q_len {
                        let (row, pos) = (q_start + r, ctx - q_len + r);
                        for h in 0..heads {
                            // The reference reads the query at `row` and keys 0..=pos.
                            let want = reference(&q, k, v, row, pos, h, l, heads);
                            let got = &out[row * width + h * head_dim..][..head_dim];
                            for (a, b) in got.iter().zip(&want) {
                                assert!(
                                    (a - b).abs() < 1e-5,
                                    "kv {kv_heads} heads {heads} {level:?} seq {si} row {row} head {h}: {a} vs {b}"
                                );
                            }
                        }
                    }
                }
            }
            let mut overlapping = seqs.clone();
            overlapping[1].q_start = overlapping[0].q_start;
            let err = paged_attention(SimdLevel::Generic, &q, &cache, &overlapping, heads, &mut vec![0.0; q.len()])
                .expect_err("two sequences on one row");
            assert!(err.to_string().contains("claims row 0"), "{err}");
        }
    }
}
