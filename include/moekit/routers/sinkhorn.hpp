// SPDX-License-Identifier: Apache-2.0
// Sinkhorn routing: balanced token-to-expert assignment by log-domain entropic optimal
// transport (ROUTING.md section 2), and the selective wrapper that applies it rarely (SSR).
// Papers: Clark et al. arXiv 2202.01169 (S-BASE, Sinkhorn routing; Megatron-LM's
// "sinkhorn" router), Nguyen et al. arXiv 2511.08972 (Selective Sinkhorn Routing).
//
// Sinkhorn mixes information across the tokens of a batch: a token's experts depend on
// every other unpadded token of the call. It is meant for training-time or whole-batch
// (non-causal) use; for causal decoding use the plain top-k (which the selective wrapper
// does whenever `training` is false).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <utility>
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

/// What the transport cost is built from.
enum class SinkhornCost {
  logits,  ///< C = L (Megatron, S-BASE)
  probs,   ///< C = softmax(L) per token (SSR)
};

/// How the combine weights of the selected experts are computed.
enum class SinkhornWeightMode {
  /// `act(L)` at the selected experts: sigmoid for k = 1, full softmax for k > 1, not
  /// renormalised; the plan only selects (Megatron, S-BASE). Defaults: cost logits, xi = 1.
  selection_only,
  /// `Pi_{t,i} / sum_{j in I_t} Pi_{t,j}` (SSR). Defaults: cost probs, xi = 0.05.
  transport,
};

/// Parameters of the Sinkhorn router (ROUTING.md section 2). Field names are the JSON keys.
/// When the Sinkhorn iterations run. `always`: at every route (moekit's default, the SSR
/// wrapper, users who want balanced inference routing). `megatron`: as Megatron-LM's router
/// (`sinkhorn_load_balancing`) does at inference, where Sinkhorn runs only in training: the
/// top k of sigmoid(L) (k = 1) or softmax(L) (k > 1), weighted by those scores.
enum class SinkhornMode { always, megatron };

struct SinkhornOptions {
  SinkhornMode mode = SinkhornMode::always;
  int64_t num_experts = 0;  ///< E
  int64_t k = 0;            ///< experts per token
  int64_t hidden = 0;       ///< d
  int64_t max_iters = 100;  ///< iteration cap (>= 1)
  /// Stop once `max_e |column_sum_e - T/E| / (T/E)` (after the u update) is below it; 0 runs
  /// exactly max_iters iterations.
  double tolerance = 1e-4;
  SinkhornWeightMode weight_mode = SinkhornWeightMode::selection_only;
  /// Unset: the weight mode's default (logits for selection_only, probs for transport).
  std::optional<SinkhornCost> cost{};
  /// Entropic temperature xi (`log K = C / xi`). Unset: 1 for selection_only, 0.05 for transport.
  std::optional<float> temperature{};

  [[nodiscard]] SinkhornCost effective_cost() const noexcept {
    if (cost) return *cost;
    return weight_mode == SinkhornWeightMode::transport ? SinkhornCost::probs
                                                        : SinkhornCost::logits;
  }
  [[nodiscard]] float effective_temperature() const noexcept {
    if (temperature) return *temperature;
    return weight_mode == SinkhornWeightMode::transport ? 0.05f : 1.0f;
  }

  /// Throws moekit::error naming the first invalid parameter.
  void validate() const {
    MOEKIT_CHECK(num_experts >= 1, "sinkhorn router: num_experts (E) expected >= 1, got ",
                 num_experts);
    MOEKIT_CHECK(k >= 1 && k <= num_experts, "sinkhorn router: k expected in [1, E = ", num_experts,
                 "], got ", k);
    MOEKIT_CHECK(hidden >= 1, "sinkhorn router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(mode == SinkhornMode::always || mode == SinkhornMode::megatron,
                 "sinkhorn router: mode expected always or megatron, got ", static_cast<int>(mode));
    MOEKIT_CHECK(max_iters >= 1, "sinkhorn router: max_iters expected >= 1, got ", max_iters);
    MOEKIT_CHECK(std::isfinite(tolerance) && tolerance >= 0,
                 "sinkhorn router: tolerance expected finite and >= 0, got ", tolerance);
    MOEKIT_CHECK(weight_mode == SinkhornWeightMode::selection_only ||
                     weight_mode == SinkhornWeightMode::transport,
                 "sinkhorn router: weight_mode expected selection_only or transport, got ",
                 static_cast<int>(weight_mode));
    MOEKIT_CHECK(!cost || *cost == SinkhornCost::logits || *cost == SinkhornCost::probs,
                 "sinkhorn router: cost expected logits or probs, got ",
                 static_cast<int>(cost.value_or(SinkhornCost::logits)));
    const float xi = effective_temperature();
    MOEKIT_CHECK(std::isfinite(xi) && xi > 0,
                 "sinkhorn router: temperature (xi) expected finite and > 0, got ", xi);
  }
};

namespace detail::sinkhorn {

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

/// A relaxed atomic byte that copies by value (routers are copied into layers).
struct CopyableFlag {
  std::atomic<uint8_t> v{0};
  CopyableFlag() = default;
  CopyableFlag(const CopyableFlag& o) noexcept : v(o.v.load(std::memory_order_relaxed)) {}
  CopyableFlag& operator=(const CopyableFlag& o) noexcept {
    v.store(o.v.load(std::memory_order_relaxed), std::memory_order_relaxed);
    return *this;
  }
};

}  // namespace detail::sinkhorn

/// Sinkhorn router: logits `L = X W^T` (fp32, fixed order), cost `C` (logits or softmax),
/// `log K = C / xi`, log-domain Sinkhorn over the unpadded tokens of the batch (rows sum to 1,
/// columns to T/E), then per token the top-k of the plan `Pi_t` (ties: larger logit, then
/// lower expert id) with selection-only or transport weights. Dropless.
///
/// After route(): `scratch.logits` holds the `[T, E]` logits (padded rows 0),
/// `scratch.values` the `[T, E]` log transport plan `log Pi` (padded rows -inf; see
/// log_plan()), `scratch.iterations` the iterations run and `scratch.error` the marginal
/// error after the last one (both 0 when no token is unpadded).
class SinkhornRouter {
 public:
  /// Smallest `T * E` (E rounded up to the SIMD width) whose iterations run multi-threaded.
  static constexpr int64_t kParallelWork = 32768;

  /// `weight [E, d]` (HF `gate.weight`).
  SinkhornRouter(SinkhornOptions options, std::vector<float> weight)
      : opt_(options), weight_(std::move(weight)) {
    opt_.validate();
    detail::check_weight(weight_, "sinkhorn router", "gate.weight",
                         static_cast<size_t>(opt_.num_experts), static_cast<size_t>(opt_.hidden));
    if (opt_.mode == SinkhornMode::megatron) inference_.emplace(megatron_inference(opt_), weight_);
  }

  /// The top-k options Megatron routes a Sinkhorn-trained layer with at inference.
  [[nodiscard]] static TopKOptions megatron_inference(const SinkhornOptions& o) {
    TopKOptions t;
    t.num_experts = o.num_experts;
    t.k = o.k;
    t.hidden = o.hidden;
    t.score_func = o.k == 1 ? ScoreFunc::sigmoid : ScoreFunc::softmax;
    return t;
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return opt_.num_experts; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] int64_t k() const noexcept { return opt_.k; }
  [[nodiscard]] const SinkhornOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& weight() const noexcept { return weight_; }

  /// Router FLOPs per routed token of the logit GEMM (the Sinkhorn iterations add about
  /// 2 E exponentials per token and iteration, not counted).
  [[nodiscard]] double flops_per_token() const noexcept {
    return 2.0 * static_cast<double>(opt_.num_experts) * static_cast<double>(opt_.hidden);
  }

  /// The `[T, E]` log transport plan of the last route() with this scratch (padded rows -inf);
  /// empty in SinkhornMode::megatron.
  [[nodiscard]] static std::span<const float> log_plan(const RouterScratch& scratch) noexcept {
    return scratch.values;
  }

  /// Routes `hidden [T, d]` into `plan` (finalised). Padded tokens get no slot and are not
  /// part of the transport problem. Throws moekit::error if a logit (or `C / xi`) is not finite.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    using detail::sinkhorn::kNegInf;
    using kernels::kRowLanes;
    if (inference_) {  // SinkhornMode::megatron: no iterations at inference
      inference_->route(batch, hidden, plan, scratch, threads);
      scratch.values.clear();  // no transport plan: log_plan() is empty
      scratch.iterations = 0;
      scratch.error = 0.0;
      return;
    }
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, E = opt_.num_experts, d = opt_.hidden, k = opt_.k;
    MOEKIT_CHECK(T == 0 || hidden != nullptr,
                 "sinkhorn router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    const int64_t Ep = (E + kRowLanes - 1) / kRowLanes * kRowLanes;  // padded row stride of K

    // Unpadded tokens, in token order: the rows of the transport problem.
    int64_t Tr = 0;
    scratch.index.resize(static_cast<size_t>(T + E * nt));
    int32_t* rows = scratch.index.data();
    for (int64_t t = 0; t < T; ++t)
      if (!batch.is_padding(t)) rows[Tr++] = static_cast<int32_t>(t);

    // Buffer: K [Tr, Ep] | log u [Tr] | log v [Ep] | column errors [Ep] | per thread [E].
    const size_t n_K = static_cast<size_t>(Tr * Ep);
    scratch.buffer.resize(n_K + static_cast<size_t>(Tr + 2 * Ep + E * nt));
    float* K = scratch.buffer.data();
    float* log_u = K + n_K;
    float* log_v = log_u + Tr;
    float* col_err = log_v + Ep;
    float* per_thread = col_err + Ep;
    scratch.logits.resize(static_cast<size_t>(T * E));
    scratch.values.resize(static_cast<size_t>(T * E));
    scratch.iterations = 0;
    scratch.error = 0.0;

    plan.reset(T, E, [&](int64_t t) { return batch.is_padding(t) ? 0 : k; });

    // 1. Logits, one token per iteration (fixed summation order).
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* L = scratch.logits.data() + t * E;
      if (batch.is_padding(t)) {
        std::fill(L, L + E, 0.0f);
        std::fill(scratch.values.data() + t * E, scratch.values.data() + (t + 1) * E, kNegInf);
        continue;
      }
      kernels::matvec_rows(hidden + t * d, weight_.data(), E, d, L);
    }
    if (const int64_t i = kernels::first_non_finite(scratch.logits.data(), T * E); i >= 0)
      detail::fail("sinkhorn router: logit of token ", i / E, ", expert ", i % E,
                   " expected finite, got ", scratch.logits[static_cast<size_t>(i)],
                   " (NaN or Inf in hidden_states or gate.weight, or an overflow)");
    if (Tr == 0) {
      plan.finalize();
      return;
    }

    // 2. log K = C / xi over the unpadded rows; padding columns -inf.
    const float xi = opt_.effective_temperature();
    const bool probs = opt_.effective_cost() == SinkhornCost::probs;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && Tr > 1)
    for (int64_t r = 0; r < Tr; ++r) {
      const float* L = scratch.logits.data() + static_cast<int64_t>(rows[r]) * E;
      float* Kr = K + r * Ep;
      if (probs) {
        TopKRouter::softmax(L, E, Kr);
        for (int64_t e = 0; e < E; ++e) Kr[e] /= xi;
      } else {
        for (int64_t e = 0; e < E; ++e) Kr[e] = L[e] / xi;
      }
      std::fill(Kr + E, Kr + Ep, kNegInf);
    }
    for (int64_t r = 0; r < Tr; ++r)
      if (const int64_t e = kernels::first_non_finite(K + r * Ep, E); e >= 0)
        detail::fail("sinkhorn router: cost / temperature of token ", rows[r], ", expert ", e,
                     " expected finite, got ", K[r * Ep + e], " (temperature ", xi,
                     " too small for these logits)");

    // 3. Sinkhorn iterations (one parallel region; every reduction in a fixed order).
    std::fill(log_v, log_v + Ep, 0.0f);
    const double target_d = std::log(static_cast<double>(Tr) / static_cast<double>(E));  // log(T/E)
    const auto target = static_cast<float>(target_d);
    const int64_t blocks = Ep / kRowLanes;
    int64_t iterations = 0;
    float error = 0.0f;
    // Threads only where an iteration (~2 Tr Ep exponentials, ~45 us at Tr Ep = 32768 on one
    // AVX2 core) dwarfs its two barriers; results are the same either way.
#pragma omp parallel num_threads(nt) if (nt > 1 && Tr * Ep >= kParallelWork)
    {
      // Two barriers per iteration (after each update); every thread then reduces the column
      // errors itself, in the same order, so all agree on when to stop.
      int64_t it = 0;
      float err = 0.0f;
      while (it < opt_.max_iters) {
        // u update: log u_t = -logsumexp_e(log K + log v), rows in parallel.
#pragma omp for schedule(static)
        for (int64_t r = 0; r < Tr; ++r) {
          log_u[r] = -kernels::logsumexp_sum(K + r * Ep, log_v, Ep);
        }
        // v update and error: S_e = logsumexp_t(log K + log u), column blocks in parallel.
        // Column sum after the u update: exp(log v_e + S_e); error |that / (T/E) - 1|.
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
          float S[kRowLanes];
          kernels::logsumexp_columns(K + b * kRowLanes, Ep, log_u, Tr, S);
          for (int64_t c = 0; c < kRowLanes; ++c) {
            const int64_t e = b * kRowLanes + c;
            if (e >= E) break;
            const double r = static_cast<double>(log_v[e]) + static_cast<double>(S[c]) - target_d;
            col_err[e] = static_cast<float>(std::fabs(std::expm1(r)));
            log_v[e] = target - S[c];
          }
        }
        ++it;
        err = 0.0f;
        for (int64_t e = 0; e < E; ++e) err = std::max(err, col_err[e]);
        if (!(static_cast<double>(err) >= opt_.tolerance)) break;
      }
#pragma omp master
      {
        iterations = it;
        error = err;
      }
    }
    scratch.iterations = iterations;
    scratch.error = error;

    // 4. log Pi, top-k over it (ties: larger logit, then lower id) and weights per token.
    const float uniform = static_cast<float>(std::log(1.0 / static_cast<double>(E)));
    const bool transport = opt_.weight_mode == SinkhornWeightMode::transport;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && Tr > 1)
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t t = rows[r];
      const float* L = scratch.logits.data() + t * E;
      float* lp = scratch.values.data() + t * E;
      if (Tr == 1) {
        std::fill(lp, lp + E, uniform);  // one token: the unique plan is uniform
      } else {
        for (int64_t e = 0; e < E; ++e) lp[e] = (log_u[r] + K[r * Ep + e]) + log_v[e];
      }
      const int tid = omp_get_thread_num();
      int32_t* idx = rows + T + static_cast<int64_t>(tid) * E;
      float* tmp = per_thread + static_cast<int64_t>(tid) * E;
      for (int64_t e = 0; e < E; ++e) idx[e] = static_cast<int32_t>(e);
      std::partial_sort(idx, idx + k, idx + E, [lp, L](int32_t a, int32_t b) {
        if (lp[a] != lp[b]) return lp[a] > lp[b];
        if (L[a] != L[b]) return L[a] > L[b];
        return a < b;
      });
      int32_t* ids = plan.token_experts(t).data();
      float* w = plan.token_weights(t).data();
      for (int64_t j = 0; j < k; ++j) ids[j] = idx[j];
      if (transport) {
        // Pi_i / sum_{j in I} Pi_j, relative to the largest selected entry (no underflow 0/0).
        const float top = lp[idx[0]];
        float sum = 0.0f;
        for (int64_t j = 0; j < k; ++j) sum += (w[j] = std::exp(lp[idx[j]] - top));
        for (int64_t j = 0; j < k; ++j) w[j] /= sum;
      } else if (k == 1) {
        w[0] = 1.0f / (1.0f + std::exp(-L[idx[0]]));
      } else {
        TopKRouter::softmax(L, E, tmp);
        for (int64_t j = 0; j < k; ++j) w[j] = tmp[idx[j]];
      }
    }
    plan.finalize();
  }

 private:
  SinkhornOptions opt_;
  std::vector<float> weight_;
  std::optional<TopKRouter> inference_;  // SinkhornMode::megatron
};

static_assert(Router<SinkhornRouter>);

/// The selective draw of SSR: true iff `splitmix64(seed ^ (step * 0x9E3779B97F4A7C15) ^ layer)
/// / 2^64 < p` (compared exactly; p >= 1 always true, p <= 0 never).
inline bool selective_sinkhorn_draw(uint64_t seed, uint64_t step, uint64_t layer,
                                    double p) noexcept {
  const uint64_t h = detail::splitmix64(seed ^ (step * 0x9E3779B97F4A7C15ull) ^ layer);
  if (p >= 1.0) return true;  // h / 2^64 < 1 always
  if (!(p > 0.0)) return false;
  // P = p * 2^64 is an exact double < 2^64, so for an integer h: h < P <=> h < ceil(P), and
  // ceil(P) <= 2^64 - 2048 converts to uint64 exactly.
  return h < static_cast<uint64_t>(std::ceil(std::ldexp(p, 64)));
}

/// Parameters of the selective Sinkhorn wrapper (SSR, arXiv 2511.08972; ROUTING.md section 2).
struct SelectiveSinkhornOptions {
  /// The Sinkhorn path; its num_experts, k and hidden are the wrapper's. Default weight mode:
  /// transport (SSR), so cost probs and xi = 0.05 unless set.
  SinkhornOptions sinkhorn = [] {
    SinkhornOptions o;
    o.weight_mode = SinkhornWeightMode::transport;
    return o;
  }();
  /// The plain top-k path. num_experts, k and hidden: 0 takes the Sinkhorn path's, anything
  /// else must match. Default: Softmax(TopK(L)) (`topk_then_softmax`, the SMoE gate SSR uses).
  TopKOptions topk = [] {
    TopKOptions o;
    o.topk_then_softmax = true;
    return o;
  }();
  double p = 0.005;       ///< probability of the Sinkhorn path per (step, layer) in training
  uint64_t seed = 0;      ///< seed of the draw
  uint64_t layer = 0;     ///< this layer's index in the draw
  uint64_t step = 0;      ///< current training step (set_step() per step)
  bool training = false;  ///< false: always the plain top-k (inference)

  /// The top-k options with num_experts, k and hidden taken from the Sinkhorn path.
  [[nodiscard]] TopKOptions resolved_topk() const noexcept {
    TopKOptions o = topk;
    if (o.num_experts == 0) o.num_experts = sinkhorn.num_experts;
    if (o.k == 0) o.k = sinkhorn.k;
    if (o.hidden == 0) o.hidden = sinkhorn.hidden;
    return o;
  }

  /// Throws moekit::error naming the first invalid parameter.
  void validate() const {
    sinkhorn.validate();
    const TopKOptions o = resolved_topk();
    MOEKIT_CHECK(o.num_experts == sinkhorn.num_experts,
                 "selective sinkhorn router: topk.num_experts expected ", sinkhorn.num_experts,
                 " (or 0), got ", o.num_experts);
    MOEKIT_CHECK(o.k == sinkhorn.k, "selective sinkhorn router: topk.k expected ", sinkhorn.k,
                 " (or 0), got ", o.k);
    MOEKIT_CHECK(o.hidden == sinkhorn.hidden, "selective sinkhorn router: topk.hidden expected ",
                 sinkhorn.hidden, " (or 0), got ", o.hidden);
    o.validate();
    MOEKIT_CHECK(std::isfinite(p) && p >= 0 && p <= 1,
                 "selective sinkhorn router: p expected in [0, 1], got ", p);
  }
};

/// Selective Sinkhorn Routing: per (step, layer) in training, the Sinkhorn router with
/// probability p, else the plain top-k; always the plain top-k when not training. Both paths
/// read the same gate weight `[E, d]` (each holds a copy). route() is const and thread-safe;
/// last_path() tells which path the most recent call took.
class SelectiveSinkhornRouter {
 public:
  enum class Path : uint8_t { none, topk, sinkhorn };

  SelectiveSinkhornRouter(SelectiveSinkhornOptions options, const std::vector<float>& weight)
      : opt_((options.validate(), options)),
        topk_(opt_.resolved_topk(), weight),
        sinkhorn_(opt_.sinkhorn, weight) {}

  [[nodiscard]] int64_t num_experts() const noexcept { return sinkhorn_.num_experts(); }
  [[nodiscard]] int64_t hidden_size() const noexcept { return sinkhorn_.hidden_size(); }
  [[nodiscard]] int64_t k() const noexcept { return sinkhorn_.k(); }
  [[nodiscard]] const SelectiveSinkhornOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const TopKRouter& topk() const noexcept { return topk_; }
  [[nodiscard]] const SinkhornRouter& sinkhorn() const noexcept { return sinkhorn_; }
  [[nodiscard]] double flops_per_token() const noexcept { return sinkhorn_.flops_per_token(); }

  void set_step(uint64_t step) noexcept { opt_.step = step; }
  void set_training(bool training) noexcept { opt_.training = training; }

  /// The path the next route() takes: Sinkhorn iff training and the draw for (step, layer) hits.
  [[nodiscard]] bool uses_sinkhorn() const noexcept {
    return opt_.training && selective_sinkhorn_draw(opt_.seed, opt_.step, opt_.layer, opt_.p);
  }
  /// The path of the most recent route() (none before the first).
  [[nodiscard]] Path last_path() const noexcept {
    return static_cast<Path>(last_.v.load(std::memory_order_relaxed));
  }

  /// Routes with the drawn path. On the top-k path scratch.iterations and scratch.error are 0.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    const bool s = uses_sinkhorn();
    if (s) {
      sinkhorn_.route(batch, hidden, plan, scratch, threads);
    } else {
      topk_.route(batch, hidden, plan, scratch, threads);
      scratch.iterations = 0;
      scratch.error = 0.0;
    }
    last_.v.store(static_cast<uint8_t>(s ? Path::sinkhorn : Path::topk), std::memory_order_relaxed);
  }

 private:
  SelectiveSinkhornOptions opt_;
  TopKRouter topk_;
  SinkhornRouter sinkhorn_;
  mutable detail::sinkhorn::CopyableFlag last_;
};

static_assert(Router<SelectiveSinkhornRouter>);

}  // namespace moekit
#pragma GCC visibility pop
