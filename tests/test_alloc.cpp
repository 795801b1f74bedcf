// SPDX-License-Identifier: Apache-2.0
// A steady-state forward (same or smaller shape, reused Workspace) allocates nothing: global
// operator new is replaced in this test binary and counted while a flag is set.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <random>
#include <vector>

#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/kernels/packed_gemm.hpp"

namespace {
std::atomic<bool> g_counting{false};
std::atomic<long> g_allocations{0};
}  // namespace

void* operator new(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, std::align_val_t a) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1, std::memory_order_relaxed);
  const std::size_t al = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
// The nothrow forms too (std::stable_sort's temporary buffer uses them): every allocation
// then comes from malloc and goes back to free, as AddressSanitizer checks.
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return operator new(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return operator new(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return operator new(n, a);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return operator new(n, a);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

TEST(AllocSteadyState, ForwardAllocatesNothingOnceWarm) {
  for (const char* preset : {"qwen2_moe", "deepseek_v3", "switch"}) {
    moekit::LayerConfig c = moekit::preset_defaults(preset);
    c.router.hidden = 40;
    c.router.num_experts = 8;
    c.router.k = preset == std::string("switch") ? 1 : 2;
    c.router.n_group = c.router.n_group > 1 ? 4 : 0;
    c.router.topk_group = c.router.n_group > 1 ? 2 : 0;
    c.experts.intermediate = 24;
    if (c.shared) c.shared->intermediate = 32;
    const moekit::TopKLayer layer = moekit::random_layer(c, 3);
    const int64_t T = 150, d = 40;
    std::vector<float> x(T * d), y(T * d);
    std::mt19937 g(1);
    std::normal_distribution<float> n;
    for (float& v : x) v = n(g);
    std::vector<uint8_t> pad(T, 0);
    pad[7] = 1;
    moekit::Workspace ws;
    for (int threads : {1, 2}) {
      moekit::Batch b = moekit::Batch::single(T, d);
      b.padding = pad;
      layer.forward(b, x.data(), y.data(), ws, threads);  // warm: grows the workspace
      g_allocations = 0;
      g_counting = true;
      layer.forward(b, x.data(), y.data(), ws, threads);
      moekit::Batch smaller = moekit::Batch::single(T / 2, d);
      layer.forward(smaller, x.data(), y.data(), ws, threads);
      g_counting = false;
      EXPECT_EQ(g_allocations.load(), 0) << preset << " threads " << threads;
    }
  }
}

// The same for every expert weight type and for the decode column split (T <= 16, 2 threads).
TEST(AllocSteadyState, ReducedPrecisionAndDecodeSplitAllocateNothing) {
  for (const char* type : {"f32", "bf16", "int8", "w8a8", "fp8", "int4", "int4zp", "w4a8", "ternary"}) {
    moekit::LayerConfig c = moekit::preset_defaults("qwen2_moe");
    c.router.hidden = 40;
    c.router.num_experts = 8;
    c.router.k = 2;
    c.experts.intermediate = 24;
    c.shared->intermediate = 32;
    c.pack.type = moekit::kernels::parse_weight_type(type);
    const moekit::TopKLayer layer = moekit::random_layer(c, 5);
    const int64_t d = 40;
    std::vector<float> x(200 * d), y(200 * d);
    std::mt19937 g(2);
    std::normal_distribution<float> n;
    for (float& v : x) v = n(g);
    moekit::Workspace ws;
    for (int64_t T : {200, 16, 1}) layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, 2);  // warm
    g_allocations = 0;
    g_counting = true;
    for (int64_t T : {1, 3, 16, 200}) layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, 2);
    g_counting = false;
    EXPECT_EQ(g_allocations.load(), 0) << type;
  }
}

}  // namespace
