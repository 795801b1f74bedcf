// SPDX-License-Identifier: Apache-2.0
// Modality groups (MoMa, arXiv 2407.21770; routers/modality.hpp): each group's tokens routed
// among its experts only. Top-k groups against the double-precision reference run on each
// group's tokens alone (so capacities count only the group's tokens); expert-choice groups
// against the expert-choice router on the group's tokens alone, bit for bit; the layer, the
// per-group statistics, errors.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/safetensors.hpp"
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

// `moekit run`'s modality family: groups of top-k routers over `router.groups.{g}.weight`
// and global experts `experts.{i}`. The AnyLayer equals the layer built directly from the
// same tensors bit for bit, with the input's token types; its outputs are the plan's top-k
// (global ids) and each token's group; bad group configs and a token type no group takes are
// refused.
TEST(ModalityGroups, ConfigFamilyEqualsTheDirectLayer) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(testing::TempDir()) / "moekit_modality_family";
  fs::remove_all(dir);
  fs::create_directories(dir);
  Rng rng(23);
  const int64_t d = 16, f = 12, T = 9;
  const std::string router = R"({"type": "modality", "groups": [
      {"token_types": [0, 2], "num_experts": 3, "k": 2, "norm_topk_prob": true},
      {"token_types": [1], "num_experts": 2, "k": 1, "score_func": "sigmoid"}]})";
  const std::string text = R"({"moekit_config_version": 1, "hidden_size": 16, "router": )" + router +
                           R"(, "experts": {"type": "swiglu", "intermediate_size": 12}})";
  std::vector<ref::Ffn> experts;
  for (int e = 0; e < 5; ++e) experts.push_back(test_support::random_ref_ffn(rng, d, f));
  const std::vector<float> g0 = rng.vec(3 * d, 0.5), g1 = rng.vec(2 * d, 0.5), x = rng.vec(T * d, 1.0);
  std::vector<moekit::io::OutTensor> w = {{"r.router.groups.0.weight", moekit::io::DType::F32, {3, d}, g0.data()},
                                          {"r.router.groups.1.weight", moekit::io::DType::F32, {2, d}, g1.data()}};
  std::vector<std::string> names;
  names.reserve(15);
  for (int e = 0; e < 5; ++e)
    for (const char* m : {"gate_proj", "up_proj", "down_proj"}) {
      names.push_back("r.experts." + std::to_string(e) + "." + m + ".weight");
      const std::string mm = m;
      const std::vector<float>& v = mm == "gate_proj" ? experts[e].gate : mm == "up_proj" ? experts[e].up : experts[e].down;
      w.push_back({names.back(), moekit::io::DType::F32, mm == "down_proj" ? std::vector<int64_t>{d, f} : std::vector<int64_t>{f, d}, v.data()});
    }
  const std::string path = (dir / "w.safetensors").string();
  moekit::io::write_safetensors(path, w);
  auto any = moekit::load_any_layer(moekit::parse_layer_config(text), moekit::io::TensorSource::open(path), "r.");
  const std::vector<int32_t> types = {0, 1, 2, 1, 0, 0, 2, 1, 0};
  const std::vector<uint8_t> pad = {0, 0, 0, 0, 1, 0, 0, 0, 0};
  Batch b = Batch::single(T, d);
  b.token_types = types;
  b.padding = pad;
  std::vector<float> y(static_cast<size_t>(T * d)), want(y.size());
  any->forward(b, x.data(), y.data(), 2);
  TopKOptions o0{.num_experts = 3, .k = 2, .hidden = d}, o1{.num_experts = 2, .k = 1, .hidden = d};
  o0.norm_topk_prob = true;
  o1.score_func = moekit::ScoreFunc::sigmoid;
  moekit::SparseLayer direct(ModalityGroupRouter<TopKRouter>({TopKRouter(o0, g0), TopKRouter(o1, g1)}, {{0, 2}, {1}}),
                             test_support::bank_of(experts, d, f));
  moekit::Workspace ws;
  direct.forward(b, x.data(), want.data(), ws, 1);
  EXPECT_TRUE(test_support::same_bits(y, want));
  const auto outs = any->outputs();
  ASSERT_EQ(outs.size(), 3u);
  std::vector<int32_t> ids(static_cast<size_t>(T * 2));
  std::vector<float> wts(ids.size());
  ws.plan.to_topk(2, ids.data(), wts.data());
  EXPECT_EQ(std::memcmp(outs[0].bytes.data(), ids.data(), outs[0].bytes.size()), 0);
  EXPECT_EQ(std::memcmp(outs[1].bytes.data(), wts.data(), outs[1].bytes.size()), 0);
  ASSERT_EQ(outs[2].name, "token_group");
  std::vector<int32_t> grp(static_cast<size_t>(T));
  std::memcpy(grp.data(), outs[2].bytes.data(), outs[2].bytes.size());
  EXPECT_EQ(grp, (std::vector<int32_t>{0, 1, 0, 1, -1, 0, 0, 1, 0}));
  for (int64_t t = 0; t < T; ++t)  // group 1's tokens use experts 3 and 4 only
    if (grp[t] == 1) EXPECT_GE(ids[static_cast<size_t>(t * 2)], 3);
  // A token type in no group.
  const std::vector<int32_t> bad_types = {0, 1, 5, 1, 0, 0, 2, 1, 0};
  b.token_types = bad_types;
  expect_error([&] { any->forward(b, x.data(), y.data(), 1); }, {"token 2 has type 5, which no group takes"});
  auto refused = [&](const std::string& r, const std::string& needle) {
    expect_error([&] {
      (void)moekit::parse_layer_config(R"({"moekit_config_version": 1, "hidden_size": 16, "router": )" + r +
                                       R"(, "experts": {"type": "swiglu", "intermediate_size": 12}})");
    }, {needle});
  };
  refused(R"({"type": "modality"})", "router.groups: required");
  refused(R"({"type": "modality", "groups": []})", "expected an array of 1 to 1024 groups");
  refused(R"({"type": "modality", "groups": [{"num_experts": 2, "k": 1}]})", "token_types: required");
  refused(R"({"type": "modality", "groups": [{"token_types": [-1], "num_experts": 2, "k": 1}]})", "token_types: expected integers");
  refused(R"({"type": "modality", "groups": [{"token_types": [0], "num_experts": 2, "k": 3}]})", "router.groups[0]");
  refused(R"({"type": "modality", "groups": [{"token_types": [0], "num_experts": 2, "k": 1}, {"token_types": [0], "num_experts": 2, "k": 1}]})",
          "token type 0 expected in one group");
  refused(R"({"type": "modality", "groups": [{"token_types": [0], "num_experts": 2, "k": 1, "logit_bias": true}]})",
          "not supported in a group");
  refused(R"({"type": "modality", "groups": [{"token_types": [0], "num_experts": 2, "k": 1, "bogus": 1}]})", "bogus");
  fs::remove_all(dir);
}
