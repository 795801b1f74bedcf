// SPDX-License-Identifier: Apache-2.0
// Combine kernel: the weighted sum of one token's expert outputs, in slot order.
#pragma once

#include <cstdint>

#include "moekit/kernels/vector.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::kernels {

/// `y = sum_i weights[i] * rows[i]` over `n` rows of width d, accumulated in the given
/// order (so the result does not depend on which thread computed which expert block).
/// With n = 0, y = 0.
inline void weighted_sum_rows(const float* const* rows, const float* weights, int64_t n,
                              int64_t d, float* y) noexcept {
  if (n == 0) {
    zero_row(y, d);
    return;
  }
  scale_row(weights[0], rows[0], y, d);
  for (int64_t i = 1; i < n; ++i) axpy_row(weights[i], rows[i], y, d);
}

}  // namespace moekit::kernels
#pragma GCC visibility pop
