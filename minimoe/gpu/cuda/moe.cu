// The MoE block's bookkeeping: the router's choice, the dispatch that groups the (token, expert)
// assignments by expert, and the combine that adds the experts' weighted outputs back to their tokens.
//
// Replaces minimoe.layers.route (without `forced` experts, which fall back to it) and the
// bookkeeping of minimoe.layers.routed_experts (argsort by expert, bincount, h[rows],
// out[rows] += y * w); minimoe.gpu.launch.dispatch_plan / combine are the NumPy mirrors the
// tests hold the dispatch and combine to.  Assignment `slot = token * k + j` is token's j-th choice.
//
// The router's logits may be the first `experts` columns of wider rows (`logits_stride` floats):
// the GPU stacks the shared expert's gate under the router, so one matmul gives both, and the
// gate's logit is each row's last column.
//
// The shared expert as `shared_groups` always-on experts: when its width is a multiple of an
// expert's, the GPU runs it as S more experts, E .. E + S - 1, each a slice of its gate/up rows
// and down columns (minimoe.gpu.blocks).  The router then gives each token k + S slots: its k
// chosen experts, then the S shared groups, weighted by sigmoid(the gate's logit), and the
// dispatch and combine treat them all alike: one grouped matmul runs every expert a token uses.
#include "common.cuh"

// The router's choice per token: softmax over all experts, top-k, optional renormalisation.
//
// As minimoe.layers.route:
//   probs = softmax(logits) over ALL experts, in float32 (a disabled expert's logit is -inf);
//   expert_ids = the k most probable, highest first; among equal probabilities the lower
//     expert id first, both in which experts are chosen and in their order (minimoe's rule:
//     a stable sort of -probs, as layers.route does);
//   raw_weights = their probabilities; weights = raw / sum(raw) if norm_topk_prob else raw.
// A row with no usable logit -- every expert disabled or at -inf, or a NaN or +inf logit --
// gets NaN probabilities, as the NumPy softmax gives it (max - max = NaN), and NaN sorts after
// every number (as in NumPy's sort), so its experts are 0 .. k-1 with NaN weights: the ids
// are always valid, whatever the logits hold.
// One warp per token.  Each lane keeps the probabilities of experts lane, lane + 32, ...
// in registers, so there can be at most 32 * MAX_EXPERTS_PER_LANE experts.
#define MAX_EXPERTS_PER_LANE 8  // up to 256 experts (Qwen1.5-MoE has 60)
#define NAN_KEY (-1.0f)  // a NaN probability's rank: below every probability (all >= 0) ...
#define TAKEN (-2.0f)    // ... and above an expert already chosen (or past the last expert)

// The value the top-k ranks a probability by: NaN compares false with everything, so it gets NAN_KEY.
__device__ __forceinline__ float rank_key(float probability) {
    return is_nan(probability) ? NAN_KEY : probability;
}

// The router's choice for one token, by one warp (every lane calls it with the same token).
// logits: row `token` at token * logits_stride -> logits_used (with -inf for disabled experts),
// probs [tokens, experts], expert_ids / raw_weights / weights [tokens, top_k].  disabled:
// [experts] bytes, nonzero = removed; may be null.
// With shared_groups S, each token's ids and weights are rows of k + S (the shared groups after the
// routed experts), and the gate's logit is column `experts` of the logits.
__device__ void route_token(long token, const float* logits, int logits_stride, float* logits_used, float* probs,
                            int* expert_ids, float* raw_weights, float* weights, const unsigned char* disabled,
                            int experts, int top_k, int shared_groups, int norm_topk_prob) {
    const int lane = threadIdx.x % 32;
    const float* row = logits + token * logits_stride;
    const long slot0 = token * (top_k + shared_groups);  // the token's first slot

    float p[MAX_EXPERTS_PER_LANE];
    float row_max = NEG_INF;
    int nans = 0;
#pragma unroll
    for (int j = 0; j < MAX_EXPERTS_PER_LANE; ++j) {
        const int e = lane + 32 * j;
        p[j] = NEG_INF;
        if (e < experts) {
            p[j] = (disabled != nullptr && disabled[e]) ? NEG_INF : row[e];
            logits_used[token * experts + e] = p[j];
            row_max = fmaxf(row_max, p[j]);  // fmaxf skips NaN ...
            nans += is_nan(p[j]);
        }
    }
    row_max = warp_sum((float)nans) > 0.0f ? NAN_F : warp_max(row_max);  // ... NumPy's max does not
    float total = 0.0f;
#pragma unroll
    for (int j = 0; j < MAX_EXPERTS_PER_LANE; ++j) {
        p[j] = (lane + 32 * j < experts) ? expf(p[j] - row_max) : 0.0f;  // exp(-inf) = 0 for disabled
        total += p[j];
    }
    total = warp_sum(total);
#pragma unroll
    for (int j = 0; j < MAX_EXPERTS_PER_LANE; ++j) {
        const int e = lane + 32 * j;
        p[j] = e < experts ? p[j] / total : TAKEN;  // experts past the end: never chosen
        if (e < experts) probs[token * experts + e] = p[j];
    }

    // k rounds of a warp-wide argmax over rank_key (NaN below every probability, taken below NaN);
    // the winner's owner marks it taken.  top_k <= experts (checked on the host), so every round
    // finds an expert not yet taken and best_expert is always < experts.
    // k rounds of a warp-wide argmax; lane r keeps round r's expert and probability, so the k results are
    // written by k lanes at once, and renormalised from registers (top_k <= 32, checked on the host).
    float chosen_sum = 0.0f, my_probability = 0.0f;
    int my_expert = 0;
    for (int rank = 0; rank < top_k; ++rank) {
        float best = TAKEN;
        int best_expert = experts;
#pragma unroll
        for (int j = 0; j < MAX_EXPERTS_PER_LANE; ++j) {
            if (rank_key(p[j]) > best) { best = rank_key(p[j]); best_expert = lane + 32 * j; }  // j ascending: lower id wins ties
        }
        for (int offset = 16; offset > 0; offset /= 2) {
            const float other = __shfl_xor_sync(FULL_MASK, best, offset);
            const int other_expert = __shfl_xor_sync(FULL_MASK, best_expert, offset);
            if (other > best || (other == best && other_expert < best_expert)) { best = other; best_expert = other_expert; }
        }
        if (best_expert % 32 == lane) {
#pragma unroll
            for (int j = 0; j < MAX_EXPERTS_PER_LANE; ++j) if (lane + 32 * j == best_expert) p[j] = TAKEN;
        }
        const float probability = best == NAN_KEY ? NAN_F : best;
        if (lane == rank) { my_expert = best_expert; my_probability = probability; }
        chosen_sum += probability;
    }
    if (lane < top_k) {
        expert_ids[slot0 + lane] = my_expert;
        raw_weights[slot0 + lane] = my_probability;
        weights[slot0 + lane] = norm_topk_prob ? my_probability / chosen_sum : my_probability;
    }
    if (shared_groups > 0) {  // the logits then hold the shared expert gate's in column `experts`
        const float gate = 1.0f / (1.0f + expf(-row[experts]));  // its sigmoid, as moe_combine takes it
        for (int s = lane; s < shared_groups; s += 32) {
            expert_ids[slot0 + top_k + s] = experts + s;
            raw_weights[slot0 + top_k + s] = weights[slot0 + top_k + s] = gate;
        }
    }
}

// One warp per token (blocks of ROUTER_WARPS warps): route_token for every token.
extern "C" __global__ void route_topk(const float* __restrict__ logits, int logits_stride, float* __restrict__ logits_used,
                                      float* __restrict__ probs, int* __restrict__ expert_ids,
                                      float* __restrict__ raw_weights, float* __restrict__ weights,
                                      const unsigned char* __restrict__ disabled, int tokens, int experts, int top_k,
                                      int shared_groups, int norm_topk_prob) {
    const long token = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (token >= tokens) return;  // the whole warp leaves together
    route_token(token, logits, logits_stride, logits_used, probs, expert_ids, raw_weights, weights, disabled, experts,
                top_k, shared_groups, norm_topk_prob);
}

// ---- the dispatch and the combine ----

#define DISPATCH_CHUNK 1024
#define COMBINE_SLOTS 16  // slots per token moe_combine holds in registers (k + shared groups; more: a loop)

// One block of at least `experts` threads (<= 1024); thread e owns expert e.
// expert_ids [slots] -> counts [experts], offsets [experts + 1] (exclusive prefix sum),
// perm [slots] (perm[p] = the slot at permuted position p: expert 0's slots first, each
// expert's in slot order, as a stable argsort), inv_perm [slots] (inv_perm[slot] = p),
// rows [slots] (rows[p] = perm[p] / top_k, the token each permuted row reads), active [experts]
// (the experts with tokens, ascending) and num_active [1].
// Each thread scans all slots (chunks staged in shared memory, so the reads are
// shared): O(experts * slots) work, deterministic and stable without atomics; a few
// microseconds at prefill sizes.
// expert_ids is read without __restrict__: route_dispatch writes it in the same launch, and a
// read-only (non-coherent) cached load could miss those writes.
__device__ void dispatch_slots(const int* expert_ids, int slots, int experts, int top_k, int* __restrict__ counts,
                               int* __restrict__ offsets, int* __restrict__ perm, int* __restrict__ inv_perm,
                               int* __restrict__ rows, int* __restrict__ active, int* __restrict__ num_active) {
    __shared__ int chunk[DISPATCH_CHUNK];
    __shared__ int count_of[1024], start[1024];  // per expert: its slots, and its first permuted position
    const int e = threadIdx.x;

    int count = 0;  // pass 1: how many slots chose expert e
    for (int base = 0; base < slots; base += DISPATCH_CHUNK) {
        __syncthreads();
        for (int i = threadIdx.x; i < DISPATCH_CHUNK && base + i < slots; i += blockDim.x) chunk[i] = expert_ids[base + i];
        __syncthreads();
        const int n = min(DISPATCH_CHUNK, slots - base);
        if (e < experts) for (int i = 0; i < n; ++i) count += chunk[i] == e;
    }
    if (e < experts) { counts[e] = count; count_of[e] = count; }
    __syncthreads();
    if (threadIdx.x < 32) {  // the prefix sum and the active list, by one warp: lane l takes a run of experts
        const int lane = threadIdx.x, per_lane = (experts + 31) / 32, e0 = lane * per_lane;
        int slots_before = 0, active_before = 0;  // in this lane's run
        for (int x = e0; x < min(experts, e0 + per_lane); ++x) {
            slots_before += count_of[x];
            active_before += count_of[x] > 0;
        }
        int position = warp_exclusive_sum(slots_before), used = warp_exclusive_sum(active_before);
        for (int x = e0; x < min(experts, e0 + per_lane); ++x) {
            start[x] = offsets[x] = position;
            if (count_of[x] > 0) active[used++] = x;
            position += count_of[x];
        }
        if (lane == 31) { offsets[experts] = position; num_active[0] = used; }  // every lane's run ends before 31's
    }
    __syncthreads();
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

extern "C" __global__ void moe_dispatch(const int* expert_ids, int slots, int experts, int top_k, int* counts,
                                        int* offsets, int* perm, int* inv_perm, int* rows, int* active,
                                        int* num_active) {
    dispatch_slots(expert_ids, slots, experts, top_k, counts, offsets, perm, inv_perm, rows, active, num_active);
}

// route_topk and moe_dispatch in one launch, for the few tokens of a decode step: one block of
// at least max(32 * tokens, experts + shared_groups) threads; warp w routes token w, then the
// whole block dispatches the slots (__syncthreads makes the warps' writes visible to the block).
extern "C" __global__ void route_dispatch(const float* logits, int logits_stride, float* logits_used, float* probs,
                                          int* expert_ids, float* raw_weights, float* weights,
                                          const unsigned char* disabled, int tokens, int experts, int top_k,
                                          int shared_groups, int norm_topk_prob, int* counts, int* offsets, int* perm,
                                          int* inv_perm, int* rows, int* active, int* num_active) {
    const int warp = threadIdx.x / 32;
    if (warp < tokens)
        route_token(warp, logits, logits_stride, logits_used, probs, expert_ids, raw_weights, weights, disabled,
                    experts, top_k, shared_groups, norm_topk_prob);
    __syncthreads();
    const int slots_per_token = top_k + shared_groups;
    dispatch_slots(expert_ids, tokens * slots_per_token, experts + shared_groups, slots_per_token, counts, offsets,
                   perm, inv_perm, rows, active, num_active);
}

// out[t] = residual[t] + sum_j weights[t, j] * expert_out[inv_perm[t * k + j]]
//          + sigmoid(shared_gate[t * gate_stride]) * shared[t]
// expert_out [slots, hidden] in permuted order; weights [tokens, k]; residual, shared
// [tokens, hidden] and shared_gate (the shared expert gate's logit of token t at
// t * gate_stride: a column of the stacked router output) may each be null.  Each token sums
// its own k terms in order: no atomics, deterministic.  One thread per (token, column).
extern "C" __global__ void moe_combine(const float* __restrict__ expert_out, const int* __restrict__ inv_perm,
                                       const float* __restrict__ weights, const float* __restrict__ residual,
                                       const float* __restrict__ shared, const float* __restrict__ shared_gate,
                                       int gate_stride, float* __restrict__ out, int tokens, int top_k, int hidden) {
    const long index = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (long)tokens * hidden) return;
    const long t = index / hidden;
    const int c = index % hidden;
    float routed = 0.0f;
    if (top_k <= COMBINE_SLOTS) {  // every load issued before any is used: one memory latency, not 2k
        int row[COMBINE_SLOTS];
        float weight[COMBINE_SLOTS], value[COMBINE_SLOTS];
#pragma unroll
        for (int j = 0; j < COMBINE_SLOTS; ++j)
            if (j < top_k) { row[j] = inv_perm[t * top_k + j]; weight[j] = weights[t * top_k + j]; }
#pragma unroll
        for (int j = 0; j < COMBINE_SLOTS; ++j)
            if (j < top_k) value[j] = expert_out[(long)row[j] * hidden + c];
#pragma unroll
        for (int j = 0; j < COMBINE_SLOTS; ++j)
            if (j < top_k) routed += weight[j] * value[j];  // in slot order, as below
    } else {
        for (int j = 0; j < top_k; ++j) {
            const long slot = t * top_k + j;
            routed += weights[slot] * expert_out[(long)inv_perm[slot] * hidden + c];
        }
    }
    float value = routed;
    if (shared != nullptr) value += shared[index] * (1.0f / (1.0f + expf(-shared_gate[t * gate_stride])));
    if (residual != nullptr) value = residual[index] + value;
    out[index] = value;
}
