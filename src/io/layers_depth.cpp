// SPDX-License-Identifier: Apache-2.0
// `moekit run` / `bench` builders of the depth and skip routers (ROUTING.md section 5): mod,
// gamma_mod, token_prune, drllm, mor. The wrapped block is the config's FFN expert, read as
// a one-expert bank `experts.0.*`.
#include <cmath>

#include "json_reader.hpp"
#include "layer_registry.hpp"
#include "moekit/routers/depth.hpp"
#include "moekit/layers/drllm.hpp"
#include "moekit/layers/mor.hpp"

namespace moekit::detail {
namespace {

template <class E>
E parse_enum(Reader& r, const std::string& key, E def, std::initializer_list<std::pair<const char*, E>> names) {
  std::string list;
  const char* def_name = "";
  for (const auto& [n, v] : names) {
    if (v == def) def_name = n;
    list += (list.empty() ? "" : ", ") + std::string(n);
  }
  const std::string s = r.string(key, def_name);
  for (const auto& [n, v] : names)
    if (s == n) return v;
  fail(r.where(), ".", key, ": expected one of ", list, "; got \"", s, "\"");
}

DepthActivation parse_depth_act(Reader& r, DepthActivation def) {
  return parse_enum(r, "activation", def,
                    {{"raw", DepthActivation::raw}, {"sigmoid", DepthActivation::sigmoid}, {"tanh", DepthActivation::tanh}});
}

MoDOptions mod_options(const json& j, const LayerConfig& c) {
  return parse_router_options<MoDOptions>(j, [&](Reader& r, MoDOptions& o) {
    o.hidden = c.hidden();
    o.ratio = r.number("ratio", o.ratio);
    o.activation = parse_depth_act(r, o.activation);
    o.alpha = r.number("alpha", o.alpha);
    o.mode = parse_enum(r, "mode", o.mode,
                        {{"capacity", MoDMode::capacity}, {"threshold", MoDMode::threshold}, {"aux_predictor", MoDMode::aux_predictor}});
    o.threshold = r.number("threshold", o.threshold);
    o.aux_hidden = r.integer("aux_hidden", o.aux_hidden);
  });
}

// `input_norm` (the router reads input_layernorm(x)) is not an option of the router itself
// (GammaModRouter::set_input_norm takes the weight): returned through `input_norm`.
GammaModOptions gamma_options(const json& j, const LayerConfig& c, bool* input_norm = nullptr) {
  return parse_router_options<GammaModOptions>(j, [&](Reader& r, GammaModOptions& o) {
    const bool in = r.boolean("input_norm", false);
    if (input_norm) *input_norm = in;
    o.rms_norm_eps = r.number("rms_norm_eps", o.rms_norm_eps);
    o.hidden = c.hidden();
    o.ratio = r.number("ratio", o.ratio);
    o.phase = parse_enum(r, "phase", o.phase,
                         {{"capacity", GammaModPhase::capacity}, {"prefill", GammaModPhase::prefill}, {"decode", GammaModPhase::decode}});
    o.prefill_threshold = r.number("prefill_threshold", o.prefill_threshold);
    o.decode_threshold = r.number("decode_threshold", o.decode_threshold);
    o.must_keep_at_inference = r.boolean("must_keep_at_inference", o.must_keep_at_inference);
  });
}

TokenPruneOptions prune_options(const json& j, const LayerConfig& c) {
  return parse_router_options<TokenPruneOptions>(j, [&](Reader& r, TokenPruneOptions& o) {
    o.hidden = c.hidden();
    o.tau = r.number("tau", o.tau);
    if (r.has("sparsity")) o.sparsity = r.number("sparsity", 0.0);
    r.mark("sparsity");
    o.input = parse_enum(r, "input", o.input, {{"hidden", TokenPruneInput::hidden}, {"features", TokenPruneInput::features}});
    o.feature_hidden = r.integer("feature_hidden", o.feature_hidden);
    if (r.has("feature_sparsity")) o.feature_sparsity = r.number("feature_sparsity", 0.0);
    r.mark("feature_sparsity");
  });
}

DrLlmOptions drllm_options(const json& j, const LayerConfig& c) {
  return parse_router_options<DrLlmOptions>(j, [&](Reader& r, DrLlmOptions& o) {
    o.hidden = c.hidden();
    o.bottleneck = r.integer("bottleneck", o.bottleneck);
    o.windows = r.integer("windows", o.windows);
    if (r.has("router_penalty")) o.router_penalty = r.number("router_penalty", 0.0);
    r.mark("router_penalty");
  });
}

MoROptions mor_options(const json& j, const LayerConfig& c) {
  return parse_router_options<MoROptions>(j, [&](Reader& r, MoROptions& o) {
    o.hidden = c.hidden();
    o.num_recursions = r.integer("num_recursions", o.num_recursions);
    o.act = parse_enum(r, "act", o.act, {{"sigmoid", MoRActivation::sigmoid}, {"tanh", MoRActivation::tanh}, {"raw", MoRActivation::raw}});
    o.alpha = r.number("alpha", o.alpha);
    o.block_residual = r.boolean("block_residual", o.block_residual);
    if (r.has("capacity_factors")) {
      const json& a = r.raw("capacity_factors");
      MOEKIT_CHECK(a.is_array(), "router.capacity_factors: expected an array of numbers, got ", excerpt(a));
      for (const json& v : a) {
        MOEKIT_CHECK(v.is_number(), "router.capacity_factors: expected numbers, got ", excerpt(v));
        o.capacity_factors.push_back(v.get<double>());
      }
    }
    r.mark("capacity_factors");
  });
}

FfnBank block_of(const LayerConfig& c, const io::TensorSource* w, const std::string& prefix, uint64_t& seed) {
  return ffn_bank(w, prefix + "experts.", true, 1, routed_shape(c), c.expert_names, seed, c.pack);
}

// selected U8 [T] and router_weights F32 [T] of a one-expert plan.
std::vector<NamedTensor> depth_outputs(const RoutingPlan& plan, const std::vector<float>& values) {
  const int64_t T = plan.num_tokens();
  std::vector<uint8_t> sel(static_cast<size_t>(T), 0);
  depth_selected(plan, sel);
  std::vector<float> w(static_cast<size_t>(T), 0.0f);
  for (int64_t t = 0; t < T && static_cast<size_t>(t) < values.size(); ++t) w[static_cast<size_t>(t)] = values[static_cast<size_t>(t)];
  return {NamedTensor::of("selected", io::DType::U8, {T}, sel), NamedTensor::of("router_weights", io::DType::F32, {T}, w)};
}

template <class R>
std::unique_ptr<AnyLayer> sparse_depth(const LayerConfig& c, R router, FfnBank block, double router_values) {
  const double resident = resident_bytes_of(block, {}, router_values);
  SparseLayer<R, FfnBank> layer(std::move(router), std::move(block));
  return std::make_unique<SparseAnyLayer<R, FfnBank>>(
      c, std::move(layer),
      [](const SparseLayer<R, FfnBank>&, const Workspace& ws, const Batch&) { return depth_outputs(ws.plan, ws.router.values); },
      resident);
}

std::unique_ptr<AnyLayer> build_mod(const json& j, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t seed) {
  const MoDOptions o = mod_options(j, c);
  uint64_t s = splitmix64(seed);
  auto weight = tensor_or_random(w, p + "router.weight", {1, c.hidden()}, s, scale_of(c));
  if (o.aux_hidden > 0) {  // the MoD paper's MLP predictor, nn.Sequential(Linear, ReLU, Linear)
    const int64_t h = o.aux_hidden;
    MoDAuxMlp mlp;
    mlp.w1 = tensor_or_random(w, p + "router.aux.0.weight", {h, c.hidden()}, s, scale_of(c));
    mlp.b1 = tensor_or_random(w, p + "router.aux.0.bias", {h}, s, 0.1);
    mlp.w2 = tensor_or_random(w, p + "router.aux.2.weight", {1, h}, s, 1.0 / std::sqrt(static_cast<double>(h)));
    mlp.b2 = tensor_or_random(w, p + "router.aux.2.bias", {1}, s, 0.1);
    const double rv = static_cast<double>(weight.size() + mlp.w1.size() + mlp.b1.size() + mlp.w2.size() + 1);
    return sparse_depth(c, MoDRouter(o, std::move(weight), std::move(mlp)), block_of(c, w, p, s), rv);
  }
  std::vector<float> aux;
  if (o.mode == MoDMode::aux_predictor) aux = tensor_or_random(w, p + "router.aux.weight", {1, c.hidden()}, s, scale_of(c));
  const double rv = static_cast<double>(weight.size() + aux.size());
  return sparse_depth(c, MoDRouter(o, std::move(weight), std::move(aux)), block_of(c, w, p, s), rv);
}

std::unique_ptr<AnyLayer> build_gamma(const json& j, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t seed) {
  bool input_norm = false;
  const GammaModOptions o = gamma_options(j, c, &input_norm);
  uint64_t s = splitmix64(seed);
  auto weight = tensor_or_random(w, p + "router.weight", {2, c.hidden()}, s, scale_of(c));
  const double rv = static_cast<double>(weight.size()) + (input_norm ? static_cast<double>(c.hidden()) : 0.0);
  GammaModRouter router(o, std::move(weight));
  if (input_norm) router.set_input_norm(tensor_or_random(w, p + "input_layernorm.weight", {c.hidden()}, s, 0.5));
  return sparse_depth(c, std::move(router), block_of(c, w, p, s), rv);
}

std::unique_ptr<AnyLayer> build_prune(const json& j, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t seed) {
  const TokenPruneOptions o = prune_options(j, c);
  uint64_t s = splitmix64(seed);
  if (o.input == TokenPruneInput::features) {  // FTP's feature router: a [4 -> h -> 1] MLP
    const int64_t h = o.feature_hidden;
    auto w1 = tensor_or_random(w, p + "router.mlp.0.weight", {h, 4}, s, 0.5);
    auto b1 = tensor_or_random(w, p + "router.mlp.0.bias", {h}, s, 0.5);
    auto w2 = tensor_or_random(w, p + "router.mlp.2.weight", {1, h}, s, 1.0 / std::sqrt(static_cast<double>(h)));
    auto b2 = tensor_or_random(w, p + "router.mlp.2.bias", {1}, s, 0.1);
    const double rv = static_cast<double>(6 * h + 1);
    return sparse_depth(c, TokenPruneRouter(o, std::move(w1), std::move(b1), std::move(w2), std::move(b2)),
                        block_of(c, w, p, s), rv);
  }
  auto weight = tensor_or_random(w, p + "router.weight", {1, c.hidden()}, s, scale_of(c));
  const double rv = static_cast<double>(weight.size());
  return sparse_depth(c, TokenPruneRouter(o, std::move(weight)), block_of(c, w, p, s), rv);
}

// ---- Dr.LLM and MoR run their own layers (several passes through SparseLayer::forward_plan).
class DrLlmAnyLayer final : public AnyLayer {
 public:
  DrLlmAnyLayer(LayerConfig c, DrLlmLayer<FfnBank> layer, double resident)
      : config_(std::move(c)), layer_(std::move(layer)), resident_(resident) {}
  const LayerConfig& config() const noexcept override { return config_; }
  void forward(const Batch& batch, const float* hidden, float* out, int threads) override {
    batch_ = batch;
    layer_.forward(batch, hidden, out, ws_, threads);
  }
  std::vector<NamedTensor> outputs() const override {
    auto out = depth_outputs(ws_.layer.plan, ws_.layer.router.values);
    out.push_back(NamedTensor::of("repeats", io::DType::I32, {static_cast<int64_t>(ws_.repeats.size())}, ws_.repeats));
    return out;
  }
  double executed_flops() const override {
    double runs = 0;
    for (int64_t s = 0; s < batch_.num_sequences(); ++s) {
      int64_t n = 0;
      for (int64_t t = batch_.sequence_begin(s); t < batch_.sequence_end(s); ++t) n += !batch_.is_padding(t);
      runs += static_cast<double>(ws_.repeats[static_cast<size_t>(s)]) * static_cast<double>(n);
    }
    return runs * layer_.block().flops_per_row() + layer_.router().flops(batch_);
  }
  double expert_bytes() const override {
    for (int32_t r : ws_.repeats)
      if (r > 0) return layer_.block().weight_bytes_per_expert();
    return 0.0;
  }
  double resident_bytes() const override { return resident_; }

 private:
  LayerConfig config_;
  DrLlmLayer<FfnBank> layer_;
  double resident_;
  DrLlmWorkspace ws_;
  Batch batch_;
};

std::unique_ptr<AnyLayer> build_drllm(const json& j, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t seed) {
  const DrLlmOptions o = drllm_options(j, c);
  uint64_t s = splitmix64(seed);
  const int64_t d = c.hidden(), b = o.bottleneck;
  auto w0 = tensor_or_random(w, p + "router.0.weight", {b, d}, s, scale_of(c));
  auto b0 = tensor_or_random(w, p + "router.0.bias", {b}, s, 0.01);
  auto w2 = tensor_or_random(w, p + "router.2.weight", {3, b}, s, 1.0 / std::sqrt(static_cast<double>(b)));
  auto b2 = tensor_or_random(w, p + "router.2.bias", {3}, s, 0.01);
  const double rv = static_cast<double>(w0.size() + b0.size() + w2.size() + b2.size());
  FfnBank block = block_of(c, w, p, s);
  const double resident = resident_bytes_of(block, {}, rv);
  return std::make_unique<DrLlmAnyLayer>(
      c, DrLlmLayer<FfnBank>(DrLlmRouter(o, std::move(w0), std::move(b0), std::move(w2), std::move(b2)), std::move(block)),
      resident);
}

class MoRAnyLayer final : public AnyLayer {
 public:
  MoRAnyLayer(LayerConfig c, MoRLayer<FfnBank> layer, double resident)
      : config_(std::move(c)), layer_(std::move(layer)), resident_(resident) {}
  const LayerConfig& config() const noexcept override { return config_; }
  void forward(const Batch& batch, const float* hidden, float* out, int threads) override {
    batch_ = batch;
    layer_.forward(batch, hidden, out, ws_, threads);
  }
  std::vector<NamedTensor> outputs() const override {
    const int64_t T = static_cast<int64_t>(ws_.depth.size());
    std::vector<uint8_t> sel(ws_.depth.size());
    for (size_t t = 0; t < sel.size(); ++t) sel[t] = ws_.depth[t] > 0;
    return {NamedTensor::of("selected", io::DType::U8, {T}, sel), NamedTensor::of("depth", io::DType::I32, {T}, ws_.depth),
            NamedTensor::of("router_weights", io::DType::F32, {T}, ws_.router_weights)};
  }
  double executed_flops() const override {
    double runs = 0;
    for (int32_t r : ws_.depth) runs += r;
    const double candidates = static_cast<double>(batch_.routed_tokens()) * static_cast<double>(ws_.recursions_run);
    return runs * layer_.block().flops_per_row() + candidates * 2.0 * static_cast<double>(config_.hidden());
  }
  double expert_bytes() const override {
    return static_cast<double>(ws_.recursions_run) * layer_.block().weight_bytes_per_expert();
  }
  double resident_bytes() const override { return resident_; }

 private:
  LayerConfig config_;
  MoRLayer<FfnBank> layer_;
  double resident_;
  MoRWorkspace ws_;
  Batch batch_;
};

std::unique_ptr<AnyLayer> build_mor(const json& j, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t seed) {
  const MoROptions o = mor_options(j, c);
  uint64_t s = splitmix64(seed);
  const int64_t d = c.hidden();
  std::vector<float> theta;
  for (int64_t r = 0; r < o.num_recursions; ++r) {
    auto row = tensor_or_random(w, p + "router.steps." + std::to_string(r) + ".weight", {1, d}, s, scale_of(c));
    theta.insert(theta.end(), row.begin(), row.end());
  }
  const double rv = static_cast<double>(theta.size());
  FfnBank block = block_of(c, w, p, s);
  const double resident = resident_bytes_of(block, {}, rv);
  return std::make_unique<MoRAnyLayer>(c, MoRLayer<FfnBank>(MoRRouter(o, std::move(theta)), std::move(block)), resident);
}

}  // namespace

void validate_mod(const json& j, const LayerConfig& c) { (void)mod_options(j, c); }
void validate_gamma_mod(const json& j, const LayerConfig& c) { (void)gamma_options(j, c); }
void validate_token_prune(const json& j, const LayerConfig& c) { (void)prune_options(j, c); }
void validate_drllm(const json& j, const LayerConfig& c) { (void)drllm_options(j, c); }
void validate_mor(const json& j, const LayerConfig& c) { (void)mor_options(j, c); }
// One wrapped block (the routed expert shape) plus the router's rows of d.
double weight_bytes_mod(const json& j, const LayerConfig& c) {
  const MoDOptions o = mod_options(j, c);
  const double d = static_cast<double>(c.hidden()), h = static_cast<double>(o.aux_hidden);
  const double rows = o.mode == MoDMode::aux_predictor && o.aux_hidden == 0 ? 2.0 : 1.0;
  const double mlp = h > 0 ? h * (d + 2.0) + 1.0 : 0.0;  // W1, b1, w2, b2
  return 4.0 * (rows * d + mlp) + routed_expert_bytes(c, 1.0);
}
double weight_bytes_gamma_mod(const json& j, const LayerConfig& c) {
  bool input_norm = false;
  (void)gamma_options(j, c, &input_norm);
  return 4.0 * (input_norm ? 3.0 : 2.0) * static_cast<double>(c.hidden()) + routed_expert_bytes(c, 1.0);
}
double weight_bytes_token_prune(const json& j, const LayerConfig& c) {
  const TokenPruneOptions o = prune_options(j, c);
  const double router = o.input == TokenPruneInput::features ? 6.0 * static_cast<double>(o.feature_hidden) + 1.0
                                                             : static_cast<double>(c.hidden());
  return 4.0 * router + routed_expert_bytes(c, 1.0);
}
double weight_bytes_drllm(const json& j, const LayerConfig& c) {
  const double b = static_cast<double>(drllm_options(j, c).bottleneck), d = static_cast<double>(c.hidden());
  return 4.0 * (b * d + b + 3.0 * b + 3.0) + routed_expert_bytes(c, 1.0);
}
double weight_bytes_mor(const json& j, const LayerConfig& c) {
  const double r = static_cast<double>(mor_options(j, c).num_recursions);
  return 4.0 * r * static_cast<double>(c.hidden()) + routed_expert_bytes(c, 1.0);
}
std::unique_ptr<AnyLayer> build_mod_layer(const json& j, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t s) { return build_mod(j, c, w, p, s); }
std::unique_ptr<AnyLayer> build_gamma_mod_layer(const json& j, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t s) { return build_gamma(j, c, w, p, s); }
std::unique_ptr<AnyLayer> build_token_prune_layer(const json& j, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t s) { return build_prune(j, c, w, p, s); }
std::unique_ptr<AnyLayer> build_drllm_layer(const json& j, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t s) { return build_drllm(j, c, w, p, s); }
std::unique_ptr<AnyLayer> build_mor_layer(const json& j, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t s) { return build_mor(j, c, w, p, s); }

}  // namespace moekit::detail
