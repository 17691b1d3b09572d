// Causal grouped-query attention: a tiled prefill kernel and a split-key (flash-decoding)
// single-query decode kernel with its merge.
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

// An online-softmax state as a record of D + 2 floats: the accumulator [D], then m, then l.
// Merging records rescales each to the overall max M:
//   out[d] = sum_r acc_r[d] exp(m_r - M) / sum_r l_r exp(m_r - M)
// (a record that saw no key has m = -inf, l = 0, acc = 0 and adds exp(-inf) = 0).
__device__ __forceinline__ void store_record(float* record, const float acc[MAX_DIMS_PER_LANE], float m, float l,
                                             int head_dim) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < MAX_DIMS_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) record[d] = acc[i];
    }
    if (lane == 0) { record[head_dim] = m; record[head_dim + 1] = l; }
}

// The weight of a record whose max is m in a merge whose overall max is m_all.  A record
// that saw no key (m = -inf) weighs 0, even when no record saw one (m_all = -inf too).
__device__ __forceinline__ float record_weight(float m, float m_all) { return m == NEG_INF ? 0.0f : expf(m - m_all); }

// `count` records, `head_dim + 2` floats apart, merged by the block's threads.  normalise:
// out [D] = the attention output, acc / l; otherwise out [D + 2] = the merged record (acc, m, l).
__device__ void merge_records(const float* records, int count, int head_dim, float* out, bool normalise) {
    const int width = head_dim + 2;
    float m_all = NEG_INF;
    for (int r = 0; r < count; ++r) m_all = fmaxf(m_all, records[r * width + head_dim]);
    float l_all = 0.0f;
    for (int r = 0; r < count; ++r) l_all += records[r * width + head_dim + 1] * record_weight(records[r * width + head_dim], m_all);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float total = 0.0f;
        for (int r = 0; r < count; ++r) total += records[r * width + d] * record_weight(records[r * width + head_dim], m_all);
        out[d] = normalise ? total / l_all : total;
    }
    if (!normalise && threadIdx.x == 0) { out[head_dim] = m_all; out[head_dim + 1] = l_all; }
}

// Decode (flash-decoding): one new token per sequence (T = 1) at position keys - 1, attending
// to all `keys` cached positions.  The keys are split into gridDim.x chunks of
// ceil(keys / gridDim.x): grid (splits, heads, B), so even at batch 1 a long cache spreads
// over many blocks.  In a block each warp runs the online softmax over every warps-th key of
// its chunk; the warps' records are merged through shared memory (dynamic: warps * (D + 2)
// floats).  With one split the block writes the output; with more it writes its merged record
// (acc, m, l) to partial [B, heads, splits, D + 2] and attention_decode_merge combines them.
// position, when not null, holds the new token's position on the device and overrides
// `keys` (= position + 1): the CUDA-graph decode, whose arguments are fixed at capture.
extern "C" __global__ void attention_decode(const float* __restrict__ q, const float* __restrict__ k,
                                            const float* __restrict__ v, float* __restrict__ partial,
                                            float* __restrict__ out, int heads, int kv_heads, int head_dim,
                                            long q_row_stride, long kv_batch_stride, long kv_head_stride, int keys,
                                            const int* __restrict__ position, float scale) {
    extern __shared__ float records[];  // [warps][D + 2]
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int split = blockIdx.x, head = blockIdx.y, b = blockIdx.z;
    const float* kb = k + b * kv_batch_stride + (long)(head / (heads / kv_heads)) * kv_head_stride;
    const float* vb = v + (kb - k);
    if (position != nullptr) keys = position[0] + 1;
    const int per_split = (keys + gridDim.x - 1) / gridDim.x;
    const int first = split * per_split, last = min(keys, first + per_split);  // this block's keys (maybe none)

    float qv[MAX_DIMS_PER_LANE], acc[MAX_DIMS_PER_LANE];
    load_query(qv, acc, q + (long)b * q_row_stride + (long)head * head_dim, head_dim, true);
    float m = NEG_INF, l = 0.0f;
    for (int s = first + warp; s < last; s += warps)
        online_softmax_step(qv, acc, m, l, kb + (long)s * head_dim, vb + (long)s * head_dim, head_dim, scale);
    store_record(records + warp * (head_dim + 2), acc, m, l, head_dim);
    __syncthreads();

    const long head_row = (long)b * heads + head;  // (b, head): the output row, and the splits' row in partial
    if (gridDim.x == 1) merge_records(records, warps, head_dim, out + head_row * head_dim, true);
    else merge_records(records, warps, head_dim, partial + (head_row * gridDim.x + split) * (head_dim + 2), false);
}

// The splits' records of attention_decode merged into the output: grid (heads, B), the
// block's threads over the head's dims.  partial [B, heads, splits, D + 2] -> out [B, heads, D].
extern "C" __global__ void attention_decode_merge(const float* __restrict__ partial, float* __restrict__ out,
                                                  int heads, int head_dim, int splits) {
    const long head_row = (long)blockIdx.y * heads + blockIdx.x;
    merge_records(partial + head_row * splits * (head_dim + 2), splits, head_dim, out + head_row * head_dim, true);
}
