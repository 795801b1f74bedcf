// SPDX-License-Identifier: Apache-2.0
// Independent double-precision reference of Sinkhorn routing and the selective (SSR) draw
// (ROUTING.md section 2), for tests and benchmarks.
//
// Plain loops written for clarity; shares no code with the library and includes no moekit
// header. The Sinkhorn iteration follows the spec literally in the log domain, in double,
// with two-pass logsumexps and the marginal error computed from the column sums themselves.
#pragma once

#include <cstdint>
#include <vector>

namespace sinkhorn_ref {

enum class Cost { logits, probs };
enum class WeightMode { selection_only, transport };

struct Params {
  int64_t num_experts = 0;  ///< E
  int64_t k = 0;
  int64_t hidden = 0;  ///< d
  int64_t max_iters = 100;
  double tolerance = 1e-4;
  Cost cost = Cost::logits;
  double temperature = 1.0;  ///< xi
  WeightMode weight_mode = WeightMode::selection_only;
};

struct Result {
  int64_t tokens = 0, experts = 0, k = 0;
  int64_t routed = 0;  ///< unpadded tokens (the T of the transport problem)
  int64_t iterations = 0;
  double error = 0.0;                 ///< marginal error after the last iteration
  std::vector<double> error_history;  ///< error after each iteration
  std::vector<double> logits;         ///< [T, E] (padded rows 0)
  std::vector<double> log_plan;       ///< [T, E] log Pi (padded rows -inf)
  std::vector<uint8_t> padded;        ///< [T]
  std::vector<std::vector<int64_t>>
      experts_of;  ///< per token: k ids in slot order (none when padded)
  std::vector<std::vector<double>> weights_of;  ///< per token: k weights in slot order
  /// Per token: log Pi of the k-th minus the (k+1)-th chosen (+inf when k = E), i.e. about the
  /// relative gap of the deciding plan entries; and the smallest gap between consecutive chosen.
  std::vector<double> boundary_gap, order_gap;
};

/// Routes `x [T, d]` with `gate_weight [E, d]`; `padding [T]` (1 = padded) may be null.
Result route(const Params& p, const float* gate_weight, const float* x, int64_t T,
             const uint8_t* padding = nullptr);

/// Column sums `[E]` and row sums `[T]` of exp(log_plan) over the unpadded tokens.
void marginals(const Result& r, std::vector<double>& column_sums, std::vector<double>& row_sums);

/// splitmix64 (Steele, Lea, Flood 2014), written out independently.
uint64_t splitmix64(uint64_t x);

/// `splitmix64(seed ^ (step * 0x9E3779B97F4A7C15) ^ layer) / 2^64 < p`, decided exactly with
/// integer arithmetic.
bool selective_draw(uint64_t seed, uint64_t step, uint64_t layer, double p);

}  // namespace sinkhorn_ref
