// SPDX-License-Identifier: Apache-2.0
// load_layer / random_layer: LayerConfig + tensors (or a seed) -> TopKLayer.
#include "moekit/io/model.hpp"

#include <cmath>
#include <vector>

#include "layer_registry.hpp"
#include "moekit/io/safetensors.hpp"

namespace moekit {
namespace {

TopKRouter build_router(const LayerConfig& c, const io::TensorSource* weights, const std::string& prefix, uint64_t& state) {
  const int64_t E = c.router.num_experts, d = c.hidden();
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
  return router;
}

// The routed experts' tensor base: the block prefix for fused layouts, else "{prefix}experts.".
std::string experts_base(const LayerConfig& c, const std::string& prefix) {
  return fused_experts(c.expert_names) ? prefix : prefix + "experts.";
}

TopKLayer build(const LayerConfig& c, const io::TensorSource* weights, const std::string& prefix, uint64_t seed) {
  const int64_t E = c.router.num_experts;
  uint64_t state = detail::splitmix64(seed);
  TopKRouter router = build_router(c, weights, prefix, state);
  // Fused layouts name their tensors from the block prefix (ffn_bank).
  FfnBank bank = detail::ffn_bank(weights, experts_base(c, prefix), true, E,
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

FfnBank load_expert(const LayerConfig& c, const io::TensorSource& weights, const std::string& prefix, int64_t e) {
  MOEKIT_CHECK(c.router_type == "topk", "load_expert: top-k layers only, got the ", c.router_type, " family");
  return detail::load_one_expert(weights, experts_base(c, prefix), c.router.num_experts, e, detail::routed_shape(c),
                                 c.expert_names, c.pack);
}

SparseLayer<TopKRouter, ep::ShardedFfnBank> load_layer_shard(const LayerConfig& c, const io::TensorSource& weights,
                                                             const std::string& prefix, std::vector<int64_t> held) {
  MOEKIT_CHECK(c.router_type == "topk", "load_layer_shard: top-k layers only, got the ", c.router_type, " family");
  uint64_t state = 0;
  TopKRouter router = build_router(c, &weights, prefix, state);
  std::vector<SharedExpert> shared = detail::shared_experts(c, &weights, prefix, state);
  const FfnShape shape = detail::routed_shape(c);
  detail::check_experts(weights, experts_base(c, prefix), true, c.router.num_experts, shape, c.expert_names);
  std::vector<kernels::PackedMatrix> in, down;
  std::vector<float> biases;
  for (const int64_t e : held) {  // only the held experts are read and packed
    FfnBank one = load_expert(c, weights, prefix, e);
    in.push_back(one.in_matrix(0));
    down.push_back(one.down_matrix(0));
    biases.insert(biases.end(), one.biases().begin(), one.biases().end());
  }
  MOEKIT_CHECK(!in.empty(), "load_layer_shard: held expected at least one expert, got none");
  ep::ShardedFfnBank bank(c.router.num_experts, std::move(held),
                          FfnBank::from_packed(shape, std::move(in), std::move(down), std::move(biases)));
  SparseLayer<TopKRouter, ep::ShardedFfnBank> layer(std::move(router), std::move(bank), std::move(shared));
  layer.set_weight_on_input(c.weight_on_input);
  return layer;
}

offload::OffloadedLayer<TopKRouter> load_offloaded_layer(const LayerConfig& c, std::shared_ptr<const io::TensorSource> weights,
                                                         const std::string& prefix, int64_t capacity,
                                                         offload::CachePolicy policy) {
  MOEKIT_CHECK(c.router_type == "topk", "load_offloaded_layer: top-k layers only, got the ", c.router_type, " family");
  MOEKIT_CHECK(weights != nullptr, "load_offloaded_layer: weights expected");
  uint64_t state = 0;
  TopKRouter router = build_router(c, weights.get(), prefix, state);
  std::vector<SharedExpert> shared = detail::shared_experts(c, weights.get(), prefix, state);
  // Every expert's tensors are checked now (names, shapes): a miss later only reads and packs.
  const int64_t E = c.router.num_experts;
  const FfnShape shape = detail::routed_shape(c);
  detail::check_experts(*weights, experts_base(c, prefix), true, E, shape, c.expert_names);
  offload::CachedFfnBank bank(E, shape, capacity,
                              [c, weights, prefix](int64_t e) { return load_expert(c, *weights, prefix, e); }, policy);
  SparseLayer<TopKRouter, offload::CachedFfnBank> layer(std::move(router), std::move(bank), std::move(shared));
  layer.set_weight_on_input(c.weight_on_input);
  return offload::OffloadedLayer<TopKRouter>(std::move(layer));
}

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
