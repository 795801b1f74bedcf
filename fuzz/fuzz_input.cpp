// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the command line's input path. The first byte picks one of the router
// families below (small layers, d = 8, random weights, built once); the rest is the
// `--input` file of `moekit run`: read by the CLI's own read_input() (compiled in from
// src/cli/main.cpp), then the layer's forward and outputs. Malformed files, bad batch
// tensors and non-finite values must fail with moekit::error; any crash, sanitizer report or
// other exception is a finding.
#define MOEKIT_CLI_NO_MAIN
#include "../src/cli/main.cpp"

namespace {

constexpr const char* kConfigs[] = {
    R"({"moekit_config_version": 1, "preset": "mixtral", "hidden_size": 8, "router": {"num_experts": 4, "k": 2}, "experts": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "preset": "switch", "hidden_size": 8, "router": {"num_experts": 4, "capacity_factor": 1.0}, "experts": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "preset": "deepseek_v3", "hidden_size": 8, "router": {"num_experts": 8, "k": 2, "n_group": 4, "topk_group": 2}, "experts": {"intermediate_size": 8}, "shared_expert": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "sinkhorn", "num_experts": 4, "k": 2}, "experts": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "expert_choice", "num_experts": 4, "capacity_factor": 2.0}, "experts": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "gru", "num_experts": 4, "k": 2, "d_r": 4}, "experts": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "mod", "ratio": 0.5}, "experts": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "gamma_mod", "ratio": 0.5}, "experts": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "token_prune", "tau": 0.5}, "experts": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "drllm", "bottleneck": 4, "windows": 2}, "experts": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "mor", "num_recursions": 2}, "experts": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "prototype", "num_experts": 4, "k": 1}, "experts": {"intermediate_size": 8}, "shared_expert": {"intermediate_size": 8}})",
    R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "centroid", "num_experts": 4}, "experts": {"intermediate_size": 8}})",
};
constexpr size_t kFamilies = sizeof(kConfigs) / sizeof(kConfigs[0]);

std::vector<std::unique_ptr<moekit::AnyLayer>>& layers() {
  static std::vector<std::unique_ptr<moekit::AnyLayer>> all = [] {
    std::vector<std::unique_ptr<moekit::AnyLayer>> v;
    for (const char* c : kConfigs) v.push_back(moekit::random_any_layer(moekit::parse_layer_config(c, "fuzz config"), 1));
    return v;
  }();
  return all;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  auto& all = layers();
  moekit::AnyLayer& layer = *all[data[0] % kFamilies];
  std::vector<std::byte> bytes(size - 1);
  if (size > 1) std::memcpy(bytes.data(), data + 1, size - 1);
  try {
    const auto src = moekit::io::TensorSource::of(moekit::io::SafetensorsFile::from_bytes("fuzz input", std::move(bytes)));
    const Input in = read_input(src, "fuzz input", 8);
    if (in.tokens > 4096) return 0;  // keep each execution small
    std::vector<float> y(static_cast<size_t>(in.tokens * 8));
    layer.forward(in.batch(8), in.x.data(), y.data(), 1);
    (void)layer.outputs();
  } catch (const moekit::error&) {
  }
  return 0;
}
