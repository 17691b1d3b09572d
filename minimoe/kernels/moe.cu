// MoE dispatch and combine: group the (token, expert) assignments by expert, and add
// the experts' weighted outputs back to their tokens.
//
// Replaces the bookkeeping of minimoe.layers.routed_experts (argsort by expert, bincount,
// h[rows], out[rows] += y * w); minimoe.gpu.launch.dispatch_plan / combine are the NumPy
// mirrors the tests hold these to.  Assignment `slot = token * k + j` is token's j-th choice.
#include "common.cuh"

#define DISPATCH_CHUNK 1024

// One block of at least `experts` threads (<= 1024); thread e owns expert e.
// expert_ids [slots] -> counts [experts], offsets [experts + 1] (exclusive prefix sum),
// perm [slots] (perm[p] = the slot at permuted position p: expert 0's slots first, each
// expert's in slot order, as a stable argsort), inv_perm [slots] (inv_perm[slot] = p),
// rows [slots] (rows[p] = perm[p] / top_k, the token each permuted row reads), active [experts]
// (the experts with tokens, ascending) and num_active [1].
// Each thread scans all slots (chunks staged in shared memory, so the reads are
// shared): O(experts * slots) work, deterministic and stable without atomics; a few
// microseconds at prefill sizes.
extern "C" __global__ void moe_dispatch(const int* __restrict__ expert_ids, int slots, int experts, int top_k,
                                        int* __restrict__ counts, int* __restrict__ offsets, int* __restrict__ perm,
                                        int* __restrict__ inv_perm, int* __restrict__ rows, int* __restrict__ active,
                                        int* __restrict__ num_active) {
    __shared__ int chunk[DISPATCH_CHUNK];
    __shared__ int start[1024 + 1];
    const int e = threadIdx.x;

    int count = 0;  // pass 1: how many slots chose expert e
    for (int base = 0; base < slots; base += DISPATCH_CHUNK) {
        __syncthreads();
        for (int i = threadIdx.x; i < DISPATCH_CHUNK && base + i < slots; i += blockDim.x) chunk[i] = expert_ids[base + i];
        __syncthreads();
        const int n = min(DISPATCH_CHUNK, slots - base);
        if (e < experts) for (int i = 0; i < n; ++i) count += chunk[i] == e;
    }
    if (e < experts) { counts[e] = count; start[e + 1] = count; }
    __syncthreads();
    if (threadIdx.x == 0) {  // the prefix sum: `experts` additions, not worth a parallel scan
        start[0] = 0;
        int used = 0;
        for (int x = 0; x < experts; ++x) {
            if (start[x + 1] > 0) active[used++] = x;
            start[x + 1] += start[x];
            offsets[x] = start[x];
        }
        offsets[experts] = start[experts];
        num_active[0] = used;
    }
    int position = 0;  // pass 2: write expert e's slots, in slot order, from start[e]
    for (int base = 0; base < slots; base += DISPATCH_CHUNK) {
        __syncthreads();
        for (int i = threadIdx.x; i < DISPATCH_CHUNK && base + i < slots; i += blockDim.x) chunk[i] = expert_ids[base + i];
        __syncthreads();
        const int n = min(DISPATCH_CHUNK, slots - base);
        if (e < experts) {
            for (int i = 0; i < n; ++i) {
                if (chunk[i] == e) {
                    const int p = start[e] + position++;
                    perm[p] = base + i;
                    inv_perm[base + i] = p;
                    rows[p] = (base + i) / top_k;
                }
            }
        }
    }
}

// out[t] = residual[t] + sum_j weights[t, j] * expert_out[inv_perm[t * k + j]]
//          + sigmoid(shared_gate[t]) * shared[t]
// expert_out [slots, hidden] in permuted order; weights [tokens, k]; residual, shared
// [tokens, hidden] and shared_gate [tokens] (the shared expert gate's logit) may each be
// null.  Each token sums its own k terms in order: no atomics, deterministic.
// One thread per (token, column).
extern "C" __global__ void moe_combine(const float* __restrict__ expert_out, const int* __restrict__ inv_perm,
                                       const float* __restrict__ weights, const float* __restrict__ residual,
                                       const float* __restrict__ shared, const float* __restrict__ shared_gate,
                                       float* __restrict__ out, int tokens, int top_k, int hidden) {
    const long index = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (long)tokens * hidden) return;
    const long t = index / hidden;
    const int c = index % hidden;
    float routed = 0.0f;
    for (int j = 0; j < top_k; ++j) {
        const long slot = t * top_k + j;
        routed += weights[slot] * expert_out[(long)inv_perm[slot] * hidden + c];
    }
    float value = routed;
    if (shared != nullptr) value += shared[index] * (1.0f / (1.0f + expf(-shared_gate[t])));
    if (residual != nullptr) value = residual[index] + value;
    out[index] = value;
}
