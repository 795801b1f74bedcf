// SPDX-License-Identifier: Apache-2.0
// Expert parallelism over MPI (docs/scale-out.md): run with `mpirun -np 2 example_expert_parallel`
// (as root: add --allow-run-as-root). Every rank builds the same random Mixtral-shaped layer,
// keeps its contiguous shard of the experts, and runs its own tokens through
// moekit::ep::ExpertParallelLayer, with least-loaded rebalancing on. Rank 0 checks the result
// against one process on all the tokens (bit for bit) and exits non-zero if it differs.
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "moekit/ep/layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  try {
    moekit::ep::Comm comm(MPI_COMM_WORLD);
    const int me = comm.rank(), P = comm.size();
    // A small Mixtral-style layer with random weights (the same seed on every rank).
    moekit::LayerConfig cfg = moekit::preset_defaults("mixtral");
    cfg.router.num_experts = 8;
    cfg.router.hidden = cfg.experts.hidden = 256;
    cfg.experts.intermediate = 512;
    const moekit::TopKLayer full = moekit::random_layer(cfg, 42);
    const int64_t d = full.hidden_size(), T = 64;  // tokens per rank

    // This rank's shard: the experts the placement gives it, by their global ids.
    const auto placement = moekit::ep::Placement::contiguous(full.num_experts(), P);
    moekit::SparseLayer<moekit::TopKRouter, moekit::ep::ShardedFfnBank> mine(
        full.router(), moekit::ep::ShardedFfnBank::from_full(full.experts(), placement.experts_of(me)),
        full.shared_experts());
    moekit::ep::Options opt;
    opt.balance = moekit::ep::Balance::llep;
    moekit::ep::ExpertParallelLayer layer(std::move(mine), placement, comm, opt);

    // Every rank's tokens (rank r owns rows [r T, (r + 1) T)).
    std::mt19937 g(7);
    std::normal_distribution<float> n(0.0f, 1.0f);
    std::vector<float> all(static_cast<size_t>(P * T * d)), y(static_cast<size_t>(T * d));
    for (float& v : all) v = n(g);
    moekit::ep::EpWorkspace ws;
    layer.forward(moekit::Batch::single(T, d), all.data() + me * T * d, y.data(), ws, 1);

    // One process on all the tokens, compared on each rank's slice.
    std::vector<float> want(all.size());
    moekit::Workspace w1;
    full.forward(moekit::Batch::single(P * T, d), all.data(), want.data(), w1, 1);
    const bool same = y.empty() || std::memcmp(y.data(), want.data() + me * T * d, y.size() * sizeof(float)) == 0;
    if (!comm.all(same)) status = 1;
    if (me == 0)
      std::printf("expert_parallel: %d ranks, %lld tokens each, rank loads max/mean %.2f%s: %s\n", P,
                  static_cast<long long>(T), layer.stats().rank_load.empty() ? 0.0 : [&] {
                    int64_t mx = 0, sum = 0;
                    for (int64_t v : layer.stats().rank_load) mx = std::max(mx, v), sum += v;
                    return sum > 0 ? double(mx) * P / double(sum) : 0.0;
                  }(),
                  layer.stats().rebalanced ? " (LLEP rebalanced)" : "",
                  status == 0 ? "equal to one process bit for bit" : "DIFFERS from one process");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "expert_parallel: %s\n", e.what());
    status = 2;
  }
  MPI_Finalize();
  return status;
}
