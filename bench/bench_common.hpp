// SPDX-License-Identifier: Apache-2.0
// Shared pieces of moekit_bench: the thread count, random inputs, the sized layer config and the
// per-scenario registration hooks.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "moekit/io/config.hpp"
#include "moekit/routers/topk.hpp"

namespace moekit_bench {

/// Threads every benchmark uses: MOEKIT_BENCH_THREADS (>= 1), default 2.
inline int bench_threads() {
  if (const char* s = std::getenv("MOEKIT_BENCH_THREADS")) {
    const int n = std::atoi(s);
    if (n >= 1) return n;
  }
  return 2;
}

/// The config of a `preset` layer with its sizes overridden: E experts, k per token, hidden size
/// d, expert width f (the benchmarks' one layer fixture).
inline moekit::LayerConfig sized_config(const char* preset, int64_t E, int64_t k, int64_t d, int64_t f) {
  moekit::LayerConfig c = moekit::preset_defaults(preset);
  c.router.num_experts = E;
  c.router.k = k;
  c.router.hidden = d;
  c.experts.hidden = d;
  c.experts.intermediate = f;
  return c;
}

/// `n` deterministic uniform values of standard deviation `scale` (in [-sqrt(3) scale,
/// sqrt(3) scale)) from a splitmix64 counter started at `seed`: inputs and random weights
/// (fast enough for hundreds of MB).
inline std::vector<float> uniform_floats(int64_t n, double scale, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  uint64_t s = moekit::detail::splitmix64(seed);
  for (float& x : v) {
    s += 0x9E3779B97F4A7C15ull;
    const double u = static_cast<double>(moekit::detail::splitmix64(s) >> 11) * (1.0 / 9007199254740992.0);
    x = static_cast<float>((2.0 * u - 1.0) * 1.7320508075688772 * scale);
  }
  return v;
}

/// Machine peaks measured in the same run: Eigen sgemm GFLOP/s, STREAM triad GB/s
/// (bench_peak.cpp). Registered first, so they run first.
void register_peak_benchmarks();

/// One registration per (top-k router preset, shape, tokens) (bench_topk_presets.cpp).
void register_topk_preset_benchmarks();

/// Expert weight types (f32, bf16, int8, w8a8, fp8) and the decode split (bench_dtype.cpp).
void register_dtype_benchmarks();

/// Parsing untrusted files: safetensors headers with many tensors (bench_io.cpp).
void register_io_benchmarks();

/// The engine's activations: f32 / bf16 / f16 / strided rows in and out (bench_activations.cpp).
void register_activation_benchmarks();

}  // namespace moekit_bench
