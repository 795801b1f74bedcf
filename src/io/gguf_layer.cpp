// SPDX-License-Identifier: Apache-2.0
// A GGUF file's MoE layer: the LayerConfig from its metadata and tensor shapes (llama.cpp's
// semantics: src/llama-graph.cpp build_moe_ffn and the flags src/models/*.cpp pass per
// architecture), and the layer built from its tensors, dequantised to f32 expert by expert.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "layer_registry.hpp"
#include "moekit/io/gguf.hpp"
#include "moekit/io/model.hpp"

namespace moekit {
namespace {

using io::GgufFile;
using io::GgufTensor;

std::string q(const std::string& s) { return "\"" + s + "\""; }

std::string shape_of(const GgufTensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.n_dims; ++i) s += (i ? ", " : "") + std::to_string(t.ne[static_cast<size_t>(i)]);
  return s + "]";
}

// Tensor `name` with ggml extents `ne` (trailing 1s may be left out of the file).
const GgufTensor& expect(const GgufFile& g, const std::string& name, std::vector<int64_t> ne) {
  const GgufTensor& t = g.tensor(name);
  bool ok = true;
  for (size_t i = 0; i < 4; ++i) ok = ok && t.ne[i] == (i < ne.size() ? ne[i] : 1);
  if (!ok) {
    std::string want = "[";
    for (size_t i = 0; i < ne.size(); ++i) want += (i ? ", " : "") + std::to_string(ne[i]);
    detail::fail("GGUF file ", g.path(), ": tensor ", q(name), " has ne ", shape_of(t), ", expected ", want, "]");
  }
  return t;
}

// The architectures whose MoE block moekit builds, with llama.cpp's flags for each.
struct ArchRule {
  const char* arch;
  int gating;     // default gating: 1 softmax, 2 sigmoid, 3 softmax over the chosen logits
  int norm;       // 1: renormalise; 0: never; -1: from <arch>.expert_weights_norm (default false)
  bool scale;     // reads <arch>.expert_weights_scale
  bool weight_before_ffn;
};
constexpr ArchRule kArchs[] = {
    {"llama", 1, 1, true, false},        {"qwen2moe", 1, 0, true, false},   {"qwen3moe", 1, 1, true, false},
    {"olmoe", 1, 0, true, false},        {"deepseek2", 1, -1, true, false}, {"glm4moe", 2, -1, true, false},
    {"gpt-oss", 3, 0, false, false},     {"llama4", 2, 0, false, true},     {"dbrx", 1, 1, true, false},
    {"granitemoe", 1, 1, true, false},   {"phimoe", 1, 1, true, false},     {"ernie4_5-moe", 1, 1, false, false},
    {"hunyuan-moe", 1, 1, true, false},  {"bailingmoe", 1, -1, true, false},
};

std::string arch_list() {
  std::string s;
  for (const ArchRule& a : kArchs) s += (s.empty() ? "" : ", ") + std::string(a.arch);
  return s;
}

std::string blk(int64_t layer) { return "blk." + std::to_string(layer) + "."; }

}  // namespace

std::vector<int64_t> gguf_moe_layers(const io::GgufFile& g) {
  std::vector<int64_t> layers;
  for (const std::string& n : g.tensor_names()) {
    if (n.rfind("blk.", 0) != 0 || n.size() < 24 || n.compare(n.size() - 20, 20, ".ffn_gate_inp.weight") != 0) continue;
    const std::string mid = n.substr(4, n.size() - 24);
    if (mid.empty() || mid.size() > 9 || mid.find_first_not_of("0123456789") != std::string::npos) continue;
    layers.push_back(std::stoll(mid));
  }
  std::sort(layers.begin(), layers.end());
  return layers;
}

LayerConfig gguf_layer_config(const io::GgufFile& g, int64_t layer) {
  const std::string where = "GGUF file " + g.path();
  const std::string arch = g.get_string("general.architecture").value_or("");
  const ArchRule* rule = nullptr;
  for (const ArchRule& a : kArchs)
    if (arch == a.arch) rule = &a;
  MOEKIT_CHECK(rule != nullptr, where, ": general.architecture \"", arch, "\": expected one of ", arch_list());
  const std::string p = blk(layer);
  if (!g.contains(p + "ffn_gate_inp.weight")) {
    const std::vector<int64_t> have = gguf_moe_layers(g);
    std::string list;
    for (int64_t l : have) list += (list.empty() ? "" : ", ") + std::to_string(l);
    detail::fail(where, ": layer ", layer, " has no MoE block (no tensor \"", p, "ffn_gate_inp.weight\"); MoE layers: ",
                 list.empty() ? "none" : list);
  }
  auto meta_int = [&](const char* key) { return g.get_int(arch + "." + key); };
  LayerConfig c;
  c.origin = "gguf";
  c.preset = arch;
  TopKOptions& r = c.router;
  const GgufTensor& gi = g.tensor(p + "ffn_gate_inp.weight");
  MOEKIT_CHECK(gi.n_dims == 2 || (gi.n_dims == 3 && gi.ne[2] == 1), where, ": tensor ", q(gi.name), " has ne ",
               shape_of(gi), ", expected [n_embd, n_expert]");
  r.hidden = gi.ne[0];
  r.num_experts = gi.ne[1];
  if (auto d = meta_int("embedding_length"))
    MOEKIT_CHECK(*d == r.hidden, where, ": ", arch, ".embedding_length ", *d, " but ", q(gi.name), " has n_embd ", r.hidden);
  if (auto e = meta_int("expert_count"))
    MOEKIT_CHECK(*e == r.num_experts, where, ": ", arch, ".expert_count ", *e, " but ", q(gi.name), " has ",
                 r.num_experts, " experts");
  const auto k = meta_int("expert_used_count");
  MOEKIT_CHECK(k.has_value(), where, ": metadata ", arch, ".expert_used_count (experts per token) is missing");
  r.k = *k;
  // Expert width from the tensors (separate gate / up, or llama.cpp's fused gate_up).
  const bool fused = g.contains(p + "ffn_gate_up_exps.weight");
  const GgufTensor& ge = g.tensor(p + (fused ? "ffn_gate_up_exps.weight" : "ffn_gate_exps.weight"));
  c.experts.intermediate = fused ? ge.ne[1] / 2 : ge.ne[1];
  if (auto ff = meta_int("expert_feed_forward_length"); ff && *ff > 0)
    MOEKIT_CHECK(*ff == c.experts.intermediate, where, ": ", arch, ".expert_feed_forward_length ", *ff, " but ",
                 q(ge.name), " has ne ", shape_of(ge));
  c.experts.gated = true;
  c.experts.act = Activation::silu;
  // Gating function (llama_expert_gating_func_type: 1 softmax, 2 sigmoid, 3 softmax_weight).
  const int64_t gating = meta_int("expert_gating_func").value_or(rule->gating);
  MOEKIT_CHECK(gating >= 1 && gating <= 3, where, ": ", arch, ".expert_gating_func ", gating,
               ", expected 1 (softmax), 2 (sigmoid) or 3 (softmax over the chosen logits)");
  r.score_func = gating == 2 ? ScoreFunc::sigmoid : ScoreFunc::softmax;
  r.topk_then_softmax = gating == 3;
  if (rule->weight_before_ffn) {  // llama4: chosen on the logits, weight sigmoid(logit) on the input
    r.select_on_logits = true;
    c.weight_on_input = true;
  }
  r.norm_topk_prob = rule->norm == 1 || (rule->norm == -1 && g.get_bool(arch + ".expert_weights_norm").value_or(false));
  if (r.topk_then_softmax) r.norm_topk_prob = false;  // the k weights already sum to 1
  if (rule->scale)
    if (auto s = g.get_float(arch + ".expert_weights_scale"); s && *s != 0.0) r.routed_scaling_factor = static_cast<float>(*s);
  const int64_t groups = meta_int("expert_group_count").value_or(0);
  if (groups > 1) {
    r.n_group = groups;
    r.topk_group = meta_int("expert_group_used_count").value_or(groups);
    r.group_score = GroupScore::top2_sum;  // llama.cpp scores every group by its best two
  }
  c.router_bias = g.contains(p + "exp_probs_b.bias");
  c.router_logit_bias = g.contains(p + "ffn_gate_inp.bias");
  if (arch == "gpt-oss") {
    c.experts.clamped = true;
    c.experts.glu = ClampedSwiglu{1.702f, 7.0f};
    if (auto lim = g.get_float(arch + ".swiglu_limit")) c.experts.glu.limit = static_cast<float>(*lim);
  }
  c.experts.bias = g.contains(p + "ffn_down_exps.bias");
  if (g.contains(p + "ffn_up_shexp.weight")) {
    const GgufTensor& su = g.tensor(p + "ffn_up_shexp.weight");
    c.shared = SharedExpertConfig{su.ne[1], g.contains(p + "ffn_gate_inp_shexp.weight"), "shexp", false};
  }
  c.experts.hidden = r.hidden;
  try {
    r.validate();
    c.experts.validate("experts");
    MOEKIT_CHECK(!c.shared || c.shared->intermediate >= 1, "shared expert width expected >= 1");
  } catch (const error& e) {
    detail::fail(where, ": layer ", layer, ": ", e.what());
  }
  return c;
}

TopKLayer load_gguf_layer(const io::GgufFile& g, int64_t layer, const LayerConfig& c) {
  const std::string p = blk(layer);
  const int64_t E = c.router.num_experts, d = c.hidden(), f = c.experts.intermediate;
  expect(g, p + "ffn_gate_inp.weight", {d, E});
  std::vector<float> router_w(static_cast<size_t>(E * d));
  g.read_rows_f32(p + "ffn_gate_inp.weight", 0, E, router_w.data());
  std::vector<float> bias;
  if (c.router_bias) {
    expect(g, p + "exp_probs_b.bias", {E});
    bias.resize(static_cast<size_t>(E));
    g.read_rows_f32(p + "exp_probs_b.bias", 0, 1, bias.data());
  }
  TopKRouter router(c.router, std::move(router_w), std::move(bias));
  if (c.router_logit_bias) {
    expect(g, p + "ffn_gate_inp.bias", {E});
    std::vector<float> lb(static_cast<size_t>(E));
    g.read_rows_f32(p + "ffn_gate_inp.bias", 0, 1, lb.data());
    router.set_logit_bias(std::move(lb));
  }
  // Validate every expert tensor before the bank is allocated.
  const bool fused = g.contains(p + "ffn_gate_up_exps.weight");
  if (fused) {
    expect(g, p + "ffn_gate_up_exps.weight", {d, 2 * f, E});
  } else {
    expect(g, p + "ffn_gate_exps.weight", {d, f, E});
    expect(g, p + "ffn_up_exps.weight", {d, f, E});
  }
  expect(g, p + "ffn_down_exps.weight", {f, d, E});
  if (c.experts.bias) {
    expect(g, p + "ffn_gate_exps.bias", {f, E});
    expect(g, p + "ffn_up_exps.bias", {f, E});
    expect(g, p + "ffn_down_exps.bias", {d, E});
  }
  FfnShape shape = c.experts;
  shape.hidden = d;
  // Q4_0 blocks kept as they are: int4 / w4a8 with f16 group scales repack the dequantised
  // values into the same scales and codes (PackOptions::f16_scales).
  auto pack_for = [&](std::initializer_list<std::string> names) {
    kernels::PackOptions o = c.pack;
    bool q4_0 = o.type == kernels::WeightType::int4 || o.type == kernels::WeightType::w4a8;
    for (const std::string& n : names)
      q4_0 = q4_0 && g.tensor(n).type == static_cast<uint32_t>(io::GgmlType::q4_0);
    o.f16_scales = q4_0;
    return o;
  };
  FfnBank bank(E, shape,
               fused ? pack_for({p + "ffn_gate_up_exps.weight", p + "ffn_down_exps.weight"})
                     : pack_for({p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight", p + "ffn_down_exps.weight"}));
  std::vector<float> buf(static_cast<size_t>(3 * f * d)), b(static_cast<size_t>(2 * f + d));
  float* gate = buf.data();
  float* up = gate + f * d;
  float* down = up + f * d;
  for (int64_t e = 0; e < E; ++e) {
    if (fused) {  // rows [0, f) of expert e's [2f, d] are the gate, [f, 2f) the up projection
      g.read_rows_f32(p + "ffn_gate_up_exps.weight", e * 2 * f, 2 * f, gate);
    } else {
      g.read_rows_f32(p + "ffn_gate_exps.weight", e * f, f, gate);
      g.read_rows_f32(p + "ffn_up_exps.weight", e * f, f, up);
    }
    g.read_rows_f32(p + "ffn_down_exps.weight", e * d, d, down);
    bank.set_expert(e, gate, up, down);
    if (c.experts.bias) {
      g.read_rows_f32(p + "ffn_gate_exps.bias", e, 1, b.data());
      g.read_rows_f32(p + "ffn_up_exps.bias", e, 1, b.data() + f);
      g.read_rows_f32(p + "ffn_down_exps.bias", e, 1, b.data() + 2 * f);
      bank.set_expert_bias(e, b.data(), b.data() + f, b.data() + 2 * f);
    }
  }
  std::vector<SharedExpert> shared;
  if (c.shared) {
    const int64_t fs = c.shared->intermediate;
    expect(g, p + "ffn_gate_shexp.weight", {d, fs});
    expect(g, p + "ffn_up_shexp.weight", {d, fs});
    expect(g, p + "ffn_down_shexp.weight", {fs, d});
    FfnBank sb(1, FfnShape{d, fs, true, Activation::silu},
               pack_for({p + "ffn_gate_shexp.weight", p + "ffn_up_shexp.weight", p + "ffn_down_shexp.weight"}));
    std::vector<float> s(static_cast<size_t>(3 * fs * d));
    g.read_rows_f32(p + "ffn_gate_shexp.weight", 0, fs, s.data());
    g.read_rows_f32(p + "ffn_up_shexp.weight", 0, fs, s.data() + fs * d);
    g.read_rows_f32(p + "ffn_down_shexp.weight", 0, d, s.data() + 2 * fs * d);
    sb.set_expert(0, s.data(), s.data() + fs * d, s.data() + 2 * fs * d);
    SharedExpert se{std::move(sb), {}};
    if (c.shared->gated) {  // qwen2moe: ne [n_embd] or [n_embd, 1]
      const GgufTensor& t = g.tensor(p + "ffn_gate_inp_shexp.weight");
      MOEKIT_CHECK(t.ne[0] == d && t.rows() == 1, "GGUF file ", g.path(), ": tensor ", q(t.name), " has ne ",
                   shape_of(t), ", expected [", d, "]");
      se.gate.resize(static_cast<size_t>(d));
      g.read_rows_f32(t.name, 0, 1, se.gate.data());
    }
    shared.push_back(std::move(se));
  }
  TopKLayer out(std::move(router), std::move(bank), std::move(shared));
  out.set_weight_on_input(c.weight_on_input);
  return out;
}

std::unique_ptr<AnyLayer> load_any_layer_gguf(const io::GgufFile& g, int64_t layer, const LayerConfig& c) {
  return detail::wrap_topk(c, load_gguf_layer(g, layer, c));
}

}  // namespace moekit
