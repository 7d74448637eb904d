// msda.cu -- multi-scale deformable attention (Zhu et al., ICLR 2021, Eq. 3) as two CUDA kernels.
//
// The op. For batch n, query q, head m and channel d:
//
//   out[n, q, m, d] = sum over levels l and points p of
//                     A[n, q, m, l, p] * bilinear(value_l[n, :, m, d], loc[n, q, m, l, p])
//
// Tensors (all contiguous, row-major; the Python wrapper guarantees it):
//   value               (N, S, M, D)        S = sum_l H_l * W_l, level l starts at level_start[l]
//   spatial_shapes      (L, 2) int64        (H_l, W_l)
//   level_start         (L,)   int64
//   sampling_locations  (N, Lq, M, L, P, 2) normalised (x, y); pixel i has its centre at (i + 0.5) / size
//   attention_weights   (N, Lq, M, L, P)    locations and weights hold loc_t, the others scalar_t
//   output              (N, Lq, M, D)       the caller views it as (N, Lq, M*D)
//
// One source, four element types. `scalar_t` is what value (and the output) hold: float,
// double, or one of the two 16-bit types below. `loc_t` is what sampling_locations and
// attention_weights hold: scalar_t itself, or float when scalar_t is 16-bit -- a bfloat16
// location on a map of width W = 167 is off by up to a third of a pixel, so under
// torch.autocast the locations and weights stay float32. `acc_t` is what we add up in:
// double for double, float for everything else, so 16-bit values are accumulated in
// float32 and only the final result is rounded back to 16 bits.
//
// Notation: N batch, S flattened positions of all levels, M heads, D channels per head,
// Lq queries, L levels, P points per head and level, (H_l, W_l) level l's size.
//
// The file includes no headers, so NVRTC compiles it on any machine without a CUDA
// toolkit, and g++ compiles it for the CPU through cuda_host_emulation.h (tests).
// Python compiles the templates it needs by name: msda_forward<float, float>,
// msda_backward<bfloat16_t, float>, ...

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
template <typename scalar_t> struct Scalar;
template <> struct Scalar<float> {
  typedef float acc_t;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <> struct Scalar<double> {
  typedef double acc_t;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
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
// Bilinear interpolation: where the four weights come from.
// ---------------------------------------------------------------------------------------
// A normalised location (x, y) in [0, 1] becomes the continuous pixel coordinate
// (x * W - 0.5, y * H - 0.5), because pixel i has its centre at (i + 0.5) / W.
// Its four neighbours are the pixels (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)
// with x0 = floor(x), y0 = floor(y). With the fractional parts fx = x - x0, fy = y - y0,
// each neighbour is weighted by the area of the rectangle on the opposite side:
//
//      (x0, y0) ------- (x0+1, y0)        w[0] = (1 - fy) * (1 - fx)   top-left
//         |      fx   |      |            w[1] = (1 - fy) * fx         top-right
//         |  fy  *----+      |            w[2] = fy * (1 - fx)         bottom-left
//      (x0, y0+1) ----- (x0+1, y0+1)      w[3] = fy * fx               bottom-right
//
// The weights sum to 1. A neighbour outside the map reads zero ("zeros" padding), which
// we express by giving it position -1: callers multiply its weight by zero instead of
// reading. A NaN (or infinite) location makes fx, fy and all four weights NaN, and
// NaN * 0 is NaN, so the sample is NaN, as grid_sample gives: a diverging run shows up
// in the output instead of reading as zeros.
template <typename acc_t> struct Bilinear {
  int pos[4];    // row-major position y * W + x inside the level, or -1 outside the map
  acc_t w[4];    // the weights above, in the order top-left, top-right, bottom-left, bottom-right
  acc_t fx, fy;  // fractional parts (the backward pass differentiates the weights by them)
  int origin;    // yi * W + xi: pos[] are origin + 0, 1, W, W + 1 where inside (see share_point)
};

template <typename acc_t>
__device__ __forceinline__ Bilinear<acc_t> bilinear(acc_t loc_x, acc_t loc_y, int H, int W) {
  Bilinear<acc_t> b;
  const acc_t x = loc_x * W - acc_t(0.5), y = loc_y * H - acc_t(0.5);
  const acc_t x0 = floor(x), y0 = floor(y);
  b.fx = x - x0;
  b.fy = y - y0;
  b.w[0] = (1 - b.fy) * (1 - b.fx);
  b.w[1] = (1 - b.fy) * b.fx;
  b.w[2] = b.fy * (1 - b.fx);
  b.w[3] = b.fy * b.fx;
  // Compare in floating point before converting, so a far-away location cannot overflow an int.
  const bool x0_in = x0 >= 0 && x0 <= W - 1, x1_in = x0 >= -1 && x0 <= W - 2;
  const bool y0_in = y0 >= 0 && y0 <= H - 1, y1_in = y0 >= -1 && y0 <= H - 2;
  const int xi = (x0_in || x1_in) ? static_cast<int>(x0) : 0;
  const int yi = (y0_in || y1_in) ? static_cast<int>(y0) : 0;
  b.origin = yi * W + xi;
  b.pos[0] = (y0_in && x0_in) ? yi * W + xi : -1;
  b.pos[1] = (y0_in && x1_in) ? yi * W + xi + 1 : -1;
  b.pos[2] = (y1_in && x0_in) ? (yi + 1) * W + xi : -1;
  b.pos[3] = (y1_in && x1_in) ? (yi + 1) * W + xi + 1 : -1;
  return b;
}

// One point's work, as the lane that computed it hands it to the others.
template <typename acc_t> struct Point {
  acc_t a;            // attention weight
  Bilinear<acc_t> b;  // pos[] is relative to the level, -1 outside the map
};

// Point `src`'s work, received from lane `src` in 5 shuffles: the weight, the two fractions,
// the top-left position and which of the four neighbours are inside. Every lane rebuilds the
// four bilinear weights and positions from those (a few multiplies, cheaper than 6 more
// shuffles). W is the width of the point's level.
template <typename acc_t>
__device__ __forceinline__ Point<acc_t> share_point(const Point<acc_t>& mine, int src, int W) {
  int inside = 0;
  for (int c = 0; c < 4; ++c) inside |= (mine.b.pos[c] >= 0 ? 1 : 0) << c;
  Point<acc_t> p;
  p.a = __shfl_sync(0xffffffffu, mine.a, src);
  const acc_t fx = __shfl_sync(0xffffffffu, mine.b.fx, src), fy = __shfl_sync(0xffffffffu, mine.b.fy, src);
  const int origin = __shfl_sync(0xffffffffu, mine.b.origin, src);
  inside = __shfl_sync(0xffffffffu, inside, src);
  p.b.fx = fx;
  p.b.fy = fy;
  p.b.origin = origin;
  p.b.w[0] = (1 - fy) * (1 - fx);
  p.b.w[1] = (1 - fy) * fx;
  p.b.w[2] = fy * (1 - fx);
  p.b.w[3] = fy * fx;
  const int offset[4] = {0, 1, W, W + 1};
  for (int c = 0; c < 4; ++c) p.b.pos[c] = (inside >> c & 1) ? origin + offset[c] : -1;
  return p;
}

// The per-point work of point lp of a head, done by the one lane that owns it: load the
// weight and the location, and set up the bilinear weights. A lane without a point (lp >= L * P)
// still returns defined values, since it takes part in every shuffle.
template <typename acc_t, typename loc_t>
__device__ __forceinline__ Point<acc_t> load_point(const loc_t* __restrict__ loc, const loc_t* __restrict__ weight,
                                                   const long long* __restrict__ spatial_shapes, int lp, int LP,
                                                   int P) {
  typedef Scalar<loc_t> TL;
  Point<acc_t> mine;
  if (lp < LP) {
    const int l = lp / P;
    const int H = static_cast<int>(spatial_shapes[2 * l]), W = static_cast<int>(spatial_shapes[2 * l + 1]);
    mine.a = TL::load(weight[lp]);
    mine.b = bilinear<acc_t>(TL::load(loc[2 * lp]), TL::load(loc[2 * lp + 1]), H, W);
  } else {
    mine.a = 0;
    mine.b = bilinear<acc_t>(acc_t(0), acc_t(0), 1, 1);
  }
  return mine;
}

// ---------------------------------------------------------------------------------------
// Forward: one thread per output element.
// ---------------------------------------------------------------------------------------
// Thread i owns out[n, q, m, d] with i = ((n * Lq + q) * M + m) * D + d. It walks all L
// levels and P points of its head, keeps the running sum in a register, and writes once:
// no two threads write the same element, so no atomics. Neighbouring threads own
// neighbouring channels d, so their reads of value[n, s, m, d] are contiguous (coalesced).
// The loop is grid-stride: if the grid is smaller than the number of outputs, each
// thread moves on by (total number of threads) and takes another element.
//
// When D is a multiple of 32 (the paper's D = 32 among them), the 32 lanes of every warp
// serve one (n, q, m), and the grid-stride step (a multiple of 32) keeps it so. The work of
// each point -- loading its location and weight, setting up its bilinear weights -- is then
// done once per warp, by one lane, and shared by shuffles (share_point). Otherwise a warp
// may straddle two heads, and every thread does that work for itself.
template <typename scalar_t, typename loc_t>
__global__ void msda_forward(const scalar_t* __restrict__ value,
                             const long long* __restrict__ spatial_shapes,
                             const long long* __restrict__ level_start,
                             const loc_t* __restrict__ sampling_locations,
                             const loc_t* __restrict__ attention_weights,
                             scalar_t* __restrict__ output,
                             int N, int S, int M, int D, int Lq, int L, int P) {
  typedef Scalar<scalar_t> T;
  typedef typename T::acc_t acc_t;
  const long long total = static_cast<long long>(N) * Lq * M * D;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const int lane = threadIdx.x % 32;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int d = static_cast<int>(i % D);
    const long long nqm = i / D;  // ((n * Lq + q) * M + m): the (query, head) pair this thread serves
    const int m = static_cast<int>(nqm % M);
    const long long n = nqm / (static_cast<long long>(Lq) * M);
    const loc_t* loc = sampling_locations + nqm * L * P * 2;  // this head's (L, P, 2) block
    const loc_t* weight = attention_weights + nqm * L * P;    // this head's (L, P) block
    const long long row = static_cast<long long>(M) * D;         // distance between positions s and s+1
    const scalar_t* v_nm = value + n * S * row + m * D + d;      // &value[n, 0, m, d]

    // shared: the 32 lanes of this warp serve 32 channels of one (n, q, m) (same for all lanes)
    const bool shared = D % 32 == 0;
    const int LP = L * P, step = shared ? 32 : 1;
    acc_t acc = 0;
    for (int lp0 = 0; lp0 < LP; lp0 += step) {
      const Point<acc_t> mine = load_point<acc_t>(loc, weight, spatial_shapes, lp0 + (shared ? lane : 0), LP, P);
      const int count = LP - lp0 < step ? LP - lp0 : step;
      for (int k = 0; k < count; ++k) {  // the same count on every lane of a warp
        const int l = (lp0 + k) / P;
        const Point<acc_t> p = shared ? share_point(mine, k, static_cast<int>(spatial_shapes[2 * l + 1])) : mine;
        const scalar_t* v = v_nm + level_start[l] * row;  // &value[n, level_start[l], m, d]
        acc_t sample = 0;
        for (int c = 0; c < 4; ++c)  // outside the map: weight * 0 (NaN stays NaN)
          sample += p.b.w[c] * (p.b.pos[c] >= 0 ? T::load(v[p.b.pos[c] * row]) : acc_t(0));
        acc += p.a * sample;
      }
    }
    output[i] = T::store(acc);
  }
}

// ---------------------------------------------------------------------------------------
// Backward: one warp (32 threads) per (n, q, m).
// ---------------------------------------------------------------------------------------
// Given g = dLoss/dout (N, Lq, M, D), the chain rule through out = sum A * sum_c w_c * v_c gives
//
//   grad_value[n, pos_c, m, d]   += A * w_c * g[d]                 for each neighbour c
//   grad_weights[n, q, m, l, p]   = sum_d g[d] * sample[d]
//   grad_locations[.., 0] (x)     = A * W * sum_d g[d] * dsample[d]/dfx
//   grad_locations[.., 1] (y)     = A * H * sum_d g[d] * dsample[d]/dfy
//
// (the factor W comes from x_pixel = loc_x * W - 0.5, likewise H for y), with
//   dsample/dfx = (1 - fy) * (v_top_right - v_top_left) + fy * (v_bottom_right - v_bottom_left)
//   dsample/dfy = (1 - fx) * (v_bottom_left - v_top_left) + fx * (v_bottom_right - v_top_right).
//
// Who writes what:
//  * grad_value NEEDS atomics: many queries (and several points of one query) can pick the
//    same neighbour pixel, and their threads run at the same time. atomicAdd makes each
//    read-add-write indivisible. Each lane adds only into its own channels d.
//  * grad_weights and grad_locations AVOID atomics: each is a sum over the D channels of
//    one head, and exactly one warp serves that head. Lane k handles channels
//    d = k, k + 32, k + 64, ... and keeps partial sums in registers; warp_sum3 adds the 32
//    partials of all three sums at once with register-to-register shuffles, and three lanes
//    write the three results with plain stores. (A global atomicAdd per channel would make
//    D threads fight over one address.)
//
// Work done once per warp, not once per lane:
//  * grad_output[n, q, m, :] is loaded once, before the loop over points: lane k keeps its
//    channels in registers (up to G_REG of them, so D <= 32 * G_REG; larger D reloads the rest).
//  * the per-point work -- loading the location and weight, the bilinear weights and the
//    four positions -- is done for 32 points at a time, lane k taking point lp0 + k (one
//    coalesced load instead of 32 lanes each loading the same numbers), and handed to
//    every lane with 5 shuffles (share_point).
//
// Requirement: blockDim.x is a multiple of 32, so a warp never straddles two blocks and
// every lane of a warp takes the same trip through the loops (the shuffles need all 32).

// Sum of `v` over the 32 lanes of a warp, for three values at once, in 6 shuffles instead of
// 3 x 5. Exchange halves: after offset 16 the lanes 0-15 hold partial sums of (a, x) and the
// lanes 16-31 of (y, unused); after offset 8 each group of 8 lanes holds one of the four;
// offsets 4, 2, 1 finish each group's sum. The totals arrive in lane 0 (a), lane 8 (x) and
// lane 16 (y): the function returns the total this lane holds, and which one it is.
template <typename acc_t> struct Sum3 { acc_t total; int which; };  // which: 0 a, 1 x, 2 y, 3 none

template <typename acc_t>
__device__ __forceinline__ Sum3<acc_t> warp_sum3(acc_t a, acc_t x, acc_t y, int lane) {
  const bool high = lane & 16, odd = lane & 8;
  const acc_t give0 = high ? a : y, give1 = high ? x : acc_t(0);  // what the lane 16 away keeps
  const acc_t p0 = (high ? y : a) + __shfl_xor_sync(0xffffffffu, give0, 16);
  const acc_t p1 = (high ? acc_t(0) : x) + __shfl_xor_sync(0xffffffffu, give1, 16);
  acc_t q = (odd ? p1 : p0) + __shfl_xor_sync(0xffffffffu, odd ? p0 : p1, 8);
  for (int offset = 4; offset > 0; offset /= 2) q += __shfl_xor_sync(0xffffffffu, q, offset);
  Sum3<acc_t> r;
  r.total = q;
  r.which = (high ? 2 : 0) + (odd ? 1 : 0);
  return r;
}

// One channel d of one point: add into grad_value, and into this lane's three partial sums.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void backward_channel(const scalar_t* __restrict__ value, acc_t* __restrict__ grad_value,
                                                 long long level, long long row, int d, acc_t gd,
                                                 const Point<acc_t>& p, acc_t& part_a, acc_t& part_x,
                                                 acc_t& part_y) {
  typedef Scalar<scalar_t> T;
  const Bilinear<acc_t>& b = p.b;
  acc_t v[4];
  for (int c = 0; c < 4; ++c) v[c] = b.pos[c] >= 0 ? T::load(value[level + b.pos[c] * row + d]) : acc_t(0);
  part_a += gd * (b.w[0] * v[0] + b.w[1] * v[1] + b.w[2] * v[2] + b.w[3] * v[3]);
  part_x += gd * ((1 - b.fy) * (v[1] - v[0]) + b.fy * (v[3] - v[2]));
  part_y += gd * ((1 - b.fx) * (v[2] - v[0]) + b.fx * (v[3] - v[1]));
  for (int c = 0; c < 4; ++c)
    if (b.pos[c] >= 0) atomicAdd(&grad_value[level + b.pos[c] * row + d], p.a * b.w[c] * gd);
}

#define G_REG 4  // channels of grad_output per lane kept in registers (D <= 128 loads it once)

template <typename scalar_t, typename loc_t>
__global__ void msda_backward(const scalar_t* __restrict__ value,
                              const long long* __restrict__ spatial_shapes,
                              const long long* __restrict__ level_start,
                              const loc_t* __restrict__ sampling_locations,
                              const loc_t* __restrict__ attention_weights,
                              const scalar_t* __restrict__ grad_output,
                              typename Scalar<scalar_t>::acc_t* __restrict__ grad_value,
                              typename Scalar<scalar_t>::acc_t* __restrict__ grad_locations,
                              typename Scalar<scalar_t>::acc_t* __restrict__ grad_weights,
                              int N, int S, int M, int D, int Lq, int L, int P) {
  typedef Scalar<scalar_t> T;
  typedef typename T::acc_t acc_t;
  const int lane = threadIdx.x % 32;
  const long long warp = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const long long n_warps = static_cast<long long>(gridDim.x) * blockDim.x / 32;
  const long long total = static_cast<long long>(N) * Lq * M;
  const int LP = L * P;
  for (long long nqm = warp; nqm < total; nqm += n_warps) {  // same trips for all 32 lanes
    const int m = static_cast<int>(nqm % M);
    const long long n = nqm / (static_cast<long long>(Lq) * M);
    const loc_t* loc = sampling_locations + nqm * LP * 2;
    const loc_t* weight = attention_weights + nqm * LP;
    const scalar_t* g = grad_output + nqm * D;  // dLoss/dout[n, q, m, :]
    const long long row = static_cast<long long>(M) * D;
    const long long base = n * S * row + m * D;  // offset of [n, 0, m, 0] in value and grad_value

    acc_t g_reg[G_REG];  // this lane's channels of grad_output, loaded once
    for (int j = 0; j < G_REG; ++j) g_reg[j] = lane + 32 * j < D ? T::load(g[lane + 32 * j]) : acc_t(0);

    for (int lp0 = 0; lp0 < LP; lp0 += 32) {
      // lane k does the per-point work of point lp0 + k, once for the whole warp
      const Point<acc_t> mine = load_point<acc_t>(loc, weight, spatial_shapes, lp0 + lane, LP, P);
      const int count = LP - lp0 < 32 ? LP - lp0 : 32;
      for (int k = 0; k < count; ++k) {  // the same count on every lane
        const int lp = lp0 + k, l = lp / P;
        const Point<acc_t> p = share_point(mine, k, static_cast<int>(spatial_shapes[2 * l + 1]));
        const long long level = base + level_start[l] * row;
        acc_t part_a = 0, part_x = 0, part_y = 0;  // this lane's share of the three sums over d
#pragma unroll
        for (int j = 0; j < G_REG; ++j)
          if (lane + 32 * j < D)
            backward_channel(value, grad_value, level, row, lane + 32 * j, g_reg[j], p, part_a, part_x, part_y);
        for (int d = lane + 32 * G_REG; d < D; d += 32)  // D > 32 * G_REG: the rest from memory
          backward_channel(value, grad_value, level, row, d, T::load(g[d]), p, part_a, part_x, part_y);
        const Sum3<acc_t> sum = warp_sum3(part_a, part_x, part_y, lane);
        if ((lane & 7) == 0 && sum.which < 3) {  // lanes 0, 8, 16: plain stores, no atomics
          const long long out = nqm * LP + lp;
          if (sum.which == 0) {
            grad_weights[out] = sum.total;
          } else {
            const int size = static_cast<int>(spatial_shapes[2 * l + (sum.which == 1 ? 1 : 0)]);  // W for x, H for y
            grad_locations[out * 2 + sum.which - 1] = p.a * size * sum.total;
          }
        }
      }
    }
  }
}

#ifdef CUDA_HOST_EMULATION
// CPU build only: make the instantiations callable by name from Python (ctypes).
#define MSDA_REGISTER(...) EMU_REGISTER_KERNEL(msda_forward<__VA_ARGS__>) EMU_REGISTER_KERNEL(msda_backward<__VA_ARGS__>)
MSDA_REGISTER(float, float)
MSDA_REGISTER(double, double)
MSDA_REGISTER(half_t, half_t)
MSDA_REGISTER(half_t, float)
MSDA_REGISTER(bfloat16_t, bfloat16_t)
MSDA_REGISTER(bfloat16_t, float)
#endif
