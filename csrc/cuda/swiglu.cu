// swiglu on CUDA: out = silu(gate) * up for h = [gate | up] of each row, and
// its gradient: elementwise grid-stride kernels, 16-byte loads and stores
// when F and the pointers allow, arithmetic in float32 (float64), rounded once.
#include <torch/library.h>

#include "../moe_routing.h"
#include "common.cuh"

namespace moe_routing::cuda {
namespace {

constexpr int kThreads = 256;

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_(-x));
}

// Each thread takes n consecutive columns of a row (n = a 16-byte vector, or 1).
template <typename scalar_t, int n>
struct Chunk {
  scalar_t v[n];
};

template <typename scalar_t, int n>
__device__ __forceinline__ Chunk<scalar_t, n> load(const scalar_t* p) {
  if constexpr (n > 1) {
    const auto packed = *reinterpret_cast<const Vec16<scalar_t>*>(p);
    Chunk<scalar_t, n> c;
#pragma unroll
    for (int j = 0; j < n; ++j) c.v[j] = packed.v[j];
    return c;
  } else {
    return Chunk<scalar_t, n>{{*p}};
  }
}

template <typename scalar_t, int n>
__device__ __forceinline__ void store(scalar_t* p, const Chunk<scalar_t, n>& c) {
  if constexpr (n > 1) {
    Vec16<scalar_t> packed;
#pragma unroll
    for (int j = 0; j < n; ++j) packed.v[j] = c.v[j];
    *reinterpret_cast<Vec16<scalar_t>*>(p) = packed;
  } else {
    *p = c.v[0];
  }
}

template <typename scalar_t, int n>
__global__ void __launch_bounds__(kThreads)
    swiglu_kernel(const scalar_t* __restrict__ h, scalar_t* __restrict__ out, int64_t R, int64_t F) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per_row = F / n, total = R * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, f = (i % per_row) * n;
    const auto g = load<scalar_t, n>(h + r * 2 * F + f);
    const auto u = load<scalar_t, n>(h + r * 2 * F + F + f);
    Chunk<scalar_t, n> y;
#pragma unroll
    for (int j = 0; j < n; ++j) {
      const acc_t gj = static_cast<acc_t>(g.v[j]);
      // g / (1 + exp(-g)), one division, as torch's silu and the CPU kernel round it.
      y.v[j] = static_cast<scalar_t>(gj / (acc_t(1) + exp_(-gj)) * static_cast<acc_t>(u.v[j]));
    }
    store<scalar_t, n>(out + r * F + f, y);
  }
}

template <typename scalar_t, int n>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ h,
                           scalar_t* __restrict__ grad_h, int64_t R, int64_t F) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per_row = F / n, total = R * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, f = (i % per_row) * n;
    const auto dy = load<scalar_t, n>(grad + r * F + f);
    const auto g = load<scalar_t, n>(h + r * 2 * F + f);
    const auto u = load<scalar_t, n>(h + r * 2 * F + F + f);
    Chunk<scalar_t, n> dg, du;
#pragma unroll
    for (int j = 0; j < n; ++j) {
      const acc_t d = static_cast<acc_t>(dy.v[j]), gj = static_cast<acc_t>(g.v[j]),
                  uj = static_cast<acc_t>(u.v[j]);
      const acc_t s = sigmoid_(gj);
      du.v[j] = static_cast<scalar_t>(d * gj * s);
      dg.v[j] = static_cast<scalar_t>(d * uj * s * (acc_t(1) + gj * (acc_t(1) - s)));
    }
    store<scalar_t, n>(grad_h + r * 2 * F + f, dg);
    store<scalar_t, n>(grad_h + r * 2 * F + F + f, du);
  }
}

// Calls launch.template operator()<n>() with n = a 16-byte vector's elements
// when every row of width F starts 16-byte aligned in each pointer, else 1.
template <typename scalar_t, typename Launch>
void with_width(int64_t F, std::initializer_list<const void*> pointers, const Launch& launch) {
  if (rows_vectorisable<scalar_t>(F, pointers)) {
    launch.template operator()<Vec16<scalar_t>::size>();
  } else {
    launch.template operator()<1>();
  }
}

at::Tensor swiglu_cuda(const at::Tensor& h_in) {
  detail::check_swiglu_args(h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const int64_t R = h.size(0), F = h.size(1) / 2;
  at::Tensor out = at::empty({R, F}, h.options());
  if (R == 0 || F == 0) return out;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "moe_routing::swiglu", [&] {
    const scalar_t* in = h.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    with_width<scalar_t>(F, {in, y}, [&]<int n>() {
      swiglu_kernel<scalar_t, n><<<grid_for(R * (F / n), kThreads), kThreads, 0, stream>>>(in, y, R, F);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& h_in) {
  detail::check_swiglu_backward_args(grad_in, h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous(), grad = grad_in.contiguous();
  const int64_t R = h.size(0), F = h.size(1) / 2;
  at::Tensor grad_h = at::empty({R, 2 * F}, h.options());
  if (R == 0 || F == 0) return grad_h;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "moe_routing::swiglu_backward", [&] {
    const scalar_t* in = h.const_data_ptr<scalar_t>();
    const scalar_t* dy = grad.const_data_ptr<scalar_t>();
    scalar_t* dh = grad_h.mutable_data_ptr<scalar_t>();
    with_width<scalar_t>(F, {in, dy, dh}, [&]<int n>() {
      swiglu_backward_kernel<scalar_t, n>
          <<<grid_for(R * (F / n), kThreads), kThreads, 0, stream>>>(dy, in, dh, R, F);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_h;
}

}  // namespace
}  // namespace moe_routing::cuda

TORCH_LIBRARY_IMPL(moe_routing, CUDA, m) {
  m.impl("swiglu", &moe_routing::cuda::swiglu_cuda);
  m.impl("swiglu_backward", &moe_routing::cuda::swiglu_backward_cuda);
}
