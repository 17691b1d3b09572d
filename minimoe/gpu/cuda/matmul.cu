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
//
// A SwiGLU (minimoe.layers.swiglu: down(silu(gate(x)) * up(x))) needs its activation formed
// between its two matmuls, and each path forms it inside one of them, not in a kernel of its own:
// the GEMVs' *_glu_* kernels read the stacked [gate; up] weight and write silu(gate) * up; the
// GEMM's *_swiglu_* kernels read x's rows as a SwiGLU's [gate | up] (2 * in_features floats)
// and form silu(gate) * up as they stage their input tile.
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
//     A *_glu_* warp reads two weight rows, its gate's and its up's, so twice the bytes.
//   gemm_grouped_*: prefill.  64x64 output tiles over k-steps of 16 through shared memory,
//     each of 256 threads computing 4x4 outputs (rows tr + 16i, columns tc + 16j); a
//     host-built schedule lists the (group, first row) of every 64-row tile that has rows,
//     so no block is idle.  Shared-memory banks: the tiles are stored k-major with a row
//     stride of TILE_M + TILE_PAD = 66 floats, so a warp staging 2 rows x 16 k's writes
//     banks (2k + r) % 32, all 32 distinct (a stride of 64 put all 16 k's of a row in one
//     bank: 16-way conflicts); reading, a warp's 16 columns tc + 16j are consecutive
//     floats (conflict-free) and its 2 rows tr are broadcasts.
#include "common.cuh"

#define GEMV_WARPS 8        // warps per block: output features per block, times the warps sharing each
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

// Elements begin .. end - 1 of WROWS weight rows w[q] dotted with those of ROWS input rows xr[r] (the
// rows r < rows), a partial sum per lane in acc[q][r]; the warp's lanes then add them up.  `vector`:
// the rows and `begin` are 16/32-byte aligned (widths a multiple of 8), and each lane reads 8 weights
// per 16-byte load and issues UNROLL loads per weight row before it uses any.
template <int ROWS, int UNROLL, int WROWS, typename W>
__device__ __forceinline__ void dot_rows(const W* const w[WROWS], const float* const xr[ROWS], int rows, int begin,
                                         int end, bool vector, float acc[WROWS][ROWS]) {
    const int lane = threadIdx.x % 32;
    if (vector) {
        constexpr int stride = 32 * 8;  // the warp's 32 lanes read 8 consecutive weights each
#pragma unroll 1  // UNROLL says how many loads are in flight; the compiler's own unrolling would add to it
        for (int base = begin + lane * 8; base < end; base += stride * UNROLL) {
            Packed8<W> wv[WROWS][UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)  // all the loads first ...
#pragma unroll
                for (int q = 0; q < WROWS; ++q)
                    if (base + u * stride < end) wv[q][u] = load_packed8(w[q] + base + u * stride);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {  // ... then the arithmetic on them
                const int i = base + u * stride;
                if (i >= end) continue;
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    if (r < rows) {
                        const float4 a = *reinterpret_cast<const float4*>(xr[r] + i);
                        const float4 b = *reinterpret_cast<const float4*>(xr[r] + i + 4);
#pragma unroll
                        for (int q = 0; q < WROWS; ++q) acc[q][r] += dot8(wv[q][u], a, b);
                    }
                }
            }
        }
    } else {  // odd widths (tiny test models): one element per lane per step
        for (int i = begin + lane; i < end; i += 32) {
#pragma unroll
            for (int q = 0; q < WROWS; ++q) {
                const float wv = load_weight(w[q] + i);
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
                    if (r < rows) acc[q][r] += wv * xr[r][i];
            }
        }
    }
}

// y[row, feature] from the feature's finished dot products: total[0] (+ bias), or with GLU (total[0]
// the gate's, total[1] the up's) silu(gate) * up.
template <bool GLU>
__device__ __forceinline__ void store_output(float* y, const float* bias, const float* total, int row, int feature,
                                             int out_features) {
    const long at = (long)row * out_features + feature;
    if constexpr (GLU) y[at] = silu_mul(total[0], total[1]);
    else y[at] = total[0] + (bias != nullptr ? bias[feature] : 0.0f);
}

// ROWS input rows at a time: GEMV_MAX_ROWS for a few tokens, 1 for decode at batch 1 (which leaves
// registers for UNROLL loads in flight).  Each combination is a kernel of its own (see the entry
// points), so one's register count never limits another's occupancy.
// GLU (the *_glu_* kernels): the weight is a SwiGLU's [gate; up] ([2 * out_features, in] per group)
// and y = silu(x @ gate.T) * (x @ up.T), [rows, out_features]: the warp of feature i reads gate row
// i and up row out_features + i together and writes the activation the down projection reads.
// SPLIT (the gemv1_split_* kernels): `split` warps share each output feature (2, 4 or 8:
// minimoe.gpu.launch.gemv_split), each a contiguous part of its weight row, their sums added in part
// order through shared memory: a matrix of few rows (attention's o_proj, the router) then still has
// enough warps in flight.  Without SPLIT, split is 1 (and the kernel needs fewer registers).
template <int ROWS, int UNROLL, bool GLU, bool SPLIT, typename W>
__device__ void gemv_grouped(const float* __restrict__ x, const int* __restrict__ x_rows, const W* __restrict__ weight,
                             const float* __restrict__ bias,
                             float* __restrict__ y, const int* __restrict__ offsets, const int* __restrict__ active,
                             const int* __restrict__ num_active, int out_features, int in_features, int total_rows,
                             int warps_per_feature) {
    constexpr int WROWS = GLU ? 2 : 1;
    const int split = SPLIT ? warps_per_feature : 1;
    __shared__ float partial[GEMV_WARPS][WROWS][ROWS];  // each warp's sums, when features are split
    const bool grouped = offsets != nullptr;  // else one group of total_rows rows
    if (grouped && blockIdx.y >= num_active[0]) return;  // fewer experts were chosen than the grid allows for
    const int group = grouped ? active[blockIdx.y] : 0;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int feature = blockIdx.x * (GEMV_WARPS / split) + warp / split, part = warp % split;
    const bool valid = feature < out_features;  // with SPLIT, a warp past the end still reaches the barriers
    if (!SPLIT && !valid) return;
    const W* first_row = weight + ((long)group * WROWS * out_features + (valid ? feature : 0)) * in_features;
    const W* w[WROWS];
#pragma unroll
    for (int q = 0; q < WROWS; ++q) w[q] = first_row + (long)q * out_features * in_features;  // gate, then up
    const int first = grouped ? offsets[group] : 0, last = grouped ? offsets[group + 1] : total_rows;
    const bool vector = in_features % 8 == 0;
    int begin = 0, end = in_features;  // this warp's part of the row
    if constexpr (SPLIT) {
        const int chunk = (in_features + split - 1) / split, share = vector ? (chunk + 7) / 8 * 8 : chunk;  // 8-aligned
        begin = min(in_features, part * share);
        end = min(in_features, begin + share);
    }

    for (int row0 = first; row0 < last; row0 += ROWS) {
        const int rows = min(ROWS, last - row0);
        const float* xr[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) xr[r] = x_row(x, x_rows, row0 + min(r, rows - 1), in_features);
        float acc[WROWS][ROWS] = {{0.0f}};
        if (valid) dot_rows<ROWS, UNROLL, WROWS>(w, xr, rows, begin, end, vector, acc);  // (always, without SPLIT)
        if constexpr (SPLIT) {  // the feature's parts, added in part order by its first warp
            __syncthreads();  // the previous rows' partial sums are read
#pragma unroll
            for (int q = 0; q < WROWS; ++q)
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const float total = warp_sum(acc[q][r]);  // all lanes take part
                    if (lane == 0) partial[warp][q][r] = total;
                }
            __syncthreads();
            if (lane != 0 || part != 0 || !valid) continue;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                float total[WROWS] = {0.0f};
#pragma unroll
                for (int q = 0; q < WROWS; ++q)
                    for (int p = 0; p < split; ++p) total[q] += partial[warp + p][q][r];
                if (r < rows) store_output<GLU>(y, bias, total, row0 + r, feature, out_features);
            }
        } else {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                float total[WROWS];
#pragma unroll
                for (int q = 0; q < WROWS; ++q) total[q] = warp_sum(acc[q][r]);  // all lanes take part, even for r >= rows
                if (lane == 0 && r < rows && valid) store_output<GLU>(y, bias, total, row0 + r, feature, out_features);
            }
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

// The entry points CuPy looks up by name, one per kernel, variant and weight type:
// {gemv, gemv1, gemv1_split}_grouped[_glu]_{bf16, f32} and gemm_grouped[_swiglu]_{bf16, f32}.
#define GEMV_ARGS(W) const float* x, const int* x_rows, const W* weight, const float* bias, float* y, \
                     const int* offsets, const int* active, const int* num_active, int out_features, int in_features, \
                     int total_rows, int split
#define GEMM_ARGS(W) const float* x, const int* x_rows, const W* weight, const float* bias, float* y, \
                     const int* offsets, const int* tile_group, const int* tile_row, int out_features, int in_features, \
                     int total_rows
#define GEMV_CALL(ROWS, UNROLL, GLU, SPLIT) \
    gemv_grouped<ROWS, UNROLL, GLU, SPLIT>(x, x_rows, weight, bias, y, offsets, active, num_active, out_features, \
                                           in_features, total_rows, split)
#define GEMM_CALL(SWIGLU) \
    gemm_grouped<SWIGLU>(x, x_rows, weight, bias, y, offsets, tile_group, tile_row, out_features, in_features, total_rows)
extern "C" __global__ void gemv_grouped_bf16(GEMV_ARGS(unsigned short)) { GEMV_CALL(GEMV_MAX_ROWS, 1, false, false); }
extern "C" __global__ void gemv_grouped_f32(GEMV_ARGS(float)) { GEMV_CALL(GEMV_MAX_ROWS, 1, false, false); }
extern "C" __global__ void gemv_grouped_glu_bf16(GEMV_ARGS(unsigned short)) { GEMV_CALL(GEMV_MAX_ROWS, 1, true, false); }
extern "C" __global__ void gemv_grouped_glu_f32(GEMV_ARGS(float)) { GEMV_CALL(GEMV_MAX_ROWS, 1, true, false); }
extern "C" __global__ void gemv1_grouped_bf16(GEMV_ARGS(unsigned short)) { GEMV_CALL(1, GEMV_UNROLL, false, false); }
extern "C" __global__ void gemv1_grouped_f32(GEMV_ARGS(float)) { GEMV_CALL(1, GEMV_UNROLL, false, false); }
extern "C" __global__ void gemv1_grouped_glu_bf16(GEMV_ARGS(unsigned short)) { GEMV_CALL(1, GEMV_UNROLL, true, false); }
extern "C" __global__ void gemv1_grouped_glu_f32(GEMV_ARGS(float)) { GEMV_CALL(1, GEMV_UNROLL, true, false); }
extern "C" __global__ void gemv1_split_grouped_bf16(GEMV_ARGS(unsigned short)) { GEMV_CALL(1, GEMV_UNROLL, false, true); }
extern "C" __global__ void gemv1_split_grouped_f32(GEMV_ARGS(float)) { GEMV_CALL(1, GEMV_UNROLL, false, true); }
extern "C" __global__ void gemv1_split_grouped_glu_bf16(GEMV_ARGS(unsigned short)) { GEMV_CALL(1, GEMV_UNROLL, true, true); }
extern "C" __global__ void gemv1_split_grouped_glu_f32(GEMV_ARGS(float)) { GEMV_CALL(1, GEMV_UNROLL, true, true); }
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
