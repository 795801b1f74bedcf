// SPDX-License-Identifier: Apache-2.0
// gemm_nt on Eigen 3.4's blocked single-threaded GEMM (the packed per-ISA kernels of the
// performance issue replace this).
#include "moekit/kernels/gemm.hpp"

#include <Eigen/Core>

namespace moekit::kernels {

namespace {
using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMap = Eigen::Map<const RowMat, 0, Eigen::OuterStride<>>;
using Map = Eigen::Map<RowMat, 0, Eigen::OuterStride<>>;
}  // namespace

void gemm_nt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  ConstMap a(A, m, k, Eigen::OuterStride<>(lda));
  ConstMap b(B, n, k, Eigen::OuterStride<>(ldb));
  Map c(C, m, n, Eigen::OuterStride<>(ldc));
  if (k == 0) {
    if (!accumulate) c.setZero();
    return;
  }
  if (accumulate) {
    c.noalias() += a * b.transpose();
  } else {
    c.noalias() = a * b.transpose();
  }
}

const char* gemm_backend() noexcept { return "eigen"; }

}  // namespace moekit::kernels
