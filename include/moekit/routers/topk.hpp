// SPDX-License-Identifier: Apache-2.0
// Token-choice top-k router with the Mixtral / Qwen-MoE / OLMoE / DeepSeek-V3 / Switch options.
// Papers: Shazeer et al. arXiv 1701.06538 (top-k gating), Fedus et al. arXiv 2101.03961
// (Switch, capacity), DeepSeek-V3 arXiv 2412.19437 (sigmoid, bias, group-limited routing).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// How router logits become scores.
enum class ScoreFunc { softmax, sigmoid };

/// How group-limited selection scores a group (from its experts' selection scores, bias
/// included): DeepSeek-V3 the sum of its two best (a one-expert group: that expert),
/// DeepSeek-V2 (`group_limited_greedy`) its best, Megatron (`moe_router_group_topk`) the sum
/// of its best k / topk_group.
enum class GroupScore { top2_sum, max, topk_sum };

/// Training-time router noise (ROUTING.md section 1); never on for inference.
enum class TrainingNoise {
  none,
  jitter,      ///< Switch: router input x * U(1 - eps, 1 + eps)
  noisy_topk,  ///< Shazeer: H = L + N(0, 1) * softplus(x W_noise^T); needs a noise weight
};

/// Parameters of the top-k router (ROUTING.md section 1). Defaults give plain softmax top-k
/// without renormalisation, dropless.
struct TopKOptions {
  int64_t num_experts = 0;  ///< E
  int64_t k = 0;            ///< experts per token
  int64_t hidden = 0;       ///< d
  ScoreFunc score_func = ScoreFunc::softmax;
  /// Select on the logits, then softmax over the k chosen (Megatron's default, gpt-oss).
  bool topk_then_softmax = false;
  /// Select on the logits (+ bias) rather than on the scores, weights still the scores of the
  /// chosen (Llama 4: top-k of the logits, weight sigmoid(logit)). Picks the same experts as
  /// selecting on the scores except where f32 scores saturate (sigmoid(17) == sigmoid(20)).
  bool select_on_logits = false;
  /// Renormalise the k chosen weights to sum to 1 (HF `norm_topk_prob`).
  bool norm_topk_prob = false;
  /// If > 0: divide the k weights by their p-norm `(sum |w|^p)^(1/p)` (DBRX
  /// `moe_normalize_expert_weights`; p = 1 is the sum without norm_topk_prob's 1e-20).
  double norm_p = 0.0;
  /// ReMix (arXiv 2603.10160): every selected expert gets weight 1 / k (times
  /// routed_scaling_factor), whatever its score; selection is unchanged.
  bool uniform_weights = false;
  /// Multiplies the final weights (DeepSeek-V3 `routed_scaling_factor`).
  float routed_scaling_factor = 1.0f;
  /// Group-limited selection: E split into n_group equal groups, the topk_group best kept.
  /// n_group <= 1 disables it.
  int64_t n_group = 0;
  int64_t topk_group = 0;
  GroupScore group_score = GroupScore::top2_sum;
  /// Capacity factor; 0 means dropless. C = max(min_capacity, ceil((T k / E) * factor)).
  double capacity_factor = 0.0;
  int64_t min_capacity = 0;
  DropPolicy drop_policy = DropPolicy::score;
  /// After dropping, rescale each token's surviving weights to sum to routed_scaling_factor.
  bool renormalize_after_drop = false;
  /// If > 0: PhiMoE's SparseMixer selection at inference (k = 2 only), with this jitter eps
  /// (`router_jitter_noise`): expert 1 is the largest logit, weighted by the softmax over the
  /// logits within a relative 2 eps of it; expert 2 the largest of the others, weighted by the
  /// softmax over the others within 2 eps of it (ROUTING.md; docs/routers.md).
  double sparsemixer_eps = 0.0;
  TrainingNoise noise = TrainingNoise::none;
  float noise_eps = 1e-2f;   ///< jitter half-width
  uint64_t noise_seed = 0;   ///< noise is a pure function of (seed, token, index)

  [[nodiscard]] bool grouped() const noexcept { return n_group > 1; }

  /// Throws moekit::error naming the first invalid parameter.
  void validate() const {
    MOEKIT_CHECK(num_experts >= 1, "topk router: num_experts (E) expected >= 1, got ", num_experts);
    MOEKIT_CHECK(k >= 1 && k <= num_experts, "topk router: k expected in [1, E = ", num_experts,
                 "], got ", k);
    MOEKIT_CHECK(hidden >= 1, "topk router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0,
                 "topk router: routed_scaling_factor expected finite and > 0, got ",
                 routed_scaling_factor);
    MOEKIT_CHECK(score_func == ScoreFunc::softmax || score_func == ScoreFunc::sigmoid,
                 "topk router: score_func expected softmax or sigmoid, got ",
                 static_cast<int>(score_func));
    MOEKIT_CHECK(std::isfinite(norm_p) && norm_p >= 0, "topk router: norm_p expected finite and >= 0 (0 = off), got ",
                 norm_p);
    MOEKIT_CHECK(norm_p == 0 || (!norm_topk_prob && !topk_then_softmax),
                 "topk router: norm_p expected 0 with norm_topk_prob or topk_then_softmax (one normalisation), got ",
                 norm_p);
    MOEKIT_CHECK(!topk_then_softmax || score_func == ScoreFunc::softmax,
                 "topk router: topk_then_softmax expected with score_func softmax, got sigmoid");
    if (grouped()) {
      MOEKIT_CHECK(num_experts % n_group == 0, "topk router: num_experts (", num_experts,
                   ") expected divisible by n_group, got n_group = ", n_group);
      MOEKIT_CHECK(topk_group >= 1 && topk_group <= n_group,
                   "topk router: topk_group expected in [1, n_group = ", n_group, "], got ",
                   topk_group);
      MOEKIT_CHECK(k <= topk_group * (num_experts / n_group),
                   "topk router: k expected <= topk_group * E / n_group = ",
                   topk_group * (num_experts / n_group), ", got ", k);
      MOEKIT_CHECK(group_score == GroupScore::top2_sum || group_score == GroupScore::max ||
                       group_score == GroupScore::topk_sum,
                   "topk router: group_score expected top2_sum, max or topk_sum, got ",
                   static_cast<int>(group_score));
      MOEKIT_CHECK(group_score != GroupScore::topk_sum || k >= topk_group,
                   "topk router: group_score topk_sum sums each group's best k / topk_group "
                   "scores: k expected >= topk_group = ",
                   topk_group, ", got ", k);
    } else {
      MOEKIT_CHECK(n_group >= 0, "topk router: n_group expected >= 0, got ", n_group);
    }
    MOEKIT_CHECK(std::isfinite(capacity_factor) && capacity_factor >= 0,
                 "topk router: capacity_factor expected finite and >= 0 (0 = dropless), got ",
                 capacity_factor);
    MOEKIT_CHECK(min_capacity >= 0, "topk router: min_capacity expected >= 0, got ", min_capacity);
    MOEKIT_CHECK(drop_policy == DropPolicy::score || drop_policy == DropPolicy::position ||
                     drop_policy == DropPolicy::position_slot_major,
                 "topk router: drop_policy expected score, position or position_slot_major, got ",
                 static_cast<int>(drop_policy));
    MOEKIT_CHECK(noise == TrainingNoise::none || noise == TrainingNoise::jitter ||
                     noise == TrainingNoise::noisy_topk,
                 "topk router: noise expected none, jitter or noisy_topk, got ",
                 static_cast<int>(noise));
    MOEKIT_CHECK(std::isfinite(sparsemixer_eps) && sparsemixer_eps >= 0,
                 "topk router: sparsemixer_eps expected finite and >= 0 (0 = off), got ", sparsemixer_eps);
    MOEKIT_CHECK(sparsemixer_eps == 0 || (k == 2 && !grouped() && !topk_then_softmax && !select_on_logits &&
                                          !norm_topk_prob && norm_p == 0),
                 "topk router: sparsemixer_eps (PhiMoE's SparseMixer) expected with k = 2 and without groups, "
                 "topk_then_softmax, select_on_logits, norm_topk_prob or norm_p; got k = ", k);
    MOEKIT_CHECK(!uniform_weights || (sparsemixer_eps == 0 && !norm_topk_prob && !topk_then_softmax && norm_p == 0),
                 "topk router: uniform_weights (ReMix, weights 1 / k) expected without sparsemixer_eps, norm_topk_prob, "
                 "topk_then_softmax or norm_p");
    MOEKIT_CHECK(std::isfinite(noise_eps) && noise_eps >= 0 && noise_eps < 1,
                 "topk router: noise_eps expected in [0, 1), got ", noise_eps);
  }

  /// Per-expert capacity for `routed_tokens` unpadded tokens, or -1 when dropless.
  /// Evaluated in double in the order of ROUTING.md section 1.
  [[nodiscard]] int64_t capacity(int64_t routed_tokens) const noexcept {
    if (capacity_factor == 0.0) return -1;
    const double c =
        std::ceil((static_cast<double>(routed_tokens * k) / static_cast<double>(num_experts)) *
                  capacity_factor);
    // A huge factor (1e300) must not reach an out-of-range cast: 2^62 slots already mean
    // "drop nothing" (an expert holds at most one slot per token).
    if (!(c < 0x1p62)) return int64_t{1} << 62;
    return std::max<int64_t>(min_capacity, static_cast<int64_t>(c));
  }
};

namespace detail {
/// splitmix64 finaliser: a counter-based hash for reproducible noise.
inline uint64_t splitmix64(uint64_t x) noexcept {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
/// Uniform in [0, 1) from (seed, a, b).
inline double uniform01(uint64_t seed, uint64_t a, uint64_t b) noexcept {
  const uint64_t h = splitmix64(seed ^ splitmix64(a * 0x100000001B3ull ^ splitmix64(b)));
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
}
}  // namespace detail

/// Token-choice top-k router: logits `L = X W^T` in fp32, scores, optional selection-only
/// bias and group limiting, top-k (ties to the lower expert id), weights, capacity.
class TopKRouter {
 public:
  /// `weight [E, d]` (HF `gate.weight`); `bias [E]` selection-only (HF
  /// `e_score_correction_bias`), empty for none; `noise_weight [E, d]` for noisy top-k.
  TopKRouter(TopKOptions options, std::vector<float> weight, std::vector<float> bias = {},
             std::vector<float> noise_weight = {})
      : opt_(options),
        weight_(std::move(weight)),
        bias_(std::move(bias)),
        noise_weight_(std::move(noise_weight)) {
    opt_.validate();
    const auto E = static_cast<size_t>(opt_.num_experts), d = static_cast<size_t>(opt_.hidden);
    detail::check_weight(weight_, "topk router", "gate.weight", E, d);
    if (!bias_.empty()) detail::check_weight(bias_, "topk router", "e_score_correction_bias", E);
    MOEKIT_CHECK(bias_.empty() || opt_.sparsemixer_eps == 0,
                 "topk router: a selection bias expected empty with sparsemixer_eps, got ", bias_.size(), " values");
    if (opt_.noise == TrainingNoise::noisy_topk) {
      MOEKIT_CHECK(noise_weight_.size() == E * d, "topk router: noisy_topk needs a noise weight [",
                   E, ", ", d, "], got ", noise_weight_.size(), " values");
      detail::check_finite(noise_weight_, "topk router", "noise_weight", d);
    } else {
      MOEKIT_CHECK(noise_weight_.empty(),
                   "topk router: noise_weight expected empty (it is read only with noise "
                   "noisy_topk), got ",
                   noise_weight_.size(), " values");
    }
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return opt_.num_experts; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] int64_t k() const noexcept { return opt_.k; }
  [[nodiscard]] const TopKOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& weight() const noexcept { return weight_; }
  [[nodiscard]] const std::vector<float>& bias() const noexcept { return bias_; }
  /// The noisy top-k gate `[E, d]` (empty unless noisy).
  [[nodiscard]] const std::vector<float>& noise_weight() const noexcept { return noise_weight_; }
  /// Replaces the selection bias (e.g. after an aux-loss-free update step).
  void set_bias(std::vector<float> bias) {
    if (!bias.empty())
      detail::check_weight(bias, "topk router", "e_score_correction_bias",
                           static_cast<size_t>(opt_.num_experts));
    bias_ = std::move(bias);
  }
  /// The router's linear-layer bias `[E]` (gpt-oss `router.bias`), added to every logit
  /// before scores, selection and weights (unlike the selection-only bias); empty for none.
  void set_logit_bias(std::vector<float> b) {
    if (!b.empty()) detail::check_weight(b, "topk router", "router.bias", static_cast<size_t>(opt_.num_experts));
    logit_bias_ = std::move(b);
  }
  [[nodiscard]] const std::vector<float>& logit_bias() const noexcept { return logit_bias_; }
  /// A steering vector `delta [E]` added to every logit after the router's own bias, so it
  /// changes selection and weights (Rewiring Experts, arXiv 2510.14853; multilingual routing
  /// steering, arXiv 2510.04694); empty for none. Kept apart from the checkpoint's
  /// `router.bias` (set_logit_bias) and from the selection-only bias (set_bias), so an engine
  /// can change or reset it between calls (routers/steering.hpp updates it online).
  void set_logit_steering(std::vector<float> delta) {
    if (!delta.empty()) detail::check_weight(delta, "topk router", "logit steering", static_cast<size_t>(opt_.num_experts));
    steering_ = std::move(delta);
  }
  [[nodiscard]] const std::vector<float>& logit_steering() const noexcept { return steering_; }
  /// Changes the training-noise seed (e.g. per step).
  void set_noise_seed(uint64_t seed) noexcept { opt_.noise_seed = seed; }

  /// Router FLOPs per routed token (logit GEMM), for throughput accounting.
  [[nodiscard]] double flops_per_token() const noexcept {
    return 2.0 * static_cast<double>(opt_.num_experts) * static_cast<double>(opt_.hidden);
  }

  /// Routes `hidden [T, d]` into `plan` (finalised). Padded tokens get no slot. Throws
  /// moekit::error if a logit is not finite. `scratch.logits` holds `[T, E]` logits after.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, E = opt_.num_experts, d = opt_.hidden, k = opt_.k;
    MOEKIT_CHECK(T == 0 || hidden != nullptr, "topk router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    const int64_t G = opt_.grouped() ? opt_.n_group : 0;
    const size_t per_thread = static_cast<size_t>(3 * E + G + d);
    scratch.logits.resize(static_cast<size_t>(T * E));
    grow_scratch(scratch, nt);

    plan.reset(T, E, [&](int64_t t) { return batch.is_padding(t) ? 0 : k; });

    // 1. Logits, one token per iteration (fixed summation order: thread-count independent).
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* L = scratch.logits.data() + t * E;
      if (batch.is_padding(t)) {
        std::fill(L, L + E, 0.0f);
        continue;
      }
      const float* x = hidden + t * d;
      if (opt_.noise == TrainingNoise::jitter) {
        float* xj = scratch.buffer.data() + per_thread * static_cast<size_t>(omp_get_thread_num()) + 3 * E + G;
        for (int64_t i = 0; i < d; ++i)
          xj[i] = x[i] * static_cast<float>(1.0 - opt_.noise_eps +
                                            2.0 * opt_.noise_eps * detail::uniform01(opt_.noise_seed, t, i));
        x = xj;
      }
      kernels::matvec_rows(x, weight_.data(), E, d, L);
      if (!logit_bias_.empty())
        for (int64_t e = 0; e < E; ++e) L[e] += logit_bias_[static_cast<size_t>(e)];
      if (!steering_.empty())
        for (int64_t e = 0; e < E; ++e) L[e] += steering_[static_cast<size_t>(e)];
      if (opt_.noise == TrainingNoise::noisy_topk) {
        for (int64_t e = 0; e < E; ++e) {
          const float z = kernels::dot(x, noise_weight_.data() + e * d, d);
          const float sp = z > 20.0f ? z : std::log1p(std::exp(z));
          // Box-Muller from two counter-based uniforms.
          const double u1 = 1.0 - detail::uniform01(opt_.noise_seed, t, 2 * e);
          const double u2 = detail::uniform01(opt_.noise_seed, t, 2 * e + 1);
          const double n = std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
          L[e] += static_cast<float>(n) * sp;
        }
      }
    }
    // One vectorised scan: weights are finite (constructor) and the layer scans hidden, so
    // this catches an overflowing product and direct route() calls on non-finite inputs.
    if (const int64_t i = kernels::first_non_finite(scratch.logits.data(), T * E); i >= 0)
      detail::fail("topk router: logit of token ", i / E, ", expert ", i % E,
                   " expected finite, got ", scratch.logits[static_cast<size_t>(i)],
                   " (NaN or Inf in hidden_states or gate.weight, or an overflow)");

    select(batch, scratch.logits.data(), plan, scratch, nt);
  }

  /// Routes from logits the caller computed (`logits [T, E]`, e.g. a pre-gating router network
  /// or an engine's fused gate GEMM): scores, selection, weights and capacity exactly as
  /// route() does after its logit step (the steering vector and biases of the logit step are
  /// not added here; the selection-only bias is). Padded tokens get no slot. Throws for a
  /// non-finite logit of an unpadded token or a wrong size. `scratch.logits` holds a copy of
  /// `logits` afterwards, as after route().
  void route_logits(const Batch& batch, std::span<const float> logits, RoutingPlan& plan, RouterScratch& scratch,
                    int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, E = opt_.num_experts;
    MOEKIT_CHECK(static_cast<int64_t>(logits.size()) == T * E, "topk router: route_logits expected logits [", T, ", ", E,
                 "], got ", logits.size(), " values");
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;
      if (const int64_t i = kernels::first_non_finite(logits.data() + t * E, E); i >= 0)
        detail::fail("topk router: logit of token ", t, ", expert ", i, " expected finite, got ",
                     logits[static_cast<size_t>(t * E + i)]);
    }
    MOEKIT_CHECK(opt_.noise == TrainingNoise::none, "topk router: route_logits expected no training noise (it acts "
                 "on the router input)");
    const int nt = detail::resolve_threads(threads);
    grow_scratch(scratch, nt);
    if (logits.data() != scratch.logits.data()) scratch.logits.assign(logits.begin(), logits.end());  // as route() leaves them
    plan.reset(T, E, [&](int64_t t) { return batch.is_padding(t) ? 0 : opt_.k; });
    select(batch, scratch.logits.data(), plan, scratch, nt);
  }

  /// Routes one token's logits `L [E]`: writes k expert ids and weights in slot order.
  /// `buf` holds 3E + n_group floats, `idx` E + n_group ints.
  void route_token(const float* L, float* buf, int32_t* idx, int32_t* ids, float* w) const noexcept {
    const int64_t E = opt_.num_experts, k = opt_.k;
    if (opt_.sparsemixer_eps > 0) {
      sparsemixer(L, ids, w);
      if (opt_.routed_scaling_factor != 1.0f)
        for (int64_t j = 0; j < k; ++j) w[j] *= opt_.routed_scaling_factor;
      return;
    }
    float* score = buf;     // weight score
    float* sel = buf + E;   // selection score
    if (opt_.topk_then_softmax) {
      for (int64_t e = 0; e < E; ++e) sel[e] = L[e] + (bias_.empty() ? 0.0f : bias_[static_cast<size_t>(e)]);
    } else {
      if (opt_.score_func == ScoreFunc::softmax) {
        softmax(L, E, score);
      } else {
        for (int64_t e = 0; e < E; ++e) score[e] = 1.0f / (1.0f + std::exp(-L[e]));
      }
      const float* base = opt_.select_on_logits ? L : score;
      for (int64_t e = 0; e < E; ++e) sel[e] = base[e] + (bias_.empty() ? 0.0f : bias_[static_cast<size_t>(e)]);
    }
    if (opt_.grouped()) mask_groups(sel, buf + 3 * E, idx + E, buf + 2 * E);
    for (int64_t e = 0; e < E; ++e) idx[e] = static_cast<int32_t>(e);
    std::partial_sort(idx, idx + k, idx + E, [sel](int32_t a, int32_t b) {
      return sel[a] > sel[b] || (sel[a] == sel[b] && a < b);
    });
    for (int64_t j = 0; j < k; ++j) ids[j] = idx[j];
    if (opt_.topk_then_softmax) {
      float* picked = buf + 2 * E;
      for (int64_t j = 0; j < k; ++j) picked[j] = L[idx[j]];
      softmax(picked, k, w);
    } else {
      for (int64_t j = 0; j < k; ++j) w[j] = score[idx[j]];
      if (opt_.norm_topk_prob) {
        float sum = 0.0f;
        for (int64_t j = 0; j < k; ++j) sum += w[j];
        const float inv = sum + 1e-20f;
        for (int64_t j = 0; j < k; ++j) w[j] /= inv;
      } else if (opt_.norm_p > 0) {  // in double, then one rounding; weights are >= 0
        double sum = 0.0;
        for (int64_t j = 0; j < k; ++j) sum += opt_.norm_p == 1.0 ? double(w[j]) : std::pow(double(w[j]), opt_.norm_p);
        const auto norm = static_cast<float>(opt_.norm_p == 1.0 ? sum : std::pow(sum, 1.0 / opt_.norm_p));
        if (norm > 0.0f)
          for (int64_t j = 0; j < k; ++j) w[j] /= norm;
      }
    }
    if (opt_.uniform_weights)
      for (int64_t j = 0; j < k; ++j) w[j] = 1.0f / static_cast<float>(k);
    if (opt_.routed_scaling_factor != 1.0f)
      for (int64_t j = 0; j < k; ++j) w[j] *= opt_.routed_scaling_factor;
  }

  /// Numerically stable softmax of `x [n]` into `y [n]` (max subtracted, fixed order).
  static void softmax(const float* x, int64_t n, float* y) noexcept {
    float m = x[0];
    for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      y[i] = std::exp(x[i] - m);
      sum += y[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < n; ++i) y[i] *= inv;
  }

 private:
  void grow_scratch(RouterScratch& scratch, int nt) const {
    const int64_t E = opt_.num_experts, G = opt_.grouped() ? opt_.n_group : 0;
    const size_t per_thread = static_cast<size_t>(3 * E + G + opt_.hidden);
    if (scratch.buffer.size() < per_thread * static_cast<size_t>(nt)) scratch.buffer.resize(per_thread * static_cast<size_t>(nt));
    if (scratch.index.size() < static_cast<size_t>((E + G) * nt)) scratch.index.resize(static_cast<size_t>((E + G) * nt));
  }

  // Steps 2 and 3 of route(): scores, selection and weights per token from `logits [T, E]`,
  // then capacity; finalises the plan (reset by the caller).
  void select(const Batch& batch, const float* logits, RoutingPlan& plan, RouterScratch& scratch, int nt) const {
    const int64_t T = batch.tokens, E = opt_.num_experts, d = opt_.hidden;
    const int64_t G = opt_.grouped() ? opt_.n_group : 0;
    const size_t per_thread = static_cast<size_t>(3 * E + G + d);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;
      const int tid = omp_get_thread_num();
      float* buf = scratch.buffer.data() + per_thread * static_cast<size_t>(tid);
      int32_t* idx = scratch.index.data() + static_cast<size_t>((E + G) * tid);
      route_token(logits + t * E, buf, idx, plan.token_experts(t).data(), plan.token_weights(t).data());
    }
    const int64_t C = opt_.capacity(batch.routed_tokens());
    if (C >= 0)
      plan.apply_capacity(C, opt_.drop_policy, opt_.renormalize_after_drop, opt_.routed_scaling_factor);
    plan.finalize();
  }

  // PhiMoE's sparsemixer at inference (HF modeling_phimoe.py, training = False), in f32: for
  // each of the two picks, the largest logit m of the candidates (ties: lower id), then the
  // softmax over the candidates e with (m - L_e) / max(|L_e|, m) <= 2 eps, read at the pick.
  // The second pick's candidates exclude the first; its threshold still divides by
  // max(|L_e|, m) of the original logits.
  void sparsemixer(const float* L, int32_t* ids, float* w) const noexcept {
    const int64_t E = opt_.num_experts;
    const auto eps2 = static_cast<float>(2.0 * opt_.sparsemixer_eps);
    int64_t first = -1;
    for (int j = 0; j < 2; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (e != first && (best < 0 || L[e] > L[best])) best = e;
      const float m = L[best];
      float sum = 0.0f;
      for (int64_t e = 0; e < E; ++e) {  // softmax over the kept candidates (max subtracted)
        if (e == first || (m - L[e]) / std::max(std::fabs(L[e]), m) > eps2) continue;
        sum += std::exp(L[e] - m);
      }
      ids[j] = static_cast<int32_t>(best);
      w[j] = 1.0f / sum;  // exp(m - m) / sum
      first = best;
    }
  }

  // Keeps the topk_group best groups and sets the others to -inf. A group scores the sum of
  // its best m selection scores, m = 2 (top2_sum; a one-expert group: that expert), 1 (max)
  // or k / topk_group (topk_sum), capped at the group size; ties to the lower group. `tmp`
  // holds E / n_group floats.
  void mask_groups(float* sel, float* gscore, int32_t* gidx, float* tmp) const noexcept {
    const int64_t G = opt_.n_group, g = opt_.num_experts / G;
    const float ninf = -std::numeric_limits<float>::infinity();
    const int64_t best = opt_.group_score == GroupScore::max        ? 1
                         : opt_.group_score == GroupScore::topk_sum ? opt_.k / opt_.topk_group
                                                                    : 2;
    const int64_t m = std::min(best, g);
    for (int64_t gi = 0; gi < G; ++gi) {
      const float* s = sel + gi * g;
      std::copy(s, s + g, tmp);  // the best m, summed in descending order
      std::partial_sort(tmp, tmp + m, tmp + g, std::greater<float>());
      float sum = 0.0f;
      for (int64_t q = 0; q < m; ++q) sum += tmp[q];
      gscore[gi] = sum;
    }
    for (int64_t gi = 0; gi < G; ++gi) gidx[gi] = static_cast<int32_t>(gi);
    std::partial_sort(gidx, gidx + opt_.topk_group, gidx + G, [gscore](int32_t a, int32_t b) {
      return gscore[a] > gscore[b] || (gscore[a] == gscore[b] && a < b);
    });
    for (int64_t j = opt_.topk_group; j < G; ++j)
      std::fill(sel + gidx[j] * g, sel + (gidx[j] + 1) * g, ninf);
  }

  TopKOptions opt_;
  std::vector<float> weight_;
  std::vector<float> bias_;
  std::vector<float> noise_weight_;
  std::vector<float> logit_bias_;
  std::vector<float> steering_;
};

static_assert(Router<TopKRouter>);

}  // namespace moekit
#pragma GCC visibility pop
