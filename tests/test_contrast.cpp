// SPDX-License-Identifier: Apache-2.0
// Self-contrast (SCMoE, arXiv 2405.14507): SparseLayer::forward_contrast gives forward()'s
// output bit for bit as the strong output, and as the weak output each token's rank-r routed
// slot alone (weight 1) plus the shared experts, checked against the double-precision layer
// reference on the library's own decisions; self_contrast() against its formula; errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/topk.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Batch;
using test_support::expect_error;
using test_support::join;
using test_support::Rng;

TEST(SelfContrast, StrongIsForwardAndWeakIsTheRankRSlot) {
  Rng rng(2405);
  for (int i = 0; i < 30; ++i) {
    moekit::TopKOptions o;
    o.num_experts = rng.integer(1, 10);
    o.k = rng.integer(1, o.num_experts);
    o.hidden = rng.integer(2, 24);
    o.norm_topk_prob = rng.coin(0.5);
    if (rng.coin(0.3)) o.capacity_factor = rng.uniform(0.5, 1.5);
    const int64_t E = o.num_experts, d = o.hidden, f = rng.integer(2, 20), T = rng.integer(1, 30);
    const int64_t rank = rng.integer(1, o.k);
    std::vector<ref::Ffn> experts;
    for (int64_t e = 0; e < E; ++e) experts.push_back(test_support::random_ref_ffn(rng, d, f));
    std::vector<moekit::SharedExpert> shared;
    std::vector<ref::Shared> ref_shared;
    if (rng.coin(0.5)) {
      const ref::Ffn s = test_support::random_ref_ffn(rng, d, f);
      const std::vector<float> gate = rng.coin(0.5) ? rng.vec(static_cast<size_t>(d), 1.0) : std::vector<float>{};
      shared.push_back({test_support::bank_of({s}, d, f), gate});
      ref_shared.push_back({s, gate});
    }
    const moekit::SparseLayer layer(moekit::TopKRouter(o, rng.vec(static_cast<size_t>(E * d), 1.0)),
                                    test_support::bank_of(experts, d, f), std::move(shared));
    Batch b = Batch::single(T, d);
    std::vector<uint8_t> pad;
    if (rng.coin(0.3)) {
      pad.assign(static_cast<size_t>(T), 0);
      for (auto& v : pad) v = rng.coin(0.3);
      b.padding = pad;
    }
    const std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 1.0);
    std::vector<float> strong(x.size()), weak(x.size(), 9.0f), plain(x.size());
    moekit::Workspace ws, ws2;
    layer.forward_contrast(b, x.data(), strong.data(), weak.data(), rank, ws, 2);
    layer.forward(b, x.data(), plain.data(), ws2, 1);
    EXPECT_EQ(0, std::memcmp(strong.data(), plain.data(), x.size() * sizeof(float))) << "case " << i;
    // The weak routing: each token's rank-r slot alone, weight 1 (nothing if dropped or padded).
    ref::Routing r = ref::routing_from_view(ref::view_of(ws.plan), pad.empty() ? nullptr : pad.data());
    for (ref::TokenRouting& tr : r.token) {
      std::vector<ref::Slot> keep;
      if (static_cast<int64_t>(tr.slots.size()) >= rank && !tr.slots[static_cast<size_t>(rank - 1)].dropped)
        keep.push_back({tr.slots[static_cast<size_t>(rank - 1)].expert, 1.0, false});
      tr.slots = keep;
    }
    const std::vector<double> want = ref::moe_forward(r, experts, ref_shared, x.data(), T, d);
    const auto errs = ref::compare_values(want, weak.data(), d, 1e-4, 1e-5);
    EXPECT_TRUE(errs.empty()) << "case " << i << " rank " << rank << join(errs);
  }
}

TEST(SelfContrast, FormulaAndPlausibilityMask) {
  Rng rng(8);
  for (int i = 0; i < 50; ++i) {
    const int64_t n = rng.integer(1, 40);
    const std::vector<float> s = rng.vec(static_cast<size_t>(n), 5.0), w = rng.vec(static_cast<size_t>(n), 5.0);
    const float beta = static_cast<float>(rng.uniform(-1.0, 2.0)), alpha = rng.coin(0.5) ? 0.0f : 0.1f;
    std::vector<float> out(static_cast<size_t>(n));
    moekit::self_contrast(s.data(), w.data(), n, beta, out.data(), alpha);
    double mx = -INFINITY;
    for (float v : s) mx = std::max(mx, double(v));
    for (int64_t v = 0; v < n; ++v) {
      // Plausible: softmax(s)_v >= alpha max softmax(s), i.e. exp(s_v - max) >= alpha.
      const bool keep = alpha == 0.0f || std::exp(double(s[size_t(v)]) - mx) >= alpha * (1 + 1e-6);
      if (!keep) {
        EXPECT_EQ(out[size_t(v)], -std::numeric_limits<float>::infinity()) << v;
      } else if (std::fabs(std::exp(double(s[size_t(v)]) - mx) - alpha) > 1e-5) {
        EXPECT_NEAR(out[size_t(v)], double(s[size_t(v)]) + beta * (double(s[size_t(v)]) - w[size_t(v)]), 1e-4);
      }
    }
  }
  std::vector<float> a = {1, 2}, b = {0, 0};
  moekit::self_contrast(a.data(), b.data(), 2, 1.0f, a.data());  // in place
  EXPECT_EQ(a, (std::vector<float>{2, 4}));
  expect_error([&] { moekit::self_contrast(a.data(), b.data(), 2, NAN, a.data()); }, {"beta expected finite"});
  expect_error([&] { moekit::self_contrast(a.data(), b.data(), 2, 1.0f, a.data(), 2.0f); }, {"alpha expected in [0, 1]"});
}

TEST(SelfContrast, BadArguments) {
  Rng rng(1);
  std::vector<ref::Ffn> ex = {test_support::random_ref_ffn(rng, 2, 2), test_support::random_ref_ffn(rng, 2, 2)};
  moekit::SparseLayer layer(moekit::TopKRouter(moekit::TopKOptions{2, 2, 2}, rng.vec(4, 1.0)), test_support::bank_of(ex, 2, 2));
  std::vector<float> x(4, 0.5f), y(4), w(4);
  moekit::Workspace ws;
  const Batch b = Batch::single(2, 2);
  expect_error([&] { layer.forward_contrast(b, x.data(), y.data(), w.data(), 0, ws); }, {"rank expected in [1, E = 2]", "got 0"});
  expect_error([&] { layer.forward_contrast(b, x.data(), y.data(), y.data(), 1, ws); }, {"expected apart"});
  expect_error([&] { layer.forward_contrast(b, x.data(), y.data(), x.data(), 1, ws); }, {"expected apart"});
  expect_error([&] { layer.forward_contrast(b, x.data(), x.data(), w.data(), 1, ws); }, {"expected apart", "no in-place"});
  layer.set_weight_on_input(true);
  expect_error([&] { layer.forward_contrast(b, x.data(), y.data(), w.data(), 1, ws); }, {"routing weight on the expert output"});
}

}  // namespace
