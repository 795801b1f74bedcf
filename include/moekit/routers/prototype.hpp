// SPDX-License-Identifier: Apache-2.0
// Prototype routers (ROUTING.md section 6): ProMoE's two-step router (conditional step, then
// cosine similarity to learnable prototypes; Wei et al., arXiv 2510.24711) with its routing
// contrastive loss, and nearest-centroid top-1 routing with a k-means update step (MixER's
// k-means gating, Nzoyem et al. 2025, "Towards Foundational Models for Dynamical System
// Reconstruction: Hierarchical Meta-Learning via Mixture of Experts").
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

namespace detail {

/// Floor of vector norms in cosine similarities (torch.nn.functional.normalize's eps).
inline constexpr float kPrototypeNormFloor = 1e-12f;

/// `||x||^2` of a row in fp32 (kernels::dot order). If it overflows while every element is
/// finite, `x` is copied into `scaled` divided by max |x_i| and the squared norm of that copy
/// is returned with `*row` pointing at it. Returns NaN if an element is NaN or Inf.
inline float squared_norm_or_rescale(const float*& row, int64_t d, float* scaled) noexcept {
  const float xx = kernels::dot(row, row, d);
  if (std::isfinite(xx)) return xx;
  float m = 0.0f;
  for (int64_t i = 0; i < d; ++i) {
    if (!std::isfinite(row[i])) return std::numeric_limits<float>::quiet_NaN();
    m = std::max(m, std::fabs(row[i]));
  }
  for (int64_t i = 0; i < d; ++i) scaled[i] = row[i] / m;
  row = scaled;
  return kernels::dot(scaled, scaled, d);
}

/// Index of the first non-finite element of `x [d]`, or -1.
inline int64_t first_non_finite(const float* x, int64_t d) noexcept {
  return kernels::first_non_finite(x, d);
}

/// Throws naming the first non-finite element of token `t`'s hidden state.
[[noreturn]] inline void fail_non_finite_token(const char* who, const float* hidden, int64_t t,
                                               int64_t d) {
  const int64_t i = first_non_finite(hidden + t * d, d);
  if (i >= 0)
    detail::fail(who, ": hidden_states[", t, ", ", i, "] expected finite, got ", hidden[t * d + i]);
  detail::fail(who, ": hidden_states of token ", t,
               " expected a squared norm and distances representable in float, got an overflow");
}

/// Records the lowest failing token across threads.
inline void note_bad_token(int64_t& bad, int64_t t) noexcept {
#pragma omp critical(moekit_prototype_bad_token)
  bad = std::min(bad, t);
}

}  // namespace detail

// ====================================================================================== ProMoE

/// Parameters of the ProMoE router (ROUTING.md section 6; arXiv 2510.24711). Field names are
/// the JSON keys of `{"router": {"type": "prototype", ...}}`.
struct ProMoEOptions {
  /// E, the routed (prototype) experts; the plan has E + 1 (index E: the unconditional one).
  int64_t num_experts = 0;
  int64_t k = 0;       ///< routed experts per conditional token, 1 <= k <= E
  int64_t hidden = 0;  ///< d
  float tau_r = 1.0f;  ///< softmax temperature of the cosine scores
  /// Batch::token_types value marking an unconditional token (the classifier-free-guidance
  /// null label). Any other value is conditional; an empty token_types means all conditional.
  int32_t uncond_token_type = 1;

  /// Throws moekit::error naming the first invalid parameter.
  void validate() const {
    MOEKIT_CHECK(num_experts >= 1 && num_experts < std::numeric_limits<int32_t>::max(),
                 "promoe router: num_experts (E) expected in [1, 2^31 - 1), got ", num_experts);
    MOEKIT_CHECK(k >= 1 && k <= num_experts, "promoe router: k expected in [1, E = ", num_experts,
                 "], got ", k);
    MOEKIT_CHECK(hidden >= 1, "promoe router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(std::isfinite(tau_r) && tau_r >= std::numeric_limits<float>::min(),
                 "promoe router: tau_r expected finite and >= ", std::numeric_limits<float>::min(),
                 " (a normal positive float), got ", tau_r);
  }
};

/// ProMoE two-step router. Conditional step: an unpadded token whose type is
/// `uncond_token_type` gets one slot `(E, 1.0)`, the unconditional expert. Prototypical step
/// for the other unpadded tokens:
///
///     s_e = cos(x, mu_e)       both vectors divided by max(norm, 1e-12)
///     w   = softmax(s / tau_r) over the E prototypes
///     slots: the k largest s (ties: lower id) with weights w, not renormalised
///
/// The plan has E + 1 experts: pair it with a bank of E + 1 experts (`experts.{i}` for i < E,
/// `uncond_expert` at index E) and the layer's ungated SharedExpert (`shared_expert`).
/// All math fp32; per token a fixed summation order, so plans do not depend on the thread count.
class ProMoERouter {
 public:
  /// `prototypes [E, d]` (tensor `router.prototypes`), finite.
  ProMoERouter(ProMoEOptions options, std::vector<float> prototypes) : opt_(options) {
    opt_.validate();
    set_prototypes(std::move(prototypes));
  }

  /// E + 1: the routed experts and the unconditional expert (the plan's expert count).
  [[nodiscard]] int64_t num_experts() const noexcept { return opt_.num_experts + 1; }
  /// E, the prototype experts.
  [[nodiscard]] int64_t num_routed_experts() const noexcept { return opt_.num_experts; }
  /// Index of the unconditional expert in the plan and the bank: E.
  [[nodiscard]] int64_t uncond_expert() const noexcept { return opt_.num_experts; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] int64_t k() const noexcept { return opt_.k; }
  [[nodiscard]] const ProMoEOptions& options() const noexcept { return opt_; }
  /// The prototypes as given `[E, d]`.
  [[nodiscard]] const std::vector<float>& prototypes() const noexcept { return prototypes_; }

  /// Replaces the prototypes `[E, d]` (e.g. after a training step); must be finite.
  void set_prototypes(std::vector<float> prototypes) {
    const auto E = static_cast<size_t>(opt_.num_experts), d = static_cast<size_t>(opt_.hidden);
    detail::check_weight(prototypes, "promoe router", "router.prototypes", E, d);
    // Unit prototypes mu_e / max(||mu_e||, 1e-12); the norm in double (once per set).
    unit_.resize(prototypes.size());
    for (size_t e = 0; e < E; ++e) {
      double n2 = 0;
      for (size_t i = 0; i < d; ++i)
        n2 += static_cast<double>(prototypes[e * d + i]) * prototypes[e * d + i];
      const double inv =
          1.0 / std::max(std::sqrt(n2), static_cast<double>(detail::kPrototypeNormFloor));
      for (size_t i = 0; i < d; ++i)
        unit_[e * d + i] = static_cast<float>(prototypes[e * d + i] * inv);
    }
    prototypes_ = std::move(prototypes);
  }

  /// Router FLOPs per conditional token: E + 1 dot products of length d (norm included).
  [[nodiscard]] double flops_per_token() const noexcept {
    return 2.0 * static_cast<double>(opt_.num_experts + 1) * static_cast<double>(opt_.hidden);
  }

  /// True if unpadded token t of `batch` is unconditional.
  [[nodiscard]] bool is_unconditional(const Batch& batch, int64_t t) const noexcept {
    return !batch.token_types.empty() &&
           batch.token_types[static_cast<size_t>(t)] == opt_.uncond_token_type;
  }

  /// Routes `hidden [T, d]` into `plan` (E + 1 experts, finalised): padded tokens no slot,
  /// unconditional tokens `(E, 1)`, conditional tokens k slots. `scratch.logits` holds the
  /// `[T, E]` softmax inputs `s / tau_r` after the call (rows of padded and unconditional
  /// tokens 0). Throws moekit::error if an unpadded token's hidden state has a NaN or Inf.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, E = opt_.num_experts, d = opt_.hidden, k = opt_.k;
    MOEKIT_CHECK(T == 0 || hidden != nullptr,
                 "promoe router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    const size_t per_thread = static_cast<size_t>(E + d);
    scratch.logits.resize(static_cast<size_t>(T * E));
    if (scratch.buffer.size() < per_thread * static_cast<size_t>(nt))
      scratch.buffer.resize(per_thread * static_cast<size_t>(nt));
    if (scratch.index.size() < static_cast<size_t>(E * nt))
      scratch.index.resize(static_cast<size_t>(E * nt));

    plan.reset(T, E + 1, [&](int64_t t) -> int64_t {
      if (batch.is_padding(t)) return 0;
      return is_unconditional(batch, t) ? 1 : k;
    });

    int64_t bad = T;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* z = scratch.logits.data() + t * E;
      if (batch.is_padding(t)) {
        std::fill(z, z + E, 0.0f);
        continue;
      }
      if (is_unconditional(batch, t)) {
        // Conditional step: the unconditional expert, weight 1. The hidden state is still a
        // router input: NaN / Inf is an error here too.
        std::fill(z, z + E, 0.0f);
        if (detail::first_non_finite(hidden + t * d, d) >= 0) detail::note_bad_token(bad, t);
        plan.token_experts(t)[0] = static_cast<int32_t>(E);
        plan.token_weights(t)[0] = 1.0f;
        continue;
      }
      const int tid = omp_get_thread_num();
      float* buf = scratch.buffer.data() + per_thread * static_cast<size_t>(tid);
      int32_t* idx = scratch.index.data() + static_cast<size_t>(E * tid);
      if (!route_token(hidden + t * d, buf, idx, z, plan.token_experts(t).data(),
                       plan.token_weights(t).data()))
        detail::note_bad_token(bad, t);
    }
    if (bad < T) detail::fail_non_finite_token("promoe router", hidden, bad, d);
    plan.finalize();
  }

  /// Routes one conditional token `x [d]`: writes the softmax inputs `z [E]` and k expert ids
  /// and weights in slot order. `buf` holds E + d floats, `idx` E ints. Returns false if x has
  /// a NaN or Inf (nothing useful written then).
  bool route_token(const float* x, float* buf, int32_t* idx, float* z, int32_t* ids,
                   float* w) const noexcept {
    const int64_t E = opt_.num_experts, d = opt_.hidden, k = opt_.k;
    float* s = buf;  // cosine similarities, the selection score
    const float xx = detail::squared_norm_or_rescale(x, d, buf + E);
    if (!std::isfinite(xx)) return false;
    const float inv = 1.0f / std::max(std::sqrt(xx), detail::kPrototypeNormFloor);
    kernels::matvec_rows(x, unit_.data(), E, d, s);
    for (int64_t e = 0; e < E; ++e) s[e] *= inv;
    // Weight score: softmax(s / tau_r), max subtracted, fixed order.
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) {
      z[e] = s[e] / opt_.tau_r;
      m = std::max(m, z[e]);
    }
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += std::exp(z[e] - m);
    for (int64_t e = 0; e < E; ++e) idx[e] = static_cast<int32_t>(e);
    std::partial_sort(idx, idx + k, idx + E,
                      [s](int32_t a, int32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
    for (int64_t j = 0; j < k; ++j) {
      ids[j] = idx[j];
      w[j] = std::exp(z[idx[j]] - m) / sum;
    }
    return true;
  }

 private:
  ProMoEOptions opt_;
  std::vector<float> prototypes_;  // [E, d] as given
  std::vector<float> unit_;        // [E, d] mu_e / max(||mu_e||, 1e-12)
};

static_assert(Router<ProMoERouter>);

/// ProMoE's routing contrastive loss (forward value, double precision). Each unpadded token
/// whose first slot in `plan` is a routed expert e < E (its top-1) adds its hidden state to
/// expert e. For the experts V with at least one token, `m_e` = mean of their tokens and
///
///     L_RCL = mean_{e in V} -log softmax_{e' in V}( cos(mu_e, m_e') / temperature )[e]
///
/// with cosines on vectors divided by max(norm, 1e-12); 0 when |V| < 2. `plan` must be the
/// router's plan for `hidden [T, d]` and `batch` (e.g. Workspace::plan after forward()).
inline double routing_contrastive_loss(const ProMoERouter& router, const Batch& batch,
                                       const float* hidden, const RoutingPlan& plan,
                                       double temperature = 0.1) {
  batch.validate(router.hidden_size());
  const int64_t T = batch.tokens, E = router.num_routed_experts(), d = router.hidden_size();
  MOEKIT_CHECK(std::isfinite(temperature) && temperature > 0,
               "routing_contrastive_loss: temperature expected finite and > 0, got ", temperature);
  MOEKIT_CHECK(plan.num_tokens() == T, "routing_contrastive_loss: plan tokens expected ", T,
               " (the batch), got ", plan.num_tokens());
  MOEKIT_CHECK(plan.num_experts() == E + 1, "routing_contrastive_loss: plan experts expected ",
               E + 1, " (the router's E + 1), got ", plan.num_experts());
  MOEKIT_CHECK(T == 0 || hidden != nullptr,
               "routing_contrastive_loss: hidden states pointer is null for T = ", T);
  const auto D = static_cast<size_t>(d);
  std::vector<double> sum(static_cast<size_t>(E) * D, 0.0);
  std::vector<int64_t> count(static_cast<size_t>(E), 0);
  for (int64_t t = 0; t < T; ++t) {
    if (batch.is_padding(t) || plan.slots_of(t) == 0) continue;
    const int32_t e =
        plan.slot_expert()[static_cast<size_t>(plan.slot_offsets()[static_cast<size_t>(t)])];
    if (e >= E) continue;  // unconditional
    const float* x = hidden + t * d;
    MOEKIT_CHECK(detail::first_non_finite(x, d) < 0, "routing_contrastive_loss: hidden_states[", t,
                 ", ", detail::first_non_finite(x, d), "] expected finite, got ",
                 x[detail::first_non_finite(x, d)]);
    double* m = sum.data() + static_cast<size_t>(e) * D;
    for (size_t i = 0; i < D; ++i) m[i] += x[i];
    ++count[static_cast<size_t>(e)];
  }
  std::vector<int64_t> V;
  for (int64_t e = 0; e < E; ++e)
    if (count[static_cast<size_t>(e)] > 0) V.push_back(e);
  if (V.size() < 2) return 0.0;
  // Unit prototypes and unit means of V (the mean's 1/count cancels unless the floor applies).
  const size_t n = V.size();
  std::vector<double> mu(n * D), mean(n * D);
  auto unit = [&](const auto* v, double scale, double* out) {
    double n2 = 0;
    for (size_t i = 0; i < D; ++i)
      n2 += (static_cast<double>(v[i]) * scale) * (static_cast<double>(v[i]) * scale);
    const double inv =
        1.0 / std::max(std::sqrt(n2), static_cast<double>(detail::kPrototypeNormFloor));
    for (size_t i = 0; i < D; ++i) out[i] = static_cast<double>(v[i]) * scale * inv;
  };
  for (size_t a = 0; a < n; ++a) {
    const auto e = static_cast<size_t>(V[a]);
    unit(router.prototypes().data() + e * D, 1.0, mu.data() + a * D);
    unit(sum.data() + e * D, 1.0 / static_cast<double>(count[e]), mean.data() + a * D);
  }
  double loss = 0;
  std::vector<double> logit(n);
  for (size_t a = 0; a < n; ++a) {
    double mx = -std::numeric_limits<double>::infinity();
    for (size_t b = 0; b < n; ++b) {
      double c = 0;
      for (size_t i = 0; i < D; ++i) c += mu[a * D + i] * mean[b * D + i];
      logit[b] = c / temperature;
      mx = std::max(mx, logit[b]);
    }
    double z = 0;
    for (size_t b = 0; b < n; ++b) z += std::exp(logit[b] - mx);
    loss += -(logit[a] - mx - std::log(z));
  }
  return loss / static_cast<double>(n);
}

// ============================================================================ nearest centroid

/// Parameters of the nearest-centroid router (ROUTING.md section 6). JSON keys of
/// `{"router": {"type": "centroid", ...}}`.
struct CentroidOptions {
  int64_t num_experts = 0;  ///< E, one centroid per expert
  int64_t hidden = 0;       ///< d

  void validate() const {
    MOEKIT_CHECK(num_experts >= 1 && num_experts < std::numeric_limits<int32_t>::max(),
                 "nearest_centroid router: num_experts (E) expected in [1, 2^31 - 1), got ",
                 num_experts);
    MOEKIT_CHECK(hidden >= 1, "nearest_centroid router: hidden size (d) expected >= 1, got ",
                 hidden);
  }
};

/// Nearest-centroid top-1 router (MixER's k-means gating): each unpadded token gets one slot
/// `(argmin_e ||x - c_e||^2, 1.0)`, ties to the lower id. Selection in fp32 as
/// `argmax_e x . c_e - ||c_e||^2 / 2` (the same order; `||c_e||^2` in double once per set).
class CentroidRouter {
 public:
  /// `centroids [E, d]` (tensor `router.centroids`), finite.
  CentroidRouter(CentroidOptions options, std::vector<float> centroids) : opt_(options) {
    opt_.validate();
    set_centroids(std::move(centroids));
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return opt_.num_experts; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] const CentroidOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& centroids() const noexcept { return centroids_; }

  /// Replaces the centroids `[E, d]` (e.g. with kmeans_step's result); must be finite.
  void set_centroids(std::vector<float> centroids) {
    const auto E = static_cast<size_t>(opt_.num_experts), d = static_cast<size_t>(opt_.hidden);
    detail::check_weight(centroids, "nearest_centroid router", "router.centroids", E, d);
    half_norm_.resize(E);
    for (size_t e = 0; e < E; ++e) {
      double n2 = 0;
      for (size_t i = 0; i < d; ++i)
        n2 += static_cast<double>(centroids[e * d + i]) * centroids[e * d + i];
      half_norm_[e] = static_cast<float>(0.5 * n2);
      MOEKIT_CHECK(std::isfinite(half_norm_[e]), "nearest_centroid router: router.centroids row ",
                   e, " expected a squared norm representable in float, got ", n2);
    }
    centroids_ = std::move(centroids);
  }

  /// Router FLOPs per routed token: E + 1 dot products of length d.
  [[nodiscard]] double flops_per_token() const noexcept {
    return 2.0 * static_cast<double>(opt_.num_experts + 1) * static_cast<double>(opt_.hidden);
  }

  /// Routes `hidden [T, d]` into `plan` (finalised; one slot of weight 1 per unpadded token).
  /// `scratch.logits` holds `[T, E]` negative squared distances `-||x - c_e||^2` after the
  /// call, computed in fp32 as `2 (x . c_e - ||c_e||^2 / 2) - ||x||^2` (padded rows 0).
  /// Throws moekit::error on NaN or Inf in a routed token, or if its squared norm or a
  /// distance overflows float.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, E = opt_.num_experts, d = opt_.hidden;
    MOEKIT_CHECK(T == 0 || hidden != nullptr,
                 "nearest_centroid router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    scratch.logits.resize(static_cast<size_t>(T * E));
    plan.reset(T, E, [&](int64_t t) -> int64_t { return batch.is_padding(t) ? 0 : 1; });
    int64_t bad = T;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* L = scratch.logits.data() + t * E;
      if (batch.is_padding(t)) {
        std::fill(L, L + E, 0.0f);
        continue;
      }
      const int32_t e = route_token(hidden + t * d, L);
      if (e < 0) {
        detail::note_bad_token(bad, t);
        continue;
      }
      plan.token_experts(t)[0] = e;
      plan.token_weights(t)[0] = 1.0f;
    }
    if (bad < T) detail::fail_non_finite_token("nearest_centroid router", hidden, bad, d);
    plan.finalize();
  }

  /// Nearest centroid of one token `x [d]`; writes `L [E]` = -squared distances. Returns -1
  /// for a NaN / Inf input or an overflowing norm or distance.
  int32_t route_token(const float* x, float* L) const noexcept {
    const int64_t E = opt_.num_experts, d = opt_.hidden;
    const float xx = kernels::dot(x, x, d);
    if (!std::isfinite(xx)) return -1;
    kernels::matvec_rows(x, centroids_.data(), E, d, L);
    int32_t best = 0;
    for (int64_t e = 0; e < E; ++e) {
      L[e] -= half_norm_[static_cast<size_t>(e)];  // selection score x . c - ||c||^2 / 2
      if (!std::isfinite(L[e])) return -1;
      if (L[e] > L[best]) best = static_cast<int32_t>(e);
    }
    for (int64_t e = 0; e < E; ++e) {
      L[e] = 2.0f * L[e] - xx;
      if (!std::isfinite(L[e])) return -1;
    }
    return best;
  }

 private:
  CentroidOptions opt_;
  std::vector<float> centroids_;  // [E, d]
  std::vector<float> half_norm_;  // [E] ||c_e||^2 / 2
};

static_assert(Router<CentroidRouter>);

/// Result of one k-means (Lloyd) step over a batch.
struct KMeansStep {
  std::vector<float> centroids;  ///< `[E, d]` new centroids
  std::vector<int64_t> counts;   ///< `[E]` unpadded tokens assigned to each centroid
  /// Sum over unpadded tokens of `||x_t - c_{a_t}||^2` with the centroids *before* the step
  /// (the k-means objective of this step's assignment), in double.
  double inertia = 0.0;
};

/// One k-means step: assigns every unpadded token of `hidden [T, d]` to its nearest centroid
/// exactly as `router.route` does, then sets each centroid to the mean of its tokens (sums in
/// double, token order). A centroid without tokens keeps its value. Does not modify the
/// router: install the result with `router.set_centroids(step.centroids)`.
inline KMeansStep kmeans_step(const CentroidRouter& router, const Batch& batch, const float* hidden,
                              int threads = 0) {
  RoutingPlan plan;
  RouterScratch scratch;
  router.route(batch, hidden, plan, scratch, threads);
  const int64_t T = batch.tokens, E = router.num_experts(), d = router.hidden_size();
  const int nt = detail::resolve_threads(threads);
  const std::vector<float>& c = router.centroids();
  std::vector<int32_t> assign(static_cast<size_t>(T), -1);
  std::vector<double> dist(static_cast<size_t>(T), 0.0);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
  for (int64_t t = 0; t < T; ++t) {
    if (plan.slots_of(t) == 0) continue;
    const int32_t e =
        plan.slot_expert()[static_cast<size_t>(plan.slot_offsets()[static_cast<size_t>(t)])];
    assign[static_cast<size_t>(t)] = e;
    double s = 0;
    for (int64_t i = 0; i < d; ++i) {
      const double diff =
          static_cast<double>(hidden[t * d + i]) - c[static_cast<size_t>(e * d + i)];
      s += diff * diff;
    }
    dist[static_cast<size_t>(t)] = s;
  }
  KMeansStep out;
  out.counts.assign(static_cast<size_t>(E), 0);
  for (int64_t t = 0; t < T; ++t) {
    if (assign[static_cast<size_t>(t)] < 0) continue;
    ++out.counts[static_cast<size_t>(assign[static_cast<size_t>(t)])];
    out.inertia += dist[static_cast<size_t>(t)];
  }
  // Means: each thread owns a column block and visits tokens in order (thread-count independent).
  std::vector<double> sum(static_cast<size_t>(E * d), 0.0);
  constexpr int64_t kCols = 64;
  const int64_t blocks = (d + kCols - 1) / kCols;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kCols, i1 = std::min(d, i0 + kCols);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t e = assign[static_cast<size_t>(t)];
      if (e < 0) continue;
      for (int64_t i = i0; i < i1; ++i) sum[static_cast<size_t>(e * d + i)] += hidden[t * d + i];
    }
  }
  out.centroids = c;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = out.counts[static_cast<size_t>(e)];
    if (n == 0) continue;
    for (int64_t i = 0; i < d; ++i)
      out.centroids[static_cast<size_t>(e * d + i)] =
          static_cast<float>(sum[static_cast<size_t>(e * d + i)] / static_cast<double>(n));
  }
  return out;
}

}  // namespace moekit
#pragma GCC visibility pop
