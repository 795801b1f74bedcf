// SPDX-License-Identifier: Apache-2.0
// FP8 e4m3 (OCP "E4M3FN", torch.float8_e4m3fn, safetensors "F8_E4M3") scalar conversions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::kernels {

/// Largest finite e4m3 value.
inline constexpr float kFp8E4m3Max = 448.0f;

/// Decodes one e4m3 byte: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, subnormals
/// at exponent 0, no infinities, NaN = S.1111.111.
inline float fp8_e4m3_to_float(uint8_t v) noexcept {
  const int e = (v >> 3) & 15, m = v & 7;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  const float x = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(static_cast<float>(8 + m), e - 10);
  return (v & 0x80) ? -x : x;
}

/// Encodes one value to e4m3, rounding to nearest even; magnitudes beyond 448 saturate to
/// +-448 and NaN stays NaN (0x7F). Bit arithmetic only (no libm call: packing FP8 weights
/// was 10 ns per weight with frexp / ldexp / nearbyint); checked equal to the libm-based
/// definition for all 2^32 floats.
inline uint8_t float_to_fp8_e4m3(float x) noexcept {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t au = u & 0x7FFFFFFFu;
  if (au > 0x7F800000u) return 0x7F;          // NaN
  if (au >= 0x43E00000u) return sign | 0x7E;  // >= 448, infinities: saturate
  if (au < 0x3C800000u) {                     // below 2^-6: subnormal steps of 2^-9
    float a;
    std::memcpy(&a, &au, sizeof a);
    // a * 512 < 8 is exact; adding 2^23 rounds it to an integer, to nearest even (8 rounds
    // up into the first normal, code 0x08, as it should).
    const float t = (a * 512.0f + 8388608.0f) - 8388608.0f;
    return sign | static_cast<uint8_t>(t);
  }
  // Normal: keep 3 of the 23 mantissa bits, round to nearest even on the other 20 (a carry
  // moves into the exponent, as it should).
  const uint32_t r = au + 0x7FFFFu + ((au >> 20) & 1u);
  const uint32_t e = (r >> 23) - 120u, m = (r >> 20) & 7u;  // e4m3 exponent, bias 7 (>= 1)
  if (e > 15u || (e == 15u && m == 7u)) return sign | 0x7E;
  return sign | static_cast<uint8_t>(e << 3 | m);
}

}  // namespace moekit::kernels
#pragma GCC visibility pop
