// SPDX-License-Identifier: Apache-2.0
// Independent double-precision reference of the layerwise recurrent router (RMoE, arXiv
// 2408.06793; ROUTING.md section 4) and of a stack of MoE layers threading its state.
//
// Plain loops on the torch.nn.GRUCell / torch.nn.RNNCell equations, written for clarity.
// Includes no moekit header and shares no code with the library; it reuses the top-k
// reference's plain types (ref::Routing, ref::Ffn) and comparison helpers from
// reference/reference.hpp. No GoogleTest here: the benchmark compiles it too.
#pragma once

#include <cstdint>
#include <vector>

#include "reference/reference.hpp"

namespace ref::gru {

enum class Variant { gru, rnn };

/// The shared cell, torch layout: weight_ih, weight_hh [G d_r, d_r], bias_ih, bias_hh
/// [G d_r]; G = 3 (gate rows r, z, n) for gru, 1 for rnn.
struct Cell {
  Variant variant = Variant::gru;
  int64_t d_r = 0;
  std::vector<float> weight_ih, weight_hh, bias_ih, bias_hh;
};

/// One layer's router: proj [d_r, d] (router.proj.weight), out [E, d_r] (router.out.weight).
struct Router {
  int64_t num_experts = 0;  ///< E
  int64_t k = 0;
  int64_t hidden = 0;  ///< d
  std::vector<float> proj, out;
};

/// h = cell(x, h_prev), all [d_r], in double:
///   gru: r = sig(W_ir x + b_ir + W_hr h + b_hr), z = sig(W_iz x + b_iz + W_hz h + b_hz),
///        n = tanh(W_in x + b_in + r (W_hn h + b_hn)), h' = (1 - z) n + z h
///   rnn: h' = tanh(W_in x + b_in + W_hn h + b_hn)
std::vector<double> cell_step(const Cell& c, const std::vector<double>& x,
                              const std::vector<double>& h_prev);

/// What one layer's router produces.
struct RouteResult {
  Routing routing;             ///< k slots per unpadded token; selection = softmax probabilities
  std::vector<double> state;   ///< [T, d_r] new state (padded tokens: the input state)
  std::vector<double> logits;  ///< [T, E] (padded tokens: 0)
};

/// Routes `X [T, d]` from `state [T, d_r]` (empty = zeros): x = proj X_t, h = cell(x, h_prev),
/// L = out h, p = softmax(L), top-k by p (ties to the lower id), w = p / sum of the chosen p.
/// `padding [T]` (1 = padded) may be null.
RouteResult route(const Cell& c, const Router& r, const std::vector<double>& X, int64_t T,
                  const std::vector<double>& state, const uint8_t* padding = nullptr);

/// One MoE layer of a stack: the router and its E routed experts.
struct StackLayer {
  Router router;
  std::vector<Ffn> experts;
};

/// What the stack reference records per layer.
struct StackStep {
  std::vector<double> input;   ///< [T, d] the layer's input X_l
  RouteResult route;           ///< routing and new state of the layer
  std::vector<double> output;  ///< [T, d] y_l = sum over slots of w E_e(X_l) (0 for padding)
};

/// Runs the stack on `X0 [T, d]` in double from a zero state: layer l routes X_l with the
/// state of layer l - 1, and X_{l+1} = X_l + y_l (the residual the caller adds).
std::vector<StackStep> stack_forward(const Cell& c, const std::vector<StackLayer>& layers,
                                     const float* X0, int64_t T, const uint8_t* padding = nullptr);

}  // namespace ref::gru
