// SPDX-License-Identifier: Apache-2.0
// Auxiliary routing quantities against plain double-precision formulas.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "moekit/routers/aux.hpp"

namespace {

struct Routed {
  moekit::TopKRouter router;
  moekit::RoutingPlan plan;
  moekit::RouterScratch scratch;
};

Routed route(int64_t T, int64_t E, int64_t k, int64_t d, moekit::ScoreFunc sf, const moekit::Batch& b, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(E * d)), x(static_cast<size_t>(T * d));
  for (float& v : w) v = n(g);
  for (float& v : x) v = n(g);
  moekit::TopKOptions o{.num_experts = E, .k = k, .hidden = d, .score_func = sf};
  Routed r{moekit::TopKRouter(o, w), {}, {}};
  r.router.route(b, x.data(), r.plan, r.scratch, 1);
  return r;
}

TEST(AuxLosses, LoadBalancingAndZLossMatchFormulas) {
  for (auto sf : {moekit::ScoreFunc::softmax, moekit::ScoreFunc::sigmoid}) {
    const int64_t T = 37, E = 9, k = 3, d = 13;
    std::vector<uint8_t> pad(T, 0);
    pad[4] = pad[20] = 1;
    moekit::Batch b = moekit::Batch::single(T, d);
    b.padding = pad;
    Routed r = route(T, E, k, d, sf, b, 7);
    const auto& L = r.scratch.logits;
    // Plain formulas.
    std::vector<double> f(E, 0), P(E, 0);
    double z = 0;
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (pad[t]) continue;
      ++n;
      double m = -1e300, s = 0, ssig = 0;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(L[t * E + e]));
      for (int64_t e = 0; e < E; ++e) s += std::exp(L[t * E + e] - m);
      for (int64_t e = 0; e < E; ++e) ssig += 1 / (1 + std::exp(-static_cast<double>(L[t * E + e])));
      for (int64_t e = 0; e < E; ++e)
        P[e] += sf == moekit::ScoreFunc::softmax ? std::exp(L[t * E + e] - m) / s
                                                 : 1 / (1 + std::exp(-static_cast<double>(L[t * E + e]))) / ssig;
      z += (m + std::log(s)) * (m + std::log(s));
      for (int64_t j = 0; j < k; ++j) f[r.plan.slot_expert()[r.plan.slot_offsets()[t] + j]] += 1;
    }
    double loss = 0;
    for (int64_t e = 0; e < E; ++e) loss += f[e] / (k * n) * P[e] / n;
    loss *= E;
    EXPECT_NEAR(moekit::load_balancing_loss(r.plan, L, b, sf), loss, 1e-9);
    EXPECT_NEAR(moekit::load_balancing_loss(r.plan, L, b, sf, true), k * loss, 1e-9);
    EXPECT_NEAR(moekit::router_z_loss(L, E, b), z / n, 1e-6 * (z / n));
    EXPECT_GT(loss, 0.0);
  }
}

TEST(AuxLosses, BalancedUniformRoutingGivesOne) {
  // All logits equal: p = 1/E; each token picks experts 0..k-1 (ties to the lower id), so
  // f is concentrated: loss = E * sum_{i<k} (1/k) * (1/E) = 1.
  const int64_t T = 8, E = 4, k = 2, d = 3;
  moekit::TopKOptions o{.num_experts = E, .k = k, .hidden = d};
  moekit::TopKRouter router(o, std::vector<float>(E * d, 0.0f));
  std::vector<float> x(T * d, 1.0f);
  moekit::RoutingPlan plan;
  moekit::RouterScratch s;
  const auto b = moekit::Batch::single(T, d);
  router.route(b, x.data(), plan, s, 1);
  EXPECT_NEAR(moekit::load_balancing_loss(plan, s.logits, b, moekit::ScoreFunc::softmax), 1.0, 1e-12);
  EXPECT_NEAR(moekit::router_z_loss(s.logits, E, b), std::log(4.0) * std::log(4.0), 1e-6);
  const auto st = moekit::routing_stats(plan, s.logits, b);
  EXPECT_EQ(st.load, (std::vector<int64_t>{8, 8, 0, 0}));
  EXPECT_NEAR(st.max_mean_load_ratio, 2.0, 1e-12);
  EXPECT_NEAR(st.entropy, std::log(4.0), 1e-9);
  EXPECT_NEAR(st.mean_selected_weight, 0.25, 1e-7);
  EXPECT_EQ(st.drop_rate, 0.0);
  // Bias update: under-loaded experts 2, 3 go up, over-loaded 0, 1 go down.
  const auto bias = moekit::update_selection_bias({}, plan, 0.5f);
  EXPECT_EQ(bias, (std::vector<float>{-0.5f, -0.5f, 0.5f, 0.5f}));
  EXPECT_THROW(moekit::update_selection_bias(std::vector<float>(3), plan), moekit::error);
  EXPECT_THROW(moekit::load_balancing_loss(plan, std::span<const float>(s.logits).first(5), b, moekit::ScoreFunc::softmax),
               moekit::error);
}

TEST(AuxLosses, DropRateCountsDroppedSlots) {
  const int64_t T = 10, E = 2, k = 1, d = 2;
  moekit::TopKOptions o{.num_experts = E, .k = k, .hidden = d, .capacity_factor = 0.5, .drop_policy = moekit::DropPolicy::position};
  moekit::TopKRouter router(o, std::vector<float>{1, 0, 0, 1});
  std::vector<float> x(T * d, 0.0f);
  for (int t = 0; t < T; ++t) x[t * d] = 1.0f;  // every token prefers expert 0
  moekit::RoutingPlan plan;
  moekit::RouterScratch s;
  const auto b = moekit::Batch::single(T, d);
  router.route(b, x.data(), plan, s, 1);
  // C = ceil(10 * 1 / 2 * 0.5) = 3: 3 kept, 7 dropped.
  const auto st = moekit::routing_stats(plan, {}, b);
  EXPECT_EQ(plan.num_kept(), 3);
  EXPECT_NEAR(st.drop_rate, 0.7, 1e-12);
  EXPECT_EQ(st.entropy, 0.0);
}

}  // namespace
