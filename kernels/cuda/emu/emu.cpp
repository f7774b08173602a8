// The kernels of kernels/cuda/*.cu built for the CPU emulation (emu.h), each behind an
// `emu_<kernel>(gx, gy, gz, threads, args...)` launcher with the kernel's own argument list.
// Built and loaded by kernels/tests/cuda_emulated.rs.
#include "emu.h"
#include "../common.cuh"
#include "../elementwise.cu"
#include "../matmul.cu"
#include "../attention.cu"
#include "../lora.cu"
#include "../sampling.cu"

#define EMU(NAME, PARAMS, ARGS)                                                   \
    extern "C" void emu_##NAME(unsigned gx, unsigned gy, unsigned gz, unsigned threads PARAMS) { \
        emu_launch(dim3{gx, gy, gz}, threads, [&] { NAME ARGS; });                \
    }
#define P(...) , __VA_ARGS__

EMU(embedding, P(const u8* t, int dt, u32 cols, const u32* ids, float* out), (t, dt, cols, ids, out))
EMU(rms_norm, P(float* x, const float* d, const float* w, u32 width, float eps, float* out), (x, d, w, width, eps, out))
EMU(rope, P(float* x, const u32* pos, u32 heads, u32 hd, const float* c, const float* s), (x, pos, heads, hd, c, s))
EMU(silu_mul, P(const float* g, const float* u, float* o, u64 n), (g, u, o, n))
EMU(add_assign, P(float* a, const float* x, u64 n), (a, x, n))
EMU(add_bias, P(float* x, const float* b, u32 w, u64 n), (x, b, w, n))
EMU(gather_rows, P(const float* x, u32 w, const u32* rows, float* out), (x, w, rows, out))
EMU(f32_to_bf16_kernel, P(const float* x, u16* out, u64 n), (x, out, n))
EMU(dequantize, P(const u8* w, int dt, u32 rows, u32 cols, int to_bf16, void* out), (w, dt, rows, cols, to_bf16, out))
EMU(gemv, P(const u8* w, int dt, u32 n, u32 k, const float* x, u32 rows, float* out), (w, dt, n, k, x, rows, out))
EMU(gemm_nt_bf16, P(const float* x, const u16* w, float* out, u32 m, u32 n, u32 k, u32 ldo), (x, w, out, m, n, k, ldo))
EMU(gemm_nt_f32, P(const float* x, const float* w, float* out, u32 m, u32 n, u32 k, u32 ldo), (x, w, out, m, n, k, ldo))
EMU(write_kv, P(float* kc, float* vc, const float* k, const float* v, const u32* slots, u32 w), (kc, vc, k, v, slots, w))
EMU(write_kv_bf16, P(u16* kc, u16* vc, const float* k, const float* v, const u32* slots, u32 w), (kc, vc, k, v, slots, w))
EMU(paged_decode,
    P(const float* q, const float* kc, const float* vc, const u32* tables, const u32* meta, u32 heads, u32 kvh, u32 hd,
      u32 bs, float scale, u32 partition, float* pm, float* pl, float* po),
    (q, kc, vc, tables, meta, heads, kvh, hd, bs, scale, partition, pm, pl, po))
EMU(paged_decode_bf16,
    P(const float* q, const u16* kc, const u16* vc, const u32* tables, const u32* meta, u32 heads, u32 kvh, u32 hd,
      u32 bs, float scale, u32 partition, float* pm, float* pl, float* po),
    (q, kc, vc, tables, meta, heads, kvh, hd, bs, scale, partition, pm, pl, po))
EMU(paged_decode_reduce,
    P(const float* pm, const float* pl, const float* po, const u32* meta, u32 heads, u32 hd, u32 splits, float* out),
    (pm, pl, po, meta, heads, hd, splits, out))
EMU(prefill_flash,
    P(const float* q, const float* kc, const float* vc, const u32* tables, const u32* meta, u32 heads, u32 kvh, u32 hd,
      u32 bs, float scale, float* out),
    (q, kc, vc, tables, meta, heads, kvh, hd, bs, scale, out))
EMU(prefill_flash_bf16,
    P(const float* q, const u16* kc, const u16* vc, const u32* tables, const u32* meta, u32 heads, u32 kvh, u32 hd,
      u32 bs, float scale, float* out),
    (q, kc, vc, tables, meta, heads, kvh, hd, bs, scale, out))
EMU(lora_shrink_bf16, P(const float* x, u32 in, const u64* p, const u32* m, const u32* it, float* tmp), (x, in, p, m, it, tmp))
EMU(lora_shrink_f32, P(const float* x, u32 in, const u64* p, const u32* m, const u32* it, float* tmp), (x, in, p, m, it, tmp))
EMU(lora_expand_bf16, P(const float* tmp, const u64* p, const u32* m, const float* s, const u32* it, float* out, u32 od),
    (tmp, p, m, s, it, out, od))
EMU(lora_expand_f32, P(const float* tmp, const u64* p, const u32* m, const float* s, const u32* it, float* out, u32 od),
    (tmp, p, m, s, it, out, od))
EMU(argmax_rows, P(const float* l, u32 w, u32* out, u32* bad), (l, w, out, bad))
EMU(topk_rows, P(const float* l, u32 w, u32 k, float* ov, u32* oi, u32* bad), (l, w, k, ov, oi, bad))
