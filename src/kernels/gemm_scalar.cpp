// SPDX-License-Identifier: Apache-2.0
// The portable packed GEMM: plain loops, strips of 16 columns, every weight type. It widens
// weights to the same f32 values as the SIMD kernels and sums every output with the same fma
// chain over k (bf16 x bf16: over the packed rows, each depth pair swapped, which is the
// order of vdpbf16ps), so plain GEMMs agree with them bit for bit (activations within
// rounding).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "gemm_internal.hpp"
#include "moekit/kernels/fp8.hpp"

namespace moekit::kernels::detail {
namespace {

constexpr int64_t kP = 16, kHalf = kP / 2;

// e4m3 byte -> f32.
struct Fp8Table {
  float v[256];
  Fp8Table() noexcept {
    for (int b = 0; b < 256; ++b) v[b] = fp8_e4m3_to_float(static_cast<uint8_t>(b));
  }
};
const Fp8Table kFp8;

// The dequantised weights (before int8's or ternary's column scale) of packed row p of strip s.
template <WeightType T>
inline void load_row(const GemmCall& g, const uint8_t* S, int64_t s, int64_t p,
                     float (&w)[kP]) noexcept {
  if constexpr (T == WeightType::f32) {
    std::memcpy(w, S + p * kP * 4, sizeof w);
  } else if constexpr (T == WeightType::bf16) {
    uint16_t b[kP];
    std::memcpy(b, S + p * kP * 2, sizeof b);
    for (int64_t j = 0; j < kP; ++j) w[j] = bf16_to_float(b[j]);
  } else if constexpr (T == WeightType::int8) {
    for (int64_t j = 0; j < kP; ++j) w[j] = static_cast<float>(static_cast<int8_t>(S[p * kP + j]));
  } else if constexpr (T == WeightType::int4 || T == WeightType::int4zp) {
    constexpr bool zp = T == WeightType::int4zp;
    const uint8_t* block = S + p / kInt4Group * int4_group_bytes(kP, zp);
    const uint8_t* row = block + (p % kInt4Group) * kHalf;
    for (int64_t j = 0; j < kP; ++j) {
      uint16_t d;
      std::memcpy(&d, block + kInt4Group * kHalf + 2 * j, 2);
      const int z = zp ? block[kInt4Group * kHalf + 2 * kP + j] : 8;
      const int q = (j < kHalf ? row[j] & 0x0F : row[j - kHalf] >> 4) - z;
      w[j] = static_cast<float>(q) * int4_scale(d, g.f16_scales);
    }
  } else if constexpr (T == WeightType::ternary) {
    const uint8_t* row = S + p / 4 * kP;
    for (int64_t j = 0; j < kP; ++j) w[j] = static_cast<float>(ternary_value(row[j], p % 4));
  } else {
    const float* sc = g.fp8_scale + (s * g.k_blocks + p / kFp8Block) * 2;
    for (int64_t j = 0; j < kP; ++j) w[j] = kFp8.v[S[p * kP + j]] * sc[j < kHalf ? 0 : 1];
  }
}

void epilogue(const GemmCall& g, int64_t i, int64_t s, const float (&acc)[kP]) noexcept {
  epilogue_row(g, i, s, acc, kP);
}

template <WeightType T>
void run_float(const GemmCall& g) noexcept {
  float* a = g.a_pack;  // the row, rounded to bf16 if asked; bf16 x bf16: pairs swapped
  for (int64_t i = 0; i < g.m; ++i) {
    const float* src = g.A + i * g.lda;
    for (int64_t p = 0; p < g.depth; ++p) {
      const int64_t q = g.pairs ? p ^ 1 : p;
      a[p] = q >= g.k ? 0.0f : g.bf16_act ? round_bf16(src[q]) : src[q];
    }
    for (int64_t s = g.strip_begin; s < g.strip_end; ++s) {
      const uint8_t* S = g.data + s * g.strip_bytes;
      float acc[kP] = {};
      for (int64_t p = 0; p < g.depth; ++p) {
        float w[kP];
        load_row<T>(g, S, s, p, w);
        for (int64_t j = 0; j < kP; ++j) acc[j] = std::fma(a[p], w[j], acc[j]);
      }
      if constexpr (T == WeightType::int8 || T == WeightType::ternary)
        for (int64_t j = 0; j < kP; ++j) acc[j] = acc[j] * g.col_scale[s * kP + j];
      epilogue(g, i, s, acc);
    }
  }
}

// w8a8: the row quantised to int8 (as exact floats in a_pack), exact int32 sums, then
// (float(sum) * a_scale) * w_scale like the SIMD kernels.
void run_w8a8(const GemmCall& g) noexcept {
  float* q = g.a_pack;
  for (int64_t i = 0; i < g.m; ++i) {
    const float* src = g.A + i * g.lda;
    const float a_scale = quantize_row(src, g.k, q);
    for (int64_t s = g.strip_begin; s < g.strip_end; ++s) {
      const int8_t* S = reinterpret_cast<const int8_t*>(g.data + s * g.strip_bytes);
      int32_t sum[kP] = {};
      for (int64_t p = 0; p < g.k; ++p) {
        const int32_t ap = static_cast<int32_t>(q[p]);
        const int8_t* w = S + (p / 2) * 2 * kP + p % 2;
        for (int64_t j = 0; j < kP; ++j) sum[j] += ap * w[2 * j];
      }
      float acc[kP];
      for (int64_t j = 0; j < kP; ++j)
        acc[j] = static_cast<float>(sum[j]) * a_scale * g.col_scale[s * kP + j];
      epilogue(g, i, s, acc);
    }
  }
}

// w4a8: the row quantised per 32 depths to int8 (codes as exact floats in a_pack, then the
// groups' scales), exact int32 sums per group, then c = fma(float(sum), d_w * d_a, c) per
// group in order, like the SIMD kernels. Codes interleaved in pairs (int8_group 2).
void run_w4a8(const GemmCall& g) noexcept {
  const int64_t groups = (g.k + kInt4Group - 1) / kInt4Group;
  float* q = g.a_pack;
  float* a_scale = q + g.k;
  const int64_t group_bytes = int4_group_bytes(kP);
  for (int64_t i = 0; i < g.m; ++i) {
    const float* src = g.A + i * g.lda;
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t p0 = gi * kInt4Group, len = std::min(kInt4Group, g.k - p0);
      a_scale[gi] = quantize_row(src + p0, len, q + p0);
    }
    for (int64_t s = g.strip_begin; s < g.strip_end; ++s) {
      const uint8_t* S = g.data + s * g.strip_bytes;
      float acc[kP] = {};
      for (int64_t gi = 0; gi < groups; ++gi) {
        const uint8_t* block = S + gi * group_bytes;
        const int64_t p0 = gi * kInt4Group, len = std::min(kInt4Group, g.k - p0);
        for (int64_t j = 0; j < kP; ++j) {
          int32_t sum = 0;
          for (int64_t p = 0; p < len; ++p) {
            const uint8_t byte = block[nibble_index(p, j % kHalf, kHalf, 2)];
            const int32_t code = j < kHalf ? byte & 0x0F : byte >> 4;
            sum += (code - 8) * static_cast<int32_t>(q[p0 + p]);
          }
          uint16_t d;
          std::memcpy(&d, block + kInt4Group * kHalf + 2 * j, 2);
          acc[j] = std::fma(static_cast<float>(sum), int4_scale(d, g.f16_scales) * a_scale[gi], acc[j]);
        }
      }
      epilogue(g, i, s, acc);
    }
  }
}

void run(const GemmCall& g) noexcept {
  switch (g.type) {
    case WeightType::f32:
      run_float<WeightType::f32>(g);
      break;
    case WeightType::bf16:
      run_float<WeightType::bf16>(g);
      break;
    case WeightType::int8:
      run_float<WeightType::int8>(g);
      break;
    case WeightType::fp8:
      run_float<WeightType::fp8>(g);
      break;
    case WeightType::int4:
      run_float<WeightType::int4>(g);
      break;
    case WeightType::int4zp:
      run_float<WeightType::int4zp>(g);
      break;
    case WeightType::ternary:
      run_float<WeightType::ternary>(g);
      break;
    case WeightType::w8a8:
      run_w8a8(g);
      break;
    case WeightType::w4a8:
      run_w4a8(g);
      break;
  }
}

}  // namespace

const GemmKernel kGemmScalar{"scalar", kP, 1, &run, &implements_all};

}  // namespace moekit::kernels::detail
