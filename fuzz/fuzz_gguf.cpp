// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the GGUF reader and the MoE-layer builder on untrusted bytes. Every input
// must either open, read back and build consistently, or fail with moekit::error; any crash,
// sanitizer report or other exception is a finding. The bytes live in an exact-size heap
// buffer (GgufFile::from_bytes), so AddressSanitizer sees any read outside the file.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/gguf.hpp"
#include "moekit/io/model.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::byte> bytes(size);
  if (size) std::memcpy(bytes.data(), data, size);
  try {
    const auto file = moekit::io::GgufFile::from_bytes("fuzz", std::move(bytes));
    for (const auto& name : file.tensor_names()) {
      const auto& t = file.tensor(name);
      if (t.rows() * t.ne[0] > (int64_t{1} << 20)) continue;  // bounded work per input
      std::vector<float> dst(static_cast<size_t>(t.rows() * t.ne[0]));
      try {
        file.read_rows_f32(name, 0, t.rows(), dst.data());
      } catch (const moekit::error&) {
      }
    }
    for (int64_t layer : moekit::gguf_moe_layers(file)) {
      try {
        const moekit::LayerConfig c = moekit::gguf_layer_config(file, layer);
        const double values = static_cast<double>(c.router.num_experts) * static_cast<double>(c.hidden()) *
                              static_cast<double>(c.experts.intermediate);
        if (values <= (1 << 20)) (void)moekit::load_gguf_layer(file, layer, c);
      } catch (const moekit::error&) {
      }
    }
  } catch (const moekit::error&) {
  }
  return 0;
}
