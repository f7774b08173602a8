//! Block-quantized weights times 8-bit activations: the fast CPU matmul (`cpu_activations =
//! "int8"`).
//!
//! With many activation rows a matmul is bound by arithmetic, not memory: every weight value is
//! multiplied by every row. Integer dot products do four times the work of f32 FMAs per
//! instruction, so here each activation row is quantized per 32-value block to 8 bits, as
//! llama.cpp does for its Q8 activations (`x ≈ dx · q`, `dx = max|x| / 127`, round to nearest
//! even), and each (weight block, activation block) product is an exact integer sum scaled once
//! in f32:
//!
//! - Q8_0 (`w = dw · qw`): `dw · dx · Σ qw q`
//! - Q4_0 (`w = dw · (u − 8)`): `dw · dx · (Σ u q − 8 Σ q)`
//! - Q4_1 (`w = dw · u + mw`): `dw · dx · Σ u q + mw · (dx Σ q)`
//!
//! **Layout.** At load time a weight is repacked in groups of [`GROUP`] = 16 rows: for each
//! block, 64-byte lines in which bytes `4j..4j+4` hold four consecutive values of row `j`. One
//! 512-bit `vpdpbusd` then multiplies four values of 16 weight rows by the same four activation
//! values (broadcast) and adds them into 16 i32 lanes, one per output; no horizontal sums, and
//! each lane's float work is one convert and one FMA per block. Q4 values stay 4-bit (two
//! values of a lane per byte: the low nibbles are one group of four, the high ones the next);
//! Q8_0 values are stored `+ 128` (the instruction takes unsigned weights) and the `128 Σ q`
//! this adds is the accumulator's starting value. The packed copy is the size of the original.
//!
//! **Kernels.** Each 16-row block is unpacked once into registers and used for [`TILE`]
//! activation rows, whose 16-lane accumulators stay in registers. The portable kernel computes
//! the same integer sums and the same f32 operations in the same order per lane, so the AVX-512
//! VNNI kernel's results are bit-identical to it (tested); the portable one is compiled for AVX2
//! (where LLVM vectorises it) and for the baseline target.
//!
//! **Numerics.** The 8-bit activations change the logits; the f32 path stays the reference
//! (`CpuBackend::with_int8(false)`), and the difference on the default model is stated and
//! tested in `tests/all/int8_numerics.rs`. A block holding NaN or an infinity gets a NaN scale,
//! so a non-finite activation stays visible in the output instead of being rounded away.

use rayon::prelude::*;

use crate::cpu::matmul::SendPtr;
use crate::cpu::simd::{SimdLevel, multiversion};
use crate::quant::{DType, QK};
use crate::weight::HostWeight;

/// Weight rows per packed group: one i32 lane each of a 512-bit register.
pub const GROUP: usize = 16;
/// Activation rows one pass over a packed block serves.
pub const TILE: usize = 8;
/// Aim for at least this many multiply-adds per parallel task.
const TASK_MACS: usize = 1 << 17;

/// One 64-byte line of packed values (aligned, so the kernels' loads never split a line).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// The three block formats the kernels take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl Kind {
    fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::Q8_0 => Some(Kind::Q8_0),
            DType::Q4_0 => Some(Kind::Q4_0),
            DType::Q4_1 => Some(Kind::Q4_1),
            _ => None,
        }
    }

    /// 64-byte lines per packed block of 16 rows.
    fn lines(self) -> usize {
        if self == Kind::Q8_0 { 8 } else { 4 }
    }

    /// Multiplier of `Σ q` in a block's integer sum (see the module docs).
    fn correction(self) -> i32 {
        match self {
            Kind::Q8_0 => -128,
            Kind::Q4_0 => -8,
            Kind::Q4_1 => 0,
        }
    }
}

/// A Q8_0/Q4_0/Q4_1 weight `[n, k]` repacked for [`matmul`].
pub struct PackedWeight {
    kind: Kind,
    n: usize,
    k: usize,
    nb: usize,
    groups: usize,
    /// `groups × nb × kind.lines()` lines.
    vals: Vec<Line>,
    /// `groups × nb × 16` f16 block scales (0 for padding rows).
    scales: Vec<u16>,
    /// Like `scales`, the Q4_1 block mins (empty otherwise).
    mins: Vec<u16>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight({:?}, {}x{})", self.kind, self.n, self.k)
    }
}

impl PackedWeight {
    /// Repacks `w`, or `None` for a format or shape the int8 kernels do not take (plain
    /// floats, one row).
    pub fn new(w: &HostWeight) -> Option<Self> {
        let kind = Kind::of(w.dtype())?;
        let (n, k) = (w.rows(), w.cols());
        if n < 2 || k == 0 || !k.is_multiple_of(QK) {
            return None;
        }
        let nb = k / QK;
        let groups = n.div_ceil(GROUP);
        let lines = kind.lines();
        let mut p = PackedWeight {
            kind,
            n,
            k,
            nb,
            groups,
            vals: vec![Line([0; 64]); groups * nb * lines],
            scales: vec![0; groups * nb * GROUP],
            mins: if kind == Kind::Q4_1 { vec![0; groups * nb * GROUP] } else { Vec::new() },
        };
        let bb = w.dtype().block_bytes();
        for r in 0..n {
            let (g, j) = (r / GROUP, r % GROUP);
            let row = w.row(r);
            for b in 0..nb {
                let blk = &row[b * bb..(b + 1) * bb];
                let at = (g * nb + b) * GROUP + j;
                p.scales[at] = u16::from_le_bytes([blk[0], blk[1]]);
                let base = (g * nb + b) * lines;
                match kind {
                    Kind::Q8_0 => {
                        for (v, &q) in blk[2..].iter().enumerate() {
                            p.vals[base + v / 4].0[4 * j + v % 4] = q ^ 0x80;
                        }
                    }
                    Kind::Q4_0 | Kind::Q4_1 => {
                        let qs = &blk[bb - QK / 2..];
                        if kind == Kind::Q4_1 {
                            p.mins[at] = u16::from_le_bytes([blk[2], blk[3]]);
                        }
                        // Value v of the block: low nibble of byte v (v < 16) or high nibble of
                        // byte v - 16. Line c holds values 8c..8c+4 low, 8c+4..8c+8 high.
                        let val = |v: usize| if v < 16 { qs[v] & 15 } else { qs[v - 16] >> 4 };
                        for c in 0..4 {
                            for e in 0..4 {
                                p.vals[base + c].0[4 * j + e] = val(8 * c + e) | (val(8 * c + 4 + e) << 4);
                            }
                        }
                    }
                }
            }
        }
        // Padding rows of the last group: scale 0, so they add nothing; Q8_0's zero is 128.
        if kind == Kind::Q8_0 {
            for r in n..groups * GROUP {
                let (g, j) = (r / GROUP, r % GROUP);
                for b in 0..nb {
                    for l in 0..8 {
                        p.vals[(g * nb + b) * 8 + l].0[4 * j..4 * j + 4].fill(0x80);
                    }
                }
            }
        }
        Some(p)
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.vals.len() * 64 + (self.scales.len() + self.mins.len()) * 2
    }
}

/// `m` activation rows quantized per block for one weight format.
struct QuantActs {
    k: usize,
    q: Vec<i8>,
    /// `m × nb`: each block's scale (NaN for a block with a non-finite value).
    dx: Vec<f32>,
    /// `m × nb`: the accumulator's starting value, `kind.correction() · Σ q`.
    corr: Vec<i32>,
    /// `m × nb`: `dx · Σ q`, the factor of Q4_1's min terms (empty for other formats).
    dxs: Vec<f32>,
}

/// Quantizes one block of 32 values; returns `(dx, Σ q)`.
#[inline(always)]
fn quantize_block_generic(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let mut amax = 0f32;
    let mut finite = true;
    for v in x {
        amax = amax.max(v.abs());
        finite &= v.abs() < f32::INFINITY;
    }
    if !finite {
        q.fill(0);
        return (f32::NAN, 0);
    }
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (o, v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even().clamp(-128.0, 127.0) as i32;
        *o = r as i8;
        sum += r;
    }
    (d, sum)
}

#[inline(always)]
fn quantize_rows_generic(x: &[f32], q: &mut [i8], dx: &mut [f32], sq: &mut [i32]) {
    for (((xb, qb), d), s) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(dx.iter_mut()).zip(sq.iter_mut()) {
        (*d, *s) = quantize_block_generic(xb, qb);
    }
}

multiversion! {
    fn quantize_rows_portable(x: &[f32], q: &mut [i8], dx: &mut [f32], sq: &mut [i32]) => quantize_rows_generic
}

/// [`quantize_rows_generic`] with AVX-512 (same results: `vcvtps2dq` rounds to nearest even).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL; the slices as for the generic version.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_rows_avx512(x: &[f32], q: &mut [i8], dx: &mut [f32], sq: &mut [i32]) {
    use std::arch::x86_64::*;
    let nb = dx.len().min(sq.len()).min(x.len() / QK).min(q.len() / QK);
    let inf = _mm512_set1_ps(f32::INFINITY);
    for b in 0..nb {
        // SAFETY: block b lies inside x (nb * 32 values) and q.
        unsafe {
            let xp = x.as_ptr().add(b * QK);
            let (v0, v1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
            let (a0, a1) = (_mm512_abs_ps(v0), _mm512_abs_ps(v1));
            let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a0, inf) & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a1, inf);
            let qp = q.as_mut_ptr().add(b * QK);
            if finite != 0xFFFF {
                std::ptr::write_bytes(qp, 0, QK);
                dx[b] = f32::NAN;
                sq[b] = 0;
                continue;
            }
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
            let i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
            _mm_storeu_si128(qp.cast(), _mm512_cvtsepi32_epi8(i0));
            _mm_storeu_si128(qp.add(16).cast(), _mm512_cvtsepi32_epi8(i1));
            dx[b] = d;
            sq[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        }
    }
}

impl QuantActs {
    fn new(level: SimdLevel, x: &[f32], m: usize, k: usize, kind: Kind) -> Self {
        let nb = k / QK;
        let mut q = vec![0i8; m * k];
        let mut dx = vec![0f32; m * nb];
        let mut sq = vec![0i32; m * nb];
        #[cfg(target_arch = "x86_64")]
        if level == SimdLevel::Avx512 {
            // SAFETY: `level` was detected on this CPU; the buffers hold m * k values and m * nb
            // block entries.
            unsafe { quantize_rows_avx512(x, &mut q, &mut dx, &mut sq) };
        } else {
            quantize_rows_portable(level, x, &mut q, &mut dx, &mut sq);
        }
        #[cfg(not(target_arch = "x86_64"))]
        quantize_rows_portable(level, x, &mut q, &mut dx, &mut sq);
        let c = kind.correction();
        let dxs =
            if kind == Kind::Q4_1 { dx.iter().zip(&sq).map(|(d, &s)| d * s as f32).collect() } else { Vec::new() };
        let corr = sq.iter().map(|s| c * s).collect();
        QuantActs { k, q, dx, corr, dxs }
    }
}

/// Whether the CPU has AVX-512 VNNI beside F/BW/VL (`OPENLORA_SIMD` below avx512 turns it off).
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static VNNI: OnceLock<bool> = OnceLock::new();
        *VNNI
            .get_or_init(|| crate::cpu::simd::detected() == SimdLevel::Avx512 && is_x86_feature_detected!("avx512vnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[m, n] = x[m, k] · wᵀ` through 8-bit activations.
///
/// # Panics
/// When `x` is not `m × k` or `out` not `m × n` (the caller checks shapes first).
pub fn matmul(level: SimdLevel, x: &[f32], m: usize, w: &PackedWeight, out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert!(x.len() == m * k && out.len() == m * n, "int8 matmul shapes");
    if m == 0 {
        return;
    }
    let a = QuantActs::new(level, x, m, k, w.kind);
    let vnni = level == SimdLevel::Avx512 && has_vnni();
    let per_task = TASK_MACS.div_ceil(GROUP * m * k).max(w.groups.div_ceil(rayon::current_num_threads() * 8)).max(1);
    let dst = SendPtr(out.as_mut_ptr());
    (0..w.groups.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let mut scratch = Vec::new();
        for g in t * per_task..((t + 1) * per_task).min(w.groups) {
            let mut i = 0;
            while i < m {
                let rows = if m - i >= TILE { TILE } else { (m - i).min(4) };
                let rows = if rows == 3 { 2 } else { rows };
                #[cfg(target_arch = "x86_64")]
                if vnni {
                    // SAFETY: VNNI and AVX-512 F/BW/VL were detected; group g and activation
                    // rows i..i + rows exist; this task alone writes columns of group g.
                    unsafe {
                        match rows {
                            TILE => group_vnni::<TILE>(w, g, &a, i, dst.ptr()),
                            4 => group_vnni::<4>(w, g, &a, i, dst.ptr()),
                            2 => group_vnni::<2>(w, g, &a, i, dst.ptr()),
                            _ => group_vnni::<1>(w, g, &a, i, dst.ptr()),
                        }
                    }
                    i += rows;
                    continue;
                }
                // SAFETY: as above, without the instruction-set requirement.
                unsafe { group_portable(level, w, g, &a, i, rows, dst.ptr(), &mut scratch) };
                i += rows;
            }
        }
    });
}

/// Converts `n` f16 bit patterns.
#[inline(always)]
fn f16s(bits: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(bits) {
        *o = half::f16::from_bits(b).to_f32();
    }
}

/// One packed group against activation rows `i0..i0 + rows`, in plain Rust (lanes as arrays so
/// LLVM vectorises across the 16 weight rows).
#[inline(always)]
fn group_portable_generic(w: &PackedWeight, g: usize, a: &QuantActs, i0: usize, rows: usize, out: &mut [f32]) {
    let (nb, k, lines) = (w.nb, a.k, w.kind.lines());
    let mut vals = [[0u8; 64]; 8];
    let mut dw = [0f32; GROUP];
    let mut mw = [0f32; GROUP];
    let mut acc = [[0f32; GROUP]; TILE];
    for b in 0..nb {
        let base = (g * nb + b) * lines;
        for (t, v) in vals.iter_mut().enumerate() {
            *v = match w.kind {
                Kind::Q8_0 => w.vals[base + t].0,
                _ => w.vals[base + t / 2].0.map(|v| if t % 2 == 0 { v & 15 } else { v >> 4 }),
            };
        }
        let s = (g * nb + b) * GROUP;
        f16s(&w.scales[s..s + GROUP], &mut dw);
        if w.kind == Kind::Q4_1 {
            f16s(&w.mins[s..s + GROUP], &mut mw);
        }
        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
            let row = i0 + r;
            let xq = &a.q[row * k + b * QK..row * k + (b + 1) * QK];
            let mut dp = [a.corr[row * nb + b]; GROUP];
            for (t, v) in vals.iter().enumerate() {
                for (j, d) in dp.iter_mut().enumerate() {
                    for e in 0..4 {
                        *d += i32::from(v[4 * j + e]) * i32::from(xq[4 * t + e]);
                    }
                }
            }
            let dx = a.dx[row * nb + b];
            for j in 0..GROUP {
                acc[j] = (dp[j] as f32).mul_add(dw[j] * dx, acc[j]);
            }
            if w.kind == Kind::Q4_1 {
                let dxs = a.dxs[row * nb + b];
                for j in 0..GROUP {
                    acc[j] = mw[j].mul_add(dxs, acc[j]);
                }
            }
        }
    }
    let cols = GROUP.min(w.n - g * GROUP);
    for (r, acc) in acc.iter().enumerate().take(rows) {
        out[r * GROUP..r * GROUP + cols].copy_from_slice(&acc[..cols]);
    }
}

multiversion! {
    fn group_portable_mv(w: &PackedWeight, g: usize, a: &QuantActs, i0: usize, rows: usize, out: &mut [f32]) => group_portable_generic
}

/// Runs the portable kernel into `scratch` and copies the group's columns into `out`.
///
/// # Safety
/// `out` points at the `m × n` output; rows `i0..i0 + rows` exist; no other task writes group
/// `g`'s columns.
#[allow(clippy::too_many_arguments)]
unsafe fn group_portable(
    level: SimdLevel,
    w: &PackedWeight,
    g: usize,
    a: &QuantActs,
    i0: usize,
    rows: usize,
    out: *mut f32,
    scratch: &mut Vec<f32>,
) {
    scratch.resize(TILE * GROUP, 0.0);
    group_portable_mv(level, w, g, a, i0, rows, scratch);
    let cols = GROUP.min(w.n - g * GROUP);
    for r in 0..rows {
        // SAFETY: row i0 + r of the output has n values; columns g*16..g*16+cols lie inside.
        unsafe {
            std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * GROUP), out.add((i0 + r) * w.n + g * GROUP), cols);
        }
    }
}

/// The AVX-512 VNNI kernel: group `g` against activation rows `i0..i0 + R`.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI and F16C. `out` points at the `m × n` output; rows
/// `i0..i0 + R` exist; no other task writes group `g`'s columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn group_vnni<const R: usize>(w: &PackedWeight, g: usize, a: &QuantActs, i0: usize, out: *mut f32) {
    match w.kind {
        // SAFETY: forwarded.
        Kind::Q8_0 => unsafe { group_vnni_kind::<R, 0>(w, g, a, i0, out) },
        // SAFETY: forwarded.
        Kind::Q4_0 => unsafe { group_vnni_kind::<R, 1>(w, g, a, i0, out) },
        // SAFETY: forwarded.
        Kind::Q4_1 => unsafe { group_vnni_kind::<R, 2>(w, g, a, i0, out) },
    }
}

/// [`group_vnni`] for one format (`K`: 0 Q8_0, 1 Q4_0, 2 Q4_1), so the format's branches are
/// resolved at compile time.
///
/// # Safety
/// As [`group_vnni`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn group_vnni_kind<const R: usize, const K: u8>(
    w: &PackedWeight,
    g: usize,
    a: &QuantActs,
    i0: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let (nb, k) = (w.nb, a.k);
    let lines = if K == 0 { 8 } else { 4 };
    let nib = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    // SAFETY (whole body): group g's lines and scales lie inside the packed buffers
    // (groups × nb blocks); activation rows i0..i0 + R have k values and nb block entries.
    unsafe {
        let vp = w.vals.as_ptr();
        for b in 0..nb {
            let lp = vp.add((g * nb + b) * lines).cast::<__m512i>();
            let mut wv = [_mm512_setzero_si512(); 8];
            if K == 0 {
                for (t, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_load_si512(lp.add(t));
                }
            } else {
                for c in 0..4 {
                    let v = _mm512_load_si512(lp.add(c));
                    wv[2 * c] = _mm512_and_si512(v, nib);
                    wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                }
            }
            let s = (g * nb + b) * GROUP;
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w.scales.as_ptr().add(s).cast()));
            let mw = if K == 2 {
                _mm512_cvtph_ps(_mm256_loadu_si256(w.mins.as_ptr().add(s).cast()))
            } else {
                _mm512_setzero_ps()
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let row = i0 + r;
                let xq = a.q.as_ptr().add(row * k + b * QK).cast::<i32>();
                let mut dp = _mm512_set1_epi32(*a.corr.get_unchecked(row * nb + b));
                for (t, v) in wv.iter().enumerate() {
                    dp = _mm512_dpbusd_epi32(dp, *v, _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(t))));
                }
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*a.dx.get_unchecked(row * nb + b)));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), scale, *acc);
                if K == 2 {
                    *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(*a.dxs.get_unchecked(row * nb + b)), *acc);
                }
            }
        }
        let cols = GROUP.min(w.n - g * GROUP);
        let mask: __mmask16 = if cols == GROUP { 0xFFFF } else { (1u16 << cols) - 1 };
        for (r, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add((i0 + r) * w.n + g * GROUP), mask, *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_row;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn weight(dtype: DType, n: usize, k: usize, rng: &mut StdRng) -> HostWeight {
        let mut bytes = Vec::new();
        for _ in 0..n {
            let v: Vec<f32> = (0..k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            bytes.extend(quantize_row(dtype, &v));
        }
        HostWeight::from_bytes(dtype, n, k, bytes).expect("weight")
    }

    fn levels() -> Vec<SimdLevel> {
        [SimdLevel::Generic, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|&l| l <= crate::cpu::simd::detected())
            .collect()
    }

    /// Every kernel (VNNI where the CPU has it, the portable one at every SIMD level) gives
    /// bit-identical results, for every format, row counts that exercise every tile size and
    /// a partial last group; and the result is within the 8-bit rounding bound of the exact
    /// product of the dequantized weight with the f32 activations.
    #[test]
    fn kernels_agree_bit_for_bit_and_stay_within_the_rounding_bound() {
        let mut rng = StdRng::seed_from_u64(3);
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            for (n, k) in [(37usize, 96usize), (48, 576), (2, 32)] {
                let w = weight(dtype, n, k, &mut rng);
                let p = PackedWeight::new(&w).expect("packs");
                let wf = w.to_f32();
                for m in [1usize, 2, 3, 5, TILE, TILE + 7, 2 * TILE + 1] {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
                    let mut first: Option<Vec<f32>> = None;
                    for level in levels() {
                        let mut got = vec![f32::NAN; m * n];
                        matmul(level, &x, m, &p, &mut got);
                        match &first {
                            None => first = Some(got),
                            Some(f) => {
                                for (a, b) in got.iter().zip(f) {
                                    assert_eq!(
                                        a.to_bits(),
                                        b.to_bits(),
                                        "{dtype:?} {n}x{k} m {m} {level:?}: {a} vs {b}"
                                    );
                                }
                            }
                        }
                    }
                    let got = first.expect("at least the generic level");
                    for i in 0..m {
                        for r in 0..n {
                            let g = got[i * n + r];
                            let exact: f64 = (0..k).map(|j| f64::from(wf[r * k + j]) * f64::from(x[i * k + j])).sum();
                            // Per value the 8-bit rounding moves x by at most dx / 2.
                            let bound: f64 = (0..k / 32)
                                .map(|b| {
                                    let xb = &x[i * k + b * 32..i * k + (b + 1) * 32];
                                    let dx = f64::from(xb.iter().fold(0f32, |a, v| a.max(v.abs()))) / 127.0;
                                    (0..32).map(|j| f64::from(wf[r * k + b * 32 + j].abs())).sum::<f64>() * dx / 2.0
                                })
                                .sum();
                            assert!(
                                (f64::from(g) - exact).abs() <= bound * 1.001 + 1e-4,
                                "{dtype:?} {n}x{k} m {m}: {g} vs {exact} (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_non_finite_activation_stays_visible_and_other_rows_are_untouched() {
        let mut rng = StdRng::seed_from_u64(4);
        let w = weight(DType::Q4_0, 5, 64, &mut rng);
        let p = PackedWeight::new(&w).expect("packs");
        let mut x = vec![0.5f32; 128];
        x[40] = f32::INFINITY;
        for level in levels() {
            let mut out = vec![0f32; 10];
            matmul(level, &x, 2, &p, &mut out);
            assert!(out[..5].iter().all(|v| v.is_nan()), "{level:?}: {out:?}");
            assert!(out[5..].iter().all(|v| v.is_finite()), "{level:?}: {out:?}");
        }
    }

    #[test]
    fn plain_float_and_single_row_weights_are_not_packed() {
        let w = HostWeight::from_f32(4, 32, &[0.5; 128]).expect("weight");
        assert!(PackedWeight::new(&w).is_none());
        let mut rng = StdRng::seed_from_u64(5);
        assert!(PackedWeight::new(&weight(DType::Q8_0, 1, 64, &mut rng)).is_none());
    }

    #[test]
    fn the_packed_copy_is_no_larger_than_the_file_format_plus_group_padding() {
        let mut rng = StdRng::seed_from_u64(6);
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let w = weight(dtype, 64, 576, &mut rng);
            let p = PackedWeight::new(&w).expect("packs");
            assert_eq!(p.bytes(), w.bytes().len(), "{dtype:?}");
        }
    }
}
