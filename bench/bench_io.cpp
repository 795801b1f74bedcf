// SPDX-License-Identifier: Apache-2.0
// Untrusted-file parsing: a safetensors header with many tensors (a DeepSeek-V3 index lists
// ~90k; the 1.2M-tensor header is 95 MB, just under the 100 MB limit) parsed and validated from memory.
#include <benchmark/benchmark.h>

#include <string>

#include "bench_common.hpp"
#include "moekit/error.hpp"
#include "moekit/io/safetensors.hpp"
#include "support/synthetic.hpp"

namespace moekit_bench {
namespace {

void header_parse(benchmark::State& state, int64_t n) {
  const auto bytes = moekit_test::many_tensor_safetensors(n);
  for (auto _ : state) {
    try {
      auto f = moekit::io::SafetensorsFile::from_bytes("bench", bytes);
      if (static_cast<int64_t>(f.names().size()) != n) state.SkipWithError("wrong tensor count");
      benchmark::DoNotOptimize(f);
    } catch (const moekit::error& e) {
      state.SkipWithError(e.what());
      break;
    }
  }
  state.counters["tensors/s"] = benchmark::Counter(static_cast<double>(n) * static_cast<double>(state.iterations()),
                                                   benchmark::Counter::kIsRate);
  state.counters["header_MB"] = static_cast<double>(bytes.size()) / 1e6;
}

}  // namespace

void register_io_benchmarks() {
  for (int64_t n : {10'000, 100'000, 1'200'000})
    benchmark::RegisterBenchmark(("io/safetensors_header/tensors:" + std::to_string(n)).c_str(), header_parse, n)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
}

}  // namespace moekit_bench
