// SPDX-License-Identifier: Apache-2.0
// FlyLoRA's implicit rank-wise router (FlyLoRA, Zou et al., NeurIPS 2025, arXiv 2510.08396;
// official code gfyddha/FlyLoRA `flylora.py`, commit 0da2ffb2): a LoRA adapter whose rank-1
// components are the experts. The frozen sparse random projection A `[r, d]` is both the
// down-projection and the router: `y = A x`, the k components with the largest `|y + b|` (b:
// the load-balancing expert bias) are kept, and the adapter's output is
// `(alpha / r) B (y * mask)` with B `[d_out, r]` the trained up-projection. On the plan spine:
// expert i is column i of B (a constant vector, RankOneBank), its slot weight
// `(alpha / r) y_i` (the unbiased projection, signed).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Parameters of FlyLoraRouter; field name = the official constructor's argument.
struct FlyLoraOptions {
  int64_t r = 0;        ///< total rank = experts
  int64_t k = 0;        ///< activated ranks per token, in [1, r]
  int64_t hidden = 0;   ///< d (in_features)
  float alpha = 0.0f;   ///< scaling numerator; 0 = 2 r (the official default); output scale alpha / r

  void validate() const {
    MOEKIT_CHECK(r >= 1 && r <= (int64_t{1} << 20), "flylora router: r expected in [1, 2^20], got ", r);
    MOEKIT_CHECK(k >= 1 && k <= r, "flylora router: k expected in [1, r = ", r, "], got ", k);
    MOEKIT_CHECK(hidden >= 1 && hidden < (int64_t{1} << 31), "flylora router: hidden size (d) expected in [1, 2^31), got ",
                 hidden);
    MOEKIT_CHECK(static_cast<double>(r) * static_cast<double>(hidden) < 0x1p40,
                 "flylora router: r d expected < 2^40, got ", r, " x ", hidden);
    MOEKIT_CHECK(std::isfinite(alpha) && alpha >= 0.0f, "flylora router: alpha expected finite and >= 0 (0: 2 r), got ",
                 alpha);
  }
  [[nodiscard]] float scale() const noexcept {
    return (alpha > 0.0f ? alpha : 2.0f * static_cast<float>(r)) / static_cast<float>(r);
  }
};

/// FlyLoRA's implicit router. Per unpadded token (fp32): `y = A x` (each a dot()), the k
/// components with the largest `|y_i + b_i|` in descending order (ties: the lower index;
/// torch.topk leaves them unspecified), slot weight `(alpha / r) y_i`. After route(),
/// `scratch.logits [T, r]` holds y.
class FlyLoraRouter {
 public:
  /// `projection [r, d]` (the frozen buffer `A`), `expert_bias [r]` (the buffer `d`; empty =
  /// zeros).
  FlyLoraRouter(const FlyLoraOptions& opt, std::vector<float> projection, std::vector<float> expert_bias = {})
      : opt_(opt), a_(std::move(projection)), b_(std::move(expert_bias)) {
    opt_.validate();
    detail::check_weight(a_, "flylora router", "A (projection)", static_cast<size_t>(opt_.r), static_cast<size_t>(opt_.hidden));
    if (b_.empty()) b_.assign(static_cast<size_t>(opt_.r), 0.0f);
    detail::check_weight(b_, "flylora router", "d (expert bias)", 1, static_cast<size_t>(opt_.r));
  }
  [[nodiscard]] int64_t num_experts() const noexcept { return opt_.r; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] const FlyLoraOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& projection() const noexcept { return a_; }
  [[nodiscard]] const std::vector<float>& expert_bias() const noexcept { return b_; }

  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch, int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, r = opt_.r, d = opt_.hidden, k = opt_.k;
    MOEKIT_CHECK(T == 0 || hidden != nullptr, "flylora router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    scratch.logits.resize(static_cast<size_t>(T * r));
    if (scratch.index.size() < static_cast<size_t>(r * nt)) scratch.index.resize(static_cast<size_t>(r * nt));
    plan.reset(T, r, [&](int64_t t) { return batch.is_padding(t) ? 0 : k; });
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* y = scratch.logits.data() + t * r;
      if (batch.is_padding(t)) {
        std::fill(y, y + r, 0.0f);
        continue;
      }
      kernels::matvec_rows(hidden + t * d, a_.data(), r, d, y);
    }
    if (const int64_t i = kernels::first_non_finite(scratch.logits.data(), T * r); i >= 0)
      detail::fail("flylora router: projection of token ", i / r, ", component ", i % r, " expected finite, got ",
                   scratch.logits[static_cast<size_t>(i)], " (NaN or Inf in hidden_states, or an overflow)");
    const float scale = opt_.scale();
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;
      const float* y = scratch.logits.data() + t * r;
      int32_t* idx = scratch.index.data() + static_cast<size_t>(r * omp_get_thread_num());
      for (int64_t i = 0; i < r; ++i) idx[i] = static_cast<int32_t>(i);
      auto key = [&](int32_t i) { return std::fabs(y[i] + b_[static_cast<size_t>(i)]); };
      std::partial_sort(idx, idx + k, idx + r, [&](int32_t a, int32_t b) {
        const float ka = key(a), kb = key(b);
        return ka > kb || (ka == kb && a < b);
      });
      int32_t* ids = plan.token_experts(t).data();
      float* w = plan.token_weights(t).data();
      for (int64_t j = 0; j < k; ++j) {
        ids[j] = idx[j];
        w[j] = scale * y[idx[j]];
      }
    }
    plan.finalize();
  }

 private:
  FlyLoraOptions opt_;
  std::vector<float> a_, b_;
};

/// Experts that are constant vectors: expert e outputs column e of `up [d, E]` (FlyLoRA's
/// up-projection B, HF `[out, r]` layout) for every row; the layer scales it by the slot
/// weight. With FlyLoraRouter the layer computes `(alpha / r) B (y * mask)`: FlyLoRA's
/// adapter output, to which the engine adds its frozen `W0 x` (the layer needs d_out = d).
class RankOneBank {
 public:
  RankOneBank(int64_t num_experts, int64_t dim, std::vector<float> up) : E_(num_experts), d_(dim), up_(std::move(up)) {
    MOEKIT_CHECK(E_ >= 1 && d_ >= 1 && static_cast<double>(E_) * static_cast<double>(d_) < 0x1p40,
                 "RankOneBank: experts and dim expected >= 1 with E d < 2^40, got ", E_, ", ", d_);
    detail::check_weight(up_, "RankOneBank", "up (B)", static_cast<size_t>(d_), static_cast<size_t>(E_));
  }
  [[nodiscard]] int64_t num_experts() const noexcept { return E_; }
  [[nodiscard]] int64_t d_in() const noexcept { return d_; }
  [[nodiscard]] int64_t d_out() const noexcept { return d_; }
  [[nodiscard]] size_t scratch_floats(int64_t) const noexcept { return 0; }
  [[nodiscard]] double flops_per_row() const noexcept { return 0.0; }
  void run(int64_t e, const float*, int64_t rows, float* out, float*) const noexcept {
    for (int64_t q = 0; q < rows; ++q)
      for (int64_t i = 0; i < d_; ++i) out[q * d_ + i] = up_[static_cast<size_t>(i * E_ + e)];
  }

 private:
  int64_t E_, d_;
  std::vector<float> up_;
};

/// A FlyLoRA projection A `[r, d]`: each row has p = max(1, floor(d * sparsity)) non-zeros at
/// distinct random columns, each drawn from N(0, 1 / r^2) (the official initialisation;
/// sparsity 0 = k / r). moekit's generator (splitmix64 and Box-Muller, seeded), so it does
/// not reproduce torch's draws: load a trained adapter's `A` instead.
inline std::vector<float> flylora_projection(int64_t r, int64_t d, int64_t k, float sparsity, uint64_t seed) {
  MOEKIT_CHECK(r >= 1 && d >= 1 && static_cast<double>(r) * static_cast<double>(d) < 0x1p40 && k >= 1 && k <= r,
               "flylora_projection: r, d >= 1 (r d < 2^40) and k in [1, r] expected, got ", r, ", ", d, ", ", k);
  MOEKIT_CHECK(std::isfinite(sparsity) && sparsity >= 0.0f && sparsity <= 1.0f,
               "flylora_projection: sparsity expected in [0, 1] (0: k / r), got ", sparsity);
  const double rho = sparsity > 0.0f ? sparsity : static_cast<double>(k) / static_cast<double>(r);
  const int64_t p = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(d) * rho));
  std::vector<float> A(static_cast<size_t>(r * d), 0.0f);
  std::vector<int64_t> cols(static_cast<size_t>(d));
  uint64_t s = seed;
  auto next = [&] { return detail::splitmix64(s += 0x9E3779B97F4A7C15ull); };
  auto uniform = [&] { return (static_cast<double>(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); };
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t c = 0; c < d; ++c) cols[static_cast<size_t>(c)] = c;
    for (int64_t c = 0; c < p; ++c) {  // partial Fisher-Yates: p distinct columns
      const int64_t j = c + static_cast<int64_t>(next() % static_cast<uint64_t>(d - c));
      std::swap(cols[static_cast<size_t>(c)], cols[static_cast<size_t>(j)]);
      const double g = std::sqrt(-2.0 * std::log(uniform())) * std::cos(6.283185307179586 * uniform());
      A[static_cast<size_t>(i * d + cols[static_cast<size_t>(c)])] = static_cast<float>(g / static_cast<double>(r));
    }
  }
  return A;
}

}  // namespace moekit
#pragma GCC visibility pop
