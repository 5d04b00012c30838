// EmbedLayerNorm: out = dropout(LayerNorm(word[id] + position[s] + token_type[type])) per
// token, forward and the LayerNorm part of the backward.
//
// Rows are the B * S tokens of a (B, S) batch, row r at position s = r % S. Block layout as in
// skip_layer_norm.cu: one block per row, thread t holds columns t + k * blockDim (k < 4), so
// hidden <= 4096. The ids are trusted: the caller checks them against the tables (the torch
// lowering does, `LoweredModule.check_inputs`); an out-of-range id would read outside a table.
//
// Types: TT (the three tables), TP (LayerNorm weight and bias), TO (out and the incoming
// gradient): float, bf16_t or f16_t, computed in fp32. Nothing is saved but (mean, rstd) per
// row: the backward re-gathers the embeddings sum from the tables (three row reads).
//
// Dropout: output element (r, c) is kept iff dropout_keep(seed, r * hidden + c, p).
#include "common.cuh"

constexpr int LN_COLS = 4;  // columns per thread

// The three table rows that token `row` sums (word[id], position[row % seq], token_type[type]).
template <typename TT>
struct TableRows {
    const TT* word;
    const TT* position;
    const TT* token_type;

    __device__ __forceinline__ TableRows(const long long* __restrict__ ids,
                                         const long long* __restrict__ types, const TT* word_table,
                                         const TT* position_table, const TT* type_table,
                                         long long row, long long seq, long long hidden)
        : word(word_table + ids[row] * hidden),
          position(position_table + (row % seq) * hidden),
          token_type(type_table + (types != nullptr ? types[row] : 0) * hidden) {}

    // The embeddings sum at column c, in fp32.
    __device__ __forceinline__ float sum(long long c) const {
        return to_float(word[c]) + to_float(position[c]) + to_float(token_type[c]);
    }
};

template <typename TT, typename TP, typename TO>
__global__ void embed_layer_norm_forward(
    const long long* __restrict__ ids, const long long* __restrict__ types,  // types may be null
    const TT* __restrict__ word, const TT* __restrict__ position,
    const TT* __restrict__ token_type, const TP* __restrict__ weight,
    const TP* __restrict__ bias, TO* __restrict__ out,
    float* __restrict__ mean_out, float* __restrict__ rstd_out,  // null: not saved (no grad)
    long long seq, long long hidden, float eps, float p, unsigned long long seed) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const long long base = row * hidden;
    const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    const TableRows<TT> tables(ids, types, word, position, token_type, row, seq, hidden);
    float v[LN_COLS];
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < LN_COLS; ++k) {
        const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
        v[k] = c < hidden ? tables.sum(c) : 0.0f;
        total += v[k];
    }
    float mean, rstd;
    row_moments(v, total, hidden, eps, scratch, mean, rstd);
#pragma unroll
    for (int k = 0; k < LN_COLS; ++k) {
        const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
        if (c < hidden) {
            float y = (v[k] - mean) * rstd * to_float(weight[c]) + to_float(bias[c]);
            if (p > 0.0f) y = dropout_keep(seed, base + c, p) ? y * scale : 0.0f;
            out[base + c] = from_float<TO>(y);
        }
    }
    if (mean_out != nullptr && threadIdx.x == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// The backward over rows blockIdx.x, blockIdx.x + gridDim.x, ... With dn = dy * keep / (1 - p)
// (the gradient at LayerNorm's output), x_hat = (sum - mean) * rstd and g = dn * weight:
//   d sum = rstd * (g - mean(g) - x_hat * mean(g * x_hat))  -> dsum (rows, hidden) fp32
//   d weight = sum over rows of dn * x_hat,  d bias = sum of dn  -> fp32 partials per block
// The host turns dsum into the three tables' gradients (deterministic segment sums).
template <typename TT, typename TP, typename TO>
__global__ void embed_layer_norm_backward(
    const TO* __restrict__ dy, const long long* __restrict__ ids,
    const long long* __restrict__ types, const TT* __restrict__ word,
    const TT* __restrict__ position, const TT* __restrict__ token_type,
    const TP* __restrict__ weight, const float* __restrict__ mean,
    const float* __restrict__ rstd, float* __restrict__ dsum,
    float* __restrict__ dweight_part, float* __restrict__ dbias_part,
    long long rows, long long seq, long long hidden, float p, unsigned long long seed) {
    __shared__ float scratch[32];
    const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    const float inv_hidden = 1.0f / static_cast<float>(hidden);
    float w[LN_COLS], acc_w[LN_COLS], acc_b[LN_COLS];
#pragma unroll
    for (int k = 0; k < LN_COLS; ++k) {
        const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
        w[k] = c < hidden ? to_float(weight[c]) : 0.0f;
        acc_w[k] = acc_b[k] = 0.0f;
    }
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = row * hidden;
        const float mu = mean[row];
        const float rs = rstd[row];
        const TableRows<TT> tables(ids, types, word, position, token_type, row, seq, hidden);
        float g[LN_COLS], xh[LN_COLS];
        float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
        for (int k = 0; k < LN_COLS; ++k) {
            const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
            g[k] = xh[k] = 0.0f;
            if (c < hidden) {
                float d = to_float(dy[base + c]);
                if (p > 0.0f) d = dropout_keep(seed, base + c, p) ? d * scale : 0.0f;
                xh[k] = (tables.sum(c) - mu) * rs;
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
            if (c < hidden) dsum[base + c] = rs * (g[k] - mean_g - xh[k] * mean_gx);
        }
    }
    const long long part = static_cast<long long>(blockIdx.x) * hidden;
#pragma unroll
    for (int k = 0; k < LN_COLS; ++k) {
        const long long c = threadIdx.x + static_cast<long long>(k) * blockDim.x;
        if (c < hidden) {
            dweight_part[part + c] = acc_w[k];
            dbias_part[part + c] = acc_b[k];
        }
    }
}

#ifdef BERTRT_NVCC_CHECK
// nvcc compiles a template's body only when instantiated: one dtype throughout, and fp32
// tables and weights with an fp32 output (autocast) or a bf16 / fp16 one.
#define EMBED_LAYER_NORM_INSTANCE(TT, TP, TO)                                                  \
    template __global__ void embed_layer_norm_forward<TT, TP, TO>(                             \
        const long long*, const long long*, const TT*, const TT*, const TT*, const TP*,        \
        const TP*, TO*, float*, float*, long long, long long, float, float,                    \
        unsigned long long);                                                                  \
    template __global__ void embed_layer_norm_backward<TT, TP, TO>(                            \
        const TO*, const long long*, const long long*, const TT*, const TT*, const TT*,        \
        const TP*, const float*, const float*, float*, float*, float*, long long, long long,   \
        long long, float, unsigned long long);
EMBED_LAYER_NORM_INSTANCE(float, float, float)
EMBED_LAYER_NORM_INSTANCE(bf16_t, bf16_t, bf16_t)
EMBED_LAYER_NORM_INSTANCE(f16_t, f16_t, f16_t)
EMBED_LAYER_NORM_INSTANCE(float, float, bf16_t)
#undef EMBED_LAYER_NORM_INSTANCE
#endif
