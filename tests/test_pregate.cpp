// SPDX-License-Identifier: Apache-2.0
// Pre-gating (Read-ME, arXiv 2410.19123; routers/pregate.hpp): every layer's plan from the
// embeddings equals the double-precision top-k reference on the embeddings; plans from an
// engine's logits equal the router's own (TopKRouter::route_logits is route() after its logit
// step, bit for bit); a stack run with forward_plan() on the pre-gated plans equals the
// reference; active_experts() is the set each layer runs; errors.
#include <gtest/gtest.h>

#include <cstring>
#include <span>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/pregate.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"
#include "support/topk_params.hpp"

namespace {

using moekit::Batch;
using moekit::RoutingPlan;
using moekit::TopKOptions;
using moekit::TopKRouter;
using test_support::expect_error;
using test_support::join;
using test_support::Rng;

bool same_plan(const RoutingPlan& a, const RoutingPlan& b) {
  return std::equal(a.slot_offsets().begin(), a.slot_offsets().end(), b.slot_offsets().begin(), b.slot_offsets().end()) &&
         std::equal(a.slot_expert().begin(), a.slot_expert().end(), b.slot_expert().begin(), b.slot_expert().end()) &&
         std::equal(a.slot_dropped().begin(), a.slot_dropped().end(), b.slot_dropped().begin(), b.slot_dropped().end()) &&
         test_support::same_bits(a.slot_weight(), b.slot_weight());
}

TEST(PreGating, PlansMatchTheReferenceAndTheEnginesLogits) {
  Rng rng(2410);
  int64_t compared = 0;
  for (int i = 0; i < 30; ++i) {
    const int64_t L = rng.integer(1, 4), demb = rng.integer(1, 24), T = rng.integer(1, 40);
    std::vector<TopKRouter> layers;
    std::vector<TopKOptions> opts;
    std::vector<std::vector<float>> gates;
    for (int64_t l = 0; l < L; ++l) {
      TopKOptions o;
      o.num_experts = rng.integer(1, 12);
      o.k = rng.integer(1, std::min<int64_t>(o.num_experts, 3));
      o.hidden = demb;
      o.score_func = rng.coin(0.5) ? moekit::ScoreFunc::softmax : moekit::ScoreFunc::sigmoid;
      o.norm_topk_prob = rng.coin(0.5);
      if (rng.coin(0.3)) o.capacity_factor = rng.uniform(0.5, 1.5);
      gates.push_back(rng.vec(static_cast<size_t>(o.num_experts * demb), 1.0));
      layers.emplace_back(o, gates.back());
      opts.push_back(o);
    }
    const moekit::PreGatingRouter pg(layers);
    const std::vector<float> emb = rng.vec(static_cast<size_t>(T * demb), 1.0);
    std::vector<RoutingPlan> plans, again;
    moekit::RouterScratch s, s2;
    pg.route_all(Batch::single(T, demb), emb.data(), plans, s, 2);
    ASSERT_EQ(static_cast<int64_t>(plans.size()), L);
    std::vector<std::span<const float>> logits;
    for (int64_t l = 0; l < L; ++l) {
      const ref::Routing want = ref::route_topk(moekit_test::to_ref(opts[static_cast<size_t>(l)], {}), gates[static_cast<size_t>(l)].data(), emb.data(), T);
      const ref::CompareReport rep = ref::compare_routing(want, ref::view_of(plans[static_cast<size_t>(l)]));
      EXPECT_TRUE(rep.errors.empty()) << "case " << i << " layer " << l << join(rep.errors);
      compared += rep.compared;
      logits.emplace_back(s.sub[static_cast<size_t>(l)].logits);
      // active_experts: the experts with kept slots, ascending.
      const auto act = moekit::active_experts(plans[static_cast<size_t>(l)]);
      for (int64_t e = 0; e < opts[static_cast<size_t>(l)].num_experts; ++e)
        EXPECT_EQ(std::count(act.begin(), act.end(), e) == 1, plans[static_cast<size_t>(l)].kept_of(e) > 0);
    }
    pg.plans_from_logits(Batch::single(T, demb), logits, again, s2, 1);
    for (int64_t l = 0; l < L; ++l) EXPECT_TRUE(same_plan(plans[static_cast<size_t>(l)], again[static_cast<size_t>(l)])) << "case " << i;
  }
  EXPECT_GT(compared, 500);
}

TEST(PreGating, StackRunsThePreGatedPlans) {
  Rng rng(4);
  const int64_t L = 3, E = 6, k = 2, d = 16, f = 12, T = 10;
  std::vector<TopKRouter> gates;
  std::vector<moekit::SparseLayer<TopKRouter, moekit::FfnBank>> stack;
  std::vector<std::vector<ref::Ffn>> experts(L);
  for (int64_t l = 0; l < L; ++l) {
    gates.emplace_back(TopKOptions{E, k, d}, rng.vec(E * d, 1.0));
    for (int64_t e = 0; e < E; ++e) experts[static_cast<size_t>(l)].push_back(test_support::random_ref_ffn(rng, d, f));
    // The layer's own router is unused when its plan comes from the pre-gate.
    stack.emplace_back(TopKRouter(TopKOptions{E, k, d}, rng.vec(E * d, 1.0)), test_support::bank_of(experts[static_cast<size_t>(l)], d, f));
  }
  const moekit::PreGatingRouter pg(gates);
  std::vector<float> x = rng.vec(T * d, 1.0);
  std::vector<RoutingPlan> plans;
  moekit::RouterScratch s;
  pg.route_all(Batch::single(T, d), x.data(), plans, s);  // the embeddings are the first input here
  std::vector<double> want(x.begin(), x.end());
  std::vector<float> y(x.size());
  moekit::Workspace ws;
  for (int64_t l = 0; l < L; ++l) {
    const std::vector<float> xin(want.begin(), want.end());
    const auto yr = ref::moe_forward(ref::routing_from_view(ref::view_of(plans[static_cast<size_t>(l)]), nullptr), experts[static_cast<size_t>(l)], {}, xin.data(), T, d);
    for (size_t q = 0; q < want.size(); ++q) want[q] += yr[q];
    stack[static_cast<size_t>(l)].forward_plan(Batch::single(T, d), x.data(), plans[static_cast<size_t>(l)], y.data(), ws);
    for (size_t q = 0; q < x.size(); ++q) x[q] += y[q];
  }
  const std::vector<double> got(x.begin(), x.end());
  for (size_t q = 0; q < got.size(); ++q) EXPECT_NEAR(got[q], want[q], 1e-4 * (1 + std::fabs(want[q]))) << q;
}

TEST(PreGating, Errors) {
  Rng rng(1);
  expect_error([] { moekit::PreGatingRouter({}); }, {"pregate router: expected at least one layer"});
  expect_error([&] { moekit::PreGatingRouter({TopKRouter(TopKOptions{2, 1, 3}, rng.vec(6, 1.0)), TopKRouter(TopKOptions{2, 1, 4}, rng.vec(8, 1.0))}); },
               {"layer 1 embedding width expected 3, got 4"});
  const moekit::PreGatingRouter pg({TopKRouter(TopKOptions{2, 1, 3}, rng.vec(6, 1.0))});
  std::vector<RoutingPlan> plans;
  moekit::RouterScratch s;
  std::vector<float> bad = {0.1f, NAN, 0.2f, 0.3f};
  expect_error([&] { pg.plans_from_logits(Batch::single(2, 3), {std::span<const float>(bad)}, plans, s); }, {"logit of token 0, expert 1 expected finite"});
  expect_error([&] { pg.plans_from_logits(Batch::single(2, 3), {std::span<const float>(bad).first(3)}, plans, s); },
               {"route_logits expected logits [2, 2]", "got 3"});
  expect_error([&] { pg.plans_from_logits(Batch::single(2, 3), {}, plans, s); }, {"expected logits for 1 layers, got 0"});
  expect_error([&] { (void)moekit::active_experts(RoutingPlan{}); }, {"active_experts: plan expected finalized"});
}

}  // namespace
