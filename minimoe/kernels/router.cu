// The router's choice per token: softmax over all experts, top-k, optional renormalisation.
//
// Replaces minimoe.layers.route (without `forced` experts, which fall back to it):
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
#include "common.cuh"

#define MAX_EXPERTS_PER_LANE 8  // up to 256 experts (Qwen1.5-MoE has 60)
#define NAN_KEY (-1.0f)  // a NaN probability's rank: below every probability (all >= 0) ...
#define TAKEN (-2.0f)    // ... and above an expert already chosen (or past the last expert)

// The value the top-k ranks a probability by: NaN compares false with everything, so it gets NAN_KEY.
__device__ __forceinline__ float rank_key(float probability) {
    return is_nan(probability) ? NAN_KEY : probability;
}

// logits [tokens, experts] (the router's output) -> logits_used (with -inf for disabled
// experts; may alias `logits`), probs [tokens, experts], expert_ids / raw_weights /
// weights [tokens, top_k].  disabled: [experts] bytes, nonzero = removed; may be null.
extern "C" __global__ void route_topk(const float* logits, float* logits_used, float* __restrict__ probs,
                                      int* __restrict__ expert_ids, float* __restrict__ raw_weights,
                                      float* __restrict__ weights, const unsigned char* __restrict__ disabled,
                                      int tokens, int experts, int top_k, int norm_topk_prob) {
    const int lane = threadIdx.x % 32;
    const long token = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (token >= tokens) return;  // the whole warp leaves together
    const float* row = logits + token * experts;

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
    float chosen_sum = 0.0f;
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
        if (lane == 0) {
            expert_ids[token * top_k + rank] = best_expert;
            raw_weights[token * top_k + rank] = probability;
        }
        chosen_sum += probability;
    }
    if (lane == 0) {
        for (int rank = 0; rank < top_k; ++rank) {
            const float raw = raw_weights[token * top_k + rank];
            weights[token * top_k + rank] = norm_topk_prob ? raw / chosen_sum : raw;
        }
    }
}
