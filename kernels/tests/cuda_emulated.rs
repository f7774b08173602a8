//! The CUDA kernels executed on the CPU and compared with the CPU backend, on every machine.
//!
//! `kernels/cuda/emu/emu.h` emulates the bit of CUDA C++ the kernels use (threads of a block as
//! OS threads, `__syncthreads` and warp shuffles as barriers, `__shared__` as statics with
//! blocks run one at a time); `emu.cpp` includes the real `kernels/cuda/*.cu` sources. This test
//! builds that into a shared library with the system C++ compiler (`$CXX`, else `c++`), loads
//! it, launches each kernel with the same grid, block and argument layout the CUDA backend uses
//! (the work tables come from the backend's own `plan_lora` / `plan_attention`), and compares
//! with the CPU backend on random inputs. It checks the kernels' logic (indexing, tiling,
//! reductions, shuffles, online softmax, split merging, bounds); it cannot check the GPU
//! compiler, memory ordering or speed: `kernels/gpu-check.sh` does that on a GPU.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use openlora_kernels::backend::{argmax_host, top_k_host};
use openlora_kernels::cuda::{GEMV_MAX_ROWS, LoraSegmentRef, plan_attention, plan_lora};
use openlora_kernels::{AttnSeq, Backend, CpuBackend, DType, HostWeight, KvLayout, LoraSegment, RopeTable};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;
use common::*;

fn lib() -> &'static libloading::Library {
    static LIB: OnceLock<libloading::Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cuda");
        let mut srcs: Vec<PathBuf> =
            ["common.cuh", "elementwise.cu", "matmul.cu", "attention.cu", "lora.cu", "sampling.cu"]
                .iter()
                .map(|f| root.join(f))
                .collect();
        srcs.push(root.join("emu/emu.h"));
        srcs.push(root.join("emu/emu.cpp"));
        let mut text = Vec::new();
        for s in &srcs {
            text.extend(std::fs::read(s).unwrap_or_else(|e| panic!("{}: {e}", s.display())));
        }
        let hash = text.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3));
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("libolemu-{hash:016x}.so"));
        if !out.exists() {
            let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
            let tmp = out.with_extension(format!("tmp{}", std::process::id()));
            let st = std::process::Command::new(&cxx)
                .args(["-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas"])
                .arg(root.join("emu/emu.cpp"))
                .arg("-o")
                .arg(&tmp)
                .status()
                .unwrap_or_else(|e| panic!("running {cxx} (a C++20 compiler is needed for this test): {e}"));
            assert!(st.success(), "{cxx} could not build the emulated kernels");
            std::fs::rename(&tmp, &out).expect("rename");
        }
        // SAFETY: our own library; its initialisers only set up empty globals.
        unsafe { libloading::Library::new(&out) }.expect("load the emulated kernels")
    })
}

/// The emulator has global state (the running block): one launch at a time.
static LAUNCH: Mutex<()> = Mutex::new(());

macro_rules! launch {
    ($name:literal, ($gx:expr, $gy:expr, $gz:expr), $threads:expr; $($ty:ty = $arg:expr),* $(,)?) => {{
        let _g = LAUNCH.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the symbol has exactly this signature (emu.cpp's EMU list) and every pointer
        // is a live buffer of the size the kernel reads.
        unsafe {
            let f: libloading::Symbol<'_, unsafe extern "C" fn(u32, u32, u32, u32 $(, $ty)*)> =
                lib().get(concat!("emu_", $name, "\0").as_bytes()).expect($name);
            f($gx as u32, $gy as u32, $gz as u32, $threads as u32 $(, $arg)*);
        }
    }};
}

fn code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::Q8_0 => 3,
        DType::Q4_0 => 4,
        DType::Q4_1 => 5,
    }
}

fn blocks(n: usize, per: usize) -> usize {
    n.div_ceil(per).max(1)
}

/// f32 -> bf16 bits, round to nearest even (what the dequantize kernel writes).
fn bf16_round(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

#[test]
fn elementwise_kernels_match_the_cpu() {
    let c = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(11);
    // Embedding gather and dequantization, every dtype.
    for dt in DTYPES {
        let (rows, cols) = (40, 96);
        let t = weight(dt, rows, cols, &randn(&mut rng, rows * cols, 1.0));
        let ids: Vec<u32> = (0..7).map(|_| rng.gen_range(0..rows as u32)).collect();
        let mut want = vec![0.0; ids.len() * cols];
        c.embedding(&c.prepare_weight(t.clone()).expect("w"), &ids, &mut want).expect("embedding");
        let mut got = vec![0.0f32; ids.len() * cols];
        launch!("embedding", (ids.len(), 1, 1), 256; *const u8 = t.bytes().as_ptr(), i32 = code(dt), u32 = cols as u32,
            *const u32 = ids.as_ptr(), *mut f32 = got.as_mut_ptr());
        check(&format!("embedding {}", dt.name()), &got, &want, EXACT);
        let full = t.to_f32();
        let mut deq = vec![0.0f32; rows * cols];
        launch!("dequantize", (blocks(rows * cols, 256), 1, 1), 256; *const u8 = t.bytes().as_ptr(), i32 = code(dt),
            u32 = rows as u32, u32 = cols as u32, i32 = 0, *mut f32 = deq.as_mut_ptr());
        check(&format!("dequantize {} -> f32", dt.name()), &deq, &full, EXACT);
        let mut deq16 = vec![0u16; rows * cols];
        launch!("dequantize", (blocks(rows * cols, 256), 1, 1), 256; *const u8 = t.bytes().as_ptr(), i32 = code(dt),
            u32 = rows as u32, u32 = cols as u32, i32 = 1, *mut u16 = deq16.as_mut_ptr());
        let got16: Vec<f32> = deq16.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let want16: Vec<f32> = full.iter().map(|&v| bf16_round(v)).collect();
        check(&format!("dequantize {} -> bf16", dt.name()), &got16, &want16, EXACT);
    }
    // RMSNorm, plain and fused with the residual add.
    let (rows, width) = (5, 576);
    let x = randn(&mut rng, rows * width, 3.0);
    let d = randn(&mut rng, rows * width, 1.0);
    let wv = randn(&mut rng, width, 1.0);
    let nw = c.prepare_weight(HostWeight::from_f32(1, width, &wv).expect("w")).expect("w");
    let mut want = vec![0.0; rows * width];
    c.rms_norm(&x, &nw, 1e-5, &mut want).expect("norm");
    let mut xg = x.clone();
    let mut got = vec![0.0f32; rows * width];
    launch!("rms_norm", (rows, 1, 1), 256; *mut f32 = xg.as_mut_ptr(), *const f32 = std::ptr::null(),
        *const f32 = wv.as_ptr(), u32 = width as u32, f32 = 1e-5, *mut f32 = got.as_mut_ptr());
    check("rms_norm", &got, &want, ELEMENTWISE);
    let mut xc = x.clone();
    c.add_rms_norm(&mut xc, &d, &nw, 1e-5, &mut want).expect("fused");
    launch!("rms_norm", (rows, 1, 1), 256; *mut f32 = xg.as_mut_ptr(), *const f32 = d.as_ptr(),
        *const f32 = wv.as_ptr(), u32 = width as u32, f32 = 1e-5, *mut f32 = got.as_mut_ptr());
    check("add_rms_norm (normed)", &got, &want, ELEMENTWISE);
    check("add_rms_norm (residual)", &xg, &xc, EXACT);
    // RoPE.
    let (heads, hd) = (3, 64);
    let table = RopeTable::new(hd, 512, 100000.0, None);
    let pos: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..512)).collect();
    let q = randn(&mut rng, rows * heads * hd, 2.0);
    let mut qc = q.clone();
    c.rope(&mut qc, &pos, heads, &table).expect("rope");
    let mut qg = q.clone();
    launch!("rope", (rows, 1, 1), 128; *mut f32 = qg.as_mut_ptr(), *const u32 = pos.as_ptr(), u32 = heads as u32,
        u32 = hd as u32, *const f32 = table.cos.as_ptr(), *const f32 = table.sin.as_ptr());
    check("rope", &qg, &qc, ELEMENTWISE);
    // SiLU gate, adds, gather, f32 -> bf16.
    let n = 1000;
    let (g, u) = (randn(&mut rng, n, 6.0), randn(&mut rng, n, 2.0));
    let mut oc = vec![0.0; n];
    c.silu_mul(&g, &u, &mut oc).expect("silu");
    let mut og = vec![0.0f32; n];
    launch!("silu_mul", (blocks(n, 256), 1, 1), 256; *const f32 = g.as_ptr(), *const f32 = u.as_ptr(),
        *mut f32 = og.as_mut_ptr(), u64 = n as u64);
    check("silu_mul", &og, &oc, ELEMENTWISE);
    let mut ac = g.clone();
    c.add_assign(&mut ac, &u).expect("add");
    let mut ag = g.clone();
    launch!("add_assign", (blocks(n, 256), 1, 1), 256; *mut f32 = ag.as_mut_ptr(), *const f32 = u.as_ptr(), u64 = n as u64);
    check("add_assign", &ag, &ac, EXACT);
    let bias = randn(&mut rng, 40, 1.0);
    let mut bc = g.clone();
    c.add_bias(&mut bc, &c.prepare_weight(HostWeight::from_f32(1, 40, &bias).expect("b")).expect("b")).expect("bias");
    let mut bg = g.clone();
    launch!("add_bias", (blocks(n, 256), 1, 1), 256; *mut f32 = bg.as_mut_ptr(), *const f32 = bias.as_ptr(),
        u32 = 40, u64 = n as u64);
    check("add_bias", &bg, &bc, EXACT);
    let sel = [24u32, 0, 3, 3];
    let mut gc = vec![0.0; sel.len() * 40];
    c.gather_rows(&g, 40, &sel, &mut gc).expect("gather");
    let mut gg = vec![0.0f32; sel.len() * 40];
    launch!("gather_rows", (sel.len(), 1, 1), 256; *const f32 = g.as_ptr(), u32 = 40, *const u32 = sel.as_ptr(),
        *mut f32 = gg.as_mut_ptr());
    check("gather_rows", &gg, &gc, EXACT);
    let mut h16 = vec![0u16; n];
    launch!("f32_to_bf16_kernel", (blocks(n, 256), 1, 1), 256; *const f32 = g.as_ptr(), *mut u16 = h16.as_mut_ptr(),
        u64 = n as u64);
    assert!(h16.iter().zip(&g).all(|(&b, &v)| b == half::bf16::from_f32(v).to_bits()), "f32_to_bf16 rounding");
}

#[test]
fn gemv_and_gemm_match_the_cpu_for_every_dtype() {
    let c = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(12);
    let (n, k) = (70, 256);
    for dt in DTYPES {
        let w = weight(dt, n, k, &randn(&mut rng, n * k, 0.5));
        let pw = c.prepare_weight(w.clone()).expect("w");
        for rows in [1usize, 3, GEMV_MAX_ROWS, 9, 70] {
            let x = randn(&mut rng, rows * k, 1.0);
            let mut want = vec![0.0; rows * n];
            c.matmul(&x, rows, &pw, &mut want).expect("matmul");
            let mut got = vec![0.0f32; rows * n];
            if rows <= GEMV_MAX_ROWS {
                launch!("gemv", (blocks(n, 4), 1, 1), 128; *const u8 = w.bytes().as_ptr(), i32 = code(dt), u32 = n as u32,
                    u32 = k as u32, *const f32 = x.as_ptr(), u32 = rows as u32, *mut f32 = got.as_mut_ptr());
                check(&format!("gemv {} rows {rows}", dt.name()), &got, &want, REDUCTION);
            } else {
                // As the backend multiplies: a dense weight (f32/f16/bf16) in one slice; a quantized
                // one dequantized a slice of rows at a time into one scratch buffer, each slice
                // multiplied into its columns of `out` (row stride n). 24 rows: 3 slices, the
                // last one short.
                for chunk in [n, 24] {
                    for bf16 in [false, true] {
                        let mut got = vec![f32::NAN; rows * n];
                        let (mut s32, mut s16) = (vec![0.0f32; chunk * k], vec![0u16; chunk * k]);
                        for n0 in (0..n).step_by(chunk) {
                            let m = chunk.min(n - n0);
                            let src = w.bytes()[n0 * w.row_bytes()..].as_ptr();
                            let out = got[n0..].as_mut_ptr();
                            if bf16 {
                                launch!("dequantize", (blocks(m * k, 256), 1, 1), 256; *const u8 = src, i32 = code(dt),
                                    u32 = m as u32, u32 = k as u32, i32 = 1, *mut u16 = s16.as_mut_ptr());
                                launch!("gemm_nt_bf16", (blocks(m, 64), blocks(rows, 64), 1), 256; *const f32 = x.as_ptr(),
                                    *const u16 = s16.as_ptr(), *mut f32 = out, u32 = rows as u32, u32 = m as u32,
                                    u32 = k as u32, u32 = n as u32);
                            } else {
                                launch!("dequantize", (blocks(m * k, 256), 1, 1), 256; *const u8 = src, i32 = code(dt),
                                    u32 = m as u32, u32 = k as u32, i32 = 0, *mut f32 = s32.as_mut_ptr());
                                launch!("gemm_nt_f32", (blocks(m, 64), blocks(rows, 64), 1), 256; *const f32 = x.as_ptr(),
                                    *const f32 = s32.as_ptr(), *mut f32 = out, u32 = rows as u32, u32 = m as u32,
                                    u32 = k as u32, u32 = n as u32);
                            }
                        }
                        let what = format!(
                            "gemm {} {} rows {rows}, slices of {chunk}",
                            if bf16 { "bf16" } else { "f32" },
                            dt.name()
                        );
                        check(&what, &got, &want, if bf16 { BF16 } else { REDUCTION });
                    }
                }
            }
        }
    }
}

#[test]
fn lora_shrink_expand_match_the_cpu_with_mixed_ranks_and_overlaps() {
    let c = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(13);
    let (in_dim, out_dim, rows) = (96, 300, 12);
    let ranks = [1usize, 4, 8, 16];
    let hosts: Vec<(Vec<f32>, Vec<f32>, f32)> = ranks
        .iter()
        .map(|&r| (randn(&mut rng, r * in_dim, 0.3), randn(&mut rng, r * out_dim, 0.3), 2.0 / r as f32))
        .collect();
    let segs =
        vec![(0..1, 0), (1..2, 1), (2..3, 3), (3..4, 0), (4..9, 2), (9..12, 1), (9..12, 3), (2..3, 2), (5..5, 1)];
    let x = randn(&mut rng, rows * in_dim, 1.0);
    let base = randn(&mut rng, rows * out_dim, 1.0);
    let prepared: Vec<_> = hosts
        .iter()
        .zip(ranks)
        .map(|((a, b, s), r)| {
            (
                c.prepare_weight(HostWeight::from_f32(r, in_dim, a).expect("a")).expect("a"),
                c.prepare_weight(HostWeight::from_f32(r, out_dim, b).expect("b")).expect("b"),
                *s,
            )
        })
        .collect();
    let cpu_segs: Vec<LoraSegment<'_, _>> = segs
        .iter()
        .map(|(rr, m)| LoraSegment { rows: rr.clone(), a: &prepared[*m].0, b: &prepared[*m].1, scale: prepared[*m].2 })
        .collect();
    let mut want = base.clone();
    c.lora_sgmv(&x, in_dim, &mut want, out_dim, &cpu_segs).expect("lora");
    let term = |v: &[f32]| -> Vec<f32> { v.iter().zip(&base).map(|(a, b)| a - b).collect() };
    for bf16 in [false, true] {
        // The dense weights as the backend keeps them, at host addresses for the emulator.
        let dense16: Vec<(Vec<u16>, Vec<u16>)> = hosts
            .iter()
            .map(|(a, b, _)| {
                let f = |v: &Vec<f32>| v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect::<Vec<u16>>();
                (f(a), f(b))
            })
            .collect();
        let refs: Vec<LoraSegmentRef> = segs
            .iter()
            .map(|(rr, m)| {
                let (a, b) = if bf16 {
                    (dense16[*m].0.as_ptr() as u64, dense16[*m].1.as_ptr() as u64)
                } else {
                    (hosts[*m].0.as_ptr() as u64, hosts[*m].1.as_ptr() as u64)
                };
                LoraSegmentRef { rows: rr.clone(), rank: ranks[*m], a, b, scale: hosts[*m].2 }
            })
            .collect();
        let plan = plan_lora(&refs, rows).expect("plan");
        assert_eq!(plan.items, 1 + 1 + 1 + 1 + 5 + 3 + 3 + 1, "one work item per (segment, row); empty ranges skipped");
        // Device buffers are 8-byte aligned; so must the host copy of the table be.
        let blob64: Vec<u64> =
            plan.blob.chunks(2).map(|c| u64::from(c[0]) | (u64::from(*c.get(1).unwrap_or(&0)) << 32)).collect();
        let blob = blob64.as_ptr().cast::<u32>();
        let mut tmp = vec![0.0f32; plan.tmp_len.max(1)];
        let mut got = base.clone();
        // SAFETY (pointer arithmetic): offsets are within the blob.
        let (p_ptr, p_meta, p_scale, p_item) = unsafe {
            (
                blob.cast::<u64>(),
                blob.add(plan.meta_off),
                blob.add(plan.scale_off).cast::<f32>(),
                blob.add(plan.item_off),
            )
        };
        if bf16 {
            launch!("lora_shrink_bf16", (plan.items, 1, 1), 128; *const f32 = x.as_ptr(), u32 = in_dim as u32,
                *const u64 = p_ptr, *const u32 = p_meta, *const u32 = p_item, *mut f32 = tmp.as_mut_ptr());
            launch!("lora_expand_bf16", (plan.items, blocks(out_dim, 256), 1), 256; *const f32 = tmp.as_ptr(),
                *const u64 = p_ptr, *const u32 = p_meta, *const f32 = p_scale, *const u32 = p_item,
                *mut f32 = got.as_mut_ptr(), u32 = out_dim as u32);
        } else {
            launch!("lora_shrink_f32", (plan.items, 1, 1), 128; *const f32 = x.as_ptr(), u32 = in_dim as u32,
                *const u64 = p_ptr, *const u32 = p_meta, *const u32 = p_item, *mut f32 = tmp.as_mut_ptr());
            launch!("lora_expand_f32", (plan.items, blocks(out_dim, 256), 1), 256; *const f32 = tmp.as_ptr(),
                *const u64 = p_ptr, *const u32 = p_meta, *const f32 = p_scale, *const u32 = p_item,
                *mut f32 = got.as_mut_ptr(), u32 = out_dim as u32);
        }
        check(
            &format!("lora shrink+expand, ranks 1/4/8/16, overlapping ({})", if bf16 { "bf16" } else { "f32" }),
            &term(&got),
            &term(&want),
            if bf16 { BF16 } else { REDUCTION },
        );
    }
    // A segment past the batch is refused by the plan.
    assert!(plan_lora(&[LoraSegmentRef { rows: 10..13, rank: 4, a: 0, b: 0, scale: 1.0 }], 12).is_err());
}

#[test]
fn paged_attention_decode_and_prefill_match_the_cpu() {
    let c = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(14);
    for (heads, kv_heads, hd) in [(6usize, 2usize, 64usize), (4, 4, 32), (8, 1, 128)] {
        let layout = KvLayout { num_blocks: 64, block_size: 16, kv_heads, head_dim: hd };
        let w = kv_heads * hd;
        // (context, new rows): decode with several splits (> 256 keys), short decode, prefill
        // chunks with and without earlier context, one with a partial last block.
        let shapes = [(300usize, 1usize), (1, 1), (40, 19), (17, 17), (70, 3)];
        let mut free: Vec<u32> = (0..layout.num_blocks as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.gen_range(0..=i));
        }
        let tables: Vec<Vec<u32>> =
            shapes.iter().map(|&(ctx, _)| free.drain(..ctx.div_ceil(layout.block_size)).collect()).collect();
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
        let rows = q_start + 1; // one row no sequence covers
        let q = randn(&mut rng, rows * heads * hd, 1.0);
        // CPU.
        let mut cache = c.alloc_kv_cache(layout).expect("kv");
        c.write_kv(&mut cache, &k_all, &v_all, &slots).expect("write");
        let mut want = vec![0.0; q.len()];
        c.paged_attention(&q, &cache, &seqs, heads, &mut want).expect("attention");
        // Emulated kernels, launched as the backend launches them, over f32 pools and bf16 ones.
        let cap = layout.num_blocks * layout.block_size * w;
        let plan = plan_attention(q.len(), layout, &seqs, heads).expect("plan");
        assert_eq!(plan.splits, 2, "300 keys in 256-key splits");
        let scale = 1.0 / (hd as f32).sqrt();
        let items = plan.decode_meta.len() / 3;
        let n = items * heads * plan.splits;
        let n_pre = plan.prefill_meta.len() / 4;
        let what = format!("paged attention {heads}/{kv_heads} heads, head_dim {hd}, decode + prefill");
        let mut got = vec![0.0f32; q.len()];
        let (mut pm, mut pl, mut po) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n * hd]);
        let (mut kc, mut vc) = (vec![0.0f32; cap], vec![0.0f32; cap]);
        launch!("write_kv", (slots.len(), 1, 1), 128; *mut f32 = kc.as_mut_ptr(), *mut f32 = vc.as_mut_ptr(),
            *const f32 = k_all.as_ptr(), *const f32 = v_all.as_ptr(), *const u32 = slots.as_ptr(), u32 = w as u32);
        launch!("paged_decode", (items, kv_heads, plan.splits), 128; *const f32 = q.as_ptr(), *const f32 = kc.as_ptr(),
            *const f32 = vc.as_ptr(), *const u32 = plan.tables.as_ptr(), *const u32 = plan.decode_meta.as_ptr(),
            u32 = heads as u32, u32 = kv_heads as u32, u32 = hd as u32, u32 = layout.block_size as u32, f32 = scale,
            u32 = plan.partition as u32, *mut f32 = pm.as_mut_ptr(), *mut f32 = pl.as_mut_ptr(), *mut f32 = po.as_mut_ptr());
        launch!("paged_decode_reduce", (items, heads, 1), 128; *const f32 = pm.as_ptr(), *const f32 = pl.as_ptr(),
            *const f32 = po.as_ptr(), *const u32 = plan.decode_meta.as_ptr(), u32 = heads as u32, u32 = hd as u32,
            u32 = plan.splits as u32, *mut f32 = got.as_mut_ptr());
        launch!("prefill_flash", (blocks(plan.max_q, 16), heads, n_pre), 128; *const f32 = q.as_ptr(),
            *const f32 = kc.as_ptr(), *const f32 = vc.as_ptr(), *const u32 = plan.tables.as_ptr(),
            *const u32 = plan.prefill_meta.as_ptr(), u32 = heads as u32, u32 = kv_heads as u32, u32 = hd as u32,
            u32 = layout.block_size as u32, f32 = scale, *mut f32 = got.as_mut_ptr());
        check(&what, &got, &want, REDUCTION);

        // bf16 pools: the kernels read what the CPU computes from keys and values rounded to
        // bf16 as tightly as the f32 pools match the f32 reference; against unrounded keys and
        // values they stay within the bf16 tolerance.
        let (mut kc, mut vc) = (vec![0u16; cap], vec![0u16; cap]);
        launch!("write_kv_bf16", (slots.len(), 1, 1), 128; *mut u16 = kc.as_mut_ptr(), *mut u16 = vc.as_mut_ptr(),
            *const f32 = k_all.as_ptr(), *const f32 = v_all.as_ptr(), *const u32 = slots.as_ptr(), u32 = w as u32);
        for (i, &slot) in slots.iter().enumerate() {
            for c in 0..w {
                let at = slot as usize * w + c;
                assert_eq!(kc[at], half::bf16::from_f32(k_all[i * w + c]).to_bits(), "write_kv_bf16 rounds like half");
                assert_eq!(vc[at], half::bf16::from_f32(v_all[i * w + c]).to_bits(), "write_kv_bf16 rounds like half");
            }
        }
        let mut got = vec![0.0f32; q.len()];
        launch!("paged_decode_bf16", (items, kv_heads, plan.splits), 128; *const f32 = q.as_ptr(), *const u16 = kc.as_ptr(),
            *const u16 = vc.as_ptr(), *const u32 = plan.tables.as_ptr(), *const u32 = plan.decode_meta.as_ptr(),
            u32 = heads as u32, u32 = kv_heads as u32, u32 = hd as u32, u32 = layout.block_size as u32, f32 = scale,
            u32 = plan.partition as u32, *mut f32 = pm.as_mut_ptr(), *mut f32 = pl.as_mut_ptr(), *mut f32 = po.as_mut_ptr());
        launch!("paged_decode_reduce", (items, heads, 1), 128; *const f32 = pm.as_ptr(), *const f32 = pl.as_ptr(),
            *const f32 = po.as_ptr(), *const u32 = plan.decode_meta.as_ptr(), u32 = heads as u32, u32 = hd as u32,
            u32 = plan.splits as u32, *mut f32 = got.as_mut_ptr());
        launch!("prefill_flash_bf16", (blocks(plan.max_q, 16), heads, n_pre), 128; *const f32 = q.as_ptr(),
            *const u16 = kc.as_ptr(), *const u16 = vc.as_ptr(), *const u32 = plan.tables.as_ptr(),
            *const u32 = plan.prefill_meta.as_ptr(), u32 = heads as u32, u32 = kv_heads as u32, u32 = hd as u32,
            u32 = layout.block_size as u32, f32 = scale, *mut f32 = got.as_mut_ptr());
        let round = |v: &[f32]| v.iter().map(|&x| bf16_round(x)).collect::<Vec<f32>>();
        let mut rounded = c.alloc_kv_cache(layout).expect("kv");
        c.write_kv(&mut rounded, &round(&k_all), &round(&v_all), &slots).expect("write");
        let mut want_rounded = vec![0.0; q.len()];
        c.paged_attention(&q, &rounded, &seqs, heads, &mut want_rounded).expect("attention");
        check(&format!("{what}, bf16 pools vs rounded keys and values"), &got, &want_rounded, REDUCTION);
        check(&format!("{what}, bf16 pools vs f32"), &got, &want, BF16);
    }
    // Shapes the kernels do not support are refused, not run.
    let l = KvLayout { num_blocks: 4, block_size: 16, kv_heads: 1, head_dim: 256 };
    assert!(plan_attention(256, l, &[], 1).is_err());
}

#[test]
fn argmax_and_top_k_match_the_cpu() {
    let mut rng = StdRng::seed_from_u64(15);
    let (rows, width) = (4, 3000);
    let mut logits = randn(&mut rng, rows * width, 10.0);
    logits[5] = f32::NAN;
    logits[width + 100] = 50.0;
    logits[width + 7] = 50.0; // a tie: the lower index first
    for v in &mut logits[2 * width..3 * width] {
        *v = f32::NAN; // a row of NaN: no candidate
    }
    logits[2 * width + 9] = -1.0;
    logits[3 * width + 11] = f32::INFINITY; // an infinity: the row is flagged, the max found
    let mut got = vec![0u32; rows];
    let mut bad = vec![7u32; rows];
    launch!("argmax_rows", (rows, 1, 1), 256; *const f32 = logits.as_ptr(), u32 = width as u32,
        *mut u32 = got.as_mut_ptr(), *mut u32 = bad.as_mut_ptr());
    assert_eq!(got, argmax_host(&logits, rows, width));
    assert_eq!((got[1], got[2], got[3]), (7, 9, 11));
    // Rows 0 (one NaN), 2 (NaNs) and 3 (an infinity) are not finite; row 1 is.
    let flags = vec![1, 0, 1, 1];
    assert_eq!(bad, flags, "argmax_rows flags the rows holding a non-finite value");
    for k in [1usize, 5, 64] {
        let (mut ov, mut oi) = (vec![0.0f32; rows * k], vec![0u32; rows * k]);
        let mut bad = vec![7u32; rows];
        launch!("topk_rows", (rows, 1, 1), 256; *const f32 = logits.as_ptr(), u32 = width as u32, u32 = k as u32,
            *mut f32 = ov.as_mut_ptr(), *mut u32 = oi.as_mut_ptr(), *mut u32 = bad.as_mut_ptr());
        let got: Vec<Vec<(u32, f32)>> = (0..rows)
            .map(|r| (0..k).filter(|&j| oi[r * k + j] != u32::MAX).map(|j| (oi[r * k + j], ov[r * k + j])).collect())
            .collect();
        assert_eq!(got, top_k_host(&logits, rows, width, k), "top-{k}");
        assert_eq!(bad, flags, "topk_rows flags the rows holding a non-finite value");
    }
}
