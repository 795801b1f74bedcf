// SPDX-License-Identifier: Apache-2.0
// Experts shared between layers and iterations (experts/bank_views.hpp, layers/chain.hpp):
// BankRef and ConcatBank give the owning bank's results bit for bit (ReXMoE's cross-layer
// pool), and Chain-of-Experts (arXiv 2506.18945) matches a double-precision iteration of the
// reference layer on each iteration's decisions, which themselves match the reference router.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/blocks.hpp"
#include "moekit/experts/bank_views.hpp"
#include "moekit/layer.hpp"
#include "moekit/layers/chain.hpp"
#include "moekit/routers/topk.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"
#include "support/topk_params.hpp"

namespace {

using moekit::Batch;
using moekit::BankRef;
using moekit::ConcatBank;
using moekit::FfnBank;
using moekit::TopKOptions;
using moekit::TopKRouter;
using test_support::expect_error;
using test_support::join;
using test_support::Rng;

TEST(BankViews, RefAndConcatEqualTheOwningBank) {
  Rng rng(31);
  for (int i = 0; i < 12; ++i) {
    const int64_t d = rng.integer(2, 24), f = rng.integer(2, 24), T = i % 2 ? rng.integer(1, 8) : rng.integer(20, 200);
    const int64_t sizes[3] = {rng.integer(1, 4), rng.integer(1, 4), rng.integer(1, 4)};
    std::vector<std::vector<ref::Ffn>> parts(3);
    std::vector<ref::Ffn> all;
    for (int b = 0; b < 3; ++b)
      for (int64_t e = 0; e < sizes[b]; ++e) {
        parts[static_cast<size_t>(b)].push_back(test_support::random_ref_ffn(rng, d, f));
        all.push_back(parts[static_cast<size_t>(b)].back());
      }
    const int64_t E = static_cast<int64_t>(all.size());
    const TopKOptions o{E, std::min<int64_t>(2, E), d};
    const std::vector<float> W = rng.vec(static_cast<size_t>(E * d), 1.0), x = rng.vec(static_cast<size_t>(T * d), 1.0);
    const FfnBank b0 = test_support::bank_of(parts[0], d, f), b1 = test_support::bank_of(parts[1], d, f),
                  b2 = test_support::bank_of(parts[2], d, f), whole = test_support::bank_of(all, d, f);
    const moekit::SparseLayer owning(TopKRouter(o, W), test_support::bank_of(all, d, f));
    const moekit::SparseLayer viewed(TopKRouter(o, W), BankRef<FfnBank>(whole));
    const moekit::SparseLayer pooled(TopKRouter(o, W), ConcatBank<BankRef<FfnBank>>({BankRef<FfnBank>(b0), BankRef<FfnBank>(b1), BankRef<FfnBank>(b2)}));
    std::vector<float> y0(x.size()), y1(x.size()), y2(x.size());
    moekit::Workspace w0, w1, w2;
    owning.forward(Batch::single(T, d), x.data(), y0.data(), w0, 2);
    viewed.forward(Batch::single(T, d), x.data(), y1.data(), w1, 2);
    pooled.forward(Batch::single(T, d), x.data(), y2.data(), w2, 2);
    EXPECT_EQ(0, std::memcmp(y0.data(), y1.data(), x.size() * sizeof(float))) << "case " << i;
    EXPECT_EQ(0, std::memcmp(y0.data(), y2.data(), x.size() * sizeof(float))) << "case " << i;
    const ConcatBank<BankRef<FfnBank>>& cb = pooled.experts();
    EXPECT_EQ(cb.bank_of(sizes[0]), sizes[1] > 0 ? 1u : 2u);
    EXPECT_EQ(cb.first_expert_of(2), sizes[0] + sizes[1]);
  }
  std::vector<BankRef<FfnBank>> none;
  expect_error([&] { ConcatBank<BankRef<FfnBank>> c(none); }, {"ConcatBank: expected at least one bank"});
}

// ReXMoE's stack: each layer owns its experts and routes over its own and its neighbours'
// (a ConcatBank of views, no copies), residual between layers. Against the reference layer on
// each layer's decisions, over the concatenated reference experts; layer l's pool must hold
// exactly the objects the neighbours own (no layer sees another's copy).
TEST(BankViews, ReXMoeStackSharesNeighbourExperts) {
  Rng rng(2510);
  int64_t compared = 0;
  for (int i = 0; i < 8; ++i) {
    const int64_t L = 3, d = rng.integer(4, 20), f = rng.integer(4, 20), T = rng.integer(1, 30);
    std::vector<std::vector<ref::Ffn>> own(L);
    std::vector<FfnBank> banks;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t E = rng.integer(1, 4);
      for (int64_t e = 0; e < E; ++e) own[static_cast<size_t>(l)].push_back(test_support::random_ref_ffn(rng, d, f));
      banks.push_back(test_support::bank_of(own[static_cast<size_t>(l)], d, f));
    }
    using Pool = ConcatBank<BankRef<FfnBank>>;
    std::vector<moekit::SparseLayer<TopKRouter, Pool>> layers;
    layers.reserve(static_cast<size_t>(L));
    std::vector<std::vector<ref::Ffn>> pools(L);
    std::vector<std::vector<float>> gates;
    std::vector<TopKOptions> opts;
    for (int64_t l = 0; l < L; ++l) {
      std::vector<BankRef<FfnBank>> views;
      for (int64_t m = std::max<int64_t>(0, l - 1); m <= std::min(L - 1, l + 1); ++m) {
        views.emplace_back(banks[static_cast<size_t>(m)]);
        for (const ref::Ffn& e : own[static_cast<size_t>(m)]) pools[static_cast<size_t>(l)].push_back(e);
      }
      const int64_t E = static_cast<int64_t>(pools[static_cast<size_t>(l)].size());
      TopKOptions o{E, std::min<int64_t>(rng.integer(1, 3), E), d};
      o.norm_topk_prob = rng.coin(0.5);
      opts.push_back(o);
      gates.push_back(rng.vec(static_cast<size_t>(E * d), 2.0 / std::sqrt(double(d))));
      layers.emplace_back(TopKRouter(o, gates.back()), Pool(std::move(views)));
    }
    // The middle layer's pool is its neighbours' banks themselves.
    EXPECT_EQ(&layers[1].experts().banks()[0].bank(), &banks[0]);
    EXPECT_EQ(&layers[1].experts().banks()[2].bank(), &banks[2]);
    const std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 1.0);
    std::vector<float> h = x, y(x.size());
    std::vector<double> state(x.begin(), x.end());
    for (int64_t l = 0; l < L; ++l) {
      moekit::Workspace ws;
      layers[static_cast<size_t>(l)].forward(Batch::single(T, d), h.data(), y.data(), ws, 2);
      const std::vector<float> xs(state.begin(), state.end());
      const ref::Routing want = ref::route_topk(moekit_test::to_ref(opts[static_cast<size_t>(l)], {}),
                                                gates[static_cast<size_t>(l)].data(), xs.data(), T, nullptr);
      ref::CompareOptions co;
      co.tie_rel = 1e-4;
      const ref::CompareReport rep = ref::compare_routing(want, ref::view_of(ws.plan), co);
      EXPECT_TRUE(rep.errors.empty()) << "case " << i << " layer " << l << join(rep.errors);
      compared += rep.compared;
      const ref::Routing used = ref::routing_from_view(ref::view_of(ws.plan), nullptr);
      const std::vector<double> yr = ref::moe_forward(used, pools[static_cast<size_t>(l)], {}, xs.data(), T, d);
      const auto errs = ref::compare_values(yr, y.data(), d, 1e-3, 1e-4);
      EXPECT_TRUE(errs.empty()) << "case " << i << " layer " << l << join(errs);
      for (size_t q = 0; q < state.size(); ++q) {
        state[q] += yr[q];
        h[q] += y[q];
      }
    }
  }
  EXPECT_GT(compared, 50);
}

// A view is treated as its bank: block traits and the BlockContext overload pass through.
using AttnBank = moekit::FunctorBank<moekit::CausalAttentionBlock>;
using GammaBank = moekit::FunctorBank<moekit::GammaModBlock>;
static_assert(moekit::whole_blocks_v<BankRef<AttnBank>> && !moekit::applies_weight_v<BankRef<AttnBank>>);
static_assert(moekit::whole_blocks_v<BankRef<GammaBank>> && moekit::applies_weight_v<BankRef<GammaBank>>);
static_assert(moekit::ContextAwareBank<BankRef<AttnBank>> && !moekit::ContextAwareBank<BankRef<FfnBank>>);

TEST(ChainOfExperts, MatchesReferenceIterations) {
  Rng rng(2506);
  int64_t compared = 0;
  for (int i = 0; i < 15; ++i) {
    const int64_t E = rng.integer(2, 8), k = rng.integer(1, std::min<int64_t>(E, 3)), d = rng.integer(4, 24),
                  f = rng.integer(4, 24), T = rng.integer(1, 24), C = rng.integer(1, 3);
    std::vector<ref::Ffn> experts;
    for (int64_t e = 0; e < E; ++e) experts.push_back(test_support::random_ref_ffn(rng, d, f));
    TopKOptions o{E, k, d};
    o.norm_topk_prob = rng.coin(0.5);
    std::vector<TopKRouter> routers;
    std::vector<std::vector<float>> gates;
    for (int64_t c = 0; c < C; ++c) {
      gates.push_back(rng.vec(static_cast<size_t>(E * d), 2.0 / std::sqrt(double(d))));
      routers.emplace_back(o, gates.back());
    }
    const moekit::ChainLayer chain(std::move(routers), test_support::bank_of(experts, d, f));
    Batch b = Batch::single(T, d);
    std::vector<uint8_t> pad;
    if (rng.coin(0.3)) {
      pad.assign(static_cast<size_t>(T), 0);
      pad[0] = 1;
      b.padding = pad;
    }
    const std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 1.0);
    std::vector<float> out(x.size());
    moekit::ChainWorkspace cw;
    chain.forward(b, x.data(), out.data(), cw, 2);
    ASSERT_EQ(static_cast<int64_t>(cw.plans.size()), C);
    // Reference: iterate in double on each iteration's decisions; check the decisions against
    // the reference router on the reference's own state (near-ties excluded).
    std::vector<double> state(x.begin(), x.end());
    for (int64_t c = 0; c < C; ++c) {
      const std::vector<float> xs(state.begin(), state.end());
      const ref::Routing want = ref::route_topk(moekit_test::to_ref(o, {}), gates[static_cast<size_t>(c)].data(), xs.data(), T,
                                                pad.empty() ? nullptr : pad.data());
      ref::CompareOptions co;
      co.tie_rel = 1e-4;
      const ref::CompareReport rep = ref::compare_routing(want, ref::view_of(cw.plans[static_cast<size_t>(c)]), co);
      EXPECT_TRUE(rep.errors.empty()) << "case " << i << " iteration " << c << join(rep.errors);
      compared += rep.compared;
      const ref::Routing used = ref::routing_from_view(ref::view_of(cw.plans[static_cast<size_t>(c)]), pad.empty() ? nullptr : pad.data());
      const std::vector<double> y = ref::moe_forward(used, experts, {}, xs.data(), T, d);
      for (size_t q = 0; q < state.size(); ++q) state[q] += y[q];
    }
    std::vector<double> want_out(x.size());
    for (size_t q = 0; q < x.size(); ++q) want_out[q] = pad.empty() || !pad[q / static_cast<size_t>(d)] ? state[q] - x[q] : 0.0;
    const auto errs = ref::compare_values(want_out, out.data(), d, 1e-3, 1e-4);
    EXPECT_TRUE(errs.empty()) << "case " << i << join(errs);
  }
  EXPECT_GT(compared, 150);
  expect_error([] { moekit::ChainLayer<TopKRouter, FfnBank>({}, FfnBank(1, moekit::FfnShape{2, 2})); },
               {"ChainLayer: expected at least one iteration's router"});
}

}  // namespace
