// SPDX-License-Identifier: Apache-2.0
// Builds a top-k MoE layer from a LayerConfig and safetensors weights (or random weights).
#pragma once

#include <cstdint>
#include <string>

#include "moekit/experts/ffn.hpp"
#include "moekit/io/config.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/topk.hpp"

namespace moekit {

namespace io {
class TensorSource;
}

/// The layer type every LayerConfig builds: top-k router, FFN experts, shared experts.
using TopKLayer = SparseLayer<TopKRouter, FfnBank>;

/// Loads the layer's tensors (HF names after `prefix`, ROUTING.md section 8 and
/// docs/config.md) from `weights`, converting F32/BF16/F16/F64 to f32. Shared experts
/// have the routed experts' FFN type (gated or not, same activation). Missing or mis-shaped
/// tensors throw moekit::error naming the tensor; extra tensors are ignored.
TopKLayer load_layer(const LayerConfig& config, const io::TensorSource& weights, const std::string& prefix = "");

/// A layer with random weights (uniform, variance 1/fan_in) from a fixed seed: for
/// benchmarks and tests. Deterministic for a given seed.
TopKLayer random_layer(const LayerConfig& config, uint64_t seed);

/// Bytes of weights the layer will hold (f32 router, routed and shared experts stored as
/// `config.pack.type`, block/channel scales and strip padding not counted): an estimate made
/// from the config alone before building, for every router family (`config.router_type`),
/// computed in double so hostile sizes cannot overflow it.
double layer_weight_bytes(const LayerConfig& config);

}  // namespace moekit
