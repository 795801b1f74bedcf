// SPDX-License-Identifier: Apache-2.0
// Expert-choice router (ROUTING.md section 3) against the double-precision reference in
// tests/reference/expert_choice_ref: batch expert choice, the per-token cap, padding, ties,
// threshold calibration and routing, the auxiliary predictor, causality, the [E, kc] outputs,
// the layer, thread determinism and argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/layer.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/expert_choice.hpp"
#include "moekit/routing_plan.hpp"
#include "reference/expert_choice_ref.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Batch;
using moekit::ExpertChoiceMode;
using moekit::ExpertChoiceOptions;
using moekit::ExpertChoicePredictor;
using moekit::ExpertChoiceRouter;
using moekit::RouterScratch;
using moekit::RoutingPlan;

constexpr double kWeightRel = 1e-4, kWeightAbs = 1e-6;

// ------------------------------------------------------------------------ helpers

using test_support::Rng;

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& m : v) s += "\n  " + m;
  return s;
}

// One routing problem: options, weights, hidden states, padding.
struct Case {
  ExpertChoiceOptions opt;
  std::vector<float> W, x;
  std::vector<uint8_t> pad;  // empty: no padding mask
  ExpertChoicePredictor pred;
  int64_t T = 0;

  Batch batch() const {
    Batch b = Batch::single(T, opt.hidden);
    b.padding = pad;
    return b;
  }
  const uint8_t* pad_ptr() const { return pad.empty() ? nullptr : pad.data(); }
  int64_t routed() const {
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) n += pad.empty() || pad[static_cast<size_t>(t)] == 0;
    return n;
  }
  ExpertChoiceRouter router() const { return ExpertChoiceRouter(opt, W, pred); }
  ref_ec::Params params() const {
    ref_ec::Params p;
    p.num_experts = opt.num_experts;
    p.hidden = opt.hidden;
    p.capacity_factor = opt.capacity_factor;
    p.max_experts_per_token = opt.max_experts_per_token;
    return p;
  }
  ref_ec::Predictor ref_pred() const {
    return {opt.aux_hidden, pred.weight0, pred.bias0, pred.weight2, pred.bias2};
  }
};

std::string describe(const Case& c) {
  char buf[300];
  std::snprintf(buf, sizeof buf, "T=%lld routed=%lld E=%lld d=%lld c=%g cap=%lld mode=%s H=%lld",
                (long long)c.T, (long long)c.routed(), (long long)c.opt.num_experts,
                (long long)c.opt.hidden, c.opt.capacity_factor,
                (long long)c.opt.max_experts_per_token, moekit::expert_choice_mode_name(c.opt.mode),
                (long long)c.opt.aux_hidden);
  return buf;
}

ExpertChoicePredictor random_predictor(Rng& rng, int64_t H, int64_t d, int64_t E) {
  ExpertChoicePredictor p;
  p.weight0 = rng.vec(static_cast<size_t>(H * d), std::sqrt(3.0 / double(d)));
  p.bias0 = rng.vec(static_cast<size_t>(H), 0.3);
  p.weight2 = rng.vec(static_cast<size_t>(E * H), std::sqrt(3.0 / double(H)));
  p.bias2 = rng.vec(static_cast<size_t>(E), 0.3);
  return p;
}

struct Knobs {
  double p_cap = 0.4, p_padding = 0.35;
  int64_t min_T = 0, max_T = 80, max_E = 32;
};

Case random_case(Rng& rng, const Knobs& kn = {}) {
  Case c;
  ExpertChoiceOptions& o = c.opt;
  // E >= 2: with E = 1 every score is exactly 1, a structural tie (ExpertChoiceBatch.Ties covers
  // it).
  o.num_experts = rng.integer(2, kn.max_E);
  o.hidden = rng.coin(0.2) ? rng.integer(1, 6) : rng.integer(1, 64);
  const int64_t E = o.num_experts;
  const double cfs[] = {0.5, 1.0, 2.0, 4.0, double(E), rng.uniform(0.05, double(E) + 1)};
  o.capacity_factor = cfs[rng.integer(0, 5)];
  if (rng.coin(kn.p_cap)) o.max_experts_per_token = rng.integer(1, E);
  o.aux_hidden = rng.coin(0.5) ? 64 : rng.integer(1, 20);
  c.T = rng.integer(kn.min_T, kn.max_T);
  const double logit_std = rng.uniform(0.5, 4.0);
  c.W = rng.vec(static_cast<size_t>(E * o.hidden), 3.0 * logit_std / std::sqrt(double(o.hidden)));
  c.x = rng.vec(static_cast<size_t>(c.T * o.hidden), 1.0);
  c.pred = random_predictor(rng, o.aux_hidden, o.hidden, E);
  if (rng.coin(kn.p_padding)) {
    c.pad.assign(static_cast<size_t>(c.T), 0);
    const double rate = rng.uniform(0.05, 0.6);
    for (uint8_t& p : c.pad) p = rng.coin(rate);
  }
  return c;
}

// A case whose logits are exact: d = E, W = identity, so L[t] = x[t].
Case exact_case(int64_t E, const std::vector<std::vector<float>>& logits, double c = 2.0,
                int64_t cap = 0) {
  Case k;
  k.opt.num_experts = E;
  k.opt.hidden = E;
  k.opt.capacity_factor = c;
  k.opt.max_experts_per_token = cap;
  k.W.assign(static_cast<size_t>(E * E), 0.0f);
  for (int64_t e = 0; e < E; ++e) k.W[static_cast<size_t>(e * E + e)] = 1.0f;
  k.T = static_cast<int64_t>(logits.size());
  for (const auto& row : logits) k.x.insert(k.x.end(), row.begin(), row.end());
  return k;
}

RoutingPlan route(const ExpertChoiceRouter& r, const Case& c, int threads = 1) {
  RoutingPlan plan;
  RouterScratch scratch;
  r.route(c.batch(), c.x.data(), plan, scratch, threads);
  return plan;
}

struct TokenSlots {
  std::vector<int32_t> experts;
  std::vector<float> weights;
  std::vector<uint8_t> dropped;
  bool operator==(const TokenSlots& o) const {
    return experts == o.experts && dropped == o.dropped && weights.size() == o.weights.size() &&
           (weights.empty() ||
            std::memcmp(weights.data(), o.weights.data(), weights.size() * sizeof(float)) == 0);
  }
};

TokenSlots slots_of(const RoutingPlan& p, int64_t t) {
  const auto b = p.slot_offsets()[static_cast<size_t>(t)],
             e = p.slot_offsets()[static_cast<size_t>(t) + 1];
  return {{p.slot_expert().begin() + b, p.slot_expert().begin() + e},
          {p.slot_weight().begin() + b, p.slot_weight().begin() + e},
          {p.slot_dropped().begin() + b, p.slot_dropped().begin() + e}};
}

std::vector<int32_t> kept_tokens(const RoutingPlan& p, int64_t e) {
  const auto b = p.expert_offsets()[static_cast<size_t>(e)],
             en = p.expert_offsets()[static_cast<size_t>(e) + 1];
  return {p.expert_tokens().begin() + b, p.expert_tokens().begin() + en};
}

// Structural invariants of an expert-choice plan.
std::vector<std::string> invariant_errors(const RoutingPlan& p, const uint8_t* pad) {
  std::vector<std::string> err;
  auto fail = [&](const std::string& m) { err.push_back(m); };
  if (!p.finalized()) fail("plan not finalized");
  const int64_t T = p.num_tokens(), E = p.num_experts();
  int64_t kept = 0;
  for (int64_t t = 0; t < T; ++t) {
    const TokenSlots s = slots_of(p, t);
    const std::string tt = "token " + std::to_string(t) + ": ";
    if (pad != nullptr && pad[t] && !s.experts.empty()) fail(tt + "padded token has slots");
    if (static_cast<int64_t>(s.experts.size()) > E) fail(tt + "more than E slots");
    std::vector<int32_t> ids = s.experts;
    std::sort(ids.begin(), ids.end());
    if (std::adjacent_find(ids.begin(), ids.end()) != ids.end())
      fail(tt + "an expert appears twice");
    bool seen_drop = false;
    for (size_t j = 0; j < s.experts.size(); ++j) {
      if (s.dropped[j]) {
        seen_drop = true;
        if (s.weights[j] != 0.0f) fail(tt + "dropped slot with weight != 0");
      } else {
        ++kept;
        if (seen_drop) fail(tt + "kept slot after a dropped one");
        if (!(s.weights[j] > 0.0f) && !(s.weights[j] == 0.0f))
          fail(tt + "weight not finite/non-negative");
        if (j > 0 && !s.dropped[j - 1] &&
            (s.weights[j - 1] < s.weights[j] ||
             (s.weights[j - 1] == s.weights[j] && s.experts[j - 1] > s.experts[j])))
          fail(tt + "slots not in descending score (ties: lower expert)");
      }
    }
  }
  if (kept != p.num_kept()) fail("kept count mismatch");
  for (int64_t e = 0; e < E; ++e) {
    const auto toks = kept_tokens(p, e);
    if (!std::is_sorted(toks.begin(), toks.end()))
      fail("expert " + std::to_string(e) + ": tokens not ascending");
  }
  return err;
}

// Comparison of a library plan with the reference.
struct Report {
  int64_t compared = 0, near_tie = 0, experts_compared = 0, experts_excluded = 0;
  std::vector<std::string> errors;
};

struct Totals {
  int64_t cases = 0, compared = 0, near_tie = 0, experts_compared = 0, experts_excluded = 0;
};
Totals g_totals;

class TotalsPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    std::printf(
        "[ expert_choice ref ] cases: %lld, tokens compared exactly: %lld, excluded as near-ties: "
        "%lld; "
        "experts compared: %lld, excluded: %lld\n",
        (long long)g_totals.cases, (long long)g_totals.compared, (long long)g_totals.near_tie,
        (long long)g_totals.experts_compared, (long long)g_totals.experts_excluded);
  }
};
[[maybe_unused]] ::testing::Environment* const g_env =
    ::testing::AddGlobalTestEnvironment(new TotalsPrinter);

Report compare(const ref_ec::Routing& want, const RoutingPlan& got, bool exclude_near_ties = true) {
  Report r;
  auto fail = [&](const std::string& m) {
    if (r.errors.size() < 12) r.errors.push_back(m);
  };
  if (got.num_tokens() != want.tokens || got.num_experts() != want.experts) {
    fail("shape differs");
    return r;
  }
  for (int64_t t = 0; t < want.tokens; ++t) {
    const ref_ec::TokenRouting& w = want.token[static_cast<size_t>(t)];
    const TokenSlots g = slots_of(got, t);
    const std::string tt = "token " + std::to_string(t) + ": ";
    if (w.padded) {
      if (!g.experts.empty()) fail(tt + "padded token routed");
      continue;
    }
    if (exclude_near_ties && w.near_tie) {
      ++r.near_tie;
      continue;
    }
    ++r.compared;
    if (g.experts.size() != w.slots.size()) {
      fail(tt + "slot count " + std::to_string(g.experts.size()) + ", want " +
           std::to_string(w.slots.size()));
      continue;
    }
    for (size_t j = 0; j < w.slots.size(); ++j) {
      const ref_ec::Slot& ws = w.slots[j];
      const std::string sj = tt + "slot " + std::to_string(j) + ": ";
      if (g.experts[j] != ws.expert)
        fail(sj + "expert " + std::to_string(g.experts[j]) + ", want " + std::to_string(ws.expert));
      if (static_cast<bool>(g.dropped[j]) != ws.dropped) fail(sj + "dropped flag differs");
      if (std::fabs(g.weights[j] - ws.weight) > kWeightRel * std::fabs(ws.weight) + kWeightAbs)
        fail(sj + "weight " + std::to_string(g.weights[j]) + ", want " + std::to_string(ws.weight));
    }
  }
  for (int64_t e = 0; e < want.experts; ++e) {
    if (exclude_near_ties && want.expert_near_tie[static_cast<size_t>(e)]) {
      ++r.experts_excluded;
      continue;
    }
    ++r.experts_compared;
    const auto g = kept_tokens(got, e);
    const auto& w = want.kept[static_cast<size_t>(e)];
    if (!std::equal(g.begin(), g.end(), w.begin(), w.end()))
      fail("expert " + std::to_string(e) + ": kept tokens differ (" + std::to_string(g.size()) +
           " vs " + std::to_string(w.size()) + ")");
  }
  return r;
}

// Routes with the library (1 and 2 threads) and the reference; checks invariants,
// decisions, weights and the [E, width] outputs. Returns the report.
Report check_route(const Case& c, const ExpertChoiceRouter& router, const ref_ec::Routing& want,
                   bool exclude_near_ties = true) {
  SCOPED_TRACE(describe(c));
  const RoutingPlan plan = route(router, c, 1);
  const auto inv = invariant_errors(plan, c.pad_ptr());
  EXPECT_TRUE(inv.empty()) << "plan invariants:" << join(inv);
  Report rep = compare(want, plan, exclude_near_ties);
  EXPECT_TRUE(rep.errors.empty()) << "routing differs from the reference:" << join(rep.errors);
  // Threads: identical plans, bit for bit.
  const RoutingPlan plan2 = route(router, c, 2);
  for (int64_t t = 0; t < c.T; ++t)
    EXPECT_TRUE(slots_of(plan, t) == slots_of(plan2, t)) << "threads 1 vs 2, token " << t;
  // Outputs [E, width]: kept tokens of each expert by descending weight, then -1 / 0.
  const int64_t E = c.opt.num_experts;
  const int64_t width = moekit::expert_choice_output_width(plan);
  if (c.opt.mode == ExpertChoiceMode::batch) {
    EXPECT_LE(width, router.capacity(c.batch()));
    if (c.opt.max_experts_per_token == 0) {
      EXPECT_EQ(width, router.capacity(c.batch()));
    }
  }
  std::vector<int32_t> ids(static_cast<size_t>(E * width));
  std::vector<float> w(static_cast<size_t>(E * width));
  moekit::expert_choice_outputs(plan, width, ids, w);
  for (int64_t e = 0; e < E; ++e) {
    const auto kept = kept_tokens(plan, e);
    std::vector<int32_t> row(ids.begin() + e * width,
                             ids.begin() + e * width + static_cast<int64_t>(kept.size()));
    std::vector<int32_t> sorted_row = row;
    std::sort(sorted_row.begin(), sorted_row.end());
    EXPECT_EQ(sorted_row, kept) << "expert " << e << ": outputs list other tokens than the plan";
    for (int64_t j = 0; j < width; ++j) {
      const auto i = static_cast<size_t>(e * width + j);
      if (j >= static_cast<int64_t>(kept.size())) {
        EXPECT_EQ(ids[i], -1);
        EXPECT_EQ(w[i], 0.0f);
      } else if (j > 0) {
        EXPECT_TRUE(w[i - 1] > w[i] || (w[i - 1] == w[i] && ids[i - 1] < ids[i]))
            << "expert " << e << " pick order";
      }
    }
    if (!want.expert_near_tie[static_cast<size_t>(e)] || !exclude_near_ties) {
      std::vector<int32_t> rids;
      std::vector<double> rw;
      ref_ec::expert_outputs(want, width, rids, rw);
      for (int64_t j = 0; j < width; ++j) {
        const auto i = static_cast<size_t>(e * width + j);
        // Pick order among equal-looking scores is a near tie of its own: compare the ids
        // only where the reference's neighbours are apart.
        const bool ordered =
            (j == 0 || ref_ec::relative_gap(rw[i - 1], rw[i]) >= 1e-6 || !exclude_near_ties) &&
            (j + 1 >= width || ref_ec::relative_gap(rw[i], rw[i + 1]) >= 1e-6 ||
             !exclude_near_ties);
        if (ordered) {
          EXPECT_EQ(ids[i], rids[i]) << "expert " << e << " output " << j;
        }
        EXPECT_NEAR(w[i], rw[i], kWeightRel * std::fabs(rw[i]) + kWeightAbs)
            << "expert " << e << " output " << j;
      }
    }
  }
  ++g_totals.cases;
  if (exclude_near_ties) {
    g_totals.compared += rep.compared;
    g_totals.near_tie += rep.near_tie;
    g_totals.experts_compared += rep.experts_compared;
    g_totals.experts_excluded += rep.experts_excluded;
  }
  return rep;
}

Report check_batch(const Case& c, bool exclude_near_ties = true) {
  const ExpertChoiceRouter router = c.router();
  const ref_ec::Routing want = ref_ec::route_batch(c.params(), c.W.data(), c.x.data(), c.T,
                                                   c.pad_ptr(), exclude_near_ties ? 1e-6 : 0.0);
  EXPECT_EQ(router.capacity(c.batch()), want.kc);
  return check_route(c, router, want, exclude_near_ties);
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

// Checks many random cases of one mode; asserts exclusions are rare and comparisons happened.
template <class CheckFn>
void run_random(uint64_t seed, int cases, const Knobs& kn, CheckFn&& check) {
  Rng rng(seed);
  int64_t compared = 0, excluded = 0, unpadded = 0, experts = 0, slots = 0;
  for (int i = 0; i < cases; ++i) {
    Case c = random_case(rng, kn);
    SCOPED_TRACE("case " + std::to_string(i));
    const Report rep = check(c, rng);
    compared += rep.compared;
    excluded += rep.near_tie;
    experts += rep.experts_compared;
    unpadded += c.routed();
    slots += c.routed();
    if (::testing::Test::HasFailure()) return;
  }
  std::printf(
      "[ random ] seed %llx: tokens compared %lld, near-tie excluded %lld, experts compared %lld\n",
      (unsigned long long)seed, (long long)compared, (long long)excluded, (long long)experts);
  EXPECT_GT(compared, unpadded * 9 / 10) << "most tokens must be compared";
  EXPECT_LE(excluded, unpadded / 50 + 2) << "near-tie exclusions should be rare";
  EXPECT_GT(experts, 0);
}

// ------------------------------------------------------------------------ reference self-checks

TEST(ExpertChoiceReference, HandComputed) {
  // E = 2, four tokens, c = 1: kc = floor(4 * 1 / 2) = 2.
  // Logits (d = E, W = I): softmax over 2 experts gives S[t, 0] = sigmoid(L0 - L1).
  const Case c = exact_case(2, {{2, 0}, {0, 0}, {1, 0}, {0, 3}}, 1.0);
  const ref_ec::Routing r =
      ref_ec::route_batch(c.params(), c.W.data(), c.x.data(), c.T, nullptr, 0.0);
  auto sg = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  EXPECT_EQ(r.kc, 2);
  // S[:, 0] = s(2), 0.5, s(1), s(-3): expert 0 picks tokens 0, 2.
  // S[:, 1] = s(-2), 0.5, s(-1), s(3): expert 1 picks tokens 3, 1.
  EXPECT_EQ(r.picks[0], (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(r.picks[1], (std::vector<int64_t>{3, 1}));
  ASSERT_EQ(r.token[0].slots.size(), 1u);
  EXPECT_NEAR(r.token[0].slots[0].weight, sg(2.0), 1e-15);
  EXPECT_EQ(r.token[1].slots[0].expert, 1);
  EXPECT_NEAR(r.token[1].slots[0].weight, 0.5, 1e-15);
  EXPECT_EQ(r.token[3].slots[0].expert, 1);
  // Capacity formula: clamps at 1 and at T.
  EXPECT_EQ(ref_ec::capacity(0, 2.0, 8), 0);
  EXPECT_EQ(ref_ec::capacity(3, 2.0, 64), 1);
  EXPECT_EQ(ref_ec::capacity(10, 2.0, 8), 2);
  EXPECT_EQ(ref_ec::capacity(10, 8.0, 8), 10);
  EXPECT_EQ(ref_ec::capacity(10, 100.0, 8), 10);
  // Calibration: first batch sets kth, then EMA.
  const std::vector<double> t1 =
      ref_ec::calibrate(c.params(), {}, 0.9, c.W.data(), c.x.data(), c.T, nullptr);
  EXPECT_NEAR(t1[0], sg(1.0), 1e-15);  // second largest of column 0
  EXPECT_NEAR(t1[1], 0.5, 1e-15);
  const std::vector<double> t2 =
      ref_ec::calibrate(c.params(), {1.0, 1.0}, 0.9, c.W.data(), c.x.data(), c.T, nullptr);
  EXPECT_NEAR(t2[0], 0.9 + 0.1 * sg(1.0), 1e-15);
}

// ------------------------------------------------------------------------ batch mode

TEST(ExpertChoiceBatch, MatchesReferenceRandom) {
  run_random(0xEC0001, 300, Knobs{}, [](const Case& c, Rng&) { return check_batch(c); });
}

TEST(ExpertChoiceBatch, MatchesReferenceWithCapAndLargeT) {
  Knobs kn;
  kn.p_cap = 1.0;
  kn.min_T = 100;
  kn.max_T = 400;
  kn.max_E = 64;
  run_random(0xEC0002, 25, kn, [](const Case& c, Rng&) { return check_batch(c); });
}

TEST(ExpertChoiceBatch, EmptyBatchAllModes) {
  Rng rng(1);
  for (ExpertChoiceMode m :
       {ExpertChoiceMode::batch, ExpertChoiceMode::threshold, ExpertChoiceMode::predictor}) {
    Case c;
    c.opt.num_experts = 6;
    c.opt.hidden = 5;
    c.opt.mode = m;
    c.W = rng.vec(30, 1.0);
    c.pred = random_predictor(rng, c.opt.aux_hidden, 5, 6);
    ExpertChoiceRouter r(c.opt, c.W, c.pred, std::vector<float>(6, 0.1f));
    EXPECT_EQ(r.capacity(c.batch()), 0);
    const RoutingPlan plan = route(r, c);
    EXPECT_TRUE(plan.finalized());
    EXPECT_EQ(plan.num_tokens(), 0);
    EXPECT_EQ(plan.num_slots(), 0);
    EXPECT_EQ(moekit::expert_choice_output_width(plan), 0);
    std::vector<int32_t> ids;
    std::vector<float> w;
    moekit::expert_choice_outputs(plan, 0, ids, w);
    // All tokens padded counts as T = 0 too: kc = 0, no slots, calibration is a no-op.
    Case p = c;
    p.T = 3;
    p.x = rng.vec(15, 1.0);
    p.pad = {1, 1, 1};
    EXPECT_EQ(r.capacity(p.batch()), 0);
    const RoutingPlan pp = route(r, p);
    EXPECT_EQ(pp.num_slots(), 0);
    const std::vector<float> before = r.thresholds();
    r.calibrate(p.batch(), p.x.data());
    r.calibrate(c.batch(), nullptr);
    EXPECT_EQ(r.thresholds(), before);
    EXPECT_EQ(r.calibrated_batches(), 0);
  }
}

TEST(ExpertChoiceBatch, CapacityFormula) {
  ExpertChoiceOptions o;
  o.num_experts = 8;
  o.hidden = 4;
  struct Row {
    int64_t T;
    double c;
    int64_t E, kc;
  };
  for (const Row& r : {Row{0, 2.0, 8, 0}, Row{1, 2.0, 8, 1}, Row{3, 2.0, 64, 1}, Row{16, 2.0, 8, 4},
                       Row{17, 2.0, 8, 4}, Row{100, 1.25, 8, 15}, Row{7, 8.0, 8, 7},
                       Row{7, 1e300, 8, 7}, Row{2048, 8.0, 64, 256}, Row{5, 0.01, 3, 1}}) {
    o.num_experts = r.E;
    o.capacity_factor = r.c;
    EXPECT_EQ(o.capacity(r.T), r.kc) << "T=" << r.T << " c=" << r.c << " E=" << r.E;
    EXPECT_EQ(ref_ec::capacity(r.T, r.c, r.E), r.kc);
  }
}

TEST(ExpertChoiceBatch, CapacityFactorEqualsEPicksEveryToken) {
  // c = E: kc = T, every expert takes every unpadded token; each token has E slots.
  Rng rng(2);
  for (int i = 0; i < 30; ++i) {
    Knobs kn;
    kn.p_cap = 0.0;
    kn.min_T = 1;
    kn.max_T = 40;
    Case c = random_case(rng, kn);
    c.opt.capacity_factor = double(c.opt.num_experts);
    const ExpertChoiceRouter r = c.router();
    EXPECT_EQ(r.capacity(c.batch()), c.routed());
    const RoutingPlan plan = route(r, c);
    for (int64_t t = 0; t < c.T; ++t) {
      const bool padded = !c.pad.empty() && c.pad[static_cast<size_t>(t)];
      const TokenSlots s = slots_of(plan, t);
      ASSERT_EQ(static_cast<int64_t>(s.experts.size()), padded ? 0 : c.opt.num_experts);
      double sum = 0;
      for (float w : s.weights) sum += w;
      if (!padded) {
        EXPECT_NEAR(sum, 1.0, 1e-5) << "all of a token's softmax scores";
      }
    }
    for (int64_t e = 0; e < c.opt.num_experts; ++e) EXPECT_EQ(plan.kept_of(e), c.routed());
    check_batch(c);
  }
}

TEST(ExpertChoiceBatch, PerTokenCapDropsLowestPicksWithoutRefill) {
  // E = 3, c = 3 (kc = T = 3): every expert picks every token; cap 1 keeps each token's best.
  const Case c = exact_case(3, {{3, 1, 0}, {0, 2, 1}, {0, 1, 4}}, 3.0, 1);
  const ExpertChoiceRouter r = c.router();
  const RoutingPlan plan = route(r, c);
  const int32_t best[3] = {0, 1, 2};
  for (int64_t t = 0; t < 3; ++t) {
    const TokenSlots s = slots_of(plan, t);
    ASSERT_EQ(s.experts.size(), 3u);
    EXPECT_EQ(s.experts[0], best[t]);
    EXPECT_EQ(s.dropped, (std::vector<uint8_t>{0, 1, 1}));
    EXPECT_EQ(s.weights[1], 0.0f);
    EXPECT_EQ(s.weights[2], 0.0f);
  }
  for (int64_t e = 0; e < 3; ++e) {
    EXPECT_EQ(plan.kept_of(e), 1) << "no refill: the expert keeps only its surviving pick";
    EXPECT_EQ(plan.dropped_of(e), 2);
  }
  EXPECT_EQ(plan.num_dropped(), 6);
  check_batch(c, false);
  // Cap 2 on a case where expert 0's slot is lost and its next-best token is not taken instead.
  // E = 2, c = 1, T = 4: kc = 2.
  const Case d = exact_case(2, {{5, 4}, {4, 3}, {0, 2}, {0, -1}}, 1.0, 1);
  // S[:, 0] = s(1), s(1), s(-2), s(1): ties at s(1) -> expert 0 picks tokens 0, 1.
  // S[:, 1] = s(-1), s(-1), s(2), s(-1): expert 1 picks 2, then tie -> token 0.
  // Token 0 has both; cap 1 drops expert 1 (lower score). Expert 1 is not refilled with token 1.
  const RoutingPlan pd = route(d.router(), d);
  EXPECT_EQ(kept_tokens(pd, 0), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(kept_tokens(pd, 1), (std::vector<int32_t>{2}));
  EXPECT_EQ(slots_of(pd, 0).experts, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(slots_of(pd, 0).dropped, (std::vector<uint8_t>{0, 1}));
  EXPECT_EQ(slots_of(pd, 3).experts.size(), 0u);
  check_batch(d, false);
}

TEST(ExpertChoiceBatch, PaddingNeverPickedNorCounted) {
  // The padded batch routes its unpadded tokens exactly like the batch without the padded rows.
  Rng rng(3);
  for (int i = 0; i < 40; ++i) {
    Knobs kn;
    kn.p_padding = 0.0;
    kn.min_T = 1;
    kn.max_T = 50;
    const Case base = random_case(rng, kn);
    const int64_t d = base.opt.hidden;
    Case padded = base;
    padded.x.clear();
    padded.pad.clear();
    std::vector<int64_t> where;  // row of each base token in the padded batch
    for (int64_t t = 0; t < base.T; ++t) {
      while (rng.coin(0.4)) {  // padded rows: huge values that would win every pick
        for (int64_t j = 0; j < d; ++j)
          padded.x.push_back(static_cast<float>(rng.uniform(50, 100)));
        padded.pad.push_back(1);
      }
      where.push_back(static_cast<int64_t>(padded.pad.size()));
      padded.x.insert(padded.x.end(), base.x.begin() + t * d, base.x.begin() + (t + 1) * d);
      padded.pad.push_back(0);
    }
    padded.x.insert(padded.x.end(), static_cast<size_t>(d),
                    std::numeric_limits<float>::quiet_NaN());
    padded.pad.push_back(1);  // a NaN row, padded: never read
    padded.T = static_cast<int64_t>(padded.pad.size());
    ExpertChoiceRouter r = base.router();
    ASSERT_EQ(r.capacity(padded.batch()), r.capacity(base.batch()));
    const RoutingPlan pb = route(r, base), pp = route(r, padded);
    for (int64_t t = 0; t < base.T; ++t)
      EXPECT_TRUE(slots_of(pb, t) == slots_of(pp, where[static_cast<size_t>(t)]));
    for (int64_t t = 0; t < padded.T; ++t)
      if (padded.pad[static_cast<size_t>(t)]) {
        EXPECT_EQ(slots_of(pp, t).experts.size(), 0u);
      }
    EXPECT_EQ(pb.num_kept(), pp.num_kept());
    // Calibration statistics ignore the padding too.
    ExpertChoiceRouter r2 = base.router();
    r.calibrate(base.batch(), base.x.data());
    r2.calibrate(padded.batch(), padded.x.data());
    EXPECT_EQ(r.thresholds(), r2.thresholds());
    check_batch(padded);
  }
}

TEST(ExpertChoiceBatch, TiesGoToLowerTokenAndLowerExpert) {
  // Zero gate weight: S = 1/E everywhere. Expert e picks tokens 0..kc-1; a token's slots
  // list its experts ascending; a cap keeps the lowest expert ids.
  for (int64_t E : {1, 3, 8, 16}) {
    for (int64_t cap : {int64_t{0}, int64_t{1}, (E + 1) / 2}) {
      Case c;
      c.opt.num_experts = E;
      c.opt.hidden = 7;
      c.opt.capacity_factor = 2.0;
      c.opt.max_experts_per_token = cap;
      c.W.assign(static_cast<size_t>(E * 7), 0.0f);
      c.T = 24;
      c.x = Rng(static_cast<uint64_t>(E * 10 + cap)).vec(24 * 7, 1.0);
      const RoutingPlan plan = route(c.router(), c);
      const int64_t kc = c.opt.capacity(24);
      SCOPED_TRACE("E=" + std::to_string(E) + " cap=" + std::to_string(cap));
      for (int64_t t = 0; t < 24; ++t) {
        const TokenSlots s = slots_of(plan, t);
        ASSERT_EQ(static_cast<int64_t>(s.experts.size()), t < kc ? E : 0);
        for (int64_t j = 0; j < static_cast<int64_t>(s.experts.size()); ++j) {
          EXPECT_EQ(s.experts[static_cast<size_t>(j)], j);
          EXPECT_EQ(s.dropped[static_cast<size_t>(j)], cap > 0 && j >= cap);
        }
      }
      check_batch(c, false);
    }
  }
  // E = 1: S = 1 for every token whatever the weights; the expert takes the first kc tokens.
  for (double cf : {0.3, 1.0, 2.5}) {
    Case c;
    c.opt.num_experts = 1;
    c.opt.hidden = 5;
    c.opt.capacity_factor = cf;
    c.W = Rng(5).vec(5, 2.0);
    c.T = 10;
    c.x = Rng(6).vec(50, 1.0);
    c.pad = {0, 1, 0, 0, 1, 0, 0, 0, 0, 0};
    const RoutingPlan plan = route(c.router(), c);
    const int64_t kc = c.opt.capacity(8);
    std::vector<int32_t> want;
    for (int32_t t = 0; t < 10 && static_cast<int64_t>(want.size()) < kc; ++t)
      if (!c.pad[static_cast<size_t>(t)]) want.push_back(t);
    EXPECT_EQ(kept_tokens(plan, 0), want) << "c=" << cf;
    for (float w : plan.slot_weight()) EXPECT_EQ(w, 1.0f);
    check_batch(c, false);
  }
  // Duplicate token rows: equal scores bit for bit; the lower token index wins.
  const Case d = exact_case(2, {{1, 0}, {2, 0}, {2, 0}, {0, 1}, {2, 0}}, 0.8);  // kc = floor(2) = 2
  const RoutingPlan pd = route(d.router(), d);
  EXPECT_EQ(kept_tokens(pd, 0), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(kept_tokens(pd, 1), (std::vector<int32_t>{0, 3}));
  check_batch(d, false);
}

TEST(ExpertChoiceBatch, LargeLogitsStayFinite) {
  const Case c =
      exact_case(4, {{1e4f, 1e4f - 1, -1e4f, 0}, {-1e4f, 0, 1e4f, 1e4f}, {0, 0, 0, 0}}, 2.0);
  const RoutingPlan plan = route(c.router(), c);
  for (float w : plan.slot_weight()) EXPECT_TRUE(std::isfinite(w));
  check_batch(c, false);
}

// ------------------------------------------------------------------------ threshold mode

TEST(ExpertChoiceThreshold, EmaMatchesIndependentComputationOverThreeBatches) {
  Rng rng(4);
  for (int trial = 0; trial < 8; ++trial) {
    Knobs kn;
    kn.min_T = 1;
    kn.max_T = 120;
    const Case first = random_case(rng, kn);
    ExpertChoiceOptions o = first.opt;
    o.decay = trial == 0 ? 0.99 : rng.uniform(0.0, 1.0);
    ExpertChoiceRouter r(o, first.W);
    EXPECT_TRUE(r.thresholds().empty());
    std::vector<double> want;
    for (int b = 0; b < 3; ++b) {
      Case c = first;
      if (b > 0) {  // other tokens and padding, same router
        c.T = rng.integer(1, 120);
        c.x = rng.vec(static_cast<size_t>(c.T * o.hidden), 1.0);
        c.pad.clear();
        if (rng.coin(0.5)) {
          c.pad.assign(static_cast<size_t>(c.T), 0);
          for (uint8_t& p : c.pad) p = rng.coin(0.3);
        }
      }
      r.calibrate(c.batch(), c.x.data(), trial % 2 ? 2 : 1);
      want = ref_ec::calibrate(c.params(), want, o.decay, c.W.data(), c.x.data(), c.T, c.pad_ptr());
      SCOPED_TRACE("trial " + std::to_string(trial) + " batch " + std::to_string(b));
      if (want.empty()) {
        EXPECT_TRUE(r.thresholds().empty());
        continue;
      }
      ASSERT_EQ(r.thresholds().size(), want.size());
      double mx = 0;
      for (size_t e = 0; e < want.size(); ++e) {
        EXPECT_NEAR(r.thresholds()[e], want[e], 1e-5 * std::fabs(want[e]) + 1e-7) << "expert " << e;
        mx = std::max(mx, std::fabs(want[e]));
      }
      EXPECT_GT(mx, 0.0);
    }
  }
  // decay 0.99 by default; hand check on exact logits: first batch sets, second blends.
  const Case c = exact_case(2, {{2, 0}, {0, 0}, {1, 0}, {0, 3}}, 1.0);
  ExpertChoiceRouter r = c.router();
  EXPECT_EQ(r.options().decay, 0.99);
  r.calibrate(c.batch(), c.x.data());
  auto sg = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  EXPECT_NEAR(r.thresholds()[0], sg(1.0), 1e-7);
  EXPECT_NEAR(r.thresholds()[1], 0.5, 1e-7);
  r.calibrate(c.batch(), c.x.data());
  EXPECT_NEAR(r.thresholds()[0], sg(1.0), 1e-7);
  EXPECT_EQ(r.calibrated_batches(), 2);
  r.set_thresholds({1.0f, 0.0f});
  EXPECT_EQ(r.calibrated_batches(), 0);
  r.calibrate(c.batch(), c.x.data());  // set thresholds are blended, not replaced
  EXPECT_NEAR(r.thresholds()[0], 0.99 + 0.01 * sg(1.0), 1e-7);
  EXPECT_NEAR(r.thresholds()[1], 0.01 * 0.5, 1e-7);
  r.reset_thresholds();
  EXPECT_TRUE(r.thresholds().empty());
}

Report check_threshold(Case c, Rng& rng) {
  c.opt.mode = ExpertChoiceMode::threshold;
  std::vector<float> tau(static_cast<size_t>(c.opt.num_experts));
  for (float& t : tau) t = static_cast<float>(rng.uniform(0.0, 1.2 / double(c.opt.num_experts)));
  if (rng.coin(0.5)) {
    // Calibrated thresholds from another batch of the same distribution.
    ExpertChoiceRouter cal(c.opt, c.W, c.pred, {});
    const int64_t T2 = rng.integer(1, 60);
    const std::vector<float> x2 = rng.vec(static_cast<size_t>(T2 * c.opt.hidden), 1.0);
    cal.calibrate(Batch::single(T2, c.opt.hidden), x2.data());
    tau = cal.thresholds();
  }
  const ExpertChoiceRouter router(c.opt, c.W, c.pred, tau);
  const std::vector<double> tau_d(tau.begin(), tau.end());
  const ref_ec::Routing want =
      ref_ec::route_threshold(c.params(), c.W.data(), c.x.data(), c.T, c.pad_ptr(), tau_d);
  return check_route(c, router, want);
}

TEST(ExpertChoiceThreshold, MatchesReferenceRandom) {
  run_random(0xEC0003, 250, Knobs{}, check_threshold);
}

Report check_predictor(Case c, Rng&) {
  c.opt.mode = ExpertChoiceMode::predictor;
  const ExpertChoiceRouter router = c.router();
  const ref_ec::Routing want =
      ref_ec::route_predictor(c.params(), c.W.data(), c.x.data(), c.T, c.pad_ptr(), c.ref_pred());
  return check_route(c, router, want);
}

TEST(ExpertChoicePredictor, MatchesReferenceRandom) {
  run_random(0xEC0004, 250, Knobs{}, check_predictor);
}

TEST(ExpertChoicePredictor, HandComputed) {
  // d = 2, H = 2, E = 3: h = relu([x0 - x1, x1]); z = [h0 - 0.5, h1 - 0.5, -h0 - h1].
  ExpertChoiceOptions o;
  o.num_experts = 3;
  o.hidden = 2;
  o.aux_hidden = 2;
  o.mode = ExpertChoiceMode::predictor;
  ExpertChoicePredictor p{{1, -1, 0, 1}, {0, 0}, {1, 0, 0, 1, -1, -1}, {-0.5f, -0.5f, 0}};
  const std::vector<float> W = {1, 0, 0, 1, 0, 0};
  ExpertChoiceRouter r(o, W, p);
  const std::vector<float> x = {2, 1, 0, 3, 0.25f, 0.25f, -1, -1};  // 4 tokens
  RoutingPlan plan;
  RouterScratch s;
  r.route(Batch::single(4, 2), x.data(), plan, s, 1);
  // t0: h = (1, 1) -> z = (.5, .5, -2): experts 0, 1; S = softmax(2, 1, 0).
  EXPECT_EQ(slots_of(plan, 0).experts, (std::vector<int32_t>{0, 1}));
  const double z0 = std::exp(2.0) + std::exp(1.0) + 1.0;
  EXPECT_NEAR(slots_of(plan, 0).weights[0], std::exp(2.0) / z0, 1e-6);
  // t1: h = (0, 3) -> z = (-.5, 2.5, -3): expert 1.
  EXPECT_EQ(slots_of(plan, 1).experts, (std::vector<int32_t>{1}));
  // t2: h = (0, .25): nothing.  t3: h = (0, 0): nothing (z = 0 is not > 0).
  EXPECT_TRUE(slots_of(plan, 2).experts.empty());
  EXPECT_TRUE(slots_of(plan, 3).experts.empty());
}

// Causality: the plan of a single token equals that token's plan inside any batch.
template <class Make>
void check_causal(uint64_t seed, Make&& make_router) {
  Rng rng(seed);
  int64_t routed_slots = 0, tokens = 0;
  for (int i = 0; i < 25; ++i) {
    Knobs kn;
    kn.min_T = 1;
    kn.max_T = 40;
    const Case c = random_case(rng, kn);
    const ExpertChoiceRouter r = make_router(c, rng);
    SCOPED_TRACE(describe(c));
    const RoutingPlan whole = route(r, c, 2);
    for (int64_t t = 0; t < c.T; ++t) {
      if (!c.pad.empty() && c.pad[static_cast<size_t>(t)]) continue;
      Case one = c;
      one.T = 1;
      one.pad.clear();
      one.x.assign(c.x.begin() + t * c.opt.hidden, c.x.begin() + (t + 1) * c.opt.hidden);
      const RoutingPlan single = route(r, one, 1);
      ASSERT_EQ(single.num_tokens(), 1);
      EXPECT_TRUE(slots_of(single, 0) == slots_of(whole, t)) << "token " << t;
      routed_slots += single.num_kept();
      ++tokens;
    }
  }
  EXPECT_GT(routed_slots, 0) << "vacuous: no token was routed anywhere";
  EXPECT_LT(routed_slots, tokens * 32) << "vacuous: every token went everywhere";
}

TEST(ExpertChoiceThreshold, SingleTokenPlansEqualBatchPlans) {
  check_causal(0xEC0005, [](const Case& c, Rng& rng) {
    ExpertChoiceOptions o = c.opt;
    o.mode = ExpertChoiceMode::threshold;
    ExpertChoiceRouter r(o, c.W);
    const std::vector<float> x2 = rng.vec(static_cast<size_t>(50 * o.hidden), 1.0);
    r.calibrate(Batch::single(50, o.hidden), x2.data());
    return r;
  });
}

TEST(ExpertChoicePredictor, SingleTokenPlansEqualBatchPlans) {
  check_causal(0xEC0006, [](const Case& c, Rng&) {
    ExpertChoiceOptions o = c.opt;
    o.mode = ExpertChoiceMode::predictor;
    return ExpertChoiceRouter(o, c.W, c.pred);
  });
}

// ------------------------------------------------------------------------ outputs helper

TEST(ExpertChoiceOutputs, ExpertTokenIdsAndWeightsInPickOrder) {
  // E = 2, c = 1, T = 4 (kc = 2): see ExpertChoiceReference.HandComputed.
  const Case c = exact_case(2, {{2, 0}, {0, 0}, {1, 0}, {0, 3}}, 1.0);
  const RoutingPlan plan = route(c.router(), c);
  const int64_t kc = c.router().capacity(c.batch());
  ASSERT_EQ(kc, 2);
  std::vector<int32_t> ids(4);
  std::vector<float> w(4);
  moekit::expert_choice_outputs(plan, kc, ids, w);
  auto sg = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 2, 3, 1}));  // pick order: descending score
  EXPECT_NEAR(w[0], sg(2), 1e-6);
  EXPECT_NEAR(w[1], sg(1), 1e-6);
  EXPECT_NEAR(w[2], sg(3), 1e-6);
  EXPECT_NEAR(w[3], 0.5, 1e-6);
  // Wider than needed: unused entries -1 / 0.
  ids.assign(6, 7);
  w.assign(6, 7.0f);
  moekit::expert_choice_outputs(plan, 3, ids, w);
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 2, -1, 3, 1, -1}));
  EXPECT_EQ(w[2], 0.0f);
  EXPECT_EQ(w[5], 0.0f);
  // With a cap, dropped picks are not listed and the row ends in -1.
  const Case d = exact_case(2, {{5, 4}, {4, 3}, {0, 2}, {0, -1}}, 1.0, 1);
  const RoutingPlan pd = route(d.router(), d);
  ids.assign(4, 7);
  w.assign(4, 7.0f);
  moekit::expert_choice_outputs(pd, 2, ids, w);
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 1, 2, -1}));
  EXPECT_EQ(w[3], 0.0f);
  // Errors: too narrow, wrong sizes, plan not finalised.
  expect_error(
      [&] {
        moekit::expert_choice_outputs(plan, 1, std::span<int32_t>(ids.data(), 2),
                                      std::span<float>(w.data(), 2));
      },
      "width (kc) expected >= 2");
  expect_error(
      [&] {
        moekit::expert_choice_outputs(plan, 2, std::span<int32_t>(ids.data(), 3),
                                      std::span<float>(w.data(), 4));
      },
      "expert_token_ids expected [2, 2]");
  expect_error(
      [&] {
        moekit::expert_choice_outputs(plan, 2, std::span<int32_t>(ids.data(), 4),
                                      std::span<float>(w.data(), 3));
      },
      "expert_token_weights expected [2, 2]");
  RoutingPlan raw;
  raw.reset(1, 2, [](int64_t) { return 1; });
  expect_error([&] { moekit::expert_choice_output_width(raw); }, "finalized");
}

// ------------------------------------------------------------------------ layer

TEST(ExpertChoiceLayer, SparseLayerMatchesReference) {
  Rng rng(7);
  int64_t checked = 0;
  for (int i = 0; i < 12; ++i) {
    Knobs kn;
    kn.min_T = 1;
    kn.max_T = 150;
    kn.max_E = 12;
    Case c = random_case(rng, kn);
    c.opt.mode = static_cast<ExpertChoiceMode>(i % 3);
    const int64_t E = c.opt.num_experts, d = c.opt.hidden, f = rng.integer(1, 40);
    std::vector<float> tau;
    if (c.opt.mode == ExpertChoiceMode::threshold) {
      ExpertChoiceRouter cal(c.opt, c.W, c.pred);
      cal.calibrate(c.batch(), c.x.data());
      tau = cal.thresholds();
      if (tau.empty()) tau.assign(static_cast<size_t>(E), 0.5f / float(E));
    }
    std::vector<ref_ec::Ffn> experts;
    moekit::FfnBank bank(E, moekit::FfnShape{d, f, true, moekit::Activation::silu});
    for (int64_t e = 0; e < E; ++e) {
      ref_ec::Ffn x{d, f, rng.vec(static_cast<size_t>(f * d), std::sqrt(3.0 / d)),
                    rng.vec(static_cast<size_t>(f * d), std::sqrt(3.0 / d)),
                    rng.vec(static_cast<size_t>(d * f), std::sqrt(3.0 / f))};
      bank.set_expert(e, x.gate.data(), x.up.data(), x.down.data());
      experts.push_back(std::move(x));
    }
    const moekit::SparseLayer<ExpertChoiceRouter, moekit::FfnBank> layer(
        ExpertChoiceRouter(c.opt, c.W, c.pred, tau), std::move(bank));
    SCOPED_TRACE(describe(c));
    moekit::Workspace ws;
    std::vector<float> out(static_cast<size_t>(c.T * d), 7.0f), out2(out.size(), 9.0f);
    layer.forward(c.batch(), c.x.data(), out.data(), ws, 1);
    EXPECT_TRUE(invariant_errors(ws.plan, c.pad_ptr()).empty());
    // Reference output on the library's decisions, with reference weights S[t, e].
    const std::vector<double> S =
        ref_ec::scores(c.params(), c.W.data(), c.x.data(), c.T, c.pad_ptr());
    std::vector<std::vector<ref_ec::Contribution>> contrib(static_cast<size_t>(c.T));
    for (int64_t t = 0; t < c.T; ++t) {
      const TokenSlots s = slots_of(ws.plan, t);
      for (size_t j = 0; j < s.experts.size(); ++j)
        if (!s.dropped[j])
          contrib[static_cast<size_t>(t)].push_back(
              {s.experts[j], S[static_cast<size_t>(t * E + s.experts[j])]});
    }
    const std::vector<double> y = ref_ec::moe_forward(contrib, experts, c.x.data(), c.T, d);
    double mx = 0;
    for (double v : y) mx = std::max(mx, std::fabs(v));
    if (ws.plan.num_kept() > 0) {
      EXPECT_GT(mx, 0.0) << "vacuous: reference output all zero";
    }
    for (size_t i = 0; i < y.size(); ++i)
      ASSERT_NEAR(out[i], y[i], 1e-4 * std::fabs(y[i]) + 1e-5 * mx + 1e-30) << "output " << i;
    for (int64_t t = 0; t < c.T; ++t) {
      if (c.pad.empty() || !c.pad[static_cast<size_t>(t)]) continue;
      for (int64_t j = 0; j < d; ++j) EXPECT_EQ(out[static_cast<size_t>(t * d + j)], 0.0f);
    }
    // Two threads: the same bits.
    moekit::Workspace ws2;
    layer.forward(c.batch(), c.x.data(), out2.data(), ws2, 2);
    EXPECT_EQ(std::memcmp(out.data(), out2.data(), out.size() * sizeof(float)), 0)
        << "threads 1 vs 2";
    checked += ws.plan.num_kept() > 0;
  }
  EXPECT_GT(checked, 6);
}

// ------------------------------------------------------------------------ threads

TEST(ExpertChoiceThreads, LargeBatchesIdenticalAcrossThreadCounts) {
  // Large enough for every parallel loop (per-token and per-expert) to run in parallel.
  Rng rng(8);
  for (ExpertChoiceMode m :
       {ExpertChoiceMode::batch, ExpertChoiceMode::threshold, ExpertChoiceMode::predictor}) {
    Knobs kn;
    kn.min_T = 600;
    kn.max_T = 700;
    Case c = random_case(rng, kn);
    c.opt.num_experts = 24;
    c.opt.hidden = 40;
    c.opt.max_experts_per_token = m == ExpertChoiceMode::batch ? 3 : 0;
    c.W = rng.vec(24 * 40, 0.5);
    c.x = rng.vec(static_cast<size_t>(c.T * 40), 1.0);
    c.pred = random_predictor(rng, c.opt.aux_hidden, 40, 24);
    c.opt.mode = m;
    std::vector<float> tau[3];
    RoutingPlan plans[3];
    for (int th = 1; th <= 3; ++th) {
      ExpertChoiceRouter r(c.opt, c.W, c.pred, std::vector<float>(24, 0.05f));
      r.calibrate(c.batch(), c.x.data(), th);
      tau[th - 1] = r.thresholds();
      plans[th - 1] = route(r, c, th);
    }
    EXPECT_GT(plans[0].num_kept(), 0);
    for (int th = 1; th < 3; ++th) {
      EXPECT_EQ(tau[th], tau[0]) << "calibration, threads " << th + 1;
      for (int64_t t = 0; t < c.T; ++t)
        ASSERT_TRUE(slots_of(plans[th], t) == slots_of(plans[0], t))
            << "mode " << static_cast<int>(m) << " threads " << th + 1 << " token " << t;
    }
  }
}

// ------------------------------------------------------------------------ errors

TEST(ExpertChoiceErrors, InvalidOptionsAndInputs) {
  ExpertChoiceOptions o;
  o.num_experts = 4;
  o.hidden = 3;
  const std::vector<float> W(12, 0.1f);
  auto with = [&](auto mutate) {
    ExpertChoiceOptions b = o;
    mutate(b);
    return b;
  };
  expect_error([&] { ExpertChoiceRouter(with([](auto& b) { b.num_experts = 0; }), W); },
               "num_experts (E) expected >= 1, got 0");
  expect_error([&] { ExpertChoiceRouter(with([](auto& b) { b.hidden = 0; }), W); },
               "hidden size (d) expected >= 1, got 0");
  expect_error([&] { ExpertChoiceRouter(with([](auto& b) { b.capacity_factor = 0; }), W); },
               "capacity_factor expected finite and > 0, got 0");
  expect_error([&] { ExpertChoiceRouter(with([](auto& b) { b.capacity_factor = NAN; }), W); },
               "capacity_factor");
  expect_error([&] { ExpertChoiceRouter(with([](auto& b) { b.max_experts_per_token = 5; }), W); },
               "max_experts_per_token expected in [0, E = 4] (0 = no cap), got 5");
  expect_error([&] { ExpertChoiceRouter(with([](auto& b) { b.max_experts_per_token = -1; }), W); },
               "max_experts_per_token");
  expect_error([&] { ExpertChoiceRouter(with([](auto& b) { b.decay = 1.5; }), W); },
               "decay expected in [0, 1], got 1.5");
  expect_error([&] { ExpertChoiceRouter(with([](auto& b) { b.aux_hidden = 0; }), W); },
               "aux_hidden expected >= 1, got 0");
  expect_error([&] { ExpertChoiceRouter(o, std::vector<float>(11)); },
               "gate.weight expected [4, 3] = 12 values, got 11");
  std::vector<float> Wn = W;
  Wn[7] = INFINITY;
  expect_error([&] { ExpertChoiceRouter(o, Wn); }, "gate.weight[2, 1] expected finite, got inf");
  expect_error(
      [&] { ExpertChoiceRouter(with([](auto& b) { b.mode = ExpertChoiceMode::predictor; }), W); },
      "mode predictor needs router.aux");
  Rng rng(9);
  ExpertChoicePredictor p = random_predictor(rng, 64, 3, 4);
  p.weight2.pop_back();
  expect_error([&] { ExpertChoiceRouter(o, W, p); },
               "router.aux.2.weight expected [4, 64] = 256 values, got 255");
  p = random_predictor(rng, 64, 3, 4);
  p.bias0[3] = NAN;
  expect_error([&] { ExpertChoiceRouter(o, W, p); }, "router.aux.0.bias[3] expected finite");
  expect_error(
      [&] {
        ExpertChoiceRouter(o, W, {}, {0.1f, 0.2f});
      },
      "router.thresholds expected [4], got 2 values");
  expect_error(
      [&] {
        ExpertChoiceRouter(o, W, {}, {0.1f, 0.2f, NAN, 0.0f});
      },
      "router.thresholds[2] expected finite");
  expect_error([] { moekit::parse_expert_choice_mode("greedy"); },
               "mode expected one of batch, threshold, predictor; got \"greedy\"");
  EXPECT_EQ(moekit::parse_expert_choice_mode("threshold"), ExpertChoiceMode::threshold);

  // Routing inputs.
  ExpertChoiceRouter r(o, W);
  RoutingPlan plan;
  RouterScratch s;
  std::vector<float> x(6, 0.5f);
  x[4] = NAN;
  expect_error([&] { r.route(Batch::single(2, 3), x.data(), plan, s, 1); },
               "logit of token 1, expert 0 expected finite");
  expect_error([&] { r.calibrate(Batch::single(2, 3), x.data()); }, "logit of token 1");
  expect_error([&] { r.route(Batch::single(2, 4), x.data(), plan, s, 1); },
               "Batch.hidden (d): expected 3");
  expect_error([&] { r.route(Batch::single(2, 3), nullptr, plan, s, 1); },
               "hidden states pointer is null for T = 2");
  r.set_mode(ExpertChoiceMode::threshold);
  x[4] = 0.0f;
  expect_error([&] { r.route(Batch::single(2, 3), x.data(), plan, s, 1); },
               "mode threshold needs router.thresholds [4], got none");
  expect_error([&] { r.set_mode(ExpertChoiceMode::predictor); }, "mode predictor needs router.aux");
  r.calibrate(Batch::single(2, 3), x.data());
  r.route(Batch::single(2, 3), x.data(), plan, s, 1);  // now fine
  EXPECT_TRUE(plan.finalized());
}

}  // namespace
