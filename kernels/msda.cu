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
// attention_weights hold: scalar_t, or float when scalar_t is 16-bit (a bfloat16 location on a
// map 167 pixels wide is off by up to a third of a pixel). `acc_t` is what we add up in:
// double for double, float otherwise; a 16-bit result is rounded once, at the end.
//
// Notation: N batch, S flattened positions of all levels, M heads, D channels per head,
// Lq queries, L levels, P points per head and level, (H_l, W_l) level l's size.
//
// The file includes no system headers, so NVRTC compiles it on any machine without a CUDA
// toolkit, and g++ compiles it for the CPU through cuda_host_emulation.h (tests). Its one
// include is its sibling msda_types.cuh, which Python pastes in before handing it to NVRTC.
// Python compiles the templates it needs by name: msda_forward<float, float> (one channel
// per thread), msda_forward<float, float, 4> (four per thread), msda_backward<bfloat16_t, float>, ...

#include "msda_types.cuh"  // half_t, bfloat16_t, Scalar<scalar_t> (the conversions), Vec<scalar_t, V>

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
  acc_t a;       // the point's attention weight (set by load_point)
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

// The point of lane `src`, received in 5 shuffles: the weight, the two fractions, the top-left
// position and which neighbours are inside; every lane rebuilds the four weights and positions
// from those (a few multiplies, cheaper than 6 more shuffles). W: the width of its level.
// `width` (a power of two <= 32): the warp is cut into segments of that many lanes, and `src`
// counts from the start of this lane's segment. All 32 lanes must call it together.
template <typename acc_t>
__device__ __forceinline__ Bilinear<acc_t> share_point(const Bilinear<acc_t>& mine, int src, int W,
                                                       int width = 32) {
  int inside = 0;
  for (int c = 0; c < 4; ++c) inside |= (mine.pos[c] >= 0 ? 1 : 0) << c;
  Bilinear<acc_t> p;
  p.a = __shfl_sync(0xffffffffu, mine.a, src, width);
  p.fx = __shfl_sync(0xffffffffu, mine.fx, src, width);
  p.fy = __shfl_sync(0xffffffffu, mine.fy, src, width);
  p.origin = __shfl_sync(0xffffffffu, mine.origin, src, width);
  inside = __shfl_sync(0xffffffffu, inside, src, width);
  p.w[0] = (1 - p.fy) * (1 - p.fx);
  p.w[1] = (1 - p.fy) * p.fx;
  p.w[2] = p.fy * (1 - p.fx);
  p.w[3] = p.fy * p.fx;
  const int offset[4] = {0, 1, W, W + 1};
  for (int c = 0; c < 4; ++c) p.pos[c] = (inside >> c & 1) ? p.origin + offset[c] : -1;
  return p;
}

// The work of point lp of a head, done by the lane that owns it: load the weight and the
// location, set up the bilinear weights. A lane without a point (lp >= L * P) gets defined values.
template <typename acc_t, typename loc_t>
__device__ __forceinline__ Bilinear<acc_t> load_point(const loc_t* __restrict__ loc, const loc_t* __restrict__ weight,
                                                   const long long* __restrict__ spatial_shapes, int lp, int LP,
                                                   int P) {
  typedef Scalar<loc_t> TL;
  const bool have = lp < LP;
  const int l = have ? lp / P : 0;
  Bilinear<acc_t> mine = have ? bilinear<acc_t>(TL::load(loc[2 * lp]), TL::load(loc[2 * lp + 1]),
                                                static_cast<int>(spatial_shapes[2 * l]),
                                                static_cast<int>(spatial_shapes[2 * l + 1]))
                              : bilinear<acc_t>(acc_t(0), acc_t(0), 1, 1);
  mine.a = have ? TL::load(weight[lp]) : acc_t(0);
  return mine;
}

// ---------------------------------------------------------------------------------------
// Forward: one thread per VEC neighbouring output elements (VEC = 1: one per element).
// ---------------------------------------------------------------------------------------
// Thread i owns out[n, q, m, d .. d + VEC - 1] with i = ((n * Lq + q) * M + m) * (D / VEC) + d / VEC.
// It walks all L levels and P points of its head, keeps its VEC running sums in registers, and
// writes once: no two threads write the same element, so no atomics. Neighbouring threads own
// neighbouring channels, so their reads of value[n, s, m, :] are contiguous (coalesced).
// With VEC > 1 each of the four reads of a sample is one vector load of VEC channels (Vec: a
// float4, two doubles, eight 16-bit values). The wrapper picks VEC (cupy_kernel.vector_width):
// the widest that divides D and fits value's alignment, else VEC = 1, one channel per load.
// The loop is grid-stride: if the grid is smaller than the work, each warp moves on by
// (total number of threads) and takes more.
//
// The G = D / VEC threads of one (n, q, m) come in segments of `seg` lanes, seg the largest
// power of two dividing G (at most 32), so a segment never straddles two heads (the paper's
// D = 32: one head per warp with VEC = 1, four heads of 8 lanes with float4). Each point's
// work is done by one lane of the segment and shared by shuffles (load_point, share_point);
// with seg = 1 (G odd) every thread does it for itself. Shuffles need all 32 lanes, so the
// loop runs warp by warp: a lane past the end of the work shadows the lane of the last head in
// its place of the segment (the same loads and shuffles) and stores nothing.
template <typename scalar_t, typename loc_t, int VEC = 1>
__global__ void msda_forward(const scalar_t* __restrict__ value,
                             const long long* __restrict__ spatial_shapes,
                             const long long* __restrict__ level_start,
                             const loc_t* __restrict__ sampling_locations,
                             const loc_t* __restrict__ attention_weights,
                             scalar_t* __restrict__ output,
                             int N, int S, int M, int D, int Lq, int L, int P) {
  typedef Scalar<scalar_t> T;
  typedef typename T::acc_t acc_t;
  typedef Vec<scalar_t, VEC> V;
  const int G = D / VEC;                          // threads per (n, q, m)
  const int seg = (G & -G) < 32 ? (G & -G) : 32;  // lanes that share one head's points
  const long long total = static_cast<long long>(N) * Lq * M * G;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const int lane = threadIdx.x % 32, sub = lane % seg;  // sub: this lane's place in its segment
  const long long row = static_cast<long long>(M) * D;  // distance between positions s and s+1
  const int LP = L * P;
  // w: the warp's first thread (blockDim.x is a multiple of 32), the same on all its lanes
  for (long long w = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x - lane; w < total; w += stride) {
    const bool active = w + lane < total;  // false only for some lanes of the last warp
    const long long i = active ? w + lane : total - seg + sub;
    const int d = static_cast<int>(i % G) * VEC;  // the first of this thread's channels
    const long long nqm = i / G;  // ((n * Lq + q) * M + m): the (query, head) pair this thread serves
    const int m = static_cast<int>(nqm % M);
    const long long n = nqm / (static_cast<long long>(Lq) * M);
    const loc_t* loc = sampling_locations + nqm * LP * 2;  // this head's (L, P, 2) block
    const loc_t* weight = attention_weights + nqm * LP;    // this head's (L, P) block
    const scalar_t* v_nm = value + n * S * row + m * D + d;  // &value[n, 0, m, d]

    acc_t acc[VEC];
    for (int j = 0; j < VEC; ++j) acc[j] = 0;
    for (int lp0 = 0; lp0 < LP; lp0 += seg) {
      const Bilinear<acc_t> mine = load_point<acc_t>(loc, weight, spatial_shapes, lp0 + sub, LP, P);
      const int count = LP - lp0 < seg ? LP - lp0 : seg;
      for (int k = 0; k < count; ++k) {  // the same count on every lane of a warp
        const int l = (lp0 + k) / P;
        const Bilinear<acc_t> p = seg > 1 ? share_point(mine, k, static_cast<int>(spatial_shapes[2 * l + 1]), seg)
                                          : mine;
        const scalar_t* v = v_nm + level_start[l] * row;  // &value[n, level_start[l], m, d]
        acc_t sample[VEC];
        for (int j = 0; j < VEC; ++j) sample[j] = 0;
        for (int c = 0; c < 4; ++c) {
          V x = {};  // outside the map: zeros, and weight * 0 (NaN stays NaN)
          if (p.pos[c] >= 0) x = *reinterpret_cast<const V*>(v + p.pos[c] * row);  // one load
          for (int j = 0; j < VEC; ++j) sample[j] += p.w[c] * T::load(x.x[j]);
        }
        for (int j = 0; j < VEC; ++j) acc[j] += p.a * sample[j];
      }
    }
    if (active) {
      V out;
      for (int j = 0; j < VEC; ++j) out.x[j] = T::store(acc[j]);
      *reinterpret_cast<V*>(output + i * VEC) = out;  // out[n, q, m, d .. d + VEC - 1]
    }
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
//  * grad_weights and grad_locations AVOID atomics: each is a sum over the D channels of one
//    head, and exactly one warp serves that head. Each lane keeps partial sums over its
//    channels in registers; warp_sum3 adds the 32 partials of all three sums at once with
//    shuffles, and three lanes write the results with plain stores (a global atomicAdd per
//    channel would make D threads fight over one address).
//
// Work done once per warp, not once per lane:
//  * grad_output[n, q, m, :] is loaded once, before the loop over points: lane k keeps its
//    channels in registers (up to G_REG of them, so D <= 32 * G_REG; larger D reloads the rest).
//  * where D is even and the rows are aligned, one load reads two neighbouring channels.
//  * the per-point work is done for 32 points at a time, lane k taking point lp0 + k (one
//    coalesced load instead of 32 lanes loading the same numbers), and shared (share_point).
//
// Requirement: blockDim.x is a multiple of 32, so a warp never straddles two blocks and all
// its lanes take the same trips through the loops (the shuffles need all 32).

// Sum of `v` over the 32 lanes of a warp, for three values at once, in 6 shuffles instead of
// 3 x 5. After offset 16 lanes 0-15 hold partial sums of (a, x), lanes 16-31 of (y, unused);
// after offset 8 each group of 8 lanes holds one of the four; offsets 4, 2, 1 finish it.
// Lane 0 ends with a, lane 8 with x, lane 16 with y: `which` says what this lane holds.
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

// Two neighbouring channels in one load (vectorised), where rows and pointers allow it.
template <typename scalar_t> struct alignas(2 * sizeof(scalar_t)) Pair { scalar_t x, y; };

// Channels d[0] and d[1] of one point (skipping one that is >= D): add into grad_value and
// into this lane's three partial sums. With `pairs`, d[1] = d[0] + 1 and one load reads both.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void backward_channels(const scalar_t* __restrict__ value, acc_t* __restrict__ grad_value,
                                                  long long level, long long row, const int d[2], const acc_t g[2],
                                                  int D, bool pairs, const Bilinear<acc_t>& p, acc_t part[3]) {
  typedef Scalar<scalar_t> T;
  const Bilinear<acc_t>& b = p;
  acc_t v[2][4];  // [channel][neighbour]
  for (int c = 0; c < 4; ++c) {
    const long long at = level + b.pos[c] * row;
    if (b.pos[c] >= 0 && pairs && d[0] < D) {
      const Pair<scalar_t> two = *reinterpret_cast<const Pair<scalar_t>*>(value + at + d[0]);
      v[0][c] = T::load(two.x);
      v[1][c] = T::load(two.y);
    } else {
      for (int h = 0; h < 2; ++h) v[h][c] = b.pos[c] >= 0 && d[h] < D ? T::load(value[at + d[h]]) : acc_t(0);
    }
  }
  for (int h = 0; h < 2; ++h) {
    if (d[h] >= D) continue;
    part[0] += g[h] * (b.w[0] * v[h][0] + b.w[1] * v[h][1] + b.w[2] * v[h][2] + b.w[3] * v[h][3]);
    part[1] += g[h] * ((1 - b.fy) * (v[h][1] - v[h][0]) + b.fy * (v[h][3] - v[h][2]));
    part[2] += g[h] * ((1 - b.fx) * (v[h][2] - v[h][0]) + b.fx * (v[h][3] - v[h][1]));
    for (int c = 0; c < 4; ++c)
      if (b.pos[c] >= 0) atomicAdd(&grad_value[level + b.pos[c] * row + d[h]], p.a * b.w[c] * g[h]);
  }
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
  // Pairs of channels per load when D is even and both rows start on a pair boundary
  // (the same answer for every thread); otherwise one channel per load.
  const unsigned long long pair_bytes = 2 * sizeof(scalar_t);
  const bool pairs = D % 2 == 0 && reinterpret_cast<unsigned long long>(value) % pair_bytes == 0 &&
                     reinterpret_cast<unsigned long long>(grad_output) % pair_bytes == 0 && sizeof(scalar_t) < 8;
  for (long long nqm = warp; nqm < total; nqm += n_warps) {  // same trips for all 32 lanes
    const int m = static_cast<int>(nqm % M);
    const long long n = nqm / (static_cast<long long>(Lq) * M);
    const loc_t* loc = sampling_locations + nqm * LP * 2;
    const loc_t* weight = attention_weights + nqm * LP;
    const scalar_t* g = grad_output + nqm * D;  // dLoss/dout[n, q, m, :]
    const long long row = static_cast<long long>(M) * D;
    const long long base = n * S * row + m * D;  // offset of [n, 0, m, 0] in value and grad_value

    // Lane k's channels, two per step of 64: (2k, 2k + 1) with pairs, else (k, k + 32).
    const int first = pairs ? 2 * lane : lane, second = pairs ? 1 : 32;
    acc_t g_reg[G_REG];  // this lane's channels of grad_output, loaded once
    for (int j = 0; j < G_REG; ++j) {
      const int d = first + 64 * (j / 2) + (j % 2) * second;
      g_reg[j] = d < D ? T::load(g[d]) : acc_t(0);
    }

    for (int lp0 = 0; lp0 < LP; lp0 += 32) {
      // lane k does the per-point work of point lp0 + k, once for the whole warp
      const Bilinear<acc_t> mine = load_point<acc_t>(loc, weight, spatial_shapes, lp0 + lane, LP, P);
      const int count = LP - lp0 < 32 ? LP - lp0 : 32;
      for (int k = 0; k < count; ++k) {  // the same count on every lane
        const int lp = lp0 + k, l = lp / P;
        const Bilinear<acc_t> p = share_point(mine, k, static_cast<int>(spatial_shapes[2 * l + 1]));
        const long long level = base + level_start[l] * row;
        acc_t part[3] = {0, 0, 0};  // this lane's share of the three sums over d
#pragma unroll
        for (int j = 0; j < G_REG / 2; ++j) {
          const int d[2] = {first + 64 * j, first + 64 * j + second};
          const acc_t gd[2] = {g_reg[2 * j], g_reg[2 * j + 1]};
          backward_channels(value, grad_value, level, row, d, gd, D, pairs, p, part);
        }
        for (int d0 = first + 64 * (G_REG / 2); d0 < D; d0 += 64) {  // D > 32 * G_REG: the rest from memory
          const int d[2] = {d0, d0 + second};
          const acc_t gd[2] = {T::load(g[d0]), d0 + second < D ? T::load(g[d0 + second]) : acc_t(0)};
          backward_channels(value, grad_value, level, row, d, gd, D, pairs, p, part);
        }
        const Sum3<acc_t> sum = warp_sum3(part[0], part[1], part[2], lane);
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

#ifdef CUDA_HOST_EMULATION  // CPU build only: the instantiations, callable by name from Python (ctypes)
// The widths VEC as cupy_kernel.vector_widths lists them: 16, 8 and 4 bytes of channels.
#define MSDA_REGISTER(...) EMU_REGISTER_KERNEL(msda_forward<__VA_ARGS__>) EMU_REGISTER_KERNEL(msda_backward<__VA_ARGS__>)
#define MSDA_VEC(V, ...) EMU_REGISTER_KERNEL(msda_forward<__VA_ARGS__, V>)
#define MSDA_16BIT(...) MSDA_REGISTER(__VA_ARGS__) MSDA_VEC(8, __VA_ARGS__) MSDA_VEC(4, __VA_ARGS__) MSDA_VEC(2, __VA_ARGS__)
MSDA_REGISTER(float, float) MSDA_VEC(4, float, float) MSDA_VEC(2, float, float)
MSDA_REGISTER(double, double) MSDA_VEC(2, double, double)
MSDA_16BIT(half_t, half_t) MSDA_16BIT(half_t, float) MSDA_16BIT(bfloat16_t, bfloat16_t) MSDA_16BIT(bfloat16_t, float)
#endif
