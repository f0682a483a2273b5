#include "batch_norm_args.h"

namespace bnorm_ext {

at::ScalarType acc_scalar_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

at::MemoryFormat output_memory_format(const Tensor& input) {
  return input.suggest_memory_format();
}

BatchNormShape check_input(const char* op, const Tensor& input) {
  TORCH_CHECK_INDEX(
      input.dim() >= 2, op, ": expected input of shape (N, C, *) with at least 2 dimensions, got ", input.dim(),
      "-D input of size ", input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
      ": expected input of dtype float64, float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(input.layout() == at::kStrided, op, ": expected a strided (dense) input, got layout ", input.layout());
  BatchNormShape shape;
  shape.N = input.size(0);
  shape.C = input.size(1);
  shape.L = 1;
  for (int64_t d = 2; d < input.dim(); ++d) {
    shape.L *= input.size(d);
  }
  const auto format = output_memory_format(input);
  // NB: with one value per (n, c) (an (N, C) input, or H = W = 1) the dense
  // layout is [N, C] either way; the channels-last kernels read it coalesced.
  shape.channels_last =
      format == at::MemoryFormat::ChannelsLast || format == at::MemoryFormat::ChannelsLast3d || shape.L == 1;
  return shape;
}

Tensor dense_input(const Tensor& input) {
  return input.contiguous(output_memory_format(input));
}

Tensor dense_like_input(const OptTensor& t, const Tensor& input) {
  return given(t) ? t->contiguous(output_memory_format(input)) : Tensor();
}

void check_params(
    const char* op,
    const Tensor& input,
    int64_t C,
    std::initializer_list<std::pair<const char*, const OptTensor*>> params) {
  const auto input_type = input.scalar_type();
  const bool half_input = input_type == at::kHalf || input_type == at::kBFloat16;
  const char* first_name = nullptr;
  at::ScalarType first_type = input_type;
  for (const auto& [name, param] : params) {
    if (!param->has_value() || !(*param)->defined()) {
      continue;
    }
    const Tensor& p = **param;
    TORCH_CHECK(
        p.numel() == C, op, ": expected ", name, " to have ", C, " elements (one per channel), got ", p.numel(),
        " (size ", p.sizes(), ")");
    TORCH_CHECK(
        p.device() == input.device(), op, ": expected ", name, " on the input's device ", input.device(), ", got ",
        p.device());
    const auto t = p.scalar_type();
    TORCH_CHECK(
        t == input_type || (half_input && t == at::kFloat), op, ": expected ", name, " of dtype ", input_type,
        half_input ? " or float32" : "", " (input is ", input_type, "), got ", t);
    if (first_name == nullptr) {
      first_name = name;
      first_type = t;
    } else {
      TORCH_CHECK(
          t == first_type, op, ": expected ", name, " to have the same dtype as ", first_name, " (", first_type,
          "), got ", t);
    }
  }
}

void check_channel_stat(const char* op, const char* name, const Tensor& input, const Tensor& stat, int64_t C) {
  const auto acc = acc_scalar_type(input.scalar_type());
  TORCH_CHECK(stat.dim() == 1 && stat.size(0) == C, op, ": expected ", name, " of shape [", C, "], got ", stat.sizes());
  TORCH_CHECK(stat.scalar_type() == acc, op, ": expected ", name, " of dtype ", acc, ", got ", stat.scalar_type());
  TORCH_CHECK(
      stat.device() == input.device(), op, ": expected ", name, " on the input's device ", input.device(), ", got ",
      stat.device());
}

void check_running_args(
    const char* op,
    const Tensor& input,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum) {
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_mean == has_var, op, ": expected running_mean and running_var both given or both None");
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    const Tensor& nbt = *num_batches_tracked;
    TORCH_CHECK(
        nbt.numel() == 1 && nbt.scalar_type() == at::kLong, op,
        ": expected num_batches_tracked to be a one-element int64 tensor, "
        "got dtype ",
        nbt.scalar_type(), " and size ", nbt.sizes());
    TORCH_CHECK(
        nbt.device() == input.device(), op, ": expected num_batches_tracked on the input's device ", input.device(),
        ", got ", nbt.device());
  } else {
    TORCH_CHECK(
        momentum.has_value() || !has_mean, op, ": momentum=None (cumulative average) needs num_batches_tracked");
  }
}

void check_train_count(const char* op, const Tensor& input, int64_t count) {
  TORCH_CHECK_VALUE(
      count != 1, op,
      ": expected more than 1 value per channel when training, got input "
      "size ",
      input.sizes());
}

void check_grad_out(const char* op, const Tensor& input, const Tensor& grad_out) {
  TORCH_CHECK(
      grad_out.sizes() == input.sizes(), op, ": expected grad_out of size ", input.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(
      grad_out.scalar_type() == input.scalar_type(), op, ": expected grad_out of dtype ", input.scalar_type(), ", got ",
      grad_out.scalar_type());
  TORCH_CHECK(
      grad_out.device() == input.device(), op, ": expected grad_out on the input's device ", input.device(), ", got ",
      grad_out.device());
}

void check_eps(const char* op, double eps, bool training) {
  if (training) {
    TORCH_CHECK_VALUE(eps > 0.0, op, ": eps must be positive during training, got ", eps);
  } else {
    TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be non-negative, got ", eps);
  }
}

BatchNormShape check_train_args(
    const char* op,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps) {
  const BatchNormShape s = check_input(op, input);
  check_params(
      op, input, s.C,
      {{"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean}, {"running_var", &running_var}});
  check_running_args(op, input, running_mean, running_var, num_batches_tracked, momentum);
  check_eps(op, eps, /*training=*/true);
  check_train_count(op, input, s.reduce_size());
  return s;
}

void check_gather_args(
    const char* op,
    const Tensor& mean,
    const Tensor& var,
    const Tensor& counts,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    std::optional<double> momentum,
    double eps) {
  TORCH_CHECK(
      mean.dim() == 2 && var.sizes() == mean.sizes(), op, ": expected mean and var of shape [P, C], got ", mean.sizes(),
      " and ", var.sizes());
  TORCH_CHECK(
      counts.dim() == 1 && counts.size(0) == mean.size(0), op, ": expected counts of shape [", mean.size(0), "], got ",
      counts.sizes());
  TORCH_CHECK(
      mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, op,
      ": expected mean of dtype float32 or float64, got ", mean.scalar_type());
  TORCH_CHECK(
      var.scalar_type() == mean.scalar_type(), op, ": expected var of dtype ", mean.scalar_type(), ", got ",
      var.scalar_type());
  const int64_t C = mean.size(1);
  // Running stats follow the parameter rule of an input in mean's dtype, or
  // float16/bfloat16 running stats from a half-precision model.
  const bool float_stats = mean.scalar_type() == at::kFloat;
  for (const auto& [name, p] :
       {std::pair<const char*, const OptTensor*>{"running_mean", &running_mean}, {"running_var", &running_var}}) {
    if (p->has_value() && (*p)->defined()) {
      const auto t = (**p).scalar_type();
      TORCH_CHECK((**p).numel() == C, op, ": expected ", name, " to have ", C, " elements, got ", (**p).numel());
      TORCH_CHECK(
          t == mean.scalar_type() || (float_stats && (t == at::kHalf || t == at::kBFloat16)), op, ": expected ", name,
          " of dtype ", mean.scalar_type(), ", got ", t);
      TORCH_CHECK(
          (**p).device() == mean.device(), op, ": expected ", name, " on ", mean.device(), ", got ", (**p).device());
    }
  }
  if (running_mean.has_value() && running_mean->defined() && running_var.has_value() && running_var->defined()) {
    TORCH_CHECK(
        running_var->scalar_type() == running_mean->scalar_type(), op,
        ": expected running_var of the same dtype as running_mean (", running_mean->scalar_type(), "), got ",
        running_var->scalar_type());
  }
  TORCH_CHECK(
      counts.device() == mean.device() && var.device() == mean.device(), op,
      ": expected var and counts on mean's device ", mean.device(), ", got ", var.device(), " and ", counts.device());
  check_running_args(op, mean, running_mean, running_var, num_batches_tracked, momentum);
  check_eps(op, eps, /*training=*/true);
}

BatchNormShape check_elemt_args(
    const char* op,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& mean,
    const Tensor& invstd) {
  const BatchNormShape s = check_input(op, input);
  check_params(op, input, s.C, {{"weight", &weight}, {"bias", &bias}});
  check_channel_stat(op, "mean", input, mean, s.C);
  check_channel_stat(op, "invstd", input, invstd, s.C);
  return s;
}

BatchNormShape check_eval_args(
    const char* op,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps) {
  const BatchNormShape s = check_input(op, input);
  const OptTensor rm = running_mean, rv = running_var;
  check_params(op, input, s.C, {{"weight", &weight}, {"bias", &bias}, {"running_mean", &rm}, {"running_var", &rv}});
  check_eps(op, eps, /*training=*/false);
  return s;
}

BatchNormShape check_backward_reduce_args(
    const char* op, const Tensor& grad_out, const Tensor& input, const Tensor& mean) {
  const BatchNormShape s = check_input(op, input);
  check_grad_out(op, input, grad_out);
  check_channel_stat(op, "mean", input, mean, s.C);
  return s;
}

BatchNormShape check_backward_elemt_args(
    const char* op,
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd,
    const OptTensor& weight,
    const Tensor& sum_dy,
    const Tensor& sum_dy_xmu,
    const Tensor& counts) {
  const BatchNormShape s = check_input(op, input);
  check_grad_out(op, input, grad_out);
  check_params(op, input, s.C, {{"weight", &weight}});
  check_channel_stat(op, "mean", input, mean, s.C);
  check_channel_stat(op, "invstd", input, invstd, s.C);
  check_channel_stat(op, "sum_dy", input, sum_dy, s.C);
  check_channel_stat(op, "sum_dy_xmu", input, sum_dy_xmu, s.C);
  TORCH_CHECK(counts.dim() == 1, op, ": expected counts of shape [P], got ", counts.sizes());
  TORCH_CHECK(
      counts.device() == input.device(), op, ": expected counts on the input's device ", input.device(), ", got ",
      counts.device());
  return s;
}

namespace {

// The plain and the fused backward's checks; bias (None for the plain op) is
// checked with weight and the running stats, so they share one dtype.
BatchNormShape check_backward_args_with_bias(
    const char* op,
    const Tensor& grad_out,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& save_mean,
    const OptTensor& save_invstd,
    bool training,
    double eps) {
  const BatchNormShape s = check_input(op, input);
  check_grad_out(op, input, grad_out);
  check_params(
      op, input, s.C,
      {{"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean}, {"running_var", &running_var}});
  if (training) {
    TORCH_CHECK(
        save_mean.has_value() && save_invstd.has_value(), op, ": training=True needs save_mean and save_invstd");
    check_channel_stat(op, "save_mean", input, *save_mean, s.C);
    check_channel_stat(op, "save_invstd", input, *save_invstd, s.C);
  } else {
    TORCH_CHECK(
        running_mean.has_value() && running_var.has_value(), op, ": training=False needs running_mean and running_var");
    check_eps(op, eps, /*training=*/false);
  }
  return s;
}

}  // namespace

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
    double eps) {
  return check_backward_args_with_bias(
      op, grad_out, input, weight, std::nullopt, running_mean, running_var, save_mean, save_invstd, training, eps);
}

Activation parse_activation(const char* op, std::string_view name, double negative_slope) {
  Activation act = Activation::kIdentity;
  if (name == "identity") {
    act = Activation::kIdentity;
  } else if (name == "relu") {
    act = Activation::kRelu;
  } else if (name == "leaky_relu") {
    act = Activation::kLeakyRelu;
  } else if (name == "silu") {
    act = Activation::kSilu;
  } else {
    TORCH_CHECK_VALUE(
        false, op, ": expected activation 'identity', 'relu', 'leaky_relu' or 'silu', got '", std::string(name), "'");
  }
  TORCH_CHECK_VALUE(
      act != Activation::kLeakyRelu || negative_slope >= 0.0, op,
      ": leaky_relu needs negative_slope >= 0 (the backward reads the sign from the output), got ", negative_slope);
  return act;
}

void check_like_input(const char* op, const char* name, const Tensor& input, const OptTensor& t) {
  if (!t.has_value() || !t->defined()) {
    return;
  }
  const Tensor& r = *t;
  TORCH_CHECK(
      r.sizes() == input.sizes(), op, ": expected ", name, " of the input's size ", input.sizes(), ", got ", r.sizes());
  TORCH_CHECK(
      r.scalar_type() == input.scalar_type(), op, ": expected ", name, " of the input's dtype ", input.scalar_type(),
      ", got ", r.scalar_type());
  TORCH_CHECK(
      r.device() == input.device(), op, ": expected ", name, " on the input's device ", input.device(), ", got ",
      r.device());
  TORCH_CHECK(r.layout() == at::kStrided, op, ": expected a strided (dense) ", name, ", got layout ", r.layout());
}

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
    double negative_slope) {
  const BatchNormShape s = check_backward_args_with_bias(
      op, grad_out, input, weight, bias, running_mean, running_var, save_mean, save_invstd, training, eps);
  const Activation act = parse_activation(op, activation, negative_slope);
  TORCH_CHECK(
      !(act == Activation::kRelu || act == Activation::kLeakyRelu) || given(output), op, ": activation '",
      std::string(activation), "' reads its derivative from output, which is None");
  check_like_input(op, "output", input, output);
  check_like_input(op, "residual", input, residual);
  return {s, act};
}

std::pair<Tensor, Tensor> act_backward_operands(
    Activation act, const OptTensor& output, const OptTensor& residual, const Tensor& input) {
  const bool reads_output = act == Activation::kRelu || act == Activation::kLeakyRelu;
  return {
      reads_output ? dense_like_input(output, input) : Tensor(),
      act == Activation::kSilu ? dense_like_input(residual, input) : Tensor()};
}

}  // namespace bnorm_ext
