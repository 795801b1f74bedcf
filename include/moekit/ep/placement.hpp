// SPDX-License-Identifier: Apache-2.0
// Expert placement over ranks, and the dispatch plans of expert parallelism: plain (each
// expert on its owners) and least-loaded (LLEP, arXiv 2601.17111). Pure functions, no MPI:
// every rank computes the same plan from the same global per-expert loads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

#include "moekit/error.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::ep {

/// Which ranks hold which experts' weights. Every expert has at least one owner; the first is
/// its native rank (LLEP spills from there); further owners are replicas.
class Placement {
 public:
  Placement() = default;

  /// Expert e on rank e mod P.
  static Placement round_robin(int64_t experts, int ranks) {
    check_sizes(experts, ranks);
    std::vector<std::vector<int>> o(static_cast<size_t>(experts));
    for (int64_t e = 0; e < experts; ++e) o[static_cast<size_t>(e)] = {static_cast<int>(e % ranks)};
    return Placement(std::move(o), ranks);
  }
  /// Experts in contiguous blocks: rank r holds [E r / P, E (r + 1) / P) (Megatron's layout).
  static Placement contiguous(int64_t experts, int ranks) {
    check_sizes(experts, ranks);
    std::vector<std::vector<int>> o(static_cast<size_t>(experts));
    for (int r = 0; r < ranks; ++r)
      for (int64_t e = experts * r / ranks; e < experts * (r + 1) / ranks; ++e) o[static_cast<size_t>(e)] = {r};
    return Placement(std::move(o), ranks);
  }
  /// A table: `owners[e]` lists the ranks holding expert e (native first, then replicas; no
  /// rank twice). Throws moekit::error naming the first bad entry.
  static Placement table(std::vector<std::vector<int>> owners, int ranks) {
    check_sizes(static_cast<int64_t>(owners.size()), ranks);
    for (size_t e = 0; e < owners.size(); ++e) {
      MOEKIT_CHECK(!owners[e].empty(), "ep::Placement: expert ", e, " expected at least one owner rank, got none");
      for (size_t i = 0; i < owners[e].size(); ++i) {
        MOEKIT_CHECK(owners[e][i] >= 0 && owners[e][i] < ranks, "ep::Placement: expert ", e, " owner ", i,
                     " expected a rank in [0, ", ranks, "), got ", owners[e][i]);
        for (size_t j = 0; j < i; ++j)
          MOEKIT_CHECK(owners[e][j] != owners[e][i], "ep::Placement: expert ", e, " lists rank ", owners[e][i],
                       " twice");
      }
    }
    return Placement(std::move(owners), ranks);
  }

  [[nodiscard]] int ranks() const noexcept { return ranks_; }
  [[nodiscard]] int64_t experts() const noexcept { return static_cast<int64_t>(owners_.size()); }
  [[nodiscard]] std::span<const int> owners(int64_t e) const { return owners_[static_cast<size_t>(e)]; }
  [[nodiscard]] int native(int64_t e) const { return owners_[static_cast<size_t>(e)][0]; }
  [[nodiscard]] bool holds(int rank, int64_t e) const {
    const auto& o = owners_[static_cast<size_t>(e)];
    return std::find(o.begin(), o.end(), rank) != o.end();
  }
  /// The experts whose weights `rank` holds, ascending.
  [[nodiscard]] std::vector<int64_t> experts_of(int rank) const {
    std::vector<int64_t> v;
    for (int64_t e = 0; e < experts(); ++e)
      if (holds(rank, e)) v.push_back(e);
    return v;
  }

 private:
  Placement(std::vector<std::vector<int>> owners, int ranks) : owners_(std::move(owners)), ranks_(ranks) {}
  static void check_sizes(int64_t experts, int ranks) {
    MOEKIT_CHECK(experts >= 1 && experts <= std::numeric_limits<int32_t>::max(),
                 "ep::Placement: experts expected in [1, 2^31), got ", experts);
    MOEKIT_CHECK(ranks >= 1 && ranks <= (1 << 20), "ep::Placement: ranks expected in [1, 2^20], got ", ranks);
  }
  std::vector<std::vector<int>> owners_;
  int ranks_ = 1;
};

/// A run of one expert's rows computed on one rank.
struct Segment {
  int rank = 0;
  int64_t rows = 0;
};

/// Where every expert's rows are computed. Expert e's rows, in global order (source rank
/// ascending, then the source's plan order), are cut into segments()[segment_offsets[e] ..
/// segment_offsets[e + 1]) in that order: the first `rows` to the first segment's rank, and so on.
struct DispatchPlan {
  std::vector<int64_t> segment_offsets;  ///< `[E + 1]`
  std::vector<Segment> segments;
  std::vector<int64_t> rank_load;  ///< `[P]` rows each rank computes
  /// Per rank: experts it computes without holding their weights (they are shipped to it),
  /// ascending. Empty for plain plans.
  std::vector<std::vector<int64_t>> guests;
  bool rebalanced = false;  ///< LLEP moved work (false: the plain plan)

  [[nodiscard]] std::span<const Segment> of(int64_t e) const {
    const auto b = static_cast<size_t>(segment_offsets[static_cast<size_t>(e)]);
    const auto n = static_cast<size_t>(segment_offsets[static_cast<size_t>(e) + 1]) - b;
    return {segments.data() + b, n};
  }
  [[nodiscard]] int64_t max_load() const {
    return rank_load.empty() ? 0 : *std::max_element(rank_load.begin(), rank_load.end());
  }
  [[nodiscard]] double mean_load() const {
    if (rank_load.empty()) return 0.0;
    return static_cast<double>(std::accumulate(rank_load.begin(), rank_load.end(), int64_t{0})) /
           static_cast<double>(rank_load.size());
  }
};

namespace detail {
inline void check_loads(std::span<const int64_t> loads, const Placement& placement, const char* who) {
  MOEKIT_CHECK(placement.experts() > 0, who, ": placement expected at least one expert (use Placement::round_robin, "
               "contiguous or table)");
  MOEKIT_CHECK(static_cast<int64_t>(loads.size()) == placement.experts(), who, ": loads expected [",
               placement.experts(), "] (one per expert), got ", loads.size());
  int64_t total = 0;
  for (size_t e = 0; e < loads.size(); ++e) {
    MOEKIT_CHECK(loads[e] >= 0 && loads[e] <= (int64_t{1} << 40), who, ": loads[", e, "] expected in [0, 2^40], got ",
                 loads[e]);
    MOEKIT_CHECK(loads[e] <= (int64_t{1} << 50) - total, who, ": total load expected <= 2^50, exceeded at loads[", e, "]");
    total += loads[e];
  }
}
}  // namespace detail

/// The plain expert-parallel plan: each expert's rows go to its owners, split into equal
/// contiguous parts when it has replicas (the first parts one row larger).
inline DispatchPlan plain_plan(std::span<const int64_t> loads, const Placement& placement) {
  detail::check_loads(loads, placement, "ep::plain_plan");
  DispatchPlan p;
  const int64_t E = placement.experts();
  p.rank_load.assign(static_cast<size_t>(placement.ranks()), 0);
  p.guests.resize(static_cast<size_t>(placement.ranks()));
  p.segment_offsets.push_back(0);
  for (int64_t e = 0; e < E; ++e) {
    const auto owners = placement.owners(e);
    const auto n = static_cast<int64_t>(owners.size());
    const int64_t L = loads[static_cast<size_t>(e)];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t rows = L / n + (i < L % n ? 1 : 0);
      if (rows == 0) continue;
      p.segments.push_back({owners[static_cast<size_t>(i)], rows});
      p.rank_load[static_cast<size_t>(owners[static_cast<size_t>(i)])] += rows;
    }
    p.segment_offsets.push_back(static_cast<int64_t>(p.segments.size()));
  }
  return p;
}

/// Knobs of the least-loaded planner (ROUTING.md section 7; arXiv 2601.17111).
struct LlepOptions {
  /// Rebalance only when max / mean rank load (of the plain plan) is at least this.
  double lambda = 1.3;
  /// Per-rank capacity `m = alpha * total / P` (rows); >= 1.
  double alpha = 1.0;
  /// Spills of fewer rows are skipped (a last remainder still goes somewhere).
  int64_t min_tokens = 1;
  /// The memory bound: how many experts' weights a rank may host beyond its own, for every
  /// rank; -1 for no bound. `max_guests_per_rank` (when not empty, [P]) overrides it per rank.
  /// For a bound in bytes, divide it by one expert's bytes (FfnBank::expert_bytes).
  int64_t max_guests = -1;
  std::vector<int64_t> max_guests_per_rank{};
};

/// Least-Loaded Expert Parallelism: when the plain plan is skewed (max / mean >= lambda),
/// visits experts by descending load (ties: lower id), keeps on the native rank what fits
/// under the capacity m, and spills the rest in contiguous row ranges to the ranks with the
/// least (assigned + pending native) load that still have room and a guest slot, skipping
/// spills of fewer than min_tokens rows; a remainder nothing takes goes to the least-loaded
/// rank that may run the expert (the native rank, when every guest slot is used). Never
/// exceeds a guest bound, never loses a row, and its max rank load is never above the plain
/// plan's (if it would be, the plain plan is returned). Replicas count as owners: running an
/// expert there ships nothing. Deterministic: the same loads give the same plan on every rank.
inline DispatchPlan llep_plan(std::span<const int64_t> loads, const Placement& placement, const LlepOptions& opt = {}) {
  detail::check_loads(loads, placement, "ep::llep_plan");
  const int P = placement.ranks();
  const int64_t E = placement.experts();
  MOEKIT_CHECK(opt.lambda >= 1.0 && opt.lambda <= 1e6, "ep::llep_plan: lambda expected in [1, 1e6], got ", opt.lambda);
  MOEKIT_CHECK(opt.alpha >= 1.0 && opt.alpha <= 1e6, "ep::llep_plan: alpha expected in [1, 1e6], got ", opt.alpha);
  MOEKIT_CHECK(opt.min_tokens >= 1, "ep::llep_plan: min_tokens expected >= 1, got ", opt.min_tokens);
  MOEKIT_CHECK(opt.max_guests >= -1, "ep::llep_plan: max_guests expected >= -1 (-1: no bound), got ", opt.max_guests);
  MOEKIT_CHECK(opt.max_guests_per_rank.empty() || static_cast<int>(opt.max_guests_per_rank.size()) == P,
               "ep::llep_plan: max_guests_per_rank expected [", P, "] or empty, got ", opt.max_guests_per_rank.size());
  for (size_t r = 0; r < opt.max_guests_per_rank.size(); ++r)
    MOEKIT_CHECK(opt.max_guests_per_rank[r] >= -1, "ep::llep_plan: max_guests_per_rank[", r,
                 "] expected >= -1, got ", opt.max_guests_per_rank[r]);

  DispatchPlan plain = plain_plan(loads, placement);
  const int64_t total = std::accumulate(loads.begin(), loads.end(), int64_t{0});
  if (total == 0 || P == 1 || static_cast<double>(plain.max_load()) < opt.lambda * plain.mean_load()) return plain;

  const auto cap = static_cast<int64_t>(std::ceil(opt.alpha * static_cast<double>(total) / P));
  const auto bound = [&](int r) {
    return opt.max_guests_per_rank.empty() ? opt.max_guests : opt.max_guests_per_rank[static_cast<size_t>(r)];
  };
  std::vector<int64_t> assigned(static_cast<size_t>(P), 0), pending(static_cast<size_t>(P), 0);
  std::vector<int64_t> guest_count(static_cast<size_t>(P), 0);
  for (int64_t e = 0; e < E; ++e) pending[static_cast<size_t>(placement.native(e))] += loads[static_cast<size_t>(e)];
  std::vector<int64_t> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return loads[static_cast<size_t>(a)] > loads[static_cast<size_t>(b)];
  });

  std::vector<std::vector<Segment>> per(static_cast<size_t>(E));
  std::vector<std::vector<int64_t>> guests(static_cast<size_t>(P));
  std::vector<int> ranks(static_cast<size_t>(P));
  for (const int64_t e : order) {
    const int64_t L = loads[static_cast<size_t>(e)];
    const int nat = placement.native(e);
    pending[static_cast<size_t>(nat)] -= L;
    if (L == 0) continue;
    auto& segs = per[static_cast<size_t>(e)];
    const auto give = [&](int r, int64_t rows) {
      segs.push_back({r, rows});
      assigned[static_cast<size_t>(r)] += rows;
      if (!placement.holds(r, e) &&
          std::find(guests[static_cast<size_t>(r)].begin(), guests[static_cast<size_t>(r)].end(), e) ==
              guests[static_cast<size_t>(r)].end()) {
        guests[static_cast<size_t>(r)].push_back(e);
        ++guest_count[static_cast<size_t>(r)];
      }
    };
    const auto may_run = [&](int r) {
      return placement.holds(r, e) || bound(r) < 0 || guest_count[static_cast<size_t>(r)] < bound(r);
    };
    int64_t left = L;
    const int64_t keep = std::min(left, std::max<int64_t>(0, cap - assigned[static_cast<size_t>(nat)]));
    if (keep > 0) {
      give(nat, keep);
      left -= keep;
    }
    // Spill in contiguous ranges to the least (assigned + pending) ranks with room.
    std::iota(ranks.begin(), ranks.end(), 0);
    std::stable_sort(ranks.begin(), ranks.end(), [&](int a, int b) {
      return assigned[static_cast<size_t>(a)] + pending[static_cast<size_t>(a)] <
             assigned[static_cast<size_t>(b)] + pending[static_cast<size_t>(b)];
    });
    for (const int r : ranks) {
      if (left == 0) break;
      if (r == nat || !may_run(r)) continue;
      const int64_t room = std::max<int64_t>(0, cap - assigned[static_cast<size_t>(r)] - pending[static_cast<size_t>(r)]);
      const int64_t n = std::min(left, room);
      if (n == 0 || (n < opt.min_tokens && n < left)) continue;
      give(r, n);
      left -= n;
    }
    if (left > 0) {  // the last remainder: the least-loaded rank allowed to run e
      int best = nat;
      for (const int r : ranks)
        if (may_run(r) && assigned[static_cast<size_t>(r)] + pending[static_cast<size_t>(r)] <
                              assigned[static_cast<size_t>(best)] + pending[static_cast<size_t>(best)])
          best = r;
      // Merge with an existing segment of that rank only when it is the last one (keeps ranges contiguous).
      if (!segs.empty() && segs.back().rank == best) {
        segs.back().rows += left;
        assigned[static_cast<size_t>(best)] += left;
      } else {
        give(best, left);
      }
      left = 0;
    }
  }
  DispatchPlan p;
  p.rank_load = assigned;
  p.segment_offsets.push_back(0);
  for (int64_t e = 0; e < E; ++e) {
    for (const Segment& s : per[static_cast<size_t>(e)]) p.segments.push_back(s);
    p.segment_offsets.push_back(static_cast<int64_t>(p.segments.size()));
  }
  for (auto& g : guests) std::sort(g.begin(), g.end());
  p.guests = std::move(guests);
  p.rebalanced = true;
  if (p.max_load() >= plain.max_load()) return plain;  // never worse than no rebalancing
  return p;
}

}  // namespace moekit::ep
#pragma GCC visibility pop
