// expert_choice on CUDA: a batched stable sort of each expert's column of
// scores (ATen's segmented radix sort: deterministic), padding pushed last
// with -inf; the first C per expert are its choice, except scores of -inf or
// NaN (sorted last), which are never taken. The backward is in gather form:
// each expert's tokens are sorted stably, and the first entry of each run of
// equal tokens sums the run's gradients in c order (as the CPU does), so a
// token repeated in tokens gets the sum, with one writer per entry.
#include <torch/library.h>

#include <limits>

#include "../moe_routing.h"
#include "common.cuh"

namespace moe_routing::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> expert_choice_cuda(const at::Tensor& scores, int64_t capacity,
                                                      const std::optional<at::Tensor>& mask) {
  detail::check_expert_choice_args(scores, capacity, mask);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t T = scores.size(0), E = scores.size(1);
  const int64_t taken = std::min(capacity, T);
  // [E, T]; NaN as -inf (neither is ever taken): a negated NaN's sign bit
  // could sort it first.
  at::Tensor columns = scores.t().masked_fill(scores.t().isnan(), -std::numeric_limits<double>::infinity());
  if (mask.has_value()) {
    columns = columns.masked_fill(mask->logical_not().unsqueeze(0), -std::numeric_limits<double>::infinity());
  }
  // Descending by score, ties in token order: a stable ascending sort of the negation.
  auto [neg_sorted, order] = at::sort(columns.neg(), /*stable=*/true, /*dim=*/1, /*descending=*/false);
  at::Tensor weights = neg_sorted.narrow(1, 0, taken).neg();
  at::Tensor tokens = order.narrow(1, 0, taken);
  // Padding (-inf here), -inf and NaN scores are never taken.
  const at::Tensor filled = weights.gt(-std::numeric_limits<double>::infinity());
  tokens = at::where(filled, tokens, -1);
  weights = at::where(filled, weights, 0);
  if (capacity > taken) {
    tokens = at::cat({tokens, at::full({E, capacity - taken}, -1, tokens.options())}, 1);
    weights = at::cat({weights, at::zeros({E, capacity - taken}, weights.options())}, 1);
  }
  return {weights.contiguous(), tokens.contiguous()};
}

// out[t, e] = sum of g[e, perm[q]] over the run of q with sorted[e, q] == t,
// written by the run's first entry.
template <typename scalar_t>
__global__ void expert_choice_backward_kernel(const scalar_t* __restrict__ g,
                                              const int64_t* __restrict__ sorted,
                                              const int64_t* __restrict__ perm, int64_t E,
                                              int64_t C, int64_t T, scalar_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < E * C;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i / C, p = i % C;
    const int64_t* row = sorted + e * C;
    const int64_t t = row[p];
    if (t == -1) continue;
    CUDA_KERNEL_ASSERT(in_range(t, T) &&
                       "moe_routing::expert_choice_backward: tokens out of range [-1, num_tokens)");
    if (!in_range(t, T)) continue;
    if (p > 0 && row[p - 1] == t) continue;
    scalar_t acc = 0;
    for (int64_t q = p; q < C && row[q] == t; ++q) acc += g[e * C + perm[e * C + q]];
    out[t * E + e] = acc;
  }
}

at::Tensor expert_choice_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& tokens,
                                       int64_t num_tokens) {
  constexpr const char* op = "moe_routing::expert_choice_backward";
  detail::check_expert_choice_backward_args(grad_weights, tokens, num_tokens);
  const c10::cuda::CUDAGuard guard(grad_weights.device());
  const int64_t E = tokens.size(0), C = tokens.size(1);
  at::Tensor out = at::zeros({num_tokens, E}, grad_weights.options());
  if (E * C == 0) return out;
  // Stable: equal tokens keep their c order.
  const auto sorted_perm = at::sort(tokens, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor sorted = std::get<0>(sorted_perm).contiguous();
  const at::Tensor perm = std::get<1>(sorted_perm).contiguous();
  const at::Tensor g = grad_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), op, [&] {
    expert_choice_backward_kernel<scalar_t><<<grid_for(E * C, 256), 256, 0, current_stream()>>>(
        g.const_data_ptr<scalar_t>(), sorted.const_data_ptr<int64_t>(),
        perm.const_data_ptr<int64_t>(), E, C, num_tokens, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace moe_routing::cuda

TORCH_LIBRARY_IMPL(moe_routing, CUDA, m) {
  m.impl("expert_choice", &moe_routing::cuda::expert_choice_cuda);
  m.impl("expert_choice_backward", &moe_routing::cuda::expert_choice_backward_cuda);
}
