// SPDX-License-Identifier: Apache-2.0
// Auxiliary routing quantities (forward values engines log and trainers use): load-balancing
// loss, router z-loss, the aux-loss-free bias update, and routing statistics
// (ROUTING.md section 1). Fedus et al. arXiv 2101.03961; Zoph et al. (ST-MoE) arXiv 2202.08906;
// DeepSeek-V3 arXiv 2412.19437.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"

namespace moekit {

namespace detail {
// Full score distribution p [E] of one token from its logits: softmax, or sigmoid scores
// normalised to sum to 1 (ROUTING.md: p = s / sum(s) for sigmoid routers). Both are
// computed as a max-subtracted softmax (of L, or of log sigmoid(L)), so logits of any finite
// size give a distribution summing to 1: with every sigmoid underflowing to 0 (L ~ -1e4),
// s / sum(s) tends to softmax(L), which is what the log-domain form returns.
inline void score_distribution(const float* L, int64_t E, ScoreFunc f, double* p) noexcept {
  for (int64_t e = 0; e < E; ++e) {
    const double x = static_cast<double>(L[e]);
    // log sigmoid(x) = -softplus(-x) = -(max(-x, 0) + log1p(exp(-|x|))).
    p[e] = f == ScoreFunc::softmax ? x : -(std::max(-x, 0.0) + std::log1p(std::exp(-std::fabs(x))));
  }
  double m = p[0];
  for (int64_t e = 1; e < E; ++e) m = std::max(m, p[e]);
  double s = 0;
  for (int64_t e = 0; e < E; ++e) s += (p[e] = std::exp(p[e] - m));
  for (int64_t e = 0; e < E; ++e) p[e] /= s;
}
// The shape checks shared by the functions reading a plan, its logits and its batch.
inline void check_plan_batch(const RoutingPlan& plan, const Batch& batch, const char* who) {
  MOEKIT_CHECK(plan.finalized(), who, ": plan expected finalized, got a plan without finalize()");
  MOEKIT_CHECK(batch.tokens == plan.num_tokens(), who, ": batch.tokens expected ",
               plan.num_tokens(), " (the plan's tokens), got ", batch.tokens);
  MOEKIT_CHECK(batch.padding.empty() || static_cast<int64_t>(batch.padding.size()) == batch.tokens,
               who, ": Batch.padding expected ", batch.tokens, " entries, got ",
               batch.padding.size());
}
// `logits [T, E]`, finite in every unpadded row.
inline void check_logits(std::span<const float> logits, int64_t T, int64_t E, const Batch& batch,
                         const char* who) {
  MOEKIT_CHECK(static_cast<int64_t>(logits.size()) == T * E, who, ": logits expected [T, E] = [", T,
               ", ", E, "] = ", T * E, " values, got ", logits.size());
  for (int64_t t = 0; t < T; ++t) {
    if (batch.is_padding(t)) continue;
    if (const int64_t e = kernels::first_non_finite(logits.data() + t * E, E); e >= 0)
      fail(who, ": logits[", t, ", ", e, "] expected finite, got ",
           logits[static_cast<size_t>(t * E + e)]);
  }
}
}  // namespace detail

/// Switch / Megatron load-balancing loss `E * sum_i f_i * P_i` over unpadded tokens, with
/// `f_i` = selected slots of expert i (kept or dropped) / (k T) and `P_i` the mean score
/// distribution. `hf_mixtral_scale` multiplies by k (HF Mixtral's reported value).
/// `logits [T, E]` are the router logits of the call that built `plan` (Workspace::router.logits).
inline double load_balancing_loss(const RoutingPlan& plan, std::span<const float> logits, const Batch& batch,
                                  ScoreFunc score_func, bool hf_mixtral_scale = false) {
  detail::check_plan_batch(plan, batch, "load_balancing_loss");
  const int64_t T = plan.num_tokens(), E = plan.num_experts();
  detail::check_logits(logits, T, E, batch, "load_balancing_loss");
  std::vector<double> f(static_cast<size_t>(E), 0.0), P(static_cast<size_t>(E), 0.0), p(static_cast<size_t>(E));
  int64_t routed = 0, slots = 0, k = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (batch.is_padding(t) || plan.slots_of(t) == 0) continue;
    ++routed;
    k = std::max(k, plan.slots_of(t));
    detail::score_distribution(logits.data() + t * E, E, score_func, p.data());
    for (int64_t e = 0; e < E; ++e) P[static_cast<size_t>(e)] += p[static_cast<size_t>(e)];
    const int32_t b = plan.slot_offsets()[static_cast<size_t>(t)], en = plan.slot_offsets()[static_cast<size_t>(t) + 1];
    for (int32_t s = b; s < en; ++s) f[static_cast<size_t>(plan.slot_expert()[static_cast<size_t>(s)])] += 1.0;
    slots += en - b;
  }
  if (routed == 0) return 0.0;
  double loss = 0;
  for (int64_t e = 0; e < E; ++e)
    loss += (f[static_cast<size_t>(e)] / static_cast<double>(slots)) * (P[static_cast<size_t>(e)] / static_cast<double>(routed));
  loss *= static_cast<double>(E);
  return hf_mixtral_scale ? loss * static_cast<double>(k) : loss;
}

/// ST-MoE router z-loss `mean_t (logsumexp_j L_tj)^2` over unpadded tokens.
inline double router_z_loss(std::span<const float> logits, int64_t E, const Batch& batch) {
  MOEKIT_CHECK(E >= 1, "router_z_loss: E expected >= 1, got ", E);
  MOEKIT_CHECK(batch.tokens >= 0, "router_z_loss: batch.tokens expected >= 0, got ", batch.tokens);
  MOEKIT_CHECK(batch.padding.empty() || static_cast<int64_t>(batch.padding.size()) == batch.tokens,
               "router_z_loss: Batch.padding expected ", batch.tokens, " entries, got ",
               batch.padding.size());
  detail::check_logits(logits, batch.tokens, E, batch, "router_z_loss");
  double sum = 0;
  int64_t n = 0;
  for (int64_t t = 0; t < batch.tokens; ++t) {
    if (batch.is_padding(t)) continue;
    const float* L = logits.data() + t * E;
    double m = L[0];
    for (int64_t e = 1; e < E; ++e) m = std::max(m, static_cast<double>(L[e]));
    double s = 0;
    for (int64_t e = 0; e < E; ++e) s += std::exp(static_cast<double>(L[e]) - m);
    const double lse = m + std::log(s);
    sum += lse * lse;
    ++n;
  }
  return n == 0 ? 0.0 : sum / static_cast<double>(n);
}

/// DeepSeek-V3 aux-loss-free balancing: `b_i += u * sign(mean_j load_j - load_i)` with load
/// the kept slots per expert of `plan`. Returns the updated bias (empty input = zeros).
inline std::vector<float> update_selection_bias(std::vector<float> bias, const RoutingPlan& plan,
                                                float u = 1e-3f) {
  const int64_t E = plan.num_experts();
  MOEKIT_CHECK(plan.finalized(),
               "update_selection_bias: plan expected finalized, got a plan without finalize()");
  MOEKIT_CHECK(bias.empty() || static_cast<int64_t>(bias.size()) == E,
               "update_selection_bias: bias expected [", E, "], got ", bias.size(), " values");
  detail::check_finite(bias, "update_selection_bias", "bias");
  MOEKIT_CHECK(std::isfinite(u), "update_selection_bias: u expected finite, got ", u);
  bias.resize(static_cast<size_t>(E), 0.0f);
  const double mean = static_cast<double>(plan.num_kept()) / static_cast<double>(E);
  for (int64_t e = 0; e < E; ++e) {
    const double diff = mean - static_cast<double>(plan.kept_of(e));
    bias[static_cast<size_t>(e)] += u * static_cast<float>((diff > 0) - (diff < 0));
  }
  return bias;
}

/// Per-call routing statistics.
struct RoutingStats {
  std::vector<int64_t> load;          ///< kept slots per expert
  double max_mean_load_ratio = 0;     ///< max load / mean load (1 = perfectly balanced)
  double drop_rate = 0;               ///< dropped slots / all slots
  double entropy = 0;                 ///< mean over unpadded tokens of -sum p log p (nats)
  double mean_selected_weight = 0;    ///< mean combine weight of kept slots
};

/// Statistics of `plan`; `logits [T, E]` (may be empty: entropy is then 0).
inline RoutingStats routing_stats(const RoutingPlan& plan, std::span<const float> logits, const Batch& batch,
                                  ScoreFunc score_func = ScoreFunc::softmax) {
  detail::check_plan_batch(plan, batch, "routing_stats");
  RoutingStats s;
  const int64_t T = plan.num_tokens(), E = plan.num_experts();
  s.load.resize(static_cast<size_t>(E));
  int64_t mx = 0;
  for (int64_t e = 0; e < E; ++e) mx = std::max(mx, s.load[static_cast<size_t>(e)] = plan.kept_of(e));
  const double mean = static_cast<double>(plan.num_kept()) / static_cast<double>(E);
  s.max_mean_load_ratio = mean > 0 ? static_cast<double>(mx) / mean : 0.0;
  s.drop_rate = plan.num_slots() ? static_cast<double>(plan.num_dropped()) / static_cast<double>(plan.num_slots()) : 0.0;
  double wsum = 0;
  for (int32_t slot : plan.expert_slots()) wsum += plan.slot_weight()[static_cast<size_t>(slot)];
  s.mean_selected_weight = plan.num_kept() ? wsum / static_cast<double>(plan.num_kept()) : 0.0;
  if (!logits.empty()) {
    detail::check_logits(logits, T, E, batch, "routing_stats");
    std::vector<double> p(static_cast<size_t>(E));
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;
      detail::score_distribution(logits.data() + t * E, E, score_func, p.data());
      for (double v : p)
        if (v > 0) s.entropy -= v * std::log(v);
      ++n;
    }
    if (n) s.entropy /= static_cast<double>(n);
  }
  return s;
}

}  // namespace moekit
