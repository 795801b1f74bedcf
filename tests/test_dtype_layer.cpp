// SPDX-License-Identifier: Apache-2.0
// Reduced-precision experts at the layer level: the error bounds of issue 4 (relative
// Frobenius error of the layer output against the f32 path, Gaussian inputs and weights),
// routing unchanged by the weight type, the decode column split bit-identical to the
// unsplit path, and FP8 block-scaled checkpoints read as their dequantised values.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/kernels/fp8.hpp"
#include "moekit/kernels/packed_gemm.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/topk.hpp"

namespace {

namespace fs = std::filesystem;
using moekit::Batch;
using moekit::FfnBank;
using moekit::FfnShape;
using moekit::SharedExpert;
using moekit::TopKOptions;
using moekit::TopKRouter;
using moekit::Workspace;
using moekit::kernels::PackOptions;
using moekit::kernels::WeightType;
using Layer = moekit::SparseLayer<TopKRouter, FfnBank>;

std::vector<float> gaussian(std::mt19937_64& g, size_t n, double sd) {
  std::normal_distribution<double> d(0.0, sd);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(d(g));
  return v;
}

// The f32 weights of one random layer (Gaussian, variance 1/fan_in), so every dtype packs
// the same values.
struct Weights {
  int64_t E, k, d, f;
  bool shared;
  std::vector<float> gate;
  std::vector<std::vector<float>> g, u, dn;
  std::vector<float> sg, su, sd;

  Weights(int64_t E_, int64_t k_, int64_t d_, int64_t f_, bool shared_, uint64_t seed)
      : E(E_), k(k_), d(d_), f(f_), shared(shared_) {
    std::mt19937_64 r(seed);
    gate = gaussian(r, static_cast<size_t>(E * d), 1.0 / std::sqrt(double(d)));
    for (int64_t e = 0; e < E; ++e) {
      g.push_back(gaussian(r, static_cast<size_t>(f * d), 1.0 / std::sqrt(double(d))));
      u.push_back(gaussian(r, static_cast<size_t>(f * d), 1.0 / std::sqrt(double(d))));
      dn.push_back(gaussian(r, static_cast<size_t>(d * f), 1.0 / std::sqrt(double(f))));
    }
    sg = gaussian(r, static_cast<size_t>(f * d), 1.0 / std::sqrt(double(d)));
    su = gaussian(r, static_cast<size_t>(f * d), 1.0 / std::sqrt(double(d)));
    sd = gaussian(r, static_cast<size_t>(d * f), 1.0 / std::sqrt(double(f)));
  }

  Layer build(const PackOptions& pack) const {
    TopKOptions o;
    o.num_experts = E;
    o.k = k;
    o.hidden = d;
    o.norm_topk_prob = true;
    const FfnShape shape{d, f, true, moekit::Activation::silu};
    FfnBank bank(E, shape, pack);
    for (int64_t e = 0; e < E; ++e)
      bank.set_expert(e, g[static_cast<size_t>(e)].data(), u[static_cast<size_t>(e)].data(),
                      dn[static_cast<size_t>(e)].data());
    std::vector<SharedExpert> sh;
    if (shared) {
      SharedExpert s{FfnBank(1, shape, pack), {}};
      s.ffn.set_expert(0, sg.data(), su.data(), sd.data());
      sh.push_back(std::move(s));
    }
    return Layer(TopKRouter(o, gate), std::move(bank), std::move(sh));
  }
};

double rel_frobenius(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

// Issue 4's bounds: bf16 <= 5e-3, int8 weight-only <= 2e-2, W8A8 <= 3e-2. fp8 e4m3 with
// 128x128 block scales (3 mantissa bits): <= 6e-2. bf16 weights with bf16 activations: 1e-2.
// int4 (Q4_0's grid, groups of 32): ~0.085 per GEMM (test_kernels_dtype.cpp), two of them
// and the SwiGLU product: measured 0.149 on both shapes; bound 0.2. w4a8: int4's weights,
// activations per 32 in int8: about int4's error. ternary: ~0.51 per GEMM on Gaussian weights
// (test_kernels_dtype.cpp), compounded through the SwiGLU product and down_proj: measured
// 0.836 / 0.835; bound 0.9 (a ternary checkpoint's own weights pack exactly instead).
TEST(DtypeLayer, ErrorBoundsAgainstF32OnGaussianData) {
  struct Case {
    PackOptions pack;
    double bound;
    const char* what;
  };
  const Case cases[] = {{{WeightType::bf16, false, nullptr}, 5e-3, "bf16"},
                        {{WeightType::int8, false, nullptr}, 2e-2, "int8"},
                        {{WeightType::w8a8, false, nullptr}, 3e-2, "w8a8"},
                        {{WeightType::fp8, false, nullptr}, 6e-2, "fp8"},
                        {{WeightType::int4, false, nullptr}, 0.2, "int4"},
                        {{WeightType::int4zp, false, nullptr}, 0.2, "int4zp"},
                        {{WeightType::w4a8, false, nullptr}, 0.2, "w4a8"},
                        {{WeightType::ternary, false, nullptr}, 0.9, "ternary"},
                        {{WeightType::bf16, true, nullptr}, 1e-2, "bf16 + bf16 activations"},
                        {{WeightType::f32, true, nullptr}, 1e-2, "f32 + bf16 activations"}};
  // Two shapes: ragged sizes (tails everywhere) and a 128-multiple one (whole FP8 blocks).
  for (const auto& [E, k, d, f, T] : {std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>{8, 2, 200, 300, 77},
                                      {16, 4, 256, 384, 160}}) {
    const Weights w(E, k, d, f, true, 100 + static_cast<uint64_t>(d));
    std::mt19937_64 r(5);
    const std::vector<float> x = gaussian(r, static_cast<size_t>(T * d), 1.0);
    const Batch batch = Batch::single(T, d);
    std::vector<float> ref(static_cast<size_t>(T * d)), out(ref.size());
    Workspace ws_ref, ws;
    w.build({}).forward(batch, x.data(), ref.data(), ws_ref, 2);
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(c.what) + " d=" + std::to_string(d));
      const Layer layer = w.build(c.pack);
      EXPECT_EQ(layer.experts().weight_type(), c.pack.type);
      layer.forward(batch, x.data(), out.data(), ws, 2);
      const double err = rel_frobenius(out, ref);
      EXPECT_LE(err, c.bound);
      if (c.pack.type != WeightType::f32) EXPECT_GT(err, 0.0) << "reduced precision changed nothing: not exercised";
      // The router is f32 for every type: routing decisions are identical.
      for (size_t s = 0; s < ws.plan.slot_expert().size(); ++s)
        ASSERT_EQ(ws.plan.slot_expert()[s], ws_ref.plan.slot_expert()[s]) << "slot " << s;
      // Resident bytes shrink with the type.
      if (c.pack.type != WeightType::f32)
        EXPECT_LT(layer.experts().weight_bytes_per_expert(), 0.55 * w.build({}).experts().weight_bytes_per_expert());
      // Threads: 1 vs 2 bit-identical.
      std::vector<float> one(ref.size());
      Workspace ws1;
      layer.forward(batch, x.data(), one.data(), ws1, 1);
      for (size_t i = 0; i < one.size(); ++i) ASSERT_EQ(one[i], out[i]) << i;
    }
  }
}

// The decode path (threads split each expert's columns) equals the unsplit path bit for bit,
// for every weight type, with and without padding and a shared expert.
TEST(DtypeLayer, DecodeColumnSplitIsBitIdentical) {
  std::mt19937_64 r(9);
  int compared = 0;
  for (WeightType t :
       {WeightType::f32, WeightType::bf16, WeightType::int8, WeightType::w8a8, WeightType::fp8, WeightType::int4,
        WeightType::int4zp, WeightType::w4a8, WeightType::ternary}) {
    for (bool shared : {false, true}) {
      const Weights w(6, 2, 72, 136, shared, 7 + static_cast<uint64_t>(t));
      Layer layer = w.build({t, false, nullptr});
      for (int64_t T : {1, 2, 5, 16}) {
        for (bool pad : {false, true}) {
          const std::vector<float> x = gaussian(r, static_cast<size_t>(T * 72), 1.0);
          std::vector<uint8_t> padding(static_cast<size_t>(T), 0);
          if (pad) padding[static_cast<size_t>(T / 2)] = 1;
          Batch batch = Batch::single(T, 72);
          if (pad) batch.padding = padding;
          std::vector<float> a(x.size()), b(x.size()), c(x.size());
          Workspace ws;
          layer.set_decode_split(false);
          layer.forward(batch, x.data(), a.data(), ws, 2);
          layer.set_decode_split(true);
          layer.forward(batch, x.data(), b.data(), ws, 2);
          layer.forward(batch, x.data(), c.data(), ws, 3);
          for (size_t i = 0; i < a.size(); ++i) {
            ASSERT_EQ(a[i], b[i]) << moekit::kernels::to_string(t) << " T=" << T << " i=" << i;
            ASSERT_EQ(a[i], c[i]) << moekit::kernels::to_string(t) << " T=" << T << " i=" << i;
          }
          ++compared;
        }
      }
    }
  }
  EXPECT_EQ(compared, 9 * 2 * 4 * 2);
}

TEST(DtypeLayer, ConfigDtypeKeys) {
  const auto c = moekit::parse_layer_config(
      R"({"moekit_config_version": 1, "preset": "mixtral", "hidden_size": 16,
          "experts": {"intermediate_size": 32, "dtype": "int8", "bf16_activations": true}})");
  EXPECT_EQ(c.pack.type, WeightType::int8);
  EXPECT_TRUE(c.pack.bf16_activations);
  EXPECT_EQ(moekit::parse_layer_config(R"({"moekit_config_version": 1, "preset": "mixtral"})").pack.type, WeightType::f32);
  try {
    (void)moekit::parse_layer_config(
        R"({"moekit_config_version": 1, "preset": "mixtral", "experts": {"dtype": "fp16"}})", "c.json");
    FAIL() << "expected an error";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find("c.json.experts.dtype"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("bf16"), std::string::npos) << e.what();
  }
}

// ------------------------------------------------------------------ FP8 checkpoints

class Fp8File : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(testing::TempDir()) / "moekit_fp8";
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

// An F8_E4M3 [n, k] matrix with [ceil(n/128), ceil(k/128)] scales reads as q * scale, checked
// against a decoder written here from the format's definition (double arithmetic).
TEST_F(Fp8File, BlockScaledMatrixDequantises) {
  auto decode = [](uint8_t v) {
    const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
    const double mag = e == 0 ? m / 8.0 * std::pow(2.0, -6) : (1.0 + m / 8.0) * std::pow(2.0, e - 7);
    return s ? -mag : mag;
  };
  std::mt19937_64 r(3);
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{130, 260}, {128, 128}, {5, 300}}) {
    std::vector<uint8_t> q(static_cast<size_t>(n * k));
    for (auto& b : q) {
      do b = static_cast<uint8_t>(r() & 0xFF);
      while ((b & 0x7F) == 0x7F);  // no NaN codes
    }
    const int64_t sn = (n + 127) / 128, sk = (k + 127) / 128;
    std::vector<float> scale(static_cast<size_t>(sn * sk));
    for (size_t i = 0; i < scale.size(); ++i) scale[i] = std::ldexp(1.0f + 0.25f * float(i % 5), -int(i % 7));
    const fs::path p = dir_ / "w.safetensors";
    moekit::io::write_safetensors(p.string(), {{"w.weight", moekit::io::DType::F8_E4M3, {n, k}, q.data()},
                                               {"w.weight_scale_inv", moekit::io::DType::F32, {sn, sk}, scale.data()},
                                               {"lonely.weight", moekit::io::DType::F8_E4M3, {n, k}, q.data()}});
    const auto src = moekit::io::TensorSource::open(p.string());
    const std::vector<float> got = src.read_f32("w.weight", {n, k});
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < k; ++j) {
        const double want = decode(q[static_cast<size_t>(i * k + j)]) * scale[static_cast<size_t>((i / 128) * sk + j / 128)];
        ASSERT_EQ(double(got[static_cast<size_t>(i * k + j)]), want) << i << "," << j;
      }
    // Without its scales: an error naming the missing tensor.
    try {
      (void)src.read_f32("lonely.weight", {n, k});
      FAIL() << "expected an error";
    } catch (const moekit::error& e) {
      EXPECT_NE(std::string(e.what()).find("lonely.weight_scale_inv"), std::string::npos) << e.what();
    }
  }
  // Scales of the wrong shape are named too.
  std::vector<uint8_t> q(64 * 200, 0x38);  // 1.0
  std::vector<float> bad(3, 1.0f);
  const fs::path p = dir_ / "bad.safetensors";
  moekit::io::write_safetensors(p.string(), {{"w.weight", moekit::io::DType::F8_E4M3, {64, 200}, q.data()},
                                             {"w.weight_scale_inv", moekit::io::DType::F32, {1, 3}, bad.data()}});
  try {
    (void)moekit::io::TensorSource::open(p.string()).read_f32("w.weight", {64, 200});
    FAIL() << "expected an error";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find("w.weight_scale_inv"), std::string::npos) << e.what();
  }
}

// The scalar e4m3 conversions: every code decodes to the format's value and re-encodes to
// itself (NaN codes aside); encoding rounds to nearest even and saturates at 448.
TEST(Fp8Convert, EveryCodeRoundTripsAndRoundingIsNearestEven) {
  for (int b = 0; b < 256; ++b) {
    const auto v = static_cast<uint8_t>(b);
    const float x = moekit::kernels::fp8_e4m3_to_float(v);
    if ((b & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(x));
      continue;
    }
    EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(x), (b == 0x80 ? 0x80 : v)) << b;
  }
  EXPECT_EQ(moekit::kernels::fp8_e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(1e6f), 0x7E);
  EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(-1e6f), 0xFE);
  // Between 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code 0x38.
  EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(1.0625f), 0x38);
  EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(1.0626f), 0x39);
  // Between 1.125 (0x39) and 1.25 (0x3A): the midpoint goes to the even code 0x3A.
  EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(1.1875f), 0x3A);
  // Subnormals: 2^-9 is the smallest; half of it rounds to 0 (even).
  EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(std::ldexp(1.0f, -9)), 0x01);
  EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(std::ldexp(1.0f, -10)), 0x00);
}

// Every rounding boundary of the (bit-arithmetic) encoder: for each pair of adjacent finite
// codes, the midpoint goes to the even code and its float neighbours to the nearer code, for
// both signs; beyond 448 everything saturates; infinities saturate, NaN stays NaN.
TEST(Fp8Convert, EveryMidpointAndItsNeighboursRoundCorrectly) {
  int checked = 0;
  for (int c = 0; c < 0x7E; ++c) {
    const float lo = moekit::kernels::fp8_e4m3_to_float(static_cast<uint8_t>(c)),
                hi = moekit::kernels::fp8_e4m3_to_float(static_cast<uint8_t>(c + 1));
    const float mid = static_cast<float>((static_cast<double>(lo) + hi) / 2);  // exact in float
    ASSERT_EQ(static_cast<double>(mid), (static_cast<double>(lo) + hi) / 2);
    for (const float sign : {1.0f, -1.0f}) {
      const auto enc = [&](float v) { return moekit::kernels::float_to_fp8_e4m3(sign * v) & 0x7F; };
      EXPECT_EQ(enc(mid), (c % 2 == 0 ? c : c + 1)) << "midpoint after code " << c;
      EXPECT_EQ(enc(std::nextafter(mid, 0.0f)), c) << c;
      EXPECT_EQ(enc(std::nextafter(mid, 1e9f)), c + 1) << c;
      EXPECT_EQ(enc(lo), c);
      checked += 4;
    }
  }
  EXPECT_EQ(checked, 0x7E * 8);
  for (const float v : {448.0f, 448.5f, 463.99f, 464.0f, 1e30f, std::numeric_limits<float>::infinity()}) {
    EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(v), 0x7E) << v;
    EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(-v), 0xFE) << v;
  }
  EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(std::numeric_limits<float>::quiet_NaN()) & 0x7F, 0x7F);
  EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(-0.0f), 0x80);
  EXPECT_EQ(moekit::kernels::float_to_fp8_e4m3(std::numeric_limits<float>::denorm_min()), 0x00);
}

}  // namespace
