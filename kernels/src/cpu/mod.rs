//! The CPU backend: the numerical reference every other backend is tested against.
//!
//! Kernels are plain Rust, specialised per SIMD level at run time ([`simd`]), parallelised with
//! rayon's global pool (size it with `RAYON_NUM_THREADS`). Weights stay in the bytes they were
//! loaded from (usually a memory map); only 1-D tensors (norms, biases) are expanded to f32.

pub mod attention;
pub mod int8;
pub mod lora;
pub mod matmul;
pub mod ops;
mod quant_dot;
pub mod simd;

use crate::backend::{AttnSeq, Backend, KvLayout, LoraSegment, RopeTable};
use crate::error::{Result, ensure_shape};
use crate::weight::HostWeight;

pub use attention::CpuKvCache;

/// A weight ready for the CPU kernels.
#[derive(Debug, Clone)]
pub struct CpuWeight {
    host: HostWeight,
    /// What the backend derived from the tensor, if anything. Behind one pointer because most
    /// weights have none, among them every LoRA module of the thousands of adapters a server
    /// may hold.
    extra: Option<std::sync::Arc<Extra>>,
}

#[derive(Debug)]
enum Extra {
    /// f32 copy of a 1-D tensor (norm weights, biases).
    Vector(Vec<f32>),
    /// The block-quantized matrix repacked for the 8-bit-activation kernels (only when the
    /// backend runs them).
    Packed(int8::PackedWeight),
}

impl CpuWeight {
    /// The underlying host tensor.
    pub fn host(&self) -> &HostWeight {
        &self.host
    }

    fn vector(&self) -> Option<&[f32]> {
        match self.extra.as_deref() {
            Some(Extra::Vector(v)) => Some(v),
            _ => None,
        }
    }

    fn packed(&self) -> Option<&int8::PackedWeight> {
        match self.extra.as_deref() {
            Some(Extra::Packed(p)) => Some(p),
            _ => None,
        }
    }
}

/// The CPU backend.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    level: simd::SimdLevel,
    int8: bool,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// A backend using the widest SIMD level this CPU supports, with f32 activations.
    pub fn new() -> Self {
        Self { level: simd::detected(), int8: false }
    }

    /// A backend pinned to a SIMD level (for tests comparing paths).
    pub fn with_level(level: simd::SimdLevel) -> Self {
        Self { level: level.min(simd::detected()), int8: false }
    }

    /// The same backend with block-quantized matmuls through 8-bit activations ([`int8`]) or
    /// not. Weights prepared before the switch keep the path they were prepared for.
    pub fn with_int8(self, on: bool) -> Self {
        Self { int8: on, ..self }
    }

    /// Whether block-quantized matmuls use 8-bit activations.
    pub fn int8(&self) -> bool {
        self.int8
    }

    fn vector<'a>(&self, w: &'a CpuWeight, op: &'static str) -> Result<&'a [f32]> {
        w.vector().ok_or_else(|| crate::KernelError::Shape {
            op,
            detail: format!("expected a 1-D weight, got [{}, {}]", w.host.rows(), w.host.cols()),
        })
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;

    fn name(&self) -> String {
        let acts = if self.int8 {
            if int8::has_vnni() { ", int8 activations (vnni)" } else { ", int8 activations" }
        } else {
            ""
        };
        format!("cpu ({}{acts}, {} threads)", self.level.name(), rayon::current_num_threads())
    }

    fn execute<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        // `scope` runs its body on a pool worker (injecting once if called from outside).
        let mut out = None;
        rayon::scope(|_| out = Some(f()));
        match out {
            Some(r) => r,
            None => unreachable!("rayon::scope runs its body before returning"),
        }
    }

    fn prepare_weight(&self, w: HostWeight) -> Result<CpuWeight> {
        let packed = if self.int8 { int8::PackedWeight::new(&w) } else { None };
        let extra = if let Some(p) = packed {
            // The matmuls read the packed copy from now on; the file's pages need not stay.
            w.advise_not_needed();
            Some(Extra::Packed(p))
        } else {
            (w.rows() == 1).then(|| Extra::Vector(w.to_f32()))
        };
        Ok(CpuWeight { host: w, extra: extra.map(std::sync::Arc::new) })
    }

    fn weight_shape(&self, w: &CpuWeight) -> (usize, usize) {
        (w.host.rows(), w.host.cols())
    }

    fn weight_bytes(&self, w: &CpuWeight) -> usize {
        w.host.bytes().len() + w.vector().map_or(0, |v| v.len() * 4) + w.packed().map_or(0, |p| p.bytes())
    }

    fn weights_in_host_memory(&self) -> bool {
        true
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        ops::embedding(&table.host, ids, out)
    }

    fn rms_norm(&self, x: &Vec<f32>, weight: &CpuWeight, eps: f32, out: &mut Vec<f32>) -> Result<()> {
        ops::rms_norm(x, self.vector(weight, "rms_norm")?, eps, out)
    }

    fn matmul(&self, x: &Vec<f32>, rows: usize, w: &CpuWeight, out: &mut Vec<f32>) -> Result<()> {
        if let Some(p) = w.packed() {
            let (n, k) = p.shape();
            ensure_shape(x.len() == rows * k && out.len() == rows * n, "matmul", || {
                format!("x {} out {} for {rows} rows of [{n}, {k}]", x.len(), out.len())
            })?;
            int8::matmul(self.level, x, rows, p, out);
            return Ok(());
        }
        matmul::matmul(self.level, x, rows, &w.host, out)
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &CpuWeight) -> Result<()> {
        let b = self.vector(bias, "add_bias")?;
        ensure_shape(!b.is_empty() && x.len().is_multiple_of(b.len()), "add_bias", || {
            format!("x {} bias {}", x.len(), b.len())
        })?;
        for row in x.chunks_exact_mut(b.len()) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
        Ok(())
    }

    fn add_assign(&self, acc: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        ensure_shape(acc.len() == x.len(), "add_assign", || format!("{} vs {}", acc.len(), x.len()))?;
        for (a, v) in acc.iter_mut().zip(x) {
            *a += v;
        }
        Ok(())
    }

    fn rope(&self, x: &mut Vec<f32>, positions: &[u32], heads: usize, table: &RopeTable) -> Result<()> {
        ops::rope(x, positions, heads, table)
    }

    fn silu_mul(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        ops::silu_mul(self.level, gate, up, out)
    }

    fn gather_rows(&self, x: &Vec<f32>, width: usize, rows: &[u32], out: &mut Vec<f32>) -> Result<()> {
        ensure_shape(width > 0 && out.len() == rows.len() * width, "gather_rows", || {
            format!("{} rows x {width} vs out {}", rows.len(), out.len())
        })?;
        let have = x.len() / width;
        for (&r, dst) in rows.iter().zip(out.chunks_exact_mut(width)) {
            ensure_shape((r as usize) < have, "gather_rows", || format!("row {r} of {have}"))?;
            dst.copy_from_slice(&x[r as usize * width..(r as usize + 1) * width]);
        }
        Ok(())
    }

    fn lora_sgmv(
        &self,
        x: &Vec<f32>,
        in_dim: usize,
        out: &mut Vec<f32>,
        out_dim: usize,
        segments: &[LoraSegment<'_, CpuWeight>],
    ) -> Result<()> {
        lora::lora_sgmv(self.level, x, in_dim, out, out_dim, segments)
    }

    fn alloc_kv_cache(&self, layout: KvLayout) -> Result<CpuKvCache> {
        Ok(CpuKvCache::new(layout))
    }

    fn write_kv(&self, cache: &mut CpuKvCache, k: &Vec<f32>, v: &Vec<f32>, slots: &[u32]) -> Result<()> {
        cache.write(k, v, slots)
    }

    fn paged_attention(
        &self,
        q: &Vec<f32>,
        cache: &CpuKvCache,
        seqs: &[AttnSeq<'_>],
        heads: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        attention::paged_attention(self.level, q, cache, seqs, heads, out)
    }
}
