// SPDX-License-Identifier: Apache-2.0
// Product-key routing over n^2 atomic experts (ROUTING.md section 7): PEER ("Mixture of A
// Million Experts", He, arXiv 2407.04202) and OmniMoE-style product keys (the product-key
// memory of Lample et al., arXiv 1907.05242). Two sub-routers over n keys each score a token's
// two axes; expert (i, j) = i n + j scores log p_x(i) + log p_y(j). The exact top-k needs only
// the top-k of each axis and the top-k of their k^2 sums: O(n d + k^2) per token, not O(n^2).
// AtomicExpertBank holds the one-neuron experts `y = act(u_e . x) v_e`.
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
#include "moekit/router.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Parameters of ProductKeyRouter; field name = JSON key.
struct ProductKeyOptions {
  int64_t num_experts = 0;  ///< E = n^2 (n = sub-keys per axis)
  int64_t k = 0;            ///< experts per token, in [1, E]
  int64_t hidden = 0;       ///< d
  /// PEER splits the query: axis x reads x[0, d/2), axis y x[d/2, d) (d even). Otherwise
  /// both axes read all of x.
  bool split_query = false;

  /// n = sqrt(E).
  [[nodiscard]] int64_t side() const noexcept {
    auto n = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(num_experts))));
    while (n * n > num_experts) --n;
    while ((n + 1) * (n + 1) <= num_experts) ++n;
    return n;
  }
  /// Width of each axis' query: d / 2 when split, else d.
  [[nodiscard]] int64_t query_width() const noexcept { return split_query ? hidden / 2 : hidden; }

  void validate() const {
    MOEKIT_CHECK(num_experts >= 1 && num_experts <= (int64_t{1} << 30),
                 "product_key router: num_experts (E) expected in [1, 2^30], got ", num_experts);
    MOEKIT_CHECK(side() * side() == num_experts, "product_key router: num_experts (E) expected a square n^2, got ",
                 num_experts);
    MOEKIT_CHECK(k >= 1 && k <= num_experts, "product_key router: k expected in [1, E = ", num_experts, "], got ", k);
    MOEKIT_CHECK(hidden >= 1 && hidden < (int64_t{1} << 31), "product_key router: hidden size (d) expected in [1, 2^31), got ", hidden);
    MOEKIT_CHECK(!split_query || (hidden >= 2 && hidden % 2 == 0),
                 "product_key router: split_query expected an even hidden size >= 2, got ", hidden);
  }
};

/// Product-key top-k router. Per unpadded token (fp32):
/// `a = log_softmax(K_x q_x)`, `b = log_softmax(K_y q_y)` over the n keys of each axis;
/// candidates: the k' = min(k, n) best of each axis (ties: the lower index); the k best of the
/// k'^2 sums `a_i + b_j` (ties: the lower expert id `i n + j`); weight `p_x(i) p_y(j)`
/// (the product of the two softmax probabilities, not renormalised).
class ProductKeyRouter {
 public:
  /// `keys_x [n, q]`, `keys_y [n, q]` with q = options.query_width().
  ProductKeyRouter(ProductKeyOptions options, std::vector<float> keys_x, std::vector<float> keys_y)
      : opt_(options), kx_(std::move(keys_x)), ky_(std::move(keys_y)) {
    opt_.validate();
    const auto n = static_cast<size_t>(opt_.side()), q = static_cast<size_t>(opt_.query_width());
    detail::check_weight(kx_, "product_key router", "router.keys_x", n, q);
    detail::check_weight(ky_, "product_key router", "router.keys_y", n, q);
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return opt_.num_experts; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] int64_t k() const noexcept { return opt_.k; }
  [[nodiscard]] const ProductKeyOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& keys_x() const noexcept { return kx_; }
  [[nodiscard]] const std::vector<float>& keys_y() const noexcept { return ky_; }
  /// Router FLOPs per routed token: the two key products (the k^2 sums are not counted).
  [[nodiscard]] double flops_per_token() const noexcept {
    return 4.0 * static_cast<double>(opt_.side()) * static_cast<double>(opt_.query_width());
  }

  /// Routes `hidden [T, d]` into `plan` (finalised); padded tokens get no slot. After the
  /// call `scratch.logits [T, 2n]` holds each token's log-probabilities, axis x then axis y.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch, int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, n = opt_.side(), q = opt_.query_width(), d = opt_.hidden, k = opt_.k;
    MOEKIT_CHECK(T == 0 || hidden != nullptr, "product_key router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    const int64_t kk = std::min(k, n);
    const size_t per_thread = static_cast<size_t>(kk * kk);
    scratch.logits.resize(static_cast<size_t>(T * 2 * n));
    if (scratch.buffer.size() < per_thread * static_cast<size_t>(nt)) scratch.buffer.resize(per_thread * static_cast<size_t>(nt));
    if (scratch.index.size() < static_cast<size_t>((2 * n + kk * kk) * nt))
      scratch.index.resize(static_cast<size_t>((2 * n + kk * kk) * nt));
    plan.reset(T, opt_.num_experts, [&](int64_t t) { return batch.is_padding(t) ? 0 : k; });

#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* a = scratch.logits.data() + t * 2 * n;
      float* b = a + n;
      if (batch.is_padding(t)) {
        std::fill(a, a + 2 * n, 0.0f);
        continue;
      }
      const float* x = hidden + t * d;
      kernels::matvec_rows(x, kx_.data(), n, q, a);
      kernels::matvec_rows(opt_.split_query ? x + q : x, ky_.data(), n, q, b);
      log_softmax(a, n);
      log_softmax(b, n);
    }
    if (const int64_t i = kernels::first_non_finite(scratch.logits.data(), T * 2 * n); i >= 0)
      detail::fail("product_key router: key score of token ", i / (2 * n), ", ", (i % (2 * n)) < n ? "axis x" : "axis y",
                   " key ", i % n, " expected finite, got ", scratch.logits[static_cast<size_t>(i)],
                   " (NaN or Inf in hidden_states or the keys, or an overflow)");

#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;
      const int tid = omp_get_thread_num();
      int32_t* ia = scratch.index.data() + static_cast<size_t>((2 * n + kk * kk) * tid);
      int32_t* ib = ia + n;
      int32_t* cand = ib + n;
      float* sum = scratch.buffer.data() + per_thread * static_cast<size_t>(tid);
      const float* a = scratch.logits.data() + t * 2 * n;
      const float* b = a + n;
      top_of_axis(a, n, kk, ia);
      top_of_axis(b, n, kk, ib);
      // The k'^2 candidates, then the k best: descending sum, ties to the lower expert id.
      for (int64_t u = 0; u < kk; ++u)
        for (int64_t v = 0; v < kk; ++v) {
          sum[u * kk + v] = a[ia[u]] + b[ib[v]];
          cand[u * kk + v] = static_cast<int32_t>(u * kk + v);
        }
      auto id = [&](int32_t c) { return static_cast<int64_t>(ia[c / kk]) * n + ib[c % kk]; };
      std::partial_sort(cand, cand + k, cand + kk * kk, [&](int32_t x, int32_t y) {
        return sum[x] > sum[y] || (sum[x] == sum[y] && id(x) < id(y));
      });
      int32_t* ids = plan.token_experts(t).data();
      float* w = plan.token_weights(t).data();
      for (int64_t j = 0; j < k; ++j) {
        const int32_t c = cand[j];
        ids[j] = static_cast<int32_t>(id(c));
        w[j] = std::exp(a[ia[c / kk]]) * std::exp(b[ib[c % kk]]);
      }
    }
    plan.finalize();
  }

 private:
  // In place: x <- x - logsumexp(x), max subtracted, fixed order.
  static void log_softmax(float* x, int64_t n) noexcept {
    float m = x[0];
    for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - m);
    const float lse = m + std::log(s);
    for (int64_t i = 0; i < n; ++i) x[i] -= lse;
  }
  // The kk best of `s [n]` in descending order, ties to the lower index, into `idx`.
  static void top_of_axis(const float* s, int64_t n, int64_t kk, int32_t* idx) noexcept {
    for (int64_t i = 0; i < n; ++i) idx[i] = static_cast<int32_t>(i);
    std::partial_sort(idx, idx + kk, idx + n,
                      [s](int32_t a, int32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
  }

  ProductKeyOptions opt_;
  std::vector<float> kx_, ky_;
};

static_assert(Router<ProductKeyRouter>);

/// E one-neuron experts (PEER): `E_e(x) = act(u_e . x) v_e`, with `u = down [E, d]` (PEER's
/// `down_embed`) and `v = up [E, d]` (`up_embed`), f32. An ExpertBank: through SparseLayer the
/// layer is `y = sum_slots w act(u_e . x) v_e`.
class AtomicExpertBank {
 public:
  AtomicExpertBank(int64_t num_experts, int64_t hidden, std::vector<float> down, std::vector<float> up,
                   Activation act = Activation::gelu)
      : E_(num_experts), d_(hidden), u_(std::move(down)), v_(std::move(up)), act_(act) {
    MOEKIT_CHECK(E_ >= 1 && d_ >= 1, "AtomicExpertBank: experts and hidden size expected >= 1, got ", E_, ", ", d_);
    MOEKIT_CHECK(static_cast<double>(E_) * static_cast<double>(d_) < 0x1p40,
                 "AtomicExpertBank: E d expected < 2^40 values, got E = ", E_, ", d = ", d_);
    detail::check_weight(u_, "AtomicExpertBank", "down_embed", static_cast<size_t>(E_), static_cast<size_t>(d_));
    detail::check_weight(v_, "AtomicExpertBank", "up_embed", static_cast<size_t>(E_), static_cast<size_t>(d_));
    MOEKIT_CHECK(static_cast<int>(act_) >= 0 && static_cast<int>(act_) <= static_cast<int>(Activation::relu),
                 "AtomicExpertBank: activation expected silu, gelu, gelu_tanh or relu, got ", static_cast<int>(act_));
  }
  [[nodiscard]] int64_t num_experts() const noexcept { return E_; }
  [[nodiscard]] int64_t d_in() const noexcept { return d_; }
  [[nodiscard]] int64_t d_out() const noexcept { return d_; }
  [[nodiscard]] size_t scratch_floats(int64_t) const noexcept { return 0; }
  [[nodiscard]] double flops_per_row() const noexcept { return 4.0 * static_cast<double>(d_); }
  /// Bytes of one expert's weights (u and v, f32).
  [[nodiscard]] double weight_bytes_per_expert() const noexcept { return 8.0 * static_cast<double>(d_); }
  [[nodiscard]] Activation activation() const noexcept { return act_; }
  void run(int64_t e, const float* in, int64_t rows, float* out, float*) const noexcept {
    const float* u = u_.data() + e * d_;
    const float* v = v_.data() + e * d_;
    for (int64_t r = 0; r < rows; ++r) {
      const float h = activate(act_, kernels::dot(in + r * d_, u, d_));
      float* y = out + r * d_;
      for (int64_t i = 0; i < d_; ++i) y[i] = h * v[i];
    }
  }

 private:
  int64_t E_, d_;
  std::vector<float> u_, v_;
  Activation act_;
};

static_assert(ExpertBank<AtomicExpertBank>);

}  // namespace moekit
#pragma GCC visibility pop
