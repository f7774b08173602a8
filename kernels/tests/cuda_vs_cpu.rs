//! Every CUDA kernel against the CPU reference on fresh random inputs, and the kernel
//! benchmarks. These need an NVIDIA GPU: they are `#[ignore]`d and run by `kernels/gpu-check.sh`
//! (`cargo test -p openlora-kernels --test cuda_vs_cpu -- --ignored`), which fails on any
//! mismatch. On a machine without a GPU they are not run (and the NVRTC compile test is what
//! checks the kernels there).
//!
//! Error metric: max |gpu - cpu| / max |cpu| over the output (normwise relative error).
//! Thresholds: 1e-5 for elementwise work and exact gathers, 2e-4 for f32 reductions (dot
//! products, attention, the gemv path, f32-precision GEMM/LoRA), 2e-2 for bf16 GEMM and LoRA
//! operands (8-bit mantissas, f32 accumulation).

use std::time::Instant;

use openlora_kernels::backend::pick_host;
use openlora_kernels::cuda::{CudaBackend, CudaOptions, Precision, weight_device_bytes};
use openlora_kernels::{
    AttnSeq, Backend, CpuBackend, DType, HostWeight, KvLayout, LoraSegment, PickedRow, RopeTable, RowPick,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;
use common::*;

fn gpu(precision: Precision, no_cublas: bool) -> CudaBackend {
    CudaBackend::new(&CudaOptions { precision, no_cublas, ..Default::default() })
        .unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"))
}

/// Runs `f` on both backends and compares.
fn both<F1, F2>(what: &str, tol: f32, cpu: F1, cuda: F2)
where
    F1: FnOnce() -> Vec<f32>,
    F2: FnOnce() -> Vec<f32>,
{
    let want = cpu();
    let got = cuda();
    check(what, &got, &want, tol);
}

fn matmul_on<B: Backend>(b: &B, w: &HostWeight, x: &[f32], rows: usize) -> Vec<f32> {
    let pw = b.prepare_weight(w.clone()).expect("prepare");
    let xb = b.upload(x).expect("x");
    let mut out = b.zeros(rows * w.rows()).expect("out");
    b.matmul(&xb, rows, &pw, &mut out).expect("matmul");
    b.download(&out).expect("download")
}

#[test]
#[ignore = "needs a CUDA GPU; run by kernels/gpu-check.sh"]
fn elementwise_kernels_match_the_cpu() {
    let g = gpu(Precision::F32, false);
    let c = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(1);
    println!("device: {}", g.name());
    // Embedding gather, every dtype.
    for dt in DTYPES {
        let (rows, cols) = (300, 576);
        let t = weight(dt, rows, cols, &randn(&mut rng, rows * cols, 1.0));
        let ids: Vec<u32> = (0..37).map(|_| rng.gen_range(0..rows as u32)).collect();
        let cpu = || {
            let w = c.prepare_weight(t.clone()).expect("w");
            let mut o = c.zeros(ids.len() * cols).expect("o");
            c.embedding(&w, &ids, &mut o).expect("embedding");
            o
        };
        let cuda = || {
            let w = g.prepare_weight(t.clone()).expect("w");
            let mut o = g.zeros(ids.len() * cols).expect("o");
            g.embedding(&w, &ids, &mut o).expect("embedding");
            g.download(&o).expect("d")
        };
        both(&format!("embedding {}", dt.name()), ELEMENTWISE, cpu, cuda);
    }
    // RMSNorm and the fused residual add.
    let (rows, width) = (19, 576);
    let x = randn(&mut rng, rows * width, 3.0);
    let d = randn(&mut rng, rows * width, 1.0);
    let nw = HostWeight::from_f32(1, width, &randn(&mut rng, width, 1.0)).expect("nw");
    both(
        "rms_norm",
        ELEMENTWISE,
        || {
            let w = c.prepare_weight(nw.clone()).expect("w");
            let mut o = vec![0.0; rows * width];
            c.rms_norm(&x, &w, 1e-5, &mut o).expect("norm");
            o
        },
        || {
            let w = g.prepare_weight(nw.clone()).expect("w");
            let xb = g.upload(&x).expect("x");
            let mut o = g.zeros(rows * width).expect("o");
            g.rms_norm(&xb, &w, 1e-5, &mut o).expect("norm");
            g.download(&o).expect("d")
        },
    );
    let mut x_cpu = x.clone();
    let want = {
        let w = c.prepare_weight(nw.clone()).expect("w");
        let mut o = vec![0.0; rows * width];
        c.add_rms_norm(&mut x_cpu, &d, &w, 1e-5, &mut o).expect("fused");
        o
    };
    let w = g.prepare_weight(nw.clone()).expect("w");
    let mut xb = g.upload(&x).expect("x");
    let db = g.upload(&d).expect("d");
    let mut o = g.zeros(rows * width).expect("o");
    g.add_rms_norm(&mut xb, &db, &w, 1e-5, &mut o).expect("fused");
    check("add_rms_norm (normed)", &g.download(&o).expect("o"), &want, ELEMENTWISE);
    check("add_rms_norm (residual written back)", &g.download(&xb).expect("x"), &x_cpu, ELEMENTWISE);
    // RoPE.
    let (heads, hd) = (9, 64);
    let table = RopeTable::new(hd, 4096, 100000.0, None);
    let positions: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..4096)).collect();
    let q = randn(&mut rng, rows * heads * hd, 2.0);
    let mut qc = q.clone();
    c.rope(&mut qc, &positions, heads, &table).expect("rope");
    let mut qg = g.upload(&q).expect("q");
    g.rope(&mut qg, &positions, heads, &table).expect("rope");
    check("rope", &g.download(&qg).expect("q"), &qc, ELEMENTWISE);
    // SiLU gate, add, bias, gather.
    let n = 1536 * 7;
    let (ga, up) = (randn(&mut rng, n, 6.0), randn(&mut rng, n, 2.0));
    let mut oc = vec![0.0; n];
    c.silu_mul(&ga, &up, &mut oc).expect("silu");
    let mut og = g.zeros(n).expect("o");
    g.silu_mul(&g.upload(&ga).expect("g"), &g.upload(&up).expect("u"), &mut og).expect("silu");
    check("silu_mul", &g.download(&og).expect("o"), &oc, ELEMENTWISE);
    let bias = HostWeight::from_f32(1, 1536, &randn(&mut rng, 1536, 1.0)).expect("b");
    let mut xc = ga.clone();
    c.add_bias(&mut xc, &c.prepare_weight(bias.clone()).expect("b")).expect("bias");
    let mut xg = g.upload(&ga).expect("x");
    g.add_bias(&mut xg, &g.prepare_weight(bias).expect("b")).expect("bias");
    check("add_bias", &g.download(&xg).expect("x"), &xc, ELEMENTWISE);
    let mut ac = ga.clone();
    c.add_assign(&mut ac, &up).expect("add");
    let mut ag = g.upload(&ga).expect("a");
    g.add_assign(&mut ag, &g.upload(&up).expect("u")).expect("add");
    check("add_assign", &g.download(&ag).expect("a"), &ac, ELEMENTWISE);
    let sel = [6u32, 0, 3, 3];
    let mut gc = vec![0.0; sel.len() * 1536];
    c.gather_rows(&ga, 1536, &sel, &mut gc).expect("gather");
    let mut gg = g.zeros(sel.len() * 1536).expect("g");
    g.gather_rows(&g.upload(&ga).expect("x"), 1536, &sel, &mut gg).expect("gather");
    check("gather_rows", &g.download(&gg).expect("g"), &gc, ELEMENTWISE);
    // Refusals are errors, not faults.
    assert!(g.gather_rows(&g.upload(&ga).expect("x"), 1536, &[99], &mut g.zeros(1536).expect("z")).is_err());
}

#[test]
#[ignore = "needs a CUDA GPU; run by kernels/gpu-check.sh"]
fn matmul_paths_match_the_cpu_for_every_dtype() {
    let c = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(2);
    for (precision, no_cublas, gemm_tol) in [
        (Precision::F32, false, REDUCTION),
        (Precision::F32, true, REDUCTION),
        (Precision::Bf16, false, BF16),
        (Precision::Bf16, true, BF16),
    ] {
        let g = gpu(precision, no_cublas);
        for dt in DTYPES {
            let (n, k) = (1000, 576);
            let w = weight(dt, n, k, &randn(&mut rng, n * k, 0.5));
            // One copy on the device: what `openlora cuda plan` counts.
            let pw = g.prepare_weight(w.clone()).expect("prepare");
            assert_eq!(g.weight_bytes(&pw), weight_device_bytes(dt, n, k, precision), "{} bytes", dt.name());
            for rows in [1usize, 3, 8, 9, 64, 200] {
                let x = randn(&mut rng, rows * k, 1.0);
                // Up to 8 rows the gemv kernel reads quantized blocks as stored (f32 math) and
                // f32/f16/bf16 weights from the dense copy in `precision`; above, every dtype
                // goes through the dense copy.
                let exact_gemv = dt.is_quantized() || dt == DType::BF16 || precision == Precision::F32;
                let tol = if rows <= 8 && exact_gemv { REDUCTION } else { gemm_tol };
                both(
                    &format!(
                        "matmul {} rows {rows} ({}, {})",
                        dt.name(),
                        precision.name(),
                        if no_cublas { "built-in" } else { "cuBLAS" }
                    ),
                    tol,
                    || matmul_on(&c, &w, &x, rows),
                    || matmul_on(&g, &w, &x, rows),
                );
            }
        }
    }
}

fn lora_on<B: Backend>(
    b: &B,
    mods: &[(HostWeight, HostWeight, f32)],
    segs: &[(std::ops::Range<usize>, usize)],
    x: &[f32],
    base: &[f32],
    in_dim: usize,
    out_dim: usize,
) -> Vec<f32> {
    let prepared: Vec<(B::Weight, B::Weight, f32)> = mods
        .iter()
        .map(|(a, bt, s)| (b.prepare_weight(a.clone()).expect("a"), b.prepare_weight(bt.clone()).expect("b"), *s))
        .collect();
    let segments: Vec<LoraSegment<'_, B::Weight>> = segs
        .iter()
        .map(|(rows, m)| LoraSegment {
            rows: rows.clone(),
            a: &prepared[*m].0,
            b: &prepared[*m].1,
            scale: prepared[*m].2,
        })
        .collect();
    let xb = b.upload(x).expect("x");
    let mut out = b.upload(base).expect("out");
    b.lora_sgmv(&xb, in_dim, &mut out, out_dim, &segments).expect("lora");
    b.download(&out).expect("d")
}

#[test]
#[ignore = "needs a CUDA GPU; run by kernels/gpu-check.sh"]
fn lora_bgmv_and_sgmv_match_the_cpu_with_mixed_ranks() {
    let c = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(3);
    let (in_dim, out_dim, rows) = (576, 1536, 40);
    let ranks = [1usize, 4, 8, 16, 64];
    let mods: Vec<(HostWeight, HostWeight, f32)> = ranks
        .iter()
        .map(|&r| {
            let a = HostWeight::from_f32(r, in_dim, &randn(&mut rng, r * in_dim, 0.1)).expect("a");
            let b = HostWeight::from_f32(r, out_dim, &randn(&mut rng, r * out_dim, 0.1)).expect("b");
            (a, b, 2.0 / r as f32)
        })
        .collect();
    // Decode rows (one row each, BGMV), a prefill range (SGMV), and overlapping segments (two
    // adapters on one sequence).
    let segs: Vec<(std::ops::Range<usize>, usize)> =
        vec![(0..1, 0), (1..2, 1), (2..3, 3), (3..4, 0), (4..30, 2), (30..40, 1), (30..40, 4), (2..3, 2), (5..9, 0)];
    let x = randn(&mut rng, rows * in_dim, 1.0);
    let base = randn(&mut rng, rows * out_dim, 1.0);
    // Compare the LoRA term itself (out - base), not the sum with a large base.
    let term = |v: Vec<f32>| -> Vec<f32> { v.iter().zip(&base).map(|(a, b)| a - b).collect() };
    let want = term(lora_on(&c, &mods, &segs, &x, &base, in_dim, out_dim));
    for (precision, tol) in [(Precision::F32, REDUCTION), (Precision::Bf16, BF16)] {
        let g = gpu(precision, false);
        let got = term(lora_on(&g, &mods, &segs, &x, &base, in_dim, out_dim));
        check(&format!("lora_sgmv ranks 1/4/8/16/64, overlapping ({})", precision.name()), &got, &want, tol);
    }
}

/// Keys and values of every cached token and the slots they go to.
struct Cached<'a> {
    k: &'a [f32],
    v: &'a [f32],
    slots: &'a [u32],
}

fn attention_on<B: Backend>(
    b: &B,
    layout: KvLayout,
    kv: &Cached<'_>,
    q: &[f32],
    seqs: &[AttnSeq<'_>],
    heads: usize,
) -> Vec<f32> {
    let mut cache = b.alloc_kv_cache(layout).expect("kv");
    b.write_kv(&mut cache, &b.upload(kv.k).expect("k"), &b.upload(kv.v).expect("v"), kv.slots).expect("write");
    let qb = b.upload(q).expect("q");
    let mut out = b.zeros(q.len()).expect("out");
    b.paged_attention(&qb, &cache, seqs, heads, &mut out).expect("attention");
    b.download(&out).expect("d")
}

#[test]
#[ignore = "needs a CUDA GPU; run by kernels/gpu-check.sh"]
fn paged_attention_decode_and_prefill_match_the_cpu() {
    let c = CpuBackend::new();
    let g = gpu(Precision::F32, false);
    let g16 = CudaBackend::new(&CudaOptions { kv_precision: Precision::Bf16, ..Default::default() }).expect("gpu");
    assert_eq!(g16.kv_value_bytes(), 2);
    let mut rng = StdRng::seed_from_u64(4);
    for (heads, kv_heads, hd) in [(9usize, 3usize, 64usize), (8, 8, 128), (32, 4, 128), (4, 1, 32)] {
        let layout = KvLayout { num_blocks: 200, block_size: 16, kv_heads, head_dim: hd };
        let w = kv_heads * hd;
        // Sequences: (context length, new query rows). Decode rows with long contexts (several
        // splits), prefill chunks with and without earlier context.
        let shapes = [(700usize, 1usize), (1, 1), (100, 40), (33, 33), (257, 1), (520, 17)];
        let mut free: Vec<u32> = (0..layout.num_blocks as u32).collect();
        // Shuffle blocks so tables are not contiguous.
        for i in (1..free.len()).rev() {
            free.swap(i, rng.gen_range(0..=i));
        }
        let mut tables = Vec::new();
        for &(ctx, _) in &shapes {
            let nb = ctx.div_ceil(layout.block_size);
            tables.push(free.drain(..nb).collect::<Vec<u32>>());
        }
        // Every cached token's K/V written once.
        let mut slots = Vec::new();
        for (t, &(ctx, _)) in tables.iter().zip(&shapes) {
            for p in 0..ctx {
                slots.push(t[p / layout.block_size] * layout.block_size as u32 + (p % layout.block_size) as u32);
            }
        }
        let k_all = randn(&mut rng, slots.len() * w, 1.0);
        let v_all = randn(&mut rng, slots.len() * w, 1.0);
        let mut seqs = Vec::new();
        let mut q_start = 0;
        for (t, &(ctx, ql)) in tables.iter().zip(&shapes) {
            seqs.push(AttnSeq { q_start, q_len: ql, ctx_len: ctx, block_table: t });
            q_start += ql;
        }
        let rows = q_start + 2; // two rows no sequence covers: zeros
        let q = randn(&mut rng, rows * heads * hd, 1.0);
        both(
            &format!("paged_attention heads {heads}/{kv_heads} head_dim {hd} (decode + prefill)"),
            REDUCTION,
            || attention_on(&c, layout, &Cached { k: &k_all, v: &v_all, slots: &slots }, &q, &seqs, heads),
            || attention_on(&g, layout, &Cached { k: &k_all, v: &v_all, slots: &slots }, &q, &seqs, heads),
        );
        // bf16 pools: as tight as f32 against keys and values rounded to bf16 first.
        let round = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect::<Vec<f32>>();
        let (kr, vr) = (round(&k_all), round(&v_all));
        both(
            &format!("paged_attention heads {heads}/{kv_heads} head_dim {hd}, bf16 KV pools"),
            REDUCTION,
            || attention_on(&c, layout, &Cached { k: &kr, v: &vr, slots: &slots }, &q, &seqs, heads),
            || attention_on(&g16, layout, &Cached { k: &k_all, v: &v_all, slots: &slots }, &q, &seqs, heads),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run by kernels/gpu-check.sh"]
fn argmax_and_top_k_match_the_cpu() {
    let g = gpu(Precision::F32, false);
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, width) = (7, 49152);
    let mut logits = randn(&mut rng, rows * width, 10.0);
    logits[3 * width + 5] = f32::NAN;
    logits[4 * width + 100] = 50.0;
    logits[4 * width + 7] = 50.0; // tie: the lower index wins
    logits[5 * width + 9] = f32::INFINITY;
    let lg = g.upload(&logits).expect("l");
    // Every mix the engine asks for: whole rows, argmax rows, top-k rows of several k.
    for picks in [
        vec![RowPick::Argmax; rows],
        vec![RowPick::TopK(64); rows],
        vec![
            RowPick::Full,
            RowPick::Argmax,
            RowPick::TopK(5),
            RowPick::TopK(40),
            RowPick::Argmax,
            RowPick::Full,
            RowPick::TopK(1),
        ],
    ] {
        let got = g.pick_rows(&lg, width, &picks).expect("gpu");
        assert_eq!(got, pick_host(&logits, width, &picks).expect("cpu"), "{picks:?}");
    }
    assert_eq!(g.pick_rows(&lg, width, &[RowPick::Argmax; 7]).expect("gpu")[4], PickedRow::Argmax(7));
    assert_eq!(g.pick_rows(&lg, width, &[RowPick::Argmax; 7]).expect("gpu")[3], PickedRow::NonFinite);
    println!("pick_rows (argmax, top-k 1/5/40/64, whole rows, non-finite rows): identical to the CPU");
}

/// Kernel bandwidth: achieved GB/s of the BGMV/SGMV LoRA kernels and of paged-attention decode
/// against a device-to-device copy measured in the same run. Prints a table; asserts nothing
/// about speed.
#[test]
#[ignore = "needs a CUDA GPU; run by kernels/gpu-check.sh"]
fn kernel_bandwidth_report() {
    let g = gpu(Precision::Bf16, false);
    let mut rng = StdRng::seed_from_u64(6);
    let time = |iters: usize, f: &mut dyn FnMut()| -> f64 {
        f();
        g.synchronize().expect("sync");
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        g.synchronize().expect("sync");
        t.elapsed().as_secs_f64() / iters as f64
    };
    // Copy bandwidth: add_assign reads 2 and writes 1 buffer of 64M floats.
    let n = 64 << 20;
    let mut a = g.zeros(n).expect("a");
    let b = g.zeros(n).expect("b");
    let s = time(20, &mut || g.add_assign(&mut a, &b).expect("add"));
    let copy_gbs = (3 * n * 4) as f64 / s / 1e9;
    println!("| kernel | shape | time (us) | GB/s | % of stream bandwidth |");
    println!("|---|---|---:|---:|---:|");
    println!("| stream (a += b) | 64M f32 | {:.1} | {copy_gbs:.0} | 100 |", s * 1e6);
    // BGMV: 32 decode rows over 32 different rank-16 adapters, 4096 -> 4096 (bf16 weights).
    let (in_dim, out_dim, r) = (4096usize, 4096usize, 16usize);
    for (rows, per_seg, label) in
        [(32usize, 1usize, "BGMV 32 rows x 32 adapters"), (512, 64, "SGMV 512 rows x 8 adapters")]
    {
        let adapters = rows / per_seg;
        let mods: Vec<_> = (0..adapters)
            .map(|_| {
                let a = g
                    .prepare_weight(HostWeight::from_f32(r, in_dim, &randn(&mut rng, r * in_dim, 0.1)).expect("a"))
                    .expect("a");
                let b = g
                    .prepare_weight(HostWeight::from_f32(r, out_dim, &randn(&mut rng, r * out_dim, 0.1)).expect("b"))
                    .expect("b");
                (a, b)
            })
            .collect();
        let segs: Vec<LoraSegment<'_, _>> = mods
            .iter()
            .enumerate()
            .map(|(i, (a, b))| LoraSegment { rows: i * per_seg..(i + 1) * per_seg, a, b, scale: 1.0 })
            .collect();
        let x = g.upload(&randn(&mut rng, rows * in_dim, 1.0)).expect("x");
        let mut out = g.zeros(rows * out_dim).expect("out");
        let s = time(50, &mut || g.lora_sgmv(&x, in_dim, &mut out, out_dim, &segs).expect("lora"));
        // Bytes that must move: every adapter's A and B once (bf16), x read, out read+written.
        let bytes = adapters * r * (in_dim + out_dim) * 2 + rows * in_dim * 4 + 2 * rows * out_dim * 4;
        let gbs = bytes as f64 / s / 1e9;
        println!(
            "| {label} | rank {r}, {in_dim}->{out_dim} | {:.1} | {gbs:.0} | {:.0} |",
            s * 1e6,
            100.0 * gbs / copy_gbs
        );
    }
    // Paged-attention decode: 64 sequences x 2048 tokens, 32 heads / 8 KV heads, head_dim 128.
    let (seqs_n, ctx, heads, kv_heads, hd) = (64usize, 2048usize, 32usize, 8usize, 128usize);
    let layout = KvLayout { num_blocks: seqs_n * ctx / 16, block_size: 16, kv_heads, head_dim: hd };
    let cache = g.alloc_kv_cache(layout).expect("kv");
    let tables: Vec<Vec<u32>> =
        (0..seqs_n).map(|s| ((s * ctx / 16) as u32..((s + 1) * ctx / 16) as u32).collect()).collect();
    let seqs: Vec<AttnSeq<'_>> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| AttnSeq { q_start: i, q_len: 1, ctx_len: ctx, block_table: t })
        .collect();
    let q = g.upload(&randn(&mut rng, seqs_n * heads * hd, 1.0)).expect("q");
    let mut out = g.zeros(seqs_n * heads * hd).expect("out");
    let s = time(50, &mut || g.paged_attention(&q, &cache, &seqs, heads, &mut out).expect("attention"));
    let bytes = seqs_n * ctx * kv_heads * hd * 4 * 2;
    let gbs = bytes as f64 / s / 1e9;
    println!(
        "| paged attention decode | 64 seqs x 2048 tokens, 32/8 heads, d 128, f32 KV | {:.1} | {gbs:.0} | {:.0} |",
        s * 1e6,
        100.0 * gbs / copy_gbs
    );
}
