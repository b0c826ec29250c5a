// expert_choice on CUDA: a batched stable sort of each expert's column of
// scores (ATen's segmented radix sort: deterministic), padding pushed last
// with -inf; the first C per expert are its choice. The backward scatters
// each weight's gradient to its (token, expert) entry, which has exactly one
// writer.
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
  at::Tensor columns = scores.t();  // [E, T]
  if (mask.has_value()) {
    columns = columns.masked_fill(mask->logical_not().unsqueeze(0), -std::numeric_limits<double>::infinity());
  }
  // Descending by score, ties in token order: a stable ascending sort of the negation.
  auto [neg_sorted, order] = at::sort(columns.neg(), /*stable=*/true, /*dim=*/1, /*descending=*/false);
  at::Tensor weights = neg_sorted.narrow(1, 0, taken).neg();
  at::Tensor tokens = order.narrow(1, 0, taken);
  const at::Tensor filled = at::isfinite(weights);
  tokens = at::where(filled, tokens, -1);
  weights = at::where(filled, weights, 0);
  if (capacity > taken) {
    tokens = at::cat({tokens, at::full({E, capacity - taken}, -1, tokens.options())}, 1);
    weights = at::cat({weights, at::zeros({E, capacity - taken}, weights.options())}, 1);
  }
  return {weights.contiguous(), tokens.contiguous()};
}

at::Tensor expert_choice_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& tokens,
                                       int64_t num_tokens) {
  detail::check_expert_choice_backward_args(grad_weights, tokens, num_tokens);
  const c10::cuda::CUDAGuard guard(grad_weights.device());
  const int64_t E = tokens.size(0);
  // Empty slots (-1) write into a spare column that is cut off.
  const at::Tensor column = at::where(tokens.ge(0), tokens, num_tokens);
  at::Tensor grad = at::zeros({E, num_tokens + 1}, grad_weights.options());
  grad.scatter_(1, column, grad_weights);
  return grad.narrow(1, 0, num_tokens).t().contiguous();
}

}  // namespace
}  // namespace moe_routing::cuda

TORCH_LIBRARY_IMPL(moe_routing, CUDA, m) {
  m.impl("expert_choice", &moe_routing::cuda::expert_choice_cuda);
  m.impl("expert_choice_backward", &moe_routing::cuda::expert_choice_backward_cuda);
}
