// Vectorised row primitives for the CPU kernels: every loop over H (or E)
// goes through these, so each kernel is a loop over tokens around them.
// Reduced-precision rows (float16, bfloat16) are widened to float32 lanes;
// accumulation is always in acc_t (float32, or float64 for float64 data).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Parallel.h>

#include <type_traits>

namespace moe_routing::cpu {

template <typename scalar_t>
constexpr bool is_reduced_v = std::is_same_v<scalar_t, at::BFloat16> ||
                              std::is_same_v<scalar_t, at::Half>;

// acc[0:n] += a * x[0:n]
template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* acc, acc_t a, const scalar_t* x, int64_t n) {
  using fVec = at::vec::Vectorized<acc_t>;
  int64_t h = 0;
  if constexpr (is_reduced_v<scalar_t>) {
    using rVec = at::vec::Vectorized<scalar_t>;
    const fVec va(a);
    for (; h + rVec::size() <= n; h += rVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(rVec::loadu(x + h));
      at::vec::fmadd(va, lo, fVec::loadu(acc + h)).store(acc + h);
      at::vec::fmadd(va, hi, fVec::loadu(acc + h + fVec::size())).store(acc + h + fVec::size());
    }
  } else {
    const fVec va(a);
    for (; h + fVec::size() <= n; h += fVec::size()) {
      at::vec::fmadd(va, fVec::loadu(x + h), fVec::loadu(acc + h)).store(acc + h);
    }
  }
  for (; h < n; ++h) acc[h] += a * static_cast<acc_t>(x[h]);
}

// out[0:n] = a * x[0:n], rounded to scalar_t.
template <typename scalar_t, typename acc_t, typename src_t>
inline void scale_into(scalar_t* out, acc_t a, const src_t* x, int64_t n) {
  using fVec = at::vec::Vectorized<acc_t>;
  int64_t h = 0;
  const fVec va(a);
  if constexpr (is_reduced_v<scalar_t> && std::is_same_v<src_t, acc_t>) {
    using rVec = at::vec::Vectorized<scalar_t>;
    for (; h + rVec::size() <= n; h += rVec::size()) {
      const fVec lo = fVec::loadu(x + h) * va;
      const fVec hi = fVec::loadu(x + h + fVec::size()) * va;
      at::vec::convert_from_float<scalar_t>(lo, hi).store(out + h);
    }
  } else if constexpr (is_reduced_v<scalar_t>) {  // src_t == scalar_t
    using rVec = at::vec::Vectorized<scalar_t>;
    for (; h + rVec::size() <= n; h += rVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(rVec::loadu(x + h));
      at::vec::convert_from_float<scalar_t>(lo * va, hi * va).store(out + h);
    }
  } else if constexpr (std::is_same_v<scalar_t, acc_t> && is_reduced_v<src_t>) {  // widen
    using rVec = at::vec::Vectorized<src_t>;
    for (; h + rVec::size() <= n; h += rVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<src_t>(rVec::loadu(x + h));
      (lo * va).store(out + h);
      (hi * va).store(out + h + fVec::size());
    }
  } else if constexpr (std::is_same_v<scalar_t, acc_t> && std::is_same_v<src_t, acc_t>) {
    for (; h + fVec::size() <= n; h += fVec::size()) {
      (fVec::loadu(x + h) * va).store(out + h);
    }
  }
  for (; h < n; ++h) out[h] = static_cast<scalar_t>(a * static_cast<acc_t>(x[h]));
}

// out[0:n] = sum over j < count of w[j] * rows[j][0:n], rounded to scalar_t
// once: each vector of out is accumulated in acc_t registers over the rows in
// j order and stored once (zeros when count == 0).
template <typename scalar_t, typename acc_t>
inline void weighted_sum(scalar_t* out, const scalar_t* const* rows, const acc_t* w, int64_t count,
                         int64_t n) {
  using fVec = at::vec::Vectorized<acc_t>;
  int64_t h = 0;
  if constexpr (is_reduced_v<scalar_t>) {
    using rVec = at::vec::Vectorized<scalar_t>;
    for (; h + rVec::size() <= n; h += rVec::size()) {
      fVec lo(acc_t(0)), hi(acc_t(0));
      for (int64_t j = 0; j < count; ++j) {
        auto [a, b] = at::vec::convert_to_float<scalar_t>(rVec::loadu(rows[j] + h));
        lo = at::vec::fmadd(fVec(w[j]), a, lo);
        hi = at::vec::fmadd(fVec(w[j]), b, hi);
      }
      at::vec::convert_from_float<scalar_t>(lo, hi).store(out + h);
    }
  } else {
    for (; h + fVec::size() <= n; h += fVec::size()) {
      fVec acc(acc_t(0));
      for (int64_t j = 0; j < count; ++j) acc = at::vec::fmadd(fVec(w[j]), fVec::loadu(rows[j] + h), acc);
      acc.store(out + h);
    }
  }
  for (; h < n; ++h) {
    acc_t acc = 0;
    for (int64_t j = 0; j < count; ++j) acc += w[j] * static_cast<acc_t>(rows[j][h]);
    out[h] = static_cast<scalar_t>(acc);
  }
}

// sum of x[i] * y[i], accumulated in acc_t lanes, then reduced in a fixed order.
template <typename acc_t, typename scalar_t>
inline acc_t dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  using fVec = at::vec::Vectorized<acc_t>;
  fVec acc(acc_t(0));
  int64_t h = 0;
  if constexpr (is_reduced_v<scalar_t>) {
    using rVec = at::vec::Vectorized<scalar_t>;
    for (; h + rVec::size() <= n; h += rVec::size()) {
      auto [xlo, xhi] = at::vec::convert_to_float<scalar_t>(rVec::loadu(x + h));
      auto [ylo, yhi] = at::vec::convert_to_float<scalar_t>(rVec::loadu(y + h));
      acc = at::vec::fmadd(xlo, ylo, acc);
      acc = at::vec::fmadd(xhi, yhi, acc);
    }
  } else {
    for (; h + fVec::size() <= n; h += fVec::size()) {
      acc = at::vec::fmadd(fVec::loadu(x + h), fVec::loadu(y + h), acc);
    }
  }
  acc_t lanes[fVec::size()];
  acc.store(lanes);
  acc_t total = 0;
  for (int64_t i = 0; i < fVec::size(); ++i) total += lanes[i];
  for (; h < n; ++h) total += static_cast<acc_t>(x[h]) * static_cast<acc_t>(y[h]);
  return total;
}

// Asks for a row's cache lines ahead of use. Kernels that gather rows in
// slot order call it for the next token's rows: scattered rows are out of
// the hardware prefetcher's reach until their first lines miss.
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

// Number of fixed-size chunks over n items. Reductions sum per chunk and then
// over chunks in order, so results do not depend on the thread count.
constexpr int64_t kReduceChunk = 256;
inline int64_t num_chunks(int64_t n) { return (n + kReduceChunk - 1) / kReduceChunk; }

}  // namespace moe_routing::cpu
