// SPDX-License-Identifier: Apache-2.0
// The SIMD row kernels (kernels/vector.hpp), written once against xsimd::batch<float, Arch>
// and instantiated in each per-ISA translation unit next to the GEMM (which supplies
// IsaOps<Arch>::fmadd, the fused multiply-add). Every kernel keeps kRowLanes = 16 lane sums
// (16 / Arch lanes registers), so dot products and axpy give the scalar kernel's bits.
//
// Everything here has internal linkage (anonymous namespace): see gemm_internal.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <immintrin.h>
#include <xsimd/xsimd.hpp>

#include "rows_internal.hpp"

namespace moekit::kernels::detail {
namespace {

template <class Arch>
struct IsaOps;

template <class Arch>
struct SimdRows {
  using Ops = IsaOps<Arch>;
  using fb = xsimd::batch<float, Arch>;
  static constexpr int64_t L = static_cast<int64_t>(fb::size);
  static constexpr int64_t B = kRowLanes / L;  // registers per 16 lanes
  static_assert(kRowLanes % L == 0, "a register must divide the 16 lanes");
  static constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  static fb fma(const fb& a, const fb& b, const fb& c) noexcept { return fb(Ops::fmadd(a, b, c)); }

  static float reduce(const fb (&acc)[B]) noexcept {
    alignas(64) float t[kRowLanes];
    for (int64_t r = 0; r < B; ++r) acc[r].store_aligned(t + r * L);
    return reduce_lanes(t);
  }

  static float lane_max(const fb (&v)[B]) noexcept {
    alignas(64) float t[kRowLanes];
    for (int64_t r = 0; r < B; ++r) v[r].store_aligned(t + r * L);
    float m = t[0];
    for (int64_t l = 1; l < kRowLanes; ++l) m = t[l] > m ? t[l] : m;
    return m;
  }

  // R rows of W at once (x is loaded once per block).
  template <int R>
  static void dot_rows(const float* x, const float* W, int64_t n, float* out) noexcept {
    fb acc[R][B];
    for (int r = 0; r < R; ++r)
      for (int64_t b = 0; b < B; ++b) acc[r][b] = fb(0.0f);
    int64_t i = 0;
    for (; i + kRowLanes <= n; i += kRowLanes)
      for (int64_t b = 0; b < B; ++b) {
        const fb xv = fb::load_unaligned(x + i + b * L);
        for (int r = 0; r < R; ++r)
          acc[r][b] = fma(xv, fb::load_unaligned(W + r * n + i + b * L), acc[r][b]);
      }
    for (int r = 0; r < R; ++r) {
      float s = reduce(acc[r]);
      for (int64_t j = i; j < n; ++j) s = std::fma(x[j], W[r * n + j], s);
      out[r] = s;
    }
  }

  static void matvec(const float* x, const float* W, int64_t E, int64_t n, float* out) noexcept {
    int64_t e = 0;
    for (; e + kMatvecRows <= E; e += kMatvecRows)
      dot_rows<kMatvecRows>(x, W + e * n, n, out + e);
    for (; e < E; ++e) dot_rows<1>(x, W + e * n, n, out + e);
  }

  static void scale(float a, const float* x, float* y, int64_t n) noexcept {
    const fb av(a);
    int64_t i = 0;
    for (; i + L <= n; i += L) (av * fb::load_unaligned(x + i)).store_unaligned(y + i);
    for (; i < n; ++i) y[i] = a * x[i];
  }

  static void axpy(float a, const float* x, float* y, int64_t n) noexcept {
    const fb av(a);
    int64_t i = 0;
    for (; i + L <= n; i += L)
      fma(av, fb::load_unaligned(x + i), fb::load_unaligned(y + i)).store_unaligned(y + i);
    for (; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
  }

  static int64_t first_non_finite(const float* x, int64_t n) noexcept {
    for (int64_t b0 = 0; b0 < n; b0 += kScanBlock) {
      const int64_t e = b0 + kScanBlock < n ? b0 + kScanBlock : n;
      fb acc(0.0f);
      int64_t i = b0;
      for (; i + L <= e; i += L) {
        const fb v = fb::load_unaligned(x + i);
        acc += v - v;
      }
      float tail = 0.0f;
      for (; i < e; ++i) tail += x[i] - x[i];
      const float s = xsimd::hadd(acc) + tail;
      if (s != s)
        for (int64_t j = b0; j < e; ++j)
          if (x[j] - x[j] != 0.0f) return j;
    }
    return -1;
  }

  // flatten: xsimd's exp / log / tanh are inlined rather than emitted as weak symbols compiled
  // for this ISA (see gemm_internal.hpp).
  __attribute__((flatten)) static float lse_sum(const float* a, const float* b,
                                                int64_t n) noexcept {
    fb mv[B], s[B];
    for (int64_t r = 0; r < B; ++r) mv[r] = fb(kNegInf);
    for (int64_t i = 0; i < n; i += kRowLanes)
      for (int64_t r = 0; r < B; ++r)
        mv[r] = xsimd::max(mv[r], fb::load_unaligned(a + i + r * L) +
                                      fb::load_unaligned(b + i + r * L));
    const float m = lane_max(mv);
    const fb mb(m);
    for (int64_t r = 0; r < B; ++r) s[r] = fb(0.0f);
    for (int64_t i = 0; i < n; i += kRowLanes)
      for (int64_t r = 0; r < B; ++r)
        s[r] += xsimd::exp((fb::load_unaligned(a + i + r * L) + fb::load_unaligned(b + i + r * L)) -
                           mb);
    return m + std::log(reduce(s));
  }

  __attribute__((flatten)) static float exp_sum(const float* x, float scale, float shift, float* y,
                                                int64_t n) noexcept {
    fb s[B];
    for (int64_t r = 0; r < B; ++r) s[r] = fb(0.0f);
    const fb sc(scale), sh(shift);
    int64_t i = 0;
    for (; i + kRowLanes <= n; i += kRowLanes)
      for (int64_t r = 0; r < B; ++r) {
        const fb e = xsimd::exp(fb::load_unaligned(x + i + r * L) * sc - sh);
        e.store_unaligned(y + i + r * L);
        s[r] += e;
      }
    float sum = reduce(s);
    for (; i < n; i += L) {
      const int64_t w = n - i < L ? n - i : L;
      alignas(64) float t[L];
      xsimd::exp(load(x + i, w) * sc - sh).store_aligned(t);
      for (int64_t j = 0; j < w; ++j) {
        y[i + j] = t[j];
        sum += t[j];
      }
    }
    return sum;
  }

  // Each codeword's 2 * pairs (<= 28) values in ceil(28 / L) stores: lane l of store s is lo
  // when mask bit s L + l is set, hi when its hi bit is, else 0 (Ops::ternary_select).
  static int64_t tdict_decode(const uint16_t* codes, const uint64_t* table, float lo, float hi, float* dst,
                              int64_t k) noexcept {
    const typename Ops::freg lov = fb(lo), hiv = fb(hi);
    constexpr int64_t stores = (2 * 14 + L - 1) / L;
    constexpr uint64_t lane_mask = (uint64_t{1} << L) - 1;
    int64_t c = 0;
    for (int64_t pos = 0; pos < k; ++c) {
      const uint64_t e = table[codes[c]];
#pragma GCC unroll 4
      for (int64_t s = 0; s < stores; ++s)
        fb(Ops::ternary_select(static_cast<uint32_t>((e >> (s * L)) & lane_mask),
                               static_cast<uint32_t>((e >> (28 + s * L)) & lane_mask), lov, hiv))
            .store_unaligned(dst + pos + s * L);
      const int64_t pairs = static_cast<int64_t>(e >> 56);
      pos += (pairs < 1 ? 1 : pairs > 14 ? 14 : pairs) * 2;
    }
    return c;
  }

  __attribute__((flatten)) static void lse_columns(const float* K, int64_t stride, const float* u,
                                                   int64_t rows, float* out) noexcept {
    for (int64_t r0 = 0; r0 < B; ++r0) {
      const float* col = K + r0 * L;
      fb mv(kNegInf);
      for (int64_t r = 0; r < rows; ++r)
        mv = xsimd::max(mv, fb::load_unaligned(col + r * stride) + fb(u[r]));
      fb s(0.0f);
      for (int64_t r = 0; r < rows; ++r)
        s += xsimd::exp((fb::load_unaligned(col + r * stride) + fb(u[r])) - mv);
      (mv + xsimd::log(s)).store_unaligned(out + r0 * L);
    }
  }

  // `width` (<= L) floats from p, zero-padded / the first `width` lanes to p.
  static fb load(const float* p, int64_t width) noexcept {
    if (width == L) return fb::load_unaligned(p);
    alignas(64) float tmp[L] = {};
    for (int64_t j = 0; j < width; ++j) tmp[j] = p[j];
    return fb::load_aligned(tmp);
  }
  static void store(const fb& v, float* p, int64_t width) noexcept {
    if (width == L) return v.store_unaligned(p);
    alignas(64) float tmp[L];
    v.store_aligned(tmp);
    for (int64_t j = 0; j < width; ++j) p[j] = tmp[j];
  }

  __attribute__((flatten)) static void gru_gates(bool rnn, const float* a, const float* b,
                                                 const float* hp, float* out, int64_t n) noexcept {
    const fb one(1.0f);
    for (int64_t i = 0; i < n; i += L) {
      const int64_t w = n - i < L ? n - i : L;
      if (rnn) {
        store(xsimd::tanh(load(a + i, w) + load(b + i, w)), out + i, w);
        continue;
      }
      const fb r = one / (one + xsimd::exp(-(load(a + i, w) + load(b + i, w))));
      const fb z = one / (one + xsimd::exp(-(load(a + n + i, w) + load(b + n + i, w))));
      const fb c = xsimd::tanh(load(a + 2 * n + i, w) + r * load(b + 2 * n + i, w));
      const fb prev = hp != nullptr ? load(hp + i, w) : fb(0.0f);
      store((one - z) * c + z * prev, out + i, w);  // out may alias hp: read before written
    }
  }

  // 16-bit conversions: intrinsics of the unit's instruction set (AVX-512F, or AVX2 + F16C),
  // the scalar reference for the tail. Same bits as the scalar kernel (tests).
#if defined(__AVX512F__)
  static constexpr int64_t kCvt = 16;
#else
  static constexpr int64_t kCvt = 8;
#endif
  static void bf16_to_f32(const uint16_t* x, float* y, int64_t n) noexcept {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + kCvt <= n; i += kCvt) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
      _mm512_storeu_si512(y + i, _mm512_slli_epi32(w, 16));
    }
#elif defined(__AVX2__)
    for (; i + kCvt <= n; i += kCvt) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm256_slli_epi32(w, 16));
    }
#endif
    for (; i < n; ++i) y[i] = from_bf16_bits(x[i]);
  }
  static void f32_to_bf16(const float* x, uint16_t* y, int64_t n) noexcept {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000),
                  half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
    for (; i + kCvt <= n; i += kCvt) {
      const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(x + i));
      const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, odd)), 16);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm512_cvtepi32_epi16(r));
    }
#elif defined(__AVX2__)
    const __m256i abs = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000),
                  half = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x40);
    for (; i + kCvt <= n; i += kCvt) {
      const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + i));
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);  // both non-negative
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
      const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(half, odd)), 16);
      const __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet);
      const __m256i v = _mm256_blendv_epi8(r, q, nan);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                       _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
    }
#endif
    for (; i < n; ++i) y[i] = to_bf16_bits(x[i]);
  }
  static void f16_to_f32(const uint16_t* x, float* y, int64_t n) noexcept {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + kCvt <= n; i += kCvt)
      _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
#elif defined(__F16C__)
    for (; i + kCvt <= n; i += kCvt)
      _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
#endif
    for (; i < n; ++i) y[i] = from_f16_bits(x[i]);
  }
  static void f32_to_f16(const float* x, uint16_t* y, int64_t n) noexcept {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + kCvt <= n; i += kCvt)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                          _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
    for (; i + kCvt <= n; i += kCvt)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; ++i) y[i] = to_f16_bits(x[i]);
  }

  static constexpr RowKernels table(const char* name) noexcept {
    return RowKernels{name,     &matvec,      &scale,       &axpy,        &first_non_finite,
                      &lse_sum, &lse_columns, &gru_gates,   &bf16_to_f32, &f32_to_bf16,
                      &f16_to_f32, &f32_to_f16, &exp_sum, &tdict_decode};
  }
};

}  // namespace
}  // namespace moekit::kernels::detail
