// SPDX-License-Identifier: Apache-2.0
// Row kernels on contiguous float vectors: dot products, copies, axpy (xsimd, fixed order).
#pragma once

#include <cstdint>
#include <cstring>

#include <xsimd/xsimd.hpp>

namespace moekit::kernels {

using fbatch = xsimd::batch<float>;
inline constexpr int64_t kLanes = static_cast<int64_t>(fbatch::size);

/// Dot products of one row `x [n]` with `R` rows `w[r] [n]`. The summation order per row is
/// fixed (one SIMD accumulator over the chunks, horizontal add, scalar tail), so the result
/// of a row never depends on how many rows are computed together.
template <int R>
inline void dot_rows(const float* x, const float* const* w, int64_t n, float* out) noexcept {
  fbatch acc[R];
  for (int r = 0; r < R; ++r) acc[r] = fbatch(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const fbatch xv = fbatch::load_unaligned(x + i);
    for (int r = 0; r < R; ++r) acc[r] = xsimd::fma(xv, fbatch::load_unaligned(w[r] + i), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float s = xsimd::hadd(acc[r]);
    for (int64_t j = i; j < n; ++j) s = std::fma(x[j], w[r][j], s);
    out[r] = s;
  }
}

/// Dot product of two vectors of length n (same order as dot_rows).
inline float dot(const float* x, const float* w, int64_t n) noexcept {
  float out;
  dot_rows<1>(x, &w, n, &out);
  return out;
}

/// `logits[e] = x . W[e]` for `W [E, n]` row-major.
inline void matvec_rows(const float* x, const float* W, int64_t E, int64_t n,
                        float* logits) noexcept {
  int64_t e = 0;
  for (; e + 4 <= E; e += 4) {
    const float* rows[4] = {W + e * n, W + (e + 1) * n, W + (e + 2) * n, W + (e + 3) * n};
    dot_rows<4>(x, rows, n, logits + e);
  }
  for (; e < E; ++e) logits[e] = dot(x, W + e * n, n);
}

/// `dst[0:n] = src[0:n]`.
inline void copy_row(const float* src, float* dst, int64_t n) noexcept {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

/// `y[0:n] = a * x[0:n]`.
inline void scale_row(float a, const float* x, float* y, int64_t n) noexcept {
  const fbatch av(a);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) (av * fbatch::load_unaligned(x + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] = a * x[i];
}

/// `y[0:n] += a * x[0:n]`.
inline void axpy_row(float a, const float* x, float* y, int64_t n) noexcept {
  const fbatch av(a);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    xsimd::fma(av, fbatch::load_unaligned(x + i), fbatch::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

/// Index of the first NaN or infinity in `x [n]`, or -1 when all are finite. Vectorised:
/// `v - v` is 0 for finite v and NaN otherwise, summed per block of 1024; only a block
/// whose sum is NaN is searched element by element.
inline int64_t first_non_finite(const float* x, int64_t n) noexcept {
  constexpr int64_t kBlock = 1024;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    fbatch acc(0.0f);
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      const fbatch v = fbatch::load_unaligned(x + i);
      acc += v - v;
    }
    float tail = 0.0f;
    for (; i < e; ++i) tail += x[i] - x[i];
    const float s = xsimd::hadd(acc) + tail;
    if (s != s)
      for (int64_t j = b; j < e; ++j)
        if (x[j] - x[j] != 0.0f) return j;
  }
  return -1;
}

/// `y[0:n] = 0`.
inline void zero_row(float* y, int64_t n) noexcept {
  std::memset(y, 0, static_cast<size_t>(n) * sizeof(float));
}

}  // namespace moekit::kernels
