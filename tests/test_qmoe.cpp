// SPDX-License-Identifier: Apache-2.0
// Dictionary-coded ternary experts (experts/qmoe.hpp; QMoE arXiv 2310.16795, IST-DASLab/qmoe
// 9110baa9): the dictionary's defining properties (2^16 most probable pair sequences under
// QMoE's model, prefix-closed, at most 14 pairs), exact round trips of ternary rows through
// the coder on every row kernel, the quantiser against a plain reference, bits per weight at
// QMoE's sparsity, the GEMM and a layer of such experts against double-precision formulas,
// errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/experts/qmoe.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/topk.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::TernaryDictMatrix;
using test_support::expect_error;
using test_support::join;
using test_support::Rng;

// log P of a pair sequence under QMoE's model (P(0) = 0.885, P(lo) = P(hi) = 0.0575).
double logp(const std::vector<uint8_t>& seq) {
  double s = 0;
  for (uint8_t sym : seq)
    for (int t : {sym % 3, sym / 3}) s += std::log(t == 0 ? 0.885 : 0.0575);
  return s;
}

TEST(QmoeDictionary, IsThe65536MostProbablePrefixClosedSequences) {
  std::set<std::string> all;
  double min_in = 0;
  const uint64_t* table = moekit::qmoe::decode_table();
  for (int64_t id = 0; id < moekit::qmoe::kDictionarySize; ++id) {
    const auto seq = moekit::qmoe::dictionary_entry(id);
    ASSERT_GE(seq.size(), 1u);
    ASSERT_LE(seq.size(), 14u);
    const std::string key(seq.begin(), seq.end());
    ASSERT_TRUE(all.insert(key).second) << "duplicate entry " << id;
    min_in = std::min(min_in, logp(seq));
    // The decode table: pairs and the lo / hi masks of the entry's ternaries.
    const uint64_t e = table[id];
    ASSERT_EQ(e >> 56, seq.size());
    for (size_t p = 0; p < 2 * seq.size(); ++p) {
      const int t = p % 2 == 0 ? seq[p / 2] % 3 : seq[p / 2] / 3;
      ASSERT_EQ((e >> p) & 1, t == 1 ? 1u : 0u) << id;
      ASSERT_EQ((e >> (28 + p)) & 1, t == 2 ? 1u : 0u) << id;
    }
    ASSERT_EQ(e & ~((uint64_t{1} << 60) - 1), 0u);
  }
  EXPECT_EQ(all.size(), 65536u);
  double max_out = -INFINITY;
  for (const std::string& key : all) {
    if (key.size() > 1) ASSERT_TRUE(all.count(key.substr(0, key.size() - 1))) << "not prefix-closed";
    if (key.size() == 14) continue;
    for (int s = 0; s < 9; ++s) {
      std::string ext = key + static_cast<char>(s);
      if (!all.count(ext)) max_out = std::max(max_out, logp(std::vector<uint8_t>(ext.begin(), ext.end())));
    }
  }
  for (int s = 0; s < 9; ++s) EXPECT_TRUE(all.count(std::string(1, static_cast<char>(s))));
  // Best first: no sequence left out (whose prefix is in) is more probable than one taken.
  EXPECT_LE(max_out, min_in + 1e-12);
  std::printf("[ qmoe dict ] least probable entry log p %.4f, most probable left out %.4f\n", min_in, max_out);
}

// A random ternary row on {lo, 0, hi} with P(0) = p0.
std::vector<float> ternary_rows(Rng& rng, int64_t n, int64_t k, double p0, std::vector<float>& lo, std::vector<float>& hi) {
  std::vector<float> W(static_cast<size_t>(n * k));
  lo.resize(static_cast<size_t>(n));
  hi.resize(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) {
    lo[size_t(r)] = -static_cast<float>(rng.uniform(0.1, 2.0));
    hi[size_t(r)] = static_cast<float>(rng.uniform(0.1, 2.0));
    for (int64_t p = 0; p < k; ++p)
      W[size_t(r * k + p)] = rng.coin(p0) ? 0.0f : rng.coin(0.5) ? lo[size_t(r)] : hi[size_t(r)];
  }
  return W;
}

TEST(QmoeMatrix, TernaryRowsRoundTripExactlyOnEveryRowKernel) {
  Rng rng(2310);
  for (double p0 : {0.885, 0.5, 0.0, 1.0}) {
    for (int64_t k : {1, 2, 3, 27, 28, 29, 57, 200, 1001}) {
      const int64_t n = rng.integer(1, 9);
      std::vector<float> lo, hi;
      const auto W = ternary_rows(rng, n, k, p0, lo, hi);
      const TernaryDictMatrix m(W.data(), n, k, k);
      std::vector<float> row(static_cast<size_t>(m.decode_floats()) + 16);  // + a guard past the pad
      for (int64_t r = 0; r < n; ++r) {
        for (const moekit::kernels::RowKernels* impl : moekit::kernels::row_kernel_implementations()) {
          std::fill(row.begin(), row.end(), 7.0f);
          const uint16_t* codes = m.codes().data();
          int64_t first = 0;  // the row's first codeword: decode the rows before it
          {
            std::vector<float> tmp(static_cast<size_t>(m.decode_floats()));
            for (int64_t q = 0; q < r; ++q) first += moekit::kernels::tdict_decode(codes + first, moekit::qmoe::decode_table(), m.lo(q), m.hi(q), tmp.data(), k);
          }
          impl->tdict_decode(codes + first, moekit::qmoe::decode_table(), m.lo(r), m.hi(r), row.data(), k);
          for (int64_t p = 0; p < k; ++p)
            ASSERT_EQ(row[size_t(p)], W[size_t(r * k + p)]) << impl->name << " p0 " << p0 << " k " << k << " row " << r << " at " << p;
          for (size_t p = static_cast<size_t>(m.decode_floats()); p < row.size(); ++p)
            ASSERT_EQ(row[p], 7.0f) << impl->name << ": wrote past the pad at " << p;
        }
        m.decode_row(r, row.data());
        for (int64_t p = 0; p < k; ++p) ASSERT_EQ(row[size_t(p)], W[size_t(r * k + p)]);
      }
    }
  }
}

// At QMoE's sparsity (independent ternaries, P(0) = 0.885) the codes take well under a bit
// per weight (entropy 0.63 bits); dense ternaries take more.
TEST(QmoeMatrix, BitsPerWeight) {
  Rng rng(9);
  std::vector<float> lo, hi;
  const int64_t n = 64, k = 4096;
  const auto sparse = ternary_rows(rng, n, k, 0.885, lo, hi);
  const auto dense = ternary_rows(rng, n, k, 1.0 / 3.0, lo, hi);
  const double b_sparse = TernaryDictMatrix(sparse.data(), n, k, k).bits_per_weight();
  const double b_dense = TernaryDictMatrix(dense.data(), n, k, k).bits_per_weight();
  std::printf("[ qmoe bits ] P(0) = 0.885: %.3f bits per weight; P(0) = 1/3: %.3f\n", b_sparse, b_dense);
  EXPECT_LT(b_sparse, 0.85);
  EXPECT_GT(b_sparse, 0.63);  // not below the entropy: the count is real
  EXPECT_GT(b_dense, 1.0);
}

// QMoE's grid with round to nearest, written out plainly.
TEST(QmoeMatrix, QuantiserMatchesReference) {
  Rng rng(4);
  for (int rep = 0; rep < 30; ++rep) {
    const int64_t n = rng.integer(1, 6), k = rng.integer(1, 300), ldw = k + rng.integer(0, 3);
    std::vector<float> W = rng.vec(static_cast<size_t>(n * ldw), 1.5);
    if (rep % 3 == 0) W[0] = std::numeric_limits<float>::quiet_NaN();
    if (rep % 5 == 0 && k > 2) W[1] = std::numeric_limits<float>::infinity(), W[2] = -std::numeric_limits<float>::infinity();
    if (rep % 7 == 0) std::fill(W.begin(), W.begin() + k, 0.25f);  // no negative value: lo = 0
    const TernaryDictMatrix m(W.data(), n, k, ldw);
    std::vector<float> row(static_cast<size_t>(m.decode_floats()));
    for (int64_t r = 0; r < n; ++r) {
      double lo = 0, hi = 0;
      for (int64_t p = 0; p < k; ++p)
        if (std::isfinite(W[size_t(r * ldw + p)])) lo = std::min(lo, double(W[size_t(r * ldw + p)])), hi = std::max(hi, double(W[size_t(r * ldw + p)]));
      EXPECT_EQ(m.lo(r), lo);
      EXPECT_EQ(m.hi(r), hi);
      m.decode_row(r, row.data());
      for (int64_t p = 0; p < k; ++p) {
        const double w = W[size_t(r * ldw + p)];
        const double want = std::isnan(w) ? 0.0 : (hi > 0 && w > hi / 2) ? hi : (lo < 0 && w < lo / 2) ? lo : 0.0;
        ASSERT_EQ(row[size_t(p)], want) << "rep " << rep << " row " << r << " at " << p;
        if (std::isfinite(w)) ASSERT_LE(std::fabs(w - want), std::max(hi, -lo) / 2 + 1e-12);
      }
    }
  }
}

TEST(QmoeMatrix, GemmMatchesDoubleReference) {
  Rng rng(77);
  for (int rep = 0; rep < 20; ++rep) {
    const int64_t n = rng.integer(1, 40), k = rng.integer(1, 200), m = rng.integer(1, 9);
    const auto W = rng.vec(static_cast<size_t>(n * k), 1.0);
    const TernaryDictMatrix q(W.data(), n, k, k);
    const auto x = rng.vec(static_cast<size_t>(m * k), 1.0);
    std::vector<float> y(static_cast<size_t>(m * n), 0.5f), scratch(static_cast<size_t>(q.decode_floats())), row(scratch.size());
    for (bool acc : {false, true}) {
      std::vector<float> before = y;
      q.gemm(m, x.data(), k, y.data(), n, scratch.data(), acc);
      for (int64_t r = 0; r < n; ++r) {
        q.decode_row(r, row.data());
        for (int64_t i = 0; i < m; ++i) {
          double want = acc ? before[size_t(i * n + r)] : 0.0, mag = std::fabs(want);
          for (int64_t p = 0; p < k; ++p) want += double(x[size_t(i * k + p)]) * row[size_t(p)], mag += std::fabs(double(x[size_t(i * k + p)]) * row[size_t(p)]);
          ASSERT_NEAR(y[size_t(i * n + r)], want, 1e-6 * mag + 1e-30);
        }
      }
    }
  }
}

TEST(QmoeBank, LayerMatchesTheFormulaOnDecodedWeights) {
  Rng rng(5);
  for (int rep = 0; rep < 8; ++rep) {
    const int64_t E = rng.integer(1, 5), d = rng.integer(1, 40), f = rng.integer(1, 50);
    const auto G = rng.vec(static_cast<size_t>(E * f * d), 1.0), U = rng.vec(G.size(), 1.0), D = rng.vec(G.size(), 1.0);
    moekit::TernaryDictFfnBank bank(E, d, f, G, U, D);
    // The decoded experts in double.
    std::vector<std::vector<double>> g(static_cast<size_t>(E)), u(static_cast<size_t>(E)), dn(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      std::vector<float> row(static_cast<size_t>(std::max(d, f) + 32));
      for (int64_t r = 0; r < f; ++r) {
        bank.gate(e).decode_row(r, row.data());
        g[size_t(e)].insert(g[size_t(e)].end(), row.begin(), row.begin() + d);
        bank.up(e).decode_row(r, row.data());
        u[size_t(e)].insert(u[size_t(e)].end(), row.begin(), row.begin() + d);
      }
      for (int64_t r = 0; r < d; ++r) {
        bank.down(e).decode_row(r, row.data());
        dn[size_t(e)].insert(dn[size_t(e)].end(), row.begin(), row.begin() + f);
      }
    }
    auto expert_ref = [&](int64_t e, const std::vector<double>& x) {
      std::vector<double> h(static_cast<size_t>(f)), y(static_cast<size_t>(d), 0.0);
      for (int64_t r = 0; r < f; ++r) {
        double a = 0, b = 0;
        for (int64_t c = 0; c < d; ++c) a += g[size_t(e)][size_t(r * d + c)] * x[size_t(c)], b += u[size_t(e)][size_t(r * d + c)] * x[size_t(c)];
        h[size_t(r)] = ref::activate(ref::Activation::silu, a) * b;
      }
      for (int64_t r = 0; r < d; ++r)
        for (int64_t c = 0; c < f; ++c) y[size_t(r)] += dn[size_t(e)][size_t(r * f + c)] * h[size_t(c)];
      return y;
    };
    moekit::TopKOptions o{E, std::min<int64_t>(2, E), d};
    const int64_t T = rng.integer(1, 20);
    const moekit::SparseLayer layer(moekit::TopKRouter(o, rng.vec(static_cast<size_t>(E * d), 1.0)), std::move(bank));
    const auto x = rng.vec(static_cast<size_t>(T * d), 1.0);
    std::vector<float> y(x.size()), y1(x.size());
    moekit::Workspace ws, ws1;
    layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, 2);
    layer.forward(moekit::Batch::single(T, d), x.data(), y1.data(), ws1, 1);
    EXPECT_TRUE(test_support::same_bits(y, y1)) << "threads";
    const ref::Routing r = ref::routing_from_view(ref::view_of(ws.plan), nullptr);
    const auto want = ref::moe_forward(r, expert_ref, {}, x.data(), T, d);
    const auto errs = ref::compare_values(want, y.data(), d, 1e-4, 1e-5);
    EXPECT_TRUE(errs.empty()) << join(errs);
  }
}

TEST(QmoeMatrix, BadInputIsRefused) {
  std::vector<float> W(12, 1.0f);
  expect_error([&] { TernaryDictMatrix(W.data(), 0, 4, 4); }, {"shape expected >= 1"});
  expect_error([&] { TernaryDictMatrix(W.data(), 3, 4, 3); }, {"row stride expected >= k"});
  expect_error([&] { TernaryDictMatrix(nullptr, 3, 4, 4); }, {"null weight pointer"});
  expect_error([&] { TernaryDictMatrix(W.data(), int64_t{1} << 21, int64_t{1} << 20, int64_t{1} << 20); }, {"n k expected < 2^40"});
  expect_error([] { moekit::qmoe::dictionary_entry(65536); }, {"id expected in [0, 65536)"});
  expect_error([&] { moekit::TernaryDictFfnBank(2, 2, 2, W, W, W); }, {"expected [E, f, d]"});
  expect_error([&] { moekit::TernaryDictFfnBank(0, 2, 2, W, W, W); }, {"expected >= 1"});
  expect_error([&] { moekit::TernaryDictFfnBank(1, 2, 2, std::vector<float>(4), std::vector<float>(4), std::vector<float>(4), static_cast<moekit::Activation>(9)); },
               {"activation expected"});
}

}  // namespace
