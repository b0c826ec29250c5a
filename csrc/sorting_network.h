// A fixed sorting network for small arrays held in registers (Batcher's
// odd-even merge sort). The comparators are generated at compile time and
// expanded as a fold over template arguments, so every index is a constant:
// a CUDA thread keeps the array in registers, never in local memory (loops
// with `#pragma unroll` left the array on the stack). The same code runs on
// the host, where the C++ tests check it.
#pragma once

#include <cstddef>
#include <utility>

#if defined(__CUDACC__)
#define MOE_ROUTING_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOE_ROUTING_HOST_DEVICE inline
#endif

namespace moe_routing {
namespace sorting_network_detail {

// Visits Batcher's comparators (a, b), a < b, for n a power of two; a
// comparator puts the larger value at a.
template <typename Visit>
constexpr void batcher(int n, Visit&& visit) {
  for (int p = 1; p < n; p *= 2) {
    for (int k = p; k > 0; k /= 2) {
      for (int j = k % p; j + k < n; j += 2 * k) {
        for (int i = 0; i < k; ++i) {
          const int a = i + j, b = i + j + k;
          // Only pairs inside one merged block of 2p elements.
          if (b < n && a / (2 * p) == b / (2 * p)) visit(a, b);
        }
      }
    }
  }
}

constexpr int comparator_count(int n) {
  int count = 0;
  batcher(n, [&](int, int) { ++count; });
  return count;
}

template <int n>
struct Comparators {
  static constexpr int size = comparator_count(n);
  int a[size > 0 ? size : 1] = {};
  int b[size > 0 ? size : 1] = {};
  constexpr Comparators() {
    int c = 0;
    batcher(n, [&](int x, int y) {
      a[c] = x;
      b[c] = y;
      ++c;
    });
  }
};

template <int a, int b, typename T, int n>
MOE_ROUTING_HOST_DEVICE void compare_exchange(T (&v)[n]) {
  if (v[a] < v[b]) {
    const T larger = v[b];
    v[b] = v[a];
    v[a] = larger;
  }
}

template <int n, typename T, std::size_t... c>
MOE_ROUTING_HOST_DEVICE void apply(T (&v)[n], std::index_sequence<c...>) {
  constexpr Comparators<n> net{};
  (compare_exchange<net.a[c], net.b[c]>(v), ...);
}

}  // namespace sorting_network_detail

// The number of compare-exchanges sort_descending<n> makes (19 for n = 8).
template <int n>
constexpr int sorting_network_size = sorting_network_detail::Comparators<n>::size;

// Sorts v into descending order; n must be a power of two.
template <int n, typename T>
MOE_ROUTING_HOST_DEVICE void sort_descending(T (&v)[n]) {
  static_assert(n > 0 && (n & (n - 1)) == 0, "sort_descending: n must be a power of two");
  sorting_network_detail::apply<n>(v, std::make_index_sequence<sorting_network_size<n>>{});
}

}  // namespace moe_routing
