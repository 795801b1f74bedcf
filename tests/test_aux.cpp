// SPDX-License-Identifier: Apache-2.0
// Auxiliary routing quantities against plain double-precision formulas.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "moekit/routers/aux.hpp"

namespace {

struct Routed {
  moekit::TopKRouter router;
  moekit::RoutingPlan plan;
  moekit::RouterScratch scratch;
};

Routed route(int64_t T, int64_t E, int64_t k, int64_t d, moekit::ScoreFunc sf, const moekit::Batch& b, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(E * d)), x(static_cast<size_t>(T * d));
  for (float& v : w) v = n(g);
  for (float& v : x) v = n(g);
  moekit::TopKOptions o{.num_experts = E, .k = k, .hidden = d, .score_func = sf};
  Routed r{moekit::TopKRouter(o, w), {}, {}};
  r.router.route(b, x.data(), r.plan, r.scratch, 1);
  return r;
}

TEST(AuxLosses, LoadBalancingAndZLossMatchFormulas) {
  for (auto sf : {moekit::ScoreFunc::softmax, moekit::ScoreFunc::sigmoid}) {
    const int64_t T = 37, E = 9, k = 3, d = 13;
    std::vector<uint8_t> pad(T, 0);
    pad[4] = pad[20] = 1;
    moekit::Batch b = moekit::Batch::single(T, d);
    b.padding = pad;
    Routed r = route(T, E, k, d, sf, b, 7);
    const auto& L = r.scratch.logits;
    // Plain formulas.
    std::vector<double> f(E, 0), P(E, 0);
    double z = 0;
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (pad[t]) continue;
      ++n;
      double m = -1e300, s = 0, ssig = 0;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(L[t * E + e]));
      for (int64_t e = 0; e < E; ++e) s += std::exp(L[t * E + e] - m);
      for (int64_t e = 0; e < E; ++e) ssig += 1 / (1 + std::exp(-static_cast<double>(L[t * E + e])));
      for (int64_t e = 0; e < E; ++e)
        P[e] += sf == moekit::ScoreFunc::softmax ? std::exp(L[t * E + e] - m) / s
                                                 : 1 / (1 + std::exp(-static_cast<double>(L[t * E + e]))) / ssig;
      z += (m + std::log(s)) * (m + std::log(s));
      for (int64_t j = 0; j < k; ++j) f[r.plan.slot_expert()[r.plan.slot_offsets()[t] + j]] += 1;
    }
    double loss = 0;
    for (int64_t e = 0; e < E; ++e) loss += f[e] / (k * n) * P[e] / n;
    loss *= E;
    EXPECT_NEAR(moekit::load_balancing_loss(r.plan, L, b, sf), loss, 1e-9);
    EXPECT_NEAR(moekit::load_balancing_loss(r.plan, L, b, sf, true), k * loss, 1e-9);
    EXPECT_NEAR(moekit::router_z_loss(L, E, b), z / n, 1e-6 * (z / n));
    EXPECT_GT(loss, 0.0);
  }
}

// Megatron-LM's aux, seq and global losses (moe_utils.py switch_load_balancing_loss_func over
// compute_routing_scores_for_aux_loss), transcribed in double: scores, their own top-k map.
double megatron_formula(const std::vector<float>& L, int64_t E, int64_t k, const std::vector<int64_t>& toks,
                        moekit::ScoreFunc sf, const std::vector<double>* counts = nullptr) {
  std::vector<double> P(E, 0), C(E, 0);
  for (int64_t t : toks) {
    std::vector<double> s(E);
    double m = -1e300, z = 0;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(L[t * E + e]));
    for (int64_t e = 0; e < E; ++e)
      z += (s[e] = sf == moekit::ScoreFunc::softmax ? std::exp(L[t * E + e] - m)
                                                    : 1 / (1 + std::exp(-static_cast<double>(L[t * E + e]))));
    for (int64_t e = 0; e < E; ++e) P[e] += s[e] / z;
    std::vector<int64_t> idx(E);
    for (int64_t e = 0; e < E; ++e) idx[e] = e;
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return s[a] > s[b]; });
    for (int64_t j = 0; j < k; ++j) C[idx[j]] += 1;
  }
  const double n = static_cast<double>(toks.size());
  double sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += P[e] * (counts ? (*counts)[e] : C[e]);
  return sum * E / (k * n * n);
}

TEST(AuxLosses, MegatronAuxSeqAndGlobalLosses) {
  for (auto sf : {moekit::ScoreFunc::softmax, moekit::ScoreFunc::sigmoid}) {
    const int64_t T = 30, E = 7, k = 2, d = 11;
    std::vector<uint8_t> pad(T, 0);
    pad[3] = pad[17] = 1;
    const std::vector<int32_t> offsets = {0, 12, 12, 30};  // an empty sequence in the middle
    moekit::Batch b = moekit::Batch::single(T, d);
    b.padding = pad;
    b.sequence_offsets = offsets;
    Routed r = route(T, E, k, d, sf, b, 11);
    const auto& L = r.scratch.logits;
    std::vector<int64_t> all, s0, s2;
    for (int64_t t = 0; t < T; ++t)
      if (!pad[t]) (all.push_back(t), (t < 12 ? s0 : s2).push_back(t));
    EXPECT_NEAR(moekit::megatron_aux_loss(L, E, k, b, sf), megatron_formula(L, E, k, all, sf), 1e-12);
    const double seq = (megatron_formula(L, E, k, s0, sf) + megatron_formula(L, E, k, s2, sf)) / 2;
    EXPECT_NEAR(moekit::megatron_aux_loss(L, E, k, b, sf, true), seq, 1e-12);
    EXPECT_NE(seq, megatron_formula(L, E, k, all, sf));
    // Global: the second call weighs its scores with the mean of both calls' counts.
    moekit::MegatronGlobalAuxLoss g;
    const double first = g.add(L, E, k, b, sf);
    EXPECT_NEAR(first, megatron_formula(L, E, k, all, sf), 1e-12);
    Routed r2 = route(T, E, k, d, sf, b, 12);
    std::vector<double> mean(E, 0);
    for (const auto* rr : {&r, &r2})
      for (int64_t t : all) {
        std::vector<int64_t> idx(E);
        for (int64_t e = 0; e < E; ++e) idx[e] = e;
        const auto& LL = rr->scratch.logits;
        std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t c) { return LL[t * E + a] > LL[t * E + c]; });
        for (int64_t j = 0; j < k; ++j) mean[idx[j]] += 0.5;
      }
    EXPECT_NEAR(g.add(r2.scratch.logits, E, k, b, sf), megatron_formula(r2.scratch.logits, E, k, all, sf, &mean), 1e-12);
    EXPECT_EQ(g.calls(), 2);
    g.reset();
    EXPECT_EQ(g.calls(), 0);
    EXPECT_THROW((void)moekit::megatron_aux_loss(L, E, E + 1, b, sf), moekit::error);
  }
}

TEST(AuxLosses, BalancedUniformRoutingGivesOne) {
  // All logits equal: p = 1/E; each token picks experts 0..k-1 (ties to the lower id), so
  // f is concentrated: loss = E * sum_{i<k} (1/k) * (1/E) = 1.
  const int64_t T = 8, E = 4, k = 2, d = 3;
  moekit::TopKOptions o{.num_experts = E, .k = k, .hidden = d};
  moekit::TopKRouter router(o, std::vector<float>(E * d, 0.0f));
  std::vector<float> x(T * d, 1.0f);
  moekit::RoutingPlan plan;
  moekit::RouterScratch s;
  const auto b = moekit::Batch::single(T, d);
  router.route(b, x.data(), plan, s, 1);
  EXPECT_NEAR(moekit::load_balancing_loss(plan, s.logits, b, moekit::ScoreFunc::softmax), 1.0, 1e-12);
  EXPECT_NEAR(moekit::router_z_loss(s.logits, E, b), std::log(4.0) * std::log(4.0), 1e-6);
  const auto st = moekit::routing_stats(plan, s.logits, b);
  EXPECT_EQ(st.load, (std::vector<int64_t>{8, 8, 0, 0}));
  EXPECT_NEAR(st.max_mean_load_ratio, 2.0, 1e-12);
  EXPECT_NEAR(st.entropy, std::log(4.0), 1e-9);
  EXPECT_NEAR(st.mean_selected_weight, 0.25, 1e-7);
  EXPECT_EQ(st.drop_rate, 0.0);
  // Bias update: under-loaded experts 2, 3 go up, over-loaded 0, 1 go down.
  const auto bias = moekit::update_selection_bias({}, plan, 0.5f);
  EXPECT_EQ(bias, (std::vector<float>{-0.5f, -0.5f, 0.5f, 0.5f}));
  EXPECT_THROW(moekit::update_selection_bias(std::vector<float>(3), plan), moekit::error);
  EXPECT_THROW(moekit::load_balancing_loss(plan, std::span<const float>(s.logits).first(5), b, moekit::ScoreFunc::softmax),
               moekit::error);
}

TEST(AuxLosses, DropRateCountsDroppedSlots) {
  const int64_t T = 10, E = 2, k = 1, d = 2;
  moekit::TopKOptions o{.num_experts = E, .k = k, .hidden = d, .capacity_factor = 0.5, .drop_policy = moekit::DropPolicy::position};
  moekit::TopKRouter router(o, std::vector<float>{1, 0, 0, 1});
  std::vector<float> x(T * d, 0.0f);
  for (int t = 0; t < T; ++t) x[t * d] = 1.0f;  // every token prefers expert 0
  moekit::RoutingPlan plan;
  moekit::RouterScratch s;
  const auto b = moekit::Batch::single(T, d);
  router.route(b, x.data(), plan, s, 1);
  // C = ceil(10 * 1 / 2 * 0.5) = 3: 3 kept, 7 dropped.
  const auto st = moekit::routing_stats(plan, {}, b);
  EXPECT_EQ(plan.num_kept(), 3);
  EXPECT_NEAR(st.drop_rate, 0.7, 1e-12);
  EXPECT_EQ(st.entropy, 0.0);
  // Bias update: both counts lower expert 0 here (selected 10 of 10 above the mean 5, kept
  // 3 above 1.5); BiasUpdateCountsSelectedSlots shows where they differ.
  EXPECT_EQ(moekit::update_selection_bias({}, plan, 1.0f), (std::vector<float>{-1.0f, 1.0f}));
  EXPECT_EQ(moekit::update_selection_bias({}, plan, 1.0f, moekit::BiasLoad::kept), (std::vector<float>{-1.0f, 1.0f}));
}

// Selected and kept loads disagree when an expert's drops move it across the mean.
TEST(AuxLosses, BiasUpdateCountsSelectedSlots) {
  moekit::RoutingPlan plan;
  // Hand-built plan: 4 tokens, E = 2, k = 1; expert 0 chosen by 3 tokens of which 2 dropped,
  // expert 1 by 1 token kept. Selected loads 3 / 1 (mean 2): expert 0 down. Kept 1 / 1: no change.
  plan.reset(4, 2, [](int64_t) { return 1; });
  const int32_t ids[4] = {0, 0, 0, 1};
  for (int64_t t = 0; t < 4; ++t) {
    plan.token_experts(t)[0] = ids[t];
    plan.token_weights(t)[0] = 1.0f;
  }
  plan.token_dropped(1)[0] = 1;
  plan.token_dropped(2)[0] = 1;
  plan.token_weights(1)[0] = 0.0f;
  plan.token_weights(2)[0] = 0.0f;
  plan.finalize();
  ASSERT_EQ(plan.kept_of(0), 1);
  ASSERT_EQ(plan.dropped_of(0), 2);
  EXPECT_EQ(moekit::update_selection_bias({}, plan, 1.0f), (std::vector<float>{-1.0f, 1.0f}));
  EXPECT_EQ(moekit::update_selection_bias({}, plan, 1.0f, moekit::BiasLoad::kept), (std::vector<float>{0.0f, 0.0f}));
}

}  // namespace

// ------------------------------------------------------------------ expert-router coupling (ERC)
namespace {

// ||W_g^j v|| in double: expert j's gate pre-activation norm on the row `v [d]` (gate [E, f, d]).
double gate_norm(const std::vector<float>& gate, int64_t j, int64_t f, int64_t d, const float* v) {
  double s = 0;
  for (int64_t h = 0; h < f; ++h) {
    double z = 0;
    for (int64_t c = 0; c < d; ++c) z += double(gate[size_t((j * f + h) * d + c)]) * v[c];
    s += z * z;
  }
  return std::sqrt(s);
}

// Plain double reference of ROUTING.md section 7's ERC loss on given proxies.
double erc_reference(const std::vector<float>& proxy, const std::vector<float>& gate, int64_t E, int64_t d, int64_t f,
                     double a, std::vector<double>& M) {
  M.assign(static_cast<size_t>(E * E), 0.0);
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < E; ++j) M[size_t(i * E + j)] = gate_norm(gate, j, f, d, proxy.data() + i * d);
  double sum = 0;
  int64_t pairs = 0;
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < E; ++j)
      if (i != j) {
        const double own = a * M[size_t(i * E + i)];
        sum += std::max(0.0, M[size_t(i * E + j)] - own) + std::max(0.0, M[size_t(j * E + i)] - own);
        ++pairs;
      }
  return pairs ? sum / double(pairs) : 0.0;
}

TEST(ErcLoss, MatchesReferenceOnRandomLayers) {
  std::mt19937_64 g(17);
  std::uniform_real_distribution<double> u(-1, 1);
  for (int it = 0; it < 40; ++it) {
    const int64_t E = 1 + int64_t(g() % 9), d = 1 + int64_t(g() % 12), f = 1 + int64_t(g() % 7);
    std::vector<float> R(size_t(E * d)), W(size_t(E * f * d));
    for (float& v : R) v = float(u(g));
    for (float& v : W) v = float(u(g));
    moekit::ErcOptions o;
    o.alpha = 0.5 + 0.5 * (u(g) + 1) / 2;
    o.epsilon = it % 3 == 0 ? 0.05 : 0.0;
    o.seed = uint64_t(it);
    const moekit::ErcResult r = moekit::erc_loss(R, W, E, d, f, o);
    // Noise half-widths: half the distance to the nearest other row over the row's norm, capped.
    const std::vector<float> proxy = moekit::erc_proxies(R, E, d, o);
    for (int64_t i = 0; i < E; ++i) {
      double norm = 0, nn = INFINITY;
      for (int64_t c = 0; c < d; ++c) norm += double(R[size_t(i * d + c)]) * R[size_t(i * d + c)];
      for (int64_t j = 0; j < E; ++j) {
        if (j == i) continue;
        double s = 0;
        for (int64_t c = 0; c < d; ++c) s += std::pow(double(R[size_t(i * d + c)]) - R[size_t(j * d + c)], 2);
        nn = std::min(nn, std::sqrt(s));
      }
      double want = E > 1 ? std::min(1.0, nn / (2 * std::sqrt(norm))) : 0.0;
      if (o.epsilon > 0) want = std::min(want, o.epsilon);
      EXPECT_NEAR(r.epsilon[size_t(i)], want, 1e-12) << "expert " << i;
      for (int64_t c = 0; c < d; ++c) {
        const double ratio = double(proxy[size_t(i * d + c)]) / R[size_t(i * d + c)];
        EXPECT_LE(std::fabs(ratio - 1.0), want + 1e-6) << i << ", " << c;
      }
    }
    std::vector<double> M;
    const double loss = erc_reference(proxy, W, E, d, f, o.alpha, M);
    EXPECT_NEAR(r.loss, loss, 1e-9 * (1 + loss));
    for (size_t q = 0; q < M.size(); ++q) EXPECT_NEAR(r.activation[q], M[q], 1e-9 * (1 + M[q]));
    // alpha_zero is where the loss vanishes: 0 at alpha_zero, > 0 just below it.
    if (E > 1 && r.alpha_zero > 0 && r.alpha_zero < 1) {
      std::vector<double> M2;
      EXPECT_NEAR(erc_reference(proxy, W, E, d, f, r.alpha_zero, M2), 0.0, 1e-9);
      EXPECT_GT(erc_reference(proxy, W, E, d, f, r.alpha_zero * 0.999, M2), 0.0);
    }
  }
}

TEST(ErcLoss, SpecialisedExpertsHaveNoViolations) {
  // Router rows e_i (one-hot) and gate projections that read only their own coordinate: every
  // expert answers its own proxy and nothing else, so the loss is 0 at any alpha. Swapping two
  // experts' gates breaks both constraints for them.
  const int64_t E = 4, d = 4, f = 2;
  std::vector<float> R(size_t(E * d), 0.0f), W(size_t(E * f * d), 0.0f);
  for (int64_t i = 0; i < E; ++i) R[size_t(i * d + i)] = 1.0f;
  for (int64_t j = 0; j < E; ++j)
    for (int64_t h = 0; h < f; ++h) W[size_t((j * f + h) * d + j)] = 0.7f;
  moekit::ErcResult r = moekit::erc_loss(R, W, E, d, f);
  EXPECT_EQ(r.loss, 0.0);
  EXPECT_EQ(r.proxy_violations + r.expert_violations, 0);
  EXPECT_EQ(r.alpha_zero, 0.0);
  std::swap_ranges(W.begin(), W.begin() + f * d, W.begin() + f * d);  // experts 0 and 1 trade gates
  r = moekit::erc_loss(R, W, E, d, f);
  EXPECT_GT(r.loss, 0.0);
  EXPECT_EQ(r.proxy_violations, 2);
  EXPECT_EQ(r.expert_violations, 2);
  EXPECT_TRUE(std::isinf(r.alpha_zero));  // M[0, 0] = 0 with M[0, 1] > 0
}

// ERC on a routed batch: each expert's kept tokens in place of its proxy, against loops over
// the plan's slots in the order a reader would write them.
TEST(ErcCoupling, MatchesReferenceOnRoutedBatches) {
  std::mt19937_64 g(23);
  std::uniform_real_distribution<double> u(-1, 1);
  for (int it = 0; it < 30; ++it) {
    const int64_t E = 2 + int64_t(g() % 7), k = 1 + int64_t(g() % std::min<int64_t>(E, 3)), d = 1 + int64_t(g() % 10),
                  f = 1 + int64_t(g() % 6), T = 1 + int64_t(g() % 40);
    std::vector<float> Rw(size_t(E * d)), W(size_t(E * f * d)), x(size_t(T * d));
    for (float& v : Rw) v = float(u(g));
    for (float& v : W) v = float(u(g));
    for (float& v : x) v = float(u(g));
    moekit::Batch b = moekit::Batch::single(T, d);
    std::vector<uint8_t> pad;
    if (it % 2) {  // padding rows hold NaN: never read
      pad.assign(size_t(T), 0);
      for (int64_t t = 0; t < T; t += 3) {
        pad[size_t(t)] = 1;
        for (int64_t c = 0; c < d; ++c) x[size_t(t * d + c)] = std::nanf("");
      }
      b.padding = pad;
    }
    moekit::TopKOptions o{.num_experts = E, .k = k, .hidden = d};
    if (it % 3 == 0) o.capacity_factor = 0.5;  // some slots dropped: not counted
    moekit::TopKRouter router(o, Rw);
    moekit::RoutingPlan plan;
    moekit::RouterScratch scratch;
    router.route(b, x.data(), plan, scratch, 1);
    const double alpha = 0.5 + 0.25 * (u(g) + 1);
    const moekit::ErcCoupling r = moekit::erc_coupling(plan, b, x, W, E, d, f, alpha);

    std::vector<double> A(size_t(E * E), 0.0);
    std::vector<int64_t> n(size_t(E), 0);
    int64_t slots = 0, coupled = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (b.is_padding(t)) continue;
      std::vector<double> act(static_cast<size_t>(E));
      for (int64_t j = 0; j < E; ++j) act[size_t(j)] = gate_norm(W, j, f, d, x.data() + t * d);
      for (int32_t sl = plan.slot_offsets()[size_t(t)]; sl < plan.slot_offsets()[size_t(t) + 1]; ++sl) {
        if (plan.slot_dropped()[size_t(sl)]) continue;
        const int64_t e = plan.slot_expert()[size_t(sl)];
        ++n[size_t(e)];
        ++slots;
        coupled += act[size_t(e)] == *std::max_element(act.begin(), act.end());
        for (int64_t j = 0; j < E; ++j) A[size_t(e * E + j)] += act[size_t(j)];
      }
    }
    double sum = 0, az = 0;
    int64_t pairs = 0, tv = 0, ev = 0;
    for (int64_t i = 0; i < E; ++i)
      for (int64_t j = 0; j < E; ++j) A[size_t(i * E + j)] /= n[size_t(i)] > 0 ? double(n[size_t(i)]) : 1.0;
    for (int64_t i = 0; i < E; ++i)
      for (int64_t j = 0; j < E; ++j) {
        if (i == j || n[size_t(i)] == 0 || n[size_t(j)] == 0) continue;
        const double own = alpha * A[size_t(i * E + i)];
        sum += std::max(0.0, A[size_t(i * E + j)] - own) + std::max(0.0, A[size_t(j * E + i)] - own);
        tv += A[size_t(i * E + j)] > own;
        ev += A[size_t(j * E + i)] > own;
        az = std::max(az, std::max(A[size_t(i * E + j)], A[size_t(j * E + i)]) / A[size_t(i * E + i)]);
        ++pairs;
      }
    EXPECT_EQ(r.tokens, n) << it;
    EXPECT_EQ(r.slots, slots);
    EXPECT_NEAR(r.coupled_fraction, slots ? double(coupled) / double(slots) : 0.0, 1e-12);
    for (size_t q = 0; q < A.size(); ++q) EXPECT_NEAR(r.activation[q], A[q], 1e-9 * (1 + A[q])) << it << ", " << q;
    EXPECT_NEAR(r.loss, pairs ? sum / double(pairs) : 0.0, 1e-9);
    EXPECT_EQ(r.token_violations, tv);
    EXPECT_EQ(r.expert_violations, ev);
    EXPECT_NEAR(r.alpha_zero, az, 1e-9 * (1 + az));
  }
}

TEST(ErcCoupling, TwoExpertsByHand) {
  // d = 2, f = 1: expert 0's gate reads (1, 0), expert 1's (1, 1); router rows route token
  // (3, 0) to expert 0 and (0, 2) to expert 1 (top-1). a_j(t) = |g_j . x_t|:
  //   token (3, 0): a_0 = 3, a_1 = 3  -> coupled (a tie counts);  A[0, .] = (3, 3)
  //   token (0, 2): a_0 = 0, a_1 = 2  -> coupled;                 A[1, .] = (0, 2)
  // loss at a = 1 over the pairs (0, 1), (1, 0): relu(3 - 3) + relu(0 - 3) + relu(0 - 2) +
  // relu(3 - 2) = 1, mean 0.5; violations: token (1, 0)? A[1, 0] = 0 <= 2: none; A[0, 1] = 3 > 3? no.
  // expert: A[0, 1] = 3 > a A[1, 1] = 2 -> one; alpha_zero = max(3 / 3, 3 / 2) = 1.5.
  const std::vector<float> Rw = {1, 0, 0, 1}, W = {1, 0, 1, 1}, x = {3, 0, 0, 2};
  const moekit::Batch b = moekit::Batch::single(2, 2);
  moekit::TopKRouter router(moekit::TopKOptions{.num_experts = 2, .k = 1, .hidden = 2}, Rw);
  moekit::RoutingPlan plan;
  moekit::RouterScratch scratch;
  router.route(b, x.data(), plan, scratch, 1);
  const moekit::ErcCoupling r = moekit::erc_coupling(plan, b, x, W, 2, 2, 1);
  EXPECT_EQ(r.activation, (std::vector<double>{3, 3, 0, 2}));
  EXPECT_EQ(r.tokens, (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(r.coupled_fraction, 1.0);
  EXPECT_DOUBLE_EQ(r.loss, 0.5);
  EXPECT_EQ(r.token_violations, 0);
  EXPECT_EQ(r.expert_violations, 1);
  EXPECT_DOUBLE_EQ(r.alpha_zero, 1.5);
}

TEST(ErcCoupling, AlignedExpertsAreFullyCoupled) {
  // Tokens along axis e route to expert e (router rows e_i) and excite only expert e's gate:
  // every slot coupled, loss 0. Swapping two experts' gates uncouples their tokens.
  const int64_t E = 4, d = 4, f = 2, T = 12;
  std::vector<float> Rw(size_t(E * d), 0.0f), W(size_t(E * f * d), 0.0f), x(size_t(T * d), 0.0f);
  for (int64_t i = 0; i < E; ++i) Rw[size_t(i * d + i)] = 1.0f;
  for (int64_t j = 0; j < E; ++j)
    for (int64_t h = 0; h < f; ++h) W[size_t((j * f + h) * d + j)] = 0.5f;
  for (int64_t t = 0; t < T; ++t) x[size_t(t * d + t % E)] = 1.0f + 0.1f * float(t);
  const moekit::Batch b = moekit::Batch::single(T, d);
  moekit::TopKRouter router(moekit::TopKOptions{.num_experts = E, .k = 1, .hidden = d}, Rw);
  moekit::RoutingPlan plan;
  moekit::RouterScratch scratch;
  router.route(b, x.data(), plan, scratch, 1);
  moekit::ErcCoupling r = moekit::erc_coupling(plan, b, x, W, E, d, f);
  EXPECT_EQ(r.slots, T);
  EXPECT_EQ(r.coupled_fraction, 1.0);
  EXPECT_EQ(r.loss, 0.0);
  EXPECT_EQ(r.token_violations + r.expert_violations, 0);
  std::swap_ranges(W.begin(), W.begin() + f * d, W.begin() + f * d);
  r = moekit::erc_coupling(plan, b, x, W, E, d, f);
  EXPECT_EQ(r.coupled_fraction, 0.5);  // experts 0 and 1's tokens (half the batch) go uncoupled
  EXPECT_GT(r.loss, 0.0);
  EXPECT_EQ(r.token_violations, 2);
  EXPECT_EQ(r.expert_violations, 2);
  EXPECT_TRUE(std::isinf(r.alpha_zero));
  // Bad input: one line naming the problem.
  auto fails = [](auto fn, const char* needle) {
    try {
      fn();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const moekit::error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  fails([&] { (void)moekit::erc_coupling(plan, b, std::span<const float>(x).first(5), W, E, d, f); }, "x expected [12, 4]");
  fails([&] { (void)moekit::erc_coupling(plan, b, x, std::span<const float>(W).first(10), E, d, f); },
        "gate weights expected [4, 2, 4]");
  fails([&] { (void)moekit::erc_coupling(plan, b, x, W, E + 1, d, f); }, "plan expected 5 experts");
  fails([&] { (void)moekit::erc_coupling(plan, b, x, W, E, d, f, 0.0); }, "alpha expected in (0, 1]");
  std::vector<float> bad = x;
  bad[size_t(2 * d + 1)] = INFINITY;
  fails([&] { (void)moekit::erc_coupling(plan, b, bad, W, E, d, f); }, "x[2, 1] expected finite");
}

TEST(ErcLoss, BadArguments) {
  const std::vector<float> R(6, 0.5f), W(12, 0.5f);
  auto fails = [](auto f, const char* needle) {
    try {
      f();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const moekit::error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  fails([&] { (void)moekit::erc_loss(R, W, 2, 3, 3); }, "gate weights expected [2, 3, 3]");
  fails([&] { (void)moekit::erc_loss(R, std::vector<float>(18, 0.5f), 3, 3, 2); }, "router weight expected [3, 3]");
  fails([&] { (void)moekit::erc_loss(R, W, 2, 3, 2, moekit::ErcOptions{.alpha = 0}); }, "alpha expected in (0, 1]");
  fails([&] { (void)moekit::erc_loss(R, W, 2, 3, 2, moekit::ErcOptions{.epsilon = 1.5}); }, "epsilon expected in [0, 1)");
  std::vector<float> bad = R;
  bad[4] = std::nanf("");
  fails([&] { (void)moekit::erc_loss(bad, W, 2, 3, 2); }, "router weight[1, 1] expected finite");
}

}  // namespace
