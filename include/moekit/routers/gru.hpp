// SPDX-License-Identifier: Apache-2.0
// Layerwise recurrent router (RMoE, Qiu et al. arXiv 2408.06793): one GRU cell shared by all
// MoE layers carries a router state over depth; each layer projects its input, steps the
// cell and routes on the new state with the Mixtral rule (ROUTING.md section 4).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"

namespace moekit {

/// The recurrent cell of the router (JSON `variant`).
enum class GruVariant {
  gru,  ///< torch.nn.GRUCell: gates r, z, n
  rnn,  ///< torch.nn.RNNCell with tanh: `h = tanh(W_in x + b_in + W_hn h_prev + b_hn)`
};

/// The recurrent cell shared by every MoE layer's GruRouter (hold it in a
/// `std::shared_ptr<const GruCell>`). Input and state are both `[d_r]`. Weights in
/// torch.nn.GRUCell layout: `weight_ih`, `weight_hh [G d_r, d_r]`, `bias_ih`, `bias_hh
/// [G d_r]`, G = 3 gate blocks in the order r, z, n for `gru`, G = 1 for `rnn`. Immutable
/// after construction, so any number of routers may step it concurrently.
class GruCell {
 public:
  GruCell(GruVariant variant, int64_t d_r, std::vector<float> weight_ih, std::vector<float> weight_hh,
          std::vector<float> bias_ih, std::vector<float> bias_hh)
      : variant_(variant),
        d_r_(d_r),
        weight_ih_(std::move(weight_ih)),
        weight_hh_(std::move(weight_hh)),
        bias_ih_(std::move(bias_ih)),
        bias_hh_(std::move(bias_hh)) {
    MOEKIT_CHECK(variant_ == GruVariant::gru || variant_ == GruVariant::rnn,
                 "gru cell: variant expected gru or rnn, got ", static_cast<int>(variant_));
    MOEKIT_CHECK(d_r_ >= 1, "gru cell: d_r expected >= 1, got ", d_r_);
    const auto rows = static_cast<size_t>(gates() * d_r_), n = static_cast<size_t>(d_r_);
    check_tensor("router.gru.weight_ih", weight_ih_, rows, n);
    check_tensor("router.gru.weight_hh", weight_hh_, rows, n);
    check_tensor("router.gru.bias_ih", bias_ih_, rows, 1);
    check_tensor("router.gru.bias_hh", bias_hh_, rows, 1);
  }

  [[nodiscard]] GruVariant variant() const noexcept { return variant_; }
  /// d_r: width of the cell's input and of the router state.
  [[nodiscard]] int64_t state_size() const noexcept { return d_r_; }
  /// Gate blocks G: 3 (r, z, n) for gru, 1 for rnn.
  [[nodiscard]] int64_t gates() const noexcept { return variant_ == GruVariant::gru ? 3 : 1; }
  [[nodiscard]] const std::vector<float>& weight_ih() const noexcept { return weight_ih_; }
  [[nodiscard]] const std::vector<float>& weight_hh() const noexcept { return weight_hh_; }
  [[nodiscard]] const std::vector<float>& bias_ih() const noexcept { return bias_ih_; }
  [[nodiscard]] const std::vector<float>& bias_hh() const noexcept { return bias_hh_; }

  /// Floats of scratch one step() needs.
  [[nodiscard]] size_t scratch_floats() const noexcept { return static_cast<size_t>(2 * gates() * d_r_); }
  /// FLOPs of one step (the two matrix-vector products; the gates' pointwise work ignored).
  [[nodiscard]] double flops_per_step() const noexcept {
    return 4.0 * static_cast<double>(gates()) * static_cast<double>(d_r_) * static_cast<double>(d_r_);
  }

  /// One step for one token: `h [d_r]` from input `x [d_r]` and `h_prev [d_r]` (null means
  /// zeros; the result is bitwise the one of an explicit zero row). `h` may alias `h_prev`.
  /// fp32 with the fixed summation order of kernels::matvec_rows.
  void step(const float* x, const float* h_prev, float* h, float* scratch) const noexcept {
    const int64_t n = d_r_, G = gates();
    float* gi = scratch;          // [G d_r]: W_ih x + b_ih
    float* gh = scratch + G * n;  // [G d_r]: W_hh h_prev + b_hh
    kernels::matvec_rows(x, weight_ih_.data(), G * n, n, gi);
    if (h_prev != nullptr) {
      kernels::matvec_rows(h_prev, weight_hh_.data(), G * n, n, gh);
    } else {
      std::fill(gh, gh + G * n, 0.0f);  // what matvec_rows gives for a zero row: +0
    }
    for (int64_t i = 0; i < G * n; ++i) {
      gi[i] += bias_ih_[static_cast<size_t>(i)];
      gh[i] += bias_hh_[static_cast<size_t>(i)];
    }
    if (variant_ == GruVariant::rnn) {
      for (int64_t i = 0; i < n; ++i) h[i] = std::tanh(gi[i] + gh[i]);
      return;
    }
    for (int64_t i = 0; i < n; ++i) {
      const float r = sigmoid(gi[i] + gh[i]);
      const float z = sigmoid(gi[n + i] + gh[n + i]);
      const float c = std::tanh(gi[2 * n + i] + r * gh[2 * n + i]);
      const float hp = h_prev != nullptr ? h_prev[i] : 0.0f;
      h[i] = (1.0f - z) * c + z * hp;  // h may alias h_prev: element i is read before written
    }
  }

 private:
  static float sigmoid(float v) noexcept { return 1.0f / (1.0f + std::exp(-v)); }

  static void check_tensor(const char* name, const std::vector<float>& w, size_t rows, size_t cols) {
    if (cols == 1) {
      MOEKIT_CHECK(w.size() == rows, "gru cell: ", name, " expected [", rows, "] values, got ", w.size());
    } else {
      MOEKIT_CHECK(w.size() == rows * cols, "gru cell: ", name, " expected [", rows, ", ", cols, "] = ",
                   rows * cols, " values, got ", w.size());
    }
    for (size_t i = 0; i < w.size(); ++i) {
      if (std::isfinite(w[i])) continue;
      if (cols == 1) detail::fail("gru cell: ", name, "[", i, "] expected finite, got ", w[i]);
      detail::fail("gru cell: ", name, "[", i / cols, ", ", i % cols, "] expected finite, got ", w[i]);
    }
  }

  GruVariant variant_;
  int64_t d_r_;
  std::vector<float> weight_ih_;
  std::vector<float> weight_hh_;
  std::vector<float> bias_ih_;
  std::vector<float> bias_hh_;
};

/// Parameters of the recurrent router (ROUTING.md section 4); field names are the JSON keys
/// of `{"router": {"type": "gru", ...}}` (`hidden` comes from the top-level `hidden_size`).
struct GruRouterOptions {
  int64_t num_experts = 0;               ///< E
  int64_t k = 0;                         ///< experts per token
  int64_t hidden = 0;                    ///< d
  int64_t d_r = 256;                     ///< router state width
  GruVariant variant = GruVariant::gru;  ///< the shared cell's kind

  /// Throws moekit::error naming the first invalid parameter.
  void validate() const {
    MOEKIT_CHECK(num_experts >= 1, "gru router: num_experts (E) expected >= 1, got ", num_experts);
    MOEKIT_CHECK(k >= 1 && k <= num_experts, "gru router: k expected in [1, E = ", num_experts, "], got ", k);
    MOEKIT_CHECK(hidden >= 1, "gru router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(d_r >= 1, "gru router: d_r expected >= 1, got ", d_r);
    MOEKIT_CHECK(variant == GruVariant::gru || variant == GruVariant::rnn,
                 "gru router: variant expected gru or rnn, got ", static_cast<int>(variant));
  }
};

/// One MoE layer's recurrent router: `x = W1 X_t` (`router.proj.weight [d_r, d]`), one step
/// of the shared cell from `batch.router_state` (zeros when empty) to the new state `h`,
/// logits `L = W2 h` (`router.out.weight [E, d_r]`), then softmax, top-k (ties to the lower
/// expert id) and renormalisation of the k weights. The new state `[T, d_r]` is left in
/// `RouterScratch::state`; the caller passes it on as the next layer's `batch.router_state`.
/// Padded tokens get no slot and keep their state unchanged (zeros when the input state is
/// empty). Const and thread-safe; the cell is shared read-only.
class GruRouter {
 public:
  GruRouter(GruRouterOptions options, std::shared_ptr<const GruCell> cell, std::vector<float> proj_weight,
            std::vector<float> out_weight)
      : opt_(options), cell_(std::move(cell)), proj_(std::move(proj_weight)), topk_(make_topk(opt_, out_weight)) {
    MOEKIT_CHECK(cell_ != nullptr, "gru router: cell expected a GruCell, got null");
    MOEKIT_CHECK(cell_->state_size() == opt_.d_r, "gru router: cell state size expected d_r = ", opt_.d_r,
                 ", got ", cell_->state_size());
    MOEKIT_CHECK(cell_->variant() == opt_.variant, "gru router: cell variant expected ",
                 variant_name(opt_.variant), ", got ", variant_name(cell_->variant()));
    const auto d = static_cast<size_t>(opt_.hidden), dr = static_cast<size_t>(opt_.d_r);
    MOEKIT_CHECK(proj_.size() == dr * d, "gru router: router.proj.weight expected [", dr, ", ", d, "] = ", dr * d,
                 " values, got ", proj_.size());
    for (size_t i = 0; i < proj_.size(); ++i)
      MOEKIT_CHECK(std::isfinite(proj_[i]), "gru router: router.proj.weight[", i / d, ", ", i % d,
                   "] expected finite, got ", proj_[i]);
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return opt_.num_experts; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] int64_t k() const noexcept { return opt_.k; }
  /// d_r: width of `batch.router_state` and of `RouterScratch::state`.
  [[nodiscard]] int64_t state_size() const noexcept { return opt_.d_r; }
  [[nodiscard]] const GruRouterOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::shared_ptr<const GruCell>& cell() const noexcept { return cell_; }
  /// `router.proj.weight [d_r, d]`.
  [[nodiscard]] const std::vector<float>& proj_weight() const noexcept { return proj_; }
  /// `router.out.weight [E, d_r]`.
  [[nodiscard]] const std::vector<float>& out_weight() const noexcept { return topk_.weight(); }

  /// Router FLOPs per routed token (projection, cell step, output logits).
  [[nodiscard]] double flops_per_token() const noexcept {
    const auto d = static_cast<double>(opt_.hidden), dr = static_cast<double>(opt_.d_r);
    return 2.0 * dr * d + cell_->flops_per_step() + 2.0 * static_cast<double>(opt_.num_experts) * dr;
  }

  /// Routes `hidden [T, d]` into `plan` (finalised) and writes the new state `[T, d_r]` to
  /// `scratch.state` (`scratch.logits` holds the `[T, E]` logits). `batch.router_state` may
  /// be `scratch.state` itself (in-place threading). Throws moekit::error for a wrong
  /// router_state size or a non-finite router input, projection or state.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, d = opt_.hidden, dr = opt_.d_r;
    MOEKIT_CHECK(T == 0 || hidden != nullptr, "gru router: hidden states pointer is null for T = ", T);
    const std::span<const float> prev = batch.router_state;
    MOEKIT_CHECK(prev.empty() || static_cast<int64_t>(prev.size()) == T * dr,
                 "gru router: Batch.router_state expected [T, d_r] = [", T, ", ", dr, "] = ", T * dr,
                 " values (or empty for zeros), got ", prev.size());
    for (size_t i = 0; i < prev.size(); ++i)
      MOEKIT_CHECK(std::isfinite(prev[i]), "gru router: Batch.router_state[", i / static_cast<size_t>(dr), ", ",
                   i % static_cast<size_t>(dr), "] expected finite, got ", prev[i]);

    const int nt = detail::resolve_threads(threads);
    const size_t per_thread = static_cast<size_t>(dr) + cell_->scratch_floats();
    // Same size as `prev` when that is the old state: no reallocation, in-place stays valid.
    scratch.state.resize(static_cast<size_t>(T * dr));
    if (scratch.buffer.size() < per_thread * static_cast<size_t>(nt)) scratch.buffer.resize(per_thread * static_cast<size_t>(nt));
    if (scratch.index.size() < static_cast<size_t>(T)) scratch.index.resize(static_cast<size_t>(T));
    int32_t* bad = scratch.index.data();  // per token: 0 ok, 1 non-finite projection

    // Projection and cell step, one token per iteration (thread-count independent).
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* h = scratch.state.data() + t * dr;
      const float* hp = prev.empty() ? nullptr : prev.data() + t * dr;
      bad[t] = 0;
      if (batch.is_padding(t)) {  // state passes through unchanged
        if (hp == nullptr) kernels::zero_row(h, dr);
        else if (hp != h) kernels::copy_row(hp, h, dr);
        continue;
      }
      float* x = scratch.buffer.data() + per_thread * static_cast<size_t>(omp_get_thread_num());
      kernels::matvec_rows(hidden + t * d, proj_.data(), dr, d, x);
      for (int64_t i = 0; i < dr; ++i)
        if (!std::isfinite(x[i])) bad[t] = 1;
      if (bad[t] == 0) cell_->step(x, hp, h, x + dr);
    }
    for (int64_t t = 0; t < T; ++t)
      MOEKIT_CHECK(bad[t] == 0, "gru router: projection router.proj.weight x hidden_states of token ", t,
                   " expected finite, got NaN or Inf (NaN or Inf in hidden_states, or overflow)");

    // Logits L = W2 h, softmax, top-k, renormalise: the top-k router run on the states.
    Batch on_state = batch;
    on_state.hidden = dr;
    on_state.router_state = {};
    topk_.route(on_state, scratch.state.data(), plan, scratch, threads);
  }

  static const char* variant_name(GruVariant v) noexcept { return v == GruVariant::gru ? "gru" : "rnn"; }

 private:
  static TopKRouter make_topk(const GruRouterOptions& o, std::vector<float>& w) {
    o.validate();
    const auto E = static_cast<size_t>(o.num_experts), dr = static_cast<size_t>(o.d_r);
    MOEKIT_CHECK(w.size() == E * dr, "gru router: router.out.weight expected [", E, ", ", dr, "] = ", E * dr,
                 " values, got ", w.size());
    for (size_t i = 0; i < w.size(); ++i)
      MOEKIT_CHECK(std::isfinite(w[i]), "gru router: router.out.weight[", i / dr, ", ", i % dr,
                   "] expected finite, got ", w[i]);
    TopKOptions t;
    t.num_experts = o.num_experts;
    t.k = o.k;
    t.hidden = o.d_r;
    t.score_func = ScoreFunc::softmax;
    t.norm_topk_prob = true;  // the Mixtral rule
    return TopKRouter(t, std::move(w));
  }

  GruRouterOptions opt_;
  std::shared_ptr<const GruCell> cell_;
  std::vector<float> proj_;
  TopKRouter topk_;  ///< E x d_r output layer with the Mixtral rule
};

static_assert(Router<GruRouter>);

}  // namespace moekit
