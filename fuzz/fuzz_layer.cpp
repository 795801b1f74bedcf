// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: a config and a weights file together, as `moekit run` loads them. Input:
// two bytes (little-endian) giving the config's length L, L bytes of config text (HF
// config.json or moekit's format, any router family), then the bytes of a .safetensors file.
// The sizes the config declares are hostile: the weight estimate must stay finite, and the
// layer must either be built from tensors the file really holds (allocation in proportion
// to the file, never to the config: the fuzzer's RSS limit catches the rest) or fail with
// moekit::error. A built layer runs one small forward. Any crash, sanitizer report, other
// exception or out-of-memory is a finding.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const size_t len = std::min<size_t>(size - 2, static_cast<size_t>(data[0]) | static_cast<size_t>(data[1]) << 8);
  const std::string text(reinterpret_cast<const char*>(data + 2), len);
  std::vector<std::byte> bytes(size - 2 - len);
  if (!bytes.empty()) std::memcpy(bytes.data(), data + 2 + len, bytes.size());
  try {
    const moekit::LayerConfig cfg = moekit::parse_layer_config(text, "fuzz.json");
    const double estimate = moekit::layer_weight_bytes(cfg);
    if (!(estimate >= 0.0) || !std::isfinite(estimate)) std::abort();  // NaN, negative, inf
    const auto weights = moekit::io::TensorSource::of(moekit::io::SafetensorsFile::from_bytes("fuzz weights", std::move(bytes)));
    auto layer = moekit::load_any_layer(cfg, weights);
    const int64_t d = cfg.hidden(), T = 2;
    if (d > (int64_t{1} << 20)) std::abort();  // a file this small cannot hold such a layer
    std::vector<float> x(static_cast<size_t>(T * d)), y(x.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(static_cast<int>(i % 7) - 3) * 0.25f;
    layer->forward(moekit::Batch::single(T, d), x.data(), y.data(), 1);
    (void)layer->outputs();
  } catch (const moekit::error&) {
    // rejected with a message: the expected outcome for most inputs
  }
  return 0;
}
