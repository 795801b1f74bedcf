// SPDX-License-Identifier: Apache-2.0
// Chain-of-Experts (Wang et al., arXiv 2506.18945): C iterations inside one layer, each with
// its own router over the same experts, `x(c) = x(c-1) + sum_slots g E(x(c-1))` with
// x(0) = x; the layer returns x(C) - x(0) (the caller adds the residual, as for SparseLayer).
// Each iteration is a SparseLayer over a BankRef of the one bank.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/experts/bank_views.hpp"
#include "moekit/layer.hpp"
#include "moekit/router.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Scratch of a ChainLayer call: the iterations' plans stay readable afterwards.
struct ChainWorkspace {
  Workspace ws;                    ///< reused by every iteration
  std::vector<RoutingPlan> plans;  ///< `[C]` each iteration's plan (after forward)
  std::vector<float> state;        ///< x(c) `[T, d]`
  std::vector<float> delta;        ///< one iteration's output `[T, d]`
};

template <Router R, ExpertBank B>
class ChainLayer {
 public:
  using Iteration = SparseLayer<R, BankRef<B>>;

  /// `routers [C]` (C >= 1), one per iteration, all over the bank's experts.
  ChainLayer(std::vector<R> routers, B experts) : bank_(std::make_unique<B>(std::move(experts))) {
    MOEKIT_CHECK(!routers.empty(), "ChainLayer: expected at least one iteration's router, got 0");
    iters_.reserve(routers.size());
    for (R& r : routers) iters_.emplace_back(std::move(r), BankRef<B>(*bank_));
  }
  ChainLayer(ChainLayer&&) noexcept = default;

  [[nodiscard]] int64_t iterations() const noexcept { return static_cast<int64_t>(iters_.size()); }
  [[nodiscard]] int64_t hidden_size() const noexcept { return iters_.front().hidden_size(); }
  [[nodiscard]] const B& experts() const noexcept { return *bank_; }
  /// Iteration c's layer (its router: iteration(c).router()).
  [[nodiscard]] const Iteration& iteration(int64_t c) const { return iters_.at(static_cast<size_t>(c)); }
  [[nodiscard]] Iteration& iteration(int64_t c) { return iters_.at(static_cast<size_t>(c)); }

  /// `out [T, d]` = x(C) - x(0); padded rows 0. `out` may alias `hidden`.
  void forward(const Batch& batch, const float* hidden, float* out, ChainWorkspace& cw, int threads = 0) const {
    batch.validate(hidden_size());
    const int64_t n = batch.tokens * hidden_size();
    MOEKIT_CHECK(n == 0 || (hidden != nullptr && out != nullptr), "ChainLayer::forward: null pointer for T = ",
                 batch.tokens);
    cw.plans.resize(iters_.size());
    cw.state.assign(hidden, hidden + n);
    cw.delta.resize(static_cast<size_t>(n));
    for (size_t c = 0; c < iters_.size(); ++c) {
      iters_[c].forward(batch, cw.state.data(), cw.delta.data(), cw.ws, threads);
      for (int64_t i = 0; i < n; ++i) cw.state[static_cast<size_t>(i)] += cw.delta[static_cast<size_t>(i)];
      cw.plans[c] = cw.ws.plan;
    }
    // x(C) - x(0), exactly the sum of the iterations' outputs' effect; padded rows 0.
    const int64_t d = hidden_size();
    for (int64_t t = 0; t < batch.tokens; ++t)
      for (int64_t j = 0; j < d; ++j) {
        const size_t i = static_cast<size_t>(t * d + j);
        out[i] = batch.is_padding(t) ? 0.0f : cw.state[i] - hidden[i];
      }
  }

 private:
  std::unique_ptr<B> bank_;  // stable address for the iterations' BankRefs
  std::vector<Iteration> iters_;
};

}  // namespace moekit
#pragma GCC visibility pop
