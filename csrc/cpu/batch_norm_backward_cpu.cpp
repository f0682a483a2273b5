// CPU reference kernels of the backward ops: per-channel gradient sums and
// the elementwise input gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../batch_norm_checks.h"
#include "../batch_norm_math.h"
#include "batch_norm_cpu.h"
#include "batch_norm_cpu_loops.h"

namespace bnorm_ext {
namespace cpu {
namespace {

using Sums = GradSums<double>;

Sums add(const Sums& a, const Sums& b) {
  return grad_sums_merge(a, b);
}

// sum(dy) and sum(dy * (x - mean)) over the planes [n0:n1, c, :] of [N, C, L]
// dy and x.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
Sums nchw_chunk_grad_sums(
    const scalar_t* g, const scalar_t* in, int64_t C, int64_t L, acc_t mean, int64_t c, int64_t n0, int64_t n1) {
  LaneSum<acc_t> sum_dy, sum_dy_xmu;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t offset = (n * C + c) * L;
    const scalar_t* g_row = g + offset;
    const scalar_t* x_row = in + offset;
    sum_dy.add_pair(
        sum_dy_xmu, L, [&](int64_t i) { return static_cast<acc_t>(g_row[i]); },
        [&](int64_t i) { return static_cast<acc_t>(g_row[i]) * (static_cast<acc_t>(x_row[i]) - mean); });
  }
  return Sums{sum_dy.total(), sum_dy_xmu.total()};
}

// dx over the planes [n0:n1, c, :] of [N, C, L] tensors. Eval-mode
// coefficients never read x, so an Inf in x cannot become 0 * Inf = NaN.
template <bool kTrain, typename scalar_t, typename acc_t = acc_type<scalar_t>>
void grad_input_nchw_planes(
    const scalar_t* g, const scalar_t* in, scalar_t* out, int64_t C, int64_t L, int64_t c, int64_t n0, int64_t n1,
    const BackwardCoeffs<acc_t> k) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t offset = (n * C + c) * L;
    for (int64_t i = 0; i < L; ++i) {
      const acc_t dy = static_cast<acc_t>(g[offset + i]);
      out[offset + i] = static_cast<scalar_t>(
          kTrain ? backward_apply(k, dy, static_cast<acc_t>(in[offset + i])) : dy * k.dy_scale);
    }
  }
}

// Per-channel sum(dy) and sum(dy * (x - mean)) of dense dy and x (same
// layout). NB: accumulated in acc_t within a task's chunk, in double across them.
template <typename scalar_t>
std::vector<Sums> grad_sums(
    const Tensor& dy,
    const Tensor& x,
    const BatchNormShape& s,
    const std::vector<double>& mean_values) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* g = dy.const_data_ptr<scalar_t>();
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  const int64_t C = s.C;
  const std::vector<acc_t> mean(mean_values.begin(), mean_values.end());
  const Sums zero{0.0, 0.0};
  if (!s.channels_last) {
    const int64_t L = s.L;
    return reduce_chunks_nchw<Sums>(s.N, C, L, zero, [&](int64_t n0, int64_t n1, int64_t c) {
      return nchw_chunk_grad_sums(g, in, C, L, mean[c], c, n0, n1);
    }, add);
  }
  return reduce_blocks_cl<Sums>(s.reduce_size(), C, zero, [&](int64_t r0, int64_t r1, Sums* out) {
    std::vector<acc_t> sum_dy(C, acc_t(0)), sum_dy_xmu(C, acc_t(0));
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* g_row = g + r * C;
      const scalar_t* x_row = in + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = static_cast<acc_t>(g_row[c]);
        sum_dy[c] += d;
        sum_dy_xmu[c] += d * (static_cast<acc_t>(x_row[c]) - mean[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      out[c] = Sums{sum_dy[c], sum_dy_xmu[c]};
    }
  }, add);
}

// dx from dense dy and x with per-channel coefficients. Eval-mode coefficients
// never read x, so an Inf in x cannot turn into 0 * Inf = NaN there.
template <typename scalar_t, bool kTrain>
void grad_input(
    const Tensor& dy,
    const Tensor& x,
    Tensor& dx,
    const BatchNormShape& s,
    const std::vector<BackwardCoeffs<double>>& coeff_values) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* g = dy.const_data_ptr<scalar_t>();
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  const int64_t C = s.C;
  // Structure-of-arrays so the channels-last loop vectorises.
  std::vector<acc_t> mean(C), dy_scale(C), xmu_scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = coeff_values[c].mean;
    dy_scale[c] = coeff_values[c].dy_scale;
    xmu_scale[c] = coeff_values[c].xmu_scale;
    shift[c] = coeff_values[c].shift;
  }
  if (!s.channels_last) {
    parallel_rows(s.N * C, s.L, [&](int64_t r) {
      const BackwardCoeffs<acc_t> k{mean[r % C], dy_scale[r % C], xmu_scale[r % C], shift[r % C]};
      grad_input_nchw_planes<kTrain>(g, in, out, C, s.L, r % C, r / C, r / C + 1, k);
    });
  } else {
    parallel_rows(s.reduce_size(), C, [&](int64_t r) {
      for (int64_t c = 0; c < C; ++c) {
        const BackwardCoeffs<acc_t> k{mean[c], dy_scale[c], xmu_scale[c], shift[c]};
        const acc_t dy = static_cast<acc_t>(g[r * C + c]);
        out[r * C + c] = static_cast<scalar_t>(
            kTrain ? backward_apply(k, dy, static_cast<acc_t>(in[r * C + c])) : dy * k.dy_scale);
      }
    });
  }
}

// Training backward of [N, C, L] tensors whose channels fit in L2: each
// channel's input gradient is written right after its sums, while dy and x are
// still cached (three passes over memory instead of five). Returns the sums.
template <typename scalar_t>
std::vector<Sums> train_backward_channel_fused(
    const Tensor& dy,
    const Tensor& x,
    Tensor& dx,
    const BatchNormShape& s,
    const std::vector<double>& mean,
    const std::vector<double>& invstd,
    const std::vector<double>& weight) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* g = dy.const_data_ptr<scalar_t>();
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  const double count = static_cast<double>(s.reduce_size());
  std::vector<Sums> sums(s.C);
  at::parallel_for(0, s.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Sums sc = nchw_chunk_grad_sums(g, in, s.C, s.L, static_cast<acc_t>(mean[c]), c, 0, s.N);
      const BackwardCoeffs<double> k = backward_train_coeffs(mean[c], invstd[c], weight[c], sc.sum_dy, sc.sum_dy_xmu, count);
      grad_input_nchw_planes<true>(g, in, out, s.C, s.L, c, 0, s.N,
          BackwardCoeffs<acc_t>{static_cast<acc_t>(k.mean), static_cast<acc_t>(k.dy_scale), static_cast<acc_t>(k.xmu_scale), static_cast<acc_t>(k.shift)});
      sums[c] = sc;
    }
  });
  return sums;
}

std::vector<Sums> grad_sums_any(
    const Tensor& dy,
    const Tensor& x,
    const BatchNormShape& s,
    const std::vector<double>& mean) {
  std::vector<Sums> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_reduce_cpu", [&] {
    sums = grad_sums<scalar_t>(dy, x, s, mean);
  });
  return sums;
}

Tensor grad_input_any(
    const Tensor& dy,
    const Tensor& x,
    const BatchNormShape& s,
    const std::vector<BackwardCoeffs<double>>& coeffs,
    bool training) {
  Tensor dx = at::empty_like(x, output_memory_format(x));
  if (x.numel() == 0) {
    return dx;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_elemt_cpu", [&] {
    if (training) {
      grad_input<scalar_t, true>(dy, x, dx, s, coeffs);
    } else {
      grad_input<scalar_t, false>(dy, x, dx, s, coeffs);
    }
  });
  return dx;
}

// grad_out in input's dense layout.
Tensor dense_grad(const Tensor& grad_out, const Tensor& input) {
  return grad_out.contiguous(output_memory_format(input));
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cpu(
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mean) {
  const char* op = "bnorm_ext::batch_norm_backward_reduce";
  const BatchNormShape s = check_backward_reduce_args(op, grad_out, input, mean);
  const std::vector<Sums> sums = grad_sums_any(dense_grad(grad_out, input), dense_input(input), s, param_values(mean, s.C, 0.0));
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
  const BatchNormShape s = check_backward_elemt_args(op, grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, counts);
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
  return grad_input_any(dense_grad(grad_out, input), dense_input(input), s, coeffs, /*training=*/true);
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
  const BatchNormShape s = check_backward_args(op, grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
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
  Tensor grad_in;
  std::vector<Sums> sums;
  if (training && use_channel_fused_path(s, 2, input.element_size())) {
    grad_in = at::empty_like(x, output_memory_format(x));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_cpu", [&] {
      sums = train_backward_channel_fused<scalar_t>(dy, x, grad_in, s, mean, invstd, w);
    });
  } else {
    sums = grad_sums_any(dy, x, s, mean);
    const double count = static_cast<double>(s.reduce_size());
    std::vector<BackwardCoeffs<double>> coeffs(s.C);
    for (int64_t c = 0; c < s.C; ++c) {
      coeffs[c] = training
          ? backward_train_coeffs(mean[c], invstd[c], w[c], sums[c].sum_dy, sums[c].sum_dy_xmu, count)
          : backward_eval_coeffs(mean[c], invstd[c], w[c]);
    }
    grad_in = grad_input_any(dy, x, s, coeffs, training);
  }
  std::vector<double> grad_w(s.C), grad_b(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    grad_w[c] = sums[c].sum_dy_xmu * invstd[c];
    grad_b[c] = sums[c].sum_dy;
  }
  const auto param_type = weight.has_value() && weight->defined()
      ? weight->scalar_type()
      : acc_scalar_type(input.scalar_type());
  return {grad_in, channel_tensor(grad_w, input, param_type), channel_tensor(grad_b, input, param_type)};
}

} // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CPU, m) {
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

} // namespace cpu
} // namespace bnorm_ext
