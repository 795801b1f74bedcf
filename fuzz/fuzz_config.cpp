// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the config loader (HF config.json and moekit's own format, every router
// family's validation) on untrusted text. Valid configs parse; everything else fails with
// moekit::error. Any crash, sanitizer report or other exception is a finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "moekit/error.hpp"
#include "moekit/io/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const moekit::LayerConfig c = moekit::parse_layer_config(text, "fuzz.json");
    (void)c.hidden();
  } catch (const moekit::error&) {
  }
  return 0;
}
