// RMSNorm, alone and fused with the residual add that precedes it.
//
// Replaces minimoe.layers.rms_norm:  x / sqrt(mean(x^2) + eps) * w, statistics in float32.
// One block per row (token); the block's threads stride over the hidden size, then
// one block reduction gives the row's sum of squares.
#include "common.cuh"

// out[row] = rms_norm(x[row]) * weight.   x, out [rows, hidden] float32; weight [hidden].
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight,
                                    float* __restrict__ out, int hidden, float eps) {
    const long row = blockIdx.x;
    const float* xr = x + row * hidden;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) squares += xr[i] * xr[i];
    const float inv_rms = 1.0f / sqrtf(block_sum(squares) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[row * hidden + i] = xr[i] * inv_rms * weight[i];
}

// The decoder layer's `x = x + attended; h = rms_norm(x)` in one pass over the row:
// sum[row] = x[row] + delta[row] (the new residual stream), out[row] = rms_norm(sum[row]) * weight.
// Saves writing the sum and reading it back in a second kernel.
extern "C" __global__ void add_rms_norm(const float* __restrict__ x, const float* __restrict__ delta,
                                        const float* __restrict__ weight, float* __restrict__ sum,
                                        float* __restrict__ out, int hidden, float eps) {
    const long row = blockIdx.x;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float s = x[row * hidden + i] + delta[row * hidden + i];
        sum[row * hidden + i] = s;  // re-read below by this same thread
        squares += s * s;
    }
    const float inv_rms = 1.0f / sqrtf(block_sum(squares) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[row * hidden + i] = sum[row * hidden + i] * inv_rms * weight[i];
}
