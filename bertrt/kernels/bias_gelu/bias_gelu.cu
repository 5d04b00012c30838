// BiasGelu: out = gelu(x + bias), the exact erf form or the tanh approximation, forward and
// backward. x is (rows, hidden) row-major and contiguous, bias (hidden,).
//
// Types: TX (x, and dx), TB (bias), TO (out, and the incoming gradient): float, bf16_t or
// f16_t, computed in fp32. The backward recomputes x + bias; nothing else is saved.
#include "common.cuh"

// VEC consecutive elements, loaded and stored as one aligned access (the host checks the
// alignment and that VEC divides hidden; VEC = 1 otherwise).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
    T v[VEC];
};

__device__ __forceinline__ float gelu_erf(float y) {
    return 0.5f * y * (1.0f + erff(y * 0.70710678118654752f));
}

// d/dy [y Phi(y)] = Phi(y) + y phi(y)
__device__ __forceinline__ float gelu_erf_grad(float y) {
    const float cdf = 0.5f * (1.0f + erff(y * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * y * y);
    return cdf + y * pdf;
}

constexpr float GELU_TANH_K = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float GELU_TANH_A = 0.044715f;

__device__ __forceinline__ float gelu_tanh(float y) {
    return 0.5f * y * (1.0f + tanhf(GELU_TANH_K * (y + GELU_TANH_A * y * y * y)));
}

// with t = tanh(k (y + a y^3)): 0.5 (1 + t) + 0.5 y (1 - t^2) k (1 + 3 a y^2)
__device__ __forceinline__ float gelu_tanh_grad(float y) {
    const float t = tanhf(GELU_TANH_K * (y + GELU_TANH_A * y * y * y));
    return 0.5f * (1.0f + t)
           + 0.5f * y * (1.0f - t * t) * GELU_TANH_K * (1.0f + 3.0f * GELU_TANH_A * y * y);
}

// Grid-stride over groups of VEC elements; `n` elements in all (a multiple of VEC).
template <typename TX, typename TB, typename TO, int VEC>
__global__ void bias_gelu_forward(const TX* __restrict__ x, const TB* __restrict__ bias,
                                  TO* __restrict__ out, long long n, long long hidden,
                                  int tanh_form) {
    const long long groups = n / VEC;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         i < groups; i += stride) {
        const long long e = i * VEC;
        const long long c = e % hidden;  // VEC divides hidden: the group is in one row
        const Pack<TX, VEC> in = *reinterpret_cast<const Pack<TX, VEC>*>(x + e);
        Pack<TO, VEC> result;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const float y = to_float(in.v[k]) + to_float(bias[c + k]);
            result.v[k] = from_float<TO>(tanh_form ? gelu_tanh(y) : gelu_erf(y));
        }
        *reinterpret_cast<Pack<TO, VEC>*>(out + e) = result;
    }
}

// dx = dy * gelu'(x + bias); dbias = column sums of dx, left as fp32 partials (gridDim.y,
// hidden) that the host sums in a fixed order. Threads run along columns (coalesced), block
// row y over rows y, y + gridDim.y, ...; no block-level sync, so surplus threads just leave.
template <typename TX, typename TB, typename TO>
__global__ void bias_gelu_backward(const TO* __restrict__ dy, const TX* __restrict__ x,
                                   const TB* __restrict__ bias, TX* __restrict__ dx,
                                   float* __restrict__ dbias_part, long long rows,
                                   long long hidden, int tanh_form) {
    const long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= hidden) return;
    const float b = to_float(bias[c]);
    float acc = 0.0f;
    for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
        const long long e = row * hidden + c;
        const float y = to_float(x[e]) + b;
        const float d = to_float(dy[e]) * (tanh_form ? gelu_tanh_grad(y) : gelu_erf_grad(y));
        dx[e] = from_float<TX>(d);
        acc += d;
    }
    dbias_part[static_cast<long long>(blockIdx.y) * hidden + c] = acc;
}

#ifdef BERTRT_NVCC_CHECK
// nvcc compiles a template's body only when instantiated: one dtype throughout, and bf16 /
// fp16 activations with an fp32 bias (autocast), in both vector widths.
#define BIAS_GELU_INSTANCE(TX, TB, TO)                                                        \
    template __global__ void bias_gelu_forward<TX, TB, TO, 1>(const TX*, const TB*, TO*,      \
                                                              long long, long long, int);     \
    template __global__ void bias_gelu_forward<TX, TB, TO, 4>(const TX*, const TB*, TO*,      \
                                                              long long, long long, int);     \
    template __global__ void bias_gelu_backward<TX, TB, TO>(const TO*, const TX*, const TB*,  \
                                                            TX*, float*, long long, long long, \
                                                            int);
BIAS_GELU_INSTANCE(float, float, float)
BIAS_GELU_INSTANCE(bf16_t, bf16_t, bf16_t)
BIAS_GELU_INSTANCE(f16_t, f16_t, f16_t)
BIAS_GELU_INSTANCE(bf16_t, float, float)
BIAS_GELU_INSTANCE(f16_t, float, float)
#undef BIAS_GELU_INSTANCE
#endif
