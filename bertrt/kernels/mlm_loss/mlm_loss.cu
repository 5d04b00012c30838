// Softmax cross-entropy of the masked rows over the vocabulary, one block per row.
//
// forward: one read of the row. Each thread keeps an online (max, sum of exp(x - max)) over its
// strided elements and the first index of its max; the block combines them into the row's
// log-sum-exp `lse` and the first index of the row's maximum (torch's argmax). Out: the row's
// loss lse - x[label] (fp32), `lse` for the backward, and whether argmax == label.
// backward: a second read, and the gradient (softmax - onehot) * grad_rows[row] written over the
// logits (the caller's contract: the buffer is consumed). Nothing of size (rows, vocab) is
// allocated or kept between the two.
//
// Rows whose label is -100 have loss 0, no hit, and a zero gradient. A label outside [0, vocab)
// gives a NaN loss (the training loop's finite check reports it; a kernel cannot raise).
#include "common.cuh"

enum : long long { kIgnore = -100 };  // the label of a row without a loss

// The smallest `x` over the block, to every thread; `scratch` holds 32 long longs in shared
// memory. As common.cuh's block_max: blockDim.x a multiple of 32, safe to call twice in a row.
__device__ __forceinline__ long long block_min_index(long long x, long long* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) {
        const long long other = __shfl_xor_sync(0xffffffffu, x, offset);
        x = other < x ? other : x;
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0x7fffffffffffffffLL;
    for (int offset = 16; offset > 0; offset >>= 1) {
        const long long other = __shfl_xor_sync(0xffffffffu, x, offset);
        x = other < x ? other : x;
    }
    return x;
}

// logits (rows, vocab) T, labels (rows,) int64 -> loss, lse (rows,) fp32, hit (rows,) bool.
// grid: any number of blocks (they stride over the rows); blockDim.x a multiple of 32.
template <typename T>
__global__ void mlm_loss_forward(const T* __restrict__ logits,
                                 const long long* __restrict__ labels,
                                 float* __restrict__ loss, float* __restrict__ lse,
                                 unsigned char* __restrict__ hit, long long rows,
                                 long long vocab) {
    __shared__ float scratch[32];
    __shared__ long long index_scratch[32];
    // -FLT_MAX rather than -inf: exp(-inf - start) is 0 where exp(-inf - -inf) would be NaN.
    const float start = -3.402823466e38f;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long label = labels[row];
        if (label == kIgnore) {  // uniform over the block: no reduction is skipped by some
            if (threadIdx.x == 0) {
                loss[row] = 0.0f;
                lse[row] = 0.0f;
                hit[row] = 0;
            }
            continue;
        }
        const T* x = logits + row * vocab;
        float m = start, s = 0.0f;
        long long first = vocab;  // the first index of this thread's maximum
        for (long long j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float v = to_float(x[j]);
            if (v > m) {
                s = s * expf(m - v) + 1.0f;
                m = v;
                first = j;
            } else {
                s += expf(v - m);
            }
        }
        const float row_max = block_max(m, scratch);
        const float row_sum = block_sum(m == row_max ? s : s * expf(m - row_max), scratch);
        const long long argmax = block_min_index(m == row_max ? first : vocab, index_scratch);
        if (threadIdx.x == 0) {
            const float row_lse = row_max + logf(row_sum);
            const bool valid = label >= 0 && label < vocab;
            loss[row] = valid ? row_lse - to_float(x[label]) : __int_as_float(0x7fc00000);
            lse[row] = row_lse;
            hit[row] = valid && argmax == label;
        }
    }
}

// grad (rows, vocab) T holds the logits on entry and (softmax - onehot) * grad_rows on exit;
// grad_rows is read at row * grad_stride (0: one upstream gradient for every row).
template <typename T>
__global__ void mlm_loss_backward(T* __restrict__ grad, const long long* __restrict__ labels,
                                  const float* __restrict__ lse,
                                  const float* __restrict__ grad_rows, long long grad_stride,
                                  long long rows, long long vocab) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long label = labels[row];
        T* x = grad + row * vocab;
        if (label == kIgnore) {
            for (long long j = threadIdx.x; j < vocab; j += blockDim.x) x[j] = from_float<T>(0.0f);
            continue;
        }
        const float row_lse = lse[row];
        const float scale = grad_rows[row * grad_stride];
        for (long long j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float p = expf(to_float(x[j]) - row_lse);
            x[j] = from_float<T>((j == label ? p - 1.0f : p) * scale);
        }
    }
}

#ifdef BERTRT_NVCC_CHECK
template __global__ void mlm_loss_forward<float>(const float*, const long long*, float*, float*,
                                                 unsigned char*, long long, long long);
template __global__ void mlm_loss_forward<bf16_t>(const bf16_t*, const long long*, float*,
                                                  float*, unsigned char*, long long, long long);
template __global__ void mlm_loss_forward<f16_t>(const f16_t*, const long long*, float*, float*,
                                                 unsigned char*, long long, long long);
template __global__ void mlm_loss_backward<float>(float*, const long long*, const float*,
                                                  const float*, long long, long long, long long);
template __global__ void mlm_loss_backward<bf16_t>(bf16_t*, const long long*, const float*,
                                                   const float*, long long, long long, long long);
template __global__ void mlm_loss_backward<f16_t>(f16_t*, const long long*, const float*,
                                                  const float*, long long, long long, long long);
#endif
