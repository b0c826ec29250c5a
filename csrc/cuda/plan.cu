// plan on CUDA: the CPU's counting sort (see csrc/cpu/plan.cpp), tile by
// tile. (1) each tile of token positions counts its assignments per (phase,
// expert) with integer atomics; (2) one block turns the counts into each
// (tile, phase)'s first rank per expert by a prefix in a fixed order (expert,
// phase, tile), and the loads, kept counts and dropless offsets; (3) one warp
// per (tile, phase) walks its assignments in order, 32 at a time: lanes with
// the same expert find each other with __match_any_sync, rank = base + popc
// of the earlier peers, and the leader advances the expert's base. The plan
// is the CPU's bit for bit. "batch" sorts token positions by top-1 weight
// first; "score" ranks in choice order, then keeps each expert's heaviest.
#include <torch/library.h>

#include <limits>

#include "../moe_routing.h"
#include "common.cuh"

namespace moe_routing::cuda {
namespace {

using detail::Priority;

constexpr int kTile = 256;  // token positions per tile

struct Walk {
  const int64_t* experts;  // [T, k]
  const bool* mask;        // [T] or null
  const int64_t* order;    // position -> token, or null
  int64_t T;
  int k;
  bool by_choice;
};

// The i-th assignment, in priority order, of phase p in the tile starting at `begin`.
__device__ __forceinline__ void assignment(const Walk& w, int64_t begin, int p, int64_t i,
                                          int64_t* t, int* j) {
  const int64_t pos = begin + (w.by_choice ? i : i / w.k);
  *t = w.order ? w.order[pos] : pos;
  *j = w.by_choice ? p : static_cast<int>(i % w.k);
}

__device__ __forceinline__ int64_t tile_items(const Walk& w, int64_t begin) {
  const int64_t n = min(static_cast<int64_t>(kTile), w.T - begin);
  return w.by_choice ? n : n * w.k;
}

__global__ void count_kernel(Walk w, int E, int phases, int64_t* __restrict__ counts) {
  const int64_t tile = blockIdx.x, begin = tile * kTile;
  for (int p = 0; p < phases; ++p) {
    const int64_t n = tile_items(w, begin);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      int64_t t;
      int j;
      assignment(w, begin, p, i, &t, &j);
      if (w.mask && !w.mask[t]) continue;
      const int64_t e = w.experts[t * w.k + j];
      CUDA_KERNEL_ASSERT(in_range(e, E) && "moe_routing::plan: expert index out of range");
      if (!in_range(e, E)) continue;
      atomicAdd(reinterpret_cast<unsigned long long*>(&counts[(tile * phases + p) * E + e]), 1ull);
    }
  }
}

// counts -> first ranks, in the order (expert, phase, tile).
__global__ void prefix_kernel(int64_t* __restrict__ counts, int64_t tiles, int phases, int E,
                              int64_t capacity, int64_t* __restrict__ load,
                              int64_t* __restrict__ kept, int64_t* __restrict__ offsets) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t running = 0;
    for (int p = 0; p < phases; ++p) {
      for (int64_t tile = 0; tile < tiles; ++tile) {
        int64_t& c = counts[(tile * phases + p) * E + e];
        const int64_t n = c;
        c = running;
        running += n;
      }
    }
    load[e] = running;
    kept[e] = capacity >= 0 ? min(running, capacity) : running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t offset = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = offset;
      offset += load[e];
    }
  }
}

// capacity < 0: dropless packed rows offsets[e] + rank.
__global__ void assign_kernel(Walk w, int E, int phases, int64_t capacity,
                              int64_t* __restrict__ next_rank, const int64_t* __restrict__ offsets,
                              int64_t* __restrict__ slots) {
  const int64_t tile = blockIdx.x / phases;
  const int p = blockIdx.x % phases;
  const int lane = threadIdx.x;
  const int64_t begin = tile * kTile, n = tile_items(w, begin);
  int64_t* base = next_rank + (tile * phases + p) * E;
  const unsigned lanes_before = (1u << lane) - 1;
  for (int64_t first = 0; first < n; first += kWarp) {
    const int64_t i = first + lane;
    int64_t t = 0;
    int j = 0;
    bool valid = i < n;
    if (valid) {
      assignment(w, begin, p, i, &t, &j);
      // An out-of-range expert was asserted on in count_kernel; skipped here too.
      valid = (!w.mask || w.mask[t]) && in_range(w.experts[t * w.k + j], E);
    }
    const int64_t e = valid ? w.experts[t * w.k + j] : -1 - lane;  // invalid lanes match no one
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    int64_t start = 0;
    if (valid) {
      start = base[e];
      const int64_t rank = start + __popc(peers & lanes_before);
      if (capacity < 0) {
        slots[t * w.k + j] = offsets[e] + rank;
      } else if (rank < capacity) {
        slots[t * w.k + j] = e * capacity + rank;
      }
    }
    __syncwarp();
    if (valid && lane == __ffs(peers) - 1) base[e] = start + __popc(peers);
    __syncwarp();
  }
}

// Runs the counting sort. capacity < 0: dropless.
void counting_plan(const Walk& w, int64_t E, int64_t capacity, at::Tensor& slots, at::Tensor& load,
                   at::Tensor& kept, at::Tensor& offsets) {
  const int64_t tiles = std::max<int64_t>(1, ceil_div(w.T, kTile));
  const int phases = w.by_choice ? w.k : 1;
  const cudaStream_t stream = current_stream();
  at::Tensor ranks = at::zeros({tiles * phases * E}, slots.options());
  if (w.T > 0) {
    count_kernel<<<tiles, 256, 0, stream>>>(w, static_cast<int>(E), phases, ranks.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  prefix_kernel<<<1, 1024, 0, stream>>>(ranks.mutable_data_ptr<int64_t>(), tiles, phases,
                                        static_cast<int>(E), capacity, load.mutable_data_ptr<int64_t>(),
                                        kept.mutable_data_ptr<int64_t>(), offsets.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (w.T > 0) {
    assign_kernel<<<tiles * phases, kWarp, 0, stream>>>(
        w, static_cast<int>(E), phases, capacity, ranks.mutable_data_ptr<int64_t>(),
        offsets.const_data_ptr<int64_t>(), slots.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// int64 keys whose ascending order is x's (float64) descending order, NaN
// last, -0 equal to +0: the float bits made monotone, then inverted. Sorting
// these instead of -x keeps NaN last: a negated NaN has its sign bit set,
// which ATen's radix sort may put first.
at::Tensor descending_order_keys(const at::Tensor& x_in) {
  const at::Tensor x = at::where(x_in.eq(0), 0.0, x_in).contiguous();  // -0 as +0
  const at::Tensor bits = x.view(at::kLong);
  const at::Tensor ascending = at::where(bits.ge(0), bits, bits.bitwise_xor(INT64_MAX));
  return at::where(x.isnan(), INT64_MAX, ascending.bitwise_not());
}

// "score": from the dropless choice-order layout (packed[t, j] = position of
// the assignment among all, grouped by expert), each expert keeps its C
// heaviest assignments (ties to the earlier position), rows in choice order.
at::Tensor keep_heaviest(const at::Tensor& experts, const at::Tensor& weights,
                         const at::Tensor& packed, const at::Tensor& offsets, int64_t capacity) {
  const int64_t n = packed.numel();
  const auto long_opts = packed.options();
  const at::Tensor flat = packed.reshape(-1);
  const at::Tensor valid = flat.ge(0);
  // owner[pos] = flat index of the assignment at packed position pos (n = spare).
  at::Tensor owner = at::full({n + 1}, n, long_opts);
  owner.scatter_(0, at::where(valid, flat, n), at::arange(n, long_opts));
  owner = owner.narrow(0, 0, n);
  const at::Tensor used = owner.lt(n);
  const at::Tensor safe_owner = at::where(used, owner, 0);
  const at::Tensor expert = at::where(used, experts.reshape(-1).index_select(0, safe_owner), INT64_MAX);
  const at::Tensor weight = weights.reshape(-1).to(at::kDouble).index_select(0, safe_owner);
  // Order by (expert, weight descending, position): two stable sorts.
  const at::Tensor by_weight =
      std::get<1>(at::sort(descending_order_keys(weight), /*stable=*/true, 0, false));
  const at::Tensor by_expert =
      by_weight.index_select(0, std::get<1>(at::sort(expert.index_select(0, by_weight), true, 0, false)));
  // Rank by weight inside the expert: position in that order minus the expert's first.
  const at::Tensor seg_start = offsets.index_select(0, at::where(used, expert, 0));
  at::Tensor weight_rank = at::empty({n}, long_opts);
  weight_rank.scatter_(0, by_expert, at::arange(n, long_opts));
  const at::Tensor survives = used & (weight_rank - seg_start).lt(capacity);
  // Row among the survivors, in position (choice) order inside the expert.
  const at::Tensor running = at::cumsum(survives.to(at::kLong), 0) - survives.to(at::kLong);
  const at::Tensor row = running - running.index_select(0, seg_start.clamp_max(std::max<int64_t>(n - 1, 0)));
  const at::Tensor slot_of_pos = at::where(survives, expert * capacity + row, -1);
  at::Tensor slots = at::full({n + 1}, -1, long_opts);
  slots.scatter_(0, at::where(used, owner, n), slot_of_pos);
  return slots.narrow(0, 0, n).view(experts.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_cuda(
    const at::Tensor& experts_in, int64_t num_experts, std::optional<int64_t> capacity,
    const std::optional<at::Tensor>& weights_in, c10::string_view priority_name,
    const std::optional<at::Tensor>& mask) {
  const Priority priority = detail::parse_priority("moe_routing::plan", std::string(priority_name));
  detail::check_plan_args(experts_in, num_experts, detail::to_symint(capacity), weights_in,
                          priority, mask);
  const c10::cuda::CUDAGuard guard(experts_in.device());
  const at::Tensor experts = experts_in.contiguous();
  const int64_t T = experts.size(0), k = experts.size(1), E = num_experts;
  const auto long_opts = experts.options();
  if (experts.numel() == 0) {  // no assignment (T = 0 or k = 0, T maybe huge): nothing to walk
    return {at::full({T, k}, -1, long_opts), at::zeros({E}, long_opts), at::zeros({E}, long_opts)};
  }
  at::Tensor mask_holder;
  const bool* m = detail::mask_data(mask, mask_holder);
  at::Tensor order;
  if (priority == Priority::Batch) {  // positions by descending top-1 weight, ties in token order
    // Top-1 weight in selection order: the largest, NaN only when all are NaN
    // (NaN ranks last: the sort below puts it after every number).
    at::Tensor top1 = at::zeros({T}, long_opts.dtype(at::kDouble));
    if (k > 0) {
      const at::Tensor w = weights_in->to(at::kDouble);
      const at::Tensor nan = w.isnan();
      top1 = at::where(nan.all(1), std::numeric_limits<double>::quiet_NaN(),
                       std::get<0>(w.masked_fill(nan, -std::numeric_limits<double>::infinity()).max(1)));
    }
    order = std::get<1>(at::sort(descending_order_keys(top1), /*stable=*/true, 0, false)).contiguous();
  }
  const Walk w{experts.const_data_ptr<int64_t>(),
               m,
               order.defined() ? order.const_data_ptr<int64_t>() : nullptr, T, static_cast<int>(k),
               priority != Priority::Token};
  const bool by_score = priority == Priority::Score && capacity.has_value();
  at::Tensor slots = at::full({T, k}, -1, long_opts);
  at::Tensor load = at::empty({E}, long_opts), kept = at::empty({E}, long_opts);
  at::Tensor offsets = at::empty({E}, long_opts);
  counting_plan(w, E, (capacity && !by_score) ? *capacity : -1, slots, load, kept, offsets);
  if (by_score) {
    slots = keep_heaviest(experts, *weights_in, slots, offsets, *capacity);
    kept = load.clamp_max(*capacity);
  }
  return {slots, load, kept};
}

}  // namespace
}  // namespace moe_routing::cuda

TORCH_LIBRARY_IMPL(moe_routing, CUDA, m) { m.impl("plan", &moe_routing::cuda::plan_cuda); }
