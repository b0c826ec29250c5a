// swiglu on CPU: out = silu(gate) * up for h = [gate | up] of each row, and
// its gradient, one pass over the rows each (at::parallel_for over rows,
// vectorised over F; reduced dtypes widened to float32 lanes, rounded once).
#include <torch/library.h>

#include <cmath>

#include "../moe_routing.h"
#include "rows.h"

namespace moe_routing::cpu {
namespace {

// The swiglu of one row: out[0:F] from gate[0:F] and up[0:F].
template <typename acc_t>
inline void swiglu_lanes(const at::vec::Vectorized<acc_t>& g, const at::vec::Vectorized<acc_t>& u,
                         at::vec::Vectorized<acc_t>& out) {
  using fVec = at::vec::Vectorized<acc_t>;
  const fVec one(acc_t(1));
  out = g / (one + g.neg().exp()) * u;
}

// d_gate and d_up of one row from grad, gate and up: with s = sigmoid(gate),
// d_up = grad * gate * s and d_gate = grad * up * s * (1 + gate * (1 - s)).
template <typename acc_t>
inline void swiglu_grad_lanes(const at::vec::Vectorized<acc_t>& dy,
                              const at::vec::Vectorized<acc_t>& g,
                              const at::vec::Vectorized<acc_t>& u, at::vec::Vectorized<acc_t>& dg,
                              at::vec::Vectorized<acc_t>& du) {
  using fVec = at::vec::Vectorized<acc_t>;
  const fVec one(acc_t(1));
  const fVec s = one / (one + g.neg().exp());
  du = dy * g * s;
  dg = dy * u * s * (one + g * (one - s));
}

template <typename scalar_t, typename acc_t>
void swiglu_row(scalar_t* out, const scalar_t* gate, const scalar_t* up, int64_t F) {
  using fVec = at::vec::Vectorized<acc_t>;
  int64_t f = 0;
  if constexpr (is_reduced_v<scalar_t>) {
    using rVec = at::vec::Vectorized<scalar_t>;
    for (; f + rVec::size() <= F; f += rVec::size()) {
      auto [g0, g1] = at::vec::convert_to_float<scalar_t>(rVec::loadu(gate + f));
      auto [u0, u1] = at::vec::convert_to_float<scalar_t>(rVec::loadu(up + f));
      fVec y0, y1;
      swiglu_lanes<acc_t>(g0, u0, y0);
      swiglu_lanes<acc_t>(g1, u1, y1);
      at::vec::convert_from_float<scalar_t>(y0, y1).store(out + f);
    }
  } else {
    for (; f + fVec::size() <= F; f += fVec::size()) {
      fVec y;
      swiglu_lanes<acc_t>(fVec::loadu(gate + f), fVec::loadu(up + f), y);
      y.store(out + f);
    }
  }
  for (; f < F; ++f) {
    const acc_t g = static_cast<acc_t>(gate[f]), u = static_cast<acc_t>(up[f]);
    out[f] = static_cast<scalar_t>(g / (acc_t(1) + std::exp(-g)) * u);
  }
}

template <typename scalar_t, typename acc_t>
void swiglu_backward_row(scalar_t* d_gate, scalar_t* d_up, const scalar_t* dy,
                         const scalar_t* gate, const scalar_t* up, int64_t F) {
  using fVec = at::vec::Vectorized<acc_t>;
  int64_t f = 0;
  if constexpr (is_reduced_v<scalar_t>) {
    using rVec = at::vec::Vectorized<scalar_t>;
    for (; f + rVec::size() <= F; f += rVec::size()) {
      auto [d0, d1] = at::vec::convert_to_float<scalar_t>(rVec::loadu(dy + f));
      auto [g0, g1] = at::vec::convert_to_float<scalar_t>(rVec::loadu(gate + f));
      auto [u0, u1] = at::vec::convert_to_float<scalar_t>(rVec::loadu(up + f));
      fVec dg0, dg1, du0, du1;
      swiglu_grad_lanes<acc_t>(d0, g0, u0, dg0, du0);
      swiglu_grad_lanes<acc_t>(d1, g1, u1, dg1, du1);
      at::vec::convert_from_float<scalar_t>(dg0, dg1).store(d_gate + f);
      at::vec::convert_from_float<scalar_t>(du0, du1).store(d_up + f);
    }
  } else {
    for (; f + fVec::size() <= F; f += fVec::size()) {
      fVec dg, du;
      swiglu_grad_lanes<acc_t>(fVec::loadu(dy + f), fVec::loadu(gate + f), fVec::loadu(up + f), dg, du);
      dg.store(d_gate + f);
      du.store(d_up + f);
    }
  }
  for (; f < F; ++f) {
    const acc_t d = static_cast<acc_t>(dy[f]), g = static_cast<acc_t>(gate[f]),
                u = static_cast<acc_t>(up[f]);
    const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-g));
    d_up[f] = static_cast<scalar_t>(d * g * s);
    d_gate[f] = static_cast<scalar_t>(d * u * s * (acc_t(1) + g * (acc_t(1) - s)));
  }
}

// Rows per parallel_for task: about 16K elements, so small R still splits.
int64_t row_grain(int64_t F) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)); }

at::Tensor swiglu_cpu(const at::Tensor& h_in) {
  detail::check_swiglu_args(h_in);
  const at::Tensor h = h_in.contiguous();
  const int64_t R = h.size(0), F = h.size(1) / 2;
  at::Tensor out = at::empty({R, F}, h.options());
  if (R == 0 || F == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "moe_routing::swiglu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = h.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R, row_grain(F), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        swiglu_row<scalar_t, acc_t>(y + r * F, in + r * 2 * F, in + r * 2 * F + F, F);
      }
    });
  });
  return out;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& h_in) {
  detail::check_swiglu_backward_args(grad_in, h_in);
  const at::Tensor h = h_in.contiguous(), grad = grad_in.contiguous();
  const int64_t R = h.size(0), F = h.size(1) / 2;
  at::Tensor grad_h = at::empty({R, 2 * F}, h.options());
  if (R == 0 || F == 0) return grad_h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "moe_routing::swiglu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = h.const_data_ptr<scalar_t>();
    const scalar_t* dy = grad.const_data_ptr<scalar_t>();
    scalar_t* dh = grad_h.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R, row_grain(F), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        swiglu_backward_row<scalar_t, acc_t>(dh + r * 2 * F, dh + r * 2 * F + F, dy + r * F,
                                             in + r * 2 * F, in + r * 2 * F + F, F);
      }
    });
  });
  return grad_h;
}

}  // namespace
}  // namespace moe_routing::cpu

TORCH_LIBRARY_IMPL(moe_routing, CPU, m) {
  m.impl("swiglu", &moe_routing::cpu::swiglu_cpu);
  m.impl("swiglu_backward", &moe_routing::cpu::swiglu_backward_cpu);
}
