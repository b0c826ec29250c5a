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

// Per-sequence assignment counts and valid tokens. Without seq_len the whole
// batch is one sequence.
struct SequenceCounts {
  int64_t sequences, seq_len;
  std::vector<int64_t> assignments;  // [sequences, E]
  std::vector<int64_t> valid;        // [sequences]
  int64_t counted;                   // sequences with at least one valid token
};

SequenceCounts count_assignments(const char* op, const at::Tensor& experts, int64_t E,
                                 const bool* mask, std::optional<int64_t> seq_len) {
  const int64_t T = experts.size(0), k = experts.size(1);
  const int64_t L = seq_len.value_or(std::max<int64_t>(T, 1));
  SequenceCounts c{T / L, L, {}, {}, 0};
  c.sequences = std::max<int64_t>(c.sequences, 1);
  c.assignments.assign(c.sequences * E, 0);
  c.valid.assign(c.sequences, 0);
  const int64_t* idx = experts.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    if (!is_valid(mask, t)) continue;
    const int64_t s = t / L;
    ++c.valid[s];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = idx[t * k + j];
      TORCH_CHECK(e >= 0 && e < E, op, ": experts[", t, ", ", j, "] = ", e,
                  " is out of range [0, E=", E, ")");
      ++c.assignments[s * E + e];
    }
  }
  for (int64_t n : c.valid) c.counted += n > 0;
  return c;
}

// d loss / d scores[t, e] for a valid token t of sequence s, per unit of
// upstream gradient: E * f_se / (N_s * sequences counted), P's gradient.
template <typename acc_t>
acc_t score_gradient(const SequenceCounts& c, int64_t s, int64_t e, int64_t E, int64_t k) {
  const acc_t n = static_cast<acc_t>(c.valid[s]);
  const acc_t f = static_cast<acc_t>(c.assignments[s * E + e]) / (n * static_cast<acc_t>(k));
  return static_cast<acc_t>(E) * f / n / static_cast<acc_t>(c.counted);
}

template <typename acc_t>
at::Tensor load_balancing_kernel(const at::Tensor& scores, const at::Tensor& experts,
                                 const bool* mask, std::optional<int64_t> seq_len) {
  constexpr const char* op = "moe_routing::load_balancing_loss";
  const int64_t T = scores.size(0), E = scores.size(1), k = experts.size(1);
  const SequenceCounts c = count_assignments(op, experts, E, mask, seq_len);
  // partial[(s * blocks + b) * E + e] = sum of scores[t, e] over the valid
  // tokens of block b of sequence s: fixed blocks, so a fixed summation order.
  // seq_len divides T, so it exceeds T only when T = 0 (then seq_len may be huge).
  const int64_t blocks = num_chunks(std::min(c.seq_len, T));
  std::vector<acc_t> partial(c.sequences * blocks * E, acc_t(0));
  const acc_t* sc = scores.const_data_ptr<acc_t>();
  at::parallel_for(0, c.sequences * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = i / blocks, b = i % blocks;
      const int64_t first = s * c.seq_len + b * kReduceChunk;
      const int64_t last = std::min({T, (s + 1) * c.seq_len, first + kReduceChunk});
      for (int64_t t = first; t < last; ++t) {
        if (is_valid(mask, t)) axpy(partial.data() + i * E, acc_t(1), sc + t * E, E);
      }
    }
  });
  // loss = mean over counted sequences of E * sum_e f_se * P_se = sum_e grad_se * score_sum_se.
  acc_t loss = 0;
  for (int64_t s = 0; s < c.sequences; ++s) {
    if (c.valid[s] == 0) continue;
    for (int64_t e = 0; e < E; ++e) {
      acc_t score_sum = 0;
      for (int64_t b = 0; b < blocks; ++b) score_sum += partial[(s * blocks + b) * E + e];
      loss += score_gradient<acc_t>(c, s, e, E, k) * score_sum;
    }
  }
  return at::scalar_tensor(loss, scores.options());
}

at::Tensor load_balancing_loss_cpu(const at::Tensor& scores_in, const at::Tensor& experts_in,
                                   const std::optional<at::Tensor>& mask,
                                   std::optional<int64_t> seq_len) {
  detail::check_load_balancing_args(scores_in, experts_in, mask, detail::to_symint(seq_len));
  const at::Tensor scores = scores_in.contiguous(), experts = experts_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = detail::mask_data(mask, mask_holder);
  return AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "moe_routing::load_balancing_loss", [&] {
    return load_balancing_kernel<scalar_t>(scores, experts, m, seq_len);
  });
}

at::Tensor load_balancing_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& scores_in,
                                            const at::Tensor& experts_in,
                                            const std::optional<at::Tensor>& mask,
                                            std::optional<int64_t> seq_len) {
  constexpr const char* op = "moe_routing::load_balancing_loss_backward";
  detail::check_load_balancing_backward_args(grad, scores_in, experts_in, mask,
                                             detail::to_symint(seq_len));
  const at::Tensor scores = scores_in.contiguous(), experts = experts_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = detail::mask_data(mask, mask_holder);
  const int64_t T = scores.size(0), E = scores.size(1), k = experts.size(1);
  at::Tensor grad_scores = at::zeros({T, E}, scores.options());
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    const SequenceCounts c = count_assignments(op, experts, E, m, seq_len);
    const acc_t g = grad.item<acc_t>();
    // Every valid token of a sequence gets the same row.
    std::vector<acc_t> rows(c.sequences * E, acc_t(0));
    for (int64_t s = 0; s < c.sequences; ++s) {
      if (c.valid[s] == 0) continue;
      for (int64_t e = 0; e < E; ++e) rows[s * E + e] = g * score_gradient<acc_t>(c, s, e, E, k);
    }
    acc_t* out = grad_scores.mutable_data_ptr<acc_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (!is_valid(m, t)) continue;
        const acc_t* row = rows.data() + (t / c.seq_len) * E;
        std::copy(row, row + E, out + t * E);
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
  const bool* m = detail::mask_data(mask, mask_holder);
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
  detail::check_z_loss_backward_args(grad, logits_in, mask);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = detail::mask_data(mask, mask_holder);
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
