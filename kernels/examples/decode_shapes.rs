//! Times the CPU matmul on the default model's decode shapes (one activation row).
use openlora_kernels::cpu::{matmul::matmul, simd};
use openlora_kernels::{Backend, CpuBackend, DType, HostWeight, quant::quantize_row};

fn main() {
    let shapes = [
        ("q/o", 576usize, 576usize, 2usize, DType::Q4_1),
        ("k/v", 192, 576, 2, DType::Q4_1),
        ("gate/up", 1536, 576, 2, DType::Q4_1),
        ("down", 576, 1536, 1, DType::Q4_1),
        ("lm_head", 49152, 576, 0, DType::Q8_0),
    ];
    let mut total = 0.0;
    for (name, n, k, per_layer, dt) in shapes {
        let wv: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let bytes: Vec<u8> = wv.chunks_exact(k).flat_map(|r| quantize_row(dt, r)).collect();
        let w = HostWeight::from_bytes(dt, n, k, bytes).expect("weight");
        let x: Vec<f32> = (0..k).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut out = vec![0f32; n];
        let iters = 300;
        let mut best = f64::MAX;
        for _ in 0..5 {
            // Inside the pool, as the model's forward pass runs (Backend::execute).
            let el = CpuBackend::new().execute(|| {
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    matmul(simd::detected(), &x, 1, &w, &mut out).expect("matmul");
                }
                t.elapsed().as_secs_f64()
            });
            best = best.min(el / iters as f64);
        }
        let count = if per_layer == 0 { 1.0 } else { 30.0 * per_layer as f64 };
        total += best * count;
        println!("{name:8} [{n}x{k}] {dt:?}: {:.1} us/call x {count} = {:.2} ms/token", best * 1e6, best * count * 1e3);
    }
    println!("total {:.2} ms/token -> {:.0} tok/s (matmuls only, cache-warm)", total * 1e3, 1.0 / total);
}
