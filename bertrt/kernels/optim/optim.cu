// Multi-tensor AdamW and LAMB: every parameter of a group in a few launches.
//
// A launch takes device tables of int64 (built per step by kernel.py, copied in one transfer):
//   tensors  [6 * n]: for each of n tensors its parameter, gradient, exp_avg, exp_avg_sq and
//                     step addresses, then its element count (role-major: all parameters first)
//   chunks   [2 * c]: for each of c chunks its tensor's index, then its first element
// and block b updates elements [start, min(start + chunk_size, numel)) of one tensor. Parameters
// and gradients are T (float, bf16_t or f16_t); exp_avg, exp_avg_sq and step are fp32. The
// arithmetic is fp32.
//
// Mixed precision (torch.amp.GradScaler): `grad_scale` (or null) divides every gradient;
// `found_inf` (or null) non-zero makes every kernel return before writing, so a step with inf
// or NaN gradients changes nothing, the step counts included, with no host synchronisation.
//
// The step of tensor k is t = steps[k] + 1 throughout a step; `advance_steps` stores it last.
// Bias corrections 1 - beta^t are computed as -expm1(t * log(beta)) with log(beta) from the
// host in double precision: 1 - 0.999f^t directly would carry the 1e-8 error of 0.999 in fp32
// as a relative 1e-5 at t = 1.
#include "common.cuh"

enum Role { kParam = 0, kGrad = 1, kExpAvg = 2, kExpAvgSq = 3, kStep = 4, kNumel = 5 };

template <typename P>
__device__ __forceinline__ P* address(const long long* tensors, long long n, Role role,
                                      long long k) {
    return reinterpret_cast<P*>(tensors[role * n + k]);
}

__device__ __forceinline__ bool skipped(const float* found_inf) {
    return found_inf != nullptr && *found_inf != 0.0f;
}

// LAMB's update before the trust ratio: Adam's bias-corrected m / (sqrt(v) + eps), plus
// decoupled weight decay. One function for both phases, so the norms measure what is applied.
__device__ __forceinline__ float lamb_update(float m, float v, float w, float bc1, float bc2,
                                             float eps, float weight_decay) {
    return (m / bc1) / (sqrtf(v / bc2) + eps) + weight_decay * w;
}

// torch.optim.AdamW's update (as its fused CUDA kernel orders it), one chunk per block:
//   w -= lr * wd * w;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   w -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
template <typename T>
__global__ void adamw_step(const long long* __restrict__ tensors, long long n,
                           const long long* __restrict__ chunks, long long n_chunks,
                           long long chunk_size, float lr, float beta1, float beta2,
                           float one_minus_beta1, float one_minus_beta2, float log_beta1,
                           float log_beta2, float eps, float weight_decay,
                           const float* grad_scale, const float* found_inf) {
    if (skipped(found_inf)) return;
    const long long chunk = blockIdx.x;
    const long long k = chunks[chunk];
    const long long begin = chunks[n_chunks + chunk];
    const long long numel = tensors[kNumel * n + k];
    const long long end = begin + chunk_size < numel ? begin + chunk_size : numel;
    T* w = address<T>(tensors, n, kParam, k);
    const T* g = address<T>(tensors, n, kGrad, k);
    float* m = address<float>(tensors, n, kExpAvg, k);
    float* v = address<float>(tensors, n, kExpAvgSq, k);
    const float t = *address<float>(tensors, n, kStep, k) + 1.0f;
    const float step_size = lr / -expm1f(t * log_beta1);
    const float bc2_sqrt = sqrtf(-expm1f(t * log_beta2));
    const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float grad = grad_scale != nullptr ? to_float(g[i]) / scale : to_float(g[i]);
        float param = to_float(w[i]);
        param -= lr * weight_decay * param;
        const float mi = beta1 * m[i] + one_minus_beta1 * grad;
        const float vi = beta2 * v[i] + one_minus_beta2 * grad * grad;
        m[i] = mi;
        v[i] = vi;
        param -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        w[i] = from_float<T>(param);
    }
}

// LAMB phase 1: the moments, and with `partials` (2 * n_chunks floats, or null when the group
// takes no trust ratio) the chunk's sums of w^2 and update^2 at [2 chunk] and [2 chunk + 1].
template <typename T>
__global__ void lamb_moments(const long long* __restrict__ tensors, long long n,
                             const long long* __restrict__ chunks, long long n_chunks,
                             long long chunk_size, float beta1, float beta2,
                             float one_minus_beta1, float one_minus_beta2, float log_beta1,
                             float log_beta2, float eps, float weight_decay,
                             const float* grad_scale, const float* found_inf,
                             float* __restrict__ partials) {
    __shared__ float scratch[32];
    if (skipped(found_inf)) return;
    const long long chunk = blockIdx.x;
    const long long k = chunks[chunk];
    const long long begin = chunks[n_chunks + chunk];
    const long long numel = tensors[kNumel * n + k];
    const long long end = begin + chunk_size < numel ? begin + chunk_size : numel;
    const T* w = address<T>(tensors, n, kParam, k);
    const T* g = address<T>(tensors, n, kGrad, k);
    float* m = address<float>(tensors, n, kExpAvg, k);
    float* v = address<float>(tensors, n, kExpAvgSq, k);
    const float t = *address<float>(tensors, n, kStep, k) + 1.0f;
    const float bc1 = -expm1f(t * log_beta1);
    const float bc2 = -expm1f(t * log_beta2);
    const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
    float w_sq = 0.0f, u_sq = 0.0f;
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float grad = grad_scale != nullptr ? to_float(g[i]) / scale : to_float(g[i]);
        const float mi = beta1 * m[i] + one_minus_beta1 * grad;
        const float vi = beta2 * v[i] + one_minus_beta2 * grad * grad;
        m[i] = mi;
        v[i] = vi;
        if (partials != nullptr) {
            const float param = to_float(w[i]);
            const float u = lamb_update(mi, vi, param, bc1, bc2, eps, weight_decay);
            w_sq += param * param;
            u_sq += u * u;
        }
    }
    if (partials == nullptr) return;  // uniform over the block
    w_sq = block_sum(w_sq, scratch);
    u_sq = block_sum(u_sq, scratch);
    if (threadIdx.x == 0) {
        partials[2 * chunk] = w_sq;
        partials[2 * chunk + 1] = u_sq;
    }
}

// LAMB's trust ratios, one block per tensor: ratio[k] = ||w|| / ||update|| from the partial
// sums of its chunks first_chunk[k] .. first_chunk[k + 1] - 1 (a fixed order: deterministic),
// 1 when either norm is 0.
__global__ void lamb_trust_ratios(const long long* __restrict__ first_chunk, long long n,
                                  const float* __restrict__ partials,
                                  const float* found_inf, float* __restrict__ ratio) {
    __shared__ float scratch[32];
    if (skipped(found_inf)) return;
    for (long long k = blockIdx.x; k < n; k += gridDim.x) {
        float w_sq = 0.0f, u_sq = 0.0f;
        for (long long c = first_chunk[k] + threadIdx.x; c < first_chunk[k + 1];
             c += blockDim.x) {
            w_sq += partials[2 * c];
            u_sq += partials[2 * c + 1];
        }
        w_sq = block_sum(w_sq, scratch);
        u_sq = block_sum(u_sq, scratch);
        if (threadIdx.x == 0) {
            ratio[k] = w_sq > 0.0f && u_sq > 0.0f ? sqrtf(w_sq) / sqrtf(u_sq) : 1.0f;
        }
    }
}

// LAMB phase 2: w -= lr * (ratio[k] * update), the update recomputed from the new moments (so
// no buffer of updates is kept); `ratio` null: 1 for every tensor (groups without adapt).
template <typename T>
__global__ void lamb_apply(const long long* __restrict__ tensors, long long n,
                           const long long* __restrict__ chunks, long long n_chunks,
                           long long chunk_size, float lr, float log_beta1, float log_beta2,
                           float eps, float weight_decay, const float* found_inf,
                           const float* __restrict__ ratio) {
    if (skipped(found_inf)) return;
    const long long chunk = blockIdx.x;
    const long long k = chunks[chunk];
    const long long begin = chunks[n_chunks + chunk];
    const long long numel = tensors[kNumel * n + k];
    const long long end = begin + chunk_size < numel ? begin + chunk_size : numel;
    T* w = address<T>(tensors, n, kParam, k);
    const float* m = address<float>(tensors, n, kExpAvg, k);
    const float* v = address<float>(tensors, n, kExpAvgSq, k);
    const float t = *address<float>(tensors, n, kStep, k) + 1.0f;
    const float bc1 = -expm1f(t * log_beta1);
    const float bc2 = -expm1f(t * log_beta2);
    const float trust = ratio != nullptr ? ratio[k] : 1.0f;
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float param = to_float(w[i]);
        const float u = lamb_update(m[i], v[i], param, bc1, bc2, eps, weight_decay);
        w[i] = from_float<T>(param - lr * (u * trust));
    }
}

// The last launch of a step: steps[k] += 1 for the n step counters of `tensors`, unless
// found_inf (torch's fused Adam: the count of a skipped step does not advance).
__global__ void advance_steps(const long long* __restrict__ tensors, long long n,
                              const float* found_inf) {
    if (skipped(found_inf)) return;
    const long long k = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (k < n) *address<float>(tensors, n, kStep, k) += 1.0f;
}

#ifdef BERTRT_NVCC_CHECK
#define BERTRT_INSTANTIATE(T)                                                                  \
    template __global__ void adamw_step<T>(const long long*, long long, const long long*,      \
                                           long long, long long, float, float, float, float,   \
                                           float, float, float, float, float, const float*,    \
                                           const float*);                                      \
    template __global__ void lamb_moments<T>(const long long*, long long, const long long*,    \
                                             long long, long long, float, float, float, float, \
                                             float, float, float, float, const float*,         \
                                             const float*, float*);                            \
    template __global__ void lamb_apply<T>(const long long*, long long, const long long*,      \
                                           long long, long long, float, float, float, float,   \
                                           float, const float*, const float*);
BERTRT_INSTANTIATE(float)
BERTRT_INSTANTIATE(bf16_t)
BERTRT_INSTANTIATE(f16_t)
#undef BERTRT_INSTANTIATE
#endif
