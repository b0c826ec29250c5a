// The moe_routing operator library: every schema, and the C++ API that calls
// each op through the dispatcher.
#include "moe_routing.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace moe_routing {

// capacity is pure integer arithmetic on a SymInt token count, so one
// CompositeImplicitAutograd kernel serves every backend and torch.compile.
// The factor is taken to 1e-6 as an exact fraction, so 1.1 * 10 tokens is
// 11 rows, not the 12 that ceil(11.000000000000002) would give.
static c10::SymInt capacity_symint(c10::SymInt num_tokens, int64_t num_experts, int64_t k,
                                   double capacity_factor, int64_t min_capacity) {
  TORCH_CHECK(num_tokens >= 0, "moe_routing::capacity: num_tokens must be >= 0, got ",
              num_tokens);
  TORCH_CHECK(num_experts >= 1, "moe_routing::capacity: num_experts must be >= 1, got ",
              num_experts);
  TORCH_CHECK(k >= 1 && k <= num_experts,
              "moe_routing::capacity: k must be in [1, num_experts=", num_experts, "], got ", k);
  TORCH_CHECK(capacity_factor > 0 && capacity_factor <= 1e6,
              "moe_routing::capacity: capacity_factor must be in (0, 1e6], got ", capacity_factor);
  TORCH_CHECK(min_capacity >= 0, "moe_routing::capacity: min_capacity must be >= 0, got ",
              min_capacity);
  // rows = ceil(num_tokens * a / b) with a = factor * 1e6 * k, b = 1e6 * E,
  // in 128-bit integers (a < 2^103, b < 2^83): no int64 product overflows.
  using wide = __int128;
  constexpr int64_t kDenominator = 1000000;
  const wide a = static_cast<wide>(std::llround(capacity_factor * kDenominator)) * k;
  const wide b = static_cast<wide>(kDenominator) * num_experts;
  // a >= b: rows >= num_tokens, and the result is num_tokens.
  if (a >= b) return num_tokens;
  if (const auto n = num_tokens.maybe_as_int()) {
    // floor(n * a / b) = q, remainder r, bit by bit over n: r < b < 2^83, so
    // 2r + a < 2^85 never overflows, and q <= n.
    int64_t q = 0;
    wide r = 0;
    for (int bit = 62; bit >= 0; --bit) {
      q *= 2;
      r *= 2;
      if (r >= b) ++q, r -= b;
      if ((*n >> bit) & 1) {
        r += a;
        if (r >= b) ++q, r -= b;
      }
    }
    const int64_t rows = q + (r > 0 ? 1 : 0);
    return c10::SymInt(std::min(std::max(min_capacity, rows), *n));
  }
  // A symbolic count computes in the arbitrary-precision integers of the
  // symbolic shapes, from a / b in lowest terms as int64 constants.
  wide x = a, y = b;
  while (y != 0) {
    const wide r = x % y;
    x = y;
    y = r;
  }
  const wide num = a / x, den = b / x;
  TORCH_CHECK(den <= std::numeric_limits<int64_t>::max(),
              "moe_routing::capacity: capacity_factor * k / num_experts = ", capacity_factor, " * ",
              k, " / ", num_experts, " is too fine a fraction for a symbolic num_tokens");
  c10::SymInt rows = (num_tokens * static_cast<int64_t>(num) + static_cast<int64_t>(den - 1)) /
                     static_cast<int64_t>(den);
  return rows.max(c10::SymInt(min_capacity)).min(num_tokens);
}

int64_t capacity(int64_t num_tokens, int64_t num_experts, int64_t k, double capacity_factor,
                 int64_t min_capacity) {
  return capacity_symint(c10::SymInt(num_tokens), num_experts, k, capacity_factor, min_capacity)
      .expect_int();
}

namespace {
template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& logits, int64_t k,
                                                     const std::string& score,
                                                     std::optional<bool> normalize,
                                                     const std::optional<at::Tensor>& bias,
                                                     int64_t num_groups, int64_t topk_groups,
                                                     double scale, const std::string& group_score) {
  static auto handle =
      op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, int64_t, c10::string_view, std::optional<bool>,
          const std::optional<at::Tensor>&, int64_t, int64_t, double, c10::string_view)>(
          "moe_routing::route");
  return handle.call(logits, k, score, normalize, bias, num_groups, topk_groups, scale,
                     group_score);
}

at::Tensor route_backward(const at::Tensor& grad_weights,
                          const std::optional<at::Tensor>& grad_scores,
                          const at::Tensor& weights, const at::Tensor& experts,
                          const at::Tensor& scores, const std::string& score, bool normalize,
                          double scale, at::ScalarType logits_dtype) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, c10::string_view, bool, double,
                    at::ScalarType)>("moe_routing::route_backward");
  return handle.call(grad_weights, grad_scores, weights, experts, scores, score, normalize, scale,
                     logits_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan(const at::Tensor& experts,
                                                    int64_t num_experts,
                                                    std::optional<int64_t> capacity,
                                                    const std::optional<at::Tensor>& weights,
                                                    const std::string& priority,
                                                    const std::optional<at::Tensor>& mask) {
  static auto handle =
      op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, int64_t, std::optional<c10::SymInt>,
          const std::optional<at::Tensor>&, c10::string_view, const std::optional<at::Tensor>&)>(
          "moe_routing::plan");
  return handle.call(experts, num_experts, detail::to_symint(capacity), weights, priority, mask);
}

at::Tensor dispatch(const at::Tensor& x, const at::Tensor& slots, int64_t num_rows) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>("moe_routing::dispatch");
  return handle.call(x, slots, c10::SymInt(num_rows));
}

at::Tensor dispatch_backward(const at::Tensor& grad_out, const at::Tensor& slots) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&)>("moe_routing::dispatch_backward");
  return handle.call(grad_out, slots);
}

at::Tensor combine(const at::Tensor& expert_out, const at::Tensor& slots,
                   const at::Tensor& weights) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "moe_routing::combine");
  return handle.call(expert_out, slots, weights);
}

std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_y,
                                                    const at::Tensor& expert_out,
                                                    const at::Tensor& slots,
                                                    const at::Tensor& weights) {
  static auto handle = op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "moe_routing::combine_backward");
  return handle.call(grad_y, expert_out, slots, weights);
}

at::Tensor load_balancing_loss(const at::Tensor& scores, const at::Tensor& experts,
                               const std::optional<at::Tensor>& mask,
                               std::optional<int64_t> seq_len) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                    std::optional<c10::SymInt>)>("moe_routing::load_balancing_loss");
  return handle.call(scores, experts, mask, detail::to_symint(seq_len));
}

at::Tensor load_balancing_loss_backward(const at::Tensor& grad, const at::Tensor& scores,
                                        const at::Tensor& experts,
                                        const std::optional<at::Tensor>& mask,
                                        std::optional<int64_t> seq_len) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&,
                                     std::optional<c10::SymInt>)>(
      "moe_routing::load_balancing_loss_backward");
  return handle.call(grad, scores, experts, mask, detail::to_symint(seq_len));
}

std::tuple<at::Tensor, at::Tensor> expert_choice(const at::Tensor& scores, int64_t capacity,
                                                 const std::optional<at::Tensor>& mask) {
  static auto handle = op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, c10::SymInt, const std::optional<at::Tensor>&)>(
      "moe_routing::expert_choice");
  return handle.call(scores, c10::SymInt(capacity), mask);
}

at::Tensor expert_choice_backward(const at::Tensor& grad_weights, const at::Tensor& tokens,
                                  int64_t num_tokens) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>(
      "moe_routing::expert_choice_backward");
  return handle.call(grad_weights, tokens, c10::SymInt(num_tokens));
}

at::Tensor balanced_assignment(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                               int64_t iterations, double epsilon) {
  static auto handle = op<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                     double)>("moe_routing::balanced_assignment");
  return handle.call(scores, mask, iterations, epsilon);
}

at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "moe_routing::grouped_mm");
  return handle.call(x, weight, counts);
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& counts) {
  static auto handle = op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "moe_routing::grouped_mm_backward");
  return handle.call(grad, x, weight, counts);
}

at::Tensor swiglu(const at::Tensor& h) {
  static auto handle = op<at::Tensor(const at::Tensor&)>("moe_routing::swiglu");
  return handle.call(h);
}

at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& h) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&)>("moe_routing::swiglu_backward");
  return handle.call(grad, h);
}

at::Tensor z_loss(const at::Tensor& logits, const std::optional<at::Tensor>& mask) {
  static auto handle = op<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&)>(
      "moe_routing::z_loss");
  return handle.call(logits, mask);
}

at::Tensor z_loss_backward(const at::Tensor& grad, const at::Tensor& logits,
                           const std::optional<at::Tensor>& mask) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>(
          "moe_routing::z_loss_backward");
  return handle.call(grad, logits, mask);
}

}  // namespace moe_routing

TORCH_LIBRARY(moe_routing, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "route(Tensor logits, int k, *, str score=\"softmax\", bool? normalize=None, "
      "Tensor? bias=None, int num_groups=1, int topk_groups=1, float scale=1.0, "
      "str group_score=\"top2\") -> (Tensor weights, Tensor experts, Tensor scores)",
      tags);
  m.def(
      "route_backward(Tensor grad_weights, Tensor? grad_scores, Tensor weights, Tensor experts, "
      "Tensor scores, str score, bool normalize, float scale, ScalarType logits_dtype) -> Tensor",
      tags);
  m.def(
      "plan(Tensor experts, int num_experts, SymInt? capacity=None, *, Tensor? weights=None, "
      "str priority=\"choice\", Tensor? mask=None) -> (Tensor slots, Tensor load, Tensor kept)",
      tags);
  m.def(
      "capacity(SymInt num_tokens, int num_experts, int k, float capacity_factor, "
      "int min_capacity=4) -> SymInt",
      tags);
  m.def("dispatch(Tensor x, Tensor slots, SymInt num_rows) -> Tensor", tags);
  m.def("dispatch_backward(Tensor grad_out, Tensor slots) -> Tensor", tags);
  m.def("combine(Tensor expert_out, Tensor slots, Tensor weights) -> Tensor", tags);
  m.def(
      "combine_backward(Tensor grad_y, Tensor expert_out, Tensor slots, Tensor weights) "
      "-> (Tensor grad_expert_out, Tensor grad_weights)",
      tags);
  m.def(
      "load_balancing_loss(Tensor scores, Tensor experts, *, Tensor? mask=None, "
      "SymInt? seq_len=None) -> Tensor",
      tags);
  m.def(
      "load_balancing_loss_backward(Tensor grad, Tensor scores, Tensor experts, Tensor? mask, "
      "SymInt? seq_len) -> Tensor",
      tags);
  m.def("z_loss(Tensor logits, *, Tensor? mask=None) -> Tensor", tags);
  m.def("z_loss_backward(Tensor grad, Tensor logits, Tensor? mask) -> Tensor", tags);
  m.def(
      "expert_choice(Tensor scores, SymInt capacity, *, Tensor? mask=None) "
      "-> (Tensor weights, Tensor tokens)",
      tags);
  m.def("expert_choice_backward(Tensor grad_weights, Tensor tokens, SymInt num_tokens) -> Tensor",
        tags);
  m.def("grouped_mm(Tensor x, Tensor weight, Tensor counts) -> Tensor", tags);
  m.def(
      "grouped_mm_backward(Tensor grad, Tensor x, Tensor weight, Tensor counts) "
      "-> (Tensor grad_x, Tensor grad_weight)",
      tags);
  m.def("swiglu(Tensor h) -> Tensor", tags);
  m.def("swiglu_backward(Tensor grad, Tensor h) -> Tensor", tags);
  m.def(
      "balanced_assignment(Tensor scores, *, Tensor? mask=None, int iterations=64, "
      "float epsilon=0.001) -> Tensor",
      tags);
}

TORCH_LIBRARY_IMPL(moe_routing, CompositeImplicitAutograd, m) {
  m.impl("capacity", &moe_routing::capacity_symint);
}
