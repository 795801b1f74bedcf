// SPDX-License-Identifier: Apache-2.0
// f32 and bf16 weights: `[k, P]` per strip (bf16 x bf16: k padded to even, each depth pair
// stored as the packing kernel sums it, see GemmCall).
#include <cstring>

#include "formats.hpp"

namespace moekit::kernels::detail {
namespace {

// ---------------------------------------------------------------- f32
int64_t f32_bytes(const PackLayout& L) noexcept { return L.k * L.panel * 4; }

void f32_pack(const PackLayout& L, const float* src, uint8_t* S, int64_t, int64_t j,
              std::vector<float>&) noexcept {
  for (int64_t p = 0; p < L.k; ++p) std::memcpy(S + (p * L.panel + j) * 4, src + p, 4);
}

void f32_unpack(const PackLayout& L, const uint8_t* S, const float*, int64_t, int64_t j,
                float* dst) noexcept {
  for (int64_t p = 0; p < L.k; ++p) std::memcpy(dst + p, S + (p * L.panel + j) * 4, 4);
}

// ---------------------------------------------------------------- bf16
// bf16 x bf16 sums depth pairs: k padded to even.
bool pairs(const PackLayout& L) noexcept { return L.bf16_act; }

// Element of depth p, packed column j: `[k, P]`; bf16 x bf16 on a kernel with bf16_pairs
// `[k/2, P, 2]`, on one with bf16_plain `[k, P]`, else `[k, P]` with each pair's rows swapped.
int64_t bf16_index(const PackLayout& L, int64_t p, int64_t j) noexcept {
  const int64_t P = L.panel;
  if (!L.bf16_act || L.kernel->bf16_plain) return p * P + j;
  return L.kernel->bf16_pairs ? (p / 2) * 2 * P + 2 * j + p % 2 : (p ^ 1) * P + j;
}

int64_t bf16_bytes(const PackLayout& L) noexcept {
  return (pairs(L) ? L.k + (L.k & 1) : L.k) * L.panel * 2;
}

void bf16_pack(const PackLayout& L, const float* src, uint8_t* S, int64_t, int64_t j,
               std::vector<float>&) noexcept {
  for (int64_t p = 0; p < L.k; ++p) {
    const uint16_t b = bf16_bits(src[p]);
    std::memcpy(S + bf16_index(L, p, j) * 2, &b, 2);
  }
}

void bf16_unpack(const PackLayout& L, const uint8_t* S, const float*, int64_t, int64_t j,
                 float* dst) noexcept {
  for (int64_t p = 0; p < L.k; ++p) {
    uint16_t b;
    std::memcpy(&b, S + bf16_index(L, p, j) * 2, 2);
    dst[p] = bf16_to_float(b);
  }
}

}  // namespace

extern const WeightFormat kFormatF32, kFormatBf16;
const WeightFormat kFormatF32{WeightType::f32, "f32",      32,        ScaleKind::none,
                              &f32_bytes,      nullptr,    &f32_pack, &f32_unpack};
const WeightFormat kFormatBf16{WeightType::bf16, "bf16",     16,         ScaleKind::none,
                               &bf16_bytes,      nullptr,    &bf16_pack, &bf16_unpack};

}  // namespace moekit::kernels::detail
