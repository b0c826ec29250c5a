// Helpers shared by the CUDA kernels: deterministic warp reductions (xor
// butterflies: every lane ends with the same value, summed in a fixed order),
// 16-byte vectors, and launch plumbing (device guard, current stream).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace moe_routing::cuda {

constexpr int kWarp = 32;

// Kernels run on the caller's current stream.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Reduction over groups of `width` consecutive lanes (width a power of two <= 32).
template <int width, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

template <int width, typename T>
__device__ __forceinline__ T group_max(T v) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset, width));
  return v;
}

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

// Sum over a whole block in a fixed order: warps reduce by butterflies, then
// warp 0 adds the warps' results in warp order. Every thread gets the sum.
template <typename T>
__device__ T block_sum(T v, T* scratch /* >= 32 entries */) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  v = group_sum<kWarp>(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// A 16-byte vector of scalar_t, for loads and stores of whole rows.
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int size = 16 / sizeof(scalar_t);
  scalar_t v[size];
};

__host__ __device__ inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Rows of H elements can move as 16-byte vectors when every row starts on a
// 16-byte boundary.
template <typename scalar_t>
bool rows_vectorisable(int64_t H, std::initializer_list<const void*> pointers) {
  if ((H * sizeof(scalar_t)) % 16 != 0) return false;
  for (const void* p : pointers) {
    if (!aligned16(p)) return false;
  }
  return true;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether index i lies in [0, end). Kernels assert it (with the op's message)
// and then also skip an index that fails it, so that a build with the device
// asserts compiled out (TORCH_DISABLE_GPU_ASSERTS) never reads or writes out
// of bounds.
__device__ __forceinline__ bool in_range(int64_t i, int64_t end) { return i >= 0 && i < end; }

// Grid size for n independent items of `per_block` each, capped so that
// grid-stride loops cover the rest.
inline unsigned grid_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, per_block), 1 << 30)));
}

}  // namespace moe_routing::cuda
