// msda_types.cuh -- the element types of msda.cu, and the vectors it loads them in.
//
// Included by msda.cu. Like it, it includes no headers: for NVRTC, Python pastes this file
// in place of its #include line (ddetr_minimal.ops.cupy_kernel.kernel_source), and g++
// finds it next to msda.cu (the CPU emulation).
// ---------------------------------------------------------------------------------------
// 16-bit element types: we only need to widen them to float and round float back.
// ---------------------------------------------------------------------------------------
struct half_t { unsigned short bits; };      // IEEE float16: 1 sign, 5 exponent, 10 mantissa bits
struct bfloat16_t { unsigned short bits; };  // bfloat16: the top 16 bits of a float32

#ifdef __CUDA_ARCH__
// On the GPU one PTX instruction converts in each direction (round to nearest even).
__device__ __forceinline__ float half_to_float(half_t h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
  return f;
}
__device__ __forceinline__ half_t float_to_half(float f) {
  half_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
  return h;
}
#else
// CPU emulation build: g++ has a native 16-bit float type that does the same conversions.
inline float half_to_float(half_t h) { _Float16 v; __builtin_memcpy(&v, &h.bits, 2); return (float)v; }
inline half_t float_to_half(float f) { _Float16 v = (_Float16)f; half_t h; __builtin_memcpy(&h.bits, &v, 2); return h; }
#endif

// bfloat16 is a float32 with the low 16 mantissa bits cut off, so widening is a shift and
// narrowing is rounding those 16 bits away (to nearest, ties to even), keeping NaN a NaN.
__device__ __forceinline__ float bfloat16_to_float(bfloat16_t b) {
  return __uint_as_float(static_cast<unsigned int>(b.bits) << 16);
}
__device__ __forceinline__ bfloat16_t float_to_bfloat16(float f) {
  unsigned int u = __float_as_uint(f);
  bfloat16_t b;
  if ((u & 0x7fffffffu) > 0x7f800000u) { b.bits = 0x7fc0; return b; }  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  b.bits = static_cast<unsigned short>(u >> 16);
  return b;
}

// Scalar<scalar_t>: the accumulator type and the two conversions, one specialisation per type.
template <typename scalar_t> struct Scalar {  // float and double: no conversion, their own accumulator
  typedef scalar_t acc_t;
  __device__ static scalar_t load(scalar_t v) { return v; }
  __device__ static scalar_t store(scalar_t v) { return v; }
};
template <> struct Scalar<half_t> {
  typedef float acc_t;
  __device__ static float load(half_t v) { return half_to_float(v); }
  __device__ static half_t store(float v) { return float_to_half(v); }
};
template <> struct Scalar<bfloat16_t> {
  typedef float acc_t;
  __device__ static float load(bfloat16_t v) { return bfloat16_to_float(v); }
  __device__ static bfloat16_t store(float v) { return float_to_bfloat16(v); }
};

// ---------------------------------------------------------------------------------------
// Vec<scalar_t, V>: V neighbouring channels, read or written in one access.
// ---------------------------------------------------------------------------------------
// Aligned to its whole size (V * sizeof(scalar_t), at most 16 bytes), so the compiler may move it
// with one vector instruction (ld.global.v2 / .v4: e.g. a float4, or eight 16-bit values in 16
// bytes). The caller must guarantee that alignment: the Python wrapper picks V > 1 only when D is
// a multiple of V and value's data pointer is a multiple of the vector's size, so that every row
// [n, s, m, :] and every group of V channels in it starts on a vector boundary.
template <typename scalar_t, int V> struct alignas(V * sizeof(scalar_t)) Vec {
  scalar_t x[V];
};
