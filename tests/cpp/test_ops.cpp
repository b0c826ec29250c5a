// GoogleTest suite of the moe_routing C++ API through LibTorch: forward
// values on hand-built cases, backward through autograd, Meta shapes, errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moe_routing.h"

namespace mr = moe_routing;

namespace {

at::Tensor longs(std::vector<int64_t> values, std::vector<int64_t> shape) {
  return torch::tensor(values, torch::kLong).view(shape);
}

void expect_meta(const at::Tensor& t, std::vector<int64_t> shape, at::ScalarType dtype) {
  EXPECT_TRUE(t.is_meta());
  EXPECT_EQ(t.sizes().vec(), shape);
  EXPECT_EQ(t.scalar_type(), dtype);
}

// ---------------------------------------------------------------- route

TEST(Route, SoftmaxTopKNormalisedAndTiesToLowerIndex) {
  const auto logits = torch::tensor({{1.0f, 3.0f, 3.0f, 2.0f}});
  auto [weights, experts, scores] = mr::route(logits, 2);
  EXPECT_TRUE(torch::equal(experts, longs({1, 2}, {1, 2})));
  EXPECT_TRUE(torch::allclose(scores, torch::softmax(logits, -1)));
  EXPECT_TRUE(torch::allclose(weights, torch::tensor({{0.5f, 0.5f}})));
}

TEST(Route, BiasSelectsButDoesNotWeight) {
  const auto logits = torch::log(torch::tensor({{0.5f, 0.3f, 0.2f}}));
  auto [weights, experts, scores] =
      mr::route(logits, 1, "softmax", std::nullopt, torch::tensor({0.0f, 0.0f, 0.5f}));
  EXPECT_EQ(experts.item<int64_t>(), 2);
  EXPECT_NEAR(weights.item<float>(), 0.2f, 1e-6);
}

TEST(Route, SigmoidScaleAndFloat64) {
  const auto logits = torch::tensor({{0.0, 2.0, -1.0}}, torch::kDouble);
  auto [weights, experts, scores] = mr::route(logits, 2, "sigmoid", false, std::nullopt, 1, 1, 2.0);
  EXPECT_EQ(weights.scalar_type(), at::kDouble);
  EXPECT_TRUE(torch::equal(experts, longs({1, 0}, {1, 2})));
  EXPECT_TRUE(torch::allclose(weights, 2.0 * torch::sigmoid(torch::tensor({{2.0, 0.0}}, torch::kDouble))));
}

TEST(Route, GroupScoreMaxAgainstTopTwoSum) {
  // Groups {0, 1} and {2, 3}: group 0 has the best expert (0.5 vs 0.3), group
  // 1 the larger sum of two (0.6 vs 0.5).
  const auto scores = torch::tensor({{0.5, 0.0001, 0.3, 0.3}}, torch::kDouble);
  const auto logits = torch::log(scores / (1 - scores));
  auto by_max = mr::route(logits, 1, "sigmoid", false, std::nullopt, 2, 1, 1.0, "max");
  auto by_sum = mr::route(logits, 1, "sigmoid", false, std::nullopt, 2, 1, 1.0, "top2");
  EXPECT_EQ(std::get<1>(by_max).item<int64_t>(), 0);
  EXPECT_EQ(std::get<1>(by_sum).item<int64_t>(), 2);
  EXPECT_THROW(mr::route(logits, 1, "sigmoid", false, std::nullopt, 2, 1, 1.0, "sum"),
               c10::Error);
}

TEST(Route, BackwardThroughAutogradMatchesTheBackwardOp) {
  auto logits = torch::randn({16, 8}, torch::kDouble).requires_grad_();
  auto [weights, experts, scores] = mr::route(logits, 3);
  const auto gw = torch::randn_like(weights), gs = torch::randn_like(scores);
  ((weights * gw).sum() + (scores * gs).sum()).backward();
  const auto direct = mr::route_backward(gw, gs, weights.detach(), experts, scores.detach(),
                                         "softmax", true, 1.0, at::kDouble);
  EXPECT_EQ(logits.grad().sizes(), logits.sizes());
  EXPECT_TRUE(torch::allclose(logits.grad(), direct));
  // Softmax rows sum to one, so the gradient of the scores sums to zero per token.
  EXPECT_TRUE(torch::allclose(direct.sum(-1), torch::zeros({16}, torch::kDouble), 0, 1e-12));
}

TEST(Route, MetaShapes) {
  auto [w, e, s] = mr::route(torch::empty({5, 8}, torch::device(at::kMeta).dtype(at::kBFloat16)), 2);
  expect_meta(w, {5, 2}, at::kFloat);
  expect_meta(e, {5, 2}, at::kLong);
  expect_meta(s, {5, 8}, at::kFloat);
}

TEST(Route, BadArgumentsRaise) {
  EXPECT_THROW(mr::route(torch::randn({4, 3}), 4), c10::Error);
  EXPECT_THROW(mr::route(torch::randn({4}), 1), c10::Error);
  EXPECT_THROW(mr::route(torch::randn({4, 3}), 1, "relu"), c10::Error);
  try {
    mr::route(torch::randn({4, 3}), 0);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("moe_routing::route: k must be in [1, E=3], got 0"),
              std::string::npos);
  }
}

// ---------------------------------------------------------------- plan

TEST(Plan, ChoiceAndTokenPriorityDropDifferently) {
  const auto experts = longs({0, 1, 1, 0}, {2, 2});
  auto [choice, load, kept] = mr::plan(experts, 2, 1, std::nullopt, "choice");
  EXPECT_TRUE(torch::equal(choice, longs({0, -1, 1, -1}, {2, 2})));
  EXPECT_TRUE(torch::equal(load, longs({2, 2}, {2})));
  EXPECT_TRUE(torch::equal(kept, longs({1, 1}, {2})));
  auto token = std::get<0>(mr::plan(experts, 2, 1, std::nullopt, "token"));
  EXPECT_TRUE(torch::equal(token, longs({0, 1, -1, -1}, {2, 2})));
}

TEST(Plan, DroplessPackedLayoutAndPadding) {
  const auto experts = longs({1, 0, 1, 2, 0, 1}, {3, 2});
  auto [slots, load, kept] = mr::plan(experts, 3);
  EXPECT_TRUE(torch::equal(slots, longs({2, 1, 3, 5, 0, 4}, {3, 2})));
  EXPECT_TRUE(torch::equal(kept, longs({2, 3, 1}, {3})));
  const auto mask = torch::tensor({true, false, true});
  auto masked = std::get<0>(mr::plan(experts, 3, std::nullopt, std::nullopt, "choice", mask));
  EXPECT_TRUE(torch::equal(masked, longs({2, 1, -1, -1, 0, 3}, {3, 2})));
}

TEST(Plan, MetaShapesAndErrors) {
  auto [s, l, k] = mr::plan(torch::empty({7, 2}, torch::device(at::kMeta).dtype(at::kLong)), 5, 3);
  expect_meta(s, {7, 2}, at::kLong);
  expect_meta(l, {5}, at::kLong);
  expect_meta(k, {5}, at::kLong);
  EXPECT_THROW(mr::plan(longs({0, 5}, {1, 2}), 5, 3), c10::Error);  // index out of range
  EXPECT_THROW(mr::plan(longs({0, 1}, {1, 2}), 5, -1), c10::Error);  // negative capacity
}

TEST(Plan, ScoreAndBatchPriorities) {
  const auto weights = torch::tensor({{0.3f, 0.2f}, {0.4f, 0.6f}});
  auto score = std::get<0>(mr::plan(longs({0, 1, 2, 0}, {2, 2}), 3, 1, weights, "score"));
  EXPECT_TRUE(torch::equal(score, longs({-1, 1, 2, 0}, {2, 2})));  // t1's .6 beats t0's .3
  const auto batch_weights = torch::tensor({{0.4f, 0.35f}, {0.9f, 0.05f}});
  auto batch = std::get<0>(mr::plan(longs({0, 1, 0, 2}, {2, 2}), 3, 1, batch_weights, "batch"));
  EXPECT_TRUE(torch::equal(batch, longs({-1, 1, 0, 2}, {2, 2})));  // confident t1 first
  EXPECT_THROW(mr::plan(longs({0, 1}, {1, 2}), 3, 1, std::nullopt, "score"), c10::Error);
}

TEST(Capacity, Formula) {
  EXPECT_EQ(mr::capacity(4096, 8, 2, 1.25), 1280);
  EXPECT_EQ(mr::capacity(10, 64, 1, 1.0), 4);  // min_capacity
  EXPECT_EQ(mr::capacity(3, 64, 1, 1.0), 3);   // at most T
  EXPECT_EQ(mr::capacity(100, 2, 1, 1.1), 55); // exact fraction, not ceil(55.00000000000001)
  EXPECT_THROW(mr::capacity(10, 4, 5, 1.0), c10::Error);
}

// ---------------------------------------------------------------- dispatch / combine

TEST(DispatchCombine, RoundTripAndZeroRows) {
  const auto x = torch::randn({4, 6});
  const auto slots = longs({2, -1, 0, 5}, {4, 1});
  const auto buffer = mr::dispatch(x, slots, 6);
  EXPECT_EQ(buffer.sizes(), (std::vector<int64_t>{6, 6}));
  EXPECT_TRUE(torch::equal(buffer[2], x[0]));
  EXPECT_TRUE(torch::equal(buffer[1], torch::zeros({6})));
  const auto y = mr::combine(buffer, slots, torch::full({4, 1}, 0.5f));
  EXPECT_TRUE(torch::allclose(y[0], 0.5 * x[0]));
  EXPECT_TRUE(torch::equal(y[1], torch::zeros({6})));  // dropped token
  EXPECT_TRUE(torch::allclose(y[3], 0.5 * x[3]));
}

TEST(DispatchCombine, BackwardThroughAutograd) {
  auto x = torch::randn({5, 3}, torch::kDouble).requires_grad_();
  const auto slots = longs({0, 3, 1, -1, 2, 4, 5, 6, 7, 8}, {5, 2});
  auto weights = torch::rand({5, 2}, torch::kDouble).requires_grad_();
  const auto buffer = mr::dispatch(x, slots, 9);
  const auto y = mr::combine(buffer * 2.0, slots, weights);
  y.sum().backward();
  // d y[t] / d x[t] = 2 * sum of the token's kept weights.
  const auto kept_weight = (weights * slots.ge(0)).sum(-1, true);
  EXPECT_TRUE(torch::allclose(x.grad(), (2.0 * kept_weight).expand({5, 3})));
  EXPECT_EQ(weights.grad().sizes(), weights.sizes());
  EXPECT_EQ(weights.grad()[1][1].item<double>(), 0.0);  // dropped choice
}

TEST(DispatchCombine, MetaShapesAndErrors) {
  const auto meta = torch::device(at::kMeta);
  expect_meta(mr::dispatch(torch::empty({4, 8}, meta.dtype(at::kHalf)),
                           torch::empty({4, 2}, meta.dtype(at::kLong)), 12),
              {12, 8}, at::kHalf);
  expect_meta(mr::combine(torch::empty({3, 4, 8}, meta.dtype(at::kBFloat16)),
                          torch::empty({5, 2}, meta.dtype(at::kLong)),
                          torch::empty({5, 2}, meta.dtype(at::kFloat))),
              {5, 8}, at::kBFloat16);
  auto [g_rows, g_w] = mr::combine_backward(torch::empty({5, 8}, meta.dtype(at::kFloat)),
                                            torch::empty({12, 8}, meta.dtype(at::kFloat)),
                                            torch::empty({5, 2}, meta.dtype(at::kLong)),
                                            torch::empty({5, 2}, meta.dtype(at::kFloat)));
  expect_meta(g_rows, {12, 8}, at::kFloat);
  expect_meta(g_w, {5, 2}, at::kFloat);
  expect_meta(mr::dispatch_backward(torch::empty({12, 8}, meta.dtype(at::kFloat)),
                                    torch::empty({5, 2}, meta.dtype(at::kLong))),
              {5, 8}, at::kFloat);
  EXPECT_THROW(mr::dispatch(torch::randn({2, 3}), longs({0, 0}, {2, 1}), 4), c10::Error);  // twice
  EXPECT_THROW(mr::dispatch(torch::randn({2, 3}), longs({0, 4}, {2, 1}), 4), c10::Error);  // range
  EXPECT_THROW(mr::combine(torch::randn({4, 3}), longs({0, 1}, {2, 1}), torch::rand({2, 2})),
               c10::Error);  // weights shape
}

// ---------------------------------------------------------------- losses

TEST(Losses, LoadBalancingIsOneUnderPerfectBalanceAndHasGradient) {
  auto scores = torch::full({4, 4}, 0.25).requires_grad_();
  const auto experts = longs({0, 1, 2, 3}, {4, 1});
  const auto loss = mr::load_balancing_loss(scores, experts);
  EXPECT_NEAR(loss.item<float>(), 1.0f, 1e-6);
  loss.backward();
  // d loss / d scores[t, e] = E * f_e / T = 4 * 0.25 / 4.
  EXPECT_TRUE(torch::allclose(scores.grad(), torch::full({4, 4}, 0.25)));
  expect_meta(mr::load_balancing_loss(torch::empty({4, 4}, torch::device(at::kMeta)),
                                      torch::empty({4, 1}, torch::device(at::kMeta).dtype(at::kLong))),
              {}, at::kFloat);
}

TEST(Losses, ZLossValueGradientAndMask) {
  auto logits = torch::tensor({{0.0, 0.0}, {5.0, 1.0}}, torch::kDouble).requires_grad_();
  const auto mask = torch::tensor({true, false});
  const auto loss = mr::z_loss(logits, mask);
  EXPECT_NEAR(loss.item<double>(), std::log(2.0) * std::log(2.0), 1e-12);
  loss.backward();
  // 2 * lse * softmax for the valid token, zero for the padding.
  EXPECT_NEAR(logits.grad()[0][0].item<double>(), std::log(2.0), 1e-12);
  EXPECT_EQ(logits.grad()[1].abs().sum().item<double>(), 0.0);
  expect_meta(mr::z_loss_backward(torch::empty({}, torch::device(at::kMeta)),
                                  torch::empty({3, 4}, torch::device(at::kMeta).dtype(at::kHalf)),
                                  std::nullopt),
              {3, 4}, at::kHalf);
}

// ---------------------------------------------------------------- routing breadth

TEST(ExpertChoice, TopTokensPerExpertAndGradient) {
  auto scores = torch::tensor({{0.1, 0.9}, {0.5, 0.5}, {0.5, 0.2}, {0.7, 0.3}}, torch::kDouble)
                    .requires_grad_();
  auto [weights, tokens] = mr::expert_choice(scores, 2);
  EXPECT_TRUE(torch::equal(tokens, longs({3, 1, 0, 1}, {2, 2})));
  EXPECT_TRUE(torch::allclose(weights.detach(), torch::tensor({{0.7, 0.5}, {0.9, 0.5}}, torch::kDouble)));
  weights.sum().backward();
  // Each chosen (token, expert) entry gets gradient 1, the rest 0.
  const auto expected = torch::tensor({{0.0, 1.0}, {1.0, 1.0}, {0.0, 0.0}, {1.0, 0.0}}, torch::kDouble);
  EXPECT_TRUE(torch::equal(scores.grad(), expected));
  auto [mw, mt] = mr::expert_choice(torch::empty({6, 3}, torch::device(at::kMeta)), 4);
  expect_meta(mw, {3, 4}, at::kFloat);
  expect_meta(mt, {3, 4}, at::kLong);
}

TEST(GroupedMm, MatchesPerExpertProductsAndBackward) {
  auto x = torch::randn({9, 4}, torch::kDouble).requires_grad_();
  auto w = torch::randn({2, 4, 3}, torch::kDouble).requires_grad_();
  const auto counts = longs({3, 5}, {2});
  const auto y = mr::grouped_mm(x, w, counts);
  EXPECT_TRUE(torch::allclose(y.slice(0, 0, 3), torch::mm(x.slice(0, 0, 3), w[0])));
  EXPECT_TRUE(torch::allclose(y.slice(0, 3, 8), torch::mm(x.slice(0, 3, 8), w[1])));
  EXPECT_TRUE(torch::equal(y[8], torch::zeros({3}, torch::kDouble)));  // past sum(counts)
  y.sum().backward();
  EXPECT_TRUE(torch::allclose(w.grad()[0], torch::mm(x.slice(0, 0, 3).t(), torch::ones({3, 3}, torch::kDouble))));
  EXPECT_TRUE(torch::equal(x.grad()[8], torch::zeros({4}, torch::kDouble)));
  const auto meta = torch::device(at::kMeta);
  expect_meta(mr::grouped_mm(torch::empty({9, 4}, meta), torch::empty({2, 4, 3}, meta),
                             torch::empty({2}, meta.dtype(at::kLong))),
              {9, 3}, at::kFloat);
  EXPECT_THROW(mr::grouped_mm(x.detach(), w.detach(), longs({5, 5}, {2})), c10::Error);  // 10 > 9 rows
}

TEST(Swiglu, SiluOfGateTimesUpAndBackward) {
  auto h = torch::randn({5, 6}, torch::kDouble).requires_grad_();
  const auto y = mr::swiglu(h);
  const auto gate = h.slice(1, 0, 3), up = h.slice(1, 3, 6);
  EXPECT_TRUE(torch::allclose(y, gate * torch::sigmoid(gate) * up));
  y.sum().backward();
  const auto s = torch::sigmoid(gate);
  EXPECT_TRUE(torch::allclose(h.grad().slice(1, 3, 6), gate * s));
  EXPECT_TRUE(torch::allclose(h.grad().slice(1, 0, 3), up * s * (1 + gate * (1 - s))));
  expect_meta(mr::swiglu(torch::empty({4, 8}, torch::device(at::kMeta))), {4, 4}, at::kFloat);
  EXPECT_THROW(mr::swiglu(torch::randn({2, 3})), c10::Error);  // odd width
}

TEST(Losses, SequenceWiseIsTheMeanOverSequences) {
  const auto scores = torch::rand({8, 4}, torch::kDouble);
  const auto experts = torch::randint(0, 4, {8, 2}, torch::kLong);
  const auto whole = mr::load_balancing_loss(scores, experts, std::nullopt, 4);
  const auto first = mr::load_balancing_loss(scores.slice(0, 0, 4), experts.slice(0, 0, 4));
  const auto second = mr::load_balancing_loss(scores.slice(0, 4, 8), experts.slice(0, 4, 8));
  EXPECT_NEAR(whole.item<double>(), (first.item<double>() + second.item<double>()) / 2, 1e-12);
  EXPECT_THROW(mr::load_balancing_loss(scores, experts, std::nullopt, 3), c10::Error);
}

}  // namespace

// ---------------------------------------------------------------- balanced_assignment

TEST(BalancedAssignment, ExactBalancePaddingAndMeta) {
  auto scores = torch::zeros({6, 3});
  scores.select(1, 0).fill_(10.0);  // everyone wants expert 0
  scores.slice(0, 4, 6).select(1, 0).fill_(20.0);  // tokens 4 and 5 most of all
  const auto experts = mr::balanced_assignment(scores);
  EXPECT_EQ(experts[4].item<int64_t>(), 0);
  EXPECT_EQ(experts[5].item<int64_t>(), 0);
  EXPECT_TRUE(torch::equal(torch::bincount(experts, {}, 3), longs({2, 2, 2}, {3})));
  const auto mask = torch::tensor({true, true, true, true, false, true});
  const auto masked = mr::balanced_assignment(scores, mask);
  EXPECT_EQ(masked[4].item<int64_t>(), -1);
  // 5 valid tokens over 3 experts: 2, 2, 1.
  EXPECT_TRUE(torch::equal(torch::bincount(masked.index({mask}), {}, 3), longs({2, 2, 1}, {3})));
  expect_meta(mr::balanced_assignment(scores.to(at::kMeta)), {6}, at::kLong);
  EXPECT_THROW(mr::balanced_assignment(scores, std::nullopt, -1), c10::Error);
}
