// Helpers shared by the CPU kernel files.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../batch_norm_args.h"
#include "../batch_norm_math.h"

namespace bnorm_ext {
namespace cpu {

// Channels of an [N, C, L] input up to this size (summed over the tensors a
// pass reads) are reduced and then written while still in L2.
constexpr int64_t kFusedChannelBytes = int64_t(1) << 20;
// ... when there are enough channels to share out between threads.
constexpr int64_t kFusedMinChannels = 8;

// Whether a training pass over `tensors` input-sized tensors takes the
// per-channel fused path (decided by shape only, so results do not depend on
// the thread count).
bool use_channel_fused_path(const BatchNormShape& s, int64_t tensors, int64_t element_size);

// Instruction sets the CPU kernels are built for (batch_norm_cpu_isa_builds.inc).
enum class CpuIsa { kDefault, kAvx2, kAvx512 };

// The widest build this CPU supports, capped by BNORM_EXT_CPU_ISA=default|avx2
// (read at each call, so tests can run every build).
CpuIsa cpu_isa();

// Makes the function call given with the kernel build that cpu_isa() names;
// every build is the same templates (batch_norm_*_cpu_kernels.inc).
#define BNORM_EXT_CPU_DISPATCH(...)                                                           \
  (::bnorm_ext::cpu::cpu_isa() == ::bnorm_ext::cpu::CpuIsa::kAvx512 ? isa_avx512::__VA_ARGS__ \
   : ::bnorm_ext::cpu::cpu_isa() == ::bnorm_ext::cpu::CpuIsa::kAvx2 ? isa_avx2::__VA_ARGS__   \
                                                                    : isa_default::__VA_ARGS__)

// A per-channel tensor ([C], any dtype, or None -> fallback) as C doubles.
std::vector<double> param_values(const OptTensor& p, int64_t C, double fallback);

// Writes C doubles into t (C elements, any floating dtype), in place (a const
// Tensor& still refers to mutable data).
void store_values(const Tensor& t, const std::vector<double>& v);

// C doubles as a [C] tensor of `dtype` on input's device.
Tensor channel_tensor(const std::vector<double>& v, const Tensor& input, at::ScalarType dtype);

// Increments num_batches_tracked (if given) and updates the running stats
// (if given) from absolute per-channel statistics, as torch does
// (defined in batch_norm_cpu.cpp, as everything declared here).
void update_running_stats_cpu(
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    const std::vector<WelfordData<double>>& stats);

// Per-channel mean and invstd (or biased var) from absolute statistics.
struct ChannelMoments {
  std::vector<double> mean;
  std::vector<double> spread;
};

// eps given: spread is invstd; none: the biased variance.
ChannelMoments channel_moments(const std::vector<WelfordData<double>>& stats, std::optional<double> eps);

// save_mean and save_invstd ([C], acc dtype) from absolute statistics.
std::tuple<Tensor, Tensor> saved_stats(const ChannelMoments& m, const Tensor& input);

// dtype of grad_weight / grad_bias: weight's, or the acc dtype when there is no weight.
at::ScalarType param_grad_type(const OptTensor& weight, const Tensor& input);

}  // namespace cpu
}  // namespace bnorm_ext
