// Helpers shared by the autograd kernels of the plain and the fused ops
// (defined in batch_norm_autograd.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

namespace bnorm_ext {
namespace autograd {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

Tensor defined_or_empty(const OptTensor& t);

// The tangent of t at forward-AD level 0 (undefined when none, or when
// forward AD is switched off, e.g. inside an autograd.Function's forward).
Tensor tangent(const Tensor& t);
Tensor primal(const Tensor& t);
bool any_tangent(std::initializer_list<Tensor> tensors);

// [C] -> [1, C, 1, ...] to broadcast against an (N, C, *) tensor of `dim` dims.
Tensor per_channel(const Tensor& t, int64_t dim);

// Values per channel, N * prod(spatial), as a Scalar that may be symbolic.
c10::Scalar reduce_count(const Tensor& input);

// Every dim of an (N, C, *) tensor but the channel dim.
std::vector<int64_t> reduce_dims(int64_t dim);

// The ATen composites of the plain ops (see batch_norm_autograd.cpp).
std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_jvp(
    const Tensor& input, const OptTensor& input_t, const OptTensor& weight, const OptTensor& weight_t,
    const OptTensor& bias_t, const Tensor& mean, const Tensor& invstd, bool training);
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_composite(
    const Tensor& grad_out, const Tensor& input, const OptTensor& weight, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& save_mean, const OptTensor& save_invstd, bool training,
    double eps);

// The input gradient that reaches a training forward through its save_mean
// and save_invstd outputs (grad_mean / grad_invstd may be undefined: zero);
// input dtype, undefined when both are.
Tensor grad_input_from_stats(
    const Tensor& input, const Tensor& mean, const Tensor& invstd, const Tensor& grad_mean,
    const Tensor& grad_invstd);

} // namespace autograd
} // namespace bnorm_ext
