// SPDX-License-Identifier: Apache-2.0
// Packed-weight GEMM: an MR x (2 SIMD registers) register-blocked micro-kernel streaming one
// packed strip per row tile, with fused epilogues (store, accumulate, activation, gating).
// The summation order of every output is sequential over k, so results do not depend on m,
// the row tiling or the thread count.
#include "moekit/kernels/packed_gemm.hpp"

#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <string>

#include "moekit/error.hpp"
#include "moekit/kernels/gemm.hpp"

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

void PackedMatrix::pack(const float* W, int64_t n, int64_t k, int64_t ldw, const GemmKernel* kernel) {
  kernel_ = kernel != nullptr ? kernel : &active_gemm_kernel();
  const int64_t Pk = kernel_->panel;
  n_ = n;
  k_ = k;
  gated_ = false;
  strips_ = (n + Pk - 1) / Pk;
  data_.assign(static_cast<size_t>(strips_ * k * Pk), 0.0f);
  for (int64_t s = 0; s < strips_; ++s)
    for (int64_t j = 0; j < Pk && s * Pk + j < n; ++j) {
      const float* row = W + (s * Pk + j) * ldw;
      float* dst = data_.data() + s * k * Pk + j;
      for (int64_t p = 0; p < k; ++p) dst[p * Pk] = row[p];
    }
}

void PackedMatrix::pack_gated(const float* G, const float* U, int64_t f, int64_t k, int64_t ldw, const GemmKernel* kernel) {
  kernel_ = kernel != nullptr ? kernel : &active_gemm_kernel();
  const int64_t Pk = kernel_->panel, Lk = Pk / 2;
  n_ = f;
  k_ = k;
  gated_ = true;
  strips_ = (f + Lk - 1) / Lk;
  data_.assign(static_cast<size_t>(strips_ * k * Pk), 0.0f);
  for (int64_t s = 0; s < strips_; ++s)
    for (int64_t j = 0; j < Lk && s * Lk + j < f; ++j) {
      const float* g = G + (s * Lk + j) * ldw;
      const float* u = U + (s * Lk + j) * ldw;
      float* dst = data_.data() + s * k * Pk + j;
      for (int64_t p = 0; p < k; ++p) {
        dst[p * Pk] = g[p];
        dst[p * Pk + Lk] = u[p];
      }
    }
}

void PackedMatrix::unpack_row(int64_t r, bool up, float* dst) const noexcept {
  const int64_t Pk = panel(), Lk = Pk / 2;
  const int64_t width = gated_ ? Lk : Pk;
  const int64_t s = r / width, j = r % width + (gated_ && up ? Lk : 0);
  const float* src = data_.data() + s * k_ * Pk + j;
  for (int64_t p = 0; p < k_; ++p) dst[p] = src[p * Pk];
}

namespace {

void simd_gemm(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, float* C, int64_t ldc,
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

void simd_gemm_gated(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act,
                     float* H, int64_t ldh, float* a_pack) noexcept {
  const int64_t f = W.n();
  drive(m, A, lda, W, a_pack, [&](int64_t i0, int64_t rows, int64_t s, fbatch (&c)[MR][2]) {
    const int64_t col = s * L, w = std::min<int64_t>(L, f - col);
    for (int64_t i = 0; i < rows; ++i) store_lanes(activate(act, c[i][0]) * c[i][1], H + (i0 + i) * ldh + col, w);
  });
}

void simd_gemm_act(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act,
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

// ---------------------------------------------------------------- the portable kernel
// Plain loops with std::fma in the same order as the SIMD kernel (sequential over k for every
// output), so plain GEMM results agree bit for bit; strips of 16 columns.
constexpr int64_t kScalarPanel = 16;

template <class Epi>
void scalar_drive(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Epi&& epi) noexcept {
  const int64_t k = W.k();
  for (int64_t s = 0; s < W.strips(); ++s) {
    const float* B = W.strip(s);
    for (int64_t i = 0; i < m; ++i) {
      float acc[kScalarPanel] = {};
      const float* a = A + i * lda;
      for (int64_t p = 0; p < k; ++p)
        for (int64_t j = 0; j < kScalarPanel; ++j) acc[j] = std::fma(a[p], B[p * kScalarPanel + j], acc[j]);
      epi(i, s, acc);
    }
  }
}

void scalar_gemm(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, float* C, int64_t ldc, float*,
                 bool accumulate) noexcept {
  const int64_t n = W.n();
  scalar_drive(m, A, lda, W, [&](int64_t i, int64_t s, const float* acc) {
    for (int64_t j = 0; j < kScalarPanel && s * kScalarPanel + j < n; ++j) {
      float& c = C[i * ldc + s * kScalarPanel + j];
      c = accumulate ? c + acc[j] : acc[j];
    }
  });
}

void scalar_gemm_gated(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act, float* H,
                       int64_t ldh, float*) noexcept {
  const int64_t f = W.n(), half = kScalarPanel / 2;
  scalar_drive(m, A, lda, W, [&](int64_t i, int64_t s, const float* acc) {
    for (int64_t j = 0; j < half && s * half + j < f; ++j) H[i * ldh + s * half + j] = activate(act, acc[j]) * acc[half + j];
  });
}

void scalar_gemm_act(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act, float* H,
                     int64_t ldh, float*) noexcept {
  const int64_t n = W.n();
  scalar_drive(m, A, lda, W, [&](int64_t i, int64_t s, const float* acc) {
    for (int64_t j = 0; j < kScalarPanel && s * kScalarPanel + j < n; ++j)
      H[i * ldh + s * kScalarPanel + j] = activate(act, acc[j]);
  });
}

const GemmKernel kScalarKernel{"scalar", kScalarPanel, scalar_gemm, scalar_gemm_gated, scalar_gemm_act};
const GemmKernel kSimdKernel{xsimd::batch<float>::arch_type::name(), P, simd_gemm, simd_gemm_gated, simd_gemm_act};

}  // namespace

const std::vector<const GemmKernel*>& gemm_kernels() noexcept {
  static const std::vector<const GemmKernel*> all = {&kScalarKernel, &kSimdKernel};
  return all;
}

const GemmKernel& active_gemm_kernel() {
  static const GemmKernel* chosen = [] {
    const char* env = std::getenv("MOEKIT_KERNEL");
    if (env == nullptr || *env == '\0') return gemm_kernels().back();
    const std::string want = env;
    if (want == "simd") return &kSimdKernel;
    for (const GemmKernel* k : gemm_kernels())
      if (want == k->name) return k;
    return static_cast<const GemmKernel*>(nullptr);
  }();
  MOEKIT_CHECK(chosen != nullptr, "MOEKIT_KERNEL: expected \"scalar\", \"simd\" or \"", kSimdKernel.name, "\", got \"",
               std::getenv("MOEKIT_KERNEL"), "\"");
  return *chosen;
}

void gemm_packed(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, float* C, int64_t ldc, float* a_pack,
                 bool accumulate) noexcept {
  W.kernel().gemm(m, A, lda, W, C, ldc, a_pack, accumulate);
}

void gemm_packed_gated(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act, float* H,
                       int64_t ldh, float* a_pack) noexcept {
  W.kernel().gemm_gated(m, A, lda, W, act, H, ldh, a_pack);
}

void gemm_packed_act(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act, float* H,
                     int64_t ldh, float* a_pack) noexcept {
  W.kernel().gemm_act(m, A, lda, W, act, H, ldh, a_pack);
}

const char* gemm_backend() noexcept {
  static std::string name;
  try {
    const GemmKernel& k = active_gemm_kernel();
    name = k.name == std::string("scalar") ? "scalar-16"
                                           : "packed-" + std::to_string(MR) + "x" + std::to_string(P) + "-" + k.name;
  } catch (const error&) {
    name = "invalid MOEKIT_KERNEL";
  }
  return name.c_str();
}

}  // namespace moekit::kernels
