// SPDX-License-Identifier: Apache-2.0
// The Dr.LLM layer: a DrLlmRouter and one wrapped block, skipped, run once or twice per sequence.
// Paper: "Dr.LLM: Dynamic Layer Routing in LLMs", arXiv 2510.12773; the router is in moekit/routers/drllm.hpp.
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
#include "moekit/routers/drllm.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Scratch of a DrLlmLayer call; reuse it across calls (grows, never shrinks).
struct DrLlmWorkspace {
  Workspace layer;  ///< the SparseLayer's; `layer.plan` = first-pass plan, `layer.router` = router
                    ///< outputs
  RoutingPlan repeat_plan;       ///< second-pass plan (tokens of repeating sequences)
  std::vector<float> x1;         ///< `[T, d]` x + f(x) on the tokens of repeating sequences
  std::vector<float> delta;      ///< `[T, d]` f(x1)
  std::vector<int32_t> repeats;  ///< `[S]` the repeats (0, 1, 2) used by the last call
};

/// The Dr.LLM layer: a DrLlmRouter and one wrapped block (a one-expert ExpertBank, e.g.
/// FunctorBank<Block> or a one-expert FfnBank) run through SparseLayer::forward_plan. The
/// block returns its delta f(x). Per sequence, the layer returns 0 (skip), f(x) (execute) or
/// x2 - x = f(x) + f(x + f(x)) (repeat); 0 for padded tokens. The caller adds the residual.
template <ExpertBank B>
class DrLlmLayer {
 public:
  using Sparse = SparseLayer<DrLlmRouter, B>;
  using workspace_type = DrLlmWorkspace;

  DrLlmLayer(DrLlmRouter router, B block) : layer_(std::move(router), std::move(block)) {}

  [[nodiscard]] int64_t hidden_size() const noexcept { return layer_.hidden_size(); }
  [[nodiscard]] const DrLlmRouter& router() const noexcept { return layer_.router(); }
  [[nodiscard]] const B& block() const noexcept { return layer_.experts(); }
  [[nodiscard]] const Sparse& sparse_layer() const noexcept { return layer_; }

  /// Prefill: decides each sequence's repeats from `hidden [T, d]` (left in `ws.repeats`)
  /// and writes `out [T, d]`. Keep `ws.repeats` to decode the same sequences with forward_frozen.
  void forward(const Batch& batch, const float* hidden, float* out, DrLlmWorkspace& ws,
               int threads = 0) const {
    layer_.router().decide(batch, hidden, ws.layer.router, threads);
    const auto S = static_cast<size_t>(batch.num_sequences());
    ws.repeats.assign(ws.layer.router.index.begin(),
                      ws.layer.router.index.begin() + static_cast<std::ptrdiff_t>(S));
    run(batch, hidden, out, ws, threads);
  }

  /// Decode (or any call with decisions fixed beforehand): runs the block `repeats[s]` times
  /// on sequence s (`repeats [S]`, values 0..2, e.g. the prefill's ws.repeats), no routing.
  void forward_frozen(const Batch& batch, const float* hidden, std::span<const int32_t> repeats,
                      float* out, DrLlmWorkspace& ws, int threads = 0) const {
    batch.validate(hidden_size());
    DrLlmRouter::check_repeats(batch, repeats);
    ws.repeats.assign(repeats.begin(), repeats.end());
    DrLlmRouter::fill_values(batch, ws.repeats, ws.layer.router.values);
    run(batch, hidden, out, ws, threads);
  }

 private:
  void run(const Batch& batch, const float* hidden, float* out, DrLlmWorkspace& ws,
           int threads) const {
    const int64_t T = batch.tokens, d = hidden_size();
    if (T == 0) {
      DrLlmRouter::plan_for(batch, ws.repeats, 1, ws.layer.plan);
      return;
    }
    MOEKIT_CHECK(hidden != nullptr && out != nullptr,
                 "drllm layer: hidden/out pointers expected non-null for T = ", T);
    DrLlmRouter::plan_for(batch, ws.repeats, 1, ws.layer.plan);
    layer_.forward_plan(batch, hidden, ws.layer.plan, out, ws.layer, threads);  // f(x) or 0

    DrLlmRouter::plan_for(batch, ws.repeats, 2, ws.repeat_plan);
    if (ws.repeat_plan.num_kept() == 0) return;
    const auto toks = ws.repeat_plan.expert_tokens();
    const auto n = static_cast<int64_t>(toks.size());
    if (ws.x1.size() < static_cast<size_t>(T * d)) ws.x1.resize(static_cast<size_t>(T * d));
    if (ws.delta.size() < static_cast<size_t>(T * d)) ws.delta.resize(static_cast<size_t>(T * d));
    const int nt = detail::resolve_threads(threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && n > 1)
    for (int64_t i = 0; i < n; ++i) {  // x1 = x + f(x)
      const int64_t t = toks[static_cast<size_t>(i)];
      kernels::copy_row(hidden + t * d, ws.x1.data() + t * d, d);
      kernels::axpy_row(1.0f, out + t * d, ws.x1.data() + t * d, d);
    }
    layer_.forward_plan(batch, ws.x1.data(), ws.repeat_plan, ws.delta.data(), ws.layer,
                        threads);  // f(x1)
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && n > 1)
    for (int64_t i = 0; i < n; ++i) {  // x2 - x = f(x) + f(x1)
      const int64_t t = toks[static_cast<size_t>(i)];
      kernels::axpy_row(1.0f, ws.delta.data() + t * d, out + t * d, d);
    }
  }

  Sparse layer_;
};

}  // namespace moekit
#pragma GCC visibility pop
