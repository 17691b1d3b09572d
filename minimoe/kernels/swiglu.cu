// The SwiGLU activation: silu(gate) * up, elementwise.
//
// Replaces the middle of minimoe.layers.swiglu: silu(gate(x)) * up(x), with
// silu(x) = x / (1 + exp(-x)) as minimoe.layers.silu.  The gate and up projections
// run as one matmul on weights stacked [gate; up], so each input row holds
// [gate (I floats) | up (I floats)].
#include "common.cuh"

// gate_up [rows, 2 * inter] -> out [rows, inter].  One thread per output element.
extern "C" __global__ void silu_mul(const float* __restrict__ gate_up, float* __restrict__ out, long rows, int inter) {
    const long index = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= rows * inter) return;
    const long row = index / inter;
    const int i = index % inter;
    const float gate = gate_up[row * 2 * inter + i], up = gate_up[row * 2 * inter + inter + i];
    out[index] = gate / (1.0f + expf(-gate)) * up;
}
