// SPDX-License-Identifier: Apache-2.0
// Dictionary-coded ternary experts (QMoE; experts/qmoe.hpp) in a top-k layer against the same
// weights as packed `ternary` (2 bits + a scale per column), `int4` and `f32` FfnBanks:
// Mixtral-like E = 8, k = 2, d = 1024, f = 2816, weights ternary per row on {lo, 0, hi} at
// QMoE's sparsity (P(0) = 0.885), so each bank computes with the same values up to its own
// grid (int4 and ternary re-round them). Reported per layer: time, `bits_per_weight` of the
// expert weights as stored, and the weight bytes streamed per second.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "moekit/experts/qmoe.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/topk.hpp"

namespace moekit_bench {
namespace {

constexpr int64_t kE = 8, kK = 2, kD = 1024, kF = 2816;
constexpr int64_t kTokens[] = {1, 16};

struct Weights {
  std::vector<float> router, gate, up, down;
};

const Weights& weights() {
  static const Weights w = [] {
    Weights x;
    uint64_t s = 2310;
    auto uni = [&] {
      s += 0x9E3779B97F4A7C15ull;
      return static_cast<double>(moekit::detail::splitmix64(s) >> 11) * (1.0 / 9007199254740992.0);
    };
    auto ternary = [&](std::vector<float>& v, int64_t rows, int64_t cols) {
      v.resize(static_cast<size_t>(kE * rows * cols));
      for (int64_t r = 0; r < kE * rows; ++r) {
        const float lo = -static_cast<float>(0.02 + 0.02 * uni()), hi = static_cast<float>(0.02 + 0.02 * uni());
        for (int64_t c = 0; c < cols; ++c) {
          const double u = uni();
          v[static_cast<size_t>(r * cols + c)] = u < 0.885 ? 0.0f : u < 0.9425 ? lo : hi;
        }
      }
    };
    ternary(x.gate, kF, kD);
    ternary(x.up, kF, kD);
    ternary(x.down, kD, kF);
    x.router.resize(static_cast<size_t>(kE * kD));
    for (float& r : x.router) r = static_cast<float>(uni() - 0.5);
    return x;
  }();
  return w;
}

template <class Layer>
void time_layer(benchmark::State& state, const Layer& layer, int64_t T, double bytes_per_expert, double bits) {
  const int threads = bench_threads();
  std::vector<float> x(static_cast<size_t>(T * kD)), y(x.size());
  uint64_t s = 5;
  for (float& v : x) {
    s += 0x9E3779B97F4A7C15ull;
    v = static_cast<float>(static_cast<double>(moekit::detail::splitmix64(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
  }
  moekit::Workspace ws;
  const moekit::Batch batch = moekit::Batch::single(T, kD);
  layer.forward(batch, x.data(), y.data(), ws, threads);
  double bytes = 0;
  for (auto _ : state) {
    layer.forward(batch, x.data(), y.data(), ws, threads);
    benchmark::DoNotOptimize(y.data());
    int64_t active = 0;
    for (int64_t e = 0; e < kE; ++e) active += ws.plan.kept_of(e) > 0;
    bytes += static_cast<double>(active) * bytes_per_expert;
  }
  state.counters["bits_per_weight"] = bits;
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
}

void run_qmoe(benchmark::State& state, int64_t T) {
  try {
    const Weights& w = weights();
    moekit::TernaryDictFfnBank bank(kE, kD, kF, w.gate, w.up, w.down);
    const double bytes = static_cast<double>(bank.bytes()) / kE;
    const double bits = static_cast<double>(bank.bytes()) * 8.0 / (3.0 * kE * kD * kF);
    const moekit::SparseLayer layer(moekit::TopKRouter(moekit::TopKOptions{kE, kK, kD}, w.router), std::move(bank));
    time_layer(state, layer, T, bytes, bits);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void run_packed(benchmark::State& state, moekit::kernels::WeightType type, int64_t T) {
  try {
    const Weights& w = weights();
    moekit::FfnBank bank(kE, moekit::FfnShape{kD, kF, true, moekit::Activation::silu}, moekit::kernels::PackOptions{type});
    for (int64_t e = 0; e < kE; ++e)
      bank.set_expert(e, w.gate.data() + e * kF * kD, w.up.data() + e * kF * kD, w.down.data() + e * kD * kF);
    const double bytes = static_cast<double>(bank.weight_bytes_per_expert());
    const double bits = bytes * 8.0 / (3.0 * kD * kF);
    const moekit::SparseLayer layer(moekit::TopKRouter(moekit::TopKOptions{kE, kK, kD}, w.router), std::move(bank));
    time_layer(state, layer, T, bytes, bits);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void register_qmoe_benchmarks() {
  using moekit::kernels::WeightType;
  for (int64_t T : kTokens) {
    const std::string tail = "/E:8/k:2/d:1024/f:2816/T:" + std::to_string(T);
    benchmark::RegisterBenchmark(("qmoe/dictionary" + tail).c_str(), run_qmoe, T)
        ->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
    for (WeightType t : {WeightType::ternary, WeightType::int4, WeightType::f32})
      benchmark::RegisterBenchmark(("qmoe/packed_" + std::string(moekit::kernels::to_string(t)) + tail).c_str(), run_packed,
                                   t, T)
          ->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
  }
}

}  // namespace

[[maybe_unused]] static const int registered_qmoe = (register_qmoe_benchmarks(), 0);

}  // namespace moekit_bench
