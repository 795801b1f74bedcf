// SPDX-License-Identifier: Apache-2.0
// Heterogeneous experts (MoHETS, "Long-term Time Series Forecasting with
// Mixture-of-Heterogeneous-Experts", Ortigossa, Lutsker and Segal, arXiv 2601.21866; official
// code evortigosa/mohe_forecast `mohe_forecast/model/MoHE.py`, commit 2a835819):
//  - FanExpertBank: routed Fourier experts, two FAN layers ("Fourier Analysis Networks",
//    arXiv 2410.02675) per token: `fan(h) = [cos(W_p h), sin(W_p h), gelu(W_q h)]`, d -> f -> d;
//  - DwConvExpert: the shared expert over the token axis of each sequence: a depthwise
//    convolution of kernel 3 with zero "same" padding (not causal), then `down gelu(pw z)`;
//  - MoheLayer: `y_t = sum_topk w E_i(x_t) + sigmoid(g . x_t) S(X)_t`, the routed experts
//    through any SparseLayer and the shared convolution expert gated per token.
// GELU is the exact (erf) one. PairBank (experts/bank_views.hpp) puts FAN experts beside FFN
// experts in one bank.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moekit/activation.hpp"
#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/layer.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// E routed FAN experts `d -> f -> d` (d and f multiples of 4). Expert e, per row x:
/// `h = [cos(P1 x), sin(P1 x), gelu(Q1 x)]` (P1 `[f/4, d]`, Q1 `[f/2, d]`: width f), then
/// `y = [cos(P2 h), sin(P2 h), gelu(Q2 h)]` (P2 `[d/4, f]`, Q2 `[d/2, f]`: width d). The
/// official weights: `experts.<e>.up_fan.Wp` = P1, `up_fan.Wp_bar` = Q1, `down_fan.Wp` = P2,
/// `down_fan.Wp_bar` = Q2 (no biases: MoHE's default).
class FanExpertBank {
 public:
  FanExpertBank(int64_t num_experts, int64_t hidden, int64_t intermediate, std::vector<float> up_p,
                std::vector<float> up_q, std::vector<float> down_p, std::vector<float> down_q)
      : E_(num_experts), d_(hidden), f_(intermediate), p1_(std::move(up_p)), q1_(std::move(up_q)),
        p2_(std::move(down_p)), q2_(std::move(down_q)) {
    MOEKIT_CHECK(E_ >= 1 && d_ >= 4 && f_ >= 4 && d_ % 4 == 0 && f_ % 4 == 0, "FanExpertBank: experts >= 1 and hidden and "
                 "intermediate sizes multiples of 4 (>= 4) expected, got ", E_, ", ", d_, ", ", f_);
    MOEKIT_CHECK(static_cast<double>(E_) * static_cast<double>(d_) * static_cast<double>(f_) < 0x1p40,
                 "FanExpertBank: E d f expected < 2^40, got ", E_, " x ", d_, " x ", f_);
    detail::check_weight(p1_, "FanExpertBank", "up_fan.Wp", static_cast<size_t>(E_ * f_ / 4), static_cast<size_t>(d_));
    detail::check_weight(q1_, "FanExpertBank", "up_fan.Wp_bar", static_cast<size_t>(E_ * f_ / 2), static_cast<size_t>(d_));
    detail::check_weight(p2_, "FanExpertBank", "down_fan.Wp", static_cast<size_t>(E_ * d_ / 4), static_cast<size_t>(f_));
    detail::check_weight(q2_, "FanExpertBank", "down_fan.Wp_bar", static_cast<size_t>(E_ * d_ / 2), static_cast<size_t>(f_));
  }
  [[nodiscard]] int64_t num_experts() const noexcept { return E_; }
  [[nodiscard]] int64_t d_in() const noexcept { return d_; }
  [[nodiscard]] int64_t d_out() const noexcept { return d_; }
  [[nodiscard]] size_t scratch_floats(int64_t) const noexcept { return static_cast<size_t>(f_); }
  [[nodiscard]] double flops_per_row() const noexcept { return 2.0 * 0.75 * 2.0 * static_cast<double>(d_ * f_); }
  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const noexcept {
    const float* P1 = p1_.data() + e * (f_ / 4) * d_;
    const float* Q1 = q1_.data() + e * (f_ / 2) * d_;
    const float* P2 = p2_.data() + e * (d_ / 4) * f_;
    const float* Q2 = q2_.data() + e * (d_ / 2) * f_;
    for (int64_t r = 0; r < rows; ++r) {
      fan(P1, Q1, f_, d_, in + r * d_, scratch);
      fan(P2, Q2, d_, f_, scratch, out + r * d_);
    }
  }

 private:
  // out [n] = [cos(P x), sin(P x), gelu(Q x)] with P [n/4, m], Q [n/2, m].
  static void fan(const float* P, const float* Q, int64_t n, int64_t m, const float* x, float* out) noexcept {
    const int64_t a = n / 4;
    kernels::matvec_rows(x, P, a, m, out);
    kernels::matvec_rows(x, Q, n / 2, m, out + 2 * a);
    for (int64_t i = 0; i < a; ++i) {
      const float p = out[i];
      out[i] = std::cos(p);
      out[a + i] = std::sin(p);
    }
    for (int64_t i = 2 * a; i < n; ++i) out[i] = activate(Activation::gelu, out[i]);
  }

  int64_t E_, d_, f_;
  std::vector<float> p1_, q1_, p2_, q2_;
};

/// MoHE's shared expert over the token axis: per sequence of the batch (padded rows read as
/// zeros), `z[t, c] = w[c, 0] x[t - 1, c] + w[c, 1] x[t, c] + w[c, 2] x[t + 1, c]` (zero
/// outside the sequence), then `S_t = down gelu(pw z_t)`. Weights: `dw [d, 3]`
/// (`shared_expert.dw_conv.weight [d, 1, 3]`), `pw [f, d]`, `down [d, f]` (the pointwise
/// convolutions' `[out, in, 1]`).
class DwConvExpert {
 public:
  DwConvExpert(int64_t hidden, int64_t intermediate, std::vector<float> dw, std::vector<float> pw,
               std::vector<float> down)
      : d_(hidden), f_(intermediate), dw_(std::move(dw)), pw_(std::move(pw)), down_(std::move(down)) {
    MOEKIT_CHECK(d_ >= 1 && f_ >= 1 && static_cast<double>(d_) * static_cast<double>(f_) < 0x1p40,
                 "DwConvExpert: hidden and intermediate sizes expected >= 1 with d f < 2^40, got ", d_, ", ", f_);
    detail::check_weight(dw_, "DwConvExpert", "dw_conv.weight", static_cast<size_t>(d_), 3);
    detail::check_weight(pw_, "DwConvExpert", "pw_conv.weight", static_cast<size_t>(f_), static_cast<size_t>(d_));
    detail::check_weight(down_, "DwConvExpert", "down_conv.weight", static_cast<size_t>(d_), static_cast<size_t>(f_));
  }
  [[nodiscard]] int64_t hidden_size() const noexcept { return d_; }
  [[nodiscard]] int64_t intermediate_size() const noexcept { return f_; }
  /// Floats of scratch per thread.
  [[nodiscard]] size_t scratch_floats() const noexcept { return static_cast<size_t>(d_ + f_); }

  /// `S [T, d]` for one token t of the batch (its sequence's neighbours read from x).
  void token(const Batch& batch, int64_t seq_begin, int64_t seq_end, const float* x, int64_t t, float* s,
             float* scratch) const noexcept {
    float* z = scratch;
    float* u = z + d_;
    auto row = [&](int64_t i) -> const float* {
      return i < seq_begin || i >= seq_end || batch.is_padding(i) ? nullptr : x + i * d_;
    };
    const float *prev = row(t - 1), *cur = row(t), *next = row(t + 1);
    for (int64_t c = 0; c < d_; ++c) {
      // Kernel order as PyTorch's conv1d: w0 x[t-1] + w1 x[t] + w2 x[t+1], one rounding each.
      float acc = 0.0f;
      if (prev != nullptr) acc += dw_[static_cast<size_t>(c * 3)] * prev[c];
      if (cur != nullptr) acc += dw_[static_cast<size_t>(c * 3 + 1)] * cur[c];
      if (next != nullptr) acc += dw_[static_cast<size_t>(c * 3 + 2)] * next[c];
      z[c] = acc;
    }
    kernels::matvec_rows(z, pw_.data(), f_, d_, u);
    for (int64_t i = 0; i < f_; ++i) u[i] = activate(Activation::gelu, u[i]);
    kernels::matvec_rows(u, down_.data(), d_, f_, s);
  }

 private:
  int64_t d_, f_;
  std::vector<float> dw_, pw_, down_;
};

/// MoHE: routed experts through `routed` (MoHE's: a TopKRouter with softmax and
/// norm_topk_prob over a FanExpertBank) plus the shared convolution expert gated per token by
/// `sigmoid(gate . x_t)` (`shared_gating.weight [1, d]`):
/// `y_t = routed(x)_t + sigmoid(gate . x_t) S(X)_t`; padded tokens get the routed layer's
/// output alone. x is the block's normalised input (MoHE applies RMSNorm before the layer).
template <Router R, ExpertBank B>
class MoheLayer {
 public:
  MoheLayer(SparseLayer<R, B> routed, DwConvExpert shared, std::vector<float> gate)
      : routed_(std::move(routed)), shared_(std::move(shared)), gate_(std::move(gate)) {
    MOEKIT_CHECK(shared_.hidden_size() == routed_.hidden_size(), "MoheLayer: shared expert hidden size expected ",
                 routed_.hidden_size(), ", got ", shared_.hidden_size());
    detail::check_weight(gate_, "MoheLayer", "shared_gating.weight", 1, static_cast<size_t>(routed_.hidden_size()));
  }
  [[nodiscard]] int64_t hidden_size() const noexcept { return routed_.hidden_size(); }
  [[nodiscard]] const SparseLayer<R, B>& routed() const noexcept { return routed_; }

  /// out `[T, d]` (must not overlap x); ws.plan holds the routing afterwards. Results do not
  /// depend on the thread count.
  void forward(const Batch& batch, const float* x, float* out, Workspace& ws, int threads = 0) const {
    const int64_t T = batch.tokens, d = hidden_size();
    MOEKIT_CHECK(T == 0 || (x != nullptr && out != nullptr), "MoheLayer::forward: null pointer for T = ", T);
    MOEKIT_CHECK(detail::apart(out, static_cast<size_t>(T * d), x, static_cast<size_t>(T * d)),
                 "MoheLayer::forward: out expected not to overlap x");
    routed_.forward(batch, x, out, ws, threads);  // validates the batch and x
    if (T == 0) return;
    const int nt = detail::resolve_threads(threads);
    const size_t per = shared_.scratch_floats() + static_cast<size_t>(d);
    if (ws.aux.size() < static_cast<size_t>(nt) * per) ws.aux.resize(static_cast<size_t>(nt) * per);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;
      float* sc = ws.aux.data() + static_cast<size_t>(omp_get_thread_num()) * per;
      float* s = sc + shared_.scratch_floats();
      int64_t b = 0, e = T;  // t's sequence
      if (!batch.sequence_offsets.empty()) {
        const auto& so = batch.sequence_offsets;
        const auto it = std::upper_bound(so.begin(), so.end(), static_cast<int32_t>(t));
        b = *(it - 1);
        e = *it;
      }
      shared_.token(batch, b, e, x, t, s, sc);
      const float g = 1.0f / (1.0f + std::exp(-kernels::dot(gate_.data(), x + t * d, d)));
      kernels::axpy_row(g, s, out + t * d, d);
    }
    // The sum checked as the routed layer checks its own output (its policy: throw, or count).
    if (!routed_.check_finite()) return;
    int64_t bad = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;
      const int64_t j = kernels::first_non_finite(out + t * d, d);
      if (j < 0) continue;
      if (routed_.non_finite_output() == NonFiniteOutput::error)
        detail::fail("MoheLayer::forward: out[", t, ", ", j, "] is ", out[t * d + j],
                     " although the input is finite: the shared expert or the sum overflowed f32");
      ++bad;
    }
    ws.non_finite_rows = bad;
  }

 private:
  SparseLayer<R, B> routed_;
  DwConvExpert shared_;
  std::vector<float> gate_;
};

}  // namespace moekit
#pragma GCC visibility pop
