// SPDX-License-Identifier: Apache-2.0
// The machine's measured peaks, in the same run as the layer benchmarks: Eigen sgemm
// (2048^3, 1 and N threads) in GFLOP/s, oneDNN's bf16 x bf16 -> f32 GEMM (2048^3, N threads;
// when moekit is built with oneDNN) and a STREAM-style triad over 512 MB in GB/s.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>
#include <xsimd/xsimd.hpp>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <omp.h>
#if defined(MOEKIT_BENCH_ONEDNN)
#include <oneapi/dnnl/dnnl.hpp>
#endif

#include "bench_common.hpp"

namespace moekit_bench {
namespace {

constexpr int64_t kGemmN = 2048;
constexpr int64_t kTriadBytes = int64_t{512} << 20;  // all three arrays: well above the L3

// C = A * B, f32, column-major, Eigen's own blocking; `threads` via Eigen's OpenMP path.
void sgemm(benchmark::State& state, int threads) {
  const Eigen::Index n = kGemmN;
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(n, n), b = Eigen::MatrixXf::Random(n, n), c(n, n);
  const int saved = Eigen::nbThreads();
  Eigen::setNbThreads(threads);
  c.noalias() = a * b;  // warm-up: packing buffers, OpenMP pool
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  Eigen::setNbThreads(saved);
  const double flops = 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * static_cast<double>(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
}

#if defined(MOEKIT_BENCH_ONEDNN)
// C = A * B with bf16 A and B and f32 C (row-major), oneDNN's matmul with its own blocking (and
// AMX / AVX512-BF16 where the CPU has them): the bf16 GEMM peak a layer's bf16 x bf16 experts
// are compared with. oneDNN runs on OpenMP: `threads` is set around each call.
void bf16gemm(benchmark::State& state, int threads) {
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  const dnnl::memory::dim n = kGemmN;
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
  const dnnl::memory::desc a_md({n, n}, dt::bf16, tag::ab), b_md({n, n}, dt::bf16, tag::ab),
      c_md({n, n}, dt::f32, tag::ab);
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), eng);
  dnnl::memory a(a_md, eng), b(b_md, eng), c(c_md, eng);
  auto* pa = static_cast<uint16_t*>(a.get_data_handle());
  auto* pb = static_cast<uint16_t*>(b.get_data_handle());
  for (dnnl::memory::dim i = 0; i < n * n; ++i) {  // small bf16 values: 1 + j / 128 for j < 8
    pa[i] = static_cast<uint16_t>(0x3F80u + (i % 8));
    pb[i] = static_cast<uint16_t>(0x3F80u + (i % 5));
  }
  const dnnl::matmul mm(pd);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  auto run = [&] {
    mm.execute(strm, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
    strm.wait();
  };
  run();  // warm-up: primitive caches, OpenMP pool
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(c.get_data_handle());
    benchmark::ClobberMemory();
  }
  omp_set_num_threads(saved);
  const double flops = 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * static_cast<double>(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
}
#endif

// STREAM triad a = b + s * c in f64, first touch and loop with the same static schedule.
// Bytes counted as STREAM does: 3 arrays per pass (write-allocate traffic not counted).
void triad(benchmark::State& state, int threads) {
  const int64_t n = kTriadBytes / (3 * static_cast<int64_t>(sizeof(double)));
  std::unique_ptr<double[]> a(new double[static_cast<size_t>(n)]), b(new double[static_cast<size_t>(n)]),
      c(new double[static_cast<size_t>(n)]);
  double* pa = a.get();
  double* pb = b.get();
  double* pc = c.get();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    pa[i] = 0.0;
    pb[i] = 1.0;
    pc[i] = 2.0;
  }
  const double s = 3.0;
  for (auto _ : state) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) pa[i] = pb[i] + s * pc[i];
    benchmark::DoNotOptimize(pa);
    benchmark::ClobberMemory();
  }
  if (pa[n / 2] != 7.0) state.SkipWithError("triad: wrong result (expected a[i] = 7)");
  const double bytes = 3.0 * static_cast<double>(n) * sizeof(double);
  state.counters["GB/s"] =
      benchmark::Counter(bytes * static_cast<double>(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
}

// a * b + c with the ISA's fused instruction (xsimd 8.1 has no AVX-512 fma: its generic
// fallback is a separate multiply and add).
template <class B>
B fmadd(const B& a, const B& b, const B& c) noexcept {
#if defined(__AVX512F__)
  if constexpr (B::size == 16) return B(_mm512_fmadd_ps(a, b, c));
#endif
  return xsimd::fma(a, b, c);
}

// The FMA roofline: each thread runs 12 independent chains of SIMD FMAs on registers (no
// memory traffic), the most f32 FLOP/s the cores can issue. Layers are also reported
// against this, since the packed expert GEMM beats Eigen's sgemm.
void fma_peak(benchmark::State& state, int threads) {
  using B = xsimd::batch<float>;
  constexpr int64_t kIters = 20'000'000;
  double sink = 0;
  for (auto _ : state) {
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      B acc[12];
      for (int j = 0; j < 12; ++j) acc[j] = B(0.001f * static_cast<float>(j));
      const B m(0.999f), c(0.001f);
      for (int64_t i = 0; i < kIters; ++i)
        for (int j = 0; j < 12; ++j) acc[j] = fmadd(acc[j], m, c);
      for (int j = 0; j < 12; ++j) sink += static_cast<double>(xsimd::hadd(acc[j]));
    }
  }
  benchmark::DoNotOptimize(sink);
  const double flops = 2.0 * 12.0 * static_cast<double>(B::size) * static_cast<double>(kIters) * threads;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * static_cast<double>(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
}

}  // namespace

void register_peak_benchmarks() {
  const int nt = bench_threads();
  benchmark::RegisterBenchmark(("peak/fma/regs/threads:" + std::to_string(nt)).c_str(), fma_peak, nt)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(5);
  std::vector<int> sgemm_threads{1};
  if (nt != 1) sgemm_threads.push_back(nt);
  for (int t : sgemm_threads)
    benchmark::RegisterBenchmark(("peak/sgemm/n:" + std::to_string(kGemmN) + "/threads:" + std::to_string(t)).c_str(),
                                 sgemm, t)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->MinTime(1.0);
#if defined(MOEKIT_BENCH_ONEDNN)
  benchmark::RegisterBenchmark(("peak/bf16gemm/n:" + std::to_string(kGemmN) + "/threads:" + std::to_string(nt)).c_str(),
                               bf16gemm, nt)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(1.0);
#endif
  benchmark::RegisterBenchmark(("peak/triad/mb:" + std::to_string(kTriadBytes >> 20) + "/threads:" + std::to_string(nt)).c_str(),
                               triad, nt)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(1.0);
}

}  // namespace moekit_bench
