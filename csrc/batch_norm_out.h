// Helpers of the `.out` overloads (write-only: every element of every out
// tensor is written; the out tensors' own strides are honoured).
#pragma once

#include <ATen/ATen.h>

namespace bnorm_ext {

// Checks out= tensor `name` of `op`: exactly `sizes`, `dtype`, input's device.
void check_out(
    const char* op,
    const char* name,
    const at::Tensor& out,
    at::IntArrayRef sizes,
    at::ScalarType dtype,
    const at::Tensor& input);

// Where a kernel writing an input-shaped result densely in
// output_memory_format(input) should write it: `out` itself when it is dense
// in that format, else a new tensor to copy_back() into `out`.
at::Tensor dense_out_target(const at::Tensor& out, const at::Tensor& input);

// out.copy_(written) unless `written` is `out`.
void copy_back(const at::Tensor& out, const at::Tensor& written);

}  // namespace bnorm_ext
