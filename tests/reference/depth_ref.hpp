// SPDX-License-Identifier: Apache-2.0
// Independent double-precision reference of the depth / skip routers (ROUTING.md section 5:
// Mixture-of-Depths, gamma-MoD with ARank, token-wise pruning), of the wrapped FFN and causal
// attention blocks and of the depth layer `y_t = g_t f(x_t)`, for tests and benchmarks.
//
// Plain loops, written for clarity; shares no code with the library (depth_ref.cpp includes
// no moekit header, every type here is its own). No GoogleTest: the benchmark binary compiles
// depth_ref.cpp too.
#pragma once

#include <cstdint>
#include <vector>

namespace depth_ref {

/// The batch layout: sequences, positions, padding, token types.
struct Layout {
  int64_t tokens = 0;                ///< T
  int64_t hidden = 0;                ///< d
  std::vector<int32_t> offsets;      ///< [S + 1]; empty = one sequence
  std::vector<int32_t> positions;    ///< [T]; empty = index inside the sequence
  std::vector<uint8_t> padding;      ///< [T], 1 = padding; empty = none
  std::vector<int32_t> token_types;  ///< [T]; != 0 = must-keep (gamma-MoD); empty = none

  int64_t num_sequences() const;
  int64_t begin(int64_t s) const;
  int64_t end(int64_t s) const;
  bool padded(int64_t t) const;
  int64_t sequence_of(int64_t t) const;
  int64_t position(int64_t t) const;
};

/// A router's decisions, with the information to exclude near-ties.
struct Decision {
  std::vector<uint8_t> selected;  ///< [T] 1 = through the block
  std::vector<double> weight;     ///< [T] g_t for every unpadded token (0 for padding)
  std::vector<double> logits;     ///< [T, R] router logits (R = 1, or 2 for gamma-MoD)
  /// [T] 1 = this token's decision is within the near-tie tolerance (a threshold decision
  /// within tolerance, or any token of a sequence whose capacity boundary is a near-tie).
  std::vector<uint8_t> ambiguous;
  std::vector<uint8_t> sequence_ambiguous;  ///< [S] some token of the sequence is ambiguous
  int64_t count_ambiguous() const;
};

enum class Act { raw, sigmoid, tanh };
enum class ModMode { capacity, threshold, aux_predictor };

/// Near-tie rule: decision scores a, b (or a score and its threshold) of tokens whose dot
/// products have magnitude scale c = sum_i |w_i x_i| are a near-tie if
/// |a - b| < tie_rel * max(|a|, |b|, c).
struct ModParams {
  double ratio = 0.125;
  Act act = Act::raw;
  double alpha = 1.0;
  ModMode mode = ModMode::capacity;
  double threshold = 0.5;
  double tie_rel = 1e-6;
  /// aux_predictor with the MoD paper's MLP when mlp_h > 0: a = w2 . relu(W1 x + b1) + b2.
  int64_t mlp_h = 0;
  std::vector<float> mlp_w1, mlp_b1, mlp_w2;
  float mlp_b2 = 0.0f;
};
/// MoD: r_t = w . x_t; capacity: top ceil(ratio S) per sequence by r (ties lower index);
/// threshold: sigmoid(r) > threshold; aux: sigmoid(aux . x) > threshold. Weight act(r).
Decision mod(const Layout& L, const float* x, const std::vector<float>& w,
             const std::vector<float>& aux, const ModParams& p);

enum class GammaPhase { capacity, prefill, decode };
struct GammaParams {
  double ratio = 0.5;
  GammaPhase phase = GammaPhase::capacity;
  double prefill_threshold = 0.005;
  double decode_threshold = 0.5;
  double tie_rel = 1e-6;
  bool must_keep_at_inference = false;  ///< phases: must-keep also selected
};
/// gamma-MoD: p_t = softmax(W x_t)[1], W [2, d]; must-keep (token_types != 0) always selected;
/// capacity: the rest of ceil(ratio S) to the top p of the others; phases: p > threshold.
Decision gamma_mod(const Layout& L, const float* x, const std::vector<float>& W,
                   const GammaParams& p);

struct PruneParams {
  double tau = 0.5;
  bool has_sparsity = false;
  double sparsity = 0.0;
  double tie_rel = 1e-6;
};
/// FTP: sigmoid(r) > tau, or top ceil((1 - sparsity) S) by r per sequence; weight 1.
Decision token_prune(const Layout& L, const float* x, const std::vector<float>& w,
                     const PruneParams& p);

// ------------------------------------------------------------------------ blocks
/// SwiGLU FFN, HF layout: down(silu(gate x) * up x); gate, up [f, d], down [d, f].
struct Ffn {
  int64_t hidden = 0, intermediate = 0;
  std::vector<float> gate, up, down;
};
std::vector<double> ffn_row(const Ffn& f, const float* x);

/// Single-head attention, Wq, Wk, Wv, Wo [d, d] (HF [out, in]), scale 1/sqrt(d).
struct Attention {
  int64_t hidden = 0;
  std::vector<float> wq, wk, wv, wo;
};
/// Causal attention among `rows` rows of `x [rows, d]` at the given positions (row i sees
/// row j iff pos[j] <= pos[i]). Returns [rows, d].
std::vector<double> attention(const Attention& a, const float* x, int64_t rows,
                              const std::vector<int64_t>& pos);

/// The depth layer: y_t = weight_t * f(x_t) for selected unpadded tokens, 0 otherwise. [T, d].
std::vector<double> layer_ffn(const Layout& L, const float* x, const Decision& dec, const Ffn& f);
/// The same with the attention block, which sees only the selected tokens of the token's own
/// sequence, causally on their original positions.
std::vector<double> layer_attention(const Layout& L, const float* x, const Decision& dec,
                                    const Attention& a);

// ------------------------------------------------------------------------ ARank
/// Singular values of A [rows, cols] (row-major), descending (one-sided Jacobi, in double).
std::vector<double> singular_values(const std::vector<double>& A, int64_t rows, int64_t cols);
/// numpy matrix_rank: count of singular values > max(sigma) * max(rows, cols) * eps.
int64_t matrix_rank(const std::vector<double>& A, int64_t rows, int64_t cols, double eps);
/// Mean rank over maps [n, rows, cols].
double arank(const std::vector<double>& maps, int64_t n, int64_t rows, int64_t cols, double eps);

}  // namespace depth_ref
