// Causal grouped-query attention: a tiled prefill kernel and a single-query decode kernel.
//
// Replaces minimoe.layers.causal_attention:  softmax(q k^T / sqrt(D), causal) v, float32.
// Both use the online softmax (a running max m, a running sum l, and an accumulator
// rescaled by exp(m_old - m_new) whenever the max grows), so the [T, S] score matrix
// is never stored.  Query head h reads key/value head h / (heads / kv_heads): the
// grouping is in the index arithmetic, k and v are never repeated.
//
// Layouts (all float32):
//   q   [B, T, heads, D] rows of `q_row_stride` floats (row = b * T + t), so q can be read
//       straight out of the fused qkv projection's output;
//   k,v [B, kv_heads, S.., D]: element (b, g, s, d) at b * kv_batch_stride + g * kv_head_stride
//       + s * D + d (the KV cache's preallocated [B, kv_heads, capacity, D] buffers);
//   out [B, T, heads, D] contiguous, i.e. [B, T, heads * D], what o_proj takes.
// A query at position p = query_start + t sees keys 0 .. p.
#include "common.cuh"

#define MAX_DIMS_PER_LANE 8  // head_dim <= 256: lane owns dims lane, lane + 32, ...

// A warp's query in registers: lane holds dims lane, lane + 32, ... of `query` (D floats;
// zeros when the warp has no query), and an accumulator of the same shape, zeroed.
__device__ __forceinline__ void load_query(float qv[MAX_DIMS_PER_LANE], float acc[MAX_DIMS_PER_LANE],
                                           const float* query, int head_dim, bool valid) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < MAX_DIMS_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        qv[i] = (valid && d < head_dim) ? query[d] : 0.0f;
        acc[i] = 0.0f;
    }
}

// One key of the online softmax, for the whole warp: score = q . key * scale, then the
// running max m, sum l and accumulator are rescaled to the new max and `value` added.
__device__ __forceinline__ void online_softmax_step(const float qv[MAX_DIMS_PER_LANE], float acc[MAX_DIMS_PER_LANE],
                                                    float& m, float& l, const float* key, const float* value,
                                                    int head_dim, float scale) {
    const int lane = threadIdx.x % 32;
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < MAX_DIMS_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) dot += qv[i] * key[d];
    }
    const float score = warp_sum(dot) * scale;
    const float m_new = fmaxf(m, score);
    const float correction = expf(m - m_new), weight = expf(score - m_new);  // exp(-inf) = 0 on the first key
    l = l * correction + weight;
#pragma unroll
    for (int i = 0; i < MAX_DIMS_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) acc[i] = acc[i] * correction + weight * value[d];
    }
    m = m_new;
}

// Prefill: grid (ceil(T / warps), heads, B), one warp per query; the block's warps share
// each tile of `key_tile` keys and values staged in dynamic shared memory
// (2 * key_tile * D floats).
extern "C" __global__ void attention_prefill(const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, float* __restrict__ out,
                                             int tokens, int heads, int kv_heads, int head_dim, long q_row_stride,
                                             long kv_batch_stride, long kv_head_stride, int query_start,
                                             int key_tile, float scale) {
    extern __shared__ float tiles[];
    float* k_tile = tiles;
    float* v_tile = tiles + key_tile * head_dim;
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int head = blockIdx.y, b = blockIdx.z;
    const int t = blockIdx.x * warps + threadIdx.x / 32;
    const bool valid = t < tokens;  // idle warps still help stage tiles and reach every barrier
    const int position = query_start + t;
    const int last_key = query_start + min(tokens - 1, (int)(blockIdx.x + 1) * warps - 1);  // block's furthest query
    const float* kb = k + b * kv_batch_stride + (long)(head / (heads / kv_heads)) * kv_head_stride;
    const float* vb = v + (kb - k);

    float qv[MAX_DIMS_PER_LANE], acc[MAX_DIMS_PER_LANE];
    load_query(qv, acc, q + ((long)b * tokens + t) * q_row_stride + (long)head * head_dim, head_dim, valid);
    float m = NEG_INF, l = 0.0f;

    for (int key0 = 0; key0 <= last_key; key0 += key_tile) {
        const int keys = min(key_tile, last_key + 1 - key0);
        __syncthreads();  // the previous tile is no longer read
        for (int i = threadIdx.x; i < keys * head_dim; i += blockDim.x) {
            k_tile[i] = kb[(long)key0 * head_dim + i];
            v_tile[i] = vb[(long)key0 * head_dim + i];
        }
        __syncthreads();
        if (!valid) continue;
        for (int j = 0; j < keys && key0 + j <= position; ++j)
            online_softmax_step(qv, acc, m, l, k_tile + j * head_dim, v_tile + j * head_dim, head_dim, scale);
    }
    if (!valid) return;
#pragma unroll
    for (int i = 0; i < MAX_DIMS_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) out[(((long)b * tokens + t) * heads + head) * head_dim + d] = acc[i] / l;
    }
}

// Decode: one new token per sequence (T = 1) at position keys - 1, attending to all
// `keys` cached positions.  grid (heads, B); each of the block's warps runs the online
// softmax over every warps-th key, then the warps' partial (m, l, acc) are merged
// through shared memory (dynamic: warps * (D + 2) floats).
extern "C" __global__ void attention_decode(const float* __restrict__ q, const float* __restrict__ k,
                                            const float* __restrict__ v, float* __restrict__ out,
                                            int heads, int kv_heads, int head_dim, long q_row_stride,
                                            long kv_batch_stride, long kv_head_stride, int keys, float scale) {
    extern __shared__ float partial[];  // [warps][D] accumulators, then [warps] m, then [warps] l
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int head = blockIdx.x, b = blockIdx.y;
    const float* kb = k + b * kv_batch_stride + (long)(head / (heads / kv_heads)) * kv_head_stride;
    const float* vb = v + (kb - k);

    float qv[MAX_DIMS_PER_LANE], acc[MAX_DIMS_PER_LANE];
    load_query(qv, acc, q + (long)b * q_row_stride + (long)head * head_dim, head_dim, true);
    float m = NEG_INF, l = 0.0f;
    for (int s = warp; s < keys; s += warps)
        online_softmax_step(qv, acc, m, l, kb + (long)s * head_dim, vb + (long)s * head_dim, head_dim, scale);

    float* accs = partial;
    float* ms = partial + warps * head_dim;
    float* ls = ms + warps;
#pragma unroll
    for (int i = 0; i < MAX_DIMS_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) accs[warp * head_dim + d] = acc[i];
    }
    if (lane == 0) { ms[warp] = m; ls[warp] = l; }
    __syncthreads();
    // Merge: every warp's partial rescaled to the overall max (a warp with no keys has
    // m = -inf, l = 0 and contributes exp(-inf) = 0).
    float m_all = NEG_INF;
    for (int w = 0; w < warps; ++w) m_all = fmaxf(m_all, ms[w]);
    float l_all = 0.0f;
    for (int w = 0; w < warps; ++w) l_all += ls[w] * expf(ms[w] - m_all);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float total = 0.0f;
        for (int w = 0; w < warps; ++w) total += accs[w * head_dim + d] * expf(ms[w] - m_all);
        out[((long)b * heads + head) * head_dim + d] = total / l_all;
    }
}
