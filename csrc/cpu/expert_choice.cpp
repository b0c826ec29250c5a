// expert_choice on CPU: each expert takes the C tokens with the largest
// scores[:, e] (ties to the lower token index), in descending order; padding
// tokens and scores of -inf or NaN are never taken, and slots left empty hold
// token -1 and weight 0.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "../moe_routing.h"

namespace moe_routing::cpu {
namespace {

template <typename scalar_t>
void expert_choice_kernel(const scalar_t* scores, const bool* mask, int64_t T, int64_t E,
                          int64_t C, scalar_t* weights, int64_t* tokens) {
  at::parallel_for(0, E, 1, [&](int64_t e_begin, int64_t e_end) {
    std::vector<int64_t> candidates;
    for (int64_t e = e_begin; e < e_end; ++e) {
      candidates.clear();
      for (int64_t t = 0; t < T; ++t) {
        // Padding, -inf and NaN scores are never taken.
        const scalar_t score = scores[t * E + e];
        if ((!mask || mask[t]) && score > -std::numeric_limits<scalar_t>::infinity()) {
          candidates.push_back(t);
        }
      }
      const int64_t taken = std::min<int64_t>(C, candidates.size());
      std::partial_sort(candidates.begin(), candidates.begin() + taken, candidates.end(),
                        [&](int64_t a, int64_t b) {
                          const scalar_t sa = scores[a * E + e], sb = scores[b * E + e];
                          return sa > sb || (sa == sb && a < b);
                        });
      for (int64_t c = 0; c < C; ++c) {
        const bool filled = c < taken;
        tokens[e * C + c] = filled ? candidates[c] : -1;
        weights[e * C + c] = filled ? scores[candidates[c] * E + e] : scalar_t(0);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> expert_choice_cpu(const at::Tensor& scores_in,
                                                     int64_t capacity,
                                                     const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "moe_routing::expert_choice";
  detail::check_expert_choice_args(scores_in, capacity, mask);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t T = scores.size(0), E = scores.size(1);
  at::Tensor mask_holder;
  const bool* m = detail::mask_data(mask, mask_holder);
  at::Tensor weights = at::empty({E, capacity}, scores.options());
  at::Tensor tokens = at::empty({E, capacity}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), op, [&] {
    expert_choice_kernel<scalar_t>(scores.const_data_ptr<scalar_t>(),
                                   m, T,
                                   E, capacity, weights.mutable_data_ptr<scalar_t>(),
                                   tokens.mutable_data_ptr<int64_t>());
  });
  return {weights, tokens};
}

// d scores[t, e] = sum of d weights[e, c] over the c with tokens[e, c] == t,
// in c order. expert_choice takes a (token, expert) pair at most once, but a
// caller's tokens may repeat one: its gradients add up. Each expert's column
// has one writer (the thread of that expert), so no atomics are needed.
at::Tensor expert_choice_backward_cpu(const at::Tensor& grad_weights_in,
                                      const at::Tensor& tokens_in, int64_t num_tokens) {
  constexpr const char* op = "moe_routing::expert_choice_backward";
  detail::check_expert_choice_backward_args(grad_weights_in, tokens_in, num_tokens);
  const at::Tensor grad_weights = grad_weights_in.contiguous(), tokens = tokens_in.contiguous();
  const int64_t E = tokens.size(0), C = tokens.size(1);
  at::Tensor grad_scores = at::zeros({num_tokens, E}, grad_weights.options());
  AT_DISPATCH_FLOATING_TYPES(grad_weights.scalar_type(), op, [&] {
    const scalar_t* g = grad_weights.const_data_ptr<scalar_t>();
    const int64_t* tok = tokens.const_data_ptr<int64_t>();
    scalar_t* out = grad_scores.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, E, 1, [&](int64_t e_begin, int64_t e_end) {
      for (int64_t e = e_begin; e < e_end; ++e) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t t = tok[e * C + c];
          if (t == -1) continue;
          TORCH_CHECK(t >= 0 && t < num_tokens, op, ": tokens[", e, ", ", c, "] = ", t,
                      " is out of range: expected -1 (an empty slot) or [0, num_tokens=", num_tokens, ")");
          out[t * E + e] += g[e * C + c];
        }
      }
    });
  });
  return grad_scores;
}

}  // namespace
}  // namespace moe_routing::cpu

TORCH_LIBRARY_IMPL(moe_routing, CPU, m) {
  m.impl("expert_choice", &moe_routing::cpu::expert_choice_cpu);
  m.impl("expert_choice_backward", &moe_routing::cpu::expert_choice_backward_cpu);
}
