// SPDX-License-Identifier: Apache-2.0
// MoBA block attention routing (attention/moba.hpp) against the double-precision
// transcription of the official naive implementation (reference/moba_ref), on random shapes,
// batches of sequences, grouped-query heads and edge cases; the dense causal peer; thread
// identity; errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "moekit/attention/moba.hpp"
#include "reference/moba_ref.hpp"
#include "support/test_helpers.hpp"

namespace {

namespace ma = moekit::attention;
using test_support::expect_error;
using test_support::Rng;
using test_support::same_bits;

struct Case {
  ma::AttentionShape shape;
  ma::MobaOptions opt;
  std::vector<int64_t> cu;
  std::vector<float> q, k, v;
};

// Random sequence lengths summing to T (some empty), or one sequence.
std::vector<int64_t> random_cu(Rng& rng, int64_t T) {
  std::vector<int64_t> cu{0};
  if (rng.coin(0.4)) return {};
  if (T == 0) cu.push_back(0);
  while (cu.back() < T) cu.push_back(std::min(T, cu.back() + (rng.coin(0.15) ? 0 : rng.integer(1, T))));
  return cu;
}

Case random_case(Rng& rng) {
  Case c;
  const int64_t heads[] = {1, 2, 4};
  c.shape.heads = heads[rng.integer(0, 2)];
  c.shape.kv_heads = rng.coin(0.5) ? c.shape.heads : (c.shape.heads == 4 && rng.coin(0.5) ? 2 : 1);
  const int64_t dims[] = {1, 5, 16, 33, 64};
  c.shape.head_dim = dims[rng.integer(0, 4)];
  c.shape.tokens = rng.integer(0, 260);
  const int64_t bs[] = {1, 3, 16, 50, 64, 600};
  c.opt.block_size = bs[rng.integer(0, 5)];
  c.opt.top_k = rng.integer(1, 6);
  if (rng.coin(0.3)) c.opt.scale = static_cast<float>(rng.uniform(0.05, 1.0));
  if (rng.coin(0.1)) {  // blocks of several 512-key tiles
    c.shape.heads = 1;
    c.shape.kv_heads = 1;
    c.shape.head_dim = rng.coin(0.5) ? 1 : 4;
    c.shape.tokens = rng.integer(1100, 1600);
    c.opt.block_size = rng.coin(0.5) ? 600 : 1100;
  }
  c.cu = random_cu(rng, c.shape.tokens);
  const size_t nq = static_cast<size_t>(c.shape.tokens * c.shape.heads * c.shape.head_dim);
  const size_t nkv = static_cast<size_t>(c.shape.tokens * c.shape.kv_heads * c.shape.head_dim);
  const double a = 2.0 / std::sqrt(std::sqrt(static_cast<double>(c.shape.head_dim)));
  c.q = rng.vec(nq, a);
  c.k = rng.vec(nkv, a);
  c.v = rng.vec(nkv, 1.0);
  // Block structure in the keys, so the gate has clear winners as often as not.
  for (size_t i = 0; i < nkv; ++i) c.k[i] += static_cast<float>(0.3 * std::sin(0.01 * static_cast<double>(i / 97)));
  return c;
}

ref::moba::Params params(const Case& c, bool dense = false) {
  ref::moba::Params p;
  p.heads = c.shape.heads;
  p.kv_heads = c.shape.kv_heads;
  p.head_dim = c.shape.head_dim;
  p.block_size = c.opt.block_size;
  p.top_k = c.opt.top_k;
  p.scale = c.opt.scale;
  p.dense = dense;
  return p;
}

std::vector<int64_t> offsets(const Case& c) { return c.cu.empty() ? std::vector<int64_t>{0, c.shape.tokens} : c.cu; }

TEST(MobaRandom, GateAndAttentionMatchTheNaiveReference) {
  Rng rng(2502);
  int64_t compared = 0, ties = 0, multi_tile = 0;
  for (int rep = 0; rep < 150; ++rep) {
    const Case c = random_case(rng);
    multi_tile += c.opt.block_size > 512 && c.shape.tokens > 512;
    SCOPED_TRACE("case " + std::to_string(rep) + ": T " + std::to_string(c.shape.tokens) + " H " +
                 std::to_string(c.shape.heads) + "/" + std::to_string(c.shape.kv_heads) + " d " +
                 std::to_string(c.shape.head_dim) + " B " + std::to_string(c.opt.block_size) + " k " +
                 std::to_string(c.opt.top_k));
    ma::MobaPlan plan;
    ma::MobaWorkspace ws;
    std::vector<float> out(c.q.size(), std::numeric_limits<float>::quiet_NaN());
    ma::moba_forward(c.shape, c.q.data(), c.k.data(), c.v.data(), c.cu, c.opt, plan, out.data(), ws, 2);
    const auto r = ref::moba::attention(params(c), c.q.data(), c.k.data(), c.v.data(), c.shape.tokens, offsets(c), 1e-5);
    bool any_tie = false;
    for (int64_t t = 0; t < c.shape.tokens; ++t)
      for (int64_t h = 0; h < c.shape.heads; ++h) {
        const size_t i = static_cast<size_t>(t * c.shape.heads + h);
        if (r.near_tie[i]) {
          ++ties;
          any_tie = true;
          continue;
        }
        const auto got = plan.blocks(t, h);
        ASSERT_EQ(std::vector<int32_t>(got.begin(), got.end()), r.blocks[i]) << "token " << t << " head " << h;
        for (int64_t x = 0; x < c.shape.head_dim; ++x) {
          const double want = r.out[i * static_cast<size_t>(c.shape.head_dim) + static_cast<size_t>(x)];
          ASSERT_NEAR(out[i * static_cast<size_t>(c.shape.head_dim) + static_cast<size_t>(x)], want, 2e-5)
              << "token " << t << " head " << h << " dim " << x;
        }
        ++compared;
      }
    if (!any_tie) {
      EXPECT_EQ(plan.keys_attended(), r.keys_attended);
      EXPECT_EQ(plan.causal_keys(), r.causal_keys);
    }
  }
  EXPECT_GT(compared, 20000);
  EXPECT_LT(ties, compared / 100);
  EXPECT_GE(multi_tile, 5) << "blocks of several key tiles not exercised";
  std::printf("[ moba ref ] (token, head) pairs compared: %lld, excluded as near-ties: %lld; cases with blocks of several tiles: %lld\n",
              static_cast<long long>(compared), static_cast<long long>(ties), static_cast<long long>(multi_tile));
}

// Every block kept (top_k >= blocks, or one block): MoBA is dense causal attention, the peer's
// result within float rounding (blocks merged per token instead of one running softmax), and
// the peer matches the double reference.
TEST(MobaRandom, KeepingEveryBlockIsDenseCausalAttention) {
  Rng rng(11);
  for (int rep = 0; rep < 40; ++rep) {
    Case c = random_case(rng);
    c.opt.top_k = 1 << 20;
    ma::MobaPlan plan;
    ma::MobaWorkspace ws;
    std::vector<float> out(c.q.size()), dense(c.q.size());
    ma::moba_forward(c.shape, c.q.data(), c.k.data(), c.v.data(), c.cu, c.opt, plan, out.data(), ws, 2);
    ma::causal_attention(c.shape, c.q.data(), c.k.data(), c.v.data(), c.cu, c.opt, dense.data(), ws, 1);
    for (size_t i = 0; i < dense.size(); ++i) ASSERT_NEAR(out[i], dense[i], 1e-5) << "case " << rep << " at " << i;
    EXPECT_EQ(plan.keys_attended(), plan.causal_keys());
    const auto r = ref::moba::attention(params(c, true), c.q.data(), c.k.data(), c.v.data(), c.shape.tokens, offsets(c), 0);
    for (size_t i = 0; i < dense.size(); ++i) ASSERT_NEAR(dense[i], r.out[i], 2e-5) << "case " << rep << " at " << i;
  }
}

TEST(MobaRandom, ThreadsGiveIdenticalPlansAndOutputs) {
  Rng rng(5);
  for (int rep = 0; rep < 20; ++rep) {
    const Case c = random_case(rng);
    ma::MobaPlan p1, p2;
    ma::MobaWorkspace ws1, ws2;
    std::vector<float> o1(c.q.size()), o2(c.q.size());
    ma::moba_forward(c.shape, c.q.data(), c.k.data(), c.v.data(), c.cu, c.opt, p1, o1.data(), ws1, 1);
    ma::moba_forward(c.shape, c.q.data(), c.k.data(), c.v.data(), c.cu, c.opt, p2, o2.data(), ws2, 2);
    for (int64_t t = 0; t < c.shape.tokens; ++t)
      for (int64_t h = 0; h < c.shape.heads; ++h) {
        const auto a = p1.blocks(t, h), b = p2.blocks(t, h);
        ASSERT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end()));
      }
    ASSERT_TRUE(same_bits(o1, o2)) << "case " << rep;
    // A reused workspace gives the same again.
    ma::moba_forward(c.shape, c.q.data(), c.k.data(), c.v.data(), c.cu, c.opt, p2, o2.data(), ws1, 2);
    ASSERT_TRUE(same_bits(o1, o2)) << "case " << rep;
  }
}

// Ties between earlier blocks' scores go to the lower block index (identical blocks).
TEST(Moba, TiesKeepTheLowerBlock) {
  const int64_t T = 40, d = 4, B = 8;
  std::vector<float> q(T * d, 1.0f), k(T * d, 0.5f), v(T * d);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i % 7);
  ma::MobaPlan plan;
  ma::MobaWorkspace ws;
  std::vector<float> out(q.size());
  ma::moba_forward({T, 1, 1, d}, q.data(), k.data(), v.data(), {}, {B, 3, 0.0f}, plan, out.data(), ws);
  EXPECT_EQ(std::vector<int32_t>(plan.blocks(39, 0).begin(), plan.blocks(39, 0).end()), (std::vector<int32_t>{0, 1, 4}));
  EXPECT_EQ(std::vector<int32_t>(plan.blocks(9, 0).begin(), plan.blocks(9, 0).end()), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(std::vector<int32_t>(plan.blocks(3, 0).begin(), plan.blocks(3, 0).end()), (std::vector<int32_t>{0}));
}

TEST(Moba, BadInputIsRefused) {
  const int64_t T = 10, d = 4;
  std::vector<float> q(T * 2 * d, 0.1f), k(T * d, 0.1f), v(T * d, 0.1f), out(q.size());
  ma::MobaPlan plan;
  ma::MobaWorkspace ws;
  const ma::AttentionShape ok{T, 2, 1, d};
  auto gate = [&](ma::AttentionShape s, ma::MobaOptions o, std::vector<int64_t> cu = {}) {
    return [=, &q, &k, &plan, &ws] { ma::moba_gate(s, q.data(), k.data(), cu, o, plan, ws); };
  };
  expect_error(gate({T, 0, 1, d}, {}), {"heads expected >= 1"});
  expect_error(gate({T, 2, 3, d}, {}), {"kv_heads expected to divide heads"});
  expect_error(gate({T, 2, 1, 0}, {}), {"head_dim expected >= 1"});
  expect_error(gate({-1, 2, 1, d}, {}), {"tokens expected >= 0"});
  expect_error(gate({int64_t{1} << 40, 2, 1, d}, {}), {"expected < 2^40"});
  expect_error(gate(ok, {0, 3, 0.0f}), {"block_size expected in [1, 2^40]"});
  expect_error(gate(ok, {4, 0, 0.0f}), {"top_k expected >= 1"});
  expect_error(gate(ok, {4, 2, std::numeric_limits<float>::quiet_NaN()}), {"scale expected finite"});
  expect_error(gate(ok, {4, 2, -1.0f}), {"scale expected finite"});
  expect_error(gate(ok, {}, {1, 10}), {"cu_seqlens[0] expected 0"});
  expect_error(gate(ok, {}, {0, 9}), {"last entry expected tokens"});
  expect_error(gate(ok, {}, {0, 6, 4, 10}), {"non-decreasing"});
  expect_error(gate(ok, {}, {0}), {"expected empty or >= 2"});
  q[13] = std::numeric_limits<float>::infinity();
  expect_error(gate(ok, {}), {"q expected finite", "element 13"});
  q[13] = 0.1f;
  k[2] = std::numeric_limits<float>::quiet_NaN();
  expect_error(gate(ok, {}), {"k expected finite"});
  k[2] = 0.1f;
  ma::moba_gate(ok, q.data(), k.data(), {}, {4, 2, 0.0f}, plan, ws);
  expect_error([&] { ma::moba_attention(ok, q.data(), k.data(), v.data(), {}, {4, 3, 0.0f}, plan, out.data(), ws); },
               {"plan expected from moba_gate"});
  const std::vector<int64_t> two{0, 5, 10};
  expect_error([&] { ma::moba_attention(ok, q.data(), k.data(), v.data(), two, {4, 2, 0.0f}, plan, out.data(), ws); },
               {"plan expected from moba_gate with these cu_seqlens"});
  expect_error(gate(ok, {int64_t{1} << 41, 2, 0.0f}), {"block_size expected in [1, 2^40]"});
  expect_error([&] { ma::moba_attention(ok, q.data(), k.data(), v.data(), {}, {4, 2, 0.0f}, plan, q.data(), ws); },
               {"out expected not to overlap"});
  EXPECT_NO_THROW(ma::moba_attention(ok, q.data(), k.data(), v.data(), {}, {4, 2, 0.0f}, plan, out.data(), ws));
  v[5] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { ma::causal_attention(ok, q.data(), k.data(), v.data(), {}, {}, out.data(), ws); },
               {"v expected finite"});
}

}  // namespace
