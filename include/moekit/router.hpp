// SPDX-License-Identifier: Apache-2.0
// The Router concept: anything that turns hidden states into a RoutingPlan.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Scratch memory a router may use during route() (logits, scores, selection buffers).
/// Owned by the caller's Workspace so routers stay const and thread-safe; grows, never shrinks.
struct RouterScratch {
  std::vector<float> logits;   ///< `[T, E]` router logits of the last call (readable after route)
  std::vector<float> buffer;   ///< router-private scratch
  std::vector<int32_t> index;  ///< router-private scratch
  std::vector<float> state;    ///< recurrent routers: the new router state `[T, d_r]` after route
  std::vector<float>
      values;  ///< router-specific per-token outputs (e.g. depth routers' `[T]` router weights)
  std::vector<uint8_t> mask;  ///< router-private byte scratch
  /// Composite routers (ModalityGroupRouter): their sub-routers' plans and scratch, readable
  /// after route (sub[g].logits: group g's logits).
  std::vector<RoutingPlan> plans;
  std::vector<RouterScratch> sub;
  int64_t iterations = 0;  ///< iterative routers (Sinkhorn): iterations run by the last call
  double error = 0.0;      ///< iterative routers: final marginal error of the last call
};

namespace detail {

/// Checks that every value of a router weight (or any float tensor handed to a constructor)
/// is finite. Throws moekit::error `<who>: <name>[i] expected finite, got <v>` for the first
/// NaN or infinity, or `<name>[r, c]` when `cols` > 0 (a row-major `[rows, cols]` tensor).
/// Vectorised (kernels::first_non_finite): cheap enough for every constructor and setter.
inline void check_finite(std::span<const float> v, std::string_view who, std::string_view name,
                         size_t cols = 0) {
  const int64_t i = kernels::first_non_finite(v.data(), static_cast<int64_t>(v.size()));
  if (i < 0) return;
  const auto u = static_cast<size_t>(i);
  if (cols > 0)
    fail(who, ": ", name, "[", u / cols, ", ", u % cols, "] expected finite, got ", v[u]);
  fail(who, ": ", name, "[", u, "] expected finite, got ", v[u]);
}

/// Checks a `[rows, cols]` weight (row-major; `cols` = 0: a vector `[rows]`): its size, then
/// its values. Messages: `<who>: <name> expected [rows, cols] = n values, got m` (vector:
/// `expected [rows], got m values`), then check_finite's.
inline void check_weight(std::span<const float> v, std::string_view who, std::string_view name,
                         size_t rows, size_t cols = 0) {
  if (cols > 0) {
    MOEKIT_CHECK(v.size() == rows * cols, who, ": ", name, " expected [", rows, ", ", cols,
                 "] = ", rows * cols, " values, got ", v.size());
  } else {
    MOEKIT_CHECK(v.size() == rows, who, ": ", name, " expected [", rows, "], got ", v.size(),
                 " values");
  }
  check_finite(v, who, name, cols);
}

}  // namespace detail

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
#pragma GCC visibility pop
