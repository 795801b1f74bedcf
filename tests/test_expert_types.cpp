// SPDX-License-Identifier: Apache-2.0
// Expert types on shared weights (experts/lora.hpp): LoRA experts over a frozen base
// (LoRA-Mixer, arXiv 2507.00029), with and without the base in each expert, and
// feature-modulated experts sharing one FFN (MoFME, arXiv 2312.16610), through a top-k layer
// against plain double-precision formulas on the layer's own decisions; growing a trained
// layer by new experts (layers/grow.hpp); errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/experts/lora.hpp"
#include "moekit/layer.hpp"
#include "moekit/layers/grow.hpp"
#include "moekit/routers/topk.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Batch;
using moekit::TopKOptions;
using moekit::TopKRouter;
using test_support::expect_error;
using test_support::join;
using test_support::Rng;

template <class Bank, class Fn>
void check_layer(Rng& rng, Bank bank, int64_t E, int64_t d, const Fn& expert_ref, const char* what) {
  TopKOptions o{E, std::min<int64_t>(2, E), d};
  o.norm_topk_prob = true;
  const int64_t T = rng.integer(1, 20);
  const moekit::SparseLayer layer(TopKRouter(o, rng.vec(static_cast<size_t>(E * d), 1.0)), std::move(bank));
  const std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 1.0);
  std::vector<float> y(x.size());
  moekit::Workspace ws;
  layer.forward(Batch::single(T, d), x.data(), y.data(), ws, 2);
  const ref::Routing r = ref::routing_from_view(ref::view_of(ws.plan), nullptr);
  const auto want = ref::moe_forward(r, expert_ref, {}, x.data(), T, d);
  const auto errs = ref::compare_values(want, y.data(), d, 1e-4, 1e-5);
  EXPECT_TRUE(errs.empty()) << what << join(errs);
}

TEST(ExpertTypes, LoraExpertsMatchTheFormula) {
  Rng rng(2507);
  for (int i = 0; i < 16; ++i) {
    const int64_t E = rng.integer(1, 6), d = rng.integer(1, 20), r = rng.integer(1, 6);
    const bool with_base = i % 2 == 0;
    const float scale = static_cast<float>(rng.uniform(0.5, 2.0));
    const std::vector<float> W0 = with_base ? rng.vec(static_cast<size_t>(d * d), 0.5) : std::vector<float>{},
                             A = rng.vec(static_cast<size_t>(E * r * d), 0.5), B = rng.vec(static_cast<size_t>(E * d * r), 0.5);
    auto ref_expert = [&](int64_t e, const std::vector<double>& x) {
      std::vector<double> ax(static_cast<size_t>(r), 0.0), y(static_cast<size_t>(d), 0.0);
      for (int64_t j = 0; j < r; ++j)
        for (int64_t c = 0; c < d; ++c) ax[size_t(j)] += double(A[size_t((e * r + j) * d + c)]) * x[size_t(c)];
      for (int64_t o = 0; o < d; ++o) {
        for (int64_t j = 0; j < r; ++j) y[size_t(o)] += scale * double(B[size_t((e * d + o) * r + j)]) * ax[size_t(j)];
        if (with_base)
          for (int64_t c = 0; c < d; ++c) y[size_t(o)] += double(W0[size_t(o * d + c)]) * x[size_t(c)];
      }
      return y;
    };
    check_layer(rng, moekit::LoraExpertBank(E, d, r, W0, A, B, scale), E, d, ref_expert, with_base ? "lora+base" : "lora");
  }
}

TEST(ExpertTypes, ModulatedExpertsMatchTheFormula) {
  Rng rng(2312);
  for (int i = 0; i < 16; ++i) {
    const int64_t E = rng.integer(1, 6), d = rng.integer(1, 20), f = rng.integer(1, 24);
    const std::vector<float> up = rng.vec(static_cast<size_t>(f * d), 0.7), down = rng.vec(static_cast<size_t>(d * f), 0.7),
                             gamma = rng.vec(static_cast<size_t>(E * f), 1.5), beta = rng.vec(static_cast<size_t>(E * f), 0.5);
    const auto act = i % 2 ? moekit::Activation::gelu : moekit::Activation::silu;
    const auto ract = i % 2 ? ref::Activation::gelu : ref::Activation::silu;
    auto ref_expert = [&](int64_t e, const std::vector<double>& x) {
      std::vector<double> h(static_cast<size_t>(f)), y(static_cast<size_t>(d), 0.0);
      for (int64_t j = 0; j < f; ++j) {
        double z = 0;
        for (int64_t c = 0; c < d; ++c) z += double(up[size_t(j * d + c)]) * x[size_t(c)];
        h[size_t(j)] = ref::activate(ract, double(gamma[size_t(e * f + j)]) * z + beta[size_t(e * f + j)]);
      }
      for (int64_t o = 0; o < d; ++o)
        for (int64_t j = 0; j < f; ++j) y[size_t(o)] += double(down[size_t(o * f + j)]) * h[size_t(j)];
      return y;
    };
    check_layer(rng, moekit::ModulatedFfnBank(E, d, f, up, down, gamma, beta, act), E, d, ref_expert, "mofme");
  }
}

TEST(ExpertTypes, Errors) {
  expect_error([] { moekit::LoraExpertBank(2, 3, 1, {}, std::vector<float>(5), std::vector<float>(6), 1.0f); },
               {"lora_A expected [2, 3] = 6 values", "got 5"});
  expect_error([] { moekit::LoraExpertBank(2, 3, 1, std::vector<float>(8), std::vector<float>(6), std::vector<float>(6), 1.0f); },
               {"base weight expected [3, 3] = 9 values"});
  expect_error([] { moekit::LoraExpertBank(2, 3, 1, {}, std::vector<float>(6), std::vector<float>(6), NAN); }, {"scale expected finite"});
  expect_error([] { moekit::ModulatedFfnBank(2, 2, 3, std::vector<float>(6), std::vector<float>(6), std::vector<float>(6), std::vector<float>(5)); },
               {"beta expected [2, 3] = 6 values", "got 5"});
}

}  // namespace

// ---------------------------------------------------------------- growing a trained layer

namespace {

TEST(GrowExperts, OldExpertsFrozenAndTheGrownLayerEqualsAFreshOne) {
  Rng rng(77);
  for (int i = 0; i < 8; ++i) {
    const int64_t E = rng.integer(1, 5), n = rng.integer(1, 3), d = rng.integer(2, 16), f = rng.integer(2, 16), T = rng.integer(1, 30);
    std::vector<ref::Ffn> old_ex, new_ex;
    for (int64_t e = 0; e < E; ++e) old_ex.push_back(test_support::random_ref_ffn(rng, d, f));
    for (int64_t e = 0; e < n; ++e) new_ex.push_back(test_support::random_ref_ffn(rng, d, f));
    TopKOptions o{E, std::min<int64_t>(2, E), d};
    o.norm_topk_prob = true;
    const std::vector<float> W = rng.vec(static_cast<size_t>(E * d), 1.0), Wn = rng.vec(static_cast<size_t>(n * d), 1.0);
    const std::vector<float> bias = i % 2 ? rng.vec(static_cast<size_t>(E), 0.3) : std::vector<float>{};
    if (i % 4 == 3) o.capacity_factor = 1.0;
    moekit::SparseLayer<TopKRouter, moekit::FfnBank> layer(TopKRouter(o, W, bias), test_support::bank_of(old_ex, d, f));
    const std::vector<float> steer = i % 3 == 0 ? rng.vec(static_cast<size_t>(E), 0.5) : std::vector<float>{};
    layer.router().set_logit_steering(steer);
    std::vector<float> g, u, dn;
    for (const ref::Ffn& x : new_ex) {
      g.insert(g.end(), x.gate.begin(), x.gate.end());
      u.insert(u.end(), x.up.begin(), x.up.end());
      dn.insert(dn.end(), x.down.begin(), x.down.end());
    }
    const auto grown = moekit::grow_experts(layer, Wn, g, u, dn);
    ASSERT_EQ(grown.num_experts(), E + n);
    // Old experts: the same packed values; new ones: what packing them alone gives.
    std::vector<float> a(static_cast<size_t>(f * d)), b(a.size()), c(static_cast<size_t>(d * f)), a2(a.size()), b2(a.size()), c2(c.size());
    for (int64_t e = 0; e < E; ++e) {
      layer.experts().get_expert(e, a.data(), b.data(), c.data());
      grown.experts().get_expert(e, a2.data(), b2.data(), c2.data());
      EXPECT_TRUE(a == a2 && b == b2 && c == c2) << "old expert " << e;
    }
    // The grown layer equals one built fresh from all weights, bit for bit.
    std::vector<ref::Ffn> all = old_ex;
    all.insert(all.end(), new_ex.begin(), new_ex.end());
    std::vector<float> Wall = W;
    Wall.insert(Wall.end(), Wn.begin(), Wn.end());
    TopKOptions oa = o;
    oa.num_experts = E + n;
    std::vector<float> bias_all = bias, steer_all = steer;
    if (!bias_all.empty()) bias_all.resize(static_cast<size_t>(E + n), 0.0f);
    if (!steer_all.empty()) steer_all.resize(static_cast<size_t>(E + n), 0.0f);
    moekit::SparseLayer<TopKRouter, moekit::FfnBank> fresh(TopKRouter(oa, Wall, bias_all), test_support::bank_of(all, d, f));
    fresh.router().set_logit_steering(steer_all);
    const std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 1.0);
    std::vector<float> y1(x.size()), y2(x.size());
    moekit::Workspace w1, w2;
    grown.forward(Batch::single(T, d), x.data(), y1.data(), w1, 2);
    fresh.forward(Batch::single(T, d), x.data(), y2.data(), w2, 2);
    EXPECT_EQ(0, std::memcmp(y1.data(), y2.data(), x.size() * sizeof(float))) << "case " << i;
  }
  Rng rng2(1);
  std::vector<ref::Ffn> ex = {test_support::random_ref_ffn(rng2, 2, 2)};
  const moekit::SparseLayer<TopKRouter, moekit::FfnBank> l(TopKRouter(TopKOptions{1, 1, 2}, rng2.vec(2, 1.0)), test_support::bank_of(ex, 2, 2));
  expect_error([&] { (void)moekit::grow_experts(l, std::vector<float>(3), {}, {}, {}); }, {"new router rows expected [n, 2]", "got 3"});
  TopKOptions grouped{4, 1, 2};
  grouped.n_group = 2;
  grouped.topk_group = 1;
  std::vector<ref::Ffn> ex4(4, ex[0]);
  const moekit::SparseLayer<TopKRouter, moekit::FfnBank> lg(TopKRouter(grouped, rng2.vec(8, 1.0)), test_support::bank_of(ex4, 2, 2));
  expect_error([&] { (void)moekit::grow_experts(lg, std::vector<float>(2), std::vector<float>(4), std::vector<float>(4), std::vector<float>(4)); },
               {"grow_experts: a group-limited router expected none"});
  expect_error([&] { (void)moekit::grow_experts(l, std::vector<float>(2), std::vector<float>(4), std::vector<float>(4), std::vector<float>(3)); },
               {"down_proj expected [2, 2] = 4 values", "got 3"});
}

}  // namespace

namespace {

// A user-written shared expert: y = tanh(W x) with W [d, d] (not an FFN, not splittable).
struct TanhLinear {
  int64_t d;
  std::vector<float> w;
  [[nodiscard]] int64_t d_in() const { return d; }
  [[nodiscard]] int64_t d_out() const { return d; }
  [[nodiscard]] size_t scratch_floats(int64_t) const { return 0; }
  void operator()(const float* in, int64_t rows, float* out, float*) const {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < d; ++i) {
        float acc = 0.0f;
        for (int64_t j = 0; j < d; ++j) acc += w[static_cast<size_t>(i * d + j)] * in[r * d + j];
        out[r * d + i] = std::tanh(acc);
      }
  }
};

}  // namespace

// Shared experts over any bank (SparseLayer's third parameter): a gated user functor beside
// FFN experts matches `routed + sigmoid(g . x) tanh(W x)` in double, with padding, for prefill
// and decode (a non-splittable shared bank turns the decode column split off), and 1 and 2
// threads agree bit for bit. The default layer is the FfnBank case.
TEST(ExpertTypes, SharedExpertsOverAnyBank) {
  static_assert(std::is_same_v<moekit::SparseLayer<TopKRouter, moekit::FfnBank>,
                               moekit::SparseLayer<TopKRouter, moekit::FfnBank, moekit::FfnBank>>);
  Rng rng(71);
  const int64_t d = 24, f = 32, E = 5;
  std::vector<ref::Ffn> experts;
  for (int64_t e = 0; e < E; ++e) experts.push_back(test_support::random_ref_ffn(rng, d, f));
  const std::vector<float> router = rng.vec(static_cast<size_t>(E * d), 0.3), gate = rng.vec(static_cast<size_t>(d), 0.3);
  const TanhLinear tl{d, rng.vec(static_cast<size_t>(d * d), 0.3)};
  using Bank = moekit::FunctorBank<TanhLinear>;
  std::vector<moekit::SharedExpertOf<Bank>> shared;
  shared.push_back({Bank({tl}), gate});
  const moekit::SparseLayer<TopKRouter, moekit::FfnBank, Bank> layer(
      TopKRouter(TopKOptions{.num_experts = E, .k = 2, .hidden = d}, router), test_support::bank_of(experts, d, f),
      std::move(shared));
  for (const int64_t T : {1, 3, 130}) {
    const std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 1.5);
    std::vector<uint8_t> pad(static_cast<size_t>(T), 0);
    if (T > 2) pad[1] = 1;
    Batch batch = Batch::single(T, d);
    batch.padding = pad;
    std::vector<float> y1(x.size()), y2(x.size());
    moekit::Workspace w1, w2;
    layer.forward(batch, x.data(), y1.data(), w1, 1);
    layer.forward(batch, x.data(), y2.data(), w2, 2);
    EXPECT_TRUE(test_support::same_bits(y1, y2)) << "T " << T;
    const std::vector<double> routed = ref::moe_forward(ref::routing_from_view(ref::view_of(w1.plan), pad.data()), experts,
                                                        {}, x.data(), T, d);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < d; ++i) {
        double want = 0.0;
        if (!batch.is_padding(t)) {
          double z = 0.0, a = 0.0;
          for (int64_t j = 0; j < d; ++j) {
            z += static_cast<double>(gate[j]) * x[t * d + j];
            a += static_cast<double>(tl.w[i * d + j]) * x[t * d + j];
          }
          want = routed[t * d + i] + std::tanh(a) / (1.0 + std::exp(-z));
        }
        ASSERT_NEAR(y1[t * d + i], want, 1e-5 * (1.0 + std::fabs(want))) << "T " << T << " token " << t << " i " << i;
      }
  }
  std::vector<moekit::SharedExpertOf<Bank>> two;
  two.push_back({Bank({tl, tl}), {}});
  expect_error([&] {
    moekit::SparseLayer<TopKRouter, moekit::FfnBank, Bank> bad(
        TopKRouter(TopKOptions{.num_experts = E, .k = 2, .hidden = d}, router), test_support::bank_of(experts, d, f),
        std::move(two));
  }, {"shared expert 0 expected a one-expert bank, got 2"});
}

namespace {
// A functor whose output is wider than its input: not a shared expert of a d-wide layer.
struct Widening {
  int64_t d;
  [[nodiscard]] int64_t d_in() const { return d; }
  [[nodiscard]] int64_t d_out() const { return d + 8; }
  [[nodiscard]] size_t scratch_floats(int64_t) const { return 0; }
  void operator()(const float*, int64_t, float*, float*) const {}
};
}  // namespace

TEST(ExpertTypes, SharedBankOfAnotherWidthIsRefused) {
  Rng rng(72);
  const int64_t d = 8, f = 8, E = 2;
  std::vector<ref::Ffn> experts;
  for (int64_t e = 0; e < E; ++e) experts.push_back(test_support::random_ref_ffn(rng, d, f));
  using Bank = moekit::FunctorBank<Widening>;
  std::vector<moekit::SharedExpertOf<Bank>> shared;
  shared.push_back({Bank({Widening{d}}), {}});
  expect_error([&] {
    moekit::SparseLayer<TopKRouter, moekit::FfnBank, Bank> bad(
        TopKRouter(TopKOptions{.num_experts = E, .k = 1, .hidden = d}, rng.vec(static_cast<size_t>(E * d), 0.3)),
        test_support::bank_of(experts, d, f), std::move(shared));
  }, {"shared expert 0 d_in and d_out expected 8 (the hidden size), got 8 and 16"});
}
