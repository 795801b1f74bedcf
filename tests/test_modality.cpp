// SPDX-License-Identifier: Apache-2.0
// Modality groups (MoMa, arXiv 2407.21770; routers/modality.hpp): each group's tokens routed
// among its experts only. Top-k groups against the double-precision reference run on each
// group's tokens alone (so capacities count only the group's tokens); expert-choice groups
// against the expert-choice router on the group's tokens alone, bit for bit; the layer, the
// per-group statistics, errors.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/expert_choice.hpp"
#include "moekit/routers/modality.hpp"
#include "moekit/routers/topk.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"
#include "support/topk_params.hpp"

namespace {

using moekit::Batch;
using moekit::ModalityGroupRouter;
using moekit::RoutingPlan;
using moekit::TopKOptions;
using moekit::TopKRouter;
using test_support::expect_error;
using test_support::experts_of;
using test_support::join;
using test_support::Rng;
using test_support::weights_of;

struct Tokens {
  int64_t T = 0, d = 0;
  std::vector<float> x;
  std::vector<int32_t> types;
  std::vector<uint8_t> pad;
  [[nodiscard]] Batch batch() const {
    Batch b = Batch::single(T, d);
    b.token_types = types;
    if (!pad.empty()) b.padding = pad;
    return b;
  }
  // The rows of group types `in` (unpadded), compacted; `where` their token ids.
  std::vector<float> rows_of(const std::vector<int32_t>& in, std::vector<int64_t>& where) const {
    std::vector<float> out;
    where.clear();
    for (int64_t t = 0; t < T; ++t) {
      if (!pad.empty() && pad[static_cast<size_t>(t)]) continue;
      if (std::find(in.begin(), in.end(), types[static_cast<size_t>(t)]) == in.end()) continue;
      where.push_back(t);
      out.insert(out.end(), x.begin() + t * d, x.begin() + (t + 1) * d);
    }
    return out;
  }
};

Tokens random_tokens(Rng& rng, int64_t d) {
  Tokens k;
  k.T = rng.integer(1, 60);
  k.d = d;
  k.x = rng.vec(static_cast<size_t>(k.T * d), 1.0);
  for (int64_t t = 0; t < k.T; ++t) k.types.push_back(static_cast<int32_t>(rng.integer(0, 2)));
  if (rng.coin(0.3)) {
    k.pad.assign(static_cast<size_t>(k.T), 0);
    for (auto& p : k.pad) p = rng.coin(0.2);
  }
  return k;
}

const std::vector<std::vector<int32_t>> kTypes = {{0}, {1, 2}};  // text; image and video

TEST(ModalityGroups, TopKGroupsMatchTheReferenceOnEachGroupAlone) {
  Rng rng(2407);
  int64_t compared = 0;
  for (int i = 0; i < 60; ++i) {
    const int64_t d = rng.integer(1, 24);
    std::vector<TopKRouter> routers;
    std::vector<TopKOptions> opts;
    std::vector<std::vector<float>> gates;
    for (int g = 0; g < 2; ++g) {
      TopKOptions o;
      o.num_experts = rng.integer(1, 8);
      o.k = rng.integer(1, o.num_experts);
      o.hidden = d;
      o.norm_topk_prob = rng.coin(0.5);
      if (rng.coin(0.4)) o.capacity_factor = rng.uniform(0.5, 1.5);
      gates.push_back(rng.vec(static_cast<size_t>(o.num_experts * d), 1.0));
      routers.emplace_back(o, gates.back());
      opts.push_back(o);
    }
    const ModalityGroupRouter<TopKRouter> r(routers, kTypes);
    const Tokens tk = random_tokens(rng, d);
    RoutingPlan plan;
    moekit::RouterScratch s;
    r.route(tk.batch(), tk.x.data(), plan, s, 2);
    for (int g = 0; g < 2; ++g) {
      std::vector<int64_t> where;
      const std::vector<float> xg = tk.rows_of(kTypes[static_cast<size_t>(g)], where);
      const auto Tg = static_cast<int64_t>(where.size());
      const ref::Routing want = ref::route_topk(moekit_test::to_ref(opts[static_cast<size_t>(g)], {}), gates[static_cast<size_t>(g)].data(), xg.data(), Tg);
      const bool cap_tie = want.capacity >= 0 && want.capacity_boundary_gap < 1e-6;
      for (int64_t u = 0; u < Tg; ++u) {
        const ref::TokenRouting& tr = want.token[static_cast<size_t>(u)];
        const int64_t t = where[static_cast<size_t>(u)];
        if (cap_tie || ref::boundary_gap(tr, opts[static_cast<size_t>(g)].k) < 1e-6 || ref::order_gap(tr, opts[static_cast<size_t>(g)].k) < 1e-6) continue;
        const auto ids = experts_of(plan, t);
        const auto w = weights_of(plan, t);
        ASSERT_EQ(ids.size(), tr.slots.size()) << "case " << i << " token " << t;
        for (size_t j = 0; j < ids.size(); ++j) {
          EXPECT_EQ(ids[j], tr.slots[j].expert + r.first_expert(g)) << "case " << i << " token " << t << " slot " << j;
          EXPECT_NEAR(w[j], tr.slots[j].weight, 1e-5 * (1 + tr.slots[j].weight)) << "case " << i << " token " << t;
        }
        ++compared;
      }
    }
    for (int64_t t = 0; t < tk.T; ++t)
      if (!tk.pad.empty() && tk.pad[static_cast<size_t>(t)]) EXPECT_EQ(plan.slots_of(t), 0);
  }
  EXPECT_GT(compared, 600);
}

TEST(ModalityGroups, ExpertChoiceGroupsEqualTheRouterOnEachGroupAlone) {
  Rng rng(5);
  for (int i = 0; i < 30; ++i) {
    const int64_t d = rng.integer(1, 16);
    std::vector<moekit::ExpertChoiceRouter> routers;
    for (int g = 0; g < 2; ++g) {
      moekit::ExpertChoiceOptions o;
      o.num_experts = rng.integer(1, 6);
      o.hidden = d;
      o.capacity_factor = rng.uniform(0.5, 3.0);
      routers.emplace_back(o, rng.vec(static_cast<size_t>(o.num_experts * d), 1.0));
    }
    const ModalityGroupRouter<moekit::ExpertChoiceRouter> r(routers, kTypes);
    const Tokens tk = random_tokens(rng, d);
    RoutingPlan plan;
    moekit::RouterScratch s;
    r.route(tk.batch(), tk.x.data(), plan, s, 1);
    for (int g = 0; g < 2; ++g) {
      std::vector<int64_t> where;
      const std::vector<float> xg = tk.rows_of(kTypes[static_cast<size_t>(g)], where);
      RoutingPlan alone;
      moekit::RouterScratch sa;
      routers[static_cast<size_t>(g)].route(Batch::single(static_cast<int64_t>(where.size()), d), xg.data(), alone, sa, 1);
      for (size_t u = 0; u < where.size(); ++u) {
        auto ids = experts_of(alone, static_cast<int64_t>(u));
        for (int32_t& e : ids) e += static_cast<int32_t>(r.first_expert(g));
        EXPECT_EQ(experts_of(plan, where[u]), ids) << "case " << i << " token " << where[u];
        EXPECT_EQ(weights_of(plan, where[u]), weights_of(alone, static_cast<int64_t>(u)));
      }
    }
  }
}

TEST(ModalityGroups, LayerAndStatistics) {
  Rng rng(9);
  const int64_t d = 8, f = 8;
  std::vector<TopKRouter> routers = {TopKRouter(TopKOptions{4, 2, d}, rng.vec(32, 1.0)),
                                     TopKRouter(TopKOptions{3, 1, d}, rng.vec(24, 1.0))};
  std::vector<ref::Ffn> ex;
  for (int e = 0; e < 7; ++e) ex.push_back(test_support::random_ref_ffn(rng, d, f));
  const moekit::SparseLayer layer(ModalityGroupRouter<TopKRouter>(routers, kTypes), test_support::bank_of(ex, d, f));
  const Tokens tk = random_tokens(rng, d);
  std::vector<float> y(tk.x.size());
  moekit::Workspace ws;
  layer.forward(tk.batch(), tk.x.data(), y.data(), ws, 2);
  const auto st = moekit::modality_group_stats(layer.router(), ws.plan, tk.batch());
  int64_t n0 = 0, n1 = 0;
  for (int64_t t = 0; t < tk.T; ++t) {
    if (!tk.pad.empty() && tk.pad[static_cast<size_t>(t)]) continue;
    (tk.types[static_cast<size_t>(t)] == 0 ? n0 : n1)++;
    for (int32_t e : experts_of(ws.plan, t)) EXPECT_EQ(e < 4, tk.types[static_cast<size_t>(t)] == 0) << t;
  }
  EXPECT_EQ(st[0].tokens, n0);
  EXPECT_EQ(st[1].tokens, n1);
  EXPECT_EQ(st[0].kept_slots, 2 * n0);
  EXPECT_EQ(st[1].kept_slots, n1);
  // The layer output: the reference forward on the layer's own decisions.
  const ref::Routing used = ref::routing_from_view(ref::view_of(ws.plan), tk.pad.empty() ? nullptr : tk.pad.data());
  const auto errs = ref::compare_values(ref::moe_forward(used, ex, {}, tk.x.data(), tk.T, d), y.data(), d, 1e-4, 1e-5);
  EXPECT_TRUE(errs.empty()) << join(errs);
}

TEST(ModalityGroups, Errors) {
  Rng rng(1);
  std::vector<TopKRouter> two = {TopKRouter(TopKOptions{2, 1, 2}, rng.vec(4, 1.0)), TopKRouter(TopKOptions{2, 1, 2}, rng.vec(4, 1.0))};
  expect_error([&] { ModalityGroupRouter<TopKRouter>(two, {{0, 1}, {1}}); }, {"token type 1 expected in one group", "groups 0 and 1"});
  expect_error([&] { ModalityGroupRouter<TopKRouter>(two, {{0}}); }, {"one router per group"});
  expect_error([&] { ModalityGroupRouter<TopKRouter>(two, {{0}, {}}); }, {"group 1 expected at least one token type"});
  const ModalityGroupRouter<TopKRouter> r(two, {{0}, {1}});
  std::vector<float> x(4, 0.5f);
  std::vector<int32_t> types = {0, 7};
  Batch b = Batch::single(2, 2);
  b.token_types = types;
  RoutingPlan plan;
  moekit::RouterScratch s;
  expect_error([&] { r.route(b, x.data(), plan, s, 1); }, {"token 1 has type 7, which no group takes"});
}

}  // namespace
