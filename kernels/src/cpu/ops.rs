//! Elementwise and row-wise operations: embedding gather, RMSNorm, RoPE, SiLU gating, and the
//! softmax/argmax helpers samplers use.

use rayon::prelude::*;

use crate::backend::RopeTable;
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

/// `out = silu(gate) * up`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    ensure_shape(gate.len() == up.len() && up.len() == out.len(), "silu_mul", || {
        format!("gate {} up {} out {}", gate.len(), up.len(), out.len())
    })?;
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
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
