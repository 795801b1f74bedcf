// SPDX-License-Identifier: Apache-2.0
// Performance-issue scenarios: (1) skewed routing (Zipf expert popularity) against uniform
// routing on the same layer, showing the (expert, row block) split keeps both cores busy;
// (2) a sweep over E in {8, 64, 256} at fixed (k, d, f) and T, for the roofline model;
// (3) a plain per-expert loop on Eigen as the baseline, timed in the same run as moekit.
// Plans are built by hand (RoutingPlan API) so the routing pattern is exactly the one named.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/layer.hpp"

namespace moekit_bench {
namespace {

using Clock = std::chrono::steady_clock;

moekit::LayerConfig config_of(int64_t E, int64_t k, int64_t d, int64_t f) { return sized_config("olmoe", E, k, d, f); }

// One layer alive at a time (the E = 256 one holds 1.6 GB).
moekit::TopKLayer& layer_for(int64_t E, int64_t k, int64_t d, int64_t f) {
  static std::unique_ptr<moekit::TopKLayer> layer;
  static std::vector<int64_t> key;
  const std::vector<int64_t> want = {E, k, d, f};
  if (!layer || key != want) {
    layer.reset();
    layer = std::make_unique<moekit::TopKLayer>(moekit::random_layer(config_of(E, k, d, f), 17));
    key = want;
  }
  return *layer;
}

// Each token picks k distinct experts, drawn with probability proportional to
// 1 / (rank + 1)^s over a fixed random permutation (s = 0: uniform); weight 1/k.
void make_plan(moekit::RoutingPlan& plan, int64_t T, int64_t E, int64_t k, double s, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<int32_t> perm(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) perm[static_cast<size_t>(e)] = static_cast<int32_t>(e);
  std::shuffle(perm.begin(), perm.end(), g);
  std::vector<double> w(static_cast<size_t>(E));
  for (int64_t r = 0; r < E; ++r) w[static_cast<size_t>(r)] = 1.0 / std::pow(static_cast<double>(r + 1), s);
  plan.reset(T, E, [&](int64_t) { return k; });
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> ww = w;
    auto ids = plan.token_experts(t);
    auto wts = plan.token_weights(t);
    for (int64_t j = 0; j < k; ++j) {
      std::discrete_distribution<int64_t> pick(ww.begin(), ww.end());
      const int64_t r = pick(g);
      ww[static_cast<size_t>(r)] = 0.0;
      ids[static_cast<size_t>(j)] = perm[static_cast<size_t>(r)];
      wts[static_cast<size_t>(j)] = 1.0f / static_cast<float>(k);
    }
  }
  plan.finalize();
}

std::vector<float> inputs(int64_t T, int64_t d) {
  std::mt19937 g(3);
  std::normal_distribution<float> n;
  std::vector<float> x(static_cast<size_t>(T * d));
  for (float& v : x) v = n(g);
  return x;
}

// forward_plan of a fixed plan: GFLOP/s of the expert work, GB/s of distinct expert weights,
// the share of slots on the 4 most loaded experts.
void run_plan(benchmark::State& state, int64_t E, int64_t k, int64_t d, int64_t f, int64_t T, double s) {
  auto& layer = layer_for(E, k, d, f);
  moekit::RoutingPlan plan;
  make_plan(plan, T, E, k, s, 11);
  const auto x = inputs(T, d);
  std::vector<float> y(x.size());
  moekit::Workspace ws;
  const moekit::Batch b = moekit::Batch::single(T, d);
  layer.forward_plan(b, x.data(), plan, y.data(), ws, bench_threads());
  for (auto _ : state) {
    layer.forward_plan(b, x.data(), plan, y.data(), ws, bench_threads());
    benchmark::DoNotOptimize(y.data());
  }
  std::vector<int64_t> load(static_cast<size_t>(E));
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += (load[static_cast<size_t>(e)] = plan.kept_of(e)) > 0;
  std::sort(load.rbegin(), load.rend());
  int64_t top4 = 0;
  for (int64_t i = 0; i < std::min<int64_t>(4, E); ++i) top4 += load[static_cast<size_t>(i)];
  const double it = static_cast<double>(state.iterations());
  const double flops = static_cast<double>(plan.num_kept()) * layer.experts().flops_per_row();
  const double bytes = static_cast<double>(active) * layer.experts().weight_bytes_per_expert();
  state.counters["GFLOP/s"] = benchmark::Counter(flops * it * 1e-9, benchmark::Counter::kIsRate);
  state.counters["GB/s"] = benchmark::Counter(bytes * it * 1e-9, benchmark::Counter::kIsRate);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(T) * it, benchmark::Counter::kIsRate);
  state.counters["experts_read"] = static_cast<double>(active);
  state.counters["top4_share"] = static_cast<double>(top4) / static_cast<double>(std::max<int64_t>(1, plan.num_kept()));
}

// The baseline: the loop people write first. Per expert, gather its tokens, three Eigen
// GEMMs on HF-layout weights (gate, up, down), SiLU * up, weighted scatter-add. Same plan,
// same weights, single Eigen thread per expert with OpenMP across experts.
struct EigenExperts {
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::vector<M> gate, up, down;
};

void run_eigen_baseline(benchmark::State& state, int64_t E, int64_t k, int64_t d, int64_t f, int64_t T) {
  auto& layer = layer_for(E, k, d, f);
  EigenExperts w;
  for (int64_t e = 0; e < E; ++e) {
    w.gate.emplace_back(f, d);
    w.up.emplace_back(f, d);
    w.down.emplace_back(d, f);
    layer.experts().get_expert(e, w.gate.back().data(), w.up.back().data(), w.down.back().data());
  }
  moekit::RoutingPlan plan;
  make_plan(plan, T, E, k, 0.0, 11);
  const auto x = inputs(T, d);
  std::vector<float> y(x.size()), ref(x.size());
  const int nt = bench_threads();
  auto forward = [&] {
    std::fill(y.begin(), y.end(), 0.0f);
    std::vector<EigenExperts::M> outs(static_cast<size_t>(E));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = plan.kept_of(e);
      if (n == 0) continue;
      EigenExperts::M xe(n, d);
      const int32_t b = plan.expert_offsets()[static_cast<size_t>(e)];
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < d; ++c) xe(i, c) = x[static_cast<size_t>(plan.expert_tokens()[static_cast<size_t>(b + i)] * d + c)];
      EigenExperts::M g = xe * w.gate[static_cast<size_t>(e)].transpose();
      EigenExperts::M u = xe * w.up[static_cast<size_t>(e)].transpose();
      g = (g.array() / (1.0f + (-g.array()).exp()) * u.array()).matrix();
      outs[static_cast<size_t>(e)] = g * w.down[static_cast<size_t>(e)].transpose();
    }
    for (int64_t e = 0; e < E; ++e) {
      const int32_t b = plan.expert_offsets()[static_cast<size_t>(e)];
      for (int64_t i = 0; i < plan.kept_of(e); ++i) {
        const int32_t slot = plan.expert_slots()[static_cast<size_t>(b + i)];
        const int32_t t = plan.slot_token()[static_cast<size_t>(slot)];
        const float wt = plan.slot_weight()[static_cast<size_t>(slot)];
        for (int64_t c = 0; c < d; ++c) y[static_cast<size_t>(t * d + c)] += wt * outs[static_cast<size_t>(e)](i, c);
      }
    }
  };
  // Check against moekit once, then time the baseline; moekit's time on the same plan
  // is measured in the same process right after, so the counter is a same-run ratio.
  moekit::Workspace ws;
  const moekit::Batch bt = moekit::Batch::single(T, d);
  layer.forward_plan(bt, x.data(), plan, ref.data(), ws, nt);
  forward();
  double mx = 0, err = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    mx = std::max(mx, static_cast<double>(std::fabs(ref[i])));
    err = std::max(err, static_cast<double>(std::fabs(ref[i] - y[i])));
  }
  if (!(mx > 0) || err > 1e-3 * mx) {
    state.SkipWithError("eigen baseline disagrees with moekit");
    return;
  }
  double base = 1e300, ours = 1e300;
  for (auto _ : state) {
    auto t0 = Clock::now();
    forward();
    base = std::min(base, std::chrono::duration<double>(Clock::now() - t0).count());
    t0 = Clock::now();
    layer.forward_plan(bt, x.data(), plan, ref.data(), ws, nt);
    ours = std::min(ours, std::chrono::duration<double>(Clock::now() - t0).count());
    state.SetIterationTime(base);
  }
  const double flops = static_cast<double>(plan.num_kept()) * layer.experts().flops_per_row();
  state.counters["baseline_GFLOP/s"] = flops / base * 1e-9;
  state.counters["moekit_GFLOP/s"] = flops / ours * 1e-9;
  state.counters["speedup"] = base / ours;
}

void register_all() {
  const std::string th = "/threads:" + std::to_string(bench_threads());
  for (double s : {0.0, 1.2}) {
    const std::string kind = s == 0.0 ? "uniform" : "zipf";
    for (auto [E, k, d, f] : {std::array<int64_t, 4>{8, 2, 1024, 2816}, std::array<int64_t, 4>{64, 8, 1024, 1408}}) {
      const std::string name = "skew/" + kind + "/E:" + std::to_string(E) + "/k:" + std::to_string(k) + "/d:" + std::to_string(d) +
                               "/f:" + std::to_string(f) + "/T:512" + th;
      benchmark::RegisterBenchmark(name.c_str(), run_plan, E, k, d, f, int64_t{512}, s)
          ->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(3);
    }
  }
  for (int64_t E : {8, 64, 256})
    for (int64_t T : {1, 16, 128, 512, 2048}) {
      const std::string name = "sweep/uniform/E:" + std::to_string(E) + "/k:8/d:1024/f:512/T:" + std::to_string(T) + th;
      auto* b = benchmark::RegisterBenchmark(name.c_str(), run_plan, E, int64_t{8}, int64_t{1024}, int64_t{512}, T, 0.0);
      b->UseRealTime()->Unit(benchmark::kMillisecond);
      if (T >= 512) b->Iterations(3);
      else b->MinTime(0.2);
    }
  for (auto [E, k, d, f] : {std::array<int64_t, 4>{8, 2, 1024, 2816}, std::array<int64_t, 4>{64, 8, 1024, 1408}}) {
    const std::string name = "baseline/eigen_loop/E:" + std::to_string(E) + "/k:" + std::to_string(k) + "/d:" + std::to_string(d) +
                             "/f:" + std::to_string(f) + "/T:512" + th;
    benchmark::RegisterBenchmark(name.c_str(), run_eigen_baseline, E, k, d, f, int64_t{512})
        ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
  }
}

const int registered = (register_all(), 0);

}  // namespace
}  // namespace moekit_bench
