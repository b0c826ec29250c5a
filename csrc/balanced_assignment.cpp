// balanced_assignment: BASE layers' (Lewis et al. 2021) balanced assignment of
// tokens to experts, every expert taking the same number of tokens, by a
// fixed number of rounds of an auction (Bertsekas) written with ATen tensor
// ops, so that one CompositeExplicitAutograd kernel serves CPU and CUDA with no
// host synchronisation and no data-dependent control flow (its Meta kernel
// is in meta.cpp; the result is not differentiable).
//
// Each round, every valid token that holds no expert bids for its best expert
// e by value s_te - price_e, raising e's price to price_e + (best - second
// best) + epsilon. Each expert keeps its `capacity_e` highest bids among its
// holders and the new bidders (ties to the lower token index: a stable sort),
// evicting the rest; a full expert's price is its lowest kept bid. After the
// rounds, tokens still without an expert fill the remaining places in token
// order, expert by expert, so the balance is exact whatever the round count.
// When every token is placed by the auction itself, the total score is within
// T * epsilon of the optimal balanced assignment.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "moe_routing.h"

namespace moe_routing {
namespace {

at::Tensor balanced_assignment_kernel(const at::Tensor& scores_in,
                                      const std::optional<at::Tensor>& mask, int64_t iterations,
                                      double epsilon) {
  detail::check_balanced_assignment_args(scores_in, mask, iterations, epsilon);
  const int64_t T = scores_in.size(0), E = scores_in.size(1);
  const auto options = scores_in.options();
  const auto long_options = options.dtype(at::kLong);
  if (T == 0) return at::empty({0}, long_options);
  // float64 prices and values: bids differ by epsilon and must not round away.
  at::Tensor scores = at::nan_to_num(scores_in.to(at::kDouble), /*nan=*/-1e300, 1e300, -1e300);
  const at::Tensor valid = mask.has_value() ? *mask : at::ones({T}, options.dtype(at::kBool));
  // capacity_e = floor(V / E) + (e < V mod E), V = valid tokens (a device scalar).
  const at::Tensor num_valid = valid.sum();
  const at::Tensor expert_ids = at::arange(E, long_options);
  const at::Tensor capacity = at::floor_divide(num_valid, E) + (expert_ids < num_valid.remainder(E));
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor token_ids = at::arange(T, long_options);

  at::Tensor prices = at::zeros({E}, scores.options());
  at::Tensor held_bids = at::full({E, T}, -inf, scores.options());  // [E, T], -inf = not held
  at::Tensor assigned = at::full({T}, -1, long_options);
  for (int64_t round = 0; round < iterations; ++round) {
    const at::Tensor values = scores - prices;
    // The best two experts by value; a stable sort sends ties to the lower
    // expert index (topk does not promise that).
    auto [sorted_values, sorted_experts] = values.sort(/*stable=*/true, 1, /*descending=*/true);
    const at::Tensor best_value = sorted_values.select(1, 0);
    const at::Tensor best_expert = sorted_experts.select(1, 0);
    const at::Tensor second_value = sorted_values.select(1, E >= 2 ? 1 : 0);
    const at::Tensor bidding = valid.logical_and(assigned < 0);
    const at::Tensor bid = prices.index_select(0, best_expert) + (best_value - second_value) + epsilon;
    const at::Tensor offer = at::full({E, T}, -inf, scores.options())
                                 .scatter(0, best_expert.unsqueeze(0),
                                          at::where(bidding, bid, -inf).unsqueeze(0));
    const at::Tensor candidates = at::maximum(held_bids, offer);
    // rank[e, t] = place of token t among expert e's candidates by bid.
    const at::Tensor order = std::get<1>(candidates.sort(/*stable=*/true, 1, /*descending=*/true));
    const at::Tensor rank = at::empty_like(order).scatter_(1, order, token_ids.expand({E, T}));
    const at::Tensor keep = (rank < capacity.unsqueeze(1)).logical_and(candidates > -inf);
    held_bids = at::where(keep, candidates, -inf);
    const at::Tensor holds = keep.any(0);
    assigned = at::where(holds, keep.to(at::kInt).argmax(0), -1);
    const at::Tensor full = keep.sum(1) >= capacity;
    const at::Tensor lowest_kept = at::where(keep, held_bids, inf).amin(1);
    prices = at::where(full.logical_and(capacity > 0), lowest_kept, prices);
  }
  // Fill: the j-th valid token left without an expert (in token order) takes
  // the j-th remaining place, experts' remaining places laid end to end.
  const at::Tensor placed = at::zeros({E}, long_options).scatter_add(
      0, assigned.clamp_min(0), (assigned >= 0).to(at::kLong));
  const at::Tensor remaining_end = (capacity - placed).cumsum(0);
  const at::Tensor left = valid.logical_and(assigned < 0);
  const at::Tensor place = left.to(at::kLong).cumsum(0) - 1;
  const at::Tensor filled = at::searchsorted(remaining_end, place, /*out_int32=*/false, /*right=*/true);
  return at::where(left, filled, assigned);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_routing, CompositeExplicitAutograd, m) {
  m.impl("balanced_assignment", &balanced_assignment_kernel);
}

}  // namespace moe_routing
