// SPDX-License-Identifier: Apache-2.0
// Modality-aware expert groups (MoMa, Lin et al., arXiv 2407.21770): the experts are split
// into groups (e.g. text experts, image experts); a token's type (Batch::token_types) selects
// its group, and the group's own router (top-k, expert-choice, any Router) routes it among
// the group's experts only. Per-group statistics by modality_group_stats().
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/router.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Groups of experts, each with its own router: group g owns the experts
/// [first_expert(g), first_expert(g) + routers[g].num_experts()) in order, and the tokens
/// whose type is in `types[g]`.
template <Router R>
class ModalityGroupRouter {
 public:
  /// `routers [G]` (one per group, all with the same hidden size), `types [G]`: the token types
  /// of each group (each type in at most one group; types are >= 0).
  ModalityGroupRouter(std::vector<R> routers, std::vector<std::vector<int32_t>> types)
      : routers_(std::move(routers)) {
    MOEKIT_CHECK(!routers_.empty() && routers_.size() == types.size(), "modality router: expected one router per group and ",
                 "as many type lists, got ", routers_.size(), " routers and ", types.size(), " type lists");
    first_.push_back(0);
    for (size_t g = 0; g < routers_.size(); ++g) {
      MOEKIT_CHECK(routers_[g].hidden_size() == routers_[0].hidden_size(), "modality router: group ", g,
                   " hidden size expected ", routers_[0].hidden_size(), ", got ", routers_[g].hidden_size());
      MOEKIT_CHECK(!types[g].empty(), "modality router: group ", g, " expected at least one token type, got none");
      for (int32_t ty : types[g]) {
        MOEKIT_CHECK(ty >= 0 && ty < (1 << 20), "modality router: token type expected in [0, 2^20), got ", ty);
        if (static_cast<size_t>(ty) >= group_of_type_.size()) group_of_type_.resize(static_cast<size_t>(ty) + 1, -1);
        MOEKIT_CHECK(group_of_type_[static_cast<size_t>(ty)] < 0, "modality router: token type ", ty,
                     " expected in one group, got groups ", group_of_type_[static_cast<size_t>(ty)], " and ", g);
        group_of_type_[static_cast<size_t>(ty)] = static_cast<int32_t>(g);
      }
      first_.push_back(first_.back() + routers_[g].num_experts());
    }
    MOEKIT_CHECK(first_.back() <= std::numeric_limits<int32_t>::max(), "modality router: total experts expected < 2^31");
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return first_.back(); }
  [[nodiscard]] int64_t hidden_size() const noexcept { return routers_[0].hidden_size(); }
  [[nodiscard]] int64_t num_groups() const noexcept { return static_cast<int64_t>(routers_.size()); }
  [[nodiscard]] int64_t first_expert(int64_t g) const noexcept { return first_[static_cast<size_t>(g)]; }
  [[nodiscard]] const R& router(int64_t g) const { return routers_.at(static_cast<size_t>(g)); }
  [[nodiscard]] R& router(int64_t g) { return routers_.at(static_cast<size_t>(g)); }
  /// The group of a token type, or -1.
  [[nodiscard]] int64_t group_of_type(int32_t type) const noexcept {
    return type >= 0 && static_cast<size_t>(type) < group_of_type_.size() ? group_of_type_[static_cast<size_t>(type)] : -1;
  }
  /// The group of token t of `batch` (token type 0 when the batch has no types), or -1.
  [[nodiscard]] int64_t group_of(const Batch& batch, int64_t t) const noexcept {
    return group_of_type(batch.token_types.empty() ? 0 : batch.token_types[static_cast<size_t>(t)]);
  }

  /// Routes each group's tokens with its router (the other tokens masked as padding, so they
  /// take no capacity and enter no batch statistic of that group), then merges the plans:
  /// expert ids offset by the group's first expert, weights and dropped flags as the group's
  /// router left them. Padded tokens get no slot. A token whose type is in no group is an error.
  /// `scratch.plans[g]` / `scratch.sub[g]` hold each group's plan and scratch afterwards;
  /// `scratch.logits` is left empty (group g's logits: scratch.sub[g].logits).
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch, int threads = 0) const {
    batch.validate(hidden_size());
    const int64_t T = batch.tokens, G = num_groups();
    for (int64_t t = 0; t < T; ++t)
      MOEKIT_CHECK(batch.is_padding(t) || group_of(batch, t) >= 0, "modality router: token ", t, " has type ",
                   batch.token_types.empty() ? 0 : batch.token_types[static_cast<size_t>(t)], ", which no group takes");
    scratch.plans.resize(static_cast<size_t>(G));
    scratch.sub.resize(static_cast<size_t>(G));
    scratch.mask.resize(static_cast<size_t>(T * G));
    scratch.logits.clear();
    for (int64_t g = 0; g < G; ++g) {
      uint8_t* m = scratch.mask.data() + g * T;
      for (int64_t t = 0; t < T; ++t) m[t] = batch.is_padding(t) || group_of(batch, t) != g ? 1 : 0;
      Batch sub = batch;
      sub.padding = std::span<const uint8_t>(m, static_cast<size_t>(T));
      routers_[static_cast<size_t>(g)].route(sub, hidden, scratch.plans[static_cast<size_t>(g)],
                                             scratch.sub[static_cast<size_t>(g)], threads);
    }
    plan.reset(T, num_experts(), [&](int64_t t) -> int64_t {
      return batch.is_padding(t) ? 0 : scratch.plans[static_cast<size_t>(group_of(batch, t))].slots_of(t);
    });
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;
      const int64_t g = group_of(batch, t);
      RoutingPlan& src = scratch.plans[static_cast<size_t>(g)];
      const auto ids = src.token_experts(t);
      const auto w = src.token_weights(t);
      const auto dr = src.token_dropped(t);
      const auto off = static_cast<int32_t>(first_[static_cast<size_t>(g)]);
      auto out_ids = plan.token_experts(t);
      auto out_w = plan.token_weights(t);
      auto out_dr = plan.token_dropped(t);
      for (size_t j = 0; j < ids.size(); ++j) {
        out_ids[j] = ids[j] + off;
        out_w[j] = w[j];
        out_dr[j] = dr[j];
      }
    }
    plan.finalize();
  }

 private:
  std::vector<R> routers_;
  std::vector<int32_t> group_of_type_;  // token type -> group, -1 for none
  std::vector<int64_t> first_;
};

/// One group's share of a modality-routed call.
struct ModalityGroupStats {
  int64_t tokens = 0;             ///< unpadded tokens of the group
  int64_t kept_slots = 0;         ///< kept slots on the group's experts
  int64_t dropped_slots = 0;
  double slots_per_token = 0.0;   ///< kept slots / tokens (0 without tokens)
  double max_mean_load_ratio = 0.0;  ///< max / mean kept load over the group's experts
};

/// Per-group statistics of a plan the router made for `batch`.
template <Router R>
std::vector<ModalityGroupStats> modality_group_stats(const ModalityGroupRouter<R>& r, const RoutingPlan& plan,
                                                     const Batch& batch) {
  MOEKIT_CHECK(plan.finalized() && plan.num_tokens() == batch.tokens && plan.num_experts() == r.num_experts(),
               "modality_group_stats: expected the router's finalised plan of this batch");
  std::vector<ModalityGroupStats> s(static_cast<size_t>(r.num_groups()));
  for (int64_t t = 0; t < batch.tokens; ++t)
    if (!batch.is_padding(t) && r.group_of(batch, t) >= 0) ++s[static_cast<size_t>(r.group_of(batch, t))].tokens;
  for (int64_t g = 0; g < r.num_groups(); ++g) {
    ModalityGroupStats& st = s[static_cast<size_t>(g)];
    int64_t mx = 0;
    const int64_t lo = r.first_expert(g), n = r.router(g).num_experts();
    for (int64_t e = lo; e < lo + n; ++e) {
      st.kept_slots += plan.kept_of(e);
      st.dropped_slots += plan.dropped_of(e);
      mx = std::max(mx, plan.kept_of(e));
    }
    st.slots_per_token = st.tokens ? static_cast<double>(st.kept_slots) / static_cast<double>(st.tokens) : 0.0;
    const double mean = static_cast<double>(st.kept_slots) / static_cast<double>(n);
    st.max_mean_load_ratio = mean > 0 ? static_cast<double>(mx) / mean : 0.0;
  }
  return s;
}

}  // namespace moekit
#pragma GCC visibility pop
