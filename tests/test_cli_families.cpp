// SPDX-License-Identifier: Apache-2.0
// `moekit run` for every router family of moekit's own config format: the CLI reads the
// family's tensors (ROUTING.md section 8), writes its output tensors with the contract's
// names, dtypes and shapes, and its hidden_states equal the in-process AnyLayer's.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/io/safetensors.hpp"

#ifdef MOEKIT_CLI_PATH
namespace {

namespace fs = std::filesystem;
using moekit::io::DType;

struct Family {
  std::string name;
  std::string router;                                    // the "router" object
  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors;  // besides the experts
  int64_t experts;                                       // routed FFN experts experts.{i}
  bool uncond = false, shared = false;                   // ProMoE's extra experts
  std::vector<std::pair<std::string, std::vector<int64_t>>> outputs;  // besides hidden_states
  std::string type = "";                                 // router type when not the name
  std::string experts_section = "";  // the "experts" object when not swiglu (then sizes kept)
  float poison = 1e30f;              // an input value that overflows inside the layer
  // The experts object: `fallback` (swiglu of the test's size) unless the family has its own.
  [[nodiscard]] std::string experts_json(const std::string& fallback) const {
    return experts_section.empty() ? fallback : experts_section;
  }
  [[nodiscard]] const std::string& router_type() const { return type.empty() ? name : type; }
};

constexpr int64_t T = 11, d = 16, f = 12, E = 4, k = 2, dr = 8;

std::vector<Family> families() {
  return {
      {"gru", R"({"type": "gru", "num_experts": 4, "k": 2, "d_r": 8})",
       {{"router.proj.weight", {dr, d}}, {"router.out.weight", {E, dr}}, {"router.gru.weight_ih", {3 * dr, dr}},
        {"router.gru.weight_hh", {3 * dr, dr}}, {"router.gru.bias_ih", {3 * dr}}, {"router.gru.bias_hh", {3 * dr}}},
       E, false, false, {{"topk_ids", {T, k}}, {"topk_weights", {T, k}}, {"router_state", {T, dr}}}},
      {"sinkhorn", R"({"type": "sinkhorn", "num_experts": 4, "k": 2, "weight_mode": "transport"})", {{"gate.weight", {E, d}}},
       E, false, false, {{"topk_ids", {T, k}}, {"topk_weights", {T, k}}, {"sinkhorn_iterations", {1}}, {"sinkhorn_error", {1}}}},
      {"selective_sinkhorn", R"({"type": "selective_sinkhorn", "num_experts": 4, "k": 2, "training": true, "p": 1.0})",
       {{"gate.weight", {E, d}}}, E, false, false,
       {{"topk_ids", {T, k}}, {"topk_weights", {T, k}}, {"sinkhorn_iterations", {1}}, {"sinkhorn_error", {1}}}},
      {"expert_choice", R"({"type": "expert_choice", "num_experts": 4, "capacity_factor": 2})", {{"gate.weight", {E, d}}}, E,
       false, false, {{"expert_token_ids", {E, 5}}, {"expert_token_weights", {E, 5}}}},
      {"mod", R"({"type": "mod", "ratio": 0.5, "activation": "sigmoid"})", {{"router.weight", {1, d}}}, 1, false, false,
       {{"selected", {T}}, {"router_weights", {T}}}},
      {"mod_mlp", R"({"type": "mod", "mode": "aux_predictor", "aux_hidden": 5})",
       {{"router.weight", {1, d}}, {"router.aux.0.weight", {5, d}}, {"router.aux.0.bias", {5}}, {"router.aux.2.weight", {1, 5}},
        {"router.aux.2.bias", {1}}},
       1, false, false, {{"selected", {T}}, {"router_weights", {T}}}, "mod"},
      {"sinkhorn_megatron", R"({"type": "sinkhorn", "num_experts": 4, "k": 2, "mode": "megatron"})", {{"gate.weight", {E, d}}},
       E, false, false, {{"topk_ids", {T, k}}, {"topk_weights", {T, k}}, {"sinkhorn_iterations", {1}}, {"sinkhorn_error", {1}}},
       "sinkhorn"},
      {"gamma_mod", R"({"type": "gamma_mod", "ratio": 0.25})", {{"router.weight", {2, d}}}, 1, false, false,
       {{"selected", {T}}, {"router_weights", {T}}}},
      {"gamma_mod_norm", R"({"type": "gamma_mod", "phase": "prefill", "prefill_threshold": 0.3, "input_norm": true, "rms_norm_eps": 1e-5})",
       {{"router.weight", {2, d}}, {"input_layernorm.weight", {d}}}, 1, false, false,
       {{"selected", {T}}, {"router_weights", {T}}}, "gamma_mod"},
      {"token_prune_features", R"({"type": "token_prune", "input": "features", "feature_hidden": 8, "tau": 0.4})",
       {{"router.mlp.0.weight", {8, 4}}, {"router.mlp.0.bias", {8}}, {"router.mlp.2.weight", {1, 8}}, {"router.mlp.2.bias", {1}}},
       1, false, false, {{"selected", {T}}, {"router_weights", {T}}}, "token_prune"},
      {"token_prune", R"({"type": "token_prune", "sparsity": 0.5})", {{"router.weight", {1, d}}}, 1, false, false,
       {{"selected", {T}}, {"router_weights", {T}}}},
      {"drllm", R"({"type": "drllm", "bottleneck": 6})",
       {{"router.0.weight", {6, d}}, {"router.0.bias", {6}}, {"router.2.weight", {3, 6}}, {"router.2.bias", {3}}}, 1, false,
       false, {{"selected", {T}}, {"router_weights", {T}}, {"repeats", {2}}}},
      {"mor", R"({"type": "mor", "num_recursions": 2})", {{"router.steps.0.weight", {1, d}}, {"router.steps.1.weight", {1, d}}},
       1, false, false, {{"selected", {T}}, {"depth", {T}}, {"router_weights", {T}}}},
      {"prototype", R"({"type": "prototype", "num_experts": 4, "k": 2})", {{"router.prototypes", {E, d}}}, E, true, true,
       {{"topk_ids", {T, k}}, {"topk_weights", {T, k}}}},
      {"centroid", R"({"type": "centroid", "num_experts": 4})", {{"router.centroids", {E, d}}}, E, false, false,
       {{"topk_ids", {T, 1}}, {"topk_weights", {T, 1}}}},
      {"dynamic_k", R"({"type": "dynamic_k", "num_experts": 4, "top_p": 0.6, "k_max": 3})", {{"gate.weight", {E, d}}}, E,
       false, false, {{"topk_ids", {T, 3}}, {"topk_weights", {T, 3}}, {"num_selected", {T}}}},
      {"dynamic_k_tsallis",
       R"({"type": "dynamic_k", "num_experts": 4, "mode": "tsallis", "entropy_threshold": 0.8, "schedule": "pyramid", "num_layers": 5, "layer_index": 1})",
       {{"gate.weight", {E, d}}}, E, false, false, {{"topk_ids", {T, E}}, {"topk_weights", {T, E}}, {"num_selected", {T}}},
       "dynamic_k"},
      {"product_key", R"({"type": "product_key", "num_experts": 4, "k": 2, "split_query": true})",
       {{"router.keys_x", {2, d / 2}}, {"router.keys_y", {2, d / 2}}, {"experts.down_embed", {E, d}},
        {"experts.up_embed", {E, d}}},
       0, false, false, {{"topk_ids", {T, k}}, {"topk_weights", {T, k}}}, "", R"({"type": "gelu", "intermediate_size": 1})",
       1e38f},  // 1e30 stays finite through one-neuron experts: 1e38 overflows the key scores
      {"modality",
       R"({"type": "modality", "groups": [{"token_types": [0], "num_experts": 2, "k": 2}, {"token_types": [1], "num_experts": 2, "k": 1}]})",
       {{"router.groups.0.weight", {2, d}}, {"router.groups.1.weight", {2, d}}}, E, false, false,
       {{"topk_ids", {T, k}}, {"topk_weights", {T, k}}, {"token_group", {T}}}},
  };
}

// ctest runs tests in parallel processes: each family gets its own stderr file.
int run(const std::string& args, const fs::path& dir, std::string* err, std::string* out = nullptr) {
  const std::string e = (dir / "stderr.txt").string(), o = (dir / "stdout.txt").string();
  const int status = std::system((std::string(MOEKIT_CLI_PATH) + " " + args + " >" + o + " 2>" + e).c_str());
  std::ifstream in(e);
  err->assign(std::istreambuf_iterator<char>(in), {});
  if (out != nullptr) {
    std::ifstream oin(o);
    out->assign(std::istreambuf_iterator<char>(oin), {});
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

class CliFamilies : public testing::TestWithParam<Family> {};

TEST_P(CliFamilies, RunWritesTheContractTensors) {
  const Family& fam = GetParam();
  const fs::path dir = fs::path(testing::TempDir()) / ("moekit_fam_" + fam.name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string prefix = "model.layers.2.mlp.";
  std::ofstream(dir / "c.json") << R"({"moekit_config_version": 1, "hidden_size": 16, "router": )" << fam.router
                                << R"(, "experts": )" << fam.experts_json(R"({"type": "swiglu", "intermediate_size": 12})") << "}";
  std::mt19937 g(5);
  std::normal_distribution<float> n(0.0f, 0.4f);
  std::vector<std::vector<float>> keep;
  keep.reserve(200);
  std::vector<moekit::io::OutTensor> w;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t c = 1;
    for (int64_t s : shape) c *= s;
    keep.emplace_back(static_cast<size_t>(c));
    for (float& v : keep.back()) v = n(g);
    w.push_back({prefix + name, DType::F32, shape, keep.back().data()});
  };
  for (const auto& [name, shape] : fam.tensors) add(name, shape);
  auto add_ffn = [&](const std::string& base) {
    add(base + "gate_proj.weight", {f, d});
    add(base + "up_proj.weight", {f, d});
    add(base + "down_proj.weight", {d, f});
  };
  for (int64_t e = 0; e < fam.experts; ++e) add_ffn("experts." + std::to_string(e) + ".");
  if (fam.uncond) add_ffn("uncond_expert.");
  if (fam.shared) add_ffn("shared_expert.");
  moekit::io::write_safetensors((dir / "w.safetensors").string(), w);

  std::vector<float> x(T * d), state(T * dr, 0.1f), scores(T);
  for (int64_t t = 0; t < T; ++t) scores[t] = static_cast<float>((t * 7) % 5) * 0.2f;  // FTP's attention scores
  for (float& v : x) v = n(g) * 2.5f;
  std::vector<int32_t> offsets = {0, 6, T}, types(T, 0);
  types[3] = types[8] = 1;  // ProMoE: unconditional; gamma-MoD: must keep
  std::vector<moekit::io::OutTensor> in = {{"hidden_states", DType::F32, {T, d}, x.data()},
                                           {"sequence_offsets", DType::I32, {3}, offsets.data()},
                                           {"token_types", DType::I32, {T}, types.data()},
                                           {"token_scores", DType::F32, {T}, scores.data()}};
  if (fam.name == "gru") in.push_back({"router_state", DType::F32, {T, dr}, state.data()});
  moekit::io::write_safetensors((dir / "x.safetensors").string(), in);

  std::string err;
  const std::string args = "run --config " + (dir / "c.json").string() + " --weights " + (dir / "w.safetensors").string() +
                           " --input " + (dir / "x.safetensors").string() + " --output " + (dir / "y.safetensors").string() +
                           " --prefix " + prefix + " --threads 2";
  ASSERT_EQ(run(args, dir, &err), 0) << fam.name << ": " << err;
  const auto y = moekit::io::TensorSource::open((dir / "y.safetensors").string());
  const auto out = y.read_f32("hidden_states", {T, d});
  for (const auto& [name, shape] : fam.outputs) {
    ASSERT_TRUE(y.contains(name)) << fam.name << " lacks " << name;
    EXPECT_EQ(y.tensor(name).shape, shape) << fam.name << " " << name;
  }

  // Same result in-process, through the public AnyLayer.
  const auto cfg = moekit::load_layer_config((dir / "c.json").string());
  EXPECT_EQ(cfg.router_type, fam.router_type());
  const auto src = moekit::io::TensorSource::open((dir / "w.safetensors").string());
  auto layer = moekit::load_any_layer(cfg, src, prefix);
  moekit::Batch b = moekit::Batch::single(T, d);
  b.sequence_offsets = offsets;
  b.token_types = types;
  b.token_scores = scores;
  if (fam.name == "gru") b.router_state = state;
  std::vector<float> ref(T * d);
  layer->forward(b, x.data(), ref.data(), 1);
  double mx = 0;
  for (float v : ref) mx = std::max(mx, static_cast<double>(std::fabs(v)));
  EXPECT_GT(mx, 0.0) << fam.name << ": all-zero output";
  for (int64_t i = 0; i < T * d; ++i) ASSERT_NEAR(out[i], ref[i], 1e-5 * (1 + mx)) << fam.name << " at " << i;
  EXPECT_GT(layer->executed_flops(), 0.0);

  // A finite input that overflows inside the layer (1e30): exit 2 naming the non-finite value
  // or the overflow (a router may see it first), nothing written (never an output file of NaN / Inf with exit 0).
  for (float& v : x) v = v >= 0 ? fam.poison : -fam.poison;
  moekit::io::write_safetensors((dir / "x.safetensors").string(), in);
  fs::remove(dir / "y.safetensors");
  EXPECT_EQ(run(args, dir, &err), 2) << fam.name;
  EXPECT_TRUE(err.find("although the input is finite") != std::string::npos ||
              err.find("not finite") != std::string::npos || err.find("overflow") != std::string::npos)
      << fam.name << ": " << err;
  EXPECT_FALSE(fs::exists(dir / "y.safetensors")) << fam.name;

  // A misspelled router key is an error naming it (exit 2, nothing written).
  std::ofstream(dir / "c.json") << R"({"moekit_config_version": 1, "hidden_size": 16, "router": )"
                                << fam.router.substr(0, fam.router.size() - 1) << R"(, "bogus_key": 1})"
                                << R"(, "experts": )" << fam.experts_json(R"({"type": "swiglu", "intermediate_size": 12})") << "}";
  fs::remove(dir / "y.safetensors");
  EXPECT_EQ(run(args, dir, &err), 2) << fam.name;
  EXPECT_NE(err.find("bogus_key"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(dir / "y.safetensors"));
  fs::remove_all(dir);
}

// The weight estimate `bench` checks before building (layer_weight_bytes) is what the built
// layer holds, for every family (f32, sizes that fill whole strips: no padding), and a
// family with absurd sizes is refused before anything is allocated.
TEST_P(CliFamilies, WeightEstimateMatchesTheBuiltLayer) {
  const Family& fam = GetParam();
  const fs::path dir = fs::path(testing::TempDir()) / ("moekit_est_" + fam.name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "c.json") << R"({"moekit_config_version": 1, "hidden_size": 64, "router": )" << fam.router
                                << R"(, "experts": )" << fam.experts_json(R"({"type": "swiglu", "intermediate_size": 96})") << "}";
  const auto cfg = moekit::load_layer_config((dir / "c.json").string());
  const double estimate = moekit::layer_weight_bytes(cfg);
  const auto layer = moekit::random_any_layer(cfg, 3);
  EXPECT_NEAR(estimate, layer->resident_bytes(), 1e-9 * estimate) << fam.name;

  // The bench record names the kernel the experts run on: the row kernels for product_key's
  // one-neuron experts, the f32 GEMM (`moekit info`'s gemm_kernel) for every other family.
  std::string err, out, info;
  ASSERT_EQ(run("bench --config " + (dir / "c.json").string() + " --tokens 1 --repeat 1 --layers 1", dir, &err, &out), 0)
      << fam.name << ": " << err;
  ASSERT_EQ(run("info", dir, &err, &info), 0) << err;
  const auto rec = nlohmann::json::parse(out), inf = nlohmann::json::parse(info);
  EXPECT_EQ(rec.at("kernel"), fam.router_type() == "product_key"
                                  ? nlohmann::json("rows-" + inf.at("row_kernels").get<std::string>())
                                  : inf.at("gemm_kernel"))
      << fam.name;

  // 2^30 experts (or a 2^30-wide router; one-block families: a 2^26 x 4096 block, under the
  // config's 2^40-weight bound): refused by bench from the estimate, exit 2.
  std::string router = fam.router;
  const std::string big = "1073741824";
  for (const char* key : {"\"num_experts\": 4", "\"d_r\": 8", "\"bottleneck\": 6"}) {
    const size_t at = router.find(key);
    if (at != std::string::npos) router.replace(at, std::string(key).size(), std::string(key).substr(0, std::string(key).find(':') + 2) + big);
  }
  if (router == fam.router) {  // one-block families: a huge block instead
    std::ofstream(dir / "c.json") << R"({"moekit_config_version": 1, "hidden_size": 67108864, "router": )" << router
                                  << R"(, "experts": )" << fam.experts_json(R"({"type": "swiglu", "intermediate_size": 4096})") << "}";
  } else {
    std::ofstream(dir / "c.json") << R"({"moekit_config_version": 1, "hidden_size": 1024, "router": )" << router
                                  << R"(, "experts": )" << fam.experts_json(R"({"type": "swiglu", "intermediate_size": 1024})") << "}";
  }
  EXPECT_EQ(run("bench --config " + (dir / "c.json").string() + " --tokens 1 --repeat 1", dir, &err), 2) << fam.name;
  // (product_key bounds its E at parse time: refused there, before any estimate.)
  EXPECT_TRUE(err.find("GB of weights") != std::string::npos || err.find("expected at most 2^24") != std::string::npos)
      << fam.name << ": " << err;
  fs::remove_all(dir);
}

void PrintTo(const Family& f, std::ostream* os) { *os << f.name; }

INSTANTIATE_TEST_SUITE_P(All, CliFamilies, testing::ValuesIn(families()),
                         [](const testing::TestParamInfo<Family>& i) { return i.param.name; });

}  // namespace
#endif
