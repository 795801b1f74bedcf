// SPDX-License-Identifier: Apache-2.0
// Layerwise recurrent (GRU / RNN) router, RMoE (arXiv 2408.06793): SparseLayer<GruRouter,
// FfnBank> forward at the foundation shapes with d_r = 256, random weights, a random incoming
// router state (a layer after the first); each registration checked once against the
// double-precision reference (tests/reference/gru_ref) before timing. Counters: tokens/s,
// GFLOP/s (experts + router), router_share = min route() time / min forward time.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "moekit/batch.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/gru.hpp"
#include "reference/gru_ref.hpp"
#include "reference/reference.hpp"

namespace moekit_bench {
namespace {

using Clock = std::chrono::steady_clock;
using GruLayer = moekit::SparseLayer<moekit::GruRouter, moekit::FfnBank>;

struct Shape {
  int64_t E, k, d, f;
};

constexpr Shape kShapes[] = {{8, 2, 1024, 2816}, {64, 8, 1024, 1408}};
constexpr int64_t kTokens[] = {1, 16, 128, 512, 2048};
constexpr int64_t kRnnTokens[] = {128, 512};  // the rnn variant: a few T only
constexpr int64_t kStateSize = 256;           // d_r

constexpr int64_t kCheckTokens = 8;   // tokens checked per registration (spread over the batch)
constexpr double kCheckRel = 1e-3;    // relative tolerance of values
constexpr double kCheckFloor = 1e-4;  // absolute floor, as a fraction of max |reference|
constexpr double kTieRel = 1e-6;      // near-tie threshold on the deciding probabilities

struct Spec {
  moekit::GruVariant variant;
  Shape shape;
  int64_t tokens;
  int threads;
  std::string name;
};

/// Uniform values in [-a, a] from a counter-based generator.
void fill_uniform(std::vector<float>& v, uint64_t& state, double a) {
  for (float& x : v) {
    state += 0x9E3779B97F4A7C15ull;
    const double u =
        static_cast<double>(moekit::detail::splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
    x = static_cast<float>((2.0 * u - 1.0) * a);
  }
}

std::vector<float> uniform(size_t n, uint64_t& state, double a) {
  std::vector<float> v(n);
  fill_uniform(v, state, a);
  return v;
}

/// A GRU router with random weights: torch's GRUCell init U(+-1/sqrt(d_r)) scaled by 1.5 for
/// the cell, projection variance ~4/d, output scaled for logits of std ~2.
moekit::GruRouter random_router(moekit::GruVariant v, const Shape& s, uint64_t seed) {
  uint64_t state = moekit::detail::splitmix64(seed);
  const int64_t dr = kStateSize, G = v == moekit::GruVariant::gru ? 3 : 1;
  const double a = 1.5 / std::sqrt(static_cast<double>(dr));
  auto cell = std::make_shared<const moekit::GruCell>(
      v, dr, uniform(static_cast<size_t>(G * dr * dr), state, a),
      uniform(static_cast<size_t>(G * dr * dr), state, a),
      uniform(static_cast<size_t>(G * dr), state, a),
      uniform(static_cast<size_t>(G * dr), state, a));
  moekit::GruRouterOptions o{.num_experts = s.E, .k = s.k, .hidden = s.d, .d_r = dr, .variant = v};
  return moekit::GruRouter(
      o, std::move(cell),
      uniform(static_cast<size_t>(dr * s.d), state,
              2.0 * std::sqrt(3.0 / static_cast<double>(s.d))),
      uniform(static_cast<size_t>(s.E * dr), state, 6.0 / std::sqrt(static_cast<double>(dr))));
}

/// At most one layer alive (the E = 64 bank is 1.1 GB of f32), built on first use of a shape;
/// the variants of a shape swap only the router. Benchmarks run in registration order.
struct LayerCache {
  int64_t E = -1;
  std::optional<moekit::GruVariant> variant;
  std::unique_ptr<GruLayer> layer;

  GruLayer& get(const Spec& spec) {
    const Shape& s = spec.shape;
    if (E != s.E || !layer) {
      layer.reset();
      variant.reset();
      uint64_t state = moekit::detail::splitmix64(0x67e0000ull + static_cast<uint64_t>(s.E));
      moekit::FfnBank bank(s.E, moekit::FfnShape{.hidden = s.d, .intermediate = s.f});
      std::vector<float> gate(static_cast<size_t>(s.f * s.d)), up(gate.size()), down(gate.size());
      const double a_in = std::sqrt(3.0 / static_cast<double>(s.d)),
                   a_out = std::sqrt(3.0 / static_cast<double>(s.f));
      for (int64_t e = 0; e < s.E; ++e) {
        fill_uniform(gate, state, a_in);
        fill_uniform(up, state, a_in);
        fill_uniform(down, state, a_out);
        bank.set_expert(e, gate.data(), up.data(), down.data());
      }
      layer = std::make_unique<GruLayer>(
          random_router(spec.variant, s, 0x67e1000ull + static_cast<uint64_t>(s.E)),
          std::move(bank));
      E = s.E;
      variant = spec.variant;
    }
    if (variant != spec.variant) {
      layer->router() = random_router(spec.variant, s, 0x67e2000ull + static_cast<uint64_t>(s.E));
      variant = spec.variant;
    }
    return *layer;
  }
};

LayerCache& layer_cache() {
  static LayerCache cache;
  return cache;
}

/// Pre-generated hidden states `[T, d]` (unit variance) and incoming router states `[T, d_r]`
/// (uniform in (-1, 1), like a GRU state), fixed seeds; rotated over in the timing loop.
struct Inputs {
  std::vector<std::vector<float>> x, state;
};

const Inputs& inputs_for(int64_t T, int64_t d, int count) {
  static std::map<std::pair<int64_t, int64_t>, Inputs> cache;
  Inputs& in = cache[{T, d}];
  while (static_cast<int>(in.x.size()) < count) {
    uint64_t state = moekit::detail::splitmix64(
        0x67e5eedull + static_cast<uint64_t>(T * 131 + d) * 977 + in.x.size());
    in.x.push_back(uniform(static_cast<size_t>(T * d), state, 1.7320508075688772));
    in.state.push_back(uniform(static_cast<size_t>(T * kStateSize), state, 1.0));
  }
  return in;
}

std::map<std::string, std::string>& verdicts() {
  static std::map<std::string, std::string> v;
  return v;
}

std::string check_error(int64_t t, const std::string& what) {
  return "token " + std::to_string(t) + ": " + what;
}

/// Runs the layer on `x [T, d]` from `state [T, d_r]` and checks up to kCheckTokens tokens
/// against the reference: exact choices (unless the deciding probabilities near-tie),
/// weights, the new state and the layer output. Returns "" or the first mismatch.
std::string check_layer(const GruLayer& layer, const float* x, const float* state, int64_t T,
                        int threads) {
  const moekit::GruRouter& r = layer.router();
  const int64_t d = layer.hidden_size(), E = layer.num_experts(), k = r.k(), dr = r.state_size();
  moekit::Batch batch = moekit::Batch::single(T, d);
  batch.router_state = {state, static_cast<size_t>(T * dr)};
  moekit::Workspace ws;
  std::vector<float> out(static_cast<size_t>(T * d));
  layer.forward(batch, x, out.data(), ws, threads);

  const int64_t n = std::min(T, kCheckTokens);
  std::vector<int64_t> sample;
  std::vector<double> xs, hs;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = n == 1 ? 0 : i * (T - 1) / (n - 1);
    sample.push_back(t);
    xs.insert(xs.end(), x + t * d, x + (t + 1) * d);
    hs.insert(hs.end(), state + t * dr, state + (t + 1) * dr);
  }
  const moekit::GruCell& c = *r.cell();
  const ref::gru::Cell cell{
      c.variant() == moekit::GruVariant::gru ? ref::gru::Variant::gru : ref::gru::Variant::rnn,
      dr,
      c.weight_ih(),
      c.weight_hh(),
      c.bias_ih(),
      c.bias_hh()};
  const ref::gru::Router router{E, k, d, r.proj_weight(), r.out_weight()};
  const ref::gru::RouteResult want = ref::gru::route(cell, router, xs, n, hs);

  // Routing and state of the sampled tokens.
  int64_t compared = 0;
  std::vector<float> got_state(static_cast<size_t>(n * dr));
  ref::Routing used = want.routing;  // the decisions the output is recomputed with
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = sample[static_cast<size_t>(i)];
    std::copy(ws.router.state.begin() + t * dr, ws.router.state.begin() + (t + 1) * dr,
              got_state.begin() + i * dr);
    const ref::TokenRouting& tr = want.routing.token[static_cast<size_t>(i)];
    const int32_t b = ws.plan.slot_offsets()[static_cast<size_t>(t)];
    if (ws.plan.slots_of(t) != k) return check_error(t, "slot count differs from k");
    if (ref::boundary_gap(tr, k) < kTieRel || ref::order_gap(tr, k) < kTieRel) {
      for (int64_t j = 0; j < k; ++j)  // near-tie: recompute the output on the library's choices
        used.token[static_cast<size_t>(i)].slots[static_cast<size_t>(j)] = {
            ws.plan.slot_expert()[static_cast<size_t>(b + j)],
            ws.plan.slot_weight()[static_cast<size_t>(b + j)], false};
      continue;
    }
    ++compared;
    for (int64_t j = 0; j < k; ++j) {
      const ref::Slot& s = tr.slots[static_cast<size_t>(j)];
      if (ws.plan.slot_expert()[static_cast<size_t>(b + j)] != s.expert)
        return check_error(t,
                           "slot " + std::to_string(j) + " expert " +
                               std::to_string(ws.plan.slot_expert()[static_cast<size_t>(b + j)]) +
                               ", expected " + std::to_string(s.expert));
      const double w = ws.plan.slot_weight()[static_cast<size_t>(b + j)];
      if (!(std::fabs(w - s.weight) <= kCheckRel * std::fabs(s.weight) + 1e-6))
        return check_error(
            t, "weight " + std::to_string(w) + ", expected " + std::to_string(s.weight));
    }
  }
  if (compared == 0) return "routing vs reference: no token compared";
  if (!(ref::max_abs(want.state) > 0))
    return "state vs reference: reference state all zero (vacuous check)";
  if (auto errs = ref::compare_values(want.state, got_state.data(), dr, kCheckRel, kCheckFloor);
      !errs.empty())
    return "state vs reference: " + errs.front();

  // Output of the sampled tokens, one expert's reference copy at a time.
  std::vector<float> xs_f(xs.begin(), xs.end()), ys(static_cast<size_t>(n * d));
  for (int64_t i = 0; i < n; ++i)
    std::copy(out.begin() + sample[static_cast<size_t>(i)] * d,
              out.begin() + (sample[static_cast<size_t>(i)] + 1) * d, ys.begin() + i * d);
  std::optional<std::pair<int64_t, ref::Ffn>> last;
  const moekit::FfnBank& bank = layer.experts();
  const ref::ExpertFn experts = [&](int64_t e, const std::vector<double>& xt) {
    if (!last || last->first != e) {
      last.reset();
      ref::Ffn f;
      f.hidden = d;
      f.intermediate = bank.shape().intermediate;
      f.gated = true;
      f.act = ref::Activation::silu;
      const size_t fd = static_cast<size_t>(d * f.intermediate);
      f.gate.resize(fd);
      f.up.resize(fd);
      f.down.resize(fd);
      bank.get_expert(e, f.gate.data(), f.up.data(), f.down.data());
      last.emplace(e, std::move(f));
    }
    return ref::ffn_forward(last->second, xt);
  };
  const std::vector<double> y = ref::moe_forward(used, experts, {}, xs_f.data(), n, d);
  if (!(ref::max_abs(y) > 0))
    return "output vs reference: reference output all zero (vacuous check)";
  if (auto errs = ref::compare_values(y, ys.data(), d, kCheckRel, kCheckFloor); !errs.empty())
    return "output vs reference: " + errs.front();
  return "";
}

int inputs_count(int64_t T) { return T >= 2048 ? 2 : T >= 512 ? 3 : 4; }

void run_layer(benchmark::State& st, const Spec& spec) {
  try {
    GruLayer& layer = layer_cache().get(spec);
    const int64_t T = spec.tokens, d = layer.hidden_size(), dr = layer.router().state_size();
    const size_t n_in = static_cast<size_t>(inputs_count(T));
    const Inputs& in = inputs_for(T, d, static_cast<int>(n_in));
    auto batch_of = [&](size_t i) {
      moekit::Batch b = moekit::Batch::single(T, d);
      b.router_state = {in.state[i].data(), static_cast<size_t>(T * dr)};
      return b;
    };

    auto [verdict, fresh] = verdicts().try_emplace(spec.name);
    if (fresh)
      verdict->second = check_layer(layer, in.x[0].data(), in.state[0].data(), T, spec.threads);
    if (!verdict->second.empty()) {
      st.SkipWithError(verdict->second.c_str());
      return;
    }

    // Router alone: its shortest call, and each input's executed FLOPs.
    moekit::RoutingPlan plan;
    moekit::RouterScratch scratch;
    std::vector<double> flops(n_in);
    const double router_flops = static_cast<double>(T) * layer.router().flops_per_token();
    for (size_t i = 0; i < n_in; ++i) {
      layer.router().route(batch_of(i), in.x[i].data(), plan, scratch, spec.threads);
      flops[i] =
          static_cast<double>(plan.num_kept()) * layer.experts().flops_per_row() + router_flops;
    }
    int64_t router_reps = 0;
    double router_min = 1e300;
    const auto r0 = Clock::now();
    while (
        router_reps < static_cast<int64_t>(n_in) ||
        (std::chrono::duration<double>(Clock::now() - r0).count() < 0.05 && router_reps < 100000)) {
      const size_t i = static_cast<size_t>(router_reps) % n_in;
      const moekit::Batch b = batch_of(i);
      const auto c0 = Clock::now();
      layer.router().route(b, in.x[i].data(), plan, scratch, spec.threads);
      router_min = std::min(router_min, std::chrono::duration<double>(Clock::now() - c0).count());
      ++router_reps;
    }

    moekit::Workspace ws;
    std::vector<float> out(static_cast<size_t>(T * d));
    layer.forward(batch_of(0), in.x[0].data(), out.data(), ws, spec.threads);  // warm-up: grows ws

    double sum_flops = 0, layer_min = 1e300;
    size_t i = 0;
    for (auto _ : st) {
      const moekit::Batch b = batch_of(i);
      const auto c0 = Clock::now();
      layer.forward(b, in.x[i].data(), out.data(), ws, spec.threads);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
      layer_min = std::min(layer_min, std::chrono::duration<double>(Clock::now() - c0).count());
      sum_flops += flops[i];
      i = (i + 1) % n_in;
    }

    using benchmark::Counter;
    st.counters["tokens/s"] =
        Counter(static_cast<double>(T) * static_cast<double>(st.iterations()), Counter::kIsRate);
    st.counters["GFLOP/s"] = Counter(sum_flops * 1e-9, Counter::kIsRate);
    st.counters["router_share"] = layer_min < 1e300 ? router_min / layer_min : 0.0;
    st.counters["router_ms"] = router_min * 1e3;
    st.counters["threads"] = spec.threads;
  } catch (const std::exception& e) {
    st.SkipWithError((spec.name + ": " + e.what()).c_str());
  }
}

void add(moekit::GruVariant v, const Shape& s, int64_t T, int threads) {
  Spec spec{v, s, T, threads, ""};
  spec.name = std::string("gru/") + moekit::GruRouter::variant_name(v) +
              "/E:" + std::to_string(s.E) + "/k:" + std::to_string(s.k) +
              "/d:" + std::to_string(s.d) + "/f:" + std::to_string(s.f) +
              "/T:" + std::to_string(T) + "/threads:" + std::to_string(threads);
  auto* b = benchmark::RegisterBenchmark(spec.name.c_str(), run_layer, spec)
                ->UseRealTime()
                ->Unit(benchmark::kMillisecond);
  if (T >= 2048)
    b->Iterations(2);
  else if (T >= 512)
    b->Iterations(3);
  else
    b->MinTime(0.3);
}

/// One registration per (variant, shape, tokens): gru at every T, rnn at a few.
void register_gru_benchmarks() {
  const int threads = bench_threads();
  for (const Shape& s : kShapes) {
    for (int64_t T : kTokens) add(moekit::GruVariant::gru, s, T, threads);
    for (int64_t T : kRnnTokens) add(moekit::GruVariant::rnn, s, T, threads);
  }
}

[[maybe_unused]] const int registered = (register_gru_benchmarks(), 0);

}  // namespace

}  // namespace moekit_bench
