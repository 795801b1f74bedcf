// SPDX-License-Identifier: Apache-2.0
// Depth-routed layers (routers/depth.hpp): Mixture-of-Depths (ratio 0.125) and gamma-MoD
// (defaults, 1/8 of the tokens must-keep) around one SwiGLU FFN block (d, f) = (1024, 2816),
// T in {128, 512, 2048}, random weights; each registration checked once against the
// double-precision reference (tests/reference/depth_ref) before timing.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "bench_common.hpp"
#include "moekit/blocks.hpp"
#include "moekit/expert.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/depth.hpp"
#include "reference/depth_ref.hpp"

namespace moekit_bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kD = 1024, kF = 2816;
constexpr int64_t kTokens[] = {128, 512, 2048};
constexpr int64_t kCheckTokens = 8;  // selected tokens whose output is checked
constexpr double kCheckRel = 1e-3, kCheckFloor = 1e-4;

/// Uniform(-a, a) values from a counter-based hash (fast, reproducible).
std::vector<float> random_vec(size_t n, double a, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 12345;
  for (float& x : v) {
    state += 0x9E3779B97F4A7C15ull;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const double u = static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
    x = static_cast<float>((2.0 * u - 1.0) * a);
  }
  return v;
}

/// The FFN block's weights (HF layout, kept for the reference check) and the block itself.
struct Model {
  depth_ref::Ffn ref;
  std::unique_ptr<moekit::FfnBlock> block;
  std::vector<float> mod_w, gamma_w;
};

const Model& model() {
  static const Model m = [] {
    Model r;
    r.ref.hidden = kD;
    r.ref.intermediate = kF;
    r.ref.gate = random_vec(kF * kD, std::sqrt(3.0 / kD), 1);
    r.ref.up = random_vec(kF * kD, std::sqrt(3.0 / kD), 2);
    r.ref.down = random_vec(kD * kF, std::sqrt(3.0 / kF), 3);
    r.block =
        std::make_unique<moekit::FfnBlock>(moekit::FfnShape{.hidden = kD, .intermediate = kF},
                                           r.ref.gate.data(), r.ref.up.data(), r.ref.down.data());
    r.mod_w = random_vec(kD, std::sqrt(3.0 / kD), 4);            // r_t ~ unit variance
    r.gamma_w = random_vec(2 * kD, 2 * std::sqrt(3.0 / kD), 5);  // z_t = L1 - L0 ~ std 2.8
    return r;
  }();
  return m;
}

/// Hidden states `[T, d]`, unit variance; token types: the last T/8 tokens must-keep (1).
struct Input {
  std::vector<float> x;
  std::vector<int32_t> types;
};
const Input& input_for(int64_t T) {
  static std::map<int64_t, Input> cache;
  auto [it, fresh] = cache.try_emplace(T);
  if (fresh) {
    it->second.x =
        random_vec(static_cast<size_t>(T * kD), std::sqrt(3.0), 100 + static_cast<uint64_t>(T));
    it->second.types.assign(static_cast<size_t>(T), 0);
    for (int64_t t = T - T / 8; t < T; ++t) it->second.types[static_cast<size_t>(t)] = 1;
  }
  return it->second;
}

depth_ref::Layout layout_of(const moekit::Batch& b) {
  depth_ref::Layout L;
  L.tokens = b.tokens;
  L.hidden = b.hidden;
  L.token_types.assign(b.token_types.begin(), b.token_types.end());
  return L;
}

/// Routing of every token against the reference (exact decisions outside near-ties, values
/// with tolerance), then the output of up to kCheckTokens selected tokens and one skipped
/// token. Returns "" or the first mismatch.
template <class Layer>
std::string check_layer(const Layer& layer, const moekit::Batch& b, const float* x,
                        const depth_ref::Decision& want, int threads) {
  const int64_t T = b.tokens, d = b.hidden;
  moekit::Workspace ws;
  std::vector<float> out(static_cast<size_t>(T * d));
  layer.forward(b, x, out.data(), ws, threads);
  std::vector<uint8_t> sel(static_cast<size_t>(T));
  moekit::depth_selected(ws.plan, sel);
  int64_t compared = 0;
  const double wmax = std::max(1.0, *std::max_element(want.weight.begin(), want.weight.end()));
  for (int64_t t = 0; t < T; ++t) {
    const double w = want.weight[static_cast<size_t>(t)],
                 got = ws.router.values[static_cast<size_t>(t)];
    if (!(std::fabs(got - w) <= 1e-4 * std::fabs(w) + 2e-6 * wmax))
      return "router weight of token " + std::to_string(t) + ": got " + std::to_string(got) +
             ", want " + std::to_string(w);
    if (want.ambiguous[static_cast<size_t>(t)]) continue;
    ++compared;
    if (sel[static_cast<size_t>(t)] != want.selected[static_cast<size_t>(t)])
      return "decision of token " + std::to_string(t) + " differs from the reference";
  }
  if (compared == 0) return "no token decision compared (all near-ties)";
  int64_t checked = 0, skipped_checked = 0;
  double ref_max = 0;
  std::vector<std::pair<int64_t, std::vector<double>>> rows;
  for (int64_t t = 0; t < T && (checked < kCheckTokens || skipped_checked < 1);
       t += std::max<int64_t>(1, T / 64)) {
    if (want.ambiguous[static_cast<size_t>(t)]) continue;
    if (sel[static_cast<size_t>(t)]) {
      if (checked >= kCheckTokens) continue;
      std::vector<double> y = depth_ref::ffn_row(model().ref, x + t * d);
      for (double& v : y) v *= want.weight[static_cast<size_t>(t)];
      for (double v : y) ref_max = std::max(ref_max, std::fabs(v));
      rows.emplace_back(t, std::move(y));
      ++checked;
    } else if (skipped_checked < 1) {
      rows.emplace_back(t, std::vector<double>(static_cast<size_t>(d), 0.0));
      ++skipped_checked;
    }
  }
  if (!(ref_max > 0)) return "reference output is all zero (vacuous check)";
  for (const auto& [t, y] : rows)
    for (int64_t c = 0; c < d; ++c) {
      const double g = out[static_cast<size_t>(t * d + c)], w = y[static_cast<size_t>(c)];
      if (!(std::fabs(g - w) <= kCheckRel * std::fabs(w) + kCheckFloor * ref_max))
        return "output of token " + std::to_string(t) + " col " + std::to_string(c) + ": got " +
               std::to_string(g) + ", want " + std::to_string(w);
    }
  return "";
}

std::map<std::string, std::string>& verdicts() {
  static std::map<std::string, std::string> v;
  return v;
}

template <class Router>
void run_layer(benchmark::State& state, const std::string& name, int64_t T, int threads) {
  try {
    const Model& m = model();
    const Input& in = input_for(T);
    moekit::Batch batch = moekit::Batch::single(T, kD);
    batch.token_types = in.types;

    Router router = [&] {
      if constexpr (std::is_same_v<Router, moekit::MoDRouter>) {
        return moekit::MoDRouter({.hidden = kD, .ratio = 0.125}, m.mod_w);
      } else {
        return moekit::GammaModRouter({.hidden = kD}, m.gamma_w);
      }
    }();
    depth_ref::Decision want;
    if constexpr (std::is_same_v<Router, moekit::MoDRouter>) {
      depth_ref::ModParams p;
      p.ratio = router.options().ratio;
      want = depth_ref::mod(layout_of(batch), in.x.data(), m.mod_w, {}, p);
    } else {
      depth_ref::GammaParams p;
      p.ratio = router.options().ratio;
      want = depth_ref::gamma_mod(layout_of(batch), in.x.data(), m.gamma_w, p);
    }
    const moekit::SparseLayer layer(router, moekit::FunctorBank<moekit::FfnBlock>({*m.block}));

    auto [verdict, fresh] = verdicts().try_emplace(name);
    if (fresh) verdict->second = check_layer(layer, batch, in.x.data(), want, threads);
    if (!verdict->second.empty()) {
      state.SkipWithError(verdict->second.c_str());
      return;
    }

    // Router alone: shortest call (robust to preemption on a loaded machine).
    moekit::RoutingPlan plan;
    moekit::RouterScratch scratch;
    router.route(batch, in.x.data(), plan, scratch, threads);
    const double flops = static_cast<double>(plan.num_kept()) * m.block->flops_per_row() +
                         static_cast<double>(batch.routed_tokens()) * router.flops_per_token();
    const int64_t kept = plan.num_kept();
    double router_min = 1e300;
    int64_t reps = 0;
    const auto r0 = Clock::now();
    while (reps < 3 ||
           (std::chrono::duration<double>(Clock::now() - r0).count() < 0.02 && reps < 100000)) {
      const auto c0 = Clock::now();
      router.route(batch, in.x.data(), plan, scratch, threads);
      router_min = std::min(router_min, std::chrono::duration<double>(Clock::now() - c0).count());
      ++reps;
    }

    moekit::Workspace ws;
    std::vector<float> out(static_cast<size_t>(T * kD));
    layer.forward(batch, in.x.data(), out.data(), ws, threads);  // warm-up: grows ws
    double layer_min = 1e300;
    for (auto _ : state) {
      const auto c0 = Clock::now();
      layer.forward(batch, in.x.data(), out.data(), ws, threads);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
      layer_min = std::min(layer_min, std::chrono::duration<double>(Clock::now() - c0).count());
    }
    const auto iters = static_cast<double>(state.iterations());
    using benchmark::Counter;
    state.counters["tokens/s"] = Counter(static_cast<double>(T) * iters, Counter::kIsRate);
    state.counters["GFLOP/s"] = Counter(flops * iters * 1e-9, Counter::kIsRate);
    state.counters["router_share"] = layer_min < 1e300 ? router_min / layer_min : 0.0;
    state.counters["selected"] = static_cast<double>(kept);
    state.counters["threads"] = threads;
  } catch (const std::exception& e) {
    state.SkipWithError((name + ": " + e.what()).c_str());
  }
}

void register_depth_benchmarks() {
  const int threads = bench_threads();
  for (const char* variant : {"mod", "gamma_mod"}) {
    for (int64_t T : kTokens) {
      const std::string name = std::string("depth/") + variant +
                               "/E:1/k:1/d:" + std::to_string(kD) + "/f:" + std::to_string(kF) +
                               "/T:" + std::to_string(T) + "/threads:" + std::to_string(threads);
      const bool mod = std::string(variant) == "mod";
      auto* b =
          benchmark::RegisterBenchmark(name.c_str(),
                                       [name, T, threads, mod](benchmark::State& s) {
                                         if (mod) {
                                           run_layer<moekit::MoDRouter>(s, name, T, threads);
                                         } else {
                                           run_layer<moekit::GammaModRouter>(s, name, T, threads);
                                         }
                                       })
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond);
      if (T >= 2048)
        b->Iterations(3);
      else if (T >= 512)
        b->Iterations(5);
      else
        b->MinTime(0.3);
    }
  }
}

[[maybe_unused]] const int registered = (register_depth_benchmarks(), 0);

}  // namespace
}  // namespace moekit_bench
