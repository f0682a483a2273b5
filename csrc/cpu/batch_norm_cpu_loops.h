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

// Elements one task handles: large enough to amortise scheduling, small enough
// that a task's rows stay in L2 between the two passes of a two-pass sum.
constexpr int64_t kTaskElems = int64_t(1) << 15;
// Independent accumulators in lane_sum (lets the compiler vectorise a float
// reduction without reassociating it).
constexpr int kLanes = 16;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// sum_{i < n} f(i) over kLanes accumulators, folded pairwise in fixed order.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, const F& f) {
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      lane[j] += f(i + j);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    lane[j] += f(i);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) {
      lane[j] += lane[j + width];
    }
  }
  return lane[0];
}

// Per-channel reduction of an [N, C, L] view. row_fn(n, c) -> Partial for the
// plane x[n, c, :]; rows of a channel are merged in increasing n.
template <typename Partial, typename RowFn, typename MergeFn>
std::vector<Partial> reduce_rows_nchw(
    int64_t N,
    int64_t C,
    int64_t L,
    Partial zero,
    const RowFn& row_fn,
    const MergeFn& merge) {
  const int64_t rows_per_task = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(L, 1));
  const int64_t tasks_per_channel = ceil_div(N, rows_per_task);
  std::vector<Partial> partial(C * tasks_per_channel, zero);
  at::parallel_for(0, C * tasks_per_channel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / tasks_per_channel;
      const int64_t n0 = (t % tasks_per_channel) * rows_per_task;
      const int64_t n1 = std::min(N, n0 + rows_per_task);
      Partial acc = row_fn(n0, c);
      for (int64_t n = n0 + 1; n < n1; ++n) {
        acc = merge(acc, row_fn(n, c));
      }
      partial[t] = acc;
    }
  });
  std::vector<Partial> result(C, zero);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < tasks_per_channel; ++k) {
      result[c] = k == 0 ? partial[c * tasks_per_channel]
                         : merge(result[c], partial[c * tasks_per_channel + k]);
    }
  }
  return result;
}

// Per-channel reduction of an [M, C] view. block_fn(r0, r1, out) writes the C
// partials of rows [r0, r1) to out[0..C); blocks are merged in increasing r.
template <typename Partial, typename BlockFn, typename MergeFn>
std::vector<Partial> reduce_blocks_cl(
    int64_t M,
    int64_t C,
    Partial zero,
    const BlockFn& block_fn,
    const MergeFn& merge) {
  const int64_t rows_per_block = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(C, 1));
  const int64_t blocks = ceil_div(M, rows_per_block);
  std::vector<Partial> partial(blocks * C, zero);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * rows_per_block;
      block_fn(r0, std::min(M, r0 + rows_per_block), partial.data() + b * C);
    }
  });
  std::vector<Partial> result(C, zero);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      result[c] = b == 0 ? partial[c] : merge(result[c], partial[b * C + c]);
    }
  }
  return result;
}

// Calls row_fn(r) for every r < rows (rows of row_len elements), in parallel.
template <typename RowFn>
void parallel_rows(int64_t rows, int64_t row_len, const RowFn& row_fn) {
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(row_len, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      row_fn(r);
    }
  });
}

} // namespace cpu
} // namespace bnorm_ext
