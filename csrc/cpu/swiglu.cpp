// swiglu on CPU: out = silu(gate) * up for h = [gate | up] of each row, and
// its gradient, one pass over the rows each (at::parallel_for over rows,
// vectorised over F; reduced dtypes widened to float32 lanes, rounded once).
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

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

// out[o][0:F] from in[i][0:F], one vector of columns at a time: the inputs
// widened to acc_t lanes, op(x, y) on them, y rounded once to scalar_t. The
// last, partial vector is a partial load and store, so op is the only formula.
template <typename scalar_t, typename acc_t, size_t n_in, size_t n_out, typename Op>
inline void map_columns(const std::array<scalar_t*, n_out>& out,
                        const std::array<const scalar_t*, n_in>& in, int64_t F, const Op& op) {
  using fVec = at::vec::Vectorized<acc_t>;
  using sVec = at::vec::Vectorized<scalar_t>;  // fVec itself for float and double
  for (int64_t f = 0; f < F; f += sVec::size()) {
    const int64_t count = std::min<int64_t>(sVec::size(), F - f);
    std::array<fVec, n_in> x_lo, x_hi;
    std::array<fVec, n_out> y_lo, y_hi;
    if constexpr (is_reduced_v<scalar_t>) {
      for (size_t i = 0; i < n_in; ++i) {
        std::tie(x_lo[i], x_hi[i]) = at::vec::convert_to_float<scalar_t>(sVec::loadu(in[i] + f, count));
      }
      op(x_lo, y_lo);
      op(x_hi, y_hi);
      for (size_t o = 0; o < n_out; ++o) {
        at::vec::convert_from_float<scalar_t>(y_lo[o], y_hi[o]).store(out[o] + f, count);
      }
    } else {
      for (size_t i = 0; i < n_in; ++i) x_lo[i] = fVec::loadu(in[i] + f, count);
      op(x_lo, y_lo);
      for (size_t o = 0; o < n_out; ++o) y_lo[o].store(out[o] + f, count);
    }
  }
}

template <typename scalar_t, typename acc_t>
void swiglu_row(scalar_t* out, const scalar_t* gate, const scalar_t* up, int64_t F) {
  using fVec = at::vec::Vectorized<acc_t>;
  map_columns<scalar_t, acc_t, 2, 1>({out}, {gate, up}, F,
                                     [](const std::array<fVec, 2>& x, std::array<fVec, 1>& y) {
                                       swiglu_lanes<acc_t>(x[0], x[1], y[0]);
                                     });
}

template <typename scalar_t, typename acc_t>
void swiglu_backward_row(scalar_t* d_gate, scalar_t* d_up, const scalar_t* dy,
                         const scalar_t* gate, const scalar_t* up, int64_t F) {
  using fVec = at::vec::Vectorized<acc_t>;
  map_columns<scalar_t, acc_t, 3, 2>({d_gate, d_up}, {dy, gate, up}, F,
                                     [](const std::array<fVec, 3>& x, std::array<fVec, 2>& y) {
                                       swiglu_grad_lanes<acc_t>(x[0], x[1], x[2], y[0], y[1]);
                                     });
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
