// SPDX-License-Identifier: Apache-2.0
// The Mixture-of-Recursions layer: a MoRRouter and one shared block run through SparseLayer once per recursion.
// Paper: "Mixture-of-Recursions", arXiv 2507.10524; the router is in moekit/routers/mor.hpp.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/mor.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Scratch and per-token outputs of a MoRLayer call; reuse it across calls.
struct MoRWorkspace {
  Workspace layer;              ///< the SparseLayer's; `layer.plan` = the last recursion's plan
  std::vector<float> x;         ///< `[T, d]` current hidden states
  std::vector<float> delta;     ///< `[T, d]` g * f(x) of one recursion
  std::vector<uint8_t> active;  ///< `[T]` chosen at the last recursion run
  std::vector<int32_t> depth;   ///< `[T]` recursions each token got (0..N_r; 0 for padding)
  std::vector<float> router_weights;  ///< `[T]` the last g applied to the token, 0 if none
  int64_t recursions_run = 0;         ///< recursions with at least one chosen token
};

/// The MoR layer: a MoRRouter and one shared block (a one-expert ExpertBank, returning its
/// delta f(x)) run through SparseLayer::forward_plan once per recursion: for the chosen tokens
/// `x <- x + g * (x + f(x))` (MoROptions::block_residual, the official combine) or
/// `x <- x + g * f(x)`. Returns `x_final - x` (0 for padded tokens); the caller adds the residual.
template <ExpertBank B>
class MoRLayer {
 public:
  using Sparse = SparseLayer<MoRRouter, B>;
  using workspace_type = MoRWorkspace;

  MoRLayer(MoRRouter router, B block) : layer_(std::move(router), std::move(block)) {}

  [[nodiscard]] int64_t hidden_size() const noexcept { return layer_.hidden_size(); }
  [[nodiscard]] const MoRRouter& router() const noexcept { return layer_.router(); }
  [[nodiscard]] const B& block() const noexcept { return layer_.experts(); }
  [[nodiscard]] const Sparse& sparse_layer() const noexcept { return layer_; }

  /// Runs the recursions on `hidden [T, d]` and writes `out [T, d]` = x_final - x;
  /// `ws.depth` and `ws.router_weights` hold the per-token outputs after.
  void forward(const Batch& batch, const float* hidden, float* out, MoRWorkspace& ws,
               int threads = 0) const {
    const int64_t T = batch.tokens, d = hidden_size();
    batch.validate(d);
    ws.depth.assign(static_cast<size_t>(T), 0);
    ws.router_weights.assign(static_cast<size_t>(T), 0.0f);
    ws.active.resize(static_cast<size_t>(T));
    ws.recursions_run = 0;
    if (T == 0) return;
    MOEKIT_CHECK(hidden != nullptr && out != nullptr,
                 "mor layer: hidden/out pointers expected non-null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    if (ws.x.size() < static_cast<size_t>(T * d)) ws.x.resize(static_cast<size_t>(T * d));
    if (ws.delta.size() < static_cast<size_t>(T * d)) ws.delta.resize(static_cast<size_t>(T * d));
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) {
      kernels::copy_row(hidden + t * d, ws.x.data() + t * d, d);
      kernels::zero_row(out + t * d, d);
      ws.active[static_cast<size_t>(t)] = batch.is_padding(t) ? 0 : 1;
    }
    for (int64_t r = 0; r < router().num_recursions(); ++r) {
      router().route_step(r, batch, ws.x.data(), ws.active, ws.layer.plan, ws.layer.router,
                          threads);
      if (ws.layer.plan.num_kept() == 0) break;
      ++ws.recursions_run;
      layer_.forward_plan(batch, ws.x.data(), ws.layer.plan, ws.delta.data(), ws.layer,
                          threads);  // g f(x)
      const auto toks = ws.layer.plan.expert_tokens();
      const auto n = static_cast<int64_t>(toks.size());
      const bool residual = router().options().block_residual;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && n > 1)
      for (int64_t i = 0; i < n; ++i) {  // out += g f(x) (+ g x); x = hidden + out
        const int64_t t = toks[static_cast<size_t>(i)];
        float* o = out + t * d;
        kernels::axpy_row(1.0f, ws.delta.data() + t * d, o, d);
        if (residual) kernels::axpy_row(ws.layer.router.values[static_cast<size_t>(t)], ws.x.data() + t * d, o, d);
        kernels::copy_row(hidden + t * d, ws.x.data() + t * d, d);
        kernels::axpy_row(1.0f, o, ws.x.data() + t * d, d);
        ++ws.depth[static_cast<size_t>(t)];
        ws.router_weights[static_cast<size_t>(t)] = ws.layer.router.values[static_cast<size_t>(t)];
      }
    }
  }

 private:
  Sparse layer_;
};

}  // namespace moekit
#pragma GCC visibility pop
