// SPDX-License-Identifier: Apache-2.0
// moekit::ep::ShardedFfnBank: a rank's experts by global id, and guest experts rebuilt from
// another rank's shipped payload. Every weight type, with and without biases: a shard and a
// guest must give the full bank's outputs bit for bit (same packed bytes, same kernels).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "moekit/ep/sharded_bank.hpp"
#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"

namespace {

using moekit::FfnBank;
using moekit::FfnShape;
using moekit::ep::ShardedFfnBank;

std::vector<float> random_vec(std::mt19937_64& g, size_t n, float a) {
  std::uniform_real_distribution<float> u(-a, a);
  std::vector<float> v(n);
  for (float& x : v) x = u(g);
  return v;
}

FfnBank random_bank(std::mt19937_64& g, int64_t E, FfnShape shape, moekit::kernels::WeightType type) {
  moekit::kernels::PackOptions pack;
  pack.type = type;
  FfnBank bank(E, shape, pack);
  const int64_t d = shape.hidden, f = shape.intermediate;
  for (int64_t e = 0; e < E; ++e) {
    const auto gate = random_vec(g, static_cast<size_t>(f * d), 0.3f), up = random_vec(g, static_cast<size_t>(f * d), 0.3f),
               down = random_vec(g, static_cast<size_t>(d * f), 0.3f);
    bank.set_expert(e, gate.data(), up.data(), down.data());
    if (shape.bias) {
      const auto gb = random_vec(g, static_cast<size_t>(f), 0.1f), ub = random_vec(g, static_cast<size_t>(f), 0.1f),
                 db = random_vec(g, static_cast<size_t>(d), 0.1f);
      bank.set_expert_bias(e, gb.data(), ub.data(), db.data());
    }
  }
  return bank;
}

std::vector<float> run(const auto& bank, int64_t e, const std::vector<float>& x, int64_t rows) {
  std::vector<float> out(static_cast<size_t>(rows * bank.d_out())), scratch(bank.scratch_floats(rows));
  bank.run(e, x.data(), rows, out.data(), scratch.data());
  return out;
}

TEST(EpShardedBank, ShardsAndGuestsEqualTheFullBankEveryWeightType) {
  std::mt19937_64 g(5);
  for (const auto type : moekit::kernels::kWeightTypes) {
    for (const bool bias : {false, true}) {
      FfnShape shape;
      shape.hidden = 24;
      shape.intermediate = 40;
      shape.bias = bias;
      const FfnBank full = random_bank(g, 5, shape, type);
      ShardedFfnBank a = ShardedFfnBank::from_full(full, {0, 2, 4});
      ShardedFfnBank b = ShardedFfnBank::from_full(full, {1, 3});
      const int64_t rows = 7;
      const auto x = random_vec(g, static_cast<size_t>(rows * shape.hidden), 1.0f);
      SCOPED_TRACE(testing::Message() << moekit::kernels::to_string(type) << (bias ? " with biases" : ""));
      for (int64_t e : {0, 2, 4}) EXPECT_EQ(run(a, e, x, rows), run(full, e, x, rows)) << "held expert " << e;
      EXPECT_FALSE(b.resident(2));
      EXPECT_THROW(run(b, 2, x, rows), moekit::error);
      std::vector<uint8_t> payload(a.payload_bytes());
      a.write_payload(2, payload.data());
      b.add_guest(2, payload);
      EXPECT_TRUE(b.resident(2));
      EXPECT_FALSE(b.holds(2));
      EXPECT_EQ(run(b, 2, x, rows), run(full, 2, x, rows)) << "guest expert 2";
      EXPECT_THROW(b.add_guest(2, payload), moekit::error);  // already resident
      payload.pop_back();
      EXPECT_THROW(b.add_guest(0, payload), moekit::error);  // wrong size
      b.clear_guests();
      EXPECT_FALSE(b.resident(2));
      EXPECT_EQ(b.num_guests(), 0);
    }
  }
}

TEST(EpShardedBank, BadShardsThrow) {
  std::mt19937_64 g(6);
  FfnShape shape;
  shape.hidden = 8;
  shape.intermediate = 8;
  const FfnBank full = random_bank(g, 3, shape, moekit::kernels::WeightType::f32);
  EXPECT_THROW(ShardedFfnBank::from_full(full, {}), moekit::error);
  EXPECT_THROW(ShardedFfnBank::from_full(full, {3}), moekit::error);
  EXPECT_THROW(ShardedFfnBank::from_full(full, {1, 0}), moekit::error);  // not ascending
}

}  // namespace
