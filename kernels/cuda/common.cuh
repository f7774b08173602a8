// Shared definitions for openlora's CUDA kernels. Prepended to every kernels/cuda/*.cu file
// before NVRTC compiles it (NVRTC needs no include path this way, and no CUDA headers: bf16
// and f16 are handled as raw 16-bit values with explicit conversions).
//
// Layouts follow the CPU backend (kernels/src/cpu): activations are row-major f32, weights are
// row-major [out_features, in_features] in their GGUF block format, the KV cache is a pool of
// token slots (slot = block * block_size + offset) of kv_heads * head_dim f32 values.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;

// Weight element types; the numbering matches `cuda::DTYPE_*` in kernels/src/cuda/mod.rs.
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_Q8_0 3
#define DT_Q4_0 4
#define DT_Q4_1 5

#define QK 32
#define FULL_MASK 0xffffffffu
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even; NaN stays NaN (quiet).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u32 rounding = ((u >> 16) & 1u) + 0x7fffu;
    return (u16)((u + rounding) >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef OPENLORA_EMU
    return emu_f16_to_f32(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// Unaligned-safe 16-bit load (quant blocks of 18 and 34 bytes are only 2-byte aligned).
__device__ __forceinline__ u16 load_u16(const u8* p) { return (u16)p[0] | ((u16)p[1] << 8); }

// Bytes of one row of `cols` values.
__device__ __forceinline__ u64 row_bytes(int dtype, u32 cols) {
    switch (dtype) {
        case DT_F32: return (u64)cols * 4;
        case DT_F16:
        case DT_BF16: return (u64)cols * 2;
        case DT_Q8_0: return (u64)(cols / QK) * 34;
        case DT_Q4_0: return (u64)(cols / QK) * 18;
        default: return (u64)(cols / QK) * 20;  // Q4_1
    }
}

// Value `c` of a row in any supported format (the CPU's quant.rs dequantizers, one value).
__device__ __forceinline__ float load_w(int dtype, const u8* row, u32 c) {
    switch (dtype) {
        case DT_F32: return ((const float*)row)[c];
        case DT_F16: return f16_to_f32(((const u16*)row)[c]);
        case DT_BF16: return bf16_to_f32(((const u16*)row)[c]);
        case DT_Q8_0: {
            const u8* b = row + (u64)(c / QK) * 34;
            return f16_to_f32(load_u16(b)) * (float)(i8)b[2 + c % QK];
        }
        case DT_Q4_0: {
            const u8* b = row + (u64)(c / QK) * 18;
            u32 j = c % QK;
            u8 q = b[2 + (j & 15)];
            int v = j < 16 ? (q & 15) : (q >> 4);
            return f16_to_f32(load_u16(b)) * (float)(v - 8);
        }
        default: {  // Q4_1
            const u8* b = row + (u64)(c / QK) * 20;
            u32 j = c % QK;
            u8 q = b[4 + (j & 15)];
            int v = j < 16 ? (q & 15) : (q >> 4);
            return f16_to_f32(load_u16(b)) * (float)v + f16_to_f32(load_u16(b + 2));
        }
    }
}

// Dense operand of the GEMM and LoRA kernels: bf16 (raw u16) or f32.
__device__ __forceinline__ float ld(const u16* p, u64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over a block of up to 1024 threads (blockDim.x a multiple of 32); every thread gets it.
__device__ __forceinline__ float block_sum(float v, float* scratch /* [32] */) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}
