// SPDX-License-Identifier: Apache-2.0
// Top-k router family (ROUTING.md section 1) against the double-precision reference in
// tests/reference: every option and preset on random shapes with fixed seeds, edge cases,
// plan invariants, thread determinism and argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/io/config.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"
#include "reference/reference.hpp"
#include "support/topk_params.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Batch;
using moekit::DropPolicy;
using moekit::GroupScore;
using moekit::RouterScratch;
using moekit::RoutingPlan;
using moekit::ScoreFunc;
using moekit::TopKOptions;
using moekit::TopKRouter;

// ------------------------------------------------------------------------ helpers

using test_support::Rng;

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& m : v) s += "\n  " + m;
  return s;
}

using moekit_test::to_ref;

// One routing problem: options, weights, hidden states and batch layout.
struct RouteCase {
  TopKOptions opt;
  std::vector<float> W, bias, x;
  std::vector<uint8_t> pad;      // empty: no padding mask
  std::vector<int32_t> offsets;  // empty: one sequence
  int64_t T = 0;

  Batch batch() const {
    Batch b = Batch::single(T, opt.hidden);
    b.padding = pad;
    b.sequence_offsets = offsets;
    return b;
  }
  const uint8_t* pad_ptr() const { return pad.empty() ? nullptr : pad.data(); }
  int64_t routed() const {
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) n += pad.empty() || pad[static_cast<size_t>(t)] == 0;
    return n;
  }
};

std::string describe(const RouteCase& c) {
  const TopKOptions& o = c.opt;
  char buf[400];
  std::snprintf(buf, sizeof buf,
                "T=%lld E=%lld k=%lld d=%lld %s%s%s norm=%d norm_p=%g scale=%g bias=%d groups=%lld/%lld/%d cap=%g "
                "min=%lld policy=%d renorm=%d padded=%d seqs=%zu",
                (long long)c.T, (long long)o.num_experts, (long long)o.k, (long long)o.hidden,
                o.score_func == ScoreFunc::softmax ? "softmax" : "sigmoid", o.topk_then_softmax ? "+topk_then_softmax" : "",
                o.select_on_logits ? "+select_on_logits" : "", o.norm_topk_prob, o.norm_p, o.routed_scaling_factor, !c.bias.empty(), (long long)o.n_group,
                (long long)o.topk_group, static_cast<int>(o.group_score), o.capacity_factor, (long long)o.min_capacity, static_cast<int>(o.drop_policy),
                o.renormalize_after_drop, !c.pad.empty(), c.offsets.empty() ? size_t{1} : c.offsets.size() - 1);
  return buf;
}

// Random sequence boundaries and padding for T tokens.
void random_layout(Rng& rng, RouteCase& c, double p_padding) {
  if (c.T > 0 && rng.coin(0.5)) {
    const int64_t S = rng.integer(1, std::min<int64_t>(c.T, 5));
    std::vector<int32_t> cuts{0, static_cast<int32_t>(c.T)};
    for (int64_t s = 1; s < S; ++s) cuts.push_back(static_cast<int32_t>(rng.integer(0, c.T)));
    std::sort(cuts.begin(), cuts.end());
    c.offsets = cuts;
  }
  if (rng.coin(p_padding)) {
    c.pad.assign(static_cast<size_t>(c.T), 0);
    const double rate = rng.uniform(0.05, 0.6);
    for (uint8_t& p : c.pad) p = rng.coin(rate);
  }
}

struct Knobs {
  double p_group = 0.25, p_capacity = 0.35, p_padding = 0.3, p_sigmoid = 0.3, p_tts = 0.2, p_bias = 0.3;
  int64_t min_T = 0, max_T = 70;
};

RouteCase random_case(Rng& rng, const Knobs& kn = {}) {
  RouteCase c;
  TopKOptions& o = c.opt;
  if (rng.coin(kn.p_group)) {
    const int64_t G = std::vector<int64_t>{2, 4, 8}[static_cast<size_t>(rng.integer(0, 2))];
    const int64_t g = rng.integer(1, 64 / G);
    o.num_experts = G * g;
    o.n_group = G;
    o.topk_group = rng.integer(1, G);
    o.k = rng.integer(1, std::min<int64_t>(o.topk_group * g, rng.coin(0.6) ? 8 : 64));
    o.group_score = std::vector<GroupScore>{GroupScore::top2_sum, GroupScore::max,
                                            GroupScore::topk_sum}[static_cast<size_t>(rng.integer(0, 2))];
    if (o.group_score == GroupScore::topk_sum && o.k < o.topk_group) o.group_score = GroupScore::max;
  } else {
    o.num_experts = rng.integer(1, 64);
    o.k = rng.integer(1, std::min<int64_t>(o.num_experts, rng.coin(0.6) ? 8 : 64));
  }
  o.hidden = rng.coin(0.2) ? rng.integer(1, 8) : rng.integer(1, 96);
  if (rng.coin(kn.p_sigmoid)) o.score_func = ScoreFunc::sigmoid;
  else if (rng.coin(kn.p_tts)) o.topk_then_softmax = true;
  o.norm_topk_prob = rng.coin(0.5);
  o.select_on_logits = !o.topk_then_softmax && rng.coin(0.2);
  // (k >= 2: with one slot every p-norm weight is exactly 1, all capacity decisions ties)
  if (!o.norm_topk_prob && !o.topk_then_softmax && o.k >= 2 && rng.coin(0.3))
    o.norm_p = std::vector<double>{1.0, 2.0, 0.5}[static_cast<size_t>(rng.integer(0, 2))];
  if (rng.coin(0.4)) o.routed_scaling_factor = static_cast<float>(rng.uniform(0.5, 3.0));
  if (rng.coin(kn.p_capacity)) {
    const double cfs[] = {0.5, 1.0, 1.25, 2.0, rng.uniform(0.1, 3.0)};
    o.capacity_factor = cfs[rng.integer(0, 4)];
    if (rng.coin(0.4)) o.min_capacity = rng.integer(1, 5);
    o.drop_policy = static_cast<DropPolicy>(rng.integer(0, 2));
    o.renormalize_after_drop = rng.coin(0.5);
  }
  c.T = rng.integer(kn.min_T, kn.max_T);
  const double logit_std = rng.uniform(0.5, 4.0);
  c.W = rng.vec(static_cast<size_t>(o.num_experts * o.hidden), 3.0 * logit_std / std::sqrt(double(o.hidden)));
  c.x = rng.vec(static_cast<size_t>(c.T * o.hidden), 1.0);
  if (rng.coin(kn.p_bias)) c.bias = rng.vec(static_cast<size_t>(o.num_experts), rng.uniform(0.01, 0.3));
  random_layout(rng, c, kn.p_padding);
  return c;
}

// Near-tie bookkeeping over the whole file (printed once at the end).
struct Totals {
  int64_t cases = 0, compared = 0, near_tie = 0, capacity_excluded = 0;
};
Totals g_totals;

class TotalsPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    std::printf("[ topk ref ] cases: %lld, tokens compared exactly: %lld, excluded as near-ties: %lld, "
                "excluded for capacity near-ties: %lld\n",
                (long long)g_totals.cases, (long long)g_totals.compared, (long long)g_totals.near_tie, (long long)g_totals.capacity_excluded);
  }
};
[[maybe_unused]] ::testing::Environment* const g_env = ::testing::AddGlobalTestEnvironment(new TotalsPrinter);

// Checks the to_topk view of a plan against its slot arrays.
void check_to_topk(const RoutingPlan& plan, int64_t k, const uint8_t* pad) {
  const int64_t T = plan.num_tokens();
  std::vector<int32_t> ids(static_cast<size_t>(T * k), 7);
  std::vector<float> w(static_cast<size_t>(T * k), 7.0f);
  plan.to_topk(k, ids.data(), w.data());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const auto i = static_cast<size_t>(t * k + j);
      if (pad != nullptr && pad[t]) {
        EXPECT_EQ(ids[i], -1) << "padded token " << t;
        EXPECT_EQ(w[i], 0.0f) << "padded token " << t;
        continue;
      }
      const auto s = static_cast<size_t>(plan.slot_offsets()[static_cast<size_t>(t)] + j);
      if (plan.slot_dropped()[s]) {
        EXPECT_EQ(ids[i], -1) << "dropped slot of token " << t;
        EXPECT_EQ(w[i], 0.0f) << "dropped slot of token " << t;
      } else {
        EXPECT_EQ(ids[i], plan.slot_expert()[s]) << "token " << t;
        EXPECT_EQ(w[i], plan.slot_weight()[s]) << "token " << t;
      }
    }
  }
}

// Routes with the library and the reference; checks invariants, to_topk, choices, weights
// and counts. Returns the comparison report.
ref::CompareReport check_route(const RouteCase& c, const ref::CompareOptions& co = {}, int threads = 1) {
  SCOPED_TRACE(describe(c));
  const TopKRouter router(c.opt, c.W, c.bias);
  RoutingPlan plan;
  RouterScratch scratch;
  router.route(c.batch(), c.x.data(), plan, scratch, threads);
  const ref::PlanView view = ref::view_of(plan);
  const auto inv = ref::plan_invariant_errors(view, c.pad_ptr(), c.opt.k);
  EXPECT_TRUE(inv.empty()) << "plan invariants:" << join(inv);
  check_to_topk(plan, c.opt.k, c.pad_ptr());

  const ref::TopKParams p = to_ref(c.opt, c.bias);
  EXPECT_EQ(c.opt.capacity(c.routed()), ref::capacity(p, c.routed()));
  const ref::Routing want = ref::route_topk(p, c.W.data(), c.x.data(), c.T, c.pad_ptr());
  ref::CompareReport rep = ref::compare_routing(want, view, co);
  EXPECT_TRUE(rep.errors.empty()) << "routing differs from the reference:" << join(rep.errors);
  if (rep.near_tie == 0 && rep.capacity_excluded == 0) {
    for (int64_t e = 0; e < c.opt.num_experts; ++e) {
      EXPECT_EQ(plan.kept_of(e), want.kept_of[static_cast<size_t>(e)]) << "expert " << e;
      EXPECT_EQ(plan.dropped_of(e), want.dropped_of[static_cast<size_t>(e)]) << "expert " << e;
    }
  }
  if (want.capacity >= 0) {
    for (int64_t e = 0; e < c.opt.num_experts; ++e) {
      EXPECT_LE(plan.kept_of(e), want.capacity) << "expert " << e;
    }
  }
  ++g_totals.cases;
  if (co.exclude_near_ties) {
    g_totals.compared += rep.compared;
    g_totals.near_tie += rep.near_tie;
    g_totals.capacity_excluded += rep.capacity_excluded;
  }
  return rep;
}

// Runs many random cases; asserts near-tie exclusions are rare and the test is not vacuous.
void run_random(uint64_t seed, int cases, const Knobs& kn) {
  Rng rng(seed);
  int64_t compared = 0, excluded = 0, unpadded = 0;
  for (int i = 0; i < cases; ++i) {
    const RouteCase c = random_case(rng, kn);
    SCOPED_TRACE("case " + std::to_string(i));
    const ref::CompareReport rep = check_route(c);
    compared += rep.compared;
    excluded += rep.near_tie + rep.capacity_excluded;
    unpadded += c.routed();
    if (::testing::Test::HasFailure()) return;  // one precise failure beats hundreds
  }
  EXPECT_GT(compared, unpadded / 2) << "most tokens must be compared";
  EXPECT_LE(excluded, unpadded / 50 + 2) << "near-tie exclusions should be rare";
}

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected moekit::error mentioning \"" << needle << "\", nothing thrown";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message \"" << e.what() << "\" does not mention \"" << needle << "\"";
  }
}

TopKOptions options(int64_t E, int64_t k, int64_t d) {
  TopKOptions o;
  o.num_experts = E;
  o.k = k;
  o.hidden = d;
  return o;
}

// Routes and returns the plan (single thread).
RoutingPlan route(const RouteCase& c, int threads = 1) {
  const TopKRouter router(c.opt, c.W, c.bias);
  RoutingPlan plan;
  RouterScratch scratch;
  router.route(c.batch(), c.x.data(), plan, scratch, threads);
  return plan;
}

std::vector<int32_t> experts_of(const RoutingPlan& p, int64_t t) {
  const auto b = p.slot_offsets()[static_cast<size_t>(t)], e = p.slot_offsets()[static_cast<size_t>(t) + 1];
  return {p.slot_expert().begin() + b, p.slot_expert().begin() + e};
}
std::vector<float> weights_of(const RoutingPlan& p, int64_t t) {
  const auto b = p.slot_offsets()[static_cast<size_t>(t)], e = p.slot_offsets()[static_cast<size_t>(t) + 1];
  return {p.slot_weight().begin() + b, p.slot_weight().begin() + e};
}
std::vector<uint8_t> dropped_of(const RoutingPlan& p, int64_t t) {
  const auto b = p.slot_offsets()[static_cast<size_t>(t)], e = p.slot_offsets()[static_cast<size_t>(t) + 1];
  return {p.slot_dropped().begin() + b, p.slot_dropped().begin() + e};
}

bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// A case with d = 1, x = 1 and W = logits: the logits are exact in float and double.
RouteCase exact_logits_case(const std::vector<float>& logits, int64_t k, int64_t T = 1) {
  RouteCase c;
  c.opt = options(static_cast<int64_t>(logits.size()), k, 1);
  c.W = logits;
  c.T = T;
  c.x.assign(static_cast<size_t>(T), 1.0f);
  return c;
}

// ------------------------------------------------------------------------ reference self-checks

TEST(TopKReference, HandComputedSoftmaxTop2) {
  // Logits 1, 2, 3: softmax = e^(L-3) / (1 + e^-1 + e^-2).
  const RouteCase c = exact_logits_case({1.0f, 2.0f, 3.0f}, 2);
  ref::TopKParams p = to_ref(c.opt, {});
  ref::Routing r = ref::route_topk(p, c.W.data(), c.x.data(), 1);
  const double z = 1.0 + std::exp(-1.0) + std::exp(-2.0);
  ASSERT_EQ(r.token[0].slots.size(), 2u);
  EXPECT_EQ(r.token[0].slots[0].expert, 2);
  EXPECT_EQ(r.token[0].slots[1].expert, 1);
  EXPECT_NEAR(r.token[0].slots[0].weight, 1.0 / z, 1e-15);
  EXPECT_NEAR(r.token[0].slots[1].weight, std::exp(-1.0) / z, 1e-15);
  p.norm_topk_prob = true;
  p.routed_scaling_factor = 2.0;
  r = ref::route_topk(p, c.W.data(), c.x.data(), 1);
  EXPECT_NEAR(r.token[0].slots[0].weight, 2.0 / (1.0 + std::exp(-1.0)), 1e-14);
  EXPECT_NEAR(r.token[0].slots[1].weight, 2.0 * std::exp(-1.0) / (1.0 + std::exp(-1.0)), 1e-14);
}

TEST(TopKSelectOnLogits, SaturatedSigmoidStillPicksTheLargerLogit) {
  // sigmoid(17) and sigmoid(20) are both 1.0f: on the scores the tie goes to expert 0, on the
  // logits (Llama 4's top-k) expert 1 wins; the weight is 1 either way.
  RouteCase c = exact_logits_case({17.0f, 20.0f, -3.0f}, 1);
  c.opt.score_func = ScoreFunc::sigmoid;
  ASSERT_EQ(1.0f / (1.0f + std::exp(-17.0f)), 1.0f);
  EXPECT_EQ(experts_of(route(c), 0), std::vector<int32_t>{0});
  c.opt.select_on_logits = true;
  const RoutingPlan plan = route(c);
  EXPECT_EQ(experts_of(plan, 0), std::vector<int32_t>{1});
  EXPECT_EQ(weights_of(plan, 0), std::vector<float>{1.0f});
  check_route(c);
}

TEST(TopKSparseMixer, HandComputedAndRandomAgainstReference) {
  // Logits 2, 1.9, 1.0, -1 with eps 0.05 (2 eps = 0.1): pick 1 = expert 0 (m = 2): expert 1
  // is within (2 - 1.9) / 2 = 0.05, expert 2 not (0.5): w1 = 1 / (1 + e^-0.1). Pick 2 = expert
  // 1 (m = 1.9), candidates without expert 0: expert 2 is (0.9 / 1.9) away: w2 = 1.
  RouteCase c = exact_logits_case({2.0f, 1.9f, 1.0f, -1.0f}, 2);
  c.opt.sparsemixer_eps = 0.05;
  const RoutingPlan plan = route(c);
  EXPECT_EQ(experts_of(plan, 0), (std::vector<int32_t>{0, 1}));
  const auto w = weights_of(plan, 0);
  EXPECT_NEAR(w[0], 1.0 / (1.0 + std::exp(-0.1)), 1e-6);
  EXPECT_EQ(w[1], 1.0f);
  check_route(c);
  // Random problems: the double reference transcribes the same rule independently.
  Rng rng(0x5A7);
  for (int i = 0; i < 200; ++i) {
    Knobs kn;
    kn.p_group = 0.0;
    kn.p_tts = 0.0;
    kn.p_sigmoid = 0.0;
    RouteCase r = random_case(rng, kn);
    r.opt.num_experts = rng.integer(2, 40);
    r.opt.k = 2;
    r.opt.norm_topk_prob = false;
    r.opt.norm_p = 0.0;
    r.opt.select_on_logits = false;
    r.opt.sparsemixer_eps = std::vector<double>{0.01, 0.1, 0.5, 3.0}[static_cast<size_t>(i % 4)];
    r.bias.clear();
    r.W = rng.vec(static_cast<size_t>(r.opt.num_experts * r.opt.hidden), 3.0 / std::sqrt(double(r.opt.hidden)));
    check_route(r);
    if (HasFailure()) return;
  }
}

TEST(TopKReference, HandComputedGroupsBiasAndCapacity) {
  // Sigmoid + bias, 4 groups of 2, keep 2 groups, k = 2.
  const std::vector<float> L = {0.0f, 1.0f, 2.0f, -1.0f, 0.5f, 0.5f, -2.0f, 3.0f};
  RouteCase c = exact_logits_case(L, 2);
  c.opt.score_func = ScoreFunc::sigmoid;
  c.opt.n_group = 4;
  c.opt.topk_group = 2;
  ref::TopKParams p = to_ref(c.opt, {});
  p.bias = {0, 0, 0, 0, 0, 0, 0.5, -0.9};
  auto s = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  // Group scores: g0 = s(0)+s(1) = 1.231, g1 = s(2)+s(-1) = 1.150, g2 = 2 s(.5) = 1.245,
  // g3 = (s(-2)+.5) + (s(3)-.9) = 0.672 -> groups 2 and 0; top-2 selection: experts 1, 4.
  const ref::Routing r = ref::route_topk(p, c.W.data(), c.x.data(), 1);
  ASSERT_EQ(r.token[0].slots.size(), 2u);
  EXPECT_EQ(r.token[0].slots[0].expert, 1);
  EXPECT_EQ(r.token[0].slots[1].expert, 4);
  EXPECT_NEAR(r.token[0].slots[0].weight, s(1.0), 1e-15);
  EXPECT_EQ(r.token[0].group_order[0], 2);
  // DeepSeek-V2's rule (group score = best member): g0 = s(1) = .731, g1 = s(2) = .881,
  // g2 = s(.5) = .622, g3 = s(-2) + .5 = .619 -> groups 1 and 0; experts 2, 1.
  c.opt.group_score = GroupScore::max;
  ref::TopKParams pm = to_ref(c.opt, {});
  pm.bias = p.bias;
  const ref::Routing rm = ref::route_topk(pm, c.W.data(), c.x.data(), 1);
  EXPECT_EQ(rm.token[0].slots[0].expert, 2);
  EXPECT_EQ(rm.token[0].slots[1].expert, 1);
  EXPECT_EQ(rm.token[0].group_order[0], 1);
  EXPECT_EQ(rm.token[0].group_order[1], 0);
  // Capacity: 5 identical tokens, k = 1, E = 2, factor 1 -> C = ceil(2.5) = 3.
  ref::TopKParams q = to_ref(options(2, 1, 1), {});
  q.capacity_factor = 1.0;
  q.drop_policy = ref::DropPolicy::position;
  const std::vector<float> W = {1.0f, 0.0f}, x(5, 1.0f);
  const ref::Routing rc = ref::route_topk(q, W.data(), x.data(), 5);
  EXPECT_EQ(rc.capacity, 3);
  for (int t = 0; t < 5; ++t) EXPECT_EQ(rc.token[static_cast<size_t>(t)].slots[0].dropped, t >= 3);
  EXPECT_EQ(rc.kept_of[0], 3);
  EXPECT_EQ(rc.dropped_of[0], 2);
}

// ------------------------------------------------------------------------ random comparisons

TEST(TopKRandom, MatchesReferenceAllOptions) { run_random(0x70C4A11, 400, Knobs{}); }

TEST(TopKRandom, MatchesReferenceSigmoidBiasGroups) {
  Knobs kn;
  kn.p_group = 0.8;
  kn.p_sigmoid = 0.7;
  kn.p_bias = 0.8;
  run_random(0xDEE95EE, 250, kn);
}

TEST(TopKRandom, MatchesReferenceWithCapacity) {
  Knobs kn;
  kn.p_capacity = 1.0;
  kn.min_T = 1;
  run_random(0xCA9AC17, 300, kn);
}

TEST(TopKRandom, MatchesReferenceTopkThenSoftmax) {
  Knobs kn;
  kn.p_sigmoid = 0.0;
  kn.p_tts = 1.0;
  run_random(0x7075, 150, kn);
}

// ------------------------------------------------------------------------ edge cases

TEST(TopKEdge, EmptyBatch) {
  for (double cf : {0.0, 1.0}) {
    RouteCase c;
    c.opt = options(6, 2, 5);
    c.opt.capacity_factor = cf;
    c.opt.min_capacity = 2;
    c.W = Rng(1).vec(30, 1.0);
    const RoutingPlan plan = route(c);
    EXPECT_TRUE(plan.finalized());
    EXPECT_EQ(plan.num_tokens(), 0);
    EXPECT_EQ(plan.num_slots(), 0);
    EXPECT_EQ(plan.num_kept(), 0);
    EXPECT_EQ(plan.num_dropped(), 0);
    for (int64_t e = 0; e < 6; ++e) EXPECT_EQ(plan.kept_of(e), 0);
    check_route(c);
  }
}

TEST(TopKEdge, SingleToken) {
  Rng rng(11);
  Knobs kn;
  kn.min_T = kn.max_T = 1;
  for (int i = 0; i < 60; ++i) check_route(random_case(rng, kn));
  EXPECT_FALSE(::testing::Test::HasFailure());
}

TEST(TopKEdge, KEqualsOneAndKEqualsE) {
  Rng rng(12);
  for (int64_t E : {1, 2, 3, 7, 16, 33, 64}) {
    for (bool all : {false, true}) {
      RouteCase c = random_case(rng, Knobs{0.0, 0.3, 0.3, 0.3, 0.2, 0.3, 1, 40});
      c.opt.num_experts = E;
      c.opt.k = all ? E : 1;
      c.W = rng.vec(static_cast<size_t>(E * c.opt.hidden), 2.0);
      if (!c.bias.empty()) c.bias = rng.vec(static_cast<size_t>(E), 0.1);
      check_route(c);
      if (all && c.opt.capacity_factor == 0.0) {
        // k = E: every expert once per token; with norm the weights sum to the scaling.
        const RoutingPlan plan = route(c);
        for (int64_t t = 0; t < c.T; ++t) {
          if (!c.pad.empty() && c.pad[static_cast<size_t>(t)]) continue;
          std::vector<int32_t> ids = experts_of(plan, t);
          std::sort(ids.begin(), ids.end());
          for (int64_t e = 0; e < E; ++e) ASSERT_EQ(ids[static_cast<size_t>(e)], e);
          // (a p-norm other than 1 normalises another sum)
          if (c.opt.norm_topk_prob || c.opt.topk_then_softmax || c.opt.norm_p == 1.0 ||
              (c.opt.score_func == ScoreFunc::softmax && c.opt.norm_p == 0.0)) {
            double sum = 0;
            for (float w : weights_of(plan, t)) sum += w;
            EXPECT_NEAR(sum, c.opt.routed_scaling_factor, 1e-5 * c.opt.routed_scaling_factor);
          }
        }
      }
    }
  }
}

TEST(TopKEdge, AllEqualLogitsTieToLowerExpertId) {
  // Zero gate weight: every logit is 0, every score equal; ties go to the lower id.
  for (int variant = 0; variant < 4; ++variant) {
    for (int64_t E : {1, 5, 8, 64}) {
      for (int64_t k : {int64_t{1}, (E + 1) / 2, E}) {
        RouteCase c;
        c.opt = options(E, k, 13);
        c.opt.score_func = variant == 1 ? ScoreFunc::sigmoid : ScoreFunc::softmax;
        c.opt.topk_then_softmax = variant == 2;
        c.opt.norm_topk_prob = variant == 3;
        c.W.assign(static_cast<size_t>(E * 13), 0.0f);
        c.T = 9;
        c.x = Rng(static_cast<uint64_t>(E * 100 + k)).vec(9 * 13, 1.0);
        SCOPED_TRACE("variant " + std::to_string(variant) + " E=" + std::to_string(E) + " k=" + std::to_string(k));
        const RoutingPlan plan = route(c);
        const float want = variant == 1 ? 0.5f : (variant == 0 ? 1.0f / float(E) : 1.0f / float(k));
        for (int64_t t = 0; t < c.T; ++t) {
          const auto ids = experts_of(plan, t);
          const auto w = weights_of(plan, t);
          for (int64_t j = 0; j < k; ++j) {
            EXPECT_EQ(ids[static_cast<size_t>(j)], j);
            EXPECT_NEAR(w[static_cast<size_t>(j)], want, 1e-6f);
          }
        }
        ref::CompareOptions exact;
        exact.exclude_near_ties = false;
        check_route(c, exact);
      }
    }
  }
}

TEST(TopKEdge, DuplicateRowsTieToLowerExpertId) {
  // Experts e and e + 4 have identical gate rows: equal scores bit for bit.
  const std::vector<float> L = {0.5f, -1.0f, 2.0f, 1.25f, 0.5f, -1.0f, 2.0f, 1.25f};
  for (int64_t k : {1, 2, 3, 5, 8}) {
    for (int sf = 0; sf < 3; ++sf) {
      RouteCase c = exact_logits_case(L, k, 3);
      c.opt.score_func = sf == 1 ? ScoreFunc::sigmoid : ScoreFunc::softmax;
      c.opt.topk_then_softmax = sf == 2;
      const RoutingPlan plan = route(c);
      const std::vector<int32_t> order = {2, 6, 3, 7, 0, 4, 1, 5};
      for (int64_t t = 0; t < 3; ++t) {
        const auto ids = experts_of(plan, t);
        for (int64_t j = 0; j < k; ++j) EXPECT_EQ(ids[static_cast<size_t>(j)], order[static_cast<size_t>(j)]) << "k=" << k;
      }
      ref::CompareOptions exact;
      exact.exclude_near_ties = false;
      check_route(c, exact);
    }
  }
}

TEST(TopKEdge, LargeLogitsStayFiniteAndPickTheMax) {
  // Integer inputs: |L| up to ~1e4, exact in float and double.
  Rng rng(13);
  for (int i = 0; i < 40; ++i) {
    RouteCase c;
    const int64_t E = rng.integer(2, 40), d = 4;
    c.opt = options(E, 1, d);
    c.opt.norm_topk_prob = rng.coin(0.5);
    c.T = 20;
    for (int64_t j = 0; j < E * d; ++j) c.W.push_back(static_cast<float>(rng.integer(-50, 50)));
    for (int64_t j = 0; j < c.T * d; ++j) c.x.push_back(static_cast<float>(rng.integer(-50, 50)));
    const RoutingPlan plan = route(c);
    for (int64_t t = 0; t < c.T; ++t) {
      // The max logit, ties to the lower id.
      int64_t best = 0;
      double bl = -1e300;
      for (int64_t e = 0; e < E; ++e) {
        double l = 0;
        for (int64_t j = 0; j < d; ++j) l += double(c.x[static_cast<size_t>(t * d + j)]) * c.W[static_cast<size_t>(e * d + j)];
        if (l > bl) bl = l, best = e;
      }
      EXPECT_EQ(experts_of(plan, t)[0], best);
      EXPECT_TRUE(std::isfinite(weights_of(plan, t)[0]));
    }
    check_route(c);
  }
  // Hand-made: softmax over logits 1e4, 1e4 - 1, -1e4; topk_then_softmax; sigmoid saturation.
  RouteCase c = exact_logits_case({-1.0e4f, 1.0e4f - 1.0f, 1.0e4f, 0.0f}, 2);
  for (int v = 0; v < 4; ++v) {
    c.opt.topk_then_softmax = v == 1;
    c.opt.norm_topk_prob = v == 2;
    c.opt.score_func = v == 3 ? ScoreFunc::sigmoid : ScoreFunc::softmax;
    const RoutingPlan plan = route(c);
    const auto ids = experts_of(plan, 0);
    const auto w = weights_of(plan, 0);
    SCOPED_TRACE("variant " + std::to_string(v));
    EXPECT_TRUE(std::isfinite(w[0]) && std::isfinite(w[1]));
    if (v == 3) {  // sigmoid(1e4) = sigmoid(1e4 - 1) = 1: tie to the lower id
      EXPECT_EQ(ids[0], 1);
      EXPECT_EQ(ids[1], 2);
      EXPECT_EQ(w[0], 1.0f);
    } else {
      EXPECT_EQ(ids[0], 2);
      EXPECT_EQ(ids[1], 1);
      const double a = 1.0 / (1.0 + std::exp(-1.0));
      EXPECT_NEAR(w[0], a, 1e-6);
      EXPECT_NEAR(w[1], 1.0 - a, 1e-6);
    }
  }
  // All selected scores underflow (sigmoid of -1e4) with norm_topk_prob: weights 0, finite.
  RouteCase u = exact_logits_case({-1.0e4f, -2.0e4f, -3.0e4f}, 2);
  u.opt.score_func = ScoreFunc::sigmoid;
  u.opt.norm_topk_prob = true;
  const RoutingPlan pu = route(u);
  EXPECT_EQ(experts_of(pu, 0), (std::vector<int32_t>{0, 1}));
  for (float w : weights_of(pu, 0)) EXPECT_EQ(w, 0.0f);
  ref::CompareOptions exact;
  exact.exclude_near_ties = false;
  check_route(u, exact);  // the reference's + 1e-20 keeps 0 / 0 away too
}

TEST(TopKEdge, SingleExpert) {
  // E = 1: the only expert, weight softmax = 1 or sigmoid(L).
  RouteCase c = exact_logits_case({-0.5f}, 1, 4);
  RoutingPlan plan = route(c);
  for (int64_t t = 0; t < 4; ++t) EXPECT_EQ(weights_of(plan, t)[0], 1.0f);
  c.opt.score_func = ScoreFunc::sigmoid;
  plan = route(c);
  EXPECT_NEAR(weights_of(plan, 0)[0], 1.0 / (1.0 + std::exp(0.5)), 1e-7);
  check_route(c);
}

// ------------------------------------------------------------------------ groups and bias

TEST(TopKGroups, EachGroupCountMatchesReference) {
  Rng rng(21);
  for (int64_t G : {2, 4, 8}) {
    for (int i = 0; i < 40; ++i) {
      Knobs kn;
      kn.p_group = 0.0;
      RouteCase c = random_case(rng, kn);
      const int64_t g = rng.integer(1, 8);
      c.opt.num_experts = G * g;
      c.opt.n_group = G;
      c.opt.topk_group = rng.integer(1, G);
      c.opt.k = rng.integer(1, c.opt.topk_group * g);
      c.opt.group_score = i % 3 == 0 ? GroupScore::top2_sum : i % 3 == 1 ? GroupScore::max : GroupScore::topk_sum;
      if (c.opt.group_score == GroupScore::topk_sum) c.opt.k = std::max(c.opt.k, c.opt.topk_group);
      c.opt.topk_then_softmax = false;
      c.opt.score_func = rng.coin(0.6) ? ScoreFunc::sigmoid : ScoreFunc::softmax;
      c.W = rng.vec(static_cast<size_t>(c.opt.num_experts * c.opt.hidden), 3.0 / std::sqrt(double(c.opt.hidden)));
      c.bias = rng.coin(0.6) ? rng.vec(static_cast<size_t>(c.opt.num_experts), 0.2) : std::vector<float>{};
      check_route(c);
      // Every chosen expert lies in one of topk_group groups.
      const RoutingPlan plan = route(c);
      for (int64_t t = 0; t < c.T; ++t) {
        std::vector<int> groups;
        for (int32_t e : experts_of(plan, t))
          if (std::find(groups.begin(), groups.end(), e / g) == groups.end()) groups.push_back(static_cast<int>(e / g));
        EXPECT_LE(static_cast<int64_t>(groups.size()), c.opt.topk_group);
      }
    }
  }
}

TEST(TopKGroups, GroupOfOneExpertScoresThatExpert) {
  // n_group = E: each group is one expert; with topk_group = k the choice equals plain top-k.
  Rng rng(22);
  for (int i = 0; i < 30; ++i) {
    Knobs kn;
    kn.p_group = 0.0;
    kn.p_tts = 0.0;
    RouteCase c = random_case(rng, kn);
    const int64_t E = std::vector<int64_t>{2, 4, 8}[static_cast<size_t>(i % 3)];
    c.opt.num_experts = E;
    c.opt.k = rng.integer(1, E);
    c.W = rng.vec(static_cast<size_t>(E * c.opt.hidden), 3.0 / std::sqrt(double(c.opt.hidden)));
    c.bias = rng.coin(0.5) ? rng.vec(static_cast<size_t>(E), 0.2) : std::vector<float>{};
    RouteCase grouped = c;
    grouped.opt.n_group = E;
    grouped.opt.topk_group = c.opt.k;
    check_route(grouped);
    const RoutingPlan a = route(c), b = route(grouped);
    EXPECT_EQ(std::vector<int32_t>(a.slot_expert().begin(), a.slot_expert().end()),
              std::vector<int32_t>(b.slot_expert().begin(), b.slot_expert().end()));
  }
}

TEST(TopKGroups, TiesBetweenGroupsGoToLowerGroup) {
  // Groups of 2; groups 1 and 3 identical and best: group 1 wins.
  const std::vector<float> L = {1.0f, 0.0f, 3.0f, 2.0f, 1.0f, 0.0f, 3.0f, 2.0f};
  for (int sf = 0; sf < 2; ++sf) {
    RouteCase c = exact_logits_case(L, 2, 2);
    c.opt.score_func = sf ? ScoreFunc::sigmoid : ScoreFunc::softmax;
    c.opt.n_group = 4;
    c.opt.topk_group = 1;
    const RoutingPlan plan = route(c);
    EXPECT_EQ(experts_of(plan, 0), (std::vector<int32_t>{2, 3}));
    ref::CompareOptions exact;
    exact.exclude_near_ties = false;
    check_route(c, exact);
    // All groups equal (zero weight): groups 0..topk_group-1 kept, experts 0..k-1.
    RouteCase z = c;
    z.W.assign(8, 0.0f);
    z.opt.topk_group = 2;
    z.opt.k = 3;
    EXPECT_EQ(experts_of(route(z), 1), (std::vector<int32_t>{0, 1, 2}));
    check_route(z, exact);
  }
}

TEST(TopKGroups, MaskedGroupsUseMinusInfinityWithNegativeBias) {
  // Biased selection scores all negative: masked experts must stay unselectable (-inf, not
  // 0 as HF's DeepSeek-V3 code). Groups of 4, keep 1 group, k = 4 = the group size.
  Rng rng(23);
  for (int i = 0; i < 20; ++i) {
    RouteCase c;
    c.opt = options(16, 4, 8);
    c.opt.score_func = ScoreFunc::sigmoid;
    c.opt.n_group = 4;
    c.opt.topk_group = 1;
    c.opt.norm_topk_prob = true;
    c.opt.routed_scaling_factor = 2.5f;
    c.W = rng.vec(16 * 8, 1.0);
    c.bias.assign(16, -5.0f);
    c.T = 10;
    c.x = rng.vec(10 * 8, 1.0);
    const RoutingPlan plan = route(c);
    for (int64_t t = 0; t < c.T; ++t) {
      const auto ids = experts_of(plan, t);
      for (int32_t e : ids) EXPECT_EQ(e / 4, ids[0] / 4) << "token " << t << " left its group";
      double sum = 0;
      for (float w : weights_of(plan, t)) sum += w;
      EXPECT_NEAR(sum, 2.5, 1e-5);
    }
    check_route(c);
  }
}

TEST(TopKBias, SigmoidBiasChangesSelectionNotWeights) {
  // Logits 2, 1, 0, -1. Without bias expert 0 wins; a bias of +1 on expert 2 makes it win,
  // and its weight stays the unbiased sigmoid(0) = 0.5.
  RouteCase c = exact_logits_case({2.0f, 1.0f, 0.0f, -1.0f}, 1, 2);
  c.opt.score_func = ScoreFunc::sigmoid;
  EXPECT_EQ(experts_of(route(c), 0)[0], 0);
  c.bias = {0.0f, 0.0f, 1.0f, 0.0f};
  const RoutingPlan plan = route(c);
  EXPECT_EQ(experts_of(plan, 0)[0], 2);
  EXPECT_FLOAT_EQ(weights_of(plan, 0)[0], 0.5f);
  check_route(c);
  c.opt.k = 2;
  c.opt.norm_topk_prob = true;
  const RoutingPlan p2 = route(c);
  EXPECT_EQ(experts_of(p2, 0), (std::vector<int32_t>{2, 0}));
  const double s2 = 1.0 / (1.0 + std::exp(-2.0));
  EXPECT_NEAR(weights_of(p2, 0)[0], 0.5 / (0.5 + s2), 1e-6);
  check_route(c);
  // Random: the bias changes the selection for a good share of tokens, and still matches.
  Rng rng(31);
  int64_t changed = 0, total = 0;
  for (int i = 0; i < 20; ++i) {
    RouteCase r;
    r.opt = options(16, 2, 24);
    r.opt.score_func = ScoreFunc::sigmoid;
    r.W = rng.vec(16 * 24, 0.6);
    r.T = 30;
    r.x = rng.vec(30 * 24, 1.0);
    const RoutingPlan before = route(r);
    r.bias = rng.vec(16, 0.3);
    const RoutingPlan after = route(r);
    for (int64_t t = 0; t < r.T; ++t, ++total) changed += experts_of(before, t) != experts_of(after, t);
    check_route(r);
  }
  EXPECT_GT(changed, total / 10);
}

TEST(TopKThenSoftmax, EqualsSoftmaxTopkRenormalise) {
  Rng rng(41);
  for (int i = 0; i < 60; ++i) {
    Knobs kn;
    kn.p_sigmoid = 0.0;
    kn.p_tts = 1.0;
    kn.p_capacity = 0.0;
    kn.p_bias = 0.0;
    kn.p_group = 0.0;
    RouteCase a = random_case(rng, kn);
    RouteCase b = a;
    b.opt.topk_then_softmax = false;
    b.opt.norm_topk_prob = true;
    const ref::CompareReport rep = check_route(a);
    const RoutingPlan pa = route(a), pb = route(b);
    for (int64_t t = 0; t < a.T; ++t) {
      if (rep.excluded.empty() || rep.excluded[static_cast<size_t>(t)]) continue;
      if (!a.pad.empty() && a.pad[static_cast<size_t>(t)]) continue;
      EXPECT_EQ(experts_of(pa, t), experts_of(pb, t));
      const auto wa = weights_of(pa, t), wb = weights_of(pb, t);
      for (size_t j = 0; j < wa.size(); ++j) EXPECT_NEAR(wa[j], wb[j], 1e-5 * a.opt.routed_scaling_factor);
    }
  }
}

// ------------------------------------------------------------------------ capacity

TEST(TopKCapacity, FormulaMatchesReferenceIncludingRounding) {
  // Evaluated in double in the order of ROUTING.md: (50 / 1) * 1.1 = 55.00000000000001 -> 56.
  TopKOptions o = options(1, 1, 1);
  o.capacity_factor = 1.1;
  EXPECT_EQ(o.capacity(50), 56);
  for (int64_t E : {1, 3, 7, 8, 60}) {
    for (int64_t k : {1, 2, 3}) {
      if (k > E) continue;
      for (double cf : {0.1, 0.5, 1.0, 1.1, 1.25, 2.0, 3.3}) {
        for (int64_t mc : {0, 4}) {
          TopKOptions q = options(E, k, 1);
          q.capacity_factor = cf;
          q.min_capacity = mc;
          for (int64_t T = 0; T <= 70; ++T) ASSERT_EQ(q.capacity(T), ref::capacity(to_ref(q, {}), T));
        }
      }
    }
  }
  EXPECT_EQ(options(4, 2, 1).capacity(100), -1);  // dropless
  // A factor past int64's range means "drop nothing", not an out-of-range cast.
  for (double cf : {6.5e18, 1e300, std::numeric_limits<double>::max()}) {
    TopKOptions q = options(4, 2, 1);
    q.capacity_factor = cf;
    EXPECT_EQ(q.capacity(100), int64_t{1} << 62) << cf;
  }
}

// Tokens 0..5, all first choice expert 0; per-token weights grow with t (x = t + 1).
TEST(TopKCapacity, OverflowEachPolicy) {
  // E = 2, k = 1, logits x * (1, 0) with x = 0.1 (t + 1): weights softmax increase with t.
  for (int policy = 0; policy < 3; ++policy) {
    for (bool renorm : {false, true}) {
      RouteCase c;
      c.opt = options(2, 1, 1);
      c.opt.capacity_factor = 1.0;  // C = ceil(6 / 2) = 3
      c.opt.drop_policy = static_cast<DropPolicy>(policy);
      c.opt.renormalize_after_drop = renorm;
      c.W = {1.0f, 0.0f};
      c.T = 6;
      for (int t = 0; t < 6; ++t) c.x.push_back(0.1f * float(t + 1));
      const RoutingPlan plan = route(c);
      SCOPED_TRACE("policy " + std::to_string(policy) + " renorm " + std::to_string(renorm));
      for (int64_t t = 0; t < 6; ++t) {
        const bool keep = policy == 0 ? t >= 3 : t < 3;  // score keeps the largest weights
        EXPECT_EQ(dropped_of(plan, t)[0], keep ? 0 : 1) << "token " << t;
        if (!keep) {
          EXPECT_EQ(weights_of(plan, t)[0], 0.0f);
        }
        if (keep && renorm) {
          EXPECT_FLOAT_EQ(weights_of(plan, t)[0], 1.0f);
        }
      }
      EXPECT_EQ(plan.kept_of(0), 3);
      EXPECT_EQ(plan.dropped_of(0), 3);
      EXPECT_EQ(plan.num_dropped(), 3);
      check_route(c);
    }
  }
}

TEST(TopKCapacity, SlotMajorKeepsFirstChoicesBeforeSecondChoices) {
  // E = 3, k = 2. Tokens 0, 1 pick expert 0 second; tokens 2, 3 pick it first.
  // min_capacity = 2 with a tiny factor: C = max(2, ceil(8/3 * 0.1)) = 2.
  RouteCase c;
  c.opt = options(3, 2, 3);
  c.opt.capacity_factor = 0.1;
  c.opt.min_capacity = 2;
  // One-hot x: x = e_i gives logits W[:, i]. Expert rows: W[e] = logits for input dims.
  // dim 0: logits (2, 3, 0) -> order 1, 0;  dim 1: logits (3, 0, 2) -> order 0, 2.
  c.W = {2.0f, 3.0f, 0.0f, 3.0f, 0.0f, 0.0f, 0.0f, 2.0f, 0.0f};  // rows e: (W[e,0], W[e,1], W[e,2])
  c.T = 4;
  c.x = {1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0};
  for (int policy = 0; policy < 3; ++policy) {
    for (bool renorm : {false, true}) {
      c.opt.drop_policy = static_cast<DropPolicy>(policy);
      c.opt.renormalize_after_drop = renorm;
      c.opt.routed_scaling_factor = renorm ? 2.5f : 1.0f;
      const RoutingPlan plan = route(c);
      SCOPED_TRACE("policy " + std::to_string(policy));
      ASSERT_EQ(experts_of(plan, 0), (std::vector<int32_t>{1, 0}));
      ASSERT_EQ(experts_of(plan, 2), (std::vector<int32_t>{0, 2}));
      // Expert 0 has 4 slots, capacity 2; expert 1 has 2, expert 2 has 2: only expert 0 drops.
      EXPECT_EQ(plan.kept_of(0), 2);
      EXPECT_EQ(plan.dropped_of(0), 2);
      const bool first_choices_kept = policy != 1;  // score: first choices weigh more here
      for (int64_t t = 0; t < 4; ++t) {
        const auto dr = dropped_of(plan, t);
        const size_t slot = t < 2 ? 1 : 0;
        EXPECT_EQ(dr[slot], (t < 2) == first_choices_kept ? 1 : 0) << "token " << t;
        if (renorm) {
          double sum = 0;
          for (float w : weights_of(plan, t)) sum += w;
          EXPECT_NEAR(sum, 2.5, 1e-5) << "token " << t;
        }
      }
      ref::CompareOptions exact;
      exact.exclude_near_ties = false;
      check_route(c, exact);
    }
  }
}

TEST(TopKCapacity, ScoreTiesGoToLowerToken) {
  // Identical tokens: identical weights; the score policy keeps the lowest tokens.
  RouteCase c = exact_logits_case({1.0f, 0.0f, -1.0f}, 1, 7);
  c.opt.capacity_factor = 0.5;  // C = ceil(7 / 3 * 0.5) = 2
  c.opt.drop_policy = DropPolicy::score;
  const RoutingPlan plan = route(c);
  for (int64_t t = 0; t < 7; ++t) EXPECT_EQ(dropped_of(plan, t)[0], t >= 2 ? 1 : 0);
  ref::CompareOptions exact;
  exact.exclude_near_ties = false;
  check_route(c, exact);
}

TEST(TopKCapacity, PaddingTakesNoCapacityAndAllPadding) {
  // 6 tokens, 3 padded, all to expert 0: C = ceil(3 / 2 * 1) = 2 counts unpadded only.
  RouteCase c = exact_logits_case({1.0f, 0.0f}, 1, 6);
  c.opt.capacity_factor = 1.0;
  c.opt.drop_policy = DropPolicy::position;
  c.pad = {1, 0, 1, 0, 0, 1};
  RoutingPlan plan = route(c);
  EXPECT_EQ(plan.slots_of(0), 0);
  EXPECT_EQ(plan.kept_of(0), 2);
  EXPECT_EQ(plan.dropped_of(0), 1);
  EXPECT_EQ(dropped_of(plan, 4)[0], 1);
  check_route(c);
  // All padding: no slot at all, with or without capacity.
  for (double cf : {0.0, 1.0}) {
    RouteCase a = c;
    a.opt.capacity_factor = cf;
    a.opt.min_capacity = 3;
    a.pad.assign(6, 1);
    plan = route(a);
    EXPECT_EQ(plan.num_slots(), 0);
    EXPECT_EQ(plan.num_kept(), 0);
    for (int64_t t = 0; t < 6; ++t) EXPECT_EQ(plan.slots_of(t), 0);
    check_route(a);
  }
}

TEST(TopKCapacity, MinCapacityAndRenormaliseRandom) {
  Rng rng(51);
  for (int policy = 0; policy < 3; ++policy) {
    for (int renorm = 0; renorm < 2; ++renorm) {
      for (int i = 0; i < 25; ++i) {
        Knobs kn;
        kn.p_capacity = 1.0;
        kn.min_T = 10;
        RouteCase c = random_case(rng, kn);
        c.opt.drop_policy = static_cast<DropPolicy>(policy);
        c.opt.renormalize_after_drop = renorm != 0;
        c.opt.capacity_factor = rng.uniform(0.2, 0.9);  // overflow is the rule
        c.opt.min_capacity = i % 2 ? rng.integer(0, 6) : 0;
        check_route(c);
      }
    }
  }
}

// ------------------------------------------------------------------------ presets

TEST(TopKPreset, DefaultsMatchRoutingTable) {
  using moekit::preset_defaults;
  const auto mx = preset_defaults("mixtral").router;
  EXPECT_EQ(mx.score_func, ScoreFunc::softmax);
  EXPECT_TRUE(mx.norm_topk_prob);
  EXPECT_EQ(mx.k, 2);
  for (const char* name : {"qwen2_moe", "qwen3_moe", "olmoe"}) {
    const auto c = preset_defaults(name);
    EXPECT_EQ(c.router.score_func, ScoreFunc::softmax) << name;
    EXPECT_FALSE(c.router.norm_topk_prob) << name;
    EXPECT_FALSE(c.router.grouped()) << name;
    EXPECT_EQ(c.router.routed_scaling_factor, 1.0f) << name;
    EXPECT_EQ(c.router.capacity_factor, 0.0) << name;
    EXPECT_EQ(c.shared.has_value(), std::string(name) == "qwen2_moe") << name;
  }
  EXPECT_TRUE(preset_defaults("qwen2_moe").shared->gated);
  const auto ds = preset_defaults("deepseek_v3");
  EXPECT_EQ(ds.router.score_func, ScoreFunc::sigmoid);
  EXPECT_TRUE(ds.router.norm_topk_prob);
  EXPECT_TRUE(ds.router_bias);
  EXPECT_TRUE(ds.router.grouped());
  EXPECT_FLOAT_EQ(ds.router.routed_scaling_factor, 2.5f);
  ASSERT_TRUE(ds.shared.has_value());
  EXPECT_FALSE(ds.shared->gated);
  EXPECT_EQ(ds.shared->intermediate, ds.experts.intermediate);  // n_shared_experts = 1
  const auto sw = preset_defaults("switch");
  EXPECT_EQ(sw.router.k, 1);
  EXPECT_FALSE(sw.router.norm_topk_prob);
  EXPECT_GT(sw.router.capacity_factor, 0.0);
  EXPECT_EQ(sw.router.drop_policy, DropPolicy::position);
  EXPECT_FALSE(sw.experts.gated);
  for (const char* name : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"}) {
    EXPECT_TRUE(preset_defaults(name).experts.gated) << name;
    EXPECT_EQ(preset_defaults(name).experts.act, moekit::Activation::silu) << name;
  }
}

TEST(TopKPreset, EveryPresetRoutesLikeReference) {
  Rng rng(61);
  for (const char* name : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "switch"}) {
    for (int rep = 0; rep < 8; ++rep) {
      const moekit::LayerConfig cfg = moekit::preset_defaults(name);
      RouteCase c;
      c.opt = cfg.router;
      // Shrink: E to at most 32 (DeepSeek keeps 8 groups, 4 kept), d to 1..96.
      if (c.opt.num_experts > 32) c.opt.num_experts = cfg.router.grouped() ? 32 : 16 + 4 * rep;
      c.opt.k = std::min(c.opt.k, c.opt.num_experts);
      c.opt.hidden = rng.integer(1, 96);
      if (rep % 2 && std::string(name) != "mixtral" && std::string(name) != "switch") c.opt.norm_topk_prob = !c.opt.norm_topk_prob;
      c.T = rng.integer(1, 70);
      c.W = rng.vec(static_cast<size_t>(c.opt.num_experts * c.opt.hidden), 4.0 / std::sqrt(double(c.opt.hidden)));
      c.x = rng.vec(static_cast<size_t>(c.T * c.opt.hidden), 1.0);
      if (cfg.router_bias) c.bias = rng.vec(static_cast<size_t>(c.opt.num_experts), 0.1);
      random_layout(rng, c, 0.3);
      SCOPED_TRACE(name);
      check_route(c);
      // Preset semantics: mixtral weights sum to 1, deepseek to 2.5, switch keeps <= C.
      const RoutingPlan plan = route(c);
      for (int64_t t = 0; t < c.T; ++t) {
        if (plan.slots_of(t) == 0) continue;
        double sum = 0;
        for (float w : weights_of(plan, t)) sum += w;
        if (std::string(name) == "mixtral") {
          EXPECT_NEAR(sum, 1.0, 1e-5);
        }
        if (std::string(name) == "deepseek_v3" && c.opt.norm_topk_prob) {
          EXPECT_NEAR(sum, 2.5, 1e-5);
        }
      }
      if (std::string(name) == "switch") {
        for (int64_t e = 0; e < c.opt.num_experts; ++e) {
          EXPECT_LE(plan.kept_of(e), c.opt.capacity(c.routed()));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------ threads and scratch

TEST(TopKThreads, BitIdenticalAcrossThreadCountsAndRuns) {
  Rng rng(71);
  for (int i = 0; i < 20; ++i) {
    const RouteCase c = random_case(rng);
    SCOPED_TRACE(describe(c));
    const TopKRouter router(c.opt, c.W, c.bias);
    RoutingPlan p1, p2, p3;
    RouterScratch s1, s2;
    router.route(c.batch(), c.x.data(), p1, s1, 1);
    router.route(c.batch(), c.x.data(), p2, s2, 2);
    router.route(c.batch(), c.x.data(), p3, s2, 2);  // repeated, scratch reused
    const ref::PlanView a = ref::view_of(p1), b = ref::view_of(p2), d = ref::view_of(p3);
    for (const ref::PlanView* v : {&b, &d}) {
      EXPECT_EQ(a.slot_offsets, v->slot_offsets);
      EXPECT_EQ(a.slot_expert, v->slot_expert);
      EXPECT_EQ(a.slot_dropped, v->slot_dropped);
      EXPECT_TRUE(bits_equal(a.slot_weight, v->slot_weight));
      EXPECT_EQ(a.expert_offsets, v->expert_offsets);
      EXPECT_EQ(a.expert_slots, v->expert_slots);
      EXPECT_EQ(a.expert_tokens, v->expert_tokens);
    }
    EXPECT_TRUE(bits_equal(std::vector<float>(s1.logits.begin(), s1.logits.begin() + c.T * c.opt.num_experts),
                           std::vector<float>(s2.logits.begin(), s2.logits.begin() + c.T * c.opt.num_experts)));
  }
}

TEST(TopKThreads, ReusedPlanAndScratchAcrossShapes) {
  Rng rng(72);
  Knobs kn;
  kn.p_group = 0.3;
  const RouteCase base = random_case(rng, kn);
  const TopKRouter router(base.opt, base.W, base.bias);
  RoutingPlan reused;
  RouterScratch scratch;
  for (int64_t T : {50, 3, 0, 70, 1, 17}) {
    RouteCase c = base;
    c.T = T;
    c.x = rng.vec(static_cast<size_t>(T * c.opt.hidden), 1.0);
    c.pad.clear();
    c.offsets.clear();
    if (T == 17) random_layout(rng, c, 1.0);
    router.route(c.batch(), c.x.data(), reused, scratch, 2);
    const RoutingPlan fresh = route(c, 1);
    const ref::PlanView a = ref::view_of(reused), b = ref::view_of(fresh);
    EXPECT_EQ(a.slot_offsets, b.slot_offsets) << "T=" << T;
    EXPECT_EQ(a.slot_expert, b.slot_expert) << "T=" << T;
    EXPECT_EQ(a.slot_dropped, b.slot_dropped) << "T=" << T;
    EXPECT_TRUE(bits_equal(a.slot_weight, b.slot_weight)) << "T=" << T;
    EXPECT_EQ(a.expert_slots, b.expert_slots) << "T=" << T;
    EXPECT_TRUE(ref::plan_invariant_errors(a, c.pad_ptr(), c.opt.k).empty()) << "T=" << T;
  }
}

// ------------------------------------------------------------------------ training noise

TEST(TopKNoise, JitterIsBoundedSeededAndOffByDefault) {
  // d = 1, x = 1, W = 1: the logit is the jitter factor U(1 - eps, 1 + eps) itself.
  EXPECT_EQ(TopKOptions{}.noise, moekit::TrainingNoise::none);
  RouteCase c = exact_logits_case(std::vector<float>(8, 1.0f), 2, 500);
  c.opt.noise = moekit::TrainingNoise::jitter;
  c.opt.noise_eps = 0.25f;
  c.opt.noise_seed = 7;
  const TopKRouter r(c.opt, c.W);
  RoutingPlan p1, p2;
  RouterScratch s1, s2;
  r.route(c.batch(), c.x.data(), p1, s1, 1);
  r.route(c.batch(), c.x.data(), p2, s2, 2);
  EXPECT_TRUE(bits_equal(s1.logits, s2.logits));  // reproducible, thread-independent
  double mean = 0, lo = 2, hi = 0;
  for (int64_t t = 0; t < 500; ++t) {
    const float L = s1.logits[static_cast<size_t>(t * 8)];
    for (int64_t e = 1; e < 8; ++e) EXPECT_EQ(s1.logits[static_cast<size_t>(t * 8 + e)], L);  // one factor per input
    mean += L / 500.0;
    lo = std::min<double>(lo, L);
    hi = std::max<double>(hi, L);
  }
  EXPECT_GE(lo, 0.75 - 1e-6);
  EXPECT_LE(hi, 1.25 + 1e-6);
  EXPECT_NEAR(mean, 1.0, 0.03);
  EXPECT_LT(lo, 0.8);
  EXPECT_GT(hi, 1.2);
  TopKRouter other = r;
  other.set_noise_seed(8);
  other.route(c.batch(), c.x.data(), p2, s2, 1);
  EXPECT_FALSE(bits_equal(s1.logits, s2.logits));
  // eps = 0: identical to no noise.
  Rng rng(91);
  const RouteCase z = random_case(rng);
  RouteCase zj = z;
  zj.opt.noise = moekit::TrainingNoise::jitter;
  zj.opt.noise_eps = 0.0f;
  const ref::PlanView a = ref::view_of(route(z)), b = ref::view_of(route(zj));
  EXPECT_EQ(a.slot_expert, b.slot_expert);
  EXPECT_TRUE(bits_equal(a.slot_weight, b.slot_weight));
}

TEST(TopKNoise, NoisyTopkAddsStandardNormalTimesSoftplus) {
  // Zero noise weight: softplus(0) = log 2, so (L_noisy - L) / log 2 ~ N(0, 1).
  RouteCase c = exact_logits_case({0.5f, -0.25f, 1.0f, 0.0f}, 1, 1000);
  c.opt.noise = moekit::TrainingNoise::noisy_topk;
  c.opt.noise_seed = 3;
  expect_error([&] { TopKRouter r(c.opt, c.W); }, "noise weight");
  const TopKRouter r(c.opt, c.W, {}, std::vector<float>(4, 0.0f));
  RoutingPlan p;
  RouterScratch s;
  r.route(c.batch(), c.x.data(), p, s, 2);
  double m1 = 0, m2 = 0;
  const int64_t n = 4000;
  for (int64_t i = 0; i < n; ++i) {
    const double z = (s.logits[static_cast<size_t>(i)] - c.W[static_cast<size_t>(i % 4)]) / std::log(2.0);
    m1 += z / n;
    m2 += z * z / n;
  }
  EXPECT_NEAR(m1, 0.0, 0.1);
  EXPECT_NEAR(m2 - m1 * m1, 1.0, 0.12);
  EXPECT_TRUE(ref::plan_invariant_errors(ref::view_of(p), nullptr, 1).empty());
}

// ------------------------------------------------------------------------ errors

TEST(TopKErrors, BadOptionsThrowNamingTheArgument) {
  const auto make = [](TopKOptions o, size_t wsize = 0) {
    return [o, wsize] {
      TopKRouter r(o, std::vector<float>(wsize ? wsize : static_cast<size_t>(std::max<int64_t>(o.num_experts * o.hidden, 1)), 0.1f));
    };
  };
  TopKOptions o = options(4, 5, 8);
  expect_error(make(o), "k expected");  // k > E
  o.k = 0;
  expect_error(make(o), "k expected");  // k = 0
  o = options(6, 2, 8);
  o.n_group = 4;
  o.topk_group = 2;
  expect_error(make(o), "n_group");  // 6 % 4 != 0
  o = options(8, 2, 8);
  o.n_group = 4;
  o.topk_group = 5;
  expect_error(make(o), "topk_group");  // topk_group > n_group
  o.topk_group = 1;
  o.k = 3;
  expect_error(make(o), "topk_group * E / n_group");  // k > 1 * 8 / 4
  o = options(8, 2, 8);
  o.capacity_factor = -1.0;
  expect_error(make(o), "capacity_factor");
  o.capacity_factor = std::numeric_limits<double>::quiet_NaN();
  expect_error(make(o), "capacity_factor");
  o.capacity_factor = std::numeric_limits<double>::infinity();
  expect_error(make(o), "capacity_factor");
  o = options(8, 2, 8);
  o.min_capacity = -1;
  expect_error(make(o), "min_capacity");
  o = options(8, 2, 8);
  expect_error(make(o, 63), "gate.weight");  // wrong gate weight size
  expect_error(make(o, 65), "gate.weight");
  o.score_func = ScoreFunc::sigmoid;
  o.topk_then_softmax = true;
  expect_error(make(o), "topk_then_softmax");
  o = options(8, 2, 8);
  o.routed_scaling_factor = 0.0f;
  expect_error(make(o), "routed_scaling_factor");
  o = options(0, 1, 8);
  expect_error(make(o), "num_experts");
  o = options(8, 2, 8);
  expect_error([&] { TopKRouter r(o, std::vector<float>(64, 0.1f), std::vector<float>(7, 0.0f)); },
               "e_score_correction_bias");
  expect_error(
      [&] {
        std::vector<float> w(64, 0.1f);
        w[9] = std::numeric_limits<float>::quiet_NaN();
        TopKRouter r(o, w);
      },
      "gate.weight[1, 1]");
}

TEST(TopKErrors, BadInputsThrowNamingTheArgument) {
  RouteCase c;
  c.opt = options(4, 2, 6);
  c.W = Rng(81).vec(24, 1.0);
  c.T = 5;
  c.x = Rng(82).vec(30, 1.0);
  const TopKRouter router(c.opt, c.W);
  RoutingPlan plan;
  RouterScratch s;
  // NaN / Inf in the hidden states.
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> x = c.x;
    x[13] = bad;
    expect_error([&] { router.route(c.batch(), x.data(), plan, s, 1); }, "finite");
    expect_error([&] { router.route(c.batch(), x.data(), plan, s, 2); }, "hidden_states");
  }
  // Batch with the wrong hidden size.
  Batch b = Batch::single(5, 7);
  expect_error([&] { router.route(b, c.x.data(), plan, s); }, "Batch.hidden");
  // Bad sequence offsets: not starting at 0, not ending at T, decreasing, too short.
  for (const std::vector<int32_t>& offs : std::vector<std::vector<int32_t>>{{1, 5}, {0, 4}, {0, 3, 2, 5}, {0}}) {
    Batch bo = c.batch();
    bo.sequence_offsets = offs;
    expect_error([&] { router.route(bo, c.x.data(), plan, s); }, "Batch.sequence_offsets");
  }
  // Padding mask of the wrong length.
  const std::vector<uint8_t> pad(4, 0);
  Batch bp = c.batch();
  bp.padding = pad;
  expect_error([&] { router.route(bp, c.x.data(), plan, s); }, "Batch.padding");
  // The router is still usable after errors.
  router.route(c.batch(), c.x.data(), plan, s);
  EXPECT_EQ(plan.num_slots(), 10);
}

}  // namespace

namespace {

// ReMix (arXiv 2603.10160): uniform weights 1 / k on the usual selection, against the reference.
TEST(TopKUniformWeights, MatchesReferenceAndConfigKey) {
  Rng rng(2603);
  int64_t compared = 0;
  for (int i = 0; i < 60; ++i) {
    TopKOptions o;
    o.num_experts = rng.integer(1, 32);
    o.k = rng.integer(1, std::min<int64_t>(o.num_experts, 6));
    o.hidden = rng.integer(1, 32);
    o.score_func = rng.coin(0.5) ? ScoreFunc::softmax : ScoreFunc::sigmoid;
    o.uniform_weights = true;
    if (rng.coin(0.5)) o.routed_scaling_factor = 2.0f;
    if (rng.coin(0.3)) o.capacity_factor = 1.0;
    const int64_t T = rng.integer(1, 50);
    const std::vector<float> W = rng.vec(static_cast<size_t>(o.num_experts * o.hidden), 1.0),
                             x = rng.vec(static_cast<size_t>(T * o.hidden), 1.0);
    RoutingPlan plan;
    RouterScratch s;
    TopKRouter(o, W).route(Batch::single(T, o.hidden), x.data(), plan, s, 2);
    ref::CompareOptions co;
    co.exclude_near_ties = true;
    const ref::CompareReport rep = ref::compare_routing(ref::route_topk(to_ref(o, {}), W.data(), x.data(), T), ref::view_of(plan), co);
    EXPECT_TRUE(rep.errors.empty()) << "case " << i << test_support::join(rep.errors);
    compared += rep.compared;
    for (size_t sl = 0; sl < plan.slot_weight().size(); ++sl)
      if (!plan.slot_dropped()[sl]) EXPECT_EQ(plan.slot_weight()[sl], o.routed_scaling_factor * (1.0f / static_cast<float>(o.k)));
  }
  EXPECT_GT(compared, 1000);
  TopKOptions bad{4, 2, 2};
  bad.uniform_weights = true;
  bad.norm_topk_prob = true;
  test_support::expect_error([&] { bad.validate(); }, {"uniform_weights (ReMix, weights 1 / k) expected without"});
  const moekit::LayerConfig c = moekit::parse_layer_config(
      R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"num_experts": 4, "k": 2, "uniform_weights": true},
          "experts": {"type": "swiglu", "intermediate_size": 8}})",
      "test");
  EXPECT_TRUE(c.router.uniform_weights);
}

}  // namespace
