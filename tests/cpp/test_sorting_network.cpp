// The sorting network that CUDA's route uses to pick the top k (each lane
// sorts its keys once; a round takes the warp's largest first key and that
// lane moves on), checked here on the host, where the same header compiles.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "sorting_network.h"

namespace mr = moe_routing;

namespace {

// 0-1 principle: a comparator network sorts every input iff it sorts every
// input of zeros and ones.
template <int n>
void expect_sorts_all_zero_one_inputs() {
  for (uint32_t bits = 0; bits < (1u << n); ++bits) {
    int v[n];
    for (int i = 0; i < n; ++i) v[i] = (bits >> i) & 1u;
    mr::sort_descending(v);
    for (int i = 0; i + 1 < n; ++i) ASSERT_GE(v[i], v[i + 1]) << "n=" << n << " input " << bits;
    int ones = 0;
    for (int i = 0; i < n; ++i) ones += v[i];
    ASSERT_EQ(ones, __builtin_popcount(bits));
  }
}

TEST(SortingNetwork, SortsEveryZeroOneInput) {
  expect_sorts_all_zero_one_inputs<1>();
  expect_sorts_all_zero_one_inputs<2>();
  expect_sorts_all_zero_one_inputs<4>();
  expect_sorts_all_zero_one_inputs<8>();
  expect_sorts_all_zero_one_inputs<16>();
}

TEST(SortingNetwork, ComparatorCountsAreBatchersOddEvenMergeSort) {
  // (n/4) log2(n) (log2(n) - 1) + n - 1 for n a power of two.
  EXPECT_EQ(mr::sorting_network_size<1>, 0);
  EXPECT_EQ(mr::sorting_network_size<2>, 1);
  EXPECT_EQ(mr::sorting_network_size<4>, 5);
  EXPECT_EQ(mr::sorting_network_size<8>, 19);
  EXPECT_EQ(mr::sorting_network_size<16>, 63);
}

TEST(SortingNetwork, SortsRandom64BitKeys) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 1000; ++trial) {
    uint64_t v[8];
    for (auto& x : v) x = trial % 2 ? rng() : rng() % 4;  // many equal keys on odd trials
    std::vector<uint64_t> expected(v, v + 8);
    std::sort(expected.begin(), expected.end(), std::greater<>());
    mr::sort_descending(v);
    EXPECT_EQ(std::vector<uint64_t>(v, v + 8), expected);
  }
}

// route's CUDA selection for a warp of 32 lanes, lane l holding experts
// l, l + 32, ...: sorted lanes, k rounds of (largest first key, that lane
// moves on); key 0 is "no candidate". It must give the k largest keys in
// descending order, as a full sort does.
template <int vpt>
std::vector<uint64_t> warp_selection(std::vector<uint64_t> keys, int k) {
  uint64_t lanes[32][vpt];
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < vpt; ++i) lanes[l][i] = keys[l + 32 * i];
    mr::sort_descending(lanes[l]);
  }
  std::vector<uint64_t> chosen;
  for (int j = 0; j < k; ++j) {
    uint64_t best = 0;
    for (const auto& lane : lanes) best = std::max(best, lane[0]);
    chosen.push_back(best);
    for (auto& lane : lanes) {
      if (lane[0] != best) continue;
      for (int i = 0; i + 1 < vpt; ++i) lane[i] = lane[i + 1];
      lane[vpt - 1] = 0;
    }
  }
  return chosen;
}

template <int vpt>
void expect_warp_selection_is_top_k(int E, int k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint64_t> keys(32 * vpt, 0);  // experts >= E: no candidate
  for (int e = 0; e < E; ++e) {
    // A few value levels, so that many keys share their value and the
    // inverted expert index in the low word decides, as it does on ties.
    const uint64_t value = rng() % 5;
    keys[e] = (value << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(e));
  }
  std::vector<uint64_t> expected(keys);
  std::sort(expected.begin(), expected.end(), std::greater<>());
  expected.resize(k);
  EXPECT_EQ(warp_selection<vpt>(keys, k), expected) << "E=" << E << " k=" << k;
}

TEST(SortingNetwork, WarpSelectionFromSortedLanesIsTheTopK) {
  for (uint32_t seed = 0; seed < 20; ++seed) {
    expect_warp_selection_is_top_k<1>(17, 8, seed);
    expect_warp_selection_is_top_k<2>(64, 8, seed);
    expect_warp_selection_is_top_k<4>(100, 6, seed);
    expect_warp_selection_is_top_k<8>(256, 8, seed);
    expect_warp_selection_is_top_k<8>(200, 32, seed);  // k = 32: lanes run out of keys
    expect_warp_selection_is_top_k<8>(129, 1, seed);
  }
}

}  // namespace
