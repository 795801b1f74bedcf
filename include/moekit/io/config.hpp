// SPDX-License-Identifier: Apache-2.0
// Layer configurations: HF config.json (mixtral, qwen2_moe, qwen3_moe, qwen3_next, olmoe, deepseek_v2,
// deepseek_v3, glm4_moe, granitemoe, dbrx, llama4, ernie4_5_moe, hunyuan_v1_moe)
// and moekit's own JSON format (docs/config.md). Implemented in src/io/config.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "moekit/experts/ffn.hpp"
#include "moekit/routers/topk.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// moekit's own config format version this build reads and writes.
inline constexpr int kConfigVersion = 1;

/// Tensor names of the routed experts inside the MoE block.
enum class ExpertNames {
  hf,       ///< experts.{i}.gate_proj / up_proj / down_proj.weight
  mixtral,  ///< experts.{i}.w1 (gate) / w3 (up) / w2 (down).weight
  /// Fused 3-D tensors (HF config.json only), named from the block prefix:
  granite,  ///< input_linear.weight [E, 2f, d] (gate rows, then up rows), output_linear.weight [E, d, f]
  llama4,   ///< experts.gate_up_proj [E, d, 2f] (gate columns, then up), experts.down_proj [E, f, d]
  dbrx,     ///< experts.mlp.w1 (gate) / v1 (up) / w2 (down, transposed), each [E f, d]
  /// gpt-oss: experts.gate_up_proj [E, d, 2f] (gate and up columns interleaved: gate 2j, up
  /// 2j + 1), experts.down_proj [E, f, d], biases experts.gate_up_proj_bias [E, 2f] and
  /// experts.down_proj_bias [E, d]; or the released MXFP4 form, experts.gate_up_proj_blocks
  /// U8 [E, 2f, d/32, 16] + _scales U8 [E, 2f, d/32] and down_proj_blocks [E, d, f/32, 16] +
  /// _scales [E, d, f/32] (rows = outputs, gate rows 2j, up rows 2j + 1)
  gpt_oss,
};

/// Whether the routed experts are read from fused 3-D tensors (granite, llama4, dbrx).
[[nodiscard]] inline bool fused_experts(ExpertNames n) noexcept {
  return n == ExpertNames::granite || n == ExpertNames::llama4 || n == ExpertNames::dbrx || n == ExpertNames::gpt_oss;
}

/// The router weight `[E, d]` after the block prefix, which goes with the experts' layout:
/// "gate.weight", or "router.layer.weight" (granite, dbrx), "router.weight" (llama4, gpt_oss).
[[nodiscard]] inline const char* router_weight_name(ExpertNames n) noexcept {
  return n == ExpertNames::granite || n == ExpertNames::dbrx                        ? "router.layer.weight"
         : n == ExpertNames::llama4 || n == ExpertNames::gpt_oss ? "router.weight"
                                                                                    : "gate.weight";
}

/// A shared (always-on) expert as configured.
struct SharedExpertConfig {
  int64_t intermediate = 0;  ///< width of the shared FFN
  bool gated = false;        ///< multiply by sigmoid(shared_expert_gate . x) (Qwen2-MoE)
  std::string names;         ///< tensor prefix: "shared_expert." (Qwen2-MoE) or "shared_experts." (DeepSeek-V3)
  /// DeepSpeed PR-MoE's residual coefficient: `coefficient.weight [2, d]`, `coefficient.bias [2]`
  /// (SharedExpert::coefficient); not with `gated`.
  bool residual_coefficient = false;
  /// Multiplies the shared expert's output (SharedExpert::scale; RMoE's `share_weight`).
  float scale = 1.0f;
};

/// Everything needed to build a top-k MoE layer, whichever file it came from.
struct LayerConfig {
  std::string origin;            ///< "hf" or "moekit"
  std::string preset;            ///< an HF model type above, switch, or ""
  std::string router_type = "topk";  ///< the router family (docs/routers.md)
  /// The `router` object as JSON text, for router families other than topk (validated when
  /// parsed; the family's builder reads it).
  std::string router_json;
  TopKOptions router;            ///< top-k router options; also hidden (d) for every family
  bool router_bias = false;      ///< reads the selection bias: gate.e_score_correction_bias [E]
  /// The router has a linear-layer bias `router.bias [E]` added to the logits (gpt-oss;
  /// TopKRouter::set_logit_bias).
  bool router_logit_bias = false;
  /// ERNIE 4.5 keeps its selection bias as moe_statics.e_score_correction_bias [1, E].
  bool router_bias_ernie = false;
  /// The router weight's name after the block prefix when it is not the layout's
  /// (router_weight_name): "gate.wg.weight" for hunyuan_v1_moe; empty = the layout's.
  std::string router_weight;
  /// The routing weight multiplies the expert's input, not its output (Llama 4;
  /// SparseLayer::set_weight_on_input).
  bool weight_on_input = false;
  FfnShape experts;              ///< routed experts' shape
  ExpertNames expert_names = ExpertNames::hf;
  std::optional<SharedExpertConfig> shared;
  /// moekit configs: `"shared_expert": null` was given (no shared expert, also for families
  /// that otherwise add one by default, e.g. prototype).
  bool shared_null = false;
  /// How expert weights (routed and shared) are stored and computed: `experts.dtype` and
  /// `experts.bf16_activations` in moekit configs, `--dtype` on the command line.
  kernels::PackOptions pack;
  /// An HF config's `torch_dtype` ("bfloat16", "float32", ...; "" when absent): `moekit bench`
  /// stores the experts as bf16 for "bfloat16" unless --dtype says otherwise.
  std::string torch_dtype;

  [[nodiscard]] int64_t hidden() const noexcept { return router.hidden; }
  /// The router weight's name after the block prefix: `router_weight`, else the layout's.
  [[nodiscard]] std::string router_weight_tensor() const {
    return router_weight.empty() ? std::string(router_weight_name(expert_names)) : router_weight;
  }
};

/// Parses a config from JSON text; `origin` names the file in error messages. Detects the
/// format: an object with "model_type" is an HF config, one with "moekit_config_version"
/// is moekit's own. Throws moekit::error naming the key for any invalid or unknown value.
LayerConfig parse_layer_config(const std::string& json_text, const std::string& origin = "config");

/// Reads and parses a config file.
LayerConfig load_layer_config(const std::string& path);

/// The defaults of a preset (HF config-class defaults, or moekit's switch), for docs/tests.
LayerConfig preset_defaults(const std::string& preset);

}  // namespace moekit
#pragma GCC visibility pop
