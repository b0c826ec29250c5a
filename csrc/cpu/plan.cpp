// plan on CPU: a deterministic counting sort of the (token, choice)
// assignments by expert, in priority order.
//
// The assignments are visited in "phases" over token positions: for the
// "choice" order phase j holds every token's j-th choice; for "token" a single
// phase holds every choice of every token. "batch" is the choice order over
// token positions sorted by descending top-1 weight. The order is (phase,
// position, choice), so an assignment's rank inside its expert is
//   (assignments to e in earlier phases) + (in this phase, earlier chunks)
//   + (in this phase and chunk, earlier positions),
// which per-chunk histograms and one prefix over (expert, phase, chunk) give.
// "score" ranks in choice order first, then keeps each overflowing expert's C
// heaviest assignments, in their choice order.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../moe_routing.h"

namespace moe_routing::cpu {
namespace {

using detail::Priority;

struct Plan {
  at::Tensor slots, load, kept;
};

struct Assignments {
  const int64_t* experts;  // [T, k]
  const bool* mask;        // [T] or null
  const int64_t* order;    // position -> token, or null for token order
  int64_t k;
  bool by_choice;  // one phase per choice (else one phase for all choices)

  int64_t phases() const { return by_choice ? k : 1; }

  // Calls visit(t, j, e) for the valid assignments of positions [begin, end)
  // in one phase, in priority order.
  template <typename Visit>
  void for_each(int64_t phase, int64_t begin, int64_t end, Visit&& visit) const {
    const int64_t j_begin = by_choice ? phase : 0, j_end = by_choice ? phase + 1 : k;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t t = order ? order[p] : p;
      if (mask && !mask[t]) continue;
      for (int64_t j = j_begin; j < j_end; ++j) visit(t, j, experts[t * k + j]);
    }
  }
};

// Weight order of "score" and "batch": the larger first, NaN below every
// number (ties are left to the caller).
inline bool heavier(double a, double b) { return !std::isnan(a) && (std::isnan(b) || a > b); }

// Token positions sorted by descending top-1 (largest, NaN only when all are
// NaN) weight, NaN last, ties in token order: V-MoE batch-prioritised routing.
std::vector<int64_t> batch_priority_order(const double* weights, int64_t T, int64_t k) {
  std::vector<double> top1(T);
  for (int64_t t = 0; t < T; ++t) {
    double best = k ? weights[t * k] : 0.0;
    for (int64_t j = 1; j < k; ++j) {
      if (heavier(weights[t * k + j], best)) best = weights[t * k + j];
    }
    top1[t] = best;
  }
  std::vector<int64_t> order(T);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return heavier(top1[a], top1[b]); });
  return order;
}

// For "score": given every expert's assignments packed in choice order
// (owners[offset[e] .. offset[e] + load[e])), keeps the C heaviest per expert
// (NaN lightest, ties to the earlier one) and gives them rows e*C + 0.. in choice order.
void keep_heaviest(const std::vector<int64_t>& owners, const std::vector<int64_t>& offsets,
                   const int64_t* load, int64_t E, int64_t C, const double* weights,
                   int64_t* slots) {
  at::parallel_for(0, E, 1, [&](int64_t e_begin, int64_t e_end) {
    std::vector<int64_t> by_weight;
    std::vector<char> survives;
    for (int64_t e = e_begin; e < e_end; ++e) {
      const int64_t* mine = owners.data() + offsets[e];
      const int64_t n = load[e];
      survives.assign(n, n <= C);
      if (n > C) {
        by_weight.resize(n);
        std::iota(by_weight.begin(), by_weight.end(), 0);
        std::nth_element(by_weight.begin(), by_weight.begin() + C, by_weight.end(),
                         [&](int64_t a, int64_t b) {
                           const double wa = weights[mine[a]], wb = weights[mine[b]];
                           return heavier(wa, wb) || (!heavier(wb, wa) && a < b);
                         });
        for (int64_t i = 0; i < C; ++i) survives[by_weight[i]] = 1;
      }
      for (int64_t i = 0, row = 0; i < n; ++i) {
        if (survives[i]) slots[mine[i]] = e * C + row++;
      }
    }
  });
}

Plan plan_kernel(const Assignments& a, int64_t T, int64_t E, std::optional<int64_t> capacity,
                 const double* score_weights, const at::TensorOptions& long_opts) {
  const int64_t k = a.k, phases = a.phases();
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(1024, (T + threads - 1) / threads);
  const int64_t chunks = std::max<int64_t>(1, (T + chunk - 1) / chunk);
  // counts[(c * phases + p) * E + e]: assignments to e in phase p of chunk c;
  // the prefix pass turns it into each (chunk, phase)'s first rank in e.
  std::vector<int64_t> counts(chunks * phases * E, 0);

  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t begin = c * chunk, end = std::min(T, begin + chunk);
      for (int64_t p = 0; p < phases; ++p) {
        int64_t* count = counts.data() + (c * phases + p) * E;
        a.for_each(p, begin, end, [&](int64_t t, int64_t j, int64_t e) {
          TORCH_CHECK(e >= 0 && e < E, "moe_routing::plan: experts[", t, ", ", j, "] = ", e,
                      " is out of range [0, num_experts=", E, ")");
          ++count[e];
        });
      }
    }
  });

  at::Tensor load = at::empty({E}, long_opts), kept = at::empty({E}, long_opts);
  int64_t* load_p = load.mutable_data_ptr<int64_t>();
  int64_t* kept_p = kept.mutable_data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    int64_t running = 0;
    for (int64_t p = 0; p < phases; ++p) {
      for (int64_t c = 0; c < chunks; ++c) {
        int64_t& slot = counts[(c * phases + p) * E + e];
        const int64_t n = slot;
        slot = running;
        running += n;
      }
    }
    load_p[e] = running;
    kept_p[e] = capacity ? std::min(running, *capacity) : running;
  }
  // Packed (dropless) layout: expert e owns rows offsets[e] .. offsets[e] + load[e] - 1.
  std::vector<int64_t> offsets(E);
  for (int64_t e = 0, offset = 0; e < E; ++e) {
    offsets[e] = offset;
    offset += load_p[e];
  }

  at::Tensor slots_t = at::full({T, k}, -1, long_opts);
  int64_t* slots = slots_t.mutable_data_ptr<int64_t>();
  const bool select_by_score = score_weights != nullptr && capacity.has_value();
  // "score" first lays the assignments out packed, then picks survivors.
  std::vector<int64_t> owners(select_by_score ? offsets.back() + load_p[E - 1] : 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t begin = c * chunk, end = std::min(T, begin + chunk);
      for (int64_t p = 0; p < phases; ++p) {
        int64_t* next_rank = counts.data() + (c * phases + p) * E;
        a.for_each(p, begin, end, [&](int64_t t, int64_t j, int64_t e) {
          const int64_t rank = next_rank[e]++;
          if (select_by_score) {
            owners[offsets[e] + rank] = t * k + j;
          } else if (!capacity) {
            slots[t * k + j] = offsets[e] + rank;
          } else if (rank < *capacity) {
            slots[t * k + j] = e * *capacity + rank;
          }
        });
      }
    }
  });
  if (select_by_score) keep_heaviest(owners, offsets, load_p, E, *capacity, score_weights, slots);
  return {slots_t, load, kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_cpu(
    const at::Tensor& experts_in, int64_t num_experts, std::optional<int64_t> capacity,
    const std::optional<at::Tensor>& weights_in, c10::string_view priority_name,
    const std::optional<at::Tensor>& mask) {
  const Priority priority =
      detail::parse_priority("moe_routing::plan", std::string(priority_name));
  detail::check_plan_args(experts_in, num_experts, detail::to_symint(capacity), weights_in,
                          priority, mask);
  const at::Tensor experts = experts_in.contiguous();
  const int64_t T = experts.size(0), k = experts.size(1);
  if (experts.numel() == 0) {  // no assignment (T = 0 or k = 0, T maybe huge): nothing to walk
    return {at::full({T, k}, -1, experts.options()), at::zeros({num_experts}, experts.options()),
            at::zeros({num_experts}, experts.options())};
  }
  at::Tensor mask_holder, weights;
  const bool* m = detail::mask_data(mask, mask_holder);
  // Weights only order assignments ("score", "batch"): float64 holds every float32 exactly.
  const bool by_weight = priority == Priority::Score || priority == Priority::Batch;
  if (by_weight) weights = weights_in->to(at::kDouble).contiguous();
  const double* w = weights.defined() ? weights.const_data_ptr<double>() : nullptr;

  std::vector<int64_t> order;
  if (priority == Priority::Batch) order = batch_priority_order(w, T, k);
  const Assignments assignments{experts.const_data_ptr<int64_t>(),
                                m,
                                order.empty() ? nullptr : order.data(), k,
                                priority != Priority::Token};
  Plan p = plan_kernel(assignments, T, num_experts, capacity,
                       priority == Priority::Score ? w : nullptr, experts.options());
  return {p.slots, p.load, p.kept};
}

}  // namespace
}  // namespace moe_routing::cpu

TORCH_LIBRARY_IMPL(moe_routing, CPU, m) { m.impl("plan", &moe_routing::cpu::plan_cpu); }
