// SPDX-License-Identifier: Apache-2.0
// Routing trace files (`moekit run --trace`, `moekit trace-stats`): the routing decisions of
// one or more layers over a token stream, as a safetensors file.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "moekit/offload/locality.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::io {

/// Layers by their number. On disk (docs/scale-out.md): tensors `layers.{L}.expert_ids` I32
/// `[T, k]` (-1: no expert) and, with several sequences, `layers.{L}.sequence_offsets` I32
/// `[S + 1]`; metadata `format` = `moekit-routing-trace`, `version` = `1` and
/// `layers.{L}.num_experts`.
struct RoutingTrace {
  std::map<int64_t, offload::LayerTrace> layers;
};

/// Writes atomically (a temporary file renamed over `path`). Throws moekit::error.
void write_trace(const std::string& path, const RoutingTrace& trace);
/// Reads and validates every layer (offload::LayerTrace::validate); throws moekit::error naming
/// the file and the problem, e.g. for a safetensors file that is not a trace.
RoutingTrace read_trace(const std::string& path);
/// True when `path` is a safetensors file with the trace's `format` metadata.
bool is_trace_file(const std::string& path);

}  // namespace moekit::io
#pragma GCC visibility pop
