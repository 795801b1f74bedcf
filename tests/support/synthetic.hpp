// SPDX-License-Identifier: Apache-2.0
// Synthetic inputs shared by the tests and the benchmarks (tests/support: one place for helpers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace moekit_test {

/// The bytes of a .safetensors file with `n` F32 tensors of shape [1], named "layers.<i>.w"
/// and holding the value i, in name order at consecutive offsets: a header of ~60 n bytes, as
/// a checkpoint with many small tensors (FP8 scales, biases) has.
inline std::vector<std::byte> many_tensor_safetensors(int64_t n) {
  std::string header = "{";
  for (int64_t i = 0; i < n; ++i) {
    header += (i ? ",\"layers." : "\"layers.") + std::to_string(i) + ".w\":{\"dtype\":\"F32\",\"shape\":[1],"
              "\"data_offsets\":[" + std::to_string(4 * i) + "," + std::to_string(4 * i + 4) + "]}";
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::vector<std::byte> bytes(8 + header.size() + static_cast<size_t>(4 * n));
  const uint64_t len = header.size();
  std::memcpy(bytes.data(), &len, 8);
  std::memcpy(bytes.data() + 8, header.data(), header.size());
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(i);
    std::memcpy(bytes.data() + 8 + header.size() + 4 * i, &v, 4);
  }
  return bytes;
}

}  // namespace moekit_test
