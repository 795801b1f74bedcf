// SPDX-License-Identifier: Apache-2.0
// Dynamic-k routing (ROUTING.md section 7): DynamicKRouter against the double-precision
// reference in tests/reference/dynamic_k_ref on random shapes, modes and options; thread
// determinism; the SparseLayer forward (every expert gets exactly its kept slots' rows, no
// padding to k_max); the layer-wise schedules; the Tsallis entropy; argument errors.
//
// Near-ties: a token is excluded from the exact comparison when one of its decisions sits
// within 1e-6 of a boundary in the reference (see ref::dynamic_k::Result::fragile); such
// exclusions are counted and asserted rare.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/expert.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/dynamic_k.hpp"
#include "reference/dynamic_k_ref.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Batch;
using moekit::DynamicKMode;
using moekit::DynamicKOptions;
using moekit::DynamicKRouter;
using moekit::RoutingPlan;
using moekit::TopPRule;
using moekit::Workspace;
using test_support::expect_error;
using test_support::experts_of;
using test_support::join;
using test_support::Rng;
using test_support::weights_of;
namespace dref = ref::dynamic_k;

struct Case {
  DynamicKOptions opt;
  dref::Params ref;
  int64_t T = 0;
  std::vector<float> W, x;
  std::vector<uint8_t> pad;
  std::vector<float> steering;
  std::string what;

  [[nodiscard]] Batch batch() const {
    Batch b = Batch::single(T, opt.hidden);
    if (!pad.empty()) b.padding = pad;
    return b;
  }
  [[nodiscard]] const uint8_t* pad_ptr() const { return pad.empty() ? nullptr : pad.data(); }
};

Case random_case(Rng& rng, int i) {
  Case c;
  DynamicKOptions& o = c.opt;
  o.num_experts = rng.integer(1, 40);
  o.hidden = rng.integer(1, 48);
  const int mode = i % 3;
  o.mode = mode == 0 ? DynamicKMode::top_p : mode == 1 ? DynamicKMode::threshold : DynamicKMode::tsallis;
  o.top_p = rng.coin(0.1) ? 1.0 : rng.uniform(0.05, 0.95);
  o.top_p_rule = rng.coin(0.5) ? TopPRule::reach : TopPRule::within;
  o.threshold = rng.coin(0.1) ? 0.0 : rng.uniform(0.0, 0.6);
  o.k_max = rng.coin(0.4) ? 0 : rng.integer(1, o.num_experts);
  o.k_min = rng.integer(0, std::max<int64_t>(o.max_k(), 1));
  o.k_min = std::min(o.k_min, o.max_k());
  const double qs[] = {0.5, 1.0, 1.5, 2.0, 3.0};
  o.entropy_index = qs[rng.integer(0, 4)];
  o.entropy_normalize = rng.coin(0.7);
  o.entropy_threshold = rng.uniform(0.2, 0.95);
  o.norm_topk_prob = rng.coin(0.5);
  if (rng.coin(0.3)) {
    o.capacity_factor = rng.uniform(0.3, 2.0);
    o.min_capacity = rng.integer(0, 2);
    o.drop_policy = rng.coin(0.5) ? moekit::DropPolicy::score : moekit::DropPolicy::position;
    o.renormalize_after_drop = rng.coin(0.5);
  }
  c.T = rng.coin(0.05) ? 0 : rng.integer(1, 60);
  const double scale = rng.uniform(0.1, 6.0);  // flat to peaked probabilities
  c.W = rng.vec(static_cast<size_t>(o.num_experts * o.hidden), scale / std::sqrt(double(o.hidden)));
  c.x = rng.vec(static_cast<size_t>(c.T * o.hidden), 1.7);
  if (rng.coin(0.3)) {
    c.pad.assign(static_cast<size_t>(c.T), 0);
    for (auto& p : c.pad) p = rng.coin(0.3) ? 1 : 0;
  }
  if (rng.coin(0.3)) c.steering = rng.vec(static_cast<size_t>(o.num_experts), 2.0);

  dref::Params& r = c.ref;
  r.num_experts = o.num_experts;
  r.hidden = o.hidden;
  r.mode = mode == 0 ? dref::Mode::top_p : mode == 1 ? dref::Mode::threshold : dref::Mode::tsallis;
  r.top_p = o.top_p;
  r.rule = o.top_p_rule == TopPRule::reach ? dref::Rule::reach : dref::Rule::within;
  r.threshold = o.threshold;
  r.k_min = o.k_min;
  r.k_max = o.k_max;
  r.q = o.entropy_index;
  r.entropy_threshold = o.entropy_threshold;
  r.entropy_normalize = o.entropy_normalize;
  r.norm_topk_prob = o.norm_topk_prob;
  r.capacity_factor = o.capacity_factor;
  r.min_capacity = o.min_capacity;
  r.drop_policy = o.drop_policy == moekit::DropPolicy::score ? ref::DropPolicy::score : ref::DropPolicy::position;
  r.renormalize_after_drop = o.renormalize_after_drop;
  r.steering.assign(c.steering.begin(), c.steering.end());
  c.what = "case " + std::to_string(i) + ": E " + std::to_string(o.num_experts) + " d " + std::to_string(o.hidden) +
           " T " + std::to_string(c.T) + " mode " + std::to_string(mode) + " k [" + std::to_string(o.k_min) + ", " +
           std::to_string(o.k_max) + "] cap " + std::to_string(o.capacity_factor);
  return c;
}

DynamicKRouter router_of(const Case& c) {
  DynamicKRouter r(c.opt, c.W);
  r.set_logit_steering(c.steering);
  return r;
}

struct Tally {
  int64_t compared = 0, fragile = 0;
};
Tally g_tally;

class TallyPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    std::printf("[ dynamic_k ref ] tokens compared exactly: %lld, excluded as near-ties: %lld\n",
                (long long)g_tally.compared, (long long)g_tally.fragile);
  }
};
[[maybe_unused]] ::testing::Environment* const g_env = ::testing::AddGlobalTestEnvironment(new TallyPrinter);

// Compares the library plan with the reference; returns the tokens excluded as near-ties.
std::vector<uint8_t> compare(const Case& c, const dref::Result& want, const RoutingPlan& plan,
                             std::vector<std::string>& errs) {
  const int64_t T = c.T;
  std::vector<uint8_t> excluded(static_cast<size_t>(T), 0);
  // A capacity decision compares weights across tokens: when any token is fragile or two
  // weights at an expert's cut are close, the whole case is compared on the token side only.
  bool any_fragile = false;
  for (uint8_t f : want.fragile) any_fragile |= f != 0;
  const bool cap_fragile = c.opt.capacity_factor > 0 && (any_fragile || want.routing.capacity_boundary_gap < 1e-5);
  for (int64_t t = 0; t < T; ++t) {
    const ref::TokenRouting& tr = want.routing.token[static_cast<size_t>(t)];
    const auto ids = experts_of(plan, t);
    const auto w = weights_of(plan, t);
    const std::string who = "token " + std::to_string(t) + ": ";
    if (tr.padded) {
      if (!ids.empty()) errs.push_back(who + "padded token has slots");
      continue;
    }
    if (want.fragile[static_cast<size_t>(t)] || cap_fragile) {
      excluded[static_cast<size_t>(t)] = 1;
      ++g_tally.fragile;
      continue;
    }
    ++g_tally.compared;
    if (ids.size() != tr.slots.size()) {
      errs.push_back(who + std::to_string(ids.size()) + " slots, expected " + std::to_string(tr.slots.size()));
      continue;
    }
    // Slot order: descending p; chosen experts whose p near-tie may swap places.
    for (size_t j = 0; j < ids.size(); ++j) {
      const ref::Slot& s = tr.slots[j];
      size_t at = j;
      if (ids[j] != s.expert) {
        at = static_cast<size_t>(std::find(ids.begin(), ids.end(), s.expert) - ids.begin());
        const bool near = at < ids.size() &&
                          ref::relative_gap(tr.selection[static_cast<size_t>(ids[j])],
                                            tr.selection[static_cast<size_t>(s.expert)]) < 1e-6;
        if (!near) {
          errs.push_back(who + "slot " + std::to_string(j) + " expert " + std::to_string(ids[j]) + ", expected " +
                         std::to_string(s.expert));
          continue;
        }
      }
      const bool dropped = plan.slot_dropped()[static_cast<size_t>(plan.slot_offsets()[static_cast<size_t>(t)]) + at];
      if (dropped != s.dropped) errs.push_back(who + "slot " + std::to_string(j) + " dropped flag differs");
      if (!(std::fabs(w[at] - s.weight) <= 2e-5 * std::fabs(s.weight) + 1e-7))
        errs.push_back(who + "weight of expert " + std::to_string(s.expert) + " = " + std::to_string(w[at]) +
                       ", expected " + std::to_string(s.weight));
    }
  }
  return excluded;
}

TEST(DynamicKRandom, MatchesReference) {
  Rng rng(151);
  int64_t cases_with_variable_k = 0;
  for (int i = 0; i < 240; ++i) {
    const Case c = random_case(rng, i);
    SCOPED_TRACE(c.what);
    const DynamicKRouter router = router_of(c);
    RoutingPlan plan;
    moekit::RouterScratch scratch;
    router.route(c.batch(), c.x.data(), plan, scratch, 1);
    ASSERT_TRUE(plan.finalized());
    const dref::Result want = dref::route(c.ref, c.W.data(), c.x.data(), c.T, c.pad_ptr());
    std::vector<std::string> errs;
    compare(c, want, plan, errs);
    EXPECT_TRUE(errs.empty()) << join(errs);
    // Invariants of any finalised plan with a variable slot count.
    const auto inv = ref::plan_invariant_errors(ref::view_of(plan), c.pad_ptr(), -1);
    EXPECT_TRUE(inv.empty()) << join(inv);
    // The Tsallis entropy of each token (tsallis mode).
    if (c.opt.mode == DynamicKMode::tsallis) {
      ASSERT_EQ(scratch.values.size(), static_cast<size_t>(c.T));
      for (int64_t t = 0; t < c.T; ++t)
        EXPECT_NEAR(scratch.values[static_cast<size_t>(t)], want.entropy[static_cast<size_t>(t)], 2e-5) << t;
    }
    int64_t lo = 1 << 30, hi = -1;
    for (int64_t t = 0; t < c.T; ++t)
      if (c.pad.empty() || !c.pad[static_cast<size_t>(t)]) {
        lo = std::min<int64_t>(lo, plan.slot_offsets()[t + 1] - plan.slot_offsets()[t]);
        hi = std::max<int64_t>(hi, plan.slot_offsets()[t + 1] - plan.slot_offsets()[t]);
      }
    cases_with_variable_k += hi > lo;
  }
  EXPECT_GT(cases_with_variable_k, 60);  // the cases really exercise a variable k
  EXPECT_LT(g_tally.fragile, g_tally.compared / 10);
}

TEST(DynamicKRandom, ThreadsGiveIdenticalPlans) {
  Rng rng(9);
  for (int i = 0; i < 30; ++i) {
    const Case c = random_case(rng, i);
    SCOPED_TRACE(c.what);
    const DynamicKRouter router = router_of(c);
    RoutingPlan a, b;
    moekit::RouterScratch sa, sb;
    router.route(c.batch(), c.x.data(), a, sa, 1);
    router.route(c.batch(), c.x.data(), b, sb, 2);
    ASSERT_EQ(a.num_slots(), b.num_slots());
    EXPECT_TRUE(std::equal(a.slot_offsets().begin(), a.slot_offsets().end(), b.slot_offsets().begin()));
    EXPECT_TRUE(std::equal(a.slot_expert().begin(), a.slot_expert().end(), b.slot_expert().begin()));
    EXPECT_TRUE(test_support::same_bits(a.slot_weight(), b.slot_weight()));
  }
}

TEST(DynamicKEdges, RuleBoundariesAndClipping) {
  // E = 4 experts with p = (0.4, 0.3, 0.2, 0.1) from logits log p (hidden 1, x = 1).
  const std::vector<float> W = {std::log(0.4f), std::log(0.3f), std::log(0.2f), std::log(0.1f)};
  const std::vector<float> x = {1.0f};
  auto count = [&](DynamicKOptions o) {
    o.num_experts = 4;
    o.hidden = 1;
    RoutingPlan plan;
    moekit::RouterScratch s;
    DynamicKRouter(o, W).route(Batch::single(1, 1), x.data(), plan, s, 1);
    return plan.num_slots();
  };
  DynamicKOptions o;
  o.top_p = 0.65;  // reach: 0.4, 0.7 -> 2; within: 0.4 <= 0.65, 0.7 > 0.65 -> 1
  EXPECT_EQ(count(o), 2);
  o.top_p_rule = TopPRule::within;
  EXPECT_EQ(count(o), 1);
  o.k_min = 3;  // clipped up
  EXPECT_EQ(count(o), 3);
  o = {};
  o.top_p = 1.0;
  o.k_max = 2;  // clipped down
  EXPECT_EQ(count(o), 2);
  o = {};
  o.mode = DynamicKMode::threshold;
  o.threshold = 0.25;  // 0.4, 0.3
  EXPECT_EQ(count(o), 2);
  o.threshold = 0.95;  // none, k_min 1
  EXPECT_EQ(count(o), 1);
  o.k_min = 0;  // none at all: the token gets no slot
  EXPECT_EQ(count(o), 0);
  o = {};
  o.mode = DynamicKMode::tsallis;
  o.top_p = 0.3;
  o.entropy_threshold = 0.5;  // normalised Tsallis entropy of (0.4, 0.3, 0.2, 0.1) at q 1.5 is ~0.92
  EXPECT_EQ(count(o), 4);
  o.entropy_threshold = 0.95;  // below: top-p 0.3 -> 1
  EXPECT_EQ(count(o), 1);
}

// A bank that records which tokens each expert received (to prove no padding rows run).
struct RecordingBank {
  int64_t E = 0, d = 0;
  mutable std::mutex m;
  mutable std::vector<std::vector<int32_t>> seen;
  RecordingBank(int64_t e, int64_t dd) : E(e), d(dd), seen(static_cast<size_t>(e)) {}
  RecordingBank(RecordingBank&& o) noexcept : E(o.E), d(o.d), seen(std::move(o.seen)) {}
  [[nodiscard]] int64_t num_experts() const { return E; }
  [[nodiscard]] int64_t d_in() const { return d; }
  [[nodiscard]] int64_t d_out() const { return d; }
  [[nodiscard]] size_t scratch_floats(int64_t) const { return 0; }
  void run(int64_t e, const float* in, int64_t rows, float* out, float*) const {
    for (int64_t i = 0; i < rows * d; ++i) out[i] = in[i] * static_cast<float>(e + 1);
  }
  void run(int64_t e, const float* in, int64_t rows, float* out, float* s, const moekit::BlockContext& ctx) const {
    run(e, in, rows, out, s);
    std::lock_guard<std::mutex> lock(m);
    auto& v = seen[static_cast<size_t>(e)];
    v.insert(v.end(), ctx.tokens.begin(), ctx.tokens.end());
  }
};

TEST(DynamicKLayer, ExpertsRunExactlyTheKeptSlots) {
  Rng rng(44);
  for (int i = 0; i < 20; ++i) {
    Case c = random_case(rng, i);
    SCOPED_TRACE(c.what);
    const int64_t E = c.opt.num_experts, d = c.opt.hidden;
    moekit::SparseLayer<DynamicKRouter, RecordingBank> layer(router_of(c), RecordingBank(E, d));
    Workspace ws;
    std::vector<float> out(static_cast<size_t>(c.T * d));
    layer.forward(c.batch(), c.x.data(), out.data(), ws, 2);
    const RoutingPlan& plan = ws.plan;
    int64_t rows = 0;
    for (int64_t e = 0; e < E; ++e) {
      auto got = layer.experts().seen[static_cast<size_t>(e)];
      std::sort(got.begin(), got.end());
      std::vector<int32_t> want;
      for (int32_t s = plan.expert_offsets()[e]; s < plan.expert_offsets()[e + 1]; ++s)
        want.push_back(plan.expert_tokens()[static_cast<size_t>(s)]);
      EXPECT_EQ(got, want) << "expert " << e;
      rows += static_cast<int64_t>(got.size());
    }
    EXPECT_EQ(rows, plan.num_kept());  // no row beyond the kept slots: nothing padded to k_max
    // y_t = sum over kept slots of w * (e + 1) x_t.
    for (int64_t t = 0; t < c.T; ++t) {
      double scale = 0.0;
      const auto ids = experts_of(plan, t);
      const auto w = weights_of(plan, t);
      for (size_t j = 0; j < ids.size(); ++j) scale += double(w[j]) * double(ids[j] + 1);
      for (int64_t j = 0; j < d; ++j) {
        const double want = c.pad.empty() || !c.pad[static_cast<size_t>(t)] ? scale * c.x[static_cast<size_t>(t * d + j)] : 0.0;
        ASSERT_NEAR(out[static_cast<size_t>(t * d + j)], want, 1e-5 * (1.0 + std::fabs(want))) << t << ", " << j;
      }
    }
  }
}

TEST(DynamicKLayer, ForwardMatchesReference) {
  Rng rng(61);
  for (int i = 0; i < 12; ++i) {
    Case c = random_case(rng, i);
    c.opt.hidden = c.ref.hidden = rng.integer(4, 40);
    const int64_t E = c.opt.num_experts, d = c.opt.hidden, f = rng.integer(4, 40);
    c.W = rng.vec(static_cast<size_t>(E * d), 2.0 / std::sqrt(double(d)));
    c.x = rng.vec(static_cast<size_t>(c.T * d), 1.0);
    SCOPED_TRACE(c.what);
    std::vector<ref::Ffn> experts;
    for (int64_t e = 0; e < E; ++e) experts.push_back(test_support::random_ref_ffn(rng, d, f));
    const moekit::SparseLayer<DynamicKRouter, moekit::FfnBank> layer(router_of(c), test_support::bank_of(experts, d, f));
    Workspace ws;
    std::vector<float> out(static_cast<size_t>(c.T * d), 7.0f);
    layer.forward(c.batch(), c.x.data(), out.data(), ws, 2);
    const dref::Result want = dref::route(c.ref, c.W.data(), c.x.data(), c.T, c.pad_ptr());
    std::vector<std::string> errs;
    const auto excluded = compare(c, want, ws.plan, errs);
    EXPECT_TRUE(errs.empty()) << join(errs);
    // Output of the reference decisions; excluded tokens take the library's decisions.
    ref::Routing r = want.routing;
    const ref::Routing lib = ref::routing_from_view(ref::view_of(ws.plan), c.pad_ptr());
    for (int64_t t = 0; t < c.T; ++t)
      if (excluded[static_cast<size_t>(t)]) r.token[static_cast<size_t>(t)] = lib.token[static_cast<size_t>(t)];
    const std::vector<double> y = ref::moe_forward(r, experts, {}, c.x.data(), c.T, d);
    const auto verrs = ref::compare_values(y, out.data(), d, 1e-4, 1e-5);
    EXPECT_TRUE(verrs.empty()) << "layer output:" << join(verrs);
  }
}

TEST(DynamicKEntropy, MatchesReference) {
  Rng rng(3);
  for (int i = 0; i < 200; ++i) {
    const int64_t n = rng.integer(1, 64);
    std::vector<float> p(static_cast<size_t>(n));
    double sum = 0.0;
    for (float& v : p) sum += (v = static_cast<float>(rng.coin(0.2) ? 0.0 : rng.uniform(0.0, 1.0)));
    if (sum == 0) p[0] = 1.0f, sum = 1.0;
    for (float& v : p) v = static_cast<float>(v / sum);
    const std::vector<double> pd(p.begin(), p.end());
    for (double q : {0.5, 1.0, 1.5, 2.0, 3.0})
      for (bool norm : {false, true})
        EXPECT_NEAR(moekit::tsallis_entropy(p.data(), n, q, norm), dref::tsallis(pd, q, norm), 1e-12)
            << "n " << n << " q " << q << " norm " << norm;
  }
}

TEST(DynamicKSchedule, FormulasAndShapes) {
  using S = moekit::DynamicKSchedule;
  Rng rng(5);
  for (int i = 0; i < 200; ++i) {
    const int64_t L = rng.integer(1, 40), lo = rng.integer(1, 8), hi = lo + rng.integer(0, 12);
    const auto uni = moekit::dynamic_k_schedule(S::uniform, L, lo, hi);
    const auto desc = moekit::dynamic_k_schedule(S::descending, L, lo, hi);
    const auto asc = moekit::dynamic_k_schedule(S::ascending, L, lo, hi);
    const auto pyr = moekit::dynamic_k_schedule(S::pyramid, L, lo, hi);
    const auto wave = moekit::dynamic_k_schedule(S::wave, L, lo, hi);
    ASSERT_EQ(static_cast<int64_t>(desc.size()), L);
    for (int64_t l = 0; l < L; ++l) {
      EXPECT_EQ(uni[l], hi);
      if (L == 1) {  // one layer: the whole budget
        EXPECT_TRUE(desc[0] == hi && asc[0] == hi && pyr[0] == hi && wave[0] == hi);
        continue;
      }
      const double u = double(l) / double(L - 1), r = double(hi - lo);
      EXPECT_EQ(desc[l], std::llround(double(hi) - r * u));
      EXPECT_EQ(asc[l], std::llround(double(lo) + r * u));
      EXPECT_EQ(pyr[l], std::llround(double(lo) + r * 2.0 * double(std::min(l, L - 1 - l)) / double(L - 1)));
      EXPECT_EQ(wave[l], std::llround(double(lo) + r * 0.5 * (1.0 + std::cos(4.0 * M_PI * u))));
      EXPECT_EQ(pyr[l], pyr[L - 1 - l]);  // symmetric
      if (l > 0) {
        EXPECT_LE(desc[l], desc[l - 1]);
        EXPECT_GE(asc[l], asc[l - 1]);
      }
    }
    EXPECT_EQ(desc.front(), hi);
    EXPECT_EQ(asc.back(), hi);
  }
  expect_error([] { (void)moekit::dynamic_k_schedule(S::pyramid, 0, 1, 2); }, {"layers expected in [1, 1e6]", "got 0"});
  expect_error([] { (void)moekit::dynamic_k_schedule(S::pyramid, 3, 3, 2); }, {"1 <= k_lo <= k_hi", "k_lo = 3"});
}

TEST(DynamicKValidation, BadOptionsAndInputs) {
  auto make = [](auto edit) {
    DynamicKOptions o;
    o.num_experts = 4;
    o.hidden = 2;
    edit(o);
    return DynamicKRouter(o, std::vector<float>(8, 0.5f));
  };
  expect_error([&] { make([](DynamicKOptions& o) { o.top_p = 0; }); }, {"top_p expected in (0, 1]", "got 0"});
  expect_error([&] { make([](DynamicKOptions& o) { o.top_p = std::nan(""); }); }, {"top_p expected in (0, 1]"});
  expect_error([&] { make([](DynamicKOptions& o) { o.threshold = 1.5; }); }, {"threshold expected in [0, 1]"});
  expect_error([&] { make([](DynamicKOptions& o) { o.k_min = 5; }); }, {"k_min expected in [0, E = 4]", "got 5"});
  expect_error([&] { make([](DynamicKOptions& o) { o.k_max = 5; }); }, {"k_max expected in [0, E = 4]"});
  expect_error([&] { make([](DynamicKOptions& o) { o.k_min = 3, o.k_max = 2; }); }, {"k_max expected >= max(k_min, 1) = 3"});
  expect_error([&] { make([](DynamicKOptions& o) { o.entropy_index = 0; }); }, {"entropy_index (Tsallis q) expected"});
  expect_error([&] { make([](DynamicKOptions& o) { o.capacity_factor = -1; }); }, {"capacity_factor expected finite"});
  expect_error([&] { DynamicKRouter(DynamicKOptions{4, 2}, std::vector<float>(7, 0.5f)); },
               {"gate.weight expected [4, 2] = 8 values", "got 7"});
  std::vector<float> W(8, 0.5f);
  W[3] = std::nanf("");
  expect_error([&] { DynamicKRouter(DynamicKOptions{4, 2}, W); }, {"gate.weight[1, 1] expected finite"});
  DynamicKRouter r = make([](DynamicKOptions&) {});
  expect_error([&] { r.set_logit_steering(std::vector<float>(3, 0.0f)); }, {"logit steering expected [4]", "got 3"});
  // A non-finite hidden state reaches the router as a non-finite logit.
  const std::vector<float> x = {1.0f, std::numeric_limits<float>::infinity()};
  RoutingPlan plan;
  moekit::RouterScratch s;
  expect_error([&] { r.route(Batch::single(1, 2), x.data(), plan, s, 1); }, {"logit of token 0", "expected finite"});
}

}  // namespace
