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
#include <type_traits>

#include "../batch_norm_args.h"
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
// Reducers load kInputs raw vectors per position (load_raw) and turn them into
// VEC Values (unpack), so a kernel can keep the raw vectors on chip; add takes
// one value, add_run a run of values of one channel (run_vectors<VEC>() vectors
// of a thread gathered), add_row one value of each of VEC channels.
template <typename scalar_t_>
struct StatsReducer {
  using scalar_t = scalar_t_;
  using acc_t = acc_type<scalar_t>;
  using Value = acc_t;
  using State = WelfordData<acc_t>;
  using Partial = WelfordData<acc_t>;
  struct Context {};
  static constexpr int kInputs = 1;
  static constexpr bool kChannelContext = false;  // a per-channel context kept in registers
  const scalar_t* x;

  __device__ Context context(int64_t) const {
    return {};
  }
  __device__ static State init() {
    return {acc_t(0), acc_t(0), acc_t(0)};
  }
  template <int VEC, typename index_t>
  __device__ void load_raw(index_t i, Vec<scalar_t, VEC> (&raw)[kInputs]) const {
    raw[0] = *reinterpret_cast<const Vec<scalar_t, VEC>*>(x + i);
  }
  template <int VEC>
  __device__ static void unpack(const Vec<scalar_t, VEC> (&raw)[kInputs], Value (&v)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[k] = static_cast<acc_t>(raw[0].v[k]);
    }
  }
  __device__ void add(State& s, const Context&, const Value& v) const {
    welford_add(s, v);
  }
  // Vectors of one channel a thread gathers into one add_run: 4 scalars, or 1 vector.
  template <int VEC>
  static constexpr int run_vectors() {
    return VEC == 1 ? 4 : 1;
  }
  // R values of one channel: their own (count, mean, M2), then one Chan merge.
  // NB: one division per run instead of one per value. As accurate as
  // welford_add on 1e4-mean data (float32 emulation: variance error 1.9e-5 vs 6.2e-5).
  template <int R>
  __device__ void add_run(State& s, const Context& ctx, const Value (&v)[R]) const {
    static_assert((R & (R - 1)) == 0, "run length must be a power of two");
    if constexpr (R == 1) {
      add(s, ctx, v[0]);
    } else {
      // NB: each value scaled by 1/R before the sum (exact, R a power of two), so
      // values near the float maximum do not overflow a sum of R of them.
      acc_t mean = acc_t(0);
#pragma unroll
      for (int k = 0; k < R; ++k) {
        mean += v[k] * (acc_t(1) / acc_t(R));
      }
      acc_t m2 = acc_t(0);
#pragma unroll
      for (int k = 0; k < R; ++k) {
        const acc_t d = v[k] - mean;
        m2 += d * d;
      }
      s = welford_merge(s, State{acc_t(R), mean, m2});
    }
  }
  // One value per channel into VEC channels' states, which all hold the same
  // count (channels-last: every row adds one value to each).
  // NB: one division per row: delta * (1 / count) instead of delta / count
  // (one more rounding, same accuracy class).
  template <int VEC>
  __device__ void add_row(State (&s)[VEC], const Context (&)[VEC], const Value (&v)[VEC]) const {
    const acc_t count = s[0].count + acc_t(1);
    const acc_t inv_count = acc_t(1) / count;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      welford_add_counted(s[k], v[k], count, inv_count);
    }
  }
  __device__ static Partial finish(const State& s) {
    return s;
  }
  __device__ static Partial merge(const Partial& a, const Partial& b) {
    return welford_merge(a, b);
  }
};

// dy, x and the prologue's third input (aux, 0 when it has none) of one element.
template <typename acc_t>
struct GradValue {
  acc_t dy;
  acc_t x;
  acc_t aux;
};

// Per-channel context of a prologue that needs none.
struct NoChannel {};

// Gradient prologues: how the gradient reaching BN's output, dz, comes from
// grad_out (dy) in the backward reduction and elementwise passes, and where dz
// goes besides dx. kAux: dz reads a third input-sized tensor (load_aux);
// kReadsX: dz reads x (so the eval-mode input gradient loads it); Channel:
// what dz needs per channel besides the mean (channel(c)). aligned() (host):
// the prologue's pointers are 16-byte aligned.
// The plain ops: dz = dy, nothing else read or written.
template <typename scalar_t>
struct PlainGrad {
  using acc_t = acc_type<scalar_t>;
  using Channel = NoChannel;
  static constexpr bool kAux = false;
  static constexpr bool kReadsX = false;

  bool aligned() const {
    return true;
  }
  __device__ Channel channel(int64_t) const {
    return {};
  }
  template <int VEC, typename index_t>
  __device__ void load_aux(index_t, Vec<scalar_t, VEC>&) const {}
  __device__ acc_t dz(acc_t, const Channel&, const GradValue<acc_t>& v) const {
    return v.dy;
  }
  template <int VEC, typename index_t>
  __device__ void store_dz(index_t, const acc_t (&)[VEC]) const {}
};

// Fused ops, identity / relu / leaky_relu: dz = act'(z) * dy with the
// derivative decided by the forward's output y (aux; not read for identity);
// dz also goes to grad_residual when given.
template <typename scalar_t, Activation A>
struct GradFromOutput {
  static_assert(A != Activation::kSilu, "silu's derivative needs its pre-activation: GradThroughSilu");
  using acc_t = acc_type<scalar_t>;
  using Channel = NoChannel;
  static constexpr bool kAux = A != Activation::kIdentity;
  static constexpr bool kReadsX = false;
  const scalar_t* y;        // dense, the input's layout (unused for identity)
  scalar_t* grad_residual;  // may be null
  acc_t negative_slope;

  bool aligned() const {
    return is_aligned16(y) && is_aligned16(grad_residual);
  }
  __device__ Channel channel(int64_t) const {
    return {};
  }
  template <int VEC, typename index_t>
  __device__ void load_aux(index_t i, Vec<scalar_t, VEC>& raw) const {
    raw = *reinterpret_cast<const Vec<scalar_t, VEC>*>(y + i);
  }
  __device__ acc_t dz(acc_t, const Channel&, const GradValue<acc_t>& v) const {
    return activation_grad_from_output<A>(v.dy, v.aux, negative_slope);
  }
  template <int VEC, typename index_t>
  __device__ void store_dz(index_t i, const acc_t (&dz)[VEC]) const {
    if (grad_residual != nullptr) {
      store_from_acc<VEC>(grad_residual, i, dz);
    }
  }
};

// Fused ops, silu: dz = silu'(z) * dy with the pre-activation z recomputed as
// the forward computed it: normalize_apply with the statistics the forward
// normalized with (the channel's mean and invstd), weight and bias, in acc_t,
// plus the residual (aux) when given. dz also goes to grad_residual when given.
template <typename scalar_t, typename param_t>
struct GradThroughSilu {
  using acc_t = acc_type<scalar_t>;
  // The forward's normalize scale (weight * invstd) and bias.
  struct Channel {
    acc_t scale;
    acc_t bias;
  };
  static constexpr bool kAux = true;
  static constexpr bool kReadsX = true;
  const scalar_t* residual;  // dense, the input's layout; may be null
  scalar_t* grad_residual;   // may be null
  const acc_t* invstd;
  const param_t* weight;  // may be null
  const param_t* bias;    // may be null

  bool aligned() const {
    return is_aligned16(residual) && is_aligned16(grad_residual);
  }
  __device__ Channel channel(int64_t c) const {
    const NormalizeCoeffs<acc_t> k = normalize_coeffs<acc_t>(
        acc_t(0), invstd[c], weight ? static_cast<acc_t>(weight[c]) : acc_t(1),
        bias ? static_cast<acc_t>(bias[c]) : acc_t(0));
    return {k.scale, k.bias};
  }
  template <int VEC, typename index_t>
  __device__ void load_aux(index_t i, Vec<scalar_t, VEC>& raw) const {
    if (residual != nullptr) {
      raw = *reinterpret_cast<const Vec<scalar_t, VEC>*>(residual + i);
    } else {
      raw = Vec<scalar_t, VEC>{};
    }
  }
  __device__ acc_t dz(acc_t mean, const Channel& k, const GradValue<acc_t>& v) const {
    acc_t z = normalize_apply(NormalizeCoeffs<acc_t>{mean, acc_t(0), k.scale, k.bias}, v.x);
    if (residual != nullptr) {
      z += v.aux;
    }
    return silu_grad(v.dy, z);
  }
  template <int VEC, typename index_t>
  __device__ void store_dz(index_t i, const acc_t (&dz)[VEC]) const {
    if (grad_residual != nullptr) {
      store_from_acc<VEC>(grad_residual, i, dz);
    }
  }
};

// Reducer for the backward sums sum(dz) and sum(dz * (x - mean)), dz from dy
// through the Prologue (the plain ops: dz = dy).
template <typename scalar_t_, typename Prologue = PlainGrad<scalar_t_>>
struct GradReducer {
  using scalar_t = scalar_t_;
  using acc_t = acc_type<scalar_t>;
  using Value = GradValue<acc_t>;
  using State = GradSums<acc_t>;
  using Partial = GradSums<acc_t>;
  struct Context {
    acc_t mean;
    typename Prologue::Channel act;
  };
  static constexpr int kInputs = Prologue::kAux ? 3 : 2;  // dy, x (, aux)
  // The prologue's per-channel context, besides the mean, kept in registers.
  static constexpr bool kChannelContext = !std::is_empty_v<typename Prologue::Channel>;
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* mean;
  Prologue pro;

  __device__ Context context(int64_t c) const {
    return {mean[c], pro.channel(c)};
  }
  __device__ static State init() {
    return {acc_t(0), acc_t(0)};
  }
  template <int VEC, typename index_t>
  __device__ void load_raw(index_t i, Vec<scalar_t, VEC> (&raw)[kInputs]) const {
    raw[0] = *reinterpret_cast<const Vec<scalar_t, VEC>*>(dy + i);
    raw[1] = *reinterpret_cast<const Vec<scalar_t, VEC>*>(x + i);
    if constexpr (Prologue::kAux) {
      pro.template load_aux<VEC>(i, raw[kInputs - 1]);
    }
  }
  template <int VEC>
  __device__ static void unpack(const Vec<scalar_t, VEC> (&raw)[kInputs], Value (&v)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[k] = {static_cast<acc_t>(raw[0].v[k]), static_cast<acc_t>(raw[1].v[k]), acc_t(0)};
      if constexpr (Prologue::kAux) {
        v[k].aux = static_cast<acc_t>(raw[kInputs - 1].v[k]);
      }
    }
  }
  __device__ void add(State& s, const Context& ctx, const Value& v) const {
    const acc_t dz = pro.dz(ctx.mean, ctx.act, v);
    s.sum_dy += dz;
    s.sum_dy_xmu += dz * (v.x - ctx.mean);
  }
  template <int VEC>
  static constexpr int run_vectors() {
    return 1;
  }
  template <int R>
  __device__ void add_run(State& s, const Context& ctx, const Value (&v)[R]) const {
#pragma unroll
    for (int k = 0; k < R; ++k) {
      add(s, ctx, v[k]);
    }
  }
  template <int VEC>
  __device__ void add_row(State (&s)[VEC], const Context (&ctx)[VEC], const Value (&v)[VEC]) const {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      add(s[k], ctx[k], v[k]);
    }
  }
  __device__ static Partial finish(const State& s) {
    return s;
  }
  __device__ static Partial merge(const Partial& a, const Partial& b) {
    return grad_sums_merge(a, b);
  }
};

template <typename Reducer, int VEC>
using RawVec = Vec<typename Reducer::scalar_t, VEC>;

// for (; more(); next()) body(); a loop over index_t positions whose trip
// count is known at run time only. NB: with 64-bit indices not unrolled: the
// unroller's 64-bit trip-count division is a subroutine call, around which
// ptxas spilled loop state (32-bit loops are compiled as before).
template <typename index_t, typename More, typename Next, typename Body>
__device__ __forceinline__ void index_loop(const More& more, const Next& next, const Body& body) {
  if constexpr (sizeof(index_t) == 8) {
#pragma unroll 1
    for (; more(); next()) {
      body();
    }
  } else {
    for (; more(); next()) {
      body();
    }
  }
}

// A reduction's work is cut into segments, each reduced by one block into one
// partial per channel: [N, C, L] segment (c, split) is a 1/splits share of
// channel c's N*L values; [M, C] segment (tile, split) is a 1/splits share of
// the rows of a tile of blockDim.x * VEC channels.

// Visits the vectors thread `tid` of `T` owns in [N, C, L] segment (c, split),
// all of channel c, in order: f_group(m, i[G]) for G at a time while G remain,
// then f(m, i) for each of the rest; i is the flat index of a vector's first
// element, m the ordinal of the (first) vector.
template <int VEC, int G, typename index_t, typename FG, typename F>
__device__ __forceinline__ void for_each_vector_group_nchw(
    index_t N,
    index_t C,
    index_t L,
    index_t c,
    index_t split,
    index_t splits,
    int tid,
    int T,
    const FG& f_group,
    const F& f) {
  const index_t vectors = N * L / VEC;
  const index_t per_split = (vectors + splits - 1) / splits;
  const index_t v0 = split * per_split;
  const index_t v1 = v0 + per_split < vectors ? v0 + per_split : vectors;
  index_t v = v0 + tid;
  if (v >= v1) {
    return;
  }
  // NB: (n, l) = divmod(v * VEC, L) stepped without a division per vector.
  // The step (T * VEC) and its quotient and remainder fit in 32 bits.
  const int32_t step = T * VEC;
  int32_t step_n, step_l;
  if constexpr (sizeof(index_t) == 8) {
    // NB: a 32-bit division instead of a 64-bit one's subroutine call (ptxas
    // spilled loop state around one); L only divides a step it fits in.
    const int32_t l32 = step >= L ? static_cast<int32_t>(L) : 0;
    step_n = l32 > 0 ? step / l32 : 0;
    step_l = step - step_n * l32;
  } else {
    step_n = step / L;
    step_l = step - step_n * L;
  }
  index_t n = v * VEC / L;
  index_t l = v * VEC - n * L;
  const auto next = [&]() {
    n += step_n;
    l += step_l;
    if (l >= L) {
      l -= L;
      ++n;
    }
  };
  int m = 0;
  if constexpr (G > 1) {
    index_loop<index_t>(
        [&] { return v1 - v > static_cast<index_t>(G - 1) * T; },
        [&] {
          v += static_cast<index_t>(G) * T;
          m += G;
        },
        [&] {
          index_t i[G];
#pragma unroll
          for (int g = 0; g < G; ++g) {
            i[g] = (n * C + c) * L + l;
            next();
          }
          f_group(m, i);
        });
  }
  index_loop<index_t>(
      [&] { return v < v1; },
      [&] {
        v += T;
        ++m;
      },
      [&] {
        f(m, (n * C + c) * L + l);
        next();
      });
}

// for_each_vector_group_nchw one vector at a time.
template <int VEC, typename index_t, typename F>
__device__ __forceinline__ void for_each_vector_nchw(
    index_t N, index_t C, index_t L, index_t c, index_t split, index_t splits, int tid, int T, const F& f) {
  for_each_vector_group_nchw<VEC, 1>(N, C, L, c, split, splits, tid, T, f, f);
}

// Calls f(m, i) for each row that thread row `ty` of `TY` owns in [M, C] segment
// `split`, for the VEC channels from c0 (none when c0 >= C).
template <typename index_t, typename F>
__device__ __forceinline__ void for_each_vector_cl(
    index_t M, index_t C, index_t c0, index_t split, index_t splits, int ty, int TY, const F& f) {
  if (c0 >= C) {
    return;
  }
  const index_t per_split = (M + splits - 1) / splits;
  const index_t r0 = split * per_split;
  const index_t r1 = r0 + per_split < M ? r0 + per_split : M;
  int m = 0;
  index_t row = r0 + ty;
  index_loop<index_t>(
      [&] { return row < r1; },
      [&] {
        row += TY;
        ++m;
      },
      [&] { f(m, row * C + c0); });
}

// Reduces [N, C, L] segment (c, split) over a 1-D block into
// partials[c * splits + split]; visit(m, i, ch, raw) sees every vector loaded
// (ch: its elements' channels, here all c).
template <typename Reducer, int VEC, typename index_t, typename Visit>
__device__ __forceinline__ void reduce_segment_nchw(
    const Reducer& r,
    index_t N,
    index_t C,
    index_t L,
    index_t c,
    index_t split,
    index_t splits,
    typename Reducer::Partial* smem,
    typename Reducer::Partial* partials,
    const Visit& visit) {
  using Value = typename Reducer::Value;
  constexpr int G = Reducer::template run_vectors<VEC>();
  const auto ctx = r.context(c);
  auto state = Reducer::init();
  index_t ch[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    ch[k] = c;
  }
  const auto load = [&](int m, index_t i, Value(&vals)[VEC]) {
    RawVec<Reducer, VEC> raw[Reducer::kInputs];
    r.template load_raw<VEC>(i, raw);
    visit(m, i, ch, raw);
    Reducer::template unpack<VEC>(raw, vals);
  };
  for_each_vector_group_nchw<VEC, G>(
      N, C, L, c, split, splits, threadIdx.x, blockDim.x,
      [&](int m, const index_t(&i)[G]) {
        Value run[G * VEC];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          Value vals[VEC];
          load(m + g, i[g], vals);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            run[g * VEC + k] = vals[k];
          }
        }
        r.template add_run<G * VEC>(state, ctx, run);
      },
      [&](int m, index_t i) {
        Value vals[VEC];
        load(m, i, vals);
        r.template add_run<VEC>(state, ctx, vals);
      });
  smem[threadIdx.x] = Reducer::finish(state);
  merge_over_rows<Reducer>(smem, 0, threadIdx.x, 1, blockDim.x);
  if (threadIdx.x == 0) {
    partials[c * splits + split] = smem[0];
  }
}

// Reduces [M, C] segment (tile, split) over a (TX, TY) block: thread (tx, ty)
// owns VEC consecutive channels and strides over rows; per channel, partials
// are merged over ty and written to partials[channel * splits + split];
// visit(m, i, ch, raw) as for reduce_segment_nchw (ch: c0 .. c0 + VEC - 1).
template <typename Reducer, int VEC, typename index_t, typename Visit>
__device__ __forceinline__ void reduce_segment_cl(
    const Reducer& r,
    index_t M,
    index_t C,
    index_t tile,
    index_t split,
    index_t splits,
    typename Reducer::Partial* smem,
    typename Reducer::Partial* partials,
    const Visit& visit) {
  const int TX = blockDim.x;
  const int TY = blockDim.y;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const index_t c0 = (tile * TX + tx) * VEC;
  typename Reducer::State state[VEC];
  typename Reducer::Context ctx[VEC];
  index_t ch[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    state[k] = Reducer::init();
    ch[k] = c0 + k;
    if (c0 + k < C) {
      ctx[k] = r.context(c0 + k);
    }
  }
  for_each_vector_cl(M, C, c0, split, splits, ty, TY, [&](int m, index_t i) {
    RawVec<Reducer, VEC> raw[Reducer::kInputs];
    r.template load_raw<VEC>(i, raw);
    visit(m, i, ch, raw);
    typename Reducer::Value vals[VEC];
    Reducer::template unpack<VEC>(raw, vals);
    r.template add_row<VEC>(state, ctx, vals);
  });
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    smem[ty * TX + tx] = Reducer::finish(state[k]);
    merge_over_rows<Reducer>(smem, tx, ty, TX, TY);
    if (ty == 0 && c0 + k < C) {
      partials[(c0 + k) * splits + split] = smem[tx];
    }
  }
}

struct IgnoreLoaded {
  template <typename index_t, typename Channels, typename Raw>
  __device__ void operator()(int, index_t, const Channels&, const Raw&) const {}
};

// [N, C, L] reduction: block (c = blockIdx.x, split = blockIdx.y) reduces its
// segment into partials[c * splits + split].
// VEC > 1 needs L % VEC == 0 and 16-byte aligned data.
template <typename Reducer, typename Visit, int VEC, typename index_t>
__global__ void __launch_bounds__(kBlockSize) channel_reduce_nchw_kernel(
    Reducer r, Visit visit, index_t N, index_t C, index_t L, typename Reducer::Partial* partials) {
  __shared__ typename Reducer::Partial smem[kBlockSize];
  reduce_segment_nchw<Reducer, VEC, index_t>(r, N, C, L, blockIdx.x, blockIdx.y, gridDim.y, smem, partials, visit);
}

// [M, C] reduction (channels innermost): block (tile = blockIdx.x, split =
// blockIdx.y) reduces its segment.
// VEC > 1 needs C % VEC == 0 and 16-byte aligned data.
template <typename Reducer, typename Visit, int VEC, typename index_t>
__global__ void __launch_bounds__(kBlockSize)
    channel_reduce_cl_kernel(Reducer r, Visit visit, index_t M, index_t C, typename Reducer::Partial* partials) {
  __shared__ typename Reducer::Partial smem[kBlockSize];
  reduce_segment_cl<Reducer, VEC, index_t>(r, M, C, blockIdx.x, blockIdx.y, gridDim.y, smem, partials, visit);
}

// Splits per reduction unit (channel or channel tile) so that `units` * splits
// blocks reach `target_blocks`, while each thread keeps at least
// kMinVectorsPerThread of the unit's `positions` (positions per pass of a
// block: `per_pass`).
inline int64_t choose_splits(int64_t units, int64_t target_blocks, int64_t positions, int64_t per_pass) {
  const int64_t max_splits = std::max<int64_t>(1, positions / (per_pass * kMinVectorsPerThread));
  return std::clamp<int64_t>(target_blocks / units, 1, std::min<int64_t>(max_splits, 65535));
}

// Block shape of a channels-last reduction: tx threads across channel vectors
// (a power of two up to a warp), ty = kBlockSize / tx over rows, `tiles` blocks
// across the channels.
struct ClBlockShape {
  int tx;
  int ty;
  int64_t tiles;
};

inline ClBlockShape cl_block_shape(int64_t channel_vectors) {
  int tx = 1;
  while (tx < 32 && tx < channel_vectors) {
    tx *= 2;
  }
  return {tx, kBlockSize / tx, (channel_vectors + tx - 1) / tx};
}

// New [C, splits] tensor of Partial (acc_t fields).
template <typename Partial, typename acc_t>
std::pair<Tensor, Partial*> new_partials(int64_t C, int64_t splits, const at::TensorOptions& acc_options) {
  static_assert(sizeof(Partial) % sizeof(acc_t) == 0, "Partial must be made of acc_t");
  Tensor partials = at::empty({C * splits * int64_t(sizeof(Partial) / sizeof(acc_t))}, acc_options);
  return {partials, reinterpret_cast<Partial*>(partials.mutable_data_ptr<acc_t>())};
}

// Launches the reduction of `r` over a dense input of shape s into a new
// [C, splits] partials tensor (acc dtype, Partial-sized elements); `visit`
// sees every vector loaded (see reduce_segment_nchw). `vectorizable`: every
// pointer of r and visit is 16-byte aligned.
template <typename Reducer, typename scalar_t, typename Visit = IgnoreLoaded>
std::pair<Tensor, int64_t> launch_channel_reduce(
    const Reducer& r,
    const BatchNormShape& s,
    bool vectorizable,
    const at::TensorOptions& acc_options,
    const Visit& visit = Visit{}) {
  using Partial = typename Reducer::Partial;
  using acc_t = acc_type<scalar_t>;
  constexpr int kVec = vec_size<scalar_t>();
  const int64_t numel = s.N * s.C * s.L;
  const bool use32 = use_32bit_index(numel);
  const int64_t target_blocks = static_cast<int64_t>(sm_count()) * kBlocksPerSm;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (!s.channels_last) {
    const bool vec = vectorizable && s.L % kVec == 0;
    const int64_t splits = choose_splits(s.C, target_blocks, s.N * s.L / (vec ? kVec : 1), kBlockSize);
    auto [partials, out] = new_partials<Partial, acc_t>(s.C, splits, acc_options);
    const dim3 grid(static_cast<unsigned>(s.C), static_cast<unsigned>(splits));
#define BNORM_EXT_LAUNCH_NCHW(VEC, index_t)                                                  \
  channel_reduce_nchw_kernel<Reducer, Visit, VEC, index_t><<<grid, kBlockSize, 0, stream>>>( \
      r, visit, static_cast<index_t>(s.N), static_cast<index_t>(s.C), static_cast<index_t>(s.L), out)
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
  const ClBlockShape shape = cl_block_shape((s.C + vec_c - 1) / vec_c);
  const int64_t M = s.reduce_size();
  const int64_t splits = choose_splits(shape.tiles, target_blocks, M, shape.ty);
  auto [partials, out] = new_partials<Partial, acc_t>(s.C, splits, acc_options);
  const dim3 grid(static_cast<unsigned>(shape.tiles), static_cast<unsigned>(splits));
  const dim3 block(shape.tx, shape.ty);
#define BNORM_EXT_LAUNCH_CL(VEC, index_t)                \
  channel_reduce_cl_kernel<Reducer, Visit, VEC, index_t> \
      <<<grid, block, 0, stream>>>(r, visit, static_cast<index_t>(M), static_cast<index_t>(s.C), out)
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
__global__ void __launch_bounds__(kBlockSize) channel_elementwise_kernel(Op op, index_t vectors, index_t C, index_t L) {
  index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  index_loop<index_t>(
      [&] { return v < vectors; }, [&] { v += static_cast<index_t>(gridDim.x) * blockDim.x; },
      [&] {
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
      });
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
  const unsigned blocks =
      static_cast<unsigned>(std::clamp<int64_t>((vectors + kBlockSize - 1) / kBlockSize, 1, max_blocks));
  const auto stream = c10::cuda::getCurrentCUDAStream();
#define BNORM_EXT_LAUNCH_EW(VEC, CL, index_t)                                          \
  channel_elementwise_kernel<Op, VEC, CL, index_t><<<blocks, kBlockSize, 0, stream>>>( \
      op, static_cast<index_t>(vectors), static_cast<index_t>(s.C), static_cast<index_t>(s.L))
#define BNORM_EXT_LAUNCH_EW_LAYOUT(VEC, index_t) \
  if (s.channels_last) {                         \
    BNORM_EXT_LAUNCH_EW(VEC, true, index_t);     \
  } else {                                       \
    BNORM_EXT_LAUNCH_EW(VEC, false, index_t);    \
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
  const param_t* weight;  // may be null
  const param_t* bias;    // may be null
  acc_t eps;

  __device__ NormalizeCoeffs<acc_t> operator()(int64_t c) const {
    const acc_t s = static_cast<acc_t>(spread[c]);
    const acc_t invstd = kFromVar ? invstd_from_var(s, eps) : s;
    return normalize_coeffs<acc_t>(
        static_cast<acc_t>(mean[c]), invstd, weight ? static_cast<acc_t>(weight[c]) : acc_t(1),
        bias ? static_cast<acc_t>(bias[c]) : acc_t(0));
  }
};

// Output epilogues of the normalize passes: map the VEC normalized values
// (acc_t) of the vector at flat index i in place before the store. aligned()
// (host): the epilogue's pointers are 16-byte aligned.
// The plain ops: the normalized values as they are.
struct NormalizedOnly {
  bool aligned() const {
    return true;
  }
  template <int VEC, typename index_t, typename acc_t>
  __device__ void operator()(index_t, acc_t (&)[VEC]) const {}
};

// The fused ops: v <- act(v + residual) in acc_t, residual dense in the
// input's layout or null, as the CPU kernels' ResidualActivation (the
// normalized value rounded to acc_t, then the add and the activation).
template <typename scalar_t, Activation A>
struct ResidualActivation {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* residual;  // may be null
  acc_t negative_slope;

  bool aligned() const {
    return is_aligned16(residual);
  }
  template <int VEC, typename index_t>
  __device__ void operator()(index_t i, acc_t (&v)[VEC]) const {
    if (residual != nullptr) {
      acc_t r[VEC];
      load_acc<VEC>(residual, i, r);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        v[k] += r[k];
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[k] = activation_apply<A>(v[k], negative_slope);
    }
  }
};

// y = act((x - mean) * scale + bias), act an output epilogue.
template <typename scalar_t, typename Loader, typename Act = NormalizedOnly>
struct NormalizeOp {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  scalar_t* y;
  Loader coeffs;
  Act act;

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
    act(i, out);
    store_from_acc<VEC>(y, i, out);
  }
};

// Where the forward statistics of a batch go: mean and invstd (or the biased
// var) per channel, the running statistics and num_batches_tracked.
template <typename acc_t, typename param_t>
struct StatsOutputs {
  acc_t eps;
  bool output_var;  // write the biased variance instead of invstd
  acc_t* mean;
  acc_t* spread;
  param_t* running_mean;  // may be null (then running_var is too)
  param_t* running_var;
  int64_t* num_batches_tracked;  // may be null
  bool has_momentum;
  double momentum;

  // This batch's running-average factor; read before count_batch().
  __device__ double factor() const {
    const int64_t batches = num_batches_tracked ? *num_batches_tracked + 1 : 1;
    return running_average_factor(has_momentum, momentum, batches);
  }
  __device__ void count_batch() const {
    if (num_batches_tracked != nullptr) {
      *num_batches_tracked += 1;
    }
  }
  __device__ acc_t invstd(const WelfordData<acc_t>& w) const {
    return invstd_from_var(welford_biased_var(w), eps);
  }
  // Channel c's outputs from its merged statistics w; running stats only for
  // a non-empty batch.
  __device__ void store(int64_t c, const WelfordData<acc_t>& w, double factor) const {
    const acc_t var = welford_biased_var(w);
    mean[c] = w.mean;
    spread[c] = output_var ? var : invstd_from_var(var, eps);
    if (running_mean != nullptr && w.count > acc_t(0)) {
      const acc_t f = static_cast<acc_t>(factor);
      const acc_t unbiased = w.m2 / (w.count - acc_t(1));
      running_mean[c] = static_cast<param_t>(running_update(static_cast<acc_t>(running_mean[c]), w.mean, f));
      running_var[c] = static_cast<param_t>(running_update(static_cast<acc_t>(running_var[c]), unbiased, f));
    }
  }
};

// Single-block finalize of the forward statistics: merges partials[c, 0..splits)
// in order into `out`; increments num_batches_tracked.
template <typename acc_t, typename param_t>
__global__ void __launch_bounds__(1024) finalize_stats_kernel(
    const WelfordData<acc_t>* partials, int64_t C, int64_t splits, StatsOutputs<acc_t, param_t> out) {
  __shared__ double factor;
  if (threadIdx.x == 0) {
    factor = out.factor();
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    WelfordData<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t k = 0; k < splits; ++k) {
      w = welford_merge(w, partials[c * splits + k]);
    }
    out.store(c, w, factor);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    out.count_batch();
  }
}

// Where the backward sums of a batch go: sum_dy / sum_dy_xmu per channel
// (optional) and grad_weight = sum_dy_xmu * invstd, grad_bias = sum_dy (optional).
template <typename acc_t, typename grad_t>
struct GradOutputs {
  acc_t* sum_dy;  // may be null (then sum_dy_xmu is too)
  acc_t* sum_dy_xmu;
  const acc_t* invstd;  // may be null when grad_weight is
  grad_t* grad_weight;  // may be null (then grad_bias is too)
  grad_t* grad_bias;

  __device__ void store(int64_t c, const GradSums<acc_t>& g) const {
    if (sum_dy != nullptr) {
      sum_dy[c] = g.sum_dy;
      sum_dy_xmu[c] = g.sum_dy_xmu;
    }
    if (grad_weight != nullptr) {
      grad_weight[c] = static_cast<grad_t>(g.sum_dy_xmu * invstd[c]);
      grad_bias[c] = static_cast<grad_t>(g.sum_dy);
    }
  }
};

// Sums partials[c, 0..splits) in order into `out`.
template <typename acc_t, typename grad_t>
__global__ void __launch_bounds__(kBlockSize)
    finalize_grad_kernel(const GradSums<acc_t>* partials, int64_t C, int64_t splits, GradOutputs<acc_t, grad_t> out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  GradSums<acc_t> g = partials[c * splits];
  for (int64_t k = 1; k < splits; ++k) {
    g = grad_sums_merge(g, partials[c * splits + k]);
  }
  out.store(c, g);
}

// Backward coefficients per channel; kTrain uses the gradient sums.
template <typename acc_t, typename param_t, bool kTrain>
struct BackwardCoeffLoader {
  const acc_t* mean;
  const acc_t* invstd;
  const param_t* weight;    // may be null
  const acc_t* sum_dy;      // kTrain only
  const acc_t* sum_dy_xmu;  // kTrain only
  const acc_t* count;       // kTrain only: one value, on the device

  __device__ BackwardCoeffs<acc_t> operator()(int64_t c) const {
    const acc_t w = weight ? static_cast<acc_t>(weight[c]) : acc_t(1);
    if constexpr (kTrain) {
      return backward_train_coeffs(mean[c], invstd[c], w, sum_dy[c], sum_dy_xmu[c], *count);
    } else {
      return backward_eval_coeffs(mean[c], invstd[c], w);
    }
  }
};

// dx = dz * dy_scale + (x - mean) * xmu_scale + shift (train), dz * dy_scale
// (eval), dz from dy through the Prologue (the plain ops: dz = dy), which
// also stores dz where it wants it.
template <typename scalar_t, typename Loader, bool kTrain, typename Prologue = PlainGrad<scalar_t>>
struct BackwardOp {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  scalar_t* dx;
  Loader coeffs;
  Prologue pro;

  template <int VEC, typename index_t>
  __device__ void apply(index_t i, const index_t (&ch)[VEC]) const {
    // NB: the first channel's coefficients before the loads: fewer values live
    // across the division's slow-path call (which spilled with int64 indices).
    const BackwardCoeffs<acc_t> k0 = coeffs(ch[0]);
    const typename Prologue::Channel act0 = pro.channel(ch[0]);
    GradValue<acc_t> v[VEC];  // NB: x and aux set only where read
    acc_t in[VEC];
    load_acc<VEC>(dy, i, in);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[j].dy = in[j];
    }
    if constexpr (kTrain || Prologue::kReadsX) {
      load_acc<VEC>(x, i, in);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[j].x = in[j];
      }
    }
    if constexpr (Prologue::kAux) {
      Vec<scalar_t, VEC> aux;
      pro.template load_aux<VEC>(i, aux);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[j].aux = static_cast<acc_t>(aux.v[j]);
      }
    }
    apply_values<VEC>(i, ch, v, k0, act0);
  }
  // dx (and the prologue's dz) at i from dy, x (when kTrain or the prologue
  // reads it) and the prologue's aux already loaded.
  template <int VEC, typename index_t>
  __device__ void apply_values(index_t i, const index_t (&ch)[VEC], const GradValue<acc_t> (&v)[VEC]) const {
    apply_values<VEC>(i, ch, v, coeffs(ch[0]), pro.channel(ch[0]));
  }
  // apply_values with the first channel's coefficients k0 and act0 given.
  template <int VEC, typename index_t>
  __device__ void apply_values(
      index_t i,
      const index_t (&ch)[VEC],
      const GradValue<acc_t> (&v)[VEC],
      const BackwardCoeffs<acc_t>& k0,
      const typename Prologue::Channel& act0) const {
    acc_t dz[VEC], out[VEC];
    BackwardCoeffs<acc_t> k = k0;
    typename Prologue::Channel act = act0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j > 0 && ch[j] != ch[j - 1]) {
        k = coeffs(ch[j]);
        act = pro.channel(ch[j]);
      }
      dz[j] = pro.dz(k.mean, act, v[j]);
      out[j] = kTrain ? backward_apply(k, dz[j], v[j].x) : dz[j] * k.dy_scale;
    }
    store_from_acc<VEC>(dx, i, out);
    pro.template store_dz<VEC>(i, dz);
  }
};

// Visit for the eval-mode gradient sums: writes dx = dz * dy_scale (and the
// prologue's dz) from the dy, x and aux the reduction has just loaded (mean
// and invstd are constants in eval mode), so the eval backward reads dy and x
// once and writes dx, 3s instead of 5s.
template <typename scalar_t, typename param_t, typename Prologue = PlainGrad<scalar_t>>
struct EvalGradInputVisit {
  using acc_t = acc_type<scalar_t>;
  using Reducer = GradReducer<scalar_t, Prologue>;
  BackwardOp<scalar_t, BackwardCoeffLoader<acc_t, param_t, false>, false, Prologue> op;

  template <typename index_t, int VEC>
  __device__ void operator()(
      int, index_t i, const index_t (&ch)[VEC], const Vec<scalar_t, VEC> (&raw)[Reducer::kInputs]) const {
    GradValue<acc_t> v[VEC];
    Reducer::template unpack<VEC>(raw, v);
    op.template apply_values<VEC>(i, ch, v);
  }
};

}  // namespace cuda
}  // namespace bnorm_ext
