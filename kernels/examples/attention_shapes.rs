//! Times the CPU paged attention of one whole step of the default model (30 layers, 9 query
//! heads over 3 KV heads of 64 dimensions, 16-token blocks), each layer in its own pool as in
//! the engine: decode of 32 sequences at several context lengths, and the prefill of 8
//! 60-token prompts.
//!
//! `cargo run --release -p openlora-kernels --example attention_shapes`
use openlora_kernels::{AttnSeq, Backend, CpuBackend, KvLayout};

const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const BLOCK: usize = 16;

/// Milliseconds of one step's attention (all layers): `seqs` sequences of `ctx` tokens, the
/// last `q_len` of each new this step.
fn step_ms(backend: &CpuBackend, seqs: usize, ctx: usize, q_len: usize) -> f64 {
    let per_seq = ctx.div_ceil(BLOCK);
    let layout = KvLayout { num_blocks: seqs * per_seq, block_size: BLOCK, kv_heads: KV_HEADS, head_dim: HEAD_DIM };
    let w = layout.token_width();
    // Blocks handed out interleaved across sequences, as a pool that has served a while has them.
    let tables: Vec<Vec<u32>> = (0..seqs).map(|s| (0..per_seq).map(|b| (b * seqs + s) as u32).collect()).collect();
    let distinct = if std::env::var_os("ONE_LAYER").is_some() { 1 } else { LAYERS };
    let caches: Vec<_> = (0..distinct)
        .map(|l| {
            let mut c = backend.alloc_kv_cache(layout).expect("cache");
            for t in &tables {
                let slots: Vec<u32> = (0..ctx).map(|p| t[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32).collect();
                let kv: Vec<f32> = (0..ctx * w).map(|i| ((i * 31 + l * 7) % 97) as f32 / 97.0 - 0.5).collect();
                backend.write_kv(&mut c, &kv, &kv, &slots).expect("write");
            }
            c
        })
        .collect();
    let rows = seqs * q_len;
    let q: Vec<f32> = (0..rows * HEADS * HEAD_DIM).map(|i| ((i * 13) % 89) as f32 / 89.0 - 0.5).collect();
    let attn: Vec<AttnSeq<'_>> = tables
        .iter()
        .enumerate()
        .map(|(s, t)| AttnSeq { q_start: s * q_len, q_len, ctx_len: ctx, block_table: t })
        .collect();
    let mut out = vec![0f32; q.len()];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let el = backend.execute(|| {
            let t = std::time::Instant::now();
            for c in caches.iter().cycle().take(LAYERS) {
                backend.paged_attention(&q, c, &attn, HEADS, &mut out).expect("attention");
            }
            t.elapsed().as_secs_f64()
        });
        best = best.min(el);
    }
    best * 1e3
}

fn main() {
    let backend = CpuBackend::new();
    if std::env::var_os("PREFILL_ONLY").is_some() {
        println!("prefill  1 seq x 512 tokens: {:6.2} ms/step", step_ms(&backend, 1, 512, 512));
        return;
    }
    for ctx in [32usize, 64, 96, 128, 256] {
        let ms = step_ms(&backend, 32, ctx, 1);
        println!("decode  32 seqs x ctx {ctx:4}: {ms:6.2} ms/step");
    }
    let ms = step_ms(&backend, 8, 60, 60);
    println!("prefill  8 seqs x 60 tokens: {ms:6.2} ms/step");
    let ms = step_ms(&backend, 1, 512, 512);
    println!("prefill  1 seq x 512 tokens: {ms:6.2} ms/step");
}
