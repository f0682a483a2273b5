// Argument handling shared by every backend: checks, layout decisions, operand preparation and
// activation parsing.
// Every check runs before any output or buffer is written, so a call that
// raises leaves running statistics and num_batches_tracked untouched.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>

#include "batch_norm_math.h"

namespace bnorm_ext {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// An optional tensor that is present and defined.
inline bool given(const OptTensor& t) {
  return t.has_value() && t->defined();
}

// Shape of an (N, C, *) input as the kernels see it: `channels_last` means the
// dense layout is [N * L, C] (C innermost); otherwise it is [N, C, L].
struct BatchNormShape {
  int64_t N;
  int64_t C;
  int64_t L;  // product of the spatial sizes
  bool channels_last;
  int64_t reduce_size() const {
    return N * L;
  }
};

// acc dtype for an input dtype: float64 for float64, float32 otherwise.
at::ScalarType acc_scalar_type(at::ScalarType input_type);

// The memory format torch gives the output of batch_norm for this input.
at::MemoryFormat output_memory_format(const Tensor& input);

// Checks dim >= 2, a floating dtype and a supported layout; returns the shape.
BatchNormShape check_input(const char* op, const Tensor& input);

// The input in the dense layout the kernels read (a copy only if it is not).
Tensor dense_input(const Tensor& input);

// t in the input's dense layout (the kernels index both with one offset; a
// copy only if it is not); an undefined tensor when t is not given.
Tensor dense_like_input(const OptTensor& t, const Tensor& input);

// Checks weight/bias/running stats: C elements, input's device, and one
// shared dtype that is the input's or float32 for a half/bfloat16 input.
void check_params(
    const char* op,
    const Tensor& input,
    int64_t C,
    std::initializer_list<std::pair<const char*, const OptTensor*>> params);

// Checks a per-channel statistic (mean, invstd, sums): [C] in the acc dtype.
void check_channel_stat(const char* op, const char* name, const Tensor& input, const Tensor& stat, int64_t C);

// Checks the optional running-statistics arguments of a training call:
// momentum=None needs num_batches_tracked, which must be a one-element int64.
void check_running_args(
    const char* op,
    const Tensor& input,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum);

// Training needs more than one value per channel, as torch.nn.functional's
// batch_norm says (ValueError); an empty batch is allowed.
void check_train_count(const char* op, const Tensor& input, int64_t count);

// grad_out must match input's shape, dtype and device.
void check_grad_out(const char* op, const Tensor& input, const Tensor& grad_out);

// eps > 0 in training, eps >= 0 otherwise (ValueError, as torch).
void check_eps(const char* op, double eps, bool training);

// All checks of a training forward (input, params, running args, eps, count).
BatchNormShape check_train_args(
    const char* op,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps);

// Checks of batch_norm_gather_stats: mean/var [P, C] float32/float64, counts
// [P], running stats in mean's dtype (or half beside float32 stats).
void check_gather_args(
    const char* op,
    const Tensor& mean,
    const Tensor& var,
    const Tensor& counts,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps);

// All checks of each op's arguments, shared by the backends.
BatchNormShape check_elemt_args(
    const char* op,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& mean,
    const Tensor& invstd);
BatchNormShape check_eval_args(
    const char* op,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps);
BatchNormShape check_backward_reduce_args(
    const char* op, const Tensor& grad_out, const Tensor& input, const Tensor& mean);
BatchNormShape check_backward_elemt_args(
    const char* op,
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd,
    const OptTensor& weight,
    const Tensor& sum_dy,
    const Tensor& sum_dy_xmu,
    const Tensor& counts);
BatchNormShape check_backward_args(
    const char* op,
    const Tensor& grad_out,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    bool training,
    double eps);

// The activation a fused op's `activation` argument names: identity, relu,
// leaky_relu or silu (ValueError otherwise, and for leaky_relu with
// negative_slope < 0, whose derivative the output could not decide).
Activation parse_activation(const char* op, std::string_view name, double negative_slope);

// Calls f(std::integral_constant<Activation, act>{}).
template <typename F>
void with_activation(Activation act, const F& f) {
  switch (act) {
    case Activation::kIdentity:
      return f(std::integral_constant<Activation, Activation::kIdentity>{});
    case Activation::kRelu:
      return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kLeakyRelu:
      return f(std::integral_constant<Activation, Activation::kLeakyRelu>{});
    case Activation::kSilu:
      return f(std::integral_constant<Activation, Activation::kSilu>{});
  }
}

// A fused op's residual or saved output, `name`: input's shape, dtype and
// device (None allowed).
void check_like_input(const char* op, const char* name, const Tensor& input, const OptTensor& t);

// Checks of batch_norm_act_backward's arguments in every backend's kernel: the
// plain backward's, bias, the activation, the output that relu/leaky_relu
// read, and the output and residual like the input. Returns the input's shape
// and the activation. NB: reads sizes, so not for the autograd kernel, which
// may see symbolic ones.
std::pair<BatchNormShape, Activation> check_act_backward_args(
    const char* op,
    const Tensor& grad_out,
    const OptTensor& output,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    const OptTensor& residual,
    bool training,
    double eps,
    std::string_view activation,
    double negative_slope);

// What the fused backward of `act` reads besides grad_out and input, dense in
// the input's layout: the output for relu/leaky_relu (their derivative) and
// the residual for silu (its pre-activation); undefined where not read.
std::pair<Tensor, Tensor> act_backward_operands(
    Activation act, const OptTensor& output, const OptTensor& residual, const Tensor& input);

}  // namespace bnorm_ext
