//! GGUF tensor element types and their block formats.
//!
//! Quantized weights stay in their block format in memory; kernels read blocks directly. This
//! module holds the formats' definitions, the scalar (reference) dequantizers the SIMD kernels
//! are tested against, and quantizers used by tests and by tools that write GGUF-style blocks.

use half::{bf16, f16};

/// Values in one quantization block (all formats we support use 32).
pub const QK: usize = 32;

/// The element type of a weight tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    BF16,
    /// 32 values: f16 scale `d`, 32 x i8; value = d * q.
    Q8_0,
    /// 32 values: f16 scale `d`, 16 bytes of nibbles; value = d * (q - 8).
    Q4_0,
    /// 32 values: f16 scale `d`, f16 min `m`, 16 bytes of nibbles; value = d * q + m.
    Q4_1,
}

impl DType {
    /// The GGML type id used in GGUF files.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            30 => DType::BF16,
            _ => return None,
        })
    }

    /// A short lowercase name, as GGUF tools print it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
        }
    }

    /// Values per block (1 for plain floats).
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 2 + QK,
            DType::Q4_0 => 2 + QK / 2,
            DType::Q4_1 => 4 + QK / 2,
        }
    }

    /// Whether this is a block-quantized format.
    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes needed for a row of `cols` values, or `None` when `cols` is not a whole number of
    /// blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let bl = self.block_len();
        if !cols.is_multiple_of(bl) {
            return None;
        }
        (cols / bl).checked_mul(self.block_bytes())
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes one row of `dtype` (its bytes in `src`) into `dst`. `dst.len()` values are read;
/// `src` must hold exactly `dtype.row_bytes(dst.len())` bytes (checked by callers).
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (d, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(DType::Q8_0.block_bytes())) {
                let scale = f16_at(b, 0);
                for (o, &q) in d.iter_mut().zip(&b[2..]) {
                    *o = scale * f32::from(q as i8);
                }
            }
        }
        DType::Q4_0 => {
            for (d, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(DType::Q4_0.block_bytes())) {
                let scale = f16_at(b, 0);
                let qs = &b[2..];
                for j in 0..QK / 2 {
                    d[j] = scale * (f32::from(qs[j] & 0xF) - 8.0);
                    d[j + QK / 2] = scale * (f32::from(qs[j] >> 4) - 8.0);
                }
            }
        }
        DType::Q4_1 => {
            for (d, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(DType::Q4_1.block_bytes())) {
                let scale = f16_at(b, 0);
                let min = f16_at(b, 2);
                let qs = &b[4..];
                for j in 0..QK / 2 {
                    d[j] = scale * f32::from(qs[j] & 0xF) + min;
                    d[j + QK / 2] = scale * f32::from(qs[j] >> 4) + min;
                }
            }
        }
    }
}

/// Quantizes `src` (a whole number of blocks) into `dtype`'s byte format, the way GGML's
/// reference quantizers do. Used by tests and by tools that write quantized tensors.
pub fn quantize_row(dtype: DType, src: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dtype.row_bytes(src.len()).unwrap_or(0));
    quantize_row_into(dtype, src, &mut out);
    out
}

/// [`quantize_row`] appending to `out` (so that many tensors can share one buffer).
pub fn quantize_row_into(dtype: DType, src: &[f32], out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => src.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => src.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => src.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        DType::Q8_0 => {
            for blk in src.chunks_exact(QK) {
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|v| ((v * id).round() as i8) as u8));
            }
        }
        DType::Q4_0 => {
            for blk in src.chunks_exact(QK) {
                // GGML: the value of largest magnitude maps to -8.
                let max = blk.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..QK / 2 {
                    out.push(q(blk[j]) | (q(blk[j + QK / 2]) << 4));
                }
            }
        }
        DType::Q4_1 => {
            for blk in src.chunks_exact(QK) {
                let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
                let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                for j in 0..QK / 2 {
                    out.push(q(blk[j]) | (q(blk[j + QK / 2]) << 4));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_nibble_order_matches_the_ggml_layout() {
        // d = 1, m = 0.5; byte j holds value j (low nibble) and value j+16 (high nibble).
        let mut b = Vec::new();
        b.extend_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b.extend((0..16u8).map(|j| (j % 16) | (((15 - j) % 16) << 4)));
        let mut out = [0f32; 32];
        dequantize_row(DType::Q4_1, &b, &mut out);
        assert_eq!(out[3], 3.5);
        assert_eq!(out[16 + 3], 12.5);
    }

    #[test]
    fn quantize_then_dequantize_is_close() {
        let src: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        for dt in [DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let bytes = quantize_row(dt, &src);
            assert_eq!(Some(bytes.len()), dt.row_bytes(src.len()));
            let mut back = vec![0f32; src.len()];
            dequantize_row(dt, &bytes, &mut back);
            let tol = match dt {
                DType::Q4_0 | DType::Q4_1 => 0.25,
                DType::Q8_0 => 0.02,
                _ => 0.01,
            };
            for (a, b) in src.iter().zip(&back) {
                assert!((a - b).abs() < tol, "{dt:?}: {a} vs {b}");
            }
        }
    }
}
