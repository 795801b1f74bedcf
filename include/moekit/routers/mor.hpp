// SPDX-License-Identifier: Apache-2.0
// Mixture-of-Recursions: one shared block applied up to N_r times, tokens chosen per
// recursion by expert-choice top-k per sequence (ROUTING.md section 5).
// Paper: "Mixture-of-Recursions: Learning Dynamic Recursive Depths for Adaptive Token-Level
// Computation", arXiv 2507.10524.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/depth.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// MoR router activation `act` in `g = alpha * act(theta_r . x)`.
enum class MoRActivation {
  sigmoid,  ///< 1 / (1 + exp(-z)) (default)
  tanh,     ///< tanh(z)
  raw,      ///< z (no activation)
};

/// Parses "sigmoid", "tanh" or "raw"; throws moekit::error otherwise.
inline MoRActivation parse_mor_activation(const std::string& name) {
  if (name == "sigmoid") return MoRActivation::sigmoid;
  if (name == "tanh") return MoRActivation::tanh;
  if (name == "raw") return MoRActivation::raw;
  detail::fail("mor router: act expected one of sigmoid, tanh, raw; got \"", name, "\"");
}

/// Parameters of the MoR router (ROUTING.md section 5). JSON keys = field names.
struct MoROptions {
  int64_t hidden = 0;          ///< d
  int64_t num_recursions = 3;  ///< N_r, the most times a token runs the block
  MoRActivation act = MoRActivation::sigmoid;
  /// Scale of the router weight g; 0.1 as in the released MoR configs (`mor.expert.alpha`).
  double alpha = 0.1;
  /// cf_r for r = 0..N_r-1, each in (0, 1]; empty = the default (N_r - r) / N_r.
  std::vector<double> capacity_factors;
  /// The block's output includes its own residual, as the official code's decoder layers do:
  /// a chosen token becomes `x + g * (x + f(x))` (expert_choice_router.py STEP 5:
  /// `scatter_add(x, block(x) * g)`). false: `x + g * f(x)` (the block's delta alone).
  bool block_residual = true;

  /// Throws moekit::error naming the first invalid parameter.
  void validate() const {
    MOEKIT_CHECK(hidden >= 1, "mor router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(num_recursions >= 1, "mor router: num_recursions (N_r) expected >= 1, got ",
                 num_recursions);
    MOEKIT_CHECK(
        act == MoRActivation::sigmoid || act == MoRActivation::tanh || act == MoRActivation::raw,
        "mor router: act expected sigmoid, tanh or raw, got ", static_cast<int>(act));
    MOEKIT_CHECK(std::isfinite(alpha) && alpha > 0,
                 "mor router: alpha expected finite and > 0, got ", alpha);
    MOEKIT_CHECK(
        capacity_factors.empty() || static_cast<int64_t>(capacity_factors.size()) == num_recursions,
        "mor router: capacity_factors expected empty (default) or [N_r = ", num_recursions,
        "] values, got ", capacity_factors.size());
    for (size_t r = 0; r < capacity_factors.size(); ++r)
      MOEKIT_CHECK(
          std::isfinite(capacity_factors[r]) && capacity_factors[r] > 0 && capacity_factors[r] <= 1,
          "mor router: capacity_factors[", r, "] expected in (0, 1], got ", capacity_factors[r]);
  }

  /// Tokens chosen at recursion r in a sequence of `length` unpadded tokens, before the cap
  /// by the candidates: max(1, floor(cf_r * length)), 0 for an empty sequence. The default
  /// cf_r = (N_r - r) / N_r is evaluated exactly in integers; given factors in double, the
  /// product snapped to an integer within 1e-9 (snap_integer).
  [[nodiscard]] int64_t capacity(int64_t r, int64_t length) const noexcept {
    if (length <= 0) return 0;
    const int64_t c =
        capacity_factors.empty()
            ? (num_recursions - r) * length / num_recursions
            : static_cast<int64_t>(std::floor(snap_integer(capacity_factors[static_cast<size_t>(r)] *
                                                           static_cast<double>(length))));
    return std::max<int64_t>(1, c);
  }
};

/// MoR router: at recursion r, `z_t = theta_r . x_t` on the current hidden states of the
/// candidate tokens (all unpadded tokens at r = 0, the tokens chosen at r - 1 afterwards),
/// then per sequence the top `min(capacity(r, S_s), candidates)` by z (ties to the lower
/// token; the same order as g for the monotone activations) are chosen, with weight
/// `g_t = alpha * act(z_t)`. The plan has E = 1: one slot of weight g per chosen token.
///
/// After route_step(): `scratch.logits [T]` holds z (0 for non-candidates) and
/// `scratch.values [T]` g for the chosen tokens (0 for the others). route() (the Router
/// interface) is recursion 0 only: run the recursions through MoRLayer.
class MoRRouter {
 public:
  /// Multiply-adds (T d) below which route_step() runs on the calling thread alone.
  static constexpr int64_t kParallelWork = int64_t{1} << 18;

  /// `theta [N_r, d]`: row r is `router.steps.{r}.weight` ([1, d]).
  MoRRouter(MoROptions options, std::vector<float> theta)
      : opt_(std::move(options)), theta_(std::move(theta)) {
    opt_.validate();
    const auto n = static_cast<size_t>(opt_.num_recursions * opt_.hidden);
    MOEKIT_CHECK(theta_.size() == n,
                 "mor router: router.steps.{r}.weight expected N_r = ", opt_.num_recursions,
                 " rows of [1, ", opt_.hidden, "] = ", n, " values, got ", theta_.size());
    if (const int64_t i = kernels::first_non_finite(theta_.data(), static_cast<int64_t>(n)); i >= 0)
      detail::fail("mor router: router.steps.", i / opt_.hidden, ".weight[0, ", i % opt_.hidden,
                   "] expected finite, got ", theta_[static_cast<size_t>(i)]);
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return 1; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] int64_t num_recursions() const noexcept { return opt_.num_recursions; }
  [[nodiscard]] const MoROptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& theta() const noexcept { return theta_; }

  /// g from a router logit.
  [[nodiscard]] float weight_of(float z) const noexcept {
    float a = z;
    if (opt_.act == MoRActivation::sigmoid)
      a = 1.0f / (1.0f + std::exp(-z));
    else if (opt_.act == MoRActivation::tanh)
      a = std::tanh(z);
    return static_cast<float>(opt_.alpha) * a;
  }

  /// Recursion r on the current hidden states `x [T, d]`. `active [T]`: in, the candidates
  /// (1 = may be chosen; padded tokens never are); out, the chosen tokens. Writes the plan of
  /// the chosen tokens (finalised). Throws moekit::error if a candidate's z is not finite.
  void route_step(int64_t r, const Batch& batch, const float* x, std::span<uint8_t> active,
                  RoutingPlan& plan, RouterScratch& scratch, int threads = 0) const {
    batch.validate(opt_.hidden);
    MOEKIT_CHECK(r >= 0 && r < opt_.num_recursions,
                 "mor router: recursion expected in [0, N_r = ", opt_.num_recursions, "), got ", r);
    const int64_t T = batch.tokens, d = opt_.hidden, S = batch.num_sequences();
    MOEKIT_CHECK(static_cast<int64_t>(active.size()) == T, "mor router: active expected [", T,
                 "], got ", active.size(), " values");
    MOEKIT_CHECK(T == 0 || x != nullptr, "mor router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    scratch.logits.assign(static_cast<size_t>(T), 0.0f);
    scratch.values.assign(static_cast<size_t>(T), 0.0f);
    if (scratch.index.size() < static_cast<size_t>(T)) scratch.index.resize(static_cast<size_t>(T));
    const float* theta = theta_.data() + r * d;

    // Threads split tokens and sequences only (thread-count independent results); small
    // batches stay on one thread, where a parallel region costs more than the work.
    const bool parallel = nt > 1 && T * d >= kParallelWork;
#pragma omp parallel for num_threads(nt) schedule(static) if (parallel && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) active[static_cast<size_t>(t)] = 0;
      if (active[static_cast<size_t>(t)])
        scratch.logits[static_cast<size_t>(t)] = kernels::dot(x + t * d, theta, d);
    }
    // Non-candidates hold 0, so one scan finds the first non-finite candidate logit.
    if (const int64_t t = kernels::first_non_finite(scratch.logits.data(), T); t >= 0)
      detail::fail("mor router: logit of token ", t, " at recursion ", r, " expected finite, got ",
                   scratch.logits[static_cast<size_t>(t)],
                   " (NaN or Inf in the hidden states or router.steps.", r,
                   ".weight, or an overflow)");

      // Per sequence: candidates in scratch.index over the sequence's own range, top-k by z.
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (parallel && S > 1)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t b = batch.sequence_begin(s), e = batch.sequence_end(s);
      int32_t* cand = scratch.index.data() + b;
      int64_t n = 0, length = 0;
      for (int64_t t = b; t < e; ++t) {
        length += !batch.is_padding(t);
        if (active[static_cast<size_t>(t)]) cand[n++] = static_cast<int32_t>(t);
      }
      const int64_t k = std::min(opt_.capacity(r, length), n);
      const float* z = scratch.logits.data();
      std::partial_sort(cand, cand + k, cand + n, [z](int32_t a, int32_t c) {
        return z[a] > z[c] || (z[a] == z[c] && a < c);
      });
      for (int64_t i = k; i < n; ++i) active[static_cast<size_t>(cand[i])] = 0;
      for (int64_t i = 0; i < k; ++i)
        scratch.values[static_cast<size_t>(cand[i])] = weight_of(z[cand[i]]);
    }

    plan.reset(T, 1, [&](int64_t t) -> int64_t { return active[static_cast<size_t>(t)] ? 1 : 0; });
    for (int64_t t = 0; t < T; ++t)
      if (active[static_cast<size_t>(t)])
        plan.token_weights(t)[0] = scratch.values[static_cast<size_t>(t)];
    plan.finalize();
  }

  /// The Router interface: recursion 0 on `hidden`, all unpadded tokens candidates.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    std::vector<uint8_t> active(static_cast<size_t>(batch.tokens));
    for (int64_t t = 0; t < batch.tokens; ++t)
      active[static_cast<size_t>(t)] = batch.is_padding(t) ? 0 : 1;
    route_step(0, batch, hidden, active, plan, scratch, threads);
  }

 private:
  MoROptions opt_;
  std::vector<float> theta_;
};

static_assert(Router<MoRRouter>);

}  // namespace moekit
#pragma GCC visibility pop
