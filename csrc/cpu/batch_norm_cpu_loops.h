// Parallel loop skeletons of the CPU kernels over the two dense layouts:
// [N, C, L] (NCHW-like, a row is one (n, c) plane) and [M, C] (channels-last,
// a row is one position's C channels). Work is split by size only, never by
// thread count, and partials are merged in index order, so results are
// bitwise identical whatever at::get_num_threads() is.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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
// kernels sum float32 NCHW statistics in double, and so do we, in both layouts
// and in the backward (per-element double adds: no run of float sums at all).
using sum_t = double;

// Type the CPU elementwise kernels (normalize, input gradient) compute in:
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

// Independent accumulators in LaneSum (lets the compiler vectorise a float
// reduction without reassociating it).
constexpr int kLanes = 16;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

} // namespace cpu
} // namespace bnorm_ext
