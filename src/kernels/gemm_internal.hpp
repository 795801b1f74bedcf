// SPDX-License-Identifier: Apache-2.0
// Private to the packed-GEMM sources: the plain-data call record every kernel receives, the
// packed storage layout, the quantisation rules, and the table of compiled kernels.
//
// This header is included by the per-ISA translation units, which are compiled with their own
// instruction-set flags: everything it defines must be either plain data or have internal
// linkage (the anonymous namespace below), so no function compiled there can be emitted as a
// weak symbol that the linker might pick for a generic translation unit.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "convert_internal.hpp"
#include "moekit/activation.hpp"
#include "moekit/kernels/packed_gemm.hpp"

namespace moekit::kernels::detail {

/// What an epilogue does with a finished `[rows, columns]` tile.
enum class GemmMode : uint8_t {
  store,       ///< C = A W^T
  accumulate,  ///< C += A W^T
  act,         ///< H = act(A W^T)
  gated,       ///< H = act(A G^T) * (A U^T), W packed gated
  gated_clamped,  ///< H = clamped_swiglu(A G^T + b_g, A U^T + b_u), W packed gated (gpt-oss)
};

/// One GEMM call as plain data (the kernels never see PackedMatrix, so the per-ISA units
/// include no inline member function). Packed layout of strip s (`strip_bytes` apart, each
/// 64-byte aligned) with panel P, depth p, packed column j in [0, P):
///  - f32 / bf16 / int8 / fp8: element (p * P + j), of 4 / 2 / 1 / 1 bytes;
///  - w8a8: int8 at (p / G) * GP + Gj + p % G (k padded to a multiple of G = int8_group with
///    zeros): G = 2 widens to int16 pairs along k for a 2-MACs-per-lane multiply-add
///    (vpmaddwd); G = 4 stores w + 128 as unsigned bytes for vpdpbusd (4 MACs per lane).
///  - bf16 x bf16 (bf16 weights, bf16 activations; `pairs`): k padded to even; with
///    bf16_pairs at (p / 2) * 2P + 2j + p % 2, else at (p ^ 1) * P + j (each pair's rows
///    swapped, so a sequential sum over the packed rows takes the odd depth first).
///  - int4: groups of kInt4Group = 32 depths, int4_group_bytes(P) apart: first 32 rows of
///    P/2 bytes (byte j of depth row p: column j in the low nibble, column j + P/2 in the high
///    one; code = q + 8), then the group's P bf16 scales; the last group is zero-padded.
///  - int4zp: the same, codes q (value (q - z) d), and after the scales P zero-point bytes z.
///  - ternary: depth groups of 4, P bytes each: byte j of group q holds packed column j's codes
///    of depths 4q .. 4q + 3 (depth 4q + e at bits [2e, 2e + 2), 2-bit two's complement:
///    +1 = 01, -1 = 11, 0 = 00); the last group is zero-padded.
///  - w4a8: int4's groups, the code bytes interleaved in depth groups of G = int8_group:
///    byte nibble_index(q, j % (P/2), P/2, G) of the group holds depth q's codes (the operand
///    layout of vpmaddwd on zero-extended bytes, G = 2, or of vpdpbusd, G = 4).
/// Gated strips hold P/2 gate columns then the same P/2 up columns.
struct GemmCall {
  // the operation
  int64_t m;
  const float* A;
  int64_t lda;
  float* out;
  int64_t ldo;
  float* a_pack;
  GemmMode mode;
  Activation act;
  int64_t strip_begin, strip_end;  // resolved: 0 <= begin < end <= strips
  /// Biases added to the sums before the epilogue, each `[n]` or null (none): `bias` on the
  /// output column (gated: on the gate), `bias_up` on the up half of a gated matrix.
  const float* bias;
  const float* bias_up;
  ClampedSwiglu glu;  ///< gated_clamped's constants
  // the packed matrix
  WeightType type;
  bool gated;
  bool bf16_act;
  /// bf16 x bf16: depths summed in pairs, odd first (see PackOptions::bf16_activations).
  bool pairs;
  int64_t n, k, panel;
  /// Packed depth rows the kernel sums over: k, or k rounded up to even for `pairs`.
  int64_t depth;
  const uint8_t* data;
  int64_t strip_bytes;
  /// int8 / w8a8 / ternary: scale of each packed column (`[strips, P]`, 0 in the padding).
  const float* col_scale;
  /// fp8: scale of each (strip, 128-deep k block, half): `[strips, k_blocks, 2]`, half 0
  /// covering packed columns [0, P/2), half 1 [P/2, P) (the same block unless gated).
  const float* fp8_scale;
  int64_t k_blocks;
  /// int4 / w4a8: group scales are f16, not bf16 (PackOptions::f16_scales).
  bool f16_scales;
  /// The caller's MXCSR treats subnormal inputs as zero (DAZ): kernels must not widen
  /// through f32 subnormals (fp8 then takes the F16C path).
  bool daz;
};

/// Depth of an FP8 scale block (and of the block grid along n).
inline constexpr int64_t kFp8Block = 128;
/// Depths per int4 group (one bf16 scale per group and column).
inline constexpr int64_t kInt4Group = 32;

/// Rows packed at a time by the SIMD kernels (a multiple of every kernel's row tile).
inline constexpr int64_t kRowChunk = 96;
/// The largest register row tile of the SIMD kernels, and the rows of an AMX tile:
/// packed_a_floats() sizes the scratch for whole tiles of either.
inline constexpr int64_t kMaxTileRows = 12;
inline constexpr int64_t kAmxTileRows = 16;

// The kernels, defined one per translation unit (the SIMD ones only when compiled in).
extern const GemmKernel kGemmScalar;
#if defined(MOEKIT_HAVE_KERNEL_AVX2)
extern const GemmKernel kGemmAvx2;
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512)
extern const GemmKernel kGemmAvx512;
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512_BF16)
extern const GemmKernel kGemmAvx512Bf16;
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512_VNNI)
extern const GemmKernel kGemmAvx512Vnni;
#endif
#if defined(MOEKIT_HAVE_KERNEL_AMX)
extern const GemmKernel kGemmAmx;
#endif
#if defined(MOEKIT_HAVE_KERNEL_ONEDNN)
extern const GemmKernel kGemmOneDnn;
/// Whether oneDNN is expected to beat moekit's own kernels for the format on this CPU (AMX
/// granted: bf16 x bf16 with AMX-BF16, w8a8 with AMX-INT8), so the table gives it the format
/// without MOEKIT_KERNEL naming it.
bool onednn_preferred(WeightType type, bool bf16_activations) noexcept;
#endif

namespace {

/// Bytes of one int4 group of a strip of panel P: 32 rows of P/2 code bytes, P bf16 scales,
/// and for int4zp P zero-point bytes.
constexpr int64_t int4_group_bytes(int64_t P, bool zero_points = false) noexcept {
  return kInt4Group * (P / 2) + 2 * P + (zero_points ? P : 0);
}

/// Byte of a 4-bit group's code area holding depth q (< 32) of packed columns c and c + half
/// (c < half), the depths interleaved in groups of g (1: depth rows of `half` bytes).
constexpr int64_t nibble_index(int64_t q, int64_t c, int64_t half, int64_t g) noexcept {
  return (q / g) * g * half + g * c + q % g;
}

/// Writes the finished sums `acc[0, P)` of output row i, strip s (panel P) as the call's mode
/// says (the portable kernels' epilogue; gated: act(gate) * up over the strip's halves).
inline void epilogue_row(const GemmCall& g, int64_t i, int64_t s, const float* acc,
                         int64_t P) noexcept {
  float* row = g.out + i * g.ldo;
  const int64_t half = P / 2;
  if (g.mode == GemmMode::gated || g.mode == GemmMode::gated_clamped) {
    for (int64_t j = 0; j < half && s * half + j < g.n; ++j) {
      const int64_t col = s * half + j;
      const float gv = g.bias ? acc[j] + g.bias[col] : acc[j];
      const float uv = g.bias_up ? acc[half + j] + g.bias_up[col] : acc[half + j];
      row[col] = g.mode == GemmMode::gated ? activate(g.act, gv) * uv : clamped_swiglu(g.glu, gv, uv);
    }
    return;
  }
  for (int64_t j = 0; j < P && s * P + j < g.n; ++j) {
    float& c = row[s * P + j];
    const float v = g.bias ? acc[j] + g.bias[s * P + j] : acc[j];
    switch (g.mode) {
      case GemmMode::accumulate:
        c = v + c;
        break;
      case GemmMode::act:
        c = activate(g.act, v);
        break;
      default:
        c = v;
        break;
    }
  }
}

/// A general kernel's GemmKernel::implements: every format.
inline bool implements_all(WeightType, bool) noexcept { return true; }

/// Rounds to bfloat16, round to nearest even; NaN stays a (quiet) NaN. Returns the bits.
inline uint16_t bf16_bits(float x) noexcept { return to_bf16_bits(x); }

inline float bf16_to_float(uint16_t b) noexcept { return from_bf16_bits(b); }

/// `x` rounded to the nearest bfloat16 value (as f32).
inline float round_bf16(float x) noexcept { return bf16_to_float(bf16_bits(x)); }

/// IEEE half bits to float (exact; subnormals, infinities and NaN kept).
inline float f16_to_float(uint16_t h) noexcept { return from_f16_bits(h); }
/// A 4-bit group's scale from its stored bits (f16 or bf16).
inline float int4_scale(uint16_t bits, bool f16) noexcept { return f16 ? f16_to_float(bits) : bf16_to_float(bits); }

/// Depth groups of 4 of a ternary strip (one byte per packed column each).
constexpr int64_t ternary_depth_groups(int64_t k) noexcept { return (k + 3) / 4; }

/// The ternary scale of a column w[0, k): the mean of |w| over its finite values (BitNet
/// b1.58's absmean, per output column), except that a column whose finite non-zero values all
/// have one magnitude m (already ternary: {-m, 0, m}) gets m, so it packs back exactly. 0 for
/// a column without finite non-zero values.
inline float ternary_scale(const float* w, int64_t k) noexcept {
  double sum = 0.0;
  int64_t n = 0;
  float m = 0.0f;
  bool one_magnitude = true;
  for (int64_t p = 0; p < k; ++p) {
    const float a = std::fabs(w[p]);
    if (!(a <= FLT_MAX)) continue;  // NaN, infinities
    sum += a;
    ++n;
    if (a == 0.0f) continue;
    if (m == 0.0f) m = a;
    one_magnitude = one_magnitude && a == m;
  }
  if (m == 0.0f) return 0.0f;
  return one_magnitude ? m : static_cast<float>(sum / static_cast<double>(n));
}

/// The ternary code of w with scale s: clamp(round(w / s), -1, 1) (round to nearest even);
/// NaN or s = 0 -> 0; infinities saturate.
inline int ternary_code(float w, float s) noexcept {
  if (!(s > 0.0f) || std::isnan(w)) return 0;
  const float r = std::nearbyint(w / s);
  return r >= 1.0f ? 1 : (r <= -1.0f ? -1 : 0);
}

/// The code at bits [2e, 2e + 2) of a ternary byte as -1, 0 or +1 (two's complement).
constexpr int ternary_value(uint8_t byte, int64_t e) noexcept {
  const int c = (byte >> (2 * e)) & 3;
  return c == 3 ? -1 : c;
}

/// Symmetric int8 scale of values whose largest magnitude is `amax` (0 for an all-zero row).
inline float int8_scale(float amax) noexcept { return amax / 127.0f; }

/// Quantises x with scale s (> 0) to [-127, 127], round to nearest even; NaN -> 0.
inline int8_t quantize_s8(float x, float s) noexcept {
  if (!(s > 0.0f)) return 0;
  const float r = std::nearbyint(x / s);
  if (!(r == r)) return 0;
  return static_cast<int8_t>(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
}

/// Largest finite magnitude of x[0, k) (NaN and infinities ignored: they then quantise to 0
/// and to the extreme code respectively).
inline float abs_max(const float* x, int64_t k) noexcept {
  float m = 0.0f;
  for (int64_t p = 0; p < k; ++p) {
    const float a = std::fabs(x[p]);
    m = a > m && a <= FLT_MAX ? a : m;
  }
  return m;
}

/// Quantises x[0, n) with its own symmetric int8 scale (returned) into out[0, n): the codes
/// as int8, or as exact floats for the portable kernels.
template <class T>
inline float quantize_row(const float* x, int64_t n, T* out) noexcept {
  const float s = int8_scale(abs_max(x, n));
  for (int64_t p = 0; p < n; ++p) out[p] = static_cast<T>(quantize_s8(x[p], s));
  return s;
}

}  // namespace
}  // namespace moekit::kernels::detail
