// SPDX-License-Identifier: Apache-2.0
// Block-aware experts: the layer passes the BlockContext (batch, token of each row) and, for
// whole_blocks banks, one call with all of an expert's rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <random>
#include <vector>

#include "moekit/layer.hpp"
#include "moekit/routers/topk.hpp"

namespace {

// out = in * (1 + position of the row's token); counts its calls.
struct PositionScaler {
  static constexpr bool whole_blocks = true;
  int64_t d;
  std::atomic<int>* calls;
  int64_t d_in() const { return d; }
  int64_t d_out() const { return d; }
  size_t scratch_floats(int64_t) const { return 0; }
  void operator()(const float*, int64_t, float*, float*) const { ADD_FAILURE() << "context overload expected"; }
  void operator()(const float* in, int64_t rows, float* out, float*, const moekit::BlockContext& ctx) const {
    ++*calls;
    EXPECT_EQ(static_cast<int64_t>(ctx.tokens.size()), rows);
    for (int64_t i = 0; i < rows; ++i) {
      if (i > 0) EXPECT_LT(ctx.tokens[i - 1], ctx.tokens[i]);
      const int32_t t = ctx.tokens[static_cast<size_t>(i)];
      const float scale = 1.0f + static_cast<float>(ctx.batch->positions[static_cast<size_t>(t)]);
      for (int64_t c = 0; c < d; ++c) out[i * d + c] = in[i * d + c] * scale;
    }
  }
};

TEST(LayerBlockContext, WholeBlocksGetTokensAndBatch) {
  const int64_t E = 3, d = 5, T = 300;  // > kRowBlock rows per expert
  std::atomic<int> calls{0};
  std::vector<PositionScaler> experts(E, PositionScaler{d, &calls});
  std::mt19937 g(2);
  std::normal_distribution<float> n;
  std::vector<float> gate(E * d), x(T * d), y(T * d);
  for (float& v : gate) v = n(g);
  for (float& v : x) v = n(g);
  std::vector<int32_t> pos(T);
  for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>((t * 7) % 50);
  moekit::SparseLayer layer(moekit::TopKRouter({.num_experts = E, .k = 1, .hidden = d}, gate),
                            moekit::FunctorBank<PositionScaler>(experts));
  moekit::Batch b = moekit::Batch::single(T, d);
  b.positions = pos;
  moekit::Workspace ws;
  for (int threads : {1, 2}) {
    calls = 0;
    layer.forward(b, x.data(), y.data(), ws, threads);
    int active = 0;
    for (int64_t e = 0; e < E; ++e) active += ws.plan.kept_of(e) > 0;
    EXPECT_EQ(calls.load(), active);  // one call per active expert, whatever its size
    ASSERT_GT(std::max({ws.plan.kept_of(0), ws.plan.kept_of(1), ws.plan.kept_of(2)}), (moekit::SparseLayer<moekit::TopKRouter, moekit::FunctorBank<PositionScaler>>::kRowBlock));
    for (int64_t t = 0; t < T; ++t) {
      const float w = ws.plan.slot_weight()[static_cast<size_t>(t)];
      for (int64_t c = 0; c < d; ++c)
        ASSERT_NEAR(y[t * d + c], w * x[t * d + c] * (1.0f + static_cast<float>(pos[t])), 1e-5f * (1 + std::fabs(y[t * d + c])));
    }
  }
}

}  // namespace
