// SPDX-License-Identifier: Apache-2.0
// RoutingPlan: the value every router returns and the sparse layer consumes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Which slots an over-full expert keeps (ROUTING.md section 1, capacity and dropping).
enum class DropPolicy {
  score,                ///< the slots with the largest final combine weight (ties: lower token)
  position,             ///< the slots of the earliest tokens (token order)
  position_slot_major,  ///< all first-choice slots before second-choice ones, then token order
};

/// Which tokens go to which expert with which combine weight.
///
/// Token side (CSR over tokens): token t owns slots [slot_offsets[t], slot_offsets[t+1]),
/// each an (expert, weight) pair in descending selection score, ties toward the lower
/// expert id. Dropped slots stay in place, marked, with weight 0.
///
/// Expert side (CSR over experts, built by finalize() with a stable counting sort):
/// expert e serves the kept slots expert_slots()[expert_offsets[e] .. expert_offsets[e+1]),
/// tokens ascending. Routers only write the token side; no router writes the expert side.
///
/// Buffers are reused: building a plan of the same shape again allocates nothing.
class RoutingPlan {
 public:
  RoutingPlan() = default;

  // ---------------------------------------------------------------- building
  /// Starts a plan for `tokens` tokens over `experts` experts, with the slot count of each
  /// token given by `slots_of(t)`. Slots are zero-initialised (expert 0, weight 0, kept).
  template <class SlotsOf>
  void reset(int64_t tokens, int64_t experts, SlotsOf&& slots_of) {
    MOEKIT_CHECK(tokens >= 0, "RoutingPlan: tokens expected >= 0, got ", tokens);
    MOEKIT_CHECK(experts > 0 && experts <= std::numeric_limits<int32_t>::max(),
                 "RoutingPlan: experts expected in [1, 2^31), got ", experts);
    tokens_ = tokens;
    experts_ = experts;
    slot_offsets_.resize(static_cast<size_t>(tokens) + 1);
    int64_t s = 0;
    slot_offsets_[0] = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t n = slots_of(t);
      MOEKIT_CHECK(n >= 0 && n <= experts, "RoutingPlan: slots of token ", t,
                   " expected in [0, ", experts, "], got ", n);
      s += n;
      MOEKIT_CHECK(s <= std::numeric_limits<int32_t>::max(),
                   "RoutingPlan: total slots expected < 2^31, got ", s);
      slot_offsets_[static_cast<size_t>(t) + 1] = static_cast<int32_t>(s);
    }
    const auto S = static_cast<size_t>(s);
    slot_expert_.assign(S, 0);
    slot_weight_.assign(S, 0.0f);
    slot_dropped_.assign(S, 0);
    finalized_ = false;
  }

  /// A finalised plan from routing an engine already did (ONNX Runtime's MoE op, ggml's
  /// mul_mat_id ids): `ids [T, k]` expert ids and `weights [T, k]` combine weights, row-major.
  /// An id of -1 is no slot (a dropped or missing choice; pass -1 for padded tokens); every
  /// other id must be in [0, E) and appear at most once per token, every weight of a slot
  /// finite. Slots keep the given order (the combine sums them in it). Throws moekit::error
  /// naming the token and slot. Reuses this plan's buffers.
  void assign_topk(const int32_t* ids, const float* weights, int64_t T, int64_t k, int64_t E) {
    MOEKIT_CHECK(T >= 0 && k >= 0, "RoutingPlan::from_topk: T and k expected >= 0, got T = ", T, ", k = ", k);
    MOEKIT_CHECK(E >= 1 && E <= std::numeric_limits<int32_t>::max(), "RoutingPlan::from_topk: E expected in [1, 2^31), got ", E);
    MOEKIT_CHECK(k <= E, "RoutingPlan::from_topk: k expected <= E = ", E, " (an expert at most once per token), got ", k);
    MOEKIT_CHECK(T * k == 0 || (ids != nullptr && weights != nullptr), "RoutingPlan::from_topk: null ids or weights for T = ",
                 T, ", k = ", k);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = ids[t * k + j];
        if (e == -1) continue;
        MOEKIT_CHECK(e >= 0 && e < E, "RoutingPlan::from_topk: ids[", t, ", ", j, "] expected in [0, ", E,
                     ") or -1 (no slot), got ", e);
        MOEKIT_CHECK(std::isfinite(weights[t * k + j]), "RoutingPlan::from_topk: weights[", t, ", ", j,
                     "] expected finite, got ", weights[t * k + j]);
        for (int64_t i = 0; i < j; ++i)
          MOEKIT_CHECK(ids[t * k + i] != e, "RoutingPlan::from_topk: token ", t, " chooses expert ", e,
                       " twice (slots ", i, " and ", j, ")");
      }
    reset(T, E, [&](int64_t t) {
      int64_t n = 0;
      for (int64_t j = 0; j < k; ++j) n += ids[t * k + j] != -1;
      return n;
    });
    for (int64_t t = 0; t < T; ++t) {
      int64_t n = 0;
      const auto ex = token_experts(t);
      const auto w = token_weights(t);
      for (int64_t j = 0; j < k; ++j) {
        if (ids[t * k + j] == -1) continue;
        ex[static_cast<size_t>(n)] = ids[t * k + j];
        w[static_cast<size_t>(n++)] = weights[t * k + j];
      }
    }
    finalize();
  }
  /// assign_topk into a new plan.
  static RoutingPlan from_topk(const int32_t* ids, const float* weights, int64_t T, int64_t k, int64_t E) {
    RoutingPlan p;
    p.assign_topk(ids, weights, T, k, E);
    return p;
  }

  /// Token t's slot range, writable by routers before finalize().
  std::span<int32_t> token_experts(int64_t t) noexcept { return {slot_expert_.data() + begin(t), size_of(t)}; }
  std::span<float> token_weights(int64_t t) noexcept { return {slot_weight_.data() + begin(t), size_of(t)}; }
  std::span<uint8_t> token_dropped(int64_t t) noexcept { return {slot_dropped_.data() + begin(t), size_of(t)}; }

  /// Enforces a per-expert capacity on the kept slots (ROUTING.md section 1). Slots beyond
  /// `capacity` are marked dropped with weight 0. With `renormalize`, each token's surviving
  /// weights are divided by their sum and multiplied by `renormalize_to` (DeepSpeed top-2).
  void apply_capacity(int64_t capacity, DropPolicy policy, bool renormalize = false,
                      float renormalize_to = 1.0f) {
    MOEKIT_CHECK(capacity >= 0, "RoutingPlan::apply_capacity: capacity expected >= 0, got ",
                 capacity);
    MOEKIT_CHECK(policy == DropPolicy::score || policy == DropPolicy::position ||
                     policy == DropPolicy::position_slot_major,
                 "RoutingPlan::apply_capacity: policy expected score, position or "
                 "position_slot_major, got ",
                 static_cast<int>(policy));
    MOEKIT_CHECK(!renormalize || std::isfinite(renormalize_to),
                 "RoutingPlan::apply_capacity: renormalize_to expected finite, got ",
                 renormalize_to);
    sort_by_expert(/*kept_only=*/true);
    std::vector<int32_t>& order = scratch_;  // slots of one expert, in policy order
    for (int64_t e = 0; e < experts_; ++e) {
      const int32_t b = expert_offsets_[static_cast<size_t>(e)];
      const int32_t n = expert_offsets_[static_cast<size_t>(e) + 1] - b;
      if (n <= capacity) continue;
      order.assign(expert_slots_.begin() + b, expert_slots_.begin() + b + n);  // tokens ascending
      if (policy == DropPolicy::score) {
        // Largest weight first; ties to the lower slot, i.e. the lower token.
        std::sort(order.begin(), order.end(), [&](int32_t a, int32_t c) {
          const float wa = slot_weight_[static_cast<size_t>(a)];
          const float wc = slot_weight_[static_cast<size_t>(c)];
          return wa > wc || (wa == wc && a < c);
        });
      } else if (policy == DropPolicy::position_slot_major) {
        // First choices before second choices; token order within a choice rank.
        std::sort(order.begin(), order.end(), [&](int32_t a, int32_t c) {
          const int32_t ra = rank_of(a), rc = rank_of(c);
          return ra < rc || (ra == rc && a < c);
        });
      }
      for (size_t i = static_cast<size_t>(capacity); i < order.size(); ++i) {
        slot_dropped_[static_cast<size_t>(order[i])] = 1;
        slot_weight_[static_cast<size_t>(order[i])] = 0.0f;
      }
    }
    if (renormalize) {
      for (int64_t t = 0; t < tokens_; ++t) {
        double sum = 0;
        for (int32_t s = begin(t); s < end(t); ++s)
          if (!slot_dropped_[static_cast<size_t>(s)]) sum += slot_weight_[static_cast<size_t>(s)];
        if (sum <= 0) continue;
        for (int32_t s = begin(t); s < end(t); ++s)
          if (!slot_dropped_[static_cast<size_t>(s)])
            slot_weight_[static_cast<size_t>(s)] = static_cast<float>(
                slot_weight_[static_cast<size_t>(s)] / sum * renormalize_to);
      }
    }
    finalized_ = false;
  }

  /// Builds the expert side and the derived per-slot arrays. Call once the token side is
  /// complete. Stable: within an expert, slots appear in token order.
  void finalize() {
    for (size_t s = 0; s < slot_expert_.size(); ++s)
      MOEKIT_CHECK(slot_expert_[s] >= 0 && slot_expert_[s] < experts_, "RoutingPlan: slot ", s,
                   " expert id expected in [0, ", experts_, "), got ", slot_expert_[s]);
    // A router never writes a non-finite weight from finite inputs; this catches hand-built
    // plans (SparseLayer::forward_plan) before a NaN reaches the combine.
    if (const int64_t s = kernels::first_non_finite(slot_weight_.data(),
                                                    static_cast<int64_t>(slot_weight_.size()));
        s >= 0)
      detail::fail("RoutingPlan: slot ", s, " weight expected finite, got ",
                   slot_weight_[static_cast<size_t>(s)]);
    const size_t S = slot_expert_.size();
    slot_token_.resize(S);
    for (int64_t t = 0; t < tokens_; ++t)
      for (int32_t s = begin(t); s < end(t); ++s)
        slot_token_[static_cast<size_t>(s)] = static_cast<int32_t>(t);
    sort_by_expert(/*kept_only=*/true);
    slot_position_.assign(S, -1);
    expert_tokens_.resize(expert_slots_.size());
    for (size_t i = 0; i < expert_slots_.size(); ++i) {
      slot_position_[static_cast<size_t>(expert_slots_[i])] = static_cast<int32_t>(i);
      expert_tokens_[i] = slot_token_[static_cast<size_t>(expert_slots_[i])];
    }
    dropped_per_expert_.assign(static_cast<size_t>(experts_), 0);
    for (size_t s = 0; s < S; ++s)
      if (slot_dropped_[s]) ++dropped_per_expert_[static_cast<size_t>(slot_expert_[s])];
    finalized_ = true;
  }

  // ---------------------------------------------------------------- reading
  [[nodiscard]] int64_t num_tokens() const noexcept { return tokens_; }
  [[nodiscard]] int64_t num_experts() const noexcept { return experts_; }
  [[nodiscard]] int64_t num_slots() const noexcept { return static_cast<int64_t>(slot_expert_.size()); }
  [[nodiscard]] int64_t num_kept() const noexcept { return static_cast<int64_t>(expert_slots_.size()); }
  [[nodiscard]] int64_t num_dropped() const noexcept { return num_slots() - num_kept(); }
  [[nodiscard]] bool finalized() const noexcept { return finalized_; }

  /// Token side, CSR: `[T + 1]` offsets and `[S]` per-slot arrays.
  [[nodiscard]] std::span<const int32_t> slot_offsets() const noexcept { return slot_offsets_; }
  [[nodiscard]] std::span<const int32_t> slot_expert() const noexcept { return slot_expert_; }
  [[nodiscard]] std::span<const float> slot_weight() const noexcept { return slot_weight_; }
  [[nodiscard]] std::span<const uint8_t> slot_dropped() const noexcept { return slot_dropped_; }
  /// Token of each slot `[S]` (after finalize()).
  [[nodiscard]] std::span<const int32_t> slot_token() const noexcept { return slot_token_; }
  /// Index of each slot in expert_slots() `[S]`, -1 for dropped slots (after finalize()).
  [[nodiscard]] std::span<const int32_t> slot_position() const noexcept { return slot_position_; }
  [[nodiscard]] int64_t slots_of(int64_t t) const noexcept { return end(t) - begin(t); }

  /// Expert side, CSR: `[E + 1]` offsets into `[S_kept]` slot indices and their tokens.
  [[nodiscard]] std::span<const int32_t> expert_offsets() const noexcept { return expert_offsets_; }
  [[nodiscard]] std::span<const int32_t> expert_slots() const noexcept { return expert_slots_; }
  [[nodiscard]] std::span<const int32_t> expert_tokens() const noexcept { return expert_tokens_; }
  /// Kept slots of expert e (its load).
  [[nodiscard]] int64_t kept_of(int64_t e) const noexcept {
    return expert_offsets_[static_cast<size_t>(e) + 1] - expert_offsets_[static_cast<size_t>(e)];
  }
  [[nodiscard]] int64_t dropped_of(int64_t e) const noexcept {
    return dropped_per_expert_[static_cast<size_t>(e)];
  }

  /// Writes `[T, k]` arrays of expert ids and combine weights in slot order; dropped and
  /// missing slots get id -1 and weight 0. Slots beyond k are not written.
  void to_topk(int64_t k, int32_t* ids, float* weights) const noexcept {
    for (int64_t t = 0; t < tokens_; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = begin(t) + j;
        const bool have = j < slots_of(t) && !slot_dropped_[static_cast<size_t>(s)];
        ids[t * k + j] = have ? slot_expert_[static_cast<size_t>(s)] : -1;
        weights[t * k + j] = have ? slot_weight_[static_cast<size_t>(s)] : 0.0f;
      }
    }
  }

 private:
  [[nodiscard]] int32_t begin(int64_t t) const noexcept { return slot_offsets_[static_cast<size_t>(t)]; }
  [[nodiscard]] int32_t end(int64_t t) const noexcept { return slot_offsets_[static_cast<size_t>(t) + 1]; }
  [[nodiscard]] size_t size_of(int64_t t) const noexcept { return static_cast<size_t>(end(t) - begin(t)); }
  [[nodiscard]] int32_t rank_of(int32_t s) const noexcept {
    // Token of slot s by binary search over the offsets (slot_token_ may be stale here).
    const auto it = std::upper_bound(slot_offsets_.begin(), slot_offsets_.end(), s);
    return s - *(it - 1);
  }

  // Stable counting sort of the (kept) slots by expert into expert_offsets_/expert_slots_.
  void sort_by_expert(bool kept_only) {
    const auto E = static_cast<size_t>(experts_);
    expert_offsets_.assign(E + 1, 0);
    for (size_t s = 0; s < slot_expert_.size(); ++s)
      if (!kept_only || !slot_dropped_[s]) ++expert_offsets_[static_cast<size_t>(slot_expert_[s]) + 1];
    for (size_t e = 0; e < E; ++e) expert_offsets_[e + 1] += expert_offsets_[e];
    expert_slots_.resize(static_cast<size_t>(expert_offsets_[E]));
    fill_.assign(expert_offsets_.begin(), expert_offsets_.end() - 1);
    for (size_t s = 0; s < slot_expert_.size(); ++s)
      if (!kept_only || !slot_dropped_[s])
        expert_slots_[static_cast<size_t>(fill_[static_cast<size_t>(slot_expert_[s])]++)] =
            static_cast<int32_t>(s);
  }

  int64_t tokens_ = 0;
  int64_t experts_ = 1;
  bool finalized_ = false;
  std::vector<int32_t> slot_offsets_{0};
  std::vector<int32_t> slot_expert_;
  std::vector<float> slot_weight_;
  std::vector<uint8_t> slot_dropped_;
  std::vector<int32_t> slot_token_;
  std::vector<int32_t> slot_position_;
  std::vector<int32_t> expert_offsets_{0, 0};
  std::vector<int32_t> expert_slots_;
  std::vector<int32_t> expert_tokens_;
  std::vector<int32_t> dropped_per_expert_;
  std::vector<int32_t> fill_;
  std::vector<int32_t> scratch_;
};

}  // namespace moekit
#pragma GCC visibility pop
