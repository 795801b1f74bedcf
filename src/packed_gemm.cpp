// SPDX-License-Identifier: Apache-2.0
// Packed-weight GEMM: an MR x (2 SIMD registers) register-blocked micro-kernel streaming one
// packed strip per row tile, with fused epilogues (store, accumulate, activation, gating).
// The summation order of every output is sequential over k, so results do not depend on m,
// the row tiling or the thread count.
#include "moekit/kernels/packed_gemm.hpp"

#include <algorithm>
#include <cstring>
#include <string>

namespace moekit::kernels {
namespace {

using fbatch = xsimd::batch<float>;
constexpr int64_t L = static_cast<int64_t>(fbatch::size);
constexpr int64_t P = 2 * L;
// Row tile: 6 rows x 2 registers = 12 accumulators (fits 16 AVX2 registers with b0, b1, a).
constexpr int MR = 6;
// Rows packed at a time (the packed A buffer holds kRowChunk * k floats).
constexpr int64_t kRowChunk = 96;
// Depth per chunk: a strip chunk is kDepthChunk * P floats (16 KiB for AVX2).
constexpr int64_t kDepthChunk = 256;
// Cache lines of the next chunk prefetched while a chunk is computed.
constexpr int64_t kPrefetchLines = kDepthChunk * P * static_cast<int64_t>(sizeof(float)) / 64;

// One row tile: `Ap` is the tile's rows packed k-major (`[k, MR]`), B one strip (`[k, P]`).
// `acc` (`[R, P]`, aligned) holds the partial sums of earlier k chunks, or null for the first.
template <int R>
inline void micro(const float* Ap, const float* B, int64_t k, fbatch (&c)[MR][2], const float* acc) noexcept {
  for (int i = 0; i < R; ++i) {
    c[i][0] = acc ? fbatch::load_aligned(acc + i * P) : fbatch(0.0f);
    c[i][1] = acc ? fbatch::load_aligned(acc + i * P + L) : fbatch(0.0f);
  }
  for (int64_t p = 0; p < k; ++p) {
    const fbatch b0 = fbatch::load_aligned(B + p * P);
    const fbatch b1 = fbatch::load_aligned(B + p * P + L);
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      const fbatch a(Ap[p * MR + i]);
      c[i][0] = xsimd::fma(a, b0, c[i][0]);
      c[i][1] = xsimd::fma(a, b1, c[i][1]);
    }
  }
}

// Packs rows [0, m) of A into row tiles of MR rows, each k-major (`[k, MR]`), so the
// micro-kernel reads one contiguous stream instead of MR rows 4 KiB apart (L1 set conflicts).
inline void pack_a(int64_t m, int64_t k, const float* A, int64_t lda, float* Ap) noexcept {
  for (int64_t i0 = 0; i0 < m; i0 += MR) {
    const int64_t r = std::min<int64_t>(MR, m - i0);
    float* dst = Ap + i0 * k;
    for (int64_t i = 0; i < r; ++i) {
      const float* src = A + (i0 + i) * lda;
      for (int64_t p = 0; p < k; ++p) dst[p * MR + i] = src[p];
    }
  }
}

// Runs the micro-kernel over all strips and row tiles, handing each finished tile to
// `epi(row0, rows, strip, acc)`. Rows go in chunks of kRowChunk so the packed A stays small;
// k goes in chunks of kDepthChunk so a strip's chunk stays in L1 across the row tiles, with
// the partial sums parked in `part` between chunks (exact: the order stays sequential in k).
template <class Epi>
inline void drive(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, float* Ap, Epi&& epi) noexcept {
  fbatch c[MR][2];
  alignas(64) float part[kRowChunk * P];
  const int64_t k = W.k();
  for (int64_t m0 = 0; m0 < m; m0 += kRowChunk) {
    const int64_t mc = std::min<int64_t>(kRowChunk, m - m0);
    pack_a(mc, k, A + m0 * lda, lda, Ap);
    for (int64_t s = 0; s < W.strips(); ++s) {
      for (int64_t p0 = 0; p0 < k || p0 == 0; p0 += kDepthChunk) {
        const int64_t kc = std::min<int64_t>(kDepthChunk, k - p0);
        const bool last = p0 + kc >= k;
        const float* B = W.strip(s) + p0 * P;
        // Strips are contiguous, so the next chunk starts where this one ends: spread its
        // prefetch over this chunk's row tiles (the weights stream from DRAM once per chunk).
        const char* next = reinterpret_cast<const char*>(B + kc * P);
        const int64_t tiles = (mc + MR - 1) / MR;
        const int64_t lines_per_tile = (kPrefetchLines + tiles - 1) / tiles;
        for (int64_t i = 0; i < mc; i += MR) {
          const int64_t l0 = (i / MR) * lines_per_tile, l1 = std::min(kPrefetchLines, l0 + lines_per_tile);
          for (int64_t l = l0; l < l1; ++l) __builtin_prefetch(next + l * 64, 0, 3);
          const int64_t r = std::min<int64_t>(MR, mc - i);
          const float* a = Ap + i * k + p0 * MR;
          const float* acc = p0 == 0 ? nullptr : part + i * P;
          switch (r) {
            case 1: micro<1>(a, B, kc, c, acc); break;
            case 2: micro<2>(a, B, kc, c, acc); break;
            case 3: micro<3>(a, B, kc, c, acc); break;
            case 4: micro<4>(a, B, kc, c, acc); break;
            case 5: micro<5>(a, B, kc, c, acc); break;
            default: micro<MR>(a, B, kc, c, acc); break;
          }
          if (last) {
            epi(m0 + i, r, s, c);
          } else {
            for (int64_t j = 0; j < r; ++j) {
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

// Stores `width` (<= L) leading lanes of v at dst.
inline void store_lanes(const fbatch& v, float* dst, int64_t width) noexcept {
  if (width == L) {
    v.store_unaligned(dst);
  } else if (width > 0) {
    alignas(64) float tmp[L];
    v.store_aligned(tmp);
    std::memcpy(dst, tmp, static_cast<size_t>(width) * sizeof(float));
  }
}

inline void add_lanes(const fbatch& v, float* dst, int64_t width) noexcept {
  if (width == L) {
    (v + fbatch::load_unaligned(dst)).store_unaligned(dst);
  } else {
    alignas(64) float tmp[L];
    v.store_aligned(tmp);
    for (int64_t j = 0; j < width; ++j) dst[j] += tmp[j];
  }
}

}  // namespace

size_t packed_a_floats(int64_t m, int64_t k) noexcept {
  const int64_t rows = std::min<int64_t>(m, kRowChunk);
  return static_cast<size_t>(((rows + MR - 1) / MR) * MR * k);
}

void PackedMatrix::pack(const float* W, int64_t n, int64_t k, int64_t ldw) {
  n_ = n;
  k_ = k;
  gated_ = false;
  strips_ = (n + P - 1) / P;
  data_.assign(static_cast<size_t>(strips_ * k * P), 0.0f);
  for (int64_t s = 0; s < strips_; ++s)
    for (int64_t j = 0; j < P && s * P + j < n; ++j) {
      const float* row = W + (s * P + j) * ldw;
      float* dst = data_.data() + s * k * P + j;
      for (int64_t p = 0; p < k; ++p) dst[p * P] = row[p];
    }
}

void PackedMatrix::pack_gated(const float* G, const float* U, int64_t f, int64_t k, int64_t ldw) {
  n_ = f;
  k_ = k;
  gated_ = true;
  strips_ = (f + L - 1) / L;
  data_.assign(static_cast<size_t>(strips_ * k * P), 0.0f);
  for (int64_t s = 0; s < strips_; ++s)
    for (int64_t j = 0; j < L && s * L + j < f; ++j) {
      const float* g = G + (s * L + j) * ldw;
      const float* u = U + (s * L + j) * ldw;
      float* dst = data_.data() + s * k * P + j;
      for (int64_t p = 0; p < k; ++p) {
        dst[p * P] = g[p];
        dst[p * P + L] = u[p];
      }
    }
}

void PackedMatrix::unpack_row(int64_t r, bool up, float* dst) const noexcept {
  const int64_t width = gated_ ? L : P;
  const int64_t s = r / width, j = r % width + (gated_ && up ? L : 0);
  const float* src = data_.data() + s * k_ * P + j;
  for (int64_t p = 0; p < k_; ++p) dst[p] = src[p * P];
}

void gemm_packed(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, float* C, int64_t ldc,
                 float* a_pack, bool accumulate) noexcept {
  const int64_t n = W.n();
  drive(m, A, lda, W, a_pack, [&](int64_t i0, int64_t rows, int64_t s, fbatch (&c)[MR][2]) {
    const int64_t col = s * P;
    const int64_t w0 = std::min<int64_t>(L, n - col), w1 = std::min<int64_t>(L, n - col - L);
    for (int64_t i = 0; i < rows; ++i) {
      float* dst = C + (i0 + i) * ldc + col;
      if (accumulate) {
        add_lanes(c[i][0], dst, w0);
        if (w1 > 0) add_lanes(c[i][1], dst + L, w1);
      } else {
        store_lanes(c[i][0], dst, w0);
        if (w1 > 0) store_lanes(c[i][1], dst + L, w1);
      }
    }
  });
}

void gemm_packed_gated(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act,
                       float* H, int64_t ldh, float* a_pack) noexcept {
  const int64_t f = W.n();
  drive(m, A, lda, W, a_pack, [&](int64_t i0, int64_t rows, int64_t s, fbatch (&c)[MR][2]) {
    const int64_t col = s * L, w = std::min<int64_t>(L, f - col);
    for (int64_t i = 0; i < rows; ++i) store_lanes(activate(act, c[i][0]) * c[i][1], H + (i0 + i) * ldh + col, w);
  });
}

void gemm_packed_act(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act,
                     float* H, int64_t ldh, float* a_pack) noexcept {
  const int64_t n = W.n();
  drive(m, A, lda, W, a_pack, [&](int64_t i0, int64_t rows, int64_t s, fbatch (&c)[MR][2]) {
    const int64_t col = s * P;
    const int64_t w0 = std::min<int64_t>(L, n - col), w1 = std::min<int64_t>(L, n - col - L);
    for (int64_t i = 0; i < rows; ++i) {
      store_lanes(activate(act, c[i][0]), H + (i0 + i) * ldh + col, w0);
      if (w1 > 0) store_lanes(activate(act, c[i][1]), H + (i0 + i) * ldh + col + L, w1);
    }
  });
}

}  // namespace moekit::kernels

#include "moekit/kernels/gemm.hpp"

namespace moekit::kernels {

const char* gemm_backend() noexcept {
  static const std::string name =
      "packed-" + std::to_string(MR) + "x" + std::to_string(P) + "-" + xsimd::batch<float>::arch_type::name();
  return name.c_str();
}

}  // namespace moekit::kernels
