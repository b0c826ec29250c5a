// route on CUDA: a group of `width` lanes per token (8 or 16 for small E, a
// warp up to E = 1024) holds the token's E logits in registers, computes the
// scores with butterfly reductions, masks groups, picks the top k by k rounds
// of in-register argmax (NaN ranks last, the lower index wins ties; for float
// a round is one max over 64-bit keys, value bits and inverted index; with a
// whole warp per token and up to 8 experts per lane, each lane sorts its keys
// once and a round is a warp reduction of the lanes' best) and writes weights,
// experts and scores in one pass. The backward is one pass of the same shape.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../moe_routing.h"
#include "../sorting_network.h"
#include "common.cuh"

namespace moe_routing::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGroups = static_cast<int>(detail::kCudaMaxGroups);

// x ranks above y: the larger, NaN below everything (-inf included).
template <typename acc_t>
__device__ __forceinline__ bool value_above(acc_t x, acc_t y) {
  return !isnan(x) && (isnan(y) || x > y);
}

// Selection order (as on the CPU): value_above, ties (NaN with NaN too) to the
// lower index; index INT_MAX (a lane with no candidate) ranks last.
template <typename acc_t>
__device__ __forceinline__ bool ranks_before(acc_t va, int ia, acc_t vb, int ib) {
  if (ib == INT_MAX) return ia != INT_MAX;
  if (ia == INT_MAX) return false;
  if (value_above(va, vb)) return true;
  if (value_above(vb, va)) return false;
  return ia < ib;
}

// (value, index) argmax over a lane group in selection order.
template <int width, typename acc_t>
__device__ __forceinline__ void group_argmax(acc_t& value, int& index, acc_t& payload) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) {
    const acc_t v = __shfl_xor_sync(0xffffffffu, value, offset, width);
    const int i = __shfl_xor_sync(0xffffffffu, index, offset, width);
    const acc_t p = __shfl_xor_sync(0xffffffffu, payload, offset, width);
    if (ranks_before(v, i, value, index)) {
      value = v;
      index = i;
      payload = p;
    }
  }
}

// A key whose unsigned order is the selection order of (v, e): the float's
// bits made monotone in the high word (NaN lowest, -0 as +0), ~e in the low
// word so that ties go to the lower index. 0 means no candidate.
__device__ __forceinline__ uint64_t selection_key(float v, int e) {
  const uint32_t bits = __float_as_uint(v == 0.0f ? 0.0f : v);
  const uint32_t ordered = isnan(v) ? 0u : ((bits & 0x80000000u) ? ~bits : (bits | 0x80000000u));
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(e));
}

// The warp's largest key. On sm80+ as two 32-bit reductions (redux.sync):
// the largest high word, then the largest low word among the lanes that hold
// it, which is the 64-bit maximum in a few instructions instead of five
// rounds of 64-bit shuffles and compares.
__device__ __forceinline__ uint64_t warp_max_key(uint64_t key) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t hi = static_cast<uint32_t>(key >> 32), lo = static_cast<uint32_t>(key);
  const uint32_t best_hi = __reduce_max_sync(0xffffffffu, hi);
  const uint32_t best_lo = __reduce_max_sync(0xffffffffu, hi == best_hi ? lo : 0u);
  return (static_cast<uint64_t>(best_hi) << 32) | best_lo;
#else
  return group_max<kWarp>(key);
#endif
}

template <typename scalar_t, typename acc_t, int width, int vpt>
__global__ void __launch_bounds__(kThreads) route_kernel(
    const scalar_t* __restrict__ logits, const acc_t* __restrict__ bias, int64_t T, int E, int k,
    bool sigmoid, bool normalize, int num_groups, int topk_groups, bool group_by_max,
    acc_t scale, acc_t* __restrict__ weights, int64_t* __restrict__ experts, acc_t* __restrict__ scores) {
  __shared__ acc_t group_scores[kThreads / width][kMaxGroups];
  const int lane = threadIdx.x % width, slot = threadIdx.x / width;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kThreads / width) + slot;
  const bool live = t < T;  // dead groups still join the shuffles
  const acc_t neg_inf = -INFINITY;

  acc_t s[vpt];
#pragma unroll
  for (int i = 0; i < vpt; ++i) {
    const int e = lane + width * i;
    s[i] = (live && e < E) ? static_cast<acc_t>(logits[t * E + e]) : neg_inf;
  }
  if (sigmoid) {
#pragma unroll
    for (int i = 0; i < vpt; ++i) s[i] = acc_t(1) / (acc_t(1) + exp_(-s[i]));
  } else {
    acc_t m = neg_inf;
#pragma unroll
    for (int i = 0; i < vpt; ++i) m = max(m, s[i]);
    m = group_max<width>(m);
    acc_t sum = 0;
#pragma unroll
    for (int i = 0; i < vpt; ++i) {
      s[i] = (lane + width * i < E && live) ? exp_(s[i] - m) : acc_t(0);
      sum += s[i];
    }
    sum = group_sum<width>(sum);
#pragma unroll
    for (int i = 0; i < vpt; ++i) s[i] /= sum;
  }

  acc_t sel[vpt];
#pragma unroll
  for (int i = 0; i < vpt; ++i) {
    const int e = lane + width * i;
    if (live && e < E) {
      scores[t * E + e] = s[i];
      sel[i] = s[i] + (bias ? bias[e] : acc_t(0));
    } else {
      sel[i] = neg_inf;
    }
  }

  if (num_groups > 1) {
    // Group score: the sum of the group's two best selection values in
    // selection order, NaN last (its best when a group has one expert or
    // with group_by_max); keep the topk_groups best groups. h1, h2: whether
    // b1, b2 hold a value yet.
    const int size = E / num_groups;
    for (int g = 0; g < num_groups; ++g) {
      acc_t b1 = neg_inf, b2 = neg_inf;
      int h1 = 0, h2 = 0;
#pragma unroll
      for (int i = 0; i < vpt; ++i) {
        const int e = lane + width * i;
        if (e < E && e / size == g) {
          if (!h1 || value_above(sel[i], b1)) {
            b2 = b1;
            h2 = h1;
            b1 = sel[i];
            h1 = 1;
          } else if (!h2 || value_above(sel[i], b2)) {
            b2 = sel[i];
            h2 = 1;
          }
        }
      }
#pragma unroll
      for (int offset = width / 2; offset > 0; offset /= 2) {
        const acc_t o1 = __shfl_xor_sync(0xffffffffu, b1, offset, width);
        const acc_t o2 = __shfl_xor_sync(0xffffffffu, b2, offset, width);
        const int p1 = __shfl_xor_sync(0xffffffffu, h1, offset, width);
        const int p2 = __shfl_xor_sync(0xffffffffu, h2, offset, width);
        // The best two of the sorted pairs (b1, b2) and (o1, o2).
        if (p1 && (!h1 || value_above(o1, b1))) {
          if (p2 && (!h1 || value_above(o2, b1))) {
            b2 = o2;
            h2 = p2;
          } else {
            b2 = b1;
            h2 = h1;
          }
          b1 = o1;
          h1 = p1;
        } else if (p1 && (!h2 || value_above(o1, b2))) {
          b2 = o1;
          h2 = p1;
        }
      }
      if (lane == 0) group_scores[slot][g] = (size == 1 || group_by_max) ? b1 : b1 + b2;
    }
    __syncwarp();
    uint32_t keep = 0;
    for (int r = 0; r < topk_groups; ++r) {
      int best = -1;
      for (int g = 0; g < num_groups; ++g) {
        if ((keep >> g) & 1u) continue;
        if (best < 0 || value_above(group_scores[slot][g], group_scores[slot][best])) best = g;
      }
      keep |= 1u << best;
    }
#pragma unroll
    for (int i = 0; i < vpt; ++i) {
      const int e = lane + width * i;
      if (e < E && !((keep >> (e / size)) & 1u)) sel[i] = neg_inf;
    }
  }

  // k rounds of argmax; lane j of the group keeps the j-th choice.
  acc_t my_weight = 0;
  int my_expert = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    // One 64-bit key per candidate orders exactly as ranks_before, so a round
    // is a plain max: fewer instructions than comparing (value, index) pairs.
    uint64_t key[vpt];
#pragma unroll
    for (int i = 0; i < vpt; ++i) {
      const int e = lane + width * i;
      key[i] = e < E ? selection_key(sel[i], e) : 0;  // 0: no candidate
    }
    if constexpr (width == kWarp && vpt <= 8) {
      // A whole warp per token: each lane sorts its candidates once, so a
      // round is one warp max over the lanes' first keys, and the lane that
      // held the winner moves on to its next key. Keys are distinct and never
      // 0 for an expert (k <= E), so exactly one lane moves each round.
      sort_descending(key);
      for (int j = 0; j < k; ++j) {
        const uint64_t best = warp_max_key(key[0]);
        const bool taken = key[0] == best;
#pragma unroll
        for (int i = 0; i + 1 < vpt; ++i) key[i] = taken ? key[i + 1] : key[i];
        key[vpt - 1] = taken ? 0 : key[vpt - 1];
        if (lane == j) my_expert = static_cast<int>(~static_cast<uint32_t>(best));
      }
      // The chosen experts' unbiased scores, from the warp's copy of them.
      __shared__ acc_t warp_scores[kThreads / kWarp][kWarp * vpt];
#pragma unroll
      for (int i = 0; i < vpt; ++i) warp_scores[slot][lane + kWarp * i] = s[i];
      __syncwarp();
      if (lane < k) my_weight = warp_scores[slot][my_expert];
    } else {
      for (int j = 0; j < k; ++j) {
        uint64_t best = 0;
#pragma unroll
        for (int i = 0; i < vpt; ++i) best = max(best, key[i]);
        best = group_max<width>(best);
        // Keys are distinct (the index is in them): one lane holds the winner.
        acc_t mine = 0;
#pragma unroll
        for (int i = 0; i < vpt; ++i) {
          if (key[i] == best) {
            mine = s[i];
            key[i] = 0;
          }
        }
        const int expert = static_cast<int>(~static_cast<uint32_t>(best));
        const acc_t payload = __shfl_sync(0xffffffffu, mine, expert % width, width);
        if (lane == j) {
          my_weight = payload;
          my_expert = expert;
        }
      }
    }
  } else {
    uint32_t taken = 0;
    for (int j = 0; j < k; ++j) {
      acc_t value = neg_inf, payload = 0;
      int index = INT_MAX;
#pragma unroll
      for (int i = 0; i < vpt; ++i) {
        const int e = lane + width * i;
        if (e >= E || ((taken >> i) & 1u)) continue;
        if (ranks_before(sel[i], e, value, index)) {  // e grows with i: ties keep the lower
          value = sel[i];
          index = e;
          payload = s[i];
        }
      }
      group_argmax<width>(value, index, payload);
      if (index % width == lane) taken |= 1u << (index / width);
      if (lane == j) {
        my_weight = payload;
        my_expert = index;
      }
    }
  }
  const acc_t sum = group_sum<width>(lane < k ? my_weight : acc_t(0));
  const acc_t factor = normalize ? scale / sum : scale;
  if (live && lane < k) {
    weights[t * k + lane] = my_weight * factor;
    experts[t * k + lane] = my_expert;
  }
}

// grad_scores is nullptr when the scores' gradient is zero.
template <typename scalar_t, typename acc_t, int width, int vpt>
__global__ void __launch_bounds__(kThreads) route_backward_kernel(
    const acc_t* __restrict__ grad_weights, const acc_t* __restrict__ grad_scores,
    const acc_t* __restrict__ weights, const int64_t* __restrict__ experts,
    const acc_t* __restrict__ scores, int64_t T, int E, int k, bool sigmoid, bool normalize,
    acc_t scale, scalar_t* __restrict__ grad_logits) {
  const int lane = threadIdx.x % width;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kThreads / width) + threadIdx.x / width;
  const bool live = t < T;
  acc_t s[vpt], g[vpt];
#pragma unroll
  for (int i = 0; i < vpt; ++i) {
    const int e = lane + width * i;
    const bool in = live && e < E;
    s[i] = in ? scores[t * E + e] : acc_t(0);
    g[i] = (in && grad_scores) ? grad_scores[t * E + e] : acc_t(0);
  }
  // weights_j = factor * s[idx_j]; lane j < k owns choice j.
  int idx = -1;  // matches no expert: lanes past k, and a skipped choice
  acc_t gw = 0, w = 0, s_sel = 0;
  if (live && lane < k) {
    const int64_t chosen = experts[t * k + lane];  // checked before narrowing: 2^32 + 1 is no 1
    CUDA_KERNEL_ASSERT(in_range(chosen, E) && "moe_routing::route_backward: expert out of range");
    if (in_range(chosen, E)) {  // else (asserts compiled out) the choice adds nothing
      idx = static_cast<int>(chosen);
      gw = grad_weights[t * k + lane];
      w = weights[t * k + lane];
      s_sel = scores[t * E + idx];
    }
  }
  const acc_t selected_sum = group_sum<width>(s_sel);
  const acc_t grad_dot_w = group_sum<width>(gw * w);
  const acc_t dr = normalize ? (scale * gw - grad_dot_w) / selected_sum : scale * gw;
  for (int j = 0; j < k; ++j) {
    const int e_j = __shfl_sync(0xffffffffu, idx, j, width);
    const acc_t dr_j = __shfl_sync(0xffffffffu, dr, j, width);
#pragma unroll
    for (int i = 0; i < vpt; ++i) {
      if (lane + width * i == e_j) g[i] += dr_j;
    }
  }
  if (!sigmoid) {
    acc_t dot = 0;
#pragma unroll
    for (int i = 0; i < vpt; ++i) dot += g[i] * s[i];
    dot = group_sum<width>(dot);
#pragma unroll
    for (int i = 0; i < vpt; ++i) g[i] = s[i] * (g[i] - dot);
  } else {
#pragma unroll
    for (int i = 0; i < vpt; ++i) g[i] = g[i] * s[i] * (acc_t(1) - s[i]);
  }
#pragma unroll
  for (int i = 0; i < vpt; ++i) {
    const int e = lane + width * i;
    if (live && e < E) grad_logits[t * E + e] = static_cast<scalar_t>(g[i]);
  }
}

// Blocks for T tokens, `width` lanes each. Both route kernels give each lane
// group one token and no loop, so the grid must cover T whole: unlike
// grid_for, no cap, and T past the grid's limit is an error.
unsigned token_blocks(const char* op, int64_t T, int width) {
  const int64_t tokens_per_block = kThreads / width, blocks = ceil_div(T, tokens_per_block);
  constexpr int64_t max_blocks = std::numeric_limits<int32_t>::max();  // gridDim.x
  TORCH_CHECK(blocks <= max_blocks, op, ": on CUDA T must be at most ", max_blocks * tokens_per_block,
              " (", tokens_per_block, " tokens per block at this E), got ", T);
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

// Calls launch.template operator()<width, vpt>() for the smallest shape that
// holds E experts in registers.
template <typename Launch>
void with_shape(const char* op, int64_t E, Launch&& launch) {
  if (E <= 8) return launch.template operator()<8, 1>();
  if (E <= 16) return launch.template operator()<16, 1>();
  if (E <= 32) return launch.template operator()<32, 1>();
  if (E <= 64) return launch.template operator()<32, 2>();
  if (E <= 128) return launch.template operator()<32, 4>();
  if (E <= 256) return launch.template operator()<32, 8>();
  if (E <= 512) return launch.template operator()<32, 16>();
  // check_route_cuda_limits has rejected E > kCudaMaxExperts.
  TORCH_INTERNAL_ASSERT(E <= detail::kCudaMaxExperts, op, ": E=", E);
  return launch.template operator()<32, 32>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& logits_in, int64_t k, c10::string_view score_name,
    std::optional<bool> normalize, const std::optional<at::Tensor>& bias_in, int64_t num_groups,
    int64_t topk_groups, double scale, c10::string_view group_score) {
  constexpr const char* op = "moe_routing::route";
  const auto score = detail::parse_score(op, std::string(score_name));
  const bool group_by_max = detail::parse_group_score(op, std::string(group_score));
  detail::check_route_args(logits_in, k, bias_in, num_groups, topk_groups);
  detail::check_route_cuda_limits(op, logits_in.size(1), k, num_groups);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc_type = detail::router_dtype(logits.scalar_type());
  const auto opts = logits.options().dtype(acc_type);
  at::Tensor weights = at::empty({T, k}, opts);
  at::Tensor experts = at::empty({T, k}, opts.dtype(at::kLong));
  at::Tensor scores = at::empty({T, E}, opts);
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(acc_type).contiguous();
  if (T == 0) return {weights, experts, scores};
  const bool norm = detail::resolve_normalize(normalize, k);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_shape(op, E, [&]<int width, int vpt>() {
      const unsigned blocks = token_blocks(op, T, width);
      route_kernel<scalar_t, acc_t, width, vpt><<<blocks, kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
          T, static_cast<int>(E), static_cast<int>(k), score == detail::Score::Sigmoid, norm,
          static_cast<int>(num_groups), static_cast<int>(topk_groups), group_by_max,
          static_cast<acc_t>(scale),
          weights.mutable_data_ptr<acc_t>(), experts.mutable_data_ptr<int64_t>(),
          scores.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {weights, experts, scores};
}

at::Tensor route_backward_cuda(const at::Tensor& grad_weights,
                               const std::optional<at::Tensor>& grad_scores,
                               const at::Tensor& weights, const at::Tensor& experts,
                               const at::Tensor& scores, c10::string_view score_name,
                               bool normalize, double scale, at::ScalarType logits_dtype) {
  constexpr const char* op = "moe_routing::route_backward";
  const auto score = detail::parse_score(op, std::string(score_name));
  detail::check_route_backward_args(grad_weights, grad_scores, weights, experts, scores,
                                    logits_dtype);
  const int64_t T = scores.size(0), E = scores.size(1), k = experts.size(1);
  detail::check_route_cuda_limits(op, E, k, 1);
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor grad_logits = at::empty({T, E}, scores.options().dtype(logits_dtype));
  if (T == 0) return grad_logits;
  // Without grad_scores the kernel starts from zeros instead of reading them.
  const at::Tensor gw = grad_weights.contiguous();
  const at::Tensor gs = grad_scores ? grad_scores->contiguous() : at::Tensor();
  const at::Tensor w = weights.contiguous(), ex = experts.contiguous(), sc = scores.contiguous();
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_dtype, op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_shape(op, E, [&]<int width, int vpt>() {
      route_backward_kernel<scalar_t, acc_t, width, vpt>
          <<<token_blocks(op, T, width), kThreads, 0, stream>>>(
              gw.const_data_ptr<acc_t>(), gs.defined() ? gs.const_data_ptr<acc_t>() : nullptr,
              w.const_data_ptr<acc_t>(),
              ex.const_data_ptr<int64_t>(), sc.const_data_ptr<acc_t>(), T, static_cast<int>(E),
              static_cast<int>(k), score == detail::Score::Sigmoid, normalize,
              static_cast<acc_t>(scale), grad_logits.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_logits;
}

}  // namespace
}  // namespace moe_routing::cuda

TORCH_LIBRARY_IMPL(moe_routing, CUDA, m) {
  m.impl("route", &moe_routing::cuda::route_cuda);
  m.impl("route_backward", &moe_routing::cuda::route_backward_cuda);
}
