// SPDX-License-Identifier: Apache-2.0
// Independent double-precision reference of dynamic-k routing (ROUTING.md section 7): top-p
// (the "reach" rule of ROUTING.md / arXiv 2403.07652 and the "within" rule of DynMoLE's
// official code, TUDB-Labs/MoE-PEFT `_dynamic_routing`), threshold routing, and DynMoLE's
// Tsallis-entropy hybrid (MoE-PEFT moe_peft/common/moe_utils.py `tsallis_entropy`, commit
// 4fad2b72), with capacity on the slots. Plain loops; includes no moekit header.
#pragma once

#include <cstdint>
#include <vector>

#include "reference/reference.hpp"

namespace ref::dynamic_k {

enum class Mode { top_p, threshold, tsallis };
enum class Rule { reach, within };

/// Mirrors DynamicKOptions (docs/routers.md, dynamic k).
struct Params {
  int64_t num_experts = 0, hidden = 0;
  Mode mode = Mode::top_p;
  double top_p = 0.5;
  Rule rule = Rule::reach;
  double threshold = 0.1;
  int64_t k_min = 1, k_max = 0;  ///< k_max 0 = E
  double q = 1.5, entropy_threshold = 0.9;
  bool entropy_normalize = true;
  bool norm_topk_prob = false;
  double capacity_factor = 0.0;
  int64_t min_capacity = 0;
  DropPolicy drop_policy = DropPolicy::score;
  bool renormalize_after_drop = false;
  std::vector<double> steering;  ///< [E] added to the logits; empty = none
};

struct Result {
  Routing routing;               ///< slots per token (variable count), capacity applied
  std::vector<double> entropy;   ///< [T] tsallis mode: S_q (normalised as configured); else 0
  /// [T] 1 when a decision of the token sits within `tie` of a boundary (so fp32 may decide it
  /// the other way): p values at the count boundary, a cumulative sum or p near top_p /
  /// threshold, the entropy near its threshold.
  std::vector<uint8_t> fragile;
};

/// Tsallis entropy (1 - sum p^q) / (q - 1) (q = 1: Shannon), normalised by its uniform value.
double tsallis(const std::vector<double>& p, double q, bool normalize);

/// Routes `x [T, d]` with `W [E, d]`; `padding [T]` may be null.
Result route(const Params& p, const float* W, const float* x, int64_t T, const uint8_t* padding, double tie = 1e-6);

}  // namespace ref::dynamic_k
