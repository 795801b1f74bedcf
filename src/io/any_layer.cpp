// SPDX-License-Identifier: Apache-2.0
// The router-family table behind AnyLayer, the shared builder helpers, and the top-k family.
#include <array>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "layer_registry.hpp"
#include "moekit/io/packed_layer.hpp"
#include "moekit/io/model.hpp"

namespace moekit {
namespace detail {
namespace {

// Deterministic unit-variance values: uniform on [-sqrt(3), sqrt(3)) from splitmix64.
void fill_uniform(float* p, int64_t n, double scale, uint64_t& state) {
  for (int64_t i = 0; i < n; ++i) {
    state += 0x9E3779B97F4A7C15ull;
    const double u = static_cast<double>(splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
    p[i] = static_cast<float>((2.0 * u - 1.0) * 1.7320508075688772 * scale);
  }
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

}  // namespace

std::vector<float> tensor_or_random(const io::TensorSource* weights, const std::string& name,
                                    const std::vector<int64_t>& shape, uint64_t& seed, double scale) {
  if (weights != nullptr) return weights->read_f32(name, shape);
  std::vector<float> v(static_cast<size_t>(numel(shape)));
  fill_uniform(v.data(), numel(shape), scale, seed);
  return v;
}

FfnShape routed_shape(const LayerConfig& c) {
  FfnShape s = c.experts;
  s.hidden = c.hidden();
  return s;
}

namespace {

// One expert tensor: its name and HF shape.
struct ExpertTensor {
  std::string name;
  std::vector<int64_t> shape;
};

// The gate, up and down tensors of the FFN expert under prefix `p` (gate first; a plain FFN
// has none).
std::array<ExpertTensor, 3> expert_tensors(const std::string& p, ExpertNames names, int64_t d, int64_t f) {
  const bool mixtral = names == ExpertNames::mixtral;
  return {ExpertTensor{p + (mixtral ? "w1" : "gate_proj") + ".weight", {f, d}},
          ExpertTensor{p + (mixtral ? "w3" : "up_proj") + ".weight", {f, d}},
          ExpertTensor{p + (mixtral ? "w2" : "down_proj") + ".weight", {d, f}}};
}

// A fused layout's tensors under block prefix `p` for E experts: gate (or gate + up), up
// (empty when fused with the gate), down; with their full shapes.
std::array<ExpertTensor, 3> fused_tensors(const std::string& p, ExpertNames names, int64_t E, int64_t d, int64_t f) {
  switch (names) {
    case ExpertNames::granite:
      return {ExpertTensor{p + "input_linear.weight", {E, 2 * f, d}}, ExpertTensor{},
              ExpertTensor{p + "output_linear.weight", {E, d, f}}};
    case ExpertNames::llama4:
      return {ExpertTensor{p + "experts.gate_up_proj", {E, d, 2 * f}}, ExpertTensor{},
              ExpertTensor{p + "experts.down_proj", {E, f, d}}};
    case ExpertNames::gpt_oss:
      return {ExpertTensor{p + "experts.gate_up_proj", {E, d, 2 * f}}, ExpertTensor{},
              ExpertTensor{p + "experts.down_proj", {E, f, d}}};
    default:  // dbrx
      return {ExpertTensor{p + "experts.mlp.w1", {E * f, d}}, ExpertTensor{p + "experts.mlp.v1", {E * f, d}},
              ExpertTensor{p + "experts.mlp.w2", {E * f, d}}};
  }
}

// gpt-oss's MXFP4 form: `<name>_blocks` [E, rows, cols / 32, 16] for gate_up (rows 2f, cols d)
// and down (rows d, cols f).
std::vector<int64_t> mxfp4_blocks_shape(int64_t E, int64_t rows, int64_t cols) { return {E, rows, cols / 32, 16}; }

// Whether the gpt-oss experts under block prefix `p` are stored as MXFP4 (the released form).
bool gpt_oss_mxfp4(const io::TensorSource& w, const std::string& p) {
  return w.contains(p + "experts.gate_up_proj_blocks");
}

// Splits gpt-oss's interleaved pairs: v [2f] (gate 2j, up 2j + 1) into gate [f], up [f].
void deinterleave(const float* v, int64_t f, float* gate, float* up) {
  for (int64_t j = 0; j < f; ++j) {
    gate[j] = v[2 * j];
    up[j] = v[2 * j + 1];
  }
}

// dst [r, c] = src [c, r] for src [c, r] read with row stride `lda` from column offset `c0`.
void transpose_into(const float* src, int64_t rows_src, int64_t lda, int64_t c0, int64_t cols, float* dst) {
  for (int64_t i = 0; i < rows_src; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * rows_src + i] = src[i * lda + c0 + j];
}

// Expert e of a fused layout into gate [f, d], up [f, d], down [d, f] (HF's [out, in]).
void load_fused(const io::TensorSource& w, const std::string& p, ExpertNames names, int64_t E, int64_t e, int64_t d,
                int64_t f, float* gate, float* up, float* down, std::vector<float>& tmp) {
  const auto t = fused_tensors(p, names, E, d, f);
  const int64_t fd = f * d;
  switch (names) {
    case ExpertNames::granite:  // rows [0, f) gate, [f, 2f) up: contiguous
      w.read_f32_range_into(t[0].name, t[0].shape, e * 2 * fd, 2 * fd, gate);  // up follows gate
      w.read_f32_range_into(t[2].name, t[2].shape, e * fd, fd, down);
      break;
    case ExpertNames::llama4:  // x [1, d] @ gate_up [d, 2f]; h [1, f] @ down [f, d]
      tmp.resize(static_cast<size_t>(2 * fd));
      w.read_f32_range_into(t[0].name, t[0].shape, e * 2 * fd, 2 * fd, tmp.data());
      transpose_into(tmp.data(), d, 2 * f, 0, f, gate);
      transpose_into(tmp.data(), d, 2 * f, f, f, up);
      w.read_f32_range_into(t[2].name, t[2].shape, e * fd, fd, tmp.data());
      transpose_into(tmp.data(), f, d, 0, d, down);
      break;
    case ExpertNames::gpt_oss:
      tmp.resize(static_cast<size_t>(2 * fd));
      if (gpt_oss_mxfp4(w, p)) {  // rows are outputs: row 2j gate unit j, row 2j + 1 up unit j
        w.read_mxfp4_rows_into(p + "experts.gate_up_proj", mxfp4_blocks_shape(E, 2 * f, d), e * 2 * f, 2 * f,
                               tmp.data());
        for (int64_t j = 0; j < f; ++j) {
          std::copy_n(tmp.data() + 2 * j * d, d, gate + j * d);
          std::copy_n(tmp.data() + (2 * j + 1) * d, d, up + j * d);
        }
        w.read_mxfp4_rows_into(p + "experts.down_proj", mxfp4_blocks_shape(E, d, f), e * d, d, down);
      } else {  // x [1, d] @ gate_up [d, 2f] (columns interleaved); h [1, f] @ down [f, d]
        w.read_f32_range_into(t[0].name, t[0].shape, e * 2 * fd, 2 * fd, tmp.data());
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < f; ++j) {
            gate[j * d + i] = tmp[static_cast<size_t>(i * 2 * f + 2 * j)];
            up[j * d + i] = tmp[static_cast<size_t>(i * 2 * f + 2 * j + 1)];
          }
        w.read_f32_range_into(t[2].name, t[2].shape, e * fd, fd, tmp.data());
        transpose_into(tmp.data(), f, d, 0, d, down);
      }
      break;
    default:  // dbrx: w1 / v1 rows e f.. are gate / up [f, d]; w2's are down transposed
      w.read_f32_range_into(t[0].name, t[0].shape, e * fd, fd, gate);
      w.read_f32_range_into(t[1].name, t[1].shape, e * fd, fd, up);
      tmp.resize(static_cast<size_t>(fd));
      w.read_f32_range_into(t[2].name, t[2].shape, e * fd, fd, tmp.data());
      transpose_into(tmp.data(), f, d, 0, d, down);
      break;
  }
}

// The bias tensors of expert e (HF names; fused gpt-oss: the [E, 2f] / [E, d] stacks) with
// their shapes: gate (or gate + up interleaved), up (empty when interleaved), down.
std::array<ExpertTensor, 3> bias_tensors(const std::string& p, ExpertNames names, int64_t E, int64_t d, int64_t f) {
  if (names == ExpertNames::gpt_oss)
    return {ExpertTensor{p + "experts.gate_up_proj_bias", {E, 2 * f}}, ExpertTensor{},
            ExpertTensor{p + "experts.down_proj_bias", {E, d}}};
  const bool mixtral = names == ExpertNames::mixtral;
  return {ExpertTensor{p + (mixtral ? "w1" : "gate_proj") + ".bias", {f}},
          ExpertTensor{p + (mixtral ? "w3" : "up_proj") + ".bias", {f}},
          ExpertTensor{p + (mixtral ? "w2" : "down_proj") + ".bias", {d}}};
}

// Reads (or draws) expert e's biases into the bank (shape().bias only); `p` is the expert's
// prefix, or the block prefix for gpt-oss's stacks.
// `slot`: the bank's expert to set; `e` of `E`: the expert in the stacked (gpt-oss) tensors.
void load_biases(FfnBank& bank, int64_t slot, int64_t e, int64_t E, const io::TensorSource* weights, const std::string& p,
                 ExpertNames names, uint64_t& seed) {
  const FfnShape& sh = bank.shape();
  if (!sh.bias) return;
  const int64_t d = sh.hidden, f = sh.intermediate;
  std::vector<float> gate(static_cast<size_t>(f)), up(static_cast<size_t>(f)), down(static_cast<size_t>(d));
  if (weights == nullptr) {
    fill_uniform(gate.data(), f, 0.1, seed);
    fill_uniform(up.data(), f, 0.1, seed);
    fill_uniform(down.data(), d, 0.1, seed);
  } else if (names == ExpertNames::gpt_oss) {
    const auto t = bias_tensors(p, names, E, d, f);
    std::vector<float> both(static_cast<size_t>(2 * f));
    weights->read_f32_range_into(t[0].name, t[0].shape, e * 2 * f, 2 * f, both.data());
    deinterleave(both.data(), f, gate.data(), up.data());
    weights->read_f32_range_into(t[2].name, t[2].shape, e * d, d, down.data());
  } else {
    const auto t = bias_tensors(p, names, E, d, f);
    if (sh.gated) weights->read_f32_into(t[0].name, t[0].shape, gate.data());
    weights->read_f32_into(t[1].name, t[1].shape, up.data());
    weights->read_f32_into(t[2].name, t[2].shape, down.data());
  }
  bank.set_expert_bias(slot, gate.data(), up.data(), down.data());
}

}  // namespace

void load_ffn_into(FfnBank& bank, int64_t e, const io::TensorSource* weights, const std::string& p, ExpertNames names,
                   uint64_t& seed, std::vector<float>& buf) {
  const FfnShape& shape = bank.shape();
  const int64_t d = shape.hidden, f = shape.intermediate;
  buf.resize(static_cast<size_t>(3 * f * d));
  float* gate = buf.data();
  float* up = gate + f * d;
  float* down = up + f * d;
  if (weights != nullptr) {
    const auto t = expert_tensors(p, names, d, f);
    float* dst[3] = {gate, up, down};
    for (int i = shape.gated ? 0 : 1; i < 3; ++i) weights->read_f32_into(t[i].name, t[i].shape, dst[i]);
  } else {
    fill_uniform(gate, 2 * f * d, 1.0 / std::sqrt(static_cast<double>(d)), seed);
    fill_uniform(down, d * f, 1.0 / std::sqrt(static_cast<double>(f)), seed);
  }
  bank.set_expert(e, gate, up, down);
  load_biases(bank, e, e, bank.num_experts(), weights, p, names, seed);
}

void check_experts(const io::TensorSource& weights, const std::string& base, bool indexed, int64_t count,
                   const FfnShape& shape, ExpertNames names) {
  const int64_t d = shape.hidden, f = shape.intermediate;
  if (fused_experts(names)) {  // `base` is the block prefix; all gated (checked by the config)
    MOEKIT_CHECK(shape.gated && indexed, "fused expert tensors hold gated experts only");
    if (names == ExpertNames::gpt_oss && gpt_oss_mxfp4(weights, base)) {
      MOEKIT_CHECK(d % 32 == 0 && f % 32 == 0, "gpt-oss MXFP4 experts: hidden size ", d, " and intermediate size ", f,
                   " expected multiples of 32 (the block size)");
      for (const auto& [name, rows, cols] : {std::tuple{std::string("experts.gate_up_proj"), 2 * f, d},
                                             std::tuple{std::string("experts.down_proj"), d, f}}) {
        const auto bs = mxfp4_blocks_shape(count, rows, cols);
        weights.expect_shape(base + name + "_blocks", bs);
        weights.expect_shape(base + name + "_scales", {bs[0], bs[1], bs[2]});
      }
    } else {
      for (const ExpertTensor& t : fused_tensors(base, names, count, d, f))
        if (!t.name.empty()) weights.expect_shape(t.name, t.shape);
    }
    if (shape.bias)
      for (const ExpertTensor& t : bias_tensors(base, names, count, d, f))
        if (!t.name.empty() && names == ExpertNames::gpt_oss) weights.expect_shape(t.name, t.shape);
    return;
  }
  for (int64_t e = 0; e < count; ++e) {
    const auto t = expert_tensors(indexed ? base + std::to_string(e) + "." : base, names, d, f);
    for (int i = shape.gated ? 0 : 1; i < 3; ++i) weights.expect_shape(t[i].name, t[i].shape);
  }
}

FfnBank ffn_bank(const io::TensorSource* weights, const std::string& base, bool indexed, int64_t count,
                 const FfnShape& shape, ExpertNames names, uint64_t& seed, const kernels::PackOptions& pack) {
  // Validate, then allocate: every expert tensor is found with the configured shape before
  // the bank (count x 3 x d x f values) is allocated, so memory follows what the file holds.
  if (weights != nullptr) check_experts(*weights, base, indexed, count, shape, names);
  if (fused_experts(names)) {  // `base` is the block prefix
    const int64_t d = shape.hidden, f = shape.intermediate;
    MOEKIT_CHECK(shape.gated && indexed, "fused expert tensors hold gated experts only");
    FfnBank bank(count, shape, pack);
    std::vector<float> buf(static_cast<size_t>(3 * f * d)), tmp;
    for (int64_t e = 0; e < count; ++e) {
      float* gate = buf.data();
      if (weights != nullptr) {
        load_fused(*weights, base, names, count, e, d, f, gate, gate + f * d, gate + 2 * f * d, tmp);
      } else {
        fill_uniform(gate, 2 * f * d, 1.0 / std::sqrt(static_cast<double>(d)), seed);
        fill_uniform(gate + 2 * f * d, d * f, 1.0 / std::sqrt(static_cast<double>(f)), seed);
      }
      bank.set_expert(e, gate, gate + f * d, gate + 2 * f * d);
      load_biases(bank, e, e, count, weights, base, names, seed);
    }
    return bank;
  }
  FfnBank bank(count, shape, pack);
  std::vector<float> buf;
  for (int64_t e = 0; e < count; ++e)
    load_ffn_into(bank, e, weights, indexed ? base + std::to_string(e) + "." : base, names, seed, buf);
  return bank;
}

FfnBank load_one_expert(const io::TensorSource& weights, const std::string& base, int64_t count, int64_t e,
                        const FfnShape& shape, ExpertNames names, const kernels::PackOptions& pack) {
  MOEKIT_CHECK(e >= 0 && e < count, "load_expert: expert expected in [0, ", count, "), got ", e);
  FfnBank bank(1, shape, pack);
  uint64_t seed = 0;
  std::vector<float> buf, tmp;
  if (fused_experts(names)) {
    const int64_t d = shape.hidden, f = shape.intermediate;
    buf.resize(static_cast<size_t>(3 * f * d));
    float* gate = buf.data();
    load_fused(weights, base, names, count, e, d, f, gate, gate + f * d, gate + 2 * f * d, tmp);
    bank.set_expert(0, gate, gate + f * d, gate + 2 * f * d);
    load_biases(bank, 0, e, count, &weights, base, names, seed);
    return bank;
  }
  load_ffn_into(bank, 0, &weights, base + std::to_string(e) + ".", names, seed, buf);
  return bank;
}

double routed_expert_bytes(const LayerConfig& c, double count) {
  return count * static_cast<double>(routed_shape(c).weights_per_expert()) *
         static_cast<double>(kernels::weight_type_bits(c.pack.type)) / 8.0;
}

double shared_expert_bytes(const LayerConfig& c) {
  if (!c.shared) return 0.0;
  const double d = static_cast<double>(c.hidden());
  return (c.experts.gated ? 3.0 : 2.0) * d * static_cast<double>(c.shared->intermediate) *
             static_cast<double>(kernels::weight_type_bits(c.pack.type)) / 8.0 +
         (c.shared->gated ? 4.0 * d : 0.0) + (c.shared->residual_coefficient ? 4.0 * (2.0 * d + 2.0) : 0.0);
}

std::vector<SharedExpert> shared_experts(const LayerConfig& c, const io::TensorSource* weights,
                                         const std::string& prefix, uint64_t& seed) {
  std::vector<SharedExpert> out;
  if (!c.shared) return out;
  const FfnShape s{c.hidden(), c.shared->intermediate, c.experts.gated, c.experts.act};
  SharedExpert se{ffn_bank(weights, prefix + c.shared->names, false, 1, s, ExpertNames::hf, seed, c.pack), {}};
  se.scale = c.shared->scale;
  if (c.shared->gated)
    se.gate = tensor_or_random(weights, prefix + "shared_expert_gate.weight", {1, c.hidden()}, seed,
                               1.0 / std::sqrt(static_cast<double>(c.hidden())));
  if (c.shared->residual_coefficient) {  // DeepSpeed PR-MoE: nn.Linear(d, 2) `coefficient`
    se.coefficient = tensor_or_random(weights, prefix + "coefficient.weight", {2, c.hidden()}, seed,
                                      1.0 / std::sqrt(static_cast<double>(c.hidden())));
    se.coefficient_bias = tensor_or_random(weights, prefix + "coefficient.bias", {2}, seed, 0.1);
  }
  out.push_back(std::move(se));
  return out;
}

// A built top-k layer as an AnyLayer.
std::unique_ptr<AnyLayer> wrap_topk(const LayerConfig& c, TopKLayer layer) {
  const int64_t k = c.router.k;
  const double router_values =
      static_cast<double>(c.router.num_experts * (c.hidden() + (c.router_bias ? 1 : 0) + (c.router_logit_bias ? 1 : 0)));
  const double resident = resident_bytes_of(layer.experts(), layer.shared_experts(), router_values);
  return std::make_unique<SparseAnyLayer<TopKRouter, FfnBank>>(
      c, std::move(layer), [k](const TopKLayer&, const Workspace& ws, const Batch&) { return topk_outputs(ws.plan, k); },
      resident);
}


namespace {

// ---------------------------------------------------------------- the top-k family
std::unique_ptr<AnyLayer> build_topk(const nlohmann::json&, const LayerConfig& c, const io::TensorSource* weights,
                                     const std::string& prefix, uint64_t seed) {
  return wrap_topk(c, weights != nullptr ? load_layer(c, *weights, prefix) : random_layer(c, seed));
}

double weight_bytes_topk(const nlohmann::json&, const LayerConfig& c) { return layer_weight_bytes(c); }

// The families this build knows: topk, then one entry per line of router_families.def.
// Families other than topk parse their `router` object in `validate`; topk's options are
// parsed with the presets in config.cpp.
const RouterFamily kFamilies[] = {
    {"topk", nullptr, build_topk, weight_bytes_topk},
#define MOEKIT_ROUTER_FAMILY(name) {#name, validate_##name, build_##name##_layer, weight_bytes_##name},
#include "router_families.def"
#undef MOEKIT_ROUTER_FAMILY
};

}  // namespace

const RouterFamily* find_router_family(const std::string& type) {
  for (const RouterFamily& f : kFamilies)
    if (type == f.type) return &f;
  return nullptr;
}

std::string router_family_list() {
  std::string s;
  for (const RouterFamily& f : kFamilies) s += (s.empty() ? "" : ", ") + std::string(f.type);
  return s;
}

}  // namespace detail

namespace {
std::unique_ptr<AnyLayer> build_any(const LayerConfig& c, const io::TensorSource* weights, const std::string& prefix,
                                    uint64_t seed) {
  const detail::RouterFamily* f = detail::find_router_family(c.router_type);
  MOEKIT_CHECK(f != nullptr, "router.type: expected one of ", detail::router_family_list(), ", got \"", c.router_type, "\"");
  const nlohmann::json router = c.router_json.empty() ? nlohmann::json::object() : nlohmann::json::parse(c.router_json);
  return f->build(router, c, weights, prefix, seed);
}
}  // namespace

std::unique_ptr<AnyLayer> load_any_layer(const LayerConfig& c, const io::TensorSource& weights, const std::string& prefix) {
  return build_any(c, &weights, prefix, 0);
}

std::unique_ptr<AnyLayer> random_any_layer(const LayerConfig& c, uint64_t seed) {
  return build_any(c, nullptr, "", seed);
}

std::vector<std::string> router_types() {
  std::vector<std::string> v;
  for (const auto& f : detail::kFamilies) v.emplace_back(f.type);
  return v;
}

std::unique_ptr<AnyLayer> load_any_layer_packed(const std::string& path) {
  LayerConfig c;
  TopKLayer layer = load_packed_layer(path, &c);
  return detail::wrap_topk(c, std::move(layer));
}
}  // namespace moekit
