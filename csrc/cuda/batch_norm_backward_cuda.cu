// CUDA backward ops. Training backward: the single-read kernel when dy and x
// fit on chip, else per-channel gradient sums (one read of dy and x, split
// over the whole GPU, merged in a fixed order) and the vectorised input
// gradient pass. Eval backward: one pass, dx written as the sums read dy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "batch_norm_cuda.h"
#include "batch_norm_cuda_single_read.cuh"

namespace bnorm_ext {
namespace cuda {
namespace {

// sum_dy and sum_dy_xmu ([C], acc) of dense dy and x, and, when grad_weight is
// given, grad_weight = sum_dy_xmu * invstd and grad_bias = sum_dy; `visit`
// sees every vector of dy and x loaded (its pointers aligned as `visit_aligned`).
template <typename scalar_t, typename param_t, typename Visit = IgnoreLoaded>
void grad_sums(
    const Tensor& dy,
    const Tensor& x,
    const BatchNormShape& s,
    const Tensor& mean,
    Tensor& sum_dy,
    Tensor& sum_dy_xmu,
    const Tensor& invstd,
    const OptTensor& grad_weight,
    const OptTensor& grad_bias,
    const Visit& visit = Visit{},
    bool visit_aligned = true) {
  using acc_t = acc_type<scalar_t>;
  const GradReducer<scalar_t> reducer{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>()};
  const bool aligned = is_aligned16(dy.const_data_ptr()) && is_aligned16(x.const_data_ptr()) && visit_aligned;
  Tensor partials;
  int64_t splits;
  std::tie(partials, splits) =
      launch_channel_reduce<GradReducer<scalar_t>, scalar_t>(reducer, s, aligned, sum_dy.options(), visit);
  const unsigned blocks = static_cast<unsigned>((s.C + kBlockSize - 1) / kBlockSize);
  finalize_grad_kernel<acc_t, param_t><<<blocks, kBlockSize, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const GradSums<acc_t>*>(partials.const_data_ptr<acc_t>()),
      s.C,
      splits,
      GradOutputs<acc_t, param_t>{
          sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
          opt_mutable_ptr<param_t>(grad_weight), opt_mutable_ptr<param_t>(grad_bias)});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Training backward in one single-read launch when dy and x fit on chip:
// dx, and grad_weight / grad_bias in their own dtype. False: nothing launched.
template <typename scalar_t, typename param_t>
bool single_read_backward(
    const Tensor& dy,
    const Tensor& x,
    Tensor& dx,
    const BatchNormShape& s,
    const Tensor& mean,
    const Tensor& invstd,
    const OptTensor& weight,
    Tensor& grad_weight,
    Tensor& grad_bias) {
  using acc_t = acc_type<scalar_t>;
  const auto acc_options = mean.options();
  // NB: the kernel writes acc_t; a half weight's grads are cast after.
  const bool acc_grads = grad_weight.scalar_type() == mean.scalar_type();
  Tensor gw = acc_grads ? grad_weight : at::empty({s.C}, acc_options);
  Tensor gb = acc_grads ? grad_bias : at::empty({s.C}, acc_options);
  const GradReducer<scalar_t> reducer{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>()};
  const GradInputEpilogue<scalar_t, param_t> epilogue{
      dx.mutable_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), opt_ptr<param_t>(weight),
      static_cast<acc_t>(s.reduce_size()),
      GradOutputs<acc_t, acc_t>{nullptr, nullptr, invstd.const_data_ptr<acc_t>(), gw.mutable_data_ptr<acc_t>(),
                                gb.mutable_data_ptr<acc_t>()}};
  const bool aligned = is_aligned16(dy.const_data_ptr()) && is_aligned16(x.const_data_ptr()) &&
      is_aligned16(dx.const_data_ptr());
  if (!launch_single_read(reducer, epilogue, s, aligned, acc_options)) {
    return false;
  }
  if (!acc_grads) {
    grad_weight.copy_(gw);
    grad_bias.copy_(gb);
  }
  return true;
}

// dx over dense dy and x with the given coefficient loader.
template <typename scalar_t, typename Loader, bool kTrain>
void grad_input(const Tensor& dy, const Tensor& x, Tensor& dx, const BatchNormShape& s, const Loader& coeffs) {
  using Op = BackwardOp<scalar_t, Loader, kTrain>;
  const Op op{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), coeffs};
  const bool aligned = is_aligned16(dy.const_data_ptr()) && is_aligned16(x.const_data_ptr()) &&
      is_aligned16(dx.const_data_ptr());
  launch_channel_elementwise<Op, scalar_t>(op, s, aligned);
}

Tensor dense_grad(const Tensor& grad_out, const Tensor& input) {
  return grad_out.contiguous(output_memory_format(input));
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cuda(
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mean) {
  const char* op = "bnorm_ext::batch_norm_backward_reduce";
  const BatchNormShape s = check_backward_reduce_args(op, grad_out, input, mean);
  c10::cuda::CUDAGuard guard(input.device());
  const auto acc_options = input.options().dtype(acc_scalar_type(input.scalar_type()));
  Tensor sum_dy = at::zeros({s.C}, acc_options);
  Tensor sum_dy_xmu = at::zeros({s.C}, acc_options);
  if (s.reduce_size() == 0 || s.C == 0) {
    return {sum_dy, sum_dy_xmu};
  }
  const Tensor dy = dense_grad(grad_out, input);
  const Tensor x = dense_input(input);
  const Tensor m = mean.contiguous();
  dispatch_input_and_param(input.scalar_type(), input.scalar_type(), [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    grad_sums<scalar_t, param_t>(dy, x, s, m, sum_dy, sum_dy_xmu, m, std::nullopt, std::nullopt);
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_backward_elemt_cuda(
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
  c10::cuda::CUDAGuard guard(input.device());
  Tensor dx = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return dx;
  }
  const Tensor dy = dense_grad(grad_out, input);
  const Tensor x = dense_input(input);
  const OptTensor w = contiguous_param(weight);
  // NB: summed once, in double, on the device (no host sync).
  const Tensor n = counts.to(at::kDouble).sum().to(acc_scalar_type(input.scalar_type())).reshape({1});
  const Tensor m = mean.contiguous(), is = invstd.contiguous(), sdy = sum_dy.contiguous(), sdyx = sum_dy_xmu.contiguous();
  dispatch_input_and_param(input.scalar_type(), param_scalar_type(input, {&weight}), [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    using acc_t = acc_type<scalar_t>;
    const BackwardCoeffLoader<acc_t, param_t, true> coeffs{
        m.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(), opt_ptr<param_t>(w),
        sdy.const_data_ptr<acc_t>(), sdyx.const_data_ptr<acc_t>(), n.const_data_ptr<acc_t>()};
    grad_input<scalar_t, decltype(coeffs), true>(dy, x, dx, s, coeffs);
  });
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(
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
  const auto acc = acc_scalar_type(input.scalar_type());
  Tensor mean, invstd;
  c10::cuda::CUDAGuard guard(input.device());
  if (training) {
    mean = save_mean->contiguous();
    invstd = save_invstd->contiguous();
  } else {
    // NB: C-sized, in-stream; eval backward is off the hot path.
    mean = running_mean->to(acc).contiguous();
    invstd = (running_var->to(acc) + eps).sqrt().reciprocal(); // as invstd_from_var
  }
  const auto param_type = param_scalar_type(input, {&weight, &running_mean, &running_var});
  const auto param_options = input.options().dtype(weight.has_value() && weight->defined() ? weight->scalar_type() : acc);
  Tensor grad_weight = at::zeros({s.C}, param_options);
  Tensor grad_bias = at::zeros({s.C}, param_options);
  Tensor dx = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return {dx, grad_weight, grad_bias};
  }
  const Tensor dy = dense_grad(grad_out, input);
  const Tensor x = dense_input(input);
  const OptTensor w = contiguous_param(weight);
  Tensor sum_dy = at::empty({s.C}, input.options().dtype(acc));
  Tensor sum_dy_xmu = at::empty({s.C}, input.options().dtype(acc));
  const double count = static_cast<double>(s.reduce_size());
  dispatch_input_and_param(input.scalar_type(), param_type, [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = acc_type<scalar_t>;
    using param_t = decltype(param_tag);
    if (training && single_read_backward<scalar_t, param_t>(dy, x, dx, s, mean, invstd, w, grad_weight, grad_bias)) {
      return;
    }
    // Eval: dx = dy * dy_scale, written by the reduction as it reads dy.
    const EvalGradInputVisit<scalar_t, param_t> eval_dx{
        {dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
         {mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), opt_ptr<param_t>(w), nullptr, nullptr, nullptr}}};
    // grad_weight/grad_bias come out in the weight's dtype (acc when no weight).
    const auto run = [&](auto grad_tag) {
      using grad_t = decltype(grad_tag);
      if (training) {
        grad_sums<scalar_t, grad_t>(dy, x, s, mean, sum_dy, sum_dy_xmu, invstd, grad_weight, grad_bias);
      } else {
        grad_sums<scalar_t, grad_t>(dy, x, s, mean, sum_dy, sum_dy_xmu, invstd, grad_weight, grad_bias, eval_dx,
                                    is_aligned16(dx.const_data_ptr()));
      }
    };
    if (grad_weight.scalar_type() == acc) {
      run(acc_t{});
    } else {
      run(scalar_t{});
    }
    if (training) {
      const Tensor n = at::full({1}, count, input.options().dtype(acc));
      const BackwardCoeffLoader<acc_t, param_t, true> coeffs{
          mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), opt_ptr<param_t>(w),
          sum_dy.const_data_ptr<acc_t>(), sum_dy_xmu.const_data_ptr<acc_t>(), n.const_data_ptr<acc_t>()};
      grad_input<scalar_t, decltype(coeffs), true>(dy, x, dx, s, coeffs);
    }
  });
  return {dx, grad_weight, grad_bias};
}

} // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CUDA, m) {
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
}

} // namespace cuda
} // namespace bnorm_ext
