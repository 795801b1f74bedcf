// SPDX-License-Identifier: Apache-2.0
// int8 (weight-only) and w8a8 weights: symmetric int8 per output column, scale
// max|row| / 127 per packed column. int8 stores `[k, P]`; w8a8 interleaves groups of G =
// int8_group depths per column (G = 4: stored + 128 as unsigned bytes, padding 128 = 0).
#include "formats.hpp"

namespace moekit::kernels::detail {
namespace {

int64_t group(const PackLayout& L) noexcept { return L.kernel->int8_group; }
int64_t w8a8_depth(const PackLayout& L) noexcept {
  return (L.k + group(L) - 1) / group(L) * group(L);
}

void column_scales(const PackLayout& L, const float*, const float*, int64_t,
                   std::vector<float>& scales) {
  scales.assign(static_cast<size_t>(L.strips * L.panel), 0.0f);
}

float set_scale(const PackLayout& L, const float* src, int64_t s, int64_t j,
                std::vector<float>& scales) noexcept {
  const float scale = int8_scale(abs_max(src, L.k));
  scales[static_cast<size_t>(s * L.panel + j)] = scale;
  return scale;
}

// ---------------------------------------------------------------- int8
int64_t int8_bytes(const PackLayout& L) noexcept { return L.k * L.panel; }

void int8_pack(const PackLayout& L, const float* src, uint8_t* S, int64_t s, int64_t j,
               std::vector<float>& scales) noexcept {
  const float scale = set_scale(L, src, s, j, scales);
  for (int64_t p = 0; p < L.k; ++p)
    S[p * L.panel + j] = static_cast<uint8_t>(quantize_s8(src[p], scale));
}

void int8_unpack(const PackLayout& L, const uint8_t* S, const float* scales, int64_t s,
                 int64_t j, float* dst) noexcept {
  for (int64_t p = 0; p < L.k; ++p)
    dst[p] = static_cast<float>(static_cast<int8_t>(S[p * L.panel + j])) *
             scales[s * L.panel + j];
}

// ---------------------------------------------------------------- w8a8
int64_t w8a8_bytes(const PackLayout& L) noexcept { return w8a8_depth(L) * L.panel; }

int64_t w8a8_index(const PackLayout& L, int64_t p, int64_t j) noexcept {
  const int64_t G = group(L);
  return (p / G) * G * L.panel + G * j + p % G;
}

void w8a8_pack(const PackLayout& L, const float* src, uint8_t* S, int64_t s, int64_t j,
               std::vector<float>& scales) noexcept {
  const float scale = set_scale(L, src, s, j, scales);
  const bool offset = group(L) == 4;  // VNNI: unsigned bytes q + 128
  for (int64_t p = 0; p < L.k; ++p) {
    const int8_t q = quantize_s8(src[p], scale);
    S[w8a8_index(L, p, j)] = offset ? static_cast<uint8_t>(q + 128) : static_cast<uint8_t>(q);
  }
  // The padding depths of a real column must read as 0 (+ 128).
  if (offset)
    for (int64_t p = L.k; p < w8a8_depth(L); ++p) S[w8a8_index(L, p, j)] = 128;
}

void w8a8_unpack(const PackLayout& L, const uint8_t* S, const float* scales, int64_t s,
                 int64_t j, float* dst) noexcept {
  const bool offset = group(L) == 4;
  for (int64_t p = 0; p < L.k; ++p) {
    const uint8_t b = S[w8a8_index(L, p, j)];
    const int q = offset ? int{b} - 128 : int{static_cast<int8_t>(b)};
    dst[p] = static_cast<float>(q) * scales[s * L.panel + j];
  }
}

}  // namespace

extern const WeightFormat kFormatInt8, kFormatW8a8;
const WeightFormat kFormatInt8{WeightType::int8, "int8",         8,          ScaleKind::per_column,
                               &int8_bytes,      &column_scales, &int8_pack, &int8_unpack};
const WeightFormat kFormatW8a8{WeightType::w8a8, "w8a8",         8,          ScaleKind::per_column,
                               &w8a8_bytes,      &column_scales, &w8a8_pack, &w8a8_unpack};

}  // namespace moekit::kernels::detail
