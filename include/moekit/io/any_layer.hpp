// SPDX-License-Identifier: Apache-2.0
// AnyLayer: a layer of any router family behind one run-time interface, built from a
// LayerConfig (what `moekit run` and `moekit bench` use). Implemented in src/io/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/gguf.hpp"
#include "moekit/io/safetensors.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// One named output tensor of a layer call (names of ROUTING.md section 8).
struct NamedTensor {
  std::string name;
  io::DType dtype = io::DType::F32;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;

  template <class T>
  static NamedTensor of(std::string name, io::DType dtype, std::vector<int64_t> shape, const std::vector<T>& v) {
    NamedTensor t{std::move(name), dtype, std::move(shape), std::vector<std::byte>(v.size() * sizeof(T))};
    if (!v.empty()) std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
    return t;
  }
};

/// A built layer of any router family. Holds its own Workspace: one object per calling
/// thread (not thread-safe; SparseLayer itself is, with one Workspace per thread).
class AnyLayer {
 public:
  virtual ~AnyLayer() = default;
  [[nodiscard]] virtual const LayerConfig& config() const noexcept = 0;
  [[nodiscard]] int64_t hidden_size() const noexcept { return config().hidden(); }
  /// `hidden [T, d]` -> `out [T, d]` (the caller adds the residual).
  virtual void forward(const Batch& batch, const float* hidden, float* out, int threads) = 0;
  /// The router's outputs of the last forward (e.g. topk_ids, topk_weights), not hidden_states.
  [[nodiscard]] virtual std::vector<NamedTensor> outputs() const = 0;
  /// FLOPs the last forward executed (kept slots, shared experts, router).
  [[nodiscard]] virtual double executed_flops() const = 0;
  /// Bytes of f32 expert weights the last forward read (active routed + shared experts).
  [[nodiscard]] virtual double expert_bytes() const = 0;
  /// Bytes of f32 weights the layer holds.
  [[nodiscard]] virtual double resident_bytes() const = 0;
  /// The routing plan of the last forward (which experts each token used), or null for
  /// families without one (Dr.LLM, MoR). For routing traces (`moekit run --trace`).
  [[nodiscard]] virtual const RoutingPlan* routing_plan() const { return nullptr; }
};

/// Builds the layer `config` describes from `weights` (tensor names after `prefix`).
std::unique_ptr<AnyLayer> load_any_layer(const LayerConfig& config, const io::TensorSource& weights,
                                         const std::string& prefix = "");

/// A GGUF file's MoE layer `layer` as an AnyLayer (`config` from gguf_layer_config()).
std::unique_ptr<AnyLayer> load_any_layer_gguf(const io::GgufFile& file, int64_t layer, const LayerConfig& config);

/// The same layer with random weights from `seed` (benchmarks).
std::unique_ptr<AnyLayer> random_any_layer(const LayerConfig& config, uint64_t seed);

/// A pre-packed layer file (`moekit pack`, load_packed_layer()): the experts stay in the
/// mapped file.
std::unique_ptr<AnyLayer> load_any_layer_packed(const std::string& path);

/// Router types `config.router_type` may name in this build.
std::vector<std::string> router_types();

}  // namespace moekit
#pragma GCC visibility pop
