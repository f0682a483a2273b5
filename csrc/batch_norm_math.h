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
// NB: `mean` is relative to the per-channel shift chosen by the caller (see
// stats_shift below); shifting keeps large-mean data (1e4 + N(0,1)) from
// cancelling in float32.
template <typename acc_t>
struct WelfordData {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

// Chan et al.'s pairwise merge; exact for any split, used in a fixed order so
// results do not depend on thread or block scheduling.
template <typename acc_t>
C10_HOST_DEVICE inline WelfordData<acc_t> welford_merge(
    const WelfordData<acc_t>& a,
    const WelfordData<acc_t>& b) {
  const acc_t count = a.count + b.count;
  if (count == acc_t(0)) {
    return {acc_t(0), acc_t(0), acc_t(0)};
  }
  const acc_t delta = b.mean - a.mean;
  const acc_t b_frac = b.count / count;
  return {
      count,
      a.mean + delta * b_frac,
      a.m2 + b.m2 + delta * delta * a.count * b_frac};
}

// Stats of one contiguous run of `count` values known by their shifted sum
// and the sum of squared deviations from their own mean (a two-pass result).
template <typename acc_t>
C10_HOST_DEVICE inline WelfordData<acc_t> welford_from_sums(
    acc_t count,
    acc_t shifted_sum,
    acc_t m2) {
  if (count == acc_t(0)) {
    return {acc_t(0), acc_t(0), acc_t(0)};
  }
  return {count, shifted_sum / count, m2};
}

// Thread-level running sums of values shifted by the channel's shift K:
// count, sum(v - K), sum((v - K)^2). Cheap per element (no division).
template <typename acc_t>
struct ShiftedSums {
  acc_t count;
  acc_t s1;
  acc_t s2;
};

template <typename acc_t>
C10_HOST_DEVICE inline void shifted_sums_add(ShiftedSums<acc_t>& s, acc_t shifted) {
  s.count += acc_t(1);
  s.s1 += shifted;
  s.s2 += shifted * shifted;
}

// NB: s2 - s1^2 / n only cancels when the shift is far from the mean in units
// of the standard deviation; the shift is a sample of the channel, so the loss
// is a few bits at worst, and the merges above it are exact.
template <typename acc_t>
C10_HOST_DEVICE inline WelfordData<acc_t> welford_from_shifted_sums(
    const ShiftedSums<acc_t>& s) {
  if (s.count == acc_t(0)) {
    return {acc_t(0), acc_t(0), acc_t(0)};
  }
  const acc_t mean = s.s1 / s.count;
  const acc_t m2 = s.s2 - s.s1 * mean;
  return {s.count, mean, m2 > acc_t(0) ? m2 : acc_t(0)};
}

// Per-channel gradient sums: sum(dy) and sum(dy * (x - mean)); merged by adding.
template <typename acc_t>
struct GradSums {
  acc_t sum_dy;
  acc_t sum_dy_xmu;
};

template <typename acc_t>
C10_HOST_DEVICE inline GradSums<acc_t> grad_sums_merge(
    const GradSums<acc_t>& a,
    const GradSums<acc_t>& b) {
  return {a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu};
}

// 1 / sqrt(var + eps) in the accumulation type.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t invstd_from_var(acc_t var, acc_t eps) {
  return acc_t(1) / std::sqrt(var + eps);
}

// y = (x - mean) * scale + bias, with scale = weight * invstd.
// NB: subtracting the mean first (rather than x * scale + shift) keeps the
// output accurate when |mean| >> std: x - mean is exact when they are close.
template <typename acc_t>
struct NormalizeCoeffs {
  acc_t mean;
  acc_t scale;
  acc_t bias;
};

template <typename acc_t>
C10_HOST_DEVICE inline NormalizeCoeffs<acc_t> normalize_coeffs(
    acc_t mean,
    acc_t invstd,
    acc_t weight,
    acc_t bias) {
  return {mean, weight * invstd, bias};
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t normalize_apply(
    const NormalizeCoeffs<acc_t>& k,
    acc_t x) {
  return (x - k.mean) * k.scale + k.bias;
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
    acc_t mean,
    acc_t invstd,
    acc_t weight,
    acc_t sum_dy,
    acc_t sum_dy_xmu,
    acc_t count) {
  const acc_t w_invstd = weight * invstd;
  const acc_t inv_count = acc_t(1) / count;
  return {
      mean,
      w_invstd,
      -w_invstd * invstd * invstd * sum_dy_xmu * inv_count,
      -w_invstd * sum_dy * inv_count};
}

template <typename acc_t>
C10_HOST_DEVICE inline BackwardCoeffs<acc_t> backward_eval_coeffs(
    acc_t mean,
    acc_t invstd,
    acc_t weight) {
  return {mean, weight * invstd, acc_t(0), acc_t(0)};
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t backward_apply(
    const BackwardCoeffs<acc_t>& k,
    acc_t dy,
    acc_t x) {
  return dy * k.dy_scale + (x - k.mean) * k.xmu_scale + k.shift;
}

// Exponential-average factor: `momentum`, or 1 / num_batches_tracked (already
// incremented) for the cumulative average that momentum=None asks for.
// NB: computed in double, as torch does on the host (1.0 / float(n)).
C10_HOST_DEVICE inline double running_average_factor(
    bool has_momentum,
    double momentum,
    int64_t num_batches_tracked) {
  return has_momentum ? momentum : 1.0 / static_cast<double>(num_batches_tracked);
}

// running = (1 - factor) * running + factor * batch, in acc_t as torch does.
// The variance fed in must already be unbiased (var * n / (n - 1)).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t running_update(
    acc_t running,
    acc_t batch,
    acc_t factor) {
  return (acc_t(1) - factor) * running + factor * batch;
}

} // namespace bnorm_ext
