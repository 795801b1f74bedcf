// SPDX-License-Identifier: Apache-2.0
// Dynamic-k routing (ROUTING.md section 7): each token takes a variable number of experts.
// Top-p (Huang et al. "Harder Tasks Need More Experts", arXiv 2403.07652; DynMoLE arXiv
// 2504.00661), threshold routing, DynMoLE's Tsallis-entropy hybrid, and DynaMoE's layer-wise
// expert budgets (arXiv 2603.01697, dynamic_k_schedule()).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// How a token's expert count is decided (docs/routers.md, dynamic k).
enum class DynamicKMode {
  top_p,      ///< the experts by descending p until their cumulative p passes top_p
  threshold,  ///< every expert with p >= threshold
  tsallis,    ///< DynMoLE: all E experts when the Tsallis entropy of p exceeds
              ///< entropy_threshold, else top_p
};

/// Which prefix of the descending p order top-p keeps.
enum class TopPRule {
  reach,   ///< the smallest prefix whose cumulative p is >= top_p (ROUTING.md; arXiv 2403.07652)
  within,  ///< every expert whose cumulative p (itself included) is <= top_p (DynMoLE's code)
};

/// Parameters of DynamicKRouter; field name = JSON key.
struct DynamicKOptions {
  int64_t num_experts = 0;  ///< E
  int64_t hidden = 0;       ///< d
  DynamicKMode mode = DynamicKMode::top_p;
  double top_p = 0.5;                ///< in (0, 1]
  TopPRule top_p_rule = TopPRule::reach;
  double threshold = 0.1;            ///< threshold mode: keep p >= threshold, in [0, 1]
  int64_t k_min = 1;                 ///< at least this many experts per token (0 allows none)
  int64_t k_max = 0;                 ///< at most this many (0 = E); tsallis' "all" ignores it
  double entropy_index = 1.5;        ///< Tsallis q > 0 (q = 1: Shannon)
  double entropy_threshold = 0.9;    ///< tsallis mode: S_q above this routes to all experts
  bool entropy_normalize = true;     ///< S_q divided by its maximum (uniform p), as DynMoLE
  bool norm_topk_prob = false;       ///< renormalise each token's chosen p to sum to 1
  /// Capacity factor; 0 means dropless. C = max(min_capacity, ceil((S / E) * factor)) with
  /// S the slots of the call's unpadded tokens (variable k: the plan's slots, not T k).
  double capacity_factor = 0.0;
  int64_t min_capacity = 0;
  DropPolicy drop_policy = DropPolicy::score;
  bool renormalize_after_drop = false;

  /// k_max with 0 resolved to E.
  [[nodiscard]] int64_t max_k() const noexcept { return k_max == 0 ? num_experts : k_max; }
  /// The most slots a token can get: E in tsallis mode, else max_k().
  [[nodiscard]] int64_t width() const noexcept { return mode == DynamicKMode::tsallis ? num_experts : max_k(); }

  /// Throws moekit::error naming the first invalid parameter.
  void validate() const {
    MOEKIT_CHECK(num_experts >= 1 && num_experts < (int64_t{1} << 31),
                 "dynamic_k router: num_experts (E) expected in [1, 2^31), got ", num_experts);
    MOEKIT_CHECK(hidden >= 1, "dynamic_k router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(mode == DynamicKMode::top_p || mode == DynamicKMode::threshold || mode == DynamicKMode::tsallis,
                 "dynamic_k router: mode expected top_p, threshold or tsallis, got ", static_cast<int>(mode));
    MOEKIT_CHECK(top_p_rule == TopPRule::reach || top_p_rule == TopPRule::within,
                 "dynamic_k router: top_p_rule expected reach or within, got ", static_cast<int>(top_p_rule));
    MOEKIT_CHECK(std::isfinite(top_p) && top_p > 0 && top_p <= 1, "dynamic_k router: top_p expected in (0, 1], got ",
                 top_p);
    MOEKIT_CHECK(std::isfinite(threshold) && threshold >= 0 && threshold <= 1,
                 "dynamic_k router: threshold expected in [0, 1], got ", threshold);
    MOEKIT_CHECK(k_min >= 0 && k_min <= num_experts, "dynamic_k router: k_min expected in [0, E = ", num_experts,
                 "], got ", k_min);
    MOEKIT_CHECK(k_max >= 0 && k_max <= num_experts, "dynamic_k router: k_max expected in [0, E = ", num_experts,
                 "] (0 = E), got ", k_max);
    MOEKIT_CHECK(max_k() >= std::max<int64_t>(k_min, 1), "dynamic_k router: k_max expected >= max(k_min, 1) = ",
                 std::max<int64_t>(k_min, 1), ", got ", k_max);
    MOEKIT_CHECK(std::isfinite(entropy_index) && entropy_index > 0,
                 "dynamic_k router: entropy_index (Tsallis q) expected finite and > 0, got ", entropy_index);
    MOEKIT_CHECK(std::isfinite(entropy_threshold), "dynamic_k router: entropy_threshold expected finite, got ",
                 entropy_threshold);
    MOEKIT_CHECK(std::isfinite(capacity_factor) && capacity_factor >= 0,
                 "dynamic_k router: capacity_factor expected finite and >= 0 (0 = dropless), got ", capacity_factor);
    MOEKIT_CHECK(min_capacity >= 0, "dynamic_k router: min_capacity expected >= 0, got ", min_capacity);
    MOEKIT_CHECK(drop_policy == DropPolicy::score || drop_policy == DropPolicy::position ||
                     drop_policy == DropPolicy::position_slot_major,
                 "dynamic_k router: drop_policy expected score, position or position_slot_major, got ",
                 static_cast<int>(drop_policy));
  }

  /// Per-expert capacity for `slots` slots of unpadded tokens, or -1 when dropless.
  [[nodiscard]] int64_t capacity(int64_t slots) const noexcept {
    if (capacity_factor == 0.0) return -1;
    const double c = std::ceil((static_cast<double>(slots) / static_cast<double>(num_experts)) * capacity_factor);
    if (!(c < 0x1p62)) return int64_t{1} << 62;
    return std::max<int64_t>(min_capacity, static_cast<int64_t>(c));
  }
};

/// Tsallis entropy `S_q(p) = (1 - sum p^q) / (q - 1)` of `p [n]` (q = 1: Shannon, `-sum p ln p`
/// over p > 0), in double; with `normalize`, divided by its value at the uniform p (`(1 -
/// n^(1-q)) / (q - 1)`, Shannon `ln n`; 0 when n = 1).
inline double tsallis_entropy(const float* p, int64_t n, double q, bool normalize) noexcept {
  double s = 0.0;
  if (q == 1.0) {
    for (int64_t i = 0; i < n; ++i)
      if (p[i] > 0) s -= static_cast<double>(p[i]) * std::log(static_cast<double>(p[i]));
  } else {
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += std::pow(static_cast<double>(p[i]), q);
    s = (1.0 - sum) / (q - 1.0);
  }
  if (!normalize) return s;
  const double dn = static_cast<double>(n);
  const double top = q == 1.0 ? std::log(dn) : (1.0 - std::pow(dn, 1.0 - q)) / (q - 1.0);
  return top > 0 ? s / top : 0.0;
}

/// Dynamic-k router: logits `L = X W^T` (+ the steering vector), `p = softmax(L)`, the
/// experts in descending p (ties: the lower id), a per-token count n_t by the mode clipped to
/// [k_min, k_max], weights `p` (optionally renormalised), optional capacity on the slots.
class DynamicKRouter {
 public:
  /// `weight [E, d]` (`gate.weight`).
  DynamicKRouter(DynamicKOptions options, std::vector<float> weight) : opt_(options), weight_(std::move(weight)) {
    opt_.validate();
    detail::check_weight(weight_, "dynamic_k router", "gate.weight", static_cast<size_t>(opt_.num_experts),
                         static_cast<size_t>(opt_.hidden));
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return opt_.num_experts; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] const DynamicKOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& weight() const noexcept { return weight_; }
  /// Router FLOPs per routed token (logit GEMM).
  [[nodiscard]] double flops_per_token() const noexcept {
    return 2.0 * static_cast<double>(opt_.num_experts) * static_cast<double>(opt_.hidden);
  }
  /// Changes the budget of later calls (DynaMoE's per-layer k_max; tests, benchmarks).
  void set_options(const DynamicKOptions& o) {
    MOEKIT_CHECK(o.num_experts == opt_.num_experts && o.hidden == opt_.hidden,
                 "dynamic_k router: set_options expected the same num_experts and hidden (", opt_.num_experts, ", ",
                 opt_.hidden, "), got ", o.num_experts, ", ", o.hidden);
    o.validate();
    opt_ = o;
  }

  /// Routes `hidden [T, d]` into `plan` (finalised). Padded tokens get no slot. After the
  /// call `scratch.logits [T, E]` holds the logits and, in tsallis mode, `scratch.values [T]`
  /// each token's entropy (0 for padded tokens; empty in the other modes).
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, E = opt_.num_experts, d = opt_.hidden;
    MOEKIT_CHECK(T == 0 || hidden != nullptr, "dynamic_k router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    scratch.logits.resize(static_cast<size_t>(T * E));
    if (scratch.buffer.size() < static_cast<size_t>(T * E)) scratch.buffer.resize(static_cast<size_t>(T * E));
    if (scratch.index.size() < static_cast<size_t>(T * (E + 1))) scratch.index.resize(static_cast<size_t>(T * (E + 1)));
    const bool tsallis = opt_.mode == DynamicKMode::tsallis;
    scratch.values.assign(tsallis ? static_cast<size_t>(T) : 0, 0.0f);
    float* probs = scratch.buffer.data();
    int32_t* order = scratch.index.data();
    int32_t* count = scratch.index.data() + T * E;

    // 1. Logits, probabilities, order and count, one token per iteration (thread-count independent).
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* L = scratch.logits.data() + t * E;
      if (batch.is_padding(t)) {
        std::fill(L, L + E, 0.0f);
        count[t] = 0;
        continue;
      }
      kernels::matvec_rows(hidden + t * d, weight_.data(), E, d, L);
      if (!steering_.empty())
        for (int64_t e = 0; e < E; ++e) L[e] += steering_[static_cast<size_t>(e)];
    }
    if (const int64_t i = kernels::first_non_finite(scratch.logits.data(), T * E); i >= 0)
      detail::fail("dynamic_k router: logit of token ", i / E, ", expert ", i % E, " expected finite, got ",
                   scratch.logits[static_cast<size_t>(i)],
                   " (NaN or Inf in hidden_states or gate.weight, or an overflow)");
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;
      float* p = probs + t * E;
      TopKRouter::softmax(scratch.logits.data() + t * E, E, p);
      int32_t* idx = order + t * E;
      for (int64_t e = 0; e < E; ++e) idx[e] = static_cast<int32_t>(e);
      std::sort(idx, idx + E, [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
      double entropy = 0.0;
      if (tsallis) {
        entropy = tsallis_entropy(p, E, opt_.entropy_index, opt_.entropy_normalize);
        scratch.values[static_cast<size_t>(t)] = static_cast<float>(entropy);
      }
      count[t] = static_cast<int32_t>(tsallis && entropy > opt_.entropy_threshold ? E : count_of(p, idx));
    }

    // 2. The plan: the first n_t experts of each token's order, weights p.
    plan.reset(T, E, [&](int64_t t) { return count[t]; });
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = count[t];
      if (n == 0) continue;
      const float* p = probs + t * E;
      const int32_t* idx = order + t * E;
      int32_t* ids = plan.token_experts(t).data();
      float* w = plan.token_weights(t).data();
      for (int64_t j = 0; j < n; ++j) {
        ids[j] = idx[j];
        w[j] = p[idx[j]];
      }
      if (opt_.norm_topk_prob) {
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) sum += w[j];
        const float inv = sum + 1e-20f;
        for (int64_t j = 0; j < n; ++j) w[j] /= inv;
      }
    }

    // 3. Capacity on the slots of this call.
    const int64_t C = opt_.capacity(plan.num_slots());
    if (C >= 0) plan.apply_capacity(C, opt_.drop_policy, opt_.renormalize_after_drop, 1.0f);
    plan.finalize();
  }

  /// The steering vector `delta [E]` added to every logit before the softmax (it changes both
  /// selection and weights; Rewiring Experts, arXiv 2510.14853); empty for none. Settable
  /// between calls (not during one).
  void set_logit_steering(std::vector<float> delta) {
    if (!delta.empty())
      detail::check_weight(delta, "dynamic_k router", "logit steering", static_cast<size_t>(opt_.num_experts));
    steering_ = std::move(delta);
  }
  [[nodiscard]] const std::vector<float>& logit_steering() const noexcept { return steering_; }

 private:
  // Experts a token keeps by top-p or threshold, clipped to [k_min, k_max]; `p` its
  // probabilities, `idx` the experts in descending p.
  [[nodiscard]] int64_t count_of(const float* p, const int32_t* idx) const noexcept {
    const int64_t E = opt_.num_experts;
    int64_t n = 0;
    if (opt_.mode == DynamicKMode::threshold) {
      while (n < E && static_cast<double>(p[idx[n]]) >= opt_.threshold) ++n;
    } else {
      double cum = 0.0;  // in double, in the descending order
      if (opt_.top_p_rule == TopPRule::reach) {
        while (n < E && cum < opt_.top_p) cum += static_cast<double>(p[idx[n++]]);
      } else {
        while (n < E && cum + static_cast<double>(p[idx[n]]) <= opt_.top_p) cum += static_cast<double>(p[idx[n++]]);
      }
    }
    return std::clamp<int64_t>(n, opt_.k_min, opt_.max_k());
  }

  DynamicKOptions opt_;
  std::vector<float> weight_;
  std::vector<float> steering_;
};

static_assert(Router<DynamicKRouter>);

/// Layer-wise expert budgets in the manner of DynaMoE (arXiv 2603.01697), which names these
/// schedules; the formulas are moekit's (docs/routers.md: the paper's were not available).
enum class DynamicKSchedule { uniform, descending, ascending, pyramid, wave };

/// The k_max of each of `layers` layers between `k_lo` and `k_hi` (1 <= k_lo <= k_hi): with
/// u = l / (layers - 1) and r = k_hi - k_lo, layer l gets uniform k_hi; descending
/// k_hi - r u; ascending k_lo + r u; pyramid k_lo + r 2 min(l, layers - 1 - l) / (layers - 1)
/// (symmetric); wave k_lo + r (1 + cos(4 pi u)) / 2 (two periods: high, low, high, low,
/// high); each in double, rounded to nearest (halves away from zero). One layer gets k_hi.
inline std::vector<int64_t> dynamic_k_schedule(DynamicKSchedule s, int64_t layers, int64_t k_lo, int64_t k_hi) {
  MOEKIT_CHECK(layers >= 1 && layers <= 1'000'000, "dynamic_k_schedule: layers expected in [1, 1e6], got ", layers);
  MOEKIT_CHECK(k_lo >= 1 && k_lo <= k_hi, "dynamic_k_schedule: expected 1 <= k_lo <= k_hi, got k_lo = ", k_lo,
               ", k_hi = ", k_hi);
  std::vector<int64_t> k(static_cast<size_t>(layers));
  const double r = static_cast<double>(k_hi - k_lo), lo = static_cast<double>(k_lo), hi = static_cast<double>(k_hi);
  for (int64_t l = 0; l < layers; ++l) {
    if (layers == 1) {
      k[0] = k_hi;
      break;
    }
    const double u = static_cast<double>(l) / static_cast<double>(layers - 1);
    double v = hi;
    switch (s) {
      case DynamicKSchedule::uniform: v = hi; break;
      case DynamicKSchedule::descending: v = hi - r * u; break;
      case DynamicKSchedule::ascending: v = lo + r * u; break;
      case DynamicKSchedule::pyramid:
        v = lo + r * 2.0 * static_cast<double>(std::min(l, layers - 1 - l)) / static_cast<double>(layers - 1);
        break;
      case DynamicKSchedule::wave: v = lo + r * (1.0 + std::cos(4.0 * 3.141592653589793 * u)) / 2.0; break;
      default: detail::fail("dynamic_k_schedule: schedule expected uniform, descending, ascending, pyramid or wave, got ",
                            static_cast<int>(s));
    }
    k[static_cast<size_t>(l)] = std::clamp<int64_t>(std::llround(v), k_lo, k_hi);
  }
  return k;
}

}  // namespace moekit
#pragma GCC visibility pop
