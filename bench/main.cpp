// SPDX-License-Identifier: Apache-2.0
// moekit_bench entry point: registers every scenario in a fixed order, then runs Google Benchmark.
#include <string>

#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "moekit/kernels/gemm.hpp"
#include "moekit/version.hpp"

int main(int argc, char** argv) {
  // Registration order is run order: peaks first, then the layer scenarios (whose layer
  // cache relies on running in registration order).
  moekit_bench::register_peak_benchmarks();
  moekit_bench::register_topk_preset_benchmarks();
  moekit_bench::register_dtype_benchmarks();
  moekit_bench::register_activation_benchmarks();
  moekit_bench::register_io_benchmarks();
  benchmark::AddCustomContext("moekit_version", moekit::version());
  benchmark::AddCustomContext("moekit_gemm_backend", moekit::kernels::gemm_backend());
  benchmark::AddCustomContext("moekit_bench_threads", std::to_string(moekit_bench::bench_threads()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
