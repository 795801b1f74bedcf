// SPDX-License-Identifier: Apache-2.0
// The Router concept: anything that turns hidden states into a RoutingPlan.
#pragma once

#include <concepts>
#include <cstdint>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/routing_plan.hpp"

namespace moekit {

/// Scratch memory a router may use during route() (logits, scores, selection buffers).
/// Owned by the caller's Workspace so routers stay const and thread-safe; grows, never shrinks.
struct RouterScratch {
  std::vector<float> logits;   ///< `[T, E]` router logits of the last call (readable after route)
  std::vector<float> buffer;   ///< router-private scratch
  std::vector<int32_t> index;  ///< router-private scratch
  std::vector<float> state;    ///< recurrent routers: the new router state `[T, d_r]` after route
  std::vector<float> values;   ///< router-specific per-token outputs (e.g. depth routers' `[T]` router weights)
  int64_t iterations = 0;      ///< iterative routers (Sinkhorn): iterations run by the last call
  double error = 0.0;          ///< iterative routers: final marginal error of the last call
};

/// Has `num_experts()`: the E of the plans it produces.
template <class R>
concept RouterReportsExperts = requires(const R& r) {
  { r.num_experts() } -> std::convertible_to<int64_t>;
};

/// Has `hidden_size()`: the d of the hidden states it reads.
template <class R>
concept RouterReportsHidden = requires(const R& r) {
  { r.hidden_size() } -> std::convertible_to<int64_t>;
};

/// Has `route(batch, hidden [T, d], plan, scratch, threads)`, filling and finalising `plan`.
template <class R>
concept RouterRoutes = requires(const R& r, const Batch& b, const float* x, RoutingPlan& p,
                                RouterScratch& s, int threads) {
  r.route(b, x, p, s, threads);
};

/// A router policy. Each requirement is its own concept, so a compiler error names the
/// missing member: num_experts(), hidden_size() or route(...).
template <class R>
concept Router = RouterReportsExperts<R> && RouterReportsHidden<R> && RouterRoutes<R>;

}  // namespace moekit
