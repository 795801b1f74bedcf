// SPDX-License-Identifier: Apache-2.0
// Sinkhorn-routed MoE layer forward (SparseLayer<SinkhornRouter, FfnBank>), 20 Sinkhorn
// iterations (tolerance 0, max_iters 20), both weight modes (selection_only: Megatron's cost
// logits / xi = 1; transport: SSR's cost probs / xi = 0.05), foundation shapes, random
// SwiGLU experts. Each registration is checked once against the double-precision reference
// (tests/reference/sinkhorn_ref for the routing, reference.hpp's FFN for sampled outputs)
// before timing. Reports tokens/s, GFLOP/s and router_share = min route() time / min forward time.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/sinkhorn.hpp"
#include "reference/reference.hpp"
#include "reference/sinkhorn_ref.hpp"

namespace moekit_bench {
namespace {

using Clock = std::chrono::steady_clock;
using SinkhornLayer = moekit::SparseLayer<moekit::SinkhornRouter, moekit::FfnBank>;

struct Shape {
  int64_t E, k, d, f;
};
constexpr Shape kShapes[] = {{8, 2, 1024, 2816}, {64, 8, 1024, 1408}};
constexpr int64_t kTokens[] = {1, 16, 128, 512, 2048};
constexpr int64_t kIterations = 20;

constexpr int64_t kCheckTokens = 8;   // sampled tokens whose layer output is checked
constexpr double kCheckRel = 1e-3;    // relative tolerance of output values
constexpr double kCheckFloor = 1e-4;  // absolute floor, as a fraction of max |reference output|
constexpr double kTieGap = 2e-5;      // log-plan near-tie gap (see tests/test_sinkhorn.cpp)
constexpr double kWeightRel = 1e-4;

struct Spec {
  moekit::SinkhornWeightMode mode;
  Shape shape;
  int64_t tokens;
  int threads;
  std::string name;
};

const char* mode_name(moekit::SinkhornWeightMode m) {
  return m == moekit::SinkhornWeightMode::transport ? "transport" : "selection_only";
}

moekit::SinkhornOptions router_options(moekit::SinkhornWeightMode mode, const Shape& s) {
  moekit::SinkhornOptions o;
  o.num_experts = s.E;
  o.k = s.k;
  o.hidden = s.d;
  o.weight_mode = mode;  // cost and temperature: the mode's defaults
  o.tolerance = 0.0;
  o.max_iters = kIterations;
  return o;
}

/// Uniform values in [-a, a] from a splitmix64 stream.
void fill_uniform(std::vector<float>& v, uint64_t& state, double a) {
  for (float& x : v) {
    state += 0x9E3779B97F4A7C15ull;
    const double u =
        static_cast<double>(moekit::detail::splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
    x = static_cast<float>((2.0 * u - 1.0) * a);
  }
}

/// One layer alive at a time (the E = 64 bank is 1.1 GB of f32), built on first use of a
/// shape; the weight modes share it by swapping the router (benchmarks run in registration
/// order, shape by shape).
struct LayerCache {
  int64_t E = -1;
  std::unique_ptr<SinkhornLayer> layer;

  SinkhornLayer& get(const Shape& s, moekit::SinkhornWeightMode mode) {
    if (E != s.E || !layer) {
      layer.reset();
      uint64_t state = moekit::detail::splitmix64(0x51D0000ull + static_cast<uint64_t>(s.E));
      std::vector<float> gate(static_cast<size_t>(s.E * s.d));
      fill_uniform(gate, state,
                   std::sqrt(3.0 / static_cast<double>(s.d)));  // logits ~ unit variance
      moekit::FfnShape fs;
      fs.hidden = s.d;
      fs.intermediate = s.f;
      moekit::FfnBank bank(s.E, fs);
      std::vector<float> g(static_cast<size_t>(s.f * s.d)), u(g.size()), dn(g.size());
      for (int64_t e = 0; e < s.E; ++e) {
        fill_uniform(g, state, std::sqrt(3.0 / static_cast<double>(s.d)));
        fill_uniform(u, state, std::sqrt(3.0 / static_cast<double>(s.d)));
        fill_uniform(dn, state, std::sqrt(3.0 / static_cast<double>(s.f)));
        bank.set_expert(e, g.data(), u.data(), dn.data());
      }
      layer = std::make_unique<SinkhornLayer>(
          moekit::SinkhornRouter(router_options(mode, s), std::move(gate)), std::move(bank));
      E = s.E;
    }
    if (layer->router().options().weight_mode != mode)
      layer->router() = moekit::SinkhornRouter(router_options(mode, s), layer->router().weight());
    return *layer;
  }
};

LayerCache& layer_cache() {
  static LayerCache cache;
  return cache;
}

/// Pre-generated hidden states `[T, d]`, unit variance, fixed seeds; rotated over in the loop.
const std::vector<std::vector<float>>& inputs_for(int64_t T, int64_t d, int count) {
  static std::map<std::pair<int64_t, int64_t>, std::vector<std::vector<float>>> cache;
  auto& v = cache[{T, d}];
  while (static_cast<int>(v.size()) < count) {
    std::vector<float> x(static_cast<size_t>(T * d));
    uint64_t state = moekit::detail::splitmix64(
        0x51C0000ull + static_cast<uint64_t>(T * 131 + d) * 977 + v.size());
    fill_uniform(x, state, 1.7320508075688772);
    v.push_back(std::move(x));
  }
  return v;
}

int inputs_count(int64_t T) { return T >= 2048 ? 2 : T >= 512 ? 3 : 4; }

std::map<std::string, std::string>& verdicts() {
  static std::map<std::string, std::string> v;
  return v;
}

sinkhorn_ref::Params reference_params(const moekit::SinkhornOptions& o) {
  sinkhorn_ref::Params p;
  p.num_experts = o.num_experts;
  p.k = o.k;
  p.hidden = o.hidden;
  p.max_iters = o.max_iters;
  p.tolerance = o.tolerance;
  p.cost = o.effective_cost() == moekit::SinkhornCost::probs ? sinkhorn_ref::Cost::probs
                                                             : sinkhorn_ref::Cost::logits;
  p.temperature = static_cast<double>(o.effective_temperature());
  p.weight_mode = o.weight_mode == moekit::SinkhornWeightMode::transport
                      ? sinkhorn_ref::WeightMode::transport
                      : sinkhorn_ref::WeightMode::selection_only;
  return p;
}

/// Expert e of the bank as a reference SwiGLU FFN (HF layout copies).
ref::Ffn reference_ffn(const moekit::FfnBank& bank, int64_t e) {
  const moekit::FfnShape& s = bank.shape();
  const size_t fd = static_cast<size_t>(s.hidden * s.intermediate);
  ref::Ffn f;
  f.hidden = s.hidden;
  f.intermediate = s.intermediate;
  f.gated = true;
  f.act = ref::Activation::silu;
  f.gate.resize(fd);
  f.up.resize(fd);
  f.down.resize(fd);
  bank.get_expert(e, f.gate.data(), f.up.data(), f.down.data());
  return f;
}

/// Forward on `x [T, d]` against the reference: iterations, the routing of every token
/// (exact choices unless a log-plan near-tie, weights with tolerance), then the output of up
/// to kCheckTokens sampled tokens on the library's choices. Returns "" or the mismatch.
std::string check_layer(const SinkhornLayer& layer, const float* x, int64_t T, int threads) {
  const int64_t d = layer.hidden_size(), k = layer.router().k();
  moekit::Workspace ws;
  std::vector<float> out(static_cast<size_t>(T * d));
  layer.forward(moekit::Batch::single(T, d), x, out.data(), ws, threads);
  const sinkhorn_ref::Result want = sinkhorn_ref::route(reference_params(layer.router().options()),
                                                        layer.router().weight().data(), x, T);
  if (ws.router.iterations != want.iterations)
    return "iterations " + std::to_string(ws.router.iterations) + ", reference " +
           std::to_string(want.iterations);
  if (std::fabs(ws.router.error - want.error) > 1e-3 * want.error + 1e-5)
    return "marginal error " + std::to_string(ws.router.error) + ", reference " +
           std::to_string(want.error);
  const auto off = ws.plan.slot_offsets();
  int64_t compared = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (ws.plan.slots_of(t) != k) return "token " + std::to_string(t) + ": slot count";
    if (want.boundary_gap[static_cast<size_t>(t)] < kTieGap ||
        want.order_gap[static_cast<size_t>(t)] < kTieGap)
      continue;
    ++compared;
    for (int64_t j = 0; j < k; ++j) {
      const auto s = static_cast<size_t>(off[static_cast<size_t>(t)] + j);
      if (ws.plan.slot_expert()[s] !=
          want.experts_of[static_cast<size_t>(t)][static_cast<size_t>(j)])
        return "token " + std::to_string(t) + " slot " + std::to_string(j) + ": expert " +
               std::to_string(ws.plan.slot_expert()[s]) + ", reference " +
               std::to_string(want.experts_of[static_cast<size_t>(t)][static_cast<size_t>(j)]);
      const double a = ws.plan.slot_weight()[s],
                   b = want.weights_of[static_cast<size_t>(t)][static_cast<size_t>(j)];
      if (std::fabs(a - b) > kWeightRel * std::fabs(b) + 1e-6)
        return "token " + std::to_string(t) + " slot " + std::to_string(j) + ": weight " +
               std::to_string(a) + ", reference " + std::to_string(b);
    }
  }
  if (T > 1 && compared == 0) return "no token compared (all near-ties)";

  // Output of sampled tokens: y_t = sum_j w_j FFN_{e_j}(x_t), in double.
  std::map<int64_t, ref::Ffn> ffns;
  const int64_t n = std::min(T, kCheckTokens);
  std::vector<double> y;
  std::vector<float> got;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = n == 1 ? 0 : i * (T - 1) / (n - 1);
    const std::vector<double> xt(x + t * d, x + (t + 1) * d);
    std::vector<double> yt(static_cast<size_t>(d), 0.0);
    for (int64_t j = 0; j < k; ++j) {
      const auto s = static_cast<size_t>(off[static_cast<size_t>(t)] + j);
      const int64_t e = ws.plan.slot_expert()[s];
      auto it = ffns.find(e);
      if (it == ffns.end()) it = ffns.emplace(e, reference_ffn(layer.experts(), e)).first;
      const std::vector<double> fe = ref::ffn_forward(it->second, xt);
      for (int64_t c = 0; c < d; ++c)
        yt[static_cast<size_t>(c)] += ws.plan.slot_weight()[s] * fe[static_cast<size_t>(c)];
    }
    y.insert(y.end(), yt.begin(), yt.end());
    got.insert(got.end(), out.begin() + t * d, out.begin() + (t + 1) * d);
    if (ffns.size() > 16) ffns.clear();
  }
  if (!(ref::max_abs(y) > 0)) return "reference output is all zero (vacuous check)";
  if (auto errs = ref::compare_values(y, got.data(), d, kCheckRel, kCheckFloor); !errs.empty())
    return "output vs reference: " + errs.front();
  return "";
}

void run_layer(benchmark::State& state, const Spec& spec) {
  try {
    SinkhornLayer& layer = layer_cache().get(spec.shape, spec.mode);
    const int64_t T = spec.tokens, d = layer.hidden_size();
    const moekit::Batch batch = moekit::Batch::single(T, d);
    const auto& inputs = inputs_for(T, d, inputs_count(T));
    const size_t n_in = static_cast<size_t>(inputs_count(T));

    auto [verdict, fresh] = verdicts().try_emplace(spec.name);
    if (fresh) verdict->second = check_layer(layer, inputs[0].data(), T, spec.threads);
    if (!verdict->second.empty()) {
      state.SkipWithError(verdict->second.c_str());
      return;
    }

    // Router alone on the same inputs: its shortest call, and each input's plan for the FLOPs.
    moekit::RoutingPlan plan;
    moekit::RouterScratch scratch;
    std::vector<double> flops(n_in);
    for (size_t i = 0; i < n_in; ++i) {
      layer.router().route(batch, inputs[i].data(), plan, scratch, spec.threads);
      flops[i] = layer.executed_flops(plan, batch);
    }
    int64_t router_reps = 0;
    double router_min = 1e300;
    const auto r0 = Clock::now();
    // At least 10 calls and 0.3 s: the shortest is robust to preemption on a loaded machine.
    while (router_reps < 10 || (std::chrono::duration<double>(Clock::now() - r0).count() < 0.3 &&
                                router_reps < 100000)) {
      const auto c0 = Clock::now();
      layer.router().route(batch, inputs[static_cast<size_t>(router_reps) % n_in].data(), plan,
                           scratch, spec.threads);
      router_min = std::min(router_min, std::chrono::duration<double>(Clock::now() - c0).count());
      ++router_reps;
    }

    moekit::Workspace ws;
    std::vector<float> out(static_cast<size_t>(T * d));
    layer.forward(batch, inputs[0].data(), out.data(), ws, spec.threads);  // warm-up: grows ws

    double sum_flops = 0, layer_min = 1e300;
    size_t i = 0;
    for (auto _ : state) {
      const auto c0 = Clock::now();
      layer.forward(batch, inputs[i].data(), out.data(), ws, spec.threads);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
      layer_min = std::min(layer_min, std::chrono::duration<double>(Clock::now() - c0).count());
      sum_flops += flops[i];
      i = (i + 1) % n_in;
    }
    using benchmark::Counter;
    state.counters["tokens/s"] =
        Counter(static_cast<double>(T) * static_cast<double>(state.iterations()), Counter::kIsRate);
    state.counters["GFLOP/s"] = Counter(sum_flops * 1e-9, Counter::kIsRate);
    state.counters["router_share"] = layer_min < 1e300 ? router_min / layer_min : 0.0;
    state.counters["router_ms"] = router_min * 1e3;
    state.counters["sinkhorn_iters"] = static_cast<double>(scratch.iterations);
    state.counters["threads"] = spec.threads;
  } catch (const std::exception& e) {
    state.SkipWithError((spec.name + ": " + e.what()).c_str());
  }
}

}  // namespace

/// One registration per (shape, weight mode, tokens), shape-major so each bank is built once.
void register_sinkhorn_benchmarks() {
  const int threads = bench_threads();
  for (const Shape& s : kShapes) {
    for (auto mode :
         {moekit::SinkhornWeightMode::selection_only, moekit::SinkhornWeightMode::transport}) {
      for (int64_t T : kTokens) {
        Spec spec{mode, s, T, threads, ""};
        spec.name = std::string("sinkhorn/") + mode_name(mode) + "/E:" + std::to_string(s.E) +
                    "/k:" + std::to_string(s.k) + "/d:" + std::to_string(s.d) +
                    "/f:" + std::to_string(s.f) + "/T:" + std::to_string(T) +
                    "/threads:" + std::to_string(threads);
        auto* b = benchmark::RegisterBenchmark(spec.name.c_str(), run_layer, spec)
                      ->UseRealTime()
                      ->Unit(benchmark::kMillisecond);
        if (T >= 2048)
          b->Iterations(2);
        else if (T >= 512)
          b->Iterations(3);
        else
          b->MinTime(0.2);
      }
    }
  }
}

namespace {
[[maybe_unused]] const int registered = (register_sinkhorn_benchmarks(), 0);
}  // namespace

}  // namespace moekit_bench
