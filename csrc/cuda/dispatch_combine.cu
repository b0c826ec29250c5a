// dispatch and combine on CUDA, and their backwards, in gather form: every
// output row is written by one thread block, no floating-point atomics.
//   owners:   row -> t * k + j, built by a scatter whose integer atomicCAS
//             also catches a row claimed twice (a device-side assert).
//   dispatch: several rows per block, 16-byte vectors; rows that no
//             assignment fills are zeroed in the same kernel.
//   combine / dispatch_backward: one block per token; its k rows are read
//             and accumulated in float32 (float64) in choice order.
//   combine_backward: one block per token reads grad_y once, writes the k
//             scaled rows and the k weight gradients (block-reduced dots);
//             unfilled rows are zeroed from the owners map.
#include <torch/library.h>

#include "../moe_routing.h"
#include "common.cuh"

namespace moe_routing::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 4;

__global__ void owners_kernel(const int64_t* __restrict__ slots, int64_t n, int64_t num_rows,
                              int64_t* __restrict__ owners) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = slots[i];
    if (r == -1) continue;
    CUDA_KERNEL_ASSERT(in_range(r, num_rows) && "moe_routing: slots out of range [-1, num_rows)");
    if (!in_range(r, num_rows)) continue;
    const unsigned long long previous = atomicCAS(reinterpret_cast<unsigned long long*>(&owners[r]),
                                                  static_cast<unsigned long long>(-1ll),
                                                  static_cast<unsigned long long>(i));
    CUDA_KERNEL_ASSERT(previous == static_cast<unsigned long long>(-1ll) &&
                       "moe_routing: slots must be unique (a row is assigned twice)");
  }
}

at::Tensor row_owners(const at::Tensor& slots, int64_t num_rows) {
  at::Tensor owners = at::full({num_rows}, -1, slots.options());
  const int64_t n = slots.numel();
  if (n > 0) {
    owners_kernel<<<grid_for(n, kThreads), kThreads, 0, current_stream()>>>(
        slots.const_data_ptr<int64_t>(), n, num_rows, owners.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return owners;
}

// Only the device assert on every slot: for outputs with no data (num_rows
// or H is 0), where no other kernel reads the slots, so that a bad slot is
// refused as on CPU.
__global__ void slots_in_range_kernel(const int64_t* __restrict__ slots, int64_t n, int64_t num_rows) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = slots[i];
    CUDA_KERNEL_ASSERT((r == -1 || in_range(r, num_rows)) && "moe_routing: slots out of range [-1, num_rows)");
  }
}

void assert_slots_in_range(const at::Tensor& slots, int64_t num_rows) {
  const int64_t n = slots.numel();
  if (n == 0) return;
  slots_in_range_kernel<<<grid_for(n, kThreads), kThreads, 0, current_stream()>>>(
      slots.const_data_ptr<int64_t>(), n, num_rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[r] = x[owner / k] or zeros; V = elements moved per access (a 16-byte vector or 1).
template <typename scalar_t, int V>
__global__ void dispatch_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ owners,
                                int64_t num_rows, int64_t H, int k, scalar_t* __restrict__ out) {
  using Chunk = std::conditional_t<V == 1, scalar_t, Vec16<scalar_t>>;
  const int64_t chunks = H / V;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock); r < num_rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    for (int64_t rr = r; rr < min(num_rows, r + kRowsPerBlock); ++rr) {
      const int64_t owner = owners[rr];
      Chunk* dst = reinterpret_cast<Chunk*>(out + rr * H);
      if (owner < 0) {
        Chunk zero;
        memset(&zero, 0, sizeof(Chunk));
        for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) dst[c] = zero;
      } else {
        const Chunk* src = reinterpret_cast<const Chunk*>(x + (owner / k) * H);
        for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) dst[c] = src[c];
      }
    }
  }
}

// y[t] = sum_j w[t, j] * rows[slots[t, j]] (w = 1 when weights is null).
template <typename scalar_t, typename weight_t, int V>
__global__ void gather_sum_kernel(const scalar_t* __restrict__ rows, int64_t num_rows,
                                  const int64_t* __restrict__ slots,
                                  const weight_t* __restrict__ weights, int64_t T, int k, int64_t H,
                                  scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using Chunk = std::conditional_t<V == 1, scalar_t, Vec16<scalar_t>>;
  const int64_t chunks = H / V;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      acc_t acc[V];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = 0;
      for (int j = 0; j < k; ++j) {
        const int64_t r = slots[t * k + j];
        if (r == -1) continue;
        CUDA_KERNEL_ASSERT(in_range(r, num_rows) && "moe_routing: slots out of range [-1, num_rows)");
        if (!in_range(r, num_rows)) continue;
        const acc_t w = weights ? static_cast<acc_t>(weights[t * k + j]) : acc_t(1);
        const Chunk chunk = reinterpret_cast<const Chunk*>(rows + r * H)[c];
        const scalar_t* values = reinterpret_cast<const scalar_t*>(&chunk);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += w * static_cast<acc_t>(values[v]);
      }
      Chunk result;
      scalar_t* values = reinterpret_cast<scalar_t*>(&result);
#pragma unroll
      for (int v = 0; v < V; ++v) values[v] = static_cast<scalar_t>(acc[v]);
      reinterpret_cast<Chunk*>(out + t * H)[c] = result;
    }
  }
}

// One block per token: grad_rows[slot] = w * gy[t], grad_w[t, j] = <gy[t], rows[slot]>.
// Thread i sums the elements of 16-byte groups i, i + blockDim.x, ... in
// order, whether it reads a group as one vector (V = L, aligned rows) or
// element by element (V = 1): the dot's rounding depends on H and the values
// alone, not on where the rows lie in memory.
template <typename scalar_t, typename weight_t, int V>
__global__ void combine_backward_kernel(const scalar_t* __restrict__ gy,
                                        const scalar_t* __restrict__ rows,
                                        const int64_t* __restrict__ slots,
                                        const weight_t* __restrict__ weights, int64_t T, int k,
                                        int64_t H, int64_t num_rows, scalar_t* __restrict__ grad_rows,
                                        weight_t* __restrict__ grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec16<scalar_t>::size;
  static_assert(V == 1 || V == L, "V is a whole 16-byte group or one element");
  __shared__ acc_t scratch[kWarp];
  const int64_t groups = (H + L - 1) / L;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int j = 0; j < k; ++j) {
      const int64_t r = slots[t * k + j];  // block-uniform
      // -1 (dropped), or out of range: row_owners has asserted on it already
      if (!in_range(r, num_rows)) {
        if (threadIdx.x == 0) grad_weights[t * k + j] = 0;
        continue;
      }
      const acc_t w = static_cast<acc_t>(weights[t * k + j]);
      acc_t dot = 0;
      for (int64_t c = threadIdx.x; c < groups; c += blockDim.x) {
        if constexpr (V == L) {
          using Chunk = Vec16<scalar_t>;
          const Chunk g = reinterpret_cast<const Chunk*>(gy + t * H)[c];
          const Chunk x = reinterpret_cast<const Chunk*>(rows + r * H)[c];
          const scalar_t* gv = reinterpret_cast<const scalar_t*>(&g);
          const scalar_t* xv = reinterpret_cast<const scalar_t*>(&x);
          Chunk scaled;
          scalar_t* sv = reinterpret_cast<scalar_t*>(&scaled);
#pragma unroll
          for (int v = 0; v < L; ++v) {
            dot += static_cast<acc_t>(gv[v]) * static_cast<acc_t>(xv[v]);
            sv[v] = static_cast<scalar_t>(w * static_cast<acc_t>(gv[v]));
          }
          reinterpret_cast<Chunk*>(grad_rows + r * H)[c] = scaled;
        } else {
          const int64_t end = c * L + L < H ? c * L + L : H;
          for (int64_t h = c * L; h < end; ++h) {
            const acc_t g = static_cast<acc_t>(gy[t * H + h]);
            dot += g * static_cast<acc_t>(rows[r * H + h]);
            grad_rows[r * H + h] = static_cast<scalar_t>(w * g);
          }
        }
      }
      dot = block_sum(dot, scratch);
      if (threadIdx.x == 0) grad_weights[t * k + j] = static_cast<weight_t>(dot);
    }
  }
}

template <typename scalar_t>
__global__ void zero_unowned_kernel(const int64_t* __restrict__ owners, int64_t num_rows, int64_t H,
                                    scalar_t* __restrict__ rows) {
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    if (owners[r] >= 0) continue;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) rows[r * H + h] = scalar_t(0);
  }
}

// Calls launch.template operator()<V>() with V = 16-byte vector width when
// every row is aligned, else 1.
template <typename scalar_t, typename Launch>
void with_vector(int64_t H, std::initializer_list<const void*> pointers, Launch&& launch) {
  if (rows_vectorisable<scalar_t>(H, pointers)) {
    launch.template operator()<Vec16<scalar_t>::size>();
  } else {
    launch.template operator()<1>();
  }
}

at::Tensor dispatch_cuda(const at::Tensor& x_in, const at::Tensor& slots_in, int64_t num_rows) {
  constexpr const char* op = "moe_routing::dispatch";
  detail::check_dispatch_args(x_in, slots_in, num_rows);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), slots = slots_in.contiguous();
  const int64_t H = x.size(1);
  at::Tensor out = at::empty({num_rows, H}, x.options());
  if (num_rows == 0 || H == 0) {
    assert_slots_in_range(slots, num_rows);
    return out;
  }
  const at::Tensor owners = row_owners(slots, num_rows);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    with_vector<scalar_t>(H, {x.const_data_ptr(), out.const_data_ptr()}, [&]<int V>() {
      dispatch_kernel<scalar_t, V><<<grid_for(num_rows, kRowsPerBlock), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), owners.const_data_ptr<int64_t>(), num_rows, H,
          static_cast<int>(slots.size(1)), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// Shared by combine (weights) and dispatch_backward (no weights).
template <typename scalar_t, typename weight_t>
void launch_gather_sum(const at::Tensor& rows, const at::Tensor& slots, const weight_t* weights,
                       at::Tensor& out) {
  const int64_t T = slots.size(0), H = rows.size(1);
  if (H == 0) assert_slots_in_range(slots, rows.size(0));
  if (T == 0 || H == 0) return;
  const cudaStream_t stream = current_stream();
  with_vector<scalar_t>(H, {rows.const_data_ptr(), out.const_data_ptr()}, [&]<int V>() {
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(kWarp, H / V)));
    gather_sum_kernel<scalar_t, weight_t, V><<<grid_for(T, 1), threads, 0, stream>>>(
        rows.const_data_ptr<scalar_t>(), rows.size(0), slots.const_data_ptr<int64_t>(), weights, T,
        static_cast<int>(slots.size(1)), H, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dispatch_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& slots_in) {
  constexpr const char* op = "moe_routing::dispatch_backward";
  detail::check_dispatch_backward_args(grad_out_in, slots_in);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor g = grad_out_in.contiguous(), slots = slots_in.contiguous();
  at::Tensor grad_x = at::empty({slots.size(0), g.size(1)}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), op, [&] {
    launch_gather_sum<scalar_t, float>(g, slots, nullptr, grad_x);
  });
  return grad_x;
}

at::Tensor combine_cuda(const at::Tensor& expert_out, const at::Tensor& slots_in,
                        const at::Tensor& weights_in) {
  constexpr const char* op = "moe_routing::combine";
  detail::check_combine_args(expert_out, slots_in, weights_in);
  const c10::cuda::CUDAGuard guard(expert_out.device());
  const at::Tensor rows = detail::rows_view(expert_out).contiguous();
  const at::Tensor slots = slots_in.contiguous(), weights = weights_in.contiguous();
  at::Tensor y = at::empty({slots.size(0), rows.size(1)}, rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), op, [&] {
    if (weights.scalar_type() == at::kDouble) {
      launch_gather_sum<scalar_t, double>(rows, slots, weights.const_data_ptr<double>(), y);
    } else {
      launch_gather_sum<scalar_t, float>(rows, slots, weights.const_data_ptr<float>(), y);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& grad_y_in,
                                                         const at::Tensor& expert_out,
                                                         const at::Tensor& slots_in,
                                                         const at::Tensor& weights_in) {
  constexpr const char* op = "moe_routing::combine_backward";
  detail::check_combine_backward_args(grad_y_in, expert_out, slots_in, weights_in);
  const c10::cuda::CUDAGuard guard(expert_out.device());
  const at::Tensor rows = detail::rows_view(expert_out).contiguous();
  const at::Tensor gy = grad_y_in.contiguous(), slots = slots_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t T = slots.size(0), k = slots.size(1), H = rows.size(1), R = rows.size(0);
  at::Tensor grad_expert_out = at::empty(expert_out.sizes(), expert_out.options());
  at::Tensor grad_rows = detail::rows_view(grad_expert_out);
  at::Tensor grad_weights = at::empty(weights.sizes(), weights.options());
  if (R == 0 && T == 0) return {grad_expert_out, grad_weights};
  if (H == 0) {  // no data (R may be huge): no owner map; every weight gradient is 0
    assert_slots_in_range(slots, R);
    grad_weights.zero_();
    return {grad_expert_out, grad_weights};
  }
  const at::Tensor owners = row_owners(slots, R);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), op, [&] {
    auto launch = [&]<typename weight_t>(weight_t*) {
      if (T > 0) {
        with_vector<scalar_t>(H, {gy.const_data_ptr(), rows.const_data_ptr(), grad_rows.const_data_ptr()},
                              [&]<int V>() {
          combine_backward_kernel<scalar_t, weight_t, V><<<grid_for(T, 1), kThreads, 0, stream>>>(
              gy.const_data_ptr<scalar_t>(), rows.const_data_ptr<scalar_t>(),
              slots.const_data_ptr<int64_t>(), weights.const_data_ptr<weight_t>(), T,
              static_cast<int>(k), H, R, grad_rows.mutable_data_ptr<scalar_t>(),
              grad_weights.mutable_data_ptr<weight_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      if (R > 0 && H > 0) {
        zero_unowned_kernel<scalar_t><<<grid_for(R, 1), kThreads, 0, stream>>>(
            owners.const_data_ptr<int64_t>(), R, H, grad_rows.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    if (weights.scalar_type() == at::kDouble) {
      launch(static_cast<double*>(nullptr));
    } else {
      launch(static_cast<float*>(nullptr));
    }
  });
  return {grad_expert_out, grad_weights};
}

}  // namespace
}  // namespace moe_routing::cuda

TORCH_LIBRARY_IMPL(moe_routing, CUDA, m) {
  m.impl("dispatch", &moe_routing::cuda::dispatch_cuda);
  m.impl("dispatch_backward", &moe_routing::cuda::dispatch_backward_cuda);
  m.impl("combine", &moe_routing::cuda::combine_cuda);
  m.impl("combine_backward", &moe_routing::cuda::combine_backward_cuda);
}
