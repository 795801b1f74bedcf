// SPDX-License-Identifier: Apache-2.0
// Golden vectors: layers built from the HF-style configs and safetensors under tests/golden/
// (written by tests/golden/make_golden.py, a PyTorch transcription of the HF modules) must
// reproduce the recorded outputs, expert ids and weights.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/io/safetensors.hpp"

namespace {

std::string golden(const std::string& file) { return std::string(MOEKIT_GOLDEN_DIR) + "/" + file; }

nlohmann::json cases() {
  std::ifstream in(golden("cases.json"));
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str());
}

class Golden : public testing::TestWithParam<std::string> {};

TEST(GoldenCases, ListIsNotEmpty) { EXPECT_GE(cases().size(), 6u); }

TEST_P(Golden, MatchesTorchTranscription) {
  nlohmann::json c;
  for (const auto& x : cases())
    if (x["name"] == GetParam()) c = x;
  ASSERT_FALSE(c.is_null());
  const std::string name = GetParam();
  const moekit::LayerConfig cfg = moekit::load_layer_config(golden(name + ".config.json"));
  const auto weights = moekit::io::TensorSource::open(golden(name + ".weights.safetensors"));
  const moekit::TopKLayer layer = moekit::load_layer(cfg, weights, c["prefix"].get<std::string>());
  const auto input = moekit::io::TensorSource::open(golden(name + ".input.safetensors"));
  const auto expected = moekit::io::TensorSource::open(golden(name + ".expected.safetensors"));
  const int64_t d = cfg.hidden(), k = cfg.router.k;
  const int64_t T = input.tensor("hidden_states").shape[0];
  const auto x = input.read_f32("hidden_states", {T, d});
  const auto y_ref = expected.read_f32("hidden_states", {T, d});
  const auto ids_ref = expected.read_i32("topk_ids", {T, k});
  const auto w_ref = expected.read_f32("topk_weights", {T, k});

  for (int threads : {1, 2}) {
    std::vector<float> y(static_cast<size_t>(T * d));
    moekit::Workspace ws;
    layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, threads);
    std::vector<int32_t> ids(static_cast<size_t>(T * k));
    std::vector<float> w(static_cast<size_t>(T * k));
    ws.plan.to_topk(k, ids.data(), w.data());
    // Weights were rounded to the file's dtype before the reference ran, and moekit computes
    // in f32 on the same rounded values: tight tolerances apply to every dtype.
    double ymax = 0, wmax = 0;
    for (float v : y_ref) ymax = std::max(ymax, std::fabs(static_cast<double>(v)));
    for (float v : w_ref) wmax = std::max(wmax, std::fabs(static_cast<double>(v)));
    ASSERT_GT(ymax, 0.0) << "vacuous golden case " << name;
    for (int64_t i = 0; i < T * k; ++i) {
      EXPECT_EQ(ids[i], ids_ref[i]) << name << " token " << i / k << " slot " << i % k;
      EXPECT_NEAR(w[i], w_ref[i], 1e-5 * (std::fabs(w_ref[i]) + wmax)) << name << " slot " << i;
    }
    for (int64_t i = 0; i < T * d; ++i)
      ASSERT_NEAR(y[i], y_ref[i], 1e-4 * std::fabs(y_ref[i]) + 2e-5 * ymax)
          << name << " token " << i / d << " col " << i % d << " threads " << threads;
  }
}

std::vector<std::string> case_names() {
  std::vector<std::string> n;
  for (const auto& x : cases()) n.push_back(x["name"].get<std::string>());
  return n;
}

INSTANTIATE_TEST_SUITE_P(Torch, Golden, testing::ValuesIn(case_names()),
                         [](const testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace
