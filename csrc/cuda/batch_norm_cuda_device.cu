// Per-device facts the CUDA launchers size their grids by, cached per device
// (and per kernel for the single-read limits).
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

#include "batch_norm_cuda_single_read.cuh"

namespace bnorm_ext {
namespace cuda {

namespace {

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

}  // namespace

int sm_count() {
  static int counts[64] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 64 && counts[device] > 0) {
    return counts[device];
  }
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  if (device < 64) {
    counts[device] = sms;
  }
  return sms;
}

SingleReadLimits single_read_limits(const void* kernel, int blocks_per_sm) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, SingleReadLimits> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find({kernel, device});
  if (it != known.end()) {
    return it->second;
  }
  SingleReadLimits limits;
  if (device_attribute(cudaDevAttrCooperativeLaunch, device) != 0) {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    const int64_t static_smem = static_cast<int64_t>(attr.sharedSizeBytes);
    const int64_t per_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    const int64_t per_block_optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    const int64_t reserved = device_attribute(cudaDevAttrReservedSharedMemoryPerBlock, device);
    // The SM's shared memory split between blocks_per_sm blocks, in KiB units.
    const int64_t dynamic = std::min(per_sm / blocks_per_sm - reserved, per_block_optin) - static_smem;
    const int64_t dynamic_kib = dynamic / 1024 * 1024;
    if (dynamic_kib > 0) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic_kib)));
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
      int blocks = 0;
      C10_CUDA_CHECK(
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kBlockSize, static_cast<size_t>(dynamic_kib)));
      limits = {blocks, dynamic_kib};
    }
  }
  known.emplace(std::make_pair(kernel, device), limits);
  return limits;
}

}  // namespace cuda
}  // namespace bnorm_ext
