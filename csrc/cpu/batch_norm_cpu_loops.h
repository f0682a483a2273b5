// Parallel loop skeletons of the CPU kernels over the two dense layouts:
// [N, C, L] (NCHW-like, a row is one (n, c) plane) and [M, C] (channels-last,
// a row is one position's C channels). Work is split by size only, never by
// thread count, and partials are merged in index order, so results are
// bitwise identical whatever at::get_num_threads() is.
#pragma once

#include <ATen/Parallel.h>

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
// Independent accumulators in LaneSum (lets the compiler vectorise a float
// reduction without reassociating it).
constexpr int kLanes = 16;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

} // namespace cpu
} // namespace bnorm_ext
