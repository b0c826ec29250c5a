// route on CPU: one pass per token computes its scores, selects its top-k
// experts (group-limited if asked) and writes its weights.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <limits>
#include <vector>

#include "../moe_routing.h"
#include "rows.h"

namespace moe_routing::cpu {
namespace {

using detail::Score;

// scores = softmax(row) or sigmoid(row), in place on a row of acc_t.
template <typename acc_t>
void score_row(acc_t* s, int64_t E, Score score) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (score == Score::Softmax) {
    const acc_t max = at::vec::reduce_all<acc_t>(
        [](Vec a, Vec b) { return at::vec::maximum(a, b); }, s, E);
    at::vec::map([max](Vec x) { return (x - Vec(max)).exp(); }, s, s, E);
    const acc_t sum = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, s, E);
    at::vec::map([sum](Vec x) { return x / Vec(sum); }, s, s, E);
  } else {
    at::vec::map([](Vec x) { return Vec(acc_t(1)) / (Vec(acc_t(1)) + x.neg().exp()); }, s, s, E);
  }
}

// The selection order of every top-k here: the larger value first, NaN below
// everything (-inf included), ties (NaN with NaN too) to the lower index.
template <typename acc_t>
inline bool ranks_before(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  if (std::isnan(vb)) return !std::isnan(va) || ia < ib;
  if (std::isnan(va)) return false;
  return va > vb || (va == vb && ia < ib);
}

// Up to this k, an insertion into a sorted list of length k (one pass, most
// values rejected by one comparison); above it, nth_element and a sort of the
// k winners, O(n + k log k) instead of O(n k).
constexpr int64_t kInsertionTopK = 32;

// The k largest values of v[0:n] (indices into v), in selection order.
// scratch holds n indices for large k.
template <typename acc_t>
void top_k(const acc_t* v, int64_t n, int64_t k, int64_t* idx, std::vector<int64_t>& scratch) {
  if (k <= kInsertionTopK) {
    int64_t filled = 0;
    for (int64_t e = 0; e < n; ++e) {
      const acc_t x = v[e];
      if (filled == k && !ranks_before(x, e, v[idx[k - 1]], idx[k - 1])) continue;
      int64_t pos = filled < k ? filled++ : k - 1;
      while (pos > 0 && ranks_before(x, e, v[idx[pos - 1]], idx[pos - 1])) {
        idx[pos] = idx[pos - 1];
        --pos;
      }
      idx[pos] = e;
    }
    return;
  }
  scratch.resize(n);
  std::iota(scratch.begin(), scratch.end(), int64_t(0));
  const auto before = [v](int64_t a, int64_t b) { return ranks_before(v[a], a, v[b], b); };
  if (k < n) std::nth_element(scratch.begin(), scratch.begin() + k, scratch.end(), before);
  std::sort(scratch.begin(), scratch.begin() + k, before);
  std::copy(scratch.begin(), scratch.begin() + k, idx);
}

// Group-limited selection: keeps the topk_groups groups whose two best
// values (in selection order) sum highest (DeepSeek-V3), or whose best is
// highest with group_by_max (DeepSeek-V2), and sets every other group's values
// to -inf. A NaN among a group's best makes its score NaN, which ranks last.
template <typename acc_t>
void mask_groups(acc_t* v, int64_t E, int64_t num_groups, int64_t topk_groups,
                 bool group_by_max, acc_t* group_score, int64_t* best_groups, std::vector<char>& keep,
                 std::vector<int64_t>& scratch) {
  const int64_t size = E / num_groups;
  for (int64_t g = 0; g < num_groups; ++g) {
    int64_t best[2];
    const int64_t top = group_by_max ? 1 : std::min<int64_t>(2, size);
    top_k(v + g * size, size, top, best, scratch);
    group_score[g] = v[g * size + best[0]] + (top == 2 ? v[g * size + best[1]] : acc_t(0));
  }
  top_k(group_score, num_groups, topk_groups, best_groups, scratch);
  keep.assign(num_groups, 0);
  for (int64_t i = 0; i < topk_groups; ++i) keep[best_groups[i]] = 1;
  for (int64_t g = 0; g < num_groups; ++g) {
    if (keep[g]) continue;
    std::fill(v + g * size, v + (g + 1) * size, -std::numeric_limits<acc_t>::infinity());
  }
}

template <typename scalar_t, typename acc_t>
void route_kernel(const at::Tensor& logits, const acc_t* bias, int64_t k, Score score,
                  bool normalize, int64_t num_groups, int64_t topk_groups, bool group_by_max,
                  acc_t scale, at::Tensor& weights, at::Tensor& experts, at::Tensor& scores) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const scalar_t* in = logits.const_data_ptr<scalar_t>();
  acc_t* w_out = weights.mutable_data_ptr<acc_t>();
  int64_t* e_out = experts.mutable_data_ptr<int64_t>();
  acc_t* s_out = scores.mutable_data_ptr<acc_t>();
  const bool separate_selection = bias != nullptr || num_groups > 1;

  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> selection(separate_selection ? E : 0);
    std::vector<acc_t> group_score(num_groups);
    std::vector<int64_t> best_groups(topk_groups);
    std::vector<char> keep;
    std::vector<int64_t> scratch;
    for (int64_t t = begin; t < end; ++t) {
      acc_t* s = s_out + t * E;
      at::vec::convert(in + t * E, s, E);
      score_row(s, E, score);

      const acc_t* sel = s;
      if (separate_selection) {
        if (bias) {
          at::vec::map2([](auto a, auto b) { return a + b; }, selection.data(), s, bias, E);
        } else {
          std::copy(s, s + E, selection.data());
        }
        if (num_groups > 1) {
          mask_groups(selection.data(), E, num_groups, topk_groups, group_by_max,
                      group_score.data(), best_groups.data(), keep, scratch);
        }
        sel = selection.data();
      }
      int64_t* idx = e_out + t * k;
      top_k(sel, E, k, idx, scratch);

      acc_t* w = w_out + t * k;
      acc_t sum = 0;
      for (int64_t j = 0; j < k; ++j) {
        w[j] = s[idx[j]];
        sum += w[j];
      }
      const acc_t factor = normalize ? scale / sum : scale;
      for (int64_t j = 0; j < k; ++j) w[j] *= factor;
    }
  });
}

// d logits from d weights and d scores; see reference.route_backward.
// grad_scores is undefined when the scores' gradient is zero.
template <typename scalar_t, typename acc_t>
void route_backward_kernel(const at::Tensor& grad_weights, const at::Tensor& grad_scores,
                           const at::Tensor& weights, const at::Tensor& experts,
                           const at::Tensor& scores, Score score, bool normalize, acc_t scale,
                           at::Tensor& grad_logits) {
  const int64_t T = scores.size(0), E = scores.size(1), k = experts.size(1);
  const acc_t* gw = grad_weights.const_data_ptr<acc_t>();
  const acc_t* gs = grad_scores.defined() ? grad_scores.const_data_ptr<acc_t>() : nullptr;
  const acc_t* w = weights.const_data_ptr<acc_t>();
  const int64_t* idx = experts.const_data_ptr<int64_t>();
  const acc_t* s_in = scores.const_data_ptr<acc_t>();
  scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(E);
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* s = s_in + t * E;
      if (gs) {
        std::copy(gs + t * E, gs + (t + 1) * E, g.data());
      } else {
        std::fill(g.begin(), g.end(), acc_t(0));
      }
      // weights_j = factor * s[idx_j], factor = scale / sum_j s[idx_j] when normalised.
      acc_t selected_sum = 0, grad_dot_w = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = idx[t * k + j];
        TORCH_CHECK(e >= 0 && e < E, "moe_routing::route_backward: experts[", t, ", ", j,
                    "] = ", e, " is out of range [0, ", E, ")");
        selected_sum += s[e];
        grad_dot_w += gw[t * k + j] * w[t * k + j];
      }
      for (int64_t j = 0; j < k; ++j) {
        const acc_t gj = gw[t * k + j];
        g[idx[t * k + j]] += normalize ? (scale * gj - grad_dot_w) / selected_sum : scale * gj;
      }
      scalar_t* o = out + t * E;
      if (score == Score::Softmax) {
        const acc_t gs_dot_s = dot<acc_t>(g.data(), s, E);
        for (int64_t e = 0; e < E; ++e) o[e] = static_cast<scalar_t>(s[e] * (g[e] - gs_dot_s));
      } else {
        for (int64_t e = 0; e < E; ++e) o[e] = static_cast<scalar_t>(g[e] * s[e] * (1 - s[e]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& logits_in, int64_t k, c10::string_view score_name,
    std::optional<bool> normalize, const std::optional<at::Tensor>& bias_in, int64_t num_groups,
    int64_t topk_groups, double scale, c10::string_view group_score) {
  const Score score = detail::parse_score("moe_routing::route", std::string(score_name));
  const bool group_by_max =
      detail::parse_group_score("moe_routing::route", std::string(group_score));
  detail::check_route_args(logits_in, k, bias_in, num_groups, topk_groups);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc_type = detail::router_dtype(logits.scalar_type());
  const auto opts = logits.options().dtype(acc_type);
  at::Tensor weights = at::empty({T, k}, opts);
  at::Tensor experts = at::empty({T, k}, opts.dtype(at::kLong));
  at::Tensor scores = at::empty({T, E}, opts);
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(acc_type).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_routing::route", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        route_kernel<scalar_t, acc_t>(logits, bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                                      k, score, detail::resolve_normalize(normalize, k),
                                      num_groups, topk_groups, group_by_max,
                                      static_cast<acc_t>(scale), weights,
                                      experts, scores);
      });
  return {weights, experts, scores};
}

at::Tensor route_backward_cpu(const at::Tensor& grad_weights,
                              const std::optional<at::Tensor>& grad_scores,
                              const at::Tensor& weights, const at::Tensor& experts,
                              const at::Tensor& scores, c10::string_view score_name,
                              bool normalize, double scale, at::ScalarType logits_dtype) {
  constexpr const char* op = "moe_routing::route_backward";
  const Score score = detail::parse_score(op, std::string(score_name));
  detail::check_route_backward_args(grad_weights, grad_scores, weights, experts, scores,
                                    logits_dtype);
  at::Tensor grad_logits = at::empty(scores.sizes(), scores.options().dtype(logits_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_dtype, op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    route_backward_kernel<scalar_t, acc_t>(
        grad_weights.contiguous(), grad_scores ? grad_scores->contiguous() : at::Tensor(),
        weights.contiguous(),
        experts.contiguous(), scores.contiguous(), score, normalize, static_cast<acc_t>(scale),
        grad_logits);
  });
  return grad_logits;
}

}  // namespace
}  // namespace moe_routing::cpu

TORCH_LIBRARY_IMPL(moe_routing, CPU, m) {
  m.impl("route", &moe_routing::cpu::route_cpu);
  m.impl("route_backward", &moe_routing::cpu::route_backward_cpu);
}
