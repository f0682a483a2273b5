// Bookkeeping of the cooperative (single-read) launches: which kernels the
// driver refused to launch on which device, so that later calls take the
// two-pass kernels without trying again, and how many single-read launches
// ran. Host-only and free of CUDA headers, so the CPU-only build and its tests
// reach it too (bnorm_ext._C's test hooks in ops.cpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

namespace bnorm_ext {
namespace cuda {

// What one cooperative launch attempt reported.
enum class CooperativeOutcome { kLaunched, kTooLarge };

// Per (kernel, device): the largest grid that launched, and whether a launch
// was refused as too large (cudaErrorCooperativeLaunchTooLarge: an MPS client,
// a partial-SM context). Thread-safe.
class CooperativeLaunchRecord {
 public:
  // Whether to attempt a launch of `grid` blocks: never after a refusal, and
  // while the stream is being captured only up to a grid that launched before
  // (so a captured graph never holds a launch that could be refused).
  bool should_try(const void* kernel, int device, int64_t grid, bool capturing) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find({kernel, device});
    if (it == entries_.end()) {
      return !capturing;
    }
    return !it->second.refused && (!capturing || grid <= it->second.largest_launched);
  }

  void note(const void* kernel, int device, int64_t grid, CooperativeOutcome outcome) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = entries_[{kernel, device}];
    if (outcome == CooperativeOutcome::kTooLarge) {
      e.refused = true;
    } else if (grid > e.largest_launched) {
      e.largest_launched = grid;
    }
  }

  // Number of (kernel, device) pairs whose launch was refused.
  int64_t refused_count() const {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t n = 0;
    for (const auto& kv : entries_) {
      n += kv.second.refused ? 1 : 0;
    }
    return n;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
  }

 private:
  struct Entry {
    int64_t largest_launched = 0;
    bool refused = false;
  };
  mutable std::mutex mutex_;
  std::map<std::pair<const void*, int>, Entry> entries_;
};

// The process-wide record.
inline CooperativeLaunchRecord& cooperative_launch_record() {
  static CooperativeLaunchRecord record;
  return record;
}

// Single-read kernels launched in this process (read by tests and the smoke
// check to see which path ran).
inline std::atomic<int64_t>& single_read_launch_count() {
  static std::atomic<int64_t> count{0};
  return count;
}

// For tests only: BNORM_EXT_CUDA_TEST_REFUSE_COOPERATIVE=1 makes every
// cooperative launch the record allows count as refused, without attempting it.
inline bool cooperative_refusal_forced() {
  const char* v = std::getenv("BNORM_EXT_CUDA_TEST_REFUSE_COOPERATIVE");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Attempts a cooperative launch of `grid` blocks through launch() (which
// returns its outcome; other errors throw) when the record allows it, and
// records the outcome. True when the kernel launched.
template <typename Launch>
bool launch_cooperative_recorded(const void* kernel, int device, int64_t grid, bool capturing, const Launch& launch) {
  CooperativeLaunchRecord& record = cooperative_launch_record();
  if (!record.should_try(kernel, device, grid, capturing)) {
    return false;
  }
  const CooperativeOutcome outcome = cooperative_refusal_forced() ? CooperativeOutcome::kTooLarge : launch();
  record.note(kernel, device, grid, outcome);
  return outcome == CooperativeOutcome::kLaunched;
}

}  // namespace cuda
}  // namespace bnorm_ext
