// grouped_mm on CUDA without reading the row counts on the host: one grid
// covers every expert (blockIdx.z) and every row tile the largest expert
// could need; a block whose tile lies past its expert's rows exits at once.
// Shared-memory tiles of 16 x 16, float32 (float64) accumulation, one writer
// per output element. A correctness-first kernel: a tensor-core grouped GEMM
// is the next step (see README).
#include <torch/library.h>

#include "../moe_routing.h"
#include "common.cuh"

namespace moe_routing::cuda {
namespace {

constexpr int kTileSize = 16;

// C[rows of e] = A[rows of e] @ B_e, with B_e[i][n] at b + e*b_e + i*b_i + n*b_n.
template <typename scalar_t>
__global__ void rows_mm_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                               int64_t b_e, int64_t b_i, int64_t b_n,
                               const int64_t* __restrict__ offsets, int64_t K, int64_t N,
                               scalar_t* __restrict__ c) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t tile_a[kTileSize][kTileSize];
  __shared__ acc_t tile_b[kTileSize][kTileSize];
  const int64_t e = blockIdx.z;
  const int64_t first = offsets[e], last = offsets[e + 1];
  const int64_t row = first + static_cast<int64_t>(blockIdx.y) * kTileSize + threadIdx.y;
  if (first + static_cast<int64_t>(blockIdx.y) * kTileSize >= last) return;  // block-uniform
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileSize + threadIdx.x;
  const scalar_t* b_expert = b + e * b_e;
  acc_t acc = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kTileSize) {
    const int64_t ka = k0 + threadIdx.x, kb = k0 + threadIdx.y;
    tile_a[threadIdx.y][threadIdx.x] = (row < last && ka < K) ? static_cast<acc_t>(a[row * K + ka]) : acc_t(0);
    tile_b[threadIdx.y][threadIdx.x] =
        (kb < K && col < N) ? static_cast<acc_t>(b_expert[kb * b_i + col * b_n]) : acc_t(0);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kTileSize; ++i) acc += tile_a[threadIdx.y][i] * tile_b[i][threadIdx.x];
    __syncthreads();
  }
  if (row < last && col < N) c[row * N + col] = static_cast<scalar_t>(acc);
}

// grad_w[e] = X[rows of e]^T @ G[rows of e]: [H, F], summed over the expert's rows.
template <typename scalar_t>
__global__ void weight_grad_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                   const int64_t* __restrict__ offsets, int64_t H, int64_t F,
                                   scalar_t* __restrict__ grad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t tile_x[kTileSize][kTileSize];  // [row][h]
  __shared__ acc_t tile_g[kTileSize][kTileSize];  // [row][f]
  const int64_t e = blockIdx.z;
  const int64_t first = offsets[e], last = offsets[e + 1];
  const int64_t h = static_cast<int64_t>(blockIdx.y) * kTileSize + threadIdx.y;
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kTileSize + threadIdx.x;
  const int64_t h_load = static_cast<int64_t>(blockIdx.y) * kTileSize + threadIdx.x;
  acc_t acc = 0;
  for (int64_t r0 = first; r0 < last; r0 += kTileSize) {
    const int64_t r = r0 + threadIdx.y;
    tile_x[threadIdx.y][threadIdx.x] = (r < last && h_load < H) ? static_cast<acc_t>(x[r * H + h_load]) : acc_t(0);
    tile_g[threadIdx.y][threadIdx.x] = (r < last && f < F) ? static_cast<acc_t>(g[r * F + f]) : acc_t(0);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kTileSize; ++i) acc += tile_x[i][threadIdx.y] * tile_g[i][threadIdx.x];
    __syncthreads();
  }
  if (h < H && f < F) grad_w[(e * H + h) * F + f] = static_cast<scalar_t>(acc);
}

// Rows past the last expert's belong to none: zeros.
template <typename scalar_t>
__global__ void zero_tail_kernel(const int64_t* __restrict__ offsets, int64_t E, int64_t R, int64_t N,
                                 scalar_t* __restrict__ c) {
  const int64_t used = offsets[E];
  for (int64_t i = used * N + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < R * N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    c[i] = scalar_t(0);
  }
}

// offsets[0..E] on the device; a device-side assert guards counts that do not fit.
__global__ void offsets_kernel(const int64_t* __restrict__ counts, int64_t E, int64_t R,
                               int64_t* __restrict__ offsets) {
  if (threadIdx.x != 0) return;
  int64_t running = 0;
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    CUDA_KERNEL_ASSERT(counts[e] >= 0 && "moe_routing::grouped_mm: counts must be >= 0");
    // Compared before adding, so that no sum overflows.
    CUDA_KERNEL_ASSERT(counts[e] <= R - running &&
                       "moe_routing::grouped_mm: counts must sum to at most R (the rows of x)");
    // Clamped as well, so that no kernel reads past x even with asserts off.
    running += min(max(counts[e], int64_t(0)), R - running);
    offsets[e + 1] = running;
  }
}

at::Tensor device_offsets(const at::Tensor& counts, int64_t R) {
  at::Tensor offsets = at::empty({counts.numel() + 1}, counts.options());
  offsets_kernel<<<1, 1, 0, current_stream()>>>(
      counts.const_data_ptr<int64_t>(), counts.numel(), R, offsets.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return offsets;
}

// out = grouped (x @ B_e), B_e given by strides; zeros past the last group.
template <typename scalar_t>
void launch_rows_mm(const at::Tensor& x, const scalar_t* b, int64_t b_e, int64_t b_i, int64_t b_n,
                    const at::Tensor& offsets, int64_t E, int64_t N, at::Tensor& out) {
  const int64_t R = x.size(0), K = x.size(1);
  const cudaStream_t stream = current_stream();
  if (R > 0 && N > 0 && E > 0) {
    const dim3 grid(ceil_div(N, kTileSize), ceil_div(R, kTileSize), E);
    rows_mm_kernel<scalar_t><<<grid, dim3(kTileSize, kTileSize), 0, stream>>>(
        x.const_data_ptr<scalar_t>(), b, b_e, b_i, b_n, offsets.const_data_ptr<int64_t>(), K, N,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (R * N > 0) {
    zero_tail_kernel<scalar_t><<<grid_for(R * N, 256), 256, 0, stream>>>(
        offsets.const_data_ptr<int64_t>(), E, R, N, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor grouped_mm_cuda(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& counts) {
  constexpr const char* op = "moe_routing::grouped_mm";
  detail::check_grouped_mm_args(x_in, weight, counts);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t R = x.size(0), E = weight.size(0), F = weight.size(2);
  at::Tensor out = at::empty({R, F}, x.options());
  const at::Tensor offsets = device_offsets(counts.contiguous(), R);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    launch_rows_mm<scalar_t>(x, weight.const_data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
                             weight.stride(2), offsets, E, F, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cuda(const at::Tensor& grad_in,
                                                            const at::Tensor& x_in,
                                                            const at::Tensor& weight,
                                                            const at::Tensor& counts) {
  constexpr const char* op = "moe_routing::grouped_mm_backward";
  detail::check_grouped_mm_backward_args(grad_in, x_in, weight, counts);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const int64_t R = x.size(0), H = x.size(1), E = weight.size(0), F = weight.size(2);
  at::Tensor grad_x = at::empty({R, H}, x.options());
  at::Tensor grad_w = at::empty({E, H, F}, weight.options());
  const at::Tensor offsets = device_offsets(counts.contiguous(), R);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    // grad_x = grad @ W_e^T: W_e^T[i][n] = W_e[n][i].
    launch_rows_mm<scalar_t>(grad, weight.const_data_ptr<scalar_t>(), weight.stride(0),
                             weight.stride(2), weight.stride(1), offsets, E, H, grad_x);
    if (E > 0 && H > 0 && F > 0) {
      const dim3 grid(ceil_div(F, kTileSize), ceil_div(H, kTileSize), E);
      weight_grad_kernel<scalar_t><<<grid, dim3(kTileSize, kTileSize), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
          offsets.const_data_ptr<int64_t>(), H, F, grad_w.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_w};
}

}  // namespace
}  // namespace moe_routing::cuda

TORCH_LIBRARY_IMPL(moe_routing, CUDA, m) {
  m.impl("grouped_mm", &moe_routing::cuda::grouped_mm_cuda);
  m.impl("grouped_mm_backward", &moe_routing::cuda::grouped_mm_backward_cuda);
}
