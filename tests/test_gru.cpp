// SPDX-License-Identifier: Apache-2.0
// Layerwise recurrent (GRU / RNN) router, RMoE (ROUTING.md section 4), against the
// double-precision reference in tests/reference/gru_ref: random shapes with fixed seeds, both
// cell variants, batched vs single-token calls, zero / explicit / in-place state, padding,
// a 3-layer stack through SparseLayer, thread determinism and argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/layer.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/gru.hpp"
#include "moekit/routing_plan.hpp"
#include "reference/gru_ref.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Batch;
using moekit::FfnBank;
using moekit::FfnShape;
using moekit::GruCell;
using moekit::GruRouter;
using moekit::GruRouterOptions;
using moekit::GruVariant;
using moekit::RouterScratch;
using moekit::RoutingPlan;
using moekit::Workspace;
using GruLayer = moekit::SparseLayer<GruRouter, FfnBank>;

constexpr double kStateRel = 1e-4;   // relative tolerance on states and logits
constexpr double kFloorFrac = 1e-5;  // absolute floor: fraction of max |reference|
constexpr double kOutRel = 1e-4;     // relative tolerance on layer outputs

// ------------------------------------------------------------------------ helpers

using test_support::Rng;

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& m : v) s += "\n  " + m;
  return s;
}

// One cell's weights for the library and the reference.
struct CellWeights {
  GruVariant variant = GruVariant::gru;
  int64_t d_r = 0;
  std::vector<float> w_ih, w_hh, b_ih, b_hh;

  std::shared_ptr<const GruCell> make() const {
    return std::make_shared<const GruCell>(variant, d_r, w_ih, w_hh, b_ih, b_hh);
  }
  ref::gru::Cell ref() const {
    return {variant == GruVariant::gru ? ref::gru::Variant::gru : ref::gru::Variant::rnn,
            d_r,
            w_ih,
            w_hh,
            b_ih,
            b_hh};
  }
};

// Uniform weights of scale `gain / sqrt(d_r)` (torch's GRUCell init is U(+-1/sqrt(d_r))).
CellWeights random_cell(Rng& rng, GruVariant v, int64_t d_r, double gain = 1.5) {
  CellWeights c;
  c.variant = v;
  c.d_r = d_r;
  const auto rows = static_cast<size_t>((v == GruVariant::gru ? 3 : 1) * d_r);
  const double a = gain / std::sqrt(static_cast<double>(d_r));
  c.w_ih = rng.vec(rows * static_cast<size_t>(d_r), a);
  c.w_hh = rng.vec(rows * static_cast<size_t>(d_r), a);
  c.b_ih = rng.vec(rows, a);
  c.b_hh = rng.vec(rows, a);
  return c;
}

// One layer's router weights.
struct RouterWeights {
  GruRouterOptions opt;
  std::vector<float> proj, out;

  GruRouter make(std::shared_ptr<const GruCell> cell) const {
    return GruRouter(opt, std::move(cell), proj, out);
  }
  ref::gru::Router ref() const { return {opt.num_experts, opt.k, opt.hidden, proj, out}; }
};

RouterWeights random_router(Rng& rng, int64_t E, int64_t k, int64_t d, int64_t d_r, GruVariant v,
                            double logit_std) {
  RouterWeights r;
  r.opt = {.num_experts = E, .k = k, .hidden = d, .d_r = d_r, .variant = v};
  r.proj = rng.vec(static_cast<size_t>(d_r * d), 2.0 * std::sqrt(3.0 / static_cast<double>(d)));
  // h is in (-1, 1) with spread ~0.5: scale the output so logits have std ~logit_std.
  r.out =
      rng.vec(static_cast<size_t>(E * d_r), logit_std * 3.0 / std::sqrt(static_cast<double>(d_r)));
  return r;
}

// One routing problem: a router, its cell, the hidden states, an input state and a layout.
struct Case {
  CellWeights cell;
  RouterWeights router;
  int64_t T = 0;
  std::vector<float> x, state;  // state empty: zeros
  std::vector<uint8_t> pad;
  std::vector<int32_t> offsets;

  Batch batch() const {
    Batch b = Batch::single(T, router.opt.hidden);
    b.padding = pad;
    b.sequence_offsets = offsets;
    b.router_state = state;
    return b;
  }
  const uint8_t* pad_ptr() const { return pad.empty() ? nullptr : pad.data(); }
  std::string describe() const {
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  "T=%lld E=%lld k=%lld d=%lld d_r=%lld %s state=%s padded=%d seqs=%zu",
                  (long long)T, (long long)router.opt.num_experts, (long long)router.opt.k,
                  (long long)router.opt.hidden, (long long)cell.d_r,
                  GruRouter::variant_name(cell.variant), state.empty() ? "zeros" : "given",
                  !pad.empty(), offsets.empty() ? size_t{1} : offsets.size() - 1);
    return buf;
  }
};

Case random_case(Rng& rng, GruVariant v, int64_t max_T = 60) {
  Case c;
  const int64_t E = rng.integer(1, 40);
  const int64_t k = rng.integer(1, std::min<int64_t>(E, rng.coin(0.7) ? 8 : E));
  const int64_t d = rng.coin(0.2) ? rng.integer(1, 8) : rng.integer(1, 96);
  const int64_t d_r = rng.coin(0.2) ? rng.integer(1, 8) : rng.integer(1, 72);
  c.cell = random_cell(rng, v, d_r, rng.uniform(0.5, 3.0));
  c.router = random_router(rng, E, k, d, d_r, v, rng.uniform(0.5, 4.0));
  c.T = rng.integer(0, max_T);
  c.x = rng.vec(static_cast<size_t>(c.T * d), 1.0);
  if (rng.coin(0.6)) c.state = rng.vec(static_cast<size_t>(c.T * d_r), 1.0);
  if (c.T > 0 && rng.coin(0.4)) {
    const int64_t S = rng.integer(1, std::min<int64_t>(c.T, 5));
    std::vector<int32_t> cuts{0, static_cast<int32_t>(c.T)};
    for (int64_t s = 1; s < S; ++s) cuts.push_back(static_cast<int32_t>(rng.integer(0, c.T)));
    std::sort(cuts.begin(), cuts.end());
    c.offsets = cuts;
  }
  if (rng.coin(0.3)) {
    c.pad.assign(static_cast<size_t>(c.T), 0);
    const double rate = rng.uniform(0.05, 0.6);
    for (uint8_t& p : c.pad) p = rng.coin(rate);
  }
  return c;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// Near-tie bookkeeping over the whole file (printed once at the end).
struct Totals {
  int64_t cases = 0, compared = 0, near_tie = 0, stack_compared = 0, stack_near_tie = 0;
};
Totals g_totals;

class TotalsPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    std::printf(
        "[ gru ref ] single-layer cases: %lld, tokens compared exactly: %lld, excluded as "
        "near-ties: %lld; "
        "stack token-layers compared: %lld, excluded (near-tie here or in an earlier layer): "
        "%lld\n",
        (long long)g_totals.cases, (long long)g_totals.compared, (long long)g_totals.near_tie,
        (long long)g_totals.stack_compared, (long long)g_totals.stack_near_tie);
  }
};
[[maybe_unused]] ::testing::Environment* const g_env =
    ::testing::AddGlobalTestEnvironment(new TotalsPrinter);

struct Routed {
  RoutingPlan plan;
  RouterScratch scratch;
};

Routed run(const GruRouter& r, const Batch& b, const float* x, int threads) {
  Routed out;
  r.route(b, x, out.plan, out.scratch, threads);
  return out;
}

// Bitwise equality of n floats (memcmp needs non-null pointers, even for n = 0).
bool same_bits(const float* a, const float* b, size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(float)) == 0;
}

// Same plan (token side, expert side) bit for bit.
void expect_same_plan(const RoutingPlan& a, const RoutingPlan& b, const char* what) {
  const ref::PlanView va = ref::view_of(a), vb = ref::view_of(b);
  EXPECT_EQ(va.slot_offsets, vb.slot_offsets) << what;
  EXPECT_EQ(va.slot_expert, vb.slot_expert) << what;
  EXPECT_EQ(va.slot_dropped, vb.slot_dropped) << what;
  EXPECT_EQ(va.expert_offsets, vb.expert_offsets) << what;
  EXPECT_EQ(va.expert_tokens, vb.expert_tokens) << what;
  ASSERT_EQ(va.slot_weight.size(), vb.slot_weight.size()) << what;
  EXPECT_TRUE(same_bits(va.slot_weight.data(), vb.slot_weight.data(), va.slot_weight.size()))
      << what;
}

void expect_bitwise(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_TRUE(same_bits(a.data(), b.data(), a.size())) << what;
}

// Routes a case with the library (threads 1 and 2) and the reference; checks plan invariants,
// choices (near-ties excluded), weights, the new state, the logits and thread determinism.
ref::CompareReport check_case(const Case& c) {
  SCOPED_TRACE(c.describe());
  const auto cell = c.cell.make();
  const GruRouter router = c.router.make(cell);
  const Batch b = c.batch();
  const Routed got = run(router, b, c.x.data(), 1);
  const ref::PlanView view = ref::view_of(got.plan);
  const auto inv = ref::plan_invariant_errors(view, c.pad_ptr(), c.router.opt.k);
  EXPECT_TRUE(inv.empty()) << "plan invariants:" << join(inv);

  const ref::gru::RouteResult want = ref::gru::route(c.cell.ref(), c.router.ref(), to_double(c.x),
                                                     c.T, to_double(c.state), c.pad_ptr());
  ref::CompareReport rep = ref::compare_routing(want.routing, view);
  EXPECT_TRUE(rep.errors.empty()) << "routing differs from the reference:" << join(rep.errors);
  const int64_t dr = c.cell.d_r;
  EXPECT_EQ(got.scratch.state.size(), static_cast<size_t>(c.T * dr));
  if (got.scratch.state.size() == want.state.size()) {
    const auto errs =
        ref::compare_values(want.state, got.scratch.state.data(), dr, kStateRel, kFloorFrac);
    EXPECT_TRUE(errs.empty()) << "state differs from the reference:" << join(errs);
  }
  if (got.scratch.logits.size() == want.logits.size()) {
    const auto errs = ref::compare_values(want.logits, got.scratch.logits.data(),
                                          c.router.opt.num_experts, kStateRel, kFloorFrac);
    EXPECT_TRUE(errs.empty()) << "logits differ from the reference:" << join(errs);
  }
  // Padded tokens: state passes through bit for bit (zeros when the state was empty).
  for (int64_t t = 0; t < c.T; ++t) {
    if (c.pad.empty() || !c.pad[static_cast<size_t>(t)]) continue;
    for (int64_t i = 0; i < dr; ++i) {
      const float want_h = c.state.empty() ? 0.0f : c.state[static_cast<size_t>(t * dr + i)];
      EXPECT_EQ(got.scratch.state[static_cast<size_t>(t * dr + i)], want_h) << "padded token " << t;
    }
  }
  const Routed two = run(router, b, c.x.data(), 2);
  expect_same_plan(got.plan, two.plan, "threads 1 vs 2");
  expect_bitwise(got.scratch.state, two.scratch.state, "state, threads 1 vs 2");
  ++g_totals.cases;
  g_totals.compared += rep.compared;
  g_totals.near_tie += rep.near_tie;
  return rep;
}

void run_random(uint64_t seed, int cases, GruVariant v, double p_other = 0.0) {
  Rng rng(seed);
  int64_t compared = 0, excluded = 0, routed = 0;
  double max_state = 0;
  for (int i = 0; i < cases; ++i) {
    const GruVariant vi =
        rng.coin(p_other) ? (v == GruVariant::gru ? GruVariant::rnn : GruVariant::gru) : v;
    const Case c = random_case(rng, vi);
    const ref::CompareReport rep = check_case(c);
    compared += rep.compared;
    excluded += rep.near_tie;
    routed += rep.compared + rep.near_tie;
    const ref::gru::RouteResult want = ref::gru::route(c.cell.ref(), c.router.ref(), to_double(c.x),
                                                       c.T, to_double(c.state), c.pad_ptr());
    max_state = std::max(max_state, ref::max_abs(want.state));
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_GT(compared, routed / 2) << "most tokens must be compared exactly";
  EXPECT_LE(excluded * 100, routed) << "near-tie exclusions must stay below 1%";
  EXPECT_GT(max_state, 0.0) << "vacuous: the reference state is all zero";
}

// ------------------------------------------------------------------------ single layer

TEST(GruRouter, RandomCasesMatchReference) { run_random(0x6e0001, 250, GruVariant::gru, 0.2); }

TEST(GruRouter, RnnVariantMatchesReference) {
  run_random(0x6e0002, 120, GruVariant::rnn);
  // The rnn cell ignores the gates: check one step by hand, h = tanh(W_in x + b_in + W_hn h +
  // b_hn).
  const CellWeights cw{
      GruVariant::rnn, 2, {1.0f, 0.0f, 0.0f, 1.0f}, {0.5f, 0.0f, 0.0f, -0.5f}, {0.1f, 0.2f},
      {0.0f, -0.1f}};
  const auto cell = cw.make();
  EXPECT_EQ(cell->gates(), 1);
  float h[2];
  std::vector<float> scratch(cell->scratch_floats(1));
  const float x[2] = {0.3f, -0.2f}, hp[2] = {0.4f, 0.6f};
  cell->step(1, x, 2, hp, 2, h, 2, scratch.data());
  EXPECT_NEAR(h[0], std::tanh(0.3 + 0.1 + 0.2 + 0.0), 1e-6);
  EXPECT_NEAR(h[1], std::tanh(-0.2 + 0.2 - 0.3 - 0.1), 1e-6);
}

TEST(GruRouter, GruCellMatchesTorchEquationsByHand) {
  // d_r = 1: r, z, n rows 0, 1, 2 of the stacked weights (torch.nn.GRUCell order).
  // Values exact in binary, so the float weights are exactly the double ones below.
  const CellWeights cw{GruVariant::gru,         1,
                       {0.5f, -1.0f, 2.0f},     {1.5f, 0.25f, -0.75f},
                       {0.125f, 0.25f, 0.375f}, {-0.125f, 0.0625f, 0.5f}};
  const auto cell = cw.make();
  const float x = 0.75f, hp = -0.375f;
  float h;
  std::vector<float> scratch(cell->scratch_floats(1));
  cell->step(1, &x, 1, &hp, 1, &h, 1, scratch.data());
  auto sig = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  const double r = sig(0.5 * 0.75 + 0.125 + 1.5 * -0.375 - 0.125);
  const double z = sig(-1.0 * 0.75 + 0.25 + 0.25 * -0.375 + 0.0625);
  const double n = std::tanh(2.0 * 0.75 + 0.375 + r * (-0.75 * -0.375 + 0.5));
  const double want = (1 - z) * n + z * -0.375;
  EXPECT_NEAR(h, want, 1e-6);
  EXPECT_NEAR(ref::gru::cell_step(cw.ref(), {0.75}, {-0.375})[0], want, 1e-14);
  // Zero state (null): h = (1 - z) n with the h-side terms reduced to their biases.
  cell->step(1, &x, 1, nullptr, 1, &h, 1, scratch.data());
  const double r0 = sig(0.5 * 0.75 + 0.125 - 0.125), z0 = sig(-0.75 + 0.25 + 0.0625);
  EXPECT_NEAR(h, (1 - z0) * std::tanh(1.5 + 0.375 + r0 * 0.5), 1e-6);
}

TEST(GruRouter, BatchEqualsSingleTokenCalls) {
  Rng rng(0x6e0003);
  for (GruVariant v : {GruVariant::gru, GruVariant::rnn}) {
    for (int rep = 0; rep < 3; ++rep) {
      Case c = random_case(rng, v, 80);
      c.T = 37;
      c.x = rng.vec(static_cast<size_t>(c.T * c.router.opt.hidden), 1.0);
      if (rep != 0)
        c.state = rng.vec(static_cast<size_t>(c.T * c.cell.d_r), 1.0);
      else
        c.state.clear();
      c.pad.clear();
      c.offsets.clear();
      SCOPED_TRACE(c.describe());
      const GruRouter router = c.router.make(c.cell.make());
      const int64_t d = c.router.opt.hidden, dr = c.cell.d_r, k = c.router.opt.k;
      const Routed all = run(router, c.batch(), c.x.data(), 2);
      for (int64_t t = 0; t < c.T; ++t) {
        Batch one = Batch::single(1, d);
        if (!c.state.empty())
          one.router_state =
              std::span<const float>(c.state.data() + t * dr, static_cast<size_t>(dr));
        const Routed single = run(router, one, c.x.data() + t * d, 1);
        ASSERT_EQ(single.plan.slots_of(0), k);
        for (int64_t j = 0; j < k; ++j) {
          const auto s = static_cast<size_t>(t * k + j);
          EXPECT_EQ(single.plan.slot_expert()[static_cast<size_t>(j)], all.plan.slot_expert()[s])
              << "token " << t;
          EXPECT_NEAR(single.plan.slot_weight()[static_cast<size_t>(j)], all.plan.slot_weight()[s],
                      1e-6 * std::fabs(all.plan.slot_weight()[s]))
              << "token " << t;
        }
        EXPECT_TRUE(same_bits(single.scratch.state.data(), all.scratch.state.data() + t * dr,
                              static_cast<size_t>(dr)))
            << "state of token " << t << " differs between the batched and the single-token call";
      }
    }
  }
}

TEST(GruRouter, EmptyStateEqualsExplicitZeros) {
  Rng rng(0x6e0004);
  for (GruVariant v : {GruVariant::gru, GruVariant::rnn}) {
    for (int rep = 0; rep < 4; ++rep) {
      Case c = random_case(rng, v);
      c.T = std::max<int64_t>(c.T, 5);
      c.x = rng.vec(static_cast<size_t>(c.T * c.router.opt.hidden), 1.0);
      c.pad.clear();
      if (rep % 2) {
        c.pad.assign(static_cast<size_t>(c.T), 0);
        c.pad[1] = 1;
      }
      c.offsets.clear();
      SCOPED_TRACE(c.describe());
      const GruRouter router = c.router.make(c.cell.make());
      c.state.clear();
      const Routed empty = run(router, c.batch(), c.x.data(), 2);
      c.state.assign(static_cast<size_t>(c.T * c.cell.d_r), 0.0f);
      const Routed zeros = run(router, c.batch(), c.x.data(), 2);
      expect_same_plan(empty.plan, zeros.plan, "empty vs explicit zero state");
      expect_bitwise(empty.scratch.state, zeros.scratch.state,
                     "new state, empty vs explicit zeros");
      expect_bitwise(empty.scratch.logits, zeros.scratch.logits, "logits, empty vs explicit zeros");
    }
  }
}

TEST(GruRouter, InPlaceStateThreading) {
  // batch.router_state may be the scratch's own state from the previous call.
  Rng rng(0x6e0005);
  const CellWeights cw = random_cell(rng, GruVariant::gru, 24);
  const auto cell = cw.make();
  const int64_t d = 40, T = 33;
  std::vector<RouterWeights> layers;
  for (int l = 0; l < 3; ++l)
    layers.push_back(random_router(rng, 12, 3, d, 24, GruVariant::gru, 2.0));
  const std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 1.0);
  std::vector<uint8_t> pad(static_cast<size_t>(T), 0);
  pad[4] = pad[20] = 1;

  RouterScratch shared_scratch;  // one scratch, state threaded in place
  std::vector<float> state;      // separate copies
  RoutingPlan p1, p2;
  for (const RouterWeights& rw : layers) {
    const GruRouter r = rw.make(cell);
    Batch b = Batch::single(T, d);
    b.padding = pad;
    Batch b_inplace = b;
    b.router_state = state;
    b_inplace.router_state = shared_scratch.state;
    RouterScratch s;
    r.route(b, x.data(), p1, s, 2);
    r.route(b_inplace, x.data(), p2, shared_scratch, 2);
    expect_same_plan(p1, p2, "in-place vs copied state");
    expect_bitwise(s.state, shared_scratch.state, "in-place vs copied state");
    state = s.state;
  }
}

TEST(GruRouter, PaddedTokensKeepStateAndGetNoSlot) {
  Rng rng(0x6e0006);
  Case c = random_case(rng, GruVariant::gru);
  c.T = 10;
  c.x = rng.vec(static_cast<size_t>(c.T * c.router.opt.hidden), 1.0);
  c.x[0] = std::numeric_limits<float>::quiet_NaN();  // padded rows are never read
  c.pad.assign(10, 0);
  c.pad[0] = c.pad[3] = c.pad[9] = 1;
  c.offsets.clear();
  for (bool given : {false, true}) {
    if (given)
      c.state = rng.vec(static_cast<size_t>(c.T * c.cell.d_r), 1.0);
    else
      c.state.clear();
    check_case(c);
    const Routed got = run(c.router.make(c.cell.make()), c.batch(), c.x.data(), 2);
    for (int64_t t : {0, 3, 9}) EXPECT_EQ(got.plan.slots_of(t), 0) << "padded token " << t;
  }
  // All padded: no slots, state unchanged.
  c.pad.assign(10, 1);
  const Routed none = run(c.router.make(c.cell.make()), c.batch(), c.x.data(), 2);
  EXPECT_EQ(none.plan.num_slots(), 0);
  expect_bitwise(none.scratch.state, c.state, "all padded: state unchanged");
}

TEST(GruRouter, EdgeCases) {
  Rng rng(0x6e0007);
  // T = 0.
  {
    Case c = random_case(rng, GruVariant::gru);
    c.T = 0;
    c.x.clear();
    c.state.clear();
    c.pad.clear();
    c.offsets.clear();
    const Routed got = run(c.router.make(c.cell.make()), c.batch(), nullptr, 2);
    EXPECT_EQ(got.plan.num_tokens(), 0);
    EXPECT_TRUE(got.plan.finalized());
    EXPECT_TRUE(got.scratch.state.empty());
  }
  // E = 1, k = 1; k = E; d = 1; d_r = 1 (compared with the reference).
  for (auto [E, k, d, dr] :
       {std::array<int64_t, 4>{1, 1, 16, 8}, {6, 6, 16, 8}, {5, 2, 1, 8}, {7, 3, 12, 1}}) {
    Case c;
    c.cell = random_cell(rng, GruVariant::gru, dr);
    c.router = random_router(rng, E, k, d, dr, GruVariant::gru, 2.0);
    c.T = 19;
    c.x = rng.vec(static_cast<size_t>(c.T * d), 1.0);
    c.state = rng.vec(static_cast<size_t>(c.T * dr), 1.0);
    check_case(c);
    if (E == 1) {
      const Routed got = run(c.router.make(c.cell.make()), c.batch(), c.x.data(), 1);
      for (float w : got.plan.slot_weight()) EXPECT_EQ(w, 1.0f);
    }
  }
  // All-equal logits (zero output weight): ties to the lower expert id, weights 1/k.
  {
    Case c;
    c.cell = random_cell(rng, GruVariant::gru, 8);
    c.router = random_router(rng, 6, 3, 10, 8, GruVariant::gru, 2.0);
    std::fill(c.router.out.begin(), c.router.out.end(), 0.0f);
    c.T = 5;
    c.x = rng.vec(static_cast<size_t>(c.T * 10), 1.0);
    const Routed got = run(c.router.make(c.cell.make()), c.batch(), c.x.data(), 2);
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t j = 0; j < 3; ++j) {
        EXPECT_EQ(got.plan.slot_expert()[static_cast<size_t>(t * 3 + j)], j);
        EXPECT_NEAR(got.plan.slot_weight()[static_cast<size_t>(t * 3 + j)], 1.0 / 3.0, 1e-7);
      }
    ref::CompareOptions exact;
    exact.exclude_near_ties = false;
    const auto want =
        ref::gru::route(c.cell.ref(), c.router.ref(), to_double(c.x), c.T, {}, nullptr);
    const auto rep = ref::compare_routing(want.routing, ref::view_of(got.plan), exact);
    EXPECT_TRUE(rep.errors.empty()) << join(rep.errors);
  }
  // Saturated gates: huge (finite) router state and inputs still give finite, correct routing.
  {
    Case c;
    c.cell = random_cell(rng, GruVariant::gru, 16, 40.0);
    c.router = random_router(rng, 8, 2, 12, 16, GruVariant::gru, 3.0);
    c.T = 30;
    c.x = rng.vec(static_cast<size_t>(c.T * 12), 50.0);
    c.state = rng.vec(static_cast<size_t>(c.T * 16), 5.0);
    check_case(c);
  }
}

TEST(GruRouter, SharedCellAcrossRoutersAndThreads) {
  Rng rng(0x6e0008);
  const CellWeights cw = random_cell(rng, GruVariant::gru, 32);
  const auto cell = cw.make();
  const GruRouter a = random_router(rng, 16, 4, 48, 32, GruVariant::gru, 2.0).make(cell);
  const GruRouter b = random_router(rng, 16, 4, 48, 32, GruVariant::gru, 2.0).make(cell);
  EXPECT_EQ(a.cell().get(), b.cell().get());
  EXPECT_EQ(cell.use_count(), 3);
  const int64_t T = 64;
  const std::vector<float> x = rng.vec(static_cast<size_t>(T * 48), 1.0);
  const Batch batch = Batch::single(T, 48);
  const Routed ra = run(a, batch, x.data(), 1), rb = run(b, batch, x.data(), 1);
  // Both routers stepping the one cell at once, from two host threads, each with 2 OpenMP threads.
  Routed ca, cb;
  std::thread ta([&] { a.route(batch, x.data(), ca.plan, ca.scratch, 2); });
  std::thread tb([&] { b.route(batch, x.data(), cb.plan, cb.scratch, 2); });
  ta.join();
  tb.join();
  expect_same_plan(ra.plan, ca.plan, "router a, concurrent");
  expect_same_plan(rb.plan, cb.plan, "router b, concurrent");
  expect_bitwise(ra.scratch.state, ca.scratch.state, "router a state, concurrent");
  expect_bitwise(rb.scratch.state, cb.scratch.state, "router b state, concurrent");
}

TEST(GruRouter, ThreadCountDoesNotChangeDecisions) {
  // Large enough to run in parallel (small calls run on one thread), with padding.
  Rng rng(0x6e0009);
  for (GruVariant v : {GruVariant::gru, GruVariant::rnn}) {
    Case c;
    c.cell = random_cell(rng, v, 64);
    c.router = random_router(rng, 16, 4, 256, 64, v, 2.0);
    c.T = 301;
    c.x = rng.vec(static_cast<size_t>(c.T * 256), 1.0);
    c.state = rng.vec(static_cast<size_t>(c.T * 64), 1.0);
    c.pad.assign(static_cast<size_t>(c.T), 0);
    for (int64_t t = 5; t < c.T; t += 11) c.pad[static_cast<size_t>(t)] = 1;
    const GruRouter r = c.router.make(c.cell.make());
    ASSERT_GE(static_cast<double>(c.T) * r.flops_per_token(), GruRouter::kParallelFlops);
    const Routed one = run(r, c.batch(), c.x.data(), 1);
    for (int threads : {2, 3, 4}) {
      const Routed n = run(r, c.batch(), c.x.data(), threads);
      expect_same_plan(one.plan, n.plan, "threads");
      expect_bitwise(one.scratch.state, n.scratch.state, "state vs threads");
    }
    check_case(c);
  }
}

// ------------------------------------------------------------------------ errors

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const moekit::error& e) {
    return e.what();
  }
  return "";
}

bool has(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

TEST(GruRouter, WrongRouterStateSizeIsError) {
  Rng rng(0x6e000a);
  Case c = random_case(rng, GruVariant::gru);
  c.T = 6;
  c.x = rng.vec(static_cast<size_t>(c.T * c.router.opt.hidden), 1.0);
  c.pad.clear();
  c.offsets.clear();
  const int64_t dr = c.cell.d_r;
  const GruRouter r = c.router.make(c.cell.make());
  for (int64_t n : {dr, c.T * dr - 1, c.T * dr + 1, 2 * c.T * dr}) {
    c.state.assign(static_cast<size_t>(n), 0.0f);
    const std::string msg = error_of([&] { run(r, c.batch(), c.x.data(), 1); });
    EXPECT_TRUE(has(msg, "router_state")) << msg;
    EXPECT_TRUE(has(msg, std::to_string(c.T * dr))) << "expected count missing: " << msg;
    EXPECT_TRUE(has(msg, "got " + std::to_string(n))) << "actual count missing: " << msg;
  }
  // The layer reports it too.
  FfnBank bank(c.router.opt.num_experts,
               FfnShape{.hidden = c.router.opt.hidden, .intermediate = 8});
  const GruLayer layer(r, std::move(bank));
  c.state.assign(3, 0.0f);
  std::vector<float> y(static_cast<size_t>(c.T * c.router.opt.hidden));
  Workspace ws;
  const std::string msg = error_of([&] { layer.forward(c.batch(), c.x.data(), y.data(), ws, 1); });
  EXPECT_TRUE(has(msg, "router_state")) << msg;
}

TEST(GruRouter, NonFiniteInputsAreErrors) {
  Rng rng(0x6e000b);
  Case c = random_case(rng, GruVariant::gru);
  c.T = 7;
  c.x = rng.vec(static_cast<size_t>(c.T * c.router.opt.hidden), 1.0);
  c.state = rng.vec(static_cast<size_t>(c.T * c.cell.d_r), 1.0);
  c.pad.clear();
  c.offsets.clear();
  const GruRouter r = c.router.make(c.cell.make());
  const float nan = std::numeric_limits<float>::quiet_NaN(),
              inf = std::numeric_limits<float>::infinity();
  for (float bad : {nan, inf, -inf}) {
    Case h = c;
    h.x[static_cast<size_t>(3 * c.router.opt.hidden)] = bad;
    const std::string mh = error_of([&] { run(r, h.batch(), h.x.data(), 2); });
    EXPECT_TRUE(has(mh, "token 3") && has(mh, "hidden_states")) << mh;
    Case s = c;
    s.state[static_cast<size_t>(2 * c.cell.d_r)] = bad;
    const std::string ms = error_of([&] { run(r, s.batch(), s.x.data(), 2); });
    EXPECT_TRUE(has(ms, "router_state[2, 0]")) << ms;
  }
}

TEST(GruRouter, InvalidParametersAreErrors) {
  Rng rng(0x6e000c);
  const CellWeights cw = random_cell(rng, GruVariant::gru, 8);
  const auto cell = cw.make();
  const RouterWeights rw = random_router(rng, 6, 2, 10, 8, GruVariant::gru, 2.0);
  auto expect_error = [&](const std::string& part, auto&& f) {
    const std::string msg = error_of(f);
    EXPECT_TRUE(has(msg, part)) << "expected an error naming '" << part << "', got '" << msg << "'";
  };
  // Options.
  for (auto [E, k, d, dr, name] :
       {std::tuple<int64_t, int64_t, int64_t, int64_t, const char*>{0, 1, 10, 8, "num_experts"},
        {6, 0, 10, 8, "k expected in [1, E = 6], got 0"},
        {6, 7, 10, 8, "k expected in [1, E = 6], got 7"},
        {6, 2, 0, 8, "hidden size (d)"},
        {6, 2, 10, 0, "d_r expected >= 1, got 0"}}) {
    GruRouterOptions o = rw.opt;
    o.num_experts = E;
    o.k = k;
    o.hidden = d;
    o.d_r = dr;
    expect_error(name, [&] { o.validate(); });
  }
  // Router tensors and the cell.
  expect_error("cell expected a GruCell, got null",
               [&] { GruRouter(rw.opt, nullptr, rw.proj, rw.out); });
  expect_error("router.proj.weight expected [8, 10] = 80 values, got 79",
               [&] { GruRouter(rw.opt, cell, std::vector<float>(79), rw.out); });
  expect_error("router.out.weight expected [6, 8] = 48 values, got 50",
               [&] { GruRouter(rw.opt, cell, rw.proj, std::vector<float>(50)); });
  {
    std::vector<float> p = rw.proj;
    p[13] = std::numeric_limits<float>::quiet_NaN();
    expect_error("router.proj.weight[1, 3] expected finite",
                 [&] { GruRouter(rw.opt, cell, p, rw.out); });
    std::vector<float> o = rw.out;
    o[9] = std::numeric_limits<float>::infinity();
    expect_error("router.out.weight[1, 1] expected finite",
                 [&] { GruRouter(rw.opt, cell, rw.proj, o); });
  }
  {
    GruRouterOptions o = rw.opt;
    o.d_r = 9;
    expect_error("cell state size expected d_r = 9, got 8",
                 [&] { GruRouter(o, cell, std::vector<float>(90), std::vector<float>(54)); });
    o = rw.opt;
    o.variant = GruVariant::rnn;
    expect_error("cell variant expected rnn, got gru",
                 [&] { GruRouter(o, cell, rw.proj, rw.out); });
  }
  // Cell tensors.
  expect_error("d_r expected >= 1, got 0", [&] { GruCell(GruVariant::gru, 0, {}, {}, {}, {}); });
  expect_error("router.gru.weight_ih expected [24, 8] = 192 values, got 64", [&] {
    GruCell(GruVariant::gru, 8, std::vector<float>(64), cw.w_hh, cw.b_ih, cw.b_hh);
  });
  expect_error("router.gru.weight_hh expected [8, 8] = 64 values, got 192", [&] {
    GruCell(GruVariant::rnn, 8, std::vector<float>(64), cw.w_hh, std::vector<float>(8),
            std::vector<float>(8));
  });
  expect_error("router.gru.bias_ih expected [24] values, got 23", [&] {
    GruCell(GruVariant::gru, 8, cw.w_ih, cw.w_hh, std::vector<float>(23), cw.b_hh);
  });
  expect_error("router.gru.bias_hh expected [24] values, got 0",
               [&] { GruCell(GruVariant::gru, 8, cw.w_ih, cw.w_hh, cw.b_ih, {}); });
  {
    std::vector<float> w = cw.w_hh;
    w[8 * 5 + 2] = std::numeric_limits<float>::quiet_NaN();
    expect_error("router.gru.weight_hh[5, 2] expected finite",
                 [&] { GruCell(GruVariant::gru, 8, cw.w_ih, w, cw.b_ih, cw.b_hh); });
    std::vector<float> b = cw.b_ih;
    b[17] = -std::numeric_limits<float>::infinity();
    expect_error("router.gru.bias_ih[17] expected finite",
                 [&] { GruCell(GruVariant::gru, 8, cw.w_ih, cw.w_hh, b, cw.b_hh); });
  }
  // Wrong hidden width in the batch.
  const GruRouter r = rw.make(cell);
  std::vector<float> x(20, 0.5f);
  RoutingPlan plan;
  RouterScratch s;
  expect_error("Batch.hidden (d): expected 10",
               [&] { r.route(Batch::single(2, 9), x.data(), plan, s, 1); });
}

// ------------------------------------------------------------------------ 3-layer stack

// A stack of GRU-routed MoE layers sharing one cell, and the same weights for the reference.
struct Stack {
  std::shared_ptr<const GruCell> cell;
  CellWeights cell_weights;
  std::vector<std::unique_ptr<GruLayer>> layers;
  std::vector<ref::gru::StackLayer> ref_layers;
};

Stack build_stack(Rng& rng, GruVariant v, int64_t L, int64_t E, int64_t k, int64_t d, int64_t f,
                  int64_t dr) {
  Stack s;
  s.cell_weights = random_cell(rng, v, dr);
  s.cell = s.cell_weights.make();
  for (int64_t l = 0; l < L; ++l) {
    const RouterWeights rw = random_router(rng, E, k, d, dr, v, 2.5);
    ref::gru::StackLayer rl;
    rl.router = rw.ref();
    FfnBank bank(E, FfnShape{.hidden = d, .intermediate = f});
    for (int64_t e = 0; e < E; ++e) {
      ref::Ffn ffn;
      ffn.hidden = d;
      ffn.intermediate = f;
      ffn.gated = true;
      ffn.act = ref::Activation::silu;
      const double a_in = std::sqrt(3.0 / double(d)), a_out = std::sqrt(3.0 / double(f));
      ffn.gate = rng.vec(static_cast<size_t>(f * d), a_in);
      ffn.up = rng.vec(static_cast<size_t>(f * d), a_in);
      ffn.down = rng.vec(static_cast<size_t>(d * f), a_out);
      bank.set_expert(e, ffn.gate.data(), ffn.up.data(), ffn.down.data());
      rl.experts.push_back(std::move(ffn));
    }
    s.layers.push_back(std::make_unique<GruLayer>(rw.make(s.cell), std::move(bank)));
    s.ref_layers.push_back(std::move(rl));
  }
  return s;
}

// What the library stack produced per layer.
struct LibStep {
  std::vector<float> input, output, state;
  RoutingPlan plan;
};

// Runs the stack as a caller would: the state of layer l is batch.router_state of layer l + 1
// (one Workspace per layer), the residual X + y is added between layers.
std::vector<LibStep> run_stack(const Stack& s, const std::vector<float>& x0, int64_t T, int64_t d,
                               const std::vector<uint8_t>& pad, int threads) {
  std::vector<LibStep> steps;
  std::vector<Workspace> ws(s.layers.size());
  std::vector<float> X = x0;
  for (size_t l = 0; l < s.layers.size(); ++l) {
    Batch b = Batch::single(T, d);
    b.padding = pad;
    if (l > 0) b.router_state = ws[l - 1].router.state;
    LibStep st;
    st.input = X;
    st.output.resize(X.size());
    s.layers[l]->forward(b, X.data(), st.output.data(), ws[l], threads);
    st.state = ws[l].router.state;
    st.plan = ws[l].plan;
    for (size_t i = 0; i < X.size(); ++i) X[i] += st.output[i];
    steps.push_back(std::move(st));
  }
  return steps;
}

void check_stack(uint64_t seed, GruVariant v, bool padded) {
  Rng rng(seed);
  const int64_t L = 3, E = 8, k = 2, d = 48, f = 40, dr = 32, T = 45;
  const Stack s = build_stack(rng, v, L, E, k, d, f, dr);
  EXPECT_EQ(s.cell.use_count(), L + 1) << "the layers' routers must share the one cell";
  const std::vector<float> x0 = rng.vec(static_cast<size_t>(T * d), 1.0);
  std::vector<uint8_t> pad;
  if (padded) {
    pad.assign(static_cast<size_t>(T), 0);
    for (int64_t t = 0; t < T; t += 7) pad[static_cast<size_t>(t)] = 1;
  }
  const uint8_t* pad_ptr = pad.empty() ? nullptr : pad.data();
  const std::vector<LibStep> got = run_stack(s, x0, T, d, pad, 1);
  const std::vector<ref::gru::StackStep> want =
      ref::gru::stack_forward(s.cell_weights.ref(), s.ref_layers, x0.data(), T, pad_ptr);
  ASSERT_EQ(got.size(), want.size());

  // A token excluded as a near-tie at one layer may legitimately pick other experts there, so
  // its later inputs and states differ: it stays excluded in every later layer.
  std::vector<uint8_t> excluded(static_cast<size_t>(T), 0);
  for (size_t l = 0; l < got.size(); ++l) {
    SCOPED_TRACE("layer " + std::to_string(l) + (padded ? " (padded)" : ""));
    const ref::PlanView view = ref::view_of(got[l].plan);
    const auto inv = ref::plan_invariant_errors(view, pad_ptr, k);
    EXPECT_TRUE(inv.empty()) << "plan invariants:" << join(inv);
    ref::gru::RouteResult wr = want[l].route;
    for (int64_t t = 0; t < T;
         ++t)  // earlier exclusions: an exact tie makes compare_routing skip the token
      if (excluded[static_cast<size_t>(t)] && !wr.routing.token[static_cast<size_t>(t)].padded)
        std::fill(wr.routing.token[static_cast<size_t>(t)].selection.begin(),
                  wr.routing.token[static_cast<size_t>(t)].selection.end(), 1.0);
    const ref::CompareReport rep = ref::compare_routing(wr.routing, view);
    EXPECT_TRUE(rep.errors.empty()) << "routing differs from the reference:" << join(rep.errors);
    for (int64_t t = 0; t < T; ++t)
      excluded[static_cast<size_t>(t)] |= rep.excluded[static_cast<size_t>(t)];
    g_totals.stack_compared += rep.compared;
    g_totals.stack_near_tie += rep.near_tie;
    EXPECT_GT(rep.compared, T / 2);

    auto values = [&](const std::vector<double>& w, const std::vector<float>& g, int64_t width,
                      double rel, const char* what) {
      ASSERT_EQ(w.size(), g.size()) << what;
      EXPECT_GT(ref::max_abs(w), 0.0) << "vacuous: reference " << what << " all zero";
      const auto errs = ref::compare_values(w, g.data(), width, rel, kFloorFrac, excluded);
      EXPECT_TRUE(errs.empty()) << what << " differs from the reference:" << join(errs);
    };
    values(want[l].input, got[l].input, d, kOutRel, "layer input");
    values(want[l].route.state, got[l].state, dr, kStateRel, "router state");
    values(want[l].output, got[l].output, d, kOutRel, "layer output");
    for (int64_t t = 0; t < T; ++t) {
      if (!padded || !pad[static_cast<size_t>(t)]) continue;
      for (int64_t i = 0; i < d; ++i)
        ASSERT_EQ(got[l].output[static_cast<size_t>(t * d + i)], 0.0f) << "padded token " << t;
      for (int64_t i = 0; i < dr; ++i)
        ASSERT_EQ(got[l].state[static_cast<size_t>(t * dr + i)], 0.0f) << "padded token " << t;
    }
  }
  // Thread count: identical decisions and bitwise-identical states through the whole stack.
  const std::vector<LibStep> two = run_stack(s, x0, T, d, pad, 2);
  for (size_t l = 0; l < got.size(); ++l) {
    expect_same_plan(got[l].plan, two[l].plan, "stack, threads 1 vs 2");
    expect_bitwise(got[l].state, two[l].state, "stack state, threads 1 vs 2");
  }
}

TEST(GruStack, ThreeLayersMatchReference) {
  check_stack(0x6e0100, GruVariant::gru, false);
  check_stack(0x6e0101, GruVariant::gru, true);
}

TEST(GruStack, ThreeLayersRnnMatchReference) { check_stack(0x6e0102, GruVariant::rnn, false); }

TEST(GruStack, RoutingDependsOnTheThreadedState) {
  // Not vacuous: the same layer routes differently with and without the previous state.
  Rng rng(0x6e0103);
  const Stack s = build_stack(rng, GruVariant::gru, 2, 8, 2, 32, 16, 24);
  const int64_t T = 40, d = 32;
  const std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 1.0);
  Workspace w0, w1a, w1b;
  std::vector<float> y(static_cast<size_t>(T * d));
  s.layers[0]->forward(Batch::single(T, d), x.data(), y.data(), w0, 1);
  Batch threaded = Batch::single(T, d);
  threaded.router_state = w0.router.state;
  s.layers[1]->forward(threaded, x.data(), y.data(), w1a, 1);
  s.layers[1]->forward(Batch::single(T, d), x.data(), y.data(), w1b, 1);
  const ref::PlanView a = ref::view_of(w1a.plan), b = ref::view_of(w1b.plan);
  EXPECT_NE(a.slot_expert, b.slot_expert);
}

}  // namespace
