// Rotary position embedding on q and k, in place, rotate-half layout -- and the new keys
// and values stored into the KV cache in the same pass.
//
// Replaces minimoe.layers.apply_rope (x * cos + rotate_half(x) * sin) for q and k, and
// minimoe.model.KVCache.update (copying the step's k and v after the cached positions).
// Rotate-half pairs element i with element i + D/2 of the same head (first half with
// second half), NOT neighbours (2i, 2i+1) as in Meta's interleaved layout:
//     out[i]       = x[i] * cos[i]       - x[i + D/2] * sin[i]
//     out[i + D/2] = x[i + D/2] * cos[i + D/2] + x[i] * sin[i + D/2]
// cos/sin are minimoe.layers.rope_tables' [T, D] tables (computed once per forward),
// so the angles round exactly as on the CPU.
#include "common.cuh"

// x: the fused qkv projection's output, rows of `row_stride` floats (row = b * T + t), each
// row `heads` q heads, then `kv_heads` k heads, then `kv_heads` v heads of D floats.
// q and k heads are rotated in place; k (rotated) and v heads are also written to
// k_cache / v_cache at position kv_start + t: element (b, g, s, d) at
// b * kv_batch_stride + g * kv_head_stride + s * D + d (the cache's [B, kv_heads, capacity, D]).
// position, when not null, holds kv_start on the device (the CUDA-graph decode, whose
// arguments are fixed at capture) and overrides it.  The host checks the capacity.
// One thread per (row, head, pair i < D/2).
extern "C" __global__ void rope_store_kv(float* __restrict__ x, const float* __restrict__ cos,
                                         const float* __restrict__ sin, float* __restrict__ k_cache,
                                         float* __restrict__ v_cache, long rows, int tokens, int heads, int kv_heads,
                                         int head_dim, long row_stride, long kv_batch_stride, long kv_head_stride,
                                         int kv_start, const int* __restrict__ position) {
    const int half = head_dim / 2, all_heads = heads + 2 * kv_heads;
    if (position != nullptr) kv_start = position[0];
    const long index = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= rows * all_heads * half) return;
    const int i = index % half;
    const int head = (index / half) % all_heads;
    const long row = index / ((long)half * all_heads);
    const int t = row % tokens;  // position within the new tokens: the table's row
    float* vec = x + row * row_stride + (long)head * head_dim;  // this head's D floats
    float first = vec[i], second = vec[i + half];
    if (head < heads + kv_heads) {  // q or k: rotate
        const float* c = cos + (long)t * head_dim;
        const float* s = sin + (long)t * head_dim;
        const float rotated_first = first * c[i] - second * s[i];
        second = second * c[i + half] + first * s[i + half];
        first = rotated_first;
        vec[i] = first;
        vec[i + half] = second;
    }
    if (head >= heads) {  // k or v: store after the cached positions
        const bool is_key = head < heads + kv_heads;
        const int g = head - heads - (is_key ? 0 : kv_heads);
        float* cache = (is_key ? k_cache : v_cache) + (row / tokens) * kv_batch_stride + g * kv_head_stride
                       + (long)(kv_start + t) * head_dim;
        cache[i] = first;
        cache[i + half] = second;
    }
}
