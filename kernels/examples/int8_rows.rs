//! Times one decode step's matmuls for the default model's shapes (30 layers of Q4_1 q, k, v,
//! o, gate, up, down plus the Q8_0 49152 x 576 LM head) at 1, 8, 32 and 128 activation rows:
//! the f32-activation path against the 8-bit one (`ROWS=1,8,32` picks the row counts). Prints a
//! table; wall time, best of 7, on the global thread pool (`RAYON_NUM_THREADS` sizes it):
//! `cargo run --release -p openlora-kernels --example int8_rows`.
use std::time::Instant;

use openlora_kernels::cpu::int8;
use openlora_kernels::{Backend, CpuBackend, DType, HostWeight, quant::quantize_row};

fn main() {
    let shapes = [
        ("q/o", 576usize, 576usize, 2usize, DType::Q4_1),
        ("k/v", 192, 576, 2, DType::Q4_1),
        ("gate/up", 1536, 576, 2, DType::Q4_1),
        ("down", 576, 1536, 1, DType::Q4_1),
        ("lm_head", 49152, 576, 0, DType::Q8_0),
    ];
    let f32b = CpuBackend::new();
    let i8b = CpuBackend::new().with_int8(true);
    println!("{} / {} (vnni: {})", f32b.name(), i8b.name(), int8::has_vnni());
    // `ROWS=1,8,32` picks the row counts.
    let rows: Vec<usize> = std::env::var("ROWS")
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32, 128]);
    for m in rows {
        let (mut t32, mut t8) = (0.0, 0.0);
        for (name, n, k, per_layer, dt) in shapes {
            let wv: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let bytes: Vec<u8> = wv.chunks_exact(k).flat_map(|r| quantize_row(dt, r)).collect();
            let host = HostWeight::from_bytes(dt, n, k, bytes).expect("weight");
            let wf = f32b.prepare_weight(host.clone()).expect("weight");
            let wi = i8b.prepare_weight(host).expect("weight");
            let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
            let mut out = vec![0f32; m * n];
            let iters = if dt == DType::Q8_0 { 2 } else { 10 };
            let mut time = |b: &CpuBackend, w| {
                let mut best = f64::MAX;
                for _ in 0..7 {
                    let t = Instant::now();
                    b.execute(|| {
                        for _ in 0..iters {
                            b.matmul(&x, m, w, &mut out).expect("matmul");
                        }
                    });
                    best = best.min(t.elapsed().as_secs_f64() / iters as f64);
                }
                best
            };
            let a = time(&f32b, &wf);
            let b = time(&i8b, &wi);
            let count = if per_layer == 0 { 1.0 } else { 30.0 * per_layer as f64 };
            if std::env::var_os("VERBOSE").is_some() {
                println!("   {name:8} [{n}x{k}] {dt:?} m {m}: f32 {:.1} us, int8 {:.1} us", a * 1e6, b * 1e6);
            }
            t32 += a * count;
            t8 += b * count;
        }
        println!(
            "{m:>3} rows: f32 {:.2} ms/step ({:.0} rows/s), int8 {:.2} ms/step ({:.0} rows/s), {:.2}x",
            t32 * 1e3,
            m as f64 / t32,
            t8 * 1e3,
            m as f64 / t8,
            t32 / t8
        );
    }
}
