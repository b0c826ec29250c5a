// grouped_mm on CPU: the dropless experts' matrix product. Expert e's rows
// are the packed rows offsets[e] .. offsets[e] + counts[e] - 1 of x
// (offsets = exclusive cumsum of counts, as plan's dropless layout); rows past
// sum(counts) belong to no expert and get zeros. One matrix product per
// expert on its slice of rows.
#include <torch/library.h>

#include <vector>

#include "../moe_routing.h"

namespace moe_routing::cpu {
namespace {

// Row offsets of each expert, checked against the rows available.
std::vector<int64_t> group_offsets(const char* op, const at::Tensor& counts_in, int64_t rows) {
  const at::Tensor counts = counts_in.contiguous();
  const int64_t* c = counts.const_data_ptr<int64_t>();
  std::vector<int64_t> offsets(counts.numel() + 1, 0);
  for (int64_t e = 0; e < counts.numel(); ++e) {
    TORCH_CHECK(c[e] >= 0, op, ": counts must be >= 0, got counts[", e, "] = ", c[e]);
    // Compared before adding, so that no sum overflows.
    TORCH_CHECK(c[e] <= rows - offsets[e], op, ": counts must sum to at most R=", rows,
                " (the rows of x), but counts[0..", e, "] sum to more");
    offsets[e + 1] = offsets[e] + c[e];
  }
  return offsets;
}

at::Tensor grouped_mm_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& counts) {
  constexpr const char* op = "moe_routing::grouped_mm";
  detail::check_grouped_mm_args(x, weight, counts);
  const auto offsets = group_offsets(op, counts, x.size(0));
  at::Tensor out = at::empty({x.size(0), weight.size(2)}, x.options());
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(offsets.size()); ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    at::Tensor dst = out.narrow(0, offsets[e], n);
    at::mm_out(dst, x.narrow(0, offsets[e], n), weight[e]);
  }
  out.narrow(0, offsets.back(), x.size(0) - offsets.back()).zero_();
  return out;
}

// grad_x[rows of e] = grad[rows of e] @ weight[e]^T; grad_weight[e] = x[rows of e]^T @ grad[rows of e].
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad,
                                                           const at::Tensor& x,
                                                           const at::Tensor& weight,
                                                           const at::Tensor& counts) {
  constexpr const char* op = "moe_routing::grouped_mm_backward";
  detail::check_grouped_mm_backward_args(grad, x, weight, counts);
  const auto offsets = group_offsets(op, counts, x.size(0));
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(offsets.size()); ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    at::Tensor gw = grad_weight[e];
    if (n == 0) {
      gw.zero_();
      continue;
    }
    const at::Tensor g = grad.narrow(0, offsets[e], n);
    at::Tensor gx = grad_x.narrow(0, offsets[e], n);
    at::mm_out(gx, g, weight[e].t());
    at::mm_out(gw, x.narrow(0, offsets[e], n).t(), g);
  }
  grad_x.narrow(0, offsets.back(), x.size(0) - offsets.back()).zero_();
  return {grad_x, grad_weight};
}

}  // namespace
}  // namespace moe_routing::cpu

TORCH_LIBRARY_IMPL(moe_routing, CPU, m) {
  m.impl("grouped_mm", &moe_routing::cpu::grouped_mm_cpu);
  m.impl("grouped_mm_backward", &moe_routing::cpu::grouped_mm_backward_cpu);
}
