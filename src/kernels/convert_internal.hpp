// SPDX-License-Identifier: Apache-2.0
// Private to moekit's sources: the scalar bfloat16 / IEEE half conversions, written once. They
// are the reference bits of the SIMD conversion kernels (kernels/vector.hpp: F16C and AVX-512
// give the same bits, NaNs quietened as the hardware does), of the weight formats and of the
// safetensors / GGUF readers (io::f16_to_f32 and friends). Internal linkage, as every header
// the per-ISA units include (see gemm_internal.hpp).
#pragma once

#include <cstdint>
#include <cstring>

namespace moekit::kernels::detail {
namespace {

inline uint16_t to_bf16_bits(float f) noexcept {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float from_bf16_bits(uint16_t b) noexcept {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t to_f16_bits(float f) noexcept {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((x >> 13) & 0x3FFu));  // quiet NaN
  if (x >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: infinity
  if (x < 0x38800000u) {                 // below 2^-14: a half subnormal or zero (integer
    if (x <= 0x33000000u) return sign;   // arithmetic: immune to DAZ); <= 2^-25 rounds to 0
    const uint32_t e = x >> 23;                      // 102..112
    const uint32_t m = (x & 0x7FFFFFu) | 0x800000u;  // value = m 2^(e - 150)
    const uint32_t shift = 126u - e;                 // result = m 2^(e - 126)
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) ++h;  // may carry into the smallest normal
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (x >> 13) - (112u << 10);  // exponent rebiased 127 -> 15
  const uint32_t rem = x & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

inline float from_f16_bits(uint16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  uint32_t u;
  if (e == 0) {
    float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m 2^-24, exact
    std::memcpy(&u, &v, sizeof u);
    u |= sign;
  } else if (e == 31) {
    u = sign | 0x7F800000u | (m << 13) | (m ? 0x00400000u : 0u);  // NaN quietened, as F16C does
  } else {
    u = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace
}  // namespace moekit::kernels::detail
