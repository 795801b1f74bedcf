// SPDX-License-Identifier: Apache-2.0
// Dictionary-coded ternary experts (QMoE, Frantar & Alistarh, arXiv 2310.16795; code
// IST-DASLab/qmoe 9110baa9): sub-1-bit experts decoded on the fly.
//
// Each output row of a weight matrix is ternary on its own grid {lo, 0, hi} (lo = min(0, the
// row's smallest finite value), hi = max(0, its largest); w > hi / 2 -> hi, w < lo / 2 -> lo,
// else 0: QMoE's grid with round-to-nearest, where QMoE rounds with GPTQ on calibration
// data). The row's ternaries, read in pairs (a 9-symbol alphabet: t0 + 3 t1 with 0 = zero,
// 1 = lo, 2 = hi; an odd row gets a zero pad), are coded greedily, longest match first, with
// a fixed dictionary of 2^16 codewords, each 16 bits and standing for 1 to 14 pairs (2 to 28
// ternaries). As QMoE's, the dictionary is built without data: the 2^16 most probable pair
// sequences under independent ternaries with P(0) = 0.885 and P(lo) = P(hi) = 0.0575, so it
// is prefix-closed and holds every single pair. Weights at QMoE's sparsity take about 0.8
// bits; dense ternaries take more (up to 8 bits per weight in the worst case: one pair per
// codeword).
//
// Decoding is a table lookup per codeword (its length and two 28-bit masks: which ternaries
// are lo and which hi) and a masked SIMD store per 16 weights (kernels::RowKernels::
// tdict_decode); a GEMM decodes each row once into a buffer and takes the dot products of
// every activation row with it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moekit/activation.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

namespace qmoe {
/// Codewords in the dictionary, and the most pairs one stands for.
inline constexpr int64_t kDictionarySize = 65536;
inline constexpr int kMaxPairs = 14;
/// The pair symbols (t0 + 3 t1, each in 0..8) codeword `id` stands for, in order.
std::vector<uint8_t> dictionary_entry(int64_t id);
/// The decode table: entry id = lo mask (bits 0-27) | hi mask << 28 | pairs << 56 (built on
/// first use: about 20 MB of work memory once).
const uint64_t* decode_table();
}  // namespace qmoe

/// A weight matrix `W [n, k]` (HF `[out, in]`) as dictionary-coded ternary rows.
class TernaryDictMatrix {
 public:
  TernaryDictMatrix() = default;
  /// Quantises and codes W (row stride ldw). NaN weights become 0, infinities the row's lo /
  /// hi. Throws moekit::error for bad sizes (n, k >= 1, n k < 2^40, ldw >= k).
  TernaryDictMatrix(const float* W, int64_t n, int64_t k, int64_t ldw);

  [[nodiscard]] int64_t rows() const noexcept { return n_; }
  [[nodiscard]] int64_t cols() const noexcept { return k_; }
  /// Bytes held: codewords (2 each), row offsets (8 each) and the rows' lo / hi (4 each).
  [[nodiscard]] size_t bytes() const noexcept {
    return codes_.size() * 2 + offsets_.size() * 8 + (lo_.size() + hi_.size()) * 4;
  }
  /// Codeword bits per weight (bytes() * 8 / (n k) with the per-row data).
  [[nodiscard]] double bits_per_weight() const noexcept {
    return n_ == 0 ? 0.0 : static_cast<double>(bytes()) * 8.0 / static_cast<double>(n_ * k_);
  }
  [[nodiscard]] float lo(int64_t r) const noexcept { return lo_[static_cast<size_t>(r)]; }
  [[nodiscard]] float hi(int64_t r) const noexcept { return hi_[static_cast<size_t>(r)]; }
  [[nodiscard]] const std::vector<uint16_t>& codes() const noexcept { return codes_; }

  /// Floats decode_row() needs at dst: k plus a pad of 32 it may overwrite.
  [[nodiscard]] int64_t decode_floats() const noexcept { return k_ + 32; }
  /// Row r's weights (each lo, 0 or hi) into dst[0, k) (dst holds decode_floats()); r in
  /// [0, rows()) (a precondition: not checked on this hot path).
  void decode_row(int64_t r, float* dst) const noexcept;
  /// `y[m, n] = x[m, k] W^T` (rows ldx / ldy apart), or `+=` with accumulate; `scratch` holds
  /// decode_floats(). Each row decoded once, then one dot product (kernels::dot) per output.
  void gemm(int64_t m, const float* x, int64_t ldx, float* y, int64_t ldy, float* scratch,
            bool accumulate = false) const noexcept;

 private:
  int64_t n_ = 0, k_ = 0;
  std::vector<uint16_t> codes_;
  std::vector<int64_t> offsets_;  // [n + 1] into codes_
  std::vector<float> lo_, hi_;
};

/// E gated FFN experts (`down act(gate x) * (up x)`, HF `[f, d]` / `[d, f]` layouts) as
/// dictionary-coded ternary matrices: an ExpertBank for SparseLayer.
class TernaryDictFfnBank {
 public:
  /// gate, up `[E, f, d]`, down `[E, d, f]`, f32.
  TernaryDictFfnBank(int64_t num_experts, int64_t hidden, int64_t intermediate, const std::vector<float>& gate,
                     const std::vector<float>& up, const std::vector<float>& down, Activation act = Activation::silu);

  [[nodiscard]] int64_t num_experts() const noexcept { return E_; }
  [[nodiscard]] int64_t d_in() const noexcept { return d_; }
  [[nodiscard]] int64_t d_out() const noexcept { return d_; }
  [[nodiscard]] size_t scratch_floats(int64_t rows) const noexcept {
    return static_cast<size_t>(2 * rows * f_ + std::max(d_, f_) + 32);
  }
  [[nodiscard]] double flops_per_row() const noexcept { return 6.0 * static_cast<double>(d_ * f_); }
  [[nodiscard]] const TernaryDictMatrix& gate(int64_t e) const noexcept { return gate_[static_cast<size_t>(e)]; }
  [[nodiscard]] const TernaryDictMatrix& up(int64_t e) const noexcept { return up_[static_cast<size_t>(e)]; }
  [[nodiscard]] const TernaryDictMatrix& down(int64_t e) const noexcept { return down_[static_cast<size_t>(e)]; }
  /// Bytes of all experts' matrices.
  [[nodiscard]] size_t bytes() const noexcept;

  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const noexcept;

 private:
  int64_t E_, d_, f_;
  Activation act_;
  std::vector<TernaryDictMatrix> gate_, up_, down_;
};

}  // namespace moekit
#pragma GCC visibility pop
