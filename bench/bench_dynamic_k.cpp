// SPDX-License-Identifier: Apache-2.0
// Dynamic k against fixed k at the same mean k. For each shape (E, k, d, f) a top-k layer
// (preset olmoe resized, moekit::random_layer) and a top-p DynamicKRouter on the same gate
// weight, its top_p calibrated (bisection on a separate 512-token batch) so tokens take k
// experts on average. The timed dynamic forward is the router plus forward_plan() of the same
// layer (same experts, same kernels, same decode split), so the comparison isolates what a
// variable slot count costs. Counters: `slots_per_token` (the dynamic plan's, on the timed
// inputs), `topk_ms` (the fixed-k forward, timed alternately), `time_ratio` (dynamic / fixed)
// and `slot_time_ratio` (time per executed slot, dynamic / fixed). Each registration checks its
// plan once against the double-precision reference (tests/reference/dynamic_k_ref).
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
#include "moekit/routers/dynamic_k.hpp"
#include "reference/dynamic_k_ref.hpp"

namespace moekit_bench {
namespace {

using Clock = std::chrono::steady_clock;

struct Shape {
  int64_t E, k, d, f;
};
constexpr Shape kShapes[] = {{8, 2, 1024, 2816}, {64, 8, 1024, 1408}};
constexpr int64_t kTokens[] = {16, 128, 512};
constexpr int64_t kCalibrationTokens = 512;

struct Spec {
  Shape shape;
  int64_t tokens;
  int threads;
  bool last_of_shape;
  std::string name;
};

/// Hidden states `[T, d]`, uniform of unit variance, from a seed.
std::vector<float> make_input(int64_t T, int64_t d, uint64_t seed) {
  std::vector<float> x(static_cast<size_t>(T * d));
  uint64_t state = moekit::detail::splitmix64(0xD1CE0000ull + seed);
  for (float& v : x) {
    state += 0x9E3779B97F4A7C15ull;
    const double u = static_cast<double>(moekit::detail::splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
    v = static_cast<float>((2.0 * u - 1.0) * 1.7320508075688772);
  }
  return x;
}

struct Layers {
  int64_t key = -1;
  std::unique_ptr<moekit::TopKLayer> topk;
  std::unique_ptr<moekit::DynamicKRouter> dyn;
};
Layers& layers() {
  static Layers l;
  return l;
}

/// The top-p whose mean slot count on a calibration batch is closest to k (bisection: the
/// mean is non-decreasing in top_p).
moekit::DynamicKRouter calibrated(const moekit::TopKLayer& topk, const Shape& s, int threads) {
  moekit::DynamicKOptions o;
  o.num_experts = s.E;
  o.hidden = s.d;
  o.mode = moekit::DynamicKMode::top_p;
  moekit::DynamicKRouter r(o, topk.router().weight());
  const std::vector<float> x = make_input(kCalibrationTokens, s.d, 77);
  const moekit::Batch b = moekit::Batch::single(kCalibrationTokens, s.d);
  moekit::RoutingPlan plan;
  moekit::RouterScratch scratch;
  auto mean_k = [&](double p) {
    o.top_p = p;
    r.set_options(o);
    r.route(b, x.data(), plan, scratch, threads);
    return static_cast<double>(plan.num_slots()) / static_cast<double>(kCalibrationTokens);
  };
  double lo = 1e-6, hi = 1.0;
  for (int i = 0; i < 40; ++i) {
    const double mid = 0.5 * (lo + hi);
    (mean_k(mid) < static_cast<double>(s.k) ? lo : hi) = mid;
  }
  const double best = std::fabs(mean_k(lo) - double(s.k)) <= std::fabs(mean_k(hi) - double(s.k)) ? lo : hi;
  (void)mean_k(best);
  return r;
}

Layers& get_layers(const Spec& spec) {
  Layers& L = layers();
  const Shape& s = spec.shape;
  if (L.key != s.E) {
    L = Layers{};
    moekit::LayerConfig c = sized_config("olmoe", s.E, s.k, s.d, s.f);
    c.router.validate();
    L.topk = std::make_unique<moekit::TopKLayer>(moekit::random_layer(c, 4000 + static_cast<uint64_t>(s.E)));
    L.dyn = std::make_unique<moekit::DynamicKRouter>(calibrated(*L.topk, s, spec.threads));
    L.key = s.E;
  }
  return L;
}

/// The router's plan on `x` against the reference; "" or the first mismatch.
std::string check_plan(const moekit::DynamicKRouter& r, const float* x, int64_t T, int threads) {
  const moekit::DynamicKOptions& o = r.options();
  moekit::RoutingPlan plan;
  moekit::RouterScratch scratch;
  r.route(moekit::Batch::single(T, o.hidden), x, plan, scratch, threads);
  ref::dynamic_k::Params p;
  p.num_experts = o.num_experts;
  p.hidden = o.hidden;
  p.top_p = o.top_p;
  p.k_min = o.k_min;
  p.k_max = o.k_max;
  const auto want = ref::dynamic_k::route(p, r.weight().data(), x, T, nullptr);
  int64_t compared = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (want.fragile[static_cast<size_t>(t)]) continue;
    const auto& slots = want.routing.token[static_cast<size_t>(t)].slots;
    const int32_t b = plan.slot_offsets()[static_cast<size_t>(t)], e = plan.slot_offsets()[static_cast<size_t>(t) + 1];
    if (static_cast<size_t>(e - b) != slots.size())
      return "token " + std::to_string(t) + ": " + std::to_string(e - b) + " slots, reference " + std::to_string(slots.size());
    for (size_t j = 0; j < slots.size(); ++j) {
      const float w = plan.slot_weight()[static_cast<size_t>(b) + j];
      if (plan.slot_expert()[static_cast<size_t>(b) + j] != slots[j].expert ||
          std::fabs(w - slots[j].weight) > 1e-5 * slots[j].weight + 1e-7)
        return "token " + std::to_string(t) + " slot " + std::to_string(j) + " differs from the reference";
    }
    ++compared;
  }
  if (compared < T / 2) return "fewer than half the tokens compared (near-ties)";
  return "";
}

void run_layer(benchmark::State& state, const Spec& spec) {
  try {
    Layers& L = get_layers(spec);
    const moekit::TopKLayer& topk = *L.topk;
    const moekit::DynamicKRouter& dyn = *L.dyn;
    const int64_t T = spec.tokens, d = spec.shape.d, k = spec.shape.k;
    const moekit::Batch batch = moekit::Batch::single(T, d);
    std::vector<std::vector<float>> inputs;
    for (uint64_t i = 0; i < 3; ++i) inputs.push_back(make_input(T, d, 1000 + i));
    if (const std::string v = check_plan(dyn, inputs[0].data(), T, spec.threads); !v.empty()) {
      state.SkipWithError(v.c_str());
      if (spec.last_of_shape) layers() = Layers{};
      return;
    }
    moekit::Workspace ws, ws_topk;
    moekit::RoutingPlan plan;
    moekit::RouterScratch scratch;
    std::vector<float> out(static_cast<size_t>(T * d)), out_topk(out.size());
    dyn.route(batch, inputs[0].data(), plan, scratch, spec.threads);  // warm-up: grows the buffers
    topk.forward_plan(batch, inputs[0].data(), plan, out.data(), ws, spec.threads);
    topk.forward(batch, inputs[0].data(), out_topk.data(), ws_topk, spec.threads);
    double dyn_min = 1e300, topk_min = 1e300, per_slot_min = 1e300, slots = 0;
    size_t i = 0;
    for (auto _ : state) {
      const auto c0 = Clock::now();
      dyn.route(batch, inputs[i].data(), plan, scratch, spec.threads);
      topk.forward_plan(batch, inputs[i].data(), plan, out.data(), ws, spec.threads);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
      const auto c1 = Clock::now();
      topk.forward(batch, inputs[i].data(), out_topk.data(), ws_topk, spec.threads);
      benchmark::DoNotOptimize(out_topk.data());
      benchmark::ClobberMemory();
      const double dt = std::chrono::duration<double>(c1 - c0).count();
      state.SetIterationTime(dt);
      dyn_min = std::min(dyn_min, dt);
      topk_min = std::min(topk_min, std::chrono::duration<double>(Clock::now() - c1).count());
      per_slot_min = std::min(per_slot_min, dt / static_cast<double>(std::max<int64_t>(plan.num_kept(), 1)));
      slots += static_cast<double>(plan.num_kept());
      i = (i + 1) % inputs.size();
    }
    const auto iters = static_cast<double>(state.iterations());
    using benchmark::Counter;
    state.counters["tokens/s"] = Counter(static_cast<double>(T) * iters, Counter::kIsRate);
    state.counters["top_p"] = dyn.options().top_p;
    state.counters["slots_per_token"] = slots / std::max(iters, 1.0) / static_cast<double>(T);
    state.counters["topk_ms"] = topk_min * 1e3;
    state.counters["time_ratio"] = dyn_min / topk_min;
    state.counters["slot_time_ratio"] = per_slot_min / (topk_min / static_cast<double>(T * k));
    state.counters["threads"] = spec.threads;
  } catch (const std::exception& e) {
    state.SkipWithError((spec.name + ": " + e.what()).c_str());
  }
  if (spec.last_of_shape) layers() = Layers{};
}

void register_dynamic_k_benchmarks() {
  const int threads = bench_threads();
  for (const Shape& s : kShapes) {
    std::vector<Spec> specs;
    for (int64_t T : kTokens) specs.push_back({s, T, threads, false, ""});
    specs.back().last_of_shape = true;
    for (Spec& spec : specs) {
      spec.name = "dynamic_k/top_p_vs_topk/E:" + std::to_string(s.E) + "/k:" + std::to_string(s.k) +
                  "/d:" + std::to_string(s.d) + "/f:" + std::to_string(s.f) + "/T:" + std::to_string(spec.tokens) +
                  "/threads:" + std::to_string(threads);
      auto* b = benchmark::RegisterBenchmark(spec.name.c_str(), run_layer, spec)
                    ->UseManualTime()
                    ->Unit(benchmark::kMillisecond);
      if (spec.tokens >= 512)
        b->Iterations(4);
      else
        b->MinTime(0.2);
    }
  }
}

}  // namespace

// Registered at static initialisation (bench/main.cpp is not edited per family).
[[maybe_unused]] static const int registered_dynamic_k = (register_dynamic_k_benchmarks(), 0);

}  // namespace moekit_bench
