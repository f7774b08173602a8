//! Matrix multiplication `out[m, n] = x[m, k] · wᵀ` for every weight dtype.
//!
//! Two regimes, because decode and prefill are bound by different things:
//! - few rows (decode, `m <= MATVEC_MAX_ROWS`): memory-bound. Each weight row is streamed once
//!   from memory in its stored format (quantized blocks stay quantized) and dotted with every
//!   activation row while it sits in L1. The block scale is applied per block and the Q4_1/Q4_0
//!   offset term is factored out through per-block sums of `x`, so the inner loop is one
//!   multiply-add per value.
//! - many rows (prefill): compute-bound. Panels of weight rows are dequantized to f32 into a
//!   per-thread buffer and multiplied with the `gemm` crate's blocked kernels; the dequantization
//!   cost is amortised over all `m` rows.
//!
//! Activations stay f32 throughout, so results match dequantize-then-f32 up to summation order.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::simd::{SimdLevel, multiversion};
use crate::error::{Result, ensure_shape};
use crate::quant::{DType, QK, dequantize_row};
use crate::weight::HostWeight;

/// Up to this many activation rows, the streaming (matvec) kernel is used.
pub const MATVEC_MAX_ROWS: usize = 6;
/// With the multi-row AVX-512 kernels, the streaming path pays off up to this many rows.
pub const MATVEC_MAX_ROWS_MULTI: usize = 32;
/// Weight rows per parallel task in the streaming kernel.
const MATVEC_ROWS_PER_TASK: usize = 32;
/// Weight rows dequantized per panel in the GEMM path.
const PANEL_ROWS: usize = 64;

#[inline(always)]
fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut wv = [0f32; 16];
    for (wc, xc) in w.chunks_exact(64).zip(x.chunks_exact(16)) {
        for (v, c) in wv.iter_mut().zip(wc.chunks_exact(4)) {
            *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        for j in 0..16 {
            acc[j] += wv[j] * xc[j];
        }
    }
    let tail = x.len() / 16 * 16;
    let mut s: f32 = acc.iter().sum();
    for (c, xv) in w[tail * 4..].chunks_exact(4).zip(&x[tail..]) {
        s += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * xv;
    }
    s
}

#[inline(always)]
fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (wc, xc) in w.chunks_exact(32).zip(x.chunks_exact(16)) {
        for j in 0..16 {
            let bits = u32::from(u16::from_le_bytes([wc[2 * j], wc[2 * j + 1]])) << 16;
            acc[j] += f32::from_bits(bits) * xc[j];
        }
    }
    let tail = x.len() / 16 * 16;
    let mut s: f32 = acc.iter().sum();
    for (c, xv) in w[tail * 2..].chunks_exact(2).zip(&x[tail..]) {
        s += bf16::from_le_bytes([c[0], c[1]]).to_f32() * xv;
    }
    s
}

#[inline(always)]
fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    use half::slice::HalfFloatSliceExt;
    let mut acc = [0f32; 16];
    let mut hv = [f16::ZERO; 64];
    let mut fv = [0f32; 64];
    let mut done = 0;
    for (wc, xc) in w.chunks_exact(128).zip(x.chunks_exact(64)) {
        for (h, c) in hv.iter_mut().zip(wc.chunks_exact(2)) {
            *h = f16::from_le_bytes([c[0], c[1]]);
        }
        hv.convert_to_f32_slice(&mut fv);
        for (fc, xcc) in fv.chunks_exact(16).zip(xc.chunks_exact(16)) {
            for j in 0..16 {
                acc[j] += fc[j] * xcc[j];
            }
        }
        done += 64;
    }
    let mut s: f32 = acc.iter().sum();
    for (c, xv) in w[done * 2..].chunks_exact(2).zip(&x[done..]) {
        s += f16::from_le_bytes([c[0], c[1]]).to_f32() * xv;
    }
    s
}

/// Blocks whose scales are converted together (a stack buffer's worth).
const SCALE_CHUNK: usize = 64;

/// f16 -> f32 without branches, so loops over many scales vectorise. Exact for normals,
/// subnormals (the multiply renormalises them), infinities and NaNs.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // Move exponent and mantissa into f32 position, then rebias the exponent by 2^112.
    let finite = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    let special = f32::from_bits((em << 13) | 0x7f80_0000);
    let v = if em >= 0x7c00 { special } else { finite };
    f32::from_bits(v.to_bits() | sign)
}

/// Converts the f16 at byte `at` of each of the first `n` blocks (each `stride` bytes) of `w`.
#[inline(always)]
fn block_scales(w: &[u8], stride: usize, at: usize, n: usize, out: &mut [f32; SCALE_CHUNK]) {
    let mut bits = [0u16; SCALE_CHUNK];
    for (b, v) in bits.iter_mut().enumerate().take(n) {
        *v = u16::from_le_bytes([w[b * stride + at], w[b * stride + at + 1]]);
    }
    for (o, &b) in out.iter_mut().zip(&bits) {
        *o = f16_to_f32(b);
    }
}

#[inline(always)]
fn dot_q8_0(w: &[u8], x: &[f32]) -> f32 {
    const BB: usize = 2 + QK;
    let mut acc = [0f32; QK];
    let mut ds = [0f32; SCALE_CHUNK];
    for (wc, xc) in w.chunks(BB * SCALE_CHUNK).zip(x.chunks(QK * SCALE_CHUNK)) {
        let nb = wc.len() / BB;
        block_scales(wc, BB, 0, nb, &mut ds);
        for ((blk, xb), &d) in wc.chunks_exact(BB).zip(xc.chunks_exact(QK)).zip(&ds) {
            let qs = &blk[2..BB];
            for j in 0..QK {
                acc[j] += d * (f32::from(qs[j] as i8) * xb[j]);
            }
        }
    }
    acc.iter().sum()
}

/// Shared by Q4_0 and Q4_1: `sum_b d_b * sum_j q_bj x_bj` plus `sum_b o_b * xsum_b`, where the
/// offset `o_b` is the block min (Q4_1, at byte 2) or `-8 d_b` (Q4_0).
#[inline(always)]
fn dot_q4<const BB: usize, const HAS_MIN: bool>(w: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    const H: usize = QK / 2;
    let qoff = BB - H;
    let mut acc = [0f32; H];
    let mut off = [0f32; SCALE_CHUNK];
    let mut ds = [0f32; SCALE_CHUNK];
    let mut ms = [0f32; SCALE_CHUNK];
    for ((wc, xc), sc) in w.chunks(BB * SCALE_CHUNK).zip(x.chunks(QK * SCALE_CHUNK)).zip(xsum.chunks(SCALE_CHUNK)) {
        let nb = wc.len() / BB;
        block_scales(wc, BB, 0, nb, &mut ds);
        if HAS_MIN {
            block_scales(wc, BB, 2, nb, &mut ms);
        } else {
            for (m, d) in ms.iter_mut().zip(&ds) {
                *m = -8.0 * d;
            }
        }
        for ((o, m), s) in off.iter_mut().zip(&ms).zip(sc) {
            *o += m * s;
        }
        for ((blk, xb), &d) in wc.chunks_exact(BB).zip(xc.chunks_exact(QK)).zip(&ds) {
            let qs = &blk[qoff..BB];
            for j in 0..H {
                acc[j] += d * (f32::from(qs[j] & 0xF) * xb[j] + f32::from(qs[j] >> 4) * xb[j + H]);
            }
        }
    }
    acc.iter().sum::<f32>() + off.iter().sum::<f32>()
}

/// Dots weight rows `w_rows` (each `row_bytes` long) with every activation row of `xs`
/// (`m` rows of `k`), writing `out_t[r * m + i]`.
#[inline(always)]
fn matvec_rows_generic(
    dtype: DType,
    w_rows: &[u8],
    row_bytes: usize,
    xs: &[f32],
    xsums: &[f32],
    k: usize,
    out_t: &mut [f32],
) {
    let m = xs.len() / k;
    let nb = k / QK;
    for (row, out) in w_rows.chunks_exact(row_bytes).zip(out_t.chunks_exact_mut(m)) {
        for (i, o) in out.iter_mut().enumerate() {
            let x = &xs[i * k..(i + 1) * k];
            *o = match dtype {
                DType::F32 => dot_f32(row, x),
                DType::F16 => dot_f16(row, x),
                DType::BF16 => dot_bf16(row, x),
                DType::Q8_0 => dot_q8_0(row, x),
                DType::Q4_0 => dot_q4::<{ 2 + QK / 2 }, false>(row, x, &xsums[i * nb..(i + 1) * nb]),
                DType::Q4_1 => dot_q4::<{ 4 + QK / 2 }, true>(row, x, &xsums[i * nb..(i + 1) * nb]),
            };
        }
    }
}

multiversion! {
    fn matvec_rows_portable(dtype: DType, w_rows: &[u8], row_bytes: usize, xs: &[f32], xsums: &[f32], k: usize, out_t: &mut [f32]) => matvec_rows_generic
}

/// The streaming kernel: hand-written x86 kernels for the GGUF block formats where the CPU has
/// them, the portable (auto-vectorised) kernels otherwise.
#[allow(clippy::too_many_arguments)]
fn matvec_rows(
    level: SimdLevel,
    dtype: DType,
    w_rows: &[u8],
    row_bytes: usize,
    xs: &[f32],
    xsums: &[f32],
    k: usize,
    out_t: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0) {
        use crate::cpu::quant_dot::*;
        let m = xs.len() / k;
        let nb = k / QK;
        let kind = if dtype == DType::Q4_0 { Q4Kind::Q4_0 } else { Q4Kind::Q4_1 };
        for (row, out) in w_rows.chunks_exact(row_bytes).zip(out_t.chunks_exact_mut(m)) {
            let mut start = 0;
            if level == SimdLevel::Avx512 {
                // Four activation rows per pass over the weight row: unpack each block once.
                while start + 4 <= m {
                    let x = |i: usize| &xs[(start + i) * k..(start + i + 1) * k];
                    let s = |i: usize| xsums.get((start + i) * nb..(start + i + 1) * nb).unwrap_or(&[]);
                    // SAFETY: as below, for four rows.
                    let r4 = unsafe {
                        if dtype == DType::Q8_0 {
                            dot_q8_0_avx512_rows::<4>(row, [x(0), x(1), x(2), x(3)])
                        } else {
                            dot_q4_avx512_rows::<4>(kind, row, [x(0), x(1), x(2), x(3)], [s(0), s(1), s(2), s(3)])
                        }
                    };
                    out[start..start + 4].copy_from_slice(&r4);
                    start += 4;
                }
            }
            for (i, o) in out.iter_mut().enumerate().skip(start) {
                let x = &xs[i * k..(i + 1) * k];
                let xsum = xsums.get(i * nb..(i + 1) * nb).unwrap_or(&[]);
                // SAFETY: `level` was detected on this CPU (AVX2+FMA+F16C at least, AVX-512
                // for the 512 kernels); `row` holds exactly k / 32 blocks of `dtype` (checked
                // by HostWeight) and `xsum` one sum per block for the Q4 formats.
                *o = unsafe {
                    match (level, dtype) {
                        (SimdLevel::Avx512, DType::Q8_0) => dot_q8_0_avx512(row, x),
                        (SimdLevel::Avx512, _) => dot_q4_avx512(kind, row, x, xsum),
                        (_, DType::Q8_0) => dot_q8_0_avx2(row, x),
                        _ => dot_q4_avx2(kind, row, x, xsum),
                    }
                };
            }
        }
        return;
    }
    matvec_rows_portable(level, dtype, w_rows, row_bytes, xs, xsums, k, out_t)
}

#[inline(always)]
fn dequant_rows_generic(dtype: DType, w_rows: &[u8], row_bytes: usize, k: usize, dst: &mut [f32]) {
    for (row, d) in w_rows.chunks_exact(row_bytes).zip(dst.chunks_exact_mut(k)) {
        dequantize_row(dtype, row, d);
    }
}

multiversion! {
    fn dequant_rows(dtype: DType, w_rows: &[u8], row_bytes: usize, k: usize, dst: &mut [f32]) => dequant_rows_generic
}

/// A raw pointer that may cross threads; each task writes a disjoint set of elements (the
/// panel GEMM's column ranges, the int8 kernels' 16-column groups, the LoRA segments' rows).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: used only to let rayon tasks write disjoint parts of one output matrix.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer. A method (not field access) so closures capture the whole `Send` wrapper.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `out[m, n] = x[m, k] · wᵀ` where `w` is `[n, k]`.
pub fn matmul(level: SimdLevel, x: &[f32], m: usize, w: &HostWeight, out: &mut [f32]) -> Result<()> {
    let (n, k) = (w.rows(), w.cols());
    ensure_shape(x.len() == m * k, "matmul", || format!("x has {} values, expected {m} x {k}", x.len()))?;
    ensure_shape(out.len() == m * n, "matmul", || format!("out has {} values, expected {m} x {n}", out.len()))?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let multi = level == SimdLevel::Avx512 && matches!(w.dtype(), DType::Q4_0 | DType::Q4_1 | DType::Q8_0);
    if m <= MATVEC_MAX_ROWS || (multi && m <= MATVEC_MAX_ROWS_MULTI) {
        matvec(level, x, m, w, out);
    } else {
        panel_gemm(level, x, m, w, out);
    }
    Ok(())
}

fn block_sums(x: &[f32], dtype: DType) -> Vec<f32> {
    if matches!(dtype, DType::Q4_0 | DType::Q4_1) {
        x.chunks_exact(QK).map(|c| c.iter().sum()).collect()
    } else {
        Vec::new()
    }
}

fn matvec(level: SimdLevel, x: &[f32], m: usize, w: &HostWeight, out: &mut [f32]) {
    let (n, k) = (w.rows(), w.cols());
    let dtype = w.dtype();
    let rb = w.row_bytes();
    let bytes = w.bytes();
    let xsums = block_sums(x, dtype);
    let run = |out_t: &mut [f32]| {
        out_t.par_chunks_mut(MATVEC_ROWS_PER_TASK * m).enumerate().for_each(|(t, chunk)| {
            let r0 = t * MATVEC_ROWS_PER_TASK;
            let rows = chunk.len() / m;
            matvec_rows(level, dtype, &bytes[r0 * rb..(r0 + rows) * rb], rb, x, &xsums, k, chunk);
        });
    };
    if m == 1 {
        run(out);
    } else {
        let mut out_t = vec![0f32; n * m];
        run(&mut out_t);
        for r in 0..n {
            for i in 0..m {
                out[i * n + r] = out_t[r * m + i];
            }
        }
    }
}

fn panel_gemm(level: SimdLevel, x: &[f32], m: usize, w: &HostWeight, out: &mut [f32]) {
    let (n, k) = (w.rows(), w.cols());
    let dtype = w.dtype();
    let rb = w.row_bytes();
    let bytes = w.bytes();
    let dst = SendPtr(out.as_mut_ptr());
    let panels = n.div_ceil(PANEL_ROWS);
    (0..panels).into_par_iter().for_each_init(
        || vec![0f32; PANEL_ROWS * k],
        |buf, p| {
            let r0 = p * PANEL_ROWS;
            let rows = PANEL_ROWS.min(n - r0);
            let panel = &mut buf[..rows * k];
            dequant_rows(level, dtype, &bytes[r0 * rb..(r0 + rows) * rb], rb, k, panel);
            // SAFETY: dst points to `out` (m x n, row-major, checked by `matmul`); this task
            // writes only columns r0..r0+rows, which no other task touches. lhs is `x`
            // (m x k, row-major); rhs is the panel read as a k x rows matrix (column j is
            // weight row r0 + j). All strides stay inside the slices.
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    k,
                    dst.ptr().add(r0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    panel.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_row;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn reference(x: &[f32], m: usize, w: &HostWeight) -> Vec<f32> {
        let wf = w.to_f32();
        let (n, k) = (w.rows(), w.cols());
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for r in 0..n {
                out[i * n + r] = (0..k).map(|j| f64::from(x[i * k + j]) * f64::from(wf[r * k + j])).sum::<f64>() as f32;
            }
        }
        out
    }

    /// Quantized kernels match dequantize-then-f32 on random blocks, for every dtype, in both
    /// the streaming and the panel regime, on every SIMD level this CPU has.
    #[test]
    fn quantized_matmul_matches_dequantized_reference() {
        let mut rng = StdRng::seed_from_u64(7);
        let (n, k) = (70, 96);
        let levels = [SimdLevel::Generic, SimdLevel::Avx2, SimdLevel::Avx512];
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let wv: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let bytes: Vec<u8> = wv.chunks_exact(k).flat_map(|r| quantize_row(dtype, r)).collect();
            let w = HostWeight::from_bytes(dtype, n, k, bytes).expect("weight");
            for m in [1, 3, 5, MATVEC_MAX_ROWS + 1, 17, MATVEC_MAX_ROWS_MULTI + 1] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let want = reference(&x, m, &w);
                for &level in levels.iter().filter(|&&l| l <= crate::cpu::simd::detected()) {
                    let mut got = vec![0f32; m * n];
                    matmul(level, &x, m, &w, &mut got).expect("matmul");
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{dtype:?} m={m} {level:?}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn branchless_f16_conversion_is_exact_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{bits:#06x}: {got} vs {want}");
        }
    }

    #[test]
    fn shape_mismatch_is_an_error_not_a_panic() {
        let w = HostWeight::from_f32(2, 4, &[0.0; 8]).expect("weight");
        let mut out = vec![0f32; 2];
        assert!(matmul(SimdLevel::Generic, &[0.0; 3], 1, &w, &mut out).is_err());
    }
}
