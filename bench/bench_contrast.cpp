// SPDX-License-Identifier: Apache-2.0
// Self-contrast (SCMoE): SparseLayer::forward_contrast (one routing, one expert pass, two
// combines) against what an engine does without it: forward() for the strong output, then
// forward_plan() with the weak plan (each token's rank-2 expert alone, weight 1) for the weak
// one. Mixtral-like shape (E = 8, k = 2, d = 1024, f = 2816, f32 experts). Reported: the
// contrast time (the benchmark's time), `two_pass_ms` and `speedup` = two_pass / contrast.
// The weak outputs of both ways are checked equal before timing.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "moekit/io/model.hpp"
#include "moekit/layer.hpp"

namespace moekit_bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kE = 8, kK = 2, kD = 1024, kF = 2816, kRank = 2;
constexpr int64_t kTokens[] = {16, 512};

std::unique_ptr<moekit::TopKLayer>& cached() {
  static std::unique_ptr<moekit::TopKLayer> l;
  return l;
}

void run(benchmark::State& state, int64_t T) {
  try {
    if (!cached()) {
      moekit::LayerConfig c = sized_config("mixtral", kE, kK, kD, kF);
      cached() = std::make_unique<moekit::TopKLayer>(moekit::random_layer(c, 2405));
    }
    const moekit::TopKLayer& L = *cached();
    const int threads = bench_threads();
    const moekit::Batch batch = moekit::Batch::single(T, kD);
    std::vector<float> x(static_cast<size_t>(T * kD));
    uint64_t s = 7;
    for (float& v : x) {
      s += 0x9E3779B97F4A7C15ull;
      v = static_cast<float>(static_cast<double>(moekit::detail::splitmix64(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
    }
    std::vector<float> strong(x.size()), weak(x.size()), strong2(x.size()), weak2(x.size());
    moekit::Workspace ws, ws2;
    std::vector<int32_t> ids(static_cast<size_t>(T));
    std::vector<float> ones(static_cast<size_t>(T), 1.0f);
    moekit::RoutingPlan weak_plan;
    auto two_pass = [&] {
      L.forward(batch, x.data(), strong2.data(), ws2, threads);
      for (int64_t t = 0; t < T; ++t) ids[static_cast<size_t>(t)] = ws2.plan.slot_expert()[static_cast<size_t>(t * kK + kRank - 1)];
      weak_plan.assign_topk(ids.data(), ones.data(), T, 1, kE);
      L.forward_plan(batch, x.data(), weak_plan, weak2.data(), ws2, threads);
    };
    L.forward_contrast(batch, x.data(), strong.data(), weak.data(), kRank, ws, threads);
    two_pass();
    for (size_t i = 0; i < weak.size(); ++i)
      if (std::fabs(weak[i] - weak2[i]) > 1e-4f * (1.0f + std::fabs(weak2[i]))) {
        state.SkipWithError("forward_contrast's weak output differs from the two-pass one");
        return;
      }
    double c_min = 1e300, two_min = 1e300;
    for (auto _ : state) {
      const auto c0 = Clock::now();
      L.forward_contrast(batch, x.data(), strong.data(), weak.data(), kRank, ws, threads);
      benchmark::DoNotOptimize(weak.data());
      const auto c1 = Clock::now();
      two_pass();
      benchmark::DoNotOptimize(weak2.data());
      const double dt = std::chrono::duration<double>(c1 - c0).count();
      state.SetIterationTime(dt);
      c_min = std::min(c_min, dt);
      two_min = std::min(two_min, std::chrono::duration<double>(Clock::now() - c1).count());
    }
    state.counters["two_pass_ms"] = two_min * 1e3;
    state.counters["speedup"] = two_min / c_min;
    state.counters["threads"] = threads;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
  if (T == kTokens[std::size(kTokens) - 1]) cached().reset();
}

void register_contrast_benchmarks() {
  for (int64_t T : kTokens) {
    const std::string name = "contrast/scmoe_rank2_vs_two_passes/E:8/k:2/d:1024/f:2816/T:" + std::to_string(T);
    benchmark::RegisterBenchmark(name.c_str(), run, T)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
  }
}

}  // namespace

[[maybe_unused]] static const int registered_contrast = (register_contrast_benchmarks(), 0);

}  // namespace moekit_bench
