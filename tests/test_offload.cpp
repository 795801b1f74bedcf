// SPDX-License-Identifier: Apache-2.0
// moekit::offload: routing-trace metrics against plain references (cache replays against an
// exhaustive search for the optimum and a reuse-distance formula for LRU; SRP and SCH against
// direct transcriptions of their definitions, recounted from scratch at every window and
// token), trace files, and the expert cache: an offloaded layer equals the resident one bit for
// bit, and its hits and misses equal the replay of its own trace.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/io/trace.hpp"
#include "moekit/offload/expert_cache.hpp"
#include "moekit/offload/locality.hpp"

namespace {

namespace fs = std::filesystem;
using moekit::offload::CachePolicy;
using moekit::offload::LayerTrace;

// A random trace: k distinct experts per token, drawn with a sticky bias (a token reuses the
// previous token's experts with probability `stick`), a few empty slots, some sequences.
LayerTrace random_trace(std::mt19937_64& g, int64_t E, int64_t k, int64_t T, double stick, bool sequences = true,
                        double empty = 0.05) {
  LayerTrace t;
  t.num_experts = E;
  t.k = k;
  t.ids.assign(static_cast<size_t>(T * k), -1);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(E - 1));
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < k; ++j) {
      if (u(g) < empty) continue;
      for (;;) {
        const int32_t e = i > 0 && u(g) < stick ? t.ids[static_cast<size_t>((i - 1) * k + j)] : pick(g);
        if (e < 0) continue;
        bool dup = false;
        for (int64_t q = 0; q < j; ++q) dup |= t.ids[static_cast<size_t>(i * k + q)] == e;
        if (dup) continue;
        t.ids[static_cast<size_t>(i * k + j)] = e;
        break;
      }
    }
  if (sequences && T > 2) {
    t.sequence_offsets = {0, static_cast<int32_t>(T / 3), static_cast<int32_t>(T / 3), static_cast<int32_t>(T)};
  }
  return t;
}

std::vector<std::vector<int32_t>> token_sets(const LayerTrace& t) {
  std::vector<std::vector<int32_t>> s(static_cast<size_t>(t.tokens()));
  for (int64_t i = 0; i < t.tokens(); ++i) {
    for (int64_t j = 0; j < t.k; ++j)
      if (const int32_t e = t.ids[static_cast<size_t>(i * t.k + j)]; e >= 0) s[static_cast<size_t>(i)].push_back(e);
    std::sort(s[static_cast<size_t>(i)].begin(), s[static_cast<size_t>(i)].end());
  }
  return s;
}

// The fewest misses any eviction choice gives (exhaustive search; tiny traces only).
int64_t optimal_misses(const std::vector<std::vector<int32_t>>& sets, int64_t C) {
  int64_t best = std::numeric_limits<int64_t>::max();
  std::function<void(size_t, size_t, std::set<int32_t>, int64_t)> go = [&](size_t t, size_t j, std::set<int32_t> cache,
                                                                           int64_t misses) {
    if (misses >= best) return;
    if (t == sets.size()) {
      best = misses;
      return;
    }
    if (j == sets[t].size()) return go(t + 1, 0, std::move(cache), misses);
    const int32_t e = sets[t][j];
    if (cache.count(e)) return go(t, j + 1, std::move(cache), misses);
    if (static_cast<int64_t>(cache.size()) < C) {
      cache.insert(e);
      return go(t, j + 1, std::move(cache), misses + 1);
    }
    for (const int32_t v : std::vector<int32_t>(cache.begin(), cache.end())) {
      if (std::find(sets[t].begin(), sets[t].end(), v) != sets[t].end()) continue;  // in use by this token
      std::set<int32_t> next = cache;
      next.erase(v);
      next.insert(e);
      go(t, j + 1, std::move(next), misses + 1);
    }
  };
  go(0, 0, {}, 0);
  return best;
}

TEST(OffloadReplay, BeladyIsTheOptimumOnTinyTraces) {
  std::mt19937_64 g(1);
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t E = std::uniform_int_distribution<int64_t>(2, 6)(g), k = std::uniform_int_distribution<int64_t>(1, std::min<int64_t>(2, E))(g);
    const LayerTrace t = random_trace(g, E, k, std::uniform_int_distribution<int64_t>(1, 9)(g), 0.3, false, 0.0);
    for (int64_t C = k; C <= E; ++C) {
      const auto bel = moekit::offload::replay_cache(t, C, CachePolicy::belady);
      EXPECT_EQ(bel.misses, optimal_misses(token_sets(t), C)) << "trial " << trial << " E " << E << " k " << k << " C " << C;
      for (const CachePolicy p : {CachePolicy::lru, CachePolicy::lfu})
        EXPECT_LE(bel.misses, moekit::offload::replay_cache(t, C, p).misses);
    }
  }
}

TEST(OffloadReplay, LruHitsAreReuseDistancesBelowCapacity) {
  // One expert per token: LRU hits a use iff fewer than C other experts were used since the
  // previous use of the same expert (its reuse distance).
  std::mt19937_64 g(2);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t E = std::uniform_int_distribution<int64_t>(1, 12)(g);
    const LayerTrace t = random_trace(g, E, 1, std::uniform_int_distribution<int64_t>(0, 300)(g), 0.4, false, 0.1);
    for (int64_t C = 1; C <= E; ++C) {
      int64_t hits = 0, accesses = 0;
      for (int64_t i = 0; i < t.tokens(); ++i) {
        const int32_t e = t.ids[static_cast<size_t>(i)];
        if (e < 0) continue;
        ++accesses;
        std::set<int32_t> between;
        int64_t j = i - 1;
        for (; j >= 0 && t.ids[static_cast<size_t>(j)] != e; --j)
          if (t.ids[static_cast<size_t>(j)] >= 0) between.insert(t.ids[static_cast<size_t>(j)]);
        if (j >= 0 && static_cast<int64_t>(between.size()) < C) ++hits;
      }
      const auto r = moekit::offload::replay_cache(t, C, CachePolicy::lru);
      EXPECT_EQ(r.accesses, accesses);
      EXPECT_EQ(r.hits, hits) << "trial " << trial << " C " << C;
      EXPECT_EQ(r.hits + r.misses, r.accesses);
    }
  }
}

TEST(OffloadReplay, EveryPolicyAtFullCapacityMissesOncePerExpert) {
  std::mt19937_64 g(3);
  const LayerTrace t = random_trace(g, 16, 4, 500, 0.5);
  std::set<int32_t> distinct(t.ids.begin(), t.ids.end());
  distinct.erase(-1);
  for (const CachePolicy p : {CachePolicy::lru, CachePolicy::lfu, CachePolicy::belady}) {
    const auto r = moekit::offload::replay_cache(t, 16, p);
    EXPECT_EQ(r.misses, static_cast<int64_t>(distinct.size()));
    // Belady bounds the online policies at every size.
    for (int64_t C = 4; C <= 16; ++C)
      EXPECT_LE(moekit::offload::replay_cache(t, C, CachePolicy::belady).misses, moekit::offload::replay_cache(t, C, p).misses);
  }
  EXPECT_THROW(moekit::offload::replay_cache(t, 3, CachePolicy::lru), moekit::error);  // smaller than a token's experts
  EXPECT_THROW(moekit::offload::replay_cache(t, 17, CachePolicy::lru), moekit::error);
}

// SRP by its definition, every window recounted from scratch.
double srp_reference(const LayerTrace& t, int64_t m) {
  std::vector<std::pair<int64_t, int64_t>> seqs;
  if (t.sequence_offsets.empty()) {
    seqs.push_back({0, t.tokens()});
  } else {
    for (size_t i = 0; i + 1 < t.sequence_offsets.size(); ++i) seqs.push_back({t.sequence_offsets[i], t.sequence_offsets[i + 1]});
  }
  std::vector<std::vector<int64_t>> windows;  // c[e] per window
  for (const auto& [b, e] : seqs)
    for (int64_t s = b; s + m <= e; ++s) {
      std::vector<int64_t> c(static_cast<size_t>(t.num_experts), 0);
      for (int64_t i = s; i < s + m; ++i)
        for (int64_t j = 0; j < t.k; ++j)
          if (const int32_t x = t.ids[static_cast<size_t>(i * t.k + j)]; x >= 0) ++c[static_cast<size_t>(x)];
      windows.push_back(c);
    }
  if (windows.empty()) return std::numeric_limits<double>::quiet_NaN();
  double A = 0;
  for (const auto& c : windows)
    for (const int64_t v : c) A += static_cast<double>(v);
  double best = 0;
  for (int64_t tau = 0; tau <= m; ++tau) {
    double M = 0, Pred = 0;
    for (const auto& c : windows)
      for (const int64_t v : c)
        if (v >= tau) {
          M += static_cast<double>(v);
          Pred += static_cast<double>(m);
        }
    best = std::max(best, 2.0 * M / std::max(Pred + A, 1.0));
  }
  return best;
}

// SCH as the official algorithm defines it, recounted at every token: the seen experts
// ranked by (uses in [t, t + m), last access) before the token; first uses ranked by the
// number of distinct experts before them; hit rates per sequence, averaged.
std::vector<double> sch_reference(const LayerTrace& t, int64_t m) {
  const int64_t E = t.num_experts, k = t.k;
  std::vector<std::pair<int64_t, int64_t>> seqs;
  if (t.sequence_offsets.empty()) {
    seqs.push_back({0, t.tokens()});
  } else {
    for (size_t i = 0; i + 1 < t.sequence_offsets.size(); ++i) seqs.push_back({t.sequence_offsets[i], t.sequence_offsets[i + 1]});
  }
  std::vector<double> mean(static_cast<size_t>(E), 0.0);
  int64_t n = 0;
  for (const auto& [b, end] : seqs) {
    std::vector<int64_t> last(static_cast<size_t>(E), -1), pos_hist(static_cast<size_t>(E), 0);
    int64_t clock = 0, accesses = 0;
    for (int64_t i = b; i < end; ++i) {
      std::vector<int32_t> seen;
      for (int32_t e = 0; e < E; ++e)
        if (last[static_cast<size_t>(e)] >= 0) seen.push_back(e);
      const auto future = [&](int32_t e) {
        int64_t c = 0;
        for (int64_t q = i; q < std::min(i + m, end); ++q)
          for (int64_t j = 0; j < k; ++j) c += t.ids[static_cast<size_t>(q * k + j)] == e;
        return c;
      };
      std::stable_sort(seen.begin(), seen.end(), [&](int32_t a, int32_t c) {
        const int64_t fa = future(a), fc = future(c);
        return fa != fc ? fa > fc : last[static_cast<size_t>(a)] > last[static_cast<size_t>(c)];
      });
      int64_t distinct = static_cast<int64_t>(seen.size());
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = t.ids[static_cast<size_t>(i * k + j)];
        if (e < 0) continue;
        ++accesses;
        const auto it = std::find(seen.begin(), seen.end(), e);
        ++pos_hist[static_cast<size_t>(it != seen.end() ? it - seen.begin() : distinct++)];
      }
      for (int64_t j = 0; j < k; ++j)
        if (const int32_t e = t.ids[static_cast<size_t>(i * k + j)]; e >= 0) last[static_cast<size_t>(e)] = ++clock;
    }
    if (accesses == 0) continue;
    ++n;
    int64_t run = 0;
    for (int64_t c = 0; c < E; ++c) mean[static_cast<size_t>(c)] += static_cast<double>(run += pos_hist[static_cast<size_t>(c)]) / accesses;
  }
  for (double& v : mean) v /= static_cast<double>(n);
  return mean;
}

TEST(OffloadLocality, SrpAndSchMatchTheirDefinitions) {
  std::mt19937_64 g(4);
  for (int trial = 0; trial < 30; ++trial) {
    const int64_t E = std::uniform_int_distribution<int64_t>(2, 16)(g), k = std::uniform_int_distribution<int64_t>(1, std::min<int64_t>(4, E))(g);
    const LayerTrace t = random_trace(g, E, k, std::uniform_int_distribution<int64_t>(1, 120)(g),
                                      std::uniform_real_distribution<double>(0.0, 0.9)(g), trial % 2 == 0);
    for (const int64_t m : {1, 2, 5, 16, 200}) {
      const double got = moekit::offload::srp(t, m), want = srp_reference(t, m);
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(got));
      } else {
        EXPECT_NEAR(got, want, 1e-12) << "trial " << trial << " m " << m;
        EXPECT_GE(got, 0.0);
        EXPECT_LE(got, 1.0);
      }
      if (std::all_of(t.ids.begin(), t.ids.end(), [](int32_t e) { return e < 0; })) continue;  // no use at all
      const std::vector<double> s = moekit::offload::sch(t, m), r = sch_reference(t, m);
      ASSERT_EQ(s.size(), r.size());
      for (size_t c = 0; c < s.size(); ++c) EXPECT_NEAR(s[c], r[c], 1e-12) << "trial " << trial << " m " << m << " C " << c + 1;
      for (size_t c = 1; c < s.size(); ++c) EXPECT_GE(s[c], s[c - 1]);
      EXPECT_DOUBLE_EQ(s.back(), 1.0);  // every expert fits
    }
  }
}

TEST(OffloadLocality, KnownValues) {
  // One expert used by every token: perfectly consistent, SRP 1 at any segment length.
  LayerTrace same;
  same.num_experts = 4;
  same.k = 1;
  same.ids.assign(40, 2);
  EXPECT_DOUBLE_EQ(moekit::offload::srp(same, 8), 1.0);
  EXPECT_DOUBLE_EQ(moekit::offload::sch(same, 4)[0], 1.0);
  // Experts in a cycle 0 1 2 3 0 1 ...: a 1-expert cache with look-ahead 1 keeps only the
  // current token's expert: every use but the first of each expert misses at C = 1 with LRU.
  LayerTrace cyc;
  cyc.num_experts = 4;
  cyc.k = 1;
  for (int i = 0; i < 40; ++i) cyc.ids.push_back(i % 4);
  EXPECT_EQ(moekit::offload::replay_cache(cyc, 3, CachePolicy::lru).hits, 0);   // LRU's worst case
  EXPECT_EQ(moekit::offload::replay_cache(cyc, 4, CachePolicy::lru).misses, 4);
  EXPECT_GT(moekit::offload::replay_cache(cyc, 3, CachePolicy::belady).hits, 20);
  // Windows of one token hold one expert each: SRP(1) = 1; no sequence as long as 41 tokens: NaN.
  EXPECT_DOUBLE_EQ(moekit::offload::srp(cyc, 1), 1.0);
  EXPECT_TRUE(std::isnan(moekit::offload::srp(cyc, 41)));
}

TEST(OffloadTrace, FilesRoundTripAndBadOnesAreRefused) {
  std::mt19937_64 g(5);
  const fs::path dir = fs::path(testing::TempDir()) / "moekit_offload_trace";
  fs::create_directories(dir);
  moekit::io::RoutingTrace tr;
  tr.layers[3] = random_trace(g, 8, 2, 50, 0.3);
  tr.layers[7] = random_trace(g, 64, 6, 20, 0.1, false);
  const std::string p = (dir / "t.safetensors").string();
  moekit::io::write_trace(p, tr);
  EXPECT_TRUE(moekit::io::is_trace_file(p));
  const moekit::io::RoutingTrace back = moekit::io::read_trace(p);
  ASSERT_EQ(back.layers.size(), 2u);
  for (const auto& [l, t] : tr.layers) {
    EXPECT_EQ(back.layers.at(l).num_experts, t.num_experts);
    EXPECT_EQ(back.layers.at(l).k, t.k);
    EXPECT_EQ(back.layers.at(l).ids, t.ids);
    EXPECT_EQ(back.layers.at(l).sequence_offsets, t.sequence_offsets);
  }
  // A safetensors file that is not a trace; a trace with an id out of range.
  std::vector<float> x(4, 1.0f);
  moekit::io::write_safetensors((dir / "x.safetensors").string(), {{"hidden_states", moekit::io::DType::F32, {1, 4}, x.data()}});
  EXPECT_FALSE(moekit::io::is_trace_file((dir / "x.safetensors").string()));
  EXPECT_THROW(moekit::io::read_trace((dir / "x.safetensors").string()), moekit::error);
  std::vector<int32_t> bad = {0, 9};
  moekit::io::write_safetensors((dir / "b.safetensors").string(), {{"layers.0.expert_ids", moekit::io::DType::I32, {1, 2}, bad.data()}},
                                {{"format", "moekit-routing-trace"}, {"version", "1"}, {"layers.0.num_experts", "8"}});
  EXPECT_THROW(moekit::io::read_trace((dir / "b.safetensors").string()), moekit::error);
  EXPECT_THROW(moekit::io::read_trace((dir / "missing.safetensors").string()), moekit::error);
  fs::remove_all(dir);
}

// ---------------------------------------------------------------- the expert cache

moekit::LayerConfig small_config(int64_t E, int64_t k) {
  moekit::LayerConfig c = moekit::preset_defaults("qwen2_moe");  // with a gated shared expert
  c.router.num_experts = E;
  c.router.k = k;
  c.router.hidden = c.experts.hidden = 32;
  c.experts.intermediate = 24;
  if (c.shared) c.shared->intermediate = 40;
  return c;
}

// Expert e of a resident layer as a one-expert bank (what a loader returns).
moekit::FfnBank one_expert(const moekit::FfnBank& full, int64_t e) {
  const int64_t nb = full.shape().biases_per_expert();
  std::vector<float> b;
  if (nb > 0) b.assign(full.biases().begin() + e * nb, full.biases().begin() + (e + 1) * nb);
  return moekit::FfnBank::from_packed(full.shape(), {full.in_matrix(e)}, {full.down_matrix(e)}, b, full.input_smoothing());
}

TEST(OffloadCache, OffloadedLayerEqualsTheResidentOneAndCountsAsTheReplay) {
  std::mt19937_64 g(6);
  const int64_t E = 8, k = 2;
  const moekit::LayerConfig c = small_config(E, k);
  const moekit::TopKLayer full = moekit::random_layer(c, 9);
  const int64_t d = full.hidden_size();
  for (const CachePolicy policy : {CachePolicy::lru, CachePolicy::lfu})
    for (const int64_t C : {int64_t{2}, int64_t{3}, E}) {
      int64_t loads = 0;
      moekit::offload::CachedFfnBank bank(E, full.experts().shape(), C, [&](int64_t e) {
        ++loads;
        return one_expert(full.experts(), e);
      }, policy);
      moekit::offload::OffloadedLayer<moekit::TopKRouter> layer(
          moekit::SparseLayer<moekit::TopKRouter, moekit::offload::CachedFfnBank>(full.router(), std::move(bank), full.shared_experts()));
      moekit::Workspace ws, wf;
      std::normal_distribution<float> n(0.0f, 1.0f);
      // Decode: one token per call; the trace of the calls replays to the same counts.
      LayerTrace trace;
      trace.num_experts = E;
      for (int step = 0; step < 60; ++step) {
        std::vector<float> x(static_cast<size_t>(d)), y(x.size()), want(x.size());
        for (float& v : x) v = n(g);
        layer.forward(moekit::Batch::single(1, d), x.data(), y.data(), ws, 1);
        full.forward(moekit::Batch::single(1, d), x.data(), want.data(), wf, 1);
        ASSERT_EQ(y, want) << "step " << step << " C " << C;
        trace.append(LayerTrace::from_plan(ws.plan));
      }
      trace.sequence_offsets.clear();
      const auto r = moekit::offload::replay_cache(trace, C, policy);
      EXPECT_EQ(layer.cache().stats().hits, r.hits) << "C " << C;
      EXPECT_EQ(layer.cache().stats().misses, r.misses) << "C " << C;
      EXPECT_EQ(loads, r.misses);
      EXPECT_LE(layer.cache().num_resident(), C);
      // Prefill: a batch needing more experts than fit runs in groups, same bits.
      for (const int64_t T : {5, 64}) {
        std::vector<float> x(static_cast<size_t>(T * d)), y(x.size()), want(x.size());
        for (float& v : x) v = n(g);
        layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, 2);
        full.forward(moekit::Batch::single(T, d), x.data(), want.data(), wf, 2);
        ASSERT_EQ(y, want) << "T " << T << " C " << C;
      }
      // Prefetch the experts the router predicts for the next input: the call then hits.
      std::vector<float> x(static_cast<size_t>(d)), y(x.size());
      for (float& v : x) v = n(g);
      moekit::Workspace wp;
      layer.prefetch(layer.predict(moekit::Batch::single(1, d), x.data(), wp));
      const int64_t misses = layer.cache().stats().misses;
      layer.forward(moekit::Batch::single(1, d), x.data(), y.data(), ws, 1);
      EXPECT_EQ(layer.cache().stats().misses, misses) << "prefetched experts must hit";
    }
}

TEST(OffloadCache, BadSetupsThrow) {
  const moekit::LayerConfig c = small_config(4, 2);
  const moekit::TopKLayer full = moekit::random_layer(c, 1);
  const auto shape = full.experts().shape();
  const auto loader = [&](int64_t e) { return one_expert(full.experts(), e); };
  EXPECT_THROW(moekit::offload::CachedFfnBank(4, shape, 0, loader), moekit::error);
  EXPECT_THROW(moekit::offload::CachedFfnBank(4, shape, 5, loader), moekit::error);
  EXPECT_THROW(moekit::offload::CachedFfnBank(4, shape, 2, loader, CachePolicy::belady), moekit::error);
  moekit::FfnShape other = shape;
  other.intermediate += 8;
  moekit::offload::CachedFfnBank wrong(4, other, 2, loader);
  const std::vector<int64_t> need = {1};
  EXPECT_THROW(wrong.make_resident(need), moekit::error);  // the loader's expert has another shape
  moekit::offload::CachedFfnBank ok(4, shape, 2, loader);
  const std::vector<int64_t> three = {0, 1, 2};
  EXPECT_THROW(ok.make_resident(three), moekit::error);  // more than fit
  std::vector<float> x(32), y(32), s(ok.scratch_floats(1));
  EXPECT_THROW(ok.run(3, x.data(), 1, y.data(), s.data()), moekit::error);  // not resident
}

TEST(OffloadCache, LoadOffloadedLayerReadsExpertsFromTheCheckpointOnDemand) {
  // A Mixtral-named checkpoint written from a random layer; the offloaded layer loads only
  // what each call needs and equals the resident layer loaded from the same file.
  moekit::LayerConfig c = moekit::preset_defaults("mixtral");
  c.router.num_experts = 6;
  c.router.hidden = c.experts.hidden = 16;
  c.experts.intermediate = 12;
  const moekit::TopKLayer src = moekit::random_layer(c, 3);
  const int64_t E = 6, d = 16, f = 12;
  std::vector<std::vector<float>> store;
  store.reserve(1 + 3 * E);  // the tensors point into it: no reallocation
  std::vector<moekit::io::OutTensor> out;
  store.push_back(src.router().weight());
  out.push_back({"model.layers.0.block_sparse_moe.gate.weight", moekit::io::DType::F32, {E, d}, store.back().data()});
  for (int64_t e = 0; e < E; ++e) {
    std::vector<float> gate(static_cast<size_t>(f * d)), up(gate.size()), down(static_cast<size_t>(d * f));
    src.experts().get_expert(e, gate.data(), up.data(), down.data());
    const std::string p = "model.layers.0.block_sparse_moe.experts." + std::to_string(e) + ".";
    store.push_back(gate);
    out.push_back({p + "w1.weight", moekit::io::DType::F32, {f, d}, store.back().data()});
    store.push_back(up);
    out.push_back({p + "w3.weight", moekit::io::DType::F32, {f, d}, store.back().data()});
    store.push_back(down);
    out.push_back({p + "w2.weight", moekit::io::DType::F32, {d, f}, store.back().data()});
  }
  const fs::path path = fs::path(testing::TempDir()) / "moekit_offload_ckpt.safetensors";
  moekit::io::write_safetensors(path.string(), out);
  auto weights = std::make_shared<const moekit::io::TensorSource>(moekit::io::TensorSource::open(path.string()));
  const std::string prefix = "model.layers.0.block_sparse_moe.";
  const moekit::TopKLayer resident = moekit::load_layer(c, *weights, prefix);
  auto layer = moekit::load_offloaded_layer(c, weights, prefix, 2, CachePolicy::lfu);
  std::mt19937_64 g(8);
  std::normal_distribution<float> n(0.0f, 1.0f);
  moekit::Workspace ws, wr;
  for (const int64_t T : {1, 1, 3, 40}) {
    std::vector<float> x(static_cast<size_t>(T * d)), y(x.size()), want(x.size());
    for (float& v : x) v = n(g);
    layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, 1);
    resident.forward(moekit::Batch::single(T, d), x.data(), want.data(), wr, 1);
    ASSERT_EQ(y, want) << "T " << T;
  }
  EXPECT_LE(layer.cache().num_resident(), 2);
  EXPECT_GT(layer.cache().stats().bytes_loaded, 0.0);
  // One rank's shard for expert parallelism: only experts 1 and 4 read, the same outputs.
  const auto shard = moekit::load_layer_shard(c, *weights, prefix, {1, 4});
  EXPECT_EQ(shard.experts().held(), (std::vector<int64_t>{1, 4}));
  {
    std::vector<float> x(static_cast<size_t>(3 * d)), a(x.size()), b(x.size()), sc(resident.experts().scratch_floats(3));
    for (float& v : x) v = n(g);
    for (const int64_t e : {1, 4}) {
      shard.experts().run(e, x.data(), 3, a.data(), sc.data());
      resident.experts().run(e, x.data(), 3, b.data(), sc.data());
      EXPECT_EQ(a, b) << "expert " << e;
    }
    EXPECT_FALSE(shard.experts().resident(0));
  }
  // A checkpoint missing an expert's tensor is refused when the layer is built, not at a miss.
  out.pop_back();
  const fs::path broken = fs::path(testing::TempDir()) / "moekit_offload_broken.safetensors";
  moekit::io::write_safetensors(broken.string(), out);
  EXPECT_THROW(moekit::load_offloaded_layer(c, std::make_shared<const moekit::io::TensorSource>(
                                                   moekit::io::TensorSource::open(broken.string())),
                                            prefix, 2),
               moekit::error);
  fs::remove(path);
  fs::remove(broken);
}

}  // namespace
