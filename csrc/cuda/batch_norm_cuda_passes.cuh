// Host-side launchers of the passes the CUDA forward and backward ops are
// made of, shared by the plain ops and the fused BatchNorm + activation ops:
// the plain ops run them with the identity epilogue (NormalizedOnly) and
// prologue (PlainGrad), the fused ops with the residual add and activation
// after the normalize step and the activation's derivative before the
// gradient sums and the input gradient. Callers check their arguments first.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "batch_norm_cuda.h"
#include "batch_norm_cuda_single_read.cuh"

namespace bnorm_ext {
namespace cuda {

// Threads of the single-block finalize over C channels.
inline int finalize_threads(int64_t C) {
  return static_cast<int>(std::min<int64_t>(1024, ((C + 31) / 32) * 32));
}

template <typename acc_t, typename param_t>
StatsOutputs<acc_t, param_t> stats_outputs(
    double eps,
    bool output_var,
    Tensor& mean,
    Tensor& spread,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum) {
  return {
      static_cast<acc_t>(eps),
      output_var,
      mean.mutable_data_ptr<acc_t>(),
      spread.mutable_data_ptr<acc_t>(),
      opt_mutable_ptr<param_t>(running_mean),
      opt_mutable_ptr<param_t>(running_var),
      opt_mutable_ptr<int64_t>(num_batches_tracked),
      momentum.has_value(),
      momentum.value_or(0.0)};
}

// Statistics of a dense, non-empty input into out_mean / out_spread (invstd,
// or the biased var when output_var), updating the running stats if given.
template <typename scalar_t, typename param_t>
void stats_and_finalize(
    const Tensor& x,
    const BatchNormShape& s,
    double eps,
    bool output_var,
    Tensor& out_mean,
    Tensor& out_spread,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum) {
  using acc_t = acc_type<scalar_t>;
  const StatsReducer<scalar_t> reducer{x.const_data_ptr<scalar_t>()};
  Tensor partials;
  int64_t splits;
  std::tie(partials, splits) = launch_channel_reduce<StatsReducer<scalar_t>, scalar_t>(
      reducer, s, is_aligned16(x.const_data_ptr()), out_mean.options());
  finalize_stats_kernel<acc_t, param_t><<<1, finalize_threads(s.C), 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const WelfordData<acc_t>*>(partials.const_data_ptr<acc_t>()), s.C, splits,
      stats_outputs<acc_t, param_t>(
          eps, output_var, out_mean, out_spread, running_mean, running_var, num_batches_tracked, momentum));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y = act(normalize(x)) with coefficients from (mean, spread) per channel;
// act an output epilogue (NormalizedOnly: y = normalize(x)).
template <typename scalar_t, typename stat_t, typename param_t, bool kFromVar, typename Act = NormalizedOnly>
void normalize(
    const Tensor& x,
    Tensor& y,
    const BatchNormShape& s,
    const Tensor& mean,
    const Tensor& spread,
    const OptTensor& weight,
    const OptTensor& bias,
    double eps,
    const Act& act = Act{}) {
  using acc_t = acc_type<scalar_t>;
  using Loader = NormalizeCoeffLoader<acc_t, stat_t, param_t, kFromVar>;
  using Op = NormalizeOp<scalar_t, Loader, Act>;
  const Op op{
      x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
      Loader{
          mean.const_data_ptr<stat_t>(), spread.const_data_ptr<stat_t>(), opt_ptr<param_t>(weight),
          opt_ptr<param_t>(bias), static_cast<acc_t>(eps)},
      act};
  launch_channel_elementwise<Op, scalar_t>(
      op, s, is_aligned16(x.const_data_ptr()) && is_aligned16(y.const_data_ptr()) && act.aligned());
}

// Training forward of a checked input of shape s: y = act(BN(x)) into a new
// output in the input's layout, the batch statistics and the running
// statistics. with_act(scalar_t{}, run) calls run(act) with the output
// epilogue for scalar_t (the plain op: NormalizedOnly). The single-read
// kernel when the input fits on chip, else statistics, the single-block
// finalize (running statistics) and the normalize pass.
template <typename WithAct>
std::tuple<Tensor, Tensor, Tensor> forward_train(
    const BatchNormShape& s,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps,
    const WithAct& with_act) {
  c10::cuda::CUDAGuard guard(input.device());
  const auto acc_options = input.options().dtype(acc_scalar_type(input.scalar_type()));
  Tensor out = at::empty_like(input, output_memory_format(input));
  if (s.reduce_size() == 0 || s.C == 0) {
    // NB: as torch: running stats untouched, num_batches_tracked still counts.
    if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
      num_batches_tracked->add_(1);
    }
    return {out, at::zeros({s.C}, acc_options), at::full({s.C}, 1.0 / std::sqrt(eps), acc_options)};
  }
  Tensor save_mean = at::empty({s.C}, acc_options);
  Tensor save_invstd = at::empty({s.C}, acc_options);
  const FlatRunningStat rm(running_mean), rv(running_var);
  const Tensor x = dense_input(input);
  const OptTensor w = contiguous_param(weight), b = contiguous_param(bias);
  const auto param_type = param_scalar_type(input, {&weight, &bias, &running_mean, &running_var});
  dispatch_input_and_param(input.scalar_type(), param_type, [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    using acc_t = acc_type<scalar_t>;
    with_act(scalar_tag, [&](const auto& act) {
      using Act = std::decay_t<decltype(act)>;
      const NormalizeEpilogue<scalar_t, param_t, Act> epilogue{
          out.mutable_data_ptr<scalar_t>(), opt_ptr<param_t>(w), opt_ptr<param_t>(b),
          stats_outputs<acc_t, param_t>(
              eps, /*output_var=*/false, save_mean, save_invstd, rm.flat(), rv.flat(), num_batches_tracked, momentum),
          act};
      const bool aligned = is_aligned16(x.const_data_ptr()) && is_aligned16(out.const_data_ptr()) && act.aligned();
      if (launch_single_read(StatsReducer<scalar_t>{x.const_data_ptr<scalar_t>()}, epilogue, s, aligned, acc_options)) {
        return;
      }
      stats_and_finalize<scalar_t, param_t>(
          x, s, eps, /*output_var=*/false, save_mean, save_invstd, rm.flat(), rv.flat(), num_batches_tracked, momentum);
      normalize<scalar_t, acc_t, param_t, false>(x, out, s, save_mean, save_invstd, w, b, eps, act);
    });
  });
  rm.write_back();
  rv.write_back();
  return {out, save_mean, save_invstd};
}

// Eval forward of a checked input of shape s: y = act(BN(x)) with the running
// statistics, one pass; with_act as for forward_train.
template <typename WithAct>
Tensor forward_eval(
    const BatchNormShape& s,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps,
    const WithAct& with_act) {
  c10::cuda::CUDAGuard guard(input.device());
  Tensor out = at::empty_like(input, output_memory_format(input));
  if (input.numel() == 0) {
    return out;
  }
  const Tensor x = dense_input(input);
  const OptTensor w = contiguous_param(weight), b = contiguous_param(bias);
  const Tensor rm_c = running_mean.contiguous();
  const Tensor rv_c = running_var.contiguous();
  dispatch_input_and_param(input.scalar_type(), running_mean.scalar_type(), [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using param_t = decltype(param_tag);
    with_act(scalar_tag, [&](const auto& act) {
      normalize<scalar_t, param_t, param_t, true>(x, out, s, rm_c, rv_c, w, b, eps, act);
    });
  });
  return out;
}

// grad_out in the dense layout of input (the kernels index both with one offset).
inline Tensor dense_grad(const Tensor& grad_out, const Tensor& input) {
  return grad_out.contiguous(output_memory_format(input));
}

// mean and invstd ([C], acc dtype) the backward uses: the saved batch
// statistics when training, else running_mean and 1 / sqrt(running_var + eps).
inline std::pair<Tensor, Tensor> backward_stats(
    bool training,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    double eps,
    at::ScalarType acc) {
  if (training) {
    return {save_mean->contiguous(), save_invstd->contiguous()};
  }
  // NB: C-sized, in-stream; eval backward is off the hot path.
  return {running_mean->to(acc).contiguous(), (running_var->to(acc) + eps).sqrt().reciprocal()};  // as invstd_from_var
}

// sum(dz) and sum(dz * (x - mean)) ([C], acc) of dense dy and x, dz from dy
// through the prologue `pro`, and, when grad_weight is given, grad_weight =
// sum_dy_xmu * invstd and grad_bias = sum_dy; `visit` sees every vector of dy,
// x (and the prologue's aux) loaded (its pointers aligned as `visit_aligned`).
template <typename scalar_t, typename param_t, typename Prologue = PlainGrad<scalar_t>, typename Visit = IgnoreLoaded>
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
    const Prologue& pro = Prologue{},
    const Visit& visit = Visit{},
    bool visit_aligned = true) {
  using acc_t = acc_type<scalar_t>;
  using Reducer = GradReducer<scalar_t, Prologue>;
  const Reducer reducer{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), pro};
  const bool aligned =
      is_aligned16(dy.const_data_ptr()) && is_aligned16(x.const_data_ptr()) && pro.aligned() && visit_aligned;
  Tensor partials;
  int64_t splits;
  std::tie(partials, splits) = launch_channel_reduce<Reducer, scalar_t>(reducer, s, aligned, sum_dy.options(), visit);
  const unsigned blocks = static_cast<unsigned>((s.C + kBlockSize - 1) / kBlockSize);
  finalize_grad_kernel<acc_t, param_t><<<blocks, kBlockSize, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const GradSums<acc_t>*>(partials.const_data_ptr<acc_t>()), s.C, splits,
      GradOutputs<acc_t, param_t>{
          sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
          opt_mutable_ptr<param_t>(grad_weight), opt_mutable_ptr<param_t>(grad_bias)});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Training backward in one single-read launch when dy and x (and the
// prologue's aux) fit on chip: dx (and the prologue's dz), and grad_weight /
// grad_bias in their own dtype. False: nothing launched.
template <typename scalar_t, typename param_t, typename Prologue>
bool single_read_backward(
    const Tensor& dy,
    const Tensor& x,
    Tensor& dx,
    const BatchNormShape& s,
    const Tensor& mean,
    const Tensor& invstd,
    const OptTensor& weight,
    Tensor& grad_weight,
    Tensor& grad_bias,
    const Prologue& pro) {
  using acc_t = acc_type<scalar_t>;
  const auto acc_options = mean.options();
  // NB: the kernel writes acc_t; a half weight's grads are cast after.
  const bool acc_grads = grad_weight.scalar_type() == mean.scalar_type();
  Tensor gw = acc_grads ? grad_weight : at::empty({s.C}, acc_options);
  Tensor gb = acc_grads ? grad_bias : at::empty({s.C}, acc_options);
  const GradReducer<scalar_t, Prologue> reducer{
      dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), pro};
  const GradInputEpilogue<scalar_t, param_t, Prologue> epilogue{
      dx.mutable_data_ptr<scalar_t>(),
      mean.const_data_ptr<acc_t>(),
      invstd.const_data_ptr<acc_t>(),
      opt_ptr<param_t>(weight),
      static_cast<acc_t>(s.reduce_size()),
      GradOutputs<acc_t, acc_t>{
          nullptr, nullptr, invstd.const_data_ptr<acc_t>(), gw.mutable_data_ptr<acc_t>(), gb.mutable_data_ptr<acc_t>()},
      pro};
  const bool aligned = is_aligned16(dy.const_data_ptr()) && is_aligned16(x.const_data_ptr()) &&
                       is_aligned16(dx.const_data_ptr()) && pro.aligned();
  if (!launch_single_read(reducer, epilogue, s, aligned, acc_options)) {
    return false;
  }
  if (!acc_grads) {
    grad_weight.copy_(gw);
    grad_bias.copy_(gb);
  }
  return true;
}

// dx (and the prologue's dz) over dense dy and x with the given coefficient loader.
template <typename scalar_t, typename Loader, bool kTrain, typename Prologue = PlainGrad<scalar_t>>
void grad_input(
    const Tensor& dy,
    const Tensor& x,
    Tensor& dx,
    const BatchNormShape& s,
    const Loader& coeffs,
    const Prologue& pro = Prologue{}) {
  using Op = BackwardOp<scalar_t, Loader, kTrain, Prologue>;
  const Op op{
      dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), coeffs, pro};
  const bool aligned = is_aligned16(dy.const_data_ptr()) && is_aligned16(x.const_data_ptr()) &&
                       is_aligned16(dx.const_data_ptr()) && pro.aligned();
  launch_channel_elementwise<Op, scalar_t>(op, s, aligned);
}

// Backward of dense, non-empty dy and x of shape s into dx, grad_weight and
// grad_bias (zeros, in the weight's dtype or acc), with mean / invstd from
// backward_stats. with_prologue(scalar_t{}, param_t{}, run) calls run(pro)
// with the gradient prologue for scalar_t and param_t (the plain op:
// PlainGrad). Training: the single-read kernel when dy and x fit on chip,
// else the gradient sums then the input gradient pass; eval: one pass, dx
// written as the sums read dy.
template <typename WithPrologue>
void backward_passes(
    const Tensor& dy,
    const Tensor& x,
    Tensor& dx,
    const BatchNormShape& s,
    const Tensor& mean,
    const Tensor& invstd,
    const OptTensor& w,
    Tensor& grad_weight,
    Tensor& grad_bias,
    bool training,
    at::ScalarType param_type,
    const WithPrologue& with_prologue) {
  const auto acc = mean.scalar_type();
  Tensor sum_dy = at::empty({s.C}, mean.options());
  Tensor sum_dy_xmu = at::empty({s.C}, mean.options());
  const double count = static_cast<double>(s.reduce_size());
  dispatch_input_and_param(x.scalar_type(), param_type, [&](auto scalar_tag, auto param_tag) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = acc_type<scalar_t>;
    using param_t = decltype(param_tag);
    with_prologue(scalar_tag, param_tag, [&](const auto& pro) {
      using Prologue = std::decay_t<decltype(pro)>;
      if (training &&
          single_read_backward<scalar_t, param_t>(dy, x, dx, s, mean, invstd, w, grad_weight, grad_bias, pro)) {
        return;
      }
      // Eval: dx = dz * dy_scale, written by the reduction as it reads dy.
      const EvalGradInputVisit<scalar_t, param_t, Prologue> eval_dx{
          {dy.const_data_ptr<scalar_t>(),
           x.const_data_ptr<scalar_t>(),
           dx.mutable_data_ptr<scalar_t>(),
           {mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), opt_ptr<param_t>(w), nullptr, nullptr,
            nullptr},
           pro}};
      // grad_weight/grad_bias come out in the weight's dtype (acc when no weight).
      const auto run = [&](auto grad_tag) {
        using grad_t = decltype(grad_tag);
        if (training) {
          grad_sums<scalar_t, grad_t>(dy, x, s, mean, sum_dy, sum_dy_xmu, invstd, grad_weight, grad_bias, pro);
        } else {
          grad_sums<scalar_t, grad_t>(
              dy, x, s, mean, sum_dy, sum_dy_xmu, invstd, grad_weight, grad_bias, pro, eval_dx,
              is_aligned16(dx.const_data_ptr()));
        }
      };
      if (grad_weight.scalar_type() == acc) {
        run(acc_t{});
      } else {
        run(scalar_t{});
      }
      if (training) {
        const Tensor n = at::full({1}, count, mean.options());
        const BackwardCoeffLoader<acc_t, param_t, true> coeffs{
            mean.const_data_ptr<acc_t>(),   invstd.const_data_ptr<acc_t>(),     opt_ptr<param_t>(w),
            sum_dy.const_data_ptr<acc_t>(), sum_dy_xmu.const_data_ptr<acc_t>(), n.const_data_ptr<acc_t>()};
        grad_input<scalar_t, decltype(coeffs), true>(dy, x, dx, s, coeffs, pro);
      }
    });
  });
}

}  // namespace cuda
}  // namespace bnorm_ext
