// SPDX-License-Identifier: Apache-2.0
// load_layer / random_layer: LayerConfig + tensors (or a seed) -> TopKLayer.
#include "moekit/io/model.hpp"

#include <cmath>
#include <vector>

#include "layer_registry.hpp"
#include "moekit/io/safetensors.hpp"

namespace moekit {
namespace {

TopKLayer build(const LayerConfig& c, const io::TensorSource* weights, const std::string& prefix, uint64_t seed) {
  const int64_t E = c.router.num_experts, d = c.hidden();
  uint64_t state = detail::splitmix64(seed);
  std::vector<float> gate =
      detail::tensor_or_random(weights, prefix + c.router_weight_tensor(), {E, d}, state, 1.0 / std::sqrt(static_cast<double>(d)));
  std::vector<float> bias;
  if (c.router_bias) {
    bias = c.router_bias_ernie
               ? detail::tensor_or_random(weights, prefix + "moe_statics.e_score_correction_bias", {1, E}, state, 0.01)
               : detail::tensor_or_random(weights, prefix + "gate.e_score_correction_bias", {E}, state, 0.01);
  }
  TopKRouter router(c.router, std::move(gate), std::move(bias));
  if (c.router_logit_bias)
    router.set_logit_bias(detail::tensor_or_random(weights, prefix + "router.bias", {E}, state, 0.1));
  // Fused layouts name their tensors from the block prefix (ffn_bank).
  FfnBank bank = detail::ffn_bank(weights, fused_experts(c.expert_names) ? prefix : prefix + "experts.", true, E,
                                  detail::routed_shape(c), c.expert_names, state, c.pack);
  std::vector<SharedExpert> shared = detail::shared_experts(c, weights, prefix, state);
  TopKLayer layer(std::move(router), std::move(bank), std::move(shared));
  layer.set_weight_on_input(c.weight_on_input);
  return layer;
}

}  // namespace

TopKLayer load_layer(const LayerConfig& c, const io::TensorSource& src, const std::string& prefix) {
  return build(c, &src, prefix, 0);
}

TopKLayer random_layer(const LayerConfig& c, uint64_t seed) { return build(c, nullptr, "", seed); }

double layer_weight_bytes(const LayerConfig& c) {
  if (c.router_type != "topk") {  // the family's own estimate (src/io/layers_*.cpp)
    const detail::RouterFamily* f = detail::find_router_family(c.router_type);
    MOEKIT_CHECK(f != nullptr, "router.type: expected one of ", detail::router_family_list(), ", got \"",
                 c.router_type, "\"");
    return f->weight_bytes(c.router_json.empty() ? nlohmann::json::object() : nlohmann::json::parse(c.router_json), c);
  }
  const double d = static_cast<double>(c.hidden());
  const double router = static_cast<double>(c.router.num_experts) * (d + (c.router_logit_bias ? 1.0 : 0.0)) +
                        (c.shared && c.shared->gated ? d : 0.0) +
                        (c.shared && c.shared->residual_coefficient ? 2.0 * d + 2.0 : 0.0);
  double experts = static_cast<double>(c.router.num_experts) * static_cast<double>(detail::routed_shape(c).weights_per_expert());
  const double biases = static_cast<double>(c.router.num_experts) * static_cast<double>(detail::routed_shape(c).biases_per_expert());
  if (c.shared) experts += (c.experts.gated ? 3.0 : 2.0) * d * static_cast<double>(c.shared->intermediate);
  return 4.0 * (router + biases) + static_cast<double>(kernels::weight_type_bits(c.pack.type)) / 8.0 * experts;
}

}  // namespace moekit
