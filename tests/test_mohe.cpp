// SPDX-License-Identifier: Apache-2.0
// MoHETS' heterogeneous experts (layers/mohe.hpp) against a double-precision transcription of
// the official MoHE layer (evortigosa/mohe_forecast `model/MoHE.py` 2a835819): routed FAN
// experts, the shared depthwise-convolution expert per sequence with its sigmoid gate, on
// the layer's own routing decisions; FAN experts beside FFN experts in one PairBank; padding,
// sequences, threads, errors.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/experts/bank_views.hpp"
#include "moekit/layer.hpp"
#include "moekit/layers/mohe.hpp"
#include "moekit/routers/topk.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::FanExpertBank;
using test_support::expect_error;
using test_support::join;
using test_support::Rng;

double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }

// FAN: [cos(P x), sin(P x), gelu(Q x)], P [n/4, m], Q [n/2, m].
std::vector<double> fan(const float* P, const float* Q, int64_t n, int64_t m, const std::vector<double>& x) {
  std::vector<double> out(static_cast<size_t>(n));
  const int64_t a = n / 4;
  for (int64_t i = 0; i < a; ++i) {
    double p = 0;
    for (int64_t c = 0; c < m; ++c) p += double(P[i * m + c]) * x[size_t(c)];
    out[size_t(i)] = std::cos(p);
    out[size_t(a + i)] = std::sin(p);
  }
  for (int64_t i = 0; i < n / 2; ++i) {
    double q = 0;
    for (int64_t c = 0; c < m; ++c) q += double(Q[i * m + c]) * x[size_t(c)];
    out[size_t(2 * a + i)] = gelu(q);
  }
  return out;
}

struct Fan {
  int64_t E, d, f;
  std::vector<float> p1, q1, p2, q2;
  Fan(Rng& rng, int64_t E_, int64_t d_, int64_t f_) : E(E_), d(d_), f(f_) {
    p1 = rng.vec(size_t(E * f / 4 * d), 1.0 / std::sqrt(double(d)));
    q1 = rng.vec(size_t(E * f / 2 * d), 1.0 / std::sqrt(double(d)));
    p2 = rng.vec(size_t(E * d / 4 * f), 1.0 / std::sqrt(double(f)));
    q2 = rng.vec(size_t(E * d / 2 * f), 1.0 / std::sqrt(double(f)));
  }
  FanExpertBank bank() const { return FanExpertBank(E, d, f, p1, q1, p2, q2); }
  std::vector<double> expert(int64_t e, const std::vector<double>& x) const {
    const auto h = fan(p1.data() + e * f / 4 * d, q1.data() + e * f / 2 * d, f, d, x);
    return fan(p2.data() + e * d / 4 * f, q2.data() + e * d / 2 * f, d, f, h);
  }
};

TEST(Mohe, LayerMatchesTheOfficialForward) {
  Rng rng(2601);
  for (int rep = 0; rep < 24; ++rep) {
    const int64_t E = rng.integer(1, 6), k = rng.integer(1, E), d = 4 * rng.integer(1, 6), f = 4 * rng.integer(1, 8);
    const int64_t T = rng.integer(0, 25);
    const Fan fe(rng, E, d, f);
    const auto dw = rng.vec(size_t(d * 3), 1.0), pw = rng.vec(size_t(f * d), 0.5), down = rng.vec(size_t(d * f), 0.5);
    const auto gate = rng.vec(size_t(d), 0.5), router = rng.vec(size_t(E * d), 1.0);
    moekit::TopKOptions o{E, k, d};
    o.norm_topk_prob = true;
    const moekit::MoheLayer layer(moekit::SparseLayer(moekit::TopKRouter(o, router), fe.bank()),
                                  moekit::DwConvExpert(d, f, dw, pw, down), gate);
    // Sequences and padding.
    std::vector<int32_t> offs{0};
    while (offs.back() < T) offs.push_back(static_cast<int32_t>(std::min<int64_t>(T, offs.back() + rng.integer(1, 9))));
    std::vector<uint8_t> pad(size_t(T), 0);
    for (auto& p : pad) p = rng.coin(0.15);
    moekit::Batch batch = moekit::Batch::single(T, d);
    if (T > 0 && rep % 2 == 0) batch.sequence_offsets = offs;
    if (rep % 3 == 0) batch.padding = pad;
    const auto x = rng.vec(size_t(T * d), 1.0);
    std::vector<float> y(x.size()), y1(x.size());
    moekit::Workspace ws, ws1;
    layer.forward(batch, x.data(), y.data(), ws, 2);
    layer.forward(batch, x.data(), y1.data(), ws1, 1);
    ASSERT_TRUE(test_support::same_bits(y, y1)) << "threads";
    const bool padded = !batch.padding.empty();
    const ref::Routing r = ref::routing_from_view(ref::view_of(ws.plan), padded ? pad.data() : nullptr);
    auto want = ref::moe_forward(r, [&](int64_t e, const std::vector<double>& xr) { return fe.expert(e, xr); }, {},
                                 x.data(), T, d);
    // The shared expert per sequence: zero-padded depthwise conv (padded rows read as 0).
    std::vector<uint8_t> skip(size_t(T), 0);
    for (int64_t t = 0; t < T; ++t) {
      if (padded && pad[size_t(t)]) {
        skip[size_t(t)] = 1;
        for (int64_t c = 0; c < d; ++c) ASSERT_EQ(y[size_t(t * d + c)], 0.0f) << "padded token " << t;
        continue;
      }
      // MoHE's router in double: softmax over E, top-k, renormalised (MoHE.py: by
      // max(sum, 1e-6)); the plan's experts and weights, unless the k-th and (k+1)-th tie.
      {
        std::vector<double> p(static_cast<size_t>(E));
        double mx = -INFINITY, z = 0;
        for (int64_t e = 0; e < E; ++e) {
          double l = 0;
          for (int64_t c = 0; c < d; ++c) l += double(router[size_t(e * d + c)]) * x[size_t(t * d + c)];
          p[size_t(e)] = l;
          mx = std::max(mx, l);
        }
        for (double& v : p) z += (v = std::exp(v - mx));
        for (double& v : p) v /= z;
        std::vector<int32_t> order(static_cast<size_t>(E));
        for (int64_t e = 0; e < E; ++e) order[size_t(e)] = static_cast<int32_t>(e);
        std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b2) { return p[size_t(a)] > p[size_t(b2)]; });
        if (k == E || p[size_t(order[size_t(k - 1)])] - p[size_t(order[size_t(k)])] > 1e-6) {
          double sum = 0;
          for (int64_t j = 0; j < k; ++j) sum += p[size_t(order[size_t(j)])];
          const auto ids = test_support::experts_of(ws.plan, t);
          const auto w = test_support::weights_of(ws.plan, t);
          ASSERT_EQ(ids.size(), size_t(k));
          for (int64_t j = 0; j < k; ++j) {
            ASSERT_EQ(ids[size_t(j)], order[size_t(j)]) << "token " << t;
            ASSERT_NEAR(w[size_t(j)], p[size_t(order[size_t(j)])] / std::max(sum, 1e-6), 1e-5);
          }
        }
      }
      int64_t b = 0, e = T;
      if (!batch.sequence_offsets.empty())
        for (size_t q = 0; q + 1 < offs.size(); ++q)
          if (t >= offs[q] && t < offs[q + 1]) b = offs[q], e = offs[q + 1];
      auto xv = [&](int64_t i, int64_t c) {
        return i < b || i >= e || (padded && pad[size_t(i)]) ? 0.0 : double(x[size_t(i * d + c)]);
      };
      std::vector<double> z(static_cast<size_t>(d)), u(static_cast<size_t>(f));
      for (int64_t c = 0; c < d; ++c)
        z[size_t(c)] = dw[size_t(c * 3)] * xv(t - 1, c) + dw[size_t(c * 3 + 1)] * xv(t, c) + dw[size_t(c * 3 + 2)] * xv(t + 1, c);
      for (int64_t i = 0; i < f; ++i) {
        double s = 0;
        for (int64_t c = 0; c < d; ++c) s += double(pw[size_t(i * d + c)]) * z[size_t(c)];
        u[size_t(i)] = gelu(s);
      }
      double g = 0;
      for (int64_t c = 0; c < d; ++c) g += double(gate[size_t(c)]) * x[size_t(t * d + c)];
      g = 1.0 / (1.0 + std::exp(-g));
      for (int64_t c = 0; c < d; ++c) {
        double s = 0;
        for (int64_t i = 0; i < f; ++i) s += double(down[size_t(c * f + i)]) * u[size_t(i)];
        want[size_t(t * d + c)] += g * s;
      }
    }
    const auto errs = ref::compare_values(want, y.data(), d, 1e-4, 1e-5, skip);
    EXPECT_TRUE(errs.empty()) << "rep " << rep << join(errs);
  }
}

// FAN experts beside FFN experts in one bank: expert ids [0, E_fan) are FAN, the rest FFN.
TEST(Mohe, PairBankRunsEachExpertOnItsOwnBank) {
  Rng rng(7);
  const int64_t Ea = 3, Eb = 2, d = 8, f = 12, T = 17;
  const Fan fe(rng, Ea, d, f);
  std::vector<ref::Ffn> ffn;
  for (int64_t e = 0; e < Eb; ++e) ffn.push_back(test_support::random_ref_ffn(rng, d, f));
  moekit::TopKOptions o{Ea + Eb, 2, d};
  const moekit::SparseLayer layer(moekit::TopKRouter(o, rng.vec(size_t((Ea + Eb) * d), 1.0)),
                                  moekit::PairBank(fe.bank(), test_support::bank_of(ffn, d, f)));
  const auto x = rng.vec(size_t(T * d), 1.0);
  std::vector<float> y(x.size());
  moekit::Workspace ws;
  layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, 2);
  const ref::Routing r = ref::routing_from_view(ref::view_of(ws.plan), nullptr);
  int64_t fan_slots = 0, ffn_slots = 0;
  for (int32_t e : ws.plan.slot_expert()) (e < Ea ? fan_slots : ffn_slots)++;
  EXPECT_GT(fan_slots, 0);
  EXPECT_GT(ffn_slots, 0);
  const auto want = ref::moe_forward(
      r,
      [&](int64_t e, const std::vector<double>& xr) {
        return e < Ea ? fe.expert(e, xr) : ref::ffn_forward(ffn[size_t(e - Ea)], xr);
      },
      {}, x.data(), T, d);
  const auto errs = ref::compare_values(want, y.data(), d, 1e-4, 1e-5);
  EXPECT_TRUE(errs.empty()) << join(errs);
}

TEST(Mohe, BadInputIsRefused) {
  Rng rng(1);
  expect_error([&] { FanExpertBank(1, 6, 8, {}, {}, {}, {}); }, {"multiples of 4"});
  expect_error([&] { FanExpertBank(1, 4, 8, std::vector<float>(8), std::vector<float>(16), std::vector<float>(8), std::vector<float>(15)); },
               {"down_fan.Wp_bar"});
  expect_error([&] { moekit::DwConvExpert(4, 8, std::vector<float>(11), std::vector<float>(32), std::vector<float>(32)); },
               {"dw_conv.weight"});
  const Fan fe(rng, 2, 4, 8);
  moekit::TopKOptions o{2, 1, 4};
  auto make = [&](std::vector<float> gate, int64_t conv_d) {
    return moekit::MoheLayer(moekit::SparseLayer(moekit::TopKRouter(o, rng.vec(8, 1.0)), fe.bank()),
                             moekit::DwConvExpert(conv_d, 8, std::vector<float>(size_t(conv_d * 3)), std::vector<float>(size_t(8 * conv_d)),
                                                  std::vector<float>(size_t(8 * conv_d))),
                             std::move(gate));
  };
  expect_error([&] { make(std::vector<float>(3), 4); }, {"shared_gating.weight"});
  expect_error([&] { make(std::vector<float>(8), 8); }, {"shared expert hidden size expected 4"});
  const auto layer = make(std::vector<float>(4), 4);
  std::vector<float> x(8, 0.5f);
  moekit::Workspace ws;
  expect_error([&] { layer.forward(moekit::Batch::single(2, 4), x.data(), x.data() + 2, ws); }, {"out expected not to overlap x"});
  // A shared expert that overflows: an error by default, counted with NonFiniteOutput::count.
  for (bool count : {false, true}) {
    auto routed = moekit::SparseLayer(moekit::TopKRouter(o, rng.vec(8, 1.0)), fe.bank());
    if (count) routed.set_non_finite_output(moekit::NonFiniteOutput::count);
    const moekit::MoheLayer big(std::move(routed),
                                moekit::DwConvExpert(4, 8, std::vector<float>(12, 1e30f), std::vector<float>(32, 1e30f),
                                                     std::vector<float>(32, 1e30f)),
                                std::vector<float>(4, 0.0f));
    std::vector<float> y(8);
    if (count) {
      big.forward(moekit::Batch::single(2, 4), x.data(), y.data(), ws);
      EXPECT_EQ(ws.non_finite_rows, 2);
    } else {
      expect_error([&] { big.forward(moekit::Batch::single(2, 4), x.data(), y.data(), ws); }, {"shared expert or the sum overflowed"});
    }
  }
}

}  // namespace
