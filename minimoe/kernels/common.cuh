// Helpers shared by minimoe's kernels: reductions, bf16 loads, constants.
//
// Inlined into each .cu file's text by minimoe.gpu.launch.module_source before CuPy compiles
// it, so CuPy's binary cache (keyed on the source text) sees every edit made here.  No
// system headers: NVRTC compiles these without the CUDA toolkit's include files,
// so bf16 is plain `unsigned short` bit patterns and -inf is spelled from its bits.

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)
#define NAN_F __int_as_float(0x7fc00000)

// NaN is the one value unequal to itself (the kernels are not compiled with fast-math, which could drop this).
__device__ __forceinline__ bool is_nan(float value) { return value != value; }

// The sum over the 32 lanes of a warp, returned to every lane.
__device__ __forceinline__ float warp_sum(float value) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(FULL_MASK, value, offset);
    return value;
}

__device__ __forceinline__ float warp_max(float value) {
    for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(FULL_MASK, value, offset));
    return value;
}

// The sum over a whole block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// Every thread of the block must call it (it synchronises).
__device__ float block_sum(float value) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    value = warp_sum(value);
    __syncthreads();  // `partial` may still be read by a previous call
    if (lane == 0) partial[warp] = value;
    __syncthreads();
    value = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(value);
}

// bf16 -> f32 is exact: a bf16 is the top half of an f32's bits.
__device__ __forceinline__ float bf16_to_float(unsigned short bits) {
    return __uint_as_float(((unsigned int)bits) << 16);
}

// A stored weight element as float32, for the weight types the matmul kernels take:
// bf16 bit patterns (the checkpoint's dtype) and float32 (fixtures stored in f32/f16).
__device__ __forceinline__ float load_weight(const unsigned short* p) { return bf16_to_float(*p); }
__device__ __forceinline__ float load_weight(const float* p) { return *p; }

// Eight consecutive weights (p 16-byte aligned for bf16, 32-byte for f32) as float32, in one or two vector loads.
__device__ __forceinline__ void load_weight8(const unsigned short* p, float out[8]) {
    const uint4 packed = *reinterpret_cast<const uint4*>(p);
    const unsigned int words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(words[i] << 16);              // low half: element 2i
        out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);  // high half: element 2i+1
    }
}

__device__ __forceinline__ void load_weight8(const float* p, float out[8]) {
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
