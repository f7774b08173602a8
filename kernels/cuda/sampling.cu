// Sampling helpers over logits rows, so only a few values per row leave the device.
//
// - `argmax_rows`: index of the largest value per row (the first on ties, like the CPU's
//   ops::argmax; NaN never wins).
// - `topk_rows`: the k largest values per row, descending (ties: lower index first), for top-k
//   and top-p sampling on the host over k candidates. k <= 64.
//
// Both also set `bad[row]` to 1 when the row holds a value that is not finite (NaN or an
// infinity), as the host sampler checks before it samples: an adapter whose weights overflow
// fails its request with a message instead of a silent pick.

#define TOPK_MAX 64

__device__ __forceinline__ bool better(float v, u32 i, float bv, u32 bi) {
    // NaN compares false, so it never replaces a number.
    return v > bv || (v == bv && i < bi);
}

// Reduces the block's (value, index) candidates in sv/si (256 each, written and synchronized by
// the caller) to the best one in sv[0]/si[0]; index 0xffffffff means none.
__device__ __forceinline__ void block_best(float* sv, u32* si) {
    for (u32 stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float ov = sv[threadIdx.x + stride];
            u32 oi = si[threadIdx.x + stride];
            if (oi != 0xffffffffu && (si[threadIdx.x] == 0xffffffffu || better(ov, oi, sv[threadIdx.x], si[threadIdx.x]))) {
                sv[threadIdx.x] = ov;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
}

__device__ __forceinline__ u32 not_finite(float v) { return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u; }

// Whether any thread of the block has `flag` set (blockDim.x <= 256); every thread gets it.
__device__ __forceinline__ u32 block_any(u32 flag, u32* sf /* [256] */) {
    sf[threadIdx.x] = flag;
    __syncthreads();
    for (u32 stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) sf[threadIdx.x] |= sf[threadIdx.x + stride];
        __syncthreads();
    }
    u32 any = sf[0];
    __syncthreads();
    return any;
}

// grid = rows, block = 256.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, u32 width, u32* __restrict__ out,
                                       u32* __restrict__ bad) {
    __shared__ float sv[256];
    __shared__ u32 si[256];
    const float* row = logits + (u64)blockIdx.x * width;
    float bv = NEG_INF;
    u32 bi = 0xffffffffu;
    u32 nf = 0;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) {
        float v = row[c];
        nf |= not_finite(v);
        if (bi == 0xffffffffu ? !(v != v) : better(v, c, bv, bi)) {
            bv = v;
            bi = c;
        }
    }
    sv[threadIdx.x] = bv;
    si[threadIdx.x] = bi;
    __syncthreads();
    block_best(sv, si);
    u32 best = si[0];
    __syncthreads();  // every thread has read si[0] before block_any reuses it
    u32 any = block_any(nf, si);
    if (threadIdx.x == 0) {
        out[blockIdx.x] = best;
        bad[blockIdx.x] = any;
    }
}

// k rounds of a block-wide argmax, each excluding what earlier rounds took (values strictly
// after the previous pick in (value desc, index asc) order). grid = rows, block = 256.
extern "C" __global__ void topk_rows(const float* __restrict__ logits, u32 width, u32 k,
                                     float* __restrict__ out_v, u32* __restrict__ out_i, u32* __restrict__ bad) {
    __shared__ float sv[256];
    __shared__ u32 si[256];
    const float* row = logits + (u64)blockIdx.x * width;
    u32 nf = 0;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) nf |= not_finite(row[c]);
    u32 any = block_any(nf, si);
    if (threadIdx.x == 0) bad[blockIdx.x] = any;
    float pv = 0.0f;
    u32 pi = 0xffffffffu;  // previous pick; none yet
    for (u32 round = 0; round < k; round++) {
        float bv = NEG_INF;
        u32 bi = 0xffffffffu;
        for (u32 c = threadIdx.x; c < width; c += blockDim.x) {
            float v = row[c];
            if (v != v) continue;
            // Only candidates ranked after the previous pick.
            bool after = pi == 0xffffffffu || v < pv || (v == pv && c > pi);
            if (after && (bi == 0xffffffffu || better(v, c, bv, bi))) {
                bv = v;
                bi = c;
            }
        }
        sv[threadIdx.x] = bv;
        si[threadIdx.x] = bi;
        __syncthreads();
        block_best(sv, si);
        pv = sv[0];
        pi = si[0];
        __syncthreads();
        if (threadIdx.x == 0) {
            out_v[(u64)blockIdx.x * k + round] = pi == 0xffffffffu ? NEG_INF : pv;
            out_i[(u64)blockIdx.x * k + round] = pi;
        }
        if (pi == 0xffffffffu) {
            // Fewer than k numbers in the row: fill the rest as "none".
            for (u32 r = round + 1 + threadIdx.x; r < k; r += blockDim.x) {
                out_v[(u64)blockIdx.x * k + r] = NEG_INF;
                out_i[(u64)blockIdx.x * k + r] = 0xffffffffu;
            }
            return;  // block-uniform
        }
    }
}
