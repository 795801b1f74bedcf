// SPDX-License-Identifier: Apache-2.0
// Expert weight types: the Mixtral-style layer (softmax top-k, SwiGLU) with f32, bf16 (f32 or
// bf16 activations), int8, w8a8 (also EAQuant-smoothed), fp8, int4 and ternary experts, prefill and decode; and the decode column split on and off. Each
// registration first checks its output against the f32 layer with the same weights (relative
// Frobenius error within the type's bound) and skips with an error otherwise.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/kernels/packed_gemm.hpp"
#include "moekit/layer.hpp"
#include "moekit/tools/eaquant.hpp"

namespace moekit_bench {
namespace {

using moekit::kernels::WeightType;

struct Shape {
  int64_t E, k, d, f;
};
constexpr Shape kShapes[] = {{8, 2, 1024, 2816}, {64, 8, 1024, 1408}};
constexpr int64_t kTokens[] = {1, 16, 512};
// A weight type, with activations rounded to bf16 or not ("bf16xbf16": bf16 weights and
// activations, what a bf16 engine and PyTorch's bf16 matmul compute; on AVX512-BF16 CPUs it
// runs on vdpbf16ps).
// "-eaquant": the same type after EAQuant's smoothing (tools/eaquant.hpp, calibrated on 256
// random tokens): the cost of dividing each expert input by s.
struct Format {
  WeightType t;
  bool bf16_act;
  bool eaquant = false;
};
constexpr Format kFormats[] = {{WeightType::f32, false},  {WeightType::bf16, false}, {WeightType::bf16, true},
                               {WeightType::int8, false}, {WeightType::w8a8, false}, {WeightType::w8a8, false, true},
                               {WeightType::fp8, false},  {WeightType::int4, false}, {WeightType::int4zp, false},
                               {WeightType::w4a8, false}, {WeightType::w4a8, false, true}, {WeightType::ternary, false}};

std::string format_name(const Format& f) {
  return std::string(moekit::kernels::to_string(f.t)) + (f.bf16_act ? "xbf16" : "") + (f.eaquant ? "-eaquant" : "");
}

double bound(const Format& f) {
  switch (f.t) {
    case WeightType::f32: return 0.0;
    case WeightType::bf16: return f.bf16_act ? 8e-3 : 5e-3;
    case WeightType::int8: return 2e-2;
    case WeightType::w8a8: return 3e-2;
    case WeightType::fp8: return 6e-2;
    case WeightType::int4:
    case WeightType::int4zp:
    case WeightType::w4a8: return 0.2;  // groups of 32, 16 levels: ~15% at the layer (tests)
    case WeightType::ternary: return 0.9;  // 3 levels per column: ~0.84 at the layer (tests)
  }
  return 0.0;
}

moekit::LayerConfig config(const Shape& s, const Format& f) {
  moekit::LayerConfig c = sized_config("mixtral", s.E, s.k, s.d, s.f);
  c.pack.type = f.t;
  c.pack.bf16_activations = f.bf16_act;
  return c;
}

// One layer alive at a time (registration order = run order), plus the f32 layer's output on
// the check input, kept per shape.
struct Cache {
  std::string key;
  std::unique_ptr<moekit::TopKLayer> layer;
};
Cache& cache() {
  static Cache c;
  return c;
}

std::vector<float> input(int64_t T, int64_t d, uint64_t salt) {
  std::vector<float> x(static_cast<size_t>(T * d));
  uint64_t state = moekit::detail::splitmix64(0xd7e0000ull + salt * 7919 + static_cast<uint64_t>(T));
  for (float& v : x) {
    state += 0x9E3779B97F4A7C15ull;
    v = static_cast<float>((static_cast<double>(moekit::detail::splitmix64(state) >> 11) * (2.0 / 9007199254740992.0) - 1.0) * 1.7320508075688772);
  }
  return x;
}

// Relative Frobenius error of the layer of type t against f32 (same weights: same seed) on 64
// tokens; "" or the failure.
std::string check(const moekit::TopKLayer& layer, const Shape& s, const Format& f, uint64_t seed) {
  if (f.t == WeightType::f32 && !f.bf16_act) return "";
  const int64_t T = 64;
  const auto x = input(T, s.d, 99);
  std::vector<float> y(x.size()), y32(x.size());
  moekit::Workspace ws;
  layer.forward(moekit::Batch::single(T, s.d), x.data(), y.data(), ws, bench_threads());
  {
    const moekit::TopKLayer f32 = moekit::random_layer(config(s, Format{WeightType::f32, false}), seed);
    f32.forward(moekit::Batch::single(T, s.d), x.data(), y32.data(), ws, bench_threads());
  }
  double num = 0, den = 0;
  for (size_t i = 0; i < y.size(); ++i) num += (double(y[i]) - y32[i]) * (double(y[i]) - y32[i]), den += double(y32[i]) * y32[i];
  const double err = std::sqrt(num / den);
  if (!(err <= bound(f)))
    return std::string("relative Frobenius error vs f32 ") + std::to_string(err) + " > " + std::to_string(bound(f));
  return "";
}

void run(benchmark::State& state, Shape s, Format f, int64_t T, bool split, uint64_t seed, std::string key) {
  try {
    const int threads = bench_threads();
    Cache& c = cache();
    static std::string verdict;
    if (c.key != key) {
      c.layer.reset();
      if (f.eaquant) {
        const moekit::TopKLayer f32 = moekit::random_layer(config(s, Format{WeightType::f32, false}), seed);
        const auto cal = input(256, s.d, 1234);
        const moekit::eaquant::Smoothing sm =
            moekit::eaquant::calibrate(f32, moekit::Batch::single(256, s.d), cal.data(), {}, threads);
        c.layer = std::make_unique<moekit::TopKLayer>(moekit::eaquant::apply(f32, sm, config(s, f).pack));
      } else {
        c.layer = std::make_unique<moekit::TopKLayer>(moekit::random_layer(config(s, f), seed));
      }
      c.key = key;
      verdict = check(*c.layer, s, f, seed);
    }
    if (!verdict.empty()) {
      state.SkipWithError(verdict.c_str());
      return;
    }
    moekit::TopKLayer& layer = *c.layer;
    layer.set_decode_split(split);
    const int n_in = 4;
    std::vector<std::vector<float>> xs;
    for (int i = 0; i < n_in; ++i) xs.push_back(input(T, s.d, static_cast<uint64_t>(i)));
    const moekit::Batch batch = moekit::Batch::single(T, s.d);
    std::vector<float> y(static_cast<size_t>(T * s.d));
    moekit::Workspace ws;
    layer.forward(batch, xs[0].data(), y.data(), ws, threads);
    double flops = 0, bytes = 0;
    size_t i = 0;
    for (auto _ : state) {
      layer.forward(batch, xs[i].data(), y.data(), ws, threads);
      benchmark::DoNotOptimize(y.data());
      flops += layer.executed_flops(ws.plan);
      int64_t active = 0;
      for (int64_t e = 0; e < s.E; ++e) active += ws.plan.kept_of(e) > 0;
      bytes += static_cast<double>(active) * layer.experts().weight_bytes_per_expert() +
               4.0 * static_cast<double>(layer.router().weight().size());
      i = (i + 1) % static_cast<size_t>(n_in);
    }
    layer.set_decode_split(true);
    using benchmark::Counter;
    state.counters["tokens/s"] = Counter(static_cast<double>(T) * static_cast<double>(state.iterations()), Counter::kIsRate);
    state.counters["GFLOP/s"] = Counter(flops * 1e-9, Counter::kIsRate);
    state.counters["GB/s"] = Counter(bytes * 1e-9, Counter::kIsRate);
    state.counters["resident_MB"] = static_cast<double>(s.E) * layer.experts().weight_bytes_per_expert() / 1e6;
    state.counters["threads"] = threads;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

}  // namespace

void register_dtype_benchmarks() {
  const int threads = bench_threads();
  uint64_t seed = 5000;
  for (const Shape& s : kShapes) {
    ++seed;
    for (const Format& f : kFormats) {
      const std::string type = format_name(f);
      const std::string key = type + "/" + std::to_string(s.E);
      for (int64_t T : kTokens) {
        const std::string tail = "/E:" + std::to_string(s.E) + "/k:" + std::to_string(s.k) + "/d:" + std::to_string(s.d) +
                                 "/f:" + std::to_string(s.f) + "/T:" + std::to_string(T) + "/threads:" + std::to_string(threads);
        for (bool split : {true, false}) {
          if (!split && T != 1) continue;  // the split only applies to decode-sized batches
          const std::string name = "dtype/" + type + (split ? "" : "-nosplit") + tail;
          auto* b = benchmark::RegisterBenchmark(name.c_str(), run, s, f, T, split, seed, key)
                        ->UseRealTime()
                        ->Unit(benchmark::kMillisecond);
          if (T >= 512)
            b->Iterations(3);
          else
            b->MinTime(0.3);
        }
      }
    }
  }
  // Top-1 decode (Switch-like k = 1): unsplit, one thread streams the only expert.
  const Shape top1{8, 1, 1024, 2816};
  for (bool split : {true, false}) {
    const std::string name = std::string("dtype/f32") + (split ? "" : "-nosplit") +
                             "/E:8/k:1/d:1024/f:2816/T:1/threads:" + std::to_string(threads);
    benchmark::RegisterBenchmark(name.c_str(), run, top1, Format{WeightType::f32, false}, int64_t{1}, split, seed + 1,
                                 std::string("f32/top1"))
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->MinTime(0.3);
  }
}

}  // namespace moekit_bench
