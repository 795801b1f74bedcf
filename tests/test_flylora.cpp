// SPDX-License-Identifier: Apache-2.0
// FlyLoRA's implicit rank-wise router (routers/flylora.hpp) against a double-precision
// transcription of the official forward (gfyddha/FlyLoRA `flylora.py` 0da2ffb2:
// y = A x; top-k of |y + d|; out = B (y * mask) alpha / r), through SparseLayer with
// RankOneBank; the projection generator's sparsity; padding, threads and errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/flylora.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::FlyLoraOptions;
using moekit::FlyLoraRouter;
using moekit::RankOneBank;
using test_support::expect_error;
using test_support::Rng;

TEST(FlyLora, LayerMatchesTheOfficialForward) {
  Rng rng(2510);
  int64_t compared = 0, ties = 0;
  for (int rep = 0; rep < 60; ++rep) {
    const int64_t r = rng.integer(1, 40), k = rng.integer(1, r), d = rng.integer(1, 48), T = rng.integer(0, 30);
    FlyLoraOptions o{r, k, d, rng.coin(0.5) ? 0.0f : static_cast<float>(rng.uniform(1.0, 64.0))};
    const auto A = moekit::flylora_projection(r, d, k, 0.0f, static_cast<uint64_t>(rep));
    const auto bias = rng.coin(0.5) ? rng.vec(static_cast<size_t>(r), 0.05) : std::vector<float>{};
    const auto B = rng.vec(static_cast<size_t>(d * r), 1.0);
    const moekit::SparseLayer layer(FlyLoraRouter(o, A, bias), RankOneBank(r, d, B));
    std::vector<float> x = rng.vec(static_cast<size_t>(T * d), 1.0), y(x.size(), 9.0f), y1(x.size());
    std::vector<uint8_t> pad(static_cast<size_t>(T), 0);
    moekit::Batch batch = moekit::Batch::single(T, d);
    if (T > 2 && rep % 3 == 0) {
      pad[1] = 1;
      batch.padding = pad;
    }
    moekit::Workspace ws, ws1;
    layer.forward(batch, x.data(), y.data(), ws, 2);
    layer.forward(batch, x.data(), y1.data(), ws1, 1);
    ASSERT_TRUE(test_support::same_bits(y, y1)) << "threads";
    const double scale = (o.alpha > 0 ? o.alpha : 2.0 * r) / static_cast<double>(r);
    for (int64_t t = 0; t < T; ++t) {
      if (pad[static_cast<size_t>(t)] && !batch.padding.empty()) {
        for (int64_t c = 0; c < d; ++c) ASSERT_EQ(y[size_t(t * d + c)], 0.0f) << "padded token " << t;
        continue;
      }
      std::vector<double> yv(static_cast<size_t>(r)), key(static_cast<size_t>(r));
      for (int64_t i = 0; i < r; ++i) {
        double s = 0;
        for (int64_t c = 0; c < d; ++c) s += double(A[size_t(i * d + c)]) * x[size_t(t * d + c)];
        yv[size_t(i)] = s;
        key[size_t(i)] = std::fabs(s + (bias.empty() ? 0.0 : double(bias[size_t(i)])));
      }
      std::vector<int> order(static_cast<size_t>(r));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key[size_t(a)] > key[size_t(b)]; });
      if (k < r && std::fabs(key[size_t(order[size_t(k - 1)])] - key[size_t(order[size_t(k)])]) < 1e-5 * (1 + key[size_t(order[size_t(k)])])) {
        ++ties;
        continue;
      }
      // The plan: the selected components in descending |y + d|, weights scale * y.
      const auto ids = test_support::experts_of(ws.plan, t);
      ASSERT_EQ(ids.size(), static_cast<size_t>(k));
      for (int64_t j = 0; j < k; ++j) ASSERT_EQ(ids[size_t(j)], order[size_t(j)]) << "token " << t << " slot " << j;
      for (int64_t o2 = 0; o2 < d; ++o2) {
        double want = 0, mag = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int i = order[size_t(j)];
          want += scale * yv[size_t(i)] * B[size_t(o2 * r + i)];
          mag += std::fabs(scale * yv[size_t(i)] * B[size_t(o2 * r + i)]);
        }
        ASSERT_NEAR(y[size_t(t * d + o2)], want, 1e-5 * mag + 1e-6) << "token " << t << " out " << o2;
      }
      ++compared;
    }
  }
  EXPECT_GT(compared, 300);
  EXPECT_LT(ties, compared / 20);
}

TEST(FlyLora, ProjectionHasTheOfficialSparsity) {
  for (auto [r, d, k, rho] : {std::tuple<int64_t, int64_t, int64_t, float>{32, 512, 8, 0.0f}, {4, 10, 1, 0.0f}, {16, 100, 4, 0.5f}}) {
    const auto A = moekit::flylora_projection(r, d, k, rho, 3);
    const int64_t p = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(d) * (rho > 0 ? rho : double(k) / double(r))));
    double sum2 = 0;
    for (int64_t i = 0; i < r; ++i) {
      int64_t nz = 0;
      for (int64_t c = 0; c < d; ++c) nz += A[size_t(i * d + c)] != 0.0f, sum2 += double(A[size_t(i * d + c)]) * A[size_t(i * d + c)];
      EXPECT_EQ(nz, p) << "row " << i;
    }
    // Entries N(0, 1 / r^2): mean square 1 / r^2 within sampling error.
    const double ms = sum2 / static_cast<double>(r * p);
    EXPECT_NEAR(ms * r * r, 1.0, 5.0 / std::sqrt(static_cast<double>(r * p)));
  }
  EXPECT_EQ(moekit::flylora_projection(8, 20, 2, 0.0f, 1), moekit::flylora_projection(8, 20, 2, 0.0f, 1));
}

TEST(FlyLora, BadInputIsRefused) {
  const std::vector<float> A(12, 0.1f);
  expect_error([&] { FlyLoraRouter({0, 1, 3}, A); }, {"r expected in [1, 2^20]"});
  expect_error([&] { FlyLoraRouter({4, 5, 3}, A); }, {"k expected in [1, r = 4]"});
  expect_error([&] { FlyLoraRouter({4, 2, 0}, A); }, {"hidden size (d) expected"});
  expect_error([&] { FlyLoraRouter({4, 2, 3, -1.0f}, A); }, {"alpha expected finite and >= 0"});
  expect_error([&] { FlyLoraRouter({4, 2, 4}, A); }, {"A (projection)"});
  expect_error([&] { FlyLoraRouter({4, 2, 3}, A, std::vector<float>(3)); }, {"d (expert bias)"});
  std::vector<float> bad = A;
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { FlyLoraRouter({4, 2, 3}, bad); }, {"expected finite"});
  expect_error([&] { RankOneBank(4, 3, std::vector<float>(11)); }, {"up (B)"});
  expect_error([] { moekit::flylora_projection(4, 3, 5, 0.0f, 1); }, {"k in [1, r]"});
  expect_error([] { moekit::flylora_projection(4, 3, 2, 1.5f, 1); }, {"sparsity expected in [0, 1]"});
  const FlyLoraRouter router({4, 2, 3}, A);
  std::vector<float> x{1.0f, std::numeric_limits<float>::infinity(), 0.0f};
  moekit::RoutingPlan plan;
  moekit::RouterScratch scratch;
  expect_error([&] { router.route(moekit::Batch::single(1, 3), x.data(), plan, scratch); }, {"projection of token 0", "expected finite"});
}

}  // namespace
