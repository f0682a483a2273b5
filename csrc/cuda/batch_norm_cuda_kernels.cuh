// CUDA kernels of bnorm_ext, shared by the op files: per-channel reductions
// over the [N, C, L] and [M, C] layouts (generic over a Reducer), one
// elementwise kernel for both layouts (generic over an Op), and the
// single-block finalize of the forward statistics. The per-element math is
// batch_norm_math.h's, the same as the CPU reference.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../batch_norm_checks.h"
#include "../batch_norm_math.h"

namespace bnorm_ext {
namespace cuda {

constexpr int kBlockSize = 256;
// Blocks per SM the reductions aim for, so that even C=64 fills the GPU.
constexpr int kBlocksPerSm = 4;
// Minimum vectors a reduction thread handles before the split stops growing.
constexpr int kMinVectorsPerThread = 4;

// Elements in a 16-byte vector of scalar_t.
template <typename scalar_t>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// 32-bit indexing when every index the kernels form, including a grid-stride
// step or a split end past the last element, stays below 2^31.
inline bool use_32bit_index(int64_t numel) {
  return numel <= std::numeric_limits<int32_t>::max() - (int64_t(1) << 24);
}

inline bool is_aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Streaming multiprocessors of the current device (cached per device).
int sm_count();

// VEC elements from p[i] as acc_t (one 16-byte load when VEC > 1; p + i must
// then be 16-byte aligned).
template <int VEC, typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ void load_acc(const scalar_t* p, index_t i, acc_t (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<acc_t>(p[i]);
  } else {
    const Vec<scalar_t, VEC> v = *reinterpret_cast<const Vec<scalar_t, VEC>*>(p + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      out[k] = static_cast<acc_t>(v.v[k]);
    }
  }
}

template <int VEC, typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ void store_from_acc(scalar_t* p, index_t i, const acc_t (&in)[VEC]) {
  if constexpr (VEC == 1) {
    p[i] = static_cast<scalar_t>(in[0]);
  } else {
    Vec<scalar_t, VEC> v;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v.v[k] = static_cast<scalar_t>(in[k]);
    }
    *reinterpret_cast<Vec<scalar_t, VEC>*>(p + i) = v;
  }
}

// Merges smem[ty][tx] over ty (TY a power of two) with Reducer::merge in a
// fixed tree order; the result is in smem[0][tx]. All threads must call it.
template <typename Reducer, typename Partial>
__device__ __forceinline__ void merge_over_rows(Partial* smem, int tx, int ty, int TX, int TY) {
  __syncthreads();
  for (int stride = TY / 2; stride > 0; stride /= 2) {
    if (ty < stride) {
      smem[ty * TX + tx] = Reducer::merge(smem[ty * TX + tx], smem[(ty + stride) * TX + tx]);
    }
    __syncthreads();
  }
}

// Reducer for the forward statistics: Welford per element in each thread,
// Chan merges across threads and blocks.
// NB: no shifted one-pass sums here: s2 - s1^2/n cancels when the data sit far
// from the shift (e.g. a zero-padded first element of a 1e4-mean channel).
template <typename scalar_t>
struct StatsReducer {
  using acc_t = acc_type<scalar_t>;
  using Value = acc_t;
  using State = WelfordData<acc_t>;
  using Partial = WelfordData<acc_t>;
  struct Context {};
  const scalar_t* x;

  __device__ Context context(int64_t) const {
    return {};
  }
  __device__ State init() const {
    return {acc_t(0), acc_t(0), acc_t(0)};
  }
  template <int VEC, typename index_t>
  __device__ void load(index_t i, Value (&v)[VEC]) const {
    load_acc<VEC>(x, i, v);
  }
  __device__ void add(State& s, const Context&, const Value& v) const {
    welford_add(s, v);
  }
  __device__ Partial finish(const State& s) const {
    return s;
  }
  __device__ static Partial merge(const Partial& a, const Partial& b) {
    return welford_merge(a, b);
  }
};

// Reducer for the backward sums sum(dy) and sum(dy * (x - mean)).
template <typename scalar_t>
struct GradReducer {
  using acc_t = acc_type<scalar_t>;
  struct Value {
    acc_t dy;
    acc_t x;
  };
  using State = GradSums<acc_t>;
  using Partial = GradSums<acc_t>;
  using Context = acc_t; // the channel's mean
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* mean;

  __device__ Context context(int64_t c) const {
    return mean[c];
  }
  __device__ State init() const {
    return {acc_t(0), acc_t(0)};
  }
  template <int VEC, typename index_t>
  __device__ void load(index_t i, Value (&v)[VEC]) const {
    acc_t g[VEC], in[VEC];
    load_acc<VEC>(dy, i, g);
    load_acc<VEC>(x, i, in);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[k] = {g[k], in[k]};
    }
  }
  __device__ void add(State& s, const Context& m, const Value& v) const {
    s.sum_dy += v.dy;
    s.sum_dy_xmu += v.dy * (v.x - m);
  }
  __device__ Partial finish(const State& s) const {
    return s;
  }
  __device__ static Partial merge(const Partial& a, const Partial& b) {
    return grad_sums_merge(a, b);
  }
};

// [N, C, L] reduction: block (c = blockIdx.x, split = blockIdx.y) reduces its
// share of channel c's N*L values into partials[c * splits + split].
// VEC > 1 needs L % VEC == 0 and 16-byte aligned data.
template <typename Reducer, int VEC, typename index_t>
__global__ void __launch_bounds__(kBlockSize) channel_reduce_nchw_kernel(
    Reducer r,
    index_t N,
    index_t C,
    index_t L,
    typename Reducer::Partial* partials) {
  using Partial = typename Reducer::Partial;
  __shared__ Partial smem[kBlockSize];
  const index_t c = blockIdx.x;
  const index_t splits = gridDim.y;
  const index_t vectors = N * L / VEC;
  const index_t per_split = (vectors + splits - 1) / splits;
  const index_t v0 = blockIdx.y * per_split;
  const index_t v1 = v0 + per_split < vectors ? v0 + per_split : vectors;
  const auto ctx = r.context(c);
  auto state = r.init();
  for (index_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
    const index_t j = v * VEC;
    const index_t n = j / L;
    const index_t i = (n * C + c) * L + (j - n * L);
    typename Reducer::Value vals[VEC];
    r.template load<VEC>(i, vals);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      r.add(state, ctx, vals[k]);
    }
  }
  smem[threadIdx.x] = r.finish(state);
  merge_over_rows<Reducer>(smem, 0, threadIdx.x, 1, kBlockSize);
  if (threadIdx.x == 0) {
    partials[c * splits + blockIdx.y] = smem[0];
  }
}

// [M, C] reduction (channels innermost): thread (tx, ty) of block
// (tile = blockIdx.x, split = blockIdx.y) owns VEC consecutive channels and
// strides over rows; partials merged over ty, then written per channel.
// VEC > 1 needs C % VEC == 0 and 16-byte aligned data.
template <typename Reducer, int VEC, typename index_t>
__global__ void __launch_bounds__(kBlockSize) channel_reduce_cl_kernel(
    Reducer r,
    index_t M,
    index_t C,
    typename Reducer::Partial* partials) {
  using Partial = typename Reducer::Partial;
  __shared__ Partial smem[kBlockSize];
  const int TX = blockDim.x;
  const int TY = blockDim.y;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const index_t splits = gridDim.y;
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * TX + tx) * VEC;
  const index_t per_split = (M + splits - 1) / splits;
  const index_t r0 = blockIdx.y * per_split;
  const index_t r1 = r0 + per_split < M ? r0 + per_split : M;
  typename Reducer::State state[VEC];
  typename Reducer::Context ctx[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    state[k] = r.init();
    if (c0 + k < C) {
      ctx[k] = r.context(c0 + k);
    }
  }
  if (c0 < C) {
    for (index_t row = r0 + ty; row < r1; row += TY) {
      typename Reducer::Value vals[VEC];
      r.template load<VEC>(row * C + c0, vals);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        r.add(state[k], ctx[k], vals[k]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    smem[ty * TX + tx] = r.finish(state[k]);
    merge_over_rows<Reducer>(smem, tx, ty, TX, TY);
    if (ty == 0 && c0 + k < C) {
      partials[(c0 + k) * splits + blockIdx.y] = smem[tx];
    }
  }
}

// Launches the reduction of `r` over a dense input of shape s into a new
// [C, splits] partials tensor (acc dtype, Partial-sized elements).
template <typename Reducer, typename scalar_t>
std::pair<Tensor, int64_t> launch_channel_reduce(
    const Reducer& r,
    const BatchNormShape& s,
    bool vectorizable,
    const at::TensorOptions& acc_options) {
  using Partial = typename Reducer::Partial;
  using acc_t = acc_type<scalar_t>;
  static_assert(sizeof(Partial) % sizeof(acc_t) == 0, "Partial must be made of acc_t");
  constexpr int kVec = vec_size<scalar_t>();
  const int64_t numel = s.N * s.C * s.L;
  const bool use32 = use_32bit_index(numel);
  const int64_t target_blocks = static_cast<int64_t>(sm_count()) * kBlocksPerSm;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t splits;
  if (!s.channels_last) {
    const bool vec = vectorizable && s.L % kVec == 0;
    const int64_t vectors = s.N * s.L / (vec ? kVec : 1);
    const int64_t max_splits = std::max<int64_t>(1, vectors / (kBlockSize * kMinVectorsPerThread));
    splits = std::clamp<int64_t>(target_blocks / s.C, 1, std::min<int64_t>(max_splits, 65535));
    Tensor partials = at::empty({s.C * splits * int64_t(sizeof(Partial) / sizeof(acc_t))}, acc_options);
    auto* out = reinterpret_cast<Partial*>(partials.mutable_data_ptr<acc_t>());
    const dim3 grid(static_cast<unsigned>(s.C), static_cast<unsigned>(splits));
#define BNORM_EXT_LAUNCH_NCHW(VEC, index_t) \
  channel_reduce_nchw_kernel<Reducer, VEC, index_t><<<grid, kBlockSize, 0, stream>>>( \
      r, static_cast<index_t>(s.N), static_cast<index_t>(s.C), static_cast<index_t>(s.L), out)
    if (vec && use32) {
      BNORM_EXT_LAUNCH_NCHW(kVec, int32_t);
    } else if (vec) {
      BNORM_EXT_LAUNCH_NCHW(kVec, int64_t);
    } else if (use32) {
      BNORM_EXT_LAUNCH_NCHW(1, int32_t);
    } else {
      BNORM_EXT_LAUNCH_NCHW(1, int64_t);
    }
#undef BNORM_EXT_LAUNCH_NCHW
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {partials, splits};
  }
  const bool vec = vectorizable && s.C % kVec == 0;
  const int vec_c = vec ? kVec : 1;
  const int64_t channel_vectors = (s.C + vec_c - 1) / vec_c;
  int tx = 1;
  while (tx < 32 && tx < channel_vectors) {
    tx *= 2;
  }
  const int ty = kBlockSize / tx;
  const int64_t tiles = (channel_vectors + tx - 1) / tx;
  const int64_t M = s.reduce_size();
  const int64_t max_splits = std::max<int64_t>(1, M / (int64_t(ty) * kMinVectorsPerThread));
  splits = std::clamp<int64_t>(target_blocks / tiles, 1, std::min<int64_t>(max_splits, 65535));
  Tensor partials = at::empty({s.C * splits * int64_t(sizeof(Partial) / sizeof(acc_t))}, acc_options);
  auto* out = reinterpret_cast<Partial*>(partials.mutable_data_ptr<acc_t>());
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  const dim3 block(tx, ty);
#define BNORM_EXT_LAUNCH_CL(VEC, index_t) \
  channel_reduce_cl_kernel<Reducer, VEC, index_t><<<grid, block, 0, stream>>>( \
      r, static_cast<index_t>(M), static_cast<index_t>(s.C), out)
  if (vec && use32) {
    BNORM_EXT_LAUNCH_CL(kVec, int32_t);
  } else if (vec) {
    BNORM_EXT_LAUNCH_CL(kVec, int64_t);
  } else if (use32) {
    BNORM_EXT_LAUNCH_CL(1, int32_t);
  } else {
    BNORM_EXT_LAUNCH_CL(1, int64_t);
  }
#undef BNORM_EXT_LAUNCH_CL
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partials, splits};
}

// Elementwise pass over a dense (N, C, *) tensor in either layout: op(i, ch)
// handles the VEC elements from flat index i, whose channels are ch[0..VEC).
// With VEC > 1, NCHW needs L % VEC == 0 (a vector is one channel) and
// channels-last needs C % VEC == 0 (a vector is VEC consecutive channels).
template <typename Op, int VEC, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kBlockSize) channel_elementwise_kernel(
    Op op,
    index_t vectors,
    index_t C,
    index_t L) {
  for (index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors;
       v += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t i = v * VEC;
    index_t ch[VEC];
    if constexpr (kChannelsLast) {
      const index_t c0 = i % C;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        ch[k] = c0 + k;
      }
    } else {
      const index_t c0 = (i / L) % C;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        ch[k] = c0;
      }
    }
    op.template apply<VEC>(i, ch);
  }
}

// Launches op over every element of a dense tensor of shape s. `aligned`:
// all of the op's pointers are 16-byte aligned.
template <typename Op, typename scalar_t>
void launch_channel_elementwise(const Op& op, const BatchNormShape& s, bool aligned) {
  constexpr int kVec = vec_size<scalar_t>();
  const int64_t numel = s.N * s.C * s.L;
  const bool use32 = use_32bit_index(numel);
  const bool vec = aligned && (s.channels_last ? s.C % kVec == 0 : s.L % kVec == 0);
  const int64_t vectors = numel / (vec ? kVec : 1);
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * 8;
  const unsigned blocks = static_cast<unsigned>(
      std::clamp<int64_t>((vectors + kBlockSize - 1) / kBlockSize, 1, max_blocks));
  const auto stream = c10::cuda::getCurrentCUDAStream();
#define BNORM_EXT_LAUNCH_EW(VEC, CL, index_t) \
  channel_elementwise_kernel<Op, VEC, CL, index_t><<<blocks, kBlockSize, 0, stream>>>( \
      op, static_cast<index_t>(vectors), static_cast<index_t>(s.C), static_cast<index_t>(s.L))
#define BNORM_EXT_LAUNCH_EW_LAYOUT(VEC, index_t) \
  if (s.channels_last) {                          \
    BNORM_EXT_LAUNCH_EW(VEC, true, index_t);      \
  } else {                                        \
    BNORM_EXT_LAUNCH_EW(VEC, false, index_t);     \
  }
  if (vec && use32) {
    BNORM_EXT_LAUNCH_EW_LAYOUT(kVec, int32_t)
  } else if (vec) {
    BNORM_EXT_LAUNCH_EW_LAYOUT(kVec, int64_t)
  } else if (use32) {
    BNORM_EXT_LAUNCH_EW_LAYOUT(1, int32_t)
  } else {
    BNORM_EXT_LAUNCH_EW_LAYOUT(1, int64_t)
  }
#undef BNORM_EXT_LAUNCH_EW_LAYOUT
#undef BNORM_EXT_LAUNCH_EW
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-channel normalize coefficients, recomputed where they are used (cheap
// next to the memory traffic). kFromVar: `spread` is a variance (eval, eps
// added); otherwise it is invstd.
template <typename acc_t, typename stat_t, typename param_t, bool kFromVar>
struct NormalizeCoeffLoader {
  const stat_t* mean;
  const stat_t* spread;
  const param_t* weight; // may be null
  const param_t* bias; // may be null
  acc_t eps;

  __device__ NormalizeCoeffs<acc_t> operator()(int64_t c) const {
    const acc_t s = static_cast<acc_t>(spread[c]);
    const acc_t invstd = kFromVar ? invstd_from_var(s, eps) : s;
    return normalize_coeffs<acc_t>(
        static_cast<acc_t>(mean[c]), invstd,
        weight ? static_cast<acc_t>(weight[c]) : acc_t(1),
        bias ? static_cast<acc_t>(bias[c]) : acc_t(0));
  }
};

// y = (x - mean) * scale + bias.
template <typename scalar_t, typename Loader>
struct NormalizeOp {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  scalar_t* y;
  Loader coeffs;

  template <int VEC, typename index_t>
  __device__ void apply(index_t i, const index_t (&ch)[VEC]) const {
    acc_t in[VEC], out[VEC];
    load_acc<VEC>(x, i, in);
    NormalizeCoeffs<acc_t> k = coeffs(ch[0]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j > 0 && ch[j] != ch[j - 1]) {
        k = coeffs(ch[j]);
      }
      out[j] = normalize_apply(k, in[j]);
    }
    store_from_acc<VEC>(y, i, out);
  }
};

// Single-block finalize of the forward statistics: merges partials[c, 0..splits)
// in order, writes mean and invstd (or biased var) and, for
// a non-empty batch, updates the running stats; increments num_batches_tracked.
template <typename acc_t, typename param_t>
__global__ void __launch_bounds__(1024) finalize_stats_kernel(
    const WelfordData<acc_t>* partials,
    int64_t C,
    int64_t splits,
    acc_t eps,
    bool output_var, // write the biased variance instead of invstd
    acc_t* out_mean,
    acc_t* out_spread,
    param_t* running_mean, // may be null (then running_var is too)
    param_t* running_var,
    int64_t* num_batches_tracked, // may be null
    bool has_momentum,
    double momentum) {
  __shared__ double factor;
  if (threadIdx.x == 0) {
    const int64_t batches = num_batches_tracked ? *num_batches_tracked + 1 : 1;
    factor = running_average_factor(has_momentum, momentum, batches);
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    WelfordData<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t k = 0; k < splits; ++k) {
      w = welford_merge(w, partials[c * splits + k]);
    }
    const acc_t mean = w.mean;
    const acc_t var = welford_biased_var(w);
    out_mean[c] = mean;
    out_spread[c] = output_var ? var : invstd_from_var(var, eps);
    if (running_mean != nullptr && w.count > acc_t(0)) {
      const acc_t f = static_cast<acc_t>(factor);
      const acc_t unbiased = w.m2 / (w.count - acc_t(1));
      running_mean[c] = static_cast<param_t>(running_update(static_cast<acc_t>(running_mean[c]), mean, f));
      running_var[c] = static_cast<param_t>(running_update(static_cast<acc_t>(running_var[c]), unbiased, f));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && num_batches_tracked != nullptr) {
    *num_batches_tracked += 1;
  }
}

// Sums partials[c, 0..splits) in order into sum_dy/sum_dy_xmu; with grad
// pointers, also grad_weight = sum_dy_xmu * invstd and grad_bias = sum_dy.
template <typename acc_t, typename param_t>
__global__ void __launch_bounds__(kBlockSize) finalize_grad_kernel(
    const GradSums<acc_t>* partials,
    int64_t C,
    int64_t splits,
    acc_t* sum_dy,
    acc_t* sum_dy_xmu,
    const acc_t* invstd, // may be null when grad_weight is
    param_t* grad_weight,
    param_t* grad_bias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  GradSums<acc_t> g = partials[c * splits];
  for (int64_t k = 1; k < splits; ++k) {
    g = grad_sums_merge(g, partials[c * splits + k]);
  }
  sum_dy[c] = g.sum_dy;
  sum_dy_xmu[c] = g.sum_dy_xmu;
  if (grad_weight != nullptr) {
    grad_weight[c] = static_cast<param_t>(g.sum_dy_xmu * invstd[c]);
    grad_bias[c] = static_cast<param_t>(g.sum_dy);
  }
}

// Backward coefficients per channel; kTrain uses the gradient sums.
template <typename acc_t, typename param_t, bool kTrain>
struct BackwardCoeffLoader {
  const acc_t* mean;
  const acc_t* invstd;
  const param_t* weight; // may be null
  const acc_t* sum_dy; // kTrain only
  const acc_t* sum_dy_xmu; // kTrain only
  const acc_t* count; // kTrain only: one value, on the device

  __device__ BackwardCoeffs<acc_t> operator()(int64_t c) const {
    const acc_t w = weight ? static_cast<acc_t>(weight[c]) : acc_t(1);
    if constexpr (kTrain) {
      return backward_train_coeffs(mean[c], invstd[c], w, sum_dy[c], sum_dy_xmu[c], *count);
    } else {
      return backward_eval_coeffs(mean[c], invstd[c], w);
    }
  }
};

// dx = dy * dy_scale + (x - mean) * xmu_scale + shift (train), dy * dy_scale (eval).
template <typename scalar_t, typename Loader, bool kTrain>
struct BackwardOp {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  scalar_t* dx;
  Loader coeffs;

  template <int VEC, typename index_t>
  __device__ void apply(index_t i, const index_t (&ch)[VEC]) const {
    acc_t g[VEC], in[VEC], out[VEC];
    load_acc<VEC>(dy, i, g);
    if constexpr (kTrain) {
      load_acc<VEC>(x, i, in);
    }
    BackwardCoeffs<acc_t> k = coeffs(ch[0]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j > 0 && ch[j] != ch[j - 1]) {
        k = coeffs(ch[j]);
      }
      out[j] = kTrain ? backward_apply(k, g[j], in[j]) : g[j] * k.dy_scale;
    }
    store_from_acc<VEC>(dx, i, out);
  }
};

} // namespace cuda
} // namespace bnorm_ext
