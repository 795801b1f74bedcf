// SPDX-License-Identifier: Apache-2.0
// Ternary weights (MoTE, BitNet b1.58's grid): codes {-1, 0, +1} with one f32 scale per output
// column. Codes are 2-bit two's complement (+1 = 01, -1 = 11, 0 = 00), four depths per byte:
// depth group q = p / 4 holds P bytes, byte j being packed column j's four codes, depth
// 4q + e at bits [2e, 2e + 2). The column scale multiplies the sums in the epilogue.
#include <cfloat>
#include <cmath>

#include "formats.hpp"

namespace moekit::kernels::detail {
namespace {

int64_t ternary_bytes(const PackLayout& L) noexcept { return ternary_depth_groups(L.k) * L.panel; }

void column_scales(const PackLayout& L, const float*, const float*, int64_t, std::vector<float>& scales) {
  scales.assign(static_cast<size_t>(L.strips * L.panel), 0.0f);
}

void ternary_pack(const PackLayout& L, const float* src, uint8_t* S, int64_t s, int64_t j,
                  std::vector<float>& scales) noexcept {
  const float scale = ternary_scale(src, L.k);
  scales[static_cast<size_t>(s * L.panel + j)] = scale;
  for (int64_t p = 0; p < L.k; ++p) {
    const int q = ternary_code(src[p], scale);
    S[p / 4 * L.panel + j] |= static_cast<uint8_t>((q & 3) << (2 * (p % 4)));
  }
}

void ternary_unpack(const PackLayout& L, const uint8_t* S, const float* scales, int64_t s, int64_t j,
                    float* dst) noexcept {
  for (int64_t p = 0; p < L.k; ++p)
    dst[p] = static_cast<float>(ternary_value(S[p / 4 * L.panel + j], p % 4)) * scales[s * L.panel + j];
}

}  // namespace

extern const WeightFormat kFormatTernary;
const WeightFormat kFormatTernary{WeightType::ternary, "ternary",       2,
                                  ScaleKind::per_column, &ternary_bytes, &column_scales,
                                  &ternary_pack,         &ternary_unpack};

}  // namespace moekit::kernels::detail
