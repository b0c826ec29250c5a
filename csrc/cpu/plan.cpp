// plan on CPU: a deterministic counting sort of the (token, choice)
// assignments by expert, in priority order.
//
// The assignments are visited in "phases": for priority "choice" phase j holds
// every token's j-th choice; for "token" a single phase holds every choice of
// every token. The priority order is (phase, token, choice), so an
// assignment's rank inside its expert is
//   (assignments to e in earlier phases) + (in this phase, earlier chunks)
//   + (in this phase and chunk, earlier tokens),
// which per-chunk histograms and one prefix over (expert, phase, chunk) give.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <vector>

#include "../moe_routing.h"

namespace moe_routing::cpu {
namespace {

using detail::Priority;

struct Plan {
  at::Tensor slots, load, kept;
};

// Calls visit(t, j, e) for the chunk's valid assignments of one phase in
// priority order.
template <typename Visit>
void for_each_in_phase(const int64_t* experts, const bool* mask, int64_t k, Priority priority,
                       int64_t phase, int64_t begin, int64_t end, Visit&& visit) {
  const int64_t j_begin = priority == Priority::Choice ? phase : 0;
  const int64_t j_end = priority == Priority::Choice ? phase + 1 : k;
  for (int64_t t = begin; t < end; ++t) {
    if (mask && !mask[t]) continue;
    for (int64_t j = j_begin; j < j_end; ++j) visit(t, j, experts[t * k + j]);
  }
}

Plan plan_kernel(const at::Tensor& experts_t, int64_t E, std::optional<int64_t> capacity,
                 Priority priority, const bool* mask) {
  const int64_t T = experts_t.size(0), k = experts_t.size(1);
  const int64_t* experts = experts_t.const_data_ptr<int64_t>();
  const int64_t phases = priority == Priority::Choice ? k : 1;
  const int64_t chunk = std::max<int64_t>(1024, (T + at::get_num_threads() - 1) /
                                                    std::max(1, at::get_num_threads()));
  const int64_t chunks = std::max<int64_t>(1, (T + chunk - 1) / chunk);
  // counts[(c * phases + p) * E + e]: assignments to e in phase p of chunk c;
  // the prefix pass turns it into each (chunk, phase)'s first rank in e.
  std::vector<int64_t> counts(chunks * phases * E, 0);

  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t begin = c * chunk, end = std::min(T, begin + chunk);
      for (int64_t p = 0; p < phases; ++p) {
        int64_t* count = counts.data() + (c * phases + p) * E;
        for_each_in_phase(experts, mask, k, priority, p, begin, end,
                          [&](int64_t t, int64_t j, int64_t e) {
                            TORCH_CHECK(e >= 0 && e < E, "moe_routing::plan: experts[", t, ", ",
                                        j, "] = ", e, " is out of range [0, num_experts=", E,
                                        ")");
                            ++count[e];
                          });
      }
    }
  });

  const auto long_opts = experts_t.options().dtype(at::kLong);
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
  // Dropless: expert e owns rows offsets[e] .. offsets[e] + load[e] - 1.
  std::vector<int64_t> row_base(E);
  for (int64_t e = 0, offset = 0; e < E; ++e) {
    row_base[e] = capacity ? e * *capacity : offset;
    offset += load_p[e];
  }

  at::Tensor slots_t = at::full({T, k}, -1, long_opts);
  int64_t* slots = slots_t.mutable_data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t begin = c * chunk, end = std::min(T, begin + chunk);
      for (int64_t p = 0; p < phases; ++p) {
        int64_t* next_rank = counts.data() + (c * phases + p) * E;
        for_each_in_phase(experts, mask, k, priority, p, begin, end,
                          [&](int64_t t, int64_t j, int64_t e) {
                            const int64_t rank = next_rank[e]++;
                            if (!capacity || rank < *capacity) slots[t * k + j] = row_base[e] + rank;
                          });
      }
    }
  });
  return {slots_t, load, kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_cpu(
    const at::Tensor& experts, int64_t num_experts, std::optional<int64_t> capacity,
    const std::optional<at::Tensor>& weights, c10::string_view priority_name,
    const std::optional<at::Tensor>& mask) {
  const Priority priority =
      detail::parse_priority("moe_routing::plan", std::string(priority_name));
  std::optional<c10::SymInt> sym_capacity;
  if (capacity) sym_capacity = c10::SymInt(*capacity);
  detail::check_plan_args(experts, num_experts, sym_capacity, weights, priority, mask);
  at::Tensor mask_c;
  if (mask.has_value()) mask_c = mask->contiguous();
  Plan p = plan_kernel(experts.contiguous(), num_experts, capacity, priority,
                       mask_c.defined() ? mask_c.const_data_ptr<bool>() : nullptr);
  return {p.slots, p.load, p.kept};
}

}  // namespace
}  // namespace moe_routing::cpu

TORCH_LIBRARY_IMPL(moe_routing, CPU, m) { m.impl("plan", &moe_routing::cpu::plan_cpu); }
