// CPU reference kernels of the forward ops: statistics, running-stat update,
// normalization. Readable first; vectorised through LaneSum and plain
// channel-innermost loops the compiler can vectorise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../batch_norm_args.h"
#include "../batch_norm_math.h"
#include "batch_norm_cpu.h"
#include "batch_norm_cpu_loops.h"

namespace bnorm_ext {
namespace cpu {

using Stats = WelfordData<double>;

#define BNORM_EXT_CPU_KERNELS "batch_norm_forward_cpu_kernels.inc"
#include "batch_norm_cpu_isa_builds.inc"

namespace {

std::vector<Stats> channel_stats_any(const Tensor& x, const BatchNormShape& s) {
  std::vector<Stats> stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cpu", [&] {
    stats = BNORM_EXT_CPU_DISPATCH(channel_stats<scalar_t>(x, s));
  });
  return stats;
}

} // namespace

CpuIsa cpu_isa() {
#if defined(__x86_64__)
  static const CpuIsa supported =
      (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
       __builtin_cpu_supports("avx512bw"))
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

// training: batch statistics (float32 computed in double, see Normalize);
// otherwise running statistics (eval).
Tensor normalize_cpu(
    const Tensor& input,
    const BatchNormShape& s,
    const OptTensor& weight,
    const OptTensor& bias,
    const std::vector<double>& mean,
    const std::vector<double>& invstd,
    bool training) {
  Tensor out = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return out;
  }
  const Tensor x = dense_input(input);
  const std::vector<double> w = param_values(weight, s.C, 1.0);
  const std::vector<double> b = param_values(bias, s.C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_elemt_cpu", [&] {
    const auto run = [&](auto op) {
      using Op = decltype(op);
      std::vector<typename Op::Coeffs> coeffs(s.C);
      for (int64_t c = 0; c < s.C; ++c) {
        coeffs[c] = Op::coeffs(mean[c], invstd[c], w[c], b[c]);
      }
      BNORM_EXT_CPU_DISPATCH(normalize<scalar_t, Op>(x, out, s, coeffs));
    };
    if (training) {
      run(Normalize<scalar_t>{});
    } else {
      run(Normalize<scalar_t, acc_type<scalar_t>>{});
    }
  });
  return out;
}

void update_running_stats_cpu(
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    const std::vector<Stats>& stats) {
  const bool has_nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  int64_t batches = 1;
  if (has_nbt) {
    batches = ++*num_batches_tracked->mutable_data_ptr<int64_t>();
  }
  if (!running_mean.has_value() || !running_mean->defined() || stats.empty() ||
      stats[0].count == 0.0) {
    return; // NB: an empty batch leaves the running stats as they are, as torch does.
  }
  const double factor = running_average_factor(
      momentum.has_value(), momentum.value_or(0.0),
      batches);
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

std::vector<Stats> stats_cpu(const Tensor& input, const BatchNormShape& s) {
  return channel_stats_any(dense_input(input), s);
}

ChannelMoments channel_moments(const std::vector<Stats>& stats, std::optional<double> eps) {
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

namespace {

std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input) {
  const char* op = "bnorm_ext::batch_norm_stats";
  const BatchNormShape s = check_input(op, input);
  return saved_stats(channel_moments(stats_cpu(input, s), /*eps=*/std::nullopt), input);
}

std::tuple<Tensor, Tensor> batch_norm_gather_stats_cpu(
    const Tensor& mean,
    const Tensor& var,
    const Tensor& counts,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps) {
  const char* op = "bnorm_ext::batch_norm_gather_stats";
  check_gather_args(op, mean, var, counts, running_mean, running_var, num_batches_tracked, momentum, eps);
  const int64_t P = mean.size(0);
  const int64_t C = mean.size(1);
  const Tensor m = mean.to(at::kDouble).contiguous();
  const Tensor v = var.to(at::kDouble).contiguous();
  const Tensor n = counts.to(at::kDouble).contiguous();
  const double* m_data = m.const_data_ptr<double>();
  const double* v_data = v.const_data_ptr<double>();
  const double* n_data = n.const_data_ptr<double>();
  std::vector<Stats> stats(C, Stats{0.0, 0.0, 0.0});
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t p = 0; p < P; ++p) {
      const double count = n_data[p];
      stats[c] = welford_merge(stats[c], Stats{count, m_data[p * C + c], v_data[p * C + c] * count});
    }
  }
  update_running_stats_cpu(running_mean, running_var, num_batches_tracked, momentum, stats);
  return saved_stats(channel_moments(stats, eps), mean);
}

Tensor batch_norm_elemt_cpu(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& mean,
    const Tensor& invstd) {
  const char* op = "bnorm_ext::batch_norm_elemt";
  const BatchNormShape s = check_elemt_args(op, input, weight, bias, mean, invstd);
  return normalize_cpu(input, s, weight, bias, param_values(mean, s.C, 0.0), param_values(invstd, s.C, 0.0), /*training=*/true);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_train_cpu(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps) {
  const char* op = "bnorm_ext::batch_norm_forward_train";
  const BatchNormShape s = check_train_args(op, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
  if (use_channel_fused_path(s, 1, input.element_size())) {
    const Tensor x = dense_input(input);
    Tensor out = at::empty_like(input, output_memory_format(input));
    std::vector<Stats> stats;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward_train_cpu", [&] {
      stats = BNORM_EXT_CPU_DISPATCH(train_forward_channel_fused<scalar_t>(x, out, s, param_values(weight, s.C, 1.0), param_values(bias, s.C, 0.0), eps));
    });
    update_running_stats_cpu(running_mean, running_var, num_batches_tracked, momentum, stats);
    auto [save_mean, save_invstd] = saved_stats(channel_moments(stats, eps), input);
    return {out, save_mean, save_invstd};
  }
  const std::vector<Stats> stats = stats_cpu(input, s);
  update_running_stats_cpu(running_mean, running_var, num_batches_tracked, momentum, stats);
  const ChannelMoments moments = channel_moments(stats, eps);
  // NB: normalized with the double statistics, more accurate than the
  // acc-rounded save_mean when |mean| >> std.
  Tensor out = normalize_cpu(input, s, weight, bias, moments.mean, moments.spread, /*training=*/true);
  auto [save_mean, save_invstd] = saved_stats(moments, input);
  return {out, save_mean, save_invstd};
}

Tensor batch_norm_forward_eval_cpu(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps) {
  const char* op = "bnorm_ext::batch_norm_forward_eval";
  const BatchNormShape s = check_eval_args(op, input, weight, bias, running_mean, running_var, eps);
  const std::vector<double> mean = param_values(running_mean, s.C, 0.0);
  std::vector<double> invstd = param_values(running_var, s.C, 1.0);
  for (double& v : invstd) {
    v = invstd_from_var(v, eps);
  }
  return normalize_cpu(input, s, weight, bias, mean, invstd, /*training=*/false);
}

} // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_gather_stats", &batch_norm_gather_stats_cpu);
  m.impl("batch_norm_elemt", &batch_norm_elemt_cpu);
  m.impl("batch_norm_forward_train", &batch_norm_forward_train_cpu);
  m.impl("batch_norm_forward_eval", &batch_norm_forward_eval_cpu);
}

} // namespace cpu
} // namespace bnorm_ext
