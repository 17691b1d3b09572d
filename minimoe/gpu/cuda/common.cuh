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

// The sum of `value` over the lanes before this one (0 for lane 0), by a shift-and-add scan.
__device__ __forceinline__ int warp_exclusive_sum(int value) {
    const int lane = threadIdx.x % 32;
    int inclusive = value;
    for (int offset = 1; offset < 32; offset *= 2) {
        const int before = __shfl_up_sync(FULL_MASK, inclusive, offset);
        if (lane >= offset) inclusive += before;
    }
    return inclusive - value;
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

// Eight consecutive weights (p 16-byte aligned for bf16, 32-byte for f32) as loaded -- one 16-byte
// vector of bf16, two of float32 -- and unpacked to float32 only where they are used, so that
// several loads in flight hold half the registers (for bf16) their float32 values would.
template <typename W> struct Packed8;
template <> struct Packed8<unsigned short> { uint4 bits; };
template <> struct Packed8<float> { float4 low, high; };

__device__ __forceinline__ Packed8<unsigned short> load_packed8(const unsigned short* p) {
    return {*reinterpret_cast<const uint4*>(p)};
}
__device__ __forceinline__ Packed8<float> load_packed8(const float* p) {
    return {*reinterpret_cast<const float4*>(p), *reinterpret_cast<const float4*>(p + 4)};
}

// The dot product of eight packed weights with eight inputs a (elements 0..3) and b (4..7).
__device__ __forceinline__ float dot8(const Packed8<unsigned short>& w, const float4& a, const float4& b) {
    const unsigned int x = w.bits.x, y = w.bits.y, z = w.bits.z, v = w.bits.w;  // element 2i in word i's low half
    return __uint_as_float(x << 16) * a.x + __uint_as_float(x & 0xffff0000u) * a.y
         + __uint_as_float(y << 16) * a.z + __uint_as_float(y & 0xffff0000u) * a.w
         + __uint_as_float(z << 16) * b.x + __uint_as_float(z & 0xffff0000u) * b.y
         + __uint_as_float(v << 16) * b.z + __uint_as_float(v & 0xffff0000u) * b.w;
}
__device__ __forceinline__ float dot8(const Packed8<float>& w, const float4& a, const float4& b) {
    return w.low.x * a.x + w.low.y * a.y + w.low.z * a.z + w.low.w * a.w
         + w.high.x * b.x + w.high.y * b.y + w.high.z * b.z + w.high.w * b.w;
}
