//! LoRA terms for mixed-adapter batches on the CPU (the reference for the GPU's SGMV/BGMV).
//!
//! Each segment is computed as two small matmuls (shrink `x·Aᵀ`, expand `t·Bᵀ`) with the same
//! kernels as the base weights, so a one-row decode segment takes the streaming path and a long
//! prefill segment the blocked GEMM path. Segments run in parallel into private buffers and are
//! then added in order, which keeps the sum deterministic when segments overlap.

use rayon::prelude::*;

use crate::backend::LoraSegment;
use crate::cpu::CpuWeight;
use crate::cpu::matmul::matmul;
use crate::cpu::simd::SimdLevel;
use crate::error::{Result, ensure_shape};

/// See [`crate::Backend::lora_sgmv`].
pub fn lora_sgmv(
    level: SimdLevel,
    x: &[f32],
    in_dim: usize,
    out: &mut [f32],
    out_dim: usize,
    segments: &[LoraSegment<'_, CpuWeight>],
) -> Result<()> {
    ensure_shape(in_dim > 0 && x.len().is_multiple_of(in_dim), "lora_sgmv", || format!("x {} in {in_dim}", x.len()))?;
    let rows = x.len() / in_dim;
    ensure_shape(out.len() == rows * out_dim, "lora_sgmv", || format!("out {} for {rows} x {out_dim}", out.len()))?;
    for (i, s) in segments.iter().enumerate() {
        let (ar, ac) = (s.a.host().rows(), s.a.host().cols());
        let (br, bc) = (s.b.host().rows(), s.b.host().cols());
        ensure_shape(s.rows.start <= s.rows.end && s.rows.end <= rows, "lora_sgmv", || {
            format!("segment {i}: rows {:?} of {rows}", s.rows)
        })?;
        ensure_shape(ac == in_dim && br == out_dim && bc == ar, "lora_sgmv", || {
            format!("segment {i}: A [{ar}, {ac}], B [{br}, {bc}] for in {in_dim}, out {out_dim}")
        })?;
    }
    let deltas: Vec<Result<Vec<f32>>> = segments
        .par_iter()
        .map(|s| {
            let n = s.rows.len();
            let r = s.a.host().rows();
            let xs = &x[s.rows.start * in_dim..s.rows.end * in_dim];
            let mut t = vec![0f32; n * r];
            matmul(level, xs, n, s.a.host(), &mut t)?;
            for v in &mut t {
                *v *= s.scale;
            }
            let mut d = vec![0f32; n * out_dim];
            matmul(level, &t, n, s.b.host(), &mut d)?;
            Ok(d)
        })
        .collect();
    for (s, d) in segments.iter().zip(deltas) {
        let d = d?;
        for (o, v) in out[s.rows.start * out_dim..s.rows.end * out_dim].iter_mut().zip(&d) {
            *o += v;
        }
    }
    Ok(())
}
