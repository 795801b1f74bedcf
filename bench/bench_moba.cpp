// SPDX-License-Identifier: Apache-2.0
// MoBA block attention routing (attention/moba.hpp) against dense causal attention on the
// same kernels, at 8k-32k tokens: 2 heads of d = 128, blocks of 512 keys, top-3 (the MoBA
// paper's short-context setting). Each iteration times moba_forward (gate + block-sparse
// attention: the benchmark's time) and causal_attention; reported: `dense_ms`, `speedup`
// (dense / MoBA, minima of the same run), `gate_ms` (the gate alone), `key_fraction` (keys
// attended / causal keys) and both GFLOP/s (2 matmuls of 2 d flops per attended key).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "moekit/attention/moba.hpp"

namespace moekit_bench {
namespace {

namespace ma = moekit::attention;
using Clock = std::chrono::steady_clock;
constexpr int64_t kHeads = 2, kDim = 128, kBlock = 512, kTopK = 3;
constexpr int64_t kTokens[] = {8192, 16384, 32768};

std::vector<float> random(size_t n, uint64_t seed, double a) {
  std::vector<float> v(n);
  for (float& x : v) {
    seed += 0x9E3779B97F4A7C15ull;
    x = static_cast<float>((static_cast<double>(moekit::detail::splitmix64(seed) >> 11) * (2.0 / 9007199254740992.0) - 1.0) * a);
  }
  return v;
}

void run(benchmark::State& state, int64_t T) {
  try {
    const int threads = bench_threads();
    const ma::AttentionShape shape{T, kHeads, kHeads, kDim};
    const ma::MobaOptions opt{kBlock, kTopK, 0.0f};
    const size_t n = static_cast<size_t>(T * kHeads * kDim);
    const std::vector<float> q = random(n, 1, 1.0), k = random(n, 2, 1.0), v = random(n, 3, 1.0);
    std::vector<float> out(n), dense(n);
    ma::MobaPlan plan;
    ma::MobaWorkspace ws, ws_dense;
    ma::moba_forward(shape, q.data(), k.data(), v.data(), {}, opt, plan, out.data(), ws, threads);
    double m_min = 1e300, d_min = 1e300, g_min = 1e300;
    for (auto _ : state) {
      const auto t0 = Clock::now();
      ma::moba_forward(shape, q.data(), k.data(), v.data(), {}, opt, plan, out.data(), ws, threads);
      benchmark::DoNotOptimize(out.data());
      const auto t1 = Clock::now();
      ma::causal_attention(shape, q.data(), k.data(), v.data(), {}, opt, dense.data(), ws_dense, threads);
      benchmark::DoNotOptimize(dense.data());
      const auto t2 = Clock::now();
      ma::moba_gate(shape, q.data(), k.data(), {}, opt, plan, ws, threads);
      const auto t3 = Clock::now();
      const double dt = std::chrono::duration<double>(t1 - t0).count();
      state.SetIterationTime(dt);
      m_min = std::min(m_min, dt);
      d_min = std::min(d_min, std::chrono::duration<double>(t2 - t1).count());
      g_min = std::min(g_min, std::chrono::duration<double>(t3 - t2).count());
    }
    const double flops_per_key = 4.0 * kDim;
    state.counters["dense_ms"] = d_min * 1e3;
    state.counters["gate_ms"] = g_min * 1e3;
    state.counters["speedup"] = d_min / m_min;
    state.counters["key_fraction"] = static_cast<double>(plan.keys_attended()) / static_cast<double>(plan.causal_keys());
    state.counters["moba_GFLOPs"] = flops_per_key * static_cast<double>(plan.keys_attended()) / m_min * 1e-9;
    state.counters["dense_GFLOPs"] = flops_per_key * static_cast<double>(plan.causal_keys()) / d_min * 1e-9;
    state.counters["threads"] = threads;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void register_moba_benchmarks() {
  for (int64_t T : kTokens) {
    const std::string name = "moba/block512_top3_vs_dense_causal/H:2/d:128/T:" + std::to_string(T);
    auto* b = benchmark::RegisterBenchmark(name.c_str(), run, T)->UseManualTime()->Unit(benchmark::kMillisecond);
    if (T >= 16384) {
      b->Iterations(1);
    } else {
      b->MinTime(0.2);
    }
  }
}

}  // namespace

[[maybe_unused]] static const int registered_moba = (register_moba_benchmarks(), 0);

}  // namespace moekit_bench
