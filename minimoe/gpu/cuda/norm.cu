// RMSNorm, alone and fused with the residual add that precedes it.
//
// Replaces minimoe.layers.rms_norm:  x / sqrt(mean(x^2) + eps) * w, statistics in float32.
// One block per row (token).  Each thread holds up to NORM_VALUES of the row in registers,
// values threadIdx.x + j * blockDim.x: it issues all its loads before it uses any (one memory
// latency per row, not one per value, which at a decode step's single row is the kernel's
// whole time), then one block reduction gives the row's sum of squares, and the values are
// scaled from the registers (the row is read once).
#include "common.cuh"

#define NORM_VALUES 8  // values of a row per thread: hidden <= NORM_VALUES * 1024

// out_row = v * inv_rms * weight, inv_rms from the block's sum of the squares of its row's values v
// (this thread's NORM_VALUES of them, values threadIdx.x + j * blockDim.x).
__device__ __forceinline__ void write_normed(const float v[NORM_VALUES], float squares, const float* __restrict__ weight,
                                             float* __restrict__ out_row, int hidden, float eps) {
    const float inv_rms = 1.0f / sqrtf(block_sum(squares) / hidden + eps);
#pragma unroll
    for (int j = 0; j < NORM_VALUES; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < hidden) out_row[i] = v[j] * inv_rms * weight[i];
    }
}

// out[row] = rms_norm(x[row]) * weight.   x, out [rows, hidden] float32; weight [hidden].
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight,
                                    float* __restrict__ out, int hidden, float eps) {
    const long row = blockIdx.x;
    float v[NORM_VALUES];
    float squares = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_VALUES; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        v[j] = i < hidden ? x[row * hidden + i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < NORM_VALUES; ++j) squares += v[j] * v[j];
    write_normed(v, squares, weight, out + row * hidden, hidden, eps);
}

// The decoder layer's `x = x + attended; h = rms_norm(x)` in one pass over the row:
// sum[row] = x[row] + delta[row] (the new residual stream), out[row] = rms_norm(sum[row]) * weight.
// Saves writing the sum and reading it back in a second kernel.
extern "C" __global__ void add_rms_norm(const float* __restrict__ x, const float* __restrict__ delta,
                                        const float* __restrict__ weight, float* __restrict__ sum,
                                        float* __restrict__ out, int hidden, float eps) {
    const long row = blockIdx.x;
    float v[NORM_VALUES];
    float squares = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_VALUES; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        v[j] = i < hidden ? x[row * hidden + i] + delta[row * hidden + i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < NORM_VALUES; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < hidden) sum[row * hidden + i] = v[j];
        squares += v[j] * v[j];
    }
    write_normed(v, squares, weight, out + row * hidden, hidden, eps);
}
