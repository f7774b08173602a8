// A CPU emulation of the small part of CUDA C++ that kernels/cuda/*.cu use, so the kernels'
// logic (indexing, tiling, reductions, shuffles, online softmax, early exits) is executed and
// compared with the Rust CPU backend on machines without a GPU (kernels/tests/cuda_emulated.rs).
//
// Every thread of a block is an OS thread; blocks run one after another, so `__shared__`
// becomes a function-local `static` (one copy, used by one block at a time). __syncthreads is
// a block-wide barrier and warp shuffles exchange through a per-warp buffer between two
// barriers; a thread that returns early drops out of both barriers, as exited GPU threads do.
// It checks logic, not performance, memory-model subtleties or the real compiler's output.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define OPENLORA_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct float4 {
    float x, y, z, w;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct EmuWarp {
    float vals[32];
    std::unique_ptr<std::barrier<>> bar;
};
inline std::unique_ptr<std::barrier<>> emu_block_bar;
inline std::vector<EmuWarp> emu_warps;

inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    unsigned lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    EmuWarp& W = emu_warps[w];
    W.vals[lane] = v;
    W.bar->arrive_and_wait();
    float r = W.vals[lane ^ (unsigned)lane_mask];
    W.bar->arrive_and_wait();
    return r;
}

inline float __uint_as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
template <class T>
inline T min(T a, T b) {
    return a < b ? a : b;
}

using std::fmaxf;


// IEEE half -> float in software (the GPU build uses cvt.f32.f16).
inline float emu_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while ((man & 0x400) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    return __uint_as_float(bits);
}

// Runs `body` for every thread of every block of the grid.
template <class F>
void emu_launch(dim3 grid, unsigned threads, F body) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    unsigned warps = (threads + 31) / 32;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                emu_block_bar = std::make_unique<std::barrier<>>(threads);
                emu_warps.clear();
                emu_warps.resize(warps);
                for (unsigned w = 0; w < warps; w++)
                    emu_warps[w].bar = std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w));
                std::vector<std::thread> ts;
                ts.reserve(threads);
                for (unsigned t = 0; t < threads; t++) {
                    ts.emplace_back([=, &body] {
                        threadIdx = dim3{t, 0, 0};
                        blockIdx = dim3{x, y, z};
                        body();
                        emu_warps[t >> 5].bar->arrive_and_drop();
                        emu_block_bar->arrive_and_drop();
                    });
                }
                for (auto& t : ts) t.join();
            }
}
