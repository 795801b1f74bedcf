// SPDX-License-Identifier: Apache-2.0
// Pre-gating (Read-ME, arXiv 2410.19123; routers/pregate.hpp): every layer's plan from the
// embeddings equals the double-precision top-k reference on the embeddings; plans from an
// engine's logits equal the router's own (TopKRouter::route_logits is route() after its logit
// step, bit for bit); a stack run with forward_plan() on the pre-gated plans equals the
// reference; active_experts() is the set each layer runs; prefetching that set into an
// offloaded layer's expert cache (offload::OffloadedLayer::prefetch) while the layer before runs
// means no layer misses, with outputs equal to the resident stack's bit for bit; errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <span>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/layer.hpp"
#include "moekit/offload/expert_cache.hpp"
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

// The engine loop of docs/routers.md's pre-gating section with an expert cache of C < E slots
// per layer (offload::OffloadedLayer): while layer l runs, layer l + 1's future set
// (active_experts of its plan) loads on a background thread; then every expert layer l needs
// is resident (no miss, the loader not called again) and forward_plan() equals the resident
// layer's bit for bit. Sets larger than the cache run in groups, still bit for bit.
TEST(PreGating, PrefetchingTheFutureSetsMakesEveryLayerHit) {
  Rng rng(15);
  const int64_t L = 3, E = 8, k = 2, d = 16, f = 12, C = 4;
  using Offloaded = moekit::offload::OffloadedLayer<TopKRouter>;
  std::vector<TopKRouter> gates;
  std::vector<std::vector<ref::Ffn>> experts(L);
  std::vector<int64_t> loads(L, 0);
  std::vector<moekit::SparseLayer<TopKRouter, moekit::FfnBank>> resident;
  std::vector<Offloaded> cached;
  resident.reserve(L);
  cached.reserve(L);  // a prefetch in flight points at its layer
  TopKOptions o;
  o.num_experts = E;
  o.k = k;
  o.hidden = d;
  for (int64_t l = 0; l < L; ++l) {
    const auto ul = static_cast<size_t>(l);
    gates.emplace_back(o, rng.vec(static_cast<size_t>(E * d), 1.0));
    for (int64_t e = 0; e < E; ++e) experts[ul].push_back(test_support::random_ref_ffn(rng, d, f));
    // The layer's own router is unused: its plans come from the pre-gate.
    const TopKRouter unused(o, rng.vec(static_cast<size_t>(E * d), 1.0));
    resident.emplace_back(unused, test_support::bank_of(experts[ul], d, f));
    moekit::offload::CachedFfnBank bank(E, resident.back().experts().shape(), C, [&experts, &loads, ul](int64_t e) {
      ++loads[ul];
      return test_support::bank_of(std::vector<ref::Ffn>{experts[ul][static_cast<size_t>(e)]}, d, f);
    });
    cached.emplace_back(moekit::SparseLayer<TopKRouter, moekit::offload::CachedFfnBank>(unused, std::move(bank)));
  }
  const moekit::PreGatingRouter pg(gates);
  std::vector<RoutingPlan> plans;
  moekit::RouterScratch s;
  moekit::Workspace ws, wr;
  std::vector<int64_t> needed(L, 0);
  float largest = 0.0f;
  for (int step = 0; step < 16; ++step) {
    const bool fits = step < 12;  // then T k may exceed C: groups
    const int64_t T = fits ? rng.integer(1, 2) : rng.integer(3, 6);
    const Batch batch = Batch::single(T, d);
    std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 1.0), xr = x, y(x.size()), yr(x.size());
    pg.route_all(batch, x.data(), plans, s);  // the embeddings are the first input here
    ASSERT_EQ(static_cast<int64_t>(plans.size()), L);
    cached[0].prefetch(moekit::active_experts(plans[0]));
    for (int64_t l = 0; l < L; ++l) {
      const auto ul = static_cast<size_t>(l);
      cached[ul].wait();
      const moekit::offload::CacheStats before = cached[ul].cache().stats();
      const int64_t loaded = loads[ul];
      if (l + 1 < L) cached[ul + 1].prefetch(moekit::active_experts(plans[ul + 1]));  // overlaps this layer
      const std::vector<int64_t> now = moekit::active_experts(plans[ul]);
      if (fits) {
        for (const int64_t e : now) EXPECT_TRUE(cached[ul].cache().resident(e)) << "step " << step << " layer " << l << " expert " << e;
        needed[ul] += static_cast<int64_t>(now.size());
      }
      cached[ul].forward_plan(batch, x.data(), plans[ul], y.data(), ws, 2);
      if (fits) {
        EXPECT_EQ(cached[ul].cache().stats().misses, before.misses) << "step " << step << " layer " << l;
        EXPECT_EQ(loads[ul], loaded) << "step " << step << " layer " << l;
      }
      resident[ul].forward_plan(batch, xr.data(), plans[ul], yr.data(), wr, 2);
      EXPECT_TRUE(test_support::same_bits(y, yr)) << "step " << step << " layer " << l;
      for (size_t q = 0; q < x.size(); ++q) {
        largest = std::max(largest, std::fabs(yr[q]));
        x[q] += y[q];
        xr[q] += yr[q];
      }
    }
    EXPECT_TRUE(test_support::same_bits(x, xr)) << "step " << step;
    if (step == 11)
      for (int64_t l = 0; l < L; ++l) {
        const moekit::offload::CacheStats& st = cached[static_cast<size_t>(l)].cache().stats();
        EXPECT_EQ(st.misses, 0) << "layer " << l;
        EXPECT_EQ(st.hits, needed[static_cast<size_t>(l)]) << "layer " << l;
        EXPECT_EQ(st.prefetched, loads[static_cast<size_t>(l)]) << "layer " << l << ": every load came from prefetch()";
        EXPECT_GT(st.evictions, 0) << "layer " << l << ": the cache was too small for the run";
      }
  }
  EXPECT_GT(largest, 0.0f);  // the layers computed something
  // A plan of another batch is refused before anything runs.
  const Batch two = Batch::single(2, d);
  std::vector<float> x2(static_cast<size_t>(2 * d), 0.5f);
  pg.route_all(two, x2.data(), plans, s);
  const Batch three = Batch::single(3, d);
  std::vector<float> x3(static_cast<size_t>(3 * d), 0.5f), y3(x3.size());
  expect_error([&] { cached[0].forward_plan(three, x3.data(), plans[0], y3.data(), ws); }, {"plan tokens expected 3, got 2"});
}

}  // namespace
