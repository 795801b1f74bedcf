// SPDX-License-Identifier: Apache-2.0
// Independent double-precision reference of MoBA (block attention routing), a transcription
// of MoonshotAI/MoBA `moba/moba_naive.py` (commit 61e456bc) into plain loops: per sequence,
// block gate keys are the means of each block's keys; query t's gate scores q_t . mean over
// the earlier blocks; the own block always and the top_k - 1 best earlier blocks are kept
// (ties: the lower block index); one softmax over the kept keys, causal in the own block.
// Includes no moekit header.
#pragma once

#include <cstdint>
#include <vector>

namespace ref::moba {

struct Params {
  int64_t heads = 1, kv_heads = 1, head_dim = 1;
  int64_t block_size = 1, top_k = 1;
  double scale = 0.0;  // 0: head_dim^-1/2
  /// Attend to every earlier block (dense causal attention).
  bool dense = false;
};

struct Result {
  /// [T * heads]: the kept blocks ascending (own last).
  std::vector<std::vector<int32_t>> blocks;
  /// [T * heads]: the gap between the last kept and the first dropped earlier block's score is
  /// within `tie` (relative): an f32 gate may order them either way.
  std::vector<bool> near_tie;
  std::vector<double> out;  // [T, heads, head_dim]
  int64_t keys_attended = 0, causal_keys = 0;
};

/// q [T, heads, d], k and v [T, kv_heads, d]; cu = sequence offsets (0 .. T).
Result attention(const Params& p, const float* q, const float* k, const float* v, int64_t T,
                 const std::vector<int64_t>& cu, double tie);

}  // namespace ref::moba
