// SPDX-License-Identifier: Apache-2.0
// Pre-gating with an expert cache (Read-ME, Cai et al., arXiv 2410.19123; docs/routers.md,
// "Pre-gating"): one router decides every layer's experts from the token embeddings before the
// stack runs, so while layer l computes, layer l + 1's experts (active_experts() of its plan)
// are loaded into its cache on a background thread. The experts live in a safetensors
// checkpoint written to the temp directory; a cache load reads and packs one expert
// (load_expert), and each layer keeps at most C of its E experts. A few decode steps run
// through a 3-layer stack; each layer prints what was prefetched, its hits / misses and its
// times, and the outputs are checked against the same stack with every expert resident.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <moekit/batch.hpp>
#include <moekit/io/config.hpp>
#include <moekit/io/model.hpp>
#include <moekit/io/safetensors.hpp>
#include <moekit/layer.hpp>
#include <moekit/offload/expert_cache.hpp>
#include <moekit/routers/pregate.hpp>
#include <moekit/routers/topk.hpp>

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using CachedLayer = moekit::offload::OffloadedLayer<moekit::TopKRouter>;

// L layers of E SwiGLU experts [d -> f -> d], top-k; C experts resident per layer; kSteps
// decode steps of T tokens (T k <= C: a layer's whole future set fits in its cache; a larger
// set would run in groups of C, loading the rest on the critical path).
constexpr int64_t L = 3, E = 16, k = 2, d = 64, f = 128, C = 8, T = 4;
constexpr int kSteps = 8;

std::mt19937 rng(2410);

std::vector<float> uniform(int64_t n, double scale) {
  std::uniform_real_distribution<float> u(static_cast<float>(-scale), static_cast<float>(scale));
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = u(rng);
  return v;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A file removed when it goes out of scope (declared before anything that maps it).
struct TempFile {
  fs::path path;
  explicit TempFile(fs::path p) : path(std::move(p)) {}
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    std::error_code ec;
    fs::remove(path, ec);
  }
};

fs::path unique_temp_path() {
  const fs::path dir = fs::temp_directory_path();
  std::random_device rd;
  for (;;) {
    const auto stamp = static_cast<unsigned long long>(Clock::now().time_since_epoch().count());
    const fs::path p = dir / ("moekit_pregate_" + std::to_string(stamp) + "_" + std::to_string(rd()) +
                              ".safetensors");
    if (!fs::exists(p)) return p;
  }
}

std::string block_prefix(int64_t l) {
  return "model.layers." + std::to_string(l) + ".block_sparse_moe.";
}

// L Mixtral-named MoE blocks with random weights: gate.weight [E, d] and
// experts.<e>.w1 (gate) / w3 (up) [f, d], w2 (down) [d, f], all F32.
void write_checkpoint(const fs::path& path) {
  std::vector<std::vector<float>> store;
  store.reserve(static_cast<size_t>(L * (1 + 3 * E)));  // the tensors point into it: no reallocation
  std::vector<moekit::io::OutTensor> out;
  const double in_scale = std::sqrt(3.0 / double(d)), out_scale = std::sqrt(3.0 / double(f));
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = block_prefix(l);
    store.push_back(uniform(E * d, 1.0));
    out.push_back({p + "gate.weight", moekit::io::DType::F32, {E, d}, store.back().data()});
    for (int64_t e = 0; e < E; ++e) {
      const std::string q = p + "experts." + std::to_string(e) + ".";
      store.push_back(uniform(f * d, in_scale));
      out.push_back({q + "w1.weight", moekit::io::DType::F32, {f, d}, store.back().data()});
      store.push_back(uniform(f * d, in_scale));
      out.push_back({q + "w3.weight", moekit::io::DType::F32, {f, d}, store.back().data()});
      store.push_back(uniform(d * f, out_scale));
      out.push_back({q + "w2.weight", moekit::io::DType::F32, {d, f}, store.back().data()});
    }
  }
  moekit::io::write_safetensors(path.string(), out);
}

std::string id_list(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? " " : "") + std::to_string(v[i]);
  return s;
}

int run() {
  // 1. The checkpoint, in the temp directory (removed on every way out of run()).
  const TempFile ckpt(unique_temp_path());
  write_checkpoint(ckpt.path);
  moekit::LayerConfig config = moekit::preset_defaults("mixtral");  // w1 / w3 / w2 names
  config.router.num_experts = E;
  config.router.k = k;
  config.router.hidden = config.experts.hidden = d;
  config.experts.intermediate = f;
  auto weights = std::make_shared<const moekit::io::TensorSource>(
      moekit::io::TensorSource::open(ckpt.path.string()));

  // 2. Each layer twice: every expert resident (the reference), and with its experts in a
  //    cache of C slots that loads an expert from the mapped checkpoint when asked to.
  //    The layers' own routers (the checkpoint's gates) go unused: plans come from the pre-gate.
  std::vector<moekit::TopKLayer> resident;
  std::vector<CachedLayer> cached;
  resident.reserve(static_cast<size_t>(L));
  cached.reserve(static_cast<size_t>(L));  // no reallocation while a prefetch holds a bank
  for (int64_t l = 0; l < L; ++l) {
    const std::string prefix = block_prefix(l);
    resident.push_back(moekit::load_layer(config, *weights, prefix));
    moekit::offload::CachedFfnBank bank(
        E, resident.back().experts().shape(), C,
        [config, weights, prefix](int64_t e) { return moekit::load_expert(config, *weights, prefix, e); });
    cached.emplace_back(moekit::SparseLayer<moekit::TopKRouter, moekit::offload::CachedFfnBank>(
        resident.back().router(), std::move(bank)));
  }

  // 3. The pre-gating router: one top-k router per layer over the token embeddings.
  std::vector<moekit::TopKRouter> gates;
  for (int64_t l = 0; l < L; ++l)
    gates.emplace_back(moekit::TopKOptions{.num_experts = E, .k = k, .hidden = d, .norm_topk_prob = true},
                       uniform(E * d, 3.0 / std::sqrt(double(d))));
  const moekit::PreGatingRouter pregate(std::move(gates));

  std::printf("%lld layers, E = %lld experts each (cache of %lld), top-%lld, d = %lld, f = %lld; "
              "%d steps of %lld tokens\n",
              static_cast<long long>(L), static_cast<long long>(E), static_cast<long long>(C),
              static_cast<long long>(k), static_cast<long long>(d), static_cast<long long>(f), kSteps,
              static_cast<long long>(T));

  // 4. Decode steps: route every layer from the embeddings, then run the stack, prefetching
  //    layer l + 1's experts while layer l runs. x <- x + layer(x) between layers.
  std::vector<double> waited(static_cast<size_t>(L), 0.0), forward(static_cast<size_t>(L), 0.0);
  std::vector<int64_t> needed(static_cast<size_t>(L), 0);
  double max_diff = 0.0, max_ref = 0.0;
  const moekit::Batch batch = moekit::Batch::single(T, d);
  moekit::RouterScratch scratch;
  std::vector<moekit::RoutingPlan> plans;
  moekit::Workspace ws, ws_ref;
  for (int step = 0; step < kSteps; ++step) {
    std::vector<float> x = uniform(T * d, 1.0);  // this step's token embeddings, the stack's input
    std::vector<float> x_ref = x, y(x.size()), y_ref(x.size());
    pregate.route_all(batch, x.data(), plans, scratch);
    if (step == 0) {
      std::printf("step 0 future expert sets:");
      for (size_t l = 0; l < plans.size(); ++l)
        std::printf("%s layer %zu {%s}", l ? "," : "", l, id_list(moekit::active_experts(plans[l])).c_str());
      std::printf("\n");
    }
    // Layer 0's set is known only now: its load cannot overlap a layer (it shows as waiting).
    cached[0].prefetch(moekit::active_experts(plans[0]));
    for (size_t l = 0; l < static_cast<size_t>(L); ++l) {
      const Clock::time_point t_wait = Clock::now();
      cached[l].wait();  // layer l's prefetch is done (rethrows what its loader threw)
      waited[l] += seconds_since(t_wait);
      // Layer l + 1's experts load on a background thread while layer l runs.
      if (l + 1 < static_cast<size_t>(L)) cached[l + 1].prefetch(moekit::active_experts(plans[l + 1]));
      needed[l] += static_cast<int64_t>(moekit::active_experts(plans[l]).size());
      // The use of layer l's experts: all resident now, so hits (a miss would load here, on
      // the critical path).
      const Clock::time_point t_run = Clock::now();
      cached[l].forward_plan(batch, x.data(), plans[l], y.data(), ws);
      forward[l] += seconds_since(t_run);
      resident[l].forward_plan(batch, x_ref.data(), plans[l], y_ref.data(), ws_ref);
      for (size_t i = 0; i < x.size(); ++i) {
        x[i] += y[i];
        x_ref[i] += y_ref[i];
      }
    }
    for (size_t i = 0; i < x.size(); ++i) {
      max_diff = std::max(max_diff, std::fabs(double(x[i]) - double(x_ref[i])));
      max_ref = std::max(max_ref, std::fabs(double(x_ref[i])));
    }
  }

  // 5. Per layer: what the cache did over the steps, and the times.
  std::printf("layer  needed  prefetched  hits  misses  evictions  loaded KiB  load ms  waited ms  forward ms\n");
  for (size_t l = 0; l < static_cast<size_t>(L); ++l) {
    const moekit::offload::CacheStats& s = cached[l].cache().stats();
    std::printf("%5zu  %6lld  %10lld  %4lld  %6lld  %9lld  %10.1f  %7.3f  %9.3f  %10.3f\n", l,
                static_cast<long long>(needed[l]), static_cast<long long>(s.prefetched),
                static_cast<long long>(s.hits), static_cast<long long>(s.misses),
                static_cast<long long>(s.evictions), s.bytes_loaded / 1024.0, 1e3 * s.seconds_loading,
                1e3 * waited[l], 1e3 * forward[l]);
  }

  // 6. The cached stack against the resident one (the same packed experts and kernels: equal
  //    bit for bit is expected; 1e-5 relative is the bound checked).
  const double rel = max_ref > 0.0 ? max_diff / max_ref : 0.0;
  std::printf("max |cached - resident| = %.3g (relative to max |resident| %.3g: %.3g)\n", max_diff, max_ref, rel);
  if (!(max_ref > 0.0) || !(rel <= 1e-5)) {
    std::fprintf(stderr, "pregate_prefetch: the cached stack differs from the resident one\n");
    return 1;
  }
  std::printf("ok\n");
  return 0;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pregate_prefetch: %s\n", e.what());
    return 1;
  }
}
