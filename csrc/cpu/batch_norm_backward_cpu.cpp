// CPU reference kernels of the backward ops: per-channel gradient sums and
// the elementwise input gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../batch_norm_args.h"
#include "../batch_norm_math.h"
#include "../batch_norm_out.h"
#include "batch_norm_cpu.h"
#include "batch_norm_cpu_loops.h"

namespace bnorm_ext {
namespace cpu {

using Sums = GradSums<double>;

inline Sums add(const Sums& a, const Sums& b) {
  return grad_sums_merge(a, b);
}

// dz_at of the plain ops: grad_out itself.
template <typename scalar_t>
struct GradOutOnly {
  const scalar_t* g;
  acc_type<scalar_t> operator()(int64_t offset, int64_t /*c*/) const {
    return static_cast<acc_type<scalar_t>>(g[offset]);
  }
};

#define BNORM_EXT_CPU_KERNELS "batch_norm_backward_cpu_kernels.inc"
#include "batch_norm_cpu_isa_builds.inc"

namespace {

std::vector<Sums> grad_sums_any(
    const Tensor& dy, const Tensor& x, const BatchNormShape& s, const std::vector<double>& mean) {
  std::vector<Sums> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_reduce_cpu", [&] {
    sums =
        BNORM_EXT_CPU_DISPATCH(grad_sums<scalar_t>(GradOutOnly<scalar_t>{dy.const_data_ptr<scalar_t>()}, x, s, mean));
  });
  return sums;
}

// Writes the input gradient into dx (x's shape, dense in x's layout).
Tensor grad_input_any(
    const Tensor& dy,
    const Tensor& x,
    const BatchNormShape& s,
    const std::vector<BackwardCoeffs<double>>& coeffs,
    bool training,
    Tensor dx) {
  if (x.numel() == 0) {
    return dx;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_elemt_cpu", [&] {
    if (training) {
      BNORM_EXT_CPU_DISPATCH(
          grad_input<scalar_t, true>(GradOutOnly<scalar_t>{dy.const_data_ptr<scalar_t>()}, x, dx, nullptr, s, coeffs));
    } else {
      BNORM_EXT_CPU_DISPATCH(
          grad_input<scalar_t, false>(GradOutOnly<scalar_t>{dy.const_data_ptr<scalar_t>()}, x, dx, nullptr, s, coeffs));
    }
  });
  return dx;
}

// grad_out in input's dense layout.
Tensor dense_grad(const Tensor& grad_out, const Tensor& input) {
  return grad_out.contiguous(output_memory_format(input));
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cpu(
    const Tensor& grad_out, const Tensor& input, const Tensor& mean) {
  const char* op = "bnorm_ext::batch_norm_backward_reduce";
  const BatchNormShape s = check_backward_reduce_args(op, grad_out, input, mean);
  const std::vector<Sums> sums =
      grad_sums_any(dense_grad(grad_out, input), dense_input(input), s, param_values(mean, s.C, 0.0));
  std::vector<double> sum_dy(s.C), sum_dy_xmu(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    sum_dy[c] = sums[c].sum_dy;
    sum_dy_xmu[c] = sums[c].sum_dy_xmu;
  }
  const auto acc = acc_scalar_type(input.scalar_type());
  return {channel_tensor(sum_dy, input, acc), channel_tensor(sum_dy_xmu, input, acc)};
}

Tensor batch_norm_backward_elemt_cpu(
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd,
    const OptTensor& weight,
    const Tensor& sum_dy,
    const Tensor& sum_dy_xmu,
    const Tensor& counts) {
  const char* op = "bnorm_ext::batch_norm_backward_elemt";
  const BatchNormShape s =
      check_backward_elemt_args(op, grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, counts);
  const double count = counts.to(at::kDouble).sum().item<double>();
  const std::vector<double> m = param_values(mean, s.C, 0.0);
  const std::vector<double> is = param_values(invstd, s.C, 0.0);
  const std::vector<double> w = param_values(weight, s.C, 1.0);
  const std::vector<double> sdy = param_values(sum_dy, s.C, 0.0);
  const std::vector<double> sdyx = param_values(sum_dy_xmu, s.C, 0.0);
  std::vector<BackwardCoeffs<double>> coeffs(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    coeffs[c] = backward_train_coeffs(m[c], is[c], w[c], sdy[c], sdyx[c], count);
  }
  return grad_input_any(
      dense_grad(grad_out, input), dense_input(input), s, coeffs, /*training=*/true,
      at::empty_like(input, output_memory_format(input)));
}

// Per-channel grad_weight and grad_bias values.
struct ParamGrads {
  std::vector<double> weight, bias;
};

// The backward after its checks: writes the input gradient into grad_in
// (input-shaped, dense in output_memory_format(input)); returns the
// parameter gradients.
ParamGrads batch_norm_backward_into(
    const BatchNormShape& s,
    const Tensor& grad_out,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    bool training,
    double eps,
    Tensor grad_in) {
  std::vector<double> mean, invstd;
  if (training) {
    mean = param_values(save_mean, s.C, 0.0);
    invstd = param_values(save_invstd, s.C, 0.0);
  } else {
    mean = param_values(running_mean, s.C, 0.0);
    invstd = param_values(running_var, s.C, 0.0);
    for (double& v : invstd) {
      v = invstd_from_var(v, eps);
    }
  }
  const Tensor dy = dense_grad(grad_out, input);
  const Tensor x = dense_input(input);
  const std::vector<double> w = param_values(weight, s.C, 1.0);
  std::vector<Sums> sums;
  if (training && use_channel_fused_path(s, 2, input.element_size())) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_cpu", [&] {
      sums = BNORM_EXT_CPU_DISPATCH(
          train_backward_channel_fused<scalar_t>(
              GradOutOnly<scalar_t>{dy.const_data_ptr<scalar_t>()}, x, grad_in, nullptr, s, mean, invstd, w));
    });
  } else {
    sums = grad_sums_any(dy, x, s, mean);
    const double count = static_cast<double>(s.reduce_size());
    std::vector<BackwardCoeffs<double>> coeffs(s.C);
    for (int64_t c = 0; c < s.C; ++c) {
      coeffs[c] = training ? backward_train_coeffs(mean[c], invstd[c], w[c], sums[c].sum_dy, sums[c].sum_dy_xmu, count)
                           : backward_eval_coeffs(mean[c], invstd[c], w[c]);
    }
    grad_input_any(dy, x, s, coeffs, training, grad_in);
  }
  ParamGrads grads{std::vector<double>(s.C), std::vector<double>(s.C)};
  for (int64_t c = 0; c < s.C; ++c) {
    grads.weight[c] = sums[c].sum_dy_xmu * invstd[c];
    grads.bias[c] = sums[c].sum_dy;
  }
  return grads;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_out,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    bool training,
    double eps) {
  const char* op = "bnorm_ext::batch_norm_backward";
  const BatchNormShape s = check_backward_args(
      op, grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
  Tensor grad_in = at::empty_like(input, output_memory_format(input));
  const ParamGrads grads = batch_norm_backward_into(
      s, grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps, grad_in);
  const auto param_type = param_grad_type(weight, input);
  return {grad_in, channel_tensor(grads.weight, input, param_type), channel_tensor(grads.bias, input, param_type)};
}

// batch_norm_backward.out: the same values written into the given tensors.
std::tuple<Tensor&, Tensor&, Tensor&> batch_norm_backward_out_cpu(
    const Tensor& grad_out,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    bool training,
    double eps,
    Tensor& grad_input,
    Tensor& grad_weight,
    Tensor& grad_bias) {
  const char* op = "bnorm_ext::batch_norm_backward.out";
  const BatchNormShape s = check_backward_args(
      op, grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
  const auto param_type = param_grad_type(weight, input);
  check_out(op, "grad_input", grad_input, input.sizes(), input.scalar_type(), input);
  check_out(op, "grad_weight", grad_weight, {s.C}, param_type, input);
  check_out(op, "grad_bias", grad_bias, {s.C}, param_type, input);
  const Tensor target = dense_out_target(grad_input, input);
  const ParamGrads grads = batch_norm_backward_into(
      s, grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps, target);
  copy_back(grad_input, target);
  store_values(grad_weight, grads.weight);
  store_values(grad_bias, grads.bias);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CPU, m) {
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("batch_norm_backward.out", &batch_norm_backward_out_cpu);
}

}  // namespace cpu
}  // namespace bnorm_ext
