// SkipLayerNorm: out = LayerNorm(dropout(x + bias) + skip) over the last axis, forward and
// backward, and the dropout mask a call used (for tests).
//
// Layout: rows of `hidden` columns, row-major, contiguous. One block per row in the forward;
// thread t holds columns t, t + blockDim, t + 2 blockDim, t + 3 blockDim in registers
// (LN_COLS = 4 of them), so blockDim.x = round_up(ceil(hidden / 4), 32) <= 1024 and hidden may
// be anything up to 4096 (odd sizes included). Loads are coalesced across a warp.
//
// Types: TX (x), TS (skip), TP (weight, beta, bias), TO (out and the saved sum): any of float,
// bf16_t, f16_t; every computation is fp32. The pre-norm sum is rounded to TO before the
// statistics are taken, as the unfused graph rounds its residual add, so the backward's
// x_hat = (sum - mean) * rstd uses the very values the forward normalized.
//
// Dropout: element (row, c) is kept iff dropout_keep(seed, row * hidden + c, p); the backward
// regenerates the same decision. p == 0 means no dropout (and no random numbers drawn).
#include "common.cuh"

constexpr int LN_COLS = 4;  // columns per thread

template <typename TX, typename TS, typename TP, typename TO>
__global__ void skip_layer_norm_forward(
    const TX* __restrict__ x, const TS* __restrict__ skip, const TP* __restrict__ weight,
    const TP* __restrict__ beta, const TP* __restrict__ bias,  // bias may be null
    TO* __restrict__ out,
    TO* __restrict__ sum_out,                                   // null: not saved (no grad)
    float* __restrict__ mean_out, float* __restrict__ rstd_out, // null with sum_out
    long long hidden, float eps, float p, unsigned long long seed) {
    __shared__ float scratch[32];
    const long long base = static_cast<long long>(blockIdx.x) * hidden;
    const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    float v[LN_COLS];
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < LN_COLS; ++k) {
        const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
        v[k] = 0.0f;
        if (c < hidden) {
            float a = to_float(x[base + c]);
            if (bias != nullptr) a += to_float(bias[c]);
            if (p > 0.0f) a = dropout_keep(seed, base + c, p) ? a * scale : 0.0f;
            a += to_float(skip[base + c]);
            v[k] = to_float(from_float<TO>(a));
            total += v[k];
        }
    }
    float mean, rstd;  // two passes over the registers (see row_moments)
    row_moments(v, total, hidden, eps, scratch, mean, rstd);
#pragma unroll
    for (int k = 0; k < LN_COLS; ++k) {
        const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
        if (c < hidden) {
            const float y = (v[k] - mean) * rstd * to_float(weight[c]) + to_float(beta[c]);
            out[base + c] = from_float<TO>(y);
            if (sum_out != nullptr) sum_out[base + c] = from_float<TO>(v[k]);
        }
    }
    if (mean_out != nullptr && threadIdx.x == 0) {
        mean_out[blockIdx.x] = mean;
        rstd_out[blockIdx.x] = rstd;
    }
}

// The backward over rows blockIdx.x, blockIdx.x + gridDim.x, ... (block layout as the
// forward's). Per row, with x_hat = (sum - mean) * rstd and g = dy * weight:
//   d sum  = rstd * (g - mean(g) - x_hat * mean(g * x_hat))      -> d skip
//   d x    = d sum * keep / (1 - p)                              -> d x, and d bias = sum of it
//   d weight = sum over rows of dy * x_hat,  d beta = sum of dy
// The three column sums leave as fp32 per-block partials (gridDim.x, hidden), summed on the
// host side in a fixed order: deterministic, no atomics.
template <typename TX, typename TS, typename TP, typename TO>
__global__ void skip_layer_norm_backward(
    const TO* __restrict__ dy, const TO* __restrict__ sum, const float* __restrict__ mean,
    const float* __restrict__ rstd, const TP* __restrict__ weight,
    TX* __restrict__ dx, TS* __restrict__ dskip,
    float* __restrict__ dweight_part, float* __restrict__ dbeta_part,
    float* __restrict__ dbias_part,  // null without a bias
    long long rows, long long hidden, float p, unsigned long long seed) {
    __shared__ float scratch[32];
    const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    const float inv_hidden = 1.0f / static_cast<float>(hidden);
    float w[LN_COLS], acc_w[LN_COLS], acc_b[LN_COLS], acc_bias[LN_COLS];
#pragma unroll
    for (int k = 0; k < LN_COLS; ++k) {
        const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
        w[k] = c < hidden ? to_float(weight[c]) : 0.0f;
        acc_w[k] = acc_b[k] = acc_bias[k] = 0.0f;
    }
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = row * hidden;
        const float mu = mean[row];
        const float rs = rstd[row];
        float g[LN_COLS], xh[LN_COLS];
        float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
        for (int k = 0; k < LN_COLS; ++k) {
            const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
            g[k] = xh[k] = 0.0f;
            if (c < hidden) {
                const float d = to_float(dy[base + c]);
                xh[k] = (to_float(sum[base + c]) - mu) * rs;
                g[k] = d * w[k];
                acc_w[k] += d * xh[k];
                acc_b[k] += d;
                sum_g += g[k];
                sum_gx += g[k] * xh[k];
            }
        }
        const float mean_g = block_sum(sum_g, scratch) * inv_hidden;
        const float mean_gx = block_sum(sum_gx, scratch) * inv_hidden;
#pragma unroll
        for (int k = 0; k < LN_COLS; ++k) {
            const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
            if (c < hidden) {
                const float ds = rs * (g[k] - mean_g - xh[k] * mean_gx);
                dskip[base + c] = from_float<TS>(ds);
                float d = ds;
                if (p > 0.0f) d = dropout_keep(seed, base + c, p) ? ds * scale : 0.0f;
                dx[base + c] = from_float<TX>(d);
                acc_bias[k] += d;
            }
        }
    }
    const long long part = static_cast<long long>(blockIdx.x) * hidden;
#pragma unroll
    for (int k = 0; k < LN_COLS; ++k) {
        const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
        if (c < hidden) {
            dweight_part[part + c] = acc_w[k];
            dbeta_part[part + c] = acc_b[k];
            if (dbias_part != nullptr) dbias_part[part + c] = acc_bias[k];
        }
    }
}

// The keep decisions (1 kept, 0 dropped) of elements 0..n-1 under (seed, p): what a forward
// with this seed applied, for tests that feed the same mask to the reference.
extern "C" __global__ void dropout_mask(unsigned char* __restrict__ out, long long n, float p,
                                        unsigned long long seed) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        out[i] = dropout_keep(seed, i, p) ? 1 : 0;
    }
}

#ifdef BERTRT_NVCC_CHECK
// nvcc compiles a template's body only when instantiated: the instances training uses
// (one dtype throughout; bf16 / fp16 activations with an fp32 residual stream and parameters).
#define SKIP_LAYER_NORM_INSTANCE(TX, TS, TP, TO)                                               \
    template __global__ void skip_layer_norm_forward<TX, TS, TP, TO>(                          \
        const TX*, const TS*, const TP*, const TP*, const TP*, TO*, TO*, float*, float*,       \
        long long, float, float, unsigned long long);                                         \
    template __global__ void skip_layer_norm_backward<TX, TS, TP, TO>(                         \
        const TO*, const TO*, const float*, const float*, const TP*, TX*, TS*, float*, float*, \
        float*, long long, long long, float, unsigned long long);
SKIP_LAYER_NORM_INSTANCE(float, float, float, float)
SKIP_LAYER_NORM_INSTANCE(bf16_t, bf16_t, bf16_t, bf16_t)
SKIP_LAYER_NORM_INSTANCE(f16_t, f16_t, f16_t, f16_t)
SKIP_LAYER_NORM_INSTANCE(bf16_t, float, float, float)
SKIP_LAYER_NORM_INSTANCE(f16_t, float, float, float)
#undef SKIP_LAYER_NORM_INSTANCE
#endif
