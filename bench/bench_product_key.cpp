// SPDX-License-Identifier: Apache-2.0
// Product-key routing at E = 65,536 atomic experts (n = 256 keys per axis), d = 1024, k = 16
// (PEER's per-head k), against a brute-force top-k over all E scores. Both compute the same
// two key products (kernels::matvec_rows) and log-softmaxes; the brute force then forms all
// n^2 sums log p_x(i) + log p_y(j) and takes their top k (same tie rule), the product-key
// router only the k^2 sums of each axis' top k. The selections are asserted identical on every
// token before timing (same float sums, same order). Reported: `speedup` = brute / product-key
// routing time, `brute_ms`, `keys_ms` (the key products and log-softmaxes both share),
// `select_speedup` (the selection step alone: each time less keys_ms), and `layer_ms`, the whole atomic-expert layer (route + E_e(x) =
// gelu(u_e . x) v_e on the chosen experts + combine) through SparseLayer.
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
#include "moekit/layer.hpp"
#include "moekit/routers/product_key.hpp"
#include "moekit/routers/topk.hpp"

namespace moekit_bench {
namespace {

using Clock = std::chrono::steady_clock;
using PkLayer = moekit::SparseLayer<moekit::ProductKeyRouter, moekit::AtomicExpertBank>;

constexpr int64_t kN = 256, kE = kN * kN, kD = 1024, kK = 16;
constexpr int64_t kTokens[] = {1, 16, 128};


std::unique_ptr<PkLayer>& layer() {
  static std::unique_ptr<PkLayer> l;
  return l;
}

const PkLayer& get_layer() {
  if (!layer()) {
    moekit::ProductKeyOptions o{kE, kK, kD, false};
    const double s = 1.0 / std::sqrt(double(kD));
    moekit::ProductKeyRouter r(o, uniform_floats(kN * kD, 4 * s, 1), uniform_floats(kN * kD, 4 * s, 2));
    moekit::AtomicExpertBank bank(kE, kD, uniform_floats(kE * kD, s, 3), uniform_floats(kE * kD, 1.0, 4), moekit::Activation::gelu);
    layer() = std::make_unique<PkLayer>(std::move(r), std::move(bank));
  }
  return *layer();
}

/// The brute force: key products, log-softmaxes, all E sums, their top k (descending, ties
/// to the lower id). `scores` holds 2n + E floats, `idx` E ints.
void brute_force(const moekit::ProductKeyRouter& r, const float* x, int64_t T, std::vector<float>& scores,
                 std::vector<int32_t>& idx, std::vector<int32_t>& out, bool keys_only = false) {
  const int64_t n = kN;
  for (int64_t t = 0; t < T; ++t) {
    float* a = scores.data();
    float* b = a + n;
    float* all = b + n;
    moekit::kernels::matvec_rows(x + t * kD, r.keys_x().data(), n, kD, a);
    moekit::kernels::matvec_rows(x + t * kD, r.keys_y().data(), n, kD, b);
    for (float* v : {a, b}) {  // log-softmax as the router computes it
      float m = v[0];
      for (int64_t i = 1; i < n; ++i) m = std::max(m, v[i]);
      float s = 0.0f;
      for (int64_t i = 0; i < n; ++i) s += std::exp(v[i] - m);
      const float lse = m + std::log(s);
      for (int64_t i = 0; i < n; ++i) v[i] -= lse;
    }
    if (keys_only) continue;  // the part both routers share, timed alone
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) all[i * n + j] = a[i] + b[j];
    for (int64_t e = 0; e < kE; ++e) idx[static_cast<size_t>(e)] = static_cast<int32_t>(e);
    std::partial_sort(idx.begin(), idx.begin() + kK, idx.end(),
                      [all](int32_t p, int32_t q) { return all[p] > all[q] || (all[p] == all[q] && p < q); });
    std::copy(idx.begin(), idx.begin() + kK, out.begin() + t * kK);
  }
}

void run(benchmark::State& state, int64_t T) {
  try {
    const PkLayer& L = get_layer();
    const moekit::ProductKeyRouter& r = L.router();
    const int threads = bench_threads();
    const moekit::Batch batch = moekit::Batch::single(T, kD);
    const std::vector<float> x = uniform_floats(T * kD, 1.0, 100 + static_cast<uint64_t>(T));
    moekit::RoutingPlan plan;
    moekit::RouterScratch scratch;
    std::vector<float> scores(static_cast<size_t>(2 * kN + kE));
    std::vector<int32_t> idx(static_cast<size_t>(kE)), brute(static_cast<size_t>(T * kK));
    r.route(batch, x.data(), plan, scratch, 1);
    brute_force(r, x.data(), T, scores, idx, brute);
    if (!std::equal(brute.begin(), brute.end(), plan.slot_expert().begin())) {
      state.SkipWithError("product-key selections differ from the brute force");
      return;
    }
    // Routing on one thread each (the brute force is serial), then the whole layer.
    double pk_min = 1e300, brute_min = 1e300, layer_min = 1e300, keys_min = 1e300;
    moekit::Workspace ws;
    std::vector<float> y(static_cast<size_t>(T * kD));
    L.forward(batch, x.data(), y.data(), ws, threads);
    for (auto _ : state) {
      const auto c0 = Clock::now();
      r.route(batch, x.data(), plan, scratch, 1);
      const auto c1 = Clock::now();
      brute_force(r, x.data(), T, scores, idx, brute);
      const auto c2 = Clock::now();
      L.forward(batch, x.data(), y.data(), ws, threads);
      benchmark::DoNotOptimize(y.data());
      const auto c3 = Clock::now();
      brute_force(r, x.data(), T, scores, idx, brute, true);
      keys_min = std::min(keys_min, std::chrono::duration<double>(Clock::now() - c3).count());
      const double pk = std::chrono::duration<double>(c1 - c0).count();
      state.SetIterationTime(pk);
      pk_min = std::min(pk_min, pk);
      brute_min = std::min(brute_min, std::chrono::duration<double>(c2 - c1).count());
      layer_min = std::min(layer_min, std::chrono::duration<double>(c3 - c2).count());
    }
    state.counters["brute_ms"] = brute_min * 1e3;
    state.counters["speedup"] = brute_min / pk_min;
    state.counters["layer_ms"] = layer_min * 1e3;
    state.counters["keys_ms"] = keys_min * 1e3;
    // The selection step alone: each routing's time less the shared key products.
    state.counters["select_speedup"] = (brute_min - keys_min) / std::max(pk_min - keys_min, 1e-9);
    state.counters["threads"] = threads;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
  if (T == kTokens[std::size(kTokens) - 1]) layer().reset();
}

void register_product_key_benchmarks() {
  for (int64_t T : kTokens) {
    const std::string name = "product_key/route_vs_brute_force/E:" + std::to_string(kE) + "/k:" + std::to_string(kK) +
                             "/d:" + std::to_string(kD) + "/T:" + std::to_string(T);
    benchmark::RegisterBenchmark(name.c_str(), run, T)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
  }
}

}  // namespace

// Registered at static initialisation (bench/main.cpp is not edited per family).
[[maybe_unused]] static const int registered_product_key = (register_product_key_benchmarks(), 0);

}  // namespace moekit_bench
