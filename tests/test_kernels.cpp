// SPDX-License-Identifier: Apache-2.0
// The packed GEMM and row kernels against plain double-precision loops, on random shapes
// including every row and column tail.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "moekit/kernels/combine.hpp"
#include "moekit/kernels/gather.hpp"
#include "moekit/kernels/packed_gemm.hpp"
#include "moekit/kernels/vector.hpp"

namespace {

using moekit::Activation;
using moekit::kernels::PackedMatrix;
using moekit::kernels::PackOptions;

double act_ref(Activation a, double x) {
  switch (a) {
    case Activation::silu: return x / (1.0 + std::exp(-x));
    case Activation::gelu: return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::gelu_tanh: return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    case Activation::relu: return x > 0 ? x : 0.0;
  }
  return x;
}

std::vector<float> randn(std::mt19937& g, size_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

// Relative-with-floor comparison against a double reference of the same shape.
void expect_close(const std::vector<float>& got, const std::vector<double>& ref, double rel, const char* what) {
  double mx = 0;
  for (double v : ref) mx = std::max(mx, std::fabs(v));
  ASSERT_TRUE(ref.empty() || mx > 0) << what << ": vacuous reference";
  for (size_t i = 0; i < ref.size(); ++i)
    ASSERT_NEAR(got[i], ref[i], rel * std::fabs(ref[i]) + rel * mx) << what << " at " << i;
}

TEST(KernelsPackedGemm, EveryKernelMatchesReference) {
  ASSERT_GE(moekit::kernels::gemm_kernels().size(), 2u);  // scalar + SIMD
  for (const moekit::kernels::GemmKernel* kern : moekit::kernels::gemm_kernels()) {
  SCOPED_TRACE(kern->name);
  std::mt19937 g(1234);
  std::uniform_int_distribution<int> pick_m(0, 200), pick_n(1, 70), pick_k(1, 90);
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t m = pick_m(g), n = pick_n(g), k = pick_k(g), lda = k + trial % 3;
    const auto A = randn(g, static_cast<size_t>(std::max<int64_t>(m, 1) * lda));
    const auto W = randn(g, static_cast<size_t>(n * k));
    const auto U = randn(g, static_cast<size_t>(n * k));
    PackedMatrix pw, pg, pa;
    pw.pack(W.data(), n, k, k, PackOptions{.kernel = kern});
    pg.pack_gated(W.data(), U.data(), n, k, k, PackOptions{.kernel = kern});
    pa.pack(U.data(), n, k, k, PackOptions{.kernel = kern});
    ASSERT_EQ(&pw.kernel(), kern);
    // pack/unpack round trip
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t r = 0; r < n; ++r) {
      pw.unpack_row(r, false, row.data());
      for (int64_t p = 0; p < k; ++p) ASSERT_EQ(row[p], W[r * k + p]);
      pg.unpack_row(r, true, row.data());
      for (int64_t p = 0; p < k; ++p) ASSERT_EQ(row[p], U[r * k + p]);
    }
    const Activation act = static_cast<Activation>(trial % 4);
    std::vector<double> ref_c(static_cast<size_t>(m * n)), ref_h(static_cast<size_t>(m * n)), ref_a(static_cast<size_t>(m * n));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double c = 0, u = 0;
        for (int64_t p = 0; p < k; ++p) {
          c += static_cast<double>(A[i * lda + p]) * W[j * k + p];
          u += static_cast<double>(A[i * lda + p]) * U[j * k + p];
        }
        ref_c[i * n + j] = c;
        ref_h[i * n + j] = act_ref(act, c) * u;
        ref_a[i * n + j] = act_ref(act, u);
      }
    const int64_t ldc = n + 5;
    std::vector<float> C(static_cast<size_t>(std::max<int64_t>(m, 1) * ldc), 7.0f), H(C), Ha(C);
    std::vector<float> ap(moekit::kernels::packed_a_floats(m, k) + 1, -1.0f);
    moekit::kernels::gemm_packed(m, A.data(), lda, pw, C.data(), ldc, ap.data());
    moekit::kernels::gemm_packed_gated(m, A.data(), lda, pg, act, H.data(), ldc, ap.data());
    moekit::kernels::gemm_packed_act(m, A.data(), lda, pa, act, Ha.data(), ldc, ap.data());
    EXPECT_EQ(ap.back(), -1.0f) << "a_pack overrun";
    std::vector<float> c(static_cast<size_t>(m * n)), h(c), ha(c);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        c[i * n + j] = C[i * ldc + j];
        h[i * n + j] = H[i * ldc + j];
        ha[i * n + j] = Ha[i * ldc + j];
      }
      for (int64_t j = n; j < ldc; ++j) ASSERT_EQ(C[i * ldc + j], 7.0f) << "wrote past n";
    }
    expect_close(c, ref_c, 1e-5, "gemm_packed");
    expect_close(h, ref_h, 1e-5, "gemm_packed_gated");
    expect_close(ha, ref_a, 1e-5, "gemm_packed_act");
    // accumulate adds to what is there
    moekit::kernels::gemm_packed(m, A.data(), lda, pw, C.data(), ldc, ap.data(), /*accumulate=*/true);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) ASSERT_NEAR(C[i * ldc + j], 2 * ref_c[i * n + j], 1e-4 * (1 + std::fabs(ref_c[i * n + j])));
  }
  }
}

// The SIMD kernel and the scalar one sum every output with the same fma chain over k, so
// plain GEMMs agree bit for bit; activations agree within float rounding.
TEST(KernelsPackedGemm, SimdEqualsScalar) {
  const auto& ks = moekit::kernels::gemm_kernels();
  const moekit::kernels::GemmKernel* scalar = ks.front();
  ASSERT_STREQ(scalar->name, "scalar");
  std::mt19937 g(77);
  for (const moekit::kernels::GemmKernel* kern : ks) {
    for (int64_t m : {1, 5, 6, 7, 97, 200})
      for (int64_t n : {1, 15, 16, 33})
        for (int64_t k : {1, 255, 256, 257, 700}) {
          const auto A = randn(g, static_cast<size_t>(m * k)), W = randn(g, static_cast<size_t>(n * k));
          PackedMatrix ps, pk;
          ps.pack(W.data(), n, k, k, PackOptions{.kernel = scalar});
          pk.pack(W.data(), n, k, k, PackOptions{.kernel = kern});
          std::vector<float> cs(static_cast<size_t>(m * n)), ck(cs.size()), hs(cs.size()), hk(cs.size());
          std::vector<float> ap(moekit::kernels::packed_a_floats(m, k));
          moekit::kernels::gemm_packed(m, A.data(), k, ps, cs.data(), n, ap.data());
          moekit::kernels::gemm_packed(m, A.data(), k, pk, ck.data(), n, ap.data());
          ASSERT_EQ(cs, ck) << kern->name << " m " << m << " n " << n << " k " << k;
          moekit::kernels::gemm_packed_act(m, A.data(), k, ps, Activation::silu, hs.data(), n, ap.data());
          moekit::kernels::gemm_packed_act(m, A.data(), k, pk, Activation::silu, hk.data(), n, ap.data());
          for (size_t i = 0; i < hs.size(); ++i) ASSERT_NEAR(hs[i], hk[i], 1e-5f * (1 + std::fabs(hs[i])));
        }
  }
  EXPECT_EQ(&moekit::kernels::active_gemm_kernel(), ks.back());  // best by default (MOEKIT_KERNEL unset)
}

// A row's result does not depend on how many rows are computed with it (row tiling).
TEST(KernelsPackedGemm, RowResultIndependentOfBlockSize) {
  std::mt19937 g(99);
  const int64_t n = 37, k = 53;
  const auto A = randn(g, 13 * k), W = randn(g, n * k);
  PackedMatrix pw;
  pw.pack(W.data(), n, k, k);
  std::vector<float> all(13 * n), one(n), ap(moekit::kernels::packed_a_floats(13, k));
  moekit::kernels::gemm_packed(13, A.data(), k, pw, all.data(), n, ap.data());
  for (int64_t i = 0; i < 13; ++i) {
    moekit::kernels::gemm_packed(1, A.data() + i * k, k, pw, one.data(), n, ap.data());
    for (int64_t j = 0; j < n; ++j) ASSERT_EQ(one[j], all[i * n + j]);
  }
}

TEST(KernelsRows, DotGatherCombine) {
  std::mt19937 g(5);
  for (int64_t n : {0, 1, 7, 8, 9, 31, 64, 100}) {
    const auto x = randn(g, static_cast<size_t>(n) + 1), w = randn(g, static_cast<size_t>(n) + 1);
    double ref = 0;
    for (int64_t i = 0; i < n; ++i) ref += static_cast<double>(x[i]) * w[i];
    EXPECT_NEAR(moekit::kernels::dot(x.data(), w.data(), n), ref, 1e-5 * (1 + std::fabs(ref)));
    // combine: y = 0.5 x - 2 w
    const float* rows[2] = {x.data(), w.data()};
    const float ws[2] = {0.5f, -2.0f};
    std::vector<float> y(static_cast<size_t>(n) + 1, 3.0f);
    moekit::kernels::weighted_sum_rows(rows, ws, 2, n, y.data());
    for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(y[i], 0.5 * x[i] - 2.0 * w[i], 1e-5);
    EXPECT_EQ(y[n], 3.0f);
    moekit::kernels::weighted_sum_rows(rows, ws, 0, n, y.data());
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(y[i], 0.0f);
  }
  const auto src = randn(g, 5 * 11);
  const int32_t idx[3] = {4, 0, 4};
  std::vector<float> block(3 * 11);
  moekit::kernels::gather_rows(src.data(), 11, idx, 3, block.data());
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 11; ++c) EXPECT_EQ(block[r * 11 + c], src[idx[r] * 11 + c]);
}

}  // namespace
