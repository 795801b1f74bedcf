// SPDX-License-Identifier: Apache-2.0
// The 4-bit weights: groups of kInt4Group = 32 depths, each group's codes then its P bf16
// scales (int4zp: then P zero-point bytes), int4_group_bytes(P) apart; a byte holds packed
// column c's code in its low nibble and column c + P/2's in its high one. int4 and w4a8 use
// GGUF Q4_0's grid (codes q + 8), int4zp GPTQ's quantiser; w4a8 interleaves the depths in
// groups of the kernel's int8_group for its integer dot product.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "formats.hpp"
#include "moekit/io/safetensors.hpp"

namespace moekit::kernels::detail {
namespace {

template <WeightType T>
constexpr bool kZeroPoint = T == WeightType::int4zp;

template <WeightType T>
int64_t group_bytes(const PackLayout& L) noexcept {
  return int4_group_bytes(L.panel, kZeroPoint<T>);
}

template <WeightType T>
int64_t int4_bytes(const PackLayout& L) noexcept {
  return (L.k + kInt4Group - 1) / kInt4Group * group_bytes<T>(L);
}

// Depths interleaved per column in the code area: w4a8 by the kernel's int8_group, else 1.
template <WeightType T>
int64_t nibble_group(const PackLayout& L) noexcept {
  return T == WeightType::w4a8 ? L.kernel->int8_group : 1;
}

// The int4 code (q + 8) of w with group scale d (either sign): q = clamp(round(w / d), -8,
// 7), round to nearest even; NaN or d = 0 -> q = 0; infinities saturate.
uint8_t q4_0_code(float w, float d) noexcept {
  if (d == 0.0f || std::isnan(w)) return 8;
  const float r = std::nearbyint(w / d);
  if (r != r) return 8;
  return static_cast<uint8_t>(std::clamp(r, -8.0f, 7.0f) + 8.0f);
}

// The int4zp code of w with scale d (>= 0) and zero point zf: clamp(round(w / d) + z, 0, 15);
// NaN or d = 0 -> the zero point (the value 0).
uint8_t gptq_code(float w, float d, float zf) noexcept {
  if (!(d > 0.0f) || std::isnan(w)) return static_cast<uint8_t>(zf);
  const float r = std::nearbyint(w / d);
  if (r != r) return static_cast<uint8_t>(zf);
  return static_cast<uint8_t>(std::clamp(r + zf, 0.0f, 15.0f));
}

template <WeightType T>
void int4_pack(const PackLayout& L, const float* src, uint8_t* S, int64_t, int64_t j,
               std::vector<float>&) noexcept {
  const int64_t half = L.half(), P = L.panel, g = nibble_group<T>(L);
  for (int64_t p0 = 0; p0 < L.k; p0 += kInt4Group) {
    const int64_t p1 = std::min(L.k, p0 + kInt4Group);
    uint8_t* block = S + p0 / kInt4Group * group_bytes<T>(L);
    uint16_t d_bits;
    float zf = 8.0f;  // Q4_0: codes q + 8
    if constexpr (kZeroPoint<T>) {
      // GPTQ: the finite range widened to include 0; d = range / 15 in bf16; z, q.
      float lo = 0.0f, hi = 0.0f;
      for (int64_t p = p0; p < p1; ++p)
        if (std::fabs(src[p]) <= FLT_MAX) {
          lo = std::min(lo, src[p]);
          hi = std::max(hi, src[p]);
        }
      d_bits = bf16_bits((hi - lo) / 15.0f);
      const float d = bf16_to_float(d_bits);
      zf = d > 0.0f ? std::clamp(std::nearbyint(-lo / d), 0.0f, 15.0f) : 0.0f;
      block[kInt4Group * half + 2 * P + j] = static_cast<uint8_t>(zf);
    } else {
      // d = (the value of largest finite magnitude, signed) / -8, rounded to bf16.
      float m = 0.0f;
      for (int64_t p = p0; p < p1; ++p)
        if (std::fabs(src[p]) <= FLT_MAX && std::fabs(src[p]) > std::fabs(m)) m = src[p];
      d_bits = L.f16_scales ? io::f32_to_f16(m / -8.0f) : bf16_bits(m / -8.0f);
    }
    std::memcpy(block + kInt4Group * half + 2 * j, &d_bits, 2);
    const float d = int4_scale(d_bits, L.f16_scales);
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t code = kZeroPoint<T> ? gptq_code(src[p], d, zf) : q4_0_code(src[p], d);
      uint8_t& byte = block[nibble_index(p - p0, j % half, half, g)];
      byte = j < half ? static_cast<uint8_t>((byte & 0xF0u) | code)
                      : static_cast<uint8_t>((byte & 0x0Fu) | code << 4);
    }
  }
}

template <WeightType T>
void int4_unpack(const PackLayout& L, const uint8_t* S, const float*, int64_t, int64_t j,
                 float* dst) noexcept {
  const int64_t half = L.half(), P = L.panel, g = nibble_group<T>(L);
  for (int64_t p = 0; p < L.k; ++p) {
    const uint8_t* block = S + p / kInt4Group * group_bytes<T>(L);
    uint16_t d;
    std::memcpy(&d, block + kInt4Group * half + 2 * j, 2);
    const int z = kZeroPoint<T> ? block[kInt4Group * half + 2 * P + j] : 8;
    const uint8_t byte = block[nibble_index(p % kInt4Group, j % half, half, g)];
    const int q = (j < half ? byte & 0x0F : byte >> 4) - z;
    dst[p] = static_cast<float>(q) * int4_scale(d, L.f16_scales);
  }
}

template <WeightType T>
constexpr WeightFormat format(const char* name) {
  return WeightFormat{T,           name,    4, ScaleKind::none, &int4_bytes<T>,
                      nullptr,     &int4_pack<T>, &int4_unpack<T>};
}

}  // namespace

extern const WeightFormat kFormatInt4, kFormatInt4zp, kFormatW4a8;
const WeightFormat kFormatInt4 = format<WeightType::int4>("int4");
const WeightFormat kFormatInt4zp = format<WeightType::int4zp>("int4zp");
const WeightFormat kFormatW4a8 = format<WeightType::w4a8>("w4a8");

}  // namespace moekit::kernels::detail
