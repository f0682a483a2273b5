// Helpers shared by the CPU kernel files.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../batch_norm_checks.h"

namespace bnorm_ext {
namespace cpu {

// A per-channel tensor ([C], any dtype, or None -> fallback) as C doubles.
std::vector<double> param_values(const OptTensor& p, int64_t C, double fallback);

// C doubles as a [C] tensor of `dtype` on input's device.
Tensor channel_tensor(const std::vector<double>& v, const Tensor& input, at::ScalarType dtype);

} // namespace cpu
} // namespace bnorm_ext
