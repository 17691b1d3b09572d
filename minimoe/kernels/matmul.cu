// y = x @ W.T (+ b) on weights kept in their stored dtype (bf16 bits or float32), float32 accumulation.
//
// Replaces minimoe.backend.Linear (and project, and Linear.rows: the embedding lookup), and
// the per-expert matmuls inside minimoe.layers.routed_experts.  Both kernels are *grouped*: the weight is [groups, out, in]
// (group g = expert g; a plain Linear is one group), and the rows of x are grouped
// the same way by `offsets` (group g owns rows offsets[g] .. offsets[g+1]-1, the tokens
// moe_dispatch sorted to expert g).  Each group's rows meet only its own weight.  A plain
// Linear passes no offsets (null): then its one group owns all `rows` rows, and no device
// array describes it (a CUDA graph that captured such a launch holds no pointer to one).
//
// `x_rows`, when given, maps the grouped problem's rows to rows of x (row r reads
// x[x_rows[r]]): the experts read their tokens straight from the hidden states, in
// dispatch order, without a permuted copy of them.  Without it row r reads x[r].
// The *_swiglu_* kernels: x's rows are a SwiGLU's [gate | up] (2 * in_features floats) and the
// matmul reads silu(gate) * up (the down projection of minimoe.layers.swiglu, its activation
// formed as the input is read instead of by a kernel of its own).
//
//   gemv_grouped_*: decode (few rows per group).  One warp per output feature; the warp
//     reads that weight row once, 8 elements per lane per 16-byte load of bf16, and dots it
//     with every row of its group, up to GEMV_MAX_ROWS rows at a time.  Only the active
//     experts' blocks run (blockIdx.y indexes `active`), so a decode step reads only the
//     chosen experts' weights.
//   gemv1_grouped_*: the same for groups of one row (decode at batch 1, where the weight
//     bytes are all the work): each lane issues GEMV_UNROLL loads before it uses any of
//     them, so more bytes are in flight per warp, in registers the 8-row kernel spends on
//     its rows (a kernel of its own: one register count does not limit the other's occupancy).
//   gemm_grouped_*: prefill.  64x64 output tiles over k-steps of 16 through shared memory,
//     each of 256 threads computing 4x4 outputs (rows tr + 16i, columns tc + 16j); a
//     host-built schedule lists the (group, first row) of every 64-row tile that has rows,
//     so no block is idle.  Shared-memory banks: the tiles are stored k-major with a row
//     stride of TILE_M + TILE_PAD = 66 floats, so a warp staging 2 rows x 16 k's writes
//     banks (2k + r) % 32, all 32 distinct (a stride of 64 put all 16 k's of a row in one
//     bank: 16-way conflicts); reading, a warp's 16 columns tc + 16j are consecutive
//     floats (conflict-free) and its 2 rows tr are broadcasts.
#include "common.cuh"

#define GEMV_WARPS 8        // output features per block
#define GEMV_MAX_ROWS 8     // rows of x (tokens) a warp carries at once, in registers
#ifndef GEMV_UNROLL         // (minimoe.gpu.profile compiles other values beside it, to measure them)
#define GEMV_UNROLL 2       // gemv1: 16-byte weight loads a lane has in flight at once
#endif
#define TILE_M 64
#define TILE_N 64
#define TILE_K 16
#define TILE_PAD 2  // floats added to each staged row: stride 66 = 2 (mod 32) banks
#define PATCH 4     // outputs per thread along each axis: TILE_M / PATCH = 16 threads per axis
static_assert(TILE_M == TILE_N, "gemm_grouped stages both tiles with one loop");

// Row r of the grouped problem: x[x_rows[r]], or x[r] without a row map; rows `stride` floats apart.
__device__ __forceinline__ const float* x_row(const float* x, const int* x_rows, int r, int stride) {
    return x + (long)(x_rows != nullptr ? x_rows[r] : r) * stride;
}

// silu(g) * u, written as minimoe.layers.silu and swiglu write it (so the products round alike).
__device__ __forceinline__ float silu_mul(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// Element i of an input row as the matmul reads it: row[i], or -- with swiglu, when the row is a
// SwiGLU's [gate | up] of 2 * width floats -- silu(gate[i]) * up[i], the activation the down
// projection reads (minimoe.layers.swiglu), formed here instead of in a kernel of its own.
__device__ __forceinline__ float x_value(const float* row, int i, int width, bool swiglu) {
    return swiglu ? silu_mul(row[i], row[width + i]) : row[i];
}

// Four consecutive input values (row + i 16-byte aligned) -- see x_value.
__device__ __forceinline__ float4 x_value4(const float* row, int i, int width, bool swiglu) {
    float4 a = *reinterpret_cast<const float4*>(row + i);
    if (swiglu) {
        const float4 up = *reinterpret_cast<const float4*>(row + width + i);
        a.x = silu_mul(a.x, up.x); a.y = silu_mul(a.y, up.y); a.z = silu_mul(a.z, up.z); a.w = silu_mul(a.w, up.w);
    }
    return a;
}

// One weight row w (`width` values) dotted with ROWS input rows xr[r] (those with r < rows), a partial
// sum per lane in acc[r]; the warp's lanes then add them up.  Each lane reads 8 weights per 16-byte
// load and issues UNROLL loads before it uses any.
template <int ROWS, int UNROLL, bool SWIGLU, typename W>
__device__ __forceinline__ void dot_rows(const W* __restrict__ w, const float* const xr[ROWS], int rows, int width,
                                         float acc[ROWS]) {
    const int lane = threadIdx.x % 32;
    if (width % 8 == 0) {  // rows then start 16/32-byte aligned
        constexpr int stride = 32 * 8;  // the warp's 32 lanes read 8 consecutive weights each
#pragma unroll 1  // UNROLL says how many loads are in flight; the compiler's own unrolling would add to it
        for (int base = lane * 8; base < width; base += stride * UNROLL) {
            Packed8<W> wv[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)  // all the loads first ...
                if (base + u * stride < width) wv[u] = load_packed8(w + base + u * stride);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {  // ... then the arithmetic on them
                const int i = base + u * stride;
                if (i >= width) continue;
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    if (r < rows) {
                        acc[r] += dot8(wv[u], x_value4(xr[r], i, width, SWIGLU), x_value4(xr[r], i + 4, width, SWIGLU));
                    }
                }
            }
        }
    } else {  // odd widths (tiny test models): one element per lane per step
        for (int i = lane; i < width; i += 32) {
            const float wv = load_weight(w + i);
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                if (r < rows) acc[r] += wv * x_value(xr[r], i, width, SWIGLU);
        }
    }
}

// ROWS input rows at a time: GEMV_MAX_ROWS for a few tokens, 1 for decode at batch 1 (which leaves
// registers for UNROLL loads in flight).  Each combination is a kernel of its own (see the entry
// points), so one's register count never limits another's occupancy.
// A SwiGLU input at one row (gemv1_grouped_swiglu_*) is formed once per block, silu(gate) * up into
// dynamic shared memory (in_features floats), which the block's warps then read: formed by every
// warp as it reads, it cost each output feature in_features exponentials and twice the input reads.
template <int ROWS, int UNROLL, bool SWIGLU, typename W>
__device__ void gemv_grouped(const float* __restrict__ x, const int* __restrict__ x_rows, const W* __restrict__ weight,
                             const float* __restrict__ bias,
                             float* __restrict__ y, const int* __restrict__ offsets, const int* __restrict__ active,
                             const int* __restrict__ num_active, int out_features, int in_features, int total_rows) {
    extern __shared__ float activation[];  // the staged SwiGLU input row (one-row SwiGLU kernels only)
    constexpr bool staged = SWIGLU && ROWS == 1;
    const bool grouped = offsets != nullptr;  // else one group of total_rows rows
    if (grouped && blockIdx.y >= num_active[0]) return;  // fewer experts were chosen than the grid allows for
    const int group = grouped ? active[blockIdx.y] : 0;
    const int lane = threadIdx.x % 32;
    const int feature = blockIdx.x * GEMV_WARPS + threadIdx.x / 32;
    const bool valid = feature < out_features;  // a warp past the end still helps stage and reaches the barriers
    const W* w = weight + ((long)group * out_features + (valid ? feature : 0)) * in_features;
    const int first = grouped ? offsets[group] : 0, last = grouped ? offsets[group + 1] : total_rows;
    const int x_stride = SWIGLU ? 2 * in_features : in_features;

    for (int row0 = first; row0 < last; row0 += ROWS) {
        const int rows = min(ROWS, last - row0);
        const float* xr[ROWS];
        if constexpr (staged) {
            const float* row = x_row(x, x_rows, row0, x_stride);
            __syncthreads();  // the previous row's activation is no longer read
            for (int i = threadIdx.x; i < in_features; i += blockDim.x)
                activation[i] = silu_mul(row[i], row[in_features + i]);
            __syncthreads();
            xr[0] = activation;
        } else {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) xr[r] = x_row(x, x_rows, row0 + min(r, rows - 1), x_stride);
        }
        if (!valid) continue;
        float acc[ROWS] = {0.0f};
        dot_rows<ROWS, UNROLL, SWIGLU && !staged>(w, xr, rows, in_features, acc);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float total = warp_sum(acc[r]);  // all lanes take part, even for r >= rows
            if (lane == 0 && r < rows)
                y[(long)(row0 + r) * out_features + feature] = total + (bias != nullptr ? bias[feature] : 0.0f);
        }
    }
}

template <bool SWIGLU, typename W>
__device__ void gemm_grouped(const float* __restrict__ x, const int* __restrict__ x_rows, const W* __restrict__ weight,
                             const float* __restrict__ bias,
                             float* __restrict__ y, const int* __restrict__ offsets, const int* __restrict__ tile_group,
                             const int* __restrict__ tile_row, int out_features, int in_features, int total_rows) {
    __shared__ float xs[TILE_K][TILE_M + TILE_PAD];  // x tile, k-major so the inner loop reads rows of it
    __shared__ float ws[TILE_K][TILE_N + TILE_PAD];
    constexpr int step = TILE_M / PATCH;  // a thread's rows (and columns) are `step` apart
    const int group = tile_group[blockIdx.y];
    const int row0 = tile_row[blockIdx.y], row_end = offsets != nullptr ? offsets[group + 1] : total_rows;
    const int col0 = blockIdx.x * TILE_N;
    const W* w = weight + (long)group * out_features * in_features;
    const int tr = threadIdx.x / step, tc = threadIdx.x % step;  // rows tr + step * i, columns tc + step * j
    const int x_stride = SWIGLU ? 2 * in_features : in_features;
    float acc[PATCH][PATCH] = {{0.0f}};

    for (int k0 = 0; k0 < in_features; k0 += TILE_K) {
        // Stage both tiles: 64 x 16 values each, 4 per thread, consecutive threads along k
        // (16 consecutive floats of one row of x or W: coalesced global reads).
        for (int i = threadIdx.x; i < TILE_M * TILE_K; i += blockDim.x) {
            const int r = i / TILE_K, k = i % TILE_K;
            const bool in_k = k0 + k < in_features;
            xs[k][r] = (row0 + r < row_end && in_k)
                       ? x_value(x_row(x, x_rows, row0 + r, x_stride), k0 + k, in_features, SWIGLU) : 0.0f;
            ws[k][r] = (col0 + r < out_features && in_k) ? load_weight(w + (long)(col0 + r) * in_features + k0 + k) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TILE_K; ++k) {
            float a[PATCH], b[PATCH];
#pragma unroll
            for (int i = 0; i < PATCH; ++i) { a[i] = xs[k][tr + step * i]; b[i] = ws[k][tc + step * i]; }
#pragma unroll
            for (int i = 0; i < PATCH; ++i)
#pragma unroll
                for (int j = 0; j < PATCH; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < PATCH; ++i) {
        const int row = row0 + tr + step * i;
        if (row >= row_end) continue;
#pragma unroll
        for (int j = 0; j < PATCH; ++j) {  // consecutive threads: consecutive columns
            const int col = col0 + tc + step * j;
            if (col < out_features) y[(long)row * out_features + col] = acc[i][j] + (bias != nullptr ? bias[col] : 0.0f);
        }
    }
}

// Rows of a stored weight as float32: out[r] = weight[ids[r]] (the embedding lookup).  The ids
// are read on the device, so the CUDA-graph decode feeds each token through a fixed buffer.
// One thread per output element.
template <typename W>
__device__ void gather_rows(const W* __restrict__ weight, const int* __restrict__ ids, float* __restrict__ out, int rows,
                            int width) {
    const long index = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (long)rows * width) return;
    const long r = index / width;
    out[index] = load_weight(weight + (long)ids[r] * width + index % width);
}

// The entry points CuPy looks up by name: {gemv, gemv1, gemm}_grouped[_swiglu]_{bf16, f32}, one per
// kernel (rows at a time), input (plain, or a SwiGLU's [gate | up]) and weight type.
#define GEMV_ARGS(W) const float* x, const int* x_rows, const W* weight, const float* bias, float* y, \
                     const int* offsets, const int* active, const int* num_active, int out_features, int in_features, \
                     int total_rows
#define GEMM_ARGS(W) const float* x, const int* x_rows, const W* weight, const float* bias, float* y, \
                     const int* offsets, const int* tile_group, const int* tile_row, int out_features, int in_features, \
                     int total_rows
#define GEMV_CALL(ROWS, UNROLL, SWIGLU) \
    gemv_grouped<ROWS, UNROLL, SWIGLU>(x, x_rows, weight, bias, y, offsets, active, num_active, out_features, \
                                       in_features, total_rows)
#define GEMM_CALL(SWIGLU) \
    gemm_grouped<SWIGLU>(x, x_rows, weight, bias, y, offsets, tile_group, tile_row, out_features, in_features, total_rows)
extern "C" __global__ void gemv_grouped_bf16(GEMV_ARGS(unsigned short)) { GEMV_CALL(GEMV_MAX_ROWS, 1, false); }
extern "C" __global__ void gemv_grouped_f32(GEMV_ARGS(float)) { GEMV_CALL(GEMV_MAX_ROWS, 1, false); }
extern "C" __global__ void gemv_grouped_swiglu_bf16(GEMV_ARGS(unsigned short)) { GEMV_CALL(GEMV_MAX_ROWS, 1, true); }
extern "C" __global__ void gemv_grouped_swiglu_f32(GEMV_ARGS(float)) { GEMV_CALL(GEMV_MAX_ROWS, 1, true); }
extern "C" __global__ void gemv1_grouped_bf16(GEMV_ARGS(unsigned short)) { GEMV_CALL(1, GEMV_UNROLL, false); }
extern "C" __global__ void gemv1_grouped_f32(GEMV_ARGS(float)) { GEMV_CALL(1, GEMV_UNROLL, false); }
extern "C" __global__ void gemv1_grouped_swiglu_bf16(GEMV_ARGS(unsigned short)) { GEMV_CALL(1, GEMV_UNROLL, true); }
extern "C" __global__ void gemv1_grouped_swiglu_f32(GEMV_ARGS(float)) { GEMV_CALL(1, GEMV_UNROLL, true); }
extern "C" __global__ void gemm_grouped_bf16(GEMM_ARGS(unsigned short)) { GEMM_CALL(false); }
extern "C" __global__ void gemm_grouped_f32(GEMM_ARGS(float)) { GEMM_CALL(false); }
extern "C" __global__ void gemm_grouped_swiglu_bf16(GEMM_ARGS(unsigned short)) { GEMM_CALL(true); }
extern "C" __global__ void gemm_grouped_swiglu_f32(GEMM_ARGS(float)) { GEMM_CALL(true); }
extern "C" __global__ void gather_rows_bf16(const unsigned short* weight, const int* ids, float* out, int rows, int width) {
    gather_rows(weight, ids, out, rows, width);
}
extern "C" __global__ void gather_rows_f32(const float* weight, const int* ids, float* out, int rows, int width) {
    gather_rows(weight, ids, out, rows, width);
}
