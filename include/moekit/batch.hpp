// SPDX-License-Identifier: Apache-2.0
// Batch: the metadata that travels beside the flat hidden states [T, d].
#pragma once

#include <cmath>
#include <cstdint>
#include <span>

#include "moekit/error.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Non-owning view of the batch layout of hidden states `[tokens, hidden]`
/// (ROUTING.md section 0). Defaults: one sequence of all tokens, positions
/// 0..T-1, no padding. The viewed arrays must outlive every call using it.
struct Batch {
  int64_t tokens = 0;  ///< T, rows of the hidden states
  int64_t hidden = 0;  ///< d, columns of the hidden states
  /// Sequence boundaries `[S + 1]`, offsets into the flat batch: 0 = o_0 <= ... <= o_S = T.
  /// Empty means one sequence.
  std::span<const int32_t> sequence_offsets{};
  /// Position of each token inside its sequence `[T]`. Empty means "index inside its sequence".
  std::span<const int32_t> positions{};
  /// Padding mask `[T]`, 1 = padding. Padded tokens are never routed, take no capacity, output 0.
  std::span<const uint8_t> padding{};
  /// Optional per-token type ids `[T]` (e.g. ProMoE's conditional / unconditional tokens).
  std::span<const int32_t> token_types{};
  /// Optional recurrent router state from the previous MoE layer `[T, d_r]` (RMoE); empty
  /// means zeros. The new state is left in RouterScratch::state.
  std::span<const float> router_state{};
  /// Optional per-token attention score `[T]` the engine computed (FTP's feature router reads
  /// it: the attention each token receives); finite.
  std::span<const float> token_scores{};

  /// One unpadded sequence of `tokens` rows of width `hidden`.
  static Batch single(int64_t tokens, int64_t hidden) noexcept {
    Batch b;
    b.tokens = tokens;
    b.hidden = hidden;
    return b;
  }

  [[nodiscard]] int64_t num_sequences() const noexcept {
    return sequence_offsets.empty() ? 1 : static_cast<int64_t>(sequence_offsets.size()) - 1;
  }
  [[nodiscard]] int64_t sequence_begin(int64_t s) const noexcept {
    return sequence_offsets.empty() ? 0 : sequence_offsets[static_cast<size_t>(s)];
  }
  [[nodiscard]] int64_t sequence_end(int64_t s) const noexcept {
    return sequence_offsets.empty() ? tokens : sequence_offsets[static_cast<size_t>(s) + 1];
  }
  [[nodiscard]] bool is_padding(int64_t t) const noexcept {
    return !padding.empty() && padding[static_cast<size_t>(t)] != 0;
  }
  /// Number of tokens that are not padding.
  [[nodiscard]] int64_t routed_tokens() const noexcept {
    if (padding.empty()) return tokens;
    int64_t n = 0;
    for (uint8_t p : padding) n += (p == 0);
    return n;
  }

  /// Checks the layout; throws moekit::error naming the offending field.
  /// `expected_hidden` < 0 skips the width check.
  void validate(int64_t expected_hidden = -1) const {
    MOEKIT_CHECK(tokens >= 0, "Batch.tokens: expected >= 0, got ", tokens);
    MOEKIT_CHECK(hidden > 0, "Batch.hidden: expected > 0, got ", hidden);
    MOEKIT_CHECK(expected_hidden < 0 || hidden == expected_hidden,
                 "Batch.hidden (d): expected ", expected_hidden, " (the layer's hidden size), got ",
                 hidden);
    if (!sequence_offsets.empty()) {
      MOEKIT_CHECK(sequence_offsets.size() >= 2,
                   "Batch.sequence_offsets: expected S + 1 >= 2 entries, got ",
                   sequence_offsets.size());
      MOEKIT_CHECK(sequence_offsets.front() == 0,
                   "Batch.sequence_offsets[0]: expected 0, got ", sequence_offsets.front());
      MOEKIT_CHECK(sequence_offsets.back() == tokens, "Batch.sequence_offsets[S]: expected ",
                   tokens, " (the token count), got ", sequence_offsets.back());
      for (size_t i = 1; i < sequence_offsets.size(); ++i)
        MOEKIT_CHECK(sequence_offsets[i] >= sequence_offsets[i - 1], "Batch.sequence_offsets[",
                     i, "]: expected non-decreasing offsets, got ", sequence_offsets[i],
                     " after ", sequence_offsets[i - 1]);
    }
    MOEKIT_CHECK(positions.empty() || static_cast<int64_t>(positions.size()) == tokens,
                 "Batch.positions: expected ", tokens, " entries, got ", positions.size());
    MOEKIT_CHECK(padding.empty() || static_cast<int64_t>(padding.size()) == tokens,
                 "Batch.padding: expected ", tokens, " entries, got ", padding.size());
    MOEKIT_CHECK(token_types.empty() || static_cast<int64_t>(token_types.size()) == tokens,
                 "Batch.token_types: expected ", tokens, " entries, got ", token_types.size());
    MOEKIT_CHECK(token_scores.empty() || static_cast<int64_t>(token_scores.size()) == tokens,
                 "Batch.token_scores: expected ", tokens, " entries, got ", token_scores.size());
    for (size_t i = 0; i < token_scores.size(); ++i)
      MOEKIT_CHECK(std::isfinite(token_scores[i]), "Batch.token_scores[", i, "]: expected finite, got ", token_scores[i]);
  }
};

}  // namespace moekit
#pragma GCC visibility pop
