// SPDX-License-Identifier: Apache-2.0
// The portable row kernels (kernels/vector.hpp): plain loops over the same 16 lanes as the
// SIMD ones, with std::fma, so dot products, axpy and scaling give their bits on any x86-64
// CPU (exp / log / tanh are the C library's: within float rounding of the SIMD ones).
// Compiled with -ffp-contract=off (see CMakeLists.txt).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "rows_internal.hpp"

namespace moekit::kernels::detail {
namespace {

constexpr int64_t kL = kRowLanes;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

float dot1(const float* x, const float* w, int64_t n) noexcept {
  float acc[kL] = {};
  int64_t i = 0;
  for (; i + kL <= n; i += kL)
    for (int64_t l = 0; l < kL; ++l) acc[l] = std::fma(x[i + l], w[i + l], acc[l]);
  float s = reduce_lanes(acc);
  for (; i < n; ++i) s = std::fma(x[i], w[i], s);
  return s;
}

void matvec(const float* x, const float* W, int64_t E, int64_t n, float* out) noexcept {
  for (int64_t e = 0; e < E; ++e) out[e] = dot1(x, W + e * n, n);
}

void scale(float a, const float* x, float* y, int64_t n) noexcept {
  for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];
}

void axpy(float a, const float* x, float* y, int64_t n) noexcept {
  for (int64_t i = 0; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

int64_t first_non_finite(const float* x, int64_t n) noexcept {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return i;
  return -1;
}

float lse_sum(const float* a, const float* b, int64_t n) noexcept {
  float m = kNegInf;
  for (int64_t i = 0; i < n; ++i) m = std::fmax(m, a[i] + b[i]);
  float s[kL] = {};
  for (int64_t i = 0; i < n; i += kL)
    for (int64_t l = 0; l < kL; ++l) s[l] += std::exp((a[i + l] + b[i + l]) - m);
  return m + std::log(reduce_lanes(s));
}

float exp_sum(const float* x, float scale, float shift, float* y, int64_t n) noexcept {
  float s[kL] = {};
  int64_t i = 0;
  for (; i + kL <= n; i += kL)
    for (int64_t l = 0; l < kL; ++l) {
      y[i + l] = std::exp(x[i + l] * scale - shift);
      s[l] += y[i + l];
    }
  float sum = reduce_lanes(s);
  for (; i < n; ++i) {
    y[i] = std::exp(x[i] * scale - shift);
    sum += y[i];
  }
  return sum;
}

int64_t tdict_decode(const uint16_t* codes, const uint64_t* table, float lo, float hi, float* dst,
                     int64_t k) noexcept {
  int64_t c = 0;
  for (int64_t pos = 0; pos < k; ++c) {
    const uint64_t e = table[codes[c]];
    const int64_t n = std::clamp<int64_t>(static_cast<int64_t>(e >> 56), 1, 14) * 2;
    for (int64_t p = 0; p < n; ++p)
      dst[pos + p] = (e >> p & 1) != 0 ? lo : (e >> (28 + p) & 1) != 0 ? hi : 0.0f;
    pos += n;
  }
  return c;
}

void lse_columns(const float* K, int64_t stride, const float* u, int64_t rows,
                 float* out) noexcept {
  for (int64_t c = 0; c < kL; ++c) {
    float m = kNegInf;
    for (int64_t r = 0; r < rows; ++r) m = std::fmax(m, K[r * stride + c] + u[r]);
    float s = 0.0f;
    for (int64_t r = 0; r < rows; ++r) s += std::exp((K[r * stride + c] + u[r]) - m);
    out[c] = m + std::log(s);
  }
}

void gru_gates(bool rnn, const float* a, const float* b, const float* hp, float* out,
               int64_t n) noexcept {
  for (int64_t i = 0; i < n; ++i) {
    if (rnn) {
      out[i] = std::tanh(a[i] + b[i]);
      continue;
    }
    const float r = 1.0f / (1.0f + std::exp(-(a[i] + b[i])));
    const float z = 1.0f / (1.0f + std::exp(-(a[n + i] + b[n + i])));
    const float c = std::tanh(a[2 * n + i] + r * b[2 * n + i]);
    const float prev = hp != nullptr ? hp[i] : 0.0f;
    out[i] = (1.0f - z) * c + z * prev;
  }
}

void bf16_to_f32(const uint16_t* x, float* y, int64_t n) noexcept {
  for (int64_t i = 0; i < n; ++i) y[i] = from_bf16_bits(x[i]);
}
void f32_to_bf16(const float* x, uint16_t* y, int64_t n) noexcept {
  for (int64_t i = 0; i < n; ++i) y[i] = to_bf16_bits(x[i]);
}
void f16_to_f32(const uint16_t* x, float* y, int64_t n) noexcept {
  for (int64_t i = 0; i < n; ++i) y[i] = from_f16_bits(x[i]);
}
void f32_to_f16(const float* x, uint16_t* y, int64_t n) noexcept {
  for (int64_t i = 0; i < n; ++i) y[i] = to_f16_bits(x[i]);
}

}  // namespace

const RowKernels kRowsScalar{"scalar",     &matvec,      &scale,       &axpy,        &first_non_finite,
                             &lse_sum,     &lse_columns, &gru_gates,   &bf16_to_f32, &f32_to_bf16,
                             &f16_to_f32,  &f32_to_f16, &exp_sum,     &tdict_decode};

}  // namespace moekit::kernels::detail
