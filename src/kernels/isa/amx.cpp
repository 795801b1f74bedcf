// SPDX-License-Identifier: Apache-2.0
// bf16 x bf16 on AMX-BF16 (tdpbf16ps) and w8a8 on AMX-INT8 (tdpbsud): a specialised kernel
// that implements those two formats on the tile unit, in the packed layouts of avx512_bf16
// (depth pairs per column, `[k/2, 32, 2]`) and avx512_vnni (depth quads per column, weights
// stored + 128 as unsigned bytes), so the bytes a pack writes are the same for both and a
// 16-row B tile is 16 consecutive packed depth groups of one 16-column half of a strip (128
// bytes apart). Compiled with the AMX flags on top of the AVX-512 ones (CMakeLists.txt), run
// only where the CPU reports AMX-TILE/BF16/INT8, the OS saves the tile state and Linux
// granted it (request_amx_permission()).
//
// Tiles: tmm0-3 hold a 32 x 32 block of sums (2 row tiles x 2 column tiles), tmm4-5 two
// 16-row tiles of activations (32 bf16 or 64 int8 depths), tmm6-7 the strip's two column
// tiles. Activations are packed per chunk of kRowChunk rows, row-major with the depth padded
// with zeros to a whole tile (32 bf16 / 64 int8); the weights' last partial depth tile is
// copied into a zero-padded buffer (it is never read past the strip). The sums leave the
// tiles through a 32 x 32 buffer into the AVX-512 kernel's epilogue (bias, activation, gated
// product), so everything after the dot products is the AVX-512 kernel's code.
//
// Numerics: w8a8 sums are exact int32 (wrapping like vpdpbusd; the true sum fits), the
// + 128 is removed per row as in avx512_vnni, and (float(sum) * row scale) * column scale is
// the same product: w8a8 equals every other kernel bit for bit. tdpbf16ps sums in an order of
// its own (measured on a Sapphire Rapids Xeon: no sequential fma order over the pairs, in
// either order, nor an exact per-tile sum reproduces it), so bf16 x bf16 agrees with the
// other kernels within float rounding (GemmKernel::bit_exact is false). Each output depends
// on its own row and column only, in a fixed order over k: results do not depend on m, the
// row tiling or the thread split.
#include "avx512_ops.hpp"
#include "../simd_rows.hpp"

// GCC spells the AMX macros __AMX_TILE__, clang __AMXTILE__.
#if !(defined(__AMX_TILE__) || defined(__AMXTILE__)) || !(defined(__AMX_BF16__) || defined(__AMXBF16__)) || \
    !(defined(__AMX_INT8__) || defined(__AMXINT8__)) || !defined(__AVX512BF16__) || !defined(__AVX512VNNI__)
#error "amx.cpp must be compiled with -mamx-tile -mamx-bf16 -mamx-int8 -mavx512bf16 -mavx512vnni"
#endif

namespace moekit::kernels::detail {
namespace {

// The AVX-512 ops as they are: this unit uses SimdGemm only for its epilogue and its int8
// quantiser (the dot products are the tiles'; the VNNI layout is the kernel entry's
// int8_group = 4 below).
template <>
struct IsaOps<Avx512> : Avx512Ops {};

using Simd = SimdGemm<Avx512>;
using fb = Simd::fb;
constexpr int64_t P = Simd::P;  // 32 columns per strip: two 16-column tiles
static_assert(P == 32, "a strip is two 16-column tiles");
constexpr int64_t kLineBytes = 128;  // one packed depth group (pair / quad) of a strip
constexpr int64_t kTileDepthGroups = 16;
constexpr int64_t kTileBytes = kTileDepthGroups * kLineBytes;
static_assert(kRowChunk % 32 == 0 && kAmxTileRows == 16, "chunks of whole 16-row tiles");

// The tile palette: 8 tiles of 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the palette on construction (the calling thread's tiles) and releases the tile state
// on destruction, so a thread keeps no AMX state between GEMMs.
struct Tiles {
  Tiles() noexcept {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
  }
  ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

enum class Dot { bf16, s8 };

// The strip's last `tail` (< 16) depth groups, zero-padded to a whole tile (`fill`: the byte
// of a zero weight).
void copy_tail(const uint8_t* from, int64_t tail, uint8_t fill, uint8_t* to) noexcept {
  std::memcpy(to, from, static_cast<size_t>(tail * kLineBytes));
  std::memset(to + tail * kLineBytes, fill, static_cast<size_t>((kTileDepthGroups - tail) * kLineBytes));
}

// Weight tiles a strip stream prefetches ahead (2 KiB each), on the first row block of a
// strip: the later ones find the strip in L2.
constexpr int64_t kPrefetchTiles = 4;

// The sums of rows [0, 16 or 32) x the strip's 32 columns over `steps` depth tiles:
// A rows `a_stride` bytes apart, weights `S` (full tiles), the last step from `tail` when
// non-null. Leaves them in `out` (`[32, 32]` f32 or int32).
template <Dot D>
void tile_block(const uint8_t* a, int64_t a_stride, const uint8_t* S, int64_t steps,
                const uint8_t* tail, bool two_row_tiles, bool prefetch, void* out) noexcept {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t t = 0; t < steps; ++t) {
    const uint8_t* b = (tail != nullptr && t == steps - 1) ? tail : S + t * kTileBytes;
    const uint8_t* at = a + t * 64;
    if (prefetch) {  // past the strip this is the next strip's start: never faults
      const char* ahead = reinterpret_cast<const char*>(S + (t + kPrefetchTiles) * kTileBytes);
      for (int64_t l = 0; l < kTileBytes; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
    }
    _tile_loadd(6, b, kLineBytes);
    _tile_loadd(7, b + 64, kLineBytes);
    _tile_loadd(4, at, a_stride);
    if constexpr (D == Dot::bf16) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
    } else {
      _tile_dpbsud(0, 4, 6);
      _tile_dpbsud(1, 4, 7);
    }
    if (two_row_tiles) {
      _tile_loadd(5, at + 16 * a_stride, a_stride);
      if constexpr (D == Dot::bf16) {
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      } else {
        _tile_dpbsud(2, 5, 6);
        _tile_dpbsud(3, 5, 7);
      }
    }
  }
  auto* o = static_cast<uint8_t*>(out);
  _tile_stored(0, o, P * 4);
  _tile_stored(1, o + 64, P * 4);
  if (two_row_tiles) {
    _tile_stored(2, o + 16 * P * 4, P * 4);
    _tile_stored(3, o + 16 * P * 4 + 64, P * 4);
  }
}

// One activation row rounded to bf16 (the shared conversion: round to nearest even, NaN kept
// quiet), zeros from k to `padded`.
void pack_row_bf16(const float* x, int64_t k, int64_t padded, uint16_t* out) noexcept {
  SimdRows<Avx512>::f32_to_bf16(x, out, k);
  std::memset(out + k, 0, static_cast<size_t>((padded - k) * 2));
}

// One activation row quantised to int8 as every w8a8 kernel does (the AVX-512 kernel's
// scale and lane quantiser), zeros from k to `padded`; returns the scale and sets `bias` to
// 128 * (the sum of the codes), modulo 2^32 (what the weights' + 128 adds to each sum).
float pack_row_s8(const float* x, int64_t k, int64_t padded, int8_t* out, int32_t& bias) noexcept {
  constexpr int64_t L = Simd::L;
  const float s = int8_scale(Simd::abs_max_simd(x, k));
  alignas(64) float q[L];
  __m512i sum = _mm512_setzero_si512();
  for (int64_t p0 = 0; p0 < k; p0 += L) {
    const int64_t n = imin(L, k - p0);
    if (s > 0.0f) {
      Simd::quantize_lanes(x + p0, n, s, q);  // lanes past n are 0
    } else {
      std::memset(q, 0, sizeof(q));
    }
    const __m512i codes = _mm512_cvtps_epi32(_mm512_load_ps(q));
    sum = _mm512_add_epi32(sum, codes);
    _mm512_mask_cvtepi32_storeu_epi8(out + p0, static_cast<__mmask16>((1u << n) - 1u), codes);
  }
  std::memset(out + k, 0, static_cast<size_t>(padded - k));
  bias = static_cast<int32_t>(128u * static_cast<uint32_t>(_mm512_reduce_add_epi32(sum)));
  return s;
}

void run_amx(const GemmCall& g) noexcept {
  const bool bf16 = g.type == WeightType::bf16;
  // Depth groups (pairs / quads) of the packed strips, and depths per tile step.
  const int64_t tile_depth = bf16 ? 32 : 64;
  const int64_t groups = bf16 ? g.depth / 2 : (g.k + 3) / 4;
  const int64_t steps = (groups + kTileDepthGroups - 1) / kTileDepthGroups;
  const int64_t tail_groups = groups % kTileDepthGroups;
  const int64_t padded = steps * tile_depth;  // depths per packed activation row
  const int64_t a_stride = padded * (bf16 ? 2 : 1);
  alignas(64) uint8_t tail[kTileBytes];
  alignas(64) float sums[32 * P];
  fb c[32][2];
  float a_scale[kRowChunk];
  int32_t a_bias[kRowChunk];
  Tiles tiles;
  for (int64_t m0 = 0; m0 < g.m; m0 += kRowChunk) {
    const int64_t mc = imin(kRowChunk, g.m - m0), rows = (mc + 15) / 16 * 16;
    auto* a = reinterpret_cast<uint8_t*>(g.a_pack);
    for (int64_t i = 0; i < rows; ++i) {
      uint8_t* row = a + i * a_stride;
      if (i >= mc) {
        std::memset(row, 0, static_cast<size_t>(a_stride));
        continue;
      }
      const float* x = g.A + (m0 + i) * g.lda;
      if (bf16) {
        pack_row_bf16(x, g.k, padded, reinterpret_cast<uint16_t*>(row));
      } else {
        a_scale[i] = pack_row_s8(x, g.k, padded, reinterpret_cast<int8_t*>(row), a_bias[i]);
      }
    }
    for (int64_t s = g.strip_begin; s < g.strip_end; ++s) {
      const uint8_t* S = g.data + s * g.strip_bytes;
      const uint8_t* tail_tile = nullptr;
      if (tail_groups != 0) {
        copy_tail(S + (steps - 1) * kTileBytes, tail_groups, bf16 ? 0 : 128, tail);
        tail_tile = tail;
      }
      for (int64_t i0 = 0; i0 < mc; i0 += 32) {
        const int64_t r = imin(32, mc - i0);
        const bool two = r > 16;
        if (steps == 0) {
          std::memset(sums, 0, sizeof(sums));
        } else if (bf16) {
          tile_block<Dot::bf16>(a + i0 * a_stride, a_stride, S, steps, tail_tile, two, i0 == 0, sums);
        } else {
          tile_block<Dot::s8>(a + i0 * a_stride, a_stride, S, steps, tail_tile, two, i0 == 0, sums);
        }
        if (bf16) {
          for (int64_t j = 0; j < r; ++j) {
            c[j][0] = fb::load_aligned(sums + j * P);
            c[j][1] = fb::load_aligned(sums + j * P + 16);
          }
        } else {
          const fb w0 = fb::load_unaligned(g.col_scale + s * P),
                   w1 = fb::load_unaligned(g.col_scale + s * P + 16);
          const auto* isum = reinterpret_cast<const int32_t*>(sums);
          for (int64_t j = 0; j < r; ++j) {
            const __m512i b = _mm512_set1_epi32(a_bias[i0 + j]);
            const __m512i s0 = _mm512_sub_epi32(_mm512_load_si512(isum + j * P), b);
            const __m512i s1 = _mm512_sub_epi32(_mm512_load_si512(isum + j * P + 16), b);
            const fb as(a_scale[i0 + j]);
            c[j][0] = fb(_mm512_cvtepi32_ps(s0)) * as * w0;
            c[j][1] = fb(_mm512_cvtepi32_ps(s1)) * as * w1;
          }
        }
        Simd::epilogue(g, m0 + i0, r, s, c);
      }
    }
  }
}

bool implements_amx(WeightType type, bool bf16_activations) noexcept {
  return (type == WeightType::bf16 && bf16_activations) || type == WeightType::w8a8;
}

}  // namespace

extern const GemmKernel kGemmAmx;
const GemmKernel kGemmAmx{"amx",
                          P,
                          16,
                          &run_amx,
                          &implements_amx,
                          /*int8_group=*/4,
                          /*bf16_pairs=*/true,
                          /*bf16_plain=*/false,
                          /*bit_exact=*/false};

}  // namespace moekit::kernels::detail
