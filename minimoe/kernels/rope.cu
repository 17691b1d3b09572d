// Rotary position embedding, applied in place, rotate-half layout.
//
// Replaces minimoe.layers.apply_rope (x * cos + rotate_half(x) * sin) for q and k at once.
// Rotate-half pairs element i with element i + D/2 of the same head (first half with
// second half), NOT neighbours (2i, 2i+1) as in Meta's interleaved layout:
//     out[i]       = x[i] * cos[i]       - x[i + D/2] * sin[i]
//     out[i + D/2] = x[i + D/2] * cos[i + D/2] + x[i] * sin[i + D/2]
// cos/sin are minimoe.layers.rope_tables' [T, D] tables (computed once per forward),
// so the angles round exactly as on the CPU.
#include "common.cuh"

// x: rows of `row_stride` floats, row = b * T + t; the first `heads` heads of D floats in
// each row are rotated (the q heads and the k heads are adjacent in the fused qkv
// projection's output, so one launch rotates both).  One thread per (row, head, pair).
extern "C" __global__ void rope_inplace(float* __restrict__ x, const float* __restrict__ cos,
                                        const float* __restrict__ sin, long rows, int tokens, int heads,
                                        int head_dim, long row_stride) {
    const int half = head_dim / 2;
    const long index = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= rows * heads * half) return;
    const int i = index % half;
    const int head = (index / half) % heads;
    const long row = index / ((long)half * heads);
    const int t = row % tokens;  // position within the new tokens: the table's row
    float* v = x + row * row_stride + (long)head * head_dim;
    const float* c = cos + (long)t * head_dim;
    const float* s = sin + (long)t * head_dim;
    const float first = v[i], second = v[i + half];
    v[i] = first * c[i] - second * s[i];
    v[i + half] = second * c[i + half] + first * s[i + half];
}
