// SPDX-License-Identifier: Apache-2.0
// ARank, gamma-MoD's tool for choosing which layers become Mixture-of-Depths layers
// (arXiv 2410.13859): the mean numerical rank of a layer's attention maps. Compiled in
// src/arank.cpp (SVD by Eigen, a private dependency).
#pragma once

#include <cstdint>
#include <span>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Numerical rank of `A [rows, cols]` (row-major) by SVD in double: the number of singular
/// values > `max(sigma) * max(rows, cols) * eps` (numpy `matrix_rank`), eps the machine
/// epsilon of the input type (float 2^-23, double 2^-52). Non-finite entries are an error.
[[nodiscard]] int64_t numerical_rank(const float* A, int64_t rows, int64_t cols);
[[nodiscard]] int64_t numerical_rank(const double* A, int64_t rows, int64_t cols);

/// ARank of one layer: the mean over samples and heads of numerical_rank of the attention
/// maps `maps [samples, heads, rows, cols]` (row-major). Low-ARank layers are the candidates
/// for MoD. With `strictly_causal` (the default; square maps only) each map keeps only its
/// entries below the diagonal first, as gamma-MoD's official `compute_attention_rank`
/// (llava_llama.py: causal mask, then the diagonal set to 0): a causal softmax map always has
/// a non-zero diagonal and would otherwise be of full rank whatever the layer does.
[[nodiscard]] double arank(std::span<const float> maps, int64_t samples, int64_t heads, int64_t rows, int64_t cols,
                           bool strictly_causal = true);
[[nodiscard]] double arank(std::span<const double> maps, int64_t samples, int64_t heads, int64_t rows, int64_t cols,
                           bool strictly_causal = true);

}  // namespace moekit
#pragma GCC visibility pop
