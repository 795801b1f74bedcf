// SPDX-License-Identifier: Apache-2.0
// Expert placement and the dispatch planners of moekit::ep (no MPI): plain plans and the
// least-loaded (LLEP) planner on crafted and random loads. Invariants checked on every plan:
// every row of every expert placed exactly once, segments positive and on valid ranks, a rank
// computes an expert it does not hold only as a listed guest, guest bounds kept, rank loads
// consistent, and the max rank load never above the plain plan's.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "moekit/ep/placement.hpp"
#include "moekit/error.hpp"

namespace {

using moekit::ep::DispatchPlan;
using moekit::ep::LlepOptions;
using moekit::ep::Placement;

int64_t guest_bound(const LlepOptions& o, int r) {
  return o.max_guests_per_rank.empty() ? o.max_guests : o.max_guests_per_rank[static_cast<size_t>(r)];
}

// Every invariant of a plan, independently recomputed from its segments.
void check_plan(const DispatchPlan& p, const std::vector<int64_t>& loads, const Placement& pl, const LlepOptions* opt) {
  const int P = pl.ranks();
  const auto E = static_cast<int64_t>(loads.size());
  ASSERT_EQ(static_cast<int64_t>(p.segment_offsets.size()), E + 1);
  ASSERT_EQ(static_cast<int>(p.rank_load.size()), P);
  ASSERT_EQ(static_cast<int>(p.guests.size()), P);
  std::vector<int64_t> load(static_cast<size_t>(P), 0);
  std::vector<std::set<int64_t>> foreign(static_cast<size_t>(P));
  for (int64_t e = 0; e < E; ++e) {
    int64_t sum = 0;
    for (const auto& s : p.of(e)) {
      ASSERT_GE(s.rank, 0);
      ASSERT_LT(s.rank, P);
      ASSERT_GT(s.rows, 0) << "expert " << e;
      sum += s.rows;
      load[static_cast<size_t>(s.rank)] += s.rows;
      if (!pl.holds(s.rank, e)) foreign[static_cast<size_t>(s.rank)].insert(e);
    }
    ASSERT_EQ(sum, loads[static_cast<size_t>(e)]) << "expert " << e << " rows lost or duplicated";
  }
  for (int r = 0; r < P; ++r) {
    EXPECT_EQ(load[static_cast<size_t>(r)], p.rank_load[static_cast<size_t>(r)]) << "rank " << r;
    const std::set<int64_t> listed(p.guests[static_cast<size_t>(r)].begin(), p.guests[static_cast<size_t>(r)].end());
    EXPECT_EQ(listed, foreign[static_cast<size_t>(r)]) << "rank " << r << " guests";
    if (opt != nullptr && guest_bound(*opt, r) >= 0)
      EXPECT_LE(static_cast<int64_t>(listed.size()), guest_bound(*opt, r)) << "rank " << r << " guest bound";
  }
}

TEST(EpPlacement, LayoutsAndErrors) {
  const Placement rr = Placement::round_robin(10, 3);
  EXPECT_EQ(rr.native(4), 1);
  EXPECT_EQ(rr.experts_of(2), (std::vector<int64_t>{2, 5, 8}));
  const Placement c = Placement::contiguous(8, 3);
  EXPECT_EQ(c.experts_of(0), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(c.experts_of(1), (std::vector<int64_t>{2, 3, 4}));
  EXPECT_EQ(c.experts_of(2), (std::vector<int64_t>{5, 6, 7}));
  const Placement fewer = Placement::contiguous(2, 4);  // more ranks than experts
  int64_t held = 0;
  for (int r = 0; r < 4; ++r) held += static_cast<int64_t>(fewer.experts_of(r).size());
  EXPECT_EQ(held, 2);
  const Placement t = Placement::table({{1, 0}, {0}}, 2);
  EXPECT_TRUE(t.holds(0, 0));
  EXPECT_EQ(t.native(0), 1);
  EXPECT_THROW(Placement::table({{0}, {}}, 2), moekit::error);
  EXPECT_THROW(Placement::table({{0, 0}}, 2), moekit::error);
  EXPECT_THROW(Placement::table({{2}}, 2), moekit::error);
  EXPECT_THROW(Placement::round_robin(0, 2), moekit::error);
  EXPECT_THROW(Placement::round_robin(4, 0), moekit::error);
}

TEST(EpPlainPlan, OwnersAndReplicas) {
  const Placement t = Placement::table({{0, 1, 2}, {1}}, 3);
  const std::vector<int64_t> loads{10, 4};
  const DispatchPlan p = moekit::ep::plain_plan(loads, t);
  check_plan(p, loads, t, nullptr);
  ASSERT_EQ(p.of(0).size(), 3u);
  EXPECT_EQ(p.of(0)[0].rows, 4);  // 10 = 4 + 3 + 3, first parts larger
  EXPECT_EQ(p.of(0)[2].rows, 3);
  EXPECT_EQ(p.rank_load, (std::vector<int64_t>{4, 7, 3}));
  EXPECT_FALSE(p.rebalanced);
  EXPECT_THROW(moekit::ep::plain_plan(std::vector<int64_t>{1}, t), moekit::error);
  EXPECT_THROW(moekit::ep::plain_plan(std::vector<int64_t>{1, -1}, t), moekit::error);
}

TEST(EpLlep, BalancedLoadsKeepThePlainPlan) {
  const Placement pl = Placement::round_robin(8, 4);
  const std::vector<int64_t> loads{10, 11, 9, 10, 12, 10, 9, 11};  // max / mean < 1.3
  const DispatchPlan p = moekit::ep::llep_plan(loads, pl);
  check_plan(p, loads, pl, nullptr);
  EXPECT_FALSE(p.rebalanced);
  EXPECT_EQ(p.rank_load, moekit::ep::plain_plan(loads, pl).rank_load);
}

TEST(EpLlep, OneHotExpertSpreadsOverEveryRank) {
  const Placement pl = Placement::round_robin(8, 4);
  std::vector<int64_t> loads(8, 0);
  loads[5] = 1000;  // every row to expert 5 (rank 1)
  const DispatchPlan p = moekit::ep::llep_plan(loads, pl);
  check_plan(p, loads, pl, nullptr);
  EXPECT_TRUE(p.rebalanced);
  EXPECT_EQ(p.rank_load, (std::vector<int64_t>{250, 250, 250, 250}));
  EXPECT_EQ(p.of(5)[0].rank, 1);  // the native rank keeps the first range
  for (int r : {0, 2, 3}) EXPECT_EQ(p.guests[static_cast<size_t>(r)], (std::vector<int64_t>{5}));
  EXPECT_TRUE(p.guests[1].empty());
}

TEST(EpLlep, GuestBoundAndMinTokens) {
  const Placement pl = Placement::round_robin(4, 4);
  const std::vector<int64_t> loads{1000, 0, 0, 0};
  LlepOptions none;
  none.max_guests = 0;  // no rank may host a foreign expert: nothing can move
  const DispatchPlan p0 = moekit::ep::llep_plan(loads, pl, none);
  check_plan(p0, loads, pl, &none);
  EXPECT_FALSE(p0.rebalanced);
  EXPECT_EQ(p0.max_load(), 1000);
  LlepOptions one;
  one.max_guests_per_rank = {-1, 1, 0, 1};  // rank 2 may not host
  const DispatchPlan p1 = moekit::ep::llep_plan(loads, pl, one);
  check_plan(p1, loads, pl, &one);
  EXPECT_EQ(p1.rank_load[2], 0);
  EXPECT_LT(p1.max_load(), 1000);
  LlepOptions big;
  big.min_tokens = 300;  // spills of 250 rows are skipped; the remainder still lands
  const DispatchPlan p2 = moekit::ep::llep_plan(loads, pl, big);
  check_plan(p2, loads, pl, &big);
  EXPECT_LE(p2.max_load(), 1000);
}

TEST(EpLlep, ReplicasShipNothing) {
  const Placement pl = Placement::table({{0, 1}, {1}, {0}, {1}}, 2);
  const std::vector<int64_t> loads{600, 10, 10, 10};
  const DispatchPlan p = moekit::ep::llep_plan(loads, pl);
  check_plan(p, loads, pl, nullptr);
  EXPECT_TRUE(p.guests[0].empty());
  EXPECT_TRUE(p.guests[1].empty());
}

TEST(EpLlep, RandomZipfLoadsKeepEveryInvariant) {
  std::mt19937_64 g(7);
  int rebalanced = 0, trials = 400;
  double gain = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const int P = std::uniform_int_distribution<int>(1, 9)(g);
    const int64_t E = std::uniform_int_distribution<int64_t>(1, 64)(g);
    const double s = std::uniform_real_distribution<double>(0.0, 2.0)(g);
    const int64_t T = std::uniform_int_distribution<int64_t>(0, 5000)(g);
    std::vector<double> w(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) w[static_cast<size_t>(e)] = 1.0 / std::pow(double(e + 1), s);
    std::shuffle(w.begin(), w.end(), g);
    std::discrete_distribution<int64_t> pick(w.begin(), w.end());
    std::vector<int64_t> loads(static_cast<size_t>(E), 0);
    for (int64_t t = 0; t < T; ++t) ++loads[static_cast<size_t>(pick(g))];
    Placement pl = trial % 3 == 0 ? Placement::round_robin(E, P) : Placement::contiguous(E, P);
    if (trial % 5 == 4 && P > 1) {  // some replicas
      std::vector<std::vector<int>> o(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) {
        o[static_cast<size_t>(e)] = {static_cast<int>(e % P)};
        if (e % 3 == 0) o[static_cast<size_t>(e)].push_back(static_cast<int>((e + 1) % P));
      }
      pl = Placement::table(o, P);
    }
    LlepOptions opt;
    opt.alpha = std::uniform_real_distribution<double>(1.0, 1.5)(g);
    opt.lambda = std::uniform_real_distribution<double>(1.0, 1.6)(g);
    opt.min_tokens = std::uniform_int_distribution<int64_t>(1, 64)(g);
    opt.max_guests = std::uniform_int_distribution<int64_t>(-1, 4)(g);
    const DispatchPlan plain = moekit::ep::plain_plan(loads, pl);
    const DispatchPlan p = moekit::ep::llep_plan(loads, pl, opt);
    SCOPED_TRACE(testing::Message() << "trial " << trial << " P " << P << " E " << E << " T " << T);
    check_plan(plain, loads, pl, nullptr);
    check_plan(p, loads, pl, &opt);
    EXPECT_LE(p.max_load(), plain.max_load());
    if (!p.rebalanced) EXPECT_EQ(p.rank_load, plain.rank_load);
    // Deterministic: the same inputs give the same plan (every rank computes it).
    const DispatchPlan again = moekit::ep::llep_plan(loads, pl, opt);
    EXPECT_EQ(again.rank_load, p.rank_load);
    EXPECT_EQ(again.segment_offsets, p.segment_offsets);
    if (p.rebalanced) {
      ++rebalanced;
      gain += double(plain.max_load()) / double(p.max_load());
    }
  }
  EXPECT_GT(rebalanced, trials / 10);  // the random loads do exercise the rebalancing
  RecordProperty("mean_max_load_gain", std::to_string(gain / std::max(rebalanced, 1)));
}

TEST(EpLlep, BadOptionsThrow) {
  const Placement pl = Placement::round_robin(4, 2);
  const std::vector<int64_t> loads{1, 2, 3, 4};
  LlepOptions o;
  o.alpha = 0.5;
  EXPECT_THROW(moekit::ep::llep_plan(loads, pl, o), moekit::error);
  o = {};
  o.min_tokens = 0;
  EXPECT_THROW(moekit::ep::llep_plan(loads, pl, o), moekit::error);
  o = {};
  o.max_guests_per_rank = {1};
  EXPECT_THROW(moekit::ep::llep_plan(loads, pl, o), moekit::error);
  o = {};
  o.lambda = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(moekit::ep::llep_plan(loads, pl, o), moekit::error);
}

}  // namespace
