// Helpers shared by the autograd kernels of the plain and the fused ops
// (defined in batch_norm_autograd.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/function.h>

#include <initializer_list>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace bnorm_ext {
namespace autograd {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The smart pointer that owns autograd Nodes: std::shared_ptr<Node> in older
// torch (2.11), c10::intrusive_ptr<Node> in newer (2.14). Read off the return
// type of Node::getptr(), which both have, rather than a version number.
using NodeOwner = decltype(std::declval<torch::autograd::Node&>().getptr());
inline constexpr bool kNodesAreShared = std::is_same_v<NodeOwner, std::shared_ptr<torch::autograd::Node>>;
static_assert(
    kNodesAreShared || std::is_same_v<NodeOwner, c10::intrusive_ptr<torch::autograd::Node>>,
    "bnorm_ext: torch::autograd::Node::getptr() returns neither std::shared_ptr nor c10::intrusive_ptr");

// NodePtr<T>: the owning pointer of a T derived from Node, which set_history
// and collect_next_edges' users take; make_node<T>(args...) creates one.
template <typename T>
using NodePtr = std::conditional_t<kNodesAreShared, std::shared_ptr<T>, c10::intrusive_ptr<T>>;

template <typename T, typename... Args>
NodePtr<T> make_node(Args&&... args) {
  if constexpr (kNodesAreShared) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

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
    const Tensor& input,
    const OptTensor& input_t,
    const OptTensor& weight,
    const OptTensor& weight_t,
    const OptTensor& bias_t,
    const Tensor& mean,
    const Tensor& invstd,
    bool training);
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_composite(
    const Tensor& grad_out,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    bool training,
    double eps);

// The input gradient that reaches a training forward through its save_mean
// and save_invstd outputs (grad_mean / grad_invstd may be undefined: zero);
// input dtype, undefined when both are.
Tensor grad_input_from_stats(
    const Tensor& input, const Tensor& mean, const Tensor& invstd, const Tensor& grad_mean, const Tensor& grad_invstd);

}  // namespace autograd
}  // namespace bnorm_ext
