// Shared device helpers of bertrt's kernels, included by every <op>.cu.
//
// Header-free on purpose: NVRTC compiles these without the CUDA toolkit's headers, so bf16 and
// fp16 are raw 16-bit values (`bf16_t`, `f16_t`) with explicit conversions, and every
// computation accumulates in fp32. Row and element offsets are 64-bit (`long long`): a grid of
// 65,536+ rows times a hidden size overflows 32 bits.
#pragma once

struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(bf16_t x) {
    return __uint_as_float(static_cast<unsigned int>(x.bits) << 16);
}

__device__ __forceinline__ float to_float(f16_t x) {
    float out;
    asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(x.bits));
    return out;
}

template <typename T> __device__ __forceinline__ T from_float(float x);

template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }

// Round to nearest even, NaN kept quiet (what torch's float -> bfloat16 conversion does).
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
    unsigned int u = __float_as_uint(x);
    bf16_t out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out.bits = static_cast<unsigned short>((u >> 16) | 0x40u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        out.bits = static_cast<unsigned short>(u >> 16);
    }
    return out;
}

template <> __device__ __forceinline__ f16_t from_float<f16_t>(float x) {
    f16_t out;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(x));
    return out;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffffu, x, offset);
    }
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    }
    return x;
}

// The sum of `x` over the block, returned to every thread. `scratch` holds 32 floats in shared
// memory; blockDim.x must be a multiple of 32. Safe to call twice in a row (it syncs on entry).
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(x);
}

// The maximum of `x` over the block, to every thread; as `block_sum`.
__device__ __forceinline__ float block_max(float x, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : -__int_as_float(0x7f800000);
    return warp_max(x);
}

// The mean and reciprocal standard deviation of a row of `hidden` values held COLS per thread
// (thread t: columns t + k * blockDim.x; `total` is this thread's sum of its columns), over the
// whole block. Two passes over the registers: the variance of centred values, no cancellation.
template <int COLS>
__device__ __forceinline__ void row_moments(const float (&v)[COLS], float total,
                                            long long hidden, float eps, float* scratch,
                                            float& mean, float& rstd) {
    mean = block_sum(total, scratch) / static_cast<float>(hidden);
    float squares = 0.0f;
#pragma unroll
    for (int k = 0; k < COLS; ++k) {
        const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
        if (c < hidden) squares += (v[k] - mean) * (v[k] - mean);
    }
    rstd = rsqrtf(block_sum(squares, scratch) / static_cast<float>(hidden) + eps);
}

// Philox4x32-10 (Salmon et al., 2011): counter-based random numbers, so a backward pass can
// regenerate the forward's dropout mask from (seed, element index) instead of storing it.
struct uint4_t { unsigned int x, y, z, w; };

__device__ __forceinline__ uint4_t philox(unsigned long long seed, unsigned long long counter) {
    unsigned int c0 = static_cast<unsigned int>(counter);
    unsigned int c1 = static_cast<unsigned int>(counter >> 32);
    unsigned int c2 = 0u, c3 = 0u;
    unsigned int k0 = static_cast<unsigned int>(seed);
    unsigned int k1 = static_cast<unsigned int>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        const unsigned int hi0 = __umulhi(0xD2511F53u, c0);
        const unsigned int lo0 = 0xD2511F53u * c0;
        const unsigned int hi1 = __umulhi(0xCD9E8D57u, c2);
        const unsigned int lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    uint4_t out = {c0, c1, c2, c3};
    return out;
}

// A uniform float in [0, 1) from 32 random bits (24 of them: exact in fp32).
__device__ __forceinline__ float uniform(unsigned int bits) {
    return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

// Dropout's keep decision for element `index` (row * hidden + column, 64-bit) of the call keyed
// by `seed`: kept with probability 1 - p. A forward, its backward and a `dropout_mask` kernel
// that call it with the same (seed, index) agree bit for bit, so nothing but the seed is saved.
__device__ __forceinline__ bool dropout_keep(unsigned long long seed, unsigned long long index,
                                             float p) {
    return uniform(philox(seed, index).x) >= p;
}
