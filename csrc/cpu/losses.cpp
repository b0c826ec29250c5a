// Auxiliary losses on CPU. Sums run per fixed-size chunk of tokens and then
// over chunks in order, so the loss is bitwise the same for any thread count.
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../moe_routing.h"
#include "rows.h"

namespace moe_routing::cpu {
namespace {

inline bool is_valid(const bool* mask, int64_t t) { return mask == nullptr || mask[t]; }

const bool* mask_data(const std::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value()) return nullptr;
  holder = mask->contiguous();
  return holder.const_data_ptr<bool>();
}

// Per-expert assignment counts and the number of valid tokens.
std::vector<int64_t> count_assignments(const char* op, const at::Tensor& experts, int64_t E,
                                       const bool* mask, int64_t* valid_tokens) {
  const int64_t T = experts.size(0), k = experts.size(1);
  const int64_t* idx = experts.const_data_ptr<int64_t>();
  std::vector<int64_t> counts(E, 0);
  int64_t valid = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (!is_valid(mask, t)) continue;
    ++valid;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = idx[t * k + j];
      TORCH_CHECK(e >= 0 && e < E, op, ": experts[", t, ", ", j, "] = ", e,
                  " is out of range [0, E=", E, ")");
      ++counts[e];
    }
  }
  *valid_tokens = valid;
  return counts;
}

template <typename acc_t>
at::Tensor load_balancing_kernel(const at::Tensor& scores, const at::Tensor& experts,
                                 const bool* mask) {
  constexpr const char* op = "moe_routing::load_balancing_loss";
  const int64_t T = scores.size(0), E = scores.size(1), k = experts.size(1);
  int64_t N = 0;
  const std::vector<int64_t> counts = count_assignments(op, experts, E, mask, &N);
  // partial[c * E + e] = sum of scores[t, e] over the valid tokens of chunk c.
  const int64_t chunks = num_chunks(T);
  std::vector<acc_t> partial(chunks * E, acc_t(0));
  const acc_t* s = scores.const_data_ptr<acc_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      acc_t* p = partial.data() + c * E;
      for (int64_t t = c * kReduceChunk; t < std::min(T, (c + 1) * kReduceChunk); ++t) {
        if (is_valid(mask, t)) axpy(p, acc_t(1), s + t * E, E);
      }
    }
  });
  acc_t loss = 0;
  if (N > 0) {
    for (int64_t e = 0; e < E; ++e) {
      acc_t score_sum = 0;
      for (int64_t c = 0; c < chunks; ++c) score_sum += partial[c * E + e];
      const acc_t f = static_cast<acc_t>(counts[e]) / static_cast<acc_t>(N * k);
      loss += f * (score_sum / static_cast<acc_t>(N));
    }
    loss *= static_cast<acc_t>(E);
  }
  return at::scalar_tensor(loss, scores.options());
}

at::Tensor load_balancing_loss_cpu(const at::Tensor& scores_in, const at::Tensor& experts_in,
                                   const std::optional<at::Tensor>& mask) {
  detail::check_load_balancing_args(scores_in, experts_in, mask);
  const at::Tensor scores = scores_in.contiguous(), experts = experts_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = mask_data(mask, mask_holder);
  return AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "moe_routing::load_balancing_loss",
                                    [&] { return load_balancing_kernel<scalar_t>(scores, experts, m); });
}

// d loss / d scores[t, e] = grad * E * f_e / N for valid t: P_e's gradient.
at::Tensor load_balancing_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& scores_in,
                                            const at::Tensor& experts_in,
                                            const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "moe_routing::load_balancing_loss_backward";
  detail::check_load_balancing_args(scores_in, experts_in, mask);
  TORCH_CHECK(grad.dim() == 0, op, ": grad must be a scalar, got shape ", grad.sizes());
  const at::Tensor scores = scores_in.contiguous(), experts = experts_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = mask_data(mask, mask_holder);
  const int64_t T = scores.size(0), E = scores.size(1), k = experts.size(1);
  at::Tensor grad_scores = at::empty({T, E}, scores.options());
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    int64_t N = 0;
    const std::vector<int64_t> counts = count_assignments(op, experts, E, m, &N);
    const acc_t g = grad.item<acc_t>();
    std::vector<acc_t> row(E, acc_t(0));
    if (N > 0) {
      for (int64_t e = 0; e < E; ++e) {
        row[e] = g * static_cast<acc_t>(E) * static_cast<acc_t>(counts[e]) /
                 static_cast<acc_t>(N * k) / static_cast<acc_t>(N);
      }
    }
    acc_t* out = grad_scores.mutable_data_ptr<acc_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (is_valid(m, t)) {
          std::copy(row.begin(), row.end(), out + t * E);
        } else {
          std::fill(out + t * E, out + (t + 1) * E, acc_t(0));
        }
      }
    });
  });
  return grad_scores;
}

// logsumexp of a row, in acc_t.
template <typename scalar_t, typename acc_t>
acc_t logsumexp_row(const scalar_t* x, int64_t E, acc_t* buffer) {
  using Vec = at::vec::Vectorized<acc_t>;
  at::vec::convert(x, buffer, E);
  const acc_t max = at::vec::reduce_all<acc_t>(
      [](Vec a, Vec b) { return at::vec::maximum(a, b); }, buffer, E);
  if (std::isinf(max)) return max;
  const acc_t sum = at::vec::map_reduce_all<acc_t>(
      [max](Vec v) { return (v - Vec(max)).exp(); }, [](Vec a, Vec b) { return a + b; }, buffer,
      E);
  return max + std::log(sum);
}

int64_t count_valid(const bool* mask, int64_t T) {
  if (!mask) return T;
  int64_t n = 0;
  for (int64_t t = 0; t < T; ++t) n += mask[t];
  return n;
}

at::Tensor z_loss_cpu(const at::Tensor& logits_in, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "moe_routing::z_loss";
  detail::check_z_loss_args(op, logits_in, mask);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = mask_data(mask, mask_holder);
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t chunks = num_chunks(T);
    std::vector<acc_t> partial(chunks, acc_t(0));
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      std::vector<acc_t> buffer(E);
      for (int64_t c = c_begin; c < c_end; ++c) {
        acc_t sum = 0;
        for (int64_t t = c * kReduceChunk; t < std::min(T, (c + 1) * kReduceChunk); ++t) {
          if (!is_valid(m, t)) continue;
          const acc_t lse = logsumexp_row(x + t * E, E, buffer.data());
          sum += lse * lse;
        }
        partial[c] = sum;
      }
    });
    acc_t total = 0;
    for (acc_t p : partial) total += p;
    const int64_t N = count_valid(m, T);
    loss = at::scalar_tensor(N > 0 ? total / static_cast<acc_t>(N) : acc_t(0),
                             logits.options().dtype(detail::router_dtype(logits.scalar_type())));
  });
  return loss;
}

// d loss / d logits[t] = grad * 2 * lse_t / N * softmax(logits[t]).
at::Tensor z_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& logits_in,
                               const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "moe_routing::z_loss_backward";
  detail::check_z_loss_args(op, logits_in, mask);
  TORCH_CHECK(grad.dim() == 0, op, ": grad must be a scalar, got shape ", grad.sizes());
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = mask_data(mask, mask_holder);
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const int64_t N = count_valid(m, T);
    const acc_t g = grad.item<acc_t>() / static_cast<acc_t>(std::max<int64_t>(N, 1));
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(E, 1)),
                     [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer(E);
      for (int64_t t = begin; t < end; ++t) {
        if (!is_valid(m, t)) {
          std::fill(out + t * E, out + (t + 1) * E, scalar_t(0));
          continue;
        }
        const acc_t lse = logsumexp_row(x + t * E, E, buffer.data());
        const acc_t factor = 2 * g * lse;
        at::vec::map([lse, factor](Vec v) { return Vec(factor) * (v - Vec(lse)).exp(); },
                     buffer.data(), buffer.data(), E);
        scale_into(out + t * E, acc_t(1), buffer.data(), E);
      }
    });
  });
  return grad_logits;
}

}  // namespace
}  // namespace moe_routing::cpu

TORCH_LIBRARY_IMPL(moe_routing, CPU, m) {
  m.impl("load_balancing_loss", &moe_routing::cpu::load_balancing_loss_cpu);
  m.impl("load_balancing_loss_backward", &moe_routing::cpu::load_balancing_loss_backward_cpu);
  m.impl("z_loss", &moe_routing::cpu::z_loss_cpu);
  m.impl("z_loss_backward", &moe_routing::cpu::z_loss_backward_cpu);
}
