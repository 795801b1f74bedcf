// SPDX-License-Identifier: Apache-2.0
// GGUF: the reader's dequantisation of every type against a per-element reference, hostile
// files, and whole MoE layers of several architectures against a double-precision
// transcription of llama.cpp's build_moe_ffn (src/llama-graph.cpp at 00395eb) with the flags
// src/models/*.cpp pass per architecture.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/gguf.hpp"
#include "moekit/io/model.hpp"
#include "support/gguf_writer.hpp"

namespace {

using moekit::io::GgufFile;
using namespace moekit_test;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const moekit::error& e) {
    return e.what();
  }
  return "";
}

// Rows [r0, r0 + rows) of t seen as [rows, ne0], by the reference dequantiser.
std::vector<double> ref_rows(const GgufOut& t, int64_t r0, int64_t rows) {
  const int64_t ne0 = t.ne[0], rb = gguf_row_bytes(t.type, ne0);
  std::vector<double> out(static_cast<size_t>(rows * ne0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < ne0; ++i) out[static_cast<size_t>(r * ne0 + i)] = ref_dequant(t.type, t.data.data() + (r0 + r) * rb, i);
  return out;
}

GgufFile open_bytes(const std::vector<GgufKv>& kv, const std::vector<GgufOut>& t) {
  return GgufFile::from_bytes("test.gguf", gguf_bytes(kv, t));
}

TEST(Gguf, EveryTypeDequantisesAsTheReference) {
  std::mt19937 g(2026);
  for (uint32_t type : {kF32, kF16, kBF16, kQ4_0, kQ8_0, kQ4_K, kQ6_K, kMXFP4}) {
    const int64_t ne0 = type == kQ4_K || type == kQ6_K ? 512 : 96, rows = 5;
    const GgufOut t = gguf_tensor("w", type, {ne0, rows}, g, 0.7f);
    const GgufFile f = open_bytes({kv_str("general.architecture", "llama"), kv_str_array("tokens", {"a", "bc", ""})},
                                  {gguf_tensor("pad", kF32, {32}, g, 1.0f), t});
    ASSERT_EQ(f.tensor("w").rows(), rows);
    std::vector<float> got(static_cast<size_t>(3 * ne0), -9.0f);
    f.read_rows_f32("w", 2, 3, got.data());
    const std::vector<double> want = ref_rows(t, 2, 3);
    int nonzero = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], 2e-7 * std::fabs(want[i]) + 1e-30) << moekit::io::ggml_type_name(type) << " at " << i;
      nonzero += want[i] != 0.0;
    }
    EXPECT_GT(nonzero, static_cast<int>(got.size()) / 2) << moekit::io::ggml_type_name(type);
  }
}

TEST(Gguf, ReferenceQuantisersStayWithinTheirGrid) {
  std::mt19937 g(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(32 * 64);
  for (float& v : x) v = nd(g);
  for (uint32_t type : {kQ4_0, kQ8_0}) {
    GgufOut t{"w", type, {static_cast<int64_t>(x.size())}, type == kQ4_0 ? quantize_q4_0(x) : quantize_q8_0(x)};
    const std::vector<double> back = ref_rows(t, 0, 1);
    for (size_t b = 0; b < x.size() / 32; ++b) {
      double amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(double(x[b * 32 + j])));
      const double step = type == kQ4_0 ? amax / 8 : amax / 127;  // one code step, f16-rounded scale aside
      for (int j = 0; j < 32; ++j)
        // half a step (Q4_0: a whole one where the code clamps at 15), plus the f16 rounding of
        // the stored scale times the largest code (8 or 127 x 2^-11)
        ASSERT_LE(std::fabs(back[b * 32 + j] - x[b * 32 + j]), (type == kQ4_0 ? 1.004 : 0.563) * step + 1e-6)
            << moekit::io::ggml_type_name(type) << " block " << b;
    }
  }
}

TEST(Gguf, MetadataGettersCheckTypes) {
  std::mt19937 g(1);
  const GgufFile f = open_bytes({kv_str("general.architecture", "qwen2moe"), kv_u32("qwen2moe.expert_count", 8),
                                 kv_f32("x.scale", 2.5f), kv_bool("x.norm", true)},
                                {gguf_tensor("w", kF32, {4}, g, 1.0f)});
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.get_string("general.architecture"), "qwen2moe");
  EXPECT_EQ(f.get_int("qwen2moe.expert_count"), 8);
  EXPECT_DOUBLE_EQ(*f.get_float("x.scale"), 2.5);
  EXPECT_EQ(f.get_bool("x.norm"), true);
  EXPECT_FALSE(f.get_int("missing").has_value());
  EXPECT_NE(error_of([&] { (void)f.get_int("x.scale"); }).find("has type FLOAT32, expected an integer"), std::string::npos);
  EXPECT_NE(error_of([&] { (void)f.get_string("x.norm"); }).find("expected STRING"), std::string::npos);
  EXPECT_NE(error_of([&] { (void)f.tensor("v"); }).find("no tensor"), std::string::npos);
}

TEST(Gguf, HostileFilesAreErrorsNamingTheProblem) {
  std::mt19937 g(3);
  const std::vector<GgufKv> kv = {kv_str("general.architecture", "llama"), kv_str_array("t", {"x", "yz"})};
  const std::vector<GgufOut> ts = {gguf_tensor("a", kQ8_0, {64, 2}, g, 1.0f), gguf_tensor("b", kF16, {8}, g, 1.0f)};
  const std::vector<std::byte> good = gguf_bytes(kv, ts);
  // Every truncation is an error (never a crash, a read past the buffer or a huge allocation),
  // up to the end of the last tensor's bytes; only the padding after them may go.
  const size_t last_end = good.size() - 16;  // "b": 8 F16 values, then 16 bytes of padding
  EXPECT_NO_THROW((void)GgufFile::from_bytes("t.gguf", std::vector<std::byte>(good.begin(), good.begin() + static_cast<long>(last_end))));
  for (size_t n = 0; n < last_end; ++n) {
    const std::string msg = error_of([&] {
      (void)GgufFile::from_bytes("t.gguf", std::vector<std::byte>(good.begin(), good.begin() + static_cast<long>(n)));
    });
    ASSERT_FALSE(msg.empty()) << "a " << n << "-byte prefix of a " << good.size() << "-byte file was accepted";
    ASSERT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
  auto mutated = [&](size_t at, const void* v, size_t len) {
    std::vector<std::byte> b = good;
    std::memcpy(b.data() + at, v, len);
    return error_of([&] { (void)GgufFile::from_bytes("t.gguf", b); });
  };
  const uint32_t v9 = 9, v1 = 1;
  const uint64_t huge = uint64_t{1} << 62;
  EXPECT_NE(mutated(0, "GGUX", 4).find("not a GGUF file"), std::string::npos);
  EXPECT_NE(mutated(4, &v9, 4).find("version 9"), std::string::npos);
  EXPECT_NE(mutated(4, &v1, 4).find("version 1"), std::string::npos);
  EXPECT_NE(mutated(8, &huge, 8).find("tensor count"), std::string::npos);
  EXPECT_NE(mutated(16, &huge, 8).find("metadata count"), std::string::npos);
  EXPECT_NE(mutated(24, &huge, 8).find("length"), std::string::npos);  // the first key's length
  // Tensor-level problems, from files written to have them.
  auto bad = [&](std::vector<GgufKv> k, std::vector<GgufOut> t) { return error_of([&] { (void)open_bytes(k, t); }); };
  EXPECT_NE(bad(kv, {GgufOut{"q", kQ4_0, {48}, std::vector<uint8_t>(27)}}).find("multiple of its block size 32"),
            std::string::npos);
  EXPECT_NE(bad(kv, {GgufOut{"q", kF32, {1, 1, 1, 1, 1}, std::vector<uint8_t>(4)}}).find("expected 1..4"), std::string::npos);
  EXPECT_NE(bad(kv, {GgufOut{"q", kF32, {1}, {0, 0, 0, 0}}, GgufOut{"q", kF32, {1}, {0, 0, 0, 0}}}).find("appears twice"),
            std::string::npos);
  EXPECT_NE(bad({kv_u32("k", 1), kv_u32("k", 2)}, {}).find("appears twice"), std::string::npos);
  EXPECT_NE(bad({GgufKv{"k", 7, {2}}}, {}).find("BOOL value 2"), std::string::npos);
  EXPECT_NE(bad({GgufKv{"k", 13, {}}}, {}).find("value type 13"), std::string::npos);
  EXPECT_NE(bad({kv_str("general.alignment", "32")}, {}).find("general.alignment has type STRING"), std::string::npos);
  EXPECT_NE(bad({kv_u32("general.alignment", 48)}, {}).find("power of two"), std::string::npos);
  // A tensor whose bytes run past the end: the declared size, not the written one, counts.
  GgufOut short_t{"s", kF32, {1000}, std::vector<uint8_t>(64)};
  EXPECT_NE(bad(kv, {short_t}).find("run past the end of the file"), std::string::npos);
  // A type moekit does not read is listed, and reading it names the type.
  const GgufFile f = open_bytes(kv, {GgufOut{"q41", 3, {32}, std::vector<uint8_t>(20)}});
  std::vector<float> dst(32);
  EXPECT_NE(error_of([&] { f.read_rows_f32("q41", 0, 1, dst.data()); }).find("has type Q4_1"), std::string::npos);
  const GgufFile f2 = open_bytes(kv, ts);
  EXPECT_NE(error_of([&] { f2.read_rows_f32("a", 1, 2, dst.data()); }).find("expected inside its 2"), std::string::npos);
}

TEST(Gguf, OpenRefusesWhatIsNotARegularFile) {
  EXPECT_NE(error_of([] { (void)GgufFile::open("/nonexistent/x.gguf"); }).find("cannot open"), std::string::npos);
  EXPECT_NE(error_of([] { (void)GgufFile::open("/tmp"); }).find("a directory"), std::string::npos);
}

// ---------------------------------------------------------------- whole layers

struct ArchCase {
  std::string name, arch;
  int gating_meta = 0;  // written as <arch>.expert_gating_func when > 0
  int gating = 1;       // the gating llama.cpp applies: 1 softmax, 2 sigmoid, 3 softmax over the k
  bool norm = false, norm_meta = false;
  float scale = 0.0f;  // <arch>.expert_weights_scale (0: not written)
  int groups = 0, groups_used = 0;
  bool probs_bias = false, shared = false, shared_gate = false, fused = false, gpt_oss = false, before_ffn = false;
  uint32_t expert_type = kF32;
  int64_t d = 64, f = 32, E = 8, k = 2, fs = 32;
};

void PrintTo(const ArchCase& c, std::ostream* os) { *os << c.name; }

struct Built {
  std::vector<GgufKv> kv;
  std::vector<GgufOut> t;
};

Built build_case(const ArchCase& c, int64_t layer, std::mt19937& g) {
  Built b;
  const std::string a = c.arch, p = "blk." + std::to_string(layer) + ".";
  b.kv = {kv_str("general.architecture", a), kv_u32(a + ".embedding_length", static_cast<uint32_t>(c.d)),
          kv_u32(a + ".expert_count", static_cast<uint32_t>(c.E)), kv_u32(a + ".expert_used_count", static_cast<uint32_t>(c.k)),
          kv_u32(a + ".expert_feed_forward_length", static_cast<uint32_t>(c.f)), kv_u32(a + ".block_count", 40)};
  if (c.gating_meta) b.kv.push_back(kv_u32(a + ".expert_gating_func", static_cast<uint32_t>(c.gating_meta)));
  if (c.norm_meta) b.kv.push_back(kv_bool(a + ".expert_weights_norm", c.norm));
  if (c.scale != 0.0f) b.kv.push_back(kv_f32(a + ".expert_weights_scale", c.scale));
  if (c.groups) {
    b.kv.push_back(kv_u32(a + ".expert_group_count", static_cast<uint32_t>(c.groups)));
    b.kv.push_back(kv_u32(a + ".expert_group_used_count", static_cast<uint32_t>(c.groups_used)));
  }
  const float wr = 1.0f / std::sqrt(static_cast<float>(c.d));
  b.t.push_back(gguf_tensor(p + "ffn_gate_inp.weight", kF32, {c.d, c.E}, g, 1.5f * wr));
  if (c.probs_bias) b.t.push_back(gguf_tensor(p + "exp_probs_b.bias", kF32, {c.E}, g, 0.3f));
  if (c.gpt_oss) b.t.push_back(gguf_tensor(p + "ffn_gate_inp.bias", kF32, {c.E}, g, 0.5f));
  const float wx = (c.gpt_oss ? 4.0f : 1.0f) * wr;
  if (c.fused) {
    b.t.push_back(gguf_tensor(p + "ffn_gate_up_exps.weight", c.expert_type, {c.d, 2 * c.f, c.E}, g, wx));
  } else {
    b.t.push_back(gguf_tensor(p + "ffn_gate_exps.weight", c.expert_type, {c.d, c.f, c.E}, g, wx));
    b.t.push_back(gguf_tensor(p + "ffn_up_exps.weight", c.expert_type, {c.d, c.f, c.E}, g, wx));
  }
  b.t.push_back(gguf_tensor(p + "ffn_down_exps.weight", c.expert_type, {c.f, c.d, c.E}, g,
                            1.0f / std::sqrt(static_cast<float>(c.f))));
  if (c.gpt_oss) {
    b.t.push_back(gguf_tensor(p + "ffn_gate_exps.bias", kF32, {c.f, c.E}, g, 1.0f));
    b.t.push_back(gguf_tensor(p + "ffn_up_exps.bias", kF32, {c.f, c.E}, g, 1.0f));
    b.t.push_back(gguf_tensor(p + "ffn_down_exps.bias", kF32, {c.d, c.E}, g, 0.3f));
  }
  if (c.shared) {
    b.t.push_back(gguf_tensor(p + "ffn_gate_shexp.weight", kF16, {c.d, c.fs}, g, wr));
    b.t.push_back(gguf_tensor(p + "ffn_up_shexp.weight", kF16, {c.d, c.fs}, g, wr));
    b.t.push_back(gguf_tensor(p + "ffn_down_shexp.weight", kBF16, {c.fs, c.d}, g, 1.0f / std::sqrt(float(c.fs))));
    if (c.shared_gate) b.t.push_back(gguf_tensor(p + "ffn_gate_inp_shexp.weight", kF32, {c.d}, g, wr));
  }
  return b;
}

const GgufOut& find(const Built& b, const std::string& name) {
  for (const auto& t : b.t)
    if (t.name == name) return t;
  throw std::runtime_error("no " + name);
}

double silu(double z) { return z / (1.0 + std::exp(-z)); }
double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// build_moe_ffn in double: logits, probs, selection (+ exp_probs_b; llama4 the logits), group
// masking (sum of each group's best two), top-k, weights from probs (softmax_weight: softmax of
// the chosen logits), norm_w (/ max(sum, 6.103515625e-5)), scale, experts, the shared expert.
std::vector<double> ref_layer(const ArchCase& c, const Built& b, int64_t layer, const std::vector<float>& x,
                              int64_t T, std::vector<int32_t>& ids) {
  const std::string p = "blk." + std::to_string(layer) + ".";
  const int64_t d = c.d, f = c.f, E = c.E, k = c.k;
  const auto wr = ref_rows(find(b, p + "ffn_gate_inp.weight"), 0, E);
  std::vector<double> y(static_cast<size_t>(T * d), 0.0);
  ids.assign(static_cast<size_t>(T * k), -1);
  auto dot = [](const double* w, const float* v, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += w[i] * v[i];
    return s;
  };
  auto ffn = [&](const std::vector<double>& wg, const std::vector<double>& wu, const std::vector<double>& wd, int64_t ff,
                 const std::vector<float>& in, const double* bg, const double* bu, const double* bd) {
    std::vector<double> h(static_cast<size_t>(ff)), out(static_cast<size_t>(d));
    for (int64_t j = 0; j < ff; ++j) {
      double gv = dot(wg.data() + j * d, in.data(), d) + (bg ? bg[j] : 0), uv = dot(wu.data() + j * d, in.data(), d) + (bu ? bu[j] : 0);
      if (c.gpt_oss) {
        gv = std::min(gv, 7.0);
        uv = std::clamp(uv, -7.0, 7.0);
        h[static_cast<size_t>(j)] = (uv + 1.0) * gv * sigmoid(1.702 * gv);
      } else {
        h[static_cast<size_t>(j)] = silu(gv) * uv;
      }
    }
    for (int64_t i = 0; i < d; ++i) {
      double s = bd ? bd[i] : 0.0;
      for (int64_t j = 0; j < ff; ++j) s += wd[static_cast<size_t>(i * ff + j)] * h[static_cast<size_t>(j)];
      out[static_cast<size_t>(i)] = s;
    }
    return out;
  };
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x.data() + t * d;
    std::vector<double> logit(static_cast<size_t>(E)), prob(static_cast<size_t>(E)), sel(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) logit[e] = dot(wr.data() + e * d, xt, d);
    if (c.gpt_oss) {
      const auto lb = ref_rows(find(b, p + "ffn_gate_inp.bias"), 0, 1);
      for (int64_t e = 0; e < E; ++e) logit[e] += lb[e];
    }
    const double m = *std::max_element(logit.begin(), logit.end());
    double z = 0;
    for (int64_t e = 0; e < E; ++e) z += std::exp(logit[e] - m);
    for (int64_t e = 0; e < E; ++e)
      prob[e] = c.gating == 1 ? std::exp(logit[e] - m) / z : c.gating == 2 ? sigmoid(logit[e]) : logit[e];
    for (int64_t e = 0; e < E; ++e) sel[e] = c.before_ffn ? logit[e] : prob[e];
    if (c.probs_bias) {
      const auto pb = ref_rows(find(b, p + "exp_probs_b.bias"), 0, 1);
      for (int64_t e = 0; e < E; ++e) sel[e] += pb[e];
    }
    auto ranked = [&](std::vector<int> cand) {
      std::stable_sort(cand.begin(), cand.end(), [&](int a, int bb) { return sel[a] > sel[bb]; });
      return cand;
    };
    std::vector<int> cand(static_cast<size_t>(E));
    std::iota(cand.begin(), cand.end(), 0);
    if (c.groups > 1) {
      const int64_t per = E / c.groups;
      std::vector<double> gs(static_cast<size_t>(c.groups));
      for (int gi = 0; gi < c.groups; ++gi) {
        std::vector<double> v(sel.begin() + gi * per, sel.begin() + (gi + 1) * per);
        std::sort(v.rbegin(), v.rend());
        gs[gi] = v[0] + (per > 1 ? v[1] : 0.0);
      }
      std::vector<int> go(static_cast<size_t>(c.groups));
      std::iota(go.begin(), go.end(), 0);
      std::stable_sort(go.begin(), go.end(), [&](int a, int bb) { return gs[a] > gs[bb]; });
      cand.clear();
      for (int gi = 0; gi < c.groups_used; ++gi)
        for (int64_t e = go[gi] * per; e < (go[gi] + 1) * per; ++e) cand.push_back(static_cast<int>(e));
      std::sort(cand.begin(), cand.end());
    }
    const std::vector<int> order = ranked(cand);
    std::vector<double> w(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) {
      ids[static_cast<size_t>(t * k + j)] = order[j];
      w[j] = prob[order[j]];
    }
    if (c.gating == 3) {
      const double mm = *std::max_element(w.begin(), w.end());
      double s = 0;
      for (double& v : w) s += (v = std::exp(v - mm));
      for (double& v : w) v /= s;
    }
    if (c.norm) {
      const double s = std::max(std::accumulate(w.begin(), w.end(), 0.0), 6.103515625e-5);
      for (double& v : w) v /= s;
    }
    if (c.scale != 0.0f && c.scale != 1.0f)
      for (double& v : w) v *= c.scale;
    for (int64_t j = 0; j < k; ++j) {
      const int e = order[j];
      std::vector<double> wg, wu;
      if (c.fused) {
        const auto both = ref_rows(find(b, p + "ffn_gate_up_exps.weight"), e * 2 * f, 2 * f);
        wg.assign(both.begin(), both.begin() + f * d);
        wu.assign(both.begin() + f * d, both.end());
      } else {
        wg = ref_rows(find(b, p + "ffn_gate_exps.weight"), e * f, f);
        wu = ref_rows(find(b, p + "ffn_up_exps.weight"), e * f, f);
      }
      const auto wd = ref_rows(find(b, p + "ffn_down_exps.weight"), e * d, d);
      std::vector<float> in(xt, xt + d);
      if (c.before_ffn)
        for (float& v : in) v = static_cast<float>(v * w[j]);  // ggml multiplies the f32 input
      std::vector<double> bg, bu, bd;
      if (c.gpt_oss) {
        bg = ref_rows(find(b, p + "ffn_gate_exps.bias"), e, 1);
        bu = ref_rows(find(b, p + "ffn_up_exps.bias"), e, 1);
        bd = ref_rows(find(b, p + "ffn_down_exps.bias"), e, 1);
      }
      const auto out = ffn(wg, wu, wd, f, in, c.gpt_oss ? bg.data() : nullptr, c.gpt_oss ? bu.data() : nullptr,
                           c.gpt_oss ? bd.data() : nullptr);
      for (int64_t i = 0; i < d; ++i) y[static_cast<size_t>(t * d + i)] += (c.before_ffn ? 1.0 : w[j]) * out[i];
    }
    if (c.shared) {
      const std::vector<float> in(xt, xt + d);
      const auto out = ffn(ref_rows(find(b, p + "ffn_gate_shexp.weight"), 0, c.fs), ref_rows(find(b, p + "ffn_up_shexp.weight"), 0, c.fs),
                           ref_rows(find(b, p + "ffn_down_shexp.weight"), 0, d), c.fs, in, nullptr, nullptr, nullptr);
      const double gate = c.shared_gate ? sigmoid(dot(ref_rows(find(b, p + "ffn_gate_inp_shexp.weight"), 0, 1).data(), xt, d)) : 1.0;
      for (int64_t i = 0; i < d; ++i) y[static_cast<size_t>(t * d + i)] += gate * out[i];
    }
  }
  return y;
}

std::vector<ArchCase> arch_cases() {
  std::vector<ArchCase> v;
  ArchCase c;
  c = {}; c.name = "mixtral_q4_0"; c.arch = "llama"; c.norm = true; c.expert_type = kQ4_0; v.push_back(c);
  c = {}; c.name = "qwen2moe_q8_0_shared_gate"; c.arch = "qwen2moe"; c.k = 4; c.shared = true; c.shared_gate = true;
  c.expert_type = kQ8_0; v.push_back(c);
  c = {}; c.name = "qwen3moe_q6_k"; c.arch = "qwen3moe"; c.norm = true; c.expert_type = kQ6_K; c.d = 256; c.f = 256;
  v.push_back(c);
  c = {}; c.name = "deepseek2_v3_style_q4_k"; c.arch = "deepseek2"; c.gating_meta = 2; c.gating = 2; c.norm = true;
  c.norm_meta = true; c.scale = 2.5f; c.groups = 4; c.groups_used = 2; c.probs_bias = true; c.shared = true;
  c.expert_type = kQ4_K; c.d = 256; c.f = 256; c.E = 16; c.k = 4; v.push_back(c);
  c = {}; c.name = "glm4moe_fused_bf16"; c.arch = "glm4moe"; c.gating = 2; c.norm = true; c.norm_meta = true;
  c.probs_bias = true; c.fused = true; c.expert_type = kBF16; c.E = 16; c.k = 4; c.shared = true; v.push_back(c);
  c = {}; c.name = "gpt_oss_mxfp4"; c.arch = "gpt-oss"; c.gating = 3; c.gpt_oss = true; c.expert_type = kMXFP4; c.k = 4;
  v.push_back(c);
  c = {}; c.name = "llama4_f16"; c.arch = "llama4"; c.gating = 2; c.before_ffn = true; c.shared = true; c.k = 1;
  c.expert_type = kF16; v.push_back(c);
  c = {}; c.name = "olmoe_f32_no_norm"; c.arch = "olmoe"; c.k = 3; v.push_back(c);
  return v;
}

class GgufLayer : public testing::TestWithParam<ArchCase> {};

TEST_P(GgufLayer, MatchesLlamaCppSemantics) {
  const ArchCase& c = GetParam();
  std::mt19937 g(static_cast<uint32_t>(std::hash<std::string>{}(c.name)));
  const int64_t layer = 3;
  Built b = build_case(c, layer, g);
  // A second MoE layer, so a file with several is exercised.
  Built other = build_case(c, 5, g);
  b.t.insert(b.t.end(), other.t.begin(), other.t.end());
  const GgufFile file = GgufFile::from_bytes(c.name + ".gguf", gguf_bytes(b.kv, b.t));
  EXPECT_EQ(moekit::gguf_moe_layers(file), (std::vector<int64_t>{3, 5}));
  const moekit::LayerConfig cfg = moekit::gguf_layer_config(file, layer);
  EXPECT_EQ(cfg.origin, "gguf");
  const moekit::TopKLayer l = moekit::load_gguf_layer(file, layer, cfg);
  const int64_t T = 23, d = c.d, k = c.k;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(T * d));
  for (float& v : x) v = nd(g);
  std::vector<int32_t> ref_ids;
  const std::vector<double> want = ref_layer(c, b, layer, x, T, ref_ids);
  double ymax = 0;
  for (double v : want) ymax = std::max(ymax, std::fabs(v));
  ASSERT_GT(ymax, 0.05);
  for (int threads : {1, 2}) {
    std::vector<float> y(x.size());
    moekit::Workspace ws;
    l.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, threads);
    std::vector<int32_t> ids(static_cast<size_t>(T * k));
    std::vector<float> w(static_cast<size_t>(T * k));
    ws.plan.to_topk(k, ids.data(), w.data());
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> a(ids.begin() + t * k, ids.begin() + (t + 1) * k), r(ref_ids.begin() + t * k, ref_ids.begin() + (t + 1) * k);
      std::sort(a.begin(), a.end());
      std::sort(r.begin(), r.end());
      ASSERT_EQ(a, r) << c.name << " token " << t;
    }
    for (size_t i = 0; i < y.size(); ++i)
      ASSERT_NEAR(y[i], want[i], 2e-5 * ymax + 1e-4 * std::fabs(want[i])) << c.name << " at " << i << " threads " << threads;
  }
}

INSTANTIATE_TEST_SUITE_P(Archs, GgufLayer, testing::ValuesIn(arch_cases()),
                         [](const testing::TestParamInfo<ArchCase>& i) { return i.param.name; });

// Q4_0 experts packed as int4 or w4a8 keep their blocks: the bank's weights are the file's
// dequantised values exactly (f16 group scales), where bf16 scales would round them.
TEST(GgufLayer, Q4_0ExpertsKeepTheirBlocksAsInt4) {
  std::mt19937 g(31);
  ArchCase c;
  c.arch = "llama";
  c.norm = true;
  c.expert_type = kQ4_0;
  c.shared = true;
  Built b = build_case(c, 0, g);
  for (auto& t : b.t)  // the shared expert in Q4_0 too
    if (t.name.find("shexp") != std::string::npos) t = gguf_tensor(t.name, kQ4_0, t.ne, g, 0.2f);
  const GgufFile f = GgufFile::from_bytes("q.gguf", gguf_bytes(b.kv, b.t));
  for (auto type : {moekit::kernels::WeightType::int4, moekit::kernels::WeightType::w4a8}) {
    moekit::LayerConfig cfg = moekit::gguf_layer_config(f, 0);
    cfg.pack.type = type;
    const moekit::TopKLayer l = moekit::load_gguf_layer(f, 0, cfg);
    const int64_t d = c.d, ff = c.f;
    std::vector<float> gate(ff * d), up(ff * d), down(d * ff);
    for (int64_t e = 0; e < c.E; ++e) {
      l.experts().get_expert(e, gate.data(), up.data(), down.data());
      const auto wg = ref_rows(find(b, "blk.0.ffn_gate_exps.weight"), e * ff, ff);
      const auto wd = ref_rows(find(b, "blk.0.ffn_down_exps.weight"), e * d, d);
      for (size_t i = 0; i < gate.size(); ++i) ASSERT_EQ(gate[i], static_cast<float>(wg[i])) << "expert " << e;
      for (size_t i = 0; i < down.size(); ++i) ASSERT_EQ(down[i], static_cast<float>(wd[i])) << "expert " << e;
    }
    ASSERT_EQ(l.shared_experts().size(), 1u);
    std::vector<float> sg(c.fs * d), su(c.fs * d), sd(d * c.fs);
    l.shared_experts()[0].ffn.get_expert(0, sg.data(), su.data(), sd.data());
    const auto rs = ref_rows(find(b, "blk.0.ffn_up_shexp.weight"), 0, c.fs);
    for (size_t i = 0; i < su.size(); ++i) ASSERT_EQ(su[i], static_cast<float>(rs[i])) << "shared up " << i;
  }
}

TEST(GgufLayerErrors, NameWhatIsWrong) {
  std::mt19937 g(9);
  ArchCase c;
  c.arch = "qwen2moe";
  Built b = build_case(c, 1, g);
  const GgufFile f = GgufFile::from_bytes("e.gguf", gguf_bytes(b.kv, b.t));
  EXPECT_NE(error_of([&] { (void)moekit::gguf_layer_config(f, 2); }).find("layer 2 has no MoE block"), std::string::npos);
  EXPECT_NE(error_of([&] { (void)moekit::gguf_layer_config(f, 2); }).find("MoE layers: 1"), std::string::npos);
  Built bad_arch = b;
  bad_arch.kv[0] = kv_str("general.architecture", "mamba");
  const GgufFile fa = GgufFile::from_bytes("e.gguf", gguf_bytes(bad_arch.kv, bad_arch.t));
  EXPECT_NE(error_of([&] { (void)moekit::gguf_layer_config(fa, 1); }).find("general.architecture \"mamba\""), std::string::npos);
  Built no_k = b;
  no_k.kv.erase(no_k.kv.begin() + 3);
  const GgufFile fk = GgufFile::from_bytes("e.gguf", gguf_bytes(no_k.kv, no_k.t));
  EXPECT_NE(error_of([&] { (void)moekit::gguf_layer_config(fk, 1); }).find("expert_used_count"), std::string::npos);
  Built wrong = b;
  for (auto& t : wrong.t)
    if (t.name == "blk.1.ffn_down_exps.weight") t.ne = {c.f, c.d, c.E / 2}, t.data.resize(t.data.size() / 2);
  const GgufFile fw = GgufFile::from_bytes("e.gguf", gguf_bytes(wrong.kv, wrong.t));
  const auto cfg = moekit::gguf_layer_config(fw, 1);
  EXPECT_NE(error_of([&] { (void)moekit::load_gguf_layer(fw, 1, cfg); }).find("ffn_down_exps.weight\" has ne [32, 64, 4], expected [32, 64, 8]"),
            std::string::npos);
}

}  // namespace
