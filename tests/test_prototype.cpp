// SPDX-License-Identifier: Apache-2.0
// Prototype routers (ROUTING.md section 6): ProMoERouter (arXiv 2510.24711), its routing
// contrastive loss, CentroidRouter and kmeans_step, against the double-precision reference
// in tests/reference/prototype_ref: random shapes with fixed seeds, the routers' edge cases,
// padding, thread determinism, the SparseLayer forward, and argument errors.
//
// Near-ties: a token is excluded from the exact comparison of its choices when its last
// chosen and first unchosen reference scores differ by less than 1e-6 relative, measured
// against max(|a|, |b|, scale) where scale is the magnitude of the terms the score is made of
// (1 for cosines; ||x||^2 + max ||c||^2 for squared distances), so scores near 0 do not
// count as far apart. Exclusions are counted and asserted rare.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/prototype.hpp"
#include "moekit/routing_plan.hpp"
#include "reference/prototype_ref.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Batch;
using moekit::CentroidOptions;
using moekit::CentroidRouter;
using moekit::FfnBank;
using moekit::FfnShape;
using moekit::ProMoEOptions;
using moekit::ProMoERouter;
using moekit::RouterScratch;
using moekit::RoutingPlan;
using moekit::Workspace;
namespace pref = ref::prototype;

constexpr double kTieRel = 1e-6;

// ------------------------------------------------------------------------ helpers

using test_support::bank_of;
using test_support::experts_of;
using test_support::random_ref_ffn;
using test_support::Rng;
using test_support::weights_of;
using test_support::join;


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


bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}
template <class A, class B>
bool same(A a, B b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// Identical plans (token side bit for bit, expert side equal).
void expect_identical(const RoutingPlan& a, const RoutingPlan& b) {
  EXPECT_TRUE(same(a.slot_offsets(), b.slot_offsets()));
  EXPECT_TRUE(same(a.slot_expert(), b.slot_expert()));
  EXPECT_TRUE(bits_equal({a.slot_weight().begin(), a.slot_weight().end()},
                         {b.slot_weight().begin(), b.slot_weight().end()}));
  EXPECT_TRUE(same(a.expert_offsets(), b.expert_offsets()));
  EXPECT_TRUE(same(a.expert_tokens(), b.expert_tokens()));
}

// Bookkeeping over the whole file (printed once at the end).
struct Totals {
  int64_t promoe_compared = 0, promoe_near_tie = 0, centroid_compared = 0, centroid_near_tie = 0;
};
Totals g_totals;

class TotalsPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    std::printf(
        "[ prototype ref ] ProMoE tokens compared exactly: %lld, excluded as near-ties: %lld; "
        "nearest-centroid compared: %lld, excluded as near-ties: %lld\n",
        (long long)g_totals.promoe_compared, (long long)g_totals.promoe_near_tie,
        (long long)g_totals.centroid_compared, (long long)g_totals.centroid_near_tie);
  }
};
[[maybe_unused]] ::testing::Environment* const g_env =
    ::testing::AddGlobalTestEnvironment(new TotalsPrinter);

struct Report {
  int64_t compared = 0, near_tie = 0, padded = 0, uncond = 0;
  std::vector<uint8_t> excluded;  // [T]
  std::vector<std::string> errors;
};

// Compares a plan and the router logits with reference decisions. `k` slots for scored tokens.
// `logit_abs`: absolute tolerance of the logits.
Report compare(const pref::Decisions& want, const RoutingPlan& plan,
               const std::vector<float>& logits, int64_t k, int64_t E_scored, double logit_abs,
               bool exclude_near_ties = true) {
  Report rep;
  auto err = [&](const std::string& m) { rep.errors.push_back(m); };
  if (plan.num_tokens() != want.tokens || plan.num_experts() != want.experts) {
    err("plan shape: " + std::to_string(plan.num_tokens()) + " tokens, " +
        std::to_string(plan.num_experts()) + " experts; expected " + std::to_string(want.tokens) +
        " / " + std::to_string(want.experts));
    return rep;
  }
  const int64_t T = want.tokens;
  rep.excluded.assign(static_cast<size_t>(T), 0);
  if (static_cast<int64_t>(logits.size()) != T * E_scored)
    err("logits size " + std::to_string(logits.size()));
  for (int64_t t = 0; t < T; ++t) {
    const pref::TokenDecision& td = want.token[static_cast<size_t>(t)];
    const std::string who = "token " + std::to_string(t) + ": ";
    const auto ids = experts_of(plan, t);
    const auto w = weights_of(plan, t);
    if (static_cast<int64_t>(logits.size()) == T * E_scored) {
      for (int64_t e = 0; e < E_scored; ++e) {
        const double g = logits[static_cast<size_t>(t * E_scored + e)],
                     x = td.logits[static_cast<size_t>(e)];
        if (!(std::fabs(g - x) <= logit_abs))
          err(who + "logit " + std::to_string(e) + " = " + std::to_string(g) + ", expected " +
              std::to_string(x));
      }
    }
    if (td.padded) {
      ++rep.padded;
      if (!ids.empty()) err(who + "padded token has " + std::to_string(ids.size()) + " slots");
      continue;
    }
    if (ids.size() != td.experts.size()) {
      err(who + std::to_string(ids.size()) + " slots, expected " +
          std::to_string(td.experts.size()));
      rep.excluded[static_cast<size_t>(t)] = 1;
      continue;
    }
    if (td.unconditional) {
      ++rep.uncond;
      if (ids[0] != td.experts[0] || w[0] != 1.0f)
        err(who + "unconditional token got (" + std::to_string(ids[0]) + ", " +
            std::to_string(w[0]) + ")");
      continue;
    }
    if (exclude_near_ties && pref::boundary_gap(td, k) < kTieRel) {
      ++rep.near_tie;
      rep.excluded[static_cast<size_t>(t)] = 1;
      continue;
    }
    const bool by_id = exclude_near_ties && pref::order_gap(td, k) < kTieRel;
    for (size_t j = 0; j < td.experts.size(); ++j) {
      int64_t s = -1;
      if (!by_id) {
        if (ids[j] == td.experts[j]) s = static_cast<int64_t>(j);
      } else {
        for (size_t i = 0; i < ids.size(); ++i)
          if (ids[i] == td.experts[j]) s = static_cast<int64_t>(i);
      }
      if (s < 0) {
        std::string g, x;
        for (int32_t e : ids) g += std::to_string(e) + " ";
        for (int64_t e : td.experts) x += std::to_string(e) + " ";
        err(who + "experts [ " + g + "], expected [ " + x + "] (boundary gap " +
            std::to_string(pref::boundary_gap(td, k)) + ")");
        break;
      }
      const double gw = w[static_cast<size_t>(s)], xw = td.weights[j];
      if (!(std::fabs(gw - xw) <= 1e-5 * std::fabs(xw) + 1e-7))
        err(who + "weight of expert " + std::to_string(td.experts[j]) + " = " + std::to_string(gw) +
            ", expected " + std::to_string(xw));
    }
    ++rep.compared;
  }
  return rep;
}

// ------------------------------------------------------------------------ ProMoE cases

struct ProCase {
  ProMoEOptions opt;
  std::vector<float> mu, x;
  std::vector<uint8_t> pad;    // empty: no padding
  std::vector<int32_t> types;  // empty: all conditional
  int64_t T = 0;

  Batch batch() const {
    Batch b = Batch::single(T, opt.hidden);
    b.padding = pad;
    b.token_types = types;
    return b;
  }
  const uint8_t* pad_ptr() const { return pad.empty() ? nullptr : pad.data(); }
  const int32_t* types_ptr() const { return types.empty() ? nullptr : types.data(); }
  pref::ProMoEParams params() const {
    return {opt.num_experts, opt.k, opt.hidden, static_cast<double>(opt.tau_r),
            opt.uncond_token_type};
  }
  pref::Decisions reference() const {
    return pref::route_promoe(params(), mu.data(), x.data(), T, pad_ptr(), types_ptr());
  }
};

std::string describe(const ProCase& c) {
  char buf[200];
  std::snprintf(
      buf, sizeof buf, "T=%lld E=%lld k=%lld d=%lld tau_r=%g uncond_type=%d padded=%d typed=%d",
      (long long)c.T, (long long)c.opt.num_experts, (long long)c.opt.k, (long long)c.opt.hidden,
      c.opt.tau_r, c.opt.uncond_token_type, !c.pad.empty(), !c.types.empty());
  return buf;
}

ProMoEOptions pro_options(int64_t E, int64_t k, int64_t d, float tau = 1.0f) {
  ProMoEOptions o;
  o.num_experts = E;
  o.k = k;
  o.hidden = d;
  o.tau_r = tau;
  return o;
}

ProCase random_pro_case(Rng& rng, double p_uncond = -1.0, int64_t min_T = 0, int64_t max_T = 60) {
  ProCase c;
  const int64_t E = rng.integer(1, 48);
  c.opt = pro_options(E, rng.integer(1, rng.coin(0.6) ? std::min<int64_t>(E, 4) : E),
                      rng.integer(2, 80));
  if (rng.coin(0.5)) c.opt.tau_r = static_cast<float>(rng.uniform(0.05, 3.0));
  if (rng.coin(0.2)) c.opt.uncond_token_type = static_cast<int32_t>(rng.integer(-3, 9));
  const int64_t d = c.opt.hidden;
  c.T = rng.integer(min_T, max_T);
  // Prototypes of varied norms (cosines ignore them); occasionally a zero row.
  for (int64_t e = 0; e < E; ++e) {
    const double scale = rng.coin(0.2) ? std::pow(10.0, rng.uniform(-3, 3)) : 1.0;
    std::vector<float> r = rng.vec(static_cast<size_t>(d), scale);
    if (rng.coin(0.04)) std::fill(r.begin(), r.end(), 0.0f);
    c.mu.insert(c.mu.end(), r.begin(), r.end());
  }
  c.x = rng.vec(static_cast<size_t>(c.T * d), rng.uniform(0.1, 4.0));
  if (rng.coin(0.3)) {
    c.pad.assign(static_cast<size_t>(c.T), 0);
    const double rate = rng.uniform(0.05, 0.6);
    for (uint8_t& p : c.pad) p = rng.coin(rate);
  }
  const double pu = p_uncond >= 0 ? p_uncond : (rng.coin(0.4) ? 0.0 : rng.uniform(0.0, 1.0));
  if (p_uncond >= 0 || rng.coin(0.7)) {
    c.types.resize(static_cast<size_t>(c.T));
    for (int32_t& ty : c.types) {
      ty = rng.coin(pu) ? c.opt.uncond_token_type
                        : c.opt.uncond_token_type +
                              static_cast<int32_t>(rng.integer(1, 3)) * (rng.coin(0.5) ? 1 : -1);
    }
  }
  return c;
}

struct Routed {
  RoutingPlan plan;
  RouterScratch scratch;
};

Routed route_pro(const ProCase& c, int threads = 1) {
  const ProMoERouter router(c.opt, c.mu);
  Routed r;
  router.route(c.batch(), c.x.data(), r.plan, r.scratch, threads);
  return r;
}

double pro_logit_tol(const ProCase& c) { return 2e-5 * std::max(1.0, 1.0 / c.opt.tau_r); }

// Routes with the library and the reference, checks invariants and decisions.
Report check_pro(const ProCase& c, bool exclude_near_ties = true, int threads = 1) {
  SCOPED_TRACE(describe(c));
  const Routed r = route_pro(c, threads);
  const auto inv = ref::plan_invariant_errors(ref::view_of(r.plan), c.pad_ptr(), -1);
  EXPECT_TRUE(inv.empty()) << "plan invariants:" << join(inv);
  const pref::Decisions want = c.reference();
  Report rep = compare(want, r.plan, r.scratch.logits, c.opt.k, c.opt.num_experts, pro_logit_tol(c),
                       exclude_near_ties);
  EXPECT_TRUE(rep.errors.empty()) << "ProMoE routing differs from the reference:"
                                  << join(rep.errors);
  // Conditional tokens never use the unconditional expert; its load = unconditional tokens.
  EXPECT_EQ(r.plan.kept_of(c.opt.num_experts), rep.uncond);
  g_totals.promoe_compared += rep.compared;
  g_totals.promoe_near_tie += rep.near_tie;
  return rep;
}

// ------------------------------------------------------------------------ ProMoE: reference

TEST(ProMoEReference, HandComputed) {
  // d = 2: prototypes (2, 0), (0, 3), (-1, 0), (1, 1); x = (1, 1): cosines 1/sqrt2, 1/sqrt2,
  // -1/sqrt2, 1.
  ProCase c;
  c.opt = pro_options(4, 2, 2);
  c.mu = {2, 0, 0, 3, -1, 0, 1, 1};
  c.x = {1, 1, 5, 0};
  c.T = 2;
  c.types = {0, 1};
  const pref::Decisions r = c.reference();
  const double h = 1.0 / std::sqrt(2.0);
  const double z = 2 * std::exp(h) + std::exp(-h) + std::exp(1.0);
  ASSERT_EQ(r.token[0].experts, (std::vector<int64_t>{3, 0}));
  EXPECT_NEAR(r.token[0].weights[0], std::exp(1.0) / z, 1e-15);
  EXPECT_NEAR(r.token[0].weights[1], std::exp(h) / z, 1e-15);  // tie 0 / 1: the lower id
  EXPECT_TRUE(r.token[1].unconditional);
  EXPECT_EQ(r.token[1].experts, (std::vector<int64_t>{4}));
  // The library agrees (ties included: the two 1/sqrt2 cosines are the same float).
  check_pro(c, /*exclude_near_ties=*/false);
  // RCL by hand: tokens (1, 1) -> 3 and (5, 0) -> 0: V = {0, 3},
  // cos(mu0, m0) = 1, cos(mu0, m3) = h, cos(mu3, m0) = h, cos(mu3, m3) = 1.
  const double want = -std::log(std::exp(10.0) / (std::exp(10.0) + std::exp(10.0 * h)));
  EXPECT_NEAR(pref::routing_contrastive_loss(c.mu.data(), 4, 2, c.x.data(), 2, {3, 0}), want,
              1e-12);
}

// ------------------------------------------------------------------------ ProMoE: random

TEST(ProMoERandom, MatchesReference) {
  Rng rng(0x9807E);
  int64_t compared = 0, excluded = 0, scored = 0;
  for (int i = 0; i < 300; ++i) {
    SCOPED_TRACE("case " + std::to_string(i));
    const ProCase c = random_pro_case(rng);
    const Report rep = check_pro(c);
    compared += rep.compared;
    excluded += rep.near_tie;
    scored += rep.compared + rep.near_tie;
    if (HasFailure()) return;
  }
  EXPECT_GT(compared, 1000);
  EXPECT_LE(excluded, scored / 200 + 2) << "near-tie exclusions should be rare";
}

// ------------------------------------------------------------------------ ProMoE: conditional step

TEST(ProMoEConditional, AllUnconditional) {
  Rng rng(1);
  for (int i = 0; i < 20; ++i) {
    const ProCase c = random_pro_case(rng, /*p_uncond=*/1.0, 1, 40);
    const Report rep = check_pro(c);
    EXPECT_EQ(rep.compared, 0);
    EXPECT_EQ(rep.uncond + rep.padded, c.T);
    const Routed r = route_pro(c);
    for (int64_t e = 0; e < c.opt.num_experts; ++e) EXPECT_EQ(r.plan.kept_of(e), 0);
    for (float l : r.scratch.logits) EXPECT_EQ(l, 0.0f);
    // RCL: no expert has tokens -> 0.
    EXPECT_EQ(
        moekit::routing_contrastive_loss(ProMoERouter(c.opt, c.mu), c.batch(), c.x.data(), r.plan),
        0.0);
  }
}

TEST(ProMoEConditional, NoneUnconditional) {
  Rng rng(2);
  for (int i = 0; i < 20; ++i) {
    ProCase c = random_pro_case(rng, /*p_uncond=*/0.0, 1, 40);
    if (i % 2 == 0) c.types.clear();  // no token types at all: every token conditional
    const Report rep = check_pro(c);
    EXPECT_EQ(rep.uncond, 0);
    EXPECT_EQ(route_pro(c).plan.kept_of(c.opt.num_experts), 0);
  }
}

TEST(ProMoEConditional, MixAndUncondTypeParameter) {
  Rng rng(3);
  for (int i = 0; i < 40; ++i) {
    const ProCase c = random_pro_case(rng, /*p_uncond=*/0.4, 1, 50);
    const Report rep = check_pro(c);
    EXPECT_GT(rep.uncond + rep.padded, 0);
    const Routed r = route_pro(c);
    for (int64_t t = 0; t < c.T; ++t) {
      if (!c.pad.empty() && c.pad[static_cast<size_t>(t)]) continue;
      const bool uncond = c.types[static_cast<size_t>(t)] == c.opt.uncond_token_type;
      const auto ids = experts_of(r.plan, t);
      if (uncond) {
        EXPECT_EQ(ids, (std::vector<int32_t>{static_cast<int32_t>(c.opt.num_experts)}));
        EXPECT_EQ(weights_of(r.plan, t), (std::vector<float>{1.0f}));
      } else {
        EXPECT_EQ(static_cast<int64_t>(ids.size()), c.opt.k);
        for (int32_t e : ids) EXPECT_LT(e, c.opt.num_experts);
      }
    }
  }
  // The same types with a different unconditional id: the default 1 vs 7.
  ProCase c;
  c.opt = pro_options(3, 1, 4);
  c.mu = Rng(4).vec(12, 1.0);
  c.T = 4;
  c.x = Rng(5).vec(16, 1.0);
  c.types = {1, 7, 0, 1};
  Routed r = route_pro(c);
  EXPECT_EQ(r.plan.kept_of(3), 2);
  EXPECT_EQ(experts_of(r.plan, 0)[0], 3);
  c.opt.uncond_token_type = 7;
  r = route_pro(c);
  EXPECT_EQ(r.plan.kept_of(3), 1);
  EXPECT_EQ(experts_of(r.plan, 1)[0], 3);
  check_pro(c);
}

// ------------------------------------------------------------------------ ProMoE: weights

TEST(ProMoEWeights, TopKNotRenormalised) {
  Rng rng(6);
  for (int i = 0; i < 30; ++i) {
    ProCase c = random_pro_case(rng, 0.0, 1, 20);
    c.pad.clear();
    const Routed r = route_pro(c);
    const pref::Decisions want = c.reference();
    for (int64_t t = 0; t < c.T; ++t) {
      double sum = 0;
      for (float w : weights_of(r.plan, t)) sum += w;
      // The k weights are softmax values over all E: they sum to 1 only when k = E.
      double all = 0;
      const auto& L = want.token[static_cast<size_t>(t)].logits;
      const double m = *std::max_element(L.begin(), L.end());
      for (double l : L) all += std::exp(l - m);
      double chosen = 0;
      for (int64_t e : want.token[static_cast<size_t>(t)].experts)
        chosen += std::exp(L[static_cast<size_t>(e)] - m);
      EXPECT_NEAR(sum, chosen / all, 1e-5);
      if (c.opt.k == c.opt.num_experts) {
        EXPECT_NEAR(sum, 1.0, 1e-5);
      } else {
        EXPECT_LT(sum, 1.0 - 1e-7);
      }
    }
    check_pro(c);
  }
  // tau_r sharpens (small) or flattens (large) the same selection.
  ProCase c;
  c.opt = pro_options(5, 2, 8);
  c.mu = Rng(7).vec(40, 1.0);
  c.T = 6;
  c.x = Rng(8).vec(48, 1.0);
  const Routed base = route_pro(c);
  for (float tau : {0.05f, 0.5f, 4.0f}) {
    c.opt.tau_r = tau;
    const Routed r = route_pro(c);
    for (int64_t t = 0; t < c.T; ++t) EXPECT_EQ(experts_of(r.plan, t), experts_of(base.plan, t));
    check_pro(c);
  }
}

// ------------------------------------------------------------------------ ProMoE: norms

TEST(ProMoEEdge, ZeroNormTokenAndPrototype) {
  // Zero token: every cosine is 0 (x / 1e-12 = 0): experts 0..k-1, weight 1/E each.
  ProCase c;
  c.opt = pro_options(6, 3, 5);
  c.mu = Rng(9).vec(30, 1.0);
  c.T = 2;
  c.x.assign(10, 0.0f);
  c.x[5] = 1.0f;  // token 1 is not zero
  Routed r = route_pro(c);
  EXPECT_EQ(experts_of(r.plan, 0), (std::vector<int32_t>{0, 1, 2}));
  for (float w : weights_of(r.plan, 0)) EXPECT_FLOAT_EQ(w, 1.0f / 6.0f);
  for (int e = 0; e < 6; ++e) EXPECT_EQ(r.scratch.logits[static_cast<size_t>(e)], 0.0f);
  check_pro(c, /*exclude_near_ties=*/false);

  // Zero prototype: cosine exactly 0, ranked between the positive and negative cosines.
  c.opt = pro_options(3, 3, 2);
  c.mu = {1, 0, 0, 0, -1, 0};
  c.T = 1;
  c.x = {2, 1};
  r = route_pro(c);
  EXPECT_EQ(experts_of(r.plan, 0), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(r.scratch.logits[1], 0.0f);
  check_pro(c, false);

  // Norms below the 1e-12 floor: the vector is divided by 1e-12, not by its norm, so the
  // cosine shrinks by norm / 1e-12 (and stays finite).
  c.opt = pro_options(3, 2, 4);
  c.mu = {1e-14f, 0, 0, 0, 0, 2e-13f, 0, 0, 0, 0, 1, 1};
  c.T = 3;
  c.x = {3e-13f, 1e-13f, 0, 0, 1, 2, 0, 0, 1e-20f, 0, 1e-20f, 1e-20f};
  r = route_pro(c);
  const pref::Decisions want = c.reference();
  EXPECT_NEAR(want.token[1].logits[0], 1.0 / std::sqrt(5.0) * 1e-2,
              1e-9);  // cos with mu_0 / 1e-12 = (1e-2, 0, ...)
  check_pro(c);
  for (float l : r.scratch.logits) EXPECT_TRUE(std::isfinite(l));

  // Random tokens and prototypes mixed with tiny and zero rows.
  Rng rng(10);
  for (int i = 0; i < 30; ++i) {
    ProCase q = random_pro_case(rng, 0.2, 1, 30);
    const int64_t d = q.opt.hidden;
    for (int64_t e = 0; e < q.opt.num_experts; ++e)
      if (rng.coin(0.3))
        for (int64_t j = 0; j < d; ++j)
          q.mu[static_cast<size_t>(e * d + j)] *= rng.coin(0.5) ? 0.0f : 1e-13f;
    for (int64_t t = 0; t < q.T; ++t)
      if (rng.coin(0.3))
        for (int64_t j = 0; j < d; ++j)
          q.x[static_cast<size_t>(t * d + j)] *= rng.coin(0.5) ? 0.0f : 1e-13f;
    check_pro(q, /*exclude_near_ties=*/true);
  }
}

TEST(ProMoEEdge, HugeTokenIsScaleInvariant) {
  // ||x||^2 overflows float: the router rescales the row, so x * 1e30 routes as x does.
  Rng rng(11);
  ProCase c;
  c.opt = pro_options(16, 4, 64);
  c.mu = rng.vec(16 * 64, 1.0);
  c.T = 8;
  c.x = rng.vec(8 * 64, 1.0);
  ProCase big = c;
  for (float& v : big.x) v *= 1e30f;
  const Routed a = route_pro(c), b = route_pro(big);
  for (int64_t t = 0; t < c.T; ++t) {
    EXPECT_EQ(experts_of(a.plan, t), experts_of(b.plan, t));
    const auto wa = weights_of(a.plan, t), wb = weights_of(b.plan, t);
    for (size_t j = 0; j < wa.size(); ++j) EXPECT_NEAR(wa[j], wb[j], 1e-5 * wa[j]);
  }
  check_pro(big);
}

TEST(ProMoEEdge, EmptyBatchSingleExpertSingleToken) {
  ProCase c;
  c.opt = pro_options(4, 2, 3);
  c.mu = Rng(12).vec(12, 1.0);
  Routed r = route_pro(c);
  EXPECT_TRUE(r.plan.finalized());
  EXPECT_EQ(r.plan.num_tokens(), 0);
  EXPECT_EQ(r.plan.num_experts(), 5);
  EXPECT_EQ(r.plan.num_slots(), 0);
  // E = 1: the only prototype, weight softmax = 1; unconditional tokens go to expert 1.
  c.opt = pro_options(1, 1, 3);
  c.mu = {1, -2, 0.5f};
  c.T = 3;
  c.x = Rng(13).vec(9, 1.0);
  c.types = {0, 1, 0};
  r = route_pro(c);
  EXPECT_EQ(experts_of(r.plan, 0), (std::vector<int32_t>{0}));
  EXPECT_EQ(weights_of(r.plan, 0), (std::vector<float>{1.0f}));
  EXPECT_EQ(experts_of(r.plan, 1), (std::vector<int32_t>{1}));
  check_pro(c);
  // One token, random shapes.
  Rng rng(14);
  for (int i = 0; i < 40; ++i) check_pro(random_pro_case(rng, -1.0, 1, 1));
}

TEST(ProMoEEdge, ExactTiesGoToTheLowerId) {
  // d = 1: every prototype of the token's sign has cosine exactly 1 -> all tie; duplicate rows too.
  ProCase c;
  c.opt = pro_options(6, 3, 1);
  c.mu = {-1, 2, 0.5f, -3, 7, 0};
  c.T = 2;
  c.x = {0.3f, -2.0f};
  const Routed r = route_pro(c);
  EXPECT_EQ(experts_of(r.plan, 0), (std::vector<int32_t>{1, 2, 4}));
  EXPECT_EQ(experts_of(r.plan, 1), (std::vector<int32_t>{0, 3, 5}));
  check_pro(c, /*exclude_near_ties=*/false);
  ProCase dup;
  dup.opt = pro_options(8, 5, 16);
  const std::vector<float> half = Rng(15).vec(4 * 16, 1.0);
  dup.mu = half;
  dup.mu.insert(dup.mu.end(), half.begin(), half.end());  // experts e and e + 4 identical
  dup.T = 10;
  dup.x = Rng(16).vec(160, 1.0);
  const Routed rd = route_pro(dup);
  for (int64_t t = 0; t < dup.T; ++t) {
    const auto ids = experts_of(rd.plan, t);
    for (size_t j = 0; j + 1 < ids.size(); j += 2)
      EXPECT_EQ(ids[j] + 4, ids[j + 1]) << "token " << t;
  }
  check_pro(dup, false);
}

TEST(ProMoEEdge, PaddingIsNeverRouted) {
  Rng rng(17);
  ProCase c = random_pro_case(rng, 0.3, 30, 30);
  c.pad.assign(30, 0);
  for (int64_t t = 0; t < 30; t += 3) c.pad[static_cast<size_t>(t)] = 1;
  // NaN / Inf in padded rows are not router inputs: no error, no slot.
  for (int64_t j = 0; j < c.opt.hidden; ++j)
    c.x[static_cast<size_t>(j)] = std::numeric_limits<float>::quiet_NaN();
  c.x[static_cast<size_t>(3 * c.opt.hidden)] = std::numeric_limits<float>::infinity();
  const Report rep = check_pro(c);
  EXPECT_EQ(rep.padded, 10);
  const Routed r = route_pro(c);
  for (int64_t t = 0; t < 30; t += 3) EXPECT_EQ(r.plan.slots_of(t), 0);
  // Padding all tokens.
  std::fill(c.pad.begin(), c.pad.end(), 1);
  EXPECT_EQ(route_pro(c).plan.num_slots(), 0);
}

TEST(ProMoEThreads, IdenticalAcrossThreadCounts) {
  Rng rng(18);
  for (int i = 0; i < 20; ++i) {
    const ProCase c = random_pro_case(rng, -1.0, 30, 200);
    const Routed a = route_pro(c, 1), b = route_pro(c, 2), d = route_pro(c, 3);
    expect_identical(a.plan, b.plan);
    expect_identical(a.plan, d.plan);
    EXPECT_TRUE(bits_equal(a.scratch.logits, b.scratch.logits));
    EXPECT_TRUE(bits_equal(a.scratch.logits, d.scratch.logits));
  }
}

// ------------------------------------------------------------------------ ProMoE: RCL

// Top-1 routed expert of each token (-1: padded, unconditional or no slot) from a plan.
std::vector<int64_t> top1_of(const RoutingPlan& p, int64_t E) {
  std::vector<int64_t> v(static_cast<size_t>(p.num_tokens()), -1);
  for (int64_t t = 0; t < p.num_tokens(); ++t)
    if (p.slots_of(t) > 0 && experts_of(p, t)[0] < E)
      v[static_cast<size_t>(t)] = experts_of(p, t)[0];
  return v;
}

TEST(ProMoERcl, MatchesReference) {
  Rng rng(19);
  int nonzero = 0;
  for (int i = 0; i < 120; ++i) {
    const ProCase c = random_pro_case(rng, -1.0, 0, 80);
    SCOPED_TRACE(describe(c));
    const ProMoERouter router(c.opt, c.mu);
    const Routed r = route_pro(c);
    const double got = moekit::routing_contrastive_loss(router, c.batch(), c.x.data(), r.plan);
    // On the library's assignment (independent of near-ties) ...
    const double want =
        pref::routing_contrastive_loss(c.mu.data(), c.opt.num_experts, c.opt.hidden, c.x.data(),
                                       c.T, top1_of(r.plan, c.opt.num_experts));
    EXPECT_NEAR(got, want, 1e-9 * std::max(1.0, std::fabs(want)));
    nonzero += want != 0.0;
    // ... and equal to the reference's own routing when no top-1 is a near-tie.
    const pref::Decisions dec = c.reference();
    std::vector<int64_t> top1(static_cast<size_t>(c.T), -1);
    bool tie = false;
    for (int64_t t = 0; t < c.T; ++t) {
      const auto& td = dec.token[static_cast<size_t>(t)];
      if (td.padded || td.unconditional) continue;
      top1[static_cast<size_t>(t)] = td.experts[0];
      tie |= pref::boundary_gap(td, 1) < kTieRel;
    }
    if (!tie) {
      EXPECT_NEAR(got,
                  pref::routing_contrastive_loss(c.mu.data(), c.opt.num_experts, c.opt.hidden,
                                                 c.x.data(), c.T, top1),
                  1e-9 * std::max(1.0, std::fabs(want)));
    }
    // Other temperatures.
    const double g2 = moekit::routing_contrastive_loss(router, c.batch(), c.x.data(), r.plan, 0.5);
    EXPECT_NEAR(
        g2,
        pref::routing_contrastive_loss(c.mu.data(), c.opt.num_experts, c.opt.hidden, c.x.data(),
                                       c.T, top1_of(r.plan, c.opt.num_experts), 0.5),
        1e-9 * std::max(1.0, std::fabs(g2)));
  }
  EXPECT_GT(nonzero, 60) << "most cases must have >= 2 experts with tokens (no vacuous pass)";
}

TEST(ProMoERcl, FewerThanTwoExpertsIsZero) {
  // All conditional tokens identical: one expert with tokens -> 0. One token -> 0.
  ProCase c;
  c.opt = pro_options(5, 2, 6);
  c.mu = Rng(20).vec(30, 1.0);
  c.T = 4;
  const std::vector<float> row = Rng(21).vec(6, 1.0);
  for (int t = 0; t < 4; ++t) c.x.insert(c.x.end(), row.begin(), row.end());
  c.x[18] = std::numeric_limits<float>::quiet_NaN();  // padded token 3: ignored
  c.pad = {0, 0, 0, 1};
  c.types = {0, 1, 0, 0};
  const ProMoERouter router(c.opt, c.mu);
  Routed r = route_pro(c);
  EXPECT_EQ(moekit::routing_contrastive_loss(router, c.batch(), c.x.data(), r.plan), 0.0);
  c.T = 1;
  c.x.resize(6);
  c.pad.clear();
  c.types.clear();
  r = route_pro(c);
  EXPECT_EQ(moekit::routing_contrastive_loss(router, c.batch(), c.x.data(), r.plan), 0.0);
  c.T = 0;
  c.x.clear();
  r = route_pro(c);
  EXPECT_EQ(moekit::routing_contrastive_loss(router, c.batch(), nullptr, r.plan), 0.0);
  // Two experts with tokens: positive, matches the reference.
  c.opt = pro_options(2, 1, 2);
  c.mu = {1, 0, 0, 1};
  c.T = 3;
  c.x = {2, 0.1f, 0.2f, 3, 1, -0.5f};
  const ProMoERouter r2(c.opt, c.mu);
  r = route_pro(c);
  const double got = moekit::routing_contrastive_loss(r2, c.batch(), c.x.data(), r.plan);
  EXPECT_GT(got, 0.0);
  EXPECT_NEAR(got, pref::routing_contrastive_loss(c.mu.data(), 2, 2, c.x.data(), 3, {0, 1, 0}),
              1e-12);
}

// ------------------------------------------------------------------------ centroid cases

struct CenCase {
  CentroidOptions opt;
  std::vector<float> c, x;
  std::vector<uint8_t> pad;
  int64_t T = 0;

  Batch batch() const {
    Batch b = Batch::single(T, opt.hidden);
    b.padding = pad;
    return b;
  }
  const uint8_t* pad_ptr() const { return pad.empty() ? nullptr : pad.data(); }
  pref::Decisions reference() const {
    return pref::route_centroid(c.data(), opt.num_experts, opt.hidden, x.data(), T, pad_ptr());
  }
};

std::string describe(const CenCase& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "T=%lld E=%lld d=%lld padded=%d", (long long)c.T,
                (long long)c.opt.num_experts, (long long)c.opt.hidden, !c.pad.empty());
  return buf;
}

CentroidOptions cen_options(int64_t E, int64_t d) {
  CentroidOptions o;
  o.num_experts = E;
  o.hidden = d;
  return o;
}

// Tokens: clustered around the centroids (or uniform), with an offset that moves the data
// away from the origin (distance cancellation).
CenCase random_cen_case(Rng& rng, int64_t min_T = 0, int64_t max_T = 80) {
  CenCase c;
  c.opt = cen_options(rng.integer(1, 48), rng.integer(1, 80));
  const int64_t E = c.opt.num_experts, d = c.opt.hidden;
  c.T = rng.integer(min_T, max_T);
  const double offset = rng.coin(0.3) ? rng.uniform(-5, 5) : 0.0;
  c.c = rng.vec(static_cast<size_t>(E * d), 1.0);
  for (float& v : c.c) v += static_cast<float>(offset);
  const bool clustered = rng.coin(0.6);
  const double noise = rng.uniform(0.05, 0.8);
  for (int64_t t = 0; t < c.T; ++t) {
    const int64_t e = rng.integer(0, E - 1);
    for (int64_t i = 0; i < d; ++i)
      c.x.push_back(clustered ? c.c[static_cast<size_t>(e * d + i)] +
                                    static_cast<float>(rng.uniform(-noise, noise))
                              : static_cast<float>(rng.uniform(-1.5, 1.5) + offset));
  }
  if (rng.coin(0.3)) {
    c.pad.assign(static_cast<size_t>(c.T), 0);
    const double rate = rng.uniform(0.05, 0.6);
    for (uint8_t& p : c.pad) p = rng.coin(rate);
  }
  return c;
}

Routed route_cen(const CenCase& c, int threads = 1) {
  const CentroidRouter router(c.opt, c.c);
  Routed r;
  router.route(c.batch(), c.x.data(), r.plan, r.scratch, threads);
  return r;
}

double cen_logit_tol(const pref::Decisions& want) {
  double scale = 1.0;
  for (const auto& td : want.token) scale = std::max(scale, td.tie_scale);
  return 2e-6 * scale;
}

Report check_cen(const CenCase& c, bool exclude_near_ties = true, int threads = 1) {
  SCOPED_TRACE(describe(c));
  const Routed r = route_cen(c, threads);
  const auto inv = ref::plan_invariant_errors(ref::view_of(r.plan), c.pad_ptr(), 1);
  EXPECT_TRUE(inv.empty()) << "plan invariants:" << join(inv);
  const pref::Decisions want = c.reference();
  Report rep = compare(want, r.plan, r.scratch.logits, 1, c.opt.num_experts, cen_logit_tol(want),
                       exclude_near_ties);
  EXPECT_TRUE(rep.errors.empty()) << "nearest-centroid routing differs from the reference:"
                                  << join(rep.errors);
  g_totals.centroid_compared += rep.compared;
  g_totals.centroid_near_tie += rep.near_tie;
  return rep;
}

// ------------------------------------------------------------------------ centroid: routing

TEST(CentroidRouting, HandComputedAndTies) {
  // 1-D centroids -1, 1, 4: x = 0 is equidistant from -1 and 1 -> the lower id.
  CenCase c;
  c.opt = cen_options(3, 1);
  c.c = {-1, 1, 4};
  c.T = 4;
  c.x = {0, 0.5f, 3, -7};
  const Routed r = route_cen(c);
  EXPECT_EQ(experts_of(r.plan, 0)[0], 0);
  EXPECT_EQ(experts_of(r.plan, 1)[0], 1);
  EXPECT_EQ(experts_of(r.plan, 2)[0], 2);
  EXPECT_EQ(experts_of(r.plan, 3)[0], 0);
  for (int64_t t = 0; t < 4; ++t) EXPECT_EQ(weights_of(r.plan, t), (std::vector<float>{1.0f}));
  EXPECT_EQ(r.scratch.logits[3 * 1 + 1], -0.25f);  // -(0.5 - 1)^2, exact here
  check_cen(c, /*exclude_near_ties=*/false);
  // Duplicate centroids: always the lower id.
  CenCase dup;
  dup.opt = cen_options(6, 8);
  const std::vector<float> half = Rng(22).vec(24, 1.0);
  dup.c = half;
  dup.c.insert(dup.c.end(), half.begin(), half.end());
  dup.T = 30;
  dup.x = Rng(23).vec(240, 1.0);
  const Routed rd = route_cen(dup);
  for (int64_t t = 0; t < dup.T; ++t) EXPECT_LT(experts_of(rd.plan, t)[0], 3);
  check_cen(dup, false);
}

TEST(CentroidRouting, MatchesReference) {
  Rng rng(0xCE27);
  int64_t compared = 0, excluded = 0;
  for (int i = 0; i < 300; ++i) {
    SCOPED_TRACE("case " + std::to_string(i));
    const Report rep = check_cen(random_cen_case(rng));
    compared += rep.compared;
    excluded += rep.near_tie;
    if (HasFailure()) return;
  }
  EXPECT_GT(compared, 5000);
  EXPECT_LE(excluded, compared / 200 + 2);
}

TEST(CentroidRouting, PaddingAndThreads) {
  Rng rng(24);
  for (int i = 0; i < 20; ++i) {
    CenCase c = random_cen_case(rng, 40, 200);
    c.pad.assign(static_cast<size_t>(c.T), 0);
    for (int64_t t = 1; t < c.T; t += 4) {
      c.pad[static_cast<size_t>(t)] = 1;
      c.x[static_cast<size_t>(t * c.opt.hidden)] =
          std::numeric_limits<float>::quiet_NaN();  // ignored
    }
    const Report rep = check_cen(c);
    EXPECT_EQ(rep.padded, (c.T + 2) / 4);
    const Routed a = route_cen(c, 1), b = route_cen(c, 2), d = route_cen(c, 3);
    expect_identical(a.plan, b.plan);
    expect_identical(a.plan, d.plan);
    EXPECT_TRUE(bits_equal(a.scratch.logits, b.scratch.logits));
    EXPECT_TRUE(bits_equal(a.scratch.logits, d.scratch.logits));
  }
  CenCase e;
  e.opt = cen_options(3, 2);
  e.c = {0, 0, 1, 1, 2, 2};
  const Routed r = route_cen(e);  // T = 0
  EXPECT_TRUE(r.plan.finalized());
  EXPECT_EQ(r.plan.num_slots(), 0);
}

// ------------------------------------------------------------------------ centroid: k-means

void check_kmeans(const CenCase& c, int threads = 1) {
  SCOPED_TRACE(describe(c));
  const CentroidRouter router(c.opt, c.c);
  const moekit::KMeansStep got = moekit::kmeans_step(router, c.batch(), c.x.data(), threads);
  const pref::KMeans want =
      pref::kmeans_step(c.c.data(), c.opt.num_experts, c.opt.hidden, c.x.data(), c.T, c.pad_ptr());
  const std::vector<float> c_before = router.centroids();
  EXPECT_EQ(c_before, c.c) << "kmeans_step must not modify the router";
  ASSERT_EQ(got.centroids.size(), want.centroids.size());
  EXPECT_EQ(got.counts, want.counts);
  std::vector<std::string> errs =
      ref::compare_values(want.centroids, got.centroids.data(), c.opt.hidden, 1e-6, 1e-7);
  EXPECT_TRUE(errs.empty()) << "centroids:" << join(errs);
  EXPECT_NEAR(got.inertia, want.inertia, 1e-9 * std::max(1.0, want.inertia));
  for (int64_t e = 0; e < c.opt.num_experts; ++e) {
    if (want.counts[static_cast<size_t>(e)] != 0) continue;
    for (int64_t i = 0; i < c.opt.hidden; ++i) {  // an empty cluster stays, bit for bit
      EXPECT_EQ(got.centroids[static_cast<size_t>(e * c.opt.hidden + i)],
                c.c[static_cast<size_t>(e * c.opt.hidden + i)]);
    }
  }
}

bool has_near_tie(const CenCase& c) {
  for (const auto& td : c.reference().token)
    if (!td.padded && pref::boundary_gap(td, 1) < kTieRel) return true;
  return false;
}

TEST(CentroidKMeans, StepMatchesReference) {
  Rng rng(25);
  int checked = 0, skipped = 0, with_empty = 0;
  for (int i = 0; i < 150; ++i) {
    const CenCase c = random_cen_case(rng, 0, 120);
    if (has_near_tie(c)) {  // one flipped assignment moves two means: skip the case
      ++skipped;
      continue;
    }
    check_kmeans(c);
    const pref::KMeans want = pref::kmeans_step(c.c.data(), c.opt.num_experts, c.opt.hidden,
                                                c.x.data(), c.T, c.pad_ptr());
    with_empty += std::count(want.counts.begin(), want.counts.end(), 0) > 0;
    double mx = 0;
    for (double v : want.centroids) mx = std::max(mx, std::fabs(v));
    EXPECT_GT(mx, 0.0);
    ++checked;
    if (HasFailure()) return;
  }
  EXPECT_GT(checked, 140);
  EXPECT_LE(skipped, 3);
  EXPECT_GT(with_empty, 20) << "empty clusters must be exercised";
}

TEST(CentroidKMeans, EmptyClusterPaddingAndConvergence) {
  // Centroid 2 far away: no token, stays. Padded tokens (even NaN) take no part in the means.
  CenCase c;
  c.opt = cen_options(3, 2);
  c.c = {0, 0, 10, 10, 1000, -1000};
  c.T = 6;
  c.x = {1, 1, 11, 9, -1, 0, 9, 12, std::numeric_limits<float>::quiet_NaN(), 0, 500, 500};
  c.pad = {0, 0, 0, 0, 1, 1};
  const moekit::KMeansStep s =
      moekit::kmeans_step(CentroidRouter(c.opt, c.c), c.batch(), c.x.data());
  EXPECT_EQ(s.counts, (std::vector<int64_t>{2, 2, 0}));
  EXPECT_EQ(s.centroids, (std::vector<float>{0, 0.5f, 10, 10.5f, 1000, -1000}));
  EXPECT_DOUBLE_EQ(s.inertia,
                   2.0 + 1.0 + 2.0 + 5.0);  // (1,1), (-1,0) to (0,0); (11,9), (9,12) to (10,10)
  check_kmeans(c);
  // Lloyd steps never increase the objective; the router takes the new centroids.
  Rng rng(26);
  for (int i = 0; i < 10; ++i) {
    CenCase q = random_cen_case(rng, 60, 150);
    q.pad.clear();
    CentroidRouter router(q.opt, q.c);
    double prev = std::numeric_limits<double>::infinity();
    for (int step = 0; step < 5; ++step) {
      const moekit::KMeansStep st = moekit::kmeans_step(router, q.batch(), q.x.data());
      EXPECT_LE(st.inertia, prev * (1 + 1e-6) + 1e-9);
      prev = st.inertia;
      router.set_centroids(st.centroids);
    }
  }
}

TEST(CentroidKMeans, IdenticalAcrossThreadCounts) {
  Rng rng(27);
  for (int i = 0; i < 10; ++i) {
    CenCase c = random_cen_case(rng, 50, 300);
    c.opt.hidden = std::max<int64_t>(c.opt.hidden, 2);
    c.opt = cen_options(c.opt.num_experts, 150);  // several column blocks
    c.c = rng.vec(static_cast<size_t>(c.opt.num_experts * 150), 1.0);
    c.x = rng.vec(static_cast<size_t>(c.T * 150), 1.0);
    c.pad.clear();
    const CentroidRouter router(c.opt, c.c);
    const moekit::KMeansStep a = moekit::kmeans_step(router, c.batch(), c.x.data(), 1);
    const moekit::KMeansStep b = moekit::kmeans_step(router, c.batch(), c.x.data(), 2);
    EXPECT_TRUE(bits_equal(a.centroids, b.centroids));
    EXPECT_EQ(a.counts, b.counts);
    EXPECT_EQ(a.inertia, b.inertia);
  }
}

// ------------------------------------------------------------------------ layers



// Reference decisions, with the library's own for excluded (near-tie) tokens.
ref::Routing merged(const pref::Decisions& want, const Report& rep, const RoutingPlan& plan,
                    const uint8_t* pad) {
  ref::Routing r = pref::as_routing(want);
  const ref::Routing lib = ref::routing_from_view(ref::view_of(plan), pad);
  for (int64_t t = 0; t < want.tokens; ++t)
    if (rep.excluded[static_cast<size_t>(t)])
      r.token[static_cast<size_t>(t)] = lib.token[static_cast<size_t>(t)];
  return r;
}

TEST(ProMoELayer, ForwardMatchesReference) {
  Rng rng(28);
  for (int i = 0; i < 12; ++i) {
    ProCase c = random_pro_case(rng, i % 3 == 0 ? 0.0 : 0.35, 1, 40);
    c.opt.hidden = rng.integer(4, 40);
    const int64_t E = c.opt.num_experts, d = c.opt.hidden, f = rng.integer(4, 48);
    c.mu = rng.vec(static_cast<size_t>(E * d), 1.0);
    c.x = rng.vec(static_cast<size_t>(c.T * d), 1.0);
    SCOPED_TRACE(describe(c));
    std::vector<ref::Ffn> experts;  // experts.{i}, then uncond_expert at index E
    for (int64_t e = 0; e <= E; ++e) experts.push_back(random_ref_ffn(rng, d, f));
    const ref::Ffn shared_ffn = random_ref_ffn(rng, d, f + 3);
    std::vector<moekit::SharedExpert> shared;
    shared.push_back({bank_of({shared_ffn}, d, f + 3), {}});
    const moekit::SparseLayer<ProMoERouter, FfnBank> layer(
        ProMoERouter(c.opt, c.mu), bank_of(experts, d, f), std::move(shared));
    Workspace ws;
    std::vector<float> out(static_cast<size_t>(c.T * d), 7.0f), out2(out.size());
    layer.forward(c.batch(), c.x.data(), out.data(), ws, 1);
    const pref::Decisions want = c.reference();
    const Report rep = compare(want, ws.plan, ws.router.logits, c.opt.k, E, pro_logit_tol(c));
    EXPECT_TRUE(rep.errors.empty()) << join(rep.errors);
    const std::vector<double> y = ref::moe_forward(merged(want, rep, ws.plan, c.pad_ptr()), experts,
                                                   {{shared_ffn, {}}}, c.x.data(), c.T, d);
    ASSERT_GT(ref::max_abs(y), 0.0);
    const auto errs = ref::compare_values(y, out.data(), d, 1e-4, 1e-5);
    EXPECT_TRUE(errs.empty()) << "layer output:" << join(errs);
    for (int64_t t = 0; t < c.T; ++t) {
      if (c.pad.empty() || !c.pad[static_cast<size_t>(t)]) continue;
      for (int64_t j = 0; j < d; ++j) EXPECT_EQ(out[static_cast<size_t>(t * d + j)], 0.0f);
    }
    Workspace ws2;
    layer.forward(c.batch(), c.x.data(), out2.data(), ws2, 2);
    EXPECT_TRUE(bits_equal(out, out2)) << "threads 1 vs 2";
  }
}

TEST(CentroidLayer, ForwardMatchesReference) {
  Rng rng(29);
  for (int i = 0; i < 12; ++i) {
    CenCase c = random_cen_case(rng, 1, 50);
    const int64_t E = c.opt.num_experts, d = c.opt.hidden, f = rng.integer(2, 40);
    SCOPED_TRACE(describe(c));
    std::vector<ref::Ffn> experts;
    for (int64_t e = 0; e < E; ++e) experts.push_back(random_ref_ffn(rng, d, f));
    const moekit::SparseLayer<CentroidRouter, FfnBank> layer(CentroidRouter(c.opt, c.c),
                                                             bank_of(experts, d, f));
    Workspace ws;
    std::vector<float> out(static_cast<size_t>(c.T * d), 7.0f), out2(out.size());
    layer.forward(c.batch(), c.x.data(), out.data(), ws, 1);
    const pref::Decisions want = c.reference();
    const Report rep = compare(want, ws.plan, ws.router.logits, 1, E, cen_logit_tol(want));
    EXPECT_TRUE(rep.errors.empty()) << join(rep.errors);
    const std::vector<double> y =
        ref::moe_forward(merged(want, rep, ws.plan, c.pad_ptr()), experts, {}, c.x.data(), c.T, d);
    if (rep.padded < c.T) {
      ASSERT_GT(ref::max_abs(y), 0.0);
    }
    const auto errs = ref::compare_values(y, out.data(), d, 1e-4, 1e-5);
    EXPECT_TRUE(errs.empty()) << "layer output:" << join(errs);
    Workspace ws2;
    layer.forward(c.batch(), c.x.data(), out2.data(), ws2, 2);
    EXPECT_TRUE(bits_equal(out, out2)) << "threads 1 vs 2";
  }
}

// ------------------------------------------------------------------------ errors

TEST(PrototypeErrors, ProMoEOptionsAndWeights) {
  const std::vector<float> mu(12, 0.5f);
  expect_error([&] { ProMoERouter(pro_options(0, 1, 3), {}); }, "num_experts");
  expect_error([&] { ProMoERouter(pro_options(4, 0, 3), mu); }, "k expected in [1, E = 4], got 0");
  expect_error([&] { ProMoERouter(pro_options(4, 5, 3), mu); }, "k expected");
  expect_error([&] { ProMoERouter(pro_options(4, 1, 0), mu); }, "hidden size");
  expect_error([&] { ProMoERouter(pro_options(4, 1, 3, 0.0f), mu); }, "tau_r");
  expect_error([&] { ProMoERouter(pro_options(4, 1, 3, -1.0f), mu); }, "tau_r");
  expect_error(
      [&] { ProMoERouter(pro_options(4, 1, 3, std::numeric_limits<float>::quiet_NaN()), mu); },
      "tau_r");
  expect_error(
      [&] { ProMoERouter(pro_options(4, 1, 3, std::numeric_limits<float>::infinity()), mu); },
      "tau_r");
  expect_error([&] { ProMoERouter(pro_options(4, 1, 3, 1e-40f), mu); }, "tau_r");
  expect_error([&] { ProMoERouter(pro_options(4, 1, 3), std::vector<float>(11)); },
               "router.prototypes expected [4, 3] = 12 values, got 11");
  std::vector<float> bad = mu;
  bad[7] = std::numeric_limits<float>::infinity();
  expect_error([&] { ProMoERouter(pro_options(4, 1, 3), bad); },
               "router.prototypes[2, 1] expected finite");
  ProMoERouter ok(pro_options(4, 1, 3), mu);
  expect_error([&] { ok.set_prototypes(std::vector<float>(3)); }, "router.prototypes");
}

TEST(PrototypeErrors, ProMoEInputs) {
  const ProMoERouter router(pro_options(4, 2, 3), Rng(30).vec(12, 1.0));
  RoutingPlan plan;
  RouterScratch scratch;
  std::vector<float> x = Rng(31).vec(9, 1.0);
  x[4] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { router.route(Batch::single(3, 3), x.data(), plan, scratch, 2); },
               "hidden_states[1, 1] expected finite, got nan");
  // NaN in an unconditional token is an error too; in a padded one it is not.
  const std::vector<int32_t> types = {0, 1, 0};
  Batch b = Batch::single(3, 3);
  b.token_types = types;
  expect_error([&] { router.route(b, x.data(), plan, scratch); }, "hidden_states[1, 1]");
  const std::vector<uint8_t> pad = {0, 1, 0};
  b.padding = pad;
  router.route(b, x.data(), plan, scratch);
  EXPECT_EQ(plan.slots_of(1), 0);
  x[8] = -std::numeric_limits<float>::infinity();
  expect_error([&] { router.route(b, x.data(), plan, scratch); },
               "hidden_states[2, 2] expected finite, got -inf");
  // Layout errors.
  expect_error([&] { router.route(Batch::single(3, 4), x.data(), plan, scratch); }, "Batch.hidden");
  const std::vector<int32_t> short_types = {0, 1};
  Batch bt = Batch::single(3, 3);
  bt.token_types = short_types;
  expect_error([&] { router.route(bt, x.data(), plan, scratch); },
               "Batch.token_types: expected 3 entries, got 2");
  expect_error([&] { router.route(Batch::single(3, 3), nullptr, plan, scratch); }, "null");
  // RCL arguments.
  std::vector<float> y = Rng(32).vec(9, 1.0);
  router.route(Batch::single(3, 3), y.data(), plan, scratch);
  expect_error(
      [&] {
        (void)moekit::routing_contrastive_loss(router, Batch::single(3, 3), y.data(), plan, 0.0);
      },
      "temperature");
  expect_error(
      [&] { (void)moekit::routing_contrastive_loss(router, Batch::single(2, 3), y.data(), plan); },
      "plan tokens expected 2");
  RoutingPlan other;
  other.reset(3, 4, [](int64_t) { return 1; });
  other.finalize();
  expect_error(
      [&] { (void)moekit::routing_contrastive_loss(router, Batch::single(3, 3), y.data(), other); },
      "plan experts expected 5");
}

TEST(PrototypeErrors, CentroidOptionsWeightsAndInputs) {
  expect_error([&] { CentroidRouter(cen_options(0, 2), {}); }, "num_experts");
  expect_error([&] { CentroidRouter(cen_options(2, 0), {}); }, "hidden size");
  expect_error([&] { CentroidRouter(cen_options(2, 3), std::vector<float>(5)); },
               "router.centroids expected [2, 3] = 6 values, got 5");
  std::vector<float> bad(6, 1.0f);
  bad[4] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { CentroidRouter(cen_options(2, 3), bad); },
               "router.centroids[1, 1] expected finite");
  expect_error([&] { CentroidRouter(cen_options(1, 2), {3e19f, 3e19f}); }, "squared norm");
  const CentroidRouter router(cen_options(2, 3), {0, 0, 0, 1, 1, 1});
  RoutingPlan plan;
  RouterScratch scratch;
  std::vector<float> x = {1, 2, 3, 4, std::numeric_limits<float>::infinity(), 6};
  expect_error([&] { router.route(Batch::single(2, 3), x.data(), plan, scratch); },
               "hidden_states[1, 1] expected finite, got inf");
  expect_error([&] { (void)moekit::kmeans_step(router, Batch::single(2, 3), x.data()); },
               "hidden_states[1, 1]");
  x = {1, 2, 3, 1e30f, 0, 0};
  expect_error([&] { router.route(Batch::single(2, 3), x.data(), plan, scratch); }, "overflow");
  expect_error([&] { router.route(Batch::single(2, 2), x.data(), plan, scratch); }, "Batch.hidden");
  CentroidRouter r2 = router;
  expect_error([&] { r2.set_centroids({1, 2}); }, "router.centroids");
}

}  // namespace
