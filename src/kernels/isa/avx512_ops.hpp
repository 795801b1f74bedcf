// SPDX-License-Identifier: Apache-2.0
// The AVX-512 (F, BW, DQ, VL) operations of the packed GEMM, shared by the units compiled
// with AVX-512 flags: avx512.cpp (the general kernel) and the specialised avx512_bf16.cpp and
// avx512_vnni.cpp, which add their instruction to these. Internal linkage only (see
// gemm_internal.hpp).
#pragma once

#include <immintrin.h>

#include "../simd_gemm.hpp"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512DQ__) || \
    !defined(__AVX512VL__)
#error "AVX-512 units must be compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma"
#endif

namespace moekit::kernels::detail {
namespace {

using Avx512 = xsimd::avx512bw;

struct Avx512Ops {
  // 12 rows x 2 registers = 24 accumulators (of 32 zmm registers).
  static constexpr int kTileRows = 12;
  // A depth chunk of a strip: 128 x 32 floats = 16 KiB, half of L1.
  static constexpr int64_t kDepthChunk = 128;
  // Chunks of at most this many rows widen reduced weights in registers, not via L1.
  static constexpr int64_t kDirectRows = 4;

  using freg = __m512;
  using ireg = __m512i;

  // a * b + c, one rounding.
  static __m512 fmadd(__m512 a, __m512 b, __m512 c) noexcept { return _mm512_fmadd_ps(a, b, c); }

  // 16 bf16 -> f32.
  static __m512 widen_bf16(const uint16_t* p) noexcept {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
  // 16 f16 -> f32 (exact).
  static __m512 widen_f16(const uint16_t* p) noexcept {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // 16 int8 -> f32.
  static __m512 widen_s8(const int8_t* p) noexcept {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // 32 e4m3 -> f32 times 2^-8 via fp16 (see avx2.cpp).
  static __m512 fp8_half(const uint8_t* p) noexcept {
    const __m256i x = _mm256_slli_epi16(
        _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 8);
    const __m256i h =
        _mm256_and_si256(_mm256_srai_epi16(x, 1), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
    return _mm512_cvtph_ps(h);
  }
  static void widen_fp8(const uint8_t* p, __m512& lo, __m512& hi) noexcept {
    lo = fp8_half(p);
    hi = fp8_half(p + 16);
  }
  // 16 e4m3 -> f32 times 2^-120, exactly, in three integer operations (no F16C round trip):
  // each byte S.EEEE.MMM sign-extended and shifted left by 20 puts EEEE.MMM in the low four
  // exponent bits and the top three mantissa bits, the mask keeps them and the sign: a normal
  // code becomes 2^(E - 127) (1 + M / 8), a subnormal one the f32 subnormal M 2^-129, both the
  // code's value times 2^-120. The caller multiplies by 2^120 * scale, which rounds exactly
  // like fp8_e4m3_to_float(v) * scale while that factor is finite (scales below 2^8), and
  // only when the MXCSR does not treat subnormal inputs as zero (DAZ).
  static constexpr float kFp8DirectUnscale = 0x1p120f;
  static __m512 fp8_direct(const uint8_t* p) noexcept {
    const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_slli_epi32(v, 20), _mm512_set1_epi32(static_cast<int>(0x87F00000u))));
  }
  static void widen_fp8_direct(const uint8_t* p, __m512& lo, __m512& hi) noexcept {
    lo = fp8_direct(p);
    hi = fp8_direct(p + 16);
  }

  // 16 unsigned bytes -> f32.
  static __m512 widen_u8(const uint8_t* p) noexcept {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // 16 bytes of int4 codes -> the codes (0-15) as f32: low nibbles (columns 0-15) and high
  // ones (columns 16-31).
  static void widen_u4(const uint8_t* p, __m512& lo, __m512& hi) noexcept {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, m)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), m)));
  }

  // Dictionary-coded ternaries: lane l is lo when bit l of lo_bits is set, hi when bit l of
  // hi_bits is, else 0 (two masked moves).
  static __m512 ternary_select(uint32_t lo_bits, uint32_t hi_bits, __m512 lo, __m512 hi) noexcept {
    return _mm512_mask_mov_ps(_mm512_maskz_mov_ps(static_cast<__mmask16>(lo_bits), lo), static_cast<__mmask16>(hi_bits),
                              hi);
  }

  // Ternary codes: 16 bytes zero-extended to 32-bit lanes (once per 4 depths), a lane shifted
  // right, and the value its low 4 bits select from a 16-entry f32 table (vpermps; the table
  // repeats every 4 entries, so only the code's 2 bits matter).
  static __m512i widen_u8_i(const uint8_t* p) noexcept {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m512i srli_i(__m512i v, int n) noexcept { return _mm512_srli_epi32(v, static_cast<unsigned>(n)); }
  static __m512 lookup(__m512i idx, __m512 table) noexcept { return _mm512_permutexvar_ps(idx, table); }

  // w4a8 codes of 2 depths (32 bytes: byte 2c + e holds depth e of columns c and c + 16) ->
  // int16 pairs of columns 0-15 (low nibbles) and 16-31 (high ones).
  static void widen_u4_pairs(const uint8_t* p, __m512i& lo, __m512i& hi) noexcept {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    lo = _mm512_and_si512(v, _mm512_set1_epi16(0x0F));
    hi = _mm512_srli_epi16(v, 4);
  }
  // w4a8 codes of 4 depths (64 bytes, byte 4c + e: depth e of columns c and c + 16) ->
  // unsigned bytes of columns 0-15 (low nibbles) and 16-31 (high ones), for vpdpbusd.
  static void split_u4_quads(const uint8_t* p, __m512i& lo, __m512i& hi) noexcept {
    const __m512i v = _mm512_loadu_si512(p);
    const __m512i m = _mm512_set1_epi8(0x0F);
    lo = _mm512_and_si512(v, m);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
  }

  // 32 int8 (16 columns x 2 depths) -> 16 lanes of int16 (k, k+1) pairs.
  static __m512i widen_s8_pairs(const int8_t* p) noexcept {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512i broadcast_word(const float* p) noexcept {
    return _mm512_castps_si512(_mm512_set1_ps(*p));
  }
  static __m512i madd(__m512i a, __m512i b) noexcept { return _mm512_madd_epi16(a, b); }
  static __m512i add_i(__m512i a, __m512i b) noexcept { return _mm512_add_epi32(a, b); }
  static __m512i zero_i() noexcept { return _mm512_setzero_si512(); }
  static __m512i load_i(const int32_t* p) noexcept { return _mm512_load_si512(p); }
  static void store_i(int32_t* p, __m512i v) noexcept { _mm512_store_si512(p, v); }
  static __m512i set1_i(int32_t v) noexcept { return _mm512_set1_epi32(v); }
  static __m512i sub_i(__m512i a, __m512i b) noexcept { return _mm512_sub_epi32(a, b); }
  static __m512 to_float(__m512i v) noexcept { return _mm512_cvtepi32_ps(v); }
};

}  // namespace
}  // namespace moekit::kernels::detail
