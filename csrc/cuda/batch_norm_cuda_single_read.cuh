// Single-read (persistent) training kernels: one cooperative launch reads the
// input once, keeps it in shared memory, reduces it into per-segment partials,
// syncs the grid, merges each channel's partials and applies the elementwise
// step from the kept copy. Training forward moves 2 bytes per input byte
// (read x, write y) instead of 3; training backward 3 instead of 5. Used when
// the whole input fits in the shared memory of the co-resident blocks; the
// two-pass kernels serve everything else.
#pragma once

#include <cooperative_groups.h>

#include <cstdlib>
#include <cstring>

#include "batch_norm_cuda_kernels.cuh"
#include "cooperative_launch_record.h"

namespace bnorm_ext {
namespace cuda {

// Blocks of kBlockSize threads per SM a single-read kernel is sized for: the
// SM's shared memory is split between them and registers capped accordingly
// (4: 64 per thread). Channels-last with 8-element vectors keeps 8 channels'
// statistics per thread, which spills at 64 registers on sm_80: 3 (85); with
// a per-channel context besides (Reducer::kChannelContext: the fused silu
// backward's scale and bias) it spills at 80 on sm_90: 2 (128).
template <typename Reducer, int VEC, bool kChannelsLast>
constexpr int single_read_blocks_per_sm() {
  if constexpr (kChannelsLast && VEC == 8) {
    return Reducer::kChannelContext ? 2 : 3;
  }
  return 4;
}

// What one single-read kernel can use on the current device: co-resident
// blocks per SM (0: no cooperative launch) and dynamic shared memory per block.
struct SingleReadLimits {
  int blocks_per_sm = 0;
  int64_t max_dynamic_smem = 0;
};

// The limits of `kernel`, sized for `blocks_per_sm` blocks per SM, on the
// current device (queried once per kernel and device, which also raises the
// kernel's dynamic shared memory cap).
SingleReadLimits single_read_limits(const void* kernel, int blocks_per_sm);

// False when BNORM_EXT_CUDA_SINGLE_READ=0 (forces the two-pass kernels).
inline bool single_read_enabled() {
  const char* v = std::getenv("BNORM_EXT_CUDA_SINGLE_READ");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// Merges partials[c * splits + q] for q = lane, lane + lanes, ... (empty
// when !valid) in order; the caller then merges over the lanes in a tree.
template <typename Reducer, typename index_t>
__device__ __forceinline__ typename Reducer::Partial merge_channel_partials(
    const typename Reducer::Partial* partials, index_t c, index_t splits, int lane, int lanes, bool valid) {
  auto p = Reducer::finish(Reducer::init());
  if (valid) {
    for (index_t q = lane; q < splits; q += lanes) {
      p = Reducer::merge(p, partials[c * splits + q]);
    }
  }
  return p;
}

// Epilogue of the single-read forward: the channel's statistics (stored, and
// folded into the running stats, by the block holding split 0), then
// y = act(normalize(x)), act an output epilogue (NormalizedOnly for the plain op).
template <typename scalar_t, typename param_t, typename Act = NormalizedOnly>
struct NormalizeEpilogue {
  using acc_t = acc_type<scalar_t>;
  using Value = acc_t;
  using Partial = WelfordData<acc_t>;
  using Coeffs = NormalizeCoeffs<acc_t>;
  using BlockState = double;  // the running-average factor
  scalar_t* y;
  const param_t* weight;  // may be null
  const param_t* bias;    // may be null
  StatsOutputs<acc_t, param_t> stats;
  Act act;

  // Before the grid sync (num_batches_tracked is incremented after it).
  __device__ BlockState begin() const {
    return stats.factor();
  }
  // After the grid sync, by one thread of the grid.
  __device__ void end() const {
    stats.count_batch();
  }
  __device__ Coeffs finish_channel(int64_t c, const Partial& w, bool owner, BlockState factor) const {
    if (owner) {
      stats.store(c, w, factor);
    }
    return normalize_coeffs<acc_t>(
        w.mean, stats.invstd(w), weight ? static_cast<acc_t>(weight[c]) : acc_t(1),
        bias ? static_cast<acc_t>(bias[c]) : acc_t(0));
  }
  template <int VEC, typename index_t, typename CoeffOf>
  __device__ void apply(index_t i, const CoeffOf& coeff_of, const Value (&v)[VEC]) const {
    acc_t out[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      out[k] = normalize_apply(coeff_of(k), v[k]);
    }
    act(i, out);
    store_from_acc<VEC>(y, i, out);
  }
};

// A channel's backward coefficients and its gradient prologue's context
// (NB: an empty Channel adds no bytes, so the plain op's shared memory is as
// with BackwardCoeffs alone).
template <typename acc_t, typename Channel>
struct ActBackwardCoeffs : BackwardCoeffs<acc_t>, Channel {};
static_assert(sizeof(ActBackwardCoeffs<float, NoChannel>) == sizeof(BackwardCoeffs<float>));

// Epilogue of the single-read training backward: grad_weight / grad_bias (by
// the block holding split 0), then dx from dz and x, dz from dy through the
// Prologue (the reducer's), which also stores dz where it wants it.
template <typename scalar_t, typename param_t, typename Prologue = PlainGrad<scalar_t>>
struct GradInputEpilogue {
  using acc_t = acc_type<scalar_t>;
  using Value = GradValue<acc_t>;
  using Partial = GradSums<acc_t>;
  using Coeffs = ActBackwardCoeffs<acc_t, typename Prologue::Channel>;
  using BlockState = int;
  scalar_t* dx;
  const acc_t* mean;
  const acc_t* invstd;
  const param_t* weight;  // may be null
  acc_t count;
  GradOutputs<acc_t, acc_t> grads;
  Prologue pro;

  __device__ BlockState begin() const {
    return 0;
  }
  __device__ void end() const {}
  __device__ Coeffs finish_channel(int64_t c, const Partial& g, bool owner, BlockState) const {
    if (owner) {
      grads.store(c, g);
    }
    return {
        backward_train_coeffs(
            mean[c], invstd[c], weight ? static_cast<acc_t>(weight[c]) : acc_t(1), g.sum_dy, g.sum_dy_xmu, count),
        pro.channel(c)};
  }
  template <int VEC, typename index_t, typename CoeffOf>
  __device__ void apply(index_t i, const CoeffOf& coeff_of, const Value (&v)[VEC]) const {
    acc_t dz[VEC], out[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const Coeffs ck = coeff_of(k);
      dz[k] = pro.dz(ck.mean, ck, v[k]);
      out[k] = backward_apply<acc_t>(ck, dz[k], v[k].x);
    }
    store_from_acc<VEC>(dx, i, out);
    pro.template store_dz<VEC>(i, dz);
  }
};

// The single-read kernel over a dense [N, C, L] (kChannelsLast: [M = N, C],
// L unused) tensor. Block b owns segments b, b + gridDim.x, ...; its j-th
// segment's raw vectors live in the dynamic shared memory at
// ((j * slots + m) * kInputs + p) * T + tid. Launched cooperatively with every
// block resident.
template <typename Reducer, typename Epilogue, int VEC, bool kChannelsLast>
__global__ void __launch_bounds__(kBlockSize, (single_read_blocks_per_sm<Reducer, VEC, kChannelsLast>()))
    single_read_channel_kernel(
        Reducer r,
        Epilogue e,
        int32_t N,
        int32_t C,
        int32_t L,
        int32_t splits,
        int32_t segments,
        int32_t slots,
        typename Reducer::Partial* partials) {
  using index_t = int32_t;
  using Raw = RawVec<Reducer, VEC>;
  using Coeffs = typename Epilogue::Coeffs;
  constexpr int kIn = Reducer::kInputs;
  extern __shared__ __align__(16) unsigned char kept_bytes[];
  Raw* kept = reinterpret_cast<Raw*>(kept_bytes);
  __shared__ typename Reducer::Partial smem[kBlockSize];
  __shared__ Coeffs coeffs[kChannelsLast ? 32 * VEC : 1];
  const int TX = blockDim.x;
  const int TY = blockDim.y;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int T = TX * TY;
  const int tid = ty * TX + tx;
  const auto kept_at = [&](int j, int m, int p) -> Raw& { return kept[((j * slots + m) * kIn + p) * T + tid]; };

  const auto block_state = e.begin();
  int j = 0;
  for (index_t seg = blockIdx.x; seg < segments; seg += gridDim.x, ++j) {
    const auto keep = [&](int m, index_t, const index_t(&)[VEC], const Raw(&raw)[kIn]) {
#pragma unroll
      for (int p = 0; p < kIn; ++p) {
        kept_at(j, m, p) = raw[p];
      }
    };
    if constexpr (kChannelsLast) {
      reduce_segment_cl<Reducer, VEC, index_t>(r, N, C, seg / splits, seg % splits, splits, smem, partials, keep);
    } else {
      reduce_segment_nchw<Reducer, VEC, index_t>(r, N, C, L, seg / splits, seg % splits, splits, smem, partials, keep);
    }
  }
  // NB: grid.sync() also orders the partials' global writes before the reads below.
  cooperative_groups::this_grid().sync();
  if (blockIdx.x == 0 && tid == 0) {
    e.end();
  }
  const auto apply_kept = [&](int jj, int m, index_t i, const auto& coeff_of) {
    Raw raw[kIn];
#pragma unroll
    for (int p = 0; p < kIn; ++p) {
      raw[p] = kept_at(jj, m, p);
    }
    typename Reducer::Value vals[VEC];
    Reducer::template unpack<VEC>(raw, vals);
    e.template apply<VEC>(i, coeff_of, vals);
  };
  j = 0;
  for (index_t seg = blockIdx.x; seg < segments; seg += gridDim.x, ++j) {
    const index_t split = seg % splits;
    if constexpr (kChannelsLast) {
      const index_t c0 = (seg / splits * TX + tx) * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const index_t c = c0 + k;
        smem[tid] = merge_channel_partials<Reducer>(partials, c, splits, ty, TY, c < C);
        merge_over_rows<Reducer>(smem, tx, ty, TX, TY);
        if (ty == 0 && c < C) {
          coeffs[tx * VEC + k] = e.finish_channel(c, smem[tx], split == 0, block_state);
        }
      }
      __syncthreads();
      const auto coeff_of = [&](int k) -> Coeffs { return coeffs[tx * VEC + k]; };
      for_each_vector_cl(N, C, c0, split, splits, ty, TY, [&](int m, index_t i) { apply_kept(j, m, i, coeff_of); });
    } else {
      const index_t c = seg / splits;
      smem[tid] = merge_channel_partials<Reducer>(partials, c, splits, tid, T, true);
      merge_over_rows<Reducer>(smem, 0, tid, 1, T);
      if (tid == 0) {
        coeffs[0] = e.finish_channel(c, smem[0], split == 0, block_state);
      }
      __syncthreads();
      const Coeffs k = coeffs[0];
      const auto coeff_of = [&](int) -> Coeffs { return k; };
      for_each_vector_nchw<VEC>(
          N, C, L, c, split, splits, tid, T, [&](int m, index_t i) { apply_kept(j, m, i, coeff_of); });
    }
  }
}

// Launches the single-read kernel with VEC-element vectors; false (nothing
// launched) when the input does not fit in the co-resident blocks' shared
// memory, or the cooperative launch record says not to try (see
// cooperative_launch_record.h).
template <typename Reducer, typename Epilogue, int VEC, bool kChannelsLast>
bool launch_single_read_layout(
    const Reducer& r, const Epilogue& e, const BatchNormShape& s, const at::TensorOptions& acc_options) {
  using Partial = typename Reducer::Partial;
  using acc_t = typename Reducer::acc_t;
  const auto kernel = single_read_channel_kernel<Reducer, Epilogue, VEC, kChannelsLast>;
  const SingleReadLimits limits = single_read_limits(
      reinterpret_cast<const void*>(kernel), single_read_blocks_per_sm<Reducer, VEC, kChannelsLast>());
  if (limits.blocks_per_sm == 0) {
    return false;
  }
  const int64_t max_grid = static_cast<int64_t>(limits.blocks_per_sm) * sm_count();
  int64_t splits, segments, slots;
  dim3 block(kBlockSize);
  if constexpr (kChannelsLast) {
    const ClBlockShape shape = cl_block_shape(s.C / VEC + (s.C % VEC != 0));
    const int64_t M = s.reduce_size();
    splits = choose_splits(shape.tiles, max_grid, M, shape.ty);
    segments = shape.tiles * splits;
    slots = ((M + splits - 1) / splits + shape.ty - 1) / shape.ty;
    block = dim3(shape.tx, shape.ty);
  } else {
    const int64_t vectors = s.N * s.L / VEC;
    splits = choose_splits(s.C, max_grid, vectors, kBlockSize);
    segments = s.C * splits;
    slots = ((vectors + splits - 1) / splits + kBlockSize - 1) / kBlockSize;
  }
  const int64_t grid = std::min(segments, max_grid);
  const int64_t segments_per_block = (segments + grid - 1) / grid;
  const int64_t smem =
      segments_per_block * slots * Reducer::kInputs * kBlockSize * int64_t(sizeof(RawVec<Reducer, VEC>));
  if (smem > limits.max_dynamic_smem) {
    return false;
  }
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool launched = launch_cooperative_recorded(
      reinterpret_cast<const void*>(kernel), device, grid, capture != cudaStreamCaptureStatusNone, [&] {
        auto [partials, partials_ptr] = new_partials<Partial, acc_t>(s.C, splits, acc_options);
        Reducer r_arg = r;
        Epilogue e_arg = e;
        int32_t n = static_cast<int32_t>(s.channels_last ? s.reduce_size() : s.N);
        int32_t c = static_cast<int32_t>(s.C);
        int32_t l = static_cast<int32_t>(s.L);
        int32_t splits_arg = static_cast<int32_t>(splits);
        int32_t segments_arg = static_cast<int32_t>(segments);
        int32_t slots_arg = static_cast<int32_t>(slots);
        Partial* out = partials_ptr;
        void* args[] = {&r_arg, &e_arg, &n, &c, &l, &splits_arg, &segments_arg, &slots_arg, &out};
        const cudaError_t err = cudaLaunchCooperativeKernel(
            reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(grid)), block, args,
            static_cast<size_t>(smem), stream);
        if (err == cudaErrorCooperativeLaunchTooLarge) {
          // NB: fewer SMs than the device reports (e.g. an MPS share): recorded,
          // so later calls go straight to the two-pass kernels.
          (void)cudaGetLastError();
          return CooperativeOutcome::kTooLarge;
        }
        C10_CUDA_CHECK(err);
        return CooperativeOutcome::kLaunched;
      });
  if (launched) {
    single_read_launch_count().fetch_add(1, std::memory_order_relaxed);
  }
  return launched;
}

// The single-read path for a dense input of shape s; false (nothing launched)
// where it does not apply: disabled, too large, or no cooperative launch.
// `aligned`: every pointer of r and e is 16-byte aligned.
template <typename Reducer, typename Epilogue>
bool launch_single_read(
    const Reducer& r, const Epilogue& e, const BatchNormShape& s, bool aligned, const at::TensorOptions& acc_options) {
  using scalar_t = typename Reducer::scalar_t;
  constexpr int kVec = vec_size<scalar_t>();
  const int64_t numel = s.N * s.C * s.L;
  if (!single_read_enabled() || !use_32bit_index(numel)) {
    return false;
  }
  const bool vec = aligned && (s.channels_last ? s.C % kVec == 0 : s.L % kVec == 0);
  if (s.channels_last) {
    return vec ? launch_single_read_layout<Reducer, Epilogue, kVec, true>(r, e, s, acc_options)
               : launch_single_read_layout<Reducer, Epilogue, 1, true>(r, e, s, acc_options);
  }
  return vec ? launch_single_read_layout<Reducer, Epilogue, kVec, false>(r, e, s, acc_options)
             : launch_single_read_layout<Reducer, Epilogue, 1, false>(r, e, s, acc_options);
}

}  // namespace cuda
}  // namespace bnorm_ext
