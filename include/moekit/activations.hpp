// SPDX-License-Identifier: Apache-2.0
// Views of an engine's hidden states: f32, bf16 or f16 rows with a row stride.
#pragma once

#include <cstdint>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// The element type of a hidden-state view. bf16 and f16 are bit patterns in uint16_t
/// (bfloat16 and IEEE binary16, what ggml_bf16_t / ggml_fp16_t / torch.bfloat16 hold).
enum class ActivationType : uint8_t { f32, bf16, f16 };

/// Bytes per element of `t`.
[[nodiscard]] constexpr int64_t activation_bytes(ActivationType t) noexcept {
  return t == ActivationType::f32 ? 4 : 2;
}

/// Name of `t`: "f32", "bf16" or "f16".
[[nodiscard]] constexpr const char* to_string(ActivationType t) noexcept {
  return t == ActivationType::f32 ? "f32" : t == ActivationType::bf16 ? "bf16" : "f16";
}

/// A read-only view of T rows of the hidden size d: row t starts at element `t * stride` of
/// `data`. `stride` 0 means d (contiguous); otherwise it must be >= d. What lies between rows
/// is never read.
struct ActivationsIn {
  const void* data = nullptr;
  ActivationType type = ActivationType::f32;
  int64_t stride = 0;  ///< elements (not bytes) from one row to the next; 0: the hidden size

  [[nodiscard]] static constexpr ActivationsIn f32(const float* p, int64_t stride = 0) noexcept {
    return {p, ActivationType::f32, stride};
  }
  [[nodiscard]] static constexpr ActivationsIn bf16(const uint16_t* p, int64_t stride = 0) noexcept {
    return {p, ActivationType::bf16, stride};
  }
  [[nodiscard]] static constexpr ActivationsIn f16(const uint16_t* p, int64_t stride = 0) noexcept {
    return {p, ActivationType::f16, stride};
  }
};

/// A writable view of T rows (see ActivationsIn); what lies between rows is never written.
struct ActivationsOut {
  void* data = nullptr;
  ActivationType type = ActivationType::f32;
  int64_t stride = 0;

  [[nodiscard]] static constexpr ActivationsOut f32(float* p, int64_t stride = 0) noexcept {
    return {p, ActivationType::f32, stride};
  }
  [[nodiscard]] static constexpr ActivationsOut bf16(uint16_t* p, int64_t stride = 0) noexcept {
    return {p, ActivationType::bf16, stride};
  }
  [[nodiscard]] static constexpr ActivationsOut f16(uint16_t* p, int64_t stride = 0) noexcept {
    return {p, ActivationType::f16, stride};
  }
};

}  // namespace moekit
#pragma GCC visibility pop
