// SPDX-License-Identifier: Apache-2.0
// moekit::ep::ExpertParallelLayer under mpirun (-np 2 and -np 4): every rank builds the same
// random layer (same seed), holds its shard of the experts, and routes its own tokens (a
// different count on each rank, 0 included). The reference is the single-process SparseLayer
// on every rank's tokens concatenated, computed on each rank: with Wire::f32 each rank's
// output must equal its slice bit for bit, for top-k presets (Mixtral, Qwen2-MoE with a gated
// shared expert, DeepSeek-V3 with groups and bias), a non-top-k family (nearest-centroid),
// every placement (round-robin, contiguous, replicas), micro-batches (overlap), and LLEP on
// skewed routing with shipped weights. Wire::bf16 is checked against the same computation with
// each shipped row rounded to bf16, done in one process through the layer's phases.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "moekit/ep/layer.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/io/config.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/prototype.hpp"
#include "moekit/routers/topk.hpp"

namespace {

using moekit::Batch;
using moekit::FfnBank;
using moekit::FfnShape;
using moekit::RoutingPlan;
using moekit::SharedExpert;
using moekit::Workspace;
namespace ep = moekit::ep;

// Bit equality of n floats (n may be 0 with null pointers: a rank without tokens).
bool same_bits(const float* a, const float* b, size_t n) { return n == 0 || std::memcmp(a, b, n * sizeof(float)) == 0; }

int rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int ranks() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

std::vector<float> random_vec(std::mt19937_64& g, size_t n, double a) {
  std::uniform_real_distribution<double> u(-a, a);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(u(g));
  return v;
}

FfnBank random_bank(std::mt19937_64& g, int64_t E, FfnShape shape) {
  FfnBank bank(E, shape);
  const int64_t d = shape.hidden, f = shape.intermediate;
  const double a = std::sqrt(3.0 / double(d)), b = std::sqrt(3.0 / double(f));
  for (int64_t e = 0; e < E; ++e) {
    const auto gate = random_vec(g, static_cast<size_t>(f * d), a), up = random_vec(g, static_cast<size_t>(f * d), a),
               down = random_vec(g, static_cast<size_t>(d * f), b);
    bank.set_expert(e, gate.data(), up.data(), down.data());
  }
  return bank;
}

std::vector<SharedExpert> random_shared(std::mt19937_64& g, const moekit::LayerConfig& c, int64_t d) {
  std::vector<SharedExpert> s;
  if (!c.shared) return s;
  FfnShape sh = c.experts;
  sh.hidden = d;
  sh.intermediate = 24;
  SharedExpert se{random_bank(g, 1, sh), {}};
  if (c.shared->gated) se.gate = random_vec(g, static_cast<size_t>(d), std::sqrt(3.0 / double(d)));
  s.push_back(std::move(se));
  return s;
}

// Every rank's tokens: rank r has counts[r] rows; all ranks know all rows (same seed).
struct Tokens {
  std::vector<int64_t> counts;
  std::vector<float> all;  // concatenated [sum counts, d]
  int64_t begin(int r) const {
    int64_t b = 0;
    for (int i = 0; i < r; ++i) b += counts[static_cast<size_t>(i)];
    return b;
  }
  int64_t total() const { return begin(static_cast<int>(counts.size())); }
};

Tokens random_tokens(std::mt19937_64& g, int P, int64_t d, int64_t max_per_rank, double skew = 0.0,
                     const std::vector<float>* toward = nullptr) {
  Tokens t;
  for (int r = 0; r < P; ++r)
    t.counts.push_back(r == 1 && P > 2 ? 0 : std::uniform_int_distribution<int64_t>(1, max_per_rank)(g));  // rank 1 of 3+: none
  t.all = random_vec(g, static_cast<size_t>(t.total() * d), 1.0);
  if (toward != nullptr)  // skewed routing: every token leans toward one direction
    for (int64_t i = 0; i < t.total(); ++i)
      for (int64_t j = 0; j < d; ++j) t.all[static_cast<size_t>(i * d + j)] += static_cast<float>(skew * (*toward)[static_cast<size_t>(j)]);
  return t;
}

// Runs the EP layer on this rank's slice and compares with the single-process layer on all.
template <class R>
void check(const moekit::SparseLayer<R, FfnBank>& single, const FfnBank& full, R router, std::vector<SharedExpert> shared,
           const Tokens& tok, const ep::Placement& placement, ep::Options opt, const std::string& what,
           ep::Stats* stats_out = nullptr) {
  const int me = rank();
  const int64_t d = single.hidden_size(), T = tok.counts[static_cast<size_t>(me)], b = tok.begin(me);
  // Reference: the whole batch in one process.
  std::vector<float> want(tok.all.size());
  Workspace ws;
  single.forward(Batch::single(tok.total(), d), tok.all.data(), want.data(), ws, 1);
  // Expert parallel: this rank's shard.
  moekit::SparseLayer<R, ep::ShardedFfnBank> mine(
      std::move(router), ep::ShardedFfnBank::from_full(full, placement.experts_of(me)), std::move(shared));
  ep::ExpertParallelLayer<R, ep::ShardedFfnBank> layer(std::move(mine), placement, ep::Comm(MPI_COMM_WORLD), opt);
  std::vector<float> y(static_cast<size_t>(T * d), std::nanf(""));
  ep::EpWorkspace ews;
  for (int rep = 0; rep < 2; ++rep) {  // the workspace reused gives the same bits
    layer.forward(Batch::single(T, d), tok.all.data() + b * d, y.data(), ews, 1 + rep);
    if (opt.wire == ep::Wire::f32) {
      ASSERT_TRUE(same_bits(y.data(), want.data() + b * d, y.size()))
          << what << ": rank " << me << " rep " << rep << " differs from the single-process layer";
    } else {
      // bf16 on the wire: the same computation with every shipped row (both ways) rounded,
      // in one process through the phases.
      std::vector<float> exp(y.size());
      Workspace h, r;
      const float* x = single.route(Batch::single(T, d), moekit::ActivationsIn::f32(tok.all.data() + b * d), h, 1);
      const RoutingPlan& plan = h.plan;
      const auto n = plan.num_kept();
      std::vector<float> rows(static_cast<size_t>(n * d));
      std::vector<uint16_t> tmp(static_cast<size_t>(d));
      for (int64_t p = 0; p < n; ++p) {
        const int32_t t = plan.expert_tokens()[static_cast<size_t>(p)];
        moekit::kernels::f32_to_bf16(x + t * d, tmp.data(), d);
        moekit::kernels::bf16_to_f32(tmp.data(), rows.data() + p * d, d);
      }
      // One slot per row, in the home plan's expert order.
      std::vector<int32_t> ids(static_cast<size_t>(n));
      std::vector<float> ones(static_cast<size_t>(n), 1.0f);
      for (int64_t p = 0; p < n; ++p) ids[static_cast<size_t>(p)] = plan.slot_expert()[static_cast<size_t>(plan.expert_slots()[static_cast<size_t>(p)])];
      const RoutingPlan there = RoutingPlan::from_topk(ids.data(), ones.data(), n, n > 0 ? 1 : 0, single.num_experts());
      single.run_experts(rows.data(), there, r, 1);
      const auto outs = single.expert_rows(there, r);
      const auto home = single.expert_rows(plan, h);
      for (int64_t p = 0; p < n; ++p) {
        moekit::kernels::f32_to_bf16(outs.data() + there.slot_position()[static_cast<size_t>(p)] * d, tmp.data(), d);
        moekit::kernels::bf16_to_f32(tmp.data(), home.data() + p * d, d);
      }
      single.combine_outputs(Batch::single(T, d), x, plan, moekit::ActivationsOut::f32(exp.data()), h, 1);
      ASSERT_TRUE(same_bits(y.data(), exp.data(), y.size())) << what << ": rank " << me << " bf16 wire";
      double err = 0, ref = 0;
      for (size_t i = 0; i < y.size(); ++i) {
        err = std::max(err, std::abs(double(y[i]) - want[static_cast<size_t>(b * d) + i]));
        ref = std::max(ref, std::abs(double(want[static_cast<size_t>(b * d) + i])));
      }
      EXPECT_LE(err, 0.02 * ref + 1e-6) << what << ": bf16 wire far from the f32 result";
    }
  }
  // Every rank saw the same global loads and plan.
  const ep::Stats& s = layer.stats();
  int64_t kept = 0;
  for (int64_t v : s.expert_load) kept += v;
  int64_t computed = 0;
  for (int64_t v : s.rank_load) computed += v;
  EXPECT_EQ(kept, computed) << what;
  int64_t mine_rows = s.rows_computed;
  MPI_Allreduce(MPI_IN_PLACE, &mine_rows, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(mine_rows, kept) << what << ": rows computed over all ranks";
  EXPECT_EQ(s.rows_computed, s.rank_load[static_cast<size_t>(me)]) << what;
  if (stats_out != nullptr) *stats_out = s;
}

std::vector<ep::Placement> placements(int64_t E, int P) {
  std::vector<std::vector<int>> rep(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    rep[static_cast<size_t>(e)] = {static_cast<int>((e * 7) % P)};
    if (e % 2 == 0 && P > 1) rep[static_cast<size_t>(e)].push_back(static_cast<int>((e * 7 + 1) % P));
  }
  return {ep::Placement::round_robin(E, P), ep::Placement::contiguous(E, P), ep::Placement::table(rep, P)};
}

void check_preset(const std::string& name) {
  const int P = ranks();
  std::mt19937_64 g(1234 + name.size());
  moekit::LayerConfig c = moekit::preset_defaults(name);
  moekit::TopKOptions o = c.router;
  o.hidden = 32;
  if (o.num_experts > 32) o.num_experts = o.grouped() ? 32 : 16;
  o.k = std::min(o.k, o.num_experts);
  const int64_t E = o.num_experts, d = o.hidden;
  FfnShape shape = c.experts;
  shape.hidden = d;
  shape.intermediate = 40;
  const FfnBank full = random_bank(g, E, shape);
  const auto W = random_vec(g, static_cast<size_t>(E * d), 3.0 / std::sqrt(double(d)));
  const auto bias = c.router_bias ? random_vec(g, static_cast<size_t>(E), 0.1) : std::vector<float>{};
  const auto shared = random_shared(g, c, d);
  const moekit::TopKRouter router(o, W, bias);
  const moekit::SparseLayer<moekit::TopKRouter, FfnBank> single(router, full, shared);
  const Tokens tok = random_tokens(g, P, d, 70);
  int i = 0;
  for (const ep::Placement& pl : placements(E, P)) {
    for (const int micro : {1, 3}) {
      ep::Options opt;
      opt.micro_batches = micro;
      check(single, full, router, shared, tok, pl, opt, name + " placement " + std::to_string(i) + " micro " + std::to_string(micro));
    }
    ++i;
  }
  ep::Options b16;
  b16.wire = ep::Wire::bf16;
  check(single, full, router, shared, tok, ep::Placement::round_robin(E, P), b16, name + " bf16 wire");
}

TEST(EpMpi, Mixtral) { check_preset("mixtral"); }
TEST(EpMpi, Qwen2MoeSharedGated) { check_preset("qwen2_moe"); }
TEST(EpMpi, DeepseekV3GroupedBiasShared) { check_preset("deepseek_v3"); }

TEST(EpMpi, NearestCentroidFamily) {
  const int P = ranks();
  std::mt19937_64 g(77);
  const int64_t E = 6, d = 20;
  FfnShape shape;
  shape.hidden = d;
  shape.intermediate = 30;
  const FfnBank full = random_bank(g, E, shape);
  moekit::CentroidOptions co;
  co.num_experts = E;
  co.hidden = d;
  const moekit::CentroidRouter router(co, random_vec(g, static_cast<size_t>(E * d), 1.0));
  const moekit::SparseLayer<moekit::CentroidRouter, FfnBank> single(router, full);
  const Tokens tok = random_tokens(g, P, d, 50);
  for (const ep::Placement& pl : placements(E, P)) check(single, full, router, {}, tok, pl, {}, "centroid");
}

TEST(EpMpi, LlepShipsWeightsAndKeepsTheBits) {
  const int P = ranks();
  std::mt19937_64 g(99);
  const int64_t E = 8, d = 24;
  moekit::TopKOptions o;
  o.num_experts = E;
  o.k = 2;
  o.hidden = d;
  FfnShape shape;
  shape.hidden = d;
  shape.intermediate = 32;
  const FfnBank full = random_bank(g, E, shape);
  auto W = random_vec(g, static_cast<size_t>(E * d), 0.2 / std::sqrt(double(d)));
  // Expert 3 and 5 win for tokens along W[3] + W[5]: a Zipf-like hot pair on one or two ranks.
  std::vector<float> dir(static_cast<size_t>(d));
  for (int64_t j = 0; j < d; ++j) {
    W[static_cast<size_t>(3 * d + j)] = W[static_cast<size_t>(3 * d + j)] * 0.0f + 0.5f;
    W[static_cast<size_t>(5 * d + j)] = 0.45f;
    dir[static_cast<size_t>(j)] = 1.0f;
  }
  const moekit::TopKRouter router(o, W, {});
  const moekit::SparseLayer<moekit::TopKRouter, FfnBank> single(router, full);
  const Tokens tok = random_tokens(g, P, d, 120, 0.8, &dir);
  ep::Options opt;
  opt.balance = ep::Balance::llep;
  ep::Stats plain_stats, llep_stats;
  check(single, full, router, {}, tok, ep::Placement::round_robin(E, P), {}, "plain", &plain_stats);
  check(single, full, router, {}, tok, ep::Placement::round_robin(E, P), opt, "llep", &llep_stats);
  EXPECT_TRUE(llep_stats.rebalanced);
  int64_t plain_max = 0, llep_max = 0;
  for (int64_t v : plain_stats.rank_load) plain_max = std::max(plain_max, v);
  for (int64_t v : llep_stats.rank_load) llep_max = std::max(llep_max, v);
  EXPECT_LT(llep_max, plain_max);
  int64_t guests = llep_stats.guests;
  MPI_Allreduce(MPI_IN_PLACE, &guests, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_GT(guests, 0) << "LLEP should have shipped some expert weights";
  EXPECT_EQ(llep_stats.weight_bytes_sent, 0) << "the second call ships again what the first left resident";
  // One layer over a changing skew: skewed, uniform (guests dropped), skewed again (shipped
  // again): each call equal to the single-process layer.
  {
    const int me = rank();
    const ep::Placement pl = ep::Placement::round_robin(E, P);
    moekit::SparseLayer<moekit::TopKRouter, ep::ShardedFfnBank> mine(router, ep::ShardedFfnBank::from_full(full, pl.experts_of(me)));
    ep::ExpertParallelLayer<moekit::TopKRouter, ep::ShardedFfnBank> layer(std::move(mine), pl, ep::Comm(MPI_COMM_WORLD), opt);
    ep::EpWorkspace ews;
    const Tokens flat = random_tokens(g, P, d, 60);
    for (const Tokens* tk : {&tok, &flat, &tok}) {
      std::vector<float> want(tk->all.size());
      Workspace ws;
      single.forward(Batch::single(tk->total(), d), tk->all.data(), want.data(), ws, 1);
      const int64_t T = tk->counts[static_cast<size_t>(me)], b = tk->begin(me);
      std::vector<float> y(static_cast<size_t>(T * d));
      layer.forward(Batch::single(T, d), tk->all.data() + b * d, y.data(), ews, 1);
      ASSERT_TRUE(same_bits(y.data(), want.data() + b * d, y.size())) << "changing skew, rank " << me;
      if (tk == &flat) EXPECT_EQ(layer.layer().experts().num_guests(), layer.stats().guests);
    }
    layer.release_guests();
    EXPECT_EQ(layer.layer().experts().num_guests(), 0);
  }
  opt.llep.max_guests = 1;  // the memory bound
  opt.micro_batches = 2;
  check(single, full, router, {}, tok, ep::Placement::round_robin(E, P), opt, "llep bounded", &llep_stats);
  EXPECT_LE(llep_stats.guests, 1);
}

TEST(EpMpi, AnErrorOnOneRankThrowsOnEveryRank) {
  const int P = ranks(), me = rank();
  std::mt19937_64 g(5);
  const int64_t E = 4, d = 8;
  moekit::TopKOptions o;
  o.num_experts = E;
  o.k = 2;
  o.hidden = d;
  FfnShape shape;
  shape.hidden = d;
  shape.intermediate = 8;
  const FfnBank full = random_bank(g, E, shape);
  const ep::Placement pl = ep::Placement::round_robin(E, P);
  moekit::SparseLayer<moekit::TopKRouter, ep::ShardedFfnBank> mine(
      moekit::TopKRouter(o, random_vec(g, static_cast<size_t>(E * d), 0.5), {}), ep::ShardedFfnBank::from_full(full, pl.experts_of(me)));
  ep::ExpertParallelLayer<moekit::TopKRouter, ep::ShardedFfnBank> layer(std::move(mine), pl, ep::Comm(MPI_COMM_WORLD));
  std::vector<float> x = random_vec(g, static_cast<size_t>(5 * d), 1.0), y(x.size());
  if (me == P - 1) x[3] = std::nanf("");
  ep::EpWorkspace ws;
  try {
    layer.forward(Batch::single(5, d), x.data(), y.data(), ws, 1);
    ADD_FAILURE() << "rank " << me << " did not throw";
  } catch (const moekit::error& e) {
    const std::string msg = e.what();
    if (me == P - 1) {
      EXPECT_NE(msg.find("expected finite"), std::string::npos) << msg;
    } else {
      EXPECT_NE(msg.find("rank " + std::to_string(P - 1) + " failed"), std::string::npos) << msg;
    }
  }
  // And the layer still works afterwards (no collective left half done).
  x[3] = 0.5f;
  layer.forward(Batch::single(5, d), x.data(), y.data(), ws, 1);
  // Mismatched setups are refused before any communication.
  EXPECT_THROW((ep::ExpertParallelLayer<moekit::TopKRouter, ep::ShardedFfnBank>(
                   moekit::SparseLayer<moekit::TopKRouter, ep::ShardedFfnBank>(
                       moekit::TopKRouter(o, random_vec(g, static_cast<size_t>(E * d), 0.5), {}),
                       ep::ShardedFfnBank::from_full(full, {0, 1, 2, 3})),
                   pl, ep::Comm(MPI_COMM_WORLD))),
               moekit::error);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  testing::InitGoogleTest(&argc, argv);
  if (rank() != 0) delete testing::UnitTest::GetInstance()->listeners().Release(
                        testing::UnitTest::GetInstance()->listeners().default_result_printer());
  int failed = RUN_ALL_TESTS();
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (failed && rank() == 0) std::fprintf(stderr, "moekit ep tests: a rank failed (run with --gtest_output to see each)\n");
  MPI_Finalize();
  return failed;
}
