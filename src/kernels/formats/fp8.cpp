// SPDX-License-Identifier: Apache-2.0
// fp8 weights: e4m3 codes `[k, P]` per strip, one f32 scale per 128 x 128 block of the
// original matrix (max|block| / 448: DeepSeek-V3's `weight_scale_inv` grid; a gated pair's
// halves each have their own grid), copied for the kernels per (strip, k block, strip half).
#include <algorithm>
#include <cmath>

#include "formats.hpp"
#include "moekit/kernels/fp8.hpp"

namespace moekit::kernels::detail {
namespace {

int64_t k_blocks(const PackLayout& L) noexcept { return (L.k + kFp8Block - 1) / kFp8Block; }

// Largest finite magnitude of rows [r0, r1) x depths [p0, p1) of W (stride ldw).
float block_abs_max(const float* W, int64_t ldw, int64_t r0, int64_t r1, int64_t p0,
                    int64_t p1) noexcept {
  float m = 0.0f;
  for (int64_t r = r0; r < r1; ++r) m = std::max(m, abs_max(W + r * ldw + p0, p1 - p0));
  return m;
}

int64_t fp8_bytes(const PackLayout& L) noexcept { return L.k * L.panel; }

void fp8_prepare(const PackLayout& L, const float* W0, const float* W1, int64_t ldw,
                 std::vector<float>& scales) {
  const int64_t n = L.n, k = L.k, kb_n = k_blocks(L), half = L.half(), P = L.panel;
  const int64_t row_blocks = (n + kFp8Block - 1) / kFp8Block;
  // The block grids of the original matrices ([row blocks, k blocks] each; gate, then up).
  std::vector<float> grid(static_cast<size_t>((L.gated ? 2 : 1) * row_blocks * kb_n), 0.0f);
  for (int h = 0; h < (L.gated ? 2 : 1); ++h)
    for (int64_t rb = 0; rb < row_blocks; ++rb)
      for (int64_t kb = 0; kb < kb_n; ++kb)
        grid[static_cast<size_t>((h * row_blocks + rb) * kb_n + kb)] =
            block_abs_max(h == 0 ? W0 : W1, ldw, rb * kFp8Block, std::min(n, (rb + 1) * kFp8Block),
                          kb * kFp8Block, std::min(k, (kb + 1) * kFp8Block)) /
            kFp8E4m3Max;
  // The kernels' copy: per (strip, k block, strip half); a strip half lies in one row block.
  scales.assign(static_cast<size_t>(L.strips * kb_n * 2), 0.0f);
  for (int64_t s = 0; s < L.strips; ++s)
    for (int64_t kb = 0; kb < kb_n; ++kb)
      for (int64_t hh = 0; hh < 2; ++hh) {
        const int64_t h = L.gated ? hh : 0, rb = (L.gated ? s * half : s * P + hh * half) / kFp8Block;
        scales[static_cast<size_t>((s * kb_n + kb) * 2 + hh)] =
            grid[static_cast<size_t>((h * row_blocks + rb) * kb_n + kb)];
      }
}

float block_scale(const PackLayout& L, const float* scales, int64_t s, int64_t j,
                  int64_t p) noexcept {
  return scales[(s * k_blocks(L) + p / kFp8Block) * 2 + (j < L.half() ? 0 : 1)];
}

void fp8_pack(const PackLayout& L, const float* src, uint8_t* S, int64_t s, int64_t j,
              std::vector<float>& scales) noexcept {
  for (int64_t p = 0; p < L.k; ++p) {
    const float scale = block_scale(L, scales.data(), s, j, p);
    S[p * L.panel + j] =
        !(scale > 0.0f) || std::isnan(src[p]) ? 0 : float_to_fp8_e4m3(src[p] / scale);
  }
}

void fp8_unpack(const PackLayout& L, const uint8_t* S, const float* scales, int64_t s, int64_t j,
                float* dst) noexcept {
  for (int64_t p = 0; p < L.k; ++p)
    dst[p] = fp8_e4m3_to_float(S[p * L.panel + j]) * block_scale(L, scales, s, j, p);
}

}  // namespace

extern const WeightFormat kFormatFp8;
const WeightFormat kFormatFp8{WeightType::fp8, "fp8",        8,         ScaleKind::fp8_blocks,
                              &fp8_bytes,      &fp8_prepare, &fp8_pack, &fp8_unpack};

}  // namespace moekit::kernels::detail
