// SPDX-License-Identifier: Apache-2.0
// Independent double-precision reference of expert-choice routing (ROUTING.md section 3):
// batch expert choice with the per-token cap, threshold routing and its calibration, the
// auxiliary predictor, the [E, kc] outputs, and an FFN layer forward, for tests and benchmarks.
//
// Plain loops written for clarity; shares no code with the library and includes no moekit
// header (its own namespace ref_ec, so it links beside tests/reference/reference.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace ref_ec {

/// Router parameters (the names of ROUTING.md section 3).
struct Params {
  int64_t num_experts = 0;            ///< E
  int64_t hidden = 0;                 ///< d
  double capacity_factor = 2.0;       ///< c
  int64_t max_experts_per_token = 0;  ///< per-token cap, 0 = none
};

/// Auxiliary predictor Linear(d, H) -> ReLU -> Linear(H, E), HF [out, in] layout.
struct Predictor {
  int64_t aux_hidden = 64;  ///< H
  std::vector<float> w0;    ///< [H, d]
  std::vector<float> b0;    ///< [H]
  std::vector<float> w2;    ///< [E, H]
  std::vector<float> b2;    ///< [E]
};

struct Slot {
  int64_t expert = 0;
  double weight = 0.0;  ///< S[t, e], 0 when dropped
  bool dropped = false;
};

struct TokenRouting {
  bool padded = false;
  std::vector<Slot> slots;  ///< descending S, ties to the lower expert id
  /// A decision of this token may flip under fp32 rounding: a deciding score within the
  /// near-tie threshold of its boundary (expert boundary, threshold, predictor 0, cap or
  /// slot order). Such tokens are not compared exactly.
  bool near_tie = false;
  int64_t ambiguous = 0;  ///< decisions (token, expert) that may flip
};

struct Routing {
  int64_t tokens = 0;
  int64_t experts = 0;
  int64_t routed = 0;               ///< unpadded tokens
  int64_t kc = 0;                   ///< batch mode: tokens per expert; causal modes: 0
  std::vector<double> scores;       ///< S [T, E] (0 rows for padding)
  std::vector<TokenRouting> token;  ///< [T]
  std::vector<std::vector<int64_t>>
      picks;  ///< per expert: picked tokens in pick order (before the cap)
  std::vector<std::vector<int64_t>> kept;  ///< per expert: kept tokens, ascending
  std::vector<uint8_t> expert_near_tie;    ///< per expert: its kept set may flip under rounding
  int64_t near_tie_tokens = 0;
};

/// kc = min(T, max(1, floor(T * c / E))), 0 when T = 0.
int64_t capacity(int64_t routed_tokens, double capacity_factor, int64_t num_experts);

/// |a - b| / max(|a|, |b|), 0 when equal.
double relative_gap(double a, double b);

/// S = softmax over experts of L = x W^T, [T, E] in double; padded rows 0. `padding` may be null.
std::vector<double> scores(const Params& p, const float* gate_weight, const float* x, int64_t T,
                           const uint8_t* padding);

/// Batch expert choice: per expert its kc best unpadded tokens (ties: lower token), then the cap.
Routing route_batch(const Params& p, const float* gate_weight, const float* x, int64_t T,
                    const uint8_t* padding, double tie_rel = 1e-6);

/// Threshold routing: t goes to e iff S[t, e] >= tau[e]; then the cap.
Routing route_threshold(const Params& p, const float* gate_weight, const float* x, int64_t T,
                        const uint8_t* padding, const std::vector<double>& tau,
                        double tie_rel = 1e-6);

/// Predictor routing: t goes to e iff sigmoid(aux(x_t))[e] > 0.5; weight S[t, e]; then the cap.
/// Near tie: |aux(x_t)[e]| below tie_rel * 10 times the sum of the magnitudes of its terms.
Routing route_predictor(const Params& p, const float* gate_weight, const float* x, int64_t T,
                        const uint8_t* padding, const Predictor& aux, double tie_rel = 1e-6);

/// Predictor outputs aux(x_t) [E] for one token, in double.
std::vector<double> predictor_logits(const Params& p, const Predictor& aux, const float* x_t);

/// kth_e: the kc-th largest S[:, e] over the unpadded tokens ([E]; empty when none).
std::vector<double> kth_scores(const Params& p, const float* gate_weight, const float* x, int64_t T,
                               const uint8_t* padding);

/// One calibration step: tau empty -> kth; else decay * tau + (1 - decay) * kth. A batch
/// without unpadded tokens returns tau unchanged.
std::vector<double> calibrate(const Params& p, const std::vector<double>& tau, double decay,
                              const float* gate_weight, const float* x, int64_t T,
                              const uint8_t* padding);

/// ROUTING.md section 8 outputs from a Routing: ids / weights [E, width], kept tokens of each
/// expert by descending weight (ties: lower token), then -1 / 0.
void expert_outputs(const Routing& r, int64_t width, std::vector<int32_t>& ids,
                    std::vector<double>& weights);

// ------------------------------------------------------------------------ layer
/// One SwiGLU expert, HF layout: down(silu(gate x) * up x).
struct Ffn {
  int64_t hidden = 0, intermediate = 0;
  std::vector<float> gate, up;  ///< [f, d]
  std::vector<float> down;      ///< [d, f]
};

std::vector<double> ffn_forward(const Ffn& f, const float* x);

/// A token's kept (expert, weight) pairs in slot order.
struct Contribution {
  int64_t expert = 0;
  double weight = 0.0;
};

/// y_t = sum over contributions of weight * E_e(x_t), [T, d]; tokens with none get 0.
std::vector<double> moe_forward(const std::vector<std::vector<Contribution>>& per_token,
                                const std::vector<Ffn>& experts, const float* x, int64_t T,
                                int64_t d);

}  // namespace ref_ec
