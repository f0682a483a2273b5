// Parallel loop skeletons of the CPU kernels over the two dense layouts:
// [N, C, L] (NCHW-like, a row is one (n, c) plane) and [M, C] (channels-last,
// a row is one position's C channels). Work is split by size only, never by
// thread count, and partials are merged in index order, so results are
// bitwise identical whatever at::get_num_threads() is.
#pragma once

#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../batch_norm_math.h"

namespace bnorm_ext {
namespace cpu {

// Elements one [N, C, L] task handles: the task's rows stay in L2 between the
// two passes of a two-pass sum, and enough tasks exist to share out.
constexpr int64_t kTaskElems = int64_t(1) << 15;
// Elements one [M, C] block handles: blocks are merged channel by channel
// (C Chan merges each), so they are larger; still L2-sized.
constexpr int64_t kBlockElems = int64_t(1) << 18;
// Type the CPU kernels sum statistics and gradient sums in, for every input
// dtype. NB: a float sum of n values loses about sqrt(n) ulps; torch's CPU
// kernels sum float32 NCHW statistics in double per element, and so do we, in
// both layouts; gradient sums add float runs of kRunIters values into double
// (torch: a float run per plane).
using sum_t = double;

// Type the CPU elementwise kernels (training normalize, input gradient) compute in:
// double for float32 input, so each output is rounded to float32 once (torch's
// x * alpha + beta in float rounds it three times, and alpha and beta too); the
// float opmath type for half and bfloat16, whose own rounding dominates.
template <typename scalar_t>
struct ElemType {
  using type = double;
};
template <>
struct ElemType<c10::Half> {
  using type = float;
};
template <>
struct ElemType<c10::BFloat16> {
  using type = float;
};
template <typename scalar_t>
using elem_type = typename ElemType<scalar_t>::type;

// A value of a channel's sums: v - shift, the channel's first value, for
// double input (large-mean data would cancel); v as is for the others. NB: a
// run of float32 values sums in double with ~29 bits to spare.
template <typename scalar_t>
inline sum_t shifted_value(scalar_t v, sum_t shift) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return v - shift;
  } else {
    return static_cast<sum_t>(v);
  }
}

// The shift of a channel whose first value is `first` (see shifted_value).
template <typename scalar_t>
inline sum_t sum_shift(scalar_t first) {
  return std::is_same_v<scalar_t, double> ? static_cast<sum_t>(first) : sum_t(0);
}

// Per-channel y = x * scale + shift, the float32 normalize, in double.
// NB: one rounding to float32 per output (torch's float x * alpha + beta
// rounds three times, and alpha and beta too); the double product and sum err
// by ~2^-53 |x * scale|, far below that for float32 data with any spread.
struct ScaleShift {
  double scale;
  double shift;
};

// Per-channel coefficients of the normalize for scalar_t input computed in
// elem_t, and y from them: batch_norm_math.h's NormalizeCoeffs (float64 keeps
// x - mean first, for |mean| >> std), ScaleShift for float32 in double.
// NB: eval mode normalizes float32 in float (Normalize<float, float>, as
// before: no statistics of ours in it, and the double form costs it time).
template <typename scalar_t, typename elem_type_t = elem_type<scalar_t>>
struct Normalize {
  using elem_t = elem_type_t;
  using Coeffs = NormalizeCoeffs<elem_t>;
  // The mean split hi + lo in elem_t.
  static Coeffs coeffs(double mean, double invstd, double weight, double bias) {
    const elem_t mean_hi = static_cast<elem_t>(mean);
    const elem_t mean_lo = static_cast<elem_t>(mean - static_cast<double>(mean_hi));
    return normalize_coeffs<elem_t>(mean_hi, invstd, weight, bias, mean_lo);
  }
  static elem_t apply(const Coeffs& k, elem_t x) {
    return normalize_apply(k, x);
  }
};
template <>
struct Normalize<float, double> {
  using elem_t = double;
  using Coeffs = ScaleShift;
  static Coeffs coeffs(double mean, double invstd, double weight, double bias) {
    const double scale = weight * invstd;
    return {scale, bias - mean * scale};
  }
  static double apply(const Coeffs& k, double x) {
    return x * k.scale + k.shift;
  }
};

// Independent accumulators in LaneSum (lets the compiler vectorise a float
// reduction without reassociating it).
constexpr int kLanes = 16;
// Iterations (of kLanes values, or channels-last rows) the gradient sums add
// in float before adding the run into double (LaneSum::add_pair_runs).
constexpr int64_t kRunIters = 16;

// e^x of float x in branch-free code, so that a loop calling it vectorises
// (std::exp is a libm call per element): Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, Cephes' degree-7 polynomial for e^r, times 2^n in two factors
// (results down to the subnormals). Within 0.99 ulp of e^x for every float x
// whose e^x is a normal float (each checked against double exp); Inf above
// 88.7228, 0 below -104, NaN for NaN.
C10_ALWAYS_INLINE float exp_branch_free(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  const auto bits = [](float f) {
    int32_t i;
    std::memcpy(&i, &f, sizeof(i));
    return i;
  };
  const auto pow2 = [](int32_t n) {  // 2^n, -126 <= n <= 127
    const int32_t i = (n + 127) << 23;
    float f;
    std::memcpy(&f, &i, sizeof(f));
    return f;
  };
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  const int32_t n_int = bits(t) - bits(kRound);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = (p * (r * r) + r) + 1.0f;
  const int32_t n_half = n_int >> 1;
  const float y = e_r * pow2(n_half) * pow2(n_int - n_half);
  const float y_or_inf = x > 88.72283935546875f ? std::numeric_limits<float>::infinity() : y;
  return x < -104.0f ? 0.0f : y_or_inf;
}

// e^x for the CPU kernels' silu: exp_branch_free for float, std::exp else.
// NB: forced inline, since a call left in a loop would stop its vectorisation.
struct CpuExp {
  C10_ALWAYS_INLINE float operator()(float x) const {
    return exp_branch_free(x);
  }
  double operator()(double x) const {
    return std::exp(x);
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Elements a channels-last task covers (at least kRunIters whole rows).
constexpr int64_t kClTaskElems = int64_t(1) << 15;

// One task of a ClGrid: rows [r0, r1) (row chunk `chunk`) x channels [c0, c1).
struct ClTask {
  int64_t chunk;
  int64_t r0;
  int64_t r1;
  int64_t c0;
  int64_t c1;
};

// Work grid of a channels-last [M, C] view: row chunks (multiples of kRunIters
// rows) x channel slabs, fixed by the shape alone, so the partials and the
// order they are merged in never depend on the thread count. Task t is
// (chunk t / slabs, slab t % slabs): consecutive tasks are neighbours in memory.
struct ClGrid {
  int64_t M;
  int64_t C;
  int64_t width;  // channels per slab
  int64_t rows;   // rows per chunk
  int64_t slabs;
  int64_t chunks;

  ClGrid(int64_t M_, int64_t C_, int64_t run_rows) : M(M_), C(C_) {
    // NB: one slab of whole rows, so a task reads one sequential stream: with
    // slabs of 256 channels (1 KiB of each 8 KiB row) the 16x2048x7x7 forward
    // took 4x the time per element of 16x512x14x14.
    width = std::max<int64_t>(C, 1);
    rows = std::max<int64_t>(run_rows, kClTaskElems / width / run_rows * run_rows);
    slabs = ceil_div(std::max<int64_t>(C, 1), width);
    chunks = ceil_div(M, rows);
  }
  int64_t tasks() const {
    return slabs * chunks;
  }
  ClTask task(int64_t t) const {
    const int64_t chunk = t / slabs;
    const int64_t slab = t % slabs;
    return {chunk, chunk * rows, std::min(M, (chunk + 1) * rows), slab * width, std::min(C, (slab + 1) * width)};
  }
};

// Grain (in slabs) of a parallel per-channel finish over `grid`'s chunk
// partials: one thread unless there are enough of them to share out.
inline int64_t finish_grain(const ClGrid& grid) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, grid.chunks * grid.width));
}

// Per-channel dx = dy * dy_scale + x * x_scale + shift, the float32 training
// input gradient, in double: x_scale and shift fold the mean in (exact enough
// in double, as for ScaleShift), one rounding to float32 per element.
struct InputGradCoeffs {
  double dy_scale;
  double x_scale;
  double shift;
};

// Per-channel coefficients of the input gradient for scalar_t input, from the
// double ones, and dx from them: batch_norm_math.h's BackwardCoeffs in elem_t,
// InputGradCoeffs for float32. Eval mode uses dy * dy_scale alone.
template <typename scalar_t>
struct InputGrad {
  using elem_t = elem_type<scalar_t>;
  using Coeffs = BackwardCoeffs<elem_t>;
  static Coeffs coeffs(const BackwardCoeffs<double>& k) {
    return {
        static_cast<elem_t>(k.mean), static_cast<elem_t>(k.dy_scale), static_cast<elem_t>(k.xmu_scale),
        static_cast<elem_t>(k.shift)};
  }
  static elem_t apply(const Coeffs& k, elem_t dy, elem_t x) {
    return backward_apply(k, dy, x);
  }
};
template <>
struct InputGrad<float> {
  using elem_t = double;
  using Coeffs = InputGradCoeffs;
  static Coeffs coeffs(const BackwardCoeffs<double>& k) {
    return {k.dy_scale, k.xmu_scale, k.shift - k.mean * k.xmu_scale};
  }
  static double apply(const Coeffs& k, double dy, double x) {
    return dy * k.dy_scale + (x * k.x_scale + k.shift);
  }
};

}  // namespace cpu
}  // namespace bnorm_ext
