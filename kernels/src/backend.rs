//! The `Backend` trait: every operation a Llama-family forward pass needs, over buffers that
//! live wherever the backend computes.
//!
//! The model code is written once against this trait. Activations are row-major 2-D buffers
//! (`rows` tokens by `width` features) in f32; weights are prepared once by the backend from
//! [`HostWeight`]s (a CPU backend keeps them memory-mapped, a GPU backend uploads them). The
//! KV cache is paged from the start: it is a pool of fixed-size blocks, sequences own block
//! tables, new keys/values are written to explicit slots (`block * block_size + offset`), and
//! attention reads through the block tables. A batch may hold several sequences at different
//! positions (prefill chunks and decode steps together), which is what continuous batching needs.

use crate::error::{KernelError, Result, ensure_shape};
use crate::weight::HostWeight;

/// Precomputed rotary-embedding tables, rotate-half (HF/NeoX) layout: for position `p` and
/// frequency index `i < head_dim/2`, `cos[p * half + i]` and `sin[p * half + i]`.
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// Rotary dimension (the head dimension).
    pub head_dim: usize,
    /// Positions covered.
    pub max_positions: usize,
    /// cos table, `max_positions * head_dim / 2` values.
    pub cos: Vec<f32>,
    /// sin table, same shape.
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Builds the table for `theta` with optional per-frequency scaling factors (`inv_freq[i]`
    /// is divided by `freq_scale[i]`, as Llama 3's rope scaling does).
    pub fn new(head_dim: usize, max_positions: usize, theta: f32, freq_scale: Option<&[f32]>) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / f64::from(theta).powf((2 * i) as f64 / head_dim as f64);
                f / freq_scale.and_then(|s| s.get(i)).map_or(1.0, |&s| f64::from(s))
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                // f32 angle like HF (inv_freq is f32 there, the product is f32).
                let angle = (p as f32) * (*f as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { head_dim, max_positions, cos, sin }
    }
}

/// One sequence's part of a batched attention call.
#[derive(Clone, Debug)]
pub struct AttnSeq<'a> {
    /// First row of this sequence's queries in the batch.
    pub q_start: usize,
    /// Number of query rows (new tokens) this step.
    pub q_len: usize,
    /// Tokens in the cache for this sequence after this step's writes; query row `i` sits at
    /// position `ctx_len - q_len + i` and attends causally to positions `0..=` that.
    pub ctx_len: usize,
    /// Cache blocks holding positions `0..ctx_len` in order.
    pub block_table: &'a [u32],
}

impl AttnSeq<'_> {
    /// Checks sequence `si` of a call with `rows` query rows against the cache geometry: its
    /// rows lie in the batch, its context covers its new rows, its block table is long enough
    /// and names only blocks of the pool. Every backend validates with this before reading.
    pub fn check(&self, si: usize, rows: usize, l: KvLayout) -> Result<()> {
        let s = self;
        ensure_shape(s.q_len <= s.ctx_len && s.q_start + s.q_len <= rows, "paged_attention", || {
            format!("sequence {si}: rows {}..{} of {rows}, ctx {}", s.q_start, s.q_start + s.q_len, s.ctx_len)
        })?;
        if s.block_table.len() * l.block_size < s.ctx_len {
            return Err(KernelError::KvCache(format!(
                "sequence {si}: {} blocks cannot hold {} tokens",
                s.block_table.len(),
                s.ctx_len
            )));
        }
        if let Some(b) = s.block_table.iter().find(|&&b| b as usize >= l.num_blocks) {
            return Err(KernelError::KvCache(format!(
                "sequence {si}: block {b} is outside the pool of {}",
                l.num_blocks
            )));
        }
        Ok(())
    }
}

/// Geometry of a paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimension of each head.
    pub head_dim: usize,
}

impl KvLayout {
    /// Values of one token's keys (or values) for all KV heads.
    pub fn token_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes one layer's K and V take in f32.
    pub fn bytes_per_layer(&self) -> usize {
        2 * self.num_blocks * self.block_size * self.token_width() * 4
    }
}

/// One LoRA term over a contiguous range of batch rows: `out[rows] += scale * (x[rows] · Aᵀ) · B`
/// with `A` of shape `[r, in]` (PEFT's `lora_A`) and `B` given *transposed*, `[r, out]` (PEFT's
/// `lora_B` is `[out, r]`): the expand step then reads contiguous rows of length `out`.
///
/// A batch carries one segment per (sequence, adapter) pair, so sequences using different
/// adapters, or several adapters each, share one call; ranks may differ between segments and
/// nothing is padded to the largest rank. A decode step's segments are single rows (BGMV); a
/// prefill chunk's are row ranges (SGMV).
#[derive(Debug)]
pub struct LoraSegment<'a, W> {
    /// Batch rows the term applies to.
    pub rows: std::ops::Range<usize>,
    /// Down projection `[r, in]`.
    pub a: &'a W,
    /// Up projection, transposed: `[r, out]`.
    pub b: &'a W,
    /// Scale: the adapter's `alpha / r` (or `alpha / sqrt(r)`) times the request's weight.
    pub scale: f32,
}

/// The compute operations of a Llama-family forward pass.
///
/// Guarantees: each method checks its operands' sizes and returns [`crate::KernelError`] on a
/// mismatch instead of reading out of bounds. Non-guarantees: results are not bit-identical
/// across backends or thread counts (reductions may be ordered differently); they agree within
/// the tolerances the CPU reference tests state.
pub trait Backend: Send + Sync {
    /// An f32 activation buffer in the backend's memory.
    type Buf: Send + Sync;
    /// A weight prepared for this backend's kernels.
    type Weight: Send + Sync;
    /// One layer's paged K and V storage.
    type KvCache: Send + Sync;

    /// A human-readable name ("cpu (avx512)").
    fn name(&self) -> String;

    /// Runs `f` (a whole forward pass) in the backend's execution context. The CPU backend runs
    /// it on a worker of its thread pool, so each kernel's parallel loop starts without a
    /// cross-thread hand-off (which costs tens of microseconds per call otherwise).
    fn execute<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R;

    /// Prepares a weight for this backend (kept memory-mapped or transformed/uploaded).
    fn prepare_weight(&self, w: HostWeight) -> Result<Self::Weight>;
    /// `(rows, cols)` of a prepared weight.
    fn weight_shape(&self, w: &Self::Weight) -> (usize, usize);
    /// Bytes the backend holds for a prepared weight (a memory map's pages count).
    fn weight_bytes(&self, w: &Self::Weight) -> usize;
    /// Whether this backend's weights live in host memory, so that a second, host-tier copy of
    /// an adapter would only hold the same values twice (the CPU backend).
    fn weights_in_host_memory(&self) -> bool {
        false
    }

    /// A zeroed buffer of `len` values.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer holding `data`.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Copies `buf` to host memory.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Number of values in `buf`.
    fn buf_len(&self, buf: &Self::Buf) -> usize;

    /// `out[i, :] = table[ids[i], :]` (dequantizing rows of a quantized table).
    fn embedding(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Buf) -> Result<()>;
    /// Row-wise RMSNorm: `out = x / sqrt(mean(x^2) + eps) * weight`; `weight` is `[1, width]`.
    fn rms_norm(&self, x: &Self::Buf, weight: &Self::Weight, eps: f32, out: &mut Self::Buf) -> Result<()>;
    /// The residual add fused with the next norm: `x += delta`, then `out = rms_norm(x)`.
    /// Backends with a fused kernel override it (one pass over `x` instead of three).
    fn add_rms_norm(
        &self,
        x: &mut Self::Buf,
        delta: &Self::Buf,
        weight: &Self::Weight,
        eps: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.add_assign(x, delta)?;
        self.rms_norm(x, weight, eps, out)
    }
    /// `out[rows, n] = x[rows, k] · wᵀ` for `w` of shape `[n, k]`.
    fn matmul(&self, x: &Self::Buf, rows: usize, w: &Self::Weight, out: &mut Self::Buf) -> Result<()>;
    /// Adds a `[1, width]` bias to every row of `x`.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Weight) -> Result<()>;
    /// `acc += x`, elementwise.
    fn add_assign(&self, acc: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// Applies rotary embeddings in place to `x` (`rows` by `heads * head_dim`), row `r` at
    /// `positions[r]`.
    fn rope(&self, x: &mut Self::Buf, positions: &[u32], heads: usize, table: &RopeTable) -> Result<()>;
    /// `out = silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf) -> Result<()>;
    /// Copies rows `rows[i]` of `x` (width `width`) into row `i` of `out`.
    fn gather_rows(&self, x: &Self::Buf, width: usize, rows: &[u32], out: &mut Self::Buf) -> Result<()>;

    /// Adds every segment's LoRA term to `out` (`rows` by `out_dim`), reading `x` (`rows` by
    /// `in_dim`). Segments may overlap (several adapters on one sequence); their terms add up.
    fn lora_sgmv(
        &self,
        x: &Self::Buf,
        in_dim: usize,
        out: &mut Self::Buf,
        out_dim: usize,
        segments: &[LoraSegment<'_, Self::Weight>],
    ) -> Result<()>;

    /// Allocates one layer's KV pool.
    fn alloc_kv_cache(&self, layout: KvLayout) -> Result<Self::KvCache>;
    /// Bytes one key or value element takes in this backend's KV pools (4 for f32 pools).
    fn kv_value_bytes(&self) -> usize {
        4
    }
    /// Writes row `r` of `k` and `v` (width `kv_heads * head_dim`) to cache slot `slots[r]`.
    fn write_kv(&self, cache: &mut Self::KvCache, k: &Self::Buf, v: &Self::Buf, slots: &[u32]) -> Result<()>;
    /// Causal scaled-dot-product attention with grouped KV heads, reading keys and values
    /// through each sequence's block table. `q` and `out` are `rows` by `heads * head_dim`.
    fn paged_attention(
        &self,
        q: &Self::Buf,
        cache: &Self::KvCache,
        seqs: &[AttnSeq<'_>],
        heads: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// Whether [`Backend::pick_rows`] saves work over downloading every logit: true where
    /// logits live in device memory, so greedy and top-k rows move a few values, not a
    /// vocabulary's worth. The engine asks for reduced rows only then.
    fn picks_on_device(&self) -> bool {
        false
    }

    /// What the sampler needs of each of the `picks.len()` rows of `width` logits: every value,
    /// the argmax, or the top k. A reduced row that holds a non-finite value is reported as
    /// [`PickedRow::NonFinite`] (the host sampler refuses such rows too). The default reads
    /// every value back and reduces on the host.
    fn pick_rows(&self, logits: &Self::Buf, width: usize, picks: &[RowPick]) -> Result<Vec<PickedRow>> {
        let v = self.download(logits)?;
        pick_host(&v, width, picks)
    }
}

/// What the sampler needs of one logits row ([`Backend::pick_rows`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowPick {
    /// Every logit (penalties, grammars, logit bias and logprobs read them all).
    Full,
    /// The index of the largest (greedy decoding).
    Argmax,
    /// The `k` largest with their indices (top-k sampling over `k` candidates).
    TopK(usize),
}

/// One row's answer from [`Backend::pick_rows`].
#[derive(Clone, Debug, PartialEq)]
pub enum PickedRow {
    /// Every logit of the row.
    Full(Vec<f32>),
    /// The index of the largest logit (the first on ties).
    Argmax(u32),
    /// The `k` largest logits with their indices, descending (ties: lower index first).
    TopK(Vec<(u32, f32)>),
    /// An `Argmax` or `TopK` row holding NaN or an infinity.
    NonFinite,
}

/// [`Backend::pick_rows`] on host values.
pub fn pick_host(v: &[f32], width: usize, picks: &[RowPick]) -> Result<Vec<PickedRow>> {
    ensure_shape(width > 0 && v.len() == picks.len() * width, "pick_rows", || {
        format!("{} values for {} rows of {width}", v.len(), picks.len())
    })?;
    Ok(v.chunks_exact(width)
        .zip(picks)
        .map(|(row, pick)| match pick {
            RowPick::Full => PickedRow::Full(row.to_vec()),
            _ if row.iter().any(|x| !x.is_finite()) => PickedRow::NonFinite,
            RowPick::Argmax => PickedRow::Argmax(argmax_host(row, 1, width)[0]),
            RowPick::TopK(k) => PickedRow::TopK(top_k_host(row, 1, width, *k).swap_remove(0)),
        })
        .collect())
}

/// Index of the largest value of each of `rows` rows (the first on ties; NaN never wins;
/// `u32::MAX` for a row with no number).
pub fn argmax_host(v: &[f32], rows: usize, width: usize) -> Vec<u32> {
    v.chunks_exact(width).take(rows).map(|r| crate::cpu::ops::argmax(r).map_or(u32::MAX, |i| i as u32)).collect()
}

/// The `k` largest values per row, descending, ties by lower index, NaN skipped.
pub fn top_k_host(v: &[f32], rows: usize, width: usize, k: usize) -> Vec<Vec<(u32, f32)>> {
    (0..rows)
        .map(|r| {
            let row = &v[r * width..(r + 1) * width];
            let mut idx: Vec<u32> = (0..width as u32).filter(|&i| !row[i as usize].is_nan()).collect();
            idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            idx.truncate(k);
            idx.into_iter().map(|i| (i, row[i as usize])).collect()
        })
        .collect()
}
