// SPDX-License-Identifier: Apache-2.0
// The SIMD packed GEMM, written once against xsimd::batch<float, Arch> and instantiated in one
// translation unit per instruction set (src/kernels/isa/gemm_<isa>.cpp, each compiled with its
// own flags). That unit specialises IsaOps<Arch> (row tile, depth chunk, and the handful of
// widening / integer multiply-add intrinsics xsimd has no wrapper for) before instantiating.
//
// Register-blocked MR x 2-register micro-kernel over one packed strip; rows in chunks of
// kRowChunk (A packed k-major per row tile), depth in chunks that stay in L1 across the row
// tiles with partial sums parked in between. Reduced-precision weights are widened to f32
// either once per (row chunk, strip, depth chunk) into an L1 buffer that the f32 micro-kernel
// then reads for every row tile (prefill), or in registers inside the micro-kernel when the
// chunk has few rows (decode: the weights stream from DRAM once). Both give the same values.
// w8a8 multiplies int16 pairs along k into exact int32 sums (vpmaddwd).
//
// Every output is summed sequentially over k whatever m, the row tiling, the path or the strip
// range, so results are bit-identical for any thread split. The multiply-adds are the ISA's
// fused instruction (Ops::fmadd), never xsimd::fma: xsimd 8.1 has no AVX-512 fma and falls back
// to a separate multiply and add (two roundings, half the throughput).
//
// Everything here has internal linkage (anonymous namespace): see gemm_internal.hpp.
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <xsimd/xsimd.hpp>

#include "gemm_internal.hpp"

namespace moekit::kernels::detail {
namespace {

/// Per-ISA constants and intrinsics; specialised by each per-ISA translation unit.
template <class Arch>
struct IsaOps;

inline int64_t imin(int64_t a, int64_t b) noexcept { return a < b ? a : b; }

template <class Arch>
struct SimdGemm {
  using Ops = IsaOps<Arch>;
  using fb = xsimd::batch<float, Arch>;
  using ireg = typename Ops::ireg;
  static constexpr int64_t L = static_cast<int64_t>(fb::size);
  static constexpr int64_t P = 2 * L;
  static constexpr int MR = Ops::kTileRows;
  static constexpr int64_t KC = Ops::kDepthChunk;
  static constexpr int64_t kDirectRows = Ops::kDirectRows;
  static_assert(kRowChunk % MR == 0 && MR <= kMaxTileRows, "row chunk must hold whole tiles");
  static_assert(KC % kFp8Block == 0 && kFp8Block % P == 0,
                "fp8 blocks must align with chunks and strips");
  static_assert(KC % kInt4Group == 0, "int4 groups must align with chunks");
  // w8a8: int8 depths per 32-bit lane, 2 (int16 pairs, vpmaddwd) unless the ISA's ops say 4
  // (VNNI: Ops::dpbusd on unsigned weight bytes stored + 128).
  static constexpr int G = [] {
    if constexpr (requires { Ops::kInt8Group; }) {
      return Ops::kInt8Group;
    } else {
      return 2;
    }
  }();
  static_assert(G == 2 || G == 4, "w8a8 packs 2 or 4 depths per lane");

  // ------------------------------------------------------------------ weight sources
  // Each gives the two f32 registers of packed row p (P columns) of a depth chunk.
  struct F32Src {
    const float* B;
    void load(int64_t p, fb& b0, fb& b1) const noexcept {
      b0 = fb::load_aligned(B + p * P);
      b1 = fb::load_aligned(B + p * P + L);
    }
  };
  struct Bf16Src {
    const uint16_t* B;
    void load(int64_t p, fb& b0, fb& b1) const noexcept {
      b0 = fb(Ops::widen_bf16(B + p * P));
      b1 = fb(Ops::widen_bf16(B + p * P + L));
    }
  };
  struct Int8Src {  // unscaled: the column scales apply in the epilogue
    const int8_t* B;
    void load(int64_t p, fb& b0, fb& b1) const noexcept {
      b0 = fb(Ops::widen_s8(B + p * P));
      b1 = fb(Ops::widen_s8(B + p * P + L));
    }
  };
  // Whether the ISA widens e4m3 in integer operations (Ops::widen_fp8_direct).
  static constexpr bool kFp8Direct = requires { Ops::kFp8DirectUnscale; };
  // One 128-deep block: `s0`, `s1` = block scales * 256 (Ops::widen_fp8), or with `direct`
  // * 2^120 (Ops::widen_fp8_direct). Both give the same values.
  struct Fp8Src {
    const uint8_t* B;
    fb s0, s1;
    bool direct;
    void load(int64_t p, fb& b0, fb& b1) const noexcept {
      typename Ops::freg lo, hi;
      if constexpr (kFp8Direct) {
        if (direct) {
          Ops::widen_fp8_direct(B + p * P, lo, hi);
        } else {
          Ops::widen_fp8(B + p * P, lo, hi);
        }
      } else {
        Ops::widen_fp8(B + p * P, lo, hi);
      }
      b0 = fb(lo) * s0;
      b1 = fb(hi) * s1;
    }
  };

  // One 32-deep group: codes from B, `s0`, `s1` = the columns' scales d, `z0`, `z1` = -8 d.
  // code * d - 8 d in one fused multiply-add is exactly (code - 8) * d: both products are
  // exact (4-bit by 8-bit significands) and so is their difference.
  struct Int4Src {
    const uint8_t* B;
    fb s0, s1, z0, z1;
    void load(int64_t p, fb& b0, fb& b1) const noexcept {
      typename Ops::freg lo, hi;
      Ops::widen_u4(B + p * (P / 2), lo, hi);
      b0 = fb(Ops::fmadd(lo, s0, z0));
      b1 = fb(Ops::fmadd(hi, s1, z1));
    }
  };

  // Ternary: depth p of groups of 4 (P bytes each from B, byte j = column j's 4 codes); the
  // codes as -1, 0, +1 floats (the column scales apply in the epilogue, as int8's). The
  // bytes are widened to 32-bit lanes, shifted to the depth's code and looked up in a table
  // whose entry i is the value of code i & 3 (Ops::lookup reads the low bits only).
  static fb ternary_table() noexcept {
    alignas(64) float t[L];
    for (int64_t j = 0; j < L; ++j) t[j] = static_cast<float>(ternary_value(static_cast<uint8_t>(j & 3), 0));
    return fb::load_aligned(t);
  }
  struct TernarySrc {
    const uint8_t* B;
    fb table;
    void load(int64_t p, fb& b0, fb& b1) const noexcept {
      const uint8_t* row = B + (p >> 2) * P;
      const int sh = 2 * static_cast<int>(p & 3);
      b0 = fb(Ops::lookup(Ops::srli_i(Ops::widen_u8_i(row), sh), table));
      b1 = fb(Ops::lookup(Ops::srli_i(Ops::widen_u8_i(row + L), sh), table));
    }
  };

  // Formats whose sums take a per-column scale in the epilogue.
  static bool column_scaled(WeightType t) noexcept {
    return t == WeightType::int8 || t == WeightType::ternary;
  }

  static bool is_int4(WeightType t) noexcept {
    return t == WeightType::int4 || t == WeightType::int4zp;
  }

  // Byte offset of depth row p within a strip (4-bit types: inside its group).
  static int64_t depth_offset(const GemmCall& g, int64_t p) noexcept {
    if (is_int4(g.type))
      return p / kInt4Group * int4_group_bytes(P, g.type == WeightType::int4zp) +
             p % kInt4Group * (P / 2);
    if (g.type == WeightType::ternary) return p / 4 * P;  // p a multiple of 4 (chunks)
    return p * P * weight_type_bytes(g.type);
  }

  // The 4-bit source of the group starting at depth p0 (a multiple of 32) of a strip at S:
  // int4's zero point is 8, int4zp's the stored byte per column (-z d exact: 4 x 8 bits).
  static Int4Src int4_src(const GemmCall& g, const uint8_t* S, int64_t p0) noexcept {
    const bool zp = g.type == WeightType::int4zp;
    const uint8_t* block = S + p0 / kInt4Group * int4_group_bytes(P, zp);
    const uint16_t* sc = reinterpret_cast<const uint16_t*>(block + kInt4Group * (P / 2));
    const fb s0(g.f16_scales ? Ops::widen_f16(sc) : Ops::widen_bf16(sc)),
        s1(g.f16_scales ? Ops::widen_f16(sc + L) : Ops::widen_bf16(sc + L));
    if (!zp) return Int4Src{block, s0, s1, s0 * fb(-8.0f), s1 * fb(-8.0f)};
    const uint8_t* z = block + kInt4Group * (P / 2) + 2 * P;
    return Int4Src{block, s0, s1, -(fb(Ops::widen_u8(z)) * s0), -(fb(Ops::widen_u8(z + L)) * s1)};
  }

  // ------------------------------------------------------------------ f32 micro-kernel
  // One row tile: `Ap` is the tile's rows packed k-major (`[kc, MR]`); `acc` (`[R, P]`,
  // aligned) holds the partial sums of earlier depth chunks, or null for the first.
  template <int R, class Src>
  static inline void micro(const float* Ap, const Src& src, int64_t kc, fb (&c)[MR][2],
                           const float* acc) noexcept {
    for (int i = 0; i < R; ++i) {
      c[i][0] = acc ? fb::load_aligned(acc + i * P) : fb(0.0f);
      c[i][1] = acc ? fb::load_aligned(acc + i * P + L) : fb(0.0f);
    }
    for (int64_t p = 0; p < kc; ++p) {
      fb b0, b1;
      src.load(p, b0, b1);
#pragma GCC unroll 12
      for (int i = 0; i < R; ++i) {
        const fb a(Ap[p * MR + i]);
        c[i][0] = fb(Ops::fmadd(a, b0, c[i][0]));
        c[i][1] = fb(Ops::fmadd(a, b1, c[i][1]));
      }
    }
  }

  template <int R, class Src>
  static inline void micro_upto(int r, const float* Ap, const Src& src, int64_t kc, fb (&c)[MR][2],
                                const float* acc) noexcept {
    if constexpr (R > 1) {
      if (r < R) return micro_upto<R - 1>(r, Ap, src, kc, c, acc);
    }
    micro<R>(Ap, src, kc, c, acc);
  }

  // ------------------------------------------------------------------ w8a8 micro-kernel
  // `Aw`: the tile's rows quantised to int8, G depths per 32-bit word (int16 pairs for G = 2,
  // signed bytes for G = 4), `[groups, MR]` words; B: G * P bytes per group of k. Sums are
  // exact int32 (G = 4: modulo 2^32 before the epilogue removes the weights' + 128).
  template <int R>
  static inline void micro_s8(const float* Aw, const int8_t* B, int64_t groups, ireg (&c)[MR][2],
                              const int32_t* acc) noexcept {
    // Local accumulators: the intrinsic vector types may alias anything, so sums kept in the
    // caller's array would be stored back on every iteration.
    ireg x[R][2];
    for (int i = 0; i < R; ++i) {
      x[i][0] = acc ? Ops::load_i(acc + i * P) : Ops::zero_i();
      x[i][1] = acc ? Ops::load_i(acc + i * P + L) : Ops::zero_i();
    }
    for (int64_t q = 0; q < groups; ++q) {
      if constexpr (G == 4) {
        const ireg b0 = Ops::load_i(reinterpret_cast<const int32_t*>(B + q * 4 * P));
        const ireg b1 = Ops::load_i(reinterpret_cast<const int32_t*>(B + q * 4 * P + 4 * L));
#pragma GCC unroll 12
        for (int i = 0; i < R; ++i) {
          const ireg a = Ops::broadcast_word(Aw + q * MR + i);
          x[i][0] = Ops::dpbusd(x[i][0], b0, a);
          x[i][1] = Ops::dpbusd(x[i][1], b1, a);
        }
      } else {
        const ireg b0 = Ops::widen_s8_pairs(B + q * 2 * P);
        const ireg b1 = Ops::widen_s8_pairs(B + q * 2 * P + 2 * L);
#pragma GCC unroll 12
        for (int i = 0; i < R; ++i) {
          const ireg a = Ops::broadcast_word(Aw + q * MR + i);
          x[i][0] = Ops::add_i(x[i][0], Ops::madd(a, b0));
          x[i][1] = Ops::add_i(x[i][1], Ops::madd(a, b1));
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      c[i][0] = x[i][0];
      c[i][1] = x[i][1];
    }
  }

  template <int R>
  static inline void micro_s8_upto(int r, const float* Aw, const int8_t* B, int64_t groups,
                                   ireg (&c)[MR][2], const int32_t* acc) noexcept {
    if constexpr (R > 1) {
      if (r < R) return micro_s8_upto<R - 1>(r, Aw, B, groups, c, acc);
    }
    micro_s8<R>(Aw, B, groups, c, acc);
  }

  // ------------------------------------------------------------------ bf16 x bf16 micro-kernel
  // `Aw`: the tile's rows as bf16 pairs along k (one 32-bit word per pair and row, `[pairs,
  // MR]`); B: 2P bf16 per pair, interleaved per column. Ops::dpbf16 adds the odd depth's
  // product, then the even one's, each rounded (vdpbf16ps).
  template <int R>
  static inline void micro_bf16(const float* Aw, const uint16_t* B, int64_t pairs, fb (&c)[MR][2],
                                const float* acc) noexcept {
    typename Ops::freg x[R][2];
    for (int i = 0; i < R; ++i) {
      x[i][0] = acc ? fb::load_aligned(acc + i * P) : fb(0.0f);
      x[i][1] = acc ? fb::load_aligned(acc + i * P + L) : fb(0.0f);
    }
    for (int64_t q = 0; q < pairs; ++q) {
      const ireg b0 = Ops::load_i(reinterpret_cast<const int32_t*>(B + q * 2 * P));
      const ireg b1 = Ops::load_i(reinterpret_cast<const int32_t*>(B + q * 2 * P + 2 * L));
#pragma GCC unroll 12
      for (int i = 0; i < R; ++i) {
        const ireg a = Ops::broadcast_word(Aw + q * MR + i);
        x[i][0] = Ops::dpbf16(x[i][0], b0, a);
        x[i][1] = Ops::dpbf16(x[i][1], b1, a);
      }
    }
    for (int i = 0; i < R; ++i) {
      c[i][0] = fb(x[i][0]);
      c[i][1] = fb(x[i][1]);
    }
  }

  template <int R>
  static inline void micro_bf16_upto(int r, const float* Aw, const uint16_t* B, int64_t pairs,
                                     fb (&c)[MR][2], const float* acc) noexcept {
    if constexpr (R > 1) {
      if (r < R) return micro_bf16_upto<R - 1>(r, Aw, B, pairs, c, acc);
    }
    micro_bf16<R>(Aw, B, pairs, c, acc);
  }

  // ------------------------------------------------------------------ packing A
  // Rows per tile for a chunk of m rows: as few tiles as possible, balanced (7 rows = 4 + 3,
  // not 6 + 1: a thin tile has too few accumulator chains to hide the FMA latency).
  static int64_t tile_height(int64_t m) noexcept {
    const int64_t tiles = (m + MR - 1) / MR;
    return tiles == 0 ? MR : (m + tiles - 1) / tiles;
  }

  // Rows [0, m) of A into row tiles of `th` rows, tile t k-major at Ap + t * MR * depth
  // (`[depth, MR]`), so the micro-kernel reads one contiguous stream instead of rows 4 KiB
  // apart (L1 set conflicts). Swap: packed row p holds depth p ^ 1 (bf16 x bf16 pair order);
  // rows past k are zero.
  template <bool RoundBf16, bool Swap>
  static void pack_a(int64_t m, int64_t th, int64_t k, int64_t depth, const float* A, int64_t lda,
                     float* Ap) noexcept {
    for (int64_t i0 = 0, t = 0; i0 < m; i0 += th, ++t) {
      const int64_t r = imin(th, m - i0);
      float* dst = Ap + t * MR * depth;
      for (int64_t i = 0; i < r; ++i) {
        const float* src = A + (i0 + i) * lda;
        for (int64_t p = 0; p < depth; ++p) {
          const int64_t q = Swap ? p ^ 1 : p;
          dst[p * MR + i] = q >= k ? 0.0f : RoundBf16 ? round_bf16(src[q]) : src[q];
        }
      }
    }
  }

  // Rows [0, m) rounded to bf16, as words of depth pairs (low half 2q, high half 2q + 1, a zero
  // pad past k) in row tiles of MR rows (`[depth / 2, MR]` words).
  static void pack_a_bf16_pairs(int64_t m, int64_t k, int64_t pairs, const float* A, int64_t lda,
                                float* Aw) noexcept {
    for (int64_t i = 0; i < m; ++i) {
      const float* src = A + i * lda;
      float* dst = Aw + (i - i % MR) * pairs + i % MR;
      for (int64_t q = 0; q < pairs; ++q) {
        const uint32_t lo = bf16_bits(src[2 * q]);
        const uint32_t hi = 2 * q + 1 < k ? bf16_bits(src[2 * q + 1]) : 0u;
        const uint32_t word = lo | hi << 16;
        std::memcpy(dst + q * MR, &word, sizeof word);
      }
    }
  }

  // Largest finite |x[0, k)| (as abs_max(), in SIMD: the maximum does not depend on order).
  static float abs_max_simd(const float* x, int64_t k) noexcept {
    fb m(0.0f);
    const fb big(FLT_MAX);
    int64_t p = 0;
    for (; p + L <= k; p += L) {
      const fb a = xsimd::abs(fb::load_unaligned(x + p));
      m = xsimd::max(m, xsimd::select(a <= big, a, fb(0.0f)));
    }
    alignas(64) float lanes[L];
    m.store_aligned(lanes);
    float r = abs_max(x + p, k - p);
    for (int64_t j = 0; j < L; ++j) r = lanes[j] > r ? lanes[j] : r;
    return r;
  }

  // Codes of x[0, n) (n <= L) with scale s > 0, exactly as quantize_s8(): x / s rounded to
  // nearest even, NaN -> 0, clamped to [-127, 127]; as floats into `out[0, L)`.
  static void quantize_lanes(const float* x, int64_t n, float s, float* out) noexcept {
    fb v;
    if (n == L) {
      v = fb::load_unaligned(x);
    } else {
      alignas(64) float tmp[L] = {};
      std::memcpy(tmp, x, static_cast<size_t>(n) * sizeof(float));
      v = fb::load_aligned(tmp);
    }
    fb r = xsimd::nearbyint(v / fb(s));
    r = xsimd::select(r == r, r, fb(0.0f));
    r = xsimd::min(xsimd::max(r, fb(-127.0f)), fb(127.0f));
    r.store_aligned(out);
  }

  // G int8 codes (exact floats at q) as one 32-bit word of the integer dot product's operand
  // (int16 pairs for G = 2, bytes for G = 4); adds them to `sum`.
  static uint32_t code_word(const float* q, int64_t& sum) noexcept {
    uint32_t word = 0;
    for (int e = 0; e < G; ++e) {
      const int v = static_cast<int>(q[e]);
      sum += v;
      word |= G == 2 ? static_cast<uint32_t>(static_cast<uint16_t>(v)) << (16 * e)
                     : static_cast<uint32_t>(static_cast<uint8_t>(v)) << (8 * e);
    }
    return word;
  }

  // Rows [0, m) quantised per row (over all k) to int8, G depths per 32-bit word in row tiles
  // (`[groups, MR]` words: int16 pairs for G = 2, bytes for G = 4, zeros past k); the row
  // scales go to `scale[0, m)`. G = 4 also stores each row's 128 * (sum of its codes), modulo
  // 2^32, at `bias[0, m)`: what the weights' + 128 adds to its sums.
  static void pack_a_s8(int64_t m, int64_t k, const float* A, int64_t lda, float* Aw,
                        float* scale, int32_t* bias) noexcept {
    static_assert(L % 4 == 0, "a lane block holds whole groups");
    const int64_t groups = (k + G - 1) / G;
    alignas(64) float q[L];
    for (int64_t i = 0; i < m; ++i) {
      const float* src = A + i * lda;
      const float s = int8_scale(abs_max_simd(src, k));
      scale[i] = s;
      float* dst = Aw + (i - i % MR) * groups + i % MR;
      int64_t sum = 0;
      for (int64_t p0 = 0; p0 < k; p0 += L) {
        const int64_t n = imin(L, k - p0);
        if (s > 0.0f) {
          quantize_lanes(src + p0, n, s, q);
        } else {
          for (int64_t j = 0; j < L; ++j) q[j] = 0.0f;
        }
        for (int64_t j = n; j < L; ++j) q[j] = 0.0f;  // past k
        for (int64_t j = 0; j < L; j += G) {
          if (p0 + j >= k) break;
          const uint32_t word = code_word(q + j, sum);
          std::memcpy(dst + ((p0 + j) / G) * MR, &word, sizeof word);
        }
      }
      if constexpr (G == 4) bias[i] = static_cast<int32_t>(static_cast<uint32_t>(sum) * 128u);
    }
  }

  // ------------------------------------------------------------------ epilogues
  // flatten: xsimd's exp / erf / tanh are inlined here rather than emitted as weak symbols
  // compiled for this ISA (see gemm_internal.hpp); noinline keeps one copy per unit.
  __attribute__((flatten, noinline)) static fb act_batch(Activation a, const fb& x) noexcept {
    switch (a) {
      case Activation::silu:
        return x / (fb(1.0f) + xsimd::exp(-x));
      case Activation::gelu:
        return fb(0.5f) * x * (fb(1.0f) + xsimd::erf(x * fb(0.70710678118654752f)));
      case Activation::gelu_tanh:
        return fb(0.5f) * x *
               (fb(1.0f) + xsimd::tanh(fb(0.7978845608028654f) * (x + fb(0.044715f) * x * x * x)));
      case Activation::relu:
        return xsimd::max(x, fb(0.0f));
    }
    return x;
  }

  // Stores `width` (<= L) leading lanes of v at dst.
  static void store_lanes(const fb& v, float* dst, int64_t width) noexcept {
    if (width == L) {
      v.store_unaligned(dst);
    } else if (width > 0) {
      alignas(64) float tmp[L];
      v.store_aligned(tmp);
      std::memcpy(dst, tmp, static_cast<size_t>(width) * sizeof(float));
    }
  }

  static void add_lanes(const fb& v, float* dst, int64_t width) noexcept {
    if (width == L) {
      (v + fb::load_unaligned(dst)).store_unaligned(dst);
    } else {
      alignas(64) float tmp[L];
      v.store_aligned(tmp);
      for (int64_t j = 0; j < width; ++j) dst[j] += tmp[j];
    }
  }

  __attribute__((flatten, noinline)) static fb clamped_batch(const ClampedSwiglu& c, const fb& g,
                                                              const fb& u) noexcept {
    return clamped_swiglu(c, g, u);
  }

  // `width` (<= L) leading values of v from src (0 past them, or everywhere for a null src).
  static fb load_lanes(const float* src, int64_t width) noexcept {
    if (src == nullptr || width <= 0) return fb(0.0f);
    if (width == L) return fb::load_unaligned(src);
    alignas(64) float tmp[L] = {};
    std::memcpy(tmp, src, static_cast<size_t>(width) * sizeof(float));
    return fb::load_aligned(tmp);
  }

  // Writes the finished tile `c` (rows [i0, i0 + rows) of strip s) as the call's mode says,
  // biases (GemmCall::bias, bias_up) added first where given.
  static void epilogue(const GemmCall& g, int64_t i0, int64_t rows, int64_t s,
                       const fb (*c)[2]) noexcept {
    if (g.mode == GemmMode::gated || g.mode == GemmMode::gated_clamped) {
      const int64_t col = s * L, w = imin(L, g.n - col);
      const bool biased = g.bias != nullptr || g.bias_up != nullptr;
      const fb bg = load_lanes(g.bias ? g.bias + col : nullptr, w);
      const fb bu = load_lanes(g.bias_up ? g.bias_up + col : nullptr, w);
      for (int64_t i = 0; i < rows; ++i) {
        const fb gv = biased ? c[i][0] + bg : c[i][0], uv = biased ? c[i][1] + bu : c[i][1];
        store_lanes(g.mode == GemmMode::gated ? act_batch(g.act, gv) * uv : clamped_batch(g.glu, gv, uv),
                    g.out + (i0 + i) * g.ldo + col, w);
      }
      return;
    }
    const int64_t col = s * P, w0 = imin(L, g.n - col), w1 = imin(L, g.n - col - L);
    const fb b0 = load_lanes(g.bias ? g.bias + col : nullptr, w0);
    const fb b1 = load_lanes(g.bias ? g.bias + col + L : nullptr, w1);
    for (int64_t i = 0; i < rows; ++i) {
      float* dst = g.out + (i0 + i) * g.ldo + col;
      const fb v0 = g.bias ? c[i][0] + b0 : c[i][0], v1 = g.bias ? c[i][1] + b1 : c[i][1];
      switch (g.mode) {
        case GemmMode::accumulate:
          add_lanes(v0, dst, w0);
          if (w1 > 0) add_lanes(v1, dst + L, w1);
          break;
        case GemmMode::act:
          store_lanes(act_batch(g.act, v0), dst, w0);
          if (w1 > 0) store_lanes(act_batch(g.act, v1), dst + L, w1);
          break;
        default:
          store_lanes(v0, dst, w0);
          if (w1 > 0) store_lanes(v1, dst + L, w1);
          break;
      }
    }
  }

  // ------------------------------------------------------------------ drivers
  // Depth rows [0, n) of a source into `dst` (`[n, P]` f32).
  template <class Src>
  static void widen_rows(const Src& src, int64_t n, float* dst) noexcept {
    for (int64_t p = 0; p < n; ++p) {
      fb b0, b1;
      src.load(p, b0, b1);
      b0.store_aligned(dst + p * P);
      b1.store_aligned(dst + p * P + L);
    }
  }

  // Widens depth rows [0, kc) of a chunk starting at depth p0 into `buf` (`[kc, P]` f32).
  static void decode_chunk(const GemmCall& g, const uint8_t* S, int64_t s, int64_t p0, int64_t kc,
                           float* buf) noexcept {
    switch (g.type) {
      case WeightType::bf16:
        widen_rows(Bf16Src{reinterpret_cast<const uint16_t*>(S) + p0 * P}, kc, buf);
        break;
      case WeightType::int8:
        widen_rows(Int8Src{reinterpret_cast<const int8_t*>(S) + p0 * P}, kc, buf);
        break;
      case WeightType::int4:
      case WeightType::int4zp:
        for (int64_t g0 = 0; g0 < kc; g0 += kInt4Group)
          widen_rows(int4_src(g, S, p0 + g0), imin(kInt4Group, kc - g0), buf + g0 * P);
        break;
      case WeightType::ternary:
        widen_rows(TernarySrc{S + p0 / 4 * P, ternary_table()}, kc, buf);
        break;
      case WeightType::fp8:
        for (int64_t b0p = 0; b0p < kc; b0p += kFp8Block)
          widen_rows(fp8_src(g, S, s, p0 + b0p), imin(kFp8Block, kc - b0p), buf + b0p * P);
        break;
      default:
        break;
    }
  }

  // The fp8 source of the 128-deep block starting at depth p0 (a multiple of 128) of strip s.
  static Fp8Src fp8_src(const GemmCall& g, const uint8_t* S, int64_t s, int64_t p0) noexcept {
    const float* sc = g.fp8_scale + (s * g.k_blocks + p0 / kFp8Block) * 2;
    if constexpr (kFp8Direct) {
      const float u = Ops::kFp8DirectUnscale;
      if (!g.daz && sc[0] * u <= FLT_MAX && sc[1] * u <= FLT_MAX)
        return Fp8Src{S + p0 * P, fb(sc[0] * u), fb(sc[1] * u), true};
    }
    return Fp8Src{S + p0 * P, fb(sc[0] * 256.0f), fb(sc[1] * 256.0f), false};
  }

  // ------------------------------------------------------------------ few rows (decode)
  // R rows against N strips at once: the weights stream from DRAM once, widened in registers,
  // and N strips give 2N independent accumulator chains per row. One row (T = 1) reads one
  // strip at a time: N strips are N streams a strip apart, and on Zen 5 one stream per core
  // streamed 10-30% faster for every reduced format (fp8 and 4-bit most) even with only two
  // accumulator chains; from two rows on, more chains win.
  static constexpr int strips_for(int R) noexcept {
    if (R == 1) return 1;
    const int n = 2 * MR / (2 * R);
    return n < 1 ? 1 : (n > 4 ? 4 : n);
  }

  // The accumulators of R rows x N strips: from `acc` (partial sums of earlier depth chunks)
  // or zero, and back out to `c`.
  template <int R, int N>
  static inline void start_n(fb (&x)[N][R][2], const float* acc) noexcept {
    for (int t = 0; t < N; ++t)
      for (int i = 0; i < R; ++i) {
        x[t][i][0] = acc ? fb::load_aligned(acc + (t * R + i) * P) : fb(0.0f);
        x[t][i][1] = acc ? fb::load_aligned(acc + (t * R + i) * P + L) : fb(0.0f);
      }
  }
  template <int R, int N>
  static inline void finish_n(const fb (&x)[N][R][2], fb (&c)[N][R][2]) noexcept {
    for (int t = 0; t < N; ++t)
      for (int i = 0; i < R; ++i) {
        c[t][i][0] = x[t][i][0];
        c[t][i][1] = x[t][i][1];
      }
  }
  // x += the kc depth rows of A (row tile at Ap) times the N sources, sequentially over depth.
  template <int R, int N, class Src>
  static inline void accumulate_n(const float* Ap, const Src (&src)[N], int64_t kc,
                                  fb (&x)[N][R][2]) noexcept {
    for (int64_t p = 0; p < kc; ++p) {
#pragma GCC unroll 4
      for (int t = 0; t < N; ++t) {
        fb b0, b1;
        src[t].load(p, b0, b1);
#pragma GCC unroll 12
        for (int i = 0; i < R; ++i) {
          const fb a(Ap[p * MR + i]);
          x[t][i][0] = fb(Ops::fmadd(a, b0, x[t][i][0]));
          x[t][i][1] = fb(Ops::fmadd(a, b1, x[t][i][1]));
        }
      }
    }
  }

  template <int R, int N, class Src>
  static inline void micro_n(const float* Ap, const Src (&src)[N], int64_t kc, fb (&c)[N][R][2],
                             const float* acc) noexcept {
    fb x[N][R][2];
    start_n<R, N>(x, acc);
    accumulate_n<R, N>(Ap, src, kc, x);
    finish_n<R, N>(x, c);
  }

  // The same for 4-bit weights over depth rows [p0, p0 + kc) (p0 a multiple of 32): one
  // source per strip and group, built where it is used, and the accumulators kept in
  // registers across groups (sources built by the caller per group went through the stack:
  // ~15% of an int4 decode). Same operations, same order.
  template <int R, int N>
  static inline void micro_n_int4(const GemmCall& g, const float* Ap, const uint8_t* const (&S)[N],
                                  int64_t p0, int64_t kc, fb (&c)[N][R][2], const float* acc) noexcept {
    fb x[N][R][2];
    start_n<R, N>(x, acc);
    for (int64_t q0 = 0; q0 < kc; q0 += kInt4Group) {
      Int4Src src[N];
      for (int t = 0; t < N; ++t) src[t] = int4_src(g, S[t], p0 + q0);
      accumulate_n<R, N>(Ap + q0 * MR, src, imin(kInt4Group, kc - q0), x);
    }
    finish_n<R, N>(x, c);
  }

  // The same for ternary weights over depth rows [p0, p0 + kc) (p0 a multiple of 4): each
  // group of 4 depths' bytes widened once per strip, then per depth a shift and a table
  // lookup per register. Same operations, same order as micro_n on TernarySrc.
  template <int R, int N>
  static inline void micro_n_ternary(const float* Ap, const uint8_t* const (&S)[N], int64_t p0, int64_t kc,
                                     fb (&c)[N][R][2], const float* acc) noexcept {
    fb x[N][R][2];
    start_n<R, N>(x, acc);
    const fb table = ternary_table();
    for (int64_t q0 = 0; q0 < kc; q0 += 4) {
      ireg w[N][2];
      for (int t = 0; t < N; ++t) {
        const uint8_t* row = S[t] + (p0 + q0) / 4 * P;
        w[t][0] = Ops::widen_u8_i(row);
        w[t][1] = Ops::widen_u8_i(row + L);
      }
      const int64_t qc = imin(4, kc - q0);
#pragma GCC unroll 4
      for (int e = 0; e < 4; ++e) {
        if (e >= qc) break;
        const float* a = Ap + (q0 + e) * MR;
#pragma GCC unroll 4
        for (int t = 0; t < N; ++t) {
          const fb b0(Ops::lookup(Ops::srli_i(w[t][0], 2 * e), table));
          const fb b1(Ops::lookup(Ops::srli_i(w[t][1], 2 * e), table));
#pragma GCC unroll 12
          for (int i = 0; i < R; ++i) {
            const fb av(a[i]);
            x[t][i][0] = fb(Ops::fmadd(av, b0, x[t][i][0]));
            x[t][i][1] = fb(Ops::fmadd(av, b1, x[t][i][1]));
          }
        }
      }
    }
    finish_n<R, N>(x, c);
  }

  // Strips [s, s + N) for the R rows packed at Ap (one row tile), rows i0.. of the output.
  template <int R, int N>
  static void run_strips(const GemmCall& g, int64_t i0, const float* Ap, int64_t s) noexcept {
    fb c[N][R][2];
    alignas(64) float part[N * R * P];
    const int64_t k = g.depth;
    const int64_t kcm = g.type == WeightType::fp8 ? kFp8Block : KC;
    const int64_t chunk_bytes = depth_offset(g, kcm);  // bytes of kcm depth rows
    const uint8_t* S[N];
    for (int t = 0; t < N; ++t) S[t] = g.data + (s + t) * g.strip_bytes;
    for (int64_t p0 = 0; p0 < k || p0 == 0; p0 += kcm) {
      const int64_t kc = imin(kcm, k - p0);
      const bool last = p0 + kc >= k;
      for (int t = 0; t < N; ++t) {
        const char* next = reinterpret_cast<const char*>(S[t] + depth_offset(g, p0 + kc));
        for (int64_t l = 0; l < chunk_bytes; l += 64) __builtin_prefetch(next + l, 0, 3);
      }
      const float* a = Ap + p0 * MR;
      const float* acc = p0 == 0 ? nullptr : part;
      switch (g.type) {
        case WeightType::f32: {
          F32Src src[N];
          for (int t = 0; t < N; ++t)
            src[t] = F32Src{reinterpret_cast<const float*>(S[t]) + p0 * P};
          micro_n<R, N>(a, src, kc, c, acc);
          break;
        }
        case WeightType::bf16: {
          Bf16Src src[N];
          for (int t = 0; t < N; ++t)
            src[t] = Bf16Src{reinterpret_cast<const uint16_t*>(S[t]) + p0 * P};
          micro_n<R, N>(a, src, kc, c, acc);
          break;
        }
        case WeightType::int8: {
          Int8Src src[N];
          for (int t = 0; t < N; ++t)
            src[t] = Int8Src{reinterpret_cast<const int8_t*>(S[t]) + p0 * P};
          micro_n<R, N>(a, src, kc, c, acc);
          break;
        }
        case WeightType::int4:
        case WeightType::int4zp:
          micro_n_int4<R, N>(g, a, S, p0, kc, c, acc);
          break;
        case WeightType::ternary:
          micro_n_ternary<R, N>(a, S, p0, kc, c, acc);
          break;
        default: {
          Fp8Src src[N];
          for (int t = 0; t < N; ++t) src[t] = fp8_src(g, S[t], s + t, p0);
          micro_n<R, N>(a, src, kc, c, acc);
          break;
        }
      }
      for (int t = 0; t < N; ++t) {
        if (last) {
          if (column_scaled(g.type)) {
            const float* cs = g.col_scale + (s + t) * P;
            const fb s0 = fb::load_unaligned(cs), s1 = fb::load_unaligned(cs + L);
            for (int i = 0; i < R; ++i) {
              c[t][i][0] = c[t][i][0] * s0;
              c[t][i][1] = c[t][i][1] * s1;
            }
          }
          epilogue(g, i0, R, s + t, c[t]);
        } else {
          for (int i = 0; i < R; ++i) {
            c[t][i][0].store_aligned(part + (t * R + i) * P);
            c[t][i][1].store_aligned(part + (t * R + i) * P + L);
          }
        }
      }
      if (k == 0) break;
    }
  }

  template <int R>
  static void run_rows(const GemmCall& g, int64_t i0, const float* Ap) noexcept {
    constexpr int N = strips_for(R);
    int64_t s = g.strip_begin;
    for (; s + N <= g.strip_end; s += N) run_strips<R, N>(g, i0, Ap, s);
    for (; s < g.strip_end; ++s) run_strips<R, 1>(g, i0, Ap, s);
  }

  template <int R>
  static void run_rows_upto(int r, const GemmCall& g, int64_t i0, const float* Ap) noexcept {
    if constexpr (R > 1) {
      if (r < R) return run_rows_upto<R - 1>(r, g, i0, Ap);
    }
    run_rows<R>(g, i0, Ap);
  }

  // f32, bf16, int8 and fp8 weights: f32 multiply-adds on widened weights.
  static void run_float(const GemmCall& g) noexcept {
    fb c[MR][2];
    alignas(64) float part[kRowChunk * P];
    alignas(64) float buf[KC * P];
    const int64_t k = g.depth;  // g.k, or rounded up to even for bf16 x bf16 pairs
    for (int64_t m0 = 0; m0 < g.m; m0 += kRowChunk) {
      const int64_t mc = imin(kRowChunk, g.m - m0);
      float* Ap = g.a_pack;
      const int64_t th = tile_height(mc);
      const float* A = g.A + m0 * g.lda;
      if (g.pairs) {
        pack_a<true, true>(mc, th, g.k, k, A, g.lda, Ap);
      } else if (g.bf16_act) {
        pack_a<true, false>(mc, th, g.k, k, A, g.lda, Ap);
      } else {
        pack_a<false, false>(mc, th, g.k, k, A, g.lda, Ap);
      }
      if (mc <= kDirectRows) {  // decode: few rows, every strip streamed once
        run_rows_upto<kDirectRows>(static_cast<int>(mc), g, m0, Ap);
        continue;
      }
      // Many rows: f32 weights are read in place; reduced ones are widened once per chunk into
      // `buf`, which then serves every row tile from L1.
      const bool direct = g.type == WeightType::f32;
      const int64_t chunk_lines = (depth_offset(g, KC) + 63) / 64;
      const int64_t tiles = (mc + th - 1) / th;
      const int64_t lines_per_tile = (chunk_lines + tiles - 1) / tiles;
      for (int64_t s = g.strip_begin; s < g.strip_end; ++s) {
        const uint8_t* S = g.data + s * g.strip_bytes;
        for (int64_t p0 = 0; p0 < k || p0 == 0; p0 += KC) {
          const int64_t kc = imin(KC, k - p0);
          const bool last = p0 + kc >= k;
          if (!direct) decode_chunk(g, S, s, p0, kc, buf);
          // The next chunk (or strip) starts where this one ends: spread its prefetch over
          // this chunk's row tiles (the weights stream from DRAM once per chunk).
          const char* next = reinterpret_cast<const char*>(S + depth_offset(g, p0 + kc));
          for (int64_t i = 0, t = 0; i < mc; i += th, ++t) {
            const int64_t l0 = t * lines_per_tile, l1 = imin(chunk_lines, l0 + lines_per_tile);
            for (int64_t l = l0; l < l1; ++l) __builtin_prefetch(next + l * 64, 0, 3);
            const int r = static_cast<int>(imin(th, mc - i));
            const float* a = Ap + t * MR * k + p0 * MR;
            const float* acc = p0 == 0 ? nullptr : part + i * P;
            const float* B = direct ? reinterpret_cast<const float*>(S) + p0 * P : buf;
            micro_upto<MR>(r, a, F32Src{B}, kc, c, acc);
            if (last) {
              if (column_scaled(g.type)) {
                const fb s0 = fb::load_unaligned(g.col_scale + s * P),
                         s1 = fb::load_unaligned(g.col_scale + s * P + L);
                for (int j = 0; j < r; ++j) {
                  c[j][0] = c[j][0] * s0;
                  c[j][1] = c[j][1] * s1;
                }
              }
              epilogue(g, m0 + i, r, s, c);
            } else {
              for (int j = 0; j < r; ++j) {
                c[j][0].store_aligned(part + (i + j) * P);
                c[j][1].store_aligned(part + (i + j) * P + L);
              }
            }
          }
          if (k == 0) break;
        }
      }
    }
  }

  // w8a8: activations quantised per row while packing, exact int32 sums, both scales in the
  // epilogue as (float(sum) * a_scale) * w_scale.
  static void run_w8a8(const GemmCall& g) noexcept {
    ireg c[MR][2];
    fb cf[MR][2];
    alignas(64) int32_t part[kRowChunk * P];
    int32_t bias[kRowChunk];
    const int64_t k = g.k, groups = (k + G - 1) / G;
    constexpr int64_t kGroupChunk = KC / G;  // KC * P bytes of weights per chunk
    const int64_t chunk_lines = kGroupChunk * G * P / 64;
    for (int64_t m0 = 0; m0 < g.m; m0 += kRowChunk) {
      const int64_t mc = imin(kRowChunk, g.m - m0);
      const int64_t tiles = (mc + MR - 1) / MR;
      float* Aw = g.a_pack;
      float* a_scale = Aw + tiles * MR * groups;
      pack_a_s8(mc, k, g.A + m0 * g.lda, g.lda, Aw, a_scale, bias);
      const int64_t lines_per_tile = (chunk_lines + tiles - 1) / tiles;
      for (int64_t s = g.strip_begin; s < g.strip_end; ++s) {
        const int8_t* S = reinterpret_cast<const int8_t*>(g.data + s * g.strip_bytes);
        const fb w0 = fb::load_unaligned(g.col_scale + s * P),
                 w1 = fb::load_unaligned(g.col_scale + s * P + L);
        for (int64_t q0 = 0; q0 < groups || q0 == 0; q0 += kGroupChunk) {
          const int64_t qc = imin(kGroupChunk, groups - q0);
          const bool last = q0 + qc >= groups;
          const int8_t* B = S + q0 * G * P;
          const char* next = reinterpret_cast<const char*>(B + qc * G * P);
          for (int64_t i = 0; i < mc; i += MR) {
            const int64_t l0 = (i / MR) * lines_per_tile,
                          l1 = imin(chunk_lines, l0 + lines_per_tile);
            for (int64_t l = l0; l < l1; ++l) __builtin_prefetch(next + l * 64, 0, 3);
            const int r = static_cast<int>(imin(MR, mc - i));
            const int32_t* acc = q0 == 0 ? nullptr : part + i * P;
            micro_s8_upto<MR>(r, Aw + i * groups + q0 * MR, B, qc, c, acc);
            if (last) {
              for (int j = 0; j < r; ++j) {
                if constexpr (G == 4) {  // remove the weights' + 128 (exact modulo 2^32)
                  const ireg b = Ops::set1_i(bias[i + j]);
                  c[j][0] = Ops::sub_i(c[j][0], b);
                  c[j][1] = Ops::sub_i(c[j][1], b);
                }
                const fb as(a_scale[i + j]);
                cf[j][0] = fb(Ops::to_float(c[j][0])) * as * w0;
                cf[j][1] = fb(Ops::to_float(c[j][1])) * as * w1;
              }
              epilogue(g, m0 + i, r, s, cf);
            } else {
              for (int j = 0; j < r; ++j) {
                Ops::store_i(part + (i + j) * P, c[j][0]);
                Ops::store_i(part + (i + j) * P + L, c[j][1]);
              }
            }
          }
          if (groups == 0) break;
        }
      }
    }
  }

  // bf16 x bf16 on a bf16 dot-product instruction (the kernel's run when its ops have
  // dpbf16): A rounded to bf16 pairs while packing, f32 sums, pairs odd depth first.
  static void run_dpbf16(const GemmCall& g) noexcept {
    fb c[MR][2];
    alignas(64) float part[kRowChunk * P];
    const int64_t pairs = g.depth / 2;
    constexpr int64_t kPairChunk = KC;  // KC pairs x 2P bf16 = 2 * KC * P * 2 bytes
    const int64_t chunk_lines = kPairChunk * 2 * P * 2 / 64;
    for (int64_t m0 = 0; m0 < g.m; m0 += kRowChunk) {
      const int64_t mc = imin(kRowChunk, g.m - m0);
      const int64_t tiles = (mc + MR - 1) / MR;
      float* Aw = g.a_pack;
      pack_a_bf16_pairs(mc, g.k, pairs, g.A + m0 * g.lda, g.lda, Aw);
      const int64_t lines_per_tile = (chunk_lines + tiles - 1) / tiles;
      for (int64_t s = g.strip_begin; s < g.strip_end; ++s) {
        const uint16_t* S = reinterpret_cast<const uint16_t*>(g.data + s * g.strip_bytes);
        for (int64_t q0 = 0; q0 < pairs || q0 == 0; q0 += kPairChunk) {
          const int64_t qc = imin(kPairChunk, pairs - q0);
          const bool last = q0 + qc >= pairs;
          const uint16_t* B = S + q0 * 2 * P;
          const char* next = reinterpret_cast<const char*>(B + qc * 2 * P);
          for (int64_t i = 0; i < mc; i += MR) {
            const int64_t l0 = (i / MR) * lines_per_tile,
                          l1 = imin(chunk_lines, l0 + lines_per_tile);
            for (int64_t l = l0; l < l1; ++l) __builtin_prefetch(next + l * 64, 0, 3);
            const int r = static_cast<int>(imin(MR, mc - i));
            const float* acc = q0 == 0 ? nullptr : part + i * P;
            micro_bf16_upto<MR>(r, Aw + i * pairs + q0 * MR, B, qc, c, acc);
            if (last) {
              epilogue(g, m0 + i, r, s, c);
            } else {
              for (int j = 0; j < r; ++j) {
                c[j][0].store_aligned(part + (i + j) * P);
                c[j][1].store_aligned(part + (i + j) * P + L);
              }
            }
          }
          if (pairs == 0) break;
        }
      }
    }
  }

  // ------------------------------------------------------------------ w4a8
  // int4 weights x activations quantised per row and group of 32 depths: per group an exact
  // int32 sum (the codes are q + 8 as unsigned nibbles, so each sum starts at -8 * (the sum
  // of the group's activation codes)), then c = fma(float(sum), d_w * d_a, c). A tile keeps
  // 2R int32 group sums and 2R f32 sums per strip in registers, so it has at most half the
  // float kernel's rows.
  static constexpr int kW4Rows = MR / 2;
  // Groups of depths per chunk of a strip that row tiles share (prefill): 8 x 32 depths.
  static constexpr int64_t kW4Chunk = 8;
  // Groups a strip stream prefetches ahead.
  static constexpr int64_t kW4Ahead = 4;
  // Strips at once for R rows: all sums in registers (32 zmm or 16 ymm), up to 4.
  static constexpr int w4_strips(int R) noexcept {
    constexpr int regs = L == 16 ? 32 : 16;
    const int n = (regs - 6) / (4 * R);
    return n < 1 ? 1 : (n > 4 ? 4 : n);
  }
  // The code operands of G depths (G * L bytes at p) for the integer dot product: columns
  // [0, L) (low nibbles) and [L, 2L) (high ones), as int16 pairs (G = 2) or bytes (G = 4).
  static void u4_operands(const uint8_t* p, ireg& lo, ireg& hi) noexcept {
    if constexpr (G == 4) {
      Ops::split_u4_quads(p, lo, hi);
    } else {
      Ops::widen_u4_pairs(p, lo, hi);
    }
  }
  static ireg dot_i(ireg x, ireg w, ireg a) noexcept {
    if constexpr (G == 4) {
      return Ops::dpbusd(x, w, a);
    } else {
      return Ops::add_i(x, Ops::madd(w, a));
    }
  }

  // Rows [0, m) quantised per group of 32 depths (codes as quantize_s8 with the group's
  // scale, zeros past k), G depths per 32-bit word in row tiles of MR rows (`[words, MR]`,
  // words = groups * 32 / G); the scales to `da` and -8 * (sum of the codes) to `corr`
  // (`[m, groups]` each).
  static void pack_a_w4(int64_t m, int64_t k, const float* A, int64_t lda, float* Aw, float* da,
                        int32_t* corr) noexcept {
    static_assert(kInt4Group % L == 0, "a group holds whole lane blocks");
    const int64_t groups = (k + kInt4Group - 1) / kInt4Group, words = groups * (kInt4Group / G);
    alignas(64) float q[kInt4Group];
    for (int64_t i = 0; i < m; ++i) {
      const float* src = A + i * lda;
      float* dst = Aw + (i - i % MR) * words + i % MR;
      for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t p0 = gi * kInt4Group, n = imin(kInt4Group, k - p0);
        const float s = int8_scale(abs_max_simd(src + p0, n));
        da[i * groups + gi] = s;
        for (int64_t j0 = 0; j0 < kInt4Group; j0 += L) {
          if (s > 0.0f && j0 < n) {
            quantize_lanes(src + p0 + j0, imin(L, n - j0), s, q + j0);
          } else {
            for (int64_t j = 0; j < L; ++j) q[j0 + j] = 0.0f;
          }
        }
        int64_t sum = 0;  // at most 32 x 127
        for (int64_t w = 0; w < kInt4Group / G; ++w) {
          const uint32_t word = code_word(q + w * G, sum);
          std::memcpy(dst + (gi * (kInt4Group / G) + w) * MR, &word, sizeof word);
        }
        corr[i * groups + gi] = static_cast<int32_t>(-8 * sum);
      }
    }
  }

  // Groups [g0, g0 + gc) of N strips (code areas at S[t]) for R rows: `Aw` the first row's
  // words (stride MR), `da` / `corr` its scales and corrections (stride `groups`); f32 sums
  // from `acc` (`[N * R, P]`) or zero, into c. Prefetches 4 groups ahead when asked.
  template <int R, int N>
  static inline void micro_w4(const float* Aw, const float* da, const int32_t* corr,
                              int64_t groups, const uint8_t* const (&S)[N], int64_t g0, int64_t gc,
                              fb (&c)[N][R][2], const float* acc, bool prefetch, bool f16) noexcept {
    constexpr int64_t W = kInt4Group / G;
    constexpr int64_t gb = int4_group_bytes(P);
    fb y[N][R][2];
    start_n<R, N>(y, acc);
    for (int64_t q = g0; q < g0 + gc; ++q) {
      if (prefetch)
        for (int t = 0; t < N; ++t)
          for (int64_t l = 0; l < gb; l += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(S[t]) + (q + kW4Ahead) * gb + l, 0, 3);
      ireg x[N][R][2];
      for (int t = 0; t < N; ++t)
        for (int i = 0; i < R; ++i) x[t][i][0] = x[t][i][1] = Ops::set1_i(corr[i * groups + q]);
      for (int64_t w = 0; w < W; ++w) {
#pragma GCC unroll 4
        for (int t = 0; t < N; ++t) {
          ireg lo, hi;
          u4_operands(S[t] + q * gb + w * G * L, lo, hi);
#pragma GCC unroll 12
          for (int i = 0; i < R; ++i) {
            const ireg a = Ops::broadcast_word(Aw + (q * W + w) * MR + i);
            x[t][i][0] = dot_i(x[t][i][0], lo, a);
            x[t][i][1] = dot_i(x[t][i][1], hi, a);
          }
        }
      }
      for (int t = 0; t < N; ++t) {
        const uint16_t* sc = reinterpret_cast<const uint16_t*>(S[t] + q * gb + kInt4Group * L);
        const fb ws0(f16 ? Ops::widen_f16(sc) : Ops::widen_bf16(sc)),
            ws1(f16 ? Ops::widen_f16(sc + L) : Ops::widen_bf16(sc + L));
        for (int i = 0; i < R; ++i) {
          const fb d(da[i * groups + q]);
          y[t][i][0] = fb(Ops::fmadd(Ops::to_float(x[t][i][0]), ws0 * d, y[t][i][0]));
          y[t][i][1] = fb(Ops::fmadd(Ops::to_float(x[t][i][1]), ws1 * d, y[t][i][1]));
        }
      }
    }
    finish_n<R, N>(y, c);
  }

  // Few rows (decode): every strip streamed once, N at a time, all groups in registers.
  template <int R>
  static void w4_rows(const GemmCall& g, int64_t i0, const float* Aw, const float* da,
                      const int32_t* corr, int64_t groups) noexcept {
    constexpr int N = w4_strips(R);
    int64_t s = g.strip_begin;
    for (; s + N <= g.strip_end; s += N) w4_block<R, N>(g, i0, Aw, da, corr, groups, s);
    for (; s < g.strip_end; ++s) w4_block<R, 1>(g, i0, Aw, da, corr, groups, s);
  }
  template <int R, int N>
  static void w4_block(const GemmCall& g, int64_t i0, const float* Aw, const float* da,
                       const int32_t* corr, int64_t groups, int64_t s) noexcept {
    fb c[N][R][2];
    const uint8_t* S[N];
    for (int t = 0; t < N; ++t) S[t] = g.data + (s + t) * g.strip_bytes;
    micro_w4<R, N>(Aw, da, corr, groups, S, 0, groups, c, nullptr, true, g.f16_scales);
    for (int t = 0; t < N; ++t) epilogue(g, i0, R, s + t, c[t]);
  }
  template <int R>
  static void w4_rows_upto(int r, const GemmCall& g, int64_t i0, const float* Aw, const float* da,
                           const int32_t* corr, int64_t groups) noexcept {
    if constexpr (R > 1) {
      if (r < R) return w4_rows_upto<R - 1>(r, g, i0, Aw, da, corr, groups);
    }
    w4_rows<R>(g, i0, Aw, da, corr, groups);
  }

  // Many rows (prefill): one strip chunk of kW4Chunk groups serves every row tile from L1,
  // f32 partial sums parked in `part` between chunks. Returns the tile's sums in `c` at the
  // last chunk (else parks them).
  template <int R>
  static void w4_tile(const float* Aw, const float* da, const int32_t* corr, int64_t groups,
                      const uint8_t* S, int64_t g0, int64_t gc, float* part, bool first_tile,
                      fb (&c)[1][R][2], bool f16) noexcept {
    const uint8_t* src[1] = {S};
    micro_w4<R, 1>(Aw, da, corr, groups, src, g0, gc, c, g0 == 0 ? nullptr : part, first_tile, f16);
  }
  template <int R>
  static void w4_tile_upto(int r, const GemmCall& g, int64_t i0, const float* Aw, const float* da,
                           const int32_t* corr, int64_t groups, int64_t s, int64_t g0, int64_t gc,
                           float* part, bool first_tile, bool last) noexcept {
    if constexpr (R > 1) {
      if (r < R)
        return w4_tile_upto<R - 1>(r, g, i0, Aw, da, corr, groups, s, g0, gc, part, first_tile,
                                   last);
    }
    fb c[1][R][2];
    w4_tile<R>(Aw, da, corr, groups, g.data + s * g.strip_bytes, g0, gc, part, first_tile, c, g.f16_scales);
    if (last) {
      epilogue(g, i0, R, s, c[0]);
    } else {
      for (int i = 0; i < R; ++i) {
        c[0][i][0].store_aligned(part + i * P);
        c[0][i][1].store_aligned(part + i * P + L);
      }
    }
  }

  static void run_w4a8(const GemmCall& g) noexcept {
    alignas(64) float part[kRowChunk * P];
    const int64_t k = g.k, groups = (k + kInt4Group - 1) / kInt4Group;
    const int64_t words = groups * (kInt4Group / G);
    for (int64_t m0 = 0; m0 < g.m; m0 += kRowChunk) {
      const int64_t mc = imin(kRowChunk, g.m - m0);
      const int64_t tiles = (mc + MR - 1) / MR;
      float* Aw = g.a_pack;
      float* da = Aw + tiles * MR * words;
      int32_t* corr = reinterpret_cast<int32_t*>(da + mc * groups);
      pack_a_w4(mc, k, g.A + m0 * g.lda, g.lda, Aw, da, corr);
      // Row i's words: its tile's block, then its offset within the tile.
      auto words_of = [&](int64_t i) { return Aw + (i - i % MR) * words + i % MR; };
      if (mc <= kW4Rows) {
        w4_rows_upto<kW4Rows>(static_cast<int>(mc), g, m0, words_of(0), da, corr, groups);
        continue;
      }
      for (int64_t s = g.strip_begin; s < g.strip_end; ++s) {
        for (int64_t g0 = 0; g0 < groups || g0 == 0; g0 += kW4Chunk) {
          const int64_t gc = imin(kW4Chunk, groups - g0);
          const bool last = g0 + gc >= groups;
          for (int64_t i = 0; i < mc; i += kW4Rows) {
            const int r = static_cast<int>(imin(kW4Rows, mc - i));
            w4_tile_upto<kW4Rows>(r, g, m0 + i, words_of(i), da + i * groups,
                                  corr + i * groups, groups, s, g0, gc, part + i * P, i == 0,
                                  last);
          }
          if (groups == 0) break;
        }
      }
    }
  }

  // The formats whose activations are quantised to int8 (a VNNI kernel's run).
  static void run_quantised(const GemmCall& g) noexcept {
    if (g.type == WeightType::w4a8) {
      run_w4a8(g);
    } else {
      run_w8a8(g);
    }
  }

  static void run(const GemmCall& g) noexcept {
    if (quantises_activations(g.type)) {
      run_quantised(g);
    } else {
      run_float(g);
    }
  }
};

}  // namespace
}  // namespace moekit::kernels::detail
