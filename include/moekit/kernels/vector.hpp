// SPDX-License-Identifier: Apache-2.0
// Row kernels on contiguous float vectors (dot products, axpy, the NaN scan, the log-sum-exp
// and gate functions of the routers), compiled per instruction set in src/ and chosen at run
// time like the GEMM kernels (kernels/packed_gemm.hpp). This header carries no SIMD code, so
// it compiles for any x86-64 target at any optimisation level.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::kernels {

/// Every row kernel sums in this many lanes, whatever the instruction set: lane l of a dot
/// product accumulates elements l, l + 16, l + 32, ... with fused multiply-adds; the lanes are
/// then added pairwise (l + 8, then l + 4, l + 2, l + 1) and the tail (n % 16 elements)
/// follows one by one with fused multiply-adds. So dot products, axpy and scaling give the
/// same bits on every kernel (scalar, AVX2, AVX-512) and for any number of rows computed
/// together. Functions built on exp / log / tanh agree within float rounding across kernels.
inline constexpr int64_t kRowLanes = 16;

/// One compiled implementation of the row kernels (a row of the run-time kernel table; see
/// row_kernels()). Internal entry points: call the free functions below.
struct RowKernels {
  const char* name;  ///< the kernel's name, as for GemmKernel ("scalar", "fma3+avx2", "avx512bw")
  /// `out[e] = x . W[e]` for `W [E, n]` row-major.
  void (*matvec)(const float* x, const float* W, int64_t E, int64_t n, float* out) noexcept;
  /// `y[0:n] = a * x[0:n]` (y may be x).
  void (*scale)(float a, const float* x, float* y, int64_t n) noexcept;
  /// `y[0:n] = fma(a, x[0:n], y[0:n])`.
  void (*axpy)(float a, const float* x, float* y, int64_t n) noexcept;
  /// Index of the first NaN or infinity of `x [n]`, or -1.
  int64_t (*first_non_finite)(const float* x, int64_t n) noexcept;
  /// `logsumexp_j (a[j] + b[j])` over n values, n a multiple of kRowLanes (see below).
  float (*lse_sum)(const float* a, const float* b, int64_t n) noexcept;
  /// `out[c] = logsumexp_r (K[r * stride + c] + u[r])` for c < kRowLanes (see below).
  void (*lse_columns)(const float* K, int64_t stride, const float* u, int64_t rows,
                      float* out) noexcept;
  /// GRU / RNN cell gates (see gru_gates()).
  void (*gru_gates)(bool rnn, const float* a, const float* b, const float* h_prev, float* out,
                    int64_t n) noexcept;
  /// 16-bit activations to and from f32 (see bf16_to_f32() and the three after it).
  void (*bf16_to_f32)(const uint16_t* x, float* y, int64_t n) noexcept;
  void (*f32_to_bf16)(const float* x, uint16_t* y, int64_t n) noexcept;
  void (*f16_to_f32)(const uint16_t* x, float* y, int64_t n) noexcept;
  void (*f32_to_f16)(const float* x, uint16_t* y, int64_t n) noexcept;
  /// `y[i] = exp(x[i] * scale - shift)`, returning their sum (see exp_sum()).
  float (*exp_sum)(const float* x, float scale, float shift, float* y, int64_t n) noexcept;
  /// Dictionary-coded ternaries to floats (see tdict_decode()); returns the codewords read.
  int64_t (*tdict_decode)(const uint16_t* codes, const uint64_t* table, float lo, float hi, float* dst,
                          int64_t k) noexcept;
};

/// The row kernels in use: the best compiled implementation this CPU supports, or the one
/// MOEKIT_KERNEL names (the same choice as the GEMM kernels'; an invalid MOEKIT_KERNEL falls
/// back to the scalar implementation here, and active_gemm_kernel() reports the error).
const RowKernels& row_kernels() noexcept;

/// Every implementation this CPU can run, scalar first (for tests and benchmarks).
const std::vector<const RowKernels*>& row_kernel_implementations() noexcept;

/// Dot product of two vectors of length n (order: see kRowLanes).
inline float dot(const float* x, const float* w, int64_t n) noexcept {
  float out;
  row_kernels().matvec(x, w, 1, n, &out);
  return out;
}

/// `logits[e] = x . W[e]` for `W [E, n]` row-major (each row as dot()).
inline void matvec_rows(const float* x, const float* W, int64_t E, int64_t n,
                        float* logits) noexcept {
  row_kernels().matvec(x, W, E, n, logits);
}

/// `dst[0:n] = src[0:n]`.
inline void copy_row(const float* src, float* dst, int64_t n) noexcept {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

/// `y[0:n] = a * x[0:n]`.
inline void scale_row(float a, const float* x, float* y, int64_t n) noexcept {
  row_kernels().scale(a, x, y, n);
}

/// `y[0:n] = x[0:n] * w[0:n]`, element by element (each product rounded once, so the same on
/// every instruction set; a plain loop the compiler vectorises).
inline void mul_rows(const float* x, const float* w, float* y, int64_t n) noexcept {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * w[i];
}

/// `y[0:n] += a * x[0:n]` (one fused multiply-add per element).
inline void axpy_row(float a, const float* x, float* y, int64_t n) noexcept {
  row_kernels().axpy(a, x, y, n);
}

/// Index of the first NaN or infinity in `x [n]`, or -1 when all are finite. Vectorised:
/// `v - v` is 0 for finite v and NaN otherwise, summed per block of 1024; only a block
/// whose sum is NaN is searched element by element.
inline int64_t first_non_finite(const float* x, int64_t n) noexcept {
  return row_kernels().first_non_finite(x, n);
}

/// `logsumexp_j (a[j] + b[j])` over `n` values, n a multiple of kRowLanes; -inf entries are
/// allowed as long as one is finite. Fixed order: the maximum, then the 16 lane sums of
/// `exp(a + b - max)`, added pairwise, then `max + log(sum)`.
inline float logsumexp_sum(const float* a, const float* b, int64_t n) noexcept {
  return row_kernels().lse_sum(a, b, n);
}

/// Column log-sum-exp of one kRowLanes-wide block: `out[c] = logsumexp_r (K[r * stride + c] +
/// u[r])` over rows r = 0..rows-1, each column summed in row order. Columns that are -inf in
/// every row give NaN.
inline void logsumexp_columns(const float* K, int64_t stride, const float* u, int64_t rows,
                              float* out) noexcept {
  row_kernels().lse_columns(K, stride, u, rows, out);
}

/// Gates of a recurrent router cell over n state units (PyTorch's nn.GRUCell / nn.RNNCell
/// conventions). `a`, `b`: the input and hidden pre-activations with their biases,
/// `[3n]` (r, z, n blocks) for a GRU, `[n]` for an RNN; `h_prev [n]` or null (zeros).
///  - RNN: `out = tanh(a + b)`.
///  - GRU: `r = sigmoid(a_r + b_r)`, `z = sigmoid(a_z + b_z)`, `c = tanh(a_n + r * b_n)`,
///    `out = (1 - z) * c + z * h_prev`.
/// `out` may alias h_prev.
inline void gru_gates(bool rnn, const float* a, const float* b, const float* h_prev, float* out,
                      int64_t n) noexcept {
  row_kernels().gru_gates(rnn, a, b, h_prev, out, n);
}

/// `y[0:n]` = the bfloat16 values `x[0:n]` (bit patterns) as f32: exact.
inline void bf16_to_f32(const uint16_t* x, float* y, int64_t n) noexcept { row_kernels().bf16_to_f32(x, y, n); }

/// `y[0:n]` = `x[0:n]` rounded to bfloat16, to nearest even; a NaN stays a NaN (quiet, sign and
/// the payload's top bits kept); values beyond the largest bfloat16 become infinities.
inline void f32_to_bf16(const float* x, uint16_t* y, int64_t n) noexcept { row_kernels().f32_to_bf16(x, y, n); }

/// `y[0:n]` = the IEEE half values `x[0:n]` as f32: exact (subnormals, infinities kept).
inline void f16_to_f32(const uint16_t* x, float* y, int64_t n) noexcept { row_kernels().f16_to_f32(x, y, n); }

/// `y[0:n]` = `x[0:n]` rounded to IEEE half, to nearest even (what F16C's vcvtps2ph computes
/// with round-to-nearest): |x| >= 65520 becomes an infinity, tiny values half subnormals or
/// zero; a NaN stays a quiet NaN. Under MXCSR.DAZ the SIMD kernels read f32 subnormals as 0.
inline void f32_to_f16(const float* x, uint16_t* y, int64_t n) noexcept { row_kernels().f32_to_f16(x, y, n); }

/// `y[i] = exp(x[i] * scale - shift)` for i < n (the product rounded, then the difference;
/// -inf entries give 0), returning their sum: the 16 lane sums of the first n - n % 16 values
/// added pairwise, then the tail one by one (a softmax's numerators and denominator; y may be
/// x). Agrees across kernels within float rounding (exp).
inline float exp_sum(const float* x, float scale, float shift, float* y, int64_t n) noexcept {
  return row_kernels().exp_sum(x, scale, shift, y, n);
}

/// Decodes codewords (QMoE's dictionary, experts/qmoe.hpp) into `dst[0, k)`: for each
/// codeword c in turn, `table[c]` gives its pairs (bits 56-59, 1 to 14) and which of its
/// 2 * pairs ternaries are lo (bit p of bits 0-27) and hi (bit p of bits 28-55); each becomes
/// lo, hi or 0, until k values are written (a pair count outside [1, 14] is read as the
/// nearest bound, so a bad table cannot stall or overrun). dst needs k + 32 floats (the last codeword's
/// values past k and a store's width are written into the pad). Returns the codewords read.
/// Exact (only selects) and the same on every kernel.
inline int64_t tdict_decode(const uint16_t* codes, const uint64_t* table, float lo, float hi, float* dst,
                            int64_t k) noexcept {
  return row_kernels().tdict_decode(codes, table, lo, hi, dst, k);
}

/// `y[0:n] = 0`.
inline void zero_row(float* y, int64_t n) noexcept {
  std::memset(y, 0, static_cast<size_t>(n) * sizeof(float));
}

}  // namespace moekit::kernels
#pragma GCC visibility pop
