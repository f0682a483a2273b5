// Per-channel BatchNorm math shared by the CPU reference and the CUDA kernels.
// Everything here is scalar, header-only and C10_HOST_DEVICE, so one definition
// serves every backend and layout.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace bnorm_ext {

// Accumulation type: float64 for double input, float32 for float/half/bfloat16.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// Partial statistics of a set of values: count, mean and M2 = sum((v - mean)^2).
// NB: the CPU kernels keep `mean` relative to a per-channel shift (the
// channel's first value) so that large-mean data (1e4 + N(0,1)) does not
// cancel in float32 sums; merging is the same either way.
template <typename acc_t>
struct WelfordData {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

// Chan et al.'s pairwise merge; exact for any split, used in a fixed order so
// results do not depend on thread or block scheduling.
template <typename acc_t>
C10_HOST_DEVICE inline WelfordData<acc_t> welford_merge(const WelfordData<acc_t>& a, const WelfordData<acc_t>& b) {
  // NB: an empty side returns the other as is (no 0 * inf from a huge mean).
  if (a.count == acc_t(0)) {
    return b;
  }
  if (b.count == acc_t(0)) {
    return a;
  }
  const acc_t count = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t b_frac = b.count / count;
  // NB: with an infinite mean on a side, a.mean + delta * b_frac would be
  // inf - inf = NaN; the weighted average keeps +-inf, as a plain sum does.
  const acc_t mean = std::isfinite(delta) ? a.mean + delta * b_frac : a.mean * (a.count / count) + b.mean * b_frac;
  return {count, mean, a.m2 + b.m2 + delta * delta * a.count * b_frac};
}

// Stats of one contiguous run of `count` values known by their shifted sum
// and the sum of squared deviations from their own mean (a two-pass result).
template <typename acc_t>
C10_HOST_DEVICE inline WelfordData<acc_t> welford_from_sums(acc_t count, acc_t shifted_sum, acc_t m2) {
  if (count == acc_t(0)) {
    return {acc_t(0), acc_t(0), acc_t(0)};
  }
  return {count, shifted_sum / count, m2};
}

// One value into a running Welford state (the per-element update, used where
// values arrive one at a time; stable for any shift of the data).
template <typename acc_t>
C10_HOST_DEVICE inline void welford_add(WelfordData<acc_t>& w, acc_t v) {
  w.count += acc_t(1);
  const acc_t delta = v - w.mean;
  w.mean += delta / w.count;
  w.m2 += delta * (v - w.mean);
}

// welford_add for states that share one count (given with its reciprocal, so
// that several states updated together divide once).
template <typename acc_t>
C10_HOST_DEVICE inline void welford_add_counted(WelfordData<acc_t>& w, acc_t v, acc_t count, acc_t inv_count) {
  w.count = count;
  const acc_t delta = v - w.mean;
  w.mean += delta * inv_count;
  w.m2 += delta * (v - w.mean);
}

// Per-channel gradient sums: sum(dy) and sum(dy * (x - mean)); merged by adding.
template <typename acc_t>
struct GradSums {
  acc_t sum_dy;
  acc_t sum_dy_xmu;
};

template <typename acc_t>
C10_HOST_DEVICE inline GradSums<acc_t> grad_sums_merge(const GradSums<acc_t>& a, const GradSums<acc_t>& b) {
  return {a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu};
}

// Biased variance M2 / count of a Welford state; 0 for an empty one.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t welford_biased_var(const WelfordData<acc_t>& w) {
  return w.count > acc_t(0) ? w.m2 / w.count : acc_t(0);
}

// 1 / sqrt(var + eps) in the accumulation type.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t invstd_from_var(acc_t var, acc_t eps) {
  return acc_t(1) / std::sqrt(var + eps);
}

// y = ((x - mean) - mean_lo) * scale + bias, with scale = weight * invstd.
// NB: subtracting the mean first (rather than x * scale + shift) keeps the
// output accurate when |mean| >> std: x - mean is exact when they are close.
// mean_lo carries what a higher-precision mean loses in acc_t (mean + mean_lo
// is the mean to twice acc_t's precision; 0 when there is nothing more).
template <typename acc_t>
struct NormalizeCoeffs {
  acc_t mean;
  acc_t mean_lo;
  acc_t scale;
  acc_t bias;
};

template <typename acc_t>
C10_HOST_DEVICE inline NormalizeCoeffs<acc_t> normalize_coeffs(
    acc_t mean, acc_t invstd, acc_t weight, acc_t bias, acc_t mean_lo = acc_t(0)) {
  return {mean, mean_lo, weight * invstd, bias};
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t normalize_apply(const NormalizeCoeffs<acc_t>& k, acc_t x) {
  return ((x - k.mean) - k.mean_lo) * k.scale + k.bias;
}

// Training-mode input gradient, per channel:
//   dx = w * invstd * (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n)
// folded into dx = dy * dy_scale + (x - mean) * xmu_scale + shift.
// Eval mode (mean/invstd are constants) has xmu_scale = shift = 0.
template <typename acc_t>
struct BackwardCoeffs {
  acc_t mean;
  acc_t dy_scale;
  acc_t xmu_scale;
  acc_t shift;
};

template <typename acc_t>
C10_HOST_DEVICE inline BackwardCoeffs<acc_t> backward_train_coeffs(
    acc_t mean, acc_t invstd, acc_t weight, acc_t sum_dy, acc_t sum_dy_xmu, acc_t count) {
  const acc_t w_invstd = weight * invstd;
  const acc_t inv_count = acc_t(1) / count;
  return {mean, w_invstd, -w_invstd * invstd * invstd * sum_dy_xmu * inv_count, -w_invstd * sum_dy * inv_count};
}

template <typename acc_t>
C10_HOST_DEVICE inline BackwardCoeffs<acc_t> backward_eval_coeffs(acc_t mean, acc_t invstd, acc_t weight) {
  return {mean, weight * invstd, acc_t(0), acc_t(0)};
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t backward_apply(const BackwardCoeffs<acc_t>& k, acc_t dy, acc_t x) {
  return dy * k.dy_scale + (x - k.mean) * k.xmu_scale + k.shift;
}

// Exponential-average factor: `momentum`, or 1 / num_batches_tracked (already
// incremented) for the cumulative average that momentum=None asks for.
// NB: computed in double, as torch does on the host (1.0 / float(n)).
C10_HOST_DEVICE inline double running_average_factor(bool has_momentum, double momentum, int64_t num_batches_tracked) {
  return has_momentum ? momentum : 1.0 / static_cast<double>(num_batches_tracked);
}

// running = (1 - factor) * running + factor * batch, in acc_t as torch does.
// The variance fed in must already be unbiased (var * n / (n - 1)).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t running_update(acc_t running, acc_t batch, acc_t factor) {
  return (acc_t(1) - factor) * running + factor * batch;
}

// Activation after the normalization (and the residual add) of the fused ops:
// y = act(z), z = BN(x) [+ residual].
enum class Activation { kIdentity, kRelu, kLeakyRelu, kSilu };

// e^x through std::exp: the exponential of silu below by default (the CPU
// kernels pass their branch-free float one, which vectorises).
struct StdExp {
  template <typename T>
  C10_HOST_DEVICE T operator()(T x) const {
    return std::exp(x);
  }
};

template <Activation A, typename acc_t, typename Exp = StdExp>
C10_HOST_DEVICE inline acc_t activation_apply(acc_t z, acc_t negative_slope, const Exp& exp = {}) {
  if constexpr (A == Activation::kRelu) {
    // NB: NaN stays NaN, as torch.relu (z > 0 is false for NaN, so test z < 0).
    return z < acc_t(0) ? acc_t(0) : z;
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z > acc_t(0) ? z : z * negative_slope;
  } else if constexpr (A == Activation::kSilu) {
    return z / (acc_t(1) + exp(-z));
  } else {
    return z;
  }
}

// dL/dz from dL/dy for the activations whose derivative the output decides
// (identity, relu, leaky_relu with negative_slope >= 0: y > 0 exactly when
// z > 0), as torch's threshold_backward / leaky_relu_backward(self_is_result).
template <Activation A, typename acc_t>
C10_HOST_DEVICE inline acc_t activation_grad_from_output(acc_t dy, acc_t y, acc_t negative_slope) {
  if constexpr (A == Activation::kRelu) {
    return y <= acc_t(0) ? acc_t(0) : dy;  // NB: a NaN output passes dy, as threshold_backward
  } else if constexpr (A == Activation::kLeakyRelu) {
    return y > acc_t(0) ? dy : dy * negative_slope;
  } else {
    return dy;
  }
}

// dL/dz of y = silu(z) = z * sigmoid(z), from the pre-activation z.
template <typename acc_t, typename Exp = StdExp>
C10_HOST_DEVICE inline acc_t silu_grad(acc_t dy, acc_t z, const Exp& exp = {}) {
  const acc_t sig = acc_t(1) / (acc_t(1) + exp(-z));
  return dy * sig * (acc_t(1) + z * (acc_t(1) - sig));
}

}  // namespace bnorm_ext
