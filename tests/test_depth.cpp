// SPDX-License-Identifier: Apache-2.0
// Depth / skip routers (ROUTING.md section 5: MoD, gamma-MoD + ARank, token-wise pruning) and
// the wrapped blocks (blocks.hpp) against the double-precision reference in
// tests/reference/depth_ref: random shapes with fixed seeds, several sequences, padding,
// capacity edge cases, threshold modes, layers with the FFN and the attention block, thread
// determinism and argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/blocks.hpp"
#include "moekit/tools/arank.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/depth.hpp"
#include "moekit/layers/mor.hpp"
#include "moekit/routing_plan.hpp"
#include "reference/depth_ref.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Batch;
using moekit::CausalAttentionBlock;
using moekit::DepthActivation;
using moekit::FfnBlock;
using moekit::FunctorBank;
using moekit::GammaModOptions;
using moekit::GammaModPhase;
using moekit::GammaModRouter;
using moekit::MoDMode;
using moekit::MoDOptions;
using moekit::MoDRouter;
using moekit::RouterScratch;
using moekit::RoutingPlan;
using moekit::TokenPruneOptions;
using moekit::TokenPruneRouter;

// ------------------------------------------------------------------------ helpers

using test_support::Rng;

// A batch layout with hidden states; owns the arrays the Batch views.
struct Case {
  depth_ref::Layout L;
  std::vector<float> x;
  Batch batch() const {
    Batch b = Batch::single(L.tokens, L.hidden);
    b.sequence_offsets = L.offsets;
    b.positions = L.positions;
    b.padding = L.padding;
    b.token_types = L.token_types;
    return b;
  }
};

// Random T, d, sequences (some empty), explicit positions sometimes, padding sometimes,
// token types sometimes.
Case random_case(Rng& rng, int64_t max_T = 90, int64_t max_d = 40) {
  Case c;
  c.L.tokens = rng.integer(1, max_T);
  c.L.hidden = rng.integer(1, max_d);
  const int64_t T = c.L.tokens;
  if (rng.coin(0.7)) {
    const int64_t S = rng.integer(1, 6);
    std::vector<int32_t> cuts{0, static_cast<int32_t>(T)};
    for (int64_t s = 1; s < S; ++s) cuts.push_back(static_cast<int32_t>(rng.integer(0, T)));
    std::sort(cuts.begin(), cuts.end());
    c.L.offsets = cuts;
  }
  if (rng.coin(0.3)) {  // positions continue a cache: offset + gaps kept ascending
    c.L.positions.resize(T);
    for (int64_t s = 0; s < c.L.num_sequences(); ++s) {
      int32_t p = static_cast<int32_t>(rng.integer(0, 20));
      for (int64_t t = c.L.begin(s); t < c.L.end(s); ++t) {
        c.L.positions[t] = p;
        p += static_cast<int32_t>(rng.integer(1, 2));
      }
    }
  }
  if (rng.coin(0.4)) {
    c.L.padding.assign(T, 0);
    const double rate = rng.uniform(0.05, 0.5);
    for (uint8_t& p : c.L.padding) p = rng.coin(rate);
  }
  if (rng.coin(0.5)) {
    c.L.token_types.assign(T, 0);
    const double rate = rng.uniform(0.0, 0.6);
    for (int32_t& v : c.L.token_types)
      v = rng.coin(rate) ? static_cast<int32_t>(rng.integer(1, 3)) : 0;
  }
  c.x = rng.vec(static_cast<size_t>(T * c.L.hidden), 1.0);
  return c;
}

std::vector<float> router_weight(Rng& rng, int64_t rows, int64_t d, double logit_std) {
  return rng.vec(static_cast<size_t>(rows * d),
                 logit_std * std::sqrt(3.0 / static_cast<double>(d)));
}

depth_ref::Act to_ref(DepthActivation a) {
  return a == DepthActivation::raw       ? depth_ref::Act::raw
         : a == DepthActivation::sigmoid ? depth_ref::Act::sigmoid
                                         : depth_ref::Act::tanh;
}
depth_ref::ModParams to_ref(const MoDOptions& o) {
  depth_ref::ModParams p;
  p.ratio = o.ratio;
  p.act = to_ref(o.activation);
  p.alpha = o.alpha;
  p.mode = o.mode == MoDMode::capacity    ? depth_ref::ModMode::capacity
           : o.mode == MoDMode::threshold ? depth_ref::ModMode::threshold
                                          : depth_ref::ModMode::aux_predictor;
  p.threshold = o.threshold;
  return p;
}
depth_ref::GammaParams to_ref(const GammaModOptions& o) {
  depth_ref::GammaParams p;
  p.ratio = o.ratio;
  p.phase = o.phase == GammaModPhase::capacity  ? depth_ref::GammaPhase::capacity
            : o.phase == GammaModPhase::prefill ? depth_ref::GammaPhase::prefill
                                                : depth_ref::GammaPhase::decode;
  p.prefill_threshold = o.prefill_threshold;
  p.decode_threshold = o.decode_threshold;
  p.must_keep_at_inference = o.must_keep_at_inference;
  return p;
}
depth_ref::PruneParams to_ref(const TokenPruneOptions& o) {
  depth_ref::PruneParams p;
  p.tau = o.tau;
  p.has_sparsity = o.sparsity.has_value();
  p.sparsity = o.sparsity.value_or(0.0);
  return p;
}

// Near-tie bookkeeping over the whole file (printed once at the end).
struct Totals {
  int64_t cases = 0, compared = 0, excluded = 0, outputs_compared = 0, sequences_excluded = 0;
};
Totals g_totals;

class TotalsPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    std::printf(
        "[ depth ref ] cases: %lld, token decisions compared exactly: %lld, excluded as near-ties: "
        "%lld; "
        "layer output rows compared: %lld, sequences excluded (near-tie inside): %lld\n",
        (long long)g_totals.cases, (long long)g_totals.compared, (long long)g_totals.excluded,
        (long long)g_totals.outputs_compared, (long long)g_totals.sequences_excluded);
  }
};
[[maybe_unused]] ::testing::Environment* const g_env =
    ::testing::AddGlobalTestEnvironment(new TotalsPrinter);

std::vector<uint8_t> selected_of(const RoutingPlan& plan) {
  std::vector<uint8_t> s(static_cast<size_t>(plan.num_tokens()));
  moekit::depth_selected(plan, s);
  return s;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

struct Compared {
  int64_t compared = 0, excluded = 0;
};

// Decisions exactly (except near-ties), weights and values within tolerance, plan invariants.
Compared check_decisions(const Case& c, const depth_ref::Decision& want, const RoutingPlan& plan,
                         const RouterScratch& scratch, const std::string& what) {
  const int64_t T = c.L.tokens;
  Compared n;
  EXPECT_TRUE(plan.finalized()) << what;
  EXPECT_EQ(plan.num_tokens(), T) << what;
  EXPECT_EQ(plan.num_experts(), 1) << what;
  EXPECT_EQ(plan.num_dropped(), 0) << what;
  EXPECT_EQ(static_cast<int64_t>(scratch.values.size()), T) << what;
  const double wscale = std::max(1.0, max_abs(want.weight));
  const std::vector<uint8_t> sel = selected_of(plan);
  for (int64_t t = 0; t < T; ++t) {
    if (c.L.padded(t)) {
      EXPECT_EQ(plan.slots_of(t), 0) << what << " padded token " << t;
      EXPECT_EQ(scratch.values[t], 0.0f) << what << " padded token " << t;
      continue;
    }
    EXPECT_LE(plan.slots_of(t), 1) << what;
    const double wv = want.weight[t];
    EXPECT_NEAR(scratch.values[t], wv, 1e-4 * std::fabs(wv) + 2e-6 * wscale)
        << what << " value of token " << t;
    if (plan.slots_of(t) == 1) {
      const int32_t s = plan.slot_offsets()[t];
      EXPECT_EQ(plan.slot_expert()[s], 0) << what;
      EXPECT_EQ(plan.slot_weight()[s], scratch.values[t]) << what << " plan weight of token " << t;
    }
    if (want.ambiguous[t]) {
      ++n.excluded;
      continue;
    }
    ++n.compared;
    EXPECT_EQ(sel[t], want.selected[t])
        << what << " token " << t << " (logit " << want.logits[t] << ")";
  }
  g_totals.compared += n.compared;
  g_totals.excluded += n.excluded;
  ++g_totals.cases;
  return n;
}

void expect_same_plan(const RoutingPlan& a, const RoutingPlan& b, const std::string& what) {
  ASSERT_EQ(a.num_slots(), b.num_slots()) << what;
  for (int64_t t = 0; t <= a.num_tokens(); ++t)
    EXPECT_EQ(a.slot_offsets()[t], b.slot_offsets()[t]) << what;
  for (int64_t s = 0; s < a.num_slots(); ++s)
    EXPECT_EQ(a.slot_weight()[s], b.slot_weight()[s]) << what;
}

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected moekit::error containing \"" << needle << "\"";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

// Routes with 1 and 2 threads; returns the 1-thread plan/scratch and checks they agree.
template <class R>
void route_both(const R& r, const Case& c, RoutingPlan& plan, RouterScratch& scratch,
                const std::string& what) {
  const Batch b = c.batch();
  r.route(b, c.x.data(), plan, scratch, 1);
  RoutingPlan p2;
  RouterScratch s2;
  r.route(b, c.x.data(), p2, s2, 2);
  expect_same_plan(plan, p2, what + " threads 1 vs 2");
}

// ------------------------------------------------------------------------ MoD

MoDOptions random_mod(Rng& rng, int64_t d, MoDMode mode) {
  MoDOptions o;
  o.hidden = d;
  o.mode = mode;
  const double ratios[] = {0.125, 0.5, 1.0, 0.0, rng.uniform(0.0, 1.0)};
  o.ratio = ratios[rng.integer(0, 4)];
  o.activation = static_cast<DepthActivation>(rng.integer(0, 2));
  o.alpha = rng.uniform(0.5, 2.0);
  if (mode != MoDMode::capacity && rng.coin(0.5)) o.threshold = rng.uniform(0.2, 0.8);
  return o;
}

TEST(MoD, CapacityMatchesReferenceRandom) {
  Rng rng(0xD3A7);
  int64_t compared = 0;
  for (int i = 0; i < 150; ++i) {
    Case c = random_case(rng);
    const MoDOptions o = random_mod(rng, c.L.hidden, MoDMode::capacity);
    const auto w = router_weight(rng, 1, c.L.hidden, rng.uniform(0.5, 3.0));
    MoDRouter r(o, w);
    RoutingPlan plan;
    RouterScratch scratch;
    route_both(r, c, plan, scratch, "mod capacity case " + std::to_string(i));
    const auto want = depth_ref::mod(c.L, c.x.data(), w, {}, to_ref(o));
    compared +=
        check_decisions(c, want, plan, scratch, "mod capacity case " + std::to_string(i)).compared;
    // Per sequence: exactly ceil(ratio * S) selected, S = unpadded tokens.
    for (int64_t s = 0; s < c.L.num_sequences(); ++s) {
      int64_t S = 0, n = 0;
      for (int64_t t = c.L.begin(s); t < c.L.end(s); ++t) {
        if (c.L.padded(t)) continue;
        ++S;
        n += plan.slots_of(t);
      }
      EXPECT_EQ(n, static_cast<int64_t>(std::ceil(o.ratio * static_cast<double>(S))))
          << "case " << i << " seq " << s;
    }
  }
  EXPECT_GT(compared, 3000);
}

// depth_capacity is public: ratios outside [0, 1] (which the routers refuse) and NaN still
// give a capacity in [0, tokens], never an out-of-range double -> int64 cast.
TEST(MoD, DepthCapacityClampsHostileRatios) {
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(moekit::depth_capacity(1e300, 10), 10);
  EXPECT_EQ(moekit::depth_capacity(inf, 10), 10);
  EXPECT_EQ(moekit::depth_capacity(-1e300, 10), 0);
  EXPECT_EQ(moekit::depth_capacity(std::numeric_limits<double>::quiet_NaN(), 10), 0);
  EXPECT_EQ(moekit::depth_capacity(0.25, 10), 3);  // ceil(2.5)
  EXPECT_EQ(moekit::depth_capacity(1.0, int64_t{1} << 62), int64_t{1} << 62);
  EXPECT_EQ(moekit::depth_capacity(0.5, 0), 0);
}

// Capacities are not moved by floating-point error (ROUTING.md section 5): a product within
// 1e-9 of an integer is that integer before the ceiling / floor.
TEST(MoD, CapacitiesSnapProductsThatAreIntegers) {
  ASSERT_GT((1.0 - 0.7) * 10.0, 3.0);                   // 3.0000000000000004 in double
  EXPECT_EQ(moekit::depth_capacity(1.0 - 0.7, 10), 3);  // token pruning, sparsity 0.7: prunes 70%
  EXPECT_EQ(moekit::depth_capacity(0.3, 10), 3);
  EXPECT_EQ(moekit::depth_capacity(0.30000001, 10), 4);  // 3.0000001: a real fraction rounds up
  EXPECT_EQ(moekit::depth_capacity(0.125, 12), 2);       // ceil(1.5)
  moekit::MoROptions m;
  m.hidden = 1;
  m.num_recursions = 2;
  m.capacity_factors = {1.0, 0.29};
  ASSERT_LT(0.29 * 100.0, 29.0);       // 28.999999999999996
  EXPECT_EQ(m.capacity(1, 100), 29);   // floor after snapping
  m.capacity_factors = {1.0, 0.2899999};
  EXPECT_EQ(m.capacity(1, 100), 28);   // 28.99999: not an integer
}

TEST(MoD, CapacityZeroAndFullOverSeveralSequences) {
  Rng rng(11);
  Case c;
  c.L.tokens = 40;
  c.L.hidden = 8;
  c.L.offsets = {0, 10, 10, 25, 31, 40};  // an empty sequence too
  c.L.padding.assign(40, 0);
  for (int t = 25; t < 31; ++t) c.L.padding[t] = 1;  // one all-padding sequence
  c.L.padding[3] = c.L.padding[12] = 1;
  c.x = rng.vec(40 * 8, 1.0);
  const auto w = router_weight(rng, 1, 8, 2.0);
  for (double ratio : {0.0, 1.0, 1e-9, 0.5}) {
    MoDRouter r({.hidden = 8, .ratio = ratio}, w);
    RoutingPlan plan;
    RouterScratch scratch;
    route_both(r, c, plan, scratch, "ratio " + std::to_string(ratio));
    const auto want = depth_ref::mod(c.L, c.x.data(), w, {}, to_ref(r.options()));
    check_decisions(c, want, plan, scratch, "ratio " + std::to_string(ratio));
    const int64_t routed = 40 - 8;
    if (ratio == 0.0) {
      EXPECT_EQ(plan.num_kept(), 0);
    }
    if (ratio == 1.0) {
      EXPECT_EQ(plan.num_kept(), routed);
    }
    if (ratio == 1e-9) {
      EXPECT_EQ(plan.num_kept(), 3);
    }  // C = 1 in each non-empty unpadded sequence
    if (ratio == 0.5) {
      EXPECT_EQ(plan.num_kept(), 5 + 7 + 5);
    }  // ceil(9/2), ceil(14/2), ceil(9/2)
  }
}

TEST(MoD, TiesGoToLowerIndex) {
  // Identical rows: identical logits; the first C unpadded tokens of each sequence win.
  const int64_t T = 12, d = 5;
  Case c;
  c.L.tokens = T;
  c.L.hidden = d;
  c.L.offsets = {0, 7, 12};
  c.L.padding.assign(T, 0);
  c.L.padding[1] = 1;
  c.x.assign(T * d, 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < d; ++i) c.x[t * d + i] = 0.1f * static_cast<float>(i + 1);
  MoDRouter r({.hidden = d, .ratio = 0.5, .activation = DepthActivation::sigmoid},
              std::vector<float>(d, 0.3f));
  RoutingPlan plan;
  RouterScratch scratch;
  r.route(c.batch(), c.x.data(), plan, scratch, 2);
  const std::vector<uint8_t> want{1, 0, 1, 1, 0, 0, 0, /*seq 2*/ 1, 1, 1, 0, 0};  // C = 3, 3
  EXPECT_EQ(selected_of(plan), want);
}

TEST(MoD, NearTieAtTheCapacityBoundaryIsExcludedNotGuessed) {
  // Tokens 1 and 2 score 1 and 1 + 2^-22 (a float-representable near-tie, < 1e-6 relative):
  // the reference flags the sequence, the library still selects exactly C = 2.
  const int64_t d = 1;
  Case c;
  c.L.tokens = 4;
  c.L.hidden = d;
  c.x = {3.0f, 1.0f, 1.0f + 0x1p-22f, -1.0f};
  MoDRouter r({.hidden = d, .ratio = 0.5}, std::vector<float>{1.0f});
  RoutingPlan plan;
  RouterScratch scratch;
  r.route(c.batch(), c.x.data(), plan, scratch);
  const auto want = depth_ref::mod(c.L, c.x.data(), {1.0f}, {}, to_ref(r.options()));
  EXPECT_EQ(want.count_ambiguous(), 4);
  EXPECT_EQ(want.sequence_ambiguous[0], 1);
  EXPECT_EQ(plan.num_kept(), 2);
  EXPECT_EQ(selected_of(plan),
            (std::vector<uint8_t>{1, 0, 1, 0}));  // fp32 still orders them exactly
  depth_ref::ModParams exact = to_ref(r.options());
  exact.tie_rel = 0;  // no exclusion: the reference agrees
  EXPECT_EQ(depth_ref::mod(c.L, c.x.data(), {1.0f}, {}, exact).selected,
            (std::vector<uint8_t>{1, 0, 1, 0}));
}

TEST(MoD, ThresholdAndAuxPredictorModes) {
  Rng rng(0x7E5);
  int64_t compared = 0, selected = 0, unselected = 0;
  for (MoDMode mode : {MoDMode::threshold, MoDMode::aux_predictor}) {
    for (int i = 0; i < 80; ++i) {
      Case c = random_case(rng);
      const MoDOptions o = random_mod(rng, c.L.hidden, mode);
      const auto w = router_weight(rng, 1, c.L.hidden, 2.0);
      const auto aux = mode == MoDMode::aux_predictor ? router_weight(rng, 1, c.L.hidden, 2.0)
                                                      : std::vector<float>{};
      MoDRouter r(o, w, aux);
      RoutingPlan plan;
      RouterScratch scratch;
      route_both(r, c, plan, scratch, "mod threshold case " + std::to_string(i));
      const auto want = depth_ref::mod(c.L, c.x.data(), w, aux, to_ref(o));
      compared += check_decisions(c, want, plan, scratch, "mod threshold case " + std::to_string(i))
                      .compared;
      for (int64_t t = 0; t < c.L.tokens; ++t)
        if (!c.L.padded(t)) (plan.slots_of(t) ? selected : unselected)++;
    }
  }
  EXPECT_GT(compared, 2000);
  EXPECT_GT(selected, 500);
  EXPECT_GT(unselected, 500);
}

// The MoD paper's auxiliary predictor MLP (Linear(d, h) -> ReLU -> Linear(h, 1)).
TEST(MoD, AuxPredictorMlpMatchesReference) {
  Rng rng(0xA0C);
  int64_t compared = 0, selected = 0, unselected = 0;
  for (int i = 0; i < 60; ++i) {
    Case c = random_case(rng);
    MoDOptions o = random_mod(rng, c.L.hidden, MoDMode::aux_predictor);
    o.aux_hidden = rng.integer(1, 20);
    const int64_t h = o.aux_hidden, d = c.L.hidden;
    const auto w = router_weight(rng, 1, d, 2.0);
    moekit::MoDAuxMlp mlp{router_weight(rng, h, d, 2.0), rng.vec(static_cast<size_t>(h), 0.5),
                          rng.vec(static_cast<size_t>(h), 1.5 / std::sqrt(double(h))), {static_cast<float>(rng.uniform(-0.5, 0.5))}};
    depth_ref::ModParams p = to_ref(o);
    p.mlp_h = h;
    p.mlp_w1 = mlp.w1;
    p.mlp_b1 = mlp.b1;
    p.mlp_w2 = mlp.w2;
    p.mlp_b2 = mlp.b2[0];
    MoDRouter r(o, w, mlp);
    RoutingPlan plan;
    RouterScratch scratch;
    route_both(r, c, plan, scratch, "mod mlp case " + std::to_string(i));
    const auto want = depth_ref::mod(c.L, c.x.data(), w, {}, p);
    compared += check_decisions(c, want, plan, scratch, "mod mlp case " + std::to_string(i)).compared;
    for (int64_t t = 0; t < c.L.tokens; ++t)
      if (!c.L.padded(t)) (plan.slots_of(t) ? selected : unselected)++;
  }
  EXPECT_GT(compared, 800);
  EXPECT_GT(selected, 100);
  EXPECT_GT(unselected, 100);
  // Shapes and options are checked.
  const int64_t d = 4;
  MoDOptions o{.hidden = d, .mode = MoDMode::aux_predictor, .aux_hidden = 3};
  moekit::MoDAuxMlp ok{std::vector<float>(12, 0.1f), std::vector<float>(3), std::vector<float>(3, 0.1f), {0.0f}};
  moekit::MoDAuxMlp bad = ok;
  bad.b1.resize(2);
  expect_error([&] { MoDRouter(o, std::vector<float>(d, 0.1f), bad); }, "router.aux.0.bias");
  expect_error([&] { MoDRouter(o, std::vector<float>(d, 0.1f), std::vector<float>(d, 0.1f)); },
               "needs the MLP predictor");
  o.mode = MoDMode::threshold;
  expect_error([&] { MoDRouter(o, std::vector<float>(d, 0.1f), ok); }, "aux_hidden expected 0 unless mode is aux_predictor");
}

TEST(MoD, ThresholdModeIsCausal) {
  // A token's decision and weight do not depend on the other tokens (a prefix routes alike).
  Rng rng(5);
  const int64_t T = 50, d = 16;
  const auto x = rng.vec(T * d, 1.0);
  const auto w = router_weight(rng, 1, d, 2.0);
  MoDRouter r(
      {.hidden = d, .activation = DepthActivation::tanh, .alpha = 1.5, .mode = MoDMode::threshold},
      w);
  RoutingPlan full, part;
  RouterScratch s1, s2;
  r.route(Batch::single(T, d), x.data(), full, s1);
  for (int64_t n : {1, 17, 49}) {
    r.route(Batch::single(n, d), x.data(), part, s2);
    for (int64_t t = 0; t < n; ++t) {
      EXPECT_EQ(part.slots_of(t), full.slots_of(t));
      EXPECT_EQ(s2.values[t], s1.values[t]);
    }
  }
}

TEST(DepthThreads, LargeBatchRoutesIdenticallyWithOneAndTwoThreads) {
  // Big enough (T * d >= 2^19) for the parallel logit path.
  Rng rng(31);
  Case c;
  c.L.tokens = 2100;
  c.L.hidden = 256;
  c.L.offsets = {0, 700, 2100};
  c.L.token_types.assign(2100, 0);
  for (int64_t t = 0; t < 2100; t += 9) c.L.token_types[t] = 1;
  c.x = rng.vec(2100 * 256, 1.0);
  RoutingPlan plan;
  RouterScratch scratch;
  const auto w = router_weight(rng, 1, 256, 2.0), w2 = router_weight(rng, 2, 256, 2.0);
  MoDRouter mod({.hidden = 256}, w);
  route_both(mod, c, plan, scratch, "mod large");
  check_decisions(c, depth_ref::mod(c.L, c.x.data(), w, {}, to_ref(mod.options())), plan, scratch,
                  "mod large");
  GammaModRouter gamma({.hidden = 256}, w2);
  route_both(gamma, c, plan, scratch, "gamma large");
  check_decisions(c, depth_ref::gamma_mod(c.L, c.x.data(), w2, to_ref(gamma.options())), plan,
                  scratch, "gamma large");
  TokenPruneRouter ftp({.hidden = 256, .sparsity = 0.7}, w);
  route_both(ftp, c, plan, scratch, "ftp large");
  check_decisions(c, depth_ref::token_prune(c.L, c.x.data(), w, to_ref(ftp.options())), plan,
                  scratch, "ftp large");
}

TEST(MoD, WeightActivations) {
  const int64_t d = 2;
  const std::vector<float> x{1.0f, 2.0f, -3.0f, 0.5f};  // r = 0.5 * x0 + 0.25 * x1: 1.0, -1.375
  const std::vector<float> w{0.5f, 0.25f};
  const double r[2] = {1.0, -1.375};
  for (DepthActivation a :
       {DepthActivation::raw, DepthActivation::sigmoid, DepthActivation::tanh}) {
    MoDRouter router({.hidden = d, .ratio = 1.0, .activation = a, .alpha = 2.0}, w);
    RoutingPlan plan;
    RouterScratch s;
    router.route(Batch::single(2, d), x.data(), plan, s);
    for (int t = 0; t < 2; ++t) {
      const double want = a == DepthActivation::raw       ? r[t]
                          : a == DepthActivation::sigmoid ? 1.0 / (1.0 + std::exp(-r[t]))
                                                          : 2.0 * std::tanh(r[t]);
      EXPECT_NEAR(plan.slot_weight()[t], want, 1e-6);
      EXPECT_NEAR(s.logits[t], r[t], 1e-6);
    }
  }
}

// ------------------------------------------------------------------------ gamma-MoD

GammaModOptions random_gamma(Rng& rng, int64_t d, GammaModPhase phase) {
  GammaModOptions o;
  o.hidden = d;
  o.phase = phase;
  const double ratios[] = {0.5, 0.25, 1.0, 0.0, rng.uniform(0.0, 1.0)};
  o.ratio = ratios[rng.integer(0, 4)];
  if (rng.coin(0.3)) o.prefill_threshold = rng.uniform(0.001, 0.3);
  if (rng.coin(0.3)) o.decode_threshold = rng.uniform(0.2, 0.8);
  return o;
}

TEST(GammaMoD, MatchesReferenceAllPhases) {
  Rng rng(0x6A44A);
  int64_t compared = 0;
  for (GammaModPhase phase :
       {GammaModPhase::capacity, GammaModPhase::prefill, GammaModPhase::decode}) {
    for (int i = 0; i < 100; ++i) {
      Case c = random_case(rng);
      GammaModOptions o = random_gamma(rng, c.L.hidden, phase);
      o.must_keep_at_inference = phase != GammaModPhase::capacity && i % 2 == 1;
      const auto W = router_weight(rng, 2, c.L.hidden, rng.uniform(1.0, 5.0));
      GammaModRouter r(o, W);
      RoutingPlan plan;
      RouterScratch scratch;
      const std::string what =
          "gamma phase " + std::to_string(static_cast<int>(phase)) + " case " + std::to_string(i);
      route_both(r, c, plan, scratch, what);
      const auto want = depth_ref::gamma_mod(c.L, c.x.data(), W, to_ref(o));
      compared += check_decisions(c, want, plan, scratch, what).compared;
      // must-keep tokens: always selected in training (capacity), at inference only if asked
      if (phase == GammaModPhase::capacity || o.must_keep_at_inference)
        for (int64_t t = 0; t < c.L.tokens; ++t)
          if (!c.L.padded(t) && !c.L.token_types.empty() && c.L.token_types[t] != 0) {
            EXPECT_EQ(plan.slots_of(t), 1) << what << " must-keep token " << t;
          }
      if (phase == GammaModPhase::capacity)
        for (int64_t s = 0; s < c.L.num_sequences(); ++s) {
          int64_t S = 0, M = 0, n = 0;
          for (int64_t t = c.L.begin(s); t < c.L.end(s); ++t) {
            if (c.L.padded(t)) continue;
            ++S;
            M += !c.L.token_types.empty() && c.L.token_types[t] != 0;
            n += plan.slots_of(t);
          }
          EXPECT_EQ(n, std::max<int64_t>(
                           M, static_cast<int64_t>(std::ceil(o.ratio * static_cast<double>(S)))))
              << what;
        }
    }
  }
  EXPECT_GT(compared, 5000);
}

TEST(GammaMoD, MoreMustKeepThanCapacity) {
  Rng rng(3);
  const int64_t T = 20, d = 6;
  Case c;
  c.L.tokens = T;
  c.L.hidden = d;
  c.L.offsets = {0, 12, 20};
  c.L.token_types.assign(T, 0);
  for (int t : {0, 2, 3, 5, 8, 9, 11}) c.L.token_types[t] = 1;  // 7 must-keep in seq 0
  c.L.token_types[15] = 1;                                      // 1 must-keep in seq 1
  c.L.padding.assign(T, 0);
  c.L.padding[9] = 1;  // a padded must-keep token: never selected
  c.x = rng.vec(T * d, 1.0);
  // Row 1 strongly negative: the must-keep tokens would never win on p.
  std::vector<float> W(2 * d, 0.0f);
  for (int64_t i = 0; i < d; ++i) W[d + i] = -2.0f;
  GammaModRouter r({.hidden = d, .ratio = 0.25},
                   W);  // C = ceil(0.25 * 11) = 3 < 6; ceil(0.25 * 8) = 2 > 1
  RoutingPlan plan;
  RouterScratch scratch;
  route_both(r, c, plan, scratch, "must-keep");
  const auto want = depth_ref::gamma_mod(c.L, c.x.data(), W, to_ref(r.options()));
  check_decisions(c, want, plan, scratch, "must-keep");
  const auto sel = selected_of(plan);
  for (int64_t t = 0; t < 12; ++t)
    EXPECT_EQ(sel[t], t != 9 && c.L.token_types[t] != 0)
        << "token " << t;  // exactly the must-keep set
  int64_t n1 = 0;
  for (int64_t t = 12; t < 20; ++t) n1 += sel[t];
  EXPECT_EQ(n1, 2);
  EXPECT_EQ(sel[15], 1);
  // At inference the official code has no must-keep mask: every token by the threshold alone
  // (the reference agrees; at decode's 0.5 some must-keep tokens fall below it here); with
  // must_keep_at_inference the must-keep tokens are processed whatever p.
  for (GammaModPhase ph : {GammaModPhase::prefill, GammaModPhase::decode}) {
    GammaModRouter official({.hidden = d, .phase = ph}, W);
    official.route(c.batch(), c.x.data(), plan, scratch);
    check_decisions(c, depth_ref::gamma_mod(c.L, c.x.data(), W, to_ref(official.options())), plan, scratch,
                    "official inference");
    const auto s1 = selected_of(plan);
    int64_t must_skipped = 0;
    for (int64_t t = 0; t < T; ++t) must_skipped += !c.L.padded(t) && c.L.token_types[t] != 0 && s1[t] == 0;
    if (ph == GammaModPhase::decode) {
      EXPECT_GT(must_skipped, 0);
    }
    GammaModRouter rt({.hidden = d, .phase = ph, .must_keep_at_inference = true}, W);
    rt.route(c.batch(), c.x.data(), plan, scratch);
    const auto s2 = selected_of(plan);
    for (int64_t t = 0; t < T; ++t)
      if (!c.L.padded(t) && c.L.token_types[t] != 0) {
        EXPECT_EQ(s2[t], 1);
      }
    EXPECT_EQ(s2[9], 0);
  }
}

TEST(GammaMoD, PrefillThresholdKeepsMoreThanDecode) {
  Rng rng(21);
  const int64_t T = 200, d = 16;
  const auto x = rng.vec(T * d, 1.0);
  const auto W = router_weight(rng, 2, d, 4.0);
  RoutingPlan plan;
  RouterScratch s;
  GammaModRouter({.hidden = d, .phase = GammaModPhase::prefill}, W)
      .route(Batch::single(T, d), x.data(), plan, s);
  const int64_t prefill = plan.num_kept();
  GammaModRouter({.hidden = d, .phase = GammaModPhase::decode}, W)
      .route(Batch::single(T, d), x.data(), plan, s);
  const int64_t decode = plan.num_kept();
  EXPECT_GT(prefill, decode);
  EXPECT_GT(decode, 0);
  // p = softmax(L)[1]: values and logits agree.
  for (int64_t t = 0; t < T; ++t) {
    const double l0 = s.logits[2 * t], l1 = s.logits[2 * t + 1];
    EXPECT_NEAR(s.values[t], std::exp(l1) / (std::exp(l0) + std::exp(l1)), 1e-6);
  }
}

// ------------------------------------------------------------------------ FTP

TEST(TokenPrune, BothModesMatchReference) {
  Rng rng(0xF7);
  int64_t compared = 0;
  for (int i = 0; i < 160; ++i) {
    Case c = random_case(rng);
    TokenPruneOptions o;
    o.hidden = c.L.hidden;
    if (i % 2 == 0) {
      const double sp[] = {0.0, 1.0, 0.5, 0.875, rng.uniform(0.0, 1.0)};
      o.sparsity = sp[rng.integer(0, 4)];
    } else if (rng.coin(0.5)) {
      o.tau = rng.uniform(0.1, 0.9);
    }
    const auto w = router_weight(rng, 1, c.L.hidden, 2.0);
    TokenPruneRouter r(o, w);
    RoutingPlan plan;
    RouterScratch scratch;
    const std::string what = "ftp case " + std::to_string(i);
    route_both(r, c, plan, scratch, what);
    const auto want = depth_ref::token_prune(c.L, c.x.data(), w, to_ref(o));
    compared += check_decisions(c, want, plan, scratch, what).compared;
    for (int64_t s = 0; s < plan.num_slots(); ++s) EXPECT_EQ(plan.slot_weight()[s], 1.0f) << what;
    if (o.sparsity && *o.sparsity == 0.0) {
      EXPECT_EQ(plan.num_kept(), Batch(c.batch()).routed_tokens());
    }
    if (o.sparsity && *o.sparsity == 1.0) {
      EXPECT_EQ(plan.num_kept(), 0);
    }
  }
  EXPECT_GT(compared, 3000);
}

// ------------------------------------------------------------------------ ARank

// Columns of a random [n, r] matrix made orthonormal (Gram-Schmidt), r <= n.
std::vector<double> orthonormal(Rng& rng, int64_t n, int64_t r) {
  std::vector<double> Q(n * r);
  for (int64_t k = 0; k < r; ++k) {
    for (int attempt = 0;; ++attempt) {
      for (int64_t i = 0; i < n; ++i) Q[i * r + k] = rng.uniform(-1, 1);
      for (int pass = 0; pass < 2; ++pass)
        for (int64_t j = 0; j < k; ++j) {
          double dot = 0;
          for (int64_t i = 0; i < n; ++i) dot += Q[i * r + j] * Q[i * r + k];
          for (int64_t i = 0; i < n; ++i) Q[i * r + k] -= dot * Q[i * r + j];
        }
      double norm = 0;
      for (int64_t i = 0; i < n; ++i) norm += Q[i * r + k] * Q[i * r + k];
      norm = std::sqrt(norm);
      if (norm > 1e-3) {
        for (int64_t i = 0; i < n; ++i) Q[i * r + k] /= norm;
        break;
      }
    }
  }
  return Q;
}

// A [rows, cols] = U diag(s) V^T, U, V orthonormal columns, s in [1, 2]: rank exactly r and
// well conditioned, so the numerical rank is r in float and double.
std::vector<double> low_rank(Rng& rng, int64_t rows, int64_t cols, int64_t r) {
  std::vector<double> A(rows * cols, 0.0);
  if (r == 0) return A;
  const auto U = orthonormal(rng, rows, r), V = orthonormal(rng, cols, r);
  std::vector<double> sv(r);
  for (double& v : sv) v = rng.uniform(1, 2);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t k = 0; k < r; ++k) A[i * cols + j] += U[i * r + k] * sv[k] * V[j * r + k];
  return A;
}

TEST(ARank, KnownRankMatrices) {
  Rng rng(0xA7A);
  for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 1}, {8, 8}, {33, 33}, {20, 7}, {5, 30}, {64, 64}}) {
    for (int64_t r : {int64_t{0}, int64_t{1}, int64_t{3}, std::min(rows, cols)}) {
      if (r > std::min(rows, cols)) continue;
      const auto A = low_rank(rng, rows, cols, r);
      std::vector<float> Af(A.begin(), A.end());
      EXPECT_EQ(moekit::numerical_rank(A.data(), rows, cols), r)
          << rows << "x" << cols << " rank " << r;
      EXPECT_EQ(moekit::numerical_rank(Af.data(), rows, cols), r)
          << rows << "x" << cols << " rank " << r << " float";
      EXPECT_EQ(depth_ref::matrix_rank(A, rows, cols, std::numeric_limits<double>::epsilon()), r)
          << "reference";
    }
  }
  // Identity, a diagonal with one tiny entry (below / above the numpy tolerance).
  const int64_t n = 10;
  std::vector<double> D(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) D[i * n + i] = 1.0;
  EXPECT_EQ(moekit::numerical_rank(D.data(), n, n), n);
  D[0] = 1e-16;  // < 1 * 10 * 2^-52
  EXPECT_EQ(moekit::numerical_rank(D.data(), n, n), n - 1);
  D[0] = 1e-13;
  EXPECT_EQ(moekit::numerical_rank(D.data(), n, n), n);
  std::vector<float> Df(D.begin(), D.end());
  Df[0] = 1e-6f;  // < 1 * 10 * 2^-23 for float input
  EXPECT_EQ(moekit::numerical_rank(Df.data(), n, n), n - 1);
  EXPECT_EQ(moekit::numerical_rank(static_cast<const float*>(nullptr), 0, 5), 0);
}

TEST(ARank, AttentionMapsMeanOverSamplesAndHeads) {
  Rng rng(77);
  const int64_t N = 3, H = 4, S = 24;
  // Causal softmax maps with a dominant diagonal (full rank, well conditioned), uniform maps
  // (every row the same distribution: rank 1), and rank-limited maps built from few keys.
  std::vector<float> maps(N * H * S * S, 0.0f);
  std::vector<int64_t> want_rank;
  for (int64_t m = 0; m < N * H; ++m) {
    float* A = maps.data() + m * S * S;
    const int kind = static_cast<int>(m % 3);
    if (kind == 0) {
      for (int64_t i = 0; i < S; ++i) {
        double sum = 0;
        std::vector<double> e(i + 1);
        for (int64_t j = 0; j <= i; ++j)
          sum += (e[j] = std::exp(rng.uniform(-1, 1) + (j == i ? 6.0 : 0.0)));
        for (int64_t j = 0; j <= i; ++j) A[i * S + j] = static_cast<float>(e[j] / sum);
      }
      want_rank.push_back(S);
    } else if (kind == 1) {
      std::vector<double> e(S);
      double sum = 0;
      for (double& v : e) sum += (v = std::exp(rng.uniform(-2, 2)));
      for (int64_t i = 0; i < S; ++i)
        for (int64_t j = 0; j < S; ++j) A[i * S + j] = static_cast<float>(e[j] / sum);
      want_rank.push_back(1);
    } else {
      // Rank 4 by construction.
      const auto P = low_rank(rng, S, S, 4);
      for (int64_t i = 0; i < S * S; ++i) A[i] = static_cast<float>(P[i]);
      want_rank.push_back(4);
    }
  }
  double want = 0;
  for (int64_t r : want_rank) want += static_cast<double>(r);
  want /= static_cast<double>(N * H);
  EXPECT_DOUBLE_EQ(moekit::arank(std::span<const float>(maps), N, H, S, S, false), want);
  const std::vector<double> md(maps.begin(), maps.end());
  EXPECT_DOUBLE_EQ(depth_ref::arank(md, N * H, S, S, std::numeric_limits<float>::epsilon()), want);
  // The official ARank (gamma-MoD llava_llama.py compute_attention_rank, commit 0cdca4c): causal
  // mask, then the diagonal set to 0, then the rank; the reference gets the masked maps.
  std::vector<double> strict(md.size());
  for (int64_t m = 0; m < N * H; ++m)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j < S; ++j) strict[m * S * S + i * S + j] = j < i ? md[m * S * S + i * S + j] : 0.0;
  const double official = depth_ref::arank(strict, N * H, S, S, std::numeric_limits<float>::epsilon());
  EXPECT_DOUBLE_EQ(moekit::arank(std::span<const float>(maps), N, H, S, S), official);
  // A causal softmax map (kind 0 above: lower triangular with a dominant diagonal) has full
  // rank S as given and S - 1 once the diagonal is gone.
  const std::span<const float> first(maps.data(), static_cast<size_t>(S * S));
  EXPECT_DOUBLE_EQ(moekit::arank(first, 1, 1, S, S, false), static_cast<double>(S));
  EXPECT_DOUBLE_EQ(moekit::arank(first, 1, 1, S, S), static_cast<double>(S - 1));
  expect_error([&] { (void)moekit::arank(std::span<const float>(maps), N, H * S, 1, S); },
               "strictly_causal expected square maps");
  // Random maps of random rank: library == reference.
  for (int i = 0; i < 10; ++i) {
    const int64_t rows = rng.integer(1, 30), cols = rng.integer(1, 30),
                  r = rng.integer(0, std::min(rows, cols));
    const auto A = low_rank(rng, rows, cols, r);
    EXPECT_EQ(moekit::numerical_rank(A.data(), rows, cols),
              depth_ref::matrix_rank(A, rows, cols, std::numeric_limits<double>::epsilon()));
  }
  expect_error([&] { (void)moekit::arank(std::span<const float>(maps), N, H, S, S + 1, false); }, "arank: maps expected");
  expect_error([&] { (void)moekit::arank(std::span<const float>(maps), 0, H, S, S); }, "samples");
}

// ------------------------------------------------------------------------ blocks

depth_ref::Ffn random_ffn(Rng& rng, int64_t d, int64_t f) {
  depth_ref::Ffn r;
  r.hidden = d;
  r.intermediate = f;
  r.gate = rng.vec(f * d, 1.0 / std::sqrt(double(d)));
  r.up = rng.vec(f * d, 1.0 / std::sqrt(double(d)));
  r.down = rng.vec(d * f, 1.0 / std::sqrt(double(f)));
  return r;
}
FfnBlock make_ffn(const depth_ref::Ffn& r) {
  return FfnBlock({.hidden = r.hidden, .intermediate = r.intermediate}, r.gate.data(), r.up.data(),
                  r.down.data());
}
depth_ref::Attention random_attention(Rng& rng, int64_t d) {
  depth_ref::Attention a;
  a.hidden = d;
  const double s = 1.5 / std::sqrt(double(d));
  a.wq = rng.vec(d * d, s);
  a.wk = rng.vec(d * d, s);
  a.wv = rng.vec(d * d, s);
  a.wo = rng.vec(d * d, s);
  return a;
}
CausalAttentionBlock make_attention(const depth_ref::Attention& a) {
  return CausalAttentionBlock(a.hidden, a.wq, a.wk, a.wv, a.wo);
}

// |got - want| <= rel |want| + floor * max|want|, rows with skip[row] skipped; returns rows
// compared.
int64_t compare_rows(const std::vector<double>& want, const float* got, int64_t d,
                     const std::vector<uint8_t>& skip, const std::string& what, double rel = 2e-4,
                     double floor = 2e-5) {
  const double m = max_abs(want);
  int64_t rows = 0, bad = 0;
  for (size_t r = 0; r * d < want.size(); ++r) {
    if (!skip.empty() && skip[r]) continue;
    ++rows;
    for (int64_t c = 0; c < d; ++c) {
      const double w = want[r * d + c], g = got[r * d + c];
      if (!(std::fabs(g - w) <= rel * std::fabs(w) + floor * m) && bad++ < 5)
        ADD_FAILURE() << what << " row " << r << " col " << c << ": got " << g << ", want " << w;
    }
  }
  return rows;
}

TEST(Blocks, FfnBlockMatchesReference) {
  Rng rng(1);
  const int64_t d = 24, f = 40, R = 13;
  const auto ref = random_ffn(rng, d, f);
  const FfnBlock blk = make_ffn(ref);
  EXPECT_EQ(blk.d_in(), d);
  EXPECT_DOUBLE_EQ(blk.flops_per_row(), 6.0 * d * f);
  const auto x = rng.vec(R * d, 1.0);
  std::vector<float> y(R * d), scratch(blk.scratch_floats(R));
  blk(x.data(), R, y.data(), scratch.data());
  std::vector<double> want;
  for (int64_t r = 0; r < R; ++r) {
    const auto o = depth_ref::ffn_row(ref, x.data() + r * d);
    want.insert(want.end(), o.begin(), o.end());
  }
  ASSERT_GT(max_abs(want), 0.0);
  EXPECT_EQ(compare_rows(want, y.data(), d, {}, "ffn block"), R);
}

TEST(Blocks, AttentionFourArgumentCallIsOneCausalSequence) {
  Rng rng(2);
  for (int64_t d : {1, 7, 32}) {
    const int64_t R = 19;
    const auto ref = random_attention(rng, d);
    const CausalAttentionBlock blk = make_attention(ref);
    const auto x = rng.vec(R * d, 1.0);
    std::vector<float> y(R * d), scratch(blk.scratch_floats(R));
    blk(x.data(), R, y.data(), scratch.data());
    std::vector<int64_t> pos(R);
    for (int64_t i = 0; i < R; ++i) pos[i] = i;
    const auto want = depth_ref::attention(ref, x.data(), R, pos);
    ASSERT_GT(max_abs(want), 0.0);
    compare_rows(want, y.data(), d, {}, "attention d=" + std::to_string(d));
    // Row 0 attends to itself only: f(x_0) = Wo Wv x_0, independent of the later rows.
    std::vector<float> y1(d), s1(blk.scratch_floats(1));
    blk(x.data(), 1, y1.data(), s1.data());
    for (int64_t c = 0; c < d; ++c) EXPECT_NEAR(y1[c], y[c], 1e-5 * (1 + std::fabs(y[c])));
  }
}

TEST(Blocks, AttentionContextCallAttendsWithinSequencesOnOriginalPositions) {
  Rng rng(4);
  const int64_t T = 30, d = 12;
  const auto ref = random_attention(rng, d);
  const CausalAttentionBlock blk = make_attention(ref);
  Case c;
  c.L.tokens = T;
  c.L.hidden = d;
  c.L.offsets = {0, 9, 9, 22, 30};
  c.L.positions.resize(T);
  for (int64_t t = 0; t < T; ++t) c.L.positions[t] = static_cast<int32_t>(100 + 3 * t);  // gaps
  c.x = rng.vec(T * d, 1.0);
  const Batch b = c.batch();
  // A subset of tokens as the layer would pass them: ascending.
  std::vector<int32_t> toks{0, 2, 3, 8, 9, 10, 15, 21, 25, 29};
  const auto R = static_cast<int64_t>(toks.size());
  std::vector<float> in(R * d), y(R * d), scratch(blk.scratch_floats(R));
  for (int64_t i = 0; i < R; ++i) std::copy_n(c.x.data() + toks[i] * d, d, in.data() + i * d);
  blk(in.data(), R, y.data(), scratch.data(), moekit::BlockContext{&b, toks});
  // Reference: the layer reference with exactly these tokens selected, weight 1.
  depth_ref::Decision dec;
  dec.selected.assign(T, 0);
  dec.weight.assign(T, 1.0);
  for (int32_t t : toks) dec.selected[t] = 1;
  const auto full = depth_ref::layer_attention(c.L, c.x.data(), dec, ref);
  std::vector<double> want;
  for (int32_t t : toks) want.insert(want.end(), full.begin() + t * d, full.begin() + (t + 1) * d);
  ASSERT_GT(max_abs(want), 0.0);
  compare_rows(want, y.data(), d, {}, "attention ctx");
  // The first selected token of each sequence sees only itself.
  for (int64_t i : {0, 4, 8}) {
    std::vector<float> y1(d), s1(blk.scratch_floats(1));
    blk(in.data() + i * d, 1, y1.data(), s1.data());
    for (int64_t k = 0; k < d; ++k)
      EXPECT_NEAR(y[i * d + k], y1[k], 1e-5 * (1 + std::fabs(y1[k]))) << "row " << i;
  }
}

// ------------------------------------------------------------------------ layers

enum class Which {
  mod_capacity,
  mod_threshold,
  mod_aux,
  gamma_capacity,
  gamma_prefill,
  ftp_tau,
  ftp_sparsity
};

struct AnyRouter {
  Which which;
  MoDOptions mod;
  GammaModOptions gamma;
  TokenPruneOptions ftp;
  std::vector<float> w, aux;
};

AnyRouter random_router(Rng& rng, Which which, int64_t d) {
  AnyRouter a;
  a.which = which;
  switch (which) {
    case Which::mod_capacity:
      a.mod = random_mod(rng, d, MoDMode::capacity);
      break;
    case Which::mod_threshold:
      a.mod = random_mod(rng, d, MoDMode::threshold);
      break;
    case Which::mod_aux:
      a.mod = random_mod(rng, d, MoDMode::aux_predictor);
      break;
    case Which::gamma_capacity:
      a.gamma = random_gamma(rng, d, GammaModPhase::capacity);
      break;
    case Which::gamma_prefill:
      a.gamma = random_gamma(rng, d, GammaModPhase::prefill);
      break;
    case Which::ftp_tau:
      a.ftp = {.hidden = d, .tau = rng.uniform(0.2, 0.8)};
      break;
    case Which::ftp_sparsity:
      a.ftp = {.hidden = d, .sparsity = rng.uniform(0.0, 1.0)};
      break;
  }
  if (which == Which::mod_capacity && a.mod.ratio == 0.0)
    a.mod.ratio = 0.3;  // keep outputs non-trivial
  if (which == Which::gamma_capacity && a.gamma.ratio == 0.0) a.gamma.ratio = 0.3;
  const bool gamma = which == Which::gamma_capacity || which == Which::gamma_prefill;
  a.w = router_weight(rng, gamma ? 2 : 1, d, 2.0);
  if (which == Which::mod_aux) a.aux = router_weight(rng, 1, d, 2.0);
  return a;
}

depth_ref::Decision reference_decision(const AnyRouter& a, const Case& c) {
  switch (a.which) {
    case Which::mod_capacity:
    case Which::mod_threshold:
    case Which::mod_aux:
      return depth_ref::mod(c.L, c.x.data(), a.w, a.aux, to_ref(a.mod));
    case Which::gamma_capacity:
    case Which::gamma_prefill:
      return depth_ref::gamma_mod(c.L, c.x.data(), a.w, to_ref(a.gamma));
    default:
      return depth_ref::token_prune(c.L, c.x.data(), a.w, to_ref(a.ftp));
  }
}

// Runs the depth layer of router R over `bank` with threads 1 and 2 and compares with `want`.
template <class R, class Bank>
void run_layer(R router, Bank bank, const Case& c, const depth_ref::Decision& dec,
               const std::vector<double>& want, const std::string& what) {
  moekit::SparseLayer layer(std::move(router), std::move(bank));
  const Batch b = c.batch();
  const int64_t T = c.L.tokens, d = c.L.hidden;
  std::vector<float> y1(T * d, 7.0f), y2(T * d, 9.0f);
  moekit::Workspace ws;
  layer.forward(b, c.x.data(), y1.data(), ws, 1);
  check_decisions(c, dec, ws.plan, ws.router, what);
  layer.forward(b, c.x.data(), y2.data(), ws, 2);
  EXPECT_EQ(y1, y2) << what << ": threads 1 vs 2 outputs differ";
  // Rows of sequences holding a near-tie are not compared (their selected set may differ).
  std::vector<uint8_t> skip(T, 0);
  for (int64_t t = 0; t < T; ++t) skip[t] = dec.sequence_ambiguous[c.L.sequence_of(t)];
  for (uint8_t s : dec.sequence_ambiguous) g_totals.sequences_excluded += s;
  g_totals.outputs_compared += compare_rows(want, y1.data(), d, skip, what);
  for (int64_t t = 0; t < T; ++t)
    if ((c.L.padded(t) || !dec.selected[t]) && !skip[t]) {
      for (int64_t k = 0; k < d; ++k)
        ASSERT_EQ(y1[t * d + k], 0.0f) << what << " unselected token " << t;
    }
}

template <class Bank>
void run_any(const AnyRouter& a, Bank bank, const Case& c, const depth_ref::Decision& dec,
             const std::vector<double>& want, const std::string& what) {
  switch (a.which) {
    case Which::mod_capacity:
    case Which::mod_threshold:
    case Which::mod_aux:
      run_layer(MoDRouter(a.mod, a.w, a.aux), std::move(bank), c, dec, want, what);
      break;
    case Which::gamma_capacity:
    case Which::gamma_prefill:
      run_layer(GammaModRouter(a.gamma, a.w), std::move(bank), c, dec, want, what);
      break;
    default:
      run_layer(TokenPruneRouter(a.ftp, a.w), std::move(bank), c, dec, want, what);
      break;
  }
}

TEST(DepthLayer, EveryRouterWithFfnAndAttentionBlocks) {
  Rng rng(0x1A7E5);
  const Which all[] = {Which::mod_capacity,   Which::mod_threshold, Which::mod_aux,
                       Which::gamma_capacity, Which::gamma_prefill, Which::ftp_tau,
                       Which::ftp_sparsity};
  double ffn_norm = 0, att_norm = 0;
  for (Which which : all) {
    for (int i = 0; i < 14; ++i) {
      Case c = random_case(rng, 130, 32);
      const int64_t d = c.L.hidden;
      const AnyRouter a = random_router(rng, which, d);
      const depth_ref::Decision dec = reference_decision(a, c);
      const std::string what =
          "router " + std::to_string(static_cast<int>(which)) + " case " + std::to_string(i);

      const auto fref = random_ffn(rng, d, rng.integer(1, 48));
      const auto want_f = depth_ref::layer_ffn(c.L, c.x.data(), dec, fref);
      ffn_norm += max_abs(want_f);
      run_any(a, FunctorBank<FfnBlock>({make_ffn(fref)}), c, dec, want_f, what + " ffn");

      const auto aref = random_attention(rng, d);
      const auto want_a = depth_ref::layer_attention(c.L, c.x.data(), dec, aref);
      att_norm += max_abs(want_a);
      run_any(a, FunctorBank<CausalAttentionBlock>({make_attention(aref)}), c, dec, want_a,
              what + " attention");
    }
  }
  EXPECT_GT(ffn_norm, 0.0);  // no vacuous pass
  EXPECT_GT(att_norm, 0.0);
}

TEST(DepthLayer, AttentionSeesOnlySelectedTokensAcrossRowBlocks) {
  // More selected tokens than the layer's row block: the whole_blocks block still gets one call.
  Rng rng(8);
  Case c;
  c.L.tokens = 400;
  c.L.hidden = 8;
  c.L.offsets = {0, 150, 400};
  c.L.padding.assign(400, 0);
  for (int64_t t = 0; t < 400; t += 7) c.L.padding[t] = 1;
  c.x = rng.vec(400 * 8, 1.0);
  AnyRouter a;
  a.which = Which::mod_capacity;
  a.mod = {.hidden = 8, .ratio = 0.75, .activation = DepthActivation::sigmoid};
  a.w = router_weight(rng, 1, 8, 2.0);
  const auto dec = reference_decision(a, c);
  const auto aref = random_attention(rng, 8);
  const auto want = depth_ref::layer_attention(c.L, c.x.data(), dec, aref);
  ASSERT_GT(max_abs(want), 0.0);
  run_any(a, FunctorBank<CausalAttentionBlock>({make_attention(aref)}), c, dec, want,
          "large attention");
}

TEST(DepthLayer, EmptyBatchAndAllPadding) {
  Rng rng(9);
  const int64_t d = 4;
  MoDRouter r({.hidden = d}, router_weight(rng, 1, d, 1.0));
  RoutingPlan plan;
  RouterScratch s;
  r.route(Batch::single(0, d), nullptr, plan, s);
  EXPECT_EQ(plan.num_tokens(), 0);
  EXPECT_TRUE(plan.finalized());
  const std::vector<uint8_t> pad(5, 1);
  const auto x = rng.vec(5 * d, 1.0);
  Batch b = Batch::single(5, d);
  b.padding = pad;
  for (int mode = 0; mode < 3; ++mode) {
    moekit::SparseLayer layer(
        GammaModRouter({.hidden = d, .phase = static_cast<GammaModPhase>(mode)},
                       router_weight(rng, 2, d, 1.0)),
        FunctorBank<CausalAttentionBlock>({make_attention(random_attention(rng, d))}));
    std::vector<float> y(5 * d, 3.0f);
    moekit::Workspace ws;
    layer.forward(b, x.data(), y.data(), ws);
    EXPECT_EQ(ws.plan.num_kept(), 0);
    for (float v : y) EXPECT_EQ(v, 0.0f);
  }
}

// ------------------------------------------------------------------------ errors

TEST(DepthErrors, BadOptionsAndInputsThrowNamingTheArgument) {
  const int64_t d = 4;
  const std::vector<float> w(d, 0.1f), w2(2 * d, 0.1f);
  expect_error([&] { MoDRouter({.hidden = 0}, w); }, "hidden size (d) expected >= 1, got 0");
  expect_error([&] { MoDRouter({.hidden = d, .ratio = 1.5}, w); },
               "ratio expected in [0, 1], got 1.5");
  expect_error([&] { MoDRouter({.hidden = d, .ratio = std::nan("")}, w); }, "ratio");
  expect_error([&] { MoDRouter({.hidden = d, .threshold = 1.0}, w); },
               "threshold expected in (0, 1)");
  expect_error([&] { MoDRouter({.hidden = d}, w2); },
               "router.weight expected [1, 4] = 4 values, got 8");
  expect_error([&] { MoDRouter({.hidden = d, .mode = MoDMode::aux_predictor}, w); },
               "router.aux.weight");
  expect_error([&] { MoDRouter({.hidden = d}, w, w); },
               "router.aux.weight expected only with mode aux_predictor");
  std::vector<float> wn = w;
  wn[2] = std::numeric_limits<float>::infinity();
  expect_error([&] { MoDRouter({.hidden = d}, wn); }, "router.weight[0, 2] expected finite");
  expect_error([&] { GammaModRouter({.hidden = d}, w); }, "router.weight expected [2, 4]");
  expect_error([&] { GammaModRouter({.hidden = d, .prefill_threshold = 0.0}, w2); },
               "prefill_threshold");
  expect_error([&] { GammaModRouter({.hidden = d, .decode_threshold = 2.0}, w2); },
               "decode_threshold");
  expect_error([&] { GammaModRouter({.hidden = d, .ratio = -0.1}, w2); }, "ratio");
  expect_error([&] { TokenPruneRouter({.hidden = d, .tau = 0.0}, w); }, "tau expected in (0, 1)");
  expect_error([&] { TokenPruneRouter({.hidden = d, .sparsity = 1.2}, w); },
               "sparsity expected in [0, 1], got 1.2");

  // NaN in the hidden states: an error naming the token, for every router.
  std::vector<float> x(3 * d, 0.5f);
  x[1 * d + 2] = std::nanf("");
  RoutingPlan plan;
  RouterScratch s;
  const Batch b = Batch::single(3, d);
  expect_error([&] { MoDRouter({.hidden = d}, w).route(b, x.data(), plan, s); },
               "of token 1 expected finite");
  expect_error([&] { GammaModRouter({.hidden = d}, w2).route(b, x.data(), plan, s); },
               "of token 1 expected finite");
  expect_error([&] { TokenPruneRouter({.hidden = d}, w).route(b, x.data(), plan, s); },
               "of token 1 expected finite");
  // ... but not in a padded row.
  const std::vector<uint8_t> pad{0, 1, 0};
  Batch bp = b;
  bp.padding = pad;
  MoDRouter({.hidden = d}, w).route(bp, x.data(), plan, s);
  EXPECT_EQ(plan.slots_of(1), 0);
  // Wrong width.
  expect_error(
      [&] { MoDRouter({.hidden = d}, w).route(Batch::single(3, d + 1), x.data(), plan, s); },
      "Batch.hidden");
  // Blocks.
  expect_error([&] { CausalAttentionBlock(d, w, w2, w2, w2); },
               "wq expected [4, 4] = 16 values, got 4");
  std::vector<float> big(d * d, 0.1f);
  const CausalAttentionBlock blk(d, big, big, big, big);
  std::vector<float> in(2 * d, 0.1f), out(2 * d), sc(blk.scratch_floats(2));
  const std::vector<int32_t> toks{0};
  expect_error(
      [&] {
        blk(in.data(), 2, out.data(), sc.data(), moekit::BlockContext{&b, toks});
      },
      "ctx.tokens expected 2");
  expect_error([&] { FfnBlock(moekit::FfnBank(2, {.hidden = d, .intermediate = 3})); },
               "bank expected 1 expert, got 2");
}

}  // namespace

// gamma-MoD's official routed decoder layer (Gamma-MOD llava_llama_mod.py,
// MoDLlamaDecoderLayer_forward_inference at 5de27f2), transcribed in double per sequence: the
// router reads input_layernorm(x); selected tokens (p > threshold, prefill) run
// h = x + attn(ln1 x) among themselves (causal), y = h + p * mlp(ln2 h); the others y = x.
// moekit: GammaModRouter with set_input_norm + GammaModBlock (only the MLP weighted by p).
TEST(GammaMod, OfficialDecoderLayerWeightsOnlyTheMlp) {
  Rng rng(2026);
  int compared = 0, weighted = 0;
  for (int trial = 0; trial < 6; ++trial) {
    const int64_t d = rng.integer(4, 24), f = rng.integer(4, 40);
    Case c;
    c.L.tokens = rng.integer(6, 40);
    c.L.hidden = d;
    const int64_t T = c.L.tokens, cut = rng.integer(1, T - 1);
    c.L.offsets = {0, static_cast<int32_t>(cut), static_cast<int32_t>(T)};
    c.x = rng.vec(T * d, 1.5);
    const auto ffn = random_ffn(rng, d, f);
    const auto att = random_attention(rng, d);
    std::vector<float> ln1 = rng.vec(d, 0.5), ln2 = rng.vec(d, 0.5);
    for (float& v : ln1) v += 1.0f;
    for (float& v : ln2) v += 1.0f;
    const auto wr = rng.vec(2 * d, 0.8);
    const double eps = 1e-5, threshold = 0.45;
    // Reference.
    auto rms = [&](const float* x, const std::vector<float>& g) {
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += double(x[i]) * x[i];
      const double inv = 1.0 / std::sqrt(ss / d + eps);
      std::vector<float> o(d);
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<float>(g[i] * (x[i] * inv));
      return o;
    };
    std::vector<double> want(c.x.begin(), c.x.end());
    std::vector<double> p(T);
    for (int64_t s = 0; s < 2; ++s) {
      const int64_t b = c.L.offsets[s], e = c.L.offsets[s + 1];
      std::vector<int64_t> sel, pos;
      std::vector<float> n1;
      for (int64_t t = b; t < e; ++t) {
        const auto n = rms(c.x.data() + t * d, ln1);
        double l0 = 0, l1 = 0;
        for (int64_t i = 0; i < d; ++i) l0 += wr[i] * double(n[i]), l1 += wr[d + i] * double(n[i]);
        p[t] = 1.0 / (1.0 + std::exp(l0 - l1));  // softmax(logits)[1]
        if (p[t] > threshold) {
          sel.push_back(t);
          pos.push_back(t - b);
          n1.insert(n1.end(), n.begin(), n.end());
        }
      }
      if (sel.empty()) continue;
      const auto a = depth_ref::attention(att, n1.data(), static_cast<int64_t>(sel.size()), pos);
      for (size_t r = 0; r < sel.size(); ++r) {
        const int64_t t = sel[r];
        std::vector<float> h(d);
        for (int64_t i = 0; i < d; ++i) h[i] = static_cast<float>(c.x[t * d + i] + a[r * d + i]);
        const auto m = depth_ref::ffn_row(ffn, rms(h.data(), ln2).data());
        for (int64_t i = 0; i < d; ++i) want[t * d + i] = double(h[i]) + p[t] * m[i];
      }
    }
    // moekit.
    GammaModOptions o;
    o.hidden = d;
    o.phase = GammaModPhase::prefill;
    o.prefill_threshold = threshold;
    o.rms_norm_eps = eps;
    GammaModRouter router(o, wr);
    router.set_input_norm(ln1);
    std::vector<moekit::GammaModBlock> blocks;
    blocks.emplace_back(ln1, make_attention(att), ln2, make_ffn(ffn), eps);
    moekit::SparseLayer<GammaModRouter, FunctorBank<moekit::GammaModBlock>> layer(std::move(router),
                                                                                 FunctorBank(std::move(blocks)));
    for (int threads : {1, 2}) {
      std::vector<float> y(T * d);
      moekit::Workspace ws;
      layer.forward(c.batch(), c.x.data(), y.data(), ws, threads);
      std::vector<uint8_t> skip_near(T, 0);
      for (int64_t t = 0; t < T; ++t) {
        skip_near[t] = std::fabs(p[t] - threshold) < 1e-5;  // a rounding could flip it
        ASSERT_NEAR(ws.router.values[t], p[t], 1e-5) << "router p with the input norm, token " << t;
        for (int64_t i = 0; i < d; ++i) y[t * d + i] += c.x[t * d + i];  // the layer returns the delta
        weighted += !skip_near[t] && p[t] > threshold && p[t] < 0.99;
      }
      // A sequence holding a near-tie changes the others' attention: skip it whole.
      for (int64_t s = 0; s < 2; ++s) {
        bool near = false;
        for (int64_t t = c.L.offsets[s]; t < c.L.offsets[s + 1]; ++t) near |= skip_near[t] != 0;
        for (int64_t t = c.L.offsets[s]; near && t < c.L.offsets[s + 1]; ++t) skip_near[t] = 1;
      }
      compared += compare_rows(want, y.data(), d, skip_near, "gamma-MoD official layer", 2e-4, 2e-5);
    }
  }
  EXPECT_GT(compared, 60);
  EXPECT_GT(weighted, 20) << "too few tokens with 0 < p < 1: the MLP-only weighting was not exercised";
}

// FTP's feature router (moekit's reading of arXiv 2412.11494: position, attention score, its
// rank and the block's sparsity through a [4 -> h -> 1] ReLU MLP), against a transcription in
// double over random batches with padding, several sequences, tied scores and both decision
// modes.
TEST(TokenPrune, FeatureRouterMatchesReference) {
  Rng rng(77);
  int decided = 0, sparsity_trials = 0;
  for (int trial = 0; trial < 40; ++trial) {
    int near = 0;  // near-ties of the top-C order in this trial
    Case c = random_case(rng, 60, 8);
    const int64_t T = c.L.tokens, h = rng.integer(1, 16);
    const moekit::Batch probe = c.batch();
    std::vector<float> scores(T);
    for (float& v : scores) v = static_cast<float>(rng.integer(0, 6)) * 0.125f;  // ties on purpose
    TokenPruneOptions o;
    o.hidden = c.L.hidden;
    o.input = moekit::TokenPruneInput::features;
    o.feature_hidden = h;
    if (trial % 2) o.sparsity = rng.uniform(0.0, 1.0);
    else o.feature_sparsity = rng.uniform(0.0, 1.0);
    const auto w1 = rng.vec(h * 4, 1.0), b1 = rng.vec(h, 0.5), w2 = rng.vec(h, 1.0), b2 = rng.vec(1, 0.2);
    const TokenPruneRouter router(o, w1, b1, w2, b2);
    moekit::Batch b = probe;
    b.token_scores = scores;
    RoutingPlan plan;
    RouterScratch sc;
    router.route(b, c.x.data(), plan, sc, 2);
    // Reference: features and logits per sequence, then the decision.
    std::vector<double> z(T, 0.0);
    std::vector<uint8_t> want(T, 0);
    for (int64_t s = 0; s < b.num_sequences(); ++s) {
      std::vector<int64_t> toks;
      for (int64_t t = b.sequence_begin(s); t < b.sequence_end(s); ++t)
        if (!b.is_padding(t)) toks.push_back(t);
      const int64_t S = static_cast<int64_t>(toks.size());
      const double span = std::max<int64_t>(S - 1, 1);
      for (int64_t i = 0; i < S; ++i) {
        int64_t rank = 0;
        for (int64_t j = 0; j < S; ++j)
          rank += scores[toks[j]] > scores[toks[i]] || (scores[toks[j]] == scores[toks[i]] && j < i);
        const double f[4] = {i / span, scores[toks[i]], rank / span, o.block_sparsity()};
        double zz = b2[0];
        for (int64_t u = 0; u < h; ++u) {
          double v = b1[u];
          for (int k = 0; k < 4; ++k) v += w1[u * 4 + k] * f[k];
          zz += w2[u] * std::max(v, 0.0);
        }
        z[toks[i]] = zz;
        EXPECT_NEAR(sc.logits[toks[i]], zz, 1e-5 * (1 + std::fabs(zz))) << "trial " << trial << " token " << toks[i];
      }
      if (o.sparsity) {  // top ceil((1 - sparsity) S) by z, ties to the lower token
        const int64_t C = moekit::depth_capacity(1.0 - *o.sparsity, S);
        std::vector<int64_t> ord = toks;
        std::stable_sort(ord.begin(), ord.end(), [&](int64_t a, int64_t bb) { return z[a] > z[bb]; });
        for (int64_t r = 0; r < C && r < S; ++r) want[ord[r]] = 1;
        for (int64_t r = 1; r < S; ++r) near += std::fabs(z[ord[r]] - z[ord[r - 1]]) < 1e-5;
      } else {
        for (int64_t t : toks) want[t] = 1.0 / (1.0 + std::exp(-z[t])) > o.tau;
      }
    }
    std::vector<uint8_t> sel(T);
    moekit::depth_selected(plan, sel);
    for (int64_t t = 0; t < T; ++t) {
      if (std::fabs(z[t]) < 1e-5 && !o.sparsity) continue;  // at the threshold: rounding decides
      if (o.sparsity && near) continue;
      EXPECT_EQ(sel[t], want[t]) << "trial " << trial << " token " << t;
      ++decided;
      sparsity_trials += o.sparsity && t == 0;
    }
  }
  EXPECT_GT(decided, 400);
  EXPECT_GT(sparsity_trials, 5) << "the top-C mode was hardly compared";
  // Without token_scores the feature router names what it needs.
  TokenPruneOptions o;
  o.hidden = 4;
  o.input = moekit::TokenPruneInput::features;
  o.feature_hidden = 2;
  const TokenPruneRouter r(o, std::vector<float>(8, 0.1f), std::vector<float>(2), std::vector<float>(2, 1.0f),
                           std::vector<float>(1));
  RoutingPlan plan;
  RouterScratch sc;
  std::vector<float> x(12, 1.0f);
  try {
    r.route(moekit::Batch::single(3, 4), x.data(), plan, sc);
    ADD_FAILURE() << "no error without token_scores";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find("token_scores"), std::string::npos) << e.what();
  }
}
