// SPDX-License-Identifier: Apache-2.0
// numerical_rank / arank on Eigen's BDCSVD (double precision).
#include "moekit/tools/arank.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/SVD>

#include "moekit/error.hpp"

namespace moekit {
namespace {

template <class T>
int64_t rank_of(const T* A, int64_t rows, int64_t cols) {
  MOEKIT_CHECK(rows >= 0 && cols >= 0, "numerical_rank: rows and cols expected >= 0, got ", rows, " x ", cols);
  if (rows == 0 || cols == 0) return 0;
  MOEKIT_CHECK(A != nullptr, "numerical_rank: matrix pointer is null for ", rows, " x ", cols);
  Eigen::MatrixXd M(rows, cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const T v = A[i * cols + j];
      MOEKIT_CHECK(std::isfinite(v), "numerical_rank: A[", i, ", ", j, "] expected finite, got ", v);
      M(i, j) = static_cast<double>(v);
    }
  const Eigen::VectorXd s = Eigen::BDCSVD<Eigen::MatrixXd>(M).singularValues();
  const double tol = s.maxCoeff() * static_cast<double>(std::max(rows, cols)) *
                     static_cast<double>(std::numeric_limits<T>::epsilon());
  int64_t r = 0;
  for (Eigen::Index i = 0; i < s.size(); ++i) r += s[i] > tol;
  return r;
}

template <class T>
double arank_of(std::span<const T> maps, int64_t samples, int64_t heads, int64_t rows, int64_t cols, bool causal) {
  MOEKIT_CHECK(samples >= 1, "arank: samples expected >= 1, got ", samples);
  MOEKIT_CHECK(heads >= 1, "arank: heads expected >= 1, got ", heads);
  MOEKIT_CHECK(rows >= 1 && cols >= 1, "arank: map shape expected >= 1 x 1, got ", rows, " x ", cols);
  MOEKIT_CHECK(!causal || rows == cols, "arank: strictly_causal expected square maps, got ", rows, " x ", cols,
               " (pass strictly_causal = false for the maps as they are)");
  const int64_t n = samples * heads, per = rows * cols;
  MOEKIT_CHECK(static_cast<int64_t>(maps.size()) == n * per, "arank: maps expected [", samples, ", ", heads, ", ",
               rows, ", ", cols, "] = ", n * per, " values, got ", maps.size());
  std::vector<T> masked(causal ? static_cast<size_t>(per) : 0);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T* m = maps.data() + i * per;
    if (causal) {  // entries j < i_row kept, the diagonal and above set to 0
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) masked[static_cast<size_t>(r * cols + c)] = c < r ? m[r * cols + c] : T(0);
      m = masked.data();
    }
    sum += static_cast<double>(rank_of(m, rows, cols));
  }
  return sum / static_cast<double>(n);
}

}  // namespace

int64_t numerical_rank(const float* A, int64_t rows, int64_t cols) { return rank_of(A, rows, cols); }
int64_t numerical_rank(const double* A, int64_t rows, int64_t cols) { return rank_of(A, rows, cols); }
double arank(std::span<const float> maps, int64_t s, int64_t h, int64_t r, int64_t c, bool causal) {
  return arank_of(maps, s, h, r, c, causal);
}
double arank(std::span<const double> maps, int64_t s, int64_t h, int64_t r, int64_t c, bool causal) {
  return arank_of(maps, s, h, r, c, causal);
}

}  // namespace moekit
