// Host-side helpers shared by the CUDA op files.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../batch_norm_args.h"

namespace bnorm_ext {
namespace cuda {

// dtype of the first defined parameter, or the input's.
at::ScalarType param_scalar_type(const Tensor& input, std::initializer_list<const OptTensor*> params);

// A parameter the kernels read as a flat [C] array (a copy only if strided).
inline OptTensor contiguous_param(const OptTensor& p) {
  if (p.has_value() && p->defined()) {
    return p->contiguous();
  }
  return std::nullopt;
}

// A running statistic that the kernels update in place as a flat [C] array:
// the tensor itself when contiguous, else a contiguous copy that write_back()
// copies into it once the kernels are enqueued (stream-ordered, no sync), so
// strided running statistics behave as on the CPU and in torch.
class FlatRunningStat {
 public:
  explicit FlatRunningStat(const OptTensor& stat) : stat_(stat) {
    if (stat.has_value() && stat->defined()) {
      flat_ = stat->contiguous();
    }
  }
  const OptTensor& flat() const {
    return flat_;
  }
  void write_back() const {
    if (flat_.has_value() && !flat_->is_same(*stat_)) {
      stat_->copy_(*flat_);
    }
  }

 private:
  OptTensor stat_;
  OptTensor flat_;
};

template <typename T>
const T* opt_ptr(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
T* opt_mutable_ptr(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->mutable_data_ptr<T>() : nullptr;
}

// f(scalar_t{}, param_t{}) with param_t = scalar_t, or float beside a
// float16/bfloat16 input whose parameters are float32.
template <typename scalar_t>
struct ParamDispatch {
  template <typename F>
  static void call(at::ScalarType, const F& f) {
    f(scalar_t{}, scalar_t{});
  }
};

template <typename half_t>
struct HalfParamDispatch {
  template <typename F>
  static void call(at::ScalarType param_type, const F& f) {
    if (param_type == at::kFloat) {
      f(half_t{}, float{});
    } else {
      f(half_t{}, half_t{});
    }
  }
};

template <>
struct ParamDispatch<at::Half> : HalfParamDispatch<at::Half> {};
template <>
struct ParamDispatch<at::BFloat16> : HalfParamDispatch<at::BFloat16> {};

// Calls f(scalar_t{}, param_t{}) for the input dtype and the parameter dtype.
template <typename F>
void dispatch_input_and_param(at::ScalarType input_type, at::ScalarType param_type, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input_type, "bnorm_ext_cuda", [&] { ParamDispatch<scalar_t>::call(param_type, f); });
}

}  // namespace cuda
}  // namespace bnorm_ext
