// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the safetensors reader on untrusted bytes. Every input must either open
// and read back consistently, or fail with moekit::error; any crash, sanitizer report or
// other exception is a finding. The bytes live in an exact-size heap buffer
// (SafetensorsFile::from_bytes), so AddressSanitizer sees any read outside the file.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/safetensors.hpp"

using moekit::io::DType;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::byte> bytes(size);
  if (size) std::memcpy(bytes.data(), data, size);
  try {
    const auto file = moekit::io::SafetensorsFile::from_bytes("fuzz", std::move(bytes));
    const auto src = moekit::io::TensorSource::of(moekit::io::SafetensorsFile::from_bytes(
        "fuzz", std::vector<std::byte>(reinterpret_cast<const std::byte*>(data), reinterpret_cast<const std::byte*>(data) + size)));
    for (const auto& name : file.names()) {
      const auto& v = file.tensor(name);
      // The view's size must agree with its shape and dtype (the reader checked it).
      if (static_cast<size_t>(v.numel()) * moekit::io::dtype_size(v.dtype) != v.nbytes) std::abort();
      volatile unsigned sum = 0;  // touch every byte of the view
      for (size_t i = 0; i < v.nbytes; ++i) sum = sum + static_cast<unsigned>(v.data[i]);
      try {
        switch (v.dtype) {
          case DType::F32: case DType::F16: case DType::BF16: case DType::F64: case DType::F8_E4M3: {
            const auto f = src.read_f32(name, std::vector<int64_t>(v.shape.size(), -1));
            if (v.dtype != DType::F8_E4M3 && f.size() != static_cast<size_t>(v.numel())) std::abort();
            break;
          }
          case DType::I32: case DType::I64: (void)src.read_i32(name, std::vector<int64_t>(v.shape.size(), -1)); break;
          case DType::U8: case DType::BOOL: (void)src.read_u8(name, std::vector<int64_t>(v.shape.size(), -1)); break;
          default: break;
        }
      } catch (const moekit::error&) {
        // e.g. an I64 value outside int32, an F8 tensor without scales
      }
    }
    (void)file.metadata();
  } catch (const moekit::error&) {
    // rejected with a message: the expected outcome for malformed input
  }
  return 0;
}
