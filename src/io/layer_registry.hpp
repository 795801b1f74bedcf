// SPDX-License-Identifier: Apache-2.0
// Internal: the table of router families `moekit run` / `bench` can build, and the helpers
// each family's builder uses (expert banks and shared experts from weights or random).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/experts/ffn.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/safetensors.hpp"

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
};

/// The family of `type`, or null.
const RouterFamily* find_router_family(const std::string& type);
/// All families' types, for error messages.
std::string router_family_list();

/// Reads (or, without weights, draws) a float tensor of `shape` named prefix + name.
std::vector<float> tensor_or_random(const io::TensorSource* weights, const std::string& name,
                                    const std::vector<int64_t>& shape, uint64_t& seed, double scale);

/// `count` FFN experts of `shape` named `{base}{i}.{gate,up,down}...` (or `{base}` alone when
/// `indexed` is false), from weights or random.
FfnBank ffn_bank(const io::TensorSource* weights, const std::string& base, bool indexed, int64_t count,
                 const FfnShape& shape, ExpertNames names, uint64_t& seed);

/// The configured shared expert (if any), from weights or random.
std::vector<SharedExpert> shared_experts(const LayerConfig& config, const io::TensorSource* weights,
                                         const std::string& prefix, uint64_t& seed);

/// The routed experts' shape with d from the router config.
FfnShape routed_shape(const LayerConfig& config);

}  // namespace moekit::detail
