// The CPU helpers declared in batch_norm_cpu.h: instruction-set choice, path choice, per-channel
// vectors, running-statistics update and saved statistics.
#include "batch_norm_cpu.h"

#include <ATen/Dispatch.h>

#include <cstdlib>
#include <string>

namespace bnorm_ext {
namespace cpu {

CpuIsa cpu_isa() {
#if defined(__x86_64__)
  static const CpuIsa supported =
      (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
          ? CpuIsa::kAvx512
      : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? CpuIsa::kAvx2
                                                                          : CpuIsa::kDefault;
#else
  const CpuIsa supported = CpuIsa::kDefault;
#endif
  const char* cap = std::getenv("BNORM_EXT_CPU_ISA");
  if (cap != nullptr && std::string(cap) == "default") {
    return CpuIsa::kDefault;
  }
  if (cap != nullptr && std::string(cap) == "avx2" && supported == CpuIsa::kAvx512) {
    return CpuIsa::kAvx2;
  }
  return supported;
}

bool use_channel_fused_path(const BatchNormShape& s, int64_t tensors, int64_t element_size) {
  return !s.channels_last && s.C >= kFusedMinChannels && s.reduce_size() > 0 &&
         s.reduce_size() * tensors * element_size <= kFusedChannelBytes;
}

// NB: per-channel vectors are read and written in place, without temporary
// tensors: these small copies are a fixed cost of every call.
std::vector<double> param_values(const OptTensor& p, int64_t C, double fallback) {
  std::vector<double> v(C, fallback);
  if (p.has_value() && p->defined()) {
    const Tensor t = p->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "param_values", [&] {
      const scalar_t* data = t.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        v[c] = static_cast<double>(data[c]);
      }
    });
  }
  return v;
}

void store_values(const Tensor& t, const std::vector<double>& v) {
  if (!t.is_contiguous()) {
    Tensor flat = at::empty({t.numel()}, t.options());
    store_values(flat, v);
    t.copy_(flat.view(t.sizes()));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "store_values", [&] {
    scalar_t* data = t.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < v.size(); ++c) {
      data[c] = static_cast<scalar_t>(v[c]);
    }
  });
}

Tensor channel_tensor(const std::vector<double>& v, const Tensor& input, at::ScalarType dtype) {
  Tensor t = at::empty({static_cast<int64_t>(v.size())}, input.options().dtype(dtype));
  store_values(t, v);
  return t;
}

void update_running_stats_cpu(
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    const std::vector<WelfordData<double>>& stats) {
  const bool has_nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  int64_t batches = 1;
  if (has_nbt) {
    batches = ++*num_batches_tracked->mutable_data_ptr<int64_t>();
  }
  if (!running_mean.has_value() || !running_mean->defined() || stats.empty() || stats[0].count == 0.0) {
    return;  // NB: an empty batch leaves the running stats as they are, as torch does.
  }
  const double factor = running_average_factor(momentum.has_value(), momentum.value_or(0.0), batches);
  const int64_t C = static_cast<int64_t>(stats.size());
  std::vector<double> rm = param_values(running_mean, C, 0.0);
  std::vector<double> rv = param_values(running_var, C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const double unbiased_var = stats[c].m2 / (stats[c].count - 1.0);
    rm[c] = running_update(rm[c], stats[c].mean, factor);
    rv[c] = running_update(rv[c], unbiased_var, factor);
  }
  store_values(*running_mean, rm);
  store_values(*running_var, rv);
}

ChannelMoments channel_moments(const std::vector<WelfordData<double>>& stats, std::optional<double> eps) {
  ChannelMoments m{std::vector<double>(stats.size()), std::vector<double>(stats.size())};
  for (size_t c = 0; c < stats.size(); ++c) {
    m.mean[c] = stats[c].mean;
    const double var = welford_biased_var(stats[c]);
    m.spread[c] = eps.has_value() ? invstd_from_var(var, *eps) : var;
  }
  return m;
}

// save_mean and save_invstd ([C], acc dtype) from absolute statistics.
std::tuple<Tensor, Tensor> saved_stats(const ChannelMoments& m, const Tensor& input) {
  const auto acc = acc_scalar_type(input.scalar_type());
  return {channel_tensor(m.mean, input, acc), channel_tensor(m.spread, input, acc)};
}

at::ScalarType param_grad_type(const OptTensor& weight, const Tensor& input) {
  return given(weight) ? weight->scalar_type() : acc_scalar_type(input.scalar_type());
}

}  // namespace cpu
}  // namespace bnorm_ext
