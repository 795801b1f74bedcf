// SPDX-License-Identifier: Apache-2.0
// Expert-choice router: every expert picks its kc best tokens of the batch (Zhou et al.,
// arXiv 2202.09368), plus two causal variants for decoding: per-expert thresholds calibrated
// over batches, and an auxiliary predictor (MoMa, arXiv 2407.21770). ROUTING.md section 3.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
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

/// How an ExpertChoiceRouter decides which tokens an expert serves.
enum class ExpertChoiceMode {
  batch,      ///< each expert takes its kc highest-scoring tokens of the batch (non-causal)
  threshold,  ///< token t goes to expert e iff S[t, e] >= tau_e (causal, per token)
  predictor,  ///< token t goes to expert e iff sigmoid(aux(x_t))[e] > 0.5 (causal, per token)
};

/// The config spelling of a mode: "batch", "threshold", "predictor".
inline const char* expert_choice_mode_name(ExpertChoiceMode m) noexcept {
  switch (m) {
    case ExpertChoiceMode::batch:
      return "batch";
    case ExpertChoiceMode::threshold:
      return "threshold";
    case ExpertChoiceMode::predictor:
      return "predictor";
  }
  return "?";
}

/// Parses a mode name; throws moekit::error naming the accepted values.
inline ExpertChoiceMode parse_expert_choice_mode(std::string_view name) {
  if (name == "batch") return ExpertChoiceMode::batch;
  if (name == "threshold") return ExpertChoiceMode::threshold;
  if (name == "predictor") return ExpertChoiceMode::predictor;
  detail::fail("expert_choice router: mode expected one of batch, threshold, predictor; got \"",
               name, "\"");
}

/// Parameters of the expert-choice router (ROUTING.md section 3). Field names are the JSON
/// keys of `{"router": {"type": "expert_choice", ...}}`; `hidden` comes from `hidden_size`.
struct ExpertChoiceOptions {
  int64_t num_experts = 0;  ///< E
  int64_t hidden = 0;       ///< d
  /// c: each expert takes kc = min(T, max(1, floor(T * c / E))) tokens (T = unpadded tokens),
  /// so a token gets c slots on average.
  double capacity_factor = 2.0;
  /// Cap on the experts serving one token, applied after all experts have picked: a token's
  /// lowest-score picks beyond it are dropped (the expert's slot is not refilled). 0 = no cap.
  int64_t max_experts_per_token = 0;
  ExpertChoiceMode mode = ExpertChoiceMode::batch;
  /// Threshold calibration: tau_e <- decay * tau_e + (1 - decay) * kth_e.
  double decay = 0.99;
  /// Width of the auxiliary predictor's hidden layer (`router.aux.0.weight [aux_hidden, d]`).
  int64_t aux_hidden = 64;

  /// Throws moekit::error naming the first invalid parameter.
  void validate() const {
    MOEKIT_CHECK(num_experts >= 1, "expert_choice router: num_experts (E) expected >= 1, got ",
                 num_experts);
    MOEKIT_CHECK(hidden >= 1, "expert_choice router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(std::isfinite(capacity_factor) && capacity_factor > 0,
                 "expert_choice router: capacity_factor expected finite and > 0, got ",
                 capacity_factor);
    MOEKIT_CHECK(max_experts_per_token >= 0 && max_experts_per_token <= num_experts,
                 "expert_choice router: max_experts_per_token expected in [0, E = ", num_experts,
                 "] (0 = no cap), got ", max_experts_per_token);
    MOEKIT_CHECK(mode == ExpertChoiceMode::batch || mode == ExpertChoiceMode::threshold ||
                     mode == ExpertChoiceMode::predictor,
                 "expert_choice router: mode expected batch, threshold or predictor, got ",
                 static_cast<int>(mode));
    MOEKIT_CHECK(std::isfinite(decay) && decay >= 0 && decay <= 1,
                 "expert_choice router: decay expected in [0, 1], got ", decay);
    MOEKIT_CHECK(aux_hidden >= 1, "expert_choice router: aux_hidden expected >= 1, got ",
                 aux_hidden);
  }

  /// kc = min(T, max(1, floor(T * c / E))) for T = `routed_tokens` (0 only when T = 0);
  /// evaluated in double in that order.
  [[nodiscard]] int64_t capacity(int64_t routed_tokens) const noexcept {
    if (routed_tokens <= 0) return 0;
    const double T = static_cast<double>(routed_tokens);
    const double v = std::floor(T * capacity_factor / static_cast<double>(num_experts));
    if (!(v < T)) return routed_tokens;  // also catches overflow to +inf
    return std::max<int64_t>(1, static_cast<int64_t>(v));
  }
};

/// Weights of the auxiliary predictor `Linear(d, H) -> ReLU -> Linear(H, E)` (PyTorch
/// `nn.Sequential` indices 0 and 2; H = aux_hidden), in HF `[out, in]` layout.
struct ExpertChoicePredictor {
  std::vector<float> weight0;  ///< `router.aux.0.weight [H, d]`
  std::vector<float> bias0;    ///< `router.aux.0.bias [H]`
  std::vector<float> weight2;  ///< `router.aux.2.weight [E, H]`
  std::vector<float> bias2;    ///< `router.aux.2.bias [E]`

  [[nodiscard]] bool empty() const noexcept {
    return weight0.empty() && bias0.empty() && weight2.empty() && bias2.empty();
  }
};

/// Expert-choice router. Scores `S = softmax(X W^T)` over experts `[T, E]` (fp32, fixed
/// summation order). In `batch` mode expert e takes the kc tokens with the largest S[:, e]
/// (ties: lower token index); a token may get 0..E slots, each weighted S[t, e], not
/// renormalised. The causal modes decide each token alone (threshold or predictor), so a
/// single token routes exactly as it would inside any batch. Every mode orders a token's
/// slots by descending S (ties: lower expert id) and applies max_experts_per_token.
class ExpertChoiceRouter {
 public:
  /// Below these sizes the light loops (per-token slot sorting, per-expert selection) run on
  /// the calling thread: waking a team would cost more than the work. Results never depend
  /// on the thread count either way.
  static constexpr int64_t kParallelTokens = 256;
  static constexpr int64_t kParallelSelect = 8192;  ///< E x unpadded tokens

  /// `weight [E, d]` (HF `gate.weight`); `predictor`: the auxiliary predictor (required for
  /// mode predictor, may be empty otherwise); `thresholds [E]` (`router.thresholds`), empty
  /// until calibrated or set.
  ExpertChoiceRouter(ExpertChoiceOptions options, std::vector<float> weight,
                     ExpertChoicePredictor predictor = {}, std::vector<float> thresholds = {})
      : opt_(options), weight_(std::move(weight)) {
    opt_.validate();
    const auto E = static_cast<size_t>(opt_.num_experts), d = static_cast<size_t>(opt_.hidden);
    MOEKIT_CHECK(weight_.size() == E * d, "expert_choice router: gate.weight expected [", E, ", ",
                 d, "] = ", E * d, " values, got ", weight_.size());
    check_finite(weight_, "gate.weight", d);
    set_predictor(std::move(predictor));
    set_thresholds(std::move(thresholds));
    set_mode(opt_.mode);
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return opt_.num_experts; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] const ExpertChoiceOptions& options() const noexcept { return opt_; }
  [[nodiscard]] ExpertChoiceMode mode() const noexcept { return opt_.mode; }
  [[nodiscard]] const std::vector<float>& weight() const noexcept { return weight_; }
  [[nodiscard]] const ExpertChoicePredictor& predictor() const noexcept { return pred_; }
  /// Per-expert thresholds `tau [E]` (`router.thresholds`); empty until calibrated or set.
  [[nodiscard]] const std::vector<float>& thresholds() const noexcept { return tau_; }
  /// Batches folded into the thresholds by calibrate() since they were last set or reset.
  [[nodiscard]] int64_t calibrated_batches() const noexcept { return calibrated_; }
  /// kc of a batch: the capacity for its unpadded tokens.
  [[nodiscard]] int64_t capacity(const Batch& batch) const noexcept {
    return opt_.capacity(batch.routed_tokens());
  }

  /// Switches the mode, e.g. from batch routing (training, prefill) to a causal one.
  void set_mode(ExpertChoiceMode mode) {
    MOEKIT_CHECK(
        mode != ExpertChoiceMode::predictor || !pred_.empty(),
        "expert_choice router: mode predictor needs router.aux.{0,2}.{weight,bias}, got none");
    opt_.mode = mode;
    opt_.validate();
  }

  /// Installs thresholds `tau [E]` (finite); empty clears them. Restarts the calibration count.
  void set_thresholds(std::vector<float> thresholds) {
    MOEKIT_CHECK(thresholds.empty() || static_cast<int64_t>(thresholds.size()) == opt_.num_experts,
                 "expert_choice router: router.thresholds expected [", opt_.num_experts, "], got ",
                 thresholds.size(), " values");
    check_finite(thresholds, "router.thresholds", 0);
    tau_ = std::move(thresholds);
    calibrated_ = 0;
  }
  /// Forgets the thresholds: the next calibrate() sets them to that batch's kth scores.
  void reset_thresholds() noexcept {
    tau_.clear();
    calibrated_ = 0;
  }

  /// Installs the auxiliary predictor (shapes as ExpertChoicePredictor, H = aux_hidden).
  void set_predictor(ExpertChoicePredictor p) {
    if (p.empty()) {
      MOEKIT_CHECK(
          opt_.mode != ExpertChoiceMode::predictor,
          "expert_choice router: mode predictor needs router.aux.{0,2}.{weight,bias}, got none");
      pred_ = std::move(p);
      return;
    }
    const auto H = static_cast<size_t>(opt_.aux_hidden), d = static_cast<size_t>(opt_.hidden),
               E = static_cast<size_t>(opt_.num_experts);
    MOEKIT_CHECK(p.weight0.size() == H * d, "expert_choice router: router.aux.0.weight expected [",
                 H, ", ", d, "] = ", H * d, " values (aux_hidden = ", H, "), got ",
                 p.weight0.size());
    MOEKIT_CHECK(p.bias0.size() == H, "expert_choice router: router.aux.0.bias expected [", H,
                 "], got ", p.bias0.size(), " values");
    MOEKIT_CHECK(p.weight2.size() == E * H, "expert_choice router: router.aux.2.weight expected [",
                 E, ", ", H, "] = ", E * H, " values, got ", p.weight2.size());
    MOEKIT_CHECK(p.bias2.size() == E, "expert_choice router: router.aux.2.bias expected [", E,
                 "], got ", p.bias2.size(), " values");
    check_finite(p.weight0, "router.aux.0.weight", d);
    check_finite(p.bias0, "router.aux.0.bias", 0);
    check_finite(p.weight2, "router.aux.2.weight", H);
    check_finite(p.bias2, "router.aux.2.bias", 0);
    pred_ = std::move(p);
  }

  /// Router FLOPs per routed token (logits, plus the predictor in predictor mode).
  [[nodiscard]] double flops_per_token() const noexcept {
    double f = 2.0 * static_cast<double>(opt_.num_experts) * static_cast<double>(opt_.hidden);
    if (opt_.mode == ExpertChoiceMode::predictor)
      f += 2.0 * static_cast<double>(opt_.aux_hidden) *
           static_cast<double>(opt_.hidden + opt_.num_experts);
    return f;
  }

  /// Routes `hidden [T, d]` into `plan` (finalised) according to mode(). Padded tokens get no
  /// slot and do not count in T. Throws moekit::error on a non-finite logit (or predictor
  /// output), or in threshold mode without thresholds. `scratch.logits` holds `[T, E]` logits.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    MOEKIT_CHECK(batch.tokens == 0 || hidden != nullptr,
                 "expert_choice router: hidden states pointer is null for T = ", batch.tokens);
    MOEKIT_CHECK(opt_.mode != ExpertChoiceMode::threshold || !tau_.empty(),
                 "expert_choice router: mode threshold needs router.thresholds [", opt_.num_experts,
                 "], got none (call calibrate() or set_thresholds() first)");
    const int nt = detail::resolve_threads(threads);
    const bool pred = opt_.mode == ExpertChoiceMode::predictor;
    compute_scores(batch, hidden, scratch, nt, pred);
    if (opt_.mode == ExpertChoiceMode::batch) {
      select_batch(batch, plan, scratch, nt);
    } else {
      select_per_token(batch, plan, scratch, nt);
    }
    plan.finalize();
  }

  /// Folds one batch into the thresholds: kth_e = the kc-th largest S[:, e] over the batch's
  /// unpadded tokens; the first batch (no thresholds yet) sets tau_e = kth_e, later ones
  /// tau_e <- decay * tau_e + (1 - decay) * kth_e (in double, stored as float). A batch
  /// without unpadded tokens changes nothing. Works in every mode.
  void calibrate(const Batch& batch, const float* hidden, RouterScratch& scratch, int threads = 0) {
    batch.validate(opt_.hidden);
    MOEKIT_CHECK(
        batch.tokens == 0 || hidden != nullptr,
        "expert_choice router: calibrate: hidden states pointer is null for T = ", batch.tokens);
    const int nt = detail::resolve_threads(threads);
    compute_scores(batch, hidden, scratch, nt, false);
    const int64_t Tr = batch.routed_tokens();
    if (Tr == 0) return;
    list_unpadded(batch, scratch, static_cast<size_t>(Tr) * (1 + static_cast<size_t>(nt)));
    const int64_t E = opt_.num_experts, kc = opt_.capacity(Tr);
    const float* S = scratch.buffer.data();
    int32_t* cand_base = scratch.index.data() + Tr;
    std::vector<double> kth(static_cast<size_t>(E));
#pragma omp parallel for num_threads(nt) \
    schedule(static) if (nt > 1 && E > 1 && E * Tr >= kParallelSelect)
    for (int64_t e = 0; e < E; ++e) {
      int32_t* cand =
          cand_base + static_cast<size_t>(omp_get_thread_num()) * static_cast<size_t>(Tr);
      std::copy(scratch.index.data(), scratch.index.data() + Tr, cand);
      const ColumnOrder by_score{S, E, e};
      std::nth_element(cand, cand + (kc - 1), cand + Tr, by_score);
      kth[static_cast<size_t>(e)] =
          S[static_cast<size_t>(cand[kc - 1]) * static_cast<size_t>(E) + static_cast<size_t>(e)];
    }
    if (tau_.empty()) {
      tau_.resize(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e)
        tau_[static_cast<size_t>(e)] = static_cast<float>(kth[static_cast<size_t>(e)]);
    } else {
      for (int64_t e = 0; e < E; ++e) {
        const auto i = static_cast<size_t>(e);
        tau_[i] = static_cast<float>(opt_.decay * static_cast<double>(tau_[i]) +
                                     (1.0 - opt_.decay) * kth[i]);
      }
    }
    ++calibrated_;
  }
  /// The same with its own scratch.
  void calibrate(const Batch& batch, const float* hidden, int threads = 0) {
    RouterScratch scratch;
    calibrate(batch, hidden, scratch, threads);
  }

 private:
  static void check_finite(const std::vector<float>& v, const char* name, size_t row) {
    detail::check_finite(v, "expert_choice router", name, row);
  }

  // Orders tokens by descending S[:, e], ties to the lower token index.
  struct ColumnOrder {
    const float* S;
    int64_t E, e;
    bool operator()(int32_t a, int32_t b) const noexcept {
      const float sa = S[static_cast<int64_t>(a) * E + e], sb = S[static_cast<int64_t>(b) * E + e];
      return sa > sb || (sa == sb && a < b);
    }
  };

  // Logits into scratch.logits [T, E], scores S into scratch.buffer [0, T E) and, for the
  // predictor, its outputs z into scratch.buffer [T E, 2 T E). Padded rows are 0 and unread.
  void compute_scores(const Batch& batch, const float* hidden, RouterScratch& scratch, int nt,
                      bool pred) const {
    const int64_t T = batch.tokens, E = opt_.num_experts, d = opt_.hidden, H = opt_.aux_hidden;
    const size_t TE = static_cast<size_t>(T * E);
    scratch.logits.resize(TE);
    const size_t need =
        TE * (pred ? 2 : 1) + (pred ? static_cast<size_t>(H) * static_cast<size_t>(nt) : 0);
    if (scratch.buffer.size() < need) scratch.buffer.resize(need);
    float* S = scratch.buffer.data();
    float* Z = S + TE;
    float* hid = Z + TE;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* L = scratch.logits.data() + t * E;
      if (batch.is_padding(t)) {
        std::fill(L, L + E, 0.0f);
        std::fill(S + t * E, S + (t + 1) * E, 0.0f);
        if (pred) std::fill(Z + t * E, Z + (t + 1) * E, 0.0f);
        continue;
      }
      const float* x = hidden + t * d;
      kernels::matvec_rows(x, weight_.data(), E, d, L);
      TopKRouter::softmax(L, E, S + t * E);
      if (pred) {
        float* h = hid + static_cast<size_t>(H) * static_cast<size_t>(omp_get_thread_num());
        kernels::matvec_rows(x, pred_.weight0.data(), H, d, h);
        for (int64_t j = 0; j < H; ++j)
          h[j] = std::max(0.0f, h[j] + pred_.bias0[static_cast<size_t>(j)]);
        float* z = Z + t * E;
        kernels::matvec_rows(h, pred_.weight2.data(), E, H, z);
        for (int64_t e = 0; e < E; ++e) z[e] += pred_.bias2[static_cast<size_t>(e)];
      }
    }
    if (const int64_t i = kernels::first_non_finite(scratch.logits.data(), T * E); i >= 0)
      detail::fail("expert_choice router: logit of token ", i / E, ", expert ", i % E,
                   " expected finite, got ", scratch.logits[static_cast<size_t>(i)],
                   " (NaN or Inf in hidden_states or gate.weight, or an overflow)");
    if (pred)
      if (const int64_t i = kernels::first_non_finite(Z, T * E); i >= 0)
        detail::fail("expert_choice router: predictor output of token ", i / E, ", expert ", i % E,
                     " expected finite, got ", Z[i],
                     " (NaN or Inf in hidden_states or router.aux, or an overflow)");
  }

  // Grows scratch.index to `need` ints and lists the unpadded token ids in its first Tr.
  static void list_unpadded(const Batch& batch, RouterScratch& scratch, size_t need) {
    if (scratch.index.size() < need) scratch.index.resize(need);
    size_t n = 0;
    for (int64_t t = 0; t < batch.tokens; ++t)
      if (!batch.is_padding(t)) scratch.index[n++] = static_cast<int32_t>(t);
  }

  // Orders token t's slots by descending score (ties: lower expert id), then applies the cap.
  void finish_token(RoutingPlan& plan, int64_t t) const noexcept {
    int32_t* ids = plan.token_experts(t).data();
    float* w = plan.token_weights(t).data();
    const int64_t n = static_cast<int64_t>(plan.token_experts(t).size());
    for (int64_t i = 1; i < n; ++i) {  // insertion sort: n <= E, and ids arrive ascending
      const int32_t id = ids[i];
      const float wi = w[i];
      int64_t j = i;
      for (; j > 0 && (w[j - 1] < wi || (w[j - 1] == wi && ids[j - 1] > id)); --j) {
        ids[j] = ids[j - 1];
        w[j] = w[j - 1];
      }
      ids[j] = id;
      w[j] = wi;
    }
    const int64_t cap = opt_.max_experts_per_token;
    if (cap > 0 && n > cap) {
      uint8_t* dropped = plan.token_dropped(t).data();
      for (int64_t j = cap; j < n; ++j) {
        dropped[j] = 1;
        w[j] = 0.0f;
      }
    }
  }

  // Batch mode: each expert takes its kc best unpadded tokens.
  void select_batch(const Batch& batch, RoutingPlan& plan, RouterScratch& scratch, int nt) const {
    const int64_t T = batch.tokens, E = opt_.num_experts;
    // index layout: [unpadded Tr][candidates nt * Tr][picks E * kc][counts T]
    const int64_t Tr = batch.routed_tokens(), kc = opt_.capacity(Tr);
    list_unpadded(batch, scratch,
                  static_cast<size_t>(Tr) * (1 + static_cast<size_t>(nt)) +
                      static_cast<size_t>(E * kc) + static_cast<size_t>(T));
    const float* S = scratch.buffer.data();
    int32_t* tokens = scratch.index.data();
    int32_t* cand_base = tokens + Tr;
    int32_t* picks = cand_base + static_cast<size_t>(nt) * static_cast<size_t>(Tr);
    int32_t* count = picks + E * kc;
    if (kc > 0) {
#pragma omp parallel for num_threads(nt) \
    schedule(static) if (nt > 1 && E > 1 && E * Tr >= kParallelSelect)
      for (int64_t e = 0; e < E; ++e) {
        int32_t* cand =
            cand_base + static_cast<size_t>(omp_get_thread_num()) * static_cast<size_t>(Tr);
        std::copy(tokens, tokens + Tr, cand);
        const ColumnOrder by_score{S, E, e};
        if (kc < Tr) std::nth_element(cand, cand + kc, cand + Tr, by_score);
        std::sort(cand, cand + kc, by_score);
        std::copy(cand, cand + kc, picks + e * kc);
      }
    }
    std::fill(count, count + T, 0);
    for (int64_t i = 0; i < E * kc; ++i) ++count[picks[i]];
    plan.reset(T, E, [&](int64_t t) { return static_cast<int64_t>(count[t]); });
    std::fill(count, count + T, 0);  // now: fill cursor per token
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t j = 0; j < kc; ++j) {
        const int32_t t = picks[e * kc + j];
        const int32_t s = count[t]++;
        plan.token_experts(t)[static_cast<size_t>(s)] = static_cast<int32_t>(e);
        plan.token_weights(t)[static_cast<size_t>(s)] = S[static_cast<int64_t>(t) * E + e];
      }
    }
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T >= kParallelTokens)
    for (int64_t t = 0; t < T; ++t) finish_token(plan, t);
  }

  // Threshold and predictor modes: each token decides alone.
  void select_per_token(const Batch& batch, RoutingPlan& plan, RouterScratch& scratch,
                        int nt) const {
    const int64_t T = batch.tokens, E = opt_.num_experts;
    if (scratch.index.size() < static_cast<size_t>(T)) scratch.index.resize(static_cast<size_t>(T));
    const float* S = scratch.buffer.data();
    const float* Z = S + T * E;
    const bool pred = opt_.mode == ExpertChoiceMode::predictor;
    const float* tau = tau_.data();
    auto takes = [&](int64_t t, int64_t e) {
      return pred ? Z[t * E + e] > 0.0f  // sigmoid(z) > 0.5  <=>  z > 0
                  : S[t * E + e] >= tau[e];
    };
    int32_t* count = scratch.index.data();
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T >= kParallelTokens)
    for (int64_t t = 0; t < T; ++t) {
      int32_t n = 0;
      if (!batch.is_padding(t))
        for (int64_t e = 0; e < E; ++e) n += takes(t, e);
      count[t] = n;
    }
    plan.reset(T, E, [&](int64_t t) { return static_cast<int64_t>(count[t]); });
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T >= kParallelTokens)
    for (int64_t t = 0; t < T; ++t) {
      if (count[t] == 0) continue;
      int32_t* ids = plan.token_experts(t).data();
      float* w = plan.token_weights(t).data();
      int64_t n = 0;
      for (int64_t e = 0; e < E; ++e) {
        if (!takes(t, e)) continue;
        ids[n] = static_cast<int32_t>(e);
        w[n++] = S[t * E + e];
      }
      finish_token(plan, t);
    }
  }

  ExpertChoiceOptions opt_;
  std::vector<float> weight_;
  ExpertChoicePredictor pred_;
  std::vector<float> tau_;
  int64_t calibrated_ = 0;
};

static_assert(Router<ExpertChoiceRouter>);

/// Width of the `[E, width]` outputs a plan needs: the largest number of kept slots of one
/// expert (kc for a batch-mode plan whose cap dropped nothing).
inline int64_t expert_choice_output_width(const RoutingPlan& plan) {
  MOEKIT_CHECK(plan.finalized(),
               "expert_choice_outputs: plan expected finalized, got a plan without finalize()");
  int64_t w = 0;
  for (int64_t e = 0; e < plan.num_experts(); ++e) w = std::max(w, plan.kept_of(e));
  return w;
}

/// Writes ROUTING.md section 8's expert-choice outputs from a finalised plan:
/// `ids [E, width]` (`expert_token_ids`, I32) and `weights [E, width]`
/// (`expert_token_weights`, F32). Row e lists expert e's kept tokens in its pick order
/// (descending weight, ties to the lower token), then -1 / 0 for unused entries. Slots the
/// per-token cap dropped are not listed. Throws if an expert has more than `width` kept slots
/// (use width = kc for batch mode, expert_choice_output_width(plan) in general).
inline void expert_choice_outputs(const RoutingPlan& plan, int64_t width, std::span<int32_t> ids,
                                  std::span<float> weights) {
  const int64_t E = plan.num_experts();
  const int64_t need = expert_choice_output_width(plan);
  MOEKIT_CHECK(width >= need, "expert_choice_outputs: width (kc) expected >= ", need,
               " (the largest number of kept slots of one expert), got ", width);
  MOEKIT_CHECK(static_cast<int64_t>(ids.size()) == E * width,
               "expert_choice_outputs: expert_token_ids expected [", E, ", ", width,
               "] = ", E * width, " values, got ", ids.size());
  MOEKIT_CHECK(static_cast<int64_t>(weights.size()) == E * width,
               "expert_choice_outputs: expert_token_weights expected [", E, ", ", width,
               "] = ", E * width, " values, got ", weights.size());
  const auto offs = plan.expert_offsets();
  const auto slots = plan.expert_slots();
  const auto w = plan.slot_weight();
  const auto tok = plan.slot_token();
  std::vector<int32_t> order;
  for (int64_t e = 0; e < E; ++e) {
    // Slots of one expert come in token order, so a stable sort on the weight keeps ties by token.
    order.assign(slots.begin() + offs[static_cast<size_t>(e)],
                 slots.begin() + offs[static_cast<size_t>(e) + 1]);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return w[static_cast<size_t>(a)] > w[static_cast<size_t>(b)];
    });
    for (int64_t j = 0; j < width; ++j) {
      const auto i = static_cast<size_t>(e * width + j);
      const bool have = j < static_cast<int64_t>(order.size());
      ids[i] = have ? tok[static_cast<size_t>(order[static_cast<size_t>(j)])] : -1;
      weights[i] = have ? w[static_cast<size_t>(order[static_cast<size_t>(j)])] : 0.0f;
    }
  }
}

}  // namespace moekit
#pragma GCC visibility pop
