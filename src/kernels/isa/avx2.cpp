// SPDX-License-Identifier: Apache-2.0
// The packed GEMM and the row kernels for AVX2 + FMA (+ F16C for FP8 widening): 6 x 16 register tile. Compiled
// with -mavx2 -mfma -mf16c only (see CMakeLists.txt) and run only on CPUs that report them.
#include <immintrin.h>

#include "../simd_gemm.hpp"
#include "../simd_rows.hpp"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif

namespace moekit::kernels::detail {
namespace {

using Avx2 = xsimd::fma3<xsimd::avx2>;

template <>
struct IsaOps<Avx2> {
  // 6 rows x 2 registers = 12 accumulators (16 ymm registers with b0, b1, a).
  static constexpr int kTileRows = 6;
  // A depth chunk of a strip: 256 x 16 floats = 16 KiB, half of L1.
  static constexpr int64_t kDepthChunk = 256;
  // Chunks of at most this many rows widen reduced weights in registers, not via L1.
  static constexpr int64_t kDirectRows = 6;

  using freg = __m256;
  using ireg = __m256i;

  // a * b + c, one rounding.
  static __m256 fmadd(__m256 a, __m256 b, __m256 c) noexcept { return _mm256_fmadd_ps(a, b, c); }

  // 8 bf16 -> f32 (exact: the bits move to the top half).
  static __m256 widen_bf16(const uint16_t* p) noexcept {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
  // 8 f16 -> f32 (F16C, exact).
  static __m256 widen_f16(const uint16_t* p) noexcept {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // 8 int8 -> f32.
  static __m256 widen_s8(const int8_t* p) noexcept {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // 16 e4m3 -> f32 times 2^-8, exactly: each byte S.EEEE.MMM becomes the fp16 S.0EEEE.MMM0000000
  // (same bias offset for normals and subnormals), widened by F16C. The caller multiplies by
  // 256 * scale, which rounds exactly like fp8_e4m3_to_float(v) * scale. No NaN code occurs
  // (packing maps NaN weights to 0).
  static void widen_fp8(const uint8_t* p, __m256& lo, __m256& hi) noexcept {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i z = _mm_setzero_si128(), mask = _mm_set1_epi16(static_cast<short>(0xBFFF));
    const __m128i h0 = _mm_and_si128(_mm_srai_epi16(_mm_unpacklo_epi8(z, v), 1), mask);
    const __m128i h1 = _mm_and_si128(_mm_srai_epi16(_mm_unpackhi_epi8(z, v), 1), mask);
    lo = _mm256_cvtph_ps(h0);
    hi = _mm256_cvtph_ps(h1);
  }

  // 8 unsigned bytes -> f32.
  static __m256 widen_u8(const uint8_t* p) noexcept {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // 8 bytes of int4 codes -> the codes (0-15) as f32: low nibbles (columns 0-7) and high ones
  // (columns 8-15).
  static void widen_u4(const uint8_t* p, __m256& lo, __m256& hi) noexcept {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, m)));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), m)));
  }

  // Dictionary-coded ternaries (see avx512_ops.hpp): bit l of each mask moved to lane l's
  // sign bit (a variable shift), which vblendvps reads.
  static __m256 ternary_select(uint32_t lo_bits, uint32_t hi_bits, __m256 lo, __m256 hi) noexcept {
    const __m256i sh = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    const __m256 ml = _mm256_castsi256_ps(_mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(lo_bits)), sh));
    const __m256 mh = _mm256_castsi256_ps(_mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(hi_bits)), sh));
    return _mm256_blendv_ps(_mm256_blendv_ps(_mm256_setzero_ps(), hi, mh), lo, ml);
  }

  // Ternary codes (see avx512_ops.hpp): 8 bytes to 32-bit lanes, shifts, and an 8-entry f32
  // table lookup (vpermps on the low 3 bits).
  static __m256i widen_u8_i(const uint8_t* p) noexcept {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static __m256i srli_i(__m256i v, int n) noexcept { return _mm256_srli_epi32(v, n); }
  static __m256 lookup(__m256i idx, __m256 table) noexcept { return _mm256_permutevar8x32_ps(table, idx); }

  // w4a8 codes of 2 depths (16 bytes: byte 2c + e holds depth e of columns c and c + 8) ->
  // int16 pairs of columns 0-7 (low nibbles) and 8-15 (high ones).
  static void widen_u4_pairs(const uint8_t* p, __m256i& lo, __m256i& hi) noexcept {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
    hi = _mm256_srli_epi16(v, 4);
  }

  // 16 int8 (8 columns x 2 depths) -> 16 int16 = 8 lanes of (k, k+1) pairs.
  static __m256i widen_s8_pairs(const int8_t* p) noexcept {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // One 32-bit word (an int16 pair of A) in every lane.
  static __m256i broadcast_word(const float* p) noexcept {
    return _mm256_castps_si256(_mm256_broadcast_ss(p));
  }
  static __m256i madd(__m256i a, __m256i b) noexcept { return _mm256_madd_epi16(a, b); }
  static __m256i add_i(__m256i a, __m256i b) noexcept { return _mm256_add_epi32(a, b); }
  static __m256i zero_i() noexcept { return _mm256_setzero_si256(); }
  static __m256i set1_i(int32_t v) noexcept { return _mm256_set1_epi32(v); }
  static __m256i load_i(const int32_t* p) noexcept {
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
  }
  static void store_i(int32_t* p, __m256i v) noexcept {
    _mm256_store_si256(reinterpret_cast<__m256i*>(p), v);
  }
  static __m256 to_float(__m256i v) noexcept { return _mm256_cvtepi32_ps(v); }
};

}  // namespace

extern const GemmKernel kGemmAvx2;
const GemmKernel kGemmAvx2{Avx2::name(), SimdGemm<Avx2>::P, IsaOps<Avx2>::kTileRows,
                           &SimdGemm<Avx2>::run, &implements_all};

extern const RowKernels kRowsAvx2;
constinit const RowKernels kRowsAvx2 = SimdRows<Avx2>::table(Avx2::name());

}  // namespace moekit::kernels::detail
