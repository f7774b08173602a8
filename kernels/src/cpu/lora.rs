//! LoRA terms for mixed-adapter batches on the CPU (the reference for the GPU's SGMV/BGMV).
//!
//! Short segments (decode rows: BGMV) are computed a segment at a time, in parallel over
//! segments: the segment's rows shrink `t = A·x` with `r` dot products and expand with `r`
//! scaled row additions of the transposed up-projection `Bᵀ` (`[r, out]`, the layout
//! `LoraSegment::b` holds), writing straight into the output rows. Each row of `A` and `Bᵀ` is
//! widened from its file precision (f16/bf16) once per segment, into a small buffer, so an
//! adapter is never copied whole to f32. Long segments (prefill chunks: SGMV) go through the blocked
//! GEMM kernels, accumulating into the output in place. Rows covered by several segments (a
//! request with several adapters) add their terms in segment order, so results are
//! deterministic.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::backend::LoraSegment;
use crate::cpu::CpuWeight;
use crate::cpu::attention::dot;
use crate::cpu::matmul::{SendPtr, f16_to_f32, matmul};
use crate::cpu::simd::{SimdLevel, multiversion};
use crate::error::{Result, ensure_shape};
use crate::quant::{DType, dequantize_row};
use crate::weight::HostWeight;

/// Segments up to this many rows take the row-by-row path.
const SHORT_SEGMENT_ROWS: usize = 8;

fn f32_of(w: &CpuWeight) -> Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<u8, f32>(w.host().bytes()) {
        Ok(s) if w.host().dtype() == crate::DType::F32 => Cow::Borrowed(s),
        _ => Cow::Owned(w.host().to_f32()),
    }
}

/// Widens `out.len()` values of `dtype` stored in `bytes` to f32.
#[inline(always)]
fn widen(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        _ => dequantize_row(dtype, bytes, out),
    }
}

/// A short segment's terms, `y_i += scale · Btᵀ (A x_i)` for its rows `x_i` (`xs`, rows × in)
/// and outputs `ys` (rows × out), with `a` `[r, in]` and `bt` `[r, out]` in the precision of
/// their file: each row of `A` and `Bᵀ` is widened once per call, into `scratch`, and used for
/// every row of the segment (the fused shrink of one adapter segment).
#[inline(always)]
fn segment_term_generic(a: &HostWeight, bt: &HostWeight, xs: &[f32], scale: f32, ys: &mut [f32], scratch: &mut [f32]) {
    let (in_dim, out_dim) = (a.cols(), bt.cols());
    let n = xs.len() / in_dim;
    let mut t = [0f32; SHORT_SEGMENT_ROWS];
    for j in 0..a.rows() {
        let w = &mut scratch[..in_dim];
        widen(a.dtype(), a.row(j), w);
        for (ti, x) in t.iter_mut().zip(xs.chunks_exact(in_dim)).take(n) {
            *ti = dot(w, x) * scale;
        }
        let w = &mut scratch[..out_dim];
        widen(bt.dtype(), bt.row(j), w);
        for (ti, y) in t.iter().zip(ys.chunks_exact_mut(out_dim)).take(n) {
            for (yv, bv) in y.iter_mut().zip(w.iter()) {
                *yv += ti * bv;
            }
        }
    }
}

multiversion! {
    fn segment_term(a: &HostWeight, bt: &HostWeight, xs: &[f32], scale: f32, ys: &mut [f32], scratch: &mut [f32]) => segment_term_generic
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
    // Short segments: each one's rows together. Disjoint segments (one adapter per request)
    // run in parallel; when rows are shared (several adapters on one request) the segments run
    // one after another, in order, so every row adds its terms in segment order either way.
    let short: Vec<&LoraSegment<'_, CpuWeight>> =
        segments.iter().filter(|s| !s.rows.is_empty() && s.rows.len() <= SHORT_SEGMENT_ROWS).collect();
    if short.is_empty() {
        return Ok(());
    }
    let mut ranges: Vec<_> = short.iter().map(|s| s.rows.clone()).collect();
    ranges.sort_by_key(|r| r.start);
    let disjoint = ranges.windows(2).all(|w| w[0].end <= w[1].start);
    let scratch_len = in_dim.max(out_dim);
    let dst = SendPtr(out.as_mut_ptr());
    let run = |s: &LoraSegment<'_, CpuWeight>, scratch: &mut Vec<f32>| {
        scratch.resize(scratch_len, 0.0);
        let xs = &x[s.rows.start * in_dim..s.rows.end * in_dim];
        // SAFETY: rows s.rows of `out` (rows x out_dim, checked above) are written by this
        // call alone: segments run concurrently only when their row ranges are disjoint.
        let ys =
            unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(s.rows.start * out_dim), s.rows.len() * out_dim) };
        segment_term(level, s.a.host(), s.b.host(), xs, s.scale, ys, scratch);
    };
    if disjoint && short.len() > 1 {
        short.par_iter().for_each_init(Vec::new, |scratch, s| run(s, scratch));
    } else {
        let mut scratch = Vec::new();
        for s in &short {
            run(s, &mut scratch);
        }
    }
    Ok(())
}
