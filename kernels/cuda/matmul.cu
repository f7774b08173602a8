// Matrix products out[M, N] = x[M, K] · Wᵀ for a weight W of shape [N, K].
//
// - `gemv`: few rows (decode steps), reading the weight in its stored format (GGUF blocks are
//   dequantized in registers, f32 accumulation): the weight is streamed once per call, which is
//   what bounds decode.
// - `gemm_nt_bf16` / `gemm_nt_f32`: many rows, a dense weight, a 64x64 tiled SIMT kernel. It
//   is the fallback when cuBLAS is not installed; with cuBLAS the backend calls cublasGemmEx
//   instead. A quantized weight has no dense copy on the device: the backend dequantizes a
//   slice of its rows at a time into one reused scratch buffer and multiplies that slice into
//   the matching columns of `out` (row stride `ldo`).

#define GEMV_MAX_ROWS 8

__device__ __forceinline__ void dequant_block(int dtype, const u8* b, float* v) {
    if (dtype == DT_Q8_0) {
        float d = f16_to_f32(load_u16(b));
#pragma unroll
        for (int j = 0; j < QK; j++) v[j] = d * (float)(i8)b[2 + j];
    } else if (dtype == DT_Q4_0) {
        float d = f16_to_f32(load_u16(b));
#pragma unroll
        for (int j = 0; j < 16; j++) {
            u8 q = b[2 + j];
            v[j] = d * (float)((int)(q & 15) - 8);
            v[j + 16] = d * (float)((int)(q >> 4) - 8);
        }
    } else {  // Q4_1
        float d = f16_to_f32(load_u16(b)), m = f16_to_f32(load_u16(b + 2));
#pragma unroll
        for (int j = 0; j < 16; j++) {
            u8 q = b[4 + j];
            v[j] = d * (float)(q & 15) + m;
            v[j + 16] = d * (float)(q >> 4) + m;
        }
    }
}

// One warp per weight row; rows <= GEMV_MAX_ROWS. grid = ceil(N / 4), block = 128.
extern "C" __global__ void gemv(const u8* __restrict__ w, int dtype, u32 n_out, u32 k,
                                const float* __restrict__ x, u32 rows, float* __restrict__ out) {
    u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    u32 n = blockIdx.x * (blockDim.x >> 5) + warp;
    if (n >= n_out) return;  // warp-uniform
    const u8* row = w + (u64)n * row_bytes(dtype, k);
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[r] = 0.0f;
    if (dtype >= DT_Q8_0) {
        u32 blocks = k / QK;
        u64 bb = dtype == DT_Q8_0 ? 34 : (dtype == DT_Q4_0 ? 18 : 20);
        for (u32 b = lane; b < blocks; b += 32) {
            float v[QK];
            dequant_block(dtype, row + b * bb, v);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r < (int)rows) {
                    const float4* xr = (const float4*)(x + (u64)r * k + (u64)b * QK);
                    float s = 0.0f;
#pragma unroll
                    for (int j = 0; j < QK / 4; j++) {
                        float4 xv = xr[j];
                        s += v[4 * j] * xv.x + v[4 * j + 1] * xv.y + v[4 * j + 2] * xv.z + v[4 * j + 3] * xv.w;
                    }
                    acc[r] += s;
                }
            }
        }
    } else {
        for (u32 c = lane; c < k; c += 32) {
            float wv = load_w(dtype, row, c);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++)
                if (r < (int)rows) acc[r] += wv * x[(u64)r * k + c];
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) {
        if (r < (int)rows) {
            float s = warp_sum(acc[r]);
            if (lane == 0) out[(u64)r * n_out + n] = s;
        }
    }
}

// 64x64 output tile per block of 256 threads, 4x4 per thread, K in steps of 16.
// grid = (ceil(N / 64), ceil(M / 64)).
template <typename W>
__device__ __forceinline__ void gemm_nt_impl(const float* __restrict__ x, const W* __restrict__ w,
                                             float* __restrict__ out, u32 M, u32 N, u32 K, u32 ldo) {
    __shared__ float As[16][64 + 4];
    __shared__ float Bs[16][64 + 4];
    u32 tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    u32 m0 = blockIdx.y * 64, n0 = blockIdx.x * 64;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (u32 k0 = 0; k0 < K; k0 += 16) {
        u32 kk = k0 + tx;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 r = ty + 16 * i;
            As[tx][r] = (m0 + r < M && kk < K) ? x[(u64)(m0 + r) * K + kk] : 0.0f;
            Bs[tx][r] = (n0 + r < N && kk < K) ? ld(w, (u64)(n0 + r) * K + kk) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < 16; t++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                a[i] = As[t][ty * 4 + i];
                b[i] = Bs[t][tx * 4 + i];
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u32 m = m0 + ty * 4 + i;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            u32 n = n0 + tx * 4 + j;
            if (m < M && n < N) out[(u64)m * ldo + n] = acc[i][j];
        }
    }
}

extern "C" __global__ void gemm_nt_bf16(const float* __restrict__ x, const u16* __restrict__ w,
                                        float* __restrict__ out, u32 M, u32 N, u32 K, u32 ldo) {
    gemm_nt_impl<u16>(x, w, out, M, N, K, ldo);
}

extern "C" __global__ void gemm_nt_f32(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ out, u32 M, u32 N, u32 K, u32 ldo) {
    gemm_nt_impl<float>(x, w, out, M, N, K, ldo);
}
