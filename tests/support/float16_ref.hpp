// SPDX-License-Identifier: Apache-2.0
// Independent bfloat16 / IEEE half references for tests: plain formulas (values in double) and
// round-to-nearest-even by a search over the 16-bit patterns, sharing no code with the library.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace f16ref {

/// binary16 value of `h` (NaN for NaN patterns), by the textbook formula.
inline double ref_f16(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 0x1F;
  const int mant = h & 0x3FF;
  if (exp == 31) return mant ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  if (exp == 0) return sign * std::ldexp(static_cast<double>(mant), -24);
  return sign * std::ldexp(static_cast<double>(1024 + mant), exp - 25);
}

/// bfloat16 value of `b`, by the textbook formula.
inline double ref_bf16(uint16_t b) {
  const int sign = (b >> 15) ? -1 : 1;
  const int exp = (b >> 7) & 0xFF;
  const int mant = b & 0x7F;
  if (exp == 255) return mant ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  if (exp == 0) return sign * std::ldexp(static_cast<double>(mant), -133);
  return sign * std::ldexp(static_cast<double>(128 + mant), exp - 134);
}

/// Magnitude of the non-negative 16-bit pattern `m` under `ref`, with the first pattern past the
/// largest finite value taken as the next power of two (round-to-nearest with unbounded exponent).
template <class Ref>
inline double ref_mag(Ref ref, uint16_t m, uint16_t inf_bits, double next_pow2) {
  return m == inf_bits ? next_pow2 : ref(m);
}

/// Round-to-nearest-even by brute reasoning: the two 16-bit neighbours of |x| and a comparison.
template <class Ref>
inline uint16_t ref_round(double x, Ref ref, uint16_t inf_bits, double next_pow2) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(x);
  // Largest non-negative pattern whose value is <= a (monotone in the pattern).
  uint32_t lo = 0, hi = inf_bits;  // ref(lo) <= a, search over [0, inf_bits]
  if (a >= next_pow2) return sign | inf_bits;
  while (lo + 1 < hi) {
    const uint32_t mid = (lo + hi) / 2;
    if (ref_mag(ref, static_cast<uint16_t>(mid), inf_bits, next_pow2) <= a) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const double vlo = ref_mag(ref, static_cast<uint16_t>(lo), inf_bits, next_pow2);
  if (vlo == a) return static_cast<uint16_t>(sign | lo);
  const double vhi = ref_mag(ref, static_cast<uint16_t>(lo + 1), inf_bits, next_pow2);
  const double dlo = a - vlo, dhi = vhi - a;
  uint32_t r = dlo < dhi ? lo : dhi < dlo ? lo + 1 : (lo % 2 == 0 ? lo : lo + 1);
  return static_cast<uint16_t>(sign | r);
}

inline uint16_t ref_to_f16(float x) { return ref_round(x, ref_f16, 0x7C00, 65536.0); }
inline uint16_t ref_to_bf16(float x) { return ref_round(x, ref_bf16, 0x7F80, std::ldexp(1.0, 128)); }

inline bool same_bits(float a, double b) {
  if (std::isnan(b)) return std::isnan(a);
  return a == b && std::signbit(a) == std::signbit(b);
}

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace f16ref
