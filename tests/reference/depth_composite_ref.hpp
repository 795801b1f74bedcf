// SPDX-License-Identifier: Apache-2.0
// Independent double-precision reference of Dr.LLM skip / execute / repeat routing and
// Mixture-of-Recursions (ROUTING.md section 5), with the wrapped blocks they run (a dense FFN
// and a single-head causal attention among the tokens a router selected), for tests and
// benchmarks.
//
// Plain loops, written for clarity; shares no code with the library and includes no moekit
// header (nor tests/reference/reference.hpp). No GoogleTest: the benchmark compiles it too.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace ref_dc {

// ------------------------------------------------------------------------ batch layout
/// Sequences, positions and padding of a flat batch of T tokens of width d.
struct Layout {
  int64_t tokens = 0;
  int64_t hidden = 0;
  std::vector<int64_t> offsets;    ///< [S + 1]; empty = one sequence of all tokens
  std::vector<uint8_t> padding;    ///< [T], 1 = padded; empty = none
  std::vector<int64_t> positions;  ///< [T]; empty = index inside the sequence

  int64_t sequences() const;
  int64_t begin(int64_t s) const;
  int64_t end(int64_t s) const;
  bool padded(int64_t t) const;
  int64_t sequence_of(int64_t t) const;
  int64_t position(int64_t t) const;
};

using Row = std::vector<double>;
using Rows = std::vector<Row>;

/// A wrapped block: maps the rows of a set of tokens (ascending token ids) to its delta f.
/// Blocks that mix tokens (attention) only see the tokens they are given.
using Block = std::function<Rows(const std::vector<int64_t>& tokens, const Rows& x)>;

// ------------------------------------------------------------------------ blocks
enum class Act { silu, gelu, gelu_tanh, relu };
double activate(Act a, double x);

/// One FFN, HF [out, in] layout: gated `down(act(gate x) * up x)`, plain `down(act(up x))`.
struct FfnWeights {
  int64_t hidden = 0, intermediate = 0;
  bool gated = true;
  Act act = Act::silu;
  std::vector<float> gate, up, down;  ///< [f, d], [f, d], [d, f]
};
/// Row-wise FFN block.
Block ffn_block(FfnWeights w);

/// Single-head attention, weights [d, d] HF layout, no biases: row i attends to the given rows
/// j of its own sequence with position(j) <= position(i), softmax(q_i . k_j / sqrt(d)),
/// output Wo (sum p_ij v_j).
struct AttentionWeights {
  int64_t hidden = 0;
  std::vector<float> wq, wk, wv, wo;
};
Block attention_block(AttentionWeights w, Layout layout);

// ------------------------------------------------------------------------ Dr.LLM
struct DrLlmParams {
  int64_t hidden = 0, bottleneck = 128, windows = 8;
  std::vector<float> w0, b0, w2, b2;  ///< [H, d], [H], [3, H], [3]
  bool penalty = false;               ///< apply the official router_penalty blend
  double router_penalty = 0.0;
};

struct DrLlmDecision {
  std::vector<int> repeats;  ///< [S] 0 skip, 1 execute, 2 repeat (0 for empty sequences)
  std::vector<std::array<double, 3>> logits;  ///< [S] window-averaged logits
  std::vector<double>
      margin;  ///< [S] relative gap between the best and the runner-up (+inf if empty)
  std::vector<int64_t> windows;  ///< [S] windows used
};

/// Windows of the unpadded tokens (W = min(windows, n), floor(n / W) tokens each, tail dropped),
/// mean, MLP (GELU tanh), mean of the logits over windows, argmax (ties: lower action).
DrLlmDecision drllm_decide(const DrLlmParams& p, const float* x, const Layout& layout);

/// Output `[T * d]`: per sequence 0, f(x) or f(x) + f(x + f(x)); 0 for padded tokens.
std::vector<double> drllm_forward(const std::vector<int>& repeats, const Block& block,
                                  const float* x, const Layout& layout);

// ------------------------------------------------------------------------ MoR
enum class MoRAct { sigmoid, tanh, raw };

struct MoRParams {
  int64_t hidden = 0, num_recursions = 3;
  MoRAct act = MoRAct::sigmoid;
  double alpha = 0.1;
  std::vector<double> capacity_factors;  ///< empty: (N_r - r) / N_r
  std::vector<float> theta;              ///< [N_r, d]
  /// The official combine (raymin0223/mixture_of_recursions model/mor_model/expert_choice_router.py,
  /// commit 82c97f2, STEP 5): x <- x + g * block(x) with block(x) = x + f(x); false: x + g f(x).
  bool block_residual = true;
};

struct MoRResult {
  std::vector<double> out;                   ///< [T * d] x_final - x
  std::vector<int> depth;                    ///< [T]
  std::vector<double> router_weights;        ///< [T] last g applied, 0 if none
  std::vector<std::vector<uint8_t>> chosen;  ///< [N_r][T] chosen at each recursion
  std::vector<double> sequence_gap;  ///< [S] smallest relative gap last chosen / first unchosen z
                                     ///< over the steps (+inf if none)
};

/// Recursions r = 0..N_r-1: z = theta_r . x on the current x of the candidates, per sequence
/// the top min(max(1, floor(cf_r * S_s)), candidates) by z (ties: lower token), g = alpha act(z),
/// x += g (x + f(x)) (block_residual) or g f(x) for them. With `forced` ([N_r][T]), the chosen sets are taken from it instead.
MoRResult mor_forward(const MoRParams& p, const Block& block, const float* x, const Layout& layout,
                      const std::vector<std::vector<uint8_t>>* forced = nullptr);

// ------------------------------------------------------------------------ comparison
/// |a - b| / max(|a|, |b|), 0 when equal.
double relative_gap(double a, double b);
/// |got - want| <= rel |want| + floor_frac * max|want| for every value of rows not skipped.
std::vector<std::string> compare_values(const std::vector<double>& want, const float* got,
                                        int64_t width, double rel, double floor_frac,
                                        const std::vector<uint8_t>& skip_rows = {});
double max_abs(const std::vector<double>& v);

}  // namespace ref_dc
