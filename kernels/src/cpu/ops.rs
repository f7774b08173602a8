//! Elementwise and row-wise operations: embedding gather, RMSNorm, RoPE, SiLU gating, and the
//! softmax/argmax helpers samplers use.

use rayon::prelude::*;

use crate::backend::RopeTable;
use crate::cpu::simd::{SimdLevel, multiversion};
use crate::error::{KernelError, Result, ensure_shape};
use crate::quant::dequantize_row;
use crate::weight::HostWeight;

/// Rows below this count are processed on the calling thread (no fork/join overhead).
const PAR_MIN_ROWS: usize = 4;

/// `out[i] = table[ids[i]]`.
pub fn embedding(table: &HostWeight, ids: &[u32], out: &mut [f32]) -> Result<()> {
    let d = table.cols();
    ensure_shape(out.len() == ids.len() * d, "embedding", || format!("{} ids x {d} vs out {}", ids.len(), out.len()))?;
    for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(d.max(1))) {
        if id as usize >= table.rows() {
            return Err(KernelError::Shape {
                op: "embedding",
                detail: format!("token id {id} >= vocabulary {}", table.rows()),
            });
        }
        dequantize_row(table.dtype(), table.row(id as usize), dst);
    }
    Ok(())
}

/// RMSNorm over rows of width `weight.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let d = weight.len();
    ensure_shape(d > 0 && x.len().is_multiple_of(d) && x.len() == out.len(), "rms_norm", || {
        format!("x {} out {} width {d}", x.len(), out.len())
    })?;
    let f = |(xr, or): (&[f32], &mut [f32])| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    };
    if x.len() / d < PAR_MIN_ROWS {
        x.chunks_exact(d).zip(out.chunks_exact_mut(d)).for_each(f);
    } else {
        x.par_chunks_exact(d).zip(out.par_chunks_exact_mut(d)).for_each(f);
    }
    Ok(())
}

/// Rotate-half RoPE in place.
pub fn rope(x: &mut [f32], positions: &[u32], heads: usize, t: &RopeTable) -> Result<()> {
    let hd = t.head_dim;
    let half = hd / 2;
    let width = heads * hd;
    ensure_shape(x.len() == positions.len() * width, "rope", || {
        format!("x {} for {} rows of {heads} x {hd}", x.len(), positions.len())
    })?;
    if let Some(p) = positions.iter().find(|&&p| p as usize >= t.max_positions) {
        return Err(KernelError::Shape {
            op: "rope",
            detail: format!("position {p} >= table size {}", t.max_positions),
        });
    }
    for (row, &p) in x.chunks_exact_mut(width).zip(positions) {
        let cos = &t.cos[p as usize * half..(p as usize + 1) * half];
        let sin = &t.sin[p as usize * half..(p as usize + 1) * half];
        for head in row.chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x1 * cos[i] + x0 * sin[i];
            }
        }
    }
    Ok(())
}

/// `e^x` for the softmax and SiLU kernels, written so that LLVM vectorises a loop of it (no
/// library call): `x = n·ln 2 + r` with `n` rounded to nearest, a degree-6 polynomial in `r`
/// (Cephes' `expf` coefficients), times `2^n` built in the exponent bits. Within 2 ulp of `e^x`
/// on `[-87.3, 88]` (tested against f64); 0 below (where `e^x` is subnormal), `+inf` above, NaN
/// for NaN. Every SIMD level computes the same bits (the same operations, fused multiply-adds
/// everywhere).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.0;
    // 1.5 · 2^23: adding and subtracting it rounds to an integer (nearest, ties to even).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln 2 in two parts, so that n · ln2_hi is exact.
    let r = n.mul_add(-0.693_359_4, xc);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    // n is in -126..=127 here (NaN casts to 0 and stays NaN through y).
    let y = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// Elements per task of the parallel elementwise kernels.
const PAR_CHUNK: usize = 16 * 1024;

#[inline(always)]
fn silu_mul_generic(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

multiversion! {
    fn silu_mul_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) => silu_mul_generic
}

/// `out = silu(gate) * up`, compiled for `level`, in parallel chunks when large.
pub fn silu_mul(level: SimdLevel, gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    ensure_shape(gate.len() == up.len() && up.len() == out.len(), "silu_mul", || {
        format!("gate {} up {} out {}", gate.len(), up.len(), out.len())
    })?;
    if out.len() <= PAR_CHUNK {
        silu_mul_chunk(level, gate, up, out);
        return Ok(());
    }
    out.par_chunks_mut(PAR_CHUNK)
        .zip(gate.par_chunks(PAR_CHUNK).zip(up.par_chunks(PAR_CHUNK)))
        .for_each(|(o, (g, u))| silu_mul_chunk(level, g, u, o));
    Ok(())
}

/// Index of the largest value (the first one on ties); `None` for an empty slice or all-NaN.
pub fn argmax(x: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// Softmax in place (numerically stable). Leaves an empty slice unchanged.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return;
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial `exp` against f64 over its whole range, its limits, and the same bits at
    /// every SIMD level.
    #[test]
    fn exp_is_within_two_ulp_and_the_same_at_every_level() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            // One ulp of the true value.
            let ulp = f64::from(f32::from_bits((want as f32).to_bits() + 1)) - f64::from(want as f32);
            worst = worst.max((got - want).abs() / ulp);
            x += 0.001_37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        let g: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 0.005).collect();
        let u: Vec<f32> = (0..40_000).map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6).collect();
        let mut want = vec![0f32; g.len()];
        silu_mul(SimdLevel::Generic, &g, &u, &mut want).expect("silu");
        for (w, (&gv, &uv)) in want.iter().zip(g.iter().zip(&u)) {
            let exact = f64::from(gv) / (1.0 + (-f64::from(gv)).exp()) * f64::from(uv);
            assert!(
                (f64::from(*w) - exact).abs() <= 1e-6 * exact.abs().max(1e-30),
                "silu({gv}) * {uv}: {w} vs {exact}"
            );
        }
        for level in [SimdLevel::Avx2, SimdLevel::Avx512] {
            if level > crate::cpu::simd::detected() {
                continue;
            }
            let mut got = vec![0f32; g.len()];
            silu_mul(level, &g, &u, &mut got).expect("silu");
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{level:?} differs from generic");
        }
    }

    #[test]
    fn argmax_takes_the_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, 2.0]), Some(1));
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm_elsewhere() {
        let t = RopeTable::new(8, 16, 10000.0, None);
        let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.1 - 0.5).collect();
        let mut x = orig.clone();
        rope(&mut x, &[0], 2, &t).expect("rope");
        assert_eq!(x, orig);
        rope(&mut x, &[5], 2, &t).expect("rope");
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        assert!(rope(&mut x, &[16], 2, &t).is_err());
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0, 2.0, 3.0];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0]);
    }
}
