// SPDX-License-Identifier: Apache-2.0
// The engine's activations (moekit/activations.hpp): one bf16 x bf16 Mixtral-shaped layer
// (E = 8, k = 2, d = 1024, f = 2816) run on f32 contiguous rows (the baseline), bf16 and f16
// rows in and out, and f32 rows with a row pitch of d + 64; T in 1, 16, 512. The difference to
// the baseline is the cost of the conversion pass and the rounding inside the combine. Before
// timing, each variant's output is checked against the baseline's rounded once (bit for bit).
#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/layer.hpp"

namespace moekit_bench {
namespace {

constexpr int64_t kE = 8, kK = 2, kD = 1024, kF = 2816, kPitch = kD + 64;

const moekit::TopKLayer& layer() {
  static const moekit::TopKLayer l = [] {
    moekit::LayerConfig c = sized_config("mixtral", kE, kK, kD, kF);
    c.pack.type = moekit::kernels::WeightType::bf16;
    c.pack.bf16_activations = true;
    return moekit::random_layer(c, 77);
  }();
  return l;
}

enum class Variant { f32, bf16, f16, f32_strided };

const char* name_of(Variant v) {
  switch (v) {
    case Variant::f32: return "f32";
    case Variant::bf16: return "bf16";
    case Variant::f16: return "f16";
    case Variant::f32_strided: return "f32-pitch";
  }
  return "?";
}

void run(benchmark::State& state, Variant v, int64_t T) {
  const moekit::TopKLayer& L = layer();
  const int threads = bench_threads();
  const moekit::Batch batch = moekit::Batch::single(T, kD);
  std::vector<float> x(static_cast<size_t>(T * kD));
  uint64_t s = 0x5eed + static_cast<uint64_t>(T);
  for (float& f : x) {
    s += 0x9E3779B97F4A7C15ull;
    f = static_cast<float>(static_cast<double>(moekit::detail::splitmix64(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
  }
  // The variant's buffers: 16-bit rows (x rounded), or f32 rows with a pitch.
  const int64_t pitch = v == Variant::f32_strided ? kPitch : kD;
  std::vector<uint16_t> x16(static_cast<size_t>(T * kD)), y16(x16.size());
  std::vector<float> xs(static_cast<size_t>(T * pitch)), ys(xs.size()), xw(x.size()), want(x.size());
  if (v == Variant::bf16) moekit::kernels::f32_to_bf16(x.data(), x16.data(), T * kD);
  if (v == Variant::f16) moekit::kernels::f32_to_f16(x.data(), x16.data(), T * kD);
  if (v == Variant::bf16) moekit::kernels::bf16_to_f32(x16.data(), xw.data(), T * kD);
  if (v == Variant::f16) moekit::kernels::f16_to_f32(x16.data(), xw.data(), T * kD);
  if (v == Variant::f32 || v == Variant::f32_strided) xw = x;
  for (int64_t t = 0; t < T; ++t) std::memcpy(&xs[t * pitch], &x[t * kD], kD * sizeof(float));
  moekit::ActivationsIn in;
  moekit::ActivationsOut out;
  if (v == Variant::bf16 || v == Variant::f16) {
    in = v == Variant::bf16 ? moekit::ActivationsIn::bf16(x16.data()) : moekit::ActivationsIn::f16(x16.data());
    out = v == Variant::bf16 ? moekit::ActivationsOut::bf16(y16.data()) : moekit::ActivationsOut::f16(y16.data());
  } else {
    in = moekit::ActivationsIn::f32(xs.data(), pitch);
    out = moekit::ActivationsOut::f32(ys.data(), pitch);
  }
  moekit::Workspace ws;
  L.forward(batch, xw.data(), want.data(), ws, threads);
  L.forward(batch, in, out, ws, threads);
  // Check: the baseline's output rounded once (16-bit) or equal (f32).
  std::vector<uint16_t> w16(want.size());
  if (v == Variant::bf16) moekit::kernels::f32_to_bf16(want.data(), w16.data(), T * kD);
  if (v == Variant::f16) moekit::kernels::f32_to_f16(want.data(), w16.data(), T * kD);
  for (int64_t t = 0; t < T; ++t) {
    const bool same = (v == Variant::bf16 || v == Variant::f16)
                          ? std::memcmp(&y16[t * kD], &w16[t * kD], kD * 2) == 0
                          : std::memcmp(&ys[t * pitch], &want[t * kD], kD * 4) == 0;
    if (!same) {
      state.SkipWithError("output differs from the f32 path rounded once");
      return;
    }
  }
  for (auto _ : state) {
    L.forward(batch, in, out, ws, threads);
    benchmark::DoNotOptimize(out.data);
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(T) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
}

}  // namespace

void register_activation_benchmarks() {
  const int threads = bench_threads();
  for (Variant v : {Variant::f32, Variant::bf16, Variant::f16, Variant::f32_strided})
    for (int64_t T : {int64_t{1}, int64_t{16}, int64_t{512}}) {
      const std::string name = std::string("activations/") + name_of(v) + "/E:8/k:2/d:1024/f:2816/T:" +
                               std::to_string(T) + "/threads:" + std::to_string(threads);
      auto* b = benchmark::RegisterBenchmark(name.c_str(), run, v, T)->UseRealTime()->Unit(benchmark::kMillisecond);
      if (T >= 512) {
        b->Iterations(5);
      } else {
        b->MinTime(0.3);
      }
    }
}

}  // namespace moekit_bench
