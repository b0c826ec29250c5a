// grouped_mm on CUDA, with no host synchronisation and one launch per product.
// Three paths, picked on the host from shapes, dtype and the device alone:
//  * bfloat16 on sm90/sm100 with 16-byte-aligned rows: torch's CUTLASS grouped
//    GEMM (at::_grouped_mm, torch >= 2.9), which reads the group ends from an
//    int32 device tensor;
//  * float16/bfloat16 elsewhere (sm80+): our tensor-core kernel (WMMA 16x16x16,
//    64 x 64 block tiles, float32 accumulation, 16-byte global loads);
//  * float32/float64: a 16 x 16 shared-memory kernel in the type's own
//    precision (no TF32: the dropless layer's float32 must match the CPU).
// Row tiles are scheduled from the counts on the device: the grid covers
// ceil(R / tile) + E tiles, and a block maps its index to (expert, tile) by a
// binary search over the tile prefix sums, so no expert's rows are guessed on
// the host and few blocks exit idle. Every output element has one writer and a
// fixed summation order: bitwise reproducible.
#include <torch/library.h>
#include <torch/version.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdlib>
#include <cstring>

#include "../moe_routing.h"
#include "common.cuh"

// From torch 2.9: an older torch may carry a CUTLASS before 4.0, whose grouped
// GEMM could hang on a group of zero rows along the contraction dimension (an
// expert with no tokens, in the weight gradient's product).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define MOE_ROUTING_HAS_GROUPED_MM 1
#include <ATen/ops/_grouped_mm.h>
#else
#define MOE_ROUTING_HAS_GROUPED_MM 0
#endif

namespace moe_routing::cuda {
namespace {

// ----------------------------------------------------------------- schedule

// The packed layout's bookkeeping, all on the device: offsets [E + 1] (int64,
// exclusive cumsum of counts), ends [E] (int32 inclusive cumsum, CUTLASS's
// format) and tile_starts [E + 1] (exclusive cumsum of ceil(count / tile_rows)).
struct Schedule {
  at::Tensor offsets, ends, tile_starts;
};

__global__ void schedule_kernel(const int64_t* __restrict__ counts, int64_t E, int64_t R,
                                int64_t tile_rows, int64_t* __restrict__ offsets,
                                int32_t* __restrict__ ends, int64_t* __restrict__ tile_starts) {
  if (threadIdx.x != 0) return;
  int64_t running = 0, tiles = 0;
  offsets[0] = 0;
  tile_starts[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    CUDA_KERNEL_ASSERT(counts[e] >= 0 && "moe_routing::grouped_mm: counts must be >= 0");
    // Compared before adding, so that no sum overflows.
    CUDA_KERNEL_ASSERT(counts[e] <= R - running &&
                       "moe_routing::grouped_mm: counts must sum to at most R (the rows of x)");
    // Clamped as well, so that no kernel reads past x even with asserts off.
    const int64_t n = min(max(counts[e], int64_t(0)), R - running);
    running += n;
    tiles += (n + tile_rows - 1) / tile_rows;
    offsets[e + 1] = running;
    ends[e] = static_cast<int32_t>(min(running, int64_t(INT32_MAX)));  // only CUTLASS reads it: R < 2^31
    tile_starts[e + 1] = tiles;
  }
}

Schedule make_schedule(const at::Tensor& counts, int64_t R, int64_t tile_rows) {
  const int64_t E = counts.numel();
  Schedule s{at::empty({E + 1}, counts.options()), at::empty({E}, counts.options().dtype(at::kInt)),
             at::empty({E + 1}, counts.options())};
  const at::Tensor c = counts.contiguous();
  schedule_kernel<<<1, 1, 0, current_stream()>>>(
      c.const_data_ptr<int64_t>(), E, R, tile_rows, s.offsets.mutable_data_ptr<int64_t>(),
      s.ends.mutable_data_ptr<int32_t>(), s.tile_starts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s;
}

// The (expert, first row) of row tile `tile` of the packed layout; false when
// the tile lies past the last expert's rows (the grid is an upper bound).
__device__ __forceinline__ bool find_row_tile(const int64_t* __restrict__ tile_starts,
                                              const int64_t* __restrict__ offsets, int64_t E,
                                              int64_t tile, int64_t tile_rows, int64_t& e,
                                              int64_t& first_row) {
  if (tile >= tile_starts[E]) return false;
  int64_t lo = 0, hi = E - 1;  // the last e with tile_starts[e] <= tile
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_starts[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  // The last such e: tile_starts[e + 1] > tile, so e owns rows (experts
  // with none share their tile_start with the next one).
  e = lo;
  first_row = offsets[e] + (tile - tile_starts[e]) * tile_rows;
  return true;
}

// Upper bound on the row tiles of any packing of R rows over E experts.
inline int64_t max_row_tiles(int64_t R, int64_t E, int64_t tile_rows) {
  return ceil_div(R, tile_rows) + E;
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

template <typename scalar_t>
void zero_tail(const Schedule& s, int64_t E, int64_t R, int64_t N, at::Tensor& out) {
  if (R * N == 0) return;
  zero_tail_kernel<scalar_t><<<grid_for(R * N, 256), 256, 0, current_stream()>>>(
      s.offsets.const_data_ptr<int64_t>(), E, R, N, out.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ----------------------------------------------------------------- operands

// Element (i, j) of a matrix at ptr[i * si + j * sj]; `se` moves to expert e's
// matrix (0 when every expert shares the pointer and the rows are absolute).
template <typename T>
struct Operand {
  const T* ptr;
  int64_t si, sj, se;
};

// Which dimension each product groups: kRows, expert e owns rows
// offsets[e]..offsets[e+1]-1 of A and C (forward, grad_x); kDepth, expert e
// owns that range of the contraction dimension and C is [E, M, N] (grad_w).
enum class Grouping { kRows, kDepth };

// The block's share of one product: expert e, output rows m0..m_end-1 (m_end
// bounds the tile, it is not m0 + tile rows), contraction range
// k_begin..k_end-1.
struct TileSpan {
  int64_t e, m0, m_end, k_begin, k_end;
};

// This block's span for `tile_m`-row tiles; false when it has no tile (kRows
// grids are sized for the most row tiles any counts can need).
template <Grouping grouping>
__device__ __forceinline__ bool locate_tile(const int64_t* __restrict__ offsets,
                                            const int64_t* __restrict__ tile_starts, int64_t E,
                                            int64_t M, int64_t K, int tile_m, TileSpan& t) {
  if constexpr (grouping == Grouping::kRows) {
    if (!find_row_tile(tile_starts, offsets, E, blockIdx.x, tile_m, t.e, t.m0)) return false;
    t.m_end = offsets[t.e + 1];
    t.k_begin = 0;
    t.k_end = K;
  } else {
    t.e = blockIdx.z;
    t.m0 = static_cast<int64_t>(blockIdx.x) * tile_m;
    t.m_end = M;
    t.k_begin = offsets[t.e];
    t.k_end = offsets[t.e + 1];
  }
  return true;
}

// ----------------------------------------------------------------- float32 / float64

constexpr int kTileSize = 16;

// C = A @ B per expert in opmath precision, 16 x 16 tiles. Each tile is
// loaded along whichever operand dimension is contiguous (coalesced), and
// stored as tile_a[m][k], tile_b[k][n].
template <typename scalar_t, Grouping grouping>
__global__ void simt_grouped_mm_kernel(Operand<scalar_t> a, Operand<scalar_t> b, scalar_t* __restrict__ c,
                                       int64_t c_e, int64_t c_m, const int64_t* __restrict__ offsets,
                                       const int64_t* __restrict__ tile_starts, int64_t E, int64_t M,
                                       int64_t N, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t tile_a[kTileSize][kTileSize + 1];
  __shared__ acc_t tile_b[kTileSize][kTileSize + 1];
  TileSpan span;
  if (!locate_tile<grouping>(offsets, tile_starts, E, M, K, kTileSize, span)) return;
  const auto [e, m0, m_end, k_begin, k_end] = span;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileSize;
  const scalar_t* a_e = a.ptr + e * a.se;
  const scalar_t* b_e = b.ptr + e * b.se;
  const bool a_k_fast = a.sj == 1, b_n_fast = b.sj == 1;  // block-uniform
  acc_t acc = 0;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileSize) {
    {
      const int ml = a_k_fast ? ty : tx, kl = a_k_fast ? tx : ty;
      const int64_t m = m0 + ml, k = k0 + kl;
      tile_a[ml][kl] = (m < m_end && k < k_end) ? static_cast<acc_t>(a_e[m * a.si + k * a.sj]) : acc_t(0);
    }
    {
      const int kl = b_n_fast ? ty : tx, nl = b_n_fast ? tx : ty;
      const int64_t k = k0 + kl, n = n0 + nl;
      tile_b[kl][nl] = (k < k_end && n < N) ? static_cast<acc_t>(b_e[k * b.si + n * b.sj]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kTileSize; ++i) acc += tile_a[ty][i] * tile_b[i][tx];
    __syncthreads();
  }
  const int64_t m = m0 + ty, n = n0 + tx;
  if (m < m_end && n < N) c[e * c_e + m * c_m + n] = static_cast<scalar_t>(acc);
}

// ----------------------------------------------------------------- float16 / bfloat16 on tensor cores

namespace wmma = nvcuda::wmma;

template <typename scalar_t>
struct CudaType;
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

constexpr int kTcM = 64, kTcN = 64, kTcK = 32;  // block tile
constexpr int kTcThreads = 128;                 // 4 warps, 2 x 2, each 32 x 32
constexpr int kTcPad = 8;                       // keeps rows 16-byte aligned, staggers banks
constexpr int kVec = 8;                         // 2-byte elements per 16-byte load

union Pack16 {
  uint4 raw;
  uint16_t half[kVec];
};

// Copies the rows x cols tile at (i0, j0) of `src` (zeros outside i < i_end,
// j < j_end) into smem[rows][cols + kTcPad], with 16-byte global loads along
// whichever dimension is contiguous (when aligned and wholly inside).
template <int rows, int cols, typename T>
__device__ __forceinline__ void load_tile(T* __restrict__ smem, const T* __restrict__ src, int64_t si,
                                          int64_t sj, int64_t i0, int64_t i_end, int64_t j0, int64_t j_end) {
  constexpr int ld = cols + kTcPad;
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(smem);
  if (sj == 1 || si == 1) {
    const bool along_j = sj == 1;
    const int64_t stride = along_j ? si : sj;  // between vectors' lines
    constexpr int per_line_j = cols / kVec, per_line_i = rows / kVec;
    for (int v = threadIdx.x; v < rows * cols / kVec; v += kTcThreads) {
      // Along j: line r, elements c..c+7 of it; along i: line c, elements r..r+7.
      const int r = along_j ? v / per_line_j : (v % per_line_i) * kVec;
      const int c = along_j ? (v % per_line_j) * kVec : v / per_line_i;
      const int64_t i = i0 + r, j = j0 + c;
      const int64_t line = along_j ? i : j, first = along_j ? j : i;
      const int64_t line_end = along_j ? i_end : j_end, first_end = along_j ? j_end : i_end;
      const uint16_t* p = s + line * stride + first;
      Pack16 pack;
      if (line < line_end && first + kVec <= first_end && aligned16(p)) {
        pack.raw = *reinterpret_cast<const uint4*>(p);
      } else {
#pragma unroll
        for (int u = 0; u < kVec; ++u) pack.half[u] = (line < line_end && first + u < first_end) ? p[u] : 0;
      }
      if (along_j) {
        *reinterpret_cast<uint4*>(d + r * ld + c) = pack.raw;  // ld * 2 bytes is a multiple of 16
      } else {
#pragma unroll
        for (int u = 0; u < kVec; ++u) d[(r + u) * ld + c] = pack.half[u];
      }
    }
  } else {
    for (int v = threadIdx.x; v < rows * cols; v += kTcThreads) {
      const int r = v / cols, c = v % cols;
      const int64_t i = i0 + r, j = j0 + c;
      d[r * ld + c] = (i < i_end && j < j_end) ? s[i * si + j * sj] : 0;
    }
  }
}

template <typename scalar_t, Grouping grouping>
__global__ void __launch_bounds__(kTcThreads) tc_grouped_mm_kernel(
    Operand<scalar_t> a, Operand<scalar_t> b, scalar_t* __restrict__ c, int64_t c_e, int64_t c_m,
    const int64_t* __restrict__ offsets, const int64_t* __restrict__ tile_starts, int64_t E, int64_t M,
    int64_t N, int64_t K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using T = typename CudaType<scalar_t>::type;
  __shared__ __align__(128) T tile_a[kTcM * (kTcK + kTcPad)];
  __shared__ __align__(128) T tile_b[kTcK * (kTcN + kTcPad)];
  __shared__ __align__(128) float tile_c[kTcM * (kTcN + 4)];
  TileSpan span;
  if (!locate_tile<grouping>(offsets, tile_starts, E, M, K, kTcM, span)) return;
  const auto [e, m0, m_end, k_begin, k_end] = span;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTcN;
  const T* a_e = reinterpret_cast<const T*>(a.ptr + e * a.se);
  const T* b_e = reinterpret_cast<const T*>(b.ptr + e * b.se);
  const int warp = threadIdx.x / kWarp, wm = warp / 2, wn = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTcK) {
    load_tile<kTcM, kTcK>(tile_a, a_e, a.si, a.sj, m0, m_end, k0, k_end);
    load_tile<kTcK, kTcN>(tile_b, b_e, b.si, b.sj, k0, k_end, n0, N);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], tile_a + (wm * 32 + i * 16) * (kTcK + kTcPad) + kk, kTcK + kTcPad);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], tile_b + kk * (kTcN + kTcPad) + wn * 32 + j * 16, kTcN + kTcPad);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(tile_c + (wm * 32 + i * 16) * (kTcN + 4) + wn * 32 + j * 16, acc[i][j],
                              kTcN + 4, wmma::mem_row_major);
  __syncthreads();
  // Rows of 8 outputs, rounded once from float32, stored 16 bytes at a time.
  T* c_e_ptr = reinterpret_cast<T*>(c) + e * c_e;
  for (int v = threadIdx.x; v < kTcM * kTcN / kVec; v += kTcThreads) {
    const int r = v / (kTcN / kVec), col = (v % (kTcN / kVec)) * kVec;
    const int64_t m = m0 + r, n = n0 + col;
    if (m >= m_end) continue;
    Pack16 pack;
#pragma unroll
    for (int u = 0; u < kVec; ++u) {
      const scalar_t value(tile_c[r * (kTcN + 4) + col + u]);  // rounds to nearest even
      memcpy(&pack.half[u], &value, sizeof(value));
    }
    uint16_t* p = reinterpret_cast<uint16_t*>(c_e_ptr + m * c_m + n);
    if (n + kVec <= N && aligned16(p)) {
      *reinterpret_cast<uint4*>(p) = pack.raw;
    } else {
#pragma unroll
      for (int u = 0; u < kVec; ++u)
        if (n + u < N) p[u] = pack.half[u];
    }
  }
#else
  CUDA_KERNEL_ASSERT(false && "moe_routing::grouped_mm: the tensor-core kernel needs sm80 or newer");
#endif
}

// ----------------------------------------------------------------- path choice

// MOE_ROUTING_GROUPED_MM=native skips torch's CUTLASS kernel (to compare the
// two paths, or to work around one); read on every call so tests can switch.
bool cutlass_allowed_by_env() {
  const char* v = std::getenv("MOE_ROUTING_GROUPED_MM");
  return v == nullptr || std::strcmp(v, "native") != 0;
}

// The device's compute capability major (a cheap driver query, no sync).
int compute_major(const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  return major;
}

bool tensor_cores_available(const at::Tensor& t) { return compute_major(t) >= 8; }

#if MOE_ROUTING_HAS_GROUPED_MM
// The layout torch's grouped GEMM takes: one of the last two dimensions
// contiguous, the other's stride (and a 3-D batch stride) a multiple of 16
// bytes, and a 16-byte-aligned start.
bool cutlass_layout(const at::Tensor& t) {
  constexpr int64_t align = 8;  // bfloat16 elements in 16 bytes
  const int d = t.dim();
  if (!aligned16(t.const_data_ptr())) return false;
  if (d == 3 && t.stride(0) % align != 0) return false;
  const int64_t rows = t.size(d - 2), cols = t.size(d - 1);
  const int64_t s_row = t.stride(d - 2), s_col = t.stride(d - 1);
  if (s_col == 1 && s_row >= std::max<int64_t>(1, cols)) return s_row % align == 0;
  if (s_row == 1 && s_col >= std::max<int64_t>(1, rows)) return s_col % align == 0;
  return false;
}

// Whether at::_grouped_mm runs its CUTLASS kernel (its other path reads the
// offsets on the host) and accepts the operands as they are: bfloat16, sm90
// (sm100 from torch 2.10), fewer than 1024 groups (its limit), K and N
// multiples of 8, and every 2-D operand in the layout cutlass_layout checks
// (a contiguous tensor can still fail it: a misaligned start, or one row with
// any stride).
bool cutlass_applies(const at::Tensor& x, int64_t E, int64_t K, int64_t N,
                     std::initializer_list<at::Tensor> operands) {
  if (!cutlass_allowed_by_env() || x.scalar_type() != at::kBFloat16) return false;
  if (x.size(0) >= std::numeric_limits<int32_t>::max()) return false;  // int32 group ends
  if (E <= 0 || E >= 1024) return false;
  for (const at::Tensor& t : operands) {
    if (!cutlass_layout(t)) return false;
  }
  const int major = compute_major(x);
  const bool arch = major == 9 || (major == 10 && (TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 10));
  return arch && K > 0 && N > 0 && K % 8 == 0 && N % 8 == 0;
}
#endif

// ----------------------------------------------------------------- launches

// C = A @ B grouped by `grouping` (see Grouping), on the tensor cores for
// float16/bfloat16 (sm80+) and in the type's precision otherwise.
template <typename scalar_t, Grouping grouping>
void launch_grouped(const Operand<scalar_t>& a, const Operand<scalar_t>& b, at::Tensor& c, int64_t c_e,
                    int64_t c_m, const at::Tensor& counts, int64_t R, int64_t E, int64_t M, int64_t N,
                    int64_t K) {
  constexpr const char* op = "moe_routing::grouped_mm";
  constexpr bool reduced = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;
  const bool tensor_cores = reduced && tensor_cores_available(c);
  const int64_t tile_m = tensor_cores ? kTcM : kTileSize, tile_n = tensor_cores ? kTcN : kTileSize;
  const Schedule s = make_schedule(counts, R, tile_m);
  // Row tiles on x (up to 2^31 - 1), column tiles on y and experts on z (65535).
  const int64_t row_tiles = grouping == Grouping::kRows ? max_row_tiles(R, E, tile_m) : ceil_div(M, tile_m);
  const int64_t col_tiles = ceil_div(N, tile_n), experts = grouping == Grouping::kRows ? 1 : E;
  TORCH_CHECK(row_tiles <= std::numeric_limits<int32_t>::max() && col_tiles < 65536 && experts < 65536, op,
              ": on CUDA needs N < ", 65536 * tile_n, " and E < 65536, got N=", N, ", E=", E);
  if (row_tiles > 0 && col_tiles > 0 && experts > 0) {
    const dim3 grid(row_tiles, col_tiles, experts);
    const cudaStream_t stream = current_stream();
    const int64_t* offsets = s.offsets.const_data_ptr<int64_t>();
    const int64_t* tile_starts = s.tile_starts.const_data_ptr<int64_t>();
    scalar_t* out = c.mutable_data_ptr<scalar_t>();
    if (tensor_cores) {
      if constexpr (reduced) {
        tc_grouped_mm_kernel<scalar_t, grouping><<<grid, kTcThreads, 0, stream>>>(
            a, b, out, c_e, c_m, offsets, tile_starts, E, M, N, K);
      }
    } else {
      simt_grouped_mm_kernel<scalar_t, grouping><<<grid, dim3(kTileSize, kTileSize), 0, stream>>>(
          a, b, out, c_e, c_m, offsets, tile_starts, E, M, N, K);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if constexpr (grouping == Grouping::kRows) zero_tail<scalar_t>(s, E, R, N, c);
}

// out [R, N] = grouped (x [R, K] @ B_e), B_e [K, N] given by strides.
template <typename scalar_t>
void rows_product(const at::Tensor& x, const scalar_t* b, int64_t b_e, int64_t b_k, int64_t b_n,
                  const at::Tensor& counts, int64_t E, int64_t N, at::Tensor& out) {
  const int64_t R = x.size(0), K = x.size(1);
  launch_grouped<scalar_t, Grouping::kRows>({x.const_data_ptr<scalar_t>(), K, 1, 0}, {b, b_k, b_n, b_e}, out,
                                            0, N, counts, R, E, R, N, K);
}

#if MOE_ROUTING_HAS_GROUPED_MM
// at::_grouped_mm with the packed layout's int32 group ends; rows past the
// last group are zeroed (CUTLASS leaves them unwritten).
at::Tensor cutlass_rows_product(const at::Tensor& x, const at::Tensor& b, const Schedule& s) {
  const int64_t R = x.size(0), E = b.size(0), N = b.size(2);
  // clone, not contiguous(): a contiguous weight may still start misaligned.
  at::Tensor out = at::_grouped_mm(x, cutlass_layout(b) ? b : b.clone(at::MemoryFormat::Contiguous), s.ends);
  zero_tail<at::BFloat16>(s, E, R, N, out);
  return out;
}

// Experts that got no rows: their weight gradient is zero (some CUTLASS
// builds leave it unwritten, so it is written here).
__global__ void zero_empty_experts_kernel(const int64_t* __restrict__ counts, int64_t E, int64_t per_expert,
                                          at::BFloat16* __restrict__ grad_w) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < E * per_expert;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (counts[i / per_expert] <= 0) grad_w[i] = at::BFloat16(0.0f);
  }
}
#endif

// ----------------------------------------------------------------- ops

// A contiguous copy that starts 16-byte aligned (the caching allocator
// aligns every block), so that which kernel runs, and so the bits of the
// result, depend on shapes and dtype only, never on where the input sits.
at::Tensor contiguous_aligned(const at::Tensor& t) {
  if (t.is_contiguous() && aligned16(t.const_data_ptr())) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

at::Tensor grouped_mm_cuda(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& counts) {
  constexpr const char* op = "moe_routing::grouped_mm";
  detail::check_grouped_mm_args(x_in, weight, counts);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = contiguous_aligned(x_in);
  const int64_t R = x.size(0), K = x.size(1), E = weight.size(0), N = weight.size(2);
#if MOE_ROUTING_HAS_GROUPED_MM
  if (R > 0 && cutlass_applies(x, E, K, N, {x})) {
    return cutlass_rows_product(x, weight, make_schedule(counts, R, 1));
  }
#endif
  at::Tensor out = at::empty({R, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    rows_product<scalar_t>(x, weight.const_data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
                           weight.stride(2), counts, E, N, out);
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
  const at::Tensor x = contiguous_aligned(x_in), grad = contiguous_aligned(grad_in);
  const int64_t R = x.size(0), H = x.size(1), E = weight.size(0), F = weight.size(2);
#if MOE_ROUTING_HAS_GROUPED_MM
  if (R > 0 && cutlass_applies(x, E, H, F, {grad, x.t()})) {
    // grad_x = grad @ W_e^T per expert; grad_w[e] = x_e^T @ grad_e (groups
    // along the contraction dimension).
    const Schedule s = make_schedule(counts, R, 1);
    at::Tensor grad_x = cutlass_rows_product(grad, weight.transpose(1, 2), s);
    at::Tensor grad_w = at::_grouped_mm(x.t(), grad, s.ends);
    const at::Tensor c = counts.contiguous();
    zero_empty_experts_kernel<<<grid_for(E * H * F, 256), 256, 0, current_stream()>>>(
        c.const_data_ptr<int64_t>(), E, H * F, grad_w.mutable_data_ptr<at::BFloat16>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {grad_x, grad_w};
  }
#endif
  at::Tensor grad_x = at::empty({R, H}, x.options());
  at::Tensor grad_w = at::empty({E, H, F}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    // grad_x = grad @ W_e^T: W_e^T[i][n] = W_e[n][i].
    rows_product<scalar_t>(grad, weight.const_data_ptr<scalar_t>(), weight.stride(0), weight.stride(2),
                           weight.stride(1), counts, E, H, grad_x);
    // grad_w[e] [H, F] = x_e^T @ grad_e: A(h, r) = x[r, h], B(r, f) = grad[r, f].
    launch_grouped<scalar_t, Grouping::kDepth>({x.const_data_ptr<scalar_t>(), 1, H, 0},
                                               {grad.const_data_ptr<scalar_t>(), F, 1, 0}, grad_w, H * F, F,
                                               counts, R, E, H, F, R);
  });
  return {grad_x, grad_w};
}

}  // namespace
}  // namespace moe_routing::cuda

TORCH_LIBRARY_IMPL(moe_routing, CUDA, m) {
  m.impl("grouped_mm", &moe_routing::cuda::grouped_mm_cuda);
  m.impl("grouped_mm_backward", &moe_routing::cuda::grouped_mm_backward_cuda);
}
