// SPDX-License-Identifier: Apache-2.0
// Prototype-routed MoE layers (ROUTING.md section 6), random weights, foundation shapes:
// ProMoE (E routed experts + the unconditional expert + an ungated shared expert) with every
// token conditional (`promoe`) or a classifier-free-guidance batch (`promoe_cfg`: the first
// ceil(T/2) tokens conditional, the rest unconditional), and nearest-centroid top-1. Each
// registration is checked once against the double-precision reference
// (tests/reference/prototype_ref) before timing, and times an OLMoE-style top-k layer of the
// same shape in the same run, interleaved: `vs_topk_per_slot` is the layer's time per executed
// FFN row (kept slots + shared-expert rows) over the top-k layer's time per slot, the top-k
// layer having the variant's k (ProMoE: the shape's k; nearest centroid: 1); the issue's
// target is <= 1.2. E = 64 runs T <= 512 (T = 2048 is ~100 GFLOP per forward).
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
#include <tuple>
#include <utility>
#include <vector>

#include "bench_common.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/prototype.hpp"
#include "reference/prototype_ref.hpp"
#include "reference/reference.hpp"

namespace moekit_bench {

void register_prototype_benchmarks();

namespace {

namespace pref = ref::prototype;
using Clock = std::chrono::steady_clock;
using ProMoELayer = moekit::SparseLayer<moekit::ProMoERouter, moekit::FfnBank>;
using CentroidLayer = moekit::SparseLayer<moekit::CentroidRouter, moekit::FfnBank>;

struct Shape {
  int64_t E, k, d, f;
};
constexpr Shape kShapes[] = {{8, 2, 1024, 2816}, {64, 8, 1024, 1408}};
constexpr int64_t kTokens[] = {1, 16, 128, 512, 2048};

/// promoe: every token conditional (k routed slots + the shared row, like the baseline's k
/// slots); promoe_cfg: a CFG batch, the first ceil(T/2) tokens conditional, the rest
/// unconditional (one slot on the unconditional expert + the shared row); centroid: top-1.
enum class Variant { promoe, promoe_cfg, centroid };
const char* name_of(Variant v) {
  return v == Variant::promoe ? "promoe" : v == Variant::promoe_cfg ? "promoe_cfg" : "centroid";
}
bool is_promoe(Variant v) { return v != Variant::centroid; }

constexpr int64_t kCheckTokens = 6;   // tokens of the layer output checked per registration
constexpr double kCheckRel = 1e-3;    // relative tolerance of output values
constexpr double kCheckFloor = 1e-4;  // absolute floor, fraction of max |reference output|
constexpr double kTieRel = 1e-6;      // near-tie exclusion (tests/test_prototype.cpp)

struct Spec {
  Variant variant;
  Shape shape;
  int64_t tokens;
  int threads;
  uint64_t seed;
  bool last;  // frees the layers afterwards
  std::string name;
};

// ------------------------------------------------------------------ random weights and inputs

/// Uniform values of unit variance from splitmix64 (fast enough for gigabytes of weights).
struct Uniform {
  uint64_t state;
  float next(double scale) {
    state += 0x9E3779B97F4A7C15ull;
    const double u =
        static_cast<double>(moekit::detail::splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
    return static_cast<float>((2.0 * u - 1.0) * 1.7320508075688772 * scale);
  }
  std::vector<float> vec(int64_t n, double scale) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = next(scale);
    return v;
  }
};

/// A bank of `n` SwiGLU experts, variance 1/fan_in.
moekit::FfnBank random_bank(int64_t n, int64_t d, int64_t f, Uniform& g) {
  moekit::FfnBank bank(n, moekit::FfnShape{d, f, true, moekit::Activation::silu});
  std::vector<float> w(static_cast<size_t>(3 * f * d));
  for (int64_t e = 0; e < n; ++e) {
    const double a = 1.0 / std::sqrt(static_cast<double>(d)),
                 b = 1.0 / std::sqrt(static_cast<double>(f));
    for (int64_t i = 0; i < 2 * f * d; ++i) w[static_cast<size_t>(i)] = g.next(a);
    for (int64_t i = 2 * f * d; i < 3 * f * d; ++i) w[static_cast<size_t>(i)] = g.next(b);
    bank.set_expert(e, w.data(), w.data() + f * d, w.data() + 2 * f * d);
  }
  return bank;
}

std::unique_ptr<ProMoELayer> make_promoe(const Shape& s, uint64_t seed) {
  Uniform g{moekit::detail::splitmix64(seed)};
  moekit::ProMoEOptions o;
  o.num_experts = s.E;
  o.k = s.k;
  o.hidden = s.d;
  moekit::ProMoERouter router(o, g.vec(s.E * s.d, 1.0));
  moekit::FfnBank bank = random_bank(s.E + 1, s.d, s.f, g);  // experts.{i}, uncond_expert at E
  std::vector<moekit::SharedExpert> shared;
  shared.push_back({random_bank(1, s.d, s.f, g), {}});  // ungated shared_expert, width f
  return std::make_unique<ProMoELayer>(std::move(router), std::move(bank), std::move(shared));
}

std::unique_ptr<CentroidLayer> make_centroid(const Shape& s, uint64_t seed) {
  Uniform g{moekit::detail::splitmix64(seed)};
  moekit::CentroidOptions o;
  o.num_experts = s.E;
  o.hidden = s.d;
  moekit::CentroidRouter router(o, g.vec(s.E * s.d, 1.0));
  return std::make_unique<CentroidLayer>(std::move(router), random_bank(s.E, s.d, s.f, g));
}

/// The baseline: moekit::random_layer with OLMoE's semantics (softmax top-k, no
/// renormalisation, SwiGLU) at this shape.
std::unique_ptr<moekit::TopKLayer> make_topk(const Shape& s, uint64_t seed) {
  moekit::LayerConfig c = moekit::preset_defaults("olmoe");
  c.router.num_experts = s.E;
  c.router.k = s.k;
  c.router.hidden = s.d;
  c.experts.hidden = s.d;
  c.experts.intermediate = s.f;
  c.router.validate();
  return std::make_unique<moekit::TopKLayer>(moekit::random_layer(c, seed));
}

/// At most one prototype layer and one top-k layer alive (the E = 64 ones are ~1.1 GB of
/// f32 each). Benchmarks run in registration order, so each is built once.
struct Layers {
  std::string proto_key, topk_key;
  std::unique_ptr<ProMoELayer> promoe;
  std::unique_ptr<CentroidLayer> centroid;
  std::unique_ptr<moekit::TopKLayer> topk;

  void get(const Spec& s) {
    const std::string shape = std::to_string(s.shape.E) + "/" + std::to_string(s.shape.k);
    const std::string pk = std::string(is_promoe(s.variant) ? "promoe" : "centroid") + "/" + shape;
    if (proto_key != pk) {
      promoe.reset();
      centroid.reset();
      proto_key.clear();
      if (is_promoe(s.variant))
        promoe = make_promoe(s.shape, s.seed);
      else
        centroid = make_centroid(s.shape, s.seed);
      proto_key = pk;
    }
    // The baseline has the variant's k (its slots per token): ProMoE the shape's k, nearest
    // centroid 1, so both layers spread the same number of routed rows over the E experts.
    Shape base = s.shape;
    base.k = is_promoe(s.variant) ? s.shape.k : 1;
    const std::string tk = std::to_string(base.E) + "/" + std::to_string(base.k);
    if (topk_key != tk) {
      topk.reset();
      topk_key.clear();
      topk = make_topk(base, 0x70C4ull + static_cast<uint64_t>(base.E * 16 + base.k));
      topk_key = tk;
    }
  }
  void clear() {
    promoe.reset();
    centroid.reset();
    topk.reset();
    proto_key.clear();
    topk_key.clear();
  }
};

Layers& layers() {
  static Layers l;
  return l;
}

int inputs_count(int64_t T) { return T >= 2048 ? 2 : T >= 512 ? 3 : 4; }

/// Pre-generated hidden states `[T, d]`, unit variance, fixed seeds; rotated over in the loop.
const std::vector<std::vector<float>>& inputs_for(int64_t T, int64_t d) {
  static std::map<std::pair<int64_t, int64_t>, std::vector<std::vector<float>>> cache;
  auto& v = cache[{T, d}];
  while (static_cast<int>(v.size()) < inputs_count(T)) {
    Uniform g{moekit::detail::splitmix64(0x9707000ull + static_cast<uint64_t>(T * 131 + d) * 977 +
                                         v.size())};
    v.push_back(g.vec(T * d, 1.0));
  }
  return v;
}

/// CFG batch layout: tokens [0, ceil(T/2)) conditional (type 0), the rest unconditional (1).
std::vector<int32_t> cfg_types(int64_t T) {
  std::vector<int32_t> t(static_cast<size_t>(T), 0);
  for (int64_t i = (T + 1) / 2; i < T; ++i) t[static_cast<size_t>(i)] = 1;
  return t;
}

std::map<std::string, std::string>& verdicts() {
  static std::map<std::string, std::string> v;
  return v;
}

// ------------------------------------------------------------------ reference check

/// Expert e of a bank as a reference FFN.
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

std::string first_error(const std::vector<std::string>& errs) {
  return errs.front() + (errs.size() > 1 ? " (+" + std::to_string(errs.size() - 1) + " more)" : "");
}

/// Runs the layer on `x` and compares every token's decisions (exact, near-ties excluded)
/// and weights with the reference, then the output of up to kCheckTokens tokens spread over
/// the batch (near-tie tokens on the library's own decisions). Returns "" or the mismatch.
template <class Layer>
std::string check_layer(const Layer& layer, const moekit::Batch& batch, const float* x, int threads,
                        const pref::Decisions& want, int64_t k) {
  const int64_t T = batch.tokens, d = layer.hidden_size();
  moekit::Workspace ws;
  std::vector<float> out(static_cast<size_t>(T * d));
  layer.forward(batch, x, out.data(), ws, threads);
  const ref::PlanView got = ref::view_of(ws.plan);
  if (auto errs = ref::plan_invariant_errors(got, nullptr, -1); !errs.empty())
    return "plan invariants: " + first_error(errs);
  if (got.experts != want.experts) return "plan experts " + std::to_string(got.experts);
  const ref::Routing lib = ref::routing_from_view(got, nullptr);
  ref::Routing use = pref::as_routing(want);
  int64_t compared = 0, excluded = 0;
  for (int64_t t = 0; t < T; ++t) {
    const pref::TokenDecision& td = want.token[static_cast<size_t>(t)];
    const ref::TokenRouting& lt = lib.token[static_cast<size_t>(t)];
    if (lt.slots.size() != td.experts.size())
      return "token " + std::to_string(t) + ": " + std::to_string(lt.slots.size()) +
             " slots, expected " + std::to_string(td.experts.size());
    if (!td.unconditional &&
        (pref::boundary_gap(td, k) < kTieRel || pref::order_gap(td, k) < kTieRel)) {
      ++excluded;
      use.token[static_cast<size_t>(t)] = lt;
      continue;
    }
    for (size_t j = 0; j < td.experts.size(); ++j) {
      if (lt.slots[j].expert != td.experts[j])
        return "token " + std::to_string(t) + " slot " + std::to_string(j) + ": expert " +
               std::to_string(lt.slots[j].expert) + ", expected " + std::to_string(td.experts[j]);
      if (!(std::fabs(lt.slots[j].weight - td.weights[j]) <=
            1e-4 * std::fabs(td.weights[j]) + 1e-6))
        return "token " + std::to_string(t) + " slot " + std::to_string(j) + ": weight " +
               std::to_string(lt.slots[j].weight) + ", expected " + std::to_string(td.weights[j]);
    }
    ++compared;
  }
  if (T > 0 && compared == 0)
    return "routing vs reference: no token compared (" + std::to_string(excluded) + " near-ties)";

  const int64_t n = std::min(T, kCheckTokens);
  ref::Routing sample;
  sample.tokens = n;
  sample.experts = want.experts;
  std::vector<float> xs(static_cast<size_t>(n * d)), ys(static_cast<size_t>(n * d));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = n == 1 ? 0 : i * (T - 1) / (n - 1);
    sample.token.push_back(use.token[static_cast<size_t>(t)]);
    std::copy(x + t * d, x + (t + 1) * d, xs.begin() + i * d);
    std::copy(out.begin() + t * d, out.begin() + (t + 1) * d, ys.begin() + i * d);
  }
  std::optional<std::pair<int64_t, ref::Ffn>> last;  // one expert's copy at a time
  const ref::ExpertFn experts = [&](int64_t e, const std::vector<double>& xt) {
    if (!last || last->first != e) {
      last.reset();
      last.emplace(e, reference_ffn(layer.experts(), e));
    }
    return ref::ffn_forward(last->second, xt);
  };
  std::vector<ref::Shared> shared;
  for (const moekit::SharedExpert& s : layer.shared_experts())
    shared.push_back({reference_ffn(s.ffn, 0), s.gate});
  const std::vector<double> y = ref::moe_forward(sample, experts, shared, xs.data(), n, d);
  if (!(ref::max_abs(y) > 0))
    return "output vs reference: reference output is all zero (vacuous check)";
  if (auto errs = ref::compare_values(y, ys.data(), d, kCheckRel, kCheckFloor); !errs.empty())
    return "output vs reference: " + first_error(errs);
  return "";
}

/// The reference decisions of a layer's router on `x [T, d]`.
pref::Decisions reference_of(const ProMoELayer& layer, const float* x, int64_t T,
                             const std::vector<int32_t>& types) {
  const moekit::ProMoERouter& r = layer.router();
  const moekit::ProMoEOptions& o = r.options();
  return pref::route_promoe({o.num_experts, o.k, o.hidden, o.tau_r, o.uncond_token_type},
                            r.prototypes().data(), x, T, nullptr,
                            types.empty() ? nullptr : types.data());
}
pref::Decisions reference_of(const CentroidLayer& layer, const float* x, int64_t T,
                             const std::vector<int32_t>&) {
  const moekit::CentroidRouter& r = layer.router();
  return pref::route_centroid(r.centroids().data(), r.num_experts(), r.hidden_size(), x, T,
                              nullptr);
}
int64_t layer_k(const ProMoELayer& layer) { return layer.router().k(); }
int64_t layer_k(const CentroidLayer&) { return 1; }

// ------------------------------------------------------------------ timing

/// Shortest call of `f` over at least `reps` calls and ~`seconds` (robust to preemption on a
/// loaded machine).
template <class F>
double min_time(F&& f, int reps, double seconds) {
  double best = 1e300;
  const auto t0 = Clock::now();
  for (int i = 0; i < reps || (std::chrono::duration<double>(Clock::now() - t0).count() < seconds &&
                               i < 100000);
       ++i) {
    const auto c0 = Clock::now();
    f(i);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - c0).count());
  }
  return best;
}

/// Executed FFN rows (kept slots + shared-expert rows) and FLOPs of one forward.
template <class Layer>
std::pair<double, double> executed(const Layer& layer, const moekit::RoutingPlan& plan,
                                   const moekit::Batch& batch, int64_t scored_tokens) {
  const double routed = static_cast<double>(batch.routed_tokens());
  double rows = static_cast<double>(plan.num_kept());
  double flops = rows * layer.experts().flops_per_row();
  for (const moekit::SharedExpert& s : layer.shared_experts()) {
    rows += routed;
    flops += routed * s.ffn.flops_per_row();
  }
  flops += static_cast<double>(scored_tokens) * layer.router().flops_per_token();
  return {rows, flops};
}

template <class Layer>
void time_layer(benchmark::State& state, const Spec& spec, const Layer& layer,
                const moekit::TopKLayer& topk, const std::vector<int32_t>& types) {
  const int64_t T = spec.tokens, d = layer.hidden_size();
  moekit::Batch batch = moekit::Batch::single(T, d);
  batch.token_types = types;
  const auto& inputs = inputs_for(T, d);
  const auto n_in = static_cast<size_t>(inputs_count(T));
  const int64_t scored = spec.variant == Variant::promoe_cfg ? (T + 1) / 2 : T;

  auto [verdict, fresh] = verdicts().try_emplace(spec.name);
  if (fresh) {
    verdict->second = check_layer(layer, batch, inputs[0].data(), spec.threads,
                                  reference_of(layer, inputs[0].data(), T, types), layer_k(layer));
  }
  if (!verdict->second.empty()) {
    state.SkipWithError(verdict->second.c_str());
    return;
  }

  // Router alone, and each input's plan for the accounting.
  moekit::RoutingPlan plan;
  moekit::RouterScratch scratch;
  std::vector<double> rows(n_in), flops(n_in);
  for (size_t i = 0; i < n_in; ++i) {
    layer.router().route(batch, inputs[i].data(), plan, scratch, spec.threads);
    std::tie(rows[i], flops[i]) = executed(layer, plan, batch, scored);
  }
  const double router_min = min_time(
      [&](int i) {
        layer.router().route(batch, inputs[static_cast<size_t>(i) % n_in].data(), plan, scratch,
                             spec.threads);
      },
      static_cast<int>(n_in), 0.02);

  moekit::Workspace ws;
  std::vector<float> out(static_cast<size_t>(T * d));
  layer.forward(batch, inputs[0].data(), out.data(), ws, spec.threads);  // warm-up: grows ws
  // The top-k baseline on the same inputs, shape and threads, interleaved with the timed
  // forwards (outside the timed region) so both see the same machine load.
  const moekit::Batch plain = moekit::Batch::single(T, d);
  moekit::Workspace tws;
  std::vector<float> tout(out.size());
  topk.forward(plain, inputs[0].data(), tout.data(), tws, spec.threads);  // warm-up
  double sum_flops = 0, layer_min = 1e300, topk_min = 1e300, rows_at_min = 1;
  size_t i = 0;
  for (auto _ : state) {
    const auto c0 = Clock::now();
    layer.forward(batch, inputs[i].data(), out.data(), ws, spec.threads);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    const double dt = std::chrono::duration<double>(Clock::now() - c0).count();
    if (dt < layer_min) {
      layer_min = dt;
      rows_at_min = rows[i];
    }
    sum_flops += flops[i];
    state.PauseTiming();
    const auto c1 = Clock::now();
    topk.forward(plain, inputs[i].data(), tout.data(), tws, spec.threads);
    benchmark::DoNotOptimize(tout.data());
    benchmark::ClobberMemory();
    topk_min = std::min(topk_min, std::chrono::duration<double>(Clock::now() - c1).count());
    state.ResumeTiming();
    i = (i + 1) % n_in;
  }
  const double topk_slots = static_cast<double>(T * topk.router().k());

  using benchmark::Counter;
  const auto iters = static_cast<double>(state.iterations());
  state.counters["tokens/s"] = Counter(static_cast<double>(T) * iters, Counter::kIsRate);
  state.counters["GFLOP/s"] = Counter(sum_flops * 1e-9, Counter::kIsRate);
  state.counters["router_share"] = layer_min < 1e300 ? router_min / layer_min : 0.0;
  state.counters["rows"] = rows_at_min;
  state.counters["us_per_slot"] = layer_min * 1e6 / rows_at_min;
  state.counters["topk_us_per_slot"] = topk_min * 1e6 / topk_slots;
  state.counters["vs_topk_per_slot"] = (layer_min / rows_at_min) / (topk_min / topk_slots);
  state.counters["threads"] = spec.threads;
}

void run(benchmark::State& state, const Spec& spec) {
  try {
    Layers& l = layers();
    l.get(spec);
    if (is_promoe(spec.variant)) {
      time_layer(
          state, spec, *l.promoe, *l.topk,
          spec.variant == Variant::promoe_cfg ? cfg_types(spec.tokens) : std::vector<int32_t>{});
    } else {
      time_layer(state, spec, *l.centroid, *l.topk, {});
    }
    if (spec.last) l.clear();
  } catch (const std::exception& e) {
    state.SkipWithError((spec.name + ": " + e.what()).c_str());
  }
}

}  // namespace

void register_prototype_benchmarks() {
  const int threads = bench_threads();
  uint64_t seed = 6000;
  std::vector<Spec> specs;
  for (const Shape& s : kShapes) {
    for (Variant v : {Variant::promoe, Variant::promoe_cfg, Variant::centroid}) {
      ++seed;
      for (int64_t T : kTokens) {
        if (s.E >= 64 && T >= 2048)
          continue;  // ~100 GFLOP per forward (and as much for the baseline): too slow here
        if (v == Variant::promoe_cfg && T != 16 && T != 512) continue;  // two sizes suffice
        const int64_t k = is_promoe(v) ? s.k : 1;
        Spec spec{v, s, T, threads, seed, false, ""};
        spec.name = std::string("prototype/") + name_of(v) + "/E:" + std::to_string(s.E) +
                    "/k:" + std::to_string(k) + "/d:" + std::to_string(s.d) +
                    "/f:" + std::to_string(s.f) + "/T:" + std::to_string(T) +
                    "/threads:" + std::to_string(threads);
        specs.push_back(spec);
      }
    }
  }
  specs.back().last = true;
  for (const Spec& spec : specs) {
    auto* b = benchmark::RegisterBenchmark(spec.name.c_str(), run, spec)
                  ->UseRealTime()
                  ->Unit(benchmark::kMillisecond);
    // Few fixed iterations where one forward takes ~0.1-2 s (and always for the last one, which
    // frees the layers: one call); a short min time elsewhere.
    if (spec.tokens >= 2048 || spec.last)
      b->Iterations(2);
    else if (spec.tokens >= 512)
      b->Iterations(3);
    else
      b->MinTime(0.1);
  }
}

}  // namespace moekit_bench

namespace {
[[maybe_unused]] const int registered = (moekit_bench::register_prototype_benchmarks(), 0);
}  // namespace
