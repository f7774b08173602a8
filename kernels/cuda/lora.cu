// LoRA terms for a mixed batch (BGMV for decode rows, SGMV for prefill row ranges), ranks
// mixed and unpadded: out[rows] += scale * (x[rows] · Aᵀ) · Bᵀᵀ with A [r, in] and B given
// transposed [r, out] (the CPU's kernels/src/cpu/lora.rs is the reference).
//
// The host flattens the call's segments into work items, one per (segment, batch row):
//   seg_ptr[2 * s] = device address of A, seg_ptr[2 * s + 1] = of Bᵀ (bf16 or f32, per kernel)
//   seg_meta[3 * s] = first row, [3 * s + 1] = rank, [3 * s + 2] = offset of its first row's
//   rank values in `tmp`; seg_scale[s]; item[2 * i] = segment, item[2 * i + 1] = batch row.
// `lora_shrink` writes tmp (rank values per item), `lora_expand` adds the expanded term to out.
// Weights are read in their stored type and accumulated in f32.

template <typename W>
__device__ __forceinline__ void shrink_impl(const float* __restrict__ x, u32 in_dim, const u64* __restrict__ seg_ptr,
                                            const u32* __restrict__ seg_meta, const u32* __restrict__ item,
                                            float* __restrict__ tmp) {
    u32 it = blockIdx.x, s = item[2 * it], row = item[2 * it + 1];
    u32 first = seg_meta[3 * s], rank = seg_meta[3 * s + 1], off = seg_meta[3 * s + 2];
    const W* a = (const W*)seg_ptr[2 * s];
    const float* xr = x + (u64)row * in_dim;
    u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (u32 j = warp; j < rank; j += warps) {
        const W* arow = a + (u64)j * in_dim;
        float sum = 0.0f;
        for (u32 c = lane; c < in_dim; c += 32) sum += xr[c] * ld(arow, c);
        sum = warp_sum(sum);
        if (lane == 0) tmp[off + (u64)(row - first) * rank + j] = sum;
    }
}

template <typename W>
__device__ __forceinline__ void expand_impl(const float* __restrict__ tmp, const u64* __restrict__ seg_ptr,
                                            const u32* __restrict__ seg_meta, const float* __restrict__ seg_scale,
                                            const u32* __restrict__ item, float* __restrict__ out, u32 out_dim) {
    u32 it = blockIdx.x, s = item[2 * it], row = item[2 * it + 1];
    u32 n = blockIdx.y * blockDim.x + threadIdx.x;
    if (n >= out_dim) return;
    u32 first = seg_meta[3 * s], rank = seg_meta[3 * s + 1], off = seg_meta[3 * s + 2];
    const W* b = (const W*)seg_ptr[2 * s + 1];
    const float* t = tmp + off + (u64)(row - first) * rank;
    float sum = 0.0f;
    for (u32 j = 0; j < rank; j++) sum += t[j] * ld(b, (u64)j * out_dim + n);
    // Several adapters may add to the same row in one call.
    atomicAdd(out + (u64)row * out_dim + n, seg_scale[s] * sum);
}

// grid = items, block = 128.
extern "C" __global__ void lora_shrink_bf16(const float* x, u32 in_dim, const u64* seg_ptr, const u32* seg_meta,
                                            const u32* item, float* tmp) {
    shrink_impl<u16>(x, in_dim, seg_ptr, seg_meta, item, tmp);
}
extern "C" __global__ void lora_shrink_f32(const float* x, u32 in_dim, const u64* seg_ptr, const u32* seg_meta,
                                           const u32* item, float* tmp) {
    shrink_impl<float>(x, in_dim, seg_ptr, seg_meta, item, tmp);
}

// grid = (items, ceil(out_dim / 256)), block = 256.
extern "C" __global__ void lora_expand_bf16(const float* tmp, const u64* seg_ptr, const u32* seg_meta,
                                            const float* seg_scale, const u32* item, float* out, u32 out_dim) {
    expand_impl<u16>(tmp, seg_ptr, seg_meta, seg_scale, item, out, out_dim);
}
extern "C" __global__ void lora_expand_f32(const float* tmp, const u64* seg_ptr, const u32* seg_meta,
                                           const float* seg_scale, const u32* item, float* out, u32 out_dim) {
    expand_impl<float>(tmp, seg_ptr, seg_meta, seg_scale, item, out, out_dim);
}
