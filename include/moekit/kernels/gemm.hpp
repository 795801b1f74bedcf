// SPDX-License-Identifier: Apache-2.0
// Dense GEMM entry point used by the expert functors (compiled in src/gemm.cpp).
#pragma once

#include <cstdint>

namespace moekit::kernels {

/// `C[m, n] = A[m, k] * B[n, k]^T` (+ C when accumulate), all row-major with leading
/// dimensions lda, ldb, ldc. B is a weight in HF `[out, in]` layout. Single-threaded: the
/// layer parallelises across (expert, row block) tasks. The summation order depends only on
/// (m, n, k), never on the thread count.
void gemm_nt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate = false);

/// Name of the GEMM implementation compiled in (for `moekit info`).
const char* gemm_backend() noexcept;

}  // namespace moekit::kernels
