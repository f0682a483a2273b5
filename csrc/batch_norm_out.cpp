// The `.out` overloads' shared helpers, their not-implemented autograd and a
// device-generic kernel (the functional op, then a copy) for backends
// without a dedicated one; the CPU kernels write into the out tensors.
#include "batch_norm_out.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string_view>

#include "batch_norm_args.h"

namespace bnorm_ext {

void check_out(
    const char* op,
    const char* name,
    const at::Tensor& out,
    at::IntArrayRef sizes,
    at::ScalarType dtype,
    const at::Tensor& input) {
  TORCH_CHECK(out.sizes() == sizes, op, ": expected ", name, " of size ", sizes, ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype, ", got ", out.scalar_type());
  TORCH_CHECK(
      out.device() == input.device(), op, ": expected ", name, " on the input's device ", input.device(), ", got ",
      out.device());
  TORCH_CHECK(out.layout() == at::kStrided, op, ": expected a strided ", name, ", got layout ", out.layout());
}

at::Tensor dense_out_target(const at::Tensor& out, const at::Tensor& input) {
  const auto format = output_memory_format(input);
  if (out.is_contiguous(format) && !out.is_neg() && !out.is_conj()) {
    return out;
  }
  return at::empty_like(input, format);
}

void copy_back(const at::Tensor& out, const at::Tensor& written) {
  if (!written.is_same(out)) {
    out.copy_(written);
  }
}

namespace {

using OptTensor = std::optional<at::Tensor>;

// Device-generic batch_norm_backward.out: the functional op, then a copy.
std::tuple<at::Tensor&, at::Tensor&, at::Tensor&> batch_norm_backward_out_generic(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const OptTensor& weight,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    bool training,
    double eps,
    at::Tensor& grad_input,
    at::Tensor& grad_weight,
    at::Tensor& grad_bias) {
  static auto functional = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bnorm_ext::batch_norm_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                   const OptTensor&, const OptTensor&, const OptTensor&, bool, double)>();
  const char* op = "bnorm_ext::batch_norm_backward.out";
  auto [gi, gw, gb] =
      functional.call(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
  check_out(op, "grad_input", grad_input, gi.sizes(), gi.scalar_type(), input);
  check_out(op, "grad_weight", grad_weight, gw.sizes(), gw.scalar_type(), input);
  check_out(op, "grad_bias", grad_bias, gb.sizes(), gb.scalar_type(), input);
  grad_input.copy_(gi);
  grad_weight.copy_(gw);
  grad_bias.copy_(gb);
  return {grad_input, grad_weight, grad_bias};
}

// Device-generic batch_norm_act_backward.out: the functional op, then a copy.
std::tuple<at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&> batch_norm_act_backward_out_generic(
    const at::Tensor& grad_out,
    const OptTensor& output,
    const at::Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    const OptTensor& residual,
    bool training,
    double eps,
    bool need_grad_residual,
    std::string_view activation,
    double negative_slope,
    at::Tensor& grad_input,
    at::Tensor& grad_weight,
    at::Tensor& grad_bias,
    at::Tensor& grad_residual) {
  static auto functional = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bnorm_ext::batch_norm_act_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const OptTensor&, const at::Tensor&, const OptTensor&,
                                   const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                   const OptTensor&, const OptTensor&, bool, double, bool, std::string_view, double)>();
  const char* op = "bnorm_ext::batch_norm_act_backward.out";
  auto [gi, gw, gb, gr] = functional.call(
      grad_out, output, input, weight, bias, running_mean, running_var, save_mean, save_invstd, residual, training, eps,
      need_grad_residual, activation, negative_slope);
  check_out(op, "grad_input", grad_input, gi.sizes(), gi.scalar_type(), input);
  check_out(op, "grad_weight", grad_weight, gw.sizes(), gw.scalar_type(), input);
  check_out(op, "grad_bias", grad_bias, gb.sizes(), gb.scalar_type(), input);
  check_out(op, "grad_residual", grad_residual, gr.sizes(), gr.scalar_type(), input);
  grad_input.copy_(gi);
  grad_weight.copy_(gw);
  grad_bias.copy_(gb);
  grad_residual.copy_(gr);
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnorm_ext, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_backward.out", &batch_norm_backward_out_generic);
  m.impl("batch_norm_act_backward.out", &batch_norm_act_backward_out_generic);
}

// Like the SyncBatchNorm pieces: raises when a derivative is needed.
TORCH_LIBRARY_IMPL(bnorm_ext, Autograd, m) {
  m.impl("batch_norm_backward.out", torch::autograd::autogradNotImplementedFallback());
  m.impl("batch_norm_act_backward.out", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace bnorm_ext
