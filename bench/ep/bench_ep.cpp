// SPDX-License-Identifier: Apache-2.0
// bench/ep: expert parallelism over MPI on one machine (docs/scale-out.md). Run under
// `mpirun -np P` (scripts/bench_ep.sh runs P = 2 and 4). For uniform and Zipf-skewed routing,
// with and without LLEP, one and four micro-batches, f32 and bf16 rows on the wire, it prints
// one JSON line per configuration (rank 0): tokens/s of the expert-parallel layer and of one
// process on the same tokens in the same run, the max / mean rank load, bytes exchanged per
// token, and where the time went (max over ranks). Then "projection" lines: the max / mean load
// of the plain and the LLEP plan at 8 to 256 ranks for the same routing (the planner is a pure
// function), and the bytes per token at that many ranks, which bench/ep_model.py turns into a
// time per layer for a cluster's network.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_common.hpp"
#include "moekit/ep/layer.hpp"
#include "moekit/io/model.hpp"

namespace {

namespace ep = moekit::ep;
using json = nlohmann::json;

// Top-k by a Zipf law over expert ids (expert e drawn with weight 1 / (e + 1)^s; s = 0 is
// uniform), k distinct experts per token, weights 1 / k. Decided from the token's own values,
// so a token routes the same on any rank.
class ZipfRouter {
 public:
  ZipfRouter(int64_t E, int64_t k, int64_t d, double s) : E_(E), k_(k), d_(d), cdf_(static_cast<size_t>(E)) {
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) cdf_[static_cast<size_t>(e)] = sum += 1.0 / std::pow(double(e + 1), s);
    for (double& c : cdf_) c /= sum;
  }
  [[nodiscard]] int64_t num_experts() const noexcept { return E_; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return d_; }
  void route(const moekit::Batch& batch, const float* x, moekit::RoutingPlan& plan, moekit::RouterScratch&, int) const {
    plan.reset(batch.tokens, E_, [&](int64_t t) { return batch.is_padding(t) ? 0 : k_; });
    for (int64_t t = 0; t < batch.tokens; ++t) {
      if (batch.is_padding(t)) continue;
      uint64_t seed = 0;
      std::memcpy(&seed, x + t * d_, sizeof seed);
      std::mt19937_64 g(seed);
      std::uniform_real_distribution<double> u(0.0, 1.0);
      auto ex = plan.token_experts(t);
      auto w = plan.token_weights(t);
      for (int64_t j = 0; j < k_;) {
        const auto e = static_cast<int32_t>(std::lower_bound(cdf_.begin(), cdf_.end(), u(g)) - cdf_.begin());
        const int32_t c = std::min<int32_t>(e, static_cast<int32_t>(E_ - 1));
        if (std::find(ex.begin(), ex.begin() + j, c) != ex.begin() + j) continue;
        ex[static_cast<size_t>(j)] = c;
        w[static_cast<size_t>(j++)] = 1.0f / static_cast<float>(k_);
      }
    }
    plan.finalize();
  }

 private:
  int64_t E_, k_, d_;
  std::vector<double> cdf_;
};

int64_t arg(int argc, char** argv, const char* name, int64_t def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::atoll(argv[i + 1]);
  return def;
}

// A barrier that sleeps while it waits (MPI's blocking waits spin and would take a core from
// the rank that measures).
void quiet_barrier() {
  MPI_Request req;
  MPI_Ibarrier(MPI_COMM_WORLD, &req);
  for (int done = 0; !done;) {
    MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (!done) {
      const timespec ts{0, 1000000};
      nanosleep(&ts, nullptr);
    }
  }
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const ep::Comm comm(MPI_COMM_WORLD);
  const int P = comm.size(), me = comm.rank();
  const int64_t E = arg(argc, argv, "--experts", 16), k = arg(argc, argv, "--k", 2), d = arg(argc, argv, "--hidden", 1024),
                f = arg(argc, argv, "--ffn", 1408), T = arg(argc, argv, "--tokens", 256), reps = arg(argc, argv, "--repeat", 5);
  const int threads = static_cast<int>(arg(argc, argv, "--threads", 1));
  if (E < P || k < 1 || k > E || d < 8 || f < 1 || T < 1 || reps < 1 || threads < 1) {
    if (me == 0) std::fprintf(stderr, "bench_ep: bad sizes (need E >= ranks, 1 <= k <= E, d >= 8, T, repeat, threads >= 1)\n");
    MPI_Finalize();
    return 2;
  }
  // One random bf16 x bf16 layer (the same on every rank); each rank keeps its contiguous shard.
  moekit::LayerConfig cfg = moekit_bench::sized_config("mixtral", E, k, d, f);
  cfg.pack.type = moekit::kernels::WeightType::bf16;
  cfg.pack.bf16_activations = true;
  const moekit::TopKLayer full = moekit::random_layer(cfg, 7);
  const ep::Placement placement = ep::Placement::contiguous(E, P);
  // This rank's tokens, and everyone's for the one-process peer on rank 0.
  std::mt19937_64 g(1000);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  std::vector<float> all(static_cast<size_t>(P * T * d));
  for (float& v : all) v = n01(g);
  const float* mine = all.data() + static_cast<int64_t>(me) * T * d;
  std::vector<float> y(static_cast<size_t>(T * d)), y_all(all.size());

  for (const double s : {0.0, 1.2}) {
    const ZipfRouter router(E, k, d, s);
    // The one-process peer: all P * T tokens, the full bank, the same thread count per rank.
    double single = 0;
    if (me == 0) {
      const moekit::SparseLayer<ZipfRouter, moekit::FfnBank> one(router, full.experts());
      moekit::Workspace ws;
      std::vector<double> ts;
      for (int64_t r = 0; r <= reps; ++r) {
        const double t0 = now();
        one.forward(moekit::Batch::single(P * T, d), all.data(), y_all.data(), ws, threads * P);
        if (r > 0) ts.push_back(now() - t0);
      }
      std::sort(ts.begin(), ts.end());
      single = ts[ts.size() / 2];
    }
    quiet_barrier();  // the other ranks sleep meanwhile: a spinning MPI wait would take a core
    MPI_Bcast(&single, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    std::vector<int64_t> loads;
    for (const ep::Balance balance : {ep::Balance::none, ep::Balance::llep})
      for (const int micro : {1, 4})
        for (const ep::Wire wire : {ep::Wire::f32, ep::Wire::bf16}) {
          ep::Options opt;
          opt.balance = balance;
          opt.micro_batches = micro;
          opt.wire = wire;
          moekit::SparseLayer<ZipfRouter, ep::ShardedFfnBank> shard(
              router, ep::ShardedFfnBank::from_full(full.experts(), placement.experts_of(me)));
          ep::ExpertParallelLayer<ZipfRouter, ep::ShardedFfnBank> layer(std::move(shard), placement, comm, opt);
          ep::EpWorkspace ws;
          std::vector<double> ts;
          double split[4] = {0, 0, 0, 0};
          for (int64_t r = 0; r <= reps; ++r) {
            MPI_Barrier(MPI_COMM_WORLD);
            const double t0 = now();
            layer.forward(moekit::Batch::single(T, d), mine, y.data(), ws, threads);
            const double t = comm.max(now() - t0);
            if (r == 0) continue;  // warm-up
            ts.push_back(t);
            const ep::Stats& st = layer.stats();
            split[0] += comm.max(st.seconds_route) / double(reps);
            split[1] += comm.max(st.seconds_exchange) / double(reps);
            split[2] += comm.max(st.seconds_experts) / double(reps);
            split[3] += comm.max(st.seconds_combine) / double(reps);
          }
          std::sort(ts.begin(), ts.end());
          const ep::Stats& st = layer.stats();
          loads = st.expert_load;
          std::vector<int64_t> bytes = {st.bytes_sent, st.rows_computed};
          comm.sum(bytes);
          int64_t max_load = 0, sum_load = 0;
          for (int64_t v : st.rank_load) {
            max_load = std::max(max_load, v);
            sum_load += v;
          }
          // Rows per second of the experts on the rank that computed the most.
          const double rows_per_s = split[2] > 0 ? static_cast<double>(max_load) / split[2] : 0.0;
          const double t = ts[ts.size() / 2];
          if (me == 0) {
            const json j = {{"ranks", P}, {"routing", s == 0.0 ? "uniform" : "zipf"}, {"zipf_s", s},
                            {"balance", balance == ep::Balance::llep ? "llep" : "none"}, {"micro_batches", micro},
                            {"wire", wire == ep::Wire::bf16 ? "bf16" : "f32"}, {"tokens_per_rank", T}, {"E", E}, {"k", k},
                            {"d", d}, {"f", f}, {"dtype", "bf16xbf16"}, {"threads_per_rank", threads},
                            {"ms", t * 1e3}, {"tokens_per_s", double(P * T) / t},
                            {"one_process_tokens_per_s", double(P * T) / single},
                            {"max_over_mean_load", sum_load > 0 ? double(max_load) * P / double(sum_load) : 0.0},
                            {"rebalanced", st.rebalanced},
                            {"bytes_per_token", double(bytes[0]) / double(P * T)},
                            {"expert_rows_per_s_busiest_rank", rows_per_s},
                            {"ms_route", split[0] * 1e3}, {"ms_exchange", split[1] * 1e3},
                            {"ms_experts", split[2] * 1e3}, {"ms_combine", split[3] * 1e3}};
            std::printf("%s\n", j.dump().c_str());
            std::fflush(stdout);
          }
        }
    // Projection: the same routing at more ranks (the loads of 16 384 routed tokens), the plain
    // and the LLEP plan's max / mean load, and the bytes per token a rank's rows cost on the
    // wire (dispatch + combine, f32 and bf16; every slot whose expert lives elsewhere,
    // (Q - 1) / Q of them when experts spread evenly).
    if (me == 0) {
      const int64_t N = 16384;  // (the other ranks wait in the quiet barrier below)
      std::vector<float> xs(static_cast<size_t>(N * d));
      for (int64_t t = 0; t < N; ++t) xs[static_cast<size_t>(t * d)] = n01(g), xs[static_cast<size_t>(t * d + 1)] = n01(g);
      moekit::RoutingPlan plan;
      moekit::RouterScratch scratch;
      router.route(moekit::Batch::single(N, d), xs.data(), plan, scratch, 1);
      loads.assign(static_cast<size_t>(E), 0);
      for (int64_t e = 0; e < E; ++e) loads[static_cast<size_t>(e)] = plan.kept_of(e);
      for (const int Q : {8, 16, 32, 64, 128, 256}) {
        // Q <= E: contiguous blocks; Q > E: each expert on Q / E ranks (replicas share its rows).
        std::vector<std::vector<int>> owners(static_cast<size_t>(E));
        if (Q <= E) {
          for (int r = 0; r < Q; ++r)
            for (int64_t e = E * r / Q; e < E * (r + 1) / Q; ++e) owners[static_cast<size_t>(e)].push_back(r);
        } else {
          for (int64_t e = 0; e < E; ++e)
            for (int64_t r = Q * e / E; r < Q * (e + 1) / E; ++r) owners[static_cast<size_t>(e)].push_back(static_cast<int>(r));
        }
        const ep::Placement pq = ep::Placement::table(owners, Q);
        const ep::DispatchPlan plain = ep::plain_plan(loads, pq), llep = ep::llep_plan(loads, pq);
        const double leave = double(Q - 1) / double(Q);
        const json j = {{"projection", true}, {"ranks", Q}, {"routing", s == 0.0 ? "uniform" : "zipf"}, {"zipf_s", s},
                        {"E", E}, {"k", k}, {"d", d},
                        {"max_over_mean_plain", plain.max_load() / std::max(plain.mean_load(), 1e-9)},
                        {"max_over_mean_llep", llep.max_load() / std::max(llep.mean_load(), 1e-9)},
                        {"bytes_per_token_f32", 2.0 * double(k) * leave * double(d) * 4.0},
                        {"bytes_per_token_bf16", 2.0 * double(k) * leave * double(d) * 2.0}};
        std::printf("%s\n", j.dump().c_str());
      }
      std::fflush(stdout);
    }
    quiet_barrier();
  }
  MPI_Finalize();
  return 0;
}
