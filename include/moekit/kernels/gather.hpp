// SPDX-License-Identifier: Apache-2.0
// Dispatch kernel: gathers the rows an expert serves into one contiguous block.
#pragma once

#include <cstdint>

#include "moekit/kernels/vector.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::kernels {

/// `block[i, :] = src[rows[i], :]` for i < n; `src [*, d]`, `block [n, d]`, both row-major.
inline void gather_rows(const float* src, int64_t d, const int32_t* rows, int64_t n,
                        float* block) noexcept {
  for (int64_t i = 0; i < n; ++i) copy_row(src + static_cast<int64_t>(rows[i]) * d, block + i * d, d);
}

/// `block[i, :] = src[rows[i], :] * weight[slots[i]]` for i < n (one f32 multiply per value):
/// the expert inputs of a layer that applies the routing weight before the expert.
inline void gather_rows_scaled(const float* src, int64_t d, const int32_t* rows, const int32_t* slots,
                               const float* weight, int64_t n, float* block) noexcept {
  for (int64_t i = 0; i < n; ++i) {
    const float* s = src + static_cast<int64_t>(rows[i]) * d;
    const float w = weight[slots[i]];
    float* b = block + i * d;
    for (int64_t j = 0; j < d; ++j) b[j] = s[j] * w;
  }
}

}  // namespace moekit::kernels
#pragma GCC visibility pop
