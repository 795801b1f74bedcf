// SPDX-License-Identifier: Apache-2.0
// Private to the row-kernel sources: what the scalar and the per-ISA implementations share so
// that they give the same bits (the lane reduction order, the NaN-scan block). Everything here
// has internal linkage (see gemm_internal.hpp for why).
#pragma once

#include <cstdint>

#include "convert_internal.hpp"
#include "moekit/kernels/vector.hpp"

namespace moekit::kernels::detail {

// The row kernels, defined one per translation unit (the SIMD ones only when compiled in).
extern const RowKernels kRowsScalar;
#if defined(MOEKIT_HAVE_KERNEL_AVX2)
extern const RowKernels kRowsAvx2;
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512)
extern const RowKernels kRowsAvx512;
#endif

namespace {

/// Rows of W a matvec walks together (independent accumulator chains per lane).
inline constexpr int64_t kMatvecRows = 4;
/// The NaN scan sums `v - v` over blocks of this many floats before it searches one.
inline constexpr int64_t kScanBlock = 1024;

/// The kRowLanes lane sums `t` added pairwise: l + 8, then l + 4, l + 2, l + 1.
inline float reduce_lanes(float* t) noexcept {
  for (int64_t w = kRowLanes / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) t[l] = t[l] + t[l + w];
  return t[0];
}

}  // namespace
}  // namespace moekit::kernels::detail
