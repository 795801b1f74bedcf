// SPDX-License-Identifier: Apache-2.0
// Parses HF config.json files and moekit's own layer config into a LayerConfig.
#include "moekit/io/config.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <sstream>

#include <nlohmann/json.hpp>

#include "files.hpp"
#include "json_reader.hpp"
#include "moekit/error.hpp"
#include "layer_registry.hpp"

namespace moekit {
namespace {

/// The largest config file read (real HF configs are a few KiB).
constexpr std::uint64_t kMaxConfigBytes = 16u << 20;
/// The deepest JSON nesting accepted in a config (HF configs nest 3 or 4 levels).
constexpr int kMaxConfigDepth = 32;

using json = nlohmann::json;
using detail::Reader;

const char* kPresets =
    "mixtral, qwen2_moe, qwen3_moe, qwen3_next, olmoe, deepseek_v2, deepseek_v3, glm4_moe, granitemoe, dbrx, llama4, "
    "ernie4_5_moe, hunyuan_v1_moe, phimoe, gpt_oss, switch";

// The HF config-class defaults of each model type (transformers' configuration_*.py).
LayerConfig defaults_for(const std::string& preset, const std::string& where) {
  LayerConfig c;
  c.preset = preset;
  TopKOptions& r = c.router;
  c.experts.gated = true;
  c.experts.act = Activation::silu;
  if (preset == "mixtral") {  // MixtralConfig
    r.hidden = 4096; c.experts.intermediate = 14336; r.num_experts = 8; r.k = 2;
    r.norm_topk_prob = true;
    c.expert_names = ExpertNames::mixtral;
  } else if (preset == "qwen2_moe") {  // Qwen2MoeConfig
    r.hidden = 2048; c.experts.intermediate = 1408; r.num_experts = 60; r.k = 4;
    c.shared = SharedExpertConfig{5632, true, "shared_expert."};
  } else if (preset == "qwen3_next") {  // Qwen3NextConfig (its MoE block is Qwen2-MoE's)
    r.hidden = 2048; c.experts.intermediate = 512; r.num_experts = 512; r.k = 10;
    r.norm_topk_prob = true;
    c.shared = SharedExpertConfig{512, true, "shared_expert."};
  } else if (preset == "qwen3_moe") {  // Qwen3MoeConfig
    r.hidden = 2048; c.experts.intermediate = 768; r.num_experts = 128; r.k = 8;
  } else if (preset == "olmoe") {  // OlmoeConfig
    r.hidden = 2048; c.experts.intermediate = 2048; r.num_experts = 64; r.k = 8;
  } else if (preset == "deepseek_v2") {  // DeepseekV2Config (num_experts_per_tok: V2's 6)
    r.hidden = 4096; c.experts.intermediate = 1407; r.num_experts = 64; r.k = 6;
    r.group_score = GroupScore::max;
    c.shared = SharedExpertConfig{2 * 1407, false, "shared_experts."};
  } else if (preset == "deepseek_v3") {  // DeepseekV3Config
    r.hidden = 7168; c.experts.intermediate = 2048; r.num_experts = 256; r.k = 8;
    r.score_func = ScoreFunc::sigmoid; r.norm_topk_prob = true; r.routed_scaling_factor = 2.5f;
    r.n_group = 8; r.topk_group = 4; r.group_score = GroupScore::top2_sum;
    c.router_bias = true;
    c.shared = SharedExpertConfig{2048, false, "shared_experts."};
  } else if (preset == "glm4_moe") {  // Glm4MoeConfig (DeepSeek-V3's router and block)
    r.hidden = 4096; c.experts.intermediate = 1408; r.num_experts = 128; r.k = 8;
    r.score_func = ScoreFunc::sigmoid; r.norm_topk_prob = true; r.routed_scaling_factor = 1.0f;
    r.n_group = 1; r.topk_group = 1; r.group_score = GroupScore::top2_sum;
    c.router_bias = true;
    c.shared = SharedExpertConfig{1408, false, "shared_experts."};
  } else if (preset == "granitemoe") {  // GraniteMoeConfig: top-k on the logits, softmax over the k
    r.hidden = 4096; c.experts.intermediate = 11008; r.num_experts = 8; r.k = 2;
    r.topk_then_softmax = true;
    c.expert_names = ExpertNames::granite;
  } else if (preset == "dbrx") {  // DbrxConfig / DbrxFFNConfig: softmax top-k, weights / their 1-norm
    r.hidden = 2048; c.experts.intermediate = 3584; r.num_experts = 4; r.k = 1;
    r.norm_p = 1.0;
    c.expert_names = ExpertNames::dbrx;
  } else if (preset == "llama4") {  // Llama4TextConfig: sigmoid top-k of the logits, weight on the input
    r.hidden = 5120; c.experts.intermediate = 8192; r.num_experts = 16; r.k = 1;
    r.score_func = ScoreFunc::sigmoid; r.select_on_logits = true;
    c.expert_names = ExpertNames::llama4;
    c.weight_on_input = true;
    c.shared = SharedExpertConfig{8192, false, "shared_expert."};
  } else if (preset == "ernie4_5_moe") {  // Ernie4_5_MoeConfig: softmax + bias selection, renormalised
    r.hidden = 2560; c.experts.intermediate = 1536; r.num_experts = 64; r.k = 6;
    r.norm_topk_prob = true;
    c.router_bias = true;
    c.router_bias_ernie = true;
    c.shared = SharedExpertConfig{2 * 1536, false, "shared_experts."};
  } else if (preset == "hunyuan_v1_moe") {  // HunYuanMoEV1Config: softmax top-k, renormalised
    r.hidden = 4096; c.experts.intermediate = 11008; r.num_experts = 1; r.k = 1;
    r.norm_topk_prob = true;
    c.router_weight = "gate.wg.weight";
    c.shared = SharedExpertConfig{11008, false, "shared_mlp."};
  } else if (preset == "phimoe") {  // PhimoeConfig: SparseMixer top-2, Mixtral's tensors
    r.hidden = 4096; c.experts.intermediate = 6400; r.num_experts = 16; r.k = 2;
    r.sparsemixer_eps = 0.01;
    c.expert_names = ExpertNames::mixtral;
  } else if (preset == "gpt_oss") {  // GptOssConfig: biased router, top-k of the logits, softmax over the k
    r.hidden = 2880; c.experts.intermediate = 2880; r.num_experts = 128; r.k = 4;
    r.topk_then_softmax = true;
    c.router_logit_bias = true;
    c.expert_names = ExpertNames::gpt_oss;
    c.experts.clamped = true; c.experts.bias = true;
    c.experts.glu = ClampedSwiglu{1.702f, 7.0f};
  } else if (preset == "switch") {  // moekit's Switch Transformer preset (ROUTING.md section 1)
    r.hidden = 768; c.experts.intermediate = 2048; r.num_experts = 8; r.k = 1;
    r.capacity_factor = 1.0; r.drop_policy = DropPolicy::position;
    c.experts.gated = false; c.experts.act = Activation::relu;
  } else {
    detail::fail(where, ": expected one of ", kPresets, ", got \"", preset, "\"");
  }
  return c;
}

/// Sizes from a file are hostile until checked: every extent is at most kMaxExtent and the
/// layer's weight count, summed with overflow checks, at most kMaxLayerValues (2^40 values,
/// 4 TiB in f32), before anything is allocated or multiplied elsewhere.
constexpr int64_t kMaxExtent = int64_t{1} << 31;
constexpr int64_t kMaxLayerValues = int64_t{1} << 40;

void check_sizes(const LayerConfig& c) {
  const int64_t d = c.hidden(), f = c.experts.intermediate, E = c.router.num_experts;
  MOEKIT_CHECK(d <= kMaxExtent, "hidden_size: expected <= 2^31, got ", d);
  MOEKIT_CHECK(f <= kMaxExtent, "intermediate size: expected <= 2^31, got ", f);
  MOEKIT_CHECK(E <= kMaxExtent, "num_experts: expected <= 2^31, got ", E);
  int64_t per = 0, total = 0;
  bool overflow = __builtin_mul_overflow(d, f, &per) || __builtin_mul_overflow(per, 3, &per) ||
                  __builtin_mul_overflow(per, std::max<int64_t>(E, 1), &total);
  if (c.shared) {
    MOEKIT_CHECK(c.shared->intermediate <= kMaxExtent, "shared expert intermediate size: expected <= 2^31, got ",
                 c.shared->intermediate);
    int64_t shared = 0;
    overflow = overflow || __builtin_mul_overflow(d, c.shared->intermediate, &shared) ||
               __builtin_mul_overflow(shared, 3, &shared) || __builtin_add_overflow(total, shared, &total);
  }
  MOEKIT_CHECK(!overflow && total <= kMaxLayerValues, "the layer's weights (num_experts ", E, " x 3 x hidden_size ", d,
               " x intermediate size ", f, (c.shared ? " plus the shared expert" : ""),
               ") expected at most 2^40 values, got ", overflow ? std::string("more than 2^63") : std::to_string(total));
}

void finish(LayerConfig& c, const std::string& where) {
  c.experts.hidden = c.router.hidden;
  try {
    if (c.router_type == "topk") c.router.validate();
    else MOEKIT_CHECK(c.hidden() >= 1, "hidden_size: expected >= 1, got ", c.hidden());
    c.experts.validate("experts");
    if (c.shared) MOEKIT_CHECK(c.shared->intermediate >= 1, "shared expert intermediate size expected >= 1, got ", c.shared->intermediate);
    check_sizes(c);
  } catch (const error& e) {
    detail::fail(where, ": ", e.what());
  }
}

// Shared experts of `key` (a count) x moe_intermediate_size, ungated `shared_experts.*`
// (DeepSeek V2 / V3, GLM-4.5, ERNIE 4.5); 0: none; missing or null: `dflt` (DeepseekV2Moe
// builds none for None).
void counted_shared(Reader& rd, LayerConfig& c, const std::string& origin, int64_t dflt,
                    const char* key = "n_shared_experts") {
  const int64_t ns = rd.integer(key, dflt);
  MOEKIT_CHECK(ns >= 0, origin, ".", key, ": expected >= 0, got ", ns);
  if (ns == 0) {
    c.shared.reset();
    return;
  }
  int64_t f = 0;
  MOEKIT_CHECK(!__builtin_mul_overflow(ns, c.experts.intermediate, &f), origin, ".", key, ": ", ns,
               " x moe_intermediate_size ", c.experts.intermediate, " overflows int64");
  if (!c.shared) c.shared = SharedExpertConfig{f, false, "shared_experts."};
  c.shared->intermediate = f;
}

// DeepseekV2Moe (HF modeling_deepseek_v2.py): softmax scores in f32; topk_method "greedy"
// (plain top-k) or "group_limited_greedy" (group score = the group's best score); weights
// = the chosen scores x routed_scaling_factor, never renormalised (HF's DeepseekV2Moe reads
// no norm_topk_prob; DeepSeek's own modeling code normalises instead of scaling when it is
// true, so a config with true is ambiguous and refused); shared experts always added.
void parse_deepseek_v2(Reader& rd, const json& j, LayerConfig& c, const std::string& origin) {
  TopKOptions& r = c.router;
  const bool norm = rd.boolean("norm_topk_prob", false);
  MOEKIT_CHECK(!norm, origin,
               ".norm_topk_prob: expected false for deepseek_v2 (HF's DeepseekV2Moe ignores it and scales by "
               "routed_scaling_factor; DeepSeek's modeling_deepseek.py renormalises without scaling), got true");
  const std::string sf = rd.string("scoring_func", "softmax");
  MOEKIT_CHECK(sf == "softmax", origin, ".scoring_func: expected \"softmax\" for deepseek_v2 (DeepseekV2Moe), got \"",
               sf, "\"");
  MOEKIT_CHECK(!rd.boolean("mlp_bias", false), origin,
               ".mlp_bias: expected false (moekit's experts have no biases), got true");
  r.routed_scaling_factor = static_cast<float>(rd.number("routed_scaling_factor", r.routed_scaling_factor));
  const std::string tm = rd.string("topk_method", "greedy");
  MOEKIT_CHECK(tm == "greedy" || tm == "group_limited_greedy", origin,
               ".topk_method: expected greedy or group_limited_greedy for deepseek_v2, got \"", tm, "\"");
  // n_group / topk_group default to None in DeepseekV2Config and are read only by
  // group_limited_greedy.
  const int64_t ng = rd.integer("n_group", 0), tg = rd.integer("topk_group", 0);
  if (tm == "group_limited_greedy") {
    MOEKIT_CHECK(ng >= 1 && tg >= 1, origin,
                 ".n_group / .topk_group: expected integers >= 1 with topk_method group_limited_greedy, got ", ng,
                 " / ", tg);
    r.n_group = ng;
    r.topk_group = tg;
    r.group_score = GroupScore::max;
  } else {
    r.n_group = 0;
  }
  r.norm_topk_prob = false;
  r.score_func = ScoreFunc::softmax;
  const bool null_shared = j.contains("n_shared_experts") && j["n_shared_experts"].is_null();
  counted_shared(rd, c, origin, null_shared ? 0 : 2);
}

// DBRX (HF modeling_dbrx.py): d_model, and the MoE keys nested in ffn_config; DbrxRouter:
// softmax in f32, top-k, weights divided by their moe_normalize_expert_weights-norm (null: not
// divided); DbrxExpertGLU: down(act(x w1^T) * (x v1^T)) with w1, v1, w2 fused [E f, d].
LayerConfig parse_dbrx(Reader& rd, const json& j, const std::string& origin) {
  LayerConfig c = defaults_for("dbrx", origin + ".model_type");
  c.origin = "hf";
  TopKOptions& r = c.router;
  r.hidden = rd.integer("d_model", r.hidden);
  if (!rd.has("ffn_config")) {
    rd.mark("ffn_config");
  } else {
    Reader ff(rd.raw("ffn_config"), origin + ".ffn_config");
    c.experts.intermediate = ff.integer("ffn_hidden_size", c.experts.intermediate);
    r.num_experts = ff.integer("moe_num_experts", r.num_experts);
    r.k = ff.integer("moe_top_k", r.k);
    const json& fj = j["ffn_config"];
    if (fj.contains("moe_normalize_expert_weights") && fj["moe_normalize_expert_weights"].is_null()) {
      ff.mark("moe_normalize_expert_weights");
      r.norm_p = 0.0;
    } else {
      r.norm_p = ff.number("moe_normalize_expert_weights", r.norm_p);
      MOEKIT_CHECK(std::isfinite(r.norm_p) && r.norm_p > 0, ff.where(),
                   ".moe_normalize_expert_weights: expected a number > 0 (the p of the p-norm) or null, got ", r.norm_p);
    }
    std::string act = "silu";
    if (ff.has("ffn_act_fn")) {
      Reader fa(ff.raw("ffn_act_fn"), ff.where() + ".ffn_act_fn");
      act = fa.string("name", "silu");
    } else {
      ff.mark("ffn_act_fn");
    }
    c.experts.act = parse_activation(act);
  }
  finish(c, origin);
  return c;
}

// Llama 4 (HF modeling_llama4.py Llama4TextMoe): the text model's keys, at the top level
// (llama4_text) or in text_config (llama4, the released multimodal config.json).
// Llama4Router: top-k of the logits, weight sigmoid(logit); each chosen expert runs on its
// weight times the input; the shared expert (width intermediate_size) is added unweighted.
LayerConfig parse_llama4(Reader& top, const std::string& mt, const std::string& origin) {
  LayerConfig c = defaults_for("llama4", origin + ".model_type");
  c.origin = "hf";
  auto read = [&](Reader& rd) {
    TopKOptions& r = c.router;
    r.hidden = rd.integer("hidden_size", r.hidden);
    c.experts.intermediate = rd.integer("intermediate_size", c.experts.intermediate);
    r.num_experts = rd.integer("num_local_experts", r.num_experts);
    r.k = rd.integer("num_experts_per_tok", r.k);
    c.experts.act = parse_activation(rd.string("hidden_act", "silu"));
    c.shared->intermediate = c.experts.intermediate;  // Llama4TextMLP(config): the same width
  };
  if (mt == "llama4_text") {
    read(top);
  } else {
    MOEKIT_CHECK(top.has("text_config"), origin,
                 ".text_config: expected the text model's object (a llama4 config.json nests it), got nothing");
    Reader tc(top.raw("text_config"), origin + ".text_config");
    read(tc);
  }
  finish(c, origin);
  return c;
}

// An HF model type's preset with the keys every such config has: hidden_size, hidden_act and
// the expert width under `width_key`.
LayerConfig hf_start(const char* preset, Reader& rd, const std::string& origin, const char* width_key) {
  LayerConfig c = defaults_for(preset, origin + ".model_type");
  c.origin = "hf";
  c.router.hidden = rd.integer("hidden_size", c.router.hidden);
  c.experts.act = parse_activation(rd.string("hidden_act", "silu"));
  c.experts.intermediate = rd.integer(width_key, c.experts.intermediate);
  return c;
}

// ERNIE 4.5 (HF modeling_ernie4_5_moe.py Ernie4_5_MoeSparseMoeBlock): f32 logits, softmax,
// top-k of softmax + moe_statics bias, weights = the chosen softmax values / max(their sum,
// moe_norm_min), shared experts of moe_num_shared_experts x moe_intermediate_size.
LayerConfig parse_ernie(Reader& rd, const std::string& origin) {
  LayerConfig c = hf_start("ernie4_5_moe", rd, origin, "moe_intermediate_size");
  TopKOptions& r = c.router;
  // attribute_map: num_experts -> moe_num_experts, num_experts_per_tok -> moe_k
  r.num_experts = rd.integer("moe_num_experts", rd.integer("num_experts", r.num_experts));
  r.k = rd.integer("moe_k", rd.integer("num_experts_per_tok", r.k));
  MOEKIT_CHECK(!rd.boolean("use_bias", false), origin,
               ".use_bias: expected false (moekit's experts have no biases), got true");
  // The top-k sum of a softmax is >= k / E >= 2^-31: a floor at or below 1e-10 never binds,
  // and dividing by the sum (+ 1e-20, norm_topk_prob) is then the same in f32.
  const double norm_min = rd.number("moe_norm_min", 1e-12);
  MOEKIT_CHECK(std::isfinite(norm_min) && norm_min >= 0 && norm_min <= 1e-10, origin,
               ".moe_norm_min: expected a number in [0, 1e-10] (a larger floor could bind; not supported), got ",
               norm_min);
  counted_shared(rd, c, origin, 2, "moe_num_shared_experts");
  finish(c, origin);
  return c;
}

// An integer that a config may also give per layer as a list: a list whose entries are all
// equal stands for that value; a list that differs between layers needs the layer, which a
// config.json alone does not name.
int64_t per_layer_integer(Reader& rd, const json& j, const std::string& key, int64_t def, const std::string& origin) {
  if (!j.contains(key) || !j[key].is_array()) return rd.integer(key, def);
  rd.mark(key);
  const json& a = j[key];
  MOEKIT_CHECK(!a.empty() && a.size() <= 1000000, origin, ".", key, ": expected an integer or a non-empty per-layer list, got ",
               a.empty() ? "an empty list" : "a list of over a million entries");
  int64_t v = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    MOEKIT_CHECK(a[i].is_number_integer(), origin, ".", key, "[", i, "]: expected an integer, got ", a[i].dump().substr(0, 40));
    const int64_t x = a[i].get<int64_t>();
    MOEKIT_CHECK(i == 0 || x == v, origin, ".", key, ": a per-layer list whose values differ (", v, " at layer 0, ", x,
                 " at layer ", i, ") is not supported: moekit loads one layer from config.json alone; write that "
                 "layer's value");
    v = x;
  }
  return v;
}

// HunYuan (HF modeling_hunyuan_v1_moe.py HunYuanMoEV1Moe): f32 router gate.wg, softmax,
// top-k, divided by the sum; every expert and the one shared_mlp have intermediate_size.
LayerConfig parse_hunyuan(Reader& rd, const json& j, const std::string& origin) {
  LayerConfig c = hf_start("hunyuan_v1_moe", rd, origin, "intermediate_size");
  TopKOptions& r = c.router;
  c.shared->intermediate = c.experts.intermediate;
  r.num_experts = per_layer_integer(rd, j, "num_experts", r.num_experts, origin);
  r.k = per_layer_integer(rd, j, "moe_topk", r.k, origin);
  // Keys of Tencent's own code that HF's HunYuanMoEV1Moe does not read: refused where they
  // would say something else than what HF builds.
  if (j.contains("moe_intermediate_size")) {
    const int64_t mf = per_layer_integer(rd, j, "moe_intermediate_size", c.experts.intermediate, origin);
    MOEKIT_CHECK(mf == c.experts.intermediate, origin, ".moe_intermediate_size: expected ", c.experts.intermediate,
                 " (HF's HunYuanMoEV1Moe builds every expert with intermediate_size), got ", mf);
  }
  if (j.contains("num_shared_expert")) {
    const int64_t ns = per_layer_integer(rd, j, "num_shared_expert", 1, origin);
    MOEKIT_CHECK(ns == 1, origin, ".num_shared_expert: expected 1 (HF's HunYuanMoEV1Moe builds one shared_mlp), got ",
                 ns);
  }
  MOEKIT_CHECK(!rd.boolean("moe_drop_tokens", false), origin,
               ".moe_drop_tokens: expected false (HF's HunYuanMoEV1Moe is dropless), got true");
  finish(c, origin);
  return c;
}

// gpt-oss (HF modeling_gpt_oss.py GptOssMLP): logits x W^T + b, top-k of the logits, softmax
// over the k; experts with biases and the clamped SwiGLU; no shared expert. The MXFP4 form of the
// released checkpoints is found from the tensors (ExpertNames::gpt_oss).
LayerConfig parse_gpt_oss(Reader& rd, const std::string& origin) {
  LayerConfig c = hf_start("gpt_oss", rd, origin, "intermediate_size");
  TopKOptions& r = c.router;
  // attribute_map: num_experts -> num_local_experts; experts_per_token is a released alias.
  r.num_experts = rd.integer("num_local_experts", rd.integer("num_experts", r.num_experts));
  r.k = rd.integer("num_experts_per_tok", rd.integer("experts_per_token", r.k));
  c.experts.glu.limit = static_cast<float>(rd.number("swiglu_limit", c.experts.glu.limit));
  c.experts.glu.alpha = static_cast<float>(rd.number("swiglu_alpha", c.experts.glu.alpha));
  finish(c, origin);
  return c;
}

// RMoE's official model (qiuzh20/RMoE llama_moe_rnn/llama_moe_modeling.py at 9913a7f,
// MixtralSparseMoeBlock with the recurrent router): the layerwise GRU (or RNN) router on its
// official tensor names (layout "rmoe": block_sparse_moe.weight1 / weight2, the cell
// model.rnn_router.weight_ir ... bias_hn), Mixtral's softmax top-k renormalised, experts
// w1 / w3 / w2; with add_moe_share_expert, y = moe_weight * (MoE + bias) + share_weight *
// mlp_share(x); add_moe_bias adds block_sparse_moe.bias to the MoE output.
LayerConfig parse_llama_moe_rnn(Reader& rd, const std::string& origin) {
  LayerConfig c;
  c.origin = "hf";
  c.preset = "llama_moe_rnn";
  c.router.hidden = rd.integer("hidden_size", 4096);
  c.experts.gated = true;
  c.experts.act = parse_activation(rd.string("hidden_act", "silu"));
  const int64_t dense_f = rd.integer("intermediate_size", 11008);
  c.experts.intermediate = rd.integer("moe_expert_intermediate_size", dense_f);  // None: the dense width
  c.expert_names = ExpertNames::mixtral;
  const int64_t E = rd.integer("num_local_experts", 8), k = rd.integer("num_experts_per_tok", 2);
  const std::string type = rd.string("moe_router_type", "gru");
  const bool share = rd.boolean("add_moe_share_expert", false);
  const double moe_weight = rd.number("moe_weight", 0.5), share_weight = rd.number("share_weight", 0.5);
  const bool bias = rd.boolean("add_moe_bias", false);
  (void)rd.integer("moe_num_layers", 32);
  if (share) {
    MOEKIT_CHECK(std::isfinite(moe_weight) && moe_weight > 0 && std::isfinite(share_weight), origin,
                 ".moe_weight / share_weight: expected finite numbers (moe_weight > 0), got ", moe_weight, " and ",
                 share_weight);
    c.shared = SharedExpertConfig{rd.integer("moe_share_expert_intermediate_size", dense_f), false, "mlp_share."};
    c.shared->scale = static_cast<float>(share_weight);
  }
  const double routed_scale = share ? moe_weight : 1.0;
  if (type == "gru" || type == "rnn") {
    c.router_type = "gru";
    json r = {{"type", "gru"}, {"num_experts", E}, {"k", k}, {"d_r", rd.integer("moe_router_rnn_hidden_size", 256)},
              {"variant", type}, {"layout", "rmoe"}, {"routed_scaling_factor", routed_scale}, {"output_bias", bias}};
    c.router_json = r.dump();
    c.router.num_experts = E;
    c.router.k = k;
  } else {  // a plain gate: block_sparse_moe.gate.weight, Mixtral's routing
    MOEKIT_CHECK(!bias, origin, ".add_moe_bias: supported with moe_router_type gru or rnn only, got \"", type, "\"");
    c.router.num_experts = E;
    c.router.k = k;
    c.router.norm_topk_prob = true;
    c.router.routed_scaling_factor = static_cast<float>(routed_scale);
  }
  finish(c, origin);
  if (c.router_type != "topk") {
    try {
      detail::find_router_family("gru")->validate(json::parse(c.router_json), c);
    } catch (const error& e) {
      detail::fail(origin, ": ", e.what());
    }
  }
  return c;
}

LayerConfig parse_hf_type(const json& j, const std::string& origin);

LayerConfig parse_hf(const json& j, const std::string& origin) {
  LayerConfig c = parse_hf_type(j, origin);
  // torch_dtype (newer files: dtype), a string when present; other forms are ignored.
  for (const char* key : {"torch_dtype", "dtype"})
    if (c.torch_dtype.empty() && j.contains(key) && j[key].is_string()) c.torch_dtype = j[key].get<std::string>();
  if (c.torch_dtype.empty() && j.contains("text_config") && j["text_config"].is_object() &&
      j["text_config"].contains("torch_dtype") && j["text_config"]["torch_dtype"].is_string())
    c.torch_dtype = j["text_config"]["torch_dtype"].get<std::string>();
  return c;
}

LayerConfig parse_hf_type(const json& j, const std::string& origin) {
  Reader rd(j, origin);
  const std::string mt = rd.string("model_type", "");
  static constexpr const char* kHfTypes[] = {"mixtral",     "qwen2_moe",   "qwen3_moe",    "qwen3_next",     "olmoe",
                                             "deepseek_v2", "deepseek_v3", "glm4_moe",     "granitemoe",     "dbrx",
                                             "llama4",      "llama4_text", "ernie4_5_moe", "hunyuan_v1_moe", "phimoe",
                                             "gpt_oss",     "llama_moe_rnn"};
  if (std::find(std::begin(kHfTypes), std::end(kHfTypes), mt) == std::end(kHfTypes)) {
    std::string list;
    for (const char* t : kHfTypes) list += (list.empty() ? "" : ", ") + std::string(t);
    detail::fail(origin, ".model_type: expected one of ", list, ", got \"", mt, "\"");
  }
  if (mt == "ernie4_5_moe") return parse_ernie(rd, origin);
  if (mt == "gpt_oss") return parse_gpt_oss(rd, origin);
  if (mt == "llama_moe_rnn") return parse_llama_moe_rnn(rd, origin);
  if (mt == "hunyuan_v1_moe") return parse_hunyuan(rd, j, origin);
  if (mt == "dbrx") return parse_dbrx(rd, j, origin);
  if (mt == "llama4" || mt == "llama4_text") return parse_llama4(rd, mt, origin);
  LayerConfig c = defaults_for(mt, origin + ".model_type");
  c.origin = "hf";
  TopKOptions& r = c.router;
  r.hidden = rd.integer("hidden_size", r.hidden);
  c.experts.act = parse_activation(rd.string("hidden_act", "silu"));
  if (mt == "mixtral" || mt == "granitemoe" || mt == "phimoe") {
    c.experts.intermediate = rd.integer("intermediate_size", c.experts.intermediate);
    r.num_experts = rd.integer("num_local_experts", r.num_experts);
  } else if (mt == "olmoe") {
    c.experts.intermediate = rd.integer("intermediate_size", c.experts.intermediate);
    // OlmoeConfig maps num_local_experts onto num_experts (attribute_map).
    r.num_experts = rd.integer("num_experts", rd.integer("num_local_experts", r.num_experts));
  } else if (mt == "qwen2_moe" || mt == "qwen3_moe" || mt == "qwen3_next") {
    c.experts.intermediate = rd.integer("moe_intermediate_size", c.experts.intermediate);
    r.num_experts = rd.integer("num_experts", r.num_experts);
  } else {  // deepseek_v2, deepseek_v3, glm4_moe
    c.experts.intermediate = rd.integer("moe_intermediate_size", c.experts.intermediate);
    // Glm4MoeConfig maps num_local_experts onto n_routed_experts (attribute_map).
    r.num_experts = rd.integer("n_routed_experts", mt == "glm4_moe" ? rd.integer("num_local_experts", r.num_experts)
                                                                    : r.num_experts);
  }
  // DeepseekV2Config has no default for num_experts_per_tok (None): a V2 config must set it.
  MOEKIT_CHECK(mt != "deepseek_v2" || (j.contains("num_experts_per_tok") && !j["num_experts_per_tok"].is_null()),
               origin, ".num_experts_per_tok: expected an integer (DeepseekV2Config has no default), got ",
               j.contains("num_experts_per_tok") ? "null" : "no such key");
  r.k = rd.integer("num_experts_per_tok", r.k);
  if (mt != "mixtral" && mt != "deepseek_v2" && mt != "granitemoe" && mt != "phimoe")
    r.norm_topk_prob = rd.boolean("norm_topk_prob", r.norm_topk_prob);
  if (mt == "phimoe") {  // PhimoeTopKRouter: sparsemixer(logits, jitter_eps = router_jitter_noise)
    r.sparsemixer_eps = rd.number("router_jitter_noise", r.sparsemixer_eps);
    MOEKIT_CHECK(std::isfinite(r.sparsemixer_eps) && r.sparsemixer_eps > 0, origin,
                 ".router_jitter_noise: expected a number > 0 (SparseMixer's eps), got ", r.sparsemixer_eps);
    MOEKIT_CHECK(r.k == 2, origin, ".num_experts_per_tok: expected 2 (PhiMoE's sparsemixer supports top-2 only), got ",
                 r.k);
  }
  if (mt == "deepseek_v2") parse_deepseek_v2(rd, j, c, origin);
  if (mt == "qwen2_moe" || mt == "qwen3_next") {
    c.shared->intermediate = rd.integer("shared_expert_intermediate_size", c.shared->intermediate);
    if (c.shared->intermediate == 0) c.shared.reset();
  }
  if (mt == "deepseek_v3") {
    r.n_group = rd.integer("n_group", r.n_group);
    r.topk_group = rd.integer("topk_group", r.topk_group);
    r.routed_scaling_factor = static_cast<float>(rd.number("routed_scaling_factor", r.routed_scaling_factor));
    const std::string sf = rd.string("scoring_func", "sigmoid");
    MOEKIT_CHECK(sf == "sigmoid" || sf == "softmax", origin, ".scoring_func: expected \"sigmoid\" or \"softmax\", got \"", sf, "\"");
    r.score_func = sf == "sigmoid" ? ScoreFunc::sigmoid : ScoreFunc::softmax;
    const std::string tm = rd.string("topk_method", "noaux_tc");
    // group_limited_greedy (DeepSeek-V2) scores a group by its max, not supported here.
    MOEKIT_CHECK(tm == "noaux_tc" || tm == "greedy", origin,
                 ".topk_method: expected noaux_tc or greedy, got \"", tm, "\"");
    c.router_bias = tm == "noaux_tc";
    if (tm == "greedy") r.n_group = 0;
    r.group_score = GroupScore::top2_sum;
    counted_shared(rd, c, origin, 1);
  }
  if (mt == "glm4_moe") {  // Glm4MoeTopkRouter is DeepseekV3TopkRouter: always sigmoid + bias
    r.n_group = rd.integer("n_group", r.n_group);
    r.topk_group = rd.integer("topk_group", r.topk_group);
    r.routed_scaling_factor = static_cast<float>(rd.number("routed_scaling_factor", r.routed_scaling_factor));
    counted_shared(rd, c, origin, 1);
  }
  finish(c, origin);
  return c;
}

const char* expert_names_string(ExpertNames n) {
  switch (n) {
    case ExpertNames::mixtral: return "mixtral";
    case ExpertNames::granite: return "granite";
    case ExpertNames::llama4: return "llama4";
    case ExpertNames::dbrx: return "dbrx";
    case ExpertNames::gpt_oss: return "gpt_oss";
    default: return "hf";
  }
}

ExpertNames parse_expert_names(const std::string& s, const std::string& where) {
  for (ExpertNames n : {ExpertNames::hf, ExpertNames::mixtral, ExpertNames::granite, ExpertNames::llama4,
                        ExpertNames::dbrx, ExpertNames::gpt_oss})
    if (s == expert_names_string(n)) return n;
  detail::fail(where, ": expected \"hf\", \"mixtral\", \"granite\", \"llama4\", \"dbrx\" or \"gpt_oss\", got \"", s, "\"");
}


LayerConfig parse_moekit(const json& j, const std::string& origin) {
  Reader rd(j, origin);
  const int64_t version = rd.integer("moekit_config_version", -1);
  MOEKIT_CHECK(version == kConfigVersion, origin, ".moekit_config_version: expected ", kConfigVersion, ", got ", version);
  const std::string preset = rd.string("preset", "");
  LayerConfig c;
  if (!preset.empty()) {
    c = defaults_for(preset, origin + ".preset");
  } else {
    MOEKIT_CHECK(rd.has("router") && rd.has("experts") && rd.has("hidden_size"), origin,
                 ": expected \"preset\", or all of \"hidden_size\", \"router\" and \"experts\"");
    c.router.hidden = 0;
  }
  c.origin = "moekit";
  TopKOptions& r = c.router;
  r.hidden = rd.integer("hidden_size", r.hidden);

  rd.mark("router");
  rd.mark("experts");
  if (rd.has("router")) {
    Reader rr(rd.raw("router"), origin + ".router");
    const std::string type = rr.string("type", "topk");
    if (type != "topk") {
      // Another router family: its builder parses the object (validated below).
      MOEKIT_CHECK(detail::find_router_family(type) != nullptr, rr.where(), ".type: expected one of ",
                   detail::router_family_list(), "; got \"", type, "\"");
      c.router_type = type;
      c.router_json = rd.raw("router").dump();
    } else {
      parse_topk_router(rr, c);
    }
  }
  if (rd.has("experts")) {
    Reader re(rd.raw("experts"), origin + ".experts");
    std::string type = re.string("type", c.experts.clamped ? "swiglu_clamped" : c.experts.gated ? (c.experts.act == Activation::silu ? "swiglu" : "geglu") : activation_name(c.experts.act));
    c.experts.clamped = type == "swiglu_clamped";
    if (type == "swiglu" || type == "swiglu_clamped") { c.experts.gated = true; c.experts.act = Activation::silu; }
    else if (type == "geglu") { c.experts.gated = true; c.experts.act = Activation::gelu; }
    else if (type == "gelu") { c.experts.gated = false; c.experts.act = Activation::gelu; }
    else if (type == "gelu_tanh") { c.experts.gated = false; c.experts.act = Activation::gelu_tanh; }
    else if (type == "relu") { c.experts.gated = false; c.experts.act = Activation::relu; }
    else detail::fail(re.where(), ".type: expected swiglu, swiglu_clamped, geglu, gelu, gelu_tanh or relu, got \"", type, "\"");
    c.experts.glu.alpha = static_cast<float>(re.number("swiglu_alpha", c.experts.glu.alpha));
    c.experts.glu.limit = static_cast<float>(re.number("swiglu_limit", c.experts.glu.limit));
    c.experts.bias = re.boolean("bias", c.experts.bias);
    c.experts.intermediate = re.integer("intermediate_size", c.experts.intermediate);
    if (re.has("names")) c.router_weight.clear();  // the router weight goes with the named layout
    c.expert_names = parse_expert_names(re.string("names", expert_names_string(c.expert_names)), re.where() + ".names");
    const std::string dtype = re.string("dtype", kernels::to_string(c.pack.type));
    try {
      c.pack.type = kernels::parse_weight_type(dtype);
    } catch (const error& e) {
      detail::fail(re.where(), ".dtype: ", e.what());
    }
    c.pack.bf16_activations = re.boolean("bf16_activations", c.pack.bf16_activations);
    re.reject_unknown();
  }
  if (rd.has("shared_expert")) {
    Reader rs(rd.raw("shared_expert"), origin + ".shared_expert");
    SharedExpertConfig s = c.shared.value_or(SharedExpertConfig{0, false, ""});
    s.intermediate = rs.integer("intermediate_size", s.intermediate);
    s.gated = rs.boolean("gated", s.gated);
    // ProMoE's shared expert is `shared_expert.*` (ungated, docs/routers.md).
    const bool promoe = c.router_type == "prototype";
    MOEKIT_CHECK(!promoe || !s.gated, rs.where(),
                 ".gated: expected false for the prototype router (ProMoE's shared expert has no gate), got true");
    s.names = rs.string("names", s.names.empty() ? (s.gated || promoe ? "shared_expert." : "shared_experts.") : s.names);
    s.residual_coefficient = rs.boolean("residual_coefficient", s.residual_coefficient);
    s.scale = static_cast<float>(rs.number("scale", s.scale));
    MOEKIT_CHECK(std::isfinite(s.scale), rs.where(), ".scale: expected a finite number, got ", s.scale);
    MOEKIT_CHECK(!s.residual_coefficient || !s.gated, rs.where(),
                 ".residual_coefficient: expected false with gated (PR-MoE's coefficient replaces the gate), got true");
    MOEKIT_CHECK(!s.names.empty() && s.names.back() == '.', rs.where(), ".names: expected a tensor prefix ending in '.', got \"", s.names, "\"");
    rs.reject_unknown();
    c.shared = s;
  } else if (j.contains("shared_expert")) {
    rd.mark("shared_expert");  // null: no shared expert, even if the preset or family has one
    c.shared.reset();
    c.shared_null = true;
  }
  rd.reject_unknown();
  MOEKIT_CHECK(!fused_experts(c.expert_names) || (c.router_type == "topk" && c.experts.gated), origin,
               ".experts.names: fused expert tensors (\"", expert_names_string(c.expert_names),
               "\") expected with router type topk and gated experts, got router type \"", c.router_type, "\"",
               c.experts.gated ? "" : " and ungated experts");
  finish(c, origin);
  if (c.router_type != "topk") {
    const detail::RouterFamily* f = detail::find_router_family(c.router_type);
    try {
      f->validate(nlohmann::json::parse(c.router_json), c);
    } catch (const error& e) {
      detail::fail(origin, ".router: ", e.what());
    }
  }
  return c;
}

}  // namespace

LayerConfig parse_layer_config(const std::string& json_text, const std::string& origin) {
  // Duplicate keys are errors (nlohmann keeps the last one silently); linear-time parse.
  const json j = detail::parse_untrusted_json(origin, json_text.data(),
                                                  json_text.data() + json_text.size(),
                                                  kMaxConfigDepth, "not valid JSON");
  MOEKIT_CHECK(j.is_object(), origin, ": expected a JSON object, got ", j.type_name());
  if (j.contains("moekit_config_version")) return parse_moekit(j, origin);
  if (j.contains("model_type")) return parse_hf(j, origin);
  detail::fail(origin, ": expected an HF config (with \"model_type\") or a moekit config (with \"moekit_config_version\"), got neither key");
}

LayerConfig load_layer_config(const std::string& path) {
  return parse_layer_config(detail::read_regular_file(path, path, kMaxConfigBytes), path);
}

LayerConfig preset_defaults(const std::string& preset) {
  LayerConfig c = defaults_for(preset, "preset");
  c.origin = "moekit";
  finish(c, "preset " + preset);
  return c;
}

namespace detail {

// The `router` object of type "topk" (moekit's own format), over the preset's defaults.
void parse_topk_router(Reader& rr, LayerConfig& c) {
  TopKOptions& r = c.router;
  r.num_experts = rr.integer("num_experts", r.num_experts);
  r.k = rr.integer("k", r.k);
  const std::string sf = rr.string("score_func", r.score_func == ScoreFunc::softmax ? "softmax" : "sigmoid");
  MOEKIT_CHECK(sf == "softmax" || sf == "sigmoid", rr.where(), ".score_func: expected \"softmax\" or \"sigmoid\", got \"", sf, "\"");
  r.score_func = sf == "softmax" ? ScoreFunc::softmax : ScoreFunc::sigmoid;
  r.topk_then_softmax = rr.boolean("topk_then_softmax", r.topk_then_softmax);
  r.norm_topk_prob = rr.boolean("norm_topk_prob", r.norm_topk_prob);
  r.norm_p = rr.number("norm_p", r.norm_p);
  r.uniform_weights = rr.boolean("uniform_weights", r.uniform_weights);
  r.select_on_logits = rr.boolean("select_on_logits", r.select_on_logits);
  r.sparsemixer_eps = rr.number("sparsemixer_eps", r.sparsemixer_eps);
  c.weight_on_input = rr.boolean("weight_on_input", c.weight_on_input);
  r.routed_scaling_factor = static_cast<float>(rr.number("routed_scaling_factor", r.routed_scaling_factor));
  c.router_bias = rr.boolean("e_score_correction_bias", c.router_bias);
  c.router_logit_bias = rr.boolean("logit_bias", c.router_logit_bias);
  r.n_group = rr.integer("n_group", r.n_group);
  r.topk_group = rr.integer("topk_group", r.topk_group);
  if (rr.has("group_score")) {
    const std::string gs = rr.string("group_score", "");
    if (gs == "top2_sum") r.group_score = GroupScore::top2_sum;
    else if (gs == "max") r.group_score = GroupScore::max;
    else if (gs == "topk_sum") r.group_score = GroupScore::topk_sum;
    else detail::fail(rr.where(), ".group_score: expected \"top2_sum\", \"max\" or \"topk_sum\", got \"", gs, "\"");
  } else {
    // Each model's rule differs (DeepSeek-V3 top2_sum with its bias, DeepSeek-V2 max, Megatron
    // topk_sum): groups without a preset that fixes the rule, or a bias that implies V3's, must
    // say which.
    const bool preset_rule = c.preset == "deepseek_v2" || c.preset == "deepseek_v3" || c.preset == "glm4_moe";
    MOEKIT_CHECK(r.n_group <= 1 || preset_rule || c.router_bias, rr.where(),
                 ".group_score: required with n_group > 1 and no e_score_correction_bias: \"top2_sum\" "
                 "(DeepSeek-V3), \"max\" (DeepSeek-V2) or \"topk_sum\" (Megatron)");
  }
  r.capacity_factor = rr.number("capacity_factor", r.capacity_factor);
  r.min_capacity = rr.integer("min_capacity", r.min_capacity);
  rr.mark("drop_policy");
  if (rr.has("drop_policy")) r.drop_policy = detail::parse_drop_policy(rr.string("drop_policy", ""), rr.where() + ".drop_policy");
  r.renormalize_after_drop = rr.boolean("renormalize_after_drop", r.renormalize_after_drop);
  const std::string noise = rr.string("noise", "none");
  if (noise == "none") r.noise = TrainingNoise::none;
  else if (noise == "jitter") r.noise = TrainingNoise::jitter;
  else detail::fail(rr.where(), ".noise: expected \"none\" or \"jitter\" (noisy_topk needs a noise weight: C++ API only), got \"", noise, "\"");
  r.noise_eps = static_cast<float>(rr.number("noise_eps", r.noise_eps));
  const int64_t seed = rr.integer("noise_seed", 0);
  MOEKIT_CHECK(seed >= 0, rr.where(), ".noise_seed: expected an integer >= 0, got ", seed);
  r.noise_seed = static_cast<uint64_t>(seed);
  rr.reject_unknown();
}

}  // namespace detail

}  // namespace moekit
