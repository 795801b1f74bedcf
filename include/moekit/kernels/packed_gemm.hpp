// SPDX-License-Identifier: Apache-2.0
// GEMM against weights packed once at load time (compiled in src/packed_gemm.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <xsimd/xsimd.hpp>

#include "moekit/activation.hpp"

namespace moekit::kernels {

class PackedMatrix;

/// One compiled implementation of the packed GEMMs (a row of the run-time kernel table).
/// `panel` is the strip width its packing uses; a PackedMatrix remembers the kernel that
/// packed it and always runs on it.
struct GemmKernel {
  const char* name;  ///< e.g. "scalar", "fma3+avx2" (the xsimd arch of the SIMD kernel)
  int64_t panel;     ///< output columns per packed strip
  void (*gemm)(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, float* C, int64_t ldc, float* a_pack,
               bool accumulate) noexcept;
  void (*gemm_gated)(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act, float* H,
                     int64_t ldh, float* a_pack) noexcept;
  void (*gemm_act)(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act, float* H,
                   int64_t ldh, float* a_pack) noexcept;
};

/// The kernels compiled into this build, best last: the portable scalar one always, then the
/// SIMD one for the instruction set the library was compiled for.
const std::vector<const GemmKernel*>& gemm_kernels() noexcept;

/// The kernel new PackedMatrix objects use: the best compiled one, or the one named by the
/// environment variable MOEKIT_KERNEL ("scalar", "simd" or a kernel's name), read once.
/// Throws moekit::error for an unknown name.
const GemmKernel& active_gemm_kernel();

/// A weight matrix `W [n, k]` (HF `[out, in]` layout) repacked for gemm_packed(): strips of
/// `panel()` output columns, each stored k-major (`[k, panel]`), zero-padded past n. A gated
/// pair (gate, up) packs into one matrix whose strips hold `panel()/2` gate columns followed
/// by the same `panel()/2` up columns, so the activation fuses into the GEMM epilogue.
/// Packing happens once; the packed copy replaces the HF-layout one.
class PackedMatrix {
 public:
  /// Output columns per strip (two SIMD registers for the SIMD kernel).
  [[nodiscard]] int64_t panel() const noexcept { return kernel_ ? kernel_->panel : 0; }
  /// The kernel this matrix was packed for (and runs on).
  [[nodiscard]] const GemmKernel& kernel() const noexcept { return *kernel_; }

  PackedMatrix() = default;
  /// Packs `W [n, k]` with row stride ldw, for `kernel` (default: active_gemm_kernel()).
  void pack(const float* W, int64_t n, int64_t k, int64_t ldw, const GemmKernel* kernel = nullptr);
  /// Packs gate and up projections `G, U [f, k]` (row stride ldw) interleaved per strip.
  void pack_gated(const float* G, const float* U, int64_t f, int64_t k, int64_t ldw, const GemmKernel* kernel = nullptr);
  /// Recovers row r (an output column) of the original matrix, of the gate half for gated
  /// packing when `up` is false, of the up half when true: `[k]` into dst (for tests, I/O).
  void unpack_row(int64_t r, bool up, float* dst) const noexcept;

  [[nodiscard]] int64_t n() const noexcept { return n_; }  ///< output columns (f for gated)
  [[nodiscard]] int64_t k() const noexcept { return k_; }
  [[nodiscard]] bool gated() const noexcept { return gated_; }
  [[nodiscard]] int64_t strips() const noexcept { return strips_; }
  [[nodiscard]] const float* strip(int64_t s) const noexcept { return data_.data() + s * k_ * panel(); }
  [[nodiscard]] size_t bytes() const noexcept { return data_.size() * sizeof(float); }

 private:
  int64_t n_ = 0, k_ = 0, strips_ = 0;
  bool gated_ = false;
  const GemmKernel* kernel_ = nullptr;
  std::vector<float, xsimd::aligned_allocator<float, 64>> data_;
};

/// Floats of scratch the GEMMs below need in `a_pack` for m rows of depth k (they repack A
/// into row tiles; the caller owns the memory so the hot path allocates nothing).
size_t packed_a_floats(int64_t m, int64_t k) noexcept;

/// `C[m, n] = A[m, k] W^T` (or `+=` with accumulate) for plain packed W; A, C row-major.
/// These run on W's kernel.
void gemm_packed(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, float* C, int64_t ldc,
                 float* a_pack, bool accumulate = false) noexcept;

/// `H[m, f] = act(A G^T) * (A U^T)` for gated packed (G, U): the SwiGLU / GeGLU first half.
void gemm_packed_gated(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act,
                       float* H, int64_t ldh, float* a_pack) noexcept;

/// `H[m, n] = act(A W^T)` for plain packed W (a non-gated FFN's first half).
void gemm_packed_act(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act,
                     float* H, int64_t ldh, float* a_pack) noexcept;

}  // namespace moekit::kernels
