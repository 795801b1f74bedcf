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

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
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

namespace detail {
// Megatron's aux-loss scores over the unpadded tokens of [b, e): adds each token's score
// distribution to P [E] and its top-k map (ties: lower expert) to C [E]; returns the count.
inline int64_t megatron_scores(std::span<const float> logits, int64_t E, int64_t k, const Batch& batch, int64_t b,
                               int64_t en, ScoreFunc score_func, std::vector<double>& P, std::vector<double>& C) {
  std::vector<double> p(static_cast<size_t>(E));
  std::vector<int32_t> order(static_cast<size_t>(E));
  int64_t n = 0;
  for (int64_t t = b; t < en; ++t) {
    if (batch.is_padding(t)) continue;
    ++n;
    score_distribution(logits.data() + t * E, E, score_func, p.data());
    for (int64_t e = 0; e < E; ++e) {
      P[static_cast<size_t>(e)] += p[static_cast<size_t>(e)];
      order[static_cast<size_t>(e)] = static_cast<int32_t>(e);
    }
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&p](int32_t x, int32_t y) {
      return p[size_t(x)] > p[size_t(y)] || (p[size_t(x)] == p[size_t(y)] && x < y);
    });
    for (int64_t j = 0; j < k; ++j) C[static_cast<size_t>(order[static_cast<size_t>(j)])] += 1.0;
  }
  return n;
}
// E / (k n^2) * sum_e P_e * C_e (switch_load_balancing_loss_func without the coefficient).
inline double megatron_switch_loss(const std::vector<double>& P, const std::vector<double>& C, double scale,
                                   int64_t k, int64_t n) {
  double sum = 0;
  for (size_t e = 0; e < P.size(); ++e) sum += P[e] * C[e] * scale;
  return sum * static_cast<double>(P.size()) / (static_cast<double>(k) * static_cast<double>(n) * static_cast<double>(n));
}
}  // namespace detail

/// Megatron-LM's load-balancing losses (moe_utils.py `switch_load_balancing_loss_func` on
/// `compute_routing_scores_for_aux_loss`), without the coefficient: scores `s = softmax(L)`
/// or `sigmoid(L) / sum sigmoid(L)`; the loss's routing map is the top k of s per token (ties:
/// lower expert), not the layer's plan (a bias, groups or drops do not enter it); then
/// `E / (k N^2) * sum_e (sum_t s_te) * count_e` over a token set of N unpadded tokens.
/// `aux_loss` (`per_sequence` false): over all unpadded tokens of the call; `seq_aux_loss`
/// (`per_sequence` true): over each sequence of `batch.sequence_offsets` alone, averaged over
/// the sequences with a token (Megatron: summed over the batch and divided by its size).
inline double megatron_aux_loss(std::span<const float> logits, int64_t E, int64_t k, const Batch& batch,
                                ScoreFunc score_func, bool per_sequence = false) {
  MOEKIT_CHECK(E >= 1 && k >= 1 && k <= E, "megatron_aux_loss: expected 1 <= k <= E, got k = ", k, ", E = ", E);
  MOEKIT_CHECK(batch.padding.empty() || static_cast<int64_t>(batch.padding.size()) == batch.tokens,
               "megatron_aux_loss: Batch.padding expected ", batch.tokens, " entries, got ", batch.padding.size());
  if (per_sequence) batch.validate(batch.hidden > 0 ? batch.hidden : 1);
  detail::check_logits(logits, batch.tokens, E, batch, "megatron_aux_loss");
  std::vector<double> P(static_cast<size_t>(E)), C(static_cast<size_t>(E));
  const int64_t S = per_sequence ? batch.num_sequences() : 1;
  double total = 0;
  int64_t counted = 0;
  for (int64_t q = 0; q < S; ++q) {
    const int64_t b = per_sequence ? batch.sequence_begin(q) : 0, en = per_sequence ? batch.sequence_end(q) : batch.tokens;
    std::fill(P.begin(), P.end(), 0.0);
    std::fill(C.begin(), C.end(), 0.0);
    const int64_t n = detail::megatron_scores(logits, E, k, batch, b, en, score_func, P, C);
    if (n == 0) continue;
    total += detail::megatron_switch_loss(P, C, 1.0, k, n);
    ++counted;
  }
  return counted == 0 ? 0.0 : total / static_cast<double>(counted);
}

/// Megatron's `global_aux_loss`: per-expert counts (the top-k map above) accumulated over the
/// calls since reset(), averaged over them, against this call's scores:
/// `E / (k N^2) * sum_e (sum_t s_te) * (global_count_e / calls)`.
class MegatronGlobalAuxLoss {
 public:
  /// Adds this call's counts, then returns the loss of this call.
  double add(std::span<const float> logits, int64_t E, int64_t k, const Batch& batch, ScoreFunc score_func) {
    MOEKIT_CHECK(E >= 1 && k >= 1 && k <= E, "megatron global aux loss: expected 1 <= k <= E, got k = ", k, ", E = ", E);
    MOEKIT_CHECK(global_.empty() || static_cast<int64_t>(global_.size()) == E,
                 "megatron global aux loss: E expected ", global_.size(), " (as in earlier calls), got ", E);
    MOEKIT_CHECK(batch.padding.empty() || static_cast<int64_t>(batch.padding.size()) == batch.tokens,
                 "megatron global aux loss: Batch.padding expected ", batch.tokens, " entries, got ", batch.padding.size());
    detail::check_logits(logits, batch.tokens, E, batch, "megatron global aux loss");
    global_.resize(static_cast<size_t>(E), 0.0);
    std::vector<double> P(static_cast<size_t>(E), 0.0);
    const int64_t n = detail::megatron_scores(logits, E, k, batch, 0, batch.tokens, score_func, P, global_);
    ++calls_;
    if (n == 0) return 0.0;
    return detail::megatron_switch_loss(P, global_, 1.0 / static_cast<double>(calls_), k, n);
  }
  /// Forgets the accumulated counts (Megatron: reset_global_aux_loss_tracker, per step).
  void reset() noexcept {
    global_.clear();
    calls_ = 0;
  }
  [[nodiscard]] int64_t calls() const noexcept { return calls_; }

 private:
  std::vector<double> global_;
  int64_t calls_ = 0;
};

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

/// Which slots an aux-loss-free bias update counts as an expert's load.
enum class BiasLoad {
  selected,  ///< every slot the router chose, kept or dropped by capacity (DeepSeek-V3)
  kept,      ///< only the kept slots (Megatron counts its routing map after token dropping)
};

/// DeepSeek-V3 aux-loss-free balancing: `b_i += u * sign(mean_j load_j - load_i)` with load
/// the slots per expert of `plan` (`load`: selected by default, as DeepSeek-V3). Returns the
/// updated bias (empty input = zeros).
inline std::vector<float> update_selection_bias(std::vector<float> bias, const RoutingPlan& plan,
                                                float u = 1e-3f, BiasLoad load = BiasLoad::selected) {
  const int64_t E = plan.num_experts();
  MOEKIT_CHECK(plan.finalized(),
               "update_selection_bias: plan expected finalized, got a plan without finalize()");
  MOEKIT_CHECK(bias.empty() || static_cast<int64_t>(bias.size()) == E,
               "update_selection_bias: bias expected [", E, "], got ", bias.size(), " values");
  detail::check_finite(bias, "update_selection_bias", "bias");
  MOEKIT_CHECK(std::isfinite(u), "update_selection_bias: u expected finite, got ", u);
  bias.resize(static_cast<size_t>(E), 0.0f);
  const bool sel = load == BiasLoad::selected;
  const double mean = static_cast<double>(sel ? plan.num_slots() : plan.num_kept()) / static_cast<double>(E);
  for (int64_t e = 0; e < E; ++e) {
    const double diff = mean - static_cast<double>(plan.kept_of(e) + (sel ? plan.dropped_of(e) : 0));
    bias[static_cast<size_t>(e)] += u * static_cast<float>((diff > 0) - (diff < 0));
  }
  return bias;
}

/// Options of the expert-router coupling (ERC) loss (arXiv 2512.23447).
struct ErcOptions {
  double alpha = 1.0;     ///< margin factor a in (0, 1]: constraints M[i, j] <= a M[i, i]
  /// Cap on each proxy's noise half-width; 0 = no cap. eps_i = min(cap, ||R_i - R_nn(i)|| / (2 ||R_i||))
  /// with R_nn(i) the nearest other router row, so a proxy never leaves its cluster.
  double epsilon = 0.0;
  uint64_t seed = 0;      ///< the noise is a pure function of (seed, expert, component)
};

/// The ERC loss and what it measured.
struct ErcResult {
  double loss = 0.0;                 ///< mean over i != j of relu(M[i, j] - a M[i, i]) + relu(M[j, i] - a M[i, i])
  std::vector<double> activation;    ///< M `[E, E]`: M[i, j] = ||W_g^j proxy_i|| (expert j's gate pre-activation norm)
  std::vector<double> epsilon;       ///< `[E]` each proxy's noise half-width
  int64_t proxy_violations = 0;      ///< pairs i != j with M[i, j] > a M[i, i] (proxy i excites expert j more)
  int64_t expert_violations = 0;     ///< pairs i != j with M[j, i] > a M[i, i] (expert i prefers proxy j)
  /// The smallest a at which the loss is 0: max over i != j of max(M[i, j], M[j, i]) / M[i, i]
  /// (lower = more specialised experts; the paper tracks specialisation with such a margin).
  double alpha_zero = 0.0;
};

/// Proxy tokens `[E, d]` of the ERC loss: `proxy_i = R_i * delta_i`, `delta_{i,c} ~ U(1 - eps_i,
/// 1 + eps_i)` (eps_i as in ErcOptions), from `router_weight [E, d]`. Fills `eps [E]`.
inline std::vector<float> erc_proxies(std::span<const float> router_weight, int64_t E, int64_t d, const ErcOptions& o,
                                      std::vector<double>* eps = nullptr) {
  MOEKIT_CHECK(E >= 1 && E <= 4096 && d >= 1 && d < (int64_t{1} << 31), "erc_loss: E expected in [1, 4096] and d in ",
               "[1, 2^31), got E = ", E, ", d = ", d);
  MOEKIT_CHECK(static_cast<double>(router_weight.size()) == static_cast<double>(E) * static_cast<double>(d),
               "erc_loss: router weight expected [", E, ", ", d, "], got ", router_weight.size(), " values");
  detail::check_finite(router_weight, "erc_loss", "router weight", static_cast<size_t>(d));
  MOEKIT_CHECK(std::isfinite(o.epsilon) && o.epsilon >= 0 && o.epsilon < 1,
               "erc_loss: epsilon expected in [0, 1) (0 = no cap), got ", o.epsilon);
  std::vector<double> e(static_cast<size_t>(E), 0.0);
  std::vector<float> proxy(router_weight.begin(), router_weight.end());
  for (int64_t i = 0; i < E; ++i) {
    const float* ri = router_weight.data() + i * d;
    double norm = 0.0, nearest = INFINITY;
    for (int64_t c = 0; c < d; ++c) norm += static_cast<double>(ri[c]) * ri[c];
    for (int64_t j = 0; j < E; ++j) {
      if (j == i) continue;
      double dist = 0.0;
      for (int64_t c = 0; c < d; ++c) {
        const double v = static_cast<double>(ri[c]) - router_weight[static_cast<size_t>(j * d + c)];
        dist += v * v;
      }
      nearest = std::min(nearest, std::sqrt(dist));
    }
    double ei = norm > 0 && std::isfinite(nearest) ? nearest / (2.0 * std::sqrt(norm)) : 0.0;
    if (o.epsilon > 0) ei = std::min(ei, o.epsilon);
    ei = std::min(ei, 1.0);
    e[static_cast<size_t>(i)] = ei;
    for (int64_t c = 0; c < d; ++c)
      proxy[static_cast<size_t>(i * d + c)] = static_cast<float>(
          static_cast<double>(ri[c]) *
          (1.0 - ei + 2.0 * ei * detail::uniform01(o.seed, static_cast<uint64_t>(i), static_cast<uint64_t>(c))));
  }
  if (eps != nullptr) *eps = std::move(e);
  return proxy;
}

/// The ERC loss of a layer's router `R = router_weight [E, d]` and its experts' gate
/// projections `gate_weight [E, f, d]` (HF `experts.{j}.gate_proj.weight` stacked; for plain
/// FFNs the first projection), in double: proxies by erc_proxies(), M[i, j] = ||W_g^j proxy_i||,
/// the loss and its statistics (ErcResult). Independent of the tokens: E^2 f d multiply-adds.
inline ErcResult erc_loss(std::span<const float> router_weight, std::span<const float> gate_weight, int64_t E, int64_t d,
                          int64_t f, const ErcOptions& o = {}) {
  MOEKIT_CHECK(std::isfinite(o.alpha) && o.alpha > 0 && o.alpha <= 1, "erc_loss: alpha expected in (0, 1], got ",
               o.alpha);
  MOEKIT_CHECK(E >= 1 && E <= 4096 && f >= 1 && f < (int64_t{1} << 31) && d >= 1 && d < (int64_t{1} << 31),
               "erc_loss: E expected in [1, 4096], f and d in [1, 2^31), got E = ", E, ", f = ", f, ", d = ", d);
  MOEKIT_CHECK(static_cast<double>(gate_weight.size()) == double(E) * double(f) * double(d),
               "erc_loss: gate weights expected [", E, ", ", f, ", ", d, "], got ", gate_weight.size(), " values");
  detail::check_finite(gate_weight, "erc_loss", "gate weight", static_cast<size_t>(d));
  ErcResult r;
  const std::vector<float> proxy = erc_proxies(router_weight, E, d, o, &r.epsilon);
  r.activation.assign(static_cast<size_t>(E * E), 0.0);
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < E; ++j) {
      double sq = 0.0;
      for (int64_t h = 0; h < f; ++h) {
        const float* w = gate_weight.data() + (j * f + h) * d;
        double z = 0.0;
        for (int64_t c = 0; c < d; ++c) z += static_cast<double>(w[c]) * proxy[static_cast<size_t>(i * d + c)];
        sq += z * z;
      }
      r.activation[static_cast<size_t>(i * E + j)] = std::sqrt(sq);
    }
  auto M = [&](int64_t i, int64_t j) { return r.activation[static_cast<size_t>(i * E + j)]; };
  double sum = 0.0;
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < E; ++j) {
      if (i == j) continue;
      const double own = o.alpha * M(i, i);
      sum += std::max(0.0, M(i, j) - own) + std::max(0.0, M(j, i) - own);
      r.proxy_violations += M(i, j) > own;
      r.expert_violations += M(j, i) > own;
      const double m = std::max(M(i, j), M(j, i));
      r.alpha_zero = std::max(r.alpha_zero, M(i, i) > 0 ? m / M(i, i) : (m > 0 ? INFINITY : 0.0));
    }
  r.loss = E > 1 ? sum / static_cast<double>(E * (E - 1)) : 0.0;
  return r;
}

/// The ERC coupling measured on real tokens (erc_coupling): the loss's quantities with each
/// expert's routed tokens in place of its proxy.
struct ErcCoupling {
  /// `[E, E]`: A[i, j] = mean over the kept slots routed to expert i (unpadded tokens) of
  /// ||W_g^j x_t||; row i is 0 when expert i kept no token.
  std::vector<double> activation;
  std::vector<int64_t> tokens;       ///< `[E]` kept slots of unpadded tokens per expert
  int64_t slots = 0;                 ///< all such slots
  /// Kept slots whose own expert answers the token most (||W_g^e x_t|| >= every other expert's),
  /// over `slots` (0 when there are none): how often routing agrees with the experts.
  double coupled_fraction = 0.0;
  /// The ERC loss on A over the ordered pairs i != j of experts that both kept tokens:
  /// mean of relu(A[i, j] - a A[i, i]) + relu(A[j, i] - a A[i, i]) (0 under two such experts).
  double loss = 0.0;
  int64_t token_violations = 0;      ///< such pairs with A[i, j] > a A[i, i] (i's tokens excite j more)
  int64_t expert_violations = 0;     ///< such pairs with A[j, i] > a A[i, i] (expert i answers j's tokens more)
  double alpha_zero = 0.0;           ///< smallest a with zero loss on these pairs (as ErcResult::alpha_zero)
};

/// The ERC statistics of a routed batch: which expert each kept slot of `plan` sent its token
/// to, against the gate pre-activation norms ||W_g^j x_t|| of every expert j (`x [T, d]`,
/// `gate_weight [E, f, d]` as for erc_loss). In double; T E f d multiply-adds (an analysis
/// call, not for the hot path). Padding tokens are skipped and may hold anything.
inline ErcCoupling erc_coupling(const RoutingPlan& plan, const Batch& batch, std::span<const float> x,
                                std::span<const float> gate_weight, int64_t E, int64_t d, int64_t f,
                                double alpha = 1.0) {
  detail::check_plan_batch(plan, batch, "erc_coupling");
  MOEKIT_CHECK(std::isfinite(alpha) && alpha > 0 && alpha <= 1, "erc_coupling: alpha expected in (0, 1], got ", alpha);
  MOEKIT_CHECK(E >= 1 && E <= 4096 && f >= 1 && f < (int64_t{1} << 31) && d >= 1 && d < (int64_t{1} << 31),
               "erc_coupling: E expected in [1, 4096], f and d in [1, 2^31), got E = ", E, ", f = ", f, ", d = ", d);
  MOEKIT_CHECK(plan.num_experts() == E, "erc_coupling: plan expected ", E, " experts, got ", plan.num_experts());
  MOEKIT_CHECK(batch.hidden == d, "erc_coupling: batch.hidden expected ", d, ", got ", batch.hidden);
  const int64_t T = plan.num_tokens();
  MOEKIT_CHECK(static_cast<double>(x.size()) == static_cast<double>(T) * static_cast<double>(d),
               "erc_coupling: x expected [", T, ", ", d, "], got ", x.size(), " values");
  MOEKIT_CHECK(static_cast<double>(gate_weight.size()) == double(E) * double(f) * double(d),
               "erc_coupling: gate weights expected [", E, ", ", f, ", ", d, "], got ", gate_weight.size(), " values");
  detail::check_finite(gate_weight, "erc_coupling", "gate weight", static_cast<size_t>(d));
  ErcCoupling r;
  r.activation.assign(static_cast<size_t>(E * E), 0.0);
  r.tokens.assign(static_cast<size_t>(E), 0);
  std::vector<double> a(static_cast<size_t>(E));
  int64_t coupled = 0;
  const auto slot_expert = plan.slot_expert();
  const auto dropped = plan.slot_dropped();
  const auto offsets = plan.slot_offsets();
  for (int64_t t = 0; t < T; ++t) {
    if (batch.is_padding(t)) continue;
    bool any = false;
    for (int32_t s = offsets[static_cast<size_t>(t)]; s < offsets[static_cast<size_t>(t) + 1]; ++s) any = any || !dropped[static_cast<size_t>(s)];
    if (!any) continue;
    const float* xt = x.data() + t * d;
    if (const int64_t c = kernels::first_non_finite(xt, d); c >= 0)
      detail::fail("erc_coupling: x[", t, ", ", c, "] expected finite, got ", xt[c]);
    double best = -1.0;
    for (int64_t j = 0; j < E; ++j) {
      double sq = 0.0;
      for (int64_t h = 0; h < f; ++h) {
        const float* w = gate_weight.data() + (j * f + h) * d;
        double z = 0.0;
        for (int64_t c = 0; c < d; ++c) z += static_cast<double>(w[c]) * xt[c];
        sq += z * z;
      }
      a[static_cast<size_t>(j)] = std::sqrt(sq);
      best = std::max(best, a[static_cast<size_t>(j)]);
    }
    for (int32_t s = offsets[static_cast<size_t>(t)]; s < offsets[static_cast<size_t>(t) + 1]; ++s) {
      if (dropped[static_cast<size_t>(s)]) continue;
      const int64_t e = slot_expert[static_cast<size_t>(s)];
      ++r.tokens[static_cast<size_t>(e)];
      ++r.slots;
      coupled += a[static_cast<size_t>(e)] >= best;
      for (int64_t j = 0; j < E; ++j) r.activation[static_cast<size_t>(e * E + j)] += a[static_cast<size_t>(j)];
    }
  }
  for (int64_t i = 0; i < E; ++i)
    if (const int64_t n = r.tokens[static_cast<size_t>(i)]; n > 0)
      for (int64_t j = 0; j < E; ++j) r.activation[static_cast<size_t>(i * E + j)] /= static_cast<double>(n);
  r.coupled_fraction = r.slots > 0 ? static_cast<double>(coupled) / static_cast<double>(r.slots) : 0.0;
  auto A = [&](int64_t i, int64_t j) { return r.activation[static_cast<size_t>(i * E + j)]; };
  double sum = 0.0;
  int64_t pairs = 0;
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < E; ++j) {
      if (i == j || r.tokens[static_cast<size_t>(i)] == 0 || r.tokens[static_cast<size_t>(j)] == 0) continue;
      const double own = alpha * A(i, i);
      sum += std::max(0.0, A(i, j) - own) + std::max(0.0, A(j, i) - own);
      ++pairs;
      r.token_violations += A(i, j) > own;
      r.expert_violations += A(j, i) > own;
      const double m = std::max(A(i, j), A(j, i));
      r.alpha_zero = std::max(r.alpha_zero, A(i, i) > 0 ? m / A(i, i) : (m > 0 ? INFINITY : 0.0));
    }
  r.loss = pairs > 0 ? sum / static_cast<double>(pairs) : 0.0;
  return r;
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
#pragma GCC visibility pop
