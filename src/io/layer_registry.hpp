// SPDX-License-Identifier: Apache-2.0
// Internal: the table of router families `moekit run` / `bench` can build, and the helpers
// each family's builder uses (expert banks and shared experts from weights or random).
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/experts/ffn.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/layer.hpp"
#include "json_reader.hpp"

namespace moekit::detail {

/// One router family.
struct RouterFamily {
  const char* type;
  /// Parses the `router` object strictly (unknown keys are errors) against the rest of the
  /// config; throws moekit::error naming the key. Called when the config is parsed.
  void (*validate)(const nlohmann::json& router, const LayerConfig& config);
  /// Builds the layer; `weights` null means random weights from `seed`.
  std::unique_ptr<AnyLayer> (*build)(const nlohmann::json& router, const LayerConfig& config,
                                     const io::TensorSource* weights, const std::string& prefix, uint64_t seed);
  /// Bytes of weights the built layer will hold (f32 router values, experts in the config's
  /// weight type; scales and strip padding not counted), from the config alone, in double
  /// (no overflow): what `bench` checks before allocating anything.
  double (*weight_bytes)(const nlohmann::json& router, const LayerConfig& config);
};

/// Bytes `count` routed experts hold in the config's weight type (an estimate, as above).
double routed_expert_bytes(const LayerConfig& config, double count);
/// Bytes the config's shared expert holds (0 without one), its gate vector included.
double shared_expert_bytes(const LayerConfig& config);
/// A routed layer's estimate: `router_values` f32 router values, `experts` routed experts and
/// the configured shared expert.
inline double routed_layer_bytes(const LayerConfig& config, double router_values, double experts) {
  return 4.0 * router_values + routed_expert_bytes(config, experts) + shared_expert_bytes(config);
}

/// The family of `type`, or null.
const RouterFamily* find_router_family(const std::string& type);
/// All families' types, for error messages.
std::string router_family_list();

/// Reads (or, without weights, draws) a float tensor of `shape` named prefix + name.
std::vector<float> tensor_or_random(const io::TensorSource* weights, const std::string& name,
                                    const std::vector<int64_t>& shape, uint64_t& seed, double scale);

/// Reads (or draws) one FFN expert named `{p}{gate,up,down}...` into bank slot e.
void load_ffn_into(FfnBank& bank, int64_t e, const io::TensorSource* weights, const std::string& p, ExpertNames names,
                   uint64_t& seed, std::vector<float>& buf);

/// `count` FFN experts of `shape` named `{base}{i}.{gate,up,down}...` (or `{base}` alone when
/// `indexed` is false), from weights or random. With a fused layout (fused_experts(names))
/// `base` is the MoE block's prefix and the experts are slices of its 3-D tensors.
FfnBank ffn_bank(const io::TensorSource* weights, const std::string& base, bool indexed, int64_t count,
                 const FfnShape& shape, ExpertNames names, uint64_t& seed, const kernels::PackOptions& pack);

/// Checks that `count` experts' tensors (ffn_bank's layout) exist with their shapes; reads nothing.
void check_experts(const io::TensorSource& weights, const std::string& base, bool indexed, int64_t count,
                   const FfnShape& shape, ExpertNames names);

/// Expert e of `count` (the layout of ffn_bank with `indexed`) as a one-expert bank, read from
/// `weights` and packed: what an expert cache loads on a miss.
FfnBank load_one_expert(const io::TensorSource& weights, const std::string& base, int64_t count, int64_t e,
                        const FfnShape& shape, ExpertNames names, const kernels::PackOptions& pack);

/// The configured shared expert (if any), from weights or random.
std::vector<SharedExpert> shared_experts(const LayerConfig& config, const io::TensorSource* weights,
                                         const std::string& prefix, uint64_t& seed);

/// Parses a family's `router` object into options `O`: `fill(reader, options)` reads the
/// family's keys; "type" is accepted, any other unread key is an error, and the options
/// are validated.
template <class O, class Fill>
O parse_router_options(const nlohmann::json& router, Fill&& fill) {
  Reader r(router, "router");
  r.mark("type");
  O o;
  fill(r, o);
  r.reject_unknown();
  o.validate();
  return o;
}

/// A config's `drop_policy` string; `where` names the key in the error.
inline DropPolicy parse_drop_policy(const std::string& s, const std::string& where) {
  if (s == "score") return DropPolicy::score;
  if (s == "position") return DropPolicy::position;
  if (s == "position_slot_major") return DropPolicy::position_slot_major;
  fail(where, ": expected \"score\", \"position\" or \"position_slot_major\", got \"", s, "\"");
}

/// Reads a `router` object of type "topk" (moekit's own format) into `config` over its
/// defaults (the preset's): TopKOptions and the layer keys (weight_on_input, biases); rejects
/// unknown keys, so mark a caller's own keys first.
void parse_topk_router(Reader& rr, LayerConfig& config);

/// 1 / sqrt(d): the scale of random router weights reading hidden states.
inline double scale_of(const LayerConfig& c) { return 1.0 / std::sqrt(static_cast<double>(c.hidden())); }

/// The routed experts' shape with d from the router config.
FfnShape routed_shape(const LayerConfig& config);

// A built top-k layer as an AnyLayer (topk_ids / topk_weights outputs).
std::unique_ptr<AnyLayer> wrap_topk(const LayerConfig& c, TopKLayer layer);

/// AnyLayer over a SparseLayer<R, B>: forward through the generic layer, outputs from a
/// family-specific function of (layer, workspace, batch).
template <class R, class B>
class SparseAnyLayer final : public AnyLayer {
 public:
  using Layer = SparseLayer<R, B>;
  using OutputsFn = std::function<std::vector<NamedTensor>(const Layer&, const Workspace&, const Batch&)>;

  SparseAnyLayer(LayerConfig c, Layer layer, OutputsFn outputs, double resident_bytes)
      : config_(std::move(c)), layer_(std::move(layer)), outputs_(std::move(outputs)), resident_(resident_bytes) {}
  const LayerConfig& config() const noexcept override { return config_; }
  void forward(const Batch& batch, const float* hidden, float* out, int threads) override {
    batch_ = batch;
    // The batch's spans point at the caller's arrays; outputs() runs before they go away.
    layer_.forward(batch, hidden, out, ws_, threads);
  }
  std::vector<NamedTensor> outputs() const override { return outputs_(layer_, ws_, batch_); }
  double executed_flops() const override { return layer_.executed_flops(ws_.plan, batch_); }
  double expert_bytes() const override {
    int64_t active = 0;
    for (int64_t e = 0; e < ws_.plan.num_experts(); ++e) active += ws_.plan.kept_of(e) > 0;
    double b = static_cast<double>(active) * layer_.experts().weight_bytes_per_expert();
    if (ws_.plan.num_tokens() > 0)
      for (const SharedExpert& s : layer_.shared_experts()) b += s.ffn.weight_bytes_per_expert();
    return b;
  }
  double resident_bytes() const override { return resident_; }
  const RoutingPlan* routing_plan() const override { return &ws_.plan; }
  Layer& layer() noexcept { return layer_; }

 private:
  LayerConfig config_;
  Layer layer_;
  OutputsFn outputs_;
  double resident_;
  Workspace ws_;
  Batch batch_;
};

/// `[T, k]` ids / weights of a token-choice plan (dropped or missing slots: -1 / 0).
inline std::vector<NamedTensor> topk_outputs(const RoutingPlan& plan, int64_t k) {
  const int64_t T = plan.num_tokens();
  std::vector<int32_t> ids(static_cast<size_t>(T * k));
  std::vector<float> w(static_cast<size_t>(T * k));
  plan.to_topk(k, ids.data(), w.data());
  return {NamedTensor::of("topk_ids", io::DType::I32, {T, k}, ids), NamedTensor::of("topk_weights", io::DType::F32, {T, k}, w)};
}

/// Resident bytes of a bank (as packed) plus shared experts plus `router_values` f32 router weights.
inline double resident_bytes_of(const FfnBank& bank, const std::vector<SharedExpert>& shared, double router_values) {
  double b = static_cast<double>(bank.num_experts()) * bank.weight_bytes_per_expert() + 4.0 * router_values;
  for (const SharedExpert& s : shared)
    b += s.ffn.weight_bytes_per_expert() +
         4.0 * static_cast<double>(s.gate.size() + s.coefficient.size() + s.coefficient_bias.size());
  return b;
}

// The families' entry points (src/io/layers_*.cpp).
#define MOEKIT_ROUTER_FAMILY(name)                                                                         \
  void validate_##name(const nlohmann::json& router, const LayerConfig& config);                    \
  double weight_bytes_##name(const nlohmann::json& router, const LayerConfig& config);              \
  std::unique_ptr<AnyLayer> build_##name##_layer(const nlohmann::json& router, const LayerConfig& c, \
                                                 const io::TensorSource* w, const std::string& prefix, uint64_t seed);
#include "router_families.def"
#undef MOEKIT_ROUTER_FAMILY

}  // namespace moekit::detail
