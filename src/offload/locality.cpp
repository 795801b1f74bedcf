// SPDX-License-Identifier: Apache-2.0
// Routing traces: loads, cache replays (LRU, LFU, Belady) and the locality metrics SRP / SCH.
#include "moekit/offload/locality.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "moekit/error.hpp"

namespace moekit::offload {
namespace {

// Sequence s of the trace: tokens [b, e).
struct Seq {
  int64_t begin, end;
};
std::vector<Seq> sequences(const LayerTrace& t) {
  std::vector<Seq> s;
  if (t.sequence_offsets.empty()) {
    s.push_back({0, t.tokens()});
  } else {
    for (size_t i = 0; i + 1 < t.sequence_offsets.size(); ++i) s.push_back({t.sequence_offsets[i], t.sequence_offsets[i + 1]});
  }
  return s;
}

}  // namespace

void LayerTrace::validate() const {
  MOEKIT_CHECK(num_experts >= 1 && num_experts <= (int64_t{1} << 20), "routing trace: num_experts expected in [1, 2^20], got ",
               num_experts);
  MOEKIT_CHECK(k >= 0 && k <= num_experts, "routing trace: k expected in [0, ", num_experts, "], got ", k);
  MOEKIT_CHECK(k > 0 || ids.empty(), "routing trace: k = 0 but ", ids.size(), " ids");
  MOEKIT_CHECK(k == 0 || ids.size() % static_cast<size_t>(k) == 0, "routing trace: ", ids.size(),
               " ids expected a multiple of k = ", k);
  const int64_t T = tokens();
  std::vector<int64_t> seen_at(static_cast<size_t>(num_experts), -1);  // the token that last used each expert
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = ids[static_cast<size_t>(t * k + j)];
      if (e == -1) continue;
      MOEKIT_CHECK(e >= 0 && e < num_experts, "routing trace: ids[", t, ", ", j, "] expected in [0, ", num_experts,
                   ") or -1, got ", e);
      MOEKIT_CHECK(seen_at[static_cast<size_t>(e)] != t, "routing trace: token ", t, " uses expert ", e, " twice");
      seen_at[static_cast<size_t>(e)] = t;
    }
  if (!sequence_offsets.empty()) {
    MOEKIT_CHECK(sequence_offsets.size() >= 2 && sequence_offsets.front() == 0 && sequence_offsets.back() == T,
                 "routing trace: sequence_offsets expected [S + 1] from 0 to the token count ", T);
    for (size_t i = 1; i < sequence_offsets.size(); ++i)
      MOEKIT_CHECK(sequence_offsets[i] >= sequence_offsets[i - 1], "routing trace: sequence_offsets[", i,
                   "] expected non-decreasing, got ", sequence_offsets[i], " after ", sequence_offsets[i - 1]);
  }
}

LayerTrace LayerTrace::from_plan(const RoutingPlan& plan) {
  MOEKIT_CHECK(plan.finalized(), "routing trace: plan expected finalized");
  LayerTrace t;
  t.num_experts = plan.num_experts();
  const int64_t T = plan.num_tokens();
  for (int64_t i = 0; i < T; ++i) t.k = std::max(t.k, plan.slots_of(i));
  t.ids.assign(static_cast<size_t>(T * t.k), -1);
  std::vector<float> w(t.ids.size());
  if (t.k > 0) plan.to_topk(t.k, t.ids.data(), w.data());
  return t;
}

void LayerTrace::append(const LayerTrace& more) {
  MOEKIT_CHECK(more.num_experts == num_experts || tokens() == 0, "routing trace: appending a stream of ", more.num_experts,
               " experts to one of ", num_experts);
  const int64_t T0 = tokens(), T1 = more.tokens();
  const int64_t K = std::max(k, more.k);
  std::vector<int32_t> out(static_cast<size_t>((T0 + T1) * K), -1);
  for (int64_t t = 0; t < T0; ++t)
    std::copy_n(ids.begin() + t * k, k, out.begin() + t * K);
  for (int64_t t = 0; t < T1; ++t)
    std::copy_n(more.ids.begin() + t * more.k, more.k, out.begin() + (T0 + t) * K);
  std::vector<int32_t> offs = sequence_offsets.empty() ? std::vector<int32_t>{0, static_cast<int32_t>(T0)} : sequence_offsets;
  if (more.sequence_offsets.empty()) {
    offs.push_back(static_cast<int32_t>(T0 + T1));
  } else {
    for (size_t i = 1; i < more.sequence_offsets.size(); ++i) offs.push_back(static_cast<int32_t>(T0 + more.sequence_offsets[i]));
  }
  if (T0 == 0 && sequence_offsets.empty()) offs.erase(offs.begin() + 1);  // no empty first sequence
  num_experts = more.num_experts;
  k = K;
  ids = std::move(out);
  sequence_offsets = std::move(offs);
}

std::vector<int64_t> expert_load(const LayerTrace& trace) {
  std::vector<int64_t> load(static_cast<size_t>(trace.num_experts), 0);
  for (const int32_t e : trace.ids)
    if (e >= 0) ++load[static_cast<size_t>(e)];
  return load;
}

CacheReplay replay_cache(const LayerTrace& trace, int64_t capacity, CachePolicy policy) {
  trace.validate();
  const int64_t E = trace.num_experts, T = trace.tokens(), k = trace.k;
  MOEKIT_CHECK(capacity >= std::max<int64_t>(k, 1) && capacity <= E, "replay_cache: capacity expected in [", std::max<int64_t>(k, 1),
               " (the experts of one token), ", E, "], got ", capacity);
  constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
  // Belady: the tokens using each expert, and a cursor per expert.
  std::vector<std::vector<int64_t>> uses(static_cast<size_t>(E));
  if (policy == CachePolicy::belady)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j)
        if (const int32_t e = trace.ids[static_cast<size_t>(t * k + j)]; e >= 0) uses[static_cast<size_t>(e)].push_back(t);
  std::vector<size_t> cursor(static_cast<size_t>(E), 0);
  std::vector<uint8_t> resident(static_cast<size_t>(E), 0), now(static_cast<size_t>(E), 0);
  std::vector<int64_t> last(static_cast<size_t>(E), -1), freq(static_cast<size_t>(E), 0);
  std::vector<int32_t> mine;
  int64_t size = 0;
  CacheReplay r;
  for (int64_t t = 0; t < T; ++t) {
    mine.clear();
    for (int64_t j = 0; j < k; ++j)
      if (const int32_t e = trace.ids[static_cast<size_t>(t * k + j)]; e >= 0) mine.push_back(e);
    std::sort(mine.begin(), mine.end());
    for (const int32_t e : mine) now[static_cast<size_t>(e)] = 1;
    if (policy == CachePolicy::belady)
      for (int64_t e = 0; e < E; ++e)
        while (cursor[static_cast<size_t>(e)] < uses[static_cast<size_t>(e)].size() && uses[static_cast<size_t>(e)][cursor[static_cast<size_t>(e)]] <= t)
          ++cursor[static_cast<size_t>(e)];
    for (const int32_t e : mine) {
      ++r.accesses;
      if (resident[static_cast<size_t>(e)]) {
        ++r.hits;
        continue;
      }
      ++r.misses;
      if (size == capacity) {  // evict among the resident experts this token does not use
        int64_t victim = -1;
        for (int64_t c = 0; c < E; ++c) {
          if (!resident[static_cast<size_t>(c)] || now[static_cast<size_t>(c)]) continue;
          if (victim < 0) {
            victim = c;
            continue;
          }
          const auto v = static_cast<size_t>(victim), cc = static_cast<size_t>(c);
          bool better = false;
          switch (policy) {
            case CachePolicy::lru: better = last[cc] < last[v]; break;
            case CachePolicy::lfu: better = freq[cc] < freq[v] || (freq[cc] == freq[v] && last[cc] < last[v]); break;
            case CachePolicy::belady: {
              const int64_t nc = cursor[cc] < uses[cc].size() ? uses[cc][cursor[cc]] : kNever;
              const int64_t nv = cursor[v] < uses[v].size() ? uses[v][cursor[v]] : kNever;
              better = nc > nv;
              break;
            }
          }
          if (better) victim = c;
        }
        resident[static_cast<size_t>(victim)] = 0;
        --size;
      }
      resident[static_cast<size_t>(e)] = 1;
      ++size;
    }
    for (const int32_t e : mine) {
      now[static_cast<size_t>(e)] = 0;
      last[static_cast<size_t>(e)] = t;
      ++freq[static_cast<size_t>(e)];
    }
  }
  return r;
}

double srp(const LayerTrace& trace, int64_t m) {
  trace.validate();
  MOEKIT_CHECK(m >= 1 && m <= (int64_t{1} << 20), "srp: segment length m expected in [1, 2^20], got ", m);
  const int64_t E = trace.num_experts, k = trace.k;
  std::vector<double> hist(static_cast<size_t>(m) + 1, 0.0);  // (window, expert) pairs by count
  std::vector<int64_t> c(static_cast<size_t>(E));
  bool any = false;
  const auto add = [&](int64_t t, int64_t d) {
    for (int64_t j = 0; j < k; ++j)
      if (const int32_t e = trace.ids[static_cast<size_t>(t * k + j)]; e >= 0) c[static_cast<size_t>(e)] += d;
  };
  for (const Seq& s : sequences(trace)) {
    if (s.end - s.begin < m) continue;
    any = true;
    std::fill(c.begin(), c.end(), 0);
    for (int64_t t = s.begin; t < s.begin + m; ++t) add(t, 1);
    for (int64_t w = s.begin;; ++w) {
      for (const int64_t v : c) hist[static_cast<size_t>(v)] += 1.0;
      if (w + m >= s.end) break;
      add(w, -1);
      add(w + m, 1);
    }
  }
  if (!any) return std::numeric_limits<double>::quiet_NaN();
  double best = 0.0, M = 0.0, n = 0.0, A = 0.0;
  for (int64_t v = 0; v <= m; ++v) A += static_cast<double>(v) * hist[static_cast<size_t>(v)];
  for (int64_t tau = m; tau >= 0; --tau) {  // M and the predicted count grow as tau falls
    M += static_cast<double>(tau) * hist[static_cast<size_t>(tau)];
    n += hist[static_cast<size_t>(tau)];
    best = std::max(best, 2.0 * M / std::max(static_cast<double>(m) * n + A, 1.0));
  }
  return best;
}

std::vector<double> sch(const LayerTrace& trace, int64_t m) {
  trace.validate();
  MOEKIT_CHECK(m >= 1 && m <= (int64_t{1} << 20), "sch: look-ahead m expected in [1, 2^20], got ", m);
  const int64_t E = trace.num_experts, k = trace.k;
  std::vector<double> mean(static_cast<size_t>(E), 0.0);
  std::vector<int64_t> count(static_cast<size_t>(E)), stamp(static_cast<size_t>(E)), hist(static_cast<size_t>(E));
  std::vector<int32_t> order, rank(static_cast<size_t>(E));
  std::vector<uint8_t> seen(static_cast<size_t>(E));
  int64_t nseq = 0;
  for (const Seq& s : sequences(trace)) {
    std::fill(count.begin(), count.end(), 0);
    std::fill(stamp.begin(), stamp.end(), 0);
    std::fill(hist.begin(), hist.end(), 0);
    std::fill(seen.begin(), seen.end(), 0);
    order.clear();
    int64_t ts = 0, distinct = 0, accesses = 0;
    const auto window = [&](int64_t t, int64_t d) {
      if (t >= s.end) return;
      for (int64_t j = 0; j < k; ++j)
        if (const int32_t e = trace.ids[static_cast<size_t>(t * k + j)]; e >= 0) count[static_cast<size_t>(e)] += d;
    };
    for (int64_t t = s.begin; t < std::min(s.begin + m, s.end); ++t) window(t, 1);
    for (int64_t t = s.begin; t < s.end; ++t) {
      // The seen experts by priority (uses in [t, t + m), then the latest use), before token t.
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        const auto ua = static_cast<size_t>(a), ub = static_cast<size_t>(b);
        return count[ua] != count[ub] ? count[ua] > count[ub] : stamp[ua] > stamp[ub];
      });
      for (size_t i = 0; i < order.size(); ++i) rank[static_cast<size_t>(order[i])] = static_cast<int32_t>(i);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = trace.ids[static_cast<size_t>(t * k + j)];
        if (e < 0) continue;
        ++accesses;
        if (!seen[static_cast<size_t>(e)]) {
          ++hist[static_cast<size_t>(distinct++)];  // first use: a hit once the cache has room for it
        } else {
          ++hist[static_cast<size_t>(rank[static_cast<size_t>(e)])];
        }
      }
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = trace.ids[static_cast<size_t>(t * k + j)];
        if (e < 0) continue;
        if (!seen[static_cast<size_t>(e)]) {
          seen[static_cast<size_t>(e)] = 1;
          order.push_back(e);
        }
        stamp[static_cast<size_t>(e)] = ++ts;
        --count[static_cast<size_t>(e)];
      }
      window(t + m, 1);
    }
    if (accesses == 0) continue;
    ++nseq;
    int64_t run = 0;
    for (int64_t c = 0; c < E; ++c) {
      run += hist[static_cast<size_t>(c)];
      mean[static_cast<size_t>(c)] += static_cast<double>(run) / static_cast<double>(accesses);
    }
  }
  for (double& v : mean) v = nseq > 0 ? v / static_cast<double>(nseq) : std::numeric_limits<double>::quiet_NaN();
  return mean;
}

}  // namespace moekit::offload
