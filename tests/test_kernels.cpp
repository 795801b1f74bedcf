// SPDX-License-Identifier: Apache-2.0
// The packed GEMM and row kernels against plain double-precision loops, on random shapes
// including every row and column tail.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moekit/cpu.hpp"
#include "moekit/kernels/combine.hpp"
#include "moekit/kernels/gather.hpp"
#include "moekit/kernels/packed_gemm.hpp"
#include "moekit/kernels/vector.hpp"
#include "support/float16_ref.hpp"

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
  const moekit::CpuFeatures& cpu = moekit::cpu_features();
  if (cpu.avx2 && cpu.fma && cpu.f16c)  // scalar + at least the AVX2 kernel
    ASSERT_GE(moekit::kernels::gemm_kernels().size(), 2u);
  for (const moekit::kernels::GemmKernel* kern : moekit::kernels::gemm_kernels()) {
  // f32 here; specialised kernels (one reduced format each) in test_kernels_dtype.cpp.
  if (!moekit::kernels::gemm_kernel_implements(*kern, moekit::kernels::WeightType::f32, false))
    continue;
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
    if (!moekit::kernels::gemm_kernel_implements(*kern, moekit::kernels::WeightType::f32, false))
      continue;
    // A library kernel (oneDNN) sums in its own order: within rounding, tested in
    // test_kernels_dtype.cpp.
    if (!kern->bit_exact) continue;
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
  // The best general kernel by default (MOEKIT_KERNEL unset; the table is in
  // test_kernels_dtype.cpp).
  if (std::getenv("MOEKIT_KERNEL") == nullptr)
    EXPECT_EQ(&moekit::kernels::active_gemm_kernel(),
              &moekit::kernels::active_gemm_kernel(moekit::kernels::WeightType::f32));
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


// ---------------------------------------------------------------------- row kernels

namespace rows {

using moekit::kernels::RowKernels;

// First non-finite index by a plain loop.
int64_t first_bad(const std::vector<float>& x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[static_cast<size_t>(i)])) return i;
  return -1;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// Every implementation this CPU runs against the scalar one (bit for bit where the docs say
// so) and against double-precision loops.
TEST(KernelsRows, EveryImplementationMatchesScalarAndReference) {
  const auto& impls = moekit::kernels::row_kernel_implementations();
  ASSERT_GE(impls.size(), 1u);
  const RowKernels& scalar = *impls.front();
  ASSERT_STREQ(scalar.name, "scalar");
  EXPECT_STREQ(moekit::kernels::row_kernels().name, moekit::kernels::active_gemm_kernel().name);
  // One row-kernel set per general GEMM kernel (one that implements every format; the
  // specialised and library ones have none).
  size_t general = 0;
  for (const auto* k : moekit::kernels::gemm_kernels()) {
    bool all = true;
    for (const auto t : moekit::kernels::kWeightTypes)
      all = all && moekit::kernels::gemm_kernel_implements(*k, t, false);
    general += all;
  }
  ASSERT_EQ(impls.size(), general);
  std::mt19937 g(2024);
  for (const RowKernels* impl : impls) {
    SCOPED_TRACE(impl->name);
    for (int64_t n : {0, 1, 7, 15, 16, 17, 31, 32, 33, 100, 1000, 1024, 1025, 4097}) {
      SCOPED_TRACE("n " + std::to_string(n));
      for (int64_t E : {1, 3, 4, 5, 9}) {
        const auto x = randn(g, static_cast<size_t>(n) + 1);
        const auto W = randn(g, static_cast<size_t>(E * n) + 1);
        std::vector<float> got(static_cast<size_t>(E)), want(got);
        impl->matvec(x.data(), W.data(), E, n, got.data());
        scalar.matvec(x.data(), W.data(), E, n, want.data());
        for (int64_t e = 0; e < E; ++e) {
          ASSERT_TRUE(same_bits(got[e], want[e])) << "matvec row " << e << " of " << E << ": " << got[e] << " vs " << want[e];
          double ref = 0, mag = 0;
          for (int64_t i = 0; i < n; ++i) {
            ref += static_cast<double>(x[i]) * W[e * n + i];
            mag += std::fabs(static_cast<double>(x[i]) * W[e * n + i]);
          }
          ASSERT_NEAR(got[e], ref, 1e-6 * (mag + 1)) << "matvec vs double reference";
          // a row's value does not depend on how many rows are computed with it
          float one;
          impl->matvec(x.data(), W.data() + e * n, 1, n, &one);
          ASSERT_TRUE(same_bits(one, got[e]));
        }
      }
      // scale and axpy: elementwise, the same bits; y may be x for scale
      const auto x = randn(g, static_cast<size_t>(n) + 1), y0 = randn(g, static_cast<size_t>(n) + 1);
      std::vector<float> ys = y0, yk = y0, sx = x, sk(x.size(), 5.0f), ss(x.size(), 5.0f);
      impl->axpy(-0.37f, x.data(), yk.data(), n);
      scalar.axpy(-0.37f, x.data(), ys.data(), n);
      impl->scale(1.7f, x.data(), sk.data(), n);
      scalar.scale(1.7f, x.data(), ss.data(), n);
      impl->scale(1.7f, sx.data(), sx.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_TRUE(same_bits(yk[i], ys[i])) << "axpy at " << i;
        ASSERT_EQ(yk[i], std::fma(-0.37f, x[i], y0[i]));
        ASSERT_TRUE(same_bits(sk[i], ss[i])) << "scale at " << i;
        ASSERT_EQ(sk[i], 1.7f * x[i]);
        ASSERT_EQ(sx[i], sk[i]) << "in-place scale";
      }
      ASSERT_EQ(yk[n], y0[n]) << "axpy wrote past n";
      ASSERT_EQ(sk[n], 5.0f) << "scale wrote past n";
      // the NaN scan: none, one, several, at block edges and in the tail
      std::vector<float> v = randn(g, static_cast<size_t>(n) + 1);
      ASSERT_EQ(impl->first_non_finite(v.data(), n), -1);
      for (int trial = 0; trial < 6 && n > 0; ++trial) {
        std::vector<float> w = v;
        const float bad[3] = {std::nanf(""), std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
        const int64_t at = trial == 0 ? n - 1 : trial == 1 ? 0 : std::uniform_int_distribution<int64_t>(0, n - 1)(g);
        w[at] = bad[trial % 3];
        if (trial >= 3) w[std::uniform_int_distribution<int64_t>(0, n - 1)(g)] = bad[(trial + 1) % 3];
        ASSERT_EQ(impl->first_non_finite(w.data(), n), first_bad(w, n)) << "trial " << trial;
      }
    }
  }
}

// The 16-bit conversions of every implementation: widening of all 65,536 patterns and
// rounding of edge and random values against f16ref (an independent search over the
// patterns); bits equal to the scalar kernel's (NaNs included: quietened as F16C does), at
// lengths that leave SIMD tails.
TEST(KernelsRows, SixteenBitConversionsMatchTheReference) {
  const auto& impls = moekit::kernels::row_kernel_implementations();
  const RowKernels& scalar = *impls.front();
  std::vector<uint16_t> all(65536);
  for (uint32_t i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  // Values to round: ties and neighbours of every f16 and of many bf16 values, subnormals,
  // the overflow boundaries, zeros, infinities, NaNs (signalling and quiet), random ones.
  std::vector<float> v;
  auto bits = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  };
  for (uint32_t h = 0; h < 0x7C00u; h += 7) {
    const double a = f16ref::ref_f16(static_cast<uint16_t>(h)), b = f16ref::ref_f16(static_cast<uint16_t>(h + 1));
    for (double x : {a, (a + b) / 2, std::nextafter((a + b) / 2, 0.0), std::nextafter((a + b) / 2, 1e9)}) {
      v.push_back(static_cast<float>(x));
      v.push_back(-static_cast<float>(x));
    }
  }
  for (uint32_t u : {0x00000001u, 0x00400000u, 0x33000000u, 0x33000001u, 0x387FF000u, 0x387FFFFFu, 0x38800000u,
                     0x477FE000u, 0x477FEFFFu, 0x477FF000u, 0x7F7FFFFFu, 0x7F7F8000u, 0x7F7F7FFFu, 0x7F800000u,
                     0x7F800001u, 0x7FA00000u, 0x7FC00000u, 0x7FFFFFFFu, 0x3F808000u, 0x3F818000u, 0x00000000u})
    for (uint32_t sign : {0u, 0x80000000u}) v.push_back(bits(u | sign));
  std::mt19937 g(5);
  for (int i = 0; i < 20000; ++i) v.push_back(bits(static_cast<uint32_t>(g())));
  std::vector<float> ws(all.size()), wk(all.size());
  std::vector<uint16_t> ns(v.size()), nk(v.size());
  for (const RowKernels* k : impls) {
    SCOPED_TRACE(k->name);
    for (int64_t n : {int64_t{65536}, int64_t{65535 - 16}}) {  // whole, and a tail
      for (bool bf : {true, false}) {
        (bf ? scalar.bf16_to_f32 : scalar.f16_to_f32)(all.data(), ws.data(), n);
        (bf ? k->bf16_to_f32 : k->f16_to_f32)(all.data(), wk.data(), n);
        for (int64_t i = 0; i < n; ++i) {
          const double want = bf ? f16ref::ref_bf16(all[i]) : f16ref::ref_f16(all[i]);
          ASSERT_TRUE(std::isnan(want) ? std::isnan(wk[i]) : (wk[i] == want && std::signbit(wk[i]) == std::signbit(want)))
              << (bf ? "bf16" : "f16") << " 0x" << std::hex << all[i] << " -> " << wk[i];
          ASSERT_TRUE(same_bits(wk[i], ws[i])) << (bf ? "bf16" : "f16") << " 0x" << std::hex << all[i] << " vs scalar";
        }
      }
    }
    for (int64_t n : {static_cast<int64_t>(v.size()), static_cast<int64_t>(v.size()) - 13}) {
      for (bool bf : {true, false}) {
        (bf ? scalar.f32_to_bf16 : scalar.f32_to_f16)(v.data(), ns.data(), n);
        (bf ? k->f32_to_bf16 : k->f32_to_f16)(v.data(), nk.data(), n);
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(nk[i], ns[i]) << (bf ? "bf16" : "f16") << " of " << v[i] << " vs scalar";
          if (std::isnan(v[i])) {
            const double back = bf ? f16ref::ref_bf16(nk[i]) : f16ref::ref_f16(nk[i]);
            ASSERT_TRUE(std::isnan(back)) << "NaN " << v[i] << " -> 0x" << std::hex << nk[i];
          } else {
            ASSERT_EQ(nk[i], bf ? f16ref::ref_to_bf16(v[i]) : f16ref::ref_to_f16(v[i]))
                << (bf ? "bf16" : "f16") << " of " << v[i];
          }
        }
      }
    }
  }
}

TEST(KernelsRows, LogSumExpAndGatesMatchReference) {
  const auto& impls = moekit::kernels::row_kernel_implementations();
  const RowKernels& scalar = *impls.front();
  std::mt19937 g(31);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (const RowKernels* impl : impls) {
    SCOPED_TRACE(impl->name);
    for (int64_t E : {1, 5, 16, 17, 64, 100}) {
      const int64_t Ep = (E + 15) / 16 * 16;
      for (int64_t rows : {1, 3, 40}) {
        // K rows padded with -inf past E (as Sinkhorn lays them out), scaled logits
        std::vector<float> K(static_cast<size_t>(rows * Ep), ninf), u = randn(g, static_cast<size_t>(rows));
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t e = 0; e < E; ++e) K[r * Ep + e] = 8.0f * randn(g, 1)[0];
        const auto b = randn(g, static_cast<size_t>(Ep));
        for (int64_t r = 0; r < rows; ++r) {
          double m = -INFINITY;
          for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(K[r * Ep + e]) + b[e]);
          double s = 0;
          for (int64_t e = 0; e < E; ++e) s += std::exp(static_cast<double>(K[r * Ep + e]) + b[e] - m);
          const float got = impl->lse_sum(K.data() + r * Ep, b.data(), Ep);
          ASSERT_NEAR(got, m + std::log(s), 2e-6 * (std::fabs(m) + 1)) << "lse_sum E " << E;
          ASSERT_NEAR(got, scalar.lse_sum(K.data() + r * Ep, b.data(), Ep), 2e-6 * (std::fabs(m) + 1));
        }
        for (int64_t blk = 0; blk < Ep / 16; ++blk) {
          float out[16];
          impl->lse_columns(K.data() + blk * 16, Ep, u.data(), rows, out);
          for (int64_t c = 0; c < 16 && blk * 16 + c < E; ++c) {
            double m = -INFINITY, s = 0;
            for (int64_t r = 0; r < rows; ++r) m = std::max(m, static_cast<double>(K[r * Ep + blk * 16 + c]) + u[r]);
            for (int64_t r = 0; r < rows; ++r) s += std::exp(static_cast<double>(K[r * Ep + blk * 16 + c]) + u[r] - m);
            ASSERT_NEAR(out[c], m + std::log(s), 2e-6 * (std::fabs(m) + 1)) << "lse_columns column " << blk * 16 + c;
          }
        }
      }
    }
    for (int64_t n : {1, 7, 8, 16, 23, 64}) {
      for (bool rnn : {false, true}) {
        const int64_t w = rnn ? n : 3 * n;
        const auto a = randn(g, static_cast<size_t>(w)), b = randn(g, static_cast<size_t>(w));
        const auto hp = randn(g, static_cast<size_t>(n));
        for (bool with_prev : {false, true}) {
          std::vector<float> out(static_cast<size_t>(n) + 1, 9.0f), alias = hp;
          impl->gru_gates(rnn, a.data(), b.data(), with_prev ? hp.data() : nullptr, out.data(), n);
          impl->gru_gates(rnn, a.data(), b.data(), with_prev ? alias.data() : nullptr, with_prev ? alias.data() : out.data(), n);
          ASSERT_EQ(out[n], 9.0f) << "gru_gates wrote past n";
          for (int64_t i = 0; i < n; ++i) {
            double ref;
            if (rnn) {
              ref = std::tanh(static_cast<double>(a[i]) + b[i]);
            } else {
              const double r = 1 / (1 + std::exp(-(static_cast<double>(a[i]) + b[i])));
              const double z = 1 / (1 + std::exp(-(static_cast<double>(a[n + i]) + b[n + i])));
              const double c = std::tanh(a[2 * n + i] + r * b[2 * n + i]);
              ref = (1 - z) * c + z * (with_prev ? hp[i] : 0.0);
            }
            ASSERT_NEAR(out[i], ref, 1e-6) << (rnn ? "rnn" : "gru") << " at " << i;
            if (with_prev) ASSERT_EQ(alias[i], out[i]) << "out aliasing h_prev";
          }
        }
      }
    }
  }
}

// exp_sum (the softmax numerators of the attention kernels): every value against exp in
// double of the f32 product and difference, the sum within its rounding, -inf entries 0, in
// place or not, any length (the 16 lanes, then the tail).
TEST(KernelsRows, ExpSumMatchesReference) {
  const auto& impls = moekit::kernels::row_kernel_implementations();
  std::mt19937 g(7);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (const RowKernels* impl : impls) {
    SCOPED_TRACE(impl->name);
    for (int64_t n : {0, 1, 5, 15, 16, 17, 33, 64, 100, 517}) {
      auto x = randn(g, static_cast<size_t>(n) + 1);
      for (float& v : x) v *= 6.0f;
      if (n > 3) x[2] = ninf;
      const float scale = 0.37f;
      float mx = ninf;
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i] * scale);
      const float shift = n > 0 ? mx : 0.0f;
      std::vector<float> y(static_cast<size_t>(n) + 1, 9.0f), inplace = x;
      const float sum = impl->exp_sum(x.data(), scale, shift, y.data(), n);
      const float sum2 = impl->exp_sum(inplace.data(), scale, shift, inplace.data(), n);
      ASSERT_EQ(y[n], 9.0f) << "exp_sum wrote past n";
      double want = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double e = std::exp(static_cast<double>(x[i] * scale - shift));
        want += e;
        ASSERT_NEAR(y[i], e, 4e-7 * e + 1e-30) << "n " << n << " at " << i;
        ASSERT_EQ(y[i], inplace[i]);
      }
      ASSERT_NEAR(sum, want, 2e-6 * want + 1e-30) << "n " << n;
      ASSERT_EQ(sum, sum2);
    }
  }
}

}  // namespace rows

// ---------------------------------------------------------------------- CPU features

// cpu_features() against the kernel's own view (/proc/cpuinfo flags, which Linux clears when
// it does not enable the state), when it is readable.
TEST(CpuFeatures, MatchProcCpuinfoAndImplications) {
  const moekit::CpuFeatures& f = moekit::cpu_features();
  EXPECT_TRUE(!f.avx512bw || f.avx512f);
  EXPECT_TRUE(!f.avx512f || (f.avx2 && f.os_avx512));
  EXPECT_TRUE(!f.amx_bf16 || f.amx_tile);
  EXPECT_TRUE(!f.amx_tile || f.os_amx);
  EXPECT_FALSE(f.vendor.empty());
  std::FILE* fp = std::fopen("/proc/cpuinfo", "r");
  if (fp == nullptr) GTEST_SKIP() << "no /proc/cpuinfo to compare with";
  std::string flags;
  char line[8192];
  while (std::fgets(line, sizeof line, fp) != nullptr)
    if (std::strncmp(line, "flags", 5) == 0) {
      flags = std::string(" ") + (std::strchr(line, ':') + 1);
      break;
    }
  std::fclose(fp);
  ASSERT_FALSE(flags.empty());
  for (char& c : flags)
    if (c == '\n' || c == '\t') c = ' ';
  flags += ' ';
  auto has = [&](const char* name) { return flags.find(std::string(" ") + name + " ") != std::string::npos; };
  const std::pair<const char*, bool> cases[] = {
      {"avx", f.avx},           {"avx2", f.avx2},         {"fma", f.fma},
      {"f16c", f.f16c},         {"avx512f", f.avx512f},   {"avx512bw", f.avx512bw},
      {"avx512dq", f.avx512dq}, {"avx512vl", f.avx512vl}, {"avx512_bf16", f.avx512_bf16},
      {"avx512_fp16", f.avx512_fp16}, {"avx512_vnni", f.avx512_vnni}, {"avx_vnni", f.avx_vnni},
      {"amx_tile", f.amx_tile}, {"amx_bf16", f.amx_bf16}, {"amx_int8", f.amx_int8}};
  for (const auto& [name, got] : cases) EXPECT_EQ(got, has(name)) << name;
  const moekit::AmxPermission p = moekit::request_amx_permission();
  EXPECT_EQ(p, moekit::request_amx_permission()) << "asked once";
  if (!f.amx_tile) EXPECT_EQ(p, moekit::AmxPermission::unsupported);
  else EXPECT_NE(p, moekit::AmxPermission::unsupported);
}

}  // namespace
