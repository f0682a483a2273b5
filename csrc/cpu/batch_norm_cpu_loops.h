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

// A float sum over kLanes accumulators that can run over several rows; the
// lanes are folded pairwise, in a fixed order, at the end.
template <typename acc_t>
struct LaneSum {
  acc_t lane[kLanes] = {};

  // Adds f(i) for i < n.
  template <typename F>
  void add(int64_t n, const F& f) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        lane[j] += f(i + j);
      }
    }
    for (int j = 0; i < n; ++i, ++j) {
      lane[j] += f(i);
    }
  }

  // Adds f(i) here and g(i) to `other` for i < n, in one pass over i.
  template <typename F, typename G>
  void add_pair(LaneSum& other, int64_t n, const F& f, const G& g) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        lane[j] += f(i + j);
        other.lane[j] += g(i + j);
      }
    }
    for (int j = 0; i < n; ++i, ++j) {
      lane[j] += f(i);
      other.lane[j] += g(i);
    }
  }

  acc_t total() const {
    acc_t folded[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      folded[j] = lane[j];
    }
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int j = 0; j < width; ++j) {
        folded[j] += folded[j + width];
      }
    }
    return folded[0];
  }
};

// Rows per group in for_row_groups.
constexpr int kRowGroup = 4;

// For rows [r0, r1) of an [M, C] view in groups of up to kRowGroup rows:
// f(c, r, n) for each channel c of the group's rows r..r+n. Lets per-channel
// state (an accumulator, coefficients) be touched once per group, not per row.
template <typename F>
inline void for_row_groups(int64_t C, int64_t r0, int64_t r1, const F& f) {
  int64_t r = r0;
  for (; r + kRowGroup <= r1; r += kRowGroup) {
    for (int64_t c = 0; c < C; ++c) {
      f(c, r, kRowGroup);
    }
  }
  for (; r < r1; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      f(c, r, 1);
    }
  }
}

// Per-channel reduction of an [N, C, L] view. chunk_fn(n0, n1, c) -> Partial
// for the planes x[n0:n1, c, :]; a channel's chunks are merged in increasing n.
template <typename Partial, typename ChunkFn, typename MergeFn>
std::vector<Partial> reduce_chunks_nchw(
    int64_t N,
    int64_t C,
    int64_t L,
    Partial zero,
    const ChunkFn& chunk_fn,
    const MergeFn& merge) {
  const int64_t rows_per_task = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(L, 1));
  const int64_t tasks_per_channel = ceil_div(N, rows_per_task);
  std::vector<Partial> partial(C * tasks_per_channel, zero);
  at::parallel_for(0, C * tasks_per_channel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / tasks_per_channel;
      const int64_t n0 = (t % tasks_per_channel) * rows_per_task;
      partial[t] = chunk_fn(n0, std::min(N, n0 + rows_per_task), c);
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
  const int64_t rows_per_block = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(C, 1));
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
