// SPDX-License-Identifier: Apache-2.0
// RMoE's official checkpoint layout and config (qiuzh20/RMoE llama_moe_rnn, commit 9913a7f):
// two consecutive MoE layers loaded from an HF config.json (model_type llama_moe_rnn) and a
// safetensors file with the official tensor names, the router state passed from the first to
// the second, against a double-precision transcription of llama_moe_modeling.py
// (MixtralSparseMoeBlock with the recurrent router, CustomGRUCell, the decoder layer's
// moe_weight / share_weight mixing and add_moe_bias).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/safetensors.hpp"

namespace {

namespace fs = std::filesystem;

struct Official {
  int64_t d = 24, f = 20, fs = 28, E = 6, k = 2, dr = 8;
  bool gru = true, share = true, bias = true;
  double moe_weight = 0.7, share_weight = 0.4;
  std::map<std::string, std::vector<float>> t;  // official names -> values
  std::map<std::string, std::vector<int64_t>> shape;
};

void add(Official& o, std::mt19937& g, const std::string& name, std::vector<int64_t> shape, float scale) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = nd(g);
  o.t[name] = v;
  o.shape[name] = shape;
}

Official make(std::mt19937& g, bool gru) {
  Official o;
  o.gru = gru;
  const std::string cell = "model.rnn_router.";
  for (const char* kind : {"i", "h"})
    for (const char* gate : gru ? std::vector<const char*>{"r", "z", "n"} : std::vector<const char*>{"n"}) {
      add(o, g, cell + "weight_" + kind + gate, {o.dr, o.dr}, 0.4f);
      add(o, g, cell + "bias_" + kind + gate, {o.dr}, 0.3f);
    }
  for (int layer : {0, 1}) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    add(o, g, p + "block_sparse_moe.weight1", {o.dr, o.d}, 0.3f);
    add(o, g, p + "block_sparse_moe.weight2", {o.E, o.dr}, 1.0f);
    add(o, g, p + "block_sparse_moe.bias", {o.d}, 0.2f);
    for (int64_t e = 0; e < o.E; ++e) {
      const std::string q = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      add(o, g, q + "w1.weight", {o.f, o.d}, 0.25f);
      add(o, g, q + "w3.weight", {o.f, o.d}, 0.25f);
      add(o, g, q + "w2.weight", {o.d, o.f}, 0.25f);
    }
    add(o, g, p + "mlp_share.gate_proj.weight", {o.fs, o.d}, 0.25f);
    add(o, g, p + "mlp_share.up_proj.weight", {o.fs, o.d}, 0.25f);
    add(o, g, p + "mlp_share.down_proj.weight", {o.d, o.fs}, 0.25f);
    add(o, g, p + "self_attn.q_proj.weight", {o.d, o.d}, 0.1f);  // the rest of a checkpoint: ignored
  }
  return o;
}

double sigm(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// W [rows, cols] (row-major) times v.
std::vector<double> mv(const std::vector<float>& W, const std::vector<double>& v, int64_t rows) {
  const int64_t cols = static_cast<int64_t>(v.size());
  std::vector<double> out(static_cast<size_t>(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r] += W[r * cols + c] * v[c];
  return out;
}

std::vector<double> swiglu(const Official& o, const std::string& g, const std::string& u, const std::string& dn, int64_t f,
                           const std::vector<double>& x) {
  const auto a = mv(o.t.at(g), x, f), b = mv(o.t.at(u), x, f);
  std::vector<double> h(static_cast<size_t>(f));
  for (int64_t j = 0; j < f; ++j) h[j] = a[j] * sigm(a[j]) * b[j];
  return mv(o.t.at(dn), h, o.d);
}

// The official decoder layer's MoE part for one token: returns y (without the residual) and
// updates the router state h.
std::vector<double> ref_token(const Official& o, int layer, const std::vector<double>& x, std::vector<double>& h,
                              std::vector<int>& chosen) {
  const std::string p = "model.layers." + std::to_string(layer) + ".", m = p + "block_sparse_moe.",
                    c = "model.rnn_router.";
  const auto xi = mv(o.t.at(m + "weight1"), x, o.dr);
  auto gate = [&](const char* gname) {
    auto a = mv(o.t.at(c + "weight_i" + gname), xi, o.dr);
    return a;
  };
  std::vector<double> hn(static_cast<size_t>(o.dr));
  if (o.gru) {  // CustomGRUCell: torch.nn.GRUCell's equations
    const auto ir = gate("r"), iz = gate("z"), in = gate("n");
    const auto hr = mv(o.t.at(c + "weight_hr"), h, o.dr), hz = mv(o.t.at(c + "weight_hz"), h, o.dr),
               hh = mv(o.t.at(c + "weight_hn"), h, o.dr);
    for (int64_t i = 0; i < o.dr; ++i) {
      const double r = sigm(ir[i] + o.t.at(c + "bias_ir")[i] + hr[i] + o.t.at(c + "bias_hr")[i]);
      const double z = sigm(iz[i] + o.t.at(c + "bias_iz")[i] + hz[i] + o.t.at(c + "bias_hz")[i]);
      const double n = std::tanh(in[i] + o.t.at(c + "bias_in")[i] + r * (hh[i] + o.t.at(c + "bias_hn")[i]));
      hn[i] = (1 - z) * n + z * h[i];
    }
  } else {
    const auto in = gate("n");
    const auto hh = mv(o.t.at(c + "weight_hn"), h, o.dr);
    for (int64_t i = 0; i < o.dr; ++i)
      hn[i] = std::tanh(in[i] + o.t.at(c + "bias_in")[i] + hh[i] + o.t.at(c + "bias_hn")[i]);
  }
  h = hn;
  const auto logits = mv(o.t.at(m + "weight2"), hn, o.E);
  const double mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> prob(logits.size());
  double z = 0;
  for (size_t e = 0; e < prob.size(); ++e) z += prob[e] = std::exp(logits[e] - mx);
  std::vector<int> idx(static_cast<size_t>(o.E));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return prob[a] > prob[b]; });
  chosen.assign(idx.begin(), idx.begin() + o.k);
  double s = 0;
  for (int e : chosen) s += prob[e] / z;
  std::vector<double> y(static_cast<size_t>(o.d), 0.0);
  for (int e : chosen) {
    const std::string q = m + "experts." + std::to_string(e) + ".";
    const auto out = swiglu(o, q + "w1.weight", q + "w3.weight", q + "w2.weight", o.f, x);
    for (int64_t i = 0; i < o.d; ++i) y[i] += prob[e] / z / s * out[i];
  }
  if (o.bias)
    for (int64_t i = 0; i < o.d; ++i) y[i] += o.t.at(m + "bias")[i];
  if (o.share) {
    const auto sh = swiglu(o, p + "mlp_share.gate_proj.weight", p + "mlp_share.up_proj.weight",
                           p + "mlp_share.down_proj.weight", o.fs, x);
    for (int64_t i = 0; i < o.d; ++i) y[i] = o.moe_weight * y[i] + o.share_weight * sh[i];
  }
  return y;
}

TEST(RMoE, OfficialLayoutAndConfigMatchTheTranscription) {
  for (bool gru : {true, false}) {
    std::mt19937 g(gru ? 11 : 12);
    const Official o = make(g, gru);
    const fs::path dir = fs::path(testing::TempDir()) / (gru ? "moekit_rmoe_gru" : "moekit_rmoe_rnn");
    fs::create_directories(dir);
    std::vector<moekit::io::OutTensor> out;
    for (const auto& [name, v] : o.t) out.push_back({name, moekit::io::DType::F32, o.shape.at(name), v.data()});
    moekit::io::write_safetensors((dir / "model.safetensors").string(), out);
    const std::string config = R"({"architectures": ["LlamaMoERNNForCausalLM"], "model_type": "llama_moe_rnn",
      "hidden_size": 24, "intermediate_size": 64, "moe_expert_intermediate_size": 20, "num_local_experts": 6,
      "num_experts_per_tok": 2, "moe_router_type": ")" + std::string(gru ? "gru" : "rnn") +
                               R"(", "moe_router_rnn_hidden_size": 8, "add_moe_share_expert": true,
      "moe_share_expert_intermediate_size": 28, "moe_weight": 0.7, "share_weight": 0.4, "add_moe_bias": true,
      "moe_num_layers": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "hidden_act": "silu"})";
    const moekit::LayerConfig cfg = moekit::parse_layer_config(config, "config.json");
    EXPECT_EQ(cfg.router_type, "gru");
    const auto src = moekit::io::TensorSource::open((dir / "model.safetensors").string());
    const int64_t T = 9, d = o.d;
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> x(static_cast<size_t>(T * d));
    for (float& v : x) v = nd(g);
    std::vector<float> state;  // the first layer starts from zeros
    std::vector<std::vector<double>> h(static_cast<size_t>(T), std::vector<double>(static_cast<size_t>(o.dr), 0.0));
    for (int layer : {0, 1}) {
      auto l = moekit::load_any_layer(cfg, src, "model.layers." + std::to_string(layer) + ".block_sparse_moe.");
      moekit::Batch b = moekit::Batch::single(T, d);
      b.router_state = state;
      std::vector<float> y(x.size());
      l->forward(b, x.data(), y.data(), 2);
      std::vector<float> next;
      for (const auto& t : l->outputs())
        if (t.name == "router_state") next.assign(reinterpret_cast<const float*>(t.bytes.data()),
                                                  reinterpret_cast<const float*>(t.bytes.data()) + t.bytes.size() / 4);
      ASSERT_EQ(next.size(), static_cast<size_t>(T * o.dr));
      double ymax = 0;
      std::vector<std::vector<double>> want(static_cast<size_t>(T));
      for (int64_t t = 0; t < T; ++t) {
        std::vector<int> chosen;
        want[t] = ref_token(o, layer, std::vector<double>(x.begin() + t * d, x.begin() + (t + 1) * d), h[t], chosen);
        for (double v : want[t]) ymax = std::max(ymax, std::fabs(v));
        for (int64_t i = 0; i < o.dr; ++i) ASSERT_NEAR(next[t * o.dr + i], h[t][i], 2e-5) << "state, layer " << layer;
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < d; ++i)
          ASSERT_NEAR(y[t * d + i], want[t][i], 1e-4 * ymax) << (gru ? "gru" : "rnn") << " layer " << layer << " token " << t;
      state = next;
      x = y;  // any input for the next layer will do
    }
    fs::remove_all(dir);
  }
}

TEST(RMoE, ConfigErrorsAndThePlainGate) {
  auto err = [](const std::string& j) {
    try {
      (void)moekit::parse_layer_config(j, "c.json");
    } catch (const moekit::error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(err(R"({"model_type": "llama_moe_rnn", "moe_router_type": "lstm", "add_moe_bias": true})").find("add_moe_bias"), std::string::npos);
  EXPECT_NE(err(R"({"model_type": "llama_moe_rnn", "num_experts_per_tok": 9})").find("k expected in [1, E = 8]"), std::string::npos);
  EXPECT_NE(err(R"({"model_type": "llama_moe_rnn", "add_moe_share_expert": true, "moe_weight": 0})").find("moe_weight"),
            std::string::npos);
  // Another moe_router_type is the plain gate: Mixtral's routing on block_sparse_moe.gate.weight.
  const auto c = moekit::parse_layer_config(R"({"model_type": "llama_moe_rnn", "moe_router_type": "linear"})", "c.json");
  EXPECT_EQ(c.router_type, "topk");
  EXPECT_TRUE(c.router.norm_topk_prob);
  EXPECT_EQ(c.expert_names, moekit::ExpertNames::mixtral);
}

}  // namespace
