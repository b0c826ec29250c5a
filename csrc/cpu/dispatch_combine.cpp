// dispatch and combine on CPU, and their backwards.
//
// Every kernel writes each output row exactly once, so no two threads touch
// the same memory and the results do not depend on the thread count:
// dispatch and combine_backward's row gradient go through row_owners (who
// fills each expert row), combine and dispatch_backward gather a token's k
// rows in choice order into a float32 (float64) accumulator.
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../moe_routing.h"
#include "rows.h"

namespace moe_routing::cpu {
namespace {

constexpr int64_t kRowGrain = 16;

[[noreturn]] void bad_slot(const char* op, int64_t num_rows, int64_t r) {
  TORCH_CHECK(false, op, ": slots must be -1 (dropped) or in [0, num_rows=", num_rows, "), got ",
              r);
}

// The checks of row_owners without its num_rows-sized map, for outputs that
// hold no data (H = 0 or num_rows = 0, where num_rows may be huge): memory
// and time follow the number of slots.
void check_slots(const char* op, const at::Tensor& slots, int64_t num_rows) {
  const int64_t n = slots.numel();
  const int64_t* s = slots.const_data_ptr<int64_t>();
  std::vector<int64_t> used;
  for (int64_t i = 0; i < n; ++i) {
    if (s[i] == -1) continue;
    if (s[i] < 0 || s[i] >= num_rows) bad_slot(op, num_rows, s[i]);
    used.push_back(s[i]);
  }
  std::sort(used.begin(), used.end());
  const auto twice = std::adjacent_find(used.begin(), used.end());
  TORCH_CHECK(twice == used.end(), op, ": slots must be unique, but row ", *twice,
              " is assigned twice");
}

// Range checks of the slots a gather reads, for outputs that hold no data.
void check_slot_range(const char* op, const at::Tensor& slots, int64_t num_rows) {
  const int64_t n = slots.numel();
  const int64_t* s = slots.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (s[i] != -1 && (s[i] < 0 || s[i] >= num_rows)) bad_slot(op, num_rows, s[i]);
  }
}

// owners[r] = t * k + j for the assignment with slots[t, j] == r, or -1.
// Raises on a slot outside [-1, num_rows) or a row claimed twice, which would
// otherwise be a silent race between tokens.
std::vector<int64_t> row_owners(const char* op, const at::Tensor& slots, int64_t num_rows) {
  const int64_t n = slots.numel();
  const int64_t* s = slots.const_data_ptr<int64_t>();
  std::vector<int64_t> owners(num_rows, -1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = s[i];
    if (r < 0) {
      TORCH_CHECK(r == -1, op, ": slots must be -1 (dropped) or in [0, num_rows=", num_rows,
                  "), got ", r);
      continue;
    }
    TORCH_CHECK(r < num_rows, op, ": slots must be -1 (dropped) or in [0, num_rows=", num_rows,
                "), got ", r);
    TORCH_CHECK(owners[r] == -1, op, ": slots must be unique, but row ", r,
                " is assigned twice");
    owners[r] = i;
  }
  return owners;
}

// out[t] = sum over j of weight[t, j] * rows[slots[t, j]] (weight 1 when
// weights is null), accumulated in acc_t in choice order, stored once.
template <typename scalar_t, typename acc_t, typename weight_t>
void gather_sum(const char* op, const scalar_t* rows, int64_t num_rows, const int64_t* slots,
                const weight_t* weights, int64_t T, int64_t k, int64_t H, scalar_t* out) {
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> kept_rows(k);
    std::vector<acc_t> kept_weights(k);
    for (int64_t t = begin; t < end; ++t) {
      int64_t count = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = slots[t * k + j];
        if (r == -1) continue;
        TORCH_CHECK(r >= 0 && r < num_rows, op, ": slots must be -1 (dropped) or in [0, num_rows=",
                    num_rows, "), got ", r);
        kept_rows[count] = rows + r * H;
        kept_weights[count++] = weights ? static_cast<acc_t>(weights[t * k + j]) : acc_t(1);
      }
      for (int64_t j = 0; t + 1 < end && j < k; ++j) {
        const int64_t r = slots[(t + 1) * k + j];
        if (r >= 0 && r < num_rows) prefetch_row(rows + r * H, H * sizeof(scalar_t));
      }
      weighted_sum(out + t * H, kept_rows.data(), kept_weights.data(), count, H);
    }
  });
}

at::Tensor dispatch_cpu(const at::Tensor& x_in, const at::Tensor& slots_in, int64_t num_rows) {
  constexpr const char* op = "moe_routing::dispatch";
  detail::check_dispatch_args(x_in, slots_in, num_rows);
  const at::Tensor x = x_in.contiguous(), slots = slots_in.contiguous();
  const int64_t H = x.size(1), k = slots.size(1);
  at::Tensor out = at::empty({num_rows, H}, x.options());
  if (out.numel() == 0) {
    check_slots(op, slots, num_rows);
    return out;
  }
  const std::vector<int64_t> owners = row_owners(op, slots, num_rows);
  const size_t row_bytes = H * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, num_rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (r + 1 < end && owners[r + 1] >= 0) prefetch_row(src + (owners[r + 1] / k) * row_bytes, row_bytes);
      if (owners[r] < 0) {
        std::memset(dst + r * row_bytes, 0, row_bytes);
      } else {
        std::memcpy(dst + r * row_bytes, src + (owners[r] / k) * row_bytes, row_bytes);
      }
    }
  });
  return out;
}

at::Tensor dispatch_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& slots_in) {
  constexpr const char* op = "moe_routing::dispatch_backward";
  detail::check_dispatch_backward_args(grad_out_in, slots_in);
  const at::Tensor g = grad_out_in.contiguous(), slots = slots_in.contiguous();
  const int64_t T = slots.size(0), k = slots.size(1), H = g.size(1);
  at::Tensor grad_x = at::empty({T, H}, g.options());
  if (grad_x.numel() == 0) {  // T or H is 0 (the other maybe huge)
    check_slot_range(op, slots, g.size(0));
    return grad_x;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_sum<scalar_t, acc_t, acc_t>(op, g.const_data_ptr<scalar_t>(), g.size(0),
                                       slots.const_data_ptr<int64_t>(), nullptr, T, k, H,
                                       grad_x.mutable_data_ptr<scalar_t>());
  });
  return grad_x;
}

at::Tensor combine_cpu(const at::Tensor& expert_out_in, const at::Tensor& slots_in,
                       const at::Tensor& weights_in) {
  constexpr const char* op = "moe_routing::combine";
  detail::check_combine_args(expert_out_in, slots_in, weights_in);
  const at::Tensor rows = detail::rows_view(expert_out_in).contiguous();
  const at::Tensor slots = slots_in.contiguous(), weights = weights_in.contiguous();
  const int64_t T = slots.size(0), k = slots.size(1), H = rows.size(1);
  at::Tensor y = at::empty({T, H}, rows.options());
  if (y.numel() == 0) {  // T or H is 0 (the other maybe huge)
    check_slot_range(op, slots, rows.size(0));
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), op, [&] {
    using row_t = scalar_t;
    using acc_t = at::opmath_type<row_t>;
    if (weights.scalar_type() == at::kDouble) {
      gather_sum<row_t, acc_t, double>(op, rows.const_data_ptr<row_t>(), rows.size(0),
                                       slots.const_data_ptr<int64_t>(),
                                       weights.const_data_ptr<double>(), T, k, H,
                                       y.mutable_data_ptr<row_t>());
    } else {
      gather_sum<row_t, acc_t, float>(op, rows.const_data_ptr<row_t>(), rows.size(0),
                                      slots.const_data_ptr<int64_t>(),
                                      weights.const_data_ptr<float>(), T, k, H,
                                      y.mutable_data_ptr<row_t>());
    }
  });
  return y;
}

// grad_rows[slots[t, j]] = weights[t, j] * grad_y[t] and
// grad_weights[t, j] = <grad_y[t], rows[slots[t, j]]>, in one pass over tokens;
// rows that no assignment fills get zeros.
template <typename row_t, typename weight_t>
void combine_backward_kernel(const char* op, const at::Tensor& grad_y, const at::Tensor& rows,
                             const at::Tensor& slots, const at::Tensor& weights,
                             at::Tensor& grad_rows, at::Tensor& grad_weights) {
  using acc_t = at::opmath_type<row_t>;
  const int64_t T = slots.size(0), k = slots.size(1), H = rows.size(1), R = rows.size(0);
  const std::vector<int64_t> owners = row_owners(op, slots, R);
  const row_t* gy = grad_y.const_data_ptr<row_t>();
  const row_t* x = rows.const_data_ptr<row_t>();
  const int64_t* s = slots.const_data_ptr<int64_t>();
  const weight_t* w = weights.const_data_ptr<weight_t>();
  row_t* gx = grad_rows.mutable_data_ptr<row_t>();
  weight_t* gw = grad_weights.mutable_data_ptr<weight_t>();
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; t + 1 < end && j < k; ++j) {
        const int64_t r = s[(t + 1) * k + j];
        if (r >= 0 && r < R) prefetch_row(x + r * H, H * sizeof(row_t));
      }
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = s[t * k + j];
        if (r < 0) {
          gw[t * k + j] = 0;
          continue;
        }
        gw[t * k + j] = static_cast<weight_t>(dot<acc_t>(gy + t * H, x + r * H, H));
        scale_into(gx + r * H, static_cast<acc_t>(w[t * k + j]), gy + t * H, H);
      }
    }
  });
  at::parallel_for(0, R, kRowGrain * 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (owners[r] < 0) std::fill(gx + r * H, gx + (r + 1) * H, row_t(0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cpu(const at::Tensor& grad_y_in,
                                                        const at::Tensor& expert_out,
                                                        const at::Tensor& slots_in,
                                                        const at::Tensor& weights_in) {
  constexpr const char* op = "moe_routing::combine_backward";
  detail::check_combine_backward_args(grad_y_in, expert_out, slots_in, weights_in);
  const at::Tensor rows = detail::rows_view(expert_out).contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous(), slots = slots_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor grad_expert_out = at::empty(expert_out.sizes(), expert_out.options());
  at::Tensor grad_rows = detail::rows_view(grad_expert_out);
  at::Tensor grad_weights = at::empty(weights.sizes(), weights.options());
  if (rows.size(1) == 0) {  // H = 0: no data, every weight gradient is 0
    check_slots(op, slots, rows.size(0));
    grad_weights.zero_();
    return {grad_expert_out, grad_weights};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), op, [&] {
    using row_t = scalar_t;
    if (weights.scalar_type() == at::kDouble) {
      combine_backward_kernel<row_t, double>(op, grad_y, rows, slots, weights, grad_rows,
                                             grad_weights);
    } else {
      combine_backward_kernel<row_t, float>(op, grad_y, rows, slots, weights, grad_rows,
                                            grad_weights);
    }
  });
  return {grad_expert_out, grad_weights};
}

}  // namespace
}  // namespace moe_routing::cpu

TORCH_LIBRARY_IMPL(moe_routing, CPU, m) {
  m.impl("dispatch", &moe_routing::cpu::dispatch_cpu);
  m.impl("dispatch_backward", &moe_routing::cpu::dispatch_backward_cpu);
  m.impl("combine", &moe_routing::cpu::combine_cpu);
  m.impl("combine_backward", &moe_routing::cpu::combine_backward_cpu);
}
