// SPDX-License-Identifier: Apache-2.0
// Routing traces and what they say about expert offloading: per-expert loads, the hit rates of
// an expert cache of C slots under LRU, LFU and Belady's optimal policy, and the two locality
// metrics of "Not All Models Suit Expert Offloading: On Local Routing Consistency of
// Mixture-of-Expert Models" (arXiv 2505.16056): Segment Routing Best Performance (SRP) and
// Segment Cache Best Hit Rate (SCH). docs/scale-out.md writes the definitions out.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::offload {

/// The routing decisions of one layer over a token stream: token t used the experts
/// `ids[t k .. t k + k)` (each in [0, E) at most once, -1 for an empty slot), tokens in the
/// order they were computed. `sequence_offsets [S + 1]` (empty: one sequence) cut the stream
/// into sequences (SRP and SCH count windows inside a sequence).
struct LayerTrace {
  int64_t num_experts = 0;
  int64_t k = 0;
  std::vector<int32_t> ids;
  std::vector<int32_t> sequence_offsets;

  [[nodiscard]] int64_t tokens() const noexcept { return k == 0 ? 0 : static_cast<int64_t>(ids.size()) / k; }
  /// Checks the shape, the ids (range, no expert twice in a token) and the offsets; throws
  /// moekit::error naming the first bad entry.
  void validate() const;
  /// The kept slots of a finalised plan (dropped slots left out), k = the most slots of a token.
  static LayerTrace from_plan(const RoutingPlan& plan);
  /// Appends another stream of the same layer (same E); its sequences follow these.
  void append(const LayerTrace& more);
};

/// Rows each expert served.
std::vector<int64_t> expert_load(const LayerTrace& trace);

/// An expert cache replayed over a trace.
enum class CachePolicy : uint8_t {
  lru,     ///< evict the least recently used (ties: lower id)
  lfu,     ///< evict the least frequently used since the start (ties: least recent, lower id)
  belady,  ///< offline optimum: evict the expert used again farthest in the future (never: first)
};
struct CacheReplay {
  int64_t accesses = 0;  ///< (token, expert) uses
  int64_t hits = 0;
  int64_t misses = 0;    ///< loads, the first use of each expert included (the cache starts empty)
  [[nodiscard]] double hit_rate() const noexcept { return accesses > 0 ? static_cast<double>(hits) / accesses : 0.0; }
};
/// Replays the trace token by token through a cache of `capacity` experts (capacity >= the
/// most experts one token uses): a token's experts that are resident are hits; each missing one
/// (ascending id) is loaded, evicting by `policy` among the resident experts this token does
/// not use. Recency and frequency count tokens. The same rules as offload::CachedFfnBank at one
/// token per call, so an engine's measured hits equal this replay.
CacheReplay replay_cache(const LayerTrace& trace, int64_t capacity, CachePolicy policy);

/// Segment Routing Best Performance for segments of `m` tokens: over every window of m
/// consecutive tokens inside a sequence, c[s][e] = tokens of window s that use expert e;
/// for a threshold tau in [0, m], predict S_tau(s) = {e : c[s][e] >= tau} as the experts of the
/// whole window: M = sum over s and e in S_tau(s) of c[s][e], Pred = m * sum_s |S_tau(s)|,
/// A = sum c. SRP = max over tau of 2 M / max(Pred + A, 1) (an F1 score). NaN when no
/// sequence has m tokens. (The paper's official code, ljcleo/moe-lrc src/30_srp_calc.py and
/// 31_srp_refine.py.)
double srp(const LayerTrace& trace, int64_t m);

/// Segment Cache Best Hit Rate with a look-ahead of `m` tokens, for every cache size: element
/// C - 1 is the hit rate of a cache of C experts that, before each token, holds the C experts
/// it has seen with the highest priority (uses within this and the next m - 1 tokens, then the
/// most recent use); an expert's first use counts as a hit when fewer than C distinct experts
/// came before it (the cache was filled with exactly what was needed). Each sequence starts
/// empty; the result is the mean over sequences (ljcleo/moe-lrc src/41_sch_calc.py).
std::vector<double> sch(const LayerTrace& trace, int64_t m);

}  // namespace moekit::offload
#pragma GCC visibility pop
