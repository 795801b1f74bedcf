// SPDX-License-Identifier: Apache-2.0
// EAQuant's expert-aware smoothing (moekit/tools/eaquant.hpp) and FfnBank's input smoothing:
// the scales against a double transcription of the official code (reference/eaquant_ref.*),
// calibrate() against statistics recomputed in double from the plan, a smoothed bank as the
// same function, routing unchanged, the w8a8 / w4a8 error lower on inputs with outlier
// channels, the pack file carrying the smoothing, thread independence and every error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "moekit/ep/sharded_bank.hpp"
#include "moekit/io/model.hpp"
#include "moekit/offload/expert_cache.hpp"
#include "moekit/io/packed_layer.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/layers/grow.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/tools/eaquant.hpp"
#include "reference/eaquant_ref.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::kernels::WeightType;
using test_support::expect_error;
using test_support::Rng;

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

TEST(Eaquant, SmoothingFactorsAreTheOfficialGetScale) {
  Rng rng(11);
  for (int c = 0; c < 50; ++c) {
    const auto n = static_cast<size_t>(rng.integer(1, 200));
    std::vector<float> a(n), w(n);
    for (size_t j = 0; j < n; ++j) {
      a[j] = rng.coin(0.1) ? 0.0f : static_cast<float>(std::exp(rng.uniform(-12.0, 5.0)));  // zeros hit the clamp
      w[j] = rng.coin(0.1) ? 0.0f : static_cast<float>(std::exp(rng.uniform(-12.0, 1.0)));
    }
    const double alpha = rng.uniform(0.05, 0.95);
    const std::vector<float> got = moekit::eaquant::smoothing_factors(a, w, alpha);
    const std::vector<double> want = ref::eaquant_get_scale(to_double(a), to_double(w), alpha);
    for (size_t j = 0; j < n; ++j) ASSERT_NEAR(got[j], want[j], 2e-7 * want[j]) << "case " << c << " channel " << j;
  }
  expect_error([] { (void)moekit::eaquant::smoothing_factors(std::vector<float>{1.0f}, std::vector<float>{1.0f, 2.0f}, 0.5); },
               {"as many"});
  expect_error([] { (void)moekit::eaquant::smoothing_factors(std::vector<float>{1.0f}, std::vector<float>{1.0f}, 1.0); },
               {"alpha expected in (0, 1)"});
  const float inf = std::numeric_limits<float>::infinity();
  expect_error([&] { (void)moekit::eaquant::smoothing_factors(std::vector<float>{inf}, std::vector<float>{1.0f}, 0.5); },
               {"non-finite"});
}

// Channel statistics of down-projection inputs: a bulk, positive and negative outliers in
// clusters (so Otsu's split has something to find), sometimes ties, sometimes a zero or
// negative reference (the deviation), each in random amounts.
TEST(Eaquant, OutlierScaleIsTheOfficialMaskWithOtsu) {
  Rng rng(12);
  int outliers = 0, cases_with = 0;
  for (int c = 0; c < 300; ++c) {
    const auto n = static_cast<size_t>(rng.integer(1, 300));
    std::vector<float> mx(n), mn(n);
    const double bulk = rng.uniform(0.1, 3.0);
    for (size_t i = 0; i < n; ++i) {
      mx[i] = static_cast<float>(bulk * rng.uniform(0.5, 1.0));
      mn[i] = static_cast<float>(-bulk * rng.uniform(0.5, 1.0));
      if (rng.coin(0.05)) mx[i] = static_cast<float>(bulk * rng.uniform(5.0, 8.0));
      if (rng.coin(0.02)) mx[i] = static_cast<float>(bulk * rng.uniform(30.0, 40.0));
      if (rng.coin(0.05)) mn[i] = static_cast<float>(-bulk * rng.uniform(5.0, 60.0));
      if (c % 7 == 3) mx[i] = std::round(mx[i]);  // ties
      if (c % 11 == 5) mx[i] = -std::fabs(mx[i]) * 0.1f;  // every maximum negative
      if (c % 13 == 6) mn[i] = 0.0f;                       // a zero reference minimum
    }
    moekit::eaquant::Options o;
    o.otsu_ratio = rng.coin(0.5) ? 0.65 : rng.uniform(0.55, 0.95);
    o.otsu_smooth_rate = rng.uniform(0.3, 1.0);
    o.fence = rng.coin(0.5) ? 1.5 : rng.uniform(0.0, 3.0);
    const std::vector<float> got = moekit::eaquant::outlier_scale(mx, mn, o);
    const std::vector<double> want =
        ref::eaquant_outlier_mask(to_double(mx), to_double(mn), o.otsu_ratio, o.otsu_smooth_rate, o.fence);
    int here = 0;
    for (size_t i = 0; i < n; ++i) {
      ASSERT_NEAR(got[i], want[i], 1e-6 * want[i]) << "case " << c << " channel " << i;
      here += want[i] != 1.0;
    }
    outliers += here;
    cases_with += here > 0;
  }
  EXPECT_GT(cases_with, 150);  // the cases exercise the outlier branches
  EXPECT_GT(outliers, 1000);
  expect_error([] { (void)moekit::eaquant::outlier_scale(std::vector<float>{1.0f}, std::vector<float>{}, {}); },
               {"as many minima as maxima"});
  moekit::eaquant::Options bad;
  bad.otsu_ratio = 0.5;
  expect_error([&] { (void)moekit::eaquant::outlier_scale(std::vector<float>{1.0f}, std::vector<float>{0.0f}, bad); },
               {"otsu_ratio expected in (0.5, 1)"});
}

// A smoothed bank computes the function of the unsmoothed one (f32: within rounding), returns
// the unsmoothed weights, and refuses smoothing that is not finite and > 0.
TEST(Eaquant, SmoothedBankIsTheSameFunction) {
  Rng rng(13);
  for (const bool gated : {true, false}) {
    const int64_t d = 40, f = 56, E = 3, T = 7;
    const moekit::FfnShape shape{d, f, gated, gated ? moekit::Activation::silu : moekit::Activation::gelu};
    std::vector<float> s(static_cast<size_t>(d));
    for (float& v : s) v = static_cast<float>(std::exp(rng.uniform(-3.0, 3.0)));
    moekit::FfnBank plain(E, shape), smooth(E, shape, {}, s);
    std::vector<std::vector<float>> g(E), u(E), dn(E);
    for (int64_t e = 0; e < E; ++e) {
      g[e] = rng.vec(static_cast<size_t>(f * d), 0.3);
      u[e] = rng.vec(static_cast<size_t>(f * d), 0.3);
      dn[e] = rng.vec(static_cast<size_t>(d * f), 0.3);
      plain.set_expert(e, g[e].data(), u[e].data(), dn[e].data());
      smooth.set_expert(e, g[e].data(), u[e].data(), dn[e].data());
    }
    EXPECT_EQ(smooth.input_smoothing(), s);
    const std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 2.0);
    for (int64_t e = 0; e < E; ++e) {
      std::vector<float> ya(static_cast<size_t>(T * d)), yb(ya.size()), sa(plain.scratch_floats(T)), sb(smooth.scratch_floats(T));
      EXPECT_EQ(sb.size(), sa.size() + static_cast<size_t>(T * d));
      plain.run(e, x.data(), T, ya.data(), sa.data());
      smooth.run(e, x.data(), T, yb.data(), sb.data());
      double scale = 0.0;
      for (float v : ya) scale = std::max(scale, static_cast<double>(std::fabs(v)));
      for (size_t i = 0; i < ya.size(); ++i) ASSERT_NEAR(yb[i], ya[i], 2e-5 * scale) << "expert " << e << " gated " << gated;
      std::vector<float> gg(static_cast<size_t>(f * d)), uu(gg.size()), dd(gg.size());
      smooth.get_expert(e, gated ? gg.data() : nullptr, uu.data(), dd.data());
      for (size_t i = 0; i < uu.size(); ++i) {
        ASSERT_NEAR(uu[i], u[e][i], 1e-6f * std::fabs(u[e][i]) + 1e-30f);
        if (gated) ASSERT_NEAR(gg[i], g[e][i], 1e-6f * std::fabs(g[e][i]) + 1e-30f);
        ASSERT_EQ(dd[i], dn[e][i]);
      }
    }
  }
  const moekit::FfnShape sh{4, 4};
  expect_error([&] { moekit::FfnBank b(1, sh, {}, std::vector<float>(3, 1.0f)); }, {"input smoothing expected [4]"});
  for (const float bad : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), 1e-45f}) {
    std::vector<float> v(4, 1.0f);
    v[2] = bad;
    expect_error([&] { moekit::FfnBank b(1, sh, {}, v); }, {"input smoothing[2] expected finite and > 0"});
  }
}

// A layer with one gated shared expert, hidden states with a few large channels.
struct Fixture {
  int64_t d, f, E, k, T;
  std::vector<ref::Ffn> experts;
  ref::Ffn shared;
  std::vector<float> router, shared_gate;

  Fixture(uint64_t seed, int64_t d_, int64_t f_, int64_t E_, int64_t k_) : d(d_), f(f_), E(E_), k(k_), T(0) {
    Rng rng(seed);
    for (int64_t e = 0; e < E; ++e) experts.push_back(test_support::random_ref_ffn(rng, d, f));
    shared = test_support::random_ref_ffn(rng, d, f);
    router = rng.vec(static_cast<size_t>(E * d), 1.0 / std::sqrt(static_cast<double>(d)));
    shared_gate = rng.vec(static_cast<size_t>(d), 0.1);
  }
  moekit::TopKLayer layer(WeightType type) const {
    moekit::kernels::PackOptions p;
    p.type = type;
    moekit::FfnBank bank(E, moekit::FfnShape{d, f}, p);
    for (int64_t e = 0; e < E; ++e)
      bank.set_expert(e, experts[e].gate.data(), experts[e].up.data(), experts[e].down.data());
    moekit::FfnBank sb(1, moekit::FfnShape{d, f}, p);
    sb.set_expert(0, shared.gate.data(), shared.up.data(), shared.down.data());
    std::vector<moekit::SharedExpert> sh;
    sh.push_back({std::move(sb), shared_gate});
    moekit::TopKOptions o{.num_experts = E, .k = k, .hidden = d};
    o.norm_topk_prob = true;
    return moekit::TopKLayer(moekit::TopKRouter(o, router), std::move(bank), std::move(sh));
  }
  // Hidden states: unit noise, channels `loud` times `gain`.
  static std::vector<float> inputs(uint64_t seed, int64_t T, int64_t d, const std::vector<int64_t>& loud, float gain) {
    Rng rng(seed);
    std::vector<float> x(static_cast<size_t>(T * d));
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (float& v : x) v = n(rng.g);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j : loud) x[static_cast<size_t>(t * d + j)] *= gain;
    return x;
  }
};

double silu(double v) { return v / (1.0 + std::exp(-v)); }

// calibrate(): the statistics recomputed in double from the plan's kept tokens and the
// reference weights, the scales from the transcription: input s within float rounding of the
// formulas, down scales within 1e-4 (h in f32 in the library, in double here).
TEST(Eaquant, CalibrateMatchesTheStatisticsOfTheOfficialHooks) {
  for (const uint64_t seed : {21u, 22u, 23u}) {
    const Fixture fx(seed, 48, 64, 6, 2);
    const moekit::TopKLayer layer = fx.layer(WeightType::f32);
    const int64_t T = 90, d = fx.d, f = fx.f;
    const std::vector<float> x = Fixture::inputs(seed + 100, T, d, {3, 17, 40}, 12.0f);
    moekit::Batch batch = moekit::Batch::single(T, d);
    const std::vector<int32_t> offsets = {0, 25, 25, 61, 90};  // an empty sequence too
    batch.sequence_offsets = offsets;
    std::vector<uint8_t> pad(static_cast<size_t>(T), 0);
    pad[5] = pad[70] = 1;
    batch.padding = pad;
    const moekit::eaquant::Smoothing sm = moekit::eaquant::calibrate(layer, batch, x.data());
    moekit::Workspace ws;
    (void)layer.route(batch, moekit::ActivationsIn::f32(x.data()), ws);
    const auto offs = ws.plan.expert_offsets();
    const auto toks = ws.plan.expert_tokens();
    auto seq_of = [&](int64_t t) {
      int q = 0;
      while (t >= offsets[static_cast<size_t>(q) + 1]) ++q;
      return q;
    };
    // One expert's statistics over rows (token ids), in double.
    auto stats = [&](const ref::Ffn& ex, const std::vector<int64_t>& rows, std::vector<double>& s_in, std::vector<double>& s_dn) {
      std::vector<double> a(static_cast<size_t>(d), 0.0), w(static_cast<size_t>(d), 0.0);
      for (int64_t t : rows)
        for (int64_t j = 0; j < d; ++j) a[j] = std::max(a[j], std::fabs(static_cast<double>(x[t * d + j])));
      for (int64_t r = 0; r < f; ++r)
        for (int64_t j = 0; j < d; ++j)
          w[j] = std::max({w[j], std::fabs(static_cast<double>(ex.gate[r * d + j])), std::fabs(static_cast<double>(ex.up[r * d + j]))});
      s_in = ref::eaquant_get_scale(a, w, 0.6);
      std::vector<double> mx, mn;
      bool seen = false;
      for (int q = 0; q < 4; ++q) {
        std::vector<double> hi(static_cast<size_t>(f), -INFINITY), lo(static_cast<size_t>(f), INFINITY);
        bool any = false;
        for (int64_t t : rows) {
          if (seq_of(t) != q) continue;
          any = true;
          for (int64_t c = 0; c < f; ++c) {
            double g = 0.0, u = 0.0;
            for (int64_t j = 0; j < d; ++j) {
              g += static_cast<double>(ex.gate[c * d + j]) * x[t * d + j];
              u += static_cast<double>(ex.up[c * d + j]) * x[t * d + j];
            }
            const double h = silu(g) * u;
            hi[c] = std::max(hi[c], h);
            lo[c] = std::min(lo[c], h);
          }
        }
        if (!any) continue;
        if (!seen) {
          mx = hi;
          mn = lo;
          seen = true;
        } else {
          for (int64_t c = 0; c < f; ++c) {
            mx[c] = mx[c] * 0.9 + hi[c] * 0.1;
            mn[c] = mn[c] * 0.9 + lo[c] * 0.1;
          }
        }
      }
      s_dn = seen ? ref::eaquant_outlier_mask(mx, mn, 0.65, 0.7, 1.5) : std::vector<double>(static_cast<size_t>(f), 1.0);
    };
    std::vector<double> merged(static_cast<size_t>(d), 0.0), s_in, s_dn;
    ASSERT_EQ(sm.down.size(), static_cast<size_t>(fx.E));
    int down_outliers = 0;
    for (int64_t e = 0; e < fx.E; ++e) {
      std::vector<int64_t> rows;
      for (int32_t i = offs[e]; i < offs[e + 1]; ++i) rows.push_back(toks[static_cast<size_t>(i)]);
      for (int64_t t : rows) ASSERT_FALSE(batch.is_padding(t));
      EXPECT_EQ(sm.tokens[static_cast<size_t>(e)], static_cast<int64_t>(rows.size()));
      stats(fx.experts[e], rows, s_in, s_dn);
      if (!rows.empty())
        for (int64_t j = 0; j < d; ++j) merged[j] = std::max(merged[j], s_in[j]);
      for (int64_t c = 0; c < f; ++c) {
        ASSERT_NEAR(sm.down[e][c], s_dn[c], 1e-4 * s_dn[c]) << "seed " << seed << " expert " << e << " channel " << c;
        down_outliers += s_dn[c] != 1.0;
      }
    }
    std::vector<int64_t> all;
    for (int64_t t = 0; t < T; ++t)
      if (!batch.is_padding(t)) all.push_back(t);
    stats(fx.shared, all, s_in, s_dn);
    for (int64_t j = 0; j < d; ++j) merged[j] = std::max(merged[j], s_in[j]);
    ASSERT_EQ(sm.shared_down.size(), 1u);
    for (int64_t c = 0; c < f; ++c) ASSERT_NEAR(sm.shared_down[0][c], s_dn[c], 1e-4 * s_dn[c]) << "shared channel " << c;
    for (int64_t j = 0; j < d; ++j) ASSERT_NEAR(sm.input[j], merged[j], 1e-6 * merged[j]) << "seed " << seed << " channel " << j;
    EXPECT_GT(down_outliers, 0) << "seed " << seed;
    // The loud channels get the largest factors.
    const float quiet = *std::max_element(sm.input.begin() + 4, sm.input.begin() + 17);
    EXPECT_GT(sm.input[3], 2.0f * quiet);
    // Threads do not change the statistics.
    const moekit::eaquant::Smoothing s1 = moekit::eaquant::calibrate(layer, batch, x.data(), {}, 1);
    EXPECT_EQ(s1.input, sm.input);
    EXPECT_EQ(s1.down, sm.down);
  }
}

// On hidden states with outlier channels, the smoothed w8a8 / w4a8 layers are closer to the
// f32 layer (error against a double reference of the unquantised layer) than the plain ones,
// route every token as the f32 layer does, and compute the same function in f32.
TEST(Eaquant, SmoothingLowersTheInt8ActivationErrorAndKeepsRouting) {
  const Fixture fx(31, 256, 384, 8, 2);
  const int64_t d = fx.d, T = 64;
  const std::vector<int64_t> loud = {5, 77, 130, 201};
  const std::vector<float> cal = Fixture::inputs(32, 256, d, loud, 40.0f);
  const std::vector<float> x = Fixture::inputs(33, T, d, loud, 40.0f);
  const moekit::TopKLayer f32 = fx.layer(WeightType::f32);
  moekit::Batch cb = moekit::Batch::single(256, d);
  const moekit::eaquant::Smoothing sm = moekit::eaquant::calibrate(f32, cb, cal.data());
  moekit::eaquant::Options input_only;
  input_only.smooth_down = false;
  const moekit::eaquant::Smoothing sm_in = moekit::eaquant::calibrate(f32, cb, cal.data(), input_only);
  EXPECT_TRUE(sm_in.down.empty() && sm_in.shared_down.empty());
  EXPECT_EQ(sm_in.input, sm.input);
  // The double reference of the unquantised layer.
  std::vector<ref::Shared> shared(1);
  shared[0].ffn = fx.shared;
  shared[0].gate = fx.shared_gate;
  const moekit::Batch batch = moekit::Batch::single(T, d);
  moekit::Workspace w0;
  std::vector<float> y0(static_cast<size_t>(T * d));
  f32.forward(batch, x.data(), y0.data(), w0);
  const std::vector<double> want =
      ref::moe_forward(ref::routing_from_view(ref::view_of(w0.plan), nullptr), fx.experts, shared, x.data(), T, d);
  // Smoothing alone (f32) is the same function.
  {
    const moekit::TopKLayer s32 = moekit::eaquant::apply(f32, sm, {});
    moekit::Workspace ws;
    std::vector<float> y(static_cast<size_t>(T * d));
    s32.forward(batch, x.data(), y.data(), ws);
    EXPECT_LT(rel_err(y, want), 1e-5);
    EXPECT_LT(rel_err(y0, want), 1e-5);
  }
  for (const WeightType type : {WeightType::w8a8, WeightType::w4a8}) {
    moekit::kernels::PackOptions p;
    p.type = type;
    const moekit::TopKLayer plain = fx.layer(type);
    const moekit::TopKLayer smooth = moekit::eaquant::apply(f32, sm, p);
    moekit::Workspace wp, wsm;
    std::vector<float> yp(static_cast<size_t>(T * d)), ys(yp.size());
    plain.forward(batch, x.data(), yp.data(), wp, 2);
    smooth.forward(batch, x.data(), ys.data(), wsm, 2);
    for (int64_t s = 0; s < w0.plan.num_slots(); ++s) {
      ASSERT_EQ(wsm.plan.slot_expert()[s], w0.plan.slot_expert()[s]) << "slot " << s;
      ASSERT_EQ(wsm.plan.slot_weight()[s], w0.plan.slot_weight()[s]) << "slot " << s;
    }
    const double ep = rel_err(yp, want), es = rel_err(ys, want);
    std::vector<float> yi(yp.size());
    moekit::eaquant::apply(f32, sm_in, p).forward(batch, x.data(), yi.data(), wp, 2);
    const double ei = rel_err(yi, want);
    std::printf("[ eaquant ] %s: relative error %.4f plain, %.4f input smoothing only, %.4f with the down scales\n",
                moekit::kernels::to_string(type), ep, ei, es);
    EXPECT_LT(ei, ep) << moekit::kernels::to_string(type);
    // Measured 0.042 -> 0.015 (w8a8) and 0.116 -> 0.084 (w4a8: 4-bit weights take the
    // migrated range); the bounds leave room for kernel rounding differences.
    EXPECT_LT(es, (type == WeightType::w8a8 ? 0.5 : 0.85) * ep) << moekit::kernels::to_string(type);
    // Thread counts agree bit for bit with smoothing (decode split and row blocks).
    std::vector<float> y1(yp.size());
    moekit::Workspace w1;
    smooth.forward(batch, x.data(), y1.data(), w1, 1);
    EXPECT_TRUE(test_support::same_bits(y1, ys));
    const moekit::Batch one = moekit::Batch::single(1, d);
    std::vector<float> a(static_cast<size_t>(d)), b(a.size());
    smooth.forward(one, x.data(), a.data(), w1, 1);
    smooth.forward(one, x.data(), b.data(), w1, 2);
    EXPECT_TRUE(test_support::same_bits(a, b));
  }
}

TEST(Eaquant, PackFileCarriesTheSmoothing) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(testing::TempDir()) / "moekit_eaquant_pack";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string text = R"({"model_type": "qwen2_moe", "hidden_size": 64, "moe_intermediate_size": 48,
      "shared_expert_intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": false})";
  moekit::LayerConfig cfg = moekit::parse_layer_config(text);
  const moekit::TopKLayer f32 = moekit::random_layer(cfg, 9);
  const std::vector<float> cal = Fixture::inputs(3, 40, 64, {9}, 30.0f);
  const moekit::eaquant::Smoothing sm = moekit::eaquant::calibrate(f32, moekit::Batch::single(40, 64), cal.data());
  moekit::kernels::PackOptions p;
  p.type = WeightType::w8a8;
  const moekit::TopKLayer smooth = moekit::eaquant::apply(f32, sm, p);
  const std::string path = (dir / "s.safetensors").string(), plain = (dir / "p.safetensors").string();
  moekit::save_packed_layer(path, smooth, text);
  EXPECT_EQ(moekit::io::SafetensorsFile::open(path).metadata().at("moekit.packed"), "2");
  const moekit::TopKLayer back = moekit::load_packed_layer(path);
  EXPECT_EQ(back.experts().input_smoothing(), sm.input);
  ASSERT_EQ(back.shared_experts().size(), 1u);
  EXPECT_EQ(back.shared_experts()[0].ffn.input_smoothing(), sm.input);
  const int64_t T = 9;
  const std::vector<float> x = Fixture::inputs(4, T, 64, {9}, 30.0f);
  std::vector<float> ya(static_cast<size_t>(T * 64)), yb(ya.size());
  moekit::Workspace wa, wb;
  smooth.forward(moekit::Batch::single(T, 64), x.data(), ya.data(), wa, 2);
  back.forward(moekit::Batch::single(T, 64), x.data(), yb.data(), wb, 2);
  EXPECT_TRUE(test_support::same_bits(ya, yb));
  // An unsmoothed layer keeps format 1.
  cfg.pack.type = WeightType::w8a8;
  moekit::save_packed_layer(plain, moekit::random_layer(cfg, 9), text);
  EXPECT_EQ(moekit::io::SafetensorsFile::open(plain).metadata().at("moekit.packed"), "1");
  // Smoothing tensors in a format-1 file, or bad values, are refused.
  const auto file = moekit::io::SafetensorsFile::open(path);
  auto rewrite = [&](const std::string& format, float value) {
    std::vector<std::vector<uint8_t>> store;
    std::vector<moekit::io::OutTensor> out;
    std::vector<std::string> names = file.names();
    std::stable_partition(names.begin(), names.end(), [&](const std::string& n) { return file.tensor(n).dtype == moekit::io::DType::U8; });
    store.reserve(names.size());
    for (const std::string& n : names) {
      const auto& t = file.tensor(n);
      store.emplace_back(reinterpret_cast<const uint8_t*>(t.data), reinterpret_cast<const uint8_t*>(t.data) + t.nbytes);
      if (n == "experts.input_smoothing") std::memcpy(store.back().data() + 8, &value, 4);
      out.push_back({n, t.dtype, t.shape, store.back().data()});
    }
    auto meta = file.metadata();
    meta["moekit.packed"] = format;
    const std::string bad = (dir / "bad.safetensors").string();
    moekit::io::write_safetensors(bad, out, meta);
    return bad;
  };
  expect_error([&] { (void)moekit::load_packed_layer(rewrite("1", 1.0f)); }, {"experts.input_smoothing", "format-1 file"});
  expect_error([&] { (void)moekit::load_packed_layer(rewrite("2", 0.0f)); }, {"input smoothing[2] expected finite and > 0"});
  expect_error([&] { (void)moekit::load_packed_layer(rewrite("2", std::numeric_limits<float>::quiet_NaN())); },
               {"input smoothing[2]"});
  fs::remove_all(dir);
}

// Every place that rebuilds a bank from another one's packed matrices keeps the smoothing:
// an offloaded layer whose loader returns smoothed experts (full 96-row blocks, 2 threads:
// the scratch must hold the smoothed rows), a shard of the bank, and a grown layer's old
// experts all compute what the smoothed layer computes, bit for bit.
TEST(Eaquant, SmoothedBanksSurviveOffloadShardsAndGrowth) {
  const Fixture fx(51, 32, 40, 6, 2);
  const moekit::TopKLayer f32 = fx.layer(WeightType::f32);
  const std::vector<float> cal = Fixture::inputs(5, 64, 32, {2, 9}, 20.0f);
  const moekit::eaquant::Smoothing sm = moekit::eaquant::calibrate(f32, moekit::Batch::single(64, 32), cal.data());
  moekit::kernels::PackOptions p;
  p.type = WeightType::w8a8;
  const moekit::TopKLayer smooth = moekit::eaquant::apply(f32, sm, p);
  const moekit::FfnBank& full = smooth.experts();
  const int64_t T = 300, d = 32;
  const std::vector<float> x = Fixture::inputs(6, T, d, {2, 9}, 20.0f);
  std::vector<float> want(static_cast<size_t>(T * d)), got(want.size());
  moekit::Workspace w0, w1;
  smooth.forward(moekit::Batch::single(T, d), x.data(), want.data(), w0, 2);
  auto one = [&](int64_t e) {
    return moekit::FfnBank::from_packed(full.shape(), {full.in_matrix(e)}, {full.down_matrix(e)}, {}, full.input_smoothing());
  };
  moekit::offload::OffloadedLayer<moekit::TopKRouter> off(moekit::SparseLayer<moekit::TopKRouter, moekit::offload::CachedFfnBank>(
      smooth.router(), moekit::offload::CachedFfnBank(fx.E, full.shape(), fx.E, one), smooth.shared_experts()));
  off.forward(moekit::Batch::single(T, d), x.data(), got.data(), w1, 2);
  EXPECT_TRUE(test_support::same_bits(got, want)) << "offload";
  const moekit::ep::ShardedFfnBank shard = moekit::ep::ShardedFfnBank::from_full(full, {0, 1, 2, 3, 4, 5});
  EXPECT_EQ(shard.local().input_smoothing(), sm.input);
  moekit::SparseLayer<moekit::TopKRouter, moekit::ep::ShardedFfnBank> sharded(smooth.router(), shard, smooth.shared_experts());
  moekit::Workspace w2;
  sharded.forward(moekit::Batch::single(T, d), x.data(), got.data(), w2, 2);
  EXPECT_TRUE(test_support::same_bits(got, want)) << "shard";
  const std::vector<float> z(static_cast<size_t>(40 * 32), 0.0f), zr(32, 0.0f);
  const moekit::TopKLayer grown = moekit::grow_experts(smooth, zr, z, z, z);
  EXPECT_EQ(grown.experts().input_smoothing(), sm.input);
  for (int64_t e = 0; e < fx.E; ++e) {  // old experts: the same bytes, the same smoothing
    std::vector<float> a(static_cast<size_t>(4 * d)), b(a.size()), sa(full.scratch_floats(4)), sb(sa.size());
    full.run(e, x.data(), 4, a.data(), sa.data());
    grown.experts().run(e, x.data(), 4, b.data(), sb.data());
    EXPECT_TRUE(test_support::same_bits(a, b)) << "grown expert " << e;
  }
}

// Shapes: a plain (ungated) shared expert beside gated routed experts takes no down fold
// (all-1 scales) and the smoothed layer is still the same function; with the weight on the
// input the statistics read w x.
TEST(Eaquant, PerBankShapesAndWeightOnInput) {
  Rng rng(61);
  const int64_t d = 24, f = 32, E = 4, T = 50;
  std::vector<ref::Ffn> experts;
  for (int64_t e = 0; e < E; ++e) experts.push_back(test_support::random_ref_ffn(rng, d, f));
  ref::Ffn plain = test_support::random_ref_ffn(rng, d, f);
  moekit::FfnBank sb(1, moekit::FfnShape{d, f, false, moekit::Activation::gelu});
  sb.set_expert(0, nullptr, plain.up.data(), plain.down.data());
  std::vector<moekit::SharedExpert> sh;
  sh.push_back({std::move(sb), {}});
  moekit::TopKLayer layer(moekit::TopKRouter(moekit::TopKOptions{.num_experts = E, .k = 2, .hidden = d},
                                             rng.vec(static_cast<size_t>(E * d), 0.3)),
                          test_support::bank_of(experts, d, f), std::move(sh));
  const std::vector<float> x = Fixture::inputs(7, T, d, {4}, 25.0f);
  const moekit::eaquant::Smoothing sm = moekit::eaquant::calibrate(layer, moekit::Batch::single(T, d), x.data());
  ASSERT_EQ(sm.shared_down.size(), 1u);
  for (float v : sm.shared_down[0]) ASSERT_EQ(v, 1.0f);
  const moekit::TopKLayer s32 = moekit::eaquant::apply(layer, sm, {});
  std::vector<float> a(static_cast<size_t>(T * d)), b(a.size());
  moekit::Workspace wa, wb;
  layer.forward(moekit::Batch::single(T, d), x.data(), a.data(), wa);
  s32.forward(moekit::Batch::single(T, d), x.data(), b.data(), wb);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(b[i], a[i], 2e-5 * (1.0 + std::fabs(a[i])));
  moekit::eaquant::Smoothing forged = sm;
  forged.shared_down[0][3] = 2.0f;
  expect_error([&] { (void)moekit::eaquant::apply(layer, forged, {}); }, {"down scales need gated, unclamped experts"});
  // Weight on the input: expert e's A is the largest |w x| over its rows.
  layer.set_weight_on_input(true);
  moekit::eaquant::Options o;
  o.smooth_down = false;
  const moekit::eaquant::Smoothing sw = moekit::eaquant::calibrate(layer, moekit::Batch::single(T, d), x.data(), o);
  moekit::Workspace ws;
  (void)layer.route(moekit::Batch::single(T, d), moekit::ActivationsIn::f32(x.data()), ws);
  std::vector<double> merged(static_cast<size_t>(d), 0.0);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<double> am(static_cast<size_t>(d), 0.0), wm(static_cast<size_t>(d), 0.0);
    const auto offs = ws.plan.expert_offsets();
    if (offs[e] == offs[e + 1]) continue;
    for (int32_t i = offs[e]; i < offs[e + 1]; ++i) {
      const int64_t t = ws.plan.expert_tokens()[static_cast<size_t>(i)];
      const double w = ws.plan.slot_weight()[static_cast<size_t>(ws.plan.expert_slots()[static_cast<size_t>(i)])];
      for (int64_t j = 0; j < d; ++j) am[j] = std::max(am[j], std::fabs(w * x[t * d + j]));
    }
    for (int64_t r = 0; r < f; ++r)
      for (int64_t j = 0; j < d; ++j)
        wm[j] = std::max({wm[j], std::fabs(static_cast<double>(experts[e].gate[r * d + j])), std::fabs(static_cast<double>(experts[e].up[r * d + j]))});
    const std::vector<double> s = ref::eaquant_get_scale(am, wm, 0.6);
    for (int64_t j = 0; j < d; ++j) merged[j] = std::max(merged[j], s[j]);
  }
  std::vector<double> as(static_cast<size_t>(d), 0.0), ws_(static_cast<size_t>(d), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < d; ++j) as[j] = std::max(as[j], std::fabs(static_cast<double>(x[t * d + j])));
  for (int64_t r = 0; r < f; ++r)
    for (int64_t j = 0; j < d; ++j) ws_[j] = std::max(ws_[j], std::fabs(static_cast<double>(plain.up[r * d + j])));
  const std::vector<double> s_sh = ref::eaquant_get_scale(as, ws_, 0.6);
  for (int64_t j = 0; j < d; ++j) ASSERT_NEAR(sw.input[j], std::max(merged[j], s_sh[j]), 1e-6 * std::max(merged[j], s_sh[j])) << j;
}

TEST(Eaquant, BadInputIsRefused) {
  const Fixture fx(41, 16, 24, 4, 2);
  const moekit::TopKLayer f32 = fx.layer(WeightType::f32);
  const std::vector<float> x = Fixture::inputs(1, 8, 16, {}, 1.0f);
  moekit::Batch padded = moekit::Batch::single(8, 16);
  const std::vector<uint8_t> all(8, 1);
  padded.padding = all;
  expect_error([&] { (void)moekit::eaquant::calibrate(f32, padded, x.data()); }, {"at least one unpadded calibration token"});
  expect_error([&] { (void)moekit::eaquant::calibrate(f32, moekit::Batch::single(0, 16), x.data()); },
               {"at least one unpadded calibration token"});
  std::vector<float> nan = x;
  nan[20] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { (void)moekit::eaquant::calibrate(f32, moekit::Batch::single(8, 16), nan.data()); }, {"expected finite"});
  moekit::eaquant::Options o;
  o.alpha = 0.0;
  expect_error([&] { (void)moekit::eaquant::calibrate(f32, moekit::Batch::single(8, 16), x.data(), o); }, {"alpha"});
  const moekit::eaquant::Smoothing sm = moekit::eaquant::calibrate(f32, moekit::Batch::single(8, 16), x.data());
  const moekit::TopKLayer smooth = moekit::eaquant::apply(f32, sm, {});
  expect_error([&] { (void)moekit::eaquant::calibrate(smooth, moekit::Batch::single(8, 16), x.data()); }, {"already smoothed"});
  moekit::eaquant::Smoothing short_s = sm;
  short_s.input.pop_back();
  expect_error([&] { (void)moekit::eaquant::apply(f32, short_s, {}); }, {"input smoothing expected [16]"});
  moekit::eaquant::Smoothing few = sm;
  few.down.pop_back();
  expect_error([&] { (void)moekit::eaquant::apply(f32, few, {}); }, {"down scales expected for 4 experts"});
  moekit::eaquant::Smoothing zero = sm;
  zero.down[1][3] = 0.0f;
  expect_error([&] { (void)moekit::eaquant::apply(f32, zero, {}); }, {"scale[3] expected finite and > 0"});
}

}  // namespace
