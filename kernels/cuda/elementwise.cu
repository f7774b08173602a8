// Row-wise and elementwise kernels: embedding gather, RMSNorm (plain and fused with the
// residual add), RoPE, SiLU-gated activation, bias/residual adds, row gather, conversions.

// out[r, :] = table[ids[r], :], dequantizing. grid = rows, block = 256.
extern "C" __global__ void embedding(const u8* __restrict__ table, int dtype, u32 cols,
                                     const u32* __restrict__ ids, float* __restrict__ out) {
    u32 r = blockIdx.x;
    const u8* row = table + (u64)ids[r] * row_bytes(dtype, cols);
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) out[(u64)r * cols + c] = load_w(dtype, row, c);
}

// out = x / sqrt(mean(x^2) + eps) * w. When `delta` is not null, x += delta first (written back
// to x): the residual add fused with the next norm. grid = rows, block = 256.
extern "C" __global__ void rms_norm(float* __restrict__ x, const float* __restrict__ delta,
                                    const float* __restrict__ w, u32 width, float eps,
                                    float* __restrict__ out) {
    __shared__ float scratch[32];
    float* xr = x + (u64)blockIdx.x * width;
    float* orow = out + (u64)blockIdx.x * width;
    float ss = 0.0f;
    if (delta != nullptr) {
        const float* dr = delta + (u64)blockIdx.x * width;
        for (u32 c = threadIdx.x; c < width; c += blockDim.x) {
            float v = xr[c] + dr[c];
            xr[c] = v;
            ss += v * v;
        }
    } else {
        for (u32 c = threadIdx.x; c < width; c += blockDim.x) ss += xr[c] * xr[c];
    }
    float total = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(total / (float)width + eps);
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) orow[c] = xr[c] * inv * w[c];
}

// Rotate-half RoPE in place: row r at positions[r], `heads` heads of head_dim. cos/sin are
// [max_positions, head_dim / 2]. grid = rows, block = 128.
extern "C" __global__ void rope(float* __restrict__ x, const u32* __restrict__ positions, u32 heads,
                                u32 head_dim, const float* __restrict__ cos_t,
                                const float* __restrict__ sin_t) {
    u32 r = blockIdx.x, half = head_dim / 2;
    u64 p = positions[r];
    float* row = x + (u64)r * heads * head_dim;
    for (u32 i = threadIdx.x; i < heads * half; i += blockDim.x) {
        u32 h = i / half, j = i % half;
        float c = cos_t[p * half + j], s = sin_t[p * half + j];
        float* a = row + (u64)h * head_dim;
        float x0 = a[j], x1 = a[j + half];
        a[j] = x0 * c - x1 * s;
        a[j + half] = x1 * c + x0 * s;
    }
}

// out = silu(gate) * up. 1-D grid over n.
extern "C" __global__ void silu_mul(const float* __restrict__ gate, const float* __restrict__ up,
                                    float* __restrict__ out, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// acc += x. 1-D grid over n.
extern "C" __global__ void add_assign(float* __restrict__ acc, const float* __restrict__ x, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] += x[i];
}

// x[r, c] += bias[c]. 1-D grid over n = rows * width.
extern "C" __global__ void add_bias(float* __restrict__ x, const float* __restrict__ bias, u32 width, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += bias[i % width];
}

// out[i, :] = x[rows[i], :]. grid = len(rows), block = 256.
extern "C" __global__ void gather_rows(const float* __restrict__ x, u32 width, const u32* __restrict__ rows,
                                       float* __restrict__ out) {
    const float* src = x + (u64)rows[blockIdx.x] * width;
    float* dst = out + (u64)blockIdx.x * width;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) dst[c] = src[c];
}

// f32 -> bf16 (round to nearest even). 1-D grid over n.
extern "C" __global__ void f32_to_bf16_kernel(const float* __restrict__ x, u16* __restrict__ out, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(x[i]);
}

// Dequantizes a [rows, cols] weight to bf16 (to_bf16 != 0) or f32. 1-D grid over rows * cols.
extern "C" __global__ void dequantize(const u8* __restrict__ w, int dtype, u32 rows, u32 cols, int to_bf16,
                                      void* __restrict__ out) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * cols) return;
    u64 r = i / cols;
    u32 c = (u32)(i % cols);
    float v = load_w(dtype, w + r * row_bytes(dtype, cols), c);
    if (to_bf16) ((u16*)out)[i] = f32_to_bf16(v);
    else ((float*)out)[i] = v;
}
