// Paged attention over the engine's block tables (the CPU's kernels/src/cpu/attention.rs is
// the reference). K and V pools: slot s holds kv_heads * head_dim values at s * kv_width;
// slot = block_table[t / block_size] * block_size + t % block_size for token t of a sequence.
// The pools hold f32 (the kernels without a suffix) or bf16 (`_bf16`: half the bytes, keys and
// values rounded to nearest even when written, f32 arithmetic after loading).
//
// - `write_kv`: scatters this step's keys and values into their slots.
// - `paged_decode` + `paged_decode_reduce`: flash-decoding. One block per (query row, KV head,
//   split of the key range); the GROUP query heads sharing a KV head read each key once; each
//   split keeps an online softmax (max, sum, unnormalised output) that the reduce kernel merges.
// - `prefill_flash`: causal flash attention for prefill chunks: a tile of 16 queries of one
//   head loads 32 keys and values at a time into shared memory, online softmax per query.
//
// Limits (checked by the host): head_dim <= 128 and a multiple of 8 (and of 32 is not needed),
// heads / kv_heads <= 8.

#define ATT_MAX_GROUP 8
#define ATT_MAX_D 4       // head_dim / 32 rounded up, per lane
#define ATT_WARPS 4

__device__ __forceinline__ void kv_store(float* p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void kv_store(u16* p, u64 i, float v) { p[i] = f32_to_bf16(v); }

template <typename KV>
__device__ __forceinline__ void write_kv_impl(KV* __restrict__ kc, KV* __restrict__ vc, const float* __restrict__ k,
                                              const float* __restrict__ v, const u32* __restrict__ slots, u32 width) {
    u64 dst = (u64)slots[blockIdx.x] * width, src = (u64)blockIdx.x * width;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) {
        kv_store(kc, dst + c, k[src + c]);
        kv_store(vc, dst + c, v[src + c]);
    }
}

extern "C" __global__ void write_kv(float* __restrict__ kc, float* __restrict__ vc, const float* __restrict__ k,
                                    const float* __restrict__ v, const u32* __restrict__ slots, u32 width) {
    write_kv_impl<float>(kc, vc, k, v, slots, width);
}

extern "C" __global__ void write_kv_bf16(u16* __restrict__ kc, u16* __restrict__ vc, const float* __restrict__ k,
                                         const float* __restrict__ v, const u32* __restrict__ slots, u32 width) {
    write_kv_impl<u16>(kc, vc, k, v, slots, width);
}

__device__ __forceinline__ u64 slot_of(const u32* __restrict__ table, u32 t, u32 block_size) {
    return (u64)table[t / block_size] * block_size + t % block_size;
}

// Work item i (one decode query row): row_meta[3 * i] = the row in q/out, row_meta[3 * i + 1] =
// offset of its block table in `tables`, row_meta[3 * i + 2] = keys it attends to (position + 1).
// Split s covers keys [s * partition, (s + 1) * partition).
// grid = (items, kv_heads, splits), block = 32 * ATT_WARPS.
// part_m/part_l: [items, heads, splits]; part_o: [items, heads, splits, head_dim].
template <typename KV>
__device__ __forceinline__ void paged_decode_impl(const float* __restrict__ q, const KV* __restrict__ kc,
                                                  const KV* __restrict__ vc, const u32* __restrict__ tables,
                                                  const u32* __restrict__ row_meta, u32 heads, u32 kv_heads,
                                                  u32 head_dim, u32 block_size, float scale, u32 partition,
                                                  float* __restrict__ part_m, float* __restrict__ part_l,
                                                  float* __restrict__ part_o) {
    __shared__ float sm_m[ATT_WARPS][ATT_MAX_GROUP];
    __shared__ float sm_l[ATT_WARPS][ATT_MAX_GROUP];
    __shared__ float sm_o[ATT_WARPS][ATT_MAX_GROUP][32 * ATT_MAX_D];
    u32 item = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    u32 group = heads / kv_heads;
    u32 row = row_meta[3 * item];
    const u32* table = tables + row_meta[3 * item + 1];
    u32 n_keys = row_meta[3 * item + 2];
    u32 start = split * partition;
    u32 end = min(n_keys, start + partition);
    u32 kv_width = kv_heads * head_dim;

    float qv[ATT_MAX_GROUP][ATT_MAX_D];
    float acc[ATT_MAX_GROUP][ATT_MAX_D];
    float m[ATT_MAX_GROUP], l[ATT_MAX_GROUP];
#pragma unroll
    for (int g = 0; g < ATT_MAX_GROUP; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_MAX_D; i++) {
            u32 d = lane + 32 * i;
            acc[g][i] = 0.0f;
            qv[g][i] = (g < (int)group && d < head_dim)
                           ? q[((u64)row * heads + kvh * group + g) * head_dim + d]
                           : 0.0f;
        }
    }
    for (u32 t = start + warp; t < end; t += ATT_WARPS) {
        u64 base = slot_of(table, t, block_size) * kv_width + (u64)kvh * head_dim;
        float kv[ATT_MAX_D];
#pragma unroll
        for (int i = 0; i < ATT_MAX_D; i++) {
            u32 d = lane + 32 * i;
            kv[i] = d < head_dim ? ld(kc, base + d) : 0.0f;
        }
        float vv[ATT_MAX_D];
#pragma unroll
        for (int i = 0; i < ATT_MAX_D; i++) {
            u32 d = lane + 32 * i;
            vv[i] = d < head_dim ? ld(vc, base + d) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < ATT_MAX_GROUP; g++) {
            if (g < (int)group) {
                float s = 0.0f;
#pragma unroll
                for (int i = 0; i < ATT_MAX_D; i++) s += qv[g][i] * kv[i];
                s = warp_sum(s) * scale;
                float m_new = fmaxf(m[g], s);
                float alpha = expf(m[g] - m_new);
                float p = expf(s - m_new);
                l[g] = l[g] * alpha + p;
#pragma unroll
                for (int i = 0; i < ATT_MAX_D; i++) acc[g][i] = acc[g][i] * alpha + p * vv[i];
                m[g] = m_new;
            }
        }
    }
    // Merge the warps' partial softmaxes.
#pragma unroll
    for (int g = 0; g < ATT_MAX_GROUP; g++) {
        if (g < (int)group) {
            if (lane == 0) {
                sm_m[warp][g] = m[g];
                sm_l[warp][g] = l[g];
            }
#pragma unroll
            for (int i = 0; i < ATT_MAX_D; i++) sm_o[warp][g][lane + 32 * i] = acc[g][i];
        }
    }
    __syncthreads();
    // Thread t handles (g, d) pairs t, t + blockDim, ...
    for (u32 idx = threadIdx.x; idx < group * head_dim; idx += blockDim.x) {
        u32 g = idx / head_dim, d = idx % head_dim;
        float mm = NEG_INF;
        for (int w = 0; w < ATT_WARPS; w++) mm = fmaxf(mm, sm_m[w][g]);
        float ll = 0.0f, o = 0.0f;
        if (mm != NEG_INF) {
            for (int w = 0; w < ATT_WARPS; w++) {
                if (sm_m[w][g] == NEG_INF) continue;
                float f = expf(sm_m[w][g] - mm);
                ll += sm_l[w][g] * f;
                o += sm_o[w][g][d] * f;
            }
        }
        u64 ph = ((u64)item * heads + kvh * group + g) * splits + split;
        if (d == 0) {
            part_m[ph] = mm;
            part_l[ph] = ll;
        }
        part_o[ph * head_dim + d] = o;
    }
}

#define PAGED_DECODE_PARAMS(KV)                                                                       \
    const float *__restrict__ q, const KV *__restrict__ kc, const KV *__restrict__ vc,                \
        const u32 *__restrict__ tables, const u32 *__restrict__ row_meta, u32 heads, u32 kv_heads,     \
        u32 head_dim, u32 block_size, float scale, u32 partition, float *__restrict__ part_m,           \
        float *__restrict__ part_l, float *__restrict__ part_o
#define PAGED_DECODE_ARGS q, kc, vc, tables, row_meta, heads, kv_heads, head_dim, block_size, scale, partition, part_m, part_l, part_o

extern "C" __global__ void paged_decode(PAGED_DECODE_PARAMS(float)) { paged_decode_impl<float>(PAGED_DECODE_ARGS); }
extern "C" __global__ void paged_decode_bf16(PAGED_DECODE_PARAMS(u16)) { paged_decode_impl<u16>(PAGED_DECODE_ARGS); }

// Merges the splits: out[row, h, :] = sum_s o_s * e^(m_s - M) / sum_s l_s * e^(m_s - M).
// grid = (items, heads), block = 128.
extern "C" __global__ void paged_decode_reduce(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                               const float* __restrict__ part_o, const u32* __restrict__ row_meta,
                                               u32 heads, u32 head_dim, u32 splits, float* __restrict__ out) {
    u32 item = blockIdx.x, h = blockIdx.y, row = row_meta[3 * item];
    u64 ph = ((u64)item * heads + h) * splits;
    float mm = NEG_INF;
    for (u32 s = 0; s < splits; s++) mm = fmaxf(mm, part_m[ph + s]);
    float ll = 0.0f;
    if (mm != NEG_INF)
        for (u32 s = 0; s < splits; s++)
            if (part_m[ph + s] != NEG_INF) ll += part_l[ph + s] * expf(part_m[ph + s] - mm);
    float inv = ll > 0.0f ? 1.0f / ll : 0.0f;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        if (mm != NEG_INF)
            for (u32 s = 0; s < splits; s++)
                if (part_m[ph + s] != NEG_INF) o += part_o[(ph + s) * head_dim + d] * expf(part_m[ph + s] - mm);
        out[((u64)row * heads + h) * head_dim + d] = o * inv;
    }
}

#define FA_BQ 16
#define FA_BK 32
#define FA_TPQ 8  // threads per query
#define FA_MAX_DT (128 / FA_TPQ)

// seq_meta[4 * s .. 4 * s + 4] = (q_start, q_len, ctx_len, table offset) of prefill sequence s.
// Query i of a sequence sits at position ctx_len - q_len + i and sees keys 0..=that position.
// grid = (ceil(max q_len / FA_BQ), heads, sequences), block = FA_BQ * FA_TPQ = 128.
template <typename KV>
__device__ __forceinline__ void prefill_flash_impl(const float* __restrict__ q, const KV* __restrict__ kc,
                                                   const KV* __restrict__ vc, const u32* __restrict__ tables,
                                                   const u32* __restrict__ seq_meta, u32 heads, u32 kv_heads,
                                                   u32 head_dim, u32 block_size, float scale,
                                                   float* __restrict__ out) {
    __shared__ float ks[FA_BK][128];
    __shared__ float vs[FA_BK][128];
    u32 s = blockIdx.z, h = blockIdx.y;
    u32 q_start = seq_meta[4 * s], q_len = seq_meta[4 * s + 1], ctx_len = seq_meta[4 * s + 2];
    const u32* table = tables + seq_meta[4 * s + 3];
    u32 q0 = blockIdx.x * FA_BQ;
    if (q0 >= q_len) return;  // block-uniform
    u32 kvh = h / (heads / kv_heads);
    u32 kv_width = kv_heads * head_dim;
    u32 qi = threadIdx.x / FA_TPQ, sub = threadIdx.x % FA_TPQ;
    bool valid = q0 + qi < q_len;
    u32 pos = ctx_len - q_len + q0 + qi;  // meaningful when valid
    u32 last = ctx_len - q_len + min(q0 + FA_BQ, q_len);  // keys needed by the tile (exclusive)
    u32 dims = head_dim / FA_TPQ;

    float qv[FA_MAX_DT], acc[FA_MAX_DT];
    const float* qrow = q + ((u64)(q_start + q0 + qi) * heads + h) * head_dim;
#pragma unroll
    for (int i = 0; i < FA_MAX_DT; i++) {
        u32 d = sub + FA_TPQ * i;
        qv[i] = (valid && i < (int)dims) ? qrow[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (u32 k0 = 0; k0 < last; k0 += FA_BK) {
        __syncthreads();
        for (u32 idx = threadIdx.x; idx < FA_BK * head_dim; idx += blockDim.x) {
            u32 j = idx / head_dim, d = idx % head_dim, t = k0 + j;
            if (t < last) {
                u64 base = slot_of(table, t, block_size) * kv_width + (u64)kvh * head_dim + d;
                ks[j][d] = ld(kc, base);
                vs[j][d] = ld(vc, base);
            } else {
                ks[j][d] = 0.0f;
                vs[j][d] = 0.0f;
            }
        }
        __syncthreads();
        u32 n = min((u32)FA_BK, last - k0);
        for (u32 j = 0; j < n; j++) {
            float part = 0.0f;
#pragma unroll
            for (int i = 0; i < FA_MAX_DT; i++)
                if (i < (int)dims) part += qv[i] * ks[j][sub + FA_TPQ * i];
            part += __shfl_xor_sync(FULL_MASK, part, 4);
            part += __shfl_xor_sync(FULL_MASK, part, 2);
            part += __shfl_xor_sync(FULL_MASK, part, 1);
            if (!valid || k0 + j > pos) continue;
            float sc = part * scale;
            float m_new = fmaxf(m, sc);
            float alpha = expf(m - m_new);
            float p = expf(sc - m_new);
            l = l * alpha + p;
#pragma unroll
            for (int i = 0; i < FA_MAX_DT; i++)
                if (i < (int)dims) acc[i] = acc[i] * alpha + p * vs[j][sub + FA_TPQ * i];
            m = m_new;
        }
    }
    if (valid) {
        float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float* orow = out + ((u64)(q_start + q0 + qi) * heads + h) * head_dim;
#pragma unroll
        for (int i = 0; i < FA_MAX_DT; i++)
            if (i < (int)dims) orow[sub + FA_TPQ * i] = acc[i] * inv;
    }
}

#define PREFILL_PARAMS(KV)                                                                            \
    const float *__restrict__ q, const KV *__restrict__ kc, const KV *__restrict__ vc,                \
        const u32 *__restrict__ tables, const u32 *__restrict__ seq_meta, u32 heads, u32 kv_heads,     \
        u32 head_dim, u32 block_size, float scale, float *__restrict__ out
#define PREFILL_ARGS q, kc, vc, tables, seq_meta, heads, kv_heads, head_dim, block_size, scale, out

extern "C" __global__ void prefill_flash(PREFILL_PARAMS(float)) { prefill_flash_impl<float>(PREFILL_ARGS); }
extern "C" __global__ void prefill_flash_bf16(PREFILL_PARAMS(u16)) { prefill_flash_impl<u16>(PREFILL_ARGS); }
