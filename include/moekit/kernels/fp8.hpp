// SPDX-License-Identifier: Apache-2.0
// FP8 e4m3 (OCP "E4M3FN", torch.float8_e4m3fn, safetensors "F8_E4M3") scalar conversions.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

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
/// +-448 and NaN stays NaN (0x7F).
inline uint8_t float_to_fp8_e4m3(float x) noexcept {
  if (std::isnan(x)) return 0x7F;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  const float a = std::fabs(x);
  if (a >= kFp8E4m3Max) return sign | 0x7E;
  if (a < 0.015625f) {  // below 2^-6: subnormal step 2^-9 (8 rounds up into the first normal)
    return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
  }
  int e2 = 0;
  (void)std::frexp(a, &e2);  // a = f 2^e2, f in [0.5, 1)
  int E = e2 - 1;            // a = (1 + m/8) 2^E
  int mant = static_cast<int>(std::nearbyint((std::ldexp(a, -E) - 1.0f) * 8.0f));
  if (mant == 8) {
    mant = 0;
    ++E;
  }
  const int biased = E + 7;
  if (biased > 15 || (biased == 15 && mant == 7)) return sign | 0x7E;
  return sign | static_cast<uint8_t>((biased << 3) | mant);
}

}  // namespace moekit::kernels
