//! LoRA terms for mixed-adapter batches on the CPU (the reference for the GPU's SGMV/BGMV).
//!
//! Short segments (decode rows: BGMV) are computed row by row in parallel over rows: each row
//! shrinks `t = A·x` with `r` dot products and expands with `r` scaled row additions of the
//! transposed up-projection `Bᵀ` (`[r, out]`, the layout `LoraSegment::b` holds), writing
//! straight into the output row. Long segments (prefill chunks: SGMV) go through the blocked
//! GEMM kernels, accumulating into the output in place. Rows covered by several segments (a
//! request with several adapters) add their terms in segment order, so results are
//! deterministic.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::backend::LoraSegment;
use crate::cpu::CpuWeight;
use crate::cpu::attention::dot;
use crate::cpu::matmul::matmul;
use crate::cpu::simd::{SimdLevel, multiversion};
use crate::error::{Result, ensure_shape};

/// A short segment's `A` and `Bᵀ` as f32 slices.
type SegmentWeights<'a> = (Cow<'a, [f32]>, Cow<'a, [f32]>);

/// Segments up to this many rows take the row-by-row path.
const SHORT_SEGMENT_ROWS: usize = 8;

fn f32_of(w: &CpuWeight) -> Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<u8, f32>(w.host().bytes()) {
        Ok(s) if w.host().dtype() == crate::DType::F32 => Cow::Borrowed(s),
        _ => Cow::Owned(w.host().to_f32()),
    }
}

/// One row's term: `y += scale * Bt_ᵀ (A x)` with `a` `[r, in]` and `bt` `[r, out]`.
#[inline(always)]
fn row_term_generic(x: &[f32], a: &[f32], bt: &[f32], scale: f32, y: &mut [f32]) {
    let in_dim = x.len();
    let out_dim = y.len();
    for (ar, br) in a.chunks_exact(in_dim).zip(bt.chunks_exact(out_dim)) {
        let t = dot(ar, x) * scale;
        for (yv, bv) in y.iter_mut().zip(br) {
            *yv += t * bv;
        }
    }
}

multiversion! {
    fn row_term(x: &[f32], a: &[f32], bt: &[f32], scale: f32, y: &mut [f32]) => row_term_generic
}

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
        ensure_shape(ac == in_dim && bc == out_dim && br == ar, "lora_sgmv", || {
            format!("segment {i}: A [{ar}, {ac}], Bᵀ [{br}, {bc}] for in {in_dim}, out {out_dim}")
        })?;
    }
    // Long segments: GEMM, one after another (each is parallel inside).
    for s in segments.iter().filter(|s| s.rows.len() > SHORT_SEGMENT_ROWS) {
        let n = s.rows.len();
        let r = s.a.host().rows();
        let xs = &x[s.rows.start * in_dim..s.rows.end * in_dim];
        let mut t = vec![0f32; n * r];
        matmul(level, xs, n, s.a.host(), &mut t)?;
        let bt = f32_of(s.b);
        let dst = &mut out[s.rows.start * out_dim..s.rows.end * out_dim];
        // SAFETY: dst is n x out_dim row-major, t is n x r row-major, bt is r x out_dim
        // row-major (all sizes checked above); dst = dst + scale * t·bt.
        unsafe {
            gemm::gemm(
                n,
                out_dim,
                r,
                dst.as_mut_ptr(),
                1,
                out_dim as isize,
                true,
                t.as_ptr(),
                1,
                r as isize,
                bt.as_ptr(),
                1,
                out_dim as isize,
                1.0f32,
                s.scale,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
    }
    // Short segments: per output row, its segments in order.
    let mut per_row: Vec<Vec<usize>> = vec![Vec::new(); rows];
    let mut any = false;
    for (i, s) in segments.iter().enumerate().filter(|(_, s)| s.rows.len() <= SHORT_SEGMENT_ROWS) {
        for r in s.rows.clone() {
            per_row[r].push(i);
            any = true;
        }
    }
    if !any {
        return Ok(());
    }
    let weights: Vec<Option<SegmentWeights<'_>>> =
        segments.iter().map(|s| (s.rows.len() <= SHORT_SEGMENT_ROWS).then(|| (f32_of(s.a), f32_of(s.b)))).collect();
    out.par_chunks_mut(out_dim).zip(x.par_chunks(in_dim)).zip(per_row.par_iter()).for_each(|((y, xr), segs)| {
        for &i in segs {
            if let Some((a, bt)) = &weights[i] {
                row_term(level, xr, a, bt, segments[i].scale, y);
            }
        }
    });
    Ok(())
}
