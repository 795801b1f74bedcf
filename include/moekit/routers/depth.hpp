// SPDX-License-Identifier: Apache-2.0
// Depth / skip routers (ROUTING.md section 5): Mixture-of-Depths (Raposo et al., arXiv
// 2404.02258), gamma-MoD with its ARank layer-selection tool (Luo et al., arXiv 2410.13859) and
// token-wise pruning (FTP, arXiv 2412.11494).
//
// Each routes tokens to ONE wrapped block (any Expert functor, e.g. blocks.hpp's FfnBlock or
// CausalAttentionBlock, via FunctorBank) or around it. The plan has E = 1: a selected token has
// one slot (expert 0, weight g_t), an unselected or padded token none. SparseLayer then returns
// `g_t * f(x_t)` for selected tokens and 0 for the others; the caller adds the residual.
// After route(), `RouterScratch::values [T]` holds each unpadded token's weight g_t (the weight
// it gets when processed; 0 for padding) and `RouterScratch::logits` the raw router logits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// `x` moved to the nearest integer when it lies within 1e-9 of it: capacities must not be
/// moved by floating-point error (ROUTING.md section 5: (1 - 0.7) * 10 is 3.0000000000000004
/// in double, whose ceiling would keep 4 tokens instead of 3).
[[nodiscard]] inline double snap_integer(double x) noexcept {
  const double r = std::nearbyint(x);
  return std::fabs(x - r) <= 1e-9 ? r : x;
}

/// Capacity of a sequence of `tokens` unpadded tokens: `ceil(ratio * tokens)` in double after
/// snap_integer(), clamped to [0, tokens] (ROUTING.md section 5).
[[nodiscard]] inline int64_t depth_capacity(double ratio, int64_t tokens) noexcept {
  const double c = std::ceil(snap_integer(ratio * static_cast<double>(tokens)));
  if (!(c > 0)) return 0;  // also NaN: clamped in double, never an out-of-range cast
  if (!(c < static_cast<double>(tokens))) return std::max<int64_t>(tokens, 0);
  return static_cast<int64_t>(c);
}

/// The `selected` output `[T]` (1 = the token went through the block) of a depth router's plan.
inline void depth_selected(const RoutingPlan& plan, std::span<uint8_t> selected) {
  MOEKIT_CHECK(static_cast<int64_t>(selected.size()) == plan.num_tokens(),
               "depth_selected: selected expected ", plan.num_tokens(), " entries, got ",
               selected.size());
  const auto pos = plan.slot_position();
  for (int64_t t = 0; t < plan.num_tokens(); ++t) {
    const int32_t s = plan.slot_offsets()[static_cast<size_t>(t)];
    selected[static_cast<size_t>(t)] = plan.slots_of(t) > 0 && pos[static_cast<size_t>(s)] >= 0;
  }
}

namespace detail::depth {

/// `logits [T, R] = x_t . W[r]` for unpadded tokens (0 for padding), fixed summation order;
/// throws if a logit is not finite.
inline void scalar_logits(const Batch& b, const float* hidden, const std::vector<float>& W,
                          int64_t R, std::vector<float>& logits, int nt, const char* who,
                          const char* tensor) {
  // Below ~0.5M multiply-adds a parallel region costs more than it saves.
  constexpr int64_t kParallelMacs = int64_t{1} << 19;
  const int64_t T = b.tokens, d = b.hidden;
  logits.resize(static_cast<size_t>(T * R));
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T * R * d >= kParallelMacs)
  for (int64_t t = 0; t < T; ++t) {
    float* L = logits.data() + t * R;
    if (b.is_padding(t)) {
      std::fill(L, L + R, 0.0f);
      continue;
    }
    kernels::matvec_rows(hidden + t * d, W.data(), R, d, L);
  }
  if (const int64_t i = kernels::first_non_finite(logits.data(), T * R); i >= 0)
    detail::fail(who, ": logit ", i % R, " of token ", i / R, " expected finite, got ",
                 logits[static_cast<size_t>(i)], " (NaN or Inf in hidden_states or ", tensor,
                 ", or an overflow)");
}

/// `ln(p / (1 - p))`: `sigmoid(z) > p` iff `z > logit(p)`, for p in (0, 1).
[[nodiscard]] inline double logit(double p) noexcept { return std::log(p / (1.0 - p)); }

/// Per sequence: keeps `mask[t]` of the must-keep tokens (mask already 1), then sets `mask` to 1
/// for the top `capacity(S) - kept` of the remaining unpadded tokens by `score` (descending,
/// ties to the lower token). S counts the sequence's unpadded tokens. `cand` holds T ints.
template <class Capacity>
void select_top_per_sequence(const Batch& b, const float* score, int64_t stride,
                             Capacity&& capacity, int32_t* mask, int32_t* cand) {
  for (int64_t s = 0; s < b.num_sequences(); ++s) {
    const int64_t lo = b.sequence_begin(s), hi = b.sequence_end(s);
    int64_t S = 0, kept = 0, n = 0;
    for (int64_t t = lo; t < hi; ++t) {
      if (b.is_padding(t)) continue;
      ++S;
      if (mask[t]) {
        ++kept;
      } else {
        cand[n++] = static_cast<int32_t>(t);
      }
    }
    const int64_t want = std::min<int64_t>(std::max<int64_t>(capacity(S) - kept, 0), n);
    if (want == 0) continue;
    const auto before = [score, stride](int32_t a, int32_t c) {
      const float sa = score[a * stride], sc = score[c * stride];
      return sa > sc || (sa == sc && a < c);
    };
    if (want < n) std::nth_element(cand, cand + want - 1, cand + n, before);
    for (int64_t i = 0; i < want; ++i) mask[cand[i]] = 1;
  }
}

/// Plan with one slot (expert 0, weight `values[t]`) for each token with `mask[t]`.
inline void build_plan(int64_t T, const int32_t* mask, const std::vector<float>& values,
                       RoutingPlan& plan) {
  plan.reset(T, 1, [mask](int64_t t) { return mask[t] ? 1 : 0; });
  for (int64_t t = 0; t < T; ++t) {
    if (!mask[t]) continue;
    plan.token_experts(t)[0] = 0;
    plan.token_weights(t)[0] = values[static_cast<size_t>(t)];
  }
  plan.finalize();
}

inline void check_weight(const std::vector<float>& w, int64_t rows, int64_t d, const char* who,
                         const char* name) {
  detail::check_weight(w, who, name, static_cast<size_t>(rows), static_cast<size_t>(d));
}

}  // namespace detail::depth

// ================================================================== Mixture-of-Depths

/// Weight activation of MoD: `g = r` (paper), `sigmoid(r)` or `alpha * tanh(r)`.
enum class DepthActivation { raw, sigmoid, tanh };

/// Which tokens MoD processes.
enum class MoDMode {
  capacity,       ///< top-C by r per sequence, C = ceil(ratio * S) (training / paper)
  threshold,      ///< causal inference: sigmoid(r_t) > threshold (router trained with BCE)
  aux_predictor,  ///< causal inference: sigmoid(aux . x_t) > threshold (`router.aux.weight`)
};

/// Parameters of MoDRouter (ROUTING.md section 5); field names are the JSON keys.
struct MoDOptions {
  int64_t hidden = 0;    ///< d
  double ratio = 0.125;  ///< processed fraction per sequence (capacity mode)
  DepthActivation activation = DepthActivation::raw;
  double alpha = 1.0;  ///< scale of the tanh activation
  MoDMode mode = MoDMode::capacity;
  double threshold = 0.5;  ///< on sigmoid(r) / sigmoid(aux . x) (threshold modes)
  /// aux_predictor: 0 = the predictor is one row `a . x` (`router.aux.weight [1, d]`); h > 0 =
  /// the MoD paper's MLP `w2 . relu(W1 x + b1) + b2` with h hidden units (MoDAuxMlp).
  int64_t aux_hidden = 0;

  void validate() const {
    MOEKIT_CHECK(hidden >= 1, "mod router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(std::isfinite(ratio) && ratio >= 0 && ratio <= 1,
                 "mod router: ratio expected in [0, 1], got ", ratio);
    MOEKIT_CHECK(activation == DepthActivation::raw || activation == DepthActivation::sigmoid ||
                     activation == DepthActivation::tanh,
                 "mod router: activation expected raw, sigmoid or tanh, got ",
                 static_cast<int>(activation));
    MOEKIT_CHECK(std::isfinite(alpha), "mod router: alpha expected finite, got ", alpha);
    MOEKIT_CHECK(
        mode == MoDMode::capacity || mode == MoDMode::threshold || mode == MoDMode::aux_predictor,
        "mod router: mode expected capacity, threshold or aux_predictor, got ",
        static_cast<int>(mode));
    MOEKIT_CHECK(threshold > 0 && threshold < 1, "mod router: threshold expected in (0, 1), got ",
                 threshold);
    MOEKIT_CHECK(aux_hidden >= 0 && aux_hidden <= (int64_t{1} << 20),
                 "mod router: aux_hidden expected in [0, 2^20] (0 = one linear row), got ", aux_hidden);
    MOEKIT_CHECK(aux_hidden == 0 || mode == MoDMode::aux_predictor,
                 "mod router: aux_hidden expected 0 unless mode is aux_predictor, got ", aux_hidden);
  }
};

/// The MoD paper's auxiliary predictor MLP (arXiv 2404.02258 section 3.5: `Linear(d, h) ->
/// ReLU -> Linear(h, 1)`, PyTorch nn.Sequential names `router.aux.0.*`, `router.aux.2.*`).
struct MoDAuxMlp {
  std::vector<float> w1;  ///< [h, d] (`router.aux.0.weight`)
  std::vector<float> b1;  ///< [h] (`router.aux.0.bias`)
  std::vector<float> w2;  ///< [1, h] (`router.aux.2.weight`)
  std::vector<float> b2;  ///< [1] (`router.aux.2.bias`)
};

/// Mixture-of-Depths router (arXiv 2404.02258): `r_t = w . x_t` (`router.weight [1, d]`);
/// capacity mode sends the top `ceil(ratio * S)` tokens of each sequence (ties: lower index)
/// through the block with weight `act(r_t)`; the threshold modes decide per token, causally.
class MoDRouter {
 public:
  /// `weight [1, d]` (`router.weight`); `aux_weight [1, d]` (`router.aux.weight`), required
  /// iff mode is aux_predictor.
  MoDRouter(MoDOptions options, std::vector<float> weight, std::vector<float> aux_weight = {})
      : opt_(options), w_(std::move(weight)), aux_(std::move(aux_weight)) {
    opt_.validate();
    MOEKIT_CHECK(opt_.aux_hidden == 0, "mod router: aux_hidden ", opt_.aux_hidden,
                 " needs the MLP predictor (the MoDAuxMlp constructor), got one row");
    check();
  }
  /// Mode aux_predictor with the MLP predictor of `options.aux_hidden` units.
  MoDRouter(MoDOptions options, std::vector<float> weight, MoDAuxMlp mlp)
      : opt_(options), w_(std::move(weight)), mlp_(std::move(mlp)) {
    opt_.validate();
    MOEKIT_CHECK(opt_.mode == MoDMode::aux_predictor && opt_.aux_hidden > 0,
                 "mod router: an MLP predictor expected with mode aux_predictor and aux_hidden > 0, got aux_hidden ",
                 opt_.aux_hidden);
    const auto h = static_cast<size_t>(opt_.aux_hidden);
    detail::depth::check_weight(w_, 1, opt_.hidden, "mod router", "router.weight");
    detail::depth::check_weight(mlp_.w1, opt_.aux_hidden, opt_.hidden, "mod router", "router.aux.0.weight");
    detail::depth::check_weight(mlp_.b1, 1, opt_.aux_hidden, "mod router", "router.aux.0.bias");
    detail::depth::check_weight(mlp_.w2, 1, opt_.aux_hidden, "mod router", "router.aux.2.weight");
    detail::depth::check_weight(mlp_.b2, 1, 1, "mod router", "router.aux.2.bias");
    (void)h;
  }

 private:
  void check() const {
    detail::depth::check_weight(w_, 1, opt_.hidden, "mod router", "router.weight");
    if (opt_.mode == MoDMode::aux_predictor) {
      detail::depth::check_weight(aux_, 1, opt_.hidden, "mod router",
                                  "router.aux.weight (mode aux_predictor)");
    } else {
      MOEKIT_CHECK(aux_.empty(),
                   "mod router: router.aux.weight expected only with mode aux_predictor, got ",
                   aux_.size(), " values");
    }
  }

 public:

  [[nodiscard]] int64_t num_experts() const noexcept { return 1; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] const MoDOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& weight() const noexcept { return w_; }
  [[nodiscard]] const std::vector<float>& aux_weight() const noexcept { return aux_; }
  [[nodiscard]] const MoDAuxMlp& aux_mlp() const noexcept { return mlp_; }
  /// Router FLOPs per unpadded token.
  [[nodiscard]] double flops_per_token() const noexcept {
    const double d = static_cast<double>(opt_.hidden), h = static_cast<double>(opt_.aux_hidden);
    return 2.0 * d * (aux_.empty() ? 1.0 : 2.0) + 2.0 * h * (d + 1.0);
  }

  /// The weight on f(x_t) for router logit r.
  [[nodiscard]] float weight_of(float r) const noexcept {
    switch (opt_.activation) {
      case DepthActivation::raw:
        return r;
      case DepthActivation::sigmoid:
        return 1.0f / (1.0f + std::exp(-r));
      case DepthActivation::tanh:
        return static_cast<float>(opt_.alpha) * std::tanh(r);
    }
    return r;
  }

  /// Routes `hidden [T, d]`. After: `scratch.logits [T]` = r_t, `scratch.values [T]` = act(r_t)
  /// (0 for padding); in aux_predictor mode `scratch.buffer [T]` = the predictor logits.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens;
    MOEKIT_CHECK(T == 0 || hidden != nullptr,
                 "mod router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    detail::depth::scalar_logits(batch, hidden, w_, 1, scratch.logits, nt, "mod router",
                                 "router.weight");
    if (opt_.mode == MoDMode::aux_predictor && opt_.aux_hidden == 0)
      detail::depth::scalar_logits(batch, hidden, aux_, 1, scratch.buffer, nt, "mod router",
                                   "router.aux.weight");
    if (opt_.aux_hidden > 0) aux_mlp_logits(batch, hidden, scratch.buffer, scratch.values, nt);
    scratch.values.resize(static_cast<size_t>(T));
    scratch.index.resize(static_cast<size_t>(2 * T));
    int32_t* mask = scratch.index.data();
    for (int64_t t = 0; t < T; ++t) {
      const bool pad = batch.is_padding(t);
      scratch.values[static_cast<size_t>(t)] =
          pad ? 0.0f : weight_of(scratch.logits[static_cast<size_t>(t)]);
      mask[t] = 0;
    }
    if (opt_.mode == MoDMode::capacity) {
      detail::depth::select_top_per_sequence(
          batch, scratch.logits.data(), 1,
          [this](int64_t S) { return depth_capacity(opt_.ratio, S); }, mask, mask + T);
    } else {
      const double z = detail::depth::logit(opt_.threshold);
      const std::vector<float>& gate =
          opt_.mode == MoDMode::threshold ? scratch.logits : scratch.buffer;
      for (int64_t t = 0; t < T; ++t)
        mask[t] = !batch.is_padding(t) && static_cast<double>(gate[static_cast<size_t>(t)]) > z;
    }
    detail::depth::build_plan(T, mask, scratch.values, plan);
  }

 private:
  // The MLP predictor's logit per token into `out [T]` (0 for padding): h = W1 x (fixed order)
  // + b1, relu, then w2 . h + b2 summed in unit order. `hid` holds nt * h floats of scratch.
  void aux_mlp_logits(const Batch& batch, const float* hidden, std::vector<float>& out, std::vector<float>& hid,
                      int nt) const {
    const int64_t T = batch.tokens, d = opt_.hidden, h = opt_.aux_hidden;
    out.resize(static_cast<size_t>(T));
    hid.resize(static_cast<size_t>(h) * static_cast<size_t>(nt));
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T * h * d >= (int64_t{1} << 19))
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) {
        out[static_cast<size_t>(t)] = 0.0f;
        continue;
      }
      float* u = hid.data() + static_cast<int64_t>(omp_get_thread_num()) * h;
      kernels::matvec_rows(hidden + t * d, mlp_.w1.data(), h, d, u);
      float a = mlp_.b2[0];
      for (int64_t j = 0; j < h; ++j) a += mlp_.w2[static_cast<size_t>(j)] * std::max(0.0f, u[j] + mlp_.b1[static_cast<size_t>(j)]);
      out[static_cast<size_t>(t)] = a;
    }
    if (const int64_t i = kernels::first_non_finite(out.data(), T); i >= 0)
      detail::fail("mod router: aux predictor logit of token ", i, " expected finite, got ", out[static_cast<size_t>(i)],
                   " (NaN or Inf in hidden_states or router.aux.*, or an overflow)");
  }

  MoDOptions opt_;
  std::vector<float> w_;
  std::vector<float> aux_;
  MoDAuxMlp mlp_;
};

static_assert(Router<MoDRouter>);

// ================================================================== gamma-MoD

/// Which tokens gamma-MoD processes.
enum class GammaModPhase {
  capacity,  ///< must-keep tokens plus top-C by p per sequence, C = max(ceil(ratio * S), must-keep count)
  prefill,   ///< p_t > prefill_threshold (must-keep tokens too with must_keep_at_inference)
  decode,    ///< p_t > decode_threshold (must-keep tokens too with must_keep_at_inference)
};

/// Parameters of GammaModRouter (ROUTING.md section 5); field names are the JSON keys.
struct GammaModOptions {
  int64_t hidden = 0;  ///< d
  double ratio = 0.5;  ///< processed fraction per sequence (capacity phase)
  GammaModPhase phase = GammaModPhase::capacity;
  double prefill_threshold = 0.005;
  double decode_threshold = 0.5;
  /// The prefill / decode phases also process the must-keep tokens. The official code applies
  /// the must-keep mask in training only (false, the default); true keeps them at inference too.
  bool must_keep_at_inference = false;
  /// eps of the router's input RMSNorm (GammaModRouter::set_input_norm; HF LlamaConfig
  /// `rms_norm_eps`, default 1e-6).
  double rms_norm_eps = 1e-6;

  void validate() const {
    MOEKIT_CHECK(hidden >= 1, "gamma_mod router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(std::isfinite(rms_norm_eps) && rms_norm_eps > 0 && rms_norm_eps < 1,
                 "gamma_mod router: rms_norm_eps expected in (0, 1), got ", rms_norm_eps);
    MOEKIT_CHECK(std::isfinite(ratio) && ratio >= 0 && ratio <= 1,
                 "gamma_mod router: ratio expected in [0, 1], got ", ratio);
    MOEKIT_CHECK(phase == GammaModPhase::capacity || phase == GammaModPhase::prefill ||
                     phase == GammaModPhase::decode,
                 "gamma_mod router: phase expected capacity, prefill or decode, got ",
                 static_cast<int>(phase));
    MOEKIT_CHECK(prefill_threshold > 0 && prefill_threshold < 1,
                 "gamma_mod router: prefill_threshold expected in (0, 1), got ", prefill_threshold);
    MOEKIT_CHECK(decode_threshold > 0 && decode_threshold < 1,
                 "gamma_mod router: decode_threshold expected in (0, 1), got ", decode_threshold);
  }
};

/// gamma-MoD router (arXiv 2410.13859): two-class router `p_t = softmax(W_r x_t)[1]`
/// (`router.weight [2, d]`), weight p_t. Must-keep tokens (`Batch::token_types[t] != 0`, e.g.
/// text tokens among image tokens) are always processed in the capacity phase (training), the
/// rest of the capacity decides the others; the prefill / decode phases decide every token by
/// the threshold (must-keep tokens too only with must_keep_at_inference). Selection uses the margin
/// `z_t = L_t1 - L_t0` (`p_t = sigmoid(z_t)`, same order, no saturation ties).
class GammaModRouter {
 public:
  /// `weight [2, d]` (`router.weight`; row 1 is the "process" class).
  GammaModRouter(GammaModOptions options, std::vector<float> weight)
      : opt_(options), w_(std::move(weight)) {
    opt_.validate();
    detail::depth::check_weight(w_, 2, opt_.hidden, "gamma_mod router", "router.weight");
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return 1; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] const GammaModOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& weight() const noexcept { return w_; }
  [[nodiscard]] double flops_per_token() const noexcept {
    return 4.0 * static_cast<double>(opt_.hidden);
  }
  /// The official router reads the decoder layer's `input_layernorm(x)` (LLaMA's RMSNorm:
  /// `g * x / sqrt(mean(x^2) + eps)`, `g` = `input_layernorm.weight [d]`, eps =
  /// options().rms_norm_eps), not x: set g to route on it (the layer's input stays x). Computed
  /// as `W (g x) / sqrt(mean(x^2) + eps)` (the mean in double); empty g = none.
  void set_input_norm(std::vector<float> g) {
    if (g.empty()) {
      wn_.clear();
      return;
    }
    detail::depth::check_weight(g, 1, opt_.hidden, "gamma_mod router", "input_layernorm.weight");
    wn_ = w_;
    for (size_t r = 0; r < 2; ++r)
      for (size_t i = 0; i < g.size(); ++i) wn_[r * g.size() + i] *= g[i];
  }
  [[nodiscard]] bool has_input_norm() const noexcept { return !wn_.empty(); }

  /// Routes `hidden [T, d]`. After: `scratch.logits [T, 2]`, `scratch.values [T]` = p_t (0 for
  /// padding), `scratch.buffer [T]` = the margins z_t.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens;
    MOEKIT_CHECK(T == 0 || hidden != nullptr,
                 "gamma_mod router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    detail::depth::scalar_logits(batch, hidden, wn_.empty() ? w_ : wn_, 2, scratch.logits, nt, "gamma_mod router",
                                 "router.weight");
    if (!wn_.empty())  // RMSNorm's 1 / sqrt(mean(x^2) + eps) per token
      for (int64_t t = 0; t < T; ++t) {
        if (batch.is_padding(t)) continue;
        const float* x = hidden + t * opt_.hidden;
        double ss = 0.0;
        for (int64_t i = 0; i < opt_.hidden; ++i) ss += static_cast<double>(x[i]) * x[i];
        const auto inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(opt_.hidden) + opt_.rms_norm_eps));
        scratch.logits[static_cast<size_t>(2 * t)] *= inv;
        scratch.logits[static_cast<size_t>(2 * t + 1)] *= inv;
      }
    scratch.values.resize(static_cast<size_t>(T));
    scratch.buffer.resize(static_cast<size_t>(T));
    scratch.index.resize(static_cast<size_t>(2 * T));
    int32_t* mask = scratch.index.data();
    for (int64_t t = 0; t < T; ++t) {
      const bool pad = batch.is_padding(t);
      const float z = scratch.logits[static_cast<size_t>(2 * t + 1)] -
                      scratch.logits[static_cast<size_t>(2 * t)];
      scratch.buffer[static_cast<size_t>(t)] = z;
      scratch.values[static_cast<size_t>(t)] = pad ? 0.0f : 1.0f / (1.0f + std::exp(-z));
      // Must-keep tokens: always in the capacity phase, at inference only if asked.
      const bool keep = opt_.phase == GammaModPhase::capacity || opt_.must_keep_at_inference;
      mask[t] = keep && !pad && !batch.token_types.empty() && batch.token_types[static_cast<size_t>(t)] != 0;
    }
    if (opt_.phase == GammaModPhase::capacity) {
      detail::depth::select_top_per_sequence(
          batch, scratch.buffer.data(), 1,
          [this](int64_t S) { return depth_capacity(opt_.ratio, S); }, mask, mask + T);
    } else {
      const double zt = detail::depth::logit(
          opt_.phase == GammaModPhase::prefill ? opt_.prefill_threshold : opt_.decode_threshold);
      for (int64_t t = 0; t < T; ++t)
        if (!batch.is_padding(t) &&
            static_cast<double>(scratch.buffer[static_cast<size_t>(t)]) > zt)
          mask[t] = 1;
    }
    detail::depth::build_plan(T, mask, scratch.values, plan);
  }

 private:
  GammaModOptions opt_;
  std::vector<float> w_;
  std::vector<float> wn_;  // W with the input norm's g folded in ([2, d]); empty: no norm
};

static_assert(Router<GammaModRouter>);

// ================================================================== token-wise pruning

/// Parameters of TokenPruneRouter (ROUTING.md section 5); field names are the JSON keys.
/// What the token-pruning router reads.
enum class TokenPruneInput {
  hidden,    ///< `r_t = w . x_t` (`router.weight [1, d]`)
  features,  ///< FTP's four features through a small MLP (TokenPruneRouter::features)
};

struct TokenPruneOptions {
  int64_t hidden = 0;  ///< d
  double tau = 0.5;    ///< gate threshold on sigmoid(r) when no sparsity is given
  std::optional<double> sparsity =
      std::nullopt;  ///< target pruned fraction: top-C, C = ceil((1 - sparsity) * S)
  TokenPruneInput input = TokenPruneInput::hidden;
  int64_t feature_hidden = 64;  ///< features: the MLP's hidden width h
  /// features: the block's required sparsity, the fourth feature; unset = `sparsity`, else 0.
  std::optional<double> feature_sparsity = std::nullopt;

  void validate() const {
    MOEKIT_CHECK(hidden >= 1, "token_prune router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(tau > 0 && tau < 1, "token_prune router: tau expected in (0, 1), got ", tau);
    MOEKIT_CHECK(!sparsity || (std::isfinite(*sparsity) && *sparsity >= 0 && *sparsity <= 1),
                 "token_prune router: sparsity expected in [0, 1], got ", sparsity.value_or(0.0));
    MOEKIT_CHECK(input == TokenPruneInput::hidden || input == TokenPruneInput::features,
                 "token_prune router: input expected hidden or features, got ", static_cast<int>(input));
    MOEKIT_CHECK(feature_hidden >= 1 && feature_hidden <= (int64_t{1} << 20),
                 "token_prune router: feature_hidden expected in [1, 2^20], got ", feature_hidden);
    MOEKIT_CHECK(!feature_sparsity ||
                     (std::isfinite(*feature_sparsity) && *feature_sparsity >= 0 && *feature_sparsity <= 1),
                 "token_prune router: feature_sparsity expected in [0, 1], got ", feature_sparsity.value_or(0.0));
  }
  /// The fourth feature's value.
  [[nodiscard]] double block_sparsity() const noexcept { return feature_sparsity.value_or(sparsity.value_or(0.0)); }
};

/// Token-wise pruning router (FTP, arXiv 2412.11494): `r_t = w . x_t` (`router.weight [1, d]`);
/// a token runs the block iff `sigmoid(r_t) > tau`, or, with a target sparsity, iff it is among
/// the top `ceil((1 - sparsity) * S)` of its sequence by r (ties: lower index). The weight is
/// always 1 (a hard gate: a processed token gets the block's full delta).
///
/// With `input` features (FTP's router, which reads four low-dimensional features instead of
/// the hidden state), per unpadded token t of a sequence with S unpadded tokens, i its index
/// among them and a_t = Batch::token_scores[t] (the attention the token receives, computed by
/// the engine):
///
///     f = [ i / max(S - 1, 1),                       position
///           a_t,                                      attention score
///           rank_t / max(S - 1, 1),                   rank of a_t in the sequence (0 = highest;
///                                                     ties to the lower index)
///           block_sparsity() ]                        the block's required sparsity
///     r_t = w2 . relu(W1 f + b1) + b2                 (`router.mlp.0.weight [h, 4]`, `.0.bias [h]`,
///                                                     `.2.weight [1, h]`, `.2.bias [1]`)
///
/// then the same decision. FTP's code and weights are not public: the feature formulas,
/// their order and the tensor names are moekit's reading of the paper (docs/routers.md). The
/// features look at the whole sequence (a prefill-time router).
class TokenPruneRouter {
 public:
  TokenPruneRouter(TokenPruneOptions options, std::vector<float> weight)
      : opt_(options), w_(std::move(weight)) {
    opt_.validate();
    MOEKIT_CHECK(opt_.input == TokenPruneInput::hidden, "token_prune router: input features needs the MLP's "
                 "weights (the five-argument constructor)");
    detail::depth::check_weight(w_, 1, opt_.hidden, "token_prune router", "router.weight");
  }
  /// The feature router (`input` features): `w1 [h, 4]`, `b1 [h]`, `w2 [1, h]`, `b2 [1]`.
  TokenPruneRouter(TokenPruneOptions options, std::vector<float> w1, std::vector<float> b1, std::vector<float> w2,
                   std::vector<float> b2)
      : opt_(options), w1_(std::move(w1)), b1_(std::move(b1)), w2_(std::move(w2)), b2_(std::move(b2)) {
    opt_.validate();
    MOEKIT_CHECK(opt_.input == TokenPruneInput::features,
                 "token_prune router: the MLP's weights expected with input features");
    const int64_t h = opt_.feature_hidden;
    detail::depth::check_weight(w1_, h, 4, "token_prune router", "router.mlp.0.weight");
    detail::depth::check_weight(b1_, 1, h, "token_prune router", "router.mlp.0.bias");
    detail::depth::check_weight(w2_, 1, h, "token_prune router", "router.mlp.2.weight");
    detail::depth::check_weight(b2_, 1, 1, "token_prune router", "router.mlp.2.bias");
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return 1; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] const TokenPruneOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& weight() const noexcept { return w_; }
  [[nodiscard]] double flops_per_token() const noexcept {
    return opt_.input == TokenPruneInput::features ? 10.0 * static_cast<double>(opt_.feature_hidden)
                                                   : 2.0 * static_cast<double>(opt_.hidden);
  }

  /// Routes `hidden [T, d]`. After: `scratch.logits [T]` = r_t, `scratch.values [T]` = 1 (0 for
  /// padding).
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens;
    MOEKIT_CHECK(T == 0 || hidden != nullptr,
                 "token_prune router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    scratch.index.resize(static_cast<size_t>(2 * T));
    if (opt_.input == TokenPruneInput::features) {
      feature_logits(batch, scratch);
    } else {
      detail::depth::scalar_logits(batch, hidden, w_, 1, scratch.logits, nt, "token_prune router", "router.weight");
    }
    scratch.values.resize(static_cast<size_t>(T));
    int32_t* mask = scratch.index.data();
    for (int64_t t = 0; t < T; ++t) {
      scratch.values[static_cast<size_t>(t)] = batch.is_padding(t) ? 0.0f : 1.0f;
      mask[t] = 0;
    }
    if (opt_.sparsity) {
      const double keep = 1.0 - *opt_.sparsity;
      detail::depth::select_top_per_sequence(
          batch, scratch.logits.data(), 1, [keep](int64_t S) { return depth_capacity(keep, S); },
          mask, mask + T);
    } else {
      const double z = detail::depth::logit(opt_.tau);
      for (int64_t t = 0; t < T; ++t)
        mask[t] =
            !batch.is_padding(t) && static_cast<double>(scratch.logits[static_cast<size_t>(t)]) > z;
    }
    detail::depth::build_plan(T, mask, scratch.values, plan);
  }

 private:
  // FTP's features and MLP, per sequence (serial: decisions never depend on the thread count).
  void feature_logits(const Batch& batch, RouterScratch& scratch) const {
    const int64_t T = batch.tokens, h = opt_.feature_hidden;
    MOEKIT_CHECK(static_cast<int64_t>(batch.token_scores.size()) == T, "token_prune router: input features needs "
                 "Batch::token_scores (the `token_scores` input tensor) [", T, "], got ", batch.token_scores.size(),
                 " values");
    scratch.logits.assign(static_cast<size_t>(T), 0.0f);
    int32_t* order = scratch.index.data();      // the sequence's unpadded tokens
    int32_t* by_score = scratch.index.data() + T;  // their indices i, by score (descending)
    const auto& score = batch.token_scores;
    for (int64_t s = 0; s < batch.num_sequences(); ++s) {
      int64_t S = 0;
      for (int64_t t = batch.sequence_begin(s); t < batch.sequence_end(s); ++t)
        if (!batch.is_padding(t)) order[S++] = static_cast<int32_t>(t);
      for (int64_t i = 0; i < S; ++i) by_score[i] = static_cast<int32_t>(i);
      std::sort(by_score, by_score + S, [&](int32_t a, int32_t b) {
        const float x = score[static_cast<size_t>(order[a])], y = score[static_cast<size_t>(order[b])];
        return x > y || (x == y && a < b);
      });
      // rank_t = the place of token i in by_score: kept in the logits slot until overwritten
      for (int64_t r = 0; r < S; ++r) scratch.logits[static_cast<size_t>(order[by_score[r]])] = static_cast<float>(r);
      const double span = static_cast<double>(std::max<int64_t>(S - 1, 1));
      for (int64_t i = 0; i < S; ++i) {
        const int64_t t = order[i];
        const float f[4] = {static_cast<float>(static_cast<double>(i) / span), score[static_cast<size_t>(t)],
                            static_cast<float>(static_cast<double>(scratch.logits[static_cast<size_t>(t)]) / span),
                            static_cast<float>(opt_.block_sparsity())};
        float z = b2_[0];
        for (int64_t u = 0; u < h; ++u) {
          float v = b1_[static_cast<size_t>(u)];
          for (int c = 0; c < 4; ++c) v += w1_[static_cast<size_t>(u * 4 + c)] * f[c];
          z += w2_[static_cast<size_t>(u)] * std::max(v, 0.0f);
        }
        MOEKIT_CHECK(std::isfinite(z), "token_prune router: feature logit of token ", t, " expected finite, got ", z);
        scratch.logits[static_cast<size_t>(t)] = z;
      }
    }
  }

  TokenPruneOptions opt_;
  std::vector<float> w_;
  std::vector<float> w1_, b1_, w2_, b2_;  // features: the MLP
};

static_assert(Router<TokenPruneRouter>);

// ARank (gamma-MoD's layer-selection tool) lives in moekit/tools/arank.hpp.

}  // namespace moekit
#pragma GCC visibility pop
