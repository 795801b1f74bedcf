// SPDX-License-Identifier: Apache-2.0
// Dr.LLM skip / execute / repeat routing of one wrapped block, per sequence (ROUTING.md
// section 5). Paper: "Dr.LLM: Dynamic Layer Routing in LLMs", arXiv 2510.12773.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "moekit/activation.hpp"
#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Dr.LLM's three actions: how many times a sequence runs the wrapped block.
enum class DrLlmAction : int32_t { skip = 0, execute = 1, repeat = 2 };

/// Parameters of the Dr.LLM router (ROUTING.md section 5). JSON keys = field names.
struct DrLlmOptions {
  int64_t hidden = 0;        ///< d
  int64_t bottleneck = 128;  ///< width of the router MLP (`router.0.weight` is [bottleneck, d])
  int64_t windows = 8;  ///< at most this many pooling windows per sequence (W = min(windows, T_s))
  /// The official code's `router_penalty` p in [-1, 1] (`continuous_router_decision`): the
  /// action is the argmax of softmax(z) blended with fixed choices (p <= -0.5: skip and router,
  /// up to 0.5: router and execute, above: execute and repeat). Unset: argmax z (the router
  /// alone, what p = -0.5 gives). The released code sets 0.5: always execute.
  std::optional<double> router_penalty{};

  /// Throws moekit::error naming the first invalid parameter.
  void validate() const {
    MOEKIT_CHECK(hidden >= 1, "drllm router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(bottleneck >= 1, "drllm router: bottleneck expected >= 1, got ", bottleneck);
    MOEKIT_CHECK(windows >= 1, "drllm router: windows expected >= 1, got ", windows);
    MOEKIT_CHECK(!router_penalty || (std::isfinite(*router_penalty) && *router_penalty >= -1 && *router_penalty <= 1),
                 "drllm router: router_penalty expected in [-1, 1], got ", router_penalty.value_or(0.0));
  }
};

/// Dr.LLM router: per sequence, the unpadded tokens are cut into W = min(windows, T_s)
/// windows of floor(T_s / W) tokens (the tail dropped) and mean pooled; the bottleneck MLP
/// `Linear(d, bottleneck) -> GELU(tanh) -> Linear(bottleneck, 3)` maps each window mean to 3
/// logits, which are averaged over the windows; the argmax (ties to the lower action) picks
/// {skip, execute, repeat} = run the block 0, 1 or 2 times. A sequence without unpadded
/// tokens skips. The plan has E = 1: every unpadded token of a sequence that executes or
/// repeats gets one slot of weight 1.
///
/// After route() / decide(): `scratch.index[0 .. S)` holds each sequence's repeats (0, 1,
/// 2), `scratch.logits` the `[S, 3]` window-averaged logits (0 for empty sequences) and
/// `scratch.values` the `[T]` weight on the block's first pass (1 executed, 0 not).
/// route() gives the first pass only: run repeats through DrLlmLayer, not SparseLayer::forward.
class DrLlmRouter {
 public:
  /// Multiply-adds below which decide() runs on the calling thread alone.
  static constexpr int64_t kParallelWork = int64_t{1} << 18;

  /// `w0 [bottleneck, d]` (`router.0.weight`), `b0 [bottleneck]` (`router.0.bias`),
  /// `w2 [3, bottleneck]` (`router.2.weight`), `b2 [3]` (`router.2.bias`).
  DrLlmRouter(DrLlmOptions options, std::vector<float> w0, std::vector<float> b0,
              std::vector<float> w2, std::vector<float> b2)
      : opt_(options),
        w0_(std::move(w0)),
        b0_(std::move(b0)),
        w2_(std::move(w2)),
        b2_(std::move(b2)) {
    opt_.validate();
    const auto d = static_cast<size_t>(opt_.hidden), h = static_cast<size_t>(opt_.bottleneck);
    check_tensor(w0_, h * d, "router.0.weight", h, d);
    check_tensor(b0_, h, "router.0.bias", h, 0);
    check_tensor(w2_, 3 * h, "router.2.weight", 3, h);
    check_tensor(b2_, 3, "router.2.bias", 3, 0);
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return 1; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] const DrLlmOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<float>& w0() const noexcept { return w0_; }
  [[nodiscard]] const std::vector<float>& b0() const noexcept { return b0_; }
  [[nodiscard]] const std::vector<float>& w2() const noexcept { return w2_; }
  [[nodiscard]] const std::vector<float>& b2() const noexcept { return b2_; }

  /// Router FLOPs of one call on `batch`: pooling (one add per value of a pooled token) and
  /// the MLP on every window.
  [[nodiscard]] double flops(const Batch& batch) const {
    double f = 0;
    for (int64_t s = 0; s < batch.num_sequences(); ++s) {
      const int64_t n = unpadded_in(batch, s);
      if (n == 0) continue;
      const int64_t W = std::min(opt_.windows, n), L = n / W;
      f += static_cast<double>(W * L * opt_.hidden) +
           static_cast<double>(W) * 2.0 * static_cast<double>(opt_.bottleneck * (opt_.hidden + 3));
    }
    return f;
  }

  /// Decides each sequence's repeats (see the class comment for where they are left).
  /// Throws moekit::error if a window logit is not finite (NaN / Inf in the pooled tokens).
  void decide(const Batch& batch, const float* hidden, RouterScratch& scratch,
              int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, S = batch.num_sequences(), d = opt_.hidden, H = opt_.bottleneck;
    MOEKIT_CHECK(T == 0 || hidden != nullptr,
                 "drllm router: hidden states pointer is null for T = ", T);
    const int nt = detail::resolve_threads(threads);

    // index: [0, S) repeats | [S, S + T) unpadded tokens in order | windows: (first, length,
    // sequence)
    std::vector<int32_t>& idx = scratch.index;
    if (idx.size() < static_cast<size_t>(S + T)) idx.resize(static_cast<size_t>(S + T));
    int64_t n_tok = 0, n_win = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t first = n_tok;
      for (int64_t t = batch.sequence_begin(s); t < batch.sequence_end(s); ++t)
        if (!batch.is_padding(t)) idx[static_cast<size_t>(S + n_tok++)] = static_cast<int32_t>(t);
      const int64_t n = n_tok - first;
      if (n > 0) n_win += std::min(opt_.windows, n);
      idx[static_cast<size_t>(s)] = static_cast<int32_t>(first);  // temporarily: first token of s
    }
    const int64_t wbase = S + T;
    if (idx.size() < static_cast<size_t>(wbase + 3 * n_win))
      idx.resize(static_cast<size_t>(wbase + 3 * n_win));
    {
      int64_t w = 0;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t first = idx[static_cast<size_t>(s)];
        const int64_t n = (s + 1 < S ? idx[static_cast<size_t>(s + 1)] : n_tok) - first;
        if (n == 0) continue;
        const int64_t W = std::min(opt_.windows, n), L = n / W;
        for (int64_t j = 0; j < W; ++j, ++w) {
          idx[static_cast<size_t>(wbase + 3 * w)] = static_cast<int32_t>(first + j * L);
          idx[static_cast<size_t>(wbase + 3 * w + 1)] = static_cast<int32_t>(L);
          idx[static_cast<size_t>(wbase + 3 * w + 2)] = static_cast<int32_t>(s);
        }
      }
    }

    // Per window: mean [d], hidden [H], logits [3]. One window per iteration, fixed order
    // (threads only split windows, so results never depend on the thread count); small
    // batches stay on one thread, where a parallel region costs more than the work.
    const size_t per_window = static_cast<size_t>(d + H + 3);
    if (scratch.buffer.size() < per_window * static_cast<size_t>(n_win))
      scratch.buffer.resize(per_window * static_cast<size_t>(n_win));
    const bool parallel = nt > 1 && n_win > 1 && (n_tok + n_win * H) * d >= kParallelWork;
#pragma omp parallel for num_threads(nt) schedule(static) if (parallel)
    for (int64_t w = 0; w < n_win; ++w) {
      float* mean = scratch.buffer.data() + per_window * static_cast<size_t>(w);
      float* h = mean + d;
      float* z = h + H;
      const int64_t first = idx[static_cast<size_t>(wbase + 3 * w)],
                    L = idx[static_cast<size_t>(wbase + 3 * w + 1)];
      const int32_t* toks = idx.data() + S + first;
      kernels::copy_row(hidden + static_cast<int64_t>(toks[0]) * d, mean, d);
      for (int64_t i = 1; i < L; ++i)
        kernels::axpy_row(1.0f, hidden + static_cast<int64_t>(toks[i]) * d, mean, d);
      kernels::scale_row(1.0f / static_cast<float>(L), mean, mean, d);
      kernels::matvec_rows(mean, w0_.data(), H, d, h);
      for (int64_t i = 0; i < H; ++i)
        h[i] = activate(Activation::gelu_tanh, h[i] + b0_[static_cast<size_t>(i)]);
      kernels::matvec_rows(h, w2_.data(), 3, H, z);
      for (int64_t a = 0; a < 3; ++a) z[a] += b2_[static_cast<size_t>(a)];
    }

    // Average the windows' logits per sequence (window order), argmax with ties to the lower.
    scratch.logits.assign(static_cast<size_t>(3 * S), 0.0f);
    int64_t w = 0;
    for (int64_t s = 0; s < S; ++s) {
      float* mz = scratch.logits.data() + 3 * s;
      int64_t W = 0;
      for (; w < n_win && idx[static_cast<size_t>(wbase + 3 * w + 2)] == s; ++w, ++W) {
        const float* z = scratch.buffer.data() + per_window * static_cast<size_t>(w) + d + H;
        for (int64_t a = 0; a < 3; ++a) {
          MOEKIT_CHECK(std::isfinite(z[a]), "drllm router: logit ", a, " of window ", W,
                       " of sequence ", s, " expected finite, got ", z[a],
                       " (NaN or Inf in hidden_states or the router weights)");
          mz[a] += z[a];
        }
      }
      int32_t best = 0;
      if (W > 0) {
        for (int64_t a = 0; a < 3; ++a) mz[a] /= static_cast<float>(W);
        best = opt_.router_penalty ? penalised_action(mz, *opt_.router_penalty) : argmax3(mz);
      }
      idx[static_cast<size_t>(s)] = best;
    }
    fill_values(batch, std::span<const int32_t>(idx.data(), static_cast<size_t>(S)),
                scratch.values);
  }

  /// The first of the largest of three values.
  static int32_t argmax3(const float* v) noexcept {
    int32_t best = 0;
    for (int32_t a = 1; a < 3; ++a)
      if (v[a] > v[best]) best = a;
    return best;
  }

  /// The official `continuous_router_decision(z, p)` (deterministic), in f32: softmax of z
  /// blended with one-hot choices, argmax (first of equals).
  static int32_t penalised_action(const float* z, double p) noexcept {
    const float m = std::max({z[0], z[1], z[2]});
    float r[3], sum = 0.0f;
    for (int a = 0; a < 3; ++a) sum += (r[a] = std::exp(z[a] - m));
    for (float& v : r) v /= sum;
    float f[3];
    if (p <= -0.5) {
      const auto t = static_cast<float>((p + 1.0) / 0.5);
      for (int a = 0; a < 3; ++a) f[a] = (1 - t) * (a == 0 ? 1.0f : 0.0f) + t * r[a];
    } else if (p <= 0.5) {
      const auto t = static_cast<float>((p + 0.5) / 1.0);
      for (int a = 0; a < 3; ++a) f[a] = (1 - t) * r[a] + t * (a == 1 ? 1.0f : 0.0f);
    } else {
      const auto t = static_cast<float>((p - 0.5) / 0.5);
      for (int a = 0; a < 3; ++a) f[a] = (1 - t) * (a == 1 ? 1.0f : 0.0f) + t * (a == 2 ? 1.0f : 0.0f);
    }
    return argmax3(f);
  }

  /// Decides and writes the first-pass plan (E = 1; tokens of executing and repeating
  /// sequences, weight 1), finalised.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    decide(batch, hidden, scratch, threads);
    plan_for(
        batch,
        std::span<const int32_t>(scratch.index.data(), static_cast<size_t>(batch.num_sequences())),
        1, plan);
  }

  /// The plan of the unpadded tokens of every sequence s with `repeats[s] >= min_repeats`
  /// (one slot on expert 0, weight 1), finalised. Validates `repeats` ([S], values 0..2).
  static void plan_for(const Batch& batch, std::span<const int32_t> repeats, int32_t min_repeats,
                       RoutingPlan& plan) {
    check_repeats(batch, repeats);
    const int64_t S = batch.num_sequences();
    int64_t s = 0;
    plan.reset(batch.tokens, 1, [&](int64_t t) -> int64_t {
      while (s + 1 < S && t >= batch.sequence_end(s)) ++s;  // tokens ascending: sequences in order
      return !batch.is_padding(t) && repeats[static_cast<size_t>(s)] >= min_repeats ? 1 : 0;
    });
    for (int64_t t = 0; t < batch.tokens; ++t)
      if (plan.slots_of(t) == 1) plan.token_weights(t)[0] = 1.0f;
    plan.finalize();
  }

  /// Checks a frozen decision array: `[S]` entries, each 0, 1 or 2.
  static void check_repeats(const Batch& batch, std::span<const int32_t> repeats) {
    MOEKIT_CHECK(static_cast<int64_t>(repeats.size()) == batch.num_sequences(),
                 "drllm: repeats expected [", batch.num_sequences(), "] (one per sequence), got ",
                 repeats.size(), " values");
    for (size_t s = 0; s < repeats.size(); ++s)
      MOEKIT_CHECK(repeats[s] >= 0 && repeats[s] <= 2, "drllm: repeats[", s,
                   "] expected 0 (skip), 1 (execute) or 2 (repeat), got ", repeats[s]);
  }

  /// `values [T]`: 1 for unpadded tokens of sequences with repeats >= 1, else 0.
  static void fill_values(const Batch& batch, std::span<const int32_t> repeats,
                          std::vector<float>& values) {
    values.assign(static_cast<size_t>(batch.tokens), 0.0f);
    for (int64_t s = 0; s < batch.num_sequences(); ++s)
      if (repeats[static_cast<size_t>(s)] >= 1)
        for (int64_t t = batch.sequence_begin(s); t < batch.sequence_end(s); ++t)
          values[static_cast<size_t>(t)] = batch.is_padding(t) ? 0.0f : 1.0f;
  }

 private:
  static int64_t unpadded_in(const Batch& batch, int64_t s) noexcept {
    int64_t n = 0;
    for (int64_t t = batch.sequence_begin(s); t < batch.sequence_end(s); ++t)
      n += !batch.is_padding(t);
    return n;
  }
  static void check_tensor(const std::vector<float>& v, size_t n, const char* name, size_t rows,
                           size_t cols) {
    if (cols == 0) {
      MOEKIT_CHECK(v.size() == n, "drllm router: ", name, " expected [", rows, "], got ", v.size(),
                   " values");
    } else {
      MOEKIT_CHECK(v.size() == n, "drllm router: ", name, " expected [", rows, ", ", cols,
                   "] = ", n, " values, got ", v.size());
    }
    detail::check_finite(v, "drllm router", name, cols);
  }

  DrLlmOptions opt_;
  std::vector<float> w0_, b0_, w2_, b2_;
};

static_assert(Router<DrLlmRouter>);

}  // namespace moekit
#pragma GCC visibility pop
