//! Hand-written x86 kernels for the decode hot spot: one quantized weight row dotted with one
//! f32 activation row.
//!
//! LLVM vectorises the portable kernels in `matmul.rs` well for the values but not for the
//! per-block f16 scales, which cost as much as the 32 values they scale. These kernels convert
//! scales with F16C and keep two accumulators in flight to hide FMA latency. They are selected
//! at run time (`SimdLevel`) and tested against the portable kernels on random blocks.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Reads the f16 at `p` and widens it.
///
/// # Safety
/// `p` must be valid for 2 bytes; the CPU must have F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_f16(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes and F16C.
    unsafe {
        let bits = std::ptr::read_unaligned(p.cast::<u16>());
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }
}

/// Block layouts the kernels understand.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Q4Kind {
    /// f16 d, 16 nibble bytes; value = d * (q - 8).
    Q4_0,
    /// f16 d, f16 m, 16 nibble bytes; value = d * q + m.
    Q4_1,
}

/// `sum_j w_j x_j` for one Q4_0/Q4_1 row. `xsum[b]` is the sum of block `b` of `x`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL, AVX2, FMA and F16C. `w` must hold `x.len() / 32`
/// whole blocks of `kind`, and `xsum` one value per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_avx512(kind: Q4Kind, w: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let (bb, qoff) = match kind {
        Q4Kind::Q4_0 => (18, 2),
        Q4Kind::Q4_1 => (20, 4),
    };
    let nb = x.len() / 32;
    debug_assert!(w.len() >= nb * bb && xsum.len() >= nb);
    let mask = _mm_set1_epi8(0x0F);
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut off = 0f32;
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    let mut b = 0;
    while b < nb {
        // SAFETY: block b lies inside `w` (nb * bb bytes) and `x` (nb * 32 values).
        unsafe {
            let blk = wp.add(b * bb);
            let d = load_f16(blk);
            let o = match kind {
                Q4Kind::Q4_0 => -8.0 * d,
                Q4Kind::Q4_1 => load_f16(blk.add(2)),
            };
            let q = _mm_loadu_si128(blk.add(qoff).cast());
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), mask)));
            let xb = xp.add(b * 32);
            let s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), _mm512_mul_ps(lo, _mm512_loadu_ps(xb)));
            if b & 1 == 0 {
                acc0 = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc0);
            } else {
                acc1 = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc1);
            }
            off += o * *xsum.get_unchecked(b);
        }
        b += 1;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + off
}

/// `sum_j w_j x_j` for one Q8_0 row.
///
/// # Safety
/// As [`dot_q4_avx512`], with `w` holding `x.len() / 32` Q8_0 blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0_avx512(w: &[u8], x: &[f32]) -> f32 {
    let nb = x.len() / 32;
    debug_assert!(w.len() >= nb * 34);
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    for b in 0..nb {
        // SAFETY: block b lies inside `w` and `x`.
        unsafe {
            let blk = wp.add(b * 34);
            let d = _mm512_set1_ps(load_f16(blk));
            let q0 = _mm_loadu_si128(blk.add(2).cast());
            let q1 = _mm_loadu_si128(blk.add(18).cast());
            let f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
            let f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
            let xb = xp.add(b * 32);
            let s = _mm512_fmadd_ps(f1, _mm512_loadu_ps(xb.add(16)), _mm512_mul_ps(f0, _mm512_loadu_ps(xb)));
            if b & 1 == 0 {
                acc0 = _mm512_fmadd_ps(d, s, acc0);
            } else {
                acc1 = _mm512_fmadd_ps(d, s, acc1);
            }
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn hsum256(v: __m256) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` has room for 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}

/// AVX2 version of [`dot_q4_avx512`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; buffers as for [`dot_q4_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_avx2(kind: Q4Kind, w: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let (bb, qoff) = match kind {
        Q4Kind::Q4_0 => (18, 2),
        Q4Kind::Q4_1 => (20, 4),
    };
    let nb = x.len() / 32;
    debug_assert!(w.len() >= nb * bb && xsum.len() >= nb);
    let mask = _mm_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut off = 0f32;
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    for b in 0..nb {
        // SAFETY: block b lies inside `w` and `x`.
        unsafe {
            let blk = wp.add(b * bb);
            let d = load_f16(blk);
            let o = match kind {
                Q4Kind::Q4_0 => -8.0 * d,
                Q4Kind::Q4_1 => load_f16(blk.add(2)),
            };
            let q = _mm_loadu_si128(blk.add(qoff).cast());
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            let xb = xp.add(b * 32);
            let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            let mut s = _mm256_mul_ps(f(lo), _mm256_loadu_ps(xb));
            s = _mm256_fmadd_ps(f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xb.add(8)), s);
            s = _mm256_fmadd_ps(f(hi), _mm256_loadu_ps(xb.add(16)), s);
            s = _mm256_fmadd_ps(f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xb.add(24)), s);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
            off += o * *xsum.get_unchecked(b);
        }
    }
    hsum256(acc) + off
}

/// AVX2 version of [`dot_q8_0_avx512`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; buffers as for [`dot_q8_0_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0_avx2(w: &[u8], x: &[f32]) -> f32 {
    let nb = x.len() / 32;
    debug_assert!(w.len() >= nb * 34);
    let mut acc = _mm256_setzero_ps();
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    for b in 0..nb {
        // SAFETY: block b lies inside `w` and `x`.
        unsafe {
            let blk = wp.add(b * 34);
            let d = _mm256_set1_ps(load_f16(blk));
            let xb = xp.add(b * 32);
            let mut s = _mm256_setzero_ps();
            for part in 0..4 {
                let q = _mm_loadl_epi64(blk.add(2 + 8 * part).cast());
                let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                s = _mm256_fmadd_ps(f, _mm256_loadu_ps(xb.add(8 * part)), s);
            }
            acc = _mm256_fmadd_ps(d, s, acc);
        }
    }
    hsum256(acc)
}

/// [`dot_q4_avx512`] for `R` activation rows at once: each weight block is unpacked once and
/// multiplied with all `R` rows, which is what batched decode needs.
///
/// # Safety
/// As [`dot_q4_avx512`], for every row of `xs` (each `k` values) and `xsums` (each `k / 32`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_avx512_rows<const R: usize>(
    kind: Q4Kind,
    w: &[u8],
    xs: [&[f32]; R],
    xsums: [&[f32]; R],
) -> [f32; R] {
    let (bb, qoff) = match kind {
        Q4Kind::Q4_0 => (18, 2),
        Q4Kind::Q4_1 => (20, 4),
    };
    let nb = xs[0].len() / 32;
    debug_assert!(w.len() >= nb * bb);
    let mask = _mm_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut off = [0f32; R];
    let wp = w.as_ptr();
    for b in 0..nb {
        // SAFETY: block b lies inside `w` and inside every row of `xs`/`xsums`.
        unsafe {
            let blk = wp.add(b * bb);
            let d = load_f16(blk);
            let o = match kind {
                Q4Kind::Q4_0 => -8.0 * d,
                Q4Kind::Q4_1 => load_f16(blk.add(2)),
            };
            let q = _mm_loadu_si128(blk.add(qoff).cast());
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), mask)));
            let dv = _mm512_set1_ps(d);
            let lo = _mm512_mul_ps(lo, dv);
            let hi = _mm512_mul_ps(hi, dv);
            for r in 0..R {
                let xb = xs[r].as_ptr().add(b * 32);
                acc[r] =
                    _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc[r]));
                off[r] += o * *xsums[r].get_unchecked(b);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]) + off[r];
    }
    out
}

/// [`dot_q8_0_avx512`] for `R` activation rows at once.
///
/// # Safety
/// As [`dot_q8_0_avx512`], for every row of `xs`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0_avx512_rows<const R: usize>(w: &[u8], xs: [&[f32]; R]) -> [f32; R] {
    let nb = xs[0].len() / 32;
    debug_assert!(w.len() >= nb * 34);
    let mut acc = [_mm512_setzero_ps(); R];
    let wp = w.as_ptr();
    for b in 0..nb {
        // SAFETY: block b lies inside `w` and every row of `xs`.
        unsafe {
            let blk = wp.add(b * 34);
            let d = _mm512_set1_ps(load_f16(blk));
            let f0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2).cast()))));
            let f1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(18).cast()))));
            for r in 0..R {
                let xb = xs[r].as_ptr().add(b * 32);
                acc[r] =
                    _mm512_fmadd_ps(f1, _mm512_loadu_ps(xb.add(16)), _mm512_fmadd_ps(f0, _mm512_loadu_ps(xb), acc[r]));
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
    out
}
