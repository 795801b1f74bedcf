// SPDX-License-Identifier: Apache-2.0
// Expert and ExpertBank concepts, and FunctorBank: E user functors as one bank.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
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

/// What a block-aware expert may know about the rows it gets: the batch (sequences,
/// positions, padding) and the token index of each row (ascending). Used by wrapped blocks
/// that mix tokens, e.g. attention among the tokens a depth router selected.
struct BlockContext {
  const Batch* batch = nullptr;
  std::span<const int32_t> tokens{};
  /// The routing weight of each row (the plan's slot weight), for blocks that apply it
  /// themselves (applies_weight_v); empty when the caller has none (then 1).
  std::span<const float> weights{};
};

/// A bank (or block) that applies the routing weight itself, inside the block, from
/// BlockContext::weights (e.g. gamma-MoD's decoder layer, which weights only its MLP): declares
/// `static constexpr bool applies_weight = true;`. The layer then adds its output unweighted.
template <class B>
inline constexpr bool applies_weight_v = requires { requires B::applies_weight; };

/// A bank whose run() also takes the BlockContext; the layer then calls that overload.
template <class B>
concept ContextAwareBank = requires(const B& b, int64_t e, const float* in, int64_t rows, float* out,
                                    float* scratch, const BlockContext& ctx) {
  b.run(e, in, rows, out, scratch, ctx);
};

/// A bank that must see all of an expert's rows in one call (e.g. attention over the selected
/// tokens): declares `static constexpr bool whole_blocks = true;`. The layer then makes one
/// task per expert instead of row blocks.
template <class B>
inline constexpr bool whole_blocks_v = requires { requires B::whole_blocks; };

/// A bank whose experts can be split by output columns across threads (e.g. FfnBank): the layer
/// uses it for decode-sized batches, where few (expert, row block) tasks would leave threads idle.
template <class B>
concept SplittableBank = requires(const B& b, int stage, int64_t e, const float* in, int64_t rows, float* h,
                                  float* out, float* a_pack, int64_t s) {
  { b.split_strips(stage) } -> std::convertible_to<int64_t>;
  { b.split_scratch_floats(rows) } -> std::convertible_to<size_t>;
  { b.split_hidden_floats(rows) } -> std::convertible_to<size_t>;
  { b.run_split(stage, e, in, rows, h, out, a_pack, s, s) } noexcept;  // runs inside a parallel region
};
/// An always-on expert over any one-expert bank S (ExpertBank, not context-aware): applied to
/// every unpadded token, optionally gated by `sigmoid(gate . x)` (Qwen2-MoE's
/// `shared_expert_gate`, `[1, d]`); ungated as DeepSeek-V3. With `coefficient` (DeepSpeed
/// PR-MoE's residual MoE, `use_residual`): per token `c = softmax(coefficient x +
/// coefficient_bias)` and the layer returns `c_0 * (routed sum) + c_1 * S(x)` (at most one
/// shared expert of a layer has it, and it has no `gate`). `scale` multiplies its contribution
/// (1 by default). `SharedExpert` (experts/ffn.hpp) is the FfnBank case; SparseLayer's third
/// parameter names S.
template <class S>
struct SharedExpertOf {
  S ffn;  ///< the one-expert bank (named for the FFN case; any ExpertBank)
  std::vector<float> gate;                ///< `[d]`, empty for ungated
  std::vector<float> coefficient{};       ///< `[2, d]` (`coefficient.weight`), empty for none
  std::vector<float> coefficient_bias{};  ///< `[2]` (`coefficient.bias`), with `coefficient`
  /// Multiplies the shared expert's (gated) output (RMoE's `share_weight`); finite.
  float scale = 1.0f;
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

/// An expert functor that also takes the BlockContext (5th argument).
template <class F>
concept ContextAwareExpert = requires(const F& f, const float* in, int64_t rows, float* out, float* scratch,
                                      const BlockContext& ctx) {
  f(in, rows, out, scratch, ctx);
};

/// A bank of user-written experts of one type F (see examples/custom_expert.cpp). Forwards
/// the BlockContext to context-aware functors, and F::whole_blocks and F::applies_weight to
/// the layer.
template <Expert F>
class FunctorBank {
 public:
  static constexpr bool whole_blocks = whole_blocks_v<F>;
  static constexpr bool applies_weight = applies_weight_v<F>;

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
  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch, const BlockContext& ctx) const
    requires ContextAwareExpert<F>
  {
    experts_[static_cast<size_t>(e)](in, rows, out, scratch, ctx);
  }
  [[nodiscard]] const F& expert(int64_t e) const { return experts_[static_cast<size_t>(e)]; }
  /// FLOPs of one row, when the functors report it (used by SparseLayer::executed_flops).
  [[nodiscard]] double flops_per_row() const
    requires requires(const F& f) { f.flops_per_row(); }
  {
    return static_cast<double>(experts_[0].flops_per_row());
  }

 private:
  std::vector<F> experts_;
};

}  // namespace moekit
#pragma GCC visibility pop
