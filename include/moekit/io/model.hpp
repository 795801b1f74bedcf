// SPDX-License-Identifier: Apache-2.0
// Builds a top-k MoE layer from a LayerConfig and safetensors weights (or random weights).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moekit/experts/ffn.hpp"
#include "moekit/io/config.hpp"
#include "moekit/layer.hpp"
#include "moekit/ep/sharded_bank.hpp"
#include "moekit/offload/expert_cache.hpp"
#include "moekit/routers/topk.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

namespace io {
class TensorSource;
class GgufFile;
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

/// Expert e of the top-k layer `config` describes, read from `weights` (names after `prefix`)
/// and packed as config.pack: a one-expert bank (what an expert cache loads on a miss).
FfnBank load_expert(const LayerConfig& config, const io::TensorSource& weights, const std::string& prefix, int64_t e);

/// The top-k layer with only the routed experts `held` (ascending global ids) read and packed:
/// one rank's shard for expert parallelism (moekit::ep). Router and shared experts in full.
SparseLayer<TopKRouter, ep::ShardedFfnBank> load_layer_shard(const LayerConfig& config, const io::TensorSource& weights,
                                                             const std::string& prefix, std::vector<int64_t> held);

/// The top-k layer with at most `capacity` routed experts resident (docs/scale-out.md): the
/// router and shared experts are loaded now, every expert's tensors are checked, and each
/// expert is read from the (mapped) `weights` and packed when a call first needs it.
offload::OffloadedLayer<TopKRouter> load_offloaded_layer(const LayerConfig& config,
                                                         std::shared_ptr<const io::TensorSource> weights,
                                                         const std::string& prefix, int64_t capacity,
                                                         offload::CachePolicy policy = offload::CachePolicy::lru);

/// The layers of a GGUF file that hold an MoE block (`blk.N.ffn_gate_inp.weight`), ascending.
std::vector<int64_t> gguf_moe_layers(const io::GgufFile& file);

/// The config of a GGUF file's MoE layer `layer`, from its metadata (`general.architecture`,
/// `<arch>.expert_used_count`, `expert_gating_func`, `expert_weights_norm` / `_scale`,
/// `expert_group_count`, ...) and tensor shapes, with llama.cpp's semantics per architecture
/// (docs/config.md, "GGUF files"); `origin` "gguf", `preset` the architecture. Throws
/// moekit::error naming the key or tensor; a layer without an MoE block names those that have one.
LayerConfig gguf_layer_config(const io::GgufFile& file, int64_t layer);

/// Builds that layer from the file's tensors (any GgufFile::read_rows_f32 type, dequantised
/// to f32 one expert at a time, then packed as `config.pack`); `config` is gguf_layer_config's,
/// its `pack` may be changed.
TopKLayer load_gguf_layer(const io::GgufFile& file, int64_t layer, const LayerConfig& config);

/// Bytes of weights the layer will hold (f32 router, routed and shared experts stored as
/// `config.pack.type`, block/channel scales and strip padding not counted): an estimate made
/// from the config alone before building, for every router family (`config.router_type`),
/// computed in double so hostile sizes cannot overflow it.
double layer_weight_bytes(const LayerConfig& config);

}  // namespace moekit
#pragma GCC visibility pop
