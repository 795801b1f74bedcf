// SPDX-License-Identifier: Apache-2.0
// Routing trace files.
#include "moekit/io/trace.hpp"

#include <cctype>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/safetensors.hpp"

namespace moekit::io {
namespace {

constexpr const char* kFormat = "moekit-routing-trace";

// A decimal in [0, max], the whole string, or -1.
int64_t parse_count(const std::string& s, int64_t max) {
  if (s.empty() || s.size() > 12 || (s.size() > 1 && s[0] == '0')) return -1;  // one spelling per number
  int64_t v = 0;
  for (const char c : s) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return -1;
    v = v * 10 + (c - '0');
  }
  return v <= max ? v : -1;
}

}  // namespace

void write_trace(const std::string& path, const RoutingTrace& trace) {
  std::vector<OutTensor> out;
  std::map<std::string, std::string> meta = {{"format", kFormat}, {"version", "1"}};
  for (const auto& [layer, t] : trace.layers) {
    MOEKIT_CHECK(layer >= 0 && layer <= (int64_t{1} << 30), "write_trace: layer number expected in [0, 2^30], got ", layer);
    t.validate();
    const std::string p = "layers." + std::to_string(layer) + ".";
    out.push_back({p + "expert_ids", DType::I32, {t.tokens(), t.k}, t.ids.data()});
    if (!t.sequence_offsets.empty())
      out.push_back({p + "sequence_offsets", DType::I32, {static_cast<int64_t>(t.sequence_offsets.size())},
                     t.sequence_offsets.data()});
    meta[p + "num_experts"] = std::to_string(t.num_experts);
  }
  write_safetensors(path, out, meta);
}

bool is_trace_file(const std::string& path) {
  try {
    const SafetensorsFile f = SafetensorsFile::open(path);
    const auto it = f.metadata().find("format");
    return it != f.metadata().end() && it->second == kFormat;
  } catch (const error&) {
    return false;
  }
}

RoutingTrace read_trace(const std::string& path) {
  SafetensorsFile f = SafetensorsFile::open(path);
  const std::map<std::string, std::string> meta = f.metadata();
  const auto fmt = meta.find("format");
  MOEKIT_CHECK(fmt != meta.end() && fmt->second == kFormat, path, ": not a routing trace (metadata \"format\" expected \"",
               kFormat, "\"; moekit run --trace writes them)");
  const auto ver = meta.find("version");
  MOEKIT_CHECK(ver != meta.end() && ver->second == "1", path, ": routing trace version expected \"1\", got \"",
               ver == meta.end() ? std::string() : ver->second, "\"");
  const std::vector<std::string> names = f.names();
  const TensorSource src = TensorSource::of(std::move(f));
  RoutingTrace trace;
  for (const std::string& n : names) {
    const std::string suffix = ".expert_ids";
    if (n.rfind("layers.", 0) != 0 || n.size() <= 7 + suffix.size() || n.compare(n.size() - suffix.size(), suffix.size(), suffix) != 0) {
      MOEKIT_CHECK(n.rfind("layers.", 0) == 0 && n.size() > 17 && n.compare(n.size() - 17, 17, ".sequence_offsets") == 0,
                   path, ": unexpected tensor \"", n, "\" in a routing trace");
      MOEKIT_CHECK(src.contains(n.substr(0, n.size() - 17) + ".expert_ids"), path, ": \"", n,
                   "\" without its layer's expert_ids");
      continue;
    }
    const std::string num = n.substr(7, n.size() - 7 - suffix.size());
    const int64_t layer = parse_count(num, int64_t{1} << 30);
    MOEKIT_CHECK(layer >= 0, path, ": tensor \"", n, "\": layer number expected a decimal in [0, 2^30]");
    const std::string p = "layers." + num + ".";
    const auto e = meta.find(p + "num_experts");
    MOEKIT_CHECK(e != meta.end(), path, ": metadata \"", p, "num_experts\" is missing");
    offload::LayerTrace t;
    t.num_experts = parse_count(e->second, int64_t{1} << 20);
    MOEKIT_CHECK(t.num_experts >= 1, path, ": metadata \"", p, "num_experts\" expected a decimal in [1, 2^20], got \"", e->second,
                 "\"");
    const TensorView& v = src.tensor(n);
    MOEKIT_CHECK(v.shape.size() == 2, path, ": \"", n, "\" expected [T, k], got rank ", v.shape.size());
    t.k = v.shape[1];
    t.ids = src.read_i32(n, {-1, -1});
    if (src.contains(p + "sequence_offsets")) t.sequence_offsets = src.read_i32(p + "sequence_offsets", {-1});
    try {
      t.validate();
    } catch (const error& err) {
      detail::fail(path, ": layer ", layer, ": ", err.what());
    }
    trace.layers[layer] = std::move(t);
  }
  MOEKIT_CHECK(!trace.layers.empty(), path, ": a routing trace without layers");
  return trace;
}

}  // namespace moekit::io
