//! The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) written once against [`Backend`].
//!
//! `forward` takes a *batch of sequences*: rows are tokens from any number of sequences at any
//! positions (prefill chunks and single decode tokens mixed), each sequence reading its own
//! KV blocks. A single-sequence `generate` is a batch of one; continuous batching is the same
//! call with more sequences.

use openlora_kernels::{AttnSeq, Backend, HostWeight, KvLayout, LoraSegment, PickedRow, RopeTable, RowPick};

use crate::lora::{LoraModule, Proj, WeightedAdapter};

use super::config::LlamaConfig;
use super::error::{ModelError, Result};
use super::weights::TensorSource;

/// A linear layer `y = x · Wᵀ (+ b)`.
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`.
    pub weight: B::Weight,
    /// `[1, out_features]`, when present.
    pub bias: Option<B::Weight>,
}

impl<B: Backend> Linear<B> {
    /// `out = x·Wᵀ (+ b)` plus every LoRA segment's term.
    fn forward(
        &self,
        be: &B,
        x: &B::Buf,
        rows: usize,
        out: &mut B::Buf,
        lora: &[LoraSegment<'_, B::Weight>],
    ) -> Result<()> {
        be.matmul(x, rows, &self.weight, out)?;
        if let Some(b) = &self.bias {
            be.add_bias(out, b)?;
        }
        if !lora.is_empty() {
            let (n, k) = be.weight_shape(&self.weight);
            be.lora_sgmv(x, k, out, n, lora)?;
        }
        Ok(())
    }
}

/// One decoder layer's weights.
pub struct LlamaLayer<B: Backend> {
    /// RMSNorm before attention.
    pub attn_norm: B::Weight,
    /// Query projection.
    pub q: Linear<B>,
    /// Key projection.
    pub k: Linear<B>,
    /// Value projection.
    pub v: Linear<B>,
    /// Attention output projection.
    pub o: Linear<B>,
    /// RMSNorm before the MLP.
    pub ffn_norm: B::Weight,
    /// MLP gate projection.
    pub gate: Linear<B>,
    /// MLP up projection.
    pub up: Linear<B>,
    /// MLP down projection.
    pub down: Linear<B>,
}

/// A loaded model.
pub struct LlamaModel<B: Backend> {
    /// Hyper-parameters.
    pub config: LlamaConfig,
    backend: B,
    /// The token embedding; `None` when it is tied to the LM head, which then serves both
    /// (one copy of the table on the device, not two).
    embed: Option<B::Weight>,
    layers: Vec<LlamaLayer<B>>,
    norm: B::Weight,
    lm_head: B::Weight,
    rope: RopeTable,
}

/// One forward step over a batch of rows from one or more sequences.
pub struct ForwardBatch<'a, B: Backend> {
    /// Token per row.
    pub tokens: &'a [u32],
    /// Position per row.
    pub positions: &'a [u32],
    /// KV-cache slot per row, where this row's keys and values are written.
    pub slots: &'a [u32],
    /// The sequences, each owning a contiguous range of rows.
    pub seqs: &'a [AttnSeq<'a>],
    /// Rows whose logits are wanted (usually each sequence's last row).
    pub logits_rows: &'a [u32],
    /// The adapters each sequence uses (parallel to `seqs`; an empty slice, or an empty
    /// `adapters`, means the base model). Each row's LoRA terms come from its own sequence's
    /// adapters, so one batch mixes any number of adapters.
    pub adapters: &'a [&'a [WeightedAdapter<B>]],
}

impl<B: Backend> ForwardBatch<'_, B> {
    /// The LoRA segments for one module: one per (sequence, adapter targeting the module).
    fn segments<'m>(
        &'m self,
        module: impl Fn(&'m WeightedAdapter<B>) -> Option<&'m LoraModule<B>>,
    ) -> Vec<LoraSegment<'m, B::Weight>> {
        let mut out = Vec::new();
        for (seq, adapters) in self.seqs.iter().zip(self.adapters.iter()) {
            for wa in adapters.iter() {
                if let Some(m) = module(wa) {
                    out.push(LoraSegment {
                        rows: seq.q_start..seq.q_start + seq.q_len,
                        a: &m.a,
                        b: &m.b,
                        scale: m.scale * wa.weight,
                    });
                }
            }
        }
        out
    }
}

/// Row order that undoes llama.cpp's q/k permutation: HF row `h*hd + j*hd/2 + i` is GGUF row
/// `h*hd + 2*i + j`.
fn unpermute_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = Vec::with_capacity(heads * head_dim);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                order.push(h * head_dim + 2 * i + j);
            }
        }
    }
    order
}

impl<B: Backend> LlamaModel<B> {
    /// Loads every tensor from `src`, checking each one's shape against `config`.
    pub fn load(src: &dyn TensorSource, config: LlamaConfig, backend: B) -> Result<Self> {
        let c = &config;
        let get = |name: &str, rows: usize, cols: usize| -> Result<HostWeight> {
            let w = src.tensor(name)?.ok_or_else(|| ModelError::Tensor {
                path: src.path().to_path_buf(),
                tensor: name.to_owned(),
                reason: "missing".into(),
            })?;
            if (w.rows(), w.cols()) != (rows, cols) {
                return Err(ModelError::Tensor {
                    path: src.path().to_path_buf(),
                    tensor: name.to_owned(),
                    reason: format!("shape [{}, {}], expected [{rows}, {cols}]", w.rows(), w.cols()),
                });
            }
            Ok(w)
        };
        let prep = |w: HostWeight| backend.prepare_weight(w).map_err(ModelError::from);
        let unpermute = src.needs_qk_unpermute(c);
        let (h, qd, kvd) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let linear = |name: &str,
                      rows: usize,
                      cols: usize,
                      bias: bool,
                      heads_to_unpermute: Option<usize>|
         -> Result<Linear<B>> {
            let mut w = get(&format!("{name}.weight"), rows, cols)?;
            let mut b = if bias { Some(get(&format!("{name}.bias"), 1, rows)?) } else { None };
            if let Some(heads) = heads_to_unpermute {
                let order = unpermute_order(heads, c.head_dim);
                w = w.permute_rows(&order)?;
                if let Some(bb) = b.take() {
                    let vals = bb.to_f32();
                    let permuted: Vec<f32> = order.iter().map(|&i| vals[i]).collect();
                    b = Some(HostWeight::from_f32(1, rows, &permuted)?);
                }
            }
            Ok(Linear { weight: prep(w)?, bias: b.map(prep).transpose()? })
        };
        let embed_host = get("model.embed_tokens.weight", c.vocab_size, h)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let ab = c.attention_bias;
            layers.push(LlamaLayer {
                attn_norm: prep(get(&format!("{p}.input_layernorm.weight"), 1, h)?)?,
                q: linear(&format!("{p}.self_attn.q_proj"), qd, h, ab, unpermute.then_some(c.num_heads))?,
                k: linear(&format!("{p}.self_attn.k_proj"), kvd, h, ab, unpermute.then_some(c.num_kv_heads))?,
                v: linear(&format!("{p}.self_attn.v_proj"), kvd, h, ab, None)?,
                o: linear(&format!("{p}.self_attn.o_proj"), h, qd, false, None)?,
                ffn_norm: prep(get(&format!("{p}.post_attention_layernorm.weight"), 1, h)?)?,
                gate: linear(&format!("{p}.mlp.gate_proj"), c.intermediate_size, h, false, None)?,
                up: linear(&format!("{p}.mlp.up_proj"), c.intermediate_size, h, false, None)?,
                down: linear(&format!("{p}.mlp.down_proj"), h, c.intermediate_size, false, None)?,
            });
        }
        let (embed, lm_head) = if c.tie_word_embeddings {
            (None, prep(embed_host)?)
        } else {
            (Some(prep(embed_host)?), prep(get("lm_head.weight", c.vocab_size, h)?)?)
        };
        let rope = RopeTable::new(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_freq_scale.as_deref());
        Ok(Self { embed, norm: prep(get("model.norm.weight", 1, h)?)?, lm_head, layers, rope, config, backend })
    }

    /// The backend this model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The KV geometry for a pool of `num_blocks` blocks of `block_size` tokens.
    pub fn kv_layout(&self, num_blocks: usize, block_size: usize) -> KvLayout {
        KvLayout { num_blocks, block_size, kv_heads: self.config.num_kv_heads, head_dim: self.config.head_dim }
    }

    /// Allocates one KV pool per layer.
    pub fn alloc_kv(&self, layout: KvLayout) -> Result<Vec<B::KvCache>> {
        (0..self.config.num_layers).map(|_| self.backend.alloc_kv_cache(layout).map_err(ModelError::from)).collect()
    }

    /// Runs the decoder over `batch`, writing its keys/values into `kv` (one cache per layer),
    /// and returns the logits of `batch.logits_rows` (row-major, `vocab_size` each) on the host.
    pub fn forward(&self, kv: &mut [B::KvCache], batch: &ForwardBatch<'_, B>) -> Result<Vec<f32>> {
        let picks = vec![RowPick::Full; batch.logits_rows.len()];
        let rows = self.forward_picked(kv, batch, &picks)?;
        let mut out = Vec::with_capacity(rows.len() * self.config.vocab_size);
        for r in rows {
            if let PickedRow::Full(v) = r {
                out.extend(v);
            }
        }
        Ok(out)
    }

    /// [`Self::forward`], returning of each logits row only what `picks` (one per row of
    /// `batch.logits_rows`) asks: on a GPU a greedy or top-k row then reads back a few values
    /// instead of the vocabulary ([`Backend::pick_rows`]).
    pub fn forward_picked(
        &self,
        kv: &mut [B::KvCache],
        batch: &ForwardBatch<'_, B>,
        picks: &[RowPick],
    ) -> Result<Vec<PickedRow>> {
        if picks.len() != batch.logits_rows.len() {
            return Err(ModelError::InvalidRequest(format!(
                "{} picks for {} logits rows",
                picks.len(),
                batch.logits_rows.len()
            )));
        }
        self.backend.execute(|| {
            let logits = self.forward_inner(kv, batch)?;
            Ok(self.backend.pick_rows(&logits, self.config.vocab_size, picks)?)
        })
    }

    fn forward_inner(&self, kv: &mut [B::KvCache], batch: &ForwardBatch<'_, B>) -> Result<B::Buf> {
        let c = &self.config;
        let be = &self.backend;
        let n = batch.tokens.len();
        if batch.positions.len() != n || batch.slots.len() != n {
            return Err(ModelError::Kernel(openlora_kernels::KernelError::Shape {
                op: "forward",
                detail: format!("{n} tokens, {} positions, {} slots", batch.positions.len(), batch.slots.len()),
            }));
        }
        if kv.len() != c.num_layers {
            return Err(ModelError::Kernel(openlora_kernels::KernelError::KvCache(format!(
                "{} layer caches for {} layers",
                kv.len(),
                c.num_layers
            ))));
        }
        let (h, qd, kvd, ffn) =
            (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        let mut x = be.zeros(n * h)?;
        be.embedding(self.embed.as_ref().unwrap_or(&self.lm_head), batch.tokens, &mut x)?;
        let mut normed = be.zeros(n * h)?;
        let mut q = be.zeros(n * qd)?;
        let mut k = be.zeros(n * kvd)?;
        let mut v = be.zeros(n * kvd)?;
        let mut attn = be.zeros(n * qd)?;
        let mut proj = be.zeros(n * h)?;
        let mut gate = be.zeros(n * ffn)?;
        let mut up = be.zeros(n * ffn)?;
        let mut act = be.zeros(n * ffn)?;
        if !batch.adapters.is_empty() && batch.adapters.len() != batch.seqs.len() {
            return Err(ModelError::InvalidRequest(format!(
                "{} adapter lists for {} sequences",
                batch.adapters.len(),
                batch.seqs.len()
            )));
        }
        if let Some(first) = self.layers.first() {
            be.rms_norm(&x, &first.attn_norm, c.rms_norm_eps, &mut normed)?;
        }
        for (l, (layer, cache)) in self.layers.iter().zip(kv.iter_mut()).enumerate() {
            let lora = |p: Proj| batch.segments(move |wa| wa.adapter.module(l, p));
            // `normed` holds attn_norm(x): computed above for the first layer, fused with the
            // previous layer's residual add for the others.
            layer.q.forward(be, &normed, n, &mut q, &lora(Proj::Q))?;
            layer.k.forward(be, &normed, n, &mut k, &lora(Proj::K))?;
            layer.v.forward(be, &normed, n, &mut v, &lora(Proj::V))?;
            be.rope(&mut q, batch.positions, c.num_heads, &self.rope)?;
            be.rope(&mut k, batch.positions, c.num_kv_heads, &self.rope)?;
            be.write_kv(cache, &k, &v, batch.slots)?;
            be.paged_attention(&q, cache, batch.seqs, c.num_heads, &mut attn)?;
            layer.o.forward(be, &attn, n, &mut proj, &lora(Proj::O))?;
            be.add_rms_norm(&mut x, &proj, &layer.ffn_norm, c.rms_norm_eps, &mut normed)?;
            layer.gate.forward(be, &normed, n, &mut gate, &lora(Proj::Gate))?;
            layer.up.forward(be, &normed, n, &mut up, &lora(Proj::Up))?;
            be.silu_mul(&gate, &up, &mut act)?;
            layer.down.forward(be, &act, n, &mut proj, &lora(Proj::Down))?;
            match self.layers.get(l + 1) {
                Some(next) => be.add_rms_norm(&mut x, &proj, &next.attn_norm, c.rms_norm_eps, &mut normed)?,
                None => be.add_assign(&mut x, &proj)?,
            }
        }
        let m = batch.logits_rows.len();
        let mut last = be.zeros(m * h)?;
        be.gather_rows(&x, h, batch.logits_rows, &mut last)?;
        let mut last_normed = be.zeros(m * h)?;
        be.rms_norm(&last, &self.norm, c.rms_norm_eps, &mut last_normed)?;
        let mut logits = be.zeros(m * c.vocab_size)?;
        be.matmul(&last_normed, m, &self.lm_head, &mut logits)?;
        // LM-head LoRA applies to the gathered rows: logits row j belongs to the sequence that
        // owns batch row `logits_rows[j]`.
        let mut head_segments = Vec::new();
        for (j, &row) in batch.logits_rows.iter().enumerate() {
            let row = row as usize;
            let owner = batch.seqs.iter().position(|s| (s.q_start..s.q_start + s.q_len).contains(&row));
            if let Some(adapters) = owner.and_then(|si| batch.adapters.get(si)) {
                for wa in adapters.iter() {
                    if let Some(mh) = wa.adapter.lm_head() {
                        head_segments.push(LoraSegment {
                            rows: j..j + 1,
                            a: &mh.a,
                            b: &mh.b,
                            scale: mh.scale * wa.weight,
                        });
                    }
                }
            }
        }
        if !head_segments.is_empty() {
            be.lora_sgmv(&last_normed, h, &mut logits, c.vocab_size, &head_segments)?;
        }
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(heads, 2, hd/2) -> swap(1, 2): gguf row h*hd + 2i + j = hf row h*hd + j*hd/2 + i.
        let (heads, hd) = (2, 8);
        let hf: Vec<usize> = (0..heads * hd).collect();
        let mut gguf = vec![0; heads * hd];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    gguf[h * hd + 2 * i + j] = hf[h * hd + j * hd / 2 + i];
                }
            }
        }
        let order = unpermute_order(heads, hd);
        let back: Vec<usize> = order.iter().map(|&g| gguf[g]).collect();
        assert_eq!(back, hf);
    }
}
