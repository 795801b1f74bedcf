// SPDX-License-Identifier: Apache-2.0
// Expert and ExpertBank concepts, and FunctorBank: E user functors as one bank.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "moekit/error.hpp"

namespace moekit {

/// An expert: maps a contiguous block `in [rows, d_in]` to `out [rows, d_out]` (row-major),
/// using `scratch` (scratch_floats(rows) floats, owned by the layer's Workspace).
template <class F>
concept Expert = requires(const F& f, const float* in, int64_t rows, float* out, float* scratch) {
  { f.d_in() } -> std::convertible_to<int64_t>;
  { f.d_out() } -> std::convertible_to<int64_t>;
  { f.scratch_floats(rows) } -> std::convertible_to<size_t>;
  f(in, rows, out, scratch);
};

/// E experts addressed by index, as the sparse layer calls them.
template <class B>
concept ExpertBank = requires(const B& b, int64_t e, const float* in, int64_t rows, float* out,
                              float* scratch) {
  { b.num_experts() } -> std::convertible_to<int64_t>;
  { b.d_in() } -> std::convertible_to<int64_t>;
  { b.d_out() } -> std::convertible_to<int64_t>;
  { b.scratch_floats(rows) } -> std::convertible_to<size_t>;
  b.run(e, in, rows, out, scratch);
};

/// A bank of user-written experts of one type F (see examples/custom_expert.cpp).
template <Expert F>
class FunctorBank {
 public:
  explicit FunctorBank(std::vector<F> experts) : experts_(std::move(experts)) {
    MOEKIT_CHECK(!experts_.empty(), "FunctorBank: expected at least one expert, got 0");
    for (size_t e = 1; e < experts_.size(); ++e) {
      MOEKIT_CHECK(experts_[e].d_in() == experts_[0].d_in(), "FunctorBank: expert ", e,
                   " d_in expected ", experts_[0].d_in(), ", got ", experts_[e].d_in());
      MOEKIT_CHECK(experts_[e].d_out() == experts_[0].d_out(), "FunctorBank: expert ", e,
                   " d_out expected ", experts_[0].d_out(), ", got ", experts_[e].d_out());
    }
  }
  [[nodiscard]] int64_t num_experts() const noexcept { return static_cast<int64_t>(experts_.size()); }
  [[nodiscard]] int64_t d_in() const { return experts_[0].d_in(); }
  [[nodiscard]] int64_t d_out() const { return experts_[0].d_out(); }
  [[nodiscard]] size_t scratch_floats(int64_t rows) const {
    size_t m = 0;
    for (const F& f : experts_) m = std::max(m, static_cast<size_t>(f.scratch_floats(rows)));
    return m;
  }
  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const {
    experts_[static_cast<size_t>(e)](in, rows, out, scratch);
  }
  [[nodiscard]] const F& expert(int64_t e) const { return experts_[static_cast<size_t>(e)]; }

 private:
  std::vector<F> experts_;
};

}  // namespace moekit
