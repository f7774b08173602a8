//! Shared by the CUDA tests (cuda_vs_cpu on a GPU, cuda_emulated everywhere): random inputs,
//! the error metric and its thresholds, weights in every dtype.
//!
//! Error metric: max |got - want| / max |want| over the output (normwise relative error).

#![allow(dead_code)]

use openlora_kernels::quant::quantize_row;
use openlora_kernels::{DType, HostWeight};
use rand::Rng;
use rand::rngs::StdRng;

/// Exact gathers and conversions.
pub const EXACT: f32 = 1e-6;
/// Elementwise work.
pub const ELEMENTWISE: f32 = 1e-5;
/// f32 reductions (dot products, attention, GEMV, f32 GEMM/LoRA).
pub const REDUCTION: f32 = 2e-4;
/// bf16 operands with f32 accumulation (8-bit mantissas).
pub const BF16: f32 = 2e-2;

pub const DTYPES: [DType; 6] = [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1];

pub fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.r#gen::<f32>() * 2.0 - 1.0) * scale).collect()
}

pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    if got.iter().any(|v| v.is_nan()) { f32::INFINITY } else { diff / scale }
}

/// Prints the error and fails above `tol`.
pub fn check(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let e = rel_err(got, want);
    println!("{what:<58} rel err {e:>10.3e} (limit {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e} > {tol}");
}

/// A `[rows, cols]` weight of `dtype` holding `values` (quantized when it is a block format).
pub fn weight(dtype: DType, rows: usize, cols: usize, values: &[f32]) -> HostWeight {
    let bytes: Vec<u8> = match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => values.chunks_exact(cols).flat_map(|r| quantize_row(dtype, r)).collect(),
    };
    HostWeight::from_bytes(dtype, rows, cols, bytes).expect("weight")
}
