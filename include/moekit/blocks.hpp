// SPDX-License-Identifier: Apache-2.0
// Wrapped blocks for depth / skip routers: a dense SwiGLU FFN and a small causal attention.
//
// Both are Expert functors for FunctorBank: a depth router (routers/depth.hpp) sends the
// tokens it selects to one of them and the layer returns `g_t * f(x_t)`; the caller adds the
// residual. Copies share their (immutable, packed) weights, so a block is cheap to copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/kernels/packed_gemm.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// A dense FFN block `f(x) = down(act(gate x) * up x)` (SwiGLU by default) applied row-wise to
/// the rows it gets: `in [rows, d] -> out [rows, d]`. Wraps a one-expert FfnBank.
class FfnBlock {
 public:
  /// Takes a one-expert bank (its weights already set).
  explicit FfnBlock(FfnBank bank) : bank_(std::make_shared<const FfnBank>(std::move(bank))) {
    MOEKIT_CHECK(bank_->num_experts() == 1, "FfnBlock: bank expected 1 expert, got ",
                 bank_->num_experts());
  }
  /// Packs one FFN of `shape` from HF-layout weights: `gate [f, d]` (gated only, else may be
  /// null), `up [f, d]`, `down [d, f]`.
  FfnBlock(FfnShape shape, const float* gate, const float* up, const float* down)
      : FfnBlock(make_bank(shape, gate, up, down)) {}

  [[nodiscard]] int64_t d_in() const noexcept { return bank_->d_in(); }
  [[nodiscard]] int64_t d_out() const noexcept { return bank_->d_out(); }
  [[nodiscard]] size_t scratch_floats(int64_t rows) const noexcept {
    return bank_->scratch_floats(rows);
  }
  /// `out [rows, d] = f(in [rows, d])`; `scratch` holds scratch_floats(rows) floats.
  void operator()(const float* in, int64_t rows, float* out, float* scratch) const noexcept {
    if (rows > 0) bank_->run(0, in, rows, out, scratch);
  }
  /// FLOPs of one row.
  [[nodiscard]] double flops_per_row() const noexcept { return bank_->flops_per_row(); }
  [[nodiscard]] const FfnBank& bank() const noexcept { return *bank_; }

 private:
  static FfnBank make_bank(FfnShape shape, const float* gate, const float* up, const float* down) {
    FfnBank b(1, shape);
    b.set_expert(0, gate, up, down);
    return b;
  }
  std::shared_ptr<const FfnBank> bank_;
};

static_assert(Expert<FfnBlock>);

/// A single-head causal self-attention block of width d: `q, k, v = Wq x, Wk x, Wv x`,
/// `o_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j`, `f(x_i) = Wo o_i`, all weights `[d, d]`
/// in HF `[out, in]` layout, no biases, no positional encoding.
///
/// It attends ONLY among the rows of one call: row i sees row j iff both belong to the same
/// sequence of the batch and `position(j) <= position(i)` (original positions, so a depth
/// router's skipped tokens are simply absent). With the BlockContext (the layer's call) the
/// sequences and positions come from `ctx.batch` and `ctx.tokens`; the 4-argument call treats
/// the rows as one sequence at positions 0..rows-1. `whole_blocks` makes the layer pass all
/// selected tokens in one call.
class CausalAttentionBlock {
 public:
  static constexpr bool whole_blocks = true;

  /// `wq, wk, wv, wo`: `[d, d]` each (d * d values, HF `[out, in]` layout).
  CausalAttentionBlock(int64_t hidden, std::span<const float> wq, std::span<const float> wk,
                       std::span<const float> wv, std::span<const float> wo)
      : d_(hidden) {
    MOEKIT_CHECK(hidden >= 1, "CausalAttentionBlock: hidden size (d) expected >= 1, got ", hidden);
    const auto dd = static_cast<size_t>(hidden * hidden);
    const char* names[4] = {"wq", "wk", "wv", "wo"};
    const std::span<const float> w[4] = {wq, wk, wv, wo};
    for (int i = 0; i < 4; ++i) {
      MOEKIT_CHECK(w[i].size() == dd, "CausalAttentionBlock: ", names[i], " expected [", hidden,
                   ", ", hidden, "] = ", dd, " values, got ", w[i].size());
      detail::check_finite(w[i], "CausalAttentionBlock", names[i], static_cast<size_t>(hidden));
    }
    auto p = std::make_shared<Packed>();
    std::vector<float> qkv(3 * dd);  // [3d, d]: Wq rows, then Wk, then Wv
    std::copy(wq.begin(), wq.end(), qkv.begin());
    std::copy(wk.begin(), wk.end(), qkv.begin() + static_cast<std::ptrdiff_t>(dd));
    std::copy(wv.begin(), wv.end(), qkv.begin() + static_cast<std::ptrdiff_t>(2 * dd));
    p->qkv.pack(qkv.data(), 3 * hidden, hidden, hidden);
    p->o.pack(wo.data(), hidden, hidden, hidden);
    w_ = std::move(p);
  }

  [[nodiscard]] int64_t d_in() const noexcept { return d_; }
  [[nodiscard]] int64_t d_out() const noexcept { return d_; }
  /// QKV `[rows, 3d]`, attention output `[rows, d]`, one score row `[rows]`, GEMM packing.
  [[nodiscard]] size_t scratch_floats(int64_t rows) const noexcept {
    return static_cast<size_t>(rows * 4 * d_ + rows) + kernels::packed_a_floats(rows, d_);
  }
  /// Projection FLOPs of one row (QKV and output: 8 d^2); the attention itself adds
  /// 4 d per attended (query, key) pair.
  [[nodiscard]] double projection_flops_per_row() const noexcept {
    return 8.0 * static_cast<double>(d_) * static_cast<double>(d_);
  }

  /// All rows are one sequence, row r at position r.
  void operator()(const float* in, int64_t rows, float* out, float* scratch) const noexcept {
    if (rows <= 0) return;
    float* o = project_qkv(in, rows, scratch);
    for (int64_t i = 0; i < rows; ++i) attend(scratch, rows, i, 0, i + 1, nullptr, o);
    project_out(o, rows, out, scratch);
  }

  /// Rows are the tokens `ctx.tokens` (ascending) of `*ctx.batch`; attention stays within a
  /// sequence and is causal on the tokens' positions. Without a batch, as the 4-argument call.
  void operator()(const float* in, int64_t rows, float* out, float* scratch,
                  const BlockContext& ctx) const {
    if (rows <= 0) return;
    if (ctx.batch == nullptr) {
      (*this)(in, rows, out, scratch);
      return;
    }
    const Batch& b = *ctx.batch;
    MOEKIT_CHECK(static_cast<int64_t>(ctx.tokens.size()) == rows,
                 "CausalAttentionBlock: ctx.tokens expected ", rows, " entries (one per row), got ",
                 ctx.tokens.size());
    float* o = project_qkv(in, rows, scratch);
    // Rows of one sequence are contiguous (tokens ascending, sequences contiguous ranges).
    int64_t r0 = 0;
    while (r0 < rows) {
      const int64_t t0 = ctx.tokens[static_cast<size_t>(r0)];
      MOEKIT_CHECK(t0 >= 0 && t0 < b.tokens, "CausalAttentionBlock: ctx.tokens[", r0,
                   "] expected in [0, ", b.tokens, "), got ", t0);
      const int64_t s = sequence_of(b, t0);
      const int64_t s_begin = b.sequence_begin(s), s_end = b.sequence_end(s);
      int64_t r1 = r0 + 1;
      while (r1 < rows && ctx.tokens[static_cast<size_t>(r1)] < s_end) {
        MOEKIT_CHECK(ctx.tokens[static_cast<size_t>(r1)] > ctx.tokens[static_cast<size_t>(r1) - 1],
                     "CausalAttentionBlock: ctx.tokens expected ascending, got ",
                     ctx.tokens[static_cast<size_t>(r1)], " after ",
                     ctx.tokens[static_cast<size_t>(r1) - 1]);
        ++r1;
      }
      const std::span<const int32_t> toks =
          ctx.tokens.subspan(static_cast<size_t>(r0), static_cast<size_t>(r1 - r0));
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t pi = position(b, ctx.tokens[static_cast<size_t>(i)], s_begin);
        attend(
            scratch, rows, i, r0, r1,
            [&](int64_t j) {
              return position(b, toks[static_cast<size_t>(j - r0)], s_begin) <= pi;
            },
            o);
      }
      r0 = r1;
    }
    project_out(o, rows, out, scratch);
  }

 private:
  struct Packed {
    kernels::PackedMatrix qkv;  // [3d, d]
    kernels::PackedMatrix o;    // [d, d]
  };

  static int64_t sequence_of(const Batch& b, int64_t t) noexcept {
    if (b.sequence_offsets.empty()) return 0;
    const auto it = std::upper_bound(b.sequence_offsets.begin(), b.sequence_offsets.end(),
                                     static_cast<int32_t>(t));
    return static_cast<int64_t>(it - b.sequence_offsets.begin()) - 1;
  }
  static int64_t position(const Batch& b, int64_t t, int64_t s_begin) noexcept {
    return b.positions.empty() ? t - s_begin : b.positions[static_cast<size_t>(t)];
  }

  // QKV [rows, 3d] at scratch; returns the attention output buffer [rows, d].
  float* project_qkv(const float* in, int64_t rows, float* scratch) const noexcept {
    float* a_pack = scratch + rows * 4 * d_ + rows;
    kernels::gemm_packed(rows, in, d_, w_->qkv, scratch, 3 * d_, a_pack);
    return scratch + rows * 3 * d_;
  }
  void project_out(const float* o, int64_t rows, float* out, float* scratch) const noexcept {
    float* a_pack = scratch + rows * 4 * d_ + rows;
    kernels::gemm_packed(rows, o, d_, w_->o, out, d_, a_pack);
  }

  // o_i = softmax over the visible rows j in [j0, j1) of q_i . k_j / sqrt(d), times v_j.
  // `visible(j)` null means all of [j0, j1) are visible.
  template <class Visible>
  void attend(float* qkv, int64_t rows, int64_t i, int64_t j0, int64_t j1, const Visible& visible,
              float* o) const noexcept {
    const int64_t ld = 3 * d_;
    float* score = qkv + rows * 4 * d_;  // score row [rows], after QKV and o
    const float* q = qkv + i * ld;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d_));
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = j0; j < j1; ++j) {
      if (!is_visible(visible, j)) continue;
      score[j] = kernels::dot(q, qkv + j * ld + d_, d_) * scale;
      m = std::max(m, score[j]);
    }
    float sum = 0.0f;
    for (int64_t j = j0; j < j1; ++j) {
      if (!is_visible(visible, j)) continue;
      score[j] = std::exp(score[j] - m);
      sum += score[j];
    }
    float* oi = o + i * d_;
    kernels::zero_row(oi, d_);
    const float inv = 1.0f / sum;
    for (int64_t j = j0; j < j1; ++j)
      if (is_visible(visible, j)) kernels::axpy_row(score[j] * inv, qkv + j * ld + 2 * d_, oi, d_);
  }
  template <class Visible>
  static bool is_visible(const Visible& v, int64_t j) noexcept {
    if constexpr (std::is_same_v<Visible, std::nullptr_t>) {
      (void)j;
      return true;
    } else {
      return v(j);
    }
  }

  int64_t d_ = 0;
  std::shared_ptr<const Packed> w_;
};

static_assert(Expert<CausalAttentionBlock>);
static_assert(ContextAwareExpert<CausalAttentionBlock>);
static_assert(whole_blocks_v<CausalAttentionBlock>);

/// LLaMA's RMSNorm of `rows` rows: `out = g * (x / sqrt(mean(x^2) + eps))` (the mean in
/// double, the scale rounded to f32 once per row; HF LlamaRMSNorm in f32).
inline void rms_norm_rows(const float* x, int64_t rows, int64_t d, const float* g, double eps, float* out) noexcept {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    double ss = 0.0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const auto inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = g[i] * (xr[i] * inv);
  }
}

/// gamma-MoD's routed decoder layer as the official inference code runs it (Gamma-MOD
/// `llava_llama_mod.py`, MoDLlamaDecoderLayer_forward_inference, commit 5de27f2) on the tokens
/// its router selected: with `ln1`, `ln2` the layer's RMSNorms (`input_layernorm.weight`,
/// `post_attention_layernorm.weight`, `[d]`) and p the token's routing weight,
///
///     a = attn(ln1(x))      (attention among the selected tokens only, causal)
///     h = x + a
///     f(x) = a + p * mlp(ln2(h))        (the layer adds x back: y = h + p mlp(ln2(h)))
///
/// Only the MLP is weighted by p (applies_weight: the layer passes p in BlockContext::weights
/// and adds f unweighted); unselected tokens skip the whole layer. The attention is
/// CausalAttentionBlock (one head, no positional encoding): the official layer's multi-head
/// rotary attention is the engine's (compacted positions, selected tokens only).
class GammaModBlock {
 public:
  static constexpr bool whole_blocks = true;
  static constexpr bool applies_weight = true;

  GammaModBlock(std::vector<float> ln1, CausalAttentionBlock attn, std::vector<float> ln2, FfnBlock mlp,
                double rms_norm_eps = 1e-6)
      : ln1_(std::move(ln1)), ln2_(std::move(ln2)), attn_(std::move(attn)), mlp_(std::move(mlp)), eps_(rms_norm_eps) {
    const int64_t d = attn_.d_in();
    MOEKIT_CHECK(mlp_.d_in() == d, "GammaModBlock: mlp width expected ", d, " (the attention's), got ", mlp_.d_in());
    MOEKIT_CHECK(static_cast<int64_t>(ln1_.size()) == d && static_cast<int64_t>(ln2_.size()) == d,
                 "GammaModBlock: input_layernorm / post_attention_layernorm weights expected [", d, "], got [",
                 ln1_.size(), "] and [", ln2_.size(), "]");
    MOEKIT_CHECK(std::isfinite(eps_) && eps_ > 0 && eps_ < 1, "GammaModBlock: rms_norm_eps expected in (0, 1), got ", eps_);
    detail::check_finite(ln1_, "GammaModBlock", "input_layernorm.weight");
    detail::check_finite(ln2_, "GammaModBlock", "post_attention_layernorm.weight");
  }

  [[nodiscard]] int64_t d_in() const noexcept { return attn_.d_in(); }
  [[nodiscard]] int64_t d_out() const noexcept { return attn_.d_in(); }
  /// ln1(x) / ln2(h), a, h, the MLP's output (`[rows, d]` each), then the larger of the two
  /// blocks' scratch.
  [[nodiscard]] size_t scratch_floats(int64_t rows) const noexcept {
    return static_cast<size_t>(4 * rows * d_in()) + std::max(attn_.scratch_floats(rows), mlp_.scratch_floats(rows));
  }

  /// The rows as one sequence, weight 1.
  void operator()(const float* in, int64_t rows, float* out, float* scratch) const {
    (*this)(in, rows, out, scratch, BlockContext{});
  }
  void operator()(const float* in, int64_t rows, float* out, float* scratch, const BlockContext& ctx) const {
    if (rows <= 0) return;
    const int64_t d = d_in(), n = rows * d;
    MOEKIT_CHECK(ctx.weights.empty() || static_cast<int64_t>(ctx.weights.size()) == rows,
                 "GammaModBlock: ctx.weights expected ", rows, " entries (one per row), got ", ctx.weights.size());
    float* normed = scratch;
    float* a = scratch + n;
    float* h = scratch + 2 * n;
    float* m = scratch + 3 * n;
    float* inner = scratch + 4 * n;
    rms_norm_rows(in, rows, d, ln1_.data(), eps_, normed);
    attn_(normed, rows, a, inner, ctx);
    for (int64_t i = 0; i < n; ++i) h[i] = in[i] + a[i];
    rms_norm_rows(h, rows, d, ln2_.data(), eps_, normed);
    mlp_(normed, rows, m, inner);
    for (int64_t r = 0; r < rows; ++r) {
      const float p = ctx.weights.empty() ? 1.0f : ctx.weights[static_cast<size_t>(r)];
      for (int64_t i = 0; i < d; ++i) out[r * d + i] = a[r * d + i] + p * m[r * d + i];
    }
  }

 private:
  std::vector<float> ln1_, ln2_;
  CausalAttentionBlock attn_;
  FfnBlock mlp_;
  double eps_;
};

static_assert(Expert<GammaModBlock>);
static_assert(ContextAwareExpert<GammaModBlock>);
static_assert(whole_blocks_v<GammaModBlock> && applies_weight_v<GammaModBlock>);

}  // namespace moekit
#pragma GCC visibility pop
