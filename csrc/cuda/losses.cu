// Auxiliary losses on CUDA. Counts use integer atomics (exact); every float
// sum runs per fixed block of tokens and then over blocks in order in a
// single-block kernel, so the losses are bitwise reproducible.
#include <torch/library.h>

#include "../moe_routing.h"
#include "common.cuh"

namespace moe_routing::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlockTokens = 256;

// counts[s * E + e] += assignments; valid[s] += valid tokens.
__global__ void count_kernel(const int64_t* __restrict__ experts, const bool* __restrict__ mask,
                             int64_t T, int k, int E, int64_t seq_len,
                             unsigned long long* __restrict__ counts,
                             unsigned long long* __restrict__ valid) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (mask && !mask[t]) continue;
    const int64_t s = t / seq_len;
    atomicAdd(&valid[s], 1ull);
    for (int j = 0; j < k; ++j) {
      const int64_t e = experts[t * k + j];
      CUDA_KERNEL_ASSERT(in_range(e, E) && "moe_routing::load_balancing_loss: expert out of range");
      if (!in_range(e, E)) continue;
      atomicAdd(&counts[s * E + e], 1ull);
    }
  }
}

// coef[s * E + e] = E * f_se / (N_s * sequences counted): d loss / d scores[t, e] for t in s.
template <typename acc_t>
__global__ void coefficient_kernel(const unsigned long long* __restrict__ counts,
                                   const unsigned long long* __restrict__ valid, int64_t sequences,
                                   int E, int k, acc_t* __restrict__ coef) {
  __shared__ int64_t counted;
  if (threadIdx.x == 0) {
    int64_t n = 0;
    for (int64_t s = 0; s < sequences; ++s) n += valid[s] > 0;
    counted = n;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < sequences * E; i += blockDim.x) {
    const int64_t s = i / E;
    const acc_t n = static_cast<acc_t>(valid[s]);
    coef[i] = valid[s] == 0 ? acc_t(0)
                            : static_cast<acc_t>(E) * (static_cast<acc_t>(counts[i]) / (n * k)) / n /
                                  static_cast<acc_t>(counted);
  }
}

// partial[b * E + e] = sum of scores[t, e] over the valid tokens of block b
// (blocks never straddle sequences).
template <typename acc_t>
__global__ void score_sum_kernel(const acc_t* __restrict__ scores, const bool* __restrict__ mask,
                                 int64_t T, int E, int64_t seq_len, int64_t blocks_per_seq,
                                 acc_t* __restrict__ partial) {
  const int64_t b = blockIdx.x, s = b / blocks_per_seq;
  const int64_t first = s * seq_len + (b % blocks_per_seq) * kBlockTokens;
  const int64_t last = min(min(T, (s + 1) * seq_len), first + kBlockTokens);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    acc_t sum = 0;
    for (int64_t t = first; t < last; ++t) {
      if (!mask || mask[t]) sum += scores[t * E + e];
    }
    partial[b * E + e] = sum;
  }
}

template <typename acc_t>
__global__ void loss_kernel(const acc_t* __restrict__ partial, const acc_t* __restrict__ coef,
                            int64_t sequences, int64_t blocks_per_seq, int E,
                            acc_t* __restrict__ loss) {
  __shared__ acc_t scratch[kWarp];
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < sequences * E; i += blockDim.x) {
    const int64_t s = i / E, e = i % E;
    acc_t score_sum = 0;
    for (int64_t b = 0; b < blocks_per_seq; ++b) score_sum += partial[(s * blocks_per_seq + b) * E + e];
    sum += coef[i] * score_sum;
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) *loss = sum;
}

template <typename acc_t>
__global__ void load_balancing_grad_kernel(const acc_t* __restrict__ grad,
                                           const acc_t* __restrict__ coef,
                                           const bool* __restrict__ mask, int64_t T, int E,
                                           int64_t seq_len, acc_t* __restrict__ out) {
  const acc_t g = *grad;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < T * E;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / E;
    out[i] = (!mask || mask[t]) ? g * coef[(t / seq_len) * E + i % E] : acc_t(0);
  }
}

struct Sequences {
  int64_t count, length, blocks;
};

Sequences sequences_of(int64_t T, std::optional<int64_t> seq_len) {
  const int64_t L = seq_len.value_or(std::max<int64_t>(T, 1));
  // L divides T, so it exceeds T only when T = 0 (then L may be huge).
  return {std::max<int64_t>(T / L, 1), L, ceil_div(std::min(L, T), kBlockTokens)};
}

// Counts and per-(sequence, expert) gradient coefficients.
template <typename acc_t>
at::Tensor coefficients(const at::Tensor& experts, const bool* mask, int64_t E,
                        const Sequences& seq, const at::TensorOptions& opts) {
  const cudaStream_t stream = current_stream();
  const auto long_opts = experts.options();
  at::Tensor counts = at::zeros({seq.count * E}, long_opts);
  at::Tensor valid = at::zeros({seq.count}, long_opts);
  const int64_t T = experts.size(0);
  if (T > 0) {
    count_kernel<<<grid_for(T, kThreads), kThreads, 0, stream>>>(
        experts.const_data_ptr<int64_t>(), mask, T, static_cast<int>(experts.size(1)),
        static_cast<int>(E), seq.length,
        reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()),
        reinterpret_cast<unsigned long long*>(valid.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor coef = at::empty({seq.count * E}, opts);
  coefficient_kernel<acc_t><<<1, kThreads, 0, stream>>>(
      reinterpret_cast<const unsigned long long*>(counts.const_data_ptr<int64_t>()),
      reinterpret_cast<const unsigned long long*>(valid.const_data_ptr<int64_t>()), seq.count,
      static_cast<int>(E), static_cast<int>(experts.size(1)), coef.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return coef;
}

at::Tensor load_balancing_loss_cuda(const at::Tensor& scores_in, const at::Tensor& experts_in,
                                    const std::optional<at::Tensor>& mask,
                                    std::optional<int64_t> seq_len) {
  constexpr const char* op = "moe_routing::load_balancing_loss";
  detail::check_load_balancing_args(scores_in, experts_in, mask, detail::to_symint(seq_len));
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous(), experts = experts_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = detail::mask_data(mask, mask_holder);
  const int64_t T = scores.size(0), E = scores.size(1);
  const Sequences seq = sequences_of(T, seq_len);
  at::Tensor loss = at::empty({}, scores.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), op, [&] {
    const at::Tensor coef = coefficients<scalar_t>(experts, m, E, seq, scores.options());
    at::Tensor partial = at::zeros({seq.count * seq.blocks * E}, scores.options());
    if (T > 0) {
      score_sum_kernel<scalar_t><<<seq.count * seq.blocks, kThreads, 0, stream>>>(
          scores.const_data_ptr<scalar_t>(), m, T, static_cast<int>(E), seq.length, seq.blocks,
          partial.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    loss_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        partial.const_data_ptr<scalar_t>(), coef.const_data_ptr<scalar_t>(), seq.count, seq.blocks,
        static_cast<int>(E), loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

at::Tensor load_balancing_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& scores_in,
                                             const at::Tensor& experts_in,
                                             const std::optional<at::Tensor>& mask,
                                             std::optional<int64_t> seq_len) {
  constexpr const char* op = "moe_routing::load_balancing_loss_backward";
  detail::check_load_balancing_backward_args(grad, scores_in, experts_in, mask,
                                             detail::to_symint(seq_len));
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor experts = experts_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = detail::mask_data(mask, mask_holder);
  const int64_t T = scores_in.size(0), E = scores_in.size(1);
  const Sequences seq = sequences_of(T, seq_len);
  at::Tensor out = at::empty({T, E}, scores_in.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(scores_in.scalar_type(), op, [&] {
    const at::Tensor coef = coefficients<scalar_t>(experts, m, E, seq, scores_in.options());
    const at::Tensor g = grad.to(scores_in.scalar_type()).contiguous();
    if (T * E > 0) {
      load_balancing_grad_kernel<scalar_t><<<grid_for(T * E, kThreads), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), coef.const_data_ptr<scalar_t>(), m, T, static_cast<int>(E),
          seq.length, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// max that keeps a NaN, as the CPU's at::vec::maximum does (CUDA's max drops
// it): a row holding a NaN gives a NaN loss on both devices, even beside +-inf.
template <typename T>
__device__ __forceinline__ T max_keeping_nan(T a, T b) { return (a != a || a > b) ? a : b; }

// One warp per token: logsumexp of its row.
template <typename scalar_t, typename acc_t>
__device__ acc_t warp_logsumexp(const scalar_t* row, int E, int lane) {
  acc_t m = -INFINITY;
  for (int e = lane; e < E; e += kWarp) m = max_keeping_nan(m, static_cast<acc_t>(row[e]));
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    m = max_keeping_nan(m, __shfl_xor_sync(0xffffffffu, m, offset));
  }
  if (isinf(m)) return m;
  acc_t sum = 0;
  for (int e = lane; e < E; e += kWarp) sum += exp_(static_cast<acc_t>(row[e]) - m);
  return m + log_(group_sum<kWarp>(sum));
}

// partial[b] = sum of lse^2 over the valid tokens of block b, count[b] = valid tokens.
template <typename scalar_t, typename acc_t>
__global__ void z_partial_kernel(const scalar_t* __restrict__ logits, const bool* __restrict__ mask,
                                 int64_t T, int E, acc_t* __restrict__ partial,
                                 int64_t* __restrict__ count) {
  __shared__ acc_t warp_sums[kThreads / kWarp];
  __shared__ int64_t warp_counts[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t first = blockIdx.x * static_cast<int64_t>(kBlockTokens);
  acc_t sum = 0;
  int64_t n = 0;
  for (int64_t t = first + warp; t < min(T, first + kBlockTokens); t += kThreads / kWarp) {
    if (mask && !mask[t]) continue;
    const acc_t lse = warp_logsumexp<scalar_t, acc_t>(logits + t * E, E, lane);
    sum += lse * lse;
    ++n;
  }
  if (lane == 0) {
    warp_sums[warp] = sum;
    warp_counts[warp] = n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
    int64_t valid = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) {
      total += warp_sums[w];
      valid += warp_counts[w];
    }
    partial[blockIdx.x] = total;
    count[blockIdx.x] = valid;
  }
}

template <typename acc_t>
__global__ void z_total_kernel(const acc_t* __restrict__ partial, const int64_t* __restrict__ count,
                               int64_t blocks, acc_t* __restrict__ loss, acc_t* __restrict__ inv_n) {
  if (threadIdx.x != 0) return;
  acc_t total = 0;
  int64_t n = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    total += partial[b];
    n += count[b];
  }
  if (loss) *loss = n > 0 ? total / static_cast<acc_t>(n) : acc_t(0);
  if (inv_n) *inv_n = acc_t(1) / static_cast<acc_t>(n > 0 ? n : 1);
}

template <typename scalar_t, typename acc_t>
__global__ void z_grad_kernel(const scalar_t* __restrict__ logits, const bool* __restrict__ mask,
                              const acc_t* __restrict__ grad, const acc_t* __restrict__ inv_n,
                              int64_t T, int E, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const acc_t g = *grad * *inv_n;
  for (int64_t t = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp) {
    const scalar_t* row = logits + t * E;
    if (mask && !mask[t]) {
      for (int e = lane; e < E; e += kWarp) out[t * E + e] = scalar_t(0);
      continue;
    }
    const acc_t lse = warp_logsumexp<scalar_t, acc_t>(row, E, lane);
    for (int e = lane; e < E; e += kWarp) {
      out[t * E + e] = static_cast<scalar_t>(2 * g * lse * exp_(static_cast<acc_t>(row[e]) - lse));
    }
  }
}

// Partial sums and valid counts per block, then the total in a fixed order.
template <typename scalar_t, typename acc_t>
void z_reduce(const at::Tensor& logits, const bool* m, acc_t* loss, acc_t* inv_n) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const int64_t blocks = std::max<int64_t>(1, ceil_div(T, kBlockTokens));
  const cudaStream_t stream = current_stream();
  at::Tensor partial = at::zeros({blocks}, logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  at::Tensor count = at::zeros({blocks}, logits.options().dtype(at::kLong));
  if (T > 0) {
    z_partial_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), m, T, static_cast<int>(E),
        partial.mutable_data_ptr<acc_t>(), count.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  z_total_kernel<acc_t><<<1, 1, 0, stream>>>(partial.const_data_ptr<acc_t>(),
                                             count.const_data_ptr<int64_t>(), blocks, loss, inv_n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor z_loss_cuda(const at::Tensor& logits_in, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "moe_routing::z_loss";
  detail::check_z_loss_args(op, logits_in, mask);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = detail::mask_data(mask, mask_holder);
  at::Tensor loss = at::empty({}, logits.options().dtype(detail::router_dtype(logits.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    z_reduce<scalar_t, acc_t>(logits, m, loss.mutable_data_ptr<acc_t>(), nullptr);
  });
  return loss;
}

at::Tensor z_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& logits_in,
                                const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "moe_routing::z_loss_backward";
  detail::check_z_loss_backward_args(grad, logits_in, mask);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor mask_holder;
  const bool* m = detail::mask_data(mask, mask_holder);
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor out = at::empty({T, E}, logits.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor inv_n = at::empty({}, acc_opts);
    z_reduce<scalar_t, acc_t>(logits, m, nullptr, inv_n.mutable_data_ptr<acc_t>());
    const at::Tensor g = grad.to(acc_opts.dtype()).contiguous();
    if (T > 0) {
      z_grad_kernel<scalar_t, acc_t><<<grid_for(T, kThreads / kWarp), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), m, g.const_data_ptr<acc_t>(),
          inv_n.const_data_ptr<acc_t>(), T, static_cast<int>(E), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace
}  // namespace moe_routing::cuda

TORCH_LIBRARY_IMPL(moe_routing, CUDA, m) {
  m.impl("load_balancing_loss", &moe_routing::cuda::load_balancing_loss_cuda);
  m.impl("load_balancing_loss_backward", &moe_routing::cuda::load_balancing_loss_backward_cuda);
  m.impl("z_loss", &moe_routing::cuda::z_loss_cuda);
  m.impl("z_loss_backward", &moe_routing::cuda::z_loss_backward_cuda);
}
