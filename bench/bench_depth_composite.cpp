// SPDX-License-Identifier: Apache-2.0
// Dr.LLM (skip / execute / repeat, forced by the router bias) and Mixture-of-Recursions
// (N_r = 3) layers wrapping one SwiGLU FFN block (d, f) = (1024, 2816), random weights, one
// sequence of T tokens; each registration checked once against the double-precision
// reference (tests/reference/depth_composite_ref) before timing. Counters: tokens/s, GFLOP/s
// (block rows executed + router), router_share (min route time / min forward time).
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
#include "moekit/blocks.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/layers/drllm.hpp"
#include "moekit/layers/mor.hpp"
#include "reference/depth_composite_ref.hpp"

namespace moekit_bench {
namespace {

using Clock = std::chrono::steady_clock;
using Bank = moekit::FunctorBank<moekit::FfnBlock>;

constexpr int64_t kD = 1024, kF = 2816;
constexpr int64_t kTokens[] = {128, 512, 2048};
constexpr int64_t kCheckTokens = 8;  // sampled tokens whose output is checked at the benchmark's T
constexpr int64_t kCheckSmallT =
    48;  // MoR: full reference check (selection included) on this many tokens
constexpr double kCheckRel = 1e-3, kCheckFloor = 1e-4;

// Deterministic uniform values in [-a, a) from a splitmix64 counter.
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
std::vector<float> uniform(size_t n, double a, uint64_t seed) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    const double u =
        static_cast<double>(mix(seed * 0x100000001B3ull + i) >> 11) * (1.0 / 9007199254740992.0);
    v[i] = static_cast<float>((2.0 * u - 1.0) * a);
  }
  return v;
}

// The FFN block, its reference copy, and the two routers' weights; built once.
struct Model {
  ref_dc::FfnWeights ffn;
  Bank bank;
  ref_dc::DrLlmParams drllm;  // b2 set per variant
  ref_dc::MoRParams mor;
};

const Model& model() {
  static const std::unique_ptr<Model> m = [] {
    ref_dc::FfnWeights w;
    w.hidden = kD;
    w.intermediate = kF;
    w.gated = true;
    w.act = ref_dc::Act::silu;
    const double a_in = std::sqrt(3.0 / double(kD)), a_out = std::sqrt(3.0 / double(kF));
    w.gate = uniform(static_cast<size_t>(kF * kD), a_in, 1);
    w.up = uniform(static_cast<size_t>(kF * kD), a_in, 2);
    w.down = uniform(static_cast<size_t>(kD * kF), a_out, 3);
    moekit::FfnBank fb(1, moekit::FfnShape{kD, kF, true, moekit::Activation::silu});
    fb.set_expert(0, w.gate.data(), w.up.data(), w.down.data());
    auto out =
        std::unique_ptr<Model>(new Model{w, Bank({moekit::FfnBlock(std::move(fb))}), {}, {}});
    out->drllm.hidden = kD;
    out->drllm.w0 = uniform(static_cast<size_t>(128 * kD), a_in, 4);
    out->drllm.b0 = uniform(128, 0.1, 5);
    out->drllm.w2 = uniform(3 * 128, std::sqrt(3.0 / 128.0), 6);
    out->drllm.b2 = {0, 0, 0};
    out->mor.hidden = kD;
    out->mor.num_recursions = 3;
    out->mor.theta = uniform(static_cast<size_t>(3 * kD), a_in, 7);
    return out;
  }();
  return *m;
}

const std::vector<float>& input(int64_t T) {
  static std::map<int64_t, std::vector<float>> cache;
  auto& v = cache[T];
  if (v.empty())
    v = uniform(static_cast<size_t>(T * kD), 1.7320508075688772, 100 + static_cast<uint64_t>(T));
  return v;
}

std::map<std::string, std::string>& verdicts() {
  static std::map<std::string, std::string> v;
  return v;
}

std::string first_errors(const std::vector<std::string>& errs) {
  return errs.empty()
             ? ""
             : errs.front() +
                   (errs.size() > 1 ? " (+" + std::to_string(errs.size() - 1) + " more)" : "");
}

// Sampled tokens as a small batch (FFN blocks are row-wise: a token's output depends on its row
// only).
std::vector<int64_t> samples(int64_t T) {
  std::vector<int64_t> s;
  const int64_t n = std::min(T, kCheckTokens);
  for (int64_t i = 0; i < n; ++i) s.push_back(n == 1 ? 0 : i * (T - 1) / (n - 1));
  return s;
}
std::vector<float> rows_of(const std::vector<float>& x, const std::vector<int64_t>& toks) {
  std::vector<float> r;
  for (int64_t t : toks) r.insert(r.end(), x.begin() + t * kD, x.begin() + (t + 1) * kD);
  return r;
}
ref_dc::Layout single(int64_t n) {
  ref_dc::Layout l;
  l.tokens = n;
  l.hidden = kD;
  return l;
}

// ------------------------------------------------------------------------ Dr.LLM
moekit::DrLlmRouter drllm_router(int action) {
  const ref_dc::DrLlmParams& p = model().drllm;
  std::vector<float> b2{0, 0, 0};
  b2[static_cast<size_t>(action)] = 100.0f;
  return moekit::DrLlmRouter(moekit::DrLlmOptions{kD, 128, 8}, p.w0, p.b0, p.w2, b2);
}

std::string check_drllm(const moekit::DrLlmLayer<Bank>& layer, int action, int64_t T, int threads) {
  const std::vector<float>& x = input(T);
  moekit::DrLlmWorkspace ws;
  std::vector<float> out(x.size());
  const moekit::Batch batch = moekit::Batch::single(T, kD);
  layer.forward(batch, x.data(), out.data(), ws, threads);
  ref_dc::DrLlmParams p = model().drllm;
  p.b2 = layer.router().b2();
  const ref_dc::DrLlmDecision want = ref_dc::drllm_decide(p, x.data(), single(T));
  if (ws.repeats.size() != 1 || ws.repeats[0] != want.repeats[0] || want.repeats[0] != action)
    return "drllm decision: got " + std::to_string(ws.repeats.empty() ? -1 : ws.repeats[0]) +
           ", reference " + std::to_string(want.repeats[0]) + ", forced " + std::to_string(action);
  for (int a = 0; a < 3; ++a)
    if (std::fabs(ws.layer.router.logits[static_cast<size_t>(a)] -
                  want.logits[0][static_cast<size_t>(a)]) >
        1e-3 * (1 + std::fabs(want.logits[0][static_cast<size_t>(a)])))
      return "drllm logit " + std::to_string(a) + " differs from the reference";
  const std::vector<int64_t> toks = samples(T);
  const std::vector<float> xs = rows_of(x, toks), ys = rows_of(out, toks);
  const std::vector<double> y =
      ref_dc::drllm_forward({action}, ref_dc::ffn_block(model().ffn), xs.data(),
                            single(static_cast<int64_t>(toks.size())));
  if (action > 0 && !(ref_dc::max_abs(y) > 0))
    return "reference output is all zero (vacuous check)";
  if (auto errs = ref_dc::compare_values(y, ys.data(), kD, kCheckRel, kCheckFloor); !errs.empty())
    return "drllm output vs reference: " + first_errors(errs);
  return "";
}

void run_drllm(benchmark::State& state, int action, int64_t T, int threads,
               const std::string& name) {
  try {
    static std::map<int, std::unique_ptr<moekit::DrLlmLayer<Bank>>> layers;
    auto& layer = layers[action];
    if (!layer)
      layer = std::make_unique<moekit::DrLlmLayer<Bank>>(drllm_router(action), model().bank);
    auto [verdict, fresh] = verdicts().try_emplace(name);
    if (fresh) verdict->second = check_drllm(*layer, action, T, threads);
    if (!verdict->second.empty()) {
      state.SkipWithError(verdict->second.c_str());
      return;
    }
    const std::vector<float>& x = input(T);
    const moekit::Batch batch = moekit::Batch::single(T, kD);
    moekit::RouterScratch scratch;
    double router_min = 1e300;
    const auto r0 = Clock::now();
    for (int64_t i = 0;
         i < 3 || (std::chrono::duration<double>(Clock::now() - r0).count() < 0.02 && i < 10000);
         ++i) {
      const auto c0 = Clock::now();
      layer->router().decide(batch, x.data(), scratch, threads);
      router_min = std::min(router_min, std::chrono::duration<double>(Clock::now() - c0).count());
    }
    moekit::DrLlmWorkspace ws;
    std::vector<float> out(x.size());
    layer->forward(batch, x.data(), out.data(), ws, threads);  // warm-up: grows ws
    const double flops = static_cast<double>(action * T) * model().bank.expert(0).flops_per_row() +
                         layer->router().flops(batch);
    double layer_min = 1e300;
    for (auto _ : state) {
      const auto c0 = Clock::now();
      layer->forward(batch, x.data(), out.data(), ws, threads);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
      layer_min = std::min(layer_min, std::chrono::duration<double>(Clock::now() - c0).count());
    }
    const auto iters = static_cast<double>(state.iterations());
    using benchmark::Counter;
    state.counters["tokens/s"] = Counter(static_cast<double>(T) * iters, Counter::kIsRate);
    state.counters["GFLOP/s"] = Counter(flops * iters * 1e-9, Counter::kIsRate);
    state.counters["router_share"] = router_min / layer_min;
    state.counters["repeats"] = action;
    state.counters["threads"] = threads;
  } catch (const std::exception& e) {
    state.SkipWithError((name + ": " + e.what()).c_str());
  }
}

// ------------------------------------------------------------------------ MoR
// Full reference (selection included) on a small batch of two sequences.
std::string check_mor_small(const moekit::MoRLayer<Bank>& layer, int threads) {
  const int64_t T = kCheckSmallT;
  const std::vector<float> x = uniform(static_cast<size_t>(T * kD), 1.7320508075688772, 999);
  const std::vector<int32_t> offs{0, 20, static_cast<int32_t>(T)};
  moekit::Batch batch = moekit::Batch::single(T, kD);
  batch.sequence_offsets = offs;
  moekit::MoRWorkspace ws;
  std::vector<float> out(x.size());
  layer.forward(batch, x.data(), out.data(), ws, threads);
  ref_dc::Layout l = single(T);
  l.offsets = {0, 20, T};
  const ref_dc::MoRResult want =
      ref_dc::mor_forward(model().mor, ref_dc::ffn_block(model().ffn), x.data(), l);
  for (int64_t s = 0; s < 2; ++s)
    if (want.sequence_gap[static_cast<size_t>(s)] < 1e-6)
      return "";  // near-tie: the selection is not checkable
  for (int64_t t = 0; t < T; ++t)
    if (ws.depth[static_cast<size_t>(t)] != want.depth[static_cast<size_t>(t)])
      return "mor depth of token " + std::to_string(t) + ": got " +
             std::to_string(ws.depth[static_cast<size_t>(t)]) + ", reference " +
             std::to_string(want.depth[static_cast<size_t>(t)]);
  if (!(ref_dc::max_abs(want.out) > 0)) return "reference output is all zero (vacuous check)";
  if (auto errs = ref_dc::compare_values(want.out, out.data(), kD, kCheckRel, kCheckFloor);
      !errs.empty())
    return "mor output vs reference (small batch): " + first_errors(errs);
  return "";
}

// At the benchmark's T: per-recursion counts, and sampled tokens' outputs along the library's
// decisions.
std::string check_mor(const moekit::MoRLayer<Bank>& layer, int64_t T, int threads) {
  const std::vector<float>& x = input(T);
  moekit::MoRWorkspace ws;
  std::vector<float> out(x.size());
  layer.forward(moekit::Batch::single(T, kD), x.data(), out.data(), ws, threads);
  const int64_t N = model().mor.num_recursions;
  for (int64_t r = 0; r < N; ++r) {
    int64_t n = 0;
    for (int32_t v : ws.depth) n += v > r;
    if (n != std::max<int64_t>(1, (N - r) * T / N))
      return "mor recursion " + std::to_string(r) + " ran " + std::to_string(n) + " tokens";
  }
  const std::vector<int64_t> toks = samples(T);
  const std::vector<float> xs = rows_of(x, toks), ys = rows_of(out, toks);
  const auto n = static_cast<int64_t>(toks.size());
  std::vector<std::vector<uint8_t>> forced(static_cast<size_t>(N),
                                           std::vector<uint8_t>(static_cast<size_t>(n)));
  for (int64_t r = 0; r < N; ++r)
    for (int64_t i = 0; i < n; ++i) forced[r][i] = ws.depth[static_cast<size_t>(toks[i])] > r;
  const ref_dc::MoRResult want = ref_dc::mor_forward(model().mor, ref_dc::ffn_block(model().ffn),
                                                     xs.data(), single(n), &forced);
  if (!(ref_dc::max_abs(want.out) > 0)) return "reference output is all zero (vacuous check)";
  for (int64_t i = 0; i < n; ++i)
    if (std::fabs(ws.router_weights[static_cast<size_t>(toks[i])] - want.router_weights[i]) > 1e-4)
      return "mor router weight of token " + std::to_string(toks[i]) +
             " differs from the reference";
  if (auto errs = ref_dc::compare_values(want.out, ys.data(), kD, kCheckRel, kCheckFloor);
      !errs.empty())
    return "mor output vs reference: " + first_errors(errs);
  return "";
}

void run_mor(benchmark::State& state, int64_t T, int threads, const std::string& name) {
  try {
    static std::unique_ptr<moekit::MoRLayer<Bank>> layer;
    static std::string small_verdict = "unchecked";
    const ref_dc::MoRParams& p = model().mor;
    if (!layer) {
      moekit::MoROptions o;
      o.hidden = kD;
      o.num_recursions = p.num_recursions;
      layer = std::make_unique<moekit::MoRLayer<Bank>>(moekit::MoRRouter(o, p.theta), model().bank);
    }
    if (small_verdict == "unchecked") small_verdict = check_mor_small(*layer, threads);
    auto [verdict, fresh] = verdicts().try_emplace(name);
    if (fresh)
      verdict->second = !small_verdict.empty() ? small_verdict : check_mor(*layer, T, threads);
    if (!verdict->second.empty()) {
      state.SkipWithError(verdict->second.c_str());
      return;
    }
    const std::vector<float>& x = input(T);
    const moekit::Batch batch = moekit::Batch::single(T, kD);
    moekit::MoRWorkspace ws;
    std::vector<float> out(x.size());
    layer->forward(batch, x.data(), out.data(), ws, threads);  // warm-up: grows ws
    double rows = 0, candidates = 0;
    for (int32_t v : ws.depth) rows += v;
    for (int64_t r = 0; r < p.num_recursions; ++r)
      candidates += r == 0 ? static_cast<double>(T)
                           : static_cast<double>(std::max<int64_t>(
                                 1, (p.num_recursions - r + 1) * T / p.num_recursions));
    const double flops = rows * model().bank.expert(0).flops_per_row() + candidates * 2.0 * kD;

    // Router alone: the N_r recursion steps on the input (cost depends on the candidate counts
    // only).
    moekit::RoutingPlan plan;
    moekit::RouterScratch scratch;
    std::vector<uint8_t> active(static_cast<size_t>(T));
    double router_min = 1e300;
    const auto r0 = Clock::now();
    for (int64_t i = 0;
         i < 3 || (std::chrono::duration<double>(Clock::now() - r0).count() < 0.02 && i < 10000);
         ++i) {
      const auto c0 = Clock::now();
      std::fill(active.begin(), active.end(), uint8_t{1});
      for (int64_t r = 0; r < p.num_recursions; ++r)
        layer->router().route_step(r, batch, x.data(), active, plan, scratch, threads);
      router_min = std::min(router_min, std::chrono::duration<double>(Clock::now() - c0).count());
    }
    double layer_min = 1e300;
    for (auto _ : state) {
      const auto c0 = Clock::now();
      layer->forward(batch, x.data(), out.data(), ws, threads);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
      layer_min = std::min(layer_min, std::chrono::duration<double>(Clock::now() - c0).count());
    }
    const auto iters = static_cast<double>(state.iterations());
    using benchmark::Counter;
    state.counters["tokens/s"] = Counter(static_cast<double>(T) * iters, Counter::kIsRate);
    state.counters["GFLOP/s"] = Counter(flops * iters * 1e-9, Counter::kIsRate);
    state.counters["router_share"] = router_min / layer_min;
    state.counters["mean_depth"] = rows / static_cast<double>(T);
    state.counters["threads"] = threads;
  } catch (const std::exception& e) {
    state.SkipWithError((name + ": " + e.what()).c_str());
  }
}

std::string bench_name(const std::string& variant, int64_t T, int threads) {
  return "depth_composite/" + variant + "/E:1/k:1/d:" + std::to_string(kD) +
         "/f:" + std::to_string(kF) + "/T:" + std::to_string(T) +
         "/threads:" + std::to_string(threads);
}

void tune(benchmark::internal::Benchmark* b, int64_t T) {
  b->UseRealTime()->Unit(benchmark::kMillisecond);
  if (T >= 2048)
    b->Iterations(2);
  else if (T >= 512)
    b->Iterations(3);
  else
    b->MinTime(0.3);
}

void register_depth_composite_benchmarks() {
  const int threads = bench_threads();
  const char* actions[] = {"drllm_skip", "drllm_execute", "drllm_repeat"};
  for (int a = 0; a < 3; ++a)
    for (int64_t T : kTokens) {
      const std::string name = bench_name(actions[a], T, threads);
      tune(benchmark::RegisterBenchmark(
               name.c_str(),
               [a, T, threads, name](benchmark::State& s) { run_drllm(s, a, T, threads, name); }),
           T);
    }
  for (int64_t T : kTokens) {
    const std::string name = bench_name("mor_N3", T, threads);
    tune(benchmark::RegisterBenchmark(
             name.c_str(),
             [T, threads, name](benchmark::State& s) { run_mor(s, T, threads, name); }),
         T);
  }
}

const int registered = (register_depth_composite_benchmarks(), 0);

}  // namespace
}  // namespace moekit_bench
