// SPDX-License-Identifier: Apache-2.0
// Pre-packed layer files (moekit/io/packed_layer.hpp, `moekit pack`): a layer saved and mapped
// again computes what the original computes, bit for bit, for every weight type, with shared
// experts, selection and logit biases and expert biases; the mapped experts are not copied;
// PackedMatrix::view checks every size and layout; bad files are refused with a message.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <algorithm>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/io/packed_layer.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/kernels/gemm.hpp"

namespace {

namespace fs = std::filesystem;
using moekit::kernels::WeightType;

class PackedLayer : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(testing::TempDir()) /
           ("moekit_packed_" + std::string(testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Forward of both layers on the same random batch (with padding), compared bit for bit.
  static void expect_same(const moekit::TopKLayer& a, const moekit::TopKLayer& b, int64_t T, const std::string& what) {
    const int64_t d = a.hidden_size();
    std::mt19937 g(3);
    std::normal_distribution<float> n(0.0f, 1.0f);
    std::vector<float> x(static_cast<size_t>(T * d)), ya(x.size()), yb(x.size());
    for (float& v : x) v = n(g);
    std::vector<uint8_t> pad(static_cast<size_t>(T), 0);
    if (T > 2) pad[1] = 1;
    moekit::Batch batch = moekit::Batch::single(T, d);
    batch.padding = pad;
    moekit::Workspace wa, wb;
    a.forward(batch, x.data(), ya.data(), wa, 2);
    b.forward(batch, x.data(), yb.data(), wb, 2);
    ASSERT_EQ(std::memcmp(ya.data(), yb.data(), ya.size() * sizeof(float)), 0) << what;
    ASSERT_EQ(wa.plan.num_slots(), wb.plan.num_slots()) << what;
    for (int64_t s = 0; s < wa.plan.num_slots(); ++s)
      ASSERT_EQ(wa.plan.slot_expert()[s], wb.plan.slot_expert()[s]) << what << ": slot " << s;
  }

  // A random layer of the config `text` stored as `type`, and the path to save it at.
  static moekit::TopKLayer random(const std::string& text, WeightType type) {
    moekit::LayerConfig cfg = moekit::parse_layer_config(text);
    cfg.pack.type = type;
    return moekit::random_layer(cfg, 5);
  }

  fs::path dir_;
};

struct Case {
  std::string config;  // JSON text
  WeightType type;
  bool bf16_act;
};

TEST_F(PackedLayer, SavedAndMappedEqualsTheOriginalForEveryFormat) {
  const std::string qwen =
      R"({"moekit_config_version": 1, "preset": "qwen2_moe", "hidden_size": 64,
          "router": {"num_experts": 6, "k": 2},
          "experts": {"type": "swiglu", "intermediate_size": 40},
          "shared_expert": {"intermediate_size": 48, "gated": true}})";
  const std::string deepseek =
      R"({"model_type": "deepseek_v3", "hidden_size": 96, "moe_intermediate_size": 64, "n_routed_experts": 8,
          "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
          "norm_topk_prob": true, "scoring_func": "sigmoid", "topk_method": "noaux_tc"})";
  const std::string gpt_oss =
      R"({"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64, "num_local_experts": 4,
          "num_experts_per_tok": 2})";
  std::vector<Case> cases;
  for (WeightType t : moekit::kernels::kWeightTypes) cases.push_back({qwen, t, false});
  cases.push_back({qwen, WeightType::bf16, true});
  cases.push_back({deepseek, WeightType::int4, false});
  cases.push_back({deepseek, WeightType::w8a8, false});
  cases.push_back({gpt_oss, WeightType::f32, false});
  cases.push_back({gpt_oss, WeightType::fp8, false});
  for (const Case& c : cases) {
    moekit::LayerConfig cfg = moekit::parse_layer_config(c.config);
    cfg.pack.type = c.type;
    cfg.pack.bf16_activations = c.bf16_act;
    const std::string what = cfg.preset + " " + moekit::kernels::to_string(c.type) + (c.bf16_act ? " x bf16" : "");
    const moekit::TopKLayer original = moekit::random_layer(cfg, 11);
    const std::string path = (dir_ / "layer.safetensors").string();
    moekit::save_packed_layer(path, original, c.config);
    moekit::LayerConfig loaded_cfg;
    const moekit::TopKLayer loaded = moekit::load_packed_layer(path, &loaded_cfg);
    EXPECT_EQ(loaded_cfg.pack.type, c.type) << what;
    EXPECT_EQ(loaded.experts().num_experts(), original.experts().num_experts());
    EXPECT_EQ(loaded.shared_experts().size(), original.shared_experts().size()) << what;
    for (int64_t e = 0; e < loaded.experts().num_experts(); ++e) {
      EXPECT_FALSE(loaded.experts().in_matrix(e).owns_data()) << what << ": expert " << e << " copied";
      EXPECT_FALSE(loaded.experts().down_matrix(e).owns_data()) << what;
      EXPECT_EQ(reinterpret_cast<uintptr_t>(loaded.experts().in_matrix(e).packed_data().data()) % 64, 0u);
    }
    EXPECT_EQ(loaded.router().bias(), original.router().bias()) << what;
    EXPECT_EQ(loaded.router().logit_bias(), original.router().logit_bias()) << what;
    EXPECT_EQ(loaded.experts().biases(), original.experts().biases()) << what;
    for (int64_t T : {1, 7, 130}) expect_same(original, loaded, T, what + ", T = " + std::to_string(T));
    // The layer keeps the mapping alive: the file may be unlinked (and its name reused).
    fs::remove(path);
    expect_same(original, loaded, 5, what + " after the file was removed");
  }
}

// The CLI's layer over a packed file (load_any_layer_packed) equals the one from the checkpoint.
TEST_F(PackedLayer, AnyLayerOverThePackedFile) {
  const std::string text = R"({"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 24,
                               "num_local_experts": 4, "num_experts_per_tok": 2})";
  const moekit::TopKLayer original = random(text, WeightType::bf16);
  const std::string path = (dir_ / "m.safetensors").string();
  moekit::save_packed_layer(path, original, text);
  auto any = moekit::load_any_layer_packed(path);
  EXPECT_EQ(any->config().pack.type, WeightType::bf16);
  EXPECT_EQ(any->config().router.num_experts, 4);
  std::vector<float> x(3 * 32, 0.25f), y1(x.size()), y2(x.size());
  any->forward(moekit::Batch::single(3, 32), x.data(), y1.data(), 1);
  moekit::Workspace ws;
  original.forward(moekit::Batch::single(3, 32), x.data(), y2.data(), ws, 1);
  EXPECT_EQ(y1, y2);
  const auto outs = any->outputs();
  ASSERT_EQ(outs.size(), 2u);
  EXPECT_EQ(outs[0].name, "topk_ids");
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    return;
  }
  ADD_FAILURE() << "expected moekit::error with \"" << needle << "\"";
}

// A copy of the packed file `src` with its metadata edited by `edit` (tensors unchanged).
void rewrite(const std::string& src, const std::string& dst,
             const std::function<void(std::map<std::string, std::string>&)>& edit,
             const std::function<void(std::string, std::vector<uint8_t>&)>& edit_data = {}) {
  const auto file = moekit::io::SafetensorsFile::open(src);
  std::map<std::string, std::string> meta = file.metadata();
  edit(meta);
  std::vector<std::vector<uint8_t>> store;
  std::vector<moekit::io::OutTensor> out;
  // Packed values first (their sizes are multiples of 64, keeping the alignment), then the rest.
  std::vector<std::string> names = file.names();
  std::stable_partition(names.begin(), names.end(), [&](const std::string& n) {
    return file.tensor(n).dtype == moekit::io::DType::U8;
  });
  store.reserve(names.size());
  for (const std::string& n : names) {
    const auto& t = file.tensor(n);
    store.emplace_back(reinterpret_cast<const uint8_t*>(t.data), reinterpret_cast<const uint8_t*>(t.data) + t.nbytes);
    if (edit_data) edit_data(n, store.back());
    out.push_back({n, t.dtype, t.shape, store.back().data()});
  }
  moekit::io::write_safetensors(dst, out, meta);
}

TEST_F(PackedLayer, BadFilesAreRefused) {
  const std::string text = R"({"model_type": "qwen3_moe", "hidden_size": 32, "moe_intermediate_size": 24,
                               "num_experts": 4, "num_experts_per_tok": 2})";
  const moekit::TopKLayer original = random(text, WeightType::int8);
  const std::string good = (dir_ / "good.safetensors").string(), bad = (dir_ / "bad.safetensors").string();
  moekit::save_packed_layer(good, original, text);
  ASSERT_NO_THROW((void)moekit::load_packed_layer(good));
  // A checkpoint that is not a packed file.
  rewrite(good, bad, [](auto& m) { m.clear(); });
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "not a file `moekit pack` wrote");
  rewrite(good, bad, [](auto& m) { m["moekit.packed"] = "3"; });
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "format version \"3\"");
  auto edit_layout = [&](const std::function<void(nlohmann::json&)>& f) {
    rewrite(good, bad, [&](auto& m) {
      nlohmann::json L = nlohmann::json::parse(m["moekit.layouts"]);
      f(L["experts.1.in"]);
      m["moekit.layouts"] = L.dump();
    });
  };
  edit_layout([](nlohmann::json& j) { j["kernel"] = "avx1024"; });
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "packed for kernel \"avx1024\", which this build does not have");
  edit_layout([](nlohmann::json& j) { j["n"] = 25; });  // the same bytes, another shape
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "expert 1 matrices expected [24, 32] gated");
  edit_layout([](nlohmann::json& j) { j["k"] = 64; });
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "bytes, got");
  edit_layout([](nlohmann::json& j) { j["type"] = "int4"; });
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "experts.1.in");
  edit_layout([](nlohmann::json& j) { j.erase("gated"); });
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "malformed layout");
  rewrite(good, bad, [](auto& m) {
    nlohmann::json L = nlohmann::json::parse(m["moekit.layouts"]);
    L.erase("experts.3.down");
    m["moekit.layouts"] = L.dump();
  });
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "no layout for tensor \"experts.3.down\"");
  // A NaN scale.
  rewrite(good, bad, [](auto&) {}, [](const std::string& n, std::vector<uint8_t>& b) {
    if (n == "experts.2.in_scales") {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      std::memcpy(b.data() + 4, &nan, 4);
    }
  });
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "scale 1 expected finite");
  // A config that disagrees with the tensors.
  rewrite(good, bad, [](auto& m) {
    m["moekit.config"] = R"({"model_type": "qwen3_moe", "hidden_size": 32, "moe_intermediate_size": 24,
                             "num_experts": 5, "num_experts_per_tok": 2})";
  });
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "experts.4.in");
  rewrite(good, bad, [](auto& m) { m["moekit.config"] = R"({"model_type": "nope"})"; });
  expect_error([&] { (void)moekit::load_packed_layer(bad); }, "moekit.config");
  // Non-top-k and noisy layers cannot be saved.
  moekit::TopKOptions noisy{.num_experts = 2, .k = 1, .hidden = 4};
  noisy.noise = moekit::TrainingNoise::noisy_topk;
  moekit::TopKLayer n(moekit::TopKRouter(noisy, std::vector<float>(8, 0.1f), {}, std::vector<float>(8, 0.1f)),
                      moekit::FfnBank(2, {.hidden = 4, .intermediate = 4}));
  expect_error([&] { moekit::save_packed_layer(bad, n, "{}"); }, "noisy top-k");
}

// PackedMatrix::view on its own: the bytes of a packed matrix give the same GEMM; wrong sizes,
// misalignment and unknown kernels are refused.
TEST(PackedMatrixView, ViewsComputeWhatThePackedMatrixComputes) {
  std::mt19937 g(9);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const int64_t rows = 5, N = 37, K = 70;
  std::vector<float> W(static_cast<size_t>(N * K)), A(static_cast<size_t>(rows * K));
  for (float& v : W) v = n(g);
  for (float& v : A) v = n(g);
  for (WeightType t : moekit::kernels::kWeightTypes) {
    moekit::kernels::PackedMatrix P;
    P.pack(W.data(), N, K, K, {.type = t});
    const auto keep = std::make_shared<int>(0);
    const moekit::kernels::PackedMatrix V = moekit::kernels::PackedMatrix::view(
        P.layout(), P.packed_data().data(), P.packed_data().size(), P.packed_scales().data(), P.packed_scales().size(), keep);
    EXPECT_FALSE(V.owns_data());
    EXPECT_TRUE(P.owns_data());
    EXPECT_EQ(V.bytes(), P.bytes());
    std::vector<float> c1(static_cast<size_t>(rows * N)), c2(c1.size()),
        scratch(moekit::kernels::packed_a_floats(rows, K));
    moekit::kernels::gemm_packed(rows, A.data(), K, P, c1.data(), N, scratch.data());
    moekit::kernels::gemm_packed(rows, A.data(), K, V, c2.data(), N, scratch.data());
    EXPECT_EQ(c1, c2) << moekit::kernels::to_string(t);
    auto L = P.layout();
    expect_error([&] { (void)moekit::kernels::PackedMatrix::view(L, P.packed_data().data(), P.packed_data().size() - 64,
                                                                  P.packed_scales().data(), P.packed_scales().size(), keep); },
                 "bytes, got");
    expect_error([&] { (void)moekit::kernels::PackedMatrix::view(L, P.packed_data().data() + 1, P.packed_data().size(),
                                                                  P.packed_scales().data(), P.packed_scales().size(), keep); },
                 "64-byte aligned");
    expect_error([&] { (void)moekit::kernels::PackedMatrix::view(L, P.packed_data().data(), P.packed_data().size(),
                                                                  P.packed_scales().data(), P.packed_scales().size() + 1, keep); },
                 "scales, got");
    L.n = 0;
    expect_error([&] { (void)moekit::kernels::PackedMatrix::view(L, P.packed_data().data(), P.packed_data().size(),
                                                                  P.packed_scales().data(), P.packed_scales().size(), keep); },
                 "shape expected in [1, 2^31]");
  }
}

}  // namespace
