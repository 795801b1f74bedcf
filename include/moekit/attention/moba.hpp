// SPDX-License-Identifier: Apache-2.0
// Block attention routing (MoBA, arXiv 2502.13189; "Optimizing Mixture of Block Attention",
// arXiv 2511.11571): each query token attends to its own key block and to the top-k - 1
// earlier blocks by affinity with the blocks' mean keys, causally. The gate returns an
// inspectable plan (the blocks of every token and head); the attention runs blocked GEMMs on
// moekit's packed kernels, and the same kernel computes dense causal attention as the peer.
//
// Semantics: MoonshotAI/MoBA `moba/moba_naive.py` (commit 61e456bc), per sequence of the
// batch:
//  - blocks of `block_size` keys from the sequence start (the last may be partial); a block's
//    gate key is the plain mean of its keys (per kv head);
//  - the gate score of query t and block j is `q_t . mean_k(j)` (no scaling, no softmax);
//    future blocks never count, the query's own block always does, and of the earlier blocks
//    the top_k - 1 with the highest scores are kept (ties: the lower block index, where the
//    official code leaves the order to torch.topk);
//  - attention is one softmax over every key of the kept blocks, causal inside the own block,
//    `softmax(scale * q . k) v` with scale = head_dim^-1/2 by default.
// Grouped-query attention is an extension: H query heads over H_kv key / value heads
// (H_kv divides H; query head h reads kv head h / (H / H_kv)), the gate scoring the kv head's
// block means. H_kv = H is the official layout.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moekit/kernels/packed_gemm.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::attention {

/// The tensors' shape: q `[tokens, heads, head_dim]`, k and v `[tokens, kv_heads, head_dim]`,
/// row-major f32 (flash-attention's varlen layout: the sequences of a batch one after another).
struct AttentionShape {
  int64_t tokens = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;  ///< 0: the same as heads
  int64_t head_dim = 0;
};

struct MobaOptions {
  int64_t block_size = 512;  ///< keys per block (moba_chunk_size)
  int64_t top_k = 3;         ///< blocks per query, its own block included (moba_topk)
  float scale = 0.0f;        ///< softmax scale; 0 = head_dim^-1/2
};

/// The gate's decisions: for every token t and query head h, the sequence-local indices of
/// the key blocks it attends to, ascending (its own block last), min(top_k, own block + 1) of
/// them.
class MobaPlan {
 public:
  [[nodiscard]] int64_t tokens() const noexcept { return tokens_; }
  [[nodiscard]] int64_t heads() const noexcept { return heads_; }
  [[nodiscard]] int64_t top_k() const noexcept { return top_k_; }
  [[nodiscard]] int64_t block_size() const noexcept { return block_size_; }
  /// The blocks of token t (a row of the batch) and query head h.
  [[nodiscard]] std::span<const int32_t> blocks(int64_t t, int64_t h) const noexcept {
    const size_t i = static_cast<size_t>(t * heads_ + h);
    return {blocks_.data() + i * static_cast<size_t>(stride_), static_cast<size_t>(count_[i])};
  }
  /// Keys the plan attends to, summed over tokens and heads, and what dense causal attention
  /// would (their ratio is the fraction of the attention work MoBA does).
  [[nodiscard]] int64_t keys_attended() const noexcept { return keys_attended_; }
  [[nodiscard]] int64_t causal_keys() const noexcept { return causal_keys_; }

 private:
  friend struct MobaAccess;
  int64_t tokens_ = 0, heads_ = 0, top_k_ = 0, block_size_ = 0;
  int64_t stride_ = 0;  // min(top_k, the most blocks a sequence has)
  std::vector<int64_t> cu_;  // the sequence offsets it was made for
  int64_t keys_attended_ = 0, causal_keys_ = 0;
  std::vector<int32_t> blocks_;  // [tokens, heads, stride_], the first count_ of each used
  std::vector<int32_t> count_;   // [tokens, heads]
};

/// Scratch the attention reuses between calls (the packed key and value tiles, per-thread
/// buffers); one per concurrent caller.
struct MobaWorkspace {
  std::vector<kernels::PackedMatrix> keys, values;  // per (kv head, key tile)
  std::vector<std::vector<float>> scratch;           // per thread
  std::vector<float> transpose;                      // per thread, [head_dim, tile]
  std::vector<float> means;                          // [kv_heads, blocks, head_dim]
  std::vector<float> partial;  // [tokens, heads, min(top_k, blocks), head_dim + 2]: per kept block
};

/// The gate: fills `plan` from q and k. `cu_seqlens` `[S + 1]` gives the sequences' row
/// ranges (0 first, tokens last, non-decreasing); empty = one sequence. Decisions do not
/// depend on the thread count. Throws moekit::error for bad shapes or options, non-finite q
/// or k, and bad cu_seqlens.
void moba_gate(const AttentionShape& shape, const float* q, const float* k, std::span<const int64_t> cu_seqlens,
               const MobaOptions& opt, MobaPlan& plan, MobaWorkspace& ws, int threads = 0);

/// Block-sparse attention over the plan's blocks: out `[tokens, heads, head_dim]`. `plan`
/// must come from moba_gate with the same shape, options and cu_seqlens. out must not
/// overlap q, k or v. Results do not depend on the thread count.
/// As flash-moba does (mit-han-lab/flash-moba), the work is key-block-centric: the queries
/// that chose an earlier block are gathered and run against its keys in GEMMs of up to 128
/// rows, each giving a per-block partial (running maximum, sum, numerators), and the own
/// block per tile of queries; each (token, head) then merges its partials in block order.
void moba_attention(const AttentionShape& shape, const float* q, const float* k, const float* v,
                    std::span<const int64_t> cu_seqlens, const MobaOptions& opt, const MobaPlan& plan, float* out,
                    MobaWorkspace& ws, int threads = 0);

/// moba_gate then moba_attention.
void moba_forward(const AttentionShape& shape, const float* q, const float* k, const float* v,
                  std::span<const int64_t> cu_seqlens, const MobaOptions& opt, MobaPlan& plan, float* out,
                  MobaWorkspace& ws, int threads = 0);

/// Dense causal attention on the same kernels (every earlier key, flash-attention's loop over
/// query tiles): the peer MoBA is measured against. Equals moba_attention within float
/// rounding for a plan that keeps every block (top_k at least the number of blocks);
/// `opt.top_k` is not read.
void causal_attention(const AttentionShape& shape, const float* q, const float* k, const float* v,
                      std::span<const int64_t> cu_seqlens, const MobaOptions& opt, float* out, MobaWorkspace& ws,
                      int threads = 0);

}  // namespace moekit::attention
#pragma GCC visibility pop
