// SPDX-License-Identifier: Apache-2.0
// Thread safety, engine thread pools and determinism: one layer shared by several
// std::threads (each with its own Workspace) gives the sequential answers; a call from inside
// an active OpenMP parallel region runs on the calling thread alone; routing decisions and
// outputs are bit-identical for 1, 2 and 3 threads and across repeated runs, for every router
// family (through AnyLayer) and every weight type. Run under TSan by scripts/sanitize.sh.
#include <gtest/gtest.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "moekit/expert.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/topk.hpp"

namespace {

std::vector<float> gaussian(uint64_t seed, size_t n) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

moekit::LayerConfig small_config(const char* preset, int64_t d, int64_t E, int64_t k, int64_t f) {
  moekit::LayerConfig c = moekit::preset_defaults(preset);
  c.router.hidden = d;
  c.router.num_experts = E;
  c.router.k = k;
  if (c.router.grouped()) {
    c.router.n_group = 4;
    c.router.topk_group = 2;
  }
  c.experts.intermediate = f;
  if (c.shared) c.shared->intermediate = f;
  return c;
}

// One layer shared by 4 std::threads at once, each with its own Workspace and its own
// inputs, gives exactly what sequential calls give (TSan checks the sharing).
TEST(Threads, SharedLayerFromSeveralStdThreads) {
  const moekit::TopKLayer layer = moekit::random_layer(small_config("deepseek_v3", 48, 8, 2, 40), 3);
  const int64_t d = 48;
  constexpr int kThreads = 4, kCalls = 6;
  std::vector<std::vector<float>> x, want(kThreads * kCalls), got(kThreads * kCalls);
  std::vector<int64_t> T(kThreads * kCalls);
  for (int i = 0; i < kThreads * kCalls; ++i) {
    T[static_cast<size_t>(i)] = 1 + (i * 37) % 130;  // decode and prefill sizes
    x.push_back(gaussian(100 + static_cast<uint64_t>(i), static_cast<size_t>(T[static_cast<size_t>(i)] * d)));
  }
  {
    moekit::Workspace ws;
    for (int i = 0; i < kThreads * kCalls; ++i) {
      want[static_cast<size_t>(i)].resize(x[static_cast<size_t>(i)].size());
      layer.forward(moekit::Batch::single(T[static_cast<size_t>(i)], d), x[static_cast<size_t>(i)].data(),
                    want[static_cast<size_t>(i)].data(), ws, 2);
    }
  }
  std::vector<std::thread> pool;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      moekit::Workspace ws;  // one per thread
      try {
        for (int c = 0; c < kCalls; ++c) {
          const size_t i = static_cast<size_t>(t * kCalls + c);
          got[i].resize(x[i].size());
          layer.forward(moekit::Batch::single(T[i], d), x[i].data(), got[i].data(), ws, 2);
        }
      } catch (...) {
        ++failures;
      }
    });
  for (auto& th : pool) th.join();
  ASSERT_EQ(failures.load(), 0);
  for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "call " << i;
}

// An expert that records which threads run it and the OpenMP team size it sees.
struct Recorder {
  int64_t d = 8;
  std::mutex* mu;
  std::set<std::thread::id>* seen;
  std::atomic<int>* max_team;
  int64_t d_in() const { return d; }
  int64_t d_out() const { return d; }
  size_t scratch_floats(int64_t) const { return 0; }
  void operator()(const float* in, int64_t rows, float* out, float*) const {
    {
      std::lock_guard<std::mutex> lock(*mu);
      seen->insert(std::this_thread::get_id());
    }
    int team = omp_get_num_threads();
    int prev = max_team->load();
    while (team > prev && !max_team->compare_exchange_weak(prev, team)) {
    }
    std::memcpy(out, in, static_cast<size_t>(rows * d) * sizeof(float));
  }
};

// Called from inside an engine's own OpenMP parallel region, forward runs on the calling
// thread alone (no nested team, no oversubscription) whatever `threads` asks, and gives the
// same result as outside.
TEST(Threads, InsideAParallelRegionRunsOnTheCallingThread) {
  std::mutex mu;
  std::set<std::thread::id> seen;
  std::atomic<int> max_team{0};
  moekit::TopKOptions o;
  o.num_experts = 4;
  o.k = 2;
  o.hidden = 8;
  const auto gate = gaussian(5, 32);
  std::vector<Recorder> experts(4, Recorder{8, &mu, &seen, &max_team});
  const moekit::SparseLayer<moekit::TopKRouter, moekit::FunctorBank<Recorder>> layer(
      moekit::TopKRouter(o, gate), moekit::FunctorBank<Recorder>(experts));
  const int64_t T = 300;
  const auto x = gaussian(6, static_cast<size_t>(T * 8));
  std::vector<float> outside(x.size());
  {
    moekit::Workspace ws;
    layer.forward(moekit::Batch::single(T, 8), x.data(), outside.data(), ws, 2);
  }
  std::vector<std::vector<float>> inside(2, std::vector<float>(x.size()));
  std::set<std::thread::id> callers, ran_on;
  std::atomic<int> failures{0};
  max_team = 0;
  seen.clear();
#pragma omp parallel num_threads(2)
  {
    const int me = omp_get_thread_num();
    moekit::Workspace ws;
    {
      std::lock_guard<std::mutex> lock(mu);
      callers.insert(std::this_thread::get_id());
    }
    try {
      layer.forward(moekit::Batch::single(T, 8), x.data(), inside[static_cast<size_t>(me)].data(), ws, 8);
    } catch (...) {
      ++failures;
    }
  }
  ran_on = seen;
  ASSERT_EQ(failures.load(), 0);
  // The experts ran only on the calling threads, each in a team of one (no nested team).
  for (const auto& id : ran_on) EXPECT_EQ(callers.count(id), 1u) << "an expert ran on a thread that is not a caller";
  EXPECT_EQ(max_team.load(), 1) << "a nested team was created";
  EXPECT_EQ(inside[0], outside);
  EXPECT_EQ(inside[1], outside);
}

// Every router family through AnyLayer, every weight type for top-k: decisions (the family's
// routing outputs) and hidden_states bit-identical for 1, 2 and 3 threads and across repeats.
TEST(Determinism, EveryFamilyIsBitIdenticalAcrossThreadCountsAndRepeats) {
  const char* configs[] = {
      R"({"moekit_config_version": 1, "preset": "mixtral", "hidden_size": 24, "router": {"num_experts": 6, "k": 2}, "experts": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "preset": "mixtral", "hidden_size": 24, "router": {"num_experts": 6, "k": 2}, "experts": {"intermediate_size": 40, "dtype": "bf16"}})",
      R"({"moekit_config_version": 1, "preset": "mixtral", "hidden_size": 24, "router": {"num_experts": 6, "k": 2}, "experts": {"intermediate_size": 40, "dtype": "int8"}})",
      R"({"moekit_config_version": 1, "preset": "mixtral", "hidden_size": 24, "router": {"num_experts": 6, "k": 2}, "experts": {"intermediate_size": 40, "dtype": "w8a8"}})",
      R"({"moekit_config_version": 1, "preset": "mixtral", "hidden_size": 24, "router": {"num_experts": 6, "k": 2}, "experts": {"intermediate_size": 40, "dtype": "fp8"}})",
      R"({"moekit_config_version": 1, "preset": "switch", "hidden_size": 24, "router": {"num_experts": 6, "capacity_factor": 1.0}, "experts": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "preset": "deepseek_v3", "hidden_size": 24, "router": {"num_experts": 8, "k": 2, "n_group": 4, "topk_group": 2}, "experts": {"intermediate_size": 40}, "shared_expert": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "sinkhorn", "num_experts": 6, "k": 2}, "experts": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "expert_choice", "num_experts": 6, "capacity_factor": 2.0}, "experts": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "gru", "num_experts": 6, "k": 2, "d_r": 8}, "experts": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "mod", "ratio": 0.5}, "experts": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "gamma_mod", "ratio": 0.5}, "experts": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "token_prune", "tau": 0.5}, "experts": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "drllm", "bottleneck": 8, "windows": 2}, "experts": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "mor", "num_recursions": 2}, "experts": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "prototype", "num_experts": 6, "k": 1}, "experts": {"intermediate_size": 40}, "shared_expert": {"intermediate_size": 40}})",
      R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "centroid", "num_experts": 6}, "experts": {"intermediate_size": 40}})",
  };
  int compared = 0;
  for (const char* text : configs) {
    const moekit::LayerConfig c = moekit::parse_layer_config(text, "determinism");
    SCOPED_TRACE(text);
    auto layer = moekit::random_any_layer(c, 11);
    for (int64_t T : {1, 7, 16, 150}) {
      const auto x = gaussian(static_cast<uint64_t>(T), static_cast<size_t>(T * 24));
      const std::vector<int32_t> offsets = {0, static_cast<int32_t>(T / 3), static_cast<int32_t>(T)};
      moekit::Batch batch = moekit::Batch::single(T, 24);
      batch.sequence_offsets = offsets;
      std::vector<float> first(x.size());
      std::vector<moekit::NamedTensor> first_out;
      for (int threads : {1, 2, 3, 2, 1}) {
        std::vector<float> y(x.size());
        layer->forward(batch, x.data(), y.data(), threads);
        const auto outs = layer->outputs();
        if (first_out.empty()) {
          first = y;
          first_out = outs;
          continue;
        }
        ASSERT_EQ(y, first) << "T=" << T << " threads=" << threads;
        ASSERT_EQ(outs.size(), first_out.size());
        for (size_t i = 0; i < outs.size(); ++i) {
          EXPECT_EQ(outs[i].name, first_out[i].name);
          ASSERT_EQ(outs[i].bytes, first_out[i].bytes) << outs[i].name << " T=" << T << " threads=" << threads;
        }
        ++compared;
      }
    }
  }
  EXPECT_EQ(compared, 17 * 4 * 4);
}

// Finite input that overflows inside an expert is reported (naming the first bad output
// row), never returned as a silent Inf / NaN; set_check_finite(false) skips the scan.
TEST(NonFinite, OverflowInsideAnExpertIsReported) {
  moekit::LayerConfig c = small_config("qwen2_moe", 16, 4, 2, 24);
  moekit::TopKLayer layer = moekit::random_layer(c, 9);
  const int64_t T = 5, d = 16;
  auto x = gaussian(2, static_cast<size_t>(T * d));
  for (int64_t j = 0; j < d; ++j) x[static_cast<size_t>(2 * d + j)] *= 1e30f;  // finite, but squares overflow
  std::vector<float> y(x.size());
  moekit::Workspace ws;
  for (bool plan : {false, true}) {
    try {
      if (plan) {
        layer.forward_plan(moekit::Batch::single(T, d), x.data(), ws.plan, y.data(), ws, 1);
      } else {
        layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, 2);
      }
      FAIL() << "expected an error";
    } catch (const moekit::error& e) {
      EXPECT_NE(std::string(e.what()).find("out[2, "), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("although the input is finite"), std::string::npos) << e.what();
    }
  }
  // The documented alternative: count the bad rows instead of throwing (rows 2 and 4 here,
  // row 3 padding is not counted), the same for any thread count; 0 for a finite output.
  for (int64_t j = 0; j < d; ++j) {
    x[static_cast<size_t>(4 * d + j)] = x[static_cast<size_t>(2 * d + j)];
    x[static_cast<size_t>(3 * d + j)] = x[static_cast<size_t>(2 * d + j)];
  }
  std::vector<uint8_t> padding = {0, 0, 0, 1, 0};
  moekit::Batch padded = moekit::Batch::single(T, d);
  padded.padding = padding;
  layer.set_non_finite_output(moekit::NonFiniteOutput::count);
  for (int threads : {1, 2, 3}) {
    layer.forward(padded, x.data(), y.data(), ws, threads);
    int64_t want = 0;
    for (int64_t t = 0; t < T; ++t) want += t != 3 && moekit::kernels::first_non_finite(y.data() + t * d, d) >= 0;
    EXPECT_EQ(want, 2);
    EXPECT_EQ(ws.non_finite_rows, want) << "threads " << threads;
  }
  const auto fine = gaussian(3, static_cast<size_t>(T * d));
  layer.forward(moekit::Batch::single(T, d), fine.data(), y.data(), ws, 2);
  EXPECT_EQ(ws.non_finite_rows, 0);
  layer.set_non_finite_output(moekit::NonFiniteOutput::error);

  layer.set_check_finite(false);
  layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, 2);
  EXPECT_GE(moekit::kernels::first_non_finite(y.data() + 2 * d, d), 0) << "the overflow is real";
  EXPECT_LT(moekit::kernels::first_non_finite(y.data(), 2 * d), 0) << "other rows are finite";
}

// The layer rejects NaN / Inf in unpadded input rows (naming token and column) before
// routing, ignores padded rows, and set_check_finite(false) skips the scan; non-finite expert
// weights and shared gates are refused when the layer is built.
TEST(NonFinite, LayerScanAndOptOut) {
  moekit::LayerConfig c = small_config("qwen2_moe", 16, 4, 2, 24);
  moekit::TopKLayer layer = moekit::random_layer(c, 9);
  const int64_t T = 5, d = 16;
  auto x = gaussian(1, static_cast<size_t>(T * d));
  std::vector<float> y(x.size());
  moekit::Workspace ws;
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    x[3 * d + 7] = bad;
    try {
      layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, 2);
      FAIL() << "expected an error for " << bad;
    } catch (const moekit::error& e) {
      EXPECT_NE(std::string(e.what()).find("hidden[3, 7] expected finite"), std::string::npos) << e.what();
    }
    try {
      layer.forward_plan(moekit::Batch::single(T, d), x.data(), ws.plan, y.data(), ws, 1);
      FAIL() << "expected an error from forward_plan";
    } catch (const moekit::error& e) {
      EXPECT_NE(std::string(e.what()).find("forward_plan: hidden[3, 7]"), std::string::npos) << e.what();
    }
    // A padded row may hold anything.
    std::vector<uint8_t> pad(T, 0);
    pad[3] = 1;
    moekit::Batch padded = moekit::Batch::single(T, d);
    padded.padding = pad;
    layer.forward(padded, x.data(), y.data(), ws, 2);
    for (int64_t j = 0; j < d; ++j) EXPECT_EQ(y[static_cast<size_t>(3 * d + j)], 0.0f);
    // Opt-out: the scan is skipped; the router's own (cheap, [T, E]) logit check still
    // refuses to route a non-finite logit, so the answer is an error, never a silent one.
    layer.set_check_finite(false);
    EXPECT_FALSE(layer.check_finite());
    try {
      layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, 2);
      FAIL() << "expected the router to refuse a non-finite logit";
    } catch (const moekit::error& e) {
      EXPECT_EQ(std::string(e.what()).find("hidden["), std::string::npos) << "the scan ran: " << e.what();
      EXPECT_NE(std::string(e.what()).find("token 3"), std::string::npos) << e.what();
    }
    // With finite input the opt-out changes nothing.
    x[3 * d + 7] = 0.25f;
    std::vector<float> checked(y.size()), unchecked(y.size());
    layer.forward(moekit::Batch::single(T, d), x.data(), unchecked.data(), ws, 2);
    layer.set_check_finite(true);
    layer.forward(moekit::Batch::single(T, d), x.data(), checked.data(), ws, 2);
    EXPECT_EQ(checked, unchecked);
  }
  // Weights: expert and shared gate.
  moekit::FfnBank bank(2, {16, 24, true, moekit::Activation::silu});
  std::vector<float> w(16 * 24, 0.5f);
  auto down = w;
  down[5 * 24 + 2] = std::numeric_limits<float>::infinity();
  try {
    bank.set_expert(1, w.data(), w.data(), down.data());
    FAIL() << "expected an error";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find("expert 1 down[5, 2] expected finite, got inf"), std::string::npos) << e.what();
  }
  moekit::SharedExpert shared{moekit::FfnBank(1, {16, 24, true, moekit::Activation::silu}), std::vector<float>(16, 0.1f)};
  shared.gate[4] = std::numeric_limits<float>::quiet_NaN();
  moekit::TopKOptions o;
  o.num_experts = 2;
  o.k = 1;
  o.hidden = 16;
  try {
    moekit::TopKLayer bad(moekit::TopKRouter(o, std::vector<float>(32, 0.1f)), moekit::FfnBank(2, {16, 24, true, moekit::Activation::silu}),
                          {std::move(shared)});
    FAIL() << "expected an error";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find("shared expert gate[4] expected finite"), std::string::npos) << e.what();
  }
}

}  // namespace
